"""``pyro-lora compare``: train a MAP LoRA once, Bayesianize it with several methods, score all on one test set.

This is the application layer: the only part of ``pyro_lora`` that imports :mod:`guides`.
"""

import json
import math
import numbers
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import TraceMeanField_ELBO

from .. import data as D
from ..likelihoods import MultipleChoice, SequenceClassification
from .. import metrics as M
from ..costs import PeakMemory
from ..distributed import is_main
from ..io import load_guide, read_safetensors, recover_directory, save_guide, writable_folder
from ..metrics import summarize
from ..model import LoraModel
from ..predictive import predict
from .results import RESULTS, RunFolder
from ..pretrained import add_lora, default_mc_format, load_adapter, load_pretrained, max_positions
from ..training import fit


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

    @property
    def sizes(self):
        """Examples used per split: train, validation, test and each shifted test set."""
        return {"train": len(self.train), "validation": len(self.val), "test": len(self.test),
                **{f"test {name}": len(records) for name, records in self.shifted.items()}}

    def loader(self, records, shuffle=False):
        return D.make_loader(records, self.collator, self.config.batch_size, shuffle=shuffle, seed=self.seed)

    def lora_model(self, random="AB", **kwargs):
        """A fresh :class:`LoraModel` view of the shared network, reset to the trained MAP state."""
        self.restore()
        kwargs.setdefault("prior", self.config.prior_scale)
        kwargs.setdefault("likelihood", self.likelihood)
        return LoraModel(self.net, random=random, num_data=len(self.train), **kwargs)

    def restore(self):
        """Put the MAP adapter and head back: each method starts from the same trained network."""
        with torch.no_grad():
            params = dict(self.net.named_parameters())
            for k, v in self.trained_state.items():
                params[k].copy_(v)


def prepare(config, seed=0, adapter_dir=None):
    """Load the model (LoRA initialised under ``seed``) and the data of ``config``; the MAP is not yet trained.

    Sets what ``config`` left to defaults (``lr``, ``mc_format``); ``Setup.sizes`` are the sizes actually used
    (at most those requested). :func:`check_config` refuses first a configuration that cannot run.

    The data subsets and the train/validation split do not depend on ``seed``: every seed sees the same
    examples, only initialisation and training order change. With ``adapter_dir``, the LoRA is a saved
    peft adapter (``PeftModel.from_pretrained``) instead of a fresh one.
    """
    meta = D.load_meta(config.dataset, config.data_dir)
    train_all = D.load_records(config.dataset, "train", config.data_dir)
    train_all = D.subset(train_all, min(len(train_all), config.train_size), seed=0)
    if len(train_all) < 2:
        raise ValueError(f"dataset {config.dataset!r} has {len(train_all)} training record: at least 2 are needed to carve "
                         "a validation split from them")
    train, val = D.split_train_val(train_all, val_fraction=config.val_fraction, seed=0)
    test = _test_records(config.dataset, config)
    shifted = {name: _test_records(name, config) for name in config.eval_datasets}
    torch.manual_seed(seed)  # a classification head is initialised while loading
    if meta["task"] == "classification":
        net, tok = load_pretrained(config.model, "classification", num_labels=len(meta["label_names"]), device=config.device,
                                   progress=config.progress)
        likelihood, collator = SequenceClassification(), D.ClassificationCollator(tok, config.max_length)
    else:
        net, tok = load_pretrained(config.model, "causal_lm", device=config.device, progress=config.progress)
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
        net = load_adapter(net, adapter_dir)
        config.rank = net.peft_config[net.active_adapter].r
    net = net.to(config.device)
    return Setup(config, net, tok, likelihood, train, val, test, collator, seed, shifted)


def _test_records(name, config):
    records = D.load_records(name, "test", config.data_dir)
    return D.subset(records, min(len(records), config.test_size), seed=0)


def train_map(setup):
    """Fine-tune the MAP LoRA (plain LoRA through the Pyro model) and remember its trained state."""
    from ..guides import MAPGuide

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
    from ..guides import predict_ensemble

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


