"""Nothing finished is lost: a failing guide keeps the others, a rerun resumes, a folder of another run is kept."""

import hashlib
import json
import math
import re
import warnings
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from conftest import toy_run

from pyro_lora.experiments import cli
from pyro_lora.experiments import compare as C
from pyro_lora.experiments import saved as S
from pyro_lora.experiments.compare import run_compare
from pyro_lora.experiments.setup import CLOZE_SCORING, CompareConfig, prepare
from pyro_lora.guides.registry import METHODS
from pyro_lora.digests import bytes_sha256
from pyro_lora.io import FORMAT, _canonical, atomic_file, read_safetensors
from pyro_lora.experiments.results import ARRAYS, GuideFailures, RunFolder, check_scores, config_differences, merge_results
from pyro_lora.experiments.scoring import ood_auroc, prediction_arrays, score
from pyro_lora.experiments.study_header import unfinished_pairs
from pyro_lora.experiments.study_report import load_runs
from pyro_lora.locking import locked_elsewhere
from pyro_lora.predictive import Prediction

ROW = {"guide": "map", "dataset": "sst2", "seed": 0, "accuracy": 0.5, "ece": 5.0, "nll": 0.7}
METRICS = ("accuracy", "ece", "nll", "brier", "mutual_information", "aurc", "entropy")


def arrays(seed):
    """The npz arrays of one finished (guide, seed) on sst2."""
    key = f"sst2__seed{seed}__"
    return {key + "probs": np.full((2, 2), 0.5), key + "labels": np.arange(2), key + "entropy": np.ones(2), key + "mutual_information": np.zeros(2)}


def small(out, **kwargs):
    return CompareConfig(**{"train_size": 48, "test_size": 16, "epochs": 1, "out": str(out), "progress": False, **kwargs})


def test_a_folder_holding_another_configuration_is_refused_naming_the_difference(tmp_path):
    folder = RunFolder(tmp_path, small(tmp_path, guides=("map",)))
    folder.add("map", 0, [ROW], arrays(0))
    again = RunFolder(tmp_path, small(tmp_path, guides=("map", "tfb"), seeds=(0, 1)))  # more guides and seeds: resumed
    assert again.complete("map", 0, ["sst2"]) and not again.complete("map", 1, ["sst2"]) and not again.complete("tfb", 0, ["sst2"])
    with pytest.raises(ValueError, match=r"holds a run of another configuration \(test_size 16 there, 32 now\).*--overwrite"):
        RunFolder(tmp_path, small(tmp_path, test_size=32))
    (tmp_path / "notes.txt").write_text("the user's own file")
    replacing = RunFolder(tmp_path, small(tmp_path, test_size=32), overwrite=True)
    assert replacing.rows == []
    replacing.add("map", 0, [ROW], arrays(0))  # its first result: the replaced run's files only are gone
    assert "notes.txt" in [p.name for p in tmp_path.iterdir()]
    assert not (tmp_path / "predictions_tfb.npz").exists()
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not the results of a `pyro-lora compare` run"):
        RunFolder(tmp_path, small(tmp_path))


def test_rows_without_their_arrays_are_not_complete(tmp_path):
    folder = RunFolder(tmp_path, small(tmp_path, guides=("map",)))
    folder.add("map", 0, [ROW], arrays(0))
    (tmp_path / "predictions_map.npz").write_bytes(b"PK\x03\x04 half an npz")  # e.g. written by hand
    assert not RunFolder(tmp_path, small(tmp_path)).complete("map", 0, ["sst2"])


def test_a_resume_says_why_it_reruns_rows_the_record_holds(tmp_path):
    """Rows whose arrays were lost, or a method stopped between its sets' rows, were run again without a word."""
    config = small(tmp_path, guides=("map", "tfb"), eval_datasets=("other",), ts=False, seeds=(0, 1))
    folder = RunFolder(tmp_path, config)
    both = {**arrays(0), **{k.replace("sst2", "other"): v for k, v in arrays(0).items()}}
    folder.add("map", 0, [ROW, {**ROW, "dataset": "other"}], both)
    scoreless = {"guide": "tfb", "dataset": "sst2", "seed": 0}  # no score to contradict its arrays (ROW's do)
    prediction = {**arrays(0), "sst2__seed0__entropy": np.full(2, math.log(2))}  # arrays(0)'s entropy is no prediction's
    folder.add("tfb", 0, [scoreless], prediction)  # stopped before its row on "other"
    folder.add("tfb", 1, [{**ROW, "guide": "tfb", "seed": 1}], arrays(1))  # its arrays say otherwise, and none on "other"
    (tmp_path / "predictions_map.npz").unlink()
    again = RunFolder(tmp_path, config)
    left = again.unfinished(config.guides, config.seeds)
    again.check_scores(rerun=lambda r: (r["guide"], r["seed"]) in left)
    assert again.rerun_reasons(left) == {
        ("map", 0): "results.json holds rows of map without their arrays in predictions_map.npz (removed, damaged or "
                    "replaced since)",
        ("tfb", 0): "results.json lacks its rows of tfb on other (a run stopped between them?)",
        ("tfb", 1): "its arrays in its predictions npz do not give its rows in results.json (other scores, or no prediction)",
    }


def test_a_failed_seed_is_named_in_the_summary_and_the_error(tmp_path):
    folder = RunFolder(tmp_path, small(tmp_path, guides=("map",), seeds=(0, 1)))
    folder.add("map", 0, [ROW], arrays(0))
    folder.fail("map", 1, ValueError("loss became nan\nsecond line"))
    (row,) = folder.summary()
    assert row["seeds"] == [0] and row["accuracy"] == 0.5
    assert row["note"] == "failed under seed 1 (results.json 'failed'): mean over the others"
    with pytest.raises(GuideFailures, match=r"1 guide run\(s\) failed: map \(seed 1\): ValueError: loss became nan\. The 1 finished"):
        folder.raise_failures()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["failed"][0]["error"] == "ValueError: loss became nan" and "second line" in saved["failed"][0]["traceback"]
    # a later invocation asking for seed 0 only did all it was asked: the kept failure is warned about, not raised (every
    # run into the folder exited 2, telling the user to rerun "the same configuration", which never cleared it)
    later = RunFolder(tmp_path, small(tmp_path, guides=("map",), seeds=(0,)))
    with pytest.warns(UserWarning, match=r"keeps failed runs this invocation did not ask for: map \(seed 1\); add their "
                                         r"methods to --guides and their seeds to --seeds"):
        later.raise_failures()
    other = RunFolder(tmp_path, small(tmp_path, guides=("map", "tfb"), seeds=(0, 1)))
    with pytest.raises(GuideFailures, match=r"^1 guide run\(s\) failed: map \(seed 1\)"):
        other.raise_failures()


def test_a_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    dead = tmp_path / ".results.json.tmp-999999999-abc"  # no such process
    dead.write_text("half")
    alive = tmp_path / f".results.json.tmp-{__import__('os').getpid()}-abc"  # a writer still running
    alive.write_text("half")
    with atomic_file(tmp_path / "results.json") as f:
        f.write("{}")
    assert not dead.exists() and alive.exists()


@pytest.mark.real
def test_a_failing_guide_keeps_the_others_and_a_rerun_resumes_with_it(tmp_path, monkeypatch, capsys):
    reference = run_compare(small(tmp_path / "reference", guides=("map", "temperature")))

    def boom(setup):
        raise ValueError("the guide's loss became nan")

    monkeypatch.setitem(METHODS, "meanfield", replace(METHODS["meanfield"], recipe=boom))
    out = tmp_path / "run"
    argv = ["compare", "--guides", "map,meanfield,temperature", "--train-size", "48", "--test-size", "16", "--epochs", "1",
            "--out", str(out), "--quiet"]
    assert cli.main(argv) == 2
    printed = capsys.readouterr()
    assert "| map | no validation data | sst2 |" in printed.out and "| temperature (note) | validation-tuned | sst2 |" in printed.out  # the finished ones' table
    assert printed.err.strip().splitlines() == [
        "pyro-lora: warning: fitted on a validation split of 5 examples (fewer than 100: each weighs 20 accuracy points, "
        "more than the 1-point guard of the validation-tuned knobs; a larger --train-size or --val-fraction gives more)",
        f"pyro-lora: error: 1 guide run(s) failed: meanfield (seed 0): ValueError: the guide's loss became nan. The 2 finished "
        f"are in {out / 'results.json'} (tracebacks under 'failed'); the runs are seeded, so the same command fails them "
        "again unless their cause is fixed outside its flags (code, packages, memory), and then resumes with them (--debug "
        "shows where)"
    ]
    saved = json.loads((out / "results.json").read_text())
    assert [(f["guide"], f["seed"]) for f in saved["failed"]] == [("meanfield", 0)]
    assert saved["sizes"] == {"train": 43, "validation": 5, "test": 16}  # the sizes used: 48 carved into 43 + 5
    # the other guides' numbers are a full run's: each method runs under its own seed
    for row, expected in zip(saved["summary"], reference, strict=True):
        assert row["guide"] == expected["guide"]
        assert {k: row[k] for k in METRICS} == {k: expected[k] for k in METRICS}
    assert sorted(p.name for p in out.glob("predictions_*.npz")) == ["predictions_map.npz", "predictions_temperature.npz"]

    (out / "reliability_map.png").write_bytes(b"\x89PNG half a figure")  # damaged since: the rerun redraws it
    monkeypatch.undo()
    ran = []
    for name, method in list(METHODS.items()):
        recipe = lambda setup, name=name, recipe=method.recipe: ran.append(name) or recipe(setup)  # noqa: E731
        monkeypatch.setitem(METHODS, name, replace(method, recipe=recipe))
    assert cli.main(argv) == 0
    assert ran == ["meanfield"]
    assert "# seed 0: map, temperature already complete" in capsys.readouterr().out
    resumed = json.loads((out / "results.json").read_text())
    assert [r["guide"] for r in resumed["summary"]] == ["map", "meanfield", "meanfield+ts", "temperature"] and resumed["failed"] == []
    assert [r for r in resumed["per_seed"] if not r["guide"].startswith("meanfield")] == saved["per_seed"]  # kept as they were
    with np.load(out / "predictions_meanfield.npz") as arrays:
        assert arrays["sst2__seed0__probs"].shape == (16, 2)
    from matplotlib.image import imread

    assert imread(out / "reliability_map.png").ndim == 3


@pytest.mark.real
def test_a_failed_map_training_is_recorded_for_every_guide_of_the_seed(tmp_path, monkeypatch):
    def diverges(setup, load=None):
        raise FloatingPointError("loss became nan at step 3")

    monkeypatch.setattr(C, "train_map", diverges)
    with pytest.raises(GuideFailures) as failures:
        run_compare(small(tmp_path, guides=("map", "temperature")))
    assert failures.value.summary == []
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(f["guide"], f["error"]) for f in saved["failed"]] == [
        (g, "RuntimeError: training the MAP every guide starts from failed: FloatingPointError: loss became nan at step 3")
        for g in ("map", "temperature")
    ]


@pytest.mark.real
def test_a_failure_scoring_one_shifted_set_keeps_the_methods_other_rows_and_a_rerun_completes_it(tmp_path, monkeypatch):
    """An exception scoring one shifted set (an out-of-memory there) lost the method's every row, the test set's and
    the other shifted set's, scored already or not. Those rows are kept, the failure recorded for that set alone (the
    summary notes its rows only), and the same command scores the method again."""
    import shutil

    from pyro_lora.data import default_data_dir

    data = tmp_path / "data"
    shutil.copytree(default_data_dir() / "sst2", data / "sst2")
    for name, rows in (("shift_a", slice(0, 16)), ("shift_b", slice(16, 32))):
        (data / name).mkdir()
        shutil.copy(data / "sst2" / "meta.json", data / name / "meta.json")
        lines = (data / "sst2" / "train.jsonl").read_text().splitlines()[-40:][rows]  # records no split of sst2 holds
        (data / name / "test.jsonl").write_text("\n".join(lines) + "\n")
    config = small(tmp_path / "out", guides=("map",), train_size=48, eval_datasets=("shift_a", "shift_b"),
                   data_dir=str(data), ts=False)
    scored = C.evaluate

    def out_of_memory_on_a(setup, fitted, records, name, dataset):
        if dataset == "shift_a":
            raise RuntimeError("out of memory scoring shift_a")
        return scored(setup, fitted, records, name, dataset)

    monkeypatch.setattr(C, "evaluate", out_of_memory_on_a)
    with pytest.raises(GuideFailures) as failures:
        run_compare(config)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(r["dataset"] for r in saved["per_seed"]) == ["shift_b", "sst2"]
    assert [(f["guide"], f["dataset"], f["error"]) for f in saved["failed"]] == [
        ("map", "shift_a", "RuntimeError: out of memory scoring shift_a")]
    assert "1 guide run(s) failed: map (seed 0, on shift_a): RuntimeError: out of memory" in str(failures.value)
    assert "The 0 finished, and the rows of those that failed on one set only, are in" in str(failures.value)
    notes = {r["dataset"]: r.get("note") or "" for r in saved["summary"]}
    assert "failed under seed 0" not in notes["sst2"] + notes["shift_b"]
    monkeypatch.setattr(C, "evaluate", scored)
    run_compare(config)  # the same command: the method is scored again, its failure cleared
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(r["dataset"] for r in saved["per_seed"]) == ["shift_a", "shift_b", "sst2"] and saved["failed"] == []


@pytest.mark.real
def test_a_map_that_trained_but_could_not_be_saved_is_recorded_as_such(tmp_path, monkeypatch):
    """A full disk while the MAP's file was written was recorded as 'training the MAP ... failed', which it had not."""
    import errno

    from pyro_lora.experiments.results import RunFolder

    def full(self, setup, seconds):
        raise OSError(errno.ENOSPC, "No space left on device", "map_seed0.safetensors")

    monkeypatch.setattr(RunFolder, "save_map", full)
    with pytest.raises(GuideFailures):
        run_compare(small(tmp_path, guides=("map",)))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [f["error"] for f in saved["failed"]] == [
        "RuntimeError: saving the MAP every guide starts from failed: OSError: [Errno 28] No space left on device: "
        "'map_seed0.safetensors'"]


@pytest.mark.real
@pytest.mark.parametrize("guide, predictive", [("meanfield", "weight_samples"), ("laplace", "glm_probit")])
def test_evaluate_reproduces_the_fit_row_exactly_with_the_recorded_predictive(tmp_path, monkeypatch, guide, predictive):
    from pyro_lora.data import default_data_dir

    (tmp_path / "data").symlink_to(default_data_dir().resolve())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "fit"
    config = small(out, guides=(guide,), train_size=100, samples=4, data_dir="data")  # a relative datasets folder
    row = S.fit_one(config)
    run = json.loads((out / "guide" / "run.json").read_text())
    assert run["predictive"] == predictive and run["seed"] == 0
    assert run["sizes"] == {"train": 90, "validation": 10, "test": 16}
    assert run["config"]["data_dir"] == str((tmp_path / "data").resolve())  # absolute: found from any working directory
    monkeypatch.chdir("/")
    again = S.evaluate_saved(out, progress=False)
    assert again["test_examples"] == 16
    for key in METRICS:
        assert again[key] == row[key] or (np.isnan(again[key]) and np.isnan(row[key])), key
    if guide == "meanfield":
        assert row["mutual_information"] > 0  # weight samples that differ: the same seed, not a deterministic guide
    assert sorted(p.name for p in (out / "guide").iterdir()) == ["guide.json", "guide.safetensors", "run.json"]


