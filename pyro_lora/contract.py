"""The contract between a guide and a model: a guide runs only on a model like the one it was built for.

A guide's posterior is over the LoRA matrices of one network: their names, shapes and kinds, the LoRA
scaling ``alpha / r`` that turns them into weight deltas, the adapter, the base weights they adapt and the
trained head beside them. :func:`describe` writes that down; :func:`check_guide` compares it at every
boundary (``fit``, ``predict``, ``load_guide``, ``export_adapter``) and names each difference.

The network's point parameters (a trained head, non-random LoRA matrices) are shared by every guide over
the network, and each guide's predictions rely on their values as it left them: the guide that trains
them last owns them (:func:`take_over`), and any other guide is refused once they changed under it.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

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
_FINGERPRINT_RTOL = 1e-3  # a bf16 cast moves a 16-entry sum by ~3e-4, a 4096-entry one by ~2e-5


def describe(model) -> dict:
    """What a guide depends on in ``model``, as JSON-serialisable values.

    :returns: dict with ``model`` (class name), ``adapter``, ``sites`` (name -> ``[matrix, shape, layers]``),
        ``scaling`` (module path -> ``alpha / r``), ``base`` (name, architecture, weight fingerprint) and
        ``head`` (trained head parameter -> shape) and ``prior`` (its std if a float, else its class name).
    """
    net, adapter = model.net, model.adapter
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
        },
        "head": _head(net, adapter),
        "tokens": _tokens(net, adapter),
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
    return {name: _fingerprint_of(p) for name, p in net.named_parameters()
            # peft's frozen copy of a replaced head (".original_module.") never runs: a fresh head differs by seed
            if not (p.requires_grad or any(k in name for k in (*ADAPTER_NAMES, ".original_module.")) or not p.is_floating_point())}


def _fingerprint_of(p) -> list:
    """``[sum |w|, sum w, position-weighted sum w]`` over at most 4096 evenly strided entries: a sign flipped or rows
    permuted leave the first as it is."""
    flat = p.detach().reshape(-1)
    x = flat[:: max(1, flat.numel() // 4096)].float()
    return [float(x.abs().sum()), float(x.sum()), float((x * torch.linspace(0, 1, x.numel(), device=x.device)).sum())]


def _same_fingerprint(expected, actual) -> bool:
    """Each part within ``_FINGERPRINT_RTOL`` of ``sum |w|`` (which bounds a cast's change to each); an older
    guide's single number is ``sum |w|`` alone."""
    expected = expected if isinstance(expected, list) else [expected]
    scale = _FINGERPRINT_RTOL * max(abs(expected[0]), abs(actual[0])) + 1e-6
    return all(abs(e - a) <= scale for e, a in zip(expected, actual))


_CONFIG_IGNORED = (  # names, dtypes, versions and run-time switches that leave the function unchanged
    "_name_or_path", "torch_dtype", "dtype", "transformers_version", "architectures", "id2label", "label2id", "use_cache",
    "return_dict", "output_attentions", "output_hidden_states", "torchscript", "problem_type", "_attn_implementation",
)


def _config(config):
    """The model config's plain values (numbers, strings, booleans), without names, dtypes and versions."""
    if config is None or not hasattr(config, "to_dict"):
        return {}
    plain = (bool, int, float, str, type(None))
    return {k: v for k, v in config.to_dict().items() if k not in _CONFIG_IGNORED and isinstance(v, plain)}


def _tokens(net, adapter):
    """Module path -> the token ids whose embedding rows the adapter trains (peft's ``trainable_token_indices``)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    return {path: [int(t) for t in m.token_indices[adapter]] for path, m in net.named_modules()
            if isinstance(m, TrainableTokensLayer) and adapter in m.token_indices}


def _head(net, adapter):
    """Shapes of the adapter's trained copies of whole modules (peft's ``modules_to_save``: a classification head)."""
    from peft.utils import ModulesToSaveWrapper

    return {
        f"{path}.{name}": list(p.shape)
        for path, m in net.named_modules()
        if isinstance(m, ModulesToSaveWrapper) and adapter in m.modules_to_save
        for name, p in m.modules_to_save[adapter].named_parameters()
    }


def differences(expected: dict, actual: dict) -> list[str]:
    """Sentences naming each way ``actual`` (:func:`describe` of a model) differs from ``expected`` (the guide's)."""
    out = []
    if expected["model"] != actual["model"]:
        out.append(f"the guide was built for a {expected['model']}, the model is a {actual['model']}")
    if expected["adapter"] != actual["adapter"]:
        out.append(f"the guide is for adapter {expected['adapter']!r}, the model runs adapter {actual['adapter']!r}")
    out += _site_differences(expected["sites"], actual["sites"])
    out += _scaling_differences(expected["scaling"], actual["scaling"])
    out += _base_differences(expected["base"], actual["base"])
    if expected["head"] != actual["head"]:
        out.append(_head_difference(expected["head"], actual["head"]))
    if "tokens" in expected and expected["tokens"] != actual["tokens"]:  # older guides did not record them
        out.append(f"the adapter trains the embedding rows of tokens {_short(expected['tokens'])} for the guide and "
                   f"{_short(actual['tokens'])} in the model: each trained row would land on another token (build the "
                   "adapter with the guide's trainable_token_indices, in its order)")
    if "prior" in expected and expected["prior"] != actual["prior"]:  # older guides did not record it
        out.append(f"the guide was built under the prior {expected['prior']!r}, the model has {actual['prior']!r} "
                   f"(build the model with prior={expected['prior']!r})")
    if "likelihood" in expected and expected["likelihood"] != actual["likelihood"]:  # older guides did not record it
        out.append(f"the guide was fitted under the likelihood {expected['likelihood']}, the model has "
                   f"{actual['likelihood']}: its class logits would be other answers (build the model's likelihood as the guide's)")
    return out


def _head_difference(expected, actual):
    """One sentence on how the trained heads differ: the number of classes where that is what changed."""
    outputs = {(expected[n][0], actual[n][0]) for n in expected
               if n in actual and n.endswith("weight") and expected[n][0] != actual[n][0]}
    if len(outputs) == 1 and expected.keys() == actual.keys():
        (g, m), = outputs
        return f"the head has {g} outputs (classes) in the guide and {m} in the model"
    return f"the trained head differs: the guide's {_short(expected)}, the model's {_short(actual)}"


def _base_differences(expected, actual):
    ef, af = expected["fingerprint"], actual["fingerprint"]
    # the name is often a folder (a local checkpoint, the embedded models' install path): the same weights read from
    # another folder or machine are the same base
    same_weights = isinstance(ef, dict) and ef.keys() == af.keys() and all(_same_fingerprint(ef[n], af[n]) for n in ef)
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
            f"the base weights differ from the ones the guide was built on (another checkpoint of this architecture): {_short(differ)}"
        )
    return out


