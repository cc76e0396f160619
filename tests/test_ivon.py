"""IVON (guides/ivon.py): the guide read off ``ivon.IVON``'s state entry by entry, its samples and batched predictive,
``train_ivon``'s training and refusals, the saved guide, a bf16 base and the compare recipe."""

import contextlib
import io
import json
import math
from dataclasses import replace

import ivon
import pyro
import pytest
import torch
from conftest import random_batch, tiny_bert, tiny_llama
from test_guide_contract import data, lora

from pyro_lora import CausalLM, LoraModel, SequenceClassification, fit, load_guide, predict, save_guide
from pyro_lora.experiments.compare import fit_method
from pyro_lora.experiments.setup import CompareConfig, Setup, train_map
from pyro_lora.guides import IVONGuide, MAPGuide, train_ivon
from pyro_lora.ownership import trainer
from pyro_lora.training import DivergenceError, batch_nll

FAST = {"epochs": 15, "lr": 10.0, "progress": False}  # steps of lr * clip_radius <= 0.01: the tiny net learns in 30


def by_name(values, model):
    """peft parameter name -> that matrix of site ``values``, found from the name alone (``...layer.1...query.lora_A...``
    is entry 1 of site ``query.lora_A``): independent of the sites' own layer order."""
    out = {}
    for name, p in model.net.named_parameters():
        if "lora_" in name:
            layer = int(name.split("layer.")[1].split(".")[0])
            module, matrix = name.split(".")[-4], name.split(".")[-3]
            out[name] = values[f"{module}.{matrix}"][layer]
    return out


def lora_parameters(model):
    return {n: p for n, p in model.net.named_parameters() if "lora_" in n}


def scrambled_optimizer(model):
    """IVON over the LoRA matrices and the head in two groups of their own ess and weight decay, in an order unlike
    the sites' (B before A, layer 1 before layer 0), trained 3 steps with a fast-moving Hessian so its entries differ."""
    named = lora_parameters(model)
    query = [named[n] for n in sorted(named, reverse=True) if ".query." in n]
    rest = [named[n] for n in sorted(named) if ".value." in n] + model.point_parameters()
    for p in named.values():
        p.requires_grad_(True)
    optimizer = ivon.IVON([{"params": query, "ess": 5e3, "weight_decay": 1e-3}, {"params": rest}], lr=0.05, ess=2e4,
                          hess_init=0.5, beta2=0.5, weight_decay=1e-4)
    model.net.train()
    for batch in data() * 2:
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            batch_nll(model, batch).backward()
        optimizer.step()
    model.net.eval()
    model.set_trainable()
    return optimizer


def group_slices(optimizer, model):
    """peft parameter name -> (group index, slice of the group's flat state, shape), walking IVON's groups."""
    names = {id(p): n for n, p in model.net.named_parameters()}
    out = {}
    for g, group in enumerate(optimizer.param_groups):
        offset = 0
        for p in group["params"]:
            out[names[id(p)]] = (g, slice(offset, offset + p.numel()), p.shape)
            offset += p.numel()
    return out


# ------------------------------------------------------------------ (1) the guide is the optimiser's Gaussian


def test_stds_are_ivons_from_its_state_and_locs_the_networks_entry_by_entry():
    model = lora()
    optimizer = scrambled_optimizer(model)
    guide = IVONGuide.from_optimizer(model, optimizer)
    assert model.sites["query.lora_A"].shape == (2, 4, 32)  # a stacked two-layer site
    stds, locs = by_name(guide.stds(), model), by_name(guide.locs(), model)
    spread = set()
    for name, (g, part, shape) in group_slices(optimizer, model).items():
        if name not in stds:
            continue  # the head: a point parameter
        group = optimizer.param_groups[g]
        expected = (1.0 / torch.sqrt(group["ess"] * (group["hess"][part] + group["weight_decay"]))).view(shape)
        torch.testing.assert_close(stds[name], expected, rtol=1e-6, atol=0)
        assert torch.equal(locs[name], lora_parameters(model)[name].detach())
        spread |= set(expected.flatten().tolist())
    assert len(stds) == 8 and len(spread) > 100  # every matrix, and stds that differ entry by entry
    # the record names each group's own settings, which the defaults misstated for the query sites
    groups = guide.trained_with["param_groups"]
    assert [(g["ess"], g["weight_decay"]) for g in groups] == [(5e3, 1e-3), (2e4, 1e-4)]


def test_the_stds_are_the_ones_ivon_draws_its_weights_with():
    model = lora()
    optimizer = scrambled_optimizer(model)
    guide = IVONGuide.from_optimizer(model, optimizer)
    params = lora_parameters(model)
    means = {n: p.detach().clone() for n, p in params.items()}
    torch.manual_seed(3)
    with optimizer.sampled_params():
        noise = {n: p.detach() - means[n] for n, p in params.items()}
    torch.manual_seed(3)  # IVON draws randn(numel of the group) for each group in turn
    z = [torch.randn(group["numel"]) for group in optimizer.param_groups]
    stds = by_name(guide.stds(), model)
    for name, (g, part, shape) in group_slices(optimizer, model).items():
        if name in stds:
            torch.testing.assert_close(noise[name], stds[name] * z[g][part].view(shape), rtol=1e-4, atol=1e-7)


