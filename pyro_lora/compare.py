"""``pyro-lora compare``: train a MAP LoRA once, Bayesianize it with several methods, score all on one test set.

This is the application layer: the only part of ``pyro_lora`` that imports :mod:`guides`.
"""

import json
import math
import numbers
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from pyro.infer import TraceMeanField_ELBO

from . import data as D
from .likelihoods import MultipleChoice, SequenceClassification
from . import metrics as M
from .costs import PeakMemory
from .distributed import is_main
from .io import atomic_file, load_guide, save_guide
from .metrics import summarize
from .model import LoraModel
from .plots import metric_scatter, reliability_diagram, reliability_grid
from .predictive import predict
from .pretrained import add_lora, default_mc_format, load_pretrained
from .training import fit


@dataclass
class CompareConfig:
    """Everything one comparison run depends on (written to ``results.json``)."""

    model: str = "minilm"
    dataset: str = "sst2"
    guides: tuple = None  # None: every method that applies to the task
    train_size: int = 500
    test_size: int = 300
    val_fraction: float = 0.1
    samples: int = 8
    epochs: int = 8  # long enough for MAP to become over-confident, where calibration can be gained
    lr: float = None  # default: 2e-3 for encoders (fresh head), 3e-4 for causal LMs
    batch_size: int = 16
    rank: int = 8
    alpha: float = 16.0
    prior_scale: float = 1.0
    seeds: tuple = (0,)
    eval_datasets: tuple = ()  # shifted evaluation sets with the same answer format, e.g. arc_challenge
    device: str = "cpu"
    mc_format: str = None
    mc_normalize: str = None  # cloze: None (sum of log-probs), "tokens" or "chars" (per-length average)
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
    seed: int = 0
    shifted: dict = field(default_factory=dict)  # evaluation-set name -> test records
    model: LoraModel = None
    map_guide: object = None
    trained_state: dict = field(default_factory=dict)

    def loader(self, records, shuffle=False):
        return D.make_loader(records, self.collator, self.config.batch_size, shuffle=shuffle, seed=self.seed)

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


def prepare(config, seed=0, adapter_dir=None):
    """Load the model (LoRA initialised under ``seed``) and the data of ``config``; the MAP is not yet trained.

    The data subsets and the train/validation split do not depend on ``seed``: every seed sees the same
    examples, only initialisation and training order change. With ``adapter_dir``, the LoRA is a saved
    peft adapter (``PeftModel.from_pretrained``) instead of a fresh one.
    """
    meta = D.load_meta(config.dataset, config.data_dir)
    train_all = D.load_records(config.dataset, "train", config.data_dir)
    train_all = D.subset(train_all, min(len(train_all), config.train_size), seed=0)
    train, val = D.split_train_val(train_all, val_fraction=config.val_fraction, seed=0)
    test = _test_records(config.dataset, config)
    if config.dataset in config.eval_datasets or len(set(config.eval_datasets)) != len(config.eval_datasets):
        raise ValueError(
            f"--eval-datasets {','.join(config.eval_datasets)} repeats a set or names the training set {config.dataset!r}: "
            "its rows would merge with the in-distribution ones; list each shifted set once, not the training set"
        )
    shifted = {name: _test_records(name, config) for name in config.eval_datasets}
    for name in shifted:
        if D.load_meta(name, config.data_dir)["task"] != meta["task"]:
            raise ValueError(f"evaluation set {name!r} is not a {meta['task']} dataset like {config.dataset!r}")
    torch.manual_seed(seed)  # a classification head is initialised while loading
    if meta["task"] == "classification":
        net, tok = load_pretrained(config.model, "classification", num_labels=len(meta["label_names"]), device=config.device)
        likelihood, collator = SequenceClassification(), D.ClassificationCollator(tok, config.max_length)
    else:
        net, tok = load_pretrained(config.model, "causal_lm", device=config.device)
        config.mc_format = config.mc_format or default_mc_format(net)
        if config.mc_format == "cloze":
            likelihood = MultipleChoice(format="cloze", normalize=config.mc_normalize)
            collator = D.ClozeCollator(tok, config.max_length)
        else:
            # one letter per choice of the widest set: ARC has 3-5 options, OBQA 4
            num_choices = max(len(r["choices"]) for records in [train, test, *shifted.values()] for r in records)
            likelihood = MultipleChoice(D.letter_token_ids(tok, num_choices), format="letter")
            collator = D.LetterCollator(tok, config.max_length)
    config.lr = config.lr or (2e-3 if meta["task"] == "classification" else 3e-4)
    torch.manual_seed(seed)  # the LoRA's initialisation, whatever loading drew
    if adapter_dir is None:
        net = add_lora(net, r=config.rank, alpha=config.alpha)
    else:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter_dir)
        config.rank = net.peft_config[net.active_adapter].r
    net = net.to(config.device)
    return Setup(config, net, tok, likelihood, train, val, test, collator, seed, shifted)


