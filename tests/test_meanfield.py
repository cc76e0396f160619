"""Mean-field (BLoB-style) guide: families, closed-form KL against dense references, the MAP limit,
data response of the learned stds, flipout and save/load, on tiny random networks."""

import pyro
import pytest
import torch
from conftest import evidence_model, log_evidence, random_batch, tiny_bert
from pyro.infer import Importance, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from test_training import toy_data
from torch.distributions import MultivariateNormal, kl_divergence

import pyro_lora.handoff as handoff
from pyro_lora.guides import ScalaBLGuide
from pyro_lora.guides.meanfield import MeanFieldGuide
from pyro_lora import LoraModel, MatrixNormalKronecker, MultipleChoice, ScalaBLModel, SequenceClassification, fit, load_guide, predict, save_guide



def make(random="AB", prior=0.3, num_data=None, **kw):
    model = LoraModel(tiny_bert(num_labels=3), SequenceClassification(), random=random, prior=prior, num_data=num_data)
    return model, MeanFieldGuide(model, **kw)


def batch3():
    return random_batch() | {"labels": torch.tensor([0, 2, 1])}


def dense_diag(d):
    """``Normal(loc, scale).to_event(k)`` as a dense ``MultivariateNormal`` over ``vec``."""
    base = d.base_dist
    return MultivariateNormal(base.loc.flatten().double(), torch.diag(base.scale.flatten().double().pow(2)))


