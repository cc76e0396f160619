"""The GPU suite (benchmarks/gpu_suite.sh) runs on the CPU at --size small, so that it does not rot: every benchmark
runs and the goal table has a number in every row. No timing assertions (CI machines are noisy)."""

import os
import re
import runpy
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the goals (part 4 and 5), by the start of their row in the goal table
GOALS = [
    "mean-field SVI step / plain peft LoRA step",
    "flow SVI step / plain peft LoRA step",
    "S=8 predictive in one batched forward / 8 looped forwards",
    "KFAC fit (MC Fisher) / one forward+backward",
    "TFB search: passes over the anchors",
    "SVI step peak memory above resident / plain peft LoRA step's, mean-field",
    "SVI step peak memory above resident / plain peft LoRA step's, flow",
    "S=8 predictive memory above resident / (chunk_size x an S=1 predictive's)",
    "KFAC fit peak memory above resident",
]
NUMBER = r"\d+(?:\.\d+)?"


def table_rows(text, heading):
    """The data rows (cells) of the first table after ``heading``."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_gpu_suite_runs_every_benchmark_on_the_cpu(tmp_path):
    out = tmp_path / "results.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--size", "small", "--device", "cpu", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout
    section = out.read_text()
    assert section.strip() and section.strip() in text  # --out gets the printed section

    header = section.strip().splitlines()[0]
    assert re.match(r"## \d{4}-\d\d-\d\d, CPU .*`.*gpu_suite\.sh --size small --device cpu", header), header
    assert "torch " in section and "pyro " in section

    goals = table_rows(section, "### Goals")
    for goal in GOALS:
        row = next((r for r in goals if r[0].startswith(goal)), None)
        assert row is not None, f"no goal row {goal!r}"
        assert re.fullmatch(NUMBER, row[2]), row
        assert row[3] in ("met", "not met"), row

    # every benchmark ran, each step and predictive row with a number
    steps = table_rows(section, "### SVI step")
    names = [r[0] for r in steps]
    for name in ("plain peft LoRA step", "map guide", "meanfield guide", "meanfield + flipout guide", "flow guide", "scalabl guide",
                 "predictive, S=8 in one batched forward", "predictive, S=8 looped"):
        row = next((r for r in steps if name in r[0]), None)
        assert row is not None, (name, names)
        assert re.fullmatch(NUMBER, row[1]) and re.fullmatch(NUMBER, row[2]), row
    memory = table_rows(section, "| peak memory, predictive")
    assert [r[0] for r in memory if "chunk_size" in r[0]] == [f"predictive, S=8, chunk_size={c}" for c in (1, 2, 8)]
    assert all(re.fullmatch(NUMBER, r[1]) for r in memory)
    kfac = table_rows(section, "### KFAC fit")
    assert [r[0].split(",")[0] for r in kfac] == ["forward+backward (LoRA training pass)", "KFAC fit", "KFAC fit"]
    assert all(re.fullmatch(NUMBER, r[1]) for r in kfac)
    assert "GLM probit" in section
    tfb = table_rows(section, "### TFB search")
    assert len(tfb) == 1 and re.fullmatch(NUMBER, tfb[0][4]), tfb  # anchor passes (a stopped candidate counts its part)
    saved = table_rows(section, "### Save and load")
    assert [r[0].split(" (")[0] for r in saved] == ["peft save_pretrained", "one digest pass over the base",
                                                    "MAPGuide(model)", "save_guide", "load_guide"]
    assert all(re.fullmatch(NUMBER, cell) for r in saved for cell in r[1:]), saved


def test_benchmarks_import_the_project_from_the_tree_when_it_is_not_installed():
    # an installed project maps guides/ to pyro_lora.guides (setup.cfg's package_dir); a GPU machine that has only
    # the working tree has no such mapping, and benchmarks/_common.py must provide it
    code = """
import importlib.util, sys
from pathlib import Path

import pytest
root = Path(sys.argv[1])
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path.insert(0, str(root))
import pyro_lora
assert importlib.util.find_spec("pyro_lora.guides") is None, "pyro_lora.guides resolves without the fallback"
sys.path.insert(0, str(root / "benchmarks"))
import _common
import pyro_lora.guides
from pyro_lora.guides import MeanFieldGuide
from pyro_lora.guides.laplace import LaplaceGuide
assert Path(pyro_lora.guides.__file__) == root / "guides" / "__init__.py", pyro_lora.guides.__file__
assert Path(sys.modules[LaplaceGuide.__module__].__file__) == root / "guides" / "laplace.py"
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd="/", capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")


