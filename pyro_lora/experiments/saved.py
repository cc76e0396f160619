"""``pyro-lora fit``, ``bayesianize`` and ``evaluate``: one method saved with its run record, and that record re-scored."""

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

from .. import data as D
from ..checks import check_count, not_a_file
from ..contract import drawn_at_load
from ..costs import PeakMemory
from ..io import (_check_beside, _read_meta, check_folder_slot, check_sealed, load_guide, read_safetensors, recover_directory, save_guide,
                  saved_folder, writable_folder)
from ..model import LoraModel
from ..pretrained import DrawnAtLoadWarning
from ..model_files import label_key, local_model_path, minilm_dir, model_files_stamp
from ..kinds import KINDS
from ..distributed import is_main
from ..locking import folder_lock
from ..guides.tfb import TFB_ANCHORS, TFB_SEARCH, anchor_count, bayesianize_setup, check_search
from ..guides.registry import METHODS, MODELS, Fitted, get_method, join_notes
from .compare import evaluate, fit_method, predictor, with_split_note
from .scoring import join_row, score
from .results import PREDICT_SEEDING, config_differences, is_seeding, recorded_base
from ..callers import user_stacklevel
from .setup import (ADDED_SETTINGS, BASE_DIGEST_VERSION, CompareConfig, base_digest, check_config, check_numbers, load_splits,
                    prepare, records_digest, seed_for, train_map)


def fit_one(config: CompareConfig, adapter: bool = False, overwrite: bool = False) -> dict:
    """Train MAP, fit the one method of ``config`` and save its guide, with the run's record, to ``out/guide`` as one
    unit (``guide.json``, ``guide.safetensors``, ``run.json``: ``pyro-lora evaluate out`` reproduces the row).
    Where ``out`` holds this run already, its recorded row is returned without fitting (:func:`_finished_row`).

    :param adapter: also write the posterior mean as a peft adapter folder ``out/guide/adapter``, in the same unit
        (``PeftModel.from_pretrained`` and ``pyro-lora bayesianize`` take it).
    :param overwrite: replace the run ``out`` holds, of another configuration or this one (otherwise refused, or kept).
    :raises ValueError: before loading anything, for a configuration that cannot run, a method with no guide to
        save, ``adapter`` with a method whose mean is no LoRA adapter, or an ``out`` that holds another run
        (:func:`_finished_row`).
    """
    if not config.guides or len(config.guides) != 1:
        raise ValueError(f"fit takes exactly one method, got {config.guides!r}")
    (name,) = config.guides
    method = get_method(name)
    if not method.saveable:
        raise ValueError(f"method {name!r} has no guide to save; `pyro-lora compare --guides {name}` reports it")
    if adapter and not method.exportable:
        exportable = ", ".join(n for n, m in METHODS.items() if m.exportable)
        raise ValueError(f"method {name!r} has no posterior mean to write as a peft adapter (an ensemble's averaged members, "
                         f"LoRA-XS cores or ScalaBL scales are no plain LoRA); methods that have one: {exportable}")
    check_config(config)
    check_free(config.out, "guide")
    made = {"command": "fit"}
    with _writing(config.out):
        done = _finished_row(config, made, overwrite, lambda: _base(prepare(config, config.seeds[0])), adapter)
        if done is not None:
            return done
        setup = prepare(config, config.seeds[0])
        fitted, costs = fit_method(setup, name, train_map(setup))
        guide = fitted.guide
        view = setup.for_method(name)
        prediction, predict_costs = evaluate(setup, Fitted(predictor(view, method, guide)), setup.test, name, config.dataset)
        row = with_split_note(join_row({"guide": name, "setting": method.setting, "dataset": config.dataset},
                                       score(prediction, point_estimate=fitted.point_estimate), costs, predict_costs), setup)
        random = "".join(sorted({s.matrix for s in guide.sites.values()}))
        save_guide(guide, Path(config.out) / "guide", adapter=adapter,
                   run=run_record(setup, row, method, request=asdict(config), made=made, random=random,
                                  prior=float(guide.model.prior), fit_note=costs.get("note")))
        return row


def _writing(out):
    """One process at a time writes an ``--out`` folder (compare's lock): two saving one guide there would collide, and
    one fit's result be lost. A saved run's guide folder is refused first: the lock would leave its ``.lock`` inside
    that sealed folder, which a later save of the run there refuses as a stray entry after its whole training.

    :raises ValueError: where ``out`` is the guide folder of a saved run.
    """
    taken = saved_folder(out)
    if taken:
        raise ValueError(f"{out} is {taken}: fit and bayesianize write OUT/guide, which would lie among its files; give "
                         "the folder that holds the run (--overwrite replaces the run there) or another --out")
    return folder_lock(out, "this run folder") if is_main() else contextlib.nullcontext()


