"""``pyro-lora study``: its flags, its resume and update, and the report built from results.json files as run_compare
writes them (no model is loaded)."""

import json
import os
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from pyro_lora.experiments import cli
from pyro_lora.experiments import study_report as report
from pyro_lora.experiments.results import summarize_seeds
from pyro_lora.experiments.setup import CLOZE_SCORING, CompareConfig
from pyro_lora.experiments.table import format_table
from pyro_lora.locking import folder_lock


@pytest.fixture(scope="module")
def study():
    from pyro_lora.experiments import study

    return study


@pytest.fixture(autouse=True)
def _nothing_runs_here(tmp_path, monkeypatch):
    """Every test in its own folder (the study's default runs/ and docs/ land there), and no model trained unless a
    test says how: a command line that parses by mistake fails instead of running the study."""
    import pyro_lora.experiments.compare as compare

    import pyro_lora.experiments.results as results

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare, "run_compare", lambda *a, **k: pytest.fail("this test runs no comparison"))
    # the runs written here hold made-up scores beside placeholder arrays (what the report and merges do with them is
    # tested): their check against the arrays is test_resume's
    for module in (results, report):
        monkeypatch.setattr(module, "check_scores", lambda *a, **k: [])


def parse(*argv):
    """The study's flags as ``pyro-lora study`` parses them, and the base config the CLI builds from them."""
    args = cli.parser().parse_args(["study", *argv])
    return args, cli._study_overrides(args)


# (guide, evaluation set) -> (accuracy, ECE x100, NLL); seed s adds s * 0.01 to accuracy and NLL, s to ECE
BASE = {
    ("map", "arc_easy"): (0.60, 10.0, 1.000), ("temperature", "arc_easy"): (0.60, 5.0, 0.950),
    ("meanfield", "arc_easy"): (0.55, 4.0, 1.200),  # worse than MAP on NLL, 5 accuracy points lower; better ECE
    ("map", "openbookqa"): (0.40, 12.0, 1.300), ("temperature", "openbookqa"): (0.40, 6.0, 1.250),
    ("meanfield", "openbookqa"): (0.41, 13.0, 1.200),  # better NLL, worse ECE than MAP
    ("map", "arc_challenge"): (0.30, 20.0, 1.500), ("temperature", "arc_challenge"): (0.30, 9.0, 1.400),
    ("meanfield", "arc_challenge"): (0.305, 8.0, 1.350),  # better than MAP and temperature under shift
    ("map", "arc_easy@shift"): (0.45, 15.0, 1.200), ("temperature", "arc_easy@shift"): (0.45, 7.0, 1.150),
    ("meanfield", "arc_easy@shift"): (0.455, 6.0, 1.100),
}


def _row(guide, dataset, seed, eval_set, shifted):
    acc, ece, nll = BASE[(guide, eval_set)]
    row = {"guide": guide, "dataset": dataset, "seed": seed, "accuracy": acc + 0.01 * seed, "ece": ece + seed,
           "nll": nll + 0.01 * seed, "brier": 0.5, "entropy": 1.0, "mutual_information": 0.02 if guide == "meanfield" else 0.0,
           "accuracy_at_50": 0.7, "accuracy_at_80": 0.65, "aurc": 0.3, "fit_seconds": 12.0 + seed, "fit_memory_mb": 900.0,
           "extra_parameters": 1 if guide == "temperature" else (4096 if guide == "meanfield" else 0),
           "predict_seconds_per_1000": 40.0, "predict_memory_mb": 800.0}
    if shifted:
        row.update(ood_auroc_entropy=0.55, ood_auroc_mi=0.6 if guide == "meanfield" else 0.5)
    return row


def _write_run(runs_dir, dataset, shift=()):
    guides, seeds = ("map", "temperature", "meanfield"), (0, 1)
    config = CompareConfig(model="smollm2", dataset=dataset, guides=guides, train_size=64, test_size=64, samples=4, epochs=2,
                           batch_size=4, seeds=seeds, eval_datasets=shift, mc_format="cloze", max_length=192, lr=1e-3, val_fraction=0.2,
                           ts=False, out=str(runs_dir / dataset))
    rows = []
    for seed in seeds:  # the order of run_compare: seed, guide, evaluation set
        for guide in guides:
            rows.append(_row(guide, dataset, seed, dataset, False))
            rows += [_row(guide, s, seed, s if s != "arc_easy" else "arc_easy@shift", True) for s in shift]
    out = runs_dir / dataset
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"config": asdict(config), "summary": summarize_seeds(rows), "per_seed": rows,
                                                  "predict_seeding": 2,  # one draw for every set: nothing withheld
                                                  "scoring": CLOZE_SCORING}))  # the cloze form now
    _complete_arrays(out, guides, seeds, [dataset, *shift])
    return out


def _complete_arrays(out, guides, seeds, datasets):
    """The predictions files of a finished run: every array of every (guide, seed, evaluation set)."""
    import numpy as np

    from pyro_lora.experiments.results import ARRAYS

    arrays = {"probs": np.full((4, 2), 0.5), "labels": np.arange(4) % 2, "entropy": np.zeros(4), "mutual_information": np.zeros(4)}
    assert set(arrays) == set(ARRAYS)
    for g in guides:
        np.savez(out / f"predictions_{g}.npz", **{f"{d}__seed{s}__{k}": arrays[k] for d in datasets for s in seeds for k in ARRAYS})


@pytest.fixture
def runs(tmp_path):
    runs_dir = tmp_path / "runs"
    easy = _write_run(runs_dir, "arc_easy")
    _write_run(runs_dir, "openbookqa", shift=("arc_challenge", "arc_easy"))
    (easy / "reliability_grid.png").write_bytes(b"\x89PNG fake")
    (easy / "study_run.json").write_text(json.dumps({"command": "pyro-lora study --seeds 0,1", "wall_seconds": 754.0,
                                                     "finished": "2025-01-01T00:00:00+00:00"}))
    return runs_dir


def test_report_sections_numbers_and_figures(runs, tmp_path):
    docs = tmp_path / "docs"
    path = report.build_report(runs, docs, command="pyro-lora study --report-only")
    md = path.read_text()
    assert path == docs / "study.md"
    assert "## ARC-Easy (`arc_easy`)" in md and "## OpenBookQA (`openbookqa`)" in md and "## Distribution shift" in md
    # mean ± std over the two seeds, as compare's table formats them: map on ARC-E accuracy 0.605 ± 0.007, ECE 10.50 ± 0.71
    # tied best accuracy with temperature; the rows record no setting: their methods' (an older record's)
    assert "| map | no validation data | **0.605 ± 0.007** | 10.50 ± 0.71 | 1.005 ± 0.007 |" in md
    assert "0.605 ± 0.007" in format_table([r for r in report.load_runs(runs)["arc_easy"]["summary"] if r["guide"] == "map"])
    # meanfield's MI AUROC is the shift's only one: MAP's and temperature scaling's 0.5 are no detection, never the best
    assert "| OBQA→ARC-C | meanfield |" in md and "0.600" in md and "**0.600**" not in md
    assert "`pyro-lora study --report-only`" in md and "`pyro-lora study --seeds 0,1`" in md
    assert "12m 34s" in md  # the recorded wall time
    # a config edited to fewer seeds than the rows it averages: the header named seed 0 beside means over seeds 0 and 1
    record = json.loads((runs / "arc_easy" / "results.json").read_text())
    (runs / "arc_easy" / "results.json").write_text(json.dumps(record | {"config": {**record["config"], "seeds": [0]}}))
    md = report.build_report(runs, docs, command="pyro-lora study --report-only").read_text()
    easy = md.split("## ARC-Easy (`arc_easy`)")[1].split("## ")[0]
    assert ", epochs 2, seeds 0,1, 4 posterior samples, cloze format." in easy
    assert "| 0.001 | fp32 | —" in md  # each run's base precision
    results = runs / "openbookqa" / "results.json"
    saved = json.loads(results.read_text())
    saved["config"].update(dtype="bf16", load_in_4bit=True)
    results.write_text(json.dumps(saved))
    assert "| 0.001 | bf16, 4-bit | ARC-Challenge" in report.build_report(runs, docs, command="x").read_text()
    assert (docs / "study" / "arc_easy_reliability_grid.png").read_bytes().startswith(b"\x89PNG\r\n")  # drawn, not copied
    assert "](study/arc_easy_reliability_grid.png)" in md
    assert (docs / "study" / "summary.png").stat().st_size > 1000 and "](study/summary.png)" in md
    assert not list(docs.glob(".*tmp"))  # the atomic write left no temp file


def test_report_names_each_runs_model_and_a_classification_run_has_no_answer_format(runs, tmp_path):
    config = CompareConfig(model="minilm", dataset="sst2", guides=("map", "temperature", "meanfield"), train_size=2000,
                           test_size=872, samples=8, epochs=10, lr=2e-3, seeds=(0, 1), out=str(runs / "sst2"))
    rows = [{**_row(g, "sst2", s, "arc_easy", False), "setting": "validation-tuned" if g == "temperature" else "no validation data"}
            for s in (0, 1) for g in config.guides]
    rows[2]["note"] = rows[5]["note"] = "the KL weight is at the grid's edge"  # meanfield's, both seeds
    verdict = "Verdict on sst2 (2 seeds; ...):\n- Best: NLL: temperature (0.955).\n- No validation data: beat temperature scaling: none."
    (runs / "sst2").mkdir()
    (runs / "sst2" / "results.json").write_text(json.dumps({"config": asdict(config), "summary": summarize_seeds(rows), "per_seed": rows,
                                                            "verdict": verdict, "sizes": {"train": 1800, "validation": 200, "test": 872}}))
    md = report.build_report(runs, tmp_path / "docs", command="x").read_text()
    assert md.startswith("# Study: Bayesian LoRA guides on MiniLM and SmolLM2-135M\n")
    # the sizes used (results.json's sizes), not those asked for; a run without them says what was asked
    # rows without their arrays (predictions_*.npz): what a resume reruns, so unfinished
    assert "| SST-2 | MiniLM | unknown | unfinished | 0,1 | 3 | 1800 | 200 | 872 | 10 | 16 | 8 | 256 | — | 0.002 | fp32 | — |" in md
    assert "| ARC-Easy | SmolLM2-135M | 12m 34s |" in md and "| 64 asked | 20% of it | 64 asked | 2 | 4 | 4 | 192 | cloze | 0.001 |" in md
    assert "MiniLM; train 1800, validation 200, test 872, epochs 10, seeds 0,1, 8 posterior samples.\n" in md
    assert "SmolLM2-135M; train 64 asked, validation 20% of it, test 64 asked, epochs 2, seeds 0,1, 4 posterior samples, cloze format." in md
    assert md.index("## SST-2 (`sst2`)") < md.index("## ARC-Easy (`arc_easy`)")  # the study's order
    sst2 = md[md.index("## SST-2"):md.index("## ARC-Easy")]
    assert "| guide | setting | accuracy |" in sst2 and "| temperature | validation-tuned | " in sst2
    assert "Notes:\n\n- meanfield: seeds 0, 1: the KL weight is at the grid's edge\n" in sst2
    # the verdict recomputed from the rows, not the paragraph stored by the code that ran them
    assert "\nVerdict on sst2 (2 seeds; a difference counts where the paired per-seed 95% interval excludes 0):\n\n- Best: " in sst2
    assert "(2 seeds; ...)" not in sst2
    assert "| guide | accuracy |" in md[md.index("## ARC-Easy"):]  # rows without a setting: no empty column


def test_report_takes_na_values_partial_means_and_stray_folders(runs, tmp_path, capsys):
    """An n/a metric (the OOD MI AUROC of a +ts row, a non-finite NLL) is left out, never a crash; a mean over fewer
    seeds is marked and never compared; a copy of a run under another folder name is left out, said so."""
    obqa = runs / "openbookqa" / "results.json"
    saved = json.loads(obqa.read_text())
    for r in saved["per_seed"]:
        if r["guide"] == "meanfield" and r["dataset"] == "arc_challenge":
            r["ood_auroc_mi"] = None
        if r["guide"] == "temperature" and r["dataset"] == "openbookqa":
            r["nll"] = None
    # a mean over seed 0 only, beside the others' 0 and 1
    saved["per_seed"] = [r for r in saved["per_seed"] if (r["guide"], r["dataset"], r["seed"]) != ("meanfield", "arc_easy", 1)]
    obqa.write_text(json.dumps(saved))
    (runs / "arc_easy.bak").mkdir()
    (runs / "arc_easy.bak" / "results.json").write_text((runs / "arc_easy" / "results.json").read_text())
    with pytest.warns(UserWarning, match="arc_easy.bak holds a run of arc_easy, not of arc_easy.bak: left out"):
        md = report.build_report(runs, tmp_path / "docs", command="x").read_text()
    assert "arc_easy.bak" not in md
    only = tmp_path / "only"
    only.mkdir()
    (runs / "arc_easy.bak").rename(only / "arc_easy.bak")  # the one run found is left out: no "run the study first"
    with pytest.warns(UserWarning, match="arc_easy.bak holds a run of arc_easy, not of arc_easy.bak: left out of the report "
                                         r"\(a renamed or copied folder: name it arc_easy to have it reported\)"), \
            pytest.raises(ValueError, match=rf"^every run under {only} \(arc_easy.bak\) was left out of the report, for the "
                                            "reasons warned above: nothing to report$"):
        report.build_report(only, tmp_path / "docs-only", command="x")
    shifted = md.split("## Distribution shift")[1].split("## Summary")[0]
    # partial: never bold, also where it reads as the best (0.455 ties MAP's accuracy)
    assert "| OBQA→ARC-E | meanfield (a mean over seed 0 only: seed(s) 1 missing) | 0.455 | 6.00 | 1.100 | 0.550 | 0.600 |" in shifted
    nll = md.split("### NLL")[1].split("### ECE")[0]
    assert "| meanfield | 1.205 | **1.205** | **1.355** | 1.100 † |" in nll  # partial: marked, never bold
    assert "| temperature | **0.955** | — |" in nll and "avg rank" not in nll  # n/a: no rank over unequal pools
    assert "OBQA→ARC-E" not in _sentence(md, "- **meanfield** does not beat MAP on NLL")  # the partial mean is not compared
    assert "on 1 of 3 sets" in _sentence(md, "- **meanfield** does not beat MAP on NLL")
    with pytest.raises(ValueError, match="no run of arc_eassy under"):
        report.build_report(runs, tmp_path / "docs", datasets=["arc_easy", "arc_eassy"])
    (tmp_path / "docs_file").write_text("")
    argv = ["study", "--datasets", "arc_easy", "--runs", str(runs), "--docs", str(tmp_path / "docs_file")]
    assert cli.main(argv) == 2  # found before any training (run_compare fails this test if called)
    assert "docs_file/study (Not a directory): choose another --docs" in capsys.readouterr().err
    assert report.guide_order({"a": {"summary": [{"guide": g} for g in ("tfb+ts", "map", "tfb", "laplace+ts", "laplace")]}}) == [
        "map", "tfb", "tfb+ts", "laplace", "laplace+ts"]


