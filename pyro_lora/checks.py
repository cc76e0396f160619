"""Argument checks shared by the model side and the guides."""

from __future__ import annotations

import collections.abc
import math
import numbers
import os

import numpy as np
import torch


def check_count(value, name: str, *, minimum: int = 1, alternative: str = "") -> int:
    """``value`` as an ``int`` if it is an integer ``>= minimum``.

    ``True`` and ``False`` are refused although Python counts them as integers: ``num_bins=True`` is a slip,
    not one bin.

    :param alternative: what else the argument accepts, said in the error (e.g. ``"or None for all samples"``).
    :raises ValueError: for a bool, a non-integer or a value below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        extra = f" ({alternative})" if alternative else ""
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}{extra}, got {value!r}")
    return int(value)  # a Python int: a numpy one reached fit_progress, which JSON cannot write


def float32_std_range() -> tuple[float, float]:
    """The Gaussian stds whose log-density ``-x^2 / (2 std^2)`` float32 computes, draws up to 8 stds out included:
    ``(sqrt(tiny), sqrt(max / 2) / 8)``, about ``(1.08e-19, 1.63e18)``; below, ``std^2`` is 0 or subnormal."""
    f32 = torch.finfo(torch.float32)
    return math.sqrt(f32.tiny), math.sqrt(f32.max / 2) / 8


def check_initial_stds(stds: torch.Tensor, what: str, remedy: str, kind: str = "initial stds",
                       effect: str = "the loss would be NaN from the first step") -> None:
    """Refuse posterior stds ``stds`` beyond :func:`float32_std_range` (or not finite): their log-densities would be
    NaN, from the first step of a fit (which ``fit`` could only blame on the learning rate) or in a trained guide.

    :param what: what gave them, for the message (``"init_scale=1e-25 times the prior std 0.3 for query.lora_A"``).
    :param remedy: what to change (``"choose an init_scale nearer 1"``).
    :param kind: what they are, and ``effect``: what their NaN log-densities would do, for the message.
    :raises ValueError: naming ``what``, the stds' range, float32's and ``remedy``.
    """
    low, high = float32_std_range()
    smallest, largest = torch.stack([stds.min(), stds.max()]).tolist()
    if not (low <= smallest and largest <= high):  # nan fails both
        raise ValueError(f"{what} gives {kind} from {smallest:.3g} to {largest:.3g}, beyond what float32 computes a "
                         f"Gaussian log-density for ({low:.4g} to {high:.4g}: std^2 is 0 below, a draw's square "
                         f"overflows above), so {effect}; {remedy}")


def check_positive(value, name: str) -> float:
    """``value`` as a ``float`` if it is a finite positive real number (a temperature, a scale).

    :raises ValueError: for a bool (``True`` is a slip, not 1), a string, nan, inf, 0 or less.
    """
    number = as_real(value)
    if not 0 < number < math.inf:  # nan fails it too
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return number


def check_nonnegative(value, name: str) -> float:
    """``value`` as a ``float`` if it is a finite real number ``>= 0`` (0 switching something off).

    :raises ValueError: for a bool, a string, nan, inf or a negative number.
    """
    number = as_real(value)
    if not 0 <= number < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_numbers(value, name: str, *, length: int = None) -> list[float]:
    """``value`` as a list of floats if it is a sequence of real numbers (a list, a tuple, a 1-d tensor or array).

    Unordered or keyed containers are refused: a set iterates in hash order and a dict by its keys, so a
    ``bounds={"low": .01, "high": 100}`` was read as its key strings. Values are not range-checked here.

    :param length: the number of values required, if fixed (2 for an interval).
    :raises ValueError: for a string, a mapping, a set, a scalar, a nested sequence (a 2-d grid), an element that is
        no real number (a bool or a string included), or the wrong length.
    """
    shape = getattr(value, "shape", None)
    ordered = isinstance(value, collections.abc.Sequence) or (shape is not None and len(shape) == 1)
    if isinstance(value, (str, bytes)) or not ordered:
        kind = f"of shape {tuple(shape)}" if shape is not None else type(value).__name__
        raise ValueError(f"{name} must be a list or tuple of numbers (or a 1-d tensor), got {kind}: {value!r}")
    values = [as_real(v) for v in value]
    bad = [v for v, x in zip(value, values) if math.isnan(x) and not (isinstance(v, float) or _is_float_nan(v))]
    if bad:
        raise ValueError(f"{name} must hold numbers only, got {bad[0]!r} in {value!r}")
    if length is not None and len(values) != length:
        raise ValueError(f"{name} must hold {length} numbers, got {len(values)}: {value!r}")
    return values


def _is_float_nan(value) -> bool:
    """Whether ``value`` is a scalar nan of a float type (numpy's or a 0-d float tensor): a number, if a bad one."""
    dtype = getattr(value, "dtype", None)
    return dtype is not None and getattr(value, "ndim", 1) == 0 and "float" in str(dtype)


def as_real(value) -> float:
    """``float(value)``, or nan for what is no real number: numpy and 0-d torch scalars count as numbers; strings,
    booleans (Python's, numpy's, a bool tensor) and arrays with a dimension (a one-element ``[1]`` tensor too) do
    not."""
    boolean = isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")
    try:
        return math.nan if boolean or isinstance(value, str) or getattr(value, "ndim", 0) != 0 else float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float's range, e.g. 10**400
        return math.nan


def check_batches(data, name: str = "data") -> None:
    """Refuse one batch (a dict of tensors) where an iterable of batches is expected: iterated, it yields its keys.

    :raises ValueError: naming ``name``.
    """
    if isinstance(data, collections.abc.Mapping):
        raise ValueError(f"{name} is one batch (a dict with keys {list(data)[:4]}), not an iterable of batches: pass "
                         "[batch], or a DataLoader")


_BATCH = ("a batch must be a dict of batched tensors (input_ids [B, L], attention_mask [B, L], labels [B]; a causal LM's "
          "labels [B, L])")
_COLLATE = ("batch the examples with a collator: DataLoader(records, batch_size=16, collate_fn=collator), where collator is "
            "one of pyro_lora.data's (ClassificationCollator, LetterCollator, ClozeCollator, CausalLMCollator) or "
            "transformers.DataCollatorWithPadding(tokenizer)")


def check_batch(batch) -> None:
    """Refuse what is no batch as every reader of batches (``fit``, ``predict``, the Laplace fits, ...) takes it: a
    dict of tensors whose token entries are ``[B, L]`` and whose labels have a batch dim. A ``DataLoader`` over a
    ``TensorDataset`` yields lists, a list of single examples holds ``[L]`` ids and 0-d labels: each failed deep
    inside (``'list' object has no attribute 'get'``, ``Dimension out of range``).

    :raises ValueError: naming what the batch is, and the collators that make batches.
    """
    if not isinstance(batch, collections.abc.Mapping):
        held = f" of {len(batch)} {'tensors' if all(map(torch.is_tensor, batch)) else 'items'}" \
            if isinstance(batch, (list, tuple)) else ""
        raise ValueError(f"{_BATCH}, got a {type(batch).__name__}{held} (a DataLoader over a TensorDataset yields "
                         f"such): {_COLLATE}")
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        value = batch.get(key)
        if value is None or (key == "labels" and not torch.is_tensor(value)):  # the likelihood's observed() names it
            continue
        if not torch.is_tensor(value):
            raise ValueError(f"{_BATCH}, but its {key} is a {type(value).__name__}, not a tensor (examples tokenized but "
                             f"not collated): {_COLLATE}")
        if value.dim() < (1 if key == "labels" else 2):
            raise ValueError(f"{_BATCH}, but its {key} has shape {tuple(value.shape)}: one example, not a batch of them "
                             f"(a list of single examples?): {_COLLATE}")


def check_reiterable(data, name: str, passes: str) -> None:
    """Refuse a one-shot iterator (a generator, ``iter(list)``) where ``data`` is read more than once: its second pass
    is empty, and came back as "the data is empty" or a search over the first value only.

    :param passes: why it is read again, e.g. ``"each grid value reads it"``.
    :raises ValueError: naming ``name`` and its type.
    """
    if isinstance(data, collections.abc.Iterator):
        raise ValueError(f"{name} is a one-shot iterator ({type(data).__name__}): it yields its batches once, and "
                         f"{passes}; pass a list of batches or a DataLoader")


def check_flag(value, name: str) -> bool:
    """``value`` if it is a boolean (Python's or numpy's).

    :raises ValueError: for anything else: the string ``"false"`` of a hand-edited ``guide.json`` is truthy.
    """
    if not isinstance(value, (bool, np.bool_)):  # numpy 2 names its type "bool", which a name test took for no bool
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def known_length(data) -> int | None:
    """``len(data)``, or ``None`` for data without one (a generator, a DataLoader over an IterableDataset, whose
    ``__len__`` raises ``TypeError``)."""
    try:
        return len(data)
    except TypeError:
        return None


def check_data_given(data, name: str = "data") -> None:
    """Refuse ``data`` of ``None`` (an iterable of batches was meant), before its iteration fails in a raw ``TypeError``.

    :raises ValueError: naming ``name``.
    """
    if data is None:
        raise ValueError(f"{name} is None: give an iterable of batches (a DataLoader, a list of dicts)")


def check_path(value, name: str):
    """``value`` if it is a non-empty path (a string or ``os.PathLike``).

    :raises ValueError: for anything else (``None``, a number, ``""``: the working folder).
    """
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{name} must be a path (a string or pathlib.Path), got {value!r}")
    return value


def check_not_inference_mode(action: str, why: str) -> None:
    """Refuse to ``action`` under ``torch.inference_mode()``, whose tensors can never carry gradients;
    ``torch.no_grad()`` is fine: the callers switch gradients on themselves where they need them.

    :param why: what in ``action`` takes gradients, said in the error.
    :raises ValueError: inside ``torch.inference_mode()``, naming ``action`` and to call it outside.
    """
    if torch.is_inference_mode_enabled():
        raise ValueError(f"cannot {action} inside torch.inference_mode(): {why}, which inference-mode tensors never "
                         f"carry; call it outside (under torch.no_grad() it is fine)")


def not_a_file(path, missing: str = "does not exist") -> str:
    """Why ``path`` (a :class:`~pathlib.Path`) is no file to read, to follow its name in an error: "is a folder, not a
    file", "is not a regular file" (a pipe, a device), else ``missing`` (a link to nothing too): a folder where a
    file was named was said not to exist."""
    if path.is_dir():
        return "is a folder, not a file"
    return "is not a regular file" if path.exists() else missing


def is_integer_tensor(t) -> bool:
    """Whether the tensor ``t`` holds integers (not floats, complex numbers or booleans): what class labels and token
    ids must be."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def pickling_refused(obj, why: str, instead: str) -> TypeError:
    """The error refusing to pickle ``obj`` (``torch.save``, ``pickle``, ``copy.copy``): ``why`` it is not pickled, and
    what to do ``instead``."""
    return TypeError(f"a {type(obj).__name__} cannot be pickled (torch.save, pickle, copy.copy): {why}; {instead}")
