"""The comparison's bookkeeping: seeds summary, scores, OOD AUROC, npz outputs, letter mapping across sets."""

import json
import re
import warnings
from dataclasses import replace
import math

import numpy as np
import pytest
import torch

from pyro_lora import metrics as M
from pyro_lora.experiments.scoring import ood_auroc, prediction_arrays, score
from pyro_lora.experiments.setup import CompareConfig, Setup
from pyro_lora.experiments.table import format_table
from pyro_lora.experiments.results import summarize_seeds
from pyro_lora.predictive import Prediction


def test_summarize_seeds_mean_std_and_round_trip(tmp_path):
    rows = [
        {"guide": "map", "dataset": "sst2", "seed": s, "accuracy": a, "ece": e}
        for s, a, e in [(0, 0.8, 5.0), (1, 0.9, 7.0), (2, 0.7, 3.0)]
    ] + [{"guide": "tfb", "dataset": "sst2", "seed": 0, "accuracy": 0.85, "ece": 2.0}]
    summary = summarize_seeds(rows)
    (map_row,) = [r for r in summary if r["guide"] == "map"]
    assert map_row["accuracy"] == pytest.approx(0.8) and map_row["accuracy_std"] == pytest.approx(0.1)
    assert map_row["ece"] == pytest.approx(5.0) and map_row["ece_std"] == pytest.approx(2.0)
    assert map_row["seeds"] == [0, 1, 2]
    (tfb_row,) = [r for r in summary if r["guide"] == "tfb"]
    assert tfb_row["accuracy_std"] == 0.0
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"summary": summary, "per_seed": rows}))
    back = json.loads(path.read_text())
    assert back["summary"] == summary and back["per_seed"] == rows
    # a rerun's rows joined to the first run's: averaged as a fourth seed (accuracy 0.825) before, refused now
    with pytest.raises(ValueError, match=r"the rows hold the row of \('map', 'sst2', 1\) twice .*one row per method"):
        summarize_seeds(rows + [{**rows[1], "accuracy": 0.9}])


def _prediction(sample_probs, labels):
    sample_probs = torch.tensor(sample_probs, dtype=torch.float64)
    return Prediction(sample_probs.mean(0), torch.tensor(labels), sample_probs)


def test_score_and_ood_auroc():
    agree = _prediction([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]] * 3, [0, 1, 1])
    row = score(agree)
    assert row["mutual_information"] == 0.0  # identical samples carry no epistemic uncertainty
    assert row["accuracy"] == pytest.approx(2 / 3) and row["accuracy_at_50"] == 1.0
    # the shifted set is far more uncertain: entropy separates it perfectly, MI (zero for both) not at all
    shifted = _prediction([[[0.5, 0.5], [0.55, 0.45], [0.5, 0.5]]] * 3, [0, 1, 0])
    ood = ood_auroc(agree, shifted)
    assert ood["ood_auroc_entropy"] == 1.0 and ood["ood_auroc_mi"] == 0.5


def test_entropy_is_the_reported_predictives_and_mi_the_draws():
    """A GLM probit prediction keeps logit draws for the MI, but reports the probit probabilities, which are not the
    draws' mean: the entropy (and its OOD AUROC) is the reported predictive's."""
    draws = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], [[0.5, 0.5], [0.6, 0.4], [0.4, 0.6]]])
    probs = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.55, 0.45]])
    glm = Prediction(probs, torch.tensor([0, 1, 1]), sample_probs=draws)
    row = score(glm)
    assert row["entropy"] == pytest.approx(float(M.predictive_entropy(probs.unsqueeze(0)).mean()))
    assert row["mutual_information"] == pytest.approx(float(M.mutual_information(draws).mean()))
    arrays = prediction_arrays(glm, "sst2", 0)
    np.testing.assert_allclose(arrays["sst2__seed0__entropy"], M.predictive_entropy(probs.unsqueeze(0)).numpy())
    confident = Prediction(torch.tensor([[0.99, 0.01]] * 3), torch.tensor([0, 0, 0]), sample_probs=draws)
    ood = ood_auroc(confident, glm)  # by their draws' means the two sets would tie
    assert ood["ood_auroc_entropy"] == 1.0 and ood["ood_auroc_mi"] == 0.5


