"""SVI training: a Pyro ELBO with a differentiable loss, one fused torch optimizer over the model's point estimates and the guide."""

from __future__ import annotations

import collections.abc
import contextlib
import functools
import hashlib
import json
import math
import numbers
import os
import random
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, SubsetRandomSampler
from tqdm.auto import tqdm

from . import distributed, pyro_params
from .contract import check_guide, check_model, check_ranks_agree, require_lora_guide, tempered_training
from .ownership import fixed_posterior_message, point_snapshot, record_fit, take_over
from .data import to_device
from .modes import dropout_probabilities, eval_mode, network_mode
from .pyro_stack import check_no_handlers
from .model import HALF_DTYPES, full_precision, warn_unscaled
from .checks import (check_batch, check_count, check_data_given, check_flag, check_not_inference_mode, check_path,
                     check_reiterable, known_length)
from .likelihoods import scored_labels
from .locking import slot_lock
from .sites import base_network
from .callers import user_stacklevel


class DivergenceError(FloatingPointError):
    """Training stopped: the loss became non-finite or rose far above where it started."""


@dataclass
class FitState:
    """What a callback sees after each optimizer step (``step`` counts from 1, ``epoch`` from 0, in this fit);
    ``epochs`` and ``steps_per_epoch`` are the run's (``steps_per_epoch`` is ``None`` for data without a length);
    ``skipped``: float16's loss scaler skipped this step (its gradients overflowed), so the weights did not move;
    ``lr``: the learning rate this step took (the schedule's, of the first parameter group)."""

    step: int
    epoch: int
    loss: float
    kl_weight: float
    model: object
    guide: object
    epochs: int = 1
    steps_per_epoch: int | None = None
    skipped: bool = False
    lr: float | None = None