def run_record(setup, row: dict, method, **extra) -> dict:
    """``run.json``: what :func:`evaluate_saved` needs to rebuild the model and reproduce ``row`` (the datasets
    folder and a local model's path absolute, so that they are found from any working directory; the model class by
    its registered name; the base model's digest and the data's label names and records digests
    (:func:`_data_record`), which evaluate and bayesianize compare; ``extra`` e.g. the fit's ``fit_note``, which
    evaluate's rows repeat, and the ``request`` and ``made`` that :func:`_finished_row` compares a rerun with)."""
    model = local_model_path(setup.config.model) or setup.config.model
    config = {**asdict(setup.config), "data_dir": str(D.resolve_data_dir(setup.config.data_dir)), "model": str(model)}
    return {"config": config, "sizes": setup.sizes, "seed": setup.seed, "model_class": method.model.name,
            "predictive": method.predictive.__name__, "base": _base(setup), "model_files": model_files_stamp(setup.config.model),
            "base_version": BASE_DIGEST_VERSION, "predict_seeding": PREDICT_SEEDING,
            **_data_record(setup.config, setup.train, setup.val, setup.test), **extra, "result": row}


def _base(setup) -> str:
    """The :func:`~.setup.base_digest` of the network ``setup`` loaded."""
    return base_digest(setup.net, setup.tokenizer)


def _data_record(config, train, val, test) -> dict:
    """What a run records of its data: the dataset's ``label_names`` (``None`` for multiple choice; records hold label
    indices only, so a trained head's classes are these, in this order) and ``records``, the SHA-256 of its training
    (train and validation) and of its test records (:func:`~.setup.records_digest`)."""
    return {"label_names": D.load_meta(config.dataset, config.data_dir).get("label_names"),
            "records": {"training": records_digest(train, val, [], {}), "test": records_digest([], [], test, {})}}


def _check_data(run, config, whose) -> list | None:
    """Compare the data ``config`` reads with what the fit's ``run`` recorded (:func:`_data_record`): refuse other
    label names or another order; return which records differ, ``"training"`` and/or ``"test"``, each compared where
    ``config`` reads them as the fit did (the same dataset and sizes: a size or dataset of its own is another setting,
    said as such). A record from before these were kept is warned of, and gives ``None``: the check cannot be made.
    ``whose`` names the fit's output in messages, e.g. ``"the adapter in runs/fit/guide/adapter"``.

    :raises ValueError: for label names other than the recorded ones, naming both.
    """
    fitted = run.get("config") or {}
    if not isinstance(run.get("records"), dict) or "label_names" not in run:
        warnings.warn(f"the run.json of {whose} was written before runs recorded their data's label names and records: "
                      f"whether {config.dataset!r} under {D.resolve_data_dir(config.data_dir)} is the data it was fitted on "
                      "could not be checked", stacklevel=user_stacklevel())
        return None
    then, now = run["label_names"], D.load_meta(config.dataset, config.data_dir).get("label_names")
    if [label_key(n) for n in then or ()] != [label_key(n) for n in now or ()]:  # None: multiple choice
        order = "; the same classes in another order" if sorted(map(label_key, then or ())) == sorted(map(label_key, now or ())) else ""
        raise ValueError(f"{whose} was fitted on data labelled {then} (its run.json) and {config.dataset!r} under "
                         f"{D.resolve_data_dir(config.data_dir)} is labelled {now} (its meta.json{order}): labels are indices, "
                         "so every example would be scored as another class; give --data-dir the datasets folder of the "
                         f"fit ({fitted.get('data_dir')}), or data labelled {then} in this order")

    def same(*keys):  # a dataset by its normalised name, as compare records it ("sst2/" is sst2)
        def value(settings, k):
            return os.path.normpath(str(settings[k])) if k == "dataset" else settings[k]
        return all(k in fitted and value(fitted, k) == value(asdict(config), k) for k in keys)

    compared = {"training": same("dataset", "train_size", "val_fraction"), "test": same("dataset", "test_size")}
    if not any(compared.values()):
        return []
    now = _data_record(config, *load_splits(config)[:3])["records"]
    return [part for part, digest in now.items() if compared[part] and run["records"].get(part) != digest]


