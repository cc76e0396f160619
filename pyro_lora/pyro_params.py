"""Pyro's param store sees the trainable parameters of guides and networks, so Pyro's own optimizers train them.

Guides and networks keep ordinary ``nn.Parameter`` s (several guides can live in one process). Pyro's
``SVI`` only optimises the parameters that a trace records as ``param`` sites, so every guide call and
every model call records its trainable parameters under a name unique to its object (no two guides
collide). Restoring Pyro's param store from a file is refused: the guide's forward reads its own
parameters, so restored values would be ignored. :func:`~pyro_lora.fit` holds its own optimizer and
skips the recording (:func:`own_optimizer`), so the param store does not keep its guides alive.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref

import pyro
import torch

from .pyro_stack import remember_draws, running_svi

_NAMESPACE = "pyro_lora:"
_ids = itertools.count()
_named = weakref.WeakValueDictionary()  # unique_name's prefix -> its object, while alive
_recorded = weakref.WeakValueDictionary()  # id -> a parameter record() put in the store (alive while stored)
_own_optimizer = 0
# how to keep a Pyro autoguide's result, which a restored param store would not reach
AUTOGUIDE_SAVE = ("pyro_lora.save_guide(autoguide, folder) (its state_dict, the network's trained parameters and the "
                  "model's signature), restored by pyro_lora.load_guide(folder, model, guide=autoguide) into a model "
                  "built as it was and a fresh autoguide called once on a labelled batch (docs/saving.md)")


def unique_name(obj: object) -> str:
    """A param-store prefix for ``obj``, unique in this process: ``"pyro_lora:MeanFieldGuide.3"``."""
    name = f"{_NAMESPACE}{type(obj).__name__}.{next(_ids)}"
    _named[name] = obj
    return name


@contextlib.contextmanager
def own_optimizer():
    """Within the block, :func:`record` does nothing: the caller's optimizer holds the parameters."""
    global _own_optimizer
    _own_optimizer += 1
    try:
        yield
    finally:
        _own_optimizer -= 1


def recording() -> bool:
    """Whether :func:`record` records (outside :func:`own_optimizer`)."""
    return not _own_optimizer


def record(prefix: str, named_parameters) -> None:
    """Record each trainable parameter as the Pyro param ``"{prefix}.{name}"`` (the very tensor, not a copy).

    :raises ValueError: if the store holds another tensor under one of these names, or pyro_lora params of
        no live guide or model: values restored with ``get_param_store().load`` would be ignored (the
        forward reads the guide's own parameters); :func:`~pyro_lora.save_guide` / :func:`~pyro_lora.load_guide`
        save and restore guides.
    """
    if _own_optimizer:
        return
    _check_optimizer_state(running_svi(), prefix)
    store = pyro.get_param_store()
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        key = f"{prefix}.{name}"
        if not p.is_contiguous():  # the store would keep a contiguous copy, which Pyro's optimizer would train instead
            p.data = p.data.contiguous()  # same values, same parameter object
        if key not in store:
            _check_no_orphans(store)
            _recorded[id(p)] = p
            store[key] = p
        else:
            _check_same(store, key, p)
        pyro.param(key)


def _check_optimizer_state(svi, prefix: str) -> None:
    """Refuse an ``SVI`` step whose Pyro optimizer holds state loaded (``optim.load``, ``set_state``) for pyro_lora
    params of no live object: Pyro keeps it waiting for those names, which this process never gives again (their
    counter is per process), and the optimizer starts afresh without a word.

    :raises ValueError: naming a stale parameter and the name of the object this step records (``prefix``).
    """
    waiting = getattr(getattr(svi, "optim", None), "_state_waiting_to_be_consumed", None)
    stale = [k for k in waiting or () if k.startswith(_NAMESPACE) and ".".join(k.split(".")[:2]) not in _named]
    if stale:
        raise ValueError(
            f"the Pyro optimizer of this SVI holds state loaded for {len(stale)} pyro_lora param(s) of no object in this "
            f"process ({stale[0]!r}, ...; this step trains {prefix!r}): pyro_lora's param names hold a counter "
            "of the objects built in a process, so the state would wait unused and the optimizer start afresh; resume a "
            "run with pyro_lora.fit(..., checkpoint_dir=..., resume=True), or drop the loaded state (a new optimizer)")


def check_store(owners, action: str) -> None:
    """Refuse to ``action`` (predict, fit, save, ...) where Pyro's param store holds values these objects would ignore:
    the library's own functions read a guide's and a network's parameters, never the store, so a store restored with
    ``get_param_store().load`` went unnoticed there (an untrained guide predicted and saved).

    :param owners: ``(prefix, named_parameters)`` of each object, as :func:`record` takes them.
    :raises ValueError: as :func:`record` does.
    """
    store = pyro.get_param_store()
    if not any(k.startswith(_NAMESPACE) for k in store.keys()):
        return
    _check_no_orphans(store, action)
    for prefix, named_parameters in owners:
        for name, p in named_parameters:
            key = f"{prefix}.{name}"
            if key in store:
                _check_same(store, key, p, action)


