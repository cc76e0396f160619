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


def array_scores(probs, labels, entropy, mutual_information, num_bins=15):
    """The scores of one evaluation from its per-example arrays (:func:`prediction_arrays`): what :func:`score`
    computes, and what a resume recomputes from a run's stored arrays to check its rows.

    :param probs: ``[N, C]`` predictive probabilities; ``labels``: ``[N]`` class indices.
    :param entropy: ``[N]`` predictive entropy per example; ``mutual_information``: ``[N]`` per example, or None
        (n/a: the row's MI is NaN, as it is where the array is NaN).
    :raises ValueError: if a row of ``probs`` is not a probability vector, or on bad shapes or labels
        (:mod:`~pyro_lora.metrics`).
    """
    p, y = torch.as_tensor(probs), torch.as_tensor(labels)
    row = summarize(p, y, num_bins)
    row.update(
        entropy=float(torch.as_tensor(entropy).mean()),
        mutual_information=(float("nan") if mutual_information is None
                            else float(torch.as_tensor(mutual_information).mean())),
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
    return array_ood_auroc(M.predictive_entropy(in_dist.probs.unsqueeze(0)), M.predictive_entropy(shifted.probs.unsqueeze(0)),
                           None if missing else M.mutual_information(si), None if missing else M.mutual_information(so))


def array_ood_auroc(entropy_in, entropy_out, mi_in, mi_out):
    """:func:`ood_auroc` from the per-example ``[N_in]`` / ``[N_out]`` entropies and mutual informations of the test
    and the shifted set (:func:`prediction_arrays`); its MI AUROC NaN (n/a) where either MI is None or NaN."""
    mi_na = mi_in is None or mi_out is None or any(bool(torch.as_tensor(mi).isnan().any()) for mi in (mi_in, mi_out))
    return {
        "ood_auroc_entropy": M.auroc(entropy_in, entropy_out),
        "ood_auroc_mi": float("nan") if mi_na else M.auroc(mi_in, mi_out),
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
