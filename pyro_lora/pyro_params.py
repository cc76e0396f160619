"""Pyro's param store sees the trainable parameters of guides and networks, so Pyro's own optimizers train them.

Guides and networks keep ordinary ``nn.Parameter`` s (several guides can live in one process). Pyro's
``SVI`` only optimises the parameters that a trace records as ``param`` sites, so every guide call and
every model call records its trainable parameters under a name unique to its object (no two guides
collide). :func:`~pyro_lora.fit` holds its own optimizer and skips the recording (:func:`own_optimizer`),
so the param store does not keep its guides alive.
"""

import contextlib
import itertools

import pyro

_ids = itertools.count()
_own_optimizer = 0


def unique_name(obj):
    """A param-store prefix for ``obj``, unique in this process: ``"MeanFieldGuide.3"``."""
    return f"{type(obj).__name__}.{next(_ids)}"


@contextlib.contextmanager
def own_optimizer():
    """Within the block, :func:`record` does nothing: the caller's optimizer holds the parameters."""
    global _own_optimizer
    _own_optimizer += 1
    try:
        yield
    finally:
        _own_optimizer -= 1


def record(prefix, named_parameters):
    """Record each trainable parameter as the Pyro param ``"{prefix}.{name}"`` (the very tensor, not a copy).

    A store entry of that name holding another tensor (a stale one, e.g. restored by
    ``get_param_store().load``) is replaced, so Pyro's optimizer always steps the tensor the forward uses.
    """
    if _own_optimizer:
        return
    store = pyro.get_param_store()
    for name, p in named_parameters:
        if p.requires_grad:
            key = f"{prefix}.{name}"
            if key not in store or store[key] is not p:
                store[key] = p
            pyro.param(key)
