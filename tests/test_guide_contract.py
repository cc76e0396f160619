"""One contract over every guide class: Pyro sites equal the model's, the fast path's shapes, a JSON config, the
save/load round trip, Pyro's SVI with a Pyro optimizer, and the refusal of a model the guide was not built for.

A guide class exported by ``guides`` without a builder here fails ``test_every_guide_class_is_covered``.
"""

import contextlib
import copy
import inspect
import json
import math
import sys
import warnings

import numpy as np
import pyro
import pyro.optim
import pyro.poutine as poutine
import pytest
import torch
from conftest import random_batch, tiny_bert, tiny_bert_base, tiny_llama
from peft import LoraConfig, get_peft_model
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

import pyro_lora.guides as guides
from pyro_lora.guides import (
    EnsembleGuide,
    FlowGuide,
    LaplaceGuide,
    LastLayerLaplaceGuide,
    LoraGuide,
    MAPGuide,
    MCDropoutGuide,
    MeanFieldGuide,
    ScalaBLGuide,
    SWAGCollector,
    SWAGGuide,
    TFBGuide,
)
from pyro_lora import LoraModel, ScalaBLModel, SequenceClassification, export_adapter, fit, load_guide, predict, save_guide
from pyro_lora import ownership
from pyro_lora.contract import describe, differences
from pyro_lora.likelihoods import CausalLM
from pyro_lora.loraxs import LoraXSModel


def data():
    return [random_batch(seed=s) | {"labels": torch.tensor([0, 2, 1])} for s in (1, 2)]


def lora(r=4, dtype=torch.float32, **kw):
    return LoraModel(tiny_bert(r=r, dtype=dtype), SequenceClassification(), prior=0.5, num_data=6, **kw)


def _swag(dtype):
    model = LoraXSModel(tiny_bert(dtype=dtype, random_b=False), SequenceClassification(), num_data=6)
    swag = SWAGGuide(model, rank=2)
    fit(model, MAPGuide(model), data() * 2, lr=1e-2, callbacks=[SWAGCollector(swag)], progress=False)
    return model, swag


def _ensemble(dtype):
    model = lora(dtype=dtype)
    members = [{n: v + 0.05 * k for n, v in model.adapter_values().items()} for k in range(2)]
    return model, EnsembleGuide(model, members)


def _mola(dtype):
    model, ensemble = _ensemble(dtype)
    return model, guides.LaplaceMixtureGuide.from_ensemble(ensemble, fisher="exact", rank=3).fit(data(), progress=False)


def _scalabl(dtype):
    model = ScalaBLModel(tiny_bert(dtype=dtype), SequenceClassification(), prior=0.5, num_data=6)
    return model, ScalaBLGuide(model)


# guide class -> builder(dtype of the base network) -> (model, guide)
BUILDERS = {
    MAPGuide: lambda dtype=torch.float32: (m := lora(dtype=dtype), MAPGuide(m)),
    MeanFieldGuide: lambda dtype=torch.float32: (m := lora(dtype=dtype), MeanFieldGuide(m, b="normal")),
    FlowGuide: lambda dtype=torch.float32: (m := lora(dtype=dtype), FlowGuide(m, init_scale=0.1)),
    TFBGuide: lambda dtype=torch.float32: (m := lora(dtype=dtype), TFBGuide(m, sigma_q=0.01)),
    LaplaceGuide: lambda dtype=torch.float32: (m := lora(dtype=dtype), LaplaceGuide(m, fisher="exact", rank=3).fit(data(), progress=False)),
    LastLayerLaplaceGuide: lambda dtype=torch.float32: (m := lora(dtype=dtype), LastLayerLaplaceGuide(m).fit(data(), progress=False)),
    SWAGGuide: lambda dtype=torch.float32: _swag(dtype),
    ScalaBLGuide: lambda dtype=torch.float32: _scalabl(dtype),
    MCDropoutGuide: lambda dtype=torch.float32: (m := lora(dtype=dtype), MCDropoutGuide(m, p=0.2)),
    EnsembleGuide: lambda dtype=torch.float32: _ensemble(dtype),
    guides.LaplaceMixtureGuide: lambda dtype=torch.float32: _mola(dtype),
    guides.IVONGuide: lambda dtype=torch.float32: (m := lora(dtype=dtype), guides.train_ivon(m, data(), progress=False)),
}


def test_every_guide_class_is_covered():
    exported = {c for c in vars(guides).values() if inspect.isclass(c) and issubclass(c, LoraGuide) and c is not LoraGuide}
    assert exported == set(BUILDERS), f"guides without a contract builder: {exported - set(BUILDERS)}"


@pytest.fixture(params=list(BUILDERS), ids=lambda c: c.__name__)
def built(request):
    torch.manual_seed(0)
    return BUILDERS[request.param]()


def test_pyro_trace_has_the_models_sites_and_shapes(built):
    model, guide = built
    trace = poutine.trace(guide).get_trace(data()[0])
    sites = {
        n: tuple(s["value"].shape)
        for n, s in trace.nodes.items()
        if s["type"] == "sample" and not s["infer"].get("is_auxiliary")
    }
    assert sites == {n: s.shape for n, s in model.sites.items()}
    model_trace = poutine.trace(poutine.replay(model, trace=trace)).get_trace(data()[0])
    assert torch.isfinite(model_trace.log_prob_sum())


def test_a_guide_in_float64_predicts_with_its_own_predictive(built):
    """docs/saving.md: a guide cast with ``guide.double()`` saves, loads and draws in float64; SWAG's draws, the
    Laplace GLM predictive and last-layer Laplace's mixed its float64 state with the network's float32 (a raw
    RuntimeError)."""
    from pyro_lora.guides.registry import METHODS

    model, guide = built
    own = next(m.predictive for m in METHODS.values() if m.guide is type(guide))
    pyro.set_rng_seed(0)
    single = own(guide, data(), 4).probs
    guide.double()
    pyro.set_rng_seed(0)
    double = own(guide, data(), 4).probs
    assert double.shape == single.shape and torch.isfinite(double).all()
    assert torch.allclose(double.sum(-1).double(), torch.ones(len(double), dtype=torch.float64), atol=1e-5)


def test_fast_path_shapes(built):
    model, guide = built
    samples, mean = guide.sample(4), guide.mean()  # 4: a multiple of the ensemble's 2 members
    assert {n: tuple(v.shape) for n, v in samples.items()} == {n: (4, *s.shape) for n, s in model.sites.items()}
    assert {n: tuple(v.shape) for n, v in mean.items()} == {n: s.shape for n, s in model.sites.items()}


@pytest.mark.parametrize("cls", list(BUILDERS), ids=lambda c: c.__name__)
def test_a_rank_above_the_layers_width_keeps_the_sites_shapes_or_is_refused(cls, monkeypatch, tmp_path):
    """r = 40 > d_in = d_out = 32: TFB's SVD gave A' of 32 rows for sites of 40 (saved, then failed to load), ScalaBL's
    rotation failed with a shape error; LoRA-XS cores are r x r of W0's top r singular directions: refused."""
    monkeypatch.setitem(globals(), "tiny_bert", lambda r=4, bert=tiny_bert, **kw: bert(r=40, **kw))  # every builder
    torch.manual_seed(0)
    if cls is SWAGGuide:
        with pytest.raises(ValueError, match=r"LoRA rank 40 of .* exceeds min\(d_out, d_in\) = 32"):
            BUILDERS[cls]()
        return
    model, guide = BUILDERS[cls]()
    shapes = {n: s.shape for n, s in model.sites.items()}
    assert 40 in next(iter(shapes.values()))
    trace = poutine.trace(guide).get_trace(data()[0])
    assert {n: tuple(trace.nodes[n]["value"].shape) for n in shapes} == shapes
    assert {n: tuple(v.shape[1:]) for n, v in guide.sample(4).items()} == shapes
    save_guide(guide, tmp_path / "g")
    for n, v in load_guide(tmp_path / "g", model).mean().items():
        torch.testing.assert_close(v, guide.mean()[n])


@pytest.mark.parametrize("count", [True, 2.0, 0, -2, torch.tensor(2), "4"])
def test_sample_refuses_a_count_that_is_no_positive_integer(built, count):
    _, guide = built  # True drew one sample, 0 none, 2.0 and a tensor reached torch's own errors (or drew)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        guide.sample(count)


@pytest.mark.parametrize("count", [True, 0, -2, 2.0, torch.tensor(2)])
def test_an_ensembles_member_heads_and_a_flows_kl_draws_refuse_a_count_that_is_no_positive_integer(count):
    _, ensemble = BUILDERS[EnsembleGuide]()  # 0 entered the context, a tensor was taken, -2 and 2.0 reached torch's errors
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        with ensemble.member_heads(count):
            pass
    _, flow = BUILDERS[FlowGuide]()
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        flow.kl_terms(count)


@pytest.mark.parametrize("count", [True, 0, -1, 2.0, torch.tensor(2)])
def test_the_models_sampled_logits_and_the_glm_draws_refuse_a_count_that_is_no_positive_integer(count):
    from pyro_lora.kfac import glm_probs

    model, guide = BUILDERS[MAPGuide]()  # 0 returned an empty [0, N, C]; True and 2.0 reached torch's errors
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        model.logits(data()[0], guide.sample(2), num_samples=count)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        glm_probs(torch.zeros(3, 2), torch.eye(2).expand(3, 2, 2), "mc", count)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        glm_probs(torch.zeros(3, 2), torch.eye(2).expand(3, 2, 2), "probit", count)  # unused there, refused all the same


def test_config_survives_json(built):
    _, guide = built
    config = guide.config()
    assert json.loads(json.dumps(config)) == config


def _predictive(model, guide):
    """``guide -> Prediction``: weight samples where they carry the posterior; else (refused by ``predict``, which names
    the guide's own) the predictive its registered method reports."""
    if guide.samples_carry_posterior:
        return lambda g: predict(model, g, data(), num_samples=4)
    with pytest.raises(ValueError, match=r"predict refused .* use its own predictive"):
        predict(model, guide, data())
    own = next(m.predictive for m in guides.METHODS.values() if m.guide is type(guide))
    return lambda g: own(g, data(), 4)


def test_save_load_round_trip_gives_the_same_predictive(built, tmp_path):
    model, guide = built
    predictive = _predictive(model, guide)
    pyro.set_rng_seed(5)
    before = predictive(guide)
    save_guide(guide, tmp_path / "g")
    loaded = load_guide(tmp_path / "g", model)
    assert type(loaded) is type(guide)
    pyro.set_rng_seed(5)
    after = predictive(loaded)
    torch.testing.assert_close(after.probs, before.probs)


def test_a_guide_deep_copies_right_after_a_training_step(built):
    """What a validation-tuned variant does with its base's fit (``Setup.base_fit``): a flow's transforms cached
    tensors of the last step's graph, and ``flow_val`` without ``flow`` in the run failed in ``deepcopy``."""
    model, guide = built
    fit(model, guide, data(), lr=1e-3, train_network=False, progress=False) if list(guide.parameters()) else \
        Trace_ELBO().differentiable_loss(model, guide, data()[0])
    copied = copy.deepcopy(guide)  # last-layer Laplace's copy captured a copied head the network never runs: refused
    predictive = _predictive(model, guide)
    pyro.set_rng_seed(5)
    before = predictive(guide)
    pyro.set_rng_seed(5)
    torch.testing.assert_close(predictive(copied).probs, before.probs)


