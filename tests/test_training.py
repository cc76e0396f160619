"""fit, predict, save/load and adapter export on tiny random networks."""

import collections
import contextlib
import json
import random
import re
import sys

import numpy as np
import pyro
import pytest
import torch
from conftest import tiny_bert, tiny_bert_base, tiny_llama
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

from pyro_lora.guides import MAPGuide, MeanFieldGuide
from pyro_lora.io import atomic_file, export_adapter, load_guide, meta_sha256, save_guide
from pyro_lora.likelihoods import CausalLM, SequenceClassification
from pyro_lora.metrics import nll
from pyro_lora.model import LoraModel
from pyro_lora.predictive import SEED_RANGE, predict
from pyro_lora.training import DivergenceError, FitState, fit


def toy_data(n=48, batch=8, seed=0):
    """Label 1 sequences repeat token 7, label 0 sequences token 40, with one random token each."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids = torch.where(labels[:, None] == 1, 7, 40).repeat(1, 6)
    ids[:, 3] = torch.randint(1, 64, (n,), generator=g)
    return [
        {"input_ids": ids[i : i + batch], "attention_mask": torch.ones_like(ids[i : i + batch]), "labels": labels[i : i + batch]}
        for i in range(0, n, batch)
    ]


def make(num_labels=2, random="AB"):
    model = LoraModel(tiny_bert(num_labels=num_labels), SequenceClassification(), random=random, num_data=48)
    return model, MAPGuide(model)


def test_a_schedule_over_data_whose_length_changes_between_epochs_decays_to_0_at_the_runs_end(monkeypatch):
    """The schedule's end was planned from the first epoch's length: data of 3, then 5, then 7 batches (a bucketing
    sampler) decayed to 0 at step 9 of 15, and trained its last 6 steps at a learning rate of 0, without a word."""
    class Growing:
        def __init__(self):
            self.epoch, self.batches = 0, toy_data(n=56, batch=8)

        def __len__(self):  # the coming epoch's
            return 3 + 2 * self.epoch

        def __iter__(self):
            n, self.epoch = len(self), self.epoch + 1
            return iter(self.batches[:n])

    lrs, real = [], torch.optim.lr_scheduler.LambdaLR.step

    def step(self, *args, **kwargs):  # the rate each optimizer step uses, and the one after the last
        real(self, *args, **kwargs)
        lrs.append(self.optimizer.param_groups[0]["lr"])

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step)
    model, guide = make()
    seen = []
    with pytest.warns(UserWarning) as said:
        fit(model, guide, Growing(), epochs=3, lr=1e-2, lr_schedule="linear", progress=False,
            callbacks=[lambda state: seen.append(state.steps_per_epoch)])
    assert [str(w.message) for w in said if "optimizer steps in epoch" in str(w.message)] == [
        "fit: the data gives 5 optimizer steps in epoch 1, 3 in the epoch before: lr_schedule='linear' now decays to 0 "
        "at step 13 (as if every epoch left gave 5), not at step 9",
        "fit: the data gives 7 optimizer steps in epoch 2, 5 in the epoch before: lr_schedule='linear' now decays to 0 "
        "at step 15 (as if every epoch left gave 7), not at step 13"]
    assert seen == [3] * 3 + [5] * 5 + [7] * 7
    assert len(lrs) == 16 and all(lr > 0 for lr in lrs[:15]) and lrs[15] == 0.0


def test_fit_refuses_callbacks_an_elbo_class_and_no_data_before_any_step():
    """Each failed late or raw: callbacks=[1] after the first step (the guide moved), callbacks=print as not
    iterable, elbo=Trace_ELBO (the class) inside Pyro, num_particles=0 as a float with no backward, data=None as
    not iterable; a batch of no rows divided by zero."""
    from pyro.infer import Trace_ELBO

    model, guide = make()
    before = {n: p.detach().clone() for n, p in guide.named_parameters()}
    for kwargs, message in [
        (dict(callbacks=[1]), "callbacks must be callables, each called with the FitState after every step: 1 is not"),
        (dict(callbacks=print), r"callbacks must be a list of callables.*: pass \[it\]"),
        (dict(elbo=Trace_ELBO), r"elbo is the class Trace_ELBO, not an ELBO: give an instance, elbo=Trace_ELBO\(\)"),
        (dict(elbo=Trace_ELBO(num_particles=0)), r"Trace_ELBO\(num_particles=0\): an ELBO averages at least one particle"),
        (dict(data=None), "data is None: give an iterable of batches"),
    ]:
        with pytest.raises(ValueError, match=message):
            fit(model, guide, **{"data": toy_data(), **kwargs}, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in guide.named_parameters())
    empty = {k: v[:0] for k, v in toy_data()[0].items()}
    with pytest.raises(ValueError, match=r"the batch has no rows \(labels of shape \(0,\)\)"):
        fit(model, guide, [empty], progress=False)


@pytest.mark.parametrize("call", ["fit", "predict", "save_guide"])
def test_a_switch_given_as_a_string_is_refused(call, tmp_path):
    """The string "False" is truthy: fit(train_network="False") trained the head, predict(mean="False") predicted
    at the mean, without a word."""
    model, guide = make()
    head = {n: p.detach().clone() for n, p in model.named_point_parameters()}
    with pytest.raises(ValueError, match=r"(train_network|mean|adapter) must be True or False, got 'False'"):
        if call == "fit":
            fit(model, guide, toy_data(), train_network="False", progress=False)
        elif call == "predict":
            predict(model, guide, toy_data(), mean="False")
        else:
            save_guide(guide, tmp_path / "guide", adapter="False")
    assert all(torch.equal(p, head[n]) for n, p in model.named_point_parameters())


def test_map_fit_reduces_loss_and_calls_back():
    model, guide = make()
    seen = []
    before = predict(model, guide, toy_data())
    losses = fit(model, guide, toy_data(), epochs=4, lr=3e-2, progress=False, callbacks=[seen.append])
    after = predict(model, guide, toy_data())
    assert len(losses) == 24 and isinstance(seen[-1], FitState) and seen[-1].step == 24
    assert sum(losses[-6:]) < sum(losses[:6])
    assert nll(after.probs, after.labels) < 0.5 * nll(before.probs, before.labels)


def test_fit_grad_accumulation_and_schedules():
    model, guide = make()
    losses = fit(model, guide, toy_data(), epochs=2, lr=1e-3, grad_accum_steps=2, lr_schedule="cosine", warmup_steps=2,
                 kl_weight=lambda step: min(1.0, 0.1 + step / 5), max_grad_norm=1.0, progress=False)
    assert len(losses) == 6
    with pytest.raises(ValueError, match="lr_schedule"):
        fit(model, guide, toy_data(), lr_schedule="bogus", progress=False)


def test_an_epochs_last_partial_group_of_micro_batches_steps_on_its_own_mean(monkeypatch):
    """With 5 batches and grad_accum_steps=2, the fifth batch's gradient (divided by 2) was carried into the next
    epoch's first step (3 half-weighted batches) and dropped after the last epoch; the schedule counted 3 steps
    per epoch where fit took 2."""
    steps = []
    real = torch.optim.AdamW.step

    def record(self, *args, **kwargs):  # the gradients each step applies (lr 0: the parameters never move)
        steps.append([p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    batches = toy_data(n=40, batch=8)
    model, guide = make()
    model.net.eval()  # no dropout: every step of the same batches gives the same gradients
    model.net.train = lambda mode=True: model.net
    fit(model, guide, batches, epochs=2, lr=0.0, grad_accum_steps=2, stop_on_divergence=False, progress=False)
    assert len(steps) == 6  # 2 + 2 + 1 batches per epoch
    for a, b in zip(steps[0], steps[3]):  # each epoch's first step: batches 0 and 1 alone
        torch.testing.assert_close(a, b)
    alone = len(steps)
    fit(model, guide, batches[4:], epochs=1, lr=0.0, stop_on_divergence=False, progress=False)
    for a, b in zip(steps[2], steps[alone]):  # the partial group's step: the mean of its one batch
        torch.testing.assert_close(a, b)


def test_accumulated_micro_batches_weigh_every_example_as_one_batch_of_them_all():
    """grad_accum_steps took the equal mean of its micro-batches' estimates: with batches of 8, 8 and 2 examples each
    of the 2 weighed 4 times an example of the others, where one batch of the 18 weighs all alike (a step's loss 7e-5
    off it, parameters 1e-3 off at lr 3e-2); an epoch's last, partial group likewise."""
    batches = toy_data(n=18, batch=8)  # 8, 8, 2 examples
    merged = [{k: torch.cat([b[k] for b in batches]) for k in batches[0]}]
    runs = []
    for data, accum in ((merged, 1), (batches, 3), (batches, 4)):  # 4: one partial group
        model, guide = make()
        for m in model.net.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0  # no draw: the runs differ by their weighting alone
        losses = fit(model, guide, data, lr=3e-2, grad_accum_steps=accum, stop_on_divergence=False, progress=False)
        runs.append((losses, [p.detach().clone() for p in model.point_parameters() + list(guide.parameters())]))
    (one_loss, one_params), *accumulated = runs
    for losses, params in accumulated:
        assert len(losses) == 1 and losses[0] == pytest.approx(one_loss[0], rel=1e-6)
        for a, b in zip(params, one_params):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(grad_accum_steps=0), "grad_accum_steps must be a positive integer, got 0"),
    (dict(grad_accum_steps=1.5), "grad_accum_steps must be a positive integer, got 1.5"),
    (dict(epochs=-1), "epochs must be an integer >= 0, got -1"),
    (dict(epochs=2.5), "epochs must be an integer >= 0, got 2.5"),
    (dict(lr=float("nan")), "lr must be a finite number >= 0, got nan"),
    (dict(lr="1e-3"), "lr must be a finite number >= 0, got '1e-3'"),
    (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0, got -0.1"),
    # a nan loss one step later, blamed on the learning rate
    (dict(lr=1e-2, weight_decay=1e6), r"lr \* weight_decay = 10000 >= 1: AdamW multiplies every trained weight by"),
    (dict(max_grad_norm=-1.0), r"max_grad_norm must be a finite number > 0 \(None: no clipping\), got -1.0"),
    (dict(max_grad_norm=0), r"max_grad_norm must be a finite number > 0 \(None: no clipping\), got 0"),
    (dict(warmup_steps=2.5), "warmup_steps must be an integer >= 0, got 2.5"),
    (dict(warmup_steps=-3), "warmup_steps must be an integer >= 0, got -3"),
    (dict(warmup_steps=100, lr_schedule="linear"), "warmup_steps=100 is longer than the run's 6 optimizer steps"),
    (dict(checkpoint_every=0), "checkpoint_every must be a positive integer"),
    (dict(checkpoint_every=2), "checkpoint_every=2 without checkpoint_dir saves nothing: give checkpoint_dir"),
    (dict(data=iter(toy_data()), epochs=2), r"data is a one-shot iterator \(list_iterator\): it yields its batches once"),
    (dict(data=[]), "data yielded no batch in epoch 0"),
])
def test_fit_refuses_settings_out_of_range_before_any_work(kwargs, message):
    """grad_accum_steps=0 raised ZeroDivisionError after the first forward; 1.5 never stepped; a nan lr trained to nan."""
    model, guide = make()
    with pytest.raises(ValueError, match=message):
        fit(model, guide, **{"data": toy_data(), "progress": False, **kwargs})


