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
with the same configuration is skipped, so an interrupted study resumes (``--force`` reruns it); ``--report-only``
rebuilds the report from those files without training::

    OMP_NUM_THREADS=1 pyro-lora study              # the committed report
    pyro-lora study --datasets sst2 --device cuda  # the reference task alone, on a GPU
    pyro-lora study --report-only                  # rebuild docs/study.md from runs/study/*/results.json
    pyro-lora study --datasets arc_easy --no-shift --guides zeroshot,map,temperature --seeds 0
    pyro-lora study --update meanfield,flow        # after a change to those methods: rerun just their rows
"""

import datetime
import json
import shlex
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

from .. import data as D
from ..guides.registry import METHODS
from ..io import write_json
from . import compare
from .results import MERGE_IGNORES, RESULTS, GuideFailures, config_differences, merge_results
from .setup import FULL, CompareConfig, check_config, default_guides
from .study_header import duration, machine_info
from .study_report import DATASETS, SIDECAR, build_report
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
        guides=("zeroshot", "map", "temperature", "tfb"),
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


def study_datasets(datasets=None, shift=True):
    """The datasets to run, in order (default :data:`DATASETS`); the shift needs the OpenBookQA run, so ``shift``
    adds it."""
    datasets = list(datasets or DATASETS)
    if shift and SHIFT_SOURCE not in datasets:
        datasets.append(SHIFT_SOURCE)
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


def study_configs(overrides, datasets=None, shift=True, runs=RUNS, update=None):
    """The checked configuration of every dataset run, in order: a flag that cannot run is refused before the first
    hour of training.

    :param overrides: the settings given as flags (:func:`make_config`).
    :param update: the guides ``--update`` reruns (they must apply, and every dataset's run must exist).
    :raises ValueError: naming what is wrong (:func:`~pyro_lora.experiments.setup.check_config`).
    """
    configs = [make_config(overrides, d, shift, runs) for d in study_datasets(datasets, shift)]
    for config in configs:
        check_config(config, guides=update, writes=False)
        if update and not (Path(config.out) / RESULTS).is_file():
            raise ValueError(f"--update needs an existing run: {Path(config.out) / RESULTS} is missing (run the study, "
                             "or leave that dataset out of --datasets)")
        if update:  # the merge would refuse it after the training: refuse it now
            saved = json.loads((Path(config.out) / RESULTS).read_text())
            differ = config_differences(saved, config, ignore=MERGE_IGNORES)
            if differ:
                changed = ", ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in differ.items())
                raise ValueError(f"--update reruns {config.dataset} with its run's configuration, and these flags differ from "
                                 f"it ({changed}): give the run's settings, or rerun the whole dataset without --update")
    return configs


def expected_guides(config):
    """The guides ``run_compare`` will run: the requested ones, or every method applicable to the task."""
    return list(config.guides) if config.guides else default_guides(config)


def saved_differences(saved, config):
    """``{setting: (saved, wanted)}`` where the saved run record ``saved`` (``results.json``) differs from the run
    ``config`` asks for (its guides as ``run_compare`` expands them); output folder and progress bars aside."""
    return config_differences(saved, replace(config, guides=tuple(expected_guides(config))), ignore=("out", "progress"))


def run_dataset(config, command, force=False):
    """Run ``run_compare(config)`` unless a matching, complete ``results.json`` exists; returns the wall seconds
    (None: skipped). A run that stopped part-way (killed, or some guide failed) resumes: ``run_compare`` skips the
    (guide, seed) it finished; a run of another configuration is replaced.

    Writes :data:`~pyro_lora.experiments.study_report.SIDECAR` (command, machine, dates, wall seconds) next to
    ``results.json``.
    """
    out = Path(config.out)
    results = out / RESULTS
    overwrite = force
    if results.is_file() and not force:
        saved = json.loads(results.read_text())
        differences = saved_differences(saved, config)
        if not differences and not saved.get("failed"):
            print(f"## {config.dataset}: {results} matches this configuration, skipped (--force reruns it)", flush=True)
            return None
        changed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in differences.items())
        overwrite = not set(differences) <= _RESUMABLE
        print(f"## {config.dataset}: " + (f"configuration changed ({changed}), rerunning" if overwrite else "resuming the unfinished guides"), flush=True)
    shift = f", shift to {', '.join(config.eval_datasets)}" if config.eval_datasets else ""
    print(f"## {config.dataset}: {config.model}, train {config.train_size}, test {config.test_size}, epochs {config.epochs}, "
          f"seeds {','.join(map(str, config.seeds))}{shift}", flush=True)
    started = _now()
    start = time.perf_counter()
    compare.run_compare(config, overwrite=overwrite)
    seconds = time.perf_counter() - start
    write_json(out / SIDECAR, {"command": command, "machine": machine_info(config.device), "started": started,
                               "finished": _now(), "wall_seconds": seconds})
    print(f"## {config.dataset}: done in {duration(seconds)}", flush=True)
    return seconds


def stale_guides(update, guides):
    """The guides of a run (``guides``, its order kept) whose rows an update of the methods ``update`` leaves stale:
    those and the variants that start from their fit (:attr:`~pyro_lora.guides.registry.Method.lineage`); every
    guide where the MAP, which every method starts from, is updated. Updated guides the run lacks come last."""
    if REFERENCE in update:
        stale = list(guides)
    else:
        stale = [g for g in guides if g in update or (g in METHODS and any(m.name in update for m in METHODS[g].lineage))]
    return stale + [g for g in update if g not in stale]


def update_dataset(config, update, command):
    """Rerun the guides ``update`` with the configuration ``config`` into ``OUT/update`` and merge their rows into the
    run in ``config.out`` (:func:`~pyro_lora.experiments.results.merge_results`); returns the wall seconds.

    The rerun also covers the run's guides that start from an updated one (:func:`stale_guides`). A (guide, seed)
    that fails in the rerun is merged as failed (its old row is not kept beside the new code's rows), the others'
    rows are merged, then the failure is raised.

    :raises ValueError: if there is no run to update, or it has another configuration.
    :raises GuideFailures: after the merge, if some rerun (guide, seed) failed.
    """
    out = Path(config.out)
    if not (out / RESULTS).is_file():
        raise ValueError(f"--update needs an existing run: {out / RESULTS} is missing")
    saved = json.loads((out / RESULTS).read_text())["config"]["guides"] or ()
    guides = stale_guides(list(update), list(saved))
    rerun = replace(config, guides=tuple(guides), out=str(out / "update"))
    added = [g for g in guides if g not in update]
    why = f" ({', '.join(added)}: they start from an updated fit)" if added else ""
    print(f"## {config.dataset}: rerunning {', '.join(guides)}{why} (seeds {','.join(map(str, config.seeds))})", flush=True)
    started = _now()
    start = time.perf_counter()
    failure = None
    try:
        compare.run_compare(rerun, overwrite=True)  # a previous update's rows are not this one's
    except GuideFailures as error:  # the finished rows are merged; the failed ones replace their stale rows
        failure = error
    merge_results(out, rerun.out)
    seconds = time.perf_counter() - start
    sidecar = json.loads((out / SIDECAR).read_text()) if (out / SIDECAR).is_file() else {}
    sidecar.setdefault("updates", []).append({"guides": guides, "command": command, "started": started,
                                              "finished": _now(), "wall_seconds": seconds})
    write_json(out / SIDECAR, sidecar)
    if failure is not None:
        raise failure
    print(f"## {config.dataset}: {', '.join(guides)} updated in {duration(seconds)}", flush=True)
    return seconds


def run_study(configs, command, update=None, force=False):
    """Run (or with ``update``, rerun those guides of) every dataset's config in turn; returns
    ``(seconds per dataset run, failed datasets)``.

    A dataset that fails is reported with its traceback and the study goes on (its rerun resumes from the others).
    """
    seconds, failed = {}, []
    for i, config in enumerate(configs, 1):
        print(f"# [{i}/{len(configs)}] {config.dataset}", flush=True)
        try:
            took = update_dataset(config, update, command) if update else run_dataset(config, command, force=force)
        except Exception:  # noqa: BLE001 -- one dataset's failure must not lose the rest of a long study
            traceback.print_exc()
            print(f"## {config.dataset}: FAILED, going on", flush=True)
            failed.append(config.dataset)
            continue
        if took is not None:
            seconds[config.dataset] = took
    return seconds, failed


def main(args, overrides, command):
    """``pyro-lora study``: run the study the parsed flags ``args`` ask for, then write the report; returns the exit
    status (1 if some dataset failed: the report says which).

    :param args: the ``study`` subcommand's flags (``datasets``, ``shift``, ``runs``, ``docs``, ``force``,
        ``report_only``, ``update``).
    :param overrides: the :class:`CompareConfig` settings given as flags, ``{field: value}``; the others come from
        each dataset's plan (:data:`PLANS`).
    :param command: the command line the sidecars and the report name (:func:`command_line`).
    """
    failed = []
    if args.report_only:
        datasets = list(args.datasets) if args.datasets else None
    else:
        configs = study_configs(overrides, args.datasets, args.shift, args.runs, args.update)
        start = time.perf_counter()
        seconds, failed = run_study(configs, command, update=args.update, force=args.force)
        datasets = [c.dataset for c in configs]
        print(f"# study: {len(seconds)} dataset run(s) in {duration(time.perf_counter() - start)}"
              + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    path = build_report(args.runs, args.docs, datasets, command, failed)
    print(f"report: {path}", flush=True)
    return 1 if failed else 0


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")
