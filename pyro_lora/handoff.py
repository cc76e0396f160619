"""Hand sampled LoRA weights to peft's LoRA layers without copying them into parameters.

Each LoRA layer gets a small holder that its forward reads. Sampling happens first (in the Pyro
model or a guide's fast path), then the values are handed over for one forward: sampling inside the
forward would draw again when activation checkpointing recomputes it. Under transformers' activation
checkpointing the handed weights also travel as checkpoint inputs (:func:`handed`), so the recomputed
forward in backward sees them. With an empty holder the layer runs peft's own forward unchanged.

With a leading sample dim ``S`` the batch is repeated ``S`` times (sample-major: row ``s * B + b``)
and each layer applies its ``S`` deltas with one batched matmul.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .kinds import KINDS, between_kinds, down_kind, linear, up_kind
from .modes import dropout_in_training

_HOLDER = "_pyro_lora_handed"
_WRAPPED = "_pyro_lora_checkpoint"
_NEEDS_GRAD = "_pyro_lora_handed_grad"
FLIPOUT_LOC = "A_loc"  # key of the down projection's posterior mean in a layer's handed weights (flipout)


_FOREIGN_CHECKPOINT = (
    "a LoRA layer ran under an activation checkpoint that pyro_lora cannot see (autograd off in its forward, or a "
    "recomputation in backward without the handed weights), so the gradients of the sampled LoRA matrices would be "
    "wrong: checkpointing applied outside transformers (torch.utils.checkpoint, checkpoint_wrapper, "
    "apply_activation_checkpointing) is not supported; use net.gradient_checkpointing_enable() or "
    "fit(..., gradient_checkpointing=True)"
)


class ForeignCheckpointError(RuntimeError):
    """A LoRA layer ran under an activation checkpoint the hand-off cannot see (:data:`_FOREIGN_CHECKPOINT`)."""


class _Handed:
    """The weights handed to one layer: matrix letter (or :data:`FLIPOUT_LOC`) -> tensor."""

    __slots__ = ("adapter", "weights", "num_samples", "grad_enabled", "flipout_calls", "flipout_seed", "rows")

    def __init__(self, adapter, weights, num_samples, flipout_calls=None, flipout_seed=None, rows=None):
        self.adapter = adapter
        self.rows = rows  # the rows a flipout layer's input must have: one per example (and sample)
        self.weights = {k: v for k, v in weights.items() if v is not None and (k in KINDS or k == FLIPOUT_LOC)}
        self.num_samples = num_samples
        self.grad_enabled = torch.is_grad_enabled()  # autograd switched off between handing and the forward: see _forward
        # forwards of the layer with flipout under this hand-off, shared with a checkpoint's re-handed copy
        self.flipout_calls = [0] if flipout_calls is None else flipout_calls
        # flipout's sign flips are drawn from this seed, taken here, outside any activation checkpoint: the recomputation
        # in backward (handed the same seed) redraws the very signs even where the checkpoint does not restore the RNG
        # state (preserve_rng_state=False); drawn in the forward, they were other signs, and the gradients wrong
        if flipout_seed is None and FLIPOUT_LOC in self.weights:
            flipout_seed = int(torch.randint(2**62, ()))
        self.flipout_seed = flipout_seed

    def tensors(self):
        return dict(self.weights)


def install(layers: dict) -> None:
    """Give every LoRA layer a forward that reads handed weights. Idempotent."""
    for layer in layers.values():
        if not hasattr(layer, _HOLDER):
            setattr(layer, _HOLDER, None)
            layer.forward = functools.partial(_forward, layer)  # a bound method would not unpickle


def checkpointing_modules(net) -> list:
    """The modules of ``net`` that transformers' activation checkpointing may wrap (``gradient_checkpointing`` attr)."""
    return [m for m in net.modules() if hasattr(m, "gradient_checkpointing")]


