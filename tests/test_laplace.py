"""KFAC Laplace guide: factors against dense Fisher / GGN, evidence, GLM predictive, sampling, save/load."""

import copy
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import pairwise_probit_reference, random_batch, tiny_bert, tiny_llama
from peft import LoraConfig, get_peft_model
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_lora.guides.laplace import LaplaceGuide
from pyro_lora import load_guide, predict, save_guide
from pyro_lora.likelihoods import CausalLM, MultipleChoice, SequenceClassification
from pyro_lora.loraxs import LoraXSModel
from pyro_lora.model import LoraModel

# ---------------------------------------------------------------- tiny networks and data


class _MLP(torch.nn.Module):
    """logits = fc2(tanh(fc1(x))): one token per example, so KFAC is exact for a single example."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 5)
        self.fc2 = torch.nn.Linear(5, 3)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.fc2(torch.tanh(self.fc1(input_ids))))


def mlp_model(seed=0):
    torch.manual_seed(seed)
    net = get_peft_model(_MLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return LoraModel(net.eval(), SequenceClassification())


def mlp_data(n=4, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": x[i : i + batch], "labels": y[i : i + batch]} for i in range(0, n, batch)]


def bert_model(num_labels=3):
    return LoraModel(tiny_bert(r=2, num_labels=num_labels), SequenceClassification())


def bert_data(lengths=(7, 5, 4), seed=2, num_labels=3):
    """One right-padded batch of sequences of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, 64, (len(lengths), t), generator=g) * mask
    return [{"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, num_labels, (len(lengths),), generator=g)}]


def llama_mc():
    model = LoraModel(tiny_llama(r=2), MultipleChoice(answer_token_ids=[5, 6, 7, 8]))
    b = random_batch(left_pad=2)
    b["choice_mask"] = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    b["labels"] = torch.tensor([2, 3, 0])
    return model, [b]


# ---------------------------------------------------------------- dense references


def dense_factors(f):
    """The fitted Kronecker factors of one site as dense matrices: E ``[L, r, r]``, Lambda ``[L, D, D]``."""
    e = f.small_vecs @ torch.diag_embed(f.small_vals) @ f.small_vecs.mT
    u = f.large_vecs
    lam = u @ torch.diag_embed(f.large_vals) @ u.mT + f.large_rest[:, None, None] * (torch.eye(u.shape[-2]) - u @ u.mT)
    return e, lam


def site_kron(f, small, large):
    """``[L, P, P]`` Kronecker products in the site's own row-major order (B sites are stored transposed)."""
    k = torch.stack([torch.kron(s, l) for s, l in zip(small, large)])
    if f.transposed:
        r, d = small.shape[-1], large.shape[-1]
        perm = torch.arange(r * d).reshape(r, d).T.reshape(-1)
        k = k[:, perm][:, :, perm]
    return k


def dense_fisher(guide):
    """Site -> ``[L, P, P]``: the KFAC Fisher ``E (x) Lambda`` of every LoRA matrix."""
    return {name: site_kron(f, *dense_factors(f)) for name, f in zip(guide.sites, guide.factors)}


def dense_precision(guide):
    """The whole posterior precision, block-diagonal over matrices, in site / layer / row-major order."""
    blocks = []
    for f, fisher in zip(guide.factors, dense_fisher(guide).values()):
        blocks += [b + lam * torch.eye(b.shape[0]) for b, lam in zip(fisher, f.prior_precision)]
    return torch.block_diag(*blocks)


def jacobian(model, guide, batch):
    """Logits ``[N, C]`` at the posterior mean and their Jacobian ``[N, C, P]`` w.r.t. all site values."""
    values = {k: v.detach().clone().requires_grad_() for k, v in guide.mean().items()}
    logits = model.logits(batch, values)
    n, c = logits.shape
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(logits[i, j], list(values.values()), retain_graph=True)])
        for i in range(n)
        for j in range(c)
    ]
    return logits.detach(), torch.stack(rows).reshape(n, c, -1)


def dense_ggn(model, guide, data):
    """``sum_n J_n^T (diag p_n - p_n p_n^T) J_n``: the exact Fisher of the whole LoRA parameter vector."""
    total = 0
    for batch in data:
        logits, jac = jacobian(model, guide, batch)
        p = torch.softmax(logits, -1).nan_to_num()
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        total = total + torch.einsum("ncp,ncd,ndq->pq", jac, h, jac)
    return total


def site_blocks(guide, matrix):
    """Split a ``[P, P]`` matrix into its diagonal blocks: site -> ``[L, P_l, P_l]``."""
    out, start = {}, 0
    for name, f in zip(guide.sites, guide.factors):
        layers = f.prior_precision.numel()
        size = f.loc.numel() // layers
        blocks = [slice(start + i * size, start + (i + 1) * size) for i in range(layers)]
        out[name] = torch.stack([matrix[b, b] for b in blocks])
        start += f.loc.numel()
    return out


def test_kfac_equals_exact_ggn_for_one_example():
    model = mlp_model()
    data = mlp_data(n=1, batch=1)
    guide = LaplaceGuide(model, fisher="exact").fit(data, progress=False)
    ggn = site_blocks(guide, dense_ggn(model, guide, data))
    for name, kfac in dense_fisher(guide).items():
        torch.testing.assert_close(kfac, ggn[name], rtol=1e-4, atol=1e-6)
        assert ggn[name].abs().max() > 1e-3


def test_one_token_bert_kfac_equals_exact_ggn():
    model = bert_model()
    data = bert_data(lengths=(1,))
    guide = LaplaceGuide(model, fisher="exact", rank=32).fit(data, progress=False)
    ggn = site_blocks(guide, dense_ggn(model, guide, data))
    for name, kfac in dense_fisher(guide).items():
        torch.testing.assert_close(kfac, ggn[name], rtol=1e-3, atol=1e-5)


def test_kfac_sums_gradients_and_averages_activations_over_examples_and_batches():
    model = mlp_model()
    data = mlp_data(n=4, batch=2)
    whole = LaplaceGuide(model, fisher="exact").fit(data, progress=False)
    singles = [LaplaceGuide(model, fisher="exact").fit(mlp_data(n=4, batch=1)[i : i + 1], progress=False) for i in range(4)]
    for i, (name, f) in enumerate(zip(whole.sites, whole.factors)):
        parts = [dense_factors(s.factors[i]) for s in singles]
        small, large = (torch.stack(p).sum(0) for p in zip(*parts))
        # one example: the activation side is exactly a a^T; the total averages it and sums the gradient side
        small, large = (small / 4, large) if f.transposed else (small, large / 4)
        torch.testing.assert_close(dense_fisher(whole)[name], site_kron(f, small, large), rtol=1e-4, atol=1e-6)
    assert whole.num_data == 4


def test_mc_fisher_is_unbiased():
    model = mlp_model()
    one = mlp_data(n=1, batch=1)[0]
    many = [{"input_ids": one["input_ids"].expand(4000, -1), "labels": one["labels"].expand(4000)}]
    exact = dense_fisher(LaplaceGuide(model, fisher="exact").fit([one], progress=False))
    mc = dense_fisher(LaplaceGuide(model, fisher="mc").fit(many, progress=False))
    for name in exact:
        err = (mc[name] / 4000 - exact[name]).norm() / exact[name].norm()
        assert err < 0.1, (name, err)


