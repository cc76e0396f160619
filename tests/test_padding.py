"""No result depends on padding or batch composition: a record's logits alone equal its logits in a padded batch.

Tiny random causal LMs of three families (rotary Llama and Qwen2, absolute-position GPT-2, whose LoRA sits on
the ``c_attn`` Conv1D), each with a peft LoRA whose B is nonzero. Batches are laid out as the collators of
:mod:`pyro_lora.data` lay them out: letter prompts left-padded (``LetterCollator``'s default) or right-padded,
cloze rows ``b * K + k`` right-padded with 1-token dummy rows for missing choices (``ClozeCollator``).
"""

import pytest
import torch
from conftest import _randomize_b, tiny_bert, tiny_llama
from peft import LoraConfig, get_peft_model

from pyro_lora import CausalLM, LoraModel, MultipleChoice, SequenceClassification

PAD = 0
LETTERS = [10, 11, 12, 13]  # answer-letter token ids
S = 3  # weight samples


# ------------------------------------------------------------------------------------------- tiny models


def tiny_gpt2(seed=0, head="lm", num_labels=3):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=1,
        pad_token_id=PAD, num_labels=num_labels,
    )
    base = GPT2LMHeadModel(config) if head == "lm" else GPT2ForSequenceClassification(config)
    task = None if head == "lm" else "SEQ_CLS"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type=task)
    net = get_peft_model(base, lora)
    _randomize_b(net)
    return net.eval()


def tiny_qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=1,
    )
    net = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _randomize_b(net)
    return net.eval()


def tiny_llama_cls(seed=0, num_labels=3):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, num_labels=num_labels,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    net = get_peft_model(LlamaForSequenceClassification(config), lora)
    _randomize_b(net)
    return net.eval()


FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}


# ------------------------------------------------------------------------------------------- records


def _tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 64, (n,), generator=g).tolist()


# letter prompts (token ids) and their number of choices; lengths 5..13 force padding of every shorter one
LETTER_RECORDS = [(_tokens(5, 1), 3), (_tokens(13, 2), 4), (_tokens(9, 3), 2)]

# cloze records: (context, continuations) sharing their context, of different lengths and choice counts
CLOZE_RECORDS = [
    [(_tokens(3, 4), _tokens(2, 5)), (_tokens(3, 4), _tokens(1, 6)), (_tokens(3, 4), _tokens(3, 7))],
    [(_tokens(9, 8), _tokens(4, 9)), (_tokens(9, 8), _tokens(1, 10))],
    [(_tokens(6, 11), _tokens(2, 12)), (_tokens(6, 11), _tokens(5, 13)), (_tokens(6, 11), _tokens(1, 14)),
     (_tokens(6, 11), _tokens(2, 15))],
]
# a WinoGrande-style record: the contexts differ, so a batch holding it cannot share its prefixes
BLANK_RECORD = [(_tokens(4, 16), _tokens(3, 17)), (_tokens(6, 18), _tokens(3, 17))]


def _pad(rows, side):
    """``(input_ids, attention_mask)`` as ``pyro_lora.collators._pad`` makes them."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


def letter_batch(records, side="left"):
    """``LetterCollator``'s layout: prompts padded on ``side``, ``choice_mask [B, K]``."""
    ids, mask = _pad([r for r, _ in records], side)
    k = max(n for _, n in records)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.zeros(len(records), dtype=torch.long),
        "choice_mask": torch.arange(k)[None] < torch.tensor([n for _, n in records])[:, None],
    }


def cloze_batch(records, side="right"):
    """``ClozeCollator``'s layout (``side="right"``): row ``b * K + k`` is context + continuation of choice ``k``,
    a missing choice a 1-token dummy row with an empty target. ``side="left"`` pads the same rows on the left."""
    k = max(map(len, records))
    rows, targets, lengths, present = [], [], [], []
    for choices in records:
        for j in range(k):
            ctx, cont = choices[j] if j < len(choices) else ([PAD], [])
            rows.append(ctx + cont)
            targets.append([False] * len(ctx) + [True] * len(cont))
            lengths.append(max(1, len(cont)))
            present.append(j < len(choices))
    ids, mask = _pad(rows, side)
    target = torch.zeros_like(ids, dtype=torch.bool)
    for i, t in enumerate(targets):
        span = slice(ids.shape[1] - len(t), ids.shape[1]) if side == "left" else slice(0, len(t))
        target[i, span] = torch.tensor(t)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "target_mask": target,
        "target_lengths": torch.tensor(lengths),
        "target_chars": 3 * torch.tensor(lengths),
        "choice_mask": torch.tensor(present).view(len(records), k),
        "labels": torch.zeros(len(records), dtype=torch.long),
    }


