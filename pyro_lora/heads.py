"""The linear head that gives a model's class logits, and its input for each example (the last-layer features).

For last-layer methods (:class:`~pyro_lora.guides.LastLayerLaplaceGuide`): the head is found in the network, its
input captured by a forward hook during the model's own forward and checked to reproduce the model's logits. The
steps :class:`~pyro_lora.MultipleChoice` applies after the LM head itself (Gemma 2's final logit softcapping, Cohere's
logit scaling: :func:`head_steps`) are known by the model's class, in every dtype, and carried into the features with
their derivative; a family that transforms the logits after its head otherwise is refused rather than described by
the wrong function.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper

from .data import to_device
from .hooks import forward_hooks
from .modes import eval_mode
from .likelihoods import MultipleChoice, _head_steps, apply_head_steps
from .model import HALF_DTYPES
from .quantized import is_quantized
from .sites import base_network, head_modules

__all__ = ["class_rows", "find_head", "head_features", "head_rows", "head_steps", "tied_parameters"]

# how closely the head's output must reproduce the model's logits, (relative to the largest, absolute): float32
# rounding, or half precision's (bf16 keeps 8 significant bits)
_TOLERANCE = {False: (1e-4, 1e-5), True: (2e-2, 1e-3)}


def find_head(model, path: str | None = None) -> torch.nn.Linear:
    """The ``nn.Linear`` whose output gives ``model``'s class logits.

    At ``path`` (a name of ``model.net.named_modules()``), else the base model's ``classifier`` or ``score`` (a
    sequence classifier), or else its one module outside the backbone (:func:`~pyro_lora.sites.head_modules`: BART's
    and T5's ``classification_head``), or its output embedding (:class:`~pyro_lora.MultipleChoice`); peft's trained copy of a
    saved module; within a module, its last linear layer (RoBERTa's ``classifier.out_proj``).

    :raises ValueError: if there is no such module, it carries a peft adapter layer (LoRA on the head, trainable tokens
        tied to it: the message names which), holds no linear layer, or ends in a quantized one.
    """
    net = model.net
    base = base_network(net)
    others = {}
    if path is not None:
        try:
            module = net.get_submodule(path)
        except AttributeError:
            raise ValueError(f"head={path!r} names no module of the network (see model.net.named_modules())") from None
    elif isinstance(model.likelihood, MultipleChoice):
        get = getattr(base, "get_output_embeddings", None)
        module = get() if callable(get) else None
    else:
        module = next((getattr(base, n) for n in ("classifier", "score")
                       if isinstance(getattr(base, n, None), torch.nn.Module)), None)
        others = head_modules(net) if module is None else others
        if len(others) == 1:  # named otherwise: BART's and T5's classification_head
            (module,) = others.values()
    if module is None:
        found = f" (the modules outside its backbone: {sorted(others)})" if len(others) > 1 else ""
        raise ValueError(f"found no head in {type(base).__name__} (no 'classifier' or 'score' module, no other one module "
                         f"outside its backbone{found}, or output embedding for multiple choice): pass head='its.module.path' "
                         "of model.net.named_modules()")
    where = next((repr(n) for n, m in net.named_modules() if m is module), type(module).__name__)
    linears = list(_linears(module, model.adapter))
    if not linears:
        raise ValueError(f"the head {where} ({type(module).__name__}) holds no linear layer")
    if not isinstance(linears[-1], BaseTunerLayer) and is_quantized(linears[-1].weight):
        # bitsandbytes' codes, packed into a float dtype too, are no weights (an earlier layer is no head either)
        raise ValueError(f"the head {where} ends in a quantized linear layer ({type(linears[-1]).__name__}), whose weight "
                         "holds codes, not weights: load the head unquantized, e.g. with llm_int8_skip_modules=[its name] "
                         "in transformers' BitsAndBytesConfig")
    classes = getattr(getattr(base, "config", None), "num_labels", None)
    if others and isinstance(classes, int) and linears[-1].out_features != classes:  # a guess, not the classifier
        raise ValueError(f"the one module outside {type(base).__name__}'s backbone, {where}, ends in a linear layer of "
                         f"{linears[-1].out_features} outputs, not one per class ({classes}): it is no classification head; "
                         "pass head='its.module.path' of model.net.named_modules()")
    if isinstance(linears[-1], BaseTunerLayer):
        raise ValueError(f"the head {where} carries a peft adapter layer, {type(linears[-1]).__name__} ({_tuner_advice(linears[-1])}):"
                         " a last-layer posterior needs its plain weights, which the layer's own weights would change")
    return linears[-1]


def _tuner_advice(layer) -> str:
    """What put the peft layer ``layer`` on the head, and how to leave it off."""
    if isinstance(layer, TrainableTokensLayer):
        return ("peft's trainable_token_indices, given for the head or for an input embedding tied to it; leave the "
                "head's rows out of trainable_token_indices, or untie the embeddings")
    if isinstance(layer, LoraLayer):
        return "LoRA on the head; leave the head out of target_modules"
    return "an adapter on the head; leave the head out of the adapter's target modules"


def _linears(module, adapter):
    """The linear layers of ``module`` in order, each peft-trained copy read as ``adapter``'s (RoBERTa's
    ``classifier.out_proj`` in ``modules_to_save`` beside another adapter's), a LoRA layer as itself."""
    if isinstance(module, ModulesToSaveWrapper):
        yield from _linears(module.modules_to_save[adapter] if adapter in module.modules_to_save else module.original_module, adapter)
    elif isinstance(module, BaseTunerLayer):
        yield module
    elif isinstance(module, torch.nn.Linear):
        yield module
    else:
        for child in module.children():
            yield from _linears(child, adapter)


def class_rows(likelihood, linear: torch.nn.Linear) -> torch.Tensor:
    """The head's rows of the ``C`` classes, ``[C]``: the answer-letter tokens (letter multiple choice), else all.

    :raises ValueError: for answer tokens that are not rows of the head.
    """
    ids = getattr(likelihood, "answer_token_ids", None)
    if ids is None:
        return torch.arange(linear.weight.shape[0], device=linear.weight.device)
    ids = torch.as_tensor(ids, device=linear.weight.device).long()
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= linear.weight.shape[0]:
        raise ValueError(f"answer_token_ids {ids.tolist()} are not rows of the head's {linear.weight.shape[0]} outputs")
    return ids


def head_steps(model, linear: torch.nn.Linear) -> dict:
    """The steps that make ``linear``'s output the logits, ``{config attribute: value}``: those
    :class:`~pyro_lora.MultipleChoice` applies after the LM head (a softcapping, a scaling: those the model class's
    forward names), known before any forward: empty unless ``linear`` is that head under ``MultipleChoice`` (a
    classifier's ``score`` runs in the model's own forward, which applies none of them)."""
    if not isinstance(model.likelihood, MultipleChoice):
        return {}
    base = base_network(model.net)
    get = getattr(base, "get_output_embeddings", None)
    embedding = get() if callable(get) else None
    if embedding is None or not any(m is linear for m in _linears(embedding, model.adapter)):
        return {}
    return _head_steps(base)[0]


def tied_parameters(net, linear: torch.nn.Linear) -> list[str]:
    """The names of ``net``'s parameters that share the head's weight, the head's own name among them: empty
    unless the weight is tied (a causal LM's ``tie_word_embeddings``: the output rows are also the input embeddings).
    The frozen original of a module peft's ``modules_to_save`` replaces does not run while its copy does: an
    ``embed_tokens`` trained so unties the head, though the original still shares its storage."""
    ptr = linear.weight.data_ptr()
    idle = tuple(f"{path}.original_module." for path, m in net.named_modules() if isinstance(m, ModulesToSaveWrapper)
                 and not m.disable_adapters and all(a in m.modules_to_save for a in m.active_adapters))
    names = [n for n, p in net.named_parameters(remove_duplicate=False) if p.data_ptr() == ptr and not n.startswith(idle)]
    return names if len(names) > 1 else []


def head_rows(linear: torch.nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    """The head's ``rows`` as they are now, the bias (if any) as last column: ``[C, D1]`` float64."""
    theta = linear.weight.detach()[rows].double()
    if linear.bias is not None:
        theta = torch.cat([theta, linear.bias.detach()[rows].double()[:, None]], 1)
    return theta


def _read_positions(model, linear, batch, values, finite, length) -> torch.Tensor:
    """``[B]``: the position of the head's ``[B, T, K]`` output each example's logits are read at, by autograd: a zero
    added to that output moves the logits at that position only. For outputs that tie at several positions.

    :raises ValueError: where an example's logits move with no position (they come from elsewhere) or with several (a
        pooling after the head).
    """
    added = []

    def add_zero(module, args, output):
        added.append(torch.zeros_like(output, requires_grad=True))
        return output.detach() + added[-1]

    # only the graph after the head is needed: the network's trainable parameters would record a training forward's
    trainable = [p for p in model.net.parameters() if p.requires_grad]
    values = None if values is None else {k: v.detach() for k, v in values.items()}
    try:
        for p in trainable:
            p.requires_grad_(False)
        with forward_hooks(model, [(linear, add_zero)], "the search for the position the logits are read at"), \
                eval_mode(model.net), torch.enable_grad():
            logits = model.logits(batch, values)
            moved = torch.autograd.grad(logits.where(finite, 0.0).sum(), added[0], allow_unused=True)[0]
    finally:
        for p in trainable:
            p.requires_grad_(True)
    read = torch.zeros(finite.shape[0], length, dtype=torch.bool, device=finite.device) if moved is None else \
        moved.reshape(finite.shape[0], length, -1).ne(0).any(-1)
    count = read.sum(1)
    if bool((count == 0).any()):
        i = int((count == 0).nonzero()[0])
        raise ValueError(f"the logits of example {i} do not move with the head's output at any position: they do not come "
                         "from this head, and a last-layer posterior needs the logits to be its output")
    if bool((count > 1).any()):
        i = int((count > 1).nonzero()[0])
        raise ValueError(f"the logits of example {i} are read from {int(count[i])} positions of the head's output, not "
                         "one: the model pools after its head, and a last-layer posterior needs the logits to be the "
                         "head's output at one position")
    return read.int().argmax(1)


@torch.no_grad()
def head_features(model, linear: torch.nn.Linear, rows: torch.Tensor, batch: dict, values: dict | None = None,
                  steps: dict | None = None):
    """The model's logits on ``batch`` (at the site ``values``), the head's input for each example, and the slope of
    the logits in the head's output.

    The logits are the head's output ``z`` through ``steps`` (default :func:`head_steps`): ``f = g(z)``, one
    logit at a time, so ``df/dz = diag(g'(z))`` (a softcap ``c tanh(z / c)``: ``sech^2(z / c)``). Where the head runs
    on every position (``[B, T, D]``: Llama's ``score``), the example's input is the position whose output, restricted
    to ``rows``, gives the logits (their finite entries: ``-inf`` is a missing choice); where several give them (a
    zero-initialised head gives every position the same output), the one the logits move with, by autograd.

    :returns: logits ``[B, K]`` (float32), the inputs ``phi`` ``[B, D]`` (float64) and ``g'(z)`` ``[B, K]`` (float64;
        ones without steps).
    :raises ValueError: if the head does not run exactly once in the forward (its hook skipped: a compiled network or
        a copy, :func:`~pyro_lora.hooks.hooks_ran`), its input is not per example, or no position gives the logits
        to ``1e-4`` of the largest (float32; ``2e-2`` in half precision: a half-precision base, or under a user's
        ``torch.autocast``), or, where several do, the logits move with none or several of them (a pooling after
        the head).
    """
    steps = head_steps(model, linear) if steps is None else steps
    batch = to_device(batch, model.device)
    seen = []
    with forward_hooks(model, [(linear, lambda module, args, output: seen.append(args[0].detach()))],
                       "the capture of the head's input"), eval_mode(model.net):
        logits = model.logits(batch, values)
    if len(seen) != 1:
        raise ValueError(f"the head ran {len(seen)} times in one forward, where a last-layer posterior needs it once")
    hidden, (b, k) = seen[0], logits.shape
    if hidden.dim() < 2 or hidden.shape[0] != b:
        raise ValueError(f"the head's input has shape {tuple(hidden.shape)}, not [B = {b}, ..., D]: it is no per-example head")
    x = hidden.reshape(b, -1, hidden.shape[-1])  # [B, T, D]: T = 1 for a pooled input
    theta = head_rows(linear, rows[:k])
    w, bias = (theta[:, :-1], theta[:, -1]) if linear.bias is not None else (theta, theta.new_zeros(k))
    finite = torch.isfinite(logits)
    target = logits.double().where(finite, 0.0)
    rtol, atol = _TOLERANCE[model.forward_dtype in HALF_DTYPES]  # a half-precision base, or a user's autocast
    # the position whose output gives the logits: searched in the input's dtype over all T, checked in float64
    out = apply_head_steps((x @ w.to(x.dtype).T).float() + bias.float(), steps)
    gaps = ((out - target.float()[:, None]).abs() * finite[:, None]).amax(-1)  # [B, T]
    pos = gaps.argmin(1)
    if bool(((gaps <= (rtol * target.abs().amax(-1) + atol).float()[:, None]).sum(1) > 1).any()):
        # several positions give the logits (a zero-initialised head gives every position the same output): which
        # one the model reads is no longer told by the values, and another one's input is another posterior
        pos = _read_positions(model, linear, batch, values, finite, x.shape[1])
    phi = x[torch.arange(b, device=x.device), pos].double()
    with torch.enable_grad():  # g'(z) by autograd: each step is elementwise, so the gradient of the sum is the diagonal
        z = (phi @ w.T + bias).requires_grad_()
        mine = apply_head_steps(z, steps)
        slope = torch.autograd.grad(mine.sum(), z)[0]
    gap = ((mine.detach() - target).abs() * finite).amax(-1)
    bad = gap > rtol * target.abs().amax(-1) + atol
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        known = f" after the {', '.join(f'{n}={v}' for n, v in steps.items())} MultipleChoice applies" if steps else ""
        raise ValueError(
            f"the head's output{known} reproduces the model's logits at no position for example {i} (they differ by "
            f"{float(gap[i]):.3g}, the logits reach {float(target[i].abs().max()):.3g}): the model transforms its head's "
            "output (a scaling, a softcapping, a wrapper), so a posterior over the head's rows would not be one over "
            "these logits; a last-layer posterior needs a head whose output is the logits"
        )
    return logits, phi, slope
