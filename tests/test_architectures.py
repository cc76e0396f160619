"""Every architecture family users fine-tune, as tiny random configs built in code: default LoRA targets, the weight
hand-off against peft's own logits, KFAC against the dense GGN, padding, adapter export and folder loading.

Decoders (Llama, Qwen2, Qwen3, Mistral, Gemma and Gemma 2 with tied embeddings, Phi-3 with a fused ``qkv_proj``,
GPT-2 with ``Conv1D`` layers, GPT-NeoX with a fused ``query_key_value``) run as sequence classifiers and as causal LMs
(letter and cloze multiple choice); encoders (BERT, RoBERTa) as classifiers. Each network is built once per module, its
LoRA B randomized (peft starts it at zero, which would hide any error in how B is applied). Gemma 2 also checks
that multiple choice applies its final logit softcapping (the LM head is called outside the model's forward).
"""

import copy
import warnings
from dataclasses import dataclass
from functools import partial

import pytest
import torch
from conftest import _randomize_b
from peft.tuners.lora import LoraLayer
from test_cloze import direct_scores
from test_laplace import dense_fisher, dense_ggn, site_blocks
from test_padding import (
    BLANK_RECORD, CLOZE_RECORDS, LETTER_RECORDS, LETTERS, PAD, _pad, alone_vs_batch, cloze_batch, letter_batch,
)
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from pyro_lora import LoraModel, MultipleChoice, SequenceClassification, export_adapter
from pyro_lora.guides import MAPGuide
from pyro_lora.guides.laplace import LaplaceGuide
from pyro_lora.pretrained import add_lora, default_lora_targets, load_adapter, load_pretrained

VOCAB, BOS, EOS = 64, 1, 2
NUM_LABELS = 3
S = 3  # weight samples in one forward
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, num_labels=NUM_LABELS,
    initializer_range=0.2,  # logits of order 1, not 0.01: a wrong weight shows well above the tolerances
)


def config(model_type, **extra):
    return AutoConfig.for_model(model_type, **COMMON, **extra)


@dataclass(frozen=True)
class Family:
    config: partial  # builds the tiny config
    targets: list  # what default_lora_targets must pick
    decoder: bool = True
    tied: bool = False  # the causal LM's output embedding is its input embedding


FAMILIES = {
    "llama": Family(partial(config, "llama", num_key_value_heads=2), ["q_proj", "v_proj"]),
    "qwen2": Family(partial(config, "qwen2", num_key_value_heads=2), ["q_proj", "v_proj"]),
    "qwen3": Family(partial(config, "qwen3", num_key_value_heads=2, head_dim=8), ["q_proj", "v_proj"]),
    "mistral": Family(partial(config, "mistral", num_key_value_heads=2, head_dim=8), ["q_proj", "v_proj"]),
    "gemma": Family(partial(config, "gemma", num_key_value_heads=2, head_dim=8), ["q_proj", "v_proj"], tied=True),
    # Gemma 2 also caps its final logits in Gemma2ForCausalLM.forward (final_logit_softcapping: 30 in the real
    # models, 3 here so that the tiny model's logits of order 1 feel it)
    "gemma2": Family(
        partial(config, "gemma2", num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0),
        ["q_proj", "v_proj"],
        tied=True,
    ),
    "phi3": Family(partial(config, "phi3", num_key_value_heads=2), ["qkv_proj"]),  # fused q, k, v
    "gpt2": Family(partial(config, "gpt2"), ["c_attn"], tied=True),  # a Conv1D: transposed weight, fan_in_fan_out
    "gpt_neox": Family(partial(config, "gpt_neox"), ["query_key_value"]),  # fused q, k, v
    "bert": Family(partial(config, "bert"), ["query", "value"], decoder=False),
    "roberta": Family(partial(config, "roberta"), ["query", "value"], decoder=False),
}
CLS = [(f, "cls") for f in FAMILIES]
LM = [(f, "lm") for f, family in FAMILIES.items() if family.decoder]
CASES = CLS + LM

# each head's likelihoods and the batch (collator layout) each is tested on
CLS_RECORDS = [r for r, _ in LETTER_RECORDS]  # token ids 3..63, lengths 5, 13, 9


