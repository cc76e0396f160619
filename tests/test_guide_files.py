"""A corrupt saved guide is refused by ``load_guide`` with one sentence naming the file and what is wrong, and
before anything of it reaches the model: the network's parameters are left exactly as they were."""

import hashlib
import json
import os
import re
import shutil
import warnings

import pyro
import pytest
import torch
from conftest import random_batch, tiny_bert
from safetensors.torch import load_file, save_file

from pyro_lora.guides import MAPGuide, MeanFieldGuide
from pyro_lora import LoraModel, fit, predict
from pyro_lora.ownership import point_snapshot, take_over, trainer
from pyro_lora.io import check_sealed, export_adapter, load_guide, meta_sha256, read_fit_state, save_checkpoint, save_guide
from pyro_lora.likelihoods import SequenceClassification

HEAD = "base_model.model.classifier.modules_to_save.default.weight"


def lora(num_labels=2):
    return LoraModel(tiny_bert(num_labels=num_labels), SequenceClassification(), prior=0.5, num_data=6)


def guide_over_head(shift=1.0):
    """A mean-field guide over a head moved by ``shift`` from a fresh model's (as training moves it): guides of two
    shifts differ in every file of their saves."""
    model = lora()
    with torch.no_grad():
        for _, p in model.named_point_parameters():
            p.add_(shift)
    return MeanFieldGuide(model, b="normal")


@pytest.fixture
def saved(tmp_path):
    """A mean-field guide saved over a trained head (unlike a fresh model's), and the folder it is in."""
    save_guide(guide_over_head(), tmp_path / "g")
    return tmp_path / "g"


def refused(folder, error=ValueError, num_labels=2):
    """Load ``folder`` into a fresh model; returns the message, after checking that the model is untouched."""
    model = lora(num_labels)
    owner = MAPGuide(model)
    take_over(model, owner)  # a guide that trained the head: it keeps it
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    with pytest.raises(error) as err:
        load_guide(folder, model)
    for n, p in model.net.named_parameters():
        assert torch.equal(p, before[n]), f"a refused guide changed {n}"
    assert trainer(model) is owner and owner._point_snapshot == point_snapshot(model)
    message = str(err.value)
    assert "\n" not in message
    return message


def edit_json(folder, change):
    """Write ``change(meta)`` as the folder's guide.json, its SHA-256 stamped as a save would (a file corrupt in a way
    of its own, not only edited: the edit check of an unstamped edit is its own test)."""
    meta = change(json.loads((folder / "guide.json").read_text()))
    if isinstance(meta, dict) and "meta_sha256" in meta:
        meta["meta_sha256"] = meta_sha256(meta)
    (folder / "guide.json").write_text(json.dumps(meta))


def sha256(file):
    return hashlib.sha256(file.read_bytes()).hexdigest()