@pytest.mark.real
def test_fit_writes_a_peft_adapter_that_bayesianize_takes(tmp_path, capfd):
    fit_out = tmp_path / "fit"
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every warning printed, as one line each by the command line
        assert cli.main(["fit", "--guide", "map", "--train-size", "24", "--test-size", "8", "--epochs", "1", "--adapter",
                         "--out", str(fit_out), "--quiet"]) == 0
    assert capfd.readouterr().err == ""  # --quiet: no bar, not even the model loading's, and no warning
    from peft import PeftModel

    from pyro_lora.pretrained import load_pretrained

    base, _ = load_pretrained("minilm", "classification", num_labels=2, progress=False)
    net = PeftModel.from_pretrained(base, fit_out / "guide" / "adapter")  # in the guide's unit: never stale
    saved = json.loads((fit_out / "guide" / "run.json").read_text())
    setup = prepare(CompareConfig(**{**saved["config"], "guides": ("map",)}), 0)
    with torch.no_grad():
        batch = setup.collator(setup.test)
        logits = net.eval()(**batch).logits
    assert (logits.argmax(-1) == batch["labels"]).float().mean().item() == pytest.approx(saved["result"]["accuracy"])
    tfb_out = tmp_path / "tfb"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["bayesianize", str(fit_out / "guide" / "adapter"), "--train-size", "24", "--test-size", "8",
                         "--anchors", "16", "--iterations", "2", "--samples", "4", "--high", "0.015", "--out", str(tfb_out),
                         "--quiet"]) == 0
    err = capfd.readouterr().err.splitlines()  # ours, one line each: 16 anchors are too few for a 1% flip rate
    assert len(err) == 2 and err[0].startswith("pyro-lora: warning: TFB search: only 16 anchors: a flip rate tolerance")
    assert err[1].startswith("pyro-lora: warning: TFB search: high=0.015 is already feasible")
    record = json.loads((tfb_out / "guide" / "run.json").read_text())
    assert record["adapter"] == "adapter"  # a copy inside the unit: the output can be shared on its own
    with pytest.raises(ValueError, match="--samples changes nothing here: .* holds a MAPGuide, a point estimate"):
        S.evaluate_saved(fit_out, samples=8)  # the same row, which the note called "not the run's row"
    import shutil

    shutil.rmtree(fit_out)
    moved = tfb_out.rename(tmp_path / "shared")
    again = S.evaluate_saved(moved, progress=False)
    assert {k: again[k] for k in ("accuracy", "ece", "nll")} == {k: record["result"][k] for k in ("accuracy", "ece", "nll")}
    with pytest.raises(ValueError, match="--samples changes nothing here"):
        S.evaluate_saved(_run_folder(tmp_path / "glm", saved="laplace", guides=["laplace"], predictive="glm_probit"), samples=3)


def test_bayesianize_records_the_anchors_it_searched_on_not_those_requested(tmp_path, capfd):
    """run.json's made.anchors said 512 (the request) where the training split held fewer and the search ran on all of
    them: it records those searched on, and a rerun asking for as many or more (or an older record of the request) is
    the same run."""
    sizes = ["--train-size", "24", "--test-size", "8", "--quiet"]
    assert cli.main(["fit", "--guide", "map", *sizes, "--epochs", "1", "--adapter", "--out", str(tmp_path / "fit")]) == 0
    adapter, out = str(tmp_path / "fit" / "guide" / "adapter"), tmp_path / "tfb"
    run = ["bayesianize", adapter, *sizes, "--iterations", "1", "--out", str(out)]
    assert cli.main(run) == 0  # --anchors left at 512
    record = json.loads((out / "guide" / "run.json").read_text())
    train = record["sizes"]["train"]
    assert train < 512 and record["made"]["anchors"] == train
    trace = json.loads((out / "guide" / "guide.json").read_text())["config"]["trace"]
    assert max(step["anchors"] for step in trace) == train  # what the search scored
    capfd.readouterr()
    assert cli.main([*run, "--anchors", "1000"]) == 0  # as many as the split holds: this run
    assert "holds this run already" in capfd.readouterr().out
    older = {**record, "made": {**record["made"], "anchors": 512}}  # recorded before: the request
    (out / "guide" / "run.json").write_text(json.dumps(older))
    meta = json.loads((out / "guide" / "guide.json").read_text())  # saved with it, as that save sealed it
    meta["run_sha256"] = hashlib.sha256((out / "guide" / "run.json").read_bytes()).hexdigest()
    (out / "guide" / "guide.json").write_text(json.dumps(meta))
    assert cli.main(run) == 0 and "holds this run already" in capfd.readouterr().out
    assert cli.main([*run, "--anchors", "8"]) == 2
    assert "anchors 512 there, 8 now" in capfd.readouterr().err


def test_a_request_is_compared_with_what_was_requested_not_with_resolved_defaults(tmp_path):
    config = small(tmp_path, guides=("map",))
    folder = RunFolder(tmp_path, config)
    folder.config = replace(config, lr=2e-3)  # resolved while running
    folder.add("map", 0, [ROW], arrays(0))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["lr"] == 2e-3 and saved["request"]["lr"] is None
    RunFolder(tmp_path, small(tmp_path))  # the default again: the same run
    RunFolder(tmp_path, small(tmp_path, lr=2e-3))  # the value the default resolved to: the same run
    with pytest.raises(ValueError, match=r"lr None there, 0.001 now"):
        RunFolder(tmp_path, small(tmp_path, lr=1e-3))
    assert config.lr is None  # the caller's config is never changed


def test_a_default_left_to_the_run_now_is_the_value_there_it_resolves_to(tmp_path):
    """A run made with --lr 2e-3 (as study records it), resumed without --lr on SST-2 (whose default it is), was
    refused as another configuration ('lr 0.002 there, None now'), while the reverse resumed."""
    from pyro_lora.experiments.results import config_differences

    RunFolder(tmp_path, small(tmp_path, guides=("map",), lr=2e-3)).add("map", 0, [ROW], arrays(0))
    RunFolder(tmp_path, small(tmp_path, guides=("map",)))  # the default: 2e-3 for a classification task
    other = tmp_path / "other"
    RunFolder(other, small(other, guides=("map",), lr=1e-3)).add("map", 0, [ROW], arrays(0))
    with pytest.raises(ValueError, match=r"lr 0.001 there, None now"):
        RunFolder(other, small(other, guides=("map",)))
    # a multiple-choice set's: the learning rate of a causal LM, the format SmolLM2's metadata gives
    arc = {"dataset": "arc_easy", "model": "smollm2"}
    assert config_differences({**asdict(small(tmp_path)), **arc, "lr": 3e-4, "mc_format": "cloze"},
                              {**asdict(small(tmp_path)), **arc}) == {}
    assert config_differences({**asdict(small(tmp_path)), **arc, "mc_format": "letter"},
                              {**asdict(small(tmp_path)), **arc}) == {"mc_format": ("letter", None)}
    # a model folder whose metadata cannot be read resolves no default: the difference is said, nothing raised
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "num_attention_heads": 0}')
    mine = {**asdict(small(tmp_path)), "dataset": "arc_easy", "model": str(broken)}
    assert config_differences({**mine, "mc_format": "cloze"}, mine) == {"mc_format": ("cloze", None)}


@pytest.mark.real
@pytest.mark.parametrize("guide", ["flow", "ensemble", "blora_xs", "scalabl"])
def test_every_saveable_method_fits_and_evaluate_reproduces_its_row(tmp_path, guide):
    """Each on its own model (ScalaBL's, LoRA-XS's, the post-hoc guides' prior 0.1): the flow's inducing prior reads it."""
    out = tmp_path / guide
    row = S.fit_one(small(out, guides=(guide,), samples=4))
    again = S.evaluate_saved(out, progress=False)
    assert {k: again[k] for k in METRICS} == {k: row[k] for k in METRICS}
    if guide == "flow":  # the same run on other test labels: a different row, and it says so
        from pyro_lora.data import default_data_dir

        real = default_data_dir().resolve() / "sst2"
        (tmp_path / "data" / "sst2").mkdir(parents=True)
        for name in ("meta.json", "train.jsonl"):
            (tmp_path / "data" / "sst2" / name).symlink_to(real / name)
        flipped = [{**r, "label": 1 - r["label"]} for r in map(json.loads, (real / "test.jsonl").read_text().splitlines())]
        (tmp_path / "data" / "sst2" / "test.jsonl").write_text("\n".join(map(json.dumps, flipped)))
        other = S.evaluate_saved(out, progress=False, data_dir=str(tmp_path / "data"))
        assert other["accuracy"] != row["accuracy"]
        assert other["note"] == ("scored on other test records than the run's (the data folder gives others than the ones "
                                 "its run.json recorded): not the run's row")


def test_a_test_size_at_or_above_the_data_scores_the_runs_rows_and_says_nothing():
    """evaluate --test-size 500 of a run that scored all 60 test records said "not the run's row" of the same 60."""
    run = {"config": {"test_size": 60, "samples": 8}, "result": {"accuracy": 0.5, "ece": 1.0, "nll": 0.7}}
    row = dict(run["result"])
    assert S._rescored_note(row, run, {"test_size": 500}, available=60, base=None) is None
    assert S._rescored_note(row, {**run, "config": {"test_size": 100, "samples": 8}}, {"test_size": 500}, available=60, base=None) is None
    assert S._rescored_note(row, run, {"test_size": 40}, available=60, base=None).startswith("re-scored with test_size 40 (the run: 60)")
    assert S._rescored_note(row, run, {"test_size": 500}, available=100, base=None).startswith("re-scored with test_size 500 (the run: 60)")
    # the same records, other numbers: still said
    assert "differs from the row the run recorded" in S._rescored_note({**row, "nll": 0.9}, run, {"test_size": 500}, available=60, base=None)
    # the test records the run recorded, other numbers: the software; the records unrecorded: either
    assert S._rescored_note({**row, "nll": 0.9}, run, {}, available=60, base=None, other_test=False).endswith(
        "(nll 0.7 there, 0.9 here): the software changed since")
    assert S._rescored_note({**row, "nll": 0.9}, run, {}, available=60, base=None).endswith(
        "(nll 0.7 there, 0.9 here): the test data or the software changed since")


@pytest.mark.real
def test_evaluate_reproduces_a_smollm2_cloze_laplace_fit(tmp_path):
    """Laplace on cloze multiple choice runs one forward per batch (its KFAC hooks): evaluate rebuilds it so."""
    out = tmp_path / "smol"
    config = small(out, model="smollm2", dataset="arc_easy", guides=("laplace",), train_size=2, test_size=2, batch_size=2)
    row = S.fit_one(config)
    again = S.evaluate_saved(out, progress=False)
    assert {k: again[k] for k in ("accuracy", "ece", "nll")} == {k: row[k] for k in ("accuracy", "ece", "nll")}


def _run_folder(tmp_path, saved="map", **changes):
    """A `fit` output whose run.json is a complete record with ``changes`` (None: the setting removed), beside the guide
    file of method ``saved``."""
    (tmp_path / "guide").mkdir(parents=True, exist_ok=True)
    (tmp_path / "guide" / "guide.json").write_text('{"guide": "pyro_lora.guides.map:MAPGuide"}')
    run = {"config": asdict(small(tmp_path, guides=("map",))), "random": "AB", "predictive": "weight_samples", "seed": 0,
           "model_class": "lora"}
    for key, value in changes.items():
        target = run["config"] if key in run["config"] else run
        if value is None:
            del target[key]
        else:
            target[key] = value
    guide = METHODS[saved].guide
    (tmp_path / "guide" / "guide.safetensors").write_bytes(b"")
    meta = {"format": FORMAT, "guide": f"{guide.__module__}:{guide.__qualname__}", "tensors_sha256": bytes_sha256(b"")}
    record = json.dumps({**run, "guide_sha256": bytes_sha256(_canonical(meta))}).encode()
    (tmp_path / "guide" / "run.json").write_bytes(record)
    (tmp_path / "guide" / "guide.json").write_text(json.dumps({**meta, "run_sha256": bytes_sha256(record)}))
    return tmp_path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model": None}, "config lacks ['model']"),  # it used to evaluate the default model without a word
        ({"seed": "abc"}, "seed 'abc' is no integer in [0, 2**32)"),
        ({"seed": -1}, "seed -1 is no integer in [0, 2**32)"),
        ({"seed": 2**32}, "seed 4294967296 is no integer in [0, 2**32)"),  # it wrapped to seed 0 without a word
        ({"guides": ["meanfield"]}, "its method 'meanfield' did not save the guide beside it ('pyro_lora.guides.map:MAPGuide')"),
        ({"guides": ["bogus"]}, "its method 'bogus' is not registered here"),
        ({"random": "Q"}, "random 'Q' is none of the matrix kinds"),
        ({"model_class": "lora_xs"}, "model class 'lora_xs' is not the model of method 'map' ('lora')"),
        ({"predictive": None}, "KeyError: 'predictive'"),
        ({"colour": "red"}, None),
        ({"test_size": 0}, None),
        ({"samples": 0}, None),
        ({"batch_size": -2}, None),
        ({"device": "tpu"}, None),
    ],
)
def test_an_incomplete_run_record_is_refused_naming_the_file(tmp_path, changes, message, monkeypatch):
    monkeypatch.setattr(S, "prepare", lambda *a, **k: pytest.fail("loaded a model from a broken record"))
    folder = _run_folder(tmp_path, **changes)
    bounds = {"test_size": "--test-size 0 must be an integer >= 1", "samples": "--samples 0 must be an integer >= 1",
              "batch_size": "--batch-size -2 must be an integer >= 1", "device": "--device 'tpu' is none of cpu, cuda"}
    if message is None and set(changes) & set(bounds):  # complete, but a value no command would run with
        message = bounds[next(iter(changes))]
    elif message is None:  # an unknown top-level key is harmless; an unknown setting is not
        folder = _run_folder(tmp_path)
        record = json.loads((folder / "guide" / "run.json").read_text())
        record["config"]["colour"] = "red"
        (folder / "guide" / "run.json").write_text(json.dumps(record))
        message = "config has unknown settings ['colour']"
    with pytest.raises(ValueError) as refused:
        S.evaluate_saved(folder)
    assert str(refused.value).startswith(f"{folder / 'guide' / 'run.json'} is not a complete run record (") and message in str(refused.value)


def test_a_dataset_the_model_cannot_take_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "prepare", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="--model minilm is an encoder for classification sets, and --dataset arc_easy"):
        S.evaluate_saved(_run_folder(tmp_path, dataset="arc_easy"))


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_result(tmp_path):
    old = RunFolder(tmp_path, small(tmp_path, guides=("map", "tfb")))
    old.add("map", 0, [ROW], arrays(0))
    old.add("tfb", 0, [{**ROW, "guide": "tfb"}], arrays(0))
    (tmp_path / "map_seed0.safetensors").write_bytes(b"the old run's MAP")
    # a seed killed after its MAP was saved but before its first row: in no list of the record
    (tmp_path / "map_seed1.safetensors").write_bytes(b"the old run's MAP of seed 1")
    (tmp_path / "study_run.json").write_text('{"command": "the old run\'s study"}')
    before = sorted(p.name for p in tmp_path.iterdir())
    new = RunFolder(tmp_path, small(tmp_path, guides=("map",), seeds=(0, 1), test_size=32), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # a kill or a failure here keeps the old run
    new.fail("map", 1, RuntimeError("training the MAP every guide starts from failed: loss became nan"))
    new.redraw()  # nothing of the new run to draw: the old figures stay
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # failures are no result: the old run stays
    with pytest.raises(GuideFailures, match="The run --overwrite was to replace is kept in"):
        new.raise_failures()
    real_add = np.savez_compressed

    def killed(*args, **kwargs):  # the new run's first npz written, then a kill before its results.json
        real_add(*args, **kwargs)
        raise KeyboardInterrupt

    import unittest.mock

    with unittest.mock.patch("pyro_lora.experiments.results.np.savez_compressed", killed), pytest.raises(KeyboardInterrupt):
        new.add("map", 0, [ROW], arrays(0))
    assert not (tmp_path / "results.json").exists()  # no record of the old run beside the new run's files
    new.add("map", 0, [ROW], arrays(0))
    assert not (tmp_path / "predictions_tfb.npz").exists() and (tmp_path / "predictions_map.npz").exists()
    assert json.loads((tmp_path / "results.json").read_text())["config"]["test_size"] == 32
    assert not (tmp_path / "map_seed0.safetensors").exists()  # another configuration's MAP: a resume must not load it
    assert not (tmp_path / "map_seed1.safetensors").exists()  # nor the new run's seed 1, which loaded it
    assert not (tmp_path / "study_run.json").exists()  # the old run's commands and wall time are not this run's


def test_a_kill_while_overwrite_deletes_the_old_run_is_finished_by_the_next_run(tmp_path):
    """A kill after the old results.json was deleted and before its other files were left them beside the new run
    for good (36 files of another configuration: predictions_*.npz, figures, a MAP), as nothing named them any more.
    The list of files to delete is kept until they are gone; the next run in the folder finishes it."""
    import unittest.mock
    from pathlib import Path

    old = RunFolder(tmp_path, small(tmp_path, guides=("map", "tfb")))
    old.add("map", 0, [ROW], arrays(0))
    old.add("tfb", 0, [{**ROW, "guide": "tfb"}], arrays(0))
    new = RunFolder(tmp_path, small(tmp_path, guides=("map",), test_size=32), overwrite=True)
    real_unlink, deleted = Path.unlink, []

    def killed(path, *args, **kwargs):  # a kill on the third deletion, just after results.json went
        deleted.append(path.name)
        if len(deleted) == 3:
            raise KeyboardInterrupt
        return real_unlink(path, *args, **kwargs)

    with unittest.mock.patch.object(Path, "unlink", killed), pytest.raises(KeyboardInterrupt):
        new.add("map", 0, [ROW], arrays(0))
    assert deleted[0] == "results.json" and (tmp_path / "predictions_tfb.npz").exists()
    again = RunFolder(tmp_path, small(tmp_path, guides=("map",), test_size=32))
    assert not (tmp_path / "predictions_tfb.npz").exists() and not (tmp_path / "reliability_tfb.png").exists()
    again.add("map", 0, [ROW], arrays(0))
    assert sorted(p.name for p in tmp_path.glob("predictions_*")) == ["predictions_map.npz"]
    assert not (tmp_path / ".replacing.json").exists()


def test_a_figure_the_disk_cannot_take_loses_no_finished_row_and_the_first_error_is_told(tmp_path, monkeypatch):
    """A full disk while drawing a method's reliability diagram lost its finished row (npz written, results.json not),
    and the error named the summary figure the run's end redrew, not the file that stopped the run."""
    import errno

    from pyro_lora.experiments import results as R

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[2]))

    monkeypatch.setattr(R, "reliability_diagram", full)
    run = RunFolder(tmp_path, small(tmp_path, guides=("map",)))
    probs = np.full((4, 2), 0.5, dtype=np.float32)
    with pytest.warns(UserWarning, match=r"reliability_map.png could not be written .* the row of map \(seed 0\) is kept"):
        run.add("map", 0, [ROW], arrays(0), first_seed=(probs, np.array([0, 1, 0, 1])))
    assert [r["guide"] for r in json.loads((tmp_path / "results.json").read_text())["per_seed"]] == ["map"]

    def stopped(run, config, reference):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "predictions_laplace.npz"))

    monkeypatch.setattr(C, "_fill", stopped)
    monkeypatch.setattr(RunFolder, "redraw", lambda self: full(None, None, tmp_path / "reliability_grid.png"))
    with pytest.raises(OSError, match="predictions_laplace.npz") as raised:
        C._run_seeds(small(tmp_path, guides=("map",)), False, None, C.COMPARE_FLAGS)
    assert "the summary figures were not redrawn either" in "".join(raised.value.__notes__)


