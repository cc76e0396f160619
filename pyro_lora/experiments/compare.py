"""``pyro-lora compare``: train a MAP LoRA once, fit several registered methods from it, score all on one test set."""

import contextlib
import os
import time
import warnings
from dataclasses import replace

import numpy as np

from .. import data as D
from ..calibration import fit_temperature, scale_prediction
from ..costs import PeakMemory
from ..distributed import is_main
from ..io import saved_folder
from ..locking import folder_lock
from ..metrics import accuracy
from ..predictive import Prediction, predict
from ..guides.registry import VALIDATION_TUNED, Fitted, get_method, join_notes
from .results import COMPARE_FLAGS, PREDICT_SEEDING, RESULTS, RunFolder, row_names
from .scoring import MI_NO_SAMPLES_NOTE, join_row, ood_auroc, prediction_arrays, score
from .setup import (CompareConfig, base_digest, check_config, default_guides, label_names, load_splits, prepare, records_digest,
                    seed_for, set_digests, train_map)
from .table import base_guide, format_row, seed_list, ts_name
from .versions import method_version, other_version_words
from ..callers import user_stacklevel


def fit_method(setup, name: str, map_seconds: float = 0.0):
    """Fit the registered method ``name`` on ``setup`` under its own seed; returns the :class:`Fitted` (its
    ``predict`` the method's registered predictive where the recipe left it out) and its costs (``map_seconds``,
    the MAP's training, counted for the MAP itself)."""
    method = get_method(name)
    seed_for(setup.seed, name, "fit")
    view = setup.for_method(name)
    with PeakMemory(setup.config.device) as memory:
        t = time.perf_counter()
        fitted = method.recipe(view)
        fit_seconds = time.perf_counter() - t
    _check_fitted(method, fitted)
    fit_seconds += fitted.inherited_seconds
    setup.keep_fit(name, fitted, fit_seconds)  # its whole fit, bases included: what a method starting from it inherits
    fit_seconds += map_seconds if fitted.is_map else 0.0
    if fitted.predict is None:
        fitted = replace(fitted, predict=predictor(view, method, fitted.guide))
    costs = {"fit_seconds": fit_seconds, "fit_memory_mb": memory.megabytes, "extra_parameters": fitted.extra_parameters}
    costs.update(fitted.chosen)
    note = join_notes(fitted.note, validation_note(setup) if method.validation else None)
    if note:
        costs["note"] = note
    return fitted, costs


def _check_fitted(method, fitted):
    """Refuse a recipe's result that its registration does not describe: saved and rebuilt by that description,
    it would be another method's guide or model."""
    if not isinstance(fitted, Fitted):
        raise TypeError(f"method {method.name!r}: its recipe returned {type(fitted).__name__}, not a Fitted")
    if fitted.predict is None and fitted.guide is None:
        raise ValueError(f"method {method.name!r}: its recipe returned neither a predict function nor a guide")
    if method.guide is not None and fitted.predict is not None:
        raise ValueError(f"method {method.name!r} saves its guide, and its recipe returned a predict function too: fit and "
                         "evaluate score a saved guide with the registered predictive, so compare must as well; register "
                         "it as the method's predictive instead")
    if method.guide is not None and type(fitted.guide) is not method.guide:
        raise TypeError(f"method {method.name!r} is registered with guide={method.guide.__name__}, and its recipe returned "
                        f"{type(fitted.guide).__name__}: register the class it returns")
    if method.guide is not None and type(fitted.guide.model) is not method.model:
        raise TypeError(f"method {method.name!r} is registered with model={method.model.__name__}, and its guide's model is a "
                        f"{type(fitted.guide.model).__name__}: register the model class its recipe builds")
    if method.guide is not None and fitted.extra_parameters != method.extra_parameters(fitted.guide):
        raise ValueError(f"method {method.name!r}: its recipe counts {fitted.extra_parameters} extra parameters, and its saved "
                         f"guide {method.extra_parameters(fitted.guide)} (Method.extra_parameters), which evaluate counts: "
                         "count what the guide holds in its extra_parameters, or register the method tempered")