def fit(
    model,
    guide,
    data,
    *,
    epochs=1,
    lr=1e-3,
    elbo=None,
    weight_decay=0.0,
    lr_schedule="constant",
    warmup_steps=0,
    kl_weight=1.0,
    train_network=True,
    grad_accum_steps=1,
    max_grad_norm=None,
    autocast=None,
    callbacks=(),
    checkpoint_dir=None,
    checkpoint_every=None,
    resume=False,
    gradient_checkpointing=False,
    stop_on_divergence=True,
    progress=True,
) -> list[float]:
    """Train ``guide`` (and the model's non-random parameters) by minimising ``elbo`` on ``data``.

    The loss per step is ``elbo.differentiable_loss(model, guide, batch) / num_data``: the negative
    ELBO per training example, with minibatches scaled to the full data by the model's data plate.
    One ``torch.optim.AdamW`` (fused on CUDA) holds every parameter; Pyro's param store is not used.

    :param data: iterable of batches, dicts of batched tensors (``input_ids`` ``[B, L]``, ``attention_mask`` ``[B, L]``,
        ``labels`` ``[B]``), e.g. a ``DataLoader`` with a collator; re-iterated each epoch. Without a length (a
        ``DataLoader`` over an ``IterableDataset``), what a length checks before the run is checked as it goes: a model
        without ``num_data`` is warned of once a second batch is read, a warmup the run ends inside after an epoch.
    :param elbo: a Pyro ELBO with ``differentiable_loss`` (default ``Trace_ELBO()``); ``TraceMeanField_ELBO()`` uses
        closed-form KLs. ``TraceGraph_ELBO`` and ``RenyiELBO`` train through ``pyro.infer.SVI``; the JIT ELBOs are
        refused (the model refuses to be traced).
    :param float weight_decay: AdamW's decoupled weight decay, on every parameter the run trains alike: the guide's
        (means, and the unconstrained scale parameters too, which it pulls toward ``softplus(0)`` or 0) and the
        network's point parameters (head weights and biases). The prior already regularises the sites: leave it 0 for a
        variational guide.
    :param lr_schedule: ``"constant"``, ``"linear"`` (decay to 0) or ``"cosine"``, after ``warmup_steps`` (the decays
        need data with a length).
    :param kl_weight: a float or a callable ``step -> float`` (KL annealing; must be > 0).
    :param int grad_accum_steps: micro-batches per optimizer step, each weighted by its examples: the step is one
        batch holding them all (``KL + N / sum_k b_k sum_i l_i``); an epoch's last group may hold fewer (weighted so
        too), never carried into the next epoch.
    :param max_grad_norm: clip the global gradient norm to it before each step (``None``: no clipping).
    :param train_network: ``False`` trains the guide's parameters only; the network's point estimates (a head,
        non-random LoRA matrices) stay as they are: post-hoc VI around a fitted network.
    :param autocast: ``torch.bfloat16`` or ``torch.float16`` for autocast, ``False`` for none (default bf16 on CUDA, none on
        CPU; a half-precision network always runs under autocast in its own dtype, see :class:`~pyro_lora.model.LoraModel`;
        an enclosing ``torch.autocast`` is switched off for the run). A network computing in float16 (a float16 base, or
        ``autocast=torch.float16``) trains with a loss scaler (``torch.amp.GradScaler``): steps whose gradients
        overflowed are skipped (their loss is still in the returned list; a warning counts them).
    :param bool gradient_checkpointing: switch transformers' activation checkpointing on (non-reentrant) for
        the run; gradients equal those without it. A network whose checkpointing the user switched on
        (``gradient_checkpointing_enable()``, either mode) works too.
    :param bool stop_on_divergence: raise :class:`DivergenceError` (a learning rate far too high) when the data
        NLL per example (the likelihood term alone, whatever ``num_data`` and the KL weight; per scored token for a
        token-level likelihood, ``CausalLM``, whose example's NLL sums its tokens), smoothed over steps,
        rises above four times the first step's plus four nats; or when, after an epoch, the first batch's NLL
        at the posterior mean (one more forward, in eval mode) exceeds its NLL before the run by more than half
        of it or half a nat, whichever is more (training on a batch should not make it worse); a non-finite
        loss always raises it.
    :param callbacks: callables ``f(FitState)`` run after each optimizer step. One with an ``on_divergence()`` method
        has it called when the run raises :class:`DivergenceError` (or another ``FloatingPointError``: a
        half-precision forward that overflowed as the weights blew up) after its first step, to undo what it kept of the diverged run (a
        :class:`~pyro_lora.guides.SWAGCollector` takes its iterates back out); a string it returns is added to the
        error as a note.
    :param checkpoint_dir: if given, the guide is saved there (atomically) every ``checkpoint_every``
        steps and at the end, with its ``fit_progress`` (the step reached, of how many, and whether the run finished:
        :func:`~pyro_lora.io.load_guide` warns of an unfinished one). A checkpoint before the end also holds
        ``fit_state.pt``, what ``resume`` continues from: AdamW's moments, the schedule, the loss scaler, the step and
        the position in the epoch (the batches read; whether the data had run out, as before an epoch's last, partial
        group's step), the losses so far, the global RNGs (torch's, the CPU's and the device's; Python's ``random``'s
        and numpy's), every random generator the data hold (a ``DataLoader``'s own, and those of its samplers,
        dataset and ``collate_fn``, under any attribute, however nested) and the ``epoch`` of those with
        ``set_epoch``, at the epoch's start and at the step. The final save holds the guide only. A new run on an
        unfinished run's checkpoint warns before its first step.
    :param bool resume: continue the unfinished run whose checkpoint is in ``checkpoint_dir``: its guide and point
        parameters are loaded into ``guide`` and the model, and the run goes on as if never stopped (the same
        parameters as an uninterrupted run's, where the data's order and augmentation come from the global RNGs, the
        data's generators or ``set_epoch``: the epoch's order is replayed to where the checkpoint was taken).
        ``model``, ``guide``, ``data`` and every setting must be the run's: the data's length, batch size, drop_last
        and samplers are compared, and of its contents the resumed epoch's batches read before the checkpoint (a
        digest); a callable ``kl_weight`` is not called to check it (a function of the step is assumed).
    :returns: list of per-step losses.
    :raises TypeError: if ``model`` is no :class:`~pyro_lora.LoraModel` (:func:`~pyro_lora.contract.check_model`).
    :raises ValueError: inside ``torch.inference_mode()`` or a Pyro handler other than ``poutine.block`` and
        ``poutine.seed`` (``poutine.scale``, ``trace``, ``condition``, a plate...: :func:`check_training_context`),
        before any work (under ``torch.no_grad()`` the run switches gradients on: the same run as outside it);
        if ``guide`` was built on another model object (:func:`~pyro_lora.contract.check_guide`),
        on an ``epochs``, ``warmup_steps`` (longer than the run too), ``lr``, ``weight_decay`` (``lr * weight_decay``
        at least 1 too), ``grad_accum_steps``,
        ``max_grad_norm`` or ``checkpoint_every`` out of range (or without ``checkpoint_dir``), a switch
        (``train_network``, ``gradient_checkpointing``, ``stop_on_divergence``, ``progress``) that is no bool, two
        :class:`~pyro_lora.guides.SWAGCollector` callbacks filling one SWAG guide, an ELBO it cannot step, on a
        one-shot iterator with ``epochs > 1``, a decaying ``lr_schedule`` over data without a length, a batch that
        is no dict of batched tensors (a list's first before any work, a loader's as read),
        with ``resume``, a checkpoint that cannot be resumed (none, finished, saved without its state, of a model or
        guide this one's differs from) or settings or data other than the run's (each named; data whose replayed epoch
        ends elsewhere than the run's, or whose replayed batches are not the run's, before their first step), data
        without a length,
        ``torch.distributed``, a ``DataLoader`` with persistent workers or a ``SWAGCollector`` callback,
        a ``checkpoint_dir`` that is no path, a file or a link or cannot be written or that another fit checkpoints to (a
        :class:`~pyro_lora.locking.FolderLocked`: each run holds a lock beside it), a guide at a posterior temperature other than 1 (training would undo it), settings (``checkpoint_dir``,
        the callbacks' classes, the guide's and the model's: :meth:`~pyro_lora.LoraModel.settings`, its prior and
        likelihood) that differ across ranks, before any work, a callable ``kl_weight`` that gives the ranks other
        weights, at that step before its update, and on an epoch that yields no batch.
    :raises DivergenceError: see ``stop_on_divergence``.

    Under ``torch.distributed`` (``W > 1`` ranks, see :mod:`pyro_lora.distributed`): every rank is given
    the same ``data`` and trains on its block of ``len(data) // W`` batches per epoch; rank 0's parameters
    are broadcast first and each rank then draws its own noise (one shared stream again after fit:
    :func:`~pyro_lora.distributed.rank_streams`). ``num_data`` is required, and the settings must be the same on
    every rank. Each rank's loss is already a full-data estimate (its data plate scales its local batch ``b`` to
    ``num_data``, and the weight sites are counted once), so gradients (and the reported loss) are *averaged* over
    ranks, each weighted by its examples: ``sum_w b_w/B [KL + N/b_w sum_{i in w} l_i] = KL + N/B sum_i l_i``, the
    estimate of one process on the global batch of ``B`` examples: the data term is scaled to ``N`` once and the KL
    counted once (with ``grad_accum_steps``, every micro-batch of every rank is weighted so).
    """
    from .io import check_folder_slot, directory_written, save_checkpoint, save_guide

    with contextlib.ExitStack() as held:  # the checkpoint_dir's lock, for the whole run
        held.enter_context(torch.enable_grad())  # the run takes gradients, under an enclosing torch.no_grad() too
        with distributed.refused_together("fit"):  # a refusal on one rank only would leave the others waiting
            check_training_context("fit")
            check_model(model, "fit")
            # first (a collective, which a rank refused earlier would skip): a rank's own checkpoint_dir was refused by
            # the first save, after the run; other steps or schedules would leave ranks waiting or apart
            require_lora_guide(guide, "fit")
            callbacks = _checked_callbacks(callbacks)
            if isinstance(elbo, type):
                raise ValueError(f"elbo is the class {elbo.__name__}, not an ELBO: give an instance, elbo={elbo.__name__}()")
            check_data_given(data)
            if checkpoint_dir is not None:
                check_path(checkpoint_dir, "checkpoint_dir")
            arguments = {  # what every rank, and a resumed run, must share
                "epochs": epochs, "lr": lr, "elbo": type(elbo).__name__, "weight_decay": weight_decay,
                "lr_schedule": lr_schedule, "warmup_steps": warmup_steps,
                "kl_weight": "a callable" if callable(kl_weight) else kl_weight, "train_network": train_network,
                "grad_accum_steps": grad_accum_steps, "max_grad_norm": max_grad_norm, "autocast": str(autocast),
                "stop_on_divergence": stop_on_divergence,
                "num_data": model.num_data,  # each rank would scale its data term to its own N
            }
            # and the guide as built: its options map one set of parameters to another posterior on each rank (a
            # std per rank, each rank its own posterior), its tensors' shapes to sums of other sizes (gloo aborted)
            guide_settings = {f"guide's {k}": v for k, v in {"class": type(guide).__name__, **guide.config()}.items()}
            guide_settings["guide's tensor shapes"] = [tuple(t.shape) for t in [*guide.parameters(), *guide.buffers()]]
            # and the model, which defines the loss: a prior or likelihood per rank averaged the gradients of other
            # losses into one blended posterior; the callbacks by class, as a collective one (SWAGCollector) runs on all
            model_settings = {f"{_MODEL}{k}": v for k, v in (model.settings().items() if distributed.is_distributed() else ())
                              if k != "num_data"}
            # and what changes every gradient but the arguments name by class or not at all: the ELBO's particles,
            # each dropout rate (set on the module at run time too); flat, so a difference names its module
            dropouts = {"dropout": _dropouts(model), "lora_dropout": _lora_dropout(model)}
            network = {**{f"dropout {k}": p for k, p in dropouts["dropout"].items()},
                       **{f"lora_dropout of {k}": p for k, p in dropouts["lora_dropout"].items()}} \
                if distributed.is_distributed() else {}
            distributed.check_settings("fit", {**arguments, "elbo": _describe_elbo(elbo or Trace_ELBO()),
                                               "checkpoint_every": checkpoint_every, **guide_settings,
                                               **model_settings, **network, "callbacks": [type(cb).__name__ for cb in callbacks],
                                               "checkpoint_dir": os.path.abspath(checkpoint_dir) if checkpoint_dir else None})
            grad_accum_steps = check_count(grad_accum_steps, "grad_accum_steps")
            # the string "False" is truthy: the head trained under train_network="False"; and as Python bools: numpy's
            # True was recorded as "True", which refused a resume given True
            train_network, gradient_checkpointing, stop_on_divergence, progress = (
                check_flag(flag, name) for flag, name in ((train_network, "train_network"),
                                                          (gradient_checkpointing, "gradient_checkpointing"),
                                                          (stop_on_divergence, "stop_on_divergence"), (progress, "progress")))
            # as Python ints: a numpy int64 reached fit_progress, which no checkpoint or save_guide could write as JSON
            epochs = check_count(epochs, "epochs", minimum=0)
            warmup_steps = check_count(warmup_steps, "warmup_steps", minimum=0)
            arguments.update(epochs=epochs, warmup_steps=warmup_steps, grad_accum_steps=grad_accum_steps,  # as ints
                             train_network=train_network, stop_on_divergence=stop_on_divergence)  # and bools
            if checkpoint_every is not None:
                checkpoint_every = check_count(checkpoint_every, "checkpoint_every",
                                               alternative="or None: a checkpoint at the end only")
                if not checkpoint_dir:  # else no checkpoint would be written, without a word
                    raise ValueError(f"checkpoint_every={checkpoint_every} without checkpoint_dir saves nothing: give "
                                     "checkpoint_dir (where the checkpoints go), or leave checkpoint_every out")
            if checkpoint_dir:
                if resume and not directory_written(checkpoint_dir):  # refused before the folders above it are created
                    raise ValueError(f"resume=True: checkpoint_dir {checkpoint_dir} does not exist, so there is no run to "
                                     "resume; fit without resume=True starts one")
                check_folder_slot(checkpoint_dir, "fit saves the guide there as a folder: choose another checkpoint_dir")
                if distributed.is_main():  # the rank that writes it; a second fit there would replace its checkpoints
                    held.enter_context(slot_lock(checkpoint_dir, f"checkpoint_dir {checkpoint_dir} (a fit checkpoints there)"))
            if not (_finite(lr) and lr >= 0):
                raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
            if not (_finite(weight_decay) and weight_decay >= 0):
                raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
            if lr * weight_decay >= 1:  # else a divergence an epoch later, blamed on the learning rate alone
                raise ValueError(f"lr * weight_decay = {lr * weight_decay:g} >= 1: AdamW multiplies every trained weight by "
                                 "1 - lr * weight_decay each step, which zeroes or flips them; weight_decay is a rate per "
                                 "unit learning rate (typically 0.01-0.1)")
            if max_grad_norm is not None and not (_finite(max_grad_norm) and max_grad_norm > 0):
                raise ValueError(f"max_grad_norm must be a finite number > 0 (None: no clipping), got {max_grad_norm!r}")
            autocast, forward_dtype = training_autocast(model, autocast)
            if not callable(kl_weight):
                kl_weight = _kl_weight(kl_weight, 0)
            # as Python floats, recorded and handed to the optimiser: a numpy lr went into AdamW's param_groups and the
            # checkpoint, which a resume's weights_only load refused as corrupt; a tensor kl_weight was compared by its
            # printed form (0.5 and 0.50004 alike, 0.5 and tensor(0.5) apart)
            lr, weight_decay = float(lr), float(weight_decay)
            max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
            arguments.update(lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                             kl_weight="a callable" if callable(kl_weight) else kl_weight)
            if epochs > 1:
                check_reiterable(data, "data", f"epochs={epochs} needs them every epoch")
            if isinstance(data, (list, tuple)) and data:  # a loader's batches are checked as read (to_device)
                check_batch(data[0])
            length = known_length(data)
            _Schedule(lr_schedule, warmup_steps, length)  # a decay to 0 over a run of unknown length is refused
            elbo = elbo or Trace_ELBO()
            _check_elbo(elbo)
            num_data = model.num_data  # None: each batch is the whole training set, its loss per its own examples
            model.set_trainable()
            for path in model.frozen_initial_heads() if train_network else ():
                warnings.warn(f"fit trains no parameter of {path}: peft saves it with the adapter, but the adapter is in "
                              "inference mode (LoraConfig(inference_mode=True), or loaded with is_trainable=False), which "
                              "froze it while it still equals the base model's own module: for a head the checkpoint "
                              "lacked, its random initialisation; build the adapter with inference_mode=False, or set "
                              "requires_grad on it, to train it", stacklevel=user_stacklevel())
            device = model.device
            params = (model.point_parameters() if train_network else []) + [p for p in guide.parameters() if p.requires_grad]
            if not params:
                raise ValueError("nothing to train: the guide has no trainable parameters, and " + (
                    "train_network=False leaves the network's point parameters alone" if model.point_parameters()
                    else "the model no point parameters"))
            # first: a cast network (net.to(bfloat16)) also changed the head the guide was built beside, the lesser news
            check_full_precision(params, "fit", "AdamW's updates underflow there (the head becomes nan)")
            check_guide(model, guide, "fit", same_model=True)
            if guide.fitted_at_head and train_network:
                raise ValueError(fixed_posterior_message(guide, "fit would train the head under it"))
            tempered = tempered_training(guide, "fit")
            if tempered:
                raise ValueError(tempered)
            if distributed.is_distributed() and model.num_data is None:  # each rank's batch would count as the data
                raise ValueError(f"under torch.distributed ({distributed.world_size()} ranks) the model needs num_data (the "
                                 "training set's size): without it each rank scales its data term to its own batch, so the "
                                 "averaged loss counts the data once per rank and the prior W times")
            warn_unscaled(model, length or 0, "fit")  # data without a length: once a second batch is read
            _warn_num_data(model, data)
            beta = kl_weight if callable(kl_weight) else (lambda step: kl_weight)
            # what a resume must repeat; none for data without a length (no position to count) or under torch.distributed
            # (each rank draws from its own streams)
            resumable = checkpoint_dir and length is not None and not distributed.is_distributed()
            if resume and not resumable:
                raise ValueError("resume=True continues the run whose checkpoint is in checkpoint_dir: " + (
                    "give checkpoint_dir" if not checkpoint_dir else "it needs data with a length (its position in an "
                    "epoch is counted in batches)" if length is None else "under torch.distributed it is not supported "
                    "(each rank draws from its own random streams); rerun the fit from the start"))
            _check_collectors(callbacks)
            if resume:
                _check_resumable(data, callbacks)
            keepers = _order_keepers(data) if resumable else ([], [])  # saved and restored for a resume alone
            settings = resumable and _settings(guide, length, keepers, _describe_data(data), **{
                **arguments, "elbo": _describe_elbo(elbo), "autocast": str(autocast),  # as defaulted since
                **dropouts,
                # the base's dtype: a float32 run resumed on a bfloat16 cast of its base went on without a word (its
                # weights' fingerprint allows a cast), 9e-3 off the run's parameters
                "base_dtype": str(model.compute_dtype).removeprefix("torch."),
                # what defines the loss (a callable or dict prior's distributions, which load_guide names by class only)
                **{f"{_MODEL}{k}": v for k, v in model.settings().items()}})
            resumed = _resume_from(checkpoint_dir, model, guide, settings) if resume else None
            if resumed is not None and callbacks:
                warnings.warn(f"fit(resume=True): the callbacks' own state ({', '.join(type(cb).__name__ for cb in callbacks)})"
                              " is not in the checkpoint and is not restored; they see the steps from the resumed one on",
                              stacklevel=user_stacklevel())
            if checkpoint_dir and not resume:
                _warn_unfinished(checkpoint_dir)
        if distributed.is_distributed():  # its refusals (data that differ across ranks) before the guide takes anything over
            data = distributed.split_batches(data, even=True)  # the same number of steps on every rank
        # under torch.distributed, this rank's (every rank's alike); for data without a length, warmup_steps is checked
        # after each epoch (_warn_short_warmup)
        steps_per_epoch = math.ceil(known_length(data) / grad_accum_steps) if length is not None else None
        total = steps_per_epoch * epochs if steps_per_epoch else None
        if total is not None and warmup_steps > total:
            raise ValueError(f"warmup_steps={warmup_steps} is longer than the run's {total} optimizer steps: the learning rate "
                             f"would never reach lr; use at most {total}")
        # what is not broadcast below (the network less what fit trains) must be the same on every rank
        check_ranks_agree(model, None, "fit", handed=True, broadcast=params)
        if train_network:
            take_over(model, guide)
            guide._point_snapshot = None  # live while it trains them (callbacks, checkpoints); taken again at the end
        distributed.broadcast_parameters(params + [b for b in guide.buffers() if b.is_floating_point()])
        # what fit does not train still gets gradients from its backward passes: set aside and put back as found, or an
        # optimiser that zeroes after its step (Pyro's SVI) would add the whole run's sum to its first step
        trained = {id(p) for p in params}
        untrained = {p: p.grad for p in (*model.net.parameters(), *guide.parameters()) if p.requires_grad and id(p) not in trained}
        for p in (*params, *untrained):  # a gradient left by earlier work would join the first step (backward adds in place)
            p.grad = None
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
        # fp16's narrow range underflows small gradients: scale the loss up, unscale before the update, skip steps that
        # overflowed (bf16 has fp32's range and needs none)
        scaler = torch.amp.GradScaler(device.type, enabled=forward_dtype == torch.float16)
        schedule = _Schedule(lr_schedule, warmup_steps, total)  # its total is saved and restored with the scheduler's state
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        net = model.net
        guide.train()
        losses, step, skipped_steps, short_warmup = [], 0, 0, False
        kl_weights = []  # each step's, as used: a callable is called as often as without checkpoints (one may count calls)
        # a checkpoint (or a save) of a run that stops says so: load_guide warns of it
        guide.fit_progress = {"step": 0, "steps": total, "epoch": 0, "epochs": epochs, "finished": False}
        shown = _Smoothed()  # the bar's number: the data NLL (per example or scored token), which moves as the model learns
        watch = _DivergenceWatch(lr, unit=nll_unit(model)) if stop_on_divergence else None
        if resumed is not None:
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            if scaler.is_enabled():
                scaler.load_state_dict(resumed["scaler"])
            if watch is not None:
                watch.start, watch.ema, first = resumed["watch"]
                watch.first = first and (to_device(first[0], device), first[1])
            losses, skipped_steps = list(resumed["losses"]), resumed["skipped_steps"]
            kl_weights = list(resumed["kl_weights"])
            guide.fit_progress = dict(resumed["progress"])
            step = guide.fit_progress["step"]
        first_run_step = step  # this run's first step is step + 1: a resumed run's too
        bar = tqdm(total=total, initial=step, desc=f"fit {type(guide).__name__}",
                   disable=not (progress and distributed.is_main()), dynamic_ncols=True)

        def take_step(accumulated, epoch, weight, rows, reference):
            """The optimizer step on the gradients of the last micro-batches, of ``rows`` examples, each loss weighted by
            its examples over ``reference``: scaled here to their weighted mean, one batch of them all (an equal mean
            would weigh a short batch's examples up), which under ``torch.distributed`` is each rank's weight too."""
            nonlocal step, skipped_steps
            if rows != reference:  # micro-batches of other sizes than the group's first, or an epoch's last partial group
                scale = reference / rows
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
                accumulated *= scale
                for meter in (shown, watch):
                    if meter is not None:
                        meter.step_nll *= scale
            accumulated = distributed.all_reduce_gradients(params, accumulated, weight=rows)
            if not math.isfinite(accumulated):
                raise DivergenceError(
                    f"the loss became {accumulated} at step {step} (epoch {epoch}): the learning rate ({lr:g}) is "
                    "likely too high (or half precision overflowed); lower it or set max_grad_norm"
                )
            if watch is not None:
                watch.update(step, epoch, rows)
            if max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            scale = scaler.get_scale() if scaler.is_enabled() else None
            step_lr = optimizer.param_groups[0]["lr"]  # this step's, before the schedule moves it
            scaler.step(optimizer)
            scaler.update()
            skipped = scale is not None and scaler.get_scale() < scale  # the scaler backs off exactly where it skipped
            skipped_steps += skipped
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(accumulated)
            kl_weights.append(weight)
            step += 1
            guide.fit_progress = {"step": step, "steps": total, "epoch": epoch, "epochs": epochs, "finished": False}
            bar.update()
            bar.set_postfix(shown.postfix(accumulated), epoch=epoch)
            state = FitState(step, epoch, accumulated, weight, model, guide, epochs, steps_per_epoch, skipped, step_lr)
            for cb in callbacks:
                cb(state)
            if checkpoint_dir and checkpoint_every and step % checkpoint_every == 0:
                if settings:  # with what resume=True continues from: the run's state after this step
                    save_checkpoint(guide, checkpoint_dir, {
                        "progress": guide.fit_progress, "settings": settings, "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "losses": losses,
                        "kl_weights": kl_weights, "skipped_steps": skipped_steps, "seen": seen, "ran_out": ran_out,
                        "digest": digest.hexdigest(),
                        "epoch_rng": epoch_rng, "rng": _rng_state(device, keepers),
                        "watch": watch and (watch.start, watch.ema, watch.first and (_storable(watch.first[0]), watch.first[1]))})
                else:
                    save_guide(guide, checkpoint_dir)

        try:
            # validation syncs the GPU once per site; the fused optimizer above holds the parameters, not Pyro's store
            # an enclosing autocast is switched off for the run (backward and checks too): autocast= alone sets the forward's
            with pyro.validation_enabled(False), pyro_params.own_optimizer(), _activation_checkpointing(net, gradient_checkpointing), \
                    distributed.rank_streams(), full_precision(device), network_mode(net, True):
                start_epoch = resumed["progress"]["epoch"] if resumed else 0
                for epoch in range(start_epoch, epochs):
                    if steps_per_epoch is not None and epoch > start_epoch:
                        steps_per_epoch, total = _replan(schedule, data, grad_accum_steps, steps_per_epoch, step, epoch,
                                                         epochs)
                        bar.total = total
                    skip = resumed["seen"] if resumed and epoch == resumed["progress"]["epoch"] else 0
                    if skip:  # the epoch's order replayed from its start, to where the run's checkpoint was taken
                        _set_rng_state(resumed["epoch_rng"], device, keepers)
                    epoch_rng = settings and _rng_state(device, keepers)
                    batches, digest = iter(data), settings and hashlib.blake2b(digest_size=16)
                    if skip:
                        _replay(batches, skip, resumed["ran_out"], digest, resumed.get("digest"))
                        _set_rng_state(resumed["rng"], device, keepers)
                    accumulated, pending, seen, rows, first_step, ran_out = 0.0, 0, skip, 0, step, False
                    for batch in batches:
                        seen += 1
                        if digest:
                            _digest_batch(digest, batch)
                        batch = to_device(batch, device)  # refuses what is no batch (a TensorDataset's lists)
                        if length is None and epoch == 0 and seen == 2:  # the warning a length gave before the run
                            warn_unscaled(model, seen, "fit (over data without a length, its batches counted as read)")
                        examples = _examples(batch)
                        if not examples:  # a group's weights divide by its examples
                            raise ValueError(f"the batch has no rows (labels of shape {tuple(batch['labels'].shape)}): an "
                                             "empty batch scores nothing; leave it out of the data")
                        if not pending:  # the group's first batch: a full group of equal batches needs no rescaling
                            reference = examples * grad_accum_steps
                        rows += examples
                        share = examples / reference
                        # a schedule per rank would train at the ranks' mean weight
                        weight = (_same_kl_weight if callable(kl_weight) else _kl_weight)(beta(step), step)
                        if watch is not None and watch.first is None:
                            watch.first = (batch, _mean_nll(model, guide, batch))
                        with step_autocast(device, autocast):
                            loss = elbo.differentiable_loss(model, guide, batch, kl_weight=weight) / (num_data or examples)
                        scaler.scale(loss * share).backward()
                        accumulated += loss.item() * share
                        pending += 1
                        shown.observe(model.last_nll, share)
                        if watch is not None:
                            watch.observe(model.last_nll, share)
                        if pending == grad_accum_steps:
                            take_step(accumulated, epoch, weight, rows, reference)
                            accumulated, pending, rows = 0.0, 0, 0
                    ran_out = True  # the epoch's last, partial group steps (and checkpoints) after its data ran out
                    if not seen:
                        raise ValueError(f"data yielded no batch in epoch {epoch}: it is empty, or an iterator that a "
                                         "previous epoch used up")
                    if pending:  # never carried into the next epoch's first step, nor dropped
                        take_step(accumulated, epoch, weight, rows, reference)
                    if total is None and not short_warmup:
                        short_warmup = _warn_short_warmup(warmup_steps, step, step - first_step, epoch, epochs)
                    if watch is not None and watch.first is not None:
                        # each step's NLL is sampled, before its update and on another batch: the epoch is judged on
                        # the first batch at the posterior mean, as before the run
                        watch.check_first_batch(_mean_nll(model, guide, watch.first[0]), epoch)
        except FloatingPointError as error:  # DivergenceError, or a half-precision forward that overflowed on the way
            # what a callback kept of the diverged run (a SWAGCollector's iterates) it undoes, once it ran in this run
            for cb in callbacks if step > first_run_step else ():
                if callable(getattr(cb, "on_divergence", None)):
                    note = cb.on_divergence()
                    if note:
                        error.add_note(note)
            raise
        finally:
            bar.close()
            optimizer.zero_grad(set_to_none=True)
            for p, grad in untrained.items():
                p.grad = grad
            guide._point_snapshot = point_snapshot(model)
        if skipped_steps:
            warnings.warn(f"fit: float16's loss scaler skipped {skipped_steps} of {step} optimizer steps (their gradients "
                          f"overflowed): the weights moved on {step - skipped_steps}; where that is many, lower lr, set "
                          "max_grad_norm, or train in bfloat16 or float32", stacklevel=user_stacklevel())
        if train_network:
            record_fit(model, guide)
        guide.fit_progress.update(steps=step, finished=True)
        if checkpoint_dir:
            save_guide(guide, checkpoint_dir)
        return losses