def test_report_says_what_a_run_lacks_and_skips_an_unreadable_record(runs, tmp_path):
    from pyro_lora.experiments.study_header import run_state
    from pyro_lora.experiments.table import partial_seeds_note

    easy = runs / "arc_easy" / "results.json"
    saved = json.loads(easy.read_text())
    saved["request"] = {**saved["config"], "guides": ["map", "temperature", "meanfield", "tfb"], "seeds": [0, 1, 2]}
    saved["failed"] = [{"guide": "tfb", "seed": 0, "error": "RuntimeError: x", "traceback": ""},
                       {"guide": "tfb", "seed": 1, "error": "RuntimeError: x", "traceback": ""}]
    easy.write_text(json.dumps(saved))
    run = json.loads(easy.read_text())
    assert run_state(run) == ["**unfinished**: 4 of 12 (method, seed) neither finished nor failed (a run cut short, or still "
                              "running; the same command resumes it)",
                              "**failed**: tfb (seeds 0, 1) (tracebacks in its results.json, under 'failed')"]
    (runs / "openbookqa" / "results.json").write_text('{"config": ')  # cut off mid-write by hand
    with pytest.warns(UserWarning, match="openbookqa/results.json is not the results of a `pyro-lora compare` run .*left out of the report"):
        md = report.build_report(runs, tmp_path / "docs", command="x").read_text()
    assert "- ARC-Easy: **failed**: tfb (seeds 0, 1)" in md and "## OpenBookQA" not in md
    # one method with an extra seed is the odd one, not every other row
    rows = [{"dataset": "d", "seeds": [0, 1]}, {"dataset": "d", "seeds": [0, 1]}, {"dataset": "d", "seeds": [0, 1, 2]}]
    assert [partial_seeds_note(r, rows) for r in rows] == [None, None, "a mean over seeds 0, 1, 2, where the other rows have 0, 1 only"]


def _sentence(md, start):
    (line,) = [line for line in md.splitlines() if line.startswith(start)]
    return line


def _named_sets(line):
    return re.findall(r"([A-Za-z-]+(?:→[A-Za-z-]+)?) \([+-]", line)


def test_does_not_beat_map_names_exactly_the_right_sets(runs, tmp_path):
    md = report.build_report(runs, tmp_path / "docs", command="x").read_text()
    nll = _sentence(md, "- **meanfield** does not beat MAP on NLL")
    assert _named_sets(nll) == ["ARC-E"] and "1 of 4 sets" in nll and "ARC-E (+0.200)" in nll
    ece = _sentence(md, "- **meanfield** does not beat MAP on ECE")
    assert _named_sets(ece) == ["OBQA"]
    accuracy = _sentence(md, "- **meanfield** loses more than 1 accuracy point")
    assert _named_sets(accuracy) == ["ARC-E"] and "(-5.00)" in accuracy
    temperature = _sentence(md, "- **meanfield**'s mean is not below temperature scaling's")
    assert "NLL on ARC-E (+0.250)" in temperature and "ECE on OBQA (+7.00)" in temperature
    assert _named_sets(temperature) == ["ARC-E", "OBQA"]
    # each OOD AUROC on its own against MAP's by entropy: its entropy's ties MAP's, its MI's beats it
    assert "- **meanfield**'s OOD AUROC by entropy does not beat MAP's by entropy on 2 of 2 shifts: OBQA→ARC-C (+0.000)" in md
    assert "- **meanfield**'s OOD AUROC by MI beats MAP's by entropy on every shift (2 of 2)." in md
    # temperature scaling and MAP are not Bayesian guides: no sentences about them
    assert "- **temperature**" not in md and "- **map**" not in md
    assert "A Bayesian guide beats MAP on NLL in 3 of 4 (guide, set) pairs and on ECE in 3 of 4." in md
    assert "On NLL, beating MAP on every set: none; on no set: none." in md


def test_average_ranks_and_not_beating():
    table = {"map": {"a": 1.0, "b": 2.0}, "x": {"a": 2.0, "b": 1.0}, "y": {"a": 1.0, "b": 3.0}}
    ranks = report.average_ranks(table, ["a", "b"])
    assert ranks == {"map": pytest.approx((1.5 + 2) / 2), "x": pytest.approx((3 + 1) / 2), "y": pytest.approx((1.5 + 3) / 2)}
    assert report.not_beating(table, "y", "map", ["a", "b"]) == [("a", 0.0), ("b", 1.0)]  # a tie does not beat
    assert report.not_beating(table, "x", "map", ["a", "b"], lower_better=False) == [("b", -1.0)]


def test_ranks_and_bold_read_the_values_as_printed():
    """0.5001 and 0.5004 both print 0.500, bold alike: they share a rank; -1.2e-7 prints 0.000, no sign."""
    table = {"map": {"a": 0.5001, "b": -1.2e-7}, "x": {"a": 0.5004, "b": 0.0}, "y": {"a": 0.6, "b": 0.2}}
    assert report.average_ranks(table, ["a", "b"], digits=3) == {"map": 1.5, "x": 1.5, "y": 3.0}
    text = report.cross_table(table, ["a", "b"], ["map", "x", "y"], 3)
    assert "| map | **0.500** | **0.000** | 1.50 |" in text and "-0.000" not in text
    assert report.not_beating(table, "map", "x", ["a", "b"], digits=3) == [("a", 0.0), ("b", 0.0)]


def test_the_verdict_and_the_study_decide_an_accuracy_loss_alike():
    """MAP 0.80004 against 0.789951 is a loss of 1.01 points (shown -1.01), MAP 0.800051 against 0.790049 one of
    1.00: the verdict rounded the difference, the study each value first, and they disagreed on both."""
    from pyro_lora.experiments.verdict import verdict

    tables = {"accuracy": {"map": {"ARC-E": 0.80004, "OBQA": 0.800051}, "meanfield": {"ARC-E": 0.789951, "OBQA": 0.790049}},
              "nll": {}, "ece": {}}
    assert "**meanfield** loses more than 1 accuracy point to MAP on ARC-E (-1.01) points." in report.guide_sentences(
        tables, "meanfield", ["ARC-E", "OBQA"])
    for dataset, label, lost in (("arc_easy", "ARC-E", "meanfield -1.01"), ("openbookqa", "OBQA", None)):
        rows = [{"guide": g, "dataset": dataset, "seed": 0, "setting": "no validation data", "accuracy": tables["accuracy"][g][label],
                 "ece": 5.0, "nll": 1.0, "aurc": 0.3} for g in ("map", "meanfield")]
        line = next(x for x in verdict(rows, dataset).splitlines() if x.startswith("- Accuracy against MAP"))
        assert (f"more than 1 point below it: {lost}." in line) if lost else ("none more than 1 point below it." in line)


def test_a_difference_whose_printed_means_differ_is_clear_where_its_interval_excludes_zero():
    t = [0.5006 + 0.01 * (s - 2) for s in range(5)]
    pairs = {"ARC-E": [(v - 0.0002 + 0.00001 * s, v) for s, v in enumerate(t)],  # 0.500 against 0.501
             "OBQA": [(v - 1e-8, v) for v in t]}  # 0.501 against 0.501: float round-off, a tie
    assert report.clear_differences(pairs, digits=3) == (["ARC-E"], [])


SIZES = ["--test-size", "64", "--epochs", "2", "--batch-size", "4", "--samples", "4", "--max-length", "192", "--no-ts"]


def test_resume_matches_the_saved_config(study, runs):
    args, base = parse("--datasets", "arc_easy", "--no-shift", "--guides", "map,temperature,meanfield", "--seeds", "0,1",
                       "--train-size", "64", *SIZES, "--runs", str(runs))
    (config,) = study.study_configs(base, args.datasets, args.shift, args.runs)
    assert config.out == str(runs / "arc_easy") and config.eval_datasets == () and config.mc_normalize is None
    saved = json.loads((runs / "arc_easy" / "results.json").read_text())
    assert study.saved_differences(saved, config) == {}
    figures = ["calibration_vs_accuracy.png", "reliability_grid.png", "reliability_map.png", "reliability_meanfield.png",
               "reliability_temperature.png"]
    for png in (runs / "arc_easy").glob("*.png"):  # as a kill after the run's last row leaves them: none drawn
        png.unlink()
    assert study.run_dataset(config, "x") is None  # skipped: nothing is loaded
    assert sorted(p.name for p in (runs / "arc_easy").glob("*.png")) == figures  # the study drew them, as compare does
    _, bigger = parse("--guides", "map,temperature,meanfield", "--seeds", "0,1", "--train-size", "128", *SIZES)
    assert study.saved_differences(saved, study.make_config(bigger, "arc_easy", runs=runs)) == {"train_size": (64, 128)}
    assert study.study_datasets(["arc_easy"]) == ["arc_easy"]  # the shift scores the OpenBookQA run; it adds none
    assert study.study_datasets() == ["sst2", "arc_easy", "openbookqa"]
    with pytest.raises(ValueError, match="--datasets sst2/: a dataset is a folder name"):
        study.study_datasets(["sst2/"])  # it named the sst2 run's folder, and replaced that run
    shift = study.make_config(parse()[1], "openbookqa")
    assert shift.eval_datasets == ("arc_challenge", "arc_easy") and shift.mc_normalize == "chars" and shift.out == "runs/study/openbookqa"
    assert study.make_config(parse("--mc-format", "letter")[1], "openbookqa").mc_normalize is None


def test_clear_differences_are_paired_over_seeds():
    def row(guide, seed, nll, dataset="openbookqa"):
        return {"guide": guide, "dataset": dataset, "seed": seed, "nll": nll}

    per_seed = [row("map", s, v) for s, v in enumerate([1.0, 1.5, 2.0])]  # MAP itself varies a lot over seeds
    per_seed += [row("a", s, v) for s, v in enumerate([0.9, 1.41, 1.89])]  # always ~0.1 below MAP: clear
    per_seed += [row("b", s, v) for s, v in enumerate([0.5, 1.9, 1.5])]  # below on average, not consistently
    per_seed += [row("map", s, 1.0, "arc_challenge") for s in range(3)] + [row("a", s, 1.2, "arc_challenge") for s in range(3)]
    runs = {"openbookqa": {"config": {"dataset": "openbookqa"}, "per_seed": per_seed}}
    pairs, left = report.paired_differences(runs, "nll")
    assert left == {}
    assert pairs["a"]["OBQA"] == pytest.approx([(0.9, 1.0), (1.41, 1.5), (1.89, 2.0)])
    assert pairs["a"]["OBQA→ARC-C"] == pytest.approx([(1.2, 1.0)] * 3)
    assert report.clear_differences(pairs["a"]) == (["OBQA"], ["OBQA→ARC-C"])  # zero spread: clearly worse too
    assert report.clear_differences(pairs["b"]) == ([], [])
    assert report.clear_differences({"x": [(0.9, 1.0)]}) == ([], [])  # one seed: no verdict
    sentences = report.noise_sentences(runs, ["a", "b"])
    assert sentences == ["a, NLL: clearly better than MAP on OBQA; clearly worse on OBQA→ARC-C."]


def test_clear_differences_pair_the_seeds_every_method_finished_as_the_verdict():
    # "a" lost seed 2 on OBQA: every guide is paired with MAP on seeds 0 and 1, the seeds every method finished, as
    # the verdict is. MAP holding a seed the others lack (a run killed mid-seed, after MAP finished it) took out every
    # comparison with MAP, and the report then said every difference was within the seed noise.
    def row(guide, seed, nll, dataset="openbookqa"):
        return {"guide": guide, "dataset": dataset, "seed": seed, "nll": nll}

    per_seed = [row("map", s, v) for s, v in enumerate([1.0, 1.5, 2.0])] + [row("b", s, 1.0) for s in range(3)]
    per_seed += [row("a", s, v) for s, v in enumerate([0.8, 1.3])]
    runs = {"openbookqa": {"config": {"dataset": "openbookqa"}, "per_seed": per_seed}}
    pairs, left = report.paired_differences(runs, "nll")
    assert pairs == {"a": {"OBQA": [(0.8, 1.0), (1.3, 1.5)]}, "b": {"OBQA": [(1.0, 1.0), (1.0, 1.5)]}} and left == {}
    assert report.noise_sentences(runs, ["a", "b"]) == ["a, NLL: clearly better than MAP on OBQA; clearly worse on no set."]


def _noise_part(md):
    return md[md.index("### Which differences"):]


def test_a_run_killed_mid_seed_after_map_is_compared_on_the_seeds_every_method_finished(runs, tmp_path):
    # the killed seed 2 holds MAP and temperature scaling only: MAP's mean is the odd one (†), and the study dropped
    # every comparison with it, then claimed "none: every difference from MAP is within the seed noise"
    saved = json.loads((runs / "arc_easy" / "results.json").read_text())
    saved["per_seed"] += [_row(g, "arc_easy", 2, "arc_easy", False) for g in ("map", "temperature")]
    saved["config"]["seeds"] = [0, 1, 2]
    (runs / "arc_easy" / "results.json").write_text(json.dumps(saved))
    md = report.build_report(runs, tmp_path / "docs", datasets=["arc_easy"]).read_text()
    noise = _noise_part(md)
    assert "within the seed noise" not in noise
    assert "- meanfield, ECE: clearly better than MAP on ARC-E" in noise  # 4 ECE points below MAP on seeds 0, 1
    assert "in 0 of 0" not in md and "No Bayesian guide has a mean over the same seeds as MAP's" in md


