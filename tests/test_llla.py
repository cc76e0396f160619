"""Last-layer Laplace: the GGN against autograd's Hessian, the GLM logits against dense algebra and head samples, the
evidence and validation optima against brute force, the features on three head layouts, refusals, save/load, bf16."""

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import pairwise_probit_reference, random_batch, tiny_bert, tiny_bert_base, tiny_llama
from peft import LoraConfig, get_peft_model
from test_laplace import mlp_data, mlp_model
from test_padding import _pad, _tokens, letter_batch, tiny_llama_cls
from transformers import BertForSequenceClassification

from pyro_lora import LoraModel, MultipleChoice, SequenceClassification, fit, load_guide, predict, save_guide
from pyro_lora.calibration import golden_section
from pyro_lora.experiments.compare import fit_method
from pyro_lora.experiments.setup import CompareConfig, Setup
from pyro_lora.guides import METHODS, LaplaceGuide, LastLayerLaplaceGuide, MAPGuide
from pyro_lora.heads import class_rows, find_head, head_rows
from pyro_lora.metrics import nll

LETTERS = [10, 11, 12, 13]
RECORDS = [(_tokens(5, 1), 3), (_tokens(13, 2), 4), (_tokens(9, 3), 2), (_tokens(7, 4), 4), (_tokens(6, 5), 4)]


def bert(scale=30.0, dtype=torch.float32, net=None):
    """Tiny BERT whose classifier is ``scale`` times its init: probabilities far from uniform."""
    model = LoraModel(net or tiny_bert(dtype=dtype), SequenceClassification(), prior=0.5, num_data=12)
    with torch.no_grad():
        find_head(model).weight.mul_(scale)
    return model


def bert_data(seeds=(1, 2, 3), labels_seed=0):
    g = torch.Generator().manual_seed(labels_seed)
    return [random_batch(batch=4, seed=s) | {"labels": torch.randint(0, 3, (4,), generator=g)} for s in seeds]


def llama(dtype=torch.float32, scale=20.0):
    """Tiny Llama answering letters 10-13; the letters' lm_head rows ``scale`` times their init."""
    net = tiny_llama()
    with torch.no_grad():
        net.get_base_model().lm_head.weight[LETTERS] *= scale
    return LoraModel(net.to(dtype), MultipleChoice(LETTERS, format="letter"), prior=0.5)


def letter_data(side="left"):
    """Two letter batches of 3-, 4- and 2-choice questions (the missing choices at -inf)."""
    labels = torch.tensor([0, 3, 1, 2, 3])
    return [letter_batch(RECORDS[:3], side) | {"labels": labels[:3]}, letter_batch(RECORDS[3:], side) | {"labels": labels[3:]}]


# ------------------------------------------------------------------ (1) the curvature


def dense_ggn(guide, batches):
    """``sum_n J_n^T Lambda_n J_n`` in float64 with ``J_n = I_C (x) phi_n^T`` formed densely, from the guide's features."""
    total, c = 0, guide.loc.shape[0]
    for batch in batches:
        logits, phi = guide.features(batch)
        p = F.pad(logits.double(), (0, c - logits.shape[1]), value=-math.inf).softmax(-1)
        jac = torch.kron(torch.eye(c, dtype=torch.float64), phi[:, None, :])  # [B, C, P]
        total = total + (jac.mT @ (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) @ jac).sum(0)
    return total


def autograd_hessian(model, batches):
    """Hessian of the summed NLL w.r.t. the head's class rows ``[C, D1]``, the head replaced by ``F.linear``."""
    linear = find_head(model)
    rows = class_rows(model.likelihood, linear)
    theta0, d = head_rows(linear, rows), linear.weight.shape[1]
    weight = linear.weight.detach().double()
    bias = None if linear.bias is None else linear.bias.detach().double()

    def total_nll(theta):
        w = weight.index_put((rows,), theta[:, :d])
        b = None if bias is None else bias.index_put((rows,), theta[:, d])
        linear.forward = lambda x: F.linear(x.double(), w, b).to(x.dtype)
        return sum(F.cross_entropy(model.logits(x, model.adapter_values()).double(), x["labels"], reduction="sum")
                   for x in batches)

    try:
        h = torch.autograd.functional.hessian(total_nll, theta0)
    finally:
        del linear.forward
    return h.reshape(theta0.numel(), theta0.numel())


@pytest.mark.parametrize("build, batches", [(bert, bert_data), (llama, letter_data)], ids=["bert", "llama-letters"])
def test_the_full_ggn_is_autograds_hessian_of_the_nll_in_the_head_rows(build, batches):
    model = build()
    guide = LastLayerLaplaceGuide(model).fit(batches(), progress=False)
    assert guide.hessian == "full"
    exact = autograd_hessian(model, batches())
    torch.testing.assert_close(guide.ggn(), exact, rtol=0, atol=2e-5 * float(exact.abs().max()))
    torch.testing.assert_close(dense_ggn(guide, batches()), exact, rtol=0, atol=2e-5 * float(exact.abs().max()))
    assert float(exact.abs().max()) > 0.1  # the head is not flat