def check_training_context(who: str, pyro_handlers: bool = True) -> None:
    """Refuse to run ``who``, a training loop of its own, where it would not compute what it does outside any context:
    inside ``torch.inference_mode()``, whose tensors never carry gradients (``torch.no_grad()`` is fine: the loop
    switches gradients on itself); with ``pyro_handlers``, for a loop running the model's Pyro sites, inside a Pyro
    handler that would change its inference (:func:`~pyro_lora.pyro_stack.check_no_handlers`).

    :raises ValueError: naming the context, and to call ``who`` outside it.
    """
    check_not_inference_mode(f"run {who}", "training takes gradients")
    if pyro_handlers:
        check_no_handlers(who)


# what orders a loader's data beside the global RNGs; numpy's RandomState is a Generator's legacy twin
_RNGS = (torch.Generator, random.Random, np.random.Generator, np.random.RandomState)
# not searched: data, objects of their own (a model), and modules (shared by all, not the loader's)
_UNSEARCHED = (torch.Tensor, np.ndarray, torch.nn.Module, types.ModuleType, str, bytes, numbers.Number)
_SEARCHED_ITEMS = 1000  # a longer list, tuple or dict holds data (a dataset's rows, a vocabulary), not their order
_SEARCHED_OBJECTS = 100_000  # the search's bound: beyond, the graph is data
_CONTAINERS = (dict, list, tuple, collections.deque)  # not sets: no fixed order to give their generators states back in