def test_the_noise_part_leaves_out_a_cell_with_an_na_seed_and_says_one_seed_gives_no_interval(runs, tmp_path):
    # meanfield's NLL null on seed 1: the table's mean is n/a and the verdict leaves it out; the study paired the one
    # seed left and called it "clearly better/worse" on fewer seeds than the table
    path = runs / "arc_easy" / "results.json"
    saved = json.loads(path.read_text())
    for r in saved["per_seed"]:
        if r["guide"] == "meanfield":
            r["nll"] = r["nll"] - 0.3 - 0.001 * r["seed"] if r["seed"] == 0 else None
    path.write_text(json.dumps(saved))
    noise = _noise_part(report.build_report(runs, tmp_path / "docs", datasets=["arc_easy"]).read_text())
    assert "meanfield, NLL" not in noise
    assert "NLL of meanfield on ARC-E (n/a on seed 1)" in noise
    # one seed: no interval, never "within the seed noise"
    saved["per_seed"] = [r for r in saved["per_seed"] if r["seed"] == 0]
    saved["config"]["seeds"] = [0]
    path.write_text(json.dumps(saved))
    noise = _noise_part(report.build_report(runs, tmp_path / "docs", datasets=["arc_easy"]).read_text())
    assert "within the seed noise" not in noise.split("\n\n", 2)[2]
    assert "not compared on ARC-E: one seed finished by every method gives no interval" in noise


def _fake_predictions(out, guides, dataset):
    import numpy as np

    for g in guides:
        np.savez(out / f"predictions_{g}.npz", **{f"{dataset}__seed0__probs": np.full((4, 4), 0.25), f"{dataset}__seed0__labels": np.arange(4)})
        (out / f"reliability_{g}.png").write_bytes(g.encode())


def test_update_reruns_some_guides_and_keeps_the_rest(study, runs, tmp_path, monkeypatch):
    import pyro_lora.experiments.compare as compare

    _fake_predictions(runs / "arc_easy", ("map", "temperature", "meanfield"), "arc_easy")

    for seed in (0, 1):  # the MAPs the run's rows started from: the rerun starts from them, not from a retrained one
        (runs / "arc_easy" / f"map_seed{seed}.safetensors").write_bytes(b"seed %d's MAP" % seed)

    def fake_run_compare(config, overwrite=False, reference=None, flags=None):  # the rerun guides' rows, NLL lowered by 0.1
        assert reference == runs / "arc_easy"  # its MAPs must be those the run's rows started from
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        assert [(out / f"map_seed{s}.safetensors").read_bytes() for s in (0, 1)] == [b"seed 0's MAP", b"seed 1's MAP"]
        rows = [{**_row(g, "arc_easy", s, "arc_easy", False), "nll": BASE[(g, "arc_easy")][2] - 0.1} for s in config.seeds for g in config.guides]
        _fake_predictions(out, config.guides, "arc_easy")
        (out / "results.json").write_text(json.dumps({"config": asdict(config), "summary": summarize_seeds(rows), "per_seed": rows,
                                                     "scoring": CLOZE_SCORING}))  # a rerun records its cloze form

    monkeypatch.setattr(compare, "run_compare", fake_run_compare)
    argv = ["--datasets", "arc_easy", "--no-shift", "--update", "meanfield",
            "--seeds", "0,1", "--train-size", "64", *SIZES, "--runs", str(runs), "--docs", str(tmp_path / "docs")]
    assert cli.main(["study", *argv]) == 0
    assert not (runs / "arc_easy" / "update").exists()  # merged: the rerun's folder (MAP copies) is gone
    merged = json.loads((runs / "arc_easy" / "results.json").read_text())
    nll = {(r["guide"], r["seed"]): r["nll"] for r in merged["per_seed"]}
    assert nll[("meanfield", 1)] == pytest.approx(1.1) and nll[("map", 1)] == pytest.approx(1.01)
    assert merged["config"]["guides"] == ["map", "temperature", "meanfield"]
    sidecar = json.loads((runs / "arc_easy" / "study_run.json").read_text())
    assert sidecar["wall_seconds"] == 754.0 and sidecar["updates"][0]["guides"] == ["meanfield"]
    md = (tmp_path / "docs" / "study.md").read_text()
    assert "rows of meanfield rerun" in md and f"`pyro-lora study {' '.join(argv)}`" in md
    with pytest.raises(ValueError, match="existing run"):
        study.update_dataset(replace(study.make_config(parse(*argv)[1], "boolq", runs=runs), guides=("meanfield",)), "x")
    # a rerun of some seeds would leave the others' rows from the old code: refused; without --seeds, the run's seeds
    with pytest.raises(ValueError, match=r"--update reruns every seed of the arc_easy run \(0,1\): leave --seeds out"):
        study.study_configs(parse(*argv[:-2], "--seeds", "1")[1], ["arc_easy"], runs=runs, update=("meanfield",))
    no_seeds = [a for a in argv if a not in ("--seeds", "0,1")]
    (config,) = study.study_configs(parse(*no_seeds)[1], ["arc_easy"], runs=runs, update=("meanfield",))
    assert config.seeds == (0, 1) and config.guides == ("meanfield",)
    # a method the run lacks is not added by --update (the plan may leave it out for its cost)
    with pytest.raises(ValueError, match="no run of arc_easy has those methods"):
        study.study_configs(parse(*argv)[1], ["arc_easy"], runs=runs, update=("flow",))
    with pytest.raises(ValueError, match="--update needs an existing run: .*boolq"):  # refused before any dataset runs
        study.study_configs(parse(*argv)[1], ["arc_easy", "boolq"], shift=False, runs=runs, update=("meanfield",))
    # another configuration is refused before any training (it used to retrain, then fail to merge)
    monkeypatch.setattr(compare, "run_compare", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ValueError, match=r"--update reruns arc_easy with its run's configuration.*dtype 'fp32' there, 'bf16' now"):
        study.study_configs(parse(*argv, "--dtype", "bf16")[1], ["arc_easy"], shift=False, runs=runs, update=("meanfield",))



def _fail_rerun(out, config, rows, failed):
    """What run_compare leaves of a rerun some of whose (guide, seed) failed: their record, then GuideFailures."""
    from pyro_lora.experiments.results import GuideFailures

    (out / "results.json").write_text(json.dumps({"config": asdict(config), "summary": summarize_seeds(rows),
                                                  "per_seed": rows, "failed": failed, "scoring": CLOZE_SCORING}))
    raise GuideFailures(f"{len(failed)} guide run(s) failed", summarize_seeds(rows))


def test_a_run_on_other_records_is_another_configuration_and_only_a_full_update_may_rerun_it(study, runs, tmp_path, monkeypatch,
                                                                                             capsys):
    """A study resumed a run whose records had changed, and compare then refused it pointing at --overwrite, a flag the
    study lacks; an --update of some methods mixed rows of both; a copy of the data at another path was refused."""
    import pyro_lora.experiments.compare as compare

    easy = runs / "arc_easy" / "results.json"
    saved = json.loads(easy.read_text())
    digest = study.data_digest(study.make_config(parse("--datasets", "arc_easy", "--no-shift", "--seeds", "0,1", "--train-size",
                                                       "64", *SIZES, "--runs", str(runs))[1], "arc_easy", shift=False, runs=runs))
    easy.write_text(json.dumps({**saved, "data": digest, "config": {**saved["config"], "data_dir": str(tmp_path / "a copy")}}))
    argv = ["--datasets", "arc_easy", "--no-shift", "--guides", "map,temperature,meanfield", "--seeds", "0,1", "--train-size", "64",
            *SIZES, "--runs", str(runs), "--docs", str(tmp_path / "docs")]
    assert cli.main(["study", *argv]) == 0  # the same records at another path: complete, skipped
    easy.write_text(json.dumps({**saved, "data": "0" * 64}))
    assert cli.main(["study", *argv]) == 2
    assert "arc_easy (data 'records 000000000000' there, 'records " in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(compare, "run_compare", lambda config, overwrite=False, reference=None, flags=None: calls.append(overwrite))
    assert cli.main(["study", *argv, "--force"]) == 0 and calls == [True]  # replaced, as another configuration
    update = ["--datasets", "arc_easy", "--no-shift", "--train-size", "64", *SIZES, "--runs", str(runs), "--docs", str(tmp_path / "docs")]
    with pytest.raises(ValueError, match=r"the arc_easy records under .* changed since its run \(data records 000000000000 there, "
                                         r"records \w{12} now\): --update meanfield would mix rows of both; restore them, or "
                                         "--update map to rerun every method"):
        study.study_configs(parse(*update, "--update", "meanfield")[1], ["arc_easy"], False, str(runs), ("meanfield",))
    assert [c.guides for c in study.study_configs(parse(*update, "--update", "map")[1], ["arc_easy"], False, str(runs), ("map",))] \
        == [("map", "temperature", "meanfield")]
    # a record from before digests, its data folder moved: only a rerun of every row may take the records now
    easy.write_text(json.dumps({**saved, "config": {**saved["config"], "data_dir": str(tmp_path / "moved")}}))
    with pytest.raises(ValueError, match=r"its settings here \(the flags given, else the study plan.s defaults\) differ from it \(data_dir "):
        study.study_configs(parse(*update, "--update", "meanfield")[1], ["arc_easy"], False, str(runs), ("meanfield",))
    assert len(study.study_configs(parse(*update, "--update", "map")[1], ["arc_easy"], False, str(runs), ("map",))) == 1


def test_an_update_without_the_runs_sizes_names_the_flags_not_changed_records(study, runs, tmp_path):
    """An --update of a run made with --train-size 64 that left the flag out said the records under the data folder
    changed since the run (data records ... there, records ... now; restore them): the plan's size selected other
    records from unchanged files. The settings are compared first, naming the flags to repeat."""
    easy = runs / "arc_easy" / "results.json"
    saved = json.loads(easy.read_text())
    argv = ["--datasets", "arc_easy", "--no-shift", "--seeds", "0,1", "--train-size", "64", *SIZES, "--runs", str(runs)]
    digest = study.data_digest(study.make_config(parse(*argv)[1], "arc_easy", shift=False, runs=runs))
    easy.write_text(json.dumps({**saved, "data": digest}))
    update = ["--datasets", "arc_easy", "--no-shift", *SIZES, "--runs", str(runs), "--update", "meanfield"]
    with pytest.raises(ValueError, match=r"its settings here \(the flags given, else the study plan.s defaults\) differ from it \(train_size 64 there, 1250 now\): give the run's "
                                         r"settings \(--train-size 64\)") as error:
        study.study_configs(parse(*update)[1], ["arc_easy"], False, str(runs), ("meanfield",))
    assert "records" not in str(error.value)
    with_size = parse(*update, "--train-size", "64")[1]
    assert [c.guides for c in study.study_configs(with_size, ["arc_easy"], False, str(runs), ("meanfield",))] == [("meanfield",)]
    assert study._flag("ts", False) == "--no-ts" and study._flag("seeds", [0, 1]) == "--seeds 0,1"
    assert study._flag("eval_datasets", []) == "--no-shift" and study._flag("mc_normalize", "chars") == ""


def test_an_update_refused_for_its_settings_names_every_flag_to_give_back(study, runs, tmp_path):
    """An --update refused for other settings listed the flags to give back without --model (a run recording its
    base's digest is not compared by model path) and without a setting the run left to its default (lr None there):
    given back as listed, the update was refused again. Every differing setting is named, as the run resolved it."""
    from pyro_lora.experiments.setup import BASE_DIGEST_VERSION

    easy = runs / "arc_easy" / "results.json"
    saved = json.loads(easy.read_text())
    (tmp_path / "llama").mkdir()
    config = {**saved["config"], "model": str(tmp_path / "llama")}
    easy.write_text(json.dumps({**saved, "config": config, "request": {**config, "lr": None}, "base": "0" * 64,
                                "base_version": BASE_DIGEST_VERSION}))
    update = ["--datasets", "arc_easy", "--no-shift", "--seeds", "0,1", *SIZES, "--runs", str(runs), "--update", "meanfield"]
    with pytest.raises(ValueError, match=re.escape(f"give the run's settings (--model {tmp_path / 'llama'} --train-size 64 "
                                                   "--lr 0.001), or rerun")):
        study.study_configs(parse(*update, "--lr", "0.005")[1], ["arc_easy"], False, str(runs), ("meanfield",))
    given = parse(*update, "--model", str(tmp_path / "llama"), "--train-size", "64", "--lr", "0.001")[1]
    assert [c.guides for c in study.study_configs(given, ["arc_easy"], False, str(runs), ("meanfield",))] == [("meanfield",)]
    # a copy of the base elsewhere, every other setting the run's, is no refusal here: its digest is compared later
    (tmp_path / "copy").mkdir()
    moved = parse(*update, "--model", str(tmp_path / "copy"), "--train-size", "64", "--lr", "0.001")[1]
    assert len(study.study_configs(moved, ["arc_easy"], False, str(runs), ("meanfield",))) == 1


def test_a_folder_in_place_of_a_run_record_is_said_to_be_one(tmp_path):
    """A results.json or study_run.json that is a folder read as no record: the run was started afresh beside it."""
    from pyro_lora.experiments.results import read_record, read_sidecar

    (tmp_path / "results.json").mkdir()
    (tmp_path / "study_run.json").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'results.json'} is a folder, not a file, where a run "
                                                   "keeps its record: move it")):
        read_record(tmp_path, "move it")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'study_run.json'}, the study's record of this run, is "
                                                   "a folder, not a file: move it away")):
        read_sidecar(tmp_path / "study_run.json")


