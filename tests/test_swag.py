"""SWAG guide: moments and deviations of the collected iterates, the sample covariance, the fit callback, save/load."""

import pyro.poutine as poutine
import pytest
import torch
from conftest import random_batch, tiny_bert
from pyro.infer import Trace_ELBO
from test_training import toy_data

from pyro_lora.guides import MAPGuide
from pyro_lora.distributions import LowRankPlusDiagNormal
from pyro_lora.guides.swag import SWAGCollector, SWAGGuide, swag_schedule
from pyro_lora import SequenceClassification, fit, load_guide, predict, save_guide
from pyro_lora.loraxs import LoraXSModel


def xs_model(r=2, num_labels=2):
    return LoraXSModel(tiny_bert(r=r, num_labels=num_labels, random_b=False), SequenceClassification(), num_data=48)


def iterates(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s.shape, generator=g) * (1 + i) for k, s in model.sites.items()} for i in range(n)]


def flat(values):
    """Concatenate site values ``[*S, *site.shape]`` into ``[*S, D]`` (site order of the dict)."""
    return torch.cat([v.flatten(-3) for v in values.values()], -1)


def collected(model, n, rank, scale=0.5):
    guide = SWAGGuide(model, rank=rank, scale=scale)
    thetas = iterates(model, n)
    for theta in thetas:
        guide.collect(theta)
    return guide, thetas


def test_moments_and_deviations_equal_the_direct_statistics_of_the_iterates():
    model = xs_model()
    guide, thetas = collected(model, n=5, rank=3)
    stacked = flat({k: torch.stack([t[k] for t in thetas]) for k in model.sites}).double()  # [5, D]
    moments = guide.moments()
    torch.testing.assert_close(flat({k: m for k, (m, _) in moments.items()}), stacked.mean(0))
    torch.testing.assert_close(flat({k: v for k, (_, v) in moments.items()}), stacked.var(0, unbiased=False))
    running = stacked.cumsum(0) / torch.arange(1, 6, dtype=torch.float64)[:, None]
    expected = (stacked - running)[[3, 4, 2]].float()  # ring buffer of K = 3 after 5 iterates: slots 4, 5, 3
    torch.testing.assert_close(flat(guide.deviations()), expected)
    assert int(guide.num_collected) == 5 and guide.extra_parameters() == 4 * stacked.shape[1]


def test_joint_samples_have_the_low_rank_plus_diagonal_covariance():
    model = xs_model()  # two sites of shape (2, 2, 2): D = 16
    guide, _ = collected(model, n=6, rank=4, scale=0.5)
    mean = flat(guide.mean()).double()
    var = flat({k: v for k, (_, v) in guide.moments().items()})
    dev = flat(guide.deviations()).double().T  # [D, K'], the columns of D
    expected = 0.5 * (torch.diag(var) + dev @ dev.T / 3)
    torch.manual_seed(0)
    draws = flat(guide.sample(200_000)).double()
    centred = draws - mean
    cov = centred.T @ centred / draws.shape[0]
    assert (draws.mean(0) - mean).abs().max() < 0.02 * expected.diagonal().max().sqrt()
    assert (cov - expected).abs().max() < 0.02 * expected.diagonal().max()
    # the low-rank part couples the two sites: the cross-site block is not zero
    assert expected[:8, 8:].abs().max() > 0.1 * expected.diagonal().max()


