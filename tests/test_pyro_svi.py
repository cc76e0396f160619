"""Pyro's own SVI and optimizers train exactly what fit trains: every guide parameter and the network's point
parameters (a classification head, non-random LoRA matrices)."""

import copy
import math
import warnings

import pyro
import pyro.optim
import pytest
import torch
from conftest import tiny_bert, tiny_bert_base, tiny_llama
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from test_training import toy_data

from pyro_lora.guides import FlowGuide, MAPGuide, MCDropoutGuide, MeanFieldGuide, ScalaBLGuide
from pyro_lora import LoraModel, ScalaBLModel, SequenceClassification, fit, predict, save_guide
from pyro_lora.likelihoods import CausalLM

GUIDES = {
    "map": (lambda m: MAPGuide(m), "AB", Trace_ELBO),
    "meanfield": (lambda m: MeanFieldGuide(m, b="normal"), "AB", TraceMeanField_ELBO),
    "meanfield_A": (lambda m: MeanFieldGuide(m), "A", TraceMeanField_ELBO),  # B a point estimate in the network
    "flow": (lambda m: FlowGuide(m, init_scale=0.1), "AB", Trace_ELBO),
    "scalabl": (lambda m: ScalaBLGuide(m), "S", TraceMeanField_ELBO),
    "mcdropout": (lambda m: MCDropoutGuide(m, p=0.2), "AB", Trace_ELBO),
}


def build(name, seed=0):
    make_guide, random, _ = GUIDES[name]
    net = tiny_bert(num_labels=2, seed=seed)
    torch.manual_seed(seed)
    if random == "S":
        model = ScalaBLModel(net, SequenceClassification(), prior=0.5, num_data=48)
    else:
        model = LoraModel(net, SequenceClassification(), random=random, prior=0.5, num_data=48)
    return model, make_guide(model)


def trained(model, guide):
    """Every parameter SVI should move: the guide's and the network's point parameters, by name."""
    out = {f"guide.{n}": p.detach().clone() for n, p in guide.named_parameters() if p.requires_grad}
    out.update({f"net.{n}": p.detach().clone() for n, p in model.named_point_parameters()})
    return out


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_pyro_svi_with_pyro_adam_equals_fit(name):
    data, steps, lr = toy_data(n=16, batch=8), 4, 1e-2
    elbo = GUIDES[name][2]

    model, guide = build(name)
    before = trained(model, guide)
    pyro.set_rng_seed(1)
    fit(model, guide, data, epochs=steps // len(data), lr=lr, elbo=elbo(), progress=False)
    by_fit = trained(model, guide)

    pyro.clear_param_store()
    model, guide = build(name)
    model.net.train()  # fit does this; a Pyro script does it itself
    pyro.set_rng_seed(1)
    # fit minimises the loss per example (the ELBO / num_data): the same objective for Pyro, so Adam's eps acts alike
    per_example = 1 / model.num_data
    svi = SVI(pyro.poutine.scale(model, per_example), pyro.poutine.scale(guide, per_example), pyro.optim.Adam({"lr": lr}), elbo())
    losses = [svi.step(data[i % len(data)]) for i in range(steps)]
    by_svi = trained(model, guide)

    assert by_fit.keys() == by_svi.keys() and len(by_fit) > 0
    assert any(k.startswith("net.") for k in by_fit)  # the classification head at least
    for k in by_fit:
        assert not torch.equal(by_svi[k], before[k]), f"SVI left {k} unchanged"
        torch.testing.assert_close(by_svi[k], by_fit[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs")
    assert all(map(torch.isfinite, map(torch.tensor, losses)))


def test_a_post_hoc_fit_leaves_no_gradient_for_pyros_svi_to_add():
    """fit(train_network=False) backpropagates into the head it does not train: those gradients were left in .grad,
    and Pyro's SVI (which zeroes after its step, not before) added their sum to its first step (the head 50% off)."""
    data, lr = toy_data(n=16, batch=8), 1e-2

    def map_after_post_hoc(train):
        pyro.clear_param_store()
        model, spread = build("meanfield")
        fit(model, spread, data, epochs=3, lr=1e-3, elbo=TraceMeanField_ELBO(), train_network=False, progress=False)
        assert all(p.grad is None for p in model.net.parameters())
        guide = MAPGuide(model)
        model.net.train()
        pyro.set_rng_seed(1)
        train(model, guide)
        return trained(model, guide)

    def with_svi(model, guide):
        per_example = 1 / model.num_data
        svi = SVI(pyro.poutine.scale(model, per_example), pyro.poutine.scale(guide, per_example), pyro.optim.Adam({"lr": lr}),
                  Trace_ELBO())
        for b in data * 2:
            svi.step(b)

    by_fit = map_after_post_hoc(lambda model, guide: fit(model, guide, data, epochs=2, lr=lr, progress=False))
    by_svi = map_after_post_hoc(with_svi)
    assert any(k.startswith("net.") for k in by_fit)
    for k in by_fit:
        torch.testing.assert_close(by_svi[k], by_fit[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs")


def test_fit_leaves_a_gradient_it_did_not_make_as_it_was():
    model, guide = build("meanfield")
    head = next(p for n, p in model.named_point_parameters() if "classifier" in n)
    mine = torch.full_like(head, 0.5)
    head.grad = mine
    fit(model, guide, toy_data(n=8, batch=8), epochs=1, lr=1e-3, elbo=TraceMeanField_ELBO(), train_network=False, progress=False)
    assert head.grad is mine and bool((mine == 0.5).all())


def test_pyros_svi_trains_a_parameter_held_in_another_memory_layout():
    """Pyro's store keeps a contiguous copy of a strided tensor: the copy was trained (the guide's own parameter not)
    and the next step refused the store as holding a parameter no live guide recorded."""
    data = toy_data(n=8, batch=8)
    model, _ = build("map")
    init = {n: v.mT.contiguous().mT for n, v in model.adapter_values().items()}  # the same values, column-major
    guide = MAPGuide(model, init=init)
    assert not all(p.is_contiguous() for p in guide.parameters())
    before = [p.detach().clone() for p in guide.parameters()]
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(2):
        svi.step(data[0])
    assert all(not torch.equal(p, q) for p, q in zip(guide.parameters(), before))


def test_two_guides_in_one_process_do_not_collide():
    model, first = build("meanfield")
    second = MeanFieldGuide(model, b="normal")
    untouched = {n: p.detach().clone() for n, p in second.named_parameters()}
    model.net.train()
    svi = SVI(model, first, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    for batch in toy_data(n=16, batch=8):
        svi.step(batch)
    for n, p in second.named_parameters():
        assert torch.equal(p, untouched[n]), n
    svi_second = SVI(model, second, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    svi_second.step(toy_data(n=8, batch=8)[0])
    names = list(pyro.get_param_store().keys())
    first_names = [n for n in names if n.startswith(first._pyro_name + ".")]
    second_names = [n for n in names if n.startswith(second._pyro_name + ".")]
    assert len(first_names) == len(second_names) == len(list(first.parameters()))
    for n in first_names:
        assert pyro.get_param_store()[n] is dict(first.named_parameters())[n[len(first._pyro_name) + 1 :]]


def test_restoring_the_param_store_from_a_file_is_refused(tmp_path):
    model, guide = build("map")
    model.net.train()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    batch = toy_data(n=8, batch=8)[0]
    svi.step(batch)
    store = pyro.get_param_store()
    store.save(tmp_path / "params.pt")
    svi.step(batch)
    store.load(tmp_path / "params.pt")  # a roll-back: the forward would keep reading the live parameters
    with pytest.raises(ValueError, match="another tensor than the live parameter .*save_guide / load_guide"):
        svi.step(batch)
    pyro.clear_param_store()
    store.load(tmp_path / "params.pt")  # a resume into fresh objects: the saved names belong to no live guide
    model, guide = build("map")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    with pytest.raises(ValueError, match="pyro_lora params that no live guide or model recorded"):
        svi.step(batch)


def test_a_restored_param_store_is_refused_by_the_librarys_own_functions_too(tmp_path):
    """predict, save_guide and fit read the guide's own parameters, never the store: after get_param_store().load of
    a trained run (the same names in a fresh process) they predicted, saved and resumed the untrained guide."""
    from pyro_lora import export_adapter

    model, guide = build("meanfield")
    batch = toy_data(n=8, batch=8)[0]
    SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO()).step(batch)
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.get_param_store().load(tmp_path / "params.pt")  # the same names, other tensors: a fresh process resuming
    for action, call in [("predict", lambda: predict(model, guide, [batch])), ("save", lambda: save_guide(guide, tmp_path / "g")),
                         ("fit", lambda: fit(model, guide, [batch], progress=False)),
                         ("export the adapter", lambda: export_adapter(guide, tmp_path / "a"))]:
        with pytest.raises(ValueError, match=rf"cannot {action}: Pyro's param store holds .*save_guide / load_guide"):
            call()
    assert not (tmp_path / "g").exists()
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    fresh, fresh_guide = build("meanfield")  # other names: the restored ones belong to no live guide
    with pytest.raises(ValueError, match="cannot predict: .*pyro_lora params that no live guide or model recorded"):
        predict(fresh, fresh_guide, [batch])
    pyro.clear_param_store()
    predict(fresh, fresh_guide, [batch])


def test_params_left_in_the_store_by_a_dropped_guide_are_no_orphans():
    model, guide = build("map")
    model.net.train()
    SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(toy_data(n=8, batch=8)[0])
    del guide
    import gc

    gc.collect()
    second = MAPGuide(model)
    SVI(model, second, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(toy_data(n=8, batch=8)[0])


def test_a_second_model_over_the_network_does_not_freeze_the_first_ones_point_parameters():
    net = tiny_bert(num_labels=2)
    first = LoraModel(net, SequenceClassification(), random="A", prior=0.5, num_data=48)
    guide = MeanFieldGuide(first)
    LoraModel(net, SequenceClassification(), random="AB", prior=0.5)  # sets B's requires_grad off
    b = [p for n, p in net.named_parameters() if "lora_B" in n]
    before = [p.detach().clone() for p in b]
    net.train()
    SVI(first, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO()).step(toy_data(n=8, batch=8)[0])
    assert all(not torch.equal(p, q) for p, q in zip(b, before))


def test_fit_leaves_the_param_store_empty():
    model, guide = build("meanfield")
    fit(model, guide, toy_data(n=8, batch=8), epochs=1, progress=False)
    assert list(pyro.get_param_store().keys()) == []


def test_pyro_svi_trains_non_random_lora_matrices_of_a_causal_lm():
    model = LoraModel(tiny_llama(), CausalLM(), random="A", prior=0.5)
    guide = MeanFieldGuide(model)
    b = [p for n, p in model.named_point_parameters() if "lora_B" in n]
    assert len(b) == 4
    before = [p.detach().clone() for p in b]
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2}), TraceMeanField_ELBO())
    svi.step(batch)
    assert all(not torch.equal(p, q) for p, q in zip(b, before))


@pytest.mark.parametrize(
    "elbo",
    [Trace_ELBO(), TraceMeanField_ELBO(), pyro.infer.TraceGraph_ELBO(), Trace_ELBO(num_particles=2)],
    ids=["Trace", "TraceMeanField", "TraceGraph", "Trace_2_particles"],
)
def test_pyro_elbos_train_the_guide(elbo):
    model, guide = build("meanfield")
    model.net.train()
    before = [p.detach().clone() for p in guide.parameters()]
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    assert all(torch.isfinite(torch.tensor(svi.step(b))) for b in toy_data(n=16, batch=8))
    assert all(not torch.equal(p, q) for p, q in zip(guide.parameters(), before))


@pytest.mark.parametrize("guide_dropped", [False, True])
@pytest.mark.parametrize("kind", ["MeanFieldGuide", "AutoDelta", "AutoNormal"])
def test_an_elbo_computed_but_never_stepped_trained_nothing(kind, guide_dropped):
    """A loss computed with gradients and no step (a gradient check, a logged ELBO) left the head and the guide as
    they were, yet building another guide was refused: "the head was trained by a MeanFieldGuide (a Pyro AutoDelta)
    whose LoRA values the adapter does not hold". A step after it trains the head: refused, as before. An autoguide
    collected since cannot be read: the head is as it was, but whether its sites moved is not known (warned)."""
    import gc

    from pyro.infer.autoguide import AutoDelta, AutoNormal

    def built():
        pyro.clear_param_store()
        if kind == "MeanFieldGuide":
            model, guide = build("meanfield")
            with torch.no_grad():
                guide.locs[0].add_(0.1)  # a mean the adapter does not hold (a loaded guide, one being checked)
            return model, guide
        model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5, num_data=48)
        return model, {"AutoDelta": AutoDelta, "AutoNormal": AutoNormal}[kind](model)

    batch = toy_data(n=8, batch=8)[0]
    model, guide = built()
    for _ in range(2):
        Trace_ELBO().differentiable_loss(model, guide, batch)
    if guide_dropped:
        del guide
        gc.collect()
    if guide_dropped and kind != "MeanFieldGuide":
        with pytest.warns(UserWarning, match=f"last trained this network with a Pyro {kind}"):
            MAPGuide(model)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nor the warning that it "would miss the training"
            MAPGuide(model)
    model, guide = built()
    SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(batch)
    if guide_dropped:
        del guide
        gc.collect()
    with pytest.raises(ValueError, match="head was trained by a .* whose LoRA values the adapter does not hold"):
        MAPGuide(model)


@pytest.mark.parametrize("logged", ["same guide", "another guide", "AutoNormal"])
def test_an_unstepped_elbo_after_fit_keeps_the_fits_refusal(logged):
    """After fit trained a MAP (the head with it, never written into the adapter), one ELBO computed with gradients
    and no step (on the MAP guide, a new guide started at its mean, an autoguide) replaced fit's record by its own,
    which trained nothing: MAPGuide(model) and export_adapter then paired the old LoRA with the trained head, without a
    word (accuracy 0.688 against 1.000). The record it replaced now stands."""
    from pyro.infer.autoguide import AutoNormal

    pyro.clear_param_store()
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5, num_data=16)
    data = toy_data(n=16, batch=8)
    trained = MAPGuide(model)
    fit(model, trained, data, epochs=2, lr=2e-2, progress=False)
    logged_guide = {"same guide": lambda: trained, "another guide": lambda: MeanFieldGuide(model, init=trained.mean()),
                    "AutoNormal": lambda: AutoNormal(model)}[logged]()
    Trace_ELBO().differentiable_loss(model, logged_guide, data[0])
    with pytest.raises(ValueError, match="head was trained by a MAPGuide whose LoRA values the adapter does not hold"):
        MAPGuide(model)


@pytest.mark.parametrize("after", ["guide-alone steps", "a collected AutoNormal's logged ELBO"])
def test_svi_calls_that_left_the_head_keep_an_earlier_fits_refusal(after):
    """After fit trained a MAP (never written), steps of another guide alone (the head as fit left it), or a logged
    ELBO of an autoguide collected since, turned fit's refusal into a warning: MAPGuide(model) and export_adapter
    paired fit's head with the stale adapter. An ensemble without heads= lost its warning that a member is not the
    head's. The head is still fit's: refused, and warned, as before; the records stay one per guide."""
    import gc

    from pyro.infer.autoguide import AutoNormal

    import pyro_lora.ownership as ownership
    from pyro_lora.guides import EnsembleGuide

    pyro.clear_param_store()
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5, num_data=16)
    data = toy_data(n=16, batch=8)
    stale = model.adapter_values()
    trained = MAPGuide(model)
    fit(model, trained, data, epochs=2, lr=2e-2, progress=False)
    if after == "guide-alone steps":
        other = MeanFieldGuide(model, init=trained.mean())
        optimizer = torch.optim.Adam(other.parameters(), lr=1e-2)
        for _ in range(3):
            for batch in data:  # a loss logged by another guide between the steps: passed over
                optimizer.zero_grad()
                Trace_ELBO().differentiable_loss(model, other, batch).backward()
                optimizer.step()
                Trace_ELBO().differentiable_loss(model, MeanFieldGuide(model, init=trained.mean()), batch)
        entry, count = getattr(model.net, ownership._FITTED)[model.adapter], 0
        while entry is not None:
            entry, count = entry.replaced, count + 1
        assert count <= 3
    else:
        Trace_ELBO().differentiable_loss(model, AutoNormal(model), data[0])
        gc.collect()
    with pytest.raises(ValueError, match="head was trained by a MAPGuide whose LoRA values the adapter does not hold"):
        MAPGuide(model)
    with pytest.warns(UserWarning, match=r"head was trained by a MAPGuide beside LoRA values other than member\(s\) 1"):
        EnsembleGuide(model, [trained.mean(), stale])


def test_svi_steps_of_the_guide_alone_warn_that_the_adapter_misses_them():
    """An optimiser stepping the guide's parameters alone leaves the head as it was: the adapter's LoRA is no stale
    partner for it (was refused: "the head was trained by a MAPGuide"), but a guide built from it misses the training."""
    pyro.clear_param_store()
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5, num_data=16)
    guide = MAPGuide(model)
    optimizer = torch.optim.Adam(guide.parameters(), lr=1e-2)
    for batch in toy_data(n=16, batch=8):
        optimizer.zero_grad()
        Trace_ELBO().differentiable_loss(model, guide, batch).backward()
        optimizer.step()
    with pytest.warns(UserWarning, match="the adapter still holds the LoRA values it held when pyro.infer.SVI last trained"):
        MAPGuide(model)


