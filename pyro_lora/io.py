"""Saving and loading guides (safetensors + a JSON of config and site shapes), atomically."""

import contextlib
import errno
import glob
import importlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checks import check_flag, check_path, not_a_file
from .modes import building
from .digests import bytes_sha256, file_sha256
from .contract import (_fingerprint_of, check_autoguide, check_guide, check_model, check_ranks_agree, describe, differences,
                       digested_parameters, frozen_base_parameters, quantization, quantized_weights, require_lora_guide,
                       unwrapped_name, weight_digest, weight_scales, weights_digest)
from . import pyro_params
from .quantized import is_quantized
from .sites import base_network, base_rewriting_inits, describe_inits
from .ownership import follow_autoguide, forget_fit, record_fit, restore_fit, take_over, trainer
from .distributed import check_same, is_main, on_main, refused_together
from .callers import user_stacklevel

FORMAT = "pyro_lora.guide/2"
_OLD_FORMATS = ("pyro_lora.guide/1",)  # sites only, no signature
_NET = "net/"


def write_json(path, obj):
    """Write ``obj`` as standard JSON atomically (temp file + rename); only the main rank writes.

    NaN and infinities, which JSON lacks, are written as ``null`` (a value the run could not compute).
    """
    if not is_main():
        return
    with atomic_file(path) as f:
        f.write(json.dumps(standard_json(obj), indent=2, allow_nan=False, default=str))


def standard_json(obj):
    """``obj`` with every non-finite float replaced by ``None``, so that it is standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: standard_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [standard_json(v) for v in obj]
    return obj


_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports an OS error: no errno, no file


@contextlib.contextmanager
def _naming_errors(path):
    """Give an OS error of the block that names no file ``path``, the file or folder being written: a write through a
    file object failed with "[Errno 28] No space left on device" alone, safetensors' with "... (os error 28)".

    :raises OSError: of the same errno (and subclass), naming ``path``.
    """
    try:
        yield
    except OSError as error:
        if error.errno is None or error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error
    except SafetensorError as error:
        code = _OS_ERROR.search(str(error))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from error


def synced(*paths) -> None:
    """Flush each of ``paths`` (files, or folders: their entries, i.e. the renames in them) to the disk, so that a
    power loss after a rename never leaves the new name pointing at unwritten data."""
    for p in paths:
        if os.path.isdir(p) and os.name != "posix":  # folders cannot be opened for fsync outside POSIX
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """Yield a temporary file beside ``path`` that replaces it, readable by all (0644), once the block succeeds.

    A kill leaves the previous ``path`` and a hidden temporary, removed by the next write to ``path``; a failed write
    (a full disk) leaves the previous ``path`` too, and its ``OSError`` names ``path`` (:func:`_naming_errors`).
    The data reaches the disk before the rename, and the rename before the function returns (:func:`synced`).

    :param str mode: ``"w"`` (text, UTF-8) or ``"wb"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    try:
        with _naming_errors(path), os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    synced(path.parent)


def copy_file(source, target):
    """Copy the file ``source`` to ``target`` through :func:`atomic_file`: a kill mid-copy leaves ``target`` as it was."""
    with atomic_file(target, "wb") as f:
        f.write(Path(source).read_bytes())


def writable_folder(path, flag="--out"):
    """Create the folder ``path`` if needed and check that files can be written in it, before any long work.

    :param flag: the command-line flag that names it, for the error.
    :raises ValueError: if ``path`` is a file, or cannot be created or written (naming the reason).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {path} is a file: choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"cannot write to output folder {path} ({error.strerror or error}): choose another {flag}") from None
    return path


def saved_folder(path) -> str | None:
    """What ``path`` is, where it is a saved guide's folder (its ``guide.json``, or a run record ``run.json`` of the
    command line), lies inside one (its ``adapter/``), or is a peft adapter's folder (``adapter_config.json``); ``None``
    otherwise. An output written there would lie among their files: a later save of that guide refuses the entries, or
    replaces an ``adapter/`` whole with them."""
    path = Path(os.path.abspath(path))
    for folder in (path, *path.parents):
        if (folder / "guide.json").is_file() or _is_run_record(folder / "run.json"):
            return ("the folder of a saved guide (guide.json or a run's run.json there)" if folder == path
                    else f"inside the folder of the saved guide {folder}")
    if (path / "adapter_config.json").is_file():
        return "a peft adapter's folder (adapter_config.json there)"
    return None


def _is_run_record(file) -> bool:
    """Whether ``file`` is the ``run.json`` of a run of the command line (its ``config`` and ``result``), not a file
    of that name of some other tool."""
    try:
        record = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("config"), dict) and "result" in record


def check_file_slot(path, where):
    """Refuse, before any long work, a link or folder at ``path``, where a file is to be written (found late, it
    stopped the run); ``where`` ends the sentence, e.g. "the run writes a file: choose another --out".

    :raises ValueError: naming what is there.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ValueError(f"{path} is {'a link' if path.is_symlink() else 'a folder'}, where {where}")


FIT_STATE = "fit_state.pt"  # beside a checkpoint's guide: what fit(resume=True) continues from
GUIDE_FILES = ("guide.json", "guide.safetensors", "run.json", "adapter", FIT_STATE)  # what a guide's save writes
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md")  # peft's


def _named(path) -> Path:
    """``path`` as a ``Path`` with a name of its own (``"."``, ``"./"`` and ``"a/.."`` made absolute): the swap of
    :func:`atomic_directory` renames it."""
    path = Path(path)
    return Path(os.path.abspath(path)) if path.name in ("", ".", "..") else path