@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_logits_holding_nan_are_refused_by_name_not_in_a_raw_eigh_error(fisher):
    """A network giving NaN logits died in torch.linalg's "eigh failed to converge"."""
    model = mlp_model()
    with torch.no_grad():
        model.net.base_model.model.fc2.base_layer.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"^the network's logits at the posterior mean hold nan or inf on a batch"):
        LaplaceGuide(model, fisher=fisher).fit(mlp_data(n=4, batch=4), progress=False)


@pytest.mark.parametrize("kfac", ["reduce", "expand"])
def test_padding_does_not_change_the_factors(kfac):
    model = bert_model()
    padded = bert_data(lengths=(7, 5, 4))
    b = padded[0]
    alone = [{k: v[i : i + 1, : n] if v.dim() == 2 else v[i : i + 1] for k, v in b.items()} for i, n in enumerate((7, 5, 4))]
    one = LaplaceGuide(model, fisher="exact", rank=32, kfac=kfac).fit(padded, progress=False)
    split = LaplaceGuide(model, fisher="exact", rank=32, kfac=kfac).fit(alone, progress=False)
    for name, f in dense_fisher(one).items():
        torch.testing.assert_close(f, dense_fisher(split)[name], rtol=1e-4, atol=1e-6)


def test_reduce_and_expand_differ_on_sequences_and_agree_on_one_token():
    model = mlp_model()
    data = mlp_data()
    a, b = (dense_fisher(LaplaceGuide(model, fisher="exact", kfac=k).fit(data, progress=False)) for k in ("reduce", "expand"))
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    model = bert_model()
    a, b = (
        dense_fisher(LaplaceGuide(model, fisher="exact", rank=32, kfac=k).fit(bert_data(), progress=False))
        for k in ("reduce", "expand")
    )
    assert all((a[n] - b[n]).norm() > 1e-3 * a[n].norm() for n in a)


def test_low_rank_factor_converges_to_the_full_one():
    model = bert_model()
    data = bert_data(lengths=(7, 7, 6, 5, 3, 2))
    # reference for the A sites' D side: mean over sequences of (mean token input)(...)^T, from plain hooks
    inputs = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, p=p: inputs.__setitem__(p, a[0])) for p, layer in model.layers.items()]
    model.logits(data[0], model.adapter_values())
    for h in hooks:
        h.remove()
    mask = data[0]["attention_mask"][..., None].float()
    errors = {}
    for rank in (1, 3, 8, 32):
        guide = LaplaceGuide(model, fisher="exact", rank=rank).fit(data, progress=False)
        for name, f in zip(guide.sites, guide.factors):
            if f.transposed:
                continue
            x = torch.stack([(inputs[p] * mask).sum(1) / mask.sum(1) for p in model.sites[name].layers])
            reference = x.mT @ x / x.shape[1]
            large = dense_factors(f)[1]
            torch.testing.assert_close(large.diagonal(dim1=-2, dim2=-1).sum(-1), reference.diagonal(dim1=-2, dim2=-1).sum(-1))
            errors.setdefault(name, []).append(float((large - reference).norm() / reference.norm()))
    for name, errs in errors.items():
        assert errs[0] > errs[1] > errs[2] > errs[3], (name, errs)
        assert errs[3] < 1e-4


# ---------------------------------------------------------------- evidence and prior precision


def test_counts_are_checked_as_predict_checks_them():
    from pyro_lora.checks import check_count

    model = bert_model()
    data = bert_data()
    guide = LaplaceGuide(model).fit(data, progress=False)
    for bad in (0, -1, 2.5, True, "4", None):
        with pytest.raises(ValueError) as expected:
            check_count(bad, "num_samples")
        message = str(expected.value)
        assert "num_samples must be a positive integer" in message
        with pytest.raises(ValueError) as got:  # 0 gave all-nan probabilities, -1 and 2.5 torch errors
            guide.predict_glm(data, link="mc", num_samples=bad)
        assert str(got.value) == message
        with pytest.raises(ValueError, match="num_samples must be a positive integer"):
            predict(model, guide, data, num_samples=bad)  # the batched predictive says the same
        with pytest.raises(ValueError, match="num_samples must be a positive integer"):
            guide.optimize_prior_precision("val_nll", val_loader=data, grid=[1.0], predictive="samples", num_samples=bad)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="max_iter must be a positive integer"):
            guide.optimize_prior_precision("marglik", max_iter=bad)
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            LaplaceGuide(model, rank=bad)
        with pytest.raises(ValueError, match=r"sketch must be an integer >= 2 \(at least rank\)"):
            LaplaceGuide(model, rank=2, sketch=bad)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LaplaceGuide(model, rank=True)
    with pytest.raises(ValueError, match=r"sketch must be an integer >= 4 \(at least rank\), got 3"):
        LaplaceGuide(model, rank=4, sketch=3)
    assert LaplaceGuide(model, rank=torch.tensor(3).numpy()[()], sketch=8).rank == 3  # numpy integers are integers
    mc = guide.predict_glm(data, link="mc", num_samples=3, keep_samples=True)
    assert mc.sample_probs.shape[0] == 3 and bool(torch.isfinite(mc.probs).all())


# ---------------------------------------------------------------- predictive and posterior


@pytest.mark.parametrize("net", ["bert", "llama_mc"])
def test_glm_covariance_matches_dense(net):
    model, data = (bert_model(), bert_data()) if net == "bert" else llama_mc()
    guide = LaplaceGuide(model, fisher="exact", rank=3).fit(data, progress=False)
    guide.set_prior_precision({n: torch.linspace(1e-3, 3e-3, f.prior_precision.numel()) for n, f in zip(guide.sites, guide.factors)})
    batch = data[0]
    logits, jac = jacobian(model, guide, batch)
    cov = torch.einsum("ncp,pq,ndq->ncd", jac, torch.linalg.inv(dense_precision(guide).double()).float(), jac)
    mean, glm_cov = guide.glm_logits(batch)
    torch.testing.assert_close(mean, logits)
    assert glm_cov.dtype == torch.double
    torch.testing.assert_close(glm_cov.float(), cov, rtol=1e-3, atol=1e-6)
    assert cov.diagonal(dim1=-2, dim2=-1).max() > 1e-3
    probs = guide.predict_glm(data).probs
    torch.testing.assert_close(probs, pairwise_probit_reference(logits, cov), rtol=1e-4, atol=1e-6)
    mc = guide.predict_glm(data, link="mc", num_samples=20000, keep_samples=True)
    assert mc.sample_probs.shape == (20000, *probs.shape)
    eye = torch.eye(cov.shape[-1])
    noise = torch.distributions.MultivariateNormal(torch.zeros(cov.shape[-1]), cov + 1e-8 * eye).sample((20000,))
    torch.testing.assert_close(mc.probs, torch.softmax(logits + noise, -1).mean(0), rtol=0, atol=0.015)
    # the probit predictive with its logit draws kept (the mutual information's): its probabilities stay the probit's
    kept = guide.predict_glm(data, num_samples=20000, keep_samples=True)
    torch.testing.assert_close(kept.probs, probs)
    assert kept.sample_probs.shape == (20000, *probs.shape)
    torch.testing.assert_close(kept.sample_probs.mean(0), mc.probs, rtol=0, atol=0.015)
    if net == "llama_mc":  # missing choices keep probability zero
        assert probs[0, 3] == 0 and probs[2, 2:].sum() == 0 and mc.probs[2, 2:].sum() == 0
        assert kept.sample_probs[:, 2, 2:].sum() == 0


