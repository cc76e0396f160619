"""Calibration, uncertainty and selective-prediction metrics (pure torch).

Conventions: ``probs`` is ``[N, C]`` predictive probabilities (rows sum to 1; classes beyond an
example's choice count carry probability 0), ``labels`` is ``[N]`` integer class indices,
``sample_probs`` is ``[S, N, C]`` per-sample probabilities. Numpy arrays are accepted and
converted. Everything is computed in float64 so that sums do not drift; float32 confidences (and half-precision
ones, as float32 values) are binned in float32, against edges rounded to it, so that a float32 0.6 lands in the bin a
float64 0.6 does. Selective prediction ranks examples by ``1 - max p`` computed from a row's other entries, which keep
their precision where a float32 confidence saturates at 1.0.
Scalar metrics return Python floats; per-example quantities return ``[N]`` float64 tensors.

Every metric checks that its rows are probability vectors (non-negative, summing to 1 up to the input
dtype's rounding) and raises ValueError otherwise: given logits they would return numbers that look like
results (an ECE x100 of 256, a meaningless NLL) without a word.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch

from .checks import check_count, check_positive, is_integer_tensor

__all__ = [
    "ReliabilityBins",
    "accuracy",
    "accuracy_at_coverage",
    "aurc",
    "auroc",
    "brier",
    "ece",
    "expected_entropy",
    "mutual_information",
    "nll",
    "predictive_entropy",
    "reliability_bins",
    "risk_coverage",
    "stratified_auroc",
    "summarize",
]

# Floor for p[label] in the NLL: a confidently wrong example costs -log(1e-12) ~ 27.6, not inf.
_NLL_FLOOR = 1e-12
# How far a row sum may be from 1: one eps of the input dtype, at least 1e-4 (float32 softmax and averages are off
# by a few 1e-7; 1e-4 is an ECE x100 shift below 0.01). Rounding to the dtype moves each entry by at most half an eps
# of its value, so a row's sum by at most eps / 2; an average of such rows, rounded again, by eps (measured: 0.43 eps
# for float16 / bfloat16 softmaxes and their averages, 2 to 1000 classes). Entries below the dtype's smallest normal
# round by an absolute amount instead, up to one subnormal step each (float16: 6e-8; a uniform 128256-class softmax
# sums to 1.0015): a row may add that per class. More is no rounding: a bfloat16 row 1.4% short of 1 was scored as given
_SUM_TOL = 1e-4
_MAX_BINS = 10**6  # reliability bins: each is allocated, so a slip of 10**12 bins is refused rather than run out of memory
_FLOAT8 = tuple(getattr(torch, name) for name in dir(torch) if name.startswith("float8_"))


class ReliabilityBins(NamedTuple):
    """Per-bin statistics of top-label confidence; every field is ``[num_bins]``.

    Empty bins have confidence and accuracy 0 and count 0.
    """

    confidence: torch.Tensor  # mean top-label probability in the bin (float64)
    accuracy: torch.Tensor  # fraction of correct top-label predictions in the bin (float64)
    counts: torch.Tensor  # number of examples in the bin (int64)


def _tensor(x, name: str) -> torch.Tensor:
    """``x`` as a tensor of its own dtype; a list as its elements' (numpy's reading: Python floats are float64, where
    torch would make float32 of them, tying values that differ beyond float32's precision; float32 rows stay float32,
    binned as the same values in an array are).

    :raises ValueError: for complex values (torch would drop the imaginary part with a warning).
    """
    if not isinstance(x, torch.Tensor):
        try:
            array = np.asarray(x)  # a list of numpy or torch scalars too
            if array.dtype.kind == "O" or array.dtype == np.longdouble:  # Decimal, Fraction; torch has no longdouble
                array = array.astype(np.float64)
        except (TypeError, ValueError, RuntimeError) as err:  # ragged rows, no numbers, tensors that require grad
            raise ValueError(f"{name} must be an array of numbers: {err}") from None
        if np.iscomplexobj(array):
            raise ValueError(f"{name} must be real, got dtype {array.dtype}")
        if array.dtype.kind not in "biuf":  # strings: "0.1" is no probability, as a coverage "0.5" is no fraction
            raise ValueError(f"{name} must be numbers, got dtype {array.dtype}")
        x = torch.as_tensor(array)
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    _check_dense(x, name)
    return x.detach()


def _check_dense(x: torch.Tensor, name: str) -> None:
    """Refuse a sparse tensor (it lacks the ops the metrics run) or a meta one (it holds no values)."""
    if x.layout != torch.strided or x.is_meta:
        where = "on the meta device (no values)" if x.is_meta else f"of layout {x.layout}"
        raise ValueError(f"{name} must be a dense tensor with values, got one {where}: pass .to_dense() or real values")


def _sum_tolerance(dtype: torch.dtype, num_classes: int) -> float:
    """How far from 1 a probability row of ``num_classes`` entries in ``dtype`` may sum: one eps of the dtype plus one
    subnormal step per entry, at least ``_SUM_TOL``."""
    if not dtype.is_floating_point:
        return _SUM_TOL
    info = torch.finfo(dtype)
    return max(_SUM_TOL, info.eps + num_classes * info.smallest_normal * info.eps)


def _in_unit(x) -> bool:
    """Whether every entry of ``x`` is in ``[0, 1]``."""
    return bool(((x >= 0) & (x <= 1)).all())


def _check_rows(x: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Raise ValueError unless every row (last dim) of the finite float64 ``x`` is a probability vector.

    ``dtype`` is the caller's original dtype: half-precision rows are allowed their larger rounding; 8-bit floats are
    refused (their rounding, up to a quarter or half of a probability, would let rows summing to 0.5 pass).
    """
    if dtype.is_floating_point and torch.finfo(dtype).bits < 16:
        raise ValueError(f"{name} in {dtype}: an 8-bit float rounds a probability by up to {torch.finfo(dtype).eps:g}, "
                         "too coarse to tell a probability vector; pass them in float16 or wider")
    tol = _sum_tolerance(dtype, x.shape[-1])
    sums = x.sum(-1)
    if bool((x < 0).any()) or bool(((sums - 1).abs() > tol).any()):
        # entries in [0, 1] summing to 1 within bfloat16's rounding, given wider: a bfloat16 softmax cast up
        rounded = (not (dtype.is_floating_point and torch.finfo(dtype).bits <= 16) and _in_unit(x)
                   and bool(((sums - 1).abs() <= _sum_tolerance(torch.bfloat16, x.shape[-1])).all()))
        # entries below 0 by no more than the sum's rounding, in rows summing to 1: a 1 - (sum of the others) in floats
        noise = bool((x >= -tol).all()) and bool(((sums - 1).abs() <= tol).all())
        advice = ("they look like probabilities rounded in a narrower dtype (a bfloat16 or float16 softmax cast to "
                  f"{dtype}): pass them in that dtype, or renormalise (p / p.sum(-1, keepdim=True))" if rounded
                  else "their negative entries are rounding error (a probability computed as 1 minus the others?): "
                  "clamp them at 0 and renormalise (p = p.clamp(min=0); p / p.sum(-1, keepdim=True))" if noise
                  else "pass softmax(logits), not logits")
        raise ValueError(
            f"{name} rows must be probability vectors (non-negative, summing to 1 within {tol:.1g}); got values from "
            f"{float(x.min()):.4g} to {float(x.max()):.4g} and row sums from {float(sums.min()):.4g} to "
            f"{float(sums.max()):.4g}: {advice}"
        )


