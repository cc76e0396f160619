"""Baselines: temperature scaling, MC dropout on the LoRA input, deep ensembles (with per-member heads)."""

import copy
import gc
import math
import re
import warnings
from types import SimpleNamespace

import pyro.poutine as poutine
import numpy as np
import pytest
import torch
from conftest import random_batch, tiny_bert, tiny_bert_base
from peft import LoraConfig, get_peft_model
from test_training import toy_data

from pyro_lora.guides.ensemble import EnsembleGuide, head_parameters, predict_ensemble, reinitialize, train_ensemble
from pyro_lora.guides.map import MAPGuide
from pyro_lora.guides.mcdropout import ColumnDropout, MCDropoutGuide
from pyro_lora.guides.meanfield import MeanFieldGuide
from pyro_lora import LoraModel, SequenceClassification, fit, load_guide, predict, save_guide
from pyro_lora.calibration import _exact_nll, apply_temperature, fit_temperature, golden_section, scale_prediction, temperature_nll
from pyro_lora.metrics import ece, nll
from pyro_lora.predictive import SEED_RANGE


def make(num_labels=2, random="AB", seed=0):
    return LoraModel(tiny_bert(num_labels=num_labels, seed=seed), SequenceClassification(), random=random, num_data=48)


# --- temperature scaling -------------------------------------------------------------------------

UPPER_BOUND_NOTE = ("the validation NLL is lowest at the upper search bound T = 100: the predictions are no better than "
                    "uniform on the validation split, and T = 100 makes them nearly uniform")


def classification(n=400, c=4, sharpness=1.0, seed=0):
    """Logits and labels drawn from softmax(logits); ``sharpness`` then mis-scales the logits."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, c, generator=g, dtype=torch.float64)
    labels = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(-1)
    return sharpness * logits, labels


@pytest.mark.parametrize("sharpness, seed", [(3.0, 0), (0.3, 1), (1.0, 2), (1.0, 3), (-1.0, 4)])
def test_temperature_never_raises_validation_nll_and_finds_the_grid_minimum(sharpness, seed):
    logits, labels = classification(sharpness=sharpness, seed=seed)
    probs = logits.softmax(-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit_temperature(probs, labels)
    # anti-correlated logits: the minimum is at T = inf, the upper bound (said); the others are inside
    assert [str(w.message) for w in caught] == (["temperature scaling: " + UPPER_BOUND_NOTE] if sharpness < 0 else [])
    before, after = nll(probs, labels), nll(apply_temperature(probs, t), labels)
    assert after <= before
    grid = torch.exp(torch.linspace(math.log(1e-2), math.log(1e2), 1001, dtype=torch.float64))[:, None, None]
    picked = (probs.log() / grid).log_softmax(-1).gather(-1, labels.expand(1001, -1).unsqueeze(-1))
    best = (-picked.clamp(min=math.log(1e-12))).mean((1, 2)).min()  # the NLL on a dense grid of T
    assert after <= best + 1e-4
    assert temperature_nll(probs.log(), labels, t) == pytest.approx(after, abs=1e-9)
    if sharpness == 3.0:
        assert 2.0 < t < 4.5 and after < 0.9 * before  # over-confident: T near the mis-scaling
    if sharpness == 0.3:
        assert 0.2 < t < 0.5


def test_temperature_from_logits_equals_from_probs_and_keeps_missing_choices_at_zero():
    logits, labels = classification(sharpness=3.0)
    assert fit_temperature(logits, labels) == pytest.approx(fit_temperature(logits.softmax(-1), labels), rel=1e-3)
    probs = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.5, 0.3]], dtype=torch.float32)
    scaled = apply_temperature(probs, 2.0)
    assert scaled[0, 2] == 0 and scaled.dtype == torch.float64  # float32 would tie sharpened confidences at 1
    torch.testing.assert_close(scaled.sum(-1), torch.ones(2, dtype=torch.float64))
    root = probs[0, :2].double().sqrt()
    torch.testing.assert_close(scaled[0, :2], root / root.sum())
    # logits beyond float64's range once over T: (x / T).softmax gave a row of nan; softmax ignores a shift of the row
    extreme = torch.tensor([[1e300, 0.0], [-1e308, -1.7e308], [5e307, 0.0], [3.0, -math.inf]], dtype=torch.float64)
    for t, expected in ((1e-10, [[1.0, 0.0]] * 3 + [[1.0, 0.0]]), (2.0, [[1.0, 0.0]] * 3 + [[1.0, 0.0]])):
        torch.testing.assert_close(apply_temperature(extreme, t, kind="logits"), torch.tensor(expected, dtype=torch.float64))
    e = math.exp(1.0)  # softmax([2, 0, -inf] / 2): a missing choice stays 0
    torch.testing.assert_close(apply_temperature(torch.tensor([[2.0, 0.0, -math.inf]]), 2.0, kind="logits"),
                               torch.tensor([[e / (e + 1), 1 / (e + 1), 0.0]], dtype=torch.float64))
    # a label on a zero-probability choice does not make the fit fail: its probability is floored for the search,
    # whose T = 100 only softens the other example in what metrics.nll reports (the 0 stays 0): T = 1, and said
    with pytest.warns(UserWarning, match=r"1 of 2 validation examples give probability 0 to their label \(saturated"
                                         r".*no T between 1 and 100 lowers it: falling back to T = 1"):
        assert fit_temperature(probs, torch.tensor([2, 1])) == 1.0
    # zeros elsewhere are missing choices, not classes: padding a third, empty choice changes nothing
    two = classification(c=2, sharpness=3.0)
    padded = torch.cat([two[0].softmax(-1), torch.zeros(400, 1, dtype=torch.float64)], -1)
    padded_logits = torch.cat([two[0], torch.full((400, 1), -math.inf, dtype=torch.float64)], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = fit_temperature(two[0].softmax(-1), two[1])
        assert 2.0 < t < 4.5
        assert fit_temperature(padded, two[1]) == pytest.approx(t, rel=1e-9)
        assert fit_temperature(padded_logits, two[1]) == pytest.approx(t, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_temperature_reads_half_precision_probabilities_as_probabilities(dtype):
    # their rows sum to 1 only within ~3e-4 / 3e-3: taken for logits, they gave T = 0.41 instead of 2.96
    logits, labels = classification(sharpness=3.0)
    probs = logits.softmax(-1).to(dtype)
    with warnings.catch_warnings(record=True):  # float16 saturates some rows to one class: said, tested elsewhere
        warnings.simplefilter("always")
        t = fit_temperature(probs, labels)
    # the same log-probabilities as logits, a row of one nonzero probability given its competitor at the dtype's
    # smallest positive number (read as logits, a -inf is a missing choice)
    ref = probs.double().log()
    lone = torch.isfinite(ref).sum(-1) == 1
    first_zero = torch.isinf(ref).int().argmax(-1)
    ref[lone, first_zero[lone]] = math.log(torch.finfo(dtype).tiny * torch.finfo(dtype).eps)
    assert t == pytest.approx(fit_temperature(ref, labels, kind="logits"), rel=1e-9)
    assert 2.0 < t < 4.5


def test_probabilities_passed_as_logits_are_refused_and_shifted_logits_are_not():
    """fit_temperature(probs, labels, kind="logits") fitted T = 0.683 where the logits give 2.919: a test NLL worse
    than no scaling, without a word."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(200, 3, generator=g, dtype=torch.float64)
    labels = torch.multinomial((logits / 3).softmax(-1), 1, generator=g).squeeze(-1)  # T = 3 fits them
    probs = logits.softmax(-1)
    for misread in (lambda: fit_temperature(probs, labels, kind="logits"),
                    lambda: apply_temperature(probs, 2.0, kind="logits")):  # rows 0.50 off the probabilities' scaling
        with pytest.raises(ValueError, match="kind='logits' but every row is a probability vector"):
            misread()
    assert fit_temperature(probs, labels) == pytest.approx(fit_temperature(logits, labels, kind="logits"), rel=1e-4)
    # logits that really are those numbers, shifted by a constant: the same softmax, taken as logits
    assert fit_temperature(probs + 1.0, labels, kind="logits") == pytest.approx(
        fit_temperature(probs + 5.0, labels, kind="logits"), rel=1e-6)


def test_temperature_separable_validation_falls_back_to_one_with_a_warning():
    logits, labels = classification(n=2000, sharpness=3.0)
    probs = logits.softmax(-1)
    right = (probs.argmax(-1) == labels).nonzero().flatten()[:50]  # a validation split the MAP gets 100% right
    val_probs, val_labels = probs[right], labels[right]
    test_probs, test_labels = probs[1000:], labels[1000:]
    with pytest.warns(UserWarning, match=r"all correct \(separable\).*falling back to T = 1"):
        fitted = fit_temperature(val_probs, val_labels, return_info=True)
    assert fitted.temperature == 1.0 and "no finite optimum" in fitted.note
    with pytest.warns(UserWarning, match="separable"):
        assert fit_temperature(val_probs, val_labels) == 1.0  # the plain call returns the float
    # what the bound T = 0.01 would have done: test NLL 1.23 -> 8.05
    with pytest.warns(UserWarning, match="sharpens 192 of 1000 rows to one-hot even in float64"):
        assert nll(apply_temperature(test_probs, 0.01), test_labels) > 6 * nll(test_probs, test_labels)


