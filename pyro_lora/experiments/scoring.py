"""Scores of one prediction: calibration, uncertainty, selective prediction and out-of-distribution detection."""

import numpy as np
import torch

from .. import metrics as M
from ..metrics import summarize


MI_SAMPLES_NOTE = ("mutual information n/a: one weight sample per example (--samples 1), and MI needs at least 2 "
                   "(with one sample it is 0 by construction); rerun with --samples 2 or more")
MI_NO_SAMPLES_NOTE = ("mutual information n/a: this predictive draws no weight samples (e.g. Laplace's GLM probit "
                      "link, in closed form), and MI needs several")


def _mi_samples(prediction, point_estimate, no_samples_note=MI_NO_SAMPLES_NOTE):
    """The per-sample probabilities that mutual information can be computed from, and None or the reason it cannot.

    MI needs at least 2 weight samples. A point estimate (one set of weights) has MI exactly 0, whatever it kept;
    any other predictive with fewer than 2 samples (none kept: a closed-form predictive; ``S = 1``) has none: its
    MI of 0 would be the sample count speaking, not the posterior.
    """
    kept = prediction.sample_probs
    count = 0 if kept is None else kept.shape[0]
    samples = prediction.probs.unsqueeze(0) if kept is None else kept
    if count >= 2 or point_estimate:
        return samples, None
    return samples, MI_SAMPLES_NOTE if count == 1 else no_samples_note


def score(prediction, num_bins=15, point_estimate=False, no_samples_note=MI_NO_SAMPLES_NOTE):
    """Calibration, uncertainty and selective-prediction metrics of one :class:`Prediction`.

    The entropy is the reported predictive's (``probs``); the mutual information comes from the kept samples, which
    for a GLM probit predictive are logit draws of the same Gaussian (``probs`` the probit's, not their mean).

    ``mutual_information`` is NaN (n/a) where it cannot be computed, with the reason in ``note``: fewer than 2
    weight samples from a predictive that is not a ``point_estimate`` (whose MI is exactly 0); ``no_samples_note``
    is the reason where it kept none.
    """
    p = prediction.probs
    samples, missing = _mi_samples(prediction, point_estimate, no_samples_note)
    row = array_scores(p, prediction.labels, M.predictive_entropy(p.unsqueeze(0)),
                       None if missing else M.mutual_information(samples), num_bins)
    if missing:
        row["note"] = missing
    return row


def _array(name, values, dtypes, ndim, length=None):
    """``values`` as a tensor, or a ValueError naming the array ``name`` where it is not of one of the numpy kinds
    ``dtypes`` (``"f"`` float16/32/64, ``"iu"`` integers), not ``ndim``-D or not ``length`` long: a stored str, bytes,
    object, datetime or longdouble array died in ``torch.as_tensor`` with a message naming no file."""
    array = np.asarray(values) if not isinstance(values, torch.Tensor) else values
    floats = (np.float16, np.float32, np.float64)  # torch has no longdouble
    if isinstance(array, np.ndarray) and (array.dtype not in floats if dtypes == "f" else array.dtype.kind not in dtypes):
        raise ValueError(f"its {name} array is of dtype {array.dtype}, not "
                         f"{'float16, float32 or float64' if dtypes == 'f' else 'an integer'}")
    tensor = torch.as_tensor(array)
    if tensor.dim() != ndim or length is not None and len(tensor) != length:
        raise ValueError(f"its {name} array has shape {tuple(tensor.shape)}, not {ndim}-D"
                         + (f" of length {length} (as many as the probs' examples)" if length is not None else ""))
    return tensor


# how far a stored per-example entropy may be from the probs' own: the same function on the same values, up to a float32
# round trip (as check_scores compares the scores)
ENTROPY_RTOL, ENTROPY_ATOL = 1e-5, 1e-7


