"""One knob of a fitted posterior chosen by validation NLL: a grid in log space, then golden-section refinement.

What the validation-tuned methods share (TFB's ``sigma_q``, the posterior temperature of the variational guides):
each value is scored by the NLL of the guide's own weight-sample predictive on the validation split, with the same
weight noise for every value (common random numbers), so the comparison between values is not sampling noise. A
value that costs validation accuracy is refused: the NLL alone can favour noise that flips predictions. Where the
values share one set of weights (TFB), a value that flips more than a given share of the validation predictions is
refused too: on a small split, flips in both directions hide an accuracy loss. A value whose predictive overflows
(not finite) is refused as too wide, and so is every value within :data:`OVERFLOW_MARGIN` of it in posterior
variance: one finite on the search's draws at the edge of overflowing overflows on others (a ScalaBL temperature
0.88 times one that overflowed failed on 22 of 60 other draws), so the value chosen there is checked on a second,
independent set of draws too.
"""

import math
import warnings
from typing import NamedTuple, Optional

import torch

from pyro_lora import distributed
from pyro_lora.calibration import check_tol, golden_section
from pyro_lora.callers import user_stacklevel
from pyro_lora.checks import as_real, check_count, check_nonnegative, check_numbers, check_positive
from pyro_lora.data import fixed_batches
from pyro_lora.metrics import accuracy, nll
from pyro_lora.predictive import NonFinitePredictionError, predict

from .registry import get_method, join_notes

# the validation accuracy a tuned value may cost against the grid's first (least noisy) value: the 1 point
MAX_ACCURACY_DROP = 0.01
# a width search refuses a value whose posterior variance is within this factor of one whose predictive overflowed: a
# quarter of its variance at most (half its std). An overflow is a tail event of the draws, so a value near one
# overflows on some draws: on a ScalaBL run whose 4-draw validation predictive overflowed at T = 415, other draws
# overflowed on 22 of 60 seeds at T = 365, 3 of 60 at T = 207 (a factor 2) and none at T = 100 (a factor 4)
OVERFLOW_MARGIN = 4.0
# validation NLLs within this spread (relative above 1 nat, absolute below) are one value: a knob without effect on the
# predictions moves them in the 8th digit (float noise), and the "best" of such a grid sat at whichever end won by 1e-8
FLAT_NLL = 1e-6


def flat(nlls) -> bool:
    """Whether the finite validation NLLs ``nlls`` are one value (within :data:`FLAT_NLL` nats, or that share of the
    least where it is above 1 nat)."""
    return max(nlls) - min(nlls) <= FLAT_NLL * max(1.0, abs(min(nlls)))


def margin_factor(power: float) -> float:
    """The factor :data:`OVERFLOW_MARGIN` is in a knob's own units, for a knob the posterior variance scales as
    ``knob ** power`` with: 4 for a temperature (1), 2 for a std such as ``sigma_q`` (2), 4 for a prior precision
    (-1)."""
    return OVERFLOW_MARGIN ** (1 / abs(power))


def near_overflow(value: float, overflowed, factor: float) -> bool:
    """Whether ``value`` is within ``factor`` (either side) of one of the ``overflowed`` values, those whose predictive
    overflowed: one that overflowed itself included."""
    return any(v / factor <= value <= v * factor for v in overflowed)


class Scores(NamedTuple):
    """A guide's predictive on the validation split: ``nll`` (nats), ``accuracy`` (a fraction) and ``predicted``, the
    argmax class of each example ``[N]`` (None where the predictive is not finite)."""

    nll: float
    accuracy: float
    predicted: Optional[torch.Tensor]


class Tuning(NamedTuple):
    """What :func:`tune_on_validation` chose: the ``value`` the knob is left at, the ``trace``
    ``[(value, NLL, accuracy, flip rate), ...]`` in the order scored (the flip rate: the share of validation
    predictions that differ from the first value's, NaN where unknown), and a ``note`` where the choice is at an edge (the grid's
    end, or every larger value costs accuracy) or kept a margin from an overflow, for the method's rows; else None."""

    value: float
    trace: list
    note: Optional[str]


