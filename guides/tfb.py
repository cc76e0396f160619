"""TFB: training-free Bayesianization of a trained LoRA (seed method 000).

From a trained pair ``(B, A)`` of every LoRA layer, with the SVD ``B = U diag(d) V^T``: ``B' = U diag(d)``
(a point estimate) and ``A' = V^T A``, so ``B' A' = B A``; the posterior over ``A'`` is
``N(A', Omega^2)`` with ``Omega_ij = sigma_q / d_i``. The weight noise ``s B' (A'_sample - A') = s U Z``,
``Z_ij ~ N(0, sigma_q^2)`` iid, is then isotropic inside the column space of ``B``. The SVD's signs are made canonical
(:func:`_decompose`), so one ``B A`` gives one ``A'`` and the same draws however its factors are stored. One scalar
``sigma_q`` for all layers is chosen by bisection on an anchor set (:meth:`TFBGuide.search`).
"""

import math
import warnings

import pyro.distributions as dist
import torch
from tqdm.auto import tqdm

from pyro_lora import distributed
from pyro_lora.callers import user_stacklevel
from pyro_lora.checks import check_count, check_data_given, check_flag, check_nonnegative, check_positive, known_length
from pyro_lora.contract import check_guide, check_model, describe, differences, entry_checks
from pyro_lora.data import check_every_example, subset, to_device
from pyro_lora.likelihoods import check_label_range
from pyro_lora.loraxs import svd_flip
from pyro_lora.sites import check_values
from pyro_lora.modes import eval_mode
from pyro_lora.predictive import NonFinitePredictionError, sampled_logits

from .base import LoraGuide
from .registry import Fitted, method
from .tuning import OVERFLOW_MARGIN, margin_factor, near_overflow, tune_on_validation

CRITERIA = ("nll", "flip", "accuracy")
DEFAULT_TOLERANCE = {"nll": 0.01, "flip": 0.01, "accuracy": 0.01}
FROM_GUIDE_ACTION = "build a TFB guide"
_METRIC_NAMES = {"nll": "pseudo-label NLL rel. change", "flip": "flip rate", "accuracy": "accuracy drop"}


# TFB's reference range [1e-3, 1.5e-2] was set for 8B models; small models tolerate more noise. The flip criterion:
# on an over-confident MAP the pseudo-label NLL is near zero, so its relative change blocks any noise. 512 anchors:
# on 128 a few borderline training examples flip at the smallest noise and stop the search near 0. The range spans
# 200x, so the bisection runs in log sigma_q: linear steps resolve only 0.0124, and on ARC-Easy (SmolLM2) every
# linear midpoint flipped more than 1%, leaving sigma_q at the low end; 5 log steps resolve it to 18%. num_samples and
# seed are compare's and bayesianize's defaults (--samples 4, --seed 0), which they search with: the search scores a
# predictive of as many samples as the one they report (on its own draws), so the run's --samples and --seed replace them there.
TFB_SEARCH = dict(criterion="flip", tolerance=0.01, low=1e-3, high=0.2, iterations=5, spacing="log", num_samples=4, seed=0)
SPACINGS = ("log", "linear")
TFB_ANCHORS = 512


