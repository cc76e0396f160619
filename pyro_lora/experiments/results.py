"""The output folder of a comparison run, written as each (guide, seed) finishes, so that nothing finished is lost.

``results.json`` (config, per-seed rows, summary, failed guides), ``predictions_<guide>.npz``,
``reliability_<guide>.png``, and at the run's end the two summary figures (:meth:`RunFolder.redraw`). Every file
goes through the atomic writer: a kill leaves the previous complete file, and ``results.json``, written after a
(guide, seed)'s arrays and diagram, is the record of what is complete.
"""

import datetime
import functools
import json
import math
import os
import traceback
import warnings
import zipfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from ..guides.registry import METHODS, VALIDATION_TUNED, join_notes
from ..digests import bytes_sha256
from ..data import resolve_data_dir
from ..distributed import is_main, world_size
from ..checks import not_a_file
from ..io import atomic_file, check_file_slot, copy_file, read_safetensors, standard_json, write_json
from ..locking import FolderLocked, folder_lock, locked_elsewhere
from ..model_files import local_model_path, model_files_stamp
from .plots import metric_scatter, reliability_diagram, reliability_grid
from .scoring import array_ood_auroc, array_scores
from .setup import ADDED_SETTINGS, BASE_DIGEST_VERSION, CLOZE_SCORING, resolved_default, state_digest
from .table import base_guide, check_one_row_each, seed_list, ts_name
from .verdict import REFERENCE, verdict
from .versions import left_out_text, method_version, of_other_version, older_versions, row_version, split_versions, versions_of
from ..callers import user_stacklevel

RESULTS = "results.json"
SIDECAR = "study_run.json"  # next to results.json where the study made the run: its commands, machine, wall time
NEXT_SIDECAR = ".study_run.next.json"  # a replacing study's sidecar, the SIDECAR once its first result replaces the run
# the files of a run --overwrite replaces, listed while they are deleted: a kill then leaves the list, which the next
# run in the folder finishes (its results.json went first, so nothing else names them)
REPLACING = ".replacing.json"
MERGING = ".merging"  # in a run's folder while merge_results copies a rerun in; names the rerun folder
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)  # what np.load raises for a missing or broken npz
ARRAYS = ("probs", "labels", "entropy", "mutual_information")  # per evaluation set and seed in predictions_<guide>.npz
# settings a resumed run may change: what is run (guides, seeds), where it is written, and the bars
_RESUMABLE = ("guides", "seeds", "out", "progress")


class Flags(NamedTuple):
    """How a refusal names its remedies in the command that met it: ``folder``, the flag of another run folder;
    ``overwrite``, the one that replaces a run of another configuration; ``rescore``, how to rerun every row of a run
    on the base model and records there now (a digest refusal: the configuration is the same, so ``--force`` does
    not replace it under the study)."""

    folder: str
    overwrite: str
    rescore: str


COMPARE_FLAGS = Flags("--out", "--overwrite", "pass --overwrite to replace the run")
STUDY_FLAGS = Flags("--runs", "--force", "rerun every row on the --model and records there now: "
                    "`pyro-lora study --update map` with the same flags")



def now():
    """The local time as the study's records write it, ``2026-12-01T05:55:44+00:00``."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")

# how compare seeds its predictives (run.json's "predict_seeding", results.json's per row name): 1, a seed per
# evaluation set (weight samples drawn apart for the test and the shifted sets: OOD AUROC compared two draws); 2, one
# seed for every set (common random numbers). A record without it is 1.
PREDICT_SEEDING = 2

# the entries of a per-seed row that are not scores: every other entry is a number, or null where it is n/a
ROW_NAMES = ("guide", "dataset", "seed", "note", "setting", "method_version")
# the config entries the readers of a record take as given (a resume, a merge, the study's report and header)
CONFIG_KEYS = ("dataset", "model", "guides", "seeds", "train_size", "test_size", "val_fraction", "epochs", "batch_size",
               "samples", "max_length", "lr", "eval_datasets")


def is_seeding(value) -> bool:
    """Whether ``value`` is a :data:`PREDICT_SEEDING` a record may hold (an integer from 1 to it)."""
    return type(value) is int and 1 <= value <= PREDICT_SEEDING


def recorded_seeding(saved) -> dict:
    """Row name -> the :data:`PREDICT_SEEDING` its rows in the record ``saved`` were scored under (the oldest, where
    a resume added rows of another), for every row name with rows; 1 where the record keeps none."""
    value = saved.get("predict_seeding", 1)
    names = dict.fromkeys(r["guide"] for r in saved.get("per_seed", []))
    return {g: (value.get(g, 1) if isinstance(value, dict) else value) for g in names}


def recorded_base(saved) -> str | None:
    """The base model digest the run record ``saved`` keeps, if in this version's form (:func:`~.setup.base_digest`):
    one of an older form cannot be compared with a digest now, and is taken as none."""
    return saved.get("base") if saved.get("base_version") == BASE_DIGEST_VERSION else None


def recorded_scoring(saved) -> int | None:
    """The cloze scoring form the run record ``saved``'s rows were computed with (:data:`~.setup.CLOZE_SCORING`; 0 for
    a cloze record from before it was kept), None for a run that scores no cloze."""
    if saved.get("scoring") is not None:
        return saved["scoring"]
    # rows of a cloze run written without a form (before it was kept): form 1, or form 0 before 2026-12-02; the older
    return 0 if saved.get("config", {}).get("mc_format") == "cloze" and saved.get("per_seed") else None


def _scorings_agree(old, new, since) -> bool:
    """Whether rows of cloze scoring forms ``old`` and ``new`` are the same rows for a run none of whose changes since
    form ``since`` touch (:func:`~.setup.scoring_since`; ``None``: unknown)."""
    return None not in (old, new, since) and since <= min(old, new)


def scoring_refused(old, new, since) -> bool:
    """Whether rows of cloze scoring form ``new`` may not join a run's rows of form ``old`` (:func:`recorded_scoring`):
    the forms differ and a change since touches the run (:func:`_scorings_agree`; ``since`` None: unknown, every change
    counts). What a resume checks (:meth:`RunFolder.check_scoring`) and the study's header says of a run."""
    return old != new and not _scorings_agree(old, new, since)


def scoring_of(config) -> int | None:
    """The cloze scoring form a run of ``config`` (its ``mc_format`` resolved) computes its rows with."""
    return CLOZE_SCORING if config.mc_format == "cloze" else None


def map_name(seed) -> str:
    """The name of the file that keeps the trained MAP of ``seed`` in a run's folder."""
    return f"map_seed{seed}.safetensors"