def test_a_reliability_diagram_lost_to_a_kill_is_drawn_by_the_resume_a_ts_rows_too(tmp_path, monkeypatch):
    """A kill (or a full disk) between a row and its reliability diagram left the diagram missing for good: the resume
    redrew the methods' diagrams only, never a +ts row's, and none of a method it added rows of another seed for."""
    from matplotlib.image import imread

    from pyro_lora.experiments import results as R

    drawn = R.reliability_diagram
    monkeypatch.setattr(R, "reliability_diagram", lambda *a, **k: None)  # killed before each diagram was drawn
    config = small(tmp_path, guides=("map",), seeds=(0, 1))
    first = RunFolder(tmp_path, config)
    probs = np.full((2, 2), 0.5, dtype=np.float32)
    for name in ("map", "map+ts"):
        first.add(name, 0, [{**ROW, "guide": name}], arrays(0), first_seed=(probs, np.arange(2)))
    assert not list(tmp_path.glob("reliability_map*.png"))
    monkeypatch.setattr(R, "reliability_diagram", drawn)
    resumed = RunFolder(tmp_path, config)  # resumes seed 1 alone: its rows draw no diagram of the first seed
    for name in ("map", "map+ts"):
        resumed.add(name, 1, [{**ROW, "guide": name, "seed": 1}], arrays(1))
    resumed.redraw()
    for name in ("map", "map+ts"):
        assert imread(tmp_path / f"reliability_{name}.png").ndim == 3


def test_a_diagram_the_redraw_cannot_write_is_warned_of_and_the_summary_figures_still_drawn(tmp_path, monkeypatch):
    """The run's end retries a diagram its add could not write: a failure of that one file raised out of the redraw,
    before the summary figures, and ended a finished run in an OSError."""
    import errno

    from pyro_lora.experiments import results as R

    drawn = R.reliability_diagram

    def diagram(probs, labels, path, title=None):
        if path.name == "reliability_map.png":
            raise OSError(errno.EACCES, "Permission denied", str(path))
        return drawn(probs, labels, path, title=title)

    monkeypatch.setattr(R, "reliability_diagram", diagram)
    run = RunFolder(tmp_path, small(tmp_path, guides=("map",)))
    with pytest.warns(UserWarning, match="reliability_map.png could not be written"):
        run.add("map", 0, [ROW], arrays(0), first_seed=(np.full((2, 2), 0.5, dtype=np.float32), np.arange(2)))
    with pytest.warns(UserWarning, match="reliability_map.png could not be written"):
        run.redraw()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["calibration_vs_accuracy.png", "reliability_grid.png"]


def test_a_resume_in_another_environment_is_warned_and_noted_on_the_rows_it_adds(tmp_path, monkeypatch):
    """A run killed, then resumed after an update of pyro_lora's code (a method's version unchanged) or of a
    library, averaged rows of both versions without a word. The record keeps every environment its rows were made
    in; the resume warns, naming what differs, and the rows it adds say so in their note."""
    from pyro_lora.experiments import results as R

    first = RunFolder(tmp_path, small(tmp_path, guides=("map", "tfb")))
    first.add("map", 0, [ROW], arrays(0))
    assert json.loads((tmp_path / "results.json").read_text())["environments"] == [R.environment()]
    again = RunFolder(tmp_path, small(tmp_path, guides=("map", "tfb")))  # the same environment: nothing said
    again.add("tfb", 0, [{**ROW, "guide": "tfb"}], arrays(0))
    assert all(r.get("note") is None for r in json.loads((tmp_path / "results.json").read_text())["per_seed"])
    updated = {**R.environment(), "torch": "9.9.9", "code": "0" * 64}
    monkeypatch.setattr(R, "environment", lambda: updated)
    with pytest.warns(UserWarning, match=r"holds rows made in another environment than this run's \(torch .* there, "
                                         r"9\.9\.9 now; pyro_lora's code differs\)"):
        resumed = RunFolder(tmp_path, small(tmp_path, guides=("map", "tfb"), seeds=(0, 1)))
    resumed.add("map", 1, [{**ROW, "seed": 1}], arrays(1))
    record = json.loads((tmp_path / "results.json").read_text())
    assert len(record["environments"]) == 2 and record["environments"][-1] == updated
    notes = {(r["guide"], r["seed"]): r.get("note") for r in record["per_seed"]}
    assert notes[("map", 0)] is None and "made with other pyro_lora code or library versions" in notes[("map", 1)]


def test_overwrite_keeps_the_old_map_until_the_new_runs_first_result(tmp_path):
    """A kill after the new MAP is trained but before the new run's first result left the old run without its MAP."""
    from types import SimpleNamespace

    from safetensors import safe_open

    RunFolder(tmp_path, small(tmp_path, guides=("map",))).add("map", 0, [ROW], arrays(0))
    path = tmp_path / "map_seed0.safetensors"
    path.write_bytes(b"the old run's MAP")
    config = small(tmp_path, guides=("map",), test_size=32)
    new = RunFolder(tmp_path, config, overwrite=True)
    setup = SimpleNamespace(seed=0, config=config, trained_state={"w": torch.ones(2)}, map_digest="new digest")
    assert new.load_map(setup) is None  # another configuration's MAP: never loaded as the new run's
    new.save_map(setup, 1.0)
    assert path.read_bytes() == b"the old run's MAP"  # a kill here keeps the old run whole
    new.add("map", 0, [ROW], arrays(0))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["digest"] == "new digest"


@pytest.mark.parametrize("name", ["results.json", "predictions_map.npz", "reliability_grid.png", "map_seed0.safetensors"])
def test_a_folder_where_the_run_writes_a_file_is_refused_at_the_start(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / name} is a folder, where the run writes a file"):
        RunFolder(tmp_path, small(tmp_path, guides=("map",)))


def test_one_error_shared_by_several_runs_is_said_once(tmp_path):
    folder = RunFolder(tmp_path, small(tmp_path, guides=("map", "tfb")))
    for guide in ("map", "tfb"):
        folder.fail(guide, 0, RuntimeError("training the MAP every guide starts from failed: loss became nan"))
    with pytest.raises(GuideFailures, match=r"^2 guide run\(s\) failed: map \(seed 0\), tfb \(seed 0\): RuntimeError: training"):
        folder.raise_failures()


@pytest.mark.parametrize("edit", [("seed", 1), ("max_length", 9), ("test_size", 40), ("result", None)])
def test_a_run_record_edited_since_the_save_is_refused_not_rescored(tmp_path, edit, monkeypatch):
    """Consistent hand edits used to re-score another run under a note blaming the data or the software."""
    monkeypatch.setattr(S, "prepare", lambda *a, **k: pytest.fail("loaded a model from an edited record"))
    folder = _run_folder(tmp_path)
    path = folder / "guide" / "run.json"
    record = json.loads(path.read_text())
    key, value = edit
    target = record["config"] if key in record["config"] else record
    target[key] = value
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"is not the record saved with its guide \(its SHA-256 differs"):
        S.evaluate_saved(folder)


def test_an_unregistered_method_is_named_as_such(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "prepare", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="its method 'jitter' is not registered here: import the module that registers it"):
        S.evaluate_saved(_run_folder(tmp_path, guides=["jitter"]))


def test_unknown_multiple_choice_settings_are_refused(tmp_path):
    from pyro_lora.experiments.setup import check_config

    with pytest.raises(ValueError, match="--mc-format 'Cloze' is none of letter, cloze"):
        check_config(small(tmp_path, model="smollm2", dataset="arc_easy", mc_format="Cloze"))
    with pytest.raises(ValueError, match="--mc-normalize 'bogus' is none of none, tokens, chars"):
        check_config(small(tmp_path, model="smollm2", dataset="arc_easy", mc_normalize="bogus"))


def test_a_record_from_before_dtype_and_4bit_existed_is_evaluated_as_fp32_unquantized(tmp_path, monkeypatch):
    seen = {}

    def prepare(config, *a, **k):
        seen["config"] = config
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(S, "prepare", prepare)
    with pytest.raises(RuntimeError, match="stop before loading"):
        S.evaluate_saved(_run_folder(tmp_path, dtype=None, load_in_4bit=None))
    assert seen["config"].dtype == "fp32" and seen["config"].load_in_4bit is False
    assert config_differences({"config": {k: v for k, v in asdict(small(tmp_path)).items() if k not in ("dtype", "load_in_4bit")}},
                              small(tmp_path)) == {}
    assert config_differences({"config": asdict(small(tmp_path))}, small(tmp_path, dtype="bf16")) == {"dtype": ("fp32", "bf16")}


def test_dataset_names_are_compared_by_the_folder_they_name(tmp_path):
    """A finished run of --dataset sst2 was refused as "another configuration" for --dataset sst2/, which the run itself
    resolves and records as sst2 (and the data check reads as sst2)."""
    saved = {"config": asdict(small(tmp_path, eval_datasets=("arc_easy",)))}
    assert config_differences(saved, small(tmp_path, dataset="sst2/", eval_datasets=("./arc_easy/",))) == {}
    assert config_differences(saved, small(tmp_path, dataset="sst2/x", eval_datasets=("arc_easy",))) == {"dataset": ("sst2", "sst2/x")}


def test_a_record_with_an_unknown_dtype_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "prepare", lambda *a, **k: pytest.fail("loaded a model from a broken record"))
    with pytest.raises(ValueError, match="--dtype 'fp8' is none of fp32, bf16, fp16"):
        S.evaluate_saved(_run_folder(tmp_path, dtype="fp8"))


def test_bayesianize_on_the_maps_adapter_gives_the_tfb_row_that_compare_and_fit_give(tmp_path):
    # one set of search defaults: `bayesianize` used to stop at sigma 0.015 on 256 anchors where compare searched to 0.2
    sizes = ["--train-size", "24", "--test-size", "8", "--epochs", "1", "--quiet"]
    assert cli.main(["fit", "--guide", "map", *sizes, "--adapter", "--out", str(tmp_path / "map")]) == 0
    assert cli.main(["fit", "--guide", "tfb", *sizes, "--out", str(tmp_path / "tfb")]) == 0
    assert cli.main(["bayesianize", str(tmp_path / "map" / "guide" / "adapter"), *sizes[:4], "--quiet",
                     "--out", str(tmp_path / "bayes")]) == 0
    fitted, bayesianized = (json.loads((tmp_path / d / "guide" / "run.json").read_text())["result"] for d in ("tfb", "bayes"))
    for key in ("accuracy", "ece", "nll", "brier", "mutual_information"):
        assert bayesianized[key] == pytest.approx(fitted[key], rel=1e-6, abs=1e-9), key
    assert 0 < bayesianized["sigma_q"]