POST_HOC_PRIOR = 0.1  # the prior std of the post-hoc mean-field and flow guides (method_meanfield says why)


def _post_hoc_note(setup, fitted):
    """``fitted`` with a note where ``--prior-scale`` set another prior than the default, which these guides ignore."""
    if setup.config.prior_scale not in (CompareConfig.prior_scale, POST_HOC_PRIOR):
        fitted.note = (f"prior std {POST_HOC_PRIOR} (the post-hoc guides fix it; --prior-scale "
                       f"{setup.config.prior_scale:g} applies to the MAP and the other methods)")
    return fitted


def method_meanfield(setup):
    """BLoB-style mean-field Gaussian, fitted post hoc: means fixed at the MAP, SVI learns the stds of A and B.
    Prior std 0.1: BLoB's 0.2 let the stds of the many directions the data leave free grow to 4x the MiniLM LoRA
    entries (accuracy -7 points on SST-2; 0.1: -2, 0.05: -3). Means fixed: on SmolLM2/ARC-E, SVI epochs that also
    trained the means from the MAP cost 1-7 accuracy points (an overfit, noisy second run); B Gaussian too: with
    A alone the spread reaches the outputs only through B's small trained entries (MI 0.0004 vs 0.003)."""
    from ..guides import MeanFieldGuide

    model = setup.lora_model(random="AB", prior=POST_HOC_PRIOR)
    guide = MeanFieldGuide(model, b="normal", std_lr_scale=_std_lr_scale(setup), learn_loc=False)
    return _post_hoc_note(setup, _svi(setup, model, guide, train_network=False))


def method_flow(setup):
    """Bayesian-LoRA: inducing matrices with a MAF posterior over A and B, fitted post hoc around the MAP
    (``W_map`` fixed, as for mean-field). ``q(U)`` starts at 0.1 of the prior std: from the default 0.01 it
    stayed too narrow on MiniLM/SST-2 to beat MAP's ECE (3 seeds: 15.18 vs 14.88; 0.1: 14.27)."""
    from ..guides import FlowGuide

    model = setup.lora_model(random="AB", prior=POST_HOC_PRIOR)
    guide = FlowGuide(model, init_scale=0.1, std_lr_scale=_std_lr_scale(setup), learn_loc=False)
    return _post_hoc_note(setup, _svi(setup, model, guide, train_network=False))


def method_scalabl(setup):
    """ScalaBL: the MAP rotated to A's singular basis, a Gaussian over A's log singular values, SVI with A, B."""
    from ..guides import ScalaBLGuide

    from ..scalabl import ScalaBLModel

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
    from ..guides import bayesianize

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
    from ..guides import LaplaceGuide

    c = setup.config
    model = setup.lora_model(random="AB", likelihood=_kfac_likelihood(setup.likelihood))
    guide = LaplaceGuide(model).fit(setup.loader(setup.train), progress=c.progress)
    guide.optimize_prior_precision(method="marglik")
    return Fitted(_glm_predictor(setup, guide), guide, guide.extra_parameters())


def _kfac_likelihood(likelihood):
    """``likelihood`` as Laplace's KFAC hooks need it: a cloze likelihood runs one forward per batch (no shared
    prefix); scores are the same."""
    if getattr(likelihood, "format", None) == "cloze":
        return MultipleChoice(format="cloze", normalize=likelihood.normalize, share_prefix=False)
    return likelihood


def method_temperature(setup):
    """Temperature scaling of the MAP, fitted on the validation split: the cheap non-Bayesian baseline.

    When the fit has no optimum inside its bounds (e.g. a validation split the MAP gets all right), the note
    of :func:`fit_temperature` goes into the method's rows.
    """
    from ..calibration import apply_temperature, fit_temperature

    val = predict(setup.model, setup.map_guide, setup.loader(setup.val))
    t, note = fit_temperature(val.probs, val.labels, return_info=True)

    def run(records):
        out = predict(setup.model, setup.map_guide, setup.loader(records))
        out.probs = apply_temperature(out.probs, t)
        return out

    return Fitted(run, None, 1, note, point_estimate=True)


