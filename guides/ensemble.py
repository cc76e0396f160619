"""Deep ensemble of ``K`` independently trained MAP adapters, as a uniform mixture of point masses.

Lakshminarayanan et al. (2017); the LoRA papers' baseline uses ``K = 3`` adapters. :func:`train_ensemble`
trains the members (peft's LoRA initialisation under ``K`` seeds, each with a fresh head) and
:class:`EnsembleGuide` holds them. A freshly initialised classification head is trained per member too and
must differ per member; it is not a Pyro site, so the guide carries the heads itself and applies member
``s mod K``'s head to sample ``s`` in the same batched S-sample forward (:meth:`EnsembleGuide.member_heads`,
used by :func:`predict_ensemble`).
"""

import collections.abc
import contextlib
import inspect
import numbers
import sys
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from peft.utils import ModulesToSaveWrapper

from pyro_lora import distributed
from pyro_lora.checks import check_count, check_flag, check_reiterable
from pyro_lora.contract import check_model, parameter_adapter
from pyro_lora.hooks import forward_hooks
from pyro_lora.ownership import take_over, trained_beside_head
from pyro_lora.predictive import predict
from pyro_lora.sites import base_network, base_rewriting_inits, check_values, lora_inits
from pyro_lora.training import check_training_context, data_order_seeded, fit

from .base import LoraGuide
from .map import MAPGuide
from .registry import Fitted, method

MEMBER_SITE = "ensemble_member"