def _finished_row(config: CompareConfig, made: dict, overwrite: bool, base, adapter: bool = False) -> dict | None:
    """The row the ``run.json`` in ``config.out/guide`` records, where that run is this one: a rerun skips it, as
    ``compare`` skips what finished. This one: the same configuration (:func:`~.results.config_differences` with the
    ``request`` the record keeps; the model and data folder by path), the same ``made`` (the command, and for
    bayesianize the adapter's digest, anchors and search), its adapter written if ``adapter``, and the records of
    its data, compared with the record's digests (:func:`_check_data`), and the base model: where the files
    ``config.model`` names changed since the run (:func:`~pyro_lora.model_files.model_files_stamp`), ``base()``, the
    :func:`~.setup.base_digest` of the network as the run loads it, must be the recorded one (a checkpoint replaced at
    the same path gave the old row). ``None``: there is no run, or ``overwrite`` replaces it. Reads no model unless
    its files changed: call it before loading one.

    :raises ValueError: naming what ``out`` holds, for another run there (what differs) or a guide without a readable
        run record, with ``--overwrite`` as the way to replace it; for this run where its data gives other records now,
        or its model folder another base model. (``out`` itself a guide folder :func:`_writing` refused.)
    """
    out = Path(config.out)
    guide = out / "guide"
    recover_directory(guide)  # a save killed between its renames left the run aside
    if overwrite or not (guide / "guide.json").is_file():  # check_free refused a folder of anything else
        # what the save would refuse after the whole run (an entry of another writer there), refused before it
        check_folder_slot(guide, "the run saves its guide there as a folder: move them, or choose another --out")
        return None
    replace_it = "choose another --out, or pass --overwrite to replace it"
    try:
        run = json.loads((guide / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        run = None
    if not (isinstance(run, dict) and isinstance(run.get("config"), dict) and isinstance(run.get("result"), dict)):
        raise ValueError(f"{guide} holds a saved guide without a readable run record (its run.json): {replace_it}")
    try:  # the row printed as this run's must be the record saved with its guide, as evaluate checks it
        check_sealed(guide)
    except (OSError, ValueError) as err:
        raise ValueError(f"{guide} holds a run whose files are not the ones saved together ({err}): its recorded row "
                         f"cannot be trusted; {replace_it}") from None
    there = {"command": "bayesianize" if run.get("adapter") else "fit", **(run.get("made") or {})}  # older: by its adapter
    recorded = {k: run[k] for k in ("config", "request") if k in run}  # no digests: the model and data folder by path
    differ = [f"{k} {a!r} there, {list(b) if isinstance(b, tuple) else b!r} now"  # as JSON reads back
              for k, (a, b) in config_differences(recorded, config, ("out", "progress")).items()]
    # "anchors" records those searched on (older records: those requested), at most the training split's: a request
    # beyond it searched on the same ones (the split itself is compared by the data's digests below)
    train = (run.get("sizes") or {}).get("train")

    def searched(k, v):
        return min(v, train) if k == "anchors" and isinstance(v, int) and isinstance(train, int) else v

    differ += [f"another adapter (the digest of its files: {str(there.get(k))[:12]} there, {v[:12]} now)" if k == "adapter"
               else f"{k} {there.get(k)!r} there, {v!r} now" for k, v in made.items()
               if searched(k, there.get(k)) != searched(k, v)]
    if adapter and not (guide / "adapter").is_dir():
        differ.append("no adapter there, --adapter now")
    if differ:
        method = ", ".join(map(str, run["config"].get("guides") or ()))
        raise ValueError(f"{out} holds a finished `pyro-lora {there['command']}` run of {method} (seed {run.get('seed')}) "
                         f"in {guide}, of another configuration ({'; '.join(differ)}): {replace_it}")
    other = _check_data(run, config, f"the run in {guide}")
    if other:
        raise ValueError(f"{guide} holds this run, fitted and scored on other {' and '.join(other)} records than "
                         f"{config.dataset!r} under {D.resolve_data_dir(config.data_dir)} gives now (its run.json's digests): "
                         "restore that data, or pass --overwrite to run it again on these records")
    if run.get("model_files") not in (None, model_files_stamp(config.model)) and recorded_base(run) is not None \
            and base() != recorded_base(run):
        raise ValueError(f"{guide} holds this run, fitted and scored on another base model than --model {config.model} "
                         "loads now (its files changed since, and the digest of its weights, configuration and tokenizer "
                         "differs from the run.json's: another checkpoint at the same path): restore that checkpoint, or "
                         "pass --overwrite to run it again on this one")
    if is_main():
        print(f"# {guide} holds this run already (the same configuration, its run.json): skipped; --overwrite runs it again",
              flush=True)
    return run["result"]


def check_free(out, *names):
    """Refuse a file or a link where a folder ``out/<name>`` will be written (it would be moved aside, out of sight).

    :raises ValueError: naming the path and what is there.
    """
    for name in names:
        path = Path(out) / name
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            kind = "a link" if path.is_symlink() else "a file"
            raise ValueError(f"{path} is {kind}, where the {name} folder goes: move it or choose another --out")
        if path.is_dir() and any(path.iterdir()) and not (path / "guide.json").is_file():
            raise ValueError(f"{path} is a folder that holds no saved guide, where the {name} folder goes (saving would "
                             "replace it): move it or choose another --out")


# the settings of a fit's run.json that `pyro-lora bayesianize` takes where its command line leaves them out (with the
# record's "seed"): every one the search reads (the base and how it is loaded, the data, which anchors are drawn and how
# they are cut and batched, the device's rounding, the samples) and the test set the row scores
FIT_SETTINGS = ("model", "dataset", "data_dir", "mc_format", "mc_normalize", "max_length", "batch_size", "device", "dtype",
                "load_in_4bit", "train_size", "val_fraction", "test_size", "samples")
# of those, the ones whose other value bayesianize_adapter warns of: another base, dtype or 4-bit loading is refused by
# the base's digest after loading, and the model and data folders are locations (what the data folder gives, label
# names and records, is compared with the fit's record by _check_data)
_WARNED = ("dataset", "mc_format", "mc_normalize", "max_length", "batch_size", "device", "train_size", "val_fraction",
           "test_size", "samples", "seed")


def fit_settings(adapter_dir) -> dict:
    """The :data:`FIT_SETTINGS` and ``"seed"`` that the ``run.json`` of the fit beside ``adapter_dir`` records; ``{}``
    for an adapter from elsewhere. A record from before a setting existed ran with its value of then
    (:data:`ADDED_SETTINGS`)."""
    run = _fit_run(adapter_dir)
    if not isinstance(run.get("config"), dict):
        return {}
    recorded = {**ADDED_SETTINGS, **run["config"], **({"seed": run["seed"]} if "seed" in run else {})}
    return {k: recorded[k] for k in (*FIT_SETTINGS, "seed") if k in recorded}


def bayesianize_adapter(config: CompareConfig, adapter_dir, anchors: int = TFB_ANCHORS, overwrite: bool = False,
                        **search) -> dict:
    """TFB on a saved peft adapter: search sigma_q on ``anchors`` training examples, score the test set,
    save the guide with the run's record to ``out/guide`` (``pyro-lora evaluate out`` reloads it).

    The search is compare's tfb search (:func:`~pyro_lora.guides.tfb.bayesianize_setup`) with ``search`` changing
    any of its settings. On the MAP adapter of :func:`fit_one` under the fit's settings (:func:`fit_settings`, which
    ``pyro-lora bayesianize`` takes where its flags are left out) it is the fit's ``tfb`` row of ``compare``; a
    ``config`` that differs from them in a setting the search or the row reads is warned of, naming both values.
    TFB trains nothing: ``config``'s ``epochs``, ``lr`` and ``prior_scale`` are not used, and the record names the
    adapter's own (its fit's run.json beside it), ``None`` for an adapter from elsewhere (the prior: ``config``'s). Where ``out`` holds this run already, its
    recorded row is returned (:func:`_finished_row`); ``overwrite`` replaces the run there, whichever it is.

    :raises ValueError: before loading the model, for a configuration that cannot run, a folder that holds no
        peft adapter, a saved guide folder's adapter that is not the one saved with its ``run.json`` (:func:`_fit_run`),
        an ``out`` whose ``guide`` folder (which saving replaces) holds the adapter or lies in it (``overwrite`` or
        not), or an ``out`` that holds another run (:func:`_finished_row`).
    """
    task = check_config(config, guides=(), writes=False, trains=False)
    check_count(anchors, "anchors")
    names = ("criterion", "tolerance", "low", "high", "iterations", "spacing")
    checked = {**TFB_SEARCH, **search}
    check_search(*(checked[k] for k in names))
    check_adapter_dir(adapter_dir, task)
    guide_dir, source = (Path(config.out) / "guide").resolve(), Path(adapter_dir).resolve()
    if guide_dir == source or guide_dir in source.parents or source in guide_dir.parents:
        raise ValueError(f"--out {config.out} and the adapter it reads ({adapter_dir}) overlap: saving replaces "
                         f"{Path(config.out) / 'guide'} whole, which would delete or write into its own source, --overwrite "
                         "or not; choose an --out outside it")
    fit_run = _fit_run(adapter_dir)
    fitted = fit_run.get("config") or {}
    # the adapter's training, not compare's defaults (a prior from elsewhere is the model's, unrecorded by any fit)
    trained = {"epochs": fitted.get("epochs"), "lr": fitted.get("lr"), "prior_scale": fitted.get("prior_scale", config.prior_scale)}
    config = replace(config, **trained)
    made = {"command": "bayesianize", "adapter": _adapter_digest(adapter_dir), "anchors": anchors,
            **{k: checked[k] for k in names}, **search}
    _warn_about_other_settings(config, fit_settings(adapter_dir), adapter_dir)
    if fit_run.get("config"):  # an adapter from elsewhere records no data
        _warn_about_other_records(config, _check_data(fit_run, config, f"the adapter in {adapter_dir}") or [], adapter_dir)
    trained_on = recorded_base(fit_run)
    if trained_on is None:  # an adapter from elsewhere: its config's base path is all there is to compare
        _warn_about_another_base(adapter_dir, config.model)
    writable_folder(config.out)
    check_free(config.out, "guide")
    request = config
    with _writing(config.out):
        done = _finished_row(config, made, overwrite, lambda: _base(_prepare_saved(config, config.seeds[0], adapter_dir)))
        if done is not None:
            return done
        setup = _prepare_saved(config, config.seeds[0], adapter_dir)
        if trained_on is not None and _base(setup) != trained_on:
            raise ValueError(f"the adapter in {adapter_dir} was fitted on another base model than --model {config.model} loads "
                             "(the digest of its weights, configuration and tokenizer in the fit's run.json differs"
                             f"{_dtype_hint(fit_run, config)}): on another base a LoRA gives other predictions; give --model "
                             "the checkpoint it was fitted on")
        _check_drawn_weights(setup, fit_run, adapter_dir)
        config = setup.config
        made = {**made, "anchors": anchor_count(setup, anchors)}  # the anchors searched on: the split may hold fewer
        setup.model = LoraModel(setup.net, setup.likelihood, random="AB", num_data=len(setup.train), prior=config.prior_scale)
        seed_for(setup.seed, "tfb", "fit")
        with PeakMemory(config.device) as memory:
            t = time.perf_counter()
            guide = bayesianize_setup(setup, setup.model, anchors, **search)
        costs = {"fit_seconds": time.perf_counter() - t, "fit_memory_mb": memory.megabytes, "extra_parameters": guide.extra_parameters()}
        if guide.search_note:
            costs["note"] = guide.search_note
        method = get_method("tfb")
        prediction, predict_costs = evaluate(setup, Fitted(predictor(setup, method, guide)), setup.test, "tfb", config.dataset)
        row = with_split_note(join_row({"guide": "tfb", "setting": get_method("tfb").setting, "dataset": config.dataset},
                                       score(prediction, point_estimate=guide.deterministic), costs, predict_costs,
                                       {"sigma_q": float(guide.sigma_q)}), setup)
        setup.config = replace(config, **trained)  # not the learning rate prepare resolved: TFB trained nothing
        # the adapter travels inside the unit (as the guide's mean, which TFB keeps at the adapter's values): the folder
        # can be shared and evaluated without the original adapter
        save_guide(guide, Path(config.out) / "guide", adapter=True,
                   run=run_record(setup, row, method, request=asdict(request), made=made, random="AB",
                                  prior=config.prior_scale, adapter="adapter", fit_note=guide.search_note))
        return row


def check_adapter_dir(adapter_dir, task: str):
    """Refuse, before loading the model, a folder that is no readable peft adapter: its config and weights file
    present and readable, every weight finite, and for a classification set its trained head.

    :raises ValueError: naming the file and what is wrong with it.
    """
    path = Path(adapter_dir)
    for unit in (path.resolve(), path.resolve().parent):  # an adapter, or the guide folder holding it, whose save was killed
        recover_directory(unit)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file: give the adapter folder that holds adapter_config.json")
    try:
        adapter = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} holds no peft adapter (adapter_config.json missing): give the folder that "
                         "`save_pretrained` of a peft model (or `pyro-lora fit --adapter`) wrote") from None
    except IsADirectoryError:
        raise ValueError(f"{path / 'adapter_config.json'} {not_a_file(path / 'adapter_config.json')}: {path} holds no "
                         "peft adapter") from None
    except ValueError as error:
        raise ValueError(f"{path}/adapter_config.json is not valid JSON ({error})") from None
    if adapter.get("peft_type") != "LORA" or adapter.get("use_dora"):
        kind = "a DoRA adapter" if adapter.get("use_dora") else f"an adapter of type {adapter.get('peft_type')}"
        raise ValueError(f"{path} holds {kind}: a posterior over LoRA needs a plain LoRA adapter (no DoRA or other "
                         "variants: their extra parameters would be left out of the posterior)")
    rank, alpha = adapter.get("r"), adapter.get("lora_alpha", 8)
    if not (isinstance(rank, int) and rank >= 1 and isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"{path}/adapter_config.json has r {rank!r} and lora_alpha {alpha!r}: a LoRA needs r >= 1 and lora_alpha > 0")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file() and (path / "adapter_model.bin").is_file():
        raise ValueError(f"{path} holds adapter_model.bin (older peft's pickle format) but no {weights.name}: pyro-lora "
                         "reads safetensors only (unpickling can run code); load it with PeftModel.from_pretrained and "
                         "save_pretrained it again, which writes safetensors")
    if not weights.is_file():
        raise ValueError(f"{weights} {not_a_file(weights, 'is missing')}: the adapter folder holds no weights (peft would look for them online)")
    tensors = read_safetensors(weights)
    if task == "classification" and all("lora_" in k for k in tensors):
        raise ValueError(f"{weights} holds no classification head (only LoRA matrices; task_type "
                         f"{adapter.get('task_type')!r}): the head would be freshly random; save the adapter with "
                         "task_type SEQ_CLS (peft keeps the head)")


