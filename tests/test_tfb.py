"""TFB guide: the SVD transform, the noise law, the sigma_q search, peft adapters, save/load, bad input."""

import math
import re
import warnings

import pyro.poutine as poutine
import pytest
import torch
from conftest import random_batch, tiny_bert, tiny_bert_base, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from pyro.infer import Trace_ELBO
from test_training import toy_data

from pyro_lora.guides import MAPGuide, MeanFieldGuide
from pyro_lora.guides.tfb import TFB_SEARCH, TFBGuide, bayesianize
from pyro_lora import CausalLM, LoraModel, MultipleChoice, SequenceClassification, load_guide, predict, save_guide
from pyro_lora.loraxs import LoraXSModel


def products(guide_or_values, model):
    """Per pair ``B @ A`` (stacked) from site values."""
    values = guide_or_values if isinstance(guide_or_values, dict) else guide_or_values.mean()
    pairs = [(n, n.replace("lora_A", "lora_B")) for n, s in model.sites.items() if s.matrix == "A"]
    return {a: values[b] @ values[a] for a, b in pairs}


def mc_anchors(n_batches=3, batch=8):
    """Toy multiple-choice anchors for tiny_llama: random prompts, 4 answer letters, labels 0."""
    out = []
    for i in range(n_batches):
        b = random_batch(batch=batch, seed=10 + i)
        out.append(b | {"choice_mask": torch.ones(batch, 4, dtype=torch.bool), "labels": torch.zeros(batch, dtype=torch.long)})
    return out


def mc_model():
    return LoraModel(tiny_llama(), MultipleChoice(answer_token_ids=[5, 6, 7, 8]), random="AB")


class _TwoLinear(torch.nn.Module):
    """Two 6 -> 5 linear layers: one stacked LoRA pair of shape A [2, 3, 6], B [2, 5, 3]."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"lin": torch.nn.Linear(6, 5)}) for _ in range(2)])


def tiny_layer_model(b_values):
    """A LoraModel over :class:`_TwoLinear` (s=2) whose B matrices are set to ``b_values`` ``[2, 5, r]``."""
    torch.manual_seed(0)
    r = b_values.shape[-1]
    net = get_peft_model(_TwoLinear(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"]))
    model = LoraModel(net, SequenceClassification(), random="AB")
    values = model.adapter_values()
    values["lin.lora_B"] = b_values
    model.write_adapter(values)
    return model


def with_singular_values(d, seed=0):
    """A 5 x 3 matrix ``U diag(d) V^T`` with random orthonormal ``U``, ``V``."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(5, 3, generator=g))
    v, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    return u @ torch.diag(torch.tensor(d)) @ v.T


@pytest.mark.parametrize("group", ["kind", "matrix"])
def test_transform_keeps_the_product_and_orthogonal_columns(group):
    model = LoraModel(tiny_llama(), CausalLM(), random="AB", group=group)
    before = products(model.adapter_values(), model)
    guide = TFBGuide(model)
    after = products(guide, model)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-6)
    for name, site in model.sites.items():
        if site.matrix == "B":
            b = guide.mean()[name]
            gram = b.transpose(-1, -2) @ b  # U diag(d): columns orthogonal, norms d^2
            torch.testing.assert_close(gram, torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1)), atol=1e-6, rtol=0)


def test_weight_noise_covariance_is_isotropic_in_column_space_of_b():
    # singular values spread over two orders of magnitude: Omega = sigma_q / d must undo them
    b = torch.stack([with_singular_values([1.0, 0.1, 0.01]), with_singular_values([0.5, 0.4, 0.2], seed=1)])
    model = tiny_layer_model(b)
    sigma, s, n = 0.05, 2.0, 100_000
    guide = TFBGuide(model, sigma_q=sigma)
    a_prime, b_prime = guide.mean()["lin.lora_A"], guide.mean()["lin.lora_B"]
    torch.manual_seed(0)
    draws = guide.sample(n)
    dw = s * (draws["lin.lora_B"] @ draws["lin.lora_A"] - b_prime @ a_prime)  # [S, L, d_out, d_in]
    cov = torch.einsum("slij,slkj->ljik", dw, dw) / n  # per layer and column: [L, d_in, d_out, d_out]
    u = torch.linalg.svd(b, full_matrices=False)[0]
    expected = (s * sigma) ** 2 * (u @ u.transpose(-1, -2))
    assert (cov - expected.unsqueeze(1)).abs().max() < 0.03 * (s * sigma) ** 2
    assert dw.mean(0).abs().max() < 0.02 * s * sigma


def test_a_rank_above_the_output_width_pads_the_transform_to_the_sites(tmp_path):
    """r = 7 > d_out = 5: B has 5 singular values, and A' came out [2, 5, 6] for sites [2, 7, 6]; it saved, then
    failed to load or export, and the Pyro guide path drew samples of the wrong shape."""
    model = tiny_layer_model(torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(3)))
    before = products(model.adapter_values(), model)
    guide = TFBGuide(model, sigma_q=0.05)
    shapes = {n: tuple(s.shape) for n, s in model.sites.items()}
    assert {n: tuple(v.shape) for n, v in guide.mean().items()} == shapes
    torch.testing.assert_close(products(guide, model)["lin.lora_A"], before["lin.lora_A"], rtol=1e-5, atol=1e-6)
    trace = poutine.trace(guide).get_trace(random_batch())
    assert {n: tuple(trace.nodes[n]["value"].shape) for n in shapes} == shapes
    s, sigma, n = 2.0, 0.05, 100_000  # B has full row rank 5: the weight noise is isotropic, (s sigma)^2 I
    torch.manual_seed(0)
    draws = guide.sample(n)
    dw = s * (draws["lin.lora_B"] @ draws["lin.lora_A"] - before["lin.lora_A"])
    cov = torch.einsum("slij,slkj->ljik", dw, dw) / n
    assert (cov - (s * sigma) ** 2 * torch.eye(5)).abs().max() < 0.03 * (s * sigma) ** 2
    save_guide(guide, tmp_path / "tfb")
    loaded = load_guide(tmp_path / "tfb", model)
    for k, v in guide.mean().items():
        torch.testing.assert_close(loaded.mean()[k], v)
    model.write_adapter(loaded.mean())
    torch.testing.assert_close(products(model.adapter_values(), model)["lin.lora_A"], before["lin.lora_A"], rtol=1e-5, atol=1e-6)


