"""The method registry: a method registered from outside the package runs through compare, fit and evaluate."""

import json
from dataclasses import replace

import numpy as np
import pyro.distributions as dist
import pytest
import torch

from pyro_lora.experiments import cli
from pyro_lora.experiments.compare import run_compare
from pyro_lora.experiments.saved import evaluate_saved, fit_one
from pyro_lora.experiments.setup import CompareConfig, check_config
from pyro_lora.guides import METHODS, Fitted, LoraGuide, get_method, method, methods_for_task
from pyro_lora.guides.registry import MODELS
from pyro_lora.model import LoraModel

pytestmark = pytest.mark.real


class JitterGuide(LoraGuide):
    """``q(theta) = N(theta_MAP, std^2 I)``: the smallest posterior a user could add."""

    def __init__(self, model, std=1e-3, init=None):
        super().__init__(model)
        init = init if init is not None else model.adapter_values()
        self.std = std
        self.locs = torch.nn.ParameterList([torch.nn.Parameter(init[name].detach().clone().float()) for name in self.sites])

    def posterior(self):
        return {name: dist.Normal(loc, self.std).to_event(loc.dim()) for name, loc in zip(self.sites, self.locs)}

    def extra_parameters(self):
        return 1  # its one std, as evaluate counts it too

    def config(self):
        return {"std": self.std}


def jitter(setup):
    """A Gaussian of fixed std around the MAP (a test method)."""
    model = setup.lora_model(random="AB")
    guide = JitterGuide(model, std=0.05)
    return Fitted(guide=guide, extra_parameters=guide.extra_parameters(), note="std fixed at 0.05")


@pytest.fixture
def jitter_method():
    method("jitter", bayesian=True, tasks=("classification",), guide=JitterGuide, exportable=True)(jitter)
    yield get_method("jitter")
    METHODS.pop("jitter")


def small(out, **kwargs):
    return CompareConfig(**{"train_size": 40, "test_size": 16, "epochs": 1, "samples": 3, "out": str(out), "progress": False,
                            **kwargs})


def test_a_method_registered_outside_runs_through_compare_fit_and_evaluate(tmp_path, jitter_method):
    assert "jitter" in methods_for_task("classification") and "jitter" not in methods_for_task("multiple_choice")
    assert jitter_method.summary == "A Gaussian of fixed std around the MAP (a test method)." and jitter_method.bayesian
    rows = run_compare(small(tmp_path / "compare", guides=("map", "jitter")))
    assert [r["guide"] for r in rows] == ["map", "jitter", "jitter+ts"]
    jittered = rows[1]
    assert jittered["extra_parameters"] == 1 and jittered["mutual_information"] > 0  # its own weight samples
    assert jittered["mean_accuracy"] == rows[0]["accuracy"] and "mean_accuracy" not in rows[0]  # its mean is the MAP
    assert "temperature applies to the averaged predictive" in rows[2]["note"]  # its samples have an MI; the +ts row not
    # what is fitted on the 4 validation sentences says so: the +ts row, not the method that uses none
    assert "validation split of 4 examples (fewer than 100: each weighs 25 accuracy points" in rows[2]["note"]
    assert "validation split" not in (rows[1].get("note") or "")
    assert 0.0 <= jittered["accuracy"] <= 1.0
    # the command line offers it like a built-in method, fit saves it and evaluate reproduces fit's row
    out = tmp_path / "fit"
    assert cli.main(["fit", "--guide", "jitter", "--train-size", "40", "--test-size", "16", "--epochs", "1", "--samples", "3",
                     "--out", str(out), "--quiet", "--adapter"]) == 0
    record = json.loads((out / "guide" / "run.json").read_text())
    assert record["model_class"] == "lora" and record["predictive"] == "weight_samples"
    assert (out / "guide" / "adapter" / "adapter_config.json").is_file()
    again = evaluate_saved(out, progress=False)
    assert {k: again[k] for k in ("accuracy", "ece", "nll")} == {k: record["result"][k] for k in ("accuracy", "ece", "nll")}
    assert again["extra_parameters"] == record["result"]["extra_parameters"] == 1
    assert record["fit_note"] == "std fixed at 0.05" and again["note"] == "std fixed at 0.05"  # evaluate keeps the fit's note