def predictor(setup, method, guide):
    """``records -> Prediction``: the registered predictive of ``method`` on ``guide``, with the run's samples.

    :raises TypeError: from the returned function, if the predictive gives no :class:`~pyro_lora.Prediction`.
    """

    def run(records):
        prediction = method.predictive(guide, setup.loader(records), setup.config.samples)
        if not isinstance(prediction, Prediction):
            raise TypeError(f"method {method.name!r}: its predictive {method.predictive.__name__} returned "
                            f"{type(prediction).__name__}, not a Prediction")
        return prediction

    return run


def evaluate(setup, fitted: Fitted, records, name: str, dataset: str, seeding: int = PREDICT_SEEDING):
    """Predict ``records`` with ``fitted`` (the method ``name``) under the seed of its predictive; returns the
    prediction and its costs.

    Every evaluation set (validation, test, shifted) is predicted under the same seed, so with the same ``S`` weight
    samples (common random numbers): the OOD AUROC then compares the inputs, not two draws (on a shifted set that
    repeated the test set, TFB's was 0.91 where it is 0.5), and a ``+ts`` temperature is fitted on the draws it is
    applied to. ``seeding`` 1 re-scores a run saved before (a seed per set: ``dataset`` names it)."""
    seed_for(setup.seed, name, "predict" if seeding >= 2 else f"predict {dataset}")
    with PeakMemory(setup.config.device) as memory:
        start = time.perf_counter()
        prediction = fitted.predict(records)
        wall = time.perf_counter() - start
    # the Prediction's own time leaves out checks that are no part of predicting (the GLM's probit check); one a
    # method's predictive built by hand keeps the default 0: that read as free, so the call's wall time stands in
    seconds = prediction.seconds if prediction.seconds > 0 else wall
    costs = {"predict_seconds_per_1000": 1000 * seconds / len(records), "predict_memory_mb": memory.megabytes}
    return prediction, costs


# how far the MAP retrained on resume may predict from the one a seed's saved rows used (float noise, not another MAP)
MAP_DRIFT_TOLERANCE = 1e-4


def map_drift(run, setup):
    """Where ``run`` already holds rows of ``setup``'s seed (a resumed run, or the run an update merges into), whether
    they started from the MAP of this process: by the test probabilities of the seed's saved MAP rows (within
    :data:`MAP_DRIFT_TOLERANCE`), else by the MAP digest the run recorded. A MAP trained again (none saved, e.g. a run
    from before MAPs were saved) that differs (another thread count, another library version) would pair the new
    rows with another MAP's. Returns a note for the rows this process adds (also warned), or ``None``, and whether
    the saved MAP rows confirm this MAP."""
    how = "loaded" if setup.map_loaded else "trained again"
    saved = run.saved_probs("map", setup.seed, setup.config.dataset)
    if saved is not None:
        now = predict(setup.model, setup.map_guide, setup.loader(setup.test)).probs.numpy()
        gap = float(abs(now - saved).max()) if now.shape == saved.shape else float("inf")
        if gap <= MAP_DRIFT_TOLERANCE:
            return None, True
        note = (f"the MAP {how} for seed {setup.seed} on resume predicts up to {gap:.2g} away from the one this seed's "
                f"earlier rows used: its rows and theirs start from two MAPs ({RERUN_SEED})")
    else:
        recorded = run.maps.get(str(setup.seed))
        if recorded in (None, setup.map_digest) or not run.has_rows(setup.seed):
            return None, False
        note = (f"the MAP {how} for seed {setup.seed} on resume is not the one this seed's earlier rows used (another "
                f"digest): its rows and theirs start from two MAPs ({RERUN_SEED})")
    warnings.warn(note, stacklevel=user_stacklevel())
    return note, False


RERUN_SEED = "to compare them, rerun the seed alone into a new --out: --seeds <seed>"


def older_seeding_note(run, row_name, seed):
    """The note (also warned) for the rows of ``row_name`` and ``seed`` this process adds to ``run`` where its rows of
    other seeds there drew each evaluation set's weight samples apart (:data:`~.results.PREDICT_SEEDING` 1); else
    None. A method without weight samples scores the same either way."""
    if (not run.has_other_seeds(row_name, seed) or run.seeding.get(row_name, PREDICT_SEEDING) >= PREDICT_SEEDING
            or not get_method(base_guide(row_name)).draws_weights):
        return None
    note = (f"{row_name}'s rows of other seeds drew each evaluation set's weight samples apart (pyro_lora before "
            "2026-12-03), these rows one draw for all: their OOD AUROC and +ts rows differ in kind; rerun the method "
            "(pyro-lora study --update) or the run into a new --out to compare seeds")
    warnings.warn(note, stacklevel=user_stacklevel())
    return note

