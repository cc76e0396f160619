"""Collators: a list of records -> a dict of tensors, one class per batch layout.

:class:`ClassificationCollator` for encoders, :class:`LetterCollator` and :class:`ClozeCollator` for
multiple choice on a causal LM (the two formats of :mod:`pyro_lora.prompts`), :class:`CausalLMCollator`
for token-level language modelling. :func:`pyro_lora.data.make_loader` wraps one in a seeded ``DataLoader``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .checks import check_count
from .prompts import cloze_parts, letter_parts, passage_part, record_text
from .records import record_task, validate_record
from .callers import user_stacklevel

__all__ = ["CausalLMCollator", "ClassificationCollator", "ClozeCollator", "LetterCollator"]


def _special_prefix(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts before the text (its BOS, if it uses one)."""
    probe = "hello"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    return tokenizer.pad_token_id


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[len(rows), max_len]``, padded on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _labels(records) -> torch.Tensor:
    return torch.tensor([r["label"] for r in records], dtype=torch.long)


def _check_records(records, task: str | None) -> None:
    """Refuse a record the JSONL reader would refuse (records built in memory come here unchecked): a label 0.5 cast
    to long was class 0, a passage under "context" was dropped without a word. ``task`` None: each record's own.
    A batch of no records is refused too (the tokenizer fails on an empty list deep inside transformers)."""
    if isinstance(records, dict):  # iterated as its keys: "record None: expected a JSON object, got str"
        raise ValueError(f"a collator takes a list of records (a batch), got one record (a dict with keys "
                         f"{list(records)[:4]}): pass [record]")
    if not records:
        raise ValueError("a batch of no records: give the collator at least one (a DataLoader never makes an empty batch)")
    for r in records:
        problem = validate_record(r, task or record_task(r))
        if problem:
            owner = r.get("id") if isinstance(r, dict) else None
            raise ValueError(f"record {owner!r}: {problem}")


def _positions(tokenizer) -> int | None:
    """The tokenizer's ``model_max_length`` (the model's positions), ``None`` for transformers' "no limit" sentinel."""
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**9 else None


class _TooLong(ValueError):
    """A record no row of ``max_length`` tokens holds as its format needs it: ``problem`` says what would be cut,
    ``needed`` is the ``max_length`` it needs; the message adds :meth:`remedy` for the tokenizer's positions."""

    def __init__(self, problem: str, needed: int, tokenizer):
        self.problem, self.needed = problem, needed
        super().__init__(f"{problem}; {self.remedy(_positions(tokenizer))}")

    def remedy(self, positions: int | None, flag: str = "max_length") -> str:
        """What to do: raise ``flag``, or, where the record needs more than the model's ``positions``, that the model
        cannot take it (a larger ``flag`` is refused there)."""
        if positions is not None and self.needed > positions:
            return (f"it needs {self.needed} tokens, more than the model's {positions} positions: this model cannot take "
                    "it; shorten the record's question or choices, or use a model with more positions")
        return f"it needs {flag} >= {self.needed}: raise {flag}"


def _check_max_length(tokenizer, max_length, special: int, room: str = "a text token", tokens: int = 1) -> int:
    """``max_length`` as an int in ``[special + tokens, the tokenizer's model_max_length]`` (transformers' large
    sentinel where it knows none: no upper bound); ``room`` names the ``tokens`` a row needs beside ``special``."""
    max_length = check_count(max_length, "max_length")
    if max_length < special + tokens:
        raise ValueError(f"max_length={max_length} leaves no room for {room} beside the {special} special "
                         "tokens this tokenizer adds")
    limit = _positions(tokenizer)
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length={max_length} is above this tokenizer's model_max_length={limit} (the model's "
                         "positions): longer inputs would fail in the model's position embeddings")
    return max_length