def _test_records(name, config):
    records = D.load_records(name, "test", config.data_dir)
    return D.subset(records, min(len(records), config.test_size), seed=0)


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
    note: str = None  # what a reader of its rows must know (e.g. temperature scaling fell back to T = 1)
    # one set of weights (MAP, zero-shot, temperature scaling): its mutual information is exactly 0, not missing.
    # None: the guide's ``deterministic`` (False without a guide)
    point_estimate: bool = None

    def __post_init__(self):
        if self.point_estimate is None:
            self.point_estimate = bool(self.guide is not None and self.guide.deterministic)


def _guide_predictor(setup, model, guide, **kwargs):
    c = setup.config
    return lambda records: predict(model, guide, setup.loader(records), num_samples=c.samples, keep_samples=True, **kwargs)


def _glm_predictor(setup, guide):
    return lambda records: guide.predict_glm(setup.loader(records), link="probit")


def _ensemble_predictor(setup, model, guide):
    from guides import predict_ensemble

    return lambda records: predict_ensemble(model, guide, setup.loader(records), keep_samples=True)


def method_map(setup):
    return Fitted(_guide_predictor(setup, setup.model, setup.map_guide), setup.map_guide)


def method_zeroshot(setup):
    """The base model without its adapter: the row every fine-tuned causal-LM method must beat."""
    if isinstance(setup.likelihood, SequenceClassification):
        raise ValueError("zeroshot needs a causal LM: an encoder's classification head is untrained without fine-tuning")

    def run(records):
        with setup.net.disable_adapter():
            return predict(setup.model, None, setup.loader(records), keep_samples=True)

    return Fitted(run, point_estimate=True)


def _svi(setup, model, guide, train_network=True):
    """Train a variational guide started at the trained MAP with the closed-form-KL ELBO."""
    c = setup.config
    fit(model, guide, setup.loader(setup.train, shuffle=True), epochs=c.epochs, lr=c.lr, elbo=TraceMeanField_ELBO(),
        train_network=train_network, progress=c.progress)
    return Fitted(_guide_predictor(setup, model, guide), guide, guide.extra_parameters())


def _std_lr_scale(setup, travel=100.0):
    """The guides' ``std_lr_scale`` for this run: Adam moves ``log sigma`` by about ``std_lr_scale * lr`` per step,
    so the stds can travel a factor ``travel`` from their start within the run (never below the guides' 10).
    With the fixed 10, the study's 12 SmolLM2 steps moved them by 0.12 in log: no spread at all (MI 0)."""
    c = setup.config
    steps = c.epochs * len(setup.loader(setup.train))
    return max(10.0, math.log(travel) / (c.lr * steps))


def method_meanfield(setup):
    """BLoB-style mean-field Gaussian, fitted post hoc: means fixed at the MAP, SVI learns the stds of A and B.
    Prior std 0.1: BLoB's 0.2 let the stds of the many directions the data leave free grow to 4x the MiniLM LoRA
    entries (accuracy -7 points on SST-2; 0.1: -2, 0.05: -3). Means fixed: on SmolLM2/ARC-E, SVI epochs that also
    trained the means from the MAP cost 1-7 accuracy points (an overfit, noisy second run); B Gaussian too: with
    A alone the spread reaches the outputs only through B's small trained entries (MI 0.0004 vs 0.003)."""
    from guides import MeanFieldGuide

    model = setup.lora_model(random="AB", prior=0.1)
    return _svi(setup, model, MeanFieldGuide(model, b="normal", std_lr_scale=_std_lr_scale(setup), learn_loc=False), train_network=False)