@pytest.mark.parametrize("check", ["a MAPGuide's loss after the backward pass", "an AutoDelta's loss after the backward pass",
                                   "a MAPGuide's loss before the backward pass", "the head's own optimiser",
                                   "its own loss after the backward pass", "an AutoDelta's loss, then a penalty's backward",
                                   "an AutoDelta's loss summed in, called first", "an AutoDelta's loss summed in, called last",
                                   "an AutoDelta's loss backwarded in turn"])
def test_a_guide_run_between_a_loss_and_its_step_takes_no_credit_for_the_step(check, tmp_path):
    """A validation loss of another guide run between a training loss and its optimiser step took the step as its
    own, and the head with it: MAPGuide(model) and export_adapter(model) then paired the adapter's LoRA with the head
    the MeanFieldGuide trained (logits 0.084 off its mean's), without a word. The step goes to the guide whose call
    the backward pass went through (one through two guides' calls: the guide the optimiser steps); the other guide is
    refused once the step changed the head under it. The trained guide's own validation loss, a weight penalty's own
    backward pass, and a validation loss summed in at weight 0 left the step unadopted or another's, alike."""
    from pyro.infer.autoguide import AutoDelta

    from pyro_lora import export_adapter

    def run(validate):
        pyro.clear_param_store()
        model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5, num_data=16)
        trained = MeanFieldGuide(model)
        head = [p for _, p in model.named_point_parameters()]
        both = check != "the head's own optimiser"
        optimizers = [torch.optim.Adam([*trained.parameters(), *(head if both else [])], lr=2e-2)]
        optimizers += [] if both else [torch.optim.SGD(head, lr=0.5)]
        torch.manual_seed(0)
        for batch in [b for _ in range(2) for b in toy_data(n=16, batch=8)]:
            for opt in optimizers:
                opt.zero_grad()
            other = None
            if validate:
                other = (AutoDelta(model) if "AutoDelta" in check else trained if "its own" in check
                         else MAPGuide(model, init=trained.mean()))
            with torch.random.fork_rng():  # its draws (dropout's) leave the training's as they were
                summed = Trace_ELBO().differentiable_loss(model, other, batch) if "first" in check and validate else 0
            loss = Trace_ELBO().differentiable_loss(model, trained, batch)
            with torch.random.fork_rng():
                if validate and "last" in check:
                    summed = Trace_ELBO().differentiable_loss(model, other, batch)
                if validate and "before" in check:
                    Trace_ELBO().loss(model, other, batch)
                (loss + 0 * summed).backward()
                if validate and "in turn" in check:  # its gradient added to the trained guide's
                    (0 * Trace_ELBO().differentiable_loss(model, other, batch)).backward()
                elif validate and not any(w in check for w in ("before", "summed")):
                    Trace_ELBO().differentiable_loss(model, other, batch)
                if "penalty" in check:  # a backward pass of its own, through no guide's call
                    (1e-4 * sum(p.square().sum() for p in head)).backward()
            for opt in optimizers:
                opt.step()
        return model, trained, other

    reference = run(validate=False)[0]
    model, trained, other = run(validate=True)
    for (n, p), (_, q) in zip(model.named_point_parameters(), reference.named_point_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)  # the check changes no step
    refused = "head was trained by a MeanFieldGuide whose LoRA values the adapter does not hold"
    with pytest.raises(ValueError, match=refused):
        MAPGuide(model)
    with pytest.raises(ValueError, match=refused):
        export_adapter(model, tmp_path / "adapter")
    if isinstance(other, MAPGuide):
        with pytest.raises(ValueError, match="point parameters .* changed since this guide was built or trained"):
            predict(model, other, toy_data(n=8, batch=8), mean=True)
    predict(model, trained, toy_data(n=8, batch=8), mean=True)  # the head is its own


def test_a_gradient_never_stepped_gives_no_credit_to_a_plain_torch_step_after_zero_grad():
    """A gradient check (a backward pass, no step) after the loop, the guide's own validation loss, then a plain torch
    loss training the head after zero_grad: the check's credit was handed to that step, so the guide's predict took a
    head trained on flipped labels as its own."""
    import torch.nn.functional as F

    pyro.clear_param_store()
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5, num_data=16)
    trained, data = MeanFieldGuide(model), toy_data(n=16, batch=8)
    head = [p for _, p in model.named_point_parameters()]
    optimizer = torch.optim.Adam([*trained.parameters(), *head], lr=2e-2)
    for batch in data:
        optimizer.zero_grad()
        Trace_ELBO().differentiable_loss(model, trained, batch).backward()
        optimizer.step()
    Trace_ELBO().differentiable_loss(model, trained, data[0]).backward()  # a gradient check
    Trace_ELBO().differentiable_loss(model, trained, data[0])
    plain = torch.optim.SGD(head, lr=0.5)
    plain.zero_grad()
    inputs = {k: v for k, v in data[0].items() if k != "labels"}
    F.cross_entropy(model.net(**inputs).logits, 1 - data[0]["labels"]).backward()
    plain.step()
    with pytest.raises(ValueError, match="point parameters .* changed since this guide was built or trained"):
        predict(model, trained, data, mean=True)


def test_a_guide_built_after_pyros_svi_sees_the_head_it_trained():
    """After an SVI step (or any ELBO evaluation) the trainer's snapshot is live (None): building another guide
    raised TypeError; it is the refusal fit gives (the head goes with the SVI guide's LoRA), until the adapter holds it."""
    model, guide = build("meanfield")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    svi.step(toy_data(n=8, batch=8)[0])
    with pytest.raises(ValueError, match="head was trained by a MeanFieldGuide whose LoRA values the adapter does not hold"):
        MAPGuide(model)
    model.write_adapter(guide.mean())
    torch.testing.assert_close(MAPGuide(model).mean(), guide.mean())


@pytest.mark.parametrize("name, optim", [("meanfield_A", pyro.optim.Adam), ("meanfield_A", pyro.optim.ClippedAdam),
                                         ("mcdropout", pyro.optim.Adam)])  # a guide with no parameter of its own
def test_a_guide_trained_by_pyros_svi_follows_its_steps_and_refuses_a_head_changed_since(name, optim, tmp_path):
    """After an SVI loop the guide stayed live (Pyro does not signal the loop's end): a head re-initialised, or moved
    by a plain torch loop, was taken by its predict and save_guide without a word (0.068 in probability)."""
    model, guide = build(name)
    model.net.train()
    svi = SVI(model, guide, optim({"lr": 1e-2}), GUIDES[name][2]())
    data = toy_data(n=16, batch=8)
    for b in data:
        svi.step(b)
    first = predict(model, guide, data, mean=True)  # its own steps are followed
    head = next(p for n, p in model.named_point_parameters() if "classifier" in n)
    trained = head.detach().clone()
    with torch.no_grad():
        head.normal_()
    guide(data[0])  # a forward with gradients on (a validation ELBO, a trace) takes no step: it adopts nothing
    GUIDES[name][2]().loss(model, guide, data[0])
    with pytest.raises(ValueError, match="changed since this guide was built or trained"):
        predict(model, guide, data, num_samples=2)
    with pytest.raises(ValueError, match="changed since this guide was built or trained"):
        save_guide(guide, tmp_path / "guide")
    with torch.no_grad():
        head.copy_(trained)  # put back: its own again
    torch.testing.assert_close(predict(model, guide, data, mean=True).probs, first.probs)
    plain = torch.optim.SGD([head], lr=0.1)  # a plain torch step after the loop: not the guide's
    head.grad = torch.ones_like(head)
    plain.step()
    with pytest.raises(ValueError, match="changed since this guide was built or trained"):
        predict(model, guide, data, num_samples=2)
    svi.step(data[0])  # SVI goes on from the network as it is: the guide's own again
    predict(model, guide, data, num_samples=2)


def test_a_base_parameter_unfrozen_or_frozen_after_training_and_changed_is_refused():
    """A base weight unfrozen after training (out of the base fingerprint, which skips trainable ones, and never in
    the snapshot) and changed, or a trained base LayerNorm frozen again (out of the point parameters) and
    overwritten: both were accepted (0.09 and 0.03 in probability)."""
    data = toy_data(n=16, batch=8)
    for train in ("svi", "fit"):
        pyro.clear_param_store()
        model, guide = build("meanfield_A")
        if train == "svi":
            model.net.train()
            svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
            for b in data:
                svi.step(b)
        else:
            fit(model, guide, data, epochs=1, lr=1e-2, elbo=TraceMeanField_ELBO(), progress=False)
        embedding = next(p for n, p in model.net.named_parameters() if n.endswith("word_embeddings.weight"))
        embedding.requires_grad_(True)
        predict(model, guide, data, mean=True)  # unfrozen alone is no change
        with torch.no_grad():
            embedding.mul_(1.5)
        with pytest.raises(ValueError, match="point parameters .*word_embeddings.weight.* changed since"):
            predict(model, guide, data, mean=True)
    pyro.clear_param_store()
    net = tiny_bert(num_labels=2)
    norm = next(p for n, p in net.named_parameters() if n.endswith("embeddings.LayerNorm.weight"))
    norm.requires_grad_(True)  # trained with the head, a point parameter
    model = LoraModel(net, SequenceClassification(), random="A", prior=0.5, num_data=48)
    guide = MeanFieldGuide(model)
    net.train()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    for b in data:
        svi.step(b)
    predict(model, guide, data, mean=True)
    norm.requires_grad_(False)
    with torch.no_grad():
        norm.mul_(5)
    with pytest.raises(ValueError, match="point parameters .*LayerNorm.weight.* changed since"):
        predict(model, guide, data, mean=True)


