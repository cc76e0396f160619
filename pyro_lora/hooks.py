"""Forward hooks pyro_lora puts on a network's modules for the length of a call, each checked to run in every forward.

A hook may silently never run: dynamo skips the guards on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``,
on by default), so a ``torch.compile``'d network reuses a graph compiled before the hook existed; and a hook on a module
of a copy of the network never runs in the network. What the hook was for (an ensemble member's head, the head's input a
last-layer posterior reads) would then not happen while the numbers still came back, so every forward of the model
checks that each hook ran, by a counter the hook bumps (no host sync).
"""

from __future__ import annotations

import contextlib
import weakref

# why a hook pyro_lora put on a module did not run, and what to do: said by every refusal of a hook that did not run
SKIPPED = ("a torch.compile'd network reusing a graph compiled before the hook existed (dynamo skips module hook guards: "
           "call torch._dynamo.reset() before this call, set torch._dynamo.config.skip_nnmodule_hook_guards = False "
           "before the network's first compiled forward, or run it uncompiled), or a module of a copy of the network "
           "(copy.deepcopy) rather than of the network the model runs")

_active = weakref.WeakKeyDictionary()  # model -> [(counts, what)] of the hooks in force on its network


@contextlib.contextmanager
def forward_hooks(model, hooks, what: str):
    """Within the block, each ``(module, hook)`` of ``hooks`` is the first forward hook of ``module`` (one of
    ``model.net``'s; the module's own hooks then run on its result), and every forward of the model (:meth:`~pyro_lora.LoraModel.logits`, :func:`hooks_ran`) refuses unless each ran in it.

    :param str what: what the hooks do, for the refusal (``"the ensemble's per-member heads"``).
    """
    counts = [0] * len(hooks)

    def counted(i, hook):
        def run(module, args, output):
            counts[i] += 1
            return hook(module, args, output)

        return run

    entry = (counts, what)
    # first among the module's forward hooks: a user's own (a temperature on the head's output) then runs on what ours
    # returns, as it runs on the module's output without ours, instead of being overwritten by it
    handles = [module.register_forward_hook(counted(i, hook), prepend=True) for i, (module, hook) in enumerate(hooks)]
    _active.setdefault(model, []).append(entry)
    try:
        yield
    finally:
        _active[model].remove(entry)
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def hooks_ran(model):
    """Around one forward of ``model``: refuse after it unless every hook of :func:`forward_hooks` in force ran.

    :raises ValueError: naming what the hook that did not run was for, and the likely causes (:data:`SKIPPED`).
    """
    entries = list(_active.get(model, ()))
    for counts, _ in entries:
        counts[:] = [0] * len(counts)
    yield
    for counts, what in entries:
        if not all(counts):
            raise ValueError(f"{what} did not run in this forward: the forward hook pyro_lora put on the network's module "
                             f"was skipped, and the numbers would be without it. Likely causes: {SKIPPED}")
