"""IVON: variational learning with the Improved Variational Online Newton optimiser (Shen et al., 2024), on LoRA as
in Cong et al. (2024).

:func:`train_ivon` trains the adapter's LoRA matrices and the head with ``ivon.IVON`` (package ``ivon-opt``): every
step runs the network on weights drawn from IVON's diagonal Gaussian and updates its mean and its diagonal Hessian
estimate. :class:`IVONGuide` holds that Gaussian over the LoRA sites, read off the trained optimiser.
"""

import math
import numbers
import warnings

import torch
from tqdm.auto import tqdm

from pyro_lora import distributed
from pyro_lora.distributions import checked_normal
from pyro_lora.callers import user_stacklevel
from pyro_lora.checks import check_batches, check_count, check_flag, check_initial_stds, float32_std_range
from pyro_lora.contract import check_model
from pyro_lora.ownership import take_over
from pyro_lora.data import to_device
from pyro_lora.model import LoraModel, full_precision
from pyro_lora.modes import network_mode
from pyro_lora.sites import check_values
from pyro_lora.training import (_DivergenceWatch, _replan, _Schedule, batch_nll, check_full_precision, check_training_context,
                                 nll_unit, per_unit, step_autocast, training_autocast)

from .base import LoraGuide
from .registry import Fitted, method

CLIP_RADIUS = 1e-3  # Cong et al.'s bound on each entry's preconditioned step: the step is at most lr * CLIP_RADIUS
ESS, WEIGHT_DECAY = 1e7, 1e-4  # Cong et al.'s: IVON's prior is N(0, 1 / (ess * weight_decay)), a std of 0.0316



def _placeholder_std(prior, shape) -> torch.Tensor:
    """The prior's std where it has a finite one, else 1: a placeholder :func:`pyro_lora.load_guide` fills (a Cauchy
    or Student-t prior of df <= 2 has none, and ``IVONGuide(model)`` failed, so its saved guide could not be loaded)."""
    try:
        std = prior.variance.sqrt()
    except NotImplementedError:  # a TransformedDistribution's
        return torch.ones(shape)
    return torch.where(torch.isfinite(std), std, torch.ones_like(std)).expand(shape)