def summarize_seeds(rows):
    """Mean and std over seeds of every numeric column, per (guide, evaluation set): ``x`` and ``x_std``.

    The seeds' ``note`` entries are kept: ``"seeds 0, 2: <note>"`` per distinct note, joined by ``"; "``.
    A value that is not available (NaN, None: JSON null, or missing from a seed's row) in any seed makes the column's
    mean and std NaN:
    n/a, not a mean over the seeds that happen to have it. It is written to ``results.json`` as ``null``.

    :raises ValueError: for rows repeating a (guide, dataset, seed), which would count as one more seed.
    """
    check_one_row_each(rows)
    groups = {}
    for r in rows:
        groups.setdefault((r["guide"], r["dataset"]), []).append(r)
    summary = []
    for (guide, dataset), group in groups.items():
        row = {"guide": guide, "dataset": dataset, "seeds": [r["seed"] for r in group]}
        if "setting" in group[0]:
            row["setting"] = group[0]["setting"]
        notes = {}
        for r in group:
            if r.get("note"):
                notes.setdefault(r["note"], []).append(str(r["seed"]))
        if notes:
            row["note"] = "; ".join(f"{seed_list(s)}: {n}" for n, s in notes.items())
        keys = dict.fromkeys(k for r in group for k in r)  # every seed's columns: a resumed older run may lack some
        for key in keys:
            if key in ROW_NAMES:
                continue
            values = np.array([r.get(key) for r in group], dtype=float)  # None (JSON null) or missing -> NaN
            with np.errstate(invalid="ignore"):  # an infinity's std is NaN, n/a as the mean is: no RuntimeWarning
                row[key] = float(values.mean())
                row[key + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary.append(row)
    return summary


def failed_run(record) -> str:
    """A ``failed`` record of ``results.json`` as the messages name it: ``laplace (seed 0)``, ``laplace (seed 0, on
    shift_a)`` for a failure scoring one shifted set (the method's other rows kept)."""
    where = f", on {record['dataset']}" if record.get("dataset") else ""
    return f"{record['guide']} (seed {record['seed']}{where})"


def row_names(ts, name) -> list:
    """The row names method ``name`` gives in a run with ``+ts`` rows or not (its config's ``ts``): its own and, where
    ``ts`` and the method allows it, its ``+ts`` row."""
    method = METHODS.get(name)
    return [name, ts_name(name)] if ts and method is not None and method.ts else [name]


def is_complete(rows, arrays, guide, seed, datasets) -> bool:
    """Whether the row name ``guide`` under ``seed`` has a row in ``rows`` (a run's per-seed rows) for every
    evaluation set in ``datasets``, none made by another version of its method (:func:`of_other_version`), and its
    arrays in ``arrays`` (its
    ``predictions_<guide>.npz``, by key)."""
    mine = [r for r in rows if r["guide"] == guide and r["seed"] == seed]
    if any(of_other_version(r) for r in mine):
        return False
    return set(datasets) <= {r["dataset"] for r in mine} and all(f"{d}__seed{seed}__{kind}" in arrays
                                                                 for d in datasets for kind in ARRAYS)


def unfinished_runs(out, rows, guides, seeds, datasets, ts) -> list:
    """The (method, seed) of ``guides`` x ``seeds`` (seed-major) that the run in the folder ``out``, whose per-seed
    rows are ``rows``, does not hold complete: a row name of it (:func:`row_names`; its ``+ts`` row too) lacks a row
    on some set of ``datasets`` or its arrays, or has rows of another version of its method (:func:`is_complete`;
    a method's rows of any seed of ``rows`` in another version count too, after ``seeds``: they would be averaged
    with the rows a resume adds). The one meaning of finished: what a resume
    reruns (compare, the study) and what the study's report calls unfinished. ``out`` None (a record not read from
    its folder): the rows alone are judged."""
    arrays = {}  # row name -> its npz's arrays, read once

    def complete(name, seed):
        if name not in arrays:
            arrays[name] = _read_arrays(out, name) if out is not None else _AnyKey()
        return is_complete(rows, arrays[name], name, seed, datasets)

    older = older_versions(rows, guides)
    seeds = list(dict.fromkeys([*seeds, *(s for g in guides for s in older.get(g, ([], []))[0])]))
    return [(g, s) for s in seeds for g in guides if not all(complete(r, s) for r in row_names(ts, g))]


# how far a stored score may be from its arrays scored again (check_scores): the same functions on the same stored
# values give it again up to a reduction's order of summation (~1e-16 relative), and JSON keeps a float exactly; rel
# 1e-5 also passes arrays stored in float32 from float64 scores (6e-8 relative each; a mean moves less), while a hand
# edit or another run's numbers differ in the digits a table shows (1e-3, 1e-4). abs 1e-7: scores near 0 (MI, ECE)
SCORE_RTOL, SCORE_ATOL = 1e-5, 1e-7
# what a score computed before a change of its definition may differ by: the error says so for such a field
_REDEFINED = {
    **dict.fromkeys(("aurc", "accuracy_at_50", "accuracy_at_80"), "before 2026-12-05 selective prediction ranked ties "
                    "otherwise (commits 4210797, 9f842bd)"),
    **dict.fromkeys(("ood_auroc_entropy", "ood_auroc_mi"), "before 2026-12-05 and again before 2026-12-06 the AUROC "
                    "ranked float ties otherwise (commits 6357e23, 88e5b06)"),
    **dict.fromkeys(("accuracy", "ece"), "before 2026-12-03 a tie at the top counted 0 or 1 and float32 confidences "
                    "were binned in float64 (commits f1b27f2, d3a066c)"),
}


def check_scores(out, rows, dataset, rerun=lambda row: False) -> list:
    """Refuse a per-seed row of ``rows`` (a run's, kept in the folder ``out``; ``dataset``: its in-distribution test
    set) whose scores are not what its own arrays in ``predictions_<guide>.npz`` give (:func:`~.scoring.array_scores`,
    and for a shifted set's row :func:`~.scoring.array_ood_auroc` against the test set's arrays of its seed), beyond
    float rounding (:data:`SCORE_RTOL`, :data:`SCORE_ATOL`): a hand-edited row, or one copied from another run, was
    shown, averaged and judged by the verdict as this run's. Every row is checked, whatever its seed; a field a row
    lacks (written before it was kept) is not. Each npz is read once.

    Returns the rows withheld, which no caller averages, shows or judges: those it cannot check (their arrays, or for
    a shifted set's row the test set's, missing or incomplete: unfinished), and those ``rerun`` picks (the caller
    reruns them, replacing them) that their arrays contradict, which are not refused.

    :raises ValueError: naming the folder, the row (method, set, seed), the field, both values and how to rerun it;
        or naming arrays that are no prediction (of another dtype or shape, the entropy not the probs', or
        :mod:`~pyro_lora.metrics`' refusal).
    """
    out, arrays, withheld = Path(out), {}, []
    for row in rows:
        name, on, seed = row["guide"], row["dataset"], row["seed"]
        if name not in arrays:
            arrays[name] = _read_arrays(out, name)
        saved, key, test = arrays[name], f"{on}__seed{seed}__", f"{dataset}__seed{seed}__"
        if not all(k + kind in saved for kind in ARRAYS for k in {key, test}):
            withheld.append(row)
            continue
        where = f"{out / RESULTS}: the row of {name} on {on}, seed {seed}"
        try:
            _check_derived(row, saved.get(key + "extra_parameters"), where, name, seed)
        except ValueError:
            if rerun(row):  # rerun, replacing it, as a row its arrays contradict
                withheld.append(row)
                continue
            raise
        try:
            scores = array_scores(*(saved[key + kind] for kind in ARRAYS))
            if on != dataset:
                scores.update(array_ood_auroc(saved[test + "probs"], saved[key + "probs"],
                                              saved[test + "mutual_information"], saved[key + "mutual_information"]))
        except ValueError as error:
            if rerun(row):
                withheld.append(row)
                continue
            raise ValueError(f"{where}: its arrays in predictions_{name}.npz are no prediction ({error}); "
                             f"{_rerun_advice(name, seed)}") from None
        for field, value in [(f, v) for f, v in scores.items() if f in row]:
            stored = math.nan if row[field] is None else row[field]  # null: n/a, written for NaN
            if not (math.isclose(stored, value, rel_tol=SCORE_RTOL, abs_tol=SCORE_ATOL)
                    or math.isnan(stored) and math.isnan(value)):
                if rerun(row):
                    withheld.append(row)
                    break
                older = (f" (or it was scored by an older pyro_lora: {_REDEFINED[field]}; such a row cannot be "
                         "recomputed under its own definition)" if field in _REDEFINED else "")
                raise ValueError(f"{where} holds {field} {stored!r} where its own arrays in predictions_{name}.npz give "
                                 f"{value!r} (more than float rounding: relative {SCORE_RTOL:g}): the row was edited or "
                                 f"copied from another run, and would be shown and averaged as this run's{older}; "
                                 f"{_rerun_advice(name, seed)}")
    return withheld


def _check_derived(row, extra_parameters, where, name, seed) -> None:
    """Refuse a row whose setting is not its method's (:attr:`~pyro_lora.guides.Method.setting`; a ``+ts`` row's is
    validation-tuned) or whose ``extra_parameters`` is not the count saved beside its arrays (runs before it was
    saved there: not compared): both move the verdict, which reads the setting, or the table without a word."""
    method = METHODS.get(base_guide(name))
    expected = VALIDATION_TUNED if name != base_guide(name) else method.setting if method is not None else None
    if "setting" in row and expected is not None and row["setting"] != expected:
        raise ValueError(f"{where} holds setting {row['setting']!r}, where the method's is {expected!r}: the row was "
                         f"edited or copied from another run; {_rerun_advice(name, seed)}")
    if extra_parameters is not None and "extra_parameters" in row and row["extra_parameters"] != int(extra_parameters):
        raise ValueError(f"{where} holds extra_parameters {row['extra_parameters']!r}, where its arrays in "
                         f"predictions_{name}.npz record {int(extra_parameters)}: the row was edited or copied from "
                         f"another run; {_rerun_advice(name, seed)}")


def withheld_text(out, withheld) -> str:
    """The warning naming the rows ``withheld`` by :func:`check_scores` for want of their arrays in the run ``out``."""
    names = "; ".join(f"{r['guide']} on {r['dataset']}, seed {r['seed']}" for r in withheld)
    return (f"{Path(out) / RESULTS}: the rows of {names} have no arrays in their predictions_<method>.npz to check "
            "them by: withheld as unfinished (not shown, averaged nor judged); run their seeds again (the same command "
            "reruns the run's --seeds) or remove them from results.json's per_seed")


def without(rows, withheld) -> list:
    """``rows`` but those of ``withheld`` (the same row objects: :func:`check_scores`' return)."""
    gone = set(map(id, withheld))
    return [r for r in rows if id(r) not in gone]


def _rerun_advice(name, seed) -> str:
    return (f"rerun it: remove the rows of {name} under seed {seed} from results.json's per_seed (or delete "
            f"predictions_{name}.npz: every seed of it is rerun) and run the same `pyro-lora compare` or `pyro-lora "
            f"study` again, which reruns what is missing; or, in a study's run, `pyro-lora study --update "
            f"{base_guide(name)}` with its flags")


class _AnyKey:
    """Holds every key: the arrays of a record judged without its folder."""

    def __contains__(self, key):
        return True


def _read_arrays(out, guide) -> dict:
    """The arrays of ``out/predictions_<guide>.npz`` by key; ``{}`` where it is missing or no npz (its rows are redone)."""
    try:
        with np.load(Path(out) / f"predictions_{guide}.npz") as saved:
            return dict(saved)
    except _UNREADABLE:
        return {}


class GuideFailures(RuntimeError):
    """Some (guide, seed) runs of a comparison failed; the others are written. ``summary`` holds their rows and
    ``verdict`` the paragraph on them ("" where the run has none: an ``--overwrite`` that failed before its first
    result keeps the replaced run's record, which is not this run's)."""

    def __init__(self, message, summary, verdict=""):
        super().__init__(message)
        self.summary, self.verdict = summary, verdict


class RunFolder:
    """The folder ``out`` of one comparison run, kept complete after every finished (guide, seed).

    Opening a folder that holds a run of the same configuration (all but guides, seeds, output folder and
    progress bars) resumes it: :meth:`complete` says which (guide, seed) are done. A folder holding another
    configuration is refused, unless ``overwrite`` (then its files are deleted).

    :param config: the run's :class:`~pyro_lora.experiments.compare.CompareConfig`, as requested (defaults such as the
        learning rate may be resolved later; :meth:`write` records the resolved values).
    :param flags: how its refusals name their remedies (:data:`COMPARE_FLAGS`; the study's: :data:`STUDY_FLAGS`).
    :raises ValueError: if ``out`` holds a run of another configuration, or a ``results.json`` that is not one.
    """

    def __init__(self, out, config, overwrite=False, flags=COMPARE_FLAGS):
        self.out, self.config, self.flags = Path(out), config, flags
        self.environment = environment()
        self.environments = [self.environment]  # every one whose rows the record holds, oldest first
        self.ranks = world_size()  # torch.distributed's: each rank trains on batches of batch_size, a step on all
        self._mixed = None  # the note of rows added to rows made in another environment
        self.request = asdict(config)
        self.rows, self.failed, self.guides, self.seeds = [], [], [], []
        self.sizes = None  # examples used per split (``Setup.sizes``), once a seed has loaded its data
        self._added = set()  # guides this process added rows for
        self._drawn = set()  # row names (a method, its +ts) whose reliability diagram this process drew
        self._pending_maps = {}  # seed -> MAP file bytes, kept while a replaced run's files stand (:meth:`save_map`)
        self.maps = {}  # seed (a string, as JSON keys are) -> digest of the MAP its rows start from
        self.data = None  # digest of the records its rows were scored on (:func:`~.setup.data_digest`)
        self.data_sets = None  # evaluation set -> digest of its records (:func:`~.setup.set_digests`)
        self.base = None  # digest of the base model's weights they were scored with (:func:`~.setup.base_digest`)
        self.model_moved = False  # whether --model names another path, or other files, than its rows were scored with
        self.model_files = model_files_stamp(config.model)  # names, sizes and times of those files, none read
        self.seeding = {}  # row name -> the oldest seeding of its rows (:func:`recorded_seeding`)
        self.labels = None  # evaluation set -> the label names its rows were scored under (:func:`~.setup.label_names`)
        self.scoring = None  # the cloze scoring form of its rows (:func:`recorded_scoring`)
        self.scoring_since = None  # the oldest form whose rows equal them (:func:`~.setup.scoring_since`)
        self._finish_replacing()
        self._check_writable(config.guides or ())
        saved = self._read()
        self._replaced = saved if overwrite else None  # its files go once this run writes its first result
        if saved is not None and not overwrite:
            self._check_same(saved)
            # a record from before the number was kept holds rows of an unknown number: not compared, and never
            # stamped with this run's
            self.ranks = saved.get("ranks") if saved["per_seed"] else self.ranks
            self.rows, self.failed, self.sizes = saved["per_seed"], saved.get("failed", []), saved.get("sizes")
            self.maps, self.data, self.base = dict(saved.get("maps", {})), saved.get("data"), recorded_base(saved)
            # compared by path and files' stamp here, as a record without the base's digest is (where it has one, the
            # digest decides: a checkpoint replaced at the same path, a file touched)
            self.model_moved = "model" in config_differences({k: saved[k] for k in ("config", "request") if k in saved},
                                                             {"model": config.model}) \
                or saved.get("model_files") not in (None, self.model_files)
            self.data_sets = saved.get("data_sets")
            self.labels, self.scoring = saved.get("labels"), recorded_scoring(saved)
            self.scoring_since = saved.get("scoring_since")
            self.seeding = recorded_seeding(saved)
            self.guides, self.seeds = list(saved["config"]["guides"] or ()), list(saved["config"]["seeds"])
            self._check_environment(saved)
        self._saved = saved if not overwrite else None  # the record as read, until this process writes one
        self._withheld = []  # rows check_scores could not check, or that a rerun replaces: never averaged

    def _read(self):
        return read_record(self.out, "move it away or choose another --out (a run is replaced only where its record can be "
                           "read: it names the files to delete)")

    def _check_writable(self, guides):
        """Refuse, before any work, a folder or link where one of the run's files goes."""
        names = [RESULTS, *(f"{kind}.png" for kind in SUMMARY_FIGURES), *map(map_name, self.config.seeds)]
        names += [f"{kind}_{g}.{ext}" for name in guides for g in (name, ts_name(name))
                  for kind, ext in (("predictions", "npz"), ("reliability", "png"))]
        for name in names:
            check_file_slot(self.out / name, "the run writes a file: move it or choose another --out")

    def _remove_replaced(self):
        """Delete the files of the run ``--overwrite`` replaces, but those this run wrote already: only once the new
        run has a finished result (a kill, or failures, before keep the old run)."""
        saved, self._replaced = self._replaced, None
        if saved is None or not is_main():
            return
        # results.json first: a kill from here until the new one is written leaves no record, never the old record
        # beside new files
        names = [RESULTS, *(f"{kind}.png" for kind in SUMMARY_FIGURES), SIDECAR]  # the sidecar: the old run's story
        for name in saved["config"].get("guides") or ():
            for guide in (name, ts_name(name)):
                if guide not in self._added:
                    names += [f"predictions_{guide}.npz", f"reliability_{guide}.png"]
        # every MAP file there is the old run's (this run's wait in _pending_maps): one of a seed killed before its first
        # row is in no list of the record, and was loaded for that seed of the new run, its rows beside the new MAPs'
        names += [p.name for p in self.out.glob(map_name("*"))]
        write_json(self.out / REPLACING, names)
        self._finish_replacing()
        if (self.out / NEXT_SIDECAR).is_file():  # the replacing study's record, marked running
            os.replace(self.out / NEXT_SIDECAR, self.out / SIDECAR)
        for seed, data in self._pending_maps.items():
            with atomic_file(self.map_file(seed), "wb") as f:
                f.write(data)
        self._pending_maps = {}

    def _check_environment(self, saved):
        """Warn, and note on the rows this run adds, where the record's rows were made with other code or library
        versions (:func:`environment`): a resume after an update would average rows of two versions without a word
        (a method's own version, :func:`~.versions.method_version`, follows its own changes only)."""
        known = _environments(saved)
        if not known or not self.rows:  # a record from before environments were kept: not known
            return
        self.environments = known + ([self.environment] if self.environment not in known else [])
        if len(self.environments) < 2:
            return
        self._mixed = ("added to rows made with other pyro_lora code or library versions (results.json's environments): "
                       "the means mix them; --overwrite reruns them all")
        last = known[-1]
        if last == self.environment:  # said when the rows of this one were first added
            return
        differ = _library_differences(last, self.environment, "now")
        differ += ["pyro_lora's code differs"] if last.get("code") != self.environment.get("code") else []
        warnings.warn(f"{self.out / RESULTS} holds rows made in another environment than this run's ({'; '.join(differ)}): "
                      "the rows it adds are averaged with them, and their note says so; --overwrite reruns them all",
                      stacklevel=user_stacklevel())

    def check_ranks(self):
        """Refuse, before a run adds rows here, rows of a run trained on another number of torch.distributed ranks:
        each step there took batch_size examples on every rank (and dropped another remainder of batches), so its rows
        are of another training. Reading the folder is fine (a finished run lists nothing left to run). A record from
        before the number was kept is not compared."""
        ranks, now = self.ranks, world_size()
        if ranks is not None and ranks != now and self.rows:
            def said(n):
                return "one process" if n == 1 else f"{n} ranks (torch.distributed)"

            raise ValueError(f"{self.out} holds a run trained on {said(ranks)}, and this run has {said(now)}: "
                             "each optimizer step takes batch_size examples on every rank, so rows of the two are of "
                             f"other trainings; rerun on {said(ranks)}, choose another {self.flags.folder}, or pass "
                             f"{self.flags.overwrite} to replace that run")

    def _finish_replacing(self):
        """Delete the files :data:`REPLACING` lists (a replaced run's, a kill cut their deletion short), then the list."""
        marker = self.out / REPLACING
        if not is_main() or not marker.is_file():
            return
        for name in json.loads(marker.read_text()):
            (self.out / name).unlink(missing_ok=True)
        marker.unlink()

    def _check_same(self, saved):
        differ = [f"{k} {there!r} there, {now!r} now" for k, (there, now) in config_differences(saved, self.request, _RESUMABLE).items()]
        if differ:
            raise ValueError(
                f"{self.out} holds a run of another configuration ({'; '.join(differ)}): a rerun there resumes only the "
                f"same configuration; choose another {self.flags.folder}, or pass {self.flags.overwrite} to replace that run"
            )

    def check_data(self, digest, sets=None):
        """Refuse to add rows scored on other records than those of the rows here (``digest``: the
        :func:`~pyro_lora.experiments.setup.data_digest` of the data folder now; ``sets``: its
        :func:`~pyro_lora.experiments.setup.set_digests`, which name the sets whose records changed), and keep both as
        the run's; a record from before digests were kept is taken as it is, with a warning, and keeps none; one from
        before per-set digests is refused naming every set it could be."""
        refusal = (f"holds rows scored on other records than {self.config.data_dir} gives now ({self._changed_sets(sets)}): "
                   "restore that data") if self.data not in (None, digest) else ""
        self._check_digest("data", digest, "the data its rows were scored on", refusal)
        if self.data == digest:
            self.data_sets = sets

    def _changed_sets(self, sets):
        """Which sets' records changed since the run's rows were scored, in words."""
        c = self.config
        def words(name):
            return f"the {name} train, validation or test records" if name == c.dataset else f"the {name} test records"
        if self.data_sets and sets and set(self.data_sets) == set(sets):
            return " and ".join(words(n) for n in sets if sets[n] != self.data_sets[n]) + " changed since"
        names = [c.dataset, *c.eval_datasets]  # a record from before per-set digests: one digest for every set
        return (f"{' or '.join(map(words, names))} changed since; its record, written by an older version, keeps one "
                f"digest for {'all its sets' if len(names) > 1 else 'them'}")

    def check_labels(self, names):
        """As :meth:`check_data` for the label names of the run's sets (``names``: :func:`~.setup.label_names` of the
        data folder now: the records' label indices may mean other classes, or the head be of another width)."""
        self._check_digest("labels", names, "the label names its rows were scored under", (
            f"holds rows scored under other label names than the meta.json files under {self.config.data_dir} give now "
            f"({self.labels} there, {names} now): restore those files"))

    def check_base(self, digest):
        """As :meth:`check_data` for the base model (``digest``: the :func:`~pyro_lora.experiments.setup.base_digest`
        of the network ``--model`` loads now: a folder may hold another checkpoint since)."""
        self._check_digest("base", digest, "the base model its rows were scored with", (
            f"holds rows scored with another base model than --model {self.config.model} loads now (its weights, "
            "configuration or tokenizer differ: the folder holds another checkpoint since, or the path names another "
            "one): restore that model"))

    def check_scoring(self, config, since=None):
        """Refuse to add rows to a run whose rows were scored by another cloze scoring form than ``config``'s (the
        library's changed since: rows of both forms would be averaged into one mean), unless no change since that form
        touches this run (``since``: :func:`~.setup.scoring_since` of its records; ``None``: unknown, every change
        counts): its old rows are then this form's rows, and are recorded as such."""
        now = scoring_of(config)
        if self.rows and scoring_refused(self.scoring, now, since):
            raise ValueError(f"{self.out / RESULTS} holds rows of another multiple-choice scoring (cloze form {self.scoring} "
                             f"there, {now} now: form 1 scores a choice's tokens within its context, not tokenized alone; form 2 "
                             "divides a per-character score by len(choice), as lm-eval's acc_norm, and keeps one "
                             "truncated context for every choice of a question; form 3 counts WinoGrande's continuation "
                             "whole; form 4 cuts a passage only and asks a lone '_' outside WinoGrande as a question; "
                             "form 5 scores a choice whose start merges with its context's end on the text's own tokens; "
                             "form 0: a record without a form; the run's options or records are touched by a change "
                             "since), which new "
                             f"rows would be averaged with; run into another {self.flags.folder} (or {self.flags.rescore})")
        self.scoring, self.scoring_since = now, since

    def _check_digest(self, key, digest, what, refusal):
        if getattr(self, key) is None and self.rows:  # and stays without one: its old rows were never checked
            warnings.warn(f"{self.out / RESULTS} keeps no digest of {what} (written by an older version): they are not "
                          "checked now", stacklevel=user_stacklevel())
            return
        if getattr(self, key) not in (None, digest):
            raise ValueError(f"{self.out / RESULTS} {refusal}, or run into another {self.flags.folder} (or {self.flags.rescore})")
        setattr(self, key, digest)

    def complete(self, guide, seed, datasets):
        """Whether the row name ``guide`` under ``seed`` has its rows for every evaluation set in ``datasets`` and its
        arrays (:func:`is_complete`)."""
        return is_complete(self.rows, self._arrays(guide), guide, seed, datasets)

    def unfinished(self, guides, seeds):
        """The (method, seed) of ``guides`` x ``seeds`` that a rerun of this run must fit (:func:`unfinished_runs`)."""
        return unfinished_runs(self.out, self.rows, guides, seeds, [self.config.dataset, *self.config.eval_datasets],
                               self.config.ts)

    def rerun_reasons(self, left) -> dict:
        """``(method, seed)`` of ``left`` (:meth:`unfinished`) whose rows of this version the record holds -> why a
        resume reruns them (said, not done without a word): their arrays missing from ``predictions_<method>.npz``
        (written before the rows: the file removed, damaged or replaced since), arrays that contradict them (:meth:`check_scores`
        withheld them), or a row name or set without its row (a kill between them). Call after :meth:`check_scores`."""
        sets, reasons = [self.config.dataset, *self.config.eval_datasets], {}
        for guide, seed in left:
            names = row_names(self.config.ts, guide)
            mine = [r for r in self.rows if r["guide"] in names and r["seed"] == seed and not of_other_version(r)]
            if not mine:
                continue
            held = {name: _read_arrays(self.out, name) for name in names}
            bare = sorted({r["guide"] for r in mine if not all(f"{r['dataset']}__seed{seed}__{kind}" in held[r["guide"]]
                                                                for kind in ARRAYS)})
            if bare:
                reasons[guide, seed] = (f"results.json holds rows of {', '.join(bare)} without their arrays in "
                                        f"{', '.join(f'predictions_{b}.npz' for b in bare)} (removed, damaged or replaced since)")
            elif any(r in self._withheld for r in mine):
                reasons[guide, seed] = ("its arrays in its predictions npz do not give its rows in results.json (other "
                                        "scores, or no prediction)")
            else:
                missing = [f"{name} on {s}" for name in names for s in sets
                           if not any(r["guide"] == name and r["dataset"] == s for r in mine)]
                reasons[guide, seed] = f"results.json lacks its rows of {', '.join(missing)} (a run stopped between them?)"
        return reasons

    def map_file(self, seed) -> Path:
        """The file that keeps the MAP of ``seed`` (``train_map``'s cache): a resumed seed loads it rather than training
        it again."""
        return self.out / map_name(seed)

    def load_map(self, setup, expected=None):
        """Write into ``setup.net`` the MAP this run saved for ``setup.seed`` (``train_map``'s ``load``); returns its
        training seconds, or ``None`` where there is none to use: no file, or one that cannot be read, holds the MAP
        of another configuration, seed or network, or is not the MAP the seed's saved rows started from (its digest
        is not ``expected``, default the one this run recorded), or was trained on other records (the data digest it
        records; one that records none is checked by data folder). All but a missing file are warned: the MAP is
        trained again. While a run ``--overwrite`` replaces still stands, its MAP files are its own: never loaded."""
        path = self.map_file(setup.seed)
        if self._replaced is not None or not path.is_file():
            return None
        expected = expected or self.maps.get(str(setup.seed))
        try:
            tensors = read_safetensors(path, setup.config.device)
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            missing = [k for k in ("seconds", "seed", "config", "digest") if k not in meta]
            if missing:  # e.g. written by another program, or an earlier pyro_lora
                raise ValueError(f"its metadata lacks {', '.join(missing)}")
            seconds, seed, config = float(meta["seconds"]), int(meta["seed"]), json.loads(meta["config"])
            if not isinstance(config, dict):
                raise ValueError(f"its configuration is {config!r}, no JSON object")
        except (ValueError, TypeError) as err:  # json's errors are ValueErrors
            warnings.warn(f"{path} cannot be read ({err}): the MAP of seed {setup.seed} is trained again", stacklevel=user_stacklevel())
            return None
        params = dict(setup.net.named_parameters())
        names = sorted(set(tensors) ^ set(setup.initial_state))
        names += [n for n in tensors if n in params and (tensors[n].shape, tensors[n].dtype) != (params[n].shape, params[n].dtype)]
        # a MAP that records the digests of the records and base it was trained on may come from other folders
        # a base digest of another form than this version's cannot be compared: that MAP is checked by the model's
        # path, as one that records none
        trained_on = meta.get("data")
        trained_from = meta.get("base") if meta.get("base_version") == str(BASE_DIGEST_VERSION) else None
        differ = config_differences(config, setup.config, _RESUMABLE + ("data_dir",) * (trained_on is not None)
                                    + ("model",) * (trained_from is not None))
        digest = state_digest(tensors)
        problem = (f"it holds seed {seed}'s MAP" if seed != setup.seed else
                   f"its tensors {names[:3]} differ from this network's in name, shape or dtype" if names else
                   "it was trained on other records than this run's (its data digest)" if trained_on not in (None, self.data) else
                   "it was trained on another base model than this run's (its base digest)" if trained_from not in (None, self.base) else
                   "it holds the MAP of another configuration (" + "; ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in differ.items()) + ")" if differ else
                   f"its training time {seconds!r} is no number of seconds" if not (math.isfinite(seconds) and seconds >= 0) else
                   "its tensors changed since it was saved" if digest != meta.get("digest") else
                   "it is not the MAP the seed's saved rows started from" if expected not in (None, digest) else
                   "the seed's saved rows record no MAP to check it against" if expected is None and self.has_rows(setup.seed) else None)
        if problem:
            warnings.warn(f"{path} is not used: {problem}; the MAP of seed {setup.seed} is trained again", stacklevel=user_stacklevel())
            return None
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
        return seconds

    def save_map(self, setup, seconds):
        """Keep ``setup``'s trained MAP (adapter and head, with its configuration, seed, training ``seconds`` and
        digest) in :meth:`map_file`, atomically; while a run ``--overwrite`` replaces still stands, in memory until
        this run's first result replaces it (a kill before keeps the old run whole)."""
        if not is_main():
            return
        tensors = {n: t.detach().cpu().contiguous() for n, t in setup.trained_state.items()}
        config = json.dumps(standard_json(asdict(setup.config)))
        meta = {"seconds": repr(float(seconds)), "seed": str(setup.seed), "config": config, "digest": setup.map_digest,
                **{key: value for key, value in (("data", self.data), ("base", self.base)) if value}}
        if self.base:
            meta["base_version"] = str(BASE_DIGEST_VERSION)
        data = save_safetensors(tensors, metadata=meta)
        if self._replaced is not None:
            self._pending_maps[setup.seed] = data
            return
        with atomic_file(self.map_file(setup.seed), "wb") as f:
            f.write(data)

    def record_map(self, seed, digest, confirmed=False):
        """Record ``digest`` as the MAP the rows of ``seed`` start from (in ``results.json`` at once: a kill before the
        seed's next row keeps it), unless the seed has rows of another one; ``confirmed``: the seed's saved MAP rows
        show they came from this MAP (a wrong record is mended)."""
        if str(seed) in self.maps and self.has_rows(seed) and not confirmed:
            return
        changed = self.maps.get(str(seed)) != digest
        self.maps[str(seed)] = digest
        if changed and self.rows and self._replaced is None:  # a run being replaced keeps its record until a result
            self.write()

    def has_other_seeds(self, guide, seed) -> bool:
        """Whether finished rows of ``guide`` under seeds other than ``seed``, of its method's version now, are saved
        (rows ``seed`` adds join them; those of another version are rerun)."""
        return any(r["guide"] == guide and r["seed"] != seed and not of_other_version(r) for r in self.rows)

    def drop_older_versions(self, guides) -> dict:
        """Remove the rows that another version of their method made (:func:`older_versions`) of the methods
        ``guides`` (a resume reruns them): a rerun that fails leaves no old row to be averaged with the new ones.
        Returns :func:`older_versions` of the rows before."""
        older = older_versions(self.rows, guides)
        self.rows = [r for r in self.rows if not (base_guide(r["guide"]) in older and of_other_version(r))]
        return older

    def has_rows(self, seed) -> bool:
        """Whether some finished row of ``seed`` is saved."""
        return any(r["seed"] == seed for r in self.rows)

    def saved_probs(self, guide, seed, dataset):
        """The test probabilities ``[N, C]`` the saved rows of ``guide`` under ``seed`` were scored with on ``dataset``,
        or ``None`` where its row or arrays are not complete."""
        if not self.complete(guide, seed, [dataset]):
            return None
        return self._arrays(guide)[f"{dataset}__seed{seed}__probs"]

    def _arrays(self, guide):
        return _read_arrays(self.out, guide)

    def add(self, guide, seed, rows, arrays, first_seed=None):
        """Record a finished (guide, seed): its ``rows`` (one per evaluation set), npz ``arrays`` and, for the run's
        first seed, ``first_seed = (probs, labels)`` of the in-distribution test set for its reliability diagram."""
        self._track(guide, seed)
        self._added.add(guide)
        # joining its rows of other seeds, the guide keeps their (oldest) seeding; alone, this one's
        self.seeding[guide] = self.seeding.get(guide, PREDICT_SEEDING) if self.has_other_seeds(guide, seed) else PREDICT_SEEDING
        version = method_version(guide)  # what a resume compares (is_complete): rows of another version are rerun
        rows = [r if version is None else {**r, "method_version": version} for r in rows]
        rows = [r if self._mixed is None else {**r, "note": join_notes(r.get("note"), self._mixed)} for r in rows]
        self.rows = [r for r in self.rows if (r["guide"], r["seed"]) != (guide, seed)] + rows
        self._withheld = [r for r in self._withheld if (r["guide"], r["seed"]) != (guide, seed)]
        self.failed = [f for f in self.failed if (f["guide"], f["seed"]) != (guide, seed)]
        if not is_main():
            return
        self._remove_replaced()
        recorded = {f"{r['dataset']}__seed{r['seed']}__" for r in self.rows if r["guide"] == guide}
        kept = {k: v for k, v in self._arrays(guide).items() if k[: k.rindex("__") + 2] in recorded}  # not a replaced run's
        with atomic_file(self.out / f"predictions_{guide}.npz", "wb") as f:
            np.savez_compressed(f, **{**kept, **arrays})
        self.write()  # the summary figures are drawn once, at the run's end (redraw): per add they cost O(methods^2)
        if first_seed is not None and seed == self.seeds[0]:
            probs, labels = first_seed
            figure = self.out / f"reliability_{guide}.png"
            try:  # after the row is written: a figure that cannot be (a full disk) loses no finished result
                reliability_diagram(probs, labels, figure, title=f"{guide} on {self.config.dataset}")
                self._drawn.add(guide)
            except OSError as error:
                warnings.warn(f"{figure} could not be written ({error}); the row of {guide} (seed {seed}) is kept")

    def fail(self, guide, seed, error, dataset=None):
        """Record that ``guide`` failed under ``seed`` with ``error`` (its message and traceback go to results.json):
        on every evaluation set, or on ``dataset`` alone (a shifted set whose scoring failed; the others' rows kept)."""
        self._track(guide, seed)
        self.failed = [f for f in self.failed if (f["guide"], f["seed"]) != (guide, seed)
                       or (dataset is not None and f.get("dataset") not in (None, dataset))]
        self.failed.append({
            "guide": guide, "seed": seed, **({} if dataset is None else {"dataset": dataset}),
            "error": f"{type(error).__name__}: {_first_line(error)}",
            "traceback": "".join(traceback.format_exception(error)),
        })
        if self._replaced is None:  # a run being replaced stays until a result of the new one exists
            self.write()

    def _track(self, guide, seed):
        guide = base_guide(guide)  # config.guides lists methods; a +ts row follows its method's
        if guide not in self.guides:
            self.guides.append(guide)
        if seed not in self.seeds:
            self.seeds.append(seed)

    def summary(self):
        """Mean ± std over seeds per (guide, evaluation set) (:func:`summarize_run`); sorts the run's rows."""
        self.rows.sort(key=_row_order(self.guides, self.seeds))
        return summarize_run(self.averaged(), self.failed)

    def averaged(self) -> list:
        """The rows the summary and the verdict are of: all but those :meth:`check_scores` withheld."""
        return without(self.rows, self._withheld)

    def check_scores(self, rerun=lambda row: False):
        """Refuse a row whose scores are not what its arrays give, and withhold from the summary and verdict those
        it cannot check (:func:`check_scores`; ``rerun``: the rows this run reruns, withheld where their arrays
        contradict them). Warns naming the rows withheld that are not rerun (of a seed outside ``--seeds``)."""
        self._withheld = check_scores(self.out, self.rows, self.config.dataset, rerun)
        kept = [r for r in self._withheld if not rerun(r)]
        if kept and is_main():
            warnings.warn(withheld_text(self.out, kept), stacklevel=user_stacklevel())

    def keep_summary(self):
        """Rewrite the summary and verdict of ``results.json`` where they are not those of its rows, as the run prints
        them: a resume with nothing left to run writes no record, and left a summary edited by hand (or by older code)
        beside the table it printed. The rest of the record stays as read (a config not resolved by a run is not
        written over the resolved one)."""
        if not is_main() or self._saved is None or not self.rows:
            return
        now = json.loads(json.dumps(standard_json({"summary": self.summary(), "verdict": verdict(
            self.averaged(), self.config.dataset, self.config.eval_datasets)})))
        if any(self._saved.get(k) != v for k, v in now.items()):
            write_json(self.out / RESULTS, {**self._saved, **now})

    def write(self):
        """Write ``results.json``."""
        if not is_main():
            return
        self._saved = None  # the record is this process's now: keep_summary has nothing to mend
        summary = self.summary()
        config = {**asdict(self.config), "guides": self.guides, "seeds": self.seeds}
        write_json(self.out / RESULTS, {"config": config, "request": self.request, "sizes": self.sizes, "summary": summary,
                                        "verdict": verdict(self.averaged(), self.config.dataset, self.config.eval_datasets),
                                        "per_seed": self.rows,
                                        "failed": self.failed, "maps": self.maps, "data": self.data,
                                        "data_sets": self.data_sets, "base": self.base,
                                        "base_version": BASE_DIGEST_VERSION, "model_files": self.model_files, "predict_seeding": self.seeding,
                                        "labels": self.labels, "scoring": self.scoring,
                                        "scoring_since": self.scoring_since, "environment": self.environment,
                                        "environments": self.environments, "ranks": self.ranks})

    def redraw(self):
        """Draw, from the npz files, the summary figures (reliability grid, calibration vs accuracy) and the
        reliability diagrams, a method's and its ``+ts`` row's, that this process did not draw (kept from an earlier
        run, or lost to a kill or a full disk there: a figure damaged or missing since is made whole). The end of every
        run calls it, however the run ended."""
        if is_main() and self.seeds and self.rows and self._replaced is None:
            names = dict.fromkeys([*self.guides, *(r["guide"] for r in self.rows)])
            _draw_summary(self.out, self.summary(), self.guides, self.config.dataset, self.seeds[0],
                          each=[g for g in names if g not in self._drawn])

    def raise_failures(self):
        """Raise :class:`GuideFailures` naming every failed (guide, seed) this invocation asked for (its ``--guides``
        and ``--seeds``), if any; a failure the folder keeps from a run of other methods or seeds is warned about,
        naming the flags that resume it (this invocation did all it was asked)."""
        guides, seeds = self.config.guides, self.config.seeds  # None: every one the run holds
        failed = [f for f in self.failed if (guides is None or base_guide(f["guide"]) in guides)
                  and (seeds is None or f["seed"] in seeds)]
        kept = [failed_run(f) for f in self.failed if f not in failed]
        if kept:
            warnings.warn(f"{self.out / RESULTS} keeps failed runs this invocation did not ask for: {', '.join(kept)}; "
                          "add their methods to --guides and their seeds to --seeds to run them again", stacklevel=user_stacklevel())
        if failed:
            done = len({(base_guide(r["guide"]), r["seed"]) for r in self.rows}
                       - {(base_guide(f["guide"]), f["seed"]) for f in self.failed})
            partly = ", and the rows of those that failed on one set only," if any(f.get("dataset") for f in failed) else ""
            by_error = {}  # one error shared by several runs (e.g. a failed MAP) is said once
            for f in failed:
                by_error.setdefault(f["error"], []).append(failed_run(f))
            listed = "; ".join(f"{', '.join(runs)}: {error}" for error, runs in by_error.items())
            where = (f"The run {self.flags.overwrite} was to replace is kept in {self.out}" if self._replaced is not None else
                     f"The {done} finished{partly} are in {self.out / RESULTS} (tracebacks under 'failed'); the runs are "
                     "seeded, so the same command fails them again unless their cause is fixed outside its flags (code, "
                     "packages, memory), and then resumes with them")
            raise GuideFailures(f"{len(failed)} guide run(s) failed: {listed}. {where}", self.summary(),
                                verdict(self.averaged(), self.config.dataset, self.config.eval_datasets))


