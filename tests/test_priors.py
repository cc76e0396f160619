"""Priors checked against dense ``MultivariateNormal`` on small sizes (float64)."""

import contextlib
import math

import pytest
import torch
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal, kl_divergence

import pyro
import pyro.distributions as dist
from pyro.infer import TraceMeanField_ELBO

import pyro_lora.distributions as distributions
from pyro_lora.distributions import LowRankPlusDiagNormal, MatrixNormalKronecker, checked_normal, isotropic_normal

B, M, N = 2, 3, 4
f64 = dict(dtype=torch.float64)


@pytest.fixture(autouse=True, params=["dense", "woodbury"])
def factorization(request, monkeypatch):
    """Every test runs through both ways of factoring ``W W^T + diag(d)``: dense (the sizes here) and Woodbury
    (above ``_DENSE_MAX`` rows)."""
    if request.param == "woodbury":
        monkeypatch.setattr(distributions, "_DENSE_MAX", 0)
    return request.param


def mnk_params(k_r=2, k_c=2, batch=(B,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        loc=torch.randn(*batch, M, N, generator=g, **f64),
        row_factor=torch.randn(*batch, M, k_r, generator=g, **f64),
        row_diag=torch.rand(*batch, M, generator=g, **f64) + 0.5,
        col_factor=torch.randn(*batch, N, k_c, generator=g, **f64),
        col_diag=torch.rand(*batch, N, generator=g, **f64) + 0.5,
    )


def dense_factor(z, d):
    return z @ z.mT + torch.diag_embed(d.pow(2))


def dense_mvn(p):
    """vec_row(X) has covariance K_row (x) K_col, entry [(i, j), (k, l)] = K_row[i, k] K_col[j, l]."""
    k_row, k_col = dense_factor(p["row_factor"], p["row_diag"]), dense_factor(p["col_factor"], p["col_diag"])
    cov = torch.einsum("...ik,...jl->...ijkl", k_row, k_col).reshape(*k_row.shape[:-2], M * N, M * N)
    return MultivariateNormal(p["loc"].flatten(-2), cov)


def diag_normal(seed=1, batch=(B,)):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(*batch, M, N, generator=g, **f64)
    scale = torch.rand(*batch, M, N, generator=g, **f64) + 0.3
    dense = MultivariateNormal(loc.flatten(-2), torch.diag_embed(scale.pow(2).flatten(-2)))
    return dist.Normal(loc, scale).to_event(2), dense


def lowrank_params(k=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, M, N, generator=g, **f64),
        torch.randn(B, M, N, k, generator=g, **f64),
        torch.rand(B, M, N, generator=g, **f64) + 0.5,
    )


def test_dense_reference_is_kron():
    p = mnk_params()
    k_row = dense_factor(p["row_factor"][0], p["row_diag"][0])
    k_col = dense_factor(p["col_factor"][0], p["col_diag"][0])
    assert torch.allclose(dense_mvn(p).covariance_matrix[0], torch.kron(k_row, k_col))


@pytest.mark.parametrize("k_r,k_c", [(2, 2), (1, 3), (2, 0)])
def test_mnk_log_prob_entropy_moments(k_r, k_c):
    p = mnk_params(k_r, k_c)
    d, ref = MatrixNormalKronecker(**p), dense_mvn(p)
    assert d.batch_shape == (B,) and d.event_shape == (M, N)
    x = torch.randn(5, B, M, N, **f64)
    assert torch.allclose(d.log_prob(x), ref.log_prob(x.flatten(-2)))
    assert torch.allclose(d.entropy(), ref.entropy())
    assert torch.allclose(d.mean, p["loc"])
    assert torch.allclose(d.variance.flatten(-2), ref.variance)


def test_mnk_rsample_moments():
    p = mnk_params()
    d, ref = MatrixNormalKronecker(**p), dense_mvn(p)
    torch.manual_seed(0)
    x = d.rsample((200_000,))
    assert x.shape == (200_000, B, M, N)
    flat = x.flatten(-2)
    centred = flat - flat.mean(0)
    cov = torch.einsum("sbi,sbj->bij", centred, centred) / (flat.shape[0] - 1)
    scale = ref.covariance_matrix.diagonal(dim1=-2, dim2=-1).max()
    assert (flat.mean(0) - ref.mean).abs().max() < 0.03 * scale.sqrt()
    assert (cov - ref.covariance_matrix).abs().max() < 0.03 * scale


def test_mnk_kl_matches_dense():
    p, q = mnk_params(2, 2, seed=0), mnk_params(1, 3, seed=3)
    kl = kl_divergence(MatrixNormalKronecker(**p), MatrixNormalKronecker(**q))
    assert kl.shape == (B,)
    assert torch.allclose(kl, kl_divergence(dense_mvn(p), dense_mvn(q)))
    self_kl = kl_divergence(MatrixNormalKronecker(**p), MatrixNormalKronecker(**p))
    assert torch.allclose(self_kl, torch.zeros(B, **f64), atol=1e-10)


def test_mnk_kl_with_independent_normal_both_ways():
    p = mnk_params()
    d, ref = MatrixNormalKronecker(**p), dense_mvn(p)
    normal, normal_ref = diag_normal()
    assert torch.allclose(kl_divergence(normal, d), kl_divergence(normal_ref, ref))
    assert torch.allclose(kl_divergence(d, normal), kl_divergence(ref, normal_ref))


def test_kl_unsupported_base_raises_not_implemented():
    d = MatrixNormalKronecker(**mnk_params())
    laplace = dist.Laplace(torch.zeros(B, M, N, **f64), 1.0).to_event(2)
    with pytest.raises(NotImplementedError):
        kl_divergence(laplace, d)


def test_trace_mean_field_elbo_uses_closed_form_kl():
    """A stacked site [L, m, n]: guide Normal(...).to_event(3), prior MNK with batch L .to_event(1)."""
    p = mnk_params()
    prior = MatrixNormalKronecker(**p)
    normal, _ = diag_normal()

    def model():
        pyro.sample("w", prior.to_event(1))

    def guide():
        pyro.sample("w", dist.Normal(normal.base_dist.loc, normal.base_dist.scale).to_event(3))

    loss = TraceMeanField_ELBO().differentiable_loss(model, guide)  # exactly the KL: no likelihood, no sampling noise
    assert torch.allclose(loss, kl_divergence(normal, prior).sum())