def test_mi_is_not_available_without_several_weight_samples():
    labels = [0, 1, 1]
    one = _prediction([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]], labels)  # S = 1 (--samples 1)
    none = Prediction(one.probs, one.labels)  # no per-sample probabilities (Laplace's GLM probit)
    shifted = _prediction([[[0.5, 0.5], [0.55, 0.45], [0.5, 0.5]]], [0, 1, 0])
    for prediction, reason in [(one, "--samples 1"), (none, "draws no weight samples")]:
        row = score(prediction)
        assert math.isnan(row["mutual_information"]) and reason in row["note"]  # was 0.0, silently
        assert row["entropy"] == pytest.approx(float(M.predictive_entropy(one.sample_probs).mean()))
        assert row["accuracy"] == pytest.approx(2 / 3)  # the rest is scored as before
        other = shifted if prediction.sample_probs is not None else Prediction(shifted.probs, shifted.labels)
        ood = ood_auroc(prediction, other)
        assert ood["ood_auroc_entropy"] == 1.0 and math.isnan(ood["ood_auroc_mi"])  # was 0.5 by construction
        arrays = prediction_arrays(prediction, "sst2", 0)
        assert np.isnan(arrays["sst2__seed0__mutual_information"]).all()
        # a point estimate (MAP, temperature scaling) has no epistemic uncertainty: MI exactly 0, no note
        point = score(prediction, point_estimate=True)
        assert point["mutual_information"] == 0.0 and "note" not in point
        assert ood_auroc(prediction, other, point_estimate=True)["ood_auroc_mi"] == 0.5
    two = _prediction([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], [[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]]], labels)
    row = score(two)
    assert row["mutual_information"] > 0 and "note" not in row  # two samples: computed
    assert not np.isnan(ood_auroc(two, _prediction([[[0.5, 0.5]] * 3] * 2, [0, 1, 0]))["ood_auroc_mi"])


def test_not_available_mi_through_summary_table_and_json(tmp_path):
    from pyro_lora.io import write_json

    MI_NO_SAMPLES_NOTE = "mutual information n/a: no weight samples"
    base = {"dataset": "sst2", "accuracy": 0.8, "ece": 3.0, "nll": 0.4, "brier": 0.3, "aurc": 0.1, "fit_seconds": 3.0,
            "predict_seconds_per_1000": 1.0, "fit_memory_mb": 100.0, "extra_parameters": 0}
    rows = [{"guide": "laplace", "seed": s, **base, "mutual_information": mi, "note": MI_NO_SAMPLES_NOTE} for s, mi in
            [(0, float("nan")), (1, None)]]  # None: a JSON null
    rows += [{"guide": "map", "seed": s, **base, "mutual_information": 0.0} for s in (0, 1)]
    rows += [{"guide": g, "seed": 0, **base, "dataset": "arc", "mutual_information": mi, "ood_auroc_entropy": 0.6,
              "ood_auroc_mi": mi} for g, mi in [("laplace", float("nan")), ("meanfield", 0.02)]]
    summary = summarize_seeds(rows)
    laplace = summary[0]
    assert math.isnan(laplace["mutual_information"]) and math.isnan(laplace["mutual_information_std"])
    assert laplace["note"] == f"seeds 0, 1: {MI_NO_SAMPLES_NOTE}"
    table = format_table(summary)
    line = [x for x in table.splitlines() if x.startswith("| laplace (note) | no validation data | sst2 |")][0]
    assert "| n/a |" in line and "nan" not in line and "0.800 ± 0.000" in line  # two seeds: their spread, 0, shown
    assert [x for x in table.splitlines() if x.startswith("| map | no validation data | sst2 |")][0].count("| 0.0000 ± 0.0000 |") == 1
    shift = [x for x in table.splitlines() if x.startswith("| laplace | no validation data | arc |")][0]
    assert shift.endswith("| 0.600 / n/a |")
    assert [x for x in table.splitlines() if x.startswith("| meanfield | no validation data | arc |")][0].endswith("| 0.600 / 0.020 |")
    assert f"Note (laplace on sst2): seeds 0, 1: {MI_NO_SAMPLES_NOTE}" in table
    write_json(tmp_path / "results.json", {"summary": summary, "per_seed": rows})
    back = json.loads((tmp_path / "results.json").read_text())
    assert back["summary"][0]["mutual_information"] is None and back["per_seed"][0]["mutual_information"] is None
    json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} is no standard JSON"))
    assert format_table(summarize_seeds(back["per_seed"])) == table  # merge_results re-summarises what it reads


def test_methods_report_mi_as_computed_zero_or_not_available():
    from types import SimpleNamespace

    from conftest import random_batch, tiny_bert

    from pyro_lora.guides import MAPGuide
    from pyro_lora import LoraModel, SequenceClassification
    from pyro_lora.experiments.compare import fit_method
    from pyro_lora.guides import Fitted

    def batches(seed):
        out = []
        for i in range(2):
            b = random_batch(batch=4, seq=6, seed=seed + i)
            b["labels"] = b["input_ids"][:, 0] % 3
            out.append(b)
        return out

    train, test = batches(0), batches(10)
    net = tiny_bert()
    trained = {n: p.detach().clone() for n, p in net.named_parameters()}

    class Batches(Setup):  # records are batches already: 2 of 4 examples
        def loader(self, records, shuffle=False):
            return records

        def lora_model(self, random="AB", **kwargs):
            return super().lora_model(random, num_data=8, **kwargs)

    def mi(name, samples):
        config = CompareConfig(samples=samples, epochs=1, lr=1e-3, progress=False)
        model = LoraModel(net, SequenceClassification(), random="AB", num_data=8)
        setup = Batches(config, net, None, model.likelihood, train, train, test, None, model=model, map_guide=MAPGuide(model),
                        trained_state=trained)
        fitted, _ = fit_method(setup, name)
        row = score(fitted.predict(test), point_estimate=fitted.point_estimate)
        return row["mutual_information"], row.get("note")

    assert mi("map", 1) == (0.0, None)  # a point estimate: exactly 0
    value, note = mi("laplace", 8)  # the GLM probit predictive keeps logit draws of its Gaussian for the MI
    assert value > 0 and note is None
    value, note = mi("meanfield", 1)
    assert math.isnan(value) and "--samples 1" in note
    value, note = mi("meanfield", 3)
    assert value > 0 and note is None
    assert Fitted(None).point_estimate is False and Fitted(None, SimpleNamespace(deterministic=True)).point_estimate is True