def _order_keepers(data) -> tuple[list, list]:
    """What orders ``data`` beside the global RNGs, each once, in a fixed order: every random generator (a
    ``torch.Generator``, ``random.Random``, numpy ``Generator`` or ``RandomState``) that the loader holds anywhere
    (:func:`_held`: its sampler, batch sampler, dataset, ``collate_fn`` and ``worker_init_fn``, under any attribute,
    in lists, tuples and dicts, class attributes, closures, however nested: ``Wrap(RandomSampler(ds, generator=g))``
    keeping it as ``self.inner``, a ``ConcatDataset``'s datasets), and the objects there with ``set_epoch`` (a
    ``DistributedSampler`` orders by its ``epoch``, a count no generator holds). Tensors, arrays, ``nn.Module``s and
    modules are not searched, nor containers of more than ``_SEARCHED_ITEMS`` items, nor past ``_SEARCHED_OBJECTS``
    objects; ``random.SystemRandom`` has no state to keep. What the search misses (a generator made on first use, one in
    a Module) a resume finds by the replayed batches' digest (:func:`_replay`).
    """
    rngs, epoched, todo, visited = [], [], [data], set()
    while todo and len(visited) < _SEARCHED_OBJECTS:
        obj = todo.pop()
        if obj is None or isinstance(obj, _UNSEARCHED) or id(obj) in visited:
            continue
        visited.add(id(obj))
        if isinstance(obj, _RNGS):
            if not isinstance(obj, random.SystemRandom):
                rngs.append(obj)
            continue
        if callable(getattr(type(obj), "set_epoch", None)) and isinstance(getattr(obj, "epoch", None), int):
            epoched.append(obj)
        todo.extend(reversed(_held(obj)))  # popped in the order held
    return rngs, epoched


