"""The batched predictive: S posterior samples, drawn and run one chunk at a time, probabilities averaged over samples."""

from __future__ import annotations

import contextlib
import math
import numbers
import time
import warnings
from dataclasses import dataclass

import torch

from . import distributed
from .checks import check_batch, check_count, check_data_given, check_flag
from .contract import check_guide, entry_checks
from .data import check_every_example, to_device
from .likelihoods import check_label_range
from .model import HalfPrecisionOverflowError
from .modes import eval_mode
from .progress import progress_bar
from .quantized import has_int8_layers
from .callers import user_stacklevel

SEED_RANGE = 2**62  # base seeds are drawn from [0, SEED_RANGE); chunk i uses base + i


class NonFinitePredictionError(ValueError):
    """:func:`predict`'s refusal of a batch whose probabilities hold a nan or inf: the logits overflowed float32 (weight
    samples of a far too wide posterior, or a half-precision base), or a half-precision network's activations
    overflowed under weight samples that its posterior mean runs without (:func:`sampled_logits`: the samples' width
    is too wide for that dtype). A search over a posterior's width catches it as "this width is too wide"
    (:func:`~pyro_lora.guides.tuning.validation_scores`)."""


@dataclass
class Prediction:
    """Predictions over a dataset.

    :ivar probs: ``[N, C]`` mean over samples of the softmax (zeros for missing choices): float32 from
        :func:`predict` and the GLM predictives (float64 once scaled by a temperature). Entries below about ``e^-103``
        are 0 in float32: a multiple-choice cloze score is a sum of token log-probabilities, so margins that wide are
        common, and a 0 stays 0 whatever a temperature does to it.
    :ivar labels: ``[N]``, or ``None`` for unlabelled data (batches without ``"labels"``).
    :ivar sample_probs: ``[S, N, C]`` per-sample probabilities when kept, else ``None``.
    :ivar seconds: wall time of the prediction.
    :ivar log_probs: ``[N, C]`` float64 log of the same predictive, computed without float32's underflow (from the
        logits: ``logsumexp_s log_softmax(f_s) - log S``), ``-inf`` for missing choices: what temperature scaling reads
        (:func:`~pyro_lora.calibration.scale_prediction`). ``None`` for a ``Prediction`` built without it.
    """

    probs: torch.Tensor
    labels: torch.Tensor | None
    sample_probs: torch.Tensor = None
    seconds: float = 0.0
    log_probs: torch.Tensor | None = None


