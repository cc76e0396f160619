"""The chunked predictive: samples drawn one chunk at a time (memory bounded by the chunk, not S), the same
S samples for every batch, reproducible under the global seed, chunk-size-independent in distribution,
exact for the ensemble's member sequence, and rank 0's samples under torch.distributed."""

import math
import weakref
from datetime import timedelta

import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import random_batch, tiny_bert

from pyro_lora.guides import FlowGuide, LaplaceGuide, MCDropoutGuide, MeanFieldGuide, SWAGGuide, TFBGuide
from pyro_lora.guides.ensemble import EnsembleGuide
from pyro_lora import LoraModel, SequenceClassification, distributed, predict
from pyro_lora.predictive import SEED_RANGE

N, C = 12, 3


def make_model():
    net = tiny_bert(num_labels=C)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a sharper head than the random init's (near-uniform softmax hides the weight noise)
        for name, p in net.named_parameters():
            if "classifier" in name and name.endswith("weight"):
                p.copy_(3 * torch.randn(p.shape, generator=g))
    return LoraModel(net, SequenceClassification(), random="AB", num_data=N)


def examples(n=N, seed=1):
    batch = random_batch(batch=n, seq=7, seed=seed)
    return batch | {"labels": torch.arange(n) % C}


def loader(batch_size, n=N):
    """The same ``n`` examples in batches of ``batch_size`` (the last one smaller)."""
    full = examples(n)
    return [{k: v[i : i + batch_size] for k, v in full.items()} for i in range(0, n, batch_size)]


def test_predict_without_a_guide_refuses_an_adapter_a_fit_never_wrote_beside_its_trained_head():
    """After fit(MAPGuide) without write_adapter, predict(model, None) paired the untrained LoRA with the trained head
    (0.029 off the MAP's probabilities) and, for a causal LM, gave the zero-shot base: without a word, where
    adapter_values() refused or warned."""
    from pyro_lora import CausalLM, fit
    from pyro_lora.guides import MAPGuide
    from conftest import tiny_llama

    model = make_model()
    guide = MAPGuide(model)
    fit(model, guide, loader(4), epochs=2, lr=5e-2, progress=False)
    with pytest.raises(ValueError, match=r"predict with guide=None .the adapter's own weights. would pair them with the "
                                         r"trained head; call model.write_adapter\(guide.mean\(\)\) first"):
        predict(model, None, loader(4))
    with model.net.disable_adapter():  # the base network and its original head: nothing of the fit to miss
        predict(model, None, loader(4))
    model.write_adapter(guide.mean())
    torch.testing.assert_close(predict(model, None, loader(4)).probs, predict(model, guide, loader(4)).probs)
    lm = LoraModel(tiny_llama(), CausalLM(), random="AB", num_data=4)
    lm_guide = MAPGuide(lm)
    batch = random_batch(batch=2, seq=6, seed=3)
    fit(lm, lm_guide, [batch | {"labels": batch["input_ids"]}], epochs=1, lr=5e-2, progress=False)
    with pytest.warns(UserWarning, match="the adapter still holds the LoRA values it held when fit last trained"):
        lm.check_start_trained("predict")  # predict itself refuses a token-level likelihood


def perturbed(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in model.adapter_values().items()}


def build(kind, model):
    """A stochastic guide of each family, with visibly random draws."""
    if kind == "meanfield":
        return MeanFieldGuide(model, b="normal", init_scale=3.0)
    if kind == "mcdropout":
        return MCDropoutGuide(model, p=0.3)
    if kind == "flow":
        return FlowGuide(model, inducing=(3, 2))
    if kind == "tfb":
        return TFBGuide(model, sigma_q=0.5)
    if kind == "swag":
        guide = SWAGGuide(model, rank=3, scale=1.0)
        for i in range(4):
            guide.collect(perturbed(model, 0.3, i))
        return guide
    if kind == "laplace":
        model.num_data = 4
        return LaplaceGuide(model, fisher="exact", prior_precision=1.0).fit(loader(4, n=4), progress=False)
    if kind == "ensemble":
        return EnsembleGuide(model, [perturbed(model, 0.5, i) for i in range(3)])
    raise ValueError(kind)


STOCHASTIC = ["meanfield", "mcdropout", "flow", "tfb", "swag", "laplace"]


