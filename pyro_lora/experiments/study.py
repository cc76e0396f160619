"""The study: every guide on SmolLM2-135M over five multiple-choice sets and the OBQA -> ARC shift.

This is the report a user reads first. It runs the comparison protocol of :mod:`pyro_lora.experiments.compare`
(MAP LoRA trained once per seed, each guide fitted from it, all scored on the same test subset) on

* in-distribution: ARC-Easy, ARC-Challenge, OpenBookQA, WinoGrande-S, BoolQ;
* distribution shift: trained on OpenBookQA, evaluated on ARC-Challenge and ARC-Easy (the OpenBookQA
  run serves both its in-distribution table and the shift table),

with every applicable guide and 3 seeds, then writes ``docs/study.md`` (tables, plots and a summary
computed from the numbers: where each Bayesian guide does *not* beat MAP) and PNGs in ``docs/study/``.

Each dataset's ``run_compare`` output goes to ``runs/study/<dataset>/``. A dataset whose
``results.json`` exists with the same configuration is skipped, so an interrupted study resumes
(``--force`` reruns it); ``--report-only`` rebuilds the report from those files without training.

    OMP_NUM_THREADS=1 python examples/study.py        # default subsets, sized for 2 CPU cores
    python examples/study.py --device cuda --train-size 2000 --test-size 1000 --epochs 5 --samples 10
    python examples/study.py --report-only            # rebuild docs/study.md from runs/study/*/results.json
    python examples/study.py --datasets arc_easy --no-shift --guides zeroshot,map,temperature --seeds 0
    python examples/study.py --update meanfield,flow  # after a change to those methods: rerun just their rows
"""

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..data import resolve_data_dir

# sizes sized for 2 CPU cores (flags scale them up on a GPU)
TRAIN_SIZE = 32  # training examples per dataset, the validation split included
VAL_FRACTION = 0.25  # temperature scaling needs a few validation questions
TEST_SIZE = 32  # test examples per evaluation set
EPOCHS = 2
LR = 1e-3  # compare's causal-LM default 3e-4 barely moves the LoRA in the 12 steps of these subsets
BATCH_SIZE = 4
SAMPLES = 4  # posterior samples per prediction
MAX_LENGTH = 192
SEEDS = (0, 1, 2)
MODEL = "smollm2"
MC_FORMAT = "cloze"
# Answers of very different lengths make the unnormalised cloze sum favour short ones: zero-shot SmolLM2,
# 100 test questions, summed vs per character: OpenBookQA 0.190 / ECE 63.1 vs 0.280 / 8.6, ARC-Challenge
# 0.230 / 58.5 vs 0.260 / 6.2; on ARC-Easy per-character scores lose accuracy (0.550 -> 0.400). So OBQA (with
# its shifted ARC sets) and ARC-C are scored per character, the other sets by the sum
NORMALIZE = {"openbookqa": "chars", "arc_challenge": "chars"}

DATASETS = ("arc_easy", "arc_challenge", "openbookqa", "winogrande_s", "boolq")
SHIFT_SOURCE = "openbookqa"
SHIFT_TARGETS = ("arc_challenge", "arc_easy")

NAMES = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "openbookqa": "OpenBookQA",
         "winogrande_s": "WinoGrande-S", "boolq": "BoolQ"}
SHORT = {"arc_easy": "ARC-E", "arc_challenge": "ARC-C", "openbookqa": "OBQA", "winogrande_s": "WG-S", "boolq": "BoolQ"}
NOT_BAYESIAN = ("map", "zeroshot", "temperature")  # every other guide is a Bayesian (or ensemble) method
ACCURACY_MARGIN = 0.01  # "loses more than 1 accuracy point"
# the keys of CompareConfig that must agree for a saved run to be reused
MATCH_KEYS = ("model", "dataset", "guides", "train_size", "test_size", "val_fraction", "samples", "epochs", "batch_size",
              "rank", "alpha", "prior_scale", "seeds", "eval_datasets", "device", "mc_format", "mc_normalize", "max_length", "data_dir", "lr")
SIDECAR = "study_run.json"  # next to results.json: command, machine, wall time of the run


# --------------------------------------------------------------------------- command line