def test_sigma_zero_reproduces_map_and_pyro_guide_path():
    model = LoraModel(tiny_bert(), SequenceClassification(), random="AB")
    batch = random_batch() | {"labels": torch.tensor([0, 1, 2])}
    map_logits = model.logits(batch, MAPGuide(model).mean())
    guide = TFBGuide(model)
    assert guide.deterministic and float(guide.sigma_q) == 0
    torch.testing.assert_close(model.logits(batch, guide.sample(3), 3), map_logits.expand(3, -1, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predict(model, guide, [batch]).probs, torch.softmax(map_logits, -1), rtol=1e-5, atol=1e-6)
    guide.set_sigma_q(0.5)
    assert not guide.deterministic
    noisy = model.logits(batch, guide.sample(3), 3)
    assert not torch.allclose(noisy[0], map_logits, atol=1e-3)
    # a real Pyro guide: sites with the model's names and shapes, a finite ELBO
    trace = poutine.trace(guide).get_trace(batch)
    for name, site in model.sites.items():
        assert trace.nodes[name]["value"].shape == site.shape
    assert torch.isfinite(Trace_ELBO().differentiable_loss(model, guide, batch))
    for bad in (-1.0, True, "0.1"):  # True and "0.1" were taken as 1.0 and 0.1
        with pytest.raises(ValueError, match="sigma_q must be a finite number >= 0"):
            guide.set_sigma_q(bad)
    # recorded with the guide and saved: a raw TypeError for a string ratio, anything at all for the others
    for kwargs, message in [(dict(min_singular_ratio="1e-3"), "min_singular_ratio must be a finite positive number"),
                            (dict(min_singular_ratio=2.0), r"min_singular_ratio must be in \(0, 1\)"),
                            (dict(criterion="bogus"), "criterion must be None, 'val_nll' or one of"),
                            (dict(tolerance=-1), "tolerance must be a finite number >= 0"),
                            (dict(tolerance="0.01"), "tolerance must be a finite number >= 0"),
                            # "x" was kept as the trace ["x"], saved with the guide
                            (dict(trace="x"), "trace must be a list of the search's dicts"),
                            (dict(trace=[1, 2]), "trace must be a list of the search's dicts")]:
        with pytest.raises(ValueError, match=message):
            TFBGuide(model, **kwargs)


def manual_metric(guide, model, anchors, sigma, num_samples, seed):
    """Pseudo-label NLL relative change, computed without the guide's search code."""
    g = torch.Generator().manual_seed(seed)
    values = guide.sample(num_samples, generator=g, sigma_q=sigma)
    ref, noisy = [], []
    for batch in anchors:
        p0 = torch.softmax(model.logits(batch, guide.mean()), -1)
        p = torch.softmax(model.logits(batch, values, num_samples), -1).mean(0)
        y0 = p0.argmax(-1)
        ref.append(-p0.gather(1, y0[:, None]).log())
        noisy.append(-p.gather(1, y0[:, None]).log())
    nll0, nll = torch.cat(ref).mean(), torch.cat(noisy).mean()
    return float((nll - nll0) / nll0)


@pytest.mark.parametrize("spacing", ["linear", "log"])
def test_search_returns_largest_feasible_and_next_grid_point_is_infeasible(spacing):
    model, anchors = mc_model(), mc_anchors(n_batches=2)
    guide = TFBGuide(model)
    low, high, iterations, tol = 0.002, 0.2, 3, 0.02
    kw = dict(criterion="nll", tolerance=tol, low=low, high=high, num_samples=4, progress=False, spacing=spacing)
    trace = guide.search(anchors, iterations=iterations, **kw)
    best = max(t["sigma"] for t in trace if t["feasible"])
    assert len(trace) == iterations + 2 and low <= best < high
    assert float(guide.sigma_q) == pytest.approx(best, rel=1e-6)  # a float32 buffer
    # the grid the bisection walks: 2**iterations equal steps, in sigma or in log sigma
    up = best + (high - low) / 2**iterations if spacing == "linear" else best * (high / low) ** (1 / 2**iterations)
    above = [t for t in trace if math.isclose(t["sigma"], up)]
    assert len(above) == 1 and not above[0]["feasible"]
    # recomputed independently: best within tolerance, the next grid point up beyond it
    assert manual_metric(guide, model, anchors, best, 4, 0) <= tol < manual_metric(guide, model, anchors, up, 4, 0)
    match = [t for t in trace if t["sigma"] == best][0]
    assert math.isclose(match["metric"], manual_metric(guide, model, anchors, best, 4, 0), rel_tol=1e-3, abs_tol=1e-5)
    assert (guide.criterion, guide.tolerance, guide.trace) == ("nll", tol, trace)
    # deterministic under the seed; another seed draws other noise
    assert TFBGuide(model).search(anchors, iterations=iterations, **kw) == trace
    other = TFBGuide(model).search(anchors, iterations=0, seed=1, **kw)
    assert [t["metric"] for t in other] != [t["metric"] for t in trace[:2]]
    with pytest.raises(ValueError, match="spacing must be one of"):
        guide.search(anchors, **{**kw, "spacing": "geometric"})


def test_the_python_search_defaults_are_compares():
    """bayesianize() searched with TFB's 8B-model range (nll, high 0.015, 5 steps) where compare and the CLI use
    TFB_SEARCH (flip at 1% on [0.001, 0.2]), and with 10 samples per anchor where they search with --samples (default 4;
    a tiny BERT's adapter got sigma_q 0.0532 against compare's 0.0232): a Python user got another posterior from the
    same adapter and anchors. Compare's search (bayesianize_setup) at its defaults is the Python default now."""
    from types import SimpleNamespace

    from pyro_lora.experiments.setup import CompareConfig
    from pyro_lora.guides.tfb import bayesianize_setup

    model, anchors = mc_model(), mc_anchors(n_batches=4)
    config = CompareConfig(progress=False)  # compare's and the CLI's defaults: --samples 4, seed 0
    assert (TFB_SEARCH["num_samples"], TFB_SEARCH["seed"]) == (config.samples, config.seeds[0])
    setup = SimpleNamespace(config=config, seed=config.seeds[0], train=anchors, loader=list)  # one batch per "record"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a search edge, if any, is the same in both
        compared = bayesianize_setup(setup, model)
        default = bayesianize(model, anchors, progress=False)
        ten = TFBGuide(model).search(anchors, num_samples=10, progress=False)
    assert float(default.sigma_q) == float(compared.sigma_q) > 0 and default.trace == compared.trace
    assert (default.criterion, default.tolerance) == ("flip", 0.01)
    assert max(t["sigma"] for t in default.trace) == TFB_SEARCH["high"] and len(default.trace) <= TFB_SEARCH["iterations"] + 2
    assert ten != default.trace  # the sample count moves the search: it is one of the shared settings


def test_search_edges_flip_and_accuracy(capsys):
    model, anchors = mc_model(), mc_anchors(n_batches=2)
    guide = TFBGuide(model)
    with pytest.warns(UserWarning, match="already feasible"):
        trace = guide.search(anchors, criterion="flip", tolerance=0.5, low=1e-4, high=1e-3, num_samples=2, progress=True)
    assert float(guide.sigma_q) == pytest.approx(1e-3) and len(trace) == 1
    assert guide.search_edge.startswith("high=0.001 is already feasible")  # the tfb method's note
    printed = capsys.readouterr()
    assert "TFB step 1: sigma_q=0.001" in printed.out + printed.err
    assert "TFB search: sigma_q = 0.001" in printed.out + printed.err
    with pytest.warns(UserWarning, match="low=1 is infeasible"):
        guide.search(anchors, criterion="flip", tolerance=0.0, low=1.0, high=2.0, num_samples=2, progress=False)
    assert float(guide.sigma_q) == 0 and guide.deterministic and guide.search_edge.startswith("low=1 is infeasible")
    # labels = the sigma = 0 predictions: the accuracy drop is the flip rate
    labelled = [b | {"labels": model.logits(b).argmax(-1)} for b in anchors]
    kw = dict(tolerance=0.1, low=1e-3, high=1.0, iterations=2, num_samples=2, progress=False)
    accuracy = guide.search(labelled, criterion="accuracy", **kw)
    assert all(t["feasible"] == (t["metric"] <= 0.1) for t in accuracy) and float(guide.sigma_q) < 1.0
    flip = guide.search(labelled, criterion="flip", **kw)
    assert [(t["sigma"], t["feasible"]) for t in flip] == [(t["sigma"], t["feasible"]) for t in accuracy]
    assert all(f["metric"] == a["metric"] for f, a in zip(flip, accuracy) if f["anchors"] == 16)  # scored whole
    assert guide.search_edge is None
    # a DataLoader over an IterableDataset has __len__ but raises TypeError: the emptiness check died on it raw
    from torch.utils.data import DataLoader, IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(labelled)

    streamed = guide.search(DataLoader(Stream(), batch_size=None), criterion="flip", **kw)
    assert [(t["sigma"], t["metric"]) for t in streamed] == [(t["sigma"], t["metric"]) for t in flip]


def test_search_checks_labels_seed_and_sample_sigma_before_drawing_and_a_trace_comes_back_with_its_inf():
    """Anchors labelled 7 for a 3-class head gave sigma_q = high under "accuracy" (accuracy 0 can never drop) where
    predict refuses them; a numpy or bool seed failed after the sigma = 0 pass; sample(sigma_q=-0.1) drew mirrored
    noise and nan non-finite draws; a saved trace read an overflowed candidate's inf metric back as None."""
    import numpy as np

    classifier = TFBGuide(LoraModel(tiny_bert(), SequenceClassification(), random="AB"))
    batch = random_batch(batch=8, seed=3)
    with pytest.raises(ValueError, match=r"label\(s\) \[7\] outside the 3 classes"):
        classifier.search([batch | {"labels": torch.full((8,), 7)}], criterion="accuracy",
                          num_samples=2, progress=False)
    model, anchors = mc_model(), mc_anchors(n_batches=1)
    guide = TFBGuide(model)
    for seed in (True, 1.5, None, -1):
        with pytest.raises(ValueError, match="seed"):
            guide.search(anchors, seed=seed, num_samples=2, progress=False)
    trace = guide.search(anchors, seed=np.int64(3), num_samples=2, iterations=1, progress=False)
    assert trace == guide.search(anchors, seed=3, num_samples=2, iterations=1, progress=False)
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="sigma_q must be"):
            guide.sample(2, sigma_q=bad)
    overflowed = [{"sigma": 1e36, "metric": math.inf, "feasible": False, "anchors": 0, "near_overflow": True}]
    assert TFBGuide(model, trace=[{**overflowed[0], "metric": None}]).trace == overflowed