def test_a_resumed_seed_whose_retrained_map_predicts_otherwise_is_noted(tmp_path):
    """A resume retrains the seed's MAP; the seed's saved rows came from the first one. A retrained MAP that predicts
    otherwise (another thread count, library version) would silently pair rows of two MAPs: warned and noted."""
    from types import SimpleNamespace

    from conftest import random_batch, tiny_bert
    from pyro_lora import LoraModel, SequenceClassification, predict
    from pyro_lora.guides import MAPGuide

    model = LoraModel(tiny_bert(), SequenceClassification(), num_data=8)
    test = [random_batch(seed=s) | {"labels": torch.tensor([0, 1, 2])} for s in (1, 2)]
    guide = MAPGuide(model)
    probs = predict(model, guide, test).probs.numpy()
    config = small(tmp_path, guides=("map", "tfb"))
    setup = SimpleNamespace(seed=0, config=config, model=model, map_guide=guide, test=test, loader=lambda records: records,
                            map_loaded=False, map_digest="a")
    folder = RunFolder(tmp_path, config)
    assert C.map_drift(folder, setup) == (None, False)  # nothing saved of this seed: nothing to compare
    key = "sst2__seed0__"
    saved = {key + "probs": probs, key + "labels": np.zeros(6, dtype=np.int64), key + "entropy": np.ones(6), key + "mutual_information": np.zeros(6)}
    folder.add("map", 0, [ROW], saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C.map_drift(folder, setup) == (None, True)  # the same MAP, confirmed by its saved rows
    saved[key + "probs"] = probs + np.array([1e-3, -1e-3, 0.0])
    folder.add("map", 0, [ROW], saved)
    with pytest.warns(UserWarning, match="MAP trained again for seed 0 on resume predicts up to 0.001 away"):
        note, confirmed = C.map_drift(folder, setup)
    assert not confirmed
    assert "two MAPs" in note


@pytest.mark.real
def test_a_resumed_seed_loads_its_saved_map_and_gives_the_rows_of_a_whole_run(tmp_path, monkeypatch):
    """Every row of a seed starts from one MAP: a resume loads the MAP the seed's first process saved (retrained, it
    may differ with the thread count or library version) and gives the rows of an uninterrupted run."""
    from pyro_lora.experiments.setup import Setup

    reference = run_compare(small(tmp_path / "reference", guides=("map", "temperature")))
    out = tmp_path / "run"
    run_compare(small(out, guides=("map",)))
    assert (out / "map_seed0.safetensors").is_file()
    monkeypatch.setattr(Setup, "fit", lambda *a, **k: pytest.fail("trained the MAP again"))
    resumed = run_compare(small(out, guides=("map", "temperature")))
    assert [r["guide"] for r in resumed] == ["map", "temperature"]
    for row, expected in zip(resumed, reference, strict=True):
        assert {k: row[k] for k in METRICS} == {k: expected[k] for k in METRICS}
    monkeypatch.undo()
    # a run killed before its first result leaves its MAP: a rerun with other flags trains its own
    killed = tmp_path / "killed"
    run_compare(small(killed, guides=("map",), lr=0.05))
    for f in killed.glob("*"):
        if f.name != "map_seed0.safetensors":
            f.unlink()
    with pytest.warns(UserWarning, match=r"it holds the MAP of another configuration \(lr 0.05 there, 0.002 now\)"):
        again = run_compare(small(killed, guides=("map", "temperature")))
    assert [{k: r[k] for k in METRICS} for r in again] == [{k: r[k] for k in METRICS} for r in reference]


@pytest.mark.real
def test_a_resumed_seed_whose_map_is_not_the_one_its_rows_used_says_so_without_a_map_row(tmp_path):
    """The MAP digest in results.json ties a seed's rows to their MAP, also where no map row's probabilities can."""
    out = tmp_path / "run"
    run_compare(small(out, guides=("temperature",)))
    record = json.loads((out / "results.json").read_text())
    assert list(record["maps"]) == ["0"]
    record["maps"]["0"] = "0" * 64  # the rows' MAP is not the one saved (nor the one trained now)
    (out / "results.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="not the MAP the seed's saved rows started from"), \
            pytest.warns(UserWarning, match="MAP trained again for seed 0 on resume is not the one this seed's earlier rows used"):
        rows = run_compare(small(out, guides=("temperature", "llla")))
    (llla,) = [r for r in rows if r["guide"] == "llla"]
    assert "two MAPs" in llla["note"]
    assert json.loads((out / "results.json").read_text())["maps"] == {"0": "0" * 64}  # still the saved rows' MAP


@pytest.mark.real
def test_a_loaded_map_is_the_trained_one_and_one_that_is_not_this_seeds_is_trained_again(tmp_path, monkeypatch):
    """The MAP file is used only where it is the MAP this run would train for this seed and its saved rows started
    from: another seed's, another configuration's (a run killed before its first result, then resumed with other
    flags; a file copied from another run), a changed or broken file is warned about and trained again."""
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from pyro_lora.ownership import head_trainer
    from pyro_lora.experiments.setup import Setup, train_map

    config = small(tmp_path)
    folder, trained = RunFolder(tmp_path, config), prepare(config)
    seconds = train_map(trained, load=folder.load_map)
    assert not trained.map_loaded and seconds > 0
    folder.save_map(trained, seconds)
    file = tmp_path / "map_seed0.safetensors"

    probes = {}  # a refused file leaves the network as it was: one setup per seed serves every refusal

    def load(config, seed=0, expected=None, warns=None, data=None):
        setup = prepare(config, seed=seed) if not warns else probes.get(seed) or probes.setdefault(seed, prepare(config, seed=seed))

        def load_map(s):
            run = RunFolder(tmp_path, config)
            run.data = data  # the digest of the records the run scores on
            return run.load_map(s, expected)

        with warnings.catch_warnings(), monkeypatch.context() as patch:
            warnings.simplefilter("error")
            if warns:
                patch.setattr(Setup, "fit", lambda *a, **k: None)  # what training would follow is not this test's
                with pytest.warns(UserWarning, match=warns):
                    train_map(setup, load=load_map)
                assert not setup.map_loaded
            else:
                patch.setattr(Setup, "fit", lambda *a, **k: pytest.fail("trained the MAP again"))
                assert train_map(setup, load=load_map) == seconds
        return setup

    loaded = load(config)
    assert loaded.map_loaded and loaded.map_digest == trained.map_digest
    for state in ("initial_state", "trained_state"):
        a, b = getattr(trained, state), getattr(loaded, state)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), state
    assert loaded.trainable == trained.trainable and head_trainer(loaded.model) is loaded.map_guide
    load(replace(config, guides=("map", "tfb"), seeds=(0, 1)))  # what a resume may change
    tag = r"map_seed0.safetensors is not used: "
    load(config, expected="0" * 64, warns=tag + "it is not the MAP the seed's saved rows started from; the MAP of seed 0 is trained again")
    (tmp_path / "map_seed1.safetensors").write_bytes(file.read_bytes())  # copied by hand
    load(config, seed=1, warns=r"map_seed1.safetensors is not used: it holds seed 0's MAP")
    with safe_open(str(file), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for change, message in [({"config": _json.dumps({**_json.loads(meta["config"]), "lr": 0.05})},
                             r"it holds the MAP of another configuration \(lr 0.05 there, 0.002 now\)"),
                            ({"seconds": "nan"}, "its training time nan is no number of seconds"),
                            ({"seconds": "-100.0"}, "its training time -100.0 is no number of seconds")]:
        save_file(tensors, str(file), metadata={**meta, **change})
        load(config, warns=tag + message)
    # a MAP of a run killed before its first result, resumed on other records (it was loaded: only the folder counted)
    moved = {**meta, "data": "a" * 64, "config": _json.dumps({**_json.loads(meta["config"]), "data_dir": "/moved/elsewhere"})}
    save_file(tensors, str(file), metadata=moved)
    load(config, data="b" * 64, warns=tag + r"it was trained on other records than this run's \(its data digest\)")
    load(config, data="a" * 64)  # the same records in another folder: its MAP
    save_file(tensors, str(file), metadata={**meta, "config": moved["config"]})  # no digest: checked by folder
    load(config, data="a" * 64, warns=tag + r"it holds the MAP of another configuration \(data_dir '/moved/elsewhere' there")
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name].half()}, str(file), metadata=meta)  # rewritten in another dtype
    load(config, warns=tag + rf"its tensors \['{re.escape(name)}'\] differ from this network's in name, shape or dtype")
    save_file({**tensors, name: tensors[name] + 1e-3}, str(file), metadata=meta)
    load(config, warns=tag + "its tensors changed since it was saved")
    save_file(tensors, str(file), metadata={k: v for k, v in meta.items() if k != "config"})  # an earlier format
    load(config, warns=r"map_seed0.safetensors cannot be read \(its metadata lacks config\): the MAP of seed 0 is trained")
    save_file(tensors, str(file), metadata={**meta, "config": "[]"})
    load(config, warns=r"cannot be read \(its configuration is \[\], no JSON object\)")
    file.write_bytes(b"half a file")
    load(config, warns=r"map_seed0.safetensors cannot be read .*: the MAP of seed 0 is trained again")
    # a seed with saved rows but no recorded MAP (a run from before MAPs were recorded): nothing to check a file against
    folder.save_map(trained, seconds)
    load(config)
    folder.add("map", 0, [ROW], arrays(0))
    folder.maps.clear()
    folder.write()
    load(config, warns=tag + "the seed's saved rows record no MAP to check it against")


@pytest.mark.real
def test_an_update_rerun_is_checked_against_the_map_of_the_run_it_merges_into(tmp_path):
    """``study --update`` reruns methods in a folder of their own: the MAP it starts from (trained again where the run
    kept none) is checked against the rows of the run it merges into, not against its own empty folder."""
    base = tmp_path / "run"
    run_compare(small(base, guides=("map",)))
    (base / "map_seed0.safetensors").unlink()  # a run from before MAPs were saved
    record = json.loads((base / "results.json").read_text())
    del record["maps"]
    with np.load(base / "predictions_map.npz") as saved:
        arrays = dict(saved)
    arrays["sst2__seed0__probs"] = arrays["sst2__seed0__probs"] + np.array([1e-3, -1e-3])  # another MAP's rows
    from pyro_lora.experiments.scoring import array_scores
    from pyro_lora.metrics import predictive_entropy

    arrays["sst2__seed0__entropy"] = predictive_entropy(torch.as_tensor(arrays["sst2__seed0__probs"])[None]).numpy()
    np.savez(base / "predictions_map.npz", **arrays)

    record["per_seed"][0].update(array_scores(*(arrays[f"sst2__seed0__{k}"] for k in ARRAYS)))  # and their scores
    (base / "results.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="MAP trained again for seed 0 on resume predicts up to 0.001 away"):
        (row,) = run_compare(small(tmp_path / "update", guides=("temperature",)), overwrite=True, reference=base)
    assert "two MAPs" in row["note"]


@pytest.mark.real
def test_a_wrong_recorded_map_digest_is_mended_where_the_saved_map_rows_confirm_the_map(tmp_path):
    out = tmp_path / "run"
    run_compare(small(out, guides=("map",)))
    record = json.loads((out / "results.json").read_text())
    digest, record["maps"]["0"] = record["maps"]["0"], "0" * 64
    (out / "results.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="not the MAP the seed's saved rows started from"):
        run_compare(small(out, guides=("map", "temperature")))
    assert json.loads((out / "results.json").read_text())["maps"] == {"0": digest}  # its map rows confirm the MAP
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "fitted on a validation split of")  # small() holds 5 validation sentences
        run_compare(small(out, guides=("map", "temperature", "llla")))  # loaded: no warning


def test_a_results_json_whose_maps_is_no_digest_per_seed_is_refused_by_name(tmp_path):
    RunFolder(tmp_path, small(tmp_path, guides=("map",))).add("map", 0, [ROW], arrays(0))
    record = json.loads((tmp_path / "results.json").read_text())
    for maps in (None, "x", {"0": 5}):
        (tmp_path / "results.json").write_text(json.dumps({**record, "maps": maps}))
        with pytest.raises(ValueError, match=r"results.json is not the results of a `pyro-lora compare` run .*its 'maps' is "):
            RunFolder(tmp_path, small(tmp_path))


def test_a_results_json_with_a_malformed_seeding_or_labels_record_is_refused_by_name(tmp_path):
    RunFolder(tmp_path, small(tmp_path, guides=("map",))).add("map", 0, [ROW], arrays(0))
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["predict_seeding"] == {"map": 2}
    for key, value in (("predict_seeding", "2"), ("predict_seeding", {"map": 3}), ("predict_seeding", True),
                       ("labels", ["a", "b"]), ("labels", {"sst2": "a"})):
        (tmp_path / "results.json").write_text(json.dumps({**record, key: value}))
        with pytest.raises(ValueError, match=rf"results.json is not the results of a `pyro-lora compare` run .*its '{key}' is "):
            RunFolder(tmp_path, small(tmp_path))


def test_two_processes_never_write_one_run_folder(tmp_path):
    """A compare into a folder another running process writes (a second compare, or a study) is refused before any
    work: each wrote its own results.json over the other's, and a finished run lost its rows without a word."""
    from conftest import held_by_another_process

    with held_by_another_process(tmp_path) as pid:
        with pytest.raises(ValueError, match=f"process {pid} is writing this run folder"):
            run_compare(small(tmp_path, guides=("map",)))
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    rows = run_compare(small(tmp_path, guides=("temperature",), epochs=0))
    assert [r["guide"] for r in rows] == ["temperature"]
    # fit and bayesianize took no lock: two saving one out/guide collided with an OSError, and one result was lost
    with held_by_another_process(tmp_path / "fit") as pid:
        with pytest.raises(ValueError, match=f"process {pid} is writing this run folder"):
            S.fit_one(small(tmp_path / "fit", guides=("map",)))
        from safetensors.torch import save_file

        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
        save_file({"classifier.weight": torch.zeros(2, 4)}, str(tmp_path / "adapter" / "adapter_model.safetensors"))
        with pytest.raises(ValueError, match=f"process {pid} is writing this run folder"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an adapter from elsewhere: its base is unknown
            S.bayesianize_adapter(small(tmp_path / "fit", guides=()), tmp_path / "adapter")


def _old_run(out):
    """A finished run of map and temperature scaling (seeds 0, 1) in ``out`` whose stored verdict is stale."""
    old = RunFolder(out, small(out, guides=("map", "temperature"), seeds=(0, 1)))
    for seed in (0, 1):
        old.add("map", seed, [{**ROW, "seed": seed, "nll": 0.7 + seed / 10}], arrays(seed))
        old.add("temperature", seed, [{**ROW, "guide": "temperature", "seed": seed, "nll": 0.5}], arrays(seed))
    saved = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps({**saved, "verdict": "Verdict on sst2 (stale): by older code"}))


def test_the_cli_prints_the_verdict_of_this_runs_rows(tmp_path, monkeypatch, capsys):
    """The stored verdict was printed as it was (older code's, or a hand-edited record's); an --overwrite that failed
    before its first result printed the replaced run's verdict under its own empty table."""
    _old_run(tmp_path)
    monkeypatch.setattr(cli, "run_compare", lambda config, overwrite=False: [])
    assert cli.main(["compare", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "(stale)" not in out and "- Best: ECE x100: map, temperature (5.00, tied); NLL: temperature (0.500)" in out
    monkeypatch.undo()

    def no_map(setup, load=None):
        raise RuntimeError("loss became nan")

    from pyro_lora.experiments.setup import load_splits

    monkeypatch.setattr(C, "prepare", lambda config, seed: __import__("types").SimpleNamespace(
        config=config, sizes=None, net=torch.nn.Module(), tokenizer=None, scoring_since=None,
        **dict(zip(("train", "val", "test", "shifted"), load_splits(config)))))
    monkeypatch.setattr(C, "train_map", no_map)
    monkeypatch.setattr(C, "base_digest", lambda net, tokenizer: "0" * 64)  # the stand-in network has no weights to read
    argv = ["compare", "--guides", "map", "--train-size", "48", "--test-size", "32", "--epochs", "1", "--out", str(tmp_path),
            "--overwrite", "--quiet"]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "Verdict" not in captured.out and "The run --overwrite was to replace is kept in" in captured.err
    assert json.loads((tmp_path / "results.json").read_text())["config"]["seeds"] == [0, 1]  # the old run, kept


def test_a_resume_on_changed_data_is_refused_before_any_work(tmp_path, monkeypatch):
    """Only the data folder's path was compared: a resume over relabelled training records fitted its new rows on them
    beside rows fitted on the old ones (a +ts row at ECE 30.7 beside temperature scaling's 12.5), without a word."""
    from pyro_lora.data import default_data_dir

    real, data = default_data_dir().resolve() / "sst2", tmp_path / "data" / "sst2"
    data.mkdir(parents=True)
    (data / "meta.json").symlink_to(real / "meta.json")
    lines = {name: (real / name).read_text().splitlines()[:120] for name in ("train.jsonl", "test.jsonl")}
    for name, text in lines.items():
        (data / name).write_text("\n".join(text))
    config = small(tmp_path / "run", guides=("temperature",), epochs=0, data_dir=str(tmp_path / "data"))
    run_compare(config)
    assert len(json.loads((tmp_path / "run" / "results.json").read_text())["data"]) == 64
    flipped = [{**r, "label": 1 - r["label"]} for r in map(json.loads, lines["train.jsonl"])]
    (data / "train.jsonl").write_text("\n".join(map(json.dumps, flipped)))
    monkeypatch.setattr(C, "prepare", lambda *a, **k: pytest.fail("the data check comes before loading the model"))
    with pytest.raises(ValueError, match=r"holds rows scored on other records than .*data gives now \(the sst2 train, validation or test records changed since\)"):
        run_compare(replace(config, guides=("temperature", "map")))
    # the same records in another folder are the same data: the digest is the check, not the path
    copy = tmp_path / "copy" / "sst2"
    copy.mkdir(parents=True)
    (copy / "meta.json").symlink_to(real / "meta.json")
    for name, text in lines.items():
        (copy / name).write_text("\n".join(text))
    assert run_compare(replace(config, data_dir=str(tmp_path / "copy")))[0]["guide"] == "temperature"  # complete: nothing rerun


def test_records_that_change_during_a_run_stop_it(tmp_path, monkeypatch):
    """The digest was taken once, but each seed reloads the records: test labels flipped before seed 1 were scored
    and recorded under the first records' digest."""
    from pyro_lora.experiments import setup as S

    real = S.prepare
    calls = []

    def flipped_after_seed_0(config, seed):
        calls.append(seed)
        setup = real(config, seed)
        if seed == 1:
            setup.test = [{**r, "label": 1 - r["label"]} for r in setup.test]
        return setup

    monkeypatch.setattr(C, "prepare", flipped_after_seed_0)
    with pytest.raises(ValueError, match=r"the sst2 records under .* changed during the run \(before seed 1\)"):
        run_compare(small(tmp_path, guides=("temperature",), epochs=0, seeds=(0, 1)))
    assert calls == [0, 1]


def test_a_record_from_before_digests_stays_unchecked(tmp_path):
    """A record written before digests were kept got the data's digest on its next resume, though its old rows were
    never checked against it: from then on they passed for rows scored on that data."""
    folder = RunFolder(tmp_path, small(tmp_path, guides=("map",)))
    folder.add("map", 0, [ROW], arrays(0))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved.pop("data") is None
    (tmp_path / "results.json").write_text(json.dumps(saved))
    again = RunFolder(tmp_path, small(tmp_path, guides=("map", "tfb")))
    with pytest.warns(UserWarning, match="keeps no digest of the data its rows were scored on"):
        again.check_data("c" * 64)
    again.add("tfb", 0, [{**ROW, "guide": "tfb"}], arrays(0))
    assert json.loads((tmp_path / "results.json").read_text())["data"] is None
    fresh = RunFolder(tmp_path / "new", small(tmp_path / "new", guides=("map",)))
    fresh.check_data("c" * 64)
    fresh.add("map", 0, [ROW], arrays(0))
    assert json.loads((tmp_path / "new" / "results.json").read_text())["data"] == "c" * 64


def test_a_resume_after_a_shifted_sets_records_changed_names_that_set(tmp_path):
    """Only sst2_shift/test.jsonl changed, and the refusal blamed "other sst2 records ... (its train, validation or
    test files changed since)": a digest per set names the one that changed; a record from before it names every set
    it may be."""
    config = small(tmp_path, guides=("map",), eval_datasets=("sst2_shift",))
    folder = RunFolder(tmp_path, config)
    folder.check_data("a" * 64, {"sst2": "s" * 64, "sst2_shift": "t" * 64})
    folder.add("map", 0, [ROW], arrays(0))
    assert json.loads((tmp_path / "results.json").read_text())["data_sets"] == {"sst2": "s" * 64, "sst2_shift": "t" * 64}
    with pytest.raises(ValueError, match=r"\(the sst2_shift test records changed since\): restore that data") as error:
        RunFolder(tmp_path, config).check_data("b" * 64, {"sst2": "s" * 64, "sst2_shift": "u" * 64})
    assert "sst2 train" not in str(error.value)
    with pytest.raises(ValueError, match=r"\(the sst2 train, validation or test records changed since\)"):
        RunFolder(tmp_path, config).check_data("b" * 64, {"sst2": "r" * 64, "sst2_shift": "t" * 64})
    saved = json.loads((tmp_path / "results.json").read_text())
    del saved["data_sets"]
    (tmp_path / "results.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"\(the sst2 train, validation or test records or the sst2_shift test records changed "
                                         r"since; its record, written by an older version, keeps one digest for all its sets\)"):
        RunFolder(tmp_path, config).check_data("b" * 64, {"sst2": "s" * 64, "sst2_shift": "u" * 64})
    RunFolder(tmp_path, config).check_data("a" * 64, {"sst2": "s" * 64, "sst2_shift": "t" * 64})  # the same records


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["per_seed"][0].pop("guide"), r"its per_seed\[0\] is not a row with a string guide and dataset and an integer seed"),
    (lambda s: s["per_seed"][0].update(seed="0"), r"its per_seed\[0\] is not a row .* an integer seed"),
    (lambda s: s["per_seed"].append(dict(s["per_seed"][0])), r"its per_seed holds the row of \('map', 'sst2', 0\) twice"),
    (lambda s: s.update(failed=[{"seed": 1, "error": "x"}]), r"its failed\[0\] is not a row with a string guide and an integer seed"),
    (lambda s: s.update(data=123), r"its 'data' is 123, not the SHA-256 digest of the run's records"),
    (lambda s: s.update(data={"train": "x"}), r"its 'data' is \{'train': 'x'\}, not the SHA-256 digest"),
    # a score of the wrong type: "0.50" was averaged by the table and n/a to the verdict, true counted as 1.0, and
    # "n/a" let a resume train a method, then fail its first write and lose it
    (lambda s: s["per_seed"][0].update(nll="0.50"), r"its per_seed\[0\] \(guide map, sst2, seed 0\) holds 'nll': '0.50', not a number"),
    (lambda s: s["per_seed"][0].update(ece=True), r"its per_seed\[0\] \(guide map, sst2, seed 0\) holds 'ece': True, not a number"),
    (lambda s: s["per_seed"][0].update(note=3), r"holds 'note': 3, not a text or null"),
    # a config a resume, a merge or the report reads keys of: a bare KeyError 'seeds' named neither file nor key
    (lambda s: s["config"].pop("seeds"), r"its config lacks 'seeds'"),
    (lambda s: s["config"].pop("epochs"), r"its config lacks 'epochs'"),
    (lambda s: s.update(config=[]), r"its 'config' is a list, not an object of settings"),
    (lambda s: s["config"].update(seeds=[0, "1"]), r"its config's 'seeds' is \[0, '1'\], not a list of integer seeds"),
])
def test_a_hand_edited_record_with_bad_rows_is_refused_by_name(tmp_path, edit, message):
    """A row without a guide raised KeyError 'guide'; a string seed failed after a MAP was retrained, leaving rows of
    seed '0' beside 0; a repeated row counted as one more seed in the table and was dropped by the verdict."""
    RunFolder(tmp_path, small(tmp_path, guides=("map",))).add("map", 0, [ROW], arrays(0))
    saved = json.loads((tmp_path / "results.json").read_text())
    edit(saved)
    (tmp_path / "results.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="results.json is not the results of a `pyro-lora compare` run .*" + message):
        RunFolder(tmp_path, small(tmp_path, guides=("map",)))


def test_a_resume_on_a_record_with_a_score_of_the_wrong_type_is_refused_before_any_work(tmp_path, monkeypatch):
    """A hand-edited "n/a" score was accepted at the start: the resume trained the next method, then died at its
    first write, its result lost and the remaining methods never run."""
    from pyro_lora.experiments import compare

    RunFolder(tmp_path, small(tmp_path, guides=("map",))).add("map", 0, [ROW], arrays(0))
    saved = json.loads((tmp_path / "results.json").read_text())
    saved["per_seed"][0]["brier"] = "n/a"
    (tmp_path / "results.json").write_text(json.dumps(saved))
    monkeypatch.setattr(compare, "prepare", lambda *a, **k: pytest.fail("started work on a record it cannot keep"))
    with pytest.raises(ValueError, match=r"per_seed\[0\] \(guide map, sst2, seed 0\) holds 'brier': 'n/a', not a number or null"):
        compare.run_compare(small(tmp_path, guides=("map", "temperature")))


def test_a_resume_with_another_base_model_is_refused(tmp_path, monkeypatch):
    """The base model was known by its --model path only: a folder holding another checkpoint since gave new rows
    (TFB at accuracy 0.367 where the first base gives 0.633) beside the first base's rows, without a word."""
    from pyro_lora.contract import frozen_base_parameters

    config = small(tmp_path / "run", guides=("temperature",), epochs=0)
    run_compare(config)
    assert len(json.loads((tmp_path / "run" / "results.json").read_text())["base"]) == 64
    real = C.prepare

    def other_checkpoint(config, seed):
        setup = real(config, seed)
        with torch.no_grad():
            frozen_base_parameters(setup.net)[-1][1].add_(0.01)
        return setup

    monkeypatch.setattr(C, "prepare", other_checkpoint)
    # the study's --force replaces only a run of another configuration: its remedy is --update map
    with pytest.raises(ValueError, match="another base model than --model minilm loads now.*another --out \(or pass --overwrite to replace the run\)"):
        run_compare(replace(config, guides=("temperature", "map")))
    monkeypatch.undo()  # the same checkpoint loaded again is the same base: the run goes on
    rows = run_compare(replace(config, guides=("temperature", "map")))
    assert {r["guide"] for r in rows} >= {"temperature", "map"}


def _mlm_checkpoint(folder, classifier=False):
    """A tiny BERT saved from a masked LM (no pooler: loading draws one under the torch seed), MiniLM's tokenizer;
    ``classifier``: from a 2-class sequence classifier instead (loading draws nothing), its weights drawn wide enough
    that a TFB search on SST-2 ends inside its range."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertForSequenceClassification

    from pyro_lora.model_files import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    (BertForSequenceClassification if classifier else BertForMaskedLM)(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_labels=2, initializer_range=0.3 if classifier else 0.02)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_base_digest_reads_every_checkpoint_weight_its_config_and_tokenizer_not_what_loading_draws(tmp_path):
    """An MLM checkpoint (no pooler) had another digest under each seed: a fresh two-seed run was refused at seed 1 as
    "another base model". The digest read 4096 entries per weight and nothing else: swapped embedding rows, a permuted
    vocabulary or another activation in config.json resumed on another model without a word."""
    from safetensors.torch import load_file, save_file

    from pyro_lora.experiments.setup import base_digest

    folder = _mlm_checkpoint(tmp_path / "mlm")
    config = small(tmp_path / "run", model=str(folder))

    def digest(seed=0, model=folder):
        setup = prepare(replace(config, model=str(model)), seed)
        return base_digest(setup.net, setup.tokenizer)

    first = digest()
    assert digest(1) == first  # the pooler drawn under each seed is no part of the checkpoint
    weights = folder / "model.safetensors"
    state = load_file(weights)
    swapped = {k: v.clone() for k, v in state.items()}
    rows = swapped["bert.embeddings.word_embeddings.weight"]
    rows[[1000, 1001]] = rows[[1001, 1000]]  # two rows a strided read skips
    save_file(swapped, weights, metadata={"format": "pt"})
    assert digest() != first
    save_file(state, weights, metadata={"format": "pt"})
    assert digest() == first
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["movie"], vocab["film"] = vocab["film"], vocab["movie"]  # the same weights read under other ids
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    assert digest() != first
    _mlm_checkpoint(folder)
    assert digest() == first
    for name, key in (("tokenizer.json", "normalizer"), ("tokenizer_config.json", None)):
        spec = json.loads((folder / name).read_text())
        (spec[key] if key else spec)["lowercase" if key else "do_lower_case"] = False  # "QUICK" is no longer "quick"
        (folder / name).write_text(json.dumps(spec))
    assert digest() != first  # the same vocabulary
    _mlm_checkpoint(folder)
    side = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**side, "padding_side": "left"}))
    assert digest() == first  # the collators pad on their own side: the batches are the same
    (folder / "tokenizer_config.json").write_text(json.dumps({**side, "truncation_side": "left"}))
    assert digest() != first  # a long text keeps its end: other inputs
    (folder / "tokenizer_config.json").write_text(json.dumps({**side, "split_special_tokens": True}))
    assert digest() != first  # "[SEP]" in a text is read as characters: other ids, though tokenizer.json is the same
    _mlm_checkpoint(folder)
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "hidden_act": "relu"}))
    assert digest() != first
    labels = {"id2label": {"0": "negative", "1": "positive"}, "label2id": {"negative": 0, "positive": 1}}
    (folder / "config.json").write_text(json.dumps({**settings, **labels, "use_cache": False}))
    assert digest() == first  # label names and run-time switches compute nothing (a saved guide's check agrees)
    moved = folder.rename(tmp_path / "elsewhere")
    (moved / "config.json").write_text(json.dumps(settings))
    assert digest(model=moved) == first  # the path is no part of the base


def test_the_base_digest_reads_a_tokenizers_merges():
    """Four BPE merges removed left vocabulary, special tokens and a probe text's ids as they were, while 34 of 200
    training texts were split otherwise: the resume was accepted, a MAP of the old tokens scored on the new."""
    from conftest import tiny_bert
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from pyro_lora.experiments.setup import base_digest

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3}
    net = tiny_bert()
    merged, unmerged = (PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, merges, unk_token="[UNK]")))
                        for merges in ([("a", "b")], []))
    assert merged("ab")["input_ids"] != unmerged("ab")["input_ids"]
    assert base_digest(net, merged) != base_digest(net, unmerged)


def test_the_base_digest_reads_a_checkpoints_trained_head(tmp_path):
    """A classification checkpoint's trained head (peft's frozen "original_module", the copy's start) was left out: a
    resume adding a seed on a checkpoint whose head changed started its MAP from another head without a word."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pyro_lora.experiments.setup import base_digest
    from pyro_lora.model_files import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    net = BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4, num_labels=2))
    for name, scale in (("first", 1.0), ("other", -5.0)):
        with torch.no_grad():
            net.classifier.weight.mul_(scale)
        net.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    config = small(tmp_path / "run")
    digests = [base_digest(s.net, s.tokenizer) for s in (prepare(replace(config, model=str(tmp_path / name)), seed)
                                                          for name, seed in (("first", 0), ("first", 1), ("other", 0)))]
    assert digests[0] == digests[1] != digests[2]