def test_a_dataloader_without_a_length_trains_every_epoch():
    """A DataLoader over an IterableDataset has __len__ but len() raises: fit crashed with 'has no len()'."""
    model, guide = make()
    losses = fit(model, guide, unsized(toy_data()), epochs=2, progress=False)
    assert len(losses) == 12


def test_fit_trains_point_parameters_too():
    model, guide = make(random="A")
    head = [p for n, p in model.net.named_parameters() if "classifier" in n and p.requires_grad][0]
    before = head.detach().clone()
    fit(model, guide, toy_data(), epochs=1, lr=1e-2, elbo=TraceMeanField_ELBO(), progress=False)
    assert not torch.equal(before, head)


def test_fit_train_network_false_trains_the_guide_only():
    from pyro_lora.guides import MeanFieldGuide

    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), random="A", num_data=48)
    guide = MeanFieldGuide(model)
    network = {n: p.detach().clone() for n, p in model.net.named_parameters() if p.requires_grad}
    stds = torch.cat([s.flatten() for s in guide.stds().values()]).detach()
    fit(model, guide, toy_data(), epochs=1, lr=1e-2, elbo=TraceMeanField_ELBO(), train_network=False, progress=False)
    for n, p in model.net.named_parameters():  # head and B untouched
        if n in network:
            assert torch.equal(network[n], p), n
    assert not torch.equal(stds, torch.cat([s.flatten() for s in guide.stds().values()]))


def test_fit_non_finite_loss_is_an_error():
    model, guide = make()
    with torch.no_grad():
        guide.locs[0].fill_(float("nan"))
    with pytest.raises(DivergenceError, match="the loss became nan at step 0"):
        fit(model, guide, toy_data(), progress=False)


def test_fit_stops_when_the_loss_explodes():
    model, guide = make()
    with pytest.raises(DivergenceError, match=r"training diverged: the smoothed data NLL rose from .* learning rate \(1000\) is likely too high"):
        fit(model, guide, toy_data() * 3, lr=1e3, progress=False)
    model, guide = make()
    losses = fit(model, guide, toy_data() * 3, lr=1e3, stop_on_divergence=False, progress=False)
    assert max(losses[-5:]) > 4 * losses[0] + 4  # what the check caught
    for kwargs in (dict(data=toy_data(n=8, batch=8)), dict(data=toy_data(n=16, batch=4), grad_accum_steps=4)):
        model, guide = make()  # one optimizer step: judged on the first batch after it
        with pytest.raises(DivergenceError, match="the data NLL per example of the first batch rose from .* after epoch 0"):
            fit(model, guide, lr=1e3, progress=False, **kwargs)
    model, guide = make()
    losses = fit(model, guide, toy_data() * 3, lr=1e-2, progress=False)  # a sane run is not stopped
    assert losses[-1] < losses[0]


def _three_class_data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (32, 8), generator=g)
    labels = ids[:, 0] % 3
    return [{"input_ids": ids[i : i + 8], "attention_mask": torch.ones(8, 8, dtype=torch.long), "labels": labels[i : i + 8]} for i in range(0, 32, 8)]


@pytest.mark.parametrize("num_data", [32, 100_000])
def test_divergence_is_judged_on_the_data_term_whatever_the_data_size(num_data):
    # the ELBO per example carries -log p(theta) / N: with N = 32 it dwarfed the data term and hid the divergence
    model = LoraModel(tiny_bert(num_labels=3), SequenceClassification(), num_data=num_data)
    with pytest.raises(DivergenceError, match="data NLL"):
        fit(model, MAPGuide(model), _three_class_data(), epochs=5, lr=3.0, progress=False)


def _lm_rows(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("how", ["labels -100", "one real token"])
def test_a_causal_lm_row_with_no_token_to_score_is_refused_before_training(how):
    """Such a row counted as one of the batch's examples in the num_data / rows scaling with nothing in it: a batch with
    2 of its 4 rows unscored weighed its data term half as much, and one with none scored trained on the prior alone."""
    batch = _lm_rows(4, 6, 0)
    if how == "labels -100":
        batch["labels"][[1, 3]] = -100
    else:
        batch["attention_mask"][[1, 3], 1:] = 0
    model = LoraModel(tiny_llama(), CausalLM(), random="AB", prior=1.0, num_data=24)
    guide = MAPGuide(model)
    before = {n: p.detach().clone() for n, p in guide.named_parameters()}
    with pytest.raises(ValueError, match=r"CausalLM: row\(s\) \[1, 3\] of the batch have no token to score"):
        fit(model, guide, [batch], lr=1e-2, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in guide.named_parameters())


def test_causal_lm_divergence_is_judged_per_scored_token():
    """CausalLM's NLL per example sums a row's tokens: a first batch of 3-token rows, then 40-token ones, raised
    DivergenceError at lr=1e-7, where nothing moves (its smoothed NLL per example rose 4x + 4 with the rows' lengths).
    The check follows the NLL per scored token (the model's last_nll: cross-entropy averaged over the tokens whose label
    is not -100, padding excluded), which still catches a real divergence."""
    batch = _lm_rows(3, 9, 1)
    batch["attention_mask"][0, 6:] = 0
    batch["labels"][1, :4] = -100
    model = LoraModel(tiny_llama(), CausalLM(), random="AB", prior=1.0, num_data=24)
    trace = poutine.trace(model).get_trace(batch)
    trace.compute_log_prob()
    logits = model.logits(batch, {n: trace.nodes[n]["value"] for n in model.sites})
    shifted = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    torch.testing.assert_close(model.last_nll, torch.nn.functional.cross_entropy(logits.reshape(-1, 64), shifted.reshape(-1)))
    data = [_lm_rows(4, 3, 0)] + [_lm_rows(4, 40, s) for s in range(1, 6)]
    model = LoraModel(tiny_llama(), CausalLM(), random="AB", prior=1.0, num_data=24)
    losses = fit(model, MAPGuide(model), data, lr=1e-7, progress=False)
    assert losses[1] > 4 * losses[0] + 4  # per example the long rows' NLL is past the check's bound
    model = LoraModel(tiny_llama(targets=("q_proj", "v_proj", "lm_head")), CausalLM(), random="AB", prior=1.0, num_data=24)
    with pytest.raises(DivergenceError, match=r"smoothed data NLL rose from 4.* per scored token by step 1"):
        fit(model, MAPGuide(model), [_lm_rows(4, 12, s) for s in range(6)], lr=10.0, progress=False)


def test_a_hard_last_batch_is_no_divergence_and_the_check_leaves_the_random_stream_alone():
    data = _three_class_data()
    model = LoraModel(tiny_bert(num_labels=3), SequenceClassification(), num_data=100_000)
    guide = MAPGuide(model)
    fit(model, guide, data, epochs=60, lr=3e-2, progress=False)
    flipped = data[:3] + [data[3] | {"labels": (data[3]["labels"] + 1) % 3}]  # a hard last batch, nothing moves
    fit(model, guide, flipped, lr=1e-12, progress=False)
    runs = []
    for check in (True, False):
        model = LoraModel(tiny_bert(num_labels=3), SequenceClassification(), num_data=32)
        guide = MeanFieldGuide(model, b="normal")
        pyro.set_rng_seed(0)
        runs.append(fit(model, guide, data, epochs=2, lr=1e-3, stop_on_divergence=check, progress=False))
    assert runs[0] == runs[1]
class _Jitter(MAPGuide):
    """A stochastic test guide: the MAP weights plus fixed-scale noise."""

    deterministic = False

    def sample(self, num_samples):
        return {k: v + 0.05 * torch.randn(num_samples, *v.shape) for k, v in self.mean().items()}


def test_predict_averages_softmax_over_samples_and_chunks():
    model, _ = make(num_labels=3)
    guide = _Jitter(model)
    data = toy_data()
    torch.manual_seed(0)
    full = predict(model, guide, data, num_samples=6, keep_samples=True)
    assert full.sample_probs.shape == (6, 48, 3)
    torch.testing.assert_close(full.probs, full.sample_probs.mean(0))
    torch.manual_seed(0)
    base = int(torch.randint(SEED_RANGE, ()))  # predict's per-call seed: chunk i is drawn under base + i
    for chunk in (None, 4):
        torch.manual_seed(0)
        pred = predict(model, guide, data, num_samples=6, chunk_size=chunk, keep_samples=True)
        for i, start in enumerate(range(0, 6, chunk or 6)):
            n = min(chunk or 6, 6 - start)
            with torch.random.fork_rng():
                torch.manual_seed(base + i)
                values = guide.sample(n)
            direct = torch.softmax(model.logits(data[1], values, n), -1)
            torch.testing.assert_close(pred.sample_probs[start : start + n, 8:16], direct, rtol=1e-5, atol=1e-6)
    assert torch.equal(full.labels, torch.cat([b["labels"] for b in data]))


def test_predict_mean_mode_and_plain_network():
    model, guide = make()
    data = toy_data()
    mean = predict(model, guide, data, mean=True)
    plain = predict(model, None, data)
    torch.testing.assert_close(mean.probs, plain.probs)  # MAP initialised from the adapter
    with pytest.raises(ValueError, match="empty"):
        predict(model, guide, [])


def test_save_load_round_trip(tmp_path):
    model, guide = make()
    fit(model, guide, toy_data(), epochs=1, lr=1e-2, progress=False)
    save_guide(guide, tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["guide.json", "guide.safetensors"]
    meta = json.loads((tmp_path / "g" / "guide.json").read_text())
    assert meta["sites"]["query.lora_A"] == [2, 4, 32]
    fresh = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), num_data=48)
    loaded = load_guide(tmp_path / "g", fresh)
    assert type(loaded) is MAPGuide
    for k, v in guide.mean().items():
        torch.testing.assert_close(loaded.mean()[k], v)
    torch.testing.assert_close(predict(fresh, loaded, toy_data()).probs, predict(model, guide, toy_data()).probs)