@torch.no_grad()
def predict(model, guide, data, num_samples: int = 8, mean: bool = False, chunk_size: int | None = None,
            keep_samples: bool = False, progress: bool = False) -> Prediction:
    """Posterior predictive ``p(y | x, D) ~ 1/S sum_s softmax(f(x; theta_s))`` over ``data``.

    One set of ``S`` weight samples is used for every batch, so the predictive of an example does not
    depend on the batch it falls in. The samples are split into chunks of ``chunk_size`` (default all
    ``S``): chunk ``i`` holds samples ``[i c, min((i + 1) c, S))``, runs as one batch of ``chunk * B`` rows,
    and is drawn by ``guide.sample(chunk)`` under the seed ``base + i`` in a forked RNG, where ``base`` is
    drawn once per call from the global RNG of the model's device (so ``torch.manual_seed`` /
    ``pyro.set_rng_seed`` before ``predict`` make it reproducible, and successive calls draw afresh). With
    several chunks, each chunk is drawn again for every batch: memory holds one chunk of samples, never
    ``S``, at the cost of re-drawing (cheap next to the forward). The chunk size is part of the random
    stream: other chunk sizes give other, equally valid, draws. With one chunk the samples are drawn once.

    Guides whose draws are a fixed sequence rather than independent draws (an ensemble: draw ``s`` is
    member ``s mod K``) get the same ``S`` draws whatever the chunk size; a guide may refuse an ``S`` its
    draws would weight unevenly (``guide.check_num_samples(S)``: an ensemble needs a multiple of ``K``).

    :param guide: a guide, or ``None`` for the model's start: the network's own (peft) weights (for a LoRA-XS model its
        cores at 0: the base network).
    :param int num_samples: ``S >= 1`` (a multiple of ``K`` for an ensemble of ``K`` members).
    :param mean: use the posterior mean (one forward) instead of samples; point-estimate guides always do.
        Refused for a guide whose mean is no predictor (``guide.mean_is_predictor`` false: an ensemble's
        averaged member weights).
    :param int chunk_size: samples per forward (a positive integer), or ``None`` for all ``S`` at once.
    :param keep_samples: also return the per-sample probabilities ``[S, N, C]`` (``[1, N, C]`` without samples).
    :returns: a :class:`Prediction` with ``probs`` (float32) and ``log_probs`` (float64, the log of the same
        average computed from the float64 log-softmax of each sample's logits, summed over chunks in log space).
    :raises TypeError: if ``model`` is no :class:`~pyro_lora.LoraModel` (:func:`~pyro_lora.contract.check_model`).
    :raises ValueError: for settings that differ across ranks (under ``torch.distributed``, on every rank, first),
        a bad ``num_samples`` / ``chunk_size`` (an ensemble's ``S`` not a multiple of
        ``K``), ``mean``, ``keep_samples`` or ``progress`` no bool, a ``DataLoader`` with ``drop_last=True``, ``mean=True`` with a guide whose mean is no predictor, a guide whose posterior its site samples do
        not carry (``guide.samples_carry_posterior`` false: last-layer Laplace), or a guide built for another model
        (:func:`~pyro_lora.contract.check_guide`); for labelled batches mixed with unlabelled ones; with ``guide=None``,
        for an adapter still holding its LoRA values from before a ``fit`` that trained the network's head (the guide's
        mean never written: :meth:`~pyro_lora.LoraModel.check_start_trained`; warned where the fit trained no head).
    :raises NonFinitePredictionError: (a ``ValueError``) at a batch whose probabilities are not finite (the logits
        overflowed float32 under weight samples of a far too wide posterior), rather than return nan; also where a
        half-precision network overflows under the weight samples but not at the guide's mean (:func:`sampled_logits`).
    :raises FloatingPointError: where a half-precision network's logits overflow at fixed weights (``mean``, a
        deterministic guide, no guide, an ensemble's members, MC dropout's masks: draws without a width), or under
        weight samples and at their centres alike: the network, not the posterior's width
        (:meth:`~pyro_lora.LoraModel.logits`).

    Under ``torch.distributed`` every rank is given the same ``data``, predicts its contiguous block of
    batches with rank 0's weight samples (rank 0's base seed is broadcast; the first chunk is checked to
    be equal on all ranks), and returns the gathered predictions of all ``N`` examples in order.

    The predictions follow ``data``'s order: a shuffling ``DataLoader`` gives another order on every call.
    Unlabelled data (batches without ``"labels"``) is predicted all the same, with ``labels`` ``None``.

    Over an LLM.int8() base an example's probabilities also depend on the other rows of its forward (its batch, and the
    weight samples of its chunk: :func:`~pyro_lora.quantized.has_int8_layers`), by a little: warned of once.
    """
    check_data_given(data)
    with entry_checks(model, guide, "predict", settings={"num_samples": num_samples, "mean": mean, "chunk_size": chunk_size,
                                                        "keep_samples": keep_samples}):
        check_every_example(data, "predict")
        # the string "False" is truthy: mean="False" predicted at the mean
        mean, keep_samples, progress = (check_flag(flag, name) for flag, name in
                                        ((mean, "mean"), (keep_samples, "keep_samples"), (progress, "progress")))
        num_samples = check_count(num_samples, "num_samples")
        if chunk_size is not None:
            chunk_size = check_count(chunk_size, "chunk_size", alternative="or None for all samples in one forward")
        if guide is not None:
            check_guide(model, guide, "predict")
        else:  # the adapter as it is: refused where a fit left its trained values in the guide, beside a trained head
            model.check_start_trained("predict")
        if has_int8_layers(model.net):
            warnings.warn("predict over an LLM.int8() base: its outlier decomposition runs in 16 bits the input columns "
                          "that exceed its threshold in any row of a forward, so an example's probabilities depend a little "
                          "on its batch and on the weight samples run beside it (an NF4 or unquantised base's do not)",
                          stacklevel=user_stacklevel())
        if model.likelihood.event_dims != 0:  # CausalLM: a distribution per token, no [N, C] row per example
            raise ValueError(f"predict gives one class distribution per example ([N, C]), and {type(model.likelihood).__name__} "
                             "is token-level (one per token): score a language model with model.logits(batch, values) "
                             "and the likelihood's distribution(...).log_prob")
        if guide is not None:
            if not guide.samples_carry_posterior:
                raise ValueError(
                    f"predict refused for this {type(guide).__name__}: its posterior is not over the model's LoRA sites (they are "
                    f"its point estimate), so weight samples would give the point estimate's predictions; use its own "
                    f"predictive ({guide.own_predictive})"
                )
            if mean and not guide.deterministic and not getattr(guide, "mean_is_predictor", True):
                raise ValueError(
                    f"predict(mean=True) refused for this {type(guide).__name__}: its mean() is no predictor of this posterior "
                    "(an ensemble's mean averages the weights of separately trained members); predict with samples "
                    "instead (an ensemble: guides.predict_ensemble, S = K, the exact mixture)"
                )
    start = time.perf_counter()
    draws, values = None, None
    sums, logs, kept, labels = [], [], [], []
    with eval_mode(model.net):
        if guide is not None and (mean or guide.deterministic):
            values = guide.mean()
        elif guide is not None:
            draws = _ChunkedDraws(guide, num_samples, chunk_size, model.device)
        data = distributed.split_batches(data)
        with distributed.refused_together("predict"):  # a batch of one rank's block may be refused there alone
            for batch in progress_bar(data, desc="predict", disable=not (progress and distributed.is_main()), dynamic_ncols=True):
                batch = to_device(batch, model.device)
                observed = batch_labels(model.likelihood.observed, batch, labels, "predict")  # before the forward
                # the log of the average from float64 log-softmaxes: float32 probabilities flush a choice more than
                # 103 nats behind to 0, which no temperature can scale back (cloze scores are that far apart)
                if draws is None:
                    f = model.logits(batch, values)
                    p = torch.softmax(f.float(), -1).unsqueeze(0)  # [1, B, C]
                    total, parts, log_total = p[0], [p], torch.log_softmax(f.double(), -1)
                else:
                    total, parts, log_total = 0, [], None
                    for i in range(len(draws)):
                        f = draws.logits(model, batch, i)  # [chunk, B, C]; the chunk's samples are freed already
                        p = torch.softmax(f.float(), -1)
                        total = total + p.sum(0)
                        chunk = torch.logsumexp(torch.log_softmax(f.double(), -1), 0)
                        log_total = chunk if log_total is None else torch.logaddexp(log_total, chunk)
                        if keep_samples:
                            parts.append(p)
                    total = total / num_samples
                    log_total = log_total - math.log(num_samples)
                if not bool(torch.isfinite(total).all()):  # one reduction per batch: a nan of any sample reaches the sum
                    raise NonFinitePredictionError(_not_finite(total, guide, draws is not None))
                sums.append(total)
                logs.append(log_total)
                if keep_samples:
                    kept.append(torch.cat(parts))
                if observed is not None:  # a label the head has no class for is nothing to score
                    check_label_range(observed, total.shape[-1])
                labels.append(observed)
    # a rank may hold no batch when there are fewer batches than ranks; the ranks' labels are told apart together
    kinds = {y is None for y in labels}
    width, labelled, unlabelled = distributed.all_reduce_(
        torch.tensor([max((p.shape[-1] for p in sums), default=0), False in kinds, True in kinds]), op="max").tolist()
    if width == 0:
        raise ValueError("predict got no batches: the data is empty")
    if labelled and unlabelled:  # on one rank the loop refused it already
        raise ValueError(_MIXED_LABELS.format("predict"))
    probs = torch.cat([pad_choices(p, width) for p in sums]) if sums else torch.zeros(0, width, device=model.device)
    log_probs = (torch.cat([pad_choices(p, width, -math.inf) for p in logs]) if logs
                 else torch.zeros(0, width, dtype=torch.float64, device=model.device))
    sample_probs = None
    if keep_samples:
        rows = [pad_choices(p, width) for p in kept]
        sample_probs = torch.cat(rows, 1) if rows else torch.zeros(1 if draws is None else num_samples, 0, width, device=model.device)
        sample_probs = distributed.gather_cat(sample_probs.transpose(0, 1)).transpose(0, 1).cpu()
    if not unlabelled:
        labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=model.device)
    return Prediction(
        probs=distributed.gather_cat(probs).cpu(),
        labels=None if unlabelled else distributed.gather_cat(labels).cpu(),
        sample_probs=sample_probs,
        seconds=time.perf_counter() - start,
        log_probs=distributed.gather_cat(log_probs).cpu(),
    )