class IVONGuide(LoraGuide):
    r"""IVON's posterior over the LoRA sites: ``q(theta_s) = N(m_s, diag(sigma_s^2))`` for every A and B site, with
    ``sigma = 1 / sqrt(ess * (h + delta))`` from IVON's Hessian estimate ``h``, effective sample size ``ess`` and
    weight decay ``delta`` (what ``ivon.IVON`` samples from).

    IVON trains the head too, but this guide's posterior is over the LoRA sites only: the head is a point
    parameter of the network, kept at IVON's mean (as every guide's head is), and its stds are dropped.

    Build it from a trained optimiser with :meth:`from_optimizer` (what :func:`train_ivon` returns);
    ``IVONGuide(model)`` alone is a placeholder that :func:`pyro_lora.load_guide` fills: means at the adapter's
    weights, stds at the prior's (1 where the prior has no finite variance: a Cauchy's).

    :param model: a :class:`~pyro_lora.LoraModel` whose sites are A and B matrices (``random="AB"``).
    :param dict locs: site -> mean (``site.shape``); default the adapter's current weights.
    :param dict stds: site -> positive std (``site.shape``); default the prior's std.
    :param dict trained_with: the IVON settings that trained it (a record kept in ``config()``; no effect); a
        ``clip_radius`` of ``None`` (how a saved guide holds an infinite one) is read as ``inf``, and an
        ``unfinished`` entry (a stopped run's, see :func:`train_ivon`) warns that it is not the run's result.
    :raises ValueError: for a model with other sites than A and B (``random="A"`` would drop B's uncertainty), or
        ``locs``/``stds`` not of the sites' shapes, stds that are no floats, a std not positive, or stds float32 cannot
        hold as a Gaussian's (:func:`~pyro_lora.checks.float32_std_range`: 5e-44 was stored as 0), or a
        ``trained_with`` whose ``unfinished`` entry is no run record.
    """

    fitted_at_head = True  # its stds were learnt with the head moving beside them

    def __init__(self, model, locs=None, stds=None, trained_with=None):
        _check_sites(model, "IVONGuide")
        super().__init__(model)
        locs = model.initial_values(locs)
        if stds is None:
            stds = {n: _placeholder_std(model.prior_distribution(s), s.shape) for n, s in self.sites.items()}
        check_values(self.sites, stds, allow_sample_dim=False, what="IVONGuide's stds")
        if not all(stds[n].is_floating_point() for n in self.sites):
            raise ValueError(f"IVONGuide: stds must be floating-point tensors, got {sorted({str(stds[n].dtype) for n in self.sites})}")
        if not all(bool((stds[n] > 0).all()) for n in self.sites):
            raise ValueError("IVONGuide: every std must be positive")
        # as stored (float32): a float64 model's ess of 1e90 gave stds of 5e-44, stored as 0 (log-densities NaN)
        check_initial_stds(torch.cat([stds[n].detach().float().flatten() for n in self.sites]), "IVONGuide",
                           "train with an ess near the number of training examples", kind="float32 stds",
                           effect="its log-densities would be NaN")
        for i, name in enumerate(self.sites):
            self.register_buffer(f"loc_{i}", locs[name].detach().float().clone().to(model.device))
            self.register_buffer(f"std_{i}", stds[name].detach().float().clone().to(model.device))
        self.trained_with = dict(trained_with or {})
        if "clip_radius" in self.trained_with and self.trained_with["clip_radius"] is None:
            self.trained_with["clip_radius"] = math.inf  # ivon-opt's default (no clip), which guide.json holds as null
        stopped = self.trained_with.get("unfinished")
        if stopped is not None and not isinstance(stopped, dict):  # a bare AttributeError from .get below otherwise
            raise ValueError(f"trained_with's 'unfinished' must be the stopped run's record (a dict of its 'step' and "
                             f"'steps', as train_ivon writes it) or absent, got {stopped!r}")
        if stopped:  # evaluating a stopped run is fine; mistaking it for the result is not
            warnings.warn(f"IVONGuide: this Gaussian is of a train_ivon run stopped after step {stopped.get('step')} of "
                          f"{stopped.get('steps')}, an intermediate state and not the run's result", stacklevel=user_stacklevel())

    @classmethod
    def from_optimizer(cls, model, optimizer):
        """The guide of a trained ``ivon.IVON`` whose parameters include every LoRA matrix of ``model``'s sites: means
        are the network's current weights (IVON's mean, outside ``sampled_params``), stds
        ``1 / sqrt(ess * (hess + weight_decay))`` of each parameter's group, entry by entry.

        ``trained_with["steps"]`` is ivon-opt's ``current_step``, which its ``state_dict`` leaves out: an optimiser
        resumed from one counts from the resume unless ``current_step`` was set back, and one that has taken no step
        since holding a trained state records ``None`` (unknown).

        :raises ValueError: for a model with other sites than A and B (as the constructor), if a LoRA matrix of a
            site is not among the optimiser's parameters, if the optimiser is at its start (no step taken, none
            loaded: its Hessian estimate is ``hess_init`` and its momentum 0), or if a LoRA layer's matrices never
            had a gradient (their momentum is still 0: frozen while it trained, or the loss did not depend on them,
            as under weight noise that swamps the network). After more than one step each matrix is judged alone;
            after one (A's gradient is 0 while B is still 0), or for a loaded state of unknown steps, a layer's
            matrices together.
        """
        _check_sites(model, "IVONGuide.from_optimizer")
        steps = optimizer.current_step
        if steps == 0:  # or a trained state loaded (load_state_dict), which counts no step
            if not any(g["momentum"].any() or (g["hess"] != g["hess_init"]).any() for g in optimizer.param_groups):
                raise ValueError("IVONGuide.from_optimizer: the optimiser has taken no step, so its Gaussian is its "
                                 "start, not a posterior: train it first (or use train_ivon)")
            steps = None
        std_of, momentum_of = {}, {}
        for group in optimizer.param_groups:
            std = (group["ess"] * (group["hess"] + group["weight_decay"])).rsqrt()
            offset = 0
            for p in (p for p in group["params"] if p is not None):  # IVON's flat order: its groups' params in turn
                std_of[id(p)] = std[offset : offset + p.numel()].view_as(p)
                momentum_of[id(p)] = group["momentum"][offset : offset + p.numel()]
                offset += p.numel()
        params = iter(model.random_parameters())  # site by site, each site's layers in stacking order
        locs, stds, moved = {}, {}, {}
        for name, site in model.sites.items():
            mats = [next(params) for _ in site.layers]
            if any(id(p) not in std_of for p in mats):
                raise ValueError(f"the optimiser does not hold the LoRA matrices of site {name!r}: train them with it")
            for layer, p in zip(site.layers, mats):
                # after one step A alone may have no gradient (B is still 0), so the first step, and a loaded state of
                # unknown steps, is judged per layer
                key = layer if steps in (1, None) else f"{layer} ({name})"
                moved[key] = moved.get(key, False) or bool(momentum_of[id(p)].any())
            stack = torch.stack if site.stacked else (lambda ts: ts[0])
            locs[name] = stack([p.detach() for p in mats])
            stds[name] = stack([std_of[id(p)] for p in mats])
        # ivon-opt reads a parameter with requires_grad False as a zero gradient: a LoraModel's frozen matrices then
        # only shrink by weight decay and their stds stay near the start's.
        frozen = [layer for layer, m in moved.items() if not m]
        if frozen:
            widest = max(float(s.max()) for s in stds.values())
            raise ValueError(f"IVONGuide.from_optimizer: the LoRA matrices of {frozen[:3]}{' ...' if len(frozen) > 3 else ''} "
                             f"never had a gradient in the optimiser's {f'{steps} steps' if steps else 'training'} (their "
                             "momentum is 0): either they were frozen (a LoraModel freezes them and ivon-opt takes a "
                             "frozen parameter's gradient as 0: call requires_grad_(True) on model.random_parameters() "
                             "before training, as train_ivon does), or the loss did not depend on them, as under weight "
                             f"noise that swamps the network (IVON's stds reach {widest:.3g} here, 1 / sqrt(ess * (hess + "
                             "weight_decay)): raise ess)")
        # its numbers only: torch's load_state_dict adds a flag of its own (differentiable=False)
        settings = {k: int(v) if isinstance(v, numbers.Integral) else float(v) for k, v in optimizer.defaults.items()
                    if not isinstance(v, bool)}
        # the settings the stds came from, group by group (the step size is scheduled within a group: not one)
        groups = [{k: float(g[k]) for k in ("ess", "weight_decay", "hess_init") if k in g} for g in optimizer.param_groups]
        if any(g != {k: settings[k] for k in g} for g in groups):
            settings["param_groups"] = groups
        # IVON's options held beside its defaults, which change its stds and means as much
        settings |= {"rescale_lr": bool(optimizer.rescale_lr), "hess_approx": str(getattr(optimizer, "hess_approx", "price")),
                     "debias": bool(getattr(optimizer, "debias", True)), "steps": steps}
        return cls(model, locs, stds, trained_with=settings)

    def locs(self):
        """Posterior mean of every site: name -> ``site.shape``."""
        return {name: getattr(self, f"loc_{i}") for i, name in enumerate(self.sites)}

    def stds(self):
        """Posterior std of every site: name -> ``site.shape``."""
        return {name: getattr(self, f"std_{i}") for i, name in enumerate(self.sites)}

    def posterior(self):
        stds = self.stds()
        return {n: checked_normal(loc, stds[n], loc.dim()) for n, loc in self.locs().items()}

    def mean(self):
        return self.locs()

    def extra_parameters(self):
        """One std per LoRA entry: all the posterior adds to the LoRA it is centred on."""
        return sum(s.numel for s in self.sites.values())

    def config(self):
        return {"trained_with": self.trained_with}