def test_a_method_that_does_not_take_the_task_is_refused_before_loading(tmp_path, jitter_method):
    with pytest.raises(ValueError, match="jitter does not apply to multiple_choice sets like 'arc_easy'"):
        check_config(small(tmp_path, model="smollm2", dataset="arc_easy", guides=("jitter",)))


def test_a_method_without_a_guide_is_not_saveable(tmp_path):
    method("nothing", bayesian=False)(lambda setup: Fitted(lambda records: None))
    try:
        with pytest.raises(ValueError, match="method 'nothing' has no guide to save"):
            fit_one(small(tmp_path, guides=("nothing",)))
    finally:
        METHODS.pop("nothing")


def test_registration_is_checked():
    with pytest.raises(ValueError, match="method 'map' is already registered"):
        method("map", bayesian=False)(lambda setup: None)
    with pytest.raises(ValueError, match="tasks \\('regression',\\) must be a non-empty subset"):
        method("regress", bayesian=False, tasks=("regression",))(lambda setup: None)

    class Impostor(LoraModel):
        pass  # inherits the name "lora" of another class

    with pytest.raises(ValueError, match="model class .*Impostor has the name 'lora' of LoraModel"):
        method("impostor", bayesian=True, model=Impostor)(lambda setup: None)
    assert "impostor" not in METHODS and MODELS["lora"] is LoraModel
    with pytest.raises(ValueError, match="unknown guide 'nope'; available: zeroshot, map, temperature"):
        get_method("nope")


def test_every_built_in_method_has_its_metadata():
    for name, m in METHODS.items():
        assert m.summary and m.tasks, name
        assert MODELS[m.model.name] is m.model
        if m.saveable:
            assert issubclass(m.guide, LoraGuide)
    assert [n for n, m in METHODS.items() if not m.bayesian] == ["zeroshot", "map", "temperature"]
    assert methods_for_task("classification") == [n for n in METHODS if n != "zeroshot"]


@pytest.mark.parametrize("returned, message", [
    (lambda: "a guide", "its recipe returned str, not a Fitted"),
    (lambda: Fitted(), "its recipe returned neither a predict function nor a guide"),
    (lambda: Fitted(guide=torch.nn.Linear(1, 1)), "registered with guide=JitterGuide, and its recipe returned Linear"),
    (lambda: Fitted(guide=_guide_on(object())), "registered with model=LoraModel, and its guide's model is a object"),
])
def test_a_recipe_returning_other_than_it_registered_is_refused(returned, message):
    """Saved and rebuilt by its registration, it would silently be another method's guide or model."""
    from types import SimpleNamespace

    from pyro_lora.experiments.compare import fit_method

    setup = SimpleNamespace(seed=0, config=SimpleNamespace(device="cpu"))
    setup.for_method = lambda name: setup
    method("liar", bayesian=True, guide=JitterGuide)(lambda setup: returned())
    try:
        with pytest.raises((TypeError, ValueError), match=message):
            fit_method(setup, "liar")
    finally:
        METHODS.pop("liar")


@pytest.mark.parametrize("count", [-5, 2.5, True, "3", None, float("nan"), torch.tensor(-1), torch.tensor(True)])
def test_a_recipes_extra_parameters_must_be_a_whole_number_at_least_0(count):
    """-5 was printed as +params -5, and 2.5 as 2 (rounded half to even), skipping the count's check on resume."""
    with pytest.raises(ValueError, match=r"Fitted.extra_parameters must be a whole number >= 0 .*got"):
        Fitted(lambda records: None, extra_parameters=count)
    for whole in (np.int64(7), 7.0, torch.tensor(7)):
        assert Fitted(lambda records: None, extra_parameters=whole).extra_parameters == 7
        assert type(Fitted(lambda records: None, extra_parameters=whole).extra_parameters) is int


def test_every_methods_summary_is_its_first_whole_sentence():
    """compare's progress line took the docstring's first line: "... baseline. ``T`` is fitted", "..., under a"."""
    for name, m in METHODS.items():
        assert m.summary.endswith(".") and "\n" not in m.summary and "``" not in m.summary, name
    assert METHODS["temperature"].summary == ("Temperature scaling of the MAP, fitted on the validation split: the cheap "
                                              "non-Bayesian baseline.")


