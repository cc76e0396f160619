"""Prompt formats: how a multiple-choice record reaches a causal LM.

* **letter**: one prompt listing the options as ``A. ...``, ending with ``Answer:``; the class logits
  are the next-token logits of the answer letters (:func:`letter_token_ids`). Used by the large-model
  papers.
* **cloze**: one (context, continuation) pair per option (:func:`cloze_pairs`); the class score is the
  log-likelihood of the continuation. Small models (SmolLM2-135M) are at chance in the letter format and
  need this one.

A question is asked as a WinoGrande sentence with one ``_`` blank (in both formats) where its record carries the
mark ``"blank": True``, which :func:`mark_blank_sentences` sets on every record of a dataset whose records are all
such sentences (:func:`~pyro_lora.data.load_records` does for a JSONL dataset): the format is the dataset's, never
guessed from one record's text.
"""

from __future__ import annotations

import operator
import string
import warnings

import torch

from .records import BLANK, looks_blank, record_task, validate_record
from .callers import user_stacklevel

__all__ = ["LETTERS", "asked_question", "cloze_pairs", "cloze_parts", "is_blank_item", "letter_parts", "letter_prompt", "letter_token_ids",
           "mark_blank_sentences", "passage_part", "record_text"]

LETTERS = string.ascii_uppercase
_ANSWER = "\nAnswer:"  # the letter prompt's end: the next token is the answer letter


def _as_question(text: str) -> str:
    """BoolQ questions come without a question mark, some with one: end each with exactly one."""
    return text.rstrip().rstrip("?") + "?"


def asked_question(record: dict) -> str:
    """A record's question as its prompts ask it: after a passage (BoolQ's), ending in exactly one ``?``; else as
    written (a blank sentence's too)."""
    return _as_question(record["question"]) if "context" in record else record["question"]


def is_blank_item(record: dict) -> bool:
    """Whether a multiple-choice record is asked as a WinoGrande-style sentence with one ``_`` blank: whether it
    carries the mark ``"blank": True`` (:func:`mark_blank_sentences`). A record without it is a question, whatever its
    text holds.

    :warns UserWarning: for an unmarked record that has a blank sentence's shape (built in memory, its dataset's
        format never decided), once per process under Python's default warning filter.
    """
    mark = record.get(BLANK)
    if mark is None and looks_blank(record):
        warnings.warn("a multiple-choice record holding one '_' between spaces, as a WinoGrande sentence does, carries "
                      f"no {BLANK!r} mark: it is asked as a question (the blank format is a dataset's, never guessed from "
                      "one record); decide it for records built in memory with "
                      "pyro_lora.data.mark_blank_sentences(train, test)", stacklevel=user_stacklevel())
    return mark is True


def blank_format(*splits, name: str = "the records") -> bool:
    """Whether a multiple-choice dataset, every record of every one of its ``splits`` (iterables of records), is in
    the blank-sentence format: every record a sentence with one ``_`` between spaces and no passage
    (:func:`~pyro_lora.records.looks_blank`). Records are not changed.

    :param name: the dataset, as the warning names it.
    :raises ValueError: for a record without ``choices`` (a classification one).
    :warns UserWarning: where some records but not all look like blank sentences (they are asked as questions),
        naming how many and the first by id.
    """
    records = [r for split in splits for r in split]
    foreign = next((r for r in records if record_task(r) != "multiple_choice"), None)
    if foreign is not None:
        owner = f"record {foreign.get('id')!r}" if isinstance(foreign, dict) else f"a {type(foreign).__name__}"
        raise ValueError(f"{owner} of {name} has no 'choices': the blank-sentence format is one of multiple-choice "
                         "records only")
    looking = [r for r in records if looks_blank(r)]
    if looking and len(looking) < len(records):
        warnings.warn(f"{len(looking)} of the {len(records)} records of {name} hold one '_' between spaces, as a "
                      f"WinoGrande blank sentence does (the first: record {looking[0]['id']!r}), but the others do "
                      "not: every record is asked as a question (the blank format is a whole dataset's); if they are "
                      "blank sentences, make every record one", stacklevel=user_stacklevel())
    return bool(records) and len(looking) == len(records)