def method_mcdropout(setup, p=0.1):
    """MC dropout of the LoRA input units: a LoRA trained with that dropout from peft's init (MAP's budget)."""
    from ..guides import MCDropoutGuide
    from ..guides.ensemble import reinitialize

    c = setup.config
    model = setup.lora_model(random="AB")
    reinitialize(model, seed=setup.seed + 1)
    guide = MCDropoutGuide(model, p=p)
    fit(model, guide, setup.loader(setup.train, shuffle=True), epochs=c.epochs, lr=c.lr, progress=c.progress)
    return Fitted(_guide_predictor(setup, model, guide), guide, 0)


def method_ensemble(setup, k=3):
    """Deep ensemble: the MAP plus k-1 LoRAs (and heads) trained from other seeds, probabilities averaged."""
    from ..guides import train_ensemble

    c = setup.config
    model = setup.lora_model(random="AB")
    guide = train_ensemble(model, setup.loader(setup.train, shuffle=True), k=k, seeds=[setup.seed + i for i in range(k)],
                           fit_kwargs={"epochs": c.epochs, "lr": c.lr, "progress": c.progress}, include_current=True)
    return Fitted(_ensemble_predictor(setup, model, guide), guide, guide.extra_parameters())


# LoRA-XS cores start at zero and Adam moves them about one lr per step: they need ~10x LoRA's lr
LORA_XS_LR_FACTOR = 10.0


def method_blora_xs(setup, rank=10, scale=0.5, per_epoch=10):
    """B-LoRA-XS: LoRA-XS cores R (A, B from the SVD of W0) trained from zero, SWAG over the last half of training."""
    from ..guides import MAPGuide, SWAGCollector, SWAGGuide

    from ..loraxs import LoraXSModel

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


def check_config(config, guides=None, writes=True):
    """Refuse, before any model is loaded, a ``config`` that cannot run; returns the dataset's task.

    Checks the methods (``guides``, default ``config.guides``) exist and apply to the task, the datasets and
    shifted sets exist with one task the model can take, the multiple-choice settings apply, the training set
    can be split, ``max_length`` fits the model's positions, the device exists and (with ``writes``)
    ``config.out`` can be written.

    :raises ValueError: naming what is wrong (with its command-line flag) and what to do.
    """
    guides = config.guides if guides is None else guides
    _check_methods(guides or ())
    _check_numbers(config)
    task = D.load_meta(config.dataset, config.data_dir)["task"]
    if config.model == "minilm" and task != "classification":
        raise ValueError(f"--model minilm is an encoder for classification sets, and --dataset {config.dataset} is a {task} "
                         "set: use --model smollm2 (or a causal LM folder)")
    if task == "classification" and (config.mc_format or config.mc_normalize):
        raise ValueError(f"--mc-format / --mc-normalize apply to multiple-choice sets, and --dataset {config.dataset} is a "
                         "classification set: leave them out")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    if guides and "zeroshot" in guides and task == "classification":
        raise ValueError(f"zeroshot needs a causal LM task: {config.dataset!r} is a classification set, whose head is "
                         "untrained without fine-tuning; leave zeroshot out")
    if config.dataset in config.eval_datasets or len(set(config.eval_datasets)) != len(config.eval_datasets):
        raise ValueError(
            f"--eval-datasets {','.join(config.eval_datasets)} repeats a set or names the training set {config.dataset!r}: "
            "its rows would merge with the in-distribution ones; list each shifted set once, not the training set"
        )
    for name in config.eval_datasets:
        if D.load_meta(name, config.data_dir)["task"] != task:
            raise ValueError(f"evaluation set {name!r} is not a {task} dataset like {config.dataset!r}")
    if config.train_size < 2:
        raise ValueError(f"--train-size {config.train_size} cannot be split into training and validation examples: use 2 or more")
    limit = max_positions(config.model)
    if limit is not None and config.max_length > limit:
        raise ValueError(f"--max-length {config.max_length} is beyond {config.model}'s {limit} positions: use at most {limit}")
    if writes:
        writable_folder(config.out)
    return task