def test_the_carried_wheels_need_nothing_a_gpu_image_lacks():
    # a GPU image has torch, numpy, tqdm, opt-einsum, transformers, peft, safetensors, matplotlib, not pyro
    wheels = sorted((ROOT / "benchmarks" / "wheels").glob("*.whl"))
    names = {w.name.split("-")[0]: w for w in wheels}
    assert set(names) == {"pyro_ppl", "pyro_api"}
    image = {"numpy", "opt-einsum", "opt_einsum", "torch", "tqdm", "pyro-api"}
    for wheel in wheels:
        assert wheel.name.endswith("-py3-none-any.whl"), wheel.name  # pure Python: installs on any image
        with zipfile.ZipFile(wheel) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        needs = [re.split(r"[ ;<>=!~(\[]", line.split(":", 1)[1].strip())[0]
                 for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
        assert set(needs) <= image, (wheel.name, needs)


def test_a_bad_out_file_is_refused_before_any_benchmark_runs(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--size", "small", "--device", "cpu",
                           "--out", str(tmp_path / "missing" / "x.md")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "--out" in done.stderr and "cannot be appended to" in done.stderr
    assert "svi_step" not in done.stdout  # nothing was measured


@pytest.mark.parametrize("script, args, named", [
    *[(s, ["--repeats", "0"], "--repeats") for s in ("svi_step", "tfb_search", "kfac_fit", "save_load")],
    ("svi_step", ["--steps", "-2"], "--steps"),
    ("svi_step", ["--samples", "-1"], "--samples"),
    ("svi_step", ["--guides", "map,nope"], "--guides"),
    ("tfb_search", ["--batch", "0"], "--batch"),
])
def test_a_count_below_one_or_an_unknown_guide_is_refused_by_argparse(script, args, named, monkeypatch, capsys):
    # these crashed later with a traceback (a median of no timings, a division by zero steps, a KeyError) or printed
    # a nonsense row; argparse refuses them before anything is built, naming the argument. The script runs as
    # __main__ in this process: a subprocess spent its seconds importing torch, which this one has
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / "benchmarks" / f"{script}.py"), run_name="__main__")
    out, err = capsys.readouterr()
    assert exited.value.code == 2, (exited.value.code, err[-2000:])
    assert "usage:" in err and f"argument {named}" in err, err[-2000:]
    assert out == ""


def test_a_tfb_search_that_gave_up_does_not_meet_the_goal(monkeypatch):
    # 4 answer rows of lm_head nearly tied: every candidate flips, the search stops after high and low (sigma_q = 0)
    # having scored a fraction of the anchors, and its 1.5 passes are not the cost of a search
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import _common as C
    import suite
    import tfb_search
    import torch
    from transformers import LlamaForCausalLM

    net = C.build_llama(LlamaForCausalLM, "small", "cpu", "fp32")
    with torch.no_grad():
        head = net.get_output_embeddings().weight
        head[6:9] = head[5] + 1e-7 * torch.randn_like(head[6:9], generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="infeasible"):
        out = tfb_search.run("small", "cpu", "fp32", anchors=32, batch=16, seq=16, samples=10, repeats=1, net=net, log=lambda *a: None)
    assert out["sigma_q"] == 0 and out["candidates"] == 2
    assert "degenerate search" in tfb_search.tables(out)
    row = next(r for r in table_rows(suite.goal_table(suite.goals(None, None, out)), "| goal") if r[0].startswith("TFB search"))
    assert row[3].startswith("n/a: degenerate search, sigma_q = 0"), row


def test_a_batched_predictive_that_computes_something_else_is_no_speed_up(monkeypatch):
    """A fast path that ran sample 0 alone and copied it S times read 0.13x of the looped forwards, "met": the benchmark
    checked nothing of what it timed. It now refuses to time logits that are not the loop's."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import svi_step
    import torch

    from pyro_lora import LoraModel

    logits = LoraModel.logits

    def first_sample_only(self, batch, values=None, num_samples=None):
        if num_samples is None:
            return logits(self, batch, values)
        one = logits(self, batch, {k: v[0] for k, v in values.items()})
        return one.unsqueeze(0).expand(num_samples, *one.shape)

    monkeypatch.setattr(LoraModel, "logits", first_sample_only)
    out = svi_step.run("small", "cpu", "fp32", seq=16, steps=1, repeats=1, samples=4, guides="", memory=False,
                       log=lambda *a: None)
    assert out["predictive"] == {}
    assert any("the batched predictive's logits are up to" in e for e in out["errors"]), out["errors"]
    assert torch.isfinite(torch.tensor(out["steps"]["plain"]["seconds"]))