def reentrant_checkpointing(net) -> bool:
    """Whether transformers' activation checkpointing runs reentrant in ``net`` now (a module switched on, in training
    mode, whose checkpoint function is given a true ``use_reentrant``, or is torch's ``checkpoint`` or transformers'
    wrapper of it (``offload=True``) leaving it unnamed, where torch takes its own default, reentrant): its
    recomputation cannot take ``torch.autograd.grad``. A function of the user's own is taken at its word: reentrant
    only where given a true ``use_reentrant``."""
    return any(getattr(module, "gradient_checkpointing", False) and module.training
               and _reentrant(getattr(module, "_gradient_checkpointing_func", None)) for module in checkpointing_modules(net))


def _partial(func) -> tuple:
    """``(function, keywords)`` of the checkpoint function ``func``: transformers' ``functools.partial`` of torch's
    checkpoint with its ``activation_checkpointing_kwargs``, under pyro_lora's own wrapper where there is one."""
    while getattr(func, _WRAPPED, False):  # pyro_lora's own wrapper of it (torch's checkpoint wraps one too)
        func = func.__wrapped__
    return (func.func, func.keywords) if isinstance(func, functools.partial) else (func, {})


def _reentrant(func) -> bool:
    """Whether the checkpoint function ``func`` runs reentrant (:func:`reentrant_checkpointing`)."""
    base, keywords = _partial(func)
    # torch's checkpoint, or transformers' own wrapper of it (offload=True), take torch's default, reentrant
    torch_default = (base is torch.utils.checkpoint.checkpoint
                     or getattr(base, "__module__", "").startswith("transformers."))
    value = keywords.get("use_reentrant")
    return (value is None and torch_default) or (value is not None and bool(value))  # torch reads it as a bool


@contextlib.contextmanager
def handed(layers: dict, adapter: str, weights: dict, num_samples: int | None = None, checkpointing=(), rows=None):
    """Within the context, ``layers[path]`` computes its LoRA delta from ``weights[path]``.

    Contexts nest: leaving one restores the weights the enclosing one handed.

    :param layers: module path -> installed LoRA layer.
    :param weights: module path -> {matrix letter: ``[*S, rows, cols]``} (``"A"``: ``[*S, r, d_in]``, ``"B"``:
        ``[*S, d_out, r]``, ``"R"``: ``[*S, r, r]``, ``"S"``: ``[*S, 1, r]``; shapes from
        :data:`~pyro_lora.kinds.KINDS`), optionally ``"A_loc"``: the mean of ``A`` for flipout. ``A`` or ``B`` left
        out is read from the layer's own parameter; a between kind left out is not applied.
    :param int num_samples: ``S`` when the values carry a leading sample dim, else ``None``.
    :param checkpointing: modules that may run under activation checkpointing
        (:func:`checkpointing_modules`); those switched on get their checkpoint function wrapped so that the
        recomputation in backward sees the same handed weights, passed as checkpoint inputs.
    :param int rows: with flipout, the rows each layer's input must have (the batch's examples times ``S``): its sign
        flips are drawn per row, so a layer run on anything else is refused.
    """
    see_checkpoints(checkpointing)
    previous = {path: getattr(layer, _HOLDER) for path, layer in layers.items()}
    for path, layer in layers.items():
        w = weights.get(path)
        if w is not None:
            dtype = layer.lora_A[adapter].weight.dtype
            w = {k: v.to(dtype) for k, v in w.items()}
        setattr(layer, _HOLDER, _Handed(adapter, w or {}, num_samples, rows=rows))
    try:
        yield
    finally:
        for path, layer in layers.items():
            setattr(layer, _HOLDER, previous[path])


def see_checkpoints(checkpointing) -> None:
    """Wrap the checkpoint function of each module of ``checkpointing`` (:func:`checkpointing_modules`) switched on
    (:func:`_wrap_checkpoint`), before a forward with or without handed weights: a plain forward's recomputation is
    then one the hand-off sees too, not taken for a foreign checkpoint's after a handed forward in the same backward."""
    for module in checkpointing:
        if getattr(module, "gradient_checkpointing", False):
            _wrap_checkpoint(module)