def _held(obj) -> list:
    """What ``obj`` holds, for :func:`_order_keepers`: a container's items (a dict's values; none past
    ``_SEARCHED_ITEMS``), a class's attributes and bases; else (a container's subclass too) its attributes
    (``__dict__``'s and slots') and class, a method's object and function, a property's functions, a partial's function
    and arguments, a function's closure cells and the generators among the globals its code names (a script's
    ``rng = np.random.default_rng(0)``; its other globals are not searched: that would search whole modules)."""
    held = []
    if isinstance(obj, _CONTAINERS):
        held = [] if len(obj) > _SEARCHED_ITEMS else list(obj.values() if isinstance(obj, dict) else obj)
        if type(obj) in _CONTAINERS:  # a subclass's attributes too (a dataset subclassing list)
            return held
    if isinstance(obj, type):
        return [*vars(obj).values(), *obj.__bases__]
    attributes = getattr(obj, "__dict__", None)
    held += [type(obj), *(attributes.values() if isinstance(attributes, dict) else ())]
    for cls in type(obj).__mro__:
        slots = vars(cls).get("__slots__", ())
        held += [getattr(obj, name, None) for name in ([slots] if isinstance(slots, str) else slots)
                 if name not in ("__dict__", "__weakref__")]
    if isinstance(obj, (types.MethodType, types.BuiltinMethodType, staticmethod, classmethod, property)):
        held += [getattr(obj, name, None) for name in ("__self__", "__func__", "fget", "fset", "fdel")]
    if isinstance(obj, functools.partial):
        held += [obj.func, *obj.args, *obj.keywords.values()]
    if isinstance(obj, types.FunctionType):
        held += [*(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()]
        for cell in obj.__closure__ or ():
            with contextlib.suppress(ValueError):  # a cell not yet filled holds nothing
                held.append(cell.cell_contents)
        held += [value for name in _names(obj.__code__) if isinstance(value := obj.__globals__.get(name), _RNGS)]
    return held


def _names(code) -> list:
    """The names ``code`` looks up (globals and attributes), and those of the code defined in it (a lambda's)."""
    nested = (const for const in code.co_consts if isinstance(const, types.CodeType))
    return [*code.co_names, *(name for inner in nested for name in _names(inner))]


def _replay(batches, seen, ran_out, digest, recorded) -> None:
    """Move ``batches``, a new iterator over the resumed epoch, to where the run's checkpoint was taken: past the
    ``seen`` batches it read and, where the checkpoint came after the epoch's data ran out (its last, partial group's
    step), past their end too, for running out draws (a ``RandomSampler`` draws one more permutation, of which it yields
    none) and the saved state holds that draw. The batches go into ``digest`` (:func:`_digest_batch`), which must come
    to the run's ``recorded`` one (``None``: a checkpoint of an earlier version, not compared).

    :raises ValueError: where the data end elsewhere than the run's did (an ``IterableDataset`` yielding another number
        of batches than its length says), or the replayed batches differ from those the run read (other data, or
        randomness the checkpoint does not hold), before anything is trained on them.
    """
    end, read = object(), 0
    while read < seen and (batch := next(batches, end)) is not end:
        _digest_batch(digest, batch)
        read += 1
    if read < seen or (ran_out and next(batches, end) is not end):
        what = (f"ran out after {read} of the {seen} batches the run read" if read < seen else
                f"went on past its {seen} batches, where the run's ran out")
        raise ValueError(f"fit(resume=True): the epoch's data {what}: they are not the run's data; resume on the run's "
                         "data, or rerun the fit from the start")
    if recorded is not None and digest.hexdigest() != recorded:
        raise ValueError(
            f"fit(resume=True): the epoch's first {seen} batches, replayed, are not those the run read (their contents "
            "differ): the data changed, or something random that orders or transforms them is not in the checkpoint (a "
            "generator made on first use, as transformers' DataCollatorForLanguageModeling(seed=...) does, one held by a "
            "torch Module, random.SystemRandom), so the run cannot go on as it would have; rerun the fit from the start")


def _digest_batch(digest, batch) -> None:
    """Add the tensors of ``batch`` (a dict; anything else is refused later by ``to_device``) to ``digest``: each key,
    dtype, shape and bytes, read on the CPU."""
    if not isinstance(batch, collections.abc.Mapping):
        return
    for key in sorted(batch, key=str):
        value = batch[key]
        if torch.is_tensor(value):
            digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _describe_elbo(elbo) -> str:
    """The ELBO's class, and its particles where they are not one unvectorised draw: each changes every gradient."""
    particles, vectorized = getattr(elbo, "num_particles", 1), getattr(elbo, "vectorize_particles", False)
    name = type(elbo).__name__
    return name if (particles, vectorized) == (1, False) else f"{name}(num_particles={particles}, vectorize_particles={vectorized})"


def _lora_dropout(model) -> dict:
    """Module path -> the adapter's ``lora_dropout`` probability there: a training setting of peft's config."""
    dropouts = ((path, getattr(layer, "lora_dropout", {})) for path, layer in model.layers.items())
    return {path: float(getattr(d[model.adapter], "p", 0.0)) if model.adapter in d else 0.0 for path, d in dropouts}


def _dropouts(model) -> dict:
    """``"<module>.<what>"`` -> each probability above 0 the network's forward draws with in training
    (:func:`~pyro_lora.modes.dropout_probabilities`: dropout modules, and rates held as floats or config keys), set at
    run time too, where the config (compared with the model's settings) no longer says it; peft's ``lora_dropout``
    is :func:`_lora_dropout`'s."""
    return {f"{name}.{what}": p for name, probs in dropout_probabilities(model.net, as_set=False).items()
            if ".lora_dropout." not in f".{name}." for what, p in probs.items()}


def _describe_data(data) -> dict:
    """What identifies ``data``'s batches without reading an item: the dataset's length, the batch size, drop_last and
    the samplers (their types, nested, and sizes: whether and how it shuffles); for a list of batches, each batch's
    rows. Contents are not compared (that would read the data)."""
    if isinstance(data, (list, tuple)):
        return {"batch_rows": [_examples(batch) if isinstance(batch, dict) else None for batch in data]}

    def sampler(s):
        inner = getattr(s, "sampler", None)
        fields = [sampler(inner)] if inner is not None else []
        fields += [f"{k}={getattr(s, k)!r}" for k in ("batch_size", "drop_last", "replacement", "num_samples")
                   if hasattr(s, k)]
        return f"{type(s).__name__}({', '.join(fields)})"

    dataset = getattr(data, "dataset", None)
    return {"examples": len(dataset) if hasattr(dataset, "__len__") else None,
            "batch_size": getattr(data, "batch_size", None), "drop_last": getattr(data, "drop_last", None),
            **{name: sampler(getattr(data, name)) for name in ("sampler", "batch_sampler")
               if getattr(data, name, None) is not None}}


def _check_collectors(callbacks) -> None:
    """Refuse two :class:`~pyro_lora.guides.SWAGCollector` callbacks (or one listed twice) filling one SWAG guide:
    each would collect every iterate, so the guide would count it twice (its mean unchanged, its covariance not)."""
    from .guides import SWAGCollector

    filled = [id(cb.swag) for cb in callbacks if isinstance(cb, SWAGCollector)]
    if len(filled) != len(set(filled)):
        raise ValueError("callbacks: two SWAGCollector callbacks (or one listed twice) fill the same SWAG guide, which "
                         "would collect every iterate twice (num_collected doubled, the deviations repeated in its "
                         "covariance); give each SWAG guide one collector")


def _check_resumable(data, callbacks) -> None:
    """Refuse a resume that would not continue the run as it was: persistent DataLoader workers (the run's iterator
    drew their seed in its first epoch, a new one draws again, and the order moves) or a callback whose state the
    library knows is not saved (a :class:`~pyro_lora.guides.SWAGCollector` restarts empty)."""
    from .guides import SWAGCollector

    if getattr(data, "persistent_workers", False) and getattr(data, "num_workers", 0) > 0:
        raise ValueError("resume=True cannot replay a DataLoader with persistent_workers=True (num_workers="
                         f"{data.num_workers}): its workers' seed was drawn once in the run's first epoch and a new "
                         "iterator draws another, so the data order would differ; build the loader with "
                         "persistent_workers=False (for the run and the resume), or rerun the fit from the start")
    kept = [type(cb).__name__ for cb in callbacks if isinstance(cb, SWAGCollector)]
    if kept:
        raise ValueError(f"resume=True cannot continue the callbacks {', '.join(kept)}: their state (the iterates a "
                         "SWAGCollector gave its SWAG guide up to the checkpoint) is not in the checkpoint, so a SWAG guide "
                         "of a new process would lack them, and one that followed the run holds those of the steps after "
                         "the checkpoint too, which the resumed run would collect again; rerun the fit from the start")


def _warn_unfinished(path) -> None:
    """Warn that a new run is about to overwrite the unfinished run's checkpoint at ``path`` (``resume`` forgotten)."""
    from .io import _read_meta

    if not (Path(path) / "guide.json").exists():
        return
    p = _read_meta(Path(path)).get("fit") or {}
    if p and not p.get("finished"):
        warnings.warn(f"fit: {path} holds the checkpoint of an unfinished run (step {p['step']} of {p['steps']}); this "
                      "new run overwrites it from its first checkpoint on: fit(..., resume=True) continues that run "
                      "instead", stacklevel=user_stacklevel())


def _rng_state(device, keepers) -> dict:
    """The global RNGs' states (torch's, the CPU's and the device's on CUDA; Python's ``random``'s and numpy's, which
    ``pyro.set_rng_seed`` seeds alike and a dataset may shuffle with), and those of the data's ``keepers``
    (:func:`_order_keepers`): each generator's state, each ``set_epoch`` holder's epoch. numpy's arrays are kept as
    lists: a checkpoint loads them with ``weights_only``."""
    rngs, epoched = keepers
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "random": random.getstate(), "numpy": _listed(np.random.get_state(legacy=False)),
            "generators": [_listed(_get_rng(rng)) for rng in rngs], "epochs": [obj.epoch for obj in epoched]}