def test_update_of_the_map_keeps_the_retrained_maps_and_drops_a_failed_seeds(study, runs, tmp_path, monkeypatch):
    """--update map retrains every seed's MAP: the run's folder then keeps the new ones (a resume starts from the MAP
    the merged rows did), and none for a seed whose MAP failed (a resume trains it with the new code)."""
    import pyro_lora.experiments.compare as compare

    easy = runs / "arc_easy"
    for seed in (0, 1):
        (easy / f"map_seed{seed}.safetensors").write_bytes(b"old MAP")

    def fake_run_compare(config, overwrite=False, reference=None, flags=None):  # seed 1's MAP fails: every guide of it fails
        assert reference is None  # every row is replaced: none to match
        out = Path(config.out)
        assert not out.exists()  # nothing copied: the MAP is retrained
        out.mkdir(parents=True)
        (out / "map_seed0.safetensors").write_bytes(b"new MAP")
        _fake_predictions(out, config.guides, "arc_easy")
        rows = [_row(g, "arc_easy", 0, "arc_easy", False) for g in config.guides]
        failed = [{"guide": g, "seed": 1, "error": "RuntimeError: boom", "traceback": ""} for g in config.guides]
        _fail_rerun(out, config, rows, failed)

    monkeypatch.setattr(compare, "run_compare", fake_run_compare)
    argv = ["--datasets", "arc_easy", "--no-shift", "--update", "map",
            "--seeds", "0,1", "--train-size", "64", *SIZES, "--runs", str(runs), "--docs", str(tmp_path / "docs")]
    assert cli.main(["study", *argv]) == 1
    assert (easy / "map_seed0.safetensors").read_bytes() == b"new MAP" and not (easy / "map_seed1.safetensors").exists()


def test_update_reruns_the_variants_of_an_updated_base_and_merges_a_partial_rerun(study, runs, tmp_path, monkeypatch):
    """--update laplace also reruns laplace_val (it tunes laplace's fit: its old rows would mix two fits); a rerun whose
    (laplace, seed 1) fails still merges the finished rows, drops that stale row for the failure, and the dataset fails."""
    import pyro_lora.experiments.compare as compare

    assert study.stale_guides(["laplace"], ["map", "laplace", "laplace_val", "tfb"]) == ["laplace", "laplace_val"]
    assert study.stale_guides(["laplace_val"], ["map", "laplace", "laplace_val"]) == ["laplace_val"]
    assert study.stale_guides(["map"], ["map", "laplace", "tfb_val"]) == ["map", "laplace", "tfb_val"]
    assert study.stale_guides(["flow"], ["map", "plugin_not_loaded"]) == []  # --update never adds a method
    easy = runs / "arc_easy"
    saved = json.loads((easy / "results.json").read_text())
    saved["config"]["guides"] = ["map", "laplace", "laplace_val"]
    saved["per_seed"] = [{**_row("map", "arc_easy", s, "arc_easy", False), "guide": g} for s in (0, 1) for g in saved["config"]["guides"]]
    (easy / "results.json").write_text(json.dumps(saved))
    ran = []

    def fake_run_compare(config, overwrite=False, reference=None, flags=None):  # laplace seed 1 fails; the finished rows have NLL 0.5
        ran.append(list(config.guides))
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        rows = [{**_row("map", "arc_easy", s, "arc_easy", False), "guide": g, "nll": 0.5}
                for s in config.seeds for g in config.guides if (g, s) != ("laplace", 1)]
        failed = [{"guide": "laplace", "seed": 1, "error": "RuntimeError: boom", "traceback": ""}]
        _fail_rerun(out, config, rows, failed)

    monkeypatch.setattr(compare, "run_compare", fake_run_compare)
    argv = ["--datasets", "arc_easy", "--no-shift", "--update", "laplace",
            "--seeds", "0,1", "--train-size", "64", *SIZES, "--runs", str(runs), "--docs", str(tmp_path / "docs")]
    assert cli.main(["study", *argv]) == 1  # the dataset is reported failed
    assert ran == [["laplace", "laplace_val"]]
    merged = json.loads((easy / "results.json").read_text())
    nll = {(r["guide"], r["seed"]): r["nll"] for r in merged["per_seed"]}
    assert nll == {("map", 0): 1.0, ("map", 1): pytest.approx(1.01), ("laplace", 0): 0.5,
                   ("laplace_val", 0): 0.5, ("laplace_val", 1): 0.5}
    assert [(f["guide"], f["seed"]) for f in merged["failed"]] == [("laplace", 1)]
    updates = json.loads((easy / "study_run.json").read_text())["updates"]
    assert updates[-1]["guides"] == ["laplace", "laplace_val"]
    (laplace_row,) = [r for r in merged["summary"] if r["guide"] == "laplace"]  # the summary says what failed
    assert "failed under seed 1" in laplace_row["note"]

    def every_seed_fails(config, overwrite=False, reference=None, flags=None):  # the MAP fails: nothing finishes, and run_compare records that
        from pyro_lora.experiments.results import RunFolder

        run = RunFolder(config.out, config, overwrite=overwrite)
        for s in config.seeds:
            for g in config.guides:
                run.fail(g, s, RuntimeError("the MAP failed"))
        run.raise_failures()

    monkeypatch.setattr(compare, "run_compare", every_seed_fails)
    assert cli.main(["study", *argv]) == 1
    merged = json.loads((easy / "results.json").read_text())  # the earlier update's rows were not merged again
    assert {(r["guide"], r["seed"]) for r in merged["per_seed"]} == {("map", 0), ("map", 1)}
    assert sorted((f["guide"], f["seed"]) for f in merged["failed"]) == [("laplace", 0), ("laplace", 1), ("laplace_val", 0), ("laplace_val", 1)]


def test_study_help_lists_its_flags_with_the_study_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per flag
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["study", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pyro-lora study")
    for flag in ("--datasets", "--no-shift", "--report-only", "--update", "--force", "--runs", "--docs", "--val-fraction",
                 "--train-size", "--guides", "--seeds", "--quiet", "--debug"):
        assert flag in out
    assert "--model MODEL  " in out and "(default per task)" in out and "(default per task: 0,1,2)" in out
    assert "(default runs/study)" in out and "--device {cpu,cuda}   device (default cpu)" in out
    assert "--dataset " not in out and "--mc-normalize" not in out  # set per dataset by the study


def test_study_flags_set_every_task_and_the_rest_comes_from_its_plan(study):
    args, given = parse("--lr", "2e-3", "--epochs", "1", "--seeds", "0", "--guides", "map,temperature", "--rank", "4")
    sst2, easy = (study.make_config(given, d) for d in ("sst2", "arc_easy"))
    for c in (sst2, easy):
        assert (c.lr, c.epochs, c.seeds, c.guides, c.rank) == (2e-3, 1, (0,), ("map", "temperature"), 4)
    assert (sst2.model, sst2.train_size, sst2.val_fraction, sst2.test_size, sst2.samples, sst2.mc_format) == ("minilm", 2000, 0.1, 872, 8, None)
    assert (easy.model, easy.train_size, easy.val_fraction, easy.test_size, easy.mc_format) == ("smollm2", 1250, 0.2, 500, "cloze")
    assert args.shift and not args.report_only and args.runs == "runs/study" and args.docs == "docs"
    # with no flags: SST-2 is the reference task, `compare --full` on all 872 test sentences, 3 seeds
    _, none_given = parse()
    full = cli._config(cli.parser(full=True).parse_args(["compare", "--full", "--test-size", "872", "--seeds", "0,1,2", "--lr", "2e-3"]))
    assert study.make_config(none_given, "sst2") == replace(full, out="runs/study/sst2")
    plan = study.make_config(none_given, "openbookqa")
    assert plan.guides == ("zeroshot", "map", "temperature", "tfb", "laplace") and plan.seeds == (0, 1, 2)
    compare = cli._config(cli.parser().parse_args(["compare"]))
    assert (compare.model, compare.lr, compare.seeds, compare.mc_format) == ("minilm", None, (0,), None)  # compare's own defaults


@pytest.mark.parametrize("argv, message", [
    (["--guides", "map,bogus"], "study: error: argument --guides: unknown guide(s) ['bogus']; available: zeroshot, map,"),
    (["--update", "bogus"], "study: error: argument --update: unknown guide(s) ['bogus']"),
    (["--seeds", "0,0"], "study: error: argument --seeds"),
    (["--val-fraction", "1"], "study: error: argument --val-fraction: 1 must be below 1"),
    (["--datasets", "arc_easy,,boolq"], "study: error: argument --datasets"),
    (["--mc-normalize", "chars"], ": error: unrecognized arguments: --mc-normalize chars"),  # the study sets it per dataset
])
def test_a_bad_study_flag_is_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["study", *argv])
    assert exit_info.value.code == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert error.startswith("pyro-lora") and message in error


def test_report_only_through_the_cli(runs, tmp_path, capsys):
    docs = tmp_path / "site"
    assert cli.main(["study", "--report-only", "--runs", str(runs), "--docs", str(docs)]) == 0
    md = (docs / "study.md").read_text()
    assert f"- report: `pyro-lora study --report-only --runs {runs} --docs {docs}`" in md
    assert "## ARC-Easy (`arc_easy`)" in md and "## OpenBookQA (`openbookqa`)" in md
    assert f"report: {docs / 'study.md'}" in capsys.readouterr().out
    assert cli.main(["study", "--report-only", "--datasets", "boolq", "--runs", str(runs), "--docs", str(docs)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"pyro-lora: error: no results.json under {runs} for boolq: run the study first (or give --runs the folder of its runs) "
        "(--debug shows where)"]


def test_a_study_that_cannot_run_is_refused_before_training(tmp_path, capsys):
    argv = ["study", "--datasets", "arc_easy,no_such_set", "--runs", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs")]
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("pyro-lora: error: ") and "no_such_set" in line
    assert cli.main(["study", "--datasets", "arc_easy", "--update", "map", "--runs", str(tmp_path / "runs")]) == 2
    assert "--update needs an existing run" in capsys.readouterr().err
    # a multiple-choice flag on the classification set: refused by name, before anything runs
    assert cli.main(["study", "--datasets", "sst2", "--no-shift", "--mc-format", "letter", "--runs", str(tmp_path / "runs")]) == 2
    assert "--mc-format / --mc-normalize apply to multiple-choice sets, and --dataset sst2 is a classification set" in capsys.readouterr().err


def test_run_dataset_resumes_what_is_unfinished_and_refuses_another_configuration(study, runs, monkeypatch):
    import pyro_lora.experiments.compare as compare
    from pyro_lora.experiments.results import GuideFailures

    calls = []
    monkeypatch.setattr(compare, "run_compare", lambda config, overwrite=False, flags=None: calls.append((config, overwrite)))
    common = ("--guides", "map,temperature,meanfield", "--train-size", "64", *SIZES)
    same = study.make_config(parse(*common, "--seeds", "0,1")[1], "arc_easy", shift=False, runs=runs)
    assert study.unfinished(same) == [] and study.run_dataset(same, "x") is None and not calls  # complete: skipped
    more_seeds = study.make_config(parse(*common, "--seeds", "0,1,2")[1], "arc_easy", shift=False, runs=runs)
    assert study.unfinished(more_seeds) == [("map", 2), ("temperature", 2), ("meanfield", 2)]
    assert study.run_dataset(more_seeds, "pyro-lora study --seeds 0,1,2") is not None
    assert calls[-1] == (more_seeds, False)  # resumed: run_compare skips the finished (guide, seed)
    # killed part-way: the record matches the request, but a (guide, seed) has no arrays: resumed, not skipped
    import numpy as np

    (runs / "arc_easy" / "predictions_meanfield.npz").unlink()
    np.savez(runs / "arc_easy" / "predictions_meanfield.npz", x=np.zeros(1))
    assert study.unfinished(same) == [("meanfield", 0), ("meanfield", 1)]
    assert study.run_dataset(same, "y") is not None and calls[-1] == (same, False)
    # another configuration is refused, naming the difference: replacing it is --force's
    other = study.make_config(parse(*common, "--seeds", "0,1", "--lr", "5e-4")[1], "arc_easy", shift=False, runs=runs)
    with pytest.raises(ValueError, match=r"holds a run of another configuration \(lr 0\.001 there, 0\.0005 now\).*--force"):
        study.run_dataset(other, "z")
    sidecar = json.loads((runs / "arc_easy" / "study_run.json").read_text())  # the resumes added to the record
    assert sidecar["wall_seconds"] >= 754.0 and sidecar["commands"] == ["pyro-lora study --seeds 0,1", "pyro-lora study --seeds 0,1,2", "y"]
    assert sidecar["finished"] != "2025-01-01T00:00:00+00:00" and sidecar["machine"]["device"] == "cpu"

    def fails(config, overwrite=False, flags=None):
        calls.append((config, overwrite))
        raise GuideFailures("1 guide run(s) failed", [])

    monkeypatch.setattr(compare, "run_compare", fails)
    with pytest.raises(GuideFailures):
        study.run_dataset(other, "w", force=True)
    assert calls[-1] == (other, True)
    # the replacement failed before its first result: the old run is there, and so is its record
    sidecar = json.loads((runs / "arc_easy" / "study_run.json").read_text())
    assert sidecar["commands"] == ["pyro-lora study --seeds 0,1", "pyro-lora study --seeds 0,1,2", "y"]

    def replaces(config, overwrite=False, flags=None):
        (Path(config.out) / "results.json").write_text(json.dumps({"config": asdict(config), "per_seed": []}))

    monkeypatch.setattr(compare, "run_compare", replaces)
    study.run_dataset(other, "v", force=True)
    sidecar = json.loads((runs / "arc_easy" / "study_run.json").read_text())  # a replaced run: a new record
    assert sidecar["commands"] == ["v"] and sidecar["wall_seconds"] < 60 and "running" not in sidecar
    # a kill (no finally) keeps the start: the record is written first, marked running; the next invocation lists it
    seen = []

    def killed(config, overwrite=False, flags=None):
        seen.append(json.loads((Path(config.out) / "study_run.json").read_text()))
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "run_compare", killed)
    more = study.make_config(parse(*common, "--seeds", "0,1,2", "--lr", "5e-4")[1], "arc_easy", shift=False, runs=runs)
    with pytest.raises(KeyboardInterrupt):
        study.run_dataset(more, "u")
    assert seen[0]["running"]["command"] == "u" and seen[0]["commands"] == ["v", "u"]
    (runs / "arc_easy" / "study_run.json").write_text(json.dumps(seen[0]))  # what a kill -9 leaves
    monkeypatch.setattr(compare, "run_compare", lambda config, overwrite=False, flags=None: None)
    study.run_dataset(more, "t")
    sidecar = json.loads((runs / "arc_easy" / "study_run.json").read_text())
    # w: the replacement's try that failed before any result, listed by the one that replaced the run
    assert [i["command"] for i in sidecar["interrupted"]] == ["w", "u"] and "running" not in sidecar
    header = report.header_section(report.load_runs(runs, ["arc_easy"]), "x", "now")
    assert "(not counting 2 invocation(s) cut short or still running, whose time is not recorded)" in header


def test_an_invocation_killed_before_its_first_result_or_during_an_update_is_listed(study, runs, tmp_path, monkeypatch):
    """A run's first invocation killed before any result left a sidecar marked running, which the next invocation
    wrote over (no record to keep); a killed --update left no trace at all."""
    import pyro_lora.experiments.compare as compare

    seen = []

    def killed(config, overwrite=False, reference=None, flags=None):
        seen.append(json.loads((runs / "arc_easy" / "study_run.json").read_text()))
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "run_compare", killed)
    common = ("--no-shift", "--guides", "map,temperature,meanfield", "--seeds", "0,1", "--train-size", "64", *SIZES)
    fresh = study.make_config(parse(*common)[1], "arc_easy", shift=False, runs=tmp_path / "fresh")
    with pytest.raises(KeyboardInterrupt):
        study.run_dataset(replace(fresh, out=str(runs / "arc_easy" / "x")), "first")  # its sidecar: x/study_run.json
    sidecar = runs / "arc_easy" / "x" / "study_run.json"
    assert json.loads(sidecar.read_text())["running"]["command"] == "first"
    monkeypatch.setattr(compare, "run_compare", lambda config, overwrite=False, reference=None, flags=None: None)
    study.run_dataset(replace(fresh, out=str(runs / "arc_easy" / "x")), "second")
    after = json.loads(sidecar.read_text())
    assert [i["command"] for i in after["interrupted"]] == ["first"] and after["commands"] == ["second"]
    # a killed update: marked running at its start, listed under interrupted by the next invocation
    monkeypatch.setattr(compare, "run_compare", killed)
    config = study.study_configs(parse("--datasets", "arc_easy", "--no-shift", "--train-size", "64", *SIZES, "--runs", str(runs),
                                       "--update", "meanfield")[1], ["arc_easy"], False, str(runs), ("meanfield",))[0]
    with pytest.raises(KeyboardInterrupt):
        study.update_dataset(config, "the update")
    assert seen[-1]["running"] == {"command": "the update", "started": seen[-1]["running"]["started"], "update": ["meanfield"],
                                   "machine": seen[-1]["running"]["machine"]}
    assert seen[-1]["running"]["machine"]["cpu_count"] >= 1  # each update records where it ran
    assert json.loads((runs / "arc_easy" / "study_run.json").read_text())["running"]["command"] == "the update"
    header = report.header_section(report.load_runs(runs, ["arc_easy"]), "x", "now")
    assert "(not counting 1 invocation(s) cut short or still running, whose time is not recorded)" in header
    with pytest.raises(KeyboardInterrupt):
        study.update_dataset(config, "again")
    after = json.loads((runs / "arc_easy" / "study_run.json").read_text())
    assert [i["command"] for i in after["interrupted"]] == ["the update"] and after["running"]["command"] == "again"