def test_atomic_file_replaces_only_on_success(tmp_path):
    path = tmp_path / "out" / "results.json"
    with atomic_file(path) as f:
        f.write("old")
    assert path.read_text() == "old" and path.stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_file(path) as f:
            f.write("half")
            raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left behind


def test_writes_reach_the_disk_before_their_rename(tmp_path, monkeypatch):
    """Files were renamed into place unsynced: after a power loss the new name could point at empty data, the old
    file already gone. Each written file is fsynced before its rename, and its folder after (the rename itself)."""
    import os

    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    with atomic_file(tmp_path / "results.json") as f:
        f.write("new")
    (_, tmp, dst), = [e for e in events if e[0] == "replace"]
    assert events == [("fsync", tmp), ("replace", tmp, dst), ("fsync", str(tmp_path))]

    events.clear()
    model, guide = make()
    save_guide(guide, tmp_path / "g")
    (_, folder, dst), = [e for e in events if e[0] == "replace"]
    synced_before = {e[1] for e in events[:events.index(("replace", folder, dst))] if e[0] == "fsync"}
    written = {os.path.join(folder, p.name) for p in (tmp_path / "g").iterdir()}
    assert written and written | {folder} <= synced_before
    assert events[-1] == ("fsync", str(tmp_path))


def test_a_full_disk_names_what_was_being_written(tmp_path, monkeypatch):
    """A full disk gave "[Errno 28] No space left on device" naming no file: a write through a file object names none,
    and safetensors' "(os error 28)" is no OSError at all. Each writer's error now names its path, as the OS error it
    is, and leaves the previous file or folder."""
    import errno
    import os
    import types

    import pyro_lora.io as io
    from pyro_lora import locking
    from safetensors import SafetensorError

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what f.write raises on a full disk
    path = tmp_path / "out" / "results.json"
    with atomic_file(path) as f:
        f.write("old")
    with pytest.raises(OSError) as err:
        with atomic_file(path) as f:
            raise full
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(path))
    assert str(err.value) == f"[Errno 28] No space left on device: '{path}'"
    assert path.read_text() == "old" and [p.name for p in path.parent.iterdir()] == ["results.json"]

    model, guide = make()
    save_guide(guide, tmp_path / "g")

    def no_room(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(io, "save_file", no_room)
    with pytest.raises(OSError) as err:
        save_guide(guide, tmp_path / "g")
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(tmp_path / "g"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g", "out"]  # the previous guide, no temporary

    def write(fd, data):
        raise full

    monkeypatch.setattr(locking, "os", types.SimpleNamespace(**{**vars(os), "write": write}))
    with pytest.raises(OSError) as err:
        with locking.folder_lock(tmp_path / "run"):
            pass
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(tmp_path / "run" / ".lock"))
    # a refusal of the library's own, an OSError with no errno, and a file already named are left as they are
    for other in (FileNotFoundError("data.jsonl does not exist"), OSError(errno.EACCES, "Permission denied", "x")):
        with pytest.raises(OSError) as err:
            with atomic_file(path):
                raise other
        assert err.value is other


def test_the_study_draws_figures_and_copies_maps_atomically(tmp_path, monkeypatch):
    """The report's figures and the MAPs study --update copies were written in place: a kill mid-write left half a
    file. A write stopped before its swap leaves the old file and no temporary."""
    import os

    import numpy as np

    from pyro_lora.experiments.results import ARRAYS
    from pyro_lora.experiments.study_report import draw_figures

    run, docs = tmp_path / "run", tmp_path / "docs"
    run.mkdir(), docs.mkdir()
    arrays = {"probs": np.full((4, 2), 0.5), "labels": np.arange(4) % 2, "entropy": np.zeros(4), "mutual_information": np.zeros(4)}
    np.savez(run / "predictions_map.npz", **{f"sst2__seed0__{k}": arrays[k] for k in ARRAYS})
    record = {"folder": run, "config": {"guides": ["map"], "dataset": "sst2", "seeds": [0]}, "per_seed": [],
              "summary": [{"guide": "map", "dataset": "sst2", "accuracy": 0.5, "ece": 1.0, "nll": 0.7}]}
    (docs / "sst2_reliability_grid.png").write_bytes(b"old figure")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        draw_figures(record, "sst2", docs)
    assert [p.name for p in docs.iterdir()] == ["sst2_reliability_grid.png"]
    assert (docs / "sst2_reliability_grid.png").read_bytes() == b"old figure"
    monkeypatch.undo()
    assert draw_figures(record, "sst2", docs) == {"reliability_grid": "sst2_reliability_grid.png",
                                                 "calibration_vs_accuracy": "sst2_calibration_vs_accuracy.png"}
    assert (docs / "sst2_reliability_grid.png").read_bytes().startswith(b"\x89PNG")


def test_save_is_atomic_and_load_refuses_other_models(tmp_path, monkeypatch):
    model, guide = make()
    save_guide(guide, tmp_path / "g")
    original = (tmp_path / "g" / "guide.safetensors").read_bytes()
    import pyro_lora.io as io

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_guide(guide, tmp_path / "g")
    assert (tmp_path / "g" / "guide.safetensors").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]
    other = LoraModel(tiny_bert(r=2), SequenceClassification())
    with pytest.raises(ValueError, match=r"cannot load the guide .* site 'query.lora_A' has shape \(2, 4, 32\) in the guide and \(2, 2, 32\)"):
        load_guide(tmp_path / "g", other)
    with pytest.raises(FileNotFoundError, match="no saved guide"):
        load_guide(tmp_path, other)