def edit_tensors(folder, change):
    """Change the saved tensors, and the SHA-256 of them that guide.json records (else that refuses them first)."""
    tensors = load_file(str(folder / "guide.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "guide.safetensors"))
    edit_json(folder, lambda m: m | {"tensors_sha256": sha256(folder / "guide.safetensors")})


def test_the_saved_guide_loads_and_restores_the_head(saved):
    model = lora()
    guide = load_guide(saved, model)
    assert type(guide) is MeanFieldGuide
    torch.testing.assert_close(dict(model.net.named_parameters())[HEAD], load_file(str(saved / "guide.safetensors"))["net/" + HEAD])
    assert torch.isfinite(predict(model, guide, [random_batch() | {"labels": torch.tensor([0, 1, 1])}]).probs).all()


# --------------------------------------------------------------------------- guide.json


@pytest.mark.parametrize(
    "text, message",
    [
        (lambda good: good[: len(good) // 2], r"is corrupt: it is not valid JSON \(.*line \d+ column \d+"),
        (lambda good: "", r"is corrupt: it is not valid JSON"),
        (lambda good: good.replace("{", "{,", 1), r"is corrupt: it is not valid JSON"),
        (lambda good: "[1, 2]", r"is corrupt: it holds a JSON array, not an object"),
        (lambda good: '"a guide"', r"is corrupt: it holds a JSON string, not an object"),
    ],
    ids=["truncated", "empty", "invalid", "array", "string"],
)
def test_guide_json_that_is_not_a_json_object(saved, text, message):
    file = saved / "guide.json"
    file.write_text(text(file.read_text()))
    assert re.match(re.escape(str(file)) + " " + message, refused(saved))


def test_guide_json_that_is_not_utf8(saved):
    file = saved / "guide.json"
    file.write_bytes(b'{"format": "caf\xe9"}')
    assert re.match(re.escape(str(file)) + r" is corrupt: it is not valid JSON \('utf-8' codec can't decode byte 0xe9", refused(saved))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: {k: v for k, v in m.items() if k != "config"}, "key 'config' should hold a JSON object, it holds nothing"),
        (lambda m: {k: v for k, v in m.items() if k != "guide"}, "key 'guide' should hold a JSON string, it holds nothing"),
        (lambda m: m | {"config": [1]}, "key 'config' should hold a JSON object, it holds a JSON array"),
        (lambda m: m | {"guide": None}, "key 'guide' should hold a JSON string, it holds a JSON null"),
        (lambda m: {k: v for k, v in m.items() if k != "signature"}, "key 'signature' should hold a JSON object, it holds nothing"),
        (lambda m: m | {"signature": m["signature"] | {"sites": None}}, "its 'signature' entry 'sites' should hold a JSON object, it holds null"),
        (lambda m: m | {"signature": m["signature"] | {"prior": "1.0"}}, "its 'signature' entry 'prior' should hold a number .* it holds \"1.0\""),
        (lambda m: m | {"signature": m["signature"] | {"prior": True}}, "its 'signature' entry 'prior' should hold a number"),
        (lambda m: m | {"signature": m["signature"] | {"tokens": []}}, "its 'signature' entry 'tokens' should hold a JSON object, it holds \\[\\]"),
        (lambda m: m | {"signature": m["signature"] | {"tokens": {"emb": ["3"]}}}, "its 'signature' entry 'tokens' should map each module to a list of token ids"),
        (lambda m: m | {"signature": m["signature"] | {"base": {}}}, r"its 'signature' is malformed \(KeyError"),
        (lambda m: m | {"signature": {"model": "LoraModel"}}, r"its 'signature' is malformed \(KeyError\('adapter'\)\)"),
        (lambda m: m | {"config": {"no_such_option": 1}}, r"its config does not build a MeanFieldGuide for this model \(.*no_such_option"),
    ],
    ids=["no-config", "no-guide", "config-array", "guide-null", "no-signature", "signature-sites", "signature-prior-string",
         "signature-prior-bool", "signature-tokens-list", "signature-token-strings", "signature-base-empty", "signature-keys",
         "config-key"],
)
def test_guide_json_with_missing_or_malformed_keys(saved, change, message):
    edit_json(saved, change)
    assert re.match(re.escape(str(saved / "guide.json")) + " is corrupt: " + message, refused(saved))


def _first_weight(m, value):
    weights = m["base_weights"]["weights"]
    return m | {"base_weights": m["base_weights"] | {"weights": weights | {next(iter(weights)): value}}}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m | {"base_weights": [1]}, "should hold a JSON object, it holds a JSON array"),
        (lambda m: m | {"base_weights": None}, "should hold a JSON object, it holds a JSON null"),
        (lambda m: m | {"base_weights": m["base_weights"] | {"weights": [1]}}, "'weights' holds a JSON array"),
        (lambda m: m | {"base_weights": {"dtype": "torch.float32"}}, "records neither 'weights' nor 'sha256'"),
        (lambda m: m | {"base_weights": {k: v for k, v in m["base_weights"].items() if k != "dtype"}},
         "'dtype' should hold a JSON string, it holds nothing"),
        (lambda m: _first_weight(m, None), r"entry '.*' of 'weights' should map 'dtype' to a torch float dtype .*, it holds null"),
        (lambda m: _first_weight(m, {"dtype": "torch.float32"}), r"entry '.*' of 'weights' should map"),
        (lambda m: _first_weight(m, {"dtype": "torch.float32", "sha256": 7}), r"entry '.*' of 'weights' should map"),
        (lambda m: _first_weight(m, {"dtype": "torch.float32", "sha256": "xyz"}), r"entry '.*' of 'weights' should map"),
        (lambda m: _first_weight(m, {"dtype": "float32", "sha256": "0" * 64}), r"entry '.*' of 'weights' should map"),
        (lambda m: _first_weight(m, {"dtype": "torch.float31", "sha256": "0" * 64}), r"entry '.*' of 'weights' should map"),
        (lambda m: _first_weight(m, {"dtype": "torch.int8", "sha256": "0" * 64}), r"entry '.*' of 'weights' should map"),
        (lambda m: m | {"base_weights": m["base_weights"] | {"weights": {}}}, "'weights' records no weight"),
        (lambda m: m | {"base_weights": m["base_weights"] | {"sha256": "xyz"}}, "'sha256' or 'cast_sha256' holds a value other"),
    ],
    ids=["array", "null", "weights-array", "no-digest", "no-dtype", "entry-null", "entry-no-sha256", "entry-number",
         "entry-short-digest", "entry-dtype-unprefixed", "entry-dtype-unknown", "entry-dtype-integer", "weights-empty",
         "sha256-short"],
)
def test_guide_json_with_a_malformed_base_weights_record(saved, change, message):
    """A malformed record skipped a weight's check without a word (a null entry, a list), or failed with a bare KeyError
    that left the network without its trainer."""
    edit_json(saved, change)
    assert re.match(re.escape(str(saved / "guide.json")) + " is corrupt: its 'base_weights' " + message, refused(saved))


@pytest.mark.parametrize("where", ["pyro_lora.io._check_base_weights", "torch.nn.Module.load_state_dict",
                                   "torch.Tensor.copy_"])
def test_a_load_stopped_anywhere_leaves_the_network_and_its_trainer(saved, monkeypatch, where):
    """An exception other than a refusal (an interrupt while the base is hashed) left the network to no guide; one
    while the guide's state was restored left the new head in the network and the previous guide refused."""
    original, calls = torch.Tensor.copy_, []

    def interrupted(*args, **kwargs):  # copy_: at the second write into the network, the first to be undone
        calls.append(1)
        if where != "torch.Tensor.copy_" or len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(where, interrupted)
    refused(saved, KeyboardInterrupt)


def test_a_guide_json_without_base_weights_loads_with_a_warning(saved):
    """Without the record (an older guide, or one edited) the base was compared by its fingerprints only, silently."""
    edit_json(saved, lambda m: {k: v for k, v in m.items() if k != "base_weights"})
    with pytest.warns(UserWarning, match=r"records no digest of its base weights .*: the base was compared by its "
                                         "4096-entry fingerprints only"):
        load_guide(saved, lora())