def test_a_sidecar_never_takes_another_configurations_history_and_a_killed_replacement_is_listed(study, runs, tmp_path,
                                                                                                 monkeypatch):
    """A try of configuration A killed before any result was listed as cut short in the record of configuration B's
    run begun after it; a --force replacement killed after its first result left no record at all (the replaced run's
    went with it); an --update whose merge a kill cut short, finished by the next command, was never listed."""
    import numpy as np

    import pyro_lora.experiments.compare as compare
    from pyro_lora.experiments.results import ARRAYS, MERGING, RESULTS, RunFolder

    def killed(config, overwrite=False, reference=None, flags=None):
        raise KeyboardInterrupt

    common = ("--no-shift", "--guides", "map,temperature,meanfield", "--seeds", "0,1", "--train-size", "64", *SIZES)
    base = study.make_config(parse(*common)[1], "arc_easy", shift=False, runs=runs)
    fresh = replace(base, out=str(tmp_path / "fresh"))
    monkeypatch.setattr(compare, "run_compare", killed)
    with pytest.raises(KeyboardInterrupt):
        study.run_dataset(replace(fresh, lr=5e-4), "A")
    with pytest.raises(KeyboardInterrupt):
        study.run_dataset(fresh, "B1")
    monkeypatch.setattr(compare, "run_compare", lambda config, overwrite=False, reference=None, flags=None: None)
    study.run_dataset(fresh, "B2")
    sidecar = json.loads((tmp_path / "fresh" / "study_run.json").read_text())
    assert [i["command"] for i in sidecar["interrupted"]] == ["B1"]  # A's try is not this run's
    # a replacement killed while the replaced run's files went: no results.json, its record still pending
    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / ".study_run.next.json").write_text(json.dumps({"running": {"command": "R", "started": "t",
                                                                       "config": json.loads(json.dumps(asdict(fresh)))}}))
    study.run_dataset(replace(fresh, out=str(gone)), "after")
    assert [i["command"] for i in json.loads((gone / "study_run.json").read_text())["interrupted"]] == ["R"]

    def first_result_then_killed(config, overwrite=False, reference=None, flags=None):
        rows = [_row("map", "arc_easy", 0, "arc_easy", False)]
        arrays = {"probs": np.full((4, 2), 0.5), "labels": np.arange(4) % 2, "entropy": np.zeros(4), "mutual_information": np.zeros(4)}
        RunFolder(config.out, config, overwrite=overwrite).add("map", 0, rows, {f"arc_easy__seed0__{k}": arrays[k] for k in ARRAYS})
        seen.append(json.loads((Path(config.out) / "study_run.json").read_text()))  # what a kill -9 here leaves
        raise KeyboardInterrupt

    seen = []
    monkeypatch.setattr(compare, "run_compare", first_result_then_killed)
    other = replace(base, lr=5e-4)
    with pytest.raises(KeyboardInterrupt):
        study.run_dataset(other, "replacing", force=True)
    assert seen[0]["running"]["command"] == "replacing" and seen[0]["commands"] == ["replacing"]  # the old run's story went
    (runs / "arc_easy" / "study_run.json").write_text(json.dumps(seen[0]))
    monkeypatch.setattr(compare, "run_compare", lambda config, overwrite=False, reference=None, flags=None: None)
    study.run_dataset(other, "resume")
    sidecar = json.loads((runs / "arc_easy" / "study_run.json").read_text())
    assert [i["command"] for i in sidecar["interrupted"]] == ["replacing"] and "running" not in sidecar
    assert not (runs / "arc_easy" / ".study_run.next.json").exists()
    # a replacement killed before its first result, then run again: the first try is listed once
    monkeypatch.setattr(compare, "run_compare", killed)
    with pytest.raises(KeyboardInterrupt):
        study.run_dataset(base, "try 1", force=True)
    monkeypatch.setattr(compare, "run_compare", first_result_then_killed)
    with pytest.raises(KeyboardInterrupt):
        study.run_dataset(base, "try 2", force=True)
    assert [i["command"] for i in seen[-1]["interrupted"]] == ["try 1"] and seen[-1]["running"]["command"] == "try 2"
    # an update killed in its merge: the next command that reads the run finishes it and lists the update
    easy = runs / "arc_easy"
    update = easy / "update"
    update.mkdir()
    (update / RESULTS).write_text((easy / RESULTS).read_text())
    (easy / MERGING).write_text(str(update))
    (easy / "study_run.json").write_text(json.dumps({**sidecar, "running": {"command": "u", "started": "t", "update": ["map"]}}))
    with pytest.warns(UserWarning, match="finishing the merge"):
        study._saved(base)
    sidecar = json.loads((easy / "study_run.json").read_text())
    assert "running" not in sidecar and sidecar["updates"][-1]["command"] == "u" and sidecar["updates"][-1]["wall_seconds"] is None
    header = report.header_section(report.load_runs(runs, ["arc_easy"]), "x", "now")
    assert "(not counting 2 invocation(s) cut short or still running, whose time is not recorded)" in header  # try 1, u


@pytest.mark.parametrize("argv, message", [
    (["--report-only", "--seeds", "5", "--epochs", "9"], "--report-only trains nothing: --epochs, --seeds would be ignored"),
    (["--report-only", "--force"], "--report-only trains nothing: --update and --force would be ignored"),
    (["--report-only", "--no-ts", "--no-shift", "--dtype", "bf16"], "--report-only trains nothing: --no-shift, --no-ts, --dtype would be ignored"),
    (["--update", "tfb", "--guides", "map,tfb"], "--update reruns the methods it names with each run's own configuration: --guides"),
])
def test_flags_an_invocation_would_ignore_are_refused(argv, message, runs, capsys):
    assert cli.main(["study", *argv, "--runs", str(runs), "--docs", str(runs.parent / "docs")]) == 2
    assert message in capsys.readouterr().err


def test_another_configuration_is_refused_before_any_training_and_force_keeps_complete_runs(study, runs, monkeypatch, capsys):
    import pyro_lora.experiments.compare as compare

    calls = []
    monkeypatch.setattr(compare, "run_compare", lambda config, overwrite=False, flags=None: calls.append((config.dataset, overwrite)))
    argv = ["--datasets", "arc_easy,openbookqa", "--guides", "map,temperature,meanfield", "--seeds", "0,1", "--train-size", "64",
            *SIZES, "--runs", str(runs), "--docs", str(runs.parent / "docs")]
    assert cli.main(["study", *argv, "--lr", "5e-4"]) == 2 and not calls  # both refused, by name, before any training
    err = capsys.readouterr().err
    assert "arc_easy (lr 0.001 there, 0.0005 now), openbookqa (lr 0.001 there, 0.0005 now, " in err
    assert "these runs hold another configuration; give the runs' settings to resume them, or --force to replace them" in err
    # --force replaces the runs of another configuration, never a complete run of this one
    (runs / "openbookqa" / "results.json").write_text((runs / "openbookqa" / "results.json").read_text().replace('"epochs": 2', '"epochs": 3'))
    assert cli.main(["study", *argv, "--force"]) == 0
    assert calls == [("openbookqa", True)]
    # one process at a time writes a run
    from conftest import held_by_another_process

    fresh = runs.parent / "fresh"
    with held_by_another_process(fresh / "openbookqa") as pid:
        assert cli.main(["study", *argv, "--runs", str(fresh)]) == 2
        err = capsys.readouterr().err
        assert f"## openbookqa: FAILED: process {pid} is writing the openbookqa run" in err and "Traceback" not in err
    with folder_lock(runs / "openbookqa"):  # this process's own lock (the study's, around its compare): held on
        with folder_lock(runs / "openbookqa"):
            pass
        assert (runs / "openbookqa" / ".lock").read_text() == str(os.getpid())


@pytest.mark.parametrize("update", [False, True])
def test_a_run_another_process_holds_mid_merge_fails_alone(study, runs, tmp_path, monkeypatch, capsys, update):
    """Planning read every run's record, and one another process was merging into stopped the whole study."""
    import pyro_lora.experiments.compare as compare
    from conftest import held_by_another_process

    from pyro_lora.experiments.results import MERGING

    calls = []
    monkeypatch.setattr(compare, "run_compare", lambda config, overwrite=False, reference=None, flags=None: calls.append(config.dataset))
    (runs / "arc_easy" / MERGING).write_text(str(runs / "arc_easy" / "update"))
    argv = ["--datasets", "arc_easy,openbookqa", "--guides", "map,temperature,meanfield", "--seeds", "0,1", "--train-size",
            "64", *SIZES, "--runs", str(runs), "--docs", str(tmp_path / "docs"), "--force"]  # openbookqa's plan: replaced
    argv = ["--datasets", "arc_easy", "--no-shift", "--update", "meanfield", "--train-size", "64", *SIZES, "--runs", str(runs),
            "--docs", str(tmp_path / "docs")] if update else argv
    with held_by_another_process(runs / "arc_easy"):
        status = cli.main(["study", *argv])
    err = capsys.readouterr().err
    if update:  # what to rerun is read from the run: the invocation is refused in one line
        assert status == 2 and err.startswith("pyro-lora: error: another process is writing the arc_easy run") and not calls
        return
    assert "## arc_easy: FAILED: " in err and "Traceback" not in err, err
    assert status == 1 and calls == ["openbookqa"]


def test_one_config_comparison_for_resume_merge_and_the_study(tmp_path):
    from pyro_lora.experiments.results import config_differences

    request = asdict(CompareConfig(lr=None, seeds=(0,), out="a"))
    record = {"config": {**request, "lr": 2e-3, "seeds": [0], "data_dir": None}, "request": request}
    assert config_differences(record, CompareConfig(lr=2e-3, seeds=(0,), out="a")) == {}  # what the default resolved to
    assert config_differences(record, CompareConfig(seeds=(0,), out="a")) == {}  # the default again
    assert config_differences(record, CompareConfig(lr=1e-3, seeds=(0, 1), out="b"), ignore=("seeds", "out")) == {"lr": (None, 1e-3)}
    assert config_differences(record["config"], CompareConfig(lr=1e-3, seeds=(0,), out="a")) == {"lr": (2e-3, 1e-3)}  # a bare config
    from pyro_lora.data import resolve_data_dir

    assert config_differences(record, CompareConfig(lr=2e-3, seeds=(0,), out="a", data_dir=str(resolve_data_dir()))) == {}
    assert config_differences(record, CompareConfig(lr=2e-3, seeds=(0,), out="a", data_dir=str(tmp_path))) == {
        "data_dir": (None, str(tmp_path))}


def test_a_study_table_marks_a_mean_over_fewer_seeds():
    rows = summarize_seeds([{"guide": g, "dataset": "arc_easy", "seed": s, "accuracy": 0.5, "ece": 1.0}
                            for g, seeds in (("map", (0, 1, 2)), ("flow", (0,))) for s in seeds])
    table = report.markdown_table(rows, report.columns("accuracy", "ece"))
    assert "| flow (a mean over seed 0 only: seed(s) 1, 2 missing) |" in table and "| map |" in table


