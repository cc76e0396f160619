"""Sites, weight hand-off, likelihoods and the Pyro model on tiny random networks."""

import subprocess
import sys

import numpy as np
import pyro
import pytest
import torch
from conftest import random_batch, tiny_bert, tiny_llama
from pyro.infer import Trace_ELBO

from pyro_lora.guides import LaplaceGuide, MAPGuide
from pyro_lora.likelihoods import CausalLM, MultipleChoice, SequenceClassification
from pyro_lora.loraxs import LoraXSModel
from pyro_lora.model import LoraModel
from pyro_lora.sites import per_layer


def test_every_entry_refuses_what_is_no_lora_model_by_name():
    """torch.compile(model) of a LoraModel (no nn.Module) is a plain function, and the peft network is no model:
    each entry names what it got (it died in a raw AttributeError deep inside: 'function' has no 'device')."""
    import pyro_lora.guides as G
    from pyro_lora import fit, load_guide, predict
    from pyro_lora.guides.ensemble import reinitialize

    model = LoraModel(tiny_bert(), SequenceClassification(), num_data=8)
    guide, data = MAPGuide(model), [random_batch()]
    ensemble = G.EnsembleGuide(model, num_members=2)
    entries = [
        ("fit", lambda m: fit(m, guide, data, progress=False)), ("predict", lambda m: predict(m, guide, data)),
        ("load a guide", lambda m: load_guide("x", m)), ("train an ensemble", lambda m: G.train_ensemble(m, data)),
        ("train with IVON", lambda m: G.train_ivon(m, data)), ("re-initialise", lambda m: reinitialize(m, 0)),
        ("predict", lambda m: G.predict_ensemble(m, ensemble, data)),
        ("build IVONGuide.from_optimizer", lambda m: G.IVONGuide.from_optimizer(m, None)),
        ("build a TFB guide", lambda m: G.TFBGuide.from_guide(m, guide)),
        ("build a Laplace mixture", lambda m: G.LaplaceMixtureGuide.from_ensemble(ensemble, m)),
    ]
    # every guide class of the package, each built first of all (some read the model's sites before their base)
    classes = [c for c in map(G.__dict__.get, G.__all__) if isinstance(c, type) and issubclass(c, G.LoraGuide)]
    entries += [(f"build {c.__name__}", c) for c in classes if c is not G.LoraGuide]
    assert len(entries) == 10 + 12
    for action, entry in entries:
        with pytest.raises(TypeError, match=f"cannot {action}: the model passed is a function torch.compile returned.*net.compile"):
            entry(torch.compile(model))
        with pytest.raises(TypeError, match=f"cannot {action}: the model passed is a PeftModelForSequenceClassification, "
                                            "not a pyro_lora LoraModel; wrap the peft network first"):
            entry(model.net)


def mc_batch(**kw):
    b = random_batch(**kw)
    b["choice_mask"] = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    b["labels"] = torch.tensor([2, 3, 0])
    return b


def test_sites_group_by_kind_and_matrix():
    net = tiny_llama()
    model = LoraModel(net, CausalLM(), random="AB")
    assert list(model.sites) == ["q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"]
    assert model.sites["q_proj.lora_A"].shape == (2, 4, 32)
    assert model.sites["v_proj.lora_B"].shape == (2, 16, 4)
    name, i = model.matrices["base_model.model.model.layers.1.self_attn.v_proj.lora_B"]
    assert (name, i) == ("v_proj.lora_B", 1)
    per_matrix = LoraModel(tiny_llama(), CausalLM(), random="A", group="matrix")
    assert len(per_matrix.sites) == 4 and all(s.shape == (4, 32) for s in per_matrix.sites.values())


def test_heterogeneous_ranks_form_separate_sites():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    net = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2})
    )
    model = LoraModel(net, CausalLM(), random="A")
    assert sorted(s.shape for s in model.sites.values()) == [(1, 2, 32), (1, 4, 32)]


def test_random_matrices_frozen_others_trainable():
    model = LoraModel(tiny_llama(), CausalLM(), random="A")
    assert all(not p.requires_grad for p in model.random_parameters())
    names = {id(p) for p in model.point_parameters()}
    assert names == {id(p) for n, p in model.net.named_parameters() if "lora_B" in n}