def parse_args(argv=None):
    """The study's flags (``argv`` defaults to ``sys.argv[1:]``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=None,
                    help=f"comma-separated (default: {','.join(DATASETS)}; with --report-only: every run found)")
    ap.add_argument("--shift", action=argparse.BooleanOptionalAction, default=True,
                    help=f"evaluate the {SHIFT_SOURCE} run on {', '.join(SHIFT_TARGETS)} (adds {SHIFT_SOURCE} if absent)")
    ap.add_argument("--guides", default=None, help="comma-separated (default: every applicable method of pyro_lora.experiments.compare)")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated training seeds")
    ap.add_argument("--train-size", type=int, default=TRAIN_SIZE)
    ap.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="share of --train-size held out for validation")
    ap.add_argument("--test-size", type=int, default=TEST_SIZE)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--lr", type=float, default=LR, help="LoRA learning rate (LoRA-XS cores get 10x)")
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--samples", type=int, default=SAMPLES)
    ap.add_argument("--max-length", type=int, default=MAX_LENGTH)
    ap.add_argument("--mc-format", choices=["cloze", "letter"], default=MC_FORMAT)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--data-dir", default=None, help="canonical JSONL datasets (default: $PYRO_LORA_DATA or ../shared/data)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--runs", default="runs/study", help="run_compare outputs go to RUNS/<dataset>")
    ap.add_argument("--docs", default="docs", help="the report goes to DOCS/study.md, its figures to DOCS/study/")
    ap.add_argument("--force", action="store_true", help="rerun datasets whose matching results.json exists")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from RUNS without training")
    ap.add_argument("--update", default=None,
                    help="comma-separated guides to rerun on every dataset's existing run, replacing their rows (the rest is kept)")
    ap.add_argument("--quiet", action="store_true", help="no per-row output or progress bars from run_compare")
    return ap.parse_args(argv)


def command_line(argv=None):
    """The invocation as a shell command, ``python examples/study.py ...``."""
    argv = sys.argv[1:] if argv is None else argv
    return " ".join(["python examples/study.py", *map(shlex.quote, argv)])


def _split(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def study_datasets(args):
    """The datasets to run, in order; the shift needs the OpenBookQA run, so ``--shift`` adds it."""
    datasets = _split(args.datasets) or list(DATASETS)
    if args.shift and SHIFT_SOURCE not in datasets:
        datasets.append(SHIFT_SOURCE)
    return datasets


def make_config(args, dataset):
    """The :class:`CompareConfig` of one dataset's run."""
    from .compare import METHODS, CompareConfig

    guides = tuple(_split(args.guides)) or None
    unknown = [g for g in (*(guides or ()), *_split(args.update)) if g not in METHODS]
    if unknown:
        raise SystemExit(f"unknown guide(s) {unknown}; available: {', '.join(METHODS)}")
    shift = SHIFT_TARGETS if args.shift and dataset == SHIFT_SOURCE else ()
    return CompareConfig(
        model=args.model, dataset=dataset, guides=guides, train_size=args.train_size, test_size=args.test_size,
        val_fraction=args.val_fraction, mc_normalize=NORMALIZE.get(dataset) if args.mc_format == "cloze" else None,
        samples=args.samples, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seeds=tuple(int(s) for s in _split(args.seeds)),
        eval_datasets=shift, device=args.device, mc_format=args.mc_format, max_length=args.max_length,
        data_dir=args.data_dir, out=str(Path(args.runs) / dataset), progress=not args.quiet,
    )


# --------------------------------------------------------------------------- running


def machine_info(device="cpu"):
    """Where the numbers come from: platform, CPU count, torch version and threads, device (GPU name)."""
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": device}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _normalized(config_dict):
    """``config_dict`` restricted to :data:`MATCH_KEYS`, with tuples as lists (as JSON stores them)."""
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in config_dict.items() if k in MATCH_KEYS}


def expected_guides(config):
    """The guides ``run_compare`` will run: the requested ones, or every method applicable to the task."""
    from .. import data as D
    from .compare import methods_for_task

    if config.guides:
        return list(config.guides)
    return methods_for_task(D.load_meta(config.dataset, config.data_dir)["task"])


def config_differences(saved, config):
    """``{key: (saved, wanted)}`` for every :data:`MATCH_KEYS` entry where a saved run's config differs."""
    wanted = _normalized({**asdict(config), "guides": expected_guides(config)})
    saved = _normalized(saved)
    for entry in (wanted, saved):  # compare runs record the datasets folder they used, absolute
        entry["data_dir"] = str(resolve_data_dir(entry.get("data_dir")))
    return {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}