def test_temperature_overconfident_fit_has_no_note():
    logits, labels = classification(sharpness=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fitted = fit_temperature(logits.softmax(-1), labels, return_info=True)
    assert 2.0 < fitted.temperature < 4.5 and fitted.note is None


@pytest.mark.parametrize("tol", [1e-4, 0.05, 0.2, 0.3])
def test_a_wide_tol_does_not_take_an_interior_optimum_for_a_bound(tol):
    """With tol=0.2 in bounds (0.5, 2) an optimum at T = 1.49 was declared 'at the upper bound' and T = 2 returned
    (NLL 0.8968 for 0.8860), its note contradicting itself."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (400,), generator=g)
    logits = torch.randn(400, 3, generator=g)
    logits[torch.arange(400), labels] += 1.0
    logits *= 1.19

    def nll(t):
        return float(-(logits.double() / t).log_softmax(-1).gather(-1, labels[:, None]).mean())

    grid = torch.exp(torch.linspace(math.log(0.5), math.log(2.0), 4001, dtype=torch.float64)).tolist()
    best = min(grid, key=nll)
    assert 0.6 < best < 1.9  # inside the bounds
    fitted = fit_temperature(logits, labels, kind="logits", bounds=(0.5, 2.0), tol=tol, return_info=True)
    assert fitted.note is None and nll(fitted.temperature) <= nll(best) + 0.005 * tol + 1e-7


def test_temperature_optimum_on_a_search_bound_is_reported():
    # anti-informative predictions (every label the least likely class): the NLL falls all the way to T = inf;
    # the upper bound is kept (nearly uniform predictions: validation NLL 4.64 at T = 1, log 4 at T = 100), and said
    logits, _ = classification(n=200)
    probs = logits.softmax(-1)
    labels = probs.argmin(-1)
    with pytest.warns(UserWarning, match="upper search bound T = 100: .*no better than uniform"):
        fitted = fit_temperature(probs, labels, return_info=True)
    assert fitted.temperature == 100.0 and "makes them nearly uniform" in fitted.note
    assert nll(apply_temperature(probs, 100.0), labels) == pytest.approx(math.log(4), abs=0.05)
    # under-confident and nearly separable: 99 right by log-odds 0.04, one wrong by 0.0004; optimum T ~ 0.003
    margin = torch.full((100,), 0.04, dtype=torch.float64)
    margin[0] = 4e-4
    probs = torch.stack([margin, torch.zeros(100, dtype=torch.float64)], -1).softmax(-1)
    labels = (torch.arange(100) == 0).long()
    with pytest.warns(UserWarning, match="lower search bound T = 0.01 .*falling back to T = 1"):
        fitted = fit_temperature(probs, labels, return_info=True)
    assert fitted.temperature == 1.0 and "want sharpening more than 100-fold: nearly uniform yet better" in fitted.note
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a wider interval holds the optimum: fitted, no note
        fitted = fit_temperature(probs, labels, bounds=(1e-4, 1e2), return_info=True)
    assert 1e-3 < fitted.temperature < 6e-3 and fitted.note is None


def overconfident(margin, n=200, seed=0):
    """The adversarial tester's repro: 70% right, every prediction ``margin`` nats sure of itself (optimum ~1.33 m)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    pred = torch.where(torch.rand(n, generator=g) < 0.7, labels, 1 - labels)
    logits = torch.zeros(n, 2)
    logits[torch.arange(n), pred] = margin
    return logits, labels


def grid_optimum(log_probs, labels):
    """``T`` minimising the exact (unfloored) mean NLL of ``softmax(log_probs / T)`` on a dense grid of [1e-3, 1e4]."""
    grid = torch.exp(torch.linspace(math.log(1e-3), math.log(1e4), 7001, dtype=torch.float64))
    scaled = (log_probs.double()[None] / grid[:, None, None]).log_softmax(-1)
    nlls = -scaled.gather(-1, labels.expand(len(grid), -1).unsqueeze(-1)).mean((1, 2))
    return float(grid[nlls.argmin()])


@pytest.mark.parametrize("kind", ["probs", "logits"])
@pytest.mark.parametrize("wrong_by, exact_t", [(100.0, 4.574), (300.0, 12.006)])
def test_temperature_never_raises_the_reported_validation_nll_for_a_few_far_wrong_examples(kind, wrong_by, exact_t):
    # 99 examples right by 10 nats, one wrong by 100 (300): the exact NLL's optimum T = 4.574 (12.006) softened the
    # 99 to rescue one already capped at the reported NLL's 27.6 nats: 0.2764 rose to 0.3240 (0.6073) on this split
    logits = torch.tensor([[10.0, 0.0]] * 99 + [[wrong_by, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0] * 99 + [1])
    x = logits if kind == "logits" else logits.softmax(-1)
    assert _exact_nll(logits.log_softmax(-1), labels, math.log(exact_t)) < _exact_nll(logits.log_softmax(-1), labels, 0.0)
    with pytest.warns(UserWarning, match=rf"T = {exact_t:.4g} lowers the exact validation NLL but raises the one "
                                         r"pyro_lora.metrics.nll reports \(0\.\d+ against 0\.2764 at T = 1\).*1 of 100 "
                                         "validation examples are wrong by more than that.*no T between 1 and "
                                         rf"{exact_t:.4g} lowers it: falling back to T = 1"):
        fitted = fit_temperature(x, labels, kind=kind, return_info=True)
    assert fitted.temperature == 1.0
    probs = logits.softmax(-1)
    assert nll(apply_temperature(probs, fitted.temperature), labels) == pytest.approx(nll(probs, labels)) == pytest.approx(0.2764, abs=1e-4)


@pytest.mark.parametrize("kind", ["probs", "logits"])
def test_temperature_keeps_the_gain_short_of_an_optimum_that_raises_the_reported_nll(kind):
    # 94 right by 10 nats, 5 wrong by 8, 1 wrong by 400: the exact optimum T = 48.3 raises the reported NLL (0.6811
    # against 0.6764 at T = 1) for the one example capped at 27.6 nats, but T = 3.14 lowers it to 0.4456: the fit
    # fell back to T = 1, throwing the gain away, with a warning that no T helps
    logits = torch.tensor([[10.0, 0.0]] * 94 + [[8.0, 0.0]] * 5 + [[400.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0] * 94 + [1] * 5 + [1])
    probs = logits.softmax(-1)
    with pytest.warns(UserWarning, match=r"T = 48\.3\d lowers the exact validation NLL but raises the one .*"
                                         r"\(0\.6811 against 0\.6764 at T = 1\).*keeping T = 3\.1\d*, the least "
                                         r"reported NLL between 1 and 48\.3\d \(0\.4456\)"):
        t = fit_temperature(logits if kind == "logits" else probs, labels)
    grid = torch.exp(torch.linspace(0.0, math.log(48.3), 4001, dtype=torch.float64))
    reported = torch.tensor([nll(apply_temperature(probs, float(g)), labels) for g in grid])
    assert nll(apply_temperature(probs, t), labels) == pytest.approx(float(reported.min()), abs=1e-6)
    assert t == pytest.approx(float(grid[reported.argmin()]), rel=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_temperature_of_saturated_probabilities_never_raises_the_nll_apply_temperature_reports(dtype):
    # 90 right by 5 nats, 10 wrong by 120 (their label's probability an exact 0 in float32 and float16): the search
    # takes the 0 as a tiny probability and softens (T = 100 / 26.7), but apply_temperature keeps a 0 at 0, so the
    # reported NLL rose from 2.769 to 3.365 / 3.307; the check scored the floored stand-in, not the 0
    logits = torch.tensor([[5.0, 0.0]] * 90 + [[120.0, 0.0]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 90 + [1] * 10)
    probs = logits.softmax(-1).to(dtype)
    with pytest.warns(UserWarning, match=r"10 of 100 validation examples give probability 0 .*raises the one "
                                         r"pyro_lora.metrics.nll reports \(3\.3\d+ against 2\.769\d at T = 1\).*"
                                         "falling back to T = 1"):
        t = fit_temperature(probs, labels)
    assert t == 1.0 and nll(apply_temperature(probs, t), labels) == pytest.approx(2.769, abs=1e-3)


def test_temperature_gives_a_saturated_one_class_row_a_competitor_not_a_missing_choice():
    # 160 examples right by 18-22 nats (float16 rounds their other class to 0) and 40 wrong by 1-3: read as
    # missing choices, the zeros made softening free for the 160 and T went to 100 with a note calling an 80%-accurate
    # classifier no better than uniform; logits give T = 4.80 (held-out float16 NLL 0.500 at T = 100, 0.251 at 4.8)
    g = torch.Generator().manual_seed(0)
    margin = torch.cat([18 + 4 * torch.rand(160, generator=g, dtype=torch.float64),
                        -(1 + 2 * torch.rand(40, generator=g, dtype=torch.float64))])
    logits, labels = torch.stack([margin, torch.zeros(200, dtype=torch.float64)], -1), torch.zeros(200, dtype=torch.long)
    probs = logits.softmax(-1).to(torch.float16)
    assert int((probs[:, 1] == 0).sum()) == 160
    exact = fit_temperature(logits, labels)
    with pytest.warns(UserWarning, match=r"160 of 200 validation rows give all their probability to one class "
                                         r"\(saturated probabilities.*one competitor at 5\.96e-08"):
        fitted = fit_temperature(probs, labels, return_info=True)
    assert exact == pytest.approx(4.804, abs=1e-3) and 4.0 < fitted.temperature < exact  # the competitor is a bound
    assert "no better than uniform" not in fitted.note
    # a one-class row of logits is a question of one choice, not saturation: nothing is said
    one_choice = torch.tensor([[2.0, 0.0, -math.inf], [0.0, 1.0, -math.inf], [0.0, -math.inf, -math.inf]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_temperature(one_choice, torch.tensor([0, 0, 0]))


@pytest.mark.parametrize("accuracy", [0.512, 0.522])
def test_temperature_compares_with_half_precision_rows_as_given_at_t_one(accuracy):
    # bf16 rows [0.5039, 0.4980] sum to 1.00195: at T = 1 apply_temperature returns them as given, any other T
    # renormalises them; the check compared the fitted T = 0.24 against the renormalised T = 1, and the reported NLL
    # rose from 0.69107 to 0.69286
    n = round(accuracy * 1000)
    labels = torch.tensor([0] * n + [1] * (1000 - n))
    probs = torch.tensor([[0.50390625, 0.498046875]] * 1000, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match=r"which at T = 1 scores the probabilities as given, rows summing to 1 only "
                                         r"within 0\.00195 \(half-precision rounding\).*falling back to T = 1"):
        t = fit_temperature(probs, labels)
    assert t == 1.0 and nll(apply_temperature(probs, t), labels) == pytest.approx(nll(probs, labels))


@pytest.mark.parametrize("margin", [15.0, 20.0, 40.0, 80.0, 90.0, 100.0, 120.0])
@pytest.mark.parametrize("kind, dtype", [("logits", torch.float32), ("logits", torch.float64),
                                         ("probs", torch.float32), ("probs", torch.float16)])
def test_temperature_of_very_overconfident_predictions_is_the_exact_nll_optimum(margin, kind, dtype):
    # the per-example floor of the NLL (27.6 nats) made the objective flat below T ~ m / 27.6: both probes of
    # the search landed there and it returned T = 1 without a word (logits from m = 90; float16 probabilities,
    # whose label entry is an exact 0 from m = 20, and float32 ones from m = 104)
    logits, labels = overconfident(margin)
    x = logits.to(dtype) if kind == "logits" else logits.softmax(-1).to(dtype)
    if kind == "logits":
        log_probs = x.double().log_softmax(-1)
        saturated = 0
    else:  # a label probability of exactly 0 is taken as metrics.nll's floor 1e-12, or as the dtype's smallest
        # positive number where lower (float32: 1.4e-45, below the 4e-44 it holds at m = 100); the other class of a
        # row left with one nonzero probability is taken as the dtype's smallest positive number
        log_probs = x.double().log()
        picked = log_probs.gather(-1, labels[:, None])
        saturated = int((picked == -math.inf).sum())
        floor = {torch.float32: 1.4012984643e-45, torch.float16: 1e-12}[dtype]
        log_probs = log_probs.scatter(-1, labels[:, None], picked.clamp(min=math.log(floor)))
        tiny = {torch.float32: 1.4012984643e-45, torch.float16: 5.9604644775e-08}[dtype]
        lone = int((log_probs == -math.inf).sum())
        log_probs = log_probs.masked_fill(log_probs == -math.inf, math.log(tiny))
    best = grid_optimum(log_probs, labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = fit_temperature(x, labels, return_info=True)
    messages = [str(w.message) for w in caught]
    assert len(messages) == (fitted.note is not None) and all(m == f"temperature scaling: {fitted.note}" for m in messages)
    if best < 100:
        assert fitted.temperature == pytest.approx(best, rel=3e-3)
        assert 1.2 * margin < fitted.temperature < 1.45 * margin or saturated
    else:  # the optimum is past the upper bound: kept there, and said
        assert fitted.temperature == 100.0 and "lowest at the upper search bound T = 100" in fitted.note
        # saturated rows too: their zeros, floored, are over-confidence, not predictions no better than uniform
        beyond = float(re.search(r"its minimum lies beyond it, at T = ([0-9.e+]+)", fitted.note).group(1))
        assert beyond == pytest.approx(best, rel=5e-3) and "pass bounds=(0.01, 1000) to reach it" in fitted.note
    if saturated:
        assert fitted.note.startswith(f"{saturated} of 200 validation examples give probability 0 to their label "
                                      "(saturated probabilities)") and "pass logits for an exact fit" in fitted.note
    if kind == "probs" and lone:
        assert f"{lone} of 200 validation rows give all their probability to one class" in fitted.note
    elif not saturated and best < 100:
        assert fitted.note is None
    if margin == 40.0 and kind == "logits":
        assert fitted.temperature == pytest.approx(53.07, abs=0.01)  # the repro's numbers
    if margin >= 90.0 and kind == "logits":
        assert fitted.temperature == 100.0 and best > 110  # was 1.0, silently


def test_temperature_row_carries_the_fallback_note_into_results_and_table():
    from pyro_lora.experiments.compare import fit_method
    from pyro_lora.experiments.table import format_table
    from pyro_lora.experiments.results import summarize_seeds

    model = make(num_labels=3)
    val = toy_data()
    predicted = predict(model, None, val).probs.argmax(-1)
    for i, batch in enumerate(val):  # labels = the MAP's own predictions: a separable validation split
        batch["labels"] = predicted[8 * i : 8 * (i + 1)]
    setup = SimpleNamespace(config=SimpleNamespace(device="cpu"), seed=0, model=model, map_guide=None, val=val, loader=lambda r: r,
                            split_notes={})
    setup.for_method = lambda name: setup
    setup.keep_fit = lambda *args: None
    with pytest.warns(UserWarning, match="separable"), pytest.warns(UserWarning, match="validation split of 6 examples"):
        fitted, costs = fit_method(setup, "temperature", 0.0)
    assert "all correct (separable)" in fitted.note and costs["note"].startswith(f"{fitted.note}; fitted on a validation split")
    assert costs["temperature"] == 1.0  # its rows keep the T it applied, as the +ts rows keep theirs
    assert torch.equal(fitted.predict(val).probs, predict(model, None, val).probs.double())  # T = 1: the MAP unchanged
    rows = [{"guide": "temperature", "dataset": "sst2", "seed": s, "accuracy": 1.0, **costs} for s in (0, 1)]
    rows += [{"guide": "map", "dataset": "sst2", "seed": s, "accuracy": 1.0, "fit_seconds": 0.0} for s in (0, 1)]
    summary = summarize_seeds(rows)
    assert summary[0]["note"] == f"seeds 0, 1: {costs['note']}" and "note" not in summary[1]
    blank = dict.fromkeys(["ece", "nll", "brier", "mutual_information", "aurc", "fit_memory_mb", "extra_parameters",
                           "predict_seconds_per_1000"], 0.0)
    table = format_table([{**blank, **r} for r in summary])
    # rows without a recorded setting (an older record's) take their method's
    assert "| temperature (note) | validation-tuned | sst2 |" in table and "| map | no validation data | sst2 |" in table
    assert table.endswith(f"Note (temperature on sst2): seeds 0, 1: {costs['note']}")


def sharp_head(gain=200.0):
    """``make(3)`` with its classifier ``gain`` times a standard normal: margins of 150 to 400 nats, where float32
    probabilities are 0 (below ``e^-103``)."""
    model = make(num_labels=3)
    head = model.net.base_model.model.classifier.modules_to_save["default"]
    with torch.no_grad():
        head.weight.copy_(gain * torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)))
    return model


def labelled_batches(model, seed, n=64, batch=16, temperature=40.0):
    """``n`` random sequences in batches of ``batch``, labelled by draws from ``softmax(logits / temperature)``: the
    model is ``temperature`` times over-confident; and their float64 logits (one forward per batch, as predict's)."""
    g = torch.Generator().manual_seed(seed)
    full = random_batch(batch=n, seq=7, seed=seed)
    batches = [{k: v[i : i + batch] for k, v in full.items()} for i in range(0, n, batch)]
    with torch.no_grad():
        logits = torch.cat([model.logits(b).double() for b in batches])
    labels = torch.multinomial((logits / temperature).softmax(-1), 1, generator=g).squeeze(-1)
    for i, b in enumerate(batches):
        b["labels"] = labels[i * batch : (i + 1) * batch]
    return batches, logits, labels


def reference_temperature(logits, labels, low=1e-2, high=1e2):
    """The ``T`` minimising the exact float64 NLL of ``softmax(logits / T)``: golden section over ``log T`` to 1e-9."""
    def nll(log_t):
        return float(-(logits / math.exp(log_t)).log_softmax(-1).gather(-1, labels[:, None]).mean())

    a, b, r = math.log(low), math.log(high), (math.sqrt(5) - 1) / 2
    while b - a > 1e-9:
        c, d = b - r * (b - a), a + r * (b - a)
        a, b = (a, d) if nll(c) <= nll(d) else (c, b)
    return math.exp((a + b) / 2)


def test_the_temperature_and_ts_rows_scale_the_exact_log_probabilities_not_float32_zeros():
    """Cloze margins beyond 103 nats: predict's float32 probabilities held 0, apply_temperature kept it 0 whatever T,
    and the fit floored it. With T = 100, 12 of 60 rows gave their label 0 where softmax(scores / 100) gives >= 0.07
    (NLL 6.59 against 1.47). Both rows now fit T on, and scale, the float64 log-probabilities."""
    from pyro_lora.experiments.compare import _ts_rows, fit_method
    from pyro_lora.guides.registry import Fitted

    model = sharp_head()
    val, val_logits, val_labels = labelled_batches(model, 3)
    test, test_logits, test_labels = labelled_batches(model, 4)
    setup = SimpleNamespace(config=SimpleNamespace(device="cpu", dataset="sst2"), seed=0, model=model, map_guide=None,
                            val=val, loader=lambda r: r, split_notes={})
    setup.for_method = lambda name: setup
    setup.keep_fit = lambda *args: None
    expected_t = reference_temperature(val_logits, val_labels)
    assert 20 < expected_t < 60
    plain = predict(model, None, test).probs
    lost = plain == 0  # float32 flushed these probabilities
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small validation split's note
        fitted, costs = fit_method(setup, "temperature", 0.0)
        rows, arrays, _ = _ts_rows(setup, "zeroshot", SimpleNamespace(validation=True),
                                   Fitted(lambda r: predict(model, None, r), point_estimate=True),
                                   {"sst2": predict(model, None, test)}, {"fit_seconds": 0.0, "extra_parameters": 0},
                                   {"sst2": {}})
    for t, probs, nll_row in [(costs["temperature"], fitted.predict(test).probs, None),
                              (rows[0]["temperature"], torch.from_numpy(arrays["sst2__seed0__probs"]), rows[0]["nll"])]:
        assert t == pytest.approx(expected_t, rel=1e-3)
        expected = (test_logits / t).softmax(-1)
        assert int((expected[lost] > 1e-3).sum()) >= 10  # which the temperature scales back up
        torch.testing.assert_close(probs, expected, rtol=1e-9, atol=1e-300)
        if nll_row is not None:
            assert nll_row == pytest.approx(nll(expected, test_labels), rel=1e-9)


def test_temperature_bad_input():
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(torch.tensor([[0.5, 0.5]]), 0.0)
    # numpy's and torch's booleans were taken as T = 1 (Python's was refused); 10**400 raised a bare OverflowError
    for bad in (True, np.bool_(True), torch.tensor(True), 10**400):
        with pytest.raises(ValueError, match=r"temperature must be a finite positive number, got"):
            apply_temperature(torch.tensor([[0.5, 0.5]]), bad)
    assert apply_temperature(torch.tensor([[0.25, 0.75]]), np.float32(2.0)).tolist() == apply_temperature(
        torch.tensor([[0.25, 0.75]]), torch.tensor(2.0)).tolist()
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        fit_temperature(torch.tensor([0.5, 0.5]), torch.tensor([0]))
    with pytest.raises(ValueError, match="out of range"):
        fit_temperature(torch.tensor([[0.5, 0.5]]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"rows must be probability vectors .*: pass softmax\(logits\), not logits"):
        fit_temperature(torch.tensor([[2.0, 0.5]]), torch.tensor([0]), kind="probs")
    # float labels were truncated (labels + 0.7 gave the same T); refused as every metric refuses them
    logits, labels = classification(sharpness=3.0)
    for bad in (labels + 0.7, labels.double(), labels.bool()):
        for x in (logits, logits.softmax(-1)):
            with pytest.raises(ValueError, match="labels must be integer class indices"):
                fit_temperature(x, bad)
    with pytest.raises(ValueError, match="all -inf"):
        fit_temperature(torch.tensor([[0.0, 1.0], [-math.inf, -math.inf]]), torch.tensor([0, 1]))
    # a numpy or torch scalar tol is a number (it was refused as not positive and finite)
    assert fit_temperature(logits, labels, tol=torch.tensor(1e-3)) == fit_temperature(logits, labels, tol=1e-3)
    # tol 0 or -1 looped forever, nan stopped at the first probe (T = 2.966, not 1.974); an infinite bound gave T = nan
    for tol in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"tol \(the search.s stopping width in log space\) must be a finite positive number"):
            fit_temperature(logits, labels, tol=tol)
        with pytest.raises(ValueError, match=r"tol \(the search.s stopping width in log space\) must be a finite positive number"):
            golden_section(lambda x: x * x, -1.0, 1.0, tol)  # the search tune_on_validation shares
    for bounds in ((0.01, math.inf), (0.01, math.nan), (0.0, 100.0), (2.0, 100.0), (0.01, 1.0)):
        with pytest.raises(ValueError, match="bounds must be finite with 0 < low < 1 < high"):
            fit_temperature(logits, labels, bounds=bounds)
    # a dict was read by its keys (here T = 24.5 from bounds {0.01: .., 100: ..}), a set in hash order; a wrong length
    # or a string bound raised raw unpacking or comparison errors
    for bounds, match in (({0.01: "low", 100.0: "high"}, "list or tuple of numbers"), ({0.01, 100.0}, "list or tuple"),
                          ("ab", "list or tuple"), ((0.1,), "2 numbers, got 1"), ((0.1, 1.0, 10.0), "2 numbers, got 3"),
                          ((0.1, "10"), "numbers only"), ((True, 10.0), "numbers only"), (10.0, "list or tuple")):
        with pytest.raises(ValueError, match=f"bounds must (be a|hold) .*{match}"):
            fit_temperature(logits, labels, bounds=bounds)
    assert fit_temperature(logits, labels, bounds=torch.tensor([0.01, 100.0], dtype=torch.float64)) == fit_temperature(logits, labels)


def test_temperature_refuses_a_label_on_a_missing_choice_of_logits():
    """One example of 200 whose label's logit is -inf (a missing choice) was floored at 4.9e-324: T went to the
    bound 100 (2.2 without it) with a note saying the predictions were no better than uniform."""
    logits, labels = classification(n=200)
    bad = logits.clone()
    bad[[3, 7], labels[[3, 7]]] = -math.inf
    with pytest.raises(ValueError, match=r"2 of 200 validation examples \(the first: index 3\) have their label's logit at -inf"):
        fit_temperature(bad, labels)
    with pytest.raises(ValueError, match="label's logit at -inf"):
        fit_temperature(bad, labels, kind="logits")


def test_a_temperature_of_one_leaves_the_probabilities_exactly_as_they_are():
    """A fallback T = 1 renormalised in float64 moved float32 probabilities by 6e-8: near-tied confidences reordered
    and the temperature row's AURC differed from MAP's (0.5610 against 0.5596)."""
    probs = torch.softmax(torch.randn(500, 3, generator=torch.Generator().manual_seed(0)), -1)
    out = apply_temperature(probs, 1.0)
    assert torch.equal(out, probs) and out is not probs and out.dtype == probs.dtype
    assert not torch.equal(apply_temperature(probs, 1.0 + 1e-6), probs)
    # float32 confidences on a bin edge: a float64 copy (0.60000002) left bin 9 for bin 10, and a +ts row that fell back
    # to T = 1 showed another ECE than its method's row with the same probabilities (43.3 against 16.7)
    edge = torch.tensor([[0.6, 0.4]] * 10 + [[0.55, 0.45]] * 10 + [[0.65, 0.35]] * 10)  # right, wrong, right
    labels = torch.tensor([0] * 10 + [1] * 10 + [0] * 10)
    assert ece(edge, labels) == pytest.approx((20 * 0.075 + 10 * 0.35) / 30)  # 0.6 with 0.55 in (8/15, 9/15]
    assert ece(apply_temperature(edge, 1.0), labels) == ece(edge, labels)


def test_temperature_refuses_clipped_probabilities_it_would_read_as_logits():
    """Probabilities clipped at 1e-3 (rows sum to up to 1.001) were read as logits: T 0.60 where the renormalised
    rows give 3.8, without a word. Entries all in [0, 1] whose rows miss 1 are ambiguous: refused."""
    logits, labels = classification(sharpness=6.0)
    clipped = logits.softmax(-1).clamp(min=1e-3)
    with pytest.raises(ValueError, match=r"in \[0, 1\] but a row's sum is .* away from 1.*renormalise"):
        fit_temperature(clipped, labels)
    renormalised = fit_temperature(clipped / clipped.sum(-1, keepdim=True), labels)
    assert renormalised == pytest.approx(fit_temperature(clipped.log(), labels, kind="logits"), rel=1e-6)


# --- MC dropout -----------------------------------------------------------------------------------


def test_mc_dropout_samples_drop_whole_input_columns_and_average_to_a():
    model = make()
    guide = MCDropoutGuide(model, p=0.1)
    torch.manual_seed(0)
    draws = guide.sample(20_000)
    for (name, site), loc in zip(model.sites.items(), guide.locs):
        if site.matrix == "B":
            assert torch.equal(draws[name][7], loc)
            continue
        a = draws[name]  # [S, L, r, d_in]
        kept = (a == loc / 0.9).all(-2)
        dropped = (a == 0).all(-2)
        assert (kept | dropped).all()  # every column of every sample is kept whole or dropped whole
        assert abs(dropped.double().mean() - 0.1) < 0.005
        assert (a.mean(0) - loc).abs().max() < 0.02 * loc.abs().max()


def test_column_dropout_log_prob_counts_columns():
    loc = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]])
    q = ColumnDropout(loc, 0.25)
    value = torch.tensor([[0.0, 2.0 / 0.75, 0.0], [0.0, 4.0 / 0.75, 0.0]])  # column 0 dropped, 1 kept, 2 all-zero
    assert q.log_prob(value).item() == pytest.approx(math.log(0.25) + math.log(0.75))
    assert q.log_prob(torch.ones(2, 3)).item() == -math.inf
    nonzero_where_loc_is_zero = value.clone()
    nonzero_where_loc_is_zero[1, 2] = 1.0  # no draw has it: it scored as column 2 kept (-1.39)
    assert q.log_prob(nonzero_where_loc_is_zero).item() == -math.inf
    torch.testing.assert_close(q.variance, loc.pow(2) / 3)
    # entropy raised a bare NotImplementedError; two nonzero columns, each a Bernoulli(0.75) draw
    bernoulli = torch.distributions.Bernoulli(probs=torch.tensor(0.75)).entropy().item()
    assert q.entropy().item() == pytest.approx(2 * bernoulli)
    assert ColumnDropout(loc, 0.0).entropy().item() == 0.0


def test_mc_dropout_predicts_batched_and_its_mean_is_the_network():
    model = make(num_labels=3)
    guide = MCDropoutGuide(model, p=0.3)
    data = toy_data()
    torch.manual_seed(0)
    full = predict(model, guide, data, num_samples=4, keep_samples=True)
    torch.manual_seed(0)
    torch.manual_seed(int(torch.randint(SEED_RANGE, ())))  # predict draws its one chunk under a seed from the global RNG
    values = guide.sample(4)
    direct = torch.softmax(model.logits(data[1], {k: v[3] for k, v in values.items()}), -1)
    torch.testing.assert_close(full.sample_probs[3, 8:16], direct, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(full.sample_probs[0], full.sample_probs[1])
    torch.testing.assert_close(predict(model, guide, data, mean=True).probs, predict(model, None, data).probs)


def test_mc_dropout_training_and_save_load(tmp_path):
    model = make()
    guide = MCDropoutGuide(model, p=0.1)
    before = [loc.detach().clone() for loc in guide.locs]
    losses = fit(model, guide, toy_data(), epochs=3, lr=3e-2, progress=False)
    assert all(math.isfinite(x) for x in losses) and sum(losses[-6:]) < sum(losses[:6])
    assert not torch.equal(before[0], guide.locs[0])
    save_guide(guide, tmp_path / "mcd")
    loaded = load_guide(tmp_path / "mcd", make())
    assert type(loaded) is MCDropoutGuide and loaded.p == 0.1
    for a, b in zip(guide.locs, loaded.locs):
        torch.testing.assert_close(a, b)


def test_mc_dropout_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MCDropoutGuide(make(), p=1.0)
    for p in ("0.1", None, float("nan")):  # a string or None died in a raw TypeError of the comparison
        with pytest.raises(ValueError, match=f"dropout probability p must be a finite number >= 0, got {p!r}"):
            MCDropoutGuide(make(), p=p)
    with pytest.raises(ValueError, match="no"):
        MCDropoutGuide(make(random="B"))
    from pyro_lora.loraxs import LoraXSModel  # told to use random=, which LoraXSModel does not take

    xs = LoraXSModel(tiny_bert(random_b=False), SequenceClassification(), num_data=4)
    with pytest.raises(ValueError, match=r"the model has none \(\['query.lora_R', 'value.lora_R'\]\): a LoraXSModel has none "
                                         r"to give; use a LoraModel\(net, likelihood, random='A' or 'AB'\)$"):
        MCDropoutGuide(xs)
    # p=0 was taken without a word: every sample the MAP, listed as a Bayesian method
    with pytest.warns(UserWarning, match=r"MCDropoutGuide\(p=0\) drops nothing: every sample is A itself"):
        MCDropoutGuide(make(), p=0)


# --- deep ensemble --------------------------------------------------------------------------------


def distinct_members(model, k=3):
    return [{n: torch.full(s.shape, float(i + 1)) for n, s in model.sites.items()} for i in range(k)]


def test_ensemble_cycles_members_and_its_pyro_path_keeps_sites_together():
    model = make()
    guide = EnsembleGuide(model, distinct_members(model))
    draws = guide.sample(6)
    for v in draws.values():
        assert v[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    assert all(torch.equal(v, torch.full_like(v, 2.0)) for v in guide.mean().values())
    trace = poutine.trace(guide).get_trace(random_batch())
    k = int(trace.nodes["ensemble_member"]["value"])
    assert all(torch.equal(trace.nodes[n]["value"], torch.full(s.shape, k + 1.0)) for n, s in model.sites.items())
    conditioned = poutine.trace(poutine.condition(guide, {"ensemble_member": torch.tensor(2)})).get_trace()
    assert all(trace_value.eq(3.0).all() for trace_value in (conditioned.nodes[n]["value"] for n in model.sites))
    marginal = guide.posterior()["query.lora_A"]
    assert marginal.sample().unique().item() in (1.0, 2.0, 3.0)
    torch.testing.assert_close(marginal.mean, torch.full(model.sites["query.lora_A"].shape, 2.0))
    assert guide.extra_parameters() == 2 * sum(s.numel for s in model.sites.values())


def member_prediction(model, guide, data, k):
    """Member ``k`` the slow way: its sites and head written into the network, one plain forward."""
    params = dict(model.net.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        model.write_adapter({n: v[k] for n, v in guide.members().items()})
        for n, v in guide.heads().items():
            params[n].copy_(v[k])
    probs = predict(model, None, data).probs
    with torch.no_grad():
        for n, v in saved.items():
            params[n].copy_(v)
    return probs


def test_train_ensemble_members_differ_heads_are_batched_and_network_is_restored():
    model = make()
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    guide = train_ensemble(model, toy_data(), k=3, seeds=[1, 2, 3], fit_kwargs={"epochs": 1, "lr": 1e-2}, include_current=True)
    for n, p in model.net.named_parameters():
        assert torch.equal(p, before[n]), n
    assert guide.head_parameters == sorted(head_parameters(model)) and len(guide.head_parameters) == 2
    heads = guide.heads()["base_model.model.classifier.modules_to_save.default.weight"]
    assert not torch.allclose(heads[1], heads[2]) and torch.equal(heads[0], before["base_model.model.classifier.modules_to_save.default.weight"])
    members = guide.members()["query.lora_A"]
    assert not torch.allclose(members[1], members[2])
    data = toy_data()
    prediction = predict_ensemble(model, guide, data, keep_samples=True)
    slow = torch.stack([member_prediction(model, guide, data, k) for k in range(3)])
    torch.testing.assert_close(prediction.sample_probs, slow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prediction.probs, slow.mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="member_heads"):
        predict(model, guide, data, num_samples=3)
    with pytest.raises(ValueError, match="no Pyro guide path"):
        guide(data[0])
    with pytest.raises(ValueError, match=r"chunk_size=1 would split its S=3; drop chunk_size \(or give 3\)"):
        predict_ensemble(model, guide, data, chunk_size=1)
    # chunk_size=S is the one forward: it was refused all the same
    whole = predict_ensemble(model, guide, data, chunk_size=3, keep_samples=True)
    torch.testing.assert_close(whole.sample_probs, slow, rtol=1e-5, atol=1e-6)


def test_a_member_failing_late_keeps_the_members_that_finished():
    """An error in member k's fit (out of memory, an interrupt) lost the k - 1 members already trained: nothing was
    kept, and the error named no member."""
    model = make()
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    whole = train_ensemble(model, toy_data(), k=3, seeds=[1, 2, 3], fit_kwargs={"epochs": 1, "lr": 1e-2})

    fits = []

    def boom(state):
        fits.append(state.step == 1)
        if sum(fits) == 3:  # the third member's first step
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        train_ensemble(model, toy_data(), k=3, seeds=[1, 2, 3], fit_kwargs={"epochs": 1, "lr": 1e-2, "callbacks": [boom]})
    for n, p in model.net.named_parameters():
        assert torch.equal(p, before[n]), n
    assert caught.value.__notes__ == [
        "train_ensemble: member 2 of 3 (seed 3) failed; the 2 member(s) that finished are kept as this error's "
        "finished_ensemble (an EnsembleGuide: predict with it, or keep it with save_guide)"]
    kept = caught.value.finished_ensemble
    for name, values in kept.members().items():  # the same two members the whole run trained first
        torch.testing.assert_close(values, whole.members()[name][:2])
    for name, values in kept.heads().items():
        torch.testing.assert_close(values, whole.heads()[name][:2])
    with pytest.raises(RuntimeError, match="boom") as caught:  # the first member failing keeps none
        train_ensemble(model, toy_data(), k=2, fit_kwargs={"callbacks": [lambda state: (_ for _ in ()).throw(RuntimeError("boom"))]})
    assert caught.value.finished_ensemble is None
    assert caught.value.__notes__ == ["train_ensemble: member 0 of 2 (seed 0) failed; no member had finished"]


def test_members_of_separate_fits_without_their_heads_are_warned_of_sharing_the_last_ones_head():
    """Each fit trains its own head; EnsembleGuide(model, [g.mean() for g in guides]) paired every member with the
    last fit's head, the one the network holds (probabilities up to 0.12 off the mixture of each with its own head)
    without a word."""
    model, data = make(), toy_data()
    guides, heads = [], []
    for seed in range(3):
        reinitialize(model, seed)
        guides.append(MAPGuide(model))
        fit(model, guides[-1], data, epochs=2, lr=1e-1, progress=False)
        heads.append({n: p.detach().clone() for n, p in model.named_point_parameters()})
    members = [{n: v.detach().clone() for n, v in g.mean().items()} for g in guides]
    with pytest.warns(UserWarning, match=r"trained by a MAPGuide beside LoRA values other than member\(s\) 0, 1: ") as caught:
        EnsembleGuide(model, members)

    class Mine(EnsembleGuide):
        def __init__(self, model, members):
            super().__init__(model, members)

    class Deeper(Mine):
        def __init__(self, model, members):
            super().__init__(model, members)

    with pytest.warns(UserWarning, match="trained by a MAPGuide") as deeper:
        Deeper(model, members)
    # said where the guide was built, however deep its class
    assert [w.filename for w in (*caught, *deeper)] == [__file__] * 2 and deeper[0].lineno == caught[0].lineno + 11
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EnsembleGuide(model, members, heads)  # each member's own head
        EnsembleGuide(model, [members[2]] * 2)  # the head's own training
    del guides[:]
    gc.collect()  # the guides gone: the record of the last fit still tells
    with pytest.warns(UserWarning, match=r"trained by a MAPGuide beside LoRA values other than member\(s\) 0, 1: "):
        EnsembleGuide(model, members)
    reinitialize(model, 7)  # a fresh head no training left: nothing to tell
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EnsembleGuide(model, members)


def test_members_of_separate_autoguide_fits_without_their_heads_are_warned_too():
    """Pyro SVI fits of an AutoDelta each train the head beside their median: members from their medians without
    heads= predicted 0.011 off the mixture of each with its own head, without a word."""
    import pyro
    from pyro.infer.autoguide import AutoDelta

    model, data = make(), toy_data()
    members = []
    for seed in range(3):
        reinitialize(model, seed)
        pyro.clear_param_store()
        autoguide = AutoDelta(model)
        svi = pyro.infer.SVI(model, autoguide, pyro.optim.Adam({"lr": 1e-1}), pyro.infer.Trace_ELBO())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for batch in data:
                svi.step(batch)
        members.append({n: v.detach().clone() for n, v in autoguide.median().items()})
    with pytest.warns(UserWarning, match=r"trained by a Pyro AutoDelta beside LoRA values other than member\(s\) 0, 1: "):
        EnsembleGuide(model, members)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EnsembleGuide(model, [members[2]] * 2)


def test_the_ensembles_of_different_run_seeds_share_no_member(monkeypatch):
    """The recipe trained members under seeds run_seed + i: run seeds 0 and 1 trained the same member (seed 2), so
    the rows averaged over run seeds, and their paired intervals, were not independent draws."""
    from pyro_lora.experiments.compare import fit_method
    from pyro_lora.experiments.setup import CompareConfig, Setup

    asked = {}

    def train(model, data, k, seeds, **kwargs):
        asked[setup.seed] = seeds
        return EnsembleGuide(model, [model.adapter_values()] * k)
    monkeypatch.setattr("pyro_lora.guides.ensemble.train_ensemble", train)
    for seed in (0, 1, 2):
        setup = Setup(CompareConfig(out="unused", guides=("ensemble",), progress=False), tiny_bert(), None,
                      SequenceClassification(), [{"id": 0, "label": 0}], [], [], None, seed=seed)
        setup.for_method = lambda name, setup=setup: setup
        fit_method(setup, "ensemble")
    trained = [set(seeds[1:]) for seeds in asked.values()]  # member 0 is the run's MAP
    assert all(len(t) == 2 for t in trained) and not (trained[0] & trained[1] or trained[0] & trained[2] or trained[1] & trained[2])
    # a member's seed decides it: the old seeds trained one member twice (identical LoRA)
    model = LoraModel(tiny_bert(), SequenceClassification(), random="AB", num_data=48)
    a, b = (train_ensemble(model, toy_data(), k=2, seeds=[0, s], fit_kwargs={"epochs": 1, "lr": 1e-2}, include_current=True)
            for s in (5, 5))
    assert torch.equal(a.members()["query.lora_A"][1], b.members()["query.lora_A"][1])


def test_mc_dropout_of_a_run_seed_starts_from_no_other_run_seeds_initialisation(monkeypatch):
    """The recipe re-initialised under run_seed + 1, the seed run seed s + 1's MAP's LoRA starts from (prepare seeds
    torch with the run seed before add_lora): the two rows shared their A, and per-seed intervals assume independent
    draws."""
    from pyro_lora.experiments.compare import fit_method
    from pyro_lora.experiments.setup import CompareConfig, Setup

    asked = {}
    monkeypatch.setattr("pyro_lora.guides.mcdropout.reinitialize", lambda model, seed: asked.setdefault(setup.seed, seed))
    monkeypatch.setattr(Setup, "fit", lambda self, model, guide: None)
    for seed in (0, 1, 2):
        setup = Setup(CompareConfig(out="unused", guides=("mcdropout",), progress=False), tiny_bert(), None,
                      SequenceClassification(), [{"id": 0, "label": 0}], [], [], None, seed=seed)
        setup.for_method = lambda name, setup=setup: setup
        fit_method(setup, "mcdropout")
    assert len(asked) == 3 and not set(asked.values()) & set(range(100))  # no run seed's own, all distinct
    assert len(set(asked.values())) == 3


def test_ensemble_save_load_round_trip_with_heads(tmp_path):
    model = make()
    members = distinct_members(model, k=2)
    name = "base_model.model.classifier.modules_to_save.default.weight"
    bias = name.replace("weight", "bias")
    heads = [{name: torch.randn(2, 32), bias: torch.randn(2)} for _ in range(2)]
    guide = EnsembleGuide(model, [{n: v * 0.01 for n, v in m.items()} for m in members], heads)
    save_guide(guide, tmp_path / "ens")
    fresh = make()
    loaded = load_guide(tmp_path / "ens", fresh)
    assert loaded.config() == {"num_members": 2, "head_parameters": [bias, name]}
    torch.testing.assert_close(loaded.heads()[name], guide.heads()[name])
    torch.testing.assert_close(predict_ensemble(fresh, loaded, toy_data()).probs, predict_ensemble(model, guide, toy_data()).probs)


def two_members_with_heads(model):
    """An ensemble of two members, each with LoRA values and a head of its own far from the network's."""
    g = torch.Generator().manual_seed(3)
    members = [{n: 0.3 * torch.randn(s.shape, generator=g) for n, s in model.sites.items()} for _ in range(2)]
    heads = [{n: p.detach() + 2.0 * torch.randn(p.shape, generator=g) for n, p in model.named_point_parameters()}
             for _ in range(2)]
    return EnsembleGuide(model, members, heads)


def test_an_ensembles_heads_on_a_compiled_network_predict_as_eager_or_are_refused():
    """dynamo skips module hook guards: once a predict had compiled the network without hooks, predict_ensemble reused
    that graph and ran the network's head for every member (0.39 off in probability) without a word."""
    import torch._dynamo

    model = make()
    guide, data = two_members_with_heads(model), toy_data()
    slow = torch.stack([member_prediction(model, guide, data, k) for k in range(2)]).mean(0)  # eager, written in
    torch._dynamo.reset()
    model.net.compile(backend="eager")  # dynamo alone: its guards are what skip the hooks
    try:
        predict(model, MeanFieldGuide(model, b="normal"), data, num_samples=2)  # the S = 2 graph, without the hooks
        with pytest.raises(ValueError, match="per-member heads did not run in this forward.* torch.compile'd network"):
            predict_ensemble(model, guide, data)
        torch._dynamo.reset()  # a way out the refusal names
        torch.testing.assert_close(predict_ensemble(model, guide, data).probs, slow, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


def test_an_ensembles_heads_run_the_users_own_hooks_on_the_head():
    """The members' head hook replaced the head's output after a user's forward hook had run on it: a temperature
    dividing the head's output by 4, honoured by MAP and guide=None, was dropped by predict_ensemble (0.21 off)."""
    model = make()
    guide, data = two_members_with_heads(model), toy_data()
    head = dict(model.net.named_modules())["base_model.model.classifier.modules_to_save.default"]
    head.register_forward_hook(lambda module, args, output: output / 4.0)
    slow = torch.stack([member_prediction(model, guide, data, k) for k in range(2)])  # plain forwards: the hook runs
    prediction = predict_ensemble(model, guide, data, keep_samples=True)
    torch.testing.assert_close(prediction.sample_probs, slow, rtol=1e-5, atol=1e-6)


def test_ensemble_bad_input():
    model = make()
    with pytest.raises(ValueError, match="non-empty"):
        EnsembleGuide(model, [])
    with pytest.raises(ValueError, match="must be trained parameters of the model outside its sites .*LayerNorm.weight'\\] are not"):
        EnsembleGuide(model, num_members=2, head_parameters=["base_model.model.bert.embeddings.LayerNorm.weight"])
    with pytest.raises(ValueError, match="expects shape"):
        EnsembleGuide(model, [{n: torch.zeros(2) for n in model.sites}])
    values = model.adapter_values()
    # each was a raw AttributeError or TypeError: a dict's keys taken as members, a member's floats as tensors
    with pytest.raises(ValueError, match=r"^members must be a list of site-value dicts \(one per member\), got dict$"):
        EnsembleGuide(model, members=values)
    with pytest.raises(ValueError, match=r"^member 0 must be a dict of site name -> tensor, got list$"):
        EnsembleGuide(model, [list(values.values())])
    with pytest.raises(ValueError, match=r"^the value of site '.*' must be a tensor of shape \(2, 4, 32\), got float$"):
        EnsembleGuide(model, [{n: 0.0 for n in values}])
    with pytest.raises(ValueError, match=r"^heads must be a list of dicts of head parameter name -> tensor"):
        EnsembleGuide(model, [values], heads={"classifier.weight": torch.zeros(2, 32)})
    # a read-only mapping of head values was refused as no dict, where members may be any mapping
    from types import MappingProxyType
    head = {n: p.detach().clone() for n, p in model.named_point_parameters()}
    given, proxied = (EnsembleGuide(model, [values], heads=[h]) for h in (head, MappingProxyType(head)))
    assert given.head_parameters == proxied.head_parameters == sorted(head)
    assert all(torch.equal(getattr(given, f"head_{j}"), getattr(proxied, f"head_{j}")) for j in range(len(head)))
    with pytest.raises(ValueError, match="random='AB'"):
        train_ensemble(make(random="A"), toy_data(), k=2)


def peft_bert(**config):
    net = get_peft_model(tiny_bert_base(num_labels=2), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", **config))
    return LoraModel(net, SequenceClassification(), num_data=48)


@pytest.mark.parametrize("bias, message", [
    ("lora_only", r"the trainable parameters \[.*query.base_layer.bias.*\] are base weights \(peft's bias='all' or 'lora_only'"),
    # 'all' and a weight unfrozen by hand were refused as heads that are no nn.Linear, naming neither cause nor fix
    ("all", r"the trainable parameters \[.*LayerNorm.bias.*\] are base weights .*build the adapter with bias='none'"),
    ("by hand", r"the trainable parameters \[.*output.LayerNorm.weight'\] are base weights \(peft's bias='all' or "
                r"'lora_only', or unfrozen by hand\)"),
])
def test_a_new_member_never_redraws_pretrained_base_weights(bias, message):
    """peft's bias='lora_only' / 'all' trains base biases, whose owners are the pretrained base layers: re-initialising
    them re-drew the frozen pretrained weights (0.24 off, never restored). Refused before any training."""
    from pyro_lora.guides.ensemble import reinitialize

    model = peft_bert(bias="none" if bias == "by hand" else bias)
    if bias == "by hand":
        model.net.base_model.model.bert.encoder.layer[1].output.LayerNorm.weight.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    with pytest.raises(ValueError, match=message):
        reinitialize(model, seed=1)
    with pytest.raises(ValueError, match=message):
        train_ensemble(model, toy_data(), k=2, fit_kwargs={"epochs": 1})
    for n, p in model.net.named_parameters():
        assert torch.equal(p, before[n]), n


def test_a_new_member_restarts_a_pretrained_module_peft_copies_from_its_pretrained_values():
    """``modules_to_save=["pooler"]``: the pooler's trainable copy was re-drawn at random (0.21 off the pretrained
    pooler); it restarts from peft's copy source now, and only the fresh classifier is re-drawn."""
    from pyro_lora.guides.ensemble import reinitialize

    model = peft_bert(modules_to_save=["pooler"])
    pooler = model.net.base_model.model.bert.pooler
    classifier = model.net.base_model.model.classifier.modules_to_save["default"]
    with torch.no_grad():
        pooler.modules_to_save["default"].dense.weight.add_(0.5)  # as trained
    head = classifier.weight.detach().clone()
    reinitialize(model, seed=1)
    assert torch.equal(pooler.modules_to_save["default"].dense.weight, pooler.original_module.dense.weight)
    assert torch.equal(pooler.modules_to_save["default"].dense.bias, pooler.original_module.dense.bias)
    assert not torch.allclose(classifier.weight, head)


def test_a_new_member_draws_its_classifier_as_transformers_draws_a_new_head(tmp_path):
    """A loaded base's fresh classifier is N(0, initializer_range^2) with bias 0 (transformers' ``_init_weights``);
    members re-drew it with nn.Linear's Kaiming-uniform, 5x that std at hidden size 32 (0.10 against 0.02)."""
    from conftest import tiny_bert_base
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    from pyro_lora.guides.ensemble import reinitialize

    tiny_bert_base(num_labels=2).bert.save_pretrained(tmp_path)
    base = BertForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    net = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    model = LoraModel(net, SequenceClassification(), num_data=48)
    head = net.base_model.model.classifier.modules_to_save["default"]
    with torch.no_grad():
        head.bias.fill_(0.3)  # as trained
    reinitialize(model, seed=1)
    drawn = head.weight.detach().clone()
    assert 0.6 * base.config.initializer_range < drawn.std() < 1.4 * base.config.initializer_range
    assert torch.equal(head.bias, torch.zeros_like(head.bias))
    reinitialize(model, seed=1)
    assert torch.equal(head.weight, drawn)  # the member's seed decides it
    reinitialize(model, seed=2)
    assert not torch.equal(head.weight, drawn)


@pytest.mark.filterwarnings("ignore:LoRA on embedding layers")
@pytest.mark.parametrize("config, says", [
    ({"target_modules": ["query", "word_embeddings"]}, r"is the LoRA of an embedding .*leave the embedding out of target_modules"),
    ({"target_modules": ["query"], "trainable_token_indices": [7, 40]}, r"holds peft's trainable tokens \(trainable_token_indices\)"),
])
def test_an_ensemble_over_an_embedding_lora_or_trainable_tokens_is_refused_naming_it(config, says):
    """Both were refused as 'peft's lora_bias=True: B's bias', which neither adapter sets."""
    net = get_peft_model(tiny_bert_base(num_labels=2), LoraConfig(r=2, lora_alpha=4, task_type="SEQ_CLS", **config))
    model = LoraModel(net, SequenceClassification(), num_data=48)
    with pytest.raises(ValueError, match=says):
        train_ensemble(model, toy_data(), k=2, fit_kwargs={"epochs": 1})


def test_per_member_values_of_a_lora_layers_own_bias_are_refused():
    """peft's lora_bias=True: B's bias is added by the weight hand-off, not by lora_B's forward, where the member hook
    sits: every member ran the network's one bias (0.098 in probability)."""
    model = peft_bert(lora_bias=True)
    name = next(n for n, _ in model.named_point_parameters() if "lora_B" in n and n.endswith("bias"))
    members = [model.adapter_values()] * 2
    with pytest.raises(ValueError, match=f"per-member point parameter '{re.escape(name)}' belongs to a LoRA layer"):
        EnsembleGuide(model, members, [{name: torch.zeros(32)}, {name: torch.ones(32)}])
    with pytest.raises(ValueError, match=r"every trainable LoRA parameter must be a site, and \[.*lora_B.default.bias.*lora_bias=True"):
        train_ensemble(model, toy_data(), k=2)


def sharp():
    """``make()`` with a sharper head than the random init's (whose near-uniform softmax hides the members)."""
    model = make()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if "classifier" in name and name.endswith("weight"):
                p.copy_(3 * torch.randn(p.shape, generator=g))
    return model


def perturbed_members(model, k=3, scale=0.5):
    g = torch.Generator().manual_seed(7)
    return [{n: v + scale * torch.randn(v.shape, generator=g) for n, v in model.adapter_values().items()} for _ in range(k)]


def test_an_ensemble_of_repeated_seeds_is_refused_before_any_training():
    """seeds=[5, 5, 5] trained three copies of one network (mutual information 0) without a word."""
    model = LoraModel(tiny_bert(), SequenceClassification(), num_data=16)
    for seeds, current in (([5, 5, 5], False), ([0, 7, 7], True)):
        with pytest.raises(ValueError, match=r"seeds \[(5, 5, 5|7, 7)\] repeat a seed: members trained under one seed"):
            train_ensemble(model, toy_data(), k=3, seeds=seeds, include_current=current)
    # torch.manual_seed reads 3.5 and "3" as 3 and -1 as 2**64 - 1: distinct in Python, one member twice in torch
    for seeds, says in (([3, 3.5], "got 3.5"), ([3, "3"], "got '3'"), ([torch.tensor(3.0), 4], "got tensor"),
                        ([-1, 2**64 - 1], "got -1"), ([0, 2**64], "below 2\\*\\*64")):
        with pytest.raises(ValueError, match=f"each seed must be .*{says}"):
            train_ensemble(model, toy_data(), k=2, seeds=seeds)
    train_ensemble(model, toy_data(), k=2, seeds=[3, np.int64(4)], fit_kwargs={"epochs": 1, "lr": 1e-2, "progress": False})


def test_an_ensemble_members_data_order_follows_its_seed_not_its_position_and_the_loader_is_put_back():
    """make_loader's loader holds its own generator: the member of seed 7 trained on another order in seeds [7, 8]
    than in [9, 7] (0.03 apart), and compare's first trained member replayed the MAP's order."""
    from pyro_lora.data import make_loader

    def collate(rows):
        return {"input_ids": torch.stack([r[0] for r in rows]), "attention_mask": torch.ones(len(rows), 6, dtype=torch.long),
                "labels": torch.stack([r[1] for r in rows])}

    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(1, 64, (6,), generator=g), torch.tensor(i % 3)) for i in range(24)]
    loader = make_loader(rows, collate, 4, shuffle=True, seed=0)
    model = LoraModel(tiny_bert(), SequenceClassification(), num_data=24)
    before = loader.generator.get_state()
    first, second = (train_ensemble(model, loader, k=2, seeds=seeds, fit_kwargs={"epochs": 2, "lr": 1e-2})
                     for seeds in ([7, 8], [9, 7]))
    assert torch.equal(loader.generator.get_state(), before)
    members = [{**guide.members(), **guide.heads()} for guide in (first, second)]
    for name, value in members[0].items():  # seed 7: first member of one, second of the other
        torch.testing.assert_close(members[1][name][1], value[0], rtol=0, atol=0)
    assert not torch.equal(members[0][name][0], members[1][name][0])


def test_a_seeded_data_order_gives_each_generator_its_own_draws_and_a_distributed_sampler_its_first_epoch():
    """Every generator the loader held got the same seed (a sampler's and a dataset's masking one drew alike), and a
    DistributedSampler kept the epoch it was left at (its order followed the loader's history)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from pyro_lora.training import data_order_seeded

    class Masked(torch.utils.data.Dataset):
        def __init__(self):
            self.generator = torch.Generator().manual_seed(1)

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.rand(3, generator=self.generator)

    dataset = Masked()
    loader = DataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2))
    with data_order_seeded(loader, 5):
        states = [g.get_state() for g in (loader.generator, dataset.generator)]
        assert not torch.equal(*states)  # the first found takes the seed itself, the other one derived from it
        assert sum(torch.equal(s, torch.Generator().manual_seed(5).get_state()) for s in states) == 1
    sampler = DistributedSampler(range(8), num_replicas=2, rank=0, seed=3)
    sampler.set_epoch(4)
    distributed = DataLoader(range(8), batch_size=2, sampler=sampler)
    with data_order_seeded(distributed, 7):
        assert (sampler.epoch, sampler.seed) == (0, 7)
    assert (sampler.epoch, sampler.seed) == (4, 3)


def test_an_ensemble_of_untrained_members_is_refused_before_any_training():
    """fit_kwargs epochs=0 or lr=0 left every member at its fresh initialisation (B = 0, a random head): predictions
    [0.5015, 0.4985] averaged without a word."""
    from pyro_lora.guides.ensemble import _fit_setting

    model = LoraModel(tiny_bert(), SequenceClassification(), num_data=16)
    for kwargs in ({"epochs": 0}, {"lr": 0.0}, {"epochs": 0, "lr": 0}, {"lr": np.float32(0)}):
        with pytest.raises(ValueError, match="untrained"):
            train_ensemble(model, toy_data(), k=2, fit_kwargs=kwargs)
    # compared across ranks by value, before the refusal: by type alone, 0 on one rank passed as 0.1 on another
    assert _fit_setting("lr", np.float32(0)) == 0.0 != _fit_setting("lr", torch.tensor(0.1))


@pytest.mark.parametrize("bad", [1, 2, 4, 5, 8])
def test_ensemble_refuses_a_number_of_samples_that_is_not_a_multiple_of_k(bad):
    """Draw s is member s mod K: any other S would weight the first S mod K members more (S=8, K=3: members 0
    and 1 get 3/8 each, member 2 only 2/8; S=1: member 0 alone), so every path refuses it."""
    model = sharp()
    guide = EnsembleGuide(model, perturbed_members(model))
    data = toy_data()
    with pytest.raises(ValueError, match=rf"num_samples={bad} would weight member.*use a multiple of K \(predict_ensemble uses S = K = 3\)"):
        guide.sample(bad)
    for chunk in (None, 2):
        with pytest.raises(ValueError, match="use a multiple of K"):
            predict(model, guide, data, num_samples=bad, chunk_size=chunk)
    with pytest.raises(ValueError, match="use a multiple of K"):
        predict_ensemble(model, guide, data, num_samples=bad)
    with pytest.raises(ValueError, match="use a multiple of K"), guide.member_heads(bad):
        pass


def test_ensemble_default_predict_is_refused_and_multiples_of_k_give_the_exact_mixture():
    model = sharp()
    guide = EnsembleGuide(model, perturbed_members(model))
    data = toy_data()
    exact = torch.stack([member_prediction(model, guide, data, k) for k in range(3)]).mean(0)  # 1/K sum_k p_k
    assert (torch.stack([member_prediction(model, guide, data, k) for k in range(3)]) - exact).abs().max() > 0.05
    with pytest.raises(ValueError, match="num_samples=8 .*use a multiple of K"):
        predict(model, guide, data)  # predict's default S = 8 is no multiple of K = 3
    torch.testing.assert_close(predict_ensemble(model, guide, data).probs, exact, rtol=1e-5, atol=1e-6)
    for num_samples, chunk in [(3, None), (6, None), (6, 4), (9, 2)]:
        pred = predict(model, guide, data, num_samples=num_samples, chunk_size=chunk)
        torch.testing.assert_close(pred.probs, exact, rtol=1e-5, atol=1e-6)


def test_ensemble_mean_is_no_predictor_and_export_adapter_refuses_it_as_predict_does(tmp_path):
    """predict(mean=True) would run the members' averaged weights, not the ensemble: refused. export_adapter wrote
    exactly that average as one adapter without a word (a causal LM's scored worse than every member), where the CLI
    refused it: refused too; the member its message says how to export is that member, as peft reloads it."""
    from pyro_lora import export_adapter
    from pyro_lora.guides import MAPGuide

    model = sharp()
    members = perturbed_members(model)
    guide = EnsembleGuide(model, members)
    with pytest.raises(ValueError, match=r"mean=True.*no predictor.*predict_ensemble"):
        predict(model, guide, toy_data(), mean=True)
    single = EnsembleGuide(model, members[:1])  # one member: its mean is that member, one forward
    torch.testing.assert_close(
        predict(model, single, toy_data(), mean=True).probs, member_prediction(model, single, toy_data(), 0), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match=r"cannot write a peft adapter of this EnsembleGuide: its mean\(\) averages "
                                         r"separately trained members' weights.*export a MAPGuide\(model\)"):
        export_adapter(guide, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    model.write_adapter({name: v[1] for name, v in guide.members().items()})
    export_adapter(MAPGuide(model), tmp_path / "adapter")
    for n, v in model.adapter_values().items():
        torch.testing.assert_close(v, members[1][n])


def test_an_ensemble_carrying_its_heads_is_no_longer_refused_after_the_network_head_is_retrained():
    """Its predictions never read the network's head (0.0 in probability), yet a later MAP fit refused them."""
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=0.5, num_data=48)
    ensemble = train_ensemble(model, toy_data(), k=2, fit_kwargs={"epochs": 1, "lr": 1e-2})
    assert ensemble.head_parameters
    before = predict_ensemble(model, ensemble, toy_data()).probs
    fit(model, MAPGuide(model), toy_data(), epochs=1, lr=5e-2, progress=False)
    torch.testing.assert_close(predict_ensemble(model, ensemble, toy_data()).probs, before)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_members_of_an_adapter_whose_init_rewrote_the_base_are_refused(init):
    """Kaiming A and B = 0 on a PiSSA adapter start a member at the residual base weights, another function than
    the pretrained model peft's init starts from (0.215 in probability): refused before any training."""
    from pyro_lora.guides.ensemble import reinitialize

    with pytest.warns(UserWarning, match="moved part of each base weight"):
        model = peft_bert(init_lora_weights=init)
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    message = f"adapter 'default' was initialised with init_lora_weights='{init}': a new member cannot start as it did"
    with pytest.raises(ValueError, match=message):
        train_ensemble(model, toy_data(), k=2, fit_kwargs={"epochs": 1})
    with pytest.raises(ValueError, match=message):
        reinitialize(model, seed=1)
    assert all(torch.equal(p, before[n]) for n, p in model.net.named_parameters())


def test_members_of_a_lora_ga_adapter_that_fell_back_start_from_peft_s_default_init():
    """Without preprocess_loraga peft's LoRA-GA is its default init (Kaiming A, B = 0, the base untouched): a new
    member was refused as if LoRA-GA had rewritten the base."""
    from pyro_lora.guides.ensemble import reinitialize

    model = peft_bert(init_lora_weights="lora_ga")
    reinitialize(model, seed=1)
    layer = next(iter(model.layers.values()))
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0 and torch.count_nonzero(layer.lora_A["default"].weight) > 0


@pytest.mark.parametrize("init", [False, "gaussian"])
def test_a_new_member_starts_from_its_adapters_own_init(init):
    from pyro_lora.guides.ensemble import reinitialize

    model = peft_bert(init_lora_weights=init)
    reinitialize(model, seed=1)
    layer = next(iter(model.layers.values()))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    if init == "gaussian":  # peft's: A ~ N(0, 1/r), B = 0
        assert torch.count_nonzero(b) == 0 and abs(a.std().item() - 1 / 4) < 0.05
    else:  # nn.Linear's own initialisation of both
        assert torch.count_nonzero(b) == b.numel() and a.abs().max() <= 1 / math.sqrt(a.shape[1])


def test_apply_temperature_refuses_what_is_no_probability_vector_or_temperature():
    """Logits were read as probabilities (0.634 where softmax(logits / 2) is 0.731), unnormalised rows renormalised,
    +inf gave nan and T = True was 1."""
    probs = torch.tensor([[0.7, 0.3]])
    for bad, match in ((torch.tensor([[2.0, 1.0]]), "pass softmax"), (torch.tensor([[0.3, 0.3]]), "summing to 1"),
                       (torch.tensor([[math.inf, 0.0]]), "non-finite"), (torch.tensor([[math.nan, 1.0]]), "non-finite"),
                       (torch.tensor([[1.2, -0.2]]), "non-negative"), (torch.zeros(0, 2), "shape")):
        with pytest.raises(ValueError, match=match):
            apply_temperature(bad, 2.0)
    # a [1] tensor or array is no temperature (a per-class vector of one class?): it was read as its element
    for t in (True, 0.0, -1.0, math.inf, math.nan, "2", torch.tensor([2.0]), np.array([2.0])):
        with pytest.raises(ValueError, match="temperature must be a finite positive number"):
            apply_temperature(probs, t)
    assert torch.equal(apply_temperature(probs, 1.0), probs.double())  # unchanged, not renormalised
    assert torch.equal(apply_temperature(probs.half(), torch.tensor(2.0)), apply_temperature(probs.half(), 2.0))


def test_scale_prediction_refuses_what_is_no_prediction_and_log_probs_of_another_shape():
    """A tensor raised a raw AttributeError; log_probs of another shape than probs (another predictive) were scaled
    into the copy's probs."""
    from pyro_lora import Prediction

    probs = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    with pytest.raises(ValueError, match="prediction must be a pyro_lora.Prediction .*use apply_temperature"):
        scale_prediction(probs, 2.0)
    with pytest.raises(ValueError, match=r"log_probs have shape \(2, 1\) where its probs have \(2, 2\)"):
        scale_prediction(Prediction(probs, None, log_probs=probs.log()[:, :1].double()), 2.0)
    with pytest.raises(ValueError, match="the prediction holds no probs"):
        scale_prediction(Prediction(None, None), 2.0)
    scaled = scale_prediction(Prediction(probs, None, log_probs=probs.log().double()), 2.0)
    assert torch.allclose(scaled.probs, (probs.double().log() / 2).softmax(-1))
    # log_probs as an array (a raw AttributeError at .double()) are read as metrics read them
    from_array = scale_prediction(Prediction(probs, None, log_probs=probs.log().double().numpy()), 2.0)
    assert torch.equal(from_array.probs, scaled.probs) and torch.equal(from_array.log_probs, scaled.log_probs)


def test_a_sharpening_temperature_keeps_the_confidence_order_and_says_when_float64_cannot():
    """Two classes: no temperature can reorder the confidences, so AURC and accuracy at coverage must not move. In
    float32 T = 0.05 rounded 1 - p below 6e-8 to exactly 1 and tied right and wrong examples (AURC 0.172 against
    0.106)."""
    from pyro_lora.metrics import accuracy_at_coverage, aurc

    gen = torch.Generator().manual_seed(0)
    margin = torch.randn(400, generator=gen, dtype=torch.float64) * 0.2  # log-odds 2m up to 1.2: 24 nats at T = 0.05
    probs = torch.stack([margin, -margin], -1).softmax(-1).float()
    labels = (torch.rand(400, generator=gen) < torch.sigmoid(-2 * margin.float())).long()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sharp = apply_temperature(probs, 0.05)
    assert aurc(sharp, labels) == pytest.approx(aurc(probs, labels), abs=1e-12)
    assert accuracy_at_coverage(sharp, labels, 0.5) == pytest.approx(accuracy_at_coverage(probs, labels, 0.5), abs=1e-12)
    assert float(sharp.max()) < 1
    # log-odds of 4.6 and 5.3 at T = 0.005 are over 900 nats: float64 flushes the small entries, which hold the
    # ranking, to 0 (at T = 0.05 their 1e-40 still ranked them), and says so
    wide = torch.tensor([[0.5, 0.5], [0.99, 0.01], [0.995, 0.005]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_temperature(wide, 0.05)
    with pytest.warns(UserWarning, match=r"T = 0.005 sharpens 2 of 3 rows to one-hot even in float64 .*: they tie"):
        apply_temperature(wide, 0.005)


def _ensemble_with_heads(k):
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), random="AB", num_data=48)
    return model, train_ensemble(model, toy_data(), k=k, seeds=list(range(k)), fit_kwargs={"epochs": 2, "lr": 3e-2})


def test_members_heads_never_give_way_to_a_networks_own_head(tmp_path):
    """Three paths ran the network's (untrained) head instead of the members': predict inside member_heads on a model over
    another network (0.225 off in probability), plain predict of a one-member ensemble (taken as deterministic, its
    mean()), and export_adapter (the network's head beside the members' LoRA)."""
    from pyro_lora import export_adapter

    model, ensemble = _ensemble_with_heads(2)
    other = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), random="AB", num_data=48)
    with ensemble.member_heads(2), pytest.raises(ValueError, match="carries its own .*predict with guide.model"):
        predict(other, ensemble, toy_data(), num_samples=2)
    with pytest.raises(ValueError, match="carries its own .*export a MAPGuide"):
        export_adapter(ensemble, tmp_path / "a")
    model, single = _ensemble_with_heads(1)
    with pytest.raises(ValueError, match=r"draw its samples inside guide.member_heads\(8\)"):
        predict(model, single, toy_data())
    with single.member_heads(1):
        inside = predict(model, single, toy_data(), num_samples=1).probs
    torch.testing.assert_close(inside, predict_ensemble(model, single, toy_data()).probs)
    net_head = predict(model, MAPGuide(model, init=single.mean()), toy_data()).probs
    assert (inside - net_head).abs().max() > 0.05  # the member's head, not the network's


def test_an_ensemble_refuses_to_leave_its_fresh_heads_untrained():
    """fit_kwargs train_network=False trained each member's LoRA beside a freshly drawn head that stayed random."""
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), random="AB", num_data=48)
    with pytest.raises(ValueError, match="train_network=False with a head to train"):
        train_ensemble(model, toy_data(), k=2, fit_kwargs={"train_network": False})


@pytest.mark.parametrize("kwargs", [{"checkpoint_dir": "ckpt"}, {"checkpoint_dir": "ckpt", "checkpoint_every": 2},
                                    {"checkpoint_dir": "ckpt", "resume": True}])
def test_an_ensemble_refuses_checkpointing_fit_kwargs_before_any_training(tmp_path, kwargs):
    """Every member's fit wrote the one checkpoint_dir: a 3-member run left only the last member's checkpoint, and a
    resume after a failure in member 1 finished member 1's run as member 0."""
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), random="AB", num_data=48)
    before = copy.deepcopy(model.net.state_dict())
    kwargs = {**kwargs, "checkpoint_dir": str(tmp_path / kwargs["checkpoint_dir"])}
    with pytest.raises(ValueError, match="train_ensemble does not checkpoint its members"):
        train_ensemble(model, toy_data(), k=2, fit_kwargs=kwargs)
    assert not (tmp_path / "ckpt").exists()
    assert all(torch.equal(v, before[k]) for k, v in model.net.state_dict().items())