def test_a_merge_cut_short_by_a_kill_is_finished_by_the_next_reader(study, runs, tmp_path, monkeypatch):
    """merge_results copies a rerun's files one by one: a kill part-way left new prediction files beside the old rows
    (and their figures), read as complete. Its marker makes the next reader finish the merge."""
    import numpy as np

    from pyro_lora.experiments import results as R

    easy = runs / "arc_easy"
    update = easy / "update"
    update.mkdir()
    rows = [{**_row("meanfield", "arc_easy", s, "arc_easy", False), "nll": 0.5} for s in (0, 1)]
    config = {**json.loads((easy / "results.json").read_text())["config"], "guides": ["meanfield"]}
    (update / "results.json").write_text(json.dumps({"config": config, "summary": summarize_seeds(rows), "per_seed": rows,
                                                     "scoring": CLOZE_SCORING}))  # a rerun records its cloze form
    np.savez(update / "predictions_meanfield.npz", arrays=np.zeros(2))
    (update / "map_seed0.safetensors").write_bytes(b"the MAP")
    real = R.write_json

    def killed(path, obj):
        if Path(path).name == "results.json":
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(R, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        R.merge_results(easy, update)
    monkeypatch.setattr(R, "write_json", real)  # not undo(): the fixture's patches stay
    assert (easy / R.MERGING).is_file()  # new arrays beside the old rows
    shutil.copytree(easy, tmp_path / "copy")  # a copy of the run merges its own copy of the rerun, not the original's
    (easy / ".lock").write_text(str(os.getpid() + 10**6))  # a process that is gone
    with pytest.warns(UserWarning, match="finishing the merge of .*update, which a kill cut short"):
        record = R.read_record(easy, "x")
    assert not (easy / R.MERGING).exists() and (easy / "map_seed0.safetensors").read_bytes() == b"the MAP"
    assert {r["seed"]: r["nll"] for r in record["per_seed"] if r["guide"] == "meanfield"} == {0: 0.5, 1: 0.5}
    later = [{**r, "nll": 0.9} for r in rows]
    (update / "results.json").write_text(json.dumps({"config": config, "summary": summarize_seeds(later), "per_seed": later,
                                                    "scoring": CLOZE_SCORING}))
    with pytest.warns(UserWarning, match="finishing the merge of .*copy.*update"):
        copied = R.read_record(tmp_path / "copy", "x")
    assert {r["seed"]: r["nll"] for r in copied["per_seed"] if r["guide"] == "meanfield"} == {0: 0.5, 1: 0.5}
    (easy / R.MERGING).write_text(str(tmp_path / "gone"))
    with pytest.raises(ValueError, match="its rerun folder .*gone is gone: .*delete .*.merging and rerun that --update"):
        R.read_record(easy, "x")
    from conftest import held_by_another_process

    with held_by_another_process(easy):  # another process holds the run: it may be merging right now
        with pytest.raises(ValueError, match=r"another process holds .*arc_easy \(its .lock\) and may be merging an --update"):
            R.read_record(easy, "x")


def test_a_merge_cut_short_is_finished_holding_the_runs_lock(runs, monkeypatch):
    """finish_merge checked that no other process held the run, then merged without taking the lock: two readers (two
    --report-only) finished one merge at once, each copying files and writing results.json."""
    import threading

    from pyro_lora import locking
    from pyro_lora.experiments import results as R

    easy = runs / "arc_easy"
    (easy / "update").mkdir()
    (easy / "update" / "results.json").write_text("{}")
    (easy / R.MERGING).write_text("update")
    held = []

    def merge(out, update, record=None):
        held.append((Path(out).resolve() / ".lock", os.getpid(), threading.get_ident()) in locking._HELD)
        (Path(out) / R.MERGING).unlink()

    monkeypatch.setattr(R, "merge_results", merge)
    with pytest.warns(UserWarning, match="finishing the merge"):
        R.finish_merge(easy)
    assert held == [True] and not (easy / R.MERGING).exists()


def test_an_update_cut_short_resumes_with_what_it_finished_and_nothing_else_does(study, runs, monkeypatch, capsys):
    """A kill or an error in an --update's third hour lost every (method, seed) it had finished: the next invocation
    emptied its folder and started again. Resumed now, by the same update only, from the same MAPs; --force restarts."""
    import numpy as np

    import pyro_lora.experiments.compare as compare
    from pyro_lora.experiments.results import ARRAYS, RunFolder

    easy = runs / "arc_easy"
    record = json.loads((easy / "results.json").read_text())
    (easy / "results.json").write_text(json.dumps({**record, "maps": {"0": "a" * 64, "1": "b" * 64}}))
    arrays = {"probs": np.full((4, 2), 0.5), "labels": np.arange(4) % 2, "entropy": np.zeros(4), "mutual_information": np.zeros(4)}
    ran = []

    def rerun(stop=None, map_digest="a" * 64):
        def run_compare(config, overwrite=False, reference=None, flags=None):  # each (guide, seed) written as it finishes
            run = RunFolder(config.out, config, overwrite=overwrite)
            run.check_scoring(config)  # as compare records it: the cloze form now
            for seed in config.seeds:
                for guide in config.guides:
                    if run.complete(guide, seed, ["arc_easy"]):
                        continue
                    if (guide, seed) == stop:
                        raise KeyboardInterrupt if seed else RuntimeError("out of memory")
                    run.record_map(seed, map_digest if seed == 0 else "b" * 64)
                    ran.append((guide, seed, overwrite))
                    run.add(guide, seed, [{**_row(guide, "arc_easy", seed, "arc_easy", False), "nll": 0.5}],
                            {f"arc_easy__seed{seed}__{k}": arrays[k] for k in ARRAYS})
        monkeypatch.setattr(compare, "run_compare", run_compare)

    def update(guides=("meanfield",), force=False, command="u"):
        argv = ("--datasets", "arc_easy", "--no-shift", "--train-size", "64", *SIZES, "--runs", str(runs), "--update", ",".join(guides))
        config = study.study_configs(parse(*argv)[1], ["arc_easy"], False, str(runs), guides)[0]
        return study.update_dataset(config, command, force=force)

    rerun(stop=("meanfield", 1))
    with pytest.raises(KeyboardInterrupt):  # a kill after seed 0
        update(command="first")
    rerun()
    update(command="second")
    assert ran == [("meanfield", 0, True), ("meanfield", 1, False)]  # seed 0 kept, not rerun
    assert "resuming the update `first` begun " in capsys.readouterr().out
    merged = json.loads((easy / "results.json").read_text())
    assert {r["seed"]: r["nll"] for r in merged["per_seed"] if r["guide"] == "meanfield"} == {0: 0.5, 1: 0.5}
    assert [u["command"] for u in json.loads((easy / "study_run.json").read_text())["updates"]] == ["second"]
    # a finished update is not resumed: the next one reruns everything
    ran.clear()
    update()
    assert ran == [("meanfield", 0, True), ("meanfield", 1, True)]
    # --force reruns what the update cut short had finished
    ran.clear()
    rerun(stop=("meanfield", 1))
    with pytest.raises(KeyboardInterrupt):
        update()
    rerun()
    update(force=True)
    assert ran == [("meanfield", 0, True), ("meanfield", 0, True), ("meanfield", 1, True)]
    # an error cuts it short too (temperature's seed 0 finished, meanfield's failed): resumed
    ran.clear()
    rerun(stop=("meanfield", 0))
    with pytest.raises(RuntimeError, match="out of memory"):
        update(("meanfield", "temperature"))
    rerun()
    update(("meanfield", "temperature"))
    assert ran == [("temperature", 0, True), ("meanfield", 0, False), ("temperature", 1, False), ("meanfield", 1, False)]
    # an update of other methods in between: the rows of the one cut short are not the next one's
    ran.clear()
    rerun(stop=("meanfield", 0))
    with pytest.raises(RuntimeError, match="out of memory"):
        update(("meanfield", "temperature"))
    rerun(stop=("temperature", 1))
    with pytest.raises(KeyboardInterrupt):
        update(("temperature",))
    rerun()
    update(("meanfield", "temperature"))
    assert ran[-4:] == [("temperature", 0, True), ("meanfield", 0, True), ("temperature", 1, True), ("meanfield", 1, True)]
    # rows started from another MAP than the run's are never resumed
    ran.clear()
    rerun(stop=("meanfield", 1), map_digest="c" * 64)
    with pytest.raises(KeyboardInterrupt):
        update()
    rerun()
    update()
    assert ran == [("meanfield", 0, True), ("meanfield", 0, True), ("meanfield", 1, True)]
    # an update of the MAP resumes from the MAPs it retrained (never the run's)
    ran.clear()
    rerun(stop=("meanfield", 1), map_digest="c" * 64)
    with pytest.raises(KeyboardInterrupt):
        update(("map",))
    rerun(map_digest="c" * 64)
    update(("map",))
    assert len(ran) == 6 and ran[-1] == ("meanfield", 1, False)


def test_an_update_killed_around_its_folder_or_its_record_is_neither_resumed_from_another_nor_lost(study, runs, monkeypatch):
    """A kill after an update's 'running' mark but before its folder was emptied left the previous, finished update's
    rows to be resumed and merged as the next one's; a kill between the merge and the record of the update lost it
    (listed only as cut short)."""
    import pyro_lora.experiments.compare as compare
    from pyro_lora.experiments.results import MERGING, RunFolder

    ran = []

    def run_compare(config, overwrite=False, reference=None, flags=None):
        run = RunFolder(config.out, config, overwrite=overwrite)
        run.check_scoring(config)  # as compare records it: the cloze form now
        for seed in config.seeds:
            if not run.complete("meanfield", seed, ["arc_easy"]):
                ran.append((seed, overwrite))
                run.add("meanfield", seed, [_row("meanfield", "arc_easy", seed, "arc_easy", False)], {})

    monkeypatch.setattr(compare, "run_compare", run_compare)
    argv = ("--datasets", "arc_easy", "--no-shift", "--train-size", "64", *SIZES, "--runs", str(runs), "--update", "meanfield")
    config = study.study_configs(parse(*argv)[1], ["arc_easy"], False, str(runs), ("meanfield",))[0]
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # its folder left, as a kill after its merge leaves it
    study.update_dataset(config, "first")

    def killed(path, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        study.update_dataset(config, "second")
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    ran.clear()
    study.update_dataset(config, "third")
    assert ran == [(0, True), (1, True)]  # all rerun: the first update's rows are not the third's
    easy = runs / "arc_easy"
    real_write = study.write_json

    def killed_at_the_record(path, obj):
        if Path(path).name == "study_run.json" and "running" not in obj:
            raise KeyboardInterrupt
        real_write(path, obj)

    monkeypatch.setattr(study, "write_json", killed_at_the_record)
    with pytest.raises(KeyboardInterrupt):
        study.update_dataset(config, "fourth")
    monkeypatch.setattr(study, "write_json", real_write)
    assert (easy / MERGING).is_file()
    (easy / ".lock").unlink(missing_ok=True)
    with pytest.warns(UserWarning, match="finishing the merge"):
        study._saved(config)
    sidecar = json.loads((easy / "study_run.json").read_text())
    assert [u["command"] for u in sidecar["updates"]] == ["first", "third", "fourth"] and "running" not in sidecar


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ("[]", "it is not a JSON object"),
    ('{"running": "x"}', "its 'running' is not an object with a 'command'"),
    ('{"updates": {}}', "its 'updates' is not a list"),
])
def test_a_study_record_that_cannot_be_read_is_refused_by_name_before_any_work(study, runs, content, message):
    (runs / "arc_easy" / "study_run.json").write_text(content)
    argv = ("--datasets", "arc_easy", "--no-shift", "--train-size", "64", *SIZES, "--runs", str(runs))
    for update in (("meanfield",), None):
        with pytest.raises(ValueError, match=f"study_run.json, the study's record of this run.*{re.escape(message)}.*move it away"):
            study.study_configs(parse(*argv)[1], ["arc_easy"], False, str(runs), update)


