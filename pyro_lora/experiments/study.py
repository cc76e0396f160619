"""``pyro-lora study``: every method on the reference task (MiniLM, SST-2); SmolLM2-135M on ARC-Easy and OBQA -> ARC.

This is the report a user reads first. It runs the comparison protocol of ``pyro-lora compare`` (MAP LoRA trained
once per seed, each method fitted from it, all scored on the same test set) on

* SST-2 with MiniLM at the reference task's size (``compare --full``: 2000 training sentences, 10% of them for
  validation, all 872 test sentences, 10 epochs, S = 8), every method;
* ARC-Easy with SmolLM2-135M (cloze): 1000 training and 250 validation questions, 500 test questions; the
  methods whose cost fits a 2-core CPU (zero-shot, MAP, temperature scaling, TFB, each with its ``+ts`` row);
* distribution shift: SmolLM2 trained on OpenBookQA (1000 + 250 questions), evaluated on its 500 test questions
  and on 500 of ARC-Challenge and of ARC-Easy (the OpenBookQA run serves both its in-distribution table and
  the shift table, with OOD AUROC),

with 3 seeds, then writes ``docs/study.md`` (tables, plots and a summary computed from the numbers: where each
Bayesian method does *not* beat MAP) and PNGs in ``docs/study/`` (:mod:`pyro_lora.experiments.study_report`).
Each task has its settings (:data:`PLANS`); a flag given on the command line sets that setting for every dataset.

Each dataset's ``run_compare`` output goes to ``runs/study/<dataset>/``. A dataset whose ``results.json`` exists
holding every method and seed of the same configuration is skipped, one that stopped part-way resumes, one of
another configuration is refused (``--force`` replaces it); ``--report-only`` rebuilds the report from those files
without training::

    OMP_NUM_THREADS=1 pyro-lora study              # the committed report
    pyro-lora study --datasets sst2 --device cuda  # the reference task alone, on a GPU
    pyro-lora study --report-only                  # rebuild docs/study.md from runs/study/*/results.json
    pyro-lora study --datasets arc_easy --no-shift --guides zeroshot,map,temperature --seeds 0
    pyro-lora study --update meanfield,flow        # after a change to those methods: rerun just their rows

An ``--update`` cut short (killed, or stopped by an error) resumes with the same command; ``--force`` reruns it from
the start.
"""

import contextlib
import shlex
import shutil
import signal
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

from .. import data as D
from ..guides.registry import METHODS
from ..io import check_file_slot, copy_file, saved_folder, standard_json, writable_folder, write_json
from ..locking import FolderLocked, folder_lock, locked_elsewhere
from . import compare
from .results import (MERGE_IGNORES, NEXT_SIDECAR, RESULTS, SIDECAR, STUDY_FLAGS, GuideFailures, RunFolder,
                      config_differences, finish_merge, map_name, merge_results, now, read_record, read_sidecar,
                      redraw_figures)
from .setup import FULL, CompareConfig, check_config, data_digest, default_guides
from .study_header import duration, machine_info
from .study_report import DATASETS, build_report
from .verdict import REFERENCE

# Each task's run settings. Classification: the reference task, every method. Multiple choice: SmolLM2-135M with
# 1000 training questions and 500 test questions per set, and only the methods whose cost fits hours, not days, of
# 2 CPU cores (docs/the-study.md says what each left-out method costs)
PLANS = {
    "classification": replace(CompareConfig(), model="minilm", **{**FULL, "test_size": 872}, val_fraction=0.1, lr=2e-3,
                              seeds=(0, 1, 2), mc_format=None),
    "multiple_choice": CompareConfig(
        model="smollm2",
        train_size=1250, val_fraction=0.2,  # 1000 training and 250 validation questions
        test_size=500,  # per evaluation set: accuracy in steps of 0.2 points
        epochs=2,
        lr=1e-3,  # compare's causal-LM default 3e-4 barely moved the LoRA in the 12 steps of an earlier, smaller study
        batch_size=4, samples=4, max_length=192, seeds=(0, 1, 2), mc_format="cloze",
        guides=("zeroshot", "map", "temperature", "tfb", "laplace"),
    ),
}
RUNS = "runs/study"  # each dataset's run goes to RUNS/<dataset> (the --runs flag)
DOCS = "docs"  # the report goes to DOCS/study.md, its figures to DOCS/study/
# Answers of very different lengths make the unnormalised cloze sum favour short ones: zero-shot SmolLM2,
# 100 test questions, summed vs per character: OpenBookQA 0.190 / ECE 63.1 vs 0.280 / 8.6, ARC-Challenge
# 0.230 / 58.5 vs 0.260 / 6.2; on ARC-Easy per-character scores lose accuracy (0.550 -> 0.400). So OBQA (with
# its shifted ARC sets) and ARC-C are scored per character, the other sets by the sum
NORMALIZE = {"openbookqa": "chars", "arc_challenge": "chars"}
SHIFT_SOURCE = "openbookqa"
SHIFT_TARGETS = ("arc_challenge", "arc_easy")
# what a run of the same configuration but for these settings resumes (run_compare skips the finished guides)
_RESUMABLE = {"guides", "seeds"}


