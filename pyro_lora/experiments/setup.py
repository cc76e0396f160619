"""What every method of a comparison shares: its configuration, checked before loading, and the trained MAP."""

import collections
import copy
import hashlib
import importlib.util
import json
import math
import time
import unicodedata
import warnings
import zlib
from dataclasses import dataclass, field, replace
from typing import Optional

import pyro
import torch
from pyro.infer import TraceMeanField_ELBO

from .. import data as D
from ..collators import CUT_PASSAGE, text_cut, _TooLong, _positions, boundary_changes
from ..contract import CONFIG_IGNORED, weights_digest
from ..ownership import take_over
from ..io import writable_folder
from ..likelihoods import MultipleChoice, SequenceClassification
from ..model import LoraModel, lora_freezes
from ..pretrained import (DTYPES, add_lora, check_head_classes, default_mc_format, encoder_only, expected_mc_format, load_adapter,
                          load_pretrained, max_positions)
from ..model_files import label_key
from ..prompts import asked_question
from ..records import BLANK, looks_blank, record_task
from ..training import fit
from ..guides import MAPGuide
from ..guides.registry import METHODS, Fitted, get_method, join_notes, methods_for_task
from ..likelihoods import MC_FORMATS
from ..callers import user_stacklevel


@dataclass(frozen=True)
class CompareConfig:
    """Everything one comparison run depends on (written to ``results.json``). Never changed in place:
    resolved defaults give a new config (:func:`dataclasses.replace`)."""

    model: str = "minilm"
    dataset: str = "sst2"
    guides: tuple = None  # None: every method that applies to the task
    # the defaults are the demo: every method in about 5 minutes on 2 CPU cores, MAP already over-confident
    # (6 epochs); FULL is the full comparison
    train_size: int = 300
    test_size: int = 150
    val_fraction: float = 0.1
    samples: int = 4
    epochs: int = 6
    lr: float = None  # default: 2e-3 for encoders (fresh head), 3e-4 for causal LMs
    batch_size: int = 16
    rank: int = 8
    alpha: float = 16.0
    prior_scale: float = 1.0
    seeds: tuple = (0,)
    eval_datasets: tuple = ()  # shifted evaluation sets with the same answer format, e.g. arc_challenge
    device: str = "cpu"
    dtype: str = "fp32"  # the base's weights: fp32, bf16 or fp16 (LoRA, head and guides stay float32)
    load_in_4bit: bool = False  # the base's linear layers in NF4 through bitsandbytes (QLoRA)
    ts: bool = True  # beside each method, its row after temperature scaling on its averaged predictive (``+ts``)
    mc_format: str = None
    mc_normalize: str = None  # cloze: None (sum of log-probs), "tokens" or "chars" (per-length average)
    max_length: int = 256
    data_dir: str = None
    out: str = "runs/compare"
    progress: bool = True


# settings added after run records were first written, with the value every older run had
ADDED_SETTINGS = {"dtype": "fp32", "load_in_4bit": False, "ts": False}

# the full comparison (`pyro-lora compare --full`): the reference task's sizes (SST-2: all 872 test sentences)
FULL = {"train_size": 2000, "test_size": 1000, "samples": 8, "epochs": 10}


# results.json's "base_version": the form of base_digest it records (1: 4096 strided entries per weight, no config
# or tokenizer; 2: no head, quantization scales or merges; 3: no encoding settings outside the fast tokenizer's
# definition, such as split_special_tokens, and label names or run-time switches in the config); a record of another
# form is not compared
BASE_DIGEST_VERSION = 4
# results.json's "scoring": the form of cloze scoring its rows were computed with. 2 since 2026-12-03: a per-character
# score divides by len(choice), as lm-eval's acc_norm, and every choice of a question keeps the same truncated context;
# a cloze record without it was scored by form 1 (len(choice) + 1, each choice truncated on its own). 3 since
# 2026-12-04: WinoGrande's per-character score counts its continuation (the rest of the sentence) whole, its leading
# space included, as every other continuation's characters are its own. 4 since 2026-12-05: a cut takes a passage only
# (since 2026-12-04 05:23, the question never), and a question holding one lone "_" in a dataset not all of WinoGrande
# blank sentences is asked as a question. 5 since 2026-12-07: where a token merges a context's end with a choice's
# start, the choice is scored on the text's own tokens from that token on, not tokenized alone. A cloze record without
# "scoring" was scored by form 1, or before 2026-12-02 by form 0 (each continuation tokenized alone): taken as form 0
CLOZE_SCORING = 5
# what each form changed, by the runs it changes: "split" a run whose choices tokenized alone give other tokens than
# within their context (:func:`~pyro_lora.collators.boundary_changes`), "cut" one whose cloze rows reach
# --max-length (cut, or as long as it: taken as cut), "unshared" one whose decoder runs each cloze row in full
# (MultipleChoice.shares_prefix: its cache was shared before 2026-12-02 under length-dependent rotary embeddings too,
# and by later changes refused for more decoders), "chars" one normalized per character, "blank_chars" a WinoGrande
# run normalized per character, "lone_blank" one holding questions shaped as blank sentences in a dataset that is not
# all of them, "merge" one whose tokenizer merges a context's end with a choice's start
# (:func:`~pyro_lora.collators.boundary_changes`). A run none of whose changes since form f touch it scores the
# same rows under f as now (:func:`scoring_since`)
SCORING_CHANGES = {1: ("split", "cut", "unshared"), 2: ("chars", "cut"), 3: ("blank_chars",),
                   4: ("cut", "lone_blank", "unshared"), 5: ("merge",)}
# config entries that do not change what the network computes (the ones a saved guide's check leaves out too): where
# it was read from, the dtype it was saved in (the run's --dtype loads it), label names, run-time switches, versions
_CONFIG_NOT_COMPUTED = {*CONFIG_IGNORED, "_commit_hash"}
# the tokenizer's own padding and truncation state: the collators set both for each batch (padding side included)
_TOKENIZER_STATE = ("padding", "truncation")


def base_digest(net, tokenizer) -> str:
    """SHA-256 of what a run's rows read of the base model, whatever path ``--model`` gives it: every weight the
    checkpoint gave (:func:`~pyro_lora.contract.weights_digest`: whole, a trained head and quantization scales
    included, not the weights loading draws under the seed), the model's configuration (its path, saved dtype and
    versions aside) and the tokenizer (a fast tokenizer's whole definition: vocabulary, merges, normaliser,
    pre-tokeniser, post-processor, added tokens; its truncation side; what it makes of a probe text holding its
    special tokens, which settings kept outside that definition change, such as ``split_special_tokens``)."""
    config = {k: v for k, v in net.config.to_dict().items() if k not in _CONFIG_NOT_COMPUTED}
    probe = tokenizer(" ".join([_TOKENIZER_PROBE, *tokenizer.all_special_tokens]))["input_ids"]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        words = [{k: v for k, v in json.loads(backend.to_str()).items() if k not in _TOKENIZER_STATE}, probe]
    else:  # a slow tokenizer: its vocabulary and special tokens
        words = [sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens, probe]
    digest = hashlib.sha256(weights_digest(net).encode())
    digest.update(json.dumps([config, words, tokenizer.truncation_side], sort_keys=True, default=str).encode())
    return digest.hexdigest()