def test_export_adapter_loads_with_peft(tmp_path):
    from peft import PeftModel

    model, guide = make()
    fit(model, guide, toy_data(), epochs=1, lr=1e-2, progress=False)
    export_adapter(guide, tmp_path / "adapter")
    reference = predict(model, guide, toy_data()).probs
    base = tiny_bert_base(num_labels=2)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = toy_data()[0]
    probs = torch.softmax(reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    torch.testing.assert_close(probs, reference[:8], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kl_weight", [0.0, lambda step: min(1.0, step / 10), float("nan")])
def test_a_kl_weight_that_is_not_positive_is_named(kl_weight):
    model, guide = make()
    with pytest.raises(ValueError, match=r"kl_weight gave .* at step 0: it must be a positive finite number"):
        fit(model, guide, toy_data(), kl_weight=kl_weight, progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_trainable_parameters_are_refused_before_training(dtype):
    model, guide = make()
    model.net.to(dtype)
    head = [p.detach().clone() for n, p in model.named_point_parameters()]
    with pytest.raises(ValueError, match="fit trains parameters held in .* keep the trainable parameters .* in float32"):
        fit(model, guide, toy_data(), progress=False)
    assert all(torch.equal(p, q) for (_, p), q in zip(model.named_point_parameters(), head))


@pytest.mark.parametrize("what", ["file", "link", "unwritable", "under a file"])
def test_fit_and_save_guide_refuse_a_folder_slot_they_cannot_fill_before_any_work(tmp_path, monkeypatch, what):
    """fit(checkpoint_dir=<a file>) trained to the end, then moved the user's file aside under a hidden name, put the
    guide folder in its place and raised NotADirectoryError naming that hidden name; its losses were lost. Under /proc
    it failed after training too."""
    import pyro_lora.training as training

    model, guide = make()
    slot = tmp_path / "results.csv"
    if what == "file":
        slot.write_text("precious,user,data")
    elif what == "link":
        (tmp_path / "elsewhere").mkdir()
        slot.symlink_to(tmp_path / "elsewhere")
    elif what == "under a file":  # mkdir said "File exists"
        (tmp_path / "notes").write_text("the user's file")
        slot = tmp_path / "notes" / "run" / "results.csv"
    else:  # a folder that refuses new entries (chmod does not stop root, who runs CI): its probe fails
        monkeypatch.setattr("tempfile.mkdtemp", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    message = {"file": "is a file, where", "link": "is a link, where", "unwritable": "cannot write in .*Permission denied.*, where",
               "under a file": re.escape(f"cannot write in {tmp_path / 'notes' / 'run'}: {tmp_path / 'notes'} is a file, not a "
                                         "folder, where")}[what]
    monkeypatch.setattr(training, "_check_elbo", lambda elbo: pytest.fail("fit went on past its arguments"))
    with pytest.raises(ValueError, match=message + " fit saves the guide there as a folder: choose another checkpoint_dir"):
        fit(model, guide, toy_data(), checkpoint_dir=slot, progress=False)
    with pytest.raises(ValueError, match=message):
        save_guide(guide, slot)
    if what == "file":
        assert slot.read_text() == "precious,user,data" and sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]
    if what == "link":
        assert slot.is_symlink() and list((tmp_path / "elsewhere").iterdir()) == []


def test_a_checkpoint_of_a_stopped_fit_says_how_far_it_got_and_load_guide_warns(tmp_path):
    """fit's checkpoint_dir held guide.json and guide.safetensors alone, with the keys of a finished run's: a run killed
    at step 10 of 16 left a folder that loaded as the result. The guide's fit_progress is saved with it now."""
    import warnings

    class Kill(Exception):
        pass

    def stop_at_5(state):
        if state.step == 5:
            raise Kill

    model, guide = make()
    with pytest.raises(Kill):  # 6 steps per epoch, 12 in all; a checkpoint every 2: the last one is step 4's
        fit(model, guide, toy_data(), epochs=2, lr=1e-2, callbacks=[stop_at_5], checkpoint_dir=tmp_path / "ck",
            checkpoint_every=2, progress=False)
    assert guide.fit_progress == {"step": 5, "steps": 12, "epoch": 0, "epochs": 2, "finished": False}
    with pytest.warns(UserWarning, match=r"ck is a checkpoint of a fit that did not finish: it stopped after step 4 of "
                                         r"12 \(in epoch 1 of 2\).* does not resume the run"):
        loaded = load_guide(tmp_path / "ck", model)
    assert loaded.fit_progress == {"step": 4, "steps": 12, "epoch": 0, "epochs": 2, "finished": False}
    model, guide = make()
    assert guide.fit_progress is None
    fit(model, guide, toy_data(), epochs=2, lr=1e-2, checkpoint_dir=tmp_path / "done", checkpoint_every=5, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_guide(tmp_path / "done", model)
    assert loaded.fit_progress == {"step": 12, "steps": 12, "epoch": 1, "epochs": 2, "finished": True}
    meta = json.loads((tmp_path / "done" / "guide.json").read_text())
    (tmp_path / "done" / "guide.json").write_text(json.dumps(meta | {"fit": {"step": 12, "finished": "yes"}}))
    with pytest.raises(ValueError, match="guide.json is corrupt: its 'fit' should map 'step'"):
        load_guide(tmp_path / "done", model)


@pytest.mark.parametrize("kind", ["map", "meanfield"])
def test_a_fit_killed_and_resumed_ends_bit_for_bit_as_the_uninterrupted_run(tmp_path, kind):
    """Resuming by hand (load_guide on the checkpoint, then fit for the remaining epochs) restarted AdamW's moments,
    the warmup/cosine schedule, kl_weight(step) and the data order: a MeanField guide ended up to 0.114 from the
    uninterrupted run's. fit(resume=True) continues the run from its checkpoint: the same parameters and losses, a
    shuffling DataLoader's order replayed (killed mid-epoch), in a process whose RNG is elsewhere."""
    from torch.utils.data import DataLoader

    class Kill(Exception):
        pass

    whole = toy_data(n=24, batch=24)[0]
    rows = [{k: v[i] for k, v in whole.items()} for i in range(24)]

    def run(folder, kill_at=None, resume=False, **changed):
        pyro.set_rng_seed(0)
        model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), random="AB", num_data=24)
        guide = MAPGuide(model) if kind == "map" else MeanFieldGuide(model, b="normal")
        loader = DataLoader(rows, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(1))
        pyro.set_rng_seed(7 if resume else 0)  # a new process's RNG: resume sets its own
        seen = []

        def stop(state):
            seen.append((state.step, state.kl_weight))
            if state.step == kill_at:
                raise Kill

        settings = dict(epochs=3, lr=3e-2, lr_schedule="cosine", warmup_steps=3, kl_weight=lambda s: min(1.0, (s + 1) / 8))
        try:
            losses = fit(model, guide, loader, **(settings | changed), callbacks=[stop], checkpoint_dir=tmp_path / folder,
                         checkpoint_every=2, resume=resume, progress=False)
        except Kill:
            losses = None
        state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
        state.update({n: p.detach().clone() for n, p in model.named_point_parameters()})
        return state, losses, seen

    full, full_losses, full_seen = run("full")
    run("killed", kill_at=7)  # 4 steps per epoch: the last checkpoint is step 6's, in the middle of epoch 1
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["fit_state.pt", "guide.json", "guide.safetensors"]
    with pytest.raises(ValueError, match=r"settings other than its own \(kl_weight: 'a callable' there, 1.0 here; "
                                         r"lr: 0.03 there, 0.01 here\)"):
        run("killed", resume=True, lr=1e-2, kl_weight=1.0)
    resumed, losses, seen = run("killed", resume=True)
    assert seen == full_seen[6:] and losses == full_losses
    for name in full:
        assert torch.equal(resumed[name], full[name]), name
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["guide.json", "guide.safetensors"]  # finished
    with pytest.raises(ValueError, match="finished .step 12 of 12.: there is nothing to resume"):
        run("killed", resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no saved guide .guide.json missing.: there is no run to resume"):
        run("empty", resume=True)
    # a folder that does not exist is refused before its lock would create it and the folders above it
    with pytest.raises(ValueError, match=r"checkpoint_dir \S+nothing.deeper does not exist, so there is no run to resume"):
        run("nothing/deeper", resume=True)
    assert not (tmp_path / "nothing").exists()


class _Kill(Exception):
    pass


def _rows(n=24):
    whole = toy_data(n=n, batch=n)[0]
    return [{k: v[i] for k, v in whole.items()} for i in range(n)]


def _run(folder, data, kill_at=None, resume=False, callbacks=(), **settings):
    """A MeanField fit on ``data`` (3 epochs, a checkpoint every 2 steps in ``folder`` if given), killed after step
    ``kill_at``: the guide's and the network's point parameters, and the losses (None if killed)."""
    pyro.set_rng_seed(0)
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), random="AB", num_data=24)
    guide = MeanFieldGuide(model, b="normal")
    pyro.set_rng_seed(7 if resume else 0)  # a new process's RNG: resume sets its own

    def stop(state):
        if state.step == kill_at:
            raise _Kill

    try:
        losses = fit(model, guide, data, **({"epochs": 3, "lr": 3e-2} | settings), callbacks=[*callbacks, stop],
                     checkpoint_dir=folder, checkpoint_every=2 if folder else None, resume=resume, progress=False)
    except _Kill:
        losses = None
    state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    return state | {n: p.detach().clone() for n, p in model.named_point_parameters()}, losses


def test_resume_replays_a_generator_the_batch_sampler_holds(tmp_path):
    """Only the DataLoader's and its sampler's generators were replayed: with batch_sampler=BatchSampler(RandomSampler(
    ds, generator=g)) the resumed run drew another order (losses up to 0.176 apart). Every generator reachable is now."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    rows = _rows()

    def loader():
        return DataLoader(rows, batch_sampler=BatchSampler(RandomSampler(rows, generator=torch.Generator().manual_seed(1)),
                                                           5, False))

    full, full_losses = _run(None, loader())
    _run(tmp_path, loader(), kill_at=7)  # 5 steps per epoch: the last checkpoint is step 6's, in epoch 1
    with pytest.warns(UserWarning, match=r"callbacks' own state \(function\) is not in the checkpoint"):
        resumed, losses = _run(tmp_path, loader(), resume=True)
    assert losses == full_losses
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


class _Shuffled(torch.utils.data.IterableDataset):
    """Rows in an order its own generator draws each pass (not the DataLoader's, nor torch's global RNG)."""

    def __init__(self, rows, length=None):
        self.rows, self.length, self.order = rows, length or len(rows), torch.Generator().manual_seed(1)

    def __len__(self):
        return self.length

    def __iter__(self):
        return (self.rows[i] for i in torch.randperm(len(self.rows), generator=self.order).tolist())


@pytest.mark.parametrize("kind", ["partial last group", "set_epoch", "an IterableDataset's generator"])
def test_resume_after_an_epochs_last_partial_group_or_with_order_outside_the_loaders_generators_is_exact(tmp_path, kind):
    """4 batches an epoch, grad_accum_steps=3, killed in epoch 2 after the checkpoint of step 4 (epoch 1's last, partial
    group, taken after its data ran out): with a DataLoader's own generator, running out drew the next permutation
    (RandomSampler draws one more, of which it yields none), the resume replayed the epoch, restored the state holding
    that draw and ran out again, a second draw (losses apart from step 5 on, parameters up to 0.02). A
    DistributedSampler given set_epoch by a callback, or an IterableDataset shuffling with its own generator, replayed
    the epoch in its first pass's order. The replay reaches where the checkpoint was taken, and those are restored."""
    from torch.utils.data import DataLoader, DistributedSampler

    rows, settings, callbacks = _rows(), {"grad_accum_steps": 3}, ()
    if kind == "partial last group":
        def loader():
            return DataLoader(rows, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(123))
    elif kind == "set_epoch":
        sampler = DistributedSampler(rows, num_replicas=1, rank=0, seed=1)
        callbacks = [lambda state: state.step % 2 == 0 and sampler.set_epoch(state.epoch + 1)]  # at each epoch's end

        def loader():
            sampler.set_epoch(0)  # a new process's sampler
            return DataLoader(rows, batch_size=6, sampler=sampler)
    else:
        settings = {}  # 4 steps an epoch: the checkpoint of step 6 is in epoch 1's middle

        def loader():
            return DataLoader(_Shuffled(rows), batch_size=6)
    full, full_losses = _run(None, loader(), callbacks=callbacks, **settings)
    _run(tmp_path, loader(), kill_at=5 if settings else 7, callbacks=callbacks, **settings)
    with pytest.warns(UserWarning, match="callbacks' own state"):
        resumed, losses = _run(tmp_path, loader(), resume=True, callbacks=callbacks, **settings)
    assert losses == full_losses
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


def test_resume_on_data_that_end_elsewhere_than_the_runs_is_refused(tmp_path):
    """Resumed on an IterableDataset saying the run's length but yielding fewer batches, the replay raised a bare
    StopIteration out of fit (and one yielding more after the run's data ran out trained past the epoch's end). Both
    are refused now, naming where the data ran out."""
    from torch.utils.data import DataLoader

    rows = _rows()
    _run(tmp_path, DataLoader(_Shuffled(rows), batch_size=6), kill_at=7)  # the checkpoint: 2 batches into epoch 1
    with pytest.raises(ValueError, match=r"the epoch's data ran out after 1 of the 2 batches the run read: they are not"), \
            pytest.warns(UserWarning, match="callbacks' own state"):
        _run(tmp_path, DataLoader(_Shuffled(rows[:6], length=24), batch_size=6), resume=True)


class _Masked(torch.utils.data.Dataset):
    """Rows read with one of their first 6 tokens set to 7, where ``self.pick()`` draws: data augmented at random (a
    subclass's ``pick`` says with which generator)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids = self.rows[i]["input_ids"].clone()
        ids[int(self.pick())] = 7
        return self.rows[i] | {"input_ids": ids}


class _InADict(_Masked):
    def __init__(self, rows, seed):
        super().__init__(rows)
        self.generators = {"mask": torch.Generator().manual_seed(seed)}

    def pick(self):
        return torch.randint(6, (), generator=self.generators["mask"])


class _ClassAttribute(_Masked):
    rng = None  # set as a new process would (the test sets it before each run)

    def pick(self):
        return self.rng.integers(6)


_RNG = None  # a script's numpy generator, which _ScriptGlobal's code names (set alike)


class _ScriptGlobal(_Masked):
    def pick(self):
        return _RNG.integers(6)


class _NumpyGlobal(_Masked):
    def pick(self):
        return np.random.randint(6)


class _Wrapped(torch.utils.data.Sampler):
    """A sampler wrapping another, kept under a name of its own."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)


def _mask(items, generator):
    """Rows collated into a batch, a fifth of its tokens set to 1 where ``generator`` draws."""
    from torch.utils.data import default_collate

    batch = default_collate(items)
    ids = batch["input_ids"]
    return batch | {"input_ids": ids.masked_fill(torch.rand(ids.shape, generator=generator) < 0.2, 1)}


class _MaskingCollator:
    def __init__(self, generator):
        self.generator = generator

    def __call__(self, items):
        return _mask(items, self.generator)


class _PythonShuffled(torch.utils.data.IterableDataset):
    """Rows in an order Python's ``random.shuffle`` draws each pass."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        order = list(range(len(self.rows)))
        random.shuffle(order)
        return (self.rows[i] for i in order)


@pytest.mark.parametrize("kind", ["a wrapper's inner sampler", "a ConcatDataset's datasets' dicts",
                                  "a collate_fn object", "a collate_fn's closure", "a class attribute",
                                  "a script's global", "numpy's global", "Python's random", "a default argument",
                                  "a deque"])
def test_resume_replays_every_random_generator_the_data_hold(tmp_path, kind):
    """Only generators a DataLoader, its samplers and dataset held as attributes were saved: one under a sampler wrapper
    (self.inner: parameters 0.095 off an uninterrupted run's), in a list or dict (ConcatDataset's datasets, 0.055), in
    a collate_fn object or closure (0.034), a numpy generator (a class attribute, a script's global one), and the
    global RNGs of numpy and Python's random (0.033) that pyro.set_rng_seed seeds alike were not. The loader's whole
    object graph is searched, and the global RNGs saved: the resumed run (killed after the checkpoint of step 6) ends
    as the uninterrupted one, bit for bit."""
    from torch.utils.data import ConcatDataset, DataLoader, RandomSampler

    rows = _rows()

    def loader():
        global _RNG
        _RNG, _ClassAttribute.rng = np.random.default_rng(2), np.random.default_rng(3)  # as a new process sets them
        generator = torch.Generator().manual_seed(1)
        return {
            "a wrapper's inner sampler": lambda: DataLoader(rows, batch_size=6, sampler=_Wrapped(RandomSampler(
                rows, generator=generator))),
            "a ConcatDataset's datasets' dicts": lambda: DataLoader(ConcatDataset(
                [_InADict(rows[:12], 1), _InADict(rows[12:], 2)]), batch_size=6),
            "a collate_fn object": lambda: DataLoader(rows, batch_size=6, collate_fn=_MaskingCollator(generator)),
            "a collate_fn's closure": lambda: DataLoader(rows, batch_size=6,
                                                         collate_fn=lambda items: _mask(items, generator)),
            "a class attribute": lambda: DataLoader(_ClassAttribute(rows), batch_size=6),
            "a script's global": lambda: DataLoader(_ScriptGlobal(rows), batch_size=6),
            "numpy's global": lambda: DataLoader(_NumpyGlobal(rows), batch_size=6),
            "Python's random": lambda: DataLoader(_PythonShuffled(rows), batch_size=6),
            "a default argument": lambda: DataLoader(rows, batch_size=6, collate_fn=_defaulted(generator)),
            "a deque": lambda: DataLoader(rows, batch_size=6, collate_fn=_Queued(generator)),
        }[kind]()

    full, full_losses = _run(None, loader())
    _run(tmp_path, loader(), kill_at=7)
    with pytest.warns(UserWarning, match="callbacks' own state"):
        resumed, losses = _run(tmp_path, loader(), resume=True)  # pyro.set_rng_seed(7) first: another process's RNGs
    assert losses == full_losses
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


def test_resume_from_a_checkpoint_without_ran_out_after_an_epochs_last_partial_group_is_exact(tmp_path):
    """A checkpoint of a version before ran_out was recorded (nor the SHA-256s, Python's and numpy's RNG states or
    set_epoch's epochs) was resumed as if taken before the epoch's data ran out: one taken after an epoch's last,
    partial group (4 batches, grad_accum_steps=3: step 4's) replayed one draw of the loader's generator too few
    (parameters 0.022 off an uninterrupted run's), without a word. Where all the epoch's batches were read and they end
    in a partial group, the data had run out: it is inferred so."""
    from torch.utils.data import DataLoader

    rows = _rows()

    def loader():
        return DataLoader(rows, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(123))

    full, full_losses = _run(None, loader(), grad_accum_steps=3)
    _run(tmp_path, loader(), kill_at=5, grad_accum_steps=3)
    state = torch.load(tmp_path / "fit_state.pt", weights_only=True)
    assert state.pop("ran_out") is True and state["seen"] == 4
    for rng in (state["rng"], state["epoch_rng"]):
        for key in ("epochs", "random", "numpy"):
            rng.pop(key, None)
    torch.save(state, tmp_path / "fit_state.pt")
    meta = json.loads((tmp_path / "guide.json").read_text())
    (tmp_path / "guide.json").write_text(json.dumps({k: v for k, v in meta.items() if not k.endswith("_sha256")}))
    with pytest.warns(UserWarning, match="callbacks' own state"):
        resumed, losses = _run(tmp_path, loader(), resume=True, grad_accum_steps=3)
    assert losses == full_losses
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


def _defaulted(generator):
    def collate(items, generator=generator):
        return _mask(items, generator)
    return collate


class _Queued:
    def __init__(self, generator):
        self.generators = collections.deque([generator])

    def __call__(self, items):
        return _mask(items, self.generators[0])


class _MadeOnFirstUse:
    """A collator making its generator at its first call, as transformers' DataCollatorForLanguageModeling(seed=...)."""

    def __init__(self):
        self.generator = None

    def __call__(self, items):
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(5)
        return _mask(items, self.generator)


class _SystemRandomised(_Masked):
    rng = random.SystemRandom()

    def pick(self):
        return self.rng.randrange(6)


def test_data_holding_many_objects_still_checkpoint_and_resume_exactly(tmp_path):
    """The search for the data's generators refused data holding over 100,000 objects (800 tokenized rows with their
    offset pairs), which a copy twice as long (a list past 1,000 items, not searched) passed: it stops there instead,
    and the replayed batches' digest tells a generator it missed."""
    from torch.utils.data import DataLoader

    rows = _rows()
    for row in rows:
        row["offsets"] = [[(i, i + 1) for i in range(500)] for _ in range(10)]  # as NER/QA preprocessing keeps them

    def loader():
        return DataLoader(rows, batch_size=6, shuffle=True, collate_fn=lambda items: torch.utils.data.default_collate(
            [{k: v for k, v in item.items() if k != "offsets"} for item in items]))

    full, full_losses = _run(None, loader())
    _run(tmp_path, loader(), kill_at=7)
    with pytest.warns(UserWarning, match="callbacks' own state"):
        resumed, losses = _run(tmp_path, loader(), resume=True)
    assert losses == full_losses
    assert all(torch.equal(resumed[name], full[name]) for name in full)


@pytest.mark.parametrize("kind", ["a generator made on first use", "random.SystemRandom"])
def test_a_resume_whose_replayed_batches_differ_from_the_runs_is_refused(tmp_path, kind):
    """A generator the data make on first use (transformers' DataCollatorForLanguageModeling(seed=...)) is in no
    checkpoint: the resumed run restarted it and drifted (parameters 0.005 off), without a word; a dataset drawing from
    random.SystemRandom made every checkpoint crash (its getstate raises). The checkpoint records a digest of the
    epoch's batches, and a resume whose replayed batches differ is refused before any training on them."""
    from torch.utils.data import DataLoader

    rows = _rows()

    def loader():
        if kind == "random.SystemRandom":
            return DataLoader(_SystemRandomised(rows), batch_size=6)
        return DataLoader(rows, batch_size=6, collate_fn=_MadeOnFirstUse())

    _run(tmp_path, loader(), kill_at=7)  # in epoch 1: the made generator had drawn epoch 0's masks
    with pytest.raises(ValueError, match="are not those the run read .*rerun the fit from the start"):
        _run(tmp_path, loader(), resume=True)


@pytest.mark.parametrize("changed, message", [
    (dict(n=23), "examples: 24 there, 23 here"),  # 4 batches of 6 either way
    (dict(batch_size=7), "batch_size: 6 there, 7 here"),
    (dict(shuffle=False), "sampler: 'RandomSampler.* there, 'SequentialSampler.* here"),
])
def test_resume_refuses_other_data_with_as_many_batches(tmp_path, changed, message):
    """Data of another length, batch size or order was resumed where the number of batches matched (20 -> 21 examples
    at batch size 3, batch size 7 -> 8, shuffle True -> False): the dataset's length, the batch size, drop_last and
    the samplers are compared now, each difference named."""
    from torch.utils.data import DataLoader

    def loader(n=24, batch_size=6, shuffle=True):
        return DataLoader(_rows()[:n], batch_size=batch_size, shuffle=shuffle)

    _run(tmp_path, loader(), kill_at=3)
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, loader(**changed), resume=True)


def test_a_kl_weight_that_counts_its_calls_runs_alike_with_checkpoints(tmp_path):
    """With checkpoint_dir, fit called kl_weight for every step of the run up front: an annealer counting its own calls
    (warm-up over 10 of them) was at 1.0 from the first step. It is called as without checkpoints now."""
    from torch.utils.data import DataLoader

    class Annealer:
        def __init__(self):
            self.calls = 0

        def __call__(self, step):
            self.calls += 1
            return min(1.0, self.calls / 10)

    weights = {}
    for folder in (None, tmp_path / "ck"):
        seen = []
        _run(folder, DataLoader(_rows(), batch_size=6), kl_weight=Annealer(),
             callbacks=[lambda s: seen.append(s.kl_weight)])
        weights[folder] = seen
    assert weights[None] == weights[tmp_path / "ck"] == [min(1.0, (s + 1) / 10) for s in range(12)]


def test_resume_refuses_what_it_cannot_replay_before_any_work(tmp_path):
    """persistent_workers=True resumed with another order (its workers' seed is drawn in the first epoch only) and a
    SWAGCollector restarted empty (2 of 7 iterates), both without a word; both are refused now, naming the way out."""
    from torch.utils.data import DataLoader

    from pyro_lora.guides import SWAGCollector, SWAGGuide

    persistent = DataLoader(_rows(), batch_size=6, num_workers=1, persistent_workers=True)
    with pytest.raises(ValueError, match=r"persistent_workers=True \(num_workers=1\).*persistent_workers=False"):
        _run(tmp_path, persistent, resume=True)
    with pytest.raises(ValueError, match="cannot continue the callbacks SWAGCollector.*rerun the fit from the start"):
        swag = SWAGGuide(LoraModel(tiny_bert(), SequenceClassification(), num_data=24), rank=2)
        _run(tmp_path, DataLoader(_rows(), batch_size=6), resume=True, callbacks=[SWAGCollector(swag)])


def test_resume_compares_stop_on_divergence_and_a_new_run_warns_of_an_unfinished_one(tmp_path):
    """stop_on_divergence differing between run and resume crashed with a TypeError; a new fit (resume forgotten) on
    the folder of an unfinished run overwrote its checkpoint without a word."""
    from torch.utils.data import DataLoader

    _run(tmp_path, DataLoader(_rows(), batch_size=6), kill_at=3)
    with pytest.raises(ValueError, match="stop_on_divergence: True there, False here"):
        _run(tmp_path, DataLoader(_rows(), batch_size=6), resume=True, stop_on_divergence=False)
    with pytest.warns(UserWarning, match=r"unfinished run \(step 2 of 12\); this new run overwrites it.*resume=True"):
        _run(tmp_path, DataLoader(_rows(), batch_size=6), kill_at=1)


def test_load_guide_does_not_advise_resuming_a_run_of_unknown_length(tmp_path):
    """A checkpoint of a run over data without a length advised fit(..., resume=True), which refuses such data."""
    model, guide = make()
    with pytest.raises(_Kill):
        fit(model, guide, (b for b in toy_data()), lr=1e-2, checkpoint_dir=tmp_path, checkpoint_every=2,
            callbacks=[lambda s: s.step == 3 and (_ for _ in ()).throw(_Kill())], progress=False)
    with pytest.warns(UserWarning, match="a run over data without a length cannot be resumed") as caught:
        load_guide(tmp_path, make()[0])
    assert "resume=True" not in str(caught[0].message)


def test_a_save_never_deletes_what_it_does_not_write(tmp_path, monkeypatch):
    """An atomic save replaces the folder whole: save_guide into a folder of the user's files deleted them, and
    save_guide(guide, ".") removed the working folder from under the process."""
    model, guide = make()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("mine")
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".git").mkdir()  # a cloned repository: dot-names were let through, and deleted
    with pytest.raises(ValueError, match=r"hidden holds 1 entries the save does not write \(e.g. '.git'\)"):
        export_adapter(guide, tmp_path / "hidden")
    assert (tmp_path / "hidden" / ".git").is_dir()
    with pytest.raises(ValueError, match=r"runs holds 1 entries the save does not write \(e.g. 'notes.txt'\), which "
                                         "replacing the folder whole would delete"):
        save_guide(guide, tmp_path / "runs")
    with pytest.raises(ValueError, match="holds 1 entries the save does not write"):
        export_adapter(guide, tmp_path / "runs")
    with pytest.raises(ValueError, match="holds 1 entries"):
        fit(model, guide, toy_data(), checkpoint_dir=tmp_path / "runs", progress=False)
    assert (tmp_path / "runs" / "notes.txt").read_text() == "mine"
    save_guide(guide, tmp_path / "g", run={"seed": 0}, adapter=True)
    save_guide(guide, tmp_path / "g")  # its own files (the run record, the adapter) are replaced
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["guide.json", "guide.safetensors"]
    monkeypatch.chdir(tmp_path / "g")
    for here in (".", "./", "sub/..", str(tmp_path)):
        with pytest.raises(ValueError, match="is the working folder or holds it"):
            save_guide(guide, here)
    save_guide(guide, "sub/../../g2")  # a name of its own: saved where the operating system resolves it
    assert (tmp_path / "g2" / "guide.json").exists() and (tmp_path / "g" / "guide.json").exists()


def test_a_guide_folder_is_data_never_code(tmp_path):
    model, guide = make()
    save_guide(guide, tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "guide.json").read_text())
    for crafted in ("os:system", "subprocess:run", "builtins:eval", "pyro_lora.guides.base:pyro_params"):
        forged = meta | {"guide": crafted}
        forged["meta_sha256"] = meta_sha256(forged)  # a digest is no signature: a crafted file can carry its own
        (tmp_path / "g" / "guide.json").write_text(json.dumps(forged))
        with pytest.raises(ValueError, match=f"names {crafted!r}, which is no registered guide class"):
            load_guide(tmp_path / "g", model)


def test_saved_guides_are_readable_by_others(tmp_path):
    import stat

    model, guide = make()
    save_guide(guide, tmp_path / "g")
    assert stat.S_IMODE((tmp_path / "g").stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "g").iterdir()} == {0o644}


def test_a_kill_inside_the_directory_swap_is_recovered(tmp_path):
    import os

    model, guide = make()
    save_guide(guide, tmp_path / "g")
    dead = 2**22 + 12345  # above Linux's default pid_max: no process has it
    os.replace(tmp_path / "g", tmp_path / f".g.old-{dead}")  # killed between the swap's two renames
    (tmp_path / f".g.tmp-{dead}-x1y2").mkdir()  # and a temporary folder of an interrupted save
    (tmp_path / f".g.tmp-{dead}-x1y2" / "guide.safetensors").write_bytes(b"half")
    load_guide(tmp_path / "g", model)  # the previous complete guide is found and put back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]
    mine = tmp_path / f".g.tmp-{os.getpid()}-live"
    mine.mkdir()  # a running process's save is left alone
    save_guide(guide, tmp_path / "g")
    assert mine.exists()


def test_a_swap_is_recovered_whatever_the_folder_name_and_a_live_writers_leftover_is_named(tmp_path, monkeypatch):
    """A folder named guide[seed0] was never recovered (its name was read as a glob pattern); a leftover of a running
    (or reused) process id gave a bare 'guide.json missing'; a second writer between the swap's renames an OSError."""
    import os

    from pyro_lora import io

    model, guide = make()
    dead = 2**22 + 12345
    for name in ("g[seed0]", "g*", "g?x"):
        save_guide(guide, tmp_path / name)
        os.replace(tmp_path / name, tmp_path / f".{name}.old-{dead}")
        load_guide(tmp_path / name, model)
        assert (tmp_path / name / "guide.json").is_file() and not (tmp_path / f".{name}.old-{dead}").exists()
    save_guide(guide, tmp_path / "h")
    os.replace(tmp_path / "h", tmp_path / f".h.old-{os.getpid()}")  # a live process's (or a reused id's) swap
    with pytest.raises(FileNotFoundError, match=rf"moved the previous guide to .*\.h\.old-{os.getpid()}.*rename "
                                                rf"\.h\.old-{os.getpid()} back to h"):
        load_guide(tmp_path / "h", model)
    os.replace(tmp_path / f".h.old-{os.getpid()}", tmp_path / "h")
    replace = os.replace

    def other_writer_between(src, dst):
        replace(src, dst)
        if ".old-" in str(dst):  # the first rename done: another writer's folder takes the place
            (tmp_path / "h").mkdir()
            (tmp_path / "h" / "guide.json").write_text("{}")

    monkeypatch.setattr(io.os, "replace", other_writer_between)
    with pytest.raises(FileExistsError, match=r"another process wrote .*h while this one was saving there"):
        save_guide(guide, tmp_path / "h")


def test_a_gradient_left_by_an_earlier_fit_does_not_join_the_next_one():
    """fit(train_network=False) leaves gradients on the head it does not train; the next fit that trains the head
    used to add them to its first step (the rows of compare then depended on the methods run before)."""
    data = toy_data()

    def trained(stale):
        pyro.set_rng_seed(0)
        model, guide = make()
        if stale:
            for p in model.point_parameters():
                p.grad = torch.full_like(p, 100.0)
        fit(model, guide, data, epochs=1, lr=1e-2, progress=False)
        return [p.detach().clone() for p in model.point_parameters()]

    for clean, after_stale in zip(trained(False), trained(True), strict=True):
        torch.testing.assert_close(after_stale, clean)


def test_fit_over_several_batches_without_num_data_says_so():
    """pyro#1437: without num_data each batch is taken as the whole data, its likelihood weighed B/N against the prior
    (a posterior too wide), without a word; one batch is the whole data, and says nothing."""
    import warnings

    data = toy_data(n=24, batch=8)
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification())
    with pytest.warns(UserWarning, match="the model has no num_data, and fit steps through 3 batches: each is taken as the "
                                         "whole training set"):
        fit(model, MAPGuide(model), data, epochs=1, lr=1e-3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        one = LoraModel(tiny_bert(num_labels=2), SequenceClassification())
        fit(one, MAPGuide(one), data[:1], epochs=1, lr=1e-3, progress=False)
        sized = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), num_data=24)
        fit(sized, MAPGuide(sized), data, epochs=1, lr=1e-3, progress=False)