def manual_flip_rate(guide, model, anchors, sigma, num_samples, seed):
    """Fraction of anchors whose mean-softmax prediction differs from the sigma = 0 one, over every anchor."""
    values = guide.sample(num_samples, generator=torch.Generator().manual_seed(seed), sigma_q=sigma)
    flips = [model.logits(b, values, num_samples).softmax(-1).mean(0).argmax(-1) != model.logits(b, guide.mean()).argmax(-1)
             for b in anchors]
    return float(torch.cat(flips).float().mean())


def test_a_flip_candidate_stops_once_infeasible_and_the_search_chooses_what_a_full_scoring_would():
    """Flips only add up: a candidate past the tolerance part-way is infeasible whatever the other anchors do, so the
    search stops scoring it (the study's TFB search on SmolLM2 spent most of its 78 minutes on such candidates)."""
    model, anchors = mc_model(), mc_anchors(n_batches=8, batch=4)
    guide = TFBGuide(model)
    tol, kw = 0.1, dict(low=1e-3, high=3.0, iterations=4, num_samples=2, progress=False)
    trace = guide.search(anchors, criterion="flip", tolerance=tol, **kw)
    full = {t["sigma"]: manual_flip_rate(guide, model, anchors, t["sigma"], 2, 0) for t in trace}
    for t in trace:
        assert t["feasible"] == (full[t["sigma"]] <= tol)
        if t["anchors"] < 32:  # stopped: infeasible, its rate so far a lower bound past the tolerance
            assert not t["feasible"] and tol < t["metric"] <= full[t["sigma"]]
        else:
            assert t["metric"] == pytest.approx(full[t["sigma"]])
    assert any(t["anchors"] < 32 for t in trace) and any(t["feasible"] for t in trace)
    feasible = [s for s, rate in full.items() if rate <= tol]
    assert float(guide.sigma_q) == pytest.approx(max(feasible))