def test_posterior_marginals_match_the_joint_and_a_dense_gaussian():
    model = xs_model()
    guide, _ = collected(model, n=6, rank=4)
    dev = flat(guide.deviations()).double().T
    var = flat({k: v for k, (_, v) in guide.moments().items()})
    joint = 0.5 * (torch.diag(var) + dev @ dev.T / 3)
    posterior = guide.posterior()
    for i, (name, site) in enumerate(model.sites.items()):
        q = posterior[name]
        assert isinstance(q, LowRankPlusDiagNormal) and tuple(q.event_shape) == site.shape and q.has_rsample
        block = joint[8 * i : 8 * (i + 1), 8 * i : 8 * (i + 1)].float()
        dense = torch.distributions.MultivariateNormal(q.mean.flatten(), block)
        x = q.rsample((5,))
        torch.testing.assert_close(q.log_prob(x), dense.log_prob(x.flatten(-3)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(q.variance.flatten(), block.diagonal(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q.entropy(), dense.entropy(), rtol=1e-4, atol=1e-4)


def test_pyro_guide_path_records_every_site_and_gives_a_finite_elbo():
    model = xs_model(num_labels=3)
    guide, _ = collected(model, n=3, rank=2)
    batch = random_batch() | {"labels": torch.tensor([0, 1, 2])}
    trace = poutine.trace(guide).get_trace(batch)
    for name, site in model.sites.items():
        assert trace.nodes[name]["value"].shape == site.shape
    assert torch.isfinite(Trace_ELBO().differentiable_loss(model, guide, batch))


def test_collector_collects_the_map_iterates_of_the_last_epoch_and_predicts():
    model = xs_model()
    map_guide, swag = MAPGuide(model), SWAGGuide(model, rank=5)
    seen = []

    def record(state):
        if state.epoch == 1 and state.step % 2 == 0:
            seen.append({k: v.detach().clone() for k, v in state.guide.mean().items()})

    fit(model, map_guide, toy_data(), epochs=2, lr=3e-2, progress=False,
        callbacks=[record, SWAGCollector(swag, start_epoch=1, every=2)])
    assert int(swag.num_collected) == len(seen) == 3  # steps 8, 10, 12 of epoch 1 (6 steps per epoch)
    for name in model.sites:
        torch.testing.assert_close(swag.mean()[name], torch.stack([s[name] for s in seen]).mean(0))
    prediction = predict(model, swag, toy_data(), num_samples=4, keep_samples=True)
    assert prediction.sample_probs.shape == (4, 48, 2)
    assert not torch.allclose(prediction.sample_probs[0], prediction.sample_probs[1])
    torch.testing.assert_close(prediction.probs.sum(-1), torch.ones(48))


def test_a_diverged_fit_takes_its_iterates_back_out_of_the_swag_guide():
    """A fit that raised DivergenceError left the iterates it collected (cores ~100 at lr=100) in the SWAG guide, and a
    retry averaged them in silently; the guide is put back as the run found it, and the error says so."""
    from pyro_lora.training import DivergenceError

    model = xs_model()
    swag = SWAGGuide(model, rank=3)
    with pytest.raises(DivergenceError) as error:
        fit(model, MAPGuide(model), toy_data(), epochs=2, lr=100.0, progress=False, callbacks=[SWAGCollector(swag)])
    assert "the 1 iterate(s) collected in the diverged run were taken back out" in str(error.value.__notes__)
    assert int(swag.num_collected) == 0 and not any(bool(b.any()) for b in swag.buffers())
    # weights blown up so far that the next float16 forward overflows before the divergence watch sees them
    from pyro_lora.model import HalfPrecisionOverflowError

    model = xs_model()
    swag = SWAGGuide(model, rank=3)
    with pytest.raises(HalfPrecisionOverflowError) as error:
        fit(model, MAPGuide(model), toy_data(), epochs=2, lr=1e6, autocast=torch.float16, progress=False,
            callbacks=[SWAGCollector(swag)])
    assert "taken back out" in str(error.value.__notes__) and int(swag.num_collected) == 0

    model = xs_model()
    swag, first = SWAGGuide(model, rank=3), MAPGuide(model)
    fit(model, first, toy_data(), epochs=1, lr=3e-2, progress=False, callbacks=[SWAGCollector(swag, every=2)])
    before = {n: t.clone() for n, t in swag.state_dict().items()}
    with pytest.raises(DivergenceError) as error:
        fit(model, MAPGuide(model, init=first.mean()), toy_data(), epochs=2, lr=100.0, progress=False,
            callbacks=[SWAGCollector(swag)])
    assert "which holds the 3 it held before the run" in str(error.value.__notes__)
    assert all(torch.equal(before[n], t) for n, t in swag.state_dict().items())
    with pytest.raises(ValueError, match="changed"):  # the head the diverged run left is not the one the guide predicts with
        predict(model, swag, toy_data(), num_samples=2)


def test_two_collectors_filling_one_swag_guide_are_refused():
    """One collector listed twice (or two on one guide, or one called again through a wrapper) collected every iterate
    twice: num_collected 6 for 3, the deviations repeated in the covariance, silently."""
    model = xs_model()
    swag, map_guide = SWAGGuide(model, rank=3), MAPGuide(model)
    before = {k: v.clone() for k, v in map_guide.mean().items()}
    collector = SWAGCollector(swag, every=2)
    for callbacks in ([collector, collector], [collector, SWAGCollector(swag, every=3)]):  # before any step
        with pytest.raises(ValueError, match="fill the same SWAG guide"):
            fit(model, map_guide, toy_data(), epochs=1, lr=3e-2, progress=False, callbacks=callbacks)
    assert int(swag.num_collected) == 0 and all(torch.equal(before[k], v) for k, v in map_guide.mean().items())
    for every in (1, 2):  # through a wrapper fit cannot see into; what this fit collected is taken back out
        collector = SWAGCollector(swag, every=every)
        with pytest.raises(ValueError, match=f"already collected the iterate of step {every}.*the 1 iterate"):
            fit(model, map_guide, toy_data(), epochs=1, lr=3e-2, progress=False,
                callbacks=[collector, lambda s, c=collector: c(s)])
        assert int(swag.num_collected) == 0 and not any(bool(b.any()) for b in swag.buffers())
    seen = []  # a loop of the user's own that reuses one FitState, bumping its step: each step collected once

    class Loop:
        step, epoch, skipped, guide, epochs, steps_per_epoch = 1, 0, False, map_guide, 1, 6

    user = SWAGCollector(SWAGGuide(model, rank=3))
    for step in (1, 2, 3):
        Loop.step = step
        user(Loop)
        seen.append(int(user.swag.num_collected))
    assert seen == [1, 2, 3]
    swag = SWAGGuide(model, rank=3)
    collector, other = SWAGCollector(swag, every=2), SWAGGuide(model, rank=3)  # one collector per guide: supported
    fit(model, map_guide, toy_data(), epochs=1, lr=3e-2, progress=False,
        callbacks=[collector, SWAGCollector(other, every=3)])
    assert int(swag.num_collected) == 3 and int(other.num_collected) == 2
    fit(model, map_guide, toy_data(), epochs=1, lr=3e-2, progress=False, callbacks=[collector])  # and a second fit
    assert int(swag.num_collected) == 6


def test_guide_predicts_with_the_head_training_ended_on_when_the_last_step_collects_nothing():
    model = xs_model()
    head = "base_model.model.classifier.modules_to_save.default.weight"
    map_guide, swag = MAPGuide(model), SWAGGuide(model, rank=2)
    fit(model, map_guide, toy_data(), epochs=2, lr=3e-2, progress=False,
        callbacks=[SWAGCollector(swag, every=5)])
    assert int(swag.num_collected) == 2  # steps 5 and 10 of 12: steps 11 and 12 train the head on
    final = dict(model.named_adapter_parameters())[head].detach().clone()
    prediction = predict(model, swag, toy_data(), num_samples=2)
    assert torch.equal(dict(model.named_adapter_parameters())[head], final)
    torch.testing.assert_close(prediction.probs.sum(-1), torch.ones(48))


def test_a_swag_guide_of_a_fit_stopped_part_way_loads_as_its_checkpoint(tmp_path):
    """Interrupted at step 3 of 12, the trained guide loaded with the checkpoint warning and the SWAG guide it filled
    (2 iterates) saved and loaded as a result, without a word; after the whole run it is a result."""
    import warnings

    class Stop(Exception):
        pass

    def stop(state):
        if state.step == 3:
            raise Stop

    model = xs_model()
    swag = SWAGGuide(model, rank=2)
    with pytest.raises(Stop):
        fit(model, MAPGuide(model), toy_data(), epochs=2, lr=3e-2, progress=False, callbacks=[SWAGCollector(swag), stop])
    assert int(swag.num_collected) == 3 and swag.fit_progress["step"] == 3 and not swag.fit_progress["finished"]
    save_guide(swag, tmp_path / "stopped")
    with pytest.warns(UserWarning, match="is a checkpoint of a fit that did not finish: it stopped after step 3 of 12"):
        load_guide(tmp_path / "stopped", xs_model())
    model = xs_model()
    swag = SWAGGuide(model, rank=2)
    fit(model, MAPGuide(model), toy_data(), epochs=2, lr=3e-2, progress=False, callbacks=[SWAGCollector(swag, every=5)])
    assert swag.fit_progress == {"step": 12, "steps": 12, "epoch": 1, "epochs": 2, "finished": True}  # last collected at 10
    save_guide(swag, tmp_path / "done")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_guide(tmp_path / "done", xs_model())


def test_save_load_round_trip(tmp_path):
    model = xs_model()
    guide, _ = collected(model, n=7, rank=3, scale=0.3)
    save_guide(guide, tmp_path / "swag")
    fresh = xs_model()
    loaded = load_guide(tmp_path / "swag", fresh)
    assert type(loaded) is SWAGGuide and loaded.config() == guide.config()
    assert int(loaded.num_collected) == 7
    torch.manual_seed(3)
    a = guide.sample(4)
    torch.manual_seed(3)
    b = loaded.sample(4)
    for name in model.sites:
        torch.testing.assert_close(a[name], b[name])


def test_iterates_that_never_moved_a_non_guide_collector_and_a_float64_posterior():
    """Iterates collected from a run at lr=0 (every deviation 0) predicted the MAP's probabilities with a spread of 0,
    as a Bayesian row; SWAGCollector("x") failed at the fit's first step with an AttributeError; after guide.double()
    (as load_guide does for a guide saved so) posterior() refused its own parameters' mixed dtypes."""
    model = xs_model()
    still = SWAGGuide(model, rank=3)
    same = iterates(model, 1)[0]
    for _ in range(3):
        still.collect(same)
    for use in (still.posterior, lambda: still.sample(2)):
        with pytest.raises(ValueError, match="iterates that are all equal"):
            use()
    with pytest.raises(ValueError, match="SWAGCollector needs the SWAGGuide to fill, got str"):
        SWAGCollector("x")
    guide = collected(model, 5, 3)[0].double()
    posterior = guide.posterior()
    value = guide.sample(1)
    for name, q in posterior.items():
        assert torch.isfinite(q.log_prob(value[name][0].float()))


def test_bad_input():
    model = xs_model()
    guide = SWAGGuide(model, rank=3)
    with pytest.raises(ValueError, match="at least 2"):
        guide.sample(2)
    guide.collect(iterates(model, 1)[0])
    with pytest.raises(ValueError, match="at least 2"):
        guide.posterior()
    with pytest.raises(ValueError, match="expects shape"):
        guide.collect({k: torch.zeros(3) for k in model.sites})
    with pytest.raises(ValueError, match="rank"):
        SWAGGuide(model, rank=1)
    with pytest.raises(ValueError, match="every"):
        SWAGCollector(guide, every=0)
    for bad in (float("inf"), float("nan"), 0.0, True, "1e-12"):  # an infinite floor made every sample inf, predict nan
        with pytest.raises(ValueError, match="var_clamp must be a finite positive number"):
            SWAGGuide(model, var_clamp=bad)
    with pytest.raises(ValueError, match="scale must be a finite positive number, got True"):  # taken as 1.0
        SWAGGuide(model, scale=True)


def test_a_collector_that_would_collect_fewer_than_two_iterates_is_refused_at_the_first_step():
    """start_epoch at or past the run's epochs collected nothing: predict refused it, after the whole fit."""
    model = xs_model()
    guide = MAPGuide(model)  # one MAP throughout: a new one's R = 0 beside the head a step trained is refused
    steps = []
    for kwargs, count in (({"start_epoch": 2}, 0), ({"every": 7}, 1), ({"start_step": 12}, 1)):
        swag = SWAGGuide(model, rank=2)
        with pytest.raises(ValueError, match=rf"collects {count} iterate\(s\) in this fit of 2 epoch\(s\) x 6 steps"):
            fit(model, guide, toy_data(), epochs=2, lr=3e-2, progress=False,
                callbacks=[steps.append, SWAGCollector(swag, **kwargs)])
        assert steps[-1].step == 1 and (steps[-1].epochs, steps[-1].steps_per_epoch) == (2, 6)
    swag = SWAGGuide(model, rank=2)
    fit(model, guide, toy_data(), epochs=2, lr=3e-2, progress=False,
        callbacks=[SWAGCollector(swag, start_step=11)])  # steps 11 and 12: exactly two
    assert int(swag.num_collected) == 2


def test_a_swag_guide_of_another_model_is_refused_at_the_first_step_and_a_changing_rate_is_warned_of():
    """A SWAG guide built on another network trained up to its first collection, and then the error blamed the MAP
    guide; a decaying learning rate over the collection shrank the iterates' spread without a word."""
    import warnings

    model, other = xs_model(), xs_model()
    guide, steps = MAPGuide(model), []
    with pytest.raises(ValueError, match=r"^SWAGCollector: the SWAG guide was built on another model than the MAPGuide it collects from, which does "
                                         r"not fit it \(cannot collect SWAG iterates with this MAPGuide on this model: .*\): build "
                                         r"the SWAGGuide on the model this fit trains$"):
        fit(model, guide, toy_data(), epochs=2, lr=3e-2, progress=False,
            callbacks=[steps.append, SWAGCollector(SWAGGuide(other, rank=2), start_epoch=1)])
    assert [s.step for s in steps] == [1]
    said_of = {}
    for schedule, warmup, said in (("linear", 0, True), ("constant", 3, True), ("constant", 3, False)):
        swag = SWAGGuide(model, rank=2)
        start = 1 if said else 6  # the collection over the whole run, or after the warmup's 3 steps
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(model, guide, toy_data(), epochs=2, lr=3e-2, lr_schedule=schedule, warmup_steps=warmup, progress=False,
                callbacks=[SWAGCollector(swag, start_step=start)])
        changed = [str(w.message) for w in caught if "the learning rate changed while it collected" in str(w.message)]
        assert len(changed) == said, (schedule, warmup, changed)
        assert int(swag.num_collected) == 13 - start
        said_of[schedule, said] = changed
    assert "(0.03 at step 1, 0.0275 at step 2)" in said_of["linear", True][0]  # 12 steps: 1/12 less each
    assert "(0.01 at step 1, 0.02 at step 2)" in said_of["constant", True][0]  # the warmup's thirds


def test_the_schedule_collects_two_iterates_where_the_run_has_them_and_refuses_otherwise():
    """One batch an epoch over 3 epochs collected 1 iterate (the last half: one epoch) and failed after the fit, with
    advice for the Python API."""
    def collected(epochs, steps, per_epoch):
        start, every = swag_schedule(epochs, steps, per_epoch)
        return sum(s % every == 0 for s in range(start * steps + 1, epochs * steps + 1)), start

    assert collected(10, 100, 10) == (50, 5)  # the last half, 10 an epoch: the paper's schedule, unchanged
    assert collected(3, 1, 10) == (2, 1)  # widened to the last two epochs
    assert collected(1, 2, 10) == (2, 0)
    # one epoch collected once by per_epoch=1 (every = all its steps) refused a run of 8 steps: it collects more often
    assert [collected(1, steps, 1) for steps in (2, 7, 8)] == [(2, 0), (2, 0), (2, 0)]
    assert collected(2, 1, 1) == (2, 0)
    for epochs, steps in ((1, 1), (2, 0)):
        with pytest.raises(ValueError, match=r"SWAG needs at least 2 iterates, and the run takes . optimizer step.*raise --epochs"):
            swag_schedule(epochs, steps, 10)


def test_the_recipe_counts_the_steps_of_this_rank(monkeypatch):
    """Under torchrun each rank steps through len(loader) // W batches: the whole loader's count accepted a schedule
    that collected 1 iterate per rank, and the fit failed after training."""
    from types import SimpleNamespace

    from pyro_lora import distributed
    from pyro_lora.guides import swag

    seen = []

    def schedule(epochs, steps, per_epoch):
        seen.append(steps)
        raise KeyboardInterrupt  # stop before anything is built

    monkeypatch.setattr(swag, "swag_schedule", schedule)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    setup = SimpleNamespace(config=SimpleNamespace(epochs=3), train=[0] * 8, loader=lambda records, shuffle=False: [0] * 4)
    with pytest.raises(KeyboardInterrupt):
        swag.blora_xs(setup)
    assert seen == [2]


def test_a_collector_over_data_without_a_length_refuses_what_it_can_tell_and_warns_of_the_rest():
    """Over data without a length the schedule was not checked at all: start_epoch=2 of 2 epochs collected nothing and
    predict refused it after the whole fit; every=7 (1 iterate of 12 steps) likewise, without a word."""
    import warnings

    from test_training import unsized

    model = xs_model()
    guide = MAPGuide(model)  # one MAP throughout: a new one's R = 0 beside the head a step trained is refused
    swag = SWAGGuide(model, rank=2)
    steps = []
    with pytest.raises(ValueError, match=r"start_epoch=2, every=1\) collects 0 iterate\(s\) in this fit of 2 epoch\(s\), "
                                         "and SWAG needs at least 2"):
        fit(model, guide, unsized(toy_data()), epochs=2, lr=3e-2, progress=False,
            callbacks=[steps.append, SWAGCollector(swag, start_epoch=2)])
    assert steps[-1].step == 1
    with pytest.warns(UserWarning, match=r"every=7\): over data without a length fit cannot tell how many iterates this "
                                         r"schedule collects by the run's end, and SWAG needs at least 2"):
        fit(model, guide, unsized(toy_data()), epochs=2, lr=3e-2, progress=False,
            callbacks=[SWAGCollector(swag, every=7)])
    assert int(swag.num_collected) == 1
    with warnings.catch_warnings():  # one step an epoch or more, each collected: two epochs give two iterates
        warnings.simplefilter("error", UserWarning)
        swag = SWAGGuide(model, rank=2)
        fit(model, guide, unsized(toy_data()[:1]), epochs=2, lr=3e-2, progress=False,
            callbacks=[SWAGCollector(swag)])
    assert int(swag.num_collected) == 2


def test_a_dtype_cast_keeps_the_moments_in_float64():
    """guide.float() (or .to(torch.float32), .half()) cast the float64 first and second moments too: iterates 1 + 1e-5 z
    then had a variance of E[theta^2] - mean^2 rounded at 1e-7 of mean^2, 0 or 1e-7 where it is 1e-10, and collecting
    on went on in float32. The moments stay float64 through any cast (a device move still moves them)."""
    model = xs_model()
    guide = SWAGGuide(model, rank=3)
    g = torch.Generator().manual_seed(0)
    thetas = [{k: 1 + 1e-5 * torch.randn(s.shape, generator=g) for k, s in model.sites.items()}
              for _ in range(6)]
    for theta in thetas[:3]:
        guide.collect(theta)
    guide.float()
    guide.half().float()
    for theta in thetas[3:]:
        guide.collect(theta)
    for name, (mean, var) in guide.moments().items():
        stacked = torch.stack([t[name].double() for t in thetas])
        assert mean.dtype == var.dtype == torch.float64
        torch.testing.assert_close(var, stacked.var(0, unbiased=False).clamp(min=guide.var_clamp), rtol=1e-4, atol=0)
    moved = guide.to("meta").to_empty(device="cpu")  # the moments copied back from meta tensors, which hold no data
    assert moved.mean_0.dtype == moved.sq_mean_0.dtype == torch.float64 and moved.mean_0.device.type == "cpu"
