"""Datasets: the canonical JSONL layout, loading and validating records, seeded splits and loaders.

The datasets live outside the repository in one canonical JSONL layout (see
``shared/data/README.md``)::

    <data_dir>/<name>/{train,test}.jsonl, meta.json

with records ``{"id", "question", "choices", "label", "context"?}`` for ``multiple_choice`` and
``{"id", "text", "label"}`` for ``classification``. A multiple-choice dataset whose records are all WinoGrande
sentences with one ``_`` blank (every split) is asked in the blank-sentence format, any other as questions: the loader
decides it for the whole dataset and marks each record of a blank one ``"blank": True``, a question that only
looks like one ``"blank": False`` (:func:`~pyro_lora.prompts.mark_blank_sentences`, which does the same for records
built in memory).

Multiple choice reaches a causal LM in one of two prompt formats (letter or cloze,
:mod:`pyro_lora.prompts`). Collators (:mod:`pyro_lora.collators`) turn a list of records into a dict of
tensors; :func:`make_loader` wraps them in a seeded ``DataLoader``. The prompt and collator names are
importable from here too.
"""

from __future__ import annotations

import hashlib
import copy
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from . import distributed
from .checks import as_real, check_batch, check_batches, check_count, check_flag, not_a_file
from .collators import CausalLMCollator, ClassificationCollator, ClozeCollator, LetterCollator
from .prompts import (LETTERS, blank_format, cloze_pairs, is_blank_item, letter_prompt, letter_token_ids,
                      mark_blank_sentences, record_text)
from .model_files import label_key
from .records import BLANK, looks_blank, validate_record

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
    "mark_blank_sentences",
    "letter_prompt",
    "letter_token_ids",
    "cloze_pairs",
    "record_text",
    "ClassificationCollator",
    "LetterCollator",
    "ClozeCollator",
    "CausalLMCollator",
    "make_loader",
    "to_device",
]

TASKS = ("multiple_choice", "classification")
SPLITS = ("train", "test")


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
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"no datasets folder found (tried {tried}): set PYRO_LORA_DATA or pass --data-dir / data_dir")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The absolute datasets folder: ``data_dir``, else :func:`default_data_dir`.

    :raises FileNotFoundError: if ``data_dir`` is not a folder.
    """
    if data_dir is None:
        return default_data_dir().resolve()
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} (--data-dir) does not exist or is not a folder")
    return path.resolve()


def available_datasets(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the datasets (sub-folders holding a ``meta.json``) in ``data_dir``."""
    root = resolve_data_dir(data_dir)
    return sorted(p.name for p in root.iterdir() if (p / "meta.json").is_file())


_META_NEEDS = f'"task" (one of {", ".join(TASKS)}) and, for classification, "label_names" (a list of at least 2 names)'


def _dataset_dir(name: str, data_dir) -> Path:
    """``<data_dir>/<name>``; raises ``ValueError`` if it is missing or holds no ``meta.json``."""
    root = resolve_data_dir(data_dir)
    folder = root / name
    if folder.is_dir() and not (folder / "meta.json").is_file():  # a half-prepared dataset is no typo of a name
        said = f"{folder / 'meta.json'} {not_a_file(folder / 'meta.json')}" if (folder / "meta.json").exists() else \
            f"dataset folder {folder} exists but has no meta.json"
        raise ValueError(f"{said}; it must hold a JSON object with {_META_NEEDS}")
    if not (folder / "meta.json").is_file():
        raise ValueError(
            f"unknown dataset {name!r} in {root}; available: {', '.join(available_datasets(root)) or 'none'}"
        )
    return folder


