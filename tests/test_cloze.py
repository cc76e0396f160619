"""The cloze multiple-choice likelihood against direct per-choice computations on a tiny causal LM."""

import pytest
import torch
from conftest import tiny_llama

from pyro_lora.guides import MAPGuide
from pyro_lora import LoraModel, MultipleChoice, fit

# two questions; the second has only 2 of 3 choices. (context ids, continuation ids) per choice.
ITEMS = [
    [([3, 9, 4], [11, 12]), ([3, 9, 4], [13]), ([3, 9, 4], [14, 15, 16])],
    [([5, 6], [20]), ([5, 7], [21, 22])],
]


def cloze_batch(items=ITEMS, labels=(2, 1), extra_pad=0):
    k = max(len(c) for c in items)
    rows, targets, mask = [], [], []
    for choices in items:
        for j in range(k):
            ctx, cont = choices[j] if j < len(choices) else ([1], [])
            rows.append(ctx + cont)
            targets.append([False] * len(ctx) + [True] * len(cont))
            mask.append(j < len(choices))
    t = max(map(len, rows)) + extra_pad
    ids = torch.tensor([r + [0] * (t - len(r)) for r in rows])
    return {
        "input_ids": ids,
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows]),
        "target_mask": torch.tensor([m + [False] * (t - len(m)) for m in targets]),
        "target_lengths": torch.tensor([max(1, sum(m)) for m in targets]),
        "target_chars": torch.tensor([3 * max(1, sum(m)) for m in targets]),
        "choice_mask": torch.tensor(mask).view(len(items), k),
        "labels": torch.tensor(labels),
    }


def direct_scores(net, items=ITEMS):
    """Sum of log p(continuation token | prefix), one unpadded forward per choice."""
    out = []
    for choices in items:
        row = []
        for ctx, cont in choices:
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(net(input_ids=ids).logits[0], -1)
            row.append(sum(logp[len(ctx) + i - 1, tok] for i, tok in enumerate(cont)))
        out.append(torch.stack(row))
    return out


def test_cloze_logits_equal_direct_computation():
    net = tiny_llama()
    model = LoraModel(net, MultipleChoice(format="cloze"))
    logits = model.logits(cloze_batch())
    expected = direct_scores(net)
    torch.testing.assert_close(logits[0], expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1, :2], expected[1], rtol=1e-4, atol=1e-4)
    assert torch.isneginf(logits[1, 2])


def test_cloze_padding_and_normalisation():
    net = tiny_llama()
    plain = LoraModel(net, MultipleChoice(format="cloze")).logits(cloze_batch())
    padded = LoraModel(net, MultipleChoice(format="cloze")).logits(cloze_batch(extra_pad=5))
    torch.testing.assert_close(plain, padded, rtol=1e-4, atol=1e-4)
    per_token = LoraModel(net, MultipleChoice(format="cloze", normalize="tokens")).logits(cloze_batch())
    torch.testing.assert_close(per_token[0], plain[0] / torch.tensor([2.0, 1.0, 3.0]), rtol=1e-4, atol=1e-4)
    per_char = LoraModel(net, MultipleChoice(format="cloze", normalize="chars")).logits(cloze_batch())
    torch.testing.assert_close(per_char[0], plain[0] / torch.tensor([6.0, 3.0, 9.0]), rtol=1e-4, atol=1e-4)

    for normalize, key in (("tokens", "target_lengths"), ("chars", "target_chars")):  # a bare KeyError after the forward
        batch = {k: v for k, v in cloze_batch().items() if k != key}
        with pytest.raises(ValueError, match=f"normalize='{normalize}'.* the batch's '{key}' .*ClozeCollator writes it"):
            LoraModel(net, MultipleChoice(format="cloze", normalize=normalize)).logits(batch)