def test_svi_of_the_head_under_a_guide_with_no_trainable_parameter_is_its_own():
    """A guide whose parameters are frozen gets no gradient to tell its step by: its call alone allows the step."""
    data = toy_data(n=16, batch=8)
    model, guide = build("meanfield_A")
    guide.requires_grad_(False)
    model.net.train()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    for b in data:
        svi.step(b)
    predict(model, guide, data, mean=True)


@pytest.mark.parametrize("unfreeze", [False, True])
@pytest.mark.parametrize("name, change", [
    ("embeddings.LayerNorm.weight", lambda w: w.neg_()),
    ("layer.0.attention.self.query.base_layer.weight", lambda w: w.neg_()),
    ("word_embeddings.weight", lambda w: w.copy_(w.flip(0))),
])
def test_a_base_weight_negated_or_permuted_is_a_change(name, change, unfreeze):
    """The base fingerprint summed |w| alone: a weight negated or its rows permuted passed (0.04 in probability)."""
    data = toy_data(n=16, batch=8)
    model, guide = build("meanfield_A")
    fit(model, guide, data, epochs=1, lr=1e-2, elbo=TraceMeanField_ELBO(), progress=False)
    weight = next(p for n, p in model.net.named_parameters() if n.endswith(name))
    weight.requires_grad_(unfreeze)
    with torch.no_grad():
        change(weight)
    with pytest.raises(ValueError, match=r"base weights differ|point parameters .* changed since"):
        predict(model, guide, data, mean=True)


def test_a_step_after_a_loop_that_never_stepped_the_head_or_a_guide_frozen_since_is_not_its_own():
    """A loop stepping only the guide left the follow of its last call armed: one plain torch step on the head after
    it was taken as the guide's (0.50 in probability); so was one after a trace of a guide frozen after training."""
    data = toy_data(n=16, batch=8)

    def plain_step(model):
        plain = torch.optim.SGD(model.point_parameters(), lr=5.0)
        for p in model.point_parameters():
            p.grad = torch.randn_like(p)
        plain.step()

    model, guide = build("meanfield_A")
    model.net.train()
    optimizer = torch.optim.Adam(guide.parameters(), lr=1e-2)
    for b in data * 2:
        optimizer.zero_grad()
        TraceMeanField_ELBO().differentiable_loss(model, guide, b).backward()
        optimizer.step()
    predict(model, guide, data, mean=True)
    plain_step(model)
    with pytest.raises(ValueError, match="changed since this guide was built or trained"):
        predict(model, guide, data, mean=True)
    pyro.clear_param_store()
    model, guide = build("meanfield_A")
    model.net.train()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    for b in data:
        svi.step(b)
    guide.requires_grad_(False)
    pyro.poutine.trace(guide).get_trace(data[0])
    plain_step(model)
    with pytest.raises(ValueError, match="changed since this guide was built or trained"):
        predict(model, guide, data, mean=True)


def test_an_optimiser_step_that_raised_does_not_stop_the_next_from_being_the_guides():
    """A step that raised (caught by the loop) never ended: every later step was taken for an inner one and ignored."""

    class Picky(torch.optim.SGD):
        def step(self, closure=None):
            raise FloatingPointError("a non-finite gradient: step skipped")

    data = toy_data(n=16, batch=8)
    model, guide = build("meanfield_A")
    model.net.train()
    skipped, head = Picky(guide.parameters(), lr=1e-2), torch.optim.Adam(model.point_parameters(), lr=1e-2)
    for b in data * 2:
        skipped.zero_grad()
        head.zero_grad()
        TraceMeanField_ELBO().differentiable_loss(model, guide, b).backward()
        with pytest.raises(FloatingPointError):
            skipped.step()
        head.step()
    predict(model, guide, data, mean=True)


class _Lookahead(torch.optim.Optimizer):
    """A wrapper optimiser as timm's Lookahead: the inner step, then a pull of the weights toward slow copies."""

    def __init__(self, inner, alpha=0.5):
        self.inner, self.alpha = inner, alpha
        super().__init__(inner.param_groups, inner.defaults)
        self.slow = {p: p.detach().clone() for g in self.param_groups for p in g["params"]}

    @torch.no_grad()
    def step(self, closure=None):
        self.inner.step()
        for p, slow in self.slow.items():
            slow.add_(p - slow, alpha=self.alpha)
            p.copy_(slow)


def test_a_wrapper_optimiser_is_the_guides_own_steps_and_a_jit_elbo_is_refused():
    """Lookahead's inner step was taken as the step's end (its pull then refused as a foreign change). A JIT ELBO
    compiled the model's checks once: a later batch's label of -100 was scored, num_data below its rows taken, and
    dropout kept after net.eval()."""
    data = toy_data(n=16, batch=8)
    model, guide = build("meanfield_A")
    model.net.train()
    params = list(guide.parameters()) + model.point_parameters()
    optimizer = _Lookahead(torch.optim.Adam(params, lr=1e-2))
    for b in data * 2:
        optimizer.zero_grad()
        TraceMeanField_ELBO().differentiable_loss(model, guide, b).backward()
        optimizer.step()
    predict(model, guide, data, mean=True)
    pyro.clear_param_store()
    model, guide = build("meanfield_A")
    model.net.train()
    for elbo in (pyro.infer.JitTrace_ELBO(), pyro.infer.JitTraceMeanField_ELBO(), pyro.infer.JitTraceGraph_ELBO()):
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
        with pytest.raises(ValueError, match="the model is being JIT-traced .* use Trace_ELBO or TraceMeanField_ELBO"):
            svi.step(data[0])


def test_predictive_and_condition_use_the_guide_and_the_model():
    model, guide = build("meanfield")
    batch = toy_data(n=8, batch=8)[0]
    out = pyro.infer.Predictive(model, guide=guide, num_samples=3, return_sites=["obs", "query.lora_A"])(batch)
    assert out["obs"].shape == (3, 8)
    assert out["query.lora_A"].reshape(3, -1).shape == (3, model.sites["query.lora_A"].numel)  # Predictive pads plate dims
    zeros = {n: torch.zeros(s.shape) for n, s in model.sites.items()}
    with torch.no_grad():
        conditioned = pyro.poutine.condition(model, data=zeros)(batch)
        torch.testing.assert_close(conditioned, model.logits(batch, zeros))


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_vectorized_particles_are_refused_by_name(name):
    """FlowGuide reshaped its plate-batched draws first: a bare shape error."""
    model, guide = build(name)
    batch = toy_data(n=8, batch=8)[0]
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1))
    with pytest.raises(ValueError, match=r"the guide runs inside the plate\(s\) \['num_particles_vectorized'\]: .*vectorized particles"):
        svi.step(batch)
    with pytest.raises(ValueError, match=r"inside the plate\(s\) \['_num_predictive_samples'\]"):
        pyro.infer.Predictive(model, guide=guide, num_samples=2, parallel=True)(batch)
    with pytest.raises(ValueError, match=r"the model runs inside the plate\(s\) \['_num_predictive_samples'\]"):
        pyro.infer.Predictive(model, posterior_samples={n: torch.zeros(2, *s.shape) for n, s in model.sites.items()},
                              parallel=True)(batch)


def test_a_minibatch_plate_of_the_users_own_is_refused_naming_num_data():
    """Pyro's minibatch idiom (a subsample plate around the model) was refused as vectorized particles
    (vectorize_particles, Predictive(parallel=True)), which the user had not asked for."""
    model, guide = build("map")
    batch = toy_data(n=8, batch=8)[0]

    def plated(fn):
        def run(b):
            with pyro.plate("data_user", 48, subsample_size=8):
                return fn(b)
        return run

    for m, g, who in [(plated(model), guide, "model"), (plated(model), plated(guide), "guide")]:
        with pytest.raises(ValueError, match=rf"the {who} runs inside the plate\(s\) \['data_user'\], which you put around "
                                             r"it: .*scaled by num_data / rows .*LoraModel\(\.\.\., num_data=len"):
            SVI(m, g, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(batch)
    with pytest.raises(ValueError, match=r"the model runs inside the plate\(s\) \['data_user'\], which"):  # not the particles'
        with pyro.plate("num_particles_vectorized", 2, dim=-2):
            plated(model)(batch)


def test_predictive_over_a_network_with_dropout_on_warns():
    """After the SVI recipe's model.net.train(), Predictive ran with dropout on where predict runs in eval mode
    (probabilities 0.021 apart), without a word."""
    import warnings

    model, guide = build("meanfield")
    batch = {k: v for k, v in toy_data(n=8, batch=8)[0].items() if k != "labels"}
    model.net.train()
    with pytest.warns(UserWarning, match=r"Predictive runs the network with dropout on \(\d+ modules in training mode, "
                                         r"e\.g\. .*\): .*call model\.net\.eval\(\) before Predictive"):
        pyro.infer.Predictive(model, guide=guide, num_samples=2)(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        predict(model, guide, [toy_data(n=8, batch=8)[0]], num_samples=2)  # eval mode for its call
        SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO()).step(toy_data(n=8, batch=8)[0])
        model.net.eval()
        pyro.infer.Predictive(model, guide=guide, num_samples=2)(batch)


def test_predictive_warns_of_functional_dropout_and_not_of_an_inactive_adapters():
    """The Predictive warning counted dropout modules in training mode only: Llama's attention applies
    attention_dropout functionally (no module: a SmolLM2 user's predictive probabilities 0.166 off after
    net.train()), and BERT's reads its dropout module's p under its own training flag, both unwarned; and a second
    adapter's lora_dropout, which the active adapter's forward never runs, was warned of."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from pyro.infer import Predictive
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(attention_dropout):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                             attention_dropout=attention_dropout)
        return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def predictive(model, batch=batch):
        return Predictive(model, guide=MAPGuide(model), num_samples=2, return_sites=["_RETURN"])(batch)["_RETURN"]

    model = LoraModel(llama(0.5), CausalLM(), prior=0.5)
    model.net.train()
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.net.modules())
    with torch.no_grad():
        assert not torch.equal(model.logits(batch, MAPGuide(model).mean()), model.logits(batch, MAPGuide(model).mean()))
    with pytest.warns(UserWarning, match=r"Predictive runs the network with dropout on \(\d+ modules in training mode, "
                                         r"e\.g\. .*attention_dropout=0\.5.*\): .*call model\.net\.eval\(\) before"):
        predictive(model)
    model.net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        predictive(model)

    bert = tiny_bert(num_labels=2).train()
    for m in bert.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()  # BERT's attention reads self.dropout.p under the attention's own training flag
    model = LoraModel(bert, SequenceClassification(), prior=0.5)
    sentences = toy_data(n=8, batch=8)[0]
    with torch.no_grad():
        mean = MAPGuide(model).mean()
        assert not torch.equal(model.logits(sentences, mean), model.logits(sentences, mean))
    with pytest.warns(UserWarning, match=r"e\.g\. .*attention\.self \(dropout\.p=0\.1\)"):
        predictive(model, sentences)

    two = llama(0.0)
    two.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.5))
    model = LoraModel(two, CausalLM(), prior=0.5)  # over the active adapter, "default", whose lora_dropout is 0
    two.train()
    assert any(isinstance(m, torch.nn.Dropout) and m.training and m.p == 0.5 for m in two.modules())
    with torch.no_grad():
        assert torch.equal(model.logits(batch, MAPGuide(model).mean()), model.logits(batch, MAPGuide(model).mean()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        predictive(model)
    two.set_adapter("other")  # its lora_dropout runs now, in the 4 LoRA layers
    layer = r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj"
    with pytest.warns(UserWarning, match=rf"dropout on \(4 modules in training mode, e\.g\. {layer}\.lora_dropout"
                                         r"\.other \(p=0\.5\)\)"):
        predictive(LoraModel(two, CausalLM(), prior=0.5))


def test_predictive_without_labels_draws_obs_from_the_predictive():
    """With labels, "obs" is the labels (Pyro conditions on them): a batch without labels was refused, so Predictive
    gave no predictions; it draws them now, at the guide's predictive frequencies."""
    model, guide = build("map")
    batch = toy_data(n=8, batch=8)[0]
    with torch.no_grad():
        for n, p in model.net.named_parameters():
            if "classifier" in n:
                p.normal_(0, 2.0)  # spread-out class probabilities
    guide = MAPGuide(model)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    pyro.set_rng_seed(0)
    draws = pyro.infer.Predictive(model, guide=guide, num_samples=800, return_sites=["obs"])(unlabelled)["obs"]
    assert draws.shape == (800, 8)
    probs = torch.softmax(model.logits(batch, guide.mean()), -1)[:, 1]
    torch.testing.assert_close(draws.float().mean(0), probs, atol=0.08, rtol=0)  # 4.5 binomial std errors at most
    labelled = pyro.infer.Predictive(model, guide=guide, num_samples=3, return_sites=["obs"])(batch)["obs"]
    assert torch.equal(labelled, batch["labels"].expand(3, -1))


def test_predictive_over_a_causal_lm_without_labels_is_refused_naming_causal_lm():
    """CausalLM derives its observed tokens from batch["labels"]: a batch without them was refused as "the batch has no
    'labels'", where docs/model.md said such a batch draws "obs"; the message now says it is CausalLM's and what to do."""
    model = LoraModel(tiny_llama(), CausalLM(), random="AB", prior=0.5, num_data=10)
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    guide = MAPGuide(model)
    assert pyro.infer.Predictive(model, guide=guide, num_samples=2, return_sites=["obs"])(batch)["obs"].shape == (2, 2, 5)
    for unlabelled in ({k: v for k, v in batch.items() if k != "labels"}, {**batch, "labels": None}):
        with pytest.raises(ValueError, match=r"the batch has no 'labels' .*: CausalLM derives its observed tokens from "
                                             r"batch\['labels'\] .* draws no 'obs' for a batch without them "
                                             r"\(pyro.infer.Predictive included\); give labels"):
            pyro.infer.Predictive(model, guide=guide, num_samples=2, return_sites=["obs"])(unlabelled)


def test_training_on_a_batch_without_labels_is_refused_or_warned():
    """fit refuses it (its labels None too: an AttributeError before); Pyro's SVI warns of the unguided "obs" itself,
    and a replay of a guide's trace on it (the posterior predictive) draws "obs"."""
    model, guide = build("meanfield")
    batch = {k: v for k, v in toy_data(n=8, batch=8)[0].items() if k != "labels"}
    for unlabelled in (batch, {**batch, "labels": None}):
        with pytest.raises(ValueError, match="the batch has no 'labels'"):
            fit(model, guide, [unlabelled], progress=False)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    with pytest.warns(UserWarning, match="Found vars in model but not guide: {'obs'}"):
        svi.step(batch)
    guide_trace = pyro.poutine.trace(guide).get_trace(batch)
    drawn = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(batch).nodes["obs"]
    assert not drawn["is_observed"] and drawn["value"].shape == (8,)


def test_predictives_own_samples_feed_back_into_predictive():
    """Predictive pads its samples with its plates' dims ([S, 1, *shape]): fed back as posterior_samples they were
    refused as vectorized particles."""
    model, guide = build("meanfield")
    batch = toy_data(n=8, batch=8)[0]
    sites = list(model.sites)
    samples = pyro.infer.Predictive(model, guide=guide, num_samples=3, return_sites=sites)(batch)
    assert samples[sites[0]].shape == (3, 1, *model.sites[sites[0]].shape)
    logits = pyro.infer.Predictive(model, posterior_samples=samples, return_sites=["_RETURN"])(batch)["_RETURN"]
    for i in range(3):
        values = {n: samples[n][i].reshape(model.sites[n].shape) for n in sites}
        torch.testing.assert_close(logits[i], model.logits(batch, values))


def test_predictive_refuses_a_guide_for_another_checkpoint_or_scaling_of_the_same_sites():
    """Predictive hands the model its guide's draws as values only (stacked, no mark survives): a guide built on another
    checkpoint of the same shapes (seed 1), or at another lora_alpha, ran without a word where predict refused it, its
    deltas twice the trained ones. Its draws, fed back as posterior samples, are refused alike; a guide built on another
    model object of the same network, and samples of one's own, pass."""
    from peft import LoraConfig, get_peft_model
    from conftest import tiny_bert_base

    model, guide = build("meanfield")
    batch = toy_data(n=8, batch=8)[0]
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    other = LoraModel(tiny_bert(num_labels=2, seed=1), SequenceClassification(), random="AB", prior=0.5, num_data=48)
    net = get_peft_model(tiny_bert_base(2, 0), LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"],
                                                          task_type="SEQ_CLS"))
    scaled = LoraModel(net.eval(), SequenceClassification(), random="AB", prior=0.5, num_data=48)
    for stranger, what in [(other, "the base weights differ"), (scaled, "the LoRA scaling")]:
        with pytest.raises(ValueError, match=f"cannot predict with pyro.infer.Predictive with this MeanFieldGuide on this "
                                             f"model: {what}"):
            pyro.infer.Predictive(stranger, guide=guide, num_samples=2, return_sites=["_RETURN"])(unlabelled)
    samples = pyro.infer.Predictive(model, guide=guide, num_samples=3, return_sites=list(model.sites))(batch)
    with pytest.raises(ValueError, match="the LoRA scaling"):
        pyro.infer.Predictive(scaled, posterior_samples=samples, return_sites=["_RETURN"])(unlabelled)
    twin = LoraModel(model.net, SequenceClassification(), random="AB", prior=0.5, num_data=48)
    assert pyro.infer.Predictive(twin, guide=guide, num_samples=2, return_sites=["_RETURN"])(unlabelled)["_RETURN"].shape == (2, 8, 2)
    own = {n: torch.randn(2, *s.shape) * 0.1 for n, s in model.sites.items()}
    assert pyro.infer.Predictive(scaled, posterior_samples=own, return_sites=["_RETURN"])(unlabelled)["_RETURN"].shape == (2, 8, 2)
    # point guides of two models over one network draw the same values: the later one's draws made the earlier's refused
    first = build("map")[0]
    second = LoraModel(first.net, SequenceClassification(), random="AB", prior=1.0, num_data=48)
    guides = MAPGuide(first), MAPGuide(second)  # both alive
    mine = pyro.infer.Predictive(first, guide=guides[0], num_samples=2, return_sites=list(first.sites))(batch)
    theirs = pyro.infer.Predictive(second, guide=guides[1], num_samples=2, return_sites=list(first.sites))(batch)
    assert all(torch.equal(mine[n], theirs[n]) for n in first.sites)
    assert pyro.infer.Predictive(first, posterior_samples=mine, return_sites=["_RETURN"])(unlabelled)["_RETURN"].shape == (2, 8, 2)


