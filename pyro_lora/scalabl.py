"""ScalaBL's model side: a LoRA whose ``A`` has random log singular values.

ScalaBL (Samplawski et al. 2025) does inference in an ``r``-dimensional subspace of each LoRA layer: with
``A = U diag(s) V^T`` only the ``r`` singular values are random. Here ``U`` is folded into ``B`` (an ``r x r``
rotation a point-estimate ``B`` absorbs without loss), so the layer computes

    ``y = W0 x + scaling * B diag(exp(z)) A x``,  ``A = diag(s) V^T``,  ``z ~ N(0, prior^2)`` per entry,

where ``exp(z_i)`` scales row ``i`` of ``A`` and ``z = 0`` is the LoRA as trained. ``A`` and ``B`` stay trainable point
estimates: ``A``'s rows are its singular directions (``log s + z`` its log singular values) only at the rotation, and
drift from orthogonal as ``A`` trains. The random sites are ``"<kind>.lora_S"`` of shape ``[L, 1, r]`` (a row of ``r``
log-scales per layer): ``r`` random numbers per layer.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch

from .model import LoraModel
from .sites import active_adapter, find_lora_layers

__all__ = ["ScalaBLModel", "rotate_to_singular_basis"]


@torch.no_grad()
def rotate_to_singular_basis(net, adapter: str | None = None) -> list[str]:
    """Rewrite every LoRA pair ``(B, A)`` as ``(B U, diag(s) V^T)`` from the SVD ``A = U diag(s) V^T``.

    ``B A`` is unchanged (exactly, up to float rounding); afterwards the rows of ``A`` are orthogonal with
    norms ``s``, so scaling row ``i`` scales ``A``'s ``i``-th singular value. The SVD runs in fp32 (fp64 where
    a group holds float64 weights, which fp32 would round at 1e-7), batched over layers with the same
    ``(r, d_in)``. Where ``r > d_in``, ``U`` is completed to ``r x r`` and the last ``r - d_in`` rows of ``A`` are
    zero (their scales then change nothing).

    :param net: a peft model with (unmerged) LoRA layers.
    :returns: the module paths of the rotated layers.
    :raises ValueError: if the model has no LoRA layers (see :func:`~pyro_lora.sites.find_lora_layers`).
    """
    adapter = adapter or active_adapter(net)
    layers = find_lora_layers(net, adapter)
    groups = OrderedDict()
    for path, layer in layers.items():
        groups.setdefault(tuple(layer.lora_A[adapter].weight.shape), []).append(path)
    for paths in groups.values():
        dtype = functools.reduce(torch.promote_types, [getattr(layers[p], m)[adapter].weight.dtype
                                                       for p in paths for m in ("lora_A", "lora_B")], torch.float32)
        a = torch.stack([layers[p].lora_A[adapter].weight.to(dtype) for p in paths])  # [G, r, d_in]
        # r > d_in: A has d_in singular values; U completed to r x r, the rows past d_in zero (vh is then d_in x d_in)
        u, s, vh = torch.linalg.svd(a, full_matrices=a.shape[-2] > a.shape[-1])  # u: [G, r, r], vh: [G, k, d_in]
        rows = s.unsqueeze(-1) * vh[..., : s.shape[-1], :]
        rows = torch.cat([rows, rows.new_zeros(*rows.shape[:-2], a.shape[-2] - rows.shape[-2], rows.shape[-1])], -2)
        for i, path in enumerate(paths):
            lora_a, lora_b = layers[path].lora_A[adapter].weight, layers[path].lora_B[adapter].weight
            lora_b.copy_(lora_b.to(dtype) @ u[i])
            lora_a.copy_(rows[i])
    return list(layers)


class ScalaBLModel(LoraModel):
    """A :class:`~pyro_lora.LoraModel` whose random sites are ScalaBL's log singular-value scales ``z``.

    ``p(z) = N(0, prior^2)`` per entry; sites ``"<kind>.lora_S"``: ``[L, 1, r]``. The constructor rotates
    each LoRA pair to the singular basis of ``A`` (:func:`rotate_to_singular_basis`, logits unchanged)
    unless ``rotate=False`` (right when rebuilding a saved run whose ``A``, ``B`` are loaded afterwards).

    Example::

        model = ScalaBLModel(net, MultipleChoice(format="cloze"), prior=1.0, num_data=len(train))
        guide = ScalaBLGuide(model)
        fit(model, guide, loader, epochs=2, lr=3e-4, elbo=TraceMeanField_ELBO())

    :param kwargs: ``group``, ``prior``, ``num_data``, ``adapter`` as for :class:`~pyro_lora.LoraModel`.
    """

    name = "scalabl"

    def __init__(self, net, likelihood, rotate: bool = True, **kwargs):
        if "random" in kwargs:
            raise ValueError("ScalaBLModel's random sites are always the S log-scales; do not pass random=")
        self._rotate = rotate
        super().__init__(net, likelihood, random="S", **kwargs)

    def settings(self) -> dict:
        return {**super().settings(), "rotate": self._rotate}

    def _prepare_layers(self) -> None:
        if self._rotate:
            # a guide that trained the head beside other values (ScalaBL's z, a MAP's unwritten LoRA) would no longer be
            # told after the rotation, which changes the A and B its snapshot holds
            use, advice = ("a ScalaBLModel rotating its A and B", "call model.write_adapter(guide.mean()) first (a MAP's A "
                           "and B), or build it with rotate=False and start its guide at init=guide.mean() (a ScalaBL "
                           "guide's z)")
            if self._check_paired_with_head(use, advice, self._held_values()) is None:  # its guide gone: its record
                self._check_recorded_training(use, advice, self._held_values())
            rotate_to_singular_basis(self.net, self.adapter)

    @classmethod
    def restore(cls, net, likelihood, random, **kwargs) -> ScalaBLModel:
        """Rebuild over ``net`` without rotating: the trained ``A`` and ``B`` are restored from the guide file;
        ``random`` is ignored (always the ``S`` log-scales)."""
        return cls(net, likelihood, rotate=False, **kwargs)
