"""The Pyro model over a peft LoRA network: random LoRA matrices as sample sites, data through a likelihood."""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import numbers
import warnings

import numpy
import pyro
import pyro.poutine as poutine
from pyro.infer.autoguide import AutoGuide
from pyro.poutine.messenger import unwrap
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.other import AuxiliaryTrainingWrapper

from . import distributed, handoff, pyro_params, quantized
from .checks import check_batch, check_count, float32_std_range, is_integer_tensor, pickling_refused
from .hooks import hooks_ran
from .contract import (ModelContract, check_autoguide, check_autoguide_model, check_guide, check_not_meta, parameter_adapter,
                       tempered_training)
from .ownership import (follow_autoguide, head_left_by, head_loaded, head_trainer, note_forward, record_write, svi_left_head,
                        unwritten_fit, value_sums, written_beside_head)
from .distributions import unchecked_isotropic_normal
from .kinds import KINDS, MatrixKind, between_kinds, down_kind, up_kind
from .likelihoods import Likelihood, data_nll, is_cloze
from .modes import dropout_in_training
from .pyro_stack import (VECTORIZED, check_no_plate, conditioned_names, drawn_by, elbo_run, hidden_from_elbo, in_averaging_elbo,
                         in_importance, in_laplace_approximation, in_mcmc, in_predictive, in_svi_step, inference_guide, innermost_autoguide,
                         marked_guides, on_training_step, probing_model, prototyping_autoguide, replayed_trace,
                         running_autoguide)
from .callers import user_stacklevel
from .sites import (Site, active_adapter, base_network, base_rewriting_inits, build_sites, check_inits, check_random, check_values,
                    describe_inits, embedding, find_lora_layers, head_modules, is_site_name, matrix_view, per_layer)

# families whose attention projections run sequence-first ([T, batch, H]): their rows are positions, not the S samples'
# families whose LoRA layers run on [T, N, d] (their batch is not the first dim): S samples cannot share a forward,
# and KFAC / GLM, which group a layer's inputs by example, cannot read them
_SEQUENCE_FIRST = ("longformer", "led", "xlnet", "fsmt")


class HalfPrecisionOverflowError(FloatingPointError):
    """:meth:`LoraModel.logits`' refusal of NaN or infinite logits from a half-precision forward (a float16 or bfloat16
    base, or half autocast): its activations overflowed. ``dtype``: the forward's dtype; ``way_out``: what runs it in
    range (another dtype). Under weight samples the samples' width may be what overflowed, not the network: the sampled
    predictives tell the two apart (:func:`~pyro_lora.predictive.sampled_logits`)."""

    def __init__(self, message, dtype, way_out):
        super().__init__(message)
        self.dtype, self.way_out = dtype, way_out


def _overflowed(logits, choice_mask=None):
    """Where ``logits`` overflowed: NaN or infinite, but ``-inf`` at a missing answer of ``choice_mask`` ``[B, C]``
    (multiple choice masks it so; a class logit of ``-inf`` overflowed as one of ``+inf`` did)."""
    bad = torch.isnan(logits) | torch.isposinf(logits)
    low = torch.isneginf(logits)
    if choice_mask is not None and tuple(choice_mask.shape) == tuple(logits.shape[-2:]):
        low = low & choice_mask.to(logits.device).bool()
    return bad | low


def _check_plain_forward(net) -> None:
    """Refuse a network whose ``forward`` accelerate's mixed precision wrapped in an autocast (``Trainer(bf16=True)``
    leaves it so, the unwrapped one kept as ``_original_forward``): that precision is hidden from
    :attr:`LoraModel.forward_dtype`, so the half-precision tolerances and overflow checks would not apply (a last-layer
    Laplace read its bfloat16 logits as a head that transforms its output)."""
    # accelerate keeps the unwrapped forward beside the wrapper it sets on the instance; a forward deleted since is gone
    wrapped = [name or "the network" for name, m in net.named_modules()
               if "_original_forward" in vars(m) and "forward" in vars(m)]
    if wrapped:
        raise ValueError(
            f"{wrapped[0]}'s forward is wrapped by accelerate's mixed precision (an autocast inside forward, left by "
            "Trainer(bf16=True / fp16=True)): pyro_lora runs the precision it is given (a half-precision base, or your "
            "torch.autocast around its calls) and its half-precision checks do not see this one; unwrap it first: "
            "accelerate.utils.extract_model_from_parallel(net, keep_fp32_wrapper=False), or trainer.accelerator."
            "unwrap_model(net, keep_fp32_wrapper=False)")


def _unmasked(mask) -> bool:
    """Whether a Pyro site's ``mask`` keeps it whole: none, ``True``, or a tensor of all ``True``."""
    return mask is None or mask is True or (torch.is_tensor(mask) and bool(mask.all()))


_FROZEN_HERE = "_pyro_lora_frozen_here"  # the network's attribute holding lora_freezes(net)


def lora_freezes(net) -> set:
    """The names (as in ``net.named_parameters()``) of the LoRA weights of ``net`` that a :class:`LoraModel` froze
    because they were its sites (:meth:`LoraModel.set_trainable`): the freezes a model whose sites they are not undoes,
    where one the user made is kept. Held by the network itself, so a copy of it (``copy.deepcopy``, pickling) carries
    them; a caller that puts ``requires_grad`` back as it was at some point puts these back with it."""
    marks = getattr(net, _FROZEN_HERE, None)
    if marks is None:
        marks = set()
        setattr(net, _FROZEN_HERE, marks)
    return marks