def check_labels(labels, n: int, c: int) -> torch.Tensor:
    """``labels`` as ``int64 [N]`` class indices in ``[0, C)``.

    :raises ValueError: for ``None`` (a prediction of unlabelled data), another shape than ``[n]``, a float, complex
        or bool dtype, or a value outside ``[0, c)`` (e.g. an ignore index -100).
    """
    if labels is None:
        raise ValueError("labels is None: a prediction of unlabelled data has nothing to score against; predict "
                         "labelled batches to score them")
    if not isinstance(labels, torch.Tensor):
        array = np.asarray(labels)
        if array.dtype.kind not in "biufc":
            raise ValueError(f"labels must be integer class indices, got dtype {array.dtype}")
        labels = torch.as_tensor(array)
    _check_dense(labels, "labels")
    labels = labels.detach()
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape [N], got {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"shape mismatch: probs has {n} rows but labels has {labels.shape[0]}")
    if not is_integer_tensor(labels):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if n and labels.dtype in (torch.uint32, torch.uint64) and int(labels.cpu().numpy().max()) >= c:
        # torch compares neither dtype, and the cast to int64 below wraps values from 2**63 to negatives
        raise ValueError(f"labels out of range: expected values in [0, {c}), got max {int(labels.cpu().numpy().max())}")
    labels = labels.to(torch.int64)
    if n and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(
            f"labels out of range: expected values in [0, {c}), "
            f"got min {int(labels.min())} max {int(labels.max())}"
        )
    return labels