def test_peft_saved_adapter_loads_and_bayesianizes(tmp_path):
    net = tiny_bert(num_labels=2)
    ref_model = LoraModel(net, SequenceClassification(), random="AB")
    expected = products(ref_model.adapter_values(), ref_model)
    net.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_bert_base(num_labels=2), tmp_path / "adapter").eval()
    model = LoraModel(reloaded, SequenceClassification(), random="AB")
    data = toy_data(n=16)
    # seed 1: under seed 0 the two canonical-sign draws flip none of these 16 toy labels even at sigma_q 40 (high)
    guide = bayesianize(model, data, criterion="flip", tolerance=0.1, low=0.5, high=40.0, iterations=2, num_samples=2,
                        seed=1, progress=False)
    assert isinstance(guide, TFBGuide) and 0 < float(guide.sigma_q) < 40.0
    for name, ba in products(guide, model).items():
        torch.testing.assert_close(ba, expected[name], rtol=1e-5, atol=1e-6)
    batch = data[0]
    torch.testing.assert_close(model.logits(batch, guide.mean()), net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, rtol=1e-5, atol=1e-5)


def test_from_map_export_and_from_a_only_guide():
    net = tiny_bert(num_labels=2)
    model_a = LoraModel(net, SequenceClassification(), random="A")
    guide_a = MAPGuide(model_a, init={k: v + 0.3 for k, v in model_a.adapter_values().items()})  # BLoB-like: only A
    model = LoraModel(net, SequenceClassification(), random="AB")
    tfb = TFBGuide.from_guide(model, guide_a)
    b = model.adapter_values()
    for name, ba in products(tfb, model).items():
        torch.testing.assert_close(ba, b[name.replace("lora_A", "lora_B")] @ guide_a.mean()[name], rtol=1e-5, atol=1e-6)
    # MAP exported into the adapter, then the default constructor reads it
    map_guide = MAPGuide(model, init={k: v * 1.5 for k, v in model.adapter_values().items()})
    model.write_adapter(map_guide.mean())
    for name, ba in products(TFBGuide(model), model).items():
        torch.testing.assert_close(ba, products(map_guide, model)[name], rtol=1e-5, atol=1e-6)


def test_from_guide_bayesianizes_an_a_only_guide_whose_fit_trained_b_and_the_head():
    """A BLoB-style guide (A random) whose fit trained the point B and the head, the default: from_guide read the whole
    adapter for the B sites, and its check refused the adapter's stale A, which init replaces (and so did the
    init=guide.mean() its message advised). The reference: B'A' = B A with A the guide's mean, B the trained adapter's."""
    from pyro_lora import fit

    data = toy_data(n=16)
    net = tiny_bert(num_labels=2)
    model_a = LoraModel(net, SequenceClassification(), random="A", num_data=16)
    guide_a = MeanFieldGuide(model_a)
    fit(model_a, guide_a, data, epochs=2, lr=5e-2, progress=False)
    model = LoraModel(net, SequenceClassification(), random="AB", num_data=16)
    layers = net.base_model.model.bert.encoder.layer  # the trained B, as peft holds it
    b = {f"{kind}.lora_B": torch.stack([getattr(layer.attention.self, kind).lora_B["default"].weight.detach()
                                        for layer in layers]) for kind in ("query", "value")}
    for tfb in (TFBGuide.from_guide(model, guide_a), TFBGuide(model, init=guide_a.mean())):
        for name, ba in products(tfb, model).items():
            torch.testing.assert_close(ba, b[name.replace("lora_A", "lora_B")] @ guide_a.mean()[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"write_adapter\(guide.mean\(\)\) first"):  # A from the stale adapter: refused
        TFBGuide(model, init=b)
    # the guide gone, its training known by the record's sums: its mean as init is still that training's
    import gc

    mean = {name: v.detach().clone() for name, v in guide_a.mean().items()}
    del guide_a, tfb
    gc.collect()
    for name, ba in products(TFBGuide(model, init=mean), model).items():
        torch.testing.assert_close(ba, b[name.replace("lora_A", "lora_B")] @ mean[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"write_adapter\(guide.mean\(\)\) first"):
        TFBGuide(model, init={name: v + 0.1 for name, v in mean.items()})  # not the training's mean
    with pytest.raises(ValueError, match=r"write_adapter\(guide.mean\(\)\) first"):  # the mean, with a B never trained
        TFBGuide(model, init={**mean, "query.lora_B": torch.full_like(b["query.lora_B"], 0.01)})
    with pytest.raises(ValueError, match=r"site 'query.lora_A' expects shape \(2, 4, 32\), got \(4, 32\)"):
        TFBGuide(model, init={"query.lora_A": mean["query.lora_A"][0]})  # was a raw IndexError
    with pytest.raises(ValueError, match=r"write_adapter\(guide.mean\(\)\) first"):
        TFBGuide(model, init=b)


def test_from_guide_bayesianizes_a_guide_fit_trained_without_writing_it_into_the_adapter():
    # the constructor read the adapter first whatever init held: after fit(model, MAPGuide(model), ...) both
    # from_guide and init=guide.mean() (the fix its own refusal named) were refused as a stale adapter
    from pyro_lora import fit

    data = toy_data(n=16)
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), random="AB", num_data=16)
    map_guide = MAPGuide(model)
    fit(model, map_guide, data, epochs=2, lr=5e-2, progress=False)
    for tfb in (TFBGuide.from_guide(model, map_guide), TFBGuide(model, init=map_guide.mean())):
        torch.testing.assert_close(predict(model, tfb, data).probs, predict(model, map_guide, data).probs, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"write_adapter\(guide.mean\(\)\) first"):  # the adapter itself is stale
        TFBGuide(model)