def test_train_ivon_leaves_the_network_at_the_guides_mean():
    model = lora()
    guide = train_ivon(model, data(), **FAST)
    locs = by_name(guide.locs(), model)
    assert all(torch.equal(locs[n], p.detach()) for n, p in lora_parameters(model).items())
    assert guide.trained_with["steps"] == 30 and guide.trained_with["ess"] == 1e7
    assert type(guide.trained_with["mc_samples"]) is int  # a count, recorded as 1.0 before
    assert "param_groups" not in guide.trained_with  # one group: the defaults are its settings
    assert guide.extra_parameters() == sum(p.numel() for p in lora_parameters(model).values())


# ------------------------------------------------------------------ (2) samples and the batched predictive


def test_samples_have_the_posteriors_mean_and_std():
    model = lora()
    guide = IVONGuide.from_optimizer(model, scrambled_optimizer(model))
    draws = guide.sample(4000)
    for name, loc in guide.locs().items():
        std, x = guide.stds()[name], draws[name]
        assert ((x.mean(0) - loc).abs() / (std / 4000**0.5)).max() < 5
        assert (x.std(0) / std - 1).abs().max() < 0.06


def test_the_batched_predictive_equals_writing_each_draw_into_the_network():
    model = lora()
    guide = train_ivon(model, data(), **FAST)
    drawn, sample = [], guide.sample
    guide.sample = lambda n: drawn.append(sample(n)) or drawn[-1]  # the draws predict uses
    batched = predict(model, guide, data(), num_samples=3).probs
    assert len(drawn) == 1
    model.net.eval()
    by_hand = 0
    with torch.no_grad():
        for s in range(3):
            model.write_adapter({n: v[s] for n, v in drawn[0].items()})
            by_hand = by_hand + torch.cat([torch.softmax(model.logits(b), -1) for b in data()]) / 3
    torch.testing.assert_close(batched, by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched, predict(model, guide, data(), mean=True).probs, atol=1e-4)  # the draws differ


# ------------------------------------------------------------------ (3) training


def _mean_nll(model):
    model.net.eval()
    with torch.no_grad():
        return float(sum(batch_nll(model, b) for b in data()) / len(data()))


def test_train_ivon_lowers_the_training_loss_and_leaves_the_base_alone():
    model = lora()
    base = {n: p.detach().clone() for n, p in model.net.named_parameters() if not p.requires_grad and "lora_" not in n}
    head = {n: p.detach().clone() for n, p in model.named_point_parameters()}
    before = _mean_nll(model)
    train_ivon(model, data(), **FAST)
    assert _mean_nll(model) < before - 0.1
    assert all(torch.equal(p, base[n]) for n, p in model.net.named_parameters() if n in base)
    assert all(not torch.equal(p, head[n]) for n, p in model.named_point_parameters())  # the head trained too
    assert not any(p.requires_grad for p in lora_parameters(model).values())  # the sites' matrices frozen again


def test_the_previous_owner_of_the_head_is_refused_after_ivon_retrained_it():
    model = lora()
    map_guide = MAPGuide(model)
    fit(model, map_guide, data(), lr=5e-2, progress=False)
    model.write_adapter({k: v.detach() for k, v in map_guide.mean().items()})
    guide = train_ivon(model, data(), **FAST)  # swaps IVON's tensors in: the head's version must still move
    predict(model, guide, data())
    with pytest.raises(ValueError, match="changed since this guide was built or trained"):
        predict(model, map_guide, data())


def test_a_divergence_puts_the_network_back_as_it_was(monkeypatch):
    import pyro_lora.guides.ivon as module

    model = lora()
    start = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    calls = []

    def nan_on_the_third(model, batch):
        calls.append(1)
        nll = batch_nll(model, batch)
        return nll * float("nan") if len(calls) == 3 else nll

    monkeypatch.setattr(module, "batch_nll", nan_on_the_third)
    with pytest.raises(DivergenceError, match=r"the data NLL became nan at step 2 \(epoch 1\)"):
        train_ivon(model, data(), **FAST)
    assert all(torch.equal(p, start[n]) for n, p in model.net.named_parameters())  # not a weight draw


def _interrupt_on(monkeypatch, target, name, call):
    """Make ``target.name`` raise KeyboardInterrupt on its ``call``-th call (1-based), as Ctrl-C there would."""
    original, calls = getattr(target, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, interrupted)