def test_a_guide_of_the_old_format_says_that_nothing_but_its_shapes_was_checked(saved):
    """A pyro_lora.guide/1 file loaded onto a model of another lora_alpha (0.12 off in probability) with one warning,
    which said the base had been compared by fingerprints that file does not hold."""
    shapes = {n: list(s.shape) for n, s in lora().sites.items()}
    edit_json(saved, lambda m: {**{k: v for k, v in m.items() if k not in ("signature", "base_weights")},
                                "format": "pyro_lora.guide/1", "sites": shapes})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_guide(saved, lora())
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "old format pyro_lora.guide/1, which records its sites' shapes only: the LoRA " \
        "scaling, base weights, head, prior and likelihood it was fitted with could not be checked" in messages[0]


@pytest.mark.parametrize("key, value", [("flipout", "false"), ("learn_loc", "no"), ("flipout", 0)])
def test_guide_json_with_a_flag_that_is_no_boolean(saved, key, value):
    """The string "false" is truthy: a hand-edited flipout "false" loaded as flipout=True."""
    edit_json(saved, lambda m: m | {"config": m["config"] | {key: value}})
    assert re.match(re.escape(str(saved / "guide.json")) + rf": its config does not build a MeanFieldGuide for this model "
                    rf"\({key} must be True or False, got {re.escape(repr(value))}\)", refused(saved))


def test_guide_json_with_a_value_the_guide_refuses(saved):
    """A ValueError of the constructor may be a bad value or this model (another answer's letters): its reason is given."""
    edit_json(saved, lambda m: m | {"config": m["config"] | {"std": "cubic"}})
    assert re.match(re.escape(str(saved / "guide.json")) + r": its config does not build a MeanFieldGuide for this model \(.*cubic",
                    refused(saved))


def test_guide_json_of_another_format_or_missing(saved):
    edit_json(saved, lambda m: m | {"format": "something/else"})
    assert refused(saved) == f"{saved / 'guide.json'} is not a pyro_lora guide (format 'something/else')"
    (saved / "guide.json").unlink()
    assert refused(saved, FileNotFoundError) == f"{saved} holds no saved guide (guide.json missing)"


# --------------------------------------------------------------------------- guide.safetensors


def test_a_file_or_no_path_in_place_of_a_guide_folder_is_refused_by_name(saved, tmp_path):
    """A file given to load_guide was Python's bare NotADirectoryError on guide.json; a path of None or a number to
    save_guide, load_guide, export_adapter or fit's checkpoint_dir a TypeError from os.path."""
    file = tmp_path / "notes.txt"
    file.write_text("x")
    assert refused(file) == f"{file} is no folder (a file is on its path): a saved guide is the folder save_guide wrote"
    assert refused(file / "g") == f"{file / 'g'} is no folder (a file is on its path): a saved guide is the folder save_guide wrote"
    guide = guide_over_head()
    for bad in (None, 3, ""):
        message = f"^path must be a path \\(a string or pathlib.Path\\), got {re.escape(repr(bad))}$"
        with pytest.raises(ValueError, match=message):
            save_guide(guide, bad)
        with pytest.raises(ValueError, match=message):
            load_guide(bad, guide.model)
        with pytest.raises(ValueError, match=message):
            export_adapter(guide, bad)
    with pytest.raises(ValueError, match=r"^checkpoint_dir must be a path \(a string or pathlib.Path\), got 5$"):
        fit(guide.model, guide, [random_batch()], epochs=1, checkpoint_dir=5)


def test_guide_safetensors_missing(saved):
    file = saved / "guide.safetensors"
    file.unlink()
    assert refused(saved, FileNotFoundError) == f"{file} is missing: the guide at {saved} is incomplete"


def test_a_folder_in_place_of_a_guide_file_is_said_to_be_one(saved):
    """A folder where guide.safetensors belongs was said to be missing, one in guide.json's place failed with Python's
    bare "[Errno 21] Is a directory"."""
    file = saved / "guide.safetensors"
    file.unlink()
    file.mkdir()
    assert refused(saved) == f"{file} is a folder, not a file: the guide at {saved} is incomplete"
    meta = saved / "guide.json"
    meta.unlink()
    meta.mkdir()
    assert refused(saved) == f"{meta} is a folder, not a file: {saved} holds no saved guide"


@pytest.mark.parametrize(
    "content, reason",
    [
        (lambda good: good[: len(good) // 2], "incomplete metadata, file not fully covered"),
        (lambda good: b"not a safetensors file, just some garbage bytes", "header too large"),
        (lambda good: b"", "header too small"),
        (lambda good: good[:8] + b"\x00" * (len(good) - 8), "invalid JSON in header"),
    ],
    ids=["truncated", "garbage", "empty", "zeroed-header"],
)
def test_guide_safetensors_unreadable(saved, content, reason):
    file = saved / "guide.safetensors"
    file.write_bytes(content(file.read_bytes()))
    message = refused(saved)
    assert message.startswith(f"{file} is corrupt: safetensors cannot read it (Error while deserializing header: ")
    assert reason in message


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "infinite"), (-float("inf"), "infinite")])
@pytest.mark.parametrize("tensor", ["rhos.2", "net/" + HEAD])
def test_non_finite_values_are_refused(saved, tensor, value, word):
    def poison(tensors):
        tensors[tensor].view(-1)[3] = value

    edit_tensors(saved, poison)
    assert refused(saved) == (
        f"{saved / 'guide.safetensors'} is corrupt: tensor {tensor!r} holds {word} values, which would give NaN predictions"
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update({"locs.1": t["locs.1"][:, :16].contiguous()}), "holds MeanFieldGuide tensor 'locs.1' of shape (2, 16, 4), where this MeanFieldGuide has (2, 32, 4)"),
        (lambda t: t.pop("rhos.3"), "lacks the MeanFieldGuide tensor(s) ['rhos.3']"),
        (lambda t: t.update({"scales.0": torch.ones(3)}), "holds MeanFieldGuide tensor 'scales.0', which this MeanFieldGuide lacks"),
        (lambda t: t.update({"net/" + HEAD: t["net/" + HEAD][:1]}), f"holds network parameter {HEAD!r} of shape (1, 32), where this model has (2, 32)"),
        (lambda t: t.update({"net/no.such.weight": torch.ones(2)}), "holds network parameter 'no.such.weight', which this model lacks"),
    ],
    ids=["shape", "missing", "unexpected", "net-shape", "net-unexpected"],
)
def test_tensors_that_do_not_fit_the_guide_or_the_network(saved, change, message):
    edit_tensors(saved, change)
    assert refused(saved) == f"{saved / 'guide.safetensors'} {message}"