_MIXED_LABELS = "{}: some batches have labels and others none: label every batch, or none (then labels is None)"


def batch_labels(observed, batch, earlier: list, desc: str):
    """``observed(batch)``, the batch's labels, or ``None`` for a batch without (no ``"labels"``, or ``None``): a
    predictive needs none. ``earlier``: what the batches before gave.

    :raises ValueError: for a labelled batch among unlabelled ones or the other way round (their labels would not
        line up with the predictions), or for what is no batch (:func:`~pyro_lora.checks.check_batch`: the GLM
        predictives read the labels before the batch reaches the device).
    """
    check_batch(batch)
    labels = None if batch.get("labels") is None else observed(batch)
    if earlier and (earlier[0] is None) != (labels is None):
        raise ValueError(_MIXED_LABELS.format(desc))
    return labels


def _not_finite(probs, guide, sampled):
    """Why :func:`predict`'s probabilities ``probs`` (a batch's) hold a nan or inf: the float32 logits overflowed."""
    bad = f"{int((~torch.isfinite(probs)).sum())} of {probs.numel()}"
    if sampled and not getattr(guide, "samples_have_width", True):  # fixed points or masks: no width to narrow
        return (f"predict: {bad} predictive probabilities of a batch are not finite: the network's logits overflowed (nan "
                f"or inf) under this {type(guide).__name__}'s draws, the fixed weights of its members (or their "
                "masks): weights this large (or a half-precision base) overflow float32; check the weights")
    if sampled:
        return (f"predict: {bad} predictive probabilities of a batch are not finite: the network's logits overflowed (nan "
                f"or inf) under this {type(guide).__name__}'s weight samples, so the posterior is likely far too wide (a "
                "prior precision too small, a sigma_q, std or temperature too large; check guide.sample(1)'s magnitude), or "
                "a half-precision base's activations overflowed; narrow the posterior (or load the base in float32)")
    weights = "the network's own weights" if guide is None else f"this {type(guide).__name__}'s mean"
    return (f"predict: {bad} predicted probabilities of a batch are not finite: the network's logits overflowed (nan or "
            f"inf) at {weights}: weights this large (or a half-precision base) overflow float32; check the weights")