@pytest.mark.parametrize("where", ["forward", "data"])
def test_an_interrupt_keeps_the_steps_that_finished(monkeypatch, where, tmp_path):
    """An interrupt (or an out-of-memory error) at step 7 of 30 threw away the 6 steps done, putting the network back at
    its start. Interrupted inside a weight draw's forward, or while the data gave the next batch, the run keeps IVON's
    Gaussian and mean after step 6: those of a 6-step run (a constant schedule, the same draws)."""
    import pyro_lora.guides.ivon as module

    settings = {**FAST, "lr_schedule": "constant"}
    torch.manual_seed(3)
    reference_model = lora()
    reference = train_ivon(reference_model, data(), **{**settings, "epochs": 3})  # 2 batches an epoch: 6 steps

    class Batches(list):  # the 7th batch read raises, as an interrupt inside a DataLoader's worker would
        def __iter__(self):
            for batch in super().__iter__():
                if where == "data" and next(read) == 6:
                    raise KeyboardInterrupt
                yield batch

    read = iter(range(100))
    if where == "forward":
        _interrupt_on(monkeypatch, module, "batch_nll", 7)
    torch.manual_seed(3)
    model = lora()
    with pytest.raises(KeyboardInterrupt) as stopped:
        train_ivon(model, Batches(data()), **settings)
    guide = stopped.value.unfinished_guide
    assert guide.trained_with["unfinished"] == {"step": 6, "steps": 30} and guide.trained_with["steps"] == 6
    assert "stopped after step 6 of 30" in stopped.value.__notes__[0]
    for name in reference.sites:
        assert torch.equal(guide.locs()[name], reference.locs()[name])
        assert torch.equal(guide.stds()[name], reference.stds()[name])
    for (n, p), q in zip(model.net.named_parameters(), reference_model.net.parameters()):
        assert torch.equal(p, q), n  # the network at the 6-step mean, its head too, not a draw nor the start
    pyro.set_rng_seed(0)
    kept = predict(model, guide, data(), num_samples=2).probs  # the guide owns the head it was kept with
    save_guide(guide, tmp_path / "g")
    with pytest.warns(UserWarning, match=r"^IVONGuide: this Gaussian is of a train_ivon run stopped after step 6 of 30, "
                      "an intermediate state and not the run's result"):
        loaded = load_guide(tmp_path / "g", lora())
    assert loaded.trained_with["unfinished"] == {"step": 6, "steps": 30}
    pyro.set_rng_seed(0)
    torch.testing.assert_close(predict(loaded.model, loaded, data(), num_samples=2).probs, kept, rtol=0, atol=0)


@pytest.mark.parametrize("call", [1, 3])
def test_an_interrupt_with_no_finished_step_or_inside_ivons_update_keeps_nothing(monkeypatch, call):
    """Interrupted in the first forward, no step had finished; inside ivon-opt's update of step 3, its state may be
    half-updated: neither keeps a guide, and the network is put back at its start."""
    import pyro_lora.guides.ivon as module

    if call == 1:
        _interrupt_on(monkeypatch, module, "batch_nll", 1)
    else:
        _interrupt_on(monkeypatch, ivon.IVON, "_update", 3)
    model = lora()
    start = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    with pytest.raises(KeyboardInterrupt) as stopped:
        train_ivon(model, data(), **FAST)
    assert stopped.value.unfinished_guide is None
    assert getattr(stopped.value, "__notes__", []) == ([] if call == 1 else [
        "train_ivon: stopped inside IVON's update of step 3, which may have left its state half-updated: nothing is "
        "kept, and the network is put back as it was"])
    assert all(torch.equal(p, start[n]) for n, p in model.net.named_parameters())


# ------------------------------------------------------------------ (4) saving


def test_save_and_load_give_identical_predictions(tmp_path):
    model = lora()
    guide = train_ivon(model, data(), **FAST)
    pyro.set_rng_seed(5)
    before = predict(model, guide, data(), num_samples=4).probs
    save_guide(guide, tmp_path / "g")
    other = lora()  # an untrained head: loading restores IVON's
    loaded = load_guide(tmp_path / "g", other)
    assert type(loaded) is IVONGuide and loaded.trained_with == guide.trained_with
    assert all(torch.equal(loaded.stds()[n], s) for n, s in guide.stds().items())
    pyro.set_rng_seed(5)
    torch.testing.assert_close(predict(other, loaded, data(), num_samples=4).probs, before, rtol=0, atol=0)