class TFBGuide(LoraGuide):
    r"""Training-free Bayesian LoRA: ``q(B') = delta(U diag(d))``, ``q(A') = N(V^T A, Omega^2)``, ``Omega_ij = sigma_q / d_i``.

    The SVD is batched over the stacked layer dim of each site pair (``A: [L, r, d_in]``,
    ``B: [L, d_out, r]``). Singular values below ``min_singular_ratio`` times the largest of their
    layer are floored to that value in ``Omega`` only (``B'`` keeps them, so ``B'A' = BA`` still holds):
    those directions get less than the isotropic noise instead of a division blow-up. A layer whose
    ``B`` is entirely zero (an untrained adapter) gets no weight noise. Both cases warn, naming the layers.

    Example::

        model = LoraModel(net, SequenceClassification(), random="AB")   # net holds the trained adapter
        guide = TFBGuide(model)                 # or TFBGuide.from_guide(model, trained_guide)
        guide.search(anchor_loader)             # TFB_SEARCH: compare's and pyro-lora bayesianize's defaults
        predict(model, guide, test_loader, num_samples=10)

    :param model: a :class:`~pyro_lora.LoraModel` whose random sites pair every ``A`` site with a
        ``B`` site over the same layers (``random="AB"``).
    :param dict init: site -> trained value (``site.shape``), e.g. a MAP guide's ``mean()``; sites left
        out are read from the adapter (``model.adapter_values()``). Default: the adapter itself.
    :param float sigma_q: initial noise scale (0: the guide is the point estimate).
    :param float min_singular_ratio: relative floor (in ``(0, 1)``) on the singular values used in ``Omega``.
    :param str criterion: the last search's criterion; with ``tolerance``, ``trace`` (a list of dicts) and
        ``search_edge`` (what it warned of, where it ended at an end of its range) and ``search_anchors`` (its warning
        of too few anchors for its tolerance) it is what :meth:`config` saves and
        :func:`pyro_lora.load_guide` restores.
    :param bool decompose: ``False`` builds zero buffers of the final shapes without an SVD, for
        ``load_state_dict`` (what :func:`pyro_lora.load_guide` uses).
    """

    fitted_at_head = True  # its sigma_q was searched (and its centre taken) beside the head as it was

    def __init__(self, model, init=None, sigma_q=0.0, min_singular_ratio=1e-3, criterion=None, tolerance=None, trace=None,
                 decompose=True, search_edge=None, search_anchors=None):
        super().__init__(model)
        ratio = check_positive(min_singular_ratio, "min_singular_ratio")  # a string or a bool refused there
        if ratio >= 1:
            raise ValueError(f"min_singular_ratio must be in (0, 1), got {min_singular_ratio!r}")
        if criterion not in (None, *_METRIC_NAMES, "val_nll"):  # how sigma_q was chosen, saved with the guide
            raise ValueError(f"criterion must be None, 'val_nll' or one of {sorted(_METRIC_NAMES)}, got {criterion!r}")
        self.pairs = _pair_sites(model.sites)
        self.min_singular_ratio = ratio
        self.criterion = criterion
        self.tolerance = None if tolerance is None else check_nonnegative(tolerance, "tolerance")
        if trace is not None and not (isinstance(trace, (list, tuple)) and all(isinstance(s, dict) for s in trace)):
            raise ValueError(f"trace must be a list of the search's dicts (as TFBGuide.search returns), got {trace!r}")
        # a saved guide's JSON writes an overflowed candidate's metric (inf) as null: read back as the inf it was
        self.trace = [{**s, "metric": math.inf} if "metric" in s and s["metric"] is None else dict(s) for s in trace or []]
        self.search_edge = search_edge  # what the last search warned of, if it ended at an end of its range
        self.search_anchors = search_anchors  # its warning of too few anchors for its tolerance, if it gave one
        self.register_buffer("sigma_q", torch.zeros((), device=model.device))
        self.set_sigma_q(sigma_q)
        device = model.device
        if not check_flag(decompose, "decompose"):
            for i, (a, b) in enumerate(self.pairs):
                shape_a, shape_b = self.sites[a].shape, self.sites[b].shape
                self.register_buffer(f"a_prime_{i}", torch.zeros(shape_a, device=device))
                self.register_buffer(f"b_prime_{i}", torch.zeros(shape_b, device=device))
                self.register_buffer(f"scale_{i}", torch.ones(shape_a[:-1], device=device))
            return
        init = dict(init or {})
        unknown = sorted(set(init) - set(self.sites))
        if unknown:
            raise ValueError(f"init has unknown site(s) {unknown}; the model's sites are {list(self.sites)}")
        # the adapter only for the sites init leaves out: a trained guide's full mean is no stale adapter's
        values = {k: torch.as_tensor(v).detach().to(device, torch.float32) for k, v in init.items()}
        if set(init) != set(self.sites):
            values = model.adapter_values(given=values)
        check_values(self.sites, values, allow_sample_dim=False)
        flagged = {"small": [], "zero": []}
        for i, (a, b) in enumerate(self.pairs):
            a_prime, b_prime, scale, small, zero = _decompose(values[a], values[b], self.min_singular_ratio)
            self.register_buffer(f"a_prime_{i}", a_prime)
            self.register_buffer(f"b_prime_{i}", b_prime)
            self.register_buffer(f"scale_{i}", scale)
            layers = self.sites[a].layers
            flagged["small"] += [layers[j] for j in small.reshape(-1).nonzero().flatten().tolist()]
            flagged["zero"] += [layers[j] for j in zero.reshape(-1).nonzero().flatten().tolist()]
        if flagged["small"] or flagged["zero"]:
            warnings.warn(_singular_warning(flagged, self.min_singular_ratio), stacklevel=user_stacklevel())

    @classmethod
    def from_guide(cls, model, guide, **kwargs):
        """Bayesianize the posterior mean of a trained ``guide`` (MAP, mean-field, ...).

        ``guide`` may cover fewer sites than ``model`` (a BLoB-style guide with only ``A`` random): the
        other sites are read from the adapter, where such a guide's point-estimate ``B`` was trained.

        :raises ValueError: as :func:`pyro_lora.predict` would, if ``guide`` was built for a model unlike
            ``model`` (:func:`~pyro_lora.contract.check_guide`: other sites, LoRA scaling, adapter, base
            weights or head; only sites of ``model`` that the guide lacks are allowed), or if its mean is no
            trained adapter (an ensemble's averaged members, ``guide.mean_is_predictor`` false).
        """
        _check_source(model, guide, FROM_GUIDE_ACTION)
        if not guide.deterministic and not getattr(guide, "mean_is_predictor", True):
            raise ValueError(
                f"cannot {FROM_GUIDE_ACTION} from a {type(guide).__name__}: its mean() is no trained adapter (an "
                "ensemble's mean averages separately trained members' weights); bayesianize one member "
                "(write it into the adapter and use TFBGuide(model)) or predict the ensemble itself"
            )
        mean = {k: v.detach() for k, v in guide.mean().items()}
        return cls(model, init=mean, **kwargs)

    @property
    def deterministic(self):
        return float(self.sigma_q) == 0.0  # sigma_q = 0: the predictive runs one forward

    def set_sigma_q(self, value):
        """Set the noise scale ``sigma_q >= 0`` (one scalar for all layers).

        :raises ValueError: for a negative value, or a positive one below float32's smallest normal number (the
            buffer's dtype would store it as 0, the point estimate, or with lost digits) or above its largest.
        """
        value = check_nonnegative(value, "sigma_q")  # True or "0.1" is a slip, not a scale
        if value:
            _check_float32_scale(value, "sigma_q")
        self.sigma_q.fill_(value)

    def config(self):
        return {
            "min_singular_ratio": self.min_singular_ratio,
            "criterion": self.criterion,
            "tolerance": self.tolerance,
            "trace": self.trace,
            "search_edge": self.search_edge,
            "search_anchors": self.search_anchors,
            "decompose": False,
        }

    def extra_parameters(self):
        return 1  # sigma_q

    def _pair(self, i):
        return getattr(self, f"a_prime_{i}"), getattr(self, f"b_prime_{i}"), getattr(self, f"scale_{i}")

    def posterior(self):
        """``B'``: Delta; ``A'``: ``Normal(A', sigma_q / d_i)`` over the site's event (a Delta at ``sigma_q = 0``)."""
        out = {}
        for i, (a, b) in enumerate(self.pairs):
            a_prime, b_prime, scale = self._pair(i)
            out[b] = dist.Delta(b_prime, event_dim=b_prime.dim())
            if self.deterministic:
                out[a] = dist.Delta(a_prime, event_dim=a_prime.dim())
            else:
                omega = (self.sigma_q / scale).unsqueeze(-1).expand_as(a_prime)
                out[a] = dist.Normal(a_prime, omega).to_event(a_prime.dim())
        return {name: out[name] for name in self.sites}

    def sample(self, num_samples, generator=None, sigma_q=None):
        """``num_samples`` draws: ``A'_s = A' + (sigma_q / d) * eps``, ``eps ~ N(0, 1)``; ``B'`` expanded.

        :param torch.Generator generator: RNG on the model's device (default: the global one). The same
            seeded generator gives the same ``eps`` for any ``sigma_q`` (common random numbers).
        :param float sigma_q: override the guide's ``sigma_q`` for this draw.
        :returns: site -> ``[S, *site.shape]``.
        """
        num_samples = check_count(num_samples, "num_samples")
        if sigma_q is not None and check_nonnegative(sigma_q, "sigma_q"):
            _check_float32_scale(sigma_q, "sigma_q")
        sigma = self.sigma_q if sigma_q is None else torch.as_tensor(float(sigma_q), device=self.sigma_q.device)
        out = {}
        for i, (a, b) in enumerate(self.pairs):
            a_prime, b_prime, scale = self._pair(i)
            eps = torch.randn((num_samples, *a_prime.shape), generator=generator, device=a_prime.device, dtype=a_prime.dtype)
            out[a] = a_prime + (sigma / scale).unsqueeze(-1) * eps
            out[b] = b_prime.expand(num_samples, *b_prime.shape)
        return out

    def mean(self):
        out = {}
        for i, (a, b) in enumerate(self.pairs):
            out[a], out[b], _ = self._pair(i)
        return out

    def search(self, anchors, criterion=TFB_SEARCH["criterion"], tolerance=TFB_SEARCH["tolerance"], low=TFB_SEARCH["low"],
               high=TFB_SEARCH["high"], iterations=TFB_SEARCH["iterations"], num_samples=TFB_SEARCH["num_samples"],
               seed=TFB_SEARCH["seed"], progress=True, spacing=TFB_SEARCH["spacing"]):
        """Set ``sigma_q`` to the largest feasible value found by bisection on ``[low, high]``; return the trace.

        A candidate ``sigma`` is feasible when ``metric(sigma) <= tolerance``, measured on the anchors
        against the ``sigma = 0`` predictions, with the ``num_samples``-sample predictive (mean of the
        softmax over samples, all samples in one batched forward):

        - ``"nll"``: relative change of the NLL of the ``sigma = 0`` predicted labels (pseudo-labels),
          ``(NLL_sigma - NLL_0) / NLL_0``;
        - ``"flip"``: fraction of anchors whose predicted label differs from the ``sigma = 0`` one;
        - ``"accuracy"``: drop in labelled accuracy, ``acc_0 - acc_sigma`` (needs ``labels``).

        ``high`` is tried first (feasible: ``sigma_q = high``, with a warning to raise ``high``), then
        ``low`` (infeasible: ``sigma_q = 0``, the point estimate, with a warning to lower ``low``: ``0`` is
        the only value known to be feasible); otherwise ``iterations`` bisection steps keep a
        feasible lower and an infeasible upper end, and ``sigma_q`` becomes the lower one, so the next grid
        point up is in the trace as infeasible: ``sigma_q * (high / low) ** (1 / 2**iterations)`` with
        ``spacing="log"`` (midpoints ``sqrt(lo * hi)``), ``sigma_q + (high - low) / 2**iterations`` with
        ``"linear"`` (TFB's own search, for its narrow reference range). The reference TFB code returns the
        last violating midpoint instead. Every candidate uses the same
        noise ``eps`` (generator seeded with ``seed``), so the search is deterministic and the metric
        varies smoothly with ``sigma``. Cost: ``iterations + 3`` passes over the anchors, ``num_samples``
        forward rows per anchor for each candidate; under ``"flip"``, a candidate stops once its flips pass the
        tolerance (flips only add up: it is infeasible), so most infeasible candidates cost a few batches.

        :param anchors: iterable of batches with the likelihood's inputs (``labels`` for ``"accuracy"``),
            e.g. a loader over a few hundred training examples; it is read once and kept, so a shuffling
            loader is fine. Likelihoods must give class logits ``[B, C]`` (not token-level ``CausalLM``).
        The defaults, :data:`TFB_SEARCH`, are those of ``pyro-lora compare`` and ``pyro-lora bayesianize``
        (the flip rate at 1% on ``[1e-3, 0.2]``, 5 bisection steps in log space, 4 samples, seed 0; those two search
        with their run's ``--samples`` and seed, drawing 512 anchors from the training split under that seed); TFB's
        reference settings for 8B models are ``criterion="nll", low=1e-3, high=1.5e-2, spacing="linear"``.

        :param tolerance: ``None``: 0.01, the default of every criterion.
        A candidate whose noise overflows the logits is infeasible (metric inf); one within a factor 2 of such a
        ``sigma`` (4 in the noise's variance, :data:`~pyro_lora.guides.tuning.OVERFLOW_MARGIN`) is refused unscored,
        and where anything overflowed the ``sigma_q`` found is checked for an overflow on a second set of draws
        (``seed + 1``), stepping down to the largest feasible candidate clear of that margin where it is not (a
        warning says so): a value next to an overflow overflows on other draws, e.g. ``predict``'s.

        :returns: the trace, a list of ``{"sigma", "metric", "feasible", "anchors"}`` in evaluation order
            (``anchors``: how many were scored; a flip rate that stopped early is the rate over the whole anchor set
            of the flips so far, a lower bound; ``"near_overflow": True`` on a candidate refused unscored for the
            margin), also kept in ``self.trace``, with ``criterion`` and ``tolerance``, and saved by
            :func:`pyro_lora.save_guide`.
        :raises ValueError: for settings that differ across ranks (under ``torch.distributed``, on every rank, first),
            and as :func:`check_search` and :func:`pyro_lora.predict` refuse.
        """
        settings = {"criterion": criterion, "tolerance": tolerance, "low": low, "high": high, "iterations": iterations,
                    "num_samples": num_samples, "seed": seed, "spacing": spacing}
        with entry_checks(self.model, self, "search sigma_q", settings=settings):
            tolerance = check_search(criterion, tolerance, low, high, iterations, spacing)
            check_count(num_samples, "num_samples")
            seed = check_count(seed, "seed", minimum=0)  # torch.manual_seed's message came after the sigma = 0 pass
            check_guide(self.model, self, "search sigma_q")  # a head changed since: the search would score another network
            check_every_example(anchors, "TFBGuide.search")  # the flip rate's denominator is the whole anchor set
            if known_length(anchors) == 0:  # one without a length (a loader over an IterableDataset) is read below
                raise ValueError("search got no anchor batches: the anchor set is empty")
        # under torch.distributed each rank scores its block of anchors (a shuffling loader's as rank 0 draws it);
        # sums are all-reduced, so every rank sees the same metric and takes the same bisection steps
        batches = list(distributed.split_batches(anchors))
        if not batches and not distributed.is_distributed():  # an iterable without a length
            raise ValueError("search got no anchor batches: the anchor set is empty")
        progress = progress and distributed.is_main()
        trace = []
        bar = tqdm(total=iterations + 2, desc="TFB sigma_q search", disable=not progress, dynamic_ncols=True)

        overflowed = []  # candidates whose noise overflowed the logits

        def evaluate(sigma):
            if near_overflow(sigma, overflowed, margin_factor(2)):  # at the edge of overflowing: refused unscored
                step = {"sigma": float(sigma), "metric": math.inf, "feasible": False, "anchors": 0, "near_overflow": True}
                trace.append(step)
                bar.update()
                return False
            metric, scored = self._metric(batches, reference, criterion, sigma, int(num_samples), seed, tolerance)
            if metric == math.inf:
                overflowed.append(float(sigma))
            step = {"sigma": float(sigma), "metric": metric, "feasible": metric <= tolerance, "anchors": scored}
            trace.append(step)
            bar.update()
            if progress:
                verdict = "feasible" if step["feasible"] else "infeasible"
                early = f" after {scored} of {reference['count']} anchors" if scored < reference["count"] else ""
                bar.write(f"TFB step {len(trace)}: sigma_q={sigma:.6g}  {_METRIC_NAMES[criterion]}={metric:+.4g} (tolerance "
                          f"{tolerance:.4g})  {verdict}{early}")
            return step["feasible"]

        try:
            with torch.no_grad(), eval_mode(self.model.net):  # no dropout: the only randomness is the weight noise
                reference = self._reference(batches, criterion)
                few = None
                if criterion != "nll" and 0 < reference["count"] * tolerance < 1:  # 0: no change asked for
                    few = _few_anchors(criterion, tolerance, int(reference["count"]))
                    warnings.warn(f"TFB search: {few}", stacklevel=user_stacklevel())
                if evaluate(high):
                    best, edge = high, f"high={high:g} is already feasible: sigma_q = high; raise `high` to search further"
                elif not evaluate(low):
                    best, edge = 0.0, _infeasible_low(low, trace[-1], overflowed)
                else:
                    lo, hi, edge = low, high, None
                    for _ in range(int(iterations)):
                        mid = math.sqrt(lo * hi) if spacing == "log" else (lo + hi) / 2
                        lo, hi = (mid, hi) if evaluate(mid) else (lo, mid)
                    best = lo
                # keep the margin from every overflow, the chosen value's on other draws included (a low refused
                # for it, the search's last step, said so already)
                if overflowed and (best > 0 or not trace[-1].get("near_overflow")):
                    best, margin = self._clear_of_overflow(best, trace, overflowed, batches, reference, criterion,
                                                           int(num_samples), seed)
                    edge = "; ".join(filter(None, [edge, margin]))
        finally:
            bar.close()
        if edge:
            warnings.warn(f"TFB search: {edge}", stacklevel=user_stacklevel())
        self.set_sigma_q(best)
        self.criterion, self.tolerance, self.trace, self.search_edge, self.search_anchors = criterion, tolerance, trace, edge, few
        if progress:
            refused = next(s for s in reversed(trace) if s["sigma"] == hi).get("near_overflow") if not edge else False
            note = edge or f"largest feasible; next grid point up {hi:.6g} is " + (
                "within the overflow margin, unscored" if refused else "infeasible")
            tqdm.write(f"TFB search: sigma_q = {best:.6g} after {len(trace)} candidates ({note})")
        return trace

    def _clear_of_overflow(self, best, trace, overflowed, batches, reference, criterion, num_samples, seed):
        """``(sigma_q, note)``: the largest feasible ``sigma`` of ``trace`` clear of the margin of ``overflowed``
        (:func:`~pyro_lora.guides.tuning.near_overflow`; ``best`` where it is), once the anchors' logits under a
        second, independent draw at it (seed ``seed + 1``) are finite too (else it joins ``overflowed``, and the next
        one down is checked); 0 where none is left. The note says so, for the search's warning."""
        seen, factor = min(overflowed), margin_factor(2)  # sigma_q scales the noise's std
        while best > 0:
            if near_overflow(best, overflowed, factor):
                best = max((s["sigma"] for s in trace if s["feasible"] and s["sigma"] < best
                            and not near_overflow(s["sigma"], overflowed, factor)), default=0.0)
                continue
            metric, _ = self._metric(batches, reference, criterion, best, num_samples, seed + 1, math.inf)
            if metric < math.inf:
                break
            overflowed.append(best)
        return best, (f"the noise overflowed the logits at sigma_q = {seen:g}: a sigma_q within a factor "
                      f"{OVERFLOW_MARGIN:g} in variance ({factor:g} in sigma_q) of such a one, or overflowing on a "
                      f"second set of draws, is refused as at the edge of overflowing; sigma_q = {best:g}"
                      + (" (the point estimate)" if best == 0 else ", finite on a second set of draws too"))

    @property
    def search_note(self):
        """``"TFB search: <what it warned of>"`` where the last search had too few anchors for its tolerance or ended
        at an end of its range (the row's note, so a table read later says it), else None."""
        said = "; ".join(filter(None, [self.search_anchors, self.search_edge]))
        return f"TFB search: {said}" if said else None

    def _logits(self, batch, values=None, num_samples=None):
        """The anchors' logits at the mean (``values`` None) or under the weight samples ``values``: a half-precision
        overflow there that the mean runs without is :class:`~pyro_lora.predictive.NonFinitePredictionError`, the
        noise's (:func:`~pyro_lora.predictive.sampled_logits`)."""
        batch = to_device(batch, self.model.device)
        if values is None:
            logits = self.model.logits(batch, self.mean())
        else:
            logits = sampled_logits(self.model, self, batch, values, num_samples, who="TFB search")
        if logits.dim() != (2 if num_samples is None else 3):
            raise ValueError(
                f"TFB search needs per-example class logits [B, C]; {type(self.model.likelihood).__name__} gave shape "
                f"{tuple(logits.shape)} (use SequenceClassification or MultipleChoice)"
            )
        return logits.float()

    def _reference(self, batches, criterion):
        """The ``sigma = 0`` predictions: pseudo-labels per batch, and the anchors' summed NLL or count correct."""
        labels, total, count = [], 0.0, 0
        for batch in batches:
            logp = torch.log_softmax(self._logits(batch), -1)
            y0 = logp.argmax(-1)
            labels.append(y0)
            count += y0.numel()
            if criterion == "nll":
                total += -logp.gather(-1, y0[:, None]).sum().item()
            elif criterion == "accuracy":  # a label past the head's classes would never be right: no drop, any sigma
                labels_y = self._labels(batch)
                check_label_range(labels_y, logp.shape[-1])
                total += (y0 == labels_y).sum().item()
        total, count = distributed.all_reduce_(torch.tensor([total, count], dtype=torch.double)).tolist()
        return {"labels": labels, "count": count, "total": total}

    def _labels(self, batch):
        return self.model.likelihood.observed(batch).to(self.model.device)

    def _metric(self, batches, reference, criterion, sigma, num_samples, seed, tolerance):
        """The criterion's value at ``sigma`` and the anchors scored: every one, but where the flip rate passed
        ``tolerance`` part-way (flips only add up, so the candidate is infeasible: its value is the rate so far), or
        where the noise overflowed the logits (nan or inf, or a half-precision network's activations under it: the
        value is inf, infeasible under every criterion; a nan's argmax would count as class 0 and could pass the flip
        or accuracy test)."""
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        values = self.sample(num_samples, generator=generator, sigma_q=sigma)
        total, scored, overflowed = 0.0, 0, 0.0
        for batch, y0 in zip(batches, reference["labels"]):
            scored += y0.numel()
            try:
                logp = torch.log_softmax(self._logits(batch, values, num_samples), -1)
            except NonFinitePredictionError:  # a half-precision network overflowed under this noise, not at the mean
                overflowed = 1.0
                break
            log_mean = torch.logsumexp(logp, 0) - math.log(num_samples)  # log of the mean softmax over samples
            if bool((torch.isnan(log_mean) | torch.isposinf(log_mean)).any()):  # -inf: a missing or underflown choice
                overflowed = 1.0
                break
            if criterion == "nll":
                total += -log_mean.gather(-1, y0[:, None]).sum().item()
            elif criterion == "flip":
                total += (log_mean.argmax(-1) != y0).sum().item()
                if total / reference["count"] > tolerance:
                    break
            else:
                total += (log_mean.argmax(-1) == self._labels(batch)).sum().item()
        total, scored, overflowed = distributed.all_reduce_(torch.tensor([total, scored, overflowed],
                                                                         dtype=torch.double)).tolist()
        if overflowed:  # on any rank: every rank takes the same bisection step
            return math.inf, int(scored)
        value = total / reference["count"]
        if criterion == "nll":
            mean = reference["total"] / reference["count"]
            value = (value - mean) / max(mean, 1e-12)
        elif criterion == "accuracy":  # anchors lost over the count: 0.57 - 0.56 is 0.010000000000000009 in floats
            value = (reference["total"] - total) / reference["count"]
        return value, int(scored)