SUMMARY_FIGURES = ("reliability_grid", "calibration_vs_accuracy")  # a run's figures of every method, <kind>.png


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """What made a run's rows besides its configuration: a digest of pyro_lora's code (its package files) and the
    versions of the libraries that compute them."""
    import peft
    import pyro
    import transformers

    from .. import guides

    roots = [Path(__file__).resolve().parents[1], Path(guides.__file__).resolve().parent]
    files = sorted({p.resolve() for root in roots for p in root.rglob("*.py")})
    code = bytes_sha256(b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in files))
    return {"code": code, "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "pyro": pyro.__version__, "numpy": np.__version__}


def redraw_figures(out, record, to=None) -> bool:
    """Draw again, from the npz files in ``out``, the figures of its run record ``record`` (``results.json``; or as
    the study's report reads it, its summary recomputed from its rows): the summary figures and, unless ``to`` is
    given, the reliability diagram of every method and ``+ts`` row, which a kill after the run's last row left behind it.

    :param to: ``{kind: path}`` for each of :data:`SUMMARY_FIGURES` (the study's report: its own copies, drawn from
        the rows it reports); default the run's own ``out/<kind>.png``.
    :returns: whether the summary figures were drawn (no method has arrays of the run's first seed: none).
    """
    config = record["config"]
    guides = config["guides"] or list(dict.fromkeys(base_guide(r["guide"]) for r in record["per_seed"]))
    names = dict.fromkeys([*guides, *(r["guide"] for r in record["per_seed"])])  # the methods and their +ts rows
    return _draw_summary(Path(out), record["summary"], guides, config["dataset"], config["seeds"][0],
                         each=() if to else list(names), to=to)


def _draw_summary(out, summary, guides, dataset, seed, each=(), to=None):
    """The reliability grid and calibration-vs-accuracy plot of the ``guides`` whose arrays for ``seed`` (the run's
    first) on ``dataset`` are in ``out`` (to ``to[kind]``, default ``out/<kind>.png``); and the reliability diagram
    of each row name in ``each`` (a method or its ``+ts`` row). Returns whether the summary figures were drawn."""
    to = to or {kind: out / f"{kind}.png" for kind in SUMMARY_FIGURES}
    # a method whose summary leaves ``seed`` out (its rows of another version: versions.one_version) is not drawn from its arrays
    held = {r["guide"]: r.get("seeds") for r in summary if r["dataset"] == dataset}  # a record may list no seeds
    first = {}
    for guide in [g for g in dict.fromkeys([*guides, *each]) if held.get(g) is None or seed in held[g]]:
        arrays, key = _read_arrays(out, guide), f"{dataset}__seed{seed}__"
        if key + "probs" in arrays and key + "labels" in arrays:  # else this guide has no finished arrays
            first[guide] = (torch.from_numpy(arrays[key + "probs"]), torch.from_numpy(arrays[key + "labels"]))
    for guide in each:
        if guide in first:
            figure = out / f"reliability_{guide}.png"
            try:  # as a run's add: a diagram that cannot be written does not stop the summary figures
                reliability_diagram(*first[guide], figure, title=f"{guide} on {dataset}")
            except OSError as error:
                warnings.warn(f"{figure} could not be written ({error})", stacklevel=user_stacklevel())
    first = {g: first[g] for g in guides if g in first}  # the summary figures: the methods, not their +ts rows
    rows = [r for r in summary if r["dataset"] == dataset and r["guide"] in first]
    if not (first and rows):
        return False
    reliability_grid(first, to["reliability_grid"])
    metric_scatter(rows, to["calibration_vs_accuracy"])
    return True


def read_record(out, advice, needs=()):
    """The run record ``out/results.json`` (None: there is none).

    :param advice: what the error tells the user to do about a file that is no run record.
    :param needs: the keys the caller reads besides ``config`` and ``per_seed`` (e.g. ``"summary"``).
    :raises ValueError: naming a ``results.json`` that is not UTF-8 JSON with those keys, whose config is not an
        object with the :data:`CONFIG_KEYS`, or whose per-seed row holds a score that is not a number or null (naming
        the row and the entry); or from :func:`finish_merge`, which completes a merge a kill cut short first.
    """
    finish_merge(out)
    return _parse_record(out, advice, needs)


def _parse_record(out, advice, needs=()):
    """:func:`read_record` without finishing a merge first (what :func:`merge_results`, which finishes it, reads)."""
    path = Path(out) / RESULTS
    if not path.is_file():
        if path.exists():  # read as no run, the run would be started afresh beside it
            raise ValueError(f"{path} {not_a_file(path)}, where a run keeps its record: {advice}")
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        [saved[k] for k in ("config", "per_seed", *needs)]  # noqa: B018 -- a KeyError names the missing key
        _check_config(saved["config"])
        maps = saved.get("maps", {})
        if not (isinstance(maps, dict) and all(isinstance(v, str) for v in maps.values())):
            raise ValueError(f"its 'maps' is {maps!r}, not seed -> MAP digest")
        for key, what in (("data", "the run's records"), ("base", "the base model's weights")):
            value = saved.get(key)
            if not (value is None or (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value))):
                raise ValueError(f"its {key!r} is {value!r:.80}, not the SHA-256 digest of {what}")
        seeding = saved.get("predict_seeding", 1)
        schemes = seeding.values() if isinstance(seeding, dict) else [seeding]
        if not all(map(is_seeding, schemes)):
            raise ValueError(f"its 'predict_seeding' is {seeding!r:.80}, not 1 to {PREDICT_SEEDING} (per row name)")
        labels = saved.get("labels")
        if not (labels is None or isinstance(labels, dict) and all(v is None or isinstance(v, list) for v in labels.values())):
            raise ValueError(f"its 'labels' is {labels!r:.80}, not evaluation set -> label names")
        _check_rows(saved["per_seed"], "per_seed", ("guide", "dataset"))
        _check_rows(saved.get("failed", []), "failed", ("guide",))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not the results of a `pyro-lora compare` run ({type(error).__name__}: {error}); "
                         f"{advice}") from None
    return saved


