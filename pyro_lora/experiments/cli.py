"""The ``pyro-lora`` command line: ``compare`` (the default), ``fit``, ``bayesianize``, ``evaluate``, ``study``."""

import argparse
import contextlib
import functools
import math
import os
import sys
import warnings
from dataclasses import fields, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..distributed import is_main
from ..guides.registry import METHODS, load_plugins
from ..guides.tfb import SPACINGS, TFB_ANCHORS, TFB_SEARCH
from ..data import load_meta
from ..pretrained import DTYPES
from . import study
from .compare import run_compare
from .results import GuideFailures, read_record
from .saved import FIT_SETTINGS, bayesianize_adapter, evaluate_saved, fit_one, fit_settings
from .setup import FULL, CompareConfig
from .table import format_table
from .verdict import verdict

_MIN_MAX_LENGTH = 8  # shorter cuts most inputs to a few tokens
SEED_LIMIT = 2**32  # numpy's seeds; torch's overflow above 2**63


def _number(kind, low, strict=True):
    """An argparse type: ``kind`` (int or float) that is ``> low`` (``>= low`` unless ``strict``), finite."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value <= low if strict else value < low:
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {low}")
        return value

    return parse


def _seeds(text):
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not all(0 <= seed < SEED_LIMIT for seed in seeds):
        raise argparse.ArgumentTypeError(f"{text!r} holds a seed out of range: seeds are integers in [0, 2**32)")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a seed (it would count one run twice)")
    return tuple(seeds)


def _guides(text):
    names = [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown guide(s) {unknown}; available: {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a guide")
    return tuple(names)


def _guides_arg(p):
    p.add_argument("--guides", type=_guides, default=None, help=f"comma-separated, from: {', '.join(METHODS)} (default: all that apply)")


def _ts_arg(p):
    p.add_argument("--ts", action=argparse.BooleanOptionalAction, default=True,
                   help="beside each method, its row after temperature scaling fitted on the validation split on its "
                        "averaged predictive (METHOD+ts); --no-ts leaves them out (default: on)")


def _model_args(p, d=None, one_dataset=True):
    """The model, data and input flags, defaults from ``d`` (default ``CompareConfig()``); ``one_dataset=False`` leaves
    out ``--dataset`` and ``--mc-normalize``, which the study sets per dataset."""
    d = d or CompareConfig()
    p.add_argument("--model", default=d.model, help=f"minilm, smollm2, or a local HF model folder / .gguf file (default {d.model})")
    if one_dataset:
        p.add_argument("--dataset", default=d.dataset, help=f"a dataset folder name under --data-dir (sst2, arc_easy, ...; default {d.dataset})")
    p.add_argument("--data-dir", default=None,
                   help=f"canonical JSONL datasets (default {d.data_dir or '$PYRO_LORA_DATA or ../shared/data'})")
    p.add_argument("--mc-format", choices=["letter", "cloze"], default=d.mc_format,
                   help=f"multiple-choice format (default {d.mc_format})" if d.mc_format else "multiple-choice format (default: cloze below ~1B parameters)")
    if one_dataset:
        p.add_argument("--mc-normalize", choices=["none", "tokens", "chars"], default="none",
                       help="cloze: divide each answer's log-probability by its length (lm-eval's acc_norm is 'chars'; "
                            f"default {d.mc_normalize or 'none'})")
    p.add_argument("--max-length", type=_number(int, _MIN_MAX_LENGTH, strict=False), default=d.max_length,
                   help=f"tokens per input, at least {_MIN_MAX_LENGTH} and at most the model's positions (default {d.max_length})")
    p.add_argument("--batch-size", type=_number(int, 0), default=d.batch_size, help=f"examples per batch (default {d.batch_size})")
    p.add_argument("--device", default=d.device, choices=["cpu", "cuda"], help=f"device (default {d.device})")
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES),
                   help=f"the base model's weights; LoRA, head and posteriors stay fp32 (default {d.dtype})")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="load the base's linear layers in 4-bit NF4 through bitsandbytes (QLoRA; default "
                        f"{'off' if d.load_in_4bit is False else d.load_in_4bit})")


def _size_args(p, train_help="training examples, validation carved from them", d=None):
    d = d or CompareConfig()
    p.add_argument("--train-size", type=_number(int, 1), default=d.train_size, help=f"{train_help} (at least 2; default {d.train_size})")
    p.add_argument("--val-fraction", type=_fraction, default=d.val_fraction,
                   help=f"share of --train-size held out as the validation split that temperature scaling, the +ts rows and "
                        f"the validation-tuned methods fit on, in (0, 1) (default {d.val_fraction})")
    p.add_argument("--test-size", type=_number(int, 0), default=d.test_size, help=f"test examples (default {d.test_size})")
    p.add_argument("--samples", type=_number(int, 0), default=d.samples, help=f"posterior samples per prediction, S (default {d.samples})")


def _training_args(p, d=None):
    d = d or CompareConfig()
    p.add_argument("--epochs", type=_number(int, 0, strict=False), default=d.epochs, help=f"training epochs (default {d.epochs})")
    p.add_argument("--lr", type=_number(float, 0.0), default=d.lr,
                   help=f"learning rate (default {d.lr})" if d.lr else "learning rate (default 2e-3 for encoders, 3e-4 for causal LMs)")
    p.add_argument("--rank", type=_number(int, 0), default=d.rank, help=f"LoRA rank r (default {d.rank})")
    p.add_argument("--prior-scale", type=_number(float, 0.0), default=d.prior_scale,
                   help=f"std of the isotropic prior on LoRA entries (default {d.prior_scale})")


def _folder(text):
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty folder name (give a path, e.g. runs/x)")
    return text


def _output_args(p, out_default):
    p.add_argument("--out", type=_folder, default=out_default, help=f"output folder (default {out_default})")
    _progress_args(p)


def _progress_args(p):
    p.add_argument("--quiet", action="store_true", help="no progress bars, also none while loading the model, and no transformers log lines (default: shown)")
    _debug(p)


def _names(text):
    names = [n.strip() for n in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of distinct names")
    return tuple(names)


def _fraction(text):
    value = _number(float, 0.0)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text} must be below 1")
    return value


class _Shown:
    """Flags whose defaults are set elsewhere show ``text`` as their default (the study's: "per task", each task's plan
    sets them, ``study.PLANS``; bayesianize's: "the fit's", its run.json records them); the others compare's."""

    def __init__(self, text, names):
        self.text, self.names = text, names

    def __getattr__(self, name):
        return self.text if name in self.names else getattr(CompareConfig(), name)


# the CompareConfig fields each task's plan sets: a study flag left out takes the plan's value
_PLANNED = ("model", "mc_format", "max_length", "batch_size", "train_size", "test_size", "samples", "val_fraction", "epochs",
            "lr", "rank", "prior_scale", "guides", "seeds")


def _study_args(p):
    """The study's flags: compare's, defaulting to each task's plan (:data:`~pyro_lora.experiments.study.PLANS`), and its own."""
    d = _Shown("per task", _PLANNED)
    p.add_argument("--datasets", type=_names, default=None,
                   help=f"comma-separated (default {','.join(study.DATASETS)}; with --report-only: every run found)")
    p.add_argument("--shift", action=argparse.BooleanOptionalAction, default=True,
                   help=f"score the {study.SHIFT_SOURCE} run, where --datasets has it, on {', '.join(study.SHIFT_TARGETS)} too (default: on)")
    _model_args(p, d, one_dataset=False)
    _size_args(p, d=d)
    _training_args(p, d)
    p.add_argument("--guides", type=_guides, default=None,
                   help=f"comma-separated, from: {', '.join(METHODS)} (default per task: every method that applies to "
                        f"classification; {', '.join(study.PLANS['multiple_choice'].guides)} for multiple choice)")
    p.set_defaults(**dict.fromkeys(_PLANNED))
    _ts_arg(p)
    p.add_argument("--seeds", type=_seeds, default=None, help="comma-separated training seeds (default per task: 0,1,2)")
    p.add_argument("--runs", type=_folder, default=study.RUNS, help=f"each dataset's run goes to RUNS/<dataset> (default {study.RUNS})")
    p.add_argument("--docs", type=_folder, default=study.DOCS, help=f"the report goes to DOCS/study.md, its figures to DOCS/study/ (default {study.DOCS})")
    p.add_argument("--force", action="store_true",
                   help="replace the runs of another configuration (default: refused, naming the differences); with "
                        "--update, rerun from the start an update that was cut short (default: resumed)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from RUNS without training")
    p.add_argument("--update", type=_guides, default=None,
                   help="comma-separated guides to rerun on every dataset's existing run, replacing their rows, the rest kept (default none)")
    _progress_args(p)


def _study_overrides(args) -> dict:
    """The CompareConfig settings the study's command line gives; the others come from each task's plan."""
    names = {f.name for f in fields(CompareConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return {**given, "progress": not args.quiet and is_main()}


def _seed(text):
    seeds = _seeds(text)
    if len(seeds) != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is more than one seed: this command runs one")
    return seeds[0]


def _seed_arg(p, help, shown=0):
    p.add_argument("--seed", type=_seed, default=0, help=f"{help}, in [0, 2**32) (default {shown})")


def parser(full=False):
    """The ``pyro-lora`` parser; ``full``: ``compare``'s sizes default to the full comparison (``--full``)."""
    ap = argparse.ArgumentParser(prog="pyro-lora", allow_abbrev=False, description="Bayesian LoRA in Pyro: fit and compare posterior guides on real data.")
    sub = ap.add_subparsers(dest="command")
    p = sub.add_parser("compare", allow_abbrev=False, help="train MAP once, fit each guide, one table of accuracy and calibration (default)")
    sizes = replace(CompareConfig(), **FULL) if full else CompareConfig()
    p.add_argument("--full", action="store_true",
                   help=f"the full comparison: defaults {FULL['train_size']} training and {FULL['test_size']} test examples, "
                        f"{FULL['epochs']} epochs, {FULL['samples']} samples (about an hour on 2 CPU cores; default: the demo)")
    _model_args(p)
    _size_args(p, d=sizes)
    _training_args(p, sizes)
    _guides_arg(p)
    p.add_argument("--seeds", type=_seeds, default=(0,), help="comma-separated training seeds, e.g. 0,1,2 (the table shows mean ± std; default 0)")
    p.add_argument("--eval-datasets", type=lambda text: _names(text) if text.strip() else (), default=(), help="comma-separated shifted test sets with the same answer format, e.g. arc_challenge,arc_easy (default none)")
    _ts_arg(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run of another configuration in --out (default: refused; a run of the same configuration resumes)")
    _output_args(p, "runs/compare")
    p = sub.add_parser("fit", allow_abbrev=False, help="train MAP and fit one guide; save it to OUT/guide")
    _model_args(p)
    _size_args(p)
    _training_args(p)
    saveable = [name for name, m in METHODS.items() if m.saveable]
    p.add_argument("--guide", default="map", choices=saveable, help="the method to fit and save (default map)")
    _seed_arg(p, "training seed")
    p.add_argument("--adapter", action="store_true",
                   help=f"also write the posterior mean as a peft adapter folder OUT/guide/adapter ({', '.join(n for n, m in METHODS.items() if m.exportable)}; default off)")
    _overwrite_arg(p, "fits it again")
    _output_args(p, "runs/fit")
    p = sub.add_parser("bayesianize", allow_abbrev=False, help="TFB: turn a saved peft adapter into a posterior without training",
                       description="TFB: turn a saved peft adapter into a posterior without training. A model, data, size "
                                   "or seed flag left out takes the value that the run.json of the fit beside the adapter "
                                   "records (pyro-lora fit --adapter; compare's default for an adapter from elsewhere), "
                                   "so that a fit's MAP adapter gets the posterior of compare's tfb row.")
    p.add_argument("adapter_dir", help="a peft adapter directory (adapter_config.json + weights)")
    recorded = _Shown("the fit's", FIT_SETTINGS)
    _model_args(p, recorded)
    _size_args(p, train_help="training examples the anchors are drawn from", d=recorded)
    _seed_arg(p, "seed of the anchors drawn and the posterior samples", shown="the fit's")
    p.set_defaults(**dict.fromkeys(FIT_SETTINGS), seed=None)  # None: not given, the fit's (_bayesianize_config)
    # the search compare's tfb rows run: a bayesianized MAP adapter gets the posterior of compare's tfb row
    t = TFB_SEARCH
    p.add_argument("--criterion", choices=["nll", "flip", "accuracy"], default=t["criterion"],
                   help=f"what the anchors may lose (default {t['criterion']})")
    p.add_argument("--tolerance", type=_number(float, 0.0, strict=False), default=t["tolerance"],
                   help=f"how much the criterion may lose (default {t['tolerance']:g})")
    p.add_argument("--anchors", type=_number(int, 0), default=TFB_ANCHORS,
                   help=f"training examples the search runs on (default {TFB_ANCHORS})")
    p.add_argument("--low", type=_number(float, 0.0), default=t["low"], help=f"smallest sigma_q searched (default {t['low']:g})")
    p.add_argument("--high", type=_number(float, 0.0), default=t["high"], help=f"largest sigma_q searched (default {t['high']:g})")
    p.add_argument("--iterations", type=_number(int, 0, strict=False), default=t["iterations"],
                   help=f"bisection steps (default {t['iterations']})")
    p.add_argument("--spacing", choices=SPACINGS, default=t["spacing"],
                   help=f"bisect sigma_q in log space or linearly, as TFB's own search (default {t['spacing']})")
    _overwrite_arg(p, "runs it again; an OUT/guide that holds ADAPTER_DIR is refused all the same")
    _output_args(p, "runs/bayesianize")
    p = sub.add_parser("evaluate", allow_abbrev=False, help="score a guide saved by `pyro-lora fit` or `bayesianize` on the test set")
    p.add_argument("run_dir", help="the --out folder of `pyro-lora fit` or `bayesianize`")
    p.add_argument("--test-size", type=_number(int, 0), default=None, help="test examples (default: the run's)")
    p.add_argument("--samples", type=_number(int, 0), default=None, help="posterior samples per prediction (default: the run's)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="device (default: the run's)")
    p.add_argument("--data-dir", default=None, help="the datasets folder, where the run's moved (default: the run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, also none while loading the model, and no transformers log lines (default: shown)")
    _debug(p)
    p = sub.add_parser("study", allow_abbrev=False, help="every method on the reference task (MiniLM, SST-2) and on SmolLM2 (ARC-Easy, OBQA -> ARC); report in DOCS/study.md",
                       description=study.__doc__.splitlines()[0].replace("``", ""))
    _study_args(p)
    ap.commands = sub.choices  # each command's own parser: its usage line heads an error about its flags
    return ap


def _overwrite_arg(p, again):
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run OUT/guide holds (default: one of another configuration is refused, one of the "
                        f"same configuration is kept and its row shown; --overwrite {again})")


def _debug(p):
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (default: one line)")


def _config(args, **extra):
    names = {f.name for f in fields(CompareConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and k not in extra}
    values["seeds"] = args.seeds if hasattr(args, "seeds") else (args.seed,)
    if "mc_normalize" in values:
        values["mc_normalize"] = None if values["mc_normalize"] == "none" else values["mc_normalize"]
    values["eval_datasets"] = getattr(args, "eval_datasets", ())
    return CompareConfig(**values, progress=not args.quiet and is_main(), **extra)


def _bayesianize_config(args) -> CompareConfig:
    """``bayesianize``'s configuration: a flag of :data:`~.saved.FIT_SETTINGS` or ``--seed`` left out takes the value
    the fit's run.json beside the adapter records (:func:`~.saved.fit_settings`), else compare's default."""
    d = CompareConfig()
    fitted = fit_settings(args.adapter_dir)
    recorded = {**{k: getattr(d, k) for k in FIT_SETTINGS}, "seed": d.seeds[0], **fitted}
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "dataset" in fitted and given.get("dataset", fitted["dataset"]) != fitted["dataset"]:
        # the fit's model and multiple-choice settings come with its record: another kind of set would be refused
        # naming those flags, which were never given
        data_dir = given.get("data_dir", recorded["data_dir"])
        try:  # each set's task in words ("multiple-choice")
            then = load_meta(fitted["dataset"], data_dir)["task"].replace("_", "-")
        except ValueError:  # the fit's set is not in this datasets folder: its kind is unknown here
            then = None
        now = load_meta(given["dataset"], data_dir)["task"].replace("_", "-")
        if then is not None and then != now:
            raise ValueError(f"the adapter in {args.adapter_dir} was fitted on {fitted['dataset']!r}, a {then} set (its fit's "
                             f"run.json), and --dataset {given['dataset']} is a {now} set, which that adapter's model and "
                             f"head do not score: bayesianize it on a {then} set, or fit an adapter on {given['dataset']}")
    return _config(argparse.Namespace(**{**recorded, **given}), guides=("tfb",), ts=False)


def _init_distributed():
    """Join the process group of torchrun / accelerate (one process per GPU) when launched by one."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(minutes=30))


def main(argv=None):
    """Run the command line; an error the library raises is one line, ``pyro-lora: error: ...``, exit status 2
    (the traceback with ``--debug``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["compare", *argv]  # compare is the default command, with its flags too
    try:
        load_plugins()
    except Exception as error:  # noqa: BLE001 -- an installed plugin that fails is one line too
        print(f"pyro-lora: error: a pyro_lora.methods plugin failed to load: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    # --full: compare's other defaults (shown by --help too); flags given with it still win
    ap = parser(full=argv[0] == "compare" and "--full" in argv)
    args = ap.parse_args(argv)
    if args.command == "bayesianize" and args.low >= args.high:
        ap.commands["bayesianize"].error(f"--low {args.low} must be below --high {args.high}")
    debug, shown = getattr(args, "debug", False), warnings.showwarning
    if not debug:  # each text once per command: a note repeated per method and seed buried the table
        warnings.showwarning = functools.partial(_one_line_warning, seen=set())
    try:
        with _transformers_logging(quiet=getattr(args, "quiet", False)):
            return _run(args, argv)
    except KeyboardInterrupt:  # Ctrl-C: say what is kept, not a traceback
        if debug:
            raise
        print(f"pyro-lora: interrupted: {_kept(args.command)} (--debug shows where it stopped)", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 -- every library error reaches the user as one line
        if debug:
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, OSError) and error.errno is not None:  # the system's: a full disk mid-run, not a refusal
            first += f"; {_kept(args.command)}"
        print(f"pyro-lora: error: {first} (--debug shows where)", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown


@contextlib.contextmanager
def _transformers_logging(quiet: bool):
    """With ``quiet`` (``--quiet``), transformers logs errors only within the block (no load reports, no "Token indices
    sequence length" notes), its verbosity restored after."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _kept(command) -> str:
    """What a run of ``command`` stopped midway (Ctrl-C, a full disk) leaves."""
    if command in ("compare", "study"):
        return "the (method, seed) results that finished are kept, and the same command resumes the rest"
    return "every write is atomic: no file was left half-written"


def _one_line_warning(message, category, filename, lineno, file=None, line=None, seen=None):
    """A warning as one line, like errors, its category named unless a plain UserWarning (``--debug`` shows Python's
    form, with the source line); a text already in ``seen`` is not shown again, and under torch.distributed only rank
    0 shows it (every rank runs the same checks on the same data: each said it once more)."""
    if not is_main():
        return
    kind = "" if category is UserWarning else f"{category.__name__}: "
    text = f"pyro-lora: warning: {kind}{message}"
    if seen is None or text not in seen:
        print(text, file=sys.stderr)
        if seen is not None:
            seen.add(text)


def _verdict(out):
    """The verdict on the rows of the run in ``out`` that its table averages, recomputed from them (one stored by older
    code misses what the verdict says now), after a blank line ("" where there are none): the seeds each summary row
    names, not rows the run withheld (no arrays to check them by, of a seed outside ``--seeds``)."""
    saved = read_record(out, "choose another --out")
    if not saved:
        return ""
    rows = saved["per_seed"]
    if "summary" in saved:  # a record without one (hand-made) is judged whole
        averaged = {(r["guide"], r["dataset"]): set(r.get("seeds") or ()) for r in saved["summary"]}
        rows = [r for r in rows if r["seed"] in averaged.get((r["guide"], r["dataset"]), ())]
    text = verdict(rows, saved["config"]["dataset"], saved["config"].get("eval_datasets", ()))
    return "\n" + text if text else ""


def _run(args, argv=()):
    _init_distributed()
    say = print if is_main() else (lambda *a, **k: None)
    if args.command in (None, "compare"):
        try:
            rows = run_compare(_config(args, guides=getattr(args, "guides", None)), overwrite=getattr(args, "overwrite", False))
        except GuideFailures as failures:  # the finished guides' table first, then the one-line error
            say(format_table(failures.summary) + ("\n" + failures.verdict if failures.verdict else ""))
            raise
        say(format_table(rows) + _verdict(args.out))
        say(f"results: {Path(args.out) / 'results.json'}")
    elif args.command == "fit":
        config = _config(args, guides=(args.guide,), ts=False)
        row = fit_one(config, adapter=args.adapter, overwrite=args.overwrite)
        say(format_table([row]))
        # "guide:", not "saved:": a rerun of a finished run skips it and writes nothing
        say(f"guide: {Path(args.out) / 'guide'}" + (f", adapter: {Path(args.out) / 'guide' / 'adapter'}" if args.adapter else ""))
    elif args.command == "bayesianize":
        search = {k: getattr(args, k) for k in ("criterion", "tolerance", "low", "high", "iterations", "spacing")}
        row = bayesianize_adapter(_bayesianize_config(args), args.adapter_dir, anchors=args.anchors, overwrite=args.overwrite,
                                  **search)
        say(format_table([row]))
        say(f"sigma_q = {row['sigma_q']:.5g}; guide: {Path(args.out) / 'guide'}")
    elif args.command == "study":
        return study.main(args, _study_overrides(args), study.command_line(argv))
    elif args.command == "evaluate":
        overrides = {k: getattr(args, k) for k in ("test_size", "samples", "device", "data_dir") if getattr(args, k) is not None}
        row = evaluate_saved(args.run_dir, progress=not args.quiet and is_main(), **overrides)
        say(format_table([row]))
        say(f"scored on {row['test_examples']} test examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