def dataset_folder(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder the dataset ``name`` reads, absolute with links resolved: ``sst2``, ``sst2/``, ``./sst2`` and a link
    to that folder name one set (compare sets by it, never by the names given).

    :raises ValueError: as :func:`load_meta`, for a name that gives no dataset folder.
    """
    return _dataset_dir(name, data_dir).resolve()


def load_meta(name: str, data_dir: str | os.PathLike | None = None) -> dict:
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
        # distinct as a reader tells them: "neg" and "neg ", or "café" in Unicode's two spellings, are one class
        if not all(isinstance(n, str) and label_key(n) for n in names) or len(set(map(label_key, names))) != len(names):
            raise ValueError(f"{path}: label_names must be distinct non-blank strings (compared ignoring case, surrounding "
                             f"spaces and Unicode's spellings of a character), got {names}")
    return meta


def load_records(name: str, split: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Every record of ``<data_dir>/<name>/<split>.jsonl``, validated against the dataset's task.

    A multiple-choice dataset is read in the blank-sentence format where every record of every split's file is a
    sentence with one ``_`` between spaces and no passage (WinoGrande): each record returned then holds ``"blank":
    True`` (:func:`~pyro_lora.prompts.is_blank_item`); any other dataset is read as questions, with a warning naming
    how many records and the first that look like blank sentences where some but not all do (those hold ``"blank":
    False``).

    Raises ``ValueError`` naming the file and line for a line that is not UTF-8, malformed JSON or an
    invalid record (one holding the loader's ``"blank"`` mark among them), in the split's file or, for multiple
    choice, the other split's (read for its format), both lines for an ``id`` given twice, the file for an empty one,
    and the path for a folder (or another non-file) in its place; ``FileNotFoundError`` if the split's file is missing.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    meta = load_meta(name, data_dir)
    task = meta["task"]
    num_labels = len(meta["label_names"]) if task == "classification" else None
    folder = _dataset_dir(name, data_dir)
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise (ValueError if path.exists() else FileNotFoundError)(f"{path} {not_a_file(path)}")
    records, nested = _file_records(path, task, num_labels)
    # copies, nested lists and objects too: a caller editing its records leaves the next reader's as the file holds them
    # (a file of flat records, as every classification set, needs no look inside each: 67k records copy in 20 ms)
    records = ([{k: copy.deepcopy(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in records]
               if nested else [dict(r) for r in records])
    if task == "multiple_choice":
        # The blank-sentence format is the dataset's, read from every record of every split (a question holding a
        # lone "_" was asked as a blank sentence by itself): both splits' files say whether each split is one.
        others = [_file_records(folder / f"{s}.jsonl", task, num_labels).records for s in SPLITS
                  if s != split and (folder / f"{s}.jsonl").is_file()]
        blank = blank_format(records, *others, name=f"the dataset {name!r}")
        for record in records:
            if looks_blank(record):  # every record of a blank dataset; a question of that shape is marked one
                record[BLANK] = blank
    return records


class _Parsed(NamedTuple):
    records: tuple  # the validated records, not to be edited
    nested: bool  # whether any record holds a list or an object (copies must copy those too)


def _file_records(path: Path, task: str, num_labels: int | None) -> _Parsed:
    """The validated records of the file ``path``, parsed once per content (:data:`_PARSED`)."""
    data = path.read_bytes()
    key = (str(path), hashlib.sha256(data).hexdigest(), task, num_labels)  # the bytes, not a timestamp of coarse ticks
    parsed = _PARSED.pop(key, None)
    if parsed is None:
        records = _parse_records(path, data, task, num_labels)
        parsed = _Parsed(records, any(isinstance(v, (list, dict)) for r in records for v in r.values()))
    _PARSED[key] = parsed  # the most recently read last
    while len(_PARSED) > 8:
        _PARSED.pop(next(iter(_PARSED)))
    return parsed


# (path, SHA-256 of its bytes, task, number of labels) -> its validated records (_Parsed): a run's readers (its splits,
# its data digest, each seed) parse a 67k-line training file once
_PARSED: dict = {}


def _parse_records(path: Path, data: bytes, task: str, num_labels: int | None) -> tuple:
    """The records of ``data`` (the bytes of ``path``), each validated; errors name the file and line."""
    records, lines = [], {}  # lines: id -> the line that first gave it
    # decoded line by line: a text-mode error would name a byte position in the file only
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
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
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        except KeyError as err:
            raise ValueError(f"{path}:{lineno}: the key {err.args[0]!r} appears twice in one object (JSON keeps the "
                             "last silently): keep one") from None
        problem = validate_record(record, task, num_labels)
        if problem is None and isinstance(record, dict) and BLANK in record:
            problem = (f"the key {BLANK!r} is the loader's mark of a dataset whose records are all blank sentences, "
                       "decided from every record of the dataset: remove it from the file")
        if problem:
            raise ValueError(f"{path}:{lineno}: invalid {task} record: {problem}")
        first = lines.setdefault(record["id"], lineno)
        if first != lineno:  # a file concatenated twice, or two sets merged
            raise ValueError(f"{path}:{lineno}: id {record['id']!r} is also the id of line {first}: ids must be unique "
                             "within a file; remove the repeated records or give each its own id")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records (empty file)")
    return tuple(records)


def _unique_keys(pairs):
    """A JSON object as a dict, refusing a key given twice (``KeyError`` naming it)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise KeyError(key)
        out[key] = value
    return out


# --------------------------------------------------------------------------- splits


def split_train_val(records: list, val_fraction: float = 0.1, val_size: int | None = None, seed: int = 0) -> tuple[list, list]:
    """Split ``records`` into ``(train, val)`` by a seeded permutation.

    ``val_size`` (a count) overrides ``val_fraction``. The same seed gives the same split on every
    run; both parts keep the original record order.

    :raises ValueError: for a ``seed`` that is no integer >= 0 (``None`` drew another split on every call), a
        ``val_fraction`` that is no number in ``(0, 1)``, a ``val_size`` that is no integer in ``[1, n - 1]``.
    """
    seed = check_count(seed, "seed", minimum=0, alternative="None drew another split on every call")
    n = len(records)
    if val_size is None:
        fraction = as_real(val_fraction)  # a float: a 0-d tensor has no round()
        if not 0.0 < fraction < 1.0:  # nan, a string, a bool fail it
            raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
        val_size = max(1, int(round(n * fraction)))
        if not val_size < n:
            raise ValueError(f"val_fraction {fraction:g} of {n} records holds out {val_size}, leaving none to train on: "
                             "lower the validation fraction (--val-fraction) or give more records (--train-size)")
    if not check_count(val_size, "val_size") < n:
        raise ValueError(f"val_size must be in [1, {n - 1}] for {n} records, got {val_size!r}")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:val_size].tolist())
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