# below it, one validation example weighs more than an accuracy point: the 1-point guard of the _val knobs, and a
# temperature fitted on the split, rest on a handful of answers
MIN_VALIDATION = 100


def validation_note(setup):
    """The note for the rows fitted on ``setup``'s validation split: where it holds fewer than :data:`MIN_VALIDATION`
    examples (also warned), and where its records repeat training ones (warned when the splits were read); else None."""
    n, note = len(setup.val), None
    if 0 < n < MIN_VALIDATION:  # none: nothing is fitted on it (a real run's split holds at least one)
        note = (f"fitted on a validation split of {n} example{'s' * (n != 1)} (fewer than {MIN_VALIDATION}: each weighs "
                f"{100 / n:.2g} accuracy points, more than the 1-point guard of the validation-tuned knobs; a larger "
                "--train-size or --val-fraction gives more)")
        warnings.warn(note)  # one text from one line, whichever method asks: Python shows it once per run
    return join_notes(note, setup.split_notes.get("validation"))


def run_compare(config: CompareConfig, overwrite: bool = False, reference=None, flags=COMPARE_FLAGS):
    """Run the comparison of ``config`` over its seeds; returns the summary rows (mean and std over seeds).

    Writes to ``config.out`` as each (guide, seed) finishes (:class:`~pyro_lora.experiments.results.RunFolder`):
    ``results.json`` (config, per-seed rows, summary, failed guides), ``predictions_<guide>.npz`` (per evaluation
    set and seed: averaged probabilities, labels, entropy, mutual information), ``reliability_<guide>.png``,
    ``reliability_grid.png``, ``calibration_vs_accuracy.png`` and ``map_seed<k>.safetensors`` (seed ``k``'s MAP,
    which a resumed seed loads rather than trains). A guide that fails is recorded with its error and
    the others go on. A rerun of the same configuration into the same folder resumes: it skips what finished.

    :param overwrite: replace a run of another configuration in ``config.out`` (otherwise refused).
    :param reference: the folder of the run a rerun of some methods will be merged into (``study --update``): each
        seed's MAP must be the one that run's rows started from (its digest; checked as on resume otherwise).
    :param flags: how refusals name their remedies (:data:`~.results.STUDY_FLAGS` for the study, whose flags differ).
    One process at a time writes a run folder (:func:`~pyro_lora.locking.folder_lock`): two writing one ``results.json``
    would each keep only their own rows.

    :raises ValueError: for a configuration that cannot run (:func:`check_config`), before loading anything; for a
        folder another running process writes, or a saved guide's folder.
    :raises GuideFailures: at the end, if some guide failed; every other one is written.
    """
    taken = saved_folder(config.out)
    if taken:  # before check_config's write probe and the lock, which would leave entries there
        raise ValueError(f"--out {config.out} is {taken}: compare would write its results among those files, which a later "
                         "save there refuses or deletes; choose another --out")
    check_config(config)
    # a set's name as recorded and compared on resume (rows, arrays, verdict): "sst2_shift/" is sst2_shift
    config = replace(config, guides=tuple(config.guides or default_guides(config)),
                     data_dir=str(D.resolve_data_dir(config.data_dir)), dataset=os.path.normpath(config.dataset),
                     eval_datasets=tuple(map(os.path.normpath, config.eval_datasets)))
    with folder_lock(config.out, "this run folder") if is_main() else contextlib.nullcontext():
        return _run_seeds(config, overwrite, reference, flags)


def _run_seeds(config, overwrite, reference, flags):
    run = RunFolder(config.out, config, overwrite=overwrite, flags=flags)
    try:
        _fill(run, config, reference)
        run.keep_summary()
    except BaseException as error:  # the summary figures once, of every row written, however the run ended
        try:
            run.redraw()
        except Exception as also:  # noqa: BLE001 -- a full disk fails both: the error that stopped the run is told
            error.add_note(f"the summary figures were not redrawn either: {type(also).__name__}: {also}")
        raise
    run.redraw()
    run.raise_failures()
    return run.summary()