def _adapter_digest(adapter_dir) -> str:
    """SHA-256 over the SHA-256 of each file of the adapter in ``adapter_dir`` that TFB reads (config, weights)."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(Path(adapter_dir) / name, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def _fit_run(adapter_dir) -> dict:
    """The record of the `fit` run that wrote ``adapter_dir`` (``fit --adapter``: its ``run.json`` beside it, found
    through links), or ``{}`` for an adapter from elsewhere.

    :raises ValueError: for a saved guide folder's ``adapter/`` or ``run.json`` other than the ones saved together
        (:func:`~pyro_lora.io._check_beside`): another save's adapter would run under this record's settings and seed.
    """
    adapter = Path(adapter_dir).resolve()
    unit = adapter.parent
    if adapter.name == "adapter" and (unit / "guide.json").is_file():
        _check_beside(unit, _read_meta(unit))
    try:
        run = json.loads((unit / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return run if isinstance(run, dict) else {}


def _dtype_hint(fit_run, config) -> str:
    """Where the fit loaded the base in another ``--dtype`` / 4-bit than ``config``: the digest reads the weights as
    loaded, so that alone makes it differ."""
    fitted = fit_run.get("config") or {}
    changed = [f"--{k.replace('_', '-')} {fitted[k]!r} there, {getattr(config, k)!r} now" for k in ("dtype", "load_in_4bit")
               if k in fitted and fitted[k] != getattr(config, k)]
    return f"; the fit loaded it otherwise: {', '.join(changed)}" if changed else ""


def _prepare_saved(config, seed, adapter_dir):
    """:func:`~pyro_lora.experiments.setup.prepare` with the saved adapter of ``adapter_dir`` (if any), without load_adapter's
    warning about weights drawn at load that the adapter does not carry: here their seed is checked (bayesianize:
    :func:`_check_drawn_weights` against the fit's; evaluate: the run's own seed), and a warning would repeat it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DrawnAtLoadWarning)
        return prepare(config, seed, adapter_dir=adapter_dir)