def test_a_tensor_of_another_guide_class_is_named(saved):
    edit_json(saved, lambda m: m | {"guide": f"{MAPGuide.__module__}:{MAPGuide.__qualname__}", "config": {}})
    assert refused(saved) == f"{saved / 'guide.safetensors'} holds MAPGuide tensor 'rhos.0', which this MAPGuide lacks"


def test_a_tensor_file_other_than_the_saved_one_is_refused_by_its_sha256(saved, tmp_path):
    """guide.json recorded the SHA-256 of guide.safetensors only with run=, and load_guide never compared it: one bit
    flipped in the head's weight (-0.345 -> -1.380, probabilities 0.0119 off) or another seed's file copied in (its
    predictions exactly that seed's) loaded without a word. Every save records it now, and load_guide compares it."""
    file = saved / "guide.safetensors"
    good = file.read_bytes()
    assert json.loads((saved / "guide.json").read_text())["tensors_sha256"] == hashlib.sha256(good).hexdigest()
    message = (f"{file} is not the one saved with {saved / 'guide.json'} (its SHA-256 differs from the one recorded "
               "there): damaged, or another save's put in its place, since; copy the folder again from where it was "
               "saved, or save the guide again")
    before = load_file(str(file))["net/" + HEAD].flatten()[0].item()
    raw = bytearray(good)
    size = int.from_bytes(raw[:8], "little")  # safetensors: the header's length, the header (JSON), then the data
    start = 8 + size + json.loads(raw[8 : 8 + size])["net/" + HEAD]["data_offsets"][0]
    raw[start + 3] ^= 0x01  # an exponent bit of the head's first float: x4 or /4, still finite and readable
    file.write_bytes(bytes(raw))
    assert load_file(str(file))["net/" + HEAD].flatten()[0].item() in (4 * before, before / 4)
    assert refused(saved) == message
    save_guide(MeanFieldGuide(lora(), b="normal"), tmp_path / "other")  # another guide over the same network
    shutil.copy(tmp_path / "other" / "guide.safetensors", file)
    assert refused(saved) == message
    file.write_bytes(good)
    edit_json(saved, lambda m: m | {"tensors_sha256": "abc"})
    assert refused(saved) == (f"{saved / 'guide.json'} is corrupt: its 'tensors_sha256' should hold a SHA-256 (64 "
                              'hexadecimal digits), it holds "abc"')
    edit_json(saved, lambda m: {k: v for k, v in m.items() if k != "tensors_sha256"})  # saved before it was recorded
    with pytest.warns(UserWarning, match=r"records no tensors_sha256 \(saved by a version before"):
        load_guide(saved, lora())


# --------------------------------------------------------------------------- run.json and adapter/

AGAIN = "copy the folder again from where it was saved, or save the guide again"


def refused_sealed(folder):
    with pytest.raises(ValueError) as err:
        check_sealed(folder)
    return str(err.value)