def _check_config(config):
    """Refuse a record's ``config`` that is no object with the :data:`CONFIG_KEYS` (a hand edit): a resume, a merge or
    the report read them, and failed on the first one missing with a bare KeyError naming neither file nor key."""
    if not isinstance(config, dict):
        raise ValueError(f"its 'config' is a {type(config).__name__}, not an object of settings")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"its config lacks {', '.join(map(repr, missing))}")
    seeds, guides = config["seeds"], config["guides"]
    if not (isinstance(seeds, list) and all(type(s) is int for s in seeds)):
        raise ValueError(f"its config's 'seeds' is {seeds!r:.80}, not a list of integer seeds")
    for key, value in (("guides", guides), ("eval_datasets", config["eval_datasets"])):
        if not (value is None and key == "guides" or isinstance(value, list) and all(isinstance(g, str) for g in value)):
            raise ValueError(f"its config's {key!r} is {value!r:.80}, not a list of names")
    if not isinstance(config["dataset"], str):
        raise ValueError(f"its config's 'dataset' is {config['dataset']!r:.80}, not a name")


def _check_rows(rows, key, names):
    """Refuse a record's ``key`` list whose entries lack a string ``names`` or an integer seed, or repeat a (guide,
    dataset, seed): a repeated row was averaged as one more seed by the table and dropped by the verdict. A per-seed
    row's scores must be numbers or null (n/a): a hand-edited ``"0.50"`` was averaged by the table but n/a to the
    verdict, ``true`` counted as 1.0, and ``"oops"`` failed the report or a resume's first write, naming no row."""
    if not isinstance(rows, list):
        raise ValueError(f"its {key!r} is a {type(rows).__name__}, not a list")
    for i, r in enumerate(rows):
        if not (isinstance(r, dict) and all(isinstance(r.get(n), str) for n in names) and type(r.get("seed")) is int):
            raise ValueError(f"its {key}[{i}] is not a row with a string {' and '.join(names)} and an integer seed: {r!r:.120}")
        if key != "per_seed":
            continue
        for name, value in r.items():
            text = name in ("note", "setting")
            if value is None or name in ("guide", "dataset", "seed"):
                continue
            if not (isinstance(value, str) if text else isinstance(value, (int, float)) and not isinstance(value, bool)):
                raise ValueError(f"its per_seed[{i}] (guide {r['guide']}, {r['dataset']}, seed {r['seed']}) holds {name!r}: "
                                 f"{value!r:.40}, not {'a text' if text else 'a number'} or null (n/a); fix or remove that entry")
    if key == "per_seed":
        check_one_row_each(rows, "its per_seed holds")