class _Stream(torch.utils.data.IterableDataset):
    """``batches`` as a stream: a DataLoader over it has no length (its ``__len__`` raises)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def unsized(batches):
    return torch.utils.data.DataLoader(_Stream(batches), batch_size=None)


def test_fit_over_data_without_a_length_without_num_data_says_so_once_a_second_batch_is_read():
    """The num_data check counted a DataLoader over an IterableDataset as 0 batches: its 3 batches were each taken as the
    whole training set (the data weighed B/N against the prior) without a word, where the same 3 as a list warn."""
    import warnings

    data = toy_data(n=24, batch=8)
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification())
    with pytest.warns(UserWarning, match=r"the model has no num_data, and fit \(over data without a length, its batches "
                                         r"counted as read\) steps through 2 batches: each is taken as the whole") as got:
        fit(model, MAPGuide(model), unsized(data), epochs=2, lr=1e-3, progress=False)
    assert sum("no num_data" in str(w.message) for w in got) == 1  # once, not per epoch
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        one = LoraModel(tiny_bert(num_labels=2), SequenceClassification())
        fit(one, MAPGuide(one), unsized(data[:1]), epochs=2, lr=1e-3, progress=False)  # one batch: the whole data


def test_a_warmup_the_run_ends_inside_is_warned_of_over_data_without_a_length():
    """warmup_steps longer than the run is refused for data with a length, but over a DataLoader without one every step
    ran at a fraction of lr (6 of 100: 1% to 6%) without a word; a decaying schedule was refused only after the guide
    took the network over, with 'needs data with a length' and no way out."""
    import warnings

    model, guide = make()
    with pytest.warns(UserWarning, match=r"fit: the run will end inside its warmup: epoch 0 gave 6 optimizer steps, and "
                                         r"2 epochs of as many make 12 of warmup_steps=100: the learning rate reaches only "
                                         r"0\.12 of lr") as got:
        fit(model, guide, unsized(toy_data()), epochs=2, lr=1e-3, warmup_steps=100, progress=False)
    assert sum("warmup" in str(w.message) for w in got) == 1
    with pytest.warns(UserWarning, match=r"fit: the run ended inside its warmup: 3 optimizer steps of warmup_steps=4: the "
                                         r"learning rate reaches only 0\.75 of lr"):
        fit(model, guide, unsized(toy_data()), lr=1e-3, warmup_steps=4, grad_accum_steps=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit(model, guide, unsized(toy_data()), epochs=2, lr=1e-3, warmup_steps=12, progress=False)  # reaches lr
    with pytest.raises(ValueError, match=r"lr_schedule='cosine' decays the learning rate to 0 over the run's optimizer "
                                         r"steps.*use lr_schedule='constant'"):
        fit(model, guide, unsized(toy_data()), lr_schedule="cosine", progress=False)


def _single_examples():
    return [{k: v[i] for k, v in toy_data()[0].items()} for i in range(4)]


@pytest.mark.parametrize("data, message", [
    (lambda: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*toy_data()[0].values()), batch_size=4),
     r"got a list of 3 tensors \(a DataLoader over a TensorDataset"),
    (_single_examples, r"but its input_ids has shape \(6,\): one example, not a batch of them"),
    (lambda: [{**toy_data()[0], "attention_mask": [[1] * 6] * 8}], r"but its attention_mask is a list, not a tensor"),
])
def test_batches_that_are_no_dicts_of_batched_tensors_are_refused_before_their_forward(data, message):
    """A TensorDataset's batches (lists) failed in fit with "'list' object has no attribute 'get'", a list of single
    examples with an IndexError inside the likelihood (predict alike): each is now named, with the collators to use."""
    model, guide = make()
    before = [p.detach().clone() for p in guide.parameters()]
    steps = []
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())  # the model's own check
    for run in (lambda: fit(model, guide, data(), progress=False, callbacks=[steps.append]),
                lambda: predict(model, guide, data()), lambda: svi.step(next(iter(data())))):
        with pytest.raises(ValueError, match=r"a batch must be a dict of batched tensors \(input_ids \[B, L\], "
                                             rf"attention_mask \[B, L\], labels \[B\].*{message}.*collate_fn=collator"):
            run()
    assert not steps and all(torch.equal(a, b) for a, b in zip(before, guide.parameters()))
    mixed = toy_data()[:2] + _single_examples()  # a list is checked at its first batch, before any work; the rest as read
    with pytest.raises(ValueError, match=r"its input_ids has shape \(6,\)"):
        fit(model, guide, mixed, progress=False, callbacks=[steps.append])
    assert len(steps) == 2


def test_resume_refuses_other_particles_lora_dropout_or_batch_rows(tmp_path):
    """A resume took Trace_ELBO(num_particles=4) for a run of one particle, an adapter rebuilt with lora_dropout 0.3
    for one of 0, and a list of 5-row batches for one of 6-row batches (as many batches), each without a word: the
    resumed parameters were neither run's (0.08 from one, 0.17 from the other)."""
    from peft import LoraConfig, get_peft_model
    from pyro.infer import Trace_ELBO

    def run(folder, data, dropout=0.0, elbo=None, kill_at=None, resume=False, hidden=None):
        pyro.set_rng_seed(0)
        net = get_peft_model(tiny_bert_base(num_labels=2), LoraConfig(r=2, target_modules=["query", "value"],
                                                                       lora_dropout=dropout))
        if hidden is not None:  # a dropout set on the module at run time, which its config does not say
            net.base_model.model.bert.embeddings.dropout.p = hidden
        model = LoraModel(net, SequenceClassification(), random="AB", num_data=24)
        guide = MeanFieldGuide(model, b="normal")

        def stop(state):
            if state.step == kill_at:
                raise _Kill
        try:
            fit(model, guide, data, epochs=2, lr=3e-2, elbo=elbo, callbacks=[stop] if kill_at else [], checkpoint_dir=folder,
                checkpoint_every=1, resume=resume, progress=False)
        except _Kill:
            pass

    batches = toy_data(n=24, batch=6)
    run(tmp_path, batches, kill_at=2)
    for kwargs, message in [({"elbo": Trace_ELBO(num_particles=4)}, r"elbo: 'Trace_ELBO' there, 'Trace_ELBO\(num_particles=4"),
                            ({"dropout": 0.3}, r"lora_dropout: .*0\.0.* there, .*0\.3.* here"),
                            ({"hidden": 0.5}, r"\(dropout: base_model.model.bert.embeddings.dropout.p 0\.1 there, 0\.5 here\)"),
                            ({"data": toy_data(n=20, batch=5)}, r"batch_rows: \[6, 6, 6, 6\] there, \[5, 5, 5, 5\] here")]:
        with pytest.raises(ValueError, match=message):
            run(tmp_path, **{"data": batches, **kwargs}, resume=True)
    run(tmp_path, batches, elbo=Trace_ELBO(), resume=True)  # the same settings still resume