def method_flow(setup):
    """Bayesian-LoRA: inducing matrices with a MAF posterior over A and B, fitted post hoc around the MAP
    (``W_map`` fixed, as for mean-field). ``q(U)`` starts at 0.1 of the prior std: from the default 0.01 it
    stayed too narrow on MiniLM/SST-2 to beat MAP's ECE (3 seeds: 15.18 vs 14.88; 0.1: 14.27)."""
    from guides import FlowGuide

    model = setup.lora_model(random="AB", prior=0.1)
    guide = FlowGuide(model, init_scale=0.1, std_lr_scale=_std_lr_scale(setup), learn_loc=False)
    return _svi(setup, model, guide, train_network=False)


def method_scalabl(setup):
    """ScalaBL: the MAP rotated to A's singular basis, a Gaussian over A's log singular values, SVI with A, B."""
    from guides import ScalaBLGuide

    from .scalabl import ScalaBLModel

    setup.restore()
    model = ScalaBLModel(setup.net, setup.likelihood, num_data=len(setup.train), prior=setup.config.prior_scale)
    return _svi(setup, model, ScalaBLGuide(model))


# TFB's reference range [1e-3, 1.5e-2] was set for 8B models; small models tolerate more noise. The flip
# criterion: on an over-confident MAP the pseudo-label NLL is near zero, so its relative change blocks any noise
# (measured on MiniLM/SST-2: nll criterion sigma 0.017, ECE 12.4 vs MAP 12.7; flip 2% sigma 0.088, ECE 2.9)
TFB_SEARCH = dict(criterion="flip", tolerance=0.01, low=1e-3, high=0.2, iterations=6)
TFB_ANCHORS = 128


def method_tfb(setup):
    """Training-free Bayesianization of the MAP: sigma_q searched on anchors drawn from the training set."""
    from guides import bayesianize

    c = setup.config
    model = setup.lora_model(random="AB")
    # anchors from train, as the paper draws them: enough that a 1% flip rate allows a flip (the validation split may be 50)
    anchors = D.subset(setup.train, min(TFB_ANCHORS, len(setup.train)), seed=setup.seed)
    guide = bayesianize(model, setup.loader(anchors), num_samples=c.samples, seed=setup.seed, progress=c.progress, **TFB_SEARCH)
    return Fitted(_guide_predictor(setup, model, guide), guide, guide.extra_parameters())


def method_laplace(setup):
    """KFAC Laplace at the MAP, prior precision by the evidence, linearised (GLM) probit predictive.

    Weight samples from this posterior collapse to chance on real data (as laplace-torch's do: DESIGN.md),
    so the table reports the GLM predictive. The probit link draws no samples: its rows have no mutual
    information (n/a, with a note), not an MI of 0.
    """
    from guides import LaplaceGuide

    c = setup.config
    model = setup.lora_model(random="AB")
    if getattr(model.likelihood, "format", None) == "cloze":  # the KFAC hooks read one forward per batch
        model.likelihood = MultipleChoice(format="cloze", normalize=model.likelihood.normalize, share_prefix=False)
    guide = LaplaceGuide(model).fit(setup.loader(setup.train), progress=c.progress)
    guide.optimize_prior_precision(method="marglik")
    return Fitted(_glm_predictor(setup, guide), guide, guide.extra_parameters())


def method_temperature(setup):
    """Temperature scaling of the MAP, fitted on the validation split: the cheap non-Bayesian baseline.

    When the fit has no optimum inside its bounds (e.g. a validation split the MAP gets all right), the note
    of :func:`fit_temperature` goes into the method's rows.
    """
    from .calibration import apply_temperature, fit_temperature

    val = predict(setup.model, setup.map_guide, setup.loader(setup.val))
    t, note = fit_temperature(val.probs, val.labels, return_info=True)

    def run(records):
        out = predict(setup.model, setup.map_guide, setup.loader(records))
        out.probs = apply_temperature(out.probs, t)
        return out

    return Fitted(run, None, 1, note, point_estimate=True)