def _row_order(guides, seeds):
    """Sort key of per-seed rows: guides in run order (a ``+ts`` row after its method's), then seeds in run order."""
    order = {g: i for i, g in enumerate(guides)}
    seed_order = {s: i for i, s in enumerate(seeds)}
    return lambda r: (order.get(base_guide(r["guide"]), len(order)), r["guide"] != base_guide(r["guide"]),
                      seed_order.get(r["seed"], len(seed_order)))


def summarize_run(rows, failed):
    """Mean ± std over seeds per (guide, evaluation set) of a run's per-seed ``rows``; a guide that ``failed`` (the
    run's ``failed`` records) under some seed says so in its note (its mean is over the other seeds): a method's
    failure marks its rows and its ``+ts`` rows, a ``+ts`` step's failure its ``+ts`` rows alone, a failure on one
    shifted set (its ``dataset``) those rows alone; where the seed's row is there all the same (kept from an earlier
    run of the folder that scored it), nothing is said: the mean holds it. A method whose rows span several versions
    of it is summarized over one version's rows (:func:`~.versions.one_version`), its note naming the seeds left out;
    a row name whose rows on a set are all of the version left out keeps a row there, with no seed (``seeds`` ``[]``)
    and every number n/a (NaN), its note saying why."""
    kept, left_out, keep = split_versions(rows)
    summary = summarize_seeds(kept)
    dropped = versions_of(left_out, lambda r: (r["guide"], r["dataset"]))  # its rows left out, per summary row
    # a (row name, set) whose rows are all of the version left out keeps a row, every number n/a (NaN, as
    # summarize_seeds writes a value some seed lacks) and no seed averaged, its note saying why: else the method would
    # vanish from that set's table without a word
    held = {(row["guide"], row["dataset"]) for row in summary}
    for row in summarize_seeds([r for r in left_out if (r["guide"], r["dataset"]) not in held]):
        summary.append({**{k: v if k in ("guide", "dataset", "setting") else math.nan for k, v in row.items() if k != "note"},
                        "seeds": []})
    at = {}  # (row name, set) -> the index in rows of its first row summarized (of one left out, for a row of none)
    for i, r in enumerate(rows):
        if row_version(r) == keep.get(base_guide(r["guide"]), row_version(r)) or (r["guide"], r["dataset"]) not in held:
            at.setdefault((r["guide"], r["dataset"]), i)
    summary.sort(key=lambda row: at[row["guide"], row["dataset"]])
    present = {(r["guide"], r["dataset"], r["seed"]) for r in kept}
    for row in summary:
        if (row["guide"], row["dataset"]) in dropped:
            name = base_guide(row["guide"])
            row["note"] = join_notes(row.get("note"), left_out_text(name, *dropped[row["guide"], row["dataset"]], keep[name]))
        missing = [f["seed"] for f in failed if f["guide"] in (row["guide"], base_guide(row["guide"]))
                   and f.get("dataset") in (None, row["dataset"])
                   and (row["guide"], row["dataset"], f["seed"]) not in present]
        if missing:
            rest = "mean over the others" if row["seeds"] else "no other seed's row to average"
            row["note"] = join_notes(row.get("note"), f"failed under {seed_list(missing)} (results.json 'failed'): {rest}")
    return summary


