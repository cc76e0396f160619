"""The interface every posterior guide shares.

A guide is a real Pyro guide: ``guide(batch)`` records one sample site per model site, with the
model's names and shapes, so ``Trace_ELBO``, ``TraceMeanField_ELBO``, ``Predictive`` and
``poutine.trace/replay/condition`` work with every guide. Beside that, the fast path
``sample(S)`` / ``mean()`` gives site values directly for the batched predictive, without tracing.
Guides never touch the network.
"""

import contextlib
import copy
import functools
import inspect

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch.distributions.kl import register_kl

from pyro_lora import pyro_params
from pyro_lora.checks import check_count, pickling_refused
from pyro_lora.contract import check_guide, check_model, describe
from pyro_lora.ownership import follow_svi_step, point_snapshot, record_fit, stop_following, take_over, watch_steps
from pyro_lora.io import records_at_build, register_guide
from pyro_lora.model import full_precision
from pyro_lora.modes import building, library_dtype
from pyro_lora.pyro_stack import check_no_plate, in_predictive, marking_sites, remember_draws


def _as_pyro_guide(forward):
    """``forward`` run as a Pyro guide: its parameters recorded and its sites marked once per call, however a
    subclass's forward reaches its base's."""

    @functools.wraps(forward)
    def run(guide, *args, **kwargs):
        if guide._running:
            return forward(guide, *args, **kwargs)
        _record_parameters(guide)
        guide._running = True
        # without gradients (Predictive's draws) the draws are recorded: a model conditioned on them checks this guide
        drawn = poutine.trace() if not torch.is_grad_enabled() else None
        try:
            with marking_sites(guide), full_precision(guide.model.device), library_dtype(), \
                    drawn or contextlib.nullcontext():
                out = forward(guide, *args, **kwargs)
        finally:
            guide._running = False
        if drawn is not None:
            remember_draws(guide, {n: node["value"] for n, node in drawn.trace.nodes.items()
                                   if node["type"] == "sample" and n in guide.model.sites})
        return out

    return run


def _in_float32(method):
    """``method`` run without autocast: a guide's math (Choleskys, covariance products, log-densities) stays float32
    under a user's ``torch.autocast`` or fit's, which are meant for the network's forward; and under
    :func:`~pyro_lora.modes.library_dtype`, as every public method of a guide."""

    @functools.wraps(method)
    def run(guide, *args, **kwargs):
        with full_precision(guide.model.device), library_dtype():
            return method(guide, *args, **kwargs)

    return run


_FLOAT32_METHODS = ("posterior", "sample", "mean")
_GUARDED = ("forward", *_FLOAT32_METHODS)  # their wrappers above hold library_dtype already


def _in_library_state(cls):
    """Every public method of ``cls`` (its own, as defined there) that returns its result run under
    :func:`~pyro_lora.modes.library_dtype`, and its constructor under :func:`~pyro_lora.modes.building`: a guide's
    tensors are the same under a user's ``torch.set_default_dtype(torch.float64)`` or ``torch.inference_mode()`` as in
    a clean process (built there they were float64, or inference tensors no later fit could train).

    The library's own classes only: a wrapper adds a frame under each method, so a user's or a plugin's subclass
    warning with Python's usual ``stacklevel=2`` would point into this file (the library's warnings find the user's
    line themselves, :func:`~pyro_lora.callers.user_stacklevel`). A generator or a context manager runs its body after
    the call returns, outside any wrapper: those are left as they are."""
    if cls.__module__.partition(".")[0] not in ("pyro_lora", "guides"):
        return
    for name, value in list(vars(cls).items()):
        if name == "__init__":
            setattr(cls, name, _building(value))
        elif (not name.startswith("_") and name not in _GUARDED and inspect.isfunction(value)
              and not inspect.isgeneratorfunction(inspect.unwrap(value))):
            setattr(cls, name, _library_dtype(value))


def _building(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):  # so named, with its self: the search for the line building a guide passes it
        with building():
            init(self, *args, **kwargs)

    return __init__


def _library_dtype(method):
    @functools.wraps(method)
    def run(guide, *args, **kwargs):
        with library_dtype():
            return method(guide, *args, **kwargs)

    return run


def _record_parameters(guide):
    check_no_plate("guide")
    if torch.is_grad_enabled() and pyro_params.recording():  # a step of Pyro's SVI (fit keeps its own books)
        take_over(guide.model, guide)
        points = follow_svi_step(guide)
        record_fit(guide.model, guide, svi=True, points=points)  # what it trains, kept should the guide be dropped
    elif not torch.is_grad_enabled():  # Predictive (under no_grad), SVI.evaluate_loss: the network must still be its own
        check_guide(guide.model, guide, "run as a Pyro guide (pyro.infer.Predictive, a trace)")
        if not guide.samples_carry_posterior and in_predictive():  # pyro_lora.predict refuses it alike
            raise ValueError(
                f"pyro.infer.Predictive with this {type(guide).__name__} would draw its LoRA sites only, which carry "
                f"none of its posterior: the predictions would be the MAP's; use its own predictive ({guide.own_predictive})"
            )
    pyro_params.record(guide._pyro_name, guide.named_parameters())


