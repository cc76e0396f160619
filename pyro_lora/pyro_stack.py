"""What Pyro's handler stack says about the call running now: the plates around it, the trace an ELBO replays, the
values ``poutine.condition`` hands in, and which guide drew a replayed site; where no handler tells, what the
Python call stack says: whether ``SVI.step``, an ELBO (training or evaluating) or ``Predictive`` runs it; and, for a
replay of the user's own, whether an optimizer step trains through it (:func:`on_training_step`)."""

from __future__ import annotations

import collections
import re
import sys
import weakref

import pyro.poutine as poutine
from pyro.infer.autoguide import AutoGuide, AutoLaplaceApproximation
from pyro.infer.elbo import ELBO
import pyro.infer.mcmc.util as mcmc_util
import pyro.infer.predictive as predictive_module
from pyro.infer.importance import Importance
from pyro.infer.predictive import Predictive
from pyro.infer.svi import SVI
from pyro.infer.trace_elbo import Trace_ELBO
from pyro.infer.traceenum_elbo import TraceEnum_ELBO
from pyro.infer.tracegraph_elbo import TraceGraph_ELBO
from pyro.infer.trace_tail_adaptive_elbo import TraceTailAdaptive_ELBO
from pyro.poutine.block_messenger import BlockMessenger
from pyro.poutine.condition_messenger import ConditionMessenger
from pyro.poutine.escape_messenger import EscapeMessenger
from pyro.poutine.indep_messenger import IndepMessenger
from pyro.poutine.messenger import unwrap
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.seed_messenger import SeedMessenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_struct import Trace
from torch.optim.optimizer import register_optimizer_step_pre_hook

VECTORIZED = ("vectorized particles (vectorize_particles=True, Predictive(parallel=True)) are not supported; use "
              "num_particles without vectorizing, or pyro_lora.predict for many samples in one forward")
# the plates Pyro's inference puts around a model or guide to vectorize particles or samples (ELBOs, Importance,
# RWS, SVGD, Predictive, MCMC's predictive, resamplers): any other plate around them is the user's own
_PARTICLE_PLATES = {"num_particles_vectorized", "num_sleep_particles_vectorized", "_num_predictive_samples", "particles"}


def in_svi_step() -> bool:
    """Whether the call runs inside ``pyro.infer.SVI.step`` (not a loss the user's own loop computes and steps, e.g.
    with a ``GradScaler``, whatever handlers it uses): read from the Python call stack, as no handler tells them apart."""
    return running_svi() is not None


# the methods through which an ELBO (Pyro's, or a subclass of one's own) or Importance runs the model against a guide,
# and what each does: a loss to step on, or a number (ELBO.loss returns a float; Importance weighs samples)
_ELBO_METHODS = {"differentiable_loss": "training", "loss_and_grads": "training", "loss": "evaluation",
                 "_traces": "evaluation"}


def elbo_run() -> str | None:
    """How an ELBO runs the call now, read from the Python call stack (a replay of one's own and an ELBO's look alike to
    the handlers): ``"evaluation"`` inside an ELBO's ``loss`` (a validation loss, ``svi.evaluate_loss``, whatever it
    calls inside) or ``Importance``; else ``"training"`` inside ``pyro.infer.SVI.step`` or an ELBO's
    ``differentiable_loss`` or ``loss_and_grads`` (a loop of one's own); ``None`` outside any (``poutine.trace`` of a
    replay of one's own, which trains only where an optimizer step follows: :func:`on_training_step`; ``Predictive``)."""
    run = None
    frame = sys._getframe(1)
    while frame is not None:
        if _elbo_of(frame) is not None:
            kind = _ELBO_METHODS[frame.f_code.co_name]
            if kind == "evaluation":
                return kind
            run = kind
        elif frame.f_code is SVI.step.__code__:
            run = "training"
        frame = frame.f_back
    return run


def running_svi() -> SVI | None:
    """The ``pyro.infer.SVI`` whose ``step`` runs the call now (the innermost), or ``None``."""
    return _running(SVI.step.__code__)


def _elbo_of(frame):
    """The ELBO (or ``Importance``) running ``frame`` through one of :data:`_ELBO_METHODS`, else None."""
    owner = frame.f_locals.get("self") if frame.f_code.co_name in _ELBO_METHODS else None
    return owner if isinstance(owner, (ELBO, Importance)) else None


