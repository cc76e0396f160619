"""A network's train / eval mode for the length of a call, put back module by module afterwards, and the dropout its
modes leave on.

``net.train(was_training)`` restores one flag recursively: a submodule the user had switched on its own (dropout kept
off in the embeddings, one layer in train mode) would come back in the network's mode, changing later forwards.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.modules.dropout import _DropoutNd
from transformers import PretrainedConfig

__all__ = ["dropout_in_training", "eval_mode", "network_mode"]


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


def dropout_in_training(net: torch.nn.Module) -> list[str]:
    """Where the forward of ``net`` drops at random as its modules' train / eval modes stand: one entry per module,
    ``"<name> (<what>=<p>, ...)"``; empty where every dropout probability that would apply is 0.

    Counted, for each module in training mode that the forward runs: a dropout module's ``p``; a float attribute
    named ``*drop*``, dropout applied functionally (Llama's ``attention_dropout``, BART's ``dropout``, a drop path's
    ``drop_prob``); and the ``*drop*`` probabilities of the transformers config it holds, which some attention reads at
    forward time under its own ``training`` flag (GPT-Neo's ``attention_dropout``; BERT's
    ``attention_probs_dropout_prob``, even with its dropout module in eval mode). A peft layer runs the per-adapter
    modules of its active adapters only: another adapter's ``lora_dropout`` (or ``modules_to_save`` copy) is passed
    over.
    """
    found, configs = [], set()
    for name, module in _running_modules(net):
        if not module.training:
            continue
        probs = {"p": module.p} if isinstance(module, _DropoutNd) else {}
        probs.update((k, v) for k, v in vars(module).items() if "drop" in k and isinstance(v, float))
        config = vars(module).get("config")
        if isinstance(config, PretrainedConfig) and id(config) not in configs:  # many modules hold it: named once
            configs.add(id(config))
            probs.update((f"config.{k}", v) for k, v in vars(config).items() if "drop" in k and isinstance(v, float))
        on = [f"{k}={v:g}" for k, v in probs.items() if v > 0]
        if on:
            found.append(f"{name or type(module).__name__} ({', '.join(on)})")
    return found


def _running_modules(net: torch.nn.Module):
    """``(name, module)`` for ``net`` and each module under it, once, as ``named_modules`` gives them, less a peft
    layer's modules of adapters it does not run: its ModuleDicts (``lora_dropout``, ``modules_to_save``, ...) are
    keyed by adapter, and it runs the entries of its ``active_adapters``."""
    seen, stack = set(), [("", net)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        # peft's tuner layers and modules_to_save wrappers name their adapter layers
        active = module.active_adapters if hasattr(module, "adapter_layer_names") else None
        children = []
        for key, child in module.named_children():
            path = f"{name}.{key}" if name else key
            if active is not None and isinstance(child, torch.nn.ModuleDict):
                children += [(f"{path}.{adapter}", child[adapter]) for adapter in active if adapter in child]
            else:
                children.append((path, child))
        stack.extend(reversed(children))