def test_a_run_resumes_from_its_base_model_moved_to_another_folder(tmp_path):
    """The base was compared by --model path too: the same checkpoint in another folder was refused as "another
    configuration" although its digest, the check of the base, was the same."""
    folder = _mlm_checkpoint(tmp_path / "mlm")
    config = small(tmp_path / "run", model=str(folder), guides=("temperature",), epochs=0, seeds=(0, 1))
    run_compare(config)  # two seeds on a checkpoint without a pooler: one base
    moved = folder.rename(tmp_path / "moved")
    rows = run_compare(replace(config, model=str(moved), guides=("temperature", "map")))
    assert {r["guide"] for r in rows} >= {"temperature", "map"}
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["config"]["model"] == str(moved)


def test_evaluate_on_another_base_model_says_so_and_on_the_same_one_moved_reproduces_the_row(tmp_path):
    """evaluate rebuilt the run on whatever --model held now: another checkpoint gave another row noted as "the test
    data or the software changed", and one whose metrics happened to agree said nothing."""
    folder = _mlm_checkpoint(tmp_path / "mlm")
    out = tmp_path / "fit"
    row = S.fit_one(small(out, model=str(folder), guides=("map",)))
    moved = folder.rename(tmp_path / "moved")
    again = S.evaluate_saved(out, progress=False, model=str(moved))
    assert {k: again[k] for k in METRICS} == {k: row[k] for k in METRICS} and "note" not in again
    from safetensors.torch import load_file, save_file

    side = json.loads((moved / "tokenizer_config.json").read_text())
    (moved / "tokenizer_config.json").write_text(json.dumps({**side, "truncation_side": "left"}))  # beyond the guide's view
    other = S.evaluate_saved(out, progress=False, model=str(moved))
    assert other["note"].endswith("scored with another base model than the run's (" + str(moved) + " gives other weights, "
                                  "configuration or tokenizer than when the run was fitted): not the run's row")
    (moved / "tokenizer_config.json").write_text(json.dumps(side))
    state = load_file(moved / "model.safetensors")
    rows = state["bert.embeddings.word_embeddings.weight"]
    rows[[1000, 1001]] = rows[[1001, 1000]]  # rows a guide's fingerprint (strided entries) does not read
    save_file(state, moved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="the base weights differ from the ones the guide was saved with"):
        S.evaluate_saved(out, progress=False, model=str(moved))


def test_bayesianize_refuses_an_adapter_whose_fit_recorded_another_base(tmp_path, monkeypatch):
    """bayesianize compared the adapter's base by folder path: a folder holding other weights since ran TFB on them
    (AURC 0.693 against 0.616) without a word. The fit's run.json beside the adapter records the base's digest; it was
    not found through a link to the adapter, and a relative --model was written into adapter_config.json as given."""
    from safetensors.torch import load_file, save_file

    folder = _mlm_checkpoint(tmp_path / "mlm")
    monkeypatch.chdir(tmp_path)
    S.fit_one(small(tmp_path / "fit", model="mlm", guides=("map",)), adapter=True)
    adapter = tmp_path / "fit" / "guide" / "adapter"
    written = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert written == str(folder.resolve())  # from any directory, the base the adapter was trained on
    moved = folder.rename(tmp_path / "moved")  # the same base elsewhere: taken
    S.bayesianize_adapter(small(tmp_path / "tfb", model=str(moved)), adapter, anchors=8, iterations=1)
    state = load_file(moved / "model.safetensors")
    rows = state["bert.embeddings.word_embeddings.weight"]
    rows[[1000, 1001]] = rows[[1001, 1000]]
    save_file(state, moved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"the adapter in .* was fitted on another base model than --model .*moved loads"):
        S.bayesianize_adapter(small(tmp_path / "tfb2", model=str(moved)), adapter, anchors=8, iterations=1)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "adapter").symlink_to(adapter)
    with pytest.raises(ValueError, match=r"was fitted on another base model than --model .*moved loads"):
        S.bayesianize_adapter(small(tmp_path / "tfb3", model=str(moved)), tmp_path / "links" / "adapter", anchors=8, iterations=1)


def test_bayesianize_under_another_seed_than_the_fit_is_refused_where_loading_draws_weights(tmp_path):
    """An MLM checkpoint has no pooler: loading draws one under the seed, and the adapter does not carry it. Under
    another --seed than the fit's, bayesianize ran the adapter with another pooler (the MAP's probability of one
    sentence moved from 0.461 to 0.441) without a word; another --dtype was refused as "another base model"."""
    folder = _mlm_checkpoint(tmp_path / "mlm")
    S.fit_one(small(tmp_path / "fit", model=str(folder), guides=("map",)), adapter=True)
    adapter = tmp_path / "fit" / "guide" / "adapter"
    with pytest.raises(ValueError, match=r"draws \['bert.pooler.*the fit of .* drew them under seed 0: pass --seed 0"):
        S.bayesianize_adapter(small(tmp_path / "tfb", model=str(folder), seeds=(1,)), adapter, anchors=8, iterations=1)
    with pytest.raises(ValueError, match=r"the fit loaded it otherwise: --dtype 'fp32' there, 'bf16' now"):
        S.bayesianize_adapter(small(tmp_path / "tfb2", model=str(folder), dtype="bf16"), adapter, anchors=8, iterations=1)
    with pytest.raises(ValueError, match="anchors must be a positive integer"):  # it was "n must be", after loading
        S.bayesianize_adapter(small(tmp_path / "tfb3", model=str(folder)), adapter, anchors=True, iterations=1)