def config_differences(saved, config, ignore=(), data=None):
    """``{setting: (value there, value now)}`` for every setting of ``config`` that the saved run ``saved`` holds
    otherwise, but those named in ``ignore``; ``{}``: the same configuration. The one comparison of a request with
    a saved run: resuming a folder (:class:`RunFolder`), merging a rerun (:func:`merge_results`) and the study's
    resume (:mod:`pyro_lora.experiments.study`).

    :param saved: a run record as ``results.json`` holds it (its resolved ``config`` and, where written, the
        ``request`` it was run with), or a bare config dict. A value now equal to either the requested or the
        resolved one is the same: a default left to the run (e.g. ``lr=None``) matches what it resolved to, and a
        default left to the run now matches the value there that it resolves to now
        (:func:`~pyro_lora.experiments.setup.resolved_default`: ``--lr 2e-3`` there, none now, on SST-2). The value
        there reported is the requested one.
    :param config: the configuration now, a :class:`~pyro_lora.experiments.setup.CompareConfig` or its dict;
        its settings are the ones compared.
    :param ignore: setting names left out (e.g. what a resumed run may change: guides, seeds, out, progress).
    :param data: the :func:`~pyro_lora.experiments.setup.data_digest` of the records now, compared (as ``data``) with
        the one the record keeps.

    Values are compared as JSON reads them back (tuples are lists), data folders as the absolute folders they
    name (``None``: the default one). A record that keeps the digest of its records is not compared by data folder:
    the same records elsewhere are the same data, other records at the same path are not; one that keeps the digest
    of its base model is not compared by ``model`` path, for the same reason (the caller compares the digests:
    :meth:`RunFolder.check_base`).
    """
    now = asdict(config) if is_dataclass(config) else dict(config)
    resolved = saved.get("config", saved)
    requested = saved.get("request", resolved)
    out = {}
    if data is not None and saved.get("data") not in (None, data):
        out["data"] = (f"records {saved['data'][:12]}", f"records {data[:12]}")
    for key, value in now.items():
        if key in ignore or (key == "data_dir" and saved.get("data")) or (key == "model" and recorded_base(saved)):
            continue
        older = ADDED_SETTINGS.get(key)  # a record from before the setting existed ran with its old value
        there = requested.get(key, resolved.get(key, older))
        same = (_comparable(key, requested.get(key, older)), _comparable(key, resolved.get(key, older)))
        if _comparable(key, value) not in same and (value is not None or there is None
                                                    or _comparable(key, resolved_default(key, now)) not in same):
            out[key] = (there, value)
    return out