def run_dataset(config, command, force=False):
    """Run ``run_compare(config)`` unless a matching, complete ``results.json`` exists; returns the wall seconds
    (None: skipped). A run that stopped part-way (killed, or some guide failed) resumes: ``run_compare`` skips the
    (guide, seed) it finished; a run of another configuration is replaced.

    Writes :data:`SIDECAR` (command, machine, dates, wall seconds) next to ``results.json``.
    """
    from .compare import run_compare

    out = Path(config.out)
    results = out / "results.json"
    overwrite = force
    if results.is_file() and not force:
        saved = json.loads(results.read_text())
        differences = config_differences(saved["config"], config)
        if not differences and not saved.get("failed"):
            print(f"## {config.dataset}: {results} matches this configuration, skipped (--force reruns it)", flush=True)
            return None
        changed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in differences.items())
        overwrite = not set(differences) <= {"guides", "seeds"}  # what run_compare resumes
        print(f"## {config.dataset}: " + (f"configuration changed ({changed}), rerunning" if overwrite else "resuming the unfinished guides"), flush=True)
    shift = f", shift to {', '.join(config.eval_datasets)}" if config.eval_datasets else ""
    print(f"## {config.dataset}: {config.model}, train {config.train_size}, test {config.test_size}, epochs {config.epochs}, "
          f"seeds {','.join(map(str, config.seeds))}{shift}", flush=True)
    started = datetime.datetime.now().astimezone()
    start = time.perf_counter()
    run_compare(config, overwrite=overwrite)
    seconds = time.perf_counter() - start
    sidecar = {"command": command, "machine": machine_info(config.device), "started": started.isoformat(timespec="seconds"),
               "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "wall_seconds": seconds}
    write_text(out / SIDECAR, json.dumps(sidecar, indent=2))
    print(f"## {config.dataset}: done in {_duration(seconds)}", flush=True)
    return seconds


def update_dataset(config, update, command):
    """Rerun the guides ``update`` with the saved run's configuration and merge their rows into it; returns the wall seconds."""
    from .compare import run_compare
    from .results import merge_results

    out = Path(config.out)
    if not (out / "results.json").is_file():
        raise SystemExit(f"--update needs an existing run: {out / 'results.json'} is missing")
    config.guides, config.out = tuple(update), str(out / "update")
    print(f"## {config.dataset}: rerunning {', '.join(update)} (seeds {','.join(map(str, config.seeds))})", flush=True)
    started = datetime.datetime.now().astimezone()
    start = time.perf_counter()
    run_compare(config, overwrite=True)  # a previous update's rows are not this one's
    merge_results(out, config.out)
    seconds = time.perf_counter() - start
    sidecar = json.loads((out / SIDECAR).read_text()) if (out / SIDECAR).is_file() else {}
    sidecar.setdefault("updates", []).append({
        "guides": list(update), "command": command, "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "wall_seconds": seconds})
    write_text(out / SIDECAR, json.dumps(sidecar, indent=2))
    print(f"## {config.dataset}: {', '.join(update)} updated in {_duration(seconds)}", flush=True)
    return seconds


def run_study(args, command):
    """Run every dataset of the study in turn; returns ``(seconds per dataset run, failed datasets)``.

    A dataset that fails is reported and the study goes on (its rerun resumes from the others).
    """
    datasets = study_datasets(args)
    configs = [make_config(args, d) for d in datasets]  # check every flag before the first hour of training
    seconds, failed = {}, []
    for i, config in enumerate(configs, 1):
        print(f"# [{i}/{len(configs)}] {config.dataset}", flush=True)
        try:
            if args.update:
                took = update_dataset(config, _split(args.update), command)
            else:
                took = run_dataset(config, command, force=args.force)
        except Exception:  # noqa: BLE001 -- one dataset's failure must not lose the rest of a long study
            traceback.print_exc()
            print(f"## {config.dataset}: FAILED, going on", flush=True)
            failed.append(config.dataset)
            continue
        if took is not None:
            seconds[config.dataset] = took
    return seconds, failed


# --------------------------------------------------------------------------- loading runs


def load_runs(runs_dir, datasets=None):
    """``{dataset: {"config", "summary", "per_seed", "sidecar"}}`` from ``runs_dir/<dataset>/results.json``.

    ``datasets`` picks and orders them (missing ones are left out); default every run found, the study's
    datasets first.
    """
    runs_dir = Path(runs_dir)
    if datasets is None:
        found = sorted(p.parent.name for p in runs_dir.glob("*/results.json"))
        datasets = [d for d in DATASETS if d in found] + [d for d in found if d not in DATASETS]
    runs = {}
    for dataset in datasets:
        path = runs_dir / dataset / "results.json"
        if not path.is_file():
            continue
        run = json.loads(path.read_text())
        sidecar = path.with_name(SIDECAR)
        run["sidecar"] = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        runs[dataset] = run
    return runs


def in_distribution_rows(run):
    """The summary rows of a run on its own test set."""
    return [r for r in run["summary"] if r["dataset"] == run["config"]["dataset"]]


def shift_rows(run):
    """The summary rows of a run on its shifted evaluation sets."""
    return [r for r in run["summary"] if r["dataset"] != run["config"]["dataset"]]


def short(dataset):
    return SHORT.get(dataset, dataset)


def long_name(dataset):
    return NAMES.get(dataset, dataset)


def set_label(source, target=None):
    """A column name: ``ARC-E`` in distribution, ``OBQA→ARC-C`` under shift."""
    return short(source) if target is None else f"{short(source)}→{short(target)}"


def metric_table(runs, metric):
    """``{guide: {set label: mean over seeds}}`` of ``metric`` over every in-distribution and shifted set."""
    table = {}
    for dataset, run in runs.items():
        for row in run["summary"]:
            if metric in row:  # OOD AUROC exists on shifted sets only
                target = None if row["dataset"] == dataset else row["dataset"]
                table.setdefault(row["guide"], {})[set_label(dataset, target)] = row[metric]
    return table


def set_labels(runs):
    """Every set label in report order: in-distribution sets, then shifts."""
    shifts = [set_label(d, r["dataset"]) for d, run in runs.items() for r in shift_rows(run)]
    return [set_label(d) for d in runs] + list(dict.fromkeys(shifts))


def guide_order(runs):
    """Every guide of the runs, in the order of ``pyro_lora.experiments.compare.METHODS`` (others after)."""
    from .compare import METHODS

    seen = {r["guide"] for run in runs.values() for r in run["summary"]}
    return [m for m in METHODS if m in seen] + sorted(seen - set(METHODS))


# --------------------------------------------------------------------------- comparisons


def average_ranks(table, labels, lower_better=True):
    """``{guide: mean rank over the sets it has}``: 1 is best, ties share their mean rank."""
    ranks = {g: [] for g in table}
    for label in labels:
        guides = [g for g in table if label in table[g]]
        values = np.array([table[g][label] for g in guides], dtype=float) * (1 if lower_better else -1)
        for g, v in zip(guides, values):
            ranks[g].append(1 + float((values < v).sum()) + 0.5 * float((values == v).sum() - 1))
    return {g: float(np.mean(r)) if r else float("nan") for g, r in ranks.items()}


def not_beating(table, guide, reference, labels, lower_better=True, margin=0.0):
    """The set labels where ``guide`` does not beat ``reference``, with the difference ``guide - reference``.

    Lower-is-better metrics: sets where ``guide >= reference - margin`` (with ``margin=0`` a tie does not beat).
    Higher-is-better metrics: sets where ``guide`` is more than ``margin`` below ``reference``.
    """
    out = []
    for label in labels:
        if label not in table.get(guide, {}) or label not in table.get(reference, {}):
            continue
        diff = table[guide][label] - table[reference][label]
        if (lower_better and diff >= -margin) or (not lower_better and diff < -margin):
            out.append((label, diff))
    return out


def _listing(items, digits, scale=1.0):
    return ", ".join(f"{label} ({scale * diff:+.{digits}f})" for label, diff in items)


def guide_sentences(tables, guide, labels):
    """Plain sentences on where ``guide`` does not beat MAP (NLL, ECE, accuracy, OOD AUROC) and temperature scaling."""
    n = sum(label in tables["nll"].get(guide, {}) for label in labels)
    lines = []
    for metric, name, digits, unit in [("nll", "NLL", 3, " nats"), ("ece", "ECE", 2, " ECE points")]:
        if "map" not in tables[metric]:
            continue
        losses = not_beating(tables[metric], guide, "map", labels)
        if losses:
            lines.append(f"**{guide}** does not beat MAP on {name} on {len(losses)} of {n} sets: {_listing(losses, digits)}{unit}.")
        else:
            lines.append(f"**{guide}** beats MAP on {name} on every set ({n} of {n}).")
    if "map" in tables["accuracy"]:
        drops = not_beating(tables["accuracy"], guide, "map", labels, lower_better=False, margin=ACCURACY_MARGIN)
        if drops:
            lines.append(f"**{guide}** loses more than 1 accuracy point to MAP on {_listing(drops, 1, 100)} points.")
        else:
            lines.append(f"**{guide}** loses no more than 1 accuracy point to MAP on any set.")
    auroc = tables.get("ood_auroc_entropy", {})
    shifts = [label for label in labels if label in auroc.get(guide, {}) and label in auroc.get("map", {})]
    if shifts:
        best = {g: {label: max(v, tables["ood_auroc_mi"][g][label]) for label, v in row.items()} for g, row in auroc.items()}
        worse = not_beating(best, guide, "map", shifts, lower_better=False)
        if worse:
            lines.append(f"**{guide}** does not beat MAP's OOD AUROC (its better of entropy and MI) on {_listing(worse, 3)}.")
        else:
            lines.append(f"**{guide}** detects the shift better than MAP (OOD AUROC, its better of entropy and MI) on every shift.")
    if "temperature" in tables["nll"]:
        parts = [f"{name} on {_listing(losses, digits)}" for metric, name, digits in [("nll", "NLL", 3), ("ece", "ECE", 2)]
                 if (losses := not_beating(tables[metric], guide, "temperature", labels))]
        if parts:
            lines.append(f"**{guide}** does not beat temperature scaling on " + "; on ".join(parts) + ".")
        else:
            lines.append(f"**{guide}** beats temperature scaling on NLL and ECE on every set.")
    return lines


# --------------------------------------------------------------------------- markdown


def _cell(row, key, digits):
    """``mean ± std`` as compare.format_table writes it (no ``± std`` with one seed)."""
    if key not in row:
        return "—"
    if math.isnan(row[key]):  # not available (e.g. mutual information without weight samples)
        return "n/a"
    std = row.get(key + "_std")
    return f"{row[key]:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


# (key, header, digits, best: "min" / "max" / None)
COLUMNS = [("accuracy", "accuracy", 3, "max"), ("ece", "ECE x100", 2, "min"), ("nll", "NLL", 3, "min"),
           ("brier", "Brier", 3, "min"), ("aurc", "AURC", 3, "min"), ("fit_seconds", "fit s", 1, None),
           ("predict_seconds_per_1000", "predict s/1k", 1, None), ("extra_parameters", "+params", 0, None)]
SHIFT_COLUMNS = [("accuracy", "accuracy", 3, "max"), ("ece", "ECE x100", 2, "min"), ("nll", "NLL", 3, "min"),
                 ("ood_auroc_entropy", "OOD AUROC entropy", 3, "max"), ("ood_auroc_mi", "OOD AUROC MI", 3, "max")]


def markdown_table(rows, columns, first=("guide",)):
    """A markdown table, one line per row: ``mean ± std`` cells, the best mean of a ranked column in bold."""
    best = {}
    for key, _, digits, how in columns:
        if how:
            best[key] = _best_shown([r[key] for r in rows if key in r], digits, how == "min")
    lines = ["| " + " | ".join([*first, *(h for _, h, _, _ in columns)]) + " |", "|" + "---|" * (len(first) + len(columns))]
    for r in rows:
        cells = [str(r[k]) for k in first]
        for key, _, digits, _ in columns:
            text = _cell(r, key, digits)
            cells.append(f"**{text}**" if key in r and f"{r[key]:.{digits}f}" == best.get(key) else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _best_shown(values, digits, lower_better):
    """The best of ``values`` as the table shows it (so equal-looking cells are bold alike); None where all look equal."""
    values = [v for v in values if not math.isnan(v)]  # n/a cells are never the best
    shown = {f"{v:.{digits}f}" for v in values}
    if len(shown) < 2:
        return None
    best = min(values) if lower_better else max(values)
    return f"{best:.{digits}f}"


def cross_table(table, labels, guides, digits, lower_better=True):
    """Guides x sets markdown table of one metric's means, best per set in bold, plus the average rank."""
    ranks = average_ranks(table, labels, lower_better)
    best = {label: _best_shown([row[label] for row in table.values() if label in row], digits, lower_better) for label in labels}
    lines = ["| guide | " + " | ".join(labels) + " | avg rank |", "|" + "---|" * (len(labels) + 2)]
    for g in guides:
        cells = []
        for label in labels:
            text = f"{table[g][label]:.{digits}f}" if label in table.get(g, {}) else "—"
            cells.append(f"**{text}**" if text == best[label] else text)
        lines.append(f"| {g} | " + " | ".join(cells) + f" | {ranks.get(g, float('nan')):.2f} |")
    return "\n".join(lines)


def _duration(seconds):
    if seconds is None:
        return "unknown"
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{seconds:.1f}s")


def _machine_line(m):
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m['platform']}, {m['cpu_count']} CPUs, Python {m['python']}, torch {m['torch']} "
            f"(torch threads {m['torch_threads']}), device {m['device']}{gpu}")


def header_section(runs, command, now, failed=()):
    """Title, command lines, machine(s), dates, wall times and the sizes of every run."""
    sidecars = {d: run["sidecar"] for d, run in runs.items()}
    commands = sorted({s["command"] for s in sidecars.values() if s.get("command")})
    machines = sorted({_machine_line(s["machine"]) for s in sidecars.values() if s.get("machine")})
    walls = [s.get("wall_seconds") for s in sidecars.values()]
    total = sum(w for w in walls if w is not None)
    lines = [
        "# Study: Bayesian LoRA guides on SmolLM2-135M",
        "",
        "Generated by `examples/study.py` from the `results.json` of each `pyro_lora.experiments.compare` run "
        "(means ± std over seeds; ECE is x100; NLL in nats; lower is better except for accuracy and OOD AUROC; "
        "the best mean of each column is in bold).",
        "",
        f"- report: `{command}`",
    ]
    if commands and commands != [command]:
        lines.append("- runs made with: " + "; ".join(f"`{c}`" for c in commands))
    lines += [f"- machine: {m}" for m in machines] or [f"- machine (this report): {_machine_line(machine_info())}"]
    lines.append(f"- date: {now}")
    missing = "" if all(w is not None for w in walls) else " (some runs have no recorded wall time)"
    lines.append(f"- total wall time: {_duration(total)} over {len(runs)} dataset runs{missing}")
    spans = [(run["sidecar"].get("started"), run["sidecar"].get("finished")) for run in runs.values()]
    if len(runs) > 1 and all(a and b for a, b in spans):
        first = min(datetime.datetime.fromisoformat(a) for a, _ in spans)
        last = max(datetime.datetime.fromisoformat(b) for _, b in spans)
        if (last - first).total_seconds() < total - 1:  # the runs overlapped: several processes
            lines.append(f"- elapsed from the first start to the last finish: {_duration((last - first).total_seconds())} "
                         "(the runs overlapped in parallel processes)")
    for d, run in runs.items():
        for u in run["sidecar"].get("updates", []):
            lines.append(f"- {long_name(d)}: rows of {', '.join(u['guides'])} rerun on {u['finished']} in "
                         f"{_duration(u['wall_seconds'])} with `{u['command']}` (after a change to those methods)")
    if failed:
        lines.append(f"- **failed in this invocation** (their sections are missing or stale): {', '.join(failed)}")
    lines += ["", "| run | wall time | finished | seeds | guides | train | test | epochs | batch | samples | max length | format | lr | shift to |",
              "|" + "---|" * 14]
    for d, run in runs.items():
        c, s = run["config"], run["sidecar"]
        lines.append(
            f"| {long_name(d)} | {_duration(s.get('wall_seconds'))} | {s.get('finished', '—')} | {','.join(map(str, c['seeds']))} "
            f"| {len(c['guides'])} | {c['train_size']} | {c['test_size']} | {c['epochs']} | {c['batch_size']} | {c['samples']} "
            f"| {c['max_length']} | {c['mc_format']}{' / ' + c['mc_normalize'] if c.get('mc_normalize') else ''} | {c['lr']} | {', '.join(map(long_name, c['eval_datasets'])) or '—'} |")
    lines += ["", f"Training subsets include the validation split ({runs[next(iter(runs))]['config']['val_fraction']:.0%}, "
                  "used by temperature scaling); every seed sees the same examples, only initialisation and order change. "
                  "Test subsets are capped at the set's size."]
    return "\n".join(lines)


def copy_figures(run_dir, dataset, figures_dir):
    """Copy a run's reliability grid and calibration-vs-accuracy PNGs to ``figures_dir/<dataset>_*.png``;
    returns ``{kind: file name}`` of those that exist."""
    copied = {}
    for kind in ("reliability_grid", "calibration_vs_accuracy"):
        source = Path(run_dir) / f"{kind}.png"
        if source.is_file():
            target = Path(figures_dir) / f"{dataset}_{kind}.png"
            shutil.copyfile(source, target)
            copied[kind] = target.name
    return copied


def dataset_section(dataset, run, figures):
    """One in-distribution section: the table and the run's figures."""
    c = run["config"]
    seeds = ",".join(map(str, c["seeds"]))
    lines = [f"## {long_name(dataset)} (`{dataset}`)", "",
             f"Train subset {c['train_size']}, test subset {c['test_size']}, epochs {c['epochs']}, seeds {seeds}, "
             f"{c['samples']} posterior samples, {c['mc_format']} format.", "",
             markdown_table(in_distribution_rows(run), COLUMNS), ""]
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
    for d, run in blocks:
        targets = list(dict.fromkeys(r["dataset"] for r in shift_rows(run)))
        rows = sorted(({**r, "shift": set_label(d, r["dataset"])} for r in shift_rows(run)), key=lambda r: targets.index(r["dataset"]))
        lines += [markdown_table(rows, SHIFT_COLUMNS, first=("shift", "guide")), ""]
    point = sorted({r["guide"] for _, run in blocks for r in shift_rows(run) if r.get("mutual_information", 0) == 0})
    if point:
        lines += [f"Guides with zero mutual information (a single predictive: {', '.join(point)}) have an MI AUROC "
                  "of 0.5 by construction.", ""]
    return "\n".join(lines)


def summary_section(runs, figure=None):
    """Cross-set tables (accuracy, ECE, NLL, average rank) and where each Bayesian guide does not beat MAP."""
    labels = set_labels(runs)
    guides = guide_order(runs)
    tables = {m: metric_table(runs, m) for m in ("accuracy", "ece", "nll", "ood_auroc_entropy", "ood_auroc_mi")}
    lines = ["## Summary", "",
             "Means over seeds; in-distribution sets first, then the shifts (source→target). The average rank is over "
             "every set shown (1 = best).", ""]
    for metric, title, digits, lower in [("nll", "NLL", 3, True), ("ece", "ECE x100", 2, True), ("accuracy", "accuracy", 3, False)]:
        lines += [f"### {title}", "", cross_table(tables[metric], labels, guides, digits, lower), ""]
    if figure:
        lines += [f"![NLL and ECE relative to MAP](study/{figure})", ""]
    bayesian = [g for g in guides if g not in NOT_BAYESIAN]
    lines += ["### Where the Bayesian guides do not beat MAP", "",
              "Computed from the tables above (differences guide − MAP in brackets; \"does not beat\" includes ties). "
              "With small test subsets and few seeds many differences are within the seed std of the per-set tables.", ""]
    if not bayesian or "map" not in guides:
        return "\n".join(lines + ["No Bayesian guide and MAP to compare in these runs.", ""])
    wins = {m: sum(len(labels) - len(not_beating(tables[m], g, "map", labels)) - _missing(tables[m], g, labels) for g in bayesian)
            for m in ("nll", "ece")}
    pairs = sum(len(labels) - _missing(tables["nll"], g, labels) for g in bayesian)
    lines += [f"Over {pairs} (Bayesian guide, set) pairs, a Bayesian guide beats MAP on NLL in {wins['nll']} and on ECE in "
              f"{wins['ece']}.", ""]
    for metric, name in [("nll", "NLL"), ("ece", "ECE")]:
        compared = {g: len(labels) - _missing(tables[metric], g, labels) for g in bayesian}
        losses = {g: len(not_beating(tables[metric], g, "map", labels)) for g in bayesian}
        everywhere = [g for g in bayesian if compared[g] and not losses[g]] or ["none"]
        nowhere = [g for g in bayesian if compared[g] and losses[g] == compared[g]] or ["none"]
        lines.append(f"On {name}, beating MAP on every set: {', '.join(everywhere)}; on no set: {', '.join(nowhere)}.")
    lines.append("")
    for g in bayesian:
        lines += [f"- {s}" for s in guide_sentences(tables, g, labels)]
    clear = noise_sentences(runs, [g for g in guides if g != "map"])
    lines += ["", "### Which differences from MAP stand out of the seed noise", "",
              "Per seed, each guide and MAP are scored on the same test questions; a difference counts as clear when "
              "the 95% Student-t interval of the mean per-seed difference excludes zero. That covers the training "
              "noise (initialisation, order) only: with the same few test questions for every seed, the sampling "
              "noise of the test subset is on top. Guides not listed differ from MAP on no set by that test.", ""]
    lines += [f"- {s}" for s in clear] or ["- none: every difference from MAP is within the seed noise."]
    return "\n".join(lines + [""])


def paired_differences(runs, metric, reference="map"):
    """``{guide: {set label: [guide - reference per seed]}}``: both scored on the same seed's test set, so the
    spread of these differences is the noise a comparison with ``reference`` has to beat."""
    out = {}
    for dataset, run in runs.items():
        values = {(r["guide"], r["dataset"], r["seed"]): r[metric] for r in run["per_seed"] if metric in r}
        for (guide, evaluated, seed), v in values.items():
            ref = values.get((reference, evaluated, seed))
            if guide != reference and ref is not None:
                label = set_label(dataset, None if evaluated == dataset else evaluated)
                out.setdefault(guide, {}).setdefault(label, []).append(v - ref)
    return out


# two-sided 95% Student-t quantiles by degrees of freedom (seeds - 1); 1.96 beyond the table
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def clear_differences(diffs, lower_better=True):
    """``(better, worse)`` set labels where the mean paired difference is outside its 95% Student-t interval
    (over seeds; needs two seeds or more)."""
    better, worse = [], []
    for label, d in diffs.items():
        if len(d) < 2:
            continue
        mean, se = float(np.mean(d)), float(np.std(d, ddof=1)) / np.sqrt(len(d))
        if abs(mean) > T95.get(len(d) - 1, 1.96) * se and mean != 0:
            (better if (mean < 0) == lower_better else worse).append(label)
    return better, worse


def noise_sentences(runs, guides):
    """Per guide: on which sets it is *clearly* better or worse than MAP (paired over seeds, 95% t interval)."""
    lines = []
    for metric, name, lower in [("nll", "NLL", True), ("ece", "ECE", True), ("accuracy", "accuracy", False)]:
        diffs = paired_differences(runs, metric)
        for g in guides:
            better, worse = clear_differences(diffs.get(g, {}), lower)
            if better or worse:
                lines.append(f"{g}, {name}: clearly better than MAP on {', '.join(better) or 'no set'}; "
                             f"clearly worse on {', '.join(worse) or 'no set'}.")
    return lines


def _missing(table, guide, labels):
    return sum(label not in table.get(guide, {}) or label not in table.get("map", {}) for label in labels)


# --------------------------------------------------------------------------- figure


def summary_plot(runs, path):
    """Heatmaps guide x set of NLL relative to MAP (%) and ECE - MAP (points); red is worse than MAP."""
    from .plots import _new_figure, _save_png

    labels = set_labels(runs)
    guides = [g for g in guide_order(runs) if g != "map"]
    nll, ece = metric_table(runs, "nll"), metric_table(runs, "ece")
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

    fig = _new_figure((1.2 + 0.95 * len(labels) * 2, 1.2 + 0.45 * len(guides)))
    axes = fig.subplots(1, 2, squeeze=False)[0]
    # the zero-shot row (no fine-tuning) can be far off: it must not wash out the colours of the others
    scaled = [i for i, g in enumerate(guides) if g != "zeroshot"] or list(range(len(guides)))
    for ax, values, title in [(axes[0], grid(nll, True), "NLL relative to MAP (%); blue: better"),
                              (axes[1], grid(ece, False), "ECE − MAP (x100 points); blue: better")]:
        finite = np.abs(values[scaled])[np.isfinite(values[scaled])]
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        for i in range(len(guides)):
            for j in range(len(labels)):
                if np.isfinite(values[i, j]):
                    color = "white" if abs(values[i, j]) > 0.6 * vmax else "black"
                    ax.text(j, i, f"{values[i, j]:+.1f}", ha="center", va="center", fontsize=7, color=color)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(guides)), guides, fontsize=8)
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _save_png(fig, path)