def command_line(argv=None):
    """The invocation as a shell command, ``pyro-lora study ...`` (``argv``: the command line after ``pyro-lora``,
    default ``sys.argv[1:]``)."""
    return shlex.join(["pyro-lora", *(sys.argv[1:] if argv is None else argv)])


def study_datasets(datasets=None):
    """The datasets to run, in order (default :data:`DATASETS`).

    :raises ValueError: for a name that is no dataset folder name (``sst2/``, ``../x``): it would name another run.
    """
    datasets = list(datasets or DATASETS)
    for d in datasets:
        if Path(d).name != d or d in (".", ".."):
            raise ValueError(f"--datasets {d}: a dataset is a folder name under the data folder (e.g. sst2, arc_easy)")
    return datasets


def make_config(overrides, dataset, shift=True, runs=RUNS):
    """The :class:`CompareConfig` of one dataset's run: its task's plan (:data:`PLANS`) with ``overrides`` (the
    settings given as flags, ``{field: value}``) on ``dataset``, written to ``runs/<dataset>``; the OpenBookQA run
    also scored on the shifted ARC sets (with ``shift``), cloze answers normalised as :data:`NORMALIZE` says.

    :raises ValueError: for a dataset that is missing, or of a task the study has no plan for.
    """
    task = D.load_meta(dataset, overrides.get("data_dir"))["task"]
    if task not in PLANS:
        raise ValueError(f"--datasets {dataset}: the study runs {' and '.join(PLANS)} sets, and {dataset} is a {task} set")
    config = replace(PLANS[task], **overrides)
    normalize = NORMALIZE.get(dataset) if config.mc_format == "cloze" else None
    return replace(config, dataset=dataset, eval_datasets=SHIFT_TARGETS if shift and dataset == SHIFT_SOURCE else (),
                   mc_normalize=normalize, out=str(Path(runs) / dataset))


