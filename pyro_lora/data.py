"""Datasets, prompt formats and collators.

The datasets live outside the repository in one canonical JSONL layout (see
``shared/data/README.md``)::

    <data_dir>/<name>/{train,test}.jsonl, meta.json

with records ``{"id", "question", "choices", "label", "context"?}`` for ``multiple_choice`` and
``{"id", "text", "label"}`` for ``classification``.

Multiple choice reaches a causal LM in one of two formats:

* **letter**: one prompt listing the options as ``A. ...``, ending with ``Answer:``; the class logits
  are the next-token logits of the answer letters (``letter_token_ids``). Used by the large-model
  papers.
* **cloze**: one (context, continuation) pair per option; the class score is the log-likelihood of
  the continuation. Small models (SmolLM2-135M) are at chance in the letter format and need this one.

Collators turn a list of records into a dict of tensors; ``make_loader`` wraps them in a seeded
``DataLoader``.
"""

from __future__ import annotations

import json
import os
import re
import string
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

__all__ = [
    "TASKS",
    "SPLITS",
    "LETTERS",
    "default_data_dir",
    "available_datasets",
    "load_meta",
    "load_records",
    "validate_record",
    "split_train_val",
    "subset",
    "is_blank_item",
    "letter_prompt",
    "letter_token_ids",
    "cloze_pairs",
    "record_text",
    "ClassificationCollator",
    "LetterCollator",
    "ClozeCollator",
    "CausalLMCollator",
    "make_loader",
]

TASKS = ("multiple_choice", "classification")
SPLITS = ("train", "test")
LETTERS = string.ascii_uppercase

# A WinoGrande blank is a lone "_" between spaces; ARC/OBQA use "___" blanks and "CO_{2}" formulas,
# which must stay ordinary questions.
_BLANK = re.compile(r"(?<!\S)_(?![\w{])")


# --------------------------------------------------------------------------- locating and loading


def default_data_dir() -> Path:
    """The datasets folder: ``$PYRO_LORA_DATA``, else the first existing of ``./shared/data``,
    ``../shared/data`` (relative to the working directory) and ``shared/data`` beside the checkout
    that holds this package."""
    env = os.environ.get("PYRO_LORA_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"PYRO_LORA_DATA={env!r} is not a directory")
        return path
    cwd = Path.cwd()
    candidates = [
        cwd / "shared" / "data",
        cwd.parent / "shared" / "data",
        Path(__file__).resolve().parent.parent.parent / "shared" / "data",
    ]
    for path in candidates:
        if path.is_dir():
            return path
    tried = "\n  ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"no datasets folder found; set PYRO_LORA_DATA or pass data_dir. Tried:\n  {tried}"
    )


def resolve_data_dir(data_dir=None) -> Path:
    """The absolute datasets folder: ``data_dir``, else :func:`default_data_dir`.

    :raises FileNotFoundError: if ``data_dir`` is not a folder.
    """
    if data_dir is None:
        return default_data_dir().resolve()
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} (--data-dir) does not exist or is not a folder")
    return path.resolve()


def available_datasets(data_dir=None) -> list[str]:
    """Names of the datasets (sub-folders holding a ``meta.json``) in ``data_dir``."""
    root = resolve_data_dir(data_dir)
    return sorted(p.name for p in root.iterdir() if (p / "meta.json").is_file())


_META_NEEDS = f'"task" (one of {", ".join(TASKS)}) and, for classification, "label_names" (a list of at least 2 names)'


def _dataset_dir(name: str, data_dir) -> Path:
    """``<data_dir>/<name>``; raises ``ValueError`` if it is missing or holds no ``meta.json``."""
    root = resolve_data_dir(data_dir)
    folder = root / name
    if folder.is_dir() and not (folder / "meta.json").is_file():  # a half-prepared dataset is no typo of a name
        raise ValueError(f"dataset folder {folder} exists but has no meta.json; it must hold a JSON object with {_META_NEEDS}")
    if not (folder / "meta.json").is_file():
        raise ValueError(
            f"unknown dataset {name!r} in {root}; available: {', '.join(available_datasets(root)) or 'none'}"
        )
    return folder