def test_ivon_opts_default_infinite_clip_radius_is_saved_as_standard_json_and_loads_as_inf(tmp_path):
    model = lora()
    params = model.random_parameters() + model.point_parameters()
    for p in params:
        p.requires_grad_(True)
    optimizer = ivon.IVON(params, lr=0.1, ess=1e4)  # ivon-opt's default clip_radius: inf
    with optimizer.sampled_params(train=True):
        optimizer.zero_grad()
        batch_nll(model, data()[0]).backward()
    optimizer.step()
    model.set_trainable()
    guide = IVONGuide.from_optimizer(model, optimizer)
    assert guide.trained_with["clip_radius"] == math.inf
    save_guide(guide, tmp_path / "g")

    def refuse(constant):
        raise ValueError(f"guide.json holds {constant}, which is not standard JSON")

    meta = json.loads((tmp_path / "g" / "guide.json").read_text(), parse_constant=refuse)
    assert meta["config"]["trained_with"]["clip_radius"] is None
    loaded = load_guide(tmp_path / "g", lora())
    assert loaded.trained_with == guide.trained_with and loaded.trained_with["clip_radius"] == math.inf


# ------------------------------------------------------------------ (5) refusals before training


@pytest.mark.parametrize("bad, match", [
    ({"lr": 0.0}, "lr must be positive"), ({"lr": -1.0}, "lr must be positive"), ({"ess": 0}, "ess must be positive"),
    ({"hess_init": 0.0}, "hess_init must be positive"), ({"epochs": 0}, "epochs must be a positive integer"),
    ({"epochs": True}, "epochs must be a finite number"), ({"epochs": 1.5}, "epochs must be a positive integer"), ({"mc_samples": 0}, "mc_samples must be"),
    ({"clip_radius": 0.0}, "clip_radius must be positive"), ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
    ({"beta2": 1.0}, r"beta2 must be in \[0, 1\)"), ({"lr": float("nan")}, "lr must be a finite number"),
    ({"lr_schedule": "step"}, "lr_schedule must be"), ({"data": []}, "data must be a non-empty"),
    # beyond float32: ivon-opt's state turned NaN at step 1, a divergence blamed on an lr of 1e-9
    ({"ess": 1e42}, "ess = 1e.42.*outside what float32 holds for IVON"), ({"hess_init": 1e36}, r"ess \* \(hess_init"),
    ({"weight_decay": 1e39}, "weight_decay = 1e.39"), ({"ess": 1e-45}, r"ess \* \(hess_init \+ weight_decay\) = "),
    ({"hess_init": 1e20, "ess": 1.0}, "hess_init = 1e.20"), ({"ess": 1e37}, "ess = 1e.37"),
    ({"hess_init": 1e-46, "ess": 1e9}, "hess_init = 1e-46"),
])
def test_bad_arguments_are_refused_before_training(bad, match):
    model = lora()
    start = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    kwargs = {**FAST, **bad}
    with pytest.raises(ValueError, match=match):
        train_ivon(model, kwargs.pop("data", data()), **kwargs)
    assert all(torch.equal(p, start[n]) for n, p in model.net.named_parameters())


