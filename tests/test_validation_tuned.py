"""Validation-tuned posteriors and compare's +ts rows: the knob search, the posterior temperature, the temperature
applied to a method's averaged predictive, the verdict's paired intervals, and the base fit a variant reuses."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import random_batch, tiny_bert

from pyro_lora import LoraModel, Prediction, SequenceClassification, load_guide, save_guide
from pyro_lora.calibration import apply_temperature, fit_temperature
from pyro_lora.experiments.compare import fit_method, run_compare, run_method
from pyro_lora.experiments.results import summarize_seeds
from pyro_lora.experiments.setup import CompareConfig, Setup
from pyro_lora.experiments.table import format_table
from pyro_lora.experiments.verdict import clear_difference, t_quantile_95, verdict
from pyro_lora.guides import MeanFieldGuide, ScalaBLGuide
from pyro_lora.guides.registry import METHODS, Fitted, method
from pyro_lora.guides.tuning import tune_on_validation, validation_scores
from pyro_lora.predictive import NonFinitePredictionError, predict
from pyro_lora.scalabl import ScalaBLModel

SCORED = [{}]  # the validation data of tunings whose scores are mocked: one placeholder batch, never read


def data(seeds=(1, 2, 3)):
    return [random_batch(batch=4, seed=s) | {"labels": torch.tensor([0, 2, 1, 1])} for s in seeds]


def meanfield():
    model = LoraModel(tiny_bert(), SequenceClassification(), prior=0.5, num_data=12)
    return model, MeanFieldGuide(model, b="normal", init_scale=0.5)


@pytest.mark.parametrize("kind", ["meanfield", "scalabl"])
def test_a_tempered_guide_is_refused_for_training_but_evaluated_and_predicted(kind):
    import pyro
    from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO

    from pyro_lora import fit

    if kind == "meanfield":
        model, guide = meanfield()
    else:
        model = ScalaBLModel(tiny_bert(), SequenceClassification(), prior=0.5, num_data=12)
        guide = ScalaBLGuide(model)
    guide.set_temperature(0.01)
    stds = {n: s.clone() for n, s in guide.stds().items()}
    # training would move the stds back to the untempered optimum (x10 here) while the guide reports T = 0.01
    with pytest.raises(ValueError, match="posterior temperature 0.01.*set_temperature"):
        fit(model, guide, data(), epochs=1, progress=False)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    with pytest.raises(ValueError, match="cannot train a .* at posterior temperature 0.01"):
        svi.step(data()[0])
    assert all(torch.equal(s, stds[n]) for n, s in guide.stds().items())
    assert math.isfinite(svi.evaluate_loss(data()[0]))  # the tempered q's ELBO is a number: evaluating is allowed
    with torch.no_grad():  # a validation loss through the training method, no graph to step on
        assert math.isfinite(float(Trace_ELBO().differentiable_loss(model, guide, data()[0])))
    samples = Predictive(model, guide=guide, num_samples=2, return_sites=list(model.sites))(data()[0])
    assert set(samples) == set(model.sites)
    guide.set_temperature(1.0)
    fit(model, guide, data(), epochs=1, progress=False)


def test_posterior_temperature_scales_every_std_and_is_saved(tmp_path):
    model, guide = meanfield()
    before = {n: s.clone() for n, s in guide.stds().items()}
    guide.set_temperature(4.0)
    for n, s in guide.stds().items():
        torch.testing.assert_close(s, 2.0 * before[n])  # std x sqrt(T)
    draws = guide.sample(4000)
    name = next(iter(before))
    empirical = (draws[name] - guide.mean()[name]).std(0).detach()
    assert float((empirical / (2.0 * before[name])).mean()) == pytest.approx(1.0, abs=0.03)
    save_guide(guide, tmp_path / "g")
    assert load_guide(tmp_path / "g", model).temperature == 4.0
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "2"):
        with pytest.raises(ValueError, match="temperature must be a finite positive number"):
            guide.set_temperature(bad)
    assert guide.temperature == 4.0
    scalabl = ScalaBLGuide(ScalaBLModel(tiny_bert(), SequenceClassification(), num_data=12), temperature=0.25)
    assert scalabl.config()["temperature"] == 0.25


def test_validation_scores_use_common_random_numbers():
    model, guide = meanfield()
    first, again = (validation_scores(guide, data(), num_samples=4, seed=3) for _ in range(2))
    assert first[:2] == again[:2] and torch.equal(first.predicted, again.predicted)
    assert validation_scores(guide, data(), num_samples=4, seed=4).nll != first.nll


def test_a_width_whose_predictive_overflows_is_refused_by_the_search_not_fatal():
    """predict refuses a batch of non-finite probabilities (0837de8); the search scored such a width through it, so
    one overflowing grid value (a wide ScalaBL posterior at the demo's largest temperatures) failed the whole method
    where it should refuse that value."""
    model, guide = meanfield()
    guide.set_temperature(1e60)  # stds x 1e30: the logits overflow float32
    with pytest.raises(NonFinitePredictionError, match="not finite: the network's logits overflowed"):
        predict(model, guide, data(), num_samples=4)
    scores = validation_scores(guide, data(), num_samples=4)
    assert scores.nll == math.inf and math.isnan(scores.accuracy) and scores.predicted is None
    tuning = tune_on_validation(guide, "posterior temperature", guide.set_temperature, [0.1, 1.0, 1e60], data(),
                                num_samples=4)
    assert tuning.value < 1e60 == tuning.trace[2][0] and tuning.trace[2][1] == math.inf
    assert guide.temperature == tuning.value


def test_tuning_scores_every_value_on_the_same_batches_in_the_same_order():
    """A DataLoader shuffling with its own generator ordered each pass anew: the flip guard compared other examples'
    predictions (flip rates of 0.6 at values that change no prediction, and the smallest value chosen); a generator's
    second pass found nothing."""
    model, guide = meanfield()
    rows = [{k: v[i] for k, v in b.items()} for b in data((1, 2, 3, 4)) for i in range(4)]
    shuffled = torch.utils.data.DataLoader(rows, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7))
    grid = [1e-8, 2e-8, 4e-8]  # noise far too small to change a prediction
    tuning = tune_on_validation(guide, "posterior temperature", guide.set_temperature, grid, shuffled, num_samples=4,
                                max_flip_rate=0.0)
    assert [t[3] for t in tuning.trace] == [0.0] * len(tuning.trace)
    listed = tune_on_validation(guide, "posterior temperature", guide.set_temperature, [0.1, 1.0, 10.0], data(), num_samples=4)
    once = tune_on_validation(guide, "posterior temperature", guide.set_temperature, [0.1, 1.0, 10.0], iter(data()), num_samples=4)
    assert once.trace == listed.trace


def test_tuning_finds_the_minimum_of_a_fine_grid_and_leaves_the_knob_there():
    model, guide = meanfield()
    val = data((4, 5))
    grid = [10.0 ** (k / 2) for k in range(-4, 5)]
    tuning = tune_on_validation(guide, "posterior temperature", guide.set_temperature, grid, val, num_samples=8, tol=0.05)
    trace = tuning.trace
    assert tuning.value == guide.temperature and tuning.note is None
    assert [t[0] for t in trace[: len(grid)]] == grid and len(trace) > len(grid) + 4
    floor = trace[0][2] - 0.01
    best, loss, _, _ = min((t for t in trace if t[2] >= floor), key=lambda t: t[1])
    assert guide.temperature == best
    assert validation_scores(guide, val, 8)[0] == pytest.approx(loss, rel=1e-6)  # the NLL recorded is the knob's
    fine = [10.0 ** (k / 20) for k in range(-40, 41)]
    brute = []
    for t in fine:
        guide.set_temperature(t)
        brute_loss, brute_acc, _ = validation_scores(guide, val, 8)
        brute.append(brute_loss if brute_acc >= floor else math.inf)
    assert loss <= min(brute) + 0.002  # golden section over the bracket reaches the fine grid's minimum


def test_tuning_reaches_a_known_optimum_and_warns_at_a_grid_end(monkeypatch):
    knob = {}
    monkeypatch.setattr("pyro_lora.guides.tuning.validation_scores", lambda *args, **kw: ((math.log(knob["v"]) - math.log(optimum)) ** 2, 0.8, None))
    set_value = lambda v: knob.update(v=v)  # noqa: E731
    optimum = 3.7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trace = tune_on_validation(None, "T", set_value, [0.1, 1.0, 10.0, 100.0], SCORED, num_samples=4, tol=0.01).trace
    assert knob["v"] == pytest.approx(optimum, rel=0.01) and min(trace, key=lambda t: t[1])[0] == knob["v"]
    assert all(len(t) == 4 and t[2] == 0.8 and math.isnan(t[3]) for t in trace)  # no predictions: flips unknown
    optimum = 1e5  # beyond the grid's largest value
    with pytest.warns(UserWarning, match="lowest at the largest T of the grid .100; grid 0.1 to 100.: the optimum may lie beyond"):
        tuning = tune_on_validation(None, "T", set_value, [0.1, 1.0, 10.0, 100.0], SCORED, num_samples=4)
    assert "lowest at the largest T of the grid" in tuning.note  # for the method's rows
    assert knob["v"] == pytest.approx(100.0)  # the refinement stays inside the grid
    for bad in ([1.0, 2.0], [1.0, 0.5, 2.0], [0.0, 1.0, 2.0], [1.0, 2.0, float("inf")]):
        with pytest.raises(ValueError, match="at least 3 finite positive values, increasing"):
            tune_on_validation(None, "T", set_value, bad, None, num_samples=4)
    monkeypatch.setattr("pyro_lora.guides.tuning.validation_scores", lambda *args, **kw: (math.inf, math.nan, None))
    with pytest.raises(ValueError, match="no T of the grid .0.1 to 10. gives a finite validation NLL.*left as it was"):
        tune_on_validation(None, "T", set_value, [0.1, 1.0, 10.0], SCORED, num_samples=4, start=1.5)
    assert knob["v"] == 1.5  # it was left at 10, the grid's last value
    # the demo's scalabl_val: the widest temperatures overflow the predictive; they are refused, not fatal
    monkeypatch.setattr("pyro_lora.guides.tuning.validation_scores",
                        lambda *a, **k: (math.inf, math.nan, None) if knob["v"] > 5 else (1.0 / knob["v"], 0.8, None))
    assert tune_on_validation(None, "T", set_value, [0.1, 1.0, 10.0, 100.0], SCORED, num_samples=4).value <= 10.0
    assert knob["v"] < 10.0
    for bad in (-0.1, "0.01", math.nan):  # the string raised a raw TypeError
        with pytest.raises(ValueError, match="max_accuracy_drop must be a fraction >= 0 .inf: no guard."):
            tune_on_validation(None, "T", set_value, [0.1, 1.0, 10.0], SCORED, num_samples=4, max_accuracy_drop=bad)
    for bad, match in ((dict(seed="a"), "seed must be an integer >= 0"), (dict(start="0.5"), "start must be a finite")):
        with pytest.raises(ValueError, match=match):  # a raw int() error; a string handed to set_value on a failure
            tune_on_validation(None, "T", set_value, [0.1, 1.0, 10.0], SCORED, num_samples=4, **bad)
    for bad in (1.5, "0.1", math.nan, True):  # the string raised a raw TypeError, nan and True passed
        with pytest.raises(ValueError, match="max_flip_rate must be a fraction in"):
            tune_on_validation(None, "T", set_value, [0.1, 1.0, 10.0], SCORED, num_samples=4, max_flip_rate=bad)
    # "123" was read as the grid [1, 2, 3], a set in hash order, a 2-d grid raised a raw TypeError
    for bad, match in (("123", "must be a list or tuple of numbers"), ({0.1, 1.0, 10.0}, "must be a list or tuple"),
                       ([[0.1, 1.0], [10.0, 100.0]], "must hold numbers only"), ([0.1, True, 10.0], "must hold numbers only")):
        with pytest.raises(ValueError, match=f"the T grid {match}"):
            tune_on_validation(None, "T", set_value, bad, None, num_samples=4)
    # a knob without effect (an untrained posterior): not "the optimum may lie beyond" the grid
    monkeypatch.setattr("pyro_lora.guides.tuning.validation_scores", lambda *a, **k: (0.6547, 0.61, None))
    with pytest.warns(UserWarning, match="the same at every T of the grid .0.1 to 100.: the T does not change"):
        tuning = tune_on_validation(None, "T", set_value, [0.1, 1.0, 10.0, 100.0], SCORED, num_samples=4)
    assert tuning.value == knob["v"] == 0.1 and len(tuning.trace) == 4 and "beyond" not in tuning.note
    # the same up to float noise (the largest T lowest by 4e-8): said flat too, not an optimum beyond the grid
    monkeypatch.setattr("pyro_lora.guides.tuning.validation_scores",
                        lambda *a, **k: (0.6931849 - 1e-8 * math.log10(knob["v"]), 0.5, None))
    with pytest.warns(UserWarning, match="the same at every T of the grid"):
        tuning = tune_on_validation(None, "T", set_value, [0.1, 1.0, 10.0, 100.0], SCORED, num_samples=4)
    assert tuning.value == 0.1 and "beyond" not in tuning.note
    for tol in (0.0, -0.1, float("nan"), float("inf")):  # 0 looped forever, NaN skipped the refinement
        with pytest.raises(ValueError, match=r"tol \(the search's stopping width in log space\) must be a finite positive number"):
            tune_on_validation(None, "T", set_value, [0.1, 1.0, 10.0], SCORED, num_samples=4, tol=tol)


def test_tuning_refuses_a_value_that_costs_validation_accuracy(monkeypatch):
    """The NLL falls all the way to T = 100, but accuracy falls from 0.80 beyond T = 3: the lowest NLL among the
    values within 1 point is kept (TFB's sigma_q by NLL alone cost 3 accuracy points on SST-2)."""
    knob = {}

    def scores(*args, **kw):
        t = knob["v"]
        return 1.0 / (1.0 + math.log10(t) + 2), 0.80 if t <= 3.0 else 0.75, None
    monkeypatch.setattr("pyro_lora.guides.tuning.validation_scores", scores)
    set_value = lambda v: knob.update(v=v)  # noqa: E731
    trace = tune_on_validation(None, "T", set_value, [0.01, 0.1, 1.0, 10.0, 100.0], SCORED, num_samples=4, tol=0.01).trace
    assert 2.9 <= knob["v"] <= 3.0 and min(trace, key=lambda t: t[1])[0] == 100.0  # not the lowest NLL: it costs 5 points
    tune_on_validation(None, "T", set_value, [0.01, 0.1, 1.0, 10.0, 100.0], SCORED, num_samples=4, max_accuracy_drop=0.1)
    assert knob["v"] == 100.0  # allowed 10 points: the lowest NLL
    # no validation batch was named as predict's empty data, a function the caller never called
    with pytest.raises(ValueError, match=r"^the T tuning got no batches: its validation loader is empty$"):
        tune_on_validation(None, "T", set_value, [0.01, 0.1, 1.0], iter([]), num_samples=4, start=0.5)
    assert knob["v"] == 100.0
    with pytest.warns(UserWarning, match="every T of the grid above its smallest .2. costs more than 1 validation accuracy"):
        tune_on_validation(None, "T", set_value, [2.0, 10.0, 100.0], SCORED, num_samples=4)
    assert 2.0 <= knob["v"] <= 3.0



def test_tuning_refuses_a_value_whose_flips_hide_in_the_validation_accuracy(monkeypatch):
    """Beyond T = 3 the noise flips 4 of 100 predictions, two each way: validation accuracy and the NLL say nothing,
    the flip guard refuses it (TFB's sigma_q by NLL cost test accuracy that 200 validation sentences did not show)."""
    knob, reference = {}, torch.tensor([0, 1] * 50)

    def scores(*args, **kw):
        t, predicted = knob["v"], reference.clone()
        if t > 3.0:
            predicted[:4] = 1 - predicted[:4]  # two right answers turn wrong, two wrong ones right
        return 1.0 / (1.0 + math.log10(t) + 2), 0.80, predicted
    monkeypatch.setattr("pyro_lora.guides.tuning.validation_scores", scores)
    set_value = lambda v: knob.update(v=v)  # noqa: E731
    tune_on_validation(None, "T", set_value, [0.01, 0.1, 1.0, 10.0, 100.0], SCORED, num_samples=4)
    assert knob["v"] == 100.0  # without the guard: the lowest NLL
    tuning = tune_on_validation(None, "T", set_value, [0.01, 0.1, 1.0, 10.0, 100.0], SCORED, num_samples=4, tol=0.01,
                                max_flip_rate=0.01)
    assert 2.9 <= knob["v"] <= 3.0 and knob["v"] == max(t[0] for t in tuning.trace if t[3] <= 0.01)
    assert {t[3] for t in tuning.trace} == {0.0, 0.04}  # flips against the first value's predictions
    tune_on_validation(None, "T", set_value, [0.01, 0.1, 1.0, 10.0, 100.0], SCORED, num_samples=4, max_flip_rate=0.05)
    assert knob["v"] == 100.0  # 4% allowed
    with pytest.warns(UserWarning, match="costs more than 1 validation accuracy points or flips more than 1% of the"):
        tune_on_validation(None, "T", set_value, [2.0, 10.0, 100.0], SCORED, num_samples=4, max_flip_rate=0.01)
    assert 2.0 <= knob["v"] <= 3.0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="max_flip_rate must be a fraction in"):
            tune_on_validation(None, "T", set_value, [0.1, 1.0, 10.0], SCORED, num_samples=4, max_flip_rate=bad)


def test_tfb_val_guards_flips_with_the_search_tolerance_and_keeps_them_in_its_trace(monkeypatch):
    from pyro_lora.guides.tfb import TFB_SEARCH
    from pyro_lora.guides.tuning import Tuning

    asked = {}

    def tune(guide, knob, set_value, grid, loader, num_samples, **kwargs):
        asked.update(kwargs, knob=knob)
        set_value(grid[1])
        return Tuning(grid[1], [(grid[0], 0.5, 0.8, 0.0), (grid[1], 0.4, 0.8, 0.005)], None)
    monkeypatch.setattr("pyro_lora.guides.tfb.tune_on_validation", tune)
    setup = Setup(CompareConfig(out="unused", guides=("map", "tfb_val"), progress=False), tiny_bert(), None,
                  SequenceClassification(), [{"id": 0, "label": 0}], [], [], None)  # the model's num_data: 1
    fitted = METHODS["tfb_val"].recipe(setup.for_method("tfb_val"))
    assert asked["knob"] == "sigma_q" and asked["max_flip_rate"] == TFB_SEARCH["tolerance"]
    assert fitted.guide.trace[1] == {"sigma_q": fitted.chosen["sigma_q"], "val_nll": 0.4, "val_accuracy": 0.8,
                                     "val_flip_rate": 0.005}

# --------------------------------------------------------------------------- compare's +ts rows and base fits


def _records(n, offset=0):
    return [{"id": offset + i, "label": i % 2} for i in range(n)]


def _over_confident(records):
    """Probabilities that put 0.97 on a class, right 70% of the time: what temperature scaling softens."""
    probs = torch.tensor([[0.97, 0.03] if (r["id"] % 10 < 7) == (r["label"] == 0) else [0.03, 0.97] for r in records])
    return Prediction(probs=probs, labels=torch.tensor([r["label"] for r in records]))


@pytest.fixture
def fake_methods():
    calls = []

    @method("fake_base", bayesian=True)
    def fake_base(setup):
        """A fake posterior."""
        calls.append("fit")
        return Fitted(_over_confident)

    @method("fake_variant", bayesian=True, validation=True, base="fake_base")
    def fake_variant(setup):
        """A fake variant of fake_base."""
        base = setup.base_fit()
        return Fitted(base.predict, inherited_seconds=base.inherited_seconds)

    yield calls
    METHODS.pop("fake_base")
    METHODS.pop("fake_variant")


def _setup(ts=True, guides=("fake_base", "fake_variant"), net=None):
    config = CompareConfig(out="unused", ts=ts, progress=False, guides=guides)
    return Setup(config, net, None, SequenceClassification(), _records(40), _records(50, 1000), _records(60, 2000), None,
                 shifted={"other": _records(30, 3000)})


def test_ts_rows_hold_the_temperature_fitted_on_the_methods_own_validation_predictive(fake_methods):
    setup = _setup(guides=("fake_base",))
    out = run_method(setup, "fake_base", 0.0)
    assert list(out) == ["fake_base", "fake_base+ts"]
    val = _over_confident(setup.val)
    t = fit_temperature(val.probs, val.labels)
    assert t > 1.5  # over-confident: softened
    rows, arrays, (probs, labels) = out["fake_base+ts"]
    test = _over_confident(setup.test)
    torch.testing.assert_close(probs, apply_temperature(test.probs, t))
    plain, ts = out["fake_base"][0][0], rows[0]
    assert ts["temperature"] == pytest.approx(t) and ts["setting"] == "validation-tuned" and plain["setting"] == "no validation data"
    assert ts["accuracy"] == plain["accuracy"] and ts["nll"] < plain["nll"]
    assert math.isnan(ts["mutual_information"]) and "draws no weight samples" in ts["note"]  # none kept: as the plain row
    assert ts["extra_parameters"] == plain["extra_parameters"] + 1 and rows[1]["dataset"] == "other"
    assert "ood_auroc_entropy" in rows[1]
    assert list(run_method(_setup(ts=False, guides=("fake_base",)), "fake_base", 0.0)) == ["fake_base"]


def test_a_ts_row_whose_temperature_ties_confidences_at_one_says_so_in_its_note():
    """Under-confident validation predictions (0.52 on the label 95% of the time) want T ~ 0.03; test rows of
    1 - 1e-15 (34.5 nats) then sharpen past float64's smallest number, 5e-324 (745 nats), to one-hot rows that tie: the
    row's AURC cannot order them, which its note says."""
    def under_confident(records):
        def row(r):
            p = 1 - 1e-15 if r["id"] >= 2000 and r["id"] % 3 == 0 else (0.52 if r["id"] % 20 else 0.48)
            return [p, 1 - p] if r["label"] == 0 else [1 - p, p]
        return Prediction(probs=torch.tensor([row(r) for r in records]), labels=torch.tensor([r["label"] for r in records]))

    method("fake_under", bayesian=True)(lambda setup: Fitted(under_confident))
    try:
        out = run_method(_setup(guides=("fake_under",)), "fake_under", 0.0)
    finally:
        METHODS.pop("fake_under")
    ts = out["fake_under+ts"][0]
    assert ts[0]["temperature"] < 0.05
    assert "sst2: temperature T = " in ts[0]["note"] and "sharpens 20 of 60 rows to one-hot even in float64" in ts[0]["note"]
    assert "other: temperature T = " in ts[0]["note"] and "sharpens 10 of 30" in ts[0]["note"]
    assert "sharpens" not in (out["fake_under"][0][0]["note"] or "")


def test_map_and_temperature_have_no_ts_row():
    assert not METHODS["map"].ts and not METHODS["temperature"].ts and METHODS["laplace"].ts


def test_a_variant_reuses_the_base_fit_of_its_seed_and_counts_its_time(fake_methods):
    setup = _setup(net=torch.nn.Linear(2, 2))
    fit_method(setup, "fake_base")
    variant, costs = fit_method(setup, "fake_variant")
    assert fake_methods == ["fit"]  # fitted once
    assert costs["fit_seconds"] >= setup.kept["fake_base"][1]
    alone = _setup(guides=("fake_variant",))
    fit_method(alone, "fake_variant")  # run alone: the base is fitted under its own seed
    assert fake_methods == ["fit", "fit"] and "fake_base" in alone.kept


def test_a_variants_fit_time_holds_its_base_fit_once_in_any_order(monkeypatch):
    """The base fit counts once in the variant's time whether compare kept it or the variant fitted it (run alone,
    listed first, resumed): it was counted twice when fitted inside the variant's timed recipe."""
    clock = [0.0]
    monkeypatch.setattr("time.perf_counter", lambda: clock[0])

    @method("slow_base", bayesian=True)
    def slow_base(view):
        """Takes 10 s."""
        clock[0] += 10.0
        return Fitted(_over_confident)

    @method("quick_variant", bayesian=True, validation=True, base="slow_base")
    def quick_variant(view):
        """Takes 1 s after its base."""
        base = view.base_fit()
        clock[0] += 1.0
        return Fitted(base.predict, inherited_seconds=base.inherited_seconds)

    try:
        for guides in (("slow_base", "quick_variant"), ("quick_variant",), ("quick_variant", "slow_base")):
            setup = _setup(guides=guides, net=torch.nn.Linear(2, 2))
            seconds = {name: fit_method(setup, name)[1]["fit_seconds"] for name in guides}
            assert seconds["quick_variant"] == 11.0, guides
            assert seconds.get("slow_base", 10.0) == 10.0
    finally:
        METHODS.pop("slow_base")
        METHODS.pop("quick_variant")


def test_a_chain_of_bases_counts_every_fit_once_in_any_order(monkeypatch):
    """mola_val starts from mola, which starts from the ensemble: its fit time holds all three (the ensemble's was
    left out where compare kept mola's fit, 0.84 s for mola's 3.73 s), whichever of them compare ran first."""
    clock = [0.0]
    monkeypatch.setattr("time.perf_counter", lambda: clock[0])

    def timed(name, seconds, base=None):
        def recipe(view):
            """Takes its seconds after its base."""
            inherited = view.base_fit().inherited_seconds if base else 0.0
            clock[0] += seconds
            return Fitted(_over_confident, inherited_seconds=inherited)
        method(name, bayesian=True, validation=base is not None, base=base)(recipe)

    timed("root_fit", 10.0)
    timed("mid_fit", 2.0, base="root_fit")
    timed("top_fit", 1.0, base="mid_fit")
    whole = {"root_fit": 10.0, "mid_fit": 12.0, "top_fit": 13.0}  # each row holds its own fit and its bases'
    try:
        for guides in itertools.chain(*(itertools.permutations(whole, k) for k in (1, 2, 3))):
            setup = _setup(guides=guides, net=torch.nn.Linear(2, 2))
            seconds = {name: fit_method(setup, name)[1]["fit_seconds"] for name in guides}
            assert seconds == {name: whole[name] for name in guides}, guides
    finally:
        for name in whole:
            METHODS.pop(name)


def test_a_kept_base_fit_comes_back_with_the_network_it_trained(fake_methods):
    """A base whose fit trains the adapter (ScalaBL, mean-field SVI) leaves a guide that predicts only with that
    network: compare restores the MAP between methods, and the variant must get the base's network back."""
    net = torch.nn.Linear(2, 2)
    seen = []

    @method("net_base", bayesian=True)
    def net_base(view):
        """Writes the network, as an SVI fit that trains the adapter does."""
        with torch.no_grad():
            net.weight.fill_(5.0)
        return Fitted(_over_confident)

    @method("net_variant", bayesian=True, validation=True, base="net_base")
    def net_variant(view):
        """Records the network it starts from."""
        base = view.base_fit()
        seen.append(net.weight.detach().clone())
        return base

    try:
        setup = _setup(guides=("fake_base", "net_base", "net_variant"), net=net)
        setup.trained_state = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
        fit_method(setup, "fake_base")
        assert "fake_base" not in setup.kept  # no requested method starts from it: not held through the seed
        setup.restore()
        fit_method(setup, "net_base")
        setup.restore()  # compare's next method starts from the MAP
        assert float(net.weight.abs().sum()) == 0.0
        fit_method(setup, "net_variant")
        assert bool((seen[0] == 5.0).all())  # the variant tuned the base's posterior on the base's network
        with pytest.raises(ValueError, match="registered without a base method"):
            setup.for_method("net_base").base_fit()
    finally:
        METHODS.pop("net_base")
        METHODS.pop("net_variant")
    with pytest.raises(ValueError, match="must name another method"):
        method("selfish", bayesian=True, base="selfish")


def test_validation_tuned_variants_run_after_their_base_in_one_compare(tmp_path):
    """ScalaBL trains the adapter: its variant, run after it in one compare, predicts with the network ScalaBL left
    (it raised 'point parameters changed since this guide was built' before)."""
    rows = run_compare(CompareConfig(guides=("map", "scalabl", "scalabl_val"), train_size=40, test_size=16, epochs=1,
                                     samples=3, out=str(tmp_path), progress=False, ts=False))
    assert [r["guide"] for r in rows] == ["map", "scalabl", "scalabl_val"]
    assert rows[2]["fit_seconds"] >= rows[1]["fit_seconds"]  # the base's fit, inherited


# --------------------------------------------------------------------------- the verdict


def _rows(values, dataset="sst2"):
    """Per-seed rows from ``{guide: [(accuracy, ece, nll, aurc) per seed]}``."""
    settings = {"map": "no validation data", "laplace": "no validation data"}
    return [{"guide": g, "dataset": dataset, "seed": s, "setting": settings.get(g, "validation-tuned"), "accuracy": a,
             "ece": e, "nll": n, "aurc": r} for g, seeds in values.items() for s, (a, e, n, r) in enumerate(seeds)]


# per seed (accuracy, ECE x100, NLL, AURC): MAP, temperature, and a method always 0.2 / 0.010 below temperature
MAP = [(0.81, 11.0, 0.57, 0.10), (0.80, 12.0, 0.58, 0.11), (0.82, 11.5, 0.56, 0.10)]
TEMPERATURE = [(0.81, 3.0, 0.43, 0.10), (0.80, 3.4, 0.44, 0.11), (0.82, 2.6, 0.42, 0.10)]
CLEAR_WIN = [(0.81, 2.8, 0.42, 0.09), (0.80, 3.2, 0.43, 0.10), (0.82, 2.4, 0.41, 0.09)]


def test_verdict_counts_a_win_only_where_the_paired_interval_excludes_zero():
    rows = _rows({
        "map": MAP,
        "temperature": TEMPERATURE,
        "laplace_val": CLEAR_WIN,  # a clear win on both, though its mean is close
        # lower on average, but by noise: no win
        "laplace+ts": [(0.81, 1.0, 0.40, 0.10), (0.80, 5.0, 0.47, 0.11), (0.82, 1.5, 0.38, 0.10)],
        "laplace": [(0.79, 4.0, 0.43, 0.10), (0.78, 4.4, 0.45, 0.11), (0.80, 4.1, 0.44, 0.10)],
    })
    text = verdict(rows, "sst2")
    assert "3 seeds" in text
    assert "Validation-tuned: beat temperature scaling (ECE 3.00, NLL 0.430) on both ECE and NLL: laplace_val (Bayesian alone: laplace_val; Bayesian + temperature: none); on NLL only: none." in text
    assert "No validation data: beat temperature scaling (ECE 3.00, NLL 0.430) on both ECE and NLL: none" in text
    assert "ECE x100: laplace+ts (2.50)" in text  # the best mean, whatever the noise
    assert "more than 1 point below it: laplace -2.00" in text
    one = verdict([r for r in rows if r["seed"] == 1], "sst2")
    assert "1 seed: no interval" in one and "on both ECE and NLL: laplace_val" in one
    assert verdict(rows, "boolq") == ""


def test_verdict_does_not_count_a_ts_row_as_a_bayesian_method_alone():
    """laplace+ts beating temperature scaling was listed as '(Bayesian: laplace+ts)', readable as a Bayesian method
    alone beating it; a +ts row is Bayes and temperature together."""
    text = verdict(_rows({"map": MAP, "temperature": TEMPERATURE, "laplace+ts": CLEAR_WIN, "map+ts": CLEAR_WIN}),
                   "sst2")
    assert ("on both ECE and NLL: laplace+ts, map+ts (Bayesian alone: none; Bayesian + temperature: laplace+ts)"
            in text)


def test_rows_without_a_recorded_setting_take_their_methods_and_an_unknown_one_is_named():
    """Rows recorded before the setting column (or resumed beside newer ones) were left out of the lines on
    temperature scaling without a word: a method that beat it went unnamed, or the whole comparison vanished."""
    rows = _rows({
        "map": MAP,
        "temperature": TEMPERATURE,
        "laplace_val": CLEAR_WIN,
        "laplace": [(0.81, 4.0, 0.40, 0.10), (0.80, 4.4, 0.41, 0.11), (0.82, 4.1, 0.39, 0.10)],
        "laplace_val+ts": CLEAR_WIN,
    })
    expected = verdict(rows, "sst2")
    assert "No validation data: beat temperature scaling (ECE 3.00, NLL 0.430) on both ECE and NLL: none; on NLL only: laplace." in expected
    assert "on both ECE and NLL: laplace_val, laplace_val+ts" in expected
    old = [{k: v for k, v in r.items() if k != "setting" or r["guide"] == "laplace_val"} for r in rows]
    assert verdict(old, "sst2") == expected
    assert "| laplace | no validation data |" in format_table(summarize_seeds(old))
    unknown = [{**r, "guide": "mine"} if r["guide"] == "laplace" else r for r in old]
    assert "- Not compared with temperature scaling (no setting recorded, and a method this version does not know): mine." in verdict(unknown, "sst2")


@pytest.mark.parametrize("df, quantile", [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (11, 2.201), (29, 2.045),
                                          (120, 1.980)])
def test_the_interval_uses_students_t_quantile_for_any_number_of_seeds(df, quantile):
    assert t_quantile_95(df) == pytest.approx(quantile, abs=6e-4)  # the printed tables' values


def test_twelve_seeds_with_t_between_the_normal_and_students_quantile_is_no_win():
    """|t| = 2.05 over 12 seeds: outside 1.96 (the normal quantile), inside t(11) = 2.201: the interval holds 0."""
    d = np.random.default_rng(0).normal(size=12)
    d = (d - d.mean()) / d.std(ddof=1) - 2.05 / np.sqrt(12)
    assert clear_difference(list(d)) is None and clear_difference(list(d - 0.2)) == "better"
    rows = _rows({"map": [(0.8, 10.0, 0.6, 0.1)] * 12, "temperature": [(0.8, 5.0, 0.5, 0.1)] * 12,
                  "laplace_val": [(0.8, 5.0 + 10 * x, 0.5 + 0.1 * x, 0.1) for x in d]})
    assert "on both ECE and NLL: none" in verdict(rows, "sst2").split("Validation-tuned")[1]


@pytest.mark.parametrize("seeds", [1, 3])
def test_a_difference_of_float_round_off_is_a_tie_not_a_win(seeds):
    """llla_val at the grid's upper edge is the MAP: its +ts row equals temperature scaling up to 1e-8, on every
    seed; the table shows the same values and the Best line calls them tied: no "beats"."""
    t = [(0.56, 11.083094589 + s, 0.6809502454 + s / 100, 0.39) for s in range(seeds)]
    rows = _rows({"map": [(0.56, 15.0, 0.69, 0.39)] * seeds, "temperature": t,
                  "llla_val+ts": [(a, e - 1e-6, n - 1e-8, r) for a, e, n, r in t]})
    text = verdict(rows, "sst2")
    assert "tied" in text and "on both ECE and NLL: none; on NLL only: none." in text
    assert clear_difference([-1e-8] * 3, means=(0.5 - 1e-8, 0.5), digits=3) is None and clear_difference([-1e-8] * 3) == "better"


@pytest.mark.parametrize("seeds", [1, 3])
def test_a_round_off_bias_straddling_a_rounding_boundary_is_a_tie(seeds):
    """laplace_val below temperature scaling by 2e-9 on every seed, zero spread, the means either side of a printed
    digit (0.4004999990 and 0.4005000010: 0.400 and 0.401): round-off, no win on NLL; a bias of 2e-4 (0.4004 and
    0.4006, the same printed values) is one."""
    def rows(bias):
        t = [(0.6, 2.0, 0.400500001 + bias / 2, 0.3)] * seeds
        return _rows({"map": [(0.6, 3.0, 0.6, 0.3)] * seeds, "temperature": t,
                      "laplace_val": [(a, e - 1.0, n - bias, r) for a, e, n, r in t]})

    assert "on both ECE and NLL: none; on NLL only: none." in verdict(rows(2e-9), "sst2")
    assert "(ECE 2.00, NLL 0.401) on both ECE and NLL: laplace_val" in verdict(rows(2e-4), "sst2")
    assert clear_difference([-2e-9] * 3, means=(0.4004999990, 0.4005000010), digits=3) is None
    assert clear_difference([-2e-4] * 3, means=(0.4004, 0.4006), digits=3) == "better"


def test_a_value_that_prints_as_minus_zero_ties_zero():
    """An NLL of -1.2e-7 (a hand-made or external record) printed -0.000, below temperature's 0.000: "beats"."""
    from pyro_lora.experiments.table import shown

    assert shown(-1.2e-7, 3) == "0.000" and shown(-0.0004, 3) == "0.000" and shown(-0.0006, 3) == "-0.001"
    text = verdict(_rows({"map": [(0.6, 3.0, 0.0, 0.3)], "temperature": [(0.6, 2.0, 0.0, 0.3)],
                          "laplace": [(0.6, 1.0, -1.2e-7, 0.3)]}), "sst2")
    assert "NLL: map, temperature, laplace (0.000, tied)" in text
    assert "on both ECE and NLL: none; on NLL only: none." in text
    rows = _rows({"map": [(0.8, 3.0, 0.5, 0.3)], "temperature": [(0.8, 2.0, 0.5, 0.3)], "laplace": [(0.78, 1.0, 0.5, 0.3)]})
    rows[-1]["mean_accuracy"] = 0.8
    assert "laplace -2.00 (its posterior mean +0.00: the weight noise costs it)" in verdict(rows, "sst2")


def test_printed_means_that_differ_beat_where_the_interval_excludes_zero():
    """NLL 0.500 against temperature's 0.501 on 5 seeds, every paired difference about -0.0002: the mean difference
    reads 0.000, but the means as printed differ and the interval is clear of 0: a win, as the table's bold says."""
    d = [-0.00018, -0.00022, -0.00020, -0.00019, -0.00021]
    t = [0.5006 + 0.01 * (s - 2) for s in range(5)]
    rows = _rows({"map": [(0.6, 3.0 + s, 0.6, 0.3) for s in range(5)], "temperature": [(0.6, 2.0 + s, t[s], 0.3) for s in range(5)],
                  "laplace_val": [(0.6, 1.0 + s, t[s] + d[s], 0.3) for s in range(5)]})
    text = verdict(rows, "sst2")
    assert "NLL: laplace_val (0.500)" in text and "(ECE 4.00, NLL 0.501) on both ECE and NLL: laplace_val" in text


def test_a_posterior_without_mutual_information_on_one_seed_is_ranked_on_mi_by_its_mean():
    """TFB's search at sigma_q = 0 on one seed gives MI 0 there: the verdict dropped the guide from the MI ranking
    that the shift table bolds it in."""
    rows = []
    for s in (0, 1):
        for g, mi, auroc_mi, auroc in (("map", 0.0, 0.5, 0.60), ("temperature", 0.0, 0.5, 0.61), ("meanfield", 0.02, 0.70, 0.62),
                                       ("tfb", 0.0 if s == 0 else 0.03, 0.90 + 0.01 * s, 0.63 + 0.01 * s)):
            base = {"guide": g, "seed": s, "setting": "no validation data", "accuracy": 0.6, "ece": 5.0, "nll": 1.0, "aurc": 0.3,
                    "mutual_information": mi}
            rows += [{**base, "dataset": "openbookqa"},
                     {**base, "dataset": "arc_challenge", "ood_auroc_entropy": auroc, "ood_auroc_mi": auroc_mi}]
    text = verdict(rows, "openbookqa")
    assert "OOD AUROC (MI) on arc_challenge: tfb (0.905)" in text
    assert "OOD AUROC (MI, theirs by entropy) on arc_challenge: better than both MAP and temperature scaling: meanfield, tfb." in text


@pytest.mark.parametrize("top, said", [
    (0.303, "tfb (0.303, below chance: it ranks the shifted inputs as less uncertain than the test set's more often "
            "than not, detecting no shift)"),
    (0.5, "tfb (0.500, at chance: it tells the shifted set apart no better than a coin)"),
    (0.7, "tfb (0.700)")])
def test_a_best_ood_auroc_that_does_not_beat_chance_is_said_so(top, said):
    """"Best: OOD AUROC (MI) on arc_challenge: tfb (0.303)": an AUROC below 0.5 is a score lower on the shifted inputs,
    no detection; it was called the best, and the study's shift table bolded it."""
    rows = []
    for g, mi, auroc_mi, auroc in (("map", 0.0, 0.5, 0.30), ("temperature", 0.0, 0.5, 0.29), ("meanfield", 0.02, 0.2, 0.28),
                                   ("tfb", 0.03, top, 0.27)):
        base = {"guide": g, "seed": 0, "setting": "no validation data", "accuracy": 0.6, "ece": 5.0, "nll": 1.0, "aurc": 0.3,
                "mutual_information": mi}
        rows += [{**base, "dataset": "openbookqa"},
                 {**base, "dataset": "arc_challenge", "ood_auroc_entropy": auroc, "ood_auroc_mi": auroc_mi}]
    text = verdict(rows, "openbookqa")
    assert f"OOD AUROC (MI) on arc_challenge: {said}" in text
    assert "OOD AUROC (entropy) on arc_challenge: map (0.300, below chance" in text
    # above MAP's and temperature's entropy AUROCs (0.30, 0.29), tfb's 0.303 by MI was listed as better than both
    better = "- OOD AUROC (MI, theirs by entropy) on arc_challenge: better than both MAP and temperature scaling: "
    assert better + ("tfb." if top > 0.5 else "none (above them but at or below chance, detecting nothing: tfb).") in text


def test_the_best_line_names_the_seeds_its_means_are_over_where_some_were_left_out():
    rows = _rows({"map": [(0.6, 5.0, 0.3, 0.3), (0.6, 5.0, 0.7, 0.3), (0.6, 5.0, 0.8, 0.3)],
                  "temperature": [(0.6, 5.0, 0.55, 0.3)] * 3, "laplace": [(0.6, 5.0, 0.9, 0.3)] * 2})
    assert "- Best (means over seeds 0, 1, which every method finished): " in verdict(rows, "sst2")


def test_a_run_cut_short_is_compared_on_the_seeds_every_method_finished():
    """MAP and temperature finished seeds 0 and 1, laplace only seed 0 (the run was cut short, or it failed on 1):
    the verdict compares on seed 0 alone and says so; the table marks laplace's mean as over fewer seeds."""
    rows = _rows({"map": [(0.80, 14.0, 0.66, 0.09), (0.70, 20.0, 0.90, 0.20)],
                  "temperature": [(0.80, 6.0, 0.45, 0.09), (0.70, 9.0, 0.60, 0.20)],
                  "laplace": [(0.79, 3.0, 0.44, 0.08)]})
    text = verdict(rows, "sst2")
    assert "1 seed: no interval" in text and "seed 1 left out: not every method finished it" in text
    # on seed 0 laplace is 1 point below MAP (0.80): not the 6 points a 2-seed MAP mean (0.75) would make it
    assert "none more than 1 point below it" in text and "(ECE 6.00, NLL 0.450)" in text
    table = format_table(summarize_seeds(rows))
    assert "laplace (note)" in table and "a mean over seed 0 only: seed(s) 1 missing" in table
    assert "map (note)" not in table
    assert "no seed was finished by every method" in verdict(
        _rows({"map": [(0.8, 14.0, 0.66, 0.09)]}) + [{**r, "seed": 1} for r in _rows({"laplace": [(0.79, 3.0, 0.44, 0.08)]})],
        "sst2")


def test_the_verdict_says_whether_the_noise_or_the_fit_costs_accuracy():
    rows = _rows({"map": [(0.80, 14.0, 0.66, 0.09)], "temperature": [(0.80, 6.0, 0.45, 0.09)],
                  "meanfield": [(0.77, 2.2, 0.47, 0.11)], "blora_xs": [(0.74, 2.2, 0.51, 0.13)],
                  "ivon": [(0.76, 6.9, 0.51, 0.11)]})
    for r in rows:
        r.update({"meanfield": {"mean_accuracy": 0.795}, "blora_xs": {"mean_accuracy": 0.75}}.get(r["guide"], {}))
    text = verdict(rows, "sst2")
    assert "meanfield -3.00 (its posterior mean -0.50: the weight noise costs it)" in text
    assert "blora_xs -6.00 (its posterior mean -5.00: its fit itself costs it)" in text
    assert "ivon -4.00," in text or "ivon -4.00.\n" in text + "\n"  # no mean accuracy: no reason given


def test_the_verdict_says_who_loses_accuracy_to_map_on_a_shifted_set():
    """TFB lost 16 points to MAP on a shifted set (0.708 against 0.867) and the verdict said nothing: its accuracy
    line read the training set's test set only, where TFB kept MAP's accuracy."""
    runs = {"map": [(0.80, 14.0, 0.66, 0.09)] * 2, "temperature": [(0.80, 6.0, 0.45, 0.09)] * 2,
            "tfb": [(0.80, 3.0, 0.40, 0.09)] * 2, "laplace": [(0.795, 3.0, 0.40, 0.09)] * 2}
    shift = {"map": [0.867, 0.867], "temperature": [0.867, 0.867], "tfb": [0.70, 0.716], "laplace": [0.86, 0.856]}
    shifted = [{**r, "dataset": "sst2_shift", "accuracy": shift[r["guide"]][r["seed"]]} for r in _rows(runs)]
    for r in shifted:
        r.update({"tfb": {"mean_accuracy": 0.862}}.get(r["guide"], {}))
    text = verdict(_rows(runs) + shifted, "sst2")
    # tfb: 0.867 - 0.708 = 15.90 points; laplace: 0.867 - 0.858 = 0.90 points, within 1
    assert "- Accuracy against MAP (0.800): none more than 1 point below it." in text
    assert ("- Accuracy against MAP on sst2_shift (0.867): more than 1 point below it: tfb -15.90 (its posterior mean "
            "-0.50: the weight noise costs it).") in text
    shifted[0]["accuracy"] = None  # MAP's accuracy n/a on the shift's seed 0: said, not dropped
    text = verdict(_rows(runs) + shifted, "sst2")
    assert "- Accuracy against MAP on sst2_shift: not compared: MAP's accuracy on sst2_shift is n/a on seed 0." in text
    assert "of the accuracy on sst2_shift comparison: map (n/a on seed 0)" in text
    text = verdict(_rows(runs) + [r for r in shifted if r["guide"] != "map"], "sst2")
    assert "- Accuracy against MAP on sst2_shift: not compared: MAP's accuracy on sst2_shift is n/a on every seed." in text


def test_the_verdict_names_a_method_whose_scoring_of_a_shifted_set_failed():
    """A method whose scoring of one shifted set failed keeps its other rows; the verdict compared the others on that
    set and said nothing of it (results.json and the error named it, the paragraph under the table did not)."""
    runs = {"map": [(0.80, 14.0, 0.66, 0.09)] * 2, "temperature": [(0.80, 6.0, 0.45, 0.09)] * 2,
            "laplace": [(0.80, 3.0, 0.40, 0.09)] * 2}
    shifted = [{**r, "dataset": "shift_a", "ood_auroc_entropy": 0.7, "ood_auroc_mi": 0.6} for r in _rows(runs)
               if not (r["guide"] == "laplace" and r["seed"] == 1)]  # laplace failed on shift_a under seed 1
    text = verdict(_rows(runs) + shifted, "sst2")
    assert ("- Left out of the accuracy on shift_a comparison: laplace (n/a on seed 1); of the OOD AUROC (entropy) on "
            "shift_a comparison: laplace (n/a on seed 1); of the OOD AUROC (MI) on shift_a comparison: laplace (n/a on "
            "seed 1).") in text
    assert "OOD AUROC (entropy) on shift_a: map, temperature (0.700, tied)" in text  # compared without it


def test_the_verdict_says_nothing_was_compared_on_a_shifted_set_without_any_row(monkeypatch):
    """The verdict learnt the shifted sets from the rows only: one on which every method's scoring failed (no row at
    all) vanished from it without a word. Given the run's shifted sets, it says nothing was compared there; the CLI
    passes them from results.json's config."""
    from pyro_lora.experiments import cli

    runs = {"map": [(0.80, 14.0, 0.66, 0.09)] * 2, "temperature": [(0.80, 6.0, 0.45, 0.09)] * 2,
            "laplace": [(0.80, 3.0, 0.40, 0.09)] * 2}
    shift_a = [{**r, "dataset": "shift_a", "ood_auroc_entropy": 0.7, "ood_auroc_mi": 0.6} for r in _rows(runs)]
    text = verdict(_rows(runs) + shift_a, "sst2", shifted=("shift_a", "shift_b"))
    assert ("- Nothing compared on shift_b: no method has a row there (every method's scoring of it failed, or was not "
            "run).") in text
    assert "OOD AUROC (entropy) on shift_a: map, temperature, laplace (0.700, tied)" in text  # shift_a compared as before
    assert text.count("shift_b") == 1  # no comparison lines of a set without rows
    assert verdict(_rows(runs) + shift_a, "sst2", shifted=("shift_a",)) == verdict(_rows(runs) + shift_a, "sst2")
    text = verdict(_rows(runs), "sst2", shifted=("shift_b", "shift_a"))
    assert "- Nothing compared on shift_a, shift_b: no method has a row there (every method's scoring of them" in text
    cut = [r for r in _rows(runs) if not (r["guide"] == "laplace" and r["seed"] == 1)]  # seed 1 left out
    text = verdict(cut + [r for r in shift_a if r["seed"] == 1], "sst2", shifted=("shift_a",))
    assert "- Nothing compared on shift_a: no method has a row there on seed 0 (every method's scoring" in text
    monkeypatch.setattr(cli, "read_record", lambda out, hint: {
        "per_seed": _rows(runs), "config": {"dataset": "sst2", "eval_datasets": ["shift_b"]}})
    assert "- Nothing compared on shift_b:" in cli._verdict("out")


def test_the_verdict_names_ties_and_leaves_out_a_method_with_a_missing_value():
    rows = _rows({"map": [(0.80, 14.0, 0.66, 0.09), (0.81, 13.0, 0.65, 0.08)],
                  "temperature": [(0.80, 6.0, 0.45, 0.09), (0.81, 5.0, 0.44, 0.08)],
                  "laplace": [(0.80, 3.0, 0.40, 0.07), (0.81, 2.0, 0.39, 0.06)]})
    text = verdict(rows, "sst2")
    assert "AURC: laplace (0.065)" in text
    tie = verdict(rows + [{**r, "guide": "laplace+ts"} for r in rows if r["guide"] == "laplace"], "sst2")
    assert "AURC: laplace, laplace+ts (0.065, tied)" in tie  # a temperature keeps the ranking: the same AURC
    rows[4]["nll"] = float("nan")  # laplace's NLL n/a on seed 0: the table's mean is n/a
    text = verdict(rows, "sst2")
    # not compared on seed 1 alone, and said: "beat ...: none" and temperature's best NLL read as laplace losing
    assert "NLL: temperature (0.445)" in text and "on both ECE and NLL: none" in text
    assert "- Left out of the NLL comparison: laplace (n/a on seed 0)." in text
    assert "on NLL only: none; not compared (NLL n/a on some seed): laplace." in text
    assert "ECE x100: laplace (2.50)" in text
    rows[4]["nll"], rows[2]["ece"] = 0.40, None  # temperature scaling's ECE n/a on seed 0: raised KeyError
    text = verdict(rows, "sst2")
    assert "beat temperature scaling (NLL 0.445) on NLL: laplace; ECE not compared: temperature scaling's ECE is n/a" in text
    assert "- Left out of the ECE comparison: temperature (n/a on seed 0)." in text
    rows[2]["ece"], rows[5]["ece"] = 5.0, None  # laplace's ECE n/a on seed 1: it did not lose on ECE ("NLL only")
    text = verdict(rows, "sst2")
    assert "- Left out of the ECE comparison: laplace (n/a on seed 1)." in text
    assert "on NLL only: none; on NLL, its ECE not compared (n/a on some seed): laplace." in text


def test_the_verdict_names_who_beats_map_and_temperature_on_aurc():
    """A temperature hardly moves AURC: the verdict says which methods beat both baselines there (paired interval)."""
    runs = {"map": [(0.80, 14.0, 0.66, 0.090), (0.81, 13.0, 0.65, 0.080), (0.79, 12.0, 0.64, 0.085)],
            "temperature": [(0.80, 6.0, 0.45, 0.090), (0.81, 5.0, 0.44, 0.080), (0.79, 5.5, 0.43, 0.085)],
            "laplace": [(0.80, 3.0, 0.40, 0.088), (0.81, 2.0, 0.39, 0.078), (0.79, 2.5, 0.38, 0.0835)],
            "tfb": [(0.80, 3.0, 0.40, 0.080), (0.81, 2.0, 0.39, 0.085), (0.79, 2.5, 0.38, 0.090)]}
    assert "- AURC: better than both MAP and temperature scaling: laplace." in verdict(_rows(runs), "sst2")


def test_the_verdict_sets_a_methods_mi_against_the_baselines_entropy_on_a_shift():
    """MAP's and temperature scaling's MI is 0 by construction (an AUROC of 0.5): a method's OOD AUROC by MI is set
    against their AUROC by entropy, their best score, not against their 0.5."""
    runs = {"map": [(0.80, 14.0, 0.66, 0.09)] * 3, "temperature": [(0.80, 6.0, 0.45, 0.09)] * 3,
            "laplace": [(0.80, 3.0, 0.40, 0.09)] * 3, "tfb": [(0.80, 3.0, 0.40, 0.09)] * 3,
            "laplace+ts": [(0.80, 3.0, 0.40, 0.09)] * 3}
    ood = {"map": ([0.72, 0.73, 0.71], [0.5] * 3), "temperature": ([0.72, 0.73, 0.71], [0.5] * 3),
           "laplace": ([0.72, 0.73, 0.71], [0.75, 0.76, 0.745]),  # MI above their entropy on every seed
           "tfb": ([0.72, 0.73, 0.71], [0.60, 0.65, 0.62]),  # MI above their MI (0.5), below their entropy
           "laplace+ts": ([0.72, 0.73, 0.71], [None] * 3)}  # a +ts row keeps no samples: MI n/a
    shifted = [{**r, "dataset": "arc_easy", "ood_auroc_entropy": ood[r["guide"]][0][r["seed"]],
                "ood_auroc_mi": ood[r["guide"]][1][r["seed"]]} for r in _rows(runs)]
    # a point estimate (zero-shot) has MI 0 and an MI AUROC of 0.5 by construction: never the best by MI
    point = [{**r, "guide": "zeroshot", "mutual_information": 0.0, "ood_auroc_mi": 0.5} for r in shifted if r["guide"] == "map"]
    text = verdict(_rows(runs) + shifted + point, "sst2")
    assert "OOD AUROC (MI) on arc_easy: laplace (0.752)" in text
    for r in shifted:
        r["ood_auroc_mi"] = {"laplace": 0.3, "tfb": 0.35}.get(r["guide"], r["ood_auroc_mi"])
    assert "OOD AUROC (MI) on arc_easy: tfb (0.350, below chance" in verdict(_rows(runs) + shifted + point, "sst2")
    for r in shifted:
        r["ood_auroc_mi"] = ood[r["guide"]][1][r["seed"]]
    text = verdict(_rows(runs) + shifted, "sst2")
    assert "- OOD AUROC (entropy) on arc_easy: better than both MAP and temperature scaling: none." in text
    assert "- OOD AUROC (MI, theirs by entropy) on arc_easy: better than both MAP and temperature scaling: laplace." in text
    assert "Left out of the OOD" not in text  # laplace+ts's MI is n/a by design: not named
    # an MI n/a on one seed (an overflowing covariance) leaves the method out of the MI comparison, said by name
    shifted[10]["ood_auroc_mi"] = float("nan")  # tfb, seed 1
    shifted[9]["ood_auroc_mi"] = 0.9  # tfb, seed 0: its MI mean over the other seeds would have been the best
    text = verdict(_rows(runs) + shifted, "sst2")
    assert "Left out of the OOD AUROC (MI) on arc_easy comparison: tfb (n/a on seed 1)" in text
    assert "OOD AUROC (MI) on arc_easy: laplace (0.752)" in text
    # MAP's entropy AUROC n/a on one seed, temperature scaling's rows absent on the shift: said, not silently dropped
    shifted[2]["ood_auroc_entropy"] = None  # map, seed 2
    text = verdict(_rows(runs) + [r for r in shifted if r["guide"] != "temperature"], "sst2")
    assert ("- OOD AUROC (entropy) on arc_easy: not compared against MAP and temperature scaling: MAP's OOD AUROC (entropy) "
            "on arc_easy is n/a on seed 2; temperature scaling's OOD AUROC (entropy) on arc_easy is n/a on every seed") in text
    assert "- OOD AUROC (MI, theirs by entropy) on arc_easy: not compared against MAP and temperature scaling" in text


def test_the_verdict_says_when_temperature_scaling_or_map_has_no_finished_seed():
    """Temperature scaling or MAP failed on every seed (no rows): the sentences comparing against it vanished."""
    runs = {"map": [(0.80, 14.0, 0.66, 0.09), (0.81, 13.0, 0.65, 0.08)],
            "temperature": [(0.80, 6.0, 0.45, 0.09), (0.81, 5.0, 0.44, 0.08)],
            "laplace": [(0.80, 3.0, 0.40, 0.07), (0.81, 2.0, 0.39, 0.06)]}
    text = verdict(_rows({g: v for g, v in runs.items() if g != "temperature"}), "sst2")
    assert "- Against temperature scaling: not compared: temperature scaling has no finished seed" in text
    assert "Accuracy against MAP (0.805): none more than 1 point below it." in text
    text = verdict(_rows({g: v for g, v in runs.items() if g != "map"}), "sst2")
    assert "- Accuracy against MAP: not compared: MAP has no finished seed" in text
    assert "on both ECE and NLL: laplace" in text
    rows = _rows(runs)
    rows[2]["nll"], rows[1]["accuracy"] = None, float("nan")  # n/a, not missing: said so
    text = verdict(rows, "sst2")
    assert "- Against temperature scaling: not compared: temperature scaling's NLL is n/a on seed 0." in text
    assert "- Accuracy against MAP: not compared: MAP's accuracy is n/a on seed 1." in text
    assert "Left out of the NLL comparison: temperature (n/a on seed 0); of the accuracy comparison: map (n/a on seed 1)." in text


def test_one_seed_reads_the_values_as_the_table_shows_them():
    """Laplace's NLL 0.70334 shows as 0.703 beside temperature scaling's 0.70368 (0.704): the Best line named laplace
    and the next said nothing beat temperature scaling on NLL (a 0.00034 difference was called a tie). A method far
    above MAP's accuracy is not 'within 1 point' of it."""
    rows = _rows({"map": [(0.44, 14.0, 0.80, 0.09)], "temperature": [(0.44, 6.0, 0.70368, 0.09)],
                  "laplace": [(0.5625, 3.0, 0.70334, 0.07)]})
    text = verdict(rows, "sst2")
    assert "NLL: laplace (0.703)" in text
    assert "No validation data: beat temperature scaling (ECE 6.00, NLL 0.704) on both ECE and NLL: laplace" in text
    assert "Accuracy against MAP (0.440): none more than 1 point below it." in text


def test_a_row_without_a_metric_key_is_named_as_left_out_not_dropped():
    """An old or hand-made record whose rows lack the AURC key altogether (not None): laplace was left out of the AURC
    comparison without a word, and its 'Best' line read as if laplace had been compared."""
    rows = _rows({"map": [(0.80, 14.0, 0.66, 0.09), (0.81, 13.0, 0.65, 0.08)],
                  "temperature": [(0.80, 6.0, 0.45, 0.09), (0.81, 5.0, 0.44, 0.08)],
                  "laplace": [(0.80, 3.0, 0.40, 0.07), (0.81, 2.0, 0.39, 0.06)]})
    for r in rows:
        if r["guide"] == "laplace":
            del r["aurc"]
    text = verdict(rows, "sst2")
    assert "- Left out of the AURC comparison: laplace (n/a on every seed)." in text
    assert "AURC: map, temperature (0.085, tied)" in text
    assert "Left out" not in verdict([{k: v for k, v in r.items() if k != "aurc"} for r in rows], "sst2")


def test_a_tuned_variant_carries_the_tunings_edge_into_its_note(monkeypatch):
    """The grid-edge and accuracy warnings of tfb_val, meanfield_val, scalabl_val and flow_val reached stderr only:
    the rows and results.json lost them."""
    from pyro_lora.guides.tuning import Tuning

    model, guide = meanfield()
    setup = Setup(CompareConfig(out="unused", guides=("meanfield", "meanfield_val"), progress=False), model.net, None,
                  SequenceClassification(), [], [], [], None)
    own = guide.extra_parameters()
    setup.kept["meanfield"] = (Fitted(guide=guide, extra_parameters=own, note="prior std 0.1"), 1.0, None)
    monkeypatch.setattr("pyro_lora.guides.tuning.tune_on_validation",
                        lambda *args, **kwargs: Tuning(1e4, [], "lowest at the largest"))
    fitted = METHODS["meanfield_val"].recipe(setup.for_method("meanfield_val"))
    assert fitted.note == "prior std 0.1; lowest at the largest"
    # the chosen knob goes into the rows (results.json), the base's record untouched; the posterior temperature is
    # one parameter more than the base method's (+params counted it as none, a +ts row's temperature as one)
    assert fitted.chosen == {"posterior_temperature": 1e4} and setup.kept["meanfield"][0].chosen == {}
    assert fitted.extra_parameters == own + 1 and setup.kept["meanfield"][0].extra_parameters == own
    _, costs = fit_method(setup, "meanfield_val", 0.0)
    assert costs["posterior_temperature"] == 1e4


def test_the_ts_row_of_a_predictive_without_weight_samples_says_so():
    def closed_form(guide, loader, num_samples):
        """A GLM-like predictive."""

    closed_form.uses_samples = False
    method("fake_glm", bayesian=True, predictive=closed_form)(lambda view: Fitted(_over_confident))
    try:
        out = run_method(_setup(guides=("fake_glm",)), "fake_glm", 0.0)
        note = out["fake_glm+ts"][0][0]["note"]
        assert "draws no weight samples" in note and "temperature applies" not in note
    finally:
        METHODS.pop("fake_glm")


def test_two_variants_of_one_base_each_get_the_base_as_it_left_it():
    """The second variant of a base was handed the guide the first had tuned in place (its rows scored with the
    first's knob)."""
    model, guide = meanfield()
    setup = Setup(CompareConfig(out="unused", guides=("meanfield", "meanfield_val"), progress=False), model.net, None,
                  SequenceClassification(), [], [], [], None)
    setup.kept["meanfield"] = (Fitted(guide=guide), 1.0, None)
    first = setup.for_method("meanfield_val").base_fit()
    first.guide.set_temperature(100.0)
    second = setup.for_method("meanfield_val").base_fit()
    assert second.guide.temperature == 1.0 and guide.temperature == 1.0 and first.guide is not guide
    assert second.guide.model is model and second.guide.model.net is model.net  # the network is shared, not copied
    torch.testing.assert_close(second.guide.stds()[next(iter(guide.stds()))], guide.stds()[next(iter(guide.stds()))])


def test_the_accuracy_note_only_where_every_larger_value_costs_accuracy(monkeypatch):
    """Accuracy drops at the second grid value only: the note must not say every larger value costs it."""
    knob = {}
    monkeypatch.setattr("pyro_lora.guides.tuning.validation_scores",
                        lambda *a, **k: (1.0 + abs(math.log10(knob["v"]) + 2), 0.7 if knob["v"] == 0.1 else 0.8, None))
    with pytest.warns(UserWarning, match="lowest at the smallest T of the grid"):
        tuning = tune_on_validation(None, "T", knob.update and (lambda v: knob.update(v=v)), [0.01, 0.1, 1.0, 10.0], SCORED,
                                    num_samples=4)
    assert "costs more than" not in tuning.note


def test_seeds_whose_rows_differ_in_columns_summarize_to_not_available():
    """A run resumed from an older version: seed 0's row lacks mean_accuracy (it raised KeyError, or dropped it)."""
    old = {"guide": "tfb", "dataset": "sst2", "seed": 0, "accuracy": 0.8}
    new = {**old, "seed": 1, "mean_accuracy": 0.81}
    for rows in ([old, new], [new, old]):
        row = summarize_seeds(rows)[0]
        assert row["accuracy"] == pytest.approx(0.8) and math.isnan(row["mean_accuracy"])


def test_a_variant_draws_the_same_random_numbers_alone_as_after_its_kept_base():
    """Run alone, a variant fitted its base and went on with the RNG as the base's training left it: mola's Monte-Carlo
    Fisher labels (and so its lambda, and mola_val's) differed from a run with the ensemble."""
    draws = []

    @method("fake_rng_base", bayesian=True)
    def fake_rng_base(setup):
        """A base whose fit draws random numbers (a training)."""
        torch.rand(5)
        return Fitted(_over_confident)

    @method("fake_rng_variant", bayesian=True, validation=True, base="fake_rng_base")
    def fake_rng_variant(setup):
        """A variant that draws after taking its base's fit."""
        setup.base_fit()
        draws.append(float(torch.rand(())))
        return Fitted(_over_confident)

    try:
        together = _setup(guides=("fake_rng_base", "fake_rng_variant"), net=torch.nn.Linear(2, 2))
        fit_method(together, "fake_rng_base")
        fit_method(together, "fake_rng_variant")
        fit_method(_setup(guides=("fake_rng_variant",)), "fake_rng_variant")
        assert draws[0] == draws[1]
    finally:
        METHODS.pop("fake_rng_base")
        METHODS.pop("fake_rng_variant")


def test_an_optimum_inside_the_grid_is_no_edge_and_a_non_finite_first_value_keeps_the_accuracy_guard(monkeypatch):
    """The edge note came from the coarse grid before the refinement (0.0129 chosen, "lowest at the smallest ... 0.01");
    a first grid value with a non-finite predictive made the reference accuracy NaN, which refused nothing (T = 49.5 at
    accuracy 0.50 chosen where values <= 5 keep 0.90)."""
    knob = {}
    set_value = lambda v: knob.update(v=v)  # noqa: E731
    for optimum in (0.013, 9000.0):
        monkeypatch.setattr("pyro_lora.guides.tuning.validation_scores",
                            lambda *a, **k: ((math.log(knob["v"]) - math.log(optimum)) ** 2, 0.9, None))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tuning = tune_on_validation(None, "T", set_value, [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0], SCORED,
                                        num_samples=4)
        assert tuning.note is None and tuning.value == pytest.approx(optimum, rel=0.1)

    def scores(*args, **kw):
        v = knob["v"]
        if v < 0.02:
            return math.inf, math.nan, None  # the least noisy value overflows
        return (math.log(v) - math.log(50.0)) ** 2, 0.9 if v <= 5.0 else 0.5, None

    monkeypatch.setattr("pyro_lora.guides.tuning.validation_scores", scores)
    tuning = tune_on_validation(None, "T", set_value, [0.01, 0.1, 1.0, 10.0, 100.0], SCORED, num_samples=4, tol=0.01)
    assert 4.9 <= tuning.value <= 5.0  # the lowest NLL among the values keeping the first finite value's accuracy


def test_the_verdict_reads_numpy_scalars_as_numbers():
    """np.float32 values were "n/a on every seed": the verdict named temperature scaling best on NLL (0.430) where the
    table showed laplace at 0.400."""
    def row(guide, seed, ece, nll, setting):
        return {"guide": guide, "dataset": "sst2", "seed": seed, "setting": setting, "accuracy": 0.8, "ece": ece,
                "nll": nll, "aurc": 0.1}

    rows = [row("map", s, 10.0, 0.6, "no validation data") for s in (0, 1)] + \
        [row("temperature", s, 3.0, 0.43, "validation-tuned") for s in (0, 1)] + \
        [row("laplace", s, np.float32(2.0 + s / 10), np.float32(0.40), "no validation data") for s in (0, 1)]
    text = verdict(rows, "sst2")
    assert "NLL: laplace (0.400)" in text and "Left out" not in text


def test_a_tuning_that_fails_part_way_leaves_the_guides_knob_as_it_was():
    """A validation batch whose label the head has no class for failed the first predict: the mean-field guide's
    temperature stayed at the grid's first value, 0.01, instead of its 1.0."""
    _, guide = meanfield()
    bad = data()
    bad[-1] = bad[-1] | {"labels": torch.tensor([0, 1, 5, 1])}
    with pytest.raises(ValueError, match="label"):
        tune_on_validation(guide, "posterior temperature", guide.set_temperature, [0.01, 1.0, 10.0], bad, num_samples=2,
                           start=guide.temperature)
    assert guide.temperature == 1.0


def test_tuning_refuses_a_loader_that_drops_its_last_batch():
    """The validation loader was read into a list before predict could see it drop its last incomplete batch: the
    temperature was tuned on 8 of the 10 validation examples without a word (predict refuses that loader)."""
    model, guide = meanfield()
    rows = [{k: v[i] for k, v in b.items()} for b in data((1, 2, 3)) for i in range(4)][:10]
    for loader in (torch.utils.data.DataLoader(rows, batch_size=4, drop_last=True),
                   torch.utils.data.DataLoader(rows, batch_sampler=torch.utils.data.BatchSampler(range(10), 4, True))):
        with pytest.raises(ValueError, match=r"the posterior temperature tuning reads every example of its data, but this "
                                             r"DataLoader drops its last incomplete batch \(drop_last=True"):
            tune_on_validation(guide, "posterior temperature", guide.set_temperature, [0.1, 1.0, 10.0], loader,
                               num_samples=4, start=1.0)
        assert guide.temperature == 1.0


def test_tuning_keeps_a_margin_from_a_value_whose_predictive_overflows(monkeypatch):
    """scalabl_val chose T = 365, finite on the search's one set of draws but next to T = 415, which overflowed: its
    own predictive overflowed on validation and test (22 of 60 other draws at T = 365), and compare failed the method.
    Here the NLL falls with T up to an overflow from T = 400 (from T = 200 on the second set of draws, seed + 1)."""
    from pyro_lora.guides.tuning import TEMPERATURE_GRID

    knob, edges = {}, {0: 400.0, 1: 400.0}

    def scores(guide, loader, num_samples, seed=0):
        t = knob["v"]
        return (math.inf, math.nan, None) if t >= edges[seed] else (1.0 / t, 0.8, None)
    monkeypatch.setattr("pyro_lora.guides.tuning.validation_scores", scores)
    set_value = lambda v: knob.update(v=v)  # noqa: E731
    with pytest.warns(UserWarning, match=r"overflowed \(not finite\) at T 1000: a T within a factor 4 of one that "
                                         r"overflows is refused"):
        tuning = tune_on_validation(None, "T", set_value, TEMPERATURE_GRID, SCORED, num_samples=4)
    # by hand: the grid overflows from T = 1000, so T >= 1000 / 4 = 250 is refused; the NLL 1/T is lowest at the largest
    # value scored below 250 (the golden section's, between the grid's 31.6 and 316)
    below = [v for v, *_ in tuning.trace if v < 250]
    assert tuning.value == knob["v"] == max(below) and 240 < tuning.value < 250  # not ~399 next to the overflow
    edges[1] = 200.0  # the second set of draws overflows at that choice: it counts as overflowing, 4x below refused
    tuning = tune_on_validation(None, "T", set_value, TEMPERATURE_GRID, SCORED, num_samples=4)
    limit = max(below) / 4  # 62.3: the golden section's values are all above it, so the grid's 31.6
    assert tuning.value == knob["v"] == max(v for v, *_ in tuning.trace if v < limit) == TEMPERATURE_GRID[7]
    assert f"and at T {max(below):g} on a second set of draws" in tuning.note
    edges[0] = edges[1] = 0.02  # only the smallest finite, within 4x of 0.0316's overflow
    with pytest.raises(ValueError, match="no T of the grid .* clear of the overflow margin .a T within a factor 4"):
        tune_on_validation(None, "T", set_value, TEMPERATURE_GRID, SCORED, num_samples=4)
    edges[0], edges[1] = 1e9, 1e9  # nothing overflows: no margin, no second draws, the grid's end as before
    tuning = tune_on_validation(None, "T", set_value, TEMPERATURE_GRID, SCORED, num_samples=4)
    assert tuning.value == TEMPERATURE_GRID[-1] and "overflow" not in tuning.note


def test_a_value_refused_for_the_overflow_margin_is_not_said_to_cost_accuracy(monkeypatch):
    """Every value above the smallest refused, one for its accuracy and one overflowing: the note said every one "costs
    more than 1 validation accuracy points", though T = 100's predictive overflowed."""
    knob = {}

    def scores(guide, loader, num_samples, seed=0):
        t = knob["v"]
        return (math.inf, math.nan, None) if t >= 100 else (1.0 / t, 0.9 if t <= 1.01 else 0.5, None)
    monkeypatch.setattr("pyro_lora.guides.tuning.validation_scores", scores)
    with pytest.warns(UserWarning) as caught:
        tuning = tune_on_validation(None, "T", lambda v: knob.update(v=v), [1.0, 2.0, 100.0], SCORED, num_samples=4)
    assert tuning.value == 1.0 and len(caught) == 1
    assert tuning.note.startswith("T 2 of the grid each costs more than 1 validation accuracy points, and every other "
                                  "above its smallest (1) overflowed or is within the overflow margin of one that did")
    assert "every T of the grid above its smallest (1) costs" not in tuning.note