def test_a_run_record_other_than_the_one_guide_json_records_is_refused_by_load_guide(tmp_path):
    """load_guide never compared run.json with the SHA-256 guide.json records (check_sealed did, which `pyro-lora
    evaluate` alone calls): another run's guide.json and guide.safetensors copied beside this run.json (seed 0) loaded
    without a word, predicting as that run (seed 1). Refused now, as are the same beside no run.json and a run.json
    beside a guide saved without one; a save from before the SHA-256s were recorded loads unchecked."""
    a, b, plain, copy = (tmp_path / n for n in ("a", "b", "plain", "copy"))
    save_guide(guide_over_head(1.0), a, run={"seed": 0})
    save_guide(guide_over_head(2.0), b, run={"seed": 1})
    save_guide(guide_over_head(2.0), plain)
    shutil.copytree(a, copy)  # a copy of the whole folder is the save
    load_guide(copy, lora())
    check_sealed(copy)
    run = a / "run.json"
    for name in ("guide.json", "guide.safetensors"):
        shutil.copy(b / name, a / name)
    message = (f"{run} is not the record saved with its guide (its SHA-256 differs from the one {a / 'guide.json'} "
               "holds): it was edited since, or it (or guide.json with guide.safetensors) taken from another save; "
               f"{AGAIN}")
    assert refused(a) == message
    assert refused_sealed(a) == message
    run.unlink()
    message = f"{run} is missing: {a / 'guide.json'} records the run record saved with it (save_guide's run=); {AGAIN}"
    assert refused(a) == message
    assert refused_sealed(a) == message  # it was a bare FileNotFoundError
    run.mkdir()  # said to be missing too
    assert refused(a) == f"{run} is a folder, not a file: {a / 'guide.json'} records the run record saved with it " \
        f"(save_guide's run=); {AGAIN}"
    run.rmdir()
    shutil.copy(b / "run.json", run)
    load_guide(a, lora())  # b's unit whole
    for name in ("guide.json", "guide.safetensors"):
        shutil.copy(plain / name, a / name)
    assert refused(a) == (f"{run} is not the record saved with its guide: {a / 'guide.json'} records none (saved "
                          "without run=), so it was put there since, or guide.json and guide.safetensors taken from "
                          f"another save; {AGAIN}")
    edit_json(b, lambda m: m | {"base_model": "elsewhere"})  # its run_sha256 kept
    assert refused(b) == f"{b / 'guide.json'} is not the one saved with {b / 'run.json'}: it was edited or replaced since; {AGAIN}"
    edit_json(a, lambda m: {k: v for k, v in m.items() if k not in ("tensors_sha256", "adapter_sha256")})  # older
    with pytest.warns(UserWarning, match="records no tensors_sha256"):
        load_guide(a, lora())
    # a damaged guide.json or a missing guide.safetensors: bare JSONDecodeError, AttributeError, UnicodeDecodeError
    # and [Errno 2] from check_sealed, where load_guide named the file
    c = tmp_path / "c"
    save_guide(guide_over_head(1.0), c, run={"seed": 2})
    pristine = (c / "guide.json").read_bytes()
    for damaged, said in ((pristine[:40], "is not valid JSON"), (b"[1, 2]", "holds a JSON array, not an object"),
                          (b"\xff\xfe{", "is not valid JSON")):
        (c / "guide.json").write_bytes(damaged)
        assert refused_sealed(c).startswith(f"{c / 'guide.json'} is corrupt: it {said}")
    (c / "guide.json").write_bytes(pristine)
    check_sealed(c)
    (c / "guide.safetensors").unlink()
    assert refused_sealed(c) == f"{c / 'guide.safetensors'} is not the one saved with {c / 'guide.json'}: it was removed since; {AGAIN}"
    edit_json(b, lambda m: m | {"run_sha256": "abc"})
    assert refused(b) == (f"{b / 'guide.json'} is corrupt: its 'run_sha256' should hold a SHA-256 (64 hexadecimal "
                          'digits), it holds "abc"')


def test_an_adapter_folder_other_than_the_saved_one_is_refused(tmp_path):
    """adapter/ (save_guide(adapter=True)) was outside every SHA-256: another save's adapter/ put in its place (its
    head 1.0 off) was accepted by check_sealed and load_guide, and `pyro-lora evaluate` rebuilt the network from it.
    guide.json records each of the files peft reads there now ({} without one); a save from before that loads
    unchecked. What peft does not read (its model card, an OS's or editor's leftovers) and an adapter/ removed leave no
    stale adapter, and are not refused."""
    a, b, plain = (tmp_path / n for n in ("a", "b", "plain"))
    save_guide(guide_over_head(1.0), a, run={"seed": 0}, adapter=True)
    save_guide(guide_over_head(2.0), b, run={"seed": 1}, adapter=True)
    save_guide(guide_over_head(1.0), plain)
    folder, own = a / "adapter", a / "guide.json"
    recorded = json.loads(own.read_text())["adapter_sha256"]
    assert recorded == {p.name: sha256(p) for p in folder.iterdir() if p.name.startswith("adapter_")}
    assert sorted(recorded) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((plain / "guide.json").read_text())["adapter_sha256"] == {}
    shutil.copytree(folder, tmp_path / "own")
    shutil.rmtree(folder)
    shutil.copytree(b / "adapter", folder)
    tail = (f"against the SHA-256 of each file recorded there): it was edited, or another save's put in its place, "
            f"since; {AGAIN}")
    message = f"{folder} is not the adapter saved with {own} (adapter_model.safetensors changed, {tail}"
    assert refused(a) == message
    assert refused_sealed(a) == message
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "own", folder)
    load_guide(a, lora())
    check_sealed(a)
    (folder / "README.md").write_text("my model card")
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "adapter_config-checkpoint.json").write_text("{}")
    load_guide(a, lora())
    check_sealed(a)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"weights")
    assert refused(a) == (f"{folder} is not the adapter saved with {own} (adapter_model.bin added, "
                          f"adapter_model.safetensors missing, {tail}")
    shutil.rmtree(folder)
    load_guide(a, lora())
    check_sealed(a)
    shutil.copytree(b / "adapter", plain / "adapter")
    assert refused(plain) == (f"{plain / 'adapter'} was not saved with {plain / 'guide.json'}, which records no adapter "
                              "(saved without adapter=True): it was put there since; remove it, or save the guide with "
                              "adapter=True, which writes it in the same unit")
    edit_json(plain, lambda m: m | {"adapter_sha256": {"README.md": "abc"}})
    assert refused(plain) == (f"{plain / 'guide.json'} is corrupt: its 'adapter_sha256' should map each file of "
                              'adapter/ to a SHA-256 (64 hexadecimal digits), it holds {"README.md": "abc"}')
    edit_json(plain, lambda m: {k: v for k, v in m.items() if k != "adapter_sha256"})  # saved before it was recorded
    load_guide(plain, lora())


# --------------------------------------------------------------------------- fit_state.pt