def test_the_rows_of_a_set_whose_records_repeat_others_carry_it_as_a_note():
    """Test records repeating training ones, or a shifted set repeating the test set, were said in a warning alone:
    no row, no results.json, no resume and no study report knew (OpenBookQA's test set repeats 5 training questions)."""
    from types import SimpleNamespace

    from pyro_lora.experiments.compare import _score_rows, validation_note, with_split_note

    notes = {"toy": "2 of the 5 test records repeat", "shift": "1 of the 2 records of 'shift' repeat a test record",
             "validation": "1 of the 2 validation records repeat"}
    setup = SimpleNamespace(config=SimpleNamespace(dataset="toy"), seed=0, val=[{}] * 200, split_notes=notes)
    p = Prediction(torch.tensor([[0.7, 0.3], [0.2, 0.8]]), torch.tensor([0, 1]))
    rows, _, _ = _score_rows(setup, "map", "no validation data", True, {"toy": p, "shift": p}, {"note": "its fit's"},
                             {"toy": {}, "shift": {}}, None)
    assert [r["note"] for r in rows] == ["its fit's; 2 of the 5 test records repeat",
                                         "its fit's; 1 of the 2 records of 'shift' repeat a test record"]
    assert validation_note(setup) == "1 of the 2 validation records repeat"  # the rows fitted on that split
    # fit's, bayesianize's and evaluate's rows are built apart from compare's: the same note
    assert with_split_note({"dataset": "toy", "note": "a search note"}, setup)["note"] == (
        "a search note; 2 of the 5 test records repeat")
    assert "note" not in with_split_note({"dataset": "other"}, setup)
    assert validation_note(SimpleNamespace(val=[{}] * 200, split_notes={})) is None


def test_format_table_shows_mean_and_std():
    row = {"guide": "map", "dataset": "sst2", "accuracy": 0.8, "accuracy_std": 0.05, "ece": 3.0, "nll": 0.4, "brier": 0.3,
           "mutual_information": 0.0, "aurc": 0.1, "fit_seconds": 3.0, "predict_seconds_per_1000": 1.0,
           "fit_memory_mb": 100.0, "extra_parameters": 0}
    table = format_table([row])
    assert "0.800 ± 0.050" in table and "| map | no validation data | sst2 |" in table  # the method's setting
    # a shifted set's OOD AUROCs over two seeds showed their means alone, 0.534 / 0.500, where every other cell has its std
    shifted = {**row, "dataset": "shift", "seeds": [0, 1], "ood_auroc_entropy": 0.534, "ood_auroc_entropy_std": 0.333,
               "ood_auroc_mi": 0.5, "ood_auroc_mi_std": 0.0}
    assert format_table([shifted]).splitlines()[-1].endswith("| 0.534 ± 0.333 / 0.500 ± 0.000 |")


@pytest.mark.real
def test_npz_reproduces_the_table_and_is_written_atomically(tmp_path, monkeypatch):
    from pyro_lora.experiments.compare import run_compare

    from pyro_lora.experiments import results as R

    config = CompareConfig(guides=("map",), train_size=64, test_size=32, epochs=1, seeds=(0, 1), out=str(tmp_path), progress=False)
    grids, draw = [], R.reliability_grid
    monkeypatch.setattr(R, "reliability_grid", lambda *a, **k: grids.append(a) or draw(*a, **k))
    run_compare(config)
    assert len(grids) == 1  # the summary figures once per run, not at each (guide, seed): O(methods^2) panels
    results = json.loads((tmp_path / "results.json").read_text())
    arrays = np.load(tmp_path / "predictions_map.npz")
    for row in results["per_seed"]:
        key = f"sst2__seed{row['seed']}__"
        probs, labels = arrays[key + "probs"], arrays[key + "labels"]
        assert M.ece(probs, labels) * 100 == pytest.approx(row["ece"], abs=1e-6)
        assert M.nll(probs, labels) == pytest.approx(row["nll"], abs=1e-6)
        assert M.accuracy(probs, labels) == pytest.approx(row["accuracy"])
    assert {r["seed"] for r in results["per_seed"]} == {0, 1}
    for png in ("reliability_grid.png", "calibration_vs_accuracy.png", "reliability_map.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    finished = (tmp_path / "predictions_map.npz").read_bytes()

    def dies_mid_write(file, **arrays):
        file.write(b"PK\x03\x04 half an npz")
        raise KeyboardInterrupt  # a kill while rerunning over the finished run

    monkeypatch.setattr("pyro_lora.experiments.results.np.savez_compressed", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):  # resumed: seed 2's arrays are added to the guide's npz
        run_compare(replace(config, seeds=(0, 1, 2)))
    assert (tmp_path / "predictions_map.npz").read_bytes() == finished
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".lock"]  # no temporary file left