def test_cloze_s_sample_path_equals_single_forwards():
    model = LoraModel(tiny_llama(), MultipleChoice(format="cloze", normalize="tokens"))
    batch = cloze_batch()
    values = {k: v + 0.2 * torch.randn(3, *v.shape) for k, v in model.adapter_values().items()}
    joint = model.logits(batch, values, num_samples=3)
    singles = torch.stack([model.logits(batch, {k: v[s] for k, v in values.items()}) for s in range(3)])
    torch.testing.assert_close(joint, singles, rtol=1e-4, atol=1e-4)


def test_training_raises_the_correct_choice():
    model = LoraModel(tiny_llama(), MultipleChoice(format="cloze"), num_data=2, prior=10.0)
    guide = MAPGuide(model)
    items = [[([3, 9, 4], [11]), ([3, 9, 4], [12]), ([3, 9, 4], [13])], [([5, 6], [20]), ([5, 6], [21])]]
    batch = cloze_batch(items)
    before = torch.softmax(model.logits(batch), -1)[[0, 1], [2, 1]]
    fit(model, guide, [batch] * 40, lr=3e-2, progress=False)
    after = torch.softmax(model.logits(batch, guide.mean()), -1)[[0, 1], [2, 1]]
    assert (after > 0.5).all() and (after > before + 0.15).all()


SHARED = [
    [([3, 9, 4, 8], [11, 12]), ([3, 9, 4, 8], [13]), ([3, 9, 4, 8], [14, 15, 16])],
    [([5, 6], [20]), ([5, 6], [21, 22])],  # shorter context, one choice missing
]


def test_shared_prefix_path_equals_full_rows():
    from pyro_lora.likelihoods import _shared_context

    net = tiny_llama()
    batch = cloze_batch(SHARED, extra_pad=2)
    assert _shared_context(batch) is not None and _shared_context(cloze_batch()) is None
    shared = LoraModel(net, MultipleChoice(format="cloze")).logits(batch)
    full = LoraModel(net, MultipleChoice(format="cloze", share_prefix=False)).logits(batch)
    torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-4)
    expected = direct_scores(net, SHARED)
    torch.testing.assert_close(shared[1, :2], expected[1], rtol=1e-4, atol=1e-4)


def test_shared_prefix_s_samples_and_gradients():
    model = LoraModel(tiny_llama(), MultipleChoice(format="cloze"))
    reference = LoraModel(model.net, MultipleChoice(format="cloze", share_prefix=False))
    batch = cloze_batch(SHARED)
    values = {k: (v + 0.2 * torch.randn(3, *v.shape)).requires_grad_() for k, v in model.adapter_values().items()}
    joint = model.logits(batch, values, num_samples=3)
    full = reference.logits(batch, values, num_samples=3)
    torch.testing.assert_close(joint, full, rtol=1e-4, atol=1e-4)
    finite = joint[torch.isfinite(joint)].sum()
    grads = torch.autograd.grad(finite, list(values.values()))
    ref_grads = torch.autograd.grad(full[torch.isfinite(full)].sum(), list(values.values()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4)


def _llama(seed=8, **config):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, initializer_range=0.5, **config)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()


def test_a_length_dependent_rope_is_scored_in_full_rows():
    """Dynamic NTK rescales the rotary frequencies once a forward passes max_position_embeddings: a 7-token question
    alone kept the unscaled ones, its 10-token rows the rescaled ones (0.96 in probability, the answer flipped)."""
    from pyro_lora.likelihoods import _can_share_prefix, _decoder_and_head

    net = _llama(max_position_embeddings=8, rope_parameters={"rope_type": "dynamic", "factor": 8.0, "rope_theta": 100.0})
    g = torch.Generator().manual_seed(8)
    ctx = torch.randint(1, 64, (7,), generator=g).tolist()
    items = [[(ctx, torch.randint(1, 64, (3,), generator=g).tolist()) for _ in range(3)]]
    assert not _can_share_prefix(_decoder_and_head(net)[0])
    assert _can_share_prefix(_decoder_and_head(_llama(max_position_embeddings=8))[0])
    # what a run's scoring form reads: cloze scoring shared this cache before 2026-12-02 (form 0)
    assert not MultipleChoice(format="cloze").shares_prefix(net)
    assert MultipleChoice(format="cloze").shares_prefix(_llama(max_position_embeddings=8))
    assert not MultipleChoice(format="cloze", share_prefix=False).shares_prefix(_llama(max_position_embeddings=8))
    with torch.no_grad():
        logits = LoraModel(net, MultipleChoice(format="cloze")).logits(cloze_batch(items, labels=(0,)))
        torch.testing.assert_close(logits[0], direct_scores(net, items)[0], rtol=1e-4, atol=1e-4)


