"""A network's train / eval mode for the length of a call, put back module by module afterwards, and the dropout its
modes leave on; and the library's own tensors made as in a clean process whatever torch's ambient state
(:func:`library_dtype`, :func:`building`).

``net.train(was_training)`` restores one flag recursively: a submodule the user had switched on its own (dropout kept
off in the embeddings, one layer in train mode) would come back in the network's mode, changing later forwards.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import textwrap

import torch
from torch.nn.modules.dropout import _DropoutNd
from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["building", "dropout_in_training", "eval_mode", "library_dtype", "network_mode"]


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


@contextlib.contextmanager
def library_dtype():
    """Run the block (or, as a decorator, the function) with torch's default dtype float32, the caller's put back after.

    The library's tensors are float32 by design (guide parameters and buffers, KFAC factors, priors: a float64
    *network* keeps them float32 too), and many are made by factories that follow the default dtype (``torch.zeros``,
    ``torch.tensor`` of Python floats, Pyro's and torch's distributions of Python numbers): under a user's
    ``torch.set_default_dtype(torch.float64)`` they came out float64 beside float32 ones (a Laplace fit died in a
    matmul, a guide loaded so held float64 buffers and drew other samples). One guard where the library is entered
    covers every factory, a future one and third-party ones included, where explicit dtypes would have to be right at
    each. ``set_default_dtype`` is process-wide: another thread making tensors meanwhile sees float32 too."""
    saved = torch.get_default_dtype()
    if saved == torch.float32:
        yield
        return
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


@contextlib.contextmanager
def building():
    """:func:`library_dtype`, and outside ``torch.inference_mode()``, for what builds state that outlives the call (a
    guide's constructor, ``load_guide``): a tensor made in inference mode is an inference tensor for good, which a
    later ``fit`` cannot update (AdamW: "Inplace update to inference tensor outside InferenceMode is not allowed") nor
    differentiate through. Gradients stay off there, as inference mode had them."""
    with library_dtype():
        if not torch.is_inference_mode_enabled():
            yield
            return
        with torch.inference_mode(False), torch.no_grad():
            yield


def dropout_in_training(net: torch.nn.Module) -> list[str]:
    """Where the forward of ``net`` draws at random as its modules' train / eval modes stand: one entry per module,
    ``"<name> (<what>=<p>, ...)"``; empty where every such probability that would apply is 0
    (:func:`dropout_probabilities`)."""
    return [f"{name} ({', '.join(f'{k}={v:g}' for k, v in probs.items())})"
            for name, probs in dropout_probabilities(net).items()]


def dropout_probabilities(net: torch.nn.Module, as_set: bool = True) -> dict[str, dict[str, float]]:
    """What draws at random in the forward of ``net``: module name -> ``{what: p}``, each probability above 0.
    With ``as_set`` as the modules' train / eval modes stand; without, as in training (every module in training
    mode: what a fit runs).

    Counted, for each module in training mode that the forward runs (:func:`_running_modules`): a dropout module's
    ``p`` (it drops where it is called); and what the module's own methods (not ``__init__``: :func:`_reads`) read
    under its ``training`` flag, whatever its children's modes: a dropout module's ``self.<child>.p`` (BERT's and
    GPT-2's attention, with that child in eval mode), a float attribute named ``*drop*`` or ``*jitter*`` (dropout
    applied functionally, as Llama's ``attention_dropout`` and DBRX's ``resid_pdrop``; a mixture of experts' input
    jitter, as Mixtral's ``jitter_noise`` and DBRX's ``moe_jitter_eps``), and such a key of the transformers config it
    holds (``self.config.<key>``, as Persimmon's ``attention_dropout``). A value only ``__init__`` reads (the config's
    ``classifier_dropout`` of another head class, a probability a dropout module took at build and since set to 0) is
    not counted; nor is randomness under other names (PhiMoE's router samples its experts in training). A peft
    layer runs the per-adapter modules of its active adapters only: another adapter's ``lora_dropout`` (or
    ``modules_to_save`` copy) is passed over.
    """
    found = {}
    for name, module in _running_modules(net):
        if as_set and not module.training:
            continue
        probs = {"p": float(module.p)} if isinstance(module, _DropoutNd) and module.p > 0 else {}
        # a child in training mode is an entry of its own; one in eval mode drops only where this module reads its p
        held = {f"{key}.p": float(child.p) for key, child in module.named_children()
                if as_set and isinstance(child, _DropoutNd) and not child.training and child.p > 0}
        held.update((key, v) for key, v in vars(module).items() if _random(key, v))
        config = vars(module).get("config")
        if isinstance(config, PretrainedConfig):
            held.update((f"config.{key}", v) for key, v in vars(config).items() if _random(key, v))
        reads = _reads(type(module)) if held else frozenset()
        probs.update((what, v) for what, v in held.items()
                     if reads is None or (what if what.startswith("config.") else f"self.{what}") in reads)
        if probs:
            found[name or type(module).__name__] = probs
    return found


def _random(name: str, value) -> bool:
    """Whether ``name`` and ``value`` are a probability of train-mode randomness above 0 (``*drop*``, ``*jitter*``)."""
    return isinstance(value, float) and value > 0 and ("drop" in name or "jitter" in name)


@functools.cache
def _reads(cls: type) -> frozenset[str] | None:
    """What the methods of ``cls`` other than ``__init__`` read (its own and its bases', less torch's and those every
    transformers model shares: loading, saving, attention set-up): ``"self.<name>"``, ``"self.<child>.p"`` and
    ``"config.<key>"`` (``self.config.<key>`` or a local ``config``), as attributes or ``getattr`` with a literal
    name. ``None`` where a class's source cannot be read (built at run time): then everything counts."""
    read = set()
    for base in cls.__mro__:
        if base.__module__.startswith("torch.") or issubclass(PreTrainedModel, base):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(base)))
        except (OSError, TypeError, SyntaxError):
            return None
        for method in tree.body[0].body:
            if isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)) and method.name != "__init__":
                read.update(filter(None, map(_attribute_read, ast.walk(method))))
    return frozenset(read)


def _attribute_read(node) -> str | None:
    """The :func:`_reads` entry of an AST node: ``self.x``, ``self.x.p``, ``self.config.x`` / ``config.x``, or their
    ``getattr(owner, "x", ...)``; else ``None``."""
    if isinstance(node, ast.Attribute):
        owner, attr = _owner(node.value), node.attr
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
          and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
        owner, attr = _owner(node.args[0]), node.args[1].value
    else:
        return None
    if owner in ("self", "config") or (owner is not None and attr == "p"):
        return f"{owner}.{attr}"
    return None


def _owner(node) -> str | None:
    """``"self"``, ``"config"`` (``self.config``, a local ``config``) or ``"self.<name>"`` for such an expression."""
    if isinstance(node, ast.Name):
        return node.id if node.id in ("self", "config") else None
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return "config" if node.attr == "config" else f"self.{node.attr}"
    return None


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