class LoraGuide(torch.nn.Module):
    """Base class: a posterior ``q(theta)`` over the LoRA sites of a :class:`~pyro_lora.LoraModel`.

    Subclasses implement :meth:`posterior` (site -> distribution with event shape ``site.shape``) and
    :meth:`config` (the keyword arguments that rebuild them, for saving). Parameters are ordinary
    ``nn.Parameter`` s of the module; each ``guide(...)`` call also records them in Pyro's param store
    under a name unique to the guide, so ``SVI`` with a ``pyro.optim`` optimizer trains them and guides
    can be swapped and compared in one process without colliding.

    The guide keeps :attr:`signature`, what it assumes of the model (:func:`pyro_lora.contract.describe`):
    ``fit``, ``predict``, ``save_guide``/``load_guide`` and ``export_adapter`` refuse a model it does not fit.

    :attr:`fit_progress` is how far the last :func:`~pyro_lora.fit` on it got (``None`` for a guide no ``fit`` trained):
    ``{"step", "steps", "epoch", "epochs", "finished"}``, ``step`` of ``steps`` optimizer steps (``steps`` ``None`` for
    data without a length until it finishes), ``epoch`` from 0 as in ``FitState``; saved with the guide and read back
    by ``load_guide``, which warns of an unfinished one (a checkpoint of a run that stopped).
    """

    deterministic = False  # True for point estimates: the predictive then runs one forward, not S
    mean_is_predictor = True  # False where mean() predicts nothing of the posterior (an ensemble's averaged members)
    # False where the posterior is over something besides the sites (last-layer Laplace: the head), which samples of
    # the sites do not carry: predict() refuses the guide and names ``own_predictive``, the function that predicts it
    samples_carry_posterior = True
    own_predictive = None
    # True where the draws spread around a centre by a width that narrowing the posterior shrinks (a temperature,
    # sigma_q, std, prior precision); False where they are fixed points or masks of fixed weights (an ensemble's
    # members, MC dropout's column masks), which no width search narrows: a half-precision overflow under them is
    # the network's at those weights (pyro_lora.predictive.sampled_logits)
    samples_have_width = True
    # True where the posterior was fitted post hoc at the network's point parameters (the head) as they were (a
    # curvature, a search, collected iterates, IVON's jointly learnt stds, members' heads): training them under it
    # is refused (fit, a Pyro optimiser step), not a frozen guide's fixed q beside which a point B or a head trains
    fitted_at_head = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:  # every way in (guide(...), guide.forward) runs as a Pyro guide
            cls.forward = _as_pyro_guide(cls.__dict__["forward"])
        for name in _FLOAT32_METHODS:
            if name in cls.__dict__:
                setattr(cls, name, _in_float32(cls.__dict__[name]))
        _in_library_state(cls)
        register_guide(cls)  # load_guide builds registered classes only

    def __init__(self, model):
        super().__init__()
        check_model(model, f"build {type(self).__name__}")
        model.check_network()  # a network that no longer runs the model's adapter (set_adapter, delete_adapter) is said
        self._model = (model,)  # not a submodule: the network's weights are not the guide's
        self.sites = model.sites
        self.signature = describe(model)
        self._point_snapshot = point_snapshot(model)  # the head etc. its predictions rely on (ownership.take_over)
        watch_steps()
        self._loaded_head = None  # the point parameters load_guide restored with it (ownership.head_loaded)
        self._pyro_name = pyro_params.unique_name(self)
        self._running = False  # inside forward: a subclass's forward calling its base's is one guide call
        self._base_records = records_at_build(model)  # and at its last save or load: save_guide compares them
        self.fit_progress = None

    @property
    def model(self):
        return self._model[0]

    def __deepcopy__(self, memo):
        """``copy.deepcopy(guide)``: a guide with copies of the parameters, its own name in Pyro's param store, over the
        same model (a guide never owns the model: copying it would copy the network, which the copy would not fit).
        Every part of the network stays itself: an attribute referring to one of its modules (an ensemble's head layers,
        last-layer Laplace's head) must go on referring to the module the network runs, not to a copy it never calls."""
        net = self.model.net
        for x in (self._model, *net.modules(), *net.parameters(), *net.buffers()):
            memo.setdefault(id(x), x)
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        copied._pyro_name = pyro_params.unique_name(copied)  # the original's name holds the original's tensors
        return copied

    def __reduce_ex__(self, protocol):
        raise pickling_refused(self, "it refers to its model and network, which it does not own",
                               "save it with pyro_lora.save_guide(guide, path) and rebuild it with load_guide(path, model), "
                               "or copy it with copy.deepcopy(guide)")

    @_in_float32
    def posterior(self):
        """Site name -> ``q`` of that site, event shape ``site.shape``."""
        raise NotImplementedError

    def config(self):
        """Constructor keyword arguments (JSON-serialisable) that :func:`pyro_lora.load_guide` passes back."""
        return {}

    @_as_pyro_guide
    def forward(self, *args, kl_weight=1.0, **kwargs):
        """Pyro guide: one sample site per model site. ``kl_weight`` matches the model's KL annealing.

        Every call records the guide's parameters for Pyro's optimizers, and marks its sites with the guide, so that
        a model replayed against them (an ELBO) checks that the guide fits it."""
        posterior = self.posterior()
        with poutine.scale(scale=kl_weight):
            return {name: pyro.sample(name, posterior[name]) for name in self.sites}

    @_in_float32
    def sample(self, num_samples):
        """``num_samples`` draws of every site: name -> ``[S, *site.shape]`` (reparametrised where possible)."""
        num_samples = check_count(num_samples, "num_samples")
        return {name: _draw(d, num_samples) for name, d in self.posterior().items()}

    def draw_centres(self, index):
        """What draws ``index`` (``[n]`` sample indices of :meth:`sample`) spread around: ``None`` where it is
        :meth:`mean` for every draw; else site -> ``[n, *site.shape]``, draw ``s``'s own centre (a Laplace mixture:
        its component's member), run as an ``n``-sample forward (what per-member heads' hooks take)."""
        return None

    @_in_float32
    def mean(self):
        """Posterior mean of every site: name -> ``site.shape``."""
        return {name: d.mean for name, d in self.posterior().items()}

    def adopt_point_parameters(self):
        """Take the network's point parameters (a head, non-random LoRA matrices) as they are now as the ones this
        guide's predictions use: for a guide filled while another guide trains them (SWAG's iterates), so that a later
        change to them is refused. A guide trained by Pyro's ``SVI`` follows its steps by itself (under
        ``JitTrace_ELBO`` it cannot tell them from later ones: call this after the loop)."""
        stop_following(self.model)
        self._point_snapshot = point_snapshot(self.model)

    @contextlib.contextmanager
    def _all_or_nothing(self, adopt=False):
        """Put the guide's state (its parameters and buffers, its components', and the point parameters each was fitted
        at) back as it was where the block fails: a failed refit must not leave a guide half new, half old, that still
        predicts. ``adopt``: :meth:`adopt_point_parameters` first (a fit defines the posterior at the network as it is
        now)."""
        guides = [m for m in self.modules() if isinstance(m, LoraGuide)]  # self first, then a mixture's components
        saved = {n: t.clone() for n, t in self.state_dict().items()}
        # what the state dict does not hold: the point snapshot, and a Laplace's fingerprint of its examples (which
        # load_state_dict forgets, as of a fit loaded from elsewhere)
        snapshots = [(getattr(g, "_point_snapshot", None), getattr(g, "_rows", None)) for g in guides]
        if adopt:
            self.adopt_point_parameters()
        try:
            yield
        except BaseException:
            with torch.no_grad():
                self.load_state_dict(saved)
            for g, (snapshot, rows) in zip(guides, snapshots):
                g._point_snapshot, g._rows = snapshot, rows
            raise

    def carried_point_parameters(self) -> set:
        """Names of the network's point parameters whose values the guide carries itself (an ensemble's per-member
        heads): its predictions never read the network's, so a change to those is no change under it."""
        return set()

    def extra_parameters(self):
        """Number of parameters the guide adds beyond the point-estimate LoRA it describes."""
        return 0


