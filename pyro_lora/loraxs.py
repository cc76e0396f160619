"""LoRA-XS (Balazy et al. 2024): the LoRA layer ``y = W0 x + s B R A x`` with ``A``, ``B`` frozen from the truncated SVD of ``W0``.

Only the ``r x r`` core ``R`` is trained (``r^2`` numbers per layer instead of LoRA's ``r (d_in + d_out)``).
Following the LoRA-XS reference code, ``B = U_r`` and ``A = diag(S_r) V_r^T`` (singular values folded into
``A``), so ``B R A = W0``'s best rank-``r`` approximation at ``R = I`` and the base network at ``R = 0``.
The core hand-off applies ``R`` (``handoff.lora_delta``); :class:`LoraXSModel` makes ``R`` the random sites
and keeps ``A`` and ``B`` frozen.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from . import quantized
from .contract import parameter_adapter
from .model import LoraModel
from .sites import active_adapter, base_rewriting_inits, describe_inits, find_lora_layers, head_modules, layer_dims

__all__ = ["LoraXSModel", "base_weight", "init_lora_xs", "lora_xs_parameter_counts", "svd_flip"]


def svd_flip(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An SVD's factors with canonical signs: each column of ``u`` (``[*, m, k]``) flipped so its largest-magnitude entry
    is positive, the matching row of ``vh`` (``[*, k, n]``) with it (scikit-learn's ``svd_flip``). The SVD fixes each
    pair only up to a common sign, so the same product decomposed twice (or stored another way) could give other
    factors; a zero column is left as it is."""
    sign = torch.sign(u.gather(-2, u.abs().argmax(-2, keepdim=True)))  # [*, 1, k]
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, vh * sign.transpose(-1, -2)


def base_weight(layer) -> torch.Tensor:
    """The frozen base weight ``W0`` of a peft LoRA layer as ``[d_out, d_in]`` (``fan_in_fan_out`` undone).

    A bitsandbytes 4-bit or 8-bit base gives its dequantised weight.

    :raises ValueError: if the base layer has no floating-point 2-D weight (and is no bitsandbytes layer).
    """
    dense = quantized.dense_weight(layer.get_base_layer())
    if dense is not None:
        return dense
    w = getattr(layer.get_base_layer(), "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(
            f"LoRA-XS needs a dense floating-point 2-D base weight; {type(layer.get_base_layer()).__name__} has "
            f"{(tuple(w.shape), w.dtype) if isinstance(w, torch.Tensor) else 'no weight tensor'}"
        )
    return w.T if getattr(layer, "fan_in_fan_out", False) else w


def _check_cores_only(net, adapter: str) -> None:
    """Refuse the peft options that would train numbers beside the ``r x r`` cores and the classification head, which
    LoRA-XS neither puts a posterior over nor counts (:func:`lora_xs_parameter_counts`): ``bias='all'`` /
    ``'lora_only'`` (base biases; base parameters unfrozen by hand alike), ``lora_bias=True`` (a bias on ``lora_B``),
    LoRA on an embedding (``r (V + d)`` numbers), ``trainable_token_indices`` (embedding rows) and a
    ``modules_to_save`` entry other than the head (:func:`~pyro_lora.sites.head_modules`).

    :raises ValueError: naming the option and how to build the adapter without it.
    """
    heads = {id(m) for m in head_modules(net).values()}
    bias = getattr(getattr(net, "peft_config", {}).get(adapter), "bias", "none")
    found = {}  # (what trains beside the cores, what to do) -> (its first parameter, its numbers)
    for name, p in net.named_parameters():
        owner = parameter_adapter(name)
        if owner is None and p.requires_grad and bias != "none":
            option = (f"peft's bias={bias!r} trains base biases", "build the adapter with bias='none'")
        elif owner is None and p.requires_grad:
            option = ("base parameters are trainable (unfrozen by hand)", "freeze them with requires_grad_(False)")
        elif owner != adapter:
            continue
        elif ".lora_embedding_" in name:
            option = ("LoRA on an embedding layer (target_modules names it) trains its A and B",
                      "leave the embedding out of target_modules")
        elif ".lora_B." in name and name.endswith(".bias"):
            option = ("a bias on lora_B (peft's lora_bias=True) trains d_out numbers per layer",
                      "build the adapter with lora_bias=False")
        elif "trainable_tokens_" in name:
            option = ("peft's trainable_token_indices trains embedding rows", "build the adapter without them")
        elif ".modules_to_save." in name and id(net.get_submodule(name.split(".modules_to_save.")[0])) not in heads:
            option = ("peft's modules_to_save trains a copy of a module other than the classification head",
                      "leave it out of modules_to_save")
        else:
            continue
        first, numbers = found.get(option, (name, 0))
        found[option] = (first, numbers + p.numel())
    if found:
        (what, fix), (first, numbers) = next(iter(found.items()))
        raise ValueError(f"{what} ({numbers} numbers, {first} the first): LoRA-XS trains the r x r cores only (beside a "
                         "classification head), and these would train beside them, outside its posterior and "
                         f"lora_xs_parameter_counts; {fix}")


