"""One knob of a fitted posterior chosen by validation NLL: a grid in log space, then golden-section refinement.

What the validation-tuned methods share (TFB's ``sigma_q``, the posterior temperature of the variational guides):
each value is scored by the NLL of the guide's own weight-sample predictive on the validation split, with the same
weight noise for every value (common random numbers), so the comparison between values is not sampling noise.
"""

import math
import warnings

import torch

from pyro_lora.calibration import golden_section
from pyro_lora.metrics import nll
from pyro_lora.predictive import predict


def validation_nll(guide, loader, num_samples: int, seed: int = 0) -> float:
    """NLL of ``guide``'s weight-sample predictive on ``loader``, its draws seeded by ``seed`` (in a forked RNG)."""
    device = guide.model.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        prediction = predict(guide.model, guide, loader, num_samples=num_samples)
    return nll(prediction.probs, prediction.labels)


def tune_on_validation(guide, knob: str, set_value, grid, loader, num_samples: int, tol: float = 0.1, seed: int = 0):
    """Set the ``knob`` of ``guide`` (through ``set_value(value)``) to the value of lowest validation NLL.

    The ``grid`` values (positive, increasing) are scored first; then a golden-section search in ``log value``
    between the best grid value's neighbours, until the bracket is ``tol`` wide (0.1: values within 10%). A best
    value at an end of the grid may lie beyond it: a warning names that end.

    :param str knob: the knob's name, for the warning and the trace.
    :param grid: at least 3 positive values, increasing.
    :param loader: the validation data.
    :returns: the trace, ``[(value, NLL), ...]`` in the order scored; the knob is left at the best value.
    :raises ValueError: for a grid of fewer than 3 values or values that are not positive and increasing, or a
        validation NLL that is NaN.
    """
    grid = [float(v) for v in grid]
    if len(grid) < 3 or not all(0 < a < b for a, b in zip(grid, grid[1:])) or not all(map(math.isfinite, grid)):
        raise ValueError(f"{knob} grid {grid} must hold at least 3 finite positive values, increasing")
    trace = []

    def score(value):
        set_value(value)
        loss = validation_nll(guide, loader, num_samples, seed)
        if math.isnan(loss):
            raise ValueError(f"the validation NLL is NaN at {knob} = {value:g}: no {knob} was set")
        trace.append((value, loss))
        return loss

    losses = [score(v) for v in grid]
    i = min(range(len(grid)), key=losses.__getitem__)
    if i in (0, len(grid) - 1):
        side = "smallest" if i == 0 else "largest"
        warnings.warn(f"the validation NLL is lowest at the {side} {knob} of the grid ({grid[i]:g}; grid {grid[0]:g} to "
                      f"{grid[-1]:g}): the optimum may lie beyond it", stacklevel=2)
    golden_section(lambda t: score(math.exp(t)), math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, len(grid) - 1)]), tol)
    best = min(trace, key=lambda t: t[1])[0]
    set_value(best)
    return trace


# posterior temperatures tried first: every std times 0.1 to 100 (a post-hoc fit a few epochs long can leave the
# stds far narrower than the data allow)
TEMPERATURE_GRID = [10.0 ** (k / 2) for k in range(-4, 9)]


def tune_temperature(setup, guide):
    """Set ``guide``'s posterior temperature (``guide.set_temperature``) by the validation NLL of its predictive with
    ``setup``'s samples and seed (:func:`tune_on_validation` over :data:`TEMPERATURE_GRID`); returns the trace."""
    return tune_on_validation(guide, "posterior temperature", guide.set_temperature, TEMPERATURE_GRID,
                              setup.loader(setup.val), setup.config.samples, seed=setup.seed)