def sampled_logits(model, guide, batch, values, num_samples, who="predict", index=None):
    """``model.logits(batch, values, num_samples)`` for weight samples ``values`` of ``guide``, where a half-precision
    overflow is told apart. Where the draws spread around a centre by a width (``guide.samples_have_width``), the
    centres run once more (only then): ``guide.mean()`` in one forward, or each draw's own
    (``guide.draw_centres(index)``, a Laplace mixture's members) in a ``num_samples``-sample forward, the only kind
    the hooks of an ensemble's per-member heads take. Overflowing there too, it is the network's own; else the
    samples' width, too wide for that dtype, which a width search takes as the worst width, as an overflow of
    float32. Where the draws are fixed points or masks (an ensemble's members, MC dropout), there is no width to
    narrow: the network's error stands.

    :param index: ``[num_samples]``, the draws' sample indices (a chunk's of :func:`predict`); default ``0..S-1``.
    :raises NonFinitePredictionError: where the sampled forward overflows a half-precision network and the centres'
        does not; its message (prefixed ``who``) names the guide's width and the dtype.
    :raises HalfPrecisionOverflowError: where the centres' forward overflows as well, or the guide's draws have no
        width.
    """
    try:
        return model.logits(batch, values, num_samples)
    except HalfPrecisionOverflowError as error:
        if not getattr(guide, "samples_have_width", True):
            raise  # the members' or the masks' own weights overflow: a narrower posterior does not exist
        centres = getattr(guide, "draw_centres", lambda index: None)(
            torch.arange(num_samples, device=model.device) if index is None else index)
        if centres is None:
            model.logits(batch, guide.mean())  # raises where the network overflows without the weight noise
        else:
            model.logits(batch, centres, num_samples)
        name = str(error.dtype).removeprefix("torch.")
        raise NonFinitePredictionError(
            f"{who}: the logits of this {name} forward are NaN or infinite under this {type(guide).__name__}'s weight "
            f"samples ({_width(guide)}), though not at {'its mean' if centres is None else 'their centres'}: draws of "
            f"this width take the activations beyond {name}'s range, so the posterior is too wide for a {name} "
            f"forward; narrow it (a smaller temperature, sigma_q or std, a larger prior precision) or "
            f"{error.way_out}") from error


