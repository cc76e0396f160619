"""The pyro-lora command line end to end on the embedded real models and real data (marked `real`)."""

import json
import shutil
import warnings

import pytest
import torch

from pyro_lora.experiments import cli
from pyro_lora.io import saved_folder
from pyro_lora.experiments.setup import CompareConfig

pytestmark = pytest.mark.real


def run(*argv):
    assert cli.main(list(argv)) == 0


def test_compare_smollm2_arc_easy_cloze(tmp_path, capsys):
    out = tmp_path / "smol"
    run("compare", "--model", "smollm2", "--dataset", "arc_easy", "--guides", "map,scalabl", "--train-size", "12",
        "--test-size", "12", "--epochs", "1", "--batch-size", "4", "--mc-normalize", "chars", "--samples", "2", "--no-ts",
        "--out", str(out), "--quiet")
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["mc_format"] == "cloze"  # the right default for a 135M model
    assert results["config"]["mc_normalize"] == "chars"
    map_row, scalabl = results["summary"]
    assert 0.0 <= map_row["accuracy"] <= 1.0
    assert scalabl["guide"] == "scalabl" and scalabl["extra_parameters"] == 2 * 30 * 2 * 8  # q/v of 30 blocks, r=8
    assert scalabl["mutual_information"] > 0  # its samples differ


def test_unknown_guide_and_missing_run_are_clear_errors(tmp_path, capsys):
    from pyro_lora.experiments.compare import run_compare
    from pyro_lora.experiments.saved import evaluate_saved

    with pytest.raises(ValueError, match="unknown guide"):
        run_compare(CompareConfig(guides=("nope",), out=str(tmp_path)))

    with pytest.raises(FileNotFoundError, match="run.json missing"):
        evaluate_saved(tmp_path)


def test_no_arguments_is_the_default_demo(monkeypatch):
    seen = {}
    monkeypatch.setattr("pyro_lora.experiments.cli.run_compare", lambda config, overwrite=False: seen.update(config=config) or [])
    monkeypatch.setattr("pyro_lora.experiments.cli.format_table", lambda rows: "")
    run()
    config = seen["config"]
    assert isinstance(config, CompareConfig) and config.model == "minilm" and config.dataset == "sst2"
    assert config.guides is None  # resolved to every applicable method once the task is known
    assert config.mc_normalize is None
    run("compare", "--mc-normalize", "tokens")
    assert seen["config"].mc_normalize == "tokens"


def test_bayesianize_a_peft_adapter_then_evaluate(tmp_path):
    from pyro_lora.pretrained import add_lora, load_pretrained

    base, _ = load_pretrained("minilm", "classification", num_labels=2)
    net = add_lora(base, r=4, alpha=8)
    net.save_pretrained(tmp_path / "adapter")  # an adapter saved by peft itself
    out = tmp_path / "tfb"
    run("bayesianize", str(tmp_path / "adapter"), "--train-size", "64", "--test-size", "32", "--anchors", "32",
        "--samples", "4", "--iterations", "2", "--out", str(out), "--quiet")
    saved = json.loads((out / "guide" / "run.json").read_text())
    assert saved["config"]["rank"] == 4 and saved["config"]["alpha"] == 8 and saved["random"] == "AB"
    # its training is unknown: no epochs or learning rate (the record named compare's 6 and 2e-3, never run)
    assert saved["config"]["epochs"] is None and saved["config"]["lr"] is None
    from pyro_lora.experiments.saved import evaluate_saved

    again = evaluate_saved(out)
    assert again["accuracy"] == pytest.approx(saved["result"]["accuracy"])


