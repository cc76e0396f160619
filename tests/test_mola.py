"""Mixture of Laplace approximations: each component is the Laplace of its member's own network (LoRA and head), the
predictive is their average, and what it cannot do is refused."""

import math

import pyro
import pytest
import torch
from conftest import random_batch, tiny_bert

from pyro_lora import LoraModel, SequenceClassification, load_guide, predict, save_guide
from pyro_lora.distributions import UniformMixture
from pyro_lora.guides import LaplaceGuide, LaplaceMixtureGuide, get_method, train_ensemble
from pyro_lora.guides.ensemble import predict_ensemble


def data():
    return [random_batch(seed=s) | {"labels": torch.tensor([0, 2, 1])} for s in (1, 2)]


def trained_ensemble(k=2):
    torch.manual_seed(0)
    model = LoraModel(tiny_bert(r=4), SequenceClassification(), random="AB", prior=0.5, num_data=6)
    return model, train_ensemble(model, data(), k=k, fit_kwargs={"epochs": 3, "lr": 5e-2})


def fitted_mixture(k=2):
    model, ensemble = trained_ensemble(k)
    guide = LaplaceMixtureGuide.from_ensemble(ensemble, fisher="exact", rank=3).fit(data(), progress=False)
    guide.optimize_prior_precision("marglik")
    return model, ensemble, guide


def member_laplace(model, ensemble, k):
    """A plain LaplaceGuide on member ``k``'s network, written into the network (LoRA and head)."""
    params = dict(model.net.named_parameters())
    with torch.no_grad():
        for name in ensemble.head_parameters:
            params[name].copy_(ensemble.heads()[name][k])
    model.write_adapter({n: v[k] for n, v in ensemble.members().items()})
    guide = LaplaceGuide(model, fisher="exact", rank=3).fit(data(), progress=False)
    guide.optimize_prior_precision("marglik")
    return guide


def test_the_predictive_is_the_average_of_each_members_own_laplace():
    model, ensemble, guide = fitted_mixture()
    mixture = guide.predict_glm(data())
    assert ensemble.head_parameters  # the members differ in their heads too: each component must run its own
    singles = [member_laplace(model, ensemble, k).predict_glm(data()).probs for k in range(2)]
    assert not torch.allclose(singles[0], singles[1], atol=1e-3)
    torch.testing.assert_close(mixture.probs, torch.stack(singles).mean(0), atol=1e-5, rtol=1e-4)
    for k, component in enumerate(guide.components):
        torch.testing.assert_close(component.prior_precision, member_laplace(model, ensemble, k).prior_precision)


def test_the_network_is_left_as_it_was():
    model, ensemble, guide = fitted_mixture()
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    guide.predict_glm(data())
    for n, p in model.net.named_parameters():
        assert torch.equal(p, before[n]), n


def test_one_member_is_the_laplace_of_that_member():
    model, ensemble = trained_ensemble(k=1)
    guide = LaplaceMixtureGuide.from_ensemble(ensemble, fisher="exact", rank=3).fit(data(), progress=False)
    guide.optimize_prior_precision("marglik")
    mixture = guide.predict_glm(data()).probs  # before the reference writes the member into the network
    torch.testing.assert_close(mixture, member_laplace(model, ensemble, 0).predict_glm(data()).probs)


def test_draw_s_comes_from_component_s_mod_k():
    model, ensemble, guide = fitted_mixture(k=3)
    for component in guide.components:
        component.set_prior_precision(1e12)  # every draw at its component's mean
    with guide.member_heads(6):
        draws = guide.sample(6)
    for name, v in ensemble.members().items():
        torch.testing.assert_close(draws[name], v[torch.arange(6) % 3], atol=1e-4, rtol=0)


def test_weight_samples_need_the_members_heads():
    model, _, guide = fitted_mixture()
    with pytest.raises(ValueError, match=r"draw its samples inside guide.member_heads\(4\)"):
        predict(model, guide, data(), num_samples=4)
    pyro.set_rng_seed(0)
    assert predict_ensemble(model, guide, data(), num_samples=4).probs.shape == (6, 3)


def test_an_iterator_is_refused_before_any_pass():
    model, ensemble = trained_ensemble()
    guide = LaplaceMixtureGuide.from_ensemble(ensemble, rank=3)
    with pytest.raises(ValueError, match="reads the data once per member: give a list or a DataLoader, not a list_iterator"):
        guide.fit(iter(data()), progress=False)
    with pytest.raises(ValueError, match="no posterior yet: call fit"):
        guide.predict_glm(data())
    guide.fit(data(), progress=False)
    with pytest.raises(ValueError, match="once per member"):
        guide.predict_glm(iter(data()))