def _check_drawn_weights(setup, fit_run, adapter_dir):
    """Refuse a seed other than the fit's where the base draws weights at load (an MLM checkpoint's pooler: the
    checkpoint lacks them, and the adapter does not carry them): they would differ from the ones the adapter was
    trained with. An adapter from elsewhere, whose seed is unknown, is warned about."""
    drawn = [n.removeprefix("base_model.model.") for n, p in setup.net.named_parameters()
             if drawn_at_load(p) and ".original_module." not in n]
    if not drawn:  # a task head drawn at load and not in the adapter was refused by load_adapter, whatever the seed
        return
    seed = fit_run.get("seed")
    if seed is None:
        warnings.warn(f"--model draws {drawn[:3]} at load under the seed (the checkpoint lacks them; the adapter in "
                      f"{adapter_dir} does not carry them): they equal the ones the adapter was trained with only under "
                      "the seed of its fit", stacklevel=user_stacklevel())
    elif seed != setup.seed:
        raise ValueError(f"--model draws {drawn[:3]} at load under the seed (the checkpoint lacks them, the adapter does "
                         f"not carry them), and the fit of {adapter_dir} drew them under seed {seed}: pass --seed {seed}")


def _warn_about_other_settings(config, recorded, adapter_dir):
    """Warn where ``config`` runs with another value than the fit recorded (``recorded``: :func:`fit_settings`) of a
    setting that changes the search or the row unnoticed (:data:`_WARNED`; an ``mc_format`` of ``None``, the model's
    default resolved on loading, is not compared)."""
    given = {**asdict(config), "seed": config.seeds[0]}
    changed = [f"--{k.replace('_', '-')} {given[k]} (the fit: {recorded[k]})" for k in _WARNED
               if k in recorded and given[k] != recorded[k] and not (k == "mc_format" and given[k] is None)]
    if changed:
        warnings.warn(f"bayesianize runs with other settings than the fit of {adapter_dir} recorded: {', '.join(changed)}; "
                      "its sigma_q or row is not compare's tfb row for that fit (pyro-lora bayesianize takes the fit's value of each "
                      "flag left out)",
                      stacklevel=user_stacklevel())