def test_a_predictive_that_builds_its_own_prediction_is_timed_not_read_as_free():
    """A method's hand-built Prediction keeps seconds at its default 0: a predict of 0.2 s read predict s/1k 0.0."""
    import time
    from types import SimpleNamespace

    from pyro_lora.experiments.compare import evaluate
    from pyro_lora.predictive import Prediction

    def slow(records):
        time.sleep(0.2)
        return Prediction(torch.full((len(records), 2), 0.5), torch.zeros(len(records), dtype=torch.long))

    setup = SimpleNamespace(seed=0, config=SimpleNamespace(device="cpu"))
    _, costs = evaluate(setup, Fitted(slow), [{}] * 4, "slow", "sst2")
    assert costs["predict_seconds_per_1000"] >= 1000 * 0.2 / 4
    timed = Prediction(torch.full((4, 2), 0.5), torch.zeros(4, dtype=torch.long), seconds=0.01)  # its own time stands
    _, costs = evaluate(setup, Fitted(lambda records: time.sleep(0.2) or timed), [{}] * 4, "timed", "sst2")
    assert costs["predict_seconds_per_1000"] == pytest.approx(1000 * 0.01 / 4)


def _guide_on(model):
    guide = JitterGuide.__new__(JitterGuide)
    object.__setattr__(guide, "_model", (model,))
    return guide


def test_registration_refuses_unusable_metadata():
    for name in ("../escaped", "a,b", "", " map", "x y"):  # names become files and --guides entries
        with pytest.raises(ValueError, match="must be a Python identifier"):
            method(name, bayesian=True)(lambda setup: None)
    for kwargs, message in [({"guide": 42}, "is no LoraGuide subclass"), ({"exportable": True}, "exportable needs the guide"),
                            ({"predictive": None}, "predictive .and likelihood, if given. must be functions"),
                            ({"bayesian": "no"}, "bayesian, exportable, validation, ts, trains, float16 and tempered are True or False"),
                            ({"validation": 1}, "bayesian, exportable, validation, ts, trains, float16 and tempered are True or False")]:
        with pytest.raises(ValueError, match=message):
            method("odd", **{"bayesian": True, **kwargs})(lambda setup: None)
    first, second = method("twice", bayesian=True), method("twice", bayesian=True)
    first(lambda setup: None)
    try:
        with pytest.raises(ValueError, match="method 'twice' is already registered"):
            second(lambda setup: None)
    finally:
        METHODS.pop("twice")
    assert "odd" not in METHODS


def test_a_recipe_giving_a_guide_and_its_own_predict_is_refused():
    """compare would score its predict, fit and evaluate the registered predictive: two rows for one method."""
    from types import SimpleNamespace

    from pyro_lora.experiments.compare import fit_method

    setup = SimpleNamespace(seed=0, config=SimpleNamespace(device="cpu"))
    setup.for_method = lambda name: setup
    method("both", bayesian=True, guide=JitterGuide)(lambda setup: Fitted(lambda records: None, _guide_on(LoraModel.__new__(LoraModel))))
    try:
        with pytest.raises(ValueError, match="saves its guide, and its recipe returned a predict function too"):
            fit_method(setup, "both")
    finally:
        METHODS.pop("both")


def test_installed_packages_register_methods_through_entry_points(monkeypatch):
    from pyro_lora.guides import registry

    loaded = []
    entry = type("Entry", (), {"load": lambda self: loaded.append("jitter") or method("plugin", bayesian=True)(jitter)})()
    monkeypatch.setattr(registry, "entry_points", lambda group: [entry] if group == "pyro_lora.methods" else [])
    try:
        with pytest.raises(SystemExit):  # the command line loads them before it parses --guides
            cli.main(["compare", "--guides", "plugin", "--help"])
        assert loaded == ["jitter"] and "plugin" in METHODS
    finally:
        METHODS.pop("plugin", None)