def study_configs(overrides, datasets=None, shift=True, runs=RUNS, update=None, force=False):
    """The checked configuration of every dataset run, in order: a flag that cannot run is refused before the first
    hour of training.

    With ``update``, each config reruns, under its run's own seeds, the guides of its run that ``update`` leaves
    stale (:func:`stale_guides`); a dataset whose run has none of them is left out, said so.

    :param overrides: the settings given as flags (:func:`make_config`).
    :param update: the guides ``--update`` reruns (every dataset's run must exist, with the flags' configuration).
    :param force: replace the runs of another configuration (without it, each is refused here, by name).
    :raises ValueError: naming what is wrong (:func:`~pyro_lora.experiments.setup.check_config`), or every run
        of another configuration without ``force``.
    """
    configs, held = [], set()
    for dataset in study_datasets(datasets):
        config = make_config(overrides, dataset, shift, runs)
        if locked_elsewhere(config.out):
            if update:  # what to rerun is read from the run: not now
                raise FolderLocked(f"another process is writing the {dataset} run ({config.out}): wait for it, or leave "
                                   f"{dataset} out of --datasets")
            held.add(dataset)  # its run is not to be read now: run_dataset reads it under the lock
        else:  # a record that cannot be read is found now, not after the datasets before it
            read_sidecar(Path(config.out) / SIDECAR)
            if update:
                config = _update_config(config, update, overrides)
                if config is None:
                    continue
        try:
            check_config(config, writes=False)
        except ValueError as error:
            raise ValueError(f"the study's {dataset} run: {error}") from None
        task = D.load_meta(dataset, config.data_dir)["task"]
        absent = [f"{n} ({', '.join(m.missing)})" for n, m in METHODS.items() if not config.guides and task in m.tasks and m.missing]
        if absent:  # a fresh machine without an optional package would otherwise run fewer methods without a word
            print(f"## {dataset}: left out, their packages are not installed (pip install them to run them): "
                  f"{', '.join(absent)}", flush=True)
        configs.append(config)
    other = [f"{c.dataset} ({changed})" for c in configs
             if not update and c.dataset not in held and (changed := _other_configuration(c, _saved(c)))]
    if other and not force:
        raise ValueError(f"{', '.join(other)}: {'these runs hold' if len(other) > 1 else 'its run holds'} another configuration; "
                         "give the runs' settings to resume them, or --force to replace them (their results are deleted "
                         "once the new run has a result)")
    if update and not configs:
        raise ValueError(f"--update {','.join(update)}: no run of {', '.join(study_datasets(datasets))} has those methods "
                         "(to add a method to a run, give it in --guides without --update)")
    return configs


def _update_config(config, update, overrides):
    """``config`` rerunning what ``update`` leaves stale in its saved run, under that run's seeds; None if nothing."""
    saved = _saved(config)
    if saved is None:
        raise ValueError(f"--update needs an existing run: {Path(config.out) / RESULTS} is missing (run the study, or leave "
                         "that dataset out of --datasets)")
    seeds = tuple(saved["config"]["seeds"])
    if "seeds" in overrides and sorted(overrides["seeds"]) != sorted(seeds):
        raise ValueError(f"--update reruns every seed of the {config.dataset} run ({','.join(map(str, seeds))}): leave "
                         "--seeds out (a rerun of some seeds would leave the others' rows from the old code)")
    config = replace(config, seeds=seeds)
    retrain = REFERENCE in update  # every row is rerun: on the records there now
    # the settings first: other sizes (flags left to the plan's defaults) select other records, which the data
    # digest would blame on the files
    ignore = MERGE_IGNORES + ("data_dir",) * retrain
    if config_differences(saved, config, ignore=ignore):  # the merge would refuse it after the training: refuse it now
        # every setting named, the paths the run's digests stand for too (--model, --data-dir: a copy elsewhere passes
        # alone), so that the flags given back are the run's; a default the run left (None) given as it resolved it
        differ = config_differences({k: v for k, v in saved.items() if k not in ("base", "data")}, config, ignore=ignore)
        changed = ", ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in differ.items())
        flags = " ".join(filter(None, (_flag(k, saved["config"].get(k) if a is None else a) for k, (a, _) in differ.items())))
        raise ValueError(f"--update reruns {config.dataset} with its run's configuration, and its settings here (the flags "
                         f"given, else the study plan's defaults) differ from it ({changed}): give the run's settings"
                         f"{f' ({flags})' if flags else ''}, or rerun the whole dataset without --update")
    if not retrain and saved.get("data") and saved["data"] != (now := data_digest(config)):
        raise ValueError(f"the {config.dataset} records under {D.resolve_data_dir(config.data_dir)} changed since its run "
                         f"(data records {saved['data'][:12]} there, records {now[:12]} now): --update {','.join(update)} would mix "
                         f"rows of both; restore them, or --update {REFERENCE} to rerun every method on the records now")
    guides = stale_guides(list(update), list(saved["config"]["guides"] or ()))
    if not guides:
        print(f"## {config.dataset}: its run has none of {', '.join(update)}: left as it is", flush=True)
        return None
    return replace(config, guides=tuple(guides))


def _flag(key, value):
    """The study flag that gives the setting ``key`` its ``value`` (``--train-size 20``, ``--no-ts``); "" for a
    setting the study sets itself per dataset (its shifted sets follow ``--shift``)."""
    if key == "eval_datasets":
        return "--shift" if value else "--no-shift"
    if key in ("dataset", "mc_normalize") or value is None:
        return ""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}" if key == "ts" else f"no {flag}"
    return f"{flag} {','.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"