class EnsembleGuide(LoraGuide):
    r"""``q(theta) = 1/K sum_k delta(theta - theta_k)``, jointly over all sites (one member per draw).

    :meth:`sample` cycles: draw ``s`` is member ``s mod K``, so ``S = K`` (the default of
    :func:`predict_ensemble`) gives the exact mixture predictive ``1/K sum_k p(y | x, theta_k)`` and any
    multiple of ``K`` the same. Other ``S`` would over-weight the first ``S mod K`` members, so
    :meth:`sample`, :meth:`member_heads`, :func:`predict_ensemble` and :func:`pyro_lora.predict` refuse
    them. The Pyro guide path draws the member as an auxiliary site ``"ensemble_member"`` (condition on it
    to pick one) and records delta sites; :meth:`posterior` gives each site's marginal mixture, and
    :meth:`mean` the average of the members' values, which is no ensemble predictor (averaged weights of
    separately trained adapters): ``predict(..., mean=True)`` refuses it (:attr:`mean_is_predictor`), and so does
    :func:`pyro_lora.export_adapter` (that average as one adapter would be none of the members).

    **Heads.** ``heads`` holds per-member values of point parameters outside the sites (a classification
    head). Only ``nn.Linear`` weights and biases are supported: inside :meth:`member_heads` each such layer
    applies member ``s mod K``'s weights to the rows of sample ``s`` with one batched matmul. A guide with
    heads refuses :meth:`sample` outside that context, and ``guide(batch)`` altogether, since a plain
    :func:`pyro_lora.predict` would pair every member with the network's one current head:
    predict with :func:`predict_ensemble`. The head parameters of the network are left as they are.

    :param model: the :class:`~pyro_lora.LoraModel`.
    :param list members: ``K`` dicts site -> value (``site.shape``), e.g. MAP guides' ``mean()``.
    :param list heads: ``K`` dicts parameter name (as in ``model.net.named_parameters()``) -> value, or ``None``;
        the names are the model's point parameters outside its sites (:meth:`~pyro_lora.LoraModel.named_point_parameters`).
    :param int num_members: ``K`` when ``members`` is ``None``: zero buffers of the final shapes (for loading).
    :param list head_parameters: parameter names when ``heads`` is ``None`` (for loading).
    :raises ValueError: for no members, members that are not the sites' values, heads of another count, names or
        shapes than the members' and the model's head, heads that leave out some of the model's trained point
        parameters (each member would run the network's current ones), non-finite heads, or heads that are not
        ``nn.Linear`` ones.
    """

    fitted_at_head = True  # each member was trained with the head (its own, or the network's) as it was
    mean_is_predictor = False  # mean() averages separately trained members' weights: predict(mean=True) refuses it
    samples_have_width = False  # each draw is a member's fixed weights: an overflow under them is the network's there

    def __init__(self, model, members=None, heads=None, num_members=None, head_parameters=None):
        super().__init__(model)
        if members is not None:
            if not isinstance(members, (list, tuple)):  # a dict's keys or a tensor's rows would be taken as members
                raise ValueError(f"members must be a list of site-value dicts (one per member), got {type(members).__name__}")
            num_members = len(members)
        if members is None and num_members is None or members is not None and not members:
            raise ValueError(f"an ensemble needs members (a non-empty list of site-value dicts), got {members!r}")
        num_members = check_count(num_members, "num_members")
        if heads is not None:
            if not isinstance(heads, (list, tuple)) or not all(
                    isinstance(h, collections.abc.Mapping) and all(isinstance(v, torch.Tensor) for v in h.values())
                    for h in heads):  # any Mapping, as a member's site values may be (a state_dict's OrderedDict)
                raise ValueError("heads must be a list of dicts of head parameter name -> tensor (one per member), got "
                                 f"{type(heads).__name__}")
            if len(heads) != num_members:
                raise ValueError(f"got {len(heads)} heads for {num_members} members")
            head_parameters = sorted(heads[0])
            if any(sorted(h) != head_parameters for h in heads):
                raise ValueError("every member's head must hold the same parameters")
        self.num_members = num_members
        self.head_parameters = list(head_parameters or [])
        params = dict(model.net.named_parameters())
        point = {n for n, _ in model.named_point_parameters()}
        if set(self.head_parameters) - point:
            raise ValueError(f"per-member heads must be trained parameters of the model outside its sites (its head), "
                             f"and {sorted(set(self.head_parameters) - point)} are not: {sorted(point) or 'it has none'}")
        for head in heads or []:
            for name, value in head.items():
                if tuple(value.shape) != tuple(params[name].shape) or not bool(torch.isfinite(value).all()):
                    raise ValueError(f"a member's head value {name!r} must be finite, of the parameter's shape "
                                     f"{tuple(params[name].shape)}, got shape {tuple(value.shape)}")
        self._head_modules = _linear_owners(model.net, self.head_parameters)
        uncovered = sorted(point - set(self.head_parameters)) if self.head_parameters else []
        if uncovered:  # a pooler trained beside the classifier: each member ran the last fit's pooler, 0.77 off
            raise ValueError(
                f"the heads hold {self.head_parameters} but not the model's other trained point parameters {uncovered[:4]}: "
                "every member would run the network's current values of those (the last training's), not its own; give "
                "each member's value of every point parameter (model.named_point_parameters(); train_ensemble keeps them "
                "all), or make a LoRA matrix among them a site (random='AB')")
        device = model.device
        for i, site in enumerate(self.sites.values()):
            self.register_buffer(f"member_{i}", torch.zeros((num_members, *site.shape), device=device))
        for j, name in enumerate(self.head_parameters):
            self.register_buffer(f"head_{j}", torch.zeros((num_members, *params[name].shape), device=device))
        with torch.no_grad():
            for k, values in enumerate(members or []):
                check_values(self.sites, values, allow_sample_dim=False, what=f"member {k}")
                for i, name in enumerate(self.sites):
                    getattr(self, f"member_{i}")[k] = values[name]
            for k, head in enumerate(heads or []):
                for j, name in enumerate(self.head_parameters):
                    getattr(self, f"head_{j}")[k] = head[name].detach()
        if members is not None and heads is None:
            _warn_shared_head(self, members)
        self._heads_for = None  # S while member_heads(S) is active

    @property
    def deterministic(self):
        # one member carrying a head still predicts through it (member_heads), not through the network's head
        return self.num_members == 1 and not self.head_parameters

    def members(self):
        """Site name -> ``[K, *site.shape]``: every member's values."""
        return {name: getattr(self, f"member_{i}") for i, name in enumerate(self.sites)}

    def carried_point_parameters(self):
        return set(self.head_parameters)

    def heads(self):
        """Head parameter name -> ``[K, *shape]``."""
        return {name: getattr(self, f"head_{j}") for j, name in enumerate(self.head_parameters)}

    def check_num_samples(self, num_samples) -> int:
        """``num_samples`` as an ``int``; refused where it is no positive integer or not a multiple of ``K``: draw ``s``
        is member ``s mod K``, so such ``S`` would weight the first ``S mod K`` members more than the others instead of
        ``1/K`` each."""
        num_samples = check_count(num_samples, "num_samples")
        if num_samples % self.num_members:
            raise ValueError(_multiple_message(num_samples, self.num_members))
        return num_samples

    def _check_heads(self, num_samples):
        if self.head_parameters and self._heads_for != num_samples:
            raise ValueError(
                f"this ensemble carries per-member heads ({self.head_parameters[0]}, ...): draw its samples inside "
                f"guide.member_heads({num_samples}), e.g. through pyro_lora.guides.ensemble.predict_ensemble(model, guide, data)"
            )

    def posterior(self):
        """Site -> its marginal, a uniform mixture of the members' point masses (``MixtureSameFamily``)."""
        mixture = dist.Categorical(logits=torch.zeros(self.num_members, device=self.member_0.device))
        return {
            name: dist.MixtureSameFamily(mixture, dist.Delta(v, event_dim=v.dim() - 1)) for name, v in self.members().items()
        }

    def forward(self, *args, kl_weight=1.0, **kwargs):
        """Pyro guide: member ``k ~ Uniform{0..K-1}`` (auxiliary site ``"ensemble_member"``), then ``delta(theta_k)`` per site."""
        if self.head_parameters:
            raise ValueError("an ensemble with per-member heads has no Pyro guide path (heads are not sites): use predict_ensemble")
        logits = torch.zeros(self.num_members, device=self.member_0.device)
        with poutine.scale(scale=kl_weight):
            k = pyro.sample(MEMBER_SITE, dist.Categorical(logits=logits), infer={"is_auxiliary": True})
            return {name: pyro.sample(name, dist.Delta(v[k], event_dim=v.dim() - 1)) for name, v in self.members().items()}

    def sample(self, num_samples):
        """Draw ``s`` is member ``s mod K``: name -> ``[S, *site.shape]``; ``S`` must be a multiple of ``K``."""
        num_samples = self.check_num_samples(num_samples)
        self._check_heads(num_samples)
        return self.sample_members(torch.arange(num_samples, device=self.member_0.device) % self.num_members)

    def sample_members(self, index):
        """Draw ``s`` from member ``index[s]`` (``index [n]``, ints in ``[0, K)``): name -> ``[n, *site.shape]``; a chunk
        of :func:`~pyro_lora.predict`'s ``S`` draws is the members of its own sample indices."""
        return self.member_values(index)

    def member_values(self, index):
        """Member ``index[s]``'s own values for row ``s`` (``index [n]``): name -> ``[n, *site.shape]``."""
        return {name: v[index] for name, v in self.members().items()}

    def mean(self):
        return {name: v.mean(0) for name, v in self.members().items()}

    @contextlib.contextmanager
    def member_heads(self, num_samples):
        """Within the context, an ``S = num_samples`` forward applies member ``s mod K``'s head to sample ``s``.

        Each head ``nn.Linear`` gets a forward hook that recomputes its output from the rows of its input,
        seen sample-major as ``[S, rows / S, d_in]``, with ``[S, d_out, d_in]`` weights. Only forwards with
        exactly ``S`` samples may run inside (so no ``chunk_size`` in :func:`pyro_lora.predict`). ``S`` must
        be a multiple of ``K``.
        """
        num_samples = self.check_num_samples(num_samples)
        index = torch.arange(num_samples, device=self.member_0.device) % self.num_members
        with self.heads_of(index):
            self._heads_for = num_samples
            try:
                yield
            finally:
                self._heads_for = None

    @contextlib.contextmanager
    def heads_of(self, index):
        """Within the context, a forward of ``S = len(index)`` samples (rows sample-major) applies member
        ``index[s]``'s head to sample ``s``; ``heads_of([k])``: every row runs member ``k``'s head. Heads the
        members do not carry (none: the network's own) run as they are."""
        index = torch.as_tensor(index, device=self.member_0.device).reshape(-1)
        heads, hooks = self.heads(), []
        for path, module in self._head_modules.items():
            weight = heads.get(f"{path}.weight")
            bias = heads.get(f"{path}.bias")
            weight = module.weight.expand(len(index), *module.weight.shape) if weight is None else weight[index]
            if bias is None and module.bias is not None:
                bias = module.bias.expand(len(index), *module.bias.shape)
            elif bias is not None:
                bias = bias[index]
            hooks.append((module, _batched_linear(len(index), weight, bias)))
        with forward_hooks(self.model, hooks, "the ensemble's per-member heads"):  # each forward checks they ran
            yield

    def extra_parameters(self):
        """``K - 1`` further copies of the sites and heads beyond the one adapter a MAP holds."""
        per_member = sum(s.numel for s in self.sites.values()) + sum(h[0].numel() for h in self.heads().values())
        return (self.num_members - 1) * per_member

    def config(self):
        return {"num_members": self.num_members, "head_parameters": self.head_parameters}


