"""Temperature scaling (Guo et al. 2017): the cheap non-Bayesian calibration every method is compared against.

``p_T(y | x) = softmax(log p(y | x) / T)``, with one ``T > 0`` fitted by minimising the NLL on a validation
split. Working from log-probabilities is the same as scaling the logits: they differ by a per-example constant,
which the softmax removes. Zero probabilities (missing choices) stay zero. A :class:`~pyro_lora.Prediction` holds
both its float32 ``probs`` and their float64 log ``log_probs``, computed from the logits: fit ``T`` on the latter
(``kind="logits"``) and scale with :func:`scale_prediction`, since float32 flushes a choice more than about 103 nats
behind to 0 (multiple-choice cloze scores are sums of token log-probabilities, that far apart), and no ``T`` moves a 0.

The fit minimises the exact NLL in float64 (finite for logits); only a probability of exactly 0 at an example's
label (saturated probabilities: no temperature can move it) is floored, and said.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import is_dataclass, replace
from typing import NamedTuple, Optional

import torch

from .checks import check_flag, check_numbers, check_positive
from .metrics import _NLL_FLOOR, _check_probs, _check_rows, _in_unit, _sum_tolerance, _tensor, _uncertainty
from .callers import user_stacklevel

__all__ = ["TemperatureFit", "apply_temperature", "fit_temperature", "scale_prediction", "temperature_nll"]

_GOLDEN = (math.sqrt(5) - 1) / 2


class TemperatureFit(NamedTuple):
    """What :func:`fit_temperature` found (with ``return_info=True``)."""

    temperature: float  # the T to apply: 1.0 when the fit fell back
    note: Optional[str]  # why T is not an optimum inside the bounds (the warning's text); None when it is


def _log_probs(probs_or_logits, kind="auto"):
    """``[N, C]`` float64 log-probabilities from probabilities (rows summing to 1, zeros allowed) or logits, and
    whether the input was read as probabilities."""
    raw = _tensor(probs_or_logits, "probs_or_logits")  # a list of Python floats as float64, as the metrics read it
    x = raw.to(torch.float64)
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"expected [N, C] probabilities or logits, got shape {tuple(x.shape)}")
    if kind not in ("auto", "probs", "logits"):
        raise ValueError(f"kind must be 'auto', 'probs' or 'logits', got {kind!r}")
    if torch.isnan(x).any() or (x == math.inf).any():
        raise ValueError("probabilities/logits contain nan or +inf")
    if bool((x == -math.inf).all(-1).any()):
        raise ValueError("a row of logits is all -inf: it gives no class a probability")
    # the tolerance of pyro_lora.metrics: half-precision probabilities must not be taken for logits
    in_unit = _in_unit(x)
    looks_like_probs = in_unit and _sums_to_one(x, raw)
    if kind == "auto" and in_unit and not looks_like_probs:
        # clipped or rounded probabilities read as logits would get a T of another scale, without a word
        worst = float((x.sum(-1) - 1).abs().max())
        raise ValueError(
            f"every entry is in [0, 1] but a row's sum is {worst:.3g} away from 1: probabilities that were clipped or "
            "rounded, or logits? renormalise probabilities (p / p.sum(-1, keepdim=True)), or pass kind='logits'"
        )
    # entries a rounding error outside [0, 1] in rows summing to 1 (a 1 - sum of the others): read as logits, a
    # calibrated set got T = 0.24 for 1.04; refused as the metrics refuse them, saying how to mend them
    noisy = not in_unit and _probability_like(x, raw)
    if kind == "logits" and (looks_like_probs or noisy):
        _refuse_probabilities_as_logits()
    if (kind == "probs" and not looks_like_probs) or (kind == "auto" and noisy):
        _check_rows(x, raw.dtype, "probs_or_logits")  # passes only entries above 1 by a rounding error: probabilities
        looks_like_probs = True
    if kind == "probs" or (kind == "auto" and looks_like_probs):
        return x.log(), True
    return x.log_softmax(-1), False


def _sums_to_one(x, raw) -> bool:
    """Whether every row of ``x`` (float64, from ``raw``) sums to 1 within ``raw``'s dtype's rounding (the tolerance of
    :mod:`pyro_lora.metrics`: half-precision probabilities must not be taken for logits)."""
    return bool(((x.sum(-1) - 1).abs() <= _sum_tolerance(raw.dtype, x.shape[-1])).all())


def _probability_like(x, raw) -> bool:
    """Whether every row of ``x`` (float64, from ``raw``) is a probability vector up to rounding: entries within the
    row sum's tolerance of ``[0, 1]`` (a ``1 -`` the others a rounding error below 0), summing to 1 within it."""
    tol = _sum_tolerance(raw.dtype, x.shape[-1])
    return bool(((x >= -tol) & (x <= 1 + tol)).all()) and _sums_to_one(x, raw)


