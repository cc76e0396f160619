"""``pyro-lora compare``: train a MAP LoRA once, Bayesianize it with several methods, score all on one test set.

This is the application layer: the only part of ``pyro_lora`` that imports :mod:`guides`.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import data as D
from .likelihoods import MultipleChoice, SequenceClassification
from .metrics import summarize
from .io import load_guide, save_guide
from .model import LoraModel
from .plots import reliability_diagram
from .predictive import predict
from .pretrained import add_lora, default_mc_format, load_pretrained
from .training import fit


@dataclass
class CompareConfig:
    """Everything one comparison run depends on (written to ``results.json``)."""

    model: str = "minilm"
    dataset: str = "sst2"
    guides: tuple = None  # None: every method that applies to the task
    train_size: int = 1000
    test_size: int = 500
    val_fraction: float = 0.1
    samples: int = 8
    epochs: int = 3
    lr: float = None  # default: 2e-3 for encoders (fresh head), 3e-4 for causal LMs
    batch_size: int = 16
    rank: int = 8
    alpha: float = 16.0
    prior_scale: float = 1.0
    seed: int = 0
    device: str = "cpu"
    mc_format: str = None
    max_length: int = 256
    data_dir: str = None
    out: str = "runs/compare"
    progress: bool = True


@dataclass
class Setup:
    """The trained MAP and the data every method shares."""

    config: CompareConfig
    net: object
    tokenizer: object
    likelihood: object
    train: list
    val: list
    test: list
    collator: object
    model: LoraModel = None
    map_guide: object = None
    trained_state: dict = field(default_factory=dict)

    def loader(self, records, shuffle=False):
        return D.make_loader(records, self.collator, self.config.batch_size, shuffle=shuffle, seed=self.config.seed)

    def lora_model(self, random="AB", **kwargs):
        """A fresh :class:`LoraModel` view of the shared network, reset to the trained MAP state."""
        self.restore()
        kwargs.setdefault("prior", self.config.prior_scale)
        return LoraModel(self.net, self.likelihood, random=random, num_data=len(self.train), **kwargs)

    def restore(self):
        """Put the MAP adapter and head back: each method starts from the same trained network."""
        with torch.no_grad():
            params = dict(self.net.named_parameters())
            for k, v in self.trained_state.items():
                params[k].copy_(v)


def prepare(config):
    """Load the model and data of ``config``; returns a :class:`Setup` (MAP not yet trained)."""
    meta = D.load_meta(config.dataset, config.data_dir)
    torch.manual_seed(config.seed)
    train_all = D.load_records(config.dataset, "train", config.data_dir)
    train_all = D.subset(train_all, min(len(train_all), config.train_size), seed=config.seed)
    train, val = D.split_train_val(train_all, val_fraction=config.val_fraction, seed=config.seed)
    test = D.load_records(config.dataset, "test", config.data_dir)
    test = D.subset(test, min(len(test), config.test_size), seed=config.seed)
    if meta["task"] == "classification":
        net, tok = load_pretrained(config.model, "classification", num_labels=len(meta["label_names"]), device=config.device)
        likelihood, collator = SequenceClassification(), D.ClassificationCollator(tok, config.max_length)
    else:
        net, tok = load_pretrained(config.model, "causal_lm", device=config.device)
        config.mc_format = config.mc_format or default_mc_format(net)
        if config.mc_format == "cloze":
            likelihood, collator = MultipleChoice(format="cloze"), D.ClozeCollator(tok, config.max_length)
        else:
            num_choices = max(len(r["choices"]) for r in train + test)
            likelihood = MultipleChoice(D.letter_token_ids(tok, num_choices), format="letter")
            collator = D.LetterCollator(tok, config.max_length)
    config.lr = config.lr or (2e-3 if meta["task"] == "classification" else 3e-4)
    net = add_lora(net, r=config.rank, alpha=config.alpha).to(config.device)
    return Setup(config, net, tok, likelihood, train, val, test, collator)


def train_map(setup):
    """Fine-tune the MAP LoRA (plain LoRA through the Pyro model) and remember its trained state."""
    from guides import MAPGuide

    c = setup.config
    model = LoraModel(setup.net, setup.likelihood, random="AB", num_data=len(setup.train), prior=c.prior_scale)
    guide = MAPGuide(model)
    fit(model, guide, setup.loader(setup.train, shuffle=True), epochs=c.epochs, lr=c.lr, progress=c.progress)
    model.write_adapter({k: v.detach() for k, v in guide.mean().items()})
    setup.model, setup.map_guide = model, guide
    setup.trained_state = {n: p.detach().clone() for n, p in setup.net.named_parameters() if "lora_" in n or p.requires_grad}


@dataclass
class Fitted:
    """A fitted method: ``predict(records) -> Prediction``, and what it adds over plain LoRA."""

    predict: object
    guide: object = None
    extra_parameters: int = 0


def _guide_predictor(setup, model, guide, **kwargs):
    c = setup.config
    return lambda records: predict(model, guide, setup.loader(records), num_samples=c.samples, **kwargs)


def method_map(setup):
    return Fitted(_guide_predictor(setup, setup.model, setup.map_guide), setup.map_guide)


def method_zeroshot(setup):
    """The base model without its adapter: the row every fine-tuned causal-LM method must beat."""
    if isinstance(setup.likelihood, SequenceClassification):
        raise ValueError("zeroshot needs a causal LM: an encoder's classification head is untrained without fine-tuning")

    def run(records):
        with setup.net.disable_adapter():
            return predict(setup.model, None, setup.loader(records))

    return Fitted(run)


METHODS = {"zeroshot": method_zeroshot, "map": method_map}


def applicable_methods(setup):
    """Every method name that applies to the setup's task (zero-shot needs a causal LM)."""
    return [m for m in METHODS if not (m == "zeroshot" and isinstance(setup.likelihood, SequenceClassification))]