def train_ivon(model, data, *, epochs=1, lr=0.03, ess=ESS, hess_init=3e-4, weight_decay=WEIGHT_DECAY, beta2=0.99999,
               mc_samples=1, clip_radius=CLIP_RADIUS, rescale_lr=False, lr_schedule="linear", autocast=None,
               progress=True) -> IVONGuide:
    """Train the adapter's LoRA matrices and the head with ``ivon.IVON`` from their current values; returns the
    :class:`IVONGuide` of the trained optimiser. Afterwards the network holds IVON's mean (LoRA and head).

    Each step draws ``mc_samples`` weight sets inside ``optimizer.sampled_params(train=True)`` (the ``ivon-opt``
    README's loop), each giving the gradient of the batch's mean NLL (:func:`pyro_lora.training.batch_nll`, the
    network's own peft weights), then ``optimizer.step()``. No prior term enters the loss: IVON's weight decay is
    its prior, ``N(0, 1 / (ess * weight_decay))`` per entry.

    The defaults are Cong et al.'s for LoRA on Llama-2-7B (their scripts: ``ess`` 1e6 to 1e8, ``rescale_lr=False``),
    not ``ess = N``: the Hessian estimate ``h`` moves by about ``1 - beta2 = 1e-5`` of its distance per step, so in a
    fine-tuning run it stays near ``hess_init`` and the weight noise near ``1 / sqrt(ess * (hess_init +
    weight_decay))``, 0.016 here; with ``ess = N`` it would be ``1 / sqrt(N * 4e-4)``, 3.7 for 180 examples, which
    wrecks the network. With ``hess_init`` this small nearly every entry's step hits the clip, so each step moves
    an entry by ``lr * clip_radius`` (3e-5 here), like Adam's steps of size ``lr``: scale ``lr`` to the model.

    :param model: a :class:`~pyro_lora.LoraModel` whose sites are all its LoRA matrices (``random="AB"``).
    :param data: the training batches (re-iterated each epoch), e.g. a shuffled ``DataLoader``.
    :param float ess: IVON's effective sample size (``N / ess`` is the posterior's temperature).
    :param float hess_init: the Hessian estimate's start.
    :param float weight_decay: IVON's ``delta``, the prior precision per unit of ``ess``.
    :param float beta2: the Hessian estimate's decay.
    :param int mc_samples: weight draws per step, their gradients averaged.
    :param float clip_radius: bound on each entry's preconditioned step (``math.inf``: none, ivon-opt's default).
    :param bool rescale_lr: ``ivon.IVON``'s option to multiply ``lr`` by ``hess_init + weight_decay``.
    :param str lr_schedule: ``"linear"`` (decay to 0, Cong et al.'s), ``"constant"`` or ``"cosine"``, as for
        :func:`pyro_lora.fit`.
    :param autocast: as for :func:`pyro_lora.fit` (default bf16 on CUDA, none on CPU).
    Each call builds a new optimiser: its Hessian estimate starts at ``hess_init``, its momentum at 0 and ``lr``'s
    schedule from the start, whatever an earlier call learnt (only the network's weights carry over). To resume, keep
    your own ``ivon.IVON`` and loop, and read the guide off it with :meth:`IVONGuide.from_optimizer`.

    :raises ValueError: before anything changes (the network, which guide owns the head, what is frozen), naming the
        argument, for a non-positive ``lr``, ``ess``, ``hess_init`` or ``clip_radius``, a negative ``weight_decay``,
        ``beta2`` outside ``[0, 1)``, ``epochs`` or ``mc_samples`` below 1, an unknown ``lr_schedule``, an empty
        ``data``, a model with other sites than A and B, adapters disabled (inside peft's ``disable_adapter()``), a
        call inside ``torch.inference_mode()`` (under ``torch.no_grad()`` it switches gradients on for its run), an
        ``autocast`` :func:`pyro_lora.fit` refuses, a run computing in float16 (IVON has no loss scaling) or one under
        ``torch.distributed``; and, as :func:`pyro_lora.fit` does, trainable parameters held in float16 or bfloat16
        (ivon-opt keeps its state in their dtype, where its updates round away), or ones of several dtypes or devices
        (ivon-opt holds them in one buffer), naming them; an ``ess``, ``hess_init``, ``weight_decay`` or precision
        ``ess * (hess_init + weight_decay)`` outside what the parameters' dtype holds for IVON (from its smallest
        normal number to the square root of its largest). After training, the ``ValueError`` of
        :meth:`IVONGuide.from_optimizer` where no guide can be read (weight noise that swamped the network), the
        network then put back as it was.
    :raises ~pyro_lora.training.DivergenceError: when the loss becomes non-finite or rises far above its start, judged
        per example, or per scored token for ``CausalLM`` (as :func:`pyro_lora.fit` judges it; the network is then put
        back as it was).

    Any other error while training (an interrupt, an out-of-memory error, a bad batch) keeps the steps that finished,
    as :func:`pyro_lora.fit` does: it is raised as it is, the network holds IVON's mean after the last finished step,
    and ``error.unfinished_guide`` is that step's :class:`IVONGuide`, its ``trained_with["unfinished"]`` the step
    reached of how many (``None``, with the network put back as it was, where no step had finished).
    """
    rescale_lr = check_flag(rescale_lr, "rescale_lr")
    progress = check_flag(progress, "progress")
    check_model(model, "train with IVON")
    params = model.random_parameters() + model.point_parameters()
    autocast = _check_arguments(model, params, data, autocast, epochs=epochs, lr=lr, ess=ess, hess_init=hess_init,
                                weight_decay=weight_decay, beta2=beta2, mc_samples=mc_samples, clip_radius=clip_radius)
    steps_per_epoch = len(data)
    schedule = _Schedule(lr_schedule, 0, epochs * steps_per_epoch)
    try:
        import ivon  # here, not at the top: a saved IVONGuide loads and predicts without the optimiser's package
    except ModuleNotFoundError:
        raise ModuleNotFoundError("train_ivon needs the IVON optimiser: pip install ivon-opt") from None

    # built before anything changes (it reads the parameters, changes none): whatever ivon-opt refuses leaves the
    # model as it was, its owner and its frozen matrices too
    optimizer = ivon.IVON(params, lr=lr, ess=ess, hess_init=hess_init, weight_decay=weight_decay, beta2=beta2,
                          mc_samples=mc_samples, clip_radius=clip_radius, rescale_lr=rescale_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    watch = _DivergenceWatch(lr, remedy="lower it, or clip_radius (each entry's step is at most lr * clip_radius)",
                             unit=nll_unit(model))
    take_over(model, None)  # whichever guide trained the head keeps the state it left as its own
    device = model.device
    own = [p.data for p in params]  # IVON swaps in views of its flat buffers: each parameter gets its own tensor back
    start = [t.clone() for t in own]
    for p in params:
        p.requires_grad_(True)  # the sites' peft matrices are frozen in a LoraModel: IVON trains them in place
        p.grad = None
    bar = tqdm(total=epochs * len(data), desc="train IVON", disable=not progress, dynamic_ncols=True)
    trained, stepping, unfinished, mean, done = False, False, None, None, 0
    try:
        # gradients on under an enclosing torch.no_grad() too
        with torch.enable_grad(), full_precision(device), network_mode(model.net, True):  # an enclosing autocast is off for the run: autocast= alone sets the forward's
            for epoch in range(epochs):
                if epoch:  # data of another length this epoch: the decay ends at the run's last step still
                    steps_per_epoch, bar.total = _replan(schedule, data, 1, steps_per_epoch, scheduler.last_epoch, epoch,
                                                         epochs, caller="train_ivon")
                for batch in data:
                    batch = to_device(batch, device)
                    unit = per_unit(model, batch)  # the check's NLL per scored token for CausalLM, per example else
                    loss = 0.0
                    for _ in range(mc_samples):
                        with optimizer.sampled_params(train=True):
                            optimizer.zero_grad()
                            with step_autocast(device, autocast):
                                nll = batch_nll(model, batch)
                            nll.backward()
                        loss += nll.item() * unit / mc_samples
                    watch.observe(loss, 1)
                    watch.update(optimizer.current_step, epoch)  # raises on a non-finite or runaway loss
                    stepping = True  # an error inside the update may leave IVON's state half-updated: nothing kept
                    optimizer.step()
                    # IVON's mean after this step: the next step's draws swap new tensors in, leaving these as they are
                    mean, stepping, done = [p.data for p in params], False, done + 1
                    scheduler.step()
                    bar.update()
                    bar.set_postfix(nll=f"{loss:.4f}", epoch=epoch)
        trained = True
    except FloatingPointError:  # diverged: nothing of the run is worth keeping
        raise
    except BaseException as error:
        error.unfinished_guide = None
        if stepping:
            error.add_note(f"train_ivon: stopped inside IVON's update of step {done + 1}, which may have "
                           "left its state half-updated: nothing is kept, and the network is put back as it was")
        elif done:
            for p, value in zip(params, mean):
                p.data = value
            unfinished = _unfinished_guide(error, model, optimizer, lr_schedule, schedule.total)
        raise
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        model.set_trainable()
        with torch.no_grad():  # IVON's mean, or the start after a failure (an exception leaves a weight draw in place)
            for p, tensor, value in zip(params, own, start):
                value = p.detach() if trained or unfinished is not None else value
                p.data = tensor
                p.copy_(value)  # in place: bumps the version that the guides' ownership checks read
        if unfinished is not None:
            take_over(model, unfinished)
    try:
        guide = IVONGuide.from_optimizer(model, optimizer)
    except BaseException as error:  # no posterior to show for the run: the network as it was, as after a failed run
        with torch.no_grad():
            for p, value in zip(params, start):
                p.copy_(value)
        error.add_note("train_ivon: the network is put back as it was")
        raise
    guide.trained_with["lr_schedule"] = lr_schedule
    take_over(model, guide)  # the head is IVON's mean, which this guide predicts with
    return guide


def _unfinished_guide(error, model, optimizer, lr_schedule, steps):
    """The :class:`IVONGuide` of the steps that finished before ``error`` stopped :func:`train_ivon` (the network's
    parameters hold that step's mean), kept as ``error.unfinished_guide`` with a note; ``None`` where it cannot be read."""
    step = optimizer.current_step
    try:
        guide = IVONGuide.from_optimizer(model, optimizer)
    except Exception as also:  # the error being raised stays the one to report
        error.add_note(f"train_ivon: stopped after step {step} of {steps}; its Gaussian could not be kept "
                       f"({type(also).__name__}: {also}), and the network is put back as it was")
        return None
    guide.trained_with |= {"lr_schedule": lr_schedule, "unfinished": {"step": step, "steps": steps}}
    error.unfinished_guide = guide
    error.add_note(f"train_ivon: stopped after step {step} of {steps}; IVON's Gaussian of that step is kept as this "
                   "error's unfinished_guide (an IVONGuide: predict with it, or keep it with save_guide), and the network "
                   "holds its mean")
    return guide


def _check_arguments(model, params, data, autocast, **args):
    """Refuse bad arguments, and ``params`` (what IVON is to train) ivon-opt cannot hold, before any work; returns the
    autocast dtype (or False) the run uses."""
    positive = ("lr", "ess", "hess_init", "clip_radius")
    for name, value in args.items():
        unbounded = name == "clip_radius" and value == math.inf  # ivon-opt's own default: no clip
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) or unbounded):
            raise ValueError(f"{name} must be a finite number{' (or inf: no clip)' if name == 'clip_radius' else ''}, "
                             f"got {value!r}")
        if name in positive and not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
        if name in ("epochs", "mc_samples"):
            check_count(value, name)
    if args["weight_decay"] < 0:
        raise ValueError(f"weight_decay must be >= 0, got {args['weight_decay']!r}")
    if not 0 <= args["beta2"] < 1:
        raise ValueError(f"beta2 must be in [0, 1), got {args['beta2']!r}")
    # IVON's loop runs the network's own weights, no Pyro site: a Pyro handler around it changes nothing it computes
    check_training_context("train_ivon", pyro_handlers=False)
    check_batches(data)
    if not hasattr(data, "__len__") or len(data) == 0:
        raise ValueError("data must be a non-empty sequence of batches (a DataLoader or a list), re-iterated each epoch")
    _check_sites(model, "train_ivon")
    disabled = [path for path, layer in model.layers.items() if layer.disable_adapters]
    if disabled:  # the network would run without the matrices IVON trains: no gradient reaches them
        raise ValueError(f"the adapters are disabled ({disabled[0]}, e.g. inside net.disable_adapter()): train_ivon trains "
                         "the adapter's LoRA matrices, which the network would not run; leave that context")
    model.adapter_values()  # refuses an adapter whose head a MAP trained beside LoRA values not written into it
    if distributed.is_distributed():
        raise ValueError("train_ivon runs in one process: under torch.distributed every rank would train its own posterior")
    check_full_precision(params, "train_ivon", "IVON's Hessian estimate and momentum are held in that dtype, where "
                         "their updates (1 - beta2 of the distance per step) round away")
    names = {id(p): n for n, p in model.net.named_parameters()}
    for what in ("dtype", "device"):  # ivon-opt's flat buffers are of one of each, and its refusal names no parameter
        held = {}
        for p in params:
            held.setdefault(str(getattr(p, what)), []).append(names[id(p)])
        if len(held) > 1:
            listed = "; ".join(f"{k}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}" for k, v in sorted(held.items()))
            raise ValueError(f"train_ivon trains parameters of several {what}s ({listed}): ivon-opt holds them all in "
                             f"one flat buffer, so they need one {what}; put the LoRA matrices and the trainable "
                             f"point parameters (head, any base parameter unfrozen) on one {what}, or freeze the others")
    # ivon-opt computes ess * (hess + weight_decay), its rsqrt and squares of Hessian-sized terms in the parameters'
    # dtype: beyond the square root of its range the state turns NaN within a few steps, a divergence that would be
    # blamed on lr; below its smallest normal number, hess_init or the precision is 0
    dtype = params[0].dtype if params else torch.float32
    precision = args["ess"] * (args["hess_init"] + args["weight_decay"])
    top, tiny = math.sqrt(torch.finfo(dtype).max), torch.finfo(dtype).tiny
    outside = {name: value for name, value in (("ess", args["ess"]), ("hess_init", args["hess_init"]),
                                               ("weight_decay", args["weight_decay"]),
                                               ("ess * (hess_init + weight_decay)", precision))
               if value > top or value < tiny and name != "weight_decay"}
    if outside:
        raise ValueError(f"{', '.join(f'{k} = {v:g}' for k, v in outside.items())}: outside what "
                         f"{str(dtype).removeprefix('torch.')} holds for IVON, from its smallest normal number {tiny:g} "
                         f"to the square root of its largest, {top:.3g} (it holds the precision ess * (hess + "
                         "weight_decay) and squares Hessian-sized terms); give values within it")
    low, high = float32_std_range()  # the guide's stds are float32: a float64 network let ess reach 1e90 (stds of 0)
    if not 1 / high**2 <= precision <= 1 / low**2:
        raise ValueError(f"ess * (hess_init + weight_decay) = {precision:g} gives initial stds of {precision ** -0.5:.3g}, "
                         f"beyond the {low:.3g} to {high:.3g} that the guide's float32 stds hold as a Gaussian; give an ess "
                         "near the number of training examples")
    autocast, forward_dtype = training_autocast(model, autocast)
    if forward_dtype == torch.float16:
        raise ValueError("train_ivon computing in float16 (a float16 base, or autocast=torch.float16): IVON has no loss "
                         "scaling, so small gradients underflow; compute in bfloat16 or float32")
    return autocast