def _alpha_net(alpha, base_seed=0, targets=("query", "value")):
    """tiny_bert's base (``base_seed``) with an r=4 LoRA of ``lora_alpha=alpha`` whose ``B`` is randomised (seed 5)."""
    net = get_peft_model(
        tiny_bert_base(num_labels=3, seed=base_seed),
        LoraConfig(r=4, lora_alpha=alpha, target_modules=list(targets), task_type="SEQ_CLS"),
    )
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return net


@pytest.mark.parametrize(
    "other, match",
    [
        (lambda: LoraModel(_alpha_net(32), SequenceClassification(), random="AB"), r"LoRA scaling .* is 2 for the guide and 8 in the model .*4x"),
        (lambda: LoraModel(_alpha_net(8, base_seed=1), SequenceClassification(), random="AB"), "base weights differ"),
        (lambda: LoraModel(_alpha_net(8, targets=("query",)), SequenceClassification(), random="AB"), r"the guide has sites the model lacks: \['value.lora_A', 'value.lora_B'\]"),
        (lambda: LoraModel(tiny_bert(num_labels=2), SequenceClassification(), random="AB"), r"the head has 3 outputs \(classes\) in the guide and 2 in the model"),
    ],
    ids=["lora_alpha", "base_weights", "extra_sites", "head"],
)
def test_from_guide_refuses_a_guide_of_another_model_as_predict_does(other, match):
    """A trained guide's deltas mean nothing on a model with another scaling, base, site set or head: from_guide
    refuses it with predict's sentence (it used to keep the shared sites and quietly build a wrong TFB guide)."""
    trained = MAPGuide(LoraModel(_alpha_net(8), SequenceClassification(), random="AB"))
    model = other()
    with pytest.raises(ValueError, match=match) as predicted:
        predict(model, trained, toy_data(n=4))
    with pytest.raises(ValueError, match=match) as built:
        TFBGuide.from_guide(model, trained)
    assert str(built.value).split(": ", 1)[1] == str(predicted.value).split(": ", 1)[1]
    assert str(built.value).startswith("cannot build a TFB guide with this MAPGuide on this model")