def subset(records: list, n: int, seed: int = 0) -> list:
    """``n`` records drawn without replacement by a seeded permutation (all of them if ``n`` is
    larger), in their original order."""
    n = check_count(n, "n", minimum=0)
    seed = check_count(seed, "seed", minimum=0, alternative="None drew another subset on every call")
    if n >= len(records):
        return list(records)
    keep = np.sort(np.random.default_rng(seed).permutation(len(records))[:n])
    return [records[i] for i in keep.tolist()]


def _parameters(cls) -> tuple:
    """The names ``cls``'s constructor takes; none known for a builtin type (``dict``, ``list``) without a signature."""
    try:
        return tuple(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return ()


def make_loader(records: list, collator: Callable[[list[dict]], dict], batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A ``DataLoader`` over ``records`` batched by ``collator``; the shuffle order is seeded, so it is
    the same on every run.

    :param collator: a function of a list of records (a collator instance); ``None``: torch's default collation.
    :raises ValueError: for a ``collator`` that is a collator class needing a tokenizer (``ClozeCollator`` for
        ``ClozeCollator(tokenizer)``: a raw error at the first batch) or is not callable, or bad ``batch_size``,
        ``seed``, ``shuffle`` or ``drop_last``.
    """
    if isinstance(collator, type) and "tokenizer" in _parameters(collator):
        raise ValueError(f"collator must be a collator instance, got the class {collator.__name__}: give "
                         f"{collator.__name__}(tokenizer)")
    if collator is not None and not callable(collator):
        raise ValueError(f"collator must be a function of a list of records (a collator instance) or None, got {collator!r}")
    shuffle = check_flag(shuffle, "shuffle")
    drop_last = check_flag(drop_last, "drop_last")
    batch_size = check_count(batch_size, "batch_size")
    generator = torch.Generator().manual_seed(check_count(seed, "seed", minimum=0))
    return DataLoader(
        records,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collator,
        generator=generator,
        drop_last=drop_last,
    )


def fixed_batches(data, action: str, name: str = "data") -> list:
    """The batches of ``data`` read once into a list, for a search that compares its passes over the same data: a
    shuffling ``DataLoader`` with a generator of its own orders each pass anew (so predictions of two passes would be
    compared across examples, and the weight noise fall on other examples), and a generator yields only once. The
    search scores every example, so a ``DataLoader`` dropping its last incomplete batch is refused first
    (:func:`check_every_example`, ``action`` naming the search): the list holds no loader left to check. Under
    ``torch.distributed`` a ``DataLoader``'s batches are rank 0's (as :func:`~pyro_lora.distributed.split_batches`
    draws a loader): a generator of its own may differ across ranks. Every rank scores the whole data, so a loader
    that gives each rank a part (a ``DistributedSampler``, a dataset sharded by hand) is refused, and a list or a
    loader's list of records must be the same on every rank (:func:`~pyro_lora.distributed.same_data`: a search on
    each rank's own part set another value on each).

    :raises ValueError: for one batch (a dict), a ``DataLoader`` dropping its last incomplete batch, a sharding loader,
        data that differ across ranks, or no batch at all (named as ``action``'s argument ``name``, not as the
        ``predict`` a search scores with).
    """
    # a refusal on one rank only (its loader drops its last batch) is raised on every rank: the others would go on into
    # the collectives below and leave the ranks out of step for every later call
    with distributed.refused_together(f"read the data of {action}"):
        check_batches(data)
        check_every_example(data, action)
    batches = _read_once(data)
    if not batches:  # the same list on every rank: refused on all alike
        raise ValueError(f"{action} got no batches: {name} is empty")
    return batches


def _read_once(data) -> list:
    """:func:`fixed_batches`' list of ``data``'s batches, past its checks."""
    if not distributed.is_distributed():
        return data if isinstance(data, list) else list(data)
    distributed.check_unsharded(data, "scores the whole data on every rank here (each rank would score its part)")
    if isinstance(data, (list, tuple)):
        return distributed.same_data(data)
    if isinstance(data, DataLoader) and isinstance(data.dataset, (list, tuple)):
        distributed.same_data(data.dataset, "record")
    batches = list(data)
    return distributed.broadcast_object(batches) if isinstance(data, DataLoader) else distributed.same_data(batches)


def check_every_example(data, action: str) -> None:
    """Refuse a ``DataLoader`` that does not read each example once where ``action`` scores or sums every example (a
    prediction, a validation search, a curvature fit; SVI's minibatch steps are not such a pass): ``drop_last=True``
    on the loader or on any sampler it reads through (a ``batch_sampler``, a ``BatchSampler`` given as ``sampler`` with
    ``batch_size=None``, a sampler wrapped in another; the loader's own ``drop_last`` then stays False), and a sampler
    drawing with replacement (``RandomSampler(replacement=True)``, a ``WeightedRandomSampler``'s default) or more
    examples than its source holds (``num_samples``: a second pass). Fewer without replacement read a subset, each
    example once, as a ``Subset`` does."""
    stack, seen = [(data, "")], set()
    while stack:
        obj, where = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if getattr(obj, "drop_last", False) is True:
            raise ValueError(f"{action} reads every example of its data, but this DataLoader drops its last incomplete "
                             f"batch (drop_last=True{where and ' on its ' + where}), whose examples would be left out: "
                             f"build it with drop_last=False")
        source = _sampler_source(obj)
        if getattr(obj, "replacement", False) is True or (source is not None and obj.num_samples > source):
            drawn = ("draws with replacement" if obj.replacement is True
                     else f"draws {obj.num_samples} of its {source} examples")
            raise ValueError(f"{action} reads every example of its data once, but this DataLoader's "
                             f"{where or 'sampler'} ({type(obj).__name__}) {drawn}: examples would be read twice or "
                             "never; read the data in order (shuffle=False) or shuffled (shuffle=True), not resampled")
        stack += [(getattr(obj, name, None), f"{where}'s {name}" if where else name) for name in ("batch_sampler", "sampler")]


def _sampler_source(sampler) -> int | None:
    """How many examples a ``RandomSampler`` or ``WeightedRandomSampler`` draws from (its ``data_source``'s length, or
    its ``weights``'), ``None`` for other samplers."""
    if isinstance(sampler, RandomSampler):
        return len(sampler.data_source)
    if isinstance(sampler, WeightedRandomSampler):
        return len(sampler.weights)
    return None


def to_device(batch: dict, device: torch.device | str) -> dict:
    """Move every tensor of a batch dict to ``device`` (other values are kept as they are): every reader of batches
    reads them through it, so what is no batch (:func:`~pyro_lora.checks.check_batch`) is refused here.

    :raises ValueError: for a list of tensors (a ``TensorDataset``'s), a single example, untensored entries.
    """
    check_batch(batch)
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class RowDigest:
    """An order-free fingerprint of the labelled examples a pass over batches reads, to tell a refit over other
    examples from one over the same: one 128-bit blake2b digest per example, summed limb by limb (8 limbs of 16 bits;
    exact in float64 up to 2^37 examples, and additive, so ranks' sums all-reduce). The same examples in another
    order, batching or padding give the same fingerprint; another example, token or label gives another.

    An example's digest covers the entries the likelihood reads: the ``net_inputs`` it hands the network, the labels
    and a multiple-choice batch's choice and target entries (an ``idx`` column or a batch counter is no part of an
    example), by key: of a tensor whose first dimension is the batch's ``B`` examples
    or a multiple ``R B`` of it (``R`` rows per example, e.g. a cloze batch's row per choice), that example's part; of
    any other, the whole. Entries over tokens keep the positions the ``attention_mask`` marks real; those over
    choices, and the rows of a ``[B K, ...]`` tensor, the choices the ``choice_mask`` marks present: padding to
    another length or to more choices changes nothing. Masks count by their truth values (a float mask is the integer
    one), and an all-zero ``token_type_ids`` as none (what a BERT reads where it is missing).
    """

    _TOKENS = ("input_ids", "token_type_ids", "attention_mask", "target_mask", "labels")  # [rows, T]: masked by attention_mask
    _CHOICES = ("choice_mask", "target_lengths", "target_chars")  # [B, K]: masked by choice_mask

    def __init__(self, net_inputs):
        self.keys = tuple(sorted({*net_inputs, "labels", "target_mask", *self._CHOICES}))
        self.sums = torch.zeros(8, dtype=torch.float64)

    def add(self, batch: dict, count: int) -> None:
        """Add the ``count`` labelled examples of ``batch`` (a dict of tensors; other values are left out)."""
        if not count:
            return
        tensors = {k: batch[k].detach().cpu() for k in self.keys if torch.is_tensor(batch.get(k))}
        mask, choices = tensors.get("attention_mask"), tensors.get("choice_mask")
        hashes = [hashlib.blake2b(digest_size=16) for _ in range(count)]
        for key, t in tensors.items():
            keep = torch.ones(t.shape, dtype=torch.bool)
            if key in self._TOKENS and mask is not None and t.shape == mask.shape:
                keep &= mask.bool()
            elif key in self._CHOICES and choices is not None and t.shape == choices.shape:
                keep &= choices.bool()
            if choices is not None and t.dim() > 0 and t.shape[0] == choices.numel() > count:  # a row per choice
                keep &= choices.bool().reshape(-1, *[1] * (t.dim() - 1))
            values = t.bool().long() if key.endswith("_mask") else t.double() if t.is_floating_point() else t.long()
            own = t.dim() > 0 and t.shape[0] > 0 and t.shape[0] % count == 0
            width = t.numel() // count  # not -1: a tensor of no numbers has a part of none
            rows, keeps = (values.reshape(count, width), keep.reshape(count, width)) if own else (None, None)
            for i, h in enumerate(hashes):
                part = rows[i][keeps[i]] if own else values[keep]
                if key == "token_type_ids" and not bool(part.any()):
                    continue  # all zeros: what a BERT reads where the collator writes none
                part = part.numpy().tobytes()
                h.update(f"{key}:{len(part)}:".encode())
                h.update(part)
        limbs = np.frombuffer(b"".join(h.digest() for h in hashes), dtype="<u2").reshape(count, 8)
        self.sums += torch.from_numpy(limbs.sum(0, dtype=np.int64)).double()

    def key(self) -> tuple[int, ...]:
        """The fingerprint, comparable across passes (read it after the ranks' sums are all-reduced)."""
        return tuple(int(s) for s in self.sums.tolist())