@pytest.mark.real
def test_letter_format_covers_the_widest_shifted_set():
    from pyro_lora.experiments.setup import prepare

    config = CompareConfig(model="smollm2", dataset="openbookqa", eval_datasets=("arc_easy",), mc_format="letter",
                           train_size=16, test_size=3000, progress=False)
    setup = prepare(config)
    assert max(len(r["choices"]) for r in setup.test) == 4
    five = [r for r in setup.shifted["arc_easy"] if len(r["choices"]) == 5][:1]
    three = [r for r in setup.shifted["arc_easy"] if len(r["choices"]) == 3][:1]
    assert len(setup.likelihood.answer_token_ids) == 5
    from pyro_lora import LoraModel

    model = LoraModel(setup.net, setup.likelihood)
    batch = setup.collator(five + three)
    logits = model.logits(batch)
    assert torch.isfinite(logits[0]).all()  # E is a real option of the 5-choice question
    assert torch.isfinite(logits[1, :3]).all() and torch.isinf(logits[1, 3:]).all()
    letters = setup.tokenizer.convert_ids_to_tokens(setup.likelihood.answer_token_ids.tolist())
    assert [t.strip("Ġ ") for t in letters] == list("ABCDE")


@pytest.mark.real
def test_letter_format_covers_a_validation_question_wider_than_the_others(monkeypatch):
    """The letters counted the training, test and shifted records only: a 5-choice question drawn into the validation
    split alone failed every validation-fitted row (temperature, +ts, _val) after the MAP was trained, on every rerun."""
    from pyro_lora.experiments import setup as setup_module

    config = CompareConfig(model="smollm2", dataset="openbookqa", mc_format="letter", train_size=16, test_size=8,
                           progress=False)
    train, val, test, shifted = setup_module.load_splits(config)
    wide = {**val[0], "choices": [*val[0]["choices"], "none of these"][:5]}
    assert len(wide["choices"]) == 5 and max(len(r["choices"]) for r in [*train, *test]) == 4
    monkeypatch.setattr(setup_module, "load_splits", lambda config: (train, [wide, *val[1:]], test, shifted))
    setup = setup_module.prepare(config)
    assert len(setup.likelihood.answer_token_ids) == 5


def test_std_step_is_sized_to_the_run_length():
    class Batches(Setup):  # records are batches already
        def loader(self, records, shuffle=False):
            return records

    def setup(steps_per_epoch, epochs, lr):
        return Batches(CompareConfig(epochs=epochs, lr=lr), None, None, None, list(range(steps_per_epoch)), [], [], None)

    short = setup(6, 2, 1e-3).std_lr_scale()  # the study's 12 steps: log sigma may travel log(100) = 4.6
    assert short * 1e-3 * 12 == pytest.approx(np.log(100))
    assert setup(29, 8, 2e-3).std_lr_scale() == 10.0  # long runs keep the guides' default


def _fake_run(out, guides, nll, test_size=32, data=None, data_dir=None, base=None, model="minilm"):
    """A run directory as run_compare writes it: results.json, per-guide npz and reliability PNG (seed 0)."""
    from dataclasses import asdict

    from pyro_lora.experiments.setup import BASE_DIGEST_VERSION

    config = CompareConfig(guides=guides, test_size=test_size, seeds=(0,), out=str(out), data_dir=data_dir, model=model)
    rows = [{"guide": g, "dataset": "sst2", "seed": 0, "accuracy": 0.8, "ece": 5.0, "nll": nll, "brier": 0.3} for g in guides]
    out.mkdir()
    probs = torch.softmax(torch.randn(8, 2), -1).numpy()
    for g in guides:
        np.savez(out / f"predictions_{g}.npz", sst2__seed0__probs=probs, sst2__seed0__labels=np.arange(8) % 2)
        (out / f"reliability_{g}.png").write_bytes(f"{g} {nll}".encode())
    (out / "results.json").write_text(json.dumps({"config": asdict(config), "summary": summarize_seeds(rows), "per_seed": rows,
                                                  **({"data": data} if data else {}),
                                                  **({"base": base, "base_version": BASE_DIGEST_VERSION} if base else {})}))


@pytest.fixture
def made_up_scores(monkeypatch):
    """The runs of :func:`_fake_run` hold made-up scores beside arrays that are no full prediction: a merge would
    withhold every row as unchecked. What a merge does with rows is tested here; their check is test_resume's."""
    from pyro_lora.experiments import results

    monkeypatch.setattr(results, "check_scores", lambda *a, **k: [])