def _shared_start(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share: the tokens of a text's head alone may merge across its end."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _cuttable(tokenizer, records, format: str, rows: list[list[int]]) -> list[int]:
    """Per row (of the record at the same place), how many of its leading tokens truncation may cut: those of the
    record's passage (:func:`~pyro_lora.prompts.passage_part`), none of its question (a cut of all of the question
    scored every question with the same options alike). ``[]`` for no records (a batch with no multiple-choice record in
    it: the tokenizer fails on an empty list)."""
    if not records:
        return []
    passages = tokenizer([passage_part(r, format) for r in records], add_special_tokens=False)["input_ids"]
    return [_shared_start(p, row) for p, row in zip(passages, rows)]


# what a cut takes, as the warnings say it: a text's end (its start where the tokenizer truncates on the left), or a
# multiple-choice prompt's passage's start
CUT_END = "the model reads none of what follows"
CUT_START = "the model reads none of what precedes"
CUT_PASSAGE = "each loses the start of its passage (its question and choices stay whole)"


def text_cut(tokenizer) -> str:
    """What a text cut by ``tokenizer`` loses: its end (:data:`CUT_END`), or its start (:data:`CUT_START`) where the
    tokenizer's ``truncation_side`` is ``"left"`` (a checkpoint's tokenizer configuration may set it)."""
    return CUT_START if getattr(tokenizer, "truncation_side", "right") == "left" else CUT_END


def _warn_cut(collator, records, lengths: dict, lost: str) -> None:
    """Warn, once per collator, that texts of a batch lose tokens to its ``max_length`` (a legitimate cut, but one
    that can remove what tells texts apart): ``lengths`` maps a record's place in ``records`` to its whole length in
    tokens (special ones included); those longer than ``max_length`` were cut. ``lost`` says what they lose
    (:func:`text_cut` or :data:`CUT_PASSAGE`). Later batches are not counted: a run's per-split counts are
    :func:`~pyro_lora.experiments.setup.prepare`'s, which marks its collator said."""
    cut = [(i, n) for i, n in lengths.items() if n > collator.max_length]
    if collator._cut_said or not cut:
        return
    collator._cut_said = True
    first, tokens = cut[0]
    warnings.warn(f"{len(cut)} of the {len(records)} texts of a batch are longer than max_length={collator.max_length} "
                  f"tokens and are cut to it (the first, record {records[first].get('id')!r}, is {tokens} tokens): "
                  f"{lost}; raise max_length to keep them whole ({type(collator).__name__} says this once: later "
                  "batches may cut more)", stacklevel=user_stacklevel())


def _cloze_split(tokenizer, pairs: list[tuple[str, str]]) -> tuple[list[tuple[list[int], list[int]]], list[list[int]], list[bool]]:
    """Per (context, continuation) text pair: its context's and continuation's token ids as the cloze format scores
    them (:class:`ClozeCollator`), the continuation's ids tokenized alone, and whether a token merges the context's end
    with the continuation's start (the context's tokens are no prefix of the text's)."""
    contexts = tokenizer([c for c, _ in pairs], add_special_tokens=False)["input_ids"]
    wholes = tokenizer([c + t for c, t in pairs], add_special_tokens=False)["input_ids"]
    alone = tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    # the continuation's tokens are the text's own: a SentencePiece tokenizer that prepends "▁" to each text gives
    # " Paris" alone an extra "▁". Where the joint tokens merge across the boundary (":" and " Paris" as ":▁", "P",
    # ...), the text's own tokens from the first the context's do not share: the merged one is scored with the
    # continuation, as every choice whose start merges alike has it (the continuation alone scored "Answer:  Paris",
    # a stray "▁" token more, its probabilities 0.75 off). Only a merge reaching the context's first token leaves
    # the continuation alone.
    split, merged = [], []
    for c, w, a in zip(contexts, wholes, alone):
        shared = _shared_start(c, w)
        split.append((w[:shared], w[shared:]) if 0 < shared < len(w) else (c, a))
        merged.append(shared < len(c))
    return split, alone, merged


def _record_pairs(records) -> list[tuple[str, str]]:
    """The (context, continuation) text pairs the cloze scores of the multiple-choice ``records``."""
    return [(head + own, cont) for head, own_parts in map(cloze_parts, records) for own, cont in own_parts]


def boundary_changes(tokenizer, records) -> set[str]:
    """What the cloze rows of the multiple-choice ``records`` show of the changes to cloze scoring at a context's end
    (:data:`~pyro_lora.experiments.setup.SCORING_CHANGES`), from one tokenization: ``"split"`` where a choice is scored
    on other tokens than its continuation tokenized alone (what form 0 scored, before 2026-12-02), ``"merge"`` where a
    token merges a context's end with its choice's start (such a choice was scored on its continuation alone by forms 1
    to 4, before 2026-12-07)."""
    split, alone, merged = _cloze_split(tokenizer, _record_pairs(records))
    changes = {"merge"} if any(merged) else set()
    return changes | ({"split"} if any(cont != a for (_, cont), a in zip(split, alone)) else set())


def _choice_mask(records, num_choices: int) -> torch.Tensor:
    counts = torch.tensor([len(r["choices"]) for r in records])
    return torch.arange(num_choices)[None, :] < counts[:, None]


class ClassificationCollator:
    """Sequence-classification batches for an encoder.

    Returns ``input_ids [B, T]``, ``attention_mask [B, T]``, ``token_type_ids [B, T]`` (when the
    tokenizer makes them) and ``labels [B]``; padded on the right (whatever the tokenizer's
    ``padding_side``: :class:`~pyro_lora.SequenceClassification` reads right-padded batches) to the longest
    text in the batch, truncated to ``max_length`` tokens at its end (at its start where the tokenizer's
    ``truncation_side`` is ``"left"``): the first batch that cuts a text says so in a warning (how many of its texts,
    the first by id, and which end it loses).
    """

    _cut_said = False  # whether a cut was said: once per collator

    def __init__(self, tokenizer, max_length: int = 128):
        self.tokenizer = tokenizer
        # a max_length below the special tokens truncated nothing; one of exactly them made every text [CLS] [SEP]
        self.max_length = _check_max_length(tokenizer, max_length, tokenizer.num_special_tokens_to_add())

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        _check_records(records, "classification")
        batch = self.tokenizer(
            [r["text"] for r in records],
            padding="longest",
            padding_side="right",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        out = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        out["labels"] = _labels(records)
        if not self._cut_said:  # only a row of max_length tokens may have been cut: those are tokenized whole
            full = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).sum(-1) == self.max_length
            at = full.nonzero().flatten().tolist()
            whole = self.tokenizer([records[i]["text"] for i in at], verbose=False)["input_ids"] if at else []
            _warn_cut(self, records, {i: len(ids) for i, ids in zip(at, whole)}, text_cut(self.tokenizer))
        return out


class LetterCollator:
    """Letter-format multiple-choice batches for a causal LM.

    Returns ``input_ids [B, T]``, ``attention_mask [B, T]``, ``labels [B]`` and ``choice_mask [B, K]``
    (bool, ``K`` = most choices in the batch, ``False`` for options a record lacks). Prompts longer
    than ``max_length`` lose tokens at the start of their passage, so ``Answer:`` stays last; a cut that would
    reach the question or the answer options is refused (``ValueError`` naming the ``max_length`` needed): the
    model would be asked for a letter of a question or an option it never saw. With left padding (the
    default) the last real token sits at position ``-1``, where the answer-letter logits are read;
    with right padding it sits at ``attention_mask.sum(-1) - 1``. Either way the positions count real
    tokens only (:class:`~pyro_lora.MultipleChoice`), so the logits do not depend on the padding.

    The first batch that cuts a passage says so in a warning, once per collator (how many of its records, the first
    by id and its whole length); ``last_cut`` holds, after each call, the records that call cut: their place in the
    batch -> their whole length in tokens (special ones included), for a caller that counts them (``compare``).
    """

    _cut_said = False  # whether a cut was said: once per collator

    def __init__(self, tokenizer, max_length: int = 512, padding_side: str = "left"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.tokenizer = tokenizer
        self.padding_side = padding_side
        self.pad_id = _pad_id(tokenizer)
        self.prefix = _special_prefix(tokenizer)
        self.max_length = _check_max_length(tokenizer, max_length, len(self.prefix))
        self.last_cut: dict[int, int] = {}

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        _check_records(records, "multiple_choice")
        heads, tails = zip(*(letter_parts(r) for r in records))
        encoded = self.tokenizer([h + t for h, t in zip(heads, tails)], add_special_tokens=False)["input_ids"]
        budget = self.max_length - len(self.prefix)
        for record, ids, cuttable in zip(records, encoded, _cuttable(self.tokenizer, records, "letter", encoded)):
            if len(ids) - budget > cuttable:  # only a passage is cut: the question and the options stay whole
                raise _TooLong(
                    f"record {record.get('id')!r}: its letter prompt is {len(ids)} tokens and max_length="
                    f"{self.max_length} would cut into its question or answer options (a letter asked "
                    f"for a question or an option never seen)", len(self.prefix) + len(ids) - cuttable, self.tokenizer
                )
        rows = [self.prefix + ids[-budget:] for ids in encoded]
        self.last_cut = {i: len(self.prefix) + len(ids) for i, ids in enumerate(encoded) if len(ids) > budget}
        _warn_cut(self, records, self.last_cut, CUT_PASSAGE)
        input_ids, attention_mask = _pad(rows, self.pad_id, self.padding_side)
        num_choices = max(len(r["choices"]) for r in records)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": _labels(records),
            "choice_mask": _choice_mask(records, num_choices),
        }


class ClozeCollator:
    """Cloze-format multiple-choice batches for a causal LM: one row per (record, choice).

    Row ``b * K + k`` holds context + continuation of choice ``k`` of record ``b`` (``K`` = most
    choices in the batch). Returns

    * ``input_ids``, ``attention_mask`` ``[B*K, T]``, right-padded;
    * ``target_mask [B*K, T]`` bool: the positions of the continuation tokens in ``input_ids`` (the
      logits that predict them sit one position earlier);
    * ``target_lengths [B*K]`` (tokens) and ``target_chars [B*K]`` (characters of the continuation without the
      space the cloze puts before a choice: ``len(choice)``, as lm-eval's ``acc_norm`` counts; WinoGrande's rest of
      the sentence whole), for length normalisation;
    * ``choice_mask [B, K]`` bool and ``labels [B]``.

    The continuation's tokens are those of context and continuation tokenized together, after the context's
    own (as lm-evaluation-harness splits them), so they are the text's own: a SentencePiece tokenizer that
    prepends ``"▁"`` to each text it encodes would give a continuation tokenized alone an extra token. Where
    a token merges the context's end with the continuation's start, the continuation is the text's tokens from that
    one on (the context keeps the tokens it shares with the text). Too long a question loses
    tokens at the start of its passage, the same tokens for each of its choices (as many as its longest row needs),
    so the choices are compared under one context. Refused (``ValueError``): a choice longer than ``max_length``
    leaves for it (cutting its end would score the choices on their beginnings), a cut that would reach the question
    (a WinoGrande sentence, or the choice where it sits in the context in partial scoring: every record without a
    passage is never cut), and an empty context (a WinoGrande
    sentence that is only its blank: the continuation's first token would have nothing to condition on). Missing choices become a 1-token dummy row with an
    empty target, lengths 1 (so normalising never divides by zero) and ``choice_mask`` False.

    The first batch that cuts a passage says so in a warning, once per collator (how many of its records, the first
    by id and the length of its longest row whole); ``last_cut`` holds, after each call, the records that call cut:
    their place in the batch -> their longest row's whole length in tokens (special ones included), for a caller
    that counts them (``compare``).
    """

    _cut_said = False  # whether a cut was said: once per collator

    def __init__(self, tokenizer, max_length: int = 512):
        self.tokenizer = tokenizer
        self.pad_id = _pad_id(tokenizer)
        self.prefix = _special_prefix(tokenizer)
        self.max_length = _check_max_length(tokenizer, max_length, len(self.prefix), "a context and a continuation", 2)
        self.last_cut: dict[int, int] = {}

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        _check_records(records, "multiple_choice")
        num_choices = max(len(r["choices"]) for r in records)
        parts = [cloze_parts(r) for r in records]
        real = [(head + own, cont) for head, own_parts in parts for own, cont in own_parts]
        tok = self.tokenizer
        split = iter(_cloze_split(tok, real)[0])

        rows, spans, chars, cuts = [], [], [], {}
        budget = self.max_length - len(self.prefix)
        own_rows = [[next(split) for _ in own_parts] for _, own_parts in parts]
        # what a cut may take of each choice's context: its passage, never the question
        cuttable = iter(_cuttable(tok, [r for r, (_, own_parts) in zip(records, parts) for _ in own_parts], "cloze",
                                  [ctx for own in own_rows for ctx, _ in own]))
        for place, (record, (_, own_parts), own) in enumerate(zip(records, parts, own_rows)):
            owner = record.get("id")
            for ctx, cont in own:
                if len(cont) > budget - 1:  # at least one context token to condition on
                    raise _TooLong(
                        f"a choice of record {owner!r} is {len(cont)} tokens, more than max_length={self.max_length} "
                        f"leaves for it ({budget - 1}): its end would be cut and the choices scored on their beginnings "
                        "only", len(self.prefix) + 1 + len(cont), tok
                    )
                if not ctx:
                    raise ValueError(
                        f"record {owner!r} has an empty cloze context (a WinoGrande sentence that is only its blank?): "
                        "the continuation's first token would have nothing to condition on; give the sentence text "
                        "around the blank"
                    )
            # one cut for every choice, within the head they share: the choices are compared under one context
            longest = max(len(c) + len(t) for c, t in own)
            cut = max(0, longest - budget)
            shared = min(next(cuttable) for _ in own)
            if cut > shared:
                raise _TooLong(
                    f"record {owner!r}: max_length={self.max_length} would cut into its question (only a passage is "
                    "cut; in WinoGrande's partial scoring the choice sits in the context), scoring the choices on "
                    "fragments", len(self.prefix) + longest - shared, tok
                )
            if cut:
                cuts[place] = len(self.prefix) + longest
            for (ctx, cont), (in_context, text) in zip(own, own_parts):
                row = self.prefix + ctx[cut:] + cont
                rows.append(row)
                spans.append((len(row) - len(cont), len(row)))
                # the continuation's own characters: lm-eval's acc_norm leaves out the space the cloze puts before a
                # choice (WinoGrande's rest of the sentence is counted whole: no space was put before it)
                chars.append(len(text) if in_context else len(text.removeprefix(" ")))
            for _ in range(num_choices - len(own)):
                rows.append([self.pad_id])
                spans.append((1, 1))
                chars.append(1)

        self.last_cut = cuts
        _warn_cut(self, records, cuts, CUT_PASSAGE)
        input_ids, attention_mask = _pad(rows, self.pad_id, "right")
        target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for i, (start, stop) in enumerate(spans):
            target_mask[i, start:stop] = True
        choice_mask = _choice_mask(records, num_choices)
        target_lengths = target_mask.sum(-1).masked_fill(~choice_mask.reshape(-1), 1)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "target_mask": target_mask,
            "target_lengths": target_lengths,
            "target_chars": torch.tensor(chars, dtype=torch.long),
            "choice_mask": choice_mask,
            "labels": _labels(records),
        }