_TOKENIZER_PROBE = "The QUICK brown fox -- isn't it? Jumped 1,234 times over the lazy dog's café ünïcode (sic)."


def derived_seed(seed: int, name: str, stage: str) -> int:
    """A seed of (run seed, method, stage) that no other run seed shares: ``seed + i`` would give seed 0's run and
    seed 1's one training (an ensemble member) alike, and rows averaged over seeds must be independent draws."""
    return zlib.crc32(f"{seed}/{name}/{stage}".encode())


def seed_for(seed: int, name: str, stage: str):
    """Seed every global RNG from (run seed, method, stage): a method's numbers do not depend on which methods
    ran before it, so a resumed run, or one where another method failed, gives the rows of a full run."""
    pyro.set_rng_seed(derived_seed(seed, name, stage))


def default_lr(task: str) -> float:
    """The learning rate a task defaults to: 2e-3 for encoders (a fresh head), 3e-4 for causal LMs."""
    return 2e-3 if task == "classification" else 3e-4


def resolved_default(key: str, config: dict):
    """What the setting ``key`` left to the run (``None``) resolves to under ``config`` (a :class:`CompareConfig`'s
    dict), where that is known before loading the model: ``lr`` by the dataset's task (:func:`default_lr`),
    ``mc_format`` by the model's metadata (:func:`~pyro_lora.pretrained.expected_mc_format`); ``None`` otherwise, or
    where the dataset or model metadata cannot be read (a default matches nothing then: the run is refused, naming it)."""
    if key not in ("lr", "mc_format"):
        return None
    try:
        task = D.load_meta(config["dataset"], config.get("data_dir"))["task"]
        if key == "lr":
            return default_lr(task)
        return None if task == "classification" else expected_mc_format(config["model"])
    except Exception:  # noqa: BLE001 - whatever a broken dataset or model folder raises: nothing is matched on it
        return None


@dataclass
class Setup:
    """The trained MAP and the data every method shares; what a method's recipe receives."""

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
    trainable: dict = field(default_factory=dict)  # parameter name -> requires_grad after the MAP's training
    freezes: set = field(default_factory=set)  # the LoRA weights the MAP's sites froze then (lora_freezes)
    initial_state: dict = field(default_factory=dict)  # adapter and head before the MAP's training (name -> tensor)
    # method name -> (its Fitted, fit seconds, network state after it), for the requested methods that start from it
    kept: dict = field(default_factory=dict)
    method: Optional[str] = None  # the method this view is for (:meth:`for_method`)
    map_digest: Optional[str] = None  # :func:`state_digest` of the trained MAP (:func:`train_map`)
    map_loaded: bool = False  # whether the MAP was loaded from a run's folder rather than trained
    scoring_since: Optional[int] = None  # the oldest cloze scoring form whose rows equal this run's (:func:`scoring_since`)
    # the task's likelihood before any method's hook: each view applies its own method's hook to this one, so a base
    # fitted inside another method's view (mola's ensemble) is not fitted under that method's form (no shared prefix)
    task_likelihood: object = None
    # what the rows of an evaluation set (or, under "validation", those fitted on that split) must say of its records
    # repeating others (:func:`_warn_about_splits`)
    split_notes: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.task_likelihood is None:
            self.task_likelihood = self.likelihood

    def derived_seeds(self, what: str, k: int) -> list:
        """``k`` seeds for ``what`` (e.g. ``"ensemble member"``) of this run seed, shared with no other run seed
        (:func:`derived_seed`); the same whichever method asks (``mola`` trains the ``ensemble`` method's members)."""
        return [derived_seed(self.seed, what, str(i)) for i in range(k)]

    @property
    def sizes(self) -> dict:
        """Examples used per split: train, validation, test and each shifted test set."""
        return {"train": len(self.train), "validation": len(self.val), "test": len(self.test),
                **{f"test {name}": len(records) for name, records in self.shifted.items()}}

    def loader(self, records, shuffle=False):
        """A data loader over ``records`` with the run's batch size (shuffled under the setup's seed)."""
        return D.make_loader(records, self.collator, self.config.batch_size, shuffle=shuffle, seed=self.seed)

    def lora_model(self, random="AB", **kwargs) -> LoraModel:
        """A fresh :class:`LoraModel` view of the shared network, reset to the trained MAP state."""
        self.restore()
        kwargs.setdefault("prior", self.config.prior_scale)
        kwargs.setdefault("likelihood", self.likelihood)
        kwargs.setdefault("num_data", len(self.train))
        return LoraModel(self.net, random=random, **kwargs)

    def restore(self, initial: bool = False):
        """Put the MAP adapter and head back (``initial``: the adapter and head before the MAP's training, for a
        method that trains its own from the same start): each method starts from the same network."""
        with torch.no_grad():
            params = dict(self.net.named_parameters())
            for k, v in (self.initial_state if initial else self.trained_state).items():
                params[k].copy_(v)
            for n, p in params.items():  # the next method starts from the MAP, not from another method's gradients
                p.grad = None  # or its frozen parameters
                p.requires_grad_(self.trainable.get(n, p.requires_grad))
            marks = lora_freezes(self.net)  # with the flags: a method whose B is no site trains it again, as the first did
            marks.clear()
            marks.update(self.freezes)

    def fit(self, model, guide, **kwargs):
        """Train ``guide`` on the training split for the run's epochs, learning rate and progress bars."""
        c = self.config
        kwargs.setdefault("lr", c.lr)
        return fit(model, guide, self.loader(self.train, shuffle=True), epochs=c.epochs, progress=c.progress, **kwargs)

    def svi(self, model, guide, train_network=True) -> Fitted:
        """Train a variational guide started at the trained MAP with the closed-form-KL ELBO."""
        self.fit(model, guide, elbo=TraceMeanField_ELBO(), train_network=train_network)
        return Fitted(guide=guide, extra_parameters=guide.extra_parameters())

    def keep_fit(self, name: str, fitted: Fitted, seconds: float):
        """Keep method ``name``'s fit, with the adapter and head as it left them, where a requested method starts
        from it (its registered ``base``); other fits are not held through the seed. ``seconds``: its whole fit time,
        the fits it started from included (its row's), which a method starting from it inherits."""
        requested = self.config.guides or METHODS  # None: every method that applies
        if any(get_method(g).base == name for g in requested):
            params = dict(self.net.named_parameters())
            self.kept[name] = (fitted, seconds, {k: params[k].detach().clone() for k in self.trained_state})

    def base_fit(self) -> Fitted:
        """The fit of this view's method's registered ``base`` under this seed: the one ``compare`` kept, with the
        network put back as that fit left it (a guide that trained the adapter predicts with it), else fitted now
        under the base's own seed (the same result). Its ``inherited_seconds`` are the kept fit's time (a fit made
        now is inside the caller's timing, less what that fit inherited itself: a chain of bases counts each fit
        once). Its guide is a copy (sharing the model): the caller may tune it, and
        another variant of the same base still gets the base's guide as the base left it.

        :raises ValueError: outside a method's view (:meth:`for_method`), or for a method registered without a base.
        """
        base = get_method(self.method).base if self.method else None
        if base is None:
            raise ValueError(f"base_fit: method {self.method!r} is registered without a base method (@method(..., base=))")
        fresh = base not in self.kept
        if fresh:
            seed_for(self.seed, base, "fit")
            start = time.perf_counter()
            fitted = get_method(base).recipe(self.for_method(base))
            # the network is as the fit left it; its time, as its own row's, holds the kept fits it started from
            self.kept[base] = (fitted, time.perf_counter() - start + fitted.inherited_seconds, None)
            seed_for(self.seed, self.method, "fit")  # the caller goes on as after a kept fit (compare seeded it so)
        fitted, seconds, state = self.kept[base]
        if state is not None:
            with torch.no_grad():
                params = dict(self.net.named_parameters())
                for k, v in state.items():
                    params[k].copy_(v)
        guide = fitted.guide
        if guide is not None:  # the guide's own tensors copied, never the model, the network or any part of it
            guide = copy.deepcopy(guide)
        # fitted now, inside the caller's recipe, whose timing holds it: only the kept fits it started from to inherit
        return replace(fitted, guide=guide, inherited_seconds=fitted.inherited_seconds if fresh else seconds)

    def std_lr_scale(self, travel=100.0) -> float:
        """The guides' ``std_lr_scale`` for this run: Adam moves ``log sigma`` by about ``std_lr_scale * lr`` per
        step, so the stds can travel a factor ``travel`` from their start within the run (never below 10)."""
        steps = self.config.epochs * len(self.loader(self.train))
        return max(10.0, math.log(travel) / (self.config.lr * steps))

    def for_method(self, name: str) -> "Setup":
        """A copy of this setup for method ``name``: the task's likelihood (``task_likelihood``, whichever view this
        is) in the form its model needs, the splits as tuples (what one recipe reassigns or reorders, the next never
        sees).

        :raises ValueError: if the method's likelihood hook gives no likelihood.
        """
        likelihood = get_method(name).task_likelihood(self.task_likelihood)
        if likelihood is None:
            raise ValueError(f"method {name!r}: its likelihood hook returned None for "
                             f"{type(self.task_likelihood).__name__}")
        return replace(self, method=name, likelihood=likelihood, train=tuple(self.train), val=tuple(self.val), test=tuple(self.test),
                       shifted={k: tuple(v) for k, v in self.shifted.items()})