def test_kfac_is_n_times_the_kronecker_product_of_the_mean_factors():
    model, data = bert(), bert_data()
    guide = LastLayerLaplaceGuide(model, hessian="kfac").fit(data, progress=False)
    lams, outer = [], []
    for batch in data:
        logits, phi = guide.features(batch)
        p = logits.double().softmax(-1)
        lams.append(torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
        outer.append(phi[:, :, None] * phi[:, None, :])
    n = 12
    expected = n * torch.kron(torch.cat(lams).mean(0), torch.cat(outer).mean(0))
    torch.testing.assert_close(guide.ggn(), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(expected, LastLayerLaplaceGuide(model).fit(data, progress=False).ggn(), atol=1e-3)


# ------------------------------------------------------------------ (2) the GLM predictive


@pytest.mark.parametrize("link", ["probit", "mc"])
def test_an_infinite_prior_precision_predicts_the_maps_probabilities(link):
    model = llama()
    guide = LastLayerLaplaceGuide(model, prior_precision=1e12).fit(letter_data(), progress=False)
    glm = guide.predict_glm(letter_data(), link=link, num_samples=3)
    point = predict(model, MAPGuide(model), letter_data())
    torch.testing.assert_close(glm.probs, point.probs, rtol=0, atol=1e-5)
    assert glm.probs[0, 3] == 0 and glm.probs[2, 2:].eq(0).all()  # missing choices stay at 0


@pytest.mark.parametrize("hessian", ["full", "kfac"])
def test_the_logit_covariance_is_j_sigma_jt_and_what_head_samples_give(hessian):
    model, data = bert(), bert_data()
    guide = LastLayerLaplaceGuide(model, hessian=hessian, prior_precision=3.0).fit(data, progress=False)
    mean, cov = guide.glm_logits(data[0])
    logits, phi = guide.features(data[0])
    torch.testing.assert_close(mean, logits.double())
    h = dense_ggn(guide, data) if hessian == "full" else guide.ggn()
    sigma = torch.linalg.inv(h + 3.0 * torch.eye(h.shape[0], dtype=torch.float64))
    jac = torch.kron(torch.eye(3, dtype=torch.float64), phi[:, None, :])  # [B, C, P]: J_n = I_C (x) phi_n^T
    dense = jac @ sigma @ jac.mT
    torch.testing.assert_close(cov, dense, rtol=1e-4, atol=1e-6 * float(dense.abs().max()))
    torch.manual_seed(0)
    theta = guide.sample_head(40000)  # [S, C, D1]
    torch.testing.assert_close(theta.mean(0), guide.loc.double(), rtol=0, atol=0.03 * float(dense.diagonal(0, -2, -1).max()) ** 0.5)
    f = torch.einsum("scd,bd->sbc", theta, phi)  # the head applied by hand
    centred = f - f.mean(0)
    estimate = torch.einsum("sbc,sbk->bck", centred, centred) / (f.shape[0] - 1)
    torch.testing.assert_close(estimate, dense, rtol=0, atol=0.03 * float(dense.abs().max()))
    torch.testing.assert_close(f.mean(0), logits.double(), rtol=0, atol=0.02 * float(dense.diagonal(0, -2, -1).max()) ** 0.5 + 1e-4)


@pytest.mark.parametrize("hessian", ["full", "kfac"])
def test_head_draws_do_not_depend_on_the_order_the_curvature_was_summed_in(hessian):
    """The draws used eigh's eigenvectors, whose signs and basis (the softmax's degenerate shift direction) follow the
    summation order: the batches reordered (or split across ranks) drew heads 2.3 apart from the same seed."""
    model, data = bert(), bert_data()
    draws = []
    for batches in (data, data[::-1]):
        guide = LastLayerLaplaceGuide(model, hessian=hessian, prior_precision=3.0).fit(batches, progress=False)
        torch.manual_seed(0)
        draws.append(guide.sample_head(4))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ (3) the prior precision


def test_the_evidence_is_laplaces_formula_and_its_optimum_the_dense_grids_argmax():
    model, data = bert(), bert_data()
    guide = LastLayerLaplaceGuide(model).fit(data, progress=False)
    h, theta = dense_ggn(guide, data), guide.loc.double().reshape(-1)
    with torch.no_grad():
        loglik = -sum(F.cross_entropy(model.logits(b, model.adapter_values()), b["labels"], reduction="sum").double() for b in data)
    for lam in (1e-3, 0.7, 50.0):
        logdet = torch.linalg.slogdet(h + lam * torch.eye(h.shape[0], dtype=torch.float64))[1]
        expected = loglik - lam / 2 * theta @ theta + theta.numel() / 2 * math.log(lam) - logdet / 2
        assert guide.log_marginal_likelihood(lam) == pytest.approx(float(expected), rel=1e-6)
    history = guide.optimize_prior_precision("marglik")
    assert all(b >= a - 1e-9 for a, b in zip(history, history[1:]))  # never downhill
    grid = torch.logspace(-4, 4, 4001)
    values = torch.tensor([guide.log_marginal_likelihood(g) for g in grid.tolist()])
    best = float(grid[values.argmax()])
    assert abs(math.log10(float(guide.prior_precision)) - math.log10(best)) <= 2 * 8 / 4000
    assert guide.log_marginal_likelihood() >= float(values.max()) - 1e-9
    assert 1e-3 < best < 1e3  # an interior optimum


def contrarian_data(model):
    """Six batches labelled with the MAP's argmax (about 60%) or its argmin: over-confident on a validation split."""
    g = torch.Generator().manual_seed(0)
    batches = [random_batch(batch=4, seed=s) for s in range(1, 7)]
    with torch.no_grad():
        logits = [model.logits(b) for b in batches]
    return [b | {"labels": torch.where(torch.rand(4, generator=g) < 0.6, x.argmax(-1), x.argmin(-1))}
            for b, x in zip(batches, logits)]


def contrarian_fit():
    """A last-layer Laplace fit on three contrarian batches, its validation batches, and by hand the validation NLL of
    log lambda: dense posterior, the pairwise probit with the full logit covariance (the reported predictive's)."""
    model = bert(scale=100.0)
    data = contrarian_data(model)
    train, val = data[:3], data[3:]
    guide = LastLayerLaplaceGuide(model).fit(train, progress=False)
    h = dense_ggn(guide, train)
    feats = [guide.features(b) for b in val]
    phi, mean = torch.cat([f[1] for f in feats]), torch.cat([f[0] for f in feats]).double()
    labels = torch.cat([b["labels"] for b in val])
    jac = torch.kron(torch.eye(3, dtype=torch.float64), phi[:, None, :])

    def nll(log_lam):
        sigma = torch.linalg.inv(h + math.exp(log_lam) * torch.eye(h.shape[0], dtype=torch.float64))
        p = pairwise_probit_reference(mean, jac @ sigma @ jac.mT)
        return float(-p.gather(1, labels[:, None]).log().mean())

    return guide, val, nll


def test_val_nll_finds_the_brute_force_minimum_of_the_probit_predictives_nll():
    guide, val, nll = contrarian_fit()
    grid = torch.linspace(math.log(1e-4), math.log(1e4), 801)
    brute = min(grid.tolist(), key=nll)
    brute = golden_section(nll, brute - 0.02, brute + 0.02, 1e-6)[0]
    nlls = guide.optimize_prior_precision("val_nll", val_loader=val)
    found = math.log(float(guide.prior_precision))
    assert len(nlls) == 17 and min(nlls) > nll(brute)  # the grid alone misses it; the refinement finds it
    assert abs(found - brute) < 0.01 and nll(found) <= nll(brute) + 1e-7
    assert math.exp(brute) < 0.1  # interior, far from either end of the grid


def test_val_nll_searches_a_grid_that_repeats_a_value_as_the_grid_without():
    """LLLA's search took the neighbours of its best value in the sorted grid, repeats kept: a repeated best value was
    its own lower neighbour, so the refinement searched above it alone (lambda stayed at the repeated grid value, above
    the optimum), and a repeat at the grid's smallest value warned of the optimum above the *largest* one."""
    guide, val, nll = contrarian_fit()
    brute = min(torch.linspace(math.log(1e-4), math.log(1e4), 161).tolist(), key=nll)
    brute = golden_section(nll, brute - 0.12, brute + 0.12, 1e-6)[0]
    above = math.exp(brute + 0.7)  # the best grid value, repeated, with the optimum below it
    grid = [math.exp(brute - 3.0), above, above, math.exp(brute + 4.0)]
    assert min(grid, key=lambda g: nll(math.log(g))) == above
    nlls = guide.optimize_prior_precision("val_nll", val_loader=val, grid=grid)
    assert len(nlls) == 4 and abs(math.log(float(guide.prior_precision)) - brute) < 0.01
    with pytest.warns(UserWarning, match=r"lowest at the smallest grid value lambda = .* extend the grid below"):
        guide.optimize_prior_precision("val_nll", val_loader=val, grid=[above, above, 10 * above, 100 * above])
    assert float(guide.prior_precision) == pytest.approx(above)


def test_val_nll_warns_at_the_edge_of_the_grid_and_refuses_bad_grids():
    model, data = bert(), bert_data()
    guide = LastLayerLaplaceGuide(model).fit(data, progress=False)
    with pytest.warns(UserWarning, match=r"lowest at the (smallest|largest) grid value .* extend the grid"):
        guide.optimize_prior_precision("val_nll", val_loader=data, grid=[1e6, 1e7, 1e8])
    for grid in ([], [1.0, 0.0], [1.0, math.inf], [math.nan]):
        with pytest.raises(ValueError, match="grid must hold finite positive"):
            guide.optimize_prior_precision("val_nll", val_loader=data, grid=grid)
    with pytest.raises(ValueError, match="needs val_loader"):
        guide.optimize_prior_precision("val_nll")
    with pytest.raises(ValueError, match="val_loader is empty"):
        guide.optimize_prior_precision("val_nll", val_loader=[])
    with pytest.raises(ValueError, match="method must be 'marglik' or 'val_nll'"):
        guide.optimize_prior_precision("gridsearch")


# ------------------------------------------------------------------ (4) the features


def test_bert_features_reproduce_the_logits():
    model, data = bert(), bert_data()
    guide = LastLayerLaplaceGuide(model)
    logits, phi = guide.features(data[0])
    assert phi.shape == (4, 33) and phi.dtype == torch.float64 and phi[:, -1].eq(1).all()
    torch.testing.assert_close(phi @ guide.head_rows().T, logits.double(), rtol=1e-6, atol=1e-6)


def test_letter_features_are_the_last_real_tokens_whatever_the_padding():
    model = llama()
    guide = LastLayerLaplaceGuide(model)
    assert guide.head_rows().shape == (4, 32)  # the letters' lm_head rows, no bias: never the vocabulary
    left, right = (guide.features(letter_data(side)[0]) for side in ("left", "right"))
    torch.testing.assert_close(left[1], right[1], rtol=1e-5, atol=1e-5)
    logits, phi = left
    finite = torch.isfinite(logits)
    torch.testing.assert_close((phi @ guide.head_rows().T)[finite], logits.double()[finite], rtol=1e-6, atol=1e-6)
    assert not finite[0, 3] and not finite[2, 2:].any()


def test_a_per_token_head_gives_the_last_real_token_of_each_right_padded_row():
    model = LoraModel(tiny_llama_cls(), SequenceClassification(), prior=0.5)
    guide = LastLayerLaplaceGuide(model)
    ids, mask = _pad([r for r, _ in RECORDS], "right")
    seen = []
    handle = find_head(model).register_forward_hook(lambda m, args, out: seen.append(args[0]))
    _, phi = guide.features({"input_ids": ids, "attention_mask": mask})
    handle.remove()
    hidden = seen[0]  # [B, T, D]: the score runs on every token
    last = mask.sum(1) - 1
    torch.testing.assert_close(phi, hidden[torch.arange(len(RECORDS)), last].double())
    assert (last < ids.shape[1] - 1).any()  # some rows are padded: the last column would be wrong for them


def test_a_head_whose_output_ties_at_every_position_still_reads_the_last_real_token():
    """A zero score head (zero-initialised or untrained) gives every position the logits 0: the input was taken at
    position 0, not at the last real token the model reads, and the GGN was off by 2.6 (of 3.8), the evidence by 0.66,
    silently."""
    model = LoraModel(tiny_llama_cls(), SequenceClassification(), prior=0.5)
    with torch.no_grad():
        find_head(model).weight.zero_()
    ids, mask = _pad([r for r, _ in RECORDS], "right")
    seen = []
    handle = find_head(model).register_forward_hook(lambda m, args, out: seen.append(args[0]))
    guide = LastLayerLaplaceGuide(model).fit([{"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1, 0])}], progress=False)
    _, phi = guide.features({"input_ids": ids, "attention_mask": mask})
    handle.remove()
    last = mask.sum(1) - 1
    torch.testing.assert_close(phi, seen[-1][torch.arange(len(RECORDS)), last].double())
    assert not torch.equal(phi, seen[-1][:, 0].double())  # position 0, which the tie took, is another input
    # a zero head gives each of the 3 classes 1/3: Lambda = diag(p) - p p^T = (3 I - 1 1^T) / 9 for every example
    spread = (3 * torch.eye(3, dtype=torch.float64) - 1) / 9
    torch.testing.assert_close(guide.ggn(), torch.kron(spread, phi.T @ phi))
    # the search's forward records the graph after the head only: with B trainable (random="A") it recorded the whole
    # network's (327 kB of activations for this toy, a training forward's on an LLM); the flags are put back
    trained_b = LoraModel(tiny_llama_cls(), SequenceClassification(), prior=0.5, random="A")
    with torch.no_grad():
        find_head(trained_b).weight.zero_()
    flags = {n: p.requires_grad for n, p in trained_b.net.named_parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        LastLayerLaplaceGuide(trained_b).features({"input_ids": ids, "attention_mask": mask})
    assert sum(saved) <= ids.numel() * 3 * 4  # at most the head's [B, T, K] float32 output
    assert {n: p.requires_grad for n, p in trained_b.net.named_parameters()} == flags
    # logits averaged over the positions after the head (0 too, with a zero head): no one position is read
    handle = find_head(model).register_forward_hook(lambda m, args, out: out.mean(1, keepdim=True).expand_as(out))
    with pytest.raises(ValueError, match="read from 13 positions of the head's output, not one: the model pools after"):
        guide.features({"input_ids": ids, "attention_mask": mask})
    handle.remove()


def test_cloze_multiple_choice_is_refused_with_the_way_out():
    model = LoraModel(tiny_llama(), MultipleChoice(format="cloze"), prior=0.5)
    with pytest.raises(ValueError, match="refuses cloze multiple choice.*use the letter format"):
        LastLayerLaplaceGuide(model)


class _Doubled(BertForSequenceClassification):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 2 * out.logits
        return out


def test_a_model_that_transforms_its_heads_output_is_refused():
    base = tiny_bert_base()
    net = get_peft_model(_Doubled(base.config), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    guide = LastLayerLaplaceGuide(bert(net=net.eval()))
    with pytest.raises(ValueError, match="reproduces the model's logits at no position .* transforms its head's output"):
        guide.fit(bert_data(), progress=False)


def test_sites_without_a_peft_parameter_are_refused():
    from pyro_lora.loraxs import LoraXSModel

    with pytest.raises(ValueError, match=r"site\(s\) \['query.lora_R', 'value.lora_R'\] have no peft parameter"):
        LastLayerLaplaceGuide(LoraXSModel(tiny_bert(random_b=False), SequenceClassification(), num_data=6))


def test_trainable_tokens_on_a_tied_head_are_refused_naming_them_not_target_modules():
    """peft wraps the LM head tied to an embedding given trainable_token_indices: the refusal blamed LoRA on the head
    and said to leave it out of target_modules, which did not hold it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=True)
    net = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                              trainable_token_indices={"embed_tokens": [10, 11]}))
    model = LoraModel(net, MultipleChoice([10, 11], format="letter"), num_data=8)
    with pytest.raises(ValueError, match=r"the head 'base_model.model.lm_head' carries a peft adapter layer, TrainableTokensLayer "
                                         r"\(peft's trainable_token_indices, given for the head or for an input embedding "
                                         "tied to it; leave the head's rows out of trainable_token_indices"):
        LastLayerLaplaceGuide(model)


def test_a_classification_head_named_otherwise_is_found_outside_the_backbone():
    """BART's and T5's heads are named classification_head: the guide found none and asked for a path."""
    from transformers import BartConfig, BartForSequenceClassification

    torch.manual_seed(0)
    config = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_labels=3, pad_token_id=1,
                        eos_token_id=2)
    net = get_peft_model(BartForSequenceClassification(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                           modules_to_save=["classification_head"]))
    model = LoraModel(net, SequenceClassification(), num_data=4)
    assert find_head(model) is net.base_model.model.classification_head.modules_to_save["default"].out_proj
    ids = torch.randint(3, 64, (4, 6))
    ids[:, -1] = config.eos_token_id  # BART reads each row's last eos
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 0])}
    guide = LastLayerLaplaceGuide(model).fit([batch], progress=False)
    guide.set_prior_precision(1e12)  # no spread: the GLM predictive is the network's own
    torch.testing.assert_close(guide.predict_glm([batch]).log_probs, predict(model, None, [batch]).log_probs, rtol=0, atol=1e-6)


def test_a_module_outside_the_backbone_that_is_no_classifier_is_refused_naming_it():
    """A prototype classifier's one module outside the backbone is a projection to 16 features: the guess was caught
    only later, as a model transforming its head's output, naming neither the module nor head=."""
    from transformers import BertConfig, BertModel, BertPreTrainedModel
    from transformers.modeling_outputs import SequenceClassifierOutput

    class Prototypes(BertPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.bert = BertModel(config, add_pooling_layer=False)
            self.proj = torch.nn.Sequential(torch.nn.Linear(config.hidden_size, 16), torch.nn.Tanh())
            self.register_buffer("prototypes", torch.randn(config.num_labels, 16))
            self.post_init()

        def forward(self, input_ids, attention_mask=None, **kwargs):
            h = self.bert(input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
            return SequenceClassifierOutput(logits=self.proj(h) @ self.prototypes.T)

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                        num_labels=3)
    net = get_peft_model(Prototypes(config), LoraConfig(r=2, target_modules=["query", "value"]))
    with pytest.raises(ValueError, match=r"the one module outside Prototypes's backbone, 'base_model.model.proj', ends in a "
                                         r"linear layer of 16 outputs, not one per class \(3\): it is no classification "
                                         r"head; pass head="):
        LastLayerLaplaceGuide(LoraModel(net, SequenceClassification(), num_data=4))


def test_a_head_it_cannot_find_or_use_is_refused_by_name_and_one_named_is_used():
    with pytest.raises(ValueError, match="found no head in _MLP .* pass head="):
        LastLayerLaplaceGuide(mlp_model())  # LoRA on fc1 and fc2, no classifier
    with pytest.raises(ValueError, match=r"the head 'base_model.model.fc2' carries a peft adapter layer, Linear \(LoRA on the head; "
                                         "leave the head out of target_modules\)"):
        LastLayerLaplaceGuide(mlp_model(), head="base_model.model.fc2")
    with pytest.raises(ValueError, match="names no module"):
        LastLayerLaplaceGuide(mlp_model(), head="nowhere")
    from test_laplace import _MLP

    torch.manual_seed(0)
    net = get_peft_model(_MLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"])).eval()
    model = LoraModel(net, SequenceClassification())
    guide = LastLayerLaplaceGuide(model, head="base_model.model.fc2").fit(mlp_data(), progress=False)
    assert guide.ggn().shape == (18, 18) and guide.config()["head"] == "base_model.model.fc2"


# ------------------------------------------------------------------ (5) the boundary, save and load


def test_a_vanishing_prior_precision_gives_uniform_real_choices_or_a_clear_error():
    """lambda 1e-300: the logit variances overflow float32; a missing choice's -inf / inf was nan in every row."""
    guide = LastLayerLaplaceGuide(llama(), hessian="full").fit(letter_data(), progress=False)
    guide.set_prior_precision(1e-300)
    probs = guide.predict_glm(letter_data()).probs
    real = torch.isfinite(torch.cat([guide.glm_logits(b)[0] for b in letter_data()]))
    assert torch.equal(probs > 0, real)  # missing choices 0
    torch.testing.assert_close(probs, real / real.sum(-1, keepdim=True))  # the probit's limit: uniform
    with pytest.raises(ValueError, match="not finite.*prior precision this small"):
        guide.predict_glm(letter_data(), link="mc", num_samples=4)


def test_a_head_tied_to_the_input_embeddings_is_named_in_a_warning():
    """SmolLM2 ties lm_head to embed_tokens: the posterior is over the rows' output use only (the GGN is exact for
    the head untied at the MAP); the guide says so. An untied head gives no warning."""
    net = tiny_llama()
    likelihood = MultipleChoice([10, 11, 12, 13], format="letter")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LastLayerLaplaceGuide(LoraModel(net, likelihood))
    base = net.get_base_model()
    base.lm_head.weight = base.model.embed_tokens.weight
    with pytest.warns(UserWarning, match=r"tied to the input embeddings \(.*embed_tokens.weight.*lm_head.weight"):
        guide = LastLayerLaplaceGuide(LoraModel(net, likelihood))
    assert len(guide.tied) == 2  # the recipes' rows carry a note from it


def _tied_llama(**options):
    """Tiny Llama whose lm_head is tied to embed_tokens, LoRA on q/v and peft ``options`` (modules_to_save...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=True)
    net = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **options))
    with torch.no_grad():
        net.get_base_model().lm_head.weight[LETTERS] *= 20.0
    return LoraModel(net.eval(), MultipleChoice(LETTERS, format="letter"), prior=0.5)


def test_a_tied_head_trained_by_peft_with_ensure_weight_tying_is_sized_by_its_weight():
    """peft's copy of a tied lm_head (modules_to_save, ensure_weight_tying) is a Linear whose in_features and
    out_features are swapped (64, 16 for a [64, 16] weight): the guide sized its rows by in_features ([4, 64]) and
    fit died in a raw size mismatch after the whole pass over the data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note on the tying, and the guide's
        model = _tied_llama(modules_to_save=["lm_head"], ensure_weight_tying=True)
        linear = find_head(model)
        assert linear.in_features == 64 and tuple(linear.weight.shape) == (64, 32)  # peft's metadata, not the weight's
        guide = LastLayerLaplaceGuide(model)
    assert tuple(guide.loc.shape) == (4, 32) and guide.extra_parameters() == 128**2 + 128 + 1  # P = 4 rows x 32
    guide.fit(letter_data(), progress=False)
    exact = autograd_hessian(model, letter_data())
    torch.testing.assert_close(guide.ggn(), exact, rtol=0, atol=2e-5 * float(exact.abs().max()))


def test_a_tie_peft_broke_by_training_the_embeddings_is_no_tie():
    """With embed_tokens in modules_to_save the forward reads the trained copy and lm_head the original weight: the
    guide named them tied (the copy's frozen original shares the head's storage) and warned its GGN inexact."""
    model = _tied_llama(modules_to_save=["embed_tokens"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guide = LastLayerLaplaceGuide(model)
    assert guide.tied == []


def test_repeated_answer_tokens_are_refused():
    with pytest.raises(ValueError, match=r"answer_token_ids \[10, 10, 12, 13\] repeat a token"):
        MultipleChoice([10, 10, 12, 13], format="letter")
    with pytest.raises(ValueError, match="non-empty 1-d"):
        MultipleChoice([[10, 11]], format="letter")
    # uint8 and bool index as masks: a raw IndexError in the forward (or a mask read as ids, silently)
    for ids in (torch.tensor([10, 11], dtype=torch.uint8), torch.tensor([True, False])):
        with pytest.raises(ValueError, match=r"token ids \(int64\), got torch.(uint8|bool)"):
            MultipleChoice(ids, format="letter")
    assert MultipleChoice(torch.tensor([10, 11], dtype=torch.int32)).answer_token_ids.dtype == torch.int64
    with pytest.raises(ValueError, match="the letter format scores one answer token per choice"):
        MultipleChoice([10, 11], format="letter", normalize="chars")  # was ignored


def test_predict_refuses_the_guide_and_names_its_predictive():
    model = bert()
    guide = LastLayerLaplaceGuide(model).fit(bert_data(), progress=False)
    with pytest.raises(ValueError, match=r"predict refused .* use its own predictive \(guide.predict_glm\(loader\)\)"):
        predict(model, guide, bert_data())


def test_before_fit_and_on_empty_data_the_guide_says_so():
    guide = LastLayerLaplaceGuide(bert())
    for call in (lambda: guide.predict_glm(bert_data()), lambda: guide.log_marginal_likelihood(),
                 lambda: guide.optimize_prior_precision(), lambda: guide.sample_head(2)):
        with pytest.raises(ValueError, match="no posterior yet: call fit"):
            call()
    with pytest.raises(ValueError, match="the data is empty"):
        guide.fit([], progress=False)
    guide.fit(bert_data(), progress=False)
    with pytest.raises(ValueError, match="the data is empty"):
        guide.predict_glm([])
    with pytest.raises(ValueError, match="positive finite"):
        guide.set_prior_precision(0.0)
    with pytest.raises(ValueError, match="hessian must be"):
        LastLayerLaplaceGuide(guide.model, hessian="diag")


def test_a_changed_head_row_is_refused_until_fitted_again():
    model = llama()
    guide = LastLayerLaplaceGuide(model).fit(letter_data(), progress=False)
    with torch.no_grad():
        model.net.get_base_model().lm_head.weight[LETTERS[1], 3] += 1e-3  # below the base fingerprint's tolerance
    # an LM head is a base weight: a saved guide cannot restore it (the advice to load one was refused there)
    with pytest.raises(ValueError, match="head's rows changed since LastLayerLaplaceGuide.fit.*reload the base model"):
        guide.predict_glm(letter_data())
    guide.fit(letter_data(), progress=False)
    guide.predict_glm(letter_data())


@pytest.mark.parametrize("hessian", ["full", "kfac"])
def test_save_and_load_give_identical_predictions(hessian, tmp_path):
    model = llama()
    guide = LastLayerLaplaceGuide(model, hessian=hessian).fit(letter_data(), progress=False)
    guide.optimize_prior_precision("marglik")
    before = guide.predict_glm(letter_data())
    save_guide(guide, tmp_path / "g")
    other = llama()
    loaded = load_guide(tmp_path / "g", other)
    assert type(loaded) is LastLayerLaplaceGuide and loaded.hessian == hessian
    assert float(loaded.prior_precision) == float(guide.prior_precision) != 1.0
    torch.testing.assert_close(loaded.predict_glm(letter_data()).probs, before.probs, rtol=0, atol=0)
    assert loaded.extra_parameters() == guide.extra_parameters() == (128**2 + 128 if hessian == "full" else 4**2 + 4 + 32**2 + 32) + 1  # lambda


@pytest.mark.parametrize("letters", [[20, 21, 22, 23], [10, 11, 12], [11, 10, 12, 13]])
def test_a_saved_guide_refuses_a_model_answering_with_other_letters(letters, tmp_path):
    guide = LastLayerLaplaceGuide(llama()).fit(letter_data(), progress=False)
    save_guide(guide, tmp_path / "g")
    net = tiny_llama()  # the same base and adapter: only the answer letters, whose rows the posterior is over, differ
    with torch.no_grad():
        net.get_base_model().lm_head.weight[LETTERS] *= 20.0  # as llama()'s
    other = LoraModel(net, MultipleChoice(letters, format="letter"), prior=0.5)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    with pytest.raises(ValueError, match=re.escape(f"'answer_token_ids': {LETTERS}, 'format': 'letter'}}, the model has "
                                                   f"{{'class': 'MultipleChoice', 'answer_token_ids': {letters}")):
        load_guide(tmp_path / "g", other)
    assert all(torch.equal(p, start[n]) for n, p in net.named_parameters())  # refused before the network was written


# ------------------------------------------------------------------ (6) half precision; the registered methods


def test_a_bf16_base_predicts_within_001_of_fp32():
    probs = {}
    for dtype in (torch.float32, torch.bfloat16):
        guide = LastLayerLaplaceGuide(llama(dtype)).fit(letter_data(), progress=False)
        guide.optimize_prior_precision("marglik")
        probs[dtype] = guide.predict_glm(letter_data()).probs
        assert probs[dtype].dtype == torch.float32 and guide.eigvals.dtype == torch.float64
    assert (probs[torch.float32].max(-1).values > 0.4).any()  # the probabilities say something
    assert (probs[torch.bfloat16] - probs[torch.float32]).abs().max() < 0.01


def gemma2(dtype, cap=3.0, task="causal_lm", scale=20.0):
    """Tiny Gemma 2 (hidden 32, 2 layers) capping its final logits at ``cap`` (30 in the real models), untied; the
    letters' lm_head rows ``scale`` times their init."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma2ForSequenceClassification

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, num_labels=3,
                          final_logit_softcapping=cap, tie_word_embeddings=False)
    if task == "classification":
        net = get_peft_model(Gemma2ForSequenceClassification(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                                 task_type="SEQ_CLS"))
        return LoraModel(net.to(dtype).eval(), SequenceClassification(), prior=0.5)
    base = Gemma2ForCausalLM(config)
    with torch.no_grad():
        base.lm_head.weight[LETTERS] *= scale
    net = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return LoraModel(net.to(dtype).eval(), MultipleChoice(LETTERS, format="letter"), prior=0.5)


@pytest.mark.parametrize("dtype, cap, scale", [(torch.float32, 3.0, 20.0), (torch.bfloat16, 3.0, 20.0),
                                               (torch.bfloat16, 30.0, 18.0)], ids=["fp32", "bf16", "bf16-cap30"])
def test_a_softcapped_gemma2_head_carries_the_caps_derivative_into_the_ggn_and_the_logit_covariance(dtype, cap, scale):
    """Gemma 2's forward caps the logits, f = c tanh(theta phi / c): a float32 fit was refused, a bf16 one whose
    logits stayed under c/4 (its looser reproduction check let them through) described the head alone (logit
    covariance 10.8% off at c = 30). Now both fold sech^2(z / c) in: the GGN, the logits' mean and covariance are a
    dense float64 Laplace's through the true cap, its Jacobian by autograd on the head's rows and its input captured
    in the network's own forward."""
    model, data, lam = gemma2(dtype, cap, scale=scale), letter_data(), 2.0
    net, c = model.net, len(LETTERS)
    guide = LastLayerLaplaceGuide(model, hessian="full", prior_precision=lam)
    assert guide.steps == {"final_logit_softcapping": cap}  # known by the class, before any forward
    guide.fit(data, progress=False)
    kfac = LastLayerLaplaceGuide(model, hessian="kfac").fit(data, progress=False)
    lm_head = net.get_base_model().lm_head
    theta = lm_head.weight.detach()[LETTERS].double()  # [C, D], no bias
    ggn, factors, outer, cases = 0, 0, 0, []
    cat = torch.cat([batch["labels"] for batch in data])
    for batch in data:
        seen = []
        handle = lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
        with torch.no_grad():
            theirs = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1, LETTERS]
        handle.remove()
        phi = seen[0][:, -1].double()  # left padded: the last position, [B, D]
        capped = lambda t: cap * torch.tanh(phi @ t.T / cap)  # noqa: E731  [B, C]
        f = capped(theta)
        torch.testing.assert_close(f, theirs.double(), rtol=0, atol=1e-2 * float(f.abs().max()))  # the network caps
        jac = torch.autograd.functional.jacobian(capped, theta).reshape(len(phi), c, -1)  # [B, C, P]
        mask = F.pad(batch["choice_mask"], (0, c - batch["choice_mask"].shape[1]))
        p = f.masked_fill(~mask, -math.inf).softmax(-1)
        lam_n = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        ggn = ggn + (jac.mT @ lam_n @ jac).sum(0)
        slope = 1 - torch.tanh(phi @ theta.T / cap) ** 2  # [B, C]
        assert float(slope.min()) < 0.98  # the cap matters here
        factors = factors + (slope[:, :, None] * lam_n * slope[:, None, :]).sum(0)
        outer = outer + phi.T @ phi
        cases.append((batch, f, jac))
    rel = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the model's logits, whose softmax the fit takes, rounded
    close = {"rtol": 0, "atol": rel * float(ggn.abs().max())}
    torch.testing.assert_close(guide.ggn(), ggn, **close)
    torch.testing.assert_close(kfac.ggn(), torch.kron(factors, outer / 5), **close)  # N E[G Lambda G] (x) E[phi phi^T]
    sigma = torch.linalg.inv(ggn + lam * torch.eye(len(ggn), dtype=torch.float64))
    for batch, f, jac in cases:
        k = batch["choice_mask"].shape[1]
        mean, cov = guide.glm_logits(batch)
        given = batch["choice_mask"].bool()  # a missing choice's -inf logit is a constant: no variance
        expected = (jac @ sigma @ jac.mT)[:, :k, :k] * (given[:, :, None] & given[:, None, :])
        torch.testing.assert_close(mean[batch["choice_mask"]], f[:, :k][batch["choice_mask"]], rtol=0,
                                   atol=rel * float(f.abs().max()))
        torch.testing.assert_close(cov, expected, rtol=0, atol=rel * float(expected.abs().max()))
    probs = guide.predict_glm(data).probs  # val_nll scores the same covariance
    assert guide.optimize_prior_precision("val_nll", val_loader=data, grid=[lam]) == pytest.approx([nll(probs, cat)], rel=1e-6)


def test_softcaps_are_folded_only_where_the_likelihood_applies_them_and_a_plain_bf16_llama_fits():
    """A Gemma 2 sequence classifier's forward runs no cap after its ``score``: nothing folded, and it fits;
    nor is anything folded for a Llama's letter head, which fits in bf16."""
    model = gemma2(torch.float32, task="classification")
    guide = LastLayerLaplaceGuide(model).fit(bert_data(), progress=False)
    assert guide.steps == {}
    logits, phi = guide.features(bert_data()[0])
    torch.testing.assert_close(phi @ guide.head_rows().T, logits.double(), rtol=1e-5, atol=1e-5)
    guide = LastLayerLaplaceGuide(llama(torch.bfloat16)).fit(letter_data(), progress=False)
    assert guide.steps == {} and bool(guide.fitted)


def _setup(likelihood, net, records, collate):
    config = CompareConfig(batch_size=3, progress=False)
    return Setup(config, net, None, likelihood, records[:6], records[6:], [], collate)


def test_the_recipes_fit_the_evidence_and_the_validation_lambda():
    assert METHODS["llla"].validation is False and METHODS["llla_val"].validation is True
    assert METHODS["llla"].guide is LastLayerLaplaceGuide and METHODS["llla"].predictive.uses_samples is False
    batch = bert_data(seeds=(1, 2, 3))
    records = [{k: v[i] for k, v in b.items()} for b in batch for i in range(4)]
    collate = lambda rs: {k: torch.stack([r[k] for r in rs]) for k in rs[0]}  # noqa: E731
    setup = _setup(SequenceClassification(), tiny_bert(), records, collate)
    evidence, _ = fit_method(setup, "llla")
    lam = float(evidence.guide.prior_precision)
    assert lam != 1.0 and bool(evidence.guide.fitted)
    validated, costs = fit_method(setup, "llla_val")  # the llla fit, its lambda chosen anew
    assert float(validated.guide.prior_precision) != lam  # a copy of the llla fit, its lambda chosen anew
    assert costs["prior_precision"] == float(validated.guide.prior_precision)  # kept in its rows
    assert float(evidence.guide.prior_precision) == lam and validated.guide._head[0] is evidence.guide._head[0]
    cloze = _setup(MultipleChoice(format="cloze"), tiny_llama(), records, collate)
    for name in ("llla", "llla_val"):
        with pytest.raises(ValueError, match="refuses cloze multiple choice"):
            METHODS[name].recipe(cloze.for_method(name))


def test_the_guide_path_and_fast_path_are_the_maps_lora():
    model = bert()
    guide = LastLayerLaplaceGuide(model)
    values = model.adapter_values()
    assert all(torch.equal(guide.mean()[n], v) for n, v in values.items())
    assert all(torch.equal(s, values[n].expand_as(s)) for n, s in guide.sample(3).items())
    assert guide.deterministic is False and guide.samples_carry_posterior is False
    assert guide.config() == {"hessian": "full", "prior_precision": 1.0, "head": None}


@pytest.mark.parametrize("setup", ["two adapters", "lora on classifier.dense"])
def test_the_head_is_this_adapters_copy_of_out_proj(setup):
    """RoBERTa with classifier.out_proj in modules_to_save: beside another adapter's copy the last linear found was
    'other''s (the head 'ran 0 times'); with LoRA on classifier.dense the plain out_proj was refused as LoRA'd."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=72, num_labels=3, pad_token_id=1)
    targets = ["query", "value"] + (["dense"] if setup == "lora on classifier.dense" else [])
    net = get_peft_model(RobertaForSequenceClassification(config),
                         LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["classifier.out_proj"]))
    if setup == "two adapters":
        net.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["classifier.out_proj"]))
    model = LoraModel(net, SequenceClassification())
    assert find_head(model) is net.base_model.model.classifier.out_proj.modules_to_save["default"]


def test_a_fit_is_at_the_head_as_it_is_then_and_features_refuse_a_head_changed_since():
    """A guide built before the MAP trained the head refused to fit ('point parameters changed'), though a fit is at
    the head as it is then; features() ran on a head retrained after the fit without a word."""
    from pyro_lora import fit

    model, data = bert(), bert_data()
    guide = LastLayerLaplaceGuide(model)
    map_guide = MAPGuide(model)
    fit(model, map_guide, data, epochs=2, lr=5e-2, progress=False)  # moves the head
    model.write_adapter(map_guide.mean())  # the fit is at the adapter's LoRA (else refused as an unwritten MAP)
    guide.fit(data, progress=False)
    guide.predict_glm(data)
    fit(model, MAPGuide(model), data, epochs=2, lr=5e-2, progress=False)
    with pytest.raises(ValueError, match=r"cannot compute features with this LastLayerLaplaceGuide on this model: the network's point"):
        guide.features(data[0])


def test_val_nll_scores_what_predict_glm_reports_where_the_common_logit_variance_is_large():
    """A head input of norm ~170 (an LLM's final hidden state) at a small lambda: most of each logit's variance shifts
    every logit alike, and forming Var(f_c - f_k) in float32 moved predict_glm's probabilities by up to 0.12 from
    the val_nll objective's (float64) at the same lambda."""
    net = tiny_llama_cls()
    with torch.no_grad():
        net.get_base_model().model.norm.weight.mul_(30.0)
        net.get_base_model().score.weight.mul_(0.2)
    model = LoraModel(net, SequenceClassification(), num_data=80)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(12):
        batch = {"input_ids": torch.randint(1, 64, (8, 7), generator=g), "attention_mask": torch.ones(8, 7, dtype=torch.long)}
        with torch.no_grad():
            top = model.logits(batch).argmax(-1)
        data.append(batch | {"labels": torch.where(torch.rand(8, generator=g) < 0.7, top, torch.randint(0, 3, (8,), generator=g))})
    train, val = data[:10], data[10:]
    guide = LastLayerLaplaceGuide(model).fit(train, progress=False)
    for lam in (1e-4, 1e-3):
        objective = guide.optimize_prior_precision("val_nll", val_loader=val, grid=[lam])[0]
        reported = guide.predict_glm(val)
        mean, cov = map(torch.cat, zip(*[guide.glm_logits(b) for b in val]))
        assert float(cov.diagonal(dim1=-2, dim2=-1).max()) > 1e5  # the regime where float32 cancels
        torch.testing.assert_close(reported.probs, pairwise_probit_reference(mean, cov).float(), rtol=0, atol=1e-5)
        assert abs(nll(reported.probs, reported.labels) - objective) < 1e-5


def test_llla_val_nll_ties_take_the_largest_lambda_and_a_flat_nll_is_said():
    """LLLA kept the first of tied validation NLLs (the smallest lambda, the widest posterior) where LaplaceGuide takes
    the largest, and on an NLL flat over the grid warned "lowest at the smallest grid value ... extend the grid"."""
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), num_data=16)
    batch = {**random_batch(16), "labels": torch.arange(16) % 2}
    head = model.net.base_model.model.classifier.modules_to_save["default"]
    with torch.no_grad():  # logits of 1e8 and more: every lambda's probit predictive is saturated alike
        head.weight.mul_(1e9)
    guide = LastLayerLaplaceGuide(model).fit([batch], progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nlls = guide.optimize_prior_precision("val_nll", val_loader=[batch], grid=[1e-4, 1e-2, 1.0, 1e2, 1e4])
    assert min(nlls) == max(nlls)
    assert float(guide.prior_precision) == pytest.approx(1e4)
    messages = [str(w.message) for w in caught]
    assert any("at every lambda from 0.0001 to 10000" in m for m in messages), messages
    assert not any("extend the grid" in m for m in messages)


def test_a_failed_refit_leaves_the_guide_as_it_was():
    """A refit failing on a late batch (label -100) or on empty data had already taken the adapter's new LoRA as the
    guide's sites, beside the old fit's head posterior: predict_glm kept predicting with that mixture, without a word."""
    model = bert()
    guide = LastLayerLaplaceGuide(model).fit(bert_data(), progress=False)
    test = bert_data(seeds=(4,))
    state = {n: t.clone() for n, t in guide.state_dict().items()}
    before = guide.predict_glm(test).probs
    model.write_adapter({k: v + 1.0 for k, v in model.adapter_values().items()})  # the LoRA moves on, the head not
    bad = bert_data()
    bad[-1]["labels"] = torch.tensor([0, 1, -100, 2])
    for data in (bad, []):
        with pytest.raises(ValueError):
            guide.fit(data, progress=False)
        assert all(torch.equal(state[n], t) for n, t in guide.state_dict().items())
    torch.testing.assert_close(guide.predict_glm(test).probs, before)  # its own LoRA sites, as fitted (0.19 became 0.24)


def test_a_last_layer_fit_on_a_compiled_network_whose_graph_skips_its_hook_is_refused_naming_torch_compile():
    """dynamo skips module hook guards: a fit after a predict had compiled the network ran the graph without the hook
    capturing the head's input, refused as "the head ran 0 times in one forward", which named no cause. Where the
    graph is recompiled with the hook (the hand-off's checks break it there), the fit is the eager one exactly."""
    import torch._dynamo

    def fitted(compiled):
        torch.manual_seed(0)
        model = bert()
        torch._dynamo.reset()
        if compiled:
            model.net.compile(backend="eager")
        fit(model, map_guide := MAPGuide(model), bert_data(), epochs=1, progress=False)
        model.write_adapter(map_guide.mean())
        predict(model, None, bert_data())  # the graph the fit's forwards reuse, compiled without its hooks
        return LastLayerLaplaceGuide(model).fit(bert_data(), progress=False)

    eager = fitted(False)
    try:
        compiled = fitted(True)
    except ValueError as error:
        assert re.search(r"head's input did not run in this forward.* torch.compile'd network .*torch._dynamo.reset\(\)",
                         str(error)), error
    else:
        torch.testing.assert_close(compiled.predict_glm(bert_data()).probs, eager.predict_glm(bert_data()).probs,
                                   rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def test_the_evidence_at_several_precisions_and_an_unchecked_refine_are_refused_by_name():
    """log_marginal_likelihood([1.0, 2.0]) raised torch's "shape '[1]' is invalid"; LaplaceGuide's
    optimize_prior_precision refined for refine="no" or 0.5 and not for None, without a word."""
    model, data = bert(), bert_data()
    guide = LastLayerLaplaceGuide(model).fit(data, progress=False)
    for bad in ([1.0, 2.0], torch.ones(2)):
        with pytest.raises(ValueError, match="one prior precision: give one number, got 2"):
            guide.log_marginal_likelihood(bad)
    assert guide.log_marginal_likelihood([2.0]) == guide.log_marginal_likelihood(2.0)
    laplace = LaplaceGuide(model).fit(data, progress=False)
    for bad in ("no", 0.5, None):
        with pytest.raises(ValueError, match="refine must be True or False"):
            laplace.optimize_prior_precision("val_nll", val_loader=data, refine=bad)


def test_a_guide_made_float64_before_its_fit_predicts_on_a_float64_head():
    """guide.double() before fit (for float64 eigenvectors) kept theta* in float64, and every prediction compared the
    head's rows rounded to float32 with it: "the head's rows changed since fit" on a head nothing had changed."""
    model = bert(dtype=torch.float64)
    head = find_head(model)
    with torch.no_grad():  # a float64-trained head: values no float32 holds exactly
        head.weight.add_(1e-9 * torch.randn_like(head.weight))
    guide = LastLayerLaplaceGuide(model).double().fit(bert_data(), progress=False)
    assert guide.loc.dtype == torch.float64 and torch.equal(guide.head_rows(), guide.loc)
    assert torch.isfinite(guide.predict_glm(bert_data(seeds=(7,))).probs).all()
    with torch.no_grad():  # and a head changed since is still refused
        head.weight.add_(1e-3)
    with pytest.raises(ValueError, match="changed since"):
        guide.predict_glm(bert_data(seeds=(7,)))


def test_a_missing_choices_logit_has_no_variance():
    """glm_logits reported J Sigma J^T with a row of variance (19.9) at a missing choice, whose -inf logit is a
    constant: its row of J is zero."""
    model = LoraModel(tiny_llama(), MultipleChoice(LETTERS, format="letter"), prior=0.5, num_data=5)
    guide = LastLayerLaplaceGuide(model, prior_precision=1.5).fit(letter_data(), progress=False)
    batch = letter_data("right")[0]
    mean, cov = guide.glm_logits(batch)
    missing = ~batch["choice_mask"].bool()
    assert missing.any() and torch.isneginf(mean[missing]).all()
    assert (cov[missing] == 0).all() and (cov.transpose(1, 2)[missing] == 0).all()
    assert (torch.diagonal(cov, dim1=1, dim2=2)[~missing] > 0).all()