def _site_differences(expected, actual):
    out = []
    missing, extra = sorted(set(actual) - set(expected)), sorted(set(expected) - set(actual))
    if extra:
        out.append(f"the guide has sites the model lacks: {_short(extra)} (was the model built with another random=?)")
    if missing:
        out.append(f"the model has sites the guide lacks: {_short(missing)} (was the guide built with another random=?)")
    for name in sorted(set(expected) & set(actual)):
        (em, es, el), (am, as_, al) = expected[name], actual[name]
        if es != as_:
            out.append(f"site {name!r} has shape {tuple(es)} in the guide and {tuple(as_)} in the model (another LoRA rank or set of layers)")
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
        f"the LoRA scaling (lora_alpha / r) of {path} is {e:g} for the guide and {a:g} in the model{more}: every delta "
        f"would be {a / e:g}x the trained one; build the adapter with the guide's lora_alpha"
    ]


def _short(items, limit=4):
    items = list(items.items() if isinstance(items, dict) else items)
    return f"{items[:limit]}{' ...' if len(items) > limit else ''}"


def point_snapshot(model, values: dict | None = None) -> dict:
    """Name -> (float64 sum, sum of squares, position-weighted sum) of the network's point parameters (a trained
    head, non-random LoRA matrices): what a guide's predictions rely on besides its own sites. ``values`` (name ->
    tensor) stand in for the network's own (an ensemble member's head). An entry a step of Pyro's SVI adopted is
    left on its device as a ``[3]`` tensor (no host read in the step) until compared (:func:`_settle`)."""
    named = [(n, (values or {}).get(n, p)) for n, p in model.named_adapter_parameters()]
    sums = _sums(p for _, p in named)
    return {n: sums[id(p)] for n, p in named}


def _sums(params, lazy=False) -> dict:
    """``id(p)`` -> (float64 sum, sum of squares, position-weighted sum) of each of ``params``: one host read per
    device, not three per parameter (each read waits for the GPU); ``lazy``: none, each a ``[3]`` tensor on its
    device. The weighted sum tells a permutation (a head's rows swapped, as another label order) from the same values."""
    by_device, f64 = {}, torch.float64
    for p in params:
        by_device.setdefault(p.device, []).append(p)
    out = {}
    for group in by_device.values():
        # float64 accumulators over float32 values (no float64 copy: an SVI step reads its head so)
        rows = torch.stack([torch.stack((x.sum(dtype=f64), x.square().sum(dtype=f64),
                                         (x * torch.arange(x.numel(), **_like(x))).sum(dtype=f64)))
                            for x in (_flat(p) for p in group)])
        out.update({id(p): row if lazy else tuple(row) for p, row in zip(group, rows if lazy else rows.tolist())})
    return out