def _infeasible_low(low, step, overflowed):
    """The search's warning where ``low`` (its trace entry ``step``) is not feasible: scored infeasible, or refused
    unscored within the overflow margin of a ``sigma_q`` in ``overflowed`` (then neither a tolerance nor the criterion
    mends it: only a lower ``low``)."""
    if low in overflowed:  # infeasible under every criterion and tolerance
        return (f"low={low:g} is infeasible: its noise overflowed the logits, so sigma_q = 0 (the point estimate); lower "
                f"`low` (under {low / margin_factor(2):g}, clear of the overflow margin); a tolerance does not change this")
    if not step.get("near_overflow"):
        return f"low={low:g} is infeasible: sigma_q = 0 (the point estimate); lower `low` or raise the tolerance"
    factor = margin_factor(2)
    seen = min(v for v in overflowed if near_overflow(low, [v], factor))
    return (f"low={low:g} was not scored: it is within the overflow margin (a factor {factor:g} in sigma_q, "
            f"{OVERFLOW_MARGIN:g} in variance) of sigma_q = {seen:g}, whose noise overflowed the logits, so it was "
            f"refused as at the edge of overflowing: sigma_q = 0 (the point estimate); lower `low` (under {seen / factor:g}, "
            f"clear of the margin); a tolerance does not change this")