def _check_untrained(layers, written, adapter) -> None:
    """Refuse to overwrite a trained LoRA: a layer whose ``B A`` is not zero (peft's start) and whose ``A`` and ``B``
    are not, to the adapter's rounding, those about to be ``written`` (an adapter LoRA-XS set up before: a saved run
    rebuilt). Both are compared: an ``A`` trained beside the SVD's ``B`` is a trained LoRA too."""
    trained = []
    for path, (a, b) in written.items():
        held = layers[path].lora_B[adapter].weight.detach().float()
        start = layers[path].lora_A[adapter].weight.detach().float()
        # an SVD written into a bfloat16 adapter (and cast to float32 since) keeps its rounding, up to 2^-8 relative;
        # A's rows carry the singular values, so its absolute slack is on their scale
        a = a.to(start.device, start.dtype)
        svd = (torch.allclose(held, b.to(held.device, held.dtype), rtol=2.0**-8, atol=1e-4)
               and torch.allclose(start, a, rtol=2.0**-8, atol=1e-4 * float(a.abs().max())))
        # B A = 0 is no LoRA yet, whatever B holds (peft's "orthogonal" init pairs a non-zero B with it)
        idle = float(torch.linalg.matrix_norm(held @ start)) <= 1e-5 * float(held.norm() * start.norm())
        if not (svd or idle):
            trained.append(path)
    if trained:
        raise ValueError(
            f"LoraXSModel writes the base weights' SVD into lora_A and lora_B (LoRA-XS trains only the r x r cores R "
            f"between them), and {len(trained)} of the {len(written)} LoRA layers hold a B A that is neither zero nor "
            f"that SVD ({trained[0]}{', ...' if len(trained) > 1 else ''}): a trained LoRA, which would be lost from "
            "the network; build LoRA-XS on a fresh adapter (get_peft_model on the base model, or a copy of the "
            "network), or pass replace_trained=True to overwrite it (as for an adapter peft started with a random B, "
            "init_lora_weights=False, which holds nothing to lose)")


def _check_base_kept(net) -> None:
    """Refuse an adapter whose initialisation (PiSSA, OLoRA, ...) rewrote the base weights: the base then holds ``W0``
    minus the initial ``B A``, whose SVD is not the pretrained weight's."""
    rewritten = base_rewriting_inits(net)
    if rewritten:
        raise ValueError(f"{describe_inits(rewritten)} moved part of each base weight into its A and B: LoRA-XS would "
                         "take the SVD of the residual, not of the pretrained weight; build the adapter with the "
                         "default init_lora_weights")


