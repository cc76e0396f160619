"""SWAG: a low-rank plus diagonal Gaussian over the sites, collected from the SGD iterates of a MAP run.

Maddox et al. (2019), as the B-LoRA-XS posterior over the LoRA-XS cores ``R`` (seed method 003): during
the last epochs of training, a :class:`SWAGCollector` callback of :func:`pyro_lora.fit` hands the current
iterate ``theta_i`` (the MAP guide's value of every site) to :meth:`SWAGGuide.collect`, which keeps the
running mean, the running second moment and the last ``K`` deviations ``theta_i - mean_i``.
"""

import math
import warnings
import weakref

import torch

from pyro_lora import distributed
from pyro_lora.checks import check_count, check_positive
from pyro_lora.contract import check_guide
from pyro_lora.distributions import LowRankPlusDiagNormal
from pyro_lora.loraxs import LoraXSModel
from pyro_lora.sites import check_values
from pyro_lora.training import fit

from .base import LoraGuide
from .map import MAPGuide
from .registry import Fitted, method
from pyro_lora.callers import user_stacklevel


class SWAGGuide(LoraGuide):
    r"""SWAG posterior ``q(theta) = N(mean, scale (diag(sigma^2) + D D^T / (K' - 1)))`` over the model's sites.

    ``mean`` and ``sigma^2 = E[theta^2] - mean^2`` are the running moments of the collected iterates, the
    columns of ``D`` their last ``K' = min(n, rank)`` deviations from the running mean. Samples follow
    the SWAG reference code::

        theta = mean + sqrt(scale) * (sigma * z1 + D z2 / sqrt(K' - 1)),   z1 ~ N(0, I), z2 ~ N(0, I_K')

    ``scale=0.5`` is the paper's ``1/2 (Sigma_diag + Sigma_low-rank)``. ``D`` spans all sites jointly (one
    ``z2`` per sample for every site), so :meth:`sample`, which the predictive uses, draws the full joint
    Gaussian batched over sites and stacked layers. :meth:`posterior` gives each site's exact marginal; the
    Pyro guide path (``guide(batch)``: ``Trace_ELBO``, ``Predictive``) draws from those marginals, i.e.
    without the low-rank correlation *between* sites (within a stacked site, across its layers, it is kept).

    The moments are kept in float64, through ``guide.float()`` and any other cast: ``E[theta^2] - mean^2`` cancels
    catastrophically in float32 when the iterates barely move. At least two iterates must be collected before sampling.

    Example (B-LoRA-XS)::

        model = LoraXSModel(net, SequenceClassification(), num_data=len(train))
        map_guide, swag = MAPGuide(model), SWAGGuide(model, rank=10, scale=0.5)
        fit(model, map_guide, loader, epochs=5, lr=1e-3,
            callbacks=[SWAGCollector(swag, start_epoch=3, every=len(loader) // 5)])
        predict(model, swag, test_loader, num_samples=10)

    :param model: the :class:`~pyro_lora.LoraModel` whose sites the iterates cover.
    :param int rank: ``K``, the number of deviations kept (SWAG uses 5-20).
    :param float scale: the covariance multiplier (``0.5``: the paper's formula).
    :param float var_clamp: floor on ``sigma^2`` (entries that never moved would otherwise get variance 0).
    """

    fitted_at_head = True  # its moments were collected along the head's trajectory

    def __init__(self, model, rank=10, scale=0.5, var_clamp=1e-12):
        super().__init__(model)
        rank = check_count(rank, "rank", minimum=2, alternative="the low-rank part divides by K - 1")
        # an infinite floor made every sample inf (predict nan); True is a slip, not 1
        self.rank, self.scale, self.var_clamp = rank, check_positive(scale, "scale"), check_positive(var_clamp, "var_clamp")
        device = model.device
        self.register_buffer("num_collected", torch.zeros((), dtype=torch.long, device=device))
        for i, site in enumerate(self.sites.values()):
            self.register_buffer(f"mean_{i}", torch.zeros(site.shape, dtype=torch.float64, device=device))
            self.register_buffer(f"sq_mean_{i}", torch.zeros(site.shape, dtype=torch.float64, device=device))
            self.register_buffer(f"dev_{i}", torch.zeros((rank, *site.shape), device=device))

    def _apply(self, fn, recurse=True):
        # guide.float() / .half() would round the moments, and E[theta^2] - mean^2 of barely moving iterates cancels to
        # nothing in float32: they keep float64 through any cast, going only where a device move takes the rest
        moments = {n: b for n, b in self._buffers.items() if n.startswith(("mean_", "sq_mean_"))}
        super()._apply(fn, recurse)
        for n, b in moments.items():
            if self._buffers[n].dtype != torch.float64:  # kept where the cast kept it (to_empty's meta tensors hold none)
                self._buffers[n] = b.to(self._buffers[n].device)
        return self

    def _stats(self, i):
        return getattr(self, f"mean_{i}"), getattr(self, f"sq_mean_{i}"), getattr(self, f"dev_{i}")

    @torch.no_grad()
    def collect(self, values):
        """Add one iterate: ``values`` site -> ``site.shape`` (e.g. a MAP guide's ``mean()``).

        ``mean += (theta - mean) / n``, ``sq_mean += (theta^2 - sq_mean) / n``, and ``theta - mean`` (the updated
        mean) overwrites the oldest of the ``K`` stored deviations. The network's point parameters (a head) as
        they are now become the ones this guide predicts with (:meth:`adopt_point_parameters`).
        """
        values = {k: v.detach() for k, v in values.items()}
        check_values(self.sites, values, allow_sample_dim=False)
        n = int(self.num_collected) + 1
        slot = (n - 1) % self.rank
        for i, name in enumerate(self.sites):
            mean, sq_mean, dev = self._stats(i)
            theta = values[name].to(mean)
            mean += (theta - mean) / n
            sq_mean += (theta.pow(2) - sq_mean) / n
            dev[slot] = (theta - mean).to(dev)
        self.num_collected.fill_(n)
        self.adopt_point_parameters()

    def _check_collected(self, minimum=2):
        n = int(self.num_collected)
        if n < minimum:
            raise ValueError(
                f"SWAG has collected {n} iterate(s), needs at least {minimum}: pass SWAGCollector(guide, ...) "
                "to fit(..., callbacks=[...]) or call guide.collect(values)"
            )
        return min(n, self.rank)

    def moments(self):
        """Site -> ``(mean, variance)`` of the collected iterates (float64; variance floored at ``var_clamp``)."""
        self._check_collected(1)
        out = {}
        for i, name in enumerate(self.sites):
            mean, sq_mean, _ = self._stats(i)
            out[name] = (mean, (sq_mean - mean.pow(2)).clamp(min=self.var_clamp))
        return out

    def deviations(self):
        """Site -> ``[K', *site.shape]``: the stored deviations (the columns of ``D``) in slot order; iterate ``n``
        (from 1) sits in slot ``(n - 1) mod K``, so once more than ``K`` were collected the oldest is not first."""
        k = self._check_collected(1)
        return {name: self._stats(i)[2][:k] for i, name in enumerate(self.sites)}

    def _moved(self, deviations):
        """Refuse a posterior of iterates that never moved (every deviation 0: a run at ``lr=0``, or one iterate
        collected again and again): a point mass at them, MAP's predictions with a mutual information of 0, where the
        table would show a Bayesian method."""
        if not any(bool(d.any()) for d in deviations.values()):
            raise ValueError(f"SWAG collected {int(self.num_collected)} iterates that are all equal (every deviation is "
                             "0): its posterior would be a point mass at them, the MAP's predictions with a mutual "
                             "information of 0; collect from a run that trains (lr > 0, the iterates moving)")

    def posterior(self):
        """Site -> its exact SWAG marginal, a low-rank plus diagonal Gaussian with event shape ``site.shape``.

        :raises ValueError: for fewer than 2 iterates, or iterates that never moved.
        """
        k = self._check_collected()
        moments, deviations = self.moments(), self.deviations()
        self._moved(deviations)
        out = {}
        for name in self.sites:
            mean, var = moments[name]
            factor = deviations[name].movedim(0, -1) * math.sqrt(self.scale / (k - 1))  # [*shape, K']
            # float32 as the mean, whatever dtype the buffers hold (float64 after guide.double())
            out[name] = LowRankPlusDiagNormal(mean.float(), factor.float(), (self.scale * var).float(), event_dim=mean.dim())
        return out

    def sample(self, num_samples):
        """``theta_s = mean + sqrt(scale) (sigma z1_s + D z2_s / sqrt(K' - 1))``: name -> ``[S, *site.shape]``.

        One ``z2_s`` per sample is shared by all sites (the joint SWAG Gaussian); no loop over samples or layers.

        :raises ValueError: for fewer than 2 iterates, or iterates that never moved.
        """
        num_samples = check_count(num_samples, "num_samples")
        k = self._check_collected()
        moments, deviations = self.moments(), self.deviations()
        self._moved(deviations)
        device = self.num_collected.device
        z2 = torch.randn(num_samples, k, device=device)
        out = {}
        for name in self.sites:
            mean, var = moments[name]
            z1 = torch.randn(num_samples, *mean.shape, device=device)
            low = torch.tensordot(z2.to(deviations[name].dtype), deviations[name], dims=1) / math.sqrt(k - 1)  # float64 after guide.double()
            out[name] = mean.float() + math.sqrt(self.scale) * (var.sqrt().float() * z1 + low)
        return out

    def mean(self):
        """The SWA mean of the collected iterates."""
        return {name: m.float() for name, (m, _) in self.moments().items()}

    def extra_parameters(self):
        """The second moment and the ``K`` deviations, beyond the mean (the point estimate it describes)."""
        return (self.rank + 1) * sum(s.numel for s in self.sites.values())

    def config(self):
        return {"rank": self.rank, "scale": self.scale, "var_clamp": self.var_clamp}