def _width(guide):
    """What sets ``guide``'s width, in words (``"posterior temperature 415"``), where it is one of the knobs the width
    searches tune; else ``"its width as fitted"``."""
    if torch.is_tensor(getattr(guide, "sigma_q", None)):
        return f"sigma_q {float(guide.sigma_q):g}"
    if isinstance(getattr(guide, "temperature", None), numbers.Real):
        return f"posterior temperature {guide.temperature:g}"
    factors = getattr(guide, "factors", None) or \
        [f for c in getattr(guide, "components", None) or [] for f in getattr(c, "factors", None) or []]  # a mixture's
    if factors and all(torch.is_tensor(getattr(f, "prior_precision", None)) for f in factors):
        lam = torch.cat([f.prior_precision.reshape(-1) for f in factors])
        low, high = float(lam.min()), float(lam.max())
        return f"prior precision {low:g}" if low == high else f"prior precision {low:g} to {high:g}"
    return "its width as fitted"


def pad_choices(p, width, value=0.0):
    """``p`` widened to ``width`` choices with ``value`` (a probability's 0, a log-probability's ``-inf``)."""
    return torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=value)


class _ChunkedDraws:
    """The ``S`` weight samples of one :func:`predict` call, materialised one chunk at a time.

    Chunk ``i`` (samples ``[i c, min((i + 1) c, S))``) is ``guide.sample(n_i)`` under seed ``base + i``, so
    drawing it again (for the next batch) gives the same values. With one chunk the draw is kept.
    """

    def __init__(self, guide, num_samples, chunk_size, device):
        self.guide, self.num_samples, self.device = guide, num_samples, torch.device(device)
        chunk = min(chunk_size or num_samples, num_samples)
        self.bounds = [(i, min(i + chunk, num_samples)) for i in range(0, num_samples, chunk)]
        self.members = _cyclic_members(guide)
        check = getattr(guide, "check_num_samples", None)
        if callable(check):
            check(num_samples)  # an ensemble: S a multiple of K, or its members would be weighted unevenly
        if self.members is not None and len(self.bounds) > 1 and getattr(guide, "head_parameters", None):
            raise ValueError(
                "an ensemble with per-member heads predicts all samples in one forward: drop chunk_size "
                f"(got chunk_size={chunk_size} < num_samples={num_samples})"
            )
        # one draw from the global RNG of the model's device (reproducible under torch.manual_seed; it
        # advances that RNG as a draw does); under torch.distributed, rank 0's
        base = torch.randint(SEED_RANGE, (), device=self.device)
        if distributed.is_distributed():
            distributed.broadcast_parameters([base])
        self.base = int(base)
        self.cached = None
        if len(self.bounds) == 1 or distributed.is_distributed():
            first = self.draw(0)
            if distributed.is_distributed():
                _check_same_on_all_ranks(first)
            if len(self.bounds) == 1:
                self.cached = first

    def __len__(self):
        return len(self.bounds)

    def size(self, i):
        start, stop = self.bounds[i]
        return stop - start

    def draw(self, i):
        """Site name -> ``[n_i, *site.shape]``: the samples of chunk ``i``."""
        if self.cached is not None:
            return self.cached
        start, stop = self.bounds[i]
        with _seeded(self.device, self.base + i):
            if self.members is not None and len(self.bounds) > 1:
                # draw s is member s mod K: chunk i needs the members of ITS sample indices, not 0, 1, ...
                return self.members(torch.arange(start, stop, device=self.device) % self.guide.num_members)
            return self.guide.sample(stop - start)

    def logits(self, model, batch, i):
        """``[n_i, B, C]`` logits of chunk ``i`` on ``batch`` (its samples are released on return)."""
        start, stop = self.bounds[i]
        return sampled_logits(model, self.guide, batch, self.draw(i), self.size(i),
                              index=torch.arange(start, stop, device=self.device))