def _storable(batch):
    """The batch's tensors as a checkpoint keeps them (nested in dicts, lists and tuples as given); other entries are
    left out: the batch only feeds the divergence watch's NLL, which reads the likelihood's tensors. A resume loads the
    checkpoint with ``weights_only``, which refused a collate's numpy column (or any object) as a corrupt file."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return {k: v for k, v in ((k, _storable(v)) for k, v in batch.items()) if v is not _LEFT_OUT}
    if isinstance(batch, (list, tuple)):
        kept = [v for v in map(_storable, batch) if v is not _LEFT_OUT]
        return kept if len(kept) == len(batch) else _LEFT_OUT  # a list with a part left out is no longer that list
    return _LEFT_OUT


_LEFT_OUT = object()  # what _storable leaves out of a checkpointed batch


def _set_rng_state(state, device, keepers) -> None:
    """Put back what :func:`_rng_state` took (a checkpoint of an earlier version holds no epochs, nor Python's or
    numpy's state)."""
    rngs, epoched = keepers
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "random" in state:
        random.setstate(state["random"])
        np.random.set_state(state["numpy"])
    for rng, saved in zip(rngs, state["generators"]):
        _set_rng(rng, saved)
    for obj, epoch in zip(epoched, state.get("epochs", ())):
        obj.set_epoch(epoch)


def _get_rng(rng):
    """The state of ``rng``, one of ``_RNGS``."""
    if isinstance(rng, torch.Generator):
        return rng.get_state()
    if isinstance(rng, random.Random):
        return rng.getstate()
    return rng.bit_generator.state if isinstance(rng, np.random.Generator) else rng.get_state(legacy=False)


def _set_rng(rng, state) -> None:
    """Put back the state :func:`_get_rng` took (numpy's takes its arrays as lists)."""
    if isinstance(rng, torch.Generator):
        rng.set_state(state)
    elif isinstance(rng, random.Random):
        rng.setstate(state)
    elif isinstance(rng, np.random.Generator):
        rng.bit_generator.state = state
    else:
        rng.set_state(state)


def _seed_rng(rng, seed: int) -> None:
    """Seed ``rng``, one of ``_RNGS``, from ``seed`` (any int in ``[0, 2**64)``)."""
    if isinstance(rng, torch.Generator):
        rng.manual_seed(seed)
    elif isinstance(rng, random.Random):
        rng.seed(seed)
    elif isinstance(rng, np.random.Generator):
        rng.bit_generator.state = type(rng.bit_generator)(seed).state
    else:
        rng.set_state(np.random.RandomState(np.random.MT19937(seed)).get_state())


@contextlib.contextmanager
def data_order_seeded(data, seed: int):
    """Inside, every generator that orders ``data`` beside the global RNGs (:func:`_order_keepers`: a
    :func:`~pyro_lora.data.make_loader` loader's own, a sampler's, a dataset's) is seeded: the first found with
    ``seed``, each other with a seed derived from ``seed`` and its place (a sampler's and a dataset's masking generator
    do not draw alike), and a
    ``set_epoch`` holder (a ``DistributedSampler``) is at epoch 0 with ``seed`` as its seed; after, each is put back
    as it was. A run started inside draws its data order from ``seed``, not from how many passes the loader made
    before (an ensemble's members). Not reached: a persistent worker's copies of the dataset, and a generator shared
    with another loader that draws from it meanwhile."""
    rngs, epoched = _order_keepers(data)
    states, epochs = [_get_rng(rng) for rng in rngs], [obj.epoch for obj in epoched]
    seeded = [obj for obj in epoched if isinstance(getattr(obj, "seed", None), int)]
    seeds = [obj.seed for obj in seeded]
    try:
        for i, rng in enumerate(rngs):  # the first (a make_loader loader's only one) takes seed itself
            derived = int(np.random.SeedSequence(seed, spawn_key=(i,)).generate_state(1, np.uint64)[0] >> 1)
            _seed_rng(rng, seed if i == 0 else derived)
        for obj in epoched:
            obj.set_epoch(0)
        for obj in seeded:
            obj.seed = seed
        yield
    finally:
        for rng, state in zip(rngs, states):
            _set_rng(rng, state)
        for obj, epoch in zip(epoched, epochs):
            obj.set_epoch(epoch)
        for obj, own in zip(seeded, seeds):
            obj.seed = own


def _listed(state):
    """``state`` with its numpy arrays (of a numpy RNG's state) as lists."""
    if isinstance(state, dict):
        return {key: _listed(value) for key, value in state.items()}
    return state.tolist() if isinstance(state, np.ndarray) else state


def _settings(guide, length, keepers, data, **arguments) -> dict:
    """What a resumed run must share with the one it continues, as JSON values: ``fit``'s ``arguments``, the guide's
    class and config, the data's length, description (:func:`_describe_data`) and order keepers (how many random
    generators and ``set_epoch`` holders: :func:`_order_keepers`). A callable kl_weight is not called for them (one
    that counts its calls would be moved on): only that it is one is compared."""
    from .io import standard_json

    return json.loads(json.dumps(standard_json({
        **arguments, **data, "guide": f"{type(guide).__module__}:{type(guide).__qualname__}", "config": guide.config(),
        "batches": length, "generators": len(keepers[0]), "set_epoch": len(keepers[1]),
    }), default=str))


_RECORDED_SINCE = {"base_dtype", "batch_rows", "dropout", "lora_dropout", "set_epoch"}  # settings a checkpoint of an earlier version lacks: not compared
_MODEL = "model's "  # the model's settings (LoraModel.settings) among a run's, which checkpoints of earlier versions lack


def _is_model_key(key: str) -> bool:
    return key.startswith(_MODEL)


def _difference(key, then, now) -> str:
    """How the setting ``key`` differs: both values, or for two dicts (one entry per module) the entries that differ."""
    if isinstance(then, dict) and isinstance(now, dict):
        changed = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
        shown = ", ".join(f"{k} {then.get(k)!r} there, {now.get(k)!r} here" for k in changed[:3])
        return f"{key}: {shown}{f' (and {len(changed) - 3} more)' if len(changed) > 3 else ''}"
    return f"{key}: {then!r} there, {now!r} here"


def _resume_from(path, model, guide, settings) -> dict:
    """The training state of the unfinished run whose checkpoint is at ``path``, once its guide and the network's point
    parameters are loaded into ``guide`` and ``model`` (:func:`~pyro_lora.io.load_guide`'s checks).

    :raises ValueError: if there is none to resume, or ``settings`` (:func:`_settings`) differ from the run's, naming
        each, before anything changes.
    """
    from .io import _load_guide, read_fit_state

    state = read_fit_state(path)
    then = state["settings"]
    since = _RECORDED_SINCE | ({k for k in settings if _is_model_key(k)} if not any(map(_is_model_key, then)) else set())
    keys = (then.keys() | settings.keys()) - (since - then.keys())
    legacy = "base_dtype" not in then  # recorded numpy and tensor settings by their printed form
    differ = [_difference(k, then.get(k), settings.get(k)) for k in sorted(keys)
              if then.get(k) != settings.get(k) and not (legacy and _printed_alike(then.get(k), settings.get(k)))]
    if differ:
        raise ValueError(f"cannot resume the run at {path} with settings other than its own ({'; '.join(differ)}): the "
                         "run would not go on as it was; give the run's, or start a new run in another checkpoint_dir")
    loaded = _load_guide(Path(path), model, None)
    with torch.no_grad():
        guide.load_state_dict(loaded.state_dict())
    take_over(model, guide)
    guide.adopt_point_parameters()
    # a checkpoint of an earlier version holds no ran_out: the data had run out where the run read all the epoch's
    # batches and they end in a partial group (a full one steps as its last batch is read, before they run out)
    batches, group = settings["batches"], settings["grad_accum_steps"]
    state.setdefault("ran_out", state["seen"] == batches and batches % group != 0)
    return state


def _printed_alike(then, now) -> bool:
    """Whether a checkpoint of an earlier version recorded the setting ``now`` (a bool or a number) as ``then``: it wrote
    numpy bools and numbers as their strings ('True', '1.0'), a tensor kl_weight as its print ('tensor(0.5000)', 4
    decimals), which the Python values given now never equal."""
    if not isinstance(then, str) or isinstance(now, str) or now is None:
        return False
    printed = then.startswith("tensor(") and then.endswith(")")
    text = then[len("tensor("):-1] if printed else then
    if isinstance(now, bool):
        return text == str(now)
    try:
        value = float(text)
    except ValueError:
        return False
    return value == now or (printed and abs(value - now) <= 5e-5 * max(1.0, abs(now)))


def _check_elbo(elbo) -> None:
    """Refuse an ELBO fit cannot step: one without ``differentiable_loss`` (TraceGraph_ELBO, RenyiELBO), or a JIT one
    (it compiles the model's Python, checks included, on the first batch only)."""
    name = type(elbo).__name__
    if name.startswith("Jit"):
        raise ValueError(f"fit cannot train with {name}: it JIT-compiles the loss, and the model's checks of each batch "
                         "with it (they would run on the first batch only); fit takes Trace_ELBO, TraceMeanField_ELBO or "
                         "TraceEnum_ELBO")
    if not callable(getattr(elbo, "differentiable_loss", None)):
        raise ValueError(f"fit cannot train with {name}: it has no differentiable_loss; fit takes Trace_ELBO, "
                         f"TraceMeanField_ELBO or TraceEnum_ELBO, and pyro.infer.SVI(model, guide, optim, {name}()) "
                         "trains with it")
    particles = getattr(elbo, "num_particles", 1)
    if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:  # 0: a loss of 0.0, no backward
        raise ValueError(f"{name}(num_particles={particles!r}): an ELBO averages at least one particle; give "
                         "num_particles >= 1")


class _Smoothed:
    """The progress bar's figure: the data NLL per example (per scored token for a token-level likelihood,
    :func:`~pyro_lora.likelihoods.data_nll`), smoothed over steps. The loss per example adds the prior's term divided
    by the data size, nearly constant for a point estimate (it hid the learning)."""

    def __init__(self, decay=0.9):
        self.decay, self.value, self.step_nll, self.seen = decay, None, 0.0, False

    def observe(self, nll, share):
        if nll is not None:
            self.step_nll += float(nll) * share
            self.seen = True

    def postfix(self, loss):
        """``{"nll": ...}`` once a likelihood reported its NLL this step, else ``{"loss": ...}``."""
        if not self.seen:
            return {"loss": f"{loss:.4f}"}
        value = self.step_nll if self.value is None else self.decay * self.value + (1 - self.decay) * self.step_nll
        self.value, self.step_nll, self.seen = value, 0.0, False
        return {"nll": f"{value:.4f}"}


class _DivergenceWatch:
    """The data NLL (the likelihood term alone: the ELBO's prior term scales with 1/N), smoothed over steps against
    the first step's, and the first batch's at the posterior mean before and after each epoch. ``unit`` names what it is
    taken over (:func:`nll_unit`): per example, or per scored token for a token-level likelihood, whose per-example NLL
    sums a sequence's tokens and so follows the rows' lengths from batch to batch."""

    def __init__(self, lr, decay=0.9, remedy="lower it or set max_grad_norm (stop_on_divergence=False turns this check off)",
                 unit="per example"):
        self.lr, self.decay, self.remedy = lr, decay, remedy  # remedy: what the trainer's caller can change
        self.unit = unit
        self.start = self.ema = None
        self.first = None  # (the first batch, its NLL per example at the posterior mean before any update)
        self.step_nll, self.seen = 0.0, False

    def observe(self, nll, share):
        """After each batch's loss: ``nll`` is the model's ``last_nll`` (``None`` for a likelihood that keeps none), in
        the watch's ``unit``, ``share`` the batch's weight in its step (as its loss's)."""
        if nll is None:
            return
        self.step_nll += float(nll) * share
        self.seen = True

    def update(self, step, epoch, rows=1):
        """After the batches of one optimizer step, of ``rows`` examples on this rank (its weight across ranks)."""
        if not self.seen:
            return
        nll = distributed.all_reduce_gradients([], self.step_nll, weight=rows)
        self.step_nll, self.seen = 0.0, False
        if not math.isfinite(nll):
            raise DivergenceError(f"the data NLL became {nll} at step {step} (epoch {epoch}): the learning rate ({self.lr:g}) is likely too high")
        if self.start is None:
            self.start = self.ema = nll
        self.ema = self.decay * self.ema + (1 - self.decay) * nll
        if self.ema > 4 * self.start + 4.0:
            raise DivergenceError(
                f"training diverged: the smoothed data NLL rose from {self.start:.4g} to {self.ema:.4g} {self.unit} by "
                f"step {step} (epoch {epoch}); the learning rate ({self.lr:g}) is likely too high: {self.remedy}"
            )

    def check_first_batch(self, nll, epoch):
        """After each epoch: ``nll`` is the first batch's NLL at the posterior mean now (:func:`_mean_nll`, in the
        watch's ``unit``), judged against the one before the run (``None``: a guide whose mean predicts nothing)."""
        if nll is None or self.first[1] is None:
            return
        before, after = (distributed.all_reduce_gradients([], v) for v in (self.first[1], nll))
        self._judge(before, after, f"of the first batch rose from {before:.4g} before the run to {after:.4g} after epoch {epoch}")

    def _judge(self, before, after, what):
        if not after <= before + max(0.5 * before, 0.5):  # training on data should not make it worse
            raise DivergenceError(
                f"training diverged: the data NLL {self.unit} {what}; the learning rate ({self.lr:g}) is likely too "
                f"high: {self.remedy}"
            )


def _mean_nll(model, guide, batch):
    """The data NLL of ``batch`` at the posterior mean (per example, or per scored token for a token-level likelihood:
    :func:`~pyro_lora.likelihoods.data_nll`), in eval mode (no dropout: no random draw at all)."""
    if not guide.mean_is_predictor:
        return None
    with eval_mode(model.net), torch.no_grad():
        return float(batch_nll(model, batch, guide.mean()) * per_unit(model, batch))


def nll_unit(model) -> str:
    """What the divergence check's NLL is taken over for ``model``'s likelihood (:func:`per_unit`), for its messages."""
    return "per scored token" if model.likelihood.event_dims else "per example"


def per_unit(model, batch) -> float:
    """The factor turning ``batch``'s mean NLL per example (:func:`batch_nll`) into the data NLL the divergence check
    judges (:func:`~pyro_lora.likelihoods.data_nll`): 1 where each example is one label; for a token-level likelihood
    (``CausalLM``), whose example sums a sequence's scored tokens, its rows over its scored tokens (one host read).

    :raises ValueError: as the likelihood's ``observed`` does, for a batch without valid labels.
    """
    event_dims = model.likelihood.event_dims
    if not event_dims:
        return 1.0
    scored = scored_labels(model.likelihood.observed(batch), event_dims)
    return scored.numel() / max(int(scored.sum()), 1)


def batch_nll(model, batch, values=None):
    """Mean NLL per example of ``batch`` with the LoRA sites at ``values`` (``None``: the model at its start, as
    :meth:`~pyro_lora.LoraModel.logits`)."""
    logits = model.logits(batch, values)
    return -model.likelihood.distribution(logits).log_prob(model.likelihood.observed(batch)).float().mean()


@contextlib.contextmanager
def _activation_checkpointing(net, enable):
    """Switch transformers' activation checkpointing (non-reentrant) on within the block, if ``enable``."""
    base = base_network(net)
    new_api = hasattr(base, "activation_checkpointing_enable")  # transformers >= 5 renamed gradient_ to activation_
    if not enable or (base.is_activation_checkpointing if new_api else base.is_gradient_checkpointing):
        yield
        return
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support activation checkpointing: fit without gradient_checkpointing")
    if new_api:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        base.activation_checkpointing_disable() if new_api else base.gradient_checkpointing_disable()


def _same_kl_weight(weight, step: int) -> float:
    """:func:`_kl_weight` of a callable ``kl_weight``'s ``weight`` at ``step``, refused on every rank before the step's
    update where the ranks' weights differ (each rank's loss would weigh the KL its own way, and the averaged gradients
    train at their mean) or where one rank's is invalid (refused there alone, it left the others in the all-reduce).
    Checked as the schedule is called, not over the whole run beforehand (a run over data without a length has no
    known last step, and a schedule may count its calls): one all-reduce of four numbers per micro-batch, nothing
    beside a step's forward and backward, and none outside ``torch.distributed``.

    :raises ValueError: naming the step and each rank's weight, or the rank whose weight is invalid.
    """
    if not distributed.is_distributed():
        return _kl_weight(weight, step)
    try:
        weight, error = _kl_weight(weight, step), None
    except ValueError as caught:
        weight, error = 0.0, caught
    low, high = distributed.spread(torch.tensor([weight, float(error is not None)], dtype=torch.float64))
    if error is not None:
        raise error
    if high[1].item():
        raise ValueError(f"cannot fit: another rank's kl_weight schedule gave an invalid weight at step {step} (this "
                         "rank's is valid); give every rank the same schedule")
    if low[0].item() != high[0].item():
        weights = distributed.gather_cat(torch.tensor([weight], dtype=torch.float64)).tolist()
        raise ValueError(f"the ranks' kl_weight schedules gave different weights at step {step} ("
                         f"{', '.join(f'{w:g} on rank {r}' for r, w in enumerate(weights))}): each rank's loss would "
                         "weigh the KL its own way and the averaged gradients train at their mean; give every rank the "
                         "same schedule (not one per rank)")
    return weight


def _kl_weight(weight, step) -> float:
    """A KL weight as a float (a numpy or one-element tensor or array too); refused unless positive and finite."""
    if not isinstance(weight, numbers.Real) and callable(getattr(weight, "item", None)):
        try:
            weight = weight.item()
        except (ValueError, RuntimeError):  # more than one element: refused below
            pass
    if isinstance(weight, bool) or not (isinstance(weight, numbers.Real) and weight > 0 and math.isfinite(weight)):
        raise ValueError(
            f"kl_weight gave {weight!r} at step {step}: it must be a positive finite number (Pyro scales "
            "log-densities by it); start a KL warm-up from a small positive weight, e.g. max(1e-3, step / 100)"
        )
    return float(weight)


def check_full_precision(params, who, underflow) -> None:
    """Refuse trainable ``params`` held in float16 or bfloat16 (a network cast after its ``LoraModel`` was built, which
    holds them in float32): ``who``'s optimiser updates them in their own dtype, where ``underflow`` says what is lost.

    :raises ValueError: naming the half dtypes held, and the way out (float32 parameters, the base under autocast).
    """
    low = sorted({str(p.dtype) for p in params if p.dtype in HALF_DTYPES})
    if low:
        raise ValueError(f"{who} trains parameters held in {low}: {underflow}; keep the trainable parameters (LoRA, "
                         "head) in float32 and run the half-precision base under autocast")


def training_autocast(model, autocast):
    """``fit``'s / ``train_ivon``'s ``autocast`` checked: ``(dtype to autocast in, or False; the dtype the forward then
    computes in)``. ``None`` is bfloat16 on CUDA, none on the CPU; a half-precision base computes in its own dtype.

    Warns where ``autocast`` is given for a float64 network, which torch's autocast leaves in float64.

    :raises ValueError: for anything but ``None``, ``False``, ``torch.bfloat16`` or ``torch.float16``.
    """
    given, wide = autocast, _float64(model)
    if autocast is None:  # the default asks for none on a float64 network, which autocast would leave as it is
        autocast = torch.bfloat16 if model.device.type == "cuda" and not wide else False
    if autocast is not False and autocast not in HALF_DTYPES:
        raise ValueError(f"autocast must be torch.bfloat16, torch.float16, False (none) or None (bfloat16 on CUDA, none "
                         f"on the CPU), got {autocast!r}")
    if wide and autocast:  # the run would be float64's, without a word (and float16's loss scaler run for nothing)
        warnings.warn(f"autocast={given} has no effect on this float64 network: torch's autocast casts float32 operations "
                      "only, so the forward computes in float64; cast the network to float32 (net.float()) to train "
                      "under autocast", stacklevel=user_stacklevel())
        autocast = False
    if model.compute_dtype in HALF_DTYPES:
        return autocast, model.compute_dtype
    return autocast, torch.float64 if wide else autocast or torch.float32


def _float64(model) -> bool:
    """Whether ``model``'s network computes in float64: its ``compute_dtype`` (its input embedding's), or for a network
    without an input embedding (``compute_dtype`` float32 by default) its first floating-point parameter's."""
    if model.compute_dtype != torch.float32:
        return model.compute_dtype == torch.float64
    first = next((p for p in model.net.parameters() if p.is_floating_point()), None)
    return first is not None and first.dtype == torch.float64


def step_autocast(device, autocast):
    """The autocast of one training forward: ``autocast`` as :func:`training_autocast` returned it (``False``: none)."""
    return torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=bool(autocast))