def test_predictive_refuses_a_guide_whose_head_changed_since():
    """predict refused it, Predictive ran it with the other guide's head (0.95 against its own 0.61)."""
    model, first = build("map")
    data = toy_data(n=16, batch=8)
    fit(model, first, data, lr=1e-2, progress=False)
    model.write_adapter(first.mean())
    fit(model, MAPGuide(model), data, lr=5e-2, progress=False)  # another guide trains the head
    with pytest.raises(ValueError, match="cannot run as a Pyro guide .* point parameters .* changed since"):
        pyro.infer.Predictive(model, guide=first, num_samples=2)(data[0])


def test_a_guide_scaled_otherwise_than_the_model_is_refused():
    """kl_weight scales the model's weight sites; a Pyro autoguide ignores it, so Trace_ELBO computed
    nll + log q - 0.1 log p (1750.8 where the beta-ELBO is 299.9)."""
    model, guide = build("meanfield")
    batch = toy_data(n=8, batch=8)[0]
    auto = pyro.infer.autoguide.AutoNormal(model, init_scale=1e-2)
    auto(batch)
    with pytest.raises(ValueError, match=r"scaled by 0.1 \(kl_weight, poutine.scale\), but the guide's site '.*' by 1 "):
        Trace_ELBO().loss(model, auto, batch, kl_weight=0.1)
    with pytest.raises(ValueError, match="scaled by 0.5 .* the guide's site .* by 1 "):  # the model scaled, the guide not
        Trace_ELBO().loss(pyro.poutine.scale(model, 0.5), guide, batch)
    pyro.set_rng_seed(0)
    scaled = Trace_ELBO().loss(model, pyro.poutine.scale(auto, 0.1), batch, kl_weight=0.1)  # scaled alike: the beta-ELBO
    pyro.set_rng_seed(0)
    trace = pyro.poutine.trace(auto).get_trace(batch)
    values = {n: trace.nodes[n]["value"] for n in model.sites}
    trace.compute_log_prob()
    log_q = sum(trace.nodes[n]["log_prob_sum"] for n in trace.stochastic_nodes)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model.logits(batch, values), batch["labels"], reduction="sum") * model.num_data / 8
        log_p = sum(model.prior_distribution(s).log_prob(values[n]) for n, s in model.sites.items())
    assert scaled == pytest.approx(float(nll + 0.1 * (log_q - log_p)), rel=1e-5)
    Trace_ELBO().loss(model, guide, batch, kl_weight=0.1)  # a pyro_lora guide scales its sites itself


def test_a_validation_loss_beside_full_batch_svi_is_no_second_training_batch():
    """Full-batch SVI on a model without num_data, beside elbo.loss(model, guide, val_batch) each epoch (gradients on),
    warned that SVI stepped through several batches: the validation batch counted as a second training batch. An ELBO's
    loss (a float) only evaluates, as a trace of a replay of one's own does; a step on another batch, by SVI or by a
    differentiable_loss of one's own, still warns."""
    import warnings

    train, val = toy_data(n=16, batch=8)
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5)
    guide = MeanFieldGuide(model, b="normal")
    elbo = TraceMeanField_ELBO()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for _ in range(2):  # epochs
            svi.step(train)
            assert torch.is_grad_enabled() and elbo.loss(model, guide, val) > 0
            assert Trace_ELBO().loss(model, guide, val) > 0
            guide_trace = pyro.poutine.trace(guide).get_trace(val)
            pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(val)
    with pytest.warns(UserWarning, match="the model has no num_data, and an ELBO trained outside fit"):
        svi.step(val)
    own = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5)
    own_guide = MeanFieldGuide(own, b="normal")
    TraceMeanField_ELBO().differentiable_loss(own, own_guide, train).backward()
    with pytest.warns(UserWarning, match="the model has no num_data, and an ELBO trained outside fit"):
        TraceMeanField_ELBO().differentiable_loss(own, own_guide, val).backward()