def prepare(config: CompareConfig, seed: int = 0, adapter_dir=None) -> Setup:
    """Load the model (LoRA initialised under ``seed``) and the data of ``config``; the MAP is not yet trained.

    ``Setup.config`` is ``config`` with the defaults it left resolved (``lr``, ``mc_format``, the adapter's
    ``rank`` and ``alpha``); ``Setup.sizes`` are the sizes actually used (at most those requested). :func:`check_config`
    refuses first a configuration that cannot run; its check of the shifted sets (:func:`check_eval_sets`) runs here
    too, as a Python caller may not have called it.

    The data subsets and the train/validation split do not depend on ``seed``: every seed sees the same
    examples, only initialisation and training order change. With ``adapter_dir``, the LoRA is a saved
    peft adapter (``PeftModel.from_pretrained``) instead of a fresh one.
    """
    meta = D.load_meta(config.dataset, config.data_dir)
    check_eval_sets(config, meta)  # a caller of the Python API may not have run check_config
    train, val, test, shifted = load_splits(config)
    torch.manual_seed(seed)  # a classification head is initialised while loading
    load = dict(device=config.device, progress=config.progress, dtype=DTYPES[config.dtype],
                quantization="nf4" if config.load_in_4bit else None)
    if meta["task"] == "classification":
        net, tok = load_pretrained(config.model, "classification", label_names=meta["label_names"], **load)
        likelihood, collator = SequenceClassification(), D.ClassificationCollator(tok, config.max_length)
    else:
        net, tok = load_pretrained(config.model, "causal_lm", **load)
        config = replace(config, mc_format=config.mc_format or default_mc_format(net))
        _check_normalize(config, config.mc_format)  # where the metadata did not tell the format before loading
        if config.mc_format == "cloze":
            likelihood = MultipleChoice(format="cloze", normalize=config.mc_normalize)
            collator = D.ClozeCollator(tok, config.max_length)
        else:
            # one letter per choice of the widest question of any split scored: ARC has 3-5 options, OBQA 4
            num_choices = max(len(r["choices"]) for records in [train, val, test, *shifted.values()] for r in records)
            if num_choices > len(D.LETTERS):  # one letter per choice: named by its record, not by the count alone
                names = _split_names(config.dataset, shifted)
                what, record = next((names[s], r) for s, records in {"train": train, "validation": val, "test": test,
                                                                     **shifted}.items()
                                    for r in records if len(r["choices"]) == num_choices)
                raise ValueError(f"record {record['id']!r} ({what}) has {num_choices} choices, more than the letter "
                                 f"format's {len(D.LETTERS)} (A to Z): use --mc-format cloze, or drop the record")
            likelihood = MultipleChoice(D.letter_token_ids(tok, num_choices), format="letter")
            collator = D.LetterCollator(tok, config.max_length)
        collated = _check_collates(collator, {"train": train, "validation": val, "test": test, **shifted},
                                   max_positions(config.model), names=_split_names(config.dataset, shifted))
    split_notes = _warn_about_splits(config, tok, train, val, test, shifted)
    if meta["task"] == "classification":
        _warn_about_unheld_classes(config.dataset, meta["label_names"], [train, val, test, *shifted.values()])
    collator._cut_said = True  # each split's cuts are said above: the batches need not say them again
    config = replace(config, lr=config.lr or default_lr(meta["task"]))
    torch.manual_seed(seed)  # the LoRA's initialisation, whatever loading drew
    if adapter_dir is None:
        net = add_lora(net, r=config.rank, alpha=config.alpha)
    else:
        net = load_adapter(net, adapter_dir)
        adapter = net.peft_config[net.active_adapter]
        config = replace(config, rank=adapter.r, alpha=float(adapter.lora_alpha))
    net = net.to(config.device)
    setup = Setup(config, net, tok, likelihood, train, val, test, collator, seed, shifted, split_notes=split_notes)
    if config.mc_format == "cloze":
        records = [r for split in [train, val, test, *shifted.values()] for r in split]
        # cloze scoring shared every question's cache until 2026-12-02 (form 0), under length-dependent RoPE too
        shared = set() if likelihood.shares_prefix(net) else {"unshared"}
        setup.scoring_since = scoring_since(config, collated | shared, records)
    return setup