def sample_values(model, seed=0):
    """``S`` weight samples around the adapter values."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(S, *v.shape, generator=g) for k, v in model.adapter_values().items()}


def alone_vs_batch(model, records, make_batch, values=None, num_samples=None):
    """``(alone, in_batch)``: each record's class logits computed alone and inside ``make_batch(records)``,
    each ``[*S, K_b]`` for its own ``K_b`` choices; flattened and concatenated over the records."""
    batch = model.logits(make_batch(records), values, num_samples=num_samples)
    alone, inside = [], []
    for b, record in enumerate(records):
        own = model.logits(make_batch([record]), values, num_samples=num_samples)[..., 0, :]
        assert torch.isfinite(own).all()
        alone.append(own.reshape(-1))
        inside.append(batch[..., b, : own.shape[-1]].reshape(-1))
    return torch.cat(alone), torch.cat(inside)


def max_difference(model, records, make_batch):
    """Largest |alone - in batch| over the records, for the peft weights and for ``S`` weight samples."""
    values = sample_values(model)
    diffs = [alone_vs_batch(model, records, make_batch), alone_vs_batch(model, records, make_batch, values, S)]
    return max(float((a - b).abs().max()) for a, b in diffs)


# ------------------------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_letter_logits_do_not_depend_on_padding(family, side):
    model = LoraModel(FAMILIES[family](), MultipleChoice(LETTERS, format="letter"), random="AB")
    make = lambda records: letter_batch(records, side)  # noqa: E731
    for values, num_samples in [(None, None), (sample_values(model), S)]:
        alone, inside = alone_vs_batch(model, LETTER_RECORDS, make, values, num_samples)
        torch.testing.assert_close(inside, alone, rtol=0, atol=1e-5)
    # and the logits are the next-token logits of the unpadded prompt
    net = model.net
    for b, (prompt, k) in enumerate(LETTER_RECORDS):
        direct = net(input_ids=torch.tensor([prompt])).logits[0, -1, LETTERS[:k]]
        torch.testing.assert_close(model.logits(make(LETTER_RECORDS))[b, :k], direct, rtol=0, atol=1e-5)


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cloze_logits_do_not_depend_on_padding_or_batch(family, share_prefix):
    model = LoraModel(FAMILIES[family](), MultipleChoice(format="cloze", share_prefix=share_prefix), random="AB")
    values = sample_values(model)
    # ClozeCollator's right-padded rows; then with a WinoGrande record, whose batch cannot share prefixes;
    # then the same rows padded on the left (not a collator layout, but a layout all the same)
    cases = [
        (CLOZE_RECORDS, cloze_batch),
        (CLOZE_RECORDS + [BLANK_RECORD], cloze_batch),
        (CLOZE_RECORDS, lambda r: cloze_batch(r, "left")),
        (CLOZE_RECORDS + [BLANK_RECORD], lambda r: cloze_batch(r, "left")),
    ]
    for records, make in cases:
        for v, num_samples in [(None, None), (values, S)]:
            alone, inside = alone_vs_batch(model, records, make, v, num_samples)
            torch.testing.assert_close(inside, alone, rtol=0, atol=1e-5)


def test_cloze_left_padded_rows_equal_collator_rows():
    # the same records in either layout give the same class logits (GPT-2: absolute positions)
    model = LoraModel(tiny_gpt2(), MultipleChoice(format="cloze"))
    right = model.logits(cloze_batch(CLOZE_RECORDS))
    left = model.logits(cloze_batch(CLOZE_RECORDS, "left"))
    torch.testing.assert_close(left, right, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- token-level LM


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_causal_lm_real_tokens_do_not_depend_on_padding(family, side):
    model = LoraModel(FAMILIES[family](), CausalLM(), random="AB")
    texts = [r for r, _ in LETTER_RECORDS]
    ids, mask = _pad(texts, side)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    values = sample_values(model)
    for v, num_samples in [(None, None), (values, S)]:
        logits = model.logits(batch, v, num_samples=num_samples)
        lik = model.likelihood
        loglik = lik.distribution(logits).log_prob(lik.observed(batch).expand(logits.shape[:-1]))
        for b, text in enumerate(texts):
            one = torch.tensor([text])
            alone_batch = {"input_ids": one, "attention_mask": torch.ones_like(one), "labels": one}
            alone = model.logits(alone_batch, v, num_samples=num_samples)
            cols = mask[b].nonzero().squeeze(1)[:-1]  # real positions that predict a next token
            torch.testing.assert_close(logits[..., b, cols, :], alone[..., 0, :, :], rtol=0, atol=1e-5)
            # the log-likelihood sums the same terms: no term predicts a real token from a padding cell
            alone_ll = lik.distribution(alone).log_prob(lik.observed(alone_batch).expand(alone.shape[:-1]))
            torch.testing.assert_close(loglik[..., b], alone_ll[..., 0], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------- sequence classification

CLS_FAMILIES = {"bert": tiny_bert, "gpt2": lambda: tiny_gpt2(head="cls"), "llama": tiny_llama_cls}


@pytest.mark.parametrize("family", list(CLS_FAMILIES))
def test_sequence_classification_right_padding_invariant_left_padding_refused(family):
    model = LoraModel(CLS_FAMILIES[family](), SequenceClassification(), random="AB")
    texts = [r for r, _ in LETTER_RECORDS]

    def make(records, side="right", pad=PAD):
        ids, mask = _pad(records, side)
        labels = torch.zeros(len(records), dtype=torch.long)
        return {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask, "labels": labels}

    values = sample_values(model)
    for v, num_samples in [(None, None), (values, S)]:
        inside = model.logits(make(texts), v, num_samples=num_samples)
        for b, text in enumerate(texts):
            alone = model.logits(make([text]), v, num_samples=num_samples)
            torch.testing.assert_close(inside[..., b, :], alone[..., 0, :], rtol=0, atol=1e-5)
        # padding cells holding another id than the model's pad_token_id (a tokenizer padding with eos):
        # a decoder's head must still read the last real token
        other = model.logits(make(texts, pad=5), v, num_samples=num_samples)
        torch.testing.assert_close(other, inside, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="right-padded.*shifts the real tokens' positions"):
        model.logits(make(texts, "left"))


def test_a_decoder_head_without_pad_token_id_is_refused_by_name_when_it_cannot_find_the_last_token():
    """No pad_token_id (Llama's default): transformers' head refuses more than one row, and S samples of a batch of
    one are S rows (its message blamed the batch size); a padded row of one was read at a padding cell."""
    net = tiny_llama_cls()
    net.config.pad_token_id = None
    model = LoraModel(net, SequenceClassification(), random="AB")
    one = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    full = model.logits(one)  # one unpadded row: its last token is its last column
    values = sample_values(model)
    with pytest.raises(ValueError, match=rf"no pad_token_id, which a decoder's classification head .*this forward has "
                                         rf"{S} rows, more than one: 1 example\(s\) x {S} weight sample\(s\)"):
        model.logits(one, values, num_samples=S)
    two = {k: v.repeat(2, 1) for k, v in one.items()}
    with pytest.raises(ValueError, match=r"this forward has 2 rows, more than one: 2 example\(s\) x 1 weight sample\(s\)"):
        model.logits(two)
    padded = {"input_ids": torch.tensor([[5, 6, 7, 8, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    with pytest.raises(ValueError, match="no pad_token_id.*this batch is padded"):
        model.logits(padded)
    net.config.pad_token_id = PAD
    torch.testing.assert_close(model.logits(padded), full)
    assert model.logits(one, values, num_samples=S).shape == (S, 1, 3)


def test_a_row_ending_in_the_pad_token_id_is_refused_padded_or_not():
    """transformers#35352: a decoder's head reads a row at its last token that is not pad_token_id, so a text ending in
    eos where the tokenizer pads with eos was read at the token before it, padded or not, without a word."""
    net = tiny_llama_cls()
    model = LoraModel(net, SequenceClassification(), random="AB")
    ending = {"input_ids": torch.tensor([[5, 6, 7, PAD, 0], [5, 6, 7, 8, 9]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])}
    for batch in (ending, {"input_ids": ending["input_ids"][:1, :4]}):  # padded, and one row without a mask
        with pytest.raises(ValueError, match=rf"row\(s\) \[0\] end in token {PAD}, the config's pad_token_id .*leave the "
                                             "final eos out"):
            model.logits(batch)
    inside = {"input_ids": torch.tensor([[5, PAD, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert model.logits(inside).shape == (1, 3)  # the pad id inside a row is no row's end


def test_padding_without_an_attention_mask_is_refused_and_unpadded_rows_are_taken_without_one():
    """A letter batch without its attention_mask was read at a padding cell (right padding) or attended to its
    padding (left): probabilities 0.036 off each prompt's alone, an argmax flipped, without a word."""
    letter = LoraModel(tiny_llama(), MultipleChoice(LETTERS, format="letter"), random="AB")
    causal = LoraModel(tiny_llama(), CausalLM(), random="AB")
    texts = [r for r, _ in LETTER_RECORDS]
    for side in ("left", "right"):
        batch = letter_batch(LETTER_RECORDS, side)
        del batch["attention_mask"]
        for absent in ({}, {"attention_mask": None}):  # None is absent, as transformers reads it
            with pytest.raises(ValueError, match=r"no attention_mask and row\(s\) \[0, 2\] are padded with token 0, "
                                                 "the config's pad_token_id: .*pass the attention_mask"):
                letter.logits({**batch, **absent})
        ids, mask = _pad(texts, side)
        with pytest.raises(ValueError, match=r"no attention_mask and row\(s\) \[0, 2\] are padded with token 0"):
            causal.logits({"input_ids": ids, "attention_mask": None, "labels": ids})  # 12 pads were observed
    cls = LoraModel(tiny_llama_cls(), SequenceClassification(), random="AB")
    ids, _ = _pad(texts, "left")
    with pytest.raises(ValueError, match=r"no attention_mask and row\(s\) \[0, 2\] are padded with token 0"):
        cls.logits({"input_ids": ids})
    # no padding: no mask needed, and the numbers are the masked batch's
    one = letter_batch(LETTER_RECORDS[1:2])
    torch.testing.assert_close(letter.logits({k: v for k, v in one.items() if k != "attention_mask"}), letter.logits(one))
    # a causal LM's trailing pads labelled -100 (transformers' collators) are neither attended by a real token nor observed
    ids, mask = _pad(texts, "right")
    labels = ids.masked_fill(mask == 0, -100)
    unmasked = causal.logits({"input_ids": ids, "labels": labels})
    torch.testing.assert_close(unmasked[mask[:, :-1].bool()], causal.logits({"input_ids": ids, "attention_mask": mask,
                                                                            "labels": labels})[mask[:, :-1].bool()])
    # a cloze batch pads on the right, after the scored tokens under causal attention: taken without its mask;
    # padded on the left, its logits were 0.16 off the masked batch's
    cloze = LoraModel(tiny_llama(), MultipleChoice(format="cloze"), random="AB")
    batch = cloze_batch(CLOZE_RECORDS)
    torch.testing.assert_close(cloze.logits({k: v for k, v in batch.items() if k != "attention_mask"}), cloze.logits(batch))
    left = {k: v for k, v in cloze_batch(CLOZE_RECORDS, "left").items() if k != "attention_mask"}
    with pytest.raises(ValueError, match=r"no attention_mask and row\(s\) \[.*\] are padded with token 0"):
        cloze.logits(left)


def test_a_pad_token_that_is_the_eos_token_is_text_unless_rows_differ_in_it():
    """tokenizer.pad_token = eos_token: an unpadded SFT row ending in eos, a packed row opening with one, were refused
    as padded without a mask; rows whose runs of it differ are padded."""
    net = tiny_llama()
    net.config.pad_token_id = net.config.eos_token_id = 2
    causal = LoraModel(net, CausalLM(), random="AB")
    for ids in (torch.tensor([[1, 5, 6, 7, 2]]), torch.tensor([[2, 5, 6, 7, 8], [2, 9, 10, 11, 12]])):
        ones = torch.ones_like(ids)
        torch.testing.assert_close(causal.logits({"input_ids": ids, "labels": ids}),
                                   causal.logits({"input_ids": ids, "attention_mask": ones, "labels": ids}))
    padded = torch.tensor([[1, 5, 6, 7, 2], [1, 5, 2, 2, 2]])
    with pytest.raises(ValueError, match=r"no attention_mask and row\(s\) \[0, 1\] are padded with token 2"):
        causal.logits({"input_ids": padded, "labels": padded})


# ------------------------------------------------------------------------------------------- refusals


def test_decoder_without_position_ids_refuses_left_padding():
    from transformers import BartConfig, BartForCausalLM

    torch.manual_seed(0)  # BART's decoder numbers its learned positions by column
    net = BartForCausalLM(BartConfig(vocab_size=64, d_model=32, decoder_layers=2, decoder_attention_heads=4,
                                     decoder_ffn_dim=64, pad_token_id=PAD)).eval()
    lik = MultipleChoice(LETTERS, format="letter")
    with pytest.raises(ValueError, match="BartDecoder takes no position_ids"):
        lik.logits(net, letter_batch(LETTER_RECORDS, "left"))
    with pytest.raises(ValueError, match="BartForCausalLM takes no position_ids"):
        ids, mask = _pad([r for r, _ in LETTER_RECORDS], "left")
        CausalLM().logits(net, {"input_ids": ids, "attention_mask": mask})
    # right padding needs no position ids: each record's logits as alone
    batch = lik.logits(net, letter_batch(LETTER_RECORDS, "right"))
    for b, record in enumerate(LETTER_RECORDS):
        alone = lik.logits(net, letter_batch([record], "right"))[0]
        torch.testing.assert_close(batch[b, : record[1]], alone, rtol=0, atol=1e-5)
    # cloze falls back from the shared prefix (it needs position ids) to full rows
    cloze = MultipleChoice(format="cloze")
    torch.testing.assert_close(
        cloze.logits(net, cloze_batch(CLOZE_RECORDS)),
        MultipleChoice(format="cloze", share_prefix=False).logits(net, cloze_batch(CLOZE_RECORDS)),
        rtol=0, atol=1e-5,
    )


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_an_alibi_decoder_reads_left_padded_rows_as_alone(family):
    """Bloom and MPT take no position_ids, but ALiBi alone positions their tokens (Bloom's counted from the mask,
    MPT's from the columns, a constant per query that the softmax takes away): left padding (the LetterCollator's
    default) is exact, and was refused as if it shifted positions."""
    from transformers import BloomConfig, BloomForCausalLM, MptConfig, MptForCausalLM

    torch.manual_seed(0)
    net = (BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4, pad_token_id=PAD))
           if family == "bloom" else MptForCausalLM(MptConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                                               pad_token_id=PAD))).eval()
    lik = MultipleChoice(LETTERS, format="letter")
    batch = lik.logits(net, letter_batch(LETTER_RECORDS, "left"))
    for b, record in enumerate(LETTER_RECORDS):
        with torch.no_grad():
            alone = net(input_ids=torch.tensor([record[0]])).logits[0, -1, LETTERS[: record[1]]]
        torch.testing.assert_close(batch[b, : record[1]], alone, rtol=0, atol=1e-5)
    ids, mask = _pad([r for r, _ in LETTER_RECORDS], "left")
    CausalLM().logits(net, {"input_ids": ids, "attention_mask": mask})