def _finite(value):
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def _examples_drawn(data):
    """``(fewest, most)`` examples a ``DataLoader`` draws from its map-style dataset in an epoch, read from its sampler
    (its length: the dataset's, a ``SubsetRandomSampler``'s indices), the fewest less what ``drop_last`` leaves out;
    ``None`` where that is not known without reading the data: other data, an ``IterableDataset``, no automatic
    batching, a sampler of one's own, one drawing with replacement or another number than its source's, a
    ``DistributedSampler`` (one rank's part)."""
    if not isinstance(data, DataLoader) or not isinstance(data.batch_sampler, BatchSampler):  # IterableDataset: None
        return None
    sampler, batch = data.batch_sampler.sampler, data.batch_sampler.batch_size
    known = (type(sampler) in (SequentialSampler, SubsetRandomSampler)
             or type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == len(sampler.data_source))
    if not known:
        return None
    size = len(sampler)
    return (size - size % batch if data.batch_sampler.drop_last else size), size


def _warn_num_data(model, data) -> None:
    """Warn where the model's ``num_data`` is not the number of examples a ``DataLoader`` trains on
    (:func:`_examples_drawn`): the data term is scaled to ``num_data``, so the prior weighs ``examples / num_data`` of
    what it should against the data (a posterior too wide or too narrow)."""
    drawn = _examples_drawn(data) if model.num_data is not None else None
    if drawn is None or drawn[0] <= model.num_data <= drawn[1]:
        return
    size = drawn[1]
    warnings.warn(f"the model has num_data={model.num_data}, but fit's DataLoader draws {size} examples an epoch "
                  f"(len(loader.dataset) is {len(data.dataset)}): the data term is scaled to num_data, so the prior "
                  f"weighs {size / model.num_data:.3g}x what it should against the data; build the model with "
                  f"num_data={size} (the training set's size)", stacklevel=user_stacklevel())