def test_a_plain_deep_copy_is_a_guide_over_the_same_model_that_pyro_svi_trains(built):
    """``copy.deepcopy(guide)`` copied the model and its network, and kept the original's name in Pyro's param store:
    SVI on the copy was refused ("another tensor than the live parameter")."""
    model, guide = built
    # a guide fitted at the head refuses the step (below): its loss, which Pyro computes the same way
    run = SVI.evaluate_loss if guide.fitted_at_head else SVI.step
    run(SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO()), data()[0])
    copied = copy.deepcopy(guide)
    assert copied.model is model and copied._pyro_name != guide._pyro_name
    for (name, a), b in zip(guide.named_parameters(), copied.parameters()):
        assert a is not b and torch.equal(a, b), name
    assert torch.isfinite(torch.tensor(run(SVI(model, copied, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO()), data()[0])))


def _with_heads():
    """A model and two members, each with its own LoRA values and a head far from the network's."""
    model = lora()
    g = torch.Generator().manual_seed(3)
    members = [{n: v + 0.3 * torch.randn(v.shape, generator=g) for n, v in model.adapter_values().items()} for _ in range(2)]
    heads = [{n: p.detach() + 2.0 * torch.randn(p.shape, generator=g) for n, p in model.named_point_parameters()}
             for _ in range(2)]
    return model, members, heads


def _written(model, values, head):
    """One member the slow way: its LoRA values and head written into a copy of the network, one plain forward."""
    net = copy.deepcopy(model.net)
    params = dict(net.named_parameters())
    twin = LoraModel(net, SequenceClassification(), prior=0.5, num_data=6)
    with torch.no_grad():
        twin.write_adapter(values)
        for n, v in head.items():
            params[n].copy_(v)
    return predict(twin, None, data()).probs


def test_a_deep_copied_ensemble_or_laplace_mixture_runs_each_members_head():
    """The copy's member heads were forward hooks on copied ``nn.Linear`` s the network never runs: a copied ensemble
    ran the network's own head for every member (0.39 off in probability), a copied Laplace mixture 0.37 off."""
    model, members, heads = _with_heads()
    guide = EnsembleGuide(model, members, heads)
    slow = torch.stack([_written(model, members[k], heads[k]) for k in range(2)])
    copied = guides.ensemble.predict_ensemble(model, copy.deepcopy(guide), data(), keep_samples=True)
    torch.testing.assert_close(copied.sample_probs, slow, rtol=1e-5, atol=1e-6)
    mixture = guides.LaplaceMixtureGuide(model, members, heads, fisher="exact", rank=3).fit(data(), progress=False)
    torch.testing.assert_close(copy.deepcopy(mixture).predict_glm(data()).probs, mixture.predict_glm(data()).probs)