# setting -> (its flag, smallest value, whether that value is allowed): the CLI's bounds, for configs from Python
# or from a run record
_BOUNDS = {"train_size": ("--train-size", 2, True), "test_size": ("--test-size", 1, True), "samples": ("--samples", 1, True),
           "epochs": ("--epochs", 0, True), "batch_size": ("--batch-size", 1, True), "rank": ("--rank", 1, True),
           "max_length": ("--max-length", 8, True), "lr": ("--lr", 0, False), "prior_scale": ("--prior-scale", 0, False),
           "alpha": ("alpha", 0, False)}


def _check_numbers(config):
    """Refuse a size, count or scale out of range, or a device that is none of cpu, cuda, naming the setting."""
    for key, (flag, low, inclusive) in _BOUNDS.items():
        value = getattr(config, key)
        if value is None and key == "lr":  # resolved by the task
            continue
        integer = key not in ("lr", "prior_scale", "alpha")
        number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise ValueError(f"{flag} {value!r} must be {'an integer' if integer else 'a number'} "
                             f"{'>=' if inclusive else '>'} {low}")
    seeds = config.seeds
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32 for x in seeds):
        raise ValueError(f"seeds {seeds!r} must be integers in [0, 2**32)")
    if str(config.device).split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device {config.device!r} is none of cpu, cuda")


def _seed_for(seed, name, stage):
    """Seed every global RNG from (run seed, method, stage): a method's numbers do not depend on which methods
    ran before it, so a resumed run, or one where another method failed, gives the rows of a full run."""
    pyro.set_rng_seed(zlib.crc32(f"{seed}/{name}/{stage}".encode()))


def _fit_method(setup, name, map_seconds):
    _seed_for(setup.seed, name, "fit")
    with PeakMemory(setup.config.device) as memory:
        t = time.perf_counter()
        fitted = METHODS[name](setup)
        fit_seconds = time.perf_counter() - t + (map_seconds if name == "map" else 0.0)
    costs = {"fit_seconds": fit_seconds, "fit_memory_mb": memory.megabytes, "extra_parameters": fitted.extra_parameters}
    if fitted.note:
        costs["note"] = fitted.note
    return fitted, costs


def _evaluate(setup, fitted, records, name, dataset):
    """Predict ``records`` with ``fitted`` (the guide ``name``) under a seed of its own; returns the prediction and
    its costs."""
    _seed_for(setup.seed, name, f"predict {dataset}")
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


def run_compare(config, overwrite=False):
    """Run the comparison of ``config`` over its seeds; returns the summary rows (mean and std over seeds).

    Writes to ``config.out`` as each (guide, seed) finishes (:class:`~pyro_lora.experiments.results.RunFolder`):
    ``results.json`` (config, per-seed rows, summary, failed guides), ``predictions_<guide>.npz`` (per evaluation
    set and seed: averaged probabilities, labels, entropy, mutual information), ``reliability_<guide>.png``,
    ``reliability_grid.png`` and ``calibration_vs_accuracy.png``. A guide that fails is recorded with its error and
    the others go on. A rerun of the same configuration into the same folder resumes: it skips what finished.

    :param overwrite: replace a run of another configuration in ``config.out`` (otherwise refused).
    :raises ValueError: for a configuration that cannot run (:func:`check_config`), before loading anything.
    :raises GuideFailures: at the end, if some guide failed; every other one is written.
    """
    task = check_config(config)
    config.guides = tuple(config.guides or methods_for_task(task))
    config.data_dir = str(D.resolve_data_dir(config.data_dir))  # the folder used, whatever chose it
    run = RunFolder(config.out, config, overwrite=overwrite)
    datasets = [config.dataset, *config.eval_datasets]
    say = print if is_main() else (lambda *a, **k: None)
    for seed in config.seeds:
        todo = [g for g in config.guides if not run.complete(g, seed, datasets)]
        if len(todo) < len(config.guides):
            done = ", ".join(g for g in config.guides if g not in todo)
            say(f"# seed {seed}: {done} already complete in {run.out / RESULTS}: skipped", flush=True)
        if not todo:
            continue
        setup = prepare(config, seed)
        if config.progress:
            fmt = f", multiple-choice format {config.mc_format}" if config.mc_format else ""
            fmt += f" (normalized by {config.mc_normalize})" if config.mc_format == "cloze" and config.mc_normalize else ""
            print(f"# seed {seed}: {config.model} on {config.dataset}: {len(setup.train)} train / {len(setup.val)} validation / "
                  f"{len(setup.test)} test{fmt}; guides {', '.join(todo)}", flush=True)
        run.sizes = setup.sizes
        start = time.perf_counter()  # MAP's fit time is its training, not loading the model and data
        try:
            train_map(setup)
        except Exception as error:  # noqa: BLE001 -- recorded for every guide of this seed; the next seed goes on
            for name in todo:
                run.fail(name, seed, RuntimeError(f"training the MAP every guide starts from failed: {type(error).__name__}: {error}"))
            say(f"# seed {seed}: training the MAP failed ({error}); its guides are recorded as failed", flush=True)
            continue
        map_seconds = time.perf_counter() - start
        for name in todo:
            try:
                rows, arrays, first = _run_method(setup, name, map_seconds)
            except Exception as error:  # noqa: BLE001 -- recorded; the other guides go on
                run.fail(name, seed, error)
                say(f"# {name} (seed {seed}) failed: {type(error).__name__}: {error}", flush=True)
                continue
            finally:
                setup.restore()
            run.add(name, seed, rows, arrays, first)
            if config.progress:
                for row in rows:
                    print(format_row(row), flush=True)
    run.redraw()
    run.raise_failures()
    return run.summary()