def _check_float32_scale(value: float, name: str) -> None:
    """Refuse a positive ``value`` outside float32's normal range, the dtype ``sigma_q`` is kept in: 1e-300 was searched,
    reported and saved as 0, and 1e39 drew infinite samples."""
    info = torch.finfo(torch.float32)
    if value < info.tiny:
        raise ValueError(f"{name}={value:g} is below float32's smallest normal number ({info.tiny:.3g}), the dtype sigma_q "
                         "is kept in: it would be stored as 0 (the point estimate) or with lost digits; give a larger one")
    if value > info.max:
        raise ValueError(f"{name}={value:g} is above float32's largest number ({info.max:.3g}), the dtype sigma_q is kept "
                         "in: it would be stored as inf; give a smaller one")


def check_search(criterion, tolerance, low, high, iterations, spacing) -> float:
    """Check :meth:`TFBGuide.search`'s settings (before any model is loaded, for the CLI); return the tolerance
    (``None``: the criterion's default).

    :raises ValueError: for an unknown criterion or spacing, a tolerance not finite and >= 0 (below 1 for a rate),
        not ``0 < low < high`` finite, bounds outside float32's normal range (``sigma_q``'s dtype), or ``iterations`` not an integer >= 0.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    # True is a slip, not a tolerance of 1; a string from a hand-edited config is refused, as every number is
    tolerance = DEFAULT_TOLERANCE[criterion] if tolerance is None else check_nonnegative(tolerance, "tolerance")
    if criterion != "nll" and tolerance >= 1:  # a rate never exceeds 1: every sigma_q would pass
        raise ValueError(f"tolerance {tolerance:g} for the {criterion} criterion (a fraction of the anchors) "
                         "lets every sigma_q pass: give a fraction below 1, e.g. 0.01")
    low, high = check_positive(low, "low"), check_positive(high, "high")
    _check_float32_scale(low, "low")
    _check_float32_scale(high, "high")
    if not low < high:
        raise ValueError(f"need 0 < low < high, got low={low}, high={high}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    check_count(iterations, "iterations", minimum=0)
    return tolerance


def bayesianize(model, anchor_loader, init=None, min_singular_ratio=1e-3, **search_kwargs):
    """Build a :class:`TFBGuide` from the trained adapter of ``model`` and search ``sigma_q`` on the anchors.

    What ``pyro-lora bayesianize`` calls. ``search_kwargs`` go to :meth:`TFBGuide.search`, whose defaults
    (:data:`TFB_SEARCH`) are ``compare``'s at its default ``--samples`` and seed: on the anchors :func:`bayesianize_setup`
    draws, the same ``sigma_q`` as its ``tfb`` row.
    """
    check_data_given(anchor_loader, "anchor_loader")
    guide = TFBGuide(model, init=init, min_singular_ratio=min_singular_ratio)
    guide.search(anchor_loader, **search_kwargs)
    return guide


def _check_source(model, guide, action):
    """:func:`~pyro_lora.contract.check_guide` of ``guide`` on ``model``, except that the guide may lack some of
    the model's sites (they are read from the adapter): every other difference is refused, with its name."""
    check_model(model, action)
    if not hasattr(guide, "signature") or set(guide.signature["sites"]) >= set(model.sites):
        check_guide(model, guide, action)  # the same refusal as predict's
        return
    model.check_network()
    actual = describe(model)
    # the model's sites the guide lacks are no difference (a BLoB-style guide: A random, B in the adapter)
    expected = {**guide.signature, "sites": {**actual["sites"], **guide.signature["sites"]}}
    problems = differences(expected, actual)
    if problems:
        raise ValueError(f"cannot {action} with this {type(guide).__name__} on this model: " + "; ".join(problems))