def test_multiple_choice_without_decoder_is_refused_by_name():
    class Scorer(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    with pytest.raises(ValueError, match="Scorer"):
        MultipleChoice(LETTERS, format="letter").logits(Scorer(), letter_batch(LETTER_RECORDS))


def test_decoder_found_through_base_model_without_get_decoder():
    net = tiny_gpt2().get_base_model()

    class Wrapped(torch.nn.Module):  # no get_decoder: the decoder is its base_model
        def __init__(self):
            super().__init__()
            self.base_model, self.lm_head = net.transformer, net.lm_head

        def get_output_embeddings(self):
            return self.lm_head

    lik = MultipleChoice(LETTERS, format="letter")
    batch = letter_batch(LETTER_RECORDS)
    torch.testing.assert_close(lik.logits(Wrapped(), batch), lik.logits(net, batch), rtol=0, atol=0)


def test_a_classification_row_without_a_real_token_or_label_is_refused():
    """An all-0 attention_mask row got near-uniform probabilities; a -100 label (transformers' ignore index) added
    nothing to the likelihood yet counted as an example (half the rows unlabelled halved the data term)."""
    from pyro_lora import fit
    from pyro_lora.guides import MAPGuide

    model = LoraModel(tiny_bert(), SequenceClassification(), num_data=3)
    batch = {"input_ids": torch.tensor([[2, 5, 6], [2, 7, 0], [2, 9, 8]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]]),
             "labels": torch.tensor([0, 2, 1])}
    model.logits(batch)
    empty = {**batch, "attention_mask": torch.tensor([[1, 1, 1], [0, 0, 0], [1, 1, 1]])}
    with pytest.raises(ValueError, match=r"a classification batch's row\(s\) \[1\] have no real token"):
        model.logits(empty)
    with pytest.raises(ValueError, match=r"labels hold negative values \(\[-100\]; -100 is transformers' ignore index\)"):
        fit(model, MAPGuide(model), [{**batch, "labels": torch.tensor([0, -100, 1])}], progress=False)
    with pytest.raises(ValueError, match=r"labels must be integer class indices of shape \[B\], got torch.float32"):
        model({**batch, "labels": torch.tensor([0.0, 2.0, 1.0])})