def validation_scores(guide, loader, num_samples: int, seed: int = 0) -> Scores:
    """The :class:`Scores` of ``guide``'s weight-sample predictive on ``loader``, its draws seeded by ``seed`` (in a
    forked RNG); ``(inf, nan, None)`` where the predictive is not finite (:func:`predict` refuses it), e.g. a wide
    ScalaBL posterior overflowing ``exp(log s)``: the search refuses that value, as one too wide."""
    device = guide.model.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            prediction = predict(guide.model, guide, loader, num_samples=num_samples)
        except NonFinitePredictionError:
            return Scores(math.inf, math.nan, None)
    return Scores(nll(prediction.probs, prediction.labels), accuracy(prediction.probs, prediction.labels),
                  prediction.probs.argmax(-1))


def _flip_rate(predicted, reference) -> float:
    """The share of examples whose predicted class differs from ``reference``'s; NaN where either is unknown."""
    if predicted is None or reference is None:
        return math.nan
    return float((predicted != reference).double().mean())


def tune_on_validation(guide, knob: str, set_value, grid, loader, num_samples: int, tol: float = 0.1, seed: int = 0,
                       max_accuracy_drop: float = MAX_ACCURACY_DROP, max_flip_rate: Optional[float] = None,
                       start: Optional[float] = None, variance_power: float = 1.0):
    """Set the ``knob`` of ``guide`` (through ``set_value(value)``) to the value of lowest validation NLL among those
    that keep validation accuracy.

    The ``grid`` values (positive, increasing: more noise) are scored first; then a golden-section search in
    ``log value`` between the best grid value's neighbours, until the bracket is ``tol`` wide (0.1: values within
    10%). A value whose validation accuracy is more than ``max_accuracy_drop`` (a fraction: 0.01 is one point) below
    the first grid value's (the first with a finite predictive) counts as infinitely bad: on SST-2, TFB's sigma_q of
    lowest validation NLL cost 3 test accuracy points. With ``max_flip_rate``, so does a value whose predicted classes
    differ from that value's on more than that share of the validation examples (for knobs that add noise to one set
    of weights, as TFB's). A value whose predictive is not finite (overflowing logits) is refused as too wide, and so
    is every value within :data:`OVERFLOW_MARGIN` of one such in posterior variance, either side (``variance_power``):
    finite on these draws, it is at the edge of overflowing on others. Where anything overflowed, the value chosen is
    scored again on a second set of draws (seed ``seed + 1``); overflowing there, it counts as overflowing and the best
    value left is chosen (and checked) instead; the note says so. A best value still at an end of the grid after the
    refinement may lie beyond it: a warning names that end. A validation NLL
    the same at every grid value (a knob without effect on the predictions) leaves the smallest, with its own note.

    :param str knob: the knob's name, for the warning and the trace.
    :param grid: at least 3 positive values, increasing.
    :param max_flip_rate: a fraction in ``[0, 1]``, or None for no flip guard.
    :param start: the knob's value before the tuning, set back where it fails (a validation batch refused, no value
        with a finite NLL); None: left at the value the failure found.
    :param variance_power: the posterior variance scales as ``knob ** variance_power`` (1: a temperature, 2: a std
        such as ``sigma_q``), which sets the overflow margin in the knob's units (:func:`margin_factor`).
    :param loader: the validation data (batches), read once: each value is scored on the same batches in the same
        order, so a shuffling ``DataLoader`` or a generator is scored as the list of its batches (one dropping its last
        incomplete batch is refused, as ``predict`` refuses it).
    :returns: a :class:`Tuning` (the value, the trace, the edge note, which is also warned); the knob is left at the
        best value.
    :raises ValueError: for settings that differ across ranks (under ``torch.distributed``, on every rank, first),
        a grid of fewer than 3 values or values that are not positive and increasing, a negative
        ``max_accuracy_drop``, a ``max_flip_rate`` outside ``[0, 1]``, a ``tol`` that is not positive and finite, or a
        grid none of whose values gives a finite validation NLL (a value whose predictive is not finite is refused, as
        one that costs accuracy), or no value clear of the overflow margin; a ``variance_power`` that is not a
        positive finite number.
    """
    distributed.check_settings(f"the {knob} tuning", {
        "knob": knob, "grid": grid, "num_samples": num_samples, "tol": tol, "seed": seed, "max_accuracy_drop": max_accuracy_drop,
        "max_flip_rate": max_flip_rate, "start": start, "variance_power": variance_power})
    grid = check_numbers(grid, f"the {knob} grid")
    if len(grid) < 3 or not all(0 < a < b for a, b in zip(grid, grid[1:])) or not all(map(math.isfinite, grid)):
        raise ValueError(f"{knob} grid {grid} must hold at least 3 finite positive values, increasing")
    if not as_real(max_accuracy_drop) >= 0:  # inf switches the guard off; nan, a string, a bool fail it
        raise ValueError(f"max_accuracy_drop must be a fraction >= 0 (inf: no guard), got {max_accuracy_drop!r}")
    check_count(seed, "seed", minimum=0)
    if start is not None:
        start = check_nonnegative(start, "start")
    if max_flip_rate is not None and not 0 <= as_real(max_flip_rate) <= 1:  # nan, a string, a bool fail it
        raise ValueError(f"max_flip_rate must be a fraction in [0, 1] or None, got {max_flip_rate!r}")
    check_tol(tol)
    check_positive(variance_power, "variance_power")
    loader = fixed_batches(loader, f"the {knob} tuning", "its validation loader")  # every value scored on the same batches, in the same order
    try:
        return _tune(knob, set_value, grid, tol, max_accuracy_drop, max_flip_rate,
                     lambda again=False: validation_scores(guide, loader, num_samples, seed + 1 if again else seed),
                     margin_factor(variance_power))
    except BaseException:
        if start is not None:
            set_value(start)
        raise