def test_mnk_expand_and_broadcast():
    p = mnk_params(batch=())
    d = MatrixNormalKronecker(**p)
    assert d.batch_shape == ()
    e = d.expand((5, B))
    assert e.batch_shape == (5, B) and e.event_shape == (M, N)
    x = torch.randn(5, B, M, N, **f64)
    assert torch.allclose(e.log_prob(x), d.log_prob(x))
    assert e.rsample((7,)).shape == (7, 5, B, M, N)
    assert e.variance.shape == (5, B, M, N)
    # batched loc with shared factors
    mixed = MatrixNormalKronecker(torch.zeros(B, M, N, **f64), *list(p.values())[1:])
    assert mixed.batch_shape == (B,) and mixed.row_factor.shape == (B, M, 2)


def test_mnk_gradients_match_dense():
    p = {k: v.requires_grad_() for k, v in mnk_params().items()}
    x = torch.randn(B, M, N, **f64)
    grads = torch.autograd.grad(MatrixNormalKronecker(**p).log_prob(x).sum(), list(p.values()))
    dense_grads = torch.autograd.grad(dense_mvn(p).log_prob(x.flatten(-2)).sum(), list(p.values()))
    for g, h in zip(grads, dense_grads):
        assert torch.allclose(g, h)
    sample = MatrixNormalKronecker(**p).rsample((3,))
    for g in torch.autograd.grad(sample.pow(2).sum(), list(p.values())):
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_mnk_errors():
    p = mnk_params()
    with pytest.raises(ValueError, match="row_factor"):
        MatrixNormalKronecker(**{**p, "row_factor": torch.randn(B, M + 1, 2, **f64)})
    with pytest.raises(ValueError, match="col_diag"):
        MatrixNormalKronecker(**{**p, "col_diag": torch.ones(B, N + 1, **f64)})
    with pytest.raises(ValueError, match="do not broadcast"):
        MatrixNormalKronecker(**{**p, "loc": torch.zeros(3, M, N, **f64)})
    with pytest.raises(ValueError, match="row_diag"):
        MatrixNormalKronecker(**{**p, "row_diag": -p["row_diag"]}, validate_args=True)
    with pytest.raises(ValueError):
        MatrixNormalKronecker(torch.zeros(M, **f64), *list(p.values())[1:])


def test_a_value_of_another_event_shape_is_refused_with_validation_off():
    """With torch's argument validation off (fit's, or process-wide after `import pyro_lora` until it restored it), a
    [3, 1] value broadcast against a 3 x 4 matrix normal's mean into a finite log-density (-5.95 in a report)."""
    from pyro_lora.distributions import KFACNormal
    from pyro_lora.guides.mcdropout import ColumnDropout

    loc, factor, diag = lowrank_params()
    eye = torch.eye(M, **f64)[None]
    with pyro.validation_enabled(False):
        kfac = KFACNormal(loc[:1], eye, torch.ones(1, M, **f64), torch.eye(N, **f64)[None, :, :1], torch.ones(1, 1, **f64),
                          torch.ones(1, **f64), torch.ones(1, **f64), transposed=False)
        for d in (MatrixNormalKronecker(**mnk_params(batch=())), LowRankPlusDiagNormal(loc[0], factor[0], diag[0]), kfac,
                  ColumnDropout(loc[0], 0.1)):
            value = d.sample()
            assert d.log_prob(torch.stack([value, value])).shape == (2,)  # sample dims broadcast as ever
            for wrong in (value[..., :1], value[..., 0, :], value.mT):
                with pytest.raises(ValueError, match=rf"{type(d).__name__}.log_prob: the value's shape .* does not end in the event shape"):
                    d.log_prob(wrong)


def test_isotropic_normal():
    shape = (B, M, N)
    d = isotropic_normal(shape, 0.2)
    assert d.batch_shape == () and d.event_shape == shape
    x = torch.randn(shape)
    assert torch.allclose(d.log_prob(x), dist.Normal(0.0, 0.2).log_prob(x).sum())
    per_layer = isotropic_normal(shape, torch.tensor([0.1, 0.2], **f64).view(B, 1, 1))
    assert per_layer.event_shape == shape and per_layer.mean.dtype == torch.float64
    assert torch.allclose(per_layer.variance[1], torch.full((M, N), 0.04, **f64))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite and positive"):
            isotropic_normal(shape, bad)
    with pytest.raises(ValueError, match="broadcast"):
        isotropic_normal(shape, torch.ones(3))


def test_lowrank_matches_flat_lowrank_mvn():
    loc, factor, diag = lowrank_params()
    d = LowRankPlusDiagNormal(loc, factor, diag)
    flat = LowRankMultivariateNormal(loc.flatten(-2), factor.flatten(-3, -2), diag.flatten(-2))
    assert d.batch_shape == (B,) and d.event_shape == (M, N)
    x = torch.randn(4, B, M, N, **f64)
    assert torch.allclose(d.log_prob(x), flat.log_prob(x.flatten(-2)))
    assert torch.allclose(d.entropy(), flat.entropy())
    assert torch.allclose(d.variance.flatten(-2), flat.variance)
    assert d.rsample((6,)).shape == (6, B, M, N)
    e = d.expand((5, B))
    assert e.batch_shape == (5, B) and torch.allclose(e.log_prob(x[0]), d.log_prob(x[0]))


def test_lowrank_kl():
    loc, factor, diag = lowrank_params()
    d = LowRankPlusDiagNormal(loc, factor, diag)
    ref = LowRankMultivariateNormal(loc.flatten(-2), factor.flatten(-3, -2), diag.flatten(-2))
    other = LowRankPlusDiagNormal(*lowrank_params(k=2, seed=5))
    assert torch.allclose(kl_divergence(d, other), kl_divergence(ref, other.flat))
    normal, normal_ref = diag_normal()
    ref = MultivariateNormal(ref.loc, ref.covariance_matrix)
    assert torch.allclose(kl_divergence(normal, d), kl_divergence(normal_ref, ref))
    assert torch.allclose(kl_divergence(d, normal), kl_divergence(ref, normal_ref))