def cls_batch(records, side="right", pad=PAD):
    """``ClassificationCollator``'s layout: right-padded rows, padding cells holding ``pad``."""
    ids, mask = _pad(records, side)
    labels = torch.arange(len(records)) % NUM_LABELS
    return {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask, "labels": labels}


LIKELIHOODS = {  # name: (likelihood, batch)
    "seqcls": (SequenceClassification, lambda: cls_batch(CLS_RECORDS)),
    "letter": (lambda: MultipleChoice(LETTERS, format="letter"), lambda: letter_batch(LETTER_RECORDS, "left")),
    "cloze": (lambda: MultipleChoice(format="cloze"), lambda: cloze_batch(CLOZE_RECORDS)),
}
HEAD_LIKELIHOODS = {"cls": ["seqcls"], "lm": ["letter", "cloze"]}
LIKELIHOOD_CASES = [(f, h, lik) for f, h in CASES for lik in HEAD_LIKELIHOODS[h]]


def params(cases):
    """The cases as pytest params named ``family-head[-likelihood]``."""
    return [pytest.param(*case, id="-".join(case)) for case in cases]


@pytest.fixture(scope="module")
def tiny():
    """``tiny(family, head) -> (base, net)``: the transformers model as built (kept pristine) and a copy wrapped by
    ``add_lora`` with its default targets and a random B, each built once per module. Tests that change a network
    change a copy."""
    cache = {}

    def get(family, head):
        if (family, head) not in cache:
            torch.manual_seed(0)
            auto = AutoModelForSequenceClassification if head == "cls" else AutoModelForCausalLM
            base = auto.from_config(FAMILIES[family].config()).eval()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")  # peft sets it for Conv1D
                net = add_lora(copy.deepcopy(base), r=4, alpha=8)
            _randomize_b(net)
            cache[family, head] = base, net.eval()
        return cache[family, head]

    return get


def build(tiny, family, head, likelihood, copy_net=False):
    """``(LoraModel, batch)`` of the family's network under the named likelihood."""
    net = tiny(family, head)[1]
    make_likelihood, make_batch = LIKELIHOODS[likelihood]
    return LoraModel(copy.deepcopy(net) if copy_net else net, make_likelihood()), make_batch()


def samples_around(model, scale=0.1, seed=0):
    """``[S, ...]`` site values: the adapter's own values first, then ``S - 1`` values around them."""
    g = torch.Generator().manual_seed(seed)
    values = model.adapter_values()
    noise = {k: scale * torch.randn(S - 1, *v.shape, generator=g) for k, v in values.items()}
    return {k: torch.cat([v[None], v + noise[k]]) for k, v in values.items()}


def one_sample(values, s):
    return {k: v[s] for k, v in values.items()}


def max_change(a, b):
    """Largest |a - b| over the entries finite in both (missing choices are -inf in both)."""
    finite = torch.isfinite(a) & torch.isfinite(b)
    assert finite.any()
    return float((a - b)[finite].abs().max())


# ------------------------------------------------------------------------------------------- default targets


@pytest.mark.parametrize(("family", "head"), params(CASES))
def test_default_targets_pick_each_familys_attention_projections(tiny, family, head):
    base, net = tiny(family, head)
    expected = FAMILIES[family].targets
    assert default_lora_targets(base) == expected
    assert default_lora_targets(net) == expected  # seen through the peft wrapper
    adapted = [name for name, m in net.named_modules() if isinstance(m, LoraLayer)]
    assert sorted({name.rsplit(".", 1)[-1] for name in adapted}) == sorted(expected)
    assert len(adapted) == base.config.num_hidden_layers * len(expected)
    assert net.peft_config["default"].fan_in_fan_out == (family == "gpt2")  # Conv1D stores its weight transposed
    if head == "lm":
        tied = base.get_output_embeddings().weight is base.get_input_embeddings().weight
        assert tied == base.config.tie_word_embeddings == FAMILIES[family].tied


# ------------------------------------------------------------------------------------------- weight hand-off