def test_random_and_the_network_are_checked_before_any_work():
    """random=None or 5 raised raw TypeErrors, {"A": 1} was read by its keys, a network of None a raw AttributeError."""
    for bad in (None, 5, {"A": 1}, ["A", 1], "", "AX"):
        with pytest.raises(ValueError, match="random must be a non-empty subset of .*got"):
            LoraModel(tiny_llama(), CausalLM(), random=bad)
    for bad in (None, "net"):
        with pytest.raises(ValueError, match="net must be a peft model with LoRA layers"):
            LoraModel(bad, CausalLM())
    for letters in (["B", "A"], {"A", "B"}, frozenset("AB")):  # any collection of letters, in KINDS' order
        assert list(LoraModel(tiny_llama(), CausalLM(), random=letters).sites) == list(
            LoraModel(tiny_llama(), CausalLM(), random="AB").sites)


def test_outside_context_logits_identical_to_peft():
    net = tiny_llama()
    batch = random_batch()
    before = net(**batch).logits
    model = LoraModel(net, CausalLM())
    after = model.net(**batch).logits
    assert torch.equal(before, after)
    with_values = model.logits(batch | {"labels": batch["input_ids"]}, model.adapter_values())
    torch.testing.assert_close(with_values, before[:, :-1], rtol=1e-5, atol=1e-5)


def test_handed_weights_change_output_and_reset():
    net = tiny_llama()
    model = LoraModel(net, CausalLM())
    batch = random_batch()
    values = {k: torch.randn_like(v) for k, v in model.adapter_values().items()}
    changed = model.logits(batch, values)
    assert not torch.allclose(changed, model.logits(batch))
    # after the context the layers read their parameters again
    assert torch.equal(model.net(**batch).logits[:, :-1], model.logits(batch))


@pytest.mark.parametrize("random", ["A", "B", "AB"])
def test_s_sample_forward_equals_single_forwards(random):
    model = LoraModel(tiny_llama(), MultipleChoice(answer_token_ids=[5, 6, 7, 8]), random=random)
    batch = mc_batch(left_pad=2)
    values = {k: v + 0.1 * torch.randn(3, *v.shape) for k, v in model.adapter_values().items()}
    joint = model.logits(batch, values, num_samples=3)
    singles = torch.stack([model.logits(batch, {k: v[s] for k, v in values.items()}) for s in range(3)])
    torch.testing.assert_close(joint, singles, rtol=1e-5, atol=1e-5)


def test_core_matrix_r_is_applied():
    model = LoraXSModel(tiny_llama(), CausalLM(), svd_init=False)  # the cores between the random LoRA's A and B
    batch = random_batch()
    r = model.sites["q_proj.lora_R"].shape
    eye = {k: torch.eye(s.shape[-1]).expand(s.shape).clone() for k, s in model.sites.items()}
    # R = I reproduces plain LoRA; R = 0 (values=None too: the model's start) removes the LoRA delta entirely
    plain = LoraModel(model.net, CausalLM()).logits(batch)
    torch.testing.assert_close(model.logits(batch, eye), plain, rtol=1e-5, atol=1e-5)
    zero = {k: torch.zeros(s.shape) for k, s in model.sites.items()}
    with model.net.disable_adapter():
        base = model.logits(batch)
    torch.testing.assert_close(model.logits(batch, zero), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.logits(batch), base, rtol=1e-5, atol=1e-5)
    assert r == (2, 4, 4)


def test_letter_logits_last_real_token_left_and_right_padding():
    model = LoraModel(tiny_llama(), MultipleChoice(answer_token_ids=[5, 6, 7, 8]))
    left = mc_batch(left_pad=3)
    right = {k: v.clone() for k, v in left.items()}
    # move row 0's padding to the right: same tokens, same logits
    n = 3
    right["input_ids"][0] = torch.cat([left["input_ids"][0, n:], torch.zeros(n, dtype=torch.long)])
    right["attention_mask"][0] = torch.cat([torch.ones(7 - n), torch.zeros(n)]).long()
    a, b = model.logits(left), model.logits(right)
    torch.testing.assert_close(a[0, :3], b[0, :3], rtol=1e-4, atol=1e-4)
    assert torch.isinf(a[0, 3]) and a[0, 3] < 0
    direct = model.net(input_ids=left["input_ids"][1:2]).logits[0, -1, [5, 6, 7, 8]]
    torch.testing.assert_close(a[1], direct, rtol=1e-5, atol=1e-5)