class SWAGCollector:
    """A :func:`pyro_lora.fit` callback that hands the current iterate to :meth:`SWAGGuide.collect`.

    It collects after optimizer step ``step`` when ``step >= start_step``, the epoch (0-based) is
    ``>= start_epoch`` and ``step % every == 0``. With ``steps_per_epoch`` steps, collecting over the last
    ``E`` of ``epochs`` epochs ``c`` times per epoch is ``start_epoch=epochs - E, every=steps_per_epoch // c``.

    Once it has collected, the network's point parameters (a head trained beside the cores) *after every step*
    become the ones the SWAG guide predicts with, so it predicts with the head training ended on, also when the
    last step is not a collecting one. It also carries the fit's ``fit_progress``: a SWAG guide of a run stopped part
    way is saved and loaded as that run's checkpoint (with :func:`~pyro_lora.load_guide`'s warning), not as a result.

    :param swag: the :class:`SWAGGuide` to fill.
    :param source: the guide whose ``mean()`` is the iterate; default the guide being trained (``FitState.guide``).
    :raises ValueError: at the fit's first step, for a SWAG guide built on another model than ``source``'s that does
        not fit it, for a schedule that collects fewer than 2 iterates, and under
        ``torch.distributed`` on every rank, for a schedule (``start_step``, ``start_epoch``, ``every``), SWAG guide (its
        class, options, sizes, iterates already collected) or ``source`` class that differs across ranks.
    """

    def __init__(self, swag, start_step=0, start_epoch=0, every=1, source=None):
        if not isinstance(swag, SWAGGuide):  # else an AttributeError at the fit's first step
            raise ValueError(f"SWAGCollector needs the SWAGGuide to fill, got {type(swag).__name__} {swag!r}")
        every, start_step = check_count(every, "every"), check_count(start_step, "start_step", minimum=0)
        start_epoch = check_count(start_epoch, "start_epoch", minimum=0)
        self.swag, self.start_step, self.start_epoch, self.every, self.source = swag, start_step, start_epoch, every, source
        self._first_lr = None  # (step, learning rate) of the fit's first collected iterate
        self._lr_warned = False

    def __call__(self, state):
        last = getattr(self.swag, "_collected_step", None)
        # this step's iterate is in the guide already: a second collector on it, or this one called again through a
        # wrapper callback fit cannot see into (the step's FitState held weakly: an id reused never matches)
        again = last is not None and last[0]() is state and last[1] == state.step
        if state.step == 1 and not again:
            self._check_settings()
            self._check_schedule(state)
            self._check_source(self.source or state.guide)
            self._first_lr, self._lr_warned = None, False
            # the SWAG guide as this fit found it (its state, None where empty, and its point snapshot), which a run
            # that diverges or a second collector leaves; kept on the guide, where any collector of this fit finds it
            saved = {n: t.to("cpu", copy=True) for n, t in self.swag.state_dict().items()} \
                if int(self.swag.num_collected) else None
            self.swag._fit_start = (saved, self.swag._point_snapshot, self.swag.fit_progress)
        # a step float16's loss scaler skipped left the weights as they were: no new iterate
        if not state.skipped and state.step >= self.start_step and state.epoch >= self.start_epoch \
                and state.step % self.every == 0:
            source = self.source or state.guide
            check_guide(self.swag.model, source, "collect SWAG iterates")
            if again:
                taken, held = self._restore(self.swag._fit_start)
                raise ValueError(f"SWAGCollector: the SWAG guide already collected the iterate of step {state.step} of "
                                 "this fit (a second collector on it, or one called twice per step through another "
                                 "callback): it would count every iterate twice; give each SWAG guide one collector, "
                                 f"listed once (the {taken} iterate(s) this fit collected were taken back out: the "
                                 f"guide holds the {held} it held before it)")
            self.swag._collected_step = (weakref.ref(state), state.step)
            self.swag.collect(source.mean())
            self._check_constant_lr(state)
        elif int(self.swag.num_collected) and not state.skipped:
            self.swag.adopt_point_parameters()
        if int(self.swag.num_collected):
            # the fit's own record of this step (the dict fit marks finished at its end): a SWAG guide of a run
            # stopped part way saved and loaded as a result, without the warning its trained guide's checkpoint gives
            self.swag.fit_progress = state.guide.fit_progress

    def on_divergence(self):
        """Called by :func:`pyro_lora.fit` when the run raises :class:`~pyro_lora.training.DivergenceError` (or a
        half-precision overflow, another ``FloatingPointError``): put the SWAG
        guide back as the run found it, as iterates of a diverged run (weights the run itself judged wrong, the last
        ones before the judgement too) would stay in its mean and covariance; returns the note added to the error."""
        taken, held = self._restore(self.swag._fit_start)
        return (f"SWAGCollector: the {taken} iterate(s) collected in the diverged run were taken back out of the SWAG "
                f"guide, which holds the {held} it held before the run")

    def _restore(self, before):
        """Put the SWAG guide back to ``before`` (its state, or None where it was empty, and its point snapshot);
        returns (the iterates taken out, those it holds)."""
        state, snapshot, progress = before
        held = 0 if state is None else int(state["num_collected"])
        taken = int(self.swag.num_collected) - held
        with torch.no_grad():
            if state is None:
                for buffer in self.swag.buffers():
                    buffer.zero_()
            else:
                self.swag.load_state_dict(state)
        self.swag._point_snapshot = snapshot
        self.swag.fit_progress = progress
        return taken, held

    def _check_source(self, source):
        """At a fit's first step: refuse a SWAG guide built on another model than ``source``'s where ``source`` does not
        fit it (found at the first collection otherwise, after training up to it, blaming ``source``)."""
        if self.swag.model is source.model:
            return
        try:
            check_guide(self.swag.model, source, "collect SWAG iterates")
        except ValueError as error:
            raise ValueError(f"SWAGCollector: the SWAG guide was built on another model than the {type(source).__name__} "
                             f"it collects from, which does not fit it ({error}): build the SWAGGuide on the model this "
                             "fit trains") from None

    def _check_constant_lr(self, state):
        """Warn, once per fit, where the learning rate changes between collected iterates (a decaying schedule, or a
        warmup, over the collection): SWAG's covariance is of iterates at one constant rate, and a rate decaying
        towards 0 shrinks their spread, so the posterior comes out narrower than SWAG's without a word."""
        lr = getattr(state, "lr", None)  # a loop of the user's own may hand a state without it
        if lr is None or self._lr_warned:
            return
        if self._first_lr is None:
            self._first_lr = (state.step, lr)
        elif not math.isclose(lr, self._first_lr[1], rel_tol=1e-6):
            first_step, first_lr = self._first_lr
            warnings.warn(f"SWAGCollector: the learning rate changed while it collected ({first_lr:.3g} at step "
                          f"{first_step}, {lr:.3g} at step {state.step}): SWAG assumes a constant rate while it "
                          "collects, and a decaying one shrinks the iterates' spread (the posterior); use "
                          "lr_schedule='constant' with any warmup ending before the collection starts",
                          stacklevel=user_stacklevel())
            self._lr_warned = True  # said once per fit

    def _check_settings(self):
        """Under ``torch.distributed``, at a fit's first step (every rank runs its callbacks, of classes ``fit`` compared):
        refuse on every rank a schedule or SWAG guide that differs across ranks, each rank collecting other iterates
        into a guide of other options or sizes (found only at predict, after the whole fit, or never)."""
        swag = {f"SWAG guide's {k}": v for k, v in {"class": type(self.swag).__name__, **self.swag.config()}.items()}
        swag["SWAG guide's tensor shapes"] = [tuple(t.shape) for t in [*self.swag.parameters(), *self.swag.buffers()]]
        distributed.check_settings("SWAG collection", {
            "start_step": self.start_step, "start_epoch": self.start_epoch, "every": self.every,
            "SWAG guide's iterates collected": int(self.swag.num_collected), **swag,
            "source": None if self.source is None else type(self.source).__name__})


    def _check_schedule(self, state):
        """At a fit's first step: refuse a schedule that collects fewer than the 2 iterates SWAG needs by its end
        (a start past the run's last epoch was found out at predict time, after the whole fit). Over data without a
        length the run's steps are unknown: a start past its last epoch is refused, and a schedule that may collect
        fewer is warned of (each epoch gives one step or more, so every=1 from the start epoch on collects one an
        epoch or more)."""
        me = f"SWAGCollector(start_step={self.start_step}, start_epoch={self.start_epoch}, every={self.every})"
        collected = int(self.swag.num_collected)
        if state.steps_per_epoch is None and self.start_epoch < state.epochs:
            least = state.epochs - self.start_epoch if self.every == 1 and self.start_step <= self.start_epoch + 1 else 0
            if least + collected < 2:
                warnings.warn(f"{me}: over data without a length fit cannot tell how many iterates this schedule collects "
                              "by the run's end, and SWAG needs at least 2 (SWAGGuide refuses to sample from fewer); "
                              "check swag.num_collected after fit, or give data with a length", stacklevel=user_stacklevel())
            return
        if state.steps_per_epoch is None:  # starts past the last epoch
            count, run = 0, f"{state.epochs} epoch(s)"
        else:
            total = state.steps_per_epoch * state.epochs
            first = max(self.start_step, self.start_epoch * state.steps_per_epoch + 1, 1)
            count = max(0, total // self.every - (first - 1) // self.every)
            run = f"{state.epochs} epoch(s) x {state.steps_per_epoch} steps"
        if count + collected < 2:
            raise ValueError(f"{me} collects {count} iterate(s) in this fit of {run}, and SWAG needs at least 2: start "
                             "earlier or collect more often (swag_schedule gives both)")


def swag_schedule(epochs: int, steps_per_epoch: int, per_epoch: int) -> tuple[int, int]:
    """``(start_epoch, every)`` of a :class:`SWAGCollector` collecting ``per_epoch`` times an epoch over the last half of
    ``epochs`` (at least one epoch), widened to earlier epochs where that collects fewer than 2 iterates (a short run:
    one batch an epoch failed after its whole fit), and then to every run's ``steps // 2``-th step (a short epoch
    collected once).

    :raises ValueError: where the whole run collects fewer than 2 iterates, naming the flags that give more steps.
    """
    every = max(1, steps_per_epoch // per_epoch)
    for last in range(max(1, epochs // 2), epochs + 1):
        first = (epochs - last) * steps_per_epoch + 1  # fit's steps count from 1 over the whole run
        if sum(s % every == 0 for s in range(first, epochs * steps_per_epoch + 1)) >= 2:
            return epochs - last, every
    if epochs * steps_per_epoch >= 2:  # every epoch and still fewer: collect more often (steps // every >= 2)
        return 0, epochs * steps_per_epoch // 2
    raise ValueError(f"SWAG needs at least 2 iterates, and the run takes {epochs * steps_per_epoch} optimizer step(s) "
                     f"({epochs} epoch(s) of {steps_per_epoch} batch(es)): raise --epochs or --train-size, or lower "
                     "--batch-size")


# LoRA-XS cores start at zero and Adam moves them about one lr per step: they need ~10x LoRA's lr
LORA_XS_LR_FACTOR = 10.0


@method("blora_xs", bayesian=True, guide=SWAGGuide, model=LoraXSModel, trains=True)
def blora_xs(setup, rank=10, scale=0.5, per_epoch=10):
    """B-LoRA-XS: LoRA-XS cores R (A, B from the SVD of W0) trained from zero, SWAG over the last half of training.

    (Marszałek et al., 2025, "Minimal Ranks, Maximum Confidence: Parameter-efficient Uncertainty Quantification
    for LoRA"; SWAG: Maddox et al., 2019.)
    """
    c = setup.config
    loader = setup.loader(setup.train, shuffle=True)
    # fit steps through this rank's block of the batches under torch.distributed (len // W of them)
    start_epoch, every = swag_schedule(c.epochs, len(loader) // distributed.world_size(), per_epoch)  # before the fit
    setup.restore()  # the head warm-starts from the MAP's trained one (IVON's from the initial one); the cores from zero
    # the MAP's LoRA, which the SVD replaces here, stays in the setup for the methods after this one
    model = LoraXSModel(setup.net, setup.likelihood, num_data=len(setup.train), prior=c.prior_scale,
                        replace_trained=True)
    map_guide, swag = MAPGuide(model), SWAGGuide(model, rank=rank, scale=scale)
    collector = SWAGCollector(swag, start_epoch=start_epoch, every=every)
    fit(model, map_guide, loader, epochs=c.epochs, lr=LORA_XS_LR_FACTOR * c.lr, progress=c.progress, callbacks=[collector])
    return Fitted(guide=swag, extra_parameters=swag.extra_parameters())