def _multiple_message(num_samples, k):
    """Why ``num_samples`` draws of ``K = k`` members in turn are refused, and what to use instead."""
    extra = "member 0" if num_samples % k == 1 else f"members 0..{num_samples % k - 1}"
    return (
        f"an ensemble of K={k} members draws them in turn (draw s is member s mod K): num_samples={num_samples} would "
        f"weight {extra} more than the others instead of the exact mixture 1/K sum_k p_k; use a multiple of K "
        f"(predict_ensemble uses S = K = {k})"
    )


def _linear_owners(net, parameter_names):
    """Module path -> ``nn.Linear`` for the modules owning ``parameter_names`` (``<path>.weight`` / ``<path>.bias``)."""
    modules = dict(net.named_modules())
    params = dict(net.named_parameters())
    owners = {}
    for name in parameter_names:
        if name not in params:
            raise ValueError(f"the network has no parameter {name!r}")
        path, attr = name.rsplit(".", 1)
        module = modules.get(path)
        if parameter_adapter(name) is not None and ".modules_to_save." not in name:
            raise ValueError(f"per-member point parameter {name!r} {_adapter_parameter(name)}; only linear heads can vary "
                             "per member")
        if not isinstance(module, torch.nn.Linear) or attr not in ("weight", "bias"):
            raise ValueError(
                f"per-member point parameter {name!r} is not an nn.Linear weight or bias "
                f"({type(module).__name__}): only linear heads can be batched over members"
            )
        owners[path] = module
    return owners


