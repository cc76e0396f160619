"""torch.distributed on CPU (gloo, 2 spawned processes): SVI, KFAC, predict and TFB on 2 ranks equal 1 process."""

import copy
import math
import warnings
import random
import tempfile
import types
from collections import UserList
from datetime import timedelta

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_bert
from pyro.infer import Trace_ELBO

from pyro_lora.guides import MAPGuide, MeanFieldGuide
from pyro_lora.guides.laplace import LaplaceGuide
from pyro_lora.guides.llla import LastLayerLaplaceGuide
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


def pooled_model(seed):
    """A classifier loaded from a tiny BERT MLM checkpoint, which lacks the pooler: transformers draws it (and the
    head) under ``seed``, as with the DDP habit ``set_seed(seed + rank)`` when ``seed`` differs by rank."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    from pyro_lora.pretrained import add_lora, load_pretrained

    folder = tempfile.mkdtemp()
    with open(f"{folder}/vocab.txt", "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]) + "\n")
    BertTokenizerFast(f"{folder}/vocab.txt").save_pretrained(folder)
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, max_position_embeddings=64))
    mlm.config.to_json_file(f"{folder}/config.json")  # save_pretrained writes on rank 0 only
    safetensors.torch.save_model(mlm, f"{folder}/model.safetensors", metadata={"format": "pt"})
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pooler and head drawn at load
        net, _ = load_pretrained(folder, "classification", num_labels=2, progress=False)
    torch.manual_seed(0)  # every rank alike from here on (peft's lora_A too)
    net = add_lora(net, r=4)
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # as make_model
    return LoraModel(net, SequenceClassification(), random="AB", num_data=16)


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
        "rows": laplace._rows,  # the examples' fingerprint a refit is compared by: every rank's, summed
    }
    # TFB: the metric is summed over ranks, so the bisection takes one process's steps
    tfb = TFBGuide(model)
    # low=0.1: under TFB's canonical SVD signs (ceee03e) this draw finds low=1 infeasible (sigma_q 0: no samples)
    out["tfb"] = tfb.search(toy_data(10, 4, seed=3), criterion="nll", low=0.1, high=50.0, iterations=3, num_samples=3,
                            tolerance=0.005, progress=False)
    # predict with weight samples; other ranks' RNGs differ, so rank 0's samples must be used everywhere
    torch.manual_seed(5 + distributed.rank())
    pred = predict(model, tfb, toy_data(10, 4, seed=2), num_samples=3, keep_samples=True)
    out["pred"] = (pred.probs, pred.labels, pred.sample_probs)
    # Laplace's draws: the same factors summed in another order (eigh picks other eigenvectors) give the same draws
    laplace.set_prior_precision(1.0)
    torch.manual_seed(7 + distributed.rank())
    out["laplace_pred"] = predict(model, laplace, toy_data(10, 4, seed=2), num_samples=3, keep_samples=True).sample_probs
    # the GLM predictive's logit draws (link="mc") under each rank's own seed: rank 0's draws everywhere (each rank
    # drew its own: 0.003 apart here, a flipped class under last-layer Laplace)
    torch.manual_seed(9 + distributed.rank())
    out["glm_mc"] = laplace.predict_glm(toy_data(10, 4, seed=2), link="mc", num_samples=20).probs
    # a short last batch on one rank (8 and 1 examples in step 2) counts by its examples, as in one process's global
    # batch of 9 (an equal mean weighted the lone example's data term by N/1 for N/9: parameters 0.037 off)
    parts = toy_data(25, 8)  # 8, 8, 8, 1 examples
    data = parts if world > 1 else [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in ((parts[0], parts[2]), (parts[1], parts[3]))]
    model = make_model(num_data=48)
    guide = MAPGuide(model)
    fit(model, guide, data, lr=3e-2, progress=False)
    out["uneven_fit"] = [p.detach().clone() for p in model.point_parameters() + list(guide.parameters())]
    # accumulated micro-batches weigh every example alike, as one batch of them all: rank 0 accumulates 4 + 4 examples,
    # rank 1 4 + 2 (each rank's equal mean of its micro-batches, ranks weighted by examples: parameters 2e-3 off)
    parts = toy_data(14, 4)
    data, accum = (parts, 2) if world > 1 else ([{k: torch.cat([b[k] for b in parts]) for k in parts[0]}], 1)
    model = make_model(num_data=48)
    guide = MAPGuide(model)
    out["accumulated_fit"] = (fit(model, guide, data, lr=3e-2, grad_accum_steps=accum, progress=False),
                              [p.detach().clone() for p in model.point_parameters() + list(guide.parameters())])
    # a pooler drawn at load under the same seed on every rank passes the ranks' check of the whole network
    model = pooled_model(seed=1000)
    guide = MAPGuide(model)
    fit(model, guide, toy_data(16, 16 // world), epochs=2, lr=3e-2, progress=False)  # one step of 16 per epoch
    out["pooled"] = ([p.detach().clone() for p in guide.parameters()], predict(model, guide, toy_data(8, 4, seed=2)).probs)
    return out


def _refused(call):
    try:
        call()
    except ValueError as error:
        return str(error)
    return None


def _raised(call):
    try:
        call()
    except Exception as error:
        return error
    return None


def run_misuses(tmp):
    """What each rank sees of a misuse (the message it raised, or a value to compare across ranks)."""
    from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

    from pyro_lora.io import save_guide

    out, r = {}, distributed.rank()
    model = make_model(num_data=None)
    out["num_data"] = _refused(lambda: fit(model, MAPGuide(model), toy_data(16, 4), progress=False))
    # DDP's hooks averaged the head's gradients equally before fit weighted each rank by its examples (0.07 off)
    out["ddp"] = _refused(lambda: LoraModel(torch.nn.parallel.DistributedDataParallel(tiny_bert(num_labels=2)),
                                            SequenceClassification()))
    odd = make_model(num_data=20)
    with warnings.catch_warnings(record=True) as caught:  # 5 batches over 2 ranks: the fifth was never trained on
        warnings.simplefilter("always")
        fit(odd, MAPGuide(odd), toy_data(20, 4), progress=False)
    out["odd_batches"] = [str(w.message) for w in caught if "never trained on" in str(w.message)]
    # a shuffling loader without a generator: after the ranks' own streams (fit's) each drew another permutation
    torch.manual_seed(100 + r)
    loader = DataLoader(TensorDataset(torch.arange(16)), batch_size=4, shuffle=True)
    seen = torch.cat([b[0] for b in distributed.split_batches(loader)])
    out["covered"] = sorted(distributed.gather_cat(seen).tolist())
    # tensors of another dtype or shape per rank: gloo read one rank's bytes as another's (7 as 9.8e-45), no error
    out["gather_dtype"] = _refused(lambda: distributed.gather_cat(torch.tensor([1.5, 2.5]) if r == 0 else torch.tensor([7, 8])))
    out["gather_shape"] = _refused(lambda: distributed.gather_cat(torch.zeros(1, 6) if r == 0 else torch.zeros(1, 2, 3)))
    out["reduce_dtype"] = _refused(lambda: distributed.all_reduce_(torch.ones(2) if r == 0 else torch.ones(2, dtype=torch.int32)))
    out["reduce_shape"] = _refused(lambda: distributed.all_reduce_([torch.ones(2, 3) if r == 0 else torch.ones(3, 2)]))
    out["gathered_rows"] = distributed.gather_cat(torch.full((r + 1, 2), float(r))).tolist()  # rows per rank may differ
    batches = DataLoader([torch.arange(i, i + 4) for i in range(0, 16, 4)], batch_size=None, shuffle=True)  # collated
    out["covered_collated"] = sorted(distributed.gather_cat(torch.cat(list(distributed.split_batches(batches)))).tolist())
    from accelerate.data_loader import prepare_data_loader

    prepared = prepare_data_loader(DataLoader(TensorDataset(torch.arange(16)), batch_size=4), num_processes=2,
                                   process_index=r, put_on_device=False)
    out["accelerate"] = _refused(lambda: distributed.split_batches(prepared))
    out["sharded"] = _refused(lambda: distributed.split_batches(DataLoader(
        TensorDataset(torch.arange(16)), batch_size=4, sampler=DistributedSampler(TensorDataset(torch.arange(16)), 2, r))))

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(8))

    out["iterable"] = _refused(lambda: distributed.split_batches(DataLoader(Stream(), batch_size=2)))
    out["lengths"] = _refused(lambda: predict(make_model(48), None, toy_data(16 if r == 0 else 12, 4)))
    # data of the same length that differ: shuffled per rank (8 of 32 examples scored twice, 8 never) are put in rank
    # 0's order; sharded by the user before the library shards it again (half the examples scored, Laplace's N
    # halved) is refused
    mine = toy_data(16, 4)
    random.Random(100 + r).shuffle(mine)
    out["shuffled_per_rank"] = predict(make_model(48), None, mine).labels.tolist()
    out["shuffled_records"] = [b["text"] for b in distributed.split_batches(DataLoader(
        random.Random(r).sample([{"text": f"row {i}"} for i in range(8)], 8), batch_size=1, collate_fn=lambda b: b[0]))]
    out["sharded_by_hand"] = _refused(lambda: LaplaceGuide(make_model(48)).fit(distributed.shard(toy_data(16, 4)),
                                                                               progress=False))
    out["records_per_rank"] = _refused(lambda: distributed.split_batches(
        DataLoader([{"text": f"rank {r} row {i}"} for i in range(8)], batch_size=2)))
    flipped = toy_data(12, 4)  # one label of the middle batch flipped on rank 1: counted "3 of 3", as sorted digests shift
    flipped[1]["labels"][0] = 1 - flipped[1]["labels"][0] if r else flipped[1]["labels"][0]
    out["one_flipped"] = _refused(lambda: predict(make_model(48), None, flipped))

    class Reordering:
        """Batches in another order on each pass, as a hand-written shuffling iterable: fit read it once and replayed
        the first epoch's order every epoch."""

        def __init__(self):
            self.passes = 0

        def __len__(self):
            return 4

        def __iter__(self):
            self.passes += 1
            return iter([{"x": torch.tensor([(i * self.passes) % 5])} for i in range(1, 5)])

    # a validation search reads a loader once: rank 0's draw, whatever each rank's generator (it was refused as
    # "not the same on every rank" with the advice to pass a shuffling DataLoader, which this is)
    from pyro_lora.data import fixed_batches

    own = DataLoader(TensorDataset(torch.arange(16)), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(r))
    fixed = torch.cat([b[0] for b in fixed_batches(own, "a search")])
    out["fixed"] = distributed.gather_cat(fixed[None]).tolist()
    class TorchShuffled(Reordering):
        """Batches in torch.randperm's order: inside fit each rank draws from a stream of its own."""

        def __iter__(self):
            return iter([toy_data(16, 4)[i] for i in torch.randperm(4).tolist()])

    model = make_model(num_data=16)
    out["torch_shuffled_fit"] = _refused(lambda: fit(model, MAPGuide(model), TorchShuffled(), epochs=2, progress=False))
    # records read by their attributes (a dataclass was read by type only: every record alike, rank 1's order kept)
    rows = [types.SimpleNamespace(ids=torch.tensor([i])) for i in range(6)]
    random.Random(r).shuffle(rows)
    out["attribute_rows"] = [int(x.ids) for x in distributed.same_data(rows, "record")]

    class FailsOnRank1(Reordering):
        """Reading fails on rank 1 only: rank 0 waited for it in the next collective (30 min, gloo's timeout)."""

        def __iter__(self):
            if r == 1:
                raise OSError("stream dropped on rank 1")
            return iter(toy_data(16, 4))

    class NoLengthOnRank1(Reordering):
        def __len__(self):
            if r == 1:
                raise ValueError("no length on rank 1")
            return 4

    out["read_one_rank"] = _refused(lambda: predict(make_model(48), None, FailsOnRank1()))
    out["len_one_rank"] = _refused(lambda: predict(make_model(48), None, NoLengthOnRank1()))
    blocks = distributed.split_batches(Reordering())
    out["passes"] = [distributed.gather_cat(torch.cat([b["x"] for b in blocks])).tolist() for _ in range(2)]
    # after fit every rank draws from one stream again
    model = make_model(num_data=16)
    guide = MAPGuide(model)
    torch.manual_seed(0)
    fit(model, guide, toy_data(16, 4), progress=False)
    out["after_fit"] = distributed.gather_cat(torch.rand(1)).tolist()
    # save_guide(adapter=True) writes the adapter into every rank's network
    save_guide(guide, f"{tmp}/guide", adapter=True)
    out["adapter"] = distributed.gather_cat(torch.stack([p.detach().sum() for _, p in model.named_lora_weights()])[None]).tolist()
    # a rank whose guide differs (loaded before rank 0 had written it) is refused, not mixed in
    if r == 1:
        with torch.no_grad():
            guide.locs[0].add_(1.0)
    out["differs"] = _refused(lambda: predict(model, guide, toy_data(16, 4)))
    # a check that refuses on one rank only: every rank raises, none waits in a collective for it
    model = make_model(num_data=16)
    first = MAPGuide(model)
    fit(model, first, toy_data(16, 4), progress=False)
    model.write_adapter(first.mean())
    if r == 1:
        with torch.no_grad():
            model.point_parameters()[0].add_(1.0)  # the head changed on rank 1 only
    out["save_one_rank"] = _refused(lambda: save_guide(first, f"{tmp}/first"))
    out["predict_one_rank"] = _refused(lambda: predict(model, first, toy_data(16, 4)))
    out["frozen_fit"] = _refused(lambda: fit(model, MeanFieldGuide(model), toy_data(16, 4), train_network=False,
                                             progress=False))
    # a batch only rank 1 holds is refused there: rank 0 raised nothing and waited in the next collective
    bad = toy_data(16, 4)
    bad[-1] = {**bad[-1], "labels": bad[-1]["labels"].clone().fill_(-100)}
    out["batch_one_rank"] = _refused(lambda: predict(make_model(48), None, bad))
    # a width whose predictive overflows on rank 0's block only: every rank scores it as too wide (rank 1 raised a
    # plain ValueError naming rank 0's while rank 0 went on to the next width's collectives)
    from pyro_lora.guides.tuning import validation_scores
    from test_laplace import mlp_data, mlp_model

    overflowing = mlp_data()  # two batches, the same on every rank: the first is rank 0's alone
    overflowing[0] = {**overflowing[0], "input_ids": overflowing[0]["input_ids"] * math.inf}
    torch.manual_seed(0)
    guide = MeanFieldGuide(mlp_model(), b="normal", init_scale=0.5)
    out["overflow_one_rank"] = tuple(validation_scores(guide, overflowing, num_samples=2))
    # rank 0's write failed: no rank may have updated its adapter
    model = make_model(num_data=16)
    before = [p.detach().clone() for _, p in model.named_lora_weights()]
    (tmp_file := f"{tmp}/a_file") and open(tmp_file, "w").close()
    from pyro_lora.io import export_adapter

    try:
        export_adapter(MAPGuide(model, init={n: v + 1.0 for n, v in model.adapter_values().items()}), f"{tmp_file}/adapter")
    except (ValueError, RuntimeError):  # rank 0: its folder cannot be written there; the others: rank 0 failed
        pass
    out["adapter_kept"] = all(torch.equal(p, q) for (_, p), q in zip(model.named_lora_weights(), before))
    # every rank scores the whole validation (or test) set: a DistributedSampler's part, or a part sharded by hand, set
    # another prior precision on each rank (0.01 and 1000) or scored a padded half
    model = make_model(num_data=16)
    laplace = LaplaceGuide(model).fit(toy_data(16, 4), progress=False)
    examples = [{k: v[i] for k, v in b.items()} for b in toy_data(16, 4) for i in range(4)]
    part = DataLoader(examples, batch_size=4, sampler=DistributedSampler(examples, WORLD, r, shuffle=False))
    out["val_sampler"] = _refused(lambda: laplace.optimize_prior_precision("val_nll", val_loader=part, grid=[0.1, 10.0]))
    out["val_by_hand"] = _refused(lambda: laplace.optimize_prior_precision(
        "val_nll", val_loader=distributed.shard(toy_data(16, 4)), grid=[0.1, 10.0]))
    out["glm_sampler"] = _refused(lambda: laplace.predict_glm(part))
    # a loader dropping its last batch on rank 1 only: refused there alone, it left rank 0 in the next collective
    # ("too many values to unpack"), and the next call on the same data failed on both ranks ("Connection closed")
    dropping = DataLoader(examples, batch_size=3, drop_last=r == 1)
    last = LastLayerLaplaceGuide(model).fit(toy_data(8, 4), progress=False)
    out["glm_drop_last"] = [_refused(lambda: guide.predict_glm(dropping)) for guide in (laplace, last)]
    out["glm_after"] = laplace.predict_glm(toy_data(8, 4)).probs
    out["save_paths"] = _refused(lambda: save_guide(laplace, f"{tmp}/laplace_rank{r}"))  # rank 1's was never written
    # settings that differ across ranks: each search returned normally with its rank's own value (lambda 0.01 on rank 0,
    # 10 on rank 1) and only a later predict refused; a method or link per rank left the ranks in other collectives
    from pyro_lora.guides.ensemble import EnsembleGuide, predict_ensemble
    from pyro_lora.guides.tuning import tune_on_validation

    before = laplace.factors[0].prior_precision.clone()
    out["settings"] = [
        _refused(lambda: laplace.optimize_prior_precision("val_nll", val_loader=toy_data(8, 4), grid=[[0.01, 0.1], [10.0, 100.0]][r])),
        _refused(lambda: laplace.optimize_prior_precision(["marglik", "val_nll"][r], val_loader=[None, toy_data(8, 4)][r])),
        _refused(lambda: laplace.predict_glm(toy_data(8, 4), link=["probit", "mc"][r])),
        _refused(lambda: predict(model, laplace, toy_data(8, 4), num_samples=4 + r)),
        _refused(lambda: TFBGuide(model).search(toy_data(8, 4), seed=r, progress=False)),
        _refused(lambda: tune_on_validation(laplace, "knob", lambda v: None, [1.0, 2.0, 4.0], toy_data(8, 4), num_samples=2,
                                            max_flip_rate=[None, 0.1][r])),
        _refused(lambda: LastLayerLaplaceGuide(model).optimize_prior_precision("marglik", max_iter=10 + r)),
        _refused(lambda: predict_ensemble(model, EnsembleGuide(model, num_members=2), toy_data(8, 4), num_samples=2 * (1 + r))),
    ]
    out["settings_kept"] = torch.equal(laplace.factors[0].prior_precision, before)
    # fit with a guide built otherwise on each rank: a std map per rank trained one set of parameters into two posteriors
    # (stds 31.8 apart), a dropout rate per rank mixed two runs, b="delta" and "normal" (other tensors) aborted gloo
    from pyro_lora.guides.mcdropout import MCDropoutGuide

    out["fit_guides"] = [
        _refused(lambda: fit(model, MeanFieldGuide(model, std=["softplus", "square"][r]), toy_data(8, 4), progress=False)),
        _refused(lambda: fit(model, MCDropoutGuide(model, p=[0.1, 0.5][r]), toy_data(8, 4), progress=False)),
        _refused(lambda: fit(model, MeanFieldGuide(model, b=["delta", "normal"][r]), toy_data(8, 4), progress=False)),
    ]
    # a validation loader dropping its last batch on rank 1 only: refused there alone, it left rank 0 in the next
    # collective and the next legitimate call failed on both ranks
    out["tune_drop_last"] = _refused(lambda: tune_on_validation(laplace, "knob", lambda v: None, [1.0, 2.0, 4.0],
                                                                DataLoader(examples, batch_size=3, drop_last=r == 1),
                                                                num_samples=2))
    out["after_drop_last"] = predict(model, MAPGuide(model), toy_data(8, 4), mean=True).probs
    # a guide built otherwise on each rank: fisher="exact" on one and "mc" on the other summed both kinds of curvature
    # into one posterior without a word; rank=4 and 5 sent sums of other sizes and gloo aborted the process
    out["guide_settings"] = [_refused(lambda: LaplaceGuide(model, fisher=["exact", "mc"][r]).fit(toy_data(8, 4), progress=False)),
                             _refused(lambda: LaplaceGuide(model, rank=4 + r).fit(toy_data(8, 4), progress=False)),
                             _refused(lambda: LastLayerLaplaceGuide(model, hessian=["full", "kfac"][r]).fit(toy_data(8, 4), progress=False))]
    # equal settings however typed (a grid as a list and as a tensor, 4 and numpy's 4) were refused as different
    laplace.optimize_prior_precision("val_nll", val_loader=toy_data(8, 4), grid=[[0.1, 10.0], torch.tensor([0.1, 10.0], dtype=torch.float64)][r])
    out["settings_typed"] = predict(model, laplace, toy_data(8, 4), num_samples=[4, np.int64(4)][r]).probs
    init = lambda worker: None  # noqa: E731
    out["kept_options"] = distributed.split_batches(DataLoader(TensorDataset(torch.arange(8)), batch_size=2, num_workers=1,
                                                               worker_init_fn=init)).worker_init_fn is init
    # a rank's own checkpoint_dir was refused by the first save, after the whole run (rank 0 named its own path twice)
    model = make_model(num_data=16)
    steps = []
    out["checkpoint_per_rank"] = _refused(lambda: fit(model, MAPGuide(model), toy_data(16, 4), checkpoint_dir=f"{tmp}/ckpt_rank{r}",
                                                      callbacks=[steps.append], progress=False)), len(steps)
    out["epochs_per_rank"] = _refused(lambda: fit(model, MAPGuide(model), toy_data(16, 4), epochs=1 + r, progress=False))

    # a map-style dataset sharded by hand was split again: fit trained on 8 of 16 examples, predict returned 8
    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return examples[i]

    class Fingerprinted(Rows):  # a Hugging Face dataset's .shard(): its fingerprint tells it from the whole
        _fingerprint = f"shard {r}"

    def loader(dataset):
        return DataLoader(dataset, batch_size=2)

    hand = loader(torch.utils.data.Subset(Rows(), range(r, 16, WORLD)))
    model = make_model(num_data=16)
    out["hand_fit"] = _refused(lambda: fit(model, MAPGuide(model), hand, callbacks=[steps.append], progress=False)), len(steps)
    out["hand_predict"] = _refused(lambda: predict(make_model(48), None, hand))
    out["hand_val"] = _refused(lambda: laplace.optimize_prior_precision("val_nll", val_loader=hand, grid=[0.1, 10.0]))
    out["fingerprint"] = _refused(lambda: predict(make_model(48), None, loader(Fingerprinted())))
    out["whole_dataset"] = len(predict(make_model(48), None, loader(torch.utils.data.Subset(Rows(), range(16)))).labels)
    # a sampler sharding the whole dataset by hand was not seen: fit trained on 8 of 16 examples, predict returned 8
    from torch.utils.data import BatchSampler, SubsetRandomSampler, WeightedRandomSampler

    mine = SubsetRandomSampler(list(range(r, 16, WORLD)), generator=torch.Generator().manual_seed(0))
    steps.clear()
    model = make_model(num_data=16)
    out["sampler_fit"] = _refused(lambda: fit(model, MAPGuide(model), DataLoader(Rows(), batch_size=2, sampler=mine),
                                              callbacks=[steps.append], progress=False)), len(steps)
    out["batch_sampler"] = _refused(lambda: predict(make_model(48), None, DataLoader(
        Rows(), batch_sampler=BatchSampler(mine, 2, drop_last=False))))
    weights = torch.ones(16).index_fill_(0, torch.tensor([r]), 2.0)
    out["weighted"] = _refused(lambda: predict(make_model(48), None, DataLoader(
        Rows(), batch_size=2, sampler=WeightedRandomSampler(weights, 16, replacement=False, generator=torch.Generator().manual_seed(0)))))
    whole = SubsetRandomSampler(list(range(16)) if r == 0 else range(16))  # the same selection, held otherwise
    out["whole_sampler"] = len(predict(make_model(48), None, DataLoader(Rows(), batch_size=2, sampler=whole)).labels)

    class Mine(torch.utils.data.Sampler):  # shards by hand, which no attribute shows: predict returned 8 of 16 rows
        def __iter__(self):
            return iter(range(r, 16, WORLD))

        def __len__(self):
            return 16 // WORLD

    out["own_sampler"] = _refused(lambda: predict(make_model(48), None, DataLoader(Rows(), batch_size=2, sampler=Mine())))
    # a random part drawn per rank (replacement) is no sharding: rank 0's draw is every rank's
    drawn = WeightedRandomSampler(torch.ones(16), 16, replacement=True, generator=torch.Generator().manual_seed(r))
    resampled = distributed.split_batches(DataLoader(TensorDataset(torch.arange(16)), batch_size=4, sampler=drawn))
    out["replacement"] = distributed.gather_cat(torch.cat([b[0] for b in resampled]))
    part = WeightedRandomSampler(torch.ones(16), 8, replacement=False, generator=torch.Generator().manual_seed(r))
    resampled = distributed.split_batches(DataLoader(TensorDataset(torch.arange(16)), batch_size=4, sampler=part))
    out["weighted_part"] = distributed.gather_cat(torch.cat([b[0] for b in resampled]))
    # shuffled per rank (fit's own streams) with drop_last: each rank's draw drops another remainder, no sharding
    steps.clear()
    model = make_model(num_data=15)
    out["drop_last_fit"] = _refused(lambda: fit(model, MAPGuide(model), DataLoader(Rows(), batch_size=3, shuffle=True,
                                                                                    drop_last=True),
                                                callbacks=[steps.append], progress=False)), len(steps)
    # float64 gradients and loss were summed in float32: 1 + 1e-12 came back 1.0, 3e39 inf, 1e-300 0
    wide = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    wide.grad = torch.tensor([1 + 1e-12, 1e-300, 3e39], dtype=torch.float64)
    out["float64_grads"] = (distributed.all_reduce_gradients([wide], loss=1 + 1e-12), wide.grad.tolist())
    # an error of another kind than ValueError in the checks on one rank (a collate's KeyError): raised on every rank
    def failing():
        with distributed.refused_together("read"):
            if r == 1:
                raise KeyError("attention_mask")
    out["key_error"] = _refused(failing) if r == 0 else type(_raised(failing)).__name__
    # a model whose num_data differs by rank trained without a word, each rank scaling its data term to its own N
    model = make_model(num_data=16 * (1 + r))
    out["num_data_per_rank"] = _refused(lambda: fit(model, MAPGuide(model), toy_data(16, 4), progress=False))
    # a frozen pooler drawn at load from each rank's seed ran another network on each rank, unchecked (only the adapter
    # and guide were compared): fit's parameters 0.25 off one process, predict's probabilities 0.07
    model = pooled_model(seed=1000 + r)
    guide = MAPGuide(model)
    out["pooler_fit"] = _refused(lambda: fit(model, guide, toy_data(16, 4), train_network=True, progress=False))
    out["pooler_predict"] = _refused(lambda: predict(model, guide, toy_data(8, 4)))
    out["pooler_laplace"] = _refused(lambda: LaplaceGuide(model).fit(toy_data(8, 4), progress=False))
    # fitted on ranks that agree, then rank 1's pooler changed: the GLM predictive and the validation searches refused on
    # rank 1 alone, and rank 0 went on into the next collective (the ranks fell out of step)
    model = pooled_model(seed=1000)
    laplace = LaplaceGuide(model).fit(toy_data(8, 4), progress=False)
    last = LastLayerLaplaceGuide(model).fit(toy_data(8, 4), progress=False)
    pooler = model.net.base_model.model.bert.pooler.dense.weight
    drawn = pooler.detach().clone()
    with torch.no_grad():
        pooler.add_(r)
    out["pooler_glm"] = [_refused(lambda: laplace.predict_glm(toy_data(8, 4))),
                         _refused(lambda: laplace.optimize_prior_precision("val_nll", val_loader=toy_data(8, 4))),
                         _refused(lambda: last.predict_glm(toy_data(8, 4))),
                         _refused(lambda: last.optimize_prior_precision("val_nll", val_loader=toy_data(8, 4)))]
    # each rank's own prior precision: predict_glm returned each rank's own predictive without a word
    with torch.no_grad():
        pooler.copy_(drawn)
    laplace.set_prior_precision(1e-4 * 1e8 ** r)
    last.set_prior_precision(1e-4 * 1e8 ** r)
    out["precision_glm"] = [_refused(lambda: laplace.predict_glm(toy_data(8, 4))), _refused(lambda: last.predict_glm(toy_data(8, 4)))]
    # peft drew lora_A from each rank's seed: predict after fit was refused over these weights, which no guide reads
    # (it hands every site); predict without a guide, and a Laplace fit at the adapter, do read them
    model = make_model(num_data=16)
    with torch.no_grad():
        model.named_lora_weights()[0][1].add_(r)
    guide = MAPGuide(model)
    fit(model, guide, toy_data(16, 4), lr=3e-2, progress=False)
    out["unread_lora"] = (predict(model, guide, toy_data(8, 4, seed=2)).probs,
                          LaplaceGuide(model).fit(toy_data(8, 4), progress=False, loc=guide.mean()).log_likelihood.item())
    # a loc handed to the fit is what its curvature is taken at: each rank's own was summed unchecked
    out["own_loc"] = _refused(lambda: LaplaceGuide(model).fit(toy_data(8, 4), progress=False,
                                                              loc={n: v + r for n, v in guide.mean().items()}))
    fresh = make_model(num_data=16)  # no fit: predict(model, None) after one is refused as missing it, on every rank
    with torch.no_grad():
        fresh.named_lora_weights()[0][1].add_(r)
    out["read_lora"] = [_refused(lambda: predict(fresh, None, toy_data(8, 4))),
                        _refused(lambda: LaplaceGuide(model).fit(toy_data(8, 4), progress=False))]
    # a dynamic RoPE recomputes inv_freq from each forward's length: after fit, rank 0's last batch of 12 tokens and
    # rank 1's of 4 left it different, and predict was refused as a frozen weight drawn from each rank's seed
    model = _dynamic_rope_model()
    guide = MAPGuide(model)
    fit(model, guide, [_rows(12), _rows(4)], lr=1e-2, progress=False)
    frequencies = next(b for n, b in model.net.named_buffers() if n.endswith("rotary_emb.inv_freq"))
    out["dynamic_rope"] = (frequencies.clone(), predict(model, guide, [_rows(12), _rows(4)]).probs)
    return out