def _check_probs(probs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert ``probs [N, C]`` and ``labels [N]``; raise ValueError naming the problem."""
    probs = _tensor(probs, "probs")  # once: a list is read into an array here
    dtype, probs = probs.dtype, probs.to(torch.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape [N, C], got {tuple(probs.shape)}")
    n, c = probs.shape
    if n == 0 or c == 0:
        raise ValueError(f"empty input: probs has shape {tuple(probs.shape)}")
    labels = check_labels(labels, n, c)
    if not torch.isfinite(probs).all():
        raise ValueError("probs contains non-finite values (nan or inf)")
    _check_rows(probs, dtype, "probs")
    return probs, labels


def _check_sample_probs(sample_probs) -> torch.Tensor:
    """Validate and convert ``sample_probs [S, N, C]``; raise ValueError naming the problem."""
    sample_probs = _tensor(sample_probs, "sample_probs")
    dtype, sample_probs = sample_probs.dtype, sample_probs.to(torch.float64)
    if sample_probs.ndim != 3:
        raise ValueError(f"sample_probs must have shape [S, N, C], got {tuple(sample_probs.shape)}")
    if sample_probs.numel() == 0:
        raise ValueError(f"empty input: sample_probs has shape {tuple(sample_probs.shape)}")
    if not torch.isfinite(sample_probs).all():
        raise ValueError("sample_probs contains non-finite values (nan or inf)")
    _check_rows(sample_probs, dtype, "sample_probs")
    return sample_probs


def _confidence_correct(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-label confidence ``[N]`` and correctness ``[N]``: 1 or 0, or ``1 / m`` where the label is one of ``m``
    classes tied at the top (the expectation over a random tie-break: credit does not depend on the label's index)."""
    conf = probs.max(dim=-1).values
    tied = probs == conf.unsqueeze(-1)
    return conf, tied.gather(-1, labels.unsqueeze(-1)).squeeze(-1).to(torch.float64) / tied.sum(-1)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose argmax class is the label: mean_i 1[argmax_c p_ic = y_i] (``1 / m`` where the
    label is one of ``m`` classes tied at the top).

    :raises ValueError: if a row of ``probs`` is not a probability vector (e.g. logits), or on bad shapes or labels.
    """
    probs, labels = _check_probs(probs, labels)
    return float(_confidence_correct(probs, labels)[1].mean())


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> ReliabilityBins:
    """Bin top-label confidence into ``num_bins`` equal-width bins ((k-1)/B, k/B] on [0, 1].

    probs [N, C], labels [N] -> ReliabilityBins of ``[num_bins]`` tensors (mean confidence, accuracy, count).

    :raises ValueError: if a row of ``probs`` is not a probability vector (e.g. logits), on bad shapes or labels, or for
        ``num_bins`` above ``10**6`` (each bin's three entries are allocated: 10**12 bins asked 24 TB).
    """
    num_bins = check_count(num_bins, "num_bins")
    if num_bins > _MAX_BINS:
        raise ValueError(f"num_bins must be at most {_MAX_BINS:,} (each bin is allocated; 15 is the usual ECE), got "
                         f"{num_bins:,}")
    probs = _tensor(probs, "probs")  # its own dtype, read before _check_probs makes float64 of it
    dtype = probs.dtype
    probs, labels = _check_probs(probs, labels)
    conf, correct = _confidence_correct(probs, labels)
    # Right-closed bins as in Guo et al. 2017: confidence exactly k/B falls in bin k-1. The comparison is made in
    # float32 for float32 input, edges rounded like the probabilities: float32's 0.6 is 0.60000002, and would leave its
    # bin in float64. Half precision is binned as float32 values: edges rounded to bfloat16 would move (14/15 is
    # 0.93359375 there), and a confidence above 14/15 would fall in the bin below
    where = torch.float32 if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float64
    edges = (torch.arange(num_bins + 1, dtype=torch.float64) / num_bins).to(where)
    idx = (torch.searchsorted(edges, conf.to(where).contiguous()) - 1).clamp(0, num_bins - 1)
    counts = torch.bincount(idx, minlength=num_bins)
    denom = counts.clamp(min=1).to(torch.float64)
    conf_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, idx, conf)
    correct_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, idx, correct)
    return ReliabilityBins(conf_sum / denom, correct_sum / denom, counts)


def ece(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    """Expected calibration error as a fraction: sum_b (n_b / N) |acc_b - conf_b| (multiply by 100 to report).

    :raises ValueError: if a row of ``probs`` is not a probability vector (e.g. logits), or on bad shapes or labels.
    """
    bins = reliability_bins(probs, labels, num_bins)  # its checks (num_bins at most 10**6 included)
    weights = bins.counts.to(torch.float64) / bins.counts.sum()
    return float((weights * (bins.accuracy - bins.confidence).abs()).sum())


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood in nats: -mean_i log max(p_{i,y_i}, 1e-12).

    :raises ValueError: if a row of ``probs`` is not a probability vector (e.g. logits), or on bad shapes or labels.
    """
    probs, labels = _check_probs(probs, labels)
    p_true = probs.gather(1, labels[:, None]).squeeze(1)
    return float(-p_true.clamp(min=_NLL_FLOOR).log().mean())


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Brier score: mean_i sum_c (p_ic - 1[c = y_i])^2.

    :raises ValueError: if a row of ``probs`` is not a probability vector (e.g. logits), or on bad shapes or labels.
    """
    probs, labels = _check_probs(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(torch.float64)
    return float(((probs - onehot) ** 2).sum(dim=1).mean())


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy over the last dim in nats, with 0 log 0 = 0 (xlogy handles p = 0); its terms summed in ascending order,
    so that rows equal but for the order of their entries have bit-equal entropies (the AUROCs rank them exactly)."""
    return -torch.special.xlogy(p, p).sort(dim=-1).values.sum(dim=-1)


def _sample_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over the samples (dim 0) of ``x [S, ...]``, summed in ascending order: the same bits whatever the
    order of the draws."""
    return x.sort(dim=0).values.mean(dim=0)


def predictive_entropy(sample_probs: torch.Tensor) -> torch.Tensor:
    """Total uncertainty per example in nats: sample_probs [S, N, C] -> [N], H[mean_s p_s].

    :raises ValueError: if a row of ``sample_probs`` is not a probability vector (e.g. logits), or on a bad shape.
    """
    sample_probs = _check_sample_probs(sample_probs)
    return _entropy(_sample_mean(sample_probs))


def expected_entropy(sample_probs: torch.Tensor) -> torch.Tensor:
    """Aleatoric uncertainty per example in nats: sample_probs [S, N, C] -> [N], mean_s H[p_s].

    :raises ValueError: if a row of ``sample_probs`` is not a probability vector (e.g. logits), or on a bad shape.
    """
    sample_probs = _check_sample_probs(sample_probs)
    return _sample_mean(_entropy(sample_probs))


def mutual_information(sample_probs: torch.Tensor) -> torch.Tensor:
    """Epistemic uncertainty per example: sample_probs [S, N, C] -> [N], max(H[mean_s p_s] - mean_s H[p_s], 0).

    Exactly 0 for examples on which all samples agree (float rounding of the mean could leave ~1e-17), so for S = 1:
    right for a point estimate, and no measure of a sampling guide's epistemic uncertainty, which needs S >= 2.

    :raises ValueError: if a row of ``sample_probs`` is not a probability vector (e.g. logits), or on a bad shape.
    """
    sample_probs = _check_sample_probs(sample_probs)
    mi = (_entropy(_sample_mean(sample_probs)) - _sample_mean(_entropy(sample_probs))).clamp(min=0.0)
    agree = (sample_probs == sample_probs[:1]).all(dim=2).all(dim=0)
    return mi.masked_fill(agree, 0.0)


def _midranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x [M]`` with equal values sharing the average of their ranks. Equal exactly, with no
    tolerance: an entropy is flat at its maximum (``log C - 2 delta^2``), so near-uniform rows a float32 step apart
    differ by 1e-13 in it, a real order (the entropies here are summed order-free: permuted rows are equal)."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    return (ends - (counts.to(torch.float64) - 1) / 2)[inverse]


def _scores(scores_in, scores_out) -> tuple[torch.Tensor, torch.Tensor]:
    """Both score vectors in one dtype that ranks them exactly: float64, or int64 for integers (float64 would tie
    integers beyond 2**53).

    :raises ValueError: for integer scores beyond ``2**53`` given with float ones: float64 cannot hold them, so they
        would tie with their float neighbours (an AUROC of 0.5 where the scores differ).
    """
    s_in, s_out = _tensor(scores_in, "scores_in"), _tensor(scores_out, "scores_out")
    for name, s in (("scores_in", s_in), ("scores_out", s_out)):
        if s.dtype == torch.uint64 and bool((s.view(torch.int64) < 0).any()):  # as int64 they wrapped negative
            raise ValueError(f"{name} holds unsigned 64-bit integers of 2**63 or more, beyond int64, which ranks them "
                             "exactly: subtract an offset from both score sets, or give them as floats")
    exact = not (s_in.is_floating_point() or s_out.is_floating_point())
    for name, s in (("scores_in", s_in), ("scores_out", s_out)):
        if not exact and not s.is_floating_point() and s.numel() and int(s.long().abs().max()) > 2 ** 53:
            raise ValueError(f"{name} holds integers beyond 2**53 while the other scores are floats: float64 cannot "
                             "compare them exactly; give both as integers or both as floats")
    dtype = torch.int64 if exact else torch.float64
    return s_in.to(dtype), s_out.to(dtype)


def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """P(score_out > score_in) + 1/2 P(tie): how well a score (entropy, MI) flags shifted examples.

    scores_in [N_in], scores_out [N_out]; Mann-Whitney U from midranks: (R_out - n_out(n_out+1)/2) / (n_in n_out).
    """
    s_in, s_out = _scores(scores_in, scores_out)
    for name, s in (("scores_in", s_in), ("scores_out", s_out)):
        if s.ndim != 1:
            raise ValueError(f"{name} must have shape [N], got {tuple(s.shape)}")
        if s.numel() == 0:
            raise ValueError(f"empty input: {name} has no elements")
        if not torch.isfinite(s).all():
            raise ValueError(f"{name} contains non-finite values (nan or inf)")
    n_in, n_out = s_in.numel(), s_out.numel()
    rank_out = _midranks(torch.cat([s_in, s_out]))[n_in:].sum()
    return float((rank_out - n_out * (n_out + 1) / 2) / (n_in * n_out))


def stratified_auroc(scores_in: torch.Tensor, scores_out: torch.Tensor, covariate_in: torch.Tensor,
                     covariate_out: torch.Tensor, bins: int = 5) -> float:
    """:func:`auroc` counted over pairs in the same covariate bin only: how well a score flags shifted examples
    that a nuisance covariate (a multiple-choice answer's length) does not already tell apart.

    P(score_out > score_in + 1/2 tie | both in the same bin), the bins the ``bins`` quantile bins of the pooled
    covariate, each value placed by its mid-rank there (equal values always share a bin): each bin's Mann-Whitney
    AUROC weighted by its n_in n_out pairs. scores_in, covariate_in [N_in]; scores_out, covariate_out [N_out]. A score
    that only repeats the covariate falls towards 0.5.

    :raises ValueError: on bad shapes, empty or non-finite inputs, ``bins`` < 1, or when no bin holds examples of
        both sets (the covariate alone separates them).
    """
    bins = check_count(bins, "bins")
    s_in, s_out = _scores(scores_in, scores_out)
    c_in = _tensor(covariate_in, "covariate_in").to(torch.float64)
    c_out = _tensor(covariate_out, "covariate_out").to(torch.float64)
    for name, c, s in (("covariate_in", c_in, s_in), ("covariate_out", c_out, s_out)):
        if c.shape != s.shape:
            raise ValueError(f"{name} must have one value per score, shape {tuple(s.shape)}; got {tuple(c.shape)}")
        if not torch.isfinite(c).all():
            raise ValueError(f"{name} contains non-finite values (nan or inf)")
    auroc(s_in, s_out)  # the scores' own checks
    pooled = torch.cat([c_in, c_out])
    # by mid-rank, not by quantile edges: an edge equal to a value (an integer length) put that value in the next bin
    # beside the next value, and a score that only repeats the length kept its whole AUROC (1.0 for 0.5, or no error)
    which = ((_midranks(pooled) - 0.5) / len(pooled) * bins).floor().long().clamp(max=bins - 1)
    b_in, b_out = which[: len(c_in)], which[len(c_in):]
    total = pairs = 0.0
    for b in range(bins):
        i, o = s_in[b_in == b], s_out[b_out == b]
        if len(i) and len(o):
            total += auroc(i, o) * len(i) * len(o)
            pairs += len(i) * len(o)
    if not pairs:
        raise ValueError(f"no covariate bin of {bins} holds examples of both sets: the covariate alone separates them")
    return total / pairs


def _uncertainty(probs: torch.Tensor) -> torch.Tensor:
    """``1 - max p`` of each row of the float64 ``probs [..., C]`` as the sum of its entries but one top one, over the
    row's sum: ``[...]`` float64, what selective prediction ranks by (least uncertain = most confident first).

    Not ``1 - max p``: float32 rounds a confidence within 6e-8 of 1 to 1.0, tying examples whose small entries
    (1e-9, 3e-12) still hold their margins at float32's relative precision, entries that
    :func:`~pyro_lora.calibration.apply_temperature` rebuilds a row from; and over the row's sum, so that a row summing
    to 0.9999999 ranks as its renormalised twin. A temperature thus keeps the ranking of two-class rows exactly.
    """
    ascending = probs.sort(-1).values  # one order of summation for every permutation of a row: permuted rows tie
    rest = ascending[..., :-1].sum(-1)
    return rest / (rest + ascending[..., -1])


def _tie_groups(u: torch.Tensor, rtol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """The tie group of each value of the float64 uncertainties ``u [N]`` (``[N]``, 0 for the smallest) and the
    groups' sizes, for the selective-prediction metrics (the AUROCs tie exact equals only: :func:`_midranks`): in
    sorted order a value within ``rtol`` (relative) of its group's first joins the group, so a chain of values each
    near the one before does not tie its far-apart ends. Float64's rounding of a row's sum (0.1 + 0.2 against
    0.15 + 0.15 beside one top probability 0.7) is no order, while the margins float32 probabilities hold (relative
    6e-8 and more) all are."""
    order = torch.argsort(u, stable=True)
    ranked = u[order]
    below = ranked - rtol * ranked.abs()  # value j joins a group first at i where below[j] <= ranked[i]; increasing
    starts = torch.ones_like(ranked, dtype=torch.bool)
    starts[1:] = below[1:] > ranked[:-1]  # chained: each value near the one before
    firsts = starts.nonzero().flatten()
    ends = torch.cat([firsts[1:], torch.tensor([len(ranked)], device=firsts.device)])
    wide = below[ends - 1] > ranked[firsts]
    # a chain wider than rtol (rare: float64 values spaced by about rtol) is split where its group's first is left behind
    for first, end in zip(firsts[wide].tolist(), ends[wide].tolist()):
        i = first
        while i < end:
            starts[i] = True
            i = int(torch.searchsorted(below, ranked[i], right=True))
    groups = starts.cumsum(0) - 1
    inverse = torch.empty_like(groups)
    inverse[order] = groups
    return inverse, torch.bincount(groups)


def risk_coverage(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy when only the k most confident examples are kept, for k = 1..N.

    probs [N, C], labels [N] -> (coverages [N] = k/N, accuracies [N]).

    Examples are ranked by their uncertainty ``1 - max p``, computed as the sum of the row's other entries (over the
    row's sum), not by ``max p``: float32 confidences saturated at 1.0 are no tie while their small entries differ,
    and a temperature keeps the ranking of two-class rows. True ties are averaged, not broken by input order: when
    the k-th example falls inside a group of m equally confident examples with c correct, of which j are kept, the
    kept ones count j c / m correct (the expectation over the orders of the tie group), so the result does not depend
    on the order of the examples. Ties are uncertainties equal up to float64's rounding of the row sums (within a
    relative 1e-12 of their group's smallest: rows of one top probability 0.7 whose other entries are 0.1, 0.2 and 0.15, 0.15), far finer than the
    margins float32 probabilities hold: repeated inputs, an ensemble's agreeing members, rows saturated to
    a one-hot (float32 margins beyond 103 nats), float64 rounded probabilities of one top value (in float32 their
    other entries differ by its own resolution: no tie). At a group's end, and everywhere without ties, this is the plain
    cumulative accuracy.

    :raises ValueError: if a row of ``probs`` is not a probability vector (e.g. logits), or on bad shapes or labels.
    """
    probs, labels = _check_probs(probs, labels)
    _, correct = _confidence_correct(probs, labels)
    n = len(correct)
    # tie groups, most confident (least uncertain) first: their sizes m_g and correct counts c_g
    inverse, counts = _tie_groups(_uncertainty(probs))
    hits = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, correct)
    start = counts.cumsum(0) - counts  # examples more confident than the group
    before = hits.cumsum(0) - hits  # correct ones among them
    group = torch.repeat_interleave(torch.arange(len(counts)), counts)  # group of the k-th most confident, [N]
    k = torch.arange(1, n + 1, dtype=torch.float64)
    kept = k - start[group].to(torch.float64)  # j: how many of its group the first k keep, 1..m
    expected_correct = before[group] + kept * hits[group] / counts[group].to(torch.float64)
    return k / n, expected_correct / k


def accuracy_at_coverage(probs: torch.Tensor, labels: torch.Tensor, coverage: float) -> float:
    """Accuracy on the ``coverage * N`` most confident examples, rounded half up (at least one), 0 < coverage <= 1.

    Confidence ties at the cut are averaged (see :func:`risk_coverage`): the result does not depend on the
    order of the examples.

    :raises ValueError: if a row of ``probs`` is not a probability vector (e.g. logits), or on bad shapes or labels.
    """
    if getattr(coverage, "ndim", 0) or check_positive(coverage, "coverage") > 1.0:  # True is a slip, not 100%
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    _, accuracies = risk_coverage(probs, labels)
    # half up (Python's round() keeps 2 of 5 at 0.5), in exact decimals: 0.7 * 45 is 31.499999999999996 in floats
    k = max(1, math.floor(_decimal(coverage) * len(accuracies) + Fraction(1, 2)))
    return float(accuracies[k - 1])


def _decimal(x) -> Fraction:
    """``x`` as the decimal written for it: its shortest repr at its own precision (a float32 0.7 is 0.699999988 in
    float64)."""
    if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, *_FLOAT8):  # dtypes numpy lacks: shortest round trip
        value = x.detach().cpu()
        return next(Fraction(s) for s in (f"{float(value):.{d}g}" for d in range(1, 18))
                    if torch.tensor(float(s)).to(value.dtype) == value)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if hasattr(x, "dtype"):
        return Fraction(np.format_float_positional(np.asarray(x)[()], unique=True))
    return Fraction(repr(float(x)))


def aurc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the risk-coverage curve: mean over k = 1..N of (1 - accuracy of the k most confident).

    Confidence ties are averaged (see :func:`risk_coverage`): the expectation over the orders within each tie
    group, independent of the order of the examples.

    :raises ValueError: if a row of ``probs`` is not a probability vector (e.g. logits), or on bad shapes or labels.
    """
    _, accuracies = risk_coverage(probs, labels)
    return float((1.0 - accuracies).mean())


def summarize(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> dict[str, float]:
    """Table columns: {"accuracy": fraction, "ece": x100, "nll": nats, "brier": score}.

    :raises ValueError: if a row of ``probs`` is not a probability vector (e.g. logits), or on bad shapes or labels.
    """
    return {
        "accuracy": accuracy(probs, labels),
        "ece": 100.0 * ece(probs, labels, num_bins),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
    }