def _adapter_parameter(name):
    """What the adapter parameter ``name`` (no ``modules_to_save`` copy) is, and why members cannot vary it."""
    if "lora_embedding_" in name:
        return ("is the LoRA of an embedding (no sample site: a point estimate), which peft's embedding forward adds "
                "itself; leave the embedding out of target_modules")
    if "trainable_tokens_" in name:
        return ("holds peft's trainable tokens (trainable_token_indices), which its embedding forward adds itself; "
                "leave them out of the adapter")
    if name.endswith("bias"):
        return ("belongs to a LoRA layer (peft's lora_bias=True: B's bias): the weight hand-off adds it itself, not "
                "through its module's forward, so a member's value would be ignored")
    return ("is a LoRA matrix left out of the sites, which the weight hand-off applies itself, not through its module's "
            "forward, so a member's value would be ignored; build the model with random='AB' (each member's matrices "
            "are its sites' values)")


def _batched_linear(num_samples, weight, bias):
    """Forward hook: output rows of sample ``s`` are ``x_s W_s^T + b_s`` (``weight: [S, out, in]``, ``bias: [S, out]``)."""

    def hook(module, args, output):
        x = args[0]
        if x.shape[0] % num_samples:
            raise ValueError(f"head input has {x.shape[0]} rows, not a multiple of the {num_samples} samples it was set up for")
        xs = x.reshape(num_samples, -1, x.shape[-1])
        y = xs @ weight.transpose(-1, -2).to(xs.dtype)
        if bias is not None:
            y = y + bias.unsqueeze(-2).to(xs.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(output.dtype)

    return hook


def predict_ensemble(model, guide, data, num_samples=None, **kwargs):
    """:func:`pyro_lora.predict` of an :class:`EnsembleGuide`, members' heads included.

    :param int num_samples: default ``K`` (the exact mixture); a multiple of ``K`` gives the same mixture.
    :param kwargs: ``keep_samples``, ``progress`` as for :func:`pyro_lora.predict` (no ``chunk_size`` when the
        members carry heads; no ``mean``: the members' averaged weights are no ensemble predictor).
    :raises ValueError: for ``num_samples`` not a multiple of ``K``; with per-member heads, for another model
        object than ``guide.model`` or a ``chunk_size``.
    """
    check_model(model, "predict")
    distributed.check_settings("predict_ensemble", {"num_samples": num_samples,
                                                    **{k: v for k, v in kwargs.items() if k != "progress"}})
    num_samples = guide.num_members if num_samples is None else num_samples
    check_count(num_samples, "num_samples", alternative=f"a multiple of K={guide.num_members}")
    guide.check_num_samples(num_samples)
    if guide.head_parameters and model is not guide.model:
        raise ValueError(
            "an ensemble with per-member heads sets the heads of the model it was built on: predict with guide.model"
        )
    chunk = kwargs.get("chunk_size")
    if chunk is not None:
        check_count(chunk, "chunk_size", alternative="or None: every sample in one forward")
    if guide.head_parameters and chunk is not None and chunk < num_samples:  # chunk_size=S is that one forward
        raise ValueError(f"an ensemble with per-member heads predicts all samples in one forward: chunk_size={chunk} "
                         f"would split its S={num_samples}; drop chunk_size (or give {num_samples})")
    with guide.member_heads(num_samples):
        return predict(model, guide, data, num_samples=num_samples, **kwargs)


def _head_names(model):
    """Names of the model's point parameters outside its LoRA layers (the heads, or base weights unfrozen)."""
    lora = _lora_ids(model)
    names = {id(p): n for n, p in model.net.named_parameters()}
    return [names[id(p)] for p in model.point_parameters() if id(p) not in lora]


def head_parameters(model):
    """Names of the model's point parameters outside its LoRA layers (the heads), checked to be ``nn.Linear`` ones."""
    heads = _head_names(model)
    _linear_owners(model.net, heads)
    return heads


def reinitialize(model, seed):
    """peft's LoRA initialisation of the adapter (``init_lora_weights``: by default ``A`` Kaiming-uniform, ``B = 0``)
    and the heads (:func:`head_parameters`) as a new training starts them, under ``torch.manual_seed(seed)``.

    A sequence classifier's head (the base model's ``classifier`` or ``score``, which transformers initialises
    afresh) is re-drawn by the base model's own ``_init_weights``, as transformers draws a new head (for most
    models ``N(0, initializer_range^2)``, bias 0; ``nn.Linear.reset_parameters()`` for a network that is no
    transformers model); any other module peft trains a copy of
    (``modules_to_save``: a pretrained pooler, an ``lm_head``) restarts from the values peft copied, its
    ``original_module``'s.

    :raises ValueError: for a trainable base parameter outside both (a LoRA layer's base bias under peft's
        ``bias="all"`` or ``"lora_only"``, a weight unfrozen by hand): nothing holds the value it started from; or an
        adapter whose init rewrote the base weights or needs data (PiSSA, OLoRA, EVA, ...).
    :returns: the head parameter names.
    """
    check_model(model, "re-initialise")
    heads = _head_names(model)
    fresh, copied = _restarts(model, heads)  # base weights refused first, then any head that is no nn.Linear
    base = base_network(model.net)
    init = _member_init(model)
    take_over(model, None)  # whichever guide trained the head keeps its state: restoring it later is no change
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers.values():
            if init is False:  # peft leaves both at nn.Linear's own initialisation
                layer.lora_A[model.adapter].reset_parameters()
                layer.lora_B[model.adapter].reset_parameters()
            else:
                layer.reset_lora_parameters(model.adapter, init)
        for module in fresh:
            _draw_head(base, module)
        for p, start in copied:
            p.copy_(start)
    return heads


def _draw_head(base, linear):
    """Draw ``linear`` as ``base`` (a transformers model) draws a new head. On a twin layer: transformers' init
    functions skip a weight it marked initialised when it loaded the model, as it marks a fresh head's."""
    init_weights = getattr(base, "_init_weights", None)
    if init_weights is None:
        linear.reset_parameters()
        return
    twin = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           device=linear.weight.device, dtype=linear.weight.dtype)
    init_weights(twin)
    linear.weight.copy_(twin.weight)
    if linear.bias is not None:
        linear.bias.copy_(twin.bias)