SMALL = ["--train-size", "16", "--test-size", "8", "--max-length", "16", "--samples", "2", "--quiet"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A finished `fit --guide map --adapter --epochs 1 --lr 5e-3` in FOLDER/fit; returns FOLDER."""
    folder = tmp_path_factory.mktemp("fitted")
    run("fit", "--guide", "map", "--adapter", "--epochs", "1", "--lr", "5e-3", *SMALL, "--out", str(folder / "fit"))
    return folder


def nothing_loads(monkeypatch):
    """Loading a model in fit or bayesianize fails the test (cli.main does not catch it)."""
    monkeypatch.setattr("pyro_lora.experiments.saved.prepare", lambda *a, **k: pytest.fail("a model was loaded"))


def test_fit_and_bayesianize_refuse_to_replace_another_run_and_keep_a_finished_one_before_loading(fitted, monkeypatch,
                                                                                                  capsys):
    """`bayesianize FIT/guide/adapter --out FIT` replaced the MAP run it read (run.json, guide and its own source
    adapter gone), and a `fit` of another method replaced that, exit 0 and no word; compare refuses such an --out."""
    out = fitted / "fit"
    nothing_loads(monkeypatch)
    record = (out / "guide" / "run.json").read_bytes()
    adapter = str(out / "guide" / "adapter")
    capsys.readouterr()
    for overwrite in ([], ["--overwrite"]):  # replacing its own source: never
        assert cli.main(["bayesianize", adapter, "--anchors", "8", *overwrite, "--out", str(out)]) == 2
        assert f"--out {out} and the adapter it reads ({adapter}) overlap" in capsys.readouterr().err
    assert cli.main(["fit", "--guide", "meanfield", "--epochs", "1", *SMALL, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds a finished `pyro-lora fit` run of map (seed 0) in {out / 'guide'}, of another configuration (" in err
    assert "guides ['map'] there, ['meanfield'] now" in err and "lr 0.005 there, None now" in err
    assert "pass --overwrite to replace it" in err
    assert cli.main(["fit", "--guide", "map", "--epochs", "1", "--lr", "5e-3", *SMALL, "--out", str(out / "guide")]) == 2
    assert (f"{out / 'guide'} is the folder of a saved guide (guide.json or a run's run.json there): fit and bayesianize "
            "write OUT/guide") in capsys.readouterr().err
    # refused after its lock was taken, it left a .lock inside the sealed guide folder: a later save there refused that
    # stray entry after its whole training
    assert sorted(p.name for p in (out / "guide").iterdir() if p.name.startswith(".")) == []
    # the same configuration again: finished, its row shown as compare shows a finished run's
    run("fit", "--guide", "map", "--adapter", "--epochs", "1", "--lr", "5e-3", *SMALL, "--out", str(out))
    shown = capsys.readouterr().out
    accuracy = json.loads(record)["result"]["accuracy"]
    assert f"# {out / 'guide'} holds this run already" in shown and f"| map | no validation data | sst2 | {accuracy:.3f} |" in shown
    assert (out / "guide" / "run.json").read_bytes() == record


def test_a_saved_guides_folder_is_refused_as_any_commands_output_before_loading(fitted, monkeypatch, tmp_path, capsys):
    """compare and study wrote their results among a saved guide's files, and a fit --overwrite over a guide folder
    holding an entry of another writer trained in full before its save refused that entry."""
    guide = fitted / "fit" / "guide"
    nothing_loads(monkeypatch)
    monkeypatch.setattr("pyro_lora.experiments.compare.prepare", lambda *a, **k: pytest.fail("a model was loaded"))
    before = sorted(p.name for p in guide.iterdir())
    capsys.readouterr()
    assert cli.main(["compare", "--guides", "map", *SMALL, "--out", str(guide)]) == 2
    assert (f"--out {guide} is the folder of a saved guide (guide.json or a run's run.json there): compare would write "
            "its results among those files") in capsys.readouterr().err
    adapter = sorted(p.name for p in (guide / "adapter").iterdir())  # replaced whole by a later save, with what lay there
    assert cli.main(["compare", "--guides", "map", *SMALL, "--out", str(guide / "adapter")]) == 2
    assert f"--out {guide / 'adapter'} is inside the folder of the saved guide {guide}: " in capsys.readouterr().err
    assert cli.main(["study", "--datasets", "sst2", "--runs", str(guide), "--docs", str(tmp_path / "docs")]) == 2
    assert f"--runs {guide} is the folder of a saved guide" in capsys.readouterr().err
    assert cli.main(["study", "--datasets", "sst2", "--report-only", "--runs", str(tmp_path / "runs"), "--docs", str(guide)]) == 2
    assert f"--docs {guide} is the folder of a saved guide" in capsys.readouterr().err
    # nothing written there, no lock left
    assert sorted(p.name for p in guide.iterdir()) == before and sorted(p.name for p in (guide / "adapter").iterdir()) == adapter
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "run.json").write_text('{"wandb": 1}')  # another tool's run.json: a folder like any other
    assert saved_folder(tmp_path / "mine") is None
    copy = tmp_path / "copy"
    shutil.copytree(fitted / "fit", copy)
    (copy / "guide" / "notes.txt").write_text("mine")
    assert cli.main(["fit", "--guide", "map", "--seed", "1", "--overwrite", *SMALL, "--out", str(copy)]) == 2
    assert (f"{copy / 'guide'} holds 1 entries the save does not write (e.g. 'notes.txt'), which replacing the folder "
            "whole would delete, where the run saves its guide there as a folder") in capsys.readouterr().err


def test_bayesianize_records_the_adapters_training_and_a_rerun_of_its_configuration_keeps_it(fitted, monkeypatch,
                                                                                              tmp_path, capsys):
    """bayesianize's run.json named compare's epochs 6 and lr 0.002 for an adapter the fit trained 1 epoch at 5e-3."""
    adapter, out = str(fitted / "fit" / "guide" / "adapter"), tmp_path / "tfb"
    search = ["--anchors", "8", "--iterations", "1", "--quiet"]
    run("bayesianize", adapter, *search, "--out", str(out))
    config = json.loads((out / "guide" / "run.json").read_text())["config"]
    assert (config["epochs"], config["lr"], config["rank"], config["alpha"]) == (1, 5e-3, 8, 16.0)  # the fit's flags
    # and its prior (the record said compare's 1.0 for an adapter trained under 2.0)
    run("fit", "--guide", "map", "--adapter", "--epochs", "1", "--prior-scale", "2", *SMALL, "--out", str(tmp_path / "fit2"))
    run("bayesianize", str(tmp_path / "fit2" / "guide" / "adapter"), *search, "--out", str(tmp_path / "tfb2"))
    again = json.loads((tmp_path / "tfb2" / "guide" / "run.json").read_text())
    assert again["config"]["prior_scale"] == again["prior"] == 2.0
    record = (out / "guide" / "run.json").read_bytes()
    nothing_loads(monkeypatch)
    capsys.readouterr()
    run("bayesianize", adapter, *search, "--out", str(out))
    assert f"# {out / 'guide'} holds this run already" in capsys.readouterr().out
    assert cli.main(["bayesianize", adapter, *search, "--tolerance", "0.05", "--out", str(out)]) == 2
    assert "of another configuration (tolerance 0.01 there, 0.05 now)" in capsys.readouterr().err
    assert (out / "guide" / "run.json").read_bytes() == record


@pytest.mark.parametrize("damage", ["run.json edited", "guide.safetensors gone", "guide.safetensors flipped"])
def test_a_finished_run_whose_files_were_changed_is_refused_not_shown(fitted, monkeypatch, tmp_path, capsys, damage):
    """A rerun into a finished fit printed its run.json's row as this run's, exit 0, with the row edited (accuracy
    0.95 shown) or its guide deleted or damaged, which evaluate refuses; bayesianize shares the path."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(fitted / "fit", out)
    guide = out / "guide"
    if damage == "run.json edited":
        record = json.loads((guide / "run.json").read_text())
        record["result"]["accuracy"] = 0.95
        (guide / "run.json").write_text(json.dumps(record))
    elif damage == "guide.safetensors gone":
        (guide / "guide.safetensors").unlink()
    else:
        data = bytearray((guide / "guide.safetensors").read_bytes())
        data[-1] ^= 1
        (guide / "guide.safetensors").write_bytes(bytes(data))
    nothing_loads(monkeypatch)
    capsys.readouterr()
    assert cli.main(["fit", "--guide", "map", "--adapter", "--epochs", "1", "--lr", "5e-3", *SMALL, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert f"{guide} holds a run whose files are not the ones saved together (" in captured.err
    assert "its recorded row cannot be trusted; choose another --out, or pass --overwrite to replace it" in captured.err
    assert "0.950" not in captured.out


def test_a_seed_fixes_the_fresh_classification_head():
    from pyro_lora.experiments.setup import prepare

    def head(seed):
        setup = prepare(CompareConfig(train_size=16, test_size=8), seed)
        return {n: p.detach().clone() for n, p in setup.net.named_parameters() if "classifier" in n}

    first, again, other = head(0), head(0), head(1)
    assert first and all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)


def test_compare_minilm_sst2_writes_results_and_plots_and_post_hoc_mean_field_improves_on_map(tmp_path, capsys):
    # MiniLM on real SST-2, trained long enough for MAP to be over-confident; measured here, seed 0: MAP 0.773 /
    # ECE 15.89 / NLL 0.552, mean-field 0.781 / 10.47 / 0.525, mutual information 0.0084 (240 examples, 10 epochs:
    # 12.82 / 0.509 -> 11.55 / 0.492)
    out = tmp_path / "mf"
    run("compare", "--model", "minilm", "--dataset", "sst2", "--guides", "map,meanfield", "--train-size", "128",
        "--test-size", "128", "--epochs", "8", "--seeds", "0", "--no-ts", "--out", str(out), "--quiet")
    rows = {r["guide"]: r for r in json.loads((out / "results.json").read_text())["summary"]}
    map_row, meanfield = rows["map"], rows["meanfield"]
    assert set(map_row) >= {"guide", "accuracy", "ece", "nll", "brier", "fit_seconds", "predict_seconds_per_1000", "fit_memory_mb"}
    assert map_row["accuracy"] > 0.6  # SST-2 is balanced: chance is 0.5
    assert (out / "reliability_map.png").read_bytes()[:4] == b"\x89PNG"
    assert "| map |" in capsys.readouterr().out
    assert meanfield["nll"] < map_row["nll"] and meanfield["ece"] < map_row["ece"]
    assert meanfield["accuracy"] > map_row["accuracy"] - 0.02
    assert meanfield["mutual_information"] > 0.005  # a real spread, not the MAP again


def test_a_head_or_base_the_task_does_not_fit_is_named(tmp_path):
    """A local checkpoint with a 2-class head for 3 labels failed with transformers' 'ignore_mismatched_sizes' (a flag
    the CLI lacks); an adapter with a 3-class head on a 2-class model with 'Error(s) in loading state_dict' (its
    reason on a line --debug showed); an adapter trained on another base folder ran there without a word."""
    from conftest import tiny_bert_base
    from peft import LoraConfig, get_peft_model

    from pyro_lora.experiments.saved import _warn_about_another_base
    from pyro_lora.pretrained import load_adapter, load_pretrained

    tiny_bert_base(num_labels=2).save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match=r"holds a classification head of 2 classes and the task has 3"):
        load_pretrained(str(tmp_path / "two"), "classification", num_labels=3)
    three = get_peft_model(tiny_bert_base(num_labels=3), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    three.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"does not fit this model: size mismatch for .*classifier.*a head of another number"):
        load_adapter(tiny_bert_base(num_labels=2), tmp_path / "adapter")
    # a BERT adapter on a Llama: peft's "No modules were targeted for adaptation", naming neither adapter nor model
    from conftest import tiny_llama
    llama = tiny_llama().get_base_model()
    with pytest.raises(ValueError, match=r"none of the modules the adapter in .*adapter targets matched this LlamaForCausalLM "
                                         r"\(target_modules \['query'\]\): an adapter of another base model"):
        load_adapter(llama, tmp_path / "adapter")
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": str(tmp_path / "two")}))
    tiny_bert_base(num_labels=2, seed=1).save_pretrained(tmp_path / "other")
    with pytest.warns(UserWarning, match=r"was trained on .*two .*and --model gives .*other"):
        _warn_about_another_base(tmp_path / "adapter", str(tmp_path / "other"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_about_another_base(tmp_path / "adapter", str(tmp_path / "two"))


@pytest.mark.parametrize("options", [{"bias": "all"}, {"modules_to_save": ["pooler"]}], ids=["bias_all", "pooler"])
def test_an_adapter_from_elsewhere_without_its_head_is_refused_not_scored_with_a_random_one(tmp_path, capsys, options):
    """Saved by plain peft without the classifier (no task_type) but with another non-LoRA tensor (bias='all', or
    the pooler in modules_to_save), an adapter passed the 'LoRA matrices only' check: bayesianize scored a freshly
    random head (accuracy 0.000 where the adapter's own is 1.000), exit 0, with a warning about seeds."""
    from peft import LoraConfig, get_peft_model

    from pyro_lora.pretrained import load_pretrained

    net, _ = load_pretrained("minilm", "classification", num_labels=2, progress=False)
    get_peft_model(net, LoraConfig(r=2, target_modules=["query", "value"], **options)).save_pretrained(tmp_path / "adapter")
    assert cli.main(["bayesianize", str(tmp_path / "adapter"), *SMALL, "--anchors", "8", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    missing = "'classifier.weight'" if "bias" in options else "'classifier.weight', 'classifier.bias'"  # bias='all' loads the bias
    assert (f"the adapter in {tmp_path / 'adapter'} does not carry the trained task head ([{missing}]): the base model "
            "drew it at load (its checkpoint lacks it), so a random head would be scored; save the adapter with its head "
            "(peft's task_type='SEQ_CLS', or modules_to_save=['classifier'])") in err


def test_bayesianize_says_once_that_a_pooler_drawn_at_load_is_the_fits_only_under_its_seed(tmp_path, capsys):
    """load_adapter warns about a weight drawn at load that the adapter does not carry (an MLM checkpoint's pooler);
    bayesianize checks the seed itself (an adapter from elsewhere: unknown, warned about): said once, not twice."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from pyro_lora.model_files import minilm_dir
    from pyro_lora.pretrained import load_pretrained

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4)).save_pretrained(tmp_path / "mlm")  # no pooler, no classifier
    tokenizer.save_pretrained(tmp_path / "mlm")
    net, _ = load_pretrained(str(tmp_path / "mlm"), "classification", num_labels=2, progress=False)
    get_peft_model(net, LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")).save_pretrained(
        tmp_path / "adapter")  # the classifier saved, the pooler not
    assert cli.main(["bayesianize", str(tmp_path / "adapter"), "--model", str(tmp_path / "mlm"), *SMALL, "--anchors", "8",
                     "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "--model draws ['bert.pooler.dense.weight', 'bert.pooler.dense.bias'] at load under the seed" in err
    assert err.count("bert.pooler.dense.weight") == 1  # load_adapter's own warning is not repeated

