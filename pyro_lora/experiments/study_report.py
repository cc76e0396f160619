"""The study's report: ``docs/study.md`` and its figures, built from the ``results.json`` of each dataset's run.

Nothing here trains or loads a model: ``pyro-lora study --report-only`` is :func:`build_report`. The tables use the
column spec of :mod:`pyro_lora.experiments.table`; the summary (where each Bayesian guide does *not* beat MAP, which
differences stand out of the seed noise) is computed from the numbers.
"""

import datetime
import json
import shlex
import warnings
from pathlib import Path

import numpy as np

from ..guides.registry import METHODS, join_notes
from ..io import atomic_file
from ..locking import locked_elsewhere
from .plots import difference_heatmaps
from .results import (PREDICT_SEEDING, SIDECAR, SUMMARY_FIGURES, check_scores, read_record, recorded_seeding, redraw_figures,
                      summarize_run, withheld_text, without)
from .study_header import answer_format, header_section, long_name, model_name, short, used_sizes
from .table import (COLUMNS, base_guide, columns, format_cell, not_available, partial_seeds_note, read_apart, row_setting,
                    seed_list, shown, ts_name)
from .versions import one_version
from .verdict import ACCURACY_POINTS, accuracy_drop, clear_difference, verdict

DATASETS = ("sst2", "arc_easy", "openbookqa")  # the study's sets, in report order
# the columns of the per-set tables (in distribution, under shift), from the one table spec
IN_DISTRIBUTION = columns("accuracy", "ece", "nll", "brier", "aurc", "fit_seconds", "predict_seconds_per_1000", "extra_parameters")
SHIFTED = columns("accuracy", "ece", "nll", "ood_auroc_entropy", "ood_auroc_mi")


# --------------------------------------------------------------------------- loading runs


def load_runs(runs_dir, datasets=None):
    """``{dataset: {"config", "summary", "per_seed", "sidecar"}}`` from ``runs_dir/<dataset>/results.json``.

    ``datasets`` picks and orders them; default every run found, the study's datasets first. A folder whose
    run is of another dataset than its name (a copy, ``arc_easy.bak``) is left out, with a warning, and so is a record
    that cannot be read (:func:`~.results.read_record`: a config lacking a key the report reads, a score that is no
    number). The summary is recomputed from the per-seed rows, as the verdict is. A row without its arrays to check
    it by (:func:`~.results.check_scores`), whatever its seed, is withheld with a warning: left out of ``per_seed``
    (kept under ``"withheld"``), and its (method, seed) counted unfinished.

    :raises ValueError: naming the ``datasets`` asked for that have no run there, or a run's row whose scores are not
        what its arrays give (:func:`~.results.check_scores`).
    """
    runs_dir = Path(runs_dir)
    named = datasets is not None
    if not named:
        found = sorted(p.parent.name for p in runs_dir.glob("*/results.json"))
        datasets = [d for d in DATASETS if d in found] + [d for d in found if d not in DATASETS]
    missing = [d for d in datasets if not (runs_dir / d / "results.json").is_file()]
    if named and missing and len(missing) < len(datasets):
        raise ValueError(f"no run of {', '.join(missing)} under {runs_dir} (runs there: "
                         f"{', '.join(sorted(p.parent.name for p in runs_dir.glob('*/results.json')))})")
    runs = {}
    for dataset in [d for d in datasets if d not in missing]:
        path = runs_dir / dataset / "results.json"
        try:  # the config keys the report reads, and numbers as scores, are checked there
            run = read_record(path.parent, "left out of the report")
        except ValueError as error:
            warnings.warn(str(error))
            continue
        if run["config"]["dataset"] != dataset:
            warnings.warn(f"{path.parent} holds a run of {run['config']['dataset']}, not of {dataset}: left out of the report "
                          f"(a renamed or copied folder: name it {run['config']['dataset']} to have it reported)")
            continue
        try:  # an edited row is refused, not reported; one without its arrays (whatever its seed) is withheld
            withheld = check_scores(path.parent, run["per_seed"], dataset)
        except ValueError as error:
            if not locked_elsewhere(path.parent):
                raise
            # a study writing the run now writes a row's arrays, then the row: the two may be a write apart
            raise ValueError(f"{error}. Another process holds {path.parent} (its .lock) and may be writing that row now: "
                             "build the report once it is done") from None
        if withheld:  # unfinished, as the header counts them (study_header.unfinished_pairs)
            warnings.warn(withheld_text(path.parent, withheld))
            run["per_seed"], run["withheld"] = without(run["per_seed"], withheld), withheld
        seeding = recorded_seeding(run)
        run["per_seed"] = [_without_apart_draws(run, r, seeding) for r in run["per_seed"]]
        # the tables and the verdict from the same rows: a stored summary may be older than them (a hand-edited row)
        run["summary"] = summarize_run(run["per_seed"], run.get("failed", []))
        sidecar = path.with_name(SIDECAR)
        run["sidecar"] = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        run["folder"] = path.parent  # its arrays: whether each (method, seed) is complete (study_header.run_state)
        runs[dataset] = run
    return runs


