"""The contract between a guide and a model: a guide runs only on a model like the one it was built for.

A guide's posterior is over the LoRA matrices of one network: their names, shapes and kinds, the LoRA
scaling ``alpha / r`` that turns them into weight deltas, the adapter, the base weights they adapt and the
trained head beside them. :func:`describe` writes that down; :func:`check_guide` compares it at every
boundary (``fit``, ``predict``, ``load_guide``, ``export_adapter``) and names each difference.

Which guide left the network's point parameters as they are is kept by :mod:`pyro_lora.ownership`; a guide is
refused once they changed under it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re

import torch
from pyro.poutine.messenger import unwrap

from . import distributed, pyro_params
from .checks import is_integer_tensor
from .ownership import changed_point_parameters, followed, value_sums
from .quantized import int8_scales, is_quantized

ADAPTER_NAMES = ("lora_", ".modules_to_save.", "trainable_tokens_")  # in the names of the parameters peft adds


def parameter_adapter(name: str) -> str | None:
    """The peft adapter a parameter of the network belongs to, ``None`` for a base parameter: the name part right
    after its container (``lora_A.<adapter>.weight``, ``modules_to_save.<adapter>.bias``,
    ``trainable_tokens_delta.<adapter>``), matched by position, not anywhere in the path (an adapter named ``"0"``
    or ``"query"`` is also a module name)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith(("lora_", "trainable_tokens_")) or part == "modules_to_save":
            return parts[i + 1]
    return None
def check_not_meta(named_tensors) -> None:
    """Refuse a parameter or buffer on the ``meta`` device: offloaded, its values live elsewhere.

    :param named_tensors: ``(name, tensor)`` pairs (``net.named_parameters()``).
    """
    for name, tensor in named_tensors:
        if tensor.is_meta:
            raise ValueError(
                f"{name} is on the meta device: the network is offloaded (accelerate's cpu_offload or disk_offload, a "
                "device_map offloading to 'cpu' or 'disk') or was never loaded (init_empty_weights); pyro_lora reads "
                "the LoRA matrices, the head and the base weights' fingerprint itself, not through accelerate's hooks "
                "that bring offloaded weights in for each forward. Put the network on real devices without offloading "
                "(accelerate's dispatch_model(net, device_map={'': 'cpu'}) or onto GPUs works) and build the "
                "LoraModel over it")


_FINGERPRINT_RTOL = 1e-3  # a bf16 cast moves a 16-entry sum by ~3e-4, a 4096-entry one by ~2e-5


def describe(model) -> dict:
    """What a guide depends on in ``model``, as JSON-serialisable values.

    :returns: dict with ``model`` (class name), ``adapter``, ``sites`` (name -> ``[matrix, shape, layers]``),
        ``scaling`` (module path -> ``alpha / r``), ``base`` (name, architecture, weight fingerprint) and
        ``head`` (trained head parameter -> shape), ``adapter_parameters`` (the adapter's other LoRA parameters -> shape:
        biases, embedding LoRA), ``adapter_scaling`` (its LoRA modules outside ``scaling``, e.g. an embedding's -> their
        scaling) and ``prior`` (its std if a float, else its class name).
    """
    net, adapter = model.net, model.adapter
    check_not_meta(net.named_parameters())  # offloaded since the model was built: no weights to describe
    config = getattr(net, "config", None)
    return {
        "model": type(model).__name__,
        "adapter": adapter,
        "sites": {n: [s.matrix, list(s.shape), list(s.layers)] for n, s in model.sites.items()},
        "scaling": {p: float(layer.scaling[adapter]) for p, layer in model.layers.items()},
        "base": {
            "name": getattr(config, "_name_or_path", None) or None,
            "architecture": getattr(config, "model_type", None),
            "config": _config(config),
            "fingerprint": _fingerprint(net),
            "buffers": _buffer_fingerprint(net),
            "quantized": quantized_weights(net),  # left out of the fingerprint
        },
        "head": _head(net, adapter),
        "tokens": _tokens(net, adapter),
        # every parameter and scaling of the adapter, not only the sites' layers: a LoRA bias, an embedding LoRA the
        # guide's network lacked would run unrestored on load, at whatever value it holds
        "adapter_parameters": _adapter_parameters(net, adapter, model.layers),
        "adapter_scaling": _adapter_scaling(net, adapter, model.layers),
        # a float prior std, else the prior's class: a guide may read it (Bayesian-LoRA's inducing prior)
        "prior": float(model.prior) if isinstance(model.prior, (int, float)) else type(model.prior).__name__,
        "likelihood": _likelihood(model.likelihood),
    }


def _likelihood(likelihood):
    """The likelihood's class and the settings that say what each class logit is (multiple choice's answer tokens
    and format): a guide fitted on letters A-D scores other rows under other letters, or their order."""
    out = {"class": type(likelihood).__name__}
    for key in ("answer_token_ids", "format", "normalize"):
        value = getattr(likelihood, key, None)
        if value is not None:
            out[key] = [int(t) for t in value] if key == "answer_token_ids" else value
    return out


