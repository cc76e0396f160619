"""The verdict under compare's table: which method is best on each score, and which beat temperature scaling.

A difference between two methods counts where the 95% Student-t interval of the mean per-seed difference excludes
zero (both scored on the same seed's test set, so the interval covers the training noise); with one seed there is
no interval, and the verdict compares the values and says so.
"""

import math
import numbers
from functools import lru_cache

import numpy as np

from ..guides.registry import METHODS
from .table import COLUMNS, base_guide, check_one_row_each, read_apart, row_setting, seed_list, shown
from .versions import one_version

BASELINE, REFERENCE = "temperature", "map"
ACCURACY_POINTS = 1.0  # the accuracy loss against MAP, in points, that the verdict names


def _t_within(t, df):
    """``P(|T| <= t)`` for Student's t with ``df`` (a positive int) degrees of freedom, in closed form
    (Abramowitz & Stegun 26.7.3-4: a finite series in ``theta = atan(t / sqrt(df))``)."""
    theta = math.atan(t / math.sqrt(df))
    c2, term = math.cos(theta) ** 2, 1.0
    if df % 2:
        total = 0.0
        for k in range(1, (df - 1) // 2):  # cos(theta) (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... + cos^(df-3) term)
            total, term = total + term, term * c2 * 2 * k / (2 * k + 1)
        series = math.cos(theta) * (total + term) if df > 1 else 0.0
        return 2 / math.pi * (theta + math.sin(theta) * series)
    total = 0.0
    for k in range(1, df // 2):  # 1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2)
        total, term = total + term, term * c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * (total + term)


@lru_cache(maxsize=None)
def t_quantile_95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom (12.706 for 1, 2.201 for 11,
    1.960 in the limit), by bisection on :func:`_t_within`."""
    low, high = 0.0, 1e3
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_within(mid, df) < 0.95 else (low, mid)
    return (low + high) / 2


def accuracy_drop(reference: float, accuracy: float) -> float:
    """``reference - accuracy`` in accuracy points as printed, 2 decimals (0.80 - 0.79 is 1.0000000000000009 points,
    1.004 prints 1.00): what "more than :data:`ACCURACY_POINTS` below MAP" is decided on, in the verdict and the study."""
    return round(100 * (reference - accuracy), 2) + 0.0


def clear_difference(diffs, lower_better=True, means=None, digits=None):
    """``"better"``, ``"worse"`` or ``None`` (within the noise, fewer than 2 seeds) for the per-seed differences
    ``diffs`` (method - other): the mean outside its 95% Student-t interval. With ``means`` (the method's and the
    other's mean over those seeds) and ``digits``: ``None`` where the two means are not :func:`~.table.read_apart` as
    the tables print them (float round-off between a method at a grid edge and the MAP it equals, or a bias of 2e-9
    straddling a rounding boundary), whatever the interval."""
    if len(diffs) < 2 or (means is not None and not read_apart(*means, digits)):
        return None
    mean, se = float(np.mean(diffs)), float(np.std(diffs, ddof=1)) / np.sqrt(len(diffs))
    if mean == 0:
        return None
    if abs(mean) <= t_quantile_95(len(diffs) - 1) * se:
        return None
    return "better" if (mean < 0) == lower_better else "worse"


def _by_guide(rows, dataset, metric, expected=()):
    """``{guide: {seed: value}}`` of ``metric`` on ``dataset``, for the guides whose value is available on every seed
    of ``rows``: one n/a seed leaves the guide out of that metric (the table shows its mean as n/a), rather than
    comparing it on fewer seeds than the verdict names; and ``{guide: [seeds]}``: the guides left out so, with their
    n/a seeds. Where any row on ``dataset`` holds ``metric``, a row without the key (an old or hand-made record) is
    n/a on its seed, and so is a guide of ``expected`` without a row there (a shifted set whose scoring failed while
    the test set's was kept): left out and named, never dropped without a word."""
    seeds = {r["seed"] for r in rows}
    out, guides, held = {}, dict.fromkeys(expected, True), False  # guides: ordered as the rows are
    for r in rows:
        if r["dataset"] != dataset:
            continue
        value = r.get(metric)
        guides[r["guide"]], held = True, held or metric in r
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value):  # numpy scalars too
            out.setdefault(r["guide"], {})[r["seed"]] = float(value)
    na = {g: sorted(seeds - set(out.get(g, {}))) for g in guides} if held else {}
    return {g: v for g, v in out.items() if not na[g]}, {g: s for g, s in na.items() if s}


def _beats(values, guide, other, metric):
    """Whether ``guide`` is better than ``other`` on ``metric``: by the paired interval over their shared seeds
    (two or more), by the value with one; never where their means are not :func:`~.table.read_apart` at the table's
    digits (those that read the same :func:`_best` calls tied; a round-off straddle it names apart, as printed)."""
    lower, digits = COLUMNS[metric].lower_better, COLUMNS[metric].digits
    seeds = sorted(set(values.get(guide, {})) & set(values.get(other, {})))
    if not seeds:
        return False
    diffs = [values[guide][s] - values[other][s] for s in seeds]
    means = [float(np.mean([values[g][s] for s in seeds])) for g in (guide, other)]
    if not read_apart(*means, digits):
        return False
    if len(seeds) == 1:  # the values as the table shows them: 0.703 beats 0.704, as the Best line says
        return (diffs[0] < 0) == lower
    return clear_difference(diffs, lower) == "better"  # the printed means differ: the interval decides


def _mean(values, guide):
    return float(np.mean(list(values[guide].values())))


def _best(values, metric) -> str:
    """The best mean of ``metric``: ``"guide (value)"``, or every guide whose mean reads the same at the table's
    digits, ``"a, b (value, tied)"`` (with two classes a method and its +ts row share their AURC: a temperature keeps the ranking of binary
    confidences; with more choices it can reorder them)."""
    column = COLUMNS[metric]
    printed = {g: shown(_mean(values, g), column.digits) for g in values}
    top = (min if column.lower_better else max)(values, key=lambda g: _mean(values, g))
    tied = [g for g in values if printed[g] == printed[top]]
    chance = ""
    if _no_better_than_chance(values, top, metric):  # 0.303 was called the best OOD AUROC
        it = "they" if len(tied) > 1 else "it"
        chance = (f", at chance: {it} tell{'s' * (it == 'it')} the shifted set apart no better than a coin"
                  if float(printed[top]) == column.chance else
                  f", below chance: {it} rank{'s' * (it == 'it')} the shifted inputs as less uncertain than the test "
                  "set's more often than not, detecting no shift")
    return f"{', '.join(tied)} ({printed[top]}{', tied' if len(tied) > 1 else ''}{chance})"


def _no_better_than_chance(values, guide, metric) -> bool:
    """Whether ``guide``'s mean of ``metric`` reads at or below the score that tells nothing (an AUROC's 0.5)."""
    column = COLUMNS[metric]
    return column.chance is not None and float(shown(_mean(values, guide), column.digits)) <= column.chance


def _names(guides):
    return ", ".join(guides) if guides else "none"


def _seeds(seeds, compared):
    return "every seed" if seeds == compared else seed_list(seeds)


def _left_out(left, compared):
    """The line naming, per metric, the methods left out of its comparison (``{metric title: {guide: seeds}}``)
    and the seeds their value is n/a on: a list of one line, or none where none was left out."""
    parts = [f"of the {title} comparison: " + ", ".join(f"{g} (n/a on {_seeds(s, compared)})" for g, s in out.items())
             for title, out in left.items() if out]
    return ["- Left out " + "; ".join(parts) + "."] if parts else []


def _missing(name, guide, left, compared, what, finished):
    """Why ``guide`` (temperature scaling, MAP) cannot be compared against: its ``what`` is n/a on some seed; or it
    has rows (``finished``: the guides that have) but no row records the score (a record from before it was scored,
    or edited); or it has no row: no finished seed (failed on every one, or not run)."""
    if guide in left:
        return f"{name}'s {what} is n/a on {_seeds(left[guide], compared)}"
    if guide in finished:
        return f"{name}'s {what} is not recorded in the rows (a record from before it was scored, or edited)"
    return f"{name} has no finished seed (it failed on every one, or was not run)"


def _check_keys(rows) -> None:
    """Refuse a row whose seed is no integer, and rows repeating a (guide, dataset, seed): the last of two rows (a
    rerun's joined to the first run's) replaced the first's values without a word, and a seed ``"0"`` beside ``1``
    failed as a bare ``TypeError``. compare's record refuses both when read."""
    for r in rows:
        if not isinstance(r.get("seed"), numbers.Integral) or isinstance(r.get("seed"), bool):
            raise ValueError(f"the row of {r.get('guide')!r} on {r.get('dataset')!r} has seed {r.get('seed')!r}: a "
                             "seed is an integer")
    check_one_row_each(rows)


def verdict(rows, dataset, shifted=()) -> str:
    """The paragraph ``compare`` prints under its table, from the per-seed ``rows`` of one run whose training set
    is ``dataset``: the best row on ECE, NLL and AURC (and OOD AUROC by entropy and by MI on each shifted set); which
    rows beat MAP and temperature scaling on AURC and on OOD AUROC (a method's MI against the baselines' entropy:
    their MI is 0 by construction); which rows beat temperature scaling on both ECE and NLL, by setting (no
    validation data / validation-tuned); which lose more than :data:`ACCURACY_POINTS` accuracy points against MAP,
    on the test set and on each shifted set, and, where the rows hold their posterior mean's accuracy
    (``mean_accuracy``), whether the weight noise or the fit itself costs it. A method whose score is n/a on one of the compared seeds is left out of that score's
    comparison, and the verdict names it with those seeds; where temperature scaling or MAP has no finished seed
    (or an n/a NLL / accuracy), it says that comparison was not made. Empty where ``rows`` hold nothing of
    ``dataset``.

    A method whose rows span several versions of it is compared on one version's rows
    (:func:`~.versions.one_version`), and the verdict names the seeds left out.

    :param shifted: the run's shifted evaluation sets (its config's ``eval_datasets``); the rows name the others. One
        without a row on the compared seeds (every method's scoring of it failed, or was not run) is named as such,
        rather than left out of the verdict without a word.
    :raises ValueError: for a row whose seed is no integer, or two rows of one method, dataset and seed.
    """
    _check_keys(rows)
    rows, versions = one_version(rows)
    by_guide = {}
    for r in rows:
        if r["dataset"] == dataset:
            by_guide.setdefault(r["guide"], set()).add(r["seed"])
    if not by_guide:
        return ""
    # every comparison on the seeds every method finished: a mean over other seeds is another number
    seeds = sorted(set.intersection(*by_guide.values()))
    left_out = sorted(set.union(*by_guide.values()) - set(seeds))
    if not seeds:
        return (f"Verdict on {dataset}: none: no seed was finished by every method (seeds "
                f"{', '.join(map(str, left_out))} each lack some); rerun the missing ones.")
    # the run's shifted sets, and any the rows name: read before the seeds are cut, so a set none of them holds is said
    evaluated = sorted(({*shifted} | {r["dataset"] for r in rows}) - {dataset})
    rows = [r for r in rows if r["seed"] in seeds]
    values, left = {}, {}
    for m in ("accuracy", "ece", "nll", "aurc"):
        values[m], left[m] = _by_guide(rows, dataset, m)
    how = (f"{len(seeds)} seeds; a difference counts where the paired per-seed 95% interval excludes 0" if len(seeds) > 1
           else "1 seed: no interval, the values compared as they are; run several --seeds to tell noise apart")
    if left_out:
        how += (f"; {seed_list(left_out)} left out: not every method "
                f"finished it{' (in the version compared)' if versions else ''}, and means over other seeds would not compare")
    lines = [f"Verdict on {dataset} ({how}):"]
    lines += [f"- {name}: {seed_list(seeds)} of version {', '.join(map(str, older))} left out, compared on its version "
              f"{kept} rows alone (rows of two versions are not averaged; a run of {name} reruns them)."
              for name, (seeds, older, kept) in versions.items()]
    best = [f"{COLUMNS[m].title}: {_best(values[m], m)}" for m in ("ece", "nll", "aurc") if values[m]]
    # a method n/a on one seed is left out of that metric's comparison (not compared on fewer seeds), and said
    titles = {m: COLUMNS[m].title.removesuffix(" x100") for m in ("accuracy", "ece", "nll", "aurc")}
    dropped = {titles[m]: left[m] for m in ("ece", "nll", "aurc", "accuracy")}
    # what a temperature can hardly change, against both baselines:
    # (title, scores, metric, the baselines' n/a seeds, the baselines' score named where it is n/a, the set scored on)
    against = [("AURC", values["aurc"], "aurc", left["aurc"], "AURC", dataset)]
    accuracy = {dataset: (values["accuracy"], left["accuracy"])}  # evaluation set -> its scores and n/a seeds
    scored = {r["dataset"] for r in rows}
    unscored = [name for name in evaluated if name not in scored]
    for shifted in [name for name in evaluated if name in scored]:
        # a method scored on the test set is scored on every shifted set: one without rows there failed on it
        accuracy[shifted] = _by_guide(rows, shifted, "accuracy", by_guide)
        dropped[f"{titles['accuracy']} on {shifted}"] = accuracy[shifted][1]
        entropy = f"OOD AUROC (entropy) on {shifted}"
        ood, dropped[entropy] = _by_guide(rows, shifted, "ood_auroc_entropy", by_guide)
        if ood:
            best.append(f"{entropy}: {_best(ood, 'ood_auroc_entropy')}")
        against.append((entropy, ood, "ood_auroc_entropy", dropped[entropy], entropy, shifted))
        mi, na = _by_guide(rows, shifted, "ood_auroc_mi", by_guide)
        # a point estimate's MI is 0, its AUROC 0.5 by construction (MAP, temperature scaling, zero-shot): not ranked;
        # a posterior that collapsed on one seed only (TFB's search at sigma_q = 0) is ranked by its mean, as the table does
        on_shifted = [r for r in rows if r["dataset"] == shifted]
        point = {r["guide"] for r in on_shifted} - {r["guide"] for r in on_shifted if r.get("mutual_information") != 0}
        mi = {g: v for g, v in mi.items() if g not in (BASELINE, REFERENCE) and g not in point}
        # a +ts row keeps no samples, so its MI is n/a by design: only other n/a values are named
        dropped[f"OOD AUROC (MI) on {shifted}"] = {g: s for g, s in na.items() if base_guide(g) == g}
        if mi:
            best.append(f"OOD AUROC (MI) on {shifted}: {_best(mi, 'ood_auroc_mi')}")
            # the baselines' MI is 0 by construction: a method's MI is set against their entropy, their best score
            against.append((f"OOD AUROC (MI, theirs by entropy) on {shifted}",
                            {**mi, **{g: v for g, v in ood.items() if g in (BASELINE, REFERENCE)}}, "ood_auroc_mi",
                            dropped[entropy], entropy, shifted))
    over = f" (means over {seed_list(seeds)}, which every method finished)" if left_out else ""
    lines.append(f"- Best{over}: " + ("; ".join(best) if best else "none: every score is n/a") + ".")
    lines += _left_out(dropped, seeds)
    if unscored:
        lines.append(f"- Nothing compared on {', '.join(unscored)}: no method has a row there"
                     f"{f' on {seed_list(seeds)}' if left_out else ''} (every method's scoring of "
                     f"{'them' if len(unscored) > 1 else 'it'} failed, or was not run).")
    if BASELINE in values["nll"]:
        lines += _against_baseline(rows, values, left)
    else:
        lines.append("- Against temperature scaling: not compared: "
                     + _missing("temperature scaling", BASELINE, left["nll"], seeds, "NLL", by_guide) + ".")
    # on the training set's test set, then on each shifted set: a method may keep MAP's accuracy on one and not the other
    lines += [_against_map(rows, scores, na, evaluated, seeds, evaluated != dataset)
              for evaluated, (scores, na) in accuracy.items()]
    # what a temperature can hardly change: selective prediction and telling shifted inputs apart
    for title, scores, metric, na, what, evaluated in against:
        if BASELINE in scores and REFERENCE in scores:
            better = [g for g in scores if g not in (BASELINE, REFERENCE)
                      and all(_beats(scores, g, other, metric) for other in (REFERENCE, BASELINE))]
            # above baselines that are below chance themselves, a method at or below it still detects nothing
            chance = [g for g in better if _no_better_than_chance(scores, g, metric)]
            said = f" (above them but at or below chance, detecting nothing: {_names(chance)})" if chance else ""
            lines.append(f"- {title}: better than both MAP and temperature scaling: "
                         f"{_names([g for g in better if g not in chance])}{said}.")
        else:
            scored = {r["guide"] for r in rows if r["dataset"] == evaluated}
            missing = [_missing(name, g, na, seeds, what, scored) for name, g in (("MAP", REFERENCE), ("temperature scaling", BASELINE))
                       if g not in scores]
            lines.append(f"- {title}: not compared against MAP and temperature scaling: {'; '.join(missing)}.")
    return "\n".join(lines)


def _against_map(rows, scores, na, evaluated, seeds, shifted) -> str:
    """The line naming the methods whose accuracy on ``evaluated`` (``scores``: ``{guide: {seed: accuracy}}``, ``na``:
    the n/a seeds of those left out) is more than :data:`ACCURACY_POINTS` below MAP's there, and why (:func:`_why`);
    ``shifted``: ``evaluated`` is a shifted set, named in the line."""
    where = f" on {evaluated}" if shifted else ""
    if REFERENCE not in scores:
        scored = {r["guide"] for r in rows if r["dataset"] == evaluated}
        return (f"- Accuracy against MAP{where}: not compared: "
                + _missing("MAP", REFERENCE, na, seeds, f"accuracy{where}", scored) + ".")
    ref = _mean(scores, REFERENCE)
    # decided on the points as printed (2 decimals): 0.80 - 0.79 is 1.0000000000000009 points, 1.004 prints -1.00
    drops = {g: accuracy_drop(ref, _mean(scores, g)) for g in scores}
    lost = [g for g in scores if drops[g] > ACCURACY_POINTS]
    means = _by_guide(rows, evaluated, "mean_accuracy")[0]
    detail = [f"{g} {0.0 - drops[g]:+.2f}" + _why(means, g, ref) for g in lost]  # -1.04: not -1.0
    return (f"- Accuracy against MAP{where} ({ref:.3f}): " + (f"more than {ACCURACY_POINTS:g} point below it: "
            f"{', '.join(detail)}." if lost else f"none more than {ACCURACY_POINTS:g} point below it."))


def _why(means, guide, ref) -> str:
    """Why ``guide`` lost accuracy, from its posterior mean's accuracy where the rows have it: the mean keeps MAP's
    (within :data:`ACCURACY_POINTS`), so the weight noise costs it; or the mean loses it too: the fit does."""
    if guide not in means:
        return ""
    drop = accuracy_drop(ref, _mean(means, guide))
    cause = "the weight noise costs it" if drop <= ACCURACY_POINTS else "its fit itself costs it"
    return f" (its posterior mean {0.0 - drop:+.2f}: {cause})"


def _against_baseline(rows, values, left):
    """The sentences on temperature scaling: per setting, who beats it on both ECE and NLL, on NLL only (none on
    both where its ECE is n/a on some seed), and who was not compared (n/a on some seed: ``left``)."""
    settings = {r["guide"]: row_setting(r) for r in rows}
    printed = {m: shown(_mean(values[m], BASELINE), COLUMNS[m].digits) for m in ("ece", "nll") if BASELINE in values[m]}
    lines = []
    for setting in sorted({s for g, s in settings.items() if s and g not in (BASELINE, REFERENCE)}):
        ours = [g for g in settings if settings[g] == setting and g not in (BASELINE, REFERENCE)]
        on_nll = [g for g in values["nll"] if g in ours and _beats(values["nll"], g, BASELINE, "nll")]
        no_nll = [g for g in ours if g in left["nll"]]
        tail = f"; not compared (NLL n/a on some seed): {_names(no_nll)}." if no_nll else "."
        if BASELINE not in values["ece"]:
            lines.append(f"- {setting.capitalize()}: beat temperature scaling (NLL {printed['nll']}) on NLL: {_names(on_nll)}; ECE "
                         "not compared: temperature scaling's ECE is n/a on some seed" + tail)
            continue
        both = [g for g in on_nll if _beats(values["ece"], g, BASELINE, "ece")]
        # a method whose ECE was not compared did not lose on it: never "on NLL only"
        no_ece = [g for g in on_nll if g in left["ece"]]
        nll_only = [g for g in on_nll if g not in both and g not in no_ece]
        bayesian = [g for g in both if base_guide(g) in METHODS and METHODS[base_guide(g)].bayesian]
        # a +ts row is Bayes and temperature together: not a Bayesian method beating temperature scaling alone
        alone, tempered = [g for g in bayesian if g == base_guide(g)], [g for g in bayesian if g != base_guide(g)]
        lines.append(f"- {setting.capitalize()}: beat temperature scaling (ECE {printed['ece']}, NLL {printed['nll']}) on both ECE and NLL: "
                     f"{_names(both)}" + (f" (Bayesian alone: {_names(alone)}; Bayesian + temperature: {_names(tempered)})"
                                          if both else "") +
                     f"; on NLL only: {_names(nll_only)}" +
                     (f"; on NLL, its ECE not compared (n/a on some seed): {_names(no_ece)}" if no_ece else "") + tail)
    unknown = sorted(g for g, s in settings.items() if not s and g not in (BASELINE, REFERENCE))
    if unknown:
        lines.append(f"- Not compared with temperature scaling (no setting recorded, and a method this version does not "
                     f"know): {_names(unknown)}.")
    return lines