def test_resume_refuses_a_model_whose_callable_prior_differs_and_numpy_epochs_save(tmp_path):
    """A callable prior N(0, 1) resumed as N(0, 0.1) without a word (the checkpoint named the prior by its class only):
    the rest of the run optimised another objective. epochs=np.int64(2) reached fit_progress and failed the first
    checkpoint's JSON after the last step."""
    import numpy as np
    import pyro.distributions as dist

    def run(scale, kill_at=None, resume=False, epochs=2):
        pyro.set_rng_seed(0)
        prior = lambda site: dist.Normal(torch.zeros(site.shape), scale).to_event(len(site.shape))  # noqa: E731
        model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), random="AB", prior=prior, num_data=24)
        guide = MeanFieldGuide(model, b="normal")

        def stop(state):
            if state.step == kill_at:
                raise _Kill
        try:
            return fit(model, guide, toy_data(n=24, batch=6), epochs=epochs, lr=3e-2, callbacks=[stop] if kill_at else [],
                       checkpoint_dir=tmp_path, checkpoint_every=1, resume=resume, progress=False), guide
        except _Kill:
            return None, guide

    run(1.0, kill_at=2)
    with pytest.raises(ValueError, match=r"cannot resume .*model's prior of query\.lora_A\.base_dist\.scale: 1\.0 there, 0\.1"):
        run(0.1, resume=True)
    losses, guide = run(1.0, resume=True, epochs=np.int64(2))
    assert len(losses) == 8 and type(guide.fit_progress["epochs"]) is int  # 2 epochs of 4 batches