def test_answer_letters_in_place_of_token_ids_are_refused_naming_the_helper():
    with pytest.raises(ValueError, match=r"^answer_token_ids must be token ids, got the string 'AB': .*letter_token_ids$"):
        MultipleChoice(answer_token_ids="AB")  # was torch's "new(): invalid data type 'str'"
    # a generator, a set, strings among the ids raised torch's raw errors
    for bad in ((i for i in (5, 6)), {5, 6}, ["5", "6"], [5, "B"]):
        with pytest.raises(ValueError, match=r"^answer_token_ids must be a non-empty 1-d sequence of token ids \(a list"):
            MultipleChoice(answer_token_ids=bad)


def test_answer_token_ids_outside_the_vocabulary_are_refused_by_name():
    with pytest.raises(ValueError, match=r"answer_token_ids \[50, 51, -1\] hold a negative id"):
        MultipleChoice(answer_token_ids=[50, 51, -1])
    # uint64 ids from 2**63 wrapped to negatives in the cast to int64 and were named "a negative id"
    with pytest.raises(ValueError, match=r"hold an id beyond int64's range"):
        MultipleChoice(answer_token_ids=torch.tensor([1, 2**63 + 5], dtype=torch.uint64))
    with pytest.raises(ValueError, match=r"answer_token_ids \[5, 64\] name a token beyond the LM head's 64 rows"):
        LoraModel(tiny_llama(), MultipleChoice(answer_token_ids=[5, 64]))