def _run_method(setup, name, map_seconds):
    """Fit method ``name`` on ``setup`` and score it on every evaluation set; returns its rows, npz arrays and the
    in-distribution ``(probs, labels)`` for its reliability diagram."""
    config, seed = setup.config, setup.seed
    fitted, fit_costs = _fit_method(setup, name, map_seconds)
    rows, arrays, predictions = [], {}, {}
    for dataset, records in [(config.dataset, setup.test), *setup.shifted.items()]:
        prediction, costs = _evaluate(setup, fitted, records, name, dataset)
        predictions[dataset] = prediction
        row = _row({"guide": name, "dataset": dataset, "seed": seed}, score(prediction, point_estimate=fitted.point_estimate),
                   fit_costs, costs)
        if dataset != config.dataset:
            row.update(_ood(predictions[config.dataset], prediction, fitted.point_estimate))
        rows.append(row)
        arrays.update(_arrays(prediction, dataset, seed, fitted.point_estimate))
    first = predictions[config.dataset]
    return rows, arrays, (first.probs, first.labels)


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


UNSAVEABLE = ("temperature", "zeroshot")  # no guide to save: compare reports them
# the guide class each saveable method saves: evaluate refuses a run record whose method did not save its guide
GUIDE_CLASSES = {"map": "MAPGuide", "meanfield": "MeanFieldGuide", "flow": "FlowGuide", "tfb": "TFBGuide",
                 "laplace": "LaplaceGuide", "mcdropout": "MCDropoutGuide", "ensemble": "EnsembleGuide",
                 "blora_xs": "SWAGGuide", "scalabl": "ScalaBLGuide"}
# methods whose posterior mean is a predictor of plain A, B LoRA matrices, which a peft adapter holds
EXPORTABLE = ("map", "meanfield", "flow", "tfb", "laplace", "mcdropout")