def test_an_ensemble_refuses_fit_kwargs_fit_does_not_take_before_resetting_the_adapter():
    """fit_kwargs=[1] raised a raw TypeError; a misspelt key raised fit's TypeError after the first member's adapter was
    re-initialised, leaving the network's trained LoRA reset."""
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), random="AB", num_data=48)
    before = copy.deepcopy(model.net.state_dict())
    with pytest.raises(ValueError, match=r"seeds must be a list of k integers .*got dict"):  # its keys were the seeds
        train_ensemble(model, toy_data(), k=2, seeds={5: "x", 6: "y"})
    for bad, match in (([1], "fit_kwargs must be a dict of pyro_lora.fit's keyword arguments, got list"),
                       ("epochs=1", "must be a dict"), ({"epochs": 1, "epoch": 2}, r"fit_kwargs \['epoch'\] are no keyword"),
                       ({"data": toy_data()}, r"fit_kwargs \['data'\] are no keyword")):
        with pytest.raises(ValueError, match=match):
            train_ensemble(model, toy_data(), k=2, fit_kwargs=bad)
        assert all(torch.equal(v, before[k]) for k, v in model.net.state_dict().items())


def test_temperature_scaling_reads_lists_as_float64_integer_rows_and_refuses_a_bad_temperature():
    """A list of Python floats was read as float32 (1e-50 became 0: T 9.09 where 9.92 is right); one-hot integer rows
    failed in torch.finfo; temperature_nll took T = -1 (the NLL of inverted predictions)."""
    gen = torch.Generator().manual_seed(0)
    logits = 8 * torch.randn(40, 3, generator=gen, dtype=torch.float64)
    logits[0] = torch.tensor([120.0, 0.0, 0.0], dtype=torch.float64)  # a probability of about 1e-52
    labels = torch.randint(0, 3, (40,), generator=gen)
    labels[0] = 1
    probs = logits.softmax(-1)
    exact = fit_temperature(logits, labels)
    assert fit_temperature(probs.tolist(), labels) == pytest.approx(exact, rel=1e-3)
    assert apply_temperature([[1 - 1e-50, 1e-50]], 10.0)[0, 1].item() == pytest.approx(1e-5, rel=0.02)
    with pytest.warns(UserWarning, match="saturated"):
        assert fit_temperature(torch.tensor([[1, 0], [0, 1], [1, 0]]), torch.tensor([0, 1, 1])) == \
            fit_temperature(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64), torch.tensor([0, 1, 1]))
    for bad in (-1.0, 0.0, math.nan, True):
        with pytest.raises(ValueError, match="temperature must be a finite positive number"):
            temperature_nll(probs.log(), labels, bad)