# ELBOs whose estimate averages each particle's log p - log q (TraceMeanField_ELBO is a Trace_ELBO): an unbiased estimate
# of each example's log-likelihood within a particle leaves theirs unbiased. TraceTailAdaptive_ELBO, a Trace_ELBO too,
# weighs its particles
_AVERAGING_ELBOS = (Trace_ELBO, TraceGraph_ELBO, TraceEnum_ELBO)


def in_averaging_elbo() -> bool:
    """Whether the innermost ELBO running the call now averages each particle's ``log p - log q`` (``Trace_ELBO``,
    ``TraceMeanField_ELBO``, ``TraceGraph_ELBO``, ``TraceEnum_ELBO``: ``fit``'s, ``SVI``'s), read from the Python call
    stack as :func:`elbo_run`. Not one that weighs particles by its exponential (``RenyiELBO``, ``ReweightedWakeSleep``,
    ``Importance``), nor a replay of one's own, whose objective is unknown."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = _elbo_of(frame)
        if owner is not None:
            return isinstance(owner, _AVERAGING_ELBOS) and not isinstance(owner, TraceTailAdaptive_ELBO)
        frame = frame.f_back
    return False


class _Replay:
    """The checks of one run of a model under a replay of the user's own, due if an optimizer step trains through it."""

    def __init__(self, check):
        self.check = check


_last_replay = weakref.WeakKeyDictionary()  # model -> weakref to the _Replay of its last run, alive while its graph is
_trained_replay = weakref.WeakKeyDictionary()  # model -> the _Replay a backward pass went through: the next step's
_step_hook = []


def on_training_step(owner, check=None, through=()) -> None:
    """``owner`` (a model) ran under a replay of the user's own with gradients on
    (``poutine.trace(poutine.replay(model, trace=guide_trace))``; :func:`elbo_run` ``None``). Such a run trains only in
    a loss of the user's own that an optimizer steps, as in Pyro's 'custom objectives' (``loss = -(model_trace.
    log_prob_sum() - guide_trace.log_prob_sum())``, ``loss.backward()``, ``optimizer.step()``); one read for the prior's
    log density does not. ``check(owner)`` runs at the first optimizer step (torch's, and so Pyro's, before it moves
    anything) after a backward pass through any of the tensors ``through`` (the guide's draws the run read, its output).
    Each run of ``owner`` replaces the last one's; ``check=None`` (a run of another kind with gradients on: ``SVI``, an
    ELBO, ``fit``, which step on their own runs) forgets it. Two replays of one guide trace look alike here: one read
    after the loss's replay and before its backward pass is taken for the loss's."""
    _trained_replay.pop(owner, None)
    if check is None:
        _last_replay.pop(owner, None)
        return
    if not _step_hook:
        _step_hook.append(register_optimizer_step_pre_hook(_before_step))
    replay = _Replay(check)
    _last_replay[owner] = weakref.ref(replay)
    ref = weakref.ref(owner)

    def reached(_):
        model = ref()
        last = None if model is None else _last_replay.get(model)
        if last is not None and last() is replay:
            _trained_replay[model] = replay

    for t in through:
        if t.requires_grad and t.grad_fn is not None:  # a leaf's hook (a parameter's) would outlive this graph
            t.register_hook(reached)


def _before_step(optimizer, args, kwargs) -> None:
    """torch's global pre-step hook: the checks of the replays a backward pass went through, the step not yet taken."""
    for model, replay in list(_trained_replay.items()):
        del _trained_replay[model]
        _last_replay.pop(model, None)
        replay.check(model)


def running_autoguide(model):
    """The Pyro ``AutoGuide`` over ``model`` that the innermost ``SVI``, ELBO, ``Importance`` or ``Predictive`` around
    the call runs (handlers around it unwrapped), read from the Python call stack; ``None`` where that runs another
    guide (pyro_lora's, a function, an autoguide over another model: :func:`innermost_autoguide`), or where none runs
    (a replay of one's own)."""
    guide = innermost_autoguide()
    return guide if guide is not None and unwrap(guide.model) is model else None