def array_scores(probs, labels, entropy, mutual_information, num_bins=15):
    """The scores of one evaluation from its per-example arrays (:func:`prediction_arrays`): what :func:`score`
    computes, and what a resume recomputes from a run's stored arrays to check its rows. The entropy is recomputed
    from ``probs``; the mutual information is taken as stored (its weight samples are not kept: it cannot be).

    :param probs: ``[N, C]`` predictive probabilities (float16/32/64); ``labels``: ``[N]`` class indices (integers).
    :param entropy: ``[N]`` predictive entropy per example, which must be that of ``probs`` (:data:`ENTROPY_RTOL`);
        ``mutual_information``: ``[N]`` per example, or None (n/a: the row's MI is NaN, as it is where the array is
        NaN).
    :raises ValueError: if an array is of another dtype or shape, a row of ``probs`` is not a probability vector, or
        on bad labels (:mod:`~pyro_lora.metrics`); if ``entropy`` is not the entropy of ``probs``.
    """
    p = _array("probs", probs, "f", 2)
    y = _array("labels", labels, "iu", 1, len(p))
    h = M.predictive_entropy(p.unsqueeze(0))
    stored = _array("entropy", entropy, "f", 1, len(p))
    if not torch.allclose(stored.to(h.dtype), h, rtol=ENTROPY_RTOL, atol=ENTROPY_ATOL, equal_nan=True):
        worst = int((stored.to(h.dtype) - h).abs().nan_to_num(float("inf")).argmax())
        raise ValueError(f"its entropy array is not the entropy of its probs (example {worst}: {float(stored[worst])!r} "
                         f"stored, {float(h[worst])!r} from the probs)")
    mi = None if mutual_information is None else _array("mutual_information", mutual_information, "f", 1, len(p))
    row = summarize(p, y, num_bins)
    row.update(
        entropy=float(h.mean()),
        mutual_information=float("nan") if mi is None else float(mi.mean()),
        accuracy_at_50=M.accuracy_at_coverage(p, y, 0.5),
        accuracy_at_80=M.accuracy_at_coverage(p, y, 0.8),
        aurc=M.aurc(p, y),
    )
    return row


def ood_auroc(in_dist, shifted, point_estimate=False):
    """AUROC of telling the shifted set from the in-distribution test set by entropy and by mutual information
    (NaN, n/a, where either set's MI cannot be computed: see :func:`score`)."""
    si, missing_in = _mi_samples(in_dist, point_estimate)
    so, missing_out = _mi_samples(shifted, point_estimate)
    missing = missing_in or missing_out
    return array_ood_auroc(in_dist.probs, shifted.probs,
                           None if missing else M.mutual_information(si), None if missing else M.mutual_information(so))


def array_ood_auroc(probs_in, probs_out, mi_in, mi_out):
    """:func:`ood_auroc` from the ``[N_in, C]`` / ``[N_out, C]`` probabilities (their entropies computed here) and
    ``[N_in]`` / ``[N_out]`` mutual informations of the test and the shifted set (:func:`prediction_arrays`); its
    MI AUROC NaN (n/a) where either MI is None or NaN.

    :raises ValueError: on arrays of another dtype or shape (as :func:`array_scores`)."""
    p_in, p_out = _array("probs", probs_in, "f", 2), _array("probs", probs_out, "f", 2)
    mis = [None if m is None else _array("mutual_information", m, "f", 1, len(p))
           for m, p in ((mi_in, p_in), (mi_out, p_out))]
    mi_na = None in mis or any(bool(mi.isnan().any()) for mi in mis)
    return {
        "ood_auroc_entropy": M.auroc(M.predictive_entropy(p_in.unsqueeze(0)), M.predictive_entropy(p_out.unsqueeze(0))),
        "ood_auroc_mi": float("nan") if mi_na else M.auroc(*mis),
    }


def join_row(head, *parts):
    """``head`` updated with every dict of ``parts``; their ``note`` entries joined by ``"; "`` (each once)."""
    row = dict(head)
    notes = []
    for part in parts:
        row.update(part)
        if part.get("note") and part["note"] not in notes:
            notes.append(part["note"])
    row.pop("note", None)
    if notes:
        row["note"] = "; ".join(notes)
    return row


def prediction_arrays(prediction, dataset, seed, point_estimate=False):
    """The npz arrays of one evaluation; mutual information all NaN where it cannot be computed (see :func:`score`)."""
    samples, missing = _mi_samples(prediction, point_estimate)
    key = f"{dataset}__seed{seed}__"
    mi = M.mutual_information(samples).numpy() if not missing else np.full(len(prediction.labels), np.nan)
    return {
        key + "probs": prediction.probs.numpy(),
        key + "labels": prediction.labels.numpy(),
        key + "entropy": M.predictive_entropy(prediction.probs.unsqueeze(0)).numpy(),
        key + "mutual_information": mi,
    }
