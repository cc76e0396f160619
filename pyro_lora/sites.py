"""Which LoRA matrices of a peft model are random, and how they are named as Pyro sample sites.

A LoRA layer computes ``y = W0 x + s B A x`` with ``A: [r, d_in]``, ``B: [d_out, r]`` and
``s = alpha / r``. Same-kind, same-shape matrices of all layers (``q_proj.lora_A`` of every block)
form one stacked site of shape ``[L, r, d_in]``: one Pyro site per kind, not per matrix, is what
keeps an SVI step close to a plain LoRA step.
"""

from __future__ import annotations

import collections.abc
import re
import warnings
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, is_dataclass

import torch
from peft.tuners.tuners_utils import BaseTuner

from .kinds import KINDS, MatrixKind
from .callers import user_stacklevel
from .quantized import check_no_torch_quantized


def is_site_name(name: str) -> bool:
    """Whether ``name`` is named as :func:`build_sites` names a site: ``"<key>.lora_<letter>"``, with a shape suffix
    ``".r<r>_<in>x<out>"`` where one key covers layers of several shapes."""
    match = re.fullmatch(r".+\.lora_([^.]+)(\.r\d+_\d+x\d+)?", name)
    return match is not None and match.group(1) in KINDS


@dataclass(frozen=True)
class Site:
    """One Pyro sample site.

    :param str name: Pyro site name, e.g. ``"q_proj.lora_A"`` (stacked) or the module path plus
        ``".lora_A"`` (``group="matrix"``).
    :param str matrix: the letter of its :class:`~pyro_lora.kinds.MatrixKind`: ``"A"``, ``"B"``, ``"R"`` (the
        r x r core of LoRA-XS), ``"S"`` (ScalaBL's 1 x r row of log-scales of A's singular values) or a
        registered one.
    :param tuple layers: module paths of the LoRA layers it holds, in stacking order.
    :param tuple shape: the site's event shape: ``(L, rows, cols)`` when stacked, else ``(rows, cols)``.
    """

    name: str
    matrix: str
    layers: tuple
    shape: tuple

    @property
    def kind(self) -> MatrixKind:
        """The site's entry in :data:`~pyro_lora.kinds.KINDS`."""
        return KINDS[self.matrix]

    @property
    def stacked(self) -> bool:
        return len(self.shape) == 3

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def base_network(net):
    """The transformers model under a peft wrapper: a ``PeftModel``'s or a peft tuner's (``peft_model.base_model``), or
    ``net`` itself."""
    net = net.get_base_model() if hasattr(net, "get_base_model") else net
    return net.model if isinstance(net, BaseTuner) else net


def head_modules(model) -> dict:
    """The head of a task model, ``{name: module}``: every direct child of the transformers model (under peft's wrappers
    too) outside its backbone that holds parameters and no output embedding: DeBERTa's ``pooler`` and ``classifier``,
    BART's ``classification_head``, Llama's ``score`` (a BERT pooler lives inside the backbone: no head). The backbone is
    the child named ``base_model_prefix`` and the one holding the input embedding (Llama4ForCausalLM names a prefix it
    has no child of)."""
    base = base_network(model)
    prefix = getattr(base, "base_model_prefix", None)
    if not prefix:  # no transformers task model: nothing tells its backbone
        return {}
    output, inputs = embedding(base, "output"), embedding(base, "input")

    def holds(module, part):
        return part is not None and any(part is m for m in module.modules())

    return {name: m for name, m in base.named_children()
            if name != prefix and any(True for _ in m.parameters()) and not holds(m, output) and not holds(m, inputs)}