def innermost_autoguide():
    """The Pyro ``AutoGuide`` (handlers around it unwrapped) that the innermost ``SVI``, ELBO, ``Importance`` or
    ``Predictive`` around the call runs, whatever model it was built over, read from the Python call stack; ``None``
    where that runs another guide (pyro_lora's, a function: :func:`inference_guide`), or where none runs (a replay of
    one's own)."""
    guide = inference_guide()
    return guide if isinstance(guide, AutoGuide) else None


def inference_guide():
    """The guide (handlers around it unwrapped) that the innermost ``SVI``, ELBO, ``Importance`` or ``Predictive``
    around the call runs, read from the Python call stack: a Pyro ``AutoGuide``, a guide of pyro_lora's, or a function
    of one's own (which may call either); ``None`` where none runs (a replay of one's own, ``Predictive`` given
    samples)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if _elbo_of(frame) is not None or isinstance(owner, (SVI, Importance, Predictive)):
            guide = frame.f_locals.get("guide") if "guide" in frame.f_code.co_varnames else getattr(owner, "guide", None)
            return unwrap(guide) if guide is not None else None
        frame = frame.f_back
    return None


def prototyping_autoguide():
    """The Pyro ``AutoGuide`` whose first call runs the model now (its prototype trace, before it has parameters), or
    ``None``."""
    return _running(AutoGuide._setup_prototype.__code__)


# Pyro's runs of a model that only learn its structure or a starting point, their draws discarded: Predictive's
# plate-nesting guess and shape trace (in _predictive itself, whose draws run in _predictive_sequential), MCMC's
# plate-nesting guess, prototype trace and search for valid initial parameters (whose potential runs in _PEMaker)
_PROBES = frozenset(f.__code__ for f in (predictive_module._guess_max_plate_nesting, predictive_module._predictive,
                                         mcmc_util._guess_max_plate_nesting, mcmc_util.initialize_model,
                                         mcmc_util._find_valid_initial_params))
_PROBING_MODULES = frozenset({predictive_module.__name__, mcmc_util.__name__})


def probing_model() -> bool:
    """Whether the call runs in one of Pyro's runs of the model that only learn its structure or a starting point
    (:data:`_PROBES`, the innermost frame of their modules): a site no guide or sampler supplies there is drawn from
    the prior and thrown away."""
    frame = _calling_frame(lambda frame: frame.f_globals.get("__name__") in _PROBING_MODULES)
    return frame is not None and frame.f_code in _PROBES


def _running(code):
    """The ``self`` of the innermost frame on the call stack running ``code`` (a method's), or ``None``."""
    frame = _calling_frame(lambda frame: frame.f_code is code)
    return None if frame is None else frame.f_locals.get("self")


def in_predictive() -> bool:
    """Whether the call runs inside ``pyro.infer.Predictive`` or a subclass (``WeighedPredictive``), all of whose
    draws go through the functions of ``pyro.infer.predictive`` (an ELBO's ``evaluate_loss`` does not)."""
    return _called_from(lambda frame: frame.f_globals.get("__name__") == "pyro.infer.predictive")


def in_importance() -> bool:
    """Whether the call runs inside ``pyro.infer.Importance``'s draws (``run``, whatever it is called through)."""
    return _called_from(lambda frame: frame.f_code is Importance._traces.__code__)


def in_laplace_approximation() -> bool:
    """Whether the call runs inside ``AutoLaplaceApproximation.laplace_approximation``, which differentiates the loss
    twice (its Hessian)."""
    return _called_from(lambda frame: frame.f_code is AutoLaplaceApproximation.laplace_approximation.__code__)


def in_mcmc() -> bool:
    """Whether the call runs inside Pyro's MCMC (the functions of ``pyro.infer.mcmc``: ``MCMC``, a kernel's setup and
    potential energy, ``initialize_model``), not its deprecated ``predictive``, which runs the model as ``Predictive``."""
    return _called_from(lambda frame: frame.f_globals.get("__name__", "").startswith("pyro.infer.mcmc")
                        and frame.f_code.co_name not in ("predictive", "_predictive_sequential"))


def _called_from(test) -> bool:
    return _calling_frame(test) is not None


def _calling_frame(test):
    """The innermost frame on the call stack, from the caller's caller out, for which ``test(frame)`` holds, or
    ``None``."""
    frame = sys._getframe(2)
    while frame is not None:
        if test(frame):
            return frame
        frame = frame.f_back
    return None


def check_no_plate(who: str) -> None:
    """Refuse a call of ``who`` (``"model"``, ``"guide"``) inside any plate: the weight sites are global (one draw for
    all the data). A plate of the user's own (a minibatch plate with ``subsample_size``, the usual Pyro idiom) is named
    apart from Pyro's vectorized particles, since its remedy differs: the model already has its data plate, scaled by
    ``num_data / rows``.

    :raises ValueError: naming the plates, outermost first, and what to do.
    """
    plates = [m.name for m in _PYRO_STACK if isinstance(m, IndepMessenger)]
    own = [name for name in plates if name not in _PARTICLE_PLATES]
    if own:
        raise ValueError(
            f"the {who} runs inside the plate(s) {own}, which you put around it: the weight sites are global (one draw "
            "for all the data), and the model observes each batch in its own 'data' plate, scaled by num_data / rows "
            "(the batch's) to the whole training set; drop the plate (around the model and the guide) and build the "
            "model with LoraModel(..., num_data=len(training set))"
        )
    if plates and _called_from(lambda frame: isinstance(frame.f_locals.get("self"), TraceTailAdaptive_ELBO)):
        raise ValueError(
            "TraceTailAdaptive_ELBO cannot be used with pyro_lora: Pyro computes it over vectorized particles only "
            "(without vectorize_particles=True it raises NotImplementedError), and the model takes one draw of its "
            "global weight sites per network forward, so vectorized particles are not supported; for a mass-covering "
            "objective use RenyiELBO(alpha=0.5, num_particles=K) (any alpha < 1)"
        )
    if plates:
        raise ValueError(f"the {who} runs inside the plate(s) {plates}: its weight sites are global, and {VECTORIZED}")


# handlers around a training loop that change nothing it computes: a block stops its sites at itself, after the loop's
# own handlers (inside it) have seen them; a seed seeds the RNGs once on entry, as pyro.set_rng_seed would
_HARMLESS_AROUND_TRAINING = (BlockMessenger, SeedMessenger)


def check_no_handlers(who: str) -> None:
    """Refuse to run ``who`` (an entry point running its own inference: ``fit``, ``train_ensemble``) inside any Pyro
    handler but ``poutine.block`` and ``poutine.seed``: it traces, conditions, scales or plates its own model and guide,
    and one around it would change that (``poutine.scale`` multiplied each loss, ``poutine.trace`` saw every step's
    sites twice, ``poutine.condition`` fixed a site the guide draws).

    :raises ValueError: naming the handlers, outermost first, and to call ``who`` outside them.
    """
    around = [m for m in _PYRO_STACK if not isinstance(m, _HARMLESS_AROUND_TRAINING)]
    if around:
        names = ", ".join(dict.fromkeys(_handler_name(m) for m in around))
        raise ValueError(f"{who} runs inside the Pyro handler(s) {names}: it runs its own inference (its ELBO traces, "
                         "replays and scales the model and guide), which a handler around it would change (a scale "
                         f"multiplies the loss, a trace or condition breaks it); call {who} outside them")


def _handler_name(messenger) -> str:
    """How the user wrote ``messenger``: ``pyro.plate('data')``, ``poutine.scale``, or its class's name."""
    if isinstance(messenger, IndepMessenger):
        return f"pyro.plate({messenger.name!r})"
    cls = type(messenger)
    if cls.__module__.startswith("pyro.poutine.") and cls.__name__.endswith("Messenger"):
        return "poutine." + re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__[: -len("Messenger")]).lower()
    return cls.__name__