def scoring_since(config: CompareConfig, collated: set, records) -> int:
    """The oldest cloze scoring form (:data:`CLOZE_SCORING`) under which a run of ``config`` scores the same rows as
    now: none of the changes (:data:`SCORING_CHANGES`) of a later form touches it. ``collated``: what
    :func:`_check_collates` found of its rows (``"cut"``, ``"split"``), and ``"unshared"`` where its decoder runs
    each cloze row in full; ``records``: every record it scores or trains on.
    Rows of that form or later may be joined with the run's; an older form's would mix two scorings."""
    blank = any(r.get(BLANK) is True for r in records)
    chars = config.mc_normalize == "chars"
    touched = {"split": "split" in collated, "cut": "cut" in collated, "unshared": "unshared" in collated,
               "merge": "merge" in collated,
               "chars": chars, "blank_chars": blank and chars,
               "lone_blank": any(looks_blank(r) and r.get(BLANK) is not True for r in records)}
    since = CLOZE_SCORING
    while since > 0 and not any(touched[change] for change in SCORING_CHANGES[since]):
        since -= 1
    return since


def _check_collates(collator, splits: dict, positions=None, chunk: int = 256, names: Optional[dict] = None):
    """Collate every record of every split once, before any training: a cloze choice longer than ``--max-length``
    leaves (or a letter prompt whose options it would cut) was refused only when its split was predicted, after every
    method had been fitted. Records whose passage ``--max-length`` cuts (a :class:`~pyro_lora.data.LetterCollator`'s
    or :class:`~pyro_lora.data.ClozeCollator`'s ``last_cut``) are said in a warning per split, the first by id; the
    collator is marked said, so its batches do not say it again.

    :param positions: the model's position limit (:func:`~pyro_lora.model_files.max_positions`): a record that needs
        more is said to be one the model cannot take, not one a larger ``--max-length`` takes.
    :param names: what each split (a key of ``splits``) is called in a warning; ``"<key> records"`` where not given.
    :returns: for a cloze collator, what its rows show of the scoring forms' changes (:data:`SCORING_CHANGES`):
        ``"cut"`` where a row of any split reaches ``max_length`` (is cut, or as long as it), ``"split"`` where a
        choice tokenized alone gives other tokens than within its context, ``"merge"`` where a token merges a
        context's end with a choice's start.
    :raises ValueError: naming the split, from the collator's own refusal.
    """
    collated = set()
    collator._cut_said = True  # each split's cuts are said below, counted over the split: a batch would repeat one
    for name, records in splits.items():
        cut = []  # (record, its whole length in tokens) of each record the cut takes a passage's start from
        for i in range(0, len(records), chunk):
            try:
                batch = collator(records[i : i + chunk])
            except _TooLong as error:
                raise ValueError(f"the {name} records cannot be collated ({error.problem}); checked before training: "
                                 f"{error.remedy(positions, '--max-length')}") from None
            except ValueError as error:
                raise ValueError(f"the {name} records cannot be collated ({error}); checked before training") from None
            if isinstance(collator, D.ClozeCollator):
                if batch["attention_mask"].sum(-1).max() >= collator.max_length:
                    collated.add("cut")
                collated |= boundary_changes(collator.tokenizer, records[i : i + chunk])
            cut += [(records[i + place], tokens) for place, tokens in collator.last_cut.items()]
        if cut:
            _say_cut((names or {}).get(name, f"{name} records"), records, cut, collator.max_length,
                     positions or _positions(collator.tokenizer), CUT_PASSAGE)
    return collated


def _split_names(dataset: str, shifted) -> dict:
    """What a run's splits (``train``, ``validation``, ``test`` and each shifted set's name) are called in a warning."""
    return {"train": f"training records of {dataset!r}", "validation": f"validation records of {dataset!r}",
            "test": f"test records of {dataset!r}", **{name: f"records of the shifted set {name!r}" for name in shifted}}


def _say_cut(what: str, records, cut: list, max_length: int, positions, lost: str):
    """Warn that ``--max-length`` cuts ``cut`` (``(record, its whole length in tokens)``, in order, non-empty) of a
    split's ``records`` (``what`` they are), saying what they lose (``lost``: :func:`~pyro_lora.collators.text_cut` or
    :data:`~pyro_lora.collators.CUT_PASSAGE`) and the ``--max-length`` the longest needs (or that it is more than the
    model's ``positions``)."""
    longest = max(n for _, n in cut)
    room = (f"the longest is {longest} tokens, more than the model's {positions} positions" if positions and
            longest > positions else f"the longest needs --max-length {longest}")
    warnings.warn(f"{len(cut)} of the {len(records)} {what} are longer than --max-length {max_length} tokens and are "
                  f"cut to it (the first, record {cut[0][0].get('id')!r}, is {cut[0][1]} tokens): {lost}; raise "
                  f"--max-length to keep them whole ({room})", stacklevel=user_stacklevel())


def load_splits(config: CompareConfig):
    """The records ``config`` runs on, the same for every seed: ``(train, validation, test, {shifted set: test})``.
    :func:`prepare` says what makes their scores mean less (:func:`_warn_about_splits`), once it has the tokenizer.
    Other JSONL files in the dataset's folder (a ``validation.jsonl`` of the Hugging Face layout) are never read, and
    a warning names them: the validation split is carved from ``train.jsonl``."""
    folder = D.dataset_folder(config.dataset, config.data_dir)
    unread = sorted(p.name for p in folder.glob("*.jsonl") if p.stem not in D.SPLITS)
    if unread:
        warnings.warn(f"{folder} holds {', '.join(unread)}, which compare does not read: it reads train.jsonl and "
                      f"test.jsonl and carves its validation split from train.jsonl (--val-fraction "
                      f"{config.val_fraction}); merge a validation file's records into train.jsonl to have them used",
                      stacklevel=user_stacklevel())
    train_all = D.load_records(config.dataset, "train", config.data_dir)
    train_all = D.subset(train_all, min(len(train_all), config.train_size), seed=0)
    if len(train_all) < 2:
        raise ValueError(f"dataset {config.dataset!r} has {len(train_all)} training record: at least 2 are needed to carve "
                         "a validation split from them")
    train, val = D.split_train_val(train_all, val_fraction=config.val_fraction, seed=0)
    test = _test_records(config.dataset, config)
    return train, val, test, {name: _test_records(name, config) for name in config.eval_datasets}


