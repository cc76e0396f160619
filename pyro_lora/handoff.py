"""Hand sampled LoRA weights to peft's LoRA layers without copying them into parameters.

Each LoRA layer gets a small holder that its forward reads. Sampling happens first (in the Pyro
model or a guide's fast path), then the values are handed over for one forward: sampling inside the
forward gave wrong gradients under activation checkpointing, and ``functional_call`` broke it
(DESIGN.md, *Pitfalls*). With an empty holder the layer runs peft's own forward unchanged.

With a leading sample dim ``S`` the batch is repeated ``S`` times (sample-major: row ``s * B + b``)
and each layer applies its ``S`` deltas with one batched matmul.
"""

import contextlib
import types

import torch

_HOLDER = "_pyro_lora_handed"


class _Handed:
    __slots__ = ("adapter", "A", "B", "R", "S", "A_loc", "num_samples")

    def __init__(self, adapter, weights, num_samples):
        self.adapter = adapter
        self.A = weights.get("A")
        self.B = weights.get("B")
        self.R = weights.get("R")
        self.S = weights.get("S")
        self.A_loc = weights.get("A_loc")
        self.num_samples = num_samples


def install(layers):
    """Give every LoRA layer a forward that reads handed weights. Idempotent."""
    for layer in layers.values():
        if not hasattr(layer, _HOLDER):
            setattr(layer, _HOLDER, None)
            layer.forward = types.MethodType(_forward, layer)


def uninstall(layers):
    for layer in layers.values():
        if hasattr(layer, _HOLDER):
            delattr(layer, _HOLDER)
            del layer.forward


@contextlib.contextmanager
def handed(layers, adapter, weights, num_samples=None):
    """Within the context, ``layers[path]`` computes its LoRA delta from ``weights[path]``.

    :param layers: module path -> installed LoRA layer.
    :param weights: module path -> {``"A"``: ``[*S, r, d_in]``, ``"B"``: ``[*S, d_out, r]``,
        ``"R"``: ``[*S, r, r]``, ``"S"``: ``[*S, 1, r]``, optionally ``"A_loc"``: the mean of ``A`` for flipout}; a matrix left out is
        read from the layer's own parameter.
    :param int num_samples: ``S`` when the values carry a leading sample dim, else ``None``.
    """
    for path, layer in layers.items():
        if layer.merged:
            raise ValueError(f"LoRA layer {path} is merged into its base weight: refusing to hand it samples")
        w = weights.get(path)
        if w is not None:
            dtype = layer.lora_A[adapter].weight.dtype
            w = {k: v.to(dtype) for k, v in w.items()}
        setattr(layer, _HOLDER, _Handed(adapter, w or {}, num_samples))
    try:
        yield
    finally:
        for layer in layers.values():
            setattr(layer, _HOLDER, None)


def _forward(layer, x, *args, **kwargs):
    h = getattr(layer, _HOLDER)
    if h is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    a = h.A if h.A is not None else layer.lora_A[h.adapter].weight
    b = h.B if h.B is not None else layer.lora_B[h.adapter].weight
    x = layer.lora_dropout[h.adapter](x).to(a.dtype)
    delta = lora_delta(x, a, b, h.R, h.num_samples, a_loc=h.A_loc, log_scale=h.S) * layer.scaling[h.adapter]
    return result + delta.to(result.dtype)


def lora_delta(x, a, b, r=None, num_samples=None, a_loc=None, log_scale=None):
    """``B R diag(exp(z)) A x`` for one layer (``R`` and the ScalaBL log-scales ``z`` omitted when ``None``).

    With ``a_loc`` (flipout), ``A = a_loc + E`` and example ``n`` (row ``n`` of ``x``) gets its own sign-flipped
    noise: ``B R (a_loc x + s_n * (E (t_n * x)))`` with random ``s_n in {+-1}^r``, ``t_n in {+-1}^d_in`` shared
    over positions. For a symmetric ``E`` every example's weights are still an exact draw of ``A``.

    :param x: ``[N, ..., d_in]``; with ``num_samples = S``, ``N = S * B`` sample-major.
    :param a: ``[r, d_in]`` or ``[S, r, d_in]``; ``b``: ``[d_out, r]`` or ``[S, d_out, r]``;
        ``r``: ``[r, r]`` or ``[S, r, r]``; ``a_loc``: like ``a``; ``log_scale``: ``[1, r]`` or ``[S, 1, r]``.
    :returns: ``[N, ..., d_out]``.
    """
    if a_loc is None:
        h = _linear(x, a, num_samples)
    else:
        h = _linear(x, a_loc, num_samples) + _linear(x * _signs(x, x.shape[-1]), a - a_loc, num_samples) * _signs(x, a.shape[-2])
    if log_scale is not None:
        h = _scale(h, log_scale.exp(), num_samples)
    if r is not None:
        h = _linear(h, r, num_samples)
    return _linear(h, b, num_samples)


def _linear(x, w, num_samples):
    """``x w^T``; with ``num_samples = S`` and ``w: [S, out, in]`` sample ``s`` multiplies rows ``s*B .. (s+1)*B - 1``."""
    if num_samples is None or w.dim() == 2:
        return torch.nn.functional.linear(x, w)
    # [S*B, ..., in] -> [S, B*..., in]: one bmm for all samples
    h = x.reshape(num_samples, -1, x.shape[-1]) @ w.transpose(-1, -2)
    return h.reshape(*x.shape[:-1], h.shape[-1])


def _scale(h, s, num_samples):
    """``h * s`` over the last dim; with ``num_samples = S`` and ``s: [S, 1, r]`` sample ``s`` scales its own rows."""
    if num_samples is None or s.dim() == 2:
        return h * s.squeeze(0)
    return (h.reshape(num_samples, -1, h.shape[-1]) * s).reshape(h.shape)


def _signs(x, size):
    """Random ``+-1`` of shape ``[N, 1, ..., 1, size]``: one draw per example (row of ``x``), shared over positions."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (size,)
    return torch.randint(0, 2, shape, device=x.device).to(x.dtype).mul_(2).sub_(1)