def test_merge_results_replaces_the_rerun_guides_only(tmp_path, made_up_scores):
    from pyro_lora.experiments.results import merge_results

    _fake_run(tmp_path / "run", ("map", "meanfield", "temperature"), nll=0.5)  # a run before predict_seeding
    run = json.loads((tmp_path / "run" / "results.json").read_text())  # whose meanfield+ts step failed: the rerun replaces it
    (tmp_path / "run" / "results.json").write_text(json.dumps(run | {"failed": [{"guide": "meanfield+ts", "seed": 0}]}))
    _fake_run(tmp_path / "update", ("meanfield", "flow"), nll=0.4)
    update = json.loads((tmp_path / "update" / "results.json").read_text())
    (tmp_path / "update" / "results.json").write_text(json.dumps(update | {"predict_seeding": {"meanfield": 2, "flow": 2}}))
    summary = merge_results(tmp_path / "run", tmp_path / "update")
    merged = json.loads((tmp_path / "run" / "results.json").read_text())
    # the rerun method's rows are all the rerun's: one draw for every set (it stayed the old run's, withholding them)
    assert merged["predict_seeding"] == {"map": 1, "temperature": 1, "meanfield": 2, "flow": 2}
    assert merged["config"]["guides"] == ["map", "meanfield", "temperature", "flow"]
    assert [(r["guide"], r["nll"]) for r in merged["per_seed"]] == [("map", 0.5), ("meanfield", 0.4), ("temperature", 0.5), ("flow", 0.4)]
    assert [r["guide"] for r in summary] == ["map", "meanfield", "temperature", "flow"] and merged["failed"] == []
    assert (tmp_path / "run" / "reliability_meanfield.png").read_bytes() == b"meanfield 0.4"
    assert (tmp_path / "run" / "reliability_map.png").read_bytes() == b"map 0.5"
    assert (tmp_path / "run" / "reliability_grid.png").read_bytes()[:4] == b"\x89PNG"
    _fake_run(tmp_path / "other", ("meanfield",), nll=0.4, test_size=64)
    with pytest.raises(ValueError, match="differ in test_size"):
        merge_results(tmp_path / "run", tmp_path / "other")


def test_a_merge_keeps_the_digest_of_the_records_its_rows_were_scored_on(tmp_path, made_up_scores):
    """A merge kept the run's digest whatever the rerun scored on: after `--update map` retrained every row on new
    records, the run claimed the old ones, and a later partial update on the old data was merged beside them."""
    from pyro_lora.experiments.results import merge_results

    _fake_run(tmp_path / "run", ("map", "meanfield"), nll=0.5, data="a" * 64, data_dir=str(tmp_path / "there"))
    _fake_run(tmp_path / "some", ("meanfield",), nll=0.4, data="b" * 64)
    with pytest.raises(ValueError, match="differ in data"):  # rows of two sets of records in one table
        merge_results(tmp_path / "run", tmp_path / "some")
    _fake_run(tmp_path / "moved", ("meanfield",), nll=0.4, data="a" * 64, data_dir=str(tmp_path / "elsewhere"))
    merge_results(tmp_path / "run", tmp_path / "moved")  # the same records in another folder: the same data
    assert json.loads((tmp_path / "run" / "results.json").read_text())["data"] == "a" * 64
    _fake_run(tmp_path / "bare", ("meanfield",), nll=0.4, data_dir=str(tmp_path / "else"))  # no digest, another folder
    with pytest.raises(ValueError, match=r"differ in data \(the rerun records no digest of its records\)"):
        merge_results(tmp_path / "run", tmp_path / "bare")
    _fake_run(tmp_path / "every", ("map", "meanfield"), nll=0.3, data="b" * 64, data_dir=str(tmp_path / "new"))  # every row
    merge_results(tmp_path / "run", tmp_path / "every")
    merged = json.loads((tmp_path / "run" / "results.json").read_text())
    assert merged["data"] == "b" * 64 and merged["config"]["data_dir"] == str(tmp_path / "new")  # the rerun's records


