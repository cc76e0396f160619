"""torch.distributed on CPU (gloo, 2 spawned processes): SVI, KFAC, predict and TFB on 2 ranks equal 1 process."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_bert
from pyro.infer import Trace_ELBO

from pyro_lora.guides import MAPGuide
from pyro_lora.guides.laplace import LaplaceGuide
from pyro_lora.guides.tfb import TFBGuide
from pyro_lora import distributed
from pyro_lora.likelihoods import SequenceClassification
from pyro_lora.model import LoraModel
from pyro_lora.predictive import predict
from pyro_lora.training import fit
from test_training import toy_data

WORLD = 2


def make_model(num_data):
    net = tiny_bert(num_labels=2)
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # training must be deterministic to compare ranks with one process
    return LoraModel(net, SequenceClassification(), random="AB", num_data=num_data)


def run_all():
    """Every check's results; in one process or, under a process group, on this rank (same full data on all)."""
    out = {}
    world = distributed.world_size()
    # SVI: the global batch of 16 is one batch in one process, two halves of 8 on two ranks
    model = make_model(num_data=48)
    guide = MAPGuide(model)
    data = toy_data(16, 16 // world)
    params = model.point_parameters() + list(guide.parameters())
    local = distributed.split_batches(data)[0]
    loss = Trace_ELBO().differentiable_loss(model, guide, local) / 48
    loss.backward()
    out["loss"] = distributed.all_reduce_gradients(params, loss.item())
    out["grads"] = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    if distributed.rank() > 0:
        with torch.no_grad():
            guide.locs[0].add_(1.0)  # fit must start from rank 0's parameters
    out["fit_loss"] = fit(model, guide, data, lr=1e-2, max_grad_norm=0.5, progress=False)
    out["params"] = [p.detach().clone() for p in params]
    # KFAC at full rank (k = D, so the Nystrom factor is exact); 3 batches: ranks hold 2 and 1
    model.write_adapter({k: v.detach() for k, v in guide.mean().items()})
    laplace = LaplaceGuide(model, fisher="exact", rank=32).fit(toy_data(10, 4, seed=1), progress=False)
    out["kfac"] = {
        "small": [f.small_vecs @ (f.small_vals.unsqueeze(-1) * f.small_vecs.mT) for f in laplace.factors],
        "large": [  # U diag(s) U^T + sigma (I - U U^T)
            f.large_vecs @ ((f.large_vals - f.large_rest[:, None]).unsqueeze(-1) * f.large_vecs.mT)
            + f.large_rest[:, None, None] * torch.eye(f.large_vecs.shape[1])
            for f in laplace.factors
        ],
        "n": laplace.num_data.clone(),
        "loglik": laplace.log_likelihood.clone(),
    }
    # TFB: the metric is summed over ranks, so the bisection takes one process's steps
    tfb = TFBGuide(model)
    out["tfb"] = tfb.search(toy_data(10, 4, seed=3), criterion="nll", low=1.0, high=50.0, iterations=3, num_samples=3,
                            tolerance=0.005, progress=False)
    # predict with weight samples (TFB's, whose draws do not hinge on an eigenbasis); other ranks' RNGs
    # differ, so rank 0's samples must be used everywhere
    torch.manual_seed(5 + distributed.rank())
    pred = predict(model, tfb, toy_data(10, 4, seed=2), num_samples=3, keep_samples=True)
    out["pred"] = (pred.probs, pred.labels, pred.sample_probs)
    return out


def _worker(rank, tmp, crash):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        if crash and rank == 1:
            raise RuntimeError("boom on rank 1")
        torch.manual_seed(0)
        out = distributed.all_reduce_(torch.ones(1)) if crash else run_all()
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def close(a, b):
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if torch.is_tensor(a):
        return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6)
    if isinstance(a, float):
        return abs(a - b) <= 1e-5 * (1 + abs(a))
    return a == b


def test_two_ranks_equal_one_process(tmp_path):
    torch.manual_seed(0)
    single = run_all()
    mp.spawn(_worker, args=(str(tmp_path), False), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert single["pred"][2].shape == (3, 10, 2) and single["kfac"]["n"] == 10
    assert any(s["feasible"] for s in single["tfb"]) and not all(s["feasible"] for s in single["tfb"])
    for key in ("loss", "grads", "fit_loss", "params", "kfac", "pred", "tfb"):
        for r, out in enumerate(ranks):
            assert close(out[key], single[key]), f"rank {r}: {key} differs from one process"


def test_a_crash_in_one_rank_is_raised_not_hung(tmp_path):
    # whichever rank mp.spawn hears from first: rank 1's own error, or rank 0's collective broken by it
    with pytest.raises(mp.ProcessRaisedException, match="(?i)boom on rank 1|connection closed|gloo"):
        mp.spawn(_worker, args=(str(tmp_path), True), nprocs=WORLD, join=True)


def test_helpers_are_identities_without_a_process_group():
    t = torch.arange(3.0)
    assert distributed.world_size() == 1 and distributed.is_main() and distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.gather_cat(t) is t and distributed.all_reduce_(t, op="max") is t
    with pytest.raises(ValueError, match="op must be"):
        distributed.all_reduce_(t, op="prod")