def test_a_deep_copied_model_trains_under_its_own_name_and_pickling_one_names_what_to_do():
    """A copy kept the original's name in Pyro's param store: SVI on it after SVI on the original was refused as a store
    restored with get_param_store().load; torch.save(model) failed on a raw weakref."""
    import io

    model = lora()
    SVI(model, MeanFieldGuide(model, b="normal"), pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO()).step(data()[0])
    twin = copy.deepcopy(model)
    assert twin.net is not model.net and twin._pyro_name != model._pyro_name
    svi = SVI(twin, MeanFieldGuide(twin, b="normal"), pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    assert math.isfinite(svi.step(data()[0]))
    with pytest.raises(TypeError, match=r"a LoraModel cannot be pickled .* copy.deepcopy\(model\)"):
        torch.save(model, io.BytesIO())


def test_pickling_a_guide_is_refused_and_names_save_guide(built):
    """torch.save(guide) failed on a weakref of the network, or wrote a file that torch.load could not read."""
    import io

    with pytest.raises(TypeError, match=r"cannot be pickled .* pyro_lora.save_guide\(guide, path\)"):
        torch.save(built[1], io.BytesIO())


def test_a_network_pyro_lora_has_run_pickles_and_unpickles_to_the_same_outputs():
    """A network whose LoRA layers read handed weights held a bound method (not unpicklable) and a weakref of its
    guide (not picklable): torch.save(net) failed."""
    import io

    model = lora()
    guide = MAPGuide(model)
    predict(model, guide, [data()[0]])
    buffer = io.BytesIO()
    torch.save(model.net, buffer)
    buffer.seek(0)
    net = torch.load(buffer, weights_only=False)
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(net(**batch).logits, model.net(**batch).logits)


def test_pyro_svi_with_a_pyro_optimizer_trains_the_guide_and_the_head(built):
    model, guide = built
    model.net.train()
    trainable = {f"guide.{n}": p for n, p in guide.named_parameters() if p.requires_grad}
    trainable |= {f"net.{n}": p for n, p in model.named_point_parameters()}
    assert trainable
    before = {n: p.detach().clone() for n, p in trainable.items()}
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    if guide.fitted_at_head:
        # its posterior was fitted at the head as it is: a step trained the head under it (Laplace's GLM predictive
        # then 0.004 off a refit, its evidence 0.8 nats), and fit alike; refused before anything moves
        name = type(guide).__name__
        with pytest.raises(ValueError, match=rf"^{name}'s posterior was fitted post hoc at the network's point parameters "
                                             r".* this optimiser step would train base_model.model.classifier"):
            svi.step(data()[0])
        with pytest.raises(ValueError, match=rf"^{name}'s posterior was fitted post hoc .* fit would train the head"):
            fit(model, guide, data(), progress=False)
        assert all(torch.equal(p, before[n]) for n, p in trainable.items())
        return
    for batch in data():
        assert torch.isfinite(torch.tensor(svi.step(batch)))
    for n, p in trainable.items():
        if not n.startswith("guide.parts"):  # a flow's MADE may have entries no data reaches
            assert not torch.equal(p, before[n]), f"SVI left {n} unchanged"


@pytest.mark.parametrize("optimizer", ["Adam", "LBFGS"])
def test_a_closure_step_through_a_guide_fitted_at_the_head_is_refused_and_a_plain_step_after_its_loss_is_not(optimizer):
    """torch's closure form computes the gradients inside step(), after the pre-step hook: three Adam.step(closure)
    through Laplace's ELBO moved the head and predict took it (0.015 in probability). And a plain loss's step after a
    Laplace loss (computed with gradients, never stepped) was refused as Laplace's."""
    model, guide = BUILDERS[LaplaceGuide]()
    before = {n: p.detach().clone() for n, p in model.named_point_parameters()}
    opt = getattr(torch.optim, optimizer)(model.point_parameters(), lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = Trace_ELBO().differentiable_loss(model, guide, data()[0])
        loss.backward()
        return loss

    for _ in range(2):
        with pytest.raises(ValueError, match=r"^LaplaceGuide's posterior was fitted post hoc .* this optimiser step would "
                                             r"train base_model.model.classifier"):
            opt.step(closure)
    assert all(torch.equal(p, before[n]) for n, p in model.named_point_parameters())
    Trace_ELBO().loss(model, guide, data()[0])  # with gradients on, no backward: trains nothing
    opt.zero_grad()
    batch = data()[0]
    logits = model.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    opt.step(lambda: torch.nn.functional.cross_entropy(
        model.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_point_parameters())  # a plain step: taken
    with pytest.raises(ValueError, match="changed since"):  # and the Laplace no longer predicts over that head
        predict(model, guide, data())


def test_optimisers_of_their_own_and_a_gradient_zeroed_in_place_are_not_taken_for_a_guide_fitted_at_the_head():
    """The step hook (on from the first guide built) passed any second argument back as closure=: a step(self, fn)
    of one's own raised a TypeError, a step(closure, grad_scale) lost its grad_scale; and after a refused Laplace
    step, zero_grad(set_to_none=False) left the MAP's own SVI step refused as Laplace's."""
    model, guide = BUILDERS[LaplaceGuide]()
    linear = torch.nn.Linear(2, 1)

    class Scaled(torch.optim.SGD):
        def step(self, closure=None, grad_scale=None):
            self.seen = grad_scale
            return super().step(closure)

    class Own(torch.optim.SGD):
        def step(self, fn=None):
            self.seen = fn
            return super().step()

    linear(torch.ones(1, 2)).sum().backward()
    scaled, own = Scaled(linear.parameters(), lr=0.1), Own(linear.parameters(), lr=0.1)
    scaled.step(None, 2.0)
    own.step(0.5)
    assert (scaled.seen, own.seen) == (2.0, 0.5)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    with pytest.raises(ValueError, match="LaplaceGuide's posterior was fitted post hoc"):
        svi.step(data()[0])
    model.net.zero_grad(set_to_none=False)
    before = {n: p.detach().clone() for n, p in model.named_point_parameters()}
    SVI(model, MAPGuide(model), pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(data()[0])
    assert any(not torch.equal(p, before[n]) for n, p in model.named_point_parameters())


def test_a_model_the_guide_was_not_built_for_is_refused(built, tmp_path):
    model, guide = built
    kwargs = {} if type(model) is not LoraModel else {"random": "".join(sorted({s.matrix for s in model.sites.values()}))}
    # rank 2: other shapes (peft's B = 0 for LoRA-XS, which refuses to overwrite a trained LoRA)
    other = type(model)(tiny_bert(r=2, random_b=not isinstance(model, LoraXSModel)), SequenceClassification(), prior=0.5,
                        **kwargs)
    with pytest.raises(ValueError, match="cannot predict with this .* has shape"):
        predict(other, guide, data())
    with pytest.raises(ValueError, match="cannot fit with this"):
        fit(other, guide, data(), progress=False)
    save_guide(guide, tmp_path / "g")
    with pytest.raises(ValueError, match="cannot load the guide"):
        load_guide(tmp_path / "g", other)


# The contract's cases one by one: each difference is named.


def test_rank_8_guide_on_rank_4_model():
    guide = MAPGuide(lora(r=8))
    with pytest.raises(ValueError, match=r"site 'query.lora_A' has shape \(2, 8, 32\) in the guide and \(2, 4, 32\) in the model"):
        predict(lora(r=4), guide, data())


def test_a_and_b_guide_on_an_a_only_model():
    guide = MeanFieldGuide(lora(random="AB"), b="normal")
    with pytest.raises(ValueError, match=r"the guide has sites the model lacks: \['query.lora_B', 'value.lora_B'\]"):
        predict(lora(random="A"), guide, data())


def _alpha_model(alpha):
    torch.manual_seed(0)
    from conftest import _randomize_b, tiny_bert_base

    net = get_peft_model(tiny_bert_base(), LoraConfig(r=4, lora_alpha=alpha, target_modules=["query", "value"], task_type="SEQ_CLS"))
    _randomize_b(net)
    return LoraModel(net, SequenceClassification(), prior=0.5)


def test_load_into_another_lora_alpha_is_refused(tmp_path):
    save_guide(MAPGuide(_alpha_model(16)), tmp_path / "g")
    with pytest.raises(ValueError, match=r"LoRA scaling \(lora_alpha / r, or / sqrt\(r\) with use_rslora\) of .* is 4 for the guide and 16 in the model .*4x the trained one"):
        load_guide(tmp_path / "g", _alpha_model(64))
    load_guide(tmp_path / "g", _alpha_model(16))  # the same alpha loads


def test_guide_from_another_architecture_is_refused(tmp_path):
    save_guide(MAPGuide(lora()), tmp_path / "g")
    llama = LoraModel(tiny_llama(), CausalLM(), prior=0.5)
    with pytest.raises(ValueError, match=r"cannot load the guide .* the guide was built for|sites the model lacks"):
        load_guide(tmp_path / "g", llama)


def test_other_base_weights_and_other_head_are_named():
    guide = MAPGuide(lora())
    other_base = LoraModel(tiny_bert(seed=1), SequenceClassification(), prior=0.5)
    with pytest.raises(ValueError, match="base weights differ"):
        predict(other_base, guide, data())
    other_head = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5)
    with pytest.raises(ValueError, match=r"the head has 3 outputs \(classes\) in the guide and 2 in the model"):
        predict(other_head, guide, data())


def test_base_buffers_edited_in_place_are_named_and_an_older_signature_without_them_is_taken(tmp_path):
    """A rotary embedding's inv_freq divided by 4 in place (a position-interpolation patch) and BERT's position_ids
    shifted: the guide's record held every base parameter but no buffer, so load_guide and predict took the guide on a
    network computing another function (probabilities 0.998 and 0.020 off) without a word."""
    model = LoraModel(tiny_llama(), CausalLM())
    guide = MAPGuide(model)
    save_guide(guide, tmp_path / "g")
    rotary = next(m for n, m in model.net.named_modules() if n.endswith("rotary_emb"))
    with torch.no_grad():
        rotary.inv_freq.div_(4.0)
    with pytest.raises(ValueError, match=r"the base model's buffers differ from the ones the guide was built on .*"
                                         r"rotary_emb\.inv_freq"):
        save_guide(guide, tmp_path / "again")
    with pytest.raises(ValueError, match=r"cannot load the guide .*buffers differ.*rotary_emb\.inv_freq"):
        load_guide(tmp_path / "g", model)
    with torch.no_grad():
        rotary.inv_freq.mul_(4.0)
    load_guide(tmp_path / "g", model)
    del guide.signature["base"]["buffers"]  # a guide saved before buffers were recorded: not compared
    with torch.no_grad():
        rotary.inv_freq.div_(4.0)
    save_guide(guide, tmp_path / "older")
    bert = lora()
    mapped = MAPGuide(bert)
    embeddings = next(m for n, m in bert.net.named_modules() if n.endswith("embeddings"))
    if "position_ids" in dict(embeddings.named_buffers()):
        with torch.no_grad():
            embeddings.position_ids.add_(1)
        with pytest.raises(ValueError, match=r"buffers differ .*position_ids"):
            predict(bert, mapped, data())


def test_an_equal_model_object_predicts_and_only_the_guides_own_model_trains():
    guide = MAPGuide(lora())
    twin = lora()
    torch.testing.assert_close(predict(twin, guide, data()).probs, predict(guide.model, guide, data()).probs)
    with pytest.raises(ValueError, match="cannot fit with this MAPGuide on another model object"):
        fit(twin, guide, data(), progress=False)


def test_an_ensemble_with_heads_predicts_only_on_its_own_model():
    from pyro_lora.guides.ensemble import head_parameters, predict_ensemble

    model = lora()
    heads = [{n: p.detach() + k for n, p in model.net.named_parameters() if n in head_parameters(model)} for k in range(2)]
    guide = EnsembleGuide(model, [model.adapter_values()] * 2, heads)
    with pytest.raises(ValueError, match="sets the heads of the model it was built on"):
        predict_ensemble(lora(), guide, data())
    predict_ensemble(model, guide, data())


def _on(targets):
    from conftest import _randomize_b, tiny_bert_base

    net = get_peft_model(tiny_bert_base(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS"))
    _randomize_b(net)
    return LoraModel(net.eval(), SequenceClassification(), prior=0.5, num_data=6)


OTHER_MODELS = {  # guide's model, the model run, what the refusal names
    "rank": (lambda: lora(r=8), lora, r"site 'query.lora_A' has shape \(2, 8, 32\) in the guide and \(2, 4, 32\)"),
    "checkpoint": (lora, lambda: LoraModel(tiny_bert(seed=1), SequenceClassification(), prior=0.5, num_data=6),
                   "the base weights differ from the ones the guide was built on"),
    "fewer_targets": (lambda: _on(["query"]), lora, r"the model has sites the guide lacks: \['value.lora_A'"),
    "more_targets": (lora, lambda: _on(["query"]), r"the guide has sites the model lacks: \['value.lora_A'"),
    # BERT's "dense" layers have two shapes: their sites are named with a shape suffix, "dense.lora_A.r4_32x64"
    "suffixed_targets": (lambda: _on(["dense"]), lora, r"the guide has sites the model lacks: \['dense.lora_A.r4_32x32'"),
}


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("other", sorted(OTHER_MODELS))
def test_pyro_svi_with_a_guide_for_another_model_is_refused(other, elbo):
    """Pyro's SVI ran a guide of another checkpoint of the same shapes silently; with other target_modules it drew the
    model's extra sites from the prior (Trace_ELBO) or raised a bare KeyError (TraceMeanField_ELBO)."""
    guide_model, run_model, names = OTHER_MODELS[other]
    guide = MeanFieldGuide(guide_model())
    svi = SVI(run_model(), guide, pyro.optim.Adam({"lr": 1e-2}), elbo())
    with pytest.raises(ValueError, match=r"cannot run an ELBO \(pyro.infer.SVI, a replayed trace\) with this "
                                         rf"MeanFieldGuide on this model: {names}"):
        svi.step(data()[0])
    with pytest.raises(ValueError, match=names):
        svi.evaluate_loss(data()[0])


@pytest.mark.parametrize("other,names", [("fewer_targets", r"for 2 of the model's 4 weight sites, not for 2 \(e.g. "
                                                           r"'value.lora_A'\)"),
                                         ("more_targets", r"for 2 weight sites this model does not have \(e.g. "
                                                          r"'value.lora_A'\)"),
                                         ("suffixed_targets", r"for 6 weight sites this model does not have \(e.g. "
                                                              r"'dense.lora_A.r4_32x32'\)")])
def test_values_conditioned_on_for_another_models_sites_are_refused(other, names):
    """Predictive(model, guide=a guide on other target_modules) drew the sites the guide lacks from the prior, or
    dropped the guide's extra sites, without a word: it hands the model values only, so the model checks their names."""
    guide_model, run_model, _ = OTHER_MODELS[other]
    guide, model = MeanFieldGuide(guide_model()), run_model()
    with pytest.raises(ValueError, match=rf"values were conditioned on .* {names}"):
        pyro.infer.Predictive(model, guide=guide, num_samples=2)(data()[0])
    values = guide.mean()
    with torch.no_grad(), pytest.raises(ValueError, match=names):
        poutine.condition(model, data=values)(data()[0])
    own = MeanFieldGuide(model)
    with torch.no_grad():
        logits = poutine.condition(model, data=own.mean())(data()[0])
    torch.testing.assert_close(logits, model.logits(data()[0], own.mean()))


def test_pyro_svi_with_a_guide_built_on_another_model_object_is_refused_before_its_first_step():
    """fit refused a guide built on another model object of the same network and weights; Pyro's SVI took a whole step
    (moving the guide and the other network's head) and refused only the next. Evaluating the loss stays allowed, also
    by the ELBO's loss with gradients on (a validation loss beside the steps), which was refused as a step."""
    guide, other = MeanFieldGuide(lora()), lora()
    before = [p.detach().clone() for p in list(guide.parameters()) + list(other.net.parameters())]
    svi = SVI(other, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    with pytest.raises(ValueError, match=r"cannot run an ELBO .* with this MeanFieldGuide on another model object"):
        svi.step(data()[0])
    assert all(torch.equal(a, p) for a, p in zip(before, list(guide.parameters()) + list(other.net.parameters())))
    assert math.isfinite(svi.evaluate_loss(data()[0]))
    assert torch.is_grad_enabled() and math.isfinite(Trace_ELBO().loss(other, guide, data()[0]))


def test_a_guide_run_through_its_forward_is_checked_and_recorded_as_through_its_call():
    """SVI(model, guide.forward) skipped the module call's hooks: a guide of another checkpoint trained silently, and
    the guide's parameters were never recorded for Pyro's optimiser."""
    guide = MeanFieldGuide(lora())
    other = LoraModel(tiny_bert(seed=1), SequenceClassification(), prior=0.5, num_data=6)
    with pytest.raises(ValueError, match="cannot run an ELBO .* the base weights differ"):
        SVI(other, guide.forward, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(data()[0])
    before = {n: p.detach().clone() for n, p in guide.named_parameters()}
    SVI(guide.model, guide.forward, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(data()[0])
    assert all(not torch.equal(before[n], p) for n, p in guide.named_parameters())


def test_a_model_whose_sites_a_handler_renamed_is_refused_by_name():
    """Inside pyro.contrib.autoname.scope the sites are "net1/query.lora_A": the model's checks indexed its trace by its
    own names (a bare KeyError)."""
    from pyro.contrib.autoname import scope

    model = lora()
    with scope(prefix="net1"), pytest.raises(ValueError, match=r"the model's sites were renamed \('net1/query.lora_A' "
                                                                r"for 'query.lora_A'"):
        model(data()[0])


def test_a_users_model_with_latents_of_its_own_around_the_lora_model_is_not_refused():
    """The checks read the guide that drew the weight sites and the weight-site names only: a user's own latents (a
    noise scale here) and the guide drawing them pass under SVI and Predictive."""
    model = lora()
    guide = MeanFieldGuide(model)

    def user_model(batch):
        pyro.sample("tau", pyro.distributions.Normal(0.0, 1.0))
        return model(batch)

    def user_guide(batch):
        loc = pyro.param("tau_loc", torch.tensor(0.0))
        pyro.sample("tau", pyro.distributions.Normal(loc, 1.0))
        return guide(batch)

    svi = SVI(user_model, user_guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    assert torch.isfinite(torch.tensor(svi.step(data()[0])))
    out = pyro.infer.Predictive(user_model, guide=user_guide, num_samples=2, return_sites=["tau", "obs"])(data()[0])
    assert out["obs"].shape == (2, 3) and out["tau"].numel() == 2


def test_export_after_switching_adapter_is_refused(tmp_path):
    model = lora()
    guide = MAPGuide(model)
    model.net.add_adapter("other", LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    model.net.set_adapter("other")
    with pytest.raises(ValueError, match="now runs adapter 'other'.*built for adapter 'default'"):
        export_adapter(guide, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("inner", ["base_model", "base_model.model"])
def test_a_model_built_on_the_peft_models_inner_module_predicts_but_refuses_to_write_an_adapter(tmp_path, inner):
    """Predicting through the inner module is the PeftModel's forward; its save_pretrained is not peft's: it wrote a
    whole checkpoint as the 'adapter' (from_pretrained failed later, far from the cause)."""
    net = tiny_bert()
    model = LoraModel(net.get_submodule(inner), SequenceClassification())
    guide = MAPGuide(model)
    torch.testing.assert_close(predict(model, guide, data()).probs, predict(LoraModel(net, SequenceClassification()), None, data()).probs)
    message = r"cannot write a peft adapter from a .*: only a PeftModel .* build the LoraModel on the PeftModel"
    with pytest.raises(ValueError, match=message):
        export_adapter(guide, tmp_path / "a")
    with pytest.raises(ValueError, match=message):
        save_guide(guide, tmp_path / "g", adapter=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "g").exists()
    save_guide(guide, tmp_path / "g")  # the guide alone is fine
    # moved between the two models over one network, it was refused for holding "other matrices": the same ones
    with pytest.raises(ValueError, match=r"holds the same matrices, named from another module .* one model was built on "
                                         r"the peft model, the other on a module inside it"):
        load_guide(tmp_path / "g", LoraModel(net, SequenceClassification()))


def _llama_guide():
    model = LoraModel(tiny_llama(), CausalLM(), prior=0.5)
    return model, MAPGuide(model)


@pytest.mark.parametrize(
    "change",
    ["mlp_weight", "embedding", "final_norm", "lora_base_weight_layer_1"],
)
def test_any_changed_base_parameter_is_named(change):
    _, guide = _llama_guide()
    other, _ = _llama_guide()
    base = other.net.get_base_model().model
    target = {
        "mlp_weight": base.layers[1].mlp.down_proj.weight,
        "embedding": base.embed_tokens.weight,
        "final_norm": base.norm.weight,
        "lora_base_weight_layer_1": base.layers[1].self_attn.q_proj.base_layer.weight,
    }[change]
    with torch.no_grad():
        target.add_(0.05 * torch.randn_like(target))
    with pytest.raises(ValueError, match=r"the base weights differ .* \(another checkpoint of this architecture, or "
                                         r"another adapter merged into them"):
        predict(other, guide, [_llama_batch()])


def _llama_batch():
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_a_changed_config_is_named_and_run_time_switches_are_not():
    _, guide = _llama_guide()
    other, _ = _llama_guide()
    other.net.config.use_cache = False  # a run-time switch: accepted
    from pyro_lora.contract import check_guide

    check_guide(other, guide, "predict")
    other.net.config.rms_norm_eps = 1e-3
    with pytest.raises(ValueError, match=r"the base model's config differs in \['rms_norm_eps'\]"):
        predict(other, guide, [_llama_batch()])


def test_a_dtype_cast_of_the_base_is_the_same_base():
    model, guide = _llama_guide()
    twin, _ = _llama_guide()
    twin.net.to(torch.bfloat16)
    assert differences(guide.signature, describe(twin)) == []


def test_a_twin_model_with_an_untrained_head_is_refused():
    model = lora(random="A")
    guide = MeanFieldGuide(model)
    fit(model, guide, data(), lr=5e-2, progress=False)  # trains the head and B (point parameters)
    twin = lora(random="A")
    with pytest.raises(ValueError, match="the model's point parameters .* differ from those of the model the guide was built on"):
        predict(twin, guide, data())


def test_a_guide_whose_head_another_guide_retrained_is_refused_until_restored(tmp_path):
    model = lora(random="AB")
    first = MAPGuide(model)
    fit(model, first, data(), lr=5e-2, progress=False)
    save_guide(first, tmp_path / "first")
    before = predict(model, first, data()).probs
    with pytest.raises(ValueError, match="head was trained by a MAPGuide whose LoRA values the adapter does not hold"):
        MeanFieldGuide(model, b="normal")  # from the untrained adapter, beside the trained head
    model.write_adapter({k: v.detach() for k, v in first.mean().items()})
    second = MeanFieldGuide(model, b="normal", learn_loc=False)
    fit(model, second, data(), lr=1e-2, train_network=False, progress=False)  # leaves the head alone
    torch.testing.assert_close(predict(model, first, data()).probs, before)
    fit(model, second, data(), lr=5e-2, progress=False)  # train_network=True: moves the head
    predict(model, second, data())  # the guide that trained the head last owns it
    with pytest.raises(ValueError, match=r"point parameters \['base_model.model.classifier.modules_to_save.default.weight'.* changed"):
        predict(model, first, data())
    restored = load_guide(tmp_path / "first", model)  # puts the first guide's head back
    torch.testing.assert_close(predict(model, restored, data()).probs, before)
    with pytest.raises(ValueError, match="changed since this guide was built or trained"):
        predict(model, second, data())


def test_pyro_svi_takes_the_head_over_as_fit_does():
    model = lora(random="AB")
    first = MAPGuide(model)
    second = MAPGuide(model)
    model.net.train()
    svi = SVI(model, second, pyro.optim.Adam({"lr": 5e-2}), Trace_ELBO())
    for batch in data():
        svi.step(batch)
    predict(model, second, data())
    with pytest.raises(ValueError, match="changed since this guide was built or trained"):
        predict(model, first, data())


def _fitted_map_and_its_head():
    model = lora(random="AB")
    guide = MAPGuide(model)
    fit(model, guide, data(), lr=5e-2, progress=False)
    return model, guide, dict(model.net.named_parameters())["base_model.model.classifier.modules_to_save.default.weight"]


def test_a_head_replaced_through_data_is_a_change():
    """ivon-opt's IVON steps by assigning ``p.data``, which leaves the version counter where it was: the ownership
    check reads the values, not the counter."""
    model, guide, head = _fitted_map_and_its_head()
    version = head._version
    head.data = head.data + 4.5e-3
    assert head._version == version
    with pytest.raises(ValueError, match="changed since this guide was built or trained"):
        predict(model, guide, data())


def test_a_head_with_its_rows_swapped_is_a_change():
    """Sums and sums of squares do not see a permutation (a head saved under another label order)."""
    model, guide, head = _fitted_map_and_its_head()
    with torch.no_grad():
        head.copy_(head[[1, 0, 2]])
    with pytest.raises(ValueError, match="changed since this guide was built or trained"):
        predict(model, guide, data())


def test_value_sums_are_the_same_however_the_tensors_are_batched(monkeypatch):
    """The sums are compared for equality across calls that batch other tensors (a snapshot of the whole head, a
    step's one parameter): exact integer sums of the bits, whatever the stack or the cut of a long tensor."""
    monkeypatch.setattr(ownership, "_WINDOW", 64)  # a tensor of 150 values is cut into three pieces
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 8, generator=g), torch.randn(150, generator=g), torch.randn(4, 8, generator=g) * 1e-30,
               torch.randn(3, 3, generator=g).double(), torch.zeros(0), torch.randn(8, 4, generator=g).t()]
    together = ownership.value_sums(tensors)
    lazy = ownership.value_sums(tensors, lazy=True)
    for t in tensors:
        assert ownership.value_sums([t])[id(t)] == together[id(t)] == tuple(lazy[id(t)].tolist())
    long, transposed = tensors[1], tensors[-1]
    copy = transposed.contiguous()  # the same values in the same order
    assert ownership.value_sums([copy])[id(copy)] == together[id(transposed)]
    monkeypatch.setattr(ownership, "_WINDOW", 1 << 20)
    assert ownership.value_sums([long])[id(long)] == together[id(long)]  # in one piece


def test_value_sums_see_one_changed_value_and_nothing_else():
    base = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    base[1] = 1e30  # beside which a float64 sum loses any change of the others
    sums = ownership.value_sums([base])[id(base)]
    nudged = base.clone()
    nudged[517] = torch.nextafter(nudged[517], torch.tensor(math.inf))  # one ulp
    swapped = base.clone()
    swapped[[3, 9]] = base[[9, 3]]
    for other in (nudged, swapped):
        assert ownership.value_sums([other])[id(other)] != sums
    # a sign flip moves a float's bits by 2**31 whatever its value: a head [w, -w] with as many positive as negative
    # entries kept plain sums of bits and of bits times position with its rows swapped (the label order reversed)
    w = torch.tensor([0.3, -1.2, 0.7, -0.1])
    head = torch.stack([w, -w])
    flipped = head[[1, 0]]
    assert ownership.value_sums([head])[id(head)] != ownership.value_sums([flipped])[id(flipped)]
    zeros, negative = torch.zeros(5), -torch.zeros(5)  # the same values
    assert ownership.value_sums([zeros])[id(zeros)] == ownership.value_sums([negative])[id(negative)]
    widened = base.double()  # a lossless cast (model.double()) changes no value
    assert ownership.value_sums([widened])[id(widened)] == sums
    finer = widened.clone()
    finer[5] += 1e-12  # no float32 holds it
    huge = torch.tensor([1e300, 1.0], dtype=torch.float64)  # both past float32's range
    counts = torch.tensor([1 << 40, 3])  # an int64 buffer a float32 cast would round
    for before, after in ((widened, finer), (huge, huge * 2), (counts, counts + 1)):
        assert ownership.value_sums([before])[id(before)] != ownership.value_sums([after])[id(after)]


def test_ownership_is_per_network_not_per_model_object():
    net = tiny_bert()
    first_model = LoraModel(net, SequenceClassification(), random="AB", prior=0.5, num_data=6)
    first = MAPGuide(first_model)
    fit(first_model, first, data(), lr=5e-2, progress=False)
    first_model.write_adapter({k: v.detach() for k, v in first.mean().items()})
    second_model = LoraModel(net, SequenceClassification(), random="A", prior=0.5, num_data=6)
    fit(second_model, MeanFieldGuide(second_model), data(), lr=5e-2, progress=False)  # retrains the shared head
    with pytest.raises(ValueError, match="changed since this guide was built or trained"):
        predict(first_model, first, data())


def test_a_frozen_head_is_part_of_the_contract_and_of_the_saved_guide(tmp_path):
    def frozen(seed):
        model = lora()
        with torch.no_grad():
            for n, p in model.net.named_parameters():
                if ".modules_to_save." in n:
                    p.normal_(generator=torch.Generator().manual_seed(seed))
                    p.requires_grad_(False)  # as PeftModel.from_pretrained(..., is_trainable=False) loads it
        return model

    x, y = frozen(1), frozen(2)
    guide = MAPGuide(x)
    with pytest.raises(ValueError, match=r"point parameters \['base_model.model.classifier.modules_to_save.default.weight'"):
        predict(y, guide, data())
    save_guide(guide, tmp_path / "g")
    loaded = load_guide(tmp_path / "g", y)  # restores x's head into y
    torch.testing.assert_close(predict(y, loaded, data()).probs, predict(x, guide, data()).probs)


def test_peft_trainable_token_deltas_are_point_parameters_not_base_weights():
    torch.manual_seed(0)
    from conftest import tiny_bert_base

    config = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", trainable_token_indices={"word_embeddings": [1, 2, 3]})
    model = LoraModel(get_peft_model(tiny_bert_base(), config), SequenceClassification(), prior=0.5, num_data=6)
    guide = MAPGuide(model)
    fit(model, guide, data(), lr=5e-2, progress=False)
    predict(model, guide, data())  # the trained token deltas are the guide's, not another base


def test_load_guide_restores_an_older_guide_into_the_model_another_guide_trained_since(tmp_path):
    model = lora(random="AB")
    first = MAPGuide(model)
    fit(model, first, data(), lr=5e-2, progress=False)
    before = predict(model, first, data()).probs
    save_guide(first, tmp_path / "first")
    load_guide(tmp_path / "first", model)  # the plain round trip on the model that trained it
    model.write_adapter({k: v.detach() for k, v in first.mean().items()})
    second = MeanFieldGuide(model, b="normal")
    fit(model, second, data(), lr=5e-2, elbo=TraceMeanField_ELBO(), progress=False)
    restored = load_guide(tmp_path / "first", model)
    torch.testing.assert_close(predict(model, restored, data()).probs, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="changed since this guide was built or trained"):
        predict(model, second, data())


def test_a_guide_that_trained_no_point_parameter_leaves_the_adapter_free_but_an_unwritten_mean_is_said():
    """Without a head to pair, a guide built from the adapter is allowed; but right after fit the adapter still holds
    its initial values, and a Laplace fitted there missed the training (accuracy 0.375 against the MAP's 0.917)."""
    model = LoraModel(tiny_llama(), CausalLM(), random="AB", prior=0.5)  # every LoRA matrix a site, no head
    trained = MAPGuide(model)
    fit(model, trained, [_llama_batch()], lr=1e-2, progress=False)
    message = "the adapter still holds the LoRA values it held when fit last trained this network with a MAPGuide"
    with pytest.warns(UserWarning, match=message):
        MeanFieldGuide(model)  # the MAP kept its LoRA in the guide, and trained nothing in the network
    with pytest.warns(UserWarning, match=message):
        TFBGuide(model)
    other = LoraModel(model.net, CausalLM(), random="A", prior=0.5)  # other sites over the same network: said too
    with pytest.warns(UserWarning, match=message):
        MeanFieldGuide(other)
    model.write_adapter({k: v.detach() for k, v in trained.mean().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        MeanFieldGuide(model)
    fit(model, MAPGuide(model), [_llama_batch()], lr=1e-2, progress=False)  # a guide not kept after training: said too
    with pytest.warns(UserWarning, match=message):
        TFBGuide(model)


def test_a_network_restored_to_an_earlier_state_after_a_fit_is_no_unwritten_fit():
    """A MAP written into the adapter and snapshotted, a mean-field fit over the network (a point B and the head
    trained, A sampled), then the snapshot restored: the network is the MAP's again, yet a guide built from it was
    warned that the adapter 'still holds the LoRA values' of the mean-field fit, advising to write that guide's mean,
    which would start TFB from the mean-field mean (examples/compare_guides.py)."""
    model = lora(random="AB")
    first = MAPGuide(model)
    fit(model, first, data(), lr=5e-2, progress=False)
    model.write_adapter({k: v.detach() for k, v in first.mean().items()})
    snapshot = {n: p.detach().clone() for n, p in model.net.named_parameters() if "lora_" in n or p.requires_grad}
    other = LoraModel(model.net, model.likelihood, random="A", prior=0.1, num_data=model.num_data)
    fit(other, MeanFieldGuide(other), data(), lr=5e-2, elbo=TraceMeanField_ELBO(), progress=False)
    message = "still holds the LoRA values"
    with pytest.raises(ValueError, match="whose LoRA values the adapter does not hold"):
        TFBGuide(LoraModel(model.net, model.likelihood, random="AB"))  # the mean-field's head beside the MAP's A
    with torch.no_grad():
        params = dict(model.net.named_parameters())
        for n, v in snapshot.items():
            params[n].copy_(v)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{message}")
        TFBGuide(LoraModel(model.net, model.likelihood, random="AB"))


def test_the_owner_is_checked_too_and_a_non_owner_cannot_save_another_guides_head(tmp_path):
    from pyro_lora.guides.ensemble import reinitialize

    model = lora(random="AB")
    first = MAPGuide(model)
    fit(model, first, data(), lr=5e-2, progress=False)
    model.write_adapter({k: v.detach() for k, v in first.mean().items()})
    second = MeanFieldGuide(model, b="normal")
    fit(model, second, data(), lr=5e-2, elbo=TraceMeanField_ELBO(), progress=False)  # retrains the head
    with pytest.raises(ValueError, match="cannot save with this MAPGuide .* changed since this guide was built or trained"):
        save_guide(first, tmp_path / "first")  # it would store the second guide's head beside its LoRA
    reinitialize(model, seed=1)  # the owner's own head replaced
    with pytest.raises(ValueError, match="re-initialised, written"):
        predict(model, second, data())


def test_train_ensemble_from_the_current_map_leaves_the_map_usable():
    from pyro_lora.guides.ensemble import train_ensemble

    model = lora(random="AB")
    map_guide = MAPGuide(model)
    fit(model, map_guide, data(), lr=5e-2, progress=False)
    before = predict(model, map_guide, data()).probs
    model.write_adapter({k: v.detach() for k, v in map_guide.mean().items()})
    train_ensemble(model, data(), k=2, include_current=True, fit_kwargs={"lr": 5e-2})
    torch.testing.assert_close(predict(model, map_guide, data()).probs, before, rtol=0, atol=0)


def test_a_guide_under_another_prior_is_refused_the_flow_reads_it(tmp_path):
    """Bayesian-LoRA's inducing prior has the model's prior std: under another prior the same flow state would
    sample other weights without a word."""
    model = LoraModel(tiny_bert(), SequenceClassification(), prior=0.1, num_data=6)
    save_guide(FlowGuide(model, init_scale=0.1), tmp_path / "g")
    other = LoraModel(tiny_bert(), SequenceClassification(), prior=1.0, num_data=6)
    with pytest.raises(ValueError, match=r"the guide was built under the prior 0.1, the model has 1.0 \(build the model with prior=0.1\)"):
        load_guide(tmp_path / "g", other)
    load_guide(tmp_path / "g", LoraModel(tiny_bert(), SequenceClassification(), prior=0.1, num_data=6))


def _two_adapters():
    net = tiny_bert()
    net.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    return net


def test_each_adapter_of_a_network_keeps_its_own_guides():
    """A guide of adapter 'default' was refused once adapter 'other''s guide trained 'other''s head, saved 'other''s
    weights, and a MAP fit on 'default' blocked building any guide on 'other' (whose values it compared)."""
    net = _two_adapters()
    first_model = LoraModel(net, SequenceClassification(), num_data=6)
    first = MAPGuide(first_model)
    fit(first_model, first, data(), lr=5e-2, progress=False)
    first_model.write_adapter({k: v.detach() for k, v in first.mean().items()})
    before = predict(first_model, first, data()).probs
    net.set_adapter("other")
    second_model = LoraModel(net, SequenceClassification(), num_data=6)
    MeanFieldGuide(second_model)  # not refused for 'default''s MAP
    second = MAPGuide(second_model)
    fit(second_model, second, data(), lr=5e-2, progress=False)
    net.set_adapter("default")
    torch.testing.assert_close(predict(first_model, first, data()).probs, before)
    assert all(".other." not in n + "." for n, _ in first_model.named_adapter_parameters())


@pytest.mark.parametrize("name", ["other", "a/b"])
def test_the_exported_adapter_is_the_guides_own_not_the_default_one(tmp_path, name):
    """With adapter 'other' active, export wrote every adapter, 'default' (untouched) at the folder's top and the
    trained one in other/: PeftModel.from_pretrained(folder) loaded 'default' without a word."""
    from conftest import tiny_bert_base
    from peft import PeftModel

    net = tiny_bert()
    net.add_adapter(name, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    net.set_adapter(name)
    model = LoraModel(net, SequenceClassification(), num_data=6)
    guide = MAPGuide(model)
    fit(model, guide, data(), lr=5e-2, progress=False)
    export_adapter(guide, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4
    loaded = PeftModel.from_pretrained(tiny_bert_base(), tmp_path / "a").eval()
    with torch.no_grad():
        logits = torch.cat([loaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in data()])
    torch.testing.assert_close(torch.softmax(logits, -1), predict(model, guide, data()).probs)


def test_the_same_base_weights_from_another_folder_are_the_same_base(tmp_path):
    model = lora()
    model.net.config._name_or_path = "/one/folder/minilm"
    guide = MAPGuide(model)
    fit(model, guide, data(), lr=5e-2, progress=False)
    save_guide(guide, tmp_path / "g")
    model.net.config._name_or_path = "/another/install/minilm"
    load_guide(tmp_path / "g", model)
    other = lora()
    other.net.config._name_or_path = "/one/folder/minilm"
    with torch.no_grad():
        next(p for n, p in other.net.named_parameters() if "embeddings.word" in n).mul_(2)
    with pytest.raises(ValueError, match="base weights differ"):
        load_guide(tmp_path / "g", other)


def test_a_guide_refuses_a_model_answering_with_other_letters(tmp_path):
    from pyro_lora.likelihoods import MultipleChoice

    batch = random_batch(4, seed=3) | {"choice_mask": torch.ones(4, 4, dtype=torch.bool), "labels": torch.tensor([0, 1, 2, 3])}
    model = LoraModel(tiny_llama(), MultipleChoice([5, 6, 7, 8]), num_data=4)
    guide = MeanFieldGuide(model)
    fit(model, guide, [batch], epochs=1, lr=5e-2, progress=False)
    save_guide(guide, tmp_path / "g")
    with pytest.raises(ValueError, match="fitted under the likelihood"):
        load_guide(tmp_path / "g", LoraModel(tiny_llama(), MultipleChoice([8, 7, 6, 5]), num_data=4))
    load_guide(tmp_path / "g", LoraModel(tiny_llama(), MultipleChoice([5, 6, 7, 8]), num_data=4))


def test_adapters_named_like_modules_keep_to_their_own_parameters():
    """``".0." in name`` matched layer 0's path: adapter '0' claimed adapter '1''s and 'default''s matrices."""
    net = tiny_bert()
    for name in ("0", "1", "query"):
        net.add_adapter(name, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    for name in ("0", "1", "query", "default"):
        net.set_adapter(name)
        model = LoraModel(net, SequenceClassification(), random="A")
        owners = {n.split("lora_B.")[1].split(".")[0] for n, _ in model.named_adapter_parameters() if "lora_B." in n}
        assert owners == {name}


def test_a_shared_base_parameter_moved_by_another_adapters_svi_is_a_change():
    """Adapters 'default' and 'b' share a LayerNorm the user unfroze: b's SVI moved it under default's live guide."""
    net = _two_adapters()
    norm = net.base_model.model.bert.encoder.layer[1].output.LayerNorm.weight

    def train(adapter):
        net.set_adapter(adapter)
        norm.requires_grad_(True)
        model = LoraModel(net, SequenceClassification(), num_data=6, adapter=adapter)
        guide = MeanFieldGuide(model, b="normal")
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-2}), TraceMeanField_ELBO())
        for batch in data():
            svi.step(batch)
        return model, guide

    first_model, first = train("default")
    predict(first_model, first, data())
    train("other")
    net.set_adapter("default")
    with pytest.raises(ValueError, match="changed since this guide was built or trained"):
        predict(first_model, first, data())


def test_a_guide_is_refused_on_other_trainable_token_indices(tmp_path):
    """peft's trainable_token_indices were in no signature: a guide loaded where the indices differ (or only their
    order) put each trained embedding row on another token (0.98 in probability)."""
    from conftest import tiny_bert_base
    from test_training import toy_data

    def model(**tokens):
        net = get_peft_model(tiny_bert_base(2, 0), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                              task_type="SEQ_CLS", **tokens))
        return LoraModel(net.eval(), SequenceClassification(), prior=0.5, num_data=48)

    trained = model(trainable_token_indices=[7, 40])
    guide = MAPGuide(trained)
    fit(trained, guide, toy_data(), epochs=1, lr=5e-2, progress=False)
    save_guide(guide, tmp_path / "guide")
    load_guide(tmp_path / "guide", model(trainable_token_indices=[7, 40]))
    for other in ([40, 7], [7, 41]):
        with pytest.raises(ValueError, match=r"trains the embedding rows of tokens .*\[7, 40\].* for the guide and .*"
                                             rf"\[{other[0]}, {other[1]}\].* in the model"):
            load_guide(tmp_path / "guide", model(trainable_token_indices=other))


def test_a_lossless_cast_of_the_network_is_no_change_and_a_rounding_one_is_named():
    """After net.to(float64) the head's squares were summed in float64, not float32 as before: refused as 're-initialised
    or written' though the values were the same."""
    from test_training import toy_data

    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5, num_data=48)
    guide = MAPGuide(model)
    fit(model, guide, toy_data(), epochs=1, lr=1e-2, progress=False)
    before = predict(model, guide, toy_data(), mean=True).probs
    model.net.double()
    torch.testing.assert_close(predict(model, guide, toy_data(), mean=True).probs, before, atol=1e-6, rtol=0)
    model.net.half()
    with pytest.raises(ValueError, match="cast to a lower precision"):
        predict(model, guide, toy_data(), mean=True)


def test_a_bool_count_is_refused():
    from pyro_lora.data import split_train_val, subset

    """``True`` is an ``int`` to Python: as a count it was taken as 1 (one SWAG deviation, one ensemble member,
    one bin), a slip read as a setting."""
    model = lora()
    xs = LoraXSModel(tiny_bert(random_b=False), SequenceClassification(), num_data=6)
    refusals = {
        "rank": lambda: SWAGGuide(xs, rank=True),
        "every": lambda: SWAGCollector(SWAGGuide(xs, rank=2), every=True),
        "num_members": lambda: EnsembleGuide(model, num_members=True),
        "num_samples": lambda: predict(model, EnsembleGuide(model, [model.adapter_values()]), data(), num_samples=True),
        "iterations": lambda: TFBGuide(model).search(data(), iterations=True),
        "epochs": lambda: fit(model, MAPGuide(model), data(), epochs=True, progress=False),
        "k": lambda: guides.train_ensemble(model, data(), k=True),
        "depth": lambda: FlowGuide(model, depth=True),
        "each of inducing": lambda: FlowGuide(model, inducing=(True, 9)),
        "hidden": lambda: FlowGuide(model, hidden=True),
        "start_step": lambda: SWAGCollector(SWAGGuide(xs, rank=2), start_step=True),
        "n": lambda: subset(list(range(5)), True),
        "val_size": lambda: split_train_val(list(range(5)), val_size=True),
    }
    for name, call in refusals.items():
        with pytest.raises(ValueError, match=f"{name} must be"):
            call()


def _one_entry_moved(model):
    """The same network but one entry of a base weight moved by 0.01: within the fingerprint's tolerance (a cast's
    change, summed), as a change between its strides on a large weight is unseen by it."""
    weight = dict(model.net.named_parameters())["base_model.model.bert.encoder.layer.0.intermediate.dense.weight"]
    with torch.no_grad():
        weight.view(-1)[5] += 0.01
    return model


@pytest.mark.parametrize("saved, loaded", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.float16), (torch.float32, torch.float64),
                                           (torch.float64, torch.float32), (torch.float64, torch.bfloat16)])
def test_a_guide_is_checked_whole_across_a_cast_of_its_base(tmp_path, saved, loaded):
    """A float32 guide on the bfloat16 base of another checkpoint (every other entry of a large weight changed, between
    the fingerprint's strides) loaded without a word: across a cast only the fingerprint was compared. Between float32
    and float64 the warning named a bfloat16 / float16 mismatch, and compared the fingerprints only."""
    import warnings

    save_guide(MAPGuide(lora(dtype=saved)), tmp_path / "guide")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same checkpoint, cast: nothing to say
        load_guide(tmp_path / "guide", lora(dtype=loaded))
    with pytest.raises(ValueError, match="the base weights differ from the ones the guide was saved with"):
        load_guide(tmp_path / "guide", _one_entry_moved(lora(dtype=loaded)))


def test_a_guide_loads_where_a_second_adapter_wraps_another_base_layer(tmp_path):
    """A second adapter on the key projections moves "key.weight" to "key.base_layer.weight" (peft wraps every layer
    an adapter targets): the guide of the first adapter was refused as "the base weights differ"."""
    from peft import LoraConfig

    save_guide(MAPGuide(lora()), tmp_path / "guide")
    model = lora()
    model.net.add_adapter("other", LoraConfig(r=2, target_modules=["key"]))
    assert any(n.endswith("key.base_layer.weight") for n, _ in model.net.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_guide(tmp_path / "guide", model)
    moved = lora()
    moved.net.add_adapter("other", LoraConfig(r=2, target_modules=["key"]))
    key = moved.net.get_base_model().bert.encoder.layer[1].attention.self.key.base_layer.weight
    with torch.no_grad():
        key.view(-1)[3] += 0.01
    with pytest.raises(ValueError, match=r"differ from the ones the guide was saved with \(1 base weight, e.g. .*layer.1"):
        load_guide(tmp_path / "guide", moved)


@pytest.mark.parametrize("config", [
    {"target_modules": ["key"]},
    {"target_modules": ["key"], "modules_to_save": ["pooler"]},
    {"target_modules": ["key"], "trainable_token_indices": {"word_embeddings": [3, 5]}},
], ids=["lora", "modules_to_save", "trainable_tokens"])
@pytest.mark.parametrize("on", ["loading", "saving"])
def test_a_guide_loads_whichever_side_a_second_adapter_wraps_base_modules_on(tmp_path, config, on):
    """A second adapter's modules_to_save or trainable tokens renamed the frozen weights they wrap
    ("pooler.dense.original_module.weight", "word_embeddings.token_adapter.base_layer.weight"): the same weights were
    refused as frozen on one side only."""
    from peft import LoraConfig

    def with_second():
        model = lora()
        model.net.add_adapter("other", LoraConfig(r=2, **config))
        return model

    saving, loading = (lora(), with_second()) if on == "loading" else (with_second(), lora())
    guide = MAPGuide(saving)
    save_guide(guide, tmp_path / "guide")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = load_guide(tmp_path / "guide", loading)
    batch = data()[0]
    torch.testing.assert_close(predict(loading, loaded, [batch]).probs, predict(saving, guide, [batch]).probs)


def test_a_head_drawn_afresh_by_another_seed_is_the_same_base_where_the_adapter_trains_its_copy(tmp_path):
    """transformers draws a checkpoint's missing classifier at random; peft (task_type SEQ_CLS) trains a copy and keeps
    the drawn original frozen, which never runs under the adapter: a guide was refused on the same checkpoint built
    under another seed ("the base weights differ ... classifier.original_module.weight")."""
    from peft import LoraConfig, get_peft_model

    def build(seed):
        torch.manual_seed(seed)
        head = tiny_bert_base()
        torch.manual_seed(100 + seed)
        head.classifier.reset_parameters()  # drawn at load: differs by seed
        return LoraModel(get_peft_model(head, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
                         SequenceClassification(), prior=0.5, num_data=6)

    saved = build(1)
    guide = MAPGuide(saved)
    save_guide(guide, tmp_path / "guide")
    other = build(2)
    original = other.net.base_model.model.classifier.original_module.weight
    assert not torch.equal(original, saved.net.base_model.model.classifier.original_module.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = load_guide(tmp_path / "guide", other)
    torch.testing.assert_close(predict(other, loaded, data()).probs, predict(saved, guide, data()).probs, rtol=0, atol=0)


def test_a_weight_renamed_by_a_later_adapter_is_still_compared_by_predict_and_save(tmp_path):
    """After a load, a second adapter on the embeddings renamed their weight (".base_layer."): overwritten, it passed
    predict's fingerprints and save_guide's record check (both compared names present on both sides)."""
    from peft import LoraConfig

    model = lora()
    save_guide(MAPGuide(model), tmp_path / "guide")
    loaded = load_guide(tmp_path / "guide", model)
    model.net.add_adapter("other", LoraConfig(r=2, target_modules=["word_embeddings"]))
    predict(model, loaded, data())  # renamed, unchanged: the same base
    save_guide(loaded, tmp_path / "again")
    embeddings = model.net.get_base_model().bert.embeddings.word_embeddings.base_layer.weight
    original = embeddings.detach().clone()
    with torch.no_grad():
        embeddings.copy_(torch.randn_like(embeddings))
    with pytest.raises(ValueError, match="the base weights differ from the ones the guide was built on"):
        predict(model, loaded, data())
    with torch.no_grad():
        embeddings.copy_(original[[1, 0, 3, 2, *range(4, len(original))]])  # two row pairs swapped: fingerprints agree
    predict(model, loaded, data())
    with pytest.raises(ValueError, match=r"the base weights changed since .*word_embeddings.base_layer.weight"):
        save_guide(loaded, tmp_path / "changed")


def test_a_guide_fitted_and_never_saved_refuses_a_base_changed_since_it_was_built(tmp_path):
    """Its first save recorded whatever base it was on: two embedding rows swapped after fit (predict compares
    fingerprints only) were saved as its base, and the guide then refused the checkpoint it was fitted on."""
    model = lora()
    guide = MeanFieldGuide(model, b="normal")
    fit(model, guide, data(), lr=1e-2, progress=False)
    embeddings = model.net.get_base_model().bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        embeddings[[2, 3]] = embeddings[[3, 2]].clone()
    with pytest.raises(ValueError, match=r"the base weights changed since it was built, loaded or last saved"):
        save_guide(guide, tmp_path / "guide")
    with torch.no_grad():
        embeddings[[2, 3]] = embeddings[[3, 2]].clone()
    save_guide(guide, tmp_path / "guide")


@pytest.mark.parametrize("saved, loaded", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.float64)])
def test_a_guide_loaded_on_its_checkpoint_in_another_dtype_saves_again(tmp_path, saved, loaded):
    """Its records were compared with the other dtype's through a cast taken from the wrong side: every such re-save
    (and fit's checkpoint after the whole run) was refused as "the base weights changed"."""
    save_guide(MAPGuide(lora(dtype=saved)), tmp_path / "guide")
    model = lora(dtype=loaded)
    loaded_guide = load_guide(tmp_path / "guide", model)
    save_guide(loaded_guide, tmp_path / "again")
    fit(model, loaded_guide, data(), lr=1e-3, checkpoint_dir=tmp_path / "checkpoint", progress=False)


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float64])
def test_a_base_cast_after_the_guide_was_built_is_compared_through_the_cast(tmp_path, cast):
    """The records kept at build held no casts: a base cast to bfloat16 after the guide was built, then changed, was
    saved as the guide's base without a word."""
    from pyro_lora import CausalLM

    model = LoraModel(tiny_llama(), CausalLM())
    guide = MAPGuide(model)
    model.net.to(cast)
    save_guide(guide, tmp_path / "cast")  # the same weights, cast: saved
    embeddings = model.net.get_base_model().model.embed_tokens.weight
    with torch.no_grad():
        embeddings[[2, 3]] = embeddings[[3, 2]].clone()
    fresh = MAPGuide(LoraModel(tiny_llama(), CausalLM()))
    fresh.model.net.to(cast)
    fresh_embeddings = fresh.model.net.get_base_model().model.embed_tokens.weight
    with torch.no_grad():
        fresh_embeddings[[2, 3]] = fresh_embeddings[[3, 2]].clone()
    with pytest.raises(ValueError, match="the base weights changed since it was built"):
        save_guide(fresh, tmp_path / "changed")


def test_loading_a_guide_after_fit_says_nothing_of_the_fit(tmp_path):
    """load_guide kept fit's record while it built the guide, whose constructor then warned that the adapter still held
    the LoRA values of the fit ("call model.write_adapter(guide.mean()) first"): the loaded state comes from the file."""
    model = lora()
    save_guide(MeanFieldGuide(model, b="normal"), tmp_path / "guide")
    fit(model, MAPGuide(model), data(), lr=1e-2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_guide(tmp_path / "guide", model)


def test_save_guide_refuses_a_base_changed_since_the_guide_was_loaded_or_saved(tmp_path):
    """Two embedding rows swapped after a load (a change the fingerprint does not read): saving the guide again
    recorded the swapped base as its own, which then refused the checkpoint it was fitted on."""
    model = lora()
    save_guide(MAPGuide(model), tmp_path / "guide")
    loaded = load_guide(tmp_path / "guide", model)
    save_guide(loaded, tmp_path / "again")  # unchanged: saved
    embeddings = model.net.get_base_model().bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        embeddings[[2, 3]] = embeddings[[3, 2]].clone()
    with pytest.raises(ValueError, match=r"cannot save the guide to .*: the base weights changed since it was built, "
                                         r"loaded or last saved \(1 base weight, e.g. .*word_embeddings.weight"):
        save_guide(loaded, tmp_path / "changed")
    assert not (tmp_path / "changed").exists()
    fresh = MAPGuide(model)  # built on the changed base: its own
    save_guide(fresh, tmp_path / "fresh")
    with torch.no_grad():
        embeddings[[2, 3]] = embeddings[[3, 2]].clone()  # back to the checkpoint
    with pytest.raises(ValueError, match="the base weights changed since"):
        save_guide(fresh, tmp_path / "fresh2")
    save_guide(loaded, tmp_path / "changed")  # the checkpoint it was fitted on: saved


def test_a_base_weight_frozen_on_one_side_only_is_named_as_such(tmp_path):
    """A base weight unfrozen on the loading side was called a differing weight."""
    save_guide(MAPGuide(lora()), tmp_path / "guide")
    model = lora()
    model.net.get_base_model().bert.embeddings.LayerNorm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"its frozen base weights are not the guide's \(1 base weight, e.g. "
                                         r".*embeddings.LayerNorm.weight: frozen in the guide's base, not frozen here"):
        load_guide(tmp_path / "guide", model)


@pytest.mark.parametrize("cast", [None, torch.bfloat16, torch.float16])
def test_the_base_digest_is_the_sha256_of_each_weights_name_and_bytes(cast):
    """What saved guides recorded: a change to the digest's layout would refuse every guide saved before."""
    import hashlib

    from pyro_lora.contract import digested_parameters, weights_digest

    model = lora()
    dense = model.net.get_base_model().bert.encoder.layer[0].output.dense
    dense.weight = torch.nn.Parameter(dense.weight.detach().to(torch.bfloat16), requires_grad=False)  # mixed dtypes
    digest = hashlib.sha256()
    for name, p in digested_parameters(model.net):
        digest.update(name.encode())
        digest.update((p.detach().to(cast) if cast else p.detach()).contiguous().reshape(-1).view(torch.uint8).numpy())
    assert weights_digest(model.net, cast) == digest.hexdigest()
    assert "base_model.model.bert.encoder.layer.0.output.dense.weight" in dict(digested_parameters(model.net))


def test_a_guide_across_two_half_dtypes_is_said_to_be_checked_by_its_fingerprint_only(tmp_path):
    save_guide(MAPGuide(lora(dtype=torch.bfloat16)), tmp_path / "guide")
    with pytest.warns(UserWarning, match="compared by their 4096-entry fingerprints only"):
        load_guide(tmp_path / "guide", lora(dtype=torch.float16))


def test_a_half_precision_guide_loads_on_its_checkpoint_whether_a_module_was_kept_in_float32_or_cast():
    """transformers keeps some modules in float32 when it loads a half-precision base (T5's feed-forward output), not
    when the model is cast with .to(): the same checkpoint in one dtype, refused by the raw whole-weight digest."""
    import tempfile

    kept = lora(dtype=torch.float16)
    dense = kept.net.get_base_model().bert.encoder.layer[0].output.dense
    dense.weight = torch.nn.Parameter(dense.weight.detach().float(), requires_grad=False)  # as _keep_in_fp32_modules
    with tempfile.TemporaryDirectory() as folder:
        save_guide(MAPGuide(kept), folder)
        load_guide(folder, lora(dtype=torch.float16))  # the float32 checkpoint cast whole with .to()


def _part_cast(dtype, part=torch.float32, module="output.dense"):
    """A float32 tiny BERT whose base is held in ``dtype`` but for one module in ``part`` (transformers' kept-in-float32
    modules, or a user's cast of the encoder alone)."""
    model = lora(dtype=dtype)
    dense = model.net.get_base_model().bert.encoder.layer[0].get_submodule(module)
    original = lora().net.get_base_model().bert.encoder.layer[0].get_submodule(module).weight
    dense.weight = torch.nn.Parameter(original.detach().to(part), requires_grad=False)
    return model


def _as_older_record(folder, model, casts, held=False):
    """Rewrite the guide saved in ``folder`` on ``model`` as guides recorded its base before each weight was: the
    whole base's SHA-256 as held, and from 2026-12-02 as cast to the half dtypes ``casts``."""
    from pyro_lora.contract import weights_digest

    meta = json.loads((folder / "guide.json").read_text())
    record = {"sha256": weights_digest(model.net), "dtype": str(model.compute_dtype), "quantization": None}
    if casts:
        record["cast_sha256"] = {str(d): weights_digest(model.net, d) for d in casts}
    if held:
        record["held"] = sorted({str(p.dtype) for p in model.net.parameters() if not p.requires_grad})
    meta["base_weights"] = record
    meta.pop("meta_sha256")  # recorded from 2026-12-05 on
    (folder / "guide.json").write_text(json.dumps(meta))


def test_an_older_half_precision_guide_on_its_checkpoint_with_a_module_kept_in_float32_is_warned_not_refused(tmp_path):
    """A half-precision guide saved before the cast digests were recorded was refused on its own checkpoint ("the
    base weights differ") where one side kept a module in float32: its raw digest was all there was to compare."""
    saved = _part_cast(torch.float16)
    save_guide(MAPGuide(saved), tmp_path / "guide")
    _as_older_record(tmp_path / "guide", saved, casts=())
    with pytest.warns(UserWarning, match="the whole base, could be compared by their 4096-entry fingerprints only"):
        load_guide(tmp_path / "guide", lora(dtype=torch.float16))


def test_an_older_record_of_a_partly_cast_base_compares_it_through_its_cast_digest(tmp_path):
    """Saved with the whole base's digests on a base cast in part (its compute dtype read float32), it was refused on
    the float32 base of its checkpoint: its held dtypes were taken to be float32 alone, and the raw digests compared."""
    saved = _part_cast(torch.float32, torch.bfloat16)
    save_guide(MAPGuide(saved), tmp_path / "guide")
    _as_older_record(tmp_path / "guide", saved, casts=(torch.bfloat16, torch.float16), held=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*records no meta_sha256")  # an older record: said, not this test's
        load_guide(tmp_path / "guide", lora())
    with pytest.raises(ValueError, match=r"the base weights differ from the ones the guide was saved with \(the whole base"):
        load_guide(tmp_path / "guide", _one_entry_moved(lora()))


def test_a_weight_held_in_float32_on_both_sides_is_compared_as_held(tmp_path):
    """A bfloat16 base with one module kept in float32: a change to that module below bfloat16's resolution (the
    network computes it in float32) was accepted, the whole base being compared as cast to bfloat16."""
    save_guide(MAPGuide(_part_cast(torch.bfloat16)), tmp_path / "guide")
    load_guide(tmp_path / "guide", _part_cast(torch.bfloat16))
    changed = _part_cast(torch.bfloat16)
    weight = changed.net.get_base_model().bert.encoder.layer[0].output.dense.weight
    with torch.no_grad():
        weight.view(-1)[5] += 1e-6 * weight.view(-1)[5].sign()  # gone in bfloat16 (8 bits of mantissa)
    assert torch.equal(weight.to(torch.bfloat16), _part_cast(torch.bfloat16).net.get_base_model().bert.encoder
                       .layer[0].output.dense.weight.to(torch.bfloat16))
    name = "base_model.model.bert.encoder.layer.0.output.dense.weight"
    with pytest.raises(ValueError, match=rf"differ from the ones the guide was saved with \(1 base weight, e.g. {name}"):
        load_guide(tmp_path / "guide", changed)


@pytest.mark.parametrize("saved, loaded", [
    (lambda: _part_cast(torch.float32, torch.bfloat16), lambda: lora(dtype=torch.bfloat16)),
    (lambda: _part_cast(torch.float32, torch.bfloat16), lora),
    (lora, lambda: _part_cast(torch.float32, torch.bfloat16)),
    (lambda: lora(dtype=torch.float16), lambda: _part_cast(torch.float32, torch.float16)),
], ids=["bf16_part_on_bf16", "bf16_part_on_fp32", "fp32_on_bf16_part", "fp16_on_fp16_part"])
def test_a_guide_on_a_partly_cast_base_is_checked_whole_through_the_half_dtype_it_holds(tmp_path, saved, loaded):
    """A base cast in part (one module in bfloat16, the rest, the embeddings too, in float32: the compute dtype reads
    float32) was refused on its own checkpoint in bfloat16: the digests compared were of the compute dtype."""
    save_guide(MAPGuide(saved()), tmp_path / "guide")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same checkpoint, cast: nothing to say
        load_guide(tmp_path / "guide", loaded())
    with pytest.raises(ValueError, match="the base weights differ from the ones the guide was saved with"):
        load_guide(tmp_path / "guide", _one_entry_moved(loaded()))


def test_a_guide_on_a_base_holding_bfloat16_on_one_holding_float16_is_checked_by_its_fingerprint_only(tmp_path):
    """No cast takes the two half dtypes of one checkpoint to the same weights: warned, not refused."""
    save_guide(MAPGuide(_part_cast(torch.float32, torch.bfloat16)), tmp_path / "guide")
    with pytest.warns(UserWarning, match=r"\d+ base weights?, e.g. .*, could be compared by their 4096-entry fingerprints "
                                         "only .* held in bfloat16 on one side and float16 on the other"):
        load_guide(tmp_path / "guide", lora(dtype=torch.float16))


def test_an_older_float32_record_on_a_float32_base_of_another_checkpoint_is_refused(tmp_path):
    """Both sides in float32: a checkpoint whose embeddings differ below bfloat16's resolution loaded silently, an older
    record's bfloat16 cast digest matching."""
    saved = lora()
    save_guide(MAPGuide(saved), tmp_path / "guide")
    _as_older_record(tmp_path / "guide", saved, casts=(torch.bfloat16, torch.float16))
    changed = lora()
    weight = changed.net.get_base_model().bert.encoder.layer[0].output.dense.weight
    with torch.no_grad():
        weight.view(-1)[5] += 1e-6 * weight.view(-1)[5].sign()
    with pytest.raises(ValueError, match=r"differ from the ones the guide was saved with \(the whole base"):
        load_guide(tmp_path / "guide", changed)


def test_a_reparametrised_weight_site_is_no_conditioned_site():
    """poutine.reparam observes the site it reparametrises (its value is loc + scale * the new site's): it was refused
    as values conditioned on for 1 of the model's 4 weight sites, drawn for another model."""
    from pyro.infer.reparam import LocScaleReparam

    model = lora()
    with torch.no_grad():
        trace = poutine.trace(poutine.reparam(model, {next(iter(model.sites)): LocScaleReparam(0.0)})).get_trace(data()[0])
        values = {n: trace.nodes[n]["value"] for n in model.sites}
        torch.testing.assert_close(trace.nodes["_RETURN"]["value"], model.logits(data()[0], values))


def test_predictive_with_a_reparametrised_site_or_a_do_beside_posterior_samples_runs():
    """Predictive conditions the model on the guide's (or given) samples of the other sites: a site reparametrised
    (its value set by the reparam) or intervened on (poutine.do) was counted as a site drawn from the prior, and the
    rest refused as values drawn for another model."""
    from pyro.infer import Predictive
    from pyro.infer.autoguide import AutoNormal
    from pyro.infer.reparam import LocScaleReparam

    model = lora()
    first, *rest = model.sites
    reparametrised = poutine.reparam(model, {first: LocScaleReparam(0.0)})
    guide = AutoNormal(reparametrised)
    guide(data()[0])
    with torch.no_grad():
        samples = Predictive(reparametrised, guide=guide, num_samples=2, return_sites=["_RETURN"])(data()[0])
    assert torch.isfinite(samples["_RETURN"]).all()
    values = MAPGuide(model).mean()
    posterior = {n: values[n].expand(2, *values[n].shape) for n in rest}
    with torch.no_grad():
        samples = Predictive(poutine.do(model, data={first: values[first]}), posterior_samples=posterior,
                             return_sites=["_RETURN"])(data()[0])
    torch.testing.assert_close(samples["_RETURN"][0], model.logits(data()[0], values))


def test_a_do_intervention_on_a_weight_site_is_no_renamed_site():
    """poutine.do records "<site>__CF" beside each site: it was refused as a renamed site."""
    model = lora()
    values = MAPGuide(model).mean()
    with torch.no_grad():
        logits = poutine.do(model, data=values)(data()[0])
    torch.testing.assert_close(logits, model.logits(data()[0], values))


@pytest.mark.parametrize("guide_class", [MAPGuide, MeanFieldGuide, FlowGuide, MCDropoutGuide])
def test_every_guide_taking_an_initial_value_checks_it(guide_class):
    """MAP, mean-field, flow and MC dropout took init unchecked: NaN predicted NaN, a transposed A failed in a forward."""
    model = lora()
    values = model.adapter_values()
    with pytest.raises(ValueError, match="'query.lora_A' has non-finite values"):
        guide_class(model, init={**values, "query.lora_A": torch.full_like(values["query.lora_A"], float("nan"))})
    with pytest.raises(ValueError, match="'query.lora_A' expects shape"):
        guide_class(model, init={**values, "query.lora_A": values["query.lora_A"].transpose(-1, -2)})
    with pytest.raises(ValueError, match="no value for site"):
        guide_class(model, init={"query.lora_A": values["query.lora_A"]})


@contextlib.contextmanager
def _default_dtype(dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


# a user's ambient state around the library's calls, which must not change what they build or return
AMBIENT = {"float64 default": lambda: _default_dtype(torch.float64), "inference_mode": torch.inference_mode}


def _dtypes(guide):
    return {k: v.dtype for k, v in guide.state_dict().items()}


@pytest.mark.parametrize("ambient", list(AMBIENT))
def test_a_guide_built_or_loaded_under_a_float64_default_or_inference_mode_is_the_clean_ones(built, ambient, tmp_path):
    """Under ``torch.set_default_dtype(torch.float64)`` a guide's constructor made float64 buffers beside float32 ones (a
    Laplace loaded so died in predict_glm once the default was back, a TFB drew other samples, 0.03 off in probability);
    under ``torch.inference_mode()`` its parameters were inference tensors, and a later fit died in AdamW ("Inplace
    update to inference tensor outside InferenceMode")."""
    model, guide = built
    predictive = _predictive(model, guide)
    pyro.set_rng_seed(5)
    before = predictive(guide)
    save_guide(guide, tmp_path / "g")
    with AMBIENT[ambient]():
        rebuilt = type(guide)(model, **guide.config())
        loaded = load_guide(tmp_path / "g", model)
    assert torch.get_default_dtype() == torch.float32 and not torch.is_inference_mode_enabled()  # the user's, put back
    for g in (rebuilt, loaded):
        assert _dtypes(g) == _dtypes(guide)
        assert not any(t.is_inference() for t in (*g.state_dict().values(), *model.net.parameters()))
    pyro.set_rng_seed(5)
    torch.testing.assert_close(predictive(loaded).probs, before.probs, rtol=0, atol=0)
    if list(loaded.parameters()):
        fit(model, loaded, data(), lr=1e-3, train_network=False, progress=False)


@pytest.mark.parametrize("cls", list(BUILDERS), ids=lambda c: c.__name__)
def test_every_guide_built_fitted_and_predicted_under_a_float64_default_gives_the_clean_numbers(cls, monkeypatch):
    """The library's tensors followed the user's default dtype: a Laplace fit died in the sketch update ("float !=
    double"), fit's ELBO summed a float64 prior. The network is the user's, built as before (a float64 network is
    another, supported, thing); everything the library builds, fits and predicts runs under the float64 default."""
    results = {}
    for dtype in (torch.float32, torch.float64):
        pyro.set_rng_seed(0)
        torch.manual_seed(0)
        with _default_dtype(dtype):
            model, guide = BUILDERS[cls]()
            pyro.set_rng_seed(5)
            results[dtype] = guide, _predictive(model, guide)(guide).probs
        monkeypatch.setattr(sys.modules[__name__], "tiny_bert", lambda plain=tiny_bert, **kw: _in_float32_default(plain, **kw))
    (clean, p32), (under, p64) = results[torch.float32], results[torch.float64]
    assert _dtypes(under) == _dtypes(clean) and p64.dtype == p32.dtype
    torch.testing.assert_close(p64, p32, rtol=0, atol=0)


def _in_float32_default(build, **kw):
    with _default_dtype(torch.float32):
        return build(**kw)


def test_a_laplaces_glm_and_evidence_under_a_float64_default_are_the_clean_ones():
    """predict_glm of a Laplace fitted in a clean state died under a float64 default ("expected scalar type Double but
    found Float"); its evidence and lambda must be the same numbers too."""
    model, guide = BUILDERS[LaplaceGuide]()
    copied = copy.deepcopy(guide)
    clean = guide.optimize_prior_precision("marglik"), guide.predict_glm(data()).probs
    with _default_dtype(torch.float64):
        under = copied.optimize_prior_precision("marglik"), copied.predict_glm(data()).probs
    assert under[0] == clean[0]
    torch.testing.assert_close(under[1], clean[1], rtol=0, atol=0)


def test_warnings_point_at_the_users_line_through_the_guides_wrappers():
    """The dtype guard wrapped every public method of every guide class, a user's subclass too: its own
    ``warnings.warn(..., stacklevel=2)`` then pointed into guides/base.py; and TFB's warnings pointed into
    guides/tfb.py when the guide was built by ``from_guide`` or ``bayesianize`` (fixed frame counts)."""
    from pyro_lora.guides.tfb import bayesianize

    class Reporting(MAPGuide):
        def report(self):
            warnings.warn("the subclass's own warning", stacklevel=2)

    model = lora()
    with torch.no_grad():  # B = 0: TFB warns that it cannot bayesianize it
        for layer in model.layers.values():
            layer.lora_B["default"].weight.zero_()
    calls = {"a subclass's method": lambda: Reporting(model).report(),
             "TFBGuide.from_guide": lambda: TFBGuide.from_guide(model, MAPGuide(model)),
             "bayesianize": lambda: bayesianize(model, data(), progress=False)}
    for what, call in calls.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        mine = [w for w in caught if not w.filename.endswith("modeling_utils.py")]  # peft's own deprecation, if any
        assert mine, what
        assert {(w.filename, w.lineno) for w in mine} == {(__file__, call.__code__.co_firstlineno)}, what


def test_switches_given_as_strings_and_data_of_none_are_refused_by_name():
    """Each of these took the string "False" as true (predict_glm kept its samples, optimize_prior_precision went per
    layer, train_ensemble kept the current adapter, a loader shuffled) or failed iterating None in a raw TypeError."""
    from pyro_lora.data import make_loader
    from pyro_lora.likelihoods import MultipleChoice

    model, laplace = BUILDERS[LaplaceGuide]()
    for call, name in ((lambda: laplace.predict_glm(data(), keep_samples="False"), "keep_samples"),
                       (lambda: laplace.optimize_prior_precision(per_layer="False"), "per_layer"),
                       (lambda: laplace.fit(data(), progress="no"), "progress"),
                       (lambda: guides.train_ensemble(model, data(), k=2, include_current="False"), "include_current"),
                       (lambda: guides.train_ivon(model, data(), rescale_lr="False"), "rescale_lr"),
                       (lambda: make_loader([{"x": 1}], list, 1, shuffle="False"), "shuffle"),
                       (lambda: MultipleChoice(format="cloze", share_prefix="False"), "share_prefix")):
        with pytest.raises(ValueError, match=rf"^{name} must be True or False, got '"):
            call()
    for call, name in ((lambda: laplace.fit(None), "data"), (lambda: laplace.predict_glm(None), "data"),
                       (lambda: predict(model, laplace, None), "data"),
                       (lambda: guides.bayesianize(model, None), "anchor_loader")):
        with pytest.raises(ValueError, match=rf"^{name} is None: give an iterable of batches"):
            call()


def _numpy_number(value):
    """``value`` as the numpy scalar a grid or a DataFrame row hands over (bools first: a bool is an int)."""
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        return np.int64(value)
    return np.float32(value) if isinstance(value, float) else value


def test_a_config_given_as_numpy_numbers_is_kept_as_python_ones(built):
    """A guide built with numpy numbers kept them: SWAGGuide(rank=np.int64(3)) trained and sampled, and save_guide
    failed only after the training ('Object of type int64 is not JSON serializable')."""
    model, guide = built
    config = guide.config()
    again = type(guide)(model, **{key: _numpy_number(value) for key, value in config.items()}).config()
    assert json.loads(json.dumps(again)) == {key: _numpy_number(value).item() if isinstance(value, (int, float)) else value
                                             for key, value in config.items()}
    assert all(type(again[key]) is type(value) for key, value in config.items()), (again, config)