def _tune(knob, set_value, grid, tol, max_accuracy_drop, max_flip_rate, scores, margin):
    """:func:`tune_on_validation` past its argument checks: ``scores(again=False)`` gives the validation ``(NLL,
    accuracy, predicted classes)`` at the knob's current value (``again``: on the second set of draws); ``margin``: the
    overflow margin in the knob's units (:func:`margin_factor`)."""
    trace, refused, reference, overflowed, costly = [], set(), None, [], set()

    def worst(value):  # refused, or within the margin of a value whose predictive overflowed
        return value in refused or near_overflow(value, overflowed, margin)

    def score(value):
        nonlocal reference
        set_value(value)
        loss, acc, predicted = scores()
        finite = math.isfinite(loss) and math.isfinite(acc)
        if reference is None and finite:
            # the least noisy value with a finite predictive: what accuracy and flips are judged against (a NaN
            # reference accuracy refused nothing)
            reference = (acc, predicted)
        flips = _flip_rate(predicted, reference[1] if reference else None)
        trace.append((value, loss, acc, flips))
        flipped = max_flip_rate is not None and not flips <= max_flip_rate + 1e-9  # NaN: unknown, refused
        if not finite:
            overflowed.append(value)
        if not finite or acc < reference[0] - max_accuracy_drop - 1e-9 or flipped:
            refused.add(value)  # a predictive that is not finite, or one that costs accuracy or flips predictions
            if finite:
                costly.add(value)
        return math.inf if worst(value) else loss

    def best_left():
        return min(trace, key=lambda t: (math.inf if worst(t[0]) else t[1], t[0]))[0]

    losses = [score(v) for v in grid]
    if all(map(worst, grid)):
        near = "" if all(v in refused for v in grid) else \
            f" clear of the overflow margin (a {knob} within a factor {margin:g} of one whose predictive overflows)"
        lower = f"; start the grid lower (below {min(overflowed) / margin:.4g})" if overflowed else ""
        raise ValueError(f"no {knob} of the grid ({grid[0]:g} to {grid[-1]:g}) gives a finite validation NLL{near}: the "
                         f"tuning stopped, with the {knob} left as it was{lower}")
    losses = [math.inf if worst(v) else loss for v, loss in zip(grid, losses)]  # the margin of an overflow seen later
    i = min(range(len(grid)), key=losses.__getitem__)
    finite = [loss for loss in losses if math.isfinite(loss)]
    note = None
    if len(finite) == len(grid) and flat(finite):
        set_value(grid[0])
        note = (f"the validation NLL is the same at every {knob} of the grid ({grid[0]:g} to {grid[-1]:g}): the {knob} "
                f"does not change these predictions (a posterior without spread?); left at the smallest, {grid[0]:g}")
        warnings.warn(note, stacklevel=user_stacklevel())
        return Tuning(grid[0], trace, note)
    if i == 0 and all(map(worst, grid[1:])):  # refused for what it costs, or for an overflow: each said as it is
        flips = "" if max_flip_rate is None else f" or flips more than {100 * max_flip_rate:g}% of the validation predictions"
        cost = f"costs more than {100 * max_accuracy_drop:g} validation accuracy points{flips}"
        costs = [v for v in grid[1:] if v in costly]
        if len(costs) == len(grid) - 1:
            note = f"every {knob} of the grid above its smallest ({grid[0]:g}) {cost}: the search stays below the next one"
        elif costs:
            note = (f"{knob} {', '.join(f'{v:g}' for v in costs)} of the grid each {cost}, and every other above its smallest "
                    f"({grid[0]:g}) overflowed or is within the overflow margin of one that did: the search stays below "
                    "the next one")
        else:  # refused for the overflow alone, not for its NLL: no optimum below the grid is implied
            note = (f"every {knob} of the grid above its smallest ({grid[0]:g}) overflowed or is within the overflow "
                    f"margin of one that did (not refused for its NLL or accuracy): the search stays below the next one")
    golden_section(lambda t: score(math.exp(t)), math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, len(grid) - 1)]), tol)
    best, margin_note = best_left(), None
    if overflowed:
        seen = min(overflowed)
        best, again = _checked_again(knob, set_value, scores, overflowed, worst, best_left, best, margin)
        again = f" and at {knob} {', '.join(f'{v:g}' for v in again)} on a second set of draws" if again else ""
        margin_note = (f"the validation predictive overflowed (not finite) at {knob} {seen:g}{again}: a {knob} within a "
                       f"factor {margin:g} of one that overflows is refused as at the edge of overflowing; {knob} "
                       f"{best:g} is the best value clear of that, finite on a second set of draws too")
    if note is None and best in (grid[0], grid[-1]):  # judged after the refinement: an optimum inside is no edge
        side = "smallest" if best == grid[0] else "largest"
        note = (f"the validation NLL is lowest at the {side} {knob} of the grid ({best:g}; grid {grid[0]:g} to "
                f"{grid[-1]:g}): the optimum may lie beyond it")
    note = "; ".join(filter(None, [note, margin_note])) or None
    if note:
        warnings.warn(note, stacklevel=user_stacklevel())
    set_value(best)
    return Tuning(best, trace, note)