def test_a_target_with_a_gap_scores_its_own_tokens_only():
    """A target_mask skipping a connector token: the shared path read runs of consecutive tokens (0.86 in probability)."""
    net = _llama(seed=0, max_position_embeddings=64)
    batch = cloze_batch([[([5, 9, 13, 4], [20, 7, 22]), ([5, 9, 13, 4], [23, 7, 25])]], labels=(0,))
    batch["target_mask"][:, 5] = False  # the connector 7 is context, not scored
    batch["target_lengths"] = batch["target_mask"].sum(1)
    with torch.no_grad():
        shared = LoraModel(net, MultipleChoice(format="cloze")).logits(batch)
        logp = [torch.log_softmax(net(input_ids=row[None]).logits[0], -1) for row in batch["input_ids"]]
    expected = torch.stack([lp[3, row[4]] + lp[5, row[6]] for lp, row in zip(logp, batch["input_ids"])])
    torch.testing.assert_close(shared[0], expected, rtol=1e-4, atol=1e-4)


def test_transformers_checkpointing_in_training_scores_every_row_in_full():
    """Checkpointing drops the decoder's cache: the shared path crashed on it (AttributeError on None)."""
    losses = {}
    for checkpointing in (False, True):
        model = LoraModel(tiny_llama(), MultipleChoice(format="cloze"), num_data=2)
        torch.manual_seed(0)
        losses[checkpointing] = fit(model, MAPGuide(model), [cloze_batch(SHARED)], progress=False, gradient_checkpointing=checkpointing)
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-5)


def _target_at_zero(b):
    b["target_mask"][0, 0] = True


def _target_on_padding(b):
    b["target_mask"][1, 4] = True  # row 1 is 4 tokens long, then padding


def _empty_target(b):
    b["target_mask"][1] = False


@pytest.mark.parametrize("change, match", [
    (_target_at_zero, r"row\(s\) \[0\] \(present choices\) have a target at position 0 \(no earlier position predicts it"),
    (_target_on_padding, r"row\(s\) \[1\] \(present choices\) have a target on padding"),
    (_empty_target, r"row\(s\) \[1\] \(present choices\) have an empty target \(its score would be 0"),
    (lambda b: b.update(target_mask=b["target_mask"][:, :-1]), r"target_mask must be \[B\*K, T\] like its input_ids"),
    (lambda b: b.update(target_mask=b["target_mask"].float() * 2), r"target_mask must mark each token scored \(1\) or not"),
], ids=["position 0", "padding", "empty", "shape", "values"])
@pytest.mark.parametrize("share", [True, False])
def test_a_target_mask_the_scores_cannot_follow_is_refused_naming_the_rows(change, match, share):
    """A hand-built batch's target at position 0 lost its first token (row 0 scored tokens 1..3 of 4), one on padding
    scored the pad token as text, and an empty target scored 0, probability 1 before the softmax: all were accepted."""
    batch = cloze_batch()
    change(batch)
    with pytest.raises(ValueError, match=match):
        LoraModel(tiny_llama(), MultipleChoice(format="cloze", share_prefix=share)).logits(batch)