class CausalLMCollator:
    """Token-level language-modelling batches.

    Returns ``input_ids``, ``attention_mask`` and ``labels``, all ``[B, T]``, right-padded; ``labels``
    equal ``input_ids`` with -100 on padding (the model shifts them). The text of each record comes
    from ``text_fn`` (default ``record_text``). Records of either layout are checked as the reader checks them
    (:func:`~pyro_lora.records.validate_record`, the task told by :func:`~pyro_lora.records.record_task`).
    A text longer than ``max_length`` tokens loses its end, except a multiple-choice record's default text (passage,
    question and correct answer), which loses the start of its passage: cutting its end trained on the question
    without the answer. The first batch that cuts a text says so in a warning, once per collator (a batch that cuts
    both kinds says the ends). A cut that would reach its question or answer (only a passage is cut) is refused
    (``ValueError`` naming the ``max_length`` needed): the label would not change what is trained. So is (naming the
    records) a ``text_fn`` giving no string, or text the tokenizer encodes as no token.
    """

    _cut_said = False  # whether a cut was said: once per collator

    def __init__(self, tokenizer, max_length: int = 512, text_fn: Callable[[dict], str] = record_text):
        self.tokenizer = tokenizer
        self.text_fn = text_fn
        self.pad_id = _pad_id(tokenizer)
        self.prefix = _special_prefix(tokenizer)
        self.max_length = _check_max_length(tokenizer, max_length, len(self.prefix))

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        _check_records(records, None)  # either layout; unchecked, a label -1 trained the last choice, True choice 1
        texts = [self.text_fn(r) for r in records]
        wrong = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if wrong:  # the tokenizer's own error named neither the record nor text_fn
            raise ValueError(f"text_fn gave record(s) {wrong[:5]} of the batch (id {records[wrong[0]].get('id')!r} first) "
                             f"no string but {type(texts[wrong[0]]).__name__}: it must return each record's text")
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        empty = [i for i, ids in enumerate(encoded) if not ids]
        if empty:  # a row of no text scores nothing and failed deep inside the network
            raise ValueError(f"record(s) {empty[:5]} of the batch give no tokens (text_fn gave text the tokenizer "
                             "encodes as nothing, e.g. an empty string): leave them out, or give them text")
        budget = self.max_length - len(self.prefix)
        rows = [self.prefix + ids[:budget] for ids in encoded]
        chosen = [(i, r) for i, r in enumerate(records) if self.text_fn is record_text and record_task(r) == "multiple_choice"]
        kept = {i for i, _ in chosen}  # their end stays: what they lose is checked below
        _warn_cut(self, records, {i: len(self.prefix) + len(ids) for i, ids in enumerate(encoded) if i not in kept},
                  CUT_END)  # cut here, whatever the tokenizer's truncation_side
        if chosen:  # a multiple-choice record keeps its answer: it loses its question's start
            cuts = _cuttable(self.tokenizer, [r for _, r in chosen], "cloze", [encoded[i] for i, _ in chosen])
            for (i, record), cuttable in zip(chosen, cuts):
                cut = len(encoded[i]) - budget
                if cut > cuttable:
                    raise _TooLong(
                        f"record {record.get('id')!r}: its question and answer are {len(encoded[i])} tokens and "
                        f"max_length={self.max_length} would cut into its question or answer (the "
                        "label would not change what is trained)", len(self.prefix) + len(encoded[i]) - cuttable,
                        self.tokenizer
                    )
                rows[i] = self.prefix + encoded[i][max(cut, 0):]
            _warn_cut(self, records, {i: len(self.prefix) + len(encoded[i]) for i in kept}, CUT_PASSAGE)
        input_ids, attention_mask = _pad(rows, self.pad_id, "right")
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100),
        }