def test_a_label_beyond_the_heads_classes_is_refused_by_name_everywhere():
    """A label equal to num_labels reached torch's bare IndexError in fit and both Laplace fits (a device assert on
    CUDA) and predict returned it as a label to score."""
    from pyro_lora import fit, predict
    from pyro_lora.guides import LaplaceGuide, LastLayerLaplaceGuide, MAPGuide

    model = LoraModel(tiny_bert(num_labels=3), SequenceClassification(), num_data=3)
    batch = {"input_ids": torch.tensor([[2, 5, 6], [2, 7, 9]]), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.tensor([0, 3])}
    beyond = r"label\(s\) \[3\] outside the 3 classes of the logits \(0 to 2\)"
    with pytest.raises(ValueError, match=beyond):
        fit(model, MAPGuide(model), [batch], progress=False)
    with pytest.raises(ValueError, match=beyond):
        LaplaceGuide(model).fit([batch], progress=False)
    with pytest.raises(ValueError, match=beyond):
        LastLayerLaplaceGuide(model).fit([batch], progress=False)
    with pytest.raises(ValueError, match=beyond):
        predict(model, None, [batch])
    assert predict(model, None, [{**batch, "labels": torch.tensor([0, 2])}]).labels.tolist() == [0, 2]


def test_labels_of_any_integer_width_are_taken_and_a_shifted_or_untensored_list_is_refused():
    """int32 labels (numpy's default on some platforms) crashed fit and both Laplace fits with torch's "expected target
    dtype Long" while predict took them; 9 labels for 8 rows were scored row against another row's label (accuracy 0.5
    for a perfect model); a list of labels raised AttributeError 'is_floating_point'."""
    from pyro_lora import fit, predict
    from pyro_lora.guides import LaplaceGuide, LastLayerLaplaceGuide, MAPGuide

    model = LoraModel(tiny_bert(num_labels=3), SequenceClassification(), num_data=3)
    batch = {"input_ids": torch.tensor([[2, 5, 6], [2, 7, 9]]), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.tensor([0, 2])}
    reference = predict(model, None, [batch])
    for dtype in (torch.int32, torch.int16, torch.uint8):
        narrow = {**batch, "labels": batch["labels"].to(dtype)}
        fit(model, MAPGuide(model), [narrow], epochs=1, lr=0.0, progress=False)
        LaplaceGuide(model).fit([narrow], progress=False)
        LastLayerLaplaceGuide(model).fit([narrow], progress=False)
        got = predict(model, None, [narrow])
        assert got.labels.dtype == torch.int64 and got.labels.tolist() == [0, 2]
        torch.testing.assert_close(got.probs, reference.probs)
    with pytest.raises(ValueError, match=r"the batch has 2 rows and 3 labels: one label per row"):
        predict(model, None, [{**batch, "labels": torch.tensor([0, 2, 1])}])
    with pytest.raises(ValueError, match=r"the batch has 2 rows and 1 labels"):
        fit(model, MAPGuide(model), [{**batch, "labels": torch.tensor([0])}], progress=False)
    with pytest.raises(ValueError, match=r"the batch's labels are a list, not a tensor"):
        predict(model, None, [{**batch, "labels": [0, 2]}])