def check_folder_slot(path, where, own=GUIDE_FILES):
    """Refuse, before any long work, what an atomic save of a folder at ``path`` would destroy or could not write: a
    file or link there (it would be moved aside, or replaced), a folder holding entries other than ``own`` (the names
    the writer writes: the folder is replaced whole, and they would be deleted), the working folder or one above it,
    and a folder above it that cannot be created or written (created here otherwise); ``where`` ends the sentence, e.g. "fit saves the guide there as a
    folder: choose another checkpoint_dir".

    :raises ValueError: naming what is there, or why the folder above cannot be written.
    """
    path = _named(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ValueError(f"{path} is {'a link' if path.is_symlink() else 'a file'}, where {where}")
    cwd = Path(os.getcwd()).resolve()
    if path.is_dir() and (path.resolve() == cwd or path.resolve() in cwd.parents):
        raise ValueError(f"{path} is the working folder or holds it, which replacing the folder whole would remove from "
                         f"under this process, where {where}")
    try:
        foreign = sorted(e for e in os.listdir(path) if e not in own) if path.is_dir() else []  # .git, .env too
    except FileNotFoundError:  # another writer's swap moved it aside since: nothing there to destroy
        foreign = []
    if foreign:
        raise ValueError(f"{path} holds {len(foreign)} entries the save does not write (e.g. {foreign[0]!r}), which "
                         f"replacing the folder whole would delete, where {where}")
    try:  # a probe, as os.access says yes to root where the filesystem says no (/proc)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=path.parent))
    except OSError as error:
        above = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
        if above is not None and not above.is_dir():  # mkdir says "File exists" of a folder to make under a file
            raise ValueError(f"cannot write in {path.parent}: {above} is a file, not a folder, where {where}") from None
        raise ValueError(f"cannot write in {path.parent} ({error.strerror or error}), where {where}") from None


@contextlib.contextmanager
def atomic_directory(path, own=GUIDE_FILES):
    """Yield a temporary directory that replaces ``path`` only once the block succeeds.

    A crash leaves the old ``path`` (or nothing) in place, never a half-written one. A kill between the two
    renames of the swap leaves the old folder under a hidden name: :func:`recover_directory` (run here and by
    :func:`load_guide`) puts it back; temporary folders of dead processes are removed. What the swap would destroy
    is refused first (:func:`check_folder_slot`; ``own``: the names the writer writes). A failed write (a full disk)
    raises an ``OSError`` naming ``path`` (:func:`_naming_errors`). Every file reaches the disk before the swap,
    and the swap before the function returns (:func:`synced`).
    """
    path = _named(path)
    recover_directory(path)
    check_folder_slot(path, "a folder is to be written: move it, or choose another path", own)  # creates its parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        with _naming_errors(path):
            yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a saved guide is shared
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        with _naming_errors(path):
            synced(*tmp.rglob("*"), tmp)
        old = None
        try:
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
        except OSError as err:  # another writer moved the folder aside after the check (ENOENT), or its folder took
            # the place between the two renames
            if err.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                raise
            if old is not None:  # the previous folder, which the other writer's replaces (never moved, on ENOENT)
                shutil.rmtree(old, ignore_errors=True)
            raise FileExistsError(f"another process wrote {path} while this one was saving there: this save was not "
                                  "written; give each writer its own folder") from None
        synced(path.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def recover_directory(path):
    """Finish what a killed :func:`atomic_directory` left at ``path``: put back the previous folder if ``path`` is
    missing, and remove the temporary and previous folders of processes that are no longer running."""
    path = Path(path)
    # a running writer's previous folder is its own to remove, maybe while this runs: not even its time is read
    dead = [p for p in _leftovers(path, "old") if not process_alive(p.name.rsplit("-", 1)[-1])]
    for leftover in sorted(dead, key=_modified, reverse=True):
        if not path.exists():
            with contextlib.suppress(FileNotFoundError):  # another process put it back first
                os.replace(leftover, path)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    _remove_dead_temporaries(path)


def directory_written(path) -> bool:
    """Whether ``path`` holds a folder :func:`atomic_directory` wrote, or a killed replacement left its previous copy
    beside it (:func:`recover_directory` puts it back)."""
    path = Path(path)
    return path.exists() or any(_leftovers(path, "old"))


def _modified(path) -> float:
    """When ``path`` was last modified; ``-inf`` once another process recovering it has taken it."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return -math.inf


def _remove_dead_temporaries(path):
    """Remove the temporary files or folders that killed writers of ``path`` left (``.<name>.tmp-<pid>-*``)."""
    for leftover in _leftovers(path, "tmp"):
        if not process_alive(leftover.name[len(f".{path.name}.tmp-") :].split("-", 1)[0]):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _leftovers(path, kind):
    """The ``.<name>.<kind>-*`` entries a writer of ``path`` leaves beside it (the name taken literally: a ``[`` or
    ``*`` in it is no pattern)."""
    return path.parent.glob(f".{glob.escape(path.name)}.{kind}-*")


def process_alive(pid):
    """Whether process ``pid`` (a string of digits) runs: another process may be writing its folder right now."""
    if not (pid.isascii() and pid.isdigit()) or int(pid) == 0:
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


_GUIDE_CLASSES = {}  # "module:qualname" -> class: the only classes load_guide builds


def register_guide(cls):
    """Make ``cls`` (a guide class) loadable by :func:`load_guide`; every ``pyro_lora.guides.LoraGuide`` subclass registers
    itself when it is defined."""
    _GUIDE_CLASSES[f"{cls.__module__}:{cls.__qualname__}"] = cls
    return cls


def _guide_class(name, path):
    """The registered class ``guide.json`` names; anything else is refused before any import (a guide folder is
    data, never code)."""
    if name not in _GUIDE_CLASSES and isinstance(name, str) and name.startswith("pyro_lora.guides."):
        importlib.import_module("pyro_lora.guides")  # this project's guides register on import
    if name not in _GUIDE_CLASSES:
        raise ValueError(
            f"{path}/guide.json names {name!r}, which is no registered guide class: refusing to build it (a guide "
            "folder is data; only subclasses of pyro_lora.guides.LoraGuide, defined before loading, are built)"
        )
    return _GUIDE_CLASSES[name]


def save_guide(guide, path, run=None, adapter=False):
    """Write ``guide`` (its state, config, the model's site shapes and its trained point parameters) to ``path``.

    :param guide: a guide of the guides package, or a Pyro autoguide (``AutoNormal``, ``AutoDiagonalNormal``, ...)
        built over a :class:`~pyro_lora.LoraModel` and called at least once: its ``state_dict()``, the network's
        trained parameters and the model's signature, with the order and shapes of the sites its parameters stand for
        (a flat autoguide's vector has no names), which :func:`load_guide` ``(path, model, guide=autoguide)`` checks.
    :param dict run: a record of the run that produced the guide (JSON-able), written as ``run.json`` in the same
        atomic unit: a kill never leaves a guide beside another run's record.
    :param bool adapter: also write the posterior mean as a peft adapter folder ``path/adapter`` in the same unit
        (as :func:`export_adapter`): never a stale adapter beside a newer guide. Of an autoguide, the network's adapter
        as it is (as ``export_adapter(model, ...)``).

    :raises ValueError: if ``path`` is no path (:func:`~pyro_lora.checks.check_path`), if the network's point parameters are no longer the guide's (another guide trained
        them since: :func:`~pyro_lora.contract.check_guide`), since they are saved with it; with ``adapter``, as
        :func:`export_adapter` refuses, before anything is written (and warns as it warns: one set of checks,
        :func:`_check_adapter_write`); or if a base weight
        changed since the guide was loaded or last saved (read whole: the digests every save records); an autoguide
        over no ``LoraModel``, or not called yet (:func:`_autoguide_model`).

    ``path`` becomes a directory with ``guide.safetensors`` and ``guide.json`` (standard JSON: a config value that
    is inf or NaN is written as ``null``, which the guide's constructor reads back). Under ``torch.distributed``
    only rank 0 writes (the ranks hold the same guide), every rank updates its adapter (``adapter=True``), and every
    rank returns once the file is written.
    """
    return _save_guide(guide, check_path(path, "path"), run, check_flag(adapter, "adapter"))


def save_checkpoint(guide, path, fit_state) -> None:
    """:func:`save_guide` with ``fit_state`` (``fit``'s optimizer, schedule, RNG and position: a dict of tensors and
    plain values) written beside the guide as ``fit_state.pt``, in the same atomic unit: never a state beside
    another step's guide."""
    _save_guide(guide, path, None, False, fit_state)


def read_fit_state(path) -> dict:
    """The ``fit_state.pt`` of the checkpoint at ``path`` (:func:`save_checkpoint`), its tensors on the CPU (where
    torch keeps RNG states; the optimizer's move to its parameters' device as it loads them).

    :raises ValueError: if there is no guide there, the run finished, or the state is missing, unreadable, or not the
        one saved with the guide there (its SHA-256 not the one ``guide.json`` records: another run's or step's, or
        damaged; beside a ``guide.json`` of this version that records none, put there since; of a checkpoint saved
        before that was recorded, another step's).
    """
    path = Path(path)
    recover_directory(path)
    try:
        meta = _read_meta(path)
    except FileNotFoundError as err:
        raise ValueError(f"{err}: there is no run to resume; fit without resume=True starts one") from None
    if (meta.get("fit") or {}).get("finished"):
        raise ValueError(f"the run whose checkpoint is at {path} finished (step {meta['fit']['step']} of "
                         f"{meta['fit']['steps']}): there is nothing to resume; load it with load_guide")
    try:
        state = torch.load(path / FIT_STATE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path} holds no {FIT_STATE}: the checkpoint was saved without fit's training state (by "
                         "save_guide, or a fit on data without a length, under torch.distributed or of an older "
                         "version), which resuming needs; rerun the fit from the start") from None
    except Exception as err:  # pickle's and torch's many errors on a damaged file
        raise ValueError(f"{path / FIT_STATE} is corrupt: {err}") from None
    recorded = meta.get("fit_state_sha256")  # a checkpoint saved before it was recorded: its steps alone are compared
    if recorded is None and "tensors_sha256" in meta:  # a version that records it whenever it writes the state
        raise ValueError(f"{path / FIT_STATE} is not the state saved with {path / 'guide.json'}, which records none "
                         "(saved by save_guide, not a fit's checkpoint): it was put there since, or guide.json and "
                         "guide.safetensors taken from another save; put the checkpoint's own files back, or rerun "
                         "the fit from the start")
    if recorded is not None and recorded != file_sha256(path / FIT_STATE):
        raise ValueError(f"{path / FIT_STATE} is not the state saved with {path / 'guide.json'} (its SHA-256 differs "
                         "from the one recorded there): another run's or step's was put in its place, or it was "
                         "damaged, since; resuming would continue this run from another optimizer state, schedule and "
                         "data order; put the checkpoint's own back, or rerun the fit from the start")
    if not isinstance(state, dict) or state.get("progress") != meta.get("fit"):
        raise ValueError(f"{path / FIT_STATE} is not the state saved with {path / 'guide.json'} (their steps differ): "
                         "it was replaced since; rerun the fit from the start")
    return state


def _save_guide(guide, path, run, adapter, fit_state=None):
    auto = _is_autoguide(guide)
    with refused_together("save the guide"):  # a refusal on one rank only would leave the others waiting
        check_same(os.path.abspath(path), "paths to save the guide to")  # rank 0 writes its own
        if not auto:
            require_lora_guide(guide, "save the guide")
        model = _autoguide_model(guide, "save") if auto else guide.model
        if auto:  # its own parameters are its state_dict; the network's are saved as they are, which must be its own
            check_autoguide(model, guide, "save the guide")
        if adapter:  # what export_adapter checks (of an autoguide: the network's adapter as it is), these below too
            _check_adapter_write(model if auto else guide, "save")
        elif not auto:
            check_guide(model, guide, "save")  # the network's point parameters it saves must still be its own
    # rank 0 writes its own guide, and with adapter every rank then takes its mean: a rank holding another guide would
    # go on with an adapter neither the file's nor rank 0's
    check_ranks_agree(model, guide, "save the guide")
    _write_on_main(lambda: _write_guide(guide, model, path, run, adapter, fit_state), f"save the guide to {path}",
                   guide, adapter and not auto)
    return Path(path)


def _is_autoguide(guide) -> bool:
    from pyro.infer.autoguide import AutoGuide

    return isinstance(guide, AutoGuide)


def _autoguide_model(autoguide, action):
    """The :class:`~pyro_lora.LoraModel` a Pyro autoguide is built over (through Pyro's handlers).

    :raises ValueError: if it is over no ``LoraModel``, or it (or a part of an ``AutoGuideList``) was never called (it
        builds its parameters, and the layout of its sites, on its first call); for an ``AutoGuideList`` with a part
        that is a guide function of one's own (``AutoCallable``): its parameters live in Pyro's param store, which is
        not saved, so its trained values would be lost (or, loading, left as they are).
    """
    from pyro.infer.autoguide import AutoCallable
    from pyro.poutine.messenger import unwrap

    from .model import LoraModel

    name = type(autoguide).__name__
    model = unwrap(autoguide.model)
    if not isinstance(model, LoraModel):
        raise ValueError(f"cannot {action} this {name}: it is built over a {type(model).__name__}, not a pyro_lora "
                         f"LoraModel; build it over the model ({name}(model))")
    parts = _autoguide_parts(autoguide)
    functions = [path for path, part in parts if isinstance(part, AutoCallable)]
    if functions:
        raise ValueError(f"cannot {action} this {name}: its part{'s' * (len(functions) > 1)} {', '.join(functions)} "
                         "is a guide function of your own (AutoCallable), whose parameters live in Pyro's param store, "
                         "which save_guide does not keep: its trained values would be lost; make each part an autoguide "
                         "(e.g. AutoNormal(poutine.block(model, expose=[...])))")
    if autoguide.prototype_trace is None or any(part.prototype_trace is None for _, part in parts):
        raise ValueError(f"cannot {action} this {name}: it was never called, so it has no parameters yet; call it once "
                         "on a labelled batch (autoguide(batch)) first, as SVI's first step does")
    return model


def _autoguide_parts(autoguide, path=None) -> list:
    """``[(path, autoguide)]``: an ``AutoGuideList``'s parts, within nested lists too (path ``"0.1"``), or the
    autoguide itself (path None)."""
    from pyro.infer.autoguide import AutoGuideList

    if not isinstance(autoguide, AutoGuideList):
        return [(path, autoguide)]
    return [leaf for i, part in enumerate(autoguide)
            for leaf in _autoguide_parts(part, str(i) if path is None else f"{path}.{i}")]


def _autoguide_sites(autoguide, model) -> list:
    """``[name, shape]`` of each latent site of the autoguide's first trace of ``model``, in its order: what its
    parameters stand for (a flat vector's entries, for ``AutoDiagonalNormal`` and the like, site after site).
    ``AutoStructured`` and ``AutoGaussian`` empty that trace's nodes once set up (their parameters are named by site):
    an emptied node of a weight site stands for it at the model's shape. An ``AutoGuideList``'s are each part's own,
    ``[name, shape, part]`` (``part``: its index, ``"0.1"`` within a nested list, :func:`_autoguide_parts`): its
    parts' parameters are named by their index alone (``0.loc``), so parts over other sites of the same shapes have
    the same keys."""
    return [[name, list(node["value"].shape if node else model.sites[name].shape), *([path] if path else [])]
            for path, part in _autoguide_parts(autoguide)
            for name, node in part.prototype_trace.nodes.items()
            if (node.get("type") == "sample" and not node["is_observed"]) or (not node and name in model.sites)]


def _write_guide(guide, model, path, run, adapter, fit_state=None):
    auto = _is_autoguide(guide)
    base = _base_weights(model)  # every base weight, exactly (the fingerprint reads 4096 entries per weight)
    if not auto and guide._base_records is not None:  # an autoguide keeps no records of the base it was built on
        changed = _changed_since(guide._base_records, base["weights"], model)
        if changed and _rounded_only(guide, changed):
            raise ValueError(f"cannot save the guide to {path}: the base weights changed since it was built, loaded or "
                             f"last saved ({_which(changed)}), by rounding only as far as the 4096 entries per weight "
                             "its fingerprint reads tell, as a peft merge_adapter()/unmerge_adapter() round trip (or "
                             "another in-place float operation) rounds them; predictions barely change, but the saved "
                             "record of the base is exact, and a change of a few entries would look the same: copy the "
                             "checkpoint's values back into these weights (docs/saving.md shows how), and for fast "
                             "inference merge_and_unload() a copy of the network instead")
        if changed:
            raise ValueError(f"cannot save the guide to {path}: the base weights changed since it was built, loaded or "
                             f"last saved ({_which(changed)}), and it was fitted on the others; load the checkpoint it "
                             "was fitted on back into the network first")
    tensors = {k: v.detach().contiguous().cpu() for k, v in guide.state_dict().items()}
    tensors.update({_NET + n: p.detach().contiguous().cpu() for n, p in model.named_adapter_parameters()})
    # safetensors refuses tensors sharing memory: AutoNormalizingFlow's (AutoIAFNormal's) _prototype_tensor is its
    # transform's first weight. Each is saved as a copy; loading copies each value in place, into the one tensor twice
    seen = set()
    for k, v in tensors.items():
        if v.untyped_storage().data_ptr() in seen:
            tensors[k] = v.clone()
        seen.add(v.untyped_storage().data_ptr())
    meta = standard_json({  # JSON has no inf or NaN (ivon-opt's default clip_radius is inf): written as null
        "format": FORMAT,
        "guide": f"{type(guide).__module__}:{type(guide).__qualname__}",
        # an autoguide is built by its user (load_guide checks it): the sites its parameters stand for, in order
        **({"autoguide": {"sites": _autoguide_sites(guide, model)}} if auto else {"config": guide.config()}),
        "sites": {n: list(s.shape) for n, s in model.sites.items()},
        "base_model": getattr(getattr(model.net, "config", None), "_name_or_path", None),
        "signature": describe(model) if auto else guide.signature,
        "base_weights": base,
        # how far the fit that trained it got: a checkpoint of a stopped run must not pass for its result
        **({} if auto or guide.fit_progress is None else {"fit": guide.fit_progress}),
    })
    with atomic_directory(path) as tmp:
        # guide.json records the SHA-256 of every file beside it, which load_guide, check_sealed and read_fit_state
        # compare: a damaged copy, or another save's file put in its place, is refused
        save_file(tensors, str(tmp / "guide.safetensors"))
        meta["tensors_sha256"] = file_sha256(tmp / "guide.safetensors")
        if fit_state is not None:
            torch.save(fit_state, tmp / FIT_STATE)
            meta["fit_state_sha256"] = file_sha256(tmp / FIT_STATE)
        if adapter:
            if auto:
                _save_adapter(model, tmp / "adapter")
            else:
                _write_adapter(guide, tmp / "adapter")
        meta["adapter_sha256"] = _adapter_sha256(tmp / "adapter")  # {} without one: an adapter/ put there is refused
        meta["meta_sha256"] = meta_sha256(meta)  # its own settings (a temperature, a dropout p) read the tensors
        if run is not None:  # sealed together: check_sealed refuses any of the files edited or swapped since
            record = json.dumps(standard_json({**run, "guide_sha256": bytes_sha256(_canonical(meta))}), indent=2,
                                allow_nan=False, default=str).encode()
            meta["run_sha256"] = bytes_sha256(record)
            (tmp / "run.json").write_bytes(record)
        (tmp / "guide.json").write_text(json.dumps(meta, indent=2, allow_nan=False))
    if not auto:
        guide._base_records = base["weights"]


_ROUNDING_ULPS = 4  # entries moved by at most this many units in the last place move each fingerprint sum so little


def _rounded_only(guide, changed) -> bool:
    """Whether each weight named in ``changed`` (whose digest differs from the guide's record) still has the
    fingerprint the guide's signature recorded, to within what moving every entry it reads by
    ``_ROUNDING_ULPS`` units in the last place of the weight's dtype gives: a rounding-level change, such as a peft
    merge/unmerge round trip leaves. Only a diagnosis for the refusal: the fingerprint misses entries between its
    strides, so such a change is never let through."""
    recorded = guide.signature.get("base", {}).get("fingerprint")
    if not isinstance(recorded, dict):  # an older guide's single number
        return False
    by_key = {unwrapped_name(n): v for n, v in recorded.items()}
    params = dict(guide.model.net.named_parameters())
    for name in changed:
        then, p = by_key.get(unwrapped_name(name)), params.get(name)
        if not (isinstance(then, list) and len(then) == 3 and p is not None and p.is_floating_point()):
            return False
        now = _fingerprint_of(p)
        bound = _ROUNDING_ULPS * torch.finfo(p.dtype).eps * max(abs(then[0]), abs(now[0]))
        if any(abs(a - b) > bound for a, b in zip(then, now)):
            return False
    return True


def _adapter_sha256(folder) -> dict:
    """File (relative to ``folder``, ``/``-separated) -> SHA-256, of the files peft reads in the adapter folder
    ``folder`` (:func:`_read_by_peft`); ``{}`` where there is none."""
    return {name: file_sha256(p) for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and _read_by_peft(name := p.relative_to(folder).as_posix())}


def _read_by_peft(name: str) -> bool:
    """Whether peft reads the adapter folder's file ``name`` (its ``adapter_config.json`` and ``adapter_model.*``, of
    any adapter's subfolder): not its model card (``README.md``, which its template invites editing), nor what an OS or
    editor leaves there (``.DS_Store``, ``.ipynb_checkpoints/``)."""
    parts = name.split("/")
    return parts[-1].startswith("adapter_") and not any(part.startswith(".") for part in parts)


def meta_sha256(meta: dict) -> str:
    """The SHA-256 of ``guide.json``'s contents ``meta`` as :func:`save_guide` records it in ``meta_sha256``: of every
    key but that one and ``run_sha256`` (written after it), canonically ordered."""
    return bytes_sha256(json.dumps({k: v for k, v in meta.items() if k not in ("meta_sha256", "run_sha256")},
                                   sort_keys=True).encode())


def _canonical(meta: dict) -> bytes:
    return json.dumps({k: v for k, v in meta.items() if k != "run_sha256"}, sort_keys=True).encode()


_AGAIN = "copy the folder again from where it was saved, or save the guide again"


def _check_beside(path, meta) -> None:
    """Refuse a file beside ``guide.json`` (``meta``) in the guide folder ``path`` other than the one saved with it,
    missing, or not written by the save: ``run.json`` (its SHA-256 ``run_sha256``; the record holds ``guide.json``'s in
    turn) and each file of ``adapter/`` (``adapter_sha256``). What saves of earlier versions recorded nothing of is not
    compared: ``run.json`` is from the version recording ``tensors_sha256`` on (which records ``run_sha256`` whenever
    it writes the record), ``adapter/`` from the one recording ``adapter_sha256`` (``{}`` where it wrote none).

    :raises ValueError: naming the file, and what to do.
    """
    run, own, folder = path / "run.json", path / "guide.json", path / "adapter"
    if "run_sha256" in meta:
        if not run.is_file():
            raise ValueError(f"{run} {not_a_file(run, 'is missing')}: {own} records the run record saved with it (save_guide's run=); {_AGAIN}")
        record = run.read_bytes()
        if bytes_sha256(record) != meta["run_sha256"]:
            raise ValueError(f"{run} is not the record saved with its guide (its SHA-256 differs from the one {own} "
                             f"holds): it was edited since, or it (or guide.json with guide.safetensors) taken from another "
                             f"save; {_AGAIN}")
        if json.loads(record).get("guide_sha256") != bytes_sha256(_canonical(meta)):
            raise ValueError(f"{own} is not the one saved with {run}: it was edited or replaced since; {_AGAIN}")
    elif "tensors_sha256" in meta and run.exists():
        raise ValueError(f"{run} is not the record saved with its guide: {own} records none (saved without run=), so it "
                         f"was put there since, or guide.json and guide.safetensors taken from another save; {_AGAIN}")
    recorded = meta.get("adapter_sha256")
    if recorded is None or not folder.exists():  # an adapter removed leaves nothing stale beside the guide
        return
    recorded = {n: v for n, v in recorded.items() if _read_by_peft(n)}  # a save's before README.md was left out
    found = _adapter_sha256(folder)
    if found == recorded:
        return
    if not recorded:
        raise ValueError(f"{folder} was not saved with {own}, which records no adapter (saved without adapter=True): it "
                         "was put there since; remove it, or save the guide with adapter=True, which writes it in the "
                         "same unit")
    how = [f"{n} {'changed' if n in found and n in recorded else 'missing' if n in recorded else 'added'}"
           for n in sorted(found.keys() | recorded.keys()) if found.get(n) != recorded.get(n)]
    raise ValueError(f"{folder} is not the adapter saved with {own} ({', '.join(how)}, against the SHA-256 of each "
                     f"file recorded there): it was edited, or another save's put in its place, since; {_AGAIN}")


def check_sealed(path) -> None:
    """Refuse a guide folder saved with a run record (:func:`save_guide` with ``run``) whose ``run.json``,
    ``guide.json``, ``guide.safetensors`` or ``adapter/`` changed since, or was taken from another save
    (:func:`_check_beside`).

    :raises ValueError: naming the file that is not the one saved with the others, or that is damaged or missing
        (``guide.json`` not JSON or edited, as :func:`load_guide` reads it; ``guide.safetensors`` gone).
    :raises FileNotFoundError: where ``guide.json`` is missing.
    """
    path = Path(path)
    meta = _json_object(path)  # a truncated or non-UTF-8 file, an array: named, as load_guide names them
    if meta.get("format") != FORMAT or "run_sha256" not in meta:
        raise ValueError(f"{path / 'run.json'} is not the record saved with its guide ({path / 'guide.json'} records "
                         "none, or is of another format): it was edited or replaced since")
    _check_beside(path, meta)
    tensors = path / "guide.safetensors"
    if not tensors.is_file() or meta.get("tensors_sha256") != file_sha256(tensors):
        raise ValueError(f"{tensors} is not the one saved with {path / 'guide.json'}: it was "
                         f"{'edited or replaced' if tensors.is_file() else 'removed'} since; {_AGAIN}")


_JSON_TYPES = {dict: "object", str: "string", list: "array", int: "number", float: "number", bool: "boolean", type(None): "null"}


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _base_record_problem(saved) -> str | None:
    """What is wrong with the ``base_weights`` record of ``guide.json`` (:func:`_base_weights`, or an older guide's
    whole-base digest), or ``None``: a malformed one would skip a weight's check, or fail in the middle of it."""
    def kind(value):
        return f"a JSON {_JSON_TYPES.get(type(value), 'value')}"

    def digests(values):
        return all(isinstance(v, str) and _SHA256.fullmatch(v) for v in values)

    if not isinstance(saved, dict):
        return f"should hold a JSON object, it holds {kind(saved)}"
    if not isinstance(saved.get("dtype"), str):
        return f"'dtype' should hold a JSON string, it holds {kind(saved.get('dtype')) if 'dtype' in saved else 'nothing'}"
    for key, types in (("quantization", (str, type(None))), ("quantized", (bool,)), ("sha256", (str,)), ("held", (list,)),
                       ("cast_sha256", (dict,)), ("weights", (dict,))):
        if key in saved and not isinstance(saved[key], types):
            return f"{key!r} holds {kind(saved[key])}"
    if "weights" not in saved and "sha256" not in saved:
        return "records neither 'weights' nor 'sha256'"
    if not digests([saved["sha256"]] if "sha256" in saved else []) or not digests(saved.get("cast_sha256", {}).values()):
        return "'sha256' or 'cast_sha256' holds a value other than a SHA-256 (64 hexadecimal digits)"
    if not set(saved.get("held", [])) | set(saved.get("cast_sha256", {})) <= set(_FLOATS):
        return f"'held' or 'cast_sha256' names a dtype other than {', '.join(_FLOATS)}"
    if saved.get("weights") == {}:
        return "'weights' records no weight"
    for name, record in saved.get("weights", {}).items():
        fine = (isinstance(record, dict) and {"dtype", "sha256"} <= record.keys() <= {"dtype", "sha256", *_FLOATS}
                and (record["dtype"] in _FLOATS or re.fullmatch(r"quantized:torch\.\w+", str(record["dtype"])))
                and digests(v for k, v in record.items() if k != "dtype"))
        if not fine:
            return (f"entry {name!r} of 'weights' should map 'dtype' to a torch float dtype (or 'quantized:<dtype>') and "
                    f"'sha256' to a SHA-256, it holds {json.dumps(record)[:120]}")
    return None


def _json_object(path) -> dict:
    """``guide.json`` of the folder ``path`` as a JSON object, its damage named (what :func:`check_sealed` reads).

    :raises FileNotFoundError: if it is missing.
    :raises ValueError: if it is no file, not UTF-8 JSON or not an object.
    """
    file = path / "guide.json"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        moved = sorted(_leftovers(path, "old")) if not path.exists() else []
        hint = (f"; a save by process {moved[0].name.rsplit('-', 1)[-1]} moved the previous guide to {moved[0]} and "
                "has not put a new one in its place: if that process is no longer saving (a process id reused after a "
                f"kill), rename {moved[0].name} back to {path.name}") if moved else ""
        raise FileNotFoundError(f"{path} holds no saved guide (guide.json missing){hint}") from None
    except IsADirectoryError:
        raise ValueError(f"{file} {not_a_file(file)}: {path} holds no saved guide") from None
    except NotADirectoryError:  # path, or a folder above it, is a file
        raise ValueError(f"{path} is no folder (a file is on its path): a saved guide is the folder save_guide wrote") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:  # both name a position only, never the file
        raise ValueError(f"{file} is corrupt: it is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file} is corrupt: it holds a JSON {_JSON_TYPES.get(type(meta), 'value')}, not an object")
    return meta


def _read_meta(path):
    """``guide.json`` of the guide folder ``path``, checked for every key :func:`load_guide` reads.

    :raises FileNotFoundError: if it is missing.
    :raises ValueError: if it is not UTF-8 JSON, not an object, of another format, or lacks a key.
    """
    meta = _json_object(path)
    file = path / "guide.json"
    if meta.get("format") not in (FORMAT, *_OLD_FORMATS):
        raise ValueError(f"{file} is not a pyro_lora guide (format {meta.get('format')!r})")
    # an old format holds the site shapes only; the current one the whole signature; an autoguide's, no config
    config = ("autoguide", dict) if "autoguide" in meta else ("config", dict)
    for key, kind in (("guide", str), config, ("signature" if meta["format"] == FORMAT else "sites", dict)):
        if not isinstance(meta.get(key), kind):
            found = f"a JSON {_JSON_TYPES.get(type(meta[key]), 'value')}" if key in meta else "nothing"
            raise ValueError(f"{file} is corrupt: key {key!r} should hold a JSON {_JSON_TYPES[kind]}, it holds {found}")
    sites = meta["autoguide"].get("sites") if "autoguide" in meta else []
    if not (isinstance(sites, list) and all(isinstance(x, list) and len(x) in (2, 3) and isinstance(x[0], str) and
                                            isinstance(x[1], list) and all(type(d) is int for d in x[1]) and
                                            all(isinstance(p, str) for p in x[2:]) for x in sites)):
        raise ValueError(f"{file} is corrupt: its 'autoguide' should map 'sites' to a list of [site name, shape] (and "
                         "part, in a list of guides), it "
                         f"holds {json.dumps(meta['autoguide'])[:80]}")
    for key in ("tensors_sha256", "fit_state_sha256", "run_sha256", "meta_sha256"):  # older saves lack them
        if key in meta and not (isinstance(meta[key], str) and _SHA256.fullmatch(meta[key])):
            raise ValueError(f"{file} is corrupt: its {key!r} should hold a SHA-256 (64 hexadecimal digits), it holds "
                             f"{json.dumps(meta[key])[:80]}")
    adapter = meta.get("adapter_sha256", {})  # older saves lack it
    if not (isinstance(adapter, dict) and all(isinstance(v, str) and _SHA256.fullmatch(v) for v in adapter.values())):
        raise ValueError(f"{file} is corrupt: its 'adapter_sha256' should map each file of adapter/ to a SHA-256 (64 "
                         f"hexadecimal digits), it holds {json.dumps(adapter)[:80]}")
    problem = _base_record_problem(meta["base_weights"]) if "base_weights" in meta else None  # older guides lack it
    if problem:
        raise ValueError(f"{file} is corrupt: its 'base_weights' {problem}")
    problem = _signature_problem(meta["signature"]) if meta["format"] == FORMAT else None
    if problem:
        raise ValueError(f"{file} is corrupt: its 'signature' {problem}")
    if "fit" in meta and not _is_progress(meta["fit"]):
        raise ValueError(f"{file} is corrupt: its 'fit' should map 'step', 'steps', 'epoch' and 'epochs' to counts "
                         f"('steps' null for data without a length) and 'finished' to true or false, it holds "
                         f"{json.dumps(meta['fit'])[:120]}")
    if "meta_sha256" in meta and meta["meta_sha256"] != meta_sha256(meta):  # older saves lack it
        raise ValueError(f"{file} was edited since it was saved (its contents no longer match the SHA-256 it records): "
                         "its settings (a posterior temperature, a dropout probability) say how its tensors are read, so "
                         "an edited one would load another posterior without a word; load the guide as saved and change "
                         "a setting through its methods (set_temperature(...)), then save it again")
    return meta


def _warn_unsealed(path, meta) -> None:
    """Warn where a guide of the current format records no digest of its settings or tensors: saved by a version
    before they were recorded, or its digests deleted by hand, which would take every check of an edit with them (a
    temperature changed, a checkpoint's progress removed to pass for a result, a tensor replaced)."""
    missing = [key for key in ("meta_sha256", "tensors_sha256") if key not in meta]
    if meta["format"] == FORMAT and missing:
        warnings.warn(f"the guide at {path} records no {' or '.join(missing)} (saved by a version before they were "
                      "recorded, or its guide.json edited): an edit to its settings or tensors goes unseen; load it "
                      "only if you trust the folder, and save it again to record them", stacklevel=user_stacklevel())


def _is_progress(fit) -> bool:
    """Whether ``fit`` is a :attr:`~pyro_lora.guides.LoraGuide.fit_progress` as ``fit`` records it."""
    def count(v):
        return type(v) is int and v >= 0

    return (isinstance(fit, dict) and fit.keys() == {"step", "steps", "epoch", "epochs", "finished"}
            and all(count(fit[k]) for k in ("step", "epoch", "epochs")) and (fit["steps"] is None or count(fit["steps"]))
            and type(fit["finished"]) is bool)


# the JSON kind of each entry :func:`~pyro_lora.contract.describe` writes; "prior" is a number or a class name
_SIGNATURE_KINDS = {"model": str, "adapter": str, "sites": dict, "scaling": dict, "base": dict, "head": dict,
                    "tokens": dict, "likelihood": dict}


def _signature_problem(signature) -> str | None:
    """What is malformed in a saved signature's entries (a hand edit), else ``None``: compared as they are, a prior
    of ``"1.0"`` or tokens of ``[]`` would be refused as another model's, with advice that cannot be followed."""
    for key, kind in _SIGNATURE_KINDS.items():
        if key in signature and not isinstance(signature[key], kind):
            return (f"entry {key!r} should hold a JSON {_JSON_TYPES[kind]}, it holds "
                    f"{json.dumps(signature[key])[:80]}")
    tokens = signature.get("tokens", {})
    if not all(isinstance(ids, list) and all(type(t) is int for t in ids) for ids in tokens.values()):
        return f"entry 'tokens' should map each module to a list of token ids, it holds {json.dumps(tokens)[:80]}"
    prior = signature.get("prior", 0.0)
    if not (type(prior) in (int, float) or isinstance(prior, str) and prior.isidentifier()):
        return f"entry 'prior' should hold a number (the prior's std) or a class name, it holds {json.dumps(prior)[:80]}"
    return None


def _read_tensors(path, device, sha256=None):
    """The tensors of ``guide.safetensors`` in the guide folder ``path``, each checked to be finite, and the file to be
    the one saved with ``guide.json``: its SHA-256 the ``sha256`` recorded there (``None``, as saves before it was
    recorded: not compared).

    :raises FileNotFoundError: if it is missing.
    :raises ValueError: as :func:`read_safetensors`, or if its SHA-256 is not ``sha256`` (a bit flipped, or another
        save's file copied in: both read as valid tensors).
    """
    file = path / "guide.safetensors"
    if not file.is_file():
        raise (ValueError if file.exists() else FileNotFoundError)(f"{file} {not_a_file(file, 'is missing')}: the guide "
                                                                    f"at {path} is incomplete")
    tensors = read_safetensors(file, device)
    if sha256 is not None and file_sha256(file) != sha256:
        raise ValueError(f"{file} is not the one saved with {path / 'guide.json'} (its SHA-256 differs from the one "
                         "recorded there): damaged, or another save's put in its place, since; copy the folder again "
                         "from where it was saved, or save the guide again")
    return tensors


def read_safetensors(file, device="cpu"):
    """The tensors of the safetensors ``file`` (a guide's, a peft adapter's), each checked to be finite.

    :raises ValueError: naming the file, if safetensors cannot read it (truncated, not a safetensors file), or a
        tensor holds NaN or inf (predictions would be NaN without a word).
    """
    from safetensors import SafetensorError

    try:
        tensors = load_file(str(file), device=device)
    except (SafetensorError, OSError) as err:  # safetensors' message names neither the file nor the tensor
        raise ValueError(f"{file} is corrupt: safetensors cannot read it ({err})") from None
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
            bad = "NaN" if t.isnan().any() else "infinite"
            raise ValueError(f"{file} is corrupt: tensor {name!r} holds {bad} values, which would give NaN predictions")
    return tensors


def _check_tensors(file, tensors, guide, adapter_params, net_params):
    """Refuse, naming the tensor, any tensor of ``file`` that ``guide``'s state dict or the model's adapter parameters
    (what :func:`save_guide` writes) lack or hold in another shape, and any state of ``guide`` the file lacks:
    load_state_dict would fail half-way through, or a base weight frozen here would be overwritten."""
    state = guide.state_dict()
    owner = type(guide).__name__
    for key, t in tensors.items():
        net = key.startswith(_NET)
        name, expected = (key[len(_NET) :], adapter_params) if net else (key, state)
        what = f"network parameter {name!r}" if net else f"{owner} tensor {name!r}"
        if net and name in net_params and name not in adapter_params:
            raise ValueError(f"{file} holds {what}, trained with the guide, which this model keeps frozen as a base weight "
                             "(was the guide's adapter built with peft's bias='all' or 'lora_only', or that parameter "
                             "unfrozen?): build the adapter as the guide's")
        if name not in expected:
            raise ValueError(f"{file} holds {what}, which this {'model' if net else owner} lacks")
        if t.shape != expected[name].shape:
            raise ValueError(
                f"{file} holds {what} of shape {tuple(t.shape)}, where this {'model' if net else owner} has "
                f"{tuple(expected[name].shape)}"
            )
    missing = sorted(set(state) - set(tensors))
    if missing:
        raise ValueError(f"{file} lacks the {owner} tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''}")


def _check_unrounded(path, written, net_params, net):
    """Refuse a saved network parameter that this network holds in a narrower dtype whose rounding its module's forward
    would show (:func:`_rounding`): a trained LayerNorm copy (peft's ``modules_to_save``) of a half-precision base
    that is frozen here, where the guide's model held it trainable, in float32."""
    for name, value in written.items():
        target = net_params[name]
        module = net.get_submodule(name.rpartition(".")[0])
        change = _rounding(module, value, target.dtype)
        if change:
            raise ValueError(f"cannot load the guide at {path} into this model: its trained {name} would be written into "
                             f"this network's {str(target.dtype).removeprefix('torch.')} parameter, rounded by up to "
                             f"{change:.2g}, which the {type(module).__name__}'s forward runs at full precision (other "
                             "predictions than the guide's); build the model over a network holding that module "
                             "trainable, as the guide's did (get_peft_model as it was, or PeftModel.from_pretrained(..., "
                             "is_trainable=True)): the model holds trainable parameters in float32")


# the float dtypes a base is held in, widest first: a checkpoint's weight cast to a narrower one is the same whichever
# wider dtype it was cast from, so a weight is compared whole across such a cast
_FLOATS = {str(d): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}
_HALVES = ("torch.bfloat16", "torch.float16")


def _narrower(dtype: str) -> list:
    """The float dtypes ``dtype`` (a name) casts down to: float32 and both halves for float64, both halves for float32."""
    names = list(_FLOATS)
    return [] if dtype not in _FLOATS or dtype in _HALVES else names[names.index(dtype) + 1:]


def _base_weights(model) -> dict:
    """What :func:`_check_base_weights` compares: the compute dtype, the quantization
    (:func:`~pyro_lora.contract.quantization`) and each base weight's dtype and SHA-256s (:func:`_weight_records`;
    a quantized weight's with its scales)."""
    return {"dtype": str(model.compute_dtype), "quantization": quantization(model.net), "weights": _weight_records(model)}


def _dtype_name(p) -> str:
    """A base weight's dtype as its record names it; ``"quantized:<storage dtype>"`` for quantized codes
    (:func:`~pyro_lora.quantized.is_quantized`), whatever dtype stores them."""
    return f"quantized:{p.dtype}" if is_quantized(p) else str(p.dtype)


def _base_parameters(model) -> tuple[list, set]:
    """(``(name, parameter)`` of the base weights a guide's record reads, the unwrapped names of the ones it leaves
    out): :func:`~pyro_lora.contract.digested_parameters` but for the frozen original of a module whose trained copy
    the model's adapter holds (peft's ``modules_to_save``): it never runs under that adapter, and a head transformers
    drew at load differs by seed."""
    kept, left_out = [], set()
    for name, p in digested_parameters(model.net):
        wrapper, original, _ = name.partition(".original_module.")
        if original and model.adapter in getattr(model.net.get_submodule(wrapper), "modules_to_save", {}):
            left_out.add(unwrapped_name(name))
        else:
            kept.append((name, p))
    return kept, left_out


def _weight_records(model) -> dict:
    """Base weight name -> ``{"dtype", "sha256"}`` as held (quantized codes with their scales), plus its SHA-256 as
    cast to each narrower float dtype (:func:`_narrower`): the same weight of a base of the checkpoint loaded in that
    dtype. A pass over the weights each: one for a half-precision base, three for a float32 one."""
    out = {}
    for name, p in _base_parameters(model)[0]:
        held = _dtype_name(p)
        record = {"dtype": held, "sha256": weight_digest(name, p, scales=weight_scales(model.net, name))}
        record.update({n: weight_digest(name, p, _FLOATS[n]) for n in _narrower(held)})
        out[name] = record
    return out


_REBUILDING = []  # non-empty while load_guide rebuilds a guide, whose records come from its file


@contextlib.contextmanager
def _rebuilding(path):
    """While :func:`load_guide` builds the guide saved at ``path``: :func:`records_at_build` records nothing."""
    _REBUILDING.append(path)
    try:
        yield
    finally:
        _REBUILDING.pop()


def records_at_build(model):
    """The records of ``model``'s base weights (:func:`_weight_records`, casts too: a base cast after the guide was
    built is compared through them) that a new guide keeps, so that :func:`save_guide` refuses a base changed since
    the guide was built; ``None`` while :func:`load_guide` rebuilds a guide."""
    return None if _REBUILDING else _weight_records(model)


def _compare_one(record: dict, saved_name: str, name: str, p, net, codes_comparable: bool):
    """``(same, why not comparable)`` of the weight ``p`` named ``name`` here against its ``record``, saved under
    ``saved_name``: compared as held where both sides hold one dtype, else through the narrower of the two float
    dtypes; bfloat16 against float16 cannot be compared whole (no cast takes one checkpoint's two half weights to
    the same values), nor quantized codes of another quantization (``codes_comparable`` false) or against float
    weights: then ``(None, why)``."""
    now, then = _dtype_name(p), record["dtype"]
    if (now in _FLOATS) != (then in _FLOATS):
        return None, "quantized on one side only"
    if now not in _FLOATS and (now != then or not codes_comparable):
        return None, "quantized otherwise, or from weights in another dtype, on each side"
    if now == then:
        digest, cast = record["sha256"], None
    elif now in record:  # a wider weight there, this one's dtype here: its cast
        digest, cast = record[now], None
    elif then in _narrower(now):  # the reverse
        digest, cast = record["sha256"], _FLOATS[then]
    else:
        return None, ("held in bfloat16 on one side and float16 on the other" if {now, then} <= set(_FLOATS)
                      else f"held in {then} there and {now} here")
    # the digest reads the name as the record's base held it
    return digest == weight_digest(saved_name, p, cast, weight_scales(net, name)), None


def _changed_since(old: dict, new: dict, model) -> list:
    """Names of the base weights whose records ``new`` (now) tell apart from ``old`` (the guide's last save, load or
    build), in the records alone where a weight kept its name (as held, or through a cast either records), and by
    reading it again where peft's wrapping renamed it since (a digest reads the name); weights held in two half
    dtypes, or quantized otherwise, are not compared."""
    by_key = {unwrapped_name(n): n for n in old}
    params = dict(_base_parameters(model)[0])
    changed = []
    for name, now in new.items():
        old_name = name if name in old else by_key.get(unwrapped_name(name))
        if old_name is None:
            continue
        then = old[old_name]
        if old_name != name:
            same = _compare_one(then, old_name, name, params[name], model.net, True)[0]
        elif then["dtype"] == now["dtype"]:
            same = then["sha256"] == now["sha256"]
        elif now["dtype"] in then:  # wider then: its cast to this dtype
            same = then[now["dtype"]] == now["sha256"]
        elif then["dtype"] in now:  # wider now: its cast to that dtype
            same = now[then["dtype"]] == then["sha256"]
        else:
            same = None
        if same is False:
            changed.append(name)
    return changed


def _compare_weights(saved: dict, model, codes_comparable: bool) -> tuple[list, dict, dict]:
    """(names of the base weights that differ from the guide's records, name -> why it cannot be compared whole
    (:func:`_compare_one`), name -> why it is frozen on one side only)."""
    kept, left_out = _base_parameters(model)
    held = {unwrapped_name(n): (n, p) for n, p in kept}
    records = {unwrapped_name(n): (n, r) for n, r in saved.items() if unwrapped_name(n) not in left_out}
    everywhere = {unwrapped_name(n) for n, _ in model.net.named_parameters()}
    unmatched = {records[k][0]: "frozen in the guide's base, " + ("not frozen here (trainable, or drawn at load)"
                                                                   if k in everywhere else "absent here")
                 for k in records.keys() - held.keys()}
    unmatched.update({held[k][0]: "frozen here, not among the guide's base weights (trainable there, or absent)"
                      for k in held.keys() - records.keys()})
    differ, unknown = [], {}
    for key in held.keys() & records.keys():
        (name, p), (saved_name, record) = held[key], records[key]
        same, why = _compare_one(record, saved_name, name, p, model.net, codes_comparable)
        if why is not None:
            unknown[name] = why
        elif not same:
            differ.append(name)
    return sorted(differ), unknown, unmatched


def _held(net) -> list:
    """The floating-point dtypes of the base weights, as names."""
    return sorted({str(p.dtype) for _, p in digested_parameters(net) if not is_quantized(p)})


def _compare_old_record(saved: dict, net) -> tuple[list, list]:
    """:func:`_compare_weights` for a guide saved before each weight was recorded: the SHA-256 of the whole base as
    held and, for guides saved from 2026-12-02, as cast to the half dtypes. A cast digest compares where the model
    holds no other half dtype; where none does, nothing is compared whole."""
    if saved.get("sha256") == weights_digest(net):
        return [], []
    held = set(_held(net))
    # the dtypes held there: recorded from 2026-12-02, else the compute dtype where float32 (a half-precision base may
    # have kept a module in float32)
    then = saved.get("held") or ([saved.get("dtype")] if saved.get("dtype") not in _HALVES else None)
    if then is not None and set(then) == held:  # the same dtypes on both sides: the digest as held decides
        return [_WHOLE], []
    casts = saved.get("cast_sha256") or {}
    comparable = [n for n in casts if n in _FLOATS and held & set(_HALVES) <= {n}]
    if not comparable:
        return [], [_WHOLE]
    same = any(casts[n] == weights_digest(net, _FLOATS[n]) for n in comparable)
    return ([] if same else [_WHOLE]), []


_WHOLE = "the whole base"  # what an older record's digest reads


def _which(names) -> str:
    names = sorted(names)
    return _WHOLE if names == [_WHOLE] else f"{len(names)} base weight{'s' if len(names) > 1 else ''}, e.g. {names[0]}"


def _saved_quantization(saved, meta, net) -> tuple[bool, bool]:
    """(whether the guide's base was quantized, whether its quantization settings were recorded). Guides saved
    earlier recorded a flag, or nothing: then a base weight of the model missing from the guide's fingerprint,
    which reads float weights only, was quantized there."""
    if "quantization" in saved:
        return saved["quantization"] is not None, True
    if "quantized" in saved:
        return bool(saved["quantized"]), False
    fingerprint = (meta.get("signature") or {}).get("base", {}).get("fingerprint")
    weights = {n for n, _ in frozen_base_parameters(net)} | set(quantized_weights(net))
    return isinstance(fingerprint, dict) and bool(weights - set(fingerprint)), False


def _refuse_differing(path, differ):
    raise ValueError(
        f"cannot load the guide at {path} into this model: the base weights differ from the ones the guide was "
        f"saved with ({_which(differ)}; read whole: a change its fingerprint of 4096 entries per weight misses, e.g. "
        "two embedding rows swapped): load the checkpoint it was fitted on"
    )


def _check_base_weights(path, meta, model):
    """Refuse base weights other than the saved guide's, read whole where they can be compared
    (:func:`_compare_weights`), and a base whose frozen weights are others than the guide's. Weights held in bfloat16
    on one side and float16 on the other, and older guides' records that cannot tell, are compared only by the
    signature's 4096-entry fingerprint; quantized weights of another quantization, or quantized on one side only, by
    nothing but the configuration: warned, naming why."""
    saved = meta.get("base_weights")  # _read_meta checked its structure
    if saved is None and meta["format"] != FORMAT:  # no fingerprint either: load_guide warned that nothing was compared
        return
    if saved is None:
        warnings.warn(f"the guide at {path} records no digest of its base weights (saved before they were recorded, or "
                      "its guide.json edited): the base was compared by its 4096-entry fingerprints only (a change between "
                      "the strides goes unseen); save the guide again on the checkpoint it was fitted on to record them",
                      stacklevel=user_stacklevel())
        return
    now = quantization(model.net)
    if "weights" in saved:
        same_codes = saved.get("quantization") == now and saved["dtype"] == str(model.compute_dtype)
        differ, unknown, unmatched = _compare_weights(saved["weights"], model, same_codes)
        if unmatched:
            name = min(unmatched)
            raise ValueError(f"cannot load the guide at {path} into this model: its frozen base weights are not the "
                             f"guide's ({_which(unmatched)}: {unmatched[name]}): build the model as the guide's was, "
                             "freezing what it froze")
        if differ:
            _refuse_differing(path, differ)
        for reason in sorted(set(unknown.values())):
            names = [n for n, r in unknown.items() if r == reason]
            quantized = "quantized" in reason
            how = ("by nothing but the configuration (the fingerprint reads float weights)" if quantized else
                   "by their 4096-entry fingerprints only (a change between the strides goes unseen)")
            warnings.warn(f"the guide at {path}: {_which(names)}, could be compared {how}: {reason}; load it on a base "
                          f"of the dtype{' and quantization' if quantized else ''} it was saved on to have every weight "
                          "compared", stacklevel=user_stacklevel())
        return
    was_quantized, known = _saved_quantization(saved, meta, model.net)
    if not (was_quantized or now):
        differ, unknown = _compare_old_record(saved, model.net)
        if differ:
            _refuse_differing(path, differ)
        if unknown:
            warnings.warn(f"the guide at {path}: {_which(unknown)}, could be compared by their 4096-entry "
                          "fingerprints only (a change between the strides goes unseen): the guide was saved before "
                          "each weight's digest was recorded, on a base held in other dtypes; load it on a base in the "
                          "dtype it was saved in to have every weight compared", stacklevel=user_stacklevel())
        return
    if saved.get("sha256") == weights_digest(model.net):
        return
    was = saved.get("quantization")
    if was_quantized == (now is not None) and saved.get("dtype") == str(model.compute_dtype) and known and was == now:
        raise ValueError(f"cannot load the guide at {path} into this model: the base weights differ from the ones the "
                         "guide was saved with (read whole, with their quantization scales): load the checkpoint it was "
                         "fitted on")
    then = "a quantized base" if was_quantized else "an unquantized base"
    other = " otherwise" if known and was and now and was != now else ""
    warnings.warn(f"the guide at {path} was saved on {then} in {saved.get('dtype')}, and this model's base is "
                  f"{'quantized' if now else 'unquantized'}{other} in {model.compute_dtype}: the weights quantized on "
                  "either side could not be compared with the guide's base, only the others and the configuration; load "
                  "it on a base of the dtype and quantization it was saved on to have every weight checked", stacklevel=user_stacklevel())


def _rounds_float64(tensors: dict, state: dict) -> bool:
    """Whether a saved float64 tensor would be loaded into a float32 one of ``state`` (a guide saved after
    ``.double()``, loaded into one in float32: every value rounded)."""
    return any(v.dtype == torch.float64 and k in state and state[k].dtype == torch.float32 for k, v in tensors.items())


def load_guide(path, model, guide=None):
    """Rebuild a guide saved by :func:`save_guide` for ``model``, restoring the model's point parameters.

    Everything is checked before the network's parameters are written: a refused guide leaves ``model`` as it was.

    :param guide: for a Pyro autoguide's save, an autoguide of the saved class built over ``model`` as the saved one
        was, and called once on a labelled batch (its options and first call are the user's): its ``state_dict`` is
        loaded in place, once the sites its parameters stand for, in order and shape, are the saved ones. ``None`` for
        a guide of the guides package, which is built here.
    :returns: the guide (``guide`` itself for an autoguide), with the ``fit_progress`` it was saved with (``None``
        where no ``fit`` trained it); a checkpoint of a fit that stopped before its end (``finished`` false) is loaded
        with a warning naming the step it reached.
    :raises FileNotFoundError: if ``guide.json`` or ``guide.safetensors`` is missing.
    :raises ValueError: if a file is corrupt (not JSON, missing keys, a malformed ``base_weights`` record,
        unreadable safetensors, NaN or inf values, tensors missing, unexpected or of another shape), ``path`` no path
        or a file, a
        ``guide.safetensors`` whose SHA-256 is not the one ``guide.json`` records (damaged, or another save's; saves
        that record none are not compared), a ``run.json`` or ``adapter/`` other than the one saved with it, missing
        or not written by the save (:func:`_check_beside`), or not a saved guide, or ``model`` differs from the model
        it was saved with (sites, LoRA scaling, adapter, base model, head: :func:`~pyro_lora.contract.differences`; any
        base weight, read whole where its dtype and quantization allow, else warned), or holds a saved network
        parameter in a narrower dtype whose rounding its forward would show (:func:`_check_unrounded`); for an
        autoguide's save, if ``guide`` is missing, of another class, over another model, never called or over other
        sites (:func:`_check_autoguide`), and for a guide's, if ``guide`` is given; each message names the file.
        Whatever it raises, and wherever it stops, ``model``, the guide that set its point parameters and ``guide``
        are left as they were.
    """
    check_model(model, "load a guide")
    path = Path(check_path(path, "path"))
    with building():  # the guide's tensors as in a clean process: float32, and no inference tensors a fit cannot train
        guide = _load_guide(path, model, guide)
    p = getattr(guide, "fit_progress", None)  # an autoguide has none
    if p and not p["finished"]:  # evaluating a checkpoint is fine; mistaking it for the result is not
        warnings.warn(f"the guide at {path} is a checkpoint of a fit that did not finish: it stopped after step {p['step']} "
                      f"of {p['steps'] if p['steps'] is not None else 'a run of unknown length'} (in epoch {p['epoch'] + 1} "
                      f"of {p['epochs']}), an intermediate state and not the run's result; a new fit on it does not "
                      "resume the run (AdamW's moments, the learning-rate and kl_weight schedules and the data order "
                      "start again)" + (f": fit(..., checkpoint_dir={str(path)!r}, resume=True) with the run's settings "
                      "continues it" if p["steps"] is not None else "; a run over data without a length cannot be "
                      "resumed (no position in its epoch to count): rerun it from the start"), stacklevel=user_stacklevel())
    return guide


def _load_guide(path, model, guide):
    recover_directory(path)
    meta = _read_meta(path)
    auto, saved_class = "autoguide" in meta, meta["guide"].rpartition(":")[2]
    if auto and guide is None:
        raise ValueError(f"the guide at {path} is a Pyro {saved_class}'s state, which load_guide does not build (its "
                         f"options and first call are yours): build a {saved_class} over the model as the saved one was, "
                         "call it once on a labelled batch, then load_guide(path, model, guide=autoguide)")
    if not auto and guide is not None:
        raise ValueError(f"the guide at {path} is a {saved_class}, which load_guide builds itself: call "
                         "load_guide(path, model) without guide= (guide= takes a Pyro autoguide, for its save)")
    _check_beside(path, meta)
    _warn_unsealed(path, meta)
    tensors = _read_tensors(path, str(model.device), meta.get("tensors_sha256"))
    model.check_network()
    current = describe(model)
    try:
        if meta["format"] == FORMAT:
            problems = differences(meta["signature"], current)
        else:
            saved = {n: tuple(s) for n, s in meta["sites"].items()}
            now = {n: s.shape for n, s in model.sites.items()}
            problems = [f"differing (site, shape): {sorted(set(saved.items()) ^ set(now.items()))[:6]}"] if saved != now else []
            if not problems:
                warnings.warn(f"the guide at {path} is of the old format {meta['format']}, which records its sites' shapes "
                              "only: the LoRA scaling, base weights, head, prior and likelihood it was fitted with could not "
                              "be checked against this model (on another network its predictions would be wrong); load it "
                              "on the network it was fitted on and save it again to have them recorded", stacklevel=user_stacklevel())
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:  # a hand-edited signature
        key = "signature" if meta["format"] == FORMAT else "sites"
        raise ValueError(f"{path}/guide.json is corrupt: its {key!r} is malformed ({err!r})") from None
    if problems:
        raise ValueError(f"cannot load the guide at {path} into this model: " + "; ".join(problems))
    if auto:
        _check_autoguide(path, meta, guide, model)
        state = {k: v.detach().clone() for k, v in guide.state_dict().items()}  # put back if the load stops
        if _rounds_float64(tensors, state):  # the autoguide is the caller's: its dtype is theirs to set
            raise ValueError(f"the autoguide at {path} was saved in float64 and the {type(guide).__name__} given holds "
                             "float32: loading would round every value; call .double() on it before load_guide")
    else:
        cls = _guide_class(meta["guide"], path)
    previous, fitted = trainer(model), forget_fit(model)  # both put back if the load stops
    take_over(model, None)  # the restore below replaces the point parameters: building may not refuse them
    net_params = dict(model.net.named_parameters())
    written = {k[len(_NET):]: v for k, v in tensors.items() if k.startswith(_NET)}
    before = {}
    try:
        if not auto:
            guide = _build_guide(path, cls, model, meta["config"])
            if _rounds_float64(tensors, guide.state_dict()):  # saved from guide.double(): built in float32, it is cast
                guide.double()
        _check_tensors(path / "guide.safetensors", tensors, guide, dict(model.named_adapter_parameters()), net_params)
        _check_unrounded(path, written, net_params, model.net)
        _check_base_weights(path, meta, model)
        guide.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(_NET)})
        with torch.no_grad():
            for k, v in written.items():
                before[k] = net_params[k].detach().clone()
                net_params[k].copy_(v)
    except BaseException:  # refused, or stopped: the network as it was, and its previous trainer's
        with torch.no_grad():
            for k, v in before.items():
                net_params[k].copy_(v)
        if auto:
            guide.load_state_dict(state)
        take_over(model, previous)
        restore_fit(model, fitted)
        raise
    if auto:  # the point parameters restored are its own, and its sites' values are not the adapter's
        follow_autoguide(model, guide, loaded=True)
        return guide
    take_over(model, guide)
    guide.adopt_point_parameters()
    guide._loaded_head = dict(guide._point_snapshot)  # restored, not trained: a refusal must not name it the trainer
    record_fit(model, guide, by="load_guide")  # the pairing, kept once the guide is dropped (a helper returns the model)
    guide._base_records = meta["base_weights"].get("weights") if "base_weights" in meta else None
    guide.fit_progress = meta.get("fit")
    return guide


def _build_guide(path, cls, model, config):
    """``cls(model, **config)``, the guide saved at ``path`` (it never touches the network).

    :raises ValueError: naming the file, if the config does not build one for this model."""
    try:
        with _rebuilding(path):
            return cls(model, **config)
    except TypeError as err:  # keywords the class does not take
        raise ValueError(f"{path}/guide.json is corrupt: its config does not build a {cls.__name__} for this model ({err})") from None
    except ValueError as err:  # a value the class refuses, or this model (e.g. other answer letters): err says which
        raise ValueError(f"{path}/guide.json: its config does not build a {cls.__name__} for this model ({err})") from None


def _check_autoguide(path, meta, autoguide, model):
    """Refuse to load the autoguide's state saved at ``path`` into ``autoguide`` unless it is of the saved class,
    built over ``model`` and called, and its parameters stand for the saved sites, in the saved order and shapes: a
    flat autoguide (``AutoDiagonalNormal``, ``AutoLowRankMultivariateNormal``) loads another model's vector of the same
    length without an error, each entry then another matrix's."""
    name, saved_class = type(autoguide).__name__, meta["guide"].rpartition(":")[2]
    if f"{type(autoguide).__module__}:{type(autoguide).__qualname__}" != meta["guide"]:
        raise ValueError(f"cannot load the guide at {path} into this {name}: it holds the state of a Pyro "
                         f"{saved_class}; build one over the model")
    if _autoguide_model(autoguide, "load the guide into") is not model:
        raise ValueError(f"cannot load the guide at {path} into this {name}: it is built over another LoraModel than "
                         "the one given; build it over that model")
    saved, now = meta["autoguide"]["sites"], _autoguide_sites(autoguide, model)
    if now and len(now[0]) == 3 and saved and len(saved[0]) == 2:
        raise ValueError(f"cannot load the guide at {path} into this {name}: it was saved by an older pyro_lora, which "
                         "recorded the model's sites, not which part of the list stands for which: its parts could "
                         "load onto other matrices of the same shapes unseen; save it again from the trained guide")
    if saved != now:
        i = next(i for i in range(max(len(saved), len(now))) if i >= len(saved) or i >= len(now) or saved[i] != now[i])

        def site(row):
            return f"{row[0]!r} of shape {tuple(row[1])}" + (f" in part {row[2]}" if len(row) > 2 else "")

        there = site(saved[i]) if i < len(saved) else "nothing"
        here = site(now[i]) if i < len(now) else "nothing"
        raise ValueError(f"cannot load the guide at {path} into this {name}: its site {i + 1} was {there}, and this "
                         f"{name}'s is {here} ({len(saved)} sites saved, {len(now)} here): its parameters would stand "
                         "for other matrices; build the model, and the autoguide over it (handlers such as "
                         "poutine.block), as the saved one was, and call it on a labelled batch")


def export_adapter(guide, path):
    """Write the posterior mean as a regular peft adapter directory (``PeftModel.from_pretrained`` loads it).

    :param guide: a guide of the guides package (its posterior mean is written into the network's LoRA, then saved
        with the trained head), or a :class:`~pyro_lora.LoraModel`: its network's adapter and trained head as they are.
        The latter is the network's part of a Pyro autoguide's result, for peft (its sites are in the autoguide;
        ``model.write_adapter(autoguide.median())`` first makes the adapter its posterior median; :func:`save_guide`
        keeps the whole result, which :func:`load_guide` checks against the model it restores into). Of a ScalaBL or
        LoRA-XS model, whose sites (log-scales, ``r x r`` cores) live in the autoguide alone, that is its ``A`` and
        ``B`` (ScalaBL's trained, LoRA-XS's from the SVD) and head, the model again only when rebuilt over it with
        ``rotate=False`` / ``svd_init=False`` (peft alone runs it as a plain LoRA: ScalaBL's at ``z = 0``, LoRA-XS's
        at ``R = I``, the base plus its own rank-``r`` approximation).
    :raises ValueError: if ``path`` is no path, if the network changed since the guide (or model) was built (another active adapter, merged
        layers, other LoRA scaling: :func:`~pyro_lora.contract.check_guide`), or is no ``PeftModel`` (a model built
        on ``net.base_model``); if the adapter would not reload as it runs (:func:`_check_adapter_reloads`: any
        adapter merged into the base, a LoRA layer's scaling other than its saved config gives, ...); if Pyro's param
        store holds values restored over the parameters it writes; for a guide that carries its own head parameters (an
        ensemble's per-member heads): the adapter would hold the network's head instead; for a guide of a ScalaBL or
        LoRA-XS model (no plain LoRA mean: :func:`save_guide` keeps it); for a model whose head a guide trained with
        LoRA values the adapter does not hold (``fit`` with a ``MAPGuide``, its mean never written:
        :meth:`~pyro_lora.LoraModel.check_adapter_trained`, which warns where that ``fit`` trained no head, and takes
        values ``model.write_adapter`` wrote beside the head as it is, a posterior sample, as written).
        Warns of a trained parameter that ``PeftModel.from_pretrained`` gives back rounded to a half-precision base's
        dtype where the forward would show it (:func:`_rounded_on_reload`: a LayerNorm in ``modules_to_save``).
    """
    with refused_together("export the adapter"):  # a refusal on one rank only would leave the others waiting
        check_path(path, "path")
        check_same(os.path.abspath(path), "paths to export the adapter to")  # rank 0 writes its own
        model = _check_adapter_write(guide, "export the adapter")
    mean = model is not guide  # a guide's mean is written into the network's LoRA first
    check_ranks_agree(model, guide if mean else None, "export the adapter")  # rank 0 writes its own

    def write():
        with atomic_directory(path, own=_ADAPTER_FILES) as tmp:
            if mean:
                _write_adapter(guide, tmp)
            else:
                _save_adapter(model, tmp)

    _write_on_main(write, f"export the adapter to {path}", guide, adapter=mean)
    return Path(path)


def _check_adapter_write(subject, action):
    """Every check before a peft adapter is written (:func:`export_adapter`, ``save_guide(..., adapter=True)``, and so
    ``pyro-lora fit --adapter`` and ``bayesianize``), on every rank, before anything is written; returns the model.

    ``subject`` is a guide (its mean is written into the network's LoRA and saved with the network's head: refused for
    a guide carrying head parameters of its own, an ensemble's or a Laplace mixture's per-member heads, and for sites no
    peft parameter holds, ScalaBL's or LoRA-XS's) or a :class:`~pyro_lora.LoraModel` (its adapter and head as they are:
    refused where the head's guide holds other LoRA values, :meth:`~pyro_lora.LoraModel.check_adapter_trained`). Both:
    refused for a network whose adapter peft would not give back (:func:`_check_peft_model`); warned of trained values
    its reload rounds (:func:`_warn_reload_rounding`)."""
    from .model import LoraModel

    if isinstance(subject, LoraModel):
        model = subject
        pyro_params.check_store([(model._pyro_name, model.named_point_parameters())], action)
        model.check_network()
    else:
        require_lora_guide(subject, action)
        model = subject.model
        check_guide(model, subject, action)  # the network's point parameters it saves must still be its own
        carried = sorted(subject.carried_point_parameters())
        if carried:
            raise ValueError(
                f"cannot write a peft adapter of this {type(subject).__name__}: it carries its own {carried[0]} (per "
                "member), which the adapter would take from the network instead, a head none of its predictions use; "
                "save_guide(guide, path) without adapter=True keeps the whole guide; for an adapter, write a member's "
                "values (model.write_adapter) and head into the network, then export a MAPGuide(model)"
            )
        if not subject.deterministic and not subject.mean_is_predictor:  # as predict(mean=True) and the CLI refuse it
            raise ValueError(
                f"cannot write a peft adapter of this {type(subject).__name__}: its mean() averages separately trained "
                "members' weights, which is none of them and no predictor of the ensemble (a causal LM's averaged "
                "adapter scored worse than every member); save_guide(guide, path) without adapter=True keeps the whole "
                "guide; for an adapter of one member, write its values (model.write_adapter({name: v[k] for name, v in "
                "guide.members().items()})), then export a MAPGuide(model)"
            )
        model._check_peft_sites()  # a LoRA-XS or ScalaBL guide's mean is no plain LoRA
    _check_peft_model(model)
    if model is subject:  # sites without a peft parameter are no refusal here: the network holds none of their values
        model.check_adapter_trained("the exported adapter", "export_adapter(guide, folder) writes the guide's mean "
                                    "with the head, or call model.write_adapter(guide.mean()) first")
    _warn_reload_rounding(model)
    return model


def _write_on_main(write, what, guide, adapter):
    """``write`` on rank 0 (:func:`~pyro_lora.distributed.on_main`); with ``adapter``, the other ranks then put the
    guide's mean into their LoRA as rank 0's write did (after it succeeded: a failed write changes none)."""
    on_main(write, what)
    if adapter and not is_main():
        _adopt_mean(guide)


def _adopt_mean(guide):
    guide.model.write_adapter({k: v.detach() for k, v in guide.mean().items()})


def _check_peft_model(model):
    """Refuse a network that is no ``PeftModel`` (a LoraModel built on ``net.base_model`` or ``.model``): its
    ``save_pretrained`` is transformers', which writes a whole checkpoint where peft writes an adapter folder."""
    from peft import PeftModel

    if isinstance(getattr(model.net, "_orig_mod", None), PeftModel):  # torch.compile(peft_model): an OptimizedModule
        raise ValueError(
            "cannot write a peft adapter from a torch.compile wrapper (OptimizedModule) of a PeftModel: its module paths "
            "carry '_orig_mod.', which peft's saved adapter would not give back; export from a LoraModel built on the "
            "PeftModel itself (the wrapper's net._orig_mod), or compile in place with net.compile(), which keeps it a "
            "PeftModel"
        )
    if not isinstance(model.net, PeftModel):
        raise ValueError(
            f"cannot write a peft adapter from a {type(model.net).__name__}: only a PeftModel (what get_peft_model "
            "returns) saves one, and this network's save_pretrained writes a whole checkpoint instead; build the "
            "LoraModel on the PeftModel rather than on its base_model"
        )
    _check_adapter_reloads(model)


def _check_adapter_reloads(model):
    """Refuse what peft's saved adapter would not give back on reload: a trained point parameter peft does not save
    (a head made trainable by hand, not in ``modules_to_save``), another adapter merged into the base weights
    (:func:`_check_nothing_merged`), a LoRA scaling of any of the adapter's LoRA layers (embeddings too) other than the
    one its saved config gives (:func:`_check_saved_scalings`), or base weights rewritten by an initialisation peft does
    not redo on load (:func:`_check_base_redone`)."""
    from peft import get_peft_model_state_dict
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    saved = {part for m in model.net.modules() if isinstance(m, ModulesToSaveWrapper)
             for n, _ in m.original_module.named_parameters() for part in n.split(".")}
    if model.adapter in saved:  # peft's load takes "<module>.<name>..." for the adapter's copy of that module
        raise ValueError(f"peft cannot load back an adapter named {model.adapter!r}, a name in the parameters of a module "
                         "in its modules_to_save (its copy comes back missing: a KeyError in PeftModel.from_pretrained); "
                         "build it under another name (get_peft_model(..., adapter_name=...)), or keep the guide with "
                         "save_guide")
    alone = next((n for n, m in model.net.named_modules() if isinstance(m, TrainableTokensWrapper)
                  and model.adapter not in m._get_available_adapters()), None)
    if alone is not None:  # peft's own save raises KeyError 'token_adapter.trainable_tokens_delta.<adapter>'
        raise ValueError(
            f"peft cannot save adapter {model.adapter!r} of this network: {alone} holds trainable tokens of other "
            f"adapters only, and peft's adapter state dict expects rows of adapter {model.adapter!r} in it (deleting "
            "the other adapter leaves the wrapper); save_guide keeps the guide, or build the adapters with "
            "trainable_token_indices in each")
    _check_no_bias_under_other_wrapping(model)
    saved = {t.data_ptr() for t in get_peft_model_state_dict(model.net, adapter_name=model.adapter).values()}
    unsaved = [n for n, p in model.named_point_parameters() if p.data_ptr() not in saved]
    if unsaved:
        raise ValueError(f"the trained {unsaved[0]} is no part of the peft adapter (made trainable by hand, not through "
                         "modules_to_save): the adapter would load with the base's value; build the adapter with that "
                         "module in modules_to_save")
    _check_nothing_merged(model)
    _check_saved_scalings(model)
    _check_base_redone(model)


def _check_no_bias_under_other_wrapping(model):
    """Refuse a base layer's tensor the adapter trains (``bias='all'``) in a layer only another
    adapter wraps: peft saves it as ``<layer>.base_layer.<name>``, and a reload of this adapter alone, which leaves the
    layer unwrapped, drops it (``load_adapter`` refuses the file)."""
    from peft.tuners.lora import LoraLayer

    trained = [f"{path}.base_layer.{name}" for path, layer in model.net.named_modules()
               if isinstance(layer, LoraLayer) and model.adapter not in layer.lora_A
               for name, p in layer.get_base_layer().named_parameters() if p.requires_grad]
    if trained:
        raise ValueError(f"{trained[0]} is trained (bias='all'), in a layer that only another adapter "
                         f"wraps: peft saves it under that wrapping, and a reload of adapter {model.adapter!r} alone drops "
                         "it (the adapter would predict with the base's value); train with bias='none', or save the "
                         "adapters together (net.save_pretrained)")


# base-rewriting inits (sites.base_rewriting_inits) that PeftModel.from_pretrained redoes exactly on the pretrained
# base, from its weights alone (a full SVD, a QR); why each other cannot be, by prefix
_REDONE_ON_LOAD = ("pissa", "olora")
_NOT_REDONE = {
    "pissa_niter_": "it redoes the randomised SVD at random",
    "corda": "it needs preprocess_corda's covariances, and refuses to load without them",
    "lora_ga": "it needs preprocess_loraga's gradients, and without them falls back to a plain init, the base left as it is",
    "loftq": "it quantises the base again on load, on a GPU with bitsandbytes, not necessarily as it was trained",
}


def _check_base_redone(model):
    """Refuse an adapter trained on base weights that ``PeftModel.from_pretrained`` on the pretrained base does not give
    back: rewritten (``W - s B0 A0``) by another adapter's init, or by its own init where peft cannot redo that init on
    load (:data:`_NOT_REDONE`; PiSSA by full SVD and OLoRA it redoes exactly)."""
    rewritten = base_rewriting_inits(model.net)
    own = rewritten.pop(model.adapter, None)
    save = ("save with peft instead (after model.write_adapter(guide.mean()) for a guide's mean): the rewritten base "
            "weights too (copy.deepcopy(net).unload().save_pretrained(...)), the adapter then loaded on them with "
            "init_lora_weights=True in its adapter_config.json")
    if rewritten:
        raise ValueError(f"{describe_inits(rewritten)} rewrote the base weights adapter {model.adapter!r} was trained "
                         "on (W - s B0 A0): PeftModel.from_pretrained loads the exported adapter on the pretrained base, "
                         f"without that rewrite, and it would predict otherwise; {save}, or train the adapter on a "
                         "network without that adapter")
    if own is None or own.lower() in _REDONE_ON_LOAD:
        return
    why = next((w for prefix, w in _NOT_REDONE.items() if own.lower().startswith(prefix)), "it cannot redo it")
    convert = ("" if own.lower() == "loftq" else ", or net.save_pretrained(folder, path_initial_model_for_weight_"
               "conversion=...) from the adapter saved as initialised, before training, which converts it to a plain "
               "LoRA (the LoRA alone: peft leaves out modules_to_save, such as a trained head)")
    raise ValueError(f"adapter {model.adapter!r} (init_lora_weights={own!r}) rewrote the base weights it adapts (W - s "
                     "B0 A0), which PeftModel.from_pretrained cannot redo on the pretrained base when it loads the "
                     f"exported adapter ({why}): it would reload on other base weights than it was trained on and "
                     f"predict otherwise; {save}{convert}")


# modules whose forward under the model's autocast (or, for an embedding, the cast of its output back to the base's
# dtype) runs their weights rounded to the base's half dtype anyway: those weights held in that dtype run the same
_ROUNDED_IN_FORWARD = (torch.nn.Linear, torch.nn.Embedding, torch.nn.modules.conv._ConvNd)


def _rounding(module, value, dtype) -> float:
    """How far ``value`` (a parameter of ``module``) moves when held in ``dtype``, where ``module``'s forward runs it at
    full precision (a LayerNorm's weight: autocast computes layer_norm in float32); 0.0 where nothing moves, or where
    the forward rounds it to ``dtype`` anyway (:data:`_ROUNDED_IN_FORWARD`)."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    if value.dtype == dtype or isinstance(module, (*_ROUNDED_IN_FORWARD, Conv1D)) or not value.is_floating_point():
        return 0.0
    return float((value.detach() - value.detach().to(dtype).to(value.dtype)).abs().max())


def _rounded_on_reload(model) -> list:
    """``(name, dtype, largest change)`` of each trained parameter of the adapter's ``modules_to_save`` copies that
    ``PeftModel.from_pretrained`` gives back rounded (:func:`_rounding`): peft builds each copy from the base's module,
    in the base's dtype (its ``autocast_adapter_dtype`` upcasts the LoRA weights, ``lora_bias`` and trainable-token
    deltas to float32, not these copies), while the model holds them in float32 (bfloat16 / float16 base)."""
    from peft.utils import ModulesToSaveWrapper

    out = []
    for path, wrapper in model.net.named_modules():
        if not (isinstance(wrapper, ModulesToSaveWrapper) and model.adapter in wrapper.modules_to_save):
            continue
        original = dict(wrapper.original_module.named_parameters())
        for sub, module in wrapper.modules_to_save[model.adapter].named_modules():
            for name, p in module.named_parameters(recurse=False):
                key = f"{sub}.{name}" if sub else name
                change = _rounding(module, p, original[key].dtype) if key in original else 0.0
                if change:
                    out.append((f"{path}.modules_to_save.{model.adapter}.{key}", original[key].dtype, change))
    return out


def _warn_reload_rounding(model):
    """Warn of trained values the exported adapter reloads rounded (:func:`_rounded_on_reload`): its predictions then
    differ from the model's. A warning, not a refusal: such an adapter is the nearest peft holds."""
    rounded = _rounded_on_reload(model)
    if rounded and is_main():
        name, dtype, change = max(rounded, key=lambda r: r[2])
        more = f" (and {len(rounded) - 1} more)" if len(rounded) > 1 else ""
        warnings.warn(f"the trained {name}{more} is held in float32, but PeftModel.from_pretrained reloads it into the "
                      f"base's {str(dtype).removeprefix('torch.')} copy of its module (peft's modules_to_save), rounded by "
                      f"up to {change:.2g}, which its forward runs at full precision: the reloaded adapter predicts "
                      "otherwise than the model; save_guide (of a guide, or of a Pyro autoguide) keeps it exactly for "
                      "load_guide; or train on a float32 base, or without that module in modules_to_save", stacklevel=user_stacklevel())


def _check_nothing_merged(model):
    """Refuse a network any of whose LoRA layers holds merged adapters (peft's ``merge_adapter``), the exported one's
    or another's: the guide was fitted on a base holding their deltas, which the checkpoint the adapter reloads on
    lacks."""
    from peft.tuners.lora import LoraLayer

    merged = {p: list(m.merged_adapters) for p, m in model.net.named_modules() if isinstance(m, LoraLayer) and m.merged}
    if merged:
        names = sorted({a for adapters in merged.values() for a in adapters})
        raise ValueError(f"adapter(s) {names} are merged into the base weights of {len(merged)} LoRA layer(s) (e.g. "
                         f"{next(iter(merged))}): the exported adapter {model.adapter!r} would reload on the checkpoint "
                         "without their deltas, which its guide was fitted with; call net.unmerge_adapter() first (and "
                         "fit again without them), or merge them for good (merge_and_unload), save that base and build "
                         "the adapter on it")


def _check_saved_scalings(model):
    """Refuse a LoRA layer of the exported adapter (every peft ``LoraLayer`` holding it: embeddings and convolutions
    too, not only the sites' layers) whose scaling is not the one peft gives it on reload: ``lora_alpha / r`` (``/
    sqrt(r)`` with ``use_rslora``) of the config ``save_pretrained`` writes, ``rank_pattern`` and ``alpha_pattern``
    matched to its module name as peft matches them. Differs after peft's ``set_scale``/``scale_layer``, or when the
    config was edited after the layer was built (one ``LoraConfig`` object reused, changed, for ``add_adapter``)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import get_pattern_key

    adapter, config = model.adapter, model.net.peft_config[model.adapter]
    ranks, alphas = config.rank_pattern or {}, config.alpha_pattern or {}
    # peft matches patterns to the module's name in the network under its tuner
    for key, layer in base_network(model.net).named_modules():
        if not (isinstance(layer, LoraLayer) and adapter in layer.scaling):
            continue
        r = ranks.get(get_pattern_key(ranks.keys(), key), config.r)
        alpha = alphas.get(get_pattern_key(alphas.keys(), key), config.lora_alpha)
        expected = alpha / (math.sqrt(r) if config.use_rslora else r)
        actual = layer.scaling[adapter]
        if math.isclose(actual, expected, rel_tol=1e-6):
            continue
        built = layer.lora_alpha[adapter] / (math.sqrt(layer.r[adapter]) if config.use_rslora else layer.r[adapter])
        if math.isclose(actual, built, rel_tol=1e-6):  # the layer is as built: its config changed since
            raise ValueError(f"the LoRA layer {key} of adapter {adapter!r} scales by {actual:g} (lora_alpha="
                             f"{layer.lora_alpha[adapter]:g}, r={layer.r[adapter]}, as it was built), but the config "
                             f"peft saves with it gives {expected:g} (lora_alpha={alpha:g}, r={r}): it was edited after the "
                             "adapter was built (one LoraConfig object reused and changed for add_adapter?); the adapter "
                             f"would load with {expected:g}; set net.peft_config[{adapter!r}] to a copy of it holding the "
                             "values its layers were built with (the object may be another adapter's config too)")
        raise ValueError(f"the LoRA scaling of {key} is {actual:g}, not the {expected:g} its config gives (peft's "
                         "set_scale or scale_layer): the adapter would load with the config's; restore the scaling first")


def _write_adapter(guide, folder):
    """Write ``guide``'s posterior mean into the network's LoRA and save that adapter (:func:`_save_adapter`)."""
    _adopt_mean(guide)
    _save_adapter(guide.model, folder)


def _save_adapter(model, folder):
    """Save the model's adapter alone as a peft adapter in ``folder`` (the other adapters of the network are not its)."""
    model.net.save_pretrained(str(folder), selected_adapters=[model.adapter])
    if model.adapter != "default":  # peft saves another name in a subfolder: from_pretrained(folder) reads the top
        sub = Path(folder) / model.adapter
        for item in list(sub.iterdir()):
            os.replace(item, Path(folder) / item.name)
        for empty in [sub, *sub.parents[: len(sub.relative_to(folder).parts) - 1]]:  # "a/b": b, then a
            empty.rmdir()