def _pair_sites(sites):
    """``[(A site, B site)]`` over the same layers, in the model's order; every site must be in one pair."""
    by_layers = {(s.kind.role, s.layers): name for name, s in sites.items()}
    pairs = [(name, by_layers.get(("up", s.layers))) for name, s in sites.items() if s.kind.role == "down"]
    paired = {n for pair in pairs for n in pair}
    if not pairs or None in paired or paired != set(sites):
        kinds = {name: s.matrix for name, s in sites.items()}
        raise ValueError(
            "TFBGuide needs a model whose random sites include both A and B of every LoRA layer "
            f"(LoraModel(net, likelihood, random='AB')); got sites {kinds}"
        )
    return pairs


def _decompose(a, b, ratio):
    """Batched ``B = U diag(d) V^T``; returns ``A' = V^T A``, ``B' = U diag(d)``, the floored ``d`` and flag masks.

    Signs are canonical (each column of ``U`` has its largest-magnitude entry positive, the matching row of ``V^T``
    flipped with it), so ``B A`` stored with the rows of ``A`` and columns of ``B`` flipped, or as an exported
    ``(B', A')``, gives the same ``A'`` and ``B'``, so the same draws under one seed (up to rounding; a repeated singular
    value leaves a rotation of its directions undetermined, which no sign fixes, and a column of ``U`` whose two
    largest-magnitude entries are of opposite sign and tie up to rounding, e.g. ``(1, -1, 0, 0)/sqrt(2)``, takes its
    sign from the rounding: another storage, such as the rank components in another order, may flip that pair).

    :param a: ``[*L, r, d_in]``; ``b``: ``[*L, d_out, r]``. The SVD runs in float64; results are float32. Where
        ``r > d_out``, ``A'`` and ``B'`` are padded to rank ``r`` (zero rows, zero columns), so they fit the sites.
    :returns: ``A'`` ``[*L, r, d_in]``, ``B'`` ``[*L, d_out, r]``, scale ``[*L, r]``, and per-layer masks
        ``[*L]`` of layers with floored singular values and of layers whose ``B`` is zero.
    """
    u, d, vh = torch.linalg.svd(b.double(), full_matrices=False)
    # the SVD fixes each pair (column of U, row of V^T) only up to a common sign, and a fixed draw eps moves A' by
    # +-eps with it: the same B A stored another way (an exported and reloaded adapter) gave another search result.
    # svd_flip's convention fixes it: each column of U has its largest-magnitude entry positive (B = 0: left as it is)
    u, vh = svd_flip(u, vh)
    a_prime = (vh @ a.double()).float()
    b_prime = (u * d.unsqueeze(-2)).float()
    top = d.amax(-1, keepdim=True)
    floor = ratio * top
    zero = (top == 0).squeeze(-1)
    small = (d < floor).any(-1) & ~zero
    scale = torch.where(top > 0, d.clamp_min(floor), torch.ones_like(d)).float()  # B' = 0: no weight noise anyway
    missing = a.shape[-2] - d.shape[-1]
    if missing > 0:  # r > d_out: B has d_out singular values; rows of A' against zero columns of B' keep B'A' = BA
        a_prime = torch.cat([a_prime, a_prime.new_zeros(*a_prime.shape[:-2], missing, a_prime.shape[-1])], -2)
        b_prime = torch.cat([b_prime, b_prime.new_zeros(*b_prime.shape[:-1], missing)], -1)
        scale = torch.cat([scale, scale.new_ones(*scale.shape[:-1], missing)], -1)
    return a_prime, b_prime, scale, small, zero