def _settle(snapshot) -> None:
    """Read the lazy entries of ``snapshot`` (:func:`point_snapshot`) to the host, in place: one read per device."""
    by_device = {}
    for n, v in snapshot.items():
        if torch.is_tensor(v):
            by_device.setdefault(v.device, []).append(n)
    for names in by_device.values():
        snapshot.update(zip(names, map(tuple, torch.stack([snapshot[n] for n in names]).tolist())))


def _flat(p):
    """``p`` as a float32 vector, whatever its dtype: a lossless cast (to float64) leaves its sums as they were, and
    a half-precision square would overflow at 256 (no copy for float32)."""
    return p.detach().reshape(-1).float()


def _like(x):
    return {"dtype": x.dtype, "device": x.device}


def _changed_point_parameters(snapshot, model):
    """Point parameters changed since ``snapshot`` (a restore to the same values is no change). Every one is read,
    not only those whose version counter moved: an optimiser that assigns ``p.data`` (ivon-opt's IVON) leaves it."""
    _settle(snapshot)
    named = [(n, p) for n, p in model.net.named_parameters() if n in snapshot]  # also one frozen since
    sums = _sums(p for _, p in named)
    return [n for n, p in named if sums[id(p)] != snapshot[n]]


_TRAINER = "_pyro_lora_trainer"  # on the network, which every LoraModel over it shares
# id(parameter) -> (its weakref, the guide's, its name, traced): the next optimiser step on it is that guide's
_STEPPING = {}
_OWN = {}  # id(guide parameter) -> (its weakref, the guide's): a step on it is a step of that guide's loop
_backward = weakref.WeakSet()  # guides whose parameters got a gradient since their last call: a step may follow
_own_stepped = weakref.WeakSet()  # guides a parameter of which was stepped since their last call
_hooked = weakref.WeakSet()  # guides whose parameters report their gradients (_backward) and steps (_OWN)
_hooks = []
_in_step = {}  # id(optimiser) -> ids of its parameters, while its step runs: a wrapper's (Lookahead) ends after its inner one's


def follow_svi_step(guide) -> None:
    """``guide`` is called in a step of Pyro's ``SVI`` (or of a loop differentiating its ELBO): the next optimiser
    step on each of the network's point parameters ends that step (Pyro's optimisers step each parameter once), and
    the values it leaves are the guide's own. Pyro does not signal a loop's end: any other change to them afterwards
    (a re-initialisation, a value written, a plain torch loop) is a change under the guide, and so is a step after a
    call with no backward pass into the guide (a validation ELBO, a trace), or after a loop that stepped the guide but
    not that parameter. A guide call traced by ``JitTrace_ELBO`` is not called again (its compiled steps are): every
    later step is taken as its own."""
    if not _hooks:
        _hooks.extend((register_optimizer_step_pre_hook(_before_optimizer_step),
                       register_optimizer_step_post_hook(_after_optimizer_step)))
    _in_step.clear()  # no optimiser step is under way while the guide runs (one that raised never ended)
    me, traced = weakref.ref(guide), torch.jit.is_tracing()
    trained = [p for p in guide.parameters() if p.requires_grad]
    if trained and guide not in _hooked:
        _hooked.add(guide)
        for key in [k for k, (ref, owner) in _OWN.items() if ref() is None or owner() is None]:
            del _OWN[key]  # parameters of guides gone
        for p in trained:
            p.register_post_accumulate_grad_hook(lambda _, me=me: _backward.add(me()) if me() is not None else None)
            _OWN[id(p)] = (weakref.ref(p), me)
    _backward.discard(guide)
    if guide not in _hooked:  # built with no trainable parameter: no gradient of its own to wait for
        _backward.add(guide)
    idle = guide in _own_stepped  # since the last call its loop stepped its own parameters: a step round ended
    _own_stepped.discard(guide)
    for n, p in guide.model.named_adapter_parameters():
        if not p.requires_grad:  # a frozen one is never stepped: it would stay listed
            continue
        ref, owner, _, _ = _STEPPING.get(id(p), (None, None, None, False))
        if idle and ref is not None and ref() is p and owner() is guide:
            del _STEPPING[id(p)]  # the round stepped the guide but not this one: a later step of it is not the loop's
        else:
            _STEPPING[id(p)] = (weakref.ref(p), me, n, traced)