class _Fed:
    """One split's records as the repeat checks compare them: ``read``, each record's model input with a question's
    choices in any order (:func:`_any_order`: learned alike), ``own``, the inputs as one set's repeats are counted (the
    letter format's reordered choices are another prompt there), and ``folded``, its texts folded for case and spacing
    (:func:`_folded`: a cased tokenizer reads "Paris" and "paris" apart, yet a training question lowercased into the
    test set is memory all the same). ``keys`` and ``texts`` are the sets of ``read`` and ``folded``; ``whole``, the
    inputs before ``--max-length``'s cut."""

    def __init__(self, records, tokenizer, config):
        inputs = _model_inputs(records, tokenizer, config.max_length)
        self.records = records
        self.read = [_any_order(key) for key in inputs]
        self.own = inputs if config.mc_format == "letter" else self.read
        self.folded = [_folded(r) for r in records]
        self.keys, self.texts = set(self.read), set(self.folded)
        # the inputs before --max-length's cut, where it may have cut: texts it merges are the cut's to say
        # (_warn_about_cuts), not a repeat
        cuts = records and record_task(records[0]) == "classification" and any(len(k) >= config.max_length for k in inputs)
        self.whole = [tuple(ids) for ids in tokenizer([r["text"] for r in records], verbose=False)["input_ids"]] \
            if cuts else self.own


@dataclass(frozen=True)
class _Scored:
    """A split checked for repeats: ``split``, the key of its note (``"validation"``, the dataset or a shifted set),
    ``what`` it is called in messages, its records (``fed``), the inputs and folded texts it must not repeat (``seen``,
    ``near_seen``) and ``whose`` they are."""

    split: str
    what: str
    fed: _Fed
    seen: set
    near_seen: set
    whose: str


def _warn_about_splits(config: CompareConfig, tokenizer, train, val, test, shifted) -> dict:
    """Say what makes a run's numbers mean less than they seem: test, validation or shifted records that repeat
    training ones as the model reads them (:func:`_model_inputs`: memory, not generalisation), shifted records that
    repeat test ones (no shift: the OOD AUROC cannot tell them apart), validation and test and shifted labels no
    training record has, training labels no validation record has, and texts that ``--max-length`` cuts (:func:`_warn_about_cuts`;
    a multiple-choice passage's cut is said by :func:`_check_collates`).

    Returns the repeats as notes for the rows they touch, which a warning alone left out of the table, the run's
    record and a resume: evaluation set (or ``"validation"``, for the rows fitted on it) -> note."""
    names = _split_names(config.dataset, shifted)
    trained, validation = _Fed(train, tokenizer, config), _Fed(val, tokenizer, config)
    held, held_texts = trained.keys | validation.keys, trained.texts | validation.texts
    scored = [_Scored("validation", names["validation"], validation, trained.keys, trained.texts, "training record"),
              _Scored(config.dataset, names["test"], _Fed(test, tokenizer, config), held, held_texts,
                      "training or validation record"),
              *(_Scored(name, names[name], _Fed(records, tokenizer, config), held, held_texts,
                        f"training or validation record of {config.dataset!r}") for name, records in shifted.items())]
    notes = _repeat_notes(config, scored)
    if test and record_task(test[0]) == "multiple_choice":
        _warn_about_choice_counts(names, test, shifted)
    if train and record_task(train[0]) == "classification":
        _warn_about_cuts(config, tokenizer, {names["train"]: trained, **{s.what: s.fed for s in scored}},
                         scored={s.what for s in scored[1:]})
        _warn_about_labels(config, train, val, scored)
    return notes


def _repeat_notes(config: CompareConfig, scored: list) -> dict:
    """Warn of the records of each split of ``scored`` (:class:`_Scored`: validation, test, then the shifted sets)
    that repeat what it must not have seen, exactly or but for case or spacing, or another record of their own
    evaluation set, and of the shifted records that repeat test ones; return the warnings as notes, split -> note."""
    notes = {}
    for s in scored:
        what, records, keys, texts, split, whose = s.what, s.fed.records, s.fed.read, s.fed.folded, s.split, s.whose
        repeated = sum(key in s.seen for key in keys)
        nearly = sum(key not in s.seen and text in s.near_seen for key, text in zip(keys, texts))
        if nearly:
            said = f"{nearly} of the {len(records)} {what} repeat a {whose} but for case or spacing"
            warnings.warn(said + " (other tokens to this tokenizer, the same text to a reader): their scores measure "
                          "memory there more than generalisation; deduplicate the splits", stacklevel=user_stacklevel())
            notes[split] = said
        if repeated:
            said = f"{repeated} of the {len(records)} {what} repeat a {whose} as the model reads it"
            warnings.warn(said + " (the same tokens: texts differing only in case or spacing are one input to an "
                          "uncased tokenizer, a question's choices in any order, whatever its label, one question): "
                          "their scores measure memory there, not generalisation; deduplicate the splits", stacklevel=user_stacklevel())
            notes[split] = join_notes(said + (": the rows fitted on them (temperature scaling, +ts, *_val) are fitted "
                                              "partly on memorised inputs" if split == "validation" else
                                              ": memory there, not generalisation"), notes.get(split))
        # within one set, as the shifted-against-test check reads inputs (the letter format's reordered choices are
        # another prompt), by the tokens alone ("café" and "cafe", two emoji read as [UNK], are one input to an uncased
        # tokenizer); two texts --max-length cuts to one input are said by _warn_about_cuts
        twice = len(keys) - len(set(zip(s.fed.own, s.fed.whole)))
        if twice and split != "validation":  # an evaluation set's input scored several times weighs that many
            said = f"{twice} of the {len(records)} {what} repeat another of them as the model reads it"
            warnings.warn(said + ": each such input counts several times in the scores; deduplicate the set",
                          stacklevel=user_stacklevel())
            notes[split] = join_notes(notes.get(split), said + " (counted several times)")
    # a copy of the test set scored as a shift: AUROC 0.5 reported as a result. The letter format scores a question
    # with its choices in another order as another input: a shift there
    tested = set(scored[1].fed.own)
    for s in scored[2:]:
        repeated = sum(key in tested for key in s.fed.own)
        if repeated:
            said = (f"{repeated} of the {len(s.fed.records)} records of the shifted set {s.split!r} repeat a test record "
                    f"of {config.dataset!r} as the model reads it: they are no shift")
            warnings.warn(said + " (the model reads the test set's inputs, and the OOD AUROC against the test set cannot "
                          "tell them apart); deduplicate the sets", stacklevel=user_stacklevel())
            notes[s.split] = join_notes(notes.get(s.split), said + " (the OOD AUROC cannot tell them apart)")
    return notes


