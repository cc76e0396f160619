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


def test_the_mixtures_glm_predictive_predicts_unlabelled_batches():
    """As Laplace's: the probabilities (and draws) of the labelled batches, labels None; refused before."""
    _, _, guide = fitted_mixture()
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in data()]
    for link in ("probit", "mc"):
        torch.manual_seed(0)
        labelled = guide.predict_glm(data(), link=link, num_samples=20, keep_samples=True)
        torch.manual_seed(0)
        bare = guide.predict_glm(unlabelled, link=link, num_samples=20, keep_samples=True)
        assert bare.labels is None and labelled.labels.shape == (6,)
        torch.testing.assert_close(bare.probs, labelled.probs, rtol=0, atol=0)
        torch.testing.assert_close(bare.sample_probs, labelled.sample_probs, rtol=0, atol=0)


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


def test_chunked_draws_keep_each_components_spread():
    """With chunk_size, predict drew the members' point values (the plain ensemble's predictions, draws of one component
    identical) for a mixture without per-member heads (a head peft does not train)."""
    from conftest import tiny_bert_base
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = get_peft_model(tiny_bert_base(3), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    model = LoraModel(net, SequenceClassification(), random="AB", prior=0.5, num_data=6)
    ensemble = train_ensemble(model, data(), k=2, fit_kwargs={"epochs": 3, "lr": 5e-2})
    assert not ensemble.head_parameters
    guide = LaplaceMixtureGuide.from_ensemble(ensemble, fisher="exact", rank=3).fit(data(), progress=False)
    for component in guide.components:
        component.set_prior_precision(1e-3)  # a wide posterior: draws of one component differ visibly
    chunked = predict(model, guide, data(), num_samples=4, chunk_size=2, keep_samples=True).sample_probs
    assert (chunked[0] - chunked[2]).abs().max() > 1e-3  # both from component 0: were equal, its point value
    for component in guide.components:
        component.set_prior_precision(1e12)  # every draw at its component's mean
    chunked = predict(model, guide, data(), num_samples=6, chunk_size=4, keep_samples=True).sample_probs
    members = predict(model, ensemble, data(), num_samples=2, keep_samples=True).sample_probs
    torch.testing.assert_close(chunked, members[torch.arange(6) % 2], atol=1e-4, rtol=0)  # draw s: component s mod K


def test_the_pyro_guides_log_density_of_a_draw_is_the_mixtures():
    """Importance and RenyiELBO weigh a draw by exp(log p - log q): the guide's log-density of a draw was that of the
    component k that drew it, log q_k(theta) - log K, not the mixture's log (1/K sum_j q_j(theta)): -log q(k | theta)
    short of it (1.0 to 2.2 nats here), and Importance's log p(y) converged to log p(y) + log K."""
    from conftest import tiny_bert_base
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = get_peft_model(tiny_bert_base(3), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    model = LoraModel(net, SequenceClassification(), random="AB", prior=0.5, num_data=6)
    ensemble = train_ensemble(model, data(), k=2, fit_kwargs={"epochs": 3, "lr": 5e-2})
    guide = LaplaceMixtureGuide.from_ensemble(ensemble, fisher="exact", rank=3).fit(data(), progress=False)
    for component in guide.components:
        component.set_prior_precision(1.0)  # wide: the components overlap
    for seed in range(3):
        pyro.set_rng_seed(seed)
        trace = pyro.poutine.trace(guide).get_trace(data()[0])
        theta = {name: trace.nodes[name]["value"] for name in model.sites}
        each = torch.stack([sum(c.posterior()[n].log_prob(v) for n, v in theta.items()) for c in guide.components])
        torch.testing.assert_close(trace.log_prob_sum(), torch.logsumexp(each, 0) - math.log(2))
        gap = torch.logsumexp(each, 0) - each[trace.nodes["ensemble_member"]["value"]]  # -log q(k | theta)
        assert gap > 0.5


def test_weight_samples_need_the_members_heads():
    model, _, guide = fitted_mixture()
    with pytest.raises(ValueError, match=r"draw its samples inside guide.member_heads\(4\)"):
        predict(model, guide, data(), num_samples=4)
    pyro.set_rng_seed(0)
    assert predict_ensemble(model, guide, data(), num_samples=4).probs.shape == (6, 3)


def test_an_iterator_is_refused_where_each_member_reads_the_data():
    model, ensemble = trained_ensemble()
    guide = LaplaceMixtureGuide.from_ensemble(ensemble, rank=3)
    with pytest.raises(ValueError, match=r"data is a one-shot iterator \(list_iterator\).*a Laplace mixture reads it once per member"):
        guide.fit(iter(data()), progress=False)
    with pytest.raises(ValueError, match="no posterior yet: call fit"):
        guide.predict_glm(data())
    guide.fit(data(), progress=False)
    torch.testing.assert_close(guide.predict_glm(iter(data())).probs, guide.predict_glm(data()).probs)  # one pass
    grid = [0.1, 1.0, 10.0]  # the search and its refinement: two passes over the batches read once
    assert guide.optimize_prior_precision("val_nll", val_loader=iter(data()), grid=grid) == \
        guide.optimize_prior_precision("val_nll", val_loader=data(), grid=grid)


class Alternating:
    """Batches in order on the first pass, reversed on the next, and so on: labels [0, 2, 1] in both."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1  # runs at the first batch read: an iterator made and dropped unread (tqdm's) is no pass
        yield from (self.batches if self.passes % 2 else self.batches[::-1])


def test_every_component_scores_a_batch_in_one_pass():
    """A loader that reads the examples in another order on each pass (a shuffling batch sampler or stream) mixed one
    example's component with another's where the labels matched."""
    model, _, guide = fitted_mixture()
    expected = guide.predict_glm(data()).probs
    torch.testing.assert_close(guide.predict_glm(Alternating(data())).probs, expected)


def test_a_failure_in_a_later_members_pass_leaves_every_component_as_it_was():
    model, _, guide = fitted_mixture()
    before = guide.predict_glm(data()).probs
    lams = [c.prior_precision for c in guide.components]

    class FailsOnSecondPass(Alternating):
        def __iter__(self):
            if self.passes == 1:
                raise OSError("stream dropped")
            yield from super().__iter__()

    other = [random_batch(seed=s) | {"labels": torch.tensor([1, 1, 0])} for s in (7, 8)]
    with pytest.raises(OSError):
        guide.fit(FailsOnSecondPass(other), progress=False)
    def fails_at_its_second_batch():
        yield other[0]
        raise OSError("stream dropped")

    class Stream:
        def __iter__(self):
            return fails_at_its_second_batch()

    with pytest.raises(OSError):
        guide.optimize_prior_precision("val_nll", val_loader=Stream(), grid=[0.1, 1.0, 10.0])
    torch.testing.assert_close(guide.predict_glm(data()).probs, before)
    for c, lam in zip(guide.components, lams):
        torch.testing.assert_close(c.prior_precision, lam)
    assert [float(c.num_data) for c in guide.components] == [6.0, 6.0]


def test_a_mixture_refit_over_other_examples_is_said_once_and_only_where_it_stands():
    """A refit replaces the fit: over other examples (as many as before, num_data's 6) it is said once, as the
    mixture's; a refit that fails leaves the components, and the examples they were fitted on, as they were."""
    import warnings

    _, _, guide = fitted_mixture()
    other = [random_batch(seed=s) | {"labels": torch.tensor([1, 1, 0])} for s in (7, 8)]

    class FailsOnSecondPass(Alternating):
        def __iter__(self):
            if self.passes == 1:
                raise OSError("stream dropped")
            yield from super().__iter__()

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(OSError):  # component 0 refitted on other before component 1's pass failed: no refit stands
            guide.fit(FailsOnSecondPass(other), progress=False)
        guide.fit(data(), progress=False)  # the examples of its fit again
    with pytest.warns(UserWarning) as said:
        guide.fit(other, progress=False)
    assert len(said) == 1 and str(said[0].message).startswith(
        "LaplaceMixtureGuide.fit replaced the earlier fit over 6 examples by one over a different set of 6 examples: ")


def test_a_saved_mixture_predicts_the_same_in_a_fresh_network_with_another_head(tmp_path):
    model, _, guide = fitted_mixture()
    before = guide.predict_glm(data()).probs
    save_guide(guide, tmp_path / "g")
    net = tiny_bert(r=4)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.3)
    loaded = load_guide(tmp_path / "g", LoraModel(net, SequenceClassification(), random="AB", prior=0.5, num_data=6))
    torch.testing.assert_close(loaded.predict_glm(data()).probs, before)
    loaded.optimize_prior_precision("val_nll", val_loader=data(), grid=[0.1, 1.0, 10.0])


def test_an_ensemble_of_another_adapter_or_base_is_refused():
    from peft import LoraConfig

    model, ensemble = trained_ensemble()
    model.net.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    model.net.set_adapter("other")
    other = LoraModel(model.net, SequenceClassification(), random="AB", prior=0.5, num_data=6)
    with pytest.raises(ValueError, match="the guide is for adapter 'default', the model runs adapter 'other'"):
        LaplaceMixtureGuide.from_ensemble(ensemble, other)  # its members' heads would never run
    model.net.set_adapter("default")
    with torch.no_grad():
        model.net.base_model.model.bert.embeddings.word_embeddings.weight.add_(0.1)
    with pytest.raises(ValueError, match="base weights differ"):
        LaplaceMixtureGuide.from_ensemble(ensemble)


def test_member_heads_of_another_shape_or_parameter_are_refused():
    model, ensemble = trained_ensemble()
    heads = [{n: v[k] for n, v in ensemble.heads().items()} for k in range(2)]
    members = [{n: v[k] for n, v in ensemble.members().items()} for k in range(2)]
    bias = next(n for n in heads[0] if n.endswith("bias"))
    bad = [{**h, bias: h[bias][:1]} for h in heads]  # broadcast silently over the classes before
    with pytest.raises(ValueError, match="of the parameter's shape \\(3,\\), got shape \\(1,\\)"):
        LaplaceMixtureGuide(model, members, bad)
    with pytest.raises(ValueError, match="must be finite"):
        LaplaceMixtureGuide(model, members, [{**h, bias: h[bias] * float("nan")} for h in heads])
    with pytest.raises(ValueError, match="pooler.dense.weight'\\] are not"):
        LaplaceMixtureGuide(model, members, head_parameters=["base_model.model.bert.pooler.dense.weight"])


def test_vectorized_particles_are_refused_by_name():
    model, ensemble = trained_ensemble()
    guide = LaplaceMixtureGuide.from_ensemble(LaplaceMixtureGuide(model, [{n: v[k] for n, v in ensemble.members().items()}
                                                                          for k in range(2)]), rank=3)
    guide.fit(data(), progress=False)
    with pytest.raises(ValueError, match="vectorized particles"):
        pyro.infer.Predictive(model, guide=guide, num_samples=3, parallel=True)(data()[0])


def test_the_network_head_changed_since_the_fit_is_no_change_under_a_mixture_carrying_its_heads():
    """Each component runs with its member's head in the network head's place: the network's own never enters its
    predictive, which was refused all the same."""
    model, _, guide = fitted_mixture()
    before = guide.predict_glm(data()).probs
    head = next(p for n, p in model.net.named_parameters() if n.endswith("modules_to_save.default.weight"))
    with torch.no_grad():
        head.add_(0.1)
    torch.testing.assert_close(guide.predict_glm(data()).probs, before, rtol=0, atol=0)


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


def test_val_nll_picks_the_lambda_of_lowest_mixture_nll_on_a_dense_reference():
    """One lambda for all components, scored by the NLL of the predictive predict_glm reports."""
    from pyro_lora.metrics import nll

    model, _, guide = fitted_mixture()
    val = [random_batch(seed=9) | {"labels": torch.tensor([2, 0, 1])}]
    grid = [0.01, 0.1, 1.0, 10.0, 100.0]
    nlls = guide.optimize_prior_precision("val_nll", val_loader=val, grid=grid, refine=False)
    reference = []
    for lam in grid:
        for component in guide.components:
            component.set_prior_precision(lam)
        p = guide.predict_glm(val)
        reference.append(nll(p.probs, p.labels))
    assert nlls == pytest.approx(reference, rel=1e-5)
    best = grid[min(range(len(grid)), key=reference.__getitem__)]
    guide.optimize_prior_precision("val_nll", val_loader=val, grid=grid, refine=False)
    for component in guide.components:
        assert float(component.factors[0].prior_precision[0]) == pytest.approx(best)


def test_val_nll_refuses_what_it_cannot_use():
    model, _, guide = fitted_mixture()
    with pytest.raises(ValueError, match="needs val_loader"):
        guide.optimize_prior_precision("val_nll")
    with pytest.raises(ValueError, match="takes val_loader, grid, refine and progress; got \\['per_layer'\\]"):
        guide.optimize_prior_precision("val_nll", val_loader=data(), per_layer=True)
    with pytest.raises(ValueError, match="finite positive"):
        guide.optimize_prior_precision("val_nll", val_loader=data(), grid=[0.0, 1.0])
    with pytest.raises(ValueError, match="'marglik' or 'val_nll'"):
        guide.optimize_prior_precision("gridsearch")


def test_a_component_alone_predicts_only_with_its_members_head():
    """components[k] passed every check on the network's own head and predicted member k's LoRA with it (0.6 off)."""
    model, ensemble, guide = fitted_mixture()
    with pytest.raises(ValueError, match="changed since this guide was built or trained"):
        guide.components[1].predict_glm(data())
    with pytest.raises(ValueError, match="changed since this guide was built or trained"):
        predict(model, guide.components[1], data(), num_samples=2)
    reference = member_laplace(model, ensemble, 1)  # member 1's head and LoRA written into the network
    torch.testing.assert_close(guide.components[1].predict_glm(data()).probs, reference.predict_glm(data()).probs)


@pytest.mark.parametrize("labels", [torch.tensor([[0], [2], [1]]), torch.tensor([0, 3, 1]), torch.tensor([0.0, 2.0, 1.0])])
def test_labels_that_are_not_class_indices_are_refused(labels):
    """[N, 1] labels broadcast against the grid and scored grid value g with example g's label."""
    model, _, guide = fitted_mixture()
    bad = [data()[0] | {"labels": labels}]
    with pytest.raises(ValueError, match="labels (must have shape \\[N\\]|out of range|must be integer)"):
        guide.optimize_prior_precision("val_nll", val_loader=bad, grid=[0.1, 1.0, 10.0])
    with pytest.raises(ValueError, match="labels (must have shape \\[N\\]|out of range|must be integer)"):
        guide.predict_glm(bad)


def test_inference_mode_is_refused_by_name():
    model, _, guide = fitted_mixture()
    with torch.inference_mode(), pytest.raises(ValueError, match="inside torch.inference_mode\\(\\).* gradients"):
        guide.predict_glm(data())
    with torch.no_grad():
        guide.predict_glm(data())


def test_fit_and_val_nll_refuse_a_loader_that_drops_its_last_batch():
    """val_nll read its loader into a list before anything could see it drop its last incomplete batch: one lambda for
    every component was chosen on 4 of the 6 validation examples without a word; the fit summed 4 of 6 (warned only as
    another count than num_data)."""
    from torch.utils.data import DataLoader

    _, _, guide = fitted_mixture()
    rows = [{k: v[i] for k, v in b.items()} for b in data() for i in range(3)]
    dropping = DataLoader(rows, batch_size=4, drop_last=True)
    before = [c.prior_precision for c in guide.components]
    with pytest.raises(ValueError, match=r"LaplaceMixtureGuide val_nll reads every example of its data, but this DataLoader "
                                         r"drops its last incomplete batch \(drop_last=True\)"):
        guide.optimize_prior_precision("val_nll", val_loader=dropping)
    with pytest.raises(ValueError, match="a Laplace fit reads every example of its data, but this DataLoader drops"):
        guide.fit(dropping, progress=False)
    for c, lam in zip(guide.components, before):
        for name in lam:
            assert torch.equal(c.prior_precision[name], lam[name])


def test_a_base_fitted_inside_another_methods_view_gets_its_own_likelihood():
    """mola's view (KFAC's cloze form: no shared prefix) fitted the ensemble it starts from, where the ensemble was
    not kept (a resumed run, mola alone or first), under mola's likelihood: the members trained without the shared
    prefix, and mola's rows moved by 9e-8 in probability against an uninterrupted run's."""
    from pyro_lora.experiments.setup import CompareConfig, Setup
    from pyro_lora.likelihoods import MultipleChoice

    setup = Setup(CompareConfig(out="unused", guides=("ensemble", "mola"), progress=False), None, None,
                  MultipleChoice(format="cloze", normalize="chars"), [], [], [], None)
    mola = setup.for_method("mola")
    assert mola.likelihood.share_prefix is False  # KFAC's form
    for view in (mola.for_method("ensemble"), setup.for_method("ensemble")):
        assert view.likelihood.share_prefix is True and view.likelihood.normalize == "chars"