def test_a_fit_state_beside_a_guide_saved_without_one_is_refused(tmp_path):
    """read_fit_state took a fit_state.pt copied beside a guide that save_guide wrote (guide.json records no state)
    wherever their steps agreed: another run's optimizer state at the same step resumed this one without a word."""
    guide = guide_over_head()
    guide.fit_progress = {"step": 1, "steps": 6, "epoch": 0, "epochs": 2, "finished": False}
    save_checkpoint(guide, tmp_path / "checkpoint", {"progress": guide.fit_progress})
    save_guide(guide, tmp_path / "plain")
    state = tmp_path / "plain" / "fit_state.pt"
    shutil.copy(tmp_path / "checkpoint" / "fit_state.pt", state)
    with pytest.raises(ValueError) as err:
        read_fit_state(tmp_path / "plain")
    assert str(err.value) == (f"{state} is not the state saved with {tmp_path / 'plain' / 'guide.json'}, which records "
                              "none (saved by save_guide, not a fit's checkpoint): it was put there since, or guide.json "
                              "and guide.safetensors taken from another save; put the checkpoint's own files back, or "
                              "rerun the fit from the start")
    assert read_fit_state(tmp_path / "checkpoint") == {"progress": guide.fit_progress}


def test_another_runs_fit_state_at_the_same_step_is_refused_by_resume(tmp_path):
    """read_fit_state compared fit_state.pt's step with guide.json's only: the state of another run (another seed) at
    the same step resumed run A with run B's losses and AdamW moments without a word. guide.json records the state's
    SHA-256 in the same atomic unit now, and resume compares it before any work."""
    data = [random_batch(seed=s) | {"labels": torch.tensor([0, 1, 1])} for s in range(3)]

    def stop(state):
        if state.step == 2:
            raise KeyboardInterrupt  # a kill: the last checkpoint is step 1's

    def run(seed, folder, resume=False):
        model = lora()
        guide = MeanFieldGuide(model, b="normal")
        pyro.set_rng_seed(seed)  # the weights each step samples
        return fit(model, guide, data, epochs=2, lr=1e-2, checkpoint_dir=folder,
                   checkpoint_every=1, resume=resume, callbacks=[] if resume else [stop], progress=False)

    for seed, name in ((0, "a"), (1, "b")):
        with pytest.raises(KeyboardInterrupt):
            run(seed, tmp_path / name)
    state = tmp_path / "a" / "fit_state.pt"
    own, another = state.read_bytes(), (tmp_path / "b" / "fit_state.pt").read_bytes()
    assert own != another
    state.write_bytes(another)
    with pytest.raises(ValueError) as err:
        run(0, tmp_path / "a", resume=True)
    assert str(err.value) == (f"{state} is not the state saved with {tmp_path / 'a' / 'guide.json'} (its SHA-256 "
                              "differs from the one recorded there): another run's or step's was put in its place, or "
                              "it was damaged, since; resuming would continue this run from another optimizer state, "
                              "schedule and data order; put the checkpoint's own back, or rerun the fit from the start")
    recorded = json.loads((tmp_path / "a" / "guide.json").read_text())["fit_state_sha256"]
    assert recorded == hashlib.sha256(own).hexdigest()
    state.write_bytes(own)
    assert len(run(0, tmp_path / "a", resume=True)) == 6


# --------------------------------------------------------------------------- two writers of one folder


@pytest.mark.parametrize("where", ["the first rename", "the second rename", "the leftovers' times", "the slot check"])
def test_a_save_overtaken_by_another_writer_raises_file_exists_or_is_written_losing_nothing(saved, monkeypatch, where):
    """Two processes saving one folder: the other moving it aside between this save's check and its first rename gave a
    raw FileNotFoundError ('h' -> '.h.old-PID'), not the FileExistsError docs/saving.md promises; a running writer
    removing its previous folder while a save (or load_guide) read the leftovers' times, or moving the folder aside
    while the slot check listed it, one too. A save whose second rename lost left the previous folder it had moved
    aside under a hidden name until a later save. The other writer's folders are never touched."""
    from pyro_lora import io

    other = saved.with_name(f".g.old-{os.getppid()}")  # a running process's: the other writer, amid its swap
    previous = (saved / "guide.safetensors").read_bytes()
    guide = MeanFieldGuide(lora(), b="normal")
    replace, listdir, leftovers = os.replace, os.listdir, io._leftovers
    if where == "the first rename":
        def overtaken(src, dst):
            if dst == saved.with_name(f".g.old-{os.getpid()}"):  # after this save's check that the folder exists
                replace(saved, other)
            replace(src, dst)

        monkeypatch.setattr(io.os, "replace", overtaken)
        with pytest.raises(FileExistsError, match=f"another process wrote {saved} while this one was saving there"):
            save_guide(guide, saved)
        assert sorted(p.name for p in saved.parent.iterdir()) == [other.name]  # nothing of this save left
        assert (other / "guide.safetensors").read_bytes() == previous
    elif where == "the second rename":
        def overtaken(src, dst):
            replace(src, dst)
            if dst == saved.with_name(f".g.old-{os.getpid()}"):  # this save moved the previous folder aside
                shutil.copytree(dst, other)
                replace(other, saved)  # the other writer's folder takes the place

        monkeypatch.setattr(io.os, "replace", overtaken)
        with pytest.raises(FileExistsError, match=f"another process wrote {saved} while this one was saving there"):
            save_guide(guide, saved)
        # the previous folder this save moved aside is gone with its temporary; the other writer's stands
        assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]
        assert (saved / "guide.safetensors").read_bytes() == previous
    elif where == "the leftovers' times":
        def removed_meanwhile(path, kind):
            found = list(leftovers(path, kind))
            shutil.rmtree(other, ignore_errors=True)  # the other writer's last step, once its new folder is in place
            return found

        monkeypatch.setattr(io, "_leftovers", removed_meanwhile)
        for act in (lambda: save_guide(guide, saved), lambda: load_guide(saved, lora())):
            shutil.copytree(saved, other)
            act()
        assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]
    else:
        def moved_meanwhile(path):
            if path == saved and saved.exists():  # after the slot check's is_dir
                replace(saved, other)
            return listdir(path)

        monkeypatch.setattr(io.os, "listdir", moved_meanwhile)
        save_guide(guide, saved)  # nothing left there to destroy: written; the other writer's second rename loses
        assert sorted(p.name for p in saved.parent.iterdir()) == [other.name, saved.name]
        assert (other / "guide.safetensors").read_bytes() == previous


