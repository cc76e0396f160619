"""The batched predictive: S posterior samples in one forward, probabilities averaged over samples."""

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import distributed
from .training import to_device


@dataclass
class Prediction:
    """Predictions over a dataset.

    :ivar probs: ``[N, C]`` mean over samples of the softmax (zeros for missing choices).
    :ivar labels: ``[N]``.
    :ivar sample_probs: ``[S, N, C]`` per-sample probabilities when kept, else ``None``.
    :ivar seconds: wall time of the prediction.
    """

    probs: torch.Tensor
    labels: torch.Tensor
    sample_probs: torch.Tensor = None
    seconds: float = 0.0


@torch.no_grad()
def predict(model, guide, data, num_samples=8, mean=False, chunk_size=None, keep_samples=False, progress=False):
    """Posterior predictive ``p(y | x, D) ~ 1/S sum_s softmax(f(x; theta_s))`` over ``data``.

    One set of ``S`` weight samples is drawn and used for every batch; each forward runs a chunk of
    ``chunk_size`` samples (default all ``S``) as one batch of ``chunk * B`` rows.

    :param guide: a guide, or ``None`` for the network's own (peft) weights.
    :param mean: use the posterior mean (one forward) instead of samples; point-estimate guides always do.
    :param keep_samples: also return the per-sample probabilities ``[S, N, C]``.

    Under ``torch.distributed`` every rank is given the same ``data``, predicts its contiguous block of
    batches with rank 0's weight samples, and returns the gathered predictions of all ``N`` examples in order.
    """
    net = model.net
    was_training = net.training
    net.eval()
    start = time.perf_counter()
    if guide is None:
        values, samples = None, None
    elif mean or guide.deterministic:
        values, samples = guide.mean(), None
    else:
        values, samples = guide.sample(num_samples), num_samples
        if distributed.is_distributed():  # one set of samples for all the data: rank 0's
            values = {k: v.contiguous() for k, v in values.items()}  # samples may be expanded views
            distributed.broadcast_parameters(values.values())
    data = distributed.split_batches(data)
    chunk = chunk_size or samples
    probs, labels = [], []
    try:
        for batch in tqdm(data, desc="predict", disable=not (progress and distributed.is_main()), dynamic_ncols=True):
            batch = to_device(batch, model.device)
            if samples is None:
                p = torch.softmax(model.logits(batch, values).float(), -1).unsqueeze(0)
            else:
                p = torch.cat(
                    [
                        torch.softmax(model.logits(batch, {k: v[i : i + chunk] for k, v in values.items()}, min(chunk, samples - i)).float(), -1)
                        for i in range(0, samples, chunk)
                    ]
                )
            probs.append(p)
            labels.append(model.likelihood.observed(batch))
    finally:
        net.train(was_training)
    # a rank may hold no batch when there are fewer batches than ranks
    width = distributed.all_reduce_(torch.tensor(max((p.shape[-1] for p in probs), default=0)), op="max").item()
    if width == 0:
        raise ValueError("predict got no batches: the data is empty")
    rows = [torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in probs]
    sample_probs = torch.cat(rows, 1) if rows else torch.zeros(samples or 1, 0, width, device=model.device)
    sample_probs = distributed.gather_cat(sample_probs.transpose(0, 1)).transpose(0, 1).cpu()
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=model.device)
    return Prediction(
        probs=sample_probs.mean(0),
        labels=distributed.gather_cat(labels).cpu(),
        sample_probs=sample_probs if keep_samples else None,
        seconds=time.perf_counter() - start,
    )