def _wrap_checkpoint(module):
    """Pass the handed weights of the LoRA layers inside ``module`` through its checkpoint function as inputs.

    transformers calls ``module._gradient_checkpointing_func(forward, *args)``. The recomputation in backward
    runs after :func:`handed` has exited, so without this the reentrant mode recomputes with the peft
    weights (the data gradient of every sampled site silently vanishes) and the non-reentrant mode sees
    other tensors than it saved. As inputs, the weights are restored for the recomputation and their
    gradients flow back through the checkpoint in both modes.
    """
    func = module._gradient_checkpointing_func
    if getattr(func, _WRAPPED, False):
        return

    @functools.wraps(func)
    def checkpoint(forward, *args, **kwargs):
        _check_rng_preserved(module, func)
        # the recomputation in backward runs outside the forward's sdpa_kernel context; and it is one this hand-off sees,
        # whose layers hold what they held in the forward (a plain forward's: nothing handed)
        forward = _seen(_under_kernels(forward))
        # found on each call: a LoraModel over another adapter, built later, hands weights to layers of its own here
        inner = [m for m in module.modules() if hasattr(m, _HOLDER)]
        holders = [getattr(m, _HOLDER) for m in inner]
        keys = [(i, k) for i, h in enumerate(holders) if h is not None for k in h.tensors()]
        tensors = [holders[i].weights[k] for i, k in keys]
        tensors += _gradient_carrier(module, func, [*args, *tensors])
        if not keys:
            return func(lambda *inputs: forward(*inputs[: len(args)]), *args, *tensors, **kwargs)

        def body(*inputs):
            outer = [getattr(m, _HOLDER) for m in inner]
            given = [h.tensors() if h is not None else None for h in holders]
            for (i, k), t in zip(keys, inputs[len(args):]):
                given[i][k] = t
            for m, h, w in zip(inner, holders, given):
                setattr(m, _HOLDER, None if h is None else
                        _Handed(h.adapter, w, h.num_samples, h.flipout_calls, h.flipout_seed, h.rows))
            try:
                return forward(*inputs[: len(args)])
            finally:
                for m, h in zip(inner, outer):
                    setattr(m, _HOLDER, h)

        return func(body, *args, *tensors, **kwargs)

    setattr(checkpoint, _WRAPPED, True)
    module._gradient_checkpointing_func = checkpoint


def _check_rng_preserved(module, func) -> None:
    """Refuse a checkpoint of ``module`` run with ``preserve_rng_state=False`` where it trains with dropout: the
    recomputation in backward draws other dropout masks than the forward did, and the gradients are those of neither
    (torch checks the recomputed tensors' shapes, not their values).

    :raises ValueError: naming the module and the fix.
    """
    if _partial(func)[1].get("preserve_rng_state", True) or not (module.training and torch.is_grad_enabled()):
        return
    found = dropout_in_training(module)  # as its modes stand: functional rates too, the active adapters' only
    if found:
        raise ValueError(f"activation checkpointing with preserve_rng_state=False recomputes the dropout of "
                         f"{type(module).__name__} ({found[0]}) with other masks in backward than in the forward: its "
                         "gradients would be wrong; leave preserve_rng_state out of the checkpointing kwargs (True, the "
                         "default), or set the network's dropout to 0")


def _gradient_carrier(module, func, inputs) -> list:
    """``[a scalar that needs a gradient]`` to pass through a reentrant checkpoint of ``module`` (ignored by its
    forward) where, with gradients on, no input needs one but a parameter inside does, else ``[]``. torch's reentrant
    checkpoint differentiates only through its inputs: with frozen embeddings (transformers 4's
    gradient_checkpointing_enable on a peft network, without ``enable_input_require_grads``) and no handed weight
    needing a gradient, its output had no graph, and such a parameter (a point B beside a fixed posterior, IVON's LoRA)
    got no gradient, without a word."""
    if not torch.is_grad_enabled() or any(torch.is_tensor(t) and t.requires_grad for t in inputs) or not _reentrant(func):
        return []
    if not any(p.requires_grad for p in module.parameters()):
        return []
    device = next((t.device for t in inputs if torch.is_tensor(t)), None)
    return [torch.zeros((), device=device, requires_grad=True)]


_SEEN = threading.local()  # depth of the checkpoints of transformers' the hand-off wraps, running on this thread