def _warn_about_labels(config: CompareConfig, train, val, scored):
    """Warn of labels of the validation (where a row is fitted on it), test or shifted records (``scored``) that no
    training record has, and of training labels no validation record has."""
    trained = {r["label"] for r in train}
    # the validation records matter where a row is fitted on them (temperature, +ts, *_val): not to fit or bayesianize a MAP
    fitted_on_val = config.guides is None or any(  # None: every method of the task, temperature scaling among them
        g in METHODS and (METHODS[g].validation or config.ts and METHODS[g].ts) for g in config.guides)
    for s in scored[0 if fitted_on_val else 1:]:  # validation, test and every shifted set
        unseen = sorted({r["label"] for r in s.fed.records} - trained)
        if unseen:
            warnings.warn(f"the {s.what} hold label(s) {unseen} that no training record has: the model never learns "
                          "those classes", stacklevel=user_stacklevel())
    absent = sorted(trained - {r["label"] for r in val}) if fitted_on_val else []
    if absent:
        warnings.warn(f"the validation records of {config.dataset!r} hold no record of label(s) {absent} that "
                      "training records have: temperature scaling and every +ts and *_val row are fitted without "
                      "those classes; raise --val-fraction or --train-size", stacklevel=user_stacklevel())


def _warn_about_unheld_classes(dataset: str, label_names: list, splits: list) -> None:
    """Warn of a class ``label_names`` names that no record of the run's splits holds: the head gets an output that
    nothing trains or scores, whose probability still takes mass from the others (a third name beside SST-2's two took
    MAP's NLL from 0.69 to 1.03), a stale or mistyped name in ``meta.json`` most likely."""
    held = {r["label"] for records in splits for r in records}
    unheld = [name for i, name in enumerate(label_names) if i not in held]
    if unheld:
        warnings.warn(f"the label_names of {dataset!r} name {len(label_names)} classes, and no record this run reads "
                      f"(its training, validation, test and shifted records, at the sizes asked) holds {unheld}: the head "
                      "gets an output that nothing trains, whose probability takes mass from the others (NLL, ECE and "
                      "Brier change with it); a larger --train-size gives it examples where the data holds them, and a "
                      "name no record of the data holds is stale in its meta.json", stacklevel=user_stacklevel())


def _warn_about_choice_counts(names: dict, test: list, shifted: dict):
    """Say where a shifted multiple-choice set's questions have other numbers of choices than the test set's: the
    predictive's entropy (at most log k) and mutual information grow with the count, so the OOD AUROC also tells the
    counts apart (a model at chance, its test questions with one more distractor as the shift, scored 1.000)."""
    def shares(records):
        counts = collections.Counter(len(r["choices"]) for r in records)
        return {k: n / len(records) for k, n in counts.items()}

    def said(share):
        return ", ".join(f"{k}: {share[k]:.0%}" for k in sorted(share))

    tested = shares(test)
    for name, records in shifted.items():
        theirs = shares(records)
        if max(abs(tested.get(k, 0.0) - theirs.get(k, 0.0)) for k in {*tested, *theirs}) > 0.05:
            warnings.warn(f"the {names[name]} have other numbers of choices than the {names['test']} (choices per "
                          f"question {said(theirs)}, against {said(tested)}): the entropy and mutual information grow "
                          "with the number of choices, so the OOD AUROC against the test set also tells the counts "
                          "apart, not the shift alone", stacklevel=user_stacklevel())


def _warn_about_cuts(config: CompareConfig, tokenizer, splits: dict, scored: set):
    """Say, once per split (``splits``: what it is called -> its :class:`_Fed`, a classification set's), how many texts
    ``--max-length`` cuts (their end is never read, or their start under a tokenizer truncating on the left: a
    legitimate cut, but it can take what tells a text's class), the first by id; and, of a split named in ``scored``,
    how many different texts the cut leaves as one input (their rows cannot be told apart)."""
    positions = _positions(tokenizer)
    for what, fed in splits.items():
        if fed.whole is fed.own:  # no input reaches --max-length: nothing was cut
            continue
        records, whole = fed.records, fed.whole  # whole: special tokens included, as the cut counts them
        cut = [(r, len(ids)) for r, ids in zip(records, whole) if len(ids) > config.max_length]
        if not cut:
            continue
        _say_cut(what, records, cut, config.max_length, positions, text_cut(tokenizer))
        if what in scored:
            texts = {}  # the input after the cut -> the ids of the records read as it, by their whole tokens
            for r, key, ids in zip(records, fed.read, whole):
                texts.setdefault(key, {}).setdefault(ids, []).append(r["id"])
            merged = [[i for ids in group.values() for i in ids] for group in texts.values() if len(group) > 1]
            if merged:
                warnings.warn(f"the cut to --max-length {config.max_length} leaves {sum(map(len, merged))} of the "
                              f"{len(records)} {what}, different texts, as {len(merged)} input(s) (the first: records "
                              f"{merged[0][0]!r} and {merged[0][1]!r}): the model cannot tell them apart, so each "
                              "input's records get one prediction; raise --max-length", stacklevel=user_stacklevel())


def _model_inputs(records, tokenizer, max_length: int) -> list:
    """Per record, what the model reads of it (hashable), from the tokenizer alone (no forward): a text's token ids as
    :class:`~pyro_lora.data.ClassificationCollator` truncates them; a multiple-choice record's passage, question and
    choices in their order (what the letter format scores), each tokenized whole (a passage a long prompt cuts is
    compared whole). The label is not read: a repeat with another label is a repeat all the same. Records of one split
    share a task."""
    if not records:
        return []
    if record_task(records[0]) == "classification":
        ids = tokenizer([r["text"] for r in records], truncation=True, max_length=max_length)["input_ids"]
        return [tuple(row) for row in ids]
    # "" for a record without a passage; a question as the prompts ask it (after a passage "q?", "q??" and "q? " are one)
    fields = [[r.get("context", ""), asked_question(r), *r["choices"]] for r in records]
    flat = iter(tokenizer([f for row in fields for f in row], add_special_tokens=False)["input_ids"])
    read = [[tuple(next(flat)) for _ in row] for row in fields]
    return [(passage, question, tuple(choices)) for passage, question, *choices in read]


def _folded(record) -> tuple:
    """A record's text folded for case and spacing, a multiple-choice question's choices as a sorted multiset (as
    :func:`_any_order` compares them): what a reader takes for the same text, whatever tokens a cased tokenizer gives."""
    def fold(text):
        return " ".join(unicodedata.normalize("NFC", text).casefold().split())

    if record_task(record) == "classification":
        return (fold(record["text"]),)
    return fold(record.get("context", "")), fold(asked_question(record)), tuple(sorted(fold(c) for c in record["choices"]))


def _any_order(key):
    """A :func:`_model_inputs` key with a multiple-choice record's choices as a sorted multiset: a question repeated with
    its choices in another order is the same one (the cloze format reads the same rows; the letter format another
    prompt, but the question is learned alike). A text's token ids, as they are."""
    if len(key) == 3 and isinstance(key[2], tuple) and all(isinstance(c, tuple) for c in key[2]):
        passage, question, choices = key
        return passage, question, tuple(sorted(choices))
    return key


def data_digest(config: CompareConfig) -> str:
    """SHA-256 of the records ``config`` runs on (:func:`load_splits`): a run's rows are comparable only while the
    files under its data folder give the same records (a regenerated set, another machine's copy)."""
    return records_digest(*load_splits(config))