def test_update_refuses_a_link_where_it_reruns(study, runs, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (runs / "arc_easy" / "update").symlink_to(tmp_path / "elsewhere")
    config = replace(study.make_config(parse("--datasets", "arc_easy", "--no-shift", "--seeds", "0,1", "--train-size", "64",
                                             *SIZES, "--runs", str(runs))[1], "arc_easy", runs=runs), guides=("meanfield",))
    with pytest.raises(ValueError, match="update is a link, where --update reruns the methods: move it"):
        study.update_dataset(config, "x")


def test_report_tables_come_from_the_per_seed_rows_as_the_verdict_does(runs, tmp_path):
    """A record whose stored summary is older than its rows (a hand-edited row): the table printed the stored means
    beside a verdict recomputed from the rows, the two disagreeing on the same page."""
    easy = runs / "arc_easy" / "results.json"
    saved = json.loads(easy.read_text())
    for r in saved["per_seed"]:
        if r["guide"] == "map" and r["dataset"] == "arc_easy" and r["seed"] == 0:
            r["nll"] += 1.0
    easy.write_text(json.dumps(saved))
    md = report.build_report(runs, tmp_path / "docs", command="x").read_text()
    assert "| map | no validation data | **0.605 ± 0.007** | 10.50 ± 0.71 | 1.505 ± 0.700 |" in md


def test_a_file_for_a_folder_or_a_folder_for_the_report_is_refused_before_any_work(runs, tmp_path, capsys):
    """--runs naming a file printed a traceback, then 'no results.json under ...: run the study first'; DOCS/study.md
    a folder failed with a raw OS error, after the training of a full study."""
    (tmp_path / "a_file").write_text("")
    assert cli.main(["study", "--report-only", "--runs", str(tmp_path / "a_file")]) == 2
    assert f"--runs {tmp_path / 'a_file'} is a file: give the folder" in capsys.readouterr().err
    (tmp_path / "docs" / "study.md").mkdir(parents=True)
    assert cli.main(["study", "--report-only", "--runs", str(runs), "--docs", str(tmp_path / "docs")]) == 2
    assert "study.md is a folder, where the study writes its report" in capsys.readouterr().err


def _shift_run(rows_per_seed, seeds=(0, 1, 2)):
    """A synthetic OpenBookQA run: ``rows_per_seed(seed)`` gives (guide, dataset, metrics) triples."""
    from pyro_lora.experiments.results import summarize_run
    per = []
    for s in seeds:
        for g, ds, m in rows_per_seed(s):
            point = g in ("map", "temperature")
            per.append({"guide": g, "dataset": ds, "seed": s, "setting": "validation-tuned" if g == "temperature" else "x",
                        "accuracy": 0.6, "ece": 5.0, "nll": 1.0, "brier": 0.2, "aurc": 0.05,
                        "mutual_information": 0.0 if point else 0.1, **m})
    return {"openbookqa": {"config": {"dataset": "openbookqa", "seeds": list(seeds)}, "per_seed": per,
                           "summary": summarize_run(per, [])}}


def _tables(runs):
    return {m: report.metric_table(runs, m, complete_only=True) for m in ("accuracy", "ece", "nll", "ood_auroc_entropy", "ood_auroc_mi")}


def test_a_loss_of_exactly_one_accuracy_point_is_no_more_than_one():
    """0.79 - 0.80 is -0.010000000000000009 in floats: the report said "more than 1 point (-1.0)"."""
    runs = _shift_run(lambda s: [("map", "openbookqa", {"accuracy": 0.80}), ("laplace", "openbookqa", {"accuracy": 0.79}),
                                 ("temperature", "openbookqa", {"accuracy": 0.80})])
    lines = report.guide_sentences(_tables(runs), "laplace", report.set_labels(runs))
    assert any("loses no more than 1 accuracy point" in line for line in lines), lines


def test_a_loss_above_one_point_is_shown_with_the_digits_that_put_it_above():
    """-1.04 points printed as -1.0 beside "more than 1 point" contradicted itself, in the report and the verdict."""
    from pyro_lora.experiments.verdict import verdict

    runs = _shift_run(lambda s: [("map", "openbookqa", {"accuracy": 0.3514}), ("tfb", "openbookqa", {"accuracy": 0.341}),
                                 ("temperature", "openbookqa", {"accuracy": 0.3514})])
    lines = report.guide_sentences(_tables(runs), "tfb", report.set_labels(runs))
    assert any("loses more than 1 accuracy point to MAP on OBQA (-1.04) points" in line for line in lines), lines
    assert "more than 1 point below it: tfb -1.04" in verdict(runs["openbookqa"]["per_seed"], "openbookqa")
    runs = _shift_run(lambda s: [("map", "openbookqa", {"accuracy": 0.8}), ("tfb", "openbookqa", {"accuracy": 0.78996}),
                                 ("temperature", "openbookqa", {"accuracy": 0.8})])
    lines = report.guide_sentences(_tables(runs), "tfb", report.set_labels(runs))
    assert any("loses no more than 1 accuracy point" in line for line in lines), lines  # 1.004 points prints 1.00
    assert "none more than 1 point below it" in verdict(runs["openbookqa"]["per_seed"], "openbookqa")


def test_ood_detection_is_judged_against_maps_entropy_auroc_not_its_mi_of_one_half():
    """MAP's MI AUROC is 0.5 by construction; taken as its "better of the two" it hid an entropy AUROC below 0.5."""
    def rows(s):
        j = 0.001 * s
        return [(g, "openbookqa", {}) for g in ("map", "temperature", "laplace")] + [
            ("map", "arc_easy", {"ood_auroc_entropy": 0.45 + j, "ood_auroc_mi": 0.5}),
            ("temperature", "arc_easy", {"ood_auroc_entropy": 0.45 + j, "ood_auroc_mi": 0.5}),
            ("laplace", "arc_easy", {"ood_auroc_entropy": 0.48 + j, "ood_auroc_mi": 0.47 + j})]
    runs = _shift_run(rows)
    lines = report.guide_sentences(_tables(runs), "laplace", report.set_labels(runs))
    assert "**laplace**'s OOD AUROC by entropy beats MAP's by entropy on every shift (1 of 1)." in lines, lines
    assert "**laplace**'s OOD AUROC by MI beats MAP's by entropy on every shift (1 of 1)." in lines, lines


def test_ood_detection_judges_entropy_and_mi_each_on_its_own_never_the_better_of_the_two():
    """The sentence took each method's better of its entropy and MI OOD AUROC, chosen after seeing the shifted test
    sets: laplace's entropy AUROC 0.40 below MAP's 0.45 was "detects the shift better than MAP" by its MI's 0.60."""
    def rows(s):
        return [(g, "openbookqa", {}) for g in ("map", "temperature", "laplace")] + [
            ("map", "arc_easy", {"ood_auroc_entropy": 0.45, "ood_auroc_mi": 0.5}),
            ("temperature", "arc_easy", {"ood_auroc_entropy": 0.45, "ood_auroc_mi": 0.5}),
            ("laplace", "arc_easy", {"ood_auroc_entropy": 0.40, "ood_auroc_mi": 0.60})]
    runs = _shift_run(rows)
    lines = [line for line in report.guide_sentences(_tables(runs), "laplace", report.set_labels(runs)) if "AUROC" in line]
    label = report.set_labels(runs)[-1]
    assert lines == [f"**laplace**'s OOD AUROC by entropy does not beat MAP's by entropy on 1 of 1 shifts: {label} (-0.050).",
                     "**laplace**'s OOD AUROC by MI beats MAP's by entropy on every shift (1 of 1)."], lines


def test_the_shift_tables_bold_each_targets_best_and_never_a_point_estimates_mi():
    def rows(s):
        return [(g, "openbookqa", {}) for g in ("map", "laplace")] + [
            ("map", "arc_challenge", {"ood_auroc_entropy": 0.55, "ood_auroc_mi": 0.5, "accuracy": 0.50}),
            ("laplace", "arc_challenge", {"ood_auroc_entropy": 0.62, "ood_auroc_mi": 0.45, "accuracy": 0.52}),
            ("map", "arc_easy", {"ood_auroc_entropy": 0.70, "ood_auroc_mi": 0.5, "accuracy": 0.70}),
            ("laplace", "arc_easy", {"ood_auroc_entropy": 0.68, "ood_auroc_mi": 0.47, "accuracy": 0.69})]
    text = report.shift_section(_shift_run(rows))
    bold = {(cells[1].strip()[-1], cells[2].strip()): [c.strip().startswith("**") for c in cells[3:8]]
            for line in text.splitlines() if line.startswith("| OBQA") and (cells := line.split("|"))}
    # columns: accuracy, ECE, NLL, OOD AUROC by entropy, by MI; rows keyed by the target's last letter (C, E)
    assert bold[("C", "laplace")][0] and bold[("C", "laplace")][3]  # ARC-C's best, though ARC-E's values are higher
    assert bold[("E", "map")][0] and bold[("E", "map")][3]
    assert not bold[("C", "map")][4] and not bold[("E", "map")][4]  # MAP's MI AUROC of 0.5 is no detection
    # AUROCs below 0.5 (scores lower on the shifted set): the highest of them was bold, no detection at all
    below = report.markdown_table([{"guide": g, "ood_auroc_entropy": v} for g, v in (("map", 0.30), ("tfb", 0.45))],
                                  [c for c in report.SHIFTED if c.key == "ood_auroc_entropy"])
    assert "**" not in below and "0.450" in below


def test_the_report_says_no_guide_beats_on_a_value_it_prints_as_a_tie():
    """NLL 0.5001 against MAP's 0.5004 (both shown 0.500) was "beats MAP on NLL"; an OOD AUROC equal to MAP's was
    "detects the shift better than MAP"."""
    def rows(s):
        return [("map", "openbookqa", {"nll": 0.5004}), ("temperature", "openbookqa", {"nll": 0.6}),
                ("laplace", "openbookqa", {"nll": 0.5001}),
                ("map", "arc_easy", {"ood_auroc_entropy": 0.7, "ood_auroc_mi": 0.5}),
                ("temperature", "arc_easy", {"ood_auroc_entropy": 0.7, "ood_auroc_mi": 0.5}),
                ("laplace", "arc_easy", {"ood_auroc_entropy": 0.7001, "ood_auroc_mi": 0.4})]
    runs = _shift_run(rows)
    lines = report.guide_sentences(_tables(runs), "laplace", report.set_labels(runs))
    assert any("does not beat MAP on NLL on 2 of 2 sets: OBQA (+0.000)" in line for line in lines), lines
    assert any("OOD AUROC by entropy does not beat MAP's by entropy on 1 of 1 shifts" in line for line in lines), lines
    # the printed values decide, not their rounded difference: 0.500 against 0.501 beats, 0.501 against 0.501 does not
    tables = {"nll": {"g": {"a": 0.5004, "b": 0.5006}, "map": {"a": 0.5006, "b": 0.5014}}, "ece": {}, "accuracy": {}}
    assert report.guide_sentences(tables, "g", ["a", "b"])[0] == "**g** does not beat MAP on NLL on 1 of 2 sets: b (+0.000) nats."
    # nor do values within float round-off that a rounding boundary separates (0.400 against 0.401 as printed)
    tables = {"nll": {"g": {"a": 0.4004999990}, "map": {"a": 0.4005000010}}, "ece": {}, "accuracy": {}}
    assert report.guide_sentences(tables, "g", ["a"])[0] == "**g** does not beat MAP on NLL on 1 of 1 sets: a (+0.000) nats."


def test_a_report_over_runs_without_recorded_time_says_so(tmp_path):
    """Runs made by compare alone have no wall time: the header read "total wall time: 0.0s"."""
    from test_compare import _fake_run

    _fake_run(tmp_path / "sst2", ("map",), nll=0.5)
    header = report.header_section(report.load_runs(tmp_path, ["sst2"]), "x", "now")
    assert "- total wall time: not recorded for any of the 1 dataset runs" in header and "0.0s" not in header


def test_a_report_withholds_the_ood_auroc_of_sampling_methods_scored_before_one_draw_for_all(tmp_path):
    """Runs before predict_seeding 2 drew a sampling method's weight samples apart for the test and each shifted set:
    the report published TFB's OOD AUROC (a "detects the shift better than MAP" line) from two draws."""
    rows = [{"guide": g, "dataset": d, "seed": 0, "accuracy": 0.5, "ece": 5.0, "nll": 1.0, "ood_auroc_entropy": 0.7,
             "ood_auroc_mi": 0.3 if g == "tfb" else 0.5} for g in ("map", "tfb", "laplace") for d in ("openbookqa", "arc_easy")]
    config = asdict(CompareConfig(model="smollm2", dataset="openbookqa", eval_datasets=("arc_easy",), guides=("map", "tfb", "laplace")))
    for seeding, withheld in ((None, True), (2, False)):
        out = tmp_path / str(seeding) / "openbookqa"
        out.mkdir(parents=True)
        record = {"config": config, "summary": summarize_seeds(rows), "per_seed": rows}
        (out / "results.json").write_text(json.dumps(record | ({"predict_seeding": seeding} if seeding else {})))
        run = report.load_runs(out.parent, ["openbookqa"])["openbookqa"]
        shifted = {r["guide"]: r for r in report.shift_rows(run)}
        assert (shifted["tfb"]["ood_auroc_entropy"] != shifted["tfb"]["ood_auroc_entropy"]) is withheld  # NaN: n/a
        assert shifted["laplace"]["ood_auroc_entropy"] == 0.7 and shifted["map"]["ood_auroc_entropy"] == 0.7
        in_domain = {r["guide"]: r for r in report.in_distribution_rows(run)}
        assert in_domain["tfb"]["ood_auroc_entropy"] == 0.7  # only the shifted sets' rows



@pytest.mark.parametrize("key", ["seeds", "epochs", "guides", "dataset"])
def test_a_run_whose_config_lacks_a_key_the_report_reads_is_left_out_with_a_warning(runs, tmp_path, key):
    """The documented "a record that cannot be read is left out with a warning": a config without 'seeds' failed the
    whole report with a bare KeyError 'seeds'."""
    path = runs / "openbookqa" / "results.json"
    saved = json.loads(path.read_text())
    del saved["config"][key]
    path.write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=f"openbookqa/results.json is not the results .*its config lacks '{key}'.*left out of the report"):
        md = report.build_report(runs, tmp_path / "docs", command="x").read_text()
    assert "## ARC-Easy" in md and "## OpenBookQA" not in md


def test_an_infinite_score_is_na_in_the_report_never_the_best(runs, tmp_path):
    """A hand-edited -Infinity (JSON readers take it) was printed in bold as the best NLL; the verdict took it as n/a."""
    path = runs / "arc_easy" / "results.json"
    saved = json.loads(path.read_text())
    saved["per_seed"][2]["nll"] = float("-inf")  # meanfield, seed 0
    path.write_text(json.dumps(saved))
    md = report.build_report(runs, tmp_path / "docs", command="x").read_text()
    assert "inf" not in md.replace("info", "")
    line = next(line for line in md.splitlines() if line.startswith("| meanfield | no validation data | 0.555"))
    assert line.split(" | ")[4] == "n/a"  # its NLL cell
    assert "NLL of meanfield on ARC-E (n/a on seed 0)" in md


def test_the_total_wall_time_counts_the_recorded_updates(runs, tmp_path):
    """A 754 s run and a recorded 2 h `--update` read "total wall time: 12m 34s", the update left out while the line
    said it left out only invocations whose time is not recorded."""
    sidecar = runs / "arc_easy" / "study_run.json"
    side = json.loads(sidecar.read_text())
    side["updates"] = [{"guides": ["meanfield"], "command": "pyro-lora study --update meanfield", "started": "a",
                        "finished": "b", "wall_seconds": 7200.0},
                       {"guides": ["map"], "command": "pyro-lora study --update map", "started": "a", "finished": "b",
                        "wall_seconds": None}]
    sidecar.write_text(json.dumps(side))
    header = report.header_section(report.load_runs(runs), "x", "now")
    assert ("- total wall time: 2h 12m 34s over 2 dataset runs and 1 --update invocation(s) (some runs have no recorded "
            "wall time) (not counting 1 invocation(s) cut short or still running") in header


def test_the_verdict_names_a_score_no_row_records_not_a_missing_method():
    """Rows without an 'aurc' key: the verdict said MAP and temperature scaling had no finished seed, which both had."""
    from pyro_lora.experiments.verdict import verdict

    rows = [{k: v for k, v in _row(g, "arc_easy", s, "arc_easy", False).items() if k != "aurc"}
            for s in (0, 1) for g in ("map", "temperature", "meanfield")]
    line = next(line for line in verdict(rows, "arc_easy").splitlines() if line.startswith("- AURC"))
    assert line == ("- AURC: not compared against MAP and temperature scaling: MAP's AURC is not recorded in the rows (a "
                    "record from before it was scored, or edited); temperature scaling's AURC is not recorded in the rows "
                    "(a record from before it was scored, or edited).")
    assert "no finished seed" in verdict([r for r in rows if r["guide"] != "map"], "arc_easy")