def test_models_it_cannot_train_are_refused():
    with pytest.raises(ValueError, match=r"every LoRA matrix \(A and B\) as a site, the model's are \['A'\]"):
        train_ivon(lora(random="A"), data(), **FAST)
    a_only = lora(random="A")  # the guide too: over A alone it would drop the uncertainty IVON learnt for B
    with pytest.raises(ValueError, match=r"^IVONGuide needs every LoRA matrix \(A and B\) as a site, .*random='AB'"):
        IVONGuide(a_only)
    params = [p for n, p in a_only.net.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = ivon.IVON(params, lr=0.1, ess=1e4)
    with pytest.raises(ValueError, match=r"^IVONGuide.from_optimizer needs every LoRA matrix \(A and B\) as a site"):
        IVONGuide.from_optimizer(a_only, optimizer)
    # a LoRA-XS model was told to use random='AB', which LoraXSModel does not take
    from pyro_lora.loraxs import LoraXSModel

    xs = LoraXSModel(tiny_bert(random_b=False), SequenceClassification(), num_data=4)
    with pytest.raises(ValueError, match=r"^train_ivon trains plain LoRA A and B matrices with IVON, and this LoraXSModel's "
                                         r"sites are \['R'\] \(R between A and B, .*use a LoraModel\(net, likelihood, random='AB'\)$"):
        train_ivon(xs, data(), **FAST)


def test_stds_that_are_no_dict_of_tensors_are_refused_by_name():
    model = lora()  # a float for every std was a raw TypeError ('float' object is not iterable)
    with pytest.raises(ValueError, match=r"^IVONGuide's stds must be a dict of site name -> tensor, got float$"):
        IVONGuide(model, stds=0.1)
    with pytest.raises(ValueError, match=r"^the value of site '.*' must be a tensor of shape .*, got float$"):
        IVONGuide(model, stds={n: 0.1 for n in model.sites})


def test_disabled_adapters_are_refused_before_training():
    # the network would run without the LoRA matrices: no gradient reaches them, and the backward failed in autograd
    model = lora()
    start = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    with model.net.disable_adapter(), pytest.raises(ValueError, match=r"the adapters are disabled .*leave that context"):
        train_ivon(model, data(), **FAST)
    assert all(torch.equal(p, start[n]) for n, p in model.net.named_parameters())


def test_weight_noise_that_swamps_the_network_is_named_and_the_network_put_back():
    """ess = 0.01 (weight noise of std 500): the query matrices' gradients were 0 on every step and the guide was
    refused after training, advising requires_grad_(True) (which train_ivon had done), the network left changed."""
    torch.manual_seed(0)
    model = lora()
    start = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    with pytest.raises(ValueError, match=r"the loss did not depend on them, as under weight noise that swamps the "
                                         r"network \(IVON's stds reach [0-9.e+]+ here.*raise ess") as caught:
        train_ivon(model, data(), epochs=5, lr=10.0, ess=0.01, progress=False)
    assert caught.value.__notes__ == ["train_ivon: the network is put back as it was"]
    assert all(torch.equal(p, start[n]) for n, p in model.net.named_parameters())


def test_a_replanned_schedule_is_said_by_train_ivon_not_fit():
    """Data of another length in epoch 1 under a decaying schedule: the warning was labelled "fit:"."""
    class Growing:
        def __init__(self):
            self.batches = data()

        def __len__(self):
            return len(self.batches)

        def __iter__(self):
            yield from list(self.batches)
            self.batches = data() + data()[:1]

    with pytest.warns(UserWarning, match=r"^train_ivon: the data gives 3 optimizer steps in epoch 1"):
        train_ivon(lora(), Growing(), epochs=2, lr=1.0, lr_schedule="linear", progress=False)


def test_trained_with_records_counts_as_ints_and_ivons_own_options():
    """mc_samples=np.int64(2) was recorded as 2.0; hess_approx and debias, which change the stds, were not recorded."""
    import numpy as np

    guide = train_ivon(lora(), data(), epochs=1, lr=1.0, mc_samples=np.int64(2), progress=False)
    assert type(guide.trained_with["mc_samples"]) is int and guide.trained_with["mc_samples"] == 2
    assert guide.trained_with["hess_approx"] == "price" and guide.trained_with["debias"] is True
    model = lora()
    for p in model.random_parameters():
        p.requires_grad_(True)
    optimizer = ivon.IVON(model.random_parameters() + model.point_parameters(), lr=0.1, ess=1e4, hess_init=0.5,
                          hess_approx="gradsq", debias=False)
    for batch in data():
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            batch_nll(model, batch).backward()
        optimizer.step()
    model.set_trainable()
    recorded = IVONGuide.from_optimizer(model, optimizer).trained_with
    assert recorded["hess_approx"] == "gradsq" and recorded["debias"] is False


def test_from_optimizer_refuses_an_optimiser_that_never_trained_the_lora_matrices():
    # ivon-opt's README loop over a LoraModel's matrices as they come (frozen): their gradient is read as 0, so they only
    # shrink by weight decay and the "posterior" is the start's; one step of the same loop unfrozen is accepted (A's
    # momentum alone is 0 then, B being 0 at peft's init)
    def optimiser(model, steps):
        optimizer = ivon.IVON(model.random_parameters() + model.point_parameters(), lr=0.1, ess=1e4, hess_init=0.5)
        for batch in data()[:steps]:
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad()
                batch_nll(model, batch).backward()
            optimizer.step()
        return optimizer

    model = lora()
    with pytest.raises(ValueError, match=r"^IVONGuide.from_optimizer: the optimiser has taken no step"):
        IVONGuide.from_optimizer(model, optimiser(model, 0))
    assert not any(p.requires_grad for p in model.random_parameters())
    with pytest.raises(ValueError, match=r"never had a gradient in the optimiser's 2 steps .*requires_grad_\(True\)"):
        IVONGuide.from_optimizer(model, optimiser(model, 2))
    model = lora()
    for p in model.random_parameters():
        p.requires_grad_(True)
    guide = IVONGuide.from_optimizer(model, optimiser(model, 1))
    assert guide.trained_with["steps"] == 1
    # one matrix left frozen beside a trained one: after the first step each matrix is judged alone
    model = lora()
    params = iter(model.random_parameters())  # site by site, each site's layers in turn
    for site_name, site in model.sites.items():
        for _ in site.layers:
            next(params).requires_grad_(not site_name.endswith("lora_B"))
    with pytest.raises(ValueError, match=r"query \(query.lora_B\)'.* never had a gradient in the optimiser's 2 steps"):
        IVONGuide.from_optimizer(model, optimiser(model, 2))
    with pytest.raises(ValueError, match=r"computing in float16 \(a float16 base.*IVON has no loss scaling"):
        train_ivon(lora(dtype=torch.float16), data(), **FAST)


def _map_owned(dtype=torch.float32):
    """A model whose head a MAP trained (its LoRA written into the adapter): a state train_ivon would take over."""
    model = lora(dtype=dtype)
    fit(model, map_guide := MAPGuide(model), data(), lr=5e-2, progress=False)
    model.write_adapter({k: v.detach() for k, v in map_guide.mean().items()})
    return model, map_guide


def _unfreeze_layer_norm(model):
    dict(model.net.named_parameters())["base_model.model.bert.embeddings.LayerNorm.weight"].requires_grad_(True)


def _float64_head(model):
    for _, p in model.named_point_parameters():
        p.data = p.data.double()


@pytest.mark.parametrize("dtype, change, match", [
    # fit refuses these; ivon-opt trained them silently (stds up to 12.6% and probabilities 0.02 off fp32's)
    (torch.float32, lambda m: m.net.to(torch.bfloat16), r"^train_ivon trains parameters held in \['torch.bfloat16'\]: "
     r"IVON's Hessian estimate .* keep the trainable parameters \(LoRA, head\) in float32"),
    (torch.float32, lambda m: m.net.to(torch.float16), r"held in \['torch.float16'\]"),
    # a bf16 base's LayerNorm unfrozen beside the float32 LoRA: ivon-opt refused it after the LoRA was unfrozen
    (torch.bfloat16, _unfreeze_layer_norm, r"held in \['torch.bfloat16'\]"),
    (torch.float32, _float64_head, r"several dtypes \(torch.float32: .*lora_A.*; torch.float64: .*classifier.*\): "
     r"ivon-opt holds them all in one flat buffer"),
])
def test_parameters_ivon_cannot_hold_are_refused_naming_them_before_anything_changes(dtype, change, match):
    model, map_guide = _map_owned(dtype)
    change(model)
    before = {n: (p.requires_grad, p.dtype, p.detach().clone()) for n, p in model.net.named_parameters()}
    snapshot = dict(map_guide._point_snapshot)  # what the MAP left, as its own
    with pytest.raises(ValueError, match=match):
        train_ivon(model, data(), **FAST)
    after = {n: (p.requires_grad, p.dtype, p.detach()) for n, p in model.net.named_parameters()}
    assert after.keys() == before.keys()
    for n, (grad, dt, value) in after.items():  # the LoRA matrices still frozen, nothing moved
        assert (grad, dt) == before[n][:2] and torch.equal(value, before[n][2]), n
    assert trainer(model) is map_guide and map_guide._point_snapshot == snapshot  # the head still the MAP's


def _resumed(optimizer, params, current_step=None):
    """A fresh ivon.IVON over ``params`` given ``optimizer``'s saved state_dict, as a checkpoint resumes it."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed = ivon.IVON(params, lr=0.05, ess=2e4, hess_init=0.5, beta2=0.5)
    resumed.load_state_dict(torch.load(buffer))
    if current_step is not None:
        resumed.current_step = current_step
    return resumed


def test_an_optimiser_resumed_from_its_state_dict_gives_its_trained_gaussian_and_an_honest_step_count():
    """ivon-opt's state_dict leaves current_step out: a resumed optimiser was refused as having taken no step (its
    Hessian the trained one), and its record said 3 steps after 6 + 3."""
    model = lora()
    params = model.random_parameters() + model.point_parameters()
    for p in params:
        p.requires_grad_(True)
    optimizer = ivon.IVON(params, lr=0.05, ess=2e4, hess_init=0.5, beta2=0.5)

    def train(optimizer, steps):
        model.net.train()
        for batch in (data() * 5)[:steps]:
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad()
                batch_nll(model, batch).backward()
            optimizer.step()
        model.net.eval()

    train(optimizer, 6)
    trained = IVONGuide.from_optimizer(model, optimizer)
    resumed = IVONGuide.from_optimizer(model, _resumed(optimizer, params))
    assert all(torch.equal(resumed.stds()[n], s) for n, s in trained.stds().items())  # the trained Gaussian
    assert resumed.trained_with == {**trained.trained_with, "steps": None}  # unknown, and no torch flag recorded
    counted = _resumed(optimizer, params, current_step=6)  # the count set back, as docs/methods/ivon.md shows
    train(counted, 3)
    assert IVONGuide.from_optimizer(model, counted).trained_with["steps"] == 9
    fresh = ivon.IVON(params, lr=0.05, ess=2e4, hess_init=0.5, beta2=0.5)  # an untrained state loaded: still its start
    with pytest.raises(ValueError, match="the optimiser has taken no step"):
        IVONGuide.from_optimizer(model, _resumed(fresh, params))


# ------------------------------------------------------------------ (6) half precision; the compare recipe


def test_a_bf16_base_trains_and_predicts_within_001_of_fp32():
    probs = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = lora(dtype=dtype)
        guide = train_ivon(model, data(), **FAST)
        pyro.set_rng_seed(5)
        probs[dtype] = predict(model, guide, data(), num_samples=4).probs
        assert all(s.dtype == torch.float32 for s in guide.stds().values())
    assert probs[torch.bfloat16].dtype == torch.float32 and torch.isfinite(probs[torch.bfloat16]).all()
    assert (probs[torch.float32] - 1 / 3).abs().max() > 0.05  # the probabilities say something
    assert (probs[torch.bfloat16] - probs[torch.float32]).abs().max() < 0.01  # measured: 0.0006


def test_the_recipe_trains_from_the_maps_start_and_leaves_the_map_usable(monkeypatch):
    import pyro_lora.guides.ivon as module

    batches = [random_batch(batch=4, seed=s) | {"labels": torch.tensor([0, 2, 1, 0])} for s in (1, 2, 3)]
    records = [{k: v[i] for k, v in b.items()} for b in batches for i in range(4)]
    collate = lambda rs: {k: torch.stack([r[k] for r in rs]) for k in rs[0]}  # noqa: E731
    setup = Setup(CompareConfig(batch_size=3, epochs=2, lr=1e-2, progress=False), tiny_bert(), None,
                  SequenceClassification(), records[:9], records[9:], [], collate)
    train_map(setup)
    map_probs = predict(setup.model, setup.map_guide, data()).probs
    started = {}

    def recorded(model, loader, **kwargs):
        started.update({n: p.detach().clone() for n, p in model.net.named_parameters() if n in setup.initial_state})
        return train(model, loader, **kwargs)

    train = module.train_ivon
    monkeypatch.setattr(module, "train_ivon", recorded)
    fitted, _ = fit_method(setup, "ivon")
    assert started.keys() == setup.initial_state.keys()
    assert all(torch.equal(v, setup.initial_state[n]) for n, v in started.items())  # not the MAP's trained state
    guide = fitted.guide
    assert type(guide) is IVONGuide and type(guide.model) is LoraModel and guide.trained_with["lr"] == 10.0
    assert guide.trained_with["steps"] == 6 and fitted.extra_parameters == guide.extra_parameters()
    # IVON's prior is its weight decay, whatever --prior-scale says: its model records that prior, and a --prior-scale
    # other than the default is noted in its rows (they were the same without a word)
    assert guide.model.prior == pytest.approx(1 / math.sqrt(1e7 * 1e-4)) and fitted.note is None
    predict(guide.model, guide, data())
    setup.restore()  # what compare does after each method: the MAP's adapter and head are its own again
    torch.testing.assert_close(predict(setup.model, setup.map_guide, data()).probs, map_probs, rtol=0, atol=0)
    setup.config = replace(setup.config, prior_scale=0.01)
    fitted, _ = fit_method(setup, "ivon")
    assert fitted.guide.model.prior == pytest.approx(0.0316, abs=1e-4)
    assert fitted.note == ("prior std 0.0316 = 1 / sqrt(ess * weight decay), IVON's own; --prior-scale 0.01 applies to "
                           "the MAP and the other methods")


def test_a_maps_unwritten_lora_is_refused_and_a_divergence_names_what_train_ivon_takes():
    """After fit(MAPGuide) without write_adapter, train_ivon trained the untrained LoRA beside the MAP's head; its
    divergence message offered max_grad_norm and stop_on_divergence, arguments it does not take."""
    import pyro_lora.guides.ivon as module

    model = lora()
    fit(model, map_guide := MAPGuide(model), data(), epochs=2, lr=1e-2, progress=False)
    with pytest.raises(ValueError, match=r"write_adapter\(guide.mean\(\)\) first"):
        train_ivon(model, data(), **FAST)
    model = lora()
    calls = []

    def rising(model, batch):
        calls.append(1)
        return batch_nll(model, batch) * (100.0 if len(calls) > 1 else 1.0)

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(module, "batch_nll", rising)
    try:
        with pytest.raises(DivergenceError, match=r"lower it, or clip_radius") as info:
            train_ivon(model, data() * 3, **FAST)
    finally:
        monkeypatch.undo()
    assert "max_grad_norm" not in str(info.value) and "stop_on_divergence" not in str(info.value)
    guide = train_ivon(lora(), data(), **{**FAST, "lr": 1e-3, "epochs": 1, "clip_radius": math.inf})  # ivon-opt's default
    assert guide.trained_with["clip_radius"] == math.inf and map_guide.mean()


def test_train_ivon_judges_a_causal_lm_per_scored_token(monkeypatch):
    """train_ivon's check followed CausalLM's NLL per example, a sum over a row's tokens: a first batch of 3-token rows,
    then 40-token ones, raised DivergenceError at lr=1e-9, where nothing moves. It follows the NLL per scored token now
    (the batch's mean NLL per example times its rows over its scored tokens), which still catches a rising one."""
    import pyro_lora.guides.ivon as module

    def rows(n, length, seed):
        ids = torch.randint(1, 64, (n, length), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    data = [rows(4, 3, 0)] + [rows(4, 40, s) for s in range(1, 6)]
    train_ivon(LoraModel(tiny_llama(), CausalLM(), random="AB", num_data=24), data, lr=1e-9, progress=False)
    calls = []

    def rising(model, batch):
        calls.append(1)
        return batch_nll(model, batch) * (100.0 if len(calls) > 1 else 1.0)

    monkeypatch.setattr(module, "batch_nll", rising)
    with pytest.raises(DivergenceError, match=r"smoothed data NLL rose from 4.* per scored token"):
        train_ivon(LoraModel(tiny_llama(), CausalLM(), random="AB", num_data=24), [rows(4, 12, s) for s in range(6)],
                   lr=1e-9, progress=False)


def test_train_ivon_under_no_grad_is_the_clean_run_and_inference_mode_is_refused():
    """train_ivon under torch.no_grad() died in its first backward ('element 0 of tensors does not require grad'): it
    switches gradients on for its run now, the same run as outside; inside torch.inference_mode(), whose tensors never
    carry gradients, it is refused by name before anything changes."""
    def trained(context=contextlib.nullcontext):
        pyro.set_rng_seed(0)
        model = lora()
        with context():
            guide = train_ivon(model, data(), epochs=2, lr=10.0, progress=False)
        return {n: v.detach().clone() for n, v in guide.mean().items()}

    clean = trained()
    for context in (torch.no_grad, lambda: torch.set_grad_enabled(False)):
        inside = trained(context)
        assert all(torch.equal(clean[n], inside[n]) for n in clean)
    model = lora()
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    with torch.inference_mode(), pytest.raises(ValueError, match=r"cannot run train_ivon inside torch.inference_mode\(\)"):
        train_ivon(model, data(), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.net.named_parameters())


@pytest.mark.parametrize("prior", ["cauchy", "transformed"])
def test_a_guide_over_a_prior_without_a_finite_variance_saves_and_loads(prior, tmp_path):
    """IVON's posterior does not read the model's prior, but IVONGuide(model), load_guide's placeholder, took its stds
    from the prior's variance: a Cauchy prior's is infinite (refused as non-finite), a TransformedDistribution's not
    implemented (a bare NotImplementedError), so the trained, saved guide could not be loaded."""
    import pyro.distributions as dist
    from pyro.distributions.transforms import AffineTransform

    def distribution(site):
        if prior == "cauchy":
            return dist.Cauchy(torch.zeros(site.shape), 0.1).to_event(len(site.shape))
        base = dist.Normal(torch.zeros(site.shape), 1.0)
        return dist.TransformedDistribution(base, [AffineTransform(0.0, 0.1)]).to_event(len(site.shape))

    def build():
        return LoraModel(tiny_bert(), SequenceClassification(), prior=distribution, num_data=6)

    guide = train_ivon(build(), data(), epochs=1, lr=10.0, progress=False)
    save_guide(guide, tmp_path / "g")
    loaded = load_guide(tmp_path / "g", build())
    for name in guide.sites:
        torch.testing.assert_close(loaded.posterior()[name].base_dist.scale, guide.posterior()[name].base_dist.scale, rtol=0, atol=0)


def test_stds_float32_cannot_hold_are_refused_before_training_and_when_built():
    """A float64 network let ess reach 1e90: the whole run trained, and its stds (5e-44) were stored in float32 as 0,
    log-densities NaN. Stds of bools or ints were taken too."""
    model = LoraModel(tiny_bert(dtype=torch.float64), SequenceClassification(), random="AB", num_data=6)
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    with pytest.raises(ValueError, match=r"ess \* \(hess_init \+ weight_decay\) = .* gives initial stds of .*, beyond the "
                                         r".* that the guide's float32 stds hold"):
        train_ivon(model, data(), epochs=1, lr=10.0, ess=1e90, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.net.named_parameters())
    tiny = {n: torch.full(s.shape, 1e-50, dtype=torch.float64) for n, s in model.sites.items()}
    with pytest.raises(ValueError, match=r"IVONGuide gives float32 stds from 0 to 0, beyond what float32 computes"):
        IVONGuide(model, stds=tiny)
    with pytest.raises(ValueError, match=r"stds must be floating-point tensors, got \['torch.int64'\]"):
        IVONGuide(model, stds={n: torch.ones(s.shape, dtype=torch.long) for n, s in model.sites.items()})


def test_an_unfinished_record_that_is_no_run_record_is_refused_by_name():
    """trained_with={"unfinished": True} failed as a bare AttributeError ('bool' object has no attribute 'get')."""
    model = LoraModel(tiny_bert(), SequenceClassification(), random="AB", num_data=6)
    with pytest.raises(ValueError, match=r"trained_with's 'unfinished' must be the stopped run's record .* got True"):
        IVONGuide(model, trained_with={"unfinished": True})
    with pytest.warns(UserWarning, match="stopped after step 3 of 9"):
        IVONGuide(model, trained_with={"unfinished": {"step": 3, "steps": 9}})