APART = ("OOD AUROC withheld: scored before 2026-12-03 with weight samples drawn apart for each set, so it told the "
         "draws apart as much as the inputs (rerun the method: `pyro-lora study --update <method>`)")


def _without_apart_draws(run, row, seeding):
    """``row`` with its OOD AUROC withheld (n/a, with :data:`APART` as its note) where a sampling method scored its
    shifted set with other weight samples than its test set (``seeding``, :func:`~.results.recorded_seeding`, below
    :data:`~.results.PREDICT_SEEDING` 2: a run before it, or rows added to one)."""
    method = METHODS.get(base_guide(row["guide"]))
    if (seeding.get(row["guide"], 1) >= PREDICT_SEEDING or row["dataset"] == run["config"]["dataset"]
            or method is None or not method.draws_weights):
        return row
    return {**row, "ood_auroc_entropy": None, "ood_auroc_mi": None, "note": join_notes(row.get("note"), APART)}


def in_distribution_rows(run):
    """The summary rows of a run on its own test set."""
    return [r for r in run["summary"] if r["dataset"] == run["config"]["dataset"]]


def shift_rows(run):
    """The summary rows of a run on its shifted evaluation sets."""
    return [r for r in run["summary"] if r["dataset"] != run["config"]["dataset"]]


def set_label(source, target=None):
    """A column name: ``ARC-E`` in distribution, ``OBQA→ARC-C`` under shift."""
    return short(source) if target is None else f"{short(source)}→{short(target)}"


def metric_table(runs, metric, complete_only=False):
    """``{guide: {set label: mean over seeds}}`` of ``metric`` over every in-distribution and shifted set; values
    that are not available are left out. ``complete_only``: also means over fewer seeds than another row of their
    set has (:func:`partial_cells`), which no comparison may take side by side with the others."""
    table, partial = {}, partial_cells(runs) if complete_only else set()
    for dataset, run in runs.items():
        for row in run["summary"]:
            if metric in row and not not_available(row[metric]):  # OOD AUROC exists on shifted sets only
                label = set_label(dataset, None if row["dataset"] == dataset else row["dataset"])
                if (row["guide"], label) not in partial:
                    table.setdefault(row["guide"], {})[label] = row[metric]
    return table


def partial_cells(runs):
    """``{(guide, set label)}`` whose mean is over fewer seeds than another row of that set."""
    out = set()
    for dataset, run in runs.items():
        for row in run.get("summary", ()):
            if partial_seeds_note(row, run["summary"]):
                out.add((row["guide"], set_label(dataset, None if row["dataset"] == dataset else row["dataset"])))
    return out


def set_labels(runs):
    """Every set label in report order: in-distribution sets, then shifts."""
    shifts = [set_label(d, r["dataset"]) for d, run in runs.items() for r in shift_rows(run)]
    return [set_label(d) for d, run in runs.items() if in_distribution_rows(run)] + list(dict.fromkeys(shifts))


def guide_order(runs):
    """Every guide of the runs, in the order of the method registry, each ``+ts`` row after its method's (others
    after)."""
    seen = {r["guide"] for run in runs.values() for r in run["summary"]}
    ordered = [g for m in METHODS for g in (m, ts_name(m)) if g in seen]
    return ordered + sorted(seen - set(ordered))


# --------------------------------------------------------------------------- comparisons