def _few_anchors(criterion, tolerance, count) -> str:
    """The warning of a search whose anchors are too few for ``tolerance`` to allow one flip (or one wrong anchor)."""
    what = "to change" if criterion == "flip" else "lost"
    return (f"only {count} anchors: a {_METRIC_NAMES[criterion]} tolerance of {tolerance:g} allows no anchor "
            f"{what} (one anchor is {1 / count:.3g}), so any sigma_q that changes none of these {count} is taken, and on "
            f"other data it may change far more than {tolerance:g} of the predictions; use at least "
            f"{math.ceil(1 / tolerance)} anchors (a larger training split) or the nll criterion")


def _singular_warning(flagged, ratio):
    parts = []
    if flagged["small"]:
        parts.append(
            f"singular values of B below {ratio:g} x the layer's largest in {flagged['small']}: floored in Omega, so "
            "those directions get less than the isotropic weight noise"
        )
    if flagged["zero"]:
        parts.append(f"B is zero in {flagged['zero']} (an untrained adapter?): these layers get no weight noise")
    return "TFB: " + "; ".join(parts)


def anchor_count(setup, anchors: int = TFB_ANCHORS) -> int:
    """How many anchors :func:`bayesianize_setup` draws for ``anchors`` requested: all of ``setup``'s training split
    where it holds fewer (what a run records, not the request)."""
    return min(anchors, len(setup.train))