# --------------------------------------------------------------------------- report


def write_text(path, text):
    """Write ``text`` to ``path`` atomically (:func:`pyro_lora.io.atomic_file`)."""
    from ..io import atomic_file

    with atomic_file(path) as f:
        f.write(text)
    return Path(path)


def build_report(runs_dir, docs_dir, datasets=None, command=None, failed=()):
    """Write ``docs_dir/study.md`` and its figures in ``docs_dir/study/`` from the runs in ``runs_dir``
    (``--report-only`` is exactly this); returns the path of the markdown file."""
    runs = load_runs(runs_dir, datasets)
    if not runs:
        raise SystemExit(f"no results.json under {runs_dir}: run the study first")
    docs_dir = Path(docs_dir)
    figures_dir = docs_dir / "study"
    figures_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    parts = [header_section(runs, command or command_line(), now, failed)]
    parts += [dataset_section(d, run, copy_figures(Path(runs_dir) / d, d, figures_dir)) for d, run in runs.items()]
    parts.append(shift_section(runs))
    figure = summary_plot(runs, figures_dir / "summary.png")
    parts.append(summary_section(runs, figure.name if figure else None))
    return write_text(docs_dir / "study.md", "\n\n".join(p.rstrip("\n") for p in parts) + "\n")


def main(argv=None):
    args = parse_args(argv)
    command = command_line(argv)
    failed = []
    if args.report_only:
        datasets = _split(args.datasets) or None
    else:
        start = time.perf_counter()
        seconds, failed = run_study(args, command)
        datasets = study_datasets(args)
        print(f"# study: {len(seconds)} dataset run(s) in {_duration(time.perf_counter() - start)}"
              + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    path = build_report(args.runs, args.docs, datasets, command, failed)
    print(f"report: {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
