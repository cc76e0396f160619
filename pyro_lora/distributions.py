"""The project's distributions over LoRA matrices: priors and posteriors.

All are Pyro distributions with reparametrised sampling:

- :func:`isotropic_normal`: ``N(0, scale^2)`` per entry of a (stacked) LoRA site;
- :class:`MatrixNormalKronecker`: matrix-normal with covariance ``K_row (x) K_col``, each factor low-rank
  plus diagonal, evaluated through Woodbury / the matrix determinant lemma (never a dense ``mn x mn``);
- :class:`LowRankPlusDiagNormal`: a low-rank plus diagonal Gaussian over a tensor (LoRA-XS cores, SWAG's
  posterior over a stacked site);
- :class:`KFACNormal`: the Kronecker-factored Laplace posterior of a (stacked) LoRA site;
- :class:`UniformMixture`: ``1/K sum_k q_k`` of ``K`` such posteriors (a mixture of Laplace approximations).

Closed-form KL divergences are registered with :func:`torch.distributions.kl.register_kl` between
:class:`MatrixNormalKronecker` pairs, :class:`LowRankPlusDiagNormal` pairs, and each of them against
``Normal(...).to_event(k)`` in both directions, so :class:`~pyro.infer.TraceMeanField_ELBO` uses them for
mean-field guides.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch.distributions import Independent, LowRankMultivariateNormal, Normal, constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import lazy_property

import pyro.distributions as dist
from pyro.distributions import TorchDistribution

__all__ = ["isotropic_normal", "KFACNormal", "MatrixNormalKronecker", "LowRankPlusDiagNormal", "UniformMixture"]


def isotropic_normal(shape: tuple | torch.Size, scale: float | torch.Tensor) -> dist.Independent:
    """Isotropic Gaussian prior ``X_ij ~ N(0, scale^2)`` over a whole tensor site, e.g. a stacked
    ``lora_A`` site of shape ``[L, r, d_in]``.

    :param shape: event shape of the site.
    :param scale: prior standard deviation; a float, or a positive tensor broadcastable to ``shape``
        (e.g. ``[L, 1, 1]`` for one scale per layer). Its dtype and device are those of the prior.
    :returns: a distribution with ``batch_shape == ()`` and ``event_shape == shape``, whose ``log_prob`` refuses a
        value that does not end in ``shape`` (:func:`check_event_shape`).
    :raises ValueError: for a scale that is not positive, or whose square is 0 or inf in its dtype (its ``log_prob``
        would be NaN).
    """
    shape = torch.Size(shape)
    if isinstance(scale, bool) or isinstance(scale, numbers.Real) and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"isotropic_normal: scale must be finite and positive, got {scale}")
    scale = torch.as_tensor(scale)
    if not scale.is_floating_point():  # an int std made an int64 Normal that cannot sample
        scale = scale.to(torch.get_default_dtype())
    squares = scale * scale
    finite, squared = torch.stack([torch.isfinite(scale).all() & (scale > 0).all(),
                                   ((squares > 0) & torch.isfinite(squares)).all()]).tolist()
    if not finite:  # one host read per prior built
        raise ValueError(f"isotropic_normal: scale must be finite and positive, got {scale}")
    if not squared:
        raise ValueError(f"isotropic_normal: scale {scale} squares to 0 or inf in "
                         f"{str(scale.dtype).removeprefix('torch.')}, so its log-densities would lose their quadratic term or be NaN; give a scale "
                         "within its range's square root, or a float64 one")
    try:
        broadcasts = torch.broadcast_shapes(scale.shape, shape) == shape
    except RuntimeError:
        broadcasts = False
    if not broadcasts:
        raise ValueError(f"isotropic_normal: scale of shape {tuple(scale.shape)} does not broadcast to {tuple(shape)}")
    return unchecked_isotropic_normal(shape, scale)


def unchecked_isotropic_normal(shape: torch.Size, scale: torch.Tensor) -> dist.Independent:
    """:func:`isotropic_normal` of a scale known to be right (the model's float prior, checked when the model was built):
    no host read per step."""
    return _ShapeChecked(dist.Normal(torch.zeros_like(scale), scale).expand(shape), len(shape))


def checked_normal(loc: torch.Tensor, scale: torch.Tensor, event_dim: int) -> dist.Independent:
    """``Normal(loc, scale).to_event(event_dim)`` whose ``log_prob`` refuses a value that does not end in its event
    shape (:func:`check_event_shape`): a ``[3, 1]`` value broadcasts against a ``3 x 4`` Normal to a finite
    log-density. A guide's Gaussian posterior."""
    return _ShapeChecked(dist.Normal(loc, scale), event_dim)


class _ShapeChecked(dist.Independent):
    """An ``Independent`` whose ``log_prob`` refuses a value that does not end in its event shape."""

    def log_prob(self, value):
        check_event_shape(self, value, f"Normal(...).to_event({self.reinterpreted_batch_ndims})")
        return super().log_prob(value)

    def to_event(self, reinterpreted_batch_ndims=None):
        # Pyro's to_event unwraps an Independent into a plain one over the base: the check would go with it
        wider = super().to_event(reinterpreted_batch_ndims)
        return _ShapeChecked(wider.base_dist, wider.reinterpreted_batch_ndims) if isinstance(wider, dist.Independent) else wider


# named as the class it refines (a prior's class is part of LoraModel.settings(), which a resumed run compares);
# pickle finds it by its __qualname__, which stays its own
_ShapeChecked.__name__ = "Independent"


_DENSE_MAX = 1024  # up to this many rows K = W W^T + diag(d) may be factored densely (see _LowRankPlusDiag)
_WOODBURY_MAX_RATIO = 1e12  # above it a row's |W_j|^2 / d_j costs diag(1/d) - U U^T more than 1e-4 of its terms
_MAX_LOSS = 1e-2  # nats a log-density may lose to float64's round-off before its covariance is refused
_EPS = torch.finfo(torch.float64).eps


class _LowRankPlusDiag:
    """
    ``K = W W^T + diag(d)`` with ``W: (..., m, k)``, ``d: (..., m)`` (d > 0), in float64 whatever the inputs' dtype
    (every method returns float64; the distributions cast their results back): ``K^-1 v`` subtracts terms of size
    ``v / d``, so where ``d`` is small against ``W W^T`` float32 loses every digit (a log-density off by 80%).

    The log-density's parts go through the capacitance ``C = I_k + W^T diag(1/d) W = L L^T``, ``O(m k^2)``:
    ``log det K = sum log d + 2 sum log diag L`` (the determinant lemma) and ``K^-1 = H^T H`` with the whitening
    ``H v = [z; diag(d)^-1/2 (v - W z)]``, ``z = C^-1 W^T diag(1/d) v`` (the minimiser over the latent ``z`` of
    ``|z|^2 + |v - W z|^2`` in ``diag(d)^-1``): ``v^T K^-1 v = |H v|^2``, a sum of squares, where the textbook
    ``diag(1/d) v - U U^T v`` subtracts terms of size ``v / d`` and loses nats once some ``d_j`` is 1e-12 of its row.
    That holds to about ``eps k cond(C)`` nats (``C``'s round-off over its ``k`` eigenvalues, each at least 1) plus
    ``eps sqrt(m max_j |W_j|^2 / d_j)`` (the residual ``v - W z`` cancels terms ``sqrt(|W_j|^2 / d_j)`` times its
    own size), which a few rows with a diagonal far below theirs make large (they alone fill some directions of
    ``C``), and any row once its ``d_j`` is about 1e-24 of it: then, up to ``_DENSE_MAX`` rows, ``K`` gets a dense Cholesky
    ``K = L L^T`` (``H = L^-1``, ``O(m^3)``), good to about ``eps sum_i K_ii / p_i`` over its pivots ``p_i``,
    which is large where the diagonal fills many directions instead (a low-rank ``W``). ``weight`` is how many
    times the density counts ``log det K`` (a matrix-normal's factor: the other factor's size); a ``K`` that
    neither way holds to ``_MAX_LOSS`` nats is refused, as are a diagonal that is not positive and entries that are
    not finite (whether or not torch's argument validation is on: ``fit`` turns it off).

    The precision's diagonal (the KLs' trace terms) is ``|H e_j|^2`` up to ``_DENSE_MAX`` rows (``H`` as chosen above:
    a sum of squares either way); above, ``diag(1/d) - U U^T`` with ``U = diag(1/d) W L^-T``, refused where some
    ``|W_j|^2 / d_j`` exceeds ``_WOODBURY_MAX_RATIO``.
    """

    def __init__(self, factor, diag, weight=1):
        factor, diag = factor.double(), diag.double()
        self.factor, self.diag, self.weight, self.tril = factor, diag, weight, None
        m, k = factor.shape[-2:]
        capacitance = torch.eye(k, dtype=factor.dtype, device=factor.device) + factor.mT @ (factor / diag.unsqueeze(-1))
        self.cap_tril, info = torch.linalg.cholesky_ex(capacitance)
        if k and m:  # a check: no graph. C's eigenvalues are >= 1: a computed one below is round-off
            # a zero or non-finite d makes C non-finite: refused below, by name, not by eigvalsh's LinAlgError
            spectrum = torch.linalg.eigvalsh(capacitance.detach().nan_to_num(0.0, 0.0, 0.0))
            ratio = (factor.detach().pow(2).sum(-1) / diag.detach()).max()
            loss = (weight * _EPS * k * (spectrum[..., -1] / spectrum[..., 0].clamp(min=1)).max()
                    + _EPS * (m * weight * ratio).sqrt())
        else:
            ratio = loss = diag.new_zeros(())
        # one host read; the largest |W_j|^2 / d_j is kept for the precision's diagonal above _DENSE_MAX rows
        bad, info, loss, self.ratio = torch.stack([
            ~(torch.isfinite(diag).all() & (diag > 0).all() & torch.isfinite(factor).all()), info.any(), loss,
            ratio]).detach().tolist()
        if bad:
            raise ValueError(f"a covariance W W^T + diag(d) of {m} rows has a diagonal d that is not positive or entries "
                             "that are not finite")
        if info or not loss <= _MAX_LOSS:  # NaN too
            self.tril = self._dense("Woodbury would lose " + ("them all" if info or loss > 1e3 else f"about {loss:.2g} nats"))

    def _dense(self, why):
        """The dense Cholesky factor of ``K``, refused above ``_DENSE_MAX`` rows or where it would lose more than
        ``_MAX_LOSS`` nats (``why``: why it is needed)."""
        m = self.factor.shape[-2]
        if m <= _DENSE_MAX:
            cov = self.factor @ self.factor.mT + torch.diag_embed(self.diag)
            tril, info = torch.linalg.cholesky_ex(cov)
            pivots = tril.diagonal(dim1=-2, dim2=-1).pow(2)
            loss = self.weight * _EPS * (cov.diagonal(dim1=-2, dim2=-1) / pivots).sum(-1).max() if m else cov.new_zeros(())
            info, loss = torch.stack([info.any(), loss]).detach().tolist()  # one host read; a check: no graph
            if not info and loss <= _MAX_LOSS:
                return tril
            why += "; a dense Cholesky would lose " + ("them all" if info or loss > 1e3 else f"about {loss:.2g} nats")
        raise ValueError(
            f"a covariance W W^T + diag(d) of {m} rows is too near singular for float64's digits in its log-density "
            f"({why}): directions that the diagonal alone fills are below float64's digits against the low-rank part; "
            "floor the diagonal (SWAG's var_clamp, a prior's D) higher against the low-rank part")

    def logdet(self):
        if self.tril is not None:
            return 2 * self.tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return self.diag.log().sum(-1) + 2 * self.cap_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    def whiten(self, v):
        """``H v`` for ``v: (..., m, p)``, with ``(H v)^T (H v) = v^T K^-1 v``: ``(..., m, p)`` densely, else
        ``(..., k + m, p)``."""
        v = v.double()
        if self.tril is not None:
            return torch.linalg.solve_triangular(self.tril, v, upper=False)
        z = torch.cholesky_solve(self.factor.mT @ (v / self.diag.unsqueeze(-1)), self.cap_tril)
        return torch.cat([z, (v - self.factor @ z) / self.diag.sqrt().unsqueeze(-1)], -2)

    def inv_diagonal(self):
        m = self.factor.shape[-2]
        if m <= _DENSE_MAX:  # K^-1 = H^T H: column sums of (H I)^2
            return self.whiten(torch.eye(m, dtype=self.diag.dtype, device=self.diag.device)).pow(2).sum(-2)
        if self.ratio > _WOODBURY_MAX_RATIO:
            raise ValueError(
                f"the precision of a covariance W W^T + diag(d) of {m} rows (a closed-form KL's trace term) has a "
                f"diagonal entry {self.ratio:.1e} times smaller than its row of W W^T: above {_DENSE_MAX} rows its "
                "diagonal is diag(1/d) - U U^T, which would lose its digits there; floor the diagonal (SWAG's var_clamp, "
                "a prior's D) at above 1e-12 of the low-rank part, or estimate the KL by sampling (Trace_ELBO)")
        u = torch.linalg.solve_triangular(self.cap_tril, (self.factor / self.diag.unsqueeze(-1)).mT, upper=False)
        return self.diag.reciprocal() - u.pow(2).sum(-2)

    def diagonal(self):
        return self.diag + self.factor.pow(2).sum(-1)

    def trace_inv_times(self, other):
        """``tr(K^-1 K_other)`` for another :class:`_LowRankPlusDiag` of the same size."""
        return self.whiten(other.factor).pow(2).sum((-2, -1)) + (self.inv_diagonal() * other.diag).sum(-1)


def _broadcast_batch(name, *shapes):
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise ValueError(f"{name}: parameter batch shapes {[tuple(s) for s in shapes]} do not broadcast") from None


def _check_dtypes(name, **tensors):
    dtypes = {str(t.dtype).removeprefix("torch."): n for n, t in tensors.items()}
    if len(dtypes) > 1:
        raise ValueError(f"{name}: the parameters must share a dtype, got {', '.join(f'{n} {d}' for d, n in dtypes.items())}")


def check_event_shape(distribution, value, name=None) -> None:
    """Refuse a ``value`` whose trailing dims are not ``distribution``'s event shape, whatever torch's argument
    validation says (``fit`` switches it off, as ``pyro.validation_enabled(False)`` does): a ``[3, 1]`` value broadcast
    against a ``3 x 4`` mean gave a finite log-density of a matrix the distribution is not over. A shape comparison, no
    host read.

    :raises ValueError: naming the shapes (and ``name``, the distribution's, else its class's).
    """
    event = distribution.event_shape
    if value.shape[value.dim() - len(event) :] != event:  # a negative start (too few dims) gives too short a tail
        raise ValueError(f"{name or type(distribution).__name__}.log_prob: the value's shape {tuple(value.shape)} does not end in "
                         f"the event shape {tuple(event)}")


def _gaussian_log_prob(self, value):
    """``-1/2 [d log 2 pi + log det S + maha(value - loc)]``, summed in float64 and returned in ``loc``'s dtype (float16's
    range holds the result where it may not hold the log-determinant's parts)."""
    check_event_shape(self, value)
    if self._validate_args:
        self._validate_sample(value)
    d = self.event_shape.numel()
    return (-0.5 * (d * math.log(2 * math.pi) + self._logdet() + self._mahalanobis(value.double() - self.loc.double()))).to(self.loc.dtype)


def _gaussian_entropy(self):
    d = self.event_shape.numel()
    return (0.5 * (d * (1 + math.log(2 * math.pi)) + self._logdet())).to(self.loc.dtype)


class MatrixNormalKronecker(TorchDistribution):
    r"""
    Matrix-normal distribution ``X ~ MN(M, K_row, K_col)``, i.e. ``vec(X) ~ N(vec(M), K_row (x) K_col)``
    with row-major ``vec``, where each factor is low-rank plus diagonal:
    ``K_row = Z_r Z_r^T + diag(D_r^2)``, ``K_col = Z_c Z_c^T + diag(D_c^2)``.

    ``log_prob``, ``rsample``, ``entropy`` and the KL divergences cost ``O(mn (k_r + k_c) + (m + n) k^2)``
    through Woodbury and the determinant lemma (``log det(K_row (x) K_col) = n log det K_row +
    m log det K_col``); no ``mn x mn`` matrix is formed; a factor of up to 1024 rows whose capacitance is too
    ill-conditioned for that gets a dense Cholesky (``O(m^3)``), and a closed-form KL's trace term whitens the
    identity (``O(m^2 k)``) up to 1024 rows. The factors are identified
    only up to a scalar: ``(c K_row) (x) (K_col / c)`` is the same distribution.

    Example, a prior over the stacked ``lora_A`` site ``[L, r, d_in]`` (batch ``L``, event ``(r, d_in)``)::

        prior = MatrixNormalKronecker(torch.zeros(L, r, d_in), Z_r, D_r, Z_c, D_c)
        pyro.sample("q_proj.lora_A", prior.to_event(1))

    :param torch.Tensor loc: mean ``M``, shape ``(..., m, n)``.
    :param torch.Tensor row_factor: ``Z_r``, shape ``(..., m, k_r)``.
    :param torch.Tensor row_diag: ``D_r``, positive, shape ``(..., m)``.
    :param torch.Tensor col_factor: ``Z_c``, shape ``(..., n, k_c)``.
    :param torch.Tensor col_diag: ``D_c``, positive, shape ``(..., n)``.
    """

    arg_constraints = {
        "loc": constraints.independent(constraints.real, 2),
        "row_factor": constraints.independent(constraints.real, 2),
        "row_diag": constraints.independent(constraints.positive, 1),
        "col_factor": constraints.independent(constraints.real, 2),
        "col_diag": constraints.independent(constraints.positive, 1),
    }
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, loc: torch.Tensor, row_factor: torch.Tensor, row_diag: torch.Tensor, col_factor: torch.Tensor,
                 col_diag: torch.Tensor, validate_args: bool | None = None):
        name = type(self).__name__
        if loc.dim() < 2 or row_factor.dim() < 2 or col_factor.dim() < 2 or row_diag.dim() < 1 or col_diag.dim() < 1:
            raise ValueError(f"{name}: loc, row_factor, col_factor need >= 2 dims and row_diag, col_diag >= 1")
        _check_dtypes(name, loc=loc, row_factor=row_factor, row_diag=row_diag, col_factor=col_factor, col_diag=col_diag)
        m, n = loc.shape[-2:]
        if row_factor.shape[-2] != m or row_diag.shape[-1] != m:
            raise ValueError(
                f"{name}: loc is {m} x {n}, so row_factor must be (..., {m}, k_r) and row_diag (..., {m}); "
                f"got {tuple(row_factor.shape)} and {tuple(row_diag.shape)}"
            )
        if col_factor.shape[-2] != n or col_diag.shape[-1] != n:
            raise ValueError(
                f"{name}: loc is {m} x {n}, so col_factor must be (..., {n}, k_c) and col_diag (..., {n}); "
                f"got {tuple(col_factor.shape)} and {tuple(col_diag.shape)}"
            )
        batch_shape = _broadcast_batch(
            name, loc.shape[:-2], row_factor.shape[:-2], row_diag.shape[:-1], col_factor.shape[:-2], col_diag.shape[:-1]
        )
        self._set_params(batch_shape, loc, row_factor, row_diag, col_factor, col_diag)
        super().__init__(batch_shape, loc.shape[-2:], validate_args=validate_args)

    def _set_params(self, batch_shape, loc, row_factor, row_diag, col_factor, col_diag):
        # expand() gives views, so broadcasting costs no memory
        self.loc = loc.expand(batch_shape + loc.shape[-2:])
        self.row_factor = row_factor.expand(batch_shape + row_factor.shape[-2:])
        self.row_diag = row_diag.expand(batch_shape + row_diag.shape[-1:])
        self.col_factor = col_factor.expand(batch_shape + col_factor.shape[-2:])
        self.col_diag = col_diag.expand(batch_shape + col_diag.shape[-1:])

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(MatrixNormalKronecker, _instance)
        batch_shape = torch.Size(batch_shape)
        new._set_params(batch_shape, self.loc, self.row_factor, self.row_diag, self.col_factor, self.col_diag)
        super(MatrixNormalKronecker, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @lazy_property
    def _row(self):
        # D^2 may overflow float16; the density counts log det K_row n times
        return _LowRankPlusDiag(self.row_factor, self.row_diag.double().pow(2), weight=self.event_shape[1])

    @lazy_property
    def _col(self):
        return _LowRankPlusDiag(self.col_factor, self.col_diag.double().pow(2), weight=self.event_shape[0])

    @property
    def mean(self):
        return self.loc

    @property
    def mode(self):
        return self.loc

    @property
    def variance(self):
        return self._variance().to(self.loc.dtype)

    def _variance(self):
        return self._row.diagonal().unsqueeze(-1) * self._col.diagonal().unsqueeze(-2)

    def _logdet(self):
        m, n = self.event_shape
        return n * self._row.logdet() + m * self._col.logdet()

    def _mahalanobis(self, delta):
        """``vec(delta)^T (K_row (x) K_col)^-1 vec(delta) = |H_row delta H_col^T|^2`` with ``K^-1 = H^T H``
        (:meth:`_LowRankPlusDiag.whiten`; float64)."""
        return self._col.whiten(self._row.whiten(delta).mT).pow(2).sum((-2, -1))

    def _precision_diagonal(self):
        return self._row.inv_diagonal().unsqueeze(-1) * self._col.inv_diagonal().unsqueeze(-2)

    def rsample(self, sample_shape=torch.Size()):
        # X = A_r E A_c^T with A = [Z, diag(D)] has covariance (A_r A_r^T) (x) (A_c A_c^T) = K_row (x) K_col;
        # the diag(D) blocks are applied as broadcasts, never as dense m x m / n x n matrices.
        m, n = self.event_shape
        k_r, k_c = self.row_factor.shape[-1], self.col_factor.shape[-1]
        shape = self._extended_shape(sample_shape)[:-2] + (k_r + m, k_c + n)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        right = eps[..., :k_c] @ self.col_factor.mT + eps[..., k_c:] * self.col_diag.unsqueeze(-2)
        return self.loc + self.row_factor @ right[..., :k_r, :] + self.row_diag.unsqueeze(-1) * right[..., k_r:, :]

    log_prob = _gaussian_log_prob
    entropy = _gaussian_entropy


class LowRankPlusDiagNormal(TorchDistribution):
    r"""
    Gaussian over a tensor ``X`` (an ``r x r`` LoRA-XS core, or a whole stacked ``[L, r, r]`` site) with
    covariance ``W W^T + diag(cov_diag)`` on ``vec(X)`` (row-major): a
    :class:`~pyro.distributions.LowRankMultivariateNormal` on ``vec(X)`` seen with the event shape of ``X``.
    ``cov_diag`` has the layout of ``loc`` and ``cov_factor`` adds a trailing rank dim, so SWAG's
    ``mean + sigma * z1 + Dev z2 / sqrt(K - 1)`` (Maddox et al. 2019) maps to ``cov_diag = sigma^2``,
    ``cov_factor = Dev / sqrt(K - 1)``.

    The last ``event_dim`` dims of ``loc`` are the event, the ones before it the batch. With
    ``event_dim=loc.dim()`` the low-rank factor couples every entry, e.g. all layers of a stacked site.

    :param torch.Tensor loc: mean, shape ``(..., *event)``.
    :param torch.Tensor cov_factor: ``W`` in the layout of ``loc`` plus a rank dim, shape ``(..., *event, k)``.
    :param torch.Tensor cov_diag: positive variances, shape ``(..., *event)``.
    :param int event_dim: how many trailing dims of ``loc`` form the event (default 2: a matrix).
    :raises ValueError: if ``loc`` has fewer than ``event_dim`` dims, the shapes do not match or the batch
        shapes do not broadcast.
    """

    has_rsample = True

    def __init__(self, loc: torch.Tensor, cov_factor: torch.Tensor, cov_diag: torch.Tensor, validate_args: bool | None = None,
                 event_dim: int = 2):
        name = type(self).__name__
        if not (isinstance(event_dim, int) and not isinstance(event_dim, bool) and event_dim >= 1):
            raise ValueError(f"{name}: event_dim must be an int >= 1, got {event_dim!r}")
        _check_dtypes(name, loc=loc, cov_factor=cov_factor, cov_diag=cov_diag)
        if loc.dim() < event_dim:
            raise ValueError(f"{name}: loc must have at least event_dim = {event_dim} dims, got {tuple(loc.shape)}")
        event_shape = loc.shape[loc.dim() - event_dim :]
        if (
            cov_diag.dim() < event_dim or cov_diag.shape[cov_diag.dim() - event_dim :] != event_shape
            or cov_factor.dim() < event_dim + 1 or cov_factor.shape[cov_factor.dim() - event_dim - 1 : -1] != event_shape
        ):
            event = ", ".join(str(d) for d in event_shape)
            raise ValueError(
                f"{name}: loc has event shape {tuple(event_shape)}, so cov_factor must be (..., {event}, k) and "
                f"cov_diag (..., {event}); got {tuple(cov_factor.shape)} and {tuple(cov_diag.shape)}"
            )
        batch_shape = _broadcast_batch(
            name, loc.shape[: loc.dim() - event_dim], cov_factor.shape[: cov_factor.dim() - event_dim - 1],
            cov_diag.shape[: cov_diag.dim() - event_dim],
        )
        self._set_params(batch_shape, event_shape, loc, cov_factor, cov_diag)
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    @property
    def arg_constraints(self):
        e = len(self.event_shape) if hasattr(self, "_event_shape") else 2
        return {
            "loc": constraints.independent(constraints.real, e),
            "cov_factor": constraints.independent(constraints.real, e + 1),
            "cov_diag": constraints.independent(constraints.positive, e),
        }

    @constraints.dependent_property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def _set_params(self, batch_shape, event_shape, loc, cov_factor, cov_diag):
        self.loc = loc.expand(batch_shape + event_shape)
        self.cov_factor = cov_factor.expand(batch_shape + cov_factor.shape[cov_factor.dim() - len(event_shape) - 1 :])
        self.cov_diag = cov_diag.expand(batch_shape + event_shape)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LowRankPlusDiagNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new._set_params(batch_shape, self.event_shape, self.loc, self.cov_factor, self.cov_diag)
        super(LowRankPlusDiagNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @lazy_property
    def flat(self):
        """The same Gaussian on ``vec(X)``, a :class:`~torch.distributions.LowRankMultivariateNormal`."""
        # built lazily, after our own arg_constraints were validated with tensor-shaped names
        e = len(self.event_shape)
        return LowRankMultivariateNormal(
            self.loc.flatten(-e), self.cov_factor.flatten(-e - 1, -2), self.cov_diag.flatten(-e), validate_args=False
        )

    @lazy_property
    def _cov(self):
        e = len(self.event_shape)
        return _LowRankPlusDiag(self.cov_factor.flatten(-e - 1, -2), self.cov_diag.flatten(-e))

    @property
    def mean(self):
        return self.loc

    @property
    def mode(self):
        return self.loc

    @property
    def variance(self):
        return self._variance().to(self.loc.dtype)

    def _variance(self):
        return self.cov_diag.double() + self.cov_factor.double().pow(2).sum(-1)

    def _logdet(self):
        return self._cov.logdet()

    def _mahalanobis(self, delta):
        return self._cov.whiten(delta.flatten(-len(self.event_shape)).unsqueeze(-1)).pow(2).sum((-2, -1))

    def _precision_diagonal(self):
        return self._cov.inv_diagonal().unflatten(-1, self.event_shape)

    def rsample(self, sample_shape=torch.Size()):
        # loc + W z2 + sqrt(d) z1, z2 drawn first (SWAG's order); no Cholesky, so any diagonal, rank and dtype
        e = len(self.event_shape)
        like = dict(dtype=self.loc.dtype, device=self.loc.device)
        z2 = torch.randn(*sample_shape, *self.batch_shape, self.cov_factor.shape[-1], **like)
        z1 = torch.randn(*sample_shape, *self.loc.shape, **like)
        low_rank = (self.cov_factor.flatten(-e - 1, -2) @ z2.unsqueeze(-1)).squeeze(-1).unflatten(-1, self.event_shape)
        return self.loc + low_rank + self.cov_diag.sqrt() * z1

    # not through self.flat: torch's LowRankMultivariateNormal runs its Woodbury in the input dtype (_LowRankPlusDiag)
    log_prob = _gaussian_log_prob
    entropy = _gaussian_entropy


def _without_autocast(method):
    """Run ``method`` with autocast off on the distribution's device: Pyro scores a guide's ``log q`` after the guide
    has returned, under the caller's autocast, which would run the method's matmuls in half precision."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with torch.autocast(self.loc.device.type, enabled=False):
            return method(self, *args, **kwargs)

    return run


class KFACNormal(TorchDistribution):
    r"""
    Gaussian over a (stacked) LoRA site with Kronecker-factored precision, per layer ``l``:
    ``P_l = E_l (x) Lambda_l + lambda_l I`` in the canonical row-major orientation ``W: [r, D]``, with
    ``E = V diag(e) V^T`` (``r x r``) and ``Lambda = U diag(s) U^T + sigma (I - U U^T)`` (``U: [D, k]``).
    Its eigenvectors are ``v_i (x) u_j`` (eigenvalue ``e_i s_j + lambda``) and ``v_i (x) w`` for ``w``
    orthogonal to ``U`` (``e_i sigma + lambda``), so sampling, ``log_prob`` and the variance cost
    ``O(r D k)`` per layer; no ``rD x rD`` matrix is formed.

    :param loc: mean, the site's shape ``[L, rows, cols]`` (or ``[rows, cols]``).
    :param small_vecs: ``V``, ``[L, r, r]``; ``small_vals``: ``e >= 0``, ``[L, r]``.
    :param large_vecs: ``U`` with orthonormal columns, ``[L, D, k]``; ``large_vals``: ``s >= 0``,
        ``[L, k]``; ``large_rest``: ``sigma >= 0``, ``[L]``.
    :param prior_precision: ``lambda > 0``, ``[L]``.
    :param bool transposed: the site holds ``W^T`` (LoRA ``B``: ``[L, D, r]``).
    """

    arg_constraints = {}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc: torch.Tensor, small_vecs: torch.Tensor, small_vals: torch.Tensor, large_vecs: torch.Tensor,
                 large_vals: torch.Tensor, large_rest: torch.Tensor, prior_precision: torch.Tensor, transposed: bool):
        self.loc = loc
        self.small_vecs, self.small_vals = small_vecs, small_vals
        self.large_vecs, self.large_vals, self.large_rest = large_vecs, large_vals, large_rest
        self.prior_precision = prior_precision
        self.transposed = transposed
        super().__init__(torch.Size(), loc.shape, validate_args=False)

    def _canonical(self, x):
        """``[*S, *event]`` -> ``[*S, L, r, D]``."""
        x = x if len(self.event_shape) == 3 else x.unsqueeze(-3)
        return x.transpose(-1, -2) if self.transposed else x

    def _site(self, x):
        x = x.transpose(-1, -2) if self.transposed else x
        return x if len(self.event_shape) == 3 else x.squeeze(-3)

    def _eigenvalues(self):
        """Precision eigenvalues: ``[L, r, k]`` on ``v_i (x) u_j`` and ``[L, r]`` on the complement."""
        lam = self.prior_precision
        top = self.small_vals.unsqueeze(-1) * self.large_vals.unsqueeze(-2) + lam[:, None, None]
        rest = self.small_vals * self.large_rest.unsqueeze(-1) + lam[:, None]
        return top, rest

    @property
    def mean(self):
        return self.loc

    @property
    @_without_autocast
    def variance(self):
        top, rest = (e.double() for e in self._eigenvalues())
        # U re-orthonormalised in float64: float32 rounding leaves |U_d|^2 up to 1e-7 off 1, which the complement's
        # 1 / rest magnified where the data dominate lambda (a negative variance at full rank, lambda = 1e-8)
        u2 = torch.linalg.qr(self.large_vecs.double()).Q.pow(2)  # [L, D, k]
        D, k = u2.shape[-2:]
        outside = (1 - u2.sum(-1)).clamp(min=0) if k < D else torch.zeros_like(u2[..., 0])  # full rank: no complement
        # Var W_ad = sum_i V_ai^2 (sum_j U_dj^2 / top_ij + (1 - |U_d|^2) / rest_i)
        per_i = (u2 @ top.reciprocal().mT).mT + outside.unsqueeze(-2) / rest.unsqueeze(-1)  # [L, r, D]
        return self._site(self.small_vecs.double().pow(2) @ per_i).to(self.loc.dtype)

    @_without_autocast
    def rsample(self, sample_shape=torch.Size()):
        top, rest = self._eigenvalues()
        L, r, D = self.large_vecs.shape[0], self.small_vecs.shape[-1], self.large_vecs.shape[-2]
        shape = torch.Size(sample_shape)
        z = torch.randn(shape + (L, r, D), device=top.device, dtype=top.dtype)
        u, v = self.large_vecs, self.small_vecs
        # W = P^-1/2 z, the symmetric root: V [(m U / sqrt(top)) U^T + diag(rest^-1/2) m (I - U U^T)], m = V^T z.
        # Unlike a draw in the eigenbasis it does not depend on the eigenvectors' signs or on the basis of an
        # eigenspace, which eigh picks by the float summation order (batches reordered, or split across ranks)
        m = v.mT @ z
        t = m @ u
        inner = (t * top.rsqrt()) @ u.mT
        if u.shape[-1] < D:  # at full rank the complement is empty: m - t U^T is float rounding, which 1 / sqrt(rest) magnified
            inner = inner + rest.rsqrt().unsqueeze(-1) * (m - t @ u.mT)
        return self.loc + self._site(v @ inner)

    @_without_autocast
    def log_prob(self, value):
        check_event_shape(self, value)
        top, rest = self._eigenvalues()
        D, k = self.large_vecs.shape[-2:]
        m = self.small_vecs.mT @ self._canonical(value - self.loc)  # V^T dW: [*S, L, r, D]
        t = m @ self.large_vecs  # [*S, L, r, k]
        t2 = t.pow(2)
        quad = (t2 * top).sum((-1, -2)) + ((m.pow(2).sum(-1) - t2.sum(-1)) * rest).sum(-1)
        logdet = top.log().sum((-1, -2)) + (D - k) * rest.log().sum(-1)
        n = top.shape[-2] * D
        return (-0.5 * (quad - logdet + n * math.log(2 * math.pi))).sum(-1)



class UniformMixture(TorchDistribution):
    r"""``q(x) = 1/K sum_k q_k(x)`` over ``K`` distributions of one event shape and no batch shape (e.g. the
    :class:`KFACNormal` s of a mixture of Laplace approximations), which need not share a family.

    ``log_prob`` is ``logsumexp_k log q_k(x) - log K``; ``sample`` draws the component uniformly per sample (not
    reparametrised: the component is discrete); ``mean`` and ``variance`` are the mixture's (law of total variance).

    :param list components: ``K >= 1`` distributions with ``batch_shape == ()`` and the same ``event_shape``.
    :raises ValueError: for no components, a batch shape or differing event shapes.
    """

    arg_constraints = {}
    support = constraints.real
    has_rsample = False

    def __init__(self, components):
        components = list(components)
        if not components:
            raise ValueError("a UniformMixture needs at least one component")
        shapes = {tuple(c.event_shape) for c in components}
        if len(shapes) != 1 or any(c.batch_shape != torch.Size() for c in components):
            raise ValueError(f"UniformMixture components need one event shape and no batch shape, got event shapes {shapes} "
                             f"and batch shapes {sorted({tuple(c.batch_shape) for c in components})}")
        self.components = components
        super().__init__(torch.Size(), components[0].event_shape, validate_args=False)

    @property
    def mean(self):
        return torch.stack([c.mean for c in self.components]).mean(0)

    @property
    def variance(self):
        means = torch.stack([c.mean for c in self.components])
        second = torch.stack([c.variance for c in self.components]) + means.pow(2)
        return second.mean(0) - means.mean(0).pow(2)

    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape)
        draws = torch.stack([c.sample(shape) for c in self.components])  # [K, *S, *event]
        k = torch.randint(len(self.components), shape, device=draws.device)
        pick = k.reshape(1, *shape, *([1] * len(self.event_shape))).expand(1, *draws.shape[1:])
        return draws.gather(0, pick).squeeze(0)

    def log_prob(self, value):
        logs = torch.stack([c.log_prob(value) for c in self.components])
        return torch.logsumexp(logs, 0) - math.log(len(self.components))

def _event_dims(event_shape):
    return tuple(range(-len(event_shape), 0))


class _DiagNormal:
    """``Normal(loc, scale).to_event(k)`` seen through the interface the Gaussian KLs below use."""

    def __init__(self, d, event_shape):
        if not (isinstance(d.base_dist, Normal) and d.event_shape == event_shape):
            raise NotImplementedError  # no closed form: TraceMeanField_ELBO falls back to sampling
        # float64 as the other side: a float16 log-determinant or Mahalanobis sum over many entries overflows
        self.mean, self.scale = d.base_dist.loc.double(), d.base_dist.scale.double()
        self.dtype = d.base_dist.loc.dtype
        self.event_shape = event_shape

    def _logdet(self):
        return 2 * self.scale.log().sum(_event_dims(self.event_shape))

    def _mahalanobis(self, delta):
        return (delta / self.scale).pow(2).sum(_event_dims(self.event_shape))

    def _variance(self):
        return self.scale.pow(2)

    def _precision_diagonal(self):
        return self._variance().reciprocal()


def _kl_gaussian(p, q, trace, dtype):
    """``KL(p || q) = 1/2 [tr(S_q^-1 S_p) + maha_q(mu_p - mu_q) - d + log det S_q - log det S_p]``, summed in float64,
    returned in ``dtype``."""
    d = p.event_shape.numel()
    return (0.5 * (trace + q._mahalanobis(p.mean.double() - q.mean.double()) - d + q._logdet() - p._logdet())).to(dtype)


def _diagonal_trace(p, q):
    # tr(S_q^-1 S_p) = sum diag(S_p) * diag(S_q^-1) when S_p or S_q is diagonal
    return (p._variance() * q._precision_diagonal()).sum(_event_dims(p.event_shape))


@register_kl(MatrixNormalKronecker, MatrixNormalKronecker)
def _kl_mnk_mnk(p, q):
    if p.event_shape != q.event_shape:
        raise ValueError(f"KL between event shapes {tuple(p.event_shape)} and {tuple(q.event_shape)}")
    # tr((A2 (x) B2)^-1 (A1 (x) B1)) = tr(A2^-1 A1) tr(B2^-1 B1)
    trace = q._row.trace_inv_times(p._row) * q._col.trace_inv_times(p._col)
    return _kl_gaussian(p, q, trace, p.loc.dtype)


@register_kl(LowRankPlusDiagNormal, LowRankPlusDiagNormal)
def _kl_lowrank_lowrank(p, q):
    if p.event_shape != q.event_shape:
        raise ValueError(f"KL between event shapes {tuple(p.event_shape)} and {tuple(q.event_shape)}")
    return _kl_gaussian(p, q, q._cov.trace_inv_times(p._cov), p.loc.dtype)


@register_kl(Independent, MatrixNormalKronecker)
@register_kl(Independent, LowRankPlusDiagNormal)
def _kl_diag_normal_matrix(p, q):
    p = _DiagNormal(p, q.event_shape)
    return _kl_gaussian(p, q, _diagonal_trace(p, q), p.dtype)


@register_kl(MatrixNormalKronecker, Independent)
@register_kl(LowRankPlusDiagNormal, Independent)
def _kl_matrix_diag_normal(p, q):
    q = _DiagNormal(q, p.event_shape)
    return _kl_gaussian(p, q, _diagonal_trace(p, q), p.loc.dtype)