def _cyclic_members(guide):
    """``guide.sample_members`` for a guide whose draw ``s`` is from member ``s mod K`` (an ``EnsembleGuide``, a
    Laplace mixture), else ``None``."""
    members = getattr(guide, "sample_members", None)
    k = getattr(guide, "num_members", None)
    return members if callable(members) and isinstance(k, numbers.Integral) else None


@contextlib.contextmanager
def _seeded(device, seed):
    """Within: the global RNGs of the CPU and of ``device`` start from ``seed``; both are restored on exit."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        with torch.random.fork_rng(devices=[index]):
            torch.random.default_generator.manual_seed(seed)
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
            yield
    elif device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(device_type=device.type):
            torch.manual_seed(seed)
            yield


def _check_same_on_all_ranks(values):
    """Raise on every rank unless ``values`` (the first chunk) agree across ranks.

    The same seed gives the same samples only from the same guide parameters; a guide that differs
    across ranks would otherwise silently predict each rank's batches with other weights.
    """
    stats, scale = [], []
    for v in values.values():
        v = v.detach().double()
        square = v.pow(2).sum()
        stats += [v.sum(), square]
        scale += [(square * v.numel()).sqrt(), square]
    stats, scale = torch.stack(stats), torch.stack(scale)
    high = distributed.all_reduce_(stats.clone(), op="max")
    low = distributed.all_reduce_(stats.clone(), op="min")
    top = distributed.all_reduce_(scale, op="max")
    if not bool(((high - low).abs() <= 1e-4 * top + 1e-12).all()):
        raise ValueError(
            "the guide's weight samples differ across ranks under the same seed: its parameters must be "
            "equal on every rank (load or fit the guide on all ranks alike) before predict"
        )