def _fill(run, config, reference):
    """Run and record in ``run`` every (guide, seed) of ``config`` it does not hold yet."""
    earlier = run if reference is None else RunFolder(reference, config, flags=run.flags)  # the rows the new ones join
    splits = load_splits(config)  # prepare() warns about them, once it has the tokenizer
    digest, sets, labels = records_digest(*splits), set_digests(config, *splits), label_names(config)
    for folder in [run] if earlier is run else [run, earlier]:
        folder.check_data(digest, sets)
        folder.check_labels(labels)
    say = print if is_main() else (lambda *a, **k: None)
    left = run.unfinished(config.guides, config.seeds)  # with every seed of rows of another version of a method
    if left:  # rows to add: to rows of as many ranks
        run.check_ranks()
    # the rows kept are what their arrays give (an edited row was shown, averaged and judged as this run's); those that
    # cannot be checked, and those rerun that their arrays contradict (kept if the rerun fails), are never averaged
    run.check_scores(rerun=lambda r: (base_guide(r["guide"]), r["seed"]) in left)
    if earlier is not run:  # an update's reference: the rows of the methods it does not rerun are merged with its own
        earlier.check_scores(rerun=lambda r: base_guide(r["guide"]) in config.guides)
    for (name, seed), why in run.rerun_reasons(left).items():
        say(f"# {name} (seed {seed}) is run again: {why}", flush=True)
    for name, (seeds, versions) in run.drop_older_versions(config.guides).items():
        warnings.warn(f"{name}: its rows of {seed_list(seeds)} in {run.out / RESULTS} "
                      f"were made by {other_version_words({name: versions})} version of "
                      f"the method ({', '.join(map(str, versions))}, now {method_version(name)}): rerun, not averaged with the new rows", stacklevel=user_stacklevel())
    seeds = list(dict.fromkeys([*config.seeds, *(s for _, s in left)]))
    plan = {seed: [g for g in config.guides if (g, seed) in left] for seed in seeds}
    if not any(plan.values()) and run.base is not None and run.model_moved:
        # nothing to run, so no seed loads the base its digest is checked on: a --model path other than the rows' may
        # name another checkpoint (refused) or the same one moved (its rows shown)
        setup = prepare(config, config.seeds[0])
        run.check_base(base_digest(setup.net, setup.tokenizer))
    eta = _Estimate(sum(map(len, plan.values())))
    for seed in seeds:
        todo = plan[seed]
        if len(todo) < len(config.guides):
            done = ", ".join(g for g in config.guides if g not in todo)
            say(f"# seed {seed}: {done} already complete in {run.out / RESULTS}: skipped", flush=True)
        if not todo:
            continue
        setup = prepare(config, seed)
        if records_digest(setup.train, setup.val, setup.test, setup.shifted) != digest:  # reloaded for each seed
            now = set_digests(config, setup.train, setup.val, setup.test, setup.shifted)
            changed = ", ".join(name for name in sets if now[name] != sets[name])
            raise ValueError(f"the {changed} records under {config.data_dir} changed during the run (before seed "
                             f"{seed}): its rows would mix two sets of records; rerun once the data is settled")
        base = base_digest(setup.net, setup.tokenizer)  # the folder --model names may hold another checkpoint since the rows were scored
        for folder in [run] if earlier is run else [run, earlier]:
            folder.check_base(base)
            folder.check_scoring(setup.config, setup.scoring_since)
        run.config = setup.config  # the resolved defaults (learning rate, multiple-choice format) go into results.json
        if config.progress:
            c = setup.config
            fmt = f", multiple-choice format {c.mc_format}" if c.mc_format else ""
            fmt += f" (normalized by {c.mc_normalize})" if c.mc_format == "cloze" and c.mc_normalize else ""
            print(f"# seed {seed}: {c.model} on {c.dataset}: {len(setup.train)} train / {len(setup.val)} validation / "
                  f"{len(setup.test)} test{fmt}; guides {', '.join(todo)}", flush=True)
        run.sizes = setup.sizes
        step = "training"
        try:
            expected = earlier.maps.get(str(seed))
            map_seconds = train_map(setup, load=lambda s: run.load_map(s, expected))  # not loading the model and data
            if not setup.map_loaded:
                step = "saving"  # a full disk: the MAP trained, its file could not be written
                run.save_map(setup, map_seconds)
        except Exception as error:  # noqa: BLE001 -- recorded for every guide of this seed; the next seed goes on
            for name in todo:
                run.fail(name, seed, RuntimeError(f"{step} the MAP every guide starts from failed: {type(error).__name__}: {error}"))
            say(f"# seed {seed}: {step} the MAP failed ({error}); its guides are recorded as failed", flush=True)
            continue
        drift, confirmed = map_drift(earlier, setup)
        run.record_map(seed, setup.map_digest, confirmed)
        for name in todo:
            if config.progress:
                print(f"# {eta.next()} {name} (seed {seed}): {get_method(name).summary}", flush=True)
            failed_sets = []
            try:
                results = run_method(setup, name, map_seconds, failed_sets)
            except Exception as error:  # noqa: BLE001 -- recorded; the other guides go on
                run.fail(name, seed, error)
                say(f"# {name} (seed {seed}) failed: {type(error).__name__}: {error}", flush=True)
                continue
            finally:
                setup.restore()
            for row_name, result in results.items():
                if isinstance(result, Exception):  # its +ts step failed: the plain rows before it are kept
                    run.fail(row_name, seed, result)
                    say(f"# {row_name} (seed {seed}) failed: {type(result).__name__}: {result}", flush=True)
                    continue
                rows, arrays, first = result
                older = older_seeding_note(run, row_name, seed) if earlier is run else None  # an update reruns every seed
                for row in rows:
                    row["note"] = join_notes(row.get("note"), drift, older)
                run.add(row_name, seed, rows, arrays, first)
                if config.progress:
                    for row in rows:
                        print(format_row(row), flush=True)
            for dataset, error in failed_sets:  # after its rows: add() clears the seed's failures
                run.fail(name, seed, error, dataset=dataset)
                say(f"# {name} (seed {seed}) failed on {dataset}: {type(error).__name__}: {error}", flush=True)