def _warn_short_warmup(warmup, step, epoch_steps, epoch, epochs) -> bool:
    """After ``epoch`` of a run over data without a length (whose warmup could not be checked before it), at ``step``
    optimizer steps, ``epoch_steps`` of them in this epoch: warn where the run ends inside its warmup (the learning rate
    never reaches lr), supposing each epoch left gives as many steps. Returns whether it warned."""
    ahead = step + (epochs - epoch - 1) * epoch_steps
    if ahead >= warmup:
        return False
    when = (f"ended inside its warmup: {step} optimizer steps" if ahead == step else
            f"will end inside its warmup: epoch {epoch} gave {epoch_steps} optimizer steps, and {epochs} epochs of as "
            f"many make {ahead}")
    warnings.warn(f"fit: the run {when} of warmup_steps={warmup}: the learning rate reaches only {ahead / warmup:.2g} of "
                  "lr (its data has no length, so this could not be refused before the run, as it is for data with one); "
                  f"use warmup_steps <= {ahead}, or more epochs", stacklevel=user_stacklevel())
    return True


def _checked_callbacks(callbacks) -> list:
    """``callbacks`` as a list, each callable (one that is not failed after the run's first step, the guide moved).

    :raises ValueError: for one callable given alone, or what is no iterable of callables.
    """
    if callable(callbacks) or isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
        raise ValueError(f"callbacks must be a list of callables, each called with the FitState after every step, got "
                         f"{callbacks!r}" + (": pass [it]" if callable(callbacks) else ""))
    callbacks = list(callbacks)
    bad = [cb for cb in callbacks if not callable(cb)]
    if bad:
        raise ValueError(f"callbacks must be callables, each called with the FitState after every step: {bad[0]!r} is not")
    return callbacks


def _examples(batch: dict) -> int:
    """The examples of a batch: its labels' rows (a cloze batch's ``input_ids`` hold one row per choice)."""
    labels = batch.get("labels")
    return int(labels.shape[0]) if torch.is_tensor(labels) and labels.dim() > 0 else 1


class _Schedule:
    """The learning rate's factor at each step (``LambdaLR``'s): a linear warmup over ``warmup`` steps, then ``kind``
    (decaying to 0 at step ``total``, ``None`` for data without a length). An object, not a function: ``LambdaLR``
    saves and restores its ``total``, which :func:`_replan` may change.

    :raises ValueError: for an unknown ``kind``, or a decay over a run of unknown length.
    """

    def __init__(self, kind, warmup, total):
        if kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant', 'linear' or 'cosine', got {kind!r}")
        if kind != "constant" and total is None:
            raise ValueError(f"lr_schedule={kind!r} decays the learning rate to 0 over the run's optimizer steps, and data "
                             "without a length (a generator, a DataLoader over an IterableDataset) does not tell how many "
                             "there are: use lr_schedule='constant' (warmup_steps still applies), or data with a length")
        # a str (numpy's str_ went into LambdaLR's state, which a resume's weights_only load refused as corrupt)
        self.kind, self.warmup, self.total = str(kind), warmup, total

    def __call__(self, step):
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def _replan(schedule, data, grad_accum_steps, steps_per_epoch, step, epoch, epochs, caller="fit"):
    """At the start of ``epoch``, after ``step`` optimizer steps: where ``data``'s length gives another number of steps
    an epoch than ``steps_per_epoch`` (a bucketing sampler, a list extended between epochs), plan the schedule's end
    again as if every epoch left gave as many (the first epoch's count kept a decay ending early: the rest of the run
    trained at a learning rate of 0, or never decayed to 0), warning under a decaying schedule (as ``caller``).
    Returns the steps an epoch and the run's total steps."""
    now = math.ceil(known_length(data) / grad_accum_steps)
    total = step + now * (epochs - epoch)
    if now != steps_per_epoch:
        if schedule.kind != "constant":
            warnings.warn(f"{caller}: the data gives {now} optimizer steps in epoch {epoch}, {steps_per_epoch} in the epoch "
                          f"before: lr_schedule={schedule.kind!r} now decays to 0 at step {total} (as if every epoch left gave "
                          f"{now}), not at step {schedule.total}", stacklevel=user_stacklevel())
        schedule.total = total
    return now, total