def _checked_again(knob, set_value, scores, overflowed, worst, best_left, best, margin):
    """``(value, the values that overflowed there)``: ``best``, or the best value left (``best_left()``) once each
    choice whose predictive overflows on the second set of draws (``scores(again=True)``) joins ``overflowed``: one
    whose second predictive is finite.

    :raises ValueError: where no value scored is left clear of the overflow margin.
    """
    again = []
    while True:
        set_value(best)
        if math.isfinite(scores(again=True)[0]):  # the NLL
            return best, again
        overflowed.append(best)
        again.append(best)
        best = best_left()
        if worst(best):
            raise ValueError(f"every {knob} tried is within a factor {margin:g} of one whose validation predictive "
                             f"overflows (on the search's draws or a second set): the tuning stopped; start the grid "
                             f"lower (below {min(overflowed) / margin:.4g})")


# posterior temperatures tried first: every std times 0.1 to 100 (a post-hoc fit a few epochs long can leave the
# stds far narrower than the data allow)
TEMPERATURE_GRID = [10.0 ** (k / 2) for k in range(-4, 9)]


def tempered_fit(setup):
    """The method's base fit (``setup.base_fit()``) with its guide's posterior temperature (``guide.set_temperature``)
    set by the validation NLL of its predictive with ``setup``'s samples and seed (:func:`tune_on_validation` over
    :data:`TEMPERATURE_GRID`): the :class:`~pyro_lora.guides.registry.Fitted`, its note joined with the tuning's, the
    temperature in its ``chosen`` and counted as one more parameter (as a ``+ts`` row counts its temperature; the
    method is registered ``tempered``, so that ``evaluate`` counts it too).

    :raises ValueError: for a method not registered ``tempered``.
    """
    method = get_method(setup.method)
    if not method.tempered:
        raise ValueError(f"method {method.name!r} fits a posterior temperature: register it with @method(..., tempered=True), "
                         "which counts it in its rows' +params, as evaluate does")
    fitted = setup.base_fit()
    guide = fitted.guide
    tuning = tune_on_validation(guide, "posterior temperature", guide.set_temperature, TEMPERATURE_GRID,
                                setup.loader(setup.val), setup.config.samples, seed=setup.seed, start=guide.temperature)
    fitted.note, fitted.chosen = join_notes(fitted.note, tuning.note), {**fitted.chosen, "posterior_temperature": tuning.value}
    fitted.extra_parameters = method.extra_parameters(guide)
    return fitted
