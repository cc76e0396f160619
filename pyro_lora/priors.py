"""Priors over LoRA matrices.

Three families, all Pyro distributions with reparametrised sampling and closed-form KL:

- :func:`isotropic_normal`: ``N(0, scale^2)`` per entry of a (stacked) LoRA site;
- :class:`MatrixNormalKronecker`: matrix-normal with covariance ``K_row (x) K_col``, each factor low-rank
  plus diagonal, evaluated through Woodbury / the matrix determinant lemma (never a dense ``mn x mn``);
- :class:`LowRankPlusDiagNormal`: a low-rank plus diagonal Gaussian over a small matrix (LoRA-XS cores).

Closed-form KL divergences are registered with :func:`torch.distributions.kl.register_kl` between the
two matrix families and against ``Normal(...).to_event(2)`` in both directions, so
:class:`~pyro.infer.TraceMeanField_ELBO` uses them for mean-field guides.
"""

import math
import numbers

import torch
from torch.distributions import Independent, LowRankMultivariateNormal, Normal, constraints
from torch.distributions.kl import kl_divergence, register_kl
from torch.distributions.utils import lazy_property

import pyro.distributions as dist
from pyro.distributions import TorchDistribution

__all__ = ["isotropic_normal", "MatrixNormalKronecker", "LowRankPlusDiagNormal"]


def isotropic_normal(shape, scale):
    """
    Isotropic Gaussian prior ``X_ij ~ N(0, scale^2)`` over a whole tensor site, e.g. a stacked
    ``lora_A`` site of shape ``[L, r, d_in]``.

    :param shape: event shape of the site.
    :type shape: torch.Size or tuple
    :param scale: prior standard deviation; a float, or a positive tensor broadcastable to ``shape``
        (e.g. ``[L, 1, 1]`` for one scale per layer). Its dtype and device are those of the prior.
    :type scale: float or torch.Tensor
    :returns: a distribution with ``batch_shape == ()`` and ``event_shape == shape``.
    :rtype: pyro.distributions.Independent
    """
    shape = torch.Size(shape)
    if isinstance(scale, numbers.Real) and scale <= 0:
        raise ValueError(f"isotropic_normal: scale must be positive, got {scale}")
    scale = torch.as_tensor(scale)
    try:
        broadcasts = torch.broadcast_shapes(scale.shape, shape) == shape
    except RuntimeError:
        broadcasts = False
    if not broadcasts:
        raise ValueError(f"isotropic_normal: scale of shape {tuple(scale.shape)} does not broadcast to {tuple(shape)}")
    return dist.Normal(torch.zeros_like(scale), scale).expand(shape).to_event(len(shape))


class _LowRankPlusDiag:
    """
    ``K = W W^T + diag(d)`` with ``W: (..., m, k)``, ``d: (..., m)`` (d > 0), evaluated by Woodbury:
    ``K^-1 = diag(1/d) - U U^T`` with ``U = diag(1/d) W L^-T`` and ``L L^T = I_k + W^T diag(1/d) W``;
    ``log det K = sum log d + 2 sum log diag L``. Everything costs O(m k^2).
    """

    def __init__(self, factor, diag):
        self.factor, self.diag = factor, diag
        self.diag_inv = diag.reciprocal()
        scaled = factor * self.diag_inv.unsqueeze(-1)
        k = factor.shape[-1]
        capacitance = torch.eye(k, dtype=factor.dtype, device=factor.device) + factor.mT @ scaled
        self.cap_tril = torch.linalg.cholesky(capacitance)
        self.U = torch.linalg.solve_triangular(self.cap_tril, scaled.mT, upper=False).mT

    def logdet(self):
        return self.diag.log().sum(-1) + 2 * self.cap_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    def solve(self, v):
        """``K^-1 v`` for ``v: (..., m, p)``."""
        return self.diag_inv.unsqueeze(-1) * v - self.U @ (self.U.mT @ v)

    def inv_diagonal(self):
        return self.diag_inv - self.U.pow(2).sum(-1)

    def diagonal(self):
        return self.diag + self.factor.pow(2).sum(-1)

    def trace_inv_times(self, other):
        """``tr(K^-1 K_other)`` for another :class:`_LowRankPlusDiag` of the same size."""
        return (other.factor * self.solve(other.factor)).sum((-2, -1)) + (self.inv_diagonal() * other.diag).sum(-1)


def _broadcast_batch(name, *shapes):
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise ValueError(f"{name}: parameter batch shapes {[tuple(s) for s in shapes]} do not broadcast") from None