def test_from_guide_of_an_a_only_guide_still_checks_everything_but_the_missing_sites():
    """A BLoB-style guide (A random, B in the adapter) may lack the model's B sites, but nothing else may differ."""
    guide_a = MAPGuide(LoraModel(_alpha_net(8), SequenceClassification(), random="A"))
    same = LoraModel(_alpha_net(8), SequenceClassification(), random="AB")
    tfb = TFBGuide.from_guide(same, guide_a)
    b = same.adapter_values()
    for name, ba in products(tfb, same).items():
        torch.testing.assert_close(ba, b[name.replace("lora_A", "lora_B")] @ guide_a.mean()[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"LoRA scaling .* 4x"):
        TFBGuide.from_guide(LoraModel(_alpha_net(32), SequenceClassification(), random="AB"), guide_a)
    with pytest.raises(ValueError, match="base weights differ"):
        TFBGuide.from_guide(LoraModel(_alpha_net(8, base_seed=1), SequenceClassification(), random="AB"), guide_a)
    with pytest.raises(ValueError, match="sites the model lacks"):  # an A-only guide over more layers than the model
        TFBGuide.from_guide(
            LoraModel(_alpha_net(8, targets=("query",)), SequenceClassification(), random="AB"),
            MAPGuide(LoraModel(_alpha_net(8), SequenceClassification(), random="A")),
        )


def test_from_guide_refuses_an_ensemble_and_a_non_guide():
    """An ensemble's mean() averages separately trained members: no trained adapter to bayesianize."""
    from pyro_lora.guides.ensemble import EnsembleGuide

    model = LoraModel(_alpha_net(8), SequenceClassification(), random="AB")
    values = model.adapter_values()
    ensemble = EnsembleGuide(model, [{k: v + 0.1 * i for k, v in values.items()} for i in range(2)])
    with pytest.raises(ValueError, match="no trained adapter"):
        TFBGuide.from_guide(model, ensemble)
    single = EnsembleGuide(model, [values])  # one member: its mean is that member
    torch.testing.assert_close(products(TFBGuide.from_guide(model, single), model), products(values, model), rtol=1e-5, atol=1e-6)

    class NotAGuide:
        def mean(self):
            return values

    with pytest.raises(ValueError, match="pyro_lora.guides.LoraGuide"):
        TFBGuide.from_guide(model, NotAGuide())


def test_save_load_round_trip(tmp_path):
    model, anchors = mc_model(), mc_anchors(n_batches=2)
    guide = TFBGuide(model)
    guide.search(anchors, criterion="flip", tolerance=0.2, low=1e-3, high=0.3, iterations=2, num_samples=2, progress=False)
    save_guide(guide, tmp_path / "tfb")
    fresh = mc_model()
    with torch.no_grad():  # an untrained adapter: loading must not decompose (nor warn about) it
        for n, p in fresh.net.named_parameters():
            if "lora_B" in n:
                p.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_guide(tmp_path / "tfb", fresh)
    assert type(loaded) is TFBGuide
    assert float(loaded.sigma_q) == float(guide.sigma_q) > 0
    assert (loaded.criterion, loaded.tolerance, loaded.trace) == (guide.criterion, guide.tolerance, guide.trace)
    for k, v in guide.mean().items():
        torch.testing.assert_close(loaded.mean()[k], v)
    draw = lambda g: g.sample(3, generator=torch.Generator().manual_seed(5))  # noqa: E731
    for k, v in draw(guide).items():
        torch.testing.assert_close(draw(loaded)[k], v)
    # a search that ended at an end of its range keeps saying so after a reload (its note was None there)
    with pytest.warns(UserWarning, match="already feasible"):
        guide.search(anchors, criterion="flip", tolerance=0.5, low=1e-5, high=2e-5, iterations=1, num_samples=2,
                     progress=False)
    save_guide(guide, tmp_path / "edge")
    assert load_guide(tmp_path / "edge", mc_model()).search_note == guide.search_note is not None


def test_one_product_stored_with_other_signs_or_exported_gives_the_same_posterior_draws_and_search(tmp_path):
    """The SVD fixes U's columns only up to sign and the search draws one fixed eps: an exported TFB adapter
    (B' = U diag(d)), reloaded and searched again with the same settings, gave sigma_q 0.0903 where the guide it came
    from had 0.0259. The signs are canonical now: every storage of B A gives one A', one draw per seed, one search."""
    from pyro_lora import export_adapter
    from pyro_lora.pretrained import load_adapter

    model, anchors = mc_model(), mc_anchors(n_batches=2)
    values = model.adapter_values()
    flipped = dict(values)  # rows of A and columns of B flipped together: the same B A
    for name, site in model.sites.items():
        if site.matrix == "A":
            sign = torch.where(torch.arange(site.shape[-2]) % 2 == 0, -1.0, 1.0)  # [r]
            flipped[name] = values[name] * sign[:, None]
            flipped[name.replace("lora_A", "lora_B")] = values[name.replace("lora_A", "lora_B")] * sign
    guide = TFBGuide(model)
    kw = dict(criterion="nll", tolerance=0.02, low=1e-3, high=1.0, iterations=4, num_samples=4, progress=False)
    trace = guide.search(anchors, **kw)
    export_adapter(guide, tmp_path / "adapter")  # writes B' = U diag(d), A' into the adapter
    reloaded = LoraModel(load_adapter(tiny_llama().unload(), tmp_path / "adapter").eval(),
                         MultipleChoice(answer_token_ids=[5, 6, 7, 8]), random="AB")
    draw = lambda g: g.sample(3, generator=torch.Generator().manual_seed(5), sigma_q=0.1)  # noqa: E731
    for other in (TFBGuide(model, init=flipped), TFBGuide(reloaded)):
        for k, v in draw(guide).items():
            torch.testing.assert_close(draw(other)[k], v, rtol=1e-4, atol=1e-5)
        for name, ba in products(other, model).items():
            torch.testing.assert_close(ba, products(values, model)[name], rtol=1e-5, atol=1e-6)
        again = other.search(anchors, **kw)
        assert float(other.sigma_q) == float(guide.sigma_q)
        assert [t["metric"] for t in again] == pytest.approx([t["metric"] for t in trace], rel=1e-3, abs=1e-5)


def test_near_zero_singular_values_warn_and_stay_finite():
    rank_deficient = with_singular_values([1.0, 0.3, 0.0])
    model = tiny_layer_model(torch.stack([rank_deficient, torch.zeros(5, 3)]))
    before = products(model.adapter_values(), model)["lin.lora_A"]
    with pytest.warns(UserWarning, match=r"below 0.001 x .*blocks\.0\.lin.*B is zero in .*blocks\.1\.lin"):
        guide = TFBGuide(model, sigma_q=0.05)
    torch.testing.assert_close(products(guide, model)["lin.lora_A"], before, rtol=1e-5, atol=1e-6)
    draws = guide.sample(2000)
    noise = draws["lin.lora_B"] @ (draws["lin.lora_A"] - guide.mean()["lin.lora_A"])
    assert torch.isfinite(draws["lin.lora_A"]).all()
    assert noise[:, 1].abs().max() == 0  # B = 0: no weight noise
    assert noise[:, 0].std() < 2 * 0.05  # floored direction: no blow-up, at most isotropic
    # a well-conditioned B does not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TFBGuide(tiny_layer_model(torch.stack([with_singular_values([1.0, 0.5, 0.2])] * 2)))


def test_bad_inputs_have_clear_errors():
    for model in [LoraModel(tiny_bert(), SequenceClassification(), random=r) for r in "AB"] + [
            LoraXSModel(tiny_bert(random_b=False), SequenceClassification())]:
        with pytest.raises(ValueError, match="both A and B"):
            TFBGuide(model)
    model = LoraModel(tiny_bert(), SequenceClassification(), random="AB")
    with pytest.raises(ValueError, match="unknown site"):
        TFBGuide(model, init={"nope": torch.zeros(1)})
    bad = model.adapter_values()
    bad["query.lora_B"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        TFBGuide(model, init=bad)
    with pytest.raises(ValueError, match="min_singular_ratio"):
        TFBGuide(model, min_singular_ratio=0.0)
    guide = TFBGuide(model)
    anchors = toy_data(n=8)
    with pytest.raises(ValueError, match="criterion must be"):
        guide.search(anchors, criterion="ece", progress=False)
    with pytest.raises(ValueError, match="0 < low < high"):
        guide.search(anchors, low=0.1, high=0.01, progress=False)
    # True was read as a tolerance of 1 (every sigma feasible); strings compared raw or were read as numbers
    for bad in (True, "0.01", math.nan):
        with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
            guide.search(anchors, tolerance=bad, progress=False)
    for bad in (dict(high=math.inf), dict(low="0.01"), dict(low=0.0), dict(high=True)):  # inf made every midpoint inf
        with pytest.raises(ValueError, match="(low|high) must be a finite positive number"):
            guide.search(anchors, progress=False, **bad)
    with pytest.raises(ValueError, match="empty"):
        guide.search([], progress=False)
    lm = LoraModel(tiny_llama(), CausalLM(), random="AB")
    with pytest.raises(ValueError, match="per-example class logits"):
        TFBGuide(lm).search([random_batch()], progress=False)


def test_search_bounds_and_tolerances_that_decide_nothing_are_refused_and_one_batch_is_named():
    """high=inf made every midpoint inf: the search returned low (0.001 for 0.65) without a word; a flip tolerance of 5
    let every sigma_q pass; one batch for the anchors (or predict's data) was iterated as its keys."""
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), num_data=48)
    guide = TFBGuide(model)
    anchors = toy_data(16)
    for kwargs, message in [({"high": math.inf}, "high must be a finite positive number"), ({"tolerance": 5.0}, "lets every sigma_q pass"),
                            ({"tolerance": math.inf}, "finite number >= 0"), ({"criterion": "accuracy", "tolerance": 1.0},
                                                                            "lets every sigma_q pass"),
                            # sigma_q is float32: high=1e-300 was "already feasible", reported and saved as 0
                            ({"low": 1e-60, "high": 1e-50}, r"low=1e-60 is below float32's smallest normal number")]:
        with pytest.raises(ValueError, match=message):
            guide.search(anchors, **kwargs)
    for call in (lambda: guide.set_sigma_q(1e-300), lambda: guide.sample(2, sigma_q=1e-300)):
        with pytest.raises(ValueError, match=r"sigma_q=1e-300 is below float32's smallest normal number .* stored as 0"):
            call()
    for call in (lambda: guide.set_sigma_q(1e39), lambda: guide.sample(2, sigma_q=1e39)):  # inf draws
        with pytest.raises(ValueError, match=r"sigma_q=1e\+39 is above float32's largest number"):
            call()
    with pytest.raises(ValueError, match=r"high=1e\+39 is above float32's largest number"):
        guide.search(anchors, low=1.0, high=1e39)
    guide.set_sigma_q(0)  # the point estimate, asked for
    assert guide.deterministic
    guide.search(anchors, criterion="nll", tolerance=2.0, iterations=1)  # a relative NLL change may exceed 1
    for call in (lambda: guide.search(anchors[0]), lambda: predict(model, guide, anchors[0]),
                 lambda: bayesianize(model, anchors[0])):
        with pytest.raises(ValueError, match="data is one batch .a dict with keys"):
            call()