def test_a_model_without_num_data_trains_on_the_per_example_loss_of_each_batch():
    """Without num_data the loss was the batch's whole negative ELBO (48x the documented per-example one for a batch
    of 48), and max_grad_norm clipped that gradient."""
    from pyro.infer import Trace_ELBO

    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), random="AB")
    guide = MAPGuide(model)
    (batch,) = toy_data(n=8, batch=8)
    expected = Trace_ELBO().differentiable_loss(model, guide, batch).item() / 8
    assert fit(model, guide, [batch], epochs=1, lr=0.0, progress=False)[0] == pytest.approx(expected, rel=1e-5)


def test_a_second_fit_on_a_checkpoint_dir_another_fit_holds_is_refused_before_any_work(tmp_path):
    """Two fits checkpointing to one folder both finished without a word, the folder holding whichever saved last: each
    run now holds a lock beside its checkpoint_dir, and a fit while another holds it is refused, naming the holder."""
    import threading

    from pyro_lora.locking import FolderLocked, slot_lock

    folder = tmp_path / "ck"
    taken, release = threading.Event(), threading.Event()

    def other_fit():  # another writer of the folder (a thread's lock is refused as another process's)
        with slot_lock(folder, "checkpoint_dir"):
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=other_fit)
    holder.start()
    try:
        taken.wait(30)
        with pytest.raises(FolderLocked, match=r"process \d+ is writing checkpoint_dir"):
            _run(folder, toy_data(n=24, batch=6))
        assert not folder.exists()  # refused before its first checkpoint
    finally:
        release.set()
        holder.join()
    _run(folder, toy_data(n=24, batch=6))  # once the other run ends, the folder is free
    assert (folder / "guide.json").exists()
    nested = []

    def fit_again(state):  # a fit started by a callback of one running on the same folder (this thread holds it)
        if state.step == 1:
            with pytest.raises(FolderLocked, match="this thread .* is already writing checkpoint_dir"):
                _run(folder, toy_data(n=24, batch=6))
            nested.append(True)

    _run(folder, toy_data(n=24, batch=6), callbacks=[fit_again])
    assert nested == [True]


def test_fit_warns_where_num_data_is_not_the_examples_its_dataloader_draws():
    """fit on a DataLoader over 96 examples with LoraModel(num_data=24) ran without a word: the data term is scaled to
    24, so the KL weighed 4x what it should. It warns, naming both; not where the loader draws num_data examples in an
    epoch (drop_last leaving a partial batch out, a SubsetRandomSampler's indices), nor where that is unknown (an
    IterableDataset, a sampler drawing with replacement)."""
    import warnings

    from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SubsetRandomSampler

    batch = toy_data(n=100, batch=100)[0]
    rows = [{k: v[i] for k, v in batch.items()} for i in range(100)]

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(rows[:96])

    def warned(num_data, **loader):
        model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), random="AB", num_data=num_data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(model, MeanFieldGuide(model, b="normal"), DataLoader(**{"batch_size": 16, **loader}), epochs=0,
                progress=False)
        return [str(w.message) for w in caught if "num_data=" in str(w.message)]

    said = warned(24, dataset=rows[:96], shuffle=True)
    assert len(said) == 1 and "draws 96 examples an epoch" in said[0] and "weighs 4x" in said[0]
    assert warned(96, dataset=rows[:96], shuffle=True) == []
    assert warned(100, dataset=rows, drop_last=True) == warned(96, dataset=rows, drop_last=True) == []  # 6 batches of 16
    assert len(warned(90, dataset=rows, drop_last=True)) == 1
    assert warned(24, dataset=rows, sampler=SubsetRandomSampler(range(24))) == []
    assert len(warned(96, dataset=rows, sampler=SubsetRandomSampler(range(24)))) == 1
    assert warned(24, dataset=Stream()) == []
    assert warned(24, dataset=rows, sampler=RandomSampler(rows, replacement=True)) == []


def _seeded_fit(context=contextlib.nullcontext):
    """A MAP fit from seed 0, run inside ``context()``: its losses and the guide."""
    pyro.set_rng_seed(0)
    model, guide = make()
    with context():
        losses = fit(model, guide, toy_data(), lr=1e-2, progress=False)
    return losses, guide


@pytest.mark.parametrize("context, named", [
    (lambda: poutine.scale(scale=3.0), "poutine.scale"),
    (poutine.trace, "poutine.trace"),
    (lambda: poutine.condition(data={"query.lora_A": torch.zeros(2, 4, 32)}), "poutine.condition"),
    (lambda: poutine.mask(mask=False), "poutine.mask"),
    (lambda: pyro.plate("data", 8), "pyro.plate('data')"),
])
def test_fit_inside_a_pyro_handler_is_refused_naming_it_before_any_work(context, named):
    """fit runs its own inference: under poutine.scale(3) it returned each loss x3 (the documented loss is per training
    example), under poutine.trace or condition it died in Pyro ('Multiple sample sites named', 'must be sampled in
    trace') after setting fit_progress. Such a handler is refused now, naming it, before any work; block and seed,
    which change nothing fit computes, run the clean run."""
    from pyro_lora.guides.ensemble import train_ensemble
    model, guide = make()
    network = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    with context(), pytest.raises(ValueError, match=rf"fit runs inside the Pyro handler\(s\) {re.escape(named)}: .*call fit outside"):
        fit(model, guide, toy_data(), lr=1e-2, progress=False)
    with context(), pytest.raises(ValueError, match=rf"train_ensemble runs inside the Pyro handler\(s\) {re.escape(named)}"):
        train_ensemble(model, toy_data(), k=2)  # before its first member is re-initialised
    assert guide.fit_progress is None
    assert all(torch.equal(p, network[n]) for n, p in model.net.named_parameters())