def test_lowrank_errors():
    loc, factor, diag = lowrank_params()
    with pytest.raises(ValueError, match="cov_factor"):
        LowRankPlusDiagNormal(loc, factor.flatten(-3, -2), diag)
    with pytest.raises(ValueError, match="cov_diag"):
        LowRankPlusDiagNormal(loc, factor, diag.flatten(-2))
    with pytest.raises(ValueError, match="cov_diag"):
        LowRankPlusDiagNormal(loc, factor, -diag, validate_args=True)


def test_lowrank_with_the_whole_tensor_as_event_matches_dense():
    """``event_dim=loc.dim()`` (SWAG's posterior over a stacked site): the factor couples the leading dim too."""
    loc, factor, diag = lowrank_params()
    d = LowRankPlusDiagNormal(loc, factor, diag, event_dim=3)
    assert d.batch_shape == () and d.event_shape == (B, M, N)
    ref = MultivariateNormal(loc.flatten(), factor.flatten(0, -2) @ factor.flatten(0, -2).T + torch.diag(diag.flatten()))
    x = torch.randn(5, B, M, N, **f64)
    assert torch.allclose(d.log_prob(x), ref.log_prob(x.flatten(-3)))
    assert torch.allclose(d.entropy(), ref.entropy())
    assert torch.allclose(d.variance.flatten(), ref.variance)
    torch.manual_seed(0)
    draws = d.rsample((40000,)).flatten(-3)
    assert draws.shape == (40000, B * M * N)
    cov = (draws - draws.mean(0)).T @ (draws - draws.mean(0)) / draws.shape[0]
    scale = ref.covariance_matrix.diagonal().max()
    assert (draws.mean(0) - loc.flatten()).abs().max() < 0.05 * scale.sqrt()
    assert (cov - ref.covariance_matrix).abs().max() < 0.05 * scale
    # closed-form KL against a diagonal Normal over the same 3-d event, both directions
    normal = dist.Normal(torch.zeros(B, M, N, **f64), torch.ones(B, M, N, **f64)).to_event(3)
    normal_ref = MultivariateNormal(torch.zeros(B * M * N, **f64), torch.eye(B * M * N, **f64))
    assert torch.allclose(kl_divergence(d, normal), kl_divergence(ref, normal_ref))
    assert torch.allclose(kl_divergence(normal, d), kl_divergence(normal_ref, ref))


def test_lowrank_rsample_without_batch_is_the_direct_formula():
    """Unbatched: ``loc + W z2 + sqrt(d) z1`` with ``z2`` drawn first (SWAG's reference sampling order)."""
    loc, factor, diag = (t[0] for t in lowrank_params())
    d = LowRankPlusDiagNormal(loc, factor, diag)
    torch.manual_seed(3)
    x = d.rsample((4,))
    torch.manual_seed(3)
    z2 = torch.randn(4, factor.shape[-1], **f64)
    z1 = torch.randn(4, M, N, **f64)
    torch.testing.assert_close(x, loc + torch.einsum("sk,mnk->smn", z2, factor) + diag.sqrt() * z1)


def test_lowrank_event_dim_errors():
    loc, factor, diag = lowrank_params()
    with pytest.raises(ValueError, match="event_dim"):
        LowRankPlusDiagNormal(loc, factor, diag, event_dim=0)
    with pytest.raises(ValueError, match="at least event_dim"):
        LowRankPlusDiagNormal(loc, factor, diag, event_dim=4)
    with pytest.raises(ValueError, match="cov_factor"):
        LowRankPlusDiagNormal(loc, factor[0], diag, event_dim=3)