def _draw(d, num_samples):
    return d.rsample((num_samples,)) if d.has_rsample else d.sample((num_samples,))


_in_library_state(LoraGuide)


class DensityDelta(dist.Delta):
    """A Delta site at a guide's draw whose ``log_density`` completes the guide's exact log-density of the draw, where
    the site's own family has none (the flow's ``W`` given its inducing ``U``, a mixture's draw given its component):
    the log-weights of ``Importance`` and ``RenyiELBO``. ``mean_field_log_density`` (default the same) is what
    ``TraceMeanField_ELBO``'s KL reads, which may hold a part in closed form: its mean over the draw."""

    def __init__(self, v, log_density, event_dim, mean_field_log_density=None):
        super().__init__(v, log_density, event_dim=event_dim)
        self.mean_field_log_density = self.log_density if mean_field_log_density is None else mean_field_log_density

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, self._get_checked_instance(DensityDelta, _instance))
        new.mean_field_log_density = self.mean_field_log_density.expand(batch_shape)
        return new


@register_kl(DensityDelta, dist.Distribution)
def _kl_density_delta(p, q):
    # TraceMeanField_ELBO, whose estimate averages over draws: the guide's log-density, a part of it maybe in closed
    # form, less the prior's (Pyro's Delta KL drops the Delta's own)
    return p.mean_field_log_density - q.log_prob(p.v)
