"""Activation checkpointing (transformers', reentrant and not) gives the same gradients as none, for every guide
trained by SVI, on a tiny Llama and a tiny BERT."""

import pyro
import pytest
import torch
from conftest import random_batch, tiny_bert, tiny_llama
from pyro.infer import Trace_ELBO

from pyro_lora.guides import FlowGuide, MAPGuide, MeanFieldGuide, ScalaBLGuide
from pyro_lora import LoraModel, ScalaBLModel, SequenceClassification, fit
from pyro_lora.likelihoods import CausalLM

GUIDES = {
    "map": lambda m: MAPGuide(m),
    "meanfield": lambda m: MeanFieldGuide(m, b="normal", init_scale=0.3),
    "meanfield_flipout": lambda m: MeanFieldGuide(m, init_scale=0.3, flipout=True),
    "flow": lambda m: FlowGuide(m, init_scale=0.5),
    "scalabl": lambda m: ScalaBLGuide(m, init_scale=0.3),
}


def build(arch, guide):
    torch.manual_seed(0)
    if arch == "llama":
        net, likelihood = tiny_llama(), CausalLM()
        ids = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    else:
        net, likelihood = tiny_bert(num_labels=3), SequenceClassification()
        batch = random_batch() | {"labels": torch.tensor([0, 2, 1])}
    if guide == "scalabl":
        model = ScalaBLModel(net, likelihood, prior=0.5)
    else:
        model = LoraModel(net, likelihood, random="AB", prior=0.5)
    return model, GUIDES[guide](model), batch


def gradients(model, guide, batch, eval_modules=()):
    """Gradients of the negative ELBO w.r.t. the guide's and the network's trainable parameters, the network in training
    mode but for ``eval_modules``."""
    model.net.train()
    for m in eval_modules:
        m.eval()
    params = dict(guide.named_parameters()) | {f"net.{n}": p for n, p in model.named_point_parameters()}
    for p in params.values():
        p.grad = None
    pyro.set_rng_seed(3)
    Trace_ELBO().differentiable_loss(model, guide, batch).backward()
    return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


def _enable(net, reentrant, **kwargs):
    net.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant, **kwargs})


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("guide", sorted(GUIDES))
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_checkpointed_gradients_equal_plain_ones(arch, guide, reentrant):
    model, q, batch = build(arch, guide)
    plain = gradients(model, q, batch)
    _enable(model.net, reentrant)
    assert model.net.get_base_model().is_activation_checkpointing
    checkpointed = gradients(model, q, batch)
    assert plain.keys() == checkpointed.keys()
    site_params = [n for n in plain if not n.startswith("net.")]
    assert site_params and any(plain[n].abs().sum() > 0 for n in site_params)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-4, atol=1e-7, msg=f"{n} differs")


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_flipout_signs_are_redrawn_alike_without_the_checkpoint_restoring_the_rng(reentrant):
    # preserve_rng_state=False: the recomputation runs on another RNG state; flipout's signs (drawn in the forward)
    # must still be those of the first run (they were redrawn: gradients 0.47 off). Llama has no dropout of its own.
    model, q, batch = build("llama", "meanfield_flipout")
    plain = gradients(model, q, batch)
    _enable(model.net, reentrant, preserve_rng_state=False)
    checkpointed = gradients(model, q, batch)
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-4, atol=1e-7, msg=f"{n} differs")