def test_pyros_minibatch_scaling_is_refused_pointing_at_num_data_and_svi_without_it_warns_as_fit():
    """Pyro's habit SVI(poutine.scale(model, N / B), guide) was refused ending "scale the model and the guide alike",
    which, followed, multiplied the KL by N / B too (12679.45 where the minibatch ELBO is 2553.51); and SVI over
    several batches of a model without num_data said nothing, where fit warns."""
    import warnings

    data = toy_data(n=20, batch=8)
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5)
    guide = MeanFieldGuide(model, b="normal")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # one batch, again and shuffled, is the whole data
        svi.step(data[0])
        svi.step(data[0])
        svi.step({k: v.flip(0) for k, v in data[0].items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        svi.evaluate_loss(data[1])  # no training step
    with pytest.warns(UserWarning, match=r"the model has no num_data, and an ELBO trained outside fit \(pyro.infer.SVI, a "
                                         r"loop of your own\) steps through 2 batches: each is taken as the whole training "
                                         "set") as caught:
        for batch in data[1:]:
            svi.step(batch)
    assert sum("has no num_data" in str(w.message) for w in caught) == 1  # once per model
    own = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5)
    own_guide = MeanFieldGuide(own, b="normal")
    with pytest.warns(UserWarning, match="the model has no num_data, and an ELBO trained outside fit"):
        for batch in data[:2]:  # a loop of one's own
            TraceMeanField_ELBO().differentiable_loss(own, own_guide, batch).backward()
    with pytest.raises(ValueError, match=r"scaled by 5 \(kl_weight, poutine.scale\), but the guide's site .* by 1 .*the model "
                                         r"scales its data term itself, by num_data / rows .*LoraModel\(\.\.\., "
                                         r"num_data=len\(training set\)\) \(it has num_data=None\)\. Scaling the model "
                                         "and the guide alike is right only to weigh the whole ELBO"):
        SVI(pyro.poutine.scale(model, 20 / 4), guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO()).step(data[-1])
    sized = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5, num_data=20)
    svi = SVI(sized, MeanFieldGuide(sized, b="normal"), pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for batch in data:
            svi.step(batch)


def test_a_mask_or_a_per_row_scale_around_the_model_is_refused():
    """The weight sites are global: poutine.mask(model, mask=rows) counted their log-prior once per kept row (767.6
    where the ELBO counts it once, 264.2) with Pyro's validation off, and mask=False left -log q; a per-row scale
    tensor failed in float()."""
    model, guide = build("map")
    batch = toy_data(n=8, batch=8)[0]
    keep = torch.tensor([True] * 3 + [False] * 5)
    with pyro.validation_enabled(False):
        for mask in (keep, False, torch.tensor(False)):
            with pytest.raises(ValueError, match="runs under poutine.mask: its weight sites are global"):
                Trace_ELBO().loss(pyro.poutine.mask(model, mask=mask), guide, batch)
        with pytest.raises(ValueError, match=r"poutine.scale with a tensor of shape \(8,\): its weight sites are global"):
            Trace_ELBO().loss(pyro.poutine.scale(model, torch.full((8,), 0.5)), pyro.poutine.scale(guide, 0.5), batch)
        pyro.set_rng_seed(0)
        masked = Trace_ELBO().loss(pyro.poutine.mask(model, mask=True), guide, batch)
        pyro.set_rng_seed(0)
        assert masked == Trace_ELBO().loss(model, guide, batch)  # mask=True masks nothing


def test_a_mask_around_the_guide_alone_is_refused():
    """poutine.mask(guide, False) dropped log q from the objective (631.0 where the ELBO is 1494.3 under Trace_ELBO,
    44.0 under TraceMeanField_ELBO, whose KL went too), and training so collapsed the posterior; a scale of 0.5 on the
    guide alone was refused already."""
    from pyro.infer import TraceMeanField_ELBO
    from pyro.infer.autoguide import AutoNormal

    model = LoraModel(tiny_bert(num_labels=3), SequenceClassification(), random="AB", prior=0.7, num_data=40)
    batch = toy_data(n=8, batch=8)[0]
    autoguide = AutoNormal(model)
    autoguide(batch)
    for guide in (autoguide, build("meanfield")[1]):
        run_model = model if guide is autoguide else guide.model
        for mask in (False, torch.tensor(False), torch.tensor([True] * 3 + [False] * 5)):
            for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
                with pytest.raises(ValueError, match=r"the guide's site .* runs under poutine.mask \(\d+ sites so\): the "
                                                     r"ELBO drops its log q, which is no ELBO"):
                    elbo.loss(run_model, pyro.poutine.mask(guide, mask=mask), batch)
    pyro.set_rng_seed(0)
    kept = Trace_ELBO().loss(model, pyro.poutine.mask(autoguide, mask=True), batch)
    pyro.set_rng_seed(0)
    assert kept == Trace_ELBO().loss(model, autoguide, batch)  # mask=True masks nothing


@pytest.mark.parametrize("where", ["model", "guide"])
def test_a_weight_site_blocked_from_the_elbos_replay_is_refused(where):
    """poutine.block hiding a site of the model (or the guide) under Trace_ELBO: the model drew it from its prior and
    log q lacked it (loss 222.2 for 285.1 at the MAP), with only Pyro's generic warning."""
    model, guide = build("map")
    batch = toy_data(n=8, batch=8)[0]
    site = next(iter(model.sites))
    blocked = {"model": (pyro.poutine.block(model, hide=[site]), guide), "guide": (model, pyro.poutine.block(guide, hide=[site]))}
    with pytest.raises(ValueError, match=rf"no value of the guide's reached the model's site '{site}' \(1 sites so"):
        Trace_ELBO().loss(*blocked[where], batch)


def test_the_observed_site_hidden_from_the_elbo_is_refused_by_name():
    """poutine.block(model, hide=["obs"]) under Trace_ELBO dropped the data term without a word: the loss was
    -(log p(w) - log q(w)) exactly, and training pulled the guide to the prior. A block outside the ELBO's own trace
    hides nothing from it, and Predictive may block the observation."""
    model, guide = build("meanfield")
    batch = toy_data(n=8, batch=8)[0]
    block = pyro.poutine.block
    for blocked in (block(model, hide=["obs"]), block(model, hide_types=["observe"]), block(model, expose=list(model.sites))):
        with pytest.raises(ValueError, match="the model's observed site 'obs' is hidden from the ELBO"):
            Trace_ELBO().loss(blocked, guide, batch)
    with pytest.raises(ValueError, match="observed site 'obs' is hidden"):
        SVI(block(model, hide=["obs"]), guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO()).step(batch)
    pyro.set_rng_seed(0)
    with torch.no_grad(), block():  # the whole computation hidden from handlers outside: the ELBO sees its data term
        outside = Trace_ELBO().loss(model, guide, batch)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        assert outside == Trace_ELBO().loss(model, guide, batch)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    out = pyro.infer.Predictive(block(model, hide=["obs"]), guide=guide, num_samples=2, return_sites=["_RETURN"])(unlabelled)
    assert out["_RETURN"].shape == (2, 8, 2)


def test_a_replay_of_ones_own_outside_an_elbo_may_hide_obs_leave_sites_to_the_prior_or_mask():
    """poutine.trace(poutine.replay(poutine.block(model, hide=["obs"]), trace=guide_trace)), run without an ELBO (the
    prior's log density at the guide's draw), was refused as an ELBO's loss lacking its data term; so were a replay of a
    guide's partial trace (the rest drawn from the prior) and one under mask=False, checks of an ELBO's loss too. Under
    an ELBO all three are still refused."""
    model, guide = build("meanfield")
    batch = toy_data(n=8, batch=8)[0]
    block, replay, trace = pyro.poutine.block, pyro.poutine.replay, pyro.poutine.trace
    guide_trace = trace(guide).get_trace(batch)
    prior = trace(replay(block(model, hide=["obs"]), trace=guide_trace)).get_trace(batch)
    assert "obs" not in prior.nodes
    log_prior = sum(prior.nodes[n]["fn"].log_prob(prior.nodes[n]["value"]).sum() for n in model.sites)
    expected = sum(model.prior_distribution(s).log_prob(guide_trace.nodes[n]["value"]).sum() for n, s in model.sites.items())
    torch.testing.assert_close(log_prior, expected)
    site = next(iter(model.sites))
    partial = trace(block(guide, hide=[site])).get_trace(batch)
    drawn = trace(replay(model, trace=partial)).get_trace(batch)
    assert site not in partial.nodes and drawn.nodes[site]["value"].shape == model.sites[site].shape
    masked = trace(pyro.poutine.mask(replay(model, trace=guide_trace), mask=False)).get_trace(batch)
    assert masked.nodes["obs"]["mask"] is False
    with pytest.raises(ValueError, match="the model's observed site 'obs' is hidden from the ELBO"):
        Trace_ELBO().loss(block(model, hide=["obs"]), guide, batch)
    with pytest.raises(ValueError, match=rf"no value of the guide's reached the model's site '{site}'"):
        Trace_ELBO().loss(model, block(guide, hide=[site]), batch)
    with pytest.raises(ValueError, match="runs under poutine.mask"), pyro.validation_enabled(False):
        Trace_ELBO().loss(pyro.poutine.mask(model, mask=False), guide, batch)


def _custom_elbo(model, guide, batch):
    """The ELBO of Pyro's 'Customizing SVI objectives' tutorial: the guide traced, the model replayed against it."""
    guide_trace = pyro.poutine.trace(guide).get_trace(batch)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(batch)
    return -(model_trace.log_prob_sum() - guide_trace.log_prob_sum())


def _custom_step(model, guide, batch, params):
    """One step of a training loop of one's own on :func:`_custom_elbo`, with a torch optimizer."""
    optimizer = torch.optim.Adam(params, lr=1e-3)
    optimizer.zero_grad()
    loss = _custom_elbo(model, guide, batch)
    loss.backward()
    optimizer.step()
    return loss.item()


def test_a_training_loop_of_ones_own_through_a_replay_is_checked_at_its_optimizer_step():
    """Since 9b2ce90 a replay of one's own got none of an ELBO's checks, also where a loss of one's own trained through
    it (Pyro's custom objectives: trace the guide, replay the model, -(log p - log q), a torch optimizer's step): over 3
    batches of a model without num_data nothing warned, poutine.block(model, hide=['obs']) dropped the data term (5844.32
    for 5861.02), poutine.scale(model, N / B) gave 1543.51 where the minibatch ELBO with num_data=48, B=8 is 285.00, and
    a guide of another model object was trained against this model's network. An optimizer step after a backward pass
    through such a replay is now a training step: the guide of another model object is refused before the step moves
    anything, the others are warned naming the problem as an ELBO's step does. A replay only read (the prior's log
    density, even differentiated) says nothing, and neither does SVI's step after it."""
    import warnings

    data = toy_data(n=24, batch=8)

    def point_params(model, guide):
        return [p for p in guide.parameters() if p.requires_grad] + [p for _, p in model.named_point_parameters()]

    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5)  # no num_data
    guide = MeanFieldGuide(model, b="normal")
    with pytest.warns(UserWarning, match=r"the model has no num_data, and an ELBO trained outside fit \(pyro.infer.SVI, a "
                                         r"loop of your own\) steps through 2 batches") as caught:
        for batch in data:
            _custom_step(model, guide, batch, point_params(model, guide))
    assert sum("has no num_data" in str(w.message) for w in caught) == 1

    def sized(make_guide=lambda m: MeanFieldGuide(m, b="normal")):
        model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5, num_data=48)
        return model, make_guide(model)

    block, replay, trace = pyro.poutine.block, pyro.poutine.replay, pyro.poutine.trace
    model, guide = sized()
    with pytest.warns(UserWarning, match=r"an optimizer step trains through a replay of your own .* in which the model's "
                                         r"observed site 'obs' is hidden from the ELBO"):
        _custom_step(block(model, hide=["obs"]), guide, data[0], point_params(model, guide))
    model, guide = sized(MAPGuide)
    with pytest.warns(UserWarning, match=r"in which the model's weight sites are scaled by 6 \(kl_weight, poutine.scale\), "
                                         r"but the guide's site .* by 1 .*LoraModel\(\.\.\., num_data=len\(training set\)\)"):
        _custom_step(pyro.poutine.scale(model, 48 / 8), guide, data[1], point_params(model, guide))
    model, guide = sized()
    with pytest.warns(UserWarning, match=r"in which no value of the guide's reached the model's site"):
        _custom_step(model, block(guide, hide=[next(iter(model.sites))]), data[0], point_params(model, guide))

    model, guide = sized()
    foreign = MeanFieldGuide(LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5, num_data=48),
                             b="normal")
    params = point_params(model, foreign)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"cannot train through a replay of your own .* on another model object than the "
                                         "one it was built on"):
        _custom_step(model, foreign, data[0], params)
    assert all(torch.equal(a, p) for a, p in zip(before, params))  # refused before the step moved anything

    model, guide = sized()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for batch in data:  # the same loop, right: nothing to say
            _custom_step(model, guide, batch, point_params(model, guide))
        guide_trace = trace(guide).get_trace(data[0])  # the prior's log density at the guide's draw, and its gradient
        trace(replay(block(model, hide=["obs"]), trace=guide_trace)).get_trace(data[0]).log_prob_sum().backward()
        SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO()).step(data[0])
        torch.optim.Adam(point_params(model, guide), lr=1e-3).step()


def test_trace_tail_adaptive_elbo_is_refused_as_unusable():
    """TraceTailAdaptive_ELBO(vectorize_particles=True) was refused saying 'use num_particles without vectorizing', a
    path on which Pyro itself raises NotImplementedError (it runs over vectorized particles only)."""
    model, guide = build("meanfield")
    batch = toy_data(n=8, batch=8)[0]
    with pytest.raises(NotImplementedError):
        pyro.infer.TraceTailAdaptive_ELBO(num_particles=2).differentiable_loss(model, guide, batch)
    elbo = pyro.infer.TraceTailAdaptive_ELBO(num_particles=2, vectorize_particles=True)
    with pytest.raises(ValueError, match=r"TraceTailAdaptive_ELBO cannot be used with pyro_lora: Pyro computes it over "
                                         r"vectorized particles only .*RenyiELBO") as refused:
        elbo.differentiable_loss(model, guide, batch)
    assert "without vectorizing" not in str(refused.value)


def test_weight_sites_reparametrised_are_checked_through_their_latent_replacements():
    """poutine.reparam(LocScaleReparam) makes the weight sites observed, their randomness in "<site>_decentered": a guide
    over those ignoring kl_weight gave nll + log q - beta log p, and one missing a site drew it from its prior, both
    accepted; the checks now follow the weight sites to the sites the reparam drew in their place."""
    from pyro.infer.reparam import LocScaleReparam

    model, _ = build("map")
    batch = toy_data(n=8, batch=8)[0]
    names = list(model.sites)
    reparametrised = pyro.poutine.reparam(model, config={n: LocScaleReparam(centered=0.0) for n in names})

    def guide(batch, kl_weight=1.0, skip=None):  # a user's guide, unscaled: as a Pyro autoguide, it ignores kl_weight
        for n in names:
            if n != skip:
                pyro.sample(f"{n}_decentered", pyro.distributions.Normal(torch.zeros(model.sites[n].shape), 0.05).to_event(3))

    with pytest.raises(ValueError, match=rf"scaled by 0.1 .* but the guide's site '{names[0]}_decentered' by 1 "):
        Trace_ELBO().loss(reparametrised, guide, batch, kl_weight=0.1)
    with pytest.raises(ValueError, match=rf"no value of the guide's reached the model's site '{names[0]}_decentered'"):
        Trace_ELBO().loss(reparametrised, lambda batch: guide(batch, skip=names[0]), batch)
    pyro.set_rng_seed(0)  # the guide scaled alike: the beta-ELBO
    loss = Trace_ELBO().loss(reparametrised, pyro.poutine.scale(guide, 0.1), batch, kl_weight=0.1)
    pyro.set_rng_seed(0)
    trace = pyro.poutine.trace(guide).get_trace(batch)
    trace.compute_log_prob()
    z = {n: trace.nodes[f"{n}_decentered"]["value"] for n in names}
    log_q = sum(trace.nodes[f"{n}_decentered"]["log_prob_sum"] for n in names)
    log_p = sum(torch.distributions.Normal(0.0, 1.0).log_prob(v).sum() for v in z.values())
    with torch.no_grad():
        logits = model.logits(batch, {n: 0.5 * v for n, v in z.items()})  # prior std 0.5: the site is 0.5 z
        nll = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum") * model.num_data / 8
    assert loss == pytest.approx(float(nll + 0.1 * (log_q - log_p)), rel=1e-5)