def test_families_init_and_options():
    model, guide = make(random="AB", init_scale=1e-2)
    post = guide.posterior()
    assert guide.gaussian == ["query.lora_A", "value.lora_A"]
    assert type(post["query.lora_B"]).__name__ == "Delta" and post["query.lora_A"].event_shape == (2, 4, 32)
    adapter = model.adapter_values()
    for name, loc in guide.mean().items():
        assert torch.equal(loc, adapter[name])
    rms = adapter["query.lora_A"].pow(2).mean((-2, -1), keepdim=True).sqrt()
    torch.testing.assert_close(guide.stds()["query.lora_A"], (1e-2 * rms).expand(2, 4, 32))
    assert guide.extra_parameters() == 2 * 2 * 4 * 32
    _, normal_b = make(random="AB", b="normal", std="square")
    assert len(normal_b.gaussian) == 4 and normal_b.extra_parameters() == 4 * 2 * 4 * 32
    for bad in (dict(b="gauss"), dict(std="exp"), dict(init_scale=0.0)):
        with pytest.raises(ValueError):
            make(**bad)
    # inf passed 'not x > 0': inf (or nan from softplus(inf * 0)) stds, and fit then blamed the learning rate
    for name in ("init_scale", "std_lr_scale"):
        with pytest.raises(ValueError, match=f"{name} must be a finite positive number, got inf"):
            make(**{name: float("inf")})
    for std, bad in (("softplus", dict(std_lr_scale=1e300)), ("square", dict(std_lr_scale=1e40)), ("softplus", dict(init_scale=1e39))):
        with pytest.raises(ValueError, match=r"gives .* initial stds up to .*, which its parameter rho = std\^-1\(sigma\) / "
                                             "std_lr_scale cannot hold in float32"):
            make(std=std, **bad)
    model, _ = make()
    model.write_adapter({k: torch.full_like(v, 1e-40) for k, v in model.adapter_values().items()})
    with pytest.raises(ValueError, match="initial stds up to 0, which its parameter rho"):  # underflowed: rho = -inf
        MeanFieldGuide(model, init_scale=1e-6)
    # stds of 1e-25 relative: their square is 0 in float32, the loss nan (fit blamed the learning rate); so for ScalaBL
    for build in (lambda: make(init_scale=1e-25)[1], lambda: ScalaBLGuide(ScalaBLModel(tiny_bert(r=4), SequenceClassification(), prior=0.3), init_scale=1e-25)):
        with pytest.raises(ValueError, match=r"init_scale=1e-25 times .* gives initial stds from .* beyond what float32 computes"):
            build()
    # a peft B at 0 starts relative to the prior's std: a Cauchy's is infinite (the error blamed init_scale), a
    # transformed distribution's not computed (a bare NotImplementedError); a finite one is used (StudentT df=3: sqrt 3)
    import pyro.distributions as dist

    from conftest import tiny_bert_base
    from peft import LoraConfig, get_peft_model

    def fresh(prior):
        net = get_peft_model(tiny_bert_base(), LoraConfig(r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS"))
        return LoraModel(net.eval(), SequenceClassification(), random="AB", prior=prior, num_data=10)

    cauchy = lambda s: dist.StudentT(1.0, torch.zeros(s.shape), 1.0).to_event(len(s.shape))  # noqa: E731
    scaled = lambda s: dist.TransformedDistribution(dist.Normal(torch.zeros(s.shape), 1.0).to_event(len(s.shape)),  # noqa: E731
                                                    [dist.transforms.AffineTransform(0.0, 2.0, event_dim=len(s.shape))])
    for prior, what in ((cauchy, r"prior \(StudentT\) has no finite variance"), (scaled, r"prior \(TransformedDistribution\) has no variance torch computes")):
        with pytest.raises(ValueError, match=f"MeanFieldGuide starts the stds of site 'query.lora_B' relative to the "
                                             f"prior's, and its {what}: use a prior with a finite variance, or give"):
            MeanFieldGuide(fresh(prior), b="normal")
    student = MeanFieldGuide(fresh(lambda s: dist.StudentT(3.0, torch.zeros(s.shape), 1.0).to_event(len(s.shape))), b="normal")
    stds = student.stds()["query.lora_B"].detach()
    torch.testing.assert_close(stds, torch.full_like(stds, 1e-2 * 3 ** 0.5), rtol=1e-5, atol=0)
    per_matrix = LoraModel(tiny_bert(), SequenceClassification(), random="A", group="matrix")
    stds = MeanFieldGuide(per_matrix).stds()
    assert len(stds) == 4 and all(s.shape == (4, 32) for s in stds.values())


@pytest.mark.parametrize("std", ["softplus", "square"])
def test_std_parametrisation_inverts_and_zero_locs_use_prior_scale(std):
    _, guide = make(std=std, std_lr_scale=3.0)
    s = torch.tensor([1e-6, 1e-3, 0.2, 5.0])
    torch.testing.assert_close(guide._std(guide._rho(s)), s, rtol=1e-4, atol=0)
    model = LoraModel(tiny_bert(), SequenceClassification(), random="B", prior=0.5)
    zeros = {n: torch.zeros(s.shape) for n, s in model.sites.items()}  # peft's B init
    stds = MeanFieldGuide(model, b="normal", std=std, init_scale=1e-3, init=zeros).stds()
    torch.testing.assert_close(stds["query.lora_B"], torch.full((2, 32, 4), 5e-4))


def test_kl_and_log_prob_match_dense_references():
    model, guide = make(b="normal", init_scale=0.3)
    post = guide.posterior()
    for name, site in model.sites.items():
        q, p = post[name], model.prior_distribution(site)
        dense_q = dense_diag(q)
        dense_p = MultivariateNormal(torch.zeros(site.numel, dtype=torch.float64), 0.09 * torch.eye(site.numel, dtype=torch.float64))
        torch.testing.assert_close(kl_divergence(q, p).double(), kl_divergence(dense_q, dense_p), rtol=1e-4, atol=1e-3)
        x = q.sample()
        torch.testing.assert_close(q.log_prob(x).double(), dense_q.log_prob(x.flatten().double()), rtol=1e-4, atol=1e-3)


def test_closed_form_kl_against_a_matrix_normal_prior():
    g = torch.Generator().manual_seed(3)

    def prior(site):
        L, m, n = site.shape
        return MatrixNormalKronecker(
            torch.zeros(L, m, n), 0.3 * torch.randn(L, m, 2, generator=g), torch.rand(L, m, generator=g) + 0.2,
            0.3 * torch.randn(L, n, 2, generator=g), torch.rand(L, n, generator=g) + 0.2,
        ).to_event(1)

    model = LoraModel(tiny_bert(), SequenceClassification(), random="A", prior=prior)
    q = MeanFieldGuide(model, init_scale=0.5).posterior()["query.lora_A"]
    p = model.prior_distribution(model.sites["query.lora_A"])
    kl = kl_divergence(q, p)  # closed form: Pyro's Independent/Independent KL, then the core's diag-Normal/MNK KL
    dense = 0.0
    for l in range(2):
        mnk = p.base_dist
        k_row = mnk.row_factor[l] @ mnk.row_factor[l].T + torch.diag(mnk.row_diag[l] ** 2)
        k_col = mnk.col_factor[l] @ mnk.col_factor[l].T + torch.diag(mnk.col_diag[l] ** 2)
        dense_p = MultivariateNormal(torch.zeros(4 * 32, dtype=torch.float64), torch.kron(k_row, k_col).double())
        ql = pyro.distributions.Normal(q.base_dist.loc[l], q.base_dist.scale[l]).to_event(2)
        dense = dense + kl_divergence(dense_diag(ql), dense_p)
    torch.testing.assert_close(kl.double(), dense, rtol=1e-4, atol=1e-2)


def test_trace_mean_field_elbo_is_nll_plus_closed_form_kl():
    model, guide = make(random="AB", b="delta", num_data=30, init_scale=0.1)
    batch = batch3()
    pyro.set_rng_seed(5)
    loss = TraceMeanField_ELBO().differentiable_loss(model, guide, batch, kl_weight=0.5)
    pyro.set_rng_seed(5)
    values = guide(batch)  # the same draws the ELBO saw
    nll = 10.0 * torch.nn.functional.cross_entropy(model.logits(batch, values), batch["labels"], reduction="sum")
    post = guide.posterior()
    reg = sum(
        kl_divergence(post[n], model.prior_distribution(s)) if n in guide.gaussian else -model.prior_distribution(s).log_prob(values[n])
        for n, s in model.sites.items()
    )
    torch.testing.assert_close(loss, nll + 0.5 * reg)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.parameters())


def test_zero_variance_reproduces_map_logits():
    model, guide = make(random="A", init_scale=1e-9)
    batch = batch3()
    plain = model.logits(batch)
    torch.testing.assert_close(model.logits(batch, guide.mean()), plain)
    samples = guide.sample(4)
    torch.testing.assert_close(model.logits(batch, samples, num_samples=4), plain.expand(4, -1, -1), rtol=1e-5, atol=1e-6)


def _fit_stds(num_data):
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), random="A", prior=1.0, num_data=num_data)
    guide = MeanFieldGuide(model)  # defaults: softplus, init 1e-2 relative, std_lr_scale 10
    losses = fit(model, guide, toy_data(), epochs=20, lr=1e-2, elbo=TraceMeanField_ELBO(), progress=False)
    log_std = torch.cat([s.detach().log().flatten() for s in guide.stds().values()])
    return losses, log_std, model, guide


