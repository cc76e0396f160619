"""What Pyro's handler stack says about the call running now: the plates around it, the trace an ELBO replays."""

from __future__ import annotations

from pyro.poutine.indep_messenger import IndepMessenger
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.runtime import _PYRO_STACK

VECTORIZED = ("vectorized particles (vectorize_particles=True, Predictive(parallel=True)) are not supported; use "
              "num_particles without vectorizing, or pyro_lora.predict for many samples in one forward")


def enclosing_plates() -> list[str]:
    """Names of the plates around the call running now (``pyro.plate``, Pyro's vectorized particles), outermost first."""
    return [m.name for m in _PYRO_STACK if isinstance(m, IndepMessenger)]


def replayed_trace():
    """The trace the innermost ``poutine.replay`` replays, or ``None``: under an ELBO (``Trace_ELBO`` and the others,
    ``Importance``) the model runs replayed against the guide's trace, which this returns."""
    for m in reversed(_PYRO_STACK):  # innermost last on the stack
        if isinstance(m, ReplayMessenger) and m.trace is not None:
            return m.trace
    return None