def test_trace_enum_elbo_with_a_fresh_autoguide_is_no_blocked_replay():
    """TraceEnum_ELBO runs the guide under poutine.queue's replay of an empty trace, and a fresh AutoNormal runs the model
    inside it (its prototype): the model read that as the ELBO's replay and refused a 'poutine.block'. Nothing
    enumerated, its loss is Trace_ELBO's; so for a fresh AutoNormal replayed against a trace, and a guide of one's own
    running the model inside it (blocked); a guide really blocked is still refused."""
    model, guide = build("map")
    batch = toy_data(n=8, batch=8)[0]
    losses = []
    for elbo in (pyro.infer.TraceEnum_ELBO(max_plate_nesting=1), Trace_ELBO()):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        auto = pyro.infer.autoguide.AutoNormal(model, init_scale=1e-2)
        losses.append(elbo.loss(model, auto, batch))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    SVI(model, auto, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)).step(batch)
    trace = pyro.poutine.trace(auto).get_trace(batch)
    pyro.poutine.replay(pyro.infer.autoguide.AutoNormal(model), trace=trace)(batch)  # its prototype run is no replay

    def running_the_model(batch):
        pyro.poutine.block(model)(batch)  # e.g. to read the prior's draws
        return guide(batch)

    pyro.set_rng_seed(0)
    own = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).loss(model, running_the_model, batch)
    pyro.set_rng_seed(0)
    assert own == pytest.approx(Trace_ELBO().loss(model, running_the_model, batch), rel=1e-6)
    site = next(iter(model.sites))
    with pytest.raises(ValueError, match=rf"no value of the guide's reached the model's site '{site}'"):
        pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).loss(model, pyro.poutine.block(auto, hide=[site]), batch)
    pyro.clear_param_store()


def test_kl_weight_takes_numpy_and_tensor_numbers_and_is_checked_before_any_forward():
    import numpy as np

    model, guide = build("map")
    data = toy_data(n=8, batch=8)
    pyro.set_rng_seed(0)
    reference = fit(model, guide, data, kl_weight=0.5, progress=False)
    for weight in (np.float32(0.5), torch.tensor(0.5), np.array([0.5])):
        model, guide = build("map")
        pyro.set_rng_seed(0)
        assert fit(model, guide, data, kl_weight=weight, progress=False) == reference
    forwards = []
    model.net.register_forward_hook(lambda *args: forwards.append(1))
    with pytest.raises(ValueError, match="kl_weight gave 0 at step 0: it must be a positive finite number"):
        fit(model, guide, data, kl_weight=0, progress=False)
    assert forwards == []


def test_predictive_with_a_last_layer_laplace_is_refused_as_predict_refuses_it():
    """Its samples are the MAP's LoRA: Predictive returned the MAP's predictions as a posterior predictive."""
    from pyro_lora.guides import LastLayerLaplaceGuide

    model, _ = build("map")
    guide = LastLayerLaplaceGuide(model).fit(toy_data(n=8, batch=8), progress=False)
    batch = toy_data(n=8, batch=8)[0]
    with pytest.raises(ValueError, match=r"Predictive with this LastLayerLaplaceGuide would draw its LoRA sites only.*predict_glm"):
        pyro.infer.Predictive(model, guide=guide, num_samples=2)(batch)
    with pytest.raises(ValueError, match=r"Predictive with this LastLayerLaplaceGuide"):  # a subclass, drawing unmasked
        pyro.infer.predictive.WeighedPredictive(model, guide=guide, num_samples=2)(batch)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())  # an ELBO without gradients is no Predictive
    assert svi.evaluate_loss(batch) == pytest.approx(Trace_ELBO().loss(model, guide, batch))


@pytest.mark.parametrize("elbo, why", [
    (pyro.infer.TraceGraph_ELBO(), "has no differentiable_loss"), (pyro.infer.RenyiELBO(), "has no differentiable_loss"),
    (pyro.infer.JitTrace_ELBO(), "JIT-compiles the loss"),
])
def test_fit_refuses_an_elbo_it_cannot_step_and_points_at_svi(elbo, why):
    model, guide = build("meanfield")
    with pytest.raises(ValueError, match=f"fit cannot train with {type(elbo).__name__}: it {why}.*; fit takes Trace_ELBO"):
        fit(model, guide, toy_data(n=8, batch=8), elbo=elbo, progress=False)


def test_num_data_below_the_batch_is_named():
    """Pyro's own message blamed subsample sizes of the model and the guide ("16 vs 10")."""
    net = tiny_bert(num_labels=2)
    model = LoraModel(net, SequenceClassification(), prior=0.5, num_data=4)
    with pytest.raises(ValueError, match="num_data=4 is below this batch's 8 rows"):
        fit(model, MAPGuide(model), toy_data(n=8, batch=8), progress=False)


def test_labels_conditioned_on_obs_get_the_checks_of_batch_labels():
    """poutine.condition(model, data={"obs": y}) skipped the label checks: -100 rows scored as examples (the N/B scale
    counting them), a num_data of 4 under an 8-row batch taken as scale 1; a token-level likelihood, which derives its
    observed tokens from batch["labels"], refuses a value handed to "obs"."""
    model, guide = build("map")
    batch = toy_data(n=8, batch=8)[0]
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    y = batch["labels"].clone()
    y[:3] = -100
    with pytest.raises(ValueError, match="labels hold negative values"):
        Trace_ELBO().loss(pyro.poutine.condition(model, data={"obs": y}), guide, unlabelled)
    small = LoraModel(model.net, SequenceClassification(), prior=0.5, num_data=4)
    with pytest.raises(ValueError, match="num_data=4 is below this batch's 8 rows"):
        Trace_ELBO().loss(pyro.poutine.condition(small, data={"obs": batch["labels"]}), MAPGuide(small), unlabelled)
    pyro.set_rng_seed(0)  # labels that pass the checks: the same loss either way
    conditioned = Trace_ELBO().loss(pyro.poutine.condition(model, data={"obs": batch["labels"].clone()}), guide, unlabelled)
    pyro.set_rng_seed(0)
    assert conditioned == pytest.approx(Trace_ELBO().loss(model, guide, batch), rel=1e-6)
    lm = LoraModel(tiny_llama(), CausalLM(), prior=0.5)
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    tokens = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with pytest.raises(ValueError, match="derives the observed tokens from batch\\['labels'\\]"):
        Trace_ELBO().loss(pyro.poutine.condition(lm, data={"obs": ids[:, 1:]}), MAPGuide(lm), tokens)


def test_a_pyro_autoguide_trains_with_svi_and_is_refused_by_fit_with_a_pointer():
    model, _ = build("map")
    model.net.train()
    auto = pyro.infer.autoguide.AutoNormal(model, init_scale=1e-3)
    head = [p for n, p in model.named_point_parameters() if "classifier" in n]
    before = [p.detach().clone() for p in head]
    svi = SVI(model, auto, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for b in toy_data(n=16, batch=8):
        svi.step(b)
    assert head and all(not torch.equal(p, q) for p, q in zip(head, before))
    with pytest.raises(ValueError, match="cannot fit with a AutoNormal: .* for a Pyro autoguide, or a guide function of your own, use pyro.infer.SVI"):
        fit(model, auto, toy_data(n=8, batch=8), progress=False)


def test_a_pyro_autoguides_result_is_kept_by_export_adapter_and_its_state_dict(tmp_path):
    """save_guide refused an autoguide pointing at Pyro's SVI, and a restored param store was refused pointing at
    save_guide: a circle with no working path. The network's adapter and trained head (export_adapter of the model)
    and the autoguide's state_dict restore it into fresh objects, predicting the same (the unchecked path beside
    save_guide(autoguide) / load_guide(..., guide=autoguide): tests/test_saving.py)."""
    from peft import PeftModel
    from pyro.infer import Predictive
    from pyro.infer.autoguide import AutoNormal

    from pyro_lora import export_adapter

    data = toy_data(n=16, batch=8)
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5, num_data=16)
    auto = AutoNormal(model, init_scale=1e-2)
    svi = SVI(model, auto, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    head = {n: p.detach().clone() for n, p in model.named_point_parameters()}
    for batch in data * 3:
        svi.step(batch)
    assert head and all(not torch.equal(p, head[n]) for n, p in model.named_point_parameters())  # SVI trained the head
    store = pyro.get_param_store()
    store.save(tmp_path / "params.pt")
    store.load(tmp_path / "params.pt")
    with pytest.raises(ValueError, match=r"a Pyro autoguide's result with pyro_lora.save_guide\(autoguide, folder\) .* "
                                         r"pyro_lora.load_guide\(folder, model, guide=autoguide\)"):
        svi.step(data[0])
    pyro.clear_param_store()
    svi.step(data[0])

    unlabelled = {k: v for k, v in data[0].items() if k != "labels"}
    pyro.set_rng_seed(0)
    before = Predictive(model, guide=auto, num_samples=4, return_sites=["_RETURN"])(unlabelled)["_RETURN"]
    median = model.logits(data[0], auto.median())
    model.write_adapter(auto.median())  # the adapter holds the posterior median: a point estimate peft loads alone
    export_adapter(model, tmp_path / "adapter")
    torch.save(auto.state_dict(), tmp_path / "autoguide.pt")

    pyro.clear_param_store()  # another process
    net = PeftModel.from_pretrained(tiny_bert_base(num_labels=2), tmp_path / "adapter").eval()
    torch.testing.assert_close(net(input_ids=unlabelled["input_ids"], attention_mask=unlabelled["attention_mask"]).logits,
                               median)
    again = LoraModel(net, SequenceClassification(), prior=0.5, num_data=16)
    restored = AutoNormal(again)
    restored(data[0])  # builds its parameters (a labelled batch: "obs" observed)
    restored.load_state_dict(torch.load(tmp_path / "autoguide.pt"))
    pyro.set_rng_seed(0)
    after = Predictive(again, guide=restored, num_samples=4, return_sites=["_RETURN"])(unlabelled)["_RETURN"]
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("kind", ["scalabl", "lora_xs"])
def test_a_pyro_autoguides_result_on_scalabl_or_lora_xs_is_kept_by_export_adapter(tmp_path, kind):
    """export_adapter(model) refused a ScalaBL or LoRA-XS model (its sites have no peft parameter), and save_guide
    refused the autoguide pointing back at export_adapter: two refusals naming each other. Those sites live in the
    autoguide alone; the network holds A, B (ScalaBL's trained, LoRA-XS's from the SVD) and the head, which the
    exported adapter restores exactly: the model rebuilt over it without rotating or re-running the SVD, and a fresh
    autoguide, predict the same samples and the same median."""
    from peft import PeftModel
    from pyro.infer import Predictive
    from pyro.infer.autoguide import AutoNormal

    from pyro_lora import export_adapter
    from pyro_lora.loraxs import LoraXSModel

    def build(net, prepare):  # prepare=False over the restored adapter: its A and B as they are
        if kind == "scalabl":
            return ScalaBLModel(net, SequenceClassification(), prior=0.5, num_data=16, rotate=prepare)
        return LoraXSModel(net, SequenceClassification(), prior=0.5, num_data=16, svd_init=prepare)

    data = toy_data(n=16, batch=8)
    model = build(tiny_bert(num_labels=2, random_b=kind != "lora_xs"), prepare=True)
    auto = AutoNormal(model, init_scale=1e-2)
    svi = SVI(model, auto, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    trained = {n: p.detach().clone() for n, p in model.named_point_parameters()}
    for batch in data * 3:
        svi.step(batch)
    assert all(not torch.equal(p, trained[n]) for n, p in model.named_point_parameters())  # the head (and ScalaBL's A, B)

    unlabelled = {k: v for k, v in data[0].items() if k != "labels"}
    pyro.set_rng_seed(0)
    before = Predictive(model, guide=auto, num_samples=4, return_sites=["_RETURN"])(unlabelled)["_RETURN"]
    median = model.logits(data[0], auto.median())
    export_adapter(model, tmp_path / "adapter")
    torch.save(auto.state_dict(), tmp_path / "autoguide.pt")

    pyro.clear_param_store()  # another process
    again = build(PeftModel.from_pretrained(tiny_bert_base(num_labels=2), tmp_path / "adapter").eval(), prepare=False)
    restored = AutoNormal(again)
    restored(data[0])  # builds its parameters
    restored.load_state_dict(torch.load(tmp_path / "autoguide.pt"))
    pyro.set_rng_seed(0)
    after = Predictive(again, guide=restored, num_samples=4, return_sites=["_RETURN"])(unlabelled)["_RETURN"]
    assert torch.equal(after, before) and not torch.equal(after[0], after[1])  # the same samples, and random ones
    assert torch.equal(again.logits(data[0], restored.median()), median)



def test_an_autodeltas_unwritten_lora_is_refused_like_a_maps_alive_or_collected(tmp_path):
    """A MAP trained as Pyro's AutoDelta with SVI, its median never written into the adapter: export_adapter(model)
    wrote the untrained LoRA beside the trained head (reloaded probabilities 0.069 off the AutoDelta's) and a guide built
    from the adapter started there, without a word. SVI's training is recorded as fit's is: both are refused, the
    autoguide alive or collected, until model.write_adapter(autoguide.median()), after which peft reloads its logits."""
    import gc

    from peft import PeftModel
    from pyro.infer.autoguide import AutoDelta

    from pyro_lora import export_adapter

    data = toy_data(n=16, batch=8)
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5, num_data=16)
    auto = AutoDelta(model)
    svi = SVI(model, auto, pyro.optim.Adam({"lr": 2e-2}), Trace_ELBO())
    for batch in data * 3:
        svi.step(batch)
    median = {k: v.detach().clone() for k, v in auto.median().items()}
    match = (r"head was trained by a Pyro AutoDelta whose LoRA values the adapter does not hold .* "
             r"model.write_adapter\(autoguide.median\(\)\)")

    def refused():
        with pytest.raises(ValueError, match=match):
            export_adapter(model, tmp_path / "adapter")
        with pytest.raises(ValueError, match=match):
            MAPGuide(model)

    refused()
    del auto, svi
    gc.collect()
    refused()
    model.write_adapter(median)
    export_adapter(model, tmp_path / "adapter")
    net = PeftModel.from_pretrained(tiny_bert_base(num_labels=2), tmp_path / "adapter").eval()
    model.net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(input_ids=data[0]["input_ids"], attention_mask=data[0]["attention_mask"]).logits,
                                   model.logits(data[0], median))