def test_svi_lowers_loss_and_learned_stds_respond_to_data():
    # TyXe's failure: every std crept up by one lr per step whatever the data. Here the stds reach the
    # data/prior balance: unconstrained entries sit at the prior std, and ten times the data shrinks the
    # constrained ones (same batches, only num_data differs).
    small_losses, small, model, guide = _fit_stds(48)
    large_losses, large, _, _ = _fit_stds(480)
    for losses in (small_losses, large_losses):
        assert sum(losses[-6:]) < 0.1 * sum(losses[:6])
    assert abs(small.median().item()) < 0.1  # the prior std is 1; initialised at ~exp(-7)
    assert large.quantile(0.05) < small.quantile(0.05) - 0.3
    assert large.mean() < small.mean() - 0.04
    acc = (predict(model, guide, toy_data(), num_samples=4).probs.argmax(-1) == torch.cat([b["labels"] for b in toy_data()]))
    assert acc.float().mean() > 0.9


def test_learn_loc_false_fits_the_stds_around_fixed_means(tmp_path):
    model, guide = make(random="AB", b="normal", learn_loc=False)
    means = {n: m.detach().clone() for n, m in guide.mean().items()}
    stds = {n: s.detach().clone() for n, s in guide.stds().items()}
    fit(model, guide, toy_data(), epochs=2, lr=1e-2, elbo=TraceMeanField_ELBO(), train_network=False, progress=False)
    for name, mean in guide.mean().items():
        assert torch.equal(mean, means[name])
        assert not torch.equal(guide.stds()[name], stds[name])
    save_guide(guide, tmp_path / "mf")
    loaded = load_guide(tmp_path / "mf", model)
    assert loaded.config()["learn_loc"] is False and not any(p.requires_grad for p in loaded.locs)