class _Estimate:
    """``[k/n]`` of the (method, seed) runs and, once one finished, the time left at the mean pace so far (loading
    and MAP training included)."""

    def __init__(self, total):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def next(self) -> str:
        self.done += 1
        text = f"[{self.done}/{self.total}]"
        if self.done > 1:
            left = (time.perf_counter() - self.start) / (self.done - 1) * (self.total - self.done + 1)
            text += f" about {_duration(left)} left:"
        return text


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def run_method(setup, name: str, map_seconds: float, failed_sets: list | None = None) -> dict:
    """Fit method ``name`` on ``setup`` and score it on every evaluation set, and, where :func:`~.results.row_names` has
    them, its ``+ts`` rows: the temperature fitted on the validation split on the method's own averaged predictive
    (Guo et al., 2017), applied to its test predictions. Returns row name -> (its rows, npz arrays, the
    in-distribution ``(probs, labels)`` for its reliability diagram), or for a ``+ts`` row whose validation
    predictive or temperature failed the exception (the method's own rows are scored by then, and kept).

    :param failed_sets: where given, a shifted set whose scoring fails is appended to it as ``(set, exception)`` and
        left out of the rows, the others kept (an out-of-memory on one set lost every set's rows); else it raises.
    """
    config = setup.config
    method = get_method(name)
    fitted, fit_costs = fit_method(setup, name, map_seconds)
    datasets = [(config.dataset, setup.test), *setup.shifted.items()]
    predictions, costs = {}, {}
    for dataset, records in datasets:
        try:
            predictions[dataset], costs[dataset] = evaluate(setup, fitted, records, name, dataset)
        except Exception as error:  # noqa: BLE001 -- one shifted set's; the test set's fails the method
            if failed_sets is None or dataset == config.dataset:
                raise
            failed_sets.append((dataset, error))
    if _has_mean_predictor(method, fitted):
        costs[config.dataset]["mean_accuracy"] = mean_accuracy(setup, fitted.guide)
    out = {name: _score_rows(setup, name, method.setting, fitted.point_estimate, predictions, fit_costs, costs, MI_NO_SAMPLES_NOTE)}
    if len(row_names(config.ts, name)) > 1:
        try:
            out[ts_name(name)] = _ts_rows(setup, name, method, fitted, predictions, fit_costs, costs)
        except Exception as error:  # noqa: BLE001 -- recorded by the caller for the +ts row alone
            out[ts_name(name)] = error
    return out