# --------------------------------------------------------------------------- another model


def test_a_two_class_guide_over_a_three_class_head_is_refused_by_the_signature(saved):
    message = refused(saved, num_labels=3)
    assert message == (f"cannot load the guide at {saved} into this model: the head has 2 outputs (classes) in the guide "
                       "and 3 in the model")  # peft's unused copy of the head is no base weight


def test_a_guide_that_trained_base_biases_is_refused_where_they_are_frozen_and_the_base_is_left_alone(tmp_path):
    """peft's bias='lora_only' trains the LoRA layers' base biases, saved with the guide: loaded into a bias='none'
    adapter they were written over the frozen base biases (refused only later, at predict, as another checkpoint)."""
    from conftest import tiny_bert_base
    from peft import LoraConfig, get_peft_model

    def model(bias):
        net = get_peft_model(tiny_bert_base(num_labels=2), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", bias=bias))
        return LoraModel(net, SequenceClassification())

    trained = model("lora_only")
    with torch.no_grad():
        for n, p in trained.net.named_parameters():
            if n.endswith("base_layer.bias"):
                p.add_(1.0)  # as trained
    save_guide(MAPGuide(trained), tmp_path / "g")
    frozen = model("none")
    before = {n: p.detach().clone() for n, p in frozen.net.named_parameters()}
    with pytest.raises(ValueError, match=r"holds network parameter '.*query.base_layer.bias', trained with the guide, which "
                                         r"this model keeps frozen as a base weight \(was the guide's adapter built with peft's bias='all'"):
        load_guide(tmp_path / "g", frozen)
    assert all(torch.equal(p, before[n]) for n, p in frozen.net.named_parameters())
    load_guide(tmp_path / "g", model("lora_only"))  # where the adapter trains them too


def test_a_guide_is_restored_site_by_site_whatever_the_letter_order_of_random(tmp_path):
    """A guide keeps its tensors by position in the model's site order, and random='BA' built the same sites in the
    order B, A: with r = d_in = d_out the saved B went into A and A into B (a prediction flipped), without a word."""
    from conftest import tiny_bert_base
    from peft import LoraConfig, get_peft_model

    from pyro_lora.contract import describe, differences

    def model(random):
        net = get_peft_model(tiny_bert_base(num_labels=2), LoraConfig(r=32, lora_alpha=8, target_modules=["query", "value"],
                                                                      task_type="SEQ_CLS"))
        return LoraModel(net, SequenceClassification(), random=random, num_data=4)

    ab, ba = model("AB"), model("BA")
    assert list(ba.sites) == list(ab.sites) == ["query.lora_A", "query.lora_B", "value.lora_A", "value.lora_B"]
    guide = MeanFieldGuide(ab, b="normal", init_scale=0.3)
    save_guide(guide, tmp_path / "g")
    loaded = load_guide(tmp_path / "g", ba)
    for name, value in guide.mean().items():
        assert torch.equal(loaded.mean()[name], value), name
    batch = {**random_batch(), "labels": torch.tensor([0, 1, 1])}
    torch.testing.assert_close(predict(ba, loaded, [batch], mean=True).probs, predict(ab, guide, [batch], mean=True).probs)
    # whatever else builds them in another order is named, not restored crosswise
    expected = describe(ab)
    reordered = {**expected, "sites": dict(reversed(list(expected["sites"].items())))}
    assert any("the model has the guide's sites in another order" in d for d in differences(reordered, describe(ab)))


def test_a_guide_is_refused_on_base_weights_its_fingerprint_does_not_read(tmp_path):
    """The fingerprint reads 4096 strided entries per weight (cheap enough for every check): two embedding rows
    swapped ([CLS] and [SEP]) loaded the guide and moved the probabilities by 4.4e-3 without a word."""
    model = lora()
    save_guide(MeanFieldGuide(model, b="normal"), tmp_path / "g")
    other = lora()
    embeddings = other.net.base_model.model.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        embeddings[[2, 3]] = embeddings[[3, 2]].clone()  # rows the strided read skips (stride 2048 / 32 = 64 rows)
    with pytest.raises(ValueError, match="the base weights differ from the ones the guide was saved with"):
        load_guide(tmp_path / "g", other)
    load_guide(tmp_path / "g", lora())  # the same base: loaded


def test_a_guide_is_refused_on_a_base_whose_nested_config_differs():
    """transformers 5 keeps rope_theta inside the dict rope_parameters, and the signature compared plain values only:
    a guide loaded on rope_theta 500 for 10000 moved the probabilities by up to 3.6e-4 without a word."""
    from conftest import tiny_llama

    from pyro_lora import CausalLM
    from pyro_lora.contract import describe, differences

    guide_model, model = LoraModel(tiny_llama(), CausalLM()), LoraModel(tiny_llama(), CausalLM())
    signature = describe(guide_model)
    rope = model.net.config.rope_parameters
    model.net.config.rope_parameters = {**rope, "rope_theta": rope["rope_theta"] / 20}
    assert any("config differs in ['rope_parameters']" in d for d in differences(signature, describe(model)))
    assert differences(signature, describe(guide_model)) == []


def test_a_guide_is_refused_on_an_adapter_with_other_lora_parameters_or_scalings(tmp_path):
    """Only the site layers' A and B and their scaling were compared: a guide loaded onto an adapter with peft's
    lora_bias (0.003 off), an extra embedding LoRA target (0.024 off) or another embedding alpha (3e-4 off), silently."""
    from conftest import tiny_bert_base
    from peft import LoraConfig, get_peft_model

    def model(targets=("query", "value"), **kwargs):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type="SEQ_CLS", **kwargs)
        return LoraModel(get_peft_model(tiny_bert_base(num_labels=2), config), SequenceClassification())

    save_guide(MAPGuide(model()), tmp_path / "plain")
    for other, message in [(model(lora_bias=True), r"the model's adapter also has \[.*query\.lora_B\.default\.bias"),
                           (model(targets=("query", "value", "word_embeddings")),
                            r"the model's adapter also has \[.*word_embeddings\.lora_embedding_A\.default")]:
        with pytest.raises(ValueError, match=message):
            load_guide(tmp_path / "plain", other)
    embedded = ("query", "value", "word_embeddings")
    save_guide(MAPGuide(model(embedded)), tmp_path / "embedded")
    with pytest.raises(ValueError, match=r"the LoRA scaling \(alpha / r\) differs for \[\('base_model\.model\.bert\.embeddings"
                                         r"\.word_embeddings', \(2\.0, 4\.0\)\)\]"):
        load_guide(tmp_path / "embedded", model(embedded, alpha_pattern={"word_embeddings": 16}))
    load_guide(tmp_path / "embedded", model(embedded))  # the same configuration loads


