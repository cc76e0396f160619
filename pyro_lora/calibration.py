"""Temperature scaling (Guo et al. 2017): the cheap non-Bayesian calibration every method is compared against.

``p_T(y | x) = softmax(log p(y | x) / T)``, with one ``T > 0`` fitted by minimising the NLL on a validation
split. Working from log-probabilities (``predict`` returns probabilities) is the same as scaling the logits:
they differ by a per-example constant, which the softmax removes. Zero probabilities (missing choices)
stay zero.
"""

import math
import warnings
from typing import NamedTuple, Optional

import torch

from .metrics import _sum_tolerance

__all__ = ["TemperatureFit", "apply_temperature", "fit_temperature", "temperature_nll"]

_GOLDEN = (math.sqrt(5) - 1) / 2


class TemperatureFit(NamedTuple):
    """What :func:`fit_temperature` found (with ``return_info=True``)."""

    temperature: float  # the T to apply: 1.0 when the fit fell back
    note: Optional[str]  # why T is not an optimum inside the bounds (the warning's text); None when it is


def _log_probs(probs_or_logits, kind="auto"):
    """``[N, C]`` float64 log-probabilities from probabilities (rows summing to 1, zeros allowed) or logits."""
    raw = torch.as_tensor(probs_or_logits).detach()
    x = raw.to(torch.float64)
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"expected [N, C] probabilities or logits, got shape {tuple(x.shape)}")
    if kind not in ("auto", "probs", "logits"):
        raise ValueError(f"kind must be 'auto', 'probs' or 'logits', got {kind!r}")
    if torch.isnan(x).any() or (x == math.inf).any():
        raise ValueError("probabilities/logits contain nan or +inf")
    # the tolerance of pyro_lora.metrics: half-precision probabilities must not be taken for logits
    looks_like_probs = bool((x >= 0).all() and ((x.sum(-1) - 1).abs() <= _sum_tolerance(raw.dtype)).all())
    if kind == "probs" or (kind == "auto" and looks_like_probs):
        if not looks_like_probs:
            raise ValueError("kind='probs' but the rows are not probability vectors (entries in [0, 1] summing to 1)")
        return x.log()
    return x.log_softmax(-1)


def temperature_nll(log_probs, labels, temperature):
    """Mean NLL of ``softmax(log_probs / T)`` at the labels (``log_probs``: ``[N, C]``, ``labels``: ``[N]``)."""
    scaled = (log_probs / temperature).log_softmax(-1)
    picked = scaled.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return float(-picked.clamp(min=math.log(1e-12)).mean())  # the floor of pyro_lora.metrics.nll


def fit_temperature(probs_or_logits, labels, kind="auto", bounds=(1e-2, 1e2), tol=1e-4, return_info=False):
    """The temperature ``T`` minimising the validation NLL of ``softmax(log p / T)``.

    The NLL is convex in ``1 / T`` (log-sum-exp of a linear function minus a linear one), so a golden-section
    search over ``log T`` in ``bounds`` finds the minimum; if it does not beat ``T = 1`` (e.g. the optimum is
    ``1`` to within ``tol``), ``1.0`` is returned: the validation NLL never rises.

    When the minimum is not inside the bounds it warns, and the note of ``return_info=True`` says why:

    - every validation example's label is its strict argmax (separable): the NLL falls all the way to
      ``T -> 0`` and has no finite optimum; it falls back to ``T = 1``;
    - the minimum is on the lower bound (nearly separable): it falls back to ``T = 1``. Sharpening to the
      bound fits the validation split, not the data: on held-out data the NLL can be many times worse;
    - the minimum is on the upper bound (predictions no better than uniform on the validation split): it
      keeps ``T = high``, which makes them nearly uniform. Flattening is what the data support, and it
      cannot cost more than about ``log C`` nats of NLL.

    :param probs_or_logits: ``[N, C]`` predictive probabilities (``Prediction.probs``; zeros for missing
        choices) or logits.
    :param labels: ``[N]`` class indices.
    :param str kind: ``"probs"``, ``"logits"`` or ``"auto"`` (probabilities when every row is a probability vector).
    :param bounds: the search interval for ``T``.
    :param bool return_info: return a :class:`TemperatureFit` (``T`` and the note, None unless it warned) instead of ``T``.
    :returns: ``T`` as a float, or a :class:`TemperatureFit`.
    :raises ValueError: on bad shapes, labels out of range, nan / +inf inputs, ``kind="probs"`` rows that are not
        probability vectors, or bounds that do not satisfy ``0 < low < 1 < high``.
    """
    log_probs = _log_probs(probs_or_logits, kind)
    labels = torch.as_tensor(labels).detach().long()
    if labels.shape != log_probs.shape[:1]:
        raise ValueError(f"labels must have shape [{log_probs.shape[0]}], got {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= log_probs.shape[1]:
        raise ValueError(f"labels out of range [0, {log_probs.shape[1]})")
    low, high = bounds
    if not 0 < low < 1 < high:
        raise ValueError(f"bounds must satisfy 0 < low < 1 < high, got {bounds}")

    def done(temperature, note=None):
        if note is not None:
            warnings.warn(f"temperature scaling: {note}", stacklevel=3)
        return TemperatureFit(temperature, note) if return_info else temperature

    picked = log_probs.gather(-1, labels[:, None]).squeeze(-1)
    others = log_probs.scatter(-1, labels[:, None], -math.inf).amax(-1)
    if bool((picked > others).all()):
        return done(1.0, "the validation predictions are all correct (separable): the NLL falls as T -> 0 and has "
                         "no finite optimum; falling back to T = 1")
    nll = lambda log_t: temperature_nll(log_probs, labels, math.exp(log_t))  # noqa: E731
    a, b = math.log(low), math.log(high)
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = nll(c), nll(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = nll(d)
    log_t = c if fc <= fd else d
    if min(fc, fd) >= nll(0.0):
        return done(1.0)
    # the search never evaluates an end: a minimum there leaves log T within tol of it
    if log_t - math.log(low) <= 2 * tol:
        return done(1.0, f"the validation NLL is lowest at the lower search bound T = {low:g} (nearly separable "
                         "predictions): no optimum inside the bounds; falling back to T = 1")
    if math.log(high) - log_t <= 2 * tol:
        return done(float(high), f"the validation NLL is lowest at the upper search bound T = {high:g}: the "
                                 "predictions are no better than uniform on the validation split, and "
                                 f"T = {high:g} makes them nearly uniform")
    return done(math.exp(log_t))


def apply_temperature(probs, temperature):
    """``softmax(log probs / T)``: ``[..., C]`` probabilities recalibrated by ``T``; zero entries stay zero.

    :param probs: ``[..., C]`` probabilities (rows summing to 1), e.g. ``Prediction.probs``.
    :param float temperature: ``T > 0`` from :func:`fit_temperature`.
    """
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    probs = torch.as_tensor(probs)
    if (probs < 0).any() or torch.isnan(probs).any():
        raise ValueError("probs must be non-negative probabilities")
    return (probs.double().log() / temperature).softmax(-1).to(probs.dtype)