class LoraModel(ModelContract):
    """A Pyro model ``model(batch)`` whose latent variables are the LoRA matrices of ``net``.

    ``p(theta) p(y | x, theta)``: one sample site per stacked matrix kind (``"q_proj.lora_A"``:
    ``[L, r, d_in]``) with prior ``prior(site)``, and an observation site ``"obs"`` inside a ``"data"``
    plate of size ``num_data`` (minibatches are scaled to the dataset, so the ELBO is the full-data one).
    Matrices that are not random stay peft parameters, trained as point estimates.

    The network is kept out of Pyro's sight (held in a tuple, as Pyro's ``AutoGuide`` holds its
    model): Pyro sees the LoRA sites, and each call records the network's trainable point parameters as
    Pyro params, so ``SVI`` with a ``pyro.optim`` optimizer trains them as :func:`~pyro_lora.fit` does.

    Supported networks: peft LoRA on ``Linear`` layers (also GPT-2's ``Conv1D`` and bitsandbytes' 4-bit and 8-bit
    bases), one active adapter, not merged, no LoRA variant (DoRA and the like are refused); each forward re-checks
    that the network still runs that adapter.

    Precision: a base loaded in bfloat16 or float16 (``load_pretrained(..., dtype=torch.bfloat16)``) runs every
    forward under ``torch.autocast`` in that dtype, while the trainable parameters (LoRA matrices, the head) are
    kept in float32 (cast at construction, as peft keeps its adapter weights) and logits are returned in float32,
    so guide parameters, log-densities, KFAC factors and metrics stay float32; samples are cast at the hand-off.

    Model variants (:class:`~pyro_lora.loraxs.LoraXSModel`, :class:`~pyro_lora.scalabl.ScalaBLModel`) are
    subclasses whose sites are of another :class:`~pyro_lora.kinds.MatrixKind`; every per-kind decision here
    is a lookup in :data:`~pyro_lora.kinds.KINDS`. A subclass sets :attr:`name` (how run records refer to
    it) and, if its constructor differs, :meth:`restore`.

    Example::

        net = add_lora(load_pretrained("minilm", "classification")[0])
        model = LoraModel(net, SequenceClassification(), random="AB", num_data=len(train))
        guide = MAPGuide(model)
        fit(model, guide, loader, epochs=3)

    :param net: a peft model with LoRA layers (not merged).
    :param likelihood: a :class:`~pyro_lora.likelihoods.Likelihood`.
    :param random: which LoRA matrices are random, letters of :data:`~pyro_lora.kinds.KINDS`: ``"A"``, ``"B"``,
        ``"AB"`` (``"R"`` for a LoRA-XS core, ``"S"`` for ScalaBL's log singular-value scales: the subclasses
        :class:`~pyro_lora.loraxs.LoraXSModel` and :class:`~pyro_lora.scalabl.ScalaBLModel` set these up, and
        other models refuse them: :attr:`~pyro_lora.kinds.MatrixKind.model`).
    :param str group: ``"kind"`` (stacked sites, the fast default) or ``"matrix"`` (one site per matrix).
    :param prior: a float (isotropic ``N(0, prior^2)`` per entry), a dict site name -> distribution, or a
        callable ``Site -> distribution`` whose event shape is the site's shape.
    :param int num_data: training-set size for minibatch scaling (the data term scaled by ``num_data / rows``:
        scale neither the model nor the guide for it); ``None`` means the batch is the data (``fit``, and an ELBO
        trained outside it such as Pyro's SVI, warn when they step through several batches without it).
    :param str adapter: the peft adapter to put a posterior over (default: the active one).
    :raises ValueError: for a float ``prior`` that is not finite and positive, a ``num_data`` that is not a positive
        integer, a kind another model class prepares (``"R"``, ``"S"``), networks the weight hand-off does not
        implement (see :func:`~pyro_lora.sites.find_lora_layers`), several active adapters, LoRA layers or a head
        running another adapter than ``net.active_adapter`` (peft's ``net.base_model.set_adapter``), an adapter peft's
        OLoRA or LoftQ init set up on layers storing their weight transposed (:func:`~pyro_lora.sites.check_inits`), or a network its
        likelihood refuses (``Likelihood.check_network``: e.g. a regression or multi-label head for
        ``SequenceClassification``). Every refusal comes before the constructor's first write to the network
        (:meth:`_prepare_layers`, the hand-off, ``requires_grad``, float32 casts).
    """

    name = "lora"  # how run records refer to this class (subclasses set their own)
    builds_on_adapter = True  # its A and B (or their product) are the LoRA trained beside the network's head

    def __init__(self, net, likelihood, random="AB", group: str = "kind", prior=1.0, num_data: int | None = None,
                 adapter: str | None = None):
        if not isinstance(net, torch.nn.Module):
            raise ValueError(f"net must be a peft model with LoRA layers (peft.get_peft_model(...)), got "
                             f"{type(net).__name__}")
        check_random(random)  # before any work on the network
        distributed.check_not_wrapped(net)
        _check_plain_forward(net)
        if not isinstance(likelihood, Likelihood):  # None, a string, the class itself: a raw AttributeError later
            made = f": give an instance, {likelihood.__name__}()" if isinstance(likelihood, type) else ""
            raise ValueError(f"likelihood must be a pyro_lora likelihood (SequenceClassification(), MultipleChoice(...), "
                             f"CausalLM()), got {likelihood!r}{made}")
        self._net = (net,)
        self.likelihood = likelihood
        self.adapter = adapter or active_adapter(net)
        if self.adapter != active_adapter(net):
            raise ValueError(f"adapter {self.adapter!r} is not the network's active adapter: call net.set_adapter({self.adapter!r}) first")
        _check_prior_and_size(prior, num_data)
        check_not_meta(itertools.chain(net.named_parameters(), net.named_buffers()))
        self.layers = find_lora_layers(net, self.adapter)
        check_inits(net)
        rewritten = base_rewriting_inits(net)
        if rewritten:
            warnings.warn(
                f"{describe_inits(rewritten)} moved part of each base weight it adapts into its A and B: the prior, "
                "centred at A = B = 0, is centred at those residual base weights, not at the pretrained model (give a "
                "prior centred at the initial A, B if that is not meant)",
                stacklevel=user_stacklevel(),
            )
        self._lora_shapes = {path: _lora_shapes(layer, self.adapter) for path, layer in self.layers.items()}
        # peft's trainable copies (the classification head): what they ran when built, checked before every forward
        self._heads = {name: (m, list(m.active_adapters)) for name, m in net.named_modules() if isinstance(m, ModulesToSaveWrapper)}
        self._other_layers = None  # (adapters named in the network's peft_config, [(path, peft layer)]), when found
        self._check_runs_adapter()
        self.sites = build_sites(self.layers, self.adapter, random, group)
        self._check_kinds_model()
        self._check_frozen_lora_carries_signal()
        self.matrices = matrix_view(self.sites)
        self.prior = float(prior) if isinstance(prior, numbers.Real) else prior  # numpy's float32 is one std too
        self._check_prior_sites()
        self.num_data = num_data
        self._embeddings = _input_embeddings(net)
        self._positions = _learned_positions(net)
        # rotary (or other computed) positions run past the config's limit: said once per model, not refused
        self._trained_positions = None if self._positions else _config_positions(net)
        self._ids_checked = False  # token ids checked against the embedding's rows on an accelerator (once)
        quantized.keep_differentiable(net)  # before the likelihood's check runs the network: a 4-bit layer repacks in it
        with _autocast(self.device, self.compute_dtype):
            likelihood.check_network(net)
        # the same set before set_trainable as after: it switches only LoRA weights, all of which are in it
        trainables = self.point_parameters() + [p for layer in self.layers.values() for p in self._lora_parameters(layer)]
        _check_float32_trainables(net, trainables)
        self._prepare_layers()  # every refusal is above: a refused model leaves the network as it was given
        handoff.install(self.layers)
        self._checkpointing = handoff.checkpointing_modules(net)
        self._pyro_name = pyro_params.unique_name(self)
        # the data NLL of the last batch the Pyro model scored (a detached tensor): per example, or per scored token for
        # a token-level likelihood (CausalLM), :func:`~pyro_lora.likelihoods.data_nll`
        self.last_nll = None
        self._svi_batch = None  # the rows of the first batch an ELBO trained on without num_data; False once warned
        self.set_trainable()
        _warn_head_partly_frozen(net)
        _float32_trainables(net, trainables)

    def _prepare_layers(self) -> None:
        """A subclass's writes to the layers before they are used (LoRA-XS's SVD, ScalaBL's rotation), run after every
        refusal of the constructor; none here."""

    def _check_runs_adapter(self) -> None:
        """Refuse LoRA layers, or heads holding this adapter, that run another: peft's tuner-level
        ``net.base_model.set_adapter(name)`` switches them and leaves ``net.active_adapter`` as it was."""
        for path, layer in self.layers.items():
            _check_layer_runs(path, layer, self.adapter)
        self._check_other_layers(self._sites_disabled())  # built under net.disable_adapter(): all disabled
        for name, (head, active) in self._heads.items():
            if self.adapter in getattr(head, "modules_to_save", {}) and active != [self.adapter]:
                raise ValueError(
                    f"{name} (a module peft trains beside the LoRA, e.g. the classification head) runs adapter(s) "
                    f"{active}, but net.active_adapter is {self.adapter!r} (net.base_model.set_adapter switches the "
                    f"layers alone): call net.set_adapter({self.adapter!r}), or net.set_adapter({active[0]!r}) to put a "
                    "posterior over that one")

    def _sites_disabled(self) -> bool:
        """Whether the LoRA layers run with their adapters disabled (``net.disable_adapter()``).

        :raises ValueError: if some are disabled and some not (``enable_adapters`` on one layer).
        """
        off = [p for p, layer in self.layers.items() if layer.disable_adapters]
        if 0 < len(off) < len(self.layers):
            raise ValueError(
                f"LoRA layer {off[0]} has its adapters disabled on its own (layer.enable_adapters(False)) while "
                f"{next(p for p in self.layers if p not in off)} runs them: the network would run part of adapter "
                f"{self.adapter!r}; enable or disable them all (net.disable_adapter() for the base model)")
        return bool(off)

    def _check_other_layers(self, disabled: bool) -> None:
        """Refuse a peft layer besides the sites and this adapter's heads (another adapter's LoRA, a LoRA embedding,
        trainable tokens, another adapter's trained copy of a module) that runs other than this adapter's part, or
        nothing with the adapters ``disabled``: a layer's own ``set_adapter`` or ``enable_adapters`` leaves
        ``net.active_adapter`` as it was, and the model would fit and predict with that layer's other delta while
        ``save_guide`` and ``export_adapter`` keep this adapter's."""
        for name, layer in self._find_other_layers():
            held = layer._get_available_adapters()
            runs = [] if layer.disable_adapters else [a for a in layer.active_adapters if a in held]
            expected = [] if disabled or self.adapter not in held else [self.adapter]
            if runs != expected:
                now = f"adapter(s) {runs}" if runs else "no adapter (disabled on its own)"
                should = f"adapter {self.adapter!r}" if expected else "no adapter"
                advice = (f"call net.set_adapter({self.adapter!r})" if layer.disable_adapters == disabled else
                          "enable or disable the adapters of every layer together (net.disable_adapter() for the base model)")
                raise ValueError(
                    f"peft layer {name} ({type(layer).__name__}) runs {now}, where this LoraModel runs {should} (a "
                    f"layer's own set_adapter or enable_adapters leaves net.active_adapter {self.adapter!r}): fit and "
                    "predict would run that layer so, while save_guide and export_adapter keep adapter "
                    f"{self.adapter!r} as it is; {advice}")

    def _find_other_layers(self) -> list:
        """Every peft layer besides the sites and this adapter's heads (another adapter's LoRA, a LoRA embedding,
        trainable tokens, another adapter's trained copy of a module): found again once an adapter was added or deleted
        (``add_adapter`` puts layers on other modules), not on every forward."""
        # an adapter deleted and loaded again under its name is another config object, maybe over other modules: the
        # objects themselves are kept and compared (an id could be the deleted one's, reused)
        adapters = tuple(getattr(self.net, "peft_config", {}).items())
        known = None if self._other_layers is None else self._other_layers[0]
        if known is None or len(known) != len(adapters) or any(
                a != b or c is not d for (a, c), (b, d) in zip(known, adapters)):
            sites = {id(m) for m in self.layers.values()}
            sites |= {id(m) for m, _ in self._heads.values() if self.adapter in m.modules_to_save}
            self._other_layers = adapters, [(name, m) for name, m in self.net.named_modules()
                                            if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and id(m) not in sites]
        return self._other_layers[1]

    def _check_kinds_model(self) -> None:
        """Refuse a kind whose layers another model class prepares (``MatrixKind.model``): ScalaBL's log-scales over
        an ``A`` not rotated to its singular basis would scale rows that are no singular directions."""
        classes = {c.__name__ for c in type(self).__mro__}
        for kind in {s.kind for s in self.sites.values()}:
            if kind.model is not None and kind.model not in classes:
                raise ValueError(f"random={kind.letter!r} ({kind.description}) needs the layers a {kind.model} prepares, "
                                 f"and this is a {type(self).__name__}: build a {kind.model} over the network instead")

    @classmethod
    def restore(cls, net, likelihood, random, **kwargs) -> LoraModel:
        """Rebuild the model a saved guide was trained on, over ``net`` (holding the trained adapter).

        :param random: the letters of the saved guide's sites (ignored by subclasses whose kinds are fixed).
        :param kwargs: ``group``, ``prior``, ``num_data``, ``adapter`` as for the constructor.
        """
        return cls(net, likelihood, random=random, **kwargs)

    @property
    def net(self):
        return self._net[0]

    def __deepcopy__(self, memo):
        """``copy.deepcopy(model)``: a model over a copy of the network, with its own name in Pyro's param store (the
        original's name holds the original's parameters, so Pyro's ``SVI`` on the copy would meet them there)."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        copied._pyro_name = pyro_params.unique_name(copied)
        return copied

    def __reduce_ex__(self, protocol):
        raise pickling_refused(
            self, "Pyro's SVI tags its network's parameters with weak references, and a model read back in this process "
            "would share the original's name in Pyro's param store",
            "save the network's weights (model.net.state_dict(), or the adapter with pyro_lora.export_adapter) and a "
            "guide with pyro_lora.save_guide, and build the LoraModel again over the loaded network; or copy it with "
            "copy.deepcopy(model)")

    def set_trainable(self) -> None:
        """Freeze the peft LoRA parameters that the sites replace; make the other LoRA matrices trainable again where
        a model froze them as its sites (:func:`lora_freezes`: another model on the network).

        Random matrices come from samples, so their parameters are unused; layers holding a kind with
        ``freezes_lora`` (LoRA-XS's ``R``) keep A and B frozen; other kinds without a peft parameter (ScalaBL's
        ``S``) leave A and B trainable point estimates. A non-random matrix frozen otherwise (by hand, or by an adapter
        loaded for inference: ``PeftModel.from_pretrained(..., is_trainable=False)``, peft's ``inference_mode``) keeps
        its ``requires_grad`` as the user left it, as a head does. A matrix that another model's sites froze and the
        user froze again since looks as it did before (both freezes are one ``requires_grad=False``): it is made
        trainable. Called by :func:`fit` and every model call, since peft's ``set_adapter``/``load_adapter`` switch
        ``requires_grad`` back on.
        """
        random = {id(p) for p in self.random_parameters()}
        frozen = {path for site in self.sites.values() if site.kind.freezes_lora for path in site.layers}
        marks = lora_freezes(self.net)
        for path in self.layers:
            for kind in (k for k in KINDS.values() if k.parameter is not None):
                name, p = self._weight_name(path, kind), self._parameter(path, kind)
                if id(p) in random or path in frozen:  # drawn from samples; LoRA-XS: A, B fixed by the SVD
                    if p.requires_grad:
                        p.requires_grad_(False)
                        marks.add(name)
                elif name in marks:
                    # a matrix another model's sites froze; one frozen by hand was trained by every SVI step all the same
                    p.requires_grad_(True)
                    marks.discard(name)

    def _inference_mode(self) -> bool:
        """Whether the adapter is in peft's ``inference_mode`` (``LoraConfig(inference_mode=True)``, or loaded with
        ``is_trainable=False``), which froze its matrices and head."""
        return bool(getattr(getattr(self.net, "peft_config", {}).get(self.adapter), "inference_mode", False))

    def frozen_initial_heads(self) -> list[str]:
        """The heads peft saves with the adapter (``modules_to_save``) that an adapter in inference mode froze while
        they still equal the base model's own module: ``LoraConfig(inference_mode=True)`` freezes one before it ever
        trained, which for a head the checkpoint lacked is its random initialisation. (A head loaded with
        ``is_trainable=False`` holds its trained values, which differ from the base's; one frozen by hand, in an adapter
        not in inference mode, is not listed.)"""
        if not self._inference_mode():
            return []
        heads = []
        for path, wrapper in self.net.named_modules():
            if not (isinstance(wrapper, ModulesToSaveWrapper) and self.adapter in wrapper.modules_to_save):
                continue
            own = dict(wrapper.modules_to_save[self.adapter].named_parameters())
            original = dict(wrapper.original_module.named_parameters())
            if own and not any(p.requires_grad for p in own.values()) and own.keys() == original.keys() and all(
                    torch.equal(p, original[name]) for name, p in own.items()):
                heads.append(path)
        return heads

    def _check_frozen_lora_carries_signal(self) -> None:
        """Refuse a kind that keeps ``A`` and ``B`` frozen (LoRA-XS's ``R``) on layers where one of them is all zeros
        (peft starts ``B`` at zero): ``B R A x`` would stay 0 whatever ``R`` is, and nothing but the head would train."""
        frozen = sorted({path for site in self.sites.values() if site.kind.freezes_lora for path in site.layers})
        # a random A or B starts at its weight too (the MAP's and the guides' initial location): a zero one is stuck alike
        zero = [self._weight_name(path, k) for path in frozen for k in KINDS.values()
                if k.parameter is not None and not self._parameter(path, k).detach().any()]
        if zero:
            kinds = "".join(k for k in KINDS if any(s.kind.letter == k for s in self.sites.values()))
            raise ValueError(
                f"random={kinds!r} keeps the layers' A and B frozen (LoRA-XS), and {len(zero)} of them are all zeros "
                f"({', '.join(zero[:2])}{', ...' if len(zero) > 2 else ''}) "
                "(peft starts B at zero): the layers' delta B R A x would stay 0 whatever R is, and nothing would train; "
                "build the LoraXSModel with svd_init=True, which sets A and B from the SVD of the base weight"
            )

    def _lora_parameters(self, layer) -> list:
        """The layer's peft LoRA weights (``lora_A``, ``lora_B``): those of the kinds with a peft parameter."""
        return [self._lora(layer, k.parameter).weight for k in KINDS.values() if k.parameter is not None]

    def named_lora_weights(self) -> list:
        """``(name, parameter)`` of every peft LoRA weight of the model's layers (``lora_A`` / ``lora_B``), names as in
        ``net.named_parameters()``."""
        return [(self._weight_name(path, k), self._parameter(path, k))
                for path in self.layers for k in KINDS.values() if k.parameter is not None]

    def lora_weight_values(self, values: dict) -> dict:
        """Site values (``values``) as the peft LoRA weights they stand for: name -> tensor (kinds with a peft parameter)."""
        return {self._weight_name(path, KINDS[m]): v
                for path, mats in per_layer(self.sites, values).items() for m, v in mats.items() if KINDS[m].parameter is not None}

    def _weight_name(self, path: str, kind: MatrixKind) -> str:
        return f"{path}.{kind.parameter}.{self.adapter}.weight"  # as net.named_parameters() names it

    def random_parameters(self) -> list:
        """The peft parameters whose values the sites replace (sites of kinds with a peft parameter)."""
        return [
            self._parameter(path, site.kind) for site in self.sites.values() for path in site.layers
            if site.kind.parameter is not None
        ]

    def point_parameters(self) -> list:
        """Trainable parameters of the network that are not random (heads, non-random LoRA matrices)."""
        return [p for _, p in self.named_point_parameters()]

    def named_point_parameters(self) -> list:
        """``(name, parameter)`` pairs of :meth:`point_parameters`, names as in ``net.named_parameters()``."""
        random = {id(p) for p in self.random_parameters()}
        return [(n, p) for n, p in self.net.named_parameters()
                if p.requires_grad and id(p) not in random and parameter_adapter(n) in (None, self.adapter)]

    def named_adapter_parameters(self) -> list:
        """``(name, parameter)`` of all a guide's predictions rely on besides its sites: the point parameters and
        the adapter's frozen ones (a head loaded with ``is_trainable=False``, non-random LoRA matrices, peft's
        trainable-token deltas)."""
        random = {id(p) for p in self.random_parameters()}
        # another adapter's parameters never run in this model's forward: its guides neither save nor check them
        return [
            (n, p) for n, p in self.net.named_parameters()
            if id(p) not in random and (p.requires_grad or parameter_adapter(n) == self.adapter)
            and parameter_adapter(n) in (None, self.adapter)
        ]

    def check_network(self) -> None:
        """Check that the network still runs what this model was built on; called before every forward.

        :raises ValueError: if the network's active adapter changed (``set_adapter``, on the network, one layer or
            the head) or was deleted (``delete_adapter``), several adapters are active, accelerate's mixed precision
            wrapped the forward, a LoRA layer was merged into its base weight, replaced or unloaded
            from the network, its LoRA matrices changed shape or variant (``update_layer`` with another rank or
            ``use_dora``), or the head's adapter was disabled without the LoRA layers'.
        """
        if active_adapter(self.net) != self.adapter:
            raise self._not_running()
        _check_plain_forward(self.net)  # Trainer(bf16=True) run on the network after the model was built
        for path, layer in self.layers.items():
            if _submodule(self.net, path) is not layer:
                raise ValueError(
                    f"LoRA layer {path} is no longer part of the network (replaced, e.g. by merge_and_unload(), unload() or "
                    "an assignment): the sampled LoRA matrices would not reach the forward; build a LoraModel over the "
                    "network as it is now"
                )
            if layer.merged:
                raise ValueError(f"LoRA layer {path} is merged into its base weight: call net.unmerge_adapter() first")
            # offloaded since built (accelerate's cpu_offload over the model's network)
            check_not_meta((f"{path}.{p}.{self.adapter}.weight", self._lora(layer, p).weight) for p in ("lora_A", "lora_B"))
            _check_layer_runs(path, layer, self.adapter)
            if self.adapter in getattr(layer, "lora_variant", {}):
                raise ValueError(
                    f"LoRA layer {path} now uses the peft variant {type(layer.lora_variant[self.adapter]).__name__} (e.g. "
                    "update_layer with use_dora=True), which the weight hand-off would run as plain LoRA: rebuild it with "
                    "a plain LoraConfig"
                )
            if self._lora_shapes[path] != _lora_shapes(layer, self.adapter):
                raise ValueError(
                    f"LoRA layer {path}'s matrices changed shape since this LoraModel was built (now "
                    f"{_lora_shapes(layer, self.adapter)}, built for {self._lora_shapes[path]}: update_layer with another "
                    "rank?): build a LoraModel over the network as it is now"
                )

        disabled = self._sites_disabled()  # net.disable_adapter() disables heads alike
        self._check_other_layers(disabled)
        for name, (head, active) in self._heads.items():
            if list(head.active_adapters) != active or head.disable_adapters != disabled:
                now = "its adapters disabled" if head.disable_adapters != disabled else f"adapter(s) {list(head.active_adapters)}"
                raise ValueError(
                    f"{name} (a module peft trains beside the LoRA, e.g. the classification head) now runs {now}, but ran "
                    f"{active} when this LoraModel was built: its head and the LoRA matrices would not match; call "
                    f"net.set_adapter({self.adapter!r}) (or enable its adapters)"
                )

    def _check_token_ids(self, ids) -> None:
        """Refuse token ids past the input embedding's rows (a tokenizer with a larger vocabulary than the network's),
        and rows longer than a learned position embedding holds (GPT-2's ``n_positions``, BERT's
        ``max_position_embeddings``: a tokenizer naming no ``model_max_length`` lets a collator build them):
        transformers' raw ``IndexError: index out of range in self`` otherwise. Ids on the CPU are checked in every
        forward; on an accelerator in the first only (a host read each forward would stall it); lengths always."""
        # a network with a token embedding (a toy MLP reads float features as its "input_ids"): torch's raw RuntimeError
        if self._embeddings is not None and isinstance(ids, torch.Tensor) and not is_integer_tensor(ids):
            raise ValueError(f"input_ids must be integer token ids (int64), got {ids.dtype}: a collator's ids are "
                             "integers; cast them with .long() if these are ids")
        if self._positions is not None and isinstance(ids, torch.Tensor) and ids.dim() and ids.shape[-1] > self._positions[1]:
            self._check_positions(ids)
        if self._trained_positions is not None and isinstance(ids, torch.Tensor) and ids.dim() and ids.shape[-1] > self._trained_positions:
            warnings.warn(
                f"the batch's rows are {ids.shape[-1]} tokens long, past the {self._trained_positions} positions of the "
                "network's config (max_position_embeddings, or a YaRN scaling's extension): its positions are computed, "
                "not looked up, so it runs on, but it was not trained that far and its predictions there are unreliable; "
                f"build the batches with max_length={self._trained_positions} or less (said once per model)",
                stacklevel=user_stacklevel())
            self._trained_positions = None
        if self._embeddings is None or not isinstance(ids, torch.Tensor) or (ids.device.type != "cpu" and self._ids_checked):
            return
        rows = self._embeddings.weight.shape[0]
        outside = (ids < 0) | (ids >= rows)
        if outside.any():
            raise ValueError(
                f"token id {int(ids[outside][0])} in the batch's input_ids is outside the network's input embedding of "
                f"{rows} rows (ids 0 to {rows - 1}): the tokenizer has a larger vocabulary than the network; use the "
                "tokenizer the checkpoint was saved with, or call net.resize_token_embeddings(len(tokenizer)) before "
                "building the LoraModel")
        self._ids_checked = True

    def _check_token_types(self, types, ids) -> None:
        """Refuse ``token_type_ids`` that are not integers of ``input_ids``' shape, or (on the CPU, where it costs no
        stall) outside the network's ``type_vocab_size``: transformers' raw ``IndexError`` or size error otherwise.

        :raises ValueError: naming the shape, dtype or the id found and the range.
        """
        if not isinstance(types, torch.Tensor):
            return
        if types.is_floating_point() or types.dtype == torch.bool or (isinstance(ids, torch.Tensor) and types.shape != ids.shape):
            shape = f" of input_ids' shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else ""
            raise ValueError(f"token_type_ids must be integer segment ids{shape}, got {types.dtype} of shape {tuple(types.shape)}")
        size = getattr(getattr(base_network(self.net), "config", None), "type_vocab_size", None)
        outside = (types < 0) | (types >= size) if isinstance(size, int) and types.device.type == "cpu" else None
        if outside is not None and bool(outside.any()):
            found = int(types[outside][0])
            raise ValueError(f"token_type_ids holds {found}, outside the network's {size} segment types (0 to {size - 1})")

    def _check_positions(self, ids) -> None:
        """Refuse rows of ``ids`` (wider than the position table) that hold more tokens than it has positions: every
        column, or, where the table numbers real tokens only (RoBERTa-like: padding sits at ``padding_idx``), the
        row's non-padding tokens (one host read, only for batches wider than the table)."""
        path, limit, pad = self._positions
        longest = ids.shape[-1] if pad is None else int((ids != pad).sum(-1).max())
        if longest > limit:
            raise ValueError(
                f"the batch's rows are {longest} tokens long, past the {limit} positions the network's learned "
                f"position embedding ({path}) holds: build the batches with max_length={limit} or less (the collator's "
                "max_length; a tokenizer whose model_max_length names no limit does not lower it)")

    def _parameter(self, path: str, kind: MatrixKind) -> torch.nn.Parameter:
        return self._lora(self.layers[path], kind.parameter).weight

    def _lora(self, layer, name: str) -> torch.nn.Module:
        """The layer's ``lora_A`` or ``lora_B`` (``name``) module of this model's adapter: every entry point reaches the
        adapter through here first (the sites' parameters, :attr:`device`).

        :raises ValueError: if the network no longer holds the adapter (peft's ``delete_adapter``): a bare
            ``KeyError`` from torch's ``ModuleDict`` otherwise.
        """
        modules = getattr(layer, name)
        if self.adapter not in modules:
            raise self._not_running()
        return modules[self.adapter]

    def _not_running(self) -> ValueError:
        """The refusal of a network that no longer runs this model's adapter (``set_adapter``, ``delete_adapter``)."""
        active = active_adapter(self.net)
        deleted = not all(self.adapter in layer.lora_A for layer in self.layers.values())
        return ValueError(
            f"the network now runs adapter {active!r}, but this LoraModel was built for adapter {self.adapter!r}"
            + (", which it no longer holds (net.delete_adapter): build a LoraModel (and guide) over the network as it is "
               f"now, for {active!r}" if deleted else
               f" (its LoRA layers and head would be mixed): call net.set_adapter({self.adapter!r}), or build a LoraModel "
               f"for {active!r}")
        )

    def adapter_values(self, given: dict | None = None) -> dict:
        """Current peft LoRA weights as site values (kinds without a peft parameter, ``R`` and ``S``, start at zero):
        site -> ``site.shape``; ``given`` (site -> value, float32 on the model's device) in place of the adapter's for
        its sites (a guide's ``init`` covering some sites: a BLoB-style guide's ``A``, its trained ``B`` read here).

        :raises ValueError: as :meth:`check_adapter_trained`, on the values returned (a guide built from this adapter
            would pair untrained LoRA values with the trained head).
        """
        given = {k: torch.as_tensor(v).detach() for k, v in (given or {}).items()}
        unknown = sorted(set(given) - set(self.sites))
        if unknown:
            raise ValueError(f"unknown site(s) {unknown}; the model's sites are {list(self.sites)}")
        check_values({k: self.sites[k] for k in given}, given, allow_sample_dim=False)
        values = self._held_values() | {k: v.to(self.device, torch.float32) for k, v in given.items()}
        self.check_adapter_trained("what is built from the adapter", "call model.write_adapter(guide.mean()) first "
                                   "(A and B sites), or pass init=guide.mean()", values=values)
        return values

    def check_start_trained(self, use: str) -> None:
        """:meth:`check_adapter_trained` for running the model at its start (``predict(model, None, ...)``: the
        adapter's own weights, sites without a peft parameter at 0): after a ``fit`` whose guide's mean was never
        written, that pairs the untrained LoRA with the trained head. Nothing to check with the adapters disabled
        (``net.disable_adapter()``: the base network and its original head).

        :raises ValueError: as :meth:`check_adapter_trained`.
        """
        if not self._sites_disabled():
            self.check_adapter_trained(f"{use} with guide=None (the adapter's own weights)",
                                       "call model.write_adapter(guide.mean()) first, or pass the guide",
                                       values=self._held_values())

    def _held_values(self) -> dict:
        """The adapter's LoRA weights as site values (zeros for kinds without a peft parameter)."""
        values = {}
        for name, site in self.sites.items():
            if site.kind.parameter is None:
                values[name] = torch.zeros(site.shape, device=self.device)
                continue
            mats = [self._parameter(p, site.kind).detach().float() for p in site.layers]
            values[name] = torch.stack(mats) if site.stacked else mats[0].clone()
        return values

    def check_adapter_trained(self, use: str, advice: str, values: dict | None = None) -> None:
        """Refuse an adapter whose LoRA values are not those of the guide that trained the network's head (``fit``,
        SVI; a MAP guide keeps its LoRA in the guide) or that ``load_guide`` restored it with: ``use`` (e.g. an exported
        adapter) would pair untrained LoRA values with the trained head. Each layer's delta ``B M A`` is compared
        (:meth:`_stale_layers`), so sites no peft parameter holds count too: a LoRA-XS core, ScalaBL's log-scales.
        Values :meth:`write_adapter` wrote after the head became what it is are no such pairing (a posterior sample,
        which the guide's predictive pairs with that head too). Once that guide is gone, or where a Pyro autoguide
        trained the head with ``SVI`` (its median never written), the record of the training refuses alike while the
        adapter and the head are as it left them (:func:`~pyro_lora.ownership.unwritten_fit`). Warn where the training
        left no head and its guide's mean was never written into the adapter. ``advice`` ends both sentences.

        :param values: the site values ``use`` runs this model at (a guide's start: :meth:`_held_values`, a LoRA-XS
            core at 0); ``None``: the adapter as peft runs it (an exported adapter: no core, ``R = I``; ``z = 0``).
        :raises ValueError: naming the guide and a site or layer whose values it holds otherwise than the adapter.
        """
        if self._check_paired_with_head(use, advice, values) is not None:
            return
        fitted = self._check_recorded_training(use, advice, values)
        if fitted is not None:  # no head to pair: what is built from the adapter would silently miss the training
            warnings.warn(
                f"the adapter still holds the LoRA values it held when {_wording(fitted)[1]} this network with a "
                f"{fitted.name}, not that guide's mean: {use} would miss the training; {advice}{_median(fitted)}",
                stacklevel=user_stacklevel(),
            )

    def _check_recorded_training(self, use: str, advice: str, values: dict | None):
        """:meth:`_check_paired_with_head`'s refusal where no live guide of the guides package trained the head (one
        garbage-collected since, a Pyro autoguide), read from the record of the network's last training
        (:func:`~pyro_lora.ownership.unwritten_fit`): the adapter still holds the LoRA from before it, beside the head
        it left. Returns that record where it left no head (``None``: no unwritten training)."""
        fitted, missed = unwritten_fit(self), None
        while fitted is not None and svi_left_head(fitted, self):  # SVI steps of a guide alone (its training missed):
            missed = missed or fitted  # the head is an earlier training's, if any is left unwritten
            fitted = unwritten_fit(self, below=fitted)
        if fitted is None:
            return missed
        paired = head_left_by(fitted, self)
        if fitted.head is not None and not paired:  # its head replaced since (a snapshot restored, a reload): moved on
            return missed
        # a LoRA-XS start beside another's head starts afresh (_stale_layers); values that are the training's mean, by
        # the record's sums (a partial init of its guide's mean, the guide gone), are no stale adapter
        if paired and not (values is not None and not self.builds_on_adapter and fitted.builds_on_adapter) \
                and not (values is not None and self._hold_trained(values, fitted)):
            how, made, head = _wording(fitted)
            raise ValueError(
                f"the network's head {how} a {fitted.name} whose LoRA values the adapter does not hold (it still holds "
                f"those from before {made} it, the guide alive or not): {use} would pair them with the {head}; "
                f"{advice}{_median(fitted)}")
        return missed if paired else fitted

    def _hold_trained(self, values: dict, fitted) -> bool:
        """Whether ``values`` give every LoRA weight the record ``fitted`` knows the trained value of
        (:func:`~pyro_lora.ownership.record_fit`'s sums) that value, and every other LoRA weight what the adapter holds
        (what that training left there: a point ``B`` it trained beside a random ``A``)."""
        trained = {n: pair[1] for n, pair in fitted.weights.items() if pair[1] is not None}
        mine = self.lora_weight_values({n: v.to(self.device, torch.float32) for n, v in values.items() if n in self.sites})
        if not trained or not set(trained) <= set(mine):
            return False
        held = dict(self.named_lora_weights())
        if any(not torch.equal(v, held[n].detach().to(v.dtype)) for n, v in mine.items() if n not in trained):
            return False
        sums = value_sums(mine[n] for n in trained)
        return all(sums[id(mine[n])] == trained[n] for n in trained)

    def _check_paired_with_head(self, use: str, advice: str, values: dict | None):
        """:meth:`check_adapter_trained`'s refusal; returns the guide that trained the head (``None``: none)."""
        owner = head_trainer(self)
        if owner is None:
            return None
        theirs = {n: v.detach() for n, v in owner.mean().items()}
        held = self._held_values() if values is None else values
        stale = [
            n for n, v in held.items()
            if self.sites[n].kind.parameter is not None and n in theirs and theirs[n].shape == v.shape and not torch.equal(theirs[n].float(), v)
        ] or self._stale_layers(owner, theirs, values)
        if stale and not written_beside_head(self):  # values written beside this head (a sample) are paired on purpose
            how = "is the one load_guide restored with" if head_loaded(owner) else "was trained by"
            kept = sorted({s.kind.description for s in owner.model.sites.values() if s.kind.parameter is None})
            also = (f" (its {' and '.join(kept)} sites have no peft parameter: no adapter holds them; save_guide keeps "
                    "the guide)" if kept else "")
            raise ValueError(
                f"the network's head {how} a {type(owner).__name__} whose LoRA values the adapter does not hold "
                f"({stale[0]}, ...){also}: {use} would pair them with the trained head; {advice}"
            )
        return owner

    def _stale_layers(self, owner, theirs: dict, values: dict | None) -> list:
        """Layers whose LoRA delta ``B M A`` (:meth:`_layer_delta`) at ``values`` (``None``: the adapter as peft runs it)
        differs from the one at ``owner``'s mean ``theirs``, to float rounding (a ScalaBL model rotates A and B, ``B A``
        kept): a model over other sites (ScalaBL's S, LoRA-XS's R) has no A or B site of its own to compare. A guide's
        start on a model whose A and B are not the adapter's trained LoRA (LoRA-XS: the base weights' SVD) is compared
        only with a trainer on the same A and B (another LoRA-XS model): beside another's head it starts afresh."""
        if values is not None and not self.builds_on_adapter and owner.model.builds_on_adapter:
            return []
        ours = {} if values is None else per_layer(self.sites, values)
        trained = per_layer(owner.model.sites, theirs)
        stale = []
        for path in self.layers:
            if owner.model._lora_shapes.get(path) != self._lora_shapes[path]:
                continue  # another rank since: check_network refuses that guide
            mine, its = self._layer_delta(path, ours.get(path, {})), owner.model._layer_delta(path, trained.get(path, {}))
            if not torch.allclose(mine, its, rtol=1e-4, atol=1e-5 * float(its.abs().max())):
                stale.append(path)
        return stale

    def _layer_delta(self, path: str, given: dict) -> torch.Tensor:
        """``B M A`` (``[d_out, d_in]``, float32, peft's scaling left out) of layer ``path`` at ``given`` (matrix letter
        -> value): ``A`` and ``B`` the adapter's where not given, the between kinds applied in stage order where given."""
        a, b = ((given[k.letter] if k.letter in given else self._parameter(path, k)).detach().float()
                for k in (down_kind(), up_kind()))
        rows = a.T  # [d_in, r]: A's columns as inputs, so each between kind applies as in the forward
        for kind in between_kinds():
            if kind.letter in given:
                rows = kind.apply(rows, given[kind.letter].detach().float(), None)
        return b @ rows.T

    def initial_values(self, init: dict | None = None) -> dict:
        """A guide's starting values: ``init`` (site -> ``site.shape``) checked, or the adapter's (:meth:`adapter_values`);
        float32 on the model's device.

        :raises ValueError: for a missing or unknown site, a wrong shape or a non-finite value in ``init``.
        """
        if init is None:
            return self.adapter_values()
        if not isinstance(init, dict):
            raise ValueError(f"init must be a dict of site name -> value (site.shape), got {type(init).__name__}")
        values = {k: torch.as_tensor(v).detach() for k, v in init.items()}
        check_values(self.sites, values, allow_sample_dim=False)
        return {k: v.to(self.device, torch.float32) for k, v in values.items()}

    def write_adapter(self, values: dict) -> None:
        """Copy site values (e.g. a posterior mean) into the peft LoRA parameters.

        :raises ValueError: for wrong values, or while the adapter is merged (unmerging afterwards would
            subtract the new delta from a base that holds the old one).
        """
        self.check_network()
        check_values(self.sites, values, allow_sample_dim=False)
        self._check_peft_sites()  # before any write: a refusal leaves the adapter as it was
        with torch.no_grad():
            for path, mats in per_layer(self.sites, values).items():
                for matrix, v in mats.items():
                    self._parameter(path, KINDS[matrix]).copy_(v)
        record_write(self)

    def _check_peft_sites(self) -> None:
        """Refuse sites that no peft parameter holds (a LoRA-XS core, ScalaBL's scales): a peft adapter cannot carry them."""
        kinds = {site.kind for site in self.sites.values()}
        missing = sorted((k for k in kinds if k.parameter is None), key=lambda k: k.letter)
        if missing:
            raise ValueError(
                f"an {missing[0].letter} site ({missing[0].description}) has no peft parameter to write into, so "
                "a guide's mean can be written as an adapter for A and B sites only: a LoRA-XS or ScalaBL guide is "
                "kept with save_guide / load_guide, and so is a Pyro autoguide over this model (save_guide(autoguide, "
                "folder), load_guide(folder, model, guide=autoguide))"
            )

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the base network runs in (that of its input embeddings; ``float32`` for a base without one).
        ``bfloat16`` or ``float16`` turn autocast on in every forward."""
        if self._embeddings is None:
            return torch.float32
        # trainable embeddings (peft's modules_to_save) are held in float32: the base's dtype is the one they had
        return getattr(self._embeddings, _BASE_DTYPE, self._embeddings.weight.dtype)

    @property
    def forward_dtype(self) -> torch.dtype:
        """The dtype the network computes in here and now: a half-precision base's own, else that of an enclosing
        ``torch.autocast`` (a user's), else ``float32``. The half-precision checks (overflow, loss scaling) key on it."""
        if self.compute_dtype in HALF_DTYPES:
            return self.compute_dtype
        kind = self.device.type
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32

    @property
    def device(self) -> torch.device:
        return self._lora(next(iter(self.layers.values())), "lora_A").weight.device

    def _check_prior_sites(self) -> None:
        """A dict prior names every site and no other (a misspelt site's prior was ignored, a missing one a KeyError in
        the first step), and every site's prior has its event shape: refused when the model is built."""
        if isinstance(self.prior, dict):
            missing, unknown = [n for n in self.sites if n not in self.prior], [k for k in self.prior if k not in self.sites]
            if missing or unknown:
                raise ValueError(f"the prior dict must name every site and no other: missing {missing}, unknown {unknown}; "
                                 f"the sites are {list(self.sites)}")
        if not isinstance(self.prior, float):
            for site in self.sites.values():
                d = self.prior_distribution(site)
                # torch reports an affine image of a Gamma as real (the transform's codomain) where its support is a
                # half-line: its log-density, NaN or -inf off it, is probed at a real matrix of entries -1 to 1
                probe = _PRIOR_PROBE.to(self.device).repeat(site.numel // 5 + 1)[:site.numel].reshape(site.shape)
                with torch.no_grad():
                    try:
                        value = float(d.log_prob(probe).min())
                    except ValueError:  # torch's argument validation: the probe is off the support it checks
                        value = math.nan
                if not math.isfinite(value):
                    raise ValueError(
                        f"prior of site {site.name!r} gives log-density {value:g} at a real matrix (entries "
                        "from -1 to 1): its support is not every real matrix, but LoRA matrices take any real values; "
                        "give a distribution over the reals (Normal, MatrixNormalKronecker, ...)")

    def prior_distribution(self, site: Site) -> torch.distributions.Distribution:
        """The prior of ``site`` with event shape ``site.shape``."""
        if isinstance(self.prior, (int, float)):
            # a fill, not torch.tensor(..., device=...): a host-to-device copy would synchronise the GPU per site and step;
            # float32 as the sites are, not the user's default dtype (a float64 default made the ELBO another number)
            return unchecked_isotropic_normal(site.shape, torch.full((), float(self.prior), dtype=torch.float32,
                                                                     device=self.device))
        d = self.prior[site.name] if isinstance(self.prior, dict) else self.prior(site)
        if not isinstance(d, torch.distributions.Distribution):
            raise ValueError(f"prior of site {site.name!r} is a {type(d).__name__}, not a distribution")
        if tuple(d.batch_shape) != ():  # Pyro sums a batch of priors: each site's log-prior counted that many times
            raise ValueError(f"prior of site {site.name!r} has batch shape {tuple(d.batch_shape)}, expected () (one "
                             f"distribution over the site: .to_event() its dimensions)")
        if tuple(d.event_shape) != site.shape:
            raise ValueError(f"prior of site {site.name!r} has event shape {tuple(d.event_shape)}, expected {site.shape}")
        if not _real_support(d):  # a Gamma prior rewarded negative entries, whose log-density is -inf, with a number
            raise ValueError(f"prior of site {site.name!r} has support {d.support}, but LoRA matrices take any real values: "
                             "give a distribution over the reals (Normal, MatrixNormalKronecker, ...)")
        return d

    def settings(self) -> dict:
        """What defines this model's loss, by name, as plain values to compare across ranks (:func:`~pyro_lora.fit`
        refuses ranks that differ: it would average the gradients of other losses into one blended posterior): the
        class, ``adapter``, ``num_data``, each site's matrix, shape and layers (what ``random`` and ``group`` made), the
        prior (a float std as ``"prior"``; a dict or callable one per site, each entry of its distribution flattened:
        ``"prior of <site>"`` its class, ``"prior of <site>.scale"`` a parameter: a number where all its entries are
        equal, else its shape and a CRC-32; and ``"prior of <site> log-density"``, its log-density at two fixed points
        to 6 significant digits, which sees what attributes hide: a covariance held privately or in lazy properties,
        a mask), the likelihood's class and public attributes (``"likelihood.format"``), and a subclass's own options
        (``svd_init``, ``rotate``). A float std as the float32 the prior holds (``0.1 + 0.2`` is ``0.3``). Calls a
        callable prior once per site."""
        out = {"class": type(self).__name__, "adapter": self.adapter, "num_data": self.num_data,
               "sites": {n: [s.matrix, list(s.shape), list(s.layers)] for n, s in self.sites.items()}}
        if isinstance(self.prior, (int, float)):
            out["prior"] = float(str(numpy.float32(self.prior)))  # the float32 held, as its shortest decimal
        else:
            probe = torch.Generator().manual_seed(0)
            for name, site in self.sites.items():
                prior = self.prior_distribution(site)
                out.update(_flat_setting(f"prior of {name}", prior))
                points = torch.randn(2, *site.shape, generator=probe).to(self.device)
                with torch.no_grad():
                    density = prior.log_prob(points).double().tolist()
                out[f"prior of {name} log-density"] = [float(f"{v:.6g}") for v in density]
        out["likelihood"] = type(self.likelihood).__name__
        for key, value in vars(self.likelihood).items():
            if not key.startswith("_"):
                out.update(_flat_setting(f"likelihood.{key}", value))
        return out

    def logits(self, batch: dict, values: dict | None = None, num_samples: int | None = None,
               flipout_locs: dict | None = None) -> torch.Tensor:
        """Class logits with the LoRA matrices set to ``values``.

        :param values: site -> ``site.shape`` or, with ``num_samples=S``, ``[S, *site.shape]``; ``None``: the model at
            its start, the adapter's own weights with sites no peft parameter holds at 0 (a LoRA-XS core: the base
            network; ScalaBL's ``z = 0`` is the peft model as it is).
        :param flipout_locs: A site -> its posterior mean: those sites' noise ``values - loc`` is sign-flipped
            per example (flipout, :func:`~pyro_lora.handoff.lora_delta`).
        :returns: ``[B, C]`` or ``[S, B, C]``, float32 whatever the network's dtype.
        :raises ValueError: for batch entries the network takes but the likelihood does not hand it
            (:meth:`~pyro_lora.likelihoods.Likelihood.check_inputs`), values missing a site or naming an unknown one,
            or of another shape (a sample dim without ``num_samples``, or of another size).
        :raises HalfPrecisionOverflowError: (a ``FloatingPointError``) if a half-precision network's logits are NaN or
            infinite (an overflow; but ``-inf`` at a missing answer of the batch's ``choice_mask``). Under weight samples the sampled
            predictives (:func:`~pyro_lora.predict`, TFB's search) tell the samples' width from the network's own.
        """
        self.check_network()
        check_batch(batch)
        self.likelihood.check_inputs(self.net, batch)
        self._check_token_ids(batch.get("input_ids"))
        self._check_token_types(batch.get("token_type_ids"), batch.get("input_ids"))
        if num_samples is not None:
            num_samples = check_count(num_samples, "num_samples", alternative="or None for values without a sample dim")
        if values is not None:  # shapes only (no host read): a missing layer ran the adapter's own matrices
            check_values(self.sites, values, allow_sample_dim=num_samples is not None, num_samples=num_samples,
                         finite=False)
        dtype = self.forward_dtype
        # autocast keeps its cast copies of the parameters until the outermost autocast block exits (enabled or not): a
        # block around a whole training loop (a user's, fit's own) would run every step on the first step's weights
        torch.clear_autocast_cache()
        with _autocast(self.device, self.compute_dtype), hooks_ran(self):  # a call's hooks ran (heads)
            logits = self._logits(batch, values, num_samples, flipout_locs).float()
        if dtype in HALF_DTYPES and _overflowed(logits, batch.get("choice_mask")).any():  # one reduction, one sync
            name = str(dtype).removeprefix("torch.")
            if self.compute_dtype in HALF_DTYPES:
                way_out = "load the base in " + ("bfloat16 (float32's range) or float32" if dtype == torch.float16 else "float32")
                raise HalfPrecisionOverflowError(f"the logits of this {name} network are NaN or infinite: its activations "
                                                 f"overflowed; {way_out}", dtype, way_out)
            way_out = f"run it without autocast{' or under bfloat16 autocast' if dtype == torch.float16 else ''}"
            raise HalfPrecisionOverflowError(f"the logits under {name} autocast are NaN or infinite: the float32 network's "
                                             f"activations overflowed in half precision; {way_out}", dtype, way_out)
        return logits

    def _logits(self, batch, values, num_samples, flipout_locs):
        disabled = [p for p, layer in self.layers.items() if layer.disable_adapters]
        rewritten = base_rewriting_inits(self.net) if disabled else {}
        if rewritten:
            raise ValueError(
                f"the adapters are disabled ({disabled[0]}), but {describe_inits(rewritten)} subtracted its initial B A "
                "from the base weights: without the adapter the network runs those residual weights, not the pretrained "
                "model; for zero-shot predictions load the base model without the adapter"
            )
        if values is None:
            if disabled or all(site.kind.parameter is not None for site in self.sites.values()):
                handoff.see_checkpoints(self._checkpointing)
                return self.likelihood.logits(self.net, batch, num_samples)
            # the model at its start: peft's own forward runs no core, i.e. a LoRA-XS model at R = I, not at R = 0
            values = self._held_values()
        if disabled:
            raise ValueError(
                f"the adapters are disabled ({disabled[0]}, e.g. inside net.disable_adapter()): handed LoRA weights "
                "would be applied anyway; leave that context, or predict with guide=None for the base model"
            )
        family = sequence_first_family(self.net)
        if num_samples is not None and num_samples > 1 and family:
            raise ValueError(f"a {family} network runs LoRA layers sequence-first, so S={num_samples} "
                             "weight samples cannot share one forward: predict with chunk_size=1")
        weights = per_layer(self.sites, values)
        if flipout_locs:
            check_values({n: self.sites[n] for n in flipout_locs if n in self.sites}, flipout_locs,
                         allow_sample_dim=False, finite=False)  # one mean per site: a short stack would skip layers
            bad = [n for n in flipout_locs if self.sites[n].kind.role != "down"]
            if bad:
                raise ValueError(f"flipout applies to A sites only, got {bad}")
            if is_cloze(self.likelihood):
                raise ValueError(FLIPOUT_CLOZE)
            if family:  # the sign flips are drawn per row of a layer's input: per position there, shared by the examples
                raise ValueError(f"a {family} network runs LoRA layers sequence-first ([tokens, batch, d]): flipout's sign "
                                 "flips would be drawn per position and shared by every example; use flipout=False")
            for path, mats in per_layer({n: self.sites[n] for n in flipout_locs}, flipout_locs).items():
                weights[path][handoff.FLIPOUT_LOC] = mats[down_kind().letter]
        ids = batch.get("input_ids")  # flipout's sign flips are per row: each layer's input must hold the examples'
        rows = ids.shape[0] * (num_samples or 1) if flipout_locs and torch.is_tensor(ids) else None
        _check_skipped_hooks(self.layers, self.adapter)
        with handoff.handed(self.layers, self.adapter, weights, num_samples, self._checkpointing, rows):
            return self.likelihood.logits(self.net, batch, num_samples)

    def __call__(self, batch: dict, kl_weight: float = 1.0) -> torch.Tensor:
        """The Pyro model. ``kl_weight`` scales the weight sites (KL annealing); guides scale theirs alike.

        A batch without ``"labels"`` samples ``"obs"`` (``[B]``, class indices): ``pyro.infer.Predictive``'s predictions.
        A guide that marks a site with ``infer={"flipout_loc": loc}`` (its mean) gets flipout in the likelihood inside an
        ELBO that averages over its particles (:func:`~pyro_lora.pyro_stack.in_averaging_elbo`: ``fit``, ``SVI`` with
        ``Trace_ELBO`` and its kin); elsewhere (``Importance``, ``RenyiELBO``, a replay of one's own), where draws may be
        weighed by ``exp(log p - log q)`` and per-example weights would bias them, every example sees the one draw, with
        a warning.
        Under ``pyro.infer.Predictive`` and ``Importance`` it warns where the network's modes leave a dropout probability
        above 0 in its forward (:func:`~pyro_lora.modes.dropout_in_training`: dropout modules, functional and attention
        dropout, a mixture of experts' jitter; ``predict`` runs in eval mode: call ``model.net.eval()`` before them),
        and refuses Pyro's MCMC there (:meth:`_check_dropout`). Under ``AutoLaplaceApproximation.laplace_approximation``
        (a Hessian) the network runs sdpa's math kernel, which, unlike the fused ones, has a second derivative.
        Under a replay of one's own with gradients on (``poutine.trace(poutine.replay(model, trace=guide_trace))``),
        the optimizer step that follows a backward pass through it is a training step (a loss of one's own, as Pyro's
        custom objectives): there a guide built on another model object is refused, the ELBO's problems refused below
        are warned of (the loss may add terms of its own), and the batch counts towards the ``num_data`` warning.

        :raises ValueError: if a value replayed from a guide has another shape than its site (a guide built
            for another model); for a Pyro autoguide built over another LoraModel object, which an inference runs
            with this one (:func:`~pyro_lora.contract.check_autoguide_model`); inside a plate (Pyro's vectorized particles, or a minibatch plate of the user's: the
            model scales its data term itself; ``TraceTailAdaptive_ELBO``, which Pyro runs over vectorized particles
            only); under an ELBO (not a replay of one's own, as above), for a ``kl_weight`` the guide's sites are not
            scaled by (a Pyro autoguide: its ``log q`` unscaled), guide values blocked from the model
            (``poutine.block``), the observed site ``"obs"`` hidden from the ELBO or a ``poutine.mask`` of ``False``;
            under a per-row ``poutine.scale`` or ``poutine.mask`` (the weight sites are global); for a ``num_data`` below a labelled batch's rows; for labels the likelihood refuses, in
            ``batch["labels"]`` or handed to ``"obs"`` (``poutine.condition``; a token-level likelihood, which derives
            its observed tokens from ``batch["labels"]``, refuses any so handed); in ``fit``, for a batch without labels; or
            under Pyro's optimizers (``pyro.infer.SVI``) for a network computing in float16; under a JIT ELBO or an
            MCMC kernel's ``jit_compile``; under MCMC, for dropout on or a ``num_data`` other than the batch's rows (a
            subsampling data plate).
        """
        if torch.jit.is_tracing():  # Pyro's JIT ELBOs and MCMC kernels run this Python once, on the first call
            if in_mcmc():
                raise ValueError("the model is being JIT-traced (an MCMC kernel's jit_compile=True: HMC, NUTS): the "
                                 "compiled potential energy would skip the model's checks of every later call and keep "
                                 "the network's train/eval mode of the first (dropout after net.eval()); build the "
                                 "kernel with jit_compile=False (the default)")
            raise ValueError("the model is being JIT-traced (JitTrace_ELBO and its kin): the compiled loss would skip its "
                             "checks of every later batch (a label of -100 scored, a num_data below the batch's rows "
                             "taken) and keep the network's train/eval mode of the first call (dropout after "
                             "net.eval()); use Trace_ELBO or TraceMeanField_ELBO")
        self._check_autoguide_model()
        check_batch(batch)  # Pyro's own SVI hands batches here without fit's or predict's reading of them
        check_no_plate("model")
        mcmc = in_mcmc()
        self._check_dropout(mcmc)
        if pyro_params.recording():  # Pyro's own optimizers: fit holds its own and has set the trainable set
            if self.forward_dtype == torch.float16 and torch.is_grad_enabled() and in_svi_step():
                raise ValueError(
                    "training a network that computes in float16 (a float16 base, or under float16 autocast) with Pyro's "
                    "SVI has no loss scaling, so small gradients underflow to zero unnoticed: train with pyro_lora.fit "
                    "(which scales the loss), your own loop with a torch.amp.GradScaler, or compute in bfloat16 or float32"
                )
            self.set_trainable()  # another LoraModel over this network may have switched requires_grad since
            prototyping = prototyping_autoguide()
            if prototyping is not None:  # an autoguide's first call: what Pyro's param store hands it as its start
                pyro_params.check_autoguide_start(prototyping, self)
            pyro_params.record(self._pyro_name, self.named_point_parameters())
        with poutine.scale(scale=kl_weight), poutine.trace() as tr:
            values = {name: pyro.sample(name, self.prior_distribution(site)) for name, site in self.sites.items()}
        renamed = [n for n in self.sites if n not in tr.trace.nodes]  # poutine.do adds "<site>__CF" beside each: not this
        if renamed:
            found = [n for n, node in tr.trace.nodes.items() if node["type"] == "sample"]
            raise ValueError(
                f"the model's sites were renamed ({found[0] if found else None!r} for {renamed[0]!r}: "
                "pyro.contrib.autoname.scope, or another handler renaming sites): its checks of the guide and of "
                "conditioned values read its own names; call the model outside such a handler"
            )
        read = [n for n, node in tr.trace.nodes.items() if node["type"] == "param"]
        if read and not pyro_params.recording():
            raise ValueError(
                f"the prior reads the Pyro param {read[0]!r}: fit trains the guide's and the network's parameters, never "
                "the param store, so it would stay at its value; train with pyro.infer.SVI (Pyro's optimizers train it), "
                "or give the prior fixed values"
            )
        guide_trace = replayed_trace()
        # an ELBO's replay, or one of the user's own: the checks of a loss are the ELBO's; a step trains, where a loss (a
        # validation one) only evaluates. A replay of one's own with gradients on trains where a loss of one's own through
        # it is stepped (Pyro's custom objectives), where read for the prior's density it does not: its checks wait for
        # that step (pyro_stack.on_training_step)
        run = elbo_run() if guide_trace is not None else None
        own = guide_trace is not None and run is None and torch.is_grad_enabled() and pyro_params.recording()
        loss = run is not None or own  # an ELBO's loss, or maybe one of the user's own
        elbo_problems = self._check_global_sites(tr.trace, loss)
        if guide_trace is not None:
            elbo_problems += self._check_guide_trace(guide_trace, tr.trace, run, loss)
        if run is not None and elbo_problems:
            raise ValueError(elbo_problems[0])
        self._check_conditioned(tr.trace, guide_trace)
        if guide_trace is None and not torch.is_grad_enabled():
            self._check_drawer(tr.trace)
        for name, v in values.items():
            shape = self.sites[name].shape
            if tuple(v.shape[v.dim() - len(shape) :]) != shape:
                raise ValueError(
                    f"site {name!r} got a value of shape {tuple(v.shape)} from the guide, but the model's site has shape "
                    f"{shape}: the guide was built for another model"
                )
            if v.dim() > len(shape) and v.numel() == math.prod(shape):  # Predictive's samples keep its plates' dims
                values[name] = v = v.reshape(shape)
            if v.dim() > len(shape):
                raise ValueError(f"site {name!r} got a batch of values {tuple(v.shape)}: {VECTORIZED}")
        flipout = {n: tr.trace.nodes[n]["infer"]["flipout_loc"] for n in values if "flipout_loc" in tr.trace.nodes[n]["infer"]}
        if flipout and not in_averaging_elbo():
            warnings.warn(FLIPOUT_WEIGHED, stacklevel=user_stacklevel())
            flipout = {}
        y = self._labels(batch)  # its checks read the labels on the host: before the forward is queued
        # a training step of an ELBO outside fit (which keeps its own books): Pyro's SVI, or a loop of the user's own
        training = run == "training" and torch.is_grad_enabled() and pyro_params.recording()
        if pyro_params.recording():
            self._follow_autoguide(guide_trace, training)
        count = self.num_data is None and y is not None and self._svi_batch is not False
        if count and training:
            self._count_svi_batches(batch, y)
        # the Hessian's second derivative has no formula through torch's fused attention kernels (sdpa's flash and
        # memory-efficient ones): its math kernel, the same attention in plain ops, has
        hessian = in_laplace_approximation()
        if hessian and handoff.reentrant_checkpointing(self.net):  # torch's raw error came from inside Pyro's Hessian
            raise ValueError("AutoLaplaceApproximation.laplace_approximation differentiates the loss twice with "
                             "torch.autograd.grad, which transformers' reentrant activation checkpointing (use_reentrant="
                             "True) cannot take: switch it off (model.net.gradient_checkpointing_disable()) or enable it "
                             "with use_reentrant=False for the Hessian")
        with sdpa_kernel(SDPBackend.MATH) if hessian else contextlib.nullcontext():
            logits = self.logits(batch, values, flipout_locs=flipout)
        if torch.is_grad_enabled() and pyro_params.recording():
            note_forward(self, logits)  # a backward pass through it trains the head for this call's guide
        rows = logits.shape[0]
        size = self.num_data if self.num_data is not None and self.num_data >= rows else rows
        if mcmc and size != rows:  # Pyro's own refusal names no plate nor num_data
            raise ValueError(
                f"HMC/NUTS cannot sample this model: its 'data' plate subsamples, since num_data={self.num_data} differs "
                f"from the batch's {rows} rows (a minibatch of the training set, its log-likelihood scaled by "
                f"{self.num_data}/{rows}), and MCMC needs the exact potential of the whole data; build the model with "
                "num_data=None, or run MCMC on the whole training set in one batch"
            )
        observed = self.likelihood.distribution(logits)
        if hasattr(observed, "observer"):
            observed.observer = self._observe
        with pyro.plate("data", size, subsample_size=rows, device=logits.device), poutine.trace() as obs:
            pyro.sample("obs", observed, obs=y)
        if loss and hidden_from_elbo(obs.trace.nodes["obs"]):
            elbo_problems.append(
                "the model's observed site 'obs' is hidden from the ELBO (a poutine.block around the model: hide=['obs'], "
                "hide_types=['observe'], or expose= without it): its loss would lack the data term, -(log p(w) - log "
                "q(w)) alone, and training would pull the guide to the prior; block nothing of the model under an ELBO "
                "(the data weigh by num_data, the prior against them by kl_weight)"
            )
            if run is not None:
                raise ValueError(elbo_problems[-1])
        self._check_observed(batch, obs.trace.nodes["obs"], y, rows)
        if own:
            drawn = [node["value"] for node in tr.trace.nodes.values() if node["type"] == "sample"]
            others = [g for g in marked_guides(guide_trace) if g.model is not self]
            on_training_step(self, functools.partial(LoraModel._replay_trained, problems=elbo_problems, others=others,
                                                     batch=batch if count else None, y=y),
                             through=[logits, *drawn])
        elif torch.is_grad_enabled():  # SVI, an ELBO, fit: their steps are their own runs'
            on_training_step(self)
        return logits

    def _check_dropout(self, mcmc: bool) -> None:
        """Refuse Pyro's MCMC (``mcmc``) and ``AutoLaplaceApproximation.laplace_approximation`` (a Hessian of the
        loss), and warn under ``Predictive`` and ``Importance``, where the network's modes
        leave dropout on (:func:`~pyro_lora.modes.dropout_in_training`): they read the model as one density, where an
        ELBO (a training step, MC-dropout style, or its loss, the objective that step trains) takes dropout as noise of
        its own draws.

        :raises ValueError: under MCMC: the potential energy is random, and an acceptance test of a random potential
            is no valid MCMC; under the Laplace approximation: its Hessian would be one of a random loss.
        """
        # predict runs in eval mode; Predictive (under no_grad) and Importance in the one they find
        hessian = in_laplace_approximation()
        who = ("MCMC" if mcmc else "AutoLaplaceApproximation.laplace_approximation" if hessian else "pyro.infer.Predictive" if not torch.is_grad_enabled() and in_predictive()
               else "pyro.infer.Importance" if in_importance() else None)
        dropping = dropout_in_training(self.net) if who else []
        if not dropping:
            return
        found = f"{who} runs the network with dropout on ({len(dropping)} modules in training mode, e.g. {dropping[0]})"
        if hessian:
            raise ValueError(f"{found}: its Hessian would be one of a random loss (another covariance on each call at "
                             "the same loc); call model.net.eval() before laplace_approximation")
        if mcmc:
            raise ValueError(f"{found}: the potential energy would be random (another, and another gradient, at the "
                             "same LoRA weights on each call), and HMC's or NUTS's acceptance test of a random potential "
                             "is no valid MCMC (its samples are not the posterior's); call model.net.eval() before MCMC")
        if who == "pyro.infer.Importance":
            warnings.warn(f"{found}: each draw's weight, and so the log evidence, carry dropout noise besides the "
                          "posterior's; call model.net.eval() before Importance", stacklevel=user_stacklevel())
            return
        warnings.warn(f"{found}: its predictions carry dropout noise besides the posterior's, where pyro_lora.predict "
                      "runs in eval mode; call model.net.eval() before Predictive (for MC dropout, use MCDropoutGuide)",
                      stacklevel=user_stacklevel())

    def _check_autoguide_model(self) -> None:
        """Refuse a Pyro autoguide built over another LoraModel object that ``SVI``, an ELBO (its loss, with or
        without gradients), ``Importance`` or ``Predictive`` runs with this model
        (:func:`~pyro_lora.contract.check_autoguide_model`: in training, any other object; else one whose signature or
        head differs), before any work: the autoguide the inference runs, or, where it runs a function of one's own
        (``lambda b: autoguide(b)``), each autoguide whose parameters the guide trace replayed to the model read
        (:func:`~pyro_lora.pyro_params.traced_autoguides`; ``Predictive``, which replays none, is checked on the
        draws: :meth:`_check_drawer`). An autoguide over a function of one's own that calls the model is not
        compared: what it runs is the user's.

        :raises ValueError: naming the difference, and to build the autoguide over this model or ``load_guide`` a
            saved one into an autoguide over it.
        """
        guide = inference_guide()
        if isinstance(guide, AutoGuide):
            autoguides = [guide]
        else:  # a guide of pyro_lora's marks its sites, and checks itself (_check_guide_trace)
            trace = replayed_trace() if guide is not None and pyro_params.autoguides_seen() else None
            autoguides = pyro_params.traced_autoguides(trace) if trace is not None and not marked_guides(trace) else []
        others = [g for g in autoguides if unwrap(g.model) is not self and isinstance(unwrap(g.model), LoraModel)]
        if not others:
            return
        training = torch.is_grad_enabled() and elbo_run() == "training"  # read from the stack once, not per autoguide
        action = ("train with pyro.infer.SVI or an ELBO's training loss" if training else "run pyro.infer.Predictive" if in_predictive()
                  else "run pyro.infer.Importance" if in_importance() else "compute an ELBO's loss")
        for autoguide in others:
            check_autoguide_model(self, autoguide, action, training)

    def _follow_autoguide(self, guide_trace, training: bool) -> None:
        """Follow a Pyro autoguide running the model (read from the call stack:
        :func:`~pyro_lora.pyro_stack.running_autoguide`) as a guide of the guides package: an ELBO's training step
        (``training``) makes it the trainer of the network's point parameters and of its sites
        (:func:`~pyro_lora.ownership.follow_autoguide`); a run without gradients (``Predictive``, a validation loss) is
        refused once they changed under it (:func:`~pyro_lora.contract.check_autoguide`)."""
        if (not training and torch.is_grad_enabled()) or (guide_trace is not None and marked_guides(guide_trace)):
            return
        autoguide = running_autoguide(self)
        if autoguide is None:
            return
        if training:
            follow_autoguide(self, autoguide)
            pyro_params.note_autoguide(autoguide, self)
        else:
            check_autoguide(self, autoguide, "run pyro.infer.Predictive or an ELBO's loss")

    def _count_svi_batches(self, batch, y):
        """Warn, as ``fit`` does (:func:`warn_unscaled`), once an ELBO trains on a second batch of a model without
        ``num_data``: batches told apart by their rows as a set (one batch of the whole data, shuffled, is one)."""
        rows = batch.get("input_ids")
        rows = (rows if torch.is_tensor(rows) else y).reshape(y.shape[0], -1).long()
        weights = torch.randint(1, 2**62, (rows.shape[1],), generator=torch.Generator().manual_seed(0)).to(rows.device)
        fingerprint = (rows * weights).sum(-1).sort().values  # a hash per row (int64 wraps), in no order
        if self._svi_batch is None:
            self._svi_batch = fingerprint
        elif self._svi_batch.shape != fingerprint.shape or not torch.equal(self._svi_batch, fingerprint):
            self._svi_batch = False
            warn_unscaled(self, 2, "an ELBO trained outside fit (pyro.infer.SVI, a loop of your own)")

    def _check_observed(self, batch, node, y, rows):
        """The label checks, on the value the ``"obs"`` site received however it came (``batch["labels"]``, or a handler:
        ``poutine.condition(model, data={"obs": y})``, which skipped them: ``-100`` rows scored as examples, a ``num_data``
        below the rows taken as scale 1); read after the site, as only the site tells what a handler handed it."""
        if not node["is_observed"]:
            return
        if node["value"] is not y:
            if self.likelihood.event_dims != 0:  # its observed tokens are labels shifted, padding masked: not re-checkable
                raise ValueError(
                    f"the 'obs' site got its value from a handler (poutine.condition), but {type(self.likelihood).__name__} "
                    "derives the observed tokens from batch['labels'] (shifted by one, padding masked), which a value "
                    "handed to 'obs' skips; give the labels as batch['labels'] instead"
                )
            self.likelihood.observed({**batch, "labels": node["value"]})  # the checks batch["labels"] gets
        if self.num_data is not None and self.num_data < rows:
            raise ValueError(f"num_data={self.num_data} is below this batch's {rows} rows: num_data is the number of "
                             "training examples the data term is scaled to; build the model with num_data=len(training set)")

    def _labels(self, batch):
        """The batch's observed labels, or ``None`` for a batch without them (``"obs"`` is then drawn); inside ``fit``
        (which keeps Pyro's param store out: an SVI step of Pyro's own warns of ``"obs"`` itself) refused."""
        if batch.get("labels") is not None or self.likelihood.event_dims != 0:  # a token-level likelihood: its tokens
            return self.likelihood.observed(batch)
        if not pyro_params.recording():
            raise ValueError(f"the batch has no 'labels' (its keys are {sorted(batch)}): fit trains on labelled batches; "
                             "a batch without labels draws 'obs', as pyro.infer.Predictive's predictions")
        return None

    def _check_global_sites(self, own, loss: bool) -> list[str]:
        """Refuse a per-row ``poutine.scale`` or ``poutine.mask`` around the model, and where the run is an ELBO's loss
        or may be one (``loss``) return as its problem any other mask but ``True``: its weight sites are drawn once for all the data, so a mask of B rows counted
        their log-prior once per kept row (with Pyro's validation off, as in ``fit``) and ``mask=False`` dropped it,
        leaving ``-log q``: no ELBO either way (``pyro.infer.Predictive`` runs the model under ``mask=False``, as may a
        replay of one's own: no ELBO reads a log-density there)."""
        node = own.nodes[next(iter(self.sites))]
        scale, mask = node["scale"], node["mask"]
        if torch.is_tensor(scale) and scale.numel() != 1:
            raise ValueError(
                f"the model runs under poutine.scale with a tensor of shape {tuple(scale.shape)}: its weight sites are "
                "global (one draw for all the data), so they take one scalar scale; weight the rows' likelihood by "
                "weighting the data (repeat or leave out rows), and scale model and guide alike by a number"
            )
        masked = ("the model runs under poutine.mask: its weight sites are global (one draw for all the data), so a mask "
                  "per row would count their log-prior once per kept row and mask=False drops it, which is no ELBO; leave "
                  "the masked rows out of the batch instead")
        if torch.is_tensor(mask) and mask.numel() != 1:
            raise ValueError(masked)
        return [masked] if loss and mask is not None and not bool(mask) else []

    def _check_guide_trace(self, guide_trace, own, run, loss: bool) -> list[str]:
        """The model replayed against ``guide_trace`` (``own``: the trace of the model's weight sites; ``run``: how an
        ELBO runs it, :func:`~pyro_lora.pyro_stack.elbo_run`, ``None`` for a replay of the user's own): refuse a
        pyro_lora guide built for another model (:func:`~pyro_lora.contract.check_guide`: another checkpoint, other
        sites; in an ELBO's training step with gradients on, another model object: the step would train one model's
        guide against another's network). Where the replay is an ELBO's loss, or may be one (``loss``), return as its
        problems guide values that did not reach the model (a ``poutine.block`` around it) and guide sites scaled
        otherwise than the model's (``kl_weight`` or a ``poutine.scale`` on one side only: ``log q`` and ``log p`` would
        be weighted apart, which is no (beta-)ELBO); a replay of one's own read for the prior's density may leave sites
        to the prior. A weight site reparametrised by ``poutine.reparam`` is observed, its randomness in the latent sites
        the reparam drew in its place (``LocScaleReparam``'s ``<site>_decentered``): those are checked as the weight
        sites are."""
        problems = []
        for guide in marked_guides(guide_trace):
            if guide.model is not self:  # a training step: the very model, as fit requires
                check_guide(self, guide, "run an ELBO (pyro.infer.SVI, a replayed trace)",
                            same_model=run == "training" and torch.is_grad_enabled())
            tempered = tempered_training(guide, "train")
            if tempered and run != "evaluation" and torch.is_grad_enabled():  # a number is fine; a step undoes T
                problems.append(tempered)
        if not loss:
            return []
        # own holds the weight sites and what a handler drew while they were sampled: a reparam's latent replacements
        latent = [n for n, node in own.nodes.items() if node["type"] == "sample" and not node["is_observed"]]
        unreached = [n for n in latent
                     if n not in guide_trace.nodes or own.nodes[n]["value"] is not guide_trace.nodes[n]["value"]]
        if unreached:
            problems.append(
                f"no value of the guide's reached the model's site {unreached[0]!r} ({len(unreached)} sites so: a "
                "poutine.block around the guide or the model, a guide over fewer sites, or missing sites a poutine.reparam "
                "of the weight sites samples): the model drew them from its "
                "prior, and log q lacks them, which is no ELBO; block nothing, or build the model with the sites you "
                "want random (random=, target_modules)"
            )
        scale = float(own.nodes[next(iter(self.sites))]["scale"])
        unscaled = {n: float(node["scale"]) for n, node in guide_trace.nodes.items() if node["type"] == "sample"
                    and not node["is_observed"] and (n in latent or node["infer"].get("is_auxiliary"))
                    and not math.isclose(float(node["scale"]), scale, rel_tol=1e-6)}
        if unscaled:
            name, value = next(iter(unscaled.items()))
            problems.append(
                f"the model's weight sites are scaled by {scale:g} (kl_weight, poutine.scale), but the guide's site {name!r} "
                f"by {value:g} ({len(unscaled)} sites so): the objective would weigh log q and log p apart, which is no "
                "ELBO. To scale a minibatch to the training set, scale neither: the model scales its data term itself, by "
                f"num_data / rows (the batch's), so build it with LoraModel(..., num_data=len(training set)) (it has "
                f"num_data={self.num_data}). Scaling the model and the guide alike is right only to weigh the whole ELBO "
                "(fit's 1 / num_data) or the KL (kl_weight, tempering): it scales the KL with the data. A Pyro autoguide "
                "takes no kl_weight: run it under poutine.scale(scale=kl_weight), or use a pyro_lora guide"
            )
        masked = [n for n, node in guide_trace.nodes.items() if node["type"] == "sample" and not node["is_observed"]
                  and (n in latent or node["infer"].get("is_auxiliary")) and not _unmasked(node.get("mask"))]
        if masked:  # a scale of 0 by another name: the scale check above does not see it
            problems.append(
                f"the guide's site {masked[0]!r} runs under poutine.mask ({len(masked)} sites so): the ELBO drops its "
                "log q, which is no ELBO (trained so, the posterior collapses to a point); mask neither side, and leave "
                "rows out of the batch instead"
            )
        return problems

    def _replay_trained(self, problems, others, batch, y):
        """An optimizer step follows a backward pass through a replay of the user's own with gradients on
        (:func:`~pyro_lora.pyro_stack.on_training_step`): a loss of their own steps on it, as Pyro's 'custom objectives'
        ELBO. Refuse a guide of ``others`` (built on another model object) as an ELBO's training step does; warn of the
        first of ``problems`` (those an ELBO's loss refuses: pyro_lora sees the replay, not the loss, which may add
        terms of its own); and count ``batch`` (``None``: not counted) towards the num_data warning."""
        for guide in others:
            check_guide(self, guide, "train through a replay of your own (an optimizer step on a loss of "
                        "poutine.trace(poutine.replay(model, trace=guide_trace)))", same_model=True)
        if problems:  # the frames above: on_training_step's hook, the optimizer's step wrapper, the step's caller
            warnings.warn("an optimizer step trains through a replay of your own (a backward pass through "
                          "poutine.trace(poutine.replay(model, trace=guide_trace)), as Pyro's custom objectives) in "
                          f"which {problems[0]}; a replay only read, as for the prior's log density, is no such step",
                          stacklevel=user_stacklevel())
        if batch is not None:
            self._count_svi_batches(batch, y)

    def _check_conditioned(self, own, guide_trace=None):
        """Refuse conditioned values (``poutine.condition``, ``pyro.infer.Predictive``'s posterior samples) for weight
        sites the model does not have (drawn for another model: other target_modules or ``random``), or for some of its
        weight sites where the others would be drawn from the prior. Sites the replayed ``guide_trace`` holds (an ELBO's
        guide over the sites left free: Pyro's way of holding some latents fixed) are no such draws, nor are those of a
        run whose draws are thrown away: an autoguide's prototype run (which become its sites), and the runs in which
        ``Predictive`` and ``MCMC`` learn the model's structure and a starting point (:func:`probing_model`). Which
        guide drew the values is :meth:`_check_drawer`'s."""
        conditioned = conditioned_names()
        # observed without a condition handler: a reparametrised site (poutine.reparam), or poutine.do's intervention
        given = [n for n in self.sites if own.nodes[n]["is_observed"] and n in conditioned]
        # a latent site of the model's own (a hierarchical prior's scale) may be named like a weight site
        foreign = sorted(n for n in conditioned - set(self.sites) if is_site_name(n) and n not in own.nodes)
        # drawn from the prior: not observed, and no value set by poutine.do (which observes "<site>__CF" instead)
        supplied = set() if guide_trace is None else {n for n, node in guide_trace.nodes.items()
                                                      if node["type"] == "sample" and not node["is_observed"]}
        missing = [n for n in self.sites if not own.nodes[n]["is_observed"] and n not in supplied
                   and not own.nodes.get(f"{n}__CF", {}).get("is_observed")]
        # a guide drawing a site the model holds fixed: the draw is never used, and the ELBO widens q there without bound
        redrawn = [n for n in given if n in supplied]
        if redrawn:
            raise ValueError(
                f"the guide draws {redrawn[0]!r}, which poutine.condition holds fixed in the model ({len(redrawn)} such "
                "sites): the model never uses those draws, and the ELBO's entropy term would widen the guide there "
                "without bound; build the guide over the free sites only (a Pyro autoguide over the conditioned model)"
            )
        if foreign or (given and missing and prototyping_autoguide() is None and not probing_model()):
            what = (f"for {len(foreign)} weight sites this model does not have (e.g. {foreign[0]!r}): values drawn for "
                    "another model (other target_modules or random=)" if foreign else
                    f"for {len(given)} of the model's {len(self.sites)} weight sites, not for {len(missing)} (e.g. "
                    f"{missing[0]!r}), and no guide or sampler supplies the others, which would be drawn from the prior "
                    "(values drawn for another model: other target_modules or random=?)")
            raise ValueError(
                f"values were conditioned on (poutine.condition, pyro.infer.Predictive's guide or posterior samples) "
                f"{what}; build the guide on this model, or give every weight site a value (to hold some fixed, run a "
                "guide or MCMC over the others)"
            )

    def _check_drawer(self, own) -> None:
        """Where every weight site is conditioned on a draw a guide of the guides package, or a Pyro autoguide over a
        LoraModel, recorded without gradients (:func:`~pyro_lora.pyro_stack.drawn_by`: ``pyro.infer.Predictive``'s, also
        where a guide function of one's own called the autoguide), refuse that guide as ``predict`` would
        (:func:`~pyro_lora.contract.check_guide`; an autoguide: :func:`~pyro_lora.contract.check_autoguide_model`): a
        guide for another checkpoint, LoRA scaling or prior of the same sites gives values the model cannot tell apart
        by their shapes. Values several guides drew (point guides of two models over one network) pass where one of
        them fits; a guide built on this model checked itself as it drew, and an autoguide ``Predictive`` runs itself
        was checked before any work (:meth:`_check_autoguide_model`)."""
        given = {n: own.nodes[n]["value"] for n in self.sites if own.nodes[n]["is_observed"]}
        drawers = drawn_by(given) if len(given) == len(self.sites) else []
        if not drawers or any(_built_over(guide) is self for guide in drawers):  # its own guide checked itself as it drew
            return
        refusals = []
        for guide in reversed(drawers):  # values several guides drew (point guides alike) are any fitting one's
            try:
                if not isinstance(guide, AutoGuide):
                    return check_guide(self, guide, "predict with pyro.infer.Predictive")
                if not isinstance(_built_over(guide), LoraModel) or guide is innermost_autoguide():
                    return  # an autoguide over a function of one's own; or checked before any work
                action = "run pyro.infer.Predictive" if in_predictive() else "run the model on its draws"
                return check_autoguide_model(self, guide, action, training=False)
            except ValueError as refused:
                refusals.append(refused)
        raise refusals[0]

    def _observe(self, log_prob, scored=None):
        # for fit's divergence check and bar, the data term alone (the ELBO's prior term scales with 1/N): per example,
        # or per scored token for a token-level likelihood (``scored``), whose per-row sums follow the rows' lengths
        self.last_nll = data_nll(log_prob, scored)


def _built_over(guide):
    """The model ``guide`` was built over: a Pyro autoguide's, handlers around it unwrapped."""
    return unwrap(guide.model) if isinstance(guide, AutoGuide) else guide.model


def _wording(fitted) -> tuple[str, str, str]:
    """How the refusals name what made the record ``fitted``: a training, or a load that restored the head with it."""
    if fitted.by == "load_guide":
        return "is the one load_guide restored with", "load_guide restored", "restored head"
    return "was trained by", f"{fitted.by} last trained", "trained head"


def _median(fitted) -> str:
    """How to write a Pyro autoguide's values into the adapter, where ``fitted`` (:func:`~pyro_lora.ownership.unwritten_fit`)
    is an autoguide's training."""
    return (" (of a Pyro autoguide, model.write_adapter(autoguide.median()) writes its values)"
            if fitted.name.startswith("Pyro ") else "")


def warn_unscaled(model, batches: int, runner: str) -> None:
    """Warn where ``runner`` (``"fit"``, an ELBO trained outside it) steps through ``batches`` batches, several, of a
    model without ``num_data``: each is taken as the whole training set, its likelihood weighed ``B / N`` against the
    prior (pyro#1437)."""
    if model.num_data is None and batches > 1:
        warnings.warn(f"the model has no num_data, and {runner} steps through {batches} batches: each is taken as the "
                      "whole training set, so the data weigh B/N of what they should against the prior (a posterior too "
                      "wide, a MAP pulled to 0); give LoraModel(..., num_data=len(training set)), and scale neither the "
                      "model nor the guide for the minibatch: the model scales its data term by num_data / rows itself",
                      stacklevel=user_stacklevel())


FLIPOUT_WEIGHED = ("the guide marks its A sites for flipout, which applies only inside an ELBO that averages over its "
                   "particles (Trace_ELBO, TraceMeanField_ELBO, TraceGraph_ELBO, TraceEnum_ELBO: fit, pyro.infer.SVI); "
                   "here (Importance, RenyiELBO, ReweightedWakeSleep, a replay of your own) draws may be weighed by "
                   "exp(log p - log q), which per-example weights would bias (log p(y) 0.3 nats off in a test), so every "
                   "example sees the guide's one draw")
FLIPOUT_CLOZE = ("flipout draws its weight noise per row, and cloze multiple choice runs each choice of a question as a "
                 "row of its own (and the shared question apart): the choices would be scored under different weights; "
                 "use flipout=False, or the letter format (MultipleChoice(format='letter'))")


def sequence_first_family(net) -> str | None:
    """The model family of ``net`` when it runs LoRA layers sequence-first (``[T, N, d]``: XLNet, Longformer, LED,
    FSMT), else ``None``."""
    family = getattr(getattr(base_network(net), "config", None), "model_type", None)
    return family if family in _SEQUENCE_FIRST else None


def _flat_setting(name: str, value, depth: int = 0) -> dict:
    """``value`` as named plain values (:meth:`LoraModel.settings`): a distribution or transform as its class under
    ``name`` and its public attributes under ``name.<attribute>`` (its cached lazy properties left out: one rank may have
    read them), a tensor as one number where its entries are all equal (a filled prior std), as a list where it has
    8 entries or fewer (answer token ids), else as its shape and a CRC-32 of its values, a list item by item, and
    numbers, strings and other values as they are."""
    if torch.is_tensor(value):
        flat = value.detach().reshape(-1)
        if flat.numel() and bool((flat == flat[0]).all()):
            return {name: flat[0].item()}
        if flat.numel() <= 8:
            return {name: value.tolist()}
        return {name: f"tensor {list(value.shape)} CRC-32 {distributed._digest(value):08x}"}
    if isinstance(value, (torch.distributions.Distribution, torch.distributions.Transform)) and depth < 8:
        out = {name: type(value).__name__}
        for key, item in vars(value).items():
            lazy = isinstance(getattr(type(value), key, None), torch.distributions.utils.lazy_property)
            if not key.startswith("_") and not lazy:
                out.update(_flat_setting(f"{name}.{key}", item, depth + 1))
        return out
    if isinstance(value, (list, tuple)) and depth < 8:
        out = {}
        for i, item in enumerate(value):
            out.update(_flat_setting(f"{name}[{i}]", item, depth + 1))
        return out or {name: []}
    return {name: value}


# where a prior's log-density is probed (LoraModel._check_prior_sites): entries a LoRA matrix takes; wider, a legitimate
# prior's tail overflows float32 (a Gumbel of scale 0.1 at -10: exp(100))
_PRIOR_PROBE = torch.tensor([-1.0, -0.1, 0.0, 0.1, 1.0])


def _real_support(d) -> bool:
    """Whether ``d``'s support, as torch reports it, is every real tensor of its event shape (a transformed
    distribution's is its last transform's codomain: :meth:`LoraModel._check_prior_sites` probes it too)."""
    support = d.support
    while isinstance(support, torch.distributions.constraints.independent):
        support = support.base_constraint
    return support is torch.distributions.constraints.real


def _check_prior_and_size(prior, num_data) -> None:
    """Refuse, before anything is built, a float prior std that is not finite and positive (a std of 0 or nan showed up
    only as a diverging first step) and a ``num_data`` that is not a positive integer (0 read as "no size")."""
    if isinstance(prior, bool) or (isinstance(prior, numbers.Real) and not (math.isfinite(prior) and prior > 0)):
        raise ValueError(f"prior must be a finite positive std (or a dict / callable of distributions), got {prior!r}")
    # the prior computes in float32, its log-density as -x^2 / (2 std^2): 1e-50 was held as 0 (log-prior nan), 1e39
    # failed every call in torch's raw overflow error, each blamed on the learning rate by fit; from 1e19 on the
    # log-prior of a draw came out -inf or nan (2 std^2, or a draw's square, beyond float32)
    low, high = float32_std_range()
    if isinstance(prior, numbers.Real) and not low <= prior <= high:
        raise ValueError(f"prior std {prior!r} is beyond float32's reach: the prior's log-density is -x^2 / (2 std^2), "
                         f"which float32 computes for std from {low:.4g} to {high:.4g} (draws up to 8 stds out); rescale "
                         "the problem, or give a prior of your own")
    if isinstance(prior, torch.distributions.Distribution):  # a Pyro one is callable (its sample): called with a site
        raise ValueError(f"prior must be a float std, a dict or a callable site -> distribution, got the distribution "
                         f"{prior!r:.60}: give a callable, e.g. lambda site: dist.Normal(0., 1.).expand(site.shape)"
                         ".to_event(len(site.shape))")
    if not isinstance(prior, (numbers.Real, dict)) and not callable(prior):  # a tensor failed in the first step
        raise ValueError(f"prior must be a float std, a dict site -> distribution or a callable site -> distribution, got "
                         f"a {type(prior).__name__} ({prior!r:.60}); give a single std as float(prior)")
    if num_data is not None and (isinstance(num_data, bool) or not isinstance(num_data, numbers.Integral) or num_data < 1):
        raise ValueError(f"num_data must be the training set's size, a positive integer (None: each batch is the data), "
                         f"got {num_data!r}")


def _warn_head_partly_frozen(net) -> None:
    """Warn where part of the task head (:func:`~pyro_lora.sites.head_modules`) trains and part stays frozen: a peft
    adapter built with ``modules_to_save=["classifier"]`` on DeBERTa leaves its ``pooler``, which DeBERTa checkpoints
    lack and transformers draws afresh, at its random values through every fit."""
    heads = head_modules(net)
    trains = {name: any(p.requires_grad for p in m.parameters()) for name, m in heads.items()}
    frozen = [name for name, t in trains.items() if not t]
    if frozen and any(trains.values()):
        warnings.warn(
            f"{type(base_network(net)).__name__}'s head {frozen} is frozen while {[n for n, t in trains.items() if t]} "
            "trains: fit leaves it at its values, random where the checkpoint lacked it (DeBERTa's pooler); build the "
            f"adapter with it in modules_to_save (LoraConfig(modules_to_save={list(heads)}), as pyro_lora.add_lora does)",
            stacklevel=user_stacklevel())


def _input_embeddings(net):
    embeddings = embedding(net, "input")
    return embeddings if isinstance(getattr(embeddings, "weight", None), torch.Tensor) else None


_POSITION_EMBEDDINGS = ("wpe", "position_embeddings", "embed_positions")  # GPT-2 and kin, BERT and kin, OPT and kin


def _config_positions(net) -> int | None:
    """The positions a network of computed positions runs within as its config names them: ``max_position_embeddings``,
    or a rope scaling's ``factor`` times the original length it names (YaRN, longrope: Qwen2.5 keeps the original in
    ``max_position_embeddings``). A scaling naming no original length (linear: Gemma 3, Llama 3's ``llama3``, dynamic NTK)
    extends nothing past ``max_position_embeddings``, which is already the trained length. ``None`` without one, or for
    DeBERTa's relative positions (no absolute position is read: its 512 is no row limit)."""
    config = getattr(net, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if not (isinstance(limit, int) and limit > 0):
        return None
    if getattr(config, "relative_attention", False) and not getattr(config, "position_biased_input", True):
        return None
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    # one dict, or one per layer type (ModernBERT's, Gemma 3's)
    ropes = scaling.values() if isinstance(scaling, dict) and all(isinstance(v, dict) for v in scaling.values()) else [scaling]
    for rope in (r for r in ropes if isinstance(r, dict)):
        factor, original = rope.get("factor"), rope.get("original_max_position_embeddings")
        extends = (rope.get("rope_type") or rope.get("type")) in ("yarn", "longrope")
        if extends and isinstance(factor, (int, float)) and isinstance(original, int):
            limit = max(limit, int(original * factor))
    return limit


def _learned_positions(net) -> tuple[str, int, int | None] | None:
    """(path, positions, padding index) of the network's learned absolute position embedding, whose lookup fails past
    its rows (OPT's rows start at an ``offset``, RoBERTa's, XLM-R's and MPNet's after their ``padding_idx``: 514 rows
    hold 512 tokens, padding numbered ``padding_idx`` whatever the row's length); ``None`` for rotary, ALiBi, relative
    or sinusoidal positions, which run on."""
    if getattr(getattr(net, "config", None), "position_embedding_type", "absolute") != "absolute":
        return None  # BERT-like relative keys: the table is not looked up by absolute position

    def first_row(module):
        return getattr(module, "offset", 0) + (0 if module.padding_idx is None else module.padding_idx + 1)

    found = [(path, module.num_embeddings - first_row(module), module.padding_idx) for path, module in net.named_modules()
             if isinstance(module, torch.nn.Embedding) and path.rsplit(".", 1)[-1] in _POSITION_EMBEDDINGS]
    return min(found, key=lambda item: item[1]) if found else None


HALF_DTYPES = (torch.float16, torch.bfloat16)
_INPUT_DTYPE = "_pyro_lora_input_dtype"
_BASE_DTYPE = "_pyro_lora_base_dtype"  # the dtype of a module's parameters before _float32_trainables upcast them


def _check_float32_trainables(net, params) -> None:
    """Refuse a module holding some of ``params`` (trainable, half precision) beside frozen half-precision parameters:
    :func:`_float32_trainables` could not run it on both dtypes."""
    upcast = {id(p) for p in params if p.dtype in HALF_DTYPES}
    for path, module in net.named_modules() if upcast else ():
        own = [(n, p) for n, p in module._parameters.items() if p is not None]
        trained = [n for n, p in own if id(p) in upcast]
        frozen = [n for n, p in own if id(p) not in upcast and p.dtype in HALF_DTYPES]
        if trained and frozen:
            raise ValueError(
                f"{path} holds the trainable {trained[0]} beside the frozen {frozen[0]} of a {own[0][1].dtype} base "
                "(peft's bias='all' or 'lora_only' trains base biases): trainable parameters are held in float32 for "
                "their updates, and the module could not run on both dtypes; build the adapter with bias='none', "
                "make the whole module trainable, or load the base in float32"
            )


def _float32_trainables(net, params) -> None:
    """Hold half-precision trainable parameters in float32: AdamW's small updates vanish in bf16 / fp16 (the
    forward runs under autocast, so the network computes in its own dtype all the same). The modules holding them
    take their inputs in float32 and give their outputs back in the input's dtype, so the network also runs as
    before outside autocast (a user's own ``net(...)``). :func:`_check_float32_trainables` first."""
    upcast = {id(p) for p in params if p.dtype in HALF_DTYPES}
    with torch.no_grad():
        for module in net.modules():
            own = [p for p in module._parameters.values() if p is not None and id(p) in upcast]
            if own and not hasattr(module, _BASE_DTYPE):
                setattr(module, _BASE_DTYPE, own[0].dtype)
            for p in own:
                p.data = p.data.float()
            if own and not hasattr(module, _INPUT_DTYPE):
                setattr(module, _INPUT_DTYPE, None)
                module.register_forward_pre_hook(_inputs_to_float32)
                module.register_forward_hook(_output_to_input_dtype)


def _inputs_to_float32(module, args):
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    half = [a.dtype for a in tensors if a.dtype in HALF_DTYPES]
    # integer inputs (an embedding's token ids): the output goes on in the dtype the module had in the base
    ids = bool(tensors) and not any(a.is_floating_point() for a in tensors)
    setattr(module, _INPUT_DTYPE, half[0] if half else getattr(module, _BASE_DTYPE, None) if ids else None)
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in HALF_DTYPES else a for a in args)


def _output_to_input_dtype(module, args, output):
    dtype = getattr(module, _INPUT_DTYPE)
    if dtype is not None and isinstance(output, torch.Tensor) and output.is_floating_point():
        return output.to(dtype)
    return output


def full_precision(device: torch.device):
    """No autocast on ``device``'s type: a guide's own float32 math (covariances, Choleskys, log-densities, KFAC
    sums) stays float32 under a user's or fit's autocast, which is meant for the network's forward."""
    return torch.autocast(device.type, enabled=False)


def _autocast(device: torch.device, dtype: torch.dtype):
    """Autocast in ``dtype`` for a half-precision network, else nothing (an enclosing autocast stays on)."""
    if dtype in HALF_DTYPES:
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _check_skipped_hooks(layers: dict, adapter: str) -> None:
    """Refuse hooks the weight hand-off would skip: with handed weights a LoRA layer computes ``B A x`` from the
    matrices without calling peft's ``lora_A`` / ``lora_B`` modules (the layer itself and its ``lora_dropout`` are
    called, their hooks run). pyro_lora's own float32 casts (:func:`_float32_trainables`) are the hand-off's to do.
    Runs before every forward with handed weights: a few dict lookups per layer."""
    for name in _HOOK_DICTS:
        if getattr(torch.nn.modules.module, "_global" + name):  # mostly observers (profilers, module trackers): said
            warnings.warn(
                f"a global module hook is registered (torch.nn.modules.module{'._global' + name}, e.g. by "
                "register_module_forward_hook or a profiler's module tracker): peft calls it on every LoRA layer's "
                "lora_A and lora_B, which the weight hand-off does not call, so a guide's forward skips it there; if "
                "it changes outputs, register it on the modules you need instead (a LoRA layer's own hooks are "
                "honoured)", stacklevel=user_stacklevel())
    for path, layer in layers.items():
        for parameter in ("lora_A", "lora_B"):
            module = getattr(layer, parameter)[adapter]
            for name in _HOOK_DICTS:
                hooks = getattr(module, name)
                if hooks and any(h is not _inputs_to_float32 and h is not _output_to_input_dtype for h in hooks.values()):
                    raise ValueError(
                        f"LoRA layer {path}'s {parameter}[{adapter!r}] holds a hook ({name.strip('_')[:-1]}) that the "
                        "weight hand-off would skip: with a guide's LoRA weights the layer computes B A x from the "
                        f"handed matrices without calling {parameter}; register the hook on the LoRA layer {path} "
                        "itself (honoured), or remove it")


def _check_layer_runs(path, layer, adapter) -> None:
    """Refuse a LoRA layer that runs other adapters than ``adapter`` alone: the hand-off gives it ``adapter``'s matrices."""
    if list(layer.active_adapters) != [adapter]:
        raise ValueError(
            f"LoRA layer {path} runs adapter(s) {layer.active_adapters}, but this LoraModel hands it adapter {adapter!r}'s "
            f"matrices (net.base_model.set_adapter switches the layers and leaves net.active_adapter): call "
            f"net.set_adapter({adapter!r})"
        )


def _lora_shapes(layer, adapter):
    """The shapes of a LoRA layer's ``A`` and ``B`` weights for ``adapter`` (``None`` if it has none)."""
    if adapter not in layer.lora_A:
        return None
    return layer.lora_A[adapter].weight.shape, layer.lora_B[adapter].weight.shape


def _submodule(net, path):
    """The module at ``path`` or ``None``: ``net.get_submodule`` without its checks, as it runs before every forward
    (``getattr``, not ``_modules``: a checkpoint wrapper forwards its wrapped module's attributes)."""
    module = net
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module