def _seen(forward):
    """``forward`` run as a checkpoint the hand-off sees (:func:`_wrap_checkpoint`), in its first run and in its
    recomputation in backward alike: a layer recomputed there without handed weights ran without them forward too."""
    @functools.wraps(forward)
    def run(*inputs, **kwargs):
        _SEEN.depth = getattr(_SEEN, "depth", 0) + 1
        try:
            return forward(*inputs, **kwargs)
        finally:
            _SEEN.depth -= 1

    return run


_SDPA_BACKENDS = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
                  SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
                  SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
                  SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled}


def _under_kernels(forward):
    """``forward`` run, in the checkpoint's forward and in its recomputation in backward alike, with the attention
    kernels enabled now: the model runs ``AutoLaplaceApproximation``'s Hessian under sdpa's math kernel, and a
    recomputation under another (fused) kernel saves other tensors, which torch's non-reentrant checkpoint refuses."""
    kernels = [backend for backend, enabled in _SDPA_BACKENDS.items() if enabled()]
    if len(kernels) == len(_SDPA_BACKENDS):  # torch's default: nothing to restore
        return forward

    @functools.wraps(forward)
    def run(*inputs, **kwargs):
        with sdpa_kernel(kernels):
            return forward(*inputs, **kwargs)

    return run


def _forward(layer, x, *args, **kwargs):
    h = getattr(layer, _HOLDER)
    if h is None:
        if getattr(layer, _NEEDS_GRAD, False) and not getattr(_SEEN, "depth", 0):
            if torch._C._current_graph_task_id() != -1:  # recomputed inside backward, without the handed weights
                raise ForeignCheckpointError(_FOREIGN_CHECKPOINT)
            setattr(layer, _NEEDS_GRAD, False)
        return type(layer).forward(layer, x, *args, **kwargs)
    # remembered so that a foreign checkpoint's recomputation (holder already cleared) is caught above: one that would
    # take gradients through handed weights, whether they are trained or not (a point matrix beside them, the layer's
    # input from trained layers below, run at peft's own values instead would get wrong gradients); a layer handed
    # nothing runs at its own values either way
    handed_with_grad = bool(h.weights) and h.grad_enabled
    needs_grad = handed_with_grad and (
        x.requires_grad or any(t.requires_grad for t in h.weights.values()) or any(p.requires_grad for p in layer.parameters()))
    setattr(layer, _NEEDS_GRAD, needs_grad)
    # handed with gradients on, run with them off: a reentrant checkpoint's first pass, whose recomputation runs the
    # layer at peft's own values (its inputs and parameters need no gradient there, whatever trains below)
    if handed_with_grad and not torch.is_grad_enabled():
        raise ForeignCheckpointError(_FOREIGN_CHECKPOINT)
    if kwargs.get("adapter_names") is not None:
        raise ValueError("peft's mixed-batch forward (adapter_names=...) cannot run with handed LoRA weights: call it without a guide")
    if FLIPOUT_LOC in h.weights and torch._C._current_graph_task_id() == -1:  # a recomputation in backward is no new use
        h.flipout_calls[0] += 1
        if h.flipout_calls[0] > 1:
            raise ValueError(
                "a LoRA layer ran twice in one forward with flipout (a module shared across depths, as ALBERT's layers "
                "are, or one run on other inputs too, as DeBERTa's query_proj on its relative-position embeddings): each "
                "application would draw its own sign flips, two weights for one example; use flipout=False")
        if h.rows is not None and x.shape[0] != h.rows:
            raise ValueError(
                f"a LoRA layer ({type(layer.base_layer).__name__} {tuple(layer.base_layer.weight.shape)}) got an input of "
                f"{x.shape[0]} rows along its first dim, not the batch's {h.rows}: it runs on something other than one row "
                "per example (DeBERTa's relative-position embeddings, tokens flattened or routed to experts), and flipout "
                "draws its sign flips per row, so examples would share draws there or one example get several; use "
                "flipout=False, or leave that layer out of the LoRA targets")
    if h.num_samples is not None and h.num_samples > 1 and x.shape[0] % h.num_samples:
        raise ValueError(
            f"a LoRA layer ({type(layer.base_layer).__name__} {tuple(layer.base_layer.weight.shape)}) got an input of "
            f"{x.shape[0]} rows along its first dim, no multiple of the S={h.num_samples} samples: it runs on something "
            "other than the batch's rows (DeBERTa's relative-position embeddings), so S samples cannot share one "
            "forward; predict with chunk_size=1, or leave that layer out of the LoRA targets")
    result = layer.base_layer(x, *args, **kwargs)
    a, b = (_own_or_handed(layer, h, kind) for kind in (down_kind(), up_kind()))
    x = layer.lora_dropout[h.adapter](x).to(a.dtype)
    between = {k: v for k, v in h.weights.items() if k in KINDS and KINDS[k].role == "between"}
    a_loc = h.weights.get(FLIPOUT_LOC)
    generator = None if a_loc is None else torch.Generator(x.device).manual_seed(h.flipout_seed)
    delta = _delta(x, a, b, between, h.num_samples, a_loc, generator)
    bias = layer.lora_B[h.adapter].bias  # peft's lora_bias=True: B's bias is a point estimate
    if bias is not None:
        delta = delta + bias.to(delta.dtype)
    return result + (delta * layer.scaling[h.adapter]).to(result.dtype)