def _warn_about_other_records(config, differ, adapter_dir):
    """Warn where ``config``'s data gives other records than the fit of ``adapter_dir`` recorded (``differ``: which,
    :func:`_check_data`): the anchors, or the test set the row scores, are not the fit's."""
    if differ:
        warnings.warn(f"bayesianize runs on other records than the fit of {adapter_dir} recorded: the {' and '.join(differ)} "
                      f"records of {config.dataset!r} under {D.resolve_data_dir(config.data_dir)} differ from the fit's (its "
                      "run.json's digests); its sigma_q or row is not compare's tfb row for that fit", stacklevel=user_stacklevel())


def _warn_about_another_base(adapter_dir, model):
    """Warn when the adapter records a local base folder other than the one ``model`` (``--model``) loads: a LoRA on
    another base than its own gives other predictions (peft loads it there all the same, if the shapes agree)."""
    recorded = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    given = minilm_dir() if model == "minilm" else local_model_path(model)
    if not (isinstance(recorded, str) and recorded and given is not None):
        return
    recorded = Path(recorded).expanduser()
    if recorded.is_dir() and given.is_dir() and recorded.resolve() != given.resolve():
        warnings.warn(f"the adapter in {adapter_dir} was trained on {recorded} (its adapter_config.json), and --model gives "
                      f"{given}: on another base than its own a LoRA gives other predictions; give --model {recorded}",
                      stacklevel=user_stacklevel())