class Recorder:
    """Wraps ``guide.sample``: the sizes asked for, and how many draws (and sample numel) are alive at once,
    through weak references to every returned tensor: a chunk still alive when the next is drawn counts."""

    def __init__(self, guide):
        self.sample, self.sizes, self.draws = guide.sample, [], []  # draws: (weakrefs, numel) per call
        self.peak_numel = self.peak_live_chunks = 0
        guide.sample = self

    def _alive(self):
        return [(refs, n) for refs, n in self.draws if any(r() is not None for r in refs)]

    def __call__(self, num_samples):
        self.sizes.append(num_samples)
        out = self.sample(num_samples)
        self.draws = self._alive() + [([weakref.ref(v) for v in out.values()], sum(v.numel() for v in out.values()))]
        self.peak_live_chunks = max(self.peak_live_chunks, len(self.draws))
        self.peak_numel = max(self.peak_numel, sum(n for _, n in self.draws))
        return out

    def alive_after(self):
        return len(self._alive())


def per_sample_numel(model):
    return sum(s.numel for s in model.sites.values())


# --- (a) the guide is asked for one chunk at a time, and one chunk at most is alive ------------------


@pytest.mark.parametrize("kind", STOCHASTIC)
def test_samples_are_drawn_one_chunk_at_a_time(kind):
    model = make_model()
    guide = build(kind, model)
    rec = Recorder(guide)
    S, c, data = 10, 3, loader(5)  # 3 batches, chunks of 3, 3, 3, 1
    pred = predict(model, guide, data, num_samples=S, chunk_size=c, keep_samples=True)
    assert pred.sample_probs.shape == (S, N, C) and pred.probs.shape == (N, C)
    assert max(rec.sizes) <= c
    assert rec.sizes == [3, 3, 3, 1] * len(data)  # every batch sees all S samples, chunk by chunk
    assert rec.peak_live_chunks == 1
    assert rec.peak_numel == c * per_sample_numel(model) < S * per_sample_numel(model)
    assert rec.alive_after() == 0
    assert pred.sample_probs.std(0).max() > 1e-4  # the draws do differ


def test_one_chunk_is_drawn_once_for_all_batches():
    model = make_model()
    guide = build("meanfield", model)
    rec = Recorder(guide)
    predict(model, guide, loader(5), num_samples=6)
    assert rec.sizes == [6]
    assert rec.alive_after() == 0


def test_ensemble_chunks_index_the_members_and_never_hold_S_draws():
    model = make_model()
    guide = build("ensemble", model)
    members = guide.members
    asked = []

    def recording_members():
        out = members()
        asked.append(next(iter(out.values())).shape[0])
        return out

    guide.members = recording_members
    rec = Recorder(guide)
    predict(model, guide, loader(5), num_samples=9, chunk_size=2)
    assert rec.sizes == []  # chunks are read off the K stored members, not from sample(S)
    assert asked == [3] * 5 * 3  # K = 3 members per chunk (5 chunks) and batch (3 batches)


# --- (b) exact equalities ---------------------------------------------------------------------


def run(guide_kind, seed, data=None, **kw):
    """A fresh model and guide, predicted with ``keep_samples`` under ``torch.manual_seed(seed)``."""
    model = make_model()
    guide = build(guide_kind, model)
    data = loader(4) if data is None else data
    torch.manual_seed(seed)
    return model, guide, predict(model, guide, data, keep_samples=True, **kw)


def chunk_draws(guide, seed, num_samples, chunk_size):
    """``(values, n)`` of each chunk, drawn as ``predict``'s docstring says after ``torch.manual_seed(seed)``: chunk ``i``
    by ``guide.sample(n)`` under the seed ``base + i``, ``base`` drawn once from the global RNG."""
    torch.manual_seed(seed)
    base = int(torch.randint(SEED_RANGE, ()))
    for i, start in enumerate(range(0, num_samples, chunk_size)):
        n = min(chunk_size, num_samples - start)
        with torch.random.fork_rng():
            torch.manual_seed(base + i)
            values = guide.sample(n)
        yield values, n