def test_save_load_round_trip(tmp_path):
    model, guide = make(random="AB", b="normal", std="square", init_scale=0.05)
    with torch.no_grad():
        guide.rhos[0].mul_(1.5)
    save_guide(guide, tmp_path / "mf")
    fresh = LoraModel(tiny_bert(num_labels=3), SequenceClassification(), random="AB", prior=0.3)
    loaded = load_guide(tmp_path / "mf", fresh)
    assert type(loaded) is MeanFieldGuide and loaded.config() == guide.config()
    for name, std in guide.stds().items():
        torch.testing.assert_close(loaded.stds()[name], std)
    torch.manual_seed(1)
    a = guide.sample(3)
    torch.manual_seed(1)
    b = loaded.sample(3)
    for name in a:
        torch.testing.assert_close(a[name], b[name])


# flipout


def test_flipout_mean_path_equals_plain_forward():
    x = torch.randn(5, 7, 6)
    a, b = torch.randn(3, 6), torch.randn(4, 3)
    # zero noise: flipout's mean path is the plain LoRA delta
    torch.testing.assert_close(handoff.lora_delta(x, a, b, a_loc=a), handoff.lora_delta(x, a, b))
    model, guide = make(random="A", flipout=True, init_scale=0.1)
    batch = batch3()
    locs = {n: guide.mean()[n] for n in guide.gaussian}
    torch.testing.assert_close(model.logits(batch, guide.mean(), flipout_locs=locs), model.logits(batch, guide.mean()))


def test_flipout_is_a_per_example_sign_flip(monkeypatch):
    x, a_loc, noise, b = torch.randn(4, 3, 6), torch.randn(2, 6), torch.randn(2, 6), torch.randn(5, 2)
    signs = {6: torch.randint(0, 2, (4, 1, 6)) * 2.0 - 1, 2: torch.randint(0, 2, (4, 1, 2)) * 2.0 - 1}
    monkeypatch.setattr(handoff, "_signs", lambda x, size, generator=None: signs[size])
    out = handoff.lora_delta(x, a_loc + noise, b, a_loc=a_loc)
    for n in range(4):
        a_n = a_loc + signs[2][n, 0, :, None] * noise * signs[6][n, 0]  # diag(s_n) E diag(t_n)
        torch.testing.assert_close(out[n], handoff.lora_delta(x[n], a_n, b))
    # the batched-sample path flips the same way
    torch.testing.assert_close(handoff.lora_delta(x, (a_loc + noise)[None], b[None], num_samples=1, a_loc=a_loc), out)


def test_flipout_without_a_gaussian_a_site_is_refused():
    """random='B' with flipout=True was accepted and saved as a flipout guide, though no site carried the flip."""
    with pytest.raises(ValueError, match=r"flipout=True applies to Gaussian A sites, and this model's random sites are \['B'\]"):
        make(random="B", flipout=True, b="normal")
    assert make(random="AB", flipout=True)[1].flipout