def average_ranks(table, labels, lower_better=True, digits=9):
    """``{guide: mean rank over the sets it has}``: 1 is best, ties share their mean rank; values ranked as printed
    with ``digits`` decimals (two means the table shows alike are a tie)."""
    ranks = {g: [] for g in table}
    for label in labels:
        guides = [g for g in table if label in table[g]]
        values = np.array([float(shown(table[g][label], digits)) for g in guides]) * (1 if lower_better else -1)
        for g, v in zip(guides, values):
            ranks[g].append(1 + float((values < v).sum()) + 0.5 * float((values == v).sum() - 1))
    return {g: float(np.mean(r)) if r else float("nan") for g, r in ranks.items()}


def not_beating(table, guide, reference, labels, lower_better=True, digits=9):
    """The set labels where ``guide`` does not beat ``reference``, with the difference ``guide - reference`` of the
    values as printed: both are read as the tables print them, ``digits`` decimals, so two NLLs both shown as 0.500
    are a tie (a tie does not beat) and 0.500 against 0.501 a win; so are two within float round-off
    (:func:`~.table.read_apart`: 0.4004999990 and 0.4005000010, difference 0). Lower-is-better metrics: sets where
    ``guide`` is not below ``reference``; higher-is-better ones: not above it.
    """
    out = []
    for label in labels:
        if label not in table.get(guide, {}) or label not in table.get(reference, {}):
            continue
        mine, theirs = table[guide][label], table[reference][label]
        # the difference of the printed values, itself rounded: 0.79 - 0.80 is -0.010000000000000009 in floats
        diff = round(float(shown(mine, digits)) - float(shown(theirs, digits)), digits) + 0.0 \
            if read_apart(mine, theirs, digits) else 0.0
        if (diff >= 0) if lower_better else (diff <= 0):
            out.append((label, diff))
    return out


def _listing(items, digits):
    return ", ".join(f"{label} ({diff:+.{digits}f})" for label, diff in items)


def _name(metric):
    """A metric's name in a sentence: its column title without the scale (``ECE x100`` -> ``ECE``)."""
    return COLUMNS[metric].title.removesuffix(" x100")


def _compared(tables, metric, guide, reference, labels):
    """The sets where both ``guide`` and ``reference`` have a (whole-seed) mean of ``metric``."""
    return [label for label in labels if label in tables[metric].get(guide, {}) and label in tables[metric].get(reference, {})]


def guide_sentences(tables, guide, labels):
    """Plain sentences on where ``guide`` does not beat MAP (NLL, ECE, accuracy, and OOD AUROC by entropy and by MI,
    each against MAP's by entropy, never the better of the two) and where its mean is not below temperature
    scaling's; a metric without a set to compare on is left out."""
    lines = []
    for metric, unit in [("nll", " nats"), ("ece", " ECE points")]:
        n = len(_compared(tables, metric, guide, "map", labels))
        if not n:
            continue
        losses = not_beating(tables[metric], guide, "map", labels, digits=COLUMNS[metric].digits)
        if losses:
            lines.append(f"**{guide}** does not beat MAP on {_name(metric)} on {len(losses)} of {n} sets: "
                         f"{_listing(losses, COLUMNS[metric].digits)}{unit}.")
        else:
            lines.append(f"**{guide}** beats MAP on {_name(metric)} on every set ({n} of {n}).")
    if _compared(tables, "accuracy", guide, "map", labels):
        drops = [(label, 0.0 - drop) for label in _compared(tables, "accuracy", guide, "map", labels)
                 if (drop := accuracy_drop(tables["accuracy"]["map"][label], tables["accuracy"][guide][label])) > ACCURACY_POINTS]
        if drops:
            lines.append(f"**{guide}** loses more than 1 accuracy point to MAP on {_listing(drops, 2)} points.")  # -1.04, not -1.0
        else:
            lines.append(f"**{guide}** loses no more than 1 accuracy point to MAP on any set.")
    auroc = tables.get("ood_auroc_entropy", {})
    shifts = [label for label in labels if label in auroc.get(guide, {}) and label in auroc.get("map", {})]
    # each score judged on its own against MAP's entropy AUROC (a point estimate's MI AUROC is 0.5 by construction):
    # the better of the two, chosen after seeing the shifted test sets, would favour the methods that have both
    for metric, by in (("ood_auroc_entropy", "entropy"), ("ood_auroc_mi", "MI")):
        scores = {guide: tables.get(metric, {}).get(guide, {}), "map": auroc.get("map", {})}
        n = sum(label in scores[guide] for label in shifts)
        if not n:
            continue
        digits = COLUMNS[metric].digits
        worse = not_beating(scores, guide, "map", shifts, lower_better=False, digits=digits)
        if worse:
            lines.append(f"**{guide}**'s OOD AUROC by {by} does not beat MAP's by entropy on {len(worse)} of {n} "
                         f"shifts: {_listing(worse, digits)}.")
        else:
            lines.append(f"**{guide}**'s OOD AUROC by {by} beats MAP's by entropy on every shift ({n} of {n}).")
    lines += temperature_sentences(tables, guide, labels)
    return lines