@torch.no_grad()
def init_lora_xs(net, adapter: str | None = None, replace_trained: bool = False) -> list[str]:
    """Write the truncated SVD of every LoRA layer's base weight into its ``lora_A`` / ``lora_B``.

    ``W0 = U S V^T``: ``lora_B = U_r`` (``[d_out, r]``, orthonormal columns) and ``lora_A = diag(S_r) V_r^T``
    (``[r, d_in]``), so ``lora_B @ lora_A`` is the best rank-``r`` approximation of ``W0`` (Eckart-Young).
    The SVD runs in fp32 (fp64 for a float64 base), batched over all layers with the same ``(d_out, d_in, r)``. Signs are fixed
    (each column of ``U_r`` has its largest-magnitude entry positive), so re-running it, e.g. before
    loading a saved ``R`` posterior, gives the same ``A`` and ``B``.

    :param net: a peft model with (unmerged) LoRA layers.
    :param str adapter: adapter name; default the active one.
    :param bool replace_trained: overwrite an adapter whose ``B A`` is not zero (peft's initialisations) and whose
        ``B`` is not this SVD already (a rebuilt LoRA-XS run): a trained LoRA, which would be lost from ``net``;
        refused otherwise.
    :returns: the module paths of the initialised layers.
    :raises ValueError: (before any weight is written) if a rank exceeds ``min(d_out, d_in)`` or the base weight's
        rank, a layer uses DoRA, the adapter would train numbers beside the cores (peft's ``bias``, ``lora_bias``, an
        embedding LoRA, ``trainable_token_indices``, ``modules_to_save`` beyond the head), a base
        weight is not dense, an adapter's initialisation (PiSSA, OLoRA, ...) rewrote the base weights, or (without
        ``replace_trained``) a layer holds a trained LoRA (``B A`` non-zero, ``A`` or ``B`` not the SVD's).
    """
    adapter = adapter or active_adapter(net)
    _check_cores_only(net, adapter)
    _check_base_kept(net)
    layers = find_lora_layers(net, adapter)
    groups = OrderedDict()
    for path, layer in layers.items():
        w0 = base_weight(layer)
        r = layer.r[adapter]
        if r > min(w0.shape):
            raise ValueError(f"LoRA rank {r} of {path} exceeds min(d_out, d_in) = {min(w0.shape)} of its base weight")
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise ValueError(f"{path} uses DoRA: LoRA-XS needs plain LoRA layers")
        # float64 weights get a float64 SVD: float32's would round B's orthonormality and B A at 1e-6
        dtype = torch.promote_types(w0.dtype, torch.float32)
        groups.setdefault((tuple(w0.shape), r, w0.device, dtype), []).append(path)
    written = {}
    for (_, r, _, dtype), paths in groups.items():
        w0 = torch.stack([base_weight(layers[p]).to(dtype) for p in paths])  # [G, d_out, d_in]
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        u, s, vh = u[..., :r], s[..., :r], vh[..., :r, :]
        # a direction of singular value 0 is no direction of W0: A's row would be 0 and that core row and column inert.
        # An SVD's zeros come out at rounding noise that grows with the width (numpy's matrix_rank tolerance)
        # float32's eps whatever the SVD's precision: a float64 cast of float32 weights holds float32's rounding noise
        tolerance = max(w0.shape[1:]) * torch.finfo(torch.float32).eps
        deficient = (s[:, -1] <= tolerance * s[:, 0]).nonzero().flatten().tolist()
        if deficient:
            i = deficient[0]
            why = ("it is all zero" if s[i, 0] == 0 else
                   f"its singular value {r} is {float(s[i, -1] / s[i, 0]):.3g} of its largest, within width x float32 eps "
                   f"= {tolerance:.3g} of it, where a float32 SVD cannot tell it from zero (a rank-deficient weight, or a "
                   "spectrum this steep: that direction would be rounding noise)")
            raise ValueError(f"the base weight of {paths[i]} has numerical rank below the LoRA rank {r}: {why}; LoRA-XS "
                             "adapts W0's top-r directions: lower the rank or leave that layer out of target_modules")
        u, vh = svd_flip(u, vh)
        b = u
        a = s.unsqueeze(-1) * vh
        written.update({path: (a[i], b[i]) for i, path in enumerate(paths)})
    if not replace_trained:
        _check_untrained(layers, written, adapter)
    for path, (a, b) in written.items():
        layers[path].lora_A[adapter].weight.copy_(a)
        layers[path].lora_B[adapter].weight.copy_(b)
    return list(layers)


