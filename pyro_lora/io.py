"""Saving and loading guides (safetensors + a JSON of config and site shapes), atomically."""

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .contract import check_guide, describe, differences, point_snapshot, take_over
from .distributed import is_main

FORMAT = "pyro_lora.guide/2"
_OLD_FORMATS = ("pyro_lora.guide/1",)  # sites only, no signature
_NET = "net/"


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """Yield a temporary file beside ``path`` that replaces it, readable by all (0644), once the block succeeds.

    :param str mode: ``"w"`` (text, UTF-8) or ``"wb"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary directory that replaces ``path`` only once the block succeeds.

    A crash leaves the old ``path`` (or nothing) in place, never a half-written one. A kill between the two
    renames of the swap leaves the old folder under a hidden name: :func:`recover_directory` (run here and by
    :func:`load_guide`) puts it back; temporary folders of dead processes are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a saved guide is shared
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def recover_directory(path):
    """Finish what a killed :func:`atomic_directory` left at ``path``: put back the previous folder if ``path`` is
    missing, and remove the temporary and previous folders of processes that are no longer running."""
    path = Path(path)
    for leftover in sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        if _alive(leftover.name.rsplit("-", 1)[-1]):
            continue
        if not path.exists():
            os.replace(leftover, path)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        if not _alive(leftover.name[len(f".{path.name}.tmp-") :].split("-", 1)[0]):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid):
    """Whether process ``pid`` (a string) runs: another process may be writing its folder right now."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(pid) != 0


_GUIDE_CLASSES = {}  # "module:qualname" -> class: the only classes load_guide builds


def register_guide(cls):
    """Make ``cls`` (a guide class) loadable by :func:`load_guide`; every ``guides.LoraGuide`` subclass registers
    itself when it is defined."""
    _GUIDE_CLASSES[f"{cls.__module__}:{cls.__qualname__}"] = cls
    return cls


def _guide_class(name, path):
    """The registered class ``guide.json`` names; anything else is refused before any import (a guide folder is
    data, never code)."""
    if name not in _GUIDE_CLASSES and isinstance(name, str) and name.split(":")[0].split(".")[0] == "guides":
        importlib.import_module("guides")  # this project's guides register on import
    if name not in _GUIDE_CLASSES:
        raise ValueError(
            f"{path}/guide.json names {name!r}, which is no registered guide class: refusing to build it (a guide "
            "folder is data; only subclasses of guides.LoraGuide, defined before loading, are built)"
        )
    return _GUIDE_CLASSES[name]


def save_guide(guide, path):
    """Write ``guide`` (its state, config, the model's site shapes and its trained point parameters) to ``path``.

    :raises ValueError: if the network's point parameters are no longer the guide's (another guide trained
        them since: :func:`~pyro_lora.contract.check_guide`), since they are saved with it.

    ``path`` becomes a directory with ``guide.safetensors`` and ``guide.json``. Under ``torch.distributed``
    only rank 0 writes (the ranks hold the same guide).
    """
    if not is_main():
        return Path(path)
    model = guide.model
    check_guide(model, guide, "save")  # the network's point parameters it saves must still be its own
    tensors = {k: v.detach().contiguous().cpu() for k, v in guide.state_dict().items()}
    tensors.update({_NET + n: p.detach().contiguous().cpu() for n, p in model.named_adapter_parameters()})
    meta = {
        "format": FORMAT,
        "guide": f"{type(guide).__module__}:{type(guide).__qualname__}",
        "config": guide.config(),
        "sites": {n: list(s.shape) for n, s in model.sites.items()},
        "base_model": getattr(getattr(model.net, "config", None), "_name_or_path", None),
        "signature": guide.signature,
    }
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / "guide.safetensors"))
        (tmp / "guide.json").write_text(json.dumps(meta, indent=2))
    return Path(path)


def load_guide(path, model):
    """Rebuild a guide saved by :func:`save_guide` for ``model``, restoring the model's point parameters.

    :raises ValueError: if the file is not a saved guide, or ``model`` differs from the model it was saved
        with (sites, LoRA scaling, adapter, base model, head: :func:`~pyro_lora.contract.differences`).
    """
    path = Path(path)
    recover_directory(path)
    try:
        meta = json.loads((path / "guide.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} holds no saved guide (guide.json missing)") from None
    if meta.get("format") not in (FORMAT, *_OLD_FORMATS):
        raise ValueError(f"{path}/guide.json is not a pyro_lora guide (format {meta.get('format')!r})")
    model.check_network()
    if "signature" in meta:
        problems = differences(meta["signature"], describe(model))
    else:
        saved = {n: tuple(s) for n, s in meta["sites"].items()}
        current = {n: s.shape for n, s in model.sites.items()}
        problems = [f"differing (site, shape): {sorted(set(saved.items()) ^ set(current.items()))[:6]}"] if saved != current else []
    if problems:
        raise ValueError(f"cannot load the guide at {path} into this model: " + "; ".join(problems))
    cls = _guide_class(meta.get("guide"), path)
    take_over(model, None)  # the guide that set the point parameters keeps its state; the restore below replaces them
    guide = cls(model, **meta["config"])
    tensors = load_file(str(path / "guide.safetensors"), device=str(model.device))
    take_over(model, guide)
    net_params = dict(model.net.named_parameters())
    with torch.no_grad():
        for k in [k for k in tensors if k.startswith(_NET)]:
            if k[len(_NET) :] not in net_params:
                raise ValueError(f"guide at {path} holds network parameter {k[len(_NET):]!r} that this model lacks")
            net_params[k[len(_NET) :]].copy_(tensors.pop(k))
    guide.load_state_dict(tensors)
    guide._point_snapshot = point_snapshot(model)
    return guide


def export_adapter(guide, path):
    """Write the posterior mean as a regular peft adapter directory (``PeftModel.from_pretrained`` loads it).

    :raises ValueError: if the network changed since the guide was built (another active adapter, merged
        layers, other LoRA scaling: :func:`~pyro_lora.contract.check_guide`).
    """
    model = guide.model
    check_guide(model, guide, "export the adapter")
    model.write_adapter({k: v.detach() for k, v in guide.mean().items()})
    if not is_main():  # every rank updates its adapter, rank 0 writes it
        return Path(path)
    with atomic_directory(path) as tmp:
        model.net.save_pretrained(str(tmp))
    return Path(path)