def temperature_sentences(tables, guide, labels):
    """Where ``guide``'s mean NLL and ECE are not below temperature scaling's (means only: the verdict under each
    run's table says which differences a paired per-seed interval supports)."""
    parts = [f"{_name(metric)} on {_listing(losses, COLUMNS[metric].digits)}" for metric in ("nll", "ece")
             if (losses := not_beating(tables[metric], guide, "temperature", labels, digits=COLUMNS[metric].digits))]
    if not any(_compared(tables, m, guide, "temperature", labels) for m in ("nll", "ece")):
        return []
    if parts:
        return [f"**{guide}**'s mean is not below temperature scaling's on " + "; on ".join(parts) + "."]
    return [f"**{guide}**'s mean NLL and ECE are below temperature scaling's on every set (means only; the verdict "
            "under each run's table says whether a paired interval supports it)."]


# --------------------------------------------------------------------------- markdown


def markdown_table(rows, spec, first=("guide",), unranked=frozenset()):
    """A markdown table, one line per row and one column per :class:`~pyro_lora.experiments.table.Column` of
    ``spec``: ``mean ± std`` cells (``—`` where a row lacks the metric), the best mean of a ranked column in bold
    (among the rows over every seed of the set: a partial mean is marked on its first cell; ``unranked``: (guide,
    column key) cells shown but never the best, such as a point estimate's MI AUROC of 0.5 by construction)."""
    whole = [r for r in rows if not partial_seeds_note(r, rows)]  # a mean over fewer seeds is never the best
    best = {c.key: _best_shown([r[c.key] for r in whole if c.key in r and (r["guide"], c.key) not in unranked],
                               c.digits, c.lower_better, c.chance) for c in spec if c.better}
    lines = ["| " + " | ".join([*first, *(c.title for c in spec)]) + " |", "|" + "---|" * (len(first) + len(spec))]
    for r in rows:
        cells = [str(r[k]) for k in first]
        partial = partial_seeds_note(r, rows)
        if partial:
            cells[first.index("guide") if "guide" in first else 0] += f" ({partial})"
        for c in spec:
            text = format_cell(r, c.key, c.digits, missing="—")
            printed = c.key in r and not not_available(r[c.key]) and shown(r[c.key], c.digits)
            ranked = (r["guide"], c.key) not in unranked
            cells.append(f"**{text}**" if printed and ranked and not partial and printed == best.get(c.key) else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _best_shown(values, digits, lower_better, chance=None):
    """The best of ``values`` as the table shows it (so equal-looking cells are bold alike); None where all look equal
    or the best does not beat ``chance`` (an OOD AUROC of 0.303 was bold)."""
    values = [v for v in values if not not_available(v)]  # n/a cells are never the best
    if len({shown(v, digits) for v in values}) < 2:
        return None
    best = shown(min(values) if lower_better else max(values), digits)
    return None if chance is not None and float(best) <= chance else best


def cross_table(table, labels, guides, digits, lower_better=True, partial=frozenset()):
    """Guides x sets markdown table of one metric's means, best per set in bold (``†``: a mean over fewer seeds,
    ``partial``, never bold); the average rank only where every guide has every set (else the ranks would be over
    different pools of methods)."""
    full = {g: {k: v for k, v in row.items() if (g, k) not in partial} for g, row in table.items()}
    best = {label: _best_shown([row[label] for row in full.values() if label in row], digits, lower_better) for label in labels}
    ranked = all(label in full.get(g, {}) for g in guides for label in labels)
    ranks = average_ranks(full, labels, lower_better, digits) if ranked else {}
    lines = ["| guide | " + " | ".join(labels) + " |" + " avg rank |" * ranked, "|" + "---|" * (len(labels) + 1 + ranked)]
    for g in guides:
        cells = []
        for label in labels:
            text = shown(table[g][label], digits) if label in table.get(g, {}) else "—"
            cells.append(f"{text} †" if (g, label) in partial else f"**{text}**" if text == best[label] else text)
        lines.append(f"| {g} | " + " | ".join(cells) + " |" + f" {ranks.get(g, float('nan')):.2f} |" * ranked)
    return "\n".join(lines)


def draw_figures(run, dataset, figures_dir):
    """Draw a run's reliability grid and calibration-vs-accuracy plot to ``figures_dir/<dataset>_*.png`` from the npz
    files in its folder and the rows the report shows (:func:`~.results.redraw_figures`): the run's own PNGs may
    predate its last rows (a kill where a run redraws them after its last row). Returns ``{kind: file name}`` of
    those drawn (none without arrays: an earlier report's copies are removed, never shown for these rows)."""
    targets = {kind: Path(figures_dir) / f"{dataset}_{kind}.png" for kind in SUMMARY_FIGURES}
    if redraw_figures(run["folder"], run, to=targets):
        return {kind: path.name for kind, path in targets.items()}
    for path in targets.values():
        path.unlink(missing_ok=True)
    return {}


def in_distribution_table(run):
    """The run's table on its own test set, with the setting column (no validation data / validation-tuned) where its
    rows record it, and the rows' notes under it."""
    rows = in_distribution_rows(run)
    first = ("guide", "setting") if any(row_setting(r) for r in rows) else ("guide",)
    notes = {}
    for r in rows:
        if r.get("note"):
            notes.setdefault(r["note"], []).append(r["guide"])
    listed = [f"- {', '.join(guides)}: {note}" for note, guides in notes.items()]
    table = markdown_table([{**r, "setting": row_setting(r) or ""} for r in rows], IN_DISTRIBUTION, first)
    return table + ("\n\nNotes:\n\n" + "\n".join(listed) if listed else "")


def dataset_section(dataset, run, figures):
    """One in-distribution section: the table and the run's figures."""
    c = run["config"]
    # the seeds the table averages, not the config's list: rows of a seed outside it (a hand edit, a merged rerun's
    # extra seed) are averaged where their arrays confirm them, and a seed no row finished is not averaged
    held = dict.fromkeys(s for row in run["summary"] for s in row.get("seeds") or ())
    seeds = ",".join(map(str, [*(s for s in c["seeds"] if s in held), *(s for s in held if s not in c["seeds"])]))
    lines = [f"## {long_name(dataset)} (`{dataset}`)", "",
             f"{model_name(c)}; train {used_sizes(run)[0]}, validation {used_sizes(run)[1]}, test {used_sizes(run)[2]}, "
             f"epochs {c['epochs']}, seeds {seeds}, {c['samples']} posterior samples"
             + (f", {answer_format(c)} format." if c.get("mc_format") else "."), "",
             in_distribution_table(run), ""]
    # compare's paragraph, recomputed from the rows: one stored by older code would miss what the verdict says now
    text = verdict(run["per_seed"], c["dataset"], c.get("eval_datasets", ()))
    if text:
        head, _, points = text.partition("\n")
        lines += [head, "", points, ""]
    if "reliability_grid" in figures:
        lines += [f"![reliability diagrams, {dataset}, seed {c['seeds'][0]}](study/{figures['reliability_grid']})", ""]
    if "calibration_vs_accuracy" in figures:
        lines += [f"![ECE and NLL against accuracy, {dataset}](study/{figures['calibration_vs_accuracy']})", ""]
    if not figures:
        lines += ["(no figures found in the run directory)", ""]
    return "\n".join(lines)


def shift_section(runs):
    """The shift table: each run with evaluation sets, one block of rows per shifted set."""
    lines = ["## Distribution shift", ""]
    blocks = [(d, run) for d, run in runs.items() if shift_rows(run)]
    if not blocks:
        return "\n".join(lines + ["No shift run found (the OpenBookQA run with `--shift`).", ""])
    lines += ["Trained on the source set, scored on the target set's test subset. OOD AUROC: how well the "
              "predictive entropy / mutual information tells the target questions from the source test questions "
              "(0.5: not at all).", ""]
    point = sorted({r["guide"] for _, run in blocks for r in shift_rows(run) if r.get("mutual_information", 0) == 0})
    for d, run in blocks:
        for target in dict.fromkeys(r["dataset"] for r in shift_rows(run)):  # one table per target: its own best
            rows = [{**r, "shift": set_label(d, target)} for r in shift_rows(run) if r["dataset"] == target]
            lines += [markdown_table(rows, SHIFTED, first=("shift", "guide"), unranked={(g, "ood_auroc_mi") for g in point}), ""]
    if point:
        lines += [f"Guides with zero mutual information (a single predictive: {', '.join(point)}) have an MI AUROC "
                  "of 0.5 by construction.", ""]
    return "\n".join(lines)


def summary_section(runs, figure=None):
    """Cross-set tables (accuracy, ECE, NLL, average rank) and where each Bayesian guide does not beat MAP."""
    labels = set_labels(runs)
    guides = guide_order(runs)
    partial = partial_cells(runs)
    shown = {m: metric_table(runs, m) for m in ("accuracy", "ece", "nll")}
    tables = {m: metric_table(runs, m, complete_only=True) for m in ("accuracy", "ece", "nll", "ood_auroc_entropy", "ood_auroc_mi")}
    lines = ["## Summary", "",
             "Means over seeds; in-distribution sets first, then the shifts (source→target). The average rank (1 = best) "
             "is shown where every method has every set. † marks a mean over other seeds than most of the set's methods "
             "have (fewer: a method failed, or the run was cut short; more: a method run on extra seeds): it is left out "
             "of the comparisons of means below (the paired comparison of the last part is on the seeds every method "
             "finished).", ""]
    for c in columns("nll", "ece", "accuracy"):
        lines += [f"### {c.title}", "", cross_table(shown[c.key], labels, guides, c.digits, c.lower_better, partial), ""]
    if figure:
        lines += [f"![NLL and ECE relative to MAP](study/{figure})", ""]
    bayesian = [g for g in guides if g in METHODS and METHODS[g].bayesian]  # posteriors and ensembles
    lines += ["### Where the Bayesian guides do not beat MAP", "",
              "Computed from the tables above (differences guide − MAP in brackets; \"does not beat\" includes ties). "
              "With small test subsets and few seeds many differences are within the seed std of the per-set tables.", ""]
    if not bayesian or "map" not in guides:
        return "\n".join(lines + ["No Bayesian guide and MAP to compare in these runs.", ""])
    pairs = {m: sum(len(_compared(tables, m, g, "map", labels)) for g in bayesian) for m in ("nll", "ece")}
    wins = {m: pairs[m] - sum(len(not_beating(tables[m], g, "map", labels, digits=COLUMNS[m].digits)) for g in bayesian)
            for m in ("nll", "ece")}
    if not any(pairs.values()):  # not "0 of 0": say why nothing was compared
        lines += ["No Bayesian guide has a mean over the same seeds as MAP's on any set (a † mean, MAP's or the "
                  "guide's, or n/a): the means are not compared here; the paired comparison at the end is on the seeds "
                  "every method finished.", ""]
    else:
        lines += [f"A Bayesian guide beats MAP on NLL in {wins['nll']} of {pairs['nll']} (guide, set) pairs and on ECE in "
                  f"{wins['ece']} of {pairs['ece']}.", ""]
    for metric in ("nll", "ece") if any(pairs.values()) else ():
        compared = {g: len(_compared(tables, metric, g, "map", labels)) for g in bayesian}
        losses = {g: len(not_beating(tables[metric], g, "map", labels, digits=COLUMNS[metric].digits)) for g in bayesian}
        everywhere = [g for g in bayesian if compared[g] and not losses[g]] or ["none"]
        nowhere = [g for g in bayesian if compared[g] and losses[g] == compared[g]] or ["none"]
        lines.append(f"On {_name(metric)}, beating MAP on every set: {', '.join(everywhere)}; on no set: {', '.join(nowhere)}.")
    lines.append("")
    for g in bayesian:
        lines += [f"- {s}" for s in guide_sentences(tables, g, labels)]
    calibrated = [g for g in guides if base_guide(g) in bayesian and g != base_guide(g)]
    if calibrated:
        lines += ["", "After temperature scaling on its own averaged predictive (the `+ts` rows), against temperature "
                      "scaling of the MAP:", ""]
        sentences = [s for g in calibrated for s in temperature_sentences(tables, g, labels)]
        lines += [f"- {s}" for s in sentences] or [
            "No `+ts` row has a mean over the same seeds as temperature scaling's on any set (a † mean, either's, or "
            "n/a): the means are not compared here; the paired comparison below is on the seeds every method finished."]
    clear = noise_sentences(runs, [g for g in guides if g != "map"])
    lines += ["", "### Which differences from MAP stand out of the seed noise", "",
              "Per seed, each guide and MAP are scored on the same test questions; a difference counts as clear when "
              "the 95% Student-t interval of the mean per-seed difference excludes zero, paired on the seeds every method of "
              "the set finished (as the verdict under each run's table). That covers the training "
              "noise (initialisation, order) only: with the same few test questions for every seed, the sampling "
              "noise of the test subset is on top. Guides not listed differ from MAP on no set by that test.", ""]
    lines += [f"- {s}" for s in clear]
    return "\n".join(lines + [""])


def paired_differences(runs, metric, reference="map"):
    """``(pairs, left)``: ``pairs``, ``{guide: {set label: [(guide, reference) per seed]}}``, both scored on the same
    seed's test set, so the spread of their differences is the noise a comparison with ``reference`` has to beat;
    ``left``, ``{(guide, set label): [seeds]}``, the cells left out and the seeds their value is n/a on.

    Paired on the seeds every method of the set finished, as the verdict is (a run cut short mid-seed is compared on
    the seeds before it, not dropped whole). A cell whose value is n/a (null, NaN, infinite, or missing where other
    rows hold it) on one of those seeds is left out whole, as the table's mean and the verdict take it, never compared
    on fewer seeds than they name; the reference's leaves out every guide of that set. A set no row scores
    ``metric`` on (OOD AUROC in distribution) has no cell. A method's rows of two versions are paired on one
    version's alone (:func:`~.versions.one_version`), as the table and the verdict take them."""
    out, left = {}, {}
    for dataset, run in runs.items():
        rows, cells = one_version(run["per_seed"])[0], {}  # cells: evaluation set -> guide -> seed -> value
        for r in rows:
            cells.setdefault(r["dataset"], {}).setdefault(r["guide"], {})[r["seed"]] = r.get(metric)
        for evaluated, values in cells.items():
            if not any(metric in r for r in rows if r["dataset"] == evaluated):
                continue
            label = set_label(dataset, None if evaluated == dataset else evaluated)
            seeds = sorted(set.intersection(*(set(v) for v in values.values())))
            na = {g: [s for s in seeds if not_available(v[s])] for g, v in values.items()}
            left.update({(g, label): s for g, s in na.items() if s})
            if reference not in values or na[reference]:
                continue
            for g, v in values.items():
                if g != reference and not na[g]:
                    out.setdefault(g, {})[label] = [(v[s], values[reference][s]) for s in seeds]
    return out, left


def clear_differences(pairs, lower_better=True, digits=9):
    """``(better, worse)`` set labels where the mean paired difference (``pairs``: :func:`paired_differences`' per
    set) is outside its 95% Student-t interval (over seeds; needs two seeds or more) and the two means differ as
    printed with ``digits`` decimals (:func:`~pyro_lora.experiments.verdict.clear_difference`)."""
    outcome = {label: clear_difference([a - b for a, b in p], lower_better, np.mean(p, axis=0), digits) for label, p in pairs.items()}
    return [k for k, v in outcome.items() if v == "better"], [k for k, v in outcome.items() if v == "worse"]


def noise_sentences(runs, guides):
    """Per guide: on which sets it is *clearly* better or worse than MAP (paired over seeds, 95% t interval); then the
    cells left out (n/a on a seed) and what was not compared. "Within the seed noise" is said only of differences an
    interval was computed for: a set with one seed finished by every method has none, and one where nothing was
    compared says so."""
    lines, left, one_seed, intervals, found = [], [], set(), 0, False
    for metric in ("nll", "ece", "accuracy"):
        diffs, na = paired_differences(runs, metric)
        for g in guides:
            cells = diffs.get(g, {})
            intervals += sum(len(p) > 1 for p in cells.values())
            one_seed |= {label for label, p in cells.items() if len(p) == 1}
            better, worse = clear_differences(cells, COLUMNS[metric].lower_better, COLUMNS[metric].digits)
            if better or worse:
                found = True
                lines.append(f"{g}, {_name(metric)}: clearly better than MAP on {', '.join(better) or 'no set'}; "
                             f"clearly worse on {', '.join(worse) or 'no set'}.")
        left += [f"{_name(metric)} of {g} on {label} (n/a on {seed_list(s)}"
                 + ("; every guide of that set left out)" if g == "map" else ")")
                 for (g, label), s in na.items() if g in guides or g == "map"]
    if left:
        lines.append("left out (a value n/a on a seed: not compared on fewer seeds than the tables' means): "
                     + ", ".join(left) + ".")
    if one_seed:
        lines.append(f"not compared on {', '.join(sorted(one_seed))}: one seed finished by every method gives no "
                     "interval (run several --seeds to tell noise apart).")
    if not found and intervals:
        lines.append("none: every difference from MAP compared is within the seed noise.")
    elif not found and not one_seed:
        lines.append("none: no difference from MAP could be tested (no guide and MAP with values on two seeds or more "
                     "of a set).")
    return lines


# --------------------------------------------------------------------------- figure


def summary_plot(runs, path):
    """Heatmaps guide x set of NLL relative to MAP (%) and ECE - MAP (points); red is worse than MAP."""
    labels = set_labels(runs)
    guides = [g for g in guide_order(runs) if g != "map"]
    nll, ece = metric_table(runs, "nll", complete_only=True), metric_table(runs, "ece", complete_only=True)
    if "map" not in nll or not guides:
        return None

    def grid(table, relative):
        out = np.full((len(guides), len(labels)), np.nan)
        for i, g in enumerate(guides):
            for j, label in enumerate(labels):
                if label in table.get(g, {}) and label in table["map"]:
                    ref = table["map"][label]
                    out[i, j] = 100 * (table[g][label] - ref) / ref if relative else table[g][label] - ref
        return out

    # the zero-shot row (no fine-tuning) can be far off: it must not wash out the colours of the others
    scaled = [i for i, g in enumerate(guides) if g != "zeroshot"]
    return difference_heatmaps([("NLL relative to MAP (%); blue: better", grid(nll, True)),
                                ("ECE − MAP (x100 points); blue: better", grid(ece, False))], guides, labels, path, scaled)


# --------------------------------------------------------------------------- report


def build_report(runs_dir, docs_dir, datasets=None, command=None, failed=()):
    """Write ``docs_dir/study.md`` and its figures in ``docs_dir/study/`` from the runs in ``runs_dir``
    (``pyro-lora study --report-only`` is exactly this); returns the path of the markdown file.

    :param datasets: the runs to report, in order (default: every run found, the study's sets first).
    :param command: the command line the report names (default: the ``--report-only`` one).
    :param failed: datasets whose run failed in this invocation (the report says their sections are stale).
    :raises ValueError: if ``runs_dir`` holds no run of ``datasets``.
    """
    runs = load_runs(runs_dir, datasets)
    left_out = sorted(p.parent.name for p in Path(runs_dir).glob("*/results.json") if not datasets or p.parent.name in datasets)
    if not runs and left_out:  # found but none readable: no advice to run again a study that finished
        raise ValueError(f"every run under {runs_dir} ({', '.join(left_out)}) was left out of the report, for the reasons "
                         "warned above: nothing to report")
    if not runs:
        raise ValueError(f"no results.json under {runs_dir}{' for ' + ', '.join(datasets) if datasets else ''}: "
                         "run the study first (or give --runs the folder of its runs)")
    command = command or shlex.join(["pyro-lora", "study", "--report-only", "--runs", str(runs_dir), "--docs", str(docs_dir)])
    docs_dir = Path(docs_dir)
    figures_dir = docs_dir / "study"
    figures_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    parts = [header_section(runs, command, now, failed)]
    parts += [dataset_section(d, run, draw_figures(run, d, figures_dir)) for d, run in runs.items()]
    parts.append(shift_section(runs))
    figure = summary_plot(runs, figures_dir / "summary.png")
    parts.append(summary_section(runs, figure.name if figure else None))
    with atomic_file(docs_dir / "study.md") as f:  # a kill leaves the previous report, never half of one
        f.write("\n\n".join(p.rstrip("\n") for p in parts) + "\n")
    return docs_dir / "study.md"