def test_bayesianize_takes_the_seed_samples_and_sizes_of_the_fit_beside_the_adapter(tmp_path, capfd):
    """`bayesianize` on the MAP adapter of `fit --seed 1 --adapter` searched under seed 0 (other anchors, other noise),
    4 samples and compare's default model and sizes whatever the fit's run.json beside it recorded (sigma_q 0.032 where
    compare's tfb row of seed 1 has 0.010). A flag left out now takes the fit's value; one given otherwise is warned of,
    naming both values."""
    folder = _mlm_checkpoint(tmp_path / "bert", classifier=True)
    capfd.readouterr()  # saving's bar
    flags = ["--model", str(folder), "--train-size", "40", "--test-size", "16", "--samples", "2", "--max-length", "24",
             "--batch-size", "8", "--epochs", "2", "--lr", "1e-2", "--seed", "1", "--quiet"]
    assert cli.main(["fit", "--guide", "map", "--adapter", *flags, "--out", str(tmp_path / "map")]) == 0
    assert cli.main(["fit", "--guide", "tfb", *flags, "--out", str(tmp_path / "tfb")]) == 0  # compare's tfb row of seed 1
    adapter = str(tmp_path / "map" / "guide" / "adapter")
    assert cli.main(["bayesianize", adapter, "--quiet", "--out", str(tmp_path / "bayes")]) == 0
    # the warnings on the sentences --max-length 24 cuts (of every run on these splits) and on 36 anchors aside
    said = lambda: [line for line in capfd.readouterr().err.splitlines()  # noqa: E731
                    if "--max-length 24" not in line and "TFB search: only 36 anchors" not in line]
    assert said() == []
    assert cli.main(["bayesianize", adapter, "--seed", "0", "--samples", "2", "--quiet", "--out", str(tmp_path / "seed0")]) == 0
    warned = said()
    sigma = {d: float(read_safetensors(tmp_path / d / "guide" / "guide.safetensors")["sigma_q"])
             for d in ("tfb", "bayes", "seed0")}
    fitted, bayesianized = (json.loads((tmp_path / d / "guide" / "run.json").read_text()) for d in ("tfb", "bayes"))
    assert sigma["bayes"] == sigma["tfb"] > 0 and bayesianized["seed"] == 1 and bayesianized["sizes"] == fitted["sizes"]
    assert sigma["seed0"] != sigma["tfb"]  # the seed moves the search
    for key in ("accuracy", "ece", "nll", "brier", "mutual_information"):
        assert bayesianized["result"][key] == pytest.approx(fitted["result"][key], rel=1e-6, abs=1e-9), key
    assert warned == [f"pyro-lora: warning: bayesianize runs with other settings than the fit of {adapter} recorded: "
                      "--seed 0 (the fit: 1); its sigma_q or row is not compare's tfb row for that fit (pyro-lora "
                      "bayesianize takes the fit's value of each flag left out)"]


def _three_classes(data, names=("neg", "neu", "pos"), edited=()):
    """A 3-class set ``data/tri`` of 40 training and 16 test sentences (every one used at those sizes), each class's
    words among filler words; ``names``: its label_names, the same classes in any order (the records relabelled to
    match); ``edited``: the splits whose first sentence gets one more word."""
    import random

    words, fill = {"neg": "bad awful", "neu": "okay plain", "pos": "good great"}, "the movie plot actor scene".split()
    rng = random.Random(0)
    (data / "tri").mkdir(parents=True)
    (data / "tri" / "meta.json").write_text(json.dumps({"task": "classification", "label_names": list(names)}))
    for split, n in (("train", 40), ("test", 16)):
        classes = [rng.choice(("neg", "neu", "pos")) for _ in range(n)]
        texts = [" ".join(rng.sample(fill, 3) + [rng.choice(words[c].split()), split, str(i)]) for i, c in enumerate(classes)]
        if split in edited:
            texts[0] += " again"
        records = [{"id": f"{split}{i}", "text": t, "label": names.index(c)} for i, (t, c) in enumerate(zip(texts, classes))]
        (data / "tri" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(data)


def test_bayesianize_and_evaluate_compare_the_data_with_the_fits_label_names_and_records(tmp_path, capfd, monkeypatch):
    """bayesianize of a `fit --adapter` adapter on a datasets folder whose meta.json names the same 3 classes in
    another order (the records relabelled to match) scored the fit's head on it without a word: accuracy 0.245 / NLL
    2.118 against 0.775 / 0.600 on the fit's own folder, the row saved. evaluate --data-dir did the same. The fit's
    run.json now records the label names and a digest of its training and test records; other names or order are
    refused before loading, other records said, and a record from before them is warned of."""
    folder = _mlm_checkpoint(tmp_path / "bert")
    data = _three_classes(tmp_path / "data")
    swapped = _three_classes(tmp_path / "swapped", names=("pos", "neu", "neg"))
    edited = _three_classes(tmp_path / "edited", edited=("train", "test"))
    capfd.readouterr()  # saving's bar
    flags = ["--model", str(folder), "--dataset", "tri", "--train-size", "40", "--test-size", "16", "--max-length", "16",
             "--batch-size", "8", "--quiet"]
    search = ["--anchors", "8", "--iterations", "1", "--quiet"]

    def said():  # what the commands printed to stderr but the search's notes on its range and its 8 anchors
        return [line for line in capfd.readouterr().err.splitlines()
                if "TFB search: high=0.2 is already feasible" not in line and "TFB search: only 8 anchors" not in line]

    assert cli.main(["fit", "--guide", "map", "--adapter", *flags, "--data-dir", data, "--epochs", "1", "--out",
                     str(tmp_path / "fit")]) == 0
    adapter = str(tmp_path / "fit" / "guide" / "adapter")
    said()
    monkeypatch.setattr(S, "prepare", lambda *a, **k: pytest.fail("loaded the model"))
    for argv, whose in ((["bayesianize", adapter, *search, "--out", str(tmp_path / "swapped_tfb")], f"the adapter in {adapter}"),
                        (["evaluate", str(tmp_path / "fit"), "--quiet"], f"the guide in {tmp_path / 'fit' / 'guide'}")):
        assert cli.main([*argv, "--data-dir", swapped]) == 2
        assert capfd.readouterr().err == (
            f"pyro-lora: error: {whose} was fitted on data labelled ['neg', 'neu', 'pos'] (its run.json) and 'tri' under "
            f"{swapped} is labelled ['pos', 'neu', 'neg'] (its meta.json; the same classes in another order): labels are "
            f"indices, so every example would be scored as another class; give --data-dir the datasets folder of the fit "
            f"({data}), or data labelled ['neg', 'neu', 'pos'] in this order (--debug shows where)\n")
    monkeypatch.undo()
    assert cli.main(["bayesianize", adapter, *search, "--out", str(tmp_path / "same")]) == 0
    assert said() == []  # the fit's own data: nothing to say
    assert cli.main(["bayesianize", adapter, *search, "--data-dir", edited, "--out", str(tmp_path / "edited_tfb")]) == 0
    assert said() == [
        f"pyro-lora: warning: bayesianize runs on other records than the fit of {adapter} recorded: the training and test "
        f"records of 'tri' under {edited} differ from the fit's (its run.json's digests); its sigma_q or row is not "
        "compare's tfb row for that fit"]
    row = S.evaluate_saved(tmp_path / "fit", data_dir=edited, progress=False)
    assert row["note"] == ("scored on other test records than the run's (the data folder gives others than the ones its "
                           "run.json recorded): not the run's row")
    # a fit recorded before runs kept their data's label names and records: said, and run as before
    monkeypatch.setattr(S, "_data_record", lambda *a: {})
    assert cli.main(["fit", "--guide", "map", "--adapter", *flags, "--data-dir", data, "--epochs", "1", "--out",
                     str(tmp_path / "old")]) == 0
    monkeypatch.undo()
    old = str(tmp_path / "old" / "guide" / "adapter")
    assert cli.main(["bayesianize", old, *search, "--data-dir", swapped, "--out", str(tmp_path / "old_tfb")]) == 0
    assert said() == [
        f"pyro-lora: warning: the run.json of the adapter in {old} was written before runs recorded their data's label "
        f"names and records: whether 'tri' under {swapped} is the data it was fitted on could not be checked"]


def test_quiet_silences_transformers_logging_and_gives_its_verbosity_back(tmp_path):
    """--quiet hid the progress bars only: transformers' load report (the fresh head and pooler a masked-LM checkpoint
    loaded as a classifier lacks, some 20 lines) was printed all the same."""
    import logging

    from transformers.utils import logging as hf_logging

    folder = _mlm_checkpoint(tmp_path / "bert")
    data = _three_classes(tmp_path / "data")
    logged = logging.Handler()  # what transformers logs, wherever its own handler prints it
    logged.emit = lambda record: said.append(record.getMessage())
    argv = ["fit", "--model", str(folder), "--dataset", "tri", "--data-dir", data, "--train-size", "40", "--test-size",
            "16", "--max-length", "16", "--epochs", "1", "--out"]
    verbosity = hf_logging.get_verbosity()
    logging.getLogger("transformers").addHandler(logged)
    try:
        said = []
        assert cli.main([*argv, str(tmp_path / "loud")]) == 0
        assert any("LOAD REPORT" in text for text in said)  # what there is to silence
        said = []
        assert cli.main([*argv, str(tmp_path / "quiet"), "--quiet"]) == 0
        assert said == [] and hf_logging.get_verbosity() == verbosity
    finally:
        logging.getLogger("transformers").removeHandler(logged)


def test_a_run_recorded_with_a_relative_model_path_is_the_same_model_given_absolute(tmp_path, monkeypatch):
    """Runs recorded --model as given: with base digests of an older form compared by path, "tinybert" there and its
    absolute path now were "another configuration" (the run refused, its MAP trained again)."""
    from pyro_lora.experiments.results import config_differences

    (tmp_path / "tinybert").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = {"config": asdict(CompareConfig(model="tinybert"))}
    assert config_differences(saved, CompareConfig(model=str(tmp_path / "tinybert"))) == {}
    assert config_differences(saved, CompareConfig(model="./tinybert")) == {}
    assert "model" in config_differences(saved, CompareConfig(model="minilm"))
    assert "model" in config_differences({"config": {"model": None}}, {"model": "minilm"})  # a corrupt record: no TypeError


def test_a_fit_run_records_a_local_models_path_absolute(tmp_path, monkeypatch):
    """run.json kept --model as given: a run fitted with a relative path could not be evaluated from another working
    directory ("'tinybert' is neither an embedded model nor a local model folder")."""
    from types import SimpleNamespace

    (tmp_path / "tinybert").mkdir()
    monkeypatch.chdir(tmp_path)
    method = SimpleNamespace(model=SimpleNamespace(name="lora"), predictive=SimpleNamespace(__name__="weight_samples"))
    monkeypatch.setattr(S, "base_digest", lambda net, tokenizer: "0" * 64)  # the stand-in setup holds no network
    setup = SimpleNamespace(config=CompareConfig(model="tinybert", out="unused"), sizes=None, seed=0, net=None, tokenizer=None,
                            train=[], val=[], test=[])
    assert S.run_record(setup, {}, method)["config"]["model"] == str(tmp_path / "tinybert")
    setup.config = CompareConfig(model="minilm", out="unused")
    (tmp_path / "minilm").mkdir()  # an embedded name stays the embedded model, whatever the working directory holds
    assert S.run_record(setup, {}, method)["config"]["model"] == "minilm"


@pytest.mark.real
def test_a_failing_ts_step_keeps_its_methods_rows_and_a_rerun_adds_the_ts_row(tmp_path, monkeypatch):
    """The +ts step ran in one unit with its method: a failing validation predictive or temperature fit dropped the
    method's test and shift rows scored before it, and the whole method was recorded as failed for the seed."""
    config = small(tmp_path, guides=("mcdropout",))

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory on the validation split")

    monkeypatch.setattr(C, "fit_temperature", boom)
    with pytest.raises(GuideFailures, match=r"^1 guide run\(s\) failed: mcdropout\+ts \(seed 0\): RuntimeError: out of memory"):
        run_compare(config)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["guide"], r["seed"]) for r in saved["per_seed"]] == [("mcdropout", 0)]
    assert [(f["guide"], f["seed"]) for f in saved["failed"]] == [("mcdropout+ts", 0)]
    assert [r["guide"] for r in saved["summary"]] == ["mcdropout"] and "failed" not in (saved["summary"][0].get("note") or "")
    monkeypatch.undo()
    summary = run_compare(config)  # resumed: the method reruns for its +ts row
    assert [r["guide"] for r in summary] == ["mcdropout", "mcdropout+ts"]
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert resumed["failed"] == [] and {k: resumed["per_seed"][0][k] for k in METRICS} == {k: saved["per_seed"][0][k] for k in METRICS}


def test_a_ts_rows_failure_marks_its_ts_rows_alone():
    from pyro_lora.experiments.results import summarize_run
    from pyro_lora.experiments.study_header import run_state

    rows = [{**ROW, "guide": g, "seed": s} for g in ("llla", "llla+ts") for s in (0, 1)]
    rows = [r for r in rows if (r["guide"], r["seed"]) != ("llla+ts", 1)]
    failed = [{"guide": "llla+ts", "seed": 1}]
    notes = {r["guide"]: r.get("note") for r in summarize_run(rows, failed)}
    assert notes["llla"] is None and notes["llla+ts"].startswith("failed under seed 1")
    run = {"config": {"dataset": "sst2", "eval_datasets": [], "guides": ["llla"], "seeds": [0, 1]}, "per_seed": rows, "failed": failed}
    assert run_state(run) == ["**failed**: llla+ts (seed 1) (tracebacks in its results.json, under 'failed')"]


def test_a_failure_notes_only_the_rows_its_seed_lacks_and_names_its_set():
    """A method that failed on one shifted set, then outright on a rerun, kept the first run's rows of that seed,
    and every summary row said "failed under seed 0: mean over the others" though its mean held seed 0. A failure is
    noted where the seed's row is missing; the study header names the set a scoring failed on."""
    from pyro_lora.experiments.results import summarize_run
    from pyro_lora.experiments.study_header import run_state

    rows = [{**ROW, "guide": "laplace", "dataset": d, "seed": s} for d in ("sst2", "shift_b") for s in (0, 1)]
    rows.append({**ROW, "guide": "laplace", "dataset": "shift_a", "seed": 1})
    notes = {r["dataset"]: r.get("note") or "" for r in summarize_run(rows, [{"guide": "laplace", "seed": 0}])}
    assert "failed" not in notes["sst2"] + notes["shift_b"] and notes["shift_a"].startswith("failed under seed 0")
    run = {"config": {"dataset": "sst2", "eval_datasets": ["shift_a", "shift_b"], "guides": ["laplace"], "seeds": [0, 1]}, "per_seed": rows,
           "failed": [{"guide": "laplace", "seed": 0, "dataset": "shift_a"}]}
    assert run_state(run) == ["**failed**: laplace (seed 0, on shift_a) (tracebacks in its results.json, under 'failed')"]



def test_a_row_name_whose_rows_are_all_of_the_version_left_out_keeps_an_n_a_row_saying_why():
    """tfb seed 0 of version 1 (its own and its +ts row) beside tfb+ts seed 1 of version 2: one_version keeps version
    2, so tfb had no row left on sst2 and vanished from the summary (and the table) with its note and its failure. It
    keeps a row there, no seed averaged and every number n/a, in its place, saying why."""
    import math

    from pyro_lora.experiments.results import summarize_run
    from pyro_lora.experiments.table import format_table, partial_seeds_note

    rows = [{**ROW, "guide": "map", "seed": s} for s in (0, 1)]
    rows += [{**ROW, "guide": g, "seed": 0, "method_version": 1} for g in ("tfb", "tfb+ts")]
    rows.append({**ROW, "guide": "tfb+ts", "seed": 1, "method_version": 2, "accuracy": 0.6})
    summary = summarize_run(rows, [{"guide": "tfb", "seed": 2}])
    assert [r["guide"] for r in summary] == ["map", "tfb", "tfb+ts"]  # in the rows' order
    tfb = summary[1]
    left = ("seed 0: rows of version 1 left out, not averaged with version 2's; a run of tfb reruns them (a resume "
            "naming it in --guides, `pyro-lora study --update tfb`)")
    assert tfb["seeds"] == [] and tfb["note"] == left + "; failed under seed 2 (results.json 'failed'): no other seed's row to average"
    assert all(math.isnan(tfb[k]) and math.isnan(tfb[k + "_std"]) for k in ("accuracy", "ece", "nll"))
    assert summary[2]["seeds"] == [1] and summary[2]["accuracy"] == 0.6
    line = next(line for line in format_table(summary).splitlines() if line.startswith("| tfb (note) |"))
    assert "n/a" in line and "0." not in line
    assert partial_seeds_note(tfb, summary) is None  # a row of no seed is no partial mean: its note says why