def test_sequence_classification_logits():
    net = tiny_bert()
    model = LoraModel(net, SequenceClassification())
    batch = random_batch() | {"labels": torch.tensor([0, 1, 2])}
    torch.testing.assert_close(model.logits(batch, model.adapter_values()), net(**random_batch()).logits)
    assert model.logits(batch, {k: v.expand(4, *v.shape) for k, v in model.adapter_values().items()}, 4).shape == (4, 3, 3)


@pytest.mark.parametrize("num_labels, problem_type, match", [
    (1, "regression", r"config.problem_type is 'regression'"),  # one logit: every softmax probability 1
    (1, None, r"config.num_labels is 1"),
    (3, "multi_label_classification", r"config.problem_type is 'multi_label_classification'"),  # sigmoids, no softmax
])
def test_sequence_classification_refuses_regression_and_multi_label_heads(num_labels, problem_type, match):
    net = tiny_bert(num_labels=num_labels)
    net.config.problem_type = problem_type
    with pytest.raises(ValueError, match=match + ".*only single-label classification with >= 2 classes is supported"):
        LoraModel(net, SequenceClassification())
    net.config.problem_type = "single_label_classification"
    if num_labels >= 2:
        LoraModel(net, SequenceClassification())


@pytest.mark.parametrize("kwargs, match", [
    (dict(prior=0.0), "prior must be a finite positive std"),  # fit stopped at step 0 blaming the learning rate
    (dict(prior=-1.0), "prior must be a finite positive std"),
    (dict(prior=float("inf")), "prior must be a finite positive std"),
    (dict(prior=float("nan")), "prior must be a finite positive std"),
    (dict(prior=True), "prior must be a finite positive std"),
    # held as 0 in float32 (log-prior nan) or overflowing every call, each blamed on the learning rate by fit
    (dict(prior=1e-50), r"prior std 1e-50 is beyond float32's reach: .* for std from 1.084e-19 to 1.63e\+18"),
    (dict(prior=1e39), r"prior std 1e\+39 is beyond float32's reach"),
    (dict(prior=1e19), r"prior std 1e\+19 is beyond float32's reach"),  # its draws' log-prior came out -inf or nan
    (dict(prior=torch.tensor(0.5)), r"prior must be a float std.*got a Tensor.*float\(prior\)"),  # failed in fit's first step
    (dict(prior=np.array(0.5)), r"prior must be a float std.*got a ndarray.*give a single std as float\(prior\)"),
    (dict(prior="1.0"), "prior must be a float std.*got a str"),
    (dict(num_data=0), "num_data must be the training set's size, a positive integer"),  # read as "no size"
    (dict(num_data=-5), "num_data must be the training set's size"),
    (dict(num_data=2.5), "num_data must be the training set's size"),
])
def test_a_prior_std_or_data_size_that_cannot_be_is_refused_when_the_model_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraModel(tiny_bert(), SequenceClassification(), **kwargs)


def test_a_prior_dict_or_callable_that_does_not_fit_the_sites_is_refused_when_the_model_is_built():
    """A misspelt site's prior was ignored without a word, a missing one was a KeyError in the first step, a wrong
    event shape an error there."""
    import pyro.distributions as dist

    sites = LoraModel(tiny_bert(), SequenceClassification()).sites
    priors = {n: dist.Normal(torch.zeros(s.shape), 0.5).to_event(len(s.shape)) for n, s in sites.items()}
    first, second = list(sites)[:2]
    partial = {k: v for k, v in priors.items() if k != second}
    with pytest.raises(ValueError, match=rf"the prior dict must name every site and no other: missing \['{second}'\], unknown \[\]"):
        LoraModel(tiny_bert(), SequenceClassification(), prior=partial)
    with pytest.raises(ValueError, match=r"missing \[\], unknown \['query.lora_a'\]"):
        LoraModel(tiny_bert(), SequenceClassification(), prior=priors | {"query.lora_a": priors[first]})
    with pytest.raises(ValueError, match=f"prior of site '{first}' has event shape"):
        LoraModel(tiny_bert(), SequenceClassification(), prior=lambda site: dist.Normal(torch.zeros(3), 1.0).to_event(1))
    batched = {n: dist.Normal(torch.zeros(2, *s.shape), 1.0).to_event(len(s.shape)) for n, s in sites.items()}
    with pytest.raises(ValueError, match=rf"prior of site '{first}' has batch shape \(2,\), expected \(\)"):  # counted twice
        LoraModel(tiny_bert(), SequenceClassification(), prior=batched)
    with pytest.raises(ValueError, match=f"prior of site '{first}' is a NoneType, not a distribution"):
        LoraModel(tiny_bert(), SequenceClassification(), prior=lambda site: None)
    model = LoraModel(tiny_bert(), SequenceClassification(), prior=priors)
    assert model.prior_distribution(sites[first]) is priors[first]