def load_meta(name: str, data_dir=None) -> dict:
    """``meta.json`` of a dataset (task, counts, sources, ``label_names`` for classification).

    Raises ``ValueError`` naming the folder if it has no ``meta.json``, and naming the file if that is not
    UTF-8 JSON, not an object, or lacks a valid ``task`` or (for classification) ``label_names``.
    """
    path = _dataset_dir(name, data_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:  # names a byte position only, never the file
        raise ValueError(f"{path}: not UTF-8 (byte 0x{err.object[err.start]:02x} at byte offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: must be a JSON object with {_META_NEEDS}, got {type(meta).__name__}")
    if meta.get("task") not in TASKS:
        raise ValueError(f"{path}: task must be one of {TASKS}, got {meta.get('task')!r}")
    if meta["task"] == "classification":
        names = meta.get("label_names")
        if not isinstance(names, list) or len(names) < 2:
            raise ValueError(f"{path}: classification needs label_names, a list of at least 2 names")
    return meta


def validate_record(record, task: str, num_labels: int | None = None) -> str | None:
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
        return "id must be a string or an integer"
    label = record["label"]
    if not isinstance(label, int) or isinstance(label, bool):
        return f"label must be an integer, got {label!r}"
    if task == "classification":
        if not isinstance(record["text"], str):
            return "text must be a string"
        if num_labels is not None and not 0 <= label < num_labels:
            return f"label {label} out of range [0, {num_labels})"
        return None
    if not isinstance(record["question"], str):
        return "question must be a string"
    choices = record["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        return "choices must be a list of at least 2 strings"
    if not 0 <= label < len(choices):
        return f"label {label} out of range [0, {len(choices)})"
    if "context" in record and not isinstance(record["context"], str):
        return "context must be a string"
    return None


def load_records(name: str, split: str, data_dir=None) -> list[dict]:
    """Every record of ``<data_dir>/<name>/<split>.jsonl``, validated against the dataset's task.

    Raises ``ValueError`` naming the file and line for a line that is not UTF-8, malformed JSON or an
    invalid record, and for an empty file; ``FileNotFoundError`` if the split's file is missing.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    meta = load_meta(name, data_dir)
    task = meta["task"]
    num_labels = len(meta["label_names"]) if task == "classification" else None
    path = _dataset_dir(name, data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    records = []
    with path.open("rb") as f:  # decoded line by line: a text-mode error names a byte position in the file only
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: not UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line); "
                    "re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            problem = validate_record(record, task, num_labels)
            if problem:
                raise ValueError(f"{path}:{lineno}: invalid {task} record: {problem}")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records (empty file)")
    return records


# --------------------------------------------------------------------------- splits


def split_train_val(records, val_fraction: float = 0.1, val_size: int | None = None, seed: int = 0):
    """Split ``records`` into ``(train, val)`` by a seeded permutation.

    ``val_size`` (a count) overrides ``val_fraction``. The same seed gives the same split on every
    run; both parts keep the original record order.
    """
    n = len(records)
    if val_size is None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        val_size = max(1, int(round(n * val_fraction)))
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be in [1, {n - 1}] for {n} records, got {val_size}")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:val_size].tolist())
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


def subset(records, n: int, seed: int = 0) -> list:
    """``n`` records drawn without replacement by a seeded permutation (all of them if ``n`` is
    larger), in their original order."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if n >= len(records):
        return list(records)
    keep = np.sort(np.random.default_rng(seed).permutation(len(records))[:n])
    return [records[i] for i in keep.tolist()]


# --------------------------------------------------------------------------- prompt formats


def _as_question(text: str) -> str:
    """BoolQ questions come without a question mark, some with one: end each with exactly one."""
    return text.rstrip().rstrip("?") + "?"


def is_blank_item(record: dict) -> bool:
    """Whether a multiple-choice record is a WinoGrande-style sentence with one ``_`` blank."""
    question = record["question"]
    return "context" not in record and question.count("_") == 1 and _BLANK.search(question) is not None


def letter_prompt(record: dict) -> str:
    """The letter-format prompt: question (with passage or blank sentence), options ``A. ...``,
    ending with ``Answer:`` so the next token is the answer letter."""
    choices = record["choices"]
    if len(choices) > len(LETTERS):
        raise ValueError(f"record {record['id']!r} has {len(choices)} choices, more than {len(LETTERS)} letters")
    if "context" in record:
        head = f"Passage: {record['context']}\nQuestion: {_as_question(record['question'])}"
    elif is_blank_item(record):
        head = f"Sentence: {record['question']}\nWhich option fills the blank?"
    else:
        head = f"Question: {record['question']}"
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{head}\n{options}\nAnswer:"


def letter_token_ids(tokenizer, num_choices: int) -> torch.Tensor:
    """``LongTensor[num_choices]``: the single token id of ``" A"``, ``" B"``, ... .

    Raises ``ValueError`` if a letter is not exactly one token for this tokenizer.
    """
    ids = []
    for letter in LETTERS[:num_choices]:
        tokens = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"' {letter}' is {len(tokens)} tokens {tokens} for this tokenizer; the letter format needs one")
        ids.append(tokens[0])
    return torch.tensor(ids, dtype=torch.long)


def cloze_pairs(record: dict) -> list[tuple[str, str]]:
    """One ``(context, continuation)`` pair per choice; the score of a choice is the log-likelihood
    of its continuation given its context.

    * QA: context ``"Question: {q}\\nAnswer:"``, continuation ``" {choice}"``;
    * passage (BoolQ): context ``"{passage}\\nQuestion: {q}?\\nAnswer:"`` (one ``?``), continuation ``" {choice}"``;
    * blank sentence (WinoGrande), partial scoring: context = the sentence up to the blank with the
      choice filled in, continuation = the rest of the sentence, the same text for every choice.
    """
    choices = record["choices"]
    question = record["question"]
    if is_blank_item(record):
        start = question.index("_")
        prefix, rest = question[:start], question[start + 1 :]
        if rest.strip():
            return [(prefix + c, rest) for c in choices]
        # Blank at the very end: nothing shared to score, so score the filled-in ending instead.
        return [(prefix.rstrip(), f" {c}{rest}") for c in choices]
    if "context" in record:
        context = f"{record['context']}\nQuestion: {_as_question(question)}\nAnswer:"
    else:
        context = f"Question: {question}\nAnswer:"
    return [(context, f" {c}") for c in choices]


def record_text(record: dict) -> str:
    """Plain text of a record for language modelling: ``text`` for classification records, the
    cloze context followed by the correct continuation for multiple-choice ones."""
    if "text" in record:
        return record["text"]
    context, continuation = cloze_pairs(record)[record["label"]]
    return context + continuation


# --------------------------------------------------------------------------- collators


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


def _choice_mask(records, num_choices: int) -> torch.Tensor:
    counts = torch.tensor([len(r["choices"]) for r in records])
    return torch.arange(num_choices)[None, :] < counts[:, None]


class ClassificationCollator:
    """Sequence-classification batches for an encoder.

    Returns ``input_ids [B, T]``, ``attention_mask [B, T]``, ``token_type_ids [B, T]`` (when the
    tokenizer makes them) and ``labels [B]``; padded on the right (whatever the tokenizer's
    ``padding_side``: :class:`~pyro_lora.SequenceClassification` reads right-padded batches) to the longest
    text in the batch, truncated to ``max_length`` tokens.
    """

    def __init__(self, tokenizer, max_length: int = 128):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
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
        return out


class LetterCollator:
    """Letter-format multiple-choice batches for a causal LM.

    Returns ``input_ids [B, T]``, ``attention_mask [B, T]``, ``labels [B]`` and ``choice_mask [B, K]``
    (bool, ``K`` = most choices in the batch, ``False`` for options a record lacks). Prompts longer
    than ``max_length`` lose tokens at the start, so ``Answer:`` stays last. With left padding (the
    default) the last real token sits at position ``-1``, where the answer-letter logits are read;
    with right padding it sits at ``attention_mask.sum(-1) - 1``. Either way the positions count real
    tokens only (:class:`~pyro_lora.MultipleChoice`), so the logits do not depend on the padding.
    """

    def __init__(self, tokenizer, max_length: int = 512, padding_side: str = "left"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding_side = padding_side
        self.pad_id = _pad_id(tokenizer)
        self.prefix = _special_prefix(tokenizer)
        if max_length <= len(self.prefix):
            raise ValueError(f"max_length={max_length} leaves no room after the special prefix")

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [letter_prompt(r) for r in records]
        encoded = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        budget = self.max_length - len(self.prefix)
        rows = [self.prefix + ids[-budget:] for ids in encoded]
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
    * ``target_lengths [B*K]`` (tokens) and ``target_chars [B*K]`` (characters), for length
      normalisation;
    * ``choice_mask [B, K]`` bool and ``labels [B]``.

    Context and continuation are tokenized separately and concatenated, so the boundary is exact;
    too long a context loses tokens at its start. Missing choices become a 1-token dummy row with an
    empty target, lengths 1 (so normalising never divides by zero) and ``choice_mask`` False.
    """

    def __init__(self, tokenizer, max_length: int = 512):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = _pad_id(tokenizer)
        self.prefix = _special_prefix(tokenizer)
        if max_length < len(self.prefix) + 2:
            raise ValueError(f"max_length={max_length} leaves no room for a context and a continuation")

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        num_choices = max(len(r["choices"]) for r in records)
        pairs = []
        for record in records:
            own = cloze_pairs(record)
            pairs.extend(own + [None] * (num_choices - len(own)))
        real = [p for p in pairs if p is not None]
        tok = self.tokenizer
        contexts = iter(tok([c for c, _ in real], add_special_tokens=False)["input_ids"])
        continuations = iter(tok([t for _, t in real], add_special_tokens=False)["input_ids"])

        rows, spans, chars = [], [], []
        budget = self.max_length - len(self.prefix)
        for pair in pairs:
            if pair is None:
                rows.append([self.pad_id])
                spans.append((1, 1))
                chars.append(1)
                continue
            ctx, cont = next(contexts), next(continuations)
            cont = cont[: budget - 1]  # keep at least one context token to condition on
            ctx = ctx[len(ctx) - (budget - len(cont)) :] if len(ctx) + len(cont) > budget else ctx
            row = self.prefix + ctx + cont
            rows.append(row)
            spans.append((len(row) - len(cont), len(row)))
            chars.append(len(pair[1]))

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
    from ``text_fn`` (default ``record_text``).
    """

    def __init__(self, tokenizer, max_length: int = 512, text_fn=record_text):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.text_fn = text_fn
        self.pad_id = _pad_id(tokenizer)
        self.prefix = _special_prefix(tokenizer)

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer([self.text_fn(r) for r in records], add_special_tokens=False)["input_ids"]
        rows = [(self.prefix + ids)[: self.max_length] for ids in encoded]
        input_ids, attention_mask = _pad(rows, self.pad_id, "right")
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100),
        }


def make_loader(records, collator, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A ``DataLoader`` over ``records`` batched by ``collator``; the shuffle order is seeded, so it is
    the same on every run."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        records,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collator,
        generator=generator,
        drop_last=drop_last,
    )