def set_digests(config: CompareConfig, train, val, test, shifted) -> dict:
    """Evaluation set -> SHA-256 of the records a run of ``config`` reads of it (:func:`load_splits`' ``train, val,
    test, shifted``): the training set's train, validation and test records, each shifted set's test records; where
    :func:`data_digest` changed, they name the set whose records did."""
    return {config.dataset: records_digest(train, val, test, {}),
            **{name: records_digest([], [], records, {}) for name, records in shifted.items()}}


def label_names(config: CompareConfig) -> dict:
    """Evaluation set -> its ``meta.json`` label names (``None`` for multiple choice): the records hold label indices
    only, and the head's width comes from these (a third name added between seeds trained a 3-class head)."""
    return {name: D.load_meta(name, config.data_dir).get("label_names") for name in (config.dataset, *config.eval_datasets)}


def records_digest(train, val, test, shifted) -> str:
    """SHA-256 of the records of a run's splits (``shifted``: evaluation-set name -> test records). A record's
    ``"blank": True`` (its dataset's blank-sentence format, :func:`~pyro_lora.data.load_records`) is left out: every
    record of that shape was asked so before the loader marked it, so a WinoGrande run keeps its digest; ``"blank":
    False`` (a question of that shape in another dataset, once asked as a blank sentence) stays in, so a run scored the
    old way is not resumed."""
    def as_read(records):
        return [{k: v for k, v in r.items() if not (k == BLANK and v is True)} if isinstance(r, dict) else r
                for r in records]
    text = json.dumps({"train": as_read(train), "validation": as_read(val), "test": as_read(test),
                       "shifted": {name: as_read(records) for name, records in shifted.items()}},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _test_records(name, config):
    records = D.load_records(name, "test", config.data_dir)
    return D.subset(records, min(len(records), config.test_size), seed=0)


def train_map(setup: Setup, load=None) -> float:
    """Fine-tune the MAP LoRA (plain LoRA through the Pyro model) and remember its trained state
    (``setup.trained_state``, its digest ``setup.map_digest``); returns its training seconds.

    :param load: ``setup -> seconds or None``, e.g. ``RunFolder.load_map``: where it writes a saved MAP into the
        network and returns that MAP's training seconds, the MAP is kept instead of trained (``setup.map_loaded``).
    """
    c = setup.config
    setup.initial_state = {n: p.detach().clone() for n, p in setup.net.named_parameters() if "lora_" in n or p.requires_grad}
    model = LoraModel(setup.net, setup.likelihood, random="AB", num_data=len(setup.train), prior=c.prior_scale)
    seconds = load(setup) if load is not None else None
    setup.map_loaded = seconds is not None
    if setup.map_loaded:
        model.set_trainable()  # as fit leaves them
        guide = MAPGuide(model)  # its mean: the loaded adapter
        take_over(model, guide)  # the head is the MAP's, as after its training
    else:
        start = time.perf_counter()
        guide = MAPGuide(model)
        setup.fit(model, guide)
        model.write_adapter({k: v.detach() for k, v in guide.mean().items()})
        seconds = time.perf_counter() - start
    setup.model, setup.map_guide = model, guide
    setup.trained_state = {n: p.detach().clone() for n, p in setup.net.named_parameters() if "lora_" in n or p.requires_grad}
    setup.trainable = {n: p.requires_grad for n, p in setup.net.named_parameters()}
    setup.freezes = set(lora_freezes(setup.net))
    setup.map_digest = state_digest(setup.trained_state)
    return seconds


def state_digest(state: dict) -> str:
    """SHA-256 of a network state (name -> tensor): names, dtypes, shapes and values, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_config(config: CompareConfig, guides=None, writes: bool = True, trains: bool = True) -> str:
    """Refuse, before any model is loaded, a ``config`` that cannot run; returns the dataset's task.

    Checks the methods (``guides``, default ``config.guides``) exist and apply to the task, the datasets and
    shifted sets exist with one task the model can take (multiple choice a causal LM, not an encoder:
    :func:`~pyro_lora.model_files.encoder_only`; each shifted set another folder than the training set's and
    the others': names are compared by the folder they read, ``sst2/`` is ``sst2``), the multiple-choice settings apply, the training set
    can be split, a local checkpoint's trained classification head has the dataset's classes (their number, and their
    names and order where its ``id2label`` names them: :func:`~pyro_lora.model_files.check_head_classes`),
    ``max_length`` fits the model's positions, the device exists and (with ``writes``)
    ``config.out`` can be written. ``trains=False``: a run that trains nothing (``evaluate``, ``bayesianize``), whose
    ``epochs`` may be None (:func:`check_numbers`).

    :raises ValueError: naming what is wrong (with its command-line flag) and what to do.
    """
    guides = config.guides if guides is None else guides
    methods = [get_method(name) for name in guides or ()]
    check_numbers(config, trains)
    dataset_meta = D.load_meta(config.dataset, config.data_dir)
    task = dataset_meta["task"]
    encoder = encoder_only(config.model) if task != "classification" else None
    if encoder:  # loaded as a causal LM, it would score the choices with a freshly drawn LM head
        raise ValueError(f"--model {config.model} is an encoder for classification sets, and --dataset {config.dataset} is "
                         f"a {task} set, whose choices a causal LM scores ({encoder}): use --model smollm2 (or a causal LM "
                         "folder)")
    if task == "classification" and (config.mc_format or config.mc_normalize):
        raise ValueError(f"--mc-format / --mc-normalize apply to multiple-choice sets, and --dataset {config.dataset} is a "
                         "classification set: leave them out")
    _check_normalize(config, expected_format(config, task))
    if config.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--load-in-4bit loads the base through bitsandbytes, which is not installed: pip install bitsandbytes")
    if config.load_in_4bit and str(config.model).endswith(".gguf"):
        raise ValueError(f"--load-in-4bit cannot quantise the GGUF file {config.model} (it is dequantised on load): save it "
                         "as a Hugging Face folder first, or use --model smollm2, which is cached as one")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    # a method runs its base's recipe too (a variant, or a chain of them): each one's constraints apply
    lineage = [(m, a) for m in methods for a in m.lineage]
    # read from the model's metadata only where a requested method does not take every format
    restricted = any(a.mc_formats != MC_FORMATS for _, a in lineage)
    mc_format = expected_format(config, task) if restricted else None
    untrained = [m.name for m in methods if m.needs_training]
    if config.epochs == 0 and untrained:
        raise ValueError(f"{', '.join(untrained)} train for --epochs (their own fit, or their base method's), and --epochs "
                         "is 0: give --epochs 1 or more, or leave them out")
    for m, a in lineage:
        who = m.name if a is m else f"{m.name} (through its base method {a.name})"
        if config.dtype == "fp16" and not a.float16:
            raise ValueError(f"{who} does not train on a float16 base ({a.summary}): give --dtype bf16 or fp32, or leave "
                             f"{m.name} out")
        if mc_format is not None and mc_format not in a.mc_formats:
            raise ValueError(f"{who} does not apply to the {mc_format} multiple-choice format ({a.summary}): it applies "
                             f"to {' and '.join(a.mc_formats)}; give --mc-format {a.mc_formats[0]}, or leave {m.name} out")
        if a.missing:
            raise ValueError(f"{who} needs {', '.join(a.missing)}, which is not installed: pip install {' '.join(a.missing)}, "
                             f"or leave {m.name} out")
        if task not in a.tasks:
            raise ValueError(f"{who} does not apply to {task} sets like {config.dataset!r} ({a.summary}): it applies to "
                             f"{' and '.join(a.tasks)} sets; leave {m.name} out")
    # by the folders they read: "sst2/" or a link is the training set (scored against itself as a shift), and
    # "a,a/" one set twice
    seen = {D.dataset_folder(config.dataset, config.data_dir): f"the training set {config.dataset!r}"}
    for name in config.eval_datasets:
        folder = D.dataset_folder(name, config.data_dir)
        if folder in seen:
            raise ValueError(
                f"--eval-datasets {','.join(config.eval_datasets)}: {name!r} reads the folder {folder}, as {seen[folder]} "
                f"does: it repeats a set or names the training set {config.dataset!r}, and its rows would merge with "
                "those of that set; list each shifted set once, not the training set")
        seen[folder] = repr(name)
    names = dataset_meta.get("label_names")
    check_eval_sets(config, dataset_meta)
    if task == "classification":  # a local checkpoint's trained head: its classes, by number and by name
        check_head_classes(config.model, len(names), names)
    limit = max_positions(config.model)
    if limit is not None and config.max_length > limit:
        raise ValueError(f"--max-length {config.max_length} is beyond {config.model}'s {limit} positions: use at most {limit}")
    if writes:
        writable_folder(config.out)
    return task


def check_eval_sets(config: CompareConfig, dataset_meta: dict) -> None:
    """Refuse a shifted set of ``config.eval_datasets`` of another task than the dataset's (its ``meta.json``,
    ``dataset_meta``), or, for classification, with other ``label_names`` or the same in another order: labels are
    indices, so each of its examples would be scored as another class.

    :raises ValueError: naming the set, both lists of labels, and what to do.
    """
    task, names = dataset_meta["task"], dataset_meta.get("label_names")
    for name in config.eval_datasets:
        meta = D.load_meta(name, config.data_dir)
        if meta["task"] != task:
            raise ValueError(f"evaluation set {name!r} is not a {task} dataset like {config.dataset!r}")
        # as every label list is compared (label_key): case, surrounding spaces and Unicode's spellings aside
        if task == "classification" and list(map(label_key, meta["label_names"])) != list(map(label_key, names)):
            raise ValueError(f"evaluation set {name!r} names its labels {meta['label_names']}, {config.dataset!r} "
                             f"{names}: labels are compared by index, so each would be scored as another class; give "
                             "both sets the same label_names in the same order")


def _check_normalize(config: CompareConfig, fmt) -> None:
    """Refuse ``--mc-normalize`` for a run scoring the letter format ``fmt``: it was dropped without a word (the scores
    those of no normalisation) while ``results.json`` recorded it, as ``MultipleChoice`` refuses it."""
    if config.mc_normalize and fmt == "letter":
        chosen = "" if config.mc_format else f" (the default for --model {config.model}, of about 1B parameters or more)"
        raise ValueError(f"--mc-normalize {config.mc_normalize} divides a cloze choice's log-likelihood by its length, and "
                         f"this run scores the letter format{chosen}, one answer token per choice: use --mc-format cloze, "
                         "or leave --mc-normalize out")


def expected_format(config: CompareConfig, task: str):
    """The multiple-choice format a run of ``config`` will use, before loading: ``--mc-format``, else the model's
    default from its metadata (:func:`~pyro_lora.pretrained.expected_mc_format`); ``None`` for classification or
    where the metadata does not tell (then ``prepare`` resolves it from the loaded model)."""
    if task != "multiple_choice":
        return None
    return config.mc_format or expected_mc_format(config.model)


def default_guides(config: CompareConfig) -> list:
    """The methods ``compare`` runs when ``config.guides`` names none: every method that applies to the dataset's
    task, its multiple-choice format, the epochs (none that trains with ``epochs=0``) and the base's dtype (none that
    refuses a float16 base), and whose packages are installed."""
    task = D.load_meta(config.dataset, config.data_dir)["task"]
    return methods_for_task(task, expected_format(config, task), config.epochs, config.dtype)


# setting -> (its flag, smallest value, whether that value is allowed): the CLI's bounds, for configs from Python
# or from a run record
_BOUNDS = {"train_size": ("--train-size", 2, True), "test_size": ("--test-size", 1, True), "samples": ("--samples", 1, True),
           "epochs": ("--epochs", 0, True), "batch_size": ("--batch-size", 1, True), "rank": ("--rank", 1, True),
           "max_length": ("--max-length", 8, True), "lr": ("--lr", 0, False), "prior_scale": ("--prior-scale", 0, False),
           "alpha": ("alpha", 0, False)}


def check_numbers(config: CompareConfig, trains: bool = True):
    """Refuse a size, count or scale out of range, or a device that is none of cpu, cuda, naming the setting.
    ``trains=False`` (a run that trains nothing) takes ``epochs`` None: a ``bayesianize`` record of an adapter from
    elsewhere holds it, its training unknown.

    :raises ValueError: naming the setting's flag and its range.
    """
    for key, (flag, low, inclusive) in _BOUNDS.items():
        value = getattr(config, key)
        if value is None and (key == "lr" or (key == "epochs" and not trains)):  # lr: resolved by the task
            continue
        integer = key not in ("lr", "prior_scale", "alpha")
        number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise ValueError(f"{flag} {value!r} must be {'an integer' if integer else 'a number'} "
                             f"{'>=' if inclusive else '>'} {low}")
    seeds = config.seeds
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32 for x in seeds):
        raise ValueError(f"seeds {seeds!r} must be integers in [0, 2**32)")
    if config.mc_format not in (None, "letter", "cloze"):
        raise ValueError(f"--mc-format {config.mc_format!r} is none of letter, cloze")
    if config.mc_normalize not in (None, "tokens", "chars"):
        raise ValueError(f"--mc-normalize {config.mc_normalize!r} is none of none, tokens, chars")
    if config.dtype not in DTYPES:
        raise ValueError(f"--dtype {config.dtype!r} is none of {', '.join(DTYPES)}")
    for flag, value in (("--load-in-4bit", config.load_in_4bit), ("--ts", config.ts)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} {value!r} is no boolean")
    if str(config.device).split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device {config.device!r} is none of cpu, cuda")