def test_a_numpy_prior_std_is_the_same_float_std():
    """np.float32(0.5) passed the check, then failed in fit ("not callable") and started Laplace at lambda 1."""
    model = LoraModel(tiny_bert(), SequenceClassification(), prior=np.float32(0.5))
    assert type(model.prior) is float and model.prior == 0.5
    assert all(torch.allclose(v, torch.tensor(4.0)) for v in LaplaceGuide(model).prior_precision.values())
    site = next(iter(model.sites.values()))
    x = torch.zeros(site.shape)
    assert torch.allclose(model.prior_distribution(site).log_prob(x), torch.distributions.Normal(0.0, 0.5).log_prob(x).sum())


def test_a_head_narrower_than_its_config_or_retyped_after_building_is_refused_at_the_forward():
    """config.num_labels = 3 over a 1-output classifier (every probability 1: accuracy 1.0 on labels all 0), and a
    problem_type set after the model was built."""
    net = tiny_bert(num_labels=3)
    model = LoraModel(net, SequenceClassification())
    net.config.problem_type = "multi_label_classification"
    with pytest.raises(ValueError, match="problem_type is 'multi_label_classification'"):
        model.logits(random_batch())
    net.config.problem_type = None
    net.base_model.model.classifier.modules_to_save["default"] = torch.nn.Linear(32, 1)
    with pytest.raises(ValueError, match="head gives 1 logit per example"):
        model.logits(random_batch())


def test_model_trace_sites_and_data_scaling():
    model = LoraModel(tiny_bert(), SequenceClassification(), num_data=30)
    batch = random_batch() | {"labels": torch.tensor([0, 1, 2])}
    tr = pyro.poutine.trace(model).get_trace(batch)
    tr.compute_log_prob()
    assert set(model.sites) <= set(tr.nodes)
    obs = tr.nodes["obs"]
    assert obs["scale"] == 10.0
    expected = -torch.nn.functional.cross_entropy(tr.nodes["_RETURN"]["value"], batch["labels"], reduction="none")
    torch.testing.assert_close(obs["log_prob"], 10.0 * expected)  # trace log-probs carry the plate scale


def test_map_guide_elbo_and_kl_weight():
    model = LoraModel(tiny_bert(), SequenceClassification(), prior=0.5)
    guide = MAPGuide(model)
    batch = random_batch() | {"labels": torch.tensor([0, 1, 2])}
    loss = Trace_ELBO().differentiable_loss(model, guide, batch)
    nll = torch.nn.functional.cross_entropy(model.logits(batch, guide.mean()), batch["labels"], reduction="sum")
    log_prior = sum(model.prior_distribution(s).log_prob(guide.mean()[n]) for n, s in model.sites.items())
    torch.testing.assert_close(loss, nll - log_prior)
    half = Trace_ELBO().differentiable_loss(model, guide, batch, kl_weight=0.5)
    torch.testing.assert_close(half, nll - 0.5 * log_prior)
    loss.backward()
    assert all(p.grad is not None for p in guide.parameters())


def test_causal_lm_token_likelihood():
    model = LoraModel(tiny_llama(), CausalLM())
    batch = random_batch()
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][0, :2] = -100
    tr = pyro.poutine.trace(pyro.poutine.condition(model, data=model.adapter_values())).get_trace(batch)
    lp = tr.nodes["obs"]["fn"].log_prob(model.likelihood.observed(batch))
    logits = model.net(**random_batch()).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none").sum(1)
    torch.testing.assert_close(lp, -ce, rtol=1e-5, atol=1e-4)