def test_search_refuses_anchors_from_a_loader_that_drops_its_last_batch():
    """A drop_last loader scored 8 of 10 anchors without a word (its sigma_q searched on fewer anchors than given)."""
    from torch.utils.data import DataLoader

    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), num_data=48)
    rows = [{k: v[i] for k, v in toy_data(10, batch=10)[0].items()} for i in range(10)]
    with pytest.raises(ValueError, match=r"TFBGuide.search reads every example of its data, but this DataLoader drops"):
        TFBGuide(model).search(DataLoader(rows, batch_size=4, drop_last=True), progress=False)
    trace = TFBGuide(model).search(DataLoader(rows, batch_size=4), high=5.0, iterations=1, progress=False)
    assert max(t["anchors"] for t in trace) == 10  # a feasible candidate scored all (an infeasible one may stop early)


def test_a_search_on_too_few_anchors_for_its_tolerance_is_warned_of():
    """9 anchors under the 1% flip tolerance: any sigma_q that flips none of them was taken without a word, and one
    that flipped 2 of 7 test questions (0.857 -> 0.571) was chosen; 100 anchors allow a flip, and nll is not a count."""
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), num_data=48)
    for n, criterion, warned in ((9, "flip", True), (9, "accuracy", True), (100, "flip", False), (9, "nll", False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            guide = TFBGuide(model)
            guide.search(toy_data(n, batch=n), criterion=criterion, iterations=1, progress=False)
        said = [str(w.message) for w in caught if "anchors:" in str(w.message)]
        assert bool(said) == warned, (n, criterion, said)
        if warned:
            assert said[0].startswith(f"TFB search: only {n} anchors:") and "use at least 100 anchors" in said[0]
            assert guide.search_note.startswith(said[0])  # the row's note (compare's table) keeps it too
        else:
            assert "anchors:" not in (guide.search_note or "")


def test_the_accuracy_drop_counts_anchors_exactly():
    """The drop was acc_0 - acc_sigma in floats: 0.57 - 0.56 is 0.010000000000000009, so one anchor lost of 100 was
    infeasible at the 1% tolerance the few-anchors warning calls enough; it is the anchors lost over the count."""
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), num_data=48)
    trace = TFBGuide(model).search(toy_data(100, batch=25), criterion="accuracy", low=1e-3, high=50.0, iterations=6,
                                   progress=False)
    scored = [t for t in trace if t["anchors"]]
    assert any(t["metric"] != 0 for t in scored)
    assert all(t["metric"] == round(t["metric"] * 100) / 100 and t["feasible"] == (round(t["metric"] * 100) <= 1)
               for t in scored)