def test_an_autoguide_trained_by_svi_owns_the_head_and_is_refused_once_another_guide_retrains_it(tmp_path):
    """An autoguide's head was not followed: after fit(model, MAPGuide(model)) retrained the shared head,
    Predictive(model, guide=autoguide) ran its sites beside the MAP's head (logits 0.18 off its own result) and
    save_guide(autoguide) saved that head. Its SVI steps are followed as a guide of the guides package's: Predictive, a
    validation loss and save_guide refuse it, and its save from before restores its own result."""
    from pyro.infer import Predictive
    from pyro.infer.autoguide import AutoNormal

    from pyro_lora import load_guide

    data = toy_data(n=16, batch=8)
    unlabelled = {k: v for k, v in data[0].items() if k != "labels"}

    def draws(model, auto):
        pyro.set_rng_seed(1)
        return Predictive(model, guide=auto, num_samples=4, return_sites=["_RETURN"])(unlabelled)["_RETURN"]

    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5, num_data=16)
    auto = AutoNormal(model, init_scale=0.05)
    svi = SVI(model, auto, pyro.optim.Adam({"lr": 3e-2}), Trace_ELBO())
    for batch in data * 3:
        svi.step(batch)
    model.net.eval()
    before = draws(model, auto)
    save_guide(auto, tmp_path / "auto")
    model.write_adapter(auto.median())  # the MAP starts from its median: no unwritten LoRA beside the head
    fit(model, MAPGuide(model), data, epochs=2, lr=5e-2, progress=False)
    match = r"with this AutoNormal: the network's point parameters .*classifier.* changed since pyro.infer.SVI trained it"
    with pytest.raises(ValueError, match=match):
        draws(model, auto)
    with pytest.raises(ValueError, match=match):
        svi.evaluate_loss(data[0])
    with pytest.raises(ValueError, match=match):
        save_guide(auto, tmp_path / "after")
    assert not (tmp_path / "after").exists()

    pyro.clear_param_store()
    again = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5, num_data=16)
    restored = AutoNormal(again, init_scale=0.05)
    restored(data[0])
    load_guide(tmp_path / "auto", again, guide=restored)
    again.net.eval()
    torch.testing.assert_close(draws(again, restored), before)
    with torch.no_grad():  # a head changed under a loaded autoguide is refused alike
        next(p for n, p in again.named_point_parameters() if "classifier" in n).add_(0.1)
    with pytest.raises(ValueError, match=r"changed since pyro.infer.SVI trained it or load_guide restored it"):
        draws(again, restored)


def test_an_autoguide_over_another_model_is_refused_the_values_pyros_param_store_holds_for_its_names():
    """Without pyro.clear_param_store(), a fresh AutoNormal over a second model (another network, the same site names
    and shapes) started at the first autoguide's trained locations and shared them: training it moved the first's by
    0.27, and an r=8 autoguide built after a (called) r=4 one took its r=4 parameters. Its first call is refused, naming
    the parameter; after clearing the store it starts afresh and the first is left as it was."""
    from pyro.infer.autoguide import AutoNormal

    data = toy_data(n=16, batch=8)
    first = LoraModel(tiny_bert(num_labels=2, seed=0), SequenceClassification(), prior=0.5, num_data=16)
    g1 = AutoNormal(first)
    svi = SVI(first, g1, pyro.optim.Adam({"lr": 3e-2}), Trace_ELBO())
    for batch in data * 2:
        svi.step(batch)
    trained = {k: v.detach().clone() for k, v in g1.state_dict().items()}
    del svi
    second = LoraModel(tiny_bert(num_labels=2, seed=5), SequenceClassification(), prior=0.5, num_data=16)
    g2 = AutoNormal(second)
    with pytest.raises(ValueError, match=r"cannot start this AutoNormal: Pyro's param store holds 'AutoNormal\.locs\..*"
                                         r"another LoraModel.*pyro.clear_param_store\(\)"):
        g2(data[0])
    g1_alone = AutoNormal(first)
    g1_alone(data[0])  # another autoguide over the same model takes them up, as Pyro means
    pyro.clear_param_store()
    g2 = AutoNormal(second)
    g2(data[0])
    assert not torch.equal(g2.locs.query.lora_A, trained["locs.query.lora_A_unconstrained"])
    assert all(torch.equal(v, trained[k]) for k, v in g1.state_dict().items())

    pyro.clear_param_store()
    small = AutoNormal(LoraModel(tiny_bert(num_labels=2, r=4), SequenceClassification(), prior=0.5, num_data=16))
    small(data[0])  # called, never trained
    large = AutoNormal(LoraModel(tiny_bert(num_labels=2, r=8), SequenceClassification(), prior=0.5, num_data=16))
    with pytest.raises(ValueError, match=r"cannot start this AutoNormal"):
        large(data[0])


def _predicted(model, guide, batch):
    """The model's returns ``[3, ...]`` under ``Predictive`` with ``guide``, its draws seeded 0."""
    from pyro.infer import Predictive

    pyro.set_rng_seed(0)
    return Predictive(model, guide=guide, num_samples=3, return_sites=["_RETURN"])(batch)["_RETURN"]