def _record_config(out):
    """The CompareConfig of the run record in ``out`` (lists as tuples)."""
    saved = json.loads((out / "results.json").read_text())["config"]
    return CompareConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()
                            if k in CompareConfig.__dataclass_fields__})


def test_header_calls_unfinished_what_the_resume_reruns(study, runs, tmp_path):
    """A (method, seed) with rows but without its +ts row or its arrays (a kill between them) read as done to the
    header, while the study's resume reran it; its finished column gave the time a Ctrl-C stopped it, and its seeds
    column only the seeds with rows."""
    import numpy as np

    from pyro_lora.experiments.results import ARRAYS
    from pyro_lora.experiments.study_header import run_state

    easy = runs / "arc_easy"
    np.savez(easy / "predictions_meanfield.npz", **{f"arc_easy__seed0__{k}": np.zeros(4) for k in ARRAYS})  # seed 1's lost
    saved = json.loads((easy / "results.json").read_text())
    saved["request"] = {**saved["config"], "seeds": [0, 1, 2]}
    (easy / "results.json").write_text(json.dumps(saved))
    assert study.unfinished(replace(_record_config(easy), seeds=(0, 1))) == [("meanfield", 1)]
    header = report.header_section(report.load_runs(runs, ["arc_easy"]), "x", "now")
    assert "- ARC-Easy: **unfinished**: 4 of 9 (method, seed) neither finished nor failed" in header
    assert "| ARC-Easy | SmolLM2-135M | 12m 34s | unfinished (stopped 2025-01-01T00:00:00+00:00) | 0,1,2 |" in header
    # a method's row without its +ts row: unfinished, as run_compare's plan says
    from pyro_lora.guides.registry import METHODS

    version = METHODS["ensemble"].version  # rows of the version registered now: unfinished, not older
    run = {"config": {"dataset": "d", "eval_datasets": [], "guides": ["ensemble"], "seeds": [0], "ts": True},
           "per_seed": [{"guide": "ensemble", "dataset": "d", "seed": 0, "method_version": version}]}
    assert run_state(run) == ["**unfinished**: 1 of 1 (method, seed) neither finished nor failed (a run cut short, or "
                              "still running; the same command resumes it)"]
    assert run_state({**run, "per_seed": run["per_seed"] + [{"guide": "ensemble+ts", "dataset": "d", "seed": 0,
                                                             "method_version": version}]}) == []


def test_report_draws_its_figures_from_the_rows_it_reports(runs, tmp_path):
    """A kill where a run redraws its summary figures after its last row left PNGs without that method, and the
    report copied them: it draws its own from the run's arrays."""
    easy = runs / "arc_easy"
    assert (easy / "reliability_grid.png").read_bytes() == b"\x89PNG fake"  # the run's stale figure
    md = report.build_report(runs, tmp_path / "docs", command="x").read_text()
    for kind in ("reliability_grid", "calibration_vs_accuracy"):
        drawn = (tmp_path / "docs" / "study" / f"arc_easy_{kind}.png").read_bytes()
        assert drawn.startswith(b"\x89PNG\r\n") and f"(study/arc_easy_{kind}.png)" in md
    for name in ("predictions_map.npz", "predictions_temperature.npz", "predictions_meanfield.npz"):
        (easy / name).unlink()  # no arrays: no figure, and the last report's copies go
    md = report.build_report(runs, tmp_path / "docs", command="x").read_text()
    assert not (tmp_path / "docs" / "study" / "arc_easy_reliability_grid.png").exists() and "arc_easy_reliability" not in md


def test_study_refusals_name_the_studys_remedies(runs):
    """Under the study, a run on another base model (or records, or scoring) was refused advising --overwrite, which
    study rejects; its --force does not pass a digest refusal either: the study's wording names --update map."""
    from pyro_lora.experiments.results import STUDY_FLAGS, RunFolder

    config = _record_config(runs / "arc_easy")
    for flags, says, never in ((STUDY_FLAGS, ("another --runs", "`pyro-lora study --update map`"), "--overwrite"),
                               (None, ("another --out", "pass --overwrite to replace the run"), "--update")):
        run = RunFolder(config.out, config, **({"flags": flags} if flags else {}))
        run.base, run.data = "a" * 64, "a" * 64
        for check in (lambda: run.check_base("b" * 64), lambda: run.check_data("b" * 64),
                      lambda: run.check_scoring(replace(config, mc_format="letter"))):
            with pytest.raises(ValueError) as error:
                check()
            assert all(s in str(error.value) for s in says) and never not in str(error.value)
    with pytest.raises(ValueError, match="choose another --runs, or pass --force to replace that run"):
        RunFolder(config.out, replace(config, lr=0.5), flags=STUDY_FLAGS)


def test_header_names_the_machine_of_each_update(runs):
    """An --update's rows were measured where it ran: its machine is recorded and listed (unknown for an older
    record), beside the run's."""
    from pyro_lora.experiments.study_header import machine_info

    here = machine_info()
    sidecar = {"command": "c", "machine": here, "finished": "2025-01-01T00:00:00+00:00", "updates": [
        {"guides": ["meanfield"], "command": "u", "finished": "f", "wall_seconds": 1.0, "machine": {**here, "torch_threads": 97}},
        {"guides": ["temperature"], "command": "v", "finished": "f", "wall_seconds": 1.0}]}
    (runs / "arc_easy" / "study_run.json").write_text(json.dumps(sidecar))
    machines = [line for line in report.header_section(report.load_runs(runs, ["arc_easy"]), "x", "now").splitlines()
                if line.startswith("- machine")]
    assert len(machines) == 3 and machines[0].endswith("(ran: the ARC-Easy run)")
    assert "torch threads 97" in machines[1] and machines[1].endswith("(ran: the ARC-Easy --update of meanfield)")
    assert machines[2] == "- machine: unknown (an update recorded without its machine) (ran: the ARC-Easy --update of temperature)"


def _as_tfb(runs, versions):
    """The ARC-Easy run with its meanfield rows as tfb's of ``versions`` (seed -> method_version); the others current."""
    from pyro_lora.experiments.versions import method_version

    easy = runs / "arc_easy"
    saved = json.loads((easy / "results.json").read_text())
    for r in saved["per_seed"]:
        r["method_version"] = versions[r["seed"]] if r["guide"] == "meanfield" else method_version(r["guide"])
        r["guide"] = "tfb" if r["guide"] == "meanfield" else r["guide"]
    saved["config"]["guides"] = ["tfb" if g == "meanfield" else g for g in saved["config"]["guides"]]
    saved["scoring"] = CLOZE_SCORING  # the cloze form now: the header names no other
    (easy / "results.json").write_text(json.dumps(saved))
    os.replace(easy / "predictions_meanfield.npz", easy / "predictions_tfb.npz")
    return saved


def test_report_takes_one_version_of_a_method_whose_rows_span_two_and_names_the_seeds_left_out(runs, tmp_path):
    """tfb seed 0 of version 1 beside seed 1 of version 2: the report averaged the two into one mean (and ±, ranking,
    verdict), a number of neither version. Version 2's rows alone are reported; the header and the note say so."""
    from pyro_lora.experiments.study_header import run_state

    saved = _as_tfb(runs, {0: 1, 1: 2})
    seed1 = next(r for r in saved["per_seed"] if r["guide"] == "tfb" and r["seed"] == 1 and r["dataset"] == "arc_easy")
    run = report.load_runs(runs, ["arc_easy"])["arc_easy"]
    tfb = next(r for r in run["summary"] if r["guide"] == "tfb")
    assert tfb["seeds"] == [1] and tfb["accuracy"] == seed1["accuracy"] and tfb["nll"] == seed1["nll"]
    left = ("tfb: seed 0: rows of version 1 left out, not averaged with version 2's; a run of tfb reruns them (a resume "
            "naming it in --guides, `pyro-lora study --update tfb`)")
    assert tfb["note"] == left.removeprefix("tfb: ")
    assert run_state(run) == ["**rows of two versions of a method**: " + left]  # not "unfinished", not "older"
    pairs, _ = report.paired_differences({"arc_easy": run}, "nll")
    assert [t for t, _ in pairs["tfb"]["ARC-E"]] == [seed1["nll"]]
    md = report.build_report(runs, tmp_path / "docs", ["arc_easy"], command="x").read_text()
    assert f"| tfb | {seed1['accuracy']:.3f} †" in md or f"| tfb | **{seed1['accuracy']:.3f}**" in md
    assert "- tfb: seed 0 of version 1 left out, compared on its version 2 rows alone" in md


def test_header_says_another_version_for_rows_of_a_newer_version_than_registered(runs):
    """Rows of version 3 where tfb is 2 now (made by newer code) were called "made by an older version"."""
    from pyro_lora.experiments.versions import method_version
    from pyro_lora.experiments.study_header import run_state

    newer = method_version("tfb") + 1
    _as_tfb(runs, {0: newer, 1: newer})
    assert run_state(report.load_runs(runs, ["arc_easy"])["arc_easy"]) == [
        f"**made by another version of the method**: tfb (seeds 0, 1: version {newer}, now {method_version('tfb')}): its "
        "rows stand as measured then; `--update tfb` reruns them"]


@pytest.mark.parametrize("form", [None, 0, 2, CLOZE_SCORING])
def test_header_says_a_cloze_run_was_scored_under_an_older_form(runs, form):
    """A cloze run of an older scoring form (one a resume or --update refuses to join rows to) was reported finished
    without a word; a run of the form now, and a run scoring no cloze, are not named."""
    from pyro_lora.experiments.study_header import run_state

    path = runs / "arc_easy" / "results.json"
    saved = json.loads(path.read_text())
    saved.pop("scoring", None) if form is None else saved.update(scoring=form, scoring_since=0)
    path.write_text(json.dumps(saved))
    state = run_state(report.load_runs(runs, ["arc_easy"])["arc_easy"])
    if form == CLOZE_SCORING:
        assert state == []
        return
    what = "0 (a record without a form: form 0 or 1)" if not form else str(form)
    assert state == [f"**scored under an older cloze scoring form**: form {what}, now {CLOZE_SCORING}: its rows stand as "
                     "scored then; a resume or an --update of some methods adds no rows to them unless no change since "
                     "touches this run (checked on its records and model); to score them now, rerun every row on the "
                     "--model and records there now: `pyro-lora study --update map` with the same flags"]
    saved["config"]["mc_format"] = None  # a classification run: no cloze rows
    saved.pop("scoring", None)
    path.write_text(json.dumps(saved))
    assert run_state(report.load_runs(runs, ["arc_easy"])["arc_easy"]) == []


def test_a_mean_over_seeds_always_shows_its_spread():
    from pyro_lora.experiments.table import format_cell

    assert format_cell({"seeds": [0, 1], "x": 0.536, "x_std": 0.0}, "x", 3) == "0.536 ± 0.000"
    assert format_cell({"seeds": [0, 1], "x": 0.705, "x_std": 1e-17}, "x", 3) == "0.705 ± 0.000"
    assert format_cell({"seeds": [0], "x": 0.705, "x_std": 1e-17}, "x", 3) == "0.705"


def test_header_names_rows_of_an_older_version_of_a_method_as_such_not_as_a_run_cut_short(runs):
    """Rows a method made before its version was raised (tfb's canonical SVD signs) are rerun by a resume, but the run
    finished: the header called it unfinished, 'a run cut short', and its finished column 'unfinished (stopped ...)'."""
    from pyro_lora.experiments.versions import method_version
    from pyro_lora.experiments.study_header import run_state

    easy = runs / "arc_easy"
    saved = json.loads((easy / "results.json").read_text())
    for r in saved["per_seed"]:
        if r["guide"] == "meanfield":
            r.update(guide="tfb", method_version=method_version("tfb") - 1)
        else:
            r["method_version"] = method_version(r["guide"])
    saved["config"]["guides"] = ["tfb" if g == "meanfield" else g for g in saved["config"]["guides"]]
    saved["scoring"] = CLOZE_SCORING  # the cloze form now: the header names no other
    (easy / "results.json").write_text(json.dumps(saved))
    os.replace(easy / "predictions_meanfield.npz", easy / "predictions_tfb.npz")
    run = report.load_runs(runs, ["arc_easy"])["arc_easy"]
    assert run_state(run) == [f"**made by an older version of the method**: tfb (seeds 0, 1: version "
                              f"{method_version('tfb') - 1}, now {method_version('tfb')}): its rows stand as measured "
                              "then; `--update tfb` reruns them"]
    header = report.header_section(report.load_runs(runs, ["arc_easy"]), "x", "now")
    assert "unfinished" not in header and "| 2025-01-01T00:00:00+00:00 |" in header


def test_a_method_with_extra_seeds_is_marked_as_other_seeds_and_the_ts_part_says_why_it_compares_nothing():
    """MAP and temperature scaling on seeds 0-2, every other method on 0-1: their means were marked † as over "fewer
    seeds than the set's other methods" (they have more), and the +ts part printed its heading with nothing under it."""
    from pyro_lora.experiments.results import summarize_run

    def row(guide, seed, **scores):
        setting = "validation-tuned" if guide == "temperature" or guide.endswith("+ts") else "no validation data"
        return {"guide": guide, "dataset": "sst2", "seed": seed, "setting": setting, "accuracy": 0.8, "ece": 5.0,
                "nll": 0.5, "aurc": 0.1, "brier": 0.3, **scores}

    rows = [row(g, s, nll=base + 0.01 * s) for s in (0, 1, 2) for g, base in (("map", 0.5), ("temperature", 0.45))]
    rows += [row(g, s, nll=0.44 + 0.01 * s, ece=3.0) for s in (0, 1) for g in ("laplace", "laplace+ts", "tfb", "tfb+ts")]
    runs = {"sst2": {"config": {"dataset": "sst2", "seeds": [0, 1, 2], "eval_datasets": []}, "per_seed": rows,
                     "summary": summarize_run(rows, [])}}
    text = report.summary_section(runs)
    assert "† marks a mean over other seeds than most of the set's methods have (fewer: a method failed, or the run was " \
           "cut short; more: a method run on extra seeds)" in text
    assert re.search(r"\| map \| 0\.510 † \|", text)  # MAP's mean over its 3 seeds, marked
    part = text.split("against temperature scaling of the MAP:")[1].split("###")[0]
    assert "No `+ts` row has a mean over the same seeds as temperature scaling's on any set" in part