def fit_one(config, adapter=False):
    """Train MAP, fit the one guide of ``config`` and save it, with the run's record, to ``out/guide`` as one unit
    (``guide.json``, ``guide.safetensors``, ``run.json``: ``pyro-lora evaluate out`` reproduces the row).

    :param adapter: also write the posterior mean as a peft adapter folder ``out/guide/adapter``, in the same unit
        (``PeftModel.from_pretrained`` and ``pyro-lora bayesianize`` take it).
    :raises ValueError: before loading anything, for a configuration that cannot run, a method with no guide to
        save, or ``adapter`` with a method whose mean is no LoRA adapter.
    """
    (name,) = config.guides
    if name in UNSAVEABLE:
        raise ValueError(f"method {name!r} has no guide to save; `pyro-lora compare --guides {name}` reports it")
    if adapter and name not in EXPORTABLE:
        raise ValueError(f"method {name!r} has no posterior mean to write as a peft adapter (an ensemble's averaged members, "
                         f"LoRA-XS cores or ScalaBL scales are no plain LoRA); methods that have one: {', '.join(EXPORTABLE)}")
    check_config(config)
    _check_free(config.out, "guide")
    seed = config.seeds[0]
    setup = prepare(config, seed)
    start = time.perf_counter()
    train_map(setup)
    fitted, costs = _fit_method(setup, name, time.perf_counter() - start)
    predictive, predictor = _saved_predictor(setup, fitted.guide)
    prediction, predict_costs = _evaluate(setup, Fitted(predictor), setup.test, name, config.dataset)
    row = _row({"guide": name, "dataset": config.dataset}, score(prediction, point_estimate=fitted.point_estimate), costs, predict_costs)
    random = "".join(sorted({s.matrix for s in fitted.guide.sites.values()}))
    save_guide(fitted.guide, Path(config.out) / "guide", adapter=adapter,
               run=_run_record(setup, row, predictive, random=random, prior=float(fitted.guide.model.prior)))
    return row


def _run_record(setup, row, predictive, **extra):
    """``run.json``: what :func:`evaluate_saved` needs to rebuild the model and reproduce ``row`` (the datasets
    folder absolute, so that it is found from any working directory)."""
    config = {**asdict(setup.config), "data_dir": str(D.resolve_data_dir(setup.config.data_dir))}
    return {"config": config, "sizes": setup.sizes, "seed": setup.seed, "predictive": predictive, **extra, "result": row}


def _check_free(out, *names):
    """Refuse a file or a link where a folder ``out/<name>`` will be written (it would be moved aside, out of sight)."""
    for name in names:
        path = Path(out) / name
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            kind = "a link" if path.is_symlink() else "a file"
            raise ValueError(f"{path} is {kind}, where the {name} folder goes: move it or choose another --out")
        if path.is_dir() and any(path.iterdir()) and not (path / "guide.json").is_file():
            raise ValueError(f"{path} is a folder that holds no saved guide, where the {name} folder goes (saving would "
                             "replace it): move it or choose another --out")


def bayesianize_adapter(config, adapter_dir, anchors=256, **search):
    """TFB on a saved peft adapter: search sigma_q on ``anchors`` training examples, score the test set,
    save the guide with the run's record to ``out/guide`` (``pyro-lora evaluate out`` reloads it).

    :raises ValueError: before loading the model, for a configuration that cannot run or a folder that holds no
        peft adapter.
    """
    from ..guides import bayesianize

    task = check_config(config, guides=(), writes=False)
    _check_adapter_dir(adapter_dir, task)
    writable_folder(config.out)
    _check_free(config.out, "guide")
    setup = prepare(config, config.seeds[0], adapter_dir=adapter_dir)
    setup.model = LoraModel(setup.net, setup.likelihood, random="AB", num_data=len(setup.train), prior=config.prior_scale)
    anchor_records = D.subset(setup.train, min(anchors, len(setup.train)), seed=0)
    search.setdefault("num_samples", config.samples)
    _seed_for(setup.seed, "tfb", "fit")
    with PeakMemory(config.device) as memory:
        t = time.perf_counter()
        guide = bayesianize(setup.model, setup.loader(anchor_records), progress=config.progress, **search)
    costs = {"fit_seconds": time.perf_counter() - t, "fit_memory_mb": memory.megabytes, "extra_parameters": guide.extra_parameters()}
    predictive, predictor = _saved_predictor(setup, guide)
    prediction, predict_costs = _evaluate(setup, Fitted(predictor), setup.test, "tfb", config.dataset)
    row = _row({"guide": "tfb", "dataset": config.dataset}, score(prediction, point_estimate=guide.deterministic), costs, predict_costs,
               {"sigma_q": float(guide.sigma_q)})
    # the adapter travels inside the unit (as the guide's mean, which TFB keeps at the adapter's values): the folder
    # can be shared and evaluated without the original adapter
    save_guide(guide, Path(config.out) / "guide", adapter=True,
               run=_run_record(setup, row, predictive, random="AB", prior=config.prior_scale, adapter="adapter"))
    return row