def test_rows_of_another_cloze_scoring_are_not_joined(tmp_path):
    """Per-character cloze scores divided by len(choice) + 1 before 2026-12-03: a resume or an --update of such a run
    averaged rows of both scorings into one mean, without a word."""
    config = small(tmp_path / "run", dataset="openbookqa", mc_format="cloze", mc_normalize="chars")
    row = {**ROW, "dataset": "openbookqa"}
    folder = RunFolder(tmp_path / "run", config)
    folder.check_scoring(config)
    folder.add("map", 0, [row], {k.replace("sst2", "openbookqa"): v for k, v in arrays(0).items()})
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["scoring"] == CLOZE_SCORING == 5
    RunFolder(tmp_path / "run", config).check_scoring(config)  # the same form: resumed
    (tmp_path / "run" / "results.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "scoring"}))
    with pytest.raises(ValueError, match=r"holds rows of another multiple-choice scoring \(cloze form 0 there, 5 now"):
        RunFolder(tmp_path / "run", config).check_scoring(config)
    letter = small(tmp_path / "letter", dataset="openbookqa", mc_format="letter")
    RunFolder(tmp_path / "letter", letter).check_scoring(letter)  # no cloze: nothing changed
    from pyro_lora.experiments.results import merge_results, recorded_scoring

    assert recorded_scoring({k: v for k, v in saved.items() if k != "scoring"}) == 0 and recorded_scoring(saved) == 5
    old = {k: v for k, v in saved.items() if k != "scoring"}  # a run of two methods, one of them rerun now
    (tmp_path / "run" / "results.json").write_text(json.dumps(old | {"config": {**old["config"], "guides": ["map", "temperature"]}}))
    update = tmp_path / "update"
    update.mkdir()
    (update / "results.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"differ in scoring \(cloze form 0 there, 5 in the rerun\)"):
        merge_results(tmp_path / "run", update)


def test_rows_of_a_run_on_another_number_of_ranks_are_not_joined(tmp_path, monkeypatch):
    """A one-process rerun into a two-rank run's folder resumed it without a word: seed 0 (2 steps of 16 examples, 4
    dropped) and seed 1 (5 steps of 8) were averaged as seeds of one training."""
    from pyro_lora.experiments import results as R

    monkeypatch.setattr(R, "world_size", lambda: 2)
    R.RunFolder(tmp_path / "run", small(tmp_path / "run", guides=("map",))).add("map", 0, [ROW], arrays(0))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["ranks"] == 2
    R.RunFolder(tmp_path / "run", small(tmp_path / "run", guides=("map",), seeds=(0, 1))).check_ranks()  # the same
    monkeypatch.setattr(R, "world_size", lambda: 1)
    more = R.RunFolder(tmp_path / "run", small(tmp_path / "run", guides=("map",), seeds=(0, 1)))  # read: fine
    with pytest.raises(ValueError, match=r"holds a run trained on 2 ranks \(torch.distributed\), and this run has one "
                                         r"process: .*rerun on 2 ranks \(torch.distributed\), choose another --out"):
        more.check_ranks()  # rows to add
    with pytest.raises(ValueError, match=r"holds a run trained on 2 ranks"):  # as compare refuses it, before any work
        run_compare(small(tmp_path / "run", guides=("map",), seeds=(0, 1)))
    old = {k: v for k, v in saved.items() if k != "ranks"}  # a record from before the number was kept: not compared
    (tmp_path / "run" / "results.json").write_text(json.dumps(old))
    legacy = R.RunFolder(tmp_path / "run", small(tmp_path / "run", guides=("map",), seeds=(0, 1)))
    legacy.check_ranks()
    legacy.add("map", 1, [{**ROW, "seed": 1}], arrays(1))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["ranks"] is None  # unknown, not stamped 1
    (tmp_path / "run" / "results.json").write_text(json.dumps(saved | {"config": {**saved["config"], "guides": ["map", "tfb"]}}))
    update = tmp_path / "update"
    update.mkdir()
    (update / "results.json").write_text(json.dumps(saved | {"ranks": 1}))
    with pytest.raises(ValueError, match=r"differ in ranks \(trained on 2 torch.distributed ranks there, 1 in the rerun\)"):
        merge_results(tmp_path / "run", update)


def test_rows_of_an_older_cloze_scoring_that_scores_the_run_alike_are_joined(tmp_path):
    """Every cloze run written before a form change was refused a resume or an --update, though the change (the
    per-character divisor, the truncated context, WinoGrande's continuation) may not touch its rows at all: ARC-Easy
    unnormalized, no row cut, took a rerun of every method for rows equal to the old ones. A record without a form may
    be older than form 1 (each choice tokenized alone): taken as form 0."""
    from pyro_lora.experiments.results import merge_results
    from pyro_lora.experiments.setup import scoring_since

    plain = small(tmp_path / "run", dataset="arc_easy", mc_format="cloze")
    chars = small(tmp_path / "run", dataset="arc_easy", mc_format="cloze", mc_normalize="chars")
    question = {"id": "q", "question": "What is the capital of France?", "choices": ["Paris", "Rome"], "label": 0}
    blank = {"id": "w", "question": "Ann lent Bo a pen because _ had two.", "choices": ["Ann", "Bo"], "label": 0}
    python = {"id": "p", "question": "In Python, what does _ hold?", "choices": ["the last value", "nothing"], "label": 0}
    assert scoring_since(plain, set(), [question]) == 0  # no change since form 0 touches it
    assert scoring_since(plain, set(), [{**blank, "blank": True}]) == 0  # WinoGrande unnormalized, uncut
    assert scoring_since(plain, {"split"}, [question]) == 1  # form 1 scores a choice's tokens within its context
    assert scoring_since(chars, set(), [question]) == 2  # the per-character divisor changed in form 2
    assert scoring_since(chars, set(), [{**blank, "blank": True}]) == 3  # WinoGrande's per-character count in form 3
    assert scoring_since(plain, {"cut"}, [question]) == 4  # the cut changed in forms 1, 2 and 4
    assert scoring_since(plain, {"unshared"}, [question]) == 4  # a cache shared in form 0, refused for more decoders in 4
    assert scoring_since(plain, set(), [question, python]) == 4  # a lone '_' outside WinoGrande: a question since form 4
    assert scoring_since(plain, {"split", "merge"}, [question]) == 5  # a choice merged with its context's end: form 5
    row = {**ROW, "dataset": "arc_easy"}
    folder = RunFolder(tmp_path / "run", plain)
    folder.check_scoring(plain, 0)
    folder.add("map", 0, [row], {k.replace("sst2", "arc_easy"): v for k, v in arrays(0).items()})
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    keyless = {k: v for k, v in saved.items() if k not in ("scoring", "scoring_since")}  # written before forms were kept
    (tmp_path / "run" / "results.json").write_text(json.dumps(keyless))
    for since in (1, None):  # a change touches the run, or its records were not looked at: refused
        with pytest.raises(ValueError, match=r"cloze form 0 there, 5 now"):
            RunFolder(tmp_path / "run", plain).check_scoring(plain, since)
    resumed = RunFolder(tmp_path / "run", plain)
    resumed.check_scoring(plain, 0)
    resumed.add("map", 1, [{**row, "seed": 1}], {k.replace("sst2", "arc_easy"): v for k, v in arrays(1).items()})
    joined = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (joined["scoring"], joined["scoring_since"]) == (5, 0)  # the old rows are the form's now
    # an --update: the rerun's record says which forms score its rows alike
    (tmp_path / "run" / "results.json").write_text(json.dumps(keyless | {"config": {**keyless["config"], "guides": ["map", "temperature"]}}))
    update = tmp_path / "update"
    update.mkdir()
    (update / "results.json").write_text(json.dumps(saved | {"scoring_since": 1}))
    with pytest.raises(ValueError, match=r"differ in scoring \(cloze form 0 there, 5 in the rerun\)"):
        merge_results(tmp_path / "run", update)
    (update / "results.json").write_text(json.dumps(saved))
    merge_results(tmp_path / "run", update)
    merged = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (merged["scoring"], merged["scoring_since"]) == (5, 0)


@pytest.mark.real
def test_a_letter_prompt_cut_into_its_options_is_refused_before_training(monkeypatch):
    """The cloze format's records were collated before training; a letter prompt whose options --max-length cut was
    refused only when its split was collated, part-way through the run."""
    from pyro_lora.experiments import setup as S

    monkeypatch.setattr(S, "train_map", lambda *a, **k: pytest.fail("trained before refusing"), raising=False)
    config = CompareConfig(model="smollm2", dataset="arc_easy", mc_format="letter", max_length=24, train_size=8,
                           test_size=4, out="unused", progress=False)
    with pytest.raises(ValueError, match=r"^the \w+ records cannot be collated \(.*options.*\); checked before training"):
        prepare(config, 0)


@pytest.mark.parametrize("guide", ["meanfield_val", "flow_val", "scalabl_val"])
def test_evaluate_counts_a_fitted_posterior_temperature_as_the_fit_does(tmp_path, guide):
    """fit's row counted meanfield_val's posterior temperature in +params (257), evaluate's left it out (256)."""
    row = S.fit_one(toy_run(tmp_path, guides=(guide,)))
    again = S.evaluate_saved(tmp_path / "out", progress=False)
    saved = json.loads((tmp_path / "out" / "guide" / "guide.json").read_text())
    assert saved["config"]["temperature"] == row["posterior_temperature"]  # the fitted number, saved with the guide
    base = S.fit_one(toy_run(tmp_path / "base", guides=(guide.removesuffix("_val"),)))["extra_parameters"]
    assert again["extra_parameters"] == row["extra_parameters"] == base + 1


def test_bayesianize_refuses_an_adapter_swapped_in_from_another_save(tmp_path):
    """bayesianize read guide/adapter and the run.json beside it unchecked: another save's adapter/ (another seed's
    head) put there ran under this record's settings and seed."""
    import shutil

    for seed in (0, 1):
        S.fit_one(toy_run(tmp_path / f"s{seed}", guides=("map",), seeds=(seed,)), adapter=True)
    heads = [read_safetensors(tmp_path / f"s{seed}" / "out" / "guide" / "adapter" / "adapter_model.safetensors")
             for seed in (0, 1)]
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0] if "classifier" in k)  # two other adapters
    assert S.fit_settings(tmp_path / "s1" / "out" / "guide" / "adapter")["seed"] == 1  # its own: read
    adapter = tmp_path / "s0" / "out" / "guide" / "adapter"
    shutil.rmtree(adapter)
    shutil.copytree(tmp_path / "s1" / "out" / "guide" / "adapter", adapter)
    config = toy_run(tmp_path / "tfb", guides=("tfb",))
    with pytest.raises(ValueError, match=r"adapter.*(not the one saved|SHA-256)"):
        S.bayesianize_adapter(config, adapter)
    with pytest.raises(ValueError, match=r"adapter.*(not the one saved|SHA-256)"):
        S.fit_settings(adapter)  # what the command line reads first


def test_rows_of_an_older_version_of_their_method_are_not_complete_and_every_seed_of_them_is_rerun(tmp_path):
    """tfb's rows made before its canonical SVD signs (version 2) hold another sigma_q under the same seed: a resume
    that kept them beside new rows averaged two methods as one."""
    from pyro_lora.experiments.results import unfinished_runs

    config = small(tmp_path, guides=("map", "tfb"), ts=False)
    folder = RunFolder(tmp_path, config)
    for seed in (0, 1):
        folder.add("map", seed, [{**ROW, "seed": seed}], arrays(seed))
        folder.add("tfb", seed, [{**ROW, "guide": "tfb", "seed": seed}], arrays(seed))
    record = json.loads((tmp_path / "results.json").read_text())
    assert {r["method_version"] for r in record["per_seed"] if r["guide"] == "tfb"} == {METHODS["tfb"].version} == {2}
    assert RunFolder(tmp_path, config).unfinished(["map", "tfb"], [0, 1]) == []  # the current version: kept
    for r in record["per_seed"]:
        if r["guide"] == "tfb" and r["seed"] == 1:
            del r["method_version"]  # as written before it was kept: version 1
    (tmp_path / "results.json").write_text(json.dumps(record))
    again = RunFolder(tmp_path, config)
    assert again.complete("map", 1, ["sst2"]) and again.complete("tfb", 0, ["sst2"]) and not again.complete("tfb", 1, ["sst2"])
    # a resume of seed 0 alone reruns seed 1's old rows too: else seed 0's new rows would join them
    assert again.unfinished(["map", "tfb"], [0]) == [("tfb", 1)]
    assert unfinished_runs(None, record["per_seed"], ["map", "tfb"], [0, 1], ["sst2"], False) == [("tfb", 1)]
    assert not again.has_other_seeds("tfb", 0) and again.has_other_seeds("map", 0)  # seed 0's new rows join none
    assert again.drop_older_versions(["map", "tfb"]) == {"tfb": ([1], [1])}
    assert [(r["guide"], r["seed"]) for r in again.rows] == [("map", 0), ("map", 1), ("tfb", 0)]


def test_rows_of_two_versions_of_a_method_are_never_averaged_by_a_summary_a_verdict_or_a_merge(tmp_path, monkeypatch):
    """A run holding tfb seed 0 of version 1 and seeds 1, 2 of version 2 (a resume that did not run tfb, a merge of
    another method's --update) averaged the three into one mean, ± and verdict: accuracy 0.733 where version 2's rows
    alone give 0.600 ± 0.141. Those are kept, and the note names the seed left out; the record keeps every row."""
    from pyro_lora.experiments import results
    from pyro_lora.experiments.results import merge_results
    from pyro_lora.experiments.verdict import verdict

    # made-up accuracies beside placeholder arrays: the versions are what is tested, not the scores (whose check is
    # test_a_finished_row_edited_since_is_refused_naming_the_field_and_both_values's)
    monkeypatch.setattr(results, "check_scores", lambda *a, **k: [])

    config = small(tmp_path / "run", guides=("map", "tfb"), seeds=(0, 1, 2), ts=False)
    folder = RunFolder(tmp_path / "run", config)
    for seed, accuracy in enumerate((0.5, 0.5, 0.7)):
        folder.add("map", seed, [{**ROW, "seed": seed}], arrays(seed))
        folder.add("tfb", seed, [{**ROW, "guide": "tfb", "seed": seed, "accuracy": accuracy}], arrays(seed))
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    for r in record["per_seed"]:
        if r["guide"] == "tfb" and r["seed"] == 0:
            r.update(method_version=1, accuracy=1.0)  # the old code's row
    (tmp_path / "run" / "results.json").write_text(json.dumps(record))

    def check(summary, text):
        tfb = next(r for r in summary if r["guide"] == "tfb")
        assert tfb["seeds"] == [1, 2] and tfb["accuracy"] == pytest.approx(0.6) and tfb["accuracy_std"] == pytest.approx(2 ** 0.5 / 10)
        assert "seed 0: rows of version 1 left out, not averaged with version 2's" in tfb["note"]
        assert "- tfb: seed 0 of version 1 left out, compared on its version 2 rows alone" in text

    resumed = RunFolder(tmp_path / "run", replace(config, guides=("map",)))  # a resume that does not run tfb
    check(resumed.summary(), verdict(resumed.rows, "sst2"))
    assert len(resumed.rows) == 6  # nothing dropped from the record: a run of tfb reruns seed 0
    update = small(tmp_path / "update", guides=("map",), seeds=(0, 1, 2), ts=False)
    rerun = RunFolder(tmp_path / "update", update)
    for seed in (0, 1, 2):
        rerun.add("map", seed, [{**ROW, "seed": seed}], arrays(seed))
    summary = merge_results(tmp_path / "run", tmp_path / "update")
    check(summary, json.loads((tmp_path / "run" / "results.json").read_text())["verdict"])
    from pyro_lora.experiments.versions import one_version

    assert one_version(record["per_seed"])[1] == {"tfb": ([0], [1], 2)}