def expected_guides(config):
    """The guides ``run_compare`` will run: the requested ones, or every method applicable to the task."""
    return list(config.guides) if config.guides else default_guides(config)


def saved_differences(saved, config):
    """``{setting: (saved, wanted)}`` where the saved run record ``saved`` (``results.json``) differs from the run
    ``config`` asks for (its guides as ``run_compare`` expands them, ``data``: the records it scored on); output folder
    and progress bars aside."""
    return config_differences(saved, replace(config, guides=tuple(expected_guides(config))), ignore=("out", "progress"),
                              data=data_digest(config) if saved.get("data") else None)


def unfinished(config):
    """The (guide, seed) of ``config`` whose rows (every evaluation set, ``+ts`` rows too) its run folder lacks."""
    return RunFolder(config.out, config, flags=STUDY_FLAGS).unfinished(expected_guides(config), config.seeds)


def _saved(config):
    """The record of ``config``'s run folder (None: no run there; :func:`~pyro_lora.experiments.results.read_record`)."""
    return read_record(config.out, f"move it away to run {config.dataset}")


def _other_configuration(config, saved):
    """``"lr 0.001 there, 0.0005 now, ..."`` where the record ``saved`` of ``config``'s run folder holds a run of
    another configuration (more guides or seeds resume it), else ``""`` (also for no record)."""
    differences = {} if saved is None else {k: v for k, v in saved_differences(saved, config).items() if k not in _RESUMABLE}
    return ", ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in differences.items())


def run_dataset(config, command, force=False):
    """Run ``run_compare(config)`` unless its run folder holds every (guide, seed) of it; returns the wall seconds
    (None: skipped). A run that stopped part-way (killed, or some guide failed) resumes: ``run_compare`` skips the
    (guide, seed) it finished. A run of another configuration is refused, naming the differences, unless ``force``.
    One process at a time writes a run (:func:`~pyro_lora.locking.folder_lock`).

    Writes :data:`~pyro_lora.experiments.results.SIDECAR` (commands, machine, dates, wall seconds summed over
    the invocations that ran it) next to ``results.json``, also when the run fails.

    :raises ValueError: for a run of another configuration without ``force``, or one another process is writing.
    """
    out = Path(config.out)
    with folder_lock(out, f"the {config.dataset} run"):  # first: what is read below may change until then
        saved = _saved(config)
        changed = _other_configuration(config, saved)
        if changed and not force:
            raise ValueError(f"{out / RESULTS} holds a run of another configuration ({changed}): give its settings to "
                             "resume it, or --force to replace it (its results are deleted once the new run has a result)")
        resumed = saved is not None and not changed
        if resumed:
            todo = unfinished(config)
            if not todo:
                print(f"## {config.dataset}: {out / RESULTS} holds every method and seed of this configuration, skipped", flush=True)
                redraw_figures(out, saved)  # a kill after its last row left its figures behind it
                return None
            print(f"## {config.dataset}: resuming {len(todo)} unfinished (method, seed)", flush=True)
        shift = f", shift to {', '.join(config.eval_datasets)}" if config.eval_datasets else ""
        print(f"## {config.dataset}: {config.model}, train {config.train_size}, test {config.test_size}, epochs {config.epochs}, "
              f"seeds {','.join(map(str, config.seeds))}{shift}", flush=True)
        with _sidecar(out, command, config, keep=resumed) as record:
            compare.run_compare(config, overwrite=bool(changed), flags=STUDY_FLAGS)
    print(f"## {config.dataset}: done in {duration(record['seconds'])}", flush=True)
    return record["seconds"]


