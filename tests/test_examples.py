"""Every script in examples/ runs, as a user runs it (a subprocess from the repository root), with small sizes.

As Pyro tests its examples: each script with arguments that make it finish in seconds on 2 CPU cores, checked
for exit status 0 and the numbers it prints.
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# script -> (small arguments, patterns its output must hold)
RUNS = {
    "compare_guides.py": (
        ["--train", "32", "--test", "16", "--epochs", "1", "--samples", "2"],
        [r"\| guide \| accuracy \| ECE x100 \| NLL \| Brier \|"]
        + [rf"\| {g} \| [01]\.\d{{3}} \| \d+\.\d{{2}} \| \d+\.\d{{3}} \| [01]\.\d{{3}} \|" for g in ("map", "meanfield", "tfb")],
    ),
    "svi_smollm2_arc.py": (
        ["--train", "8", "--test", "8", "--epochs", "1", "--batch", "4", "--samples", "2"],
        [r"'q_proj\.lora_A': \(30, 8, 576\)", r"posterior mean \{'accuracy': [01]\.\d+, 'ece'", r"2 samples \{'accuracy': [01]\.\d+"],
    ),
}


def test_every_example_is_run_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(RUNS)


@pytest.mark.parametrize("script", sorted(RUNS))
def test_examples_import_the_installed_package_names(script):
    """``from pyro_lora.guides import ...``: the bare top-level ``guides`` is the repository folder, not an install."""
    tree = ast.parse((EXAMPLES / script).read_text())
    modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    modules += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [m for m in modules if m == "guides" or m.startswith("guides.")]
    assert any(m.startswith("pyro_lora") for m in modules)


@pytest.mark.real
@pytest.mark.parametrize("script", sorted(RUNS))
def test_example_runs(script):
    args, patterns = RUNS[script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    for pattern in patterns:
        assert re.search(pattern, done.stdout), f"{script}: no {pattern!r} in its output:\n{done.stdout[-3000:]}"