def method_mcdropout(setup, p=0.1):
    """MC dropout of the LoRA input units: a LoRA trained with that dropout from peft's init (MAP's budget)."""
    from guides import MCDropoutGuide
    from guides.ensemble import reinitialize

    c = setup.config
    model = setup.lora_model(random="AB")
    reinitialize(model, seed=setup.seed + 1)
    guide = MCDropoutGuide(model, p=p)
    fit(model, guide, setup.loader(setup.train, shuffle=True), epochs=c.epochs, lr=c.lr, progress=c.progress)
    return Fitted(_guide_predictor(setup, model, guide), guide, 0)


def method_ensemble(setup, k=3):
    """Deep ensemble: the MAP plus k-1 LoRAs (and heads) trained from other seeds, probabilities averaged."""
    from guides import train_ensemble

    c = setup.config
    model = setup.lora_model(random="AB")
    guide = train_ensemble(model, setup.loader(setup.train, shuffle=True), k=k, seeds=[setup.seed + i for i in range(k)],
                           fit_kwargs={"epochs": c.epochs, "lr": c.lr, "progress": c.progress}, include_current=True)
    return Fitted(_ensemble_predictor(setup, model, guide), guide, guide.extra_parameters())


# LoRA-XS cores start at zero and Adam moves them about one lr per step: they need ~10x LoRA's lr
LORA_XS_LR_FACTOR = 10.0