class LoraXSModel(LoraModel):
    """A :class:`~pyro_lora.LoraModel` over the LoRA-XS cores: the sites are the ``R`` matrices (``[L, r, r]``).

    ``y = W0 x + s B R A x`` with ``A``, ``B`` from :func:`init_lora_xs` (run by the constructor unless
    ``svd_init=False``) and frozen; ``R`` sites start at zero (``model.adapter_values()``, and ``model.logits(batch)``
    / ``predict(model, None, ...)``), so the untrained model is the base network. Other trainable parameters (a classification head) are point
    estimates, as in :class:`~pyro_lora.LoraModel`.

    Example::

        model = LoraXSModel(net, SequenceClassification(), prior=1.0, num_data=len(train))
        guide = MAPGuide(model)             # R only: r^2 numbers per layer
        fit(model, guide, loader, epochs=3, lr=1e-3)

    :param net: a peft model with LoRA layers; their ``lora_A`` / ``lora_B`` are overwritten by the SVD.
    :param bool svd_init: run :func:`init_lora_xs` (deterministic, so also right when rebuilding a saved run).
    :param bool replace_trained: let :func:`init_lora_xs` overwrite a trained LoRA (a non-zero ``B A``, an ``A`` or ``B``
        not the SVD's); refused by default, as the user's adapter would be lost from ``net``.
    :param kwargs: ``group``, ``prior``, ``num_data``, ``adapter`` as for :class:`~pyro_lora.LoraModel`.
    """

    name = "lora_xs"

    builds_on_adapter = False  # its A and B are the base weights' SVD, never a LoRA trained beside the head

    def __init__(self, net, likelihood, svd_init: bool = True, replace_trained: bool = False, **kwargs):
        if "random" in kwargs:
            raise ValueError("LoraXSModel's random sites are always the R cores; do not pass random=")
        _check_cores_only(net, kwargs.get("adapter") or active_adapter(net))  # before find_lora_layers' warnings
        if svd_init:
            _check_base_kept(net)  # before LoraModel's warning of such a base
        self._svd_init, self._replace_trained = svd_init, replace_trained
        super().__init__(net, likelihood, random="R", **kwargs)

    def _check_frozen_lora_carries_signal(self) -> None:
        if not self._svd_init:  # the SVD's A and B carry W0's top-r directions (init_lora_xs refuses a lower rank)
            super()._check_frozen_lora_carries_signal()

    def settings(self) -> dict:
        return {**super().settings(), "svd_init": self._svd_init}

    def _prepare_layers(self) -> None:
        if self._svd_init:  # its own refusals come before its first write
            init_lora_xs(self.net, self.adapter, replace_trained=self._replace_trained)

    @classmethod
    def restore(cls, net, likelihood, random, **kwargs) -> LoraXSModel:
        """Rebuild over ``net``: the SVD initialisation is deterministic, so it gives the saved run's ``A`` and
        ``B`` again; ``random`` is ignored (always the ``R`` cores)."""
        return cls(net, likelihood, **kwargs)


def lora_xs_parameter_counts(model: LoraModel) -> dict:
    """Trainable LoRA numbers per layer: LoRA-XS ``r^2`` against plain LoRA's ``r (d_in + d_out)``.

    The head is not counted; a :class:`LoraXSModel` refuses an adapter that would train anything else beside the cores.

    :param model: a :class:`~pyro_lora.LoraModel` (any ``random``): only its LoRA layers' shapes are read.
    :returns: ``{"per_layer": {path: {"lora_xs": r^2, "lora": r (d_in + d_out)}}, "lora_xs": total, "lora": total}``.
    """
    per_layer = {}
    for path, layer in model.layers.items():
        r, d_in, d_out = layer_dims(layer, model.adapter)
        per_layer[path] = {"lora_xs": r * r, "lora": r * (d_in + d_out)}
    return {
        "per_layer": per_layer,
        "lora_xs": sum(c["lora_xs"] for c in per_layer.values()),
        "lora": sum(c["lora"] for c in per_layer.values()),
    }