def _causal_batch():
    ids, mask = _pad([r for r, _ in LETTER_RECORDS], "right")
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _classification_batch():
    return {**_causal_batch(), "labels": torch.tensor([0, 2, 1])}


SETUPS = {  # likelihood, network, batch, entries the network takes that the likelihood does not hand it
    "classification": (SequenceClassification, tiny_bert, _classification_batch, ["inputs_embeds", "position_ids"]),
    "causal_lm": (CausalLM, tiny_llama, _causal_batch, ["inputs_embeds", "position_ids"]),
    "letter": (lambda: MultipleChoice(LETTERS), tiny_llama, lambda: letter_batch(LETTER_RECORDS),
               ["inputs_embeds", "position_ids"]),
}


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_batch_entries_the_network_takes_but_is_not_handed_are_refused_by_name(setup):
    """position_ids of packed rows were dropped (classification) or replaced by the attention mask's count (CausalLM),
    and inputs_embeds dropped, without a word; entries the network does not take (the collators' own) still pass."""
    likelihood, make_net, make_batch, dropped = SETUPS[setup]
    model = LoraModel(make_net(), likelihood(), random="AB")
    batch = make_batch()
    plain = model.logits(batch)
    torch.testing.assert_close(model.logits({**batch, "record_id": torch.arange(3)}), plain)  # not the network's
    extra = {"position_ids": torch.zeros_like(batch["input_ids"]), "inputs_embeds": torch.zeros(3, 1, 32)}
    for key in dropped:
        with pytest.raises(ValueError, match=rf"the batch holds \['{key}'\], which the network's forward takes but "
                                             rf"{type(model.likelihood).__name__} does not hand it"):
            model.logits({**batch, key: extra[key]})
        with pytest.raises(ValueError, match=rf"\['{key}'\]"):
            model({**batch, key: extra[key]})  # the Pyro model