@pytest.mark.parametrize(("family", "head", "likelihood"), params(LIKELIHOOD_CASES))
def test_handed_adapter_values_reproduce_peft_logits_and_other_values_change_them(tiny, family, head, likelihood):
    model, batch = build(tiny, family, head, likelihood)
    values = samples_around(model)
    with torch.no_grad():
        peft = model.logits(batch)  # peft's own forward
        handed = model.logits(batch, model.adapter_values())
        with model.net.disable_adapter():
            without = model.logits(batch)
        singles = torch.stack([model.logits(batch, one_sample(values, s)) for s in range(S)])
        joint = model.logits(batch, values, num_samples=S)  # S samples in one batched forward
    torch.testing.assert_close(handed, peft, rtol=1e-5, atol=1e-5)
    assert max_change(peft, without) > 1e-3  # the adapter acts, so the equality above is not the base's
    assert max_change(singles[1], peft) > 1e-3  # other values reach the forward
    assert joint.shape == (S, *peft.shape)
    torch.testing.assert_close(joint, singles, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(joint[0], peft, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- KFAC


KFAC_CASES = [(f, "cls", "seqcls") for f, _ in CLS] + [(f, "lm", "letter") for f, _ in LM]


def one_token(likelihood):
    batch = {"input_ids": torch.tensor([[7]]), "attention_mask": torch.tensor([[1]]), "labels": torch.tensor([1])}
    return batch | ({"choice_mask": torch.ones(1, len(LETTERS), dtype=torch.bool)} if likelihood == "letter" else {})


@pytest.mark.parametrize(("family", "head", "likelihood"), params(KFAC_CASES))
def test_kfac_equals_the_exact_ggn_for_one_token(tiny, family, head, likelihood):
    model, _ = build(tiny, family, head, likelihood)
    data = [one_token(likelihood)]
    guide = LaplaceGuide(model, fisher="exact", rank=8).fit(data, progress=False)
    ggn = site_blocks(guide, dense_ggn(model, guide, data))
    assert set(ggn) == set(model.sites)
    for name, kfac in dense_fisher(guide).items():
        torch.testing.assert_close(kfac, ggn[name], rtol=1e-3, atol=1e-5)
        # attention over one key ignores the query: only a separate query projection's blocks are zero
        ignored = name.split(".")[0] in ("q_proj", "query")
        assert (ggn[name].abs().max() > 1e-4) != ignored, name


# ------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize(("family", "head"), params(CLS))
def test_classifier_logits_do_not_depend_on_right_padding_and_left_padding_is_refused(tiny, family, head):
    model, batch = build(tiny, family, head, "seqcls")
    values = samples_around(model)
    with torch.no_grad():
        for v, num_samples in [(None, None), (values, S)]:
            alone, inside = alone_vs_batch(model, CLS_RECORDS, cls_batch, v, num_samples)
            torch.testing.assert_close(inside, alone, rtol=0, atol=1e-5)
            # padding cells holding eos (a tokenizer padding with eos): a decoder's head still reads the last real token
            eos_padded = model.logits(cls_batch(CLS_RECORDS, pad=EOS), v, num_samples=num_samples)
            torch.testing.assert_close(eos_padded, model.logits(batch, v, num_samples=num_samples), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="right-padded"):
        model.logits(cls_batch(CLS_RECORDS, "left"))


@pytest.mark.parametrize(("family", "head"), params(LM))
def test_letter_logits_do_not_depend_on_left_or_right_padding(tiny, family, head):
    model, _ = build(tiny, family, head, "letter")
    values = samples_around(model)
    with torch.no_grad():
        for side in ("left", "right"):  # LetterCollator's default, and padding_side="right"
            make = partial(letter_batch, side=side)
            for v, num_samples in [(None, None), (values, S)]:
                alone, inside = alone_vs_batch(model, LETTER_RECORDS, make, v, num_samples)
                torch.testing.assert_close(inside, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("family", "head"), params(LM))
def test_cloze_logits_do_not_depend_on_padding_or_batch(tiny, family, head):
    model, _ = build(tiny, family, head, "cloze")
    values = samples_around(model)
    with torch.no_grad():
        # shared prefixes (one key/value cache per question), then with a WinoGrande record (full rows)
        for records in (CLOZE_RECORDS, CLOZE_RECORDS + [BLANK_RECORD]):
            for v, num_samples in [(None, None), (values, S)]:
                alone, inside = alone_vs_batch(model, records, cloze_batch, v, num_samples)
                torch.testing.assert_close(inside, alone, rtol=0, atol=1e-5)


LM_LIKELIHOOD_CASES = [case for case in LIKELIHOOD_CASES if case[1] == "lm"]


@pytest.mark.parametrize(("family", "head", "likelihood"), params(LM_LIKELIHOOD_CASES))
def test_multiple_choice_logits_are_the_networks_own(tiny, family, head, likelihood):
    """Letter: the next-token logits of the prompt alone; cloze: each choice's log-likelihood, one unpadded forward
    per choice, both through the network's own forward (its ``logits``)."""
    model, batch = build(tiny, family, head, likelihood)
    with torch.no_grad():
        logits = model.logits(batch)
        if likelihood == "letter":
            alone = [(model.net(input_ids=torch.tensor([prompt])).logits, k) for prompt, k in LETTER_RECORDS]
            expected = [own[0, -1, LETTERS[:k]] for own, k in alone]
        else:
            expected = direct_scores(model.net, CLOZE_RECORDS)
    for b, own in enumerate(expected):
        torch.testing.assert_close(logits[b, : len(own)], own, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------- export and loading


@pytest.mark.parametrize(("family", "head"), params(CASES))
def test_exported_sample_reloads_onto_a_fresh_base_with_the_handed_logits(tiny, family, head, tmp_path):
    likelihood = HEAD_LIKELIHOODS[head][0]
    model, batch = build(tiny, family, head, likelihood, copy_net=True)
    sample = one_sample(samples_around(model), 1)
    with torch.no_grad():
        if head == "cls":  # a head trained beside the LoRA (peft's modules_to_save) travels with the adapter
            assert model.point_parameters()
            for p in model.point_parameters():
                p.add_(torch.randn_like(p))
        before = model.logits(batch)
        handed = model.logits(batch, sample)
    export_adapter(MAPGuide(model, init=sample), tmp_path / "adapter")  # the guide's mean: the sample
    reloaded = load_adapter(copy.deepcopy(tiny(family, head)[0]), tmp_path / "adapter").eval()
    with torch.no_grad():
        again = LoraModel(reloaded, LIKELIHOODS[likelihood][0]()).logits(batch)
    torch.testing.assert_close(again, handed, rtol=1e-5, atol=1e-5)
    assert max_change(handed, before) > 1e-3  # what was exported is not what the adapter held before


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer whose ids stay below the tiny models' vocabulary (pad 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a cat dog sat on mat good bad film movie was is very not".split()
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


@pytest.mark.parametrize(("family", "head"), params(CASES))
def test_load_pretrained_reads_a_saved_folder_with_the_same_default_targets(tiny, tokenizer, family, head, tmp_path):
    base = tiny(family, head)[0]
    base.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_pretrained(
        str(tmp_path), "classification" if head == "cls" else "causal_lm", num_labels=NUM_LABELS, progress=False
    )
    assert type(loaded) is type(base)
    assert default_lora_targets(loaded) == FAMILIES[family].targets  # what `pyro-lora compare --model PATH` adapts
    inputs = loaded_tokenizer(["the cat sat on the mat", "a very good film"], padding=True, return_tensors="pt")
    tokens = inputs["input_ids"]
    assert (tokens != loaded_tokenizer.unk_token_id).all() and tokens.max() < VOCAB  # known words, inside the vocab
    with torch.no_grad():  # the weights were read, not freshly initialised
        torch.testing.assert_close(loaded(**inputs).logits, base(**inputs).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("family", "post_head"), [("cohere", {"logit_scale": 0.3}), ("granite", {"logits_scaling": 4.0})])
def test_multiple_choice_repeats_what_the_forward_does_after_the_lm_head(family, post_head):
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, initializer_range=0.2, **post_head)
    net = AutoModelForCausalLM.from_config(config).eval()
    prompt = torch.tensor([[5, 9, 17, 23, 31]])
    batch = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "choice_mask": torch.ones(1, 3, dtype=torch.bool)}
    with torch.no_grad():
        ours = MultipleChoice([10, 11, 12], format="letter").logits(net, batch)[0]
        theirs = net(input_ids=prompt).logits[0, -1, [10, 11, 12]]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (theirs - theirs.mean()).abs().max() > 0.05


def test_a_causal_lm_whose_forward_changes_the_head_logits_is_refused_for_multiple_choice():
    from transformers import LlamaForCausalLM

    class Doubled(LlamaForCausalLM):  # a family doing something after its LM head that MultipleChoice cannot know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, initializer_range=0.2)
    with pytest.raises(ValueError, match="Doubled's forward changes its LM head's logits.*not supported for multiple choice"):
        LoraModel(add_lora(Doubled(config), r=2), MultipleChoice([10, 11, 12], format="letter"))
    LoraModel(add_lora(LlamaForCausalLM(config), r=2), MultipleChoice([10, 11, 12], format="letter"))  # the plain one is taken


def tiny_albert(num_hidden_layers=2):
    from peft import LoraConfig, get_peft_model
    from transformers import AlbertConfig, AlbertForSequenceClassification

    torch.manual_seed(0)
    config = AlbertConfig(vocab_size=64, embedding_size=16, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_hidden_layers=num_hidden_layers, num_hidden_groups=1, max_position_embeddings=64, num_labels=3)
    net = get_peft_model(AlbertForSequenceClassification(config),
                         LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    _randomize_b(net)
    return LoraModel(net.eval(), SequenceClassification(), num_data=2)


def test_a_lora_layer_shared_across_depths_is_refused_where_one_application_per_forward_is_assumed():
    """ALBERT runs one encoder layer at every depth. KFAC and the GLM Jacobians kept its last application only (the
    factor's trace 5.7e-5 against the exact GGN's 2.0e-4; a GLM covariance 3.7x too small) and flipout drew its sign
    flips anew at every depth, two weights for one example. Plain weight samples apply one weight everywhere: right."""
    from pyro.infer import Trace_ELBO

    from pyro_lora.guides import MeanFieldGuide

    batch = {"input_ids": torch.tensor([[9, 4, 7], [5, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "labels": torch.tensor([1, 2])}
    model = tiny_albert()
    with pytest.raises(ValueError, match=r"LoRA layer .*query runs more than once in one forward .*as ALBERT's"):
        LaplaceGuide(model).fit([batch], progress=False)
    with pytest.raises(ValueError, match="a LoRA layer ran twice in one forward with flipout"):
        Trace_ELBO().differentiable_loss(model, MeanFieldGuide(model, flipout=True), batch)
    Trace_ELBO().differentiable_loss(model, MeanFieldGuide(model), batch)  # one weight draw per forward: supported
    with torch.no_grad():  # that draw is the weight of every depth: peft's own forward with it written in
        values = {n: v + 0.1 * torch.randn_like(v) for n, v in model.adapter_values().items()}
        handed = model.logits(batch, values)
        model.write_adapter(values)
        torch.testing.assert_close(handed, model.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    single = tiny_albert(num_hidden_layers=1)  # each layer once: both run
    LaplaceGuide(single).fit([batch], progress=False)
    Trace_ELBO().differentiable_loss(single, MeanFieldGuide(single, flipout=True), batch)


def _per_sample_logits(model, batch, values, num_samples):
    out = []
    for s in range(num_samples):
        model.write_adapter({k: v[s] for k, v in values.items()})
        out.append(model.logits(batch))
    return torch.stack(out)


def test_layers_whose_rows_are_not_the_batch_refuse_a_shared_forward_and_predict_one_sample_at_a_time():
    """DeBERTa-v2's relative attention runs query_proj on [1, 2k, H] position embeddings and Longformer its projections
    sequence-first: S samples in one forward split positions among the samples (0.64 off in logits), silently."""
    from transformers import DebertaV2Config, LongformerConfig, XLNetConfig

    from pyro_lora import predict

    configs = [
        DebertaV2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=64, num_labels=3, relative_attention=True, pos_att_type=["p2c", "c2p"],
                        share_att_key=True, position_buckets=8, norm_rel_ebd="layer_norm", position_biased_input=False,
                        pad_token_id=0),
        LongformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=80, attention_window=[4, 4], pad_token_id=1, num_labels=3),
        # XLNet runs every layer on [T, N, d]: T = 8 rows split evenly among S = 2 samples, so no shape check fired
        XLNetConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, d_inner=64, num_labels=3, pad_token_id=0),
    ]
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    for config in configs:
        torch.manual_seed(0)
        targets = ["layer_1", "layer_2"] if config.model_type == "xlnet" else None
        net = add_lora(AutoModelForSequenceClassification.from_config(config), r=4, alpha=8, targets=targets).eval()
        model = LoraModel(net, SequenceClassification(), num_data=2)
        start = model.adapter_values()
        values = {k: v + 0.3 * torch.randn(2, *v.shape) for k, v in start.items()}
        with torch.no_grad(), pytest.raises(ValueError, match="cannot share one forward.*chunk_size=1"):
            model.logits(batch, values, num_samples=2)
        with torch.no_grad():
            one_by_one = torch.cat([model.logits(batch, {k: v[s:s + 1] for k, v in values.items()}, num_samples=1)
                                    for s in range(2)])
            torch.testing.assert_close(one_by_one, _per_sample_logits(model, batch, values, 2), atol=1e-5, rtol=1e-5)
        model.write_adapter(start)
        guide = MAPGuide(model)
        assert predict(model, guide, [batch], num_samples=1).probs.shape == (2, 3)
        if config.model_type == "xlnet":  # KFAC's 'reduce' averaged over the batch, not the tokens (factor 0.78 off)
            with pytest.raises(ValueError, match="xlnet network runs LoRA layers sequence-first.*Laplace"):
                LaplaceGuide(model).fit([batch], progress=False)
        # flipout draws its signs per row of a layer's input: per position here, the same noise for every example
        # (correlation 1.0 between examples); DeBERTa's query_proj runs twice, on the positions too
        a_sites = {n: v for n, v in start.items() if model.sites[n].matrix == "A"}
        message = ("sequence-first .*flipout's sign flips would be drawn per position" if config.model_type != "deberta-v2"
                   else "ran twice in one forward with flipout .*DeBERTa's query_proj")
        with torch.no_grad(), pytest.raises(ValueError, match=message):
            model.logits(batch, start, flipout_locs=a_sites)
    # a layer run once, on the relative-position embeddings alone ([1, 2k, H]: DeBERTa's pos_key_proj without shared
    # keys): every example shared its one sign draw, silently, where the docs promise a refusal
    config = DebertaV2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=64, num_labels=3, relative_attention=True, position_buckets=8,
                             pos_att_type=["p2c", "c2p"], share_att_key=False, max_relative_positions=16, pad_token_id=0)
    torch.manual_seed(0)
    net = add_lora(AutoModelForSequenceClassification.from_config(config), r=4, alpha=8, targets=["pos_key_proj"]).eval()
    model = LoraModel(net, SequenceClassification(), num_data=2)
    start = model.adapter_values()
    with torch.no_grad(), pytest.raises(ValueError, match=r"got an input of 1 rows along its first dim, not the batch's 2: "
                                                          r".*flipout draws its sign flips per row"):
        model.logits(batch, start, flipout_locs={n: v for n, v in start.items() if model.sites[n].matrix == "A"})
    model.logits(batch, start)  # one draw per forward: every layer takes it, whatever rows it runs on


def test_handed_values_are_checked_for_every_site_and_its_shape():
    """logits took values missing a layer (the adapter's own matrices ran there: 0.37 off), an extra layer, an unknown
    site, or a sample dim without num_samples, without a word or with a torch error."""
    from conftest import tiny_llama

    from pyro_lora.likelihoods import CausalLM

    model = LoraModel(tiny_llama(), CausalLM())
    values = model.adapter_values()
    batch = {"input_ids": torch.randint(1, 64, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    first = next(iter(values))
    for bad, num_samples, message in [
        ({**values, first: values[first][None, :1]}, 1, "expects shape"),
        ({**values, first: torch.cat([values[first], values[first][:1]])[None]}, 1, "expects shape"),
        ({**values, "q_proj.lora_AA": values[first]}, None, "unknown site"),
        ({k: v for k, v in values.items() if k != first}, None, "no value for site"),
        ({k: v[None] for k, v in values.items()}, None, "expects shape"),
        ({k: v.expand(3, *v.shape) for k, v in values.items()}, 2, "3 samples along its leading dim, not num_samples=2"),
    ]:
        with torch.no_grad(), pytest.raises(ValueError, match=message):
            model.logits(batch, bad, num_samples=num_samples)
    # flipout means too: a [1, r, d] mean of a two-layer stack left layer 1 without flipout; an unknown site a KeyError
    a = next(n for n, s in model.sites.items() if s.matrix == "A")
    for locs, message in [({a: values[a][:1]}, "expects shape"), ({"nope": values[a]}, "unknown site"),
                          ({a: values[a][0]}, "expects shape")]:
        with torch.no_grad(), pytest.raises(ValueError, match=message):
            model.logits(batch, values, flipout_locs=locs)


def _gemma3_multimodal(cap):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                final_logit_softcapping=cap, sliding_window=4, initializer_range=0.2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=63,
                          boi_token_index=61, eoi_token_index=62)
    return add_lora(Gemma3ForConditionalGeneration(config), r=2, targets=r"model\.language_model.*\.(q_proj|v_proj)").eval()


def test_the_logit_steps_repeated_are_those_the_running_forward_applies():
    """Gemma3ForConditionalGeneration does not softcap its logits, but MultipleChoice applied its text config's
    final_logit_softcapping: refused as a forward that 'changes its LM head's logits' (cap 3), or its scores capped where
    the model's are not (cap 30). RecurrentGemma softcaps by logits_soft_cap, which MultipleChoice did not apply."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    torch.manual_seed(0)
    recurrent = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=8,
        lru_width=32, attention_window_size=4, num_key_value_heads=1, block_types=["recurrent", "attention"], pad_token_id=0,
        logits_soft_cap=1.5))
    prompt = torch.tensor([[5, 9, 17, 23, 31]])
    batch = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "choice_mask": torch.ones(1, 3, dtype=torch.bool)}
    for net in (_gemma3_multimodal(3.0), _gemma3_multimodal(30.0), add_lora(recurrent, r=2, targets=["q_proj"]).eval()):
        with torch.no_grad():
            ours = LoraModel(net, MultipleChoice([10, 11, 12], format="letter")).logits(batch)[0]
            theirs = net(input_ids=prompt).logits[0, -1, [10, 11, 12]]
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_a_refused_forward_names_the_logit_step_multiple_choice_applies():
    """Where the forward names a step it does not take, the probe's refusal says that MultipleChoice re-applied it."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class Uncapped(Gemma2ForCausalLM):
        def forward(self, input_ids=None, **kwargs):  # leaves final_logit_softcapping out
            hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
            return CausalLMOutputWithPast(logits=self.lm_head(hidden))

    torch.manual_seed(0)
    net = Uncapped(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, pad_token_id=0, final_logit_softcapping=0.5))
    with pytest.raises(ValueError, match=r"Uncapped's forward changes its LM head's logits.*MultipleChoice applies a final "
                                         r"logit softcapping \(final_logit_softcapping=0.5\) itself, as its forward names it"):
        LoraModel(add_lora(net, r=2), MultipleChoice([10, 11, 12], format="letter"))


# ------------------------------------------------------------------------------------------- what no likelihood scores


def _non_causal(kind):
    """A network that is no causal LM, LoRA on its attention: a Gemma 3 decoder with bidirectional attention
    (EmbeddingGemma's setting), BERT's LM head without ``is_decoder``, T5 (an encoder-decoder), BERT's masked LM (plain
    peft: add_lora refuses it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    if kind == "bidirectional":
        base = AutoModelForCausalLM.from_config(config("gemma3_text", num_key_value_heads=2, head_dim=8, sliding_window=4,
                                                       use_bidirectional_attention=True))
    elif kind == "bert_lm_head":
        base = AutoModelForCausalLM.from_config(config("bert"))
    elif kind == "t5":
        base = AutoModelForSeq2SeqLM.from_config(config("t5", d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                                        decoder_start_token_id=0))
    else:
        base = AutoModelForMaskedLM.from_config(config("bert"))
    targets = {"bidirectional": ["q_proj", "v_proj"], "t5": ["q", "v"]}.get(kind, ["query", "value"])
    return get_peft_model(base.eval(), LoraConfig(r=2, target_modules=targets)).eval()


NON_CAUSAL = {"bidirectional": "Gemma3ForCausalLM attends to later tokens", "bert_lm_head": "BertLMHeadModel attends to later tokens",
              "t5": "T5ForConditionalGeneration is an encoder-decoder", "masked": "BertForMaskedLM is a masked LM"}


@pytest.mark.parametrize("likelihood", ["causal_lm", "letter", "cloze"])
@pytest.mark.parametrize("kind", NON_CAUSAL)
def test_a_network_that_is_no_causal_lm_is_refused_by_every_causal_likelihood(kind, likelihood):
    """A bidirectional Gemma 3 was scored as a causal LM (cloze scores 0.68 off its own forward, or each token's score
    seeing the token itself); T5 failed inside its decoder, BERT's masked LM was refused for "changing its LM head's
    logits", not for what it is."""
    from pyro_lora import CausalLM

    net = _non_causal(kind)
    if kind in ("bidirectional", "bert_lm_head"):  # the network's own forward: position 3 sees token 5
        ids = torch.tensor([[BOS, 5, 6, 7, 8, 9]])
        with torch.no_grad():
            moved = net(input_ids=ids).logits[0, 3] - net(input_ids=ids.where(torch.arange(6) < 5, 40)).logits[0, 3]
        assert moved.abs().max() > 0.1
    make = {"causal_lm": CausalLM, **{k: LIKELIHOODS[k][0] for k in ("letter", "cloze")}}[likelihood]
    with pytest.raises(ValueError, match=NON_CAUSAL[kind] + ".*needs a decoder-only causal LM"):
        LoraModel(net, make())


def test_the_causal_twin_of_a_bidirectional_decoder_is_taken():
    from pyro_lora import CausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config("gemma3_text", num_key_value_heads=2, head_dim=8, sliding_window=4))
    net = add_lora(base.eval(), r=2)
    for likelihood in (CausalLM(), MultipleChoice(LETTERS, format="letter"), MultipleChoice(format="cloze")):
        LoraModel(net, likelihood)


def test_add_lora_refuses_a_masked_or_encoder_decoder_lm_by_name():
    """peft's causal-LM wrapper failed on BertForMaskedLM with "no attribute 'prepare_inputs_for_generation'"."""
    from transformers import AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    with pytest.raises(ValueError, match="BertForMaskedLM is a masked LM.*task='classification'"):
        add_lora(AutoModelForMaskedLM.from_config(config("bert")), r=2)
    t5 = AutoModelForSeq2SeqLM.from_config(config("t5", d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder"):
        add_lora(t5, r=2)


def test_load_pretrained_refuses_a_bidirectional_decoder_as_a_causal_lm_before_loading(tmp_path, tokenizer):
    from pyro_lora.model_files import encoder_only

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config("gemma3_text", num_key_value_heads=2, head_dim=8, sliding_window=4,
                                            use_bidirectional_attention=True)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert "use_bidirectional_attention" in encoder_only(str(tmp_path))
    with pytest.raises(ValueError, match="use_bidirectional_attention.*no causal LM"):
        load_pretrained(str(tmp_path), "causal_lm")


@pytest.mark.parametrize("head", ["causal_lm", "masked_lm", "tokens"])
def test_sequence_classification_refuses_logits_that_are_not_one_row_per_example(head):
    """LlamaForCausalLM under SequenceClassification was built and predict returned probs [3, 13, 64], a vocabulary
    softmax per token beside labels [3]; fit failed at its first step with a label-shape message."""
    from transformers import AutoModelForMaskedLM, AutoModelForTokenClassification

    torch.manual_seed(0)
    base = {"causal_lm": lambda: AutoModelForCausalLM.from_config(FAMILIES["llama"].config()),
            "masked_lm": lambda: AutoModelForMaskedLM.from_config(config("bert")),
            "tokens": lambda: AutoModelForTokenClassification.from_config(config("bert"))}[head]()
    net = add_lora(base.eval(), r=2, task="classification")
    name = type(base).__name__
    batch = cls_batch(CLS_RECORDS)
    with torch.no_grad():  # the network's own logits: a row per token
        assert net(input_ids=batch["input_ids"]).logits.dim() == 3
    with pytest.raises(ValueError, match=rf"{name} gives logits of shape \(1, 4, \d+\) for 1 example.*SequenceClassification "
                                         "needs a sequence-classification head"):
        LoraModel(net, SequenceClassification())


def test_sequence_classification_refuses_per_token_logits_at_the_first_forward_without_an_embedding():
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    class PerToken(torch.nn.Module):  # float inputs, no embedding to probe with: [B, T, 6] -> [B, T, 3]
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 3)

        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=self.fc(input_ids))

    model = LoraModel(get_peft_model(PerToken(), LoraConfig(r=2, target_modules=["fc"])), SequenceClassification())
    with pytest.raises(ValueError, match=r"PerToken gives logits of shape \(2, 5, 3\) for 2 example"):
        model.logits({"input_ids": torch.randn(2, 5, 6), "labels": torch.tensor([0, 1])})