@contextlib.contextmanager
def _sidecar(out, command, config, keep):
    """Time the block and record it in ``out``'s sidecar, also when it raises; ``keep``: add to the record there (a
    resumed run: its commands, first start, summed wall time and updates kept), else start a new one, once the
    folder holds this configuration's run (a replacement that failed before its first result left the old run).

    The record is written at the start too, marked ``running`` (with the configuration): an invocation a kill cut
    short is listed on the next one under ``interrupted`` (its start known, its wall time not), also a replacement's
    (its record waits in :data:`~pyro_lora.experiments.results.NEXT_SIDECAR` until its first result replaces the
    run), and a fresh run's tries of its own configuration only."""
    path, pending = Path(out) / SIDECAR, Path(out) / NEXT_SIDECAR
    fresh = not keep and _saved(config) is None  # no run here yet: only the tries cut short before a result to keep
    if keep:
        old = _read_sidecar(path)
    else:  # a fresh run or a replacement keeps its own configuration's tries that a kill cut short before any result
        # (fresh: a replacement killed while the replaced run's files went leaves its record in ``pending`` too)
        tries = [i for source in ((path, pending) if fresh else (pending,))
                 for i in _read_sidecar(source).get("interrupted", []) if _same_configuration(i, config)]
        old = {"interrupted": tries} if tries else {}
    pending.unlink(missing_ok=True)  # a replacement's killed before its first result: kept above if it was this one
    started, start, record = now(), time.perf_counter(), {}
    commands = old.get("commands") or ([old["command"]] if old.get("command") else [])
    ours = {**old, "command": command, "commands": list(dict.fromkeys([*commands, command])),
            "machine": machine_info(config.device), "started": old.get("started", started)}
    # a replacement's record waits beside the old run's until its first result replaces that run (RunFolder)
    mark = {"command": command, "started": started, "config": standard_json(asdict(config))}
    write_json(path if keep or fresh else pending, {**ours, "running": mark})
    try:
        yield record
    finally:
        record["seconds"] = time.perf_counter() - start
        saved = _saved(config)  # none yet: no result to time; the next invocation lists this one as interrupted
        if keep or (saved is not None and not _other_configuration(config, saved)):
            write_json(path, {**ours, "finished": now(), "wall_seconds": (old.get("wall_seconds") or 0.0) + record["seconds"]})


def _same_configuration(invocation, config):
    """Whether a sidecar's ``invocation`` (one cut short) ran ``config``'s configuration (more guides or seeds aside)."""
    return isinstance(invocation.get("config"), dict) and not {
        k for k in config_differences(invocation["config"], config, ignore=("guides", "seeds", "out", "progress"))}


def _read_sidecar(path):
    """The sidecar at ``path`` (``{}`` if none; :func:`~pyro_lora.experiments.results.read_sidecar`), the invocation
    it marks ``running`` moved to ``interrupted``: the caller holds the folder's lock, so that invocation is gone."""
    return _cut_short(read_sidecar(path))


def _cut_short(old):
    """``old`` (a sidecar) with the invocation it marks ``running`` moved to ``interrupted``."""
    if "running" in old:
        old["interrupted"] = [*old.get("interrupted", []), old.pop("running")]
    return old


def stale_guides(update, guides):
    """The guides of a run (``guides``, its order kept) whose rows an update of the methods ``update`` leaves stale:
    those and the variants that start from their fit (:attr:`~pyro_lora.guides.registry.Method.lineage`); every
    guide where the MAP, which every method starts from, is updated. An updated method the run lacks is not added."""
    if REFERENCE in update:
        return list(guides)
    return [g for g in guides if g in update or (g in METHODS and any(m.name in update for m in METHODS[g].lineage))]