def test_a_merge_keeps_the_environments_of_the_rows_it_holds(tmp_path, made_up_scores):
    """A merge kept the run's environment: the rerun's rows, made with other code, claimed the old one, and a later
    resume in the rerun's environment was warned of as another's. Library versions that differ are said: the table
    compares methods run under both."""
    from pyro_lora.experiments.results import merge_results

    def environment(code, torch_version="2.0"):
        return {"code": code * 64, "torch": torch_version, "peft": "0.1"}

    def run(out, guides, *environments):
        _fake_run(out, guides, nll=0.5)
        record = json.loads((out / "results.json").read_text())
        (out / "results.json").write_text(json.dumps(record | {"environments": list(environments),
                                                               "environment": environments[-1]}))

    run(tmp_path / "run", ("map", "meanfield"), environment("a"), environment("b"))
    run(tmp_path / "update", ("meanfield",), environment("a"))  # the rerun in the first environment
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only the code differs: what an update is for
        merge_results(tmp_path / "run", tmp_path / "update")
    merged = json.loads((tmp_path / "run" / "results.json").read_text())
    assert merged["environments"] == [environment("b"), environment("a")] and merged["environment"] == environment("a")
    run(tmp_path / "libraries", ("meanfield",), environment("c", "2.1"))
    with pytest.warns(UserWarning, match=r"keeps rows made with other library versions than the rerun's \(torch 2\.0 there, "
                                         r"2\.1 in the rerun\): its table compares methods run under both"):
        merge_results(tmp_path / "run", tmp_path / "libraries")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["environment"] == environment("c", "2.1")
    run(tmp_path / "every", ("map", "meanfield"), environment("d"))  # no row of the run kept: its environments go
    merge_results(tmp_path / "run", tmp_path / "every")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["environments"] == [environment("d")]


def test_a_merge_keeps_the_digest_of_the_base_its_rows_were_scored_with(tmp_path, made_up_scores):
    """After `study --update map` retrained every row on checkpoint B, results.json still named A's digest: a later
    update on B was refused, one on A was merged beside B's rows."""
    from pyro_lora.experiments.results import merge_results

    _fake_run(tmp_path / "run", ("map", "meanfield"), nll=0.5, base="a" * 64, model=str(tmp_path / "A"))
    _fake_run(tmp_path / "other", ("meanfield",), nll=0.4, base="b" * 64, model=str(tmp_path / "A"))
    with pytest.raises(ValueError, match=r"differ in base \(the rerun ran on other base model weights\)"):
        merge_results(tmp_path / "run", tmp_path / "other")
    _fake_run(tmp_path / "moved", ("meanfield",), nll=0.4, base="a" * 64, model=str(tmp_path / "A2"))
    merge_results(tmp_path / "run", tmp_path / "moved")  # the same base in another folder: the same base
    _fake_run(tmp_path / "every", ("map", "meanfield"), nll=0.3, base="b" * 64, model=str(tmp_path / "B"))  # every row
    merge_results(tmp_path / "run", tmp_path / "every")
    merged = json.loads((tmp_path / "run" / "results.json").read_text())
    assert merged["base"] == "b" * 64 and merged["config"]["model"] == str(tmp_path / "B")  # the rerun's base
    _fake_run(tmp_path / "again", ("meanfield",), nll=0.2, base="a" * 64, model=str(tmp_path / "B"))
    with pytest.raises(ValueError, match="differ in base"):  # A's rows beside B's
        merge_results(tmp_path / "run", tmp_path / "again")


def test_a_rerun_of_every_method_without_the_map_is_checked_as_a_rerun_of_some(tmp_path, made_up_scores):
    """A run made without a map row, rerun on every one of its methods: taken as a retrained MAP's rerun, it was
    merged from other records and another base model beside the old run's MAPs, which the rerun started from."""
    from pyro_lora.experiments.results import merge_results

    _fake_run(tmp_path / "run", ("temperature", "tfb"), nll=0.5, data="a" * 64, base="c" * 64)
    _fake_run(tmp_path / "other", ("temperature", "tfb"), nll=0.4, data="b" * 64, base="d" * 64)
    with pytest.raises(ValueError, match=r"differ in data, base \(the rerun ran on other base model weights\)"):
        merge_results(tmp_path / "run", tmp_path / "other")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["data"] == "a" * 64