@pytest.mark.real
def test_a_resume_reruns_rows_of_an_older_version_of_the_method_and_gives_the_uninterrupted_runs_rows(tmp_path):
    """A compare run begun before ceee03e (tfb version 1) and resumed after it kept seed 0's old tfb rows (sigma_q
    0.1436, accuracy 0.333 where the current code gives 0.2000, 0.500) and averaged them with seed 1's new ones."""
    config = toy_run(tmp_path, guides=("map", "tfb"), seeds=(0,))
    reference = run_compare(replace(config, seeds=(0, 1), out=str(tmp_path / "reference")))
    out = tmp_path / "out"
    run_compare(config)
    record = json.loads((out / "results.json").read_text())
    for r in record["per_seed"]:
        if r["guide"].startswith("tfb"):
            r.pop("method_version", None)  # rows of the old code: other numbers, no version
            r.update(sigma_q=0.1436, accuracy=1 / 3)
    (out / "results.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=r"tfb: its rows of seed 0 .* an older version of the method \(1, now 2\): rerun"):
        resumed = run_compare(replace(config, seeds=(0, 1)))
    rows = json.loads((out / "results.json").read_text())["per_seed"]
    assert all(r["method_version"] == METHODS[r["guide"].removesuffix("+ts")].version for r in rows)
    expected = json.loads((tmp_path / "reference" / "results.json").read_text())["per_seed"]
    keys = (*METRICS, "sigma_q")
    assert [{k: r.get(k) for k in ("guide", "seed", *keys)} for r in rows] == \
        [{k: r.get(k) for k in ("guide", "seed", *keys)} for r in expected]
    assert json.dumps([{k: r[k] for k in METRICS} for r in resumed]) == json.dumps([{k: r[k] for k in METRICS} for r in reference])
    # rows of the current version are kept: nothing is rerun (marked by a cost: an edited score is refused)
    marked = json.loads((out / "results.json").read_text())
    for r in marked["per_seed"]:
        r["fit_seconds"] = 12345.0 if r["guide"] == "tfb" else r["fit_seconds"]
    (out / "results.json").write_text(json.dumps(marked))
    run_compare(replace(config, seeds=(0, 1)))
    assert {r["fit_seconds"] for r in json.loads((out / "results.json").read_text())["per_seed"] if r["guide"] == "tfb"} == {12345.0}


def test_a_finished_row_edited_since_is_refused_naming_the_field_and_both_values(tmp_path, monkeypatch):
    """A resume checked only that a finished row's arrays exist: a row whose accuracy was edited (or copied from another
    run) was printed, averaged and judged by the verdict as the run's, though its own predictions give another."""
    out = tmp_path / "run"
    config = small(out, guides=("map",), ts=False)
    first = run_compare(config)
    record = (out / "results.json").read_bytes()
    monkeypatch.setattr(C, "prepare", lambda *a, **k: pytest.fail("a finished run trains nothing"))
    again = run_compare(config)  # untouched: resumed as before, its record as it was
    assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)
    assert (out / "results.json").read_bytes() == record
    saved = json.loads(record)
    (row,) = saved["per_seed"]
    truth = dict(row)
    row["nll"] = float(np.float32(row["nll"]))  # float rounding is no edit
    (out / "results.json").write_text(json.dumps(saved))
    run_compare(config)
    edited = {**saved, "per_seed": [{**row, "accuracy": 0.95}]}
    (out / "results.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=re.escape(f"{out / 'results.json'}: the row of map on sst2, seed 0 holds accuracy "
                                                   f"0.95 where its own arrays in predictions_map.npz give {truth['accuracy']!r}")
                       + r".*remove the rows of map under seed 0 from results.json's per_seed"):
        run_compare(config)
    assert json.loads((out / "results.json").read_text()) == edited  # nothing written
    # the setting and +params too: each moved the table and the verdict (a method "validation-tuned") without a word
    for field, value, says in (("setting", "validation-tuned", "where the method's is 'no validation data'"),
                               ("extra_parameters", 5, f"where its arrays in predictions_map.npz record {truth['extra_parameters']}")):
        (out / "results.json").write_text(json.dumps({**saved, "per_seed": [{**truth, field: value}]}))
        with pytest.raises(ValueError, match=re.escape(f"{out / 'results.json'}: the row of map on sst2, seed 0 holds "
                                                       f"{field} {value!r}, {says}: the row was edited")):
            run_compare(config)
        edited_row = {**truth, field: value}  # a row the caller reruns (study --update) is withheld, as an edited score
        assert check_scores(out, [edited_row], "sst2", rerun=lambda r: True) == [edited_row]
    monkeypatch.undo()  # the remedy it names: without the row, the same command reruns it
    (out / "results.json").write_text(json.dumps({**saved, "per_seed": []}))
    (rerun,) = run_compare(config)
    assert rerun["accuracy"] == truth["accuracy"]


def test_a_resume_with_nothing_to_run_writes_the_summary_it_prints(tmp_path, monkeypatch):
    """The stored summary was not rewritten where nothing was left to run: results.json said one accuracy, the table
    printed another (a summary edited by hand, or written by older code)."""
    out = tmp_path / "run"
    config = small(out, guides=("map",), ts=False)
    (printed,) = run_compare(config)
    saved = json.loads((out / "results.json").read_text())
    saved["summary"][0]["accuracy"] = 0.95
    (out / "results.json").write_text(json.dumps(saved))
    monkeypatch.setattr(C, "prepare", lambda *a, **k: pytest.fail("a finished run trains nothing"))
    (again,) = run_compare(config)
    stored = json.loads((out / "results.json").read_text())
    assert again["accuracy"] == printed["accuracy"] == stored["summary"][0]["accuracy"] != 0.95
    assert stored["per_seed"] == saved["per_seed"] and stored["config"] == saved["config"]  # the rest as it was


def _scored_run(out, guides=("map",), seeds=(0, 1)):
    """A run of ``guides`` on sst2 and the shifted set sst2_shift scored as compare scores (random float32 predictives
    of 4 weight samples): its rows are what its arrays give."""
    folder = RunFolder(out, small(out, guides=guides, seeds=seeds, eval_datasets=("sst2_shift",)))
    for i, (guide, seed) in enumerate((g, s) for g in guides for s in seeds):
        g = torch.Generator().manual_seed(i)
        predictions = {}
        for dataset in ("sst2", "sst2_shift"):
            samples = torch.softmax(torch.randn(4, 8, 2, generator=g), -1)
            predictions[dataset] = Prediction(samples.mean(0), torch.randint(0, 2, (8,), generator=g), samples)
        rows, arrays = [], {}
        for dataset, prediction in predictions.items():
            row = {"guide": guide, "dataset": dataset, "seed": seed, **score(prediction)}
            if dataset != "sst2":
                row.update(ood_auroc(predictions["sst2"], prediction))
            rows.append(row)
            arrays.update(prediction_arrays(prediction, dataset, seed))
        folder.add(guide, seed, rows, arrays)
    return out


def _edit_row(out, guide, dataset, seed, **scores):
    saved = json.loads((out / "results.json").read_text())
    for row in saved["per_seed"]:
        if (row["guide"], row["dataset"], row["seed"]) == (guide, dataset, seed):
            row.update(scores)
    (out / "results.json").write_text(json.dumps(saved))


def test_the_studys_report_and_merge_refuse_a_row_its_arrays_contradict(tmp_path):
    """The report (``study --report-only``) and an update's merge took the rows of a run folder as they were."""
    runs = tmp_path / "runs"
    run = _scored_run(runs / "sst2", guides=("map", "temperature"))
    assert set(load_runs(runs)) == {"sst2"}
    _edit_row(run, "temperature", "sst2_shift", 1, ood_auroc_entropy=0.99)
    with pytest.raises(ValueError, match=r"the row of temperature on sst2_shift, seed 1 holds ood_auroc_entropy 0.99 where "
                                         r"its own arrays in predictions_temperature.npz give 0\.\d+"):
        load_runs(runs)
    update = _scored_run(tmp_path / "update", guides=("temperature",))
    merge_results(run, update)  # the edited row is one the update replaces
    assert set(load_runs(runs)) == {"sst2"}
    _edit_row(update, "temperature", "sst2", 0, mutual_information=None)  # n/a where its arrays give a number
    with pytest.raises(ValueError, match=r"update/results.json: the row of temperature on sst2, seed 0 holds "
                                         r"mutual_information nan where"):
        merge_results(run, update)
    update = _scored_run(tmp_path / "update2", guides=("temperature",))
    _edit_row(run, "map", "sst2", 1, aurc=0.5)  # a row the merge keeps
    with pytest.raises(ValueError, match=r"the row of map on sst2, seed 1 holds aurc 0.5 .*older pyro_lora: before 2026-12-05"):
        merge_results(run, update)


def test_the_committed_runs_rows_are_what_their_arrays_give():
    """Every finished row of the study's committed runs passes the check a resume makes (rows scored before a metric's
    definition changed would be refused: none is there)."""
    from pathlib import Path

    from pyro_lora.experiments.results import check_scores

    checked = 0
    for record in sorted((Path(__file__).parents[1] / "runs").glob("*/*/results.json")):
        if locked_elsewhere(record.parent):  # a study writing it now: its row and arrays may be a write apart
            continue
        saved = json.loads(record.read_text())
        check_scores(record.parent, saved["per_seed"], saved["config"]["dataset"])
        checked += 1
    if not checked:
        pytest.skip("no committed run to check")


def _arrays_of(out, guide):
    with np.load(out / f"predictions_{guide}.npz") as saved:
        return dict(saved)


def _put_arrays(out, guide, arrays):
    np.savez(out / f"predictions_{guide}.npz", **arrays)


def _rows(out):
    return json.loads((out / "results.json").read_text())["per_seed"]


def test_rows_without_their_arrays_are_withheld_from_the_report_whatever_their_seed(tmp_path):
    """The report averaged and printed, as best, a row the check skipped as unfinished: its npz (or one array of it)
    gone, or of a seed outside the run's --seeds (which nothing checked)."""
    runs = tmp_path / "runs"
    run = _scored_run(runs / "sst2", guides=("map", "temperature"))
    truth = {r["seed"]: r["accuracy"] for r in _rows(run) if (r["guide"], r["dataset"]) == ("temperature", "sst2")}
    saved = json.loads((run / "results.json").read_text())
    extra = {**next(r for r in saved["per_seed"] if (r["guide"], r["seed"]) == ("temperature", 0)), "seed": 7, "accuracy": 0.99}
    (run / "results.json").write_text(json.dumps({**saved, "per_seed": saved["per_seed"] + [extra]}))
    with pytest.warns(UserWarning, match=r"the rows of temperature on sst2, seed 7 have no arrays .*withheld as unfinished"):
        (row,) = [r for r in load_runs(runs)["sst2"]["summary"] if (r["guide"], r["dataset"]) == ("temperature", "sst2")]
    assert row["seeds"] == [0, 1] and row["accuracy"] == pytest.approx(np.mean(list(truth.values())))
    with pytest.warns(UserWarning, match="seed 7"):  # counted unfinished, as the header says
        assert unfinished_pairs(load_runs(runs)["sst2"])[0] == {("temperature", 7)}
    (run / "results.json").write_text(json.dumps(saved))
    _edit_row(run, "temperature", "sst2", 0, accuracy=0.99)
    arrays = _arrays_of(run, "temperature")
    for drop in ("sst2__seed0__mutual_information", None):  # one array gone; the whole npz gone
        if drop:
            _put_arrays(run, "temperature", {k: v for k, v in arrays.items() if k != drop})
        else:
            (run / "predictions_temperature.npz").unlink()
        with pytest.warns(UserWarning, match=r"the rows of temperature on sst2, seed 0.* have no arrays"):
            summary = load_runs(runs)["sst2"]["summary"]
        rows = [r for r in summary if (r["guide"], r["dataset"]) == ("temperature", "sst2")]
        assert [r["seeds"] for r in rows] == ([[1]] if drop else [])
        assert all(r["accuracy"] == truth[1] for r in rows)


def test_a_resume_and_a_merge_average_no_row_they_cannot_check(tmp_path, monkeypatch):
    """A resume with nothing to run (and an update's merge) printed and wrote into results.json's summary a row of a
    seed outside the run's --seeds that no check saw: it holds no arrays."""
    out = tmp_path / "run"
    config = small(out, guides=("map",), ts=False)
    (printed,) = run_compare(config)
    saved = json.loads((out / "results.json").read_text())
    extra = {**saved["per_seed"][0], "seed": 7, "accuracy": 0.99}
    (out / "results.json").write_text(json.dumps({**saved, "per_seed": saved["per_seed"] + [extra]}))
    monkeypatch.setattr(C, "prepare", lambda *a, **k: pytest.fail("a finished run trains nothing"))
    with pytest.warns(UserWarning, match=r"the rows of map on sst2, seed 7 have no arrays"):
        (again,) = run_compare(config)
    stored = json.loads((out / "results.json").read_text())
    assert again["seeds"] == [0] and again["accuracy"] == printed["accuracy"] == stored["summary"][0]["accuracy"]
    assert stored["per_seed"][-1] == extra  # kept in the record, not averaged
    run = _scored_run(tmp_path / "base", guides=("map", "temperature"))
    rows = _rows(run)
    base = json.loads((run / "results.json").read_text())
    extra = {**rows[0], "seed": 7, "accuracy": 0.99}  # map's: a method the merge keeps
    (run / "results.json").write_text(json.dumps({**base, "per_seed": rows + [extra]}))
    summary = merge_results(run, _scored_run(tmp_path / "update", guides=("temperature",)))
    (row,) = [r for r in summary if (r["guide"], r["dataset"]) == ("map", "sst2")]
    truth = [r["accuracy"] for r in rows if (r["guide"], r["dataset"]) == ("map", "sst2")]
    assert row["seeds"] == [0, 1] and row["accuracy"] == pytest.approx(np.mean(truth))


def test_the_printed_verdict_is_of_the_rows_the_table_averages(tmp_path, monkeypatch):
    """The CLI printed a verdict recomputed from every stored row: a row of a seed no check saw (no arrays) was judged
    there ("2 seeds ... best NLL") while the table and results.json's verdict withheld it ("1 seed")."""
    from pyro_lora.experiments.verdict import verdict

    out = tmp_path / "run"
    config = small(out, guides=("map", "temperature"), ts=False)
    run_compare(config)
    saved = json.loads((out / "results.json").read_text())
    best = {**next(r for r in saved["per_seed"] if (r["guide"], r["dataset"]) == ("map", "sst2")),
            "seed": 7, "accuracy": 0.99, "nll": 0.01, "ece": 0.0}
    (out / "results.json").write_text(json.dumps({**saved, "per_seed": saved["per_seed"] + [best]}))
    monkeypatch.setattr(C, "prepare", lambda *a, **k: pytest.fail("a finished run trains nothing"))
    with pytest.warns(UserWarning, match=r"the rows of map on sst2, seed 7 have no arrays"):
        run_compare(config)
    stored = json.loads((out / "results.json").read_text())
    judged = [r for r in stored["per_seed"] if r["seed"] != 7]
    assert stored["verdict"] == verdict(judged, stored["config"]["dataset"], stored["config"]["eval_datasets"])
    assert stored["verdict"] != verdict(stored["per_seed"], stored["config"]["dataset"], stored["config"]["eval_datasets"])
    assert cli._verdict(out) == "\n" + stored["verdict"]  # printed as recorded


def test_the_entropy_is_recomputed_from_the_probs_and_its_array_checked(tmp_path):
    """The entropy was read from the stored entropy array: the array and the rows divided by 10 passed (its AUROC is
    rank-invariant), stored 0.069 where the probs give 0.693."""
    runs = tmp_path / "runs"
    run = _scored_run(runs / "sst2", guides=("temperature",))
    arrays = _arrays_of(run, "temperature")
    for dataset in ("sst2", "sst2_shift"):
        arrays[f"{dataset}__seed0__entropy"] = arrays[f"{dataset}__seed0__entropy"] / 10
        (row,) = [r for r in _rows(run) if (r["dataset"], r["seed"]) == (dataset, 0)]
        _edit_row(run, "temperature", dataset, 0, entropy=row["entropy"] / 10)
    _put_arrays(run, "temperature", arrays)
    with pytest.raises(ValueError, match=r"the row of temperature on sst2, seed 0: its arrays in predictions_temperature"
                                         r"\.npz are no prediction \(its entropy array is not the entropy of its probs "
                                         r"\(example \d+: .* stored, .* from the probs\)\); rerun it"):
        load_runs(runs)
    arrays["sst2__seed0__entropy"] = np.concatenate([arrays["sst2__seed0__entropy"] * 10, [0.5]]).astype(np.float32)
    _put_arrays(run, "temperature", arrays)
    with pytest.raises(ValueError, match=r"its entropy array has shape \(9,\), not 1-D of length 8"):
        load_runs(runs)


@pytest.mark.parametrize("dtype", [str, bytes, np.longdouble, "datetime64[s]"])
def test_arrays_of_another_dtype_are_refused_naming_the_row(tmp_path, dtype):
    """probs stored as str, bytes, longdouble or datetime64 died in torch.as_tensor, the message naming no folder,
    row or remedy."""
    runs = tmp_path / "runs"
    run = _scored_run(runs / "sst2", guides=("map",))
    arrays = _arrays_of(run, "map")
    probs = arrays["sst2__seed1__probs"]
    arrays["sst2__seed1__probs"] = (probs * 1e6).astype(np.int64).astype(dtype) if dtype == "datetime64[s]" else probs.astype(dtype)
    _put_arrays(run, "map", arrays)
    with pytest.raises(ValueError, match=r"the row of map on sst2, seed 1: its arrays in predictions_map\.npz are no "
                                         r"prediction \(its probs array is of dtype .*, not float16, float32 or float64\); "
                                         r"rerun it: remove the rows of map under seed 1"):
        load_runs(runs)


def test_evaluate_samples_re_scores_a_sampling_guide_and_refuses_a_point_estimate(tmp_path):
    """The point-estimate check read TFBGuide.deterministic off the class, a property (true), and refused --samples
    on every TFB run, whose predictive draws sigma_q's noise (the MAP's refusal: test_fit_writes_a_peft_adapter...)."""
    from conftest import toy_run

    config = toy_run(tmp_path, guides=("tfb",))
    S.fit_one(config)
    again = S.evaluate_saved(tmp_path / "out", samples=8, progress=False)
    assert again["test_examples"] == 12 and "samples 8 (the run: 4)" in again["note"]