def _fingerprint(net):
    """Base parameter name -> :func:`_fingerprint_of` its weights (quantized ones left out).

    Every frozen base parameter counts (embeddings, norms, every layer), not the adapter's (LoRA matrices, head
    copies, token deltas) nor trainable ones (point parameters, compared apart); a change confined to entries
    between the strides can go unseen.
    """
    return {name: _fingerprint_of(p) for name, p in frozen_base_parameters(net)}


# rotary embeddings that recompute their frequencies from the run's length (transformers' dynamic_rope_update)
_RUNTIME_ROPE = frozenset(("dynamic", "longrope"))


def _rope_types(module) -> set:
    """A rotary embedding's rope types: one name, or one per layer type (ModernBERT's and Gemma 3's
    ``{"full_attention": "dynamic", ...}``, whose buffers are ``full_attention_inv_freq`` and kin)."""
    kind = getattr(module, "rope_type", None)
    return set(kind.values()) if isinstance(kind, dict) else {kind}


def _buffer_fingerprint(net):
    """Buffer name -> :func:`_fingerprint_of` it, for the buffers that shape the forward (rotary frequencies, position
    and token-type ids): an in-place edit (a position-interpolation patch of ``inv_freq``) changes the network's
    function as a weight's does. Frequencies a dynamic rotary embedding recomputes per run are left out."""
    return {name: _fingerprint_of(b) for name, b in _static_buffers(net)
            if (b.is_floating_point() or is_integer_tensor(b)) and b.numel() and not any(k in name for k in ADAPTER_NAMES)}


def _static_buffers(net) -> list:
    """``(name, buffer)`` of ``net``, less the frequencies a dynamic or longrope rotary embedding recomputes in each
    forward from its sequence length: what they hold is the last forward's, not part of the network's function."""
    runtime = {name for name, m in net.named_modules() if not _RUNTIME_ROPE.isdisjoint(_rope_types(m))}
    return [(name, b) for name, b in net.named_buffers() if name.rpartition(".")[0] not in runtime]


def frozen_base_parameters(net) -> list:
    """``(name, parameter)`` of ``net``'s frozen floating-point base weights: not the adapter's (LoRA matrices, head
    copies, token deltas), not trainable ones, not quantized ones."""
    # peft's frozen copy of a replaced head (".original_module.") never runs: a fresh head differs by seed
    return [(name, p) for name, p in net.named_parameters()
            if not (p.requires_grad or any(k in name for k in (*ADAPTER_NAMES, ".original_module.")) or is_quantized(p))]


def quantized_weights(net) -> list:
    """Names of ``net``'s quantized base weights (bitsandbytes' 4-bit and 8-bit codes:
    :func:`~pyro_lora.quantized.is_quantized`), which :func:`frozen_base_parameters` and so the fingerprint leave out."""
    return [name for name, p in net.named_parameters() if is_quantized(p) and not any(k in name for k in ADAPTER_NAMES)]


def quantization(net) -> str | None:
    """SHA-256 of how ``net``'s base is quantized (which weights, and bitsandbytes' settings: quant type, double
    quantization, block size, but not the compute dtype, a cast), ``None`` for an unquantized base: two bases of
    one checkpoint quantized alike hold the same codes and scales."""
    names = quantized_weights(net)
    if not names:
        return None
    config = getattr(net, "config", None)
    settings = (config.to_dict().get("quantization_config") if hasattr(config, "to_dict") else None) or {}
    settings = {k: v for k, v in settings.items() if "compute_dtype" not in k}
    return hashlib.sha256(json.dumps([names, settings], sort_keys=True, default=str).encode()).hexdigest()


DRAWN_AT_LOAD = "_pyro_lora_drawn_at_load"  # set on a parameter the checkpoint lacked (pretrained.load_pretrained)


def drawn_at_load(parameter) -> bool:
    """Whether :func:`~pyro_lora.pretrained.load_pretrained` drew ``parameter`` afresh because the checkpoint lacked it
    (a fresh head, an MLM checkpoint's pooler): its values follow the torch seed, not the checkpoint."""
    return getattr(parameter, DRAWN_AT_LOAD, False)


def digested_parameters(net) -> list:
    """``(name, parameter)`` of every weight :func:`weights_digest` reads."""
    return [(name, p) for name, p in net.named_parameters()
            if not (p.requires_grad or any(k in name for k in ADAPTER_NAMES) or drawn_at_load(p))]


def weights_digest(net, dtype=None) -> str:
    """SHA-256 of every frozen weight ``net``'s checkpoint gave, whole and exact: the base weights, a trained head's
    frozen original (``.original_module.``), quantized weights with their scales (bitsandbytes' ``quant_state``,
    ``SCB``); not the adapter's, and not the weights drawn at load (:func:`drawn_at_load`), which differ by seed.
    With ``dtype``, the floating-point weights as cast to it: the digest of the same checkpoint loaded in that dtype."""
    digest = hashlib.sha256()
    for name, p in digested_parameters(net):
        _digest_weight(digest, name, p, dtype, weight_scales(net, name))
    return digest.hexdigest()