def method_blora_xs(setup, rank=10, scale=0.5, per_epoch=10):
    """B-LoRA-XS: LoRA-XS cores R (A, B from the SVD of W0) trained from zero, SWAG over the last half of training."""
    from guides import MAPGuide, SWAGCollector, SWAGGuide

    from .loraxs import LoraXSModel

    c = setup.config
    setup.restore()
    model = LoraXSModel(setup.net, setup.likelihood, num_data=len(setup.train), prior=c.prior_scale)
    map_guide, swag = MAPGuide(model), SWAGGuide(model, rank=rank, scale=scale)
    loader = setup.loader(setup.train, shuffle=True)
    collector = SWAGCollector(swag, start_epoch=c.epochs - max(1, c.epochs // 2), every=max(1, len(loader) // per_epoch))
    fit(model, map_guide, loader, epochs=c.epochs, lr=LORA_XS_LR_FACTOR * c.lr, progress=c.progress, callbacks=[collector])
    return Fitted(_guide_predictor(setup, model, swag), swag, swag.extra_parameters())


METHODS = {
    "zeroshot": method_zeroshot,
    "map": method_map,
    "meanfield": method_meanfield,
    "flow": method_flow,
    "tfb": method_tfb,
    "laplace": method_laplace,
    "temperature": method_temperature,
    "mcdropout": method_mcdropout,
    "ensemble": method_ensemble,
    "blora_xs": method_blora_xs,
    "scalabl": method_scalabl,
}


def applicable_methods(setup):
    """Every method name that applies to the setup's task (zero-shot needs a causal LM)."""
    return methods_for_task("classification" if isinstance(setup.likelihood, SequenceClassification) else "multiple_choice")


def methods_for_task(task):
    """Every method name that applies to a dataset task (``meta.json``'s ``task``): no zero-shot for classification."""
    return [m for m in METHODS if not (m == "zeroshot" and task == "classification")]


def _check_methods(names):
    unknown = [g for g in names if g not in METHODS]
    if unknown:
        raise ValueError(f"unknown guide(s) {unknown}; available: {', '.join(METHODS)}")


def _fit_method(setup, name, map_seconds):
    with PeakMemory(setup.config.device) as memory:
        t = time.perf_counter()
        fitted = METHODS[name](setup)
        fit_seconds = time.perf_counter() - t + (map_seconds if name == "map" else 0.0)
    costs = {"fit_seconds": fit_seconds, "fit_memory_mb": memory.megabytes, "extra_parameters": fitted.extra_parameters}
    if fitted.note:
        costs["note"] = fitted.note
    return fitted, costs


def _evaluate(setup, fitted, records):
    with PeakMemory(setup.config.device) as memory:
        prediction = fitted.predict(records)
    costs = {"predict_seconds_per_1000": 1000 * prediction.seconds / len(records), "predict_memory_mb": memory.megabytes}
    return prediction, costs


MI_SAMPLES_NOTE = ("mutual information n/a: one weight sample per example (--samples 1), and MI needs at least 2 "
                   "(with one sample it is 0 by construction); rerun with --samples 2 or more")
MI_NO_SAMPLES_NOTE = ("mutual information n/a: this predictive draws no weight samples (e.g. Laplace's GLM probit "
                      "link, in closed form), and MI needs several")


def _mi_samples(prediction, point_estimate):
    """The per-sample probabilities that mutual information can be computed from, and None or the reason it cannot.

    MI needs at least 2 weight samples. A point estimate (one set of weights) has MI exactly 0, whatever it kept;
    any other predictive with fewer than 2 samples (none kept: a closed-form predictive; ``S = 1``) has none: its
    MI of 0 would be the sample count speaking, not the posterior.
    """
    kept = prediction.sample_probs
    count = 0 if kept is None else kept.shape[0]
    samples = prediction.probs.unsqueeze(0) if kept is None else kept
    if count >= 2 or point_estimate:
        return samples, None
    return samples, MI_SAMPLES_NOTE if count == 1 else MI_NO_SAMPLES_NOTE


def score(prediction, num_bins=15, point_estimate=False):
    """Calibration, uncertainty and selective-prediction metrics of one :class:`Prediction`.

    ``mutual_information`` is NaN (n/a) where it cannot be computed, with the reason in ``note``: fewer than 2
    weight samples from a predictive that is not a ``point_estimate`` (whose MI is exactly 0).
    """
    p, y = prediction.probs, prediction.labels
    row = summarize(p, y, num_bins)
    samples, missing = _mi_samples(prediction, point_estimate)
    row.update(
        entropy=float(M.predictive_entropy(samples).mean()),
        mutual_information=float("nan") if missing else float(M.mutual_information(samples).mean()),
        accuracy_at_50=M.accuracy_at_coverage(p, y, 0.5),
        accuracy_at_80=M.accuracy_at_coverage(p, y, 0.8),
        aurc=M.aurc(p, y),
    )
    if missing:
        row["note"] = missing
    return row


def _ood(in_dist, shifted, point_estimate=False):
    """AUROC of telling the shifted set from the in-distribution test set by entropy and by mutual information
    (NaN, n/a, where either set's MI cannot be computed: see :func:`score`)."""
    si, missing_in = _mi_samples(in_dist, point_estimate)
    so, missing_out = _mi_samples(shifted, point_estimate)
    return {
        "ood_auroc_entropy": M.auroc(M.predictive_entropy(si), M.predictive_entropy(so)),
        "ood_auroc_mi": float("nan") if missing_in or missing_out else M.auroc(M.mutual_information(si), M.mutual_information(so)),
    }


def _row(head, *parts):
    """``head`` updated with every dict of ``parts``; their ``note`` entries joined by ``"; "`` (each once)."""
    row = dict(head)
    notes = []
    for part in parts:
        row.update(part)
        if part.get("note") and part["note"] not in notes:
            notes.append(part["note"])
    row.pop("note", None)
    if notes:
        row["note"] = "; ".join(notes)
    return row


def run_compare(config):
    """Run the comparison of ``config`` over its seeds; returns the summary rows (mean and std over seeds).

    Writes to ``config.out``: ``results.json`` (config, per-seed rows, summary), ``predictions_<guide>.npz``
    (per evaluation set and seed: averaged probabilities, labels, entropy, mutual information),
    ``reliability_<guide>.png``, ``reliability_grid.png`` and ``calibration_vs_accuracy.png``.
    """
    _check_methods(config.guides or ())
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, arrays, first_seed = [], {}, {}
    for seed in config.seeds:
        setup = prepare(config, seed)
        config.guides = tuple(config.guides or applicable_methods(setup))
        if config.progress:
            fmt = f", multiple-choice format {config.mc_format}" if config.mc_format else ""
            fmt += f" (normalized by {config.mc_normalize})" if config.mc_format == "cloze" and config.mc_normalize else ""
            print(f"# seed {seed}: {config.model} on {config.dataset}: {len(setup.train)} train / {len(setup.val)} validation / "
                  f"{len(setup.test)} test{fmt}; guides {', '.join(config.guides)}", flush=True)
        start = time.perf_counter()  # MAP's fit time is its training, not loading the model and data
        train_map(setup)
        map_seconds = time.perf_counter() - start
        for name in config.guides:
            fitted, fit_costs = _fit_method(setup, name, map_seconds)
            predictions = {}
            for dataset, records in [(config.dataset, setup.test), *setup.shifted.items()]:
                prediction, costs = _evaluate(setup, fitted, records)
                predictions[dataset] = prediction
                row = _row({"guide": name, "dataset": dataset, "seed": seed}, score(prediction, point_estimate=fitted.point_estimate),
                           fit_costs, costs)
                if dataset != config.dataset:
                    row.update(_ood(predictions[config.dataset], prediction, fitted.point_estimate))
                rows.append(row)
                arrays.setdefault(name, {}).update(_arrays(prediction, dataset, seed, fitted.point_estimate))
                if config.progress:
                    print(format_row(row), flush=True)
            if seed == config.seeds[0]:
                first_seed[name] = predictions[config.dataset]
            setup.restore()
    summary = summarize_seeds(rows)
    if not is_main():
        return summary
    for name, prediction in first_seed.items():
        reliability_diagram(prediction.probs, prediction.labels, out / f"reliability_{name}.png", title=f"{name} on {config.dataset}")
        with atomic_file(out / f"predictions_{name}.npz", "wb") as f:  # a kill mid-write leaves the old file
            np.savez_compressed(f, **arrays[name])
    _summary_figures(out, summary, {n: (p.probs, p.labels) for n, p in first_seed.items()}, config.dataset)
    write_json(out / "results.json", {"config": asdict(config), "summary": summary, "per_seed": rows})
    return summary


def _summary_figures(out, summary, first_seed, dataset):
    """The run's reliability grid (first seed, ``first_seed``: guide -> (probs, labels)) and calibration-vs-accuracy plot."""
    reliability_grid(first_seed, out / "reliability_grid.png")
    metric_scatter([r for r in summary if r["dataset"] == dataset], out / "calibration_vs_accuracy.png")


def merge_results(out, update):
    """Replace the rows of some guides in the run ``out`` by those of the run ``update`` (a rerun of just those
    guides, e.g. after a change to them, with otherwise the same configuration); returns the merged summary.

    Copies the updated guides' ``predictions_*.npz`` and ``reliability_*.png``, redraws the run's two summary
    figures and rewrites ``out/results.json`` (atomically), guides in the original order, new ones last.
    """
    out, update = Path(out), Path(update)
    base, new = (json.loads((d / "results.json").read_text()) for d in (out, update))
    differ = sorted(k for k in set(base["config"]) | set(new["config"])
                    if k not in ("guides", "out", "progress") and base["config"].get(k) != new["config"].get(k))
    if differ:
        raise ValueError(f"cannot merge {update} into {out}: their configurations differ in {', '.join(differ)}")
    updated = list(new["config"]["guides"])
    guides = list(base["config"]["guides"]) + [g for g in updated if g not in base["config"]["guides"]]
    order = {g: i for i, g in enumerate(guides)}
    rows = sorted([r for r in base["per_seed"] if r["guide"] not in updated] + new["per_seed"], key=lambda r: order[r["guide"]])
    for name in updated:
        for kind in ("predictions_{}.npz", "reliability_{}.png"):
            with atomic_file(out / kind.format(name), "wb") as f:
                f.write((update / kind.format(name)).read_bytes())
    summary = summarize_seeds(rows)
    config = {**base["config"], "guides": guides}
    key = f"{config['dataset']}__seed{config['seeds'][0]}__"
    first_seed = {}
    for name in guides:
        with np.load(out / f"predictions_{name}.npz") as arrays:
            first_seed[name] = (torch.from_numpy(arrays[key + "probs"]), torch.from_numpy(arrays[key + "labels"]))
    _summary_figures(out, summary, first_seed, config["dataset"])
    write_json(out / "results.json", {"config": config, "summary": summary, "per_seed": rows})
    return summary


def _arrays(prediction, dataset, seed, point_estimate=False):
    """The npz arrays of one evaluation; mutual information all NaN where it cannot be computed (see :func:`score`)."""
    samples, missing = _mi_samples(prediction, point_estimate)
    key = f"{dataset}__seed{seed}__"
    mi = M.mutual_information(samples).numpy() if not missing else np.full(len(prediction.labels), np.nan)
    return {
        key + "probs": prediction.probs.numpy(),
        key + "labels": prediction.labels.numpy(),
        key + "entropy": M.predictive_entropy(samples).numpy(),
        key + "mutual_information": mi,
    }


def summarize_seeds(rows):
    """Mean and std over seeds of every numeric column, per (guide, evaluation set): ``x`` and ``x_std``.

    The seeds' ``note`` entries are kept: ``"seeds 0, 2: <note>"`` per distinct note, joined by ``"; "``.
    A value that is not available (NaN, or None: JSON null) in any seed makes the column's mean and std NaN:
    n/a, not a mean over the seeds that happen to have it. NaN is written to ``results.json`` as ``NaN``.
    """
    groups = {}
    for r in rows:
        groups.setdefault((r["guide"], r["dataset"]), []).append(r)
    summary = []
    for (guide, dataset), group in groups.items():
        row = {"guide": guide, "dataset": dataset, "seeds": [r["seed"] for r in group]}
        notes = {}
        for r in group:
            if r.get("note"):
                notes.setdefault(r["note"], []).append(str(r["seed"]))
        if notes:
            row["note"] = "; ".join(f"seed{'s' * (len(s) > 1)} {', '.join(s)}: {n}" for n, s in notes.items())
        for key in group[0]:
            if key in ("guide", "dataset", "seed", "note"):
                continue
            values = np.array([r[key] for r in group], dtype=float)  # None (JSON null) -> NaN
            row[key] = float(values.mean())
            row[key + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary.append(row)
    return summary


def fit_one(config):
    """Train MAP, fit the one guide of ``config`` and save it to ``out/guide`` (``out/run.json`` rebuilds the model)."""
    _check_methods(config.guides)
    (name,) = config.guides
    setup = prepare(config, config.seeds[0])
    start = time.perf_counter()
    train_map(setup)
    fitted, costs = _fit_method(setup, name, time.perf_counter() - start)
    prediction, predict_costs = _evaluate(setup, fitted, setup.test)
    row = _row({"guide": name, "dataset": config.dataset}, score(prediction, point_estimate=fitted.point_estimate), costs, predict_costs)
    if fitted.guide is None:
        raise ValueError(f"method {name!r} has no guide to save")
    out = Path(config.out)
    save_guide(fitted.guide, out / "guide")
    random = "".join(sorted({s.matrix for s in fitted.guide.sites.values()}))
    write_json(out / "run.json", {"config": asdict(config), "random": random, "result": row})
    return row


def bayesianize_adapter(config, adapter_dir, anchors=256, **search):
    """TFB on a saved peft adapter: search sigma_q on ``anchors`` training examples, score the test set,
    save the guide to ``out/guide`` (``pyro-lora evaluate out`` reloads it)."""
    from guides import bayesianize

    setup = prepare(config, config.seeds[0], adapter_dir=adapter_dir)
    setup.model = LoraModel(setup.net, setup.likelihood, random="AB", num_data=len(setup.train), prior=config.prior_scale)
    anchor_records = D.subset(setup.train, min(anchors, len(setup.train)), seed=0)
    search.setdefault("num_samples", config.samples)
    with PeakMemory(config.device) as memory:
        t = time.perf_counter()
        guide = bayesianize(setup.model, setup.loader(anchor_records), progress=config.progress, **search)
    costs = {"fit_seconds": time.perf_counter() - t, "fit_memory_mb": memory.megabytes, "extra_parameters": guide.extra_parameters()}
    prediction, predict_costs = _evaluate(setup, Fitted(_guide_predictor(setup, setup.model, guide)), setup.test)
    row = _row({"guide": "tfb", "dataset": config.dataset}, score(prediction, point_estimate=guide.deterministic), costs, predict_costs,
               {"sigma_q": float(guide.sigma_q)})
    out = Path(config.out)
    save_guide(guide, out / "guide")
    write_json(out / "run.json", {"config": asdict(config), "random": "AB", "adapter": str(adapter_dir), "result": row})
    return row


def evaluate_saved(run_dir, **overrides):
    """Score the guide saved by :func:`fit_one` or :func:`bayesianize_adapter` in ``run_dir`` on its test set
    (``overrides`` change the config)."""
    run_dir = Path(run_dir)
    try:
        run = json.loads((run_dir / "run.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir} is not a `pyro-lora fit` output (run.json missing)") from None
    config = CompareConfig(**{**run["config"], **overrides})
    # the saved adapter, if any, brings its own rank, alpha, targets and head
    setup = prepare(config, config.seeds[0], adapter_dir=run.get("adapter"))
    if run["random"] == "R":  # LoRA-XS: A, B are the deterministic SVD of W0, not saved with the guide
        from .loraxs import LoraXSModel

        setup.model = LoraXSModel(setup.net, setup.likelihood, num_data=len(setup.train), prior=config.prior_scale)
    elif run["random"] == "S":  # ScalaBL: the trained A, B are point parameters the guide file restores
        from .scalabl import ScalaBLModel

        setup.model = ScalaBLModel(setup.net, setup.likelihood, rotate=False, num_data=len(setup.train), prior=config.prior_scale)
    else:
        setup.model = LoraModel(setup.net, setup.likelihood, random=run["random"], num_data=len(setup.train), prior=config.prior_scale)
    guide = load_guide(run_dir / "guide", setup.model)
    prediction, costs = _evaluate(setup, Fitted(_saved_predictor(setup, guide)), setup.test)
    return _row({"guide": config.guides[0], "dataset": config.dataset}, score(prediction, point_estimate=guide.deterministic),
                costs, {"extra_parameters": guide.extra_parameters()})


def _saved_predictor(setup, guide):
    """The predictive ``compare`` reports for the method of ``guide``: Laplace's GLM probit, an ensemble's exact
    mixture with its members' heads, else weight samples."""
    from guides import EnsembleGuide, LaplaceGuide

    if isinstance(guide, LaplaceGuide):
        return _glm_predictor(setup, guide)
    if isinstance(guide, EnsembleGuide):
        return _ensemble_predictor(setup, setup.model, guide)
    return _guide_predictor(setup, setup.model, guide)


def write_json(path, obj):
    """Write ``obj`` as JSON atomically (temp file + rename); only the main rank writes."""
    if not is_main():
        return
    with atomic_file(path) as f:
        f.write(json.dumps(obj, indent=2, default=str))


TABLE = [("accuracy", "accuracy", 3), ("ece", "ECE x100", 2), ("nll", "NLL", 3), ("brier", "Brier", 3),
         ("mutual_information", "MI", 4), ("aurc", "AURC", 3), ("fit_seconds", "fit s", 1),
         ("predict_seconds_per_1000", "predict s/1k", 1), ("fit_memory_mb", "peak MB", 0), ("extra_parameters", "+params", 0)]


def format_table(rows):
    """Markdown table, one row per (guide, evaluation set); ``mean ± std`` where rows carry ``_std``.

    Rows with a ``note`` are marked ``(note)`` and their notes listed under the table. A value that is not
    available (NaN or None: e.g. the mutual information of a predictive without weight samples) reads ``n/a``.
    """
    head = "| guide | dataset | " + " | ".join(t for _, t, _ in TABLE) + " | OOD AUROC H / MI |"
    lines = [head, "|" + "---|" * (len(TABLE) + 3)]
    notes = [f"Note ({r['guide']} on {r['dataset']}): {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines + [format_row(r) for r in rows] + ([""] + notes if notes else []))


def _not_available(value):
    """None (JSON null) or NaN: a value the run could not compute (see :func:`score`)."""
    return value is None or (isinstance(value, numbers.Real) and math.isnan(value))


def format_row(r):
    def number(key, digits):
        return "n/a" if _not_available(r[key]) else f"{r[key]:.{digits}f}"

    def cell(key, digits):
        if key not in r:  # not measured here (evaluate does not fit)
            return ""
        std = r.get(key + "_std")
        return number(key, digits) + (f" ± {std:.{digits}f}" if std and not _not_available(std) and not _not_available(r[key]) else "")

    ood = f"{number('ood_auroc_entropy', 3)} / {number('ood_auroc_mi', 3)}" if "ood_auroc_entropy" in r else ""
    guide = r["guide"] + (" (note)" if r.get("note") else "")
    return f"| {guide} | {r['dataset']} | " + " | ".join(cell(k, d) for k, _, d in TABLE) + f" | {ood} |"