def replayed_trace():
    """The trace the innermost ``poutine.replay`` replays, or ``None``: under an ELBO (``Trace_ELBO`` and the others,
    ``Importance``) the model runs replayed against the guide's trace, which this returns; so it does under a replay of
    one's own (``poutine.trace(poutine.replay(model, trace=guide_trace))``), which :func:`elbo_run` tells apart.

    Some replays around a model are no guide replayed to it: ``poutine.queue``'s, passed over (``TraceEnum_ELBO`` runs
    the guide under a replay of its own partial trace, empty at first: a model run inside the guide saw an empty guide
    trace), and any around an ``AutoGuide``'s prototype run of the model (in the guide's first call; it blocks the
    model's sites from every handler outside), which replays nothing to the model."""
    i = _elbo_replay()
    return None if i is None else _PYRO_STACK[i].trace


def hidden_from_elbo(node) -> bool:
    """Whether a ``poutine.block`` between the ELBO's replay (:func:`replayed_trace`) and the model hides the site
    ``node`` (a trace node of it) from the ELBO's trace, which is outside that replay. A block outside the ELBO's own
    trace hides nothing from it."""
    i = _elbo_replay()
    return i is not None and any(isinstance(m, BlockMessenger) and m.hide_fn(node) for m in _PYRO_STACK[i + 1 :])