def bayesianize_setup(setup, model, anchors: int = TFB_ANCHORS, **search) -> TFBGuide:
    """:func:`bayesianize` ``model`` as ``compare`` does: :data:`TFB_SEARCH` (``search`` changes any setting) on
    ``anchors`` examples drawn from ``setup``'s training split, the noise seeded by its seed, its ``samples`` per
    anchor. What both the ``tfb`` method and ``pyro-lora bayesianize`` run."""
    c = setup.config
    # anchors from train, as the paper draws them: enough that a 1% flip rate allows a flip
    records = subset(setup.train, anchor_count(setup, anchors), seed=setup.seed)
    search = {**TFB_SEARCH, "num_samples": c.samples, "seed": setup.seed, **search}
    return bayesianize(model, setup.loader(records), progress=c.progress, **search)


# version 2 (ceee03e): _decompose's canonical SVD signs move A', so the search's fixed draw, sigma_q and every row
@method("tfb", bayesian=True, guide=TFBGuide, exportable=True, version=2)
def tfb(setup):
    """Training-free Bayesianization of the MAP: sigma_q searched on anchors drawn from the training set."""
    guide = bayesianize_setup(setup, setup.lora_model(random="AB"))
    return Fitted(guide=guide, extra_parameters=guide.extra_parameters(), note=guide.search_note,
                  chosen={"sigma_q": float(guide.sigma_q)})


@method("tfb_val", bayesian=True, guide=TFBGuide, exportable=True, validation=True, version=2)  # as tfb's
def tfb_val(setup):
    """TFB with sigma_q by validation NLL among the values that keep validation accuracy (within 1 point) and flip at
    most the search's tolerance of the validation predictions: a log grid over the search's range, refined by golden
    section."""
    guide = TFBGuide(setup.lora_model(random="AB"))
    low, high = TFB_SEARCH["low"], TFB_SEARCH["high"]
    grid = [low * (high / low) ** (k / 6) for k in range(7)]
    tuning = tune_on_validation(guide, "sigma_q", guide.set_sigma_q, grid, setup.loader(setup.val), setup.config.samples,
                                seed=setup.seed, max_flip_rate=TFB_SEARCH["tolerance"], start=float(guide.sigma_q),
                                variance_power=2)  # sigma_q scales the noise's std
    guide.criterion, guide.tolerance = "val_nll", None
    guide.trace = [{"sigma_q": value, "val_nll": loss, "val_accuracy": acc, "val_flip_rate": flips}
                   for value, loss, acc, flips in tuning.trace]
    return Fitted(guide=guide, extra_parameters=guide.extra_parameters(), note=tuning.note, chosen={"sigma_q": tuning.value})