def _check_adapter_dir(adapter_dir, task):
    """Refuse, before loading the model, a folder that is no readable peft adapter: its config and weights file
    present and readable, every weight finite, and for a classification set its trained head."""
    path = Path(adapter_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file: give the adapter folder that holds adapter_config.json")
    try:
        adapter = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} holds no peft adapter (adapter_config.json missing): give the folder that "
                         "`save_pretrained` of a peft model (or `pyro-lora fit --adapter`) wrote") from None
    except ValueError as error:
        raise ValueError(f"{path}/adapter_config.json is not valid JSON ({error})") from None
    if adapter.get("peft_type") != "LORA" or adapter.get("use_dora"):
        kind = "a DoRA adapter" if adapter.get("use_dora") else f"an adapter of type {adapter.get('peft_type')}"
        raise ValueError(f"{path} holds {kind}: a posterior over LoRA needs a plain LoRA adapter (no DoRA or other "
                         "variants: their extra parameters would be left out of the posterior)")
    rank, alpha = adapter.get("r"), adapter.get("lora_alpha", 8)
    if not (isinstance(rank, int) and rank >= 1 and isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"{path}/adapter_config.json has r {rank!r} and lora_alpha {alpha!r}: a LoRA needs r >= 1 and lora_alpha > 0")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{weights} is missing: the adapter folder holds no weights (peft would look for them online)")
    tensors = read_safetensors(weights)
    if task == "classification" and all("lora_" in k for k in tensors):
        raise ValueError(f"{weights} holds no classification head (only LoRA matrices; task_type "
                         f"{adapter.get('task_type')!r}): the head would be freshly random; save the adapter with "
                         "task_type SEQ_CLS (peft keeps the head)")


def _run_file(run_dir):
    """The ``run.json`` of a `fit` / `bayesianize` output folder (or of its ``guide`` folder)."""
    run_dir = Path(run_dir)
    for path in (run_dir / "guide" / "run.json", run_dir / "run.json"):
        recover_directory(path.parent)  # a save killed between its renames left the previous guide aside
        if path.is_file() and (path.parent / "guide.json").is_file():
            return path
    raise FileNotFoundError(f"{run_dir} is not a `pyro-lora fit` or `bayesianize` output (guide/run.json missing)")