@pytest.mark.parametrize("normalize, key, value, match", [
    ("tokens", "target_lengths", [5, 1, 3, 1, 2, 1], r"row\(s\) \[0\] have target_lengths other than their target_mask's"),
    ("tokens", "target_lengths", [0, 1, 3, 1, 2, 1], r"target_lengths must be positive whole numbers .*got \[0\.0\]"),
    ("chars", "target_chars", [6, -3, 9, 3, 6, 3], r"target_chars must be positive whole numbers .*got \[-3\.0\]"),
    ("chars", "target_chars", [6.5, 3, 9, 3, 6, 3], r"target_chars must be positive whole numbers .*got \[6\.5\]"),
    ("chars", "target_chars", [float("nan"), 3, 9, 3, 6, 3], r"target_chars must be positive whole numbers .*got \[nan\]"),
    ("tokens", "target_lengths", [2], r"target_lengths must be \[B\*K\], one count per row \(6\); got \(1,\)"),
])
def test_normalisation_counts_that_are_not_each_rows_are_refused(normalize, key, value, match):
    """Each score is divided by its row's count: 5 where the target holds 2 tokens, a 0 or negative count clamped to 1
    (that choice left unnormalised), NaN (NaN logits) or one value broadcast to every row were all accepted."""
    batch = cloze_batch()
    batch[key] = torch.tensor(value)
    with pytest.raises(ValueError, match=match):
        LoraModel(tiny_llama(), MultipleChoice(format="cloze", normalize=normalize)).logits(batch)


def test_normalised_scores_divide_by_the_rows_own_counts():
    net = tiny_llama()
    batch = cloze_batch()
    expected = direct_scores(net)
    for normalize, key in (("tokens", "target_lengths"), ("chars", "target_chars")):
        logits = LoraModel(net, MultipleChoice(format="cloze", normalize=normalize)).logits(batch)
        counts = batch[key].view(2, 3).double()
        torch.testing.assert_close(logits[0].double(), expected[0].double() / counts[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[1, :2].double(), expected[1].double() / counts[1, :2], rtol=1e-4, atol=1e-4)


def test_a_row_without_a_real_token_is_refused_in_every_format():
    batch = cloze_batch(SHARED)
    batch["attention_mask"][4] = 0
    for share in (True, False):
        with pytest.raises(ValueError, match=r"a cloze batch's row\(s\) \[4\] have no real token"):
            LoraModel(tiny_llama(), MultipleChoice(format="cloze", share_prefix=share)).logits(batch)


def test_a_batch_of_the_other_format_is_refused_naming_the_collator():
    """A cloze likelihood on letter-format rows (or the reverse) was refused as "choices of other questions", and a
    cloze batch without target_mask failed with a bare KeyError."""
    cloze = cloze_batch()
    letter = {k: cloze[k] for k in ("choice_mask", "labels")} | {"input_ids": cloze["input_ids"][:2],
                                                                  "attention_mask": cloze["attention_mask"][:2]}
    with pytest.raises(ValueError, match=r"the batch is in the letter format \(LetterCollator.*MultipleChoice scores the "
                                         r"cloze format: collate with ClozeCollator"):
        LoraModel(tiny_llama(), MultipleChoice(format="cloze")).logits(letter)
    letters = MultipleChoice(torch.tensor([5, 6, 7]), format="letter")
    for call in (lambda m: m.logits(cloze), lambda m: m.likelihood.observed(cloze)):
        with pytest.raises(ValueError, match=r"the batch is in the cloze format \(ClozeCollator\).*collate with LetterCollator, "
                                             r"or build MultipleChoice\(format='cloze'\)"):
            call(LoraModel(tiny_llama(), letters))


def test_a_question_of_one_choice_is_refused_in_every_format():
    """One answer token, or a question whose choice_mask holds one choice, was scored: a softmax over one logit gives
    every probability 1 (accuracy 1, ECE 0, NLL 0 whatever the model), where SequenceClassification refuses
    num_labels=1 by name."""
    from pyro_lora import predict

    with pytest.raises(ValueError, match=r"answer_token_ids \[5\] name one choice: a softmax over one logit gives every "
                                         "probability 1"):
        MultipleChoice(answer_token_ids=[5])
    ids = torch.randint(1, 64, (3, 6), generator=torch.Generator().manual_seed(0))
    letter = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(3, dtype=torch.long),
              "choice_mask": torch.tensor([[True, True], [True, False], [True, True]])}
    one = "of the batch have fewer than 2 choices in their choice_mask: a softmax over one choice gives it probability 1"
    model = LoraModel(tiny_llama(), MultipleChoice(answer_token_ids=[5, 6]))
    for call in (lambda: model.logits(letter), lambda: model.likelihood.observed(letter), lambda: predict(model, None, [letter])):
        with pytest.raises(ValueError, match=rf"row\(s\) \[1\] {one}"):
            call()
    cloze = cloze_batch([[([3, 9, 4], [11, 12]), ([3, 9, 4], [13])], [([5, 6], [20])]], (0, 0))
    for share in (True, False):
        with pytest.raises(ValueError, match=rf"row\(s\) \[1\] {one}"):
            LoraModel(tiny_llama(), MultipleChoice(format="cloze", share_prefix=share)).logits(cloze)