@contextlib.contextmanager
def _reseeded():
    pyro.set_rng_seed(1)
    yield


@pytest.mark.parametrize("context, outside", [
    (torch.no_grad, contextlib.nullcontext), (lambda: torch.set_grad_enabled(False), contextlib.nullcontext),
    (poutine.block, contextlib.nullcontext), (lambda: poutine.seed(rng_seed=1), _reseeded),  # seeds, as set_rng_seed
])
def test_fit_under_no_grad_or_a_harmless_handler_is_the_clean_run(context, outside):
    """fit under torch.no_grad() or set_grad_enabled(False) died in its first backward ('element 0 of tensors does not
    require grad'), leaving fit_progress at step 0 unfinished: it switches gradients on for its run now, the same run
    as outside (and switches them back off after)."""
    clean, guide = _seeded_fit(outside)
    inside, other = _seeded_fit(context)
    assert inside == clean and other.fit_progress["finished"]
    assert all(torch.equal(a, b) for a, b in zip(guide.mean().values(), other.mean().values()))
    with torch.no_grad():
        _seeded_fit()
        assert not torch.is_grad_enabled()


def test_fit_inside_inference_mode_is_refused_before_any_work():
    model, guide = make()
    with torch.inference_mode(), pytest.raises(ValueError, match=r"cannot run fit inside torch.inference_mode\(\): .*call it outside"):
        fit(model, guide, toy_data(), lr=1e-2, progress=False)
    assert guide.fit_progress is None


def test_the_num_data_warning_points_at_the_users_line_from_fit_and_from_a_loop_of_ones_own():
    """The library's warnings counted fixed frames up (``stacklevel=3``), which breaks with every wrapper or path
    between the user and the warning: they now find the first frame outside the library, Pyro and torch. And no
    warning of the library keeps a fixed count."""
    import re
    import warnings
    from pathlib import Path

    from pyro.infer import SVI, Trace_ELBO

    data = toy_data(n=24, batch=8)

    def lines(call):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        said = [w for w in caught if "no num_data" in str(w.message)]
        assert said
        return {(w.filename, w.lineno) for w in said}

    def fitted():
        model = LoraModel(tiny_bert(num_labels=2), SequenceClassification())
        fit(model, MAPGuide(model), data, epochs=1, lr=1e-3, progress=False)

    def streamed():
        model = LoraModel(tiny_bert(num_labels=2), SequenceClassification())
        fit(model, MAPGuide(model), unsized(data), epochs=1, lr=1e-3, progress=False)

    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification())
    svi = SVI(model, MAPGuide(model), pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())

    def stepped():
        for batch in data[:2]:
            svi.step(batch)

    for call, line in ((fitted, 3), (streamed, 3), (stepped, 3)):
        assert lines(call) == {(__file__, call.__code__.co_firstlineno + line - 1)}, call.__name__
    root = Path(__file__).resolve().parents[1]
    fixed = [f"{p.relative_to(root)}:{n}" for folder in ("pyro_lora", "guides") for p in sorted((root / folder).rglob("*.py"))
             for n, text in enumerate(p.read_text().splitlines(), 1) if re.search(r"(?<!`)stacklevel=\d", text)]
    assert not fixed, fixed


def test_a_collators_warning_points_at_the_users_line_through_the_dataloader_and_the_progress_bar(tmp_path):
    """A collator's cut warning, raised while predict iterates a DataLoader inside its progress bar, pointed into
    tqdm/std.py: the walk to the user's line stopped at tqdm's frame."""
    import warnings

    from conftest import bert_checkpoint
    from torch.utils.data import DataLoader
    from transformers import BertTokenizer

    from pyro_lora.collators import ClassificationCollator

    bert_checkpoint(tmp_path)
    tokenizer = BertTokenizer.from_pretrained(str(tmp_path))
    records = [{"id": i, "text": "a b " * 20, "label": i % 2} for i in range(8)]
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification())
    for progress in (False, True):
        loader = DataLoader(records, batch_size=4, collate_fn=ClassificationCollator(tokenizer, max_length=8))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = sys._getframe().f_lineno + 1
            predict(model, MAPGuide(model), loader, num_samples=1, progress=progress)
        said = [(w.filename, w.lineno) for w in caught if "longer than max_length" in str(w.message)]
        assert said == [(__file__, line)], progress


def test_numpy_bools_are_taken_as_the_bools_they_are(tmp_path):
    """check_flag took numpy 2's bools, and the raw values went on: fit recorded train_network=np.True_ as "True", so a
    resume given True was refused as another run; MultipleChoice(share_prefix=np.False_) shared the prefix."""
    from pyro_lora.likelihoods import MultipleChoice

    assert MultipleChoice(format="cloze", share_prefix=np.False_).share_prefix is False
    assert MultipleChoice(format="cloze", share_prefix=np.True_)._share_asked is True
    model, guide = make()

    def stop(state):
        if state.step == len(toy_data()) + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(model, guide, toy_data(), epochs=2, lr=1e-2, progress=np.False_, train_network=np.True_, callbacks=[stop],
            stop_on_divergence=np.True_, checkpoint_dir=tmp_path / "run", checkpoint_every=len(toy_data()))
    losses = fit(model, guide, toy_data(), epochs=2, lr=1e-2, progress=False, train_network=True,
                 checkpoint_dir=tmp_path / "run", checkpoint_every=len(toy_data()), resume=True)
    assert len(losses) == 2 * len(toy_data())  # the whole run's losses, the first epoch's from its checkpoint


def test_numpy_and_tensor_settings_and_a_numpy_column_checkpoint_and_resume_as_python_ones(tmp_path):
    """A numpy lr or weight_decay went into AdamW's param_groups and the checkpoint, and a collate's numpy column into
    the divergence watch's first batch there: the resume's weights_only load refused the file as corrupt. A tensor
    kl_weight was compared by its printed form: 0.50004 resumed a run of 0.5, and 0.5 did not."""
    # a reversed numpy column (torch.as_tensor refuses its negative stride), nested ones, a list of arrays
    data = [{**b, "idx": np.arange(len(b["labels"]))[::-1], "meta": {"idx": np.arange(3), "when": np.datetime64("2026-01-01")},
             "parts": [np.arange(2), np.arange(3)]} for b in toy_data()]
    steps = len(data)

    def run(folder, kill=False, resume=False, **settings):
        pyro.set_rng_seed(0)
        model, guide = make()

        def stop(state):
            if kill and state.step == steps + 1:
                raise KeyboardInterrupt

        try:
            return fit(model, guide, data, epochs=2, progress=False, callbacks=[stop], checkpoint_dir=tmp_path / folder,
                       checkpoint_every=steps, resume=resume, **settings)
        except KeyboardInterrupt:
            return None

    numpy = dict(lr=np.float32(0.01), weight_decay=np.float64(0.01), kl_weight=torch.tensor(0.5), lr_schedule=np.str_("linear"))
    whole = run("whole", **numpy)
    run("killed", kill=True, **numpy)
    with pytest.raises(ValueError, match=r"kl_weight: 0.5 there, 0.500\d* here"):
        run("killed", resume=True, **{**numpy, "kl_weight": torch.tensor(0.50004)})
    assert run("killed", resume=True, lr=float(np.float32(0.01)), weight_decay=0.01, kl_weight=0.5, lr_schedule="linear") == whole


def test_a_resume_on_a_base_of_another_dtype_is_refused(tmp_path):
    """A float32 run resumed on a bfloat16 cast of its base went on without a word (the base's fingerprint allows a
    cast), its parameters 9e-3 off the uninterrupted run's."""
    data = toy_data()

    def run(dtype, resume=False):
        pyro.set_rng_seed(0)
        model = LoraModel(tiny_bert(num_labels=2, dtype=dtype), SequenceClassification(), random="AB", num_data=48)

        def stop(state):
            if not resume and state.step == len(data) + 1:
                raise KeyboardInterrupt

        return fit(model, MAPGuide(model), data, epochs=2, lr=1e-2, progress=False, callbacks=[stop],
                   checkpoint_dir=tmp_path / "run", checkpoint_every=len(data), resume=resume)

    with pytest.raises(KeyboardInterrupt):
        run(torch.float32)
    with pytest.raises(ValueError, match=r"settings other than its own \(base_dtype: 'float32' there, 'bfloat16' here\)"):
        run(torch.bfloat16, resume=True)
    assert len(run(torch.float32, resume=True)) == 2 * len(data)


def test_a_checkpoint_of_the_earlier_version_that_printed_numpy_and_tensor_settings_still_resumes(tmp_path):
    """Before settings were recorded as Python values, a checkpoint held numpy's True as 'True' and a tensor kl_weight as
    'tensor(0.5000)': the values given again (now Python ones) never equalled them, and its run could not resume."""
    from pyro_lora.digests import file_sha256
    from pyro_lora.io import FIT_STATE, meta_sha256

    data = toy_data()

    def run(resume=False, **settings):
        pyro.set_rng_seed(0)
        model, guide = make()

        def stop(state):
            if not resume and state.step == len(data) + 1:
                raise KeyboardInterrupt

        return fit(model, guide, data, epochs=2, lr=1e-2, progress=False, callbacks=[stop], checkpoint_dir=tmp_path / "run",
                   checkpoint_every=len(data), resume=resume, **settings)

    with pytest.raises(KeyboardInterrupt):
        run(train_network=np.True_, kl_weight=torch.tensor(0.5), max_grad_norm=np.float32(1.0))
    path = tmp_path / "run" / FIT_STATE
    state = torch.load(path, weights_only=True)
    assert state["settings"].pop("base_dtype") == "float32"  # an earlier version's record: no base_dtype, printed values
    state["settings"].update(train_network="True", kl_weight="tensor(0.5000)", max_grad_norm="1.0")
    torch.save(state, path)
    meta = json.loads((tmp_path / "run" / "guide.json").read_text())
    meta["fit_state_sha256"] = file_sha256(path)
    meta["meta_sha256"] = meta_sha256(meta)
    (tmp_path / "run" / "guide.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"kl_weight: 'tensor\(0.5000\)' there, 0.6 here"):
        run(resume=True, train_network=True, kl_weight=0.6, max_grad_norm=1.0)
    assert len(run(resume=True, train_network=True, kl_weight=0.5, max_grad_norm=1.0)) == 2 * len(data)