def mark_blank_sentences(*splits, name: str = "the records") -> bool:
    """Decide the prompt format of a multiple-choice dataset built in memory, once for all its records, as
    :func:`~pyro_lora.data.load_records` does for a JSONL dataset: where every record of every split is a sentence
    with one ``_`` between spaces and no passage (WinoGrande), each gets ``"blank": True`` and is asked as a blank
    sentence; otherwise each is asked as a question (:func:`blank_format`): those with a blank's shape get
    ``"blank": False``, the others hold no mark. Pass every split of the dataset (its train and test records): a
    question that happens to hold a lone ``_`` (a Python name) is then never asked as a blank sentence.

    :param splits: lists of the dataset's records, changed in place.
    :param name: the dataset, as the warning names it.
    :returns: whether the records are blank sentences.
    :raises ValueError: for a record without ``choices``.
    :warns UserWarning: where some records but not all look like blank sentences.
    """
    for r in (r for split in splits for r in split):  # in-memory records, unchecked: a missing question was a raw KeyError
        problem = validate_record({k: v for k, v in r.items() if k != BLANK}, "multiple_choice") \
            if record_task(r) == "multiple_choice" else None  # blank_format names a record without choices
        if problem:
            raise ValueError(f"record {r.get('id')!r} of {name}: {problem}")
    blank = blank_format(*splits, name=name)
    for split in splits:
        for record in split:
            if looks_blank(record):  # every record of a blank dataset
                record[BLANK] = blank
            else:
                record.pop(BLANK, None)
    return blank


def letter_prompt(record: dict) -> str:
    """The letter-format prompt: question (with passage or blank sentence), options ``A. ...``,
    ending with ``Answer:`` so the next token is the answer letter."""
    return "".join(letter_parts(record))


def letter_parts(record: dict) -> tuple[str, str]:
    """The letter prompt as ``(head, tail)``: the question (with passage or blank sentence) and the options block
    ending with ``Answer:``. ``head + tail`` is :func:`letter_prompt`."""
    choices = record["choices"]
    if len(choices) > len(LETTERS):
        raise ValueError(f"record {record['id']!r} has {len(choices)} choices, more than {len(LETTERS)} letters")
    if "context" in record:
        head = f"{passage_part(record, 'letter')}\nQuestion: {asked_question(record)}"
    elif is_blank_item(record):
        head = f"Sentence: {record['question']}\nWhich option fills the blank?"
    else:
        head = f"Question: {record['question']}"
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return head, f"\n{options}{_ANSWER}"


