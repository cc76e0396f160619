"""A network's train / eval mode for the length of a call, put back module by module afterwards.

``net.train(was_training)`` restores one flag recursively: a submodule the user had switched on its own (dropout kept
off in the embeddings, one layer in train mode) would come back in the network's mode, changing later forwards.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["eval_mode", "network_mode"]


@contextlib.contextmanager
def network_mode(net: torch.nn.Module, training: bool):
    """Run the block with ``net.train(training)``; afterwards every module of ``net`` has its own mode back."""
    saved = [(m, m.training) for m in net.modules()]
    net.train(training)
    try:
        yield
    finally:
        net.train(saved[0][1])  # the network's own train() first (modules overriding it do their part)
        for module, flag in saved:
            module.training = flag


def eval_mode(net: torch.nn.Module):
    """:func:`network_mode` in eval mode: no dropout."""
    return network_mode(net, False)
