"""ScalaBL: the singular-basis rotation, the log-scale hand-off, KL against a dense reference, the MAP limit,
SVI and save/load, on tiny random networks."""

import pytest
import torch
from conftest import random_batch, tiny_bert, tiny_llama
from pyro.infer import TraceMeanField_ELBO
from test_training import toy_data
from torch.distributions import MultivariateNormal, kl_divergence

import pyro_lora.handoff as handoff
from pyro_lora.guides import ScalaBLGuide
from pyro_lora import LoraModel, ScalaBLModel, SequenceClassification, fit, load_guide, predict, save_guide
from pyro_lora.likelihoods import CausalLM
from pyro_lora.scalabl import rotate_to_singular_basis
from pyro_lora.sites import find_lora_layers


def batch3():
    return random_batch() | {"labels": torch.tensor([0, 2, 1])}


@pytest.mark.parametrize("r", [4, 40])  # 40 > d_in = 32: failed with a shape error in the model's constructor
def test_rotation_keeps_ba_and_orthogonalises_a(r):
    net = tiny_llama(r=r)
    layers = find_lora_layers(net)
    before = {p: (l.lora_B["default"].weight @ l.lora_A["default"].weight).clone() for p, l in layers.items()}
    singular = {p: torch.linalg.svdvals(l.lora_A["default"].weight).clone() for p, l in layers.items()}
    rotate_to_singular_basis(net)
    for path, layer in layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(b @ a, before[path], rtol=1e-5, atol=1e-6)
        gram = a @ a.T  # rows orthogonal, norms = A's singular values
        expected = torch.cat([singular[path] ** 2, torch.zeros(r - len(singular[path]))])
        torch.testing.assert_close(gram, torch.diag(expected), rtol=1e-4, atol=1e-5)


def test_a_float64_lora_is_rotated_in_float64():
    """The SVD and B U ran in float32 whatever the weights: a float64 B A moved by 3e-7 to 9e-7 of itself; then in a
    group of layers of one shape, by their first layer's dtype (a float32 one first left the float64 ones at 6e-7)."""
    net = tiny_llama(r=4).double()
    layers = find_lora_layers(net)
    first = next(iter(layers.values()))
    first.lora_A["default"].float()
    first.lora_B["default"].float()
    layers = {p: l for p, l in layers.items() if l is not first}
    before = {p: l.lora_B["default"].weight @ l.lora_A["default"].weight for p, l in layers.items()}
    rotate_to_singular_basis(net)
    for path, layer in layers.items():
        after = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert float((after - before[path]).abs().max() / before[path].abs().max()) < 1e-13


def test_sites_trainable_matrices_and_errors():
    model = ScalaBLModel(tiny_llama(r=4), CausalLM(), prior=0.5)
    assert {n: s.shape for n, s in model.sites.items()} == {"q_proj.lora_S": (2, 1, 4), "v_proj.lora_S": (2, 1, 4)}
    assert all(torch.equal(v, torch.zeros(2, 1, 4)) for v in model.adapter_values().values())
    lora = [p for n, p in model.net.named_parameters() if "lora_" in n]
    assert len(lora) == 8 and all(p.requires_grad for p in lora)  # A and B: point estimates
    guide = ScalaBLGuide(model)
    assert guide.extra_parameters() == 2 * 2 * (2 * 4)  # mean and std per random number
    with pytest.raises(ValueError, match="random sites are always the S"):
        ScalaBLModel(tiny_llama(), CausalLM(), random="A")
    with pytest.raises(ValueError, match="needs a ScalaBLModel"):
        ScalaBLGuide(LoraModel(tiny_llama(), CausalLM(), random="A"))
    # a plain LoraModel over S sites skipped the rotation: its log-scales scaled rows of A that are no singular directions
    net = tiny_llama(r=4)
    with pytest.raises(ValueError, match=r"^random='S' \(ScalaBL log-scales\) needs the layers a ScalaBLModel prepares, "
                                         r"and this is a LoraModel: build a ScalaBLModel"):
        LoraModel(net, CausalLM(), random="S")
    assert not any(hasattr(m, handoff._HOLDER) for m in net.modules())  # refused before it touched the network
    with pytest.raises(ValueError, match="no peft parameter"):
        model.write_adapter(model.adapter_values())