def _own_or_handed(layer, handed, kind):
    """The handed matrix of ``kind`` (``A`` or ``B``), else the layer's own peft parameter."""
    v = handed.weights.get(kind.letter)
    return v if v is not None else getattr(layer, kind.parameter)[handed.adapter].weight


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, r: torch.Tensor | None = None, num_samples: int | None = None,
               a_loc: torch.Tensor | None = None, log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``B R diag(exp(z)) A x`` for one layer (``R`` and the ScalaBL log-scales ``z`` omitted when ``None``).

    With ``a_loc`` (flipout), ``A = a_loc + E`` and example ``n`` (row ``n`` of ``x``) gets its own sign-flipped
    noise: ``B R (a_loc x + s_n * (E (t_n * x)))`` with random ``s_n in {+-1}^r``, ``t_n in {+-1}^d_in`` shared
    over positions. For a symmetric ``E`` every example's weights are still an exact draw of ``A``.

    :param x: ``[N, ..., d_in]``; with ``num_samples = S``, ``N = S * B`` sample-major.
    :param a: ``[r, d_in]`` or ``[S, r, d_in]``; ``b``: ``[d_out, r]`` or ``[S, d_out, r]``;
        ``r``: ``[r, r]`` or ``[S, r, r]``; ``a_loc``: like ``a``; ``log_scale``: ``[1, r]`` or ``[S, 1, r]``.
    :returns: ``[N, ..., d_out]``.
    """
    between = {k: v for k, v in (("R", r), ("S", log_scale)) if v is not None}
    return _delta(x, a, b, between, num_samples, a_loc)


def _delta(x, a, b, between, num_samples=None, a_loc=None, generator=None):
    """``B M_k ... M_1 A x`` with the between matrices ``between`` (letter -> value) applied in their kinds' stage
    order (:func:`~pyro_lora.kinds.between_kinds`); flipout on ``A`` with ``a_loc`` as in :func:`lora_delta`, its signs
    from ``generator`` (``None``: torch's default one)."""
    if a_loc is None:
        h = linear(x, a, num_samples)
    else:
        t = _signs(x, x.shape[-1], generator)
        h = linear(x, a_loc, num_samples) + linear(x * t, a - a_loc, num_samples) * _signs(x, a.shape[-2], generator)
    for kind in between_kinds():
        if kind.letter in between:
            h = kind.apply(h, between[kind.letter], num_samples)
    return linear(h, b, num_samples)


def _signs(x, size, generator=None):
    """Random ``+-1`` of shape ``[N, 1, ..., 1, size]``: one draw per example (row of ``x``), shared over positions."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (size,)
    return torch.randint(0, 2, shape, device=x.device, generator=generator).to(x.dtype).mul_(2).sub_(1)
