"""Argument checks shared by the model side and the guides."""

from __future__ import annotations

import collections.abc
import math
import numbers

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
    return int(value)


def check_positive(value, name: str) -> float:
    """``value`` as a ``float`` if it is a finite positive real number (a temperature, a scale).

    :raises ValueError: for a bool (``True`` is a slip, not 1), a string, nan, inf, 0 or less.
    """
    number = _real(value)
    if not 0 < number < math.inf:  # nan fails it too
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return number


def check_nonnegative(value, name: str) -> float:
    """``value`` as a ``float`` if it is a finite real number ``>= 0`` (0 switching something off).

    :raises ValueError: for a bool, a string, nan, inf or a negative number.
    """
    number = _real(value)
    if not 0 <= number < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def _real(value) -> float:
    """``float(value)``, or nan for what is no real number: numpy and 0-d torch scalars count as numbers; strings and
    booleans (Python's, numpy's, a bool tensor) do not."""
    boolean = isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")
    try:
        return math.nan if boolean or isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float's range, e.g. 10**400
        return math.nan


def check_batches(data, name: str = "data") -> None:
    """Refuse one batch (a dict of tensors) where an iterable of batches is expected: iterated, it yields its keys.

    :raises ValueError: naming ``name``.
    """
    if isinstance(data, collections.abc.Mapping):
        raise ValueError(f"{name} is one batch (a dict with keys {list(data)[:4]}), not an iterable of batches: pass "
                         "[batch], or a DataLoader")


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
    if not (isinstance(value, bool) or type(value).__name__ == "bool_"):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def is_integer_tensor(t) -> bool:
    """Whether the tensor ``t`` holds integers (not floats, complex numbers or booleans): what class labels and token
    ids must be."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def pickling_refused(obj, why: str, instead: str) -> TypeError:
    """The error refusing to pickle ``obj`` (``torch.save``, ``pickle``, ``copy.copy``): ``why`` it is not pickled, and
    what to do ``instead``."""
    return TypeError(f"a {type(obj).__name__} cannot be pickled (torch.save, pickle, copy.copy): {why}; {instead}")
