"""The canonical record layout (one JSON object per example) and its validation, shared by the JSONL reader and the
collators (which see in-memory records too).

* classification: ``{"id", "text", "label"}``;
* multiple choice: ``{"id", "question", "choices", "label"}``, optionally ``"context"`` (a passage) and ``"blank"``,
  true for a WinoGrande sentence with one ``_`` blank in a dataset of such sentences, false for a question that only
  looks like one (:func:`~pyro_lora.prompts.mark_blank_sentences` sets it; a JSONL file does not hold it).

Every text the model reads (a text, question, passage or choice) holds a visible character, and ``id`` is unique
within a file (:func:`~pyro_lora.data.load_records` checks it).
"""

from __future__ import annotations

import numbers
import re
import unicodedata

__all__ = ["BLANK", "looks_blank", "record_task", "validate_record", "visible"]

BLANK = "blank"  # the key marking a record of a dataset of WinoGrande blank sentences

# A WinoGrande blank is a lone "_" between spaces; ARC/OBQA use "___" blanks and "CO_{2}" formulas,
# which must stay ordinary questions.
_BLANK = re.compile(r"(?<!\S)_(?![\w{])")


# fields of common dataset layouts holding text the model is meant to read, which this layout reads under another name:
# loaded as they were, the passage or the NLI hypothesis was dropped without a word
_UNREAD = {"classification": ("premise", "hypothesis", "sentence", "sentence1", "sentence2", "passage"),
           "multiple_choice": ("passage", "article", "support", "fact1")}
_UNREAD_ADVICE = {
    "classification": "the classifier reads 'text' alone; join the texts into 'text' (e.g. an NLI premise and hypothesis "
                      "with the tokenizer's separator) and drop the field",
    "multiple_choice": "a multiple-choice record's passage goes under 'context'"}


def visible(text: str) -> bool:
    """Whether ``text`` holds a character a tokenizer keeps: not only whitespace, control or format characters
    (a zero-width space, a soft hyphen, a byte-order mark), which tokenizers drop, nor marks alone (a combining
    accent, a variation selector), which an uncased tokenizer strips to nothing, nor U+FFFD, the replacement character
    a mis-decoded text is left with, which WordPiece tokenizers drop."""
    return any(unicodedata.category(c)[0] not in "CZM" and c != "\ufffd" for c in text)


def looks_blank(record: dict) -> bool:
    """Whether a multiple-choice record has the shape of a WinoGrande sentence: no passage, one ``_``, between spaces.
    The shape alone does not make a record a blank sentence (a Python question may ask about the name ``_``): its
    dataset does (:func:`~pyro_lora.prompts.mark_blank_sentences`)."""
    question = record["question"]
    return "context" not in record and question.count("_") == 1 and _BLANK.search(question) is not None


def record_task(record: object) -> str:
    """The task a record of either layout belongs to: ``"multiple_choice"`` if it has ``choices``, else
    ``"classification"`` (a multiple-choice record may carry an extra ``text`` field, as the reader allows)."""
    return "multiple_choice" if isinstance(record, dict) and "choices" in record else "classification"


def validate_record(record: object, task: str, num_labels: int | None = None) -> str | None:
    """What is wrong with ``record`` for ``task`` (``None`` if it is valid).

    ``num_labels`` bounds the label of classification records (``len(meta["label_names"])``).
    """
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    required = ("id", "question", "choices", "label") if task == "multiple_choice" else ("id", "text", "label")
    missing = [k for k in required if k not in record]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
        numpy = isinstance(record["id"], numbers.Integral) and not isinstance(record["id"], bool)
        return ("id must be a string or a Python int (the results name examples by it, as JSON), got "
                f"{record['id']!r}" + (": convert it with int()" if numpy else ""))
    label = record["label"]
    if not isinstance(label, numbers.Integral) or isinstance(label, bool):  # numpy integers of in-memory records too
        return f"label must be an integer, got {label!r}"
    if not -2**63 <= label < 2**63:  # torch's int64 labels: a raw overflow error naming no record
        return f"label {label} is beyond int64's range"
    unread = [k for k in _UNREAD[task] if k in record]
    if unread:
        return (f"the field(s) {', '.join(map(repr, unread))} would not be read: {_UNREAD_ADVICE[task]}")
    if task == "classification":
        if not isinstance(record["text"], str):
            return "text must be a string"
        if not visible(record["text"]):
            return "text is empty (or only whitespace or invisible characters): every such example would be the same input"
        if "context" in record:  # a passage: only multiple choice reads it
            return ("a classification record's 'context' (a passage) would not be read: the classifier reads 'text' "
                    "alone; put the passage into 'text'")
        foreign = [k for k in ("question", "choices") if k in record]
        if foreign:  # record_task calls a record with "choices" multiple choice: the layouts must not mix
            return (f"a classification record holds the multiple-choice key(s) {', '.join(foreign)}, which the classifier "
                    "would not read (it reads 'text' alone; a record with 'choices' counts as multiple choice "
                    "elsewhere): remove them, or make the dataset a multiple-choice one")
        if num_labels is not None and not 0 <= label < num_labels:
            return f"label {label} out of range [0, {num_labels})"
        return None
    if not isinstance(record["question"], str):
        return "question must be a string"
    if not visible(record["question"]):
        return ("question is empty (or only whitespace or invisible characters): the choices would be scored with "
                "nothing asked")
    choices = record["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        return "choices must be a list of at least 2 strings"
    blank = [i for i, c in enumerate(choices) if not visible(c)]
    if blank:
        return (f"choice(s) {blank} are empty (or only whitespace or invisible characters): a blank continuation "
                "scores as one likely token")
    if not 0 <= label < len(choices):
        return f"label {label} out of range [0, {len(choices)})"
    # the same text however encoded ("cafe" + a combining accent is "café"), which a tokenizer without a normaliser
    # (byte-level BPE) still gives other tokens: the label between them is arbitrary either way
    same = unicodedata.normalize("NFC", choices[label])
    copies = [i for i, c in enumerate(choices) if unicodedata.normalize("NFC", c) == same and i != label]
    if copies:  # duplicates of unlabelled choices are harmless (OpenBookQA's train split has some)
        return (f"the labelled choice {label} ({choices[label]!r}) is also choice(s) {copies} (the same text, in Unicode's "
                "NFC form): nothing tells the answer from its copy, so the label is arbitrary (in the cloze format "
                "identical copies score the same and the label can never win); remove the duplicate or fix the label")
    if "context" in record and not isinstance(record["context"], str):
        return "context must be a string"
    if "context" in record and not visible(record["context"]):  # a WinoGrande sentence with one is asked as a question
        return ("context is empty (or only whitespace or invisible characters): the prompt would hold an empty passage; "
                "leave the key out for a record without one")
    if BLANK in record and not (record[BLANK] is False or record[BLANK] is True and looks_blank(record)):
        return (f"{BLANK!r} is {record[BLANK]!r}: the mark is true (asked as a blank sentence) on a sentence with one "
                "'_' between spaces and no passage only, or false (asked as a question); "
                "pyro_lora.data.mark_blank_sentences sets it for a whole dataset")
    return None
