"""Bad command-line arguments are refused at parse time, naming the flag, before anything is loaded."""

import pytest

from pyro_lora import cli


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
        (["bayesianize", "adapter", "--tolerance", "0"], "--tolerance"),
        (["evaluate", "run", "--samples", "0"], "--samples"),
        (["compare", "--train-size", "1"], "--train-size"),  # nothing left to carve a validation split from
        (["compare", "--guides", "map,nope"], "unknown guide(s) ['nope']"),
        (["compare", "--guides", "map,map"], "repeats a guide"),
        (["compare", "--guides", "map,,tfb"], "unknown guide(s) ['']"),
        (["bayesianize", "adapter", "--epochs", "3"], "unrecognized arguments: --epochs"),  # TFB trains nothing
        (["bayesianize", "adapter", "--lr", "1e-3"], "unrecognized arguments: --lr"),
        (["bayesianize", "adapter", "--rank", "4"], "unrecognized arguments: --rank"),  # the adapter has its rank
        (["bayesianize", "adapter", "--prior-scale", "2"], "unrecognized arguments: --prior-scale"),
        (["bayesianize", "adapter", "--anchors", "0"], "--anchors"),
        (["bayesianize", "adapter", "--iterations", "0"], "--iterations"),
        (["bayesianize", "adapter", "--low", "-1"], "--low"),
        (["evaluate", "run", "--guides", "map"], "unrecognized arguments: --guides"),
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
    config = cli._config(cli.parser().parse_args(["fit", "--seed", "3"]), guides=("map",))
    assert config.seeds == (3,) and config.eval_datasets == ()


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


def test_low_at_or_above_high_is_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bayesianize", "adapter", "--low", "0.02", "--high", "0.01"])
    assert exit_info.value.code == 2
    assert "--low 0.02 must be below --high 0.01" in capsys.readouterr().err


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model (or data for a shifted set) fails the test: every check below must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr("pyro_lora.compare.load_pretrained", refuse)
    monkeypatch.setattr("pyro_lora.compare.prepare", refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--max-length", "100000"], "max_length 100000 is beyond minilm's 512 positions: use at most 512"),
        (["fit", "--model", "smollm2", "--dataset", "arc_easy", "--max-length", "9000"], "beyond smollm2's 8192 positions"),
        (["compare", "--guides", "zeroshot"], "zeroshot needs a causal LM task: 'sst2' is a classification set"),
        (["compare", "--eval-datasets", "sst2"], "names the training set 'sst2'"),
        (["compare", "--eval-datasets", "arc_easy"], "evaluation set 'arc_easy' is not a classification dataset"),
        (["compare", "--dataset", "nope"], "unknown dataset 'nope'"),
        (["fit", "--guide", "ensemble", "--adapter"], "method 'ensemble' has no posterior mean to write as a peft adapter"),
        (["fit", "--guide", "blora_xs", "--adapter"], "method 'blora_xs' has no posterior mean"),
        (["bayesianize", "/nowhere/adapter"], "/nowhere/adapter holds no peft adapter (adapter_config.json missing)"),
    ],
)
def test_a_configuration_that_cannot_run_is_refused_before_loading(argv, message, nothing_loads, tmp_path, capsys):
    assert cli.main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-lora: error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["compare"], ["fit"], ["bayesianize", "adapter"]])
def test_an_output_folder_that_cannot_be_written_is_refused_before_loading(command, nothing_loads, tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    assert cli.main(command + ["--out", str(tmp_path / "file")]) == 2
    assert f"output folder {tmp_path / 'file'} is a file: choose another --out" in capsys.readouterr().err
    assert cli.main(command + ["--out", str(tmp_path / "file" / "below")]) == 2
    assert f"cannot write to output folder {tmp_path / 'file' / 'below'} (" in capsys.readouterr().err


def test_a_classification_adapter_without_its_head_is_refused(nothing_loads, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": null, "r": 4}')
    assert cli.main(["bayesianize", str(adapter), "--out", str(tmp_path / "out")]) == 2
    assert "holds no classification head (task_type None, no modules_to_save)" in capsys.readouterr().err