def _refuse_probabilities_as_logits():
    # probabilities taken as logits got a T of another scale (0.68 for 2.92: a test NLL worse than no scaling), and
    # scaled as logits a row of another shape
    raise ValueError(
        "kind='logits' but every row is a probability vector (entries in [0, 1] up to rounding, summing to 1): "
        "probabilities read as logits get a temperature of another scale; pass kind='probs' (or 'auto'), or, for logits "
        "that really are these numbers, add a constant to them (a softmax does not change)")


def temperature_nll(log_probs: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean NLL of ``softmax(log_probs / T)`` at the labels (``log_probs``: ``[N, C]``, ``labels``: ``[N]``), each
    example's floored at ``-log 1e-12`` as :func:`pyro_lora.metrics.nll` reports it.

    The metric, not what :func:`fit_temperature` minimises: the floor makes it flat in ``T`` wherever an example
    is wrong by more than 27.6 nats (over-confident predictions at small ``T``), where a search would stall.
    """
    temperature = check_positive(temperature, "temperature")  # T = -1 gave the NLL of inverted predictions
    scaled = (log_probs / temperature).log_softmax(-1)
    picked = scaled.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return float(-picked.clamp(min=math.log(_NLL_FLOOR)).mean())  # the floor of pyro_lora.metrics.nll


def _exact_nll(log_probs, labels, log_t):
    """Mean NLL of ``softmax(log_probs / T)`` at the labels, ``T = exp(log_t)``, unfloored: convex in ``1 / T``."""
    scaled = (log_probs * math.exp(-log_t)).log_softmax(-1)
    return float(-scaled.gather(-1, labels.unsqueeze(-1)).mean())


def check_tol(tol):
    """Refuse a ``tol`` that is not a positive finite number: the search's stopping width, which 0 or less never
    reaches (it loops forever) and nan reaches at once (the first probe returned as the optimum)."""
    check_positive(tol, "tol (the search's stopping width in log space)")


def golden_section(f, a, b, tol):
    """Golden-section search of the unimodal ``f`` on ``[a, b]`` until the bracket is ``tol`` wide: the better inner
    point and its value (the search temperature scaling and the validation-tuned posteriors share).

    :raises ValueError: if ``tol`` is not a positive finite number (:func:`check_tol`).
    """
    check_tol(tol)
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    width = math.inf
    while tol < b - a < width:  # a tol below float spacing: it stops where the bracket no longer narrows
        width = b - a
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    return (c, fc) if fc <= fd else (d, fd)


def fit_temperature(probs_or_logits: torch.Tensor, labels: torch.Tensor, kind: str = "auto", bounds: tuple[float, float] = (1e-2, 1e2),
                    tol: float = 1e-4, return_info: bool = False) -> float | TemperatureFit:
    """The temperature ``T`` minimising the validation NLL of ``softmax(log p / T)``.

    The exact NLL (float64, not floored per example) is convex in ``1 / T`` (log-sum-exp of a linear function
    minus a linear one), so a golden-section search over ``log T`` in ``bounds`` finds the minimum; if it does
    not beat ``T = 1`` (e.g. the optimum is ``1`` to within ``tol``), ``1.0`` is returned. Where that optimum
    ``T*`` raises the NLL as :func:`pyro_lora.metrics.nll` reports it after :func:`apply_temperature` (floored at
    ``1e-12`` per example, with a saturated 0 kept at 0: examples wrong by more than 27.6 nats gain nothing from
    a T that costs the others), it keeps the ``T`` between 1 and ``T*`` of least reported NLL (``1.0`` when none
    beats it) and warns: neither validation NLL rises. Logits give the exact NLL for any margin. Probabilities
    that give an example's label exactly 0 (saturated: float32 below ``e^-103``, float16 below ``e^-17``) have
    lost the margin, and no temperature changes a 0: the search takes their label's probability as ``1e-12``
    (the floor of :func:`pyro_lora.metrics.nll`), or as the smallest positive number of the input's dtype where
    that is lower (float32: ``1.4e-45``; a 0 must not count as likelier than a ``1e-20`` the dtype did hold),
    and a warning and the note count them. Zeros elsewhere (missing choices) stay zero: never a class.

    When the minimum is not inside the bounds it warns, and the note of ``return_info=True`` says why:

    - every validation example's label is its strict argmax (separable): the NLL falls all the way to
      ``T -> 0`` and has no finite optimum; it falls back to ``T = 1``;
    - the minimum is on the lower bound (predictions nearly uniform yet better than chance, or nearly separable):
      it falls back to ``T = 1``. Sharpening to the
      bound fits the validation split, not the data: on held-out data the NLL can be many times worse;
    - the minimum is on the upper bound: it keeps ``T = high``. Either the predictions are no better than
      uniform on the validation split (the NLL falls all the way to ``T -> inf``; ``T = high`` makes them nearly
      uniform, which cannot cost more than about ``log C`` nats), or they are over-confident beyond the bound
      (the note gives the optimum past it; widen ``bounds`` to reach it).

    :param probs_or_logits: ``[N, C]`` predictive probabilities (``Prediction.probs``; zeros for missing
        choices) or logits (``-inf`` for missing choices, never at an example's label).
    :param labels: ``[N]`` integer class indices.
    :param str kind: ``"probs"``, ``"logits"`` or ``"auto"`` (probabilities when every row is a probability vector;
        entries all in ``[0, 1]`` whose rows do not sum to 1 are refused as ambiguous).
    :param bounds: the search interval ``(low, high)`` for ``T``, finite with ``0 < low < 1 < high``.
    :param float tol: the width in ``log T`` at which the search stops: a positive finite number.
    :param bool return_info: return a :class:`TemperatureFit` (``T`` and the note, None unless it warned)
        instead of ``T``.
    :returns: ``T`` as a float, or a :class:`TemperatureFit`.
    :raises ValueError: on bad shapes, labels that are not integers or out of range (checked as
        :mod:`pyro_lora.metrics` checks them), nan / +inf inputs, all ``-inf`` logit rows, ``kind="probs"`` rows
        that are not probability vectors, ``kind="logits"`` rows that all are (up to rounding), ``kind="auto"`` entries
        all in ``[0, 1]`` in rows not summing to 1 or entries a rounding error below 0 in rows summing to 1, logits
        of ``-inf`` at an example's label (a label on a missing choice), ``bounds`` that are not two finite numbers
        with ``0 < low < 1 < high`` (a dict or a set refused: they have no order), or a ``tol`` that is not a positive finite number.
    """
    return_info = check_flag(return_info, "return_info")
    # before any work: a bad tol never ends the search or ends it at once, an infinite bound makes T nan
    check_tol(tol)
    low, high = check_numbers(bounds, "bounds", length=2)
    if not 0 < low < 1 < high < math.inf:  # nan fails it too
        raise ValueError(f"bounds must be finite with 0 < low < 1 < high, got {bounds}")
    log_probs, from_probs = _log_probs(probs_or_logits, kind)
    # the labels as every metric checks them: integer dtype (float labels were truncated), shape, range
    raw = _tensor(probs_or_logits, "probs_or_logits")
    _, labels = _check_probs(raw if from_probs else log_probs.exp(), labels)
    notes = []

    def done(temperature, note=None):
        note = "; ".join(notes + ([note] if note else [])) or None
        if note is not None:
            warnings.warn(f"temperature scaling: {note}", stacklevel=user_stacklevel())
        return TemperatureFit(temperature, note) if return_info else temperature

    reported = log_probs  # what apply_temperature and metrics.nll see: a saturated label's 0 stays 0
    dtype = raw.dtype if raw.dtype.is_floating_point else torch.float64  # integer (one-hot) rows: float64's numbers
    smallest = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # the dtype's smallest positive (subnormal) number
    picked = log_probs.gather(-1, labels[:, None]).squeeze(-1)
    zero = picked == -math.inf
    saturated = int(zero.sum())
    if saturated and not from_probs:
        # a logit of -inf marks a missing choice: a label there is bad data, not a saturated prediction (floored,
        # it alone drove T to the upper bound, with a note blaming the predictions)
        raise ValueError(f"{saturated} of {len(labels)} validation examples (the first: index "
                         f"{int(zero.nonzero()[0])}) have their label's logit at -inf: a label on a missing choice")
    if saturated:
        # log 0 = -inf whatever T (an infinite NLL): the fit takes such a label's probability as pyro_lora.metrics.nll's
        # floor 1e-12, or as the smallest positive number of the input's dtype where that is lower, so that an
        # exact 0 never counts as more likely than a probability the dtype did hold (float32 holds 1e-44)
        floor = min(_NLL_FLOOR, smallest)
        picked = picked.masked_fill(zero, math.log(floor))
        log_probs = log_probs.scatter(-1, labels[:, None], picked[:, None])
        notes.append(f"{saturated} of {len(labels)} validation examples give probability 0 to their label (saturated "
                     f"probabilities): no temperature changes that, so the fit takes their label's probability as "
                     f"{floor:.3g} (the 1e-12 floor of pyro_lora.metrics.nll, or the smallest positive {dtype} number "
                     "where lower) and its T is approximate; pass logits for an exact fit (and scale logits "
                     "with it: apply_temperature keeps a 0 at 0)")
    finite = torch.isfinite(log_probs)
    lone = (finite.sum(-1) == 1) & (log_probs.shape[-1] > 1)
    if from_probs and bool(lone.any()):
        # a row of one nonzero probability is saturated (its other classes below the dtype's smallest number: float16
        # from 17 nats) or a question of one choice; read as missing choices, its zeros would make softening free
        # (float16 rows right by 20 nats drove T to 100 where logits give 4.8), so the fit gives it one competitor at
        # the dtype's smallest positive number: the row was at least that sure
        competitor = (~finite).int().argmax(-1, keepdim=True)  # the row's first zero
        log_probs = log_probs.scatter(-1, competitor, torch.where(lone[:, None], math.log(smallest), log_probs.gather(-1, competitor)))
        notes.append(f"{int(lone.sum())} of {len(labels)} validation rows give all their probability to one class "
                     f"(saturated probabilities, their other classes below the smallest positive {dtype} number, or "
                     "questions of one choice): read as missing choices they would cost nothing to soften, so the fit "
                     f"gives each one competitor at {smallest:.3g} and its T is approximate; pass logits for an exact fit")
    others = log_probs.scatter(-1, labels[:, None], -math.inf).amax(-1)
    if bool((picked > others).all()):
        return done(1.0, "the validation predictions are all correct (separable): the NLL falls as T -> 0 and has "
                         "no finite optimum; falling back to T = 1")
    def kept(temperature, note=None):
        # the search minimises the exact NLL; metrics.nll reports it floored at 1e-12 per example (a saturated 0
        # stays 0 under apply_temperature): a few examples wrong by more than those 27.6 nats can make the fitted T
        # raise the reported NLL on the split it fits, while a T short of it may still lower it
        at_t = temperature_nll(reported, labels, temperature)
        # at T = 1 apply_temperature returns probabilities as given, not renormalised (half-precision rows are 1e-3 off)
        at_one = float(-reported.gather(-1, labels[:, None]).clamp(min=math.log(_NLL_FLOOR)).mean())
        if at_t <= at_one:
            return done(temperature, note)
        best_t, at_best = _least_reported(reported, labels, temperature)
        capped = int((reported.log_softmax(-1).gather(-1, labels[:, None]) < math.log(_NLL_FLOOR)).sum())
        why = (f"T = {temperature:.4g} lowers the exact validation NLL but raises the one pyro_lora.metrics.nll "
               f"reports ({at_t:.4f} against {at_one:.4f} at T = 1), ")
        if capped:
            why += (f"which floors each example's label probability at 1e-12 (27.6 nats): {capped} of {len(labels)} "
                    "validation examples are wrong by more than that, and softening for them costs the others more "
                    "than the floor lets them gain")
        else:
            off = float((reported.exp().sum(-1) - 1).abs().max())
            why += (f"which at T = 1 scores the probabilities as given, rows summing to 1 only within {off:.3g} "
                    "(half-precision rounding), where any other T renormalises them")
        if at_best < at_one and best_t != 1.0:  # exactly 1 would be the rows as given, not the renormalised score
            return done(best_t, f"{why}; keeping T = {best_t:.4g}, the least reported NLL between 1 and "
                                f"{temperature:.4g} ({at_best:.4f})")
        return done(1.0, f"{why}; no T between 1 and {temperature:.4g} lowers it: falling back to T = 1")

    nll = lambda log_t: _exact_nll(log_probs, labels, log_t)  # noqa: E731
    log_t, best = golden_section(nll, math.log(low), math.log(high), tol)
    if best >= nll(0.0):
        return done(1.0)
    # the search never evaluates an end: a minimum there leaves log T within tol of it, and the end scores lower than
    # what the search found (a tol wide against the bounds leaves an interior optimum that near an end too)
    if log_t - math.log(low) <= 2 * tol and nll(math.log(low)) <= best:
        return done(1.0, f"the validation NLL is lowest at the lower search bound T = {low:g} (the predictions want "
                         f"sharpening more than {1 / low:g}-fold: nearly uniform yet better than chance, or nearly "
                         "separable): no optimum inside the bounds; falling back to T = 1")
    if math.log(high) - log_t <= 2 * tol and nll(math.log(high)) <= best:
        # d NLL / d(1/T) at 1/T = 0: the mean, over examples, of the row's mean log-probability (over its finite
        # entries, the classes softmax(log p / T) tends to share as T -> inf) minus the label's
        finite = torch.isfinite(log_probs)
        row_mean = log_probs.where(finite, 0.0).sum(-1) / finite.sum(-1)
        if float((row_mean - picked).mean()) >= 0:
            return kept(float(high), f"the validation NLL is lowest at the upper search bound T = {high:g}: the "
                                     "predictions are no better than uniform on the validation split, and "
                                     f"T = {high:g} makes them nearly uniform")
        beyond = _beyond(nll, math.log(high), tol)
        return kept(float(high), f"the validation NLL is lowest at the upper search bound T = {high:g}: its "
                                 f"minimum lies beyond it, at T = {beyond:.3g} (log-probabilities that many times too "
                                 f"sharp: very over-confident predictions); keeping T = {high:g}, pass "
                                 f"bounds=({low:g}, {10 ** math.ceil(math.log10(beyond)):g}) to reach it")
    return kept(math.exp(log_t))


def _least_reported(log_probs, labels, temperature, points=64):
    """The ``T`` between 1 and ``temperature`` of least reported (floored) NLL, and that NLL: a log-spaced grid,
    then a golden-section refinement between the best point's neighbours (the floor makes the NLL piecewise, not
    unimodal, over the whole segment)."""
    f = lambda log_t: temperature_nll(log_probs, labels, math.exp(log_t))  # noqa: E731
    grid = torch.linspace(0.0, math.log(temperature), points, dtype=torch.float64).tolist()
    values = [f(log_t) for log_t in grid]
    i = min(range(points), key=values.__getitem__)
    lo, hi = sorted((grid[max(i - 1, 0)], grid[min(i + 1, points - 1)]))
    log_t, value = golden_section(f, lo, hi, 1e-4)
    return (math.exp(log_t), value) if value < values[i] else (math.exp(grid[i]), values[i])


def _beyond(nll, log_high, tol, limit=1e12):
    """``T`` minimising ``nll`` (of ``log T``) above ``exp(log_high)``, where it is still falling; at most ``limit``."""
    step = math.log(10)
    a, b = log_high, log_high + step
    fa, fb = nll(a), nll(b)
    while fb < fa and b < math.log(limit):
        a, fa, b = b, fb, b + step
        fb = nll(b)
    return math.exp(golden_section(nll, a - step, min(b, math.log(limit)), tol)[0])


def apply_temperature(probs: torch.Tensor, temperature: float, kind: str = "probs") -> torch.Tensor:
    """``softmax(log probs / T)``: ``[..., C]`` probabilities recalibrated by ``T``, in float64; zero entries stay zero.
    ``T = 1`` returns them unchanged, in their own dtype (a renormalisation would move them by float rounding: a
    float64 copy of float32 confidences on a bin edge ``k / 15`` would move them to the next ECE bin, as
    :func:`~pyro_lora.metrics.reliability_bins` bins float32 in float32). With ``kind="logits"``: ``softmax(logits / T)``
    in float64 (``T = 1`` included), ``-inf`` entries (missing choices) at 0. Log-probabilities are logits: scaling
    ``Prediction.log_probs`` so keeps the margins its float32 ``probs`` flushed to 0 (a 0 stays 0 whatever ``T``).

    Float64 whatever the input: sharpening (``T < 1``) shrinks a confident row's small entries, which hold its margin
    (the selective-prediction metrics rank by them, and the entropy holds them), and float32 flushes them to 0 from
    about 103 nats. Where even float64 does (a margin beyond about 745 nats after scaling), the row becomes one-hot and
    ties with every other such row; a warning counts them.

    :param probs: ``[..., C]`` probability vectors (rows summing to 1; zeros for missing choices), e.g.
        ``Prediction.probs``; with ``kind="logits"`` logits or log-probabilities (``-inf`` for missing choices), e.g.
        ``Prediction.log_probs``.
    :param float temperature: ``T``, a finite positive number (from :func:`fit_temperature`).
    :param str kind: ``"probs"`` (logits refused: they are no probability vectors) or ``"logits"``.
    :returns: ``[..., C]`` float64 probabilities (for ``kind="probs"`` at ``T = 1`` a copy of ``probs``, of its dtype).
    :raises ValueError: for a ``T`` that is no finite positive number (a bool included), an unknown ``kind``, rows
        that are not probability vectors (logits, nan, inf) for ``"probs"``, or logits with a nan or ``+inf``, a row
        all ``-inf``, or rows that all are probability vectors (up to rounding) for ``"logits"``.
    """
    temperature = check_positive(temperature, "temperature")
    if kind not in ("probs", "logits"):
        raise ValueError(f"kind must be 'probs' or 'logits', got {kind!r}")
    raw = _tensor(probs, "probs")  # a list of Python floats as float64: 1e-50 stays above 0
    x = raw.to(torch.float64, copy=True)
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"probs must be [..., C] {'logits' if kind == 'logits' else 'probability vectors'}, got shape "
                         f"{tuple(x.shape)}")
    if kind == "logits":
        if torch.isnan(x).any() or (x == math.inf).any():
            raise ValueError("logits contain nan or +inf")
        if _probability_like(x, raw):
            _refuse_probabilities_as_logits()
        if bool((x == -math.inf).all(-1).any()):
            raise ValueError("a row of logits is all -inf: it gives no class a probability")
        # normalised first, as fit_temperature does: a finite logit beyond float64's range over T (1e300 at T = 1e-10)
        # would give inf - inf = nan in the softmax, where the row's largest entry is 0 after log_softmax
        x = x.log_softmax(-1)
        scaled = _scaled(x, temperature)
        x = x.exp()  # the unscaled row, which the one-hot count below compares with
    else:
        if not torch.isfinite(x).all():
            raise ValueError("probs contains non-finite values (nan or inf)")
        _check_rows(x, raw.dtype, "probs")
        if temperature == 1.0:
            return raw.clone()
        scaled = _scaled(x.log(), temperature)
    tied = int(((_uncertainty(scaled) == 0) & (_uncertainty(x) > 0)).sum())
    if tied:
        warnings.warn(f"temperature T = {temperature:.3g} sharpens {tied} of {scaled[..., 0].numel()} rows to one-hot "
                      "even in float64 (their other probabilities below 5e-324): they tie, so AURC, accuracy at "
                      "coverage and OOD AUROC cannot order them", stacklevel=user_stacklevel())
    return scaled


def _scaled(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log_probs / T)``; where a tiny ``T`` sends a whole row to ``-inf`` (``-0.3 / 1e-320``: nan), from the
    rows less their largest entry, which stays 0 (the same softmax)."""
    scaled = (log_probs / temperature).softmax(-1)
    if torch.isnan(scaled).any():
        scaled = ((log_probs - log_probs.max(-1, keepdim=True).values) / temperature).softmax(-1)
    return scaled


def scale_prediction(prediction, temperature: float):
    """A copy of the :class:`~pyro_lora.Prediction` ``prediction`` recalibrated by ``T``: its ``probs``
    ``softmax(log_probs / T)`` in float64 from its exact ``log_probs`` where it has them (float32 ``probs`` flush a
    choice more than about 103 nats behind to 0, and a 0 stays 0 whatever ``T``), else
    :func:`apply_temperature` of its ``probs``; its ``log_probs`` scaled alike (``log_softmax(log_probs / T)``); no
    ``sample_probs`` (the temperature applies to the averaged predictive, which they no longer average to). At
    ``T = 1`` ``probs`` stay as given, as :func:`apply_temperature` keeps them.

    :param float temperature: ``T``, a finite positive number (from :func:`fit_temperature` on ``log_probs``).
    :raises ValueError: as :func:`apply_temperature`; for a ``prediction`` that is no ``Prediction`` (a tensor of
        probabilities goes to :func:`apply_temperature`), or whose ``log_probs`` differ in shape from its ``probs``.
    """
    temperature = check_positive(temperature, "temperature")
    fields = ("probs", "log_probs", "sample_probs")
    if not (is_dataclass(prediction) and not isinstance(prediction, type) and all(hasattr(prediction, f) for f in fields)):
        raise ValueError(f"prediction must be a pyro_lora.Prediction (from predict), got {type(prediction).__name__}; "
                         "for a tensor of probabilities or logits use apply_temperature")
    if prediction.probs is None:
        raise ValueError("the prediction holds no probs: there is no predictive to scale")
    given = _tensor(prediction.probs, "probs")  # a list or an array too, as apply_temperature reads them
    exact = None if prediction.log_probs is None else _tensor(prediction.log_probs, "log_probs")
    if exact is not None and exact.shape != given.shape:
        raise ValueError(f"the prediction's log_probs have shape {tuple(exact.shape)} where its probs have "
                         f"{tuple(given.shape)}: they must be the same [N, C] predictive")
    if exact is None or temperature == 1.0:
        probs = apply_temperature(given, temperature)
    else:
        probs = apply_temperature(exact, temperature, kind="logits")
    log_probs = None if exact is None else (exact.double() / temperature).log_softmax(-1)
    return replace(prediction, probs=probs, log_probs=log_probs, sample_probs=None)