def _comparable(key, value):
    """``value`` as it reads back from JSON (tuples become lists); a data folder and a local model as their absolute
    paths (a run recorded ``--model tinybert`` before local models were recorded absolute); dataset names as the folders
    they name (``sst2/`` is ``sst2``, as the run resolves it)."""
    if key == "model" and isinstance(value, str) and value:  # a corrupt record's value is compared as written
        return str(local_model_path(value) or value)
    if key == "dataset" and isinstance(value, str) and value:
        return os.path.normpath(value)
    if key == "eval_datasets" and isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return [os.path.normpath(v) for v in value]
    if key == "data_dir":
        try:
            return str(resolve_data_dir(value))
        except FileNotFoundError:  # a folder gone since: compared by name
            return value
    return json.loads(json.dumps(value, default=str))


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# what a rerun of some guides (merge_results) may set otherwise than the run it updates
MERGE_IGNORES = ("guides", "out", "progress")


def _environments(record) -> list:
    """The environments a run record's rows were made in (:func:`environment`), oldest first; ``[]`` where not known."""
    return [e for e in record.get("environments") or [record.get("environment")] if e is not None]


def _library_differences(there, now, now_words) -> list:
    """The library versions that differ between two :func:`environment` records, each as "torch 2.1 there, 2.2
    ``now_words``" (the code digest left out)."""
    return [f"{k} {there.get(k)} there, {now.get(k)} {now_words}" for k in sorted({*there, *now})
            if k != "code" and there.get(k) != now.get(k)]


def _merged_environments(base, new, out) -> dict:
    """``environment``/``environments`` of a merge of ``new``'s rows into ``base``'s (``{}``: no row of it kept): both
    lists (none known: ``None``, ``[]``). A method's rows are one run's, but where the kept rows were made with other library versions than the
    rerun's, the table compares methods across them: said (another pyro_lora code is what an update is for)."""
    kept, rerun = _environments(base), _environments(new)
    if kept and rerun:
        differ = _library_differences(kept[-1], rerun[-1], "in the rerun")
        if differ:
            warnings.warn(f"{out / RESULTS} keeps rows made with other library versions than the rerun's ({'; '.join(differ)}): "
                          f"its table compares methods run under both; --update {REFERENCE} reruns every method",
                          stacklevel=user_stacklevel())
    # each once, where it came last: the rerun's is the newest
    merged = list(dict.fromkeys(json.dumps(e, sort_keys=True) for e in reversed(kept + rerun)))[::-1]
    return {"environments": [json.loads(e) for e in merged], "environment": json.loads(merged[-1]) if merged else None}


