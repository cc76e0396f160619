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
    for name, sub in cli.parser()._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


def test_a_library_error_is_one_line_with_exit_status_2(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pyro-lora: error: {tmp_path / 'nowhere'} is not a `pyro-lora fit` output (run.json missing) (--debug shows where)"]
    with pytest.raises(FileNotFoundError, match="run.json missing"):
        cli.main(["evaluate", str(tmp_path / "nowhere"), "--debug"])