def evaluate_saved(run_dir, **overrides):
    """Score the guide saved by :func:`fit_one` or :func:`bayesianize_adapter` in ``run_dir`` on its test set, with
    the predictive and seed the run used, so the row is the run's (``overrides`` change the config, e.g.
    ``data_dir`` where the run's datasets folder moved). The row's ``test_examples`` is the number scored.

    :raises FileNotFoundError: if ``run_dir`` holds no saved run.
    :raises ValueError: if its ``run.json`` is not a complete run record, its configuration cannot run here
        (:func:`check_config`), or the guide does not fit the rebuilt model.
    """
    path = _run_file(run_dir)
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
        settings = set(CompareConfig.__dataclass_fields__)
        missing, unknown = sorted(settings - set(run["config"])), sorted(set(run["config"]) - settings)
        if missing or unknown:
            raise ValueError(f"config {'lacks ' + str(missing) if missing else 'has unknown settings ' + str(unknown)}")
        config = CompareConfig(**{**run["config"], **overrides})
        random, predictive, seed = run["random"], run["predictive"], run["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise ValueError(f"seed {seed!r} is no integer in [0, 2**32)")
        if random not in ("AB", "A", "B", "R", "S"):
            raise ValueError(f"random {random!r} is none of AB, A, B (LoRA), R (LoRA-XS), S (ScalaBL)")
        (name,) = config.guides
        _check_numbers(config)
        saved_class = json.loads((path.parent / "guide.json").read_text(encoding="utf-8")).get("guide", "")
        if name not in GUIDE_CLASSES or saved_class.rsplit(":", 1)[-1] != GUIDE_CLASSES[name]:
            raise ValueError(f"its method {name!r} did not save the guide beside it ({saved_class!r})")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a complete run record ({type(error).__name__}: {error})") from None
    if "samples" in overrides and predictive != "weight_samples":
        raise ValueError(f"--samples changes nothing here: {path} was scored with the {predictive} predictive, which "
                         "draws no weight samples (an ensemble uses each member once)")
    task = check_config(config, guides=(), writes=False)
    adapter = run.get("adapter") and path.parent / run["adapter"]  # saved in the unit, beside run.json
    if adapter is not None:
        _check_adapter_dir(adapter, task)
    # the saved adapter, if any, brings its own rank, alpha, targets and head
    setup = prepare(config, seed, adapter_dir=adapter)
    config.prior_scale = run.get("prior", config.prior_scale)  # the prior of the guide's model (e.g. post hoc: 0.1)
    likelihood = _kfac_likelihood(setup.likelihood) if name == "laplace" else setup.likelihood
    if random == "R":  # LoRA-XS: A, B are the deterministic SVD of W0, not saved with the guide
        from ..loraxs import LoraXSModel

        setup.model = LoraXSModel(setup.net, likelihood, num_data=len(setup.train), prior=config.prior_scale)
    elif random == "S":  # ScalaBL: the trained A, B are point parameters the guide file restores
        from ..scalabl import ScalaBLModel

        setup.model = ScalaBLModel(setup.net, likelihood, rotate=False, num_data=len(setup.train), prior=config.prior_scale)
    else:
        setup.model = LoraModel(setup.net, likelihood, random=random, num_data=len(setup.train), prior=config.prior_scale)
    guide = load_guide(path.parent, setup.model)
    kind, predictor = _saved_predictor(setup, guide)
    if kind != predictive:
        raise ValueError(f"{path} was scored with the {predictive} predictive, and this guide gives {kind}: the row would differ")
    prediction, costs = _evaluate(setup, Fitted(predictor), setup.test, name, config.dataset)
    row = _row({"guide": name, "dataset": config.dataset}, score(prediction, point_estimate=guide.deterministic),
               costs, {"extra_parameters": guide.extra_parameters(), "test_examples": len(setup.test)})
    recorded = run.get("result") or {}
    changed_settings = [f"{k} {overrides[k]} (the run: {run['config'][k]})" for k in ("test_size", "samples")
                        if k in overrides and overrides[k] != run["config"][k]]
    note = f"re-scored with {', '.join(changed_settings)}: not the run's row" if changed_settings else None
    if not changed_settings:
        changed = [k for k in ("accuracy", "ece", "nll") if isinstance(recorded.get(k), (int, float))
                   and not math.isclose(row[k], recorded[k], rel_tol=1e-6, abs_tol=1e-9)]
        if changed:  # the same run re-scored: only other data or other software changes it
            note = (f"differs from the row the run recorded ({changed[0]} {recorded[changed[0]]:.4g} there, {row[changed[0]]:.4g} "
                    "here): the test data or the software changed since")
    if note:
        row["note"] = f"{row['note']}; {note}" if row.get("note") else note
    return row


def _saved_predictor(setup, guide):
    """The predictive ``compare`` reports for the method of ``guide``, and its name: Laplace's GLM probit
    (``"glm_probit"``), an ensemble's exact mixture with its members' heads (``"ensemble_mixture"``), else weight
    samples (``"weight_samples"``); each on the guide's own model (LoRA-XS, ScalaBL, the post-hoc guides' prior)."""
    from ..guides import EnsembleGuide, LaplaceGuide

    if isinstance(guide, LaplaceGuide):
        return "glm_probit", _glm_predictor(setup, guide)
    if isinstance(guide, EnsembleGuide):
        return "ensemble_mixture", _ensemble_predictor(setup, guide.model, guide)
    return "weight_samples", _guide_predictor(setup, guide.model, guide)


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
