"""``pyro-lora study``: every guide on SmolLM2-135M over five multiple-choice sets and the OBQA -> ARC shift.

This is the report a user reads first. It runs the comparison protocol of ``pyro-lora compare`` (MAP LoRA trained
once per seed, each guide fitted from it, all scored on the same test subset) on

* in-distribution: ARC-Easy, ARC-Challenge, OpenBookQA, WinoGrande-S, BoolQ;
* distribution shift: trained on OpenBookQA, evaluated on ARC-Challenge and ARC-Easy (the OpenBookQA
  run serves both its in-distribution table and the shift table),

with every applicable guide and 3 seeds, then writes ``docs/study.md`` (tables, plots and a summary computed from
the numbers: where each Bayesian guide does *not* beat MAP) and PNGs in ``docs/study/``
(:mod:`pyro_lora.experiments.study_report`).

Each dataset's ``run_compare`` output goes to ``runs/study/<dataset>/``. A dataset whose ``results.json`` exists
with the same configuration is skipped, so an interrupted study resumes (``--force`` reruns it); ``--report-only``
rebuilds the report from those files without training::

    OMP_NUM_THREADS=1 pyro-lora study              # default subsets, sized for 2 CPU cores
    pyro-lora study --device cuda --train-size 2000 --test-size 1000 --epochs 5 --samples 10
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
from .setup import CompareConfig, check_config, default_guides
from .study_report import DATASETS, SIDECAR, build_report, duration, machine_info
from .verdict import REFERENCE

# The study's defaults, where they differ from compare's: sized for 2 CPU cores (flags scale them up on a GPU).
DEFAULTS = CompareConfig(
    model="smollm2", dataset=DATASETS[0],
    train_size=32,  # training examples per dataset, the validation split included
    val_fraction=0.25,  # temperature scaling needs a few validation questions
    test_size=32,  # test examples per evaluation set
    epochs=2,
    lr=1e-3,  # compare's causal-LM default 3e-4 barely moves the LoRA in the 12 steps of these subsets
    batch_size=4,
    samples=4,  # posterior samples per prediction
    max_length=192,
    seeds=(0, 1, 2),
    mc_format="cloze",
    out="runs/study",  # each dataset's run goes to OUT/<dataset> (the --runs flag)
)
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


def make_config(base, dataset, shift=True, runs=DEFAULTS.out):
    """The :class:`CompareConfig` of one dataset's run: ``base`` (the flags' settings) on ``dataset``, written to
    ``runs/<dataset>``, the OpenBookQA run also scored on the shifted ARC sets (with ``shift``), cloze answers
    normalised as :data:`NORMALIZE` says."""
    normalize = NORMALIZE.get(dataset) if (base.mc_format or "cloze") == "cloze" else None
    return replace(base, dataset=dataset, eval_datasets=SHIFT_TARGETS if shift and dataset == SHIFT_SOURCE else (),
                   mc_normalize=normalize, out=str(Path(runs) / dataset))


def study_configs(base, datasets=None, shift=True, runs=DEFAULTS.out, update=None):
    """The checked configuration of every dataset run, in order: a flag that cannot run is refused before the first
    hour of training.

    :param update: the guides ``--update`` reruns (they must apply, and every dataset's run must exist).
    :raises ValueError: naming what is wrong (:func:`~pyro_lora.experiments.setup.check_config`).
    """
    configs = [make_config(base, d, shift, runs) for d in study_datasets(datasets, shift)]
    for config in configs:
        task = D.load_meta(config.dataset, config.data_dir)["task"]
        if task != "multiple_choice":
            raise ValueError(f"--datasets {config.dataset}: the study compares multiple-choice sets, and {config.dataset} is a "
                             f"{task} set; use `pyro-lora compare --dataset {config.dataset}`")
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


def main(args, base, command):
    """``pyro-lora study``: run the study the parsed flags ``args`` ask for, then write the report; returns the exit
    status (1 if some dataset failed: the report says which).

    :param args: the ``study`` subcommand's flags (``datasets``, ``shift``, ``runs``, ``docs``, ``force``,
        ``report_only``, ``update``).
    :param base: the :class:`CompareConfig` of its shared flags (model, sizes, training, guides, seeds).
    :param command: the command line the sidecars and the report name (:func:`command_line`).
    """
    failed = []
    if args.report_only:
        datasets = list(args.datasets) if args.datasets else None
    else:
        configs = study_configs(base, args.datasets, args.shift, args.runs, args.update)
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