@pytest.mark.parametrize("kind", ["meanfield", "mcdropout", "swag"])
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_same_seed_same_prediction_and_batches_do_not_matter(kind, chunk):
    S = 7
    _, _, first = run(kind, 0, num_samples=S, chunk_size=chunk)
    _, _, again = run(kind, 0, num_samples=S, chunk_size=chunk)
    assert torch.equal(first.sample_probs, again.sample_probs) and torch.equal(first.probs, again.probs)
    _, _, other = run(kind, 1, num_samples=S, chunk_size=chunk)
    assert not torch.allclose(first.sample_probs, other.sample_probs)
    # an example's S samples are the same whichever batch (and batch size) it falls in
    for batch_size in (1, 5, N):
        _, _, rebatched = run(kind, 0, num_samples=S, chunk_size=chunk, data=loader(batch_size))
        torch.testing.assert_close(rebatched.sample_probs, first.sample_probs, rtol=1e-5, atol=1e-6)
    assert first.sample_probs.shape == (S, N, C)
    torch.testing.assert_close(first.probs, first.sample_probs.mean(0), rtol=1e-6, atol=1e-7)
    assert torch.equal(first.labels, examples()["labels"])


def test_the_samples_are_the_documented_per_chunk_seeded_draws():
    """Chunk ``i`` of ``S`` is ``guide.sample(n_i)`` under ``base + i``, ``base`` drawn from the global RNG."""
    S, c = 8, 3
    model, guide, pred = run("meanfield", 4, num_samples=S, chunk_size=c, data=loader(N))
    batch = loader(N)[0]
    expected = [torch.softmax(model.logits(batch, values, n), -1) for values, n in chunk_draws(guide, 4, S, c)]
    torch.testing.assert_close(pred.sample_probs, torch.cat(expected), rtol=1e-5, atol=1e-6)


def test_one_chunk_whatever_its_size_and_keep_samples_changes_nothing():
    S = 5
    _, _, default = run("meanfield", 2, num_samples=S)
    for chunk in (S, S + 4):
        _, _, same = run("meanfield", 2, num_samples=S, chunk_size=chunk)
        assert torch.equal(same.sample_probs, default.sample_probs)
    model = make_model()
    guide = build("meanfield", model)
    torch.manual_seed(2)
    plain = predict(model, guide, loader(4), num_samples=S, chunk_size=2)
    torch.manual_seed(2)
    kept = predict(model, guide, loader(4), num_samples=S, chunk_size=2, keep_samples=True)
    assert plain.sample_probs is None and torch.equal(plain.probs, kept.probs)


def test_predict_advances_the_global_rng_by_one_seed_and_pyro_seeds_it():
    model = make_model()
    guide = build("mcdropout", model)
    torch.manual_seed(3)
    predict(model, guide, loader(4), num_samples=5, chunk_size=2)
    after = torch.rand(3)
    torch.manual_seed(3)
    torch.randint(SEED_RANGE, ())
    assert torch.equal(after, torch.rand(3))  # the draws ran in a forked RNG; only the base seed was taken
    pyro.set_rng_seed(9)
    first = predict(model, guide, loader(4), num_samples=5, chunk_size=2, keep_samples=True)
    second = predict(model, guide, loader(4), num_samples=5, chunk_size=2, keep_samples=True)
    assert not torch.allclose(first.sample_probs, second.sample_probs)  # successive calls draw afresh
    pyro.set_rng_seed(9)
    assert torch.equal(predict(model, guide, loader(4), num_samples=5, chunk_size=2, keep_samples=True).sample_probs, first.sample_probs)


def test_ensemble_gives_its_member_sequence_for_every_chunk_size():
    model = make_model()
    guide = build("ensemble", model)
    S = 6  # draw s is member s mod 3; chunks of 2 or 4 start mid-cycle (at members 2 and 1)
    full = predict(model, guide, loader(5), num_samples=S, keep_samples=True)
    members = guide.members()
    for s in range(S):
        k = s % 3
        expected = torch.softmax(model.logits(examples(), {n: v[k] for n, v in members.items()}), -1)
        torch.testing.assert_close(full.sample_probs[s], expected, rtol=1e-5, atol=1e-6)
    for chunk in (1, 2, 4, 6):
        chunked = predict(model, guide, loader(5), num_samples=S, chunk_size=chunk, keep_samples=True)
        torch.testing.assert_close(chunked.sample_probs, full.sample_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full.probs, full.sample_probs[:3].mean(0), rtol=1e-5, atol=1e-6)  # the exact mixture


@pytest.mark.parametrize("chunk", [None, 1, 2, 4])
def test_ensemble_refuses_s_not_a_multiple_of_k_for_every_chunk_size(chunk):
    """S = 7 of K = 3 would weight member 0 by 3/7 and members 1, 2 by 2/7: refused, chunked or not, before any draw."""
    model = make_model()
    guide = build("ensemble", model)
    rec = Recorder(guide)
    for S in (1, 7, 8):
        with pytest.raises(ValueError, match=rf"num_samples={S} would weight .*use a multiple of K"):
            predict(model, guide, loader(5), num_samples=S, chunk_size=chunk)
    assert rec.sizes == []