def test_heads_that_leave_out_a_trained_point_parameter_are_refused():
    """peft's modules_to_save=["pooler"] trains the pooler beside the classifier: heads= holding the classifier only was
    taken, and every member ran the last fit's pooler (member 0's probabilities 0.77 off its own network's). With
    random="A" the B matrices are point parameters too: heads= of the classifier paired every member with the last B."""
    torch.manual_seed(0)
    net = get_peft_model(tiny_bert_base(), LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS",
                                                      modules_to_save=["pooler"]))
    model, data = LoraModel(net, SequenceClassification(), random="AB", num_data=16), toy_data()
    point = dict(model.named_point_parameters())
    assert any("pooler" in n for n in point) and any("classifier" in n for n in point)
    members, heads, own = [], [], []
    for seed in (0, 1):
        reinitialize(model, seed)
        guide = MAPGuide(model)
        fit(model, guide, data, epochs=2, lr=1e-1, progress=False)
        members.append({n: v.detach().clone() for n, v in guide.mean().items()})
        heads.append({n: p.detach().clone() for n, p in point.items()})
        model.write_adapter(guide.mean())
        with torch.no_grad():  # each member's own network, as it was trained
            own.append(torch.softmax(net.eval()(input_ids=data[0]["input_ids"], attention_mask=data[0]["attention_mask"]).logits, -1))
    classifier = [{n: v for n, v in h.items() if "classifier" in n} for h in heads]
    with pytest.raises(ValueError, match=r"the heads hold .*classifier.* but not the model's other trained point "
                                         r"parameters \[.*pooler.*\]: every member would run the network's current"):
        EnsembleGuide(model, members, classifier)
    ensemble = EnsembleGuide(model, members, heads)  # every point parameter per member: each member's own network
    prediction = predict_ensemble(model, ensemble, data[:1], keep_samples=True)
    torch.testing.assert_close(prediction.sample_probs, torch.stack(own))

    only_a = LoraModel(tiny_bert(), SequenceClassification(), random="A", num_data=16)
    b_and_head = [n for n, _ in only_a.named_point_parameters()]
    head = [n for n in b_and_head if "lora_B" not in n]
    values = {n: s.loc.detach().clone() if hasattr(s, "loc") else torch.zeros(s.shape) for n, s in only_a.sites.items()}
    params = dict(only_a.net.named_parameters())
    with pytest.raises(ValueError, match=r"not the model's other trained point parameters \[.*lora_B.*random='AB'"):
        EnsembleGuide(only_a, [values] * 2, [{n: params[n].detach().clone() for n in head}] * 2)
    with pytest.raises(ValueError, match=r"lora_B.* is a LoRA matrix left out of the sites, .*random='AB'"):  # not 'B's bias'
        EnsembleGuide(only_a, [values] * 2, [{n: params[n].detach().clone() for n in b_and_head}] * 2)