def _run_file(run_dir):
    """The ``run.json`` of a `fit` / `bayesianize` output folder (or of its ``guide`` folder)."""
    run_dir = Path(run_dir)
    for path in (run_dir / "guide" / "run.json", run_dir / "run.json"):
        recover_directory(path.parent)  # a save killed between its renames left the previous guide aside
        if path.is_file() and (path.parent / "guide.json").is_file():
            return path
    raise FileNotFoundError(f"{run_dir} is not a `pyro-lora fit` or `bayesianize` output (guide/run.json missing)")


def _read_record(path, overrides):
    """The run record at ``path`` checked whole: ``(run, config, method)``, ``config`` with ``overrides`` applied.

    :raises ValueError: if a setting is missing, unknown or out of range, or the record names another method, model
        or guide class than the one saved beside it.
    """
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
        settings = set(CompareConfig.__dataclass_fields__)
        recorded = {**ADDED_SETTINGS, **run["config"]}
        missing, unknown = sorted(settings - set(recorded)), sorted(set(recorded) - settings)
        if missing or unknown:
            raise ValueError(f"config {'lacks ' + str(missing) if missing else 'has unknown settings ' + str(unknown)}")
        saved = {**recorded, **overrides}
        config = CompareConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        random, seed, predictive = run["random"], run["seed"], run["predictive"]
        if not isinstance(predictive, str):
            raise ValueError(f"predictive {predictive!r} is no name")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise ValueError(f"seed {seed!r} is no integer in [0, 2**32)")
        if not isinstance(random, str) or not random or any(k not in KINDS for k in random):
            raise ValueError(f"random {random!r} is none of the matrix kinds {', '.join(KINDS)}")
        if not is_seeding(run.get("predict_seeding", 1)):
            raise ValueError(f"predict_seeding {run['predict_seeding']!r} is none of 1 to {PREDICT_SEEDING}")
        (name,) = config.guides
        check_numbers(config, trains=not run.get("adapter"))  # a bayesianize record: epochs None where unknown
        meta = json.loads((path.parent / "guide.json").read_text(encoding="utf-8"))
        saved_class, method = meta.get("guide", ""), METHODS.get(name)
        if method is None and isinstance(name, str) and name.isidentifier():
            raise ValueError(f"its method {name!r} is not registered here: import the module that registers it (or install "
                             "the package whose pyro_lora.methods entry point does)")
        if method is None or not method.saveable or saved_class != f"{method.guide.__module__}:{method.guide.__qualname__}":
            raise ValueError(f"its method {name!r} did not save the guide beside it ({saved_class!r})")
        if run["model_class"] != method.model.name or MODELS.get(run["model_class"]) is not method.model:
            raise ValueError(f"model class {run['model_class']!r} is not the model of method {name!r} ({method.model.name!r})")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a complete run record ({type(error).__name__}: {error})") from None
    try:  # before the base model loads; load_guide checks the files again as it reads them (a few MB hashed twice)
        check_sealed(path.parent)
    except (ValueError, OSError) as error:
        raise ValueError(f"{error}; evaluate re-scores a run as saved (--test-size, --samples, --device and --data-dir may "
                         "change), `pyro-lora fit` makes a run with other settings") from None
    return run, config, method