def test_glm_draws_ignore_the_logit_shift_softmax_ignores():
    """A variance along (1, ..., 1) (a head's rows moving together, bounded by the prior alone) does not change a
    softmax: the draws' probabilities are those without it, not float32 rounding noise (MI 0.38 instead of 0.10)."""
    from pyro_lora import metrics as M
    from pyro_lora.kfac import glm_predict

    g = torch.Generator().manual_seed(3)
    mean = torch.randn(4, 3, generator=g)
    root = torch.randn(4, 3, 3, generator=g)
    cov = (root @ root.mT).double()  # as last-layer Laplace gives it
    shifted = cov + 1e8 * torch.ones(3, 3, dtype=torch.double)
    batch = {"labels": torch.tensor([0, 1, 2, 0])}
    a, b = (glm_predict([batch], lambda _: (mean, c), lambda b: b["labels"], num_samples=4000, keep_samples=True).sample_probs
            for c in (cov, shifted))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    torch.testing.assert_close(M.mutual_information(b), M.mutual_information(a), rtol=0, atol=1e-4)
    # and they are draws of N(mean, cov): their average against a float64 Monte Carlo of the same Gaussian
    noise = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.double), cov).sample((40000,))
    torch.testing.assert_close(a.mean(0).double(), torch.softmax(mean.double() + noise, -1).mean(0), rtol=0, atol=0.02)


@pytest.mark.parametrize("variance", [float("inf"), 1e100])
def test_probit_keeps_its_predictive_where_the_draws_overflow(variance):
    """An infinite variance, or a finite float64 one whose root is beyond float32 (last-layer Laplace's at lambda
    1e-200: its kept draws were nan, silently): the probit predictive copes (uniform in the limit), logit draws
    cannot; the MI is then n/a, said by a warning, instead of failing the probit predictive or keeping nan."""
    from pyro_lora.kfac import glm_predict

    mean = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    cov = torch.tensor([[[variance, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]], dtype=torch.double)
    batch = {"labels": torch.tensor([0, 1])}
    with pytest.warns(UserWarning, match="mutual information is n/a"):
        kept = glm_predict([batch], lambda b: (mean, cov), lambda b: b["labels"], keep_samples=True)
    plain = glm_predict([batch], lambda b: (mean, cov), lambda b: b["labels"])
    assert kept.sample_probs is None
    torch.testing.assert_close(kept.probs, plain.probs)
    with pytest.raises(ValueError, match="not finite"):
        glm_predict([batch], lambda b: (mean, cov), lambda b: b["labels"], link="mc")


def test_the_probit_drifting_from_the_glm_predictive_is_warned_of():
    """With a large, anisotropic logit covariance the probit flattens the GLM predictive (m = 0, S = diag(100, 0.01,
    0.01): draws give (0.472, 0.264, 0.264), the probit 1/3 each) and the reported laplace / llla / mola rows were
    those of the flatter predictive without a word. The reference: float64 draws of the same Gaussian."""
    from pyro_lora.kfac import glm_predict

    mean = torch.zeros(300, 3)
    cov = (0.01 * torch.eye(3)).expand(300, 3, 3).clone().double()
    cov[0] = torch.diag(torch.tensor([100.0, 0.01, 0.01]))
    cov[299] = cov[0]  # beyond the 256 examples checked
    batch = {"labels": torch.zeros(300, dtype=torch.long)}
    noise = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.double), cov[0]).sample((200000,))
    gap = float((torch.softmax(noise, -1).mean(0) - 1 / 3).abs().max())
    assert 0.13 < gap < 0.15
    with pytest.warns(UserWarning, match=r"the probit link's probabilities are up to 0\.1\d from 1000 draws of the same logit "
                                         r"Gaussians on 1 of the 256 examples checked \(more than 0\.1\).*link='mc' follows"):
        probit = glm_predict([batch], lambda b: (mean, cov), lambda b: b["labels"])
    torch.testing.assert_close(probit.probs, torch.full((300, 3), 1 / 3))  # the probit's own, kept
    # many classes, an isotropic covariance: the probit understates the top class (0.51 where draws give 0.67)
    many, spread = torch.zeros(1, 20), 3.0 * torch.eye(20, dtype=torch.double).unsqueeze(0)
    many[0, 0] = 4.0
    drawn = torch.softmax(many.double() + spread[0].sqrt().diagonal() * torch.randn(200000, 20, dtype=torch.double), -1)
    with pytest.warns(UserWarning, match="on 1 of the 1 examples checked .*understating the top class among many"):
        low = glm_predict([{"labels": torch.zeros(1, dtype=torch.long)}], lambda b: (many, spread), lambda b: b["labels"])
    assert float(drawn.mean(0)[0]) - float(low.probs[0, 0]) > 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        glm_predict([batch], lambda b: (mean, cov), lambda b: b["labels"], link="mc")  # the draws are no probit
        glm_predict([batch], lambda b: (mean, cov * 1e-2), lambda b: b["labels"])  # close: nothing to say
        glm_predict([batch], lambda b: (mean[1:], cov[1:]), lambda b: b["labels"][1:])  # the far one unchecked


def test_glm_logit_differences_survive_a_variance_that_shifts_every_logit_alike():
    """Where the prior precision is small, most of a logit's variance is a shift of every logit (softmax gives it no
    curvature): Var(f_c - f_k) is then 1e-5 of Var(f_c), and summed in float32 the covariance had rounded it away
    (-0.008 for 0.015); in float64 with float32's eigenvectors, off by 13%. The reference: the dense J P^-1 J^T of the
    guide's own factors, in float64."""
    model = mlp_model()
    guide = LaplaceGuide(model, fisher="exact", rank=10).fit(mlp_data(n=400, batch=100) * 10, progress=False)
    guide.set_prior_precision(1e-4)
    batch = mlp_data(n=8, batch=8, seed=5)[0]
    _, jac = jacobian(model, guide, batch)
    exact = copy.deepcopy(guide)
    exact.factors.double()
    dense = torch.einsum("ncp,pq,ndq->ncd", jac.double(), torch.linalg.inv(dense_precision(exact)), jac.double())
    _, cov = guide.glm_logits(batch)

    def differences(c):
        v = c.diagonal(dim1=-2, dim2=-1)
        return v.unsqueeze(-1) + v.unsqueeze(-2) - 2 * c

    ratio = dense.diagonal(dim1=-2, dim2=-1).amin(-1) / differences(dense).amax((-1, -2))
    assert ratio.max() > 1e4  # the regime described, on some examples
    off = ~torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(differences(cov)[:, off], differences(dense)[:, off], rtol=1e-5, atol=0)


def test_weight_and_logit_draws_do_not_depend_on_the_order_the_curvature_was_summed_in():
    """Draws in the eigenbasis followed the eigenvectors eigh picks, which change with the summation order: the
    batches reordered (or split across two ranks) gave probabilities 0.018 apart from the same seed."""
    model, data = bert_model(), [bert_data(seed=s)[0] for s in range(2, 8)]
    draws, logits = [], []
    for batches in (data, data[3:] + data[:3]):
        guide = LaplaceGuide(model, fisher="exact", rank=32).fit(batches, progress=False)
        guide.set_prior_precision(1.0)
        torch.manual_seed(0)
        draws.append(guide.sample(3))
        torch.manual_seed(0)
        logits.append(guide.predict_glm(data, link="mc", num_samples=3, keep_samples=True).sample_probs)
    for name in draws[0]:
        torch.testing.assert_close(draws[0][name], draws[1][name], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-5)