def test_a_sigma_whose_noise_overflows_the_logits_is_infeasible_under_every_criterion():
    """The search scored an overflowing candidate's nan log-probabilities: argmax counts a nan as class 0, so under
    "accuracy" sigma_q = 1e36 read feasible (an accuracy 'drop' of -0.125) and was chosen, with the advice to raise
    ``high``; every criterion now takes it as infeasible (inf)."""
    from test_laplace import mlp_data, mlp_model

    model = mlp_model()  # no LayerNorm to scale huge activations back
    data = [{**b, "input_ids": b["input_ids"] * 1e3} for b in mlp_data(n=8, batch=4)]
    guide = TFBGuide(model)
    for criterion in ("flip", "nll", "accuracy"):
        trace = guide.search(data, criterion=criterion, low=1e-3, high=1e36, progress=False)
        assert trace[0]["sigma"] == 1e36 and trace[0]["metric"] == math.inf and not trace[0]["feasible"]
        assert float(guide.sigma_q) < 1e36


def test_the_search_keeps_a_margin_from_a_sigma_whose_noise_overflows(monkeypatch):
    """The bisection kept the largest feasible sigma_q below an infeasible one, which may be one whose noise overflowed
    the logits: the sigma_q chosen was then at the edge of overflowing, on other draws (predict's) too. The noise is
    feasible below an overflow from sigma_q = 0.9 (seed 0; from 0.4 on the second set of draws, seed 1, in part two)."""
    model, anchors = mc_model(), mc_anchors(n_batches=1)
    edges = {0: 0.9, 1: 0.9}
    monkeypatch.setattr(TFBGuide, "_metric", lambda self, batches, reference, criterion, sigma, num_samples, seed, tol:
                        (math.inf if sigma >= edges[seed] else 0.0, reference["count"]))
    kw = dict(criterion="nll", low=1e-3, high=10.0, iterations=5, progress=False)
    guide = TFBGuide(model)
    with pytest.warns(UserWarning, match=r"overflowed the logits at sigma_q = 1: a sigma_q within a factor 4 in "
                                         r"variance \(2 in sigma_q\) of such a one.*sigma_q = 0.421697, finite on a second"):
        trace = guide.search(anchors, **kw)
    # by hand, in log sigma_q: 10 overflows, 1e-3 is feasible; then 0.1 feasible, 1 overflows (so sigma_q >= 1 / 2 is
    # refused, its std halved), 10^-0.5 feasible, 10^-0.25 refused unscored, 10^-0.375 feasible: the search without the
    # margin took 10^-0.125 = 0.75, next to the overflow
    assert [t["sigma"] for t in trace] == pytest.approx([10.0, 1e-3, 0.1, 1.0, 10 ** -0.5, 10 ** -0.25, 10 ** -0.375])
    assert trace[5]["near_overflow"] and not trace[5]["feasible"] and trace[5]["anchors"] == 0
    assert float(guide.sigma_q) == pytest.approx(10 ** -0.375)
    edges[1] = 0.4  # 10^-0.375 overflows on the second draws: sigma_q >= 10^-0.375 / 2 is refused, leaving 0.1
    with pytest.warns(UserWarning, match="sigma_q = 0.1, finite on a second set of draws too"):
        guide.search(anchors, **kw)
    assert float(guide.sigma_q) == pytest.approx(0.1)


def test_a_low_refused_for_the_overflow_margin_is_said_to_be_so_not_infeasible(monkeypatch):
    """high = 1500 overflowed and low = 1000, within its margin, was refused unscored; the warning said "low=1000 is
    infeasible ... lower `low` or raise the tolerance": low was never scored, and no tolerance changes the margin."""
    model, anchors = mc_model(), mc_anchors(n_batches=1)
    monkeypatch.setattr(TFBGuide, "_metric", lambda self, batches, reference, criterion, sigma, num_samples, seed, tol:
                        (math.inf if sigma >= 1200 else 0.1875, reference["count"]))
    guide = TFBGuide(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = guide.search(anchors, criterion="accuracy", tolerance=0.5, low=1000.0, high=1500.0, progress=False)
    assert trace[1]["near_overflow"] and trace[1]["anchors"] == 0 and float(guide.sigma_q) == 0
    (said,) = [str(w.message) for w in caught if "TFB search" in str(w.message)]
    assert re.search(r"low=1000 was not scored: it is within the overflow margin \(a factor 2 in sigma_q, 4 in variance\) "
                     r"of sigma_q = 1500, whose noise overflowed the logits.*lower `low` \(under 750", said)
    assert "infeasible" not in said and "raise the tolerance" not in said
    with pytest.warns(UserWarning, match="low=100 is infeasible: sigma_q = 0 .*raise the tolerance"):  # scored: as it was
        guide.search(anchors, criterion="accuracy", tolerance=0.1, low=100.0, high=1500.0, progress=False)
    # a low whose own noise overflowed was told to "raise the tolerance", which no tolerance mends
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guide.search(anchors, criterion="accuracy", tolerance=0.5, low=4000.0, high=10000.0, progress=False)
    (said,) = [str(w.message) for w in caught if "TFB search" in str(w.message)]
    assert re.search(r"low=4000 is infeasible: its noise overflowed the logits, so sigma_q = 0 \(the point estimate\); "
                     r"lower `low` \(under 2000, clear of the overflow margin\); a tolerance does not change this", said)
    assert "raise the tolerance" not in said