def update_dataset(config, command, force=False):
    """Rerun ``config.guides`` (:func:`study_configs` with ``update``) into ``OUT/update``, emptied first, and merge
    their rows into the run in ``config.out`` (:func:`~pyro_lora.experiments.results.merge_results`); returns the
    wall seconds. The rerun starts from each seed's saved MAP, the one the run's other rows started from; an update of
    the MAP itself trains them again, and the run keeps the new ones.

    An update of the same guides that the previous invocation began and a kill or an error cut short is resumed: the
    (guide, seed) it finished in ``OUT/update`` are kept (said so), unless ``force``. A (guide, seed) that fails in
    the rerun is merged as failed (its old row is not kept beside the new code's rows), the others' rows are merged,
    then the failure is raised.

    :raises ValueError: if there is no run to update, or it has another configuration.
    :raises GuideFailures: after the merge, if some rerun (guide, seed) failed.
    """
    out = Path(config.out)
    if not (out / RESULTS).is_file():
        raise ValueError(f"--update needs an existing run: {out / RESULTS} is missing")
    rerun = replace(config, out=str(out / "update"))
    started = now()
    start = time.perf_counter()
    failure = None
    here = Path(rerun.out)
    if here.is_symlink() or (here.exists() and not here.is_dir()):
        raise ValueError(f"{here} is {'a link' if here.is_symlink() else 'a file'}, where --update reruns the methods: move it")
    with folder_lock(out, f"the {config.dataset} run"):
        print(f"## {config.dataset}: rerunning {', '.join(config.guides)} (seeds {','.join(map(str, config.seeds))})", flush=True)
        finish_merge(out)  # a merge a kill cut short (it lists that update), before its rerun folder goes
        sidecar = read_sidecar(out / SIDECAR)
        cut = sidecar.get("running")  # the invocation before, if a kill or an error cut it short
        sidecar = _cut_short(sidecar)  # marked running: a kill leaves a trace
        resume = not force and _resumable(cut, rerun, out)
        if resume:
            print(f"## {config.dataset}: resuming the update `{cut['command']}` begun {cut.get('started')} and cut short: "
                  f"the (method, seed) it finished in {here} are kept (--force reruns them)", flush=True)
        elif here.exists():  # before the mark: an earlier update's rows must never be resumed or merged as this one's
            shutil.rmtree(here)
        machine = machine_info(config.device)  # the rerun rows' costs are measured here, maybe not where the run's were
        write_json(out / SIDECAR, {**sidecar, "running": {"command": command, "started": started, "update": list(config.guides),
                                                          "machine": machine}})
        retrain = REFERENCE in config.guides
        if not retrain:  # the rerun starts from the MAP the run's other rows started from
            here.mkdir(parents=True, exist_ok=True)
            for seed in config.seeds:
                if (out / map_name(seed)).is_file():
                    copy_file(out / map_name(seed), here / map_name(seed))
        try:  # a retrained MAP's rows replace every row: nothing to match
            compare.run_compare(rerun, overwrite=not resume, reference=None if retrain else out, flags=STUDY_FLAGS)
        except GuideFailures as error:  # the finished rows are merged; the failed ones replace their stale rows
            failure = error
        seconds = time.perf_counter() - start
        sidecar.setdefault("updates", []).append({"guides": list(config.guides), "command": command, "started": started,
                                                  "finished": now(), "wall_seconds": seconds, "machine": machine})
        merge_results(out, here, record=lambda: write_json(out / SIDECAR, sidecar))
        if failure is None:  # merged whole: its copies of the MAPs and predictions are the run's now
            shutil.rmtree(here)
    if failure is not None:
        raise failure
    print(f"## {config.dataset}: {', '.join(config.guides)} updated in {duration(seconds)}", flush=True)
    return seconds


def _resumable(cut, rerun, out):
    """Whether the update ``rerun`` may resume the rows in its folder: the invocation ``cut`` (the sidecar's mark of
    the one before, which a kill or an error cut short; None if it finished) was an update of the same guides, and
    the folder holds its rows of this configuration, started from the MAPs of the run in ``out`` (an update of the
    MAP started from the ones it retrained, kept there)."""
    if not cut or cut.get("update") != list(rerun.guides):
        return False
    here, there = _saved(rerun), read_record(out, "move it away to update the run")
    return (here is not None and not _other_configuration(rerun, here)
            and (REFERENCE in rerun.guides
                 or all(there.get("maps", {}).get(seed) == digest for seed, digest in here.get("maps", {}).items())))