def test_flipout_on_cloze_multiple_choice_is_refused_by_name():
    """Cloze runs each choice of a question as a row of its own: flipout's per-row noise scored a question's choices
    under different weights (two identical choices no longer tied), a silently other training objective."""
    from conftest import tiny_llama
    from test_cloze import cloze_batch

    cloze = LoraModel(tiny_llama(), MultipleChoice(format="cloze"), random="A")
    with pytest.raises(ValueError, match="flipout draws its weight noise per row, and cloze multiple choice"):
        MeanFieldGuide(cloze, flipout=True)
    guide = MeanFieldGuide(cloze)  # a guide marking its sites itself meets the same refusal in the forward
    values = {n: v[0] for n, v in guide.sample(1).items()}
    with pytest.raises(ValueError, match="use flipout=False, or the letter format"):
        cloze.logits(cloze_batch(), values, flipout_locs={n: guide.mean()[n] for n in guide.gaussian})
    letter = MultipleChoice(torch.tensor([3, 4, 5]), format="letter")  # one row per question
    MeanFieldGuide(LoraModel(tiny_llama(), letter, random="A"), flipout=True)


def test_flipout_decorrelates_identical_examples_and_trains():
    model, guide = make(random="A", flipout=True, init_scale=0.5, num_data=48)
    batch = {k: v[:1].expand(2, -1) for k, v in batch3().items()}  # two copies of one example
    values = guide.sample(1)
    values = {n: v[0] for n, v in values.items()}
    locs = {n: guide.mean()[n] for n in guide.gaussian}
    same = model.logits(batch, values)
    flipped = model.logits(batch, values, flipout_locs=locs)
    torch.testing.assert_close(same[0], same[1])
    assert not torch.allclose(flipped[0], flipped[1])
    tr = pyro.poutine.trace(guide).get_trace(batch)
    assert "flipout_loc" in tr.nodes["query.lora_A"]["infer"]
    losses = fit(model, guide, toy_data(), epochs=3, lr=1e-2, elbo=Trace_ELBO(), progress=False)
    assert sum(losses[-6:]) < sum(losses[:6])


def test_flipout_applies_only_where_particles_are_averaged(monkeypatch):
    """Flipout gives each example its own weights: an average over particles stays unbiased, an importance weight of one
    draw does not. Under Importance log p(y) came out 0.3 nats off (a report: -11.76 against -11.46); there every
    example now sees the one draw, with a warning, while Trace_ELBO and its kin (fit, SVI) still flip."""
    model = evidence_model(prior=6.0, num_data=16)
    batch = random_batch(batch=16, seq=6) | {"labels": torch.arange(16) % 2}
    torch.manual_seed(0)
    expected = log_evidence(model, batch)  # by 20000 prior draws
    (name, site), = model.sites.items()
    guide = MeanFieldGuide(model, flipout=True, init={name: torch.zeros(site.shape)})
    with torch.no_grad():
        guide.rhos[0].copy_(guide._rho(torch.full(site.shape, 6.0)))  # q = the prior: each weight is p(y | A)
    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match="flipout, which applies only inside an ELBO that averages over its particles"):
        estimate = Importance(model, guide, num_samples=300).run(batch).get_log_normalizer()
    assert abs(float(estimate) - expected) < 0.15
    flipped, logits = [], model.logits
    monkeypatch.setattr(model, "logits", lambda *args, flipout_locs, **kw: flipped.append(bool(flipout_locs)) or
                        logits(*args, flipout_locs=flipout_locs, **kw))
    for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
        elbo.loss(model, guide, batch)
    with pytest.warns(UserWarning, match="flipout, which applies only"):
        RenyiELBO(alpha=0.0, num_particles=2).loss(model, guide, batch)
    assert flipped == [True, True, False, False]
