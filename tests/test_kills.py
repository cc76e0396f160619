"""Fault injection: ``compare`` and ``fit`` killed (SIGKILL) at points of their writes; every file left loads and the
previous complete run is intact."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from forking import Zygote
from pyro_lora.experiments import cli
from pyro_lora.experiments.saved import evaluate_saved

pytestmark = pytest.mark.real

# Runs the CLI (in a fork of a process that imported it: tests/forking.py) with os.replace, every atomic write's
# commit, killing the process with SIGKILL right before or right after the first replace whose target name matches
# PATTERN.
DRIVER = r"""
import fnmatch, os, signal
from pyro_lora.experiments import cli

pattern, when, argv = {pattern!r}, {when!r}, {argv!r}
real = os.replace
def replace(src, dst, *args, **kwargs):
    hit = fnmatch.fnmatch(os.path.basename(os.fspath(dst)), pattern)
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, *args, **kwargs)
    if hit and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
raise SystemExit(cli.main(argv))
"""
SMALL = ["--train-size", "48", "--test-size", "16", "--epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def zygote():
    forks = Zygote({**os.environ, "OMP_NUM_THREADS": "1"})
    yield forks
    forks.close()


def killed(zygote, folder, pattern, when, argv):
    job = zygote.start(DRIVER.format(pattern=pattern, when=when, argv=[str(a) for a in argv]), folder / f"{when}-{pattern}")
    try:
        job.wait(timeout=600)
    finally:
        job.kill()
    assert job.returncode == -signal.SIGKILL, f"not killed at {when} {pattern}: {job.returncode}\n{job.output()[-2000:]}"


def every_file_loads(out):
    """Every file in ``out`` opens as what its name says; returns results.json."""
    from matplotlib.image import imread

    for path in out.iterdir():
        if path.suffix == ".npz":
            with np.load(path) as arrays:
                [arrays[k] for k in arrays]
        elif path.suffix == ".png":
            assert imread(path).ndim == 3
        elif path.suffix == ".json":
            json.loads(path.read_text())
    return json.loads((out / "results.json").read_text())


def test_compare_killed_while_writing_keeps_every_file_whole_and_the_previous_run(zygote, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["compare", "--guides", "map", *SMALL, "--out", str(out)]) == 0
    previous = json.loads((out / "results.json").read_text())
    map_arrays = (out / "predictions_map.npz").read_bytes()
    more = ["compare", "--guides", "map,temperature", *SMALL, "--out", str(out)]  # resumes: map kept, temperature added
    # the summary figures come last, once: a kill between results.json and them leaves them behind, the next run
    # (complete or not) draws them again
    for pattern, when in [("predictions_temperature.npz", "before"), ("results.json", "before"), ("results.json", "after"),
                          ("reliability_grid.png", "after")]:
        killed(zygote, tmp_path / "jobs", pattern, when, more)
        results = every_file_loads(out)
        assert [r for r in results["per_seed"] if r["guide"] == "map"] == previous["per_seed"], (pattern, when)
        assert (out / "predictions_map.npz").read_bytes() == map_arrays
        if any(r["guide"] == "temperature" for r in results["per_seed"]):  # recorded only once its arrays are there
            with np.load(out / "predictions_temperature.npz") as arrays:
                assert "sst2__seed0__probs" in arrays
    assert cli.main(more) == 0  # the rerun finishes the run
    results = every_file_loads(out)
    assert [r["guide"] for r in results["summary"]] == ["map", "temperature"] and results["failed"] == []
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]  # temporaries of the killed runs removed


def test_fit_killed_while_saving_keeps_a_whole_guide_with_its_own_run_record(zygote, tmp_path):
    out = tmp_path / "fit"
    assert cli.main(["fit", "--guide", "map", *SMALL, "--out", str(out)]) == 0
    previous = (out / "guide" / "run.json").read_text()
    again = ["fit", "--guide", "map", "--seed", "1", "--overwrite", *SMALL, "--out", str(out)]
    for pattern, when in [("guide", "before"), (".guide.old-*", "after")]:  # temp folder complete; between the renames
        killed(zygote, tmp_path / "jobs", pattern, when, again)
        row = evaluate_saved(out, progress=False)  # finds (and restores) the previous complete guide
        assert (out / "guide" / "run.json").read_text() == previous
        saved = json.loads(previous)["result"]
        assert {k: row[k] for k in ("accuracy", "ece", "nll")} == {k: saved[k] for k in ("accuracy", "ece", "nll")}
        load_file(str(out / "guide" / "guide.safetensors"))
    killed(zygote, tmp_path / "jobs2", "guide", "after", again)  # the new unit is in place, whole: guide and run record of seed 1 together
    assert json.loads((out / "guide" / "run.json").read_text())["seed"] == 1
    row, saved = evaluate_saved(out, progress=False), json.loads((out / "guide" / "run.json").read_text())["result"]
    assert {k: row[k] for k in ("accuracy", "ece", "nll")} == {k: saved[k] for k in ("accuracy", "ece", "nll")}
    # the killed saves' temporary folders removed; the lock file stays, held by nobody
    assert sorted(p.name for p in Path(out).iterdir()) == [".lock", "guide"]


def test_bayesianize_recovers_an_adapter_whose_guide_save_was_killed_between_its_renames(tmp_path):
    """A `fit --adapter` killed after moving its old guide folder aside left run/.guide.old-PID: `evaluate` recovered
    it, but `bayesianize run/guide/adapter` said the folder held no adapter."""
    from conftest import tiny_bert

    from pyro_lora.experiments.saved import check_adapter_dir

    aside = tmp_path / "run" / ".guide.old-999999999"  # no such process: a dead writer's
    tiny_bert(num_labels=2).save_pretrained(aside / "adapter")
    check_adapter_dir(tmp_path / "run" / "guide" / "adapter", "classification")
    assert (tmp_path / "run" / "guide" / "adapter" / "adapter_config.json").is_file() and not aside.exists()