def weight_scales(net, name: str):
    """The LLM.int8() row scales of the weight ``name`` of ``net`` (:func:`~pyro_lora.quantized.int8_scales`), or
    ``None``: a digest of the codes must read them wherever bitsandbytes keeps them."""
    module, _, attribute = name.rpartition(".")
    return int8_scales(net.get_submodule(module)) if attribute == "weight" else None


def weight_digest(name: str, p, dtype=None, scales=None) -> str:
    """SHA-256 of the one weight ``p`` named ``name``, read as :func:`weights_digest` reads it (cast to ``dtype``;
    ``scales``: its LLM.int8() row scales, :func:`weight_scales`)."""
    digest = hashlib.sha256()
    _digest_weight(digest, name, p, dtype, scales)
    return digest.hexdigest()


def _digest_weight(digest, name, p, dtype, scales):
    digest.update(name.encode())
    parts = [p.detach().to(dtype) if dtype is not None and not is_quantized(p) else p.detach()]
    state = getattr(p, "quant_state", None)  # NF4: the codes are the parameter, the block scales live here
    if state is not None:
        parts += [v for _, v in sorted(state.as_dict(packed=True).items()) if isinstance(v, torch.Tensor)]
    if scales is not None:  # LLM.int8(): the row scales
        parts.append(scales)
    for t in parts:
        digest.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def _strided_entries(p) -> torch.Tensor:
    """At most 4096 evenly strided entries of ``p``, float32, flat: what a fingerprint reads of a weight."""
    flat = p.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 4096)].float()


def _fingerprint_of(p) -> list:
    """``[sum |w|, sum w, position-weighted sum w]`` over :func:`_strided_entries`: a sign flipped or rows permuted
    leave the first as it is."""
    x = _strided_entries(p)
    return [float(x.abs().sum()), float(x.sum()), float((x * torch.linspace(0, 1, x.numel(), device=x.device)).sum())]


def _same_fingerprint(expected, actual) -> bool:
    """Each part within ``_FINGERPRINT_RTOL`` of ``sum |w|`` (which bounds a cast's change to each); an older
    guide's single number is ``sum |w|`` alone."""
    expected = expected if isinstance(expected, list) else [expected]
    scale = _FINGERPRINT_RTOL * max(abs(expected[0]), abs(actual[0])) + 1e-6
    return all(abs(e - a) <= scale for e, a in zip(expected, actual))


CONFIG_IGNORED = (  # names, dtypes, versions and run-time switches that leave the function unchanged
    "_name_or_path", "torch_dtype", "dtype", "transformers_version", "architectures", "id2label", "label2id", "use_cache",
    "return_dict", "output_attentions", "output_hidden_states", "torchscript", "problem_type", "_attn_implementation",
    "quantization_config",  # bitsandbytes' settings, compute dtype included: the quantized weights' own check reads them
)


def _config(config):
    """The model config's JSON values (numbers, strings, booleans and dicts or lists of them: transformers 5 keeps
    ``rope_theta`` in ``rope_parameters``), without names, dtypes and versions."""
    if config is None or not hasattr(config, "to_dict"):
        return {}

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        return isinstance(v, (bool, int, float, str, type(None)))

    return {k: json.loads(json.dumps(v)) for k, v in config.to_dict().items() if k not in CONFIG_IGNORED and plain(v)}