def _elbo_replay() -> int | None:
    """The index on the stack of the replay :func:`replayed_trace` reads, or ``None``."""
    for i in reversed(range(len(_PYRO_STACK))):  # innermost last on the stack
        m = _PYRO_STACK[i]
        # poutine.queue (and pyro.contrib.funsor's) wraps its replay in an escape handler; no other replay has one there
        if isinstance(m, ReplayMessenger) and m.trace is not None and not (i and isinstance(_PYRO_STACK[i - 1], EscapeMessenger)):
            return None if prototyping_autoguide() is not None else i
    return None


_GUIDE_MARK = "pyro_lora_guide"  # key in a sample site's infer dict: a weak reference to the guide that drew it


def marking_sites(guide):
    """A handler that marks every sample site drawn inside it with ``guide`` (the innermost guide keeps its mark), so
    that a model replayed against the trace can tell which guide drew its values (:func:`marked_guides`)."""
    ref = weakref.ref(guide)  # a trace must not keep a guide alive; deepcopy keeps weak references as they are

    def mark(msg):
        return {} if msg["type"] != "sample" or _GUIDE_MARK in msg["infer"] else {_GUIDE_MARK: ref}

    return poutine.infer_config(config_fn=mark)


def marked_guides(trace) -> list:
    """The guides that marked sample sites of ``trace`` (:func:`marking_sites`), each once."""
    guides = {}
    for node in trace.nodes.values():
        ref = node["infer"].get(_GUIDE_MARK) if node["type"] == "sample" else None
        guide = ref() if ref is not None else None
        if guide is not None:
            guides[id(guide)] = guide
    return list(guides.values())


# Draws of guides run without gradients (pyro.infer.Predictive's, a trace of one's own): their digest -> weak references
# to the guides that drew them (point guides of two models may draw the same values), for a model later conditioned
# on those values to tell which guides they came from (Predictive stacks the draws, so no mark or tensor identity
# survives). Bounded: Predictive runs the model on its S draws in their order, so with S beyond the bound the model's
# later calls still find theirs.
_DRAWS: collections.OrderedDict = collections.OrderedDict()
_DRAWS_KEPT = 1 << 14


def _draws_digest(values: dict) -> tuple:
    """Each site's name, size and float64 sum: exact for the same values in any leading shape ([S, 1, ...] or not)."""
    return tuple(sorted((name, v.numel(), float(v.detach().double().sum())) for name, v in values.items()))


def remember_draws(guide, values: dict) -> None:
    """Record that ``guide`` drew ``values`` (site name -> tensor), for :func:`drawn_by`."""
    key = _draws_digest(values)
    others = [ref for ref in _DRAWS.pop(key, []) if ref() is not None and ref() is not guide]
    _DRAWS[key] = [*others, weakref.ref(guide)]  # a draw must not keep a guide alive
    while len(_DRAWS) > _DRAWS_KEPT:
        _DRAWS.popitem(last=False)


def drawn_by(values: dict) -> list:
    """The live guides that drew ``values`` (:func:`remember_draws`), the latest last; ``[]`` for values of other origin."""
    refs = _DRAWS.get(_draws_digest(values), []) if values else []
    return [guide for guide in (ref() for ref in refs) if guide is not None]


def conditioned_names() -> set:
    """Names of the sites that the ``poutine.condition`` handlers around the call running now hand values to
    (``pyro.infer.Predictive`` conditions the model on its posterior samples so)."""
    names = set()
    for m in _PYRO_STACK:
        if isinstance(m, ConditionMessenger):
            names.update(m.data.nodes if isinstance(m.data, Trace) else m.data)
    return names