def test_fit_switches_checkpointing_on_for_the_run_and_trains_the_same():
    losses = {}
    for flag in (False, True):
        model, guide, batch = build("llama", "meanfield")
        pyro.set_rng_seed(0)
        losses[flag] = fit(model, guide, [batch] * 3, lr=1e-2, gradient_checkpointing=flag, progress=False)
        assert not model.net.get_base_model().is_activation_checkpointing  # switched off again
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpointing_applied_outside_transformers_is_refused(reentrant):
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model, guide, batch = build("llama", "meanfield")
    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
    apply_activation_checkpointing(
        model.net, checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=impl), check_fn=lambda m: isinstance(m, LlamaDecoderLayer)
    )
    model.net.train()
    with pytest.raises(RuntimeError, match="activation checkpoint that pyro_lora cannot see .* use net.gradient_checkpointing_enable"):
        Trace_ELBO().differentiable_loss(model, guide, batch).backward()
    with torch.no_grad():  # prediction runs no backward: nothing to refuse
        model.logits(batch, guide.mean())


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpointing_by_hand_is_refused_where_only_a_point_matrix_beside_the_handed_ones_trains(reentrant):
    """A posterior over A held fixed (its parameters frozen) while the point B matrices train: the hand-off counted a
    layer as taking gradients only where its handed tensors did, so torch.utils.checkpoint applied by hand recomputed
    the layers at peft's own A (non-reentrant: B's gradient norm 0.0027 where it is 0.0044) or ran them under no_grad
    (reentrant: B never moved), without a word. The reference: the same loss without checkpointing."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    def grads(by_hand):
        torch.manual_seed(0)
        model = LoraModel(tiny_bert(num_labels=3), SequenceClassification(), random="A", prior=0.5)
        guide = MeanFieldGuide(model)
        guide.requires_grad_(False)
        if by_hand:
            for layer in model.net.base_model.model.bert.encoder.layer:
                layer.forward = partial(lambda f, *a, **k: checkpoint(partial(f, **k), *a, use_reentrant=reentrant),
                                        layer.forward)
        batch = random_batch() | {"labels": torch.tensor([0, 2, 1])}
        model.net.train()
        pyro.set_rng_seed(3)
        Trace_ELBO().differentiable_loss(model, guide, batch).backward()
        return {n: p.grad for n, p in model.named_point_parameters() if "lora_B" in n}

    plain = grads(False)
    assert plain and all(g is not None and g.abs().sum() > 0 for g in plain.values())
    with pytest.raises(RuntimeError, match="activation checkpoint that pyro_lora cannot see .* use "
                                           "net.gradient_checkpointing_enable"):
        grads(True)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_a_laplace_over_checkpointing_applied_outside_transformers_is_refused(reentrant):
    """A Laplace hands its mean, which needs no gradient, so the hand-off's check never fired: under a reentrant
    checkpoint_wrapper each layer ran under no_grad, its recorded output became a leaf the logits do not depend on, and
    every A site's curvature came out 0 (log evidence -8.3 where it is -28.9, the GLM predictive the MAP's) without a
    word; a non-reentrant one died in torch's raw CheckpointError. Transformers' own checkpointing fits as without."""
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from transformers.models.bert.modeling_bert import BertLayer

    from pyro_lora.guides import LaplaceGuide

    def fitted(mode):
        model, _, batch = build("bert", "map")
        if mode == "foreign":
            impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
            apply_activation_checkpointing(model.net, checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=impl),
                                           check_fn=lambda m: isinstance(m, BertLayer))
        elif mode == "transformers":
            model.net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        return LaplaceGuide(model, fisher="exact", rank=4).fit([batch], progress=False)

    plain, own = fitted(None), fitted("transformers")
    for a, b in zip(plain.factors, own.factors):
        torch.testing.assert_close(a.small_vals, b.small_vals)
    assert all(float(f.small_vals.sum()) > 0 for f in plain.factors)
    with pytest.raises(ValueError, match=r"(ran with autograd off inside the network's forward|an activation checkpoint "
                                         r"failed under the Laplace's Jacobians).*: torch's activation checkpointing "
                                         r"applied outside transformers .* hides a layer's output from the Jacobians"):
        fitted("foreign")
    # around blocks without LoRA: non-reentrant fits as without; reentrant died in torch's raw '.grad()' RuntimeError
    from transformers.models.bert.modeling_bert import BertIntermediate

    model, _, batch = build("bert", "map")
    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
    apply_activation_checkpointing(model.net, checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=impl),
                                   check_fn=lambda m: isinstance(m, BertIntermediate))
    if reentrant:
        with pytest.raises(ValueError, match=r"an activation checkpoint failed under the Laplace's Jacobians \(When "
                                             r"use_reentrant=True"):
            LaplaceGuide(model, fisher="exact", rank=4).fit([batch], progress=False)
    else:
        mlp = LaplaceGuide(model, fisher="exact", rank=4).fit([batch], progress=False)
        for a, b in zip(plain.factors, mlp.factors):
            torch.testing.assert_close(a.small_vals, b.small_vals)


def test_autolaplace_hessian_under_non_reentrant_checkpointing_recomputes_with_the_same_attention_kernel():
    """laplace_approximation runs the forward under sdpa's math kernel (its second derivative); the checkpoint's
    recomputation in backward ran outside that context, under a fused kernel saving other tensors, and died in torch's
    raw CheckpointError. The recomputation now runs under the kernels of its forward: the covariance is the one without
    checkpointing."""
    from pyro.infer import SVI
    from pyro.infer.autoguide import AutoLaplaceApproximation
    from test_padding import tiny_llama_cls

    def covariance(checkpointing):
        pyro.clear_param_store()
        net = tiny_llama_cls()
        with torch.no_grad():
            net.get_base_model().score.weight.mul_(30.0)
        model = LoraModel(net, SequenceClassification(), random="A", prior=0.1)
        if checkpointing == "torch's own":  # torch's checkpoint itself, use_reentrant unnamed: torch's default, reentrant
            net.get_base_model()._set_gradient_checkpointing(enable=True)
        elif checkpointing == "user's own":  # a function of the user's, non-reentrant, taken at its word
            from functools import partial

            from torch.utils.checkpoint import checkpoint

            def own(function, *args, **kwargs):
                return checkpoint(function, *args, use_reentrant=False, **kwargs)

            net.get_base_model()._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=partial(own))
        elif checkpointing == "1":  # torch reads use_reentrant as a bool
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": 1})
        elif checkpointing:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={} if checkpointing == "unnamed" else
                                              {"use_reentrant": checkpointing == "reentrant"})
        net.train()  # checkpointing runs in training mode; this Llama has no dropout
        ids = torch.randint(1, 64, (4, 6), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 0])}
        pyro.set_rng_seed(0)
        guide = AutoLaplaceApproximation(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        for _ in range(5):
            svi.step(batch)
        return guide.laplace_approximation(batch).get_posterior().covariance_matrix.detach()

    plain = covariance(False)
    for checkpointing in (True, "user's own"):
        torch.testing.assert_close(covariance(checkpointing), plain)
    for reentrant in ("reentrant", "unnamed", "torch's own", "1"):  # kwargs without use_reentrant: torch's checkpoint takes its default, True
        with pytest.raises(ValueError, match=r"transformers' reentrant activation checkpointing \(use_reentrant=True\) "
                                             r"cannot take: switch it off"):  # torch's raw '.grad()' error, in Pyro's Hessian
            covariance(reentrant)


def test_reentrant_checkpointing_reads_transformers_offload_wrapper_as_torchs_checkpoint():
    """transformers' offload=True wraps torch's checkpoint in a function of its own: kwargs without use_reentrant left
    torch's default, reentrant, and were taken as a user's function saying nothing (the raw '.grad()' error again)."""
    from pyro_lora.handoff import reentrant_checkpointing
    from test_padding import tiny_llama_cls

    for kwargs, reentrant in (({}, True), ({"preserve_rng_state": False}, True), ({"use_reentrant": False}, False)):
        net = tiny_llama_cls()
        net.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=True)
        assert reentrant_checkpointing(net.train()) is reentrant, kwargs
        assert not reentrant_checkpointing(net.eval())  # transformers checkpoints in training mode only


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_plain_forwards_beside_handed_ones_under_transformers_checkpointing_are_not_taken_for_foreign(reentrant):
    """The hand-off remembers which layers ran handed weights, to refuse a foreign checkpoint recomputing them without:
    a plain forward (nothing handed) recomputed by transformers' own checkpointing after a handed one, in a later step
    or in the same backward, was refused as foreign. The reference: the same gradients without checkpointing."""
    def grads(checkpointing):
        torch.manual_seed(0)
        model = LoraModel(tiny_bert(num_labels=3), SequenceClassification(), prior=0.5)
        values = {k: v.detach() for k, v in MeanFieldGuide(model).mean().items()}
        if checkpointing:
            model.net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.net.enable_input_require_grads()
        model.net.train()
        batch = random_batch()
        model.logits(batch, values).logsumexp(-1).sum().backward()  # a step with handed weights
        model.net.zero_grad()
        # a plain step, then plain and handed forwards in one backward
        model.logits(batch).logsumexp(-1).sum().backward()
        (model.logits(batch).logsumexp(-1).sum() + model.logits(batch, values).logsumexp(-1).sum()).backward()
        return {n: p.grad.clone() for n, p in model.net.named_parameters() if p.grad is not None}

    plain = grads(False)
    got = grads(True)
    assert plain.keys() == got.keys() and plain
    for name in plain:
        torch.testing.assert_close(got[name], plain[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpointing_by_hand_is_refused_where_only_a_layer_below_the_handed_ones_trains(reentrant):
    """Values held fixed, the network frozen but its word embeddings, LoRA on the feed-forward layers (their inputs
    computed inside the checkpoint): under a reentrant checkpoint applied by hand, the first pass ran without gradients,
    so nothing in the layer seemed to need them, and the recomputation ran peft's own LoRA: the embeddings' gradient
    norm 0.32 where it is 0.20, without a word. The reference: the same plain forward checkpointed, exact."""
    from functools import partial

    from conftest import _randomize_b, tiny_bert_base
    from peft import LoraConfig, get_peft_model
    from torch.utils.checkpoint import checkpoint

    def embedding_grad(by_hand, handed):
        torch.manual_seed(0)
        net = get_peft_model(tiny_bert_base(3), LoraConfig(r=4, lora_alpha=8, target_modules=["intermediate.dense",
                                                                                              "output.dense"]))
        _randomize_b(net)
        model = LoraModel(net.eval(), SequenceClassification(), random="AB", prior=0.5)
        values = {k: v.detach() + 0.3 * torch.randn_like(v) for k, v in MeanFieldGuide(model).mean().items()}
        model.net.requires_grad_(False)
        embedding = model.net.get_base_model().bert.embeddings.word_embeddings.weight.requires_grad_(True)
        if by_hand:
            for layer in model.net.get_base_model().bert.encoder.layer:
                layer.forward = partial(lambda f, h, m=None, e=None, **k: checkpoint(
                    lambda h, m: f(h, m, e, **k), h, m, use_reentrant=reentrant), layer.forward)
        model.net.train()
        logits = model.logits(random_batch(), values if handed else None)
        logits.logsumexp(-1).sum().backward()
        return embedding.grad

    torch.testing.assert_close(embedding_grad(True, False), embedding_grad(False, False), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="activation checkpoint that pyro_lora cannot see"):
        embedding_grad(True, True)


@pytest.mark.parametrize("trainer", ["fit, a point B beside a fixed posterior", "train_ivon"])
def test_reentrant_checkpointing_where_no_input_needs_a_gradient_trains_as_without_it(trainer):
    """transformers 4's gradient_checkpointing_enable on a peft network leaves the embeddings' output without a
    gradient; under reentrant checkpointing a point B beside a fixed posterior then got none (it stayed at its start,
    where it moves 0.04 without checkpointing), and IVON died inside ivon-opt on a None gradient. A scalar that needs
    a gradient now goes through the checkpoint: the run trains as without checkpointing, as with
    net.enable_input_require_grads()."""
    from functools import partial

    from test_training import toy_data
    from torch.utils.checkpoint import checkpoint

    from pyro_lora.guides import train_ivon

    def trained(checkpointing, inputs_need_grad=False):
        torch.manual_seed(0)
        net = tiny_bert(num_labels=2)
        model = LoraModel(net, SequenceClassification(), random="AB" if trainer == "train_ivon" else "A", prior=0.5,
                          num_data=16)
        if checkpointing:
            net.get_base_model()._set_gradient_checkpointing(
                enable=True, gradient_checkpointing_func=partial(checkpoint, use_reentrant=True))
        if inputs_need_grad:
            net.enable_input_require_grads()
        pyro.set_rng_seed(1)
        if trainer == "train_ivon":
            train_ivon(model, toy_data(16, 4), progress=False)
        else:
            guide = MeanFieldGuide(model)
            guide.requires_grad_(False)
            fit(model, guide, toy_data(16, 4), lr=1e-2, progress=False)
        return {n: p.detach().clone() for n, p in net.named_parameters() if "lora_B" in n}

    plain = trained(False)
    start = {n: p.detach().clone() for n, p in tiny_bert(num_labels=2).named_parameters() if "lora_B" in n}
    assert any(not torch.equal(plain[n], start[n]) for n in plain)  # it trains
    for inputs_need_grad in (False, True):
        for n, value in trained(True, inputs_need_grad).items():
            torch.testing.assert_close(value, plain[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_a_model_over_an_adapter_added_later_on_other_modules_is_checkpointed_alike(reentrant):
    """The layers a checkpoint passes handed weights to were found once, when the first LoraModel wrapped it: a second
    adapter's layers on other modules, added later, were recomputed with peft's own weights (refused as checkpointing
    "applied outside transformers", or torch's raw CheckpointError). Its gradients now equal those without
    checkpointing."""
    from peft import LoraConfig

    def second(checkpointing):
        model, guide, batch = build("llama", "meanfield")
        if checkpointing:
            _enable(model.net, reentrant)
        gradients(model, guide, batch)  # the first model's forward wraps the checkpoints
        torch.manual_seed(5)
        model.net.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj"], init_lora_weights=False))
        model.net.set_adapter("b")
        other = LoraModel(model.net, CausalLM(), random="AB", prior=0.5)
        return gradients(other, GUIDES["meanfield"](other), batch)

    plain = second(False)
    for n, g in second(True).items():
        torch.testing.assert_close(g, plain[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_checkpointing_that_does_not_preserve_the_rng_under_dropout_is_refused(arch, reentrant):
    """preserve_rng_state=False recomputed BERT's dropout with other masks in backward: gradients 9e-4 off, no word.
    Llama's functional attention dropout alike; at 0 (its default) the gradients are the plain ones."""
    model, q, batch = build(arch, "map")
    if arch == "llama":
        for m in model.net.modules():
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = 0.0
    plain = gradients(model, q, batch)
    _enable(model.net, reentrant, preserve_rng_state=False)
    if arch == "llama":  # no dropout: nothing to recompute differently
        checkpointed = gradients(model, q, batch)
        assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
        for m in model.net.modules():
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = 0.1
    with pytest.raises(ValueError, match=r"activation checkpointing with preserve_rng_state=False recomputes the dropout "
                                         rf"of {'LlamaDecoderLayer' if arch == 'llama' else 'BertLayer'} .*leave "
                                         r"preserve_rng_state out"):
        gradients(model, q, batch)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_functional_dropout_under_checkpointing_that_does_not_preserve_the_rng_is_refused(reentrant):
    """OPT keeps its dropout rates as floats (dropout, attention_dropout) applied with nn.functional.dropout: missed,
    its gradients were 0.57 off (of 10.3) under preserve_rng_state=False."""
    from peft import LoraConfig, get_peft_model
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.1, attention_dropout=0.1)
    net = get_peft_model(OPTForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = LoraModel(net, CausalLM(), random="AB", prior=0.5)
    ids = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    _enable(model.net, reentrant, preserve_rng_state=False)
    with pytest.raises(ValueError, match=r"preserve_rng_state=False recomputes the dropout of OPTDecoderLayer"):
        gradients(model, MAPGuide(model), batch)


def test_dropout_that_does_not_run_is_no_reason_to_refuse_checkpointing_without_the_rng():
    """A rate read by no forward was refused: Llama's attention_dropout with its attention modules in eval mode, and
    another adapter's lora_dropout (peft runs the active adapter's only); the gradients are the plain ones."""
    from peft import LoraConfig

    model, q, batch = build("llama", "map")
    model.net.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5))
    model.net.set_adapter("default")
    attention = [m for m in model.net.modules() if hasattr(m, "attention_dropout")]
    for m in attention:
        m.attention_dropout = 0.3
    plain = gradients(model, q, batch, attention)
    _enable(model.net, False, preserve_rng_state=False)
    checkpointed = gradients(model, q, batch, attention)
    assert plain and all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