def test_an_infinite_score_is_na_in_the_table_as_nan_is():
    """json.loads takes a hand-edited -Infinity: the table printed it in bold as the best NLL, the verdict took it
    as n/a."""
    from pyro_lora.experiments.table import not_available

    assert not_available(float("-inf")) and not_available(float("inf")) and not_available(float("nan"))
    assert not not_available(0.0) and not not_available(3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its std is n/a as its mean, without a RuntimeWarning
        rows = summarize_seeds([{"guide": "a", "dataset": "sst2", "seed": s, "nll": v} for s, v in ((0, 0.5), (1, float("-inf")))])
    assert "n/a" in format_table(rows) and "inf" not in format_table(rows)  # the mean over an infinity is n/a


def test_a_saved_guide_is_scored_with_the_predictive_compare_reports():
    from types import SimpleNamespace

    from conftest import random_batch, tiny_bert

    from pyro_lora.guides import EnsembleGuide, LaplaceGuide, MAPGuide, predict_ensemble
    from pyro_lora.guides.ensemble import head_parameters
    from pyro_lora import LoraModel, SequenceClassification
    from pyro_lora.experiments.compare import predictor
    from pyro_lora.guides import get_method

    data = [random_batch(seed=s) | {"labels": torch.tensor([0, 2, 1])} for s in (1, 2)]
    model = LoraModel(tiny_bert(), SequenceClassification(), prior=0.5, num_data=6)
    setup = SimpleNamespace(model=model, loader=lambda records: records, config=SimpleNamespace(samples=4))
    laplace = LaplaceGuide(model, fisher="exact", rank=3).fit(data, progress=False)
    heads = [{n: p.detach() + k for n, p in model.net.named_parameters() if n in head_parameters(model)} for k in range(2)]
    ensemble = EnsembleGuide(model, [model.adapter_values()] * 2, heads)
    saved = {"laplace": laplace, "ensemble": ensemble, "map": MAPGuide(model)}
    predicted = {name: predictor(setup, get_method(name), guide)(data).probs for name, guide in saved.items()}
    torch.testing.assert_close(predicted["laplace"], laplace.predict_glm(data, link="probit").probs)
    torch.testing.assert_close(predicted["ensemble"], predict_ensemble(model, ensemble, data).probs)
    assert predicted["map"].shape == (6, 3)
    assert [get_method(name).predictive.__name__ for name in saved] == ["glm_probit", "ensemble_mixture", "weight_samples"]


def test_eval_datasets_naming_the_training_set_or_repeating_are_refused():
    from pyro_lora.experiments.setup import CompareConfig, check_config

    for sets in (("sst2",), ("boolq", "boolq")):
        with pytest.raises(ValueError, match="repeats a set or names the training set"):
            check_config(CompareConfig(dataset="sst2", eval_datasets=sets, train_size=40, test_size=10))


def test_eval_datasets_are_compared_by_the_folder_they_read(tmp_path, monkeypatch):
    """`--eval-datasets sst2/` (a shell completion's slash) passed the check: the test set was scored against itself
    as a "shift" (OOD AUROC 0.500), and `sst2_shift,sst2_shift/` gave two identical shift rows. A link to the
    training set's folder is that set too; the names a run records are normalised."""
    import shutil

    from pyro_lora.data import default_data_dir
    from pyro_lora.experiments import compare
    from pyro_lora.experiments.setup import CompareConfig, check_config

    data = tmp_path / "data"
    shutil.copytree(default_data_dir() / "sst2", data / "sst2")
    (data / "shift").mkdir()
    for name in ("meta.json", "test.jsonl"):
        shutil.copy(data / "sst2" / name, data / "shift" / name)
    (data / "alias").symlink_to(data / "sst2")
    config = CompareConfig(dataset="sst2", train_size=40, test_size=10, data_dir=str(data), out=str(tmp_path / "out"))
    for sets, named in ((("sst2/",), "the training set 'sst2'"), (("./sst2",), "the training set 'sst2'"),
                        (("alias",), "the training set 'sst2'"), (("shift", "shift/"), "'shift'")):
        with pytest.raises(ValueError, match=f"{re.escape(repr(sets[-1]))} reads the folder .* as {re.escape(named)} does"):
            check_config(replace(config, eval_datasets=sets))
    ran = []
    monkeypatch.setattr(compare, "_run_seeds", lambda config, overwrite, reference, flags: ran.append(config))
    compare.run_compare(replace(config, dataset="./sst2", eval_datasets=("shift/",), guides=("map",)))
    assert (ran[0].dataset, ran[0].eval_datasets) == ("sst2", ("shift",))


def test_a_row_without_fit_costs_shows_empty_cells_not_zeros():
    row = {"guide": "map", "dataset": "sst2", "accuracy": 0.5, "ece": 1.0, "nll": 0.7, "brier": 0.25, "mutual_information": 0.0,
           "aurc": 0.3, "predict_seconds_per_1000": 2.0, "extra_parameters": 0}
    line = format_table([row]).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    headers = [c.strip() for c in format_table([row]).splitlines()[0].strip("|").split("|")]
    assert cells[headers.index("fit s")] == "" and "0.0" not in cells[headers.index("fit s")]


def test_every_evaluation_set_is_scored_with_the_same_weight_samples(tmp_path):
    """Each set was predicted under a seed of its own, so with other weight samples: on a shifted set that repeats
    the test set, TFB's OOD AUROC was 0.91 (S = 4), the draws told apart, not the inputs. Resuming a run scored that
    way notes the rows it adds."""
    import shutil

    from pyro_lora.data import default_data_dir
    from pyro_lora.experiments.compare import run_compare

    data = tmp_path / "data"
    shutil.copytree(default_data_dir() / "sst2", data / "sst2")
    (data / "same").mkdir()
    for name in ("meta.json", "test.jsonl"):
        shutil.copy(data / "sst2" / name, data / "same" / name)
    config = CompareConfig(guides=("tfb",), train_size=40, test_size=24, epochs=1, samples=4, seeds=(0,), ts=False,
                           eval_datasets=("same",), data_dir=str(data), out=str(tmp_path / "out"), progress=False)
    run_compare(config)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (row,) = [r for r in results["per_seed"] if r["guide"] == "tfb" and r["dataset"] == "same"]
    assert row["ood_auroc_entropy"] == 0.5 and row["ood_auroc_mi"] == 0.5 and results["predict_seeding"] == {"tfb": 2}
    arrays = np.load(tmp_path / "out" / "predictions_tfb.npz")
    assert np.array_equal(arrays["sst2__seed0__probs"], arrays["same__seed0__probs"])
    # a run recorded before: the rows a resume adds say that the earlier ones drew each set apart
    (tmp_path / "out" / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "predict_seeding"}))
    with pytest.warns(UserWarning, match="tfb's rows of other seeds drew each evaluation set's weight samples apart"):
        run_compare(replace(config, seeds=(0, 1)))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["predict_seeding"] == {"tfb": 1}  # the method's rows mix the two: its OOD AUROC stays withheld
    notes = {(r["seed"], r["dataset"]): r.get("note") or "" for r in results["per_seed"] if r["guide"] == "tfb"}
    drawn = "drew each evaluation set's weight samples apart"
    assert drawn in notes[1, "same"] and drawn in notes[1, "sst2"] and drawn not in notes[0, "same"] + notes[0, "sst2"]
    # a shifted set that repeats the test set: its rows say so, every seed's (not a warning alone)
    assert all("24 of the 24 records of the shifted set 'same' repeat a test record of 'sst2'" in notes[s, "same"]
               for s in (0, 1))