def test_an_ensemble_over_one_shot_data_is_refused_before_any_training():
    """A generator of batches trained member 0 whole; member 1 then found it used up, blamed on 'a previous epoch'."""
    model = LoraModel(tiny_bert(), SequenceClassification(), num_data=16)
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    for k, current in ((2, False), (3, True)):
        with pytest.raises(ValueError, match=r"data is a one-shot iterator \(list_iterator\).*each of the 2 members trains on "
                                             "it; pass a list of batches or a DataLoader"):
            train_ensemble(model, iter(toy_data()), k=k, include_current=current, fit_kwargs={"epochs": 1, "progress": False})
    assert all(torch.equal(p, before[n]) for n, p in model.net.named_parameters())
    train_ensemble(model, iter(toy_data()), k=2, include_current=True, fit_kwargs={"epochs": 1, "progress": False})  # one trained


def test_probabilities_a_rounding_error_below_zero_are_refused_not_read_as_logits():
    """A float32 softmax whose last class is 1 minus the others holds entries of -1.2e-7 in rows summing to 1:
    kind='auto' read them as logits, and a calibrated set got T = 0.237 for the 1.037 of its clean rows."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(6 * torch.randn(3000, 3, generator=g), -1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    mended = probs.clone()
    mended[:, -1] = 1 - mended[:, :-1].sum(-1)
    assert bool((mended < 0).any()) and bool(((mended.double().sum(-1) - 1).abs() < 1e-6).all())
    for kind in ("auto", "probs"):
        with pytest.raises(ValueError, match=r"negative entries are rounding error \(a probability computed as 1 minus "
                                             r"the others\?\): clamp them at 0 and renormalise"):
            fit_temperature(mended, labels, kind=kind)
    # read as logits by request: T = 0.27, and apply_temperature's rows of another shape
    for run in (lambda: fit_temperature(mended, labels, kind="logits"), lambda: apply_temperature(mended, 2.0, kind="logits")):
        with pytest.raises(ValueError, match=r"kind='logits' but every row is a probability vector \(entries in \[0, 1\] "
                                             "up to rounding"):
            run()
    clean = mended.clamp(min=0)
    assert fit_temperature(clean / clean.sum(-1, keepdim=True), labels) == pytest.approx(fit_temperature(probs, labels), rel=1e-3)
    assert 0.9 < fit_temperature(probs, labels) < 1.15