def stop_following(model) -> None:
    """Forget the steps any guide expects on ``model``'s point parameters (another guide trains them, or one is pinned)."""
    for _, p in model.named_adapter_parameters():
        _STEPPING.pop(id(p), None)


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    if _STEPPING:  # nothing to follow (fit's own steps, a plain torch loop): no work on the step
        _in_step[id(optimizer)] = {id(p) for group in optimizer.param_groups for p in group["params"]}


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    _in_step.pop(id(optimizer), None)
    if not _STEPPING:  # then no guide has a step to tell apart at its next call either (follow_svi_step's idle)
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if any(id(p) in others for others in _in_step.values()):
                continue  # an inner optimiser's step: the wrapper's, still running, ends the step
            own = _OWN.get(id(p))
            if own is not None and own[0]() is p and own[1]() is not None:
                _own_stepped.add(own[1]())
            ref, guide, name, traced = _STEPPING.get(id(p), (None, None, None, False))
            if ref is None:
                continue
            if not traced or ref() is not p:
                del _STEPPING[id(p)]
            guide = guide() if ref() is p else None
            if guide is not None and guide._point_snapshot is not None and (traced or guide in _backward):
                guide._point_snapshot[name] = _sums([p], lazy=True)[id(p)]


def trainer(model):
    """The guide that last trained the point parameters of ``model``'s adapter in its network (``None`` if none is
    alive); per adapter, as each adapter has its own LoRA matrices and head copy."""
    ref = getattr(model.net, _TRAINER, {}).get(model.adapter)
    return ref() if ref is not None else None


def head_trainer(model):
    """The guide whose training left the network's point parameters as they are now, if it is alive (``None``
    once anything else changed them, e.g. a re-initialisation)."""
    owner = trainer(model)
    if owner is None or not owner.model.named_point_parameters():  # it trained no point parameter of the network
        return None
    snapshot = owner._point_snapshot  # None while fit trains it: the head as it is now is its own
    if snapshot is not None and _changed_point_parameters(snapshot, owner.model):
        return None
    return owner


def take_over(model, guide) -> None:
    """``guide`` (or ``None``: nobody, e.g. while a saved guide is rebuilt) starts setting the point parameters of
    ``model``'s network; the guide that set them before keeps, as the state its predictions need, what it leaves."""
    previous = trainer(model)
    if previous is guide:
        return
    stop_following(model)  # another guide's SVI step must not be taken as the new trainer's
    if previous is not None:
        previous._point_snapshot = point_snapshot(previous.model)
    if not isinstance(getattr(model.net, _TRAINER, None), dict):
        setattr(model.net, _TRAINER, {})
    trainers = getattr(model.net, _TRAINER)
    # another adapter's guide still live (fit) keeps what it leaves too: a base parameter the user unfroze
    # is shared by every adapter
    for other in (ref() for a, ref in trainers.items() if a != model.adapter and ref is not None):
        if other is not None and other is not guide and other._point_snapshot is None:
            other._point_snapshot = point_snapshot(other.model)
    trainers[model.adapter] = None if guide is None else weakref.ref(guide)


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


def _point_problems(model, guide):
    own = guide.model
    snapshot = guide._point_snapshot  # None while fit trains it: the live state is its own
    carried = guide.carried_point_parameters()
    changed = [] if snapshot is None else [
        n for n in _changed_point_parameters(snapshot, own) + _unfrozen_and_changed(model, guide) if n not in carried]
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
    theirs = dict(model.net.named_parameters())
    differ = [
        n for n, p in own.named_adapter_parameters() if n not in carried
        and (n not in theirs or not torch.equal(p.detach().to(theirs[n].device, theirs[n].dtype), theirs[n].detach()))
    ]
    if differ:
        return [
            f"the model's point parameters {_short(differ)} differ from those of the model the guide was built on "
            "(its trained head or non-random LoRA matrices): predict with guide.model, or load_guide the saved guide "
            "into this model"
        ]
    return []


def check_guide(model, guide, action: str, same_model: bool = False) -> None:
    """Refuse to ``action`` (e.g. ``"predict"``) with ``guide`` on ``model`` unless the guide fits the model.

    :param bool same_model: require ``model`` to be the very object the guide was built on (training: a
        guide's own terms, such as a flow's prior correction, read its model).

    :raises ValueError: naming every difference between the model the guide was built for and ``model``,
        or what changed in the network since (:meth:`~pyro_lora.LoraModel.check_network`), or if ``guide``
        is no :class:`~pyro_lora.guides.LoraGuide` (a Pyro autoguide).
    """
    if not hasattr(guide, "signature"):
        raise ValueError(
            f"cannot {action} with a {type(guide).__name__}: pyro_lora needs a guide of the guides package "
            "(pyro_lora.guides.LoraGuide); for a Pyro autoguide use pyro.infer.SVI and pyro.infer.Predictive directly"
        )
    if same_model and guide.model is not model:
        raise ValueError(
            f"cannot {action} with this {type(guide).__name__} on another model object than the one it was built on "
            "(its own terms read that model): pass guide.model, or build the guide on this model"
        )
    model.check_network()
    problems = differences(guide.signature, describe(model)) or _point_problems(model, guide)
    if problems:
        raise ValueError(f"cannot {action} with this {type(guide).__name__} on this model: " + "; ".join(problems))