def test_log_scale_delta_matches_dense_and_sample_path():
    x = torch.randn(6, 5, 7)
    a, b, z = torch.randn(3, 7), torch.randn(4, 3), torch.randn(1, 3)
    dense = x @ (b @ torch.diag(z[0].exp()) @ a).T
    torch.testing.assert_close(handoff.lora_delta(x, a, b, log_scale=z), dense)
    zs = torch.randn(2, 1, 3)
    out = handoff.lora_delta(x, a, b, num_samples=2, log_scale=zs)  # rows 0-2 sample 0, rows 3-5 sample 1
    for s in range(2):
        torch.testing.assert_close(out[3 * s : 3 * s + 3], handoff.lora_delta(x[3 * s : 3 * s + 3], a, b, log_scale=zs[s]))


def test_kl_and_log_prob_match_dense_reference():
    model = ScalaBLModel(tiny_bert(), SequenceClassification(), prior=0.7)
    guide = ScalaBLGuide(model, init_scale=0.4)
    with torch.no_grad():
        for loc in guide.locs:
            loc.normal_(0, 0.3)
    post = guide.posterior()
    for name, site in model.sites.items():
        q, p = post[name], model.prior_distribution(site)
        dense_q = MultivariateNormal(q.base_dist.loc.flatten().double(), torch.diag(q.base_dist.scale.flatten().double() ** 2))
        dense_p = MultivariateNormal(torch.zeros(site.numel, dtype=torch.float64), 0.49 * torch.eye(site.numel, dtype=torch.float64))
        torch.testing.assert_close(kl_divergence(q, p).double(), kl_divergence(dense_q, dense_p), rtol=1e-5, atol=1e-5)
        z = q.sample()
        torch.testing.assert_close(q.log_prob(z).double(), dense_q.log_prob(z.flatten().double()), rtol=1e-5, atol=1e-5)


def test_zero_variance_reproduces_map_logits():
    net = tiny_bert()
    batch = batch3()
    map_logits = LoraModel(net, SequenceClassification()).logits(batch)  # the LoRA before the rotation
    model = ScalaBLModel(net, SequenceClassification())
    guide = ScalaBLGuide(model, init_scale=1e-9)
    torch.testing.assert_close(model.logits(batch, guide.mean()), map_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.logits(batch, guide.sample(3), num_samples=3), map_logits.expand(3, -1, -1), rtol=1e-5, atol=1e-6)
    # a scale on one direction does change them: the sites reach the network
    noisy = {n: torch.full_like(v, 0.5) for n, v in guide.mean().items()}
    assert not torch.allclose(model.logits(batch, noisy), map_logits)


def _fit(num_data):
    model = ScalaBLModel(tiny_bert(num_labels=2), SequenceClassification(), prior=1.0, num_data=num_data)
    guide = ScalaBLGuide(model)
    losses = fit(model, guide, toy_data(), epochs=20, lr=1e-2, elbo=TraceMeanField_ELBO(), progress=False)
    return losses, torch.cat([s.detach().log().flatten() for s in guide.stds().values()]), model, guide


def test_svi_lowers_loss_and_posterior_concentrates_with_data():
    small_losses, small, _, _ = _fit(48)
    large_losses, large, model, guide = _fit(4800)
    for losses in (small_losses, large_losses):
        assert sum(losses[-6:]) < 0.2 * sum(losses[:6])
    # 48 examples leave the stds at the prior's (log 0, from log 0.1); 100x the data pulls them in
    assert abs(small.mean()) < 0.05
    assert large.mean() < small.mean() - 0.15 and large.min() < small.min() - 0.4
    labels = torch.cat([b["labels"] for b in toy_data()])
    assert (predict(model, guide, toy_data(), num_samples=4).probs.argmax(-1) == labels).float().mean() > 0.9