def _dynamic_rope_model():
    import transformers as T

    from pyro_lora.pretrained import add_lora

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           max_position_embeddings=8, pad_token_id=0, num_labels=2,
                           rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    net = add_lora(T.LlamaForSequenceClassification(config), r=2, targets=["q_proj", "v_proj"])
    return LoraModel(net, SequenceClassification(), random="AB", num_data=8)


def _rows(length):
    ids = torch.randint(1, 64, (4, length), generator=torch.Generator().manual_seed(length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(4) % 2}


def _worker(rank, tmp, crash, misuses=False):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        if crash and rank == 1:
            raise RuntimeError("boom on rank 1")
        torch.manual_seed(0)
        out = distributed.all_reduce_(torch.ones(1)) if crash else run_misuses(tmp) if misuses else run_all()
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
    for key in ("loss", "grads", "fit_loss", "params", "kfac", "pred", "tfb", "laplace_pred", "glm_mc", "uneven_fit",
                "accumulated_fit", "pooled"):
        for r, out in enumerate(ranks):
            assert close(out[key], single[key]), f"rank {r}: {key} differs from one process"


def test_misuses_are_refused_on_every_rank_or_made_right(tmp_path):
    """Each of these gave a silent wrong result: num_data=None halved the data term against one process; fit's per-rank
    streams made a shuffling loader's blocks overlap (46 of 64 examples an epoch) and stayed after it (ranks drew
    apart); a DistributedSampler halved the data again; ranks given other data lengths returned a mix; save_guide
    wrote the adapter on rank 0 only; a rank holding another guide was mixed into predict (0.33 off)."""
    mp.spawn(_worker, args=(str(tmp_path), False, True), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for out in ranks:
        assert "the model needs num_data" in out["num_data"]
        assert out["ddp"].startswith("the network (DistributedDataParallel) is wrapped for data parallelism: pyro_lora "
                                     "averages the gradients across ranks itself")
        assert out["covered"] == list(range(16))  # each example once, whatever the ranks' own streams drew
        assert out["gather_dtype"] == ("gather_cat: the ranks give tensors of other dtypes or shapes (tensor's dtype and "
                                       "dims after the first): rank 0: torch.float32 []; rank 1: torch.int64 []; a "
                                       "collective over them reads one rank's bytes as another's: give every rank "
                                       "tensors of one dtype and shape")
        assert "rank 0: torch.float32 [6]; rank 1: torch.float32 [2, 3]" in out["gather_shape"]
        assert "all_reduce_: the ranks give tensors of other dtypes or shapes (tensors): rank 0: torch.float32 [2]; " \
               "rank 1: torch.int32 [2]" in out["reduce_dtype"]
        assert "rank 0: torch.float32 [2, 3]; rank 1: torch.float32 [3, 2]" in out["reduce_shape"]
        assert out["gathered_rows"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert "already gives each rank a part of the data (DistributedSampler" in out["sharded"]
        assert "over an IterableDataset cannot be split" in out["iterable"]
        assert "the ranks were given 3 to 4 batches" in out["lengths"]
        assert sorted(out["shuffled_per_rank"]) == sorted(torch.cat([b["labels"] for b in toy_data(16, 4)]).tolist())
        assert "the ranks hold different batches (2 of 2 differ from rank 0's, not only in order)" in out["sharded_by_hand"]
        assert out["records_per_rank"].startswith("the ranks hold different records (8 of 8 differ from rank 0's")
        assert "the ranks hold different batches (1 of 3 differ from rank 0's, not only in order)" in out["one_flipped"]
        assert out["torch_shuffled_fit"] is None
        assert out["passes"] == [[1, 2, 3, 4], [2, 4, 1, 3]]
        assert out["fixed"][0] == out["fixed"][1] and sorted(out["fixed"][0]) == list(range(16))
        assert out["after_fit"][0] == out["after_fit"][1]
        assert out["adapter"][0] == out["adapter"][1]
        assert "cannot predict: the ranks hold different values of ['guide.locs.0']" in out["differs"]
        assert out["covered_collated"] == list(range(16))
        assert "already gives each rank a part of the data (DataLoaderShard" in out["accelerate"]
        for key in ("save_one_rank", "predict_one_rank"):
            assert "changed since this guide was built or trained" in out[key]
        assert "cannot fit: the ranks hold different values of" in out["frozen_fit"]
        assert "labels hold negative values" in out["batch_one_rank"]
        assert out["overflow_one_rank"][0] == math.inf and out["overflow_one_rank"][2] is None
        assert out["adapter_kept"] and out["kept_options"]
        for key in ("val_sampler", "glm_sampler"):
            assert "already gives each rank a part of the data (DistributedSampler" in out[key]
        for message in out["glm_drop_last"]:  # both ranks refuse, and stay in step for the next call
            assert "drops its last incomplete batch (drop_last=True)" in message
            assert message.startswith("cannot predict: rank 1 refused: ") == (out is ranks[0])
        torch.testing.assert_close(out["glm_after"], ranks[0]["glm_after"])
        assert "the ranks hold different batches (2 of 2 differ from rank 0's" in out["val_by_hand"]
        assert "the ranks were given different paths to save the guide to" in out["save_paths"]
        grid, method, link, samples, seed, flips, iters, ensemble = out["settings"]
        assert grid.startswith("the ranks were given different settings of optimize_prior_precision (grid: [0.01, 0.1] on "
                               "rank 0, [10.0, 100.0] on rank 1): give every rank the same settings")
        assert "optimize_prior_precision (method: 'marglik' on rank 0, 'val_nll' on rank 1)" in method
        assert "settings of predict_glm (link: 'probit' on rank 0, 'mc' on rank 1)" in link
        assert "settings of predict (num_samples: 4 on rank 0, 5 on rank 1)" in samples
        assert "settings of search sigma_q (seed: 0 on rank 0, 1 on rank 1)" in seed
        assert "settings of the knob tuning (max_flip_rate: None on rank 0, 0.1 on rank 1)" in flips
        assert "optimize_prior_precision (max_iter: 10 on rank 0, 11 on rank 1)" in iters
        assert "settings of predict_ensemble (num_samples: 2 on rank 0, 4 on rank 1)" in ensemble
        assert out["settings_kept"]  # refused before any work
        std, p, b = out["fit_guides"]
        assert "different settings of fit (guide's std: 'softplus' on rank 0, 'square' on rank 1)" in std
        assert "different settings of fit (guide's p: 0.1 on rank 0, 0.5 on rank 1)" in p
        assert "guide's b: 'delta' on rank 0, 'normal' on rank 1; guide's tensor shapes: " in b
        assert "drops its last incomplete batch (drop_last=True)" in out["tune_drop_last"]
        torch.testing.assert_close(out["after_drop_last"], ranks[0]["after_drop_last"])
        fisher, rank, hessian = out["guide_settings"]
        assert "different settings of fit a Laplace (fisher: 'exact' on rank 0, 'mc' on rank 1)" in fisher
        assert "different settings of fit a Laplace (sketch: 18 on rank 0, 20 on rank 1; rank: [4, 4, 4, 4] on r" in rank
        assert "different settings of fit a last-layer Laplace (hessian: 'full' on rank 0, 'kfac' on rank 1)" in hessian
        torch.testing.assert_close(out["settings_typed"], ranks[0]["settings_typed"])
        message, steps = out["checkpoint_per_rank"]
        assert steps == 0 and message.startswith("the ranks were given different settings of fit (checkpoint_dir: '")
        # a long path keeps its start and its end, where the ranks' paths differ (pytest-xdist's are long)
        assert "/ckpt_rank0' on rank 0, '" in message and "/ckpt_rank1' on rank 1): give every rank the same settings" in message
        assert "different settings of fit (epochs: 1 on rank 0, 2 on rank 1)" in out["epochs_per_rank"]
        message, steps = out["hand_fit"]
        assert steps == 0 and message.startswith("the ranks were given different data (dataset.indices: 'CRC-32 ")
        assert "pyro_lora splits the batches across ranks itself" in message and "do not shard it by hand" in message
        assert out["hand_predict"].startswith("the ranks were given different data (dataset.indices: ")
        assert "the ranks were given different data (dataset.indices: " in out["hand_val"]
        assert "scores the whole data on every rank here" in out["hand_val"]
        assert "(dataset._fingerprint: 'shard 0' on rank 0, 'shard 1' on rank 1)" in out["fingerprint"]
        assert out["whole_dataset"] == 16
        assert "cannot be hashed gave each rank a random fingerprint" in out["fingerprint"]  # the same data refused
        assert "pass new_fingerprint=" in out["fingerprint"]
        message, steps = out["sampler_fit"]
        assert steps == 0 and message.startswith("the ranks were given different data (sampler.indices: 'CRC-32 ")
        assert "pyro_lora splits the batches across ranks itself" in message
        assert out["batch_sampler"].startswith("the ranks were given different data (batch_sampler.sampler.indices: ")
        assert out["weighted"].startswith("the ranks were given different data (sampler.weights: ")
        assert out["whole_sampler"] == 16
        assert out["own_sampler"].startswith("the ranks were given different items to draw batches from")
        assert "[0, 2, 4, 6, 8, 10, 12, 14] on rank 0, [1, 3, 5" in out["own_sampler"]  # numbers in their order
        assert "do not shard it by hand" in out["own_sampler"]
        assert torch.equal(out["replacement"], ranks[0]["replacement"]) and len(out["replacement"]) == 16
        assert torch.equal(out["weighted_part"], ranks[0]["weighted_part"]) and len(out["weighted_part"]) == 8
        assert out["drop_last_fit"] == (None, 2)  # 5 batches of 3 over 2 ranks: 2 steps
        assert out["float64_grads"] == (1 + 1e-12, [1 + 1e-12, 1e-300, 3e39])
        assert "different settings of fit (num_data: 16 on rank 0, 32 on rank 1)" in out["num_data_per_rank"]
        for key in ("pooler_fit", "pooler_predict", "pooler_laplace"):
            assert "the ranks hold different values of ['base_model.model.bert.pooler.dense.weight'" in out[key]
            assert ("bert.pooler.dense.weight is a frozen tensor of the base network (drawn at load: the checkpoint lacks "
                    "it, so each rank drew it from its own seed)") in out[key]
            assert "seed every rank alike before loading" in out[key] and "original_module" not in out[key]
        for message in out["precision_glm"]:
            assert message.startswith("cannot predict: the ranks hold different values of ['guide.") and "prior_precision" in message
        for message in out["pooler_glm"]:
            assert "the base weights differ from the ones the guide was built on" in message
            assert "['base_model.model.bert.pooler.dense.weight']" in message
        assert "the ranks were given different values to fit the Laplace at (loc) (query.lora_A: " in out["own_loc"]
        assert out["own_loc"].endswith("give every rank the same loc (the same guide's mean(), after it is loaded or "
                                       "trained alike on every rank)")
        name = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
        for message in out["read_lora"]:
            assert f"the ranks hold different values of ['{name}']: every rank must hold the same adapter: seed" in message
    assert close(ranks[0]["unread_lora"], ranks[1]["unread_lora"])  # rank 0's guide on both, whatever lora_A holds
    assert not torch.equal(ranks[0]["dynamic_rope"][0], ranks[1]["dynamic_rope"][0])  # each its last batch's
    assert close(ranks[0]["dynamic_rope"][1], ranks[1]["dynamic_rope"][1])
    assert "rank 1 refused" in ranks[0]["batch_one_rank"]
    assert ranks[0]["key_error"] == "cannot read: rank 1 failed: KeyError: 'attention_mask'"
    assert ranks[1]["key_error"] == "KeyError"
    for message, action in zip(ranks[0]["pooler_glm"], ["predict", "tune lambda on validation data"] * 2):
        assert message.startswith(f"cannot {action}: rank 1 refused: ")
    assert ranks[0]["odd_batches"] == ["5 batches over 2 ranks: each rank trains on 2 per epoch, and the last 1 of each "
                                       "epoch's order are never trained on (a list's, or an unshuffled DataLoader's, always "
                                       "the same examples); give a number of batches divisible by 2 (the batch size, or "
                                       "drop_last)"] and ranks[1]["odd_batches"] == []  # rank 0 speaks
    assert ranks[0]["shuffled_per_rank"] == ranks[1]["shuffled_per_rank"]  # rank 0's order on both
    rank_0s = list(range(6))
    random.Random(0).shuffle(rank_0s)
    assert ranks[0]["attribute_rows"] == ranks[1]["attribute_rows"] == rank_0s
    assert "this rank failed to read its batches: OSError: stream dropped on rank 1" in ranks[1]["read_one_rank"]
    assert "another rank failed to read its batches" in ranks[0]["read_one_rank"]
    assert ranks[1]["len_one_rank"] == "no length on rank 1"
    assert "another rank failed to give its data's length" in ranks[0]["len_one_rank"]
    assert sorted(ranks[0]["shuffled_records"] + ranks[1]["shuffled_records"]) == [f"row {i}" for i in range(8)]


def test_the_batch_digest_reads_values_not_reprs():
    """The digest compared across ranks read other objects by repr: a tensor's and an array's are summarised (a
    difference at entry 1000 unseen), a BatchEncoding (a UserDict) fell back to it, a PIL image's holds its address
    and a frozenset's order follows each process's hash seed (the same data refused)."""
    from transformers import BatchEncoding

    from pyro_lora.distributed import _digest

    big = torch.zeros(2000)
    assert _digest({"x": big}) != _digest({"x": big.clone().index_fill_(0, torch.tensor([1000]), 1e-6)})
    assert _digest(BatchEncoding({"x": big})) != _digest(BatchEncoding({"x": big + 1e-6}))
    assert _digest(np.zeros(2000)) != _digest(np.eye(1, 2000, 1000).ravel())
    assert _digest({"c": [[big]]}) != _digest({"c": [[big + 1e-6]]})
    assert _digest(torch.tensor([0.0, -0.0])) == _digest(torch.tensor([0.0, 0.0])) and _digest(-0.0) == _digest(0.0)
    assert _digest({"image": object()}) == _digest({"image": object()})  # by type: its repr holds its address
    assert _digest(frozenset(f"tag{i}" for i in range(20))) == _digest(frozenset(f"tag{i}" for i in reversed(range(20))))
    assert _digest({"a": 1, "b": "x"}) == _digest({"b": "x", "a": 1}) != _digest({"a": 2, "b": "x"})
    assert _digest(torch.ones(2, 3)) != _digest(torch.ones(3, 2)) != _digest(torch.ones(2, 3, dtype=torch.float64))
    # read by type only (every value alike: data that differ accepted) or not at all (the same data refused)
    for one, other in [(types.SimpleNamespace(x=1), types.SimpleNamespace(x=2)), (UserList([1]), UserList([2])),
                       (np.array(["yes", "no"]), np.array(["yes", "non"])), (torch.eye(3).to_sparse(), torch.zeros(3, 3).to_sparse()),
                       (np.array(["2020-01-01"], dtype="datetime64[D]"), np.array(["2020-01-02"], dtype="datetime64[D]")),
                       (torch.ones(3).to(torch.float8_e4m3fn), torch.zeros(3).to(torch.float8_e4m3fn))]:
        assert _digest(one) == _digest(copy.deepcopy(one)) != _digest(other)
    assert _digest(np.arange(3, dtype=">i4")) == _digest(np.arange(3, dtype="<i4"))


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
    with pytest.raises(ValueError, match="needs floating-point tensors"):  # the mean of integers was cast back (or not)
        distributed.all_reduce_(torch.arange(3), op="mean")
    with pytest.raises(ValueError, match="at least one dimension"):
        distributed.gather_cat(torch.tensor(1.0))


def test_a_refusal_is_sent_to_the_other_ranks_by_class_only_where_the_class_pickles():
    """A ValueError class defined in a function failed to pickle on the refusing rank alone, before the collective: the
    other ranks waited for it until the timeout. Such a class, and any other error kind, is sent by name."""
    from pyro_lora.predictive import NonFinitePredictionError

    class Local(ValueError):
        pass

    assert distributed._sendable(NonFinitePredictionError) is NonFinitePredictionError
    assert distributed._sendable(Local) is None and distributed._sendable(KeyError) is None


def test_a_long_value_named_in_a_refusal_keeps_its_end():
    """check_same cut a long value's repr at 80 characters: two ranks' checkpoint paths, differing only at their end,
    were both named '/tmp/pytest-of-root/.../ckp...', hiding the difference the refusal was about."""
    from pyro_lora.distributed import _shown

    path = "/tmp/pytest-of-root/pytest-224/popen-gw0/test_misuses_are_refused_on_ev0/ckpt_rank1"
    shown = _shown(path)
    assert len(shown) == 80 and shown.startswith("'/tmp/pytest-of-root/") and shown.endswith("/ckpt_rank1'")
    assert _shown("short") == "'short'"


def _prior_model(prior):
    """``make_model``'s network and data size under another prior."""
    return LoraModel(make_model(num_data=16).net, SequenceClassification(), random="AB", num_data=16, prior=prior)


def _scaled_prior(scale, loc=0.0):
    import pyro.distributions as pdist

    return lambda site: pdist.Normal(loc, scale).expand(site.shape).to_event(len(site.shape))


def _mvn_prior(variance):
    import pyro.distributions as pdist

    def prior(site):
        # a covariance over each row, held privately (MultivariateNormal's scale_tril)
        cols = site.shape[-1]
        return pdist.MultivariateNormal(torch.zeros(site.shape), variance * torch.eye(cols)).to_event(len(site.shape) - 1)

    return prior


def run_settings():
    """On this rank: refusals of settings that differ across ranks (the message), and equal ones' results."""
    from guides.ensemble import train_ensemble
    from guides.swag import SWAGCollector, SWAGGuide

    r, out = distributed.rank(), {}

    def refused_fit(model, **kwargs):
        guide = MAPGuide(model)
        before = [p.detach().clone() for p in guide.parameters()]
        message = _refused(lambda: fit(model, guide, toy_data(16, 8), epochs=2, lr=3e-2, progress=False, **kwargs))
        return message, all(torch.equal(a, b) for a, b in zip(before, guide.parameters()))

    # the model's prior per rank averaged the gradients of two losses (rank 0's MAP came out at rank 1's prior)
    out["float_prior"] = refused_fit(_prior_model([1.0, 0.05][r]))
    out["site_prior"] = refused_fit(_prior_model(_scaled_prior([0.5, 0.25][r], [0.0, 0.1][r])))
    # a kl_weight schedule per rank trained at the ranks' mean weight; from step 1 on: one step taken before
    out["schedule"] = refused_fit(make_model(num_data=16), kl_weight=lambda step: 1.0 if step == 0 else [1.0, 100.0][r])
    # a covariance per rank, which no public attribute holds, trained rank 0 at rank 1's prior
    out["mvn_prior"] = refused_fit(_prior_model(_mvn_prior([1.0, 1e-4][r])))
    # an invalid weight on one rank was refused there alone: the other died in gloo
    out["invalid_schedule"] = refused_fit(make_model(num_data=16), kl_weight=lambda step: 0.0 if r and step else 1.0)
    # the ELBO's particles and a dropout set on the network per rank trained the ranks on other objectives, unchecked
    out["particles"] = refused_fit(make_model(num_data=16), elbo=Trace_ELBO(num_particles=[1, 8][r]))
    dropped = make_model(num_data=16)
    for m in dropped.net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = [0.0, 0.3][r]
    out["dropout_per_rank"] = refused_fit(dropped)
    # stds equal as the prior holds them (float32) are no difference
    out["rounded_prior"] = refused_fit(_prior_model([0.3, 0.1 + 0.2][r]))
    data = toy_data(16, 8)
    for key, kwargs in {"k": {"k": [2, 3][r]}, "seeds": {"k": 2, "seeds": [[3, 5], [7, 9]][r]},
                        "include_current": {"k": 2, "include_current": [False, True][r]},
                        "fit_kwargs": {"k": 2, "fit_kwargs": {"lr": [3e-2, 1e-2][r]}}}.items():
        out[f"ensemble_{key}"] = _refused(lambda: train_ensemble(make_model(num_data=16), data, **kwargs))
    model = make_model(num_data=16)
    swag = SWAGGuide(model, rank=2)
    out["swag_every"] = _refused(lambda: fit(model, MAPGuide(model), data, epochs=2, lr=3e-2, progress=False,
                                             callbacks=[SWAGCollector(swag, every=[1, 2][r])]))
    out["callback_one_rank"] = _refused(lambda: fit(model, MAPGuide(model), data, lr=3e-2, progress=False,
                                                    callbacks=[SWAGCollector(swag)] if r == 0 else []))
    # a likelihood per rank: predict, the Laplace fit, the GLM predictive and the TFB search scored each rank's block by
    # its own and gathered a blend (cloze normalize None / "tokens": rows 0-3 one's, 4-7 the other's); fit alone refused
    from conftest import tiny_llama

    from pyro_lora.io import save_guide
    from pyro_lora.likelihoods import MultipleChoice

    ids = MultipleChoice(answer_token_ids=[[10, 11, 12], [12, 11, 10]][r])
    lettered = LoraModel(tiny_llama(), ids, random="AB", num_data=16)
    out["predict_likelihood"] = _refused(lambda: predict(lettered, MAPGuide(lettered), data))
    out["laplace_likelihood"] = _refused(lambda: LaplaceGuide(lettered).fit(data, progress=False))
    out["tfb_likelihood"] = _refused(lambda: TFBGuide(lettered).search(data, progress=False))
    # what only a loss reads is fit's: a num_data per rank (each its own evaluation model) predicts as one process
    counted = make_model(num_data=[16, None][r])
    out["predict_num_data"] = predict(counted, MAPGuide(counted), data).probs
    # a guide per rank: rank 0 wrote its own and rank 1 then took its own mean into the adapter
    model = make_model(num_data=16)
    guide = MAPGuide(model)
    with torch.no_grad():
        next(iter(guide.parameters())).add_(0.5 * r)
    out["save_other_guides"] = _refused(lambda: save_guide(guide, f"{tempfile.gettempdir()}/unused", adapter=True))
    # equal settings: one process's result (the global batch of 16 is one batch there, two halves of 8 here)
    model = _prior_model(_scaled_prior(0.5))
    guide = MAPGuide(model)
    fit(model, guide, toy_data(16, 16 // distributed.world_size()), epochs=3, lr=3e-2, progress=False,
        kl_weight=lambda step: 1.0 + step)
    out["equal"] = [p.detach().clone() for p in [*model.point_parameters(), *guide.parameters()]]
    return out


def _settings_worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        torch.save(run_settings(), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_model_schedule_ensemble_and_swag_settings_differing_across_ranks_are_refused(tmp_path):
    """Each of these ran silently before: a prior per rank (float or per site) and a kl_weight schedule per rank trained
    at a blend of the ranks' losses; train_ensemble's seeds per rank kept rank 0's members, another k or
    include_current paired other members' fits (raw gloo errors), a SWAG schedule per rank was found at predict only;
    a likelihood per rank was compared by fit alone (predict, the Laplace fit and the TFB search blended the ranks'
    blocks), and save_guide wrote rank 0's guide while rank 1 took its own mean into its adapter."""
    torch.manual_seed(0)
    single = run_settings()["equal"]
    mp.spawn(_settings_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    site = next(iter(make_model(num_data=16).sites))
    for out in ranks:
        for key in ("float_prior", "site_prior"):
            assert out[key][1], f"{key}: refused before any step"
        assert "different settings of fit (model's prior: 1.0 on rank 0, 0.05 on rank 1)" in out["float_prior"][0]
        assert f"; model's prior of {site}.base_dist.scale: 0.5 on rank 0, 0.25 on rank 1; " in out["site_prior"][0]
        assert "; and 8 more): give every rank the same settings" in out["site_prior"][0]  # loc, scale, density of 4 sites
        assert out["mvn_prior"][1] and f"(model's prior of {site} log-density: [" in out["mvn_prior"][0]
        assert out["rounded_prior"][0] is None
        assert ("different settings of fit (elbo: 'Trace_ELBO' on rank 0, 'Trace_ELBO(num_particles=8, "
                "vectorize_particles=False)' on rank 1)") in out["particles"][0]
        assert "(dropout base_model.model.bert.embeddings.dropout.p: nothing on rank 0, 0.3 on rank 1; " in \
            out["dropout_per_rank"][0]
        message, _ = out["schedule"]
        assert message.startswith("the ranks' kl_weight schedules gave different weights at step 1 (1 on rank 0, 100 on "
                                  "rank 1)")
        message, _ = out["invalid_schedule"]
        assert message.startswith("kl_weight gave 0.0 at step 1" if out is ranks[1] else
                                  "cannot fit: another rank's kl_weight schedule gave an invalid weight at step 1")
        assert "different settings of train_ensemble (k: 2 on rank 0, 3 on rank 1)" in out["ensemble_k"]
        assert "different settings of train_ensemble (seeds: [3, 5] on rank 0, [7, 9] on rank 1)" in out["ensemble_seeds"]
        assert "(include_current: False on rank 0, True on rank 1)" in out["ensemble_include_current"]
        assert "(fit_kwargs['lr']: 0.03 on rank 0, 0.01 on rank 1)" in out["ensemble_fit_kwargs"]
        assert "different settings of SWAG collection (every: 1 on rank 0, 2 on rank 1)" in out["swag_every"]
        assert "different settings of fit (callbacks: ['SWAGCollector'] on rank 0, [] on rank 1)" in out["callback_one_rank"]
        assert close(out["equal"], single)
        assert "different settings of predict (model's likelihood.answer_token_ids: [10, 11, 12] on rank 0, [12, 11, 10] " \
               "on rank 1)" in out["predict_likelihood"]
        assert "different settings of fit a Laplace (model's likelihood.answer_token_ids: " in out["laplace_likelihood"]
        assert "different settings of search sigma_q (model's likelihood.answer_token_ids: " in out["tfb_likelihood"]
        assert torch.equal(out["predict_num_data"], ranks[0]["predict_num_data"])
        assert out["save_other_guides"].startswith("cannot save the guide: ") and "guide." in out["save_other_guides"]


def test_model_settings_name_each_prior_and_likelihood_entry():
    """What fit compares across ranks of the model: a per-site prior flattened to its class and parameters (a tensor of
    equal entries as one number, another by its shape and a CRC-32), the likelihood's public settings."""
    import pyro.distributions as pdist

    from pyro_lora.model import _flat_setting

    settings = _prior_model(_scaled_prior(0.5)).settings()
    site = next(iter(settings["sites"]))
    assert settings[f"prior of {site}"] == "Independent" and settings[f"prior of {site}.base_dist"] == "Normal"
    assert settings[f"prior of {site}.base_dist.scale"] == 0.5 and settings[f"prior of {site}.reinterpreted_batch_ndims"] == len(settings["sites"][site][1])
    assert settings["likelihood"] == "SequenceClassification" and settings["num_data"] == 16
    assert make_model(num_data=16).settings()["prior"] == 1.0
    assert _prior_model(0.1 + 0.2).settings()["prior"] == _prior_model(0.3).settings()["prior"]  # one float32 std
    covariances = [_prior_model(_mvn_prior(v)).settings() for v in (1.0, 1e-4)]  # only the log-density sees them
    assert [k for k in covariances[0] if covariances[0][k] != covariances[1][k]] == [
        f"prior of {s} log-density" for s in covariances[0]["sites"]]
    spread = _flat_setting("p", pdist.Normal(torch.arange(12.0), 1.0))
    assert spread["p.loc"].startswith("tensor [12] CRC-32 ") and spread["p.scale"] == 1.0
    assert _flat_setting("ids", torch.tensor([3, 4])) == {"ids": [3, 4]}