def test_a_shuffling_loader_is_refused_for_predictions_it_would_mix_up():
    """Each pass is averaged example by example: a shuffled order pairs one example's component with another's."""
    from torch.utils.data import DataLoader

    model, _, guide = fitted_mixture()
    rows = [{k: v[i] for k, v in batch.items()} for batch in data() for i in range(3)]
    with pytest.raises(ValueError, match="RandomSampler .* give a DataLoader with shuffle=False"):
        guide.predict_glm(DataLoader(rows, batch_size=3, shuffle=True))
    guide.fit(DataLoader(rows, batch_size=3, shuffle=True), progress=False)  # the curvature's sums take any order
    in_order = guide.predict_glm(DataLoader(rows, batch_size=3)).probs
    torch.testing.assert_close(in_order, guide.predict_glm(data()).probs)


def test_a_head_changed_since_the_fit_is_refused():
    model, _, guide = fitted_mixture()
    head = next(p for n, p in model.net.named_parameters() if n.endswith("modules_to_save.default.weight"))
    with torch.no_grad():
        head.add_(0.1)
    with pytest.raises(ValueError, match="cannot predict with this LaplaceMixtureGuide .* changed since"):
        guide.predict_glm(data())


def test_a_model_over_another_network_is_refused():
    _, ensemble = trained_ensemble()
    other = LoraModel(tiny_bert(r=4), SequenceClassification(), random="AB", prior=0.5, num_data=6)
    with pytest.raises(ValueError, match="must run the ensemble's network"):
        LaplaceMixtureGuide.from_ensemble(ensemble, other)


def test_save_and_load_with_heads_give_the_same_predictive(tmp_path):
    model, _, guide = fitted_mixture()
    before = guide.predict_glm(data()).probs
    save_guide(guide, tmp_path / "g")
    loaded = load_guide(tmp_path / "g", model)
    assert loaded.num_members == 2 and loaded.head_parameters == guide.head_parameters
    torch.testing.assert_close(loaded.predict_glm(data()).probs, before)


def test_the_compare_method_starts_from_the_ensemble():
    m = get_method("mola")
    assert m.base == "ensemble" and m.needs_training and m.bayesian and not m.exportable
    assert m.predictive.__name__ == "mixture_glm_probit" and not m.predictive.uses_samples


# UniformMixture against dense references


def _components():
    return [pyro.distributions.Normal(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.5])).to_event(1),
            pyro.distributions.Normal(torch.tensor([2.0, -1.0]), torch.tensor([0.3, 2.0])).to_event(1)]


def test_uniform_mixture_log_prob_mean_and_variance():
    parts = _components()
    q = UniformMixture(parts)
    x = torch.tensor([[0.5, 0.2], [1.9, -2.0], [10.0, 3.0]])
    dense = torch.log(0.5 * parts[0].log_prob(x).exp() + 0.5 * parts[1].log_prob(x).exp())
    torch.testing.assert_close(q.log_prob(x)[:2], dense[:2])
    assert math.isfinite(float(q.log_prob(x)[2]))  # far in a tail: logsumexp, not log of a sum of exps
    torch.testing.assert_close(q.mean, torch.tensor([1.0, 0.0]))
    second = 0.5 * (torch.tensor([1.0, 0.25]) + torch.tensor([0.0, 1.0])) + 0.5 * (torch.tensor([0.09, 4.0]) + torch.tensor([4.0, 1.0]))
    torch.testing.assert_close(q.variance, second - q.mean.pow(2))


def test_uniform_mixture_samples_each_component_half_the_time():
    torch.manual_seed(0)
    parts = [pyro.distributions.Normal(torch.full((2,), -5.0), 0.01).to_event(1),
             pyro.distributions.Normal(torch.full((2,), 5.0), 0.01).to_event(1)]
    draws = UniformMixture(parts).sample((4000,))
    assert draws.shape == (4000, 2)
    assert bool(((draws[:, 0] > 0) == (draws[:, 1] > 0)).all())  # one component per draw, not per entry
    assert abs(float((draws[:, 0] > 0).double().mean()) - 0.5) < 0.03


def test_uniform_mixture_refuses_mismatched_components():
    with pytest.raises(ValueError, match="at least one component"):
        UniformMixture([])
    with pytest.raises(ValueError, match="one event shape"):
        UniformMixture([pyro.distributions.Normal(torch.zeros(2), 1.0).to_event(1),
                        pyro.distributions.Normal(torch.zeros(3), 1.0).to_event(1)])