def test_a_saved_guide_edited_or_swapped_since_is_refused(tmp_path):
    """The guide's own file and settings are sealed with its run record: a changed dropout p or another run's tensors
    were re-scored under a note that blamed the data or the software."""
    import shutil

    rows = {}
    for seed in (0, 1):
        rows[seed] = fit_one(small(tmp_path / f"s{seed}", guides=("mcdropout",), seeds=(seed,)))
    guide = tmp_path / "s0" / "guide"
    meta = json.loads((guide / "guide.json").read_text())
    pristine = (guide / "guide.json").read_text()
    (guide / "guide.json").write_text(json.dumps({**meta, "config": {**meta["config"], "p": 0.6}}))
    with pytest.raises(ValueError, match="guide.json is not the one saved with"):
        evaluate_saved(tmp_path / "s0", progress=False)
    (guide / "guide.json").write_text(pristine)
    shutil.copy(tmp_path / "s1" / "guide" / "guide.safetensors", guide / "guide.safetensors")
    with pytest.raises(ValueError, match="guide.safetensors is not the one saved with"):
        evaluate_saved(tmp_path / "s0", progress=False)


def test_each_recipe_gets_its_own_setup_and_the_network_back(tmp_path):
    from pyro_lora.experiments.setup import prepare, train_map

    setup = prepare(small(tmp_path, guides=("map",)), 0)
    train_map(setup)
    view = setup.for_method("map")
    assert view is not setup and isinstance(view.train, tuple) and view.config is setup.config
    with pytest.raises(AttributeError):
        view.train.reverse()  # a recipe cannot reorder the next method's data
    head = [p for n, p in setup.net.named_parameters() if "classifier" in n and p.requires_grad]
    assert head
    for p in head:  # a recipe that froze the head
        p.requires_grad_(False)
    setup.restore()
    assert all(p.requires_grad for p in head)


def test_a_method_needing_a_missing_package_is_left_out_by_default_and_refused_by_name(tmp_path):
    from pyro_lora.experiments.setup import CompareConfig, check_config

    method("needs_pkg", bayesian=True, requires=(("no_such_module_pyro_lora", "no-such-package"),))(lambda setup: None)
    try:
        assert METHODS["needs_pkg"].missing == ["no-such-package"]
        assert "needs_pkg" not in methods_for_task("classification") and "map" in methods_for_task("classification")
        with pytest.raises(ValueError, match="needs_pkg needs no-such-package, which is not installed: pip install no-such-package"):
            check_config(CompareConfig(guides=("map", "needs_pkg"), out=str(tmp_path)))
    finally:
        METHODS.pop("needs_pkg")
    assert METHODS["ivon"].missing == [] and METHODS["ivon"].requires == (("ivon", "ivon-opt"),)