def test_batch_entries_are_checked_against_the_transformers_model_under_a_peft_tuner_and_renamed_inputs():
    """A LoraModel built on peft's tuner (``peft_model.base_model``, whose forward is ``(*args, **kwargs)``) dropped
    position_ids silently; transformers 5 takes ``past_key_values`` as ``cache``, which its signature does not show."""
    batch = _classification_batch()
    model = LoraModel(tiny_bert().base_model, SequenceClassification(), random="AB")
    with pytest.raises(ValueError, match=r"the batch holds \['position_ids'\]"):
        model.logits({**batch, "position_ids": torch.zeros_like(batch["input_ids"])})
    causal = LoraModel(tiny_llama(), CausalLM(), random="AB")
    with pytest.raises(ValueError, match=r"the batch holds \['past_key_values'\]"):
        causal.logits({**_causal_batch(), "past_key_values": None})


def _llama_classifier():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, num_labels=3)
    return get_peft_model(LlamaForSequenceClassification(config), LoraConfig(r=2, target_modules=["q_proj"],
                                                                              task_type="SEQ_CLS")).eval()


@pytest.mark.parametrize("key", ["cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "seq_idx"])
@pytest.mark.parametrize("setup", ["causal_lm", "llama_classifier"])
def test_packed_rows_entries_of_transformers_kwargs_are_refused(key, setup):
    """transformers' ``**kwargs: Unpack[TransformersKwargs]`` takes packed rows' boundaries (DataCollatorWithFlattening
    hands ``cu_seq_lens_q``, ``max_length_q``, ...), which the signature shows as one parameter: they were dropped, and
    the packed row scored as one sequence, without a word. transformers' generic classification heads annotate it as
    a string (``from __future__ import annotations``), which was not read."""
    if setup == "causal_lm":
        model, batch = LoraModel(tiny_llama(), CausalLM(), random="AB"), _causal_batch()
    else:
        model, batch = LoraModel(_llama_classifier(), SequenceClassification(), random="AB"), _classification_batch()
    with pytest.raises(ValueError, match=rf"the batch holds \['{key}'\], which the network's forward takes"):
        model.logits({**batch, key: torch.tensor([0, 4, 7])})


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_an_attention_mask_of_other_values_than_0_and_1_is_refused_by_name(setup):
    """A mask of packed-document segment ids (1, 1, 2, 2, as multipack collators write) was taken silently: positions
    counted as cumsum - 1 numbered the tokens 0, 1, 3, 5 and the score matched no reading of the batch. A bool mask, or
    integers or floats equal to 0 or 1, give the int mask's logits."""
    likelihood, make_net, make_batch, _ = SETUPS[setup]
    model = LoraModel(make_net(), likelihood(), random="AB")
    batch = make_batch()
    mask = batch["attention_mask"]
    plain = model.logits(batch)
    for same in (mask.bool(), mask.float(), mask.to(torch.int32)):
        torch.testing.assert_close(model.logits({**batch, "attention_mask": same}), plain)
    segments = mask + mask * (mask.cumsum(1) > 2)  # a row's third real token on: segment 2
    additive = (1.0 - mask.float()) * torch.finfo(torch.float32).min
    for other, found in ((segments, r"\[2\]"), (mask * 0.5, r"\[0\.5\]"), (additive, r"\[-3\.4\d*e\+38\]")):
        with pytest.raises(ValueError, match=rf"the batch's attention_mask holds {found} besides 0 and 1 .* unpack the "
                                             r"rows .* or give a 0/1 mask"):
            model.logits({**batch, "attention_mask": other})
        with pytest.raises(ValueError, match=r"attention_mask holds .* besides 0 and 1"):
            model({**batch, "attention_mask": other})  # the Pyro model
    # a 4-D mask gave 4-D positions (a raw size error in the rotary embedding); numpy or a list a raw AttributeError
    t = mask.shape[1]
    square = torch.tril(torch.ones(t, t, dtype=torch.bool)) & mask.bool()[:, None, None, :]
    with pytest.raises(ValueError, match=rf"attention_mask has shape \({mask.shape[0]}, 1, {t}, {t}\) where input_ids is "
                                         rf"\({mask.shape[0]}, {t}\): .*give that 2-D mask, not a 4-D attention mask"):
        model.logits({**batch, "attention_mask": square})
    for other in (mask.numpy(), mask.tolist()):
        with pytest.raises(ValueError, match=f"attention_mask is a {type(other).__name__}, not a tensor"):
            model.logits({**batch, "attention_mask": other})


def test_a_choice_mask_of_other_values_or_rows_than_the_batchs_is_refused_by_name():
    """A choice_mask of 0.5 was read as every choice present, and one of fewer rows than the batch failed with a raw
    reshape error in fit (predict blamed the labels)."""
    model = LoraModel(tiny_llama(), MultipleChoice([30, 31, 32, 33], format="letter"))
    batch = letter_batch([([5, 9, 17, 3], 4), ([6, 7], 3)])
    with pytest.raises(ValueError, match=r"choice_mask holds \[0\.5\] besides 0 and 1"):
        model.logits({**batch, "choice_mask": batch["choice_mask"] * 0.5})
    with pytest.raises(ValueError, match=r"choice_mask must be a \[B, K\] tensor, one row per question \(its labels' 2\), "
                                         r"got \(1, 4\)"):
        model({**batch, "choice_mask": batch["choice_mask"][:1]})


def test_token_type_ids_the_network_cannot_take_are_refused_by_name():
    """Out of its type_vocab_size they failed inside the embedding (IndexError: index out of range in self), of
    another shape inside transformers."""
    model = LoraModel(tiny_bert(), SequenceClassification())
    ids = torch.randint(1, 64, (2, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    torch.testing.assert_close(model.logits({**batch, "token_type_ids": torch.zeros_like(ids)}), model.logits(batch))
    with pytest.raises(ValueError, match=r"token_type_ids holds 5, outside the network's 2 segment types \(0 to 1\)"):
        model.logits({**batch, "token_type_ids": torch.full_like(ids, 5)})
    with pytest.raises(ValueError, match=r"token_type_ids must be integer segment ids of input_ids' shape \(2, 5\), got "
                                         r"torch.int64 of shape \(2, 4\)"):
        model.logits({**batch, "token_type_ids": torch.zeros(2, 4, dtype=torch.long)})


def test_a_likelihood_that_is_no_instance_is_refused_by_name():
    """None, a string or the likelihood class itself failed with a raw AttributeError at the first forward."""
    from pyro_lora import SequenceClassification as Classification

    for likelihood, message in [(None, "got None"), ("cls", "got 'cls'"),
                                (Classification, r"give an instance, SequenceClassification\(\)")]:
        with pytest.raises(ValueError, match=rf"likelihood must be a pyro_lora likelihood .*{message}"):
            LoraModel(tiny_bert(), likelihood)
