"""Tiny random networks for fast unit tests (no downloads: configs are built in code)."""

import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys

# each pytest-xdist worker (the README's `-n 2`) gets one thread, its subprocesses too: two torch processes of two
# threads each on 2 cores run many times slower than one
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

import pyro
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import pyro_lora.locking
from pyro_lora import LoraModel, SequenceClassification
from pyro_lora.experiments.setup import CompareConfig

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)


def tiny_llama(r=4, targets=("q_proj", "v_proj"), seed=0, vocab=64, random_b=True):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    net = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    if random_b:
        _randomize_b(net)
    return net.eval()


def tiny_bert_base(num_labels=3, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def tiny_bert(r=4, num_labels=3, seed=0, dtype=torch.float32, random_b=True):
    net = get_peft_model(
        tiny_bert_base(num_labels, seed).to(dtype),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    if random_b:  # else peft's B = 0: an untrained adapter (LoRA-XS refuses to overwrite a trained one)
        _randomize_b(net)
    return net.eval()


def evidence_model(prior, head_gain=300.0, num_data=4):
    """A one-layer BERT of width 8, LoRA of rank 1 on ``value``, random A only (one site ``[1, 1, 8]``), with a head
    scaled up so that the labels of :func:`random_batch` depend on A: for ``log p(y)`` by sampling
    (:func:`log_evidence`)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                        max_position_embeddings=16, num_labels=2)
    net = get_peft_model(BertForSequenceClassification(config),
                         LoraConfig(r=1, lora_alpha=2, target_modules=["value"], task_type="SEQ_CLS"))
    with torch.no_grad():
        net.base_model.model.classifier.weight.mul_(head_gain)
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    return LoraModel(net.eval(), SequenceClassification(), random="A", prior=prior, num_data=num_data)


def log_evidence(model, batch, num_samples=20000):
    """``log p(y) = log mean_k p(y | A_k)`` over ``A_k`` from the prior of :func:`evidence_model`'s one site, in one
    batched forward: the reference for ``Importance`` and ``RenyiELBO``."""
    (name, site), = model.sites.items()
    with torch.no_grad():
        draws = model.prior_distribution(site).sample((num_samples,))
        logits = model.logits(batch, {name: draws}, num_samples=num_samples)
        log_lik = model.likelihood.distribution(logits).log_prob(batch["labels"]).sum(-1).double()
    return float(torch.logsumexp(log_lik, 0) - math.log(num_samples))


def bert_checkpoint(folder, id2label=None, head=True):
    """A tiny BERT saved to ``folder`` with a tokenizer of its own; ``id2label`` names its head's classes."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    names = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}
    config = BertConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                        max_position_embeddings=32, **names)
    (BertForSequenceClassification if head else BertModel)(config).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return str(folder)


def toy_run(root, **kwargs):
    """A tiny BERT and a two-class toy set under ``root``: the config of a run on them (seconds, not MiniLM's minutes)."""
    data = root / "data" / "toy"
    data.mkdir(parents=True)
    (data / "meta.json").write_text(json.dumps({"task": "classification", "label_names": ["a", "b"]}))
    words = ["a", "b", "a a", "b b", "a b", "b a", "a a b", "b b a"]
    train = [{"id": i, "text": f"{' '.join([words[i % 8]] * (1 + i % 3))} {'ab'[i % 2]}", "label": i % 2} for i in range(40)]
    test = [{"id": 100 + i, "text": words[i * 3 % 8] + " b a" * (i % 2 + 1), "label": i // 2 % 2} for i in range(12)]
    for name, records in (("train", train), ("test", test)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return CompareConfig(**{"model": bert_checkpoint(root / "bert"), "dataset": "toy", "data_dir": str(root / "data"),
                            "train_size": 40, "test_size": 12, "epochs": 1, "samples": 4, "max_length": 16, "batch_size": 8,
                            "out": str(root / "out"), "progress": False, **kwargs})


def _randomize_b(net):
    # peft starts B at zero, which would hide any error in how B is applied
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)


def random_batch(batch=3, seq=7, vocab=64, seed=1, left_pad=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if left_pad:
        mask[0, :left_pad] = 0
        ids[0, :left_pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def pairwise_probit_reference(mean, cov):
    """The pairwise probit written out term by term (mean ``[N, C]``, ``-inf`` a missing choice; cov ``[N, C, C]``):
    ``p_c ∝ 1 / sum_k exp(-(m_c - m_k) / sqrt(1 + pi/8 (S_cc + S_kk - 2 S_ck)))`` over the real choices."""
    n, c = mean.shape
    p = torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        real = [a for a in range(c) if math.isfinite(float(mean[i, a]))]
        for a in real:
            total = 0.0
            for b in real:
                var = float(cov[i, a, a] + cov[i, b, b] - 2 * cov[i, a, b])
                total += math.exp(-float(mean[i, a] - mean[i, b]) / math.sqrt(1 + math.pi / 8 * max(var, 0.0)))
            p[i, a] = 1 / total
    return (p / p.sum(-1, keepdim=True)).to(mean.dtype)


# The files of minutes first, longest first: pytest-xdist (--dist loadfile) hands whole files to the workers, by
# default those of most tests first, which left the longest (test_cli.py: few tests, four minutes) to the end while
# the other worker, with nothing left, idled.
SLOW_FILES_FIRST = ("test_docs.py", "test_resume.py", "test_cli.py", "test_benchmarks.py", "test_guide_contract.py",
                    "test_kills.py", "test_predictive.py", "test_examples.py", "test_loading_output.py", "test_study.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist's: files in the order collected (below), not by test count
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny nets gain nothing from intra-op threads, and on a shared CPU (OpenMP oversubscription) they make
    # every step many times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield


def skip_without(*modules):
    """Skip a test when any of ``modules`` (e.g. an embedded model's package) is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {missing}")


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the Hugging Face Hub fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# The start of a child process's code that takes folder locks: pyro_lora/locking.py loaded on its own (it needs the
# standard library only), not through the package, whose imports (torch, transformers, peft) cost ~11 s of CPU.
LOCKING_ALONE = (
    "import importlib.util, sys\n"
    f"_spec = importlib.util.spec_from_file_location('pyro_lora.locking', {pyro_lora.locking.__file__!r})\n"
    "_locking = importlib.util.module_from_spec(_spec)\n"
    "_spec.loader.exec_module(_locking)\n"
    "folder_lock, locked_elsewhere = _locking.folder_lock, _locking.locked_elsewhere\n"
)


@contextlib.contextmanager
def held_by_another_process(folder):
    """Another Python process holds ``folder_lock(folder)`` for the block; yields its process id."""
    code = LOCKING_ALONE + "with folder_lock(sys.argv[1]):\n print('held', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