def evaluate_saved(run_dir, **overrides) -> dict:
    """Score the guide saved by :func:`fit_one` or :func:`bayesianize_adapter` in ``run_dir`` on its test set, with
    the predictive and seed the run used, so the row is the run's (``overrides`` change the config, e.g.
    ``data_dir`` where the run's datasets folder moved). The row's ``test_examples`` is the number scored.

    :raises FileNotFoundError: if ``run_dir`` holds no saved run.
    :raises ValueError: if its ``run.json`` is not a complete run record, its configuration cannot run here
        (:func:`check_config`), or the guide does not fit the rebuilt model.
    """
    path = _run_file(run_dir)
    run, config, method = _read_record(path, overrides)
    predictive = run["predictive"]
    if "samples" in overrides and not getattr(method.predictive, "uses_samples", True):
        raise ValueError(f"--samples changes nothing here: {path} was scored with the {predictive} predictive, which "
                         "draws no weight samples")
    if predictive != method.predictive.__name__:
        raise ValueError(f"{path} was scored with the {predictive} predictive, and method {method.name!r} gives "
                         f"{method.predictive.__name__}: the row would differ")
    task = check_config(config, guides=(), writes=False, trains=False)
    differ = _check_data(run, config, f"the guide in {path.parent}")
    other_test = None if differ is None else "test" in differ
    adapter = run.get("adapter") and path.parent / run["adapter"]  # saved in the unit, beside run.json
    if adapter is not None:
        check_adapter_dir(adapter, task)
    # the saved adapter, if any, brings its own rank, alpha, targets and head
    setup = _prepare_saved(config, run["seed"], adapter)
    view = setup.for_method(method.name)
    prior = run.get("prior", config.prior_scale)  # the prior of the guide's model (e.g. post hoc: 0.1)
    model = method.model.restore(setup.net, view.likelihood, run["random"], num_data=len(setup.train), prior=prior)
    guide = load_guide(path.parent, model)
    if "samples" in overrides and guide.deterministic:  # the note would call the same row another (TFB at sigma_q 0 too)
        raise ValueError(f"--samples changes nothing here: {path} holds a {type(guide).__name__}, a point estimate, "
                         "whose predictive runs one forward and draws no weight samples")
    prediction, costs = evaluate(setup, Fitted(predictor(view, method, guide)), setup.test, method.name, config.dataset,
                                 seeding=run.get("predict_seeding", 1))
    row = with_split_note(join_row({"guide": method.name, "setting": method.setting, "dataset": config.dataset},
                                   score(prediction, point_estimate=guide.deterministic), costs,
                                   {"extra_parameters": method.extra_parameters(guide), "test_examples": len(setup.test)}), setup)
    # the fit's own note (a tuning at the end of its grid, a search at the end of its range) holds for the guide
    available = len(D.load_records(config.dataset, "test", config.data_dir))
    base = _base(setup) if recorded_base(run) is not None else None  # a pass over the weights
    note = join_notes(run.get("fit_note"), row.get("note"),
                      _rescored_note(row, run, overrides, available, base, config.model, other_test))
    if note:
        row["note"] = note
    return row


def _rescored_note(row, run, overrides, available, base, model=None, other_test=None):
    """Why ``row`` is not the row the run recorded, if it is not: another base model (``base``: the digest of the one
    ``model`` loads now, against the one the run recorded), other sizes or samples asked for, other test records
    (``other_test``: their digest differs from the run's; ``None`` for a run that recorded none), or (the same settings)
    other software, or other test data where the run recorded no digest of it.
    ``available``: the test records the data holds; a test size at or above it scores them all, as the run did where
    its own size was too."""
    if recorded_base(run) not in (None, base):
        return (f"scored with another base model than the run's ({model} gives other weights, "
                "configuration or tokenizer than when the run was fitted): not the run's row")
    if other_test:
        return ("scored on other test records than the run's (the data folder gives others than the ones its run.json "
                "recorded): not the run's row")
    def scored(key, value):
        return min(value, available) if key == "test_size" else value

    changed_settings = [f"{k} {overrides[k]} (the run: {run['config'][k]})" for k in ("test_size", "samples")
                        if k in overrides and scored(k, overrides[k]) != scored(k, run["config"][k])]
    if changed_settings:
        return f"re-scored with {', '.join(changed_settings)}: not the run's row"
    recorded = run.get("result") or {}
    changed = [k for k in ("accuracy", "ece", "nll") if isinstance(recorded.get(k), (int, float))
               and not math.isclose(row[k], recorded[k], rel_tol=1e-6, abs_tol=1e-9)]
    if changed:
        cause = "the software" if other_test is False else "the test data or the software"
        return (f"differs from the row the run recorded ({changed[0]} {recorded[changed[0]]:.4g} there, {row[changed[0]]:.4g} "
                f"here): {cause} changed since")
    return None