def test_letter_token_ids_refuses_more_choices_than_letters():
    from pyro_lora.data import letter_token_ids

    for bad in (0, 1, 27, 30, 2.5, True):  # 30 gave 26 ids without a word; 1 a choice of probability 1
        with pytest.raises(ValueError, match="num_choices must be 2 to 26"):
            letter_token_ids(None, bad)


def test_letter_token_ids_refuses_a_letter_the_vocabulary_maps_to_its_unknown_token():
    """A word-level vocabulary holding ' A' but not ' B' gave B the unknown token's id: two distinct ids, so the letter
    format scored choice B by the logit of [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pyro_lora.data import letter_token_ids

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "Answer:": 1, "A": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match=r"' B' after '\\nAnswer:' is this tokenizer's unknown token '\[UNK\]'.*cloze"):
        letter_token_ids(tokenizer, 2)


def test_letter_ids_are_the_tokens_that_follow_answer_in_the_prompt():
    """A tokenizer prepending '▁' to every text (Llama-2, Mistral-v0.1) makes ' A' alone '▁', '▁A': the letter format
    was refused, though after 'Answer:' each letter is one token. A numpy count was refused as out of range."""
    import numpy as np
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from pyro_lora.data import letter_prompt, letter_token_ids

    words = ["▁Question:", "▁What", "▁is", "▁it?", "▁Answer:", "▁A", "▁B", "▁C", "A.", "B.", "C.", "▁yes", "▁no", "▁maybe"]
    vocab = [("<pad>", 0.0), ("<unk>", 0.0), ("▁", -3.0)] + [(w, -1.0) for w in words] + [(c, -5.0) for c in "aeinorstu\nABC."]
    backend = Tokenizer(models.Unigram(vocab, unk_id=1))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    assert len(tokenizer(" A", add_special_tokens=False)["input_ids"]) == 2
    ids = letter_token_ids(tokenizer, np.int64(3))
    prompt = letter_prompt({"id": "q", "question": "What is it?", "choices": ["yes", "no", "maybe"]})
    for letter, token in zip("ABC", ids.tolist()):
        context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answered = tokenizer(f"{prompt} {letter}", add_special_tokens=False)["input_ids"]
        assert answered[: len(context)] == context and answered[len(context):] == [token]
    assert letter_token_ids(tokenizer, torch.tensor(2)).tolist() == ids[:2].tolist()


def _hybrid(model_type):
    """A tiny LFM2 (a convolution layer beside attention) or RecurrentGemma (a recurrent block; its forward returns no
    cache), with LoRA on the attention's q and v."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    extra = {"lfm2": dict(num_key_value_heads=2, layer_types=["conv", "full_attention"], conv_L_cache=3),
             "recurrent_gemma": dict(head_dim=8, lru_width=32, attention_window_size=4, num_key_value_heads=1,
                                     block_types=["recurrent", "attention"])}[model_type]
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **common, **extra))
    return get_peft_model(net, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()


@pytest.mark.parametrize("model_type", ["lfm2", "recurrent_gemma"])
def test_a_decoder_whose_cache_is_no_key_value_cache_scores_every_row_in_full(model_type):
    """A convolution or recurrent state cannot be repeated per choice (LFM2: AttributeError 'LinearAttentionLayer' object
    has no attribute 'batch_repeat_interleave' from inside transformers), and RecurrentGemma returns no cache
    ('BaseModelOutput' object has no attribute 'cache'): the rows run in full, as share_prefix=False runs them."""
    import warnings

    net = _hybrid(model_type)
    batch = cloze_batch(SHARED, extra_pad=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # the default says nothing
        shared = LoraModel(net, MultipleChoice(format="cloze")).logits(batch)
        full = LoraModel(net, MultipleChoice(format="cloze", share_prefix=False)).logits(batch)
        expected = direct_scores(net, SHARED)
    torch.testing.assert_close(shared, full, rtol=0, atol=0)
    for row, own in zip(shared, expected):
        torch.testing.assert_close(row[:len(own)], own, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match=r"MultipleChoice\(share_prefix=True\): \w+Model (keeps recurrent or convolution "
                                         r"states|takes no position_ids).*every cloze row runs in full"):
        LoraModel(net, MultipleChoice(format="cloze", share_prefix=True))


def test_llama4s_decoder_is_found_and_its_column_numbered_queries_get_right_padded_rows():
    """Llama4ForCausalLM names base_model_prefix 'language_model' for a module it calls 'model': MultipleChoice found no
    decoder and refused it with no way out. Its NoPE layers scale their queries by the column (attn_temperature_tuning),
    so a left-padded row, or continuations after a cached question, would get other scales than the row alone: a
    left-padded letter batch is refused naming it, and cloze rows run in full."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama4_text", vocab_size=64, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  num_local_experts=2, num_experts_per_tok=1, no_rope_layers=[1, 0], floor_scale=2,
                                  attn_scale=0.5, pad_token_id=0, use_qk_norm=False)
    net = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()
    with torch.no_grad():
        scores = LoraModel(net, MultipleChoice(format="cloze")).logits(cloze_batch(SHARED))
        for row, own in zip(scores, direct_scores(net, SHARED)):
            torch.testing.assert_close(row[:len(own)], own, rtol=1e-5, atol=1e-5)
        letters = LoraModel(net, MultipleChoice([10, 11], format="letter"))
        rows = [[5, 9, 17], [4, 8, 16, 23, 31]]
        own = torch.stack([net(input_ids=torch.tensor([r])).logits[0, -1, [10, 11]] for r in rows])
        for side, take in (("right", lambda r: r + [0] * (5 - len(r))), ("left", lambda r: [0] * (5 - len(r)) + r)):
            ids = torch.tensor([take(r) for r in rows])
            batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "choice_mask": torch.ones(2, 2, dtype=torch.bool)}
            if side == "right":
                torch.testing.assert_close(letters.logits(batch), own, rtol=1e-5, atol=1e-5)
            else:
                with pytest.raises(ValueError, match=r"Llama4TextModel scales the queries of its NoPE layers by their column "
                                                     r"\(attn_temperature_tuning\).*pad on the right"):
                    letters.logits(batch)


def test_answer_token_ids_given_to_the_cloze_format_are_refused():
    """MultipleChoice([5, 6], format="cloze") was accepted and the ids ignored: the logits were the plain cloze's, for a
    caller who meant the letters scored."""
    for ids in ([5, 6], torch.tensor([5, 6, 7, 8])):
        with pytest.raises(ValueError, match="answer_token_ids name the letter tokens of format='letter'; format='cloze'"):
            MultipleChoice(ids, format="cloze")
    assert MultipleChoice(format="cloze").answer_token_ids is None