def _member_init(model):
    """The adapter's own ``init_lora_weights`` for a new member: ``True`` (A Kaiming-uniform, B = 0), ``False`` or
    ``"gaussian"``; a network without a peft config counts as ``True``.

    :raises ValueError: for an init that rewrites the base weights or needs data (PiSSA, OLoRA, EVA, ...): a new
        member cannot start as that init started the adapter.
    """
    init = lora_inits(model.net).get(model.adapter, True)
    if init == "lora_ga" and model.adapter not in base_rewriting_inits(model.net):
        init = True  # peft's LoRA-GA fell back to its default init without preprocess_loraga's gradients
    if init not in (True, False, "gaussian"):
        raise ValueError(
            f"adapter {model.adapter!r} was initialised with init_lora_weights={init!r}: a new member cannot start as it "
            "did (the init rewrote the base weights, or needs data), and peft's default init on those weights would start "
            "it from another function; train the members from an adapter built with init_lora_weights=True"
        )
    return init


def _restarts(model, heads):
    """How :func:`reinitialize` restarts each head parameter: ``(linear layers to re-draw, [(parameter, the value peft
    copied it from)])``."""
    net = model.net
    base = base_network(net)
    fresh_ids = {id(p) for n in ("classifier", "score") if isinstance(getattr(base, n, None), torch.nn.Module)
                 for p in getattr(base, n).parameters()}
    params = dict(net.named_parameters())
    wrappers = {f"{path}.modules_to_save.{model.adapter}.": m for path, m in net.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    fresh, copied, stuck = [], [], []
    for name in heads:
        prefix = next((w for w in wrappers if name.startswith(w)), None)
        if id(params[name]) in fresh_ids:
            fresh.append(name)
        elif prefix is not None:
            copied.append((params[name], wrappers[prefix].original_module.get_parameter(name[len(prefix):])))
        elif parameter_adapter(name) is None:  # an adapter's own (embedding LoRA, trainable tokens): named below
            stuck.append(name)
    if stuck:
        raise ValueError(
            f"the trainable parameters {stuck[:4]} are base weights (peft's bias='all' or 'lora_only', or unfrozen by "
            "hand): a new member cannot restart them from the values they started from, which nothing keeps; build the "
            "adapter with bias='none' (modules_to_save for a module to train whole)"
        )
    owners = _linear_owners(net, heads)  # after that refusal: an unfrozen LayerNorm is no head to batch, but stuck
    return [owners[path] for path in dict.fromkeys(name.rsplit(".", 1)[0] for name in fresh)], copied


def train_ensemble(model, data, k=3, seeds=None, fit_kwargs=None, include_current=False):
    """Train ``k`` MAP adapters from different initialisations; returns an :class:`EnsembleGuide`.

    Each member: :func:`reinitialize` under its seed, a :class:`~pyro_lora.guides.MAPGuide` from that adapter,
    :func:`pyro_lora.fit` with ``fit_kwargs`` and the data's order drawn from its seed too (the generators the loader
    holds are seeded from it for that run and put back after: :func:`~pyro_lora.training.data_order_seeded`); its site
    values and head are kept. The network's LoRA weights and heads are restored afterwards. Costs ``k`` trainings (``k - 1`` with ``include_current``).

    :param model: a :class:`~pyro_lora.LoraModel` whose sites are all its LoRA matrices (``random="AB"``).
    :param data: the training batches, as for :func:`pyro_lora.fit`.
    :param seeds: ``k`` distinct seeds (default ``0 .. k-1``).
    :param dict fit_kwargs: keyword arguments of :func:`pyro_lora.fit` (``epochs``, ``lr``, ...).
    :param bool include_current: the network's current adapter and head (e.g. an already trained MAP) is
        member 0 and only ``k - 1`` members are trained (with ``seeds[1:]``).
    :raises ValueError: before any training, for repeated seeds, sites between A and B, LoRA parameters that are no
        sites, one-shot ``data`` (a generator) for two members or more, ``train_network=False`` with a head, ``epochs=0`` or ``lr=0`` (untrained members), or checkpointing ``fit_kwargs`` (``checkpoint_dir``,
        ``checkpoint_every``, ``resume``: the members would share one checkpoint), inside ``torch.inference_mode()`` or
        a Pyro handler :func:`pyro_lora.fit` refuses; under ``torch.distributed``, on every rank, where ``k``, ``seeds``
        (``None`` and the same seeds given count as different), ``include_current`` or a ``fit_kwargs`` entry differ
        across ranks. An error while training (an out-of-memory error, an interrupt) is raised as it is, with the
        network restored, a note naming the member that failed, and the members that finished as its
        ``finished_ensemble`` (an :class:`EnsembleGuide`, or ``None`` where none had).
    """
    include_current = check_flag(include_current, "include_current")
    check_model(model, "train an ensemble")
    if isinstance(seeds, (str, collections.abc.Mapping, collections.abc.Set)):
        raise ValueError(f"seeds must be a list of k integers (in order: with include_current the first is the current "
                         f"adapter's), got {type(seeds).__name__} {seeds!r}")
    seeds = None if seeds is None else list(seeds)
    _check_fit_kwargs(fit_kwargs)
    fit_kwargs = {"progress": False, **(fit_kwargs or {})}
    # first, before any check that may refuse on one rank only: seeds per rank trained other members on each rank (rank
    # 0's kept), another k or include_current paired other members in each fit's collectives
    distributed.check_settings("train_ensemble", {"k": k, "seeds": seeds, "include_current": include_current,
                                                  **{f"fit_kwargs[{key!r}]": _fit_setting(key, v) for key, v in fit_kwargs.items()}})
    check_training_context("train_ensemble")  # as each member's fit would, but before the first is re-initialised
    idle = {key: fit_kwargs[key] for key in ("epochs", "lr") if key in fit_kwargs and fit_kwargs[key] == 0}
    if idle:
        raise ValueError(f"fit_kwargs {', '.join(f'{k}={v!r}' for k, v in idle.items())}: each member starts from a freshly "
                         "initialised adapter (B = 0) and head, which such a run leaves untrained, so the ensemble would "
                         "average untrained networks; give epochs >= 1 and lr > 0")
    k = check_count(k, "k")
    seeds = list(range(k)) if seeds is None else seeds
    if len(seeds) != k:
        raise ValueError(f"need k >= 1 and k seeds, got k={k} and seeds={seeds}")
    # torch.manual_seed takes 3.5 as 3, "3" as 3 and -1 as 2**64 - 1: such seeds are refused, not silently equal
    seeds = [check_count(s, "each seed", minimum=0, alternative="below 2**64, as torch.manual_seed takes") for s in seeds]
    if any(s >= 2**64 for s in seeds):
        raise ValueError(f"each seed must be below 2**64 (torch.manual_seed's range), got {max(seeds)}")
    trained = seeds[1:] if include_current else seeds
    if len(trained) > 1:  # the second member's fit found it used up, after the first member's whole training
        check_reiterable(data, "data", f"each of the {len(trained)} members trains on it")
    if len(set(trained)) < len(trained):
        raise ValueError(f"seeds {trained} repeat a seed: members trained under one seed are one network (the same "
                         "initialisation and data order), and an ensemble of copies has no spread; give distinct seeds")
    if any(s.kind.role == "between" for s in model.sites.values()):
        raise ValueError("train_ensemble re-initialises plain LoRA (A and B); a model with matrices between them (LoRA-XS "
                         "R cores, ScalaBL S scales) is not supported")
    lora = _lora_ids(model)
    point_lora = [n for n, p in model.named_point_parameters() if id(p) in lora]
    if point_lora:
        raise ValueError(f"every trainable LoRA parameter must be a site, and {point_lora[:4]} are not (a LoRA matrix "
                         "left out of the sites: build the model with random='AB'; or peft's lora_bias=True: B's bias): "
                         "they cannot vary per member")
    heads_names = _head_names(model)
    _restarts(model, heads_names)  # refused before any training, not at the first member's start
    _member_init(model)
    if heads_names and not fit_kwargs.get("train_network", True):
        raise ValueError(f"fit_kwargs train_network=False with a head to train ({heads_names[0]}, ...): each member starts "
                         "from a freshly drawn head, which would stay untrained; leave train_network on")
    checkpointing = [key for key in ("checkpoint_dir", "checkpoint_every", "resume") if fit_kwargs.get(key)]
    if checkpointing:  # every member's fit would write the one folder: the last member's run would be all it holds
        raise ValueError(f"fit_kwargs {', '.join(checkpointing)}: train_ensemble does not checkpoint its members (each "
                         "member's fit would overwrite the one checkpoint, and resume would continue another member's "
                         "run); leave them out and save the returned ensemble with save_guide")
    params = dict(model.net.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items() if id(p) in lora or n in heads_names}
    members, heads = [], []
    try:
        for i, seed in enumerate(seeds):
            if include_current and i == 0:
                members.append(model.adapter_values())
            else:
                reinitialize(model, seed)
                guide = MAPGuide(model)
                with data_order_seeded(data, seed):  # the loader's own generator: else its order followed the position
                    fit(model, guide, data, **fit_kwargs)
                members.append({n: v.detach().clone() for n, v in guide.mean().items()})
            heads.append({n: params[n].detach().clone() for n in heads_names})
    except BaseException as error:
        _restore(params, saved)
        _keep_finished(error, model, members, heads if heads_names else None, i, seeds)
        raise
    _restore(params, saved)
    return EnsembleGuide(model, members, heads if heads_names else None)


def _restore(params, saved) -> None:
    with torch.no_grad():
        for n, v in saved.items():
            params[n].copy_(v)


def _keep_finished(error, model, members, heads, failed, seeds) -> None:
    """Keep the members that finished before member ``failed`` raised ``error`` (an out-of-memory error, an
    interrupt): ``error.finished_ensemble`` is their :class:`EnsembleGuide` (``None`` where none finished), and a note
    on the error names the member that failed and how to keep the rest."""
    error.finished_ensemble, kept = None, "no member had finished"
    if members:
        try:
            error.finished_ensemble = EnsembleGuide(model, members, heads)
            kept = (f"the {len(members)} member(s) that finished are kept as this error's finished_ensemble (an "
                    "EnsembleGuide: predict with it, or keep it with save_guide)")
        except Exception as also:  # the error being raised stays the one to report
            kept = f"the {len(members)} member(s) that finished could not be kept: {type(also).__name__}: {also}"
    error.add_note(f"train_ensemble: member {failed} of {len(seeds)} (seed {seeds[failed]}) failed; {kept}")


def _check_fit_kwargs(fit_kwargs) -> None:
    """Refuse ``fit_kwargs`` that are no mapping of :func:`pyro_lora.fit`'s keyword arguments, before the first
    member's adapter is re-initialised (``fit`` raised a raw ``TypeError`` on it, leaving the network's LoRA reset)."""
    if fit_kwargs is None:
        return
    if not isinstance(fit_kwargs, collections.abc.Mapping):
        raise ValueError(f"fit_kwargs must be a dict of pyro_lora.fit's keyword arguments, got "
                         f"{type(fit_kwargs).__name__} {fit_kwargs!r}")
    takes = [name for name, p in inspect.signature(fit).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = [key for key in fit_kwargs if key not in takes]
    if unknown:
        raise ValueError(f"fit_kwargs {unknown} are no keyword arguments of pyro_lora.fit (it takes {takes}); the model, "
                         "guide and data are train_ensemble's own")


def _fit_setting(key, value):
    """A ``fit_kwargs`` entry as ``fit`` compares it across ranks: callbacks by class, a callable (a ``kl_weight``
    schedule) as one, an ELBO by class, a dtype by name (the digest reads an object by its attributes: an ELBO's
    hold no model, a callback's may hold a whole network)."""
    if key == "callbacks":
        return [type(cb).__name__ for cb in value]
    if callable(value):
        return "a callable"
    if isinstance(value, torch.dtype):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str, list, tuple)):
        return value
    if isinstance(value, numbers.Real) or isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)  # a numpy or 0-dim tensor lr: its value (by type alone, 0 on one rank passed as 0.1)
    return type(value).__name__