def test_mnk_float32_log_prob_and_kl_stay_exact_with_a_small_diagonal():
    # Woodbury subtracts two terms of size 1/d: with d << the low-rank part (a learned diagonal that shrank) float32
    # loses its digits unless the small k x k algebra runs in float64 (the flow's p(U) was 0.13 nats off)
    p = mnk_params(k_r=3, k_c=3)
    p["row_diag"], p["col_diag"] = 1e-3 * p["row_diag"], 3e-3 * p["col_diag"]
    ref = dense_mvn(p)
    x = ref.sample((5,)).unflatten(-1, (M, N))  # its own draws, near the low-rank part: where Woodbury cancels
    d32 = MatrixNormalKronecker(**{k: v.float() for k, v in p.items()})
    torch.testing.assert_close(d32.log_prob(x.float()).double(), ref.log_prob(x.flatten(-2)), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(d32.entropy().double(), ref.entropy(), rtol=1e-5, atol=1e-3)
    q = mnk_params(k_r=1, k_c=2, seed=3)
    q32 = MatrixNormalKronecker(**{k: v.float() for k, v in q.items()})
    torch.testing.assert_close(kl_divergence(q32, d32).double(), kl_divergence(dense_mvn(q), ref), rtol=1e-4, atol=1e-2)


def test_lowrank_float32_log_prob_stays_exact_with_a_small_diagonal():
    loc, factor, diag = lowrank_params()
    diag = 1e-6 * diag  # a SWAG diagonal variance far below its low-rank part
    dense = MultivariateNormal(loc.flatten(-2), factor.flatten(-3, -2) @ factor.flatten(-3, -2).mT + torch.diag_embed(diag.flatten(-2)))
    x = dense.sample((4,)).unflatten(-1, (M, N))  # its own draws, near the low-rank part: where Woodbury cancels
    d32 = LowRankPlusDiagNormal(loc.float(), factor.float(), diag.float())
    torch.testing.assert_close(d32.log_prob(x.float()).double(), dense.log_prob(x.flatten(-2)), rtol=1e-5, atol=1e-2)


def test_lowrank_kl_stays_exact_in_float32_with_a_small_diagonal():
    """The KL between two low-rank Gaussians went through torch's float32 LowRankMultivariateNormal: 13.13 for 9.09."""
    g = torch.Generator().manual_seed(4)
    p, q = ((torch.randn(6, 6, generator=g, **f64), torch.randn(6, 6, 4, generator=g, **f64),
             torch.full((6, 6), 1e-6, **f64) * (1 + torch.rand(6, 6, generator=g, **f64))) for _ in range(2))
    dense = [MultivariateNormal(loc.flatten(), w.flatten(0, 1) @ w.flatten(0, 1).T + torch.diag(d.flatten())) for loc, w, d in (p, q)]
    p32, q32 = (LowRankPlusDiagNormal(*(t.float() for t in params)) for params in (p, q))
    torch.testing.assert_close(kl_divergence(p32, q32).double(), kl_divergence(*dense), rtol=1e-4, atol=1e-2)


def test_mnk_rank_deficient_factors_with_a_tiny_diagonal_in_float64(monkeypatch):
    """Both factors of rank below their size and D = 1e-6: Woodbury's cancellation cost 398 nats even in float64; the
    dense Cholesky that small factors get holds the dense reference."""
    monkeypatch.setattr(distributions, "_DENSE_MAX", 256)
    p = mnk_params(k_r=2, k_c=2, batch=())
    p["row_diag"], p["col_diag"] = torch.full((M,), 1e-6, **f64), torch.full((N,), 1e-6, **f64)
    d = MatrixNormalKronecker(**p)
    x = d.sample()
    # K = Z Z^T + D^2 rounded to float64 moves D^2's 1e-12 by 1e-4: the reference forms it with 50 digits
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50

    def factor(z, diag):
        z = mpmath.matrix(z.tolist())
        return z * z.T + mpmath.diag([mpmath.mpf(v) ** 2 for v in diag.tolist()])

    k_row, k_col = factor(p["row_factor"], p["row_diag"]), factor(p["col_factor"], p["col_diag"])
    delta = mpmath.matrix((x - p["loc"]).tolist())
    solved = mpmath.inverse(k_row) * delta * mpmath.inverse(k_col)
    maha = sum(solved[i, j] * delta[i, j] for i in range(M) for j in range(N))
    exact = -0.5 * (M * N * mpmath.log(2 * mpmath.pi) + N * mpmath.log(mpmath.det(k_row)) + M * mpmath.log(mpmath.det(k_col)) + maha)
    assert abs(d.log_prob(x).item() - float(exact)) < 1e-2


def test_a_tiny_diagonal_beside_a_low_rank_factor_keeps_the_exact_log_density():
    """1000 rows of rank 3 beside D = 1e-6 to 1e-10 (a diagonal 1e-12 to 1e-20 of the rows): a dense Cholesky's 997
    tiny pivots lost 1.14 nats of log_prob and 1.30 of entropy at 1e-6 (0.044 at 1e-5, its own estimate 0.0029), and
    Woodbury's diag(1/d) v - U U^T v lost nats too; the whitening sum of squares holds the exact spectral value."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1000, 3, generator=g, **f64)
    u, s, _ = torch.linalg.svd(z, full_matrices=False)
    for scale in (1e-4, 1e-6, 1e-10):
        d = MatrixNormalKronecker(torch.zeros(1000, 1, **f64), z, torch.full((1000,), scale, **f64),
                                  torch.ones(1, 0, **f64), torch.ones(1, **f64))
        a, e = torch.randn(3, generator=g, **f64), torch.randn(1000, generator=g, **f64)
        orthogonal = e - u @ (u.T @ e)
        x = u @ a + scale * orthogonal  # no cancellation in the reference: its span and orthogonal parts apart
        logdet = 997 * math.log(scale**2) + torch.log(s**2 + scale**2).sum()
        exact = -0.5 * (1000 * math.log(2 * math.pi) + logdet + orthogonal @ orthogonal + (a**2 / (s**2 + scale**2)).sum())
        assert abs(float(d.log_prob(x[:, None])) - float(exact)) < 1e-3
        assert abs(float(d.entropy()) - 0.5 * (1000 * (1 + math.log(2 * math.pi)) + float(logdet))) < 1e-6
        if scale == 1e-4:
            # the same covariance with its rows in other units (K = S C S), and a pure diagonal of scales 1 to 1e-16,
            # are as well conditioned as before: refused by an estimate against the largest row's scale
            rows = torch.ones(1000, **f64)
            rows[24:] = 1e-6
            scaled = LowRankPlusDiagNormal(torch.zeros(1000, **f64), rows[:, None] * z, (rows * scale) ** 2, event_dim=1)
            assert torch.isfinite(scaled.log_prob(rows * x))
            diagonal = LowRankPlusDiagNormal(torch.zeros(4, **f64), torch.zeros(4, 0, **f64), event_dim=1,
                                             cov_diag=torch.tensor([1.0, 1e-10, 1e-14, 1e-16], **f64))
            assert torch.isfinite(diagonal.log_prob(torch.zeros(4, **f64)))


def test_a_rank_deficient_factor_too_near_singular_for_float64_is_refused_counting_the_other_factor():
    """Columns of Z repeated beside D = 1e-4: the capacitance is near singular and its log-determinant carries
    round-off, which a matrix-normal counts once per column of the other factor (11 nats were lost silently this way
    at 500 columns). One column is evaluated exactly; 500 are refused."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    g = torch.Generator().manual_seed(5)
    half = torch.randn(1000, 2, generator=g, **f64)
    z = torch.cat([half, half], -1)
    # log det K = sum log d + log det(I + Z^T Z / d), its 4 x 4 capacitance summed in 50 digits
    zs = [[mpmath.mpf(v) for v in row] for row in z.tolist()]
    cap = mpmath.eye(4) + mpmath.matrix([[mpmath.fsum(r[a] * r[b] for r in zs) / mpmath.mpf(1e-8) for b in range(4)]
                                         for a in range(4)])
    logdet = 1000 * mpmath.log(mpmath.mpf(1e-8)) + mpmath.log(mpmath.det(cap))
    for n in (1, 500):
        d = MatrixNormalKronecker(torch.zeros(1000, n, **f64), z, torch.full((1000,), 1e-4, **f64),
                                  torch.ones(n, 0, **f64), torch.ones(n, **f64))
        if n == 1:
            assert abs(float(d.entropy()) - float(0.5 * (1000 * (1 + mpmath.log(2 * mpmath.pi)) + logdet))) < 1e-3
        else:
            with pytest.raises(ValueError, match="would lose about .* nats.*floor the diagonal"):
                d.entropy()


def test_half_precision_log_densities_sum_in_float64():
    """A float16 MNK with D = 1000 (D^2 and n log det K_row overflow float16) has a log-density float16 holds."""
    m = n = 64
    exact = -0.5 * m * n * (math.log(2 * math.pi) + math.log(1e6) + 1.0)
    half = dict(dtype=torch.float16)
    d = MatrixNormalKronecker(torch.zeros(m, n, **half), torch.zeros(m, 1, **half), torch.full((m,), 1000.0, **half),
                              torch.zeros(n, 1, **half), torch.ones(n, **half))
    value = torch.full((m, n), 1000.0, **half)
    assert d.log_prob(value).dtype == torch.float16 and abs(d.log_prob(value).item() - exact) <= 32  # float16's step there
    loc, factor, diag = (t[0] for t in lowrank_params())
    ref = LowRankPlusDiagNormal(loc, factor, diag)
    for dtype in (torch.bfloat16, torch.float16):
        low = LowRankPlusDiagNormal(loc.to(dtype), factor.to(dtype), diag.to(dtype))
        exact = LowRankPlusDiagNormal(*(t.to(dtype).double() for t in (loc, factor, diag))).log_prob(loc.to(dtype).double() + 1)
        assert low.log_prob(loc.to(dtype) + 1).dtype == dtype
        torch.testing.assert_close(low.log_prob(loc.to(dtype) + 1).double(), exact, rtol=1e-2, atol=0)
        assert low.rsample((2,)).shape == (2, M, N) and torch.isfinite(low.entropy()) and torch.isfinite(ref.entropy())


def test_lowrank_tiny_diagonal_rank_above_size_and_rank_zero():
    """float32 with a rank (10) above the event's 4 entries and a 1e-8 diagonal crashed in torch's float32
    capacitance Cholesky; rank 0 raised an IndexError."""
    g = torch.Generator().manual_seed(6)
    loc, w, d = torch.randn(2, 2, generator=g, **f64), torch.randn(2, 2, 10, generator=g, **f64), torch.full((2, 2), 1e-8, **f64)
    ref = MultivariateNormal(loc.flatten(), w.flatten(0, 1) @ w.flatten(0, 1).T + torch.diag(d.flatten()))
    x = ref.sample((3,)).unflatten(-1, (2, 2))
    low = LowRankPlusDiagNormal(loc.float(), w.float(), d.float())
    torch.testing.assert_close(low.log_prob(x.float()).double(), ref.log_prob(x.flatten(-2)), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(low.variance.double(), ref.variance.unflatten(-1, (2, 2)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(low.entropy().double(), ref.entropy(), rtol=1e-4, atol=1e-2)
    loc, _, diag = lowrank_params()
    zero = LowRankPlusDiagNormal(loc, torch.zeros(B, M, N, 0, **f64), diag)
    independent = dist.Normal(loc, diag.sqrt()).to_event(2)
    torch.testing.assert_close(zero.log_prob(loc + 1), independent.log_prob(loc + 1))
    torch.testing.assert_close(zero.variance, diag)
    assert zero.rsample((3,)).shape == (3, B, M, N)


def test_mixed_dtypes_and_a_bool_event_dim_are_refused():
    p = mnk_params()
    with pytest.raises(ValueError, match="share a dtype"):
        MatrixNormalKronecker(**{**p, "col_diag": p["col_diag"].float()})
    loc, factor, diag = lowrank_params()
    with pytest.raises(ValueError, match="share a dtype"):
        LowRankPlusDiagNormal(loc, factor.float(), diag)
    with pytest.raises(ValueError, match="event_dim"):
        LowRankPlusDiagNormal(loc, factor, diag, event_dim=True)


def test_diagonal_normal_kl_sums_in_float64():
    """KL(Normal || MNK) over a 64 x 700 event in float16: the Normal side's log-determinant overflowed to inf."""
    m, n = 64, 700
    half = dict(dtype=torch.float16)
    normal = dist.Normal(torch.zeros(m, n, **half), torch.full((m, n), 0.09, **half)).to_event(2)
    mnk = MatrixNormalKronecker(torch.zeros(m, n, **half), torch.zeros(m, 1, **half), torch.ones(m, **half),
                                torch.zeros(n, 1, **half), torch.full((n,), 0.1, **half))
    # both diagonal: KL = sum over entries of log(s_q / s_p) + s_p^2 / (2 s_q^2) - 1/2, with float16's rounded scales
    s_p, s_q = torch.tensor(0.09, **half).double(), torch.tensor(0.1, **half).double()
    exact = m * n * (torch.log(s_q / s_p) + s_p**2 / (2 * s_q**2) - 0.5)
    for kl, ref in ((kl_divergence(normal, mnk), exact), (kl_divergence(mnk, normal), m * n * (torch.log(s_p / s_q) + s_q**2 / (2 * s_p**2) - 0.5))):
        assert kl.dtype == torch.float16
        torch.testing.assert_close(kl.double(), ref, rtol=2e-3, atol=0)


def test_woodbury_refuses_a_diagonal_it_cannot_evaluate(monkeypatch):
    """Above the dense size, a diagonal entry 1e-16 of its row of W W^T (SWAG's var_clamp on a never-moved entry) made
    Woodbury give a KL of 157.6 for 355.2: refused with the remedy; the dense factorisation evaluates it."""
    g = torch.Generator().manual_seed(7)
    loc, w = torch.zeros(300, **f64), torch.randn(300, 8, generator=g, **f64)
    d = torch.ones(300, **f64)
    d[:5] = 1e-16
    monkeypatch.setattr(distributions, "_DENSE_MAX", 256)
    with pytest.raises(ValueError, match="floor the diagonal"):
        LowRankPlusDiagNormal(loc, w, d, event_dim=1).log_prob(loc)
    monkeypatch.setattr(distributions, "_DENSE_MAX", 1024)
    normal = dist.Normal(loc, torch.ones(300, **f64)).to_event(1)
    dense = MultivariateNormal(loc, w @ w.T + torch.diag(d))
    torch.testing.assert_close(kl_divergence(normal, LowRankPlusDiagNormal(loc, w, d, event_dim=1)),
                               kl_divergence(MultivariateNormal(loc, torch.eye(300, **f64)), dense), rtol=1e-6, atol=1e-6)


def test_a_diagonal_that_is_not_positive_or_entries_not_finite_are_refused_with_validation_off():
    """fit runs without torch's argument validation: one negative variance among 1100 gave log_prob and entropy NaN,
    and W W^T + diag(d) = 9 - 1 the log-density of N(0, 8) while rsample drew NaN."""
    g = torch.Generator().manual_seed(0)
    w, d = torch.randn(1100, 2, generator=g, **f64), torch.rand(1100, generator=g, **f64) + 0.1
    for loc, factor, diag in ((torch.zeros(1100, **f64), w, d.index_fill(0, torch.tensor([0]), -0.05)),
                              (torch.zeros(1, **f64), torch.tensor([[3.0]], **f64), torch.tensor([-1.0], **f64)),
                              (torch.zeros(1100, **f64), w, d.index_fill(0, torch.tensor([3]), math.nan)),
                              (torch.zeros(1100, **f64), w.index_fill(0, torch.tensor([3]), math.inf), d)):
        q = LowRankPlusDiagNormal(loc, factor, diag, event_dim=1, validate_args=False)
        for evaluate in (lambda: q.log_prob(loc), q.entropy):
            with pytest.raises(ValueError, match="not positive or entries that are not finite"):
                evaluate()


def test_woodbury_holds_the_log_density_at_its_own_samples_with_a_diagonal_far_below_its_rows():
    """1100 rows (no dense factor), each diagonal entry 1.1e-12 of its row of W W^T: diag(1/d) v - U U^T v lost 0.35 to
    0.9 nats at the distribution's own samples; the whitening's sum of squares holds the 50-digit value."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1100, 4, generator=g, **f64)
    d = w.pow(2).sum(-1) * 1.1e-12
    q = LowRankPlusDiagNormal(torch.zeros(1100, **f64), w, d, event_dim=1)
    x = q.sample()
    ws, ds, xs = ([[mpmath.mpf(v) for v in row] for row in w.tolist()], [mpmath.mpf(v) for v in d.tolist()],
                  [mpmath.mpf(v) for v in x.tolist()])
    # Woodbury in 50 digits: v^T K^-1 v = sum v^2/d - b^T C^-1 b, b = W^T diag(1/d) v, C = I + W^T diag(1/d) W
    b = mpmath.matrix([mpmath.fsum(r[a] * v / s for r, v, s in zip(ws, xs, ds)) for a in range(4)])
    cap = mpmath.eye(4) + mpmath.matrix([[mpmath.fsum(r[a] * r[c] / s for r, s in zip(ws, ds)) for c in range(4)]
                                         for a in range(4)])
    maha = mpmath.fsum(v * v / s for v, s in zip(xs, ds)) - (b.T * mpmath.lu_solve(cap, b))[0]
    logdet = mpmath.fsum(mpmath.log(s) for s in ds) + mpmath.log(mpmath.det(cap))
    exact = -0.5 * (1100 * mpmath.log(2 * mpmath.pi) + logdet + maha)
    assert abs(float(q.log_prob(x)) - float(exact)) < 1e-3


def test_a_diagonal_far_below_every_row_and_a_round_off_negative_eigenvalue_are_never_evaluated_wrongly(factorization):
    """W = 1 beside d = 1e-40: the residual v - W z cancelled to a log-density of -9.9e8 for -4.17 (the capacitance is
    well conditioned); a row of W in units of 1e9 gave the capacitance a computed eigenvalue of -2260 (a negative
    condition number passed the check): entropy off by 5.8 nats. Both hold the 50-digit value now, through the
    dense Cholesky (refused without it), and 1000 rows with a diagonal 1e-28 of each are refused."""
    mpmath = pytest.importorskip("mpmath")
    held = contextlib.nullcontext() if factorization == "dense" else pytest.raises(ValueError, match="floor the diagonal")
    mpmath.mp.dps = 50
    v = -2.549735406539597
    tiny = LowRankPlusDiagNormal(torch.zeros(1, **f64), torch.ones(1, 1, **f64), torch.tensor([1e-40], **f64), event_dim=1)
    k = 1 + mpmath.mpf(1e-40)
    exact = -0.5 * (mpmath.log(2 * mpmath.pi) + mpmath.log(k) + mpmath.mpf(v) ** 2 / k)
    with held:
        assert abs(float(tiny.log_prob(torch.tensor([v], **f64))) - float(exact)) < 1e-9
    rows = [["0x1.bd8036e084b47p+30", "-0x1.74a71a4298920p+31", "0x1.96a9f46e2ea65p+31"],
            ["0x1.3e0f35f3ecfd5p+0", "0x1.716473d70e091p+1", "0x1.79850f0627171p-1"]]
    w = torch.tensor([[float.fromhex(x) for x in r] for r in rows], **f64)
    assert torch.linalg.eigvalsh(torch.eye(3, **f64) + w.T @ w)[0] < 0  # the round-off the check must see through
    wm = mpmath.matrix(w.tolist())
    logdet = mpmath.log(mpmath.det(wm * wm.T + mpmath.eye(2)))
    q = LowRankPlusDiagNormal(torch.zeros(2, **f64), w, torch.ones(2, **f64), event_dim=1)
    with held:
        assert abs(float(q.entropy()) - float(0.5 * (2 * (1 + mpmath.log(2 * mpmath.pi)) + logdet))) < 1e-6
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 3, generator=g, **f64)
    with pytest.raises(ValueError, match="floor the diagonal"):
        LowRankPlusDiagNormal(torch.zeros(1000, **f64), w, 1e-28 * w.pow(2).sum(-1), event_dim=1).log_prob(torch.zeros(1000, **f64))


def test_a_kl_against_a_diagonal_far_below_its_rows_keeps_its_trace_term():
    """q's diagonal 1e-11 of each of its rows (50 in the report, 24 here): the precision's diagonal from a dense
    Cholesky lost 2.4e-6 of a KL of 3.8e12 (9e6 nats); the whitening's sum of squares holds the 50-digit value to
    round-off."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    g = torch.Generator().manual_seed(5)
    m = 24
    wp, wq = torch.randn(m, 8, generator=g, **f64), torch.randn(m, 8, generator=g, **f64)
    dp, mup, muq = torch.rand(m, generator=g, **f64) + 0.5, torch.randn(m, generator=g, **f64), torch.randn(m, generator=g, **f64)
    dq = 1e-11 * wq.pow(2).sum(-1)
    p, q = (LowRankPlusDiagNormal(mu, w, d, event_dim=1) for mu, w, d in ((mup, wp, dp), (muq, wq, dq)))

    def cov(w, d):
        w = mpmath.matrix(w.tolist())
        return w * w.T + mpmath.diag([mpmath.mpf(x) for x in d.tolist()])

    kp, kq = cov(wp, dp), cov(wq, dq)
    qi = mpmath.inverse(kq)
    delta = mpmath.matrix((mup - muq).tolist())
    exact = 0.5 * (sum((qi * kp)[i, i] for i in range(m)) + (delta.T * qi * delta)[0] - m
                   + mpmath.log(mpmath.det(kq)) - mpmath.log(mpmath.det(kp)))
    assert abs(float(kl_divergence(p, q)) - float(exact)) <= 1e-12 * float(exact)


def test_isotropic_normal_refuses_a_value_of_another_shape_and_a_scale_whose_square_underflows():
    """A [3, 1] value against a 3 x 4 prior broadcast to a finite -11.03; a float32 scale of 1e-30 (its square 0) gave
    log_prob NaN."""
    prior = isotropic_normal((3, 4), 1.0)
    for value in (torch.zeros(3, 1), torch.zeros(4)):
        with pytest.raises(ValueError, match=r"to_event\(2\).log_prob: the value's shape .* event shape \(3, 4\)"):
            prior.log_prob(value)
    assert prior.expand((2,)).log_prob(torch.zeros(5, 2, 3, 4)).shape == (5, 2)
    for scale in (1e-30, torch.tensor([1.0, 1e-25]), 1e20):  # 1e20's square is inf in float32
        with pytest.raises(ValueError, match="squares to 0 or inf in float32"):
            isotropic_normal((2,), scale)
    assert type(prior).__name__ == "Independent"  # a prior's class is part of LoraModel.settings(), which a resume compares
    import pickle

    again = pickle.loads(pickle.dumps(prior))  # the renamed class pickled as torch's Independent was refused
    assert again.log_prob(torch.ones(3, 4)).item() == prior.log_prob(torch.ones(3, 4)).item()
    with pytest.raises(ValueError, match="does not end in the event shape"):
        again.log_prob(torch.zeros(3, 1))
    assert isotropic_normal((2,), torch.tensor(1e-30, **f64)).log_prob(torch.zeros(2, **f64)).item() == pytest.approx(
        2 * (-0.5 * math.log(2 * math.pi) - math.log(1e-30)))


def test_a_shape_checked_normal_keeps_its_check_through_to_event_mask_and_expand():
    """Pyro's to_event unwraps an Independent into a plain one over its Normal: a [3, 1] value against the 2 x 3 x 4
    event of checked_normal(...).to_event(1) gave a finite -22.05."""
    d = checked_normal(torch.zeros(2, 3, 4), torch.ones(2, 3, 4), 2)
    for wider in (d.to_event(1), d.to_event(), d.mask(True), d.expand((5, 2)), d.to_event(1).to_event(0)):
        with pytest.raises(ValueError, match="does not end in the event shape"):
            wider.log_prob(torch.zeros(3, 1))
    wide = d.to_event(1)
    assert wide.event_shape == (2, 3, 4) and type(wide).__name__ == "Independent"
    assert wide.log_prob(torch.zeros(2, 3, 4)).item() == pytest.approx(-12 * math.log(2 * math.pi))
    assert d.to_event(-2).log_prob(torch.zeros(2, 3, 4)).shape == (2, 3, 4)  # a plain Normal: nothing left to check


def test_isotropic_normal_checks_tensor_scales_and_makes_a_float_prior_of_an_int():
    """A tensor scale of 0, -1 or inf was accepted (log_prob nan), an int scale made an int64 Normal that cannot sample."""
    for bad in (torch.tensor(0.0), torch.tensor(-1.0), torch.tensor(math.inf), torch.tensor([[0.5], [0.0]]), True):
        with pytest.raises(ValueError, match="scale must be finite and positive"):
            isotropic_normal((2, 3), bad)
    prior = isotropic_normal((2, 3), 1)
    assert prior.sample().dtype == torch.get_default_dtype()
    assert prior.log_prob(torch.zeros(2, 3)).item() == pytest.approx(-3 * math.log(2 * math.pi))


def _prior_model(prior):
    from conftest import tiny_bert

    from pyro_lora import LoraModel, SequenceClassification

    return LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=prior, num_data=6)


def test_a_prior_off_the_real_line_or_a_bare_distribution_is_refused_by_name():
    """A Gamma prior gave +1.1 for A matrices half negative (log-density -inf) and fit trained on; a Pyro distribution
    object, being callable, failed with "'Site' object is not iterable"."""
    from torch.distributions.transforms import AffineTransform

    shifted = lambda s, base: dist.TransformedDistribution(base(s), [AffineTransform(-0.5, 1.0)]).to_event(len(s.shape))  # noqa: E731
    for family in (lambda s: dist.Gamma(torch.ones(s.shape), 1.0).to_event(len(s.shape)),
                   lambda s: dist.Uniform(-torch.ones(s.shape), torch.ones(s.shape)).to_event(len(s.shape)),
                   # torch gives an affine image of a Gamma the transform's codomain (real) as its support
                   lambda s: shifted(s, lambda s: dist.Gamma(torch.ones(s.shape), 1.0))):
        with pytest.raises(ValueError, match="LoRA matrices take any real values"):
            _prior_model(family)
    # over the reals, built from bases that are not (torch's Gumbel over a Uniform, a logistic, a log-Gamma): accepted
    from torch.distributions.transforms import ExpTransform, SigmoidTransform

    for family in (lambda s: shifted(s, lambda s: dist.Normal(torch.zeros(s.shape), 1.0)),
                   lambda s: dist.Gumbel(torch.zeros(s.shape), 0.1).to_event(len(s.shape)),
                   lambda s: dist.TransformedDistribution(dist.Uniform(torch.zeros(s.shape), 1.0),
                                                          [SigmoidTransform().inv, AffineTransform(0.0, 0.1)]).to_event(len(s.shape)),
                   lambda s: dist.TransformedDistribution(dist.Gamma(torch.ones(s.shape), 1.0),
                                                          [ExpTransform().inv]).to_event(len(s.shape))):
        _prior_model(family)
    for bare in (dist.Normal(0.0, 1.0), torch.distributions.Normal(0.0, 1.0)):
        with pytest.raises(ValueError, match=r"give a callable, e.g. lambda site"):
            _prior_model(bare)
    model = _prior_model(lambda s: dist.StudentT(3.0, torch.zeros(s.shape), 1.0).to_event(len(s.shape)))
    assert all(model.prior_distribution(s).event_shape == s.shape for s in model.sites.values())


def test_fit_refuses_a_prior_reading_a_pyro_param_it_would_never_train():
    """fit's optimizer holds the guide's and network's parameters: a learned prior scale stayed at 1.0 without a word."""
    from test_training import toy_data

    from pyro_lora import fit
    from pyro_lora.guides import MAPGuide

    pyro.clear_param_store()
    model = _prior_model(lambda s: isotropic_normal(s.shape, pyro.param("tau", torch.tensor(1.0),
                                                                         constraint=dist.constraints.positive)))
    with pytest.raises(ValueError, match="the prior reads the Pyro param 'tau'"):
        fit(model, MAPGuide(model), toy_data(), progress=False)
    pyro.clear_param_store()


def test_a_hierarchical_priors_latent_named_after_its_weight_site_can_be_conditioned_on():
    """A prior drawing its own scale as "tau.<site>" (a name ending like a weight site's) was refused once conditioned
    on, as values "for weight sites this model does not have ... drawn for another model"."""
    from conftest import random_batch

    def prior(site):
        tau = pyro.sample(f"tau.{site.name}", dist.LogNormal(0.0, 1.0))
        return dist.Normal(torch.zeros(site.shape), tau).to_event(len(site.shape))

    model = _prior_model(prior)
    values = {n: torch.full(s.shape, 0.1) for n, s in model.sites.items()}
    values.update({f"tau.{n}": torch.tensor(0.5) for n in model.sites})
    trace = pyro.poutine.trace(pyro.poutine.condition(model, data=values)).get_trace(random_batch())
    trace.compute_log_prob()
    for name, site in model.sites.items():
        assert trace.nodes[name]["log_prob_sum"].item() == pytest.approx(
            site.numel * (-0.5 * math.log(2 * math.pi) - math.log(0.5) - 0.5 * (0.1 / 0.5) ** 2), rel=1e-5)
        assert trace.nodes[f"tau.{name}"]["log_prob_sum"].item() == pytest.approx(
            -math.log(0.5) - 0.5 * math.log(2 * math.pi) - 0.5 * math.log(0.5) ** 2, rel=1e-6)
    foreign = {**values, "query.other.lora_A": torch.zeros(1)}  # a weight site no part of the model samples
    with pytest.raises(ValueError, match="weight sites this model does not have"):
        pyro.poutine.trace(pyro.poutine.condition(model, data=foreign)).get_trace(random_batch())


def test_kfac_normal_at_full_rank_and_a_tiny_prior_has_the_dense_variance_and_sample_covariance():
    """With U square (every direction kept) the complement is empty, yet float32 U left |U_d|^2 about 6e-8 off 1, which
    the variance divided by rest = lambda: -9.74 where the dense inverse gives +1.34 at lambda = 1e-8; a draw leaked
    the same rounding, scaled by 1 / sqrt(lambda)."""
    from pyro_lora.distributions import KFACNormal

    r, D = 2, 6
    gen = torch.Generator().manual_seed(0)
    v = torch.linalg.qr(torch.randn(1, r, r, generator=gen, **f64)).Q.float()
    u = torch.linalg.qr(torch.randn(1, D, D, generator=gen, **f64)).Q.float()  # float32 rounding: |U_d|^2 != 1
    e, s = torch.tensor([[3.0, 1.0]]), torch.logspace(1, 4, D).view(1, D).float()
    lam = torch.tensor([1e-11])
    d = KFACNormal(torch.zeros(1, r, D), v, e, u, s, torch.zeros(1), lam, transposed=False)
    v64, u64 = torch.linalg.qr(v[0].double()).Q, torch.linalg.qr(u[0].double()).Q
    row = v64 @ torch.diag(e[0].double()) @ v64.T
    col = u64 @ torch.diag(s[0].double()) @ u64.T
    dense = torch.linalg.inv(torch.kron(row, col) + 1e-11 * torch.eye(r * D, **f64)).diagonal().view(1, r, D)
    torch.testing.assert_close(d.variance.double(), dense, rtol=1e-5, atol=0)
    torch.manual_seed(1)
    draws = d.sample((40000,)).double()
    torch.testing.assert_close(draws.pow(2).mean(0), dense, rtol=0.05, atol=0)  # 40000 draws: 1.4% standard error