def merge_results(out, update, record=None):
    """Replace the rows of some guides in the run ``out`` by those of the run ``update`` (a rerun of just those
    guides, e.g. after a change to them, with otherwise the same configuration); returns the merged summary.

    Copies the updated guides' ``predictions_*.npz`` and ``reliability_*.png``, redraws the run's two summary
    figures and rewrites ``out/results.json`` (atomically), guides in the original order, new ones last.

    :param record: called once the run holds the merged rows, before the merge's marker goes (the study records
        the update in its sidecar): a kill in between leaves the marker, and the merge is finished again.

    :raises ValueError: if either ``results.json`` is missing or no run record (:func:`read_record`); if the two
        runs' configurations differ in anything but guides, output folder and bars; if a row merged is not what its
        arrays give (:func:`check_scores`).
    """
    out, update = Path(out), Path(update)
    # the validating reader: a merged record's rows are read, checked and averaged as a resume's are
    base, new = (_parse_record(d, "the --update cannot be merged: rerun it") for d in (out, update))
    if None in (base, new):
        raise ValueError(f"cannot merge {update} into {out}: {(out if base is None else update) / RESULTS} is missing")
    # a retrained MAP's rerun of every method: covering every method without the MAP (a run made without a map row)
    # still starts from the old MAPs, and must be on their records and base model as a rerun of some methods is
    replaces_all = REFERENCE in (new["config"]["guides"] or ()) and set(base["config"]["guides"] or ()) <= set(new["config"]["guides"])
    # every row rerun: on the records there now, wherever they are
    ignore = MERGE_IGNORES + ("data_dir",) * replaces_all
    differ = sorted(config_differences(base, new["config"], ignore=ignore + ("model",) * replaces_all,
                                       data=None if replaces_all else new.get("data")))
    if base.get("data") and not new.get("data") and not replaces_all:
        differ.append("data (the rerun records no digest of its records)")
    if recorded_base(base) and recorded_base(base) != recorded_base(new) and not replaces_all:
        differ.append("base (the rerun ran on other base model weights)")
    forms = recorded_scoring(base), recorded_scoring(new)  # None: no cloze rows there to mix with
    if None not in forms and forms[0] != forms[1] and not replaces_all:
        if _scorings_agree(forms[0], forms[1], new.get("scoring_since")):  # the old rows are the new form's
            base = {**base, "scoring": forms[1], "scoring_since": new["scoring_since"]}
        else:
            differ.append(f"scoring (cloze form {forms[0]} there, {forms[1]} in the rerun)")
    if base.get("labels") and new.get("labels") and base["labels"] != new["labels"] and not replaces_all:
        differ.append(f"labels ({base['labels']} there, {new['labels']} in the rerun)")
    if None not in (base.get("ranks"), new.get("ranks")) and base["ranks"] != new["ranks"] and not replaces_all:
        differ.append(f"ranks (trained on {base['ranks']} torch.distributed ranks there, {new['ranks']} in the rerun)")
    if differ:
        raise ValueError(f"cannot merge {update} into {out}: their configurations differ in {', '.join(differ)}")
    missing = sorted(set(base["config"]["seeds"]) - set(new["config"]["seeds"]), key=str)
    if missing:
        raise ValueError(f"cannot merge {update} into {out}: the rerun lacks seed(s) {', '.join(map(str, missing))} of the run, "
                         "whose rows of the rerun methods would be left from the old code")
    updated = list(new["config"]["guides"])
    # the rows merged are what their arrays give: the run's rows kept (those of the rerun methods go, unread) and the
    # rerun's; rows without their arrays stay in per_seed, neither averaged nor judged
    kept = [r for r in base["per_seed"] if base_guide(r["guide"]) not in updated]
    withheld = check_scores(out, kept, base["config"]["dataset"]) + check_scores(update, new["per_seed"], new["config"]["dataset"])
    guides = list(base["config"]["guides"]) + [g for g in updated if g not in base["config"]["guides"]]
    rows = sorted(kept + new["per_seed"], key=_row_order(guides, base["config"]["seeds"]))
    averaged = without(rows, withheld)
    failed = [f for f in base.get("failed", []) if base_guide(f["guide"]) not in updated] + new.get("failed", [])
    retrained = REFERENCE in updated  # then every row is the rerun's, and so is the MAP each seed starts from
    maps = {**base.get("maps", {}), **new.get("maps", {})} if retrained else {**new.get("maps", {}), **base.get("maps", {})}
    # copied file by file: a kill part-way leaves the marker, and the next reader finishes the merge (finish_merge)
    with atomic_file(out / MERGING) as f:  # relative where inside the run: a copy of the run merges its own copy
        f.write(str(_relative_to(update.resolve(), out.resolve())))
    files = [kind.format(g) for u in updated for g in (u, ts_name(u)) for kind in ("predictions_{}.npz", "reliability_{}.png")]
    for name in files + [map_name(seed) for seed in base["config"]["seeds"]]:
        if (update / name).is_file():
            copy_file(update / name, out / name)
        elif name in files or retrained:  # failed under every seed: nothing of the old code is kept
            (out / name).unlink(missing_ok=True)
    summary = summarize_run(averaged, failed)
    config = {**base["config"], "guides": guides}
    if replaces_all:  # every row rerun: the records and base are the rerun's, wherever they were read, however many used
        config.update(data_dir=new["config"].get("data_dir"), model=new["config"].get("model"))
        base = {**base, **{k: new.get(k) for k in ("data", "data_sets", "sizes", "base", "base_version", "labels", "scoring",
                                                   "scoring_since", "ranks")}}
    _draw_summary(out, summary, guides, config["dataset"], config["seeds"][0])
    # a rerun method's rows are the rerun's, every seed: so is their seeding
    seeding = {g: s for g, s in recorded_seeding(base).items() if base_guide(g) not in updated} | recorded_seeding(new)
    environments = _merged_environments(base if kept else {}, new, out)
    write_json(out / RESULTS, {**base, **environments, "config": config, "summary": summary,
                               "verdict": verdict(averaged, config["dataset"], config["eval_datasets"]),
                               "per_seed": rows, "failed": failed, "maps": maps, "predict_seeding": seeding})
    if record is not None:
        record()
    (out / MERGING).unlink()
    return summary


def _relative_to(path, folder):
    return path.relative_to(folder) if path.is_relative_to(folder) else path


def finish_merge(out):
    """Finish the :func:`merge_results` a kill interrupted in the run ``out`` (its marker names the rerun folder):
    until then its rows, prediction files and MAPs may come from two runs. Nothing to do without a marker.

    :raises ValueError: if a running process holds the folder (it may be merging now), or the rerun folder is gone.
        The merge is finished holding the folder's lock (:func:`~pyro_lora.locking.folder_lock`).
    """
    marker = Path(out) / MERGING
    if not marker.is_file():
        return
    if locked_elsewhere(out):
        raise FolderLocked(f"another process holds {out} (its .lock) and may be merging an --update into it: wait for it")
    # merged under the run's lock (re-entrant: a resume or the study holds it already): two readers without it (two
    # --report-only) finished one merge at once, each copying files and writing results.json
    with folder_lock(out, f"{out} (finishing the merge of an --update a kill cut short)"):
        if not marker.is_file():  # another process finished it in between
            return
        update = Path(out) / marker.read_text().strip()  # an absolute path stays as it is
        if not (update / RESULTS).is_file():
            raise ValueError(f"{out} holds an --update whose merge was cut short, and its rerun folder {update} is gone: "
                             f"its rows and prediction files may disagree; delete {marker} and rerun that --update")
        warnings.warn(f"{out}: finishing the merge of {update}, which a kill cut short", stacklevel=user_stacklevel())
        merge_results(out, update, record=lambda: _record_finished_update(Path(out) / SIDECAR))


def read_sidecar(path) -> dict:
    """The study's record of a run (:data:`SIDECAR` or :data:`NEXT_SIDECAR` at ``path``; ``{}`` if none).

    :raises ValueError: naming a file that is not a JSON object, whose ``running`` is not an object with a
        ``command``, or whose ``commands``, ``updates`` or ``interrupted`` is not a list.
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():  # read as none, the study's record of the run would be lost
            raise ValueError(f"{path}, the study's record of this run, {not_a_file(path)}: move it away")
        return {}
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}, the study's record of this run, is not JSON ({error}): fix it or move it away") from None
    running = sidecar.get("running") if isinstance(sidecar, dict) else None
    problem = ("it is not a JSON object" if not isinstance(sidecar, dict) else
               "its 'running' is not an object with a 'command'"
               if "running" in sidecar and not (isinstance(running, dict) and isinstance(running.get("command"), str)) else
               next((f"its {k!r} is not a list" for k in ("commands", "updates", "interrupted")
                     if not isinstance(sidecar.get(k, []), list)), None))
    if problem:
        raise ValueError(f"{path}, the study's record of this run: {problem}; fix it or move it away")
    return sidecar


def _record_finished_update(path):
    """List the ``study --update`` whose merge a kill cut short (the sidecar at ``path`` marks it running) among the
    run's updates: its rerun was complete, and its rows are merged now (its wall time is unknown)."""
    sidecar = read_sidecar(path)
    running = sidecar.get("running") or {}
    if "update" not in running:
        return
    del sidecar["running"]
    sidecar.setdefault("updates", []).append({"guides": running["update"], "command": running.get("command"),
                                              "started": running.get("started"), "wall_seconds": None,
                                              "finished": now(), "machine": running.get("machine")})
    write_json(path, sidecar)