def _tokens(net, adapter):
    """Module path -> the token ids whose embedding rows the adapter trains (peft's ``trainable_token_indices``)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    return {path: [int(t) for t in m.token_indices[adapter]] for path, m in net.named_modules()
            if isinstance(m, TrainableTokensLayer) and adapter in m.token_indices}


def _adapter_parameters(net, adapter, layers) -> dict:
    """The LoRA parameters of ``adapter`` in ``net`` besides the site layers' A and B (which ``sites`` describes) and
    the head and token copies (``head``, ``tokens``): a LoRA bias, an embedding LoRA. Name (without peft's wrappers)
    -> shape."""
    described = {f"{path}.lora_{m}.{adapter}.weight" for path in layers for m in "AB"}
    return {unwrapped_name(name): list(p.shape) for name, p in net.named_parameters()
            if parameter_adapter(name) == adapter and ".lora_" in name and name not in described}


def _adapter_scaling(net, adapter, layers) -> dict:
    """Module path -> scaling of ``adapter``'s LoRA modules besides the site layers (``scaling``): an embedding's."""
    return {unwrapped_name(path): float(m.scaling[adapter]) for path, m in net.named_modules()
            if path not in layers and isinstance(getattr(m, "scaling", None), dict) and adapter in m.scaling}


def _head(net, adapter):
    """Shapes of the adapter's trained copies of whole modules (peft's ``modules_to_save``: a classification head)."""
    from peft.utils import ModulesToSaveWrapper

    return {
        f"{path}.{name}": list(p.shape)
        for path, m in net.named_modules()
        if isinstance(m, ModulesToSaveWrapper) and adapter in m.modules_to_save
        for name, p in m.modules_to_save[adapter].named_parameters()
    }


def _same_module(a: str, b: str) -> bool:
    """Whether module paths ``a`` and ``b`` name one module seen from a ``PeftModel``, its ``base_model`` (peft's
    tuner) or the transformers model inside (``base_model.model.x``, ``model.x``, ``x``)."""
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    return longer == shorter or (longer.endswith(shorter) and longer[: -len(shorter)] in ("base_model.model.", "base_model.", "model."))


def differences(expected: dict, actual: dict) -> list[str]:
    """Sentences naming each way ``actual`` (:func:`describe` of a model) differs from ``expected`` (the guide's)."""
    out = []
    if expected["model"] != actual["model"]:
        out.append(f"the guide was built for a {expected['model']}, the model is a {actual['model']}")
    if expected["adapter"] != actual["adapter"]:
        out.append(f"the guide is for adapter {expected['adapter']!r}, the model runs adapter {actual['adapter']!r}")
    built, runs = _compiled(expected), _compiled(actual)
    if built != runs:  # every path differs then: this is the one difference worth saying
        return out + [f"the guide was built on {'a' if built else 'no'} torch.compile wrapper of the network and the "
                      f"model runs {'one' if runs else 'none'}: torch.compile(net) wraps the network, so every module "
                      "path gains '_orig_mod.' and none matches the guide's; build the model as the guide's was, over "
                      "torch.compile(net) or over the network itself (a wrapper's net._orig_mod), or compile in place "
                      "with net.compile(), which keeps the paths"]
    out += _site_differences(expected["sites"], actual["sites"])
    out += _scaling_differences(expected["scaling"], actual["scaling"])
    out += _base_differences(expected["base"], actual["base"])
    if expected["head"] != actual["head"]:
        out.append(_head_difference(expected["head"], actual["head"]))
    if "tokens" in expected and expected["tokens"] != actual["tokens"]:  # older guides did not record them
        out.append(f"the adapter trains the embedding rows of tokens {_short(expected['tokens'])} for the guide and "
                   f"{_short(actual['tokens'])} in the model: each trained row would land on another token (build the "
                   "adapter with the guide's trainable_token_indices, in its order)")
    if "adapter_parameters" in expected and expected["adapter_parameters"] != actual["adapter_parameters"]:  # nor these
        e, a = expected["adapter_parameters"], actual["adapter_parameters"]
        extra, missing = sorted(set(a) - set(e)), sorted(set(e) - set(a))
        shaped = sorted(n for n in set(e) & set(a) if e[n] != a[n])
        parts = [f"{what} {_short(names)}" for what, names in (("the model's adapter also has", extra),
                 ("the guide's had", missing), ("shapes differ for", shaped)) if names]
        out.append(f"the adapter's parameters differ ({'; '.join(parts)}): another peft configuration (target_modules, "
                   "lora_bias, modules_to_save); build the adapter as the guide's")
    if "adapter_scaling" in expected and expected["adapter_scaling"] != actual["adapter_scaling"]:
        e, a = expected["adapter_scaling"], actual["adapter_scaling"]
        diff = {n: (e.get(n), a.get(n)) for n in sorted(set(e) | set(a)) if e.get(n) != a.get(n)}
        out.append(f"the LoRA scaling (alpha / r) differs for {_short(diff)} (guide's, model's): build the adapter with the "
                   "guide's lora_alpha / alpha_pattern")
    if "prior" in expected and expected["prior"] != actual["prior"]:  # older guides did not record it
        out.append(f"the guide was built under the prior {expected['prior']!r}, the model has {actual['prior']!r} "
                   f"(build the model with prior={expected['prior']!r})")
    if "likelihood" in expected and expected["likelihood"] != actual["likelihood"]:  # older guides did not record it
        out.append(f"the guide was fitted under the likelihood {expected['likelihood']}, the model has "
                   f"{actual['likelihood']}: its class logits would be other answers (build the model's likelihood as the guide's)")
    return out


def _compiled(description) -> bool:
    """Whether the model :func:`describe` d runs a ``torch.compile`` wrapper (an ``OptimizedModule``), whose module
    paths all start ``_orig_mod.``."""
    return any(path.startswith("_orig_mod.") for _, _, layers in description["sites"].values() for path in layers)


def _head_difference(expected, actual):
    """One sentence on how the trained heads differ: the number of classes where that is what changed."""
    outputs = {(expected[n][0], actual[n][0]) for n in expected
               if n in actual and n.endswith("weight") and expected[n][0] != actual[n][0]}
    if len(outputs) == 1 and expected.keys() == actual.keys():
        (g, m), = outputs
        return f"the head has {g} outputs (classes) in the guide and {m} in the model"
    return f"the trained head differs: the guide's {_short(expected)}, the model's {_short(actual)}"


# the modules peft puts around a base module: a layer any adapter targets ("k_proj.base_layer"), a module another
# adapter's modules_to_save replaces ("pooler.dense.original_module"), an embedding with trainable tokens
_WRAPPERS = re.compile(r"\.(base_layer|original_module|token_adapter)(?=\.)")


def unwrapped_name(name: str) -> str:
    """A base weight's name with peft's wrapping left out: the same weight, whichever adapters a network holds."""
    return _WRAPPERS.sub("", name)


def _base_differences(expected, actual):
    ef, af = expected["fingerprint"], actual["fingerprint"]
    if isinstance(ef, dict) and isinstance(af, dict):  # a second adapter's wrapping renames what it wraps
        ef, af = ({unwrapped_name(n): v for n, v in f.items()} for f in (ef, af))
    # the name is often a folder (a local checkpoint, the embedded models' install path): the same weights read from
    # another folder or machine are the same base
    # weights quantized on one side are fingerprinted on the other only: the rest must be the same and agree
    unfingerprinted = {unwrapped_name(n) for n in (*expected.get("quantized", ()), *actual.get("quantized", ()))}
    same_weights = (isinstance(ef, dict) and ef.keys() & af.keys() and set(ef) ^ set(af) <= unfingerprinted
                    and all(_same_fingerprint(ef[n], af[n]) for n in ef.keys() & af.keys()))
    if expected["architecture"] != actual["architecture"] or (expected["name"] != actual["name"] and not same_weights):
        return [
            f"the guide's base model is {expected['name']!r} ({expected['architecture']}), the model's is "
            f"{actual['name']!r} ({actual['architecture']})"
        ]
    out = []
    ec, ac = expected.get("config", {}), actual.get("config", {})
    changed = sorted(k for k in set(ec) & set(ac) if ec[k] != ac[k])
    if changed:
        out.append(f"the base model's config differs in {_short(changed)} (e.g. {changed[0]}: {ec[changed[0]]!r} vs {ac[changed[0]]!r})")
    if not isinstance(ef, dict):  # an older guide's single number: the first LoRA layer's base weight
        return out
    # parameters on one side only were switched to trainable (point parameters, compared apart) or belong to
    # another architecture (its config and sites differ)
    differ = [n for n in ef if n in af and not _same_fingerprint(ef[n], af[n])]
    if differ:
        out.append(
            "the base weights differ from the ones the guide was built on (another checkpoint of this architecture, or "
            f"another adapter merged into them or unmerged since: merge_adapter, unmerge_adapter): {_short(differ)}"
        )
    eb, ab = expected.get("buffers"), actual.get("buffers")  # an older guide's signature has none
    if isinstance(eb, dict) and isinstance(ab, dict):
        eb, ab = ({unwrapped_name(n): v for n, v in b.items()} for b in (eb, ab))
        moved = [n for n in eb if n in ab and not _same_fingerprint(eb[n], ab[n])]
        if moved:
            out.append(f"the base model's buffers differ from the ones the guide was built on (rotary frequencies or "
                       f"position ids edited in place?): {_short(moved)}")
    return out


def _site_differences(expected, actual):
    out = []
    missing, extra = sorted(set(actual) - set(expected)), sorted(set(expected) - set(actual))
    if extra:
        out.append(f"the guide has sites the model lacks: {_short(extra)} (was the model built with another random= or "
                   "group=, or on other target_modules?)")
    if missing:
        out.append(f"the model has sites the guide lacks: {_short(missing)} (was the guide built with another random= or "
                   "group=, or on other target_modules?)")
    if not (missing or extra) and list(expected) != list(actual):
        out.append(f"the model has the guide's sites in another order ({_short(list(actual))} against {_short(list(expected))}): a "
                   "guide's tensors are restored site by site in its own order, so matrices would be swapped")
    for name in sorted(set(expected) & set(actual)):
        (em, es, el), (am, as_, al) = expected[name], actual[name]
        if es != as_:
            out.append(f"site {name!r} has shape {tuple(es)} in the guide and {tuple(as_)} in the model (another LoRA rank or set of layers)")
        elif (em, el) != (am, al) and em == am and len(el) == len(al) and all(map(_same_module, el, al)):
            out.append(f"site {name!r} holds the same matrices, named from another module ({_short(el)} in the guide, "
                       f"{_short(al)} in the model): one model was built on the peft model, the other on a module "
                       "inside it (its base_model); build both on the same one")
        elif (em, el) != (am, al):
            out.append(f"site {name!r} holds other matrices in the guide ({em} of {_short(el)}) than in the model ({am} of {_short(al)})")
    return out


def _scaling_differences(expected, actual):
    bad = [(p, expected[p], actual[p]) for p in expected if p in actual and not math.isclose(expected[p], actual[p], rel_tol=1e-6)]
    if not bad:
        return []
    path, e, a = bad[0]
    more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    return [
        f"the LoRA scaling (lora_alpha / r, or / sqrt(r) with use_rslora) of {path} is {e:g} for the guide and {a:g} in "
        f"the model{more}: every delta would be {a / e:g}x the trained one; build the adapter with the guide's lora_alpha "
        "and use_rslora"
    ]


def _short(items, limit=4):
    items = list(items.items() if isinstance(items, dict) else items)
    return f"{items[:limit]}{' ...' if len(items) > limit else ''}"


def _unfrozen_and_changed(model, guide):
    """Base parameters frozen when the guide was built (in its fingerprint), trainable now (left out of the model's
    fingerprint) and neither trained by the guide nor pinned (not in its snapshot), whose values changed."""
    expected = guide.signature["base"]["fingerprint"]
    if not isinstance(expected, dict):  # an older guide's single number
        return []
    snapshot = guide._point_snapshot or {}
    return [n for n, p in model.net.named_parameters()
            if p.requires_grad and n in expected and n not in snapshot
            and not _same_fingerprint(expected[n], _fingerprint_of(p))]


def _differing_point_parameters(own, model, skip=()):
    """The names of ``own``'s point parameters (its head, non-random LoRA matrices: ``named_adapter_parameters``),
    but those in ``skip``, that ``model``'s network lacks or holds other values of (compared on its device, in its
    dtype): another LoraModel object run in place of ``own`` would run with another head."""
    theirs = dict(model.net.named_parameters())
    return [n for n, p in own.named_adapter_parameters() if n not in skip
            and (n not in theirs or not torch.equal(p.detach().to(theirs[n].device, theirs[n].dtype), theirs[n].detach()))]


def _point_problems(model, guide):
    own = guide.model
    snapshot = guide._point_snapshot  # None while fit trains it: the live state is its own
    carried = guide.carried_point_parameters()
    changed = [] if snapshot is None else [
        n for n in changed_point_parameters(snapshot, own) + _unfrozen_and_changed(model, guide) if n not in carried]
    if changed:
        return [
            f"the network's point parameters {_short(changed)} changed since this guide was built or trained (another "
            "guide trained them, e.g. fit with train_network=True, or they were re-initialised, written or cast to a "
            "lower precision): its LoRA "
            "would run with another head; fit other guides with train_network=False, or load_guide a copy of this "
            "guide saved before (that restores them)"
        ]
    if own is model:
        return []
    if carried and model.net is not own.net:
        return [
            f"this guide carries its own {sorted(carried)[0]} (per member), which it applies to the network it was built "
            "on; another network's head would run for every member instead: predict with guide.model"
        ]
    differ = _differing_point_parameters(own, model, skip=carried)
    if differ:
        return [
            f"the model's point parameters {_short(differ)} differ from those of the model the guide was built on "
            "(its trained head or non-random LoRA matrices): predict with guide.model, or load_guide the saved guide "
            "into this model"
        ]
    return []


def require_lora_guide(guide, action: str) -> None:
    """Refuse to ``action`` with what is no guide of the guides package: a Pyro autoguide, or a guide function of your
    own, has no model, record or ``sample(S)`` for pyro_lora to read.

    :raises ValueError: naming what it got and what to use instead.
    """
    if not hasattr(guide, "signature"):
        raise ValueError(
            f"cannot {action} with a {type(guide).__name__}: pyro_lora needs a guide of the guides package "
            "(pyro_lora.guides.LoraGuide); for a Pyro autoguide, or a guide function of your own, use pyro.infer.SVI "
            f"and pyro.infer.Predictive directly, and keep an autoguide's result with {pyro_params.AUTOGUIDE_SAVE}"
        )


class ModelContract:
    """The base class of :class:`~pyro_lora.LoraModel`, which :func:`check_model` recognises: defined here, under the
    model's module, which imports this one for its own checks."""


def check_model(model, action: str) -> None:
    """Refuse to ``action`` unless ``model`` is a :class:`~pyro_lora.LoraModel`.

    :raises TypeError: naming what was passed instead: ``torch.compile(model)`` (a LoraModel is no
        ``torch.nn.Module``, so torch.compile wraps it as a plain function), the peft network itself, or anything else.
    """
    if isinstance(model, ModelContract):
        return
    if hasattr(model, "_torchdynamo_orig_callable"):
        raise TypeError(f"cannot {action}: the model passed is a function torch.compile returned (torch.compile(model) "
                        "of a LoraModel, which is no torch.nn.Module, wraps it as a plain function); compile the network "
                        "instead, in place (net.compile()), and pass the LoraModel itself")
    if isinstance(model, torch.nn.Module):
        raise TypeError(f"cannot {action}: the model passed is a {type(model).__name__}, not a pyro_lora LoraModel; wrap "
                        "the peft network first: model = LoraModel(net, likelihood)")
    raise TypeError(f"cannot {action}: the model passed is a {type(model).__name__}, not a pyro_lora LoraModel")


def check_guide(model, guide, action: str, same_model: bool = False) -> None:
    """Refuse to ``action`` (e.g. ``"predict"``) with ``guide`` on ``model`` unless the guide fits the model.

    :param bool same_model: require ``model`` to be the very object the guide was built on (training: a
        guide's own terms, such as a flow's prior correction, read its model).

    :raises ValueError: naming every difference between the model the guide was built for and ``model``,
        or what changed in the network since (:meth:`~pyro_lora.LoraModel.check_network`), if ``guide``
        is no :class:`~pyro_lora.guides.LoraGuide` (a Pyro autoguide), or if Pyro's param store holds values restored
        over its or the network's parameters (:func:`~pyro_lora.pyro_params.check_store`).
    """
    check_model(model, action)
    require_lora_guide(guide, action)
    pyro_params.check_store([(guide._pyro_name, guide.named_parameters()),
                             (model._pyro_name, model.named_point_parameters())], action)
    model.check_network()
    problems = differences(guide.signature, describe(model)) or _point_problems(model, guide)
    if problems:
        raise ValueError(f"cannot {action} with this {type(guide).__name__} on this model: " + "; ".join(problems))
    if same_model and guide.model is not model:
        raise ValueError(
            f"cannot {action} with this {type(guide).__name__} on another model object than the one it was built on "
            "(its own terms read that model): pass guide.model, or build the guide on this model"
        )


def check_autoguide(model, autoguide, action: str) -> None:
    """Refuse to ``action`` with a Pyro autoguide over ``model`` where Pyro's param store holds values restored over the
    network's parameters (:func:`~pyro_lora.pyro_params.check_store`), the network changed
    (:meth:`~pyro_lora.LoraModel.check_network`), or its point parameters (the head) changed since ``SVI`` trained the
    autoguide, or ``load_guide`` restored it (followed as a guide of the guides package:
    :func:`~pyro_lora.ownership.follow_autoguide`): its sites' posterior was fitted beside the head as it was.

    :raises ValueError: naming the changed parameters, and how to keep an autoguide's result.
    """
    pyro_params.check_store([(model._pyro_name, model.named_point_parameters())], action)
    model.check_network()
    owner = followed(autoguide)
    changed = [] if owner is None or owner.model is not model else changed_point_parameters(owner._point_snapshot, model)
    if changed:
        raise ValueError(
            f"cannot {action} with this {type(autoguide).__name__}: the network's point parameters {_short(changed)} "
            "changed since pyro.infer.SVI trained it or load_guide restored it (another guide trained them, e.g. fit with "
            "train_network=True, or they were re-initialised, written or cast to a lower precision): its sites would run "
            f"with another head; keep an autoguide's result before the network is trained again, with {pyro_params.AUTOGUIDE_SAVE}")


def check_autoguide_model(model, autoguide, action: str, training: bool) -> None:
    """Refuse to ``action`` with a Pyro autoguide built over another LoraModel object than ``model``, the one it runs
    with (``SVI(model, autoguide)``, ``Predictive(model, guide=autoguide)``, an ELBO's loss, ``Importance``), as
    :func:`check_guide` refuses a guide of the guides package: ``save_guide`` records the autoguide's own model
    (``autoguide.model``) as the one its sites were fitted on and with. Training (``training``) needs that very object
    (SVI would fit the sites and the head on this model); a run without training (predicting, a validation loss)
    takes another object over the same network and sites (the same signature, :func:`describe`) whose point
    parameters (the head) hold the same values, as ``predict`` does a guide of the guides package.

    :raises ValueError: naming what differs, and to build the autoguide over this model or ``load_guide`` a saved one
        into an autoguide over it.
    """
    own = unwrap(autoguide.model)
    name = type(autoguide).__name__
    todo = (f"build the autoguide over this model ({name}(model)), or save_guide it and load_guide it into one "
            "built over this model")
    if training:
        raise ValueError(
            f"cannot {action} with this {name}: it was built over another LoraModel object than the model it runs "
            f"with, and training would fit its sites on this model while save_guide records that one as theirs; {todo}")
    problems = differences(describe(own), describe(model))
    if not problems:
        differ = _differing_point_parameters(own, model)
        if differ:
            problems = [f"the model's point parameters {_short(differ)} differ from those of the model it was built "
                        "over (its trained head or non-random LoRA matrices)"]
    if problems:
        raise ValueError(f"cannot {action} with this {name}: it was built over another LoraModel object, which "
                         f"differs from the model it runs with: {'; '.join(problems)}; run it with autoguide.model, or "
                         f"{todo}")


def tempered_training(guide, action: str) -> str | None:
    """Why ``guide`` cannot be trained (``action``, e.g. ``"fit"``) at its posterior temperature, or ``None`` at
    ``T = 1`` (or a guide without one): its ``q`` is the trained stds times ``sqrt(T)``, so an ELBO would move them
    back to the untempered optimum and the temperature would be gone while the guide still reports it."""
    temperature = getattr(guide, "temperature", 1.0)
    if temperature == 1.0:
        return None
    return (f"cannot {action} a {type(guide).__name__} at posterior temperature {temperature:g}: its q is the trained "
            "posterior with every deviation times sqrt(T), so training would undo the temperature while the guide "
            "still reports it; set_temperature(1.0) to train, and set (or tune on validation data) the temperature "
            "after training")


@contextlib.contextmanager
def entry_checks(model, guide, action: str, handed: bool | None = None, settings: dict | None = None):
    """The checks at the entry of a collective ``action``, run in the ``with`` block: ``settings`` (the call's, by
    name) and the model's that a predictive or a curvature reads (:meth:`~pyro_lora.LoraModel.settings`: its class,
    adapter, sites and likelihood; with a likelihood per rank each rank scores its block by its own, and the gathered
    result blends them; the prior and ``num_data``, which only a loss reads, are ``fit``'s) compared across ranks
    first (:func:`~pyro_lora.distributed.check_settings`), then a ``ValueError`` on any rank is raised on every
    rank (:func:`~pyro_lora.distributed.refused_together`; one rank refusing alone would leave the others waiting),
    then :func:`check_ranks_agree` on ``model``, ``guide`` (``None``: the network alone) and ``handed``."""
    check_model(model, action)  # before the collective, which reads it: the same refusal on every rank
    with distributed.refused_together(action):
        if distributed.is_distributed():
            model_settings = {f"model's {k}": v for k, v in model.settings().items()
                              if k in ("class", "adapter", "sites") or k.startswith("likelihood")}
            distributed.check_settings(action, {**(settings or {}), **model_settings})
        yield
    check_ranks_agree(model, guide, action, handed)


def check_ranks_agree(model, guide, action: str, handed: bool | None = None, broadcast=()) -> None:
    """Under ``torch.distributed``, refuse to ``action`` unless every rank holds the same network and ``guide`` state
    where ``action`` reads them: each rank computes its block of the data, so ranks holding other values would mix
    two networks' results. Compared: every parameter and buffer of the network, its frozen base too (a weight the
    checkpoint lacked is drawn at load from each rank's seed), less the frequencies a dynamic rotary embedding
    recomputes in each forward (each rank's hold its last batch's length), the peft LoRA weights the sites replace where
    their values are ``handed`` to the layers (by a guide, or a Laplace fit's ``loc``; default: with a ``guide``), less
    another adapter's and a trained head's frozen original (neither runs with the adapter on) and ``broadcast`` (what ``action`` sets to rank 0's first: ``fit``'s trained
    parameters); and the guide's floating-point state.

    Cost: one pass over the weights (three integer sums of each tensor's bits, :func:`~pyro_lora.ownership.value_sums`) and
    two all-reduces, of 6 numbers per tensor at most; no weight crosses the ranks. A collective: every rank calls it.

    :raises ValueError: naming the tensors that differ, and what to do for the first of them.
    """
    if not distributed.is_distributed():
        return
    skipped = {id(t) for t in broadcast}
    if guide is not None if handed is None else handed:
        skipped |= {id(p) for p in model.random_parameters()}
    enabled = not any(layer.disable_adapters for layer in model.layers.values())  # else a head's original runs
    named = [(n, t) for n, t in (*model.net.named_parameters(), *_static_buffers(model.net))
             if id(t) not in skipped and parameter_adapter(n) in (None, model.adapter)
             and not (enabled and ".original_module." in n)]
    if guide is not None:
        named += [(f"guide.{n}", t) for n, t in guide.state_dict().items() if t.is_floating_point()]
    fewest, most = (int(v) for v in distributed.spread(torch.tensor(len(named))))
    if fewest != most:
        raise ValueError(f"cannot {action}: the ranks hold {fewest} to {most} network and guide tensors; every rank "
                         "must build the same model and guide")
    sums = value_sums(t for _, t in named)
    low, high = distributed.spread(torch.tensor([sums[id(t)] for _, t in named], dtype=torch.int64).reshape(-1, 3))
    differ = [(n, t) for (n, t), lo, hi in zip(named, low, high) if not torch.equal(lo, hi)]
    if not differ:
        return
    name, tensor = differ[0]
    if name.startswith("guide."):
        advice = ("every rank must hold the same guide (after rank 0 writes a file the others load, wait for it: "
                  "save_guide returns on every rank once it is written)")
    elif parameter_adapter(name) is None and not tensor.requires_grad:
        drawn = " (drawn at load: the checkpoint lacks it, so each rank drew it from its own seed)" if drawn_at_load(tensor) else ""
        advice = (f"{name} is a frozen tensor of the base network{drawn}, so each rank would run another network; seed "
                  "every rank alike before loading (torch.manual_seed(seed) or set_seed(seed), not seed + rank), or load "
                  "from a checkpoint that holds the weight")
    else:
        advice = ("every rank must hold the same adapter: seed every rank alike before add_lora or get_peft_model (peft "
                  "draws lora_A from it), and write an adapter on every rank, as save_guide(adapter=True) and "
                  "export_adapter do (after rank 0 writes a file the others load, wait for it: they return on every "
                  "rank once it is written)")
    raise ValueError(f"cannot {action}: the ranks hold different values of {_short([n for n, _ in differ])}: {advice}")