def test_a_merge_unmerge_round_trip_is_named_and_undone_by_copying_the_checkpoint_back(tmp_path):
    """peft's merge_adapter()/unmerge_adapter() round trip rounds the base weights it touched (by <= 4e-9): the save
    was refused with advice to load another checkpoint back. It is still refused (the record of the base is exact:
    rounding and a change of a few entries between the fingerprint's strides look alike), naming the round trip and
    the remedy docs/saving.md shows; a real change keeps its own message."""
    from conftest import tiny_bert_base

    model = lora()
    guide = MAPGuide(model)
    query = model.net.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    before = query.detach().clone()
    model.net.merge_adapter()
    model.net.unmerge_adapter()
    assert not torch.equal(query, before) and torch.allclose(query, before, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match=r"by rounding only .* merge_adapter\(\)/unmerge_adapter\(\) round trip .* copy "
                                         r"the checkpoint's values back"):
        save_guide(guide, tmp_path / "g")
    values = tiny_bert_base(num_labels=2).state_dict()  # the checkpoint, copied back as docs/saving.md shows
    with torch.no_grad():
        for name, p in model.net.get_base_model().named_parameters():
            key = name.replace(".base_layer", "")
            if not p.requires_grad and key in values:
                p.copy_(values[key])
    save_guide(guide, tmp_path / "g")
    with torch.no_grad():
        query[0, 0] += 1e-3
    with pytest.raises(ValueError, match=r"last saved \(1 base weight, e.g. .*query.base_layer.weight\), and it was fitted "
                                         "on the others; load the checkpoint"):
        save_guide(guide, tmp_path / "g")


def test_a_guide_json_edited_by_hand_is_refused_and_an_older_one_without_its_digest_loads(saved, tmp_path):
    """guide.json's settings say how its tensors are read: saved without run=, an edited temperature (1 -> 25) or
    MC-dropout p (0.1 -> 0.7) loaded without a word, another posterior than the one saved (only the tensors were
    hashed). Its contents now carry their own SHA-256; a guide saved before it was recorded loads as before."""
    from pyro_lora.guides import MCDropoutGuide

    model = lora()
    save_guide(MCDropoutGuide(model, p=0.1), tmp_path / "mcd")
    for folder, change in ((saved, lambda m: m["config"] | {"temperature": 25.0}), (tmp_path / "mcd", lambda m: m["config"] | {"p": 0.7})):
        pristine = (folder / "guide.json").read_text()
        meta = json.loads(pristine)
        (folder / "guide.json").write_text(json.dumps(meta | {"config": change(meta)}))
        with pytest.raises(ValueError, match=r"guide.json was edited since it was saved \(its contents no longer match "
                                             r"the SHA-256 it records\).*set_temperature"):
            load_guide(folder, lora())
        older = {k: v for k, v in meta.items() if k != "meta_sha256"}
        (folder / "guide.json").write_text(json.dumps(older))
        # loads as saved, with a word: deleting the digest took every check of an edit with it (a temperature of 400
        # loaded silently)
        with pytest.warns(UserWarning, match=r"records no meta_sha256 \(saved by a version before they were recorded, "
                                             r"or its guide.json edited\): an edit to its settings or tensors goes unseen"):
            assert load_guide(folder, lora()).config() == meta["config"]
    assert json.loads(pristine)["meta_sha256"] == meta_sha256(json.loads(pristine))