def test_samples_and_log_prob_have_the_posterior_covariance():
    model = mlp_model()
    # rank 3 < D on three of the four sites: the low-rank part and the remainder both carry mass
    guide = LaplaceGuide(model, fisher="exact", rank=3, prior_precision=0.01).fit(mlp_data(), progress=False)
    precision = dense_precision(guide).double()
    cov = torch.linalg.inv(precision)
    samples = guide.sample(40000)
    flat = torch.cat([v.reshape(40000, -1) for v in samples.values()], 1).double()
    mean = torch.cat([v.reshape(-1) for v in guide.mean().values()]).double()
    # whitened by the dense precision (P = R R^T), the samples must be N(0, I)
    white = (flat - mean) @ torch.linalg.cholesky(precision)
    assert (torch.cov(white.T) - torch.eye(white.shape[1])).norm() / white.shape[1] ** 0.5 < 0.05
    assert white.mean(0).abs().max() < 0.03
    assert torch.linalg.eigvalsh(precision).max() > 100 * torch.linalg.eigvalsh(precision).min()  # not isotropic
    start = 0
    for name, d in guide.posterior().items():
        size = d.loc.numel()
        block = cov[start : start + size, start : start + size]
        torch.testing.assert_close(d.variance.reshape(-1).double(), block.diagonal(), rtol=1e-4, atol=1e-7)
        block_precision = precision[start : start + size, start : start + size]
        block_precision = (block_precision + block_precision.T) / 2
        mvn = torch.distributions.MultivariateNormal(d.loc.reshape(-1).double(), precision_matrix=block_precision)
        x = samples[name][:5]
        torch.testing.assert_close(d.log_prob(x).double(), mvn.log_prob(x.reshape(5, -1).double()), rtol=1e-4, atol=1e-3)
        start += size


def test_is_a_pyro_guide_and_works_with_the_batched_predictive():
    model = bert_model()
    model.num_data = 3
    data = bert_data()
    guide = LaplaceGuide(model).fit(data, progress=False)
    trace = poutine.trace(guide).get_trace(data[0])
    assert {n: tuple(s["value"].shape) for n, s in trace.nodes.items() if s["type"] == "sample"} == {
        n: s.shape for n, s in model.sites.items()
    }
    assert math.isfinite(Trace_ELBO().loss(model, guide, data[0]))
    pred = predict(model, guide, data, num_samples=5, keep_samples=True)
    assert pred.sample_probs.shape == (5, 3, 3) and pred.sample_probs.std(0).max() > 0
    mean = predict(model, guide, data, mean=True).probs
    torch.testing.assert_close(mean, predict(model, None, data).probs)
    factor_buffers = [b for n, b in guide.named_buffers() if n.startswith("factors") and not n.endswith(".loc")]
    assert guide.extra_parameters() == sum(b.numel() for b in factor_buffers)