def test_a_method_for_one_multiple_choice_format_is_refused_before_loading_and_left_out_of_the_defaults(tmp_path, monkeypatch):
    """Last-layer Laplace needs the answer-letter rows of lm_head: with SmolLM2's default cloze format it was planned by
    default and refused only after the MAP had trained, on every seed."""
    from pyro_lora.experiments import setup as S
    from pyro_lora.model_files import parameter_count

    assert METHODS["llla"].mc_formats == ("letter",) and METHODS["llla_val"].mc_formats == ("letter",)
    assert parameter_count("smollm2") == 134_515_008  # from metadata: the loaded base's count
    monkeypatch.setattr(S, "load_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    config = S.CompareConfig(model="smollm2", dataset="arc_easy", out=str(tmp_path))
    with pytest.raises(ValueError, match="llla does not apply to the cloze multiple-choice format .* give --mc-format letter"):
        S.check_config(replace(config, guides=("map", "llla")))
    assert S.check_config(replace(config, guides=("map", "llla"), mc_format="letter")) == "multiple_choice"
    defaults = S.default_guides(config)
    assert "llla" not in defaults and "llla_val" not in defaults and "laplace" in defaults
    assert "llla" in S.default_guides(replace(config, mc_format="letter"))
    assert "llla" in methods_for_task("classification") and "llla" in methods_for_task("multiple_choice")
    with pytest.raises(ValueError, match="mc_formats .'cloze2',. must be a non-empty subset"):
        method("odd_format", bayesian=True, mc_formats=("cloze2",))



def test_methods_that_train_are_refused_with_zero_epochs_before_loading(tmp_path, monkeypatch):
    """--epochs 0 is a legal MAP (the adapter as initialised), but meanfield and flow divided by zero and IVON refused
    it only after the MAP had trained."""
    from pyro_lora.experiments import setup as S

    monkeypatch.setattr(S, "load_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    config = S.CompareConfig(epochs=0, out=str(tmp_path))
    with pytest.raises(ValueError, match="meanfield, ivon, meanfield_val train for --epochs .* and --epochs is 0"):
        S.check_config(replace(config, guides=("map", "meanfield", "ivon", "meanfield_val", "laplace")))
    defaults = S.default_guides(config)
    assert {"map", "temperature", "laplace", "tfb"} <= set(defaults)
    assert not {"meanfield", "meanfield_val", "flow", "flow_val", "ensemble", "mola", "ivon", "blora_xs", "scalabl"} & set(defaults)
    assert {"meanfield", "ensemble", "mola", "ivon"} <= set(S.default_guides(replace(config, epochs=1)))


def test_a_method_that_refuses_a_float16_base_is_refused_before_loading_and_left_out_of_fp16_defaults(tmp_path, monkeypatch):
    """IVON (no loss scaling) refused --dtype fp16 only after the model was loaded and the MAP trained, once per seed,
    and was among fp16's default methods: a plain `compare --dtype fp16` ended with a failure."""
    from pyro_lora.experiments import setup as S

    monkeypatch.setattr(S, "load_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    config = S.CompareConfig(dtype="fp16", out=str(tmp_path))
    with pytest.raises(ValueError, match=r"ivon does not train on a float16 base .*: give --dtype bf16 or fp32, or leave ivon out"):
        S.check_config(replace(config, guides=("map", "ivon")))
    assert "ivon" not in S.default_guides(config) and "map" in S.default_guides(config)
    assert "ivon" in S.default_guides(replace(config, dtype="bf16"))
    S.check_config(replace(config, guides=("map", "ivon"), dtype="bf16"))


def test_a_variant_inherits_its_bases_constraints_along_the_chain(tmp_path, monkeypatch):
    """A plugin variant of a base that trains, needs a package or another task ran its base's recipe and failed after
    the MAP; an unknown base failed there too."""
    from pyro_lora.experiments import setup as S

    monkeypatch.setattr(S, "load_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    method("needs_pkg2", bayesian=True, requires=(("no_such_module_pyro_lora", "no-such-package"),))(lambda v: None)
    method("of_pkg", bayesian=True, base="needs_pkg2")(lambda v: None)
    method("of_chain", bayesian=True, base="meanfield_val")(lambda v: None)
    method("of_nothing", bayesian=True, base="nosuch")(lambda v: None)
    method("of_zeroshot", bayesian=True, base="zeroshot")(lambda v: None)
    try:
        config = S.CompareConfig(out=str(tmp_path))
        with pytest.raises(ValueError, match=r"of_pkg \(through its base method needs_pkg2\) needs no-such-package"):
            S.check_config(replace(config, guides=("of_pkg",)))
        with pytest.raises(ValueError, match="of_chain train for --epochs"):
            S.check_config(replace(config, guides=("of_chain",), epochs=0))
        assert [m.name for m in METHODS["of_chain"].lineage] == ["of_chain", "meanfield_val", "meanfield"]
        with pytest.raises(ValueError, match="starts from the method 'nosuch', which is not registered"):
            S.check_config(replace(config, guides=("of_nothing",)))
        with pytest.raises(ValueError, match=r"of_zeroshot \(through its base method zeroshot\) does not apply to classification"):
            S.check_config(replace(config, guides=("of_zeroshot",)))
        defaults = S.default_guides(config)
        assert not {"of_pkg", "of_nothing", "of_zeroshot"} & set(defaults) and "of_chain" in defaults
        assert "of_chain" not in S.default_guides(replace(config, epochs=0))
    finally:
        for name in ("needs_pkg2", "of_pkg", "of_chain", "of_nothing", "of_zeroshot"):
            METHODS.pop(name)
