"""Every method's version (``@method(version=...)``) against what it computes.

A change that gives a method other rows under the same seed must raise its version, or a run resumed across the
change averages rows of both (:func:`pyro_lora.experiments.results.of_other_version`). Nothing else ties the two:
this test runs every method of each task on a toy set and compares its test probabilities with the ones recorded in
``method_fingerprints.json`` beside it, with the version that made them. After a change that moves them, raise the
method's version if its rows change (a variant too, when its ``base`` changed), then record them again::

    PYRO_LORA_RECORD_FINGERPRINTS=1 OMP_NUM_THREADS=1 python -m pytest -q tests/test_method_versions.py
"""

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_lora.experiments.compare import run_compare
from pyro_lora.experiments.setup import CompareConfig
from pyro_lora.guides.registry import METHODS, methods_for_task

from conftest import toy_run

FINGERPRINTS = Path(__file__).with_name("method_fingerprints.json")
RECORD = os.environ.get("PYRO_LORA_RECORD_FINGERPRINTS") == "1"
# recorded with torch 2.13 (CPU) on an x86-64 CPU: far above the rounding other kernels add through these few steps
# (1 and 2 threads agree to 5e-7); another torch or CPU that moves them more records them again. Below what most
# changes of a method move. A tripwire, not a proof: a method whose toy predictions equal the MAP's to within it (a
# validation-tuned prior precision at the grid's narrow end) can change unseen
TOLERANCE = 1e-5


def _toy_multiple_choice(root):
    """A tiny Llama with a word tokenizer and a four-choice toy set under ``root``: the config of a cloze run."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
                     ).save_pretrained(root / "llama")
    words = ["a", "b", "c", "d", "e", "f"]
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(root / "llama")
    data = root / "data" / "toymc"
    data.mkdir(parents=True)
    (data / "meta.json").write_text(json.dumps({"task": "multiple_choice"}))

    def record(i):
        return {"id": i, "question": " ".join(words[(i + j) % 6] for j in range(1 + i % 3)),
                "choices": [words[(i + k) % 6] for k in range(4)], "label": i % 4}

    for name, ids in (("train", range(40)), ("test", range(100, 112))):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in ids))
    return CompareConfig(model=str(root / "llama"), dataset="toymc", data_dir=str(root / "data"), mc_format="cloze",
                         train_size=40, test_size=12, epochs=2, samples=4, max_length=16, batch_size=8, lr=5e-2,
                         out=str(root / "out"), progress=False)


def _toy_classification(root):
    torch.manual_seed(0)  # the toy BERT's weights, drawn when it is saved
    return toy_run(root, epochs=3, lr=5e-2)


TASKS = {"classification": _toy_classification, "multiple_choice": _toy_multiple_choice}


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    """Task -> method -> (its version, its test probabilities ``[N, C]``) from one compare run of every method."""
    out = {}
    for task, make in TASKS.items():
        config = make(tmp_path_factory.mktemp(task))
        config = replace(config, guides=tuple(methods_for_task(task, config.mc_format)), ts=False)
        run_compare(config)
        out[task] = {}
        for name in config.guides:
            with np.load(Path(config.out) / f"predictions_{name}.npz") as arrays:
                out[task][name] = (METHODS[name].version, arrays[f"{config.dataset}__seed0__probs"].tolist())
    if RECORD:  # one line per method: a change shows as the methods it moved
        FINGERPRINTS.write_text("{\n" + ",\n".join(
            f" {json.dumps(task)}: {{\n" + ",\n".join(f"  {json.dumps(name)}: {json.dumps({'version': v, 'probs': p})}"
                                                      for name, (v, p) in methods.items()) + "\n }"
            for task, methods in out.items()) + "\n}\n")
    return out


@pytest.mark.parametrize("task", TASKS)
def test_a_method_whose_rows_change_raises_its_version(computed, task):
    recorded = json.loads(FINGERPRINTS.read_text())[task]
    problems = []
    for name, (version, probs) in computed[task].items():
        if name not in recorded:
            problems.append(f"{name}: no fingerprint recorded (a new method: record them)")
            continue
        gap = float(np.abs(np.asarray(probs) - np.asarray(recorded[name]["probs"])).max())
        if not gap <= TOLERANCE and version == recorded[name]["version"]:  # a NaN gap moved too
            problems.append(f"{name}: its test probabilities moved by up to {gap:.3g} while its version stayed "
                            f"{version}: if its rows change, raise its version (@method(version={version + 1})), "
                            "then record the fingerprints again")
        elif version != recorded[name]["version"]:
            problems.append(f"{name}: version {version} now, its fingerprint was recorded under "
                            f"{recorded[name]['version']}: record the fingerprints again")
    if len(problems) == len(computed[task]) > 1:
        problems.append("every method moved: a change they share may be one of the run-wide forms instead (the cloze "
                        "scoring: setup.CLOZE_SCORING and SCORING_CHANGES; the predictive's seeding: results.PREDICT_SEEDING)")
    assert not problems, "\n".join(problems) + f"\n(see {Path(__file__).name}'s docstring for the command)"