def test_a_resume_under_other_label_names_is_refused_before_loading(tmp_path, monkeypatch):
    """A third name added to meta.json between seeds trained seed 1 a 3-class head, its NLL averaged with seed 0's
    2-class one without a word: the records' label indices were the same, so the data digest was too."""
    import shutil

    from pyro_lora.data import default_data_dir
    from pyro_lora.experiments import compare

    data = tmp_path / "data"
    shutil.copytree(default_data_dir() / "sst2", data / "sst2")
    _fake_run(tmp_path / "run", ("map",), nll=0.5, data_dir=str(data))
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    names = json.loads((data / "sst2" / "meta.json").read_text())["label_names"]
    (tmp_path / "run" / "results.json").write_text(json.dumps(record | {"labels": {"sst2": names}}))
    meta = json.loads((data / "sst2" / "meta.json").read_text())
    (data / "sst2" / "meta.json").write_text(json.dumps(meta | {"label_names": names + ["neutral"]}))
    monkeypatch.setattr(compare, "prepare", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    config = CompareConfig(guides=("map",), test_size=32, seeds=(0, 1), out=str(tmp_path / "run"), data_dir=str(data))
    with pytest.warns(UserWarning, match="keeps no digest of the data"), \
            pytest.raises(ValueError, match=r"holds rows scored under other label names .*'neutral'"):
        compare.run_compare(config)


def test_a_finished_run_is_not_shown_as_the_run_of_another_model(tmp_path):
    """A finished run's rows were shown, nothing loaded, for --model naming another checkpoint (its record keeps the
    base's digest, so the paths were not compared, and the digest was checked only once a seed had work to do)."""
    import shutil

    from conftest import bert_checkpoint, toy_run
    from pyro_lora.experiments.compare import run_compare

    config = toy_run(tmp_path, guides=("map",), ts=False)
    rows = run_compare(config)
    torch.manual_seed(1)  # other weights
    other = bert_checkpoint(tmp_path / "other")
    with pytest.raises(ValueError, match=r"another base model than --model .*other loads now"):
        run_compare(replace(config, model=other))
    moved = shutil.copytree(config.model, tmp_path / "moved")  # the same checkpoint elsewhere: the same run
    assert run_compare(replace(config, model=str(moved))) == rows


def test_a_checkpoint_replaced_at_the_same_path_is_not_shown_as_the_finished_run(tmp_path, capsys):
    """A finished run knew its base by the --model path alone: another checkpoint saved there since had compare show
    the old rows and fit reprint the old row, nothing loaded. The files' stamp (names, sizes, times) sends a rerun to
    the base's digest: a file touched gives the same rows, another checkpoint is refused."""
    import os
    from pathlib import Path

    from conftest import bert_checkpoint, toy_run
    from pyro_lora.experiments.compare import run_compare
    from pyro_lora.experiments.saved import fit_one

    config = toy_run(tmp_path, guides=("map",), ts=False)
    fitting = replace(config, out=str(tmp_path / "fit"))
    rows, row = run_compare(config), fit_one(fitting)
    os.utime(Path(config.model) / "config.json", ns=(1, 1))  # touched: the same checkpoint
    assert run_compare(config) == rows and fit_one(fitting) == row
    assert "holds this run already" in capsys.readouterr().out
    torch.manual_seed(1)
    bert_checkpoint(Path(config.model))  # another checkpoint at the same path
    with pytest.raises(ValueError, match=r"another base model than --model .*bert loads now"):
        run_compare(config)
    with pytest.raises(ValueError, match=r"holds this run, fitted and scored on another base model than --model .*bert "
                                         r"loads now .*another checkpoint at the same path.*pass --overwrite"):
        fit_one(fitting)