def _autoguide_and_another_model():
    """Toy batches, a LoraModel over one tiny BERT with an AutoNormal trained on it, and a LoraModel over a second
    checkpoint of the same shapes (both networks in eval mode)."""
    from pyro.infer.autoguide import AutoNormal

    data = toy_data(n=16, batch=8)
    m1 = LoraModel(tiny_bert(num_labels=2, seed=0), SequenceClassification(), prior=0.5, num_data=16)
    g1 = AutoNormal(m1)
    svi = SVI(m1, g1, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for batch in data:
        svi.step(batch)
    m2 = LoraModel(tiny_bert(num_labels=2, seed=1), SequenceClassification(), prior=0.5, num_data=16)
    m1.net.eval()
    m2.net.eval()
    return data, m1, g1, m2


def test_an_autoguide_run_with_another_lora_model_is_refused_before_any_work():
    """An AutoNormal over one LoraModel ran, without a word, under Predictive, an ELBO's loss and SVI steps with another
    (a second checkpoint of the same shapes): trained so and saved, it recorded the first model's base while its sites
    were fitted on the second (Predictive on the first: accuracy 0.38, on the second 1.00). Every such run is refused,
    naming the remedy; another object over the same network, sites and head predicts and evaluates as its own (as
    predict allows a guide of the guides package) but is no model to train it on; an autoguide over a function of one's
    own that calls the model, and handlers around either, are the user's and pass."""
    from pyro.infer import Importance, Predictive
    from pyro.infer.autoguide import AutoNormal

    data, m1, g1, m2 = _autoguide_and_another_model()
    batch, unlabelled = data[0], {k: v for k, v in data[0].items() if k != "labels"}
    before = {k: v.detach().clone() for k, v in g1.state_dict().items()}
    remedy = r"build the autoguide over this model \(AutoNormal\(model\)\), or save_guide it and load_guide it"
    other = r"with this AutoNormal: it was built over another LoraModel object"
    with pytest.raises(ValueError, match=rf"cannot run pyro.infer.Predictive {other}, .*base weights differ.*{remedy}"):
        Predictive(m2, guide=g1, num_samples=2)(unlabelled)
    with pytest.raises(ValueError, match=rf"cannot compute an ELBO's loss {other}.*{remedy}"):
        Trace_ELBO().loss(m2, g1, batch)
    with torch.no_grad(), pytest.raises(ValueError, match=rf"cannot compute an ELBO's loss {other}"):
        Trace_ELBO().loss(m2, g1, batch)
    svi2 = SVI(m2, g1, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    with pytest.raises(ValueError, match=rf"cannot compute an ELBO's loss {other}"):
        svi2.evaluate_loss(batch)
    with pytest.raises(ValueError, match=rf"cannot train with pyro.infer.SVI or an ELBO's training loss {other} than "
                                         rf"the model it runs with.*{remedy}"):
        svi2.step(batch)
    with pytest.raises(ValueError, match=rf"cannot run pyro.infer.Importance {other}"):
        Importance(m2, g1, num_samples=2).run(batch)
    assert all(torch.equal(v, before[k]) for k, v in g1.state_dict().items())  # refused before any step

    # another object over the same network and sites: its own for predicting and evaluating, not for training
    twin = LoraModel(m1.net, SequenceClassification(), prior=0.5, num_data=16)
    torch.testing.assert_close(_predicted(twin, g1, unlabelled), _predicted(m1, g1, unlabelled))
    Trace_ELBO().loss(twin, g1, batch)
    with pytest.raises(ValueError, match=rf"cannot train with pyro.infer.SVI .*{other} than the model it runs with"):
        SVI(twin, g1, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(batch)
    other_prior = LoraModel(m1.net, SequenceClassification(), prior=2.0, num_data=16)
    with pytest.raises(ValueError, match=rf"cannot run pyro.infer.Predictive {other}, which differs.*prior"):
        Predictive(other_prior, guide=g1, num_samples=2)(unlabelled)

    # the user's own: a function calling the model, handlers around the model and the guide
    def wrapped(batch):
        return m2(batch)

    half = 0.5
    SVI(pyro.poutine.scale(m1, half), pyro.poutine.scale(g1, half), pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(batch)
    pyro.clear_param_store()  # g1's names are taken: a fresh AutoNormal over m2's network would be refused its start
    own = AutoNormal(wrapped)
    SVI(wrapped, own, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(batch)
    Predictive(wrapped, guide=own, num_samples=2)(unlabelled)


def test_an_autoguide_called_by_a_guide_function_is_checked_against_the_model_it_runs_with():
    """A guide function of one's own calling an autoguide (def guide(b): return autoguide(b), a lambda) hid it from
    the check above: Predictive(B, guide=wrapper) over an autoguide trained on A predicted with B's untrained head
    (P(class 1) 0.500 where A's posterior gives 0.817), and SVI(B, wrapper) trained it beside B's head while save_guide
    recorded A's (restored: accuracy 0.25 where it was 0.75). The autoguide is found by its parameters in the guide
    trace an ELBO replays, and by its draws under Predictive, and refused as when passed itself; over its own model,
    or a twin of it for prediction, the wrapper predicts as the autoguide does."""
    from pyro.infer import Importance, Predictive

    data, m1, g1, m2 = _autoguide_and_another_model()
    batch, unlabelled = data[0], {k: v for k, v in data[0].items() if k != "labels"}

    def wrapper(batch):
        return g1(batch)

    before = {k: v.detach().clone() for k, v in g1.state_dict().items()}
    other = r"with this AutoNormal: it was built over another LoraModel object"
    remedy = r"build the autoguide over this model \(AutoNormal\(model\)\)"
    for guide in (wrapper, lambda b: g1(b), pyro.poutine.scale(wrapper, 1.0)):
        with pytest.raises(ValueError, match=rf"cannot run pyro.infer.Predictive {other}, .*base weights differ.*{remedy}"):
            Predictive(m2, guide=guide, num_samples=2)(unlabelled)
        with pytest.raises(ValueError, match=rf"cannot run pyro.infer.Predictive {other}"):  # the model in a function too
            Predictive(lambda b: m2(b), guide=guide, num_samples=2)(unlabelled)
        with pytest.raises(ValueError, match=rf"cannot compute an ELBO's loss {other}.*{remedy}"):
            Trace_ELBO().loss(m2, guide, batch)
        with pytest.raises(ValueError, match=rf"cannot train with pyro.infer.SVI or an ELBO's training loss {other} "
                                             rf"than the model it runs with.*{remedy}"):
            SVI(m2, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(batch)
        with pytest.raises(ValueError, match=rf"cannot run pyro.infer.Importance {other}"):
            Importance(m2, guide, num_samples=2).run(batch)
    drawn = Predictive(m1, guide=wrapper, num_samples=2, return_sites=list(m1.sites))(unlabelled)
    with pytest.raises(ValueError, match=rf"cannot run pyro.infer.Predictive {other}"):  # its draws fed back alike
        Predictive(m2, posterior_samples=drawn)(unlabelled)
    assert all(torch.equal(v, before[k]) for k, v in g1.state_dict().items())  # refused before any step

    # over its own model, or a twin of it for prediction: the wrapper predicts as the autoguide itself
    twin = LoraModel(m1.net, SequenceClassification(), prior=0.5, num_data=16)
    ours = _predicted(m1, g1, unlabelled)
    for model in (m1, twin):
        torch.testing.assert_close(_predicted(model, wrapper, unlabelled), ours)
        Trace_ELBO().loss(model, wrapper, batch)
    with pytest.raises(ValueError, match=rf"cannot train with pyro.infer.SVI .*{other} than the model it runs with"):
        SVI(twin, wrapper, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(batch)
    SVI(m1, wrapper, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(batch)
    assert any(not torch.equal(v, before[k]) for k, v in g1.state_dict().items())  # trained through the wrapper


def test_mcmc_over_a_network_with_dropout_on_is_refused_and_importance_warns():
    """After the SVI recipe's model.net.train(), NUTS ran without a word on a random potential energy (5 calls at the
    same LoRA values: 1123.885 to 1123.929), an acceptance test of which is no valid MCMC; Importance weighed draws by a
    likelihood with dropout noise (its log evidence 0.032 off eval mode's), silent too. MCMC is refused before any
    step, Importance warns as Predictive does; an SVI step with dropout on (MC-dropout style) stays silent."""
    import warnings

    from pyro.infer import MCMC, NUTS, Importance
    from pyro.infer.autoguide import AutoNormal
    from pyro.infer.mcmc.util import initialize_model

    batch = toy_data(n=8, batch=8)[0]
    model = LoraModel(tiny_bert(num_labels=2, r=1), SequenceClassification(), random="A", prior=0.5, num_data=None)
    model.net.train()
    refused = r"MCMC runs the network with dropout on \(\d+ modules in training mode, e\.g\. .*\): the potential energy"
    with pytest.raises(ValueError, match=refused + r".*call model\.net\.eval\(\) before MCMC"):
        MCMC(NUTS(model), num_samples=1, warmup_steps=1, disable_progbar=True).run(batch)
    with pytest.raises(ValueError, match=refused):
        initialize_model(model, model_args=(batch,))
    pyro.clear_param_store()
    guide = AutoNormal(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(batch)
    with pytest.warns(UserWarning, match=r"pyro.infer.Importance runs the network with dropout on .*call model\.net\."
                                         r"eval\(\) before Importance"):
        Importance(model, guide=guide, num_samples=2).run(batch)
    model.net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        Importance(model, guide=guide, num_samples=2).run(batch)
        pyro.set_rng_seed(0)
        mcmc = MCMC(NUTS(model), num_samples=2, warmup_steps=1, disable_progbar=True)
        mcmc.run(batch)
    assert mcmc.get_samples()["query.lora_A"].shape == (2, *model.sites["query.lora_A"].shape)


def test_nuts_on_a_minibatch_or_jit_compiled_is_refused_naming_num_data_or_jit_compile():
    """NUTS on a batch of 8 of a model built with num_data=16 raised Pyro's "HMC/NUTS does not support model with
    subsample sites" (no word of num_data); NUTS(jit_compile=True) was refused naming "JitTrace_ELBO and its kin"."""
    from pyro.infer import MCMC, NUTS

    batch = toy_data(n=8, batch=8)[0]
    model = LoraModel(tiny_bert(num_labels=2, r=1), SequenceClassification(), random="A", prior=0.5, num_data=16)
    with pytest.raises(ValueError, match=r"HMC/NUTS cannot sample this model: its 'data' plate subsamples, since "
                                         r"num_data=16 differs from the batch's 8 rows.*num_data=None"):
        MCMC(NUTS(model), num_samples=1, warmup_steps=1, disable_progbar=True).run(batch)
    model = LoraModel(tiny_bert(num_labels=2, r=1), SequenceClassification(), random="A", prior=0.5, num_data=8)
    with pytest.raises(ValueError, match=r"JIT-traced \(an MCMC kernel's jit_compile=True.*jit_compile=False"):
        MCMC(NUTS(model, jit_compile=True), num_samples=1, warmup_steps=1, disable_progbar=True).run(batch)


def test_laplace_approximation_runs_through_sdpa_attention_as_through_eager():
    """AutoLaplaceApproximation.laplace_approximation on BERT's default sdpa attention raised torch's "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented" (its Hessian differentiates twice):
    the model runs sdpa's math kernel there, and the covariance is eager attention's."""
    from pyro.infer.autoguide import AutoLaplaceApproximation

    batch = toy_data(n=8, batch=8)[0]
    batch["attention_mask"][:4, -2:] = 0  # padding: a masked attention too

    def laplace(attention):
        net = tiny_bert(num_labels=2, r=1)
        net.base_model.model.config._attn_implementation = attention
        model = LoraModel(net, SequenceClassification(), random="A", prior=0.5, num_data=8)
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoLaplaceApproximation(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        for _ in range(3):
            svi.step(batch)
        return guide.laplace_approximation(batch)

    sdpa, eager = laplace("sdpa"), laplace("eager")
    assert torch.allclose(sdpa.loc, eager.loc, atol=1e-5)
    assert torch.allclose(sdpa.scale_tril, eager.scale_tril, atol=1e-4)
    # with dropout on, two calls at one loc gave covariances 2.8e-4 apart, without a word: the Hessian of a random loss
    model = LoraModel(tiny_bert(num_labels=2, r=1), SequenceClassification(), random="A", prior=0.5, num_data=8)
    pyro.clear_param_store()
    guide = AutoLaplaceApproximation(model)
    SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(batch)
    model.net.train()
    with pytest.raises(ValueError, match=r"AutoLaplaceApproximation.laplace_approximation runs the network with dropout "
                                         r"on .*its Hessian would be one of a random loss.*call model\.net\.eval\(\)"):
        guide.laplace_approximation(batch)


def test_pyro_optimizer_state_of_objects_of_another_process_is_refused_and_of_live_ones_resumes():
    """Adam's moments saved with optim.get_state/save and loaded after a restart waited for names no object of the new
    process has (pyro_lora's names hold a per-process counter): the optimizer started afresh without a word (the head
    0.024 off the resumed run)."""
    import gc

    from conftest import random_batch

    batch = {**random_batch(), "labels": torch.tensor([0, 1, 2])}

    def svi(model, guide, optim):
        return SVI(model, guide, optim, Trace_ELBO())

    pyro.clear_param_store()
    model = LoraModel(tiny_bert(), SequenceClassification(), random="A", num_data=3)
    guide, optim = MAPGuide(model), pyro.optim.Adam({"lr": 1e-2})
    svi(model, guide, optim).step(batch)
    state = optim.get_state()
    resumed = pyro.optim.Adam({"lr": 1e-2})  # the same live objects: their moments are taken up
    resumed.set_state(state)
    svi(model, guide, resumed).step(batch)
    assert not resumed._state_waiting_to_be_consumed
    del model, guide
    gc.collect()
    pyro.clear_param_store()
    model = LoraModel(tiny_bert(), SequenceClassification(), random="A", num_data=3)  # "after a restart"
    loaded = pyro.optim.Adam({"lr": 1e-2})
    loaded.set_state(state)
    with pytest.raises(ValueError, match=r"optimizer of this SVI holds state loaded for \d+ pyro_lora param\(s\) of no "
                                         r"object in this process \('pyro_lora:.*this step trains 'pyro_lora:MAPGuide\..*"
                                         r"fit\(\.\.\., checkpoint_dir=\.\.\., resume=True\)"):
        svi(model, MAPGuide(model), loaded).step(batch)


def test_condition_on_some_lora_sites_with_an_autoguide_over_the_others_trains_that_elbo():
    """Pyro's way of holding some latents fixed, ``poutine.condition`` on the B sites with an autoguide over the A
    sites, was refused as values "drawn for another model" that would leave the A sites drawn from the prior, where
    the guide supplies them. Its loss is the random="A" model's (B held in the network) less log p(B); a guide drawing
    the held sites too is refused (their draws unused, the ELBO would widen q there without bound)."""
    from pyro import poutine
    from pyro.infer.autoguide import AutoNormal

    data = toy_data(n=16, batch=8)
    gen = torch.Generator().manual_seed(1)
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.7, num_data=16)
    fixed = {n: 0.2 * torch.randn(site.shape, generator=gen) for n, site in model.sites.items() if n.endswith("lora_B")}
    held = poutine.condition(model, data=fixed)
    plain = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), random="A", prior=0.7, num_data=16)
    with torch.no_grad():  # B held in the network, layer by layer
        for i, layer in enumerate(plain.net.base_model.model.bert.encoder.layer):
            for kind in ("query", "value"):
                getattr(layer.attention.self, kind).lora_B["default"].weight.copy_(fixed[f"{kind}.lora_B"][i])

    def loss(m):
        pyro.clear_param_store()
        guide = AutoNormal(m)
        guide(data[0])
        pyro.set_rng_seed(3)
        return Trace_ELBO().loss(m, guide, data[0]), guide

    (got, guide), (reference, _) = loss(held), loss(plain)
    log_prior_b = sum(torch.distributions.Normal(0.0, 0.7).log_prob(v.double()).sum().item() for v in fixed.values())
    assert got == pytest.approx(reference - log_prior_b, rel=1e-5)
    assert {n.split(".", 1)[1].rsplit("_", 1)[0] for n, _ in guide.named_parameters()} == {"query.lora_A", "value.lora_A"}
    svi = SVI(held, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    assert all(math.isfinite(svi.step(batch)) for batch in data)
    # and used: Predictive's runs that only learn the model's shapes drew the A sites from the prior and were refused
    samples = {n: v.expand(3, *v.shape) for n, v in guide.median(data[0]).items()}
    for predictive in (Predictive(held, guide=guide, num_samples=3), Predictive(held, posterior_samples=samples)):
        assert predictive(data[0])["obs"].shape == (3, 8)
    with pytest.raises(ValueError, match=r"for 2 of the model's 4 weight sites, not for 2 .*and no guide or sampler "
                                         "supplies the others"):
        Predictive(model, posterior_samples={n: v.expand(3, *v.shape) for n, v in fixed.items()})(data[0])
    with pytest.raises(ValueError, match=r"the guide draws '\w+\.lora_B', which poutine.condition holds fixed in the model "
                                         r"\(2 such sites\).*build the guide over the free sites only"):
        other = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.7, num_data=16)
        Trace_ELBO().loss(poutine.condition(other, data=fixed), MeanFieldGuide(other), data[0])


@pytest.mark.parametrize("first,second", [(dict(random="A"), dict(random="AB")), (dict(random="B"), dict(random="AB")),
                                          (dict(group="kind"), dict(group="matrix"))])
@pytest.mark.parametrize("stepped", [True, False])
def test_two_models_on_one_network_each_train_their_own_guide_by_svi(first, second, stepped):
    """A random="A" mean-field beside a random="AB" one on the same network (or group="kind" beside "matrix"): the
    second's first SVI step failed with a bare KeyError, its training record read through the first guide's mean
    against the second model's sites."""
    net = tiny_bert(num_labels=2)
    batch = next(iter(toy_data(n=8, batch=8)))
    models = [LoraModel(net, SequenceClassification(), prior=0.5, num_data=32, **kw) for kw in (first, second)]
    guides = [MeanFieldGuide(models[0], init_scale=0.3), MeanFieldGuide(models[1], b="normal", init_scale=0.3)]
    if stepped:
        SVI(models[0], guides[0], pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO()).step(batch)
    else:
        TraceMeanField_ELBO().differentiable_loss(models[0], guides[0], batch)
    assert math.isfinite(SVI(models[1], guides[1], pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO()).step(batch))


def test_a_lora_matrix_frozen_by_hand_stays_frozen_and_one_another_models_sites_froze_trains_again():
    """random="A" with every network parameter frozen by hand (a post-hoc SVI of the guide alone): each model call
    switched B's requires_grad back on, and 6 SVI steps moved all 4 B matrices, while the head stayed as frozen."""
    net = tiny_bert(num_labels=2)
    batch = next(iter(toy_data(n=8, batch=8)))
    model = LoraModel(net, SequenceClassification(), prior=0.5, num_data=32, random="A")
    guide = MeanFieldGuide(model, init_scale=0.3)
    for p in net.parameters():
        p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_B" in n}
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    for _ in range(3):
        svi.step(batch)
    after = dict(net.named_parameters())
    assert all(torch.equal(after[n], v) and not after[n].requires_grad for n, v in before.items())
    # sites of another model froze A and B: a model whose B is no site makes it trainable again
    fresh = tiny_bert(num_labels=2)
    both = LoraModel(fresh, SequenceClassification(), prior=0.5, num_data=32, random="AB")
    b_names = [n for n, p in fresh.named_parameters() if "lora_B" in n]
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if n in b_names)
    copied = copy.deepcopy(fresh)  # the network holds which freezes were its sites': a copy carries them
    LoraModel(fresh, SequenceClassification(), prior=0.5, num_data=32, random="A").set_trainable()
    assert all(p.requires_grad for n, p in fresh.named_parameters() if n in b_names) and len(both.sites) == 4
    LoraModel(copied, SequenceClassification(), prior=0.5, num_data=32, random="A")
    assert all(p.requires_grad for n, p in copied.named_parameters() if n in b_names)


def test_compares_setup_gives_every_method_whose_b_is_no_site_a_trainable_b():
    """Setup.restore put requires_grad back as the MAP's random="AB" left it, and the first random="A" method had taken
    B's freeze off the record: every later one trained no B."""
    from conftest import random_batch

    from pyro_lora.experiments.setup import CompareConfig, Setup, train_map

    batches = [random_batch(batch=4, seed=s) | {"labels": torch.tensor([0, 2, 1, 0])} for s in (1, 2, 3)]
    records = [{k: v[i] for k, v in b.items()} for b in batches for i in range(4)]
    setup = Setup(CompareConfig(batch_size=3, epochs=1, lr=1e-2, progress=False), tiny_bert(), None, SequenceClassification(),
                  records[:9], records[9:], [], lambda rs: {k: torch.stack([r[k] for r in rs]) for k in rs[0]})
    train_map(setup)
    for _ in range(3):
        model = setup.lora_model(random="A")
        assert all(p.requires_grad for n, p in setup.net.named_parameters() if "lora_B" in n)
        assert len(model.point_parameters()) == 6  # four B matrices and the head's weight and bias
        setup.restore()