def run_study(configs, command, update=False, force=False, debug=False):
    """Run (or with ``update``, rerun the guides of) every dataset's config in turn; returns ``(seconds per dataset
    run, failed datasets)``.

    A dataset that fails is reported and the study goes on (its rerun resumes from the others): a refusal
    (``ValueError``, e.g. a run on another base model) or another process holding its run in one line, any other
    error with its traceback; ``debug``: every error with its traceback.
    """
    seconds, failed = {}, []
    for i, config in enumerate(configs, 1):
        print(f"# [{i}/{len(configs)}] {config.dataset}", flush=True)
        try:
            took = update_dataset(config, command, force) if update else run_dataset(config, command, force=force)
        except (FolderLocked, ValueError) as error:  # a refusal: the sentence says it all
            if debug:
                traceback.print_exc()
            print(f"## {config.dataset}: FAILED: {error}", file=sys.stderr, flush=True)
            failed.append(config.dataset)
            continue
        except Exception:  # noqa: BLE001 -- one dataset's failure must not lose the rest of a long study
            traceback.print_exc()
            print(f"## {config.dataset}: FAILED, going on", flush=True)
            failed.append(config.dataset)
            continue
        if took is not None:
            seconds[config.dataset] = took
    return seconds, failed


def main(args, overrides, command):
    """``pyro-lora study``: run the study the parsed flags ``args`` ask for, then write the report of every run in
    ``args.runs``; returns the exit status (1 if some dataset failed: the report says which).

    :param args: the ``study`` subcommand's flags (``datasets``, ``shift``, ``runs``, ``docs``, ``force``,
        ``report_only``, ``update``).
    :param overrides: the :class:`CompareConfig` settings given as flags, ``{field: value}``; the others come from
        each dataset's plan (:data:`PLANS`).
    :param command: the command line the sidecars and the report name (:func:`command_line`).
    """
    ignored = [flag for flag, given in _ignored_flags(args, overrides).items() if given]
    if ignored:
        raise ValueError(f"{' and '.join(ignored)}")
    runs = Path(args.runs)
    if runs.exists() and not runs.is_dir():
        raise ValueError(f"--runs {runs} is a file: give the folder that holds (or will hold) each dataset's run")
    for flag, folder in (("--runs", runs), ("--docs", Path(args.docs))):
        taken = saved_folder(folder)
        if taken:  # before the report's folder is made there
            raise ValueError(f"{flag} {folder} is {taken}: the study would write among those files, which a later save "
                             f"there refuses or deletes; choose another {flag}")
    writable_folder(Path(args.docs) / "study", "--docs")  # found after hours of training, it lost the report
    check_file_slot(Path(args.docs) / "study.md", "the study writes its report: move it, or choose another --docs")
    failed = []
    if args.report_only:
        datasets = study_datasets(args.datasets) if args.datasets else None
    else:
        configs = study_configs(overrides, args.datasets, args.shift, args.runs, args.update, force=args.force)
        signal.signal(signal.SIGTERM, _terminated)  # `kill`, `timeout`: unwind, so the run's record keeps its time
        start = time.perf_counter()
        seconds, failed = run_study(configs, command, update=bool(args.update), force=args.force, debug=args.debug)
        datasets = None  # the report covers every run, not only this invocation's
        print(f"# study: {len(seconds)} dataset run(s) in {duration(time.perf_counter() - start)}"
              + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    path = build_report(args.runs, args.docs, datasets, command, failed)
    print(f"report: {path}", flush=True)
    return 1 if failed else 0


def _ignored_flags(args, overrides):
    """``{sentence: whether it applies}`` for the flags this invocation would ignore without a word."""
    d = CompareConfig()
    defaulted = ("ts", "device", "dtype", "load_in_4bit", "data_dir")  # always in ``overrides``: given where not the default
    planned = [f"--{k.replace('_', '-')}" for k in PLANS["classification"].__dataclass_fields__ if k in overrides and k not in
               ("progress", *defaulted)]
    planned += ["--no-shift"] * (not args.shift) + [
        "--no-ts" if k == "ts" else f"--{k.replace('_', '-')}" for k in defaulted if overrides.get(k, getattr(d, k)) != getattr(d, k)]
    return {
        f"--report-only trains nothing: {', '.join(planned)} would be ignored": args.report_only and planned,
        "--report-only trains nothing: --update and --force would be ignored": args.report_only and (args.update or args.force),
        "--update reruns the methods it names with each run's own configuration: --guides would be ignored":
            bool(args.update) and "guides" in overrides,
    }


def _terminated(signum, frame):
    raise SystemExit(128 + signum)