def test_save_load_round_trip(tmp_path):
    model = bert_model()
    data = bert_data()
    guide = LaplaceGuide(model, fisher="exact", rank=3, kfac="expand").fit(data, progress=False)
    guide.optimize_prior_precision("marglik", per_layer=True)
    save_guide(guide, tmp_path / "laplace")
    fresh = bert_model()
    loaded = load_guide(tmp_path / "laplace", fresh)
    assert type(loaded) is LaplaceGuide and loaded.config() == guide.config()
    for (k, v), w in zip(guide.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(v, w), k
    assert loaded.log_marginal_likelihood() == guide.log_marginal_likelihood()
    torch.manual_seed(3)
    a = guide.sample(2)
    torch.manual_seed(3)
    b = loaded.sample(2)
    for k in a:
        assert torch.equal(a[k], b[k])
    torch.testing.assert_close(loaded.glm_logits(data[0])[1], guide.glm_logits(data[0])[1])


def test_clear_errors():
    model = bert_model()
    data = bert_data()
    guide = LaplaceGuide(model)
    for call in (lambda: guide.sample(2), guide.mean, guide.log_marginal_likelihood, lambda: guide.predict_glm(data)):
        with pytest.raises(ValueError, match="call fit"):
            call()
    with pytest.raises(ValueError, match="fisher"):
        LaplaceGuide(model, fisher="kfac")
    with pytest.raises(ValueError, match="kfac"):
        LaplaceGuide(model, kfac="mean")
    with pytest.raises(ValueError, match="rank"):
        LaplaceGuide(model, rank=0)
    with pytest.raises(ValueError, match="positive"):
        LaplaceGuide(model, prior_precision=-1.0)
    with pytest.raises(ValueError, match="unknown site"):
        LaplaceGuide(model, prior_precision={"key.lora_A": 1.0})
    with pytest.raises(ValueError, match="1 or 2 values"):
        LaplaceGuide(model, prior_precision={"query.lora_A": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="class-level logits"):
        LaplaceGuide(LoraModel(tiny_llama(), CausalLM()))
    with pytest.raises(ValueError, match="LoRA-XS"):
        LaplaceGuide(LoraXSModel(tiny_bert(random_b=False), SequenceClassification()))
    with pytest.raises(ValueError, match="empty"):
        guide.fit([], progress=False)
    guide.fit(data, progress=False)
    with pytest.raises(ValueError, match="method"):
        guide.optimize_prior_precision("evidence")
    with pytest.raises(ValueError, match="val_loader"):
        guide.optimize_prior_precision("val_nll")
    with pytest.raises(ValueError, match="per_layer"):
        guide.optimize_prior_precision("val_nll", per_layer=True, val_loader=data)
    for predictive in ("glm", "samples"):  # read once into a list: a generator's second pass had found nothing
        once = guide.optimize_prior_precision("val_nll", val_loader=(b for b in data), predictive=predictive, num_samples=2)
        assert once == guide.optimize_prior_precision("val_nll", val_loader=data, predictive=predictive, num_samples=2)
    guide.set_prior_precision(1.0)
    with pytest.raises(ValueError, match="link"):
        guide.predict_glm(data, link="logit")
    with pytest.raises(ValueError, match="positive"):
        guide.set_prior_precision({"query.lora_A": [1.0, 0.0]})
    assert guide.prior_precision["query.lora_A"].tolist() == [1.0, 1.0]


def test_a_lora_layer_that_did_not_run_or_reads_other_rows_is_refused_by_name():
    """A LoRA layer the forward skips failed with a bare KeyError; one run on [T, N, d] (sequence-first) gave KFAC
    factors averaged over the batch and a GLM mixing examples, silently."""

    class Net(torch.nn.Module):
        def __init__(self, transpose=False):
            super().__init__()
            self.fc1, self.fc2, self.vision = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3), torch.nn.Linear(6, 6)
            self.transpose = transpose

        def forward(self, input_ids, attention_mask=None, pixel_values=None):
            x = input_ids.transpose(0, 1) if self.transpose else input_ids  # [T, N, d]: the rows are tokens
            h = self.fc1(x)
            h = h.transpose(0, 1) if self.transpose else h
            if pixel_values is not None:  # only image inputs run the vision layer
                h = h + self.vision(pixel_values).sum(-1, keepdim=True)
            return SimpleNamespace(logits=self.fc2(torch.tanh(h)).mean(1))

    batch = {"input_ids": torch.randn(3, 4, 6), "labels": torch.tensor([0, 1, 2])}
    torch.manual_seed(0)
    net = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2", "vision"]))
    with pytest.raises(ValueError, match="LoRA layer base_model.model.vision did not run in this batch's forward"):
        LaplaceGuide(LoraModel(net, SequenceClassification())).fit([batch], progress=False)
    net = get_peft_model(Net(transpose=True), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    model = LoraModel(net, SequenceClassification())
    with pytest.raises(ValueError, match=r"fc1 reads inputs of shape \(4, 3, 6\), whose first dim is not the batch's 3"):
        LaplaceGuide(model).fit([batch], progress=False)


def test_glm_on_cloze_rows_groups_each_questions_choices():
    from test_cloze import SHARED, cloze_batch

    from pyro_lora import MultipleChoice

    net = tiny_llama()
    model = LoraModel(net, MultipleChoice(format="cloze", share_prefix=False), num_data=4)
    batch = cloze_batch(SHARED)
    guide = LaplaceGuide(model).fit([batch], progress=False)
    mean, cov = guide.glm_logits(batch)
    assert mean.shape == (2, 3) and cov.shape == (2, 3, 3)
    torch.testing.assert_close(cov, cov.mT)
    one = {k: (v[:3] if v.shape[0] == 6 else v[:1]) for k, v in batch.items()}  # the first question alone
    _, cov_one = guide.glm_logits(one)
    torch.testing.assert_close(cov[0], cov_one[0], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="share_prefix=False"):
        LaplaceGuide(LoraModel(net, MultipleChoice(format="cloze"))).fit([batch], progress=False)


@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_a_cloze_question_whose_choices_are_alike_has_no_curvature(fisher):
    """Two identical choices score alike at every theta: the likelihood is constant and the GGN J^T H J is exactly 0
    (H's rows sum to 0). KFAC took each (question, choice) row as its own example and dropped the cross-choice terms:
    curvature of norm 0.22, posterior variances 71 where the prior's are 100. A question's rows now make one KFAC-reduce
    term; padding a question with a missing choice's filler row, or with padding tokens, changes nothing."""
    from test_cloze import cloze_batch

    from pyro_lora import MultipleChoice

    model = LoraModel(tiny_llama(targets=("v_proj",)), MultipleChoice(format="cloze", share_prefix=False), num_data=1)
    same = [([3, 9, 4], [11, 12]), ([3, 9, 4], [11, 12])]
    guide = LaplaceGuide(model, fisher=fisher, prior_precision=1e-2).fit([cloze_batch([same], labels=[0])], progress=False)
    for name, posterior in guide.posterior().items():
        torch.testing.assert_close(posterior.variance, torch.full_like(posterior.variance, 100.0), rtol=1e-5, atol=0)
    other = [([3, 9, 4], [11, 12]), ([3, 9, 4], [13])]
    padded = [([3, 9, 4], [11, 12]), ([3, 9, 4], [13]), ([5], [6])]  # a third question's choices set a third column
    plain = LaplaceGuide(model, fisher="exact").fit([cloze_batch([other], labels=[0])], progress=False)
    wider = cloze_batch([other, padded], labels=[0, 0], extra_pad=2)
    first = {k: v[:3] if k in ("input_ids", "attention_mask", "target_mask", "target_lengths", "target_chars") else v[:1]
             for k, v in wider.items()}  # question 1 with a filler row for its missing third choice, and padding
    filled = LaplaceGuide(model, fisher="exact").fit([first], progress=False)
    for a, b in zip(plain.factors, filled.factors):
        torch.testing.assert_close(a.small_vals, b.small_vals, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a.large_vals, b.large_vals, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("fisher", ["exact", "mc"])
@pytest.mark.parametrize("items", ["shared", "a missing choice"])
def test_cloze_one_backward_pass_equals_one_per_choice(monkeypatch, fisher, items):
    """A cloze row holds one (question, choice) pair, so one backward pass gives every choice's gradient on its own
    row: the KFAC factors and the GLM covariance equal those of one backward pass per choice (or Fisher vector)."""
    from test_cloze import ITEMS, SHARED, cloze_batch

    from pyro_lora import kfac

    net = tiny_llama()
    model = LoraModel(net, MultipleChoice(format="cloze", share_prefix=False), num_data=4)
    batch = cloze_batch(SHARED if items == "shared" else ITEMS)

    def fitted():
        torch.manual_seed(0)
        guide = LaplaceGuide(model, fisher=fisher).fit([batch], progress=False)
        return guide, guide.glm_logits(batch)

    one, (mean, cov) = fitted()
    each_pass = kfac.output_grads
    monkeypatch.setattr(kfac, "output_grads", lambda logits, outputs, vectors, rows=False: each_pass(logits, outputs, vectors))
    each, (mean_each, cov_each) = fitted()
    for a, b in zip(one.factors, each.factors):
        torch.testing.assert_close(a.small_vals, b.small_vals, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.large_vals, b.large_vals, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mean, mean_each)
    torch.testing.assert_close(cov, cov_each, rtol=1e-4, atol=1e-6)
    assert cov.abs().max() > 0


def test_the_probit_ignores_a_shift_of_every_logit_and_is_mackays_for_two_classes():
    """softmax ignores a shift of every logit and so must its approximation: cloze scores (sums of
    log-probabilities) lie far below 0, where the diagonal probit ``softmax(m / sqrt(1 + pi/8 diag S))`` moved by up
    to 0.5 under a shift of 10. For two classes the pairwise probit is MacKay's probit of the logit difference."""
    from pyro_lora.kfac import probit

    g = torch.Generator().manual_seed(0)
    mean = -19 + 3 * torch.randn(40, 4, generator=g, dtype=torch.float64)
    a = torch.randn(40, 4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.mT
    probs = probit(mean, cov.unsqueeze(0))[0]
    torch.testing.assert_close(probs, pairwise_probit_reference(mean, cov))
    torch.testing.assert_close(probit(mean + 10, cov.unsqueeze(0))[0], probs, rtol=0, atol=1e-12)
    two = cov[:, :2, :2]
    diff_var = two[:, 0, 0] + two[:, 1, 1] - 2 * two[:, 0, 1]
    mackay = torch.sigmoid((mean[:, 0] - mean[:, 1]) / (1 + math.pi / 8 * diff_var).sqrt())
    torch.testing.assert_close(probit(mean[:, :2], two.unsqueeze(0))[0, :, 0], mackay)
    # an approximation of E softmax(f): close to 20000 draws where the diagonal probit was up to 0.86 away
    draws = mean + (torch.linalg.cholesky(cov) @ torch.randn(40, 4, 20000, generator=g, dtype=torch.float64)).permute(2, 0, 1)
    assert float((probs - torch.softmax(draws, -1).mean(0)).abs().max()) < 0.2


def test_the_probit_keeps_missing_choices_at_zero_and_ties_overflowed_differences():
    from pyro_lora.kfac import probit

    mean = torch.tensor([[-20.0, -12.0, -math.inf], [1.0, 3.0, 2.0]])
    cov = torch.tensor([[[30.0, 0.0, math.inf], [0.0, 5.0, math.inf], [math.inf, math.inf, math.inf]],
                        [[math.inf] * 3] * 3])
    probs = probit(mean, cov.unsqueeze(0))[0]
    torch.testing.assert_close(probs[:1], pairwise_probit_reference(mean[:1], cov[:1]))
    assert float(probs[0, 2]) == 0.0
    torch.testing.assert_close(probs[1], torch.full((3,), 1 / 3))  # infinitely uncertain: the uniform limit


def test_the_probit_forms_the_pairwise_variances_in_float64():
    """Where most of the variance shifts every logit alike (softmax ignores it), S_cc + S_kk - 2 S_ck cancels it;
    formed in float32 after the cast to the logits' dtype, the rounding of a shared variance of 1e7 moved the
    probabilities by 0.09 (1e8: 0.16)."""
    from pyro_lora.kfac import glm_probs, probit

    g = torch.Generator().manual_seed(1)
    mean = 3 * torch.randn(50, 4, generator=g)
    b = torch.randn(50, 4, 4, generator=g, dtype=torch.float64)
    b = b @ b.mT / 4
    exact = probit(mean.double(), b.unsqueeze(0))[0]
    for shared in (1e6, 1e7, 1e8):
        probs = glm_probs(mean, shared + b, "probit", 1)[0]
        assert probs.dtype == torch.float32
        torch.testing.assert_close(probs.double(), exact, rtol=0, atol=1e-6)


def unlabelled_twins(data):
    """``data`` without labels, both ways a batch can lack them: no key, and ``None``."""
    return [{k: v for k, v in b.items() if k != "labels"} for b in data], [b | {"labels": None} for b in data]


@pytest.mark.parametrize("kind", ["laplace", "llla"])
def test_the_glm_predictive_predicts_unlabelled_batches(kind):
    """laplace-torch's la(x) predicts inputs without labels, and glm_logits took them, but predict_glm refused them
    ("the batch has no 'labels'"): their probabilities are now the labelled batches', with labels None as predict's;
    a labelled batch among unlabelled ones is refused (the labels would not line up)."""
    from pyro_lora.guides import LastLayerLaplaceGuide
    from pyro_lora.kfac import probit

    model = LoraModel(tiny_bert(r=2), SequenceClassification(), random="AB", num_data=6)
    data = bert_data(seed=2) + bert_data(seed=3)
    guide = (LaplaceGuide(model) if kind == "laplace" else LastLayerLaplaceGuide(model)).fit(data, progress=False)
    expected = torch.cat([probit(mean, cov.unsqueeze(0))[0] for mean, cov in map(guide.glm_logits, data)]).float()
    for unlabelled in unlabelled_twins(data):
        for link in ("probit", "mc"):
            torch.manual_seed(0)
            labelled = guide.predict_glm(data, link=link, num_samples=50, keep_samples=True)
            torch.manual_seed(0)
            bare = guide.predict_glm(unlabelled, link=link, num_samples=50, keep_samples=True)
            assert bare.labels is None and torch.equal(labelled.labels, torch.cat([b["labels"] for b in data]))
            torch.testing.assert_close(bare.probs, labelled.probs, rtol=0, atol=0)
            torch.testing.assert_close(bare.sample_probs, labelled.sample_probs, rtol=0, atol=0)
        torch.testing.assert_close(guide.predict_glm(unlabelled).probs, expected, rtol=1e-5, atol=1e-6)
        for mixed in ([data[0], unlabelled[1]], [unlabelled[0], data[1]]):
            with pytest.raises(ValueError, match="some batches have labels and others none"):
                guide.predict_glm(mixed)


def test_glm_predict_names_nan_or_infinite_logits_and_a_nan_covariance():
    """A nan is no overflow: the probit took a nan covariance entry for an infinite variance (a silent tie: 0.50
    where 0.98 is right), and a +inf logit was blamed on the prior precision."""
    from pyro_lora.kfac import glm_predict, probit

    mean, cov = torch.tensor([[5.0, 0.0, -5.0]]), torch.eye(3).unsqueeze(0)
    broken = cov.clone()
    broken[0, 0, 1] = broken[0, 1, 0] = math.nan
    assert bool(torch.isnan(probit(mean, broken.unsqueeze(0))).all())
    data, label = [{"labels": torch.zeros(1, dtype=torch.long)}], lambda batch: batch["labels"]  # noqa: E731
    for link in ("probit", "mc"):
        with pytest.raises(ValueError, match="covariance holds nan"):
            glm_predict(data, lambda batch: (mean, broken), label, link=link, num_samples=4)
    for bad in (math.inf, math.nan):
        logits = mean.clone()
        logits[0, 1] = bad
        with pytest.raises(ValueError, match=r"logits are not finite \(1 of 3 are nan or \+inf"):
            glm_predict(data, lambda batch: (logits, cov), label)
    missing = torch.tensor([[5.0, 0.0, -math.inf]])
    nan_on_missing = cov.clone()
    nan_on_missing[0, 2, 2] = math.nan  # a missing choice's entries are never used
    probs = glm_predict(data, lambda batch: (missing, nan_on_missing), label).probs
    torch.testing.assert_close(probs, pairwise_probit_reference(missing, cov).float())


def test_compare_predictive_runs_the_probit_on_cloze_without_a_warning():
    """The probit is shift-invariant, so cloze needs no warning (the diagonal probit's said it strayed)."""
    from test_cloze import cloze_batch

    from pyro_lora import MultipleChoice
    from pyro_lora.guides.laplace import glm_probit

    batch = cloze_batch()
    cloze = LoraModel(tiny_llama(), MultipleChoice(format="cloze", share_prefix=False), num_data=2)
    guide = LaplaceGuide(cloze).fit([batch], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prediction = glm_probit(guide, [batch], 4)
    mean, cov = guide.glm_logits(batch)
    torch.testing.assert_close(prediction.probs, pairwise_probit_reference(mean, cov), rtol=1e-4, atol=1e-6)


def test_cloze_refuses_lora_on_the_lm_head_even_when_its_rows_happen_to_match():
    """The cloze score runs the LM head on the scored tokens only ([M, d]): with M = B * K (here 6 one- or two-token
    answers and a filler row) its rows looked like the batch's, and every choice got another's Jacobian."""
    from test_cloze import cloze_batch

    from pyro_lora import MultipleChoice

    items = [[([3, 9, 4], [11, 12]), ([3, 9, 4], [13]), ([3, 9, 4], [14])], [([5, 6], [20]), ([5, 7], [21])]]
    batch = cloze_batch(items, (2, 1))
    assert batch["input_ids"].shape[0] == int(batch["target_mask"].sum()) == 6
    model = LoraModel(tiny_llama(targets=("q_proj", "lm_head")), MultipleChoice(format="cloze", share_prefix=False))
    for fisher in ("mc", "exact"):
        with pytest.raises(ValueError, match="'base_model.model.lm_head'.*leave the LM head out of target_modules"):
            LaplaceGuide(model, fisher=fisher).fit([batch], progress=False)


def test_cloze_fit_leaves_the_filler_rows_of_missing_choices_out():
    """A missing choice's filler row (choice_mask False) is no data: batching questions together, which adds one,
    gives the posterior of one question per batch."""
    from test_cloze import ITEMS, cloze_batch

    from pyro_lora import MultipleChoice

    model = LoraModel(tiny_llama(), MultipleChoice(format="cloze", share_prefix=False), num_data=2)
    together = [cloze_batch(ITEMS, (2, 1))]
    apart = [cloze_batch(ITEMS[:1], (2,)), cloze_batch(ITEMS[1:], (1,))]
    assert not together[0]["choice_mask"].all() and all(b["choice_mask"].all() for b in apart)
    guides = [LaplaceGuide(model, fisher="exact").fit(data, progress=False) for data in (together, apart)]
    for kfac in ("reduce", "expand"):
        guides += [LaplaceGuide(model, fisher="exact", kfac=kfac).fit(data, progress=False) for data in (together, apart)]
    for a, b in zip(guides[::2], guides[1::2]):
        for fa, fb in zip(a.factors, b.factors):
            torch.testing.assert_close(fa.small_vals, fb.small_vals, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(fa.large_vals, fb.large_vals, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(fa.large_rest, fb.large_rest, rtol=1e-4, atol=1e-7)


def test_cloze_questions_of_one_choice_are_refused():
    """One choice per question: a one-class softmax gives it probability 1 whatever the model (zero Fisher, and a GLM
    predictive of 1.0 each: accuracy 1, NLL 0), which was fitted and scored as data; refused, as num_labels=1 is."""
    from test_cloze import cloze_batch

    from pyro_lora import MultipleChoice

    batch = cloze_batch([[([3, 9, 4], [11, 12])], [([5, 6], [20])]], (0, 0))
    model = LoraModel(tiny_llama(), MultipleChoice(format="cloze", share_prefix=False), num_data=2)
    for fisher in ("exact", "mc"):
        with pytest.raises(ValueError, match=r"row\(s\) \[0, 1\] of the batch have fewer than 2 choices"):
            LaplaceGuide(model, fisher=fisher).fit([batch], progress=False)


def test_the_glm_predictive_refuses_a_head_retrained_after_the_fit():
    """predict refused a network whose head another guide retrained after the fit, but predict_glm, glm_logits and
    the val_nll tuning ran on it without a word: Jacobians of the new head under the old head's posterior."""
    from pyro_lora import fit
    from pyro_lora.guides import MAPGuide

    model, data = bert_model(), bert_data()
    guide = LaplaceGuide(model, fisher="exact").fit(data, progress=False)
    before = guide.predict_glm(data).probs
    retrained = MAPGuide(model)
    fit(model, retrained, data, epochs=2, lr=5e-2, progress=False)  # train_network=True: moves the head
    for call in (lambda: guide.predict_glm(data), lambda: guide.glm_logits(data[0]),
                 lambda: guide.optimize_prior_precision("val_nll", val_loader=data, grid=[1.0, 2.0])):
        with pytest.raises(ValueError, match=r"LaplaceGuide on this model: the network's point parameters .* changed since"):
            call()
    model.write_adapter(retrained.mean())  # the MAP's LoRA beside its head (else refused as an unwritten MAP)
    refit = guide.fit(data, progress=False)  # a fit at the network as it is now: its head is the posterior's
    assert not torch.allclose(refit.predict_glm(data).probs, before)
    predict(model, refit, data)


def test_the_tfb_search_refuses_a_head_retrained_after_the_guide_was_built():
    from pyro_lora import fit
    from pyro_lora.guides import MAPGuide, TFBGuide

    model = LoraModel(tiny_bert(r=2), SequenceClassification(), random="AB")
    data = bert_data()
    map_guide = MAPGuide(model)
    fit(model, map_guide, data, epochs=2, lr=5e-2, progress=False)
    model.write_adapter(map_guide.mean())  # TFB centres on the adapter
    guide = TFBGuide(model)
    fit(model, MAPGuide(model), data, epochs=2, lr=5e-2, progress=False)
    with pytest.raises(ValueError, match=r"cannot search sigma_q with this TFBGuide on this model: the network's point"):
        guide.search(data, progress=False)


def test_every_laplace_pass_over_all_examples_refuses_a_loader_that_drops_its_last_batch():
    """optimize_prior_precision("val_nll") read its loader into a list before predict_glm's check could see it drop
    its last incomplete batch: lambda was tuned on 8 of 10 validation examples without a word (the GLM and the sampled
    predictive, last-layer Laplace too); a fit summed the curvature of 8 of 10, warned only where the model has
    num_data (here it has none)."""
    from torch.utils.data import BatchSampler, DataLoader

    from pyro_lora.guides import LastLayerLaplaceGuide

    model = LoraModel(tiny_bert(r=2, num_labels=3), SequenceClassification())
    rows = [{k: v[i] for k, v in bert_data(lengths=(7, 5, 4, 6, 3, 7, 2, 5, 4, 6))[0].items()} for i in range(10)]
    loaders = [DataLoader(rows, batch_size=4, drop_last=True), DataLoader(rows, batch_sampler=BatchSampler(range(10), 4, True))]
    guides = [LaplaceGuide(model, fisher="exact", rank=2).fit(bert_data(), progress=False),
              LastLayerLaplaceGuide(model).fit(bert_data(), progress=False)]
    for guide in guides:
        name, before = type(guide).__name__, copy.deepcopy(guide.state_dict())
        searches = [{}, {"predictive": "samples"}] if isinstance(guide, LaplaceGuide) else [{}]
        for loader in loaders:
            for kwargs in searches:
                with pytest.raises(ValueError, match=rf"{name} val_nll reads every example of its data, but this "
                                                     r"DataLoader drops its last incomplete batch \(drop_last=True"):
                    guide.optimize_prior_precision("val_nll", val_loader=loader, grid=[1e-2, 1.0], **kwargs)
            what = "a Laplace fit" if isinstance(guide, LaplaceGuide) else "a last-layer Laplace fit"
            with pytest.raises(ValueError, match=f"{what} reads every example of its data, but this DataLoader drops"):
                guide.fit(loader, progress=False)
        for key, value in guide.state_dict().items():  # every refusal before any work: the guide as it was
            assert torch.equal(value, before[key]), key
    whole = DataLoader(rows, batch_size=4)  # the same loader keeping its last batch: all 10 examples
    assert [len(g.predict_glm(whole).labels) for g in guides] == [10, 10]


def test_a_repeated_best_grid_value_is_refined_on_both_sides():
    """The refining grid took the best value's neighbours in the sorted grid: a repeated value was its own neighbour."""
    from pyro_lora.guides.laplace import search_grid

    def nlls_of(values):
        return [(math.log10(float(v)) - 0.3) ** 2 for v in values]  # lowest at 10^0.3, right of 1

    grid = torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0])
    best, _ = search_grid(grid, nlls_of)
    repeated, _ = search_grid(torch.tensor([0.01, 0.1, 1.0, 1.0, 10.0, 100.0]), nlls_of)
    assert repeated == pytest.approx(best) and best > 1.0


def test_tied_grid_values_give_the_largest_whatever_the_grid_order():
    """With a flat validation NLL an ascending grid chose lambda = 1e-4 and a descending one 1e4, each warning to
    extend the grid: the choice followed the grid's order, and the warning named no optimum beyond it."""
    from pyro_lora.guides.laplace import search_grid

    grid = torch.logspace(-4, 4, 9)
    for order in (grid, grid.flip(0), grid[torch.randperm(9, generator=torch.Generator().manual_seed(0))]):
        with pytest.warns(UserWarning, match=r"the validation NLL is 0.5 at every lambda from 0.0001 to 10000: the "
                                             r"posterior's spread does not change the validation predictions; lambda = 10000"):
            assert search_grid(order, lambda values: [0.5] * len(values))[0] == pytest.approx(1e4)

    def plateau(values):  # lowest, and equal, for every lambda from 1 up
        return [max(0.0, -math.log10(float(v))) for v in values]

    for order in (grid, grid.flip(0)):
        with pytest.warns(UserWarning, match="lowest at the largest grid value"):
            assert search_grid(order, plateau)[0] == pytest.approx(1e4)


def test_the_default_prior_precision_is_the_models_prior():
    """The MAP was trained under the model's prior N(0, s^2): the Laplace's default lambda is 1 / s^2 (it was 1 whatever
    the prior, so for s = 0.1 a posterior 100 times too wide where the data say little, and another evidence)."""
    import pyro.distributions as dist

    narrow = LoraModel(tiny_bert(), SequenceClassification(), prior=0.1)
    assert all(torch.allclose(v, torch.tensor(100.0)) for v in LaplaceGuide(narrow).prior_precision.values())
    assert all(torch.allclose(v, torch.tensor(2.0)) for v in LaplaceGuide(narrow, prior_precision=2.0).prior_precision.values())
    # a dict naming some sites: the rest keep the default (they took 1.0, a posterior 10 times too wide)
    first, *rest = narrow.sites
    partial = LaplaceGuide(narrow, prior_precision={first: 50.0}).prior_precision
    assert torch.allclose(partial[first], torch.tensor(50.0)) and rest
    assert all(torch.allclose(partial[n], torch.tensor(100.0)) for n in rest)
    sites = LoraModel(tiny_bert(), SequenceClassification()).sites
    shaped = LoraModel(tiny_bert(), SequenceClassification(),
                       prior={n: dist.Normal(torch.zeros(s.shape), 0.5).to_event(len(s.shape)) for n, s in sites.items()})
    with pytest.warns(UserWarning, match="the model's prior is a dict, not one std: the Laplace's prior precision starts at 1.0"):
        guide = LaplaceGuide(shaped)
    assert all(torch.allclose(v, torch.tensor(1.0)) for v in guide.prior_precision.values())


def test_a_prior_precision_that_is_no_positive_finite_number_is_refused_everywhere():
    """inf was accepted (the evidence came back nan), True taken as 1.0; last-layer Laplace refused inf but took True."""
    from pyro_lora.guides import LastLayerLaplaceGuide

    model = LoraModel(tiny_bert(), SequenceClassification(), prior=0.5)
    first = next(iter(model.sites))
    guide = LaplaceGuide(model)
    for bad in (math.inf, math.nan, True, 0.0, -1.0, [1.0, math.inf], "1"):
        for call in (lambda: LaplaceGuide(model, prior_precision=bad), lambda: LaplaceGuide(model, prior_precision={first: bad}),
                     lambda: guide.set_prior_precision(bad), lambda: guide.set_prior_precision({first: bad}),
                     lambda: LastLayerLaplaceGuide(model).set_prior_precision(bad)):
            with pytest.raises(ValueError, match="positive finite number"):
                call()
    guide.set_prior_precision({first: [2.0, 3.0]})  # one per layer
    assert guide.prior_precision[first].tolist() == [2.0, 3.0]


def test_every_reader_of_batches_refuses_what_is_no_dict_of_batched_tensors():
    """The Laplace fits and the GLM predictive read a TensorDataset's batches (lists) and single examples as fit did:
    "'list' object has no attribute 'get'" or an IndexError deep inside; they share fit's refusal naming the collators."""
    from torch.utils.data import DataLoader, TensorDataset

    from pyro_lora.guides import LastLayerLaplaceGuide

    model = LoraModel(tiny_bert(r=2), SequenceClassification(), random="AB", num_data=6)
    data = bert_data(seed=2) + bert_data(seed=3)
    batch = data[0]
    bad = {"a list of 3 tensors": DataLoader(TensorDataset(*batch.values()), batch_size=2),
           r"input_ids has shape \(7,\): one example": [{k: v[0] for k, v in batch.items()}]}
    for kind in (LaplaceGuide, LastLayerLaplaceGuide):
        guide = kind(model).fit(data, progress=False)
        for what, wrong in bad.items():
            for run in (lambda: kind(model).fit(wrong, progress=False), lambda: guide.predict_glm(wrong),
                        lambda: guide.glm_logits(wrong[0] if isinstance(wrong, list) else next(iter(wrong)))):
                with pytest.raises(ValueError, match=rf"a batch must be a dict of batched tensors.*{what}.*collator"):
                    run()


def test_val_nll_on_weight_samples_refuses_a_lambda_whose_draws_overflow_not_the_search():
    """predict refuses non-finite probabilities (0837de8), and the weight-sample val_nll search scored each lambda
    through it: one lambda small enough to overflow the logits failed the whole search where it is only too wide."""
    model = mlp_model()  # no LayerNorm to scale huge activations back
    data = [{**b, "input_ids": b["input_ids"] * 1e4} for b in mlp_data()]
    guide = LaplaceGuide(model)
    guide.fit(data, progress=False)
    guide.set_prior_precision(1e-38)  # stds ~1e19 on A and on B: the logits overflow float32
    with pytest.raises(ValueError, match="not finite: the network's logits overflowed"):
        predict(model, guide, data, num_samples=2)
    nlls = guide.optimize_prior_precision("val_nll", val_loader=data, grid=[1e-38, 1.0, 10.0], predictive="samples",
                                          num_samples=2, refine=False)
    assert nlls[0] == math.inf and all(map(math.isfinite, nlls[1:]))
    assert float(guide.factors[0].prior_precision.reshape(-1)[0]) in (1.0, 10.0)
    with pytest.raises(ValueError, match=r"not finite at every lambda from 1e-38 to 2e-38 \(logits overflowing"):
        guide.optimize_prior_precision("val_nll", val_loader=data, grid=[1e-38, 2e-38], predictive="samples",
                                       num_samples=2, refine=False)


def test_the_val_nll_search_keeps_a_margin_from_a_lambda_whose_predictive_overflows():
    """The NLL falls with lambda (a wider posterior) down to an overflow below lambda = 1.5e-3: the search chose
    10^-2.875 = 1.3e-3, next to it, where other weight samples overflow (as scalabl_val's temperature did)."""
    from pyro_lora.guides.laplace import search_grid

    def nlls_of(values, edge=1.5e-3):
        return [math.inf if float(v) < edge else math.log10(float(v)) + 10 for v in values]

    grid = torch.logspace(-4, 4, 17)
    with pytest.warns(UserWarning, match=r"overflowed \(not finite\) at lambda 0.001: a lambda within a factor 4 of one"):
        best, _ = search_grid(grid, nlls_of)
    # by hand: the grid overflows up to 1e-3, so lambda <= 4e-3 is refused (the grid's 10^-2.5 too): the best grid value
    # is 1e-2, refined between 10^-2.5 and 10^-1.5 in steps of 10^0.125; the smallest of those from 4e-3 up: 10^-2.375
    assert best == pytest.approx(10 ** -2.375)
    # a second set of draws overflowing below 5e-3: 10^-2.375 counts as overflowing, up to 4 x 10^-2.375 = 0.0169
    # is refused, and of the values scored the smallest above it is 10^-1.75
    best, _ = search_grid(grid, nlls_of, again=lambda lam: nlls_of([lam], edge=5e-3)[0])
    assert best == pytest.approx(10 ** -1.75)
    assert search_grid(grid, lambda values: nlls_of(values, edge=0.0))[0] == pytest.approx(1e-4)  # no overflow: as before


def test_a_lambda_left_alone_by_the_overflow_margin_is_not_said_to_be_the_grids_best():
    """0.1 overflowed and 0.2 lay within its margin, unranked: lambda = 1, the one value left, was said to have "the
    validation NLL lowest at the largest grid value" (0.2's NLL was lower) with the optimum perhaps beyond the grid."""
    from pyro_lora.guides.laplace import search_grid

    nlls = {0.1: math.inf, 0.2: 1.0, 1.0: 2.0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        best, _ = search_grid(torch.tensor([0.1, 0.2, 1.0], dtype=torch.float64),
                              lambda values: [nlls[round(float(v), 6)] for v in values], refine=False)
    said = " ".join(str(w.message) for w in caught)
    assert best == 1.0 and "lowest at the largest" not in said
    assert "lambda = 1 is the only grid value (grid 0.1 to 1) clear of the overflow margin" in said