class MatrixNormalKronecker(TorchDistribution):
    r"""
    Matrix-normal distribution ``X ~ MN(M, K_row, K_col)``, i.e. ``vec(X) ~ N(vec(M), K_row (x) K_col)``
    with row-major ``vec``, where each factor is low-rank plus diagonal:
    ``K_row = Z_r Z_r^T + diag(D_r^2)``, ``K_col = Z_c Z_c^T + diag(D_c^2)``.

    ``log_prob``, ``rsample``, ``entropy`` and the KL divergences cost ``O(mn (k_r + k_c) + (m + n) k^2)``
    through Woodbury and the determinant lemma (``log det(K_row (x) K_col) = n log det K_row +
    m log det K_col``); no ``mn x mn`` (nor ``m x m``) matrix is formed. The factors are identified
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

    def __init__(self, loc, row_factor, row_diag, col_factor, col_diag, validate_args=None):
        name = type(self).__name__
        if loc.dim() < 2 or row_factor.dim() < 2 or col_factor.dim() < 2 or row_diag.dim() < 1 or col_diag.dim() < 1:
            raise ValueError(f"{name}: loc, row_factor, col_factor need >= 2 dims and row_diag, col_diag >= 1")
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
        return _LowRankPlusDiag(self.row_factor, self.row_diag.pow(2))

    @lazy_property
    def _col(self):
        return _LowRankPlusDiag(self.col_factor, self.col_diag.pow(2))

    @property
    def mean(self):
        return self.loc

    @property
    def mode(self):
        return self.loc

    @property
    def variance(self):
        return self._row.diagonal().unsqueeze(-1) * self._col.diagonal().unsqueeze(-2)

    def _logdet(self):
        m, n = self.event_shape
        return n * self._row.logdet() + m * self._col.logdet()

    def _mahalanobis(self, delta):
        """``vec(delta)^T (K_row (x) K_col)^-1 vec(delta) = tr(K_row^-1 delta K_col^-1 delta^T)``."""
        return (self._col.solve(self._row.solve(delta).mT).mT * delta).sum((-2, -1))

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

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        d = self.event_shape.numel()
        return -0.5 * (d * math.log(2 * math.pi) + self._logdet() + self._mahalanobis(value - self.loc))

    def entropy(self):
        d = self.event_shape.numel()
        return 0.5 * (d * (1 + math.log(2 * math.pi)) + self._logdet())


class LowRankPlusDiagNormal(TorchDistribution):
    r"""
    Gaussian over a matrix ``X: (p, q)`` (e.g. an ``r x r`` LoRA-XS core) with covariance
    ``W W^T + diag(cov_diag)`` on ``vec(X)`` (row-major): a
    :class:`~pyro.distributions.LowRankMultivariateNormal` on ``vec(X)`` seen with event shape ``(p, q)``.
    ``cov_diag`` has the layout of ``loc`` and ``cov_factor`` adds a trailing rank dim, so SWAG's
    ``mean + sigma * z1 + Dev z2 / sqrt(K - 1)`` maps to ``cov_diag = sigma^2``, ``cov_factor = Dev / sqrt(K - 1)``.

    :param torch.Tensor loc: mean, shape ``(..., p, q)``.
    :param torch.Tensor cov_factor: ``W`` in matrix layout, shape ``(..., p, q, k)``.
    :param torch.Tensor cov_diag: positive variances, shape ``(..., p, q)``.
    """

    arg_constraints = {
        "loc": constraints.independent(constraints.real, 2),
        "cov_factor": constraints.independent(constraints.real, 3),
        "cov_diag": constraints.independent(constraints.positive, 2),
    }
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, loc, cov_factor, cov_diag, validate_args=None):
        name = type(self).__name__
        if loc.dim() < 2:
            raise ValueError(f"{name}: loc must have shape (..., p, q), got {tuple(loc.shape)}")
        event_shape = loc.shape[-2:]
        if cov_diag.shape[-2:] != event_shape or cov_factor.dim() < 3 or cov_factor.shape[-3:-1] != event_shape:
            raise ValueError(
                f"{name}: loc is {tuple(event_shape)}, so cov_factor must be (..., {event_shape[0]}, "
                f"{event_shape[1]}, k) and cov_diag (..., {event_shape[0]}, {event_shape[1]}); "
                f"got {tuple(cov_factor.shape)} and {tuple(cov_diag.shape)}"
            )
        batch_shape = _broadcast_batch(name, loc.shape[:-2], cov_factor.shape[:-3], cov_diag.shape[:-2])
        self._set_params(batch_shape, loc, cov_factor, cov_diag)
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def _set_params(self, batch_shape, loc, cov_factor, cov_diag):
        self.loc = loc.expand(batch_shape + loc.shape[-2:])
        self.cov_factor = cov_factor.expand(batch_shape + cov_factor.shape[-3:])
        self.cov_diag = cov_diag.expand(batch_shape + cov_diag.shape[-2:])

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LowRankPlusDiagNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new._set_params(batch_shape, self.loc, self.cov_factor, self.cov_diag)
        super(LowRankPlusDiagNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @lazy_property
    def flat(self):
        """The same Gaussian on ``vec(X)``, a :class:`~torch.distributions.LowRankMultivariateNormal`."""
        # built lazily, after our own arg_constraints were validated with matrix-shaped names
        return LowRankMultivariateNormal(
            self.loc.flatten(-2), self.cov_factor.flatten(-3, -2), self.cov_diag.flatten(-2), validate_args=False
        )

    @lazy_property
    def _cov(self):
        return _LowRankPlusDiag(self.flat.cov_factor, self.flat.cov_diag)

    @property
    def mean(self):
        return self.loc

    @property
    def mode(self):
        return self.loc

    @property
    def variance(self):
        return self.flat.variance.unflatten(-1, self.event_shape)

    def _logdet(self):
        return self._cov.logdet()

    def _mahalanobis(self, delta):
        delta = delta.flatten(-2).unsqueeze(-1)
        return (delta * self._cov.solve(delta)).sum((-2, -1))

    def _precision_diagonal(self):
        return self._cov.inv_diagonal().unflatten(-1, self.event_shape)

    def rsample(self, sample_shape=torch.Size()):
        return self.flat.rsample(sample_shape).unflatten(-1, self.event_shape)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return self.flat.log_prob(value.flatten(-2))

    def entropy(self):
        return self.flat.entropy()


class _DiagNormal:
    """``Normal(loc, scale).to_event(2)`` seen through the interface the Gaussian KLs below use."""

    def __init__(self, d, event_shape):
        if not (isinstance(d.base_dist, Normal) and d.event_shape == event_shape):
            raise NotImplementedError  # no closed form: TraceMeanField_ELBO falls back to sampling
        self.mean, self.scale = d.base_dist.loc, d.base_dist.scale
        self.variance = self.scale.pow(2)
        self.event_shape = event_shape

    def _logdet(self):
        return 2 * self.scale.log().sum((-2, -1))

    def _mahalanobis(self, delta):
        return (delta / self.scale).pow(2).sum((-2, -1))

    def _precision_diagonal(self):
        return self.variance.reciprocal()


def _kl_gaussian(p, q, trace):
    """``KL(p || q) = 1/2 [tr(S_q^-1 S_p) + maha_q(mu_p - mu_q) - d + log det S_q - log det S_p]``."""
    d = p.event_shape.numel()
    return 0.5 * (trace + q._mahalanobis(p.mean - q.mean) - d + q._logdet() - p._logdet())


def _diagonal_trace(p, q):
    # tr(S_q^-1 S_p) = sum diag(S_p) * diag(S_q^-1) when S_p or S_q is diagonal
    return (p.variance * q._precision_diagonal()).sum((-2, -1))


@register_kl(MatrixNormalKronecker, MatrixNormalKronecker)
def _kl_mnk_mnk(p, q):
    if p.event_shape != q.event_shape:
        raise ValueError(f"KL between event shapes {tuple(p.event_shape)} and {tuple(q.event_shape)}")
    # tr((A2 (x) B2)^-1 (A1 (x) B1)) = tr(A2^-1 A1) tr(B2^-1 B1)
    trace = q._row.trace_inv_times(p._row) * q._col.trace_inv_times(p._col)
    return _kl_gaussian(p, q, trace)


@register_kl(LowRankPlusDiagNormal, LowRankPlusDiagNormal)
def _kl_lowrank_lowrank(p, q):
    if p.event_shape != q.event_shape:
        raise ValueError(f"KL between event shapes {tuple(p.event_shape)} and {tuple(q.event_shape)}")
    return kl_divergence(p.flat, q.flat)


@register_kl(Independent, MatrixNormalKronecker)
@register_kl(Independent, LowRankPlusDiagNormal)
def _kl_diag_normal_matrix(p, q):
    p = _DiagNormal(p, q.event_shape)
    return _kl_gaussian(p, q, _diagonal_trace(p, q))


@register_kl(MatrixNormalKronecker, Independent)
@register_kl(LowRankPlusDiagNormal, Independent)
def _kl_matrix_diag_normal(p, q):
    q = _DiagNormal(q, p.event_shape)
    return _kl_gaussian(p, q, _diagonal_trace(p, q))