def test_mean_is_refused_for_a_guide_whose_mean_is_no_predictor():
    """The generic mechanism: ``mean_is_predictor = False`` on a guide class makes predict(mean=True) refuse it."""

    class AveragedMembers(MeanFieldGuide):
        mean_is_predictor = False

    model = make_model()
    with pytest.raises(ValueError, match=r"predict\(mean=True\) refused for this AveragedMembers: its mean\(\) is no predictor"):
        predict(model, AveragedMembers(model, b="normal"), loader(5), mean=True)
    with pytest.raises(ValueError, match=r"predict\(mean=True\) refused for this EnsembleGuide"):
        predict(model, build("ensemble", model), loader(5), mean=True)
    predict(model, AveragedMembers(model, b="normal"), loader(5), num_samples=2)  # its samples are fine


def test_point_estimates_and_the_mean_run_one_forward():
    model = make_model()
    single = EnsembleGuide(model, [perturbed(model, 0.5, 0)])
    assert single.deterministic
    rec = Recorder(single)
    pred = predict(model, single, loader(5), num_samples=6, chunk_size=4, keep_samples=True)
    assert rec.sizes == [] and pred.sample_probs.shape == (1, N, C)
    guide = build("meanfield", model)  # (an ensemble's mean is refused: no predictor)
    rec = Recorder(guide)
    mean = predict(model, guide, loader(5), mean=True, chunk_size=2, keep_samples=True)
    expected = torch.softmax(model.logits(examples(), guide.mean()), -1)
    torch.testing.assert_close(mean.probs, expected, rtol=1e-5, atol=1e-6)
    assert rec.sizes == [] and mean.sample_probs.shape == (1, N, C)


# --- (c) chunk sizes agree in distribution ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["meanfield", "mcdropout"])
def test_predictive_converges_to_the_same_for_every_chunk_size(kind):
    S = 256
    data = loader(6, n=6)
    preds = {}
    for i, chunk in enumerate((1, 7, 64, None)):
        _, _, preds[chunk] = run(kind, 100 + i, num_samples=S, chunk_size=chunk, data=data)
    ref = preds[None]
    spread = ref.sample_probs.std(0)  # [N, C]
    assert spread.max() > 0.005  # the posterior is wide enough for the test to mean something
    tol = 5 * (2 / S) ** 0.5 * spread + 1e-4  # five standard errors of a difference of two S-sample means
    for chunk, pred in preds.items():
        assert (pred.probs - ref.probs).abs().le(tol).all(), chunk
        torch.testing.assert_close(pred.sample_probs.std(0), spread, rtol=0.3, atol=5e-3)
        if chunk is not None:
            assert not torch.allclose(pred.probs, ref.probs, rtol=0, atol=1e-7)  # independent draws


# --- (d) arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", True, torch.tensor(2)])
def test_bad_chunk_size_is_an_error(bad):
    model = make_model()
    with pytest.raises(ValueError, match="chunk_size"):
        predict(model, build("meanfield", model), loader(4), num_samples=4, chunk_size=bad)


@pytest.mark.parametrize("bad", [0, -3, 1.5, None, False, "8"])
def test_bad_num_samples_is_an_error(bad):
    model = make_model()
    for guide in (build("meanfield", model), None):
        with pytest.raises(ValueError, match="num_samples"):
            predict(model, guide, loader(4), num_samples=bad)


def test_ensemble_with_heads_refuses_chunks():
    model = make_model()
    name = "base_model.model.classifier.modules_to_save.default.weight"
    heads = [{name: torch.randn(C, 32), name.replace("weight", "bias"): torch.randn(C)} for _ in range(3)]
    guide = EnsembleGuide(model, [perturbed(model, 0.1, i) for i in range(3)], heads)
    with guide.member_heads(3), pytest.raises(ValueError, match="chunk_size"):
        predict(model, guide, loader(4), num_samples=3, chunk_size=2)


