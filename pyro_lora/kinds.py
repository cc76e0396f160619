"""The kinds of LoRA matrix a site can hold: one :class:`MatrixKind` per letter in :data:`KINDS`.

A LoRA layer computes ``y = W0 x + s B A x``. Beside the down projection ``A: [r, d_in]`` and the up
projection ``B: [d_out, r]`` of plain LoRA (Hu et al. 2021), model variants put matrices between them:
LoRA-XS's ``r x r`` core ``R`` (Balazy et al. 2024), ScalaBL's ``1 x r`` row of log singular-value
scales ``S`` (Samplawski et al. 2025). A layer's delta is ``B M_k ... M_1 A x`` with the between kinds
``M`` applied in increasing :attr:`MatrixKind.stage`.

Every question the model side asks about a kind (its shape, the peft parameter it is stacked from and
written back into, whether its layers keep ``A`` and ``B`` frozen, how the weight hand-off applies it) is
answered by its table entry: a new model variant is a :class:`~pyro_lora.LoraModel` subclass plus one
:func:`register_kind`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["KINDS", "MatrixKind", "between_kinds", "down_kind", "register_kind", "up_kind"]

ROLES = ("down", "up", "between")


@dataclass(frozen=True)
class MatrixKind:
    """One kind of LoRA matrix.

    :param letter: its letter: sites are named ``"<module>.lora_<letter>"``, ``random="AB"`` lists letters.
    :param shape: ``(r, d_in, d_out) -> (rows, cols)``, one layer's matrix.
    :param role: ``"down"`` (``A``, applied to the layer input), ``"up"`` (``B``, giving the output) or
        ``"between"`` (applied to ``A x`` by :attr:`apply`).
    :param parameter: the peft ``ModuleDict`` of the layer (``"lora_A"``, ``"lora_B"``) whose weight a site
        of this kind is stacked from (:meth:`~pyro_lora.LoraModel.adapter_values`), handed in place of and
        written back into (:meth:`~pyro_lora.LoraModel.write_adapter`); ``None``: the matrix has no peft
        parameter, starts at zero and cannot be written back.
    :param freezes_lora: layers holding this kind keep their peft ``lora_A`` and ``lora_B`` frozen
        (LoRA-XS: fixed by the SVD of the base weight).
    :param apply: for ``role="between"``: ``(h, value, num_samples) -> h`` with ``h: [N, ..., r]`` and
        ``value`` the matrix, ``[rows, cols]`` or ``[S, rows, cols]`` with ``num_samples = S`` (rows of ``h``
        sample-major, as in :func:`linear`).
    :param stage: order among the between kinds: smaller is applied to ``A x`` first.
    :param description: a few words for error messages.
    :param model: the name of the :class:`~pyro_lora.LoraModel` subclass whose constructor prepares the layers
        this kind's ``apply`` assumes (ScalaBL's rotation of ``A`` to its singular basis; LoRA-XS's SVD of the base
        weights, beside which a core starting at 0 drops no trained ``B A``); other models refuse the kind. ``None``:
        any model.
    """

    letter: str
    shape: Callable[[int, int, int], tuple]
    role: str
    parameter: str | None = None
    freezes_lora: bool = False
    apply: Callable[..., torch.Tensor] | None = None
    stage: int = 0
    description: str = ""
    model: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if (self.role == "between") != (self.apply is not None):
            raise ValueError(f"kind {self.letter!r}: apply is given for role 'between' only (and needed there)")

    def matrix_shape(self, r: int, d_in: int, d_out: int) -> tuple:
        """One layer's ``(rows, cols)`` for LoRA rank ``r`` on a ``d_in -> d_out`` layer."""
        return tuple(self.shape(r, d_in, d_out))


def linear(x: torch.Tensor, w: torch.Tensor, num_samples: int | None) -> torch.Tensor:
    """``x w^T``; with ``num_samples = S`` and ``w: [S, out, in]`` sample ``s`` multiplies rows ``s*B .. (s+1)*B - 1``."""
    if num_samples is None or w.dim() == 2:
        return torch.nn.functional.linear(x, w)
    # [S*B, ..., in] -> [S, B*..., in]: one bmm for all samples
    h = x.reshape(num_samples, -1, x.shape[-1]) @ w.transpose(-1, -2)
    return h.reshape(*x.shape[:-1], h.shape[-1])


def scale(h: torch.Tensor, s: torch.Tensor, num_samples: int | None) -> torch.Tensor:
    """``h * s`` over the last dim; with ``num_samples = S`` and ``s: [S, 1, r]`` sample ``s`` scales its own rows."""
    if num_samples is None or s.dim() == 2:
        return h * s.squeeze(0)
    return (h.reshape(num_samples, -1, h.shape[-1]) * s).reshape(h.shape)


def _exp_scale(h: torch.Tensor, log_scale: torch.Tensor, num_samples: int | None) -> torch.Tensor:
    return scale(h, log_scale.exp(), num_samples)


KINDS: dict[str, MatrixKind] = {}


def register_kind(kind: MatrixKind) -> MatrixKind:
    """Add ``kind`` to :data:`KINDS`.

    :raises ValueError: if its letter is taken, or it is a second ``"down"`` or ``"up"`` kind.
    """
    if kind.letter in KINDS:
        raise ValueError(f"matrix kind {kind.letter!r} is already registered")
    if kind.role != "between" and any(k.role == kind.role for k in KINDS.values()):
        raise ValueError(f"there is already a {kind.role!r} kind; new kinds go between A and B (role='between')")
    KINDS[kind.letter] = kind
    return kind


register_kind(MatrixKind("A", lambda r, d_in, d_out: (r, d_in), "down", parameter="lora_A", description="LoRA A"))
register_kind(MatrixKind("B", lambda r, d_in, d_out: (d_out, r), "up", parameter="lora_B", description="LoRA B"))
register_kind(MatrixKind(
    "R", lambda r, d_in, d_out: (r, r), "between", freezes_lora=True, apply=linear, stage=2, description="LoRA-XS core",
    model="LoraXSModel",
))
register_kind(MatrixKind(
    "S", lambda r, d_in, d_out: (1, r), "between", apply=_exp_scale, stage=1, description="ScalaBL log-scales",
    model="ScalaBLModel",
))


def down_kind() -> MatrixKind:
    """The kind applied to the layer input (``A``)."""
    return next(k for k in KINDS.values() if k.role == "down")


def up_kind() -> MatrixKind:
    """The kind giving the layer output (``B``)."""
    return next(k for k in KINDS.values() if k.role == "up")


def between_kinds() -> list[MatrixKind]:
    """The kinds between ``A`` and ``B``, in the order they are applied to ``A x``."""
    return sorted((k for k in KINDS.values() if k.role == "between"), key=lambda k: k.stage)