_autoguides = weakref.WeakKeyDictionary()  # Pyro autoguide -> weakref of the LoraModel it was first called over
_trained_over = {}  # id(param store tensor) -> (its weakref, weakref of the LoraModel an autoguide trained it over)


def note_autoguide(autoguide, model) -> None:
    """``autoguide``'s parameters in Pyro's param store (those an SVI step trains) are its values over ``model``: kept
    beyond its life, as :func:`check_autoguide_start` reads them."""
    for p in autoguide.parameters():
        _trained_over[id(p)] = (weakref.ref(p), weakref.ref(model))


def check_autoguide_start(autoguide, model) -> None:
    """Refuse the first call of ``autoguide`` (a Pyro autoguide over ``model``, building its parameters) where Pyro's
    param store holds, under its names, values of an autoguide over another model (another network, or one of another
    rank: :func:`note_autoguide`, or one still alive): Pyro hands them to it as its start, and the two share them from
    then on (training one moves the other's posterior, which ``save_guide`` then saves beside the other's head).

    :raises ValueError: naming the first such parameter, and ``pyro.clear_param_store()``.
    """
    for other, over in list(_autoguides.items()):  # those still alive (and so their models), trained or not
        if other is not autoguide and over() is not None:
            note_autoguide(other, over())
    for key in [k for k, (ref, _) in _trained_over.items() if ref() is None]:
        del _trained_over[key]  # tensors no longer stored
    name = type(autoguide).__name__
    for key, p in pyro.get_param_store().named_parameters():
        ref, over = _trained_over.get(id(p), (None, None))
        if key.startswith(f"{autoguide._pyro_name}.") and ref is not None and ref() is p and over() is not model:
            raise ValueError(
                f"cannot start this {name}: Pyro's param store holds {key!r}, a parameter of an autoguide over "
                "another LoraModel, which Pyro would hand to this one as its start, the two then sharing it (training one "
                "moves the other's posterior); keep the other's result with pyro_lora.save_guide(autoguide, folder) if "
                "you need it, and call pyro.clear_param_store() before building this one")
    if autoguide not in _autoguides:  # a module-level hook: a deepcopy or pickle of the autoguide keeps it
        autoguide.register_forward_hook(_remember_autoguide_draws)
    _autoguides[autoguide] = weakref.ref(model)


def _remember_autoguide_draws(autoguide, args, draws) -> None:
    """Forward hook of an autoguide :func:`check_autoguide_start` saw: its draws without gradients (``Predictive``'s
    guide pass, which keeps no trace) are remembered (:func:`~pyro_lora.pyro_stack.remember_draws`), so that a model
    conditioned on them tells which autoguide drew them, whatever function of one's own called it."""
    if not torch.is_grad_enabled() and isinstance(draws, dict):
        remember_draws(autoguide, {n: v for n, v in draws.items() if torch.is_tensor(v)})


def autoguides_seen() -> bool:
    """Whether any autoguide :func:`check_autoguide_start` saw is alive (else :func:`traced_autoguides` finds none)."""
    return len(_autoguides) > 0


def traced_autoguides(trace) -> list:
    """The autoguides :func:`check_autoguide_start` saw (each first called over a LoraModel) whose parameters the
    ``param`` sites of ``trace`` read, by identity (a site's value keeps a weak reference to the stored tensor, its
    ``unconstrained``, which Pyro's ``SVI`` reads so too): those that ran in a guide trace, whatever function of one's
    own called them."""
    read = set()
    for node in trace.nodes.values():
        ref = getattr(node["value"], "unconstrained", None) if node["type"] == "param" else None
        if ref is not None and ref() is not None:
            read.add(id(ref()))  # a live tensor (the store's, the autoguide's): its id is no freed one's
    return [g for g in list(_autoguides.keys()) if any(id(p) in read for p in g.parameters())] if read else []


def _check_same(store, key, p, action=None):
    if store[key] is not p:
        raise ValueError(_refusal(f"another tensor than the live parameter under {key!r}", action))


def _check_no_orphans(store, action=None):
    orphans = [k for k in store.keys() if k.startswith(_NAMESPACE) and _recorded.get(id(store[k])) is not store[k]]
    if orphans:
        raise ValueError(_refusal(f"pyro_lora params that no live guide or model recorded ({orphans[0]!r}, ...)", action))


def _refusal(what, action=None):
    return (
        f"{f'cannot {action}: ' if action else ''}Pyro's param store holds {what} (restored with get_param_store().load?): "
        "those values would be ignored, "
        "since the guide's forward reads its own parameters; save and restore guides with pyro_lora.save_guide / "
        f"load_guide (a Pyro autoguide's result with {AUTOGUIDE_SAVE}), and call pyro.clear_param_store() to drop the "
        "stale entries"
    )