def _check_methods(names):
    unknown = [g for g in names if g not in METHODS]
    if unknown:
        raise ValueError(f"unknown guide(s) {unknown}; available: {', '.join(METHODS)}")


def _fit_and_score(setup, name, map_seconds):
    t = time.perf_counter()
    fitted = METHODS[name](setup)
    fit_seconds = time.perf_counter() - t + (map_seconds if name == "map" else 0.0)
    prediction = fitted.predict(setup.test)
    row = {"guide": name, **summarize(prediction.probs, prediction.labels)}
    row.update(fit_seconds=fit_seconds, predict_seconds=prediction.seconds, extra_parameters=fitted.extra_parameters)
    return fitted, prediction, row


def run_compare(config):
    """Run the comparison of ``config``; returns the result rows (one dict per method).

    Writes ``out/results.json`` and ``out/reliability_<guide>.png``.
    """
    _check_methods(config.guides or ())
    out = Path(config.out)
    start = time.perf_counter()
    setup = prepare(config)
    config.guides = tuple(config.guides or applicable_methods(setup))
    if config.progress:
        fmt = f", multiple-choice format {config.mc_format}" if config.mc_format else ""
        print(f"# {config.model} on {config.dataset}: {len(setup.train)} train / {len(setup.val)} validation / "
              f"{len(setup.test)} test{fmt}; guides {', '.join(config.guides)}", flush=True)
    train_map(setup)
    map_seconds = time.perf_counter() - start
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for name in config.guides:
        _, prediction, row = _fit_and_score(setup, name, map_seconds)
        setup.restore()
        rows.append(row)
        reliability_diagram(prediction.probs, prediction.labels, out / f"reliability_{name}.png", title=f"{name} on {config.dataset}")
        if config.progress:
            print(format_row(row), flush=True)
    write_json(out / "results.json", {"config": asdict(config), "results": rows})
    return rows


def fit_one(config):
    """Train MAP, fit the one guide of ``config`` and save it to ``out/guide`` (``out/run.json`` rebuilds the model)."""
    _check_methods(config.guides)
    (name,) = config.guides
    start = time.perf_counter()
    setup = prepare(config)
    train_map(setup)
    fitted, _, row = _fit_and_score(setup, name, time.perf_counter() - start)
    if fitted.guide is None:
        raise ValueError(f"method {name!r} has no guide to save")
    out = Path(config.out)
    save_guide(fitted.guide, out / "guide")
    random = "".join(sorted({s.matrix for s in fitted.guide.sites.values()}))
    write_json(out / "run.json", {"config": asdict(config), "random": random, "result": row})
    return row


def evaluate_saved(run_dir, **overrides):
    """Score the guide saved by :func:`fit_one` in ``run_dir`` on its test set (``overrides`` change the config)."""
    run_dir = Path(run_dir)
    try:
        run = json.loads((run_dir / "run.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir} is not a `pyro-lora fit` output (run.json missing)") from None
    config = CompareConfig(**{**run["config"], **overrides})
    setup = prepare(config)
    setup.model = LoraModel(setup.net, setup.likelihood, random=run["random"], num_data=len(setup.train), prior=config.prior_scale)
    guide = load_guide(run_dir / "guide", setup.model)
    prediction = predict(setup.model, guide, setup.loader(setup.test), num_samples=config.samples)
    row = {"guide": config.guides[0], **summarize(prediction.probs, prediction.labels)}
    row.update(fit_seconds=0.0, predict_seconds=prediction.seconds, extra_parameters=guide.extra_parameters())
    return row


def write_json(path, obj):
    """Write ``obj`` as JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def format_table(rows):
    """Markdown table: accuracy, ECE x100, NLL, Brier, seconds."""
    head = "| guide | accuracy | ECE x100 | NLL | Brier | fit s | predict s |\n|---|---|---|---|---|---|---|"
    return "\n".join([head] + [format_row(r) for r in rows])


def format_row(r):
    return (
        f"| {r['guide']} | {r['accuracy']:.3f} | {r['ece']:.2f} | {r['nll']:.3f} | {r['brier']:.3f} "
        f"| {r['fit_seconds']:.1f} | {r['predict_seconds']:.1f} |"
    )