def _ts_rows(setup, name, method, fitted, predictions, fit_costs, costs):
    """:func:`_score_rows` of method ``name``'s ``+ts`` row: its temperature fitted on the validation split's
    averaged predictive and applied to its ``predictions`` (:func:`~pyro_lora.calibration.scale_prediction`), both from
    their float64 ``log_probs`` (their ``probs`` for a predictive that gives none)."""
    config = setup.config
    t = time.perf_counter()
    val, _ = evaluate(setup, fitted, setup.val, name, "validation")
    # the exact float64 log-probabilities where the predictive gives them: its float32 probabilities flush a choice
    # 103 nats behind to 0 (cloze scores are sums of token log-probabilities), and no temperature moves a 0
    exact = val.log_probs is not None
    temperature, note = fit_temperature(val.log_probs if exact else val.probs, val.labels,
                                        kind="logits" if exact else "auto", return_info=True)
    scaled, sharpened = {}, []
    for d, p in predictions.items():
        with warnings.catch_warnings(record=True) as caught:  # ties a sharpening T makes go into the row's note
            warnings.simplefilter("always")
            scaled[d] = scale_prediction(p, temperature)
        sharpened += [f"{d}: {w.message}" for w in caught]
    ts_costs = {**fit_costs, "fit_seconds": fit_costs["fit_seconds"] + time.perf_counter() - t,
                "extra_parameters": fit_costs["extra_parameters"] + 1, "temperature": temperature,
                "note": join_notes(fit_costs.get("note"), note, None if method.validation else validation_note(setup),
                                   *sharpened)}
    # a predictive that keeps no per-sample probabilities (GLM probit) has no MI before the temperature either
    mi_note = TS_MI_NOTE if predictions[config.dataset].sample_probs is not None else MI_NO_SAMPLES_NOTE
    return _score_rows(setup, ts_name(name), VALIDATION_TUNED, fitted.point_estimate, scaled, ts_costs, costs, mi_note)


def _has_mean_predictor(method, fitted) -> bool:
    """Whether the method's rows average weight samples of a guide whose mean is itself a predictor."""
    guide = fitted.guide
    return (method.bayesian and guide is not None and not fitted.point_estimate
            and getattr(method.predictive, "uses_samples", True) and guide.mean_is_predictor
            and guide.samples_carry_posterior)


def mean_accuracy(setup, guide) -> float:
    """Test accuracy of ``guide``'s posterior mean (one forward per batch): beside the predictive's, it tells an
    accuracy lost to the weight noise (the mean keeps MAP's) from one lost by the fit itself (the mean loses it too)."""
    prediction = predict(guide.model, guide, setup.loader(setup.test), mean=True)
    return accuracy(prediction.probs, prediction.labels)


# the +ts row's MI: the temperature rescales the averaged predictive, which its weight samples no longer average to
TS_MI_NOTE = "MI n/a: the temperature applies to the averaged predictive, not to its weight samples"


def with_split_note(row, setup):
    """``row`` with the note on its evaluation set's records repeating others (:attr:`Setup.split_notes`), if any:
    kept in the rows (compare's, ``fit``'s, ``bayesianize``'s and ``evaluate``'s), not said in a warning alone."""
    note = setup.split_notes.get(row["dataset"])
    if note:
        row["note"] = join_notes(row.get("note"), note)
    return row


def _score_rows(setup, row_name, setting, point_estimate, predictions, fit_costs, costs, no_samples_note):
    """The rows, npz arrays and first-set ``(probs, labels)`` of one row name over the run's evaluation sets
    (``no_samples_note``: why its MI is n/a where its predictions keep no weight samples)."""
    config, seed = setup.config, setup.seed
    rows, arrays = [], {}
    for dataset, prediction in predictions.items():
        row = join_row({"guide": row_name, "setting": setting, "dataset": dataset, "seed": seed},
                       score(prediction, point_estimate=point_estimate, no_samples_note=no_samples_note), fit_costs,
                       costs[dataset])
        if dataset != config.dataset:
            row.update(ood_auroc(predictions[config.dataset], prediction, point_estimate))
        rows.append(with_split_note(row, setup))
        arrays.update(prediction_arrays(prediction, dataset, seed, point_estimate))
        if isinstance(row.get("extra_parameters"), int):  # beside the arrays its scores are checked against, checked alike
            arrays[f"{dataset}__seed{seed}__extra_parameters"] = np.asarray(row["extra_parameters"], dtype=np.int64)
    first = predictions[config.dataset]
    return rows, arrays, (first.probs, first.labels)