def test_distribution_log_prob_broadcasts_labels_over_sample_dims():
    """The likelihood's distribution(logits).log_prob(labels), the scoring predict names for CausalLM, raised torch's
    "Expected input batch_size (12) to match target batch_size (4)" for logits of S weight samples [S, B, ...] against
    labels [B, ...]: it broadcasts as torch's Categorical does, -100 labels still add nothing."""
    from torch.distributions import Categorical

    def sampled(model):
        return {k: v + 0.1 * torch.randn(4, *v.shape) for k, v in model.adapter_values().items()}

    torch.manual_seed(0)
    cls = LoraModel(tiny_bert(), SequenceClassification())
    letter = LoraModel(tiny_llama(), MultipleChoice(answer_token_ids=[5, 6, 7, 8]))
    lm = LoraModel(tiny_llama(), CausalLM())
    text = random_batch(left_pad=2)
    text["labels"] = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)
    text["labels"][1, 3] = -100
    for model, batch in [(cls, random_batch() | {"labels": torch.tensor([0, 2, 1])}), (letter, mc_batch(left_pad=2)),
                         (lm, text)]:
        lik = model.likelihood
        logits, labels = model.logits(batch, sampled(model), num_samples=4), lik.observed(batch)
        got = lik.distribution(logits).log_prob(labels)
        loop = torch.stack([lik.distribution(logits[s]).log_prob(labels) for s in range(4)])
        torch.testing.assert_close(got, loop)
        if lik.event_dims:  # token level: each sample's observed tokens summed, -100 left out
            logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).expand(4, -1, -1)[..., None])[..., 0]
            expected = logp.masked_fill(labels == -100, 0).sum(-1)
        else:
            expected = Categorical(logits=logits, validate_args=False).log_prob(labels)
        assert got.shape == (4, 3) and bool((labels == -100).any()) == bool(lik.event_dims)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # more leading dims, and labels with a sample dim of their own, as Categorical broadcasts them
        torch.testing.assert_close(lik.distribution(logits.reshape(2, 2, *logits.shape[1:])).log_prob(labels),
                                   got.reshape(2, 2, 3))
        torch.testing.assert_close(lik.distribution(logits[0]).log_prob(labels.expand(4, *labels.shape)),
                                   got[:1].expand(4, 3))
        for other in (labels[:2], labels[:1]):  # one label for every row: refused, not repeated
            with pytest.raises(ValueError, match=r"labels of shape \([12],.*do not match the logits' \(4, 3"):
                lik.distribution(logits).log_prob(other)


def test_per_layer_is_a_view():
    model = LoraModel(tiny_llama(), CausalLM())
    values = model.adapter_values()
    layers = per_layer(model.sites, values)
    first = next(iter(layers.values()))["A"]
    assert first.data_ptr() == values["q_proj.lora_A"].data_ptr()


def test_bad_inputs_have_clear_errors():
    from transformers import BertConfig, BertForSequenceClassification

    plain = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32))
    with pytest.raises(ValueError, match="no LoRA layers"):
        LoraModel(plain, SequenceClassification())
    model = LoraModel(tiny_bert(), SequenceClassification())
    batch = random_batch()
    with pytest.raises(ValueError, match="random must be"):
        LoraModel(tiny_bert(), SequenceClassification(), random="C")
    from pyro_lora.sites import check_values

    values = model.adapter_values()
    with pytest.raises(ValueError, match="unknown site"):
        check_values(model.sites, values | {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="expects shape"):
        check_values(model.sites, values | {"query.lora_A": torch.zeros(3, 3)})
    values["query.lora_A"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        check_values(model.sites, values)
    model.net.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model.logits(batch, model.adapter_values())
    with pytest.raises(ValueError, match="no 'labels'"):
        model.likelihood.observed(batch)


def _mc_batch(labels, mask):
    b = random_batch(left_pad=2)
    b["choice_mask"] = torch.tensor(mask, dtype=torch.bool)
    b["labels"] = torch.tensor(labels)
    return b


def test_a_multiple_choice_label_on_a_missing_choice_is_refused_by_row():
    """fit blamed the learning rate ('the loss became nan ... likely too high'); predict and the metrics scored it as
    a probability floored at 1e-12 (NLL 10), without a word."""
    from pyro_lora import fit, predict

    model = LoraModel(tiny_llama(r=2), MultipleChoice(answer_token_ids=[5, 6, 7, 8]))
    bad = _mc_batch([2, 3, 3], [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])  # row 2's label is on a missing choice
    message = r"row\(s\) \[2\] of the batch have label\(s\) \[3\], not one of the row's choices"
    with pytest.raises(ValueError, match=message):
        fit(model, MAPGuide(model), [bad], progress=False)
    with pytest.raises(ValueError, match=message):
        predict(model, MAPGuide(model), [bad])
    with pytest.raises(ValueError, match=r"row\(s\) \[0\] of the batch have label\(s\) \[4\]"):
        predict(model, MAPGuide(model), [_mc_batch([4, 0, 1], [[1, 1, 1, 1]] * 3)])
    predict(model, MAPGuide(model), [_mc_batch([2, 3, 1], [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])])


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([1.7, 0.0, 2.0]), r"labels must be integer choice indices of shape \(3,\) \(one per row\), got torch.float32"),
    (torch.tensor([[1], [0], [2]]), r"labels must be integer choice indices of shape \(3,\) .* of shape \(3, 1\)"),
    (torch.tensor([True, False, True]), r"labels must be integer choice indices of shape \(3,\) \(one per row\), got torch.bool"),
])
def test_multiple_choice_labels_that_are_not_indices_are_refused(labels, message):
    from pyro_lora import predict

    model = LoraModel(tiny_llama(r=2), MultipleChoice(answer_token_ids=[5, 6, 7, 8]))
    batch = {**_mc_batch([0, 0, 0], [[1, 1, 1, 1]] * 3), "labels": labels}
    with pytest.raises(ValueError, match=message):
        predict(model, MAPGuide(model), [batch])
    del batch["choice_mask"]
    with pytest.raises(ValueError, match=r"a multiple-choice batch needs 'choice_mask' \[B, K\]"):
        model.logits(batch)