def far_too_wide(kind, model):
    """A guide whose weight draws overflow the float32 logits (nan probabilities, before, with no word)."""
    if kind == "laplace":  # the adversarial repro's setting: lambda 1e-25, accepted as a positive float32
        model.num_data = 4
        guide = LaplaceGuide(model, fisher="exact", rank=16).fit(loader(4, n=4), progress=False)
        guide.set_prior_precision(1e-25)
        return guide
    if kind == "tfb":
        return TFBGuide(model, sigma_q=1e30)
    if kind == "meanfield":
        guide = MeanFieldGuide(model, b="normal")  # then stds of 1e24, which no guide is built with
        with torch.no_grad():
            for rho in guide.rhos:
                rho.copy_(guide._rho(torch.full_like(rho, 1e24)))
        return guide
    if kind == "ensemble":  # every member's weights beyond float32's logits
        return EnsembleGuide(model, [{k: v * 1e30 * (i + 1) for k, v in model.adapter_values().items()} for i in range(2)])
    raise ValueError(kind)


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("kind", ["laplace", "tfb", "meanfield", "ensemble"])
def test_a_posterior_whose_draws_overflow_the_logits_is_refused_not_nan(kind, chunk):
    """Laplace at lambda = 1e-25 gave nan in 12 of 12 probabilities without a word (draws of std ~1e12): predict now
    refuses, naming the overflow and a posterior too wide, for every chunking, keep_samples or not; an ensemble has no
    width: its members' fixed weights are named instead."""
    model = make_model()
    guide = far_too_wide(kind, model)
    why = "the fixed weights of its members.*check the weights" if kind == "ensemble" else "far too wide"
    for keep in (False, True):
        with pytest.raises(ValueError, match=rf"predict: 15 of 15 predictive probabilities .* not finite.*{why}"):
            predict(model, guide, loader(5), num_samples=4, chunk_size=chunk, keep_samples=keep)


def test_a_point_estimate_whose_logits_overflow_is_refused_not_nan():
    model = make_model()
    model.write_adapter({k: v * 1e30 for k, v in model.adapter_values().items()})
    for guide in (None, MeanFieldGuide(model, b="normal", init_scale=1e-12)):  # the network's own weights, a guide's mean
        with pytest.raises(ValueError, match=r"predict: 15 of 15 predicted probabilities .* not finite.*overflowed"):
            predict(model, guide, loader(5), num_samples=4, mean=True)


@pytest.mark.parametrize("kind", ["meanfield", "ensemble", None])
def test_unlabelled_batches_are_predicted_with_labels_none(kind):
    """predict refused batches without labels ("the batch has no 'labels'"), though a predictive needs none: their
    probabilities are now the labelled batches', under the same seed, with labels None; scoring None is refused by
    name, and so are labelled batches mixed with unlabelled ones."""
    from pyro_lora.metrics import nll

    model = make_model()
    guide = None if kind is None else build(kind, model)
    data = loader(5)
    for unlabelled in ([{k: v for k, v in b.items() if k != "labels"} for b in data], [b | {"labels": None} for b in data]):
        torch.manual_seed(3)
        labelled = predict(model, guide, data, num_samples=6, chunk_size=4, keep_samples=True)
        torch.manual_seed(3)
        bare = predict(model, guide, unlabelled, num_samples=6, chunk_size=4, keep_samples=True)
        assert bare.labels is None and torch.equal(labelled.labels, torch.arange(N) % C)
        torch.testing.assert_close(bare.probs, labelled.probs, rtol=0, atol=0)
        torch.testing.assert_close(bare.sample_probs, labelled.sample_probs, rtol=0, atol=0)
        with pytest.raises(ValueError, match="labels is None: a prediction of unlabelled data"):
            nll(bare.probs, bare.labels)
        for mixed in ([data[0], *unlabelled[1:]], [*unlabelled[:2], data[2]]):
            with pytest.raises(ValueError, match="predict: some batches have labels and others none"):
                predict(model, guide, mixed, num_samples=6)


# --- torch.distributed: rank 0's samples, chunk by chunk --------------------------------------------


def _distributed_run(tamper):
    model = make_model()
    guide = build("meanfield", model)
    if tamper and distributed.rank() == 1:
        with torch.no_grad():
            guide.locs[0].add_(1.0)
    torch.manual_seed(5 + distributed.rank())  # ranks' RNGs differ: rank 0's base seed must be used
    return predict(model, guide, loader(4), num_samples=5, chunk_size=2, keep_samples=True)