def test_save_load_round_trip(tmp_path):
    model = ScalaBLModel(tiny_bert(), SequenceClassification(), prior=0.5, num_data=48)
    guide = ScalaBLGuide(model)
    fit(model, guide, toy_data(), epochs=1, lr=1e-2, elbo=TraceMeanField_ELBO(), progress=False)
    save_guide(guide, tmp_path / "scalabl")
    fresh = ScalaBLModel(tiny_bert(), SequenceClassification(), rotate=False, prior=0.5)  # A, B come from the file
    loaded = load_guide(tmp_path / "scalabl", fresh)
    assert type(loaded) is ScalaBLGuide and loaded.config() == guide.config()
    batch = batch3()
    torch.testing.assert_close(fresh.logits(batch, loaded.mean()), model.logits(batch, guide.mean()))


def test_the_starting_std_is_the_priors_whatever_the_initial_mean():
    """A warm start's std was init_scale times the RMS of its mean (mean-field's rule): 0.001 for init 0.01, not the
    documented init_scale x prior std = 0.05."""
    model = ScalaBLModel(tiny_llama(r=4), CausalLM(), prior=0.5)
    for init in (None, {n: torch.full(s.shape, 0.01) for n, s in model.sites.items()}):
        for std in ScalaBLGuide(model, init_scale=0.1, init=init).stds().values():
            torch.testing.assert_close(std, torch.full_like(std, 0.05))


def test_a_bad_initial_mean_is_refused_by_name():
    """init was not checked: NaN predicted NaN, a transposed [2, 4, 1] mean failed later in a forward."""
    model = ScalaBLModel(tiny_llama(r=4), CausalLM(), prior=0.5)
    with pytest.raises(ValueError, match="'q_proj.lora_S' has non-finite values"):
        ScalaBLGuide(model, init={n: torch.full(s.shape, float("nan")) for n, s in model.sites.items()})
    with pytest.raises(ValueError, match=r"'q_proj.lora_S' expects shape \(2, 1, 4\), got \(2, 4, 1\)"):
        ScalaBLGuide(model, init={n: torch.zeros(2, 4, 1) for n in model.sites})


def test_a_refused_scalabl_model_leaves_the_network_as_it_was():
    """ScalaBLModel rotated A and B (8 matrices) before LoraModel's refusals (a prior of -1, a regression head, an
    adapter that is not the active one), so a MAP's written adapter no longer held its values; every refusal comes
    before the rotation. LaplaceGuide's refusal of the S sites called them LoRA-XS cores."""
    from peft import LoraConfig

    from pyro_lora.guides import LaplaceGuide

    net = tiny_bert()
    net.add_adapter("other", LoraConfig(r=2, target_modules=["query"]))
    regression = tiny_bert(num_labels=2)
    regression.base_model.model.config.num_labels = 1
    before = {id(n): {k: p.detach().clone() for k, p in n.named_parameters()} for n in (net, regression)}
    for make, why in [(lambda: ScalaBLModel(net, SequenceClassification(), prior=-1.0), "prior must be"),
                      (lambda: ScalaBLModel(regression, SequenceClassification()), "regression head"),
                      (lambda: ScalaBLModel(net, SequenceClassification(), adapter="other"), "not the network's active")]:
        with pytest.raises(ValueError, match=why):
            make()
    for n in (net, regression):
        assert all(torch.equal(p, before[id(n)][k]) for k, p in n.named_parameters())
        assert not any(hasattr(m, handoff._HOLDER) for m in n.modules())
    with pytest.raises(ValueError, match=r"site\(s\) \['query.lora_S', 'value.lora_S'\] are ScalaBL log-scales$"):
        LaplaceGuide(ScalaBLModel(net, SequenceClassification()))