def _check_sites(model, who):
    """Refuse a model whose sites are not its A and B matrices: IVON trains and samples both, so a guide over A alone
    would drop B's uncertainty, and a LoRA-XS core or ScalaBL scale has no peft matrix for IVON to train."""
    check_model(model, f"build {who}")
    matrices = sorted({s.matrix for s in model.sites.values()})
    between = sorted({s.matrix for s in model.sites.values() if s.kind.role == "between"})
    if between:  # a LoraXSModel or ScalaBLModel, which take no random= to follow the advice below
        raise ValueError(f"{who} trains plain LoRA A and B matrices with IVON, and this {type(model).__name__}'s sites "
                         f"are {matrices} ({', '.join(between)} between A and B, which no peft matrix holds for IVON to "
                         "train): use a LoraModel(net, likelihood, random='AB')")
    if matrices != ["A", "B"]:
        raise ValueError(f"{who} needs every LoRA matrix (A and B) as a site, the model's are {matrices}: build it "
                         "with random='AB'")


@method("ivon", bayesian=True, guide=IVONGuide, exportable=True, requires=(("ivon", "ivon-opt"),), trains=True,
        float16=False)
def ivon_method(setup):
    """IVON: LoRA and head trained by variational learning (a diagonal Gaussian, Newton-like updates) from the MAP's start.

    Trains its own adapter from the initialisation the MAP started from, for the same epochs, with Cong et al.'s
    settings (``ess`` 1e7, a tempered posterior: ``ess = N`` leaves the network untrained) and the run's step size
    (Shen et al., 2024, "Variational Learning is Effective for Large Deep Networks"; on LoRA: Cong et al., 2024,
    "Variational Low-Rank Adaptation Using IVON").
    """
    c = setup.config
    take_over(setup.model, None)  # the MAP keeps its trained head as its own while the initial one goes back
    setup.restore(initial=True)
    prior = 1 / math.sqrt(ESS * WEIGHT_DECAY)  # IVON's own, its weight decay: the model records it for the guide
    model = LoraModel(setup.net, setup.likelihood, random="AB", num_data=len(setup.train), prior=prior)
    # hess_init 3e-4 makes nearly every entry's step hit the clip, lr * CLIP_RADIUS: that is the run's Adam step size
    guide = train_ivon(model, setup.loader(setup.train, shuffle=True), epochs=c.epochs, lr=c.lr / CLIP_RADIUS,
                       progress=c.progress)
    fitted = Fitted(guide=guide, extra_parameters=guide.extra_parameters())
    if c.prior_scale != type(c).prior_scale:
        fitted.note = (f"prior std {prior:.3g} = 1 / sqrt(ess * weight decay), IVON's own; --prior-scale "
                       f"{c.prior_scale:g} applies to the MAP and the other methods")
    return fitted