def _worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        pred = _distributed_run(False)
        with pytest.raises(ValueError, match=r"the ranks hold different values of \['guide.locs.0'\]"):
            _distributed_run(True)
        torch.save((pred.probs, pred.sample_probs, pred.labels), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_use_rank_0s_chunked_samples(tmp_path):
    single = _distributed_run(False)
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for r in range(2):
        probs, sample_probs, labels = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(sample_probs, single.sample_probs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probs, single.probs, rtol=1e-5, atol=1e-6)
        assert torch.equal(labels, single.labels)


class CountedPasses:
    """Batches, counting every ``iter()``: a DataLoader starts its workers, a stream moves on, at each one."""

    def __init__(self, batches):
        self.batches, self.iters = batches, 0

    def __iter__(self):
        self.iters += 1
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


@pytest.mark.parametrize("progress", [False, True])
def test_every_pass_over_the_data_reads_it_once(progress):
    """tqdm.auto's bar took an iterator of the data when built and iterated the data afresh: two iter() per pass."""
    model = LoraModel(tiny_bert(), SequenceClassification(), prior=0.5, num_data=6)
    batches = [random_batch(seed=s) | {"labels": torch.tensor([0, 2, 1])} for s in (1, 2)]
    laplace = LaplaceGuide(model, fisher="exact", rank=3).fit(batches, progress=False)
    for run in (lambda d: predict(model, laplace, d, num_samples=2, progress=progress),
                lambda d: laplace.predict_glm(d, progress=progress),
                lambda d: laplace.optimize_prior_precision("val_nll", val_loader=d, grid=[1.0, 2.0, 3.0], refine=False,
                                                           progress=progress)):
        data = CountedPasses(batches)
        run(data)
        assert data.iters == 1


# --- log_probs: the exact float64 log of the predictive ----------------------------------------------------------


def sharp_model(gain=60.0):
    """:func:`make_model` with its head ``gain`` times sharper: margins of hundreds of nats, where float32
    probabilities are 0 (below ``e^-103``) and float64 ones still hold them."""
    model = make_model()
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if "classifier" in name and name.endswith("weight"):
                p.mul_(gain)
    return model


def log_mean_softmax(logits):
    """``log mean_s softmax(f_s)`` of ``[S, N, C]`` logits through float64 probabilities (no log-sum-exp)."""
    return torch.softmax(logits.double(), -1).mean(0).log()


def batched_logits(model, values=None, n=None, batch_size=5):
    """``model.logits`` over ``loader(batch_size)``'s batches, as predict runs them (float32 logits of hundreds
    differ by 1e-5 between batchings): ``[N, C]``, or ``[n, N, C]`` for ``n`` samples."""
    return torch.cat([model.logits(b, values, n) if n else model.logits(b, values) for b in loader(batch_size)], -2)


def test_log_probs_of_a_point_estimate_are_the_float64_log_softmax_where_probs_underflow():
    model = sharp_model()
    pred = predict(model, None, loader(5))
    expected = log_mean_softmax(batched_logits(model).unsqueeze(0))
    assert pred.log_probs.dtype == torch.float64 and pred.log_probs.shape == (N, C)
    assert bool((pred.probs == 0).any()) and bool((expected[pred.probs == 0] > -700).all())  # float32 lost them
    torch.testing.assert_close(pred.log_probs, expected, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(pred.log_probs.exp().float(), pred.probs, rtol=1e-5, atol=1e-30)  # float32's softmax


@pytest.mark.parametrize("chunk", [None, 1, 2, 4, 6])
def test_log_probs_of_a_deterministic_sequence_guide_are_independent_of_the_chunk_size(chunk):
    model = sharp_model()
    guide = build("ensemble", model)
    members = guide.members()
    S = 6  # draw s is member s mod 3: the mixture of the 3 members, whatever the chunks
    logits = torch.stack([batched_logits(model, {n: v[s % 3] for n, v in members.items()}) for s in range(S)])
    pred = predict(model, guide, loader(5), num_samples=S, chunk_size=chunk)
    assert bool((pred.probs == 0).any())
    # a chunk runs as one forward of chunk * B rows: float32 logits of hundreds move by 1e-5 with those rows
    torch.testing.assert_close(pred.log_probs, log_mean_softmax(logits), rtol=1e-7, atol=1e-4)


def test_log_probs_of_a_sampled_guide_are_the_log_of_the_average_over_the_same_draws():
    """Chunk ``i`` is ``guide.sample(n_i)`` under ``base + i`` (the documented draws): the reference averages
    their float64 softmax."""
    S, c = 8, 3
    model = sharp_model()
    guide = build("meanfield", model)
    torch.manual_seed(4)
    pred = predict(model, guide, loader(5), num_samples=S, chunk_size=c)
    logits = [batched_logits(model, values, n) for values, n in chunk_draws(guide, 4, S, c)]
    expected = log_mean_softmax(torch.cat(logits))
    assert bool((pred.probs == 0).any()) and bool(torch.isfinite(expected).all())
    torch.testing.assert_close(pred.log_probs, expected, rtol=1e-12, atol=1e-9)


def test_log_probs_are_minus_inf_for_missing_choices_across_batches_of_other_widths():
    from conftest import tiny_llama
    from test_cloze import ITEMS, cloze_batch

    from pyro_lora import MultipleChoice

    model = LoraModel(tiny_llama(), MultipleChoice(format="cloze"))
    data = [cloze_batch(), cloze_batch([ITEMS[1]], labels=(0,))]  # 3 choices (the second question 2), then 2
    pred = predict(model, None, data)
    assert pred.log_probs.shape == (3, 3)
    missing = pred.probs == 0
    assert missing.tolist() == [[False] * 3, [False, False, True], [False, False, True]]
    assert bool(torch.isneginf(pred.log_probs[missing]).all()) and bool(torch.isfinite(pred.log_probs[~missing]).all())
    first = model.logits(data[0]).double().log_softmax(-1)
    torch.testing.assert_close(pred.log_probs[:2], first, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("mixture", [False, True])
def test_glm_log_probs_are_the_float64_log_of_the_probit_where_its_float32_probs_underflow(mixture):
    from conftest import pairwise_probit_reference

    from pyro_lora.kfac import glm_predict

    g = torch.Generator().manual_seed(0)
    k, n, c = (2 if mixture else 1), 6, 3
    # float32 values (glm_predict reads the logits in float32) up to 500 nats apart: past float32's 103, short of
    # the 709 where the reference's exp overflows
    mean = (500 * torch.rand(k, n, c, generator=g, dtype=torch.float64)).float().double()
    mean[..., 1, 2] = -math.inf  # a missing choice
    root = 0.3 * torch.randn(k, n, c, c, generator=g, dtype=torch.float64)
    cov = root @ root.mT
    data = [{"i": torch.arange(n), "labels": torch.zeros(n, dtype=torch.long)}]
    of = (lambda b: (mean, cov)) if mixture else (lambda b: (mean[0], cov[0]))
    pred = glm_predict(data, of, lambda b: b["labels"])
    expected = torch.stack([pairwise_probit_reference(mean[j], cov[j]) for j in range(k)]).mean(0).log()
    lost = (pred.probs == 0) & torch.isfinite(expected)
    assert int(lost.sum()) >= 3 and bool((expected[lost] > -700).all())  # float32 flushed them, float64 holds them
    assert pred.log_probs.dtype == torch.float64 and torch.isneginf(pred.log_probs[1, 2])
    torch.testing.assert_close(pred.log_probs, expected, rtol=1e-10, atol=1e-8)


def test_glm_mc_log_probs_are_the_log_of_its_probs_and_hold_what_float32_flushes():
    from pyro_lora.kfac import glm_predict

    g = torch.Generator().manual_seed(1)
    n, c = 6, 3
    mean = (500 * torch.rand(n, c, generator=g)).float()
    mean[1, 2] = -math.inf
    cov = 0.01 * torch.eye(c).expand(n, c, c)
    data = [{"labels": torch.zeros(n, dtype=torch.long)}]
    torch.manual_seed(0)
    pred = glm_predict(data, lambda b: (mean, cov), lambda b: b["labels"], link="mc", num_samples=20)
    real = torch.isfinite(mean)
    assert bool(torch.isneginf(pred.log_probs[~real]).all()) and bool(torch.isfinite(pred.log_probs[real]).all())
    assert bool((pred.probs[real] == 0).any())
    kept = pred.probs > 1e-30
    torch.testing.assert_close(pred.log_probs[kept].exp().float(), pred.probs[kept], rtol=1e-5, atol=0)
    # the draws move the logits by about 0.1: the log-probabilities are near the noiseless log_softmax
    torch.testing.assert_close(pred.log_probs[real], mean.double().log_softmax(-1)[real], rtol=1e-3, atol=1.0)