def test_multiple_choice_labels_and_choices_of_other_rows_than_the_inputs_are_refused():
    """labels and choice_mask both of B + 1 rows over B input rows gave torch's "shape '[5, 4]' is invalid for input
    of size 16" (cloze) or scored the rows against other questions' labels."""
    from pyro_lora import predict

    model = LoraModel(tiny_llama(r=2), MultipleChoice(answer_token_ids=[5, 6, 7, 8]))
    batch = _mc_batch([0, 1, 2, 3], [[1, 1, 1, 1]] * 4)  # 4 questions over the 3 input rows of random_batch
    with pytest.raises(ValueError, match=r"the batch has 3 input rows and a choice_mask of shape \(4, 4\), which asks "
                                         r"for 4 in the letter format"):
        predict(model, MAPGuide(model), [batch])


def test_more_choices_than_answer_tokens_is_refused_by_name():
    model = LoraModel(tiny_llama(r=2), MultipleChoice(answer_token_ids=[5, 6, 7, 8]))
    with pytest.raises(ValueError, match="the batch has 5 choices and answer_token_ids 4 tokens: give one answer token per choice"):
        model.logits(_mc_batch([0, 1, 2], [[1, 1, 1, 1, 1]] * 3))


def test_token_level_data_is_refused_by_predict_and_its_labels_are_checked():
    """predict ran every forward of a CausalLM model, then failed in torch.cat (or returned [N, T-1, V] 'probs'); int32
    labels, shifted ones, too few rows or class labels gave raw torch errors from inside the loss."""
    from pyro_lora import predict

    model = LoraModel(tiny_llama(), CausalLM(), prior=0.5, num_data=4)
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with pytest.raises(ValueError, match=r"predict gives one class distribution per example .* CausalLM is token-level"):
        predict(model, MAPGuide(model), [batch])
    lik = model.likelihood
    assert torch.equal(lik.observed({**batch, "labels": ids.int()}), lik.observed(batch))  # numpy's int32: accepted
    assert lik.observed(batch).dtype == torch.int64 and lik.observed(batch).shape == (2, 4)
    for bad in (ids[:, 1:], ids[:1], ids[:, 0], ids.float(), ids.bool()):
        with pytest.raises(ValueError, match=r"CausalLM labels must be integer token ids of input_ids' shape \(2, 5\)"):
            lik.observed({**batch, "labels": bad})


def test_importing_pyro_lora_leaves_torch_argument_validation_as_it_found_it():
    """`import pyro_lora` imports peft, which imports bitsandbytes, whose torch.compile at import runs torch._dynamo's
    patch: torch.distributions' argument validation was off for the whole process (Normal(0, -1).log_prob(0) gave nan)
    while Pyro's is_validation_enabled() still said True. A fresh interpreter, as the import runs once."""
    code = ("import torch; before = torch.distributions.Distribution._validate_args; import pyro_lora, pyro_lora.guides; "
            "print(before, torch.distributions.Distribution._validate_args)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-2:] == ["True", "True"]