def embedding(model, which: str):
    """``model.get_input_embeddings()`` (``which="input"``) or ``get_output_embeddings()`` (``"output"``); ``None``
    where the model has no such method or it raises ``NotImplementedError`` (transformers' default for a model without)."""
    get = getattr(model, f"get_{which}_embeddings", None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None


def find_lora_layers(net, adapter: str | None = None) -> OrderedDict:
    """Module path -> peft LoRA ``Linear`` layer for every layer holding ``adapter``.

    Only peft ``lora.Linear`` layers (``fan_in_fan_out`` for GPT-2's ``Conv1D`` and ``lora_bias`` included) and
    peft's LoRA layers over bitsandbytes' 4-bit and 8-bit bases are handed sampled weights: all compute the base
    layer's output, then add ``s B A x`` from float LoRA matrices. LoRA on embedding layers is left out of the sites, with a warning naming the layers:
    those matrices stay point estimates.

    :raises ValueError: if the model has no LoRA layers for ``adapter``, any is merged, shares its LoRA matrices with
        another parameter (peft's ``ensure_weight_tying``), uses a LoRA variant
        (DoRA's magnitude vector, aLoRA, ...) or is a LoRA layer type the weight hand-off does not implement
        (convolutions, other quantized bases such as GPTQ or HQQ, ...), or the network holds a module of PyTorch's own
        quantisation (:func:`~pyro_lora.quantized.check_no_torch_quantized`).
    """
    from peft.tuners.lora import Embedding, Linear, LoraLayer

    check_no_torch_quantized(net)  # before the layers' weights are read: a quantised module's weight is a method
    adapter = adapter or active_adapter(net)
    holding = [(p, m) for p, m in net.named_modules() if isinstance(m, LoraLayer) and _holds(m, adapter)]
    layers = OrderedDict((p, m) for p, m in holding if type(m) in _linear_types(Linear))
    embeddings = [p for p, m in holding if isinstance(m, Embedding)]
    other = [f"{p} ({type(m).__name__})" for p, m in holding if p not in layers and p not in embeddings]
    if other:
        raise ValueError(
            f"LoRA layers of types the weight hand-off does not implement: {other[:4]}; only peft lora.Linear "
            "layers are supported (not target_parameters' ParamWrapper, convolutions, ...): change target_modules to Linear layers"
        )
    if not layers:
        raise ValueError(
            f"model {type(net).__name__} has no LoRA layers (on Linear modules) for adapter {adapter!r}: wrap it with "
            "peft.get_peft_model(model, LoraConfig(target_modules=[...])) or pyro_lora.add_lora first"
        )
    tied = _tied_lora(net, layers, adapter)
    if tied:
        raise ValueError(
            f"LoRA matrix {tied[0]} shares its storage with {tied[1]} (peft's ensure_weight_tying=True ties a tied lm_head's "
            "LoRA to the input embedding's): a sampled matrix would change only one of them; build the adapter without "
            "ensure_weight_tying, or leave lm_head out of target_modules"
        )
    if embeddings:
        warnings.warn(
            f"LoRA on embedding layers {embeddings} is not made random: those LoRA matrices stay point estimates "
            "(trained by fit, no prior); target only Linear layers to make every LoRA matrix random",
            stacklevel=user_stacklevel(),
        )
    variants = {p: type(m.lora_variant[adapter]).__name__ for p, m in layers.items() if adapter in getattr(m, "lora_variant", {})}
    if variants:
        path, name = next(iter(variants.items()))
        options = _variant_options(net, adapter)
        set_by = f" (set by {', '.join(o for o, _ in options)} in its LoraConfig)" if options else ""
        unset = f" ({', '.join(d for _, d in options)})" if options else ""
        raise ValueError(
            f"LoRA layer {path} uses the peft variant {name}{set_by}, which the weight hand-off does not implement (its "
            f"extra parameters or computation, such as DoRA's magnitude vector, would be ignored): build the adapter "
            f"with a plain LoraConfig{unset}"
        )
    merged = [p for p, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"LoRA layers are merged into the base weights ({merged[0]}, ...): call unmerge_adapter() first")
    return layers


def _variant_options(net, adapter) -> list:
    """``[(set, default)]`` of the adapter's peft config options that make peft build a LoRA variant, as peft's
    ``resolve_lora_variant`` reads them (a field tagged ``is_lora_variant`` that is set, an ``init_lora_weights`` listed
    as a variant): ``("use_dora=True", "use_dora=False")``, ``("init_lora_weights='mica'", "init_lora_weights=True")``,
    ``("kasa_config=KasaConfig(...)", "kasa_config=None")``; none for a network without that config."""
    configs = getattr(net, "peft_config", None)
    config = configs.get(adapter) if isinstance(configs, dict) else None
    if not is_dataclass(config):
        return []
    out = []
    for f in fields(config):
        value = getattr(config, f.name)
        if (f.name == "init_lora_weights" and value in f.metadata.get("lora_variants", ())) or (f.metadata.get("is_lora_variant") and value):
            default = f.default if f.default is not MISSING else f.default_factory()
            # a config object by its class: its repr runs to every field
            shown = repr(value) if isinstance(value, (bool, str, list, tuple)) else f"{type(value).__name__}(...)"
            out.append((f"{f.name}={shown}", f"{f.name}={default!r}"))
    return out


def _tied_lora(net, layers, adapter) -> tuple[str, str] | None:
    """The first (LoRA matrix, other parameter) of the network sharing one storage, ``None`` if none does."""
    mine = {}
    for path, layer in layers.items():
        for name in ("lora_A", "lora_B"):
            ptr = getattr(layer, name)[adapter].weight.untyped_storage().data_ptr()
            if ptr:  # 0: no storage of its own yet (a meta tensor)
                mine.setdefault(ptr, f"{path}.{name}.{adapter}")
    for name, p in net.named_parameters(remove_duplicate=False):
        owner = mine.get(p.untyped_storage().data_ptr())
        if owner is not None and not name.startswith(owner + "."):
            return owner, name
    return None


# peft initialisations that subtract the initial ``s B0 A0`` from the base weight (PiSSA, CorDA, OLoRA, LoftQ,
# LoRA-GA): the network with its adapter disabled, or with A = B = 0, is then not the pretrained model
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def lora_inits(net) -> dict:
    """Adapter -> its ``init_lora_weights``, read from the network's peft config (a network without one, LoRA
    injected by hand, gives none)."""
    config = getattr(net, "peft_config", None)
    return {a: getattr(c, "init_lora_weights", None) for a, c in config.items()} if isinstance(config, dict) else {}


def base_rewriting_inits(net) -> dict:
    """:func:`lora_inits` of the network's adapters initialised by one that rewrote the base weights they adapt
    (PiSSA, CorDA, OLoRA, LoftQ, LoRA-GA): any adapter, since they share the base weights. LoRA-GA counts only where it
    ran (:func:`_lora_ga_ran`)."""
    return {a: i for a, i in lora_inits(net).items() if isinstance(i, str) and i.lower().startswith(_BASE_REWRITING_INITS)
            and (i.lower() != "lora_ga" or _lora_ga_ran(net, a))}


# base-rewriting inits peft runs on a stored weight as if it were ``[out, in]``, whatever the layer's fan_in_fan_out
_TRANSPOSE_BLIND_INITS = ("olora", "loftq")


def check_inits(net) -> None:
    """Refuse an adapter that peft's OLoRA or LoftQ init set up on a layer storing its weight transposed
    (``fan_in_fan_out``, GPT-2's ``Conv1D``: ``[in, out]``): those inits factor the stored weight as if it were
    ``[out, in]``, so ``W - s B0 A0`` plus the adapter's ``s B0 A0`` is no longer the pretrained weight (logits 0.04 off
    at the start on a square layer; a raw shape error on another).

    :raises ValueError: naming the adapter, its init and a layer.
    """
    from peft.tuners.lora import LoraLayer

    for adapter, init in lora_inits(net).items():
        if not (isinstance(init, str) and init.lower().startswith(_TRANSPOSE_BLIND_INITS)):
            continue
        transposed = [name for name, m in net.named_modules()
                      if isinstance(m, LoraLayer) and adapter in m.lora_A and getattr(m, "fan_in_fan_out", False)]
        if transposed:
            raise ValueError(
                f"{describe_inits({adapter: init})} ran on {transposed[0]}, a layer storing its weight transposed "
                "(fan_in_fan_out=True, a Conv1D): peft's init factors that weight as if it were [out, in], so the adapter "
                "does not start at the pretrained model; use init_lora_weights='pissa' (which handles fan_in_fan_out), "
                "or the default init, on these layers")


def _lora_ga_ran(net, adapter) -> bool:
    """Whether peft's LoRA-GA init ran for ``adapter``: without the gradients ``preprocess_loraga`` attaches to the base
    layers it falls back to the default init (``B = 0``, the base weights untouched), and it refuses to run without
    ``lora_ga_config``. Where it ran it subtracted ``s B0 A0`` with the rows of ``A0`` orthonormal, so a layer it left
    at ``B = 0`` was left as it was: every ``B`` of the adapter at zero tells the fallback (nothing records it once
    trained: a trained fallback with ``lora_ga_config`` counts as ran)."""
    from peft.tuners.lora import LoraLayer

    if getattr(net.peft_config[adapter], "lora_ga_config", None) is None:
        return False
    return any(bool(m.lora_B[adapter].weight.any()) for m in net.modules() if isinstance(m, LoraLayer) and adapter in m.lora_B)


def describe_inits(inits: dict) -> str:
    """``adapter 'p' (init_lora_weights='pissa')``, for messages."""
    return ", ".join(f"adapter {a!r} (init_lora_weights={i!r})" for a, i in inits.items())


def _linear_types(linear) -> tuple:
    """peft's LoRA layers whose forward is ``base_layer(x) + s B A x``: ``lora.Linear`` and, when bitsandbytes is
    installed, its quantized-base variants."""
    try:
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt
    except ImportError:  # bitsandbytes is not installed: peft defines neither
        return (linear,)
    return (linear, Linear4bit, Linear8bitLt)


def _holds(layer, adapter):
    return any(adapter in getattr(layer, name, {}) for name in layer.adapter_layer_names)


def active_adapter(net) -> str:
    """The adapter a peft model runs (``"default"`` for a model without one).

    :raises ValueError: if several adapters are active at once: the hand-off replaces one adapter's matrices.
    """
    active = getattr(net, "active_adapters", None)
    if isinstance(active, (list, tuple)) and len(active) > 1:
        raise ValueError(
            f"several adapters are active at once ({list(active)}): a LoraModel puts a posterior over one adapter; "
            "call net.set_adapter(name) with one adapter name"
        )
    active = getattr(net, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        active = active[0]
    return active or "default"


def layer_dims(layer, adapter: str) -> tuple[int, int, int]:
    """``(r, d_in, d_out)`` of a peft LoRA layer's adapter."""
    r, d_in = layer.lora_A[adapter].weight.shape
    return r, d_in, layer.lora_B[adapter].weight.shape[0]


def check_random(random) -> tuple:
    """``random`` as a tuple of letters of :data:`~pyro_lora.kinds.KINDS`: a string (``"AB"``) or any collection of
    letters (a list, a set: their order is :data:`KINDS`'s whatever it is); a repeated letter counts once.

    :raises ValueError: for ``None``, a number, a mapping (its keys would be read, its values ignored), an empty choice
        or a letter that is no kind.
    """
    collection = isinstance(random, collections.abc.Iterable) and not isinstance(random, collections.abc.Mapping)
    letters = tuple(random) if collection else None
    if not letters or any(m not in KINDS for m in letters):
        raise ValueError(f"random must be a non-empty subset of {tuple(KINDS)} (a string such as 'AB', or a list of "
                         f"letters), got {random!r}")
    return letters


def build_sites(layers: dict, adapter: str, random=("A", "B"), group: str = "kind") -> OrderedDict:
    """Group the random matrices of ``layers`` into sites.

    :param layers: ordered module path -> LoRA layer (:func:`find_lora_layers`).
    :param random: which matrices are random, letters of :data:`~pyro_lora.kinds.KINDS` (``"A"``, ``"B"``,
        ``"R"``, ``"S"``, ...).
    :param group: ``"kind"`` stacks same-kind, same-shape matrices across layers; ``"matrix"`` gives one
        site per matrix. Layers of one kind with different ranks or widths form separate stacks, named with a
        ``.r{r}_{d_in}x{d_out}`` suffix; the A and B sites of a stack always hold the same layers.
    :returns: ordered site name -> :class:`Site`, the matrices of a stack in the order of :data:`KINDS` whatever
        the order of ``random`` (``"BA"`` is ``"AB"``: a guide's state is restored site by site in this order).
    """
    random = check_random(random)
    random = [m for m in KINDS if m in random]
    if group not in ("kind", "matrix"):
        raise ValueError(f"group must be 'kind' or 'matrix', got {group!r}")
    # one stack per module kind and whole layer shape (r, d_in, d_out): the A and B sites of a stack then hold the
    # same layers, even where one name covers several shapes (BERT's "dense", all-linear targets, rank_pattern)
    stacks = OrderedDict()
    for path, layer in layers.items():
        key = path if group == "matrix" else path.rsplit(".", 1)[-1]
        stacks.setdefault((key, layer_dims(layer, adapter)), []).append(path)
    shapes_per_key = Counter(key for key, _ in stacks)
    sites = OrderedDict()
    for (key, (r, d_in, d_out)), paths in stacks.items():
        for matrix in random:
            name = f"{key}.lora_{matrix}"
            shape = KINDS[matrix].matrix_shape(r, d_in, d_out)
            if group == "kind":
                if shapes_per_key[key] > 1:
                    name += f".r{r}_{d_in}x{d_out}"
                shape = (len(paths),) + shape
            sites[name] = Site(name, matrix, tuple(paths), tuple(shape))
    return sites


def matrix_view(sites: dict) -> dict:
    """Per-matrix view: ``"<module path>.lora_A"`` -> (site name, index in the stack or ``None``)."""
    return {
        f"{path}.lora_{site.matrix}": (name, i if site.stacked else None)
        for name, site in sites.items()
        for i, path in enumerate(site.layers)
    }


def check_values(sites: dict, values: dict, allow_sample_dim: bool = True, num_samples: int | None = None,
                 finite: bool = True, what: str = "site values") -> None:
    """Validate site values: every site present, shapes ``[*S, *site.shape]``, all finite.

    :param num_samples: the ``S`` a leading sample dim must have (1 broadcasts), where one is allowed.
    :param finite: check the values are finite (one host read per site: off in the forward's hot path).
    :param what: what ``values`` is to the caller, in the error for values that are no dict.
    :raises ValueError: for values that are no dict of tensors, naming the first missing/unknown site, wrong shape or
        non-finite value.
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{what} must be a dict of site name -> tensor, got {type(values).__name__}")
    unknown = sorted(set(values) - set(sites))
    if unknown:
        raise ValueError(f"unknown site(s) {unknown}; the model's sites are {list(sites)}")
    for name, site in sites.items():
        if name not in values:
            raise ValueError(f"no value for site {name!r}")
        v = values[name]
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"the value of site {name!r} must be a tensor of shape {site.shape}, got {type(v).__name__}")
        lead = v.dim() - len(site.shape)
        if tuple(v.shape[lead:]) != site.shape or lead not in ((0, 1) if allow_sample_dim else (0,)):
            raise ValueError(
                f"site {name!r} expects shape {site.shape}"
                f"{' with an optional leading sample dim' if allow_sample_dim else ''}, got {tuple(v.shape)}"
            )
        if lead and num_samples is not None and v.shape[0] not in (1, num_samples):
            raise ValueError(f"site {name!r} has {v.shape[0]} samples along its leading dim, not num_samples={num_samples}")
        if finite and not torch.isfinite(v).all():
            raise ValueError(f"site {name!r} has non-finite values (nan or inf)")


def per_layer(sites: dict, values: dict) -> dict:
    """Split site values into module path -> {matrix: tensor}.

    Stacked values ``[*S, L, rows, cols]`` are viewed, not copied: layer ``l`` gets ``v[..., l, :, :]``. One
    ``unbind`` per site, not ``L`` selects: its backward stacks the ``L`` gradients in one op, where each select's
    would write a zero-filled ``[*S, L, rows, cols]`` gradient and add them up.
    """
    out = {}
    for name, site in sites.items():
        v = values[name]
        for path, w in zip(site.layers, v.unbind(-3) if site.stacked else [v]):
            out.setdefault(path, {})[site.matrix] = w
    return out