def letter_token_ids(tokenizer, num_choices: int) -> torch.Tensor:
    """``LongTensor[num_choices]``: the token id of ``" A"``, ``" B"``, ... as it follows the prompt's ``Answer:``.

    Tokenized after ``Answer:``, not alone: a SentencePiece tokenizer that prepends ``▁`` to every text (Llama-2,
    Mistral-v0.1) makes ``" A"`` alone two tokens ``▁``, ``▁A``, where the prompt's answer is the one token ``▁A``.

    Raises ``ValueError`` for more choices than letters, or if a letter after ``Answer:`` is not exactly one token or
    is the tokenizer's unknown token.
    """
    try:  # an int, a numpy integer, a 0-d integer tensor
        count = None if isinstance(num_choices, bool) else operator.index(num_choices)
    except TypeError:
        count = None
    if count is None or not 2 <= count <= len(LETTERS):  # 30 gave 26 ids; 1 a choice of probability 1
        raise ValueError(f"num_choices must be 2 to {len(LETTERS)} (one letter each; one choice would have probability 1), "
                         f"got {num_choices!r}")
    context = tokenizer(_ANSWER, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS[:count]:
        whole = tokenizer(f"{_ANSWER} {letter}", add_special_tokens=False)["input_ids"]
        tokens = whole[len(context):] if whole[: len(context)] == context else None
        if tokens is None or len(tokens) != 1:
            shown = tokenizer.convert_ids_to_tokens(whole) if hasattr(tokenizer, "convert_ids_to_tokens") else whole
            raise ValueError(f"' {letter}' after {_ANSWER!r} is not one token of its own for this tokenizer ({shown}); the "
                             "letter format needs one per letter: use the cloze format")
        if tokens[0] == getattr(tokenizer, "unk_token_id", None):  # a vocabulary without the letter: one shared id
            raise ValueError(f"' {letter}' after {_ANSWER!r} is this tokenizer's unknown token "
                             f"{getattr(tokenizer, 'unk_token', None)!r}: the letter format needs a token per letter; use "
                             "the cloze format")
        ids.append(tokens[0])
    return torch.tensor(ids, dtype=torch.long)


def cloze_pairs(record: dict) -> list[tuple[str, str]]:
    """One ``(context, continuation)`` pair per choice; the score of a choice is the log-likelihood
    of its continuation given its context.

    * QA: context ``"Question: {q}\\nAnswer:"``, continuation ``" {choice}"``;
    * passage (BoolQ): context ``"{passage}\\nQuestion: {q}?\\nAnswer:"`` (one ``?``), continuation ``" {choice}"``;
    * blank sentence (WinoGrande), partial scoring: context = the sentence up to the blank with the
      choice filled in, continuation = the rest of the sentence, the same text for every choice.

    Continuations other than WinoGrande's rest of the sentence start with a space before the choice.
    """
    head, parts = cloze_parts(record)
    return [(head + own, continuation) for own, continuation in parts]


def cloze_parts(record: dict) -> tuple[str, list[tuple[str, str]]]:
    """:func:`cloze_pairs` split for truncation: ``(head, [(own, continuation), ...])``, each choice's context is
    ``head + own``; ``head`` is the text every choice shares, ``own`` the choice itself in
    WinoGrande's partial scoring (the continuation is then the rest of the sentence), else ``""`` (the continuation is
    then ``" {choice}"``, the choice after one space)."""
    choices = record["choices"]
    question = record["question"]
    if is_blank_item(record):
        start = question.index("_")
        prefix, rest = question[:start], question[start + 1 :]
        if rest.strip():
            return prefix, [(c, rest) for c in choices]
        # Blank at the very end: nothing shared to score, so score the filled-in ending instead.
        return prefix.rstrip(), [("", f" {c}{rest}") for c in choices]
    if "context" in record:
        context = f"{passage_part(record, 'cloze')}\nQuestion: {asked_question(record)}\nAnswer:"
    else:
        context = f"Question: {question}\nAnswer:"
    return context, [("", f" {c}") for c in choices]


def passage_part(record: dict, format: str) -> str:
    """The start of a record's ``format`` (``"letter"`` or ``"cloze"``) prompt that truncation may cut: its passage
    (BoolQ's ``context``), ``""`` for a record without one. The question, a WinoGrande sentence and the options are
    never cut: a question cut away scored every question with the same options alike."""
    if "context" not in record:
        return ""
    return f"Passage: {record['context']}" if format == "letter" else record["context"]


def record_text(record: dict) -> str:
    """Plain text of a record for language modelling: the cloze context followed by the correct continuation for
    multiple-choice records (those with ``choices``, whatever extra fields they carry, ``text`` included), ``text``
    for classification ones. The record is taken as valid (:func:`~pyro_lora.records.validate_record`): a label of
    -1 would pick the last choice."""
    if record_task(record) == "classification":
        return record["text"]
    context, continuation = cloze_pairs(record)[record["label"]]
    return context + continuation