def _warn_shared_head(guide, members):
    """Warn where the network's head was trained beside LoRA values other than some members': without ``heads``,
    every member predicts through that one head, not the head each was trained with (MAP guides' ``mean()`` of
    separate fits, each with its own head, the last one's left in the network). Called from ``guide.__init__``."""
    model = guide.model
    found = trained_beside_head(model, members) if model.named_point_parameters() else None
    if found and found[1]:
        # the warning points at the line that built the guide: past every __init__ of its class chain on the stack
        frame, stacklevel = sys._getframe(1), 2
        while frame is not None and frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is guide:
            frame, stacklevel = frame.f_back, stacklevel + 1
        warnings.warn(
            f"the network's head was trained by a {found[0]} beside LoRA values other than member(s) "
            f"{', '.join(map(str, found[1]))}: without heads=, every member predicts through that one head, not the head "
            "it was trained with; pass each member's head as heads= (train_ensemble keeps them), or ignore this where "
            "those members were trained beside this very head (fit(..., train_network=False))", stacklevel=stacklevel)


def _lora_ids(model):
    return {id(p) for layer in model.layers.values() for d in (layer.lora_A, layer.lora_B) for p in d.parameters()}


def ensemble_mixture(guide, loader, num_samples):
    """The ensemble's exact mixture: each member (with its head) once; ``num_samples`` is the member count."""
    return predict_ensemble(guide.model, guide, loader, keep_samples=True)


ensemble_mixture.uses_samples = False


@method("ensemble", version=2, bayesian=True, guide=EnsembleGuide, predictive=ensemble_mixture, trains=True)
def ensemble(setup, k=3):
    """Deep ensemble: the MAP plus k-1 LoRAs (and heads) trained from other seeds, probabilities averaged; no run
    seed shares a member seed with another (their rows are independent draws)."""
    c = setup.config
    model = setup.lora_model(random="AB")
    guide = train_ensemble(model, setup.loader(setup.train, shuffle=True), k=k, seeds=setup.derived_seeds("ensemble member", k),
                           fit_kwargs={"epochs": c.epochs, "lr": c.lr, "progress": c.progress}, include_current=True)
    return Fitted(guide=guide, extra_parameters=guide.extra_parameters())
