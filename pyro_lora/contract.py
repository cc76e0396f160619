"""The contract between a guide and a model: a guide runs only on a model like the one it was built for.

A guide's posterior is over the LoRA matrices of one network: their names, shapes and kinds, the LoRA
scaling ``alpha / r`` that turns them into weight deltas, the adapter, the base weights they adapt and the
trained head beside them. :func:`describe` writes that down; :func:`check_guide` compares it at every
boundary (``fit``, ``predict``, ``load_guide``, ``export_adapter``) and names each difference.
"""

import math

_FINGERPRINT_RTOL = 1e-4  # dtype casts of the base move it by ~1e-6; another checkpoint by far more


def describe(model):
    """What a guide depends on in ``model``, as JSON-serialisable values.

    :returns: dict with ``model`` (class name), ``adapter``, ``sites`` (name -> ``[matrix, shape, layers]``),
        ``scaling`` (module path -> ``alpha / r``), ``base`` (name, architecture, weight fingerprint) and
        ``head`` (trained head parameter -> shape).
    """
    net, adapter = model.net, model.adapter
    config = getattr(net, "config", None)
    first = next(iter(model.layers.values()))
    return {
        "model": type(model).__name__,
        "adapter": adapter,
        "sites": {n: [s.matrix, list(s.shape), list(s.layers)] for n, s in model.sites.items()},
        "scaling": {p: float(layer.scaling[adapter]) for p, layer in model.layers.items()},
        "base": {
            "name": getattr(config, "_name_or_path", None) or None,
            "architecture": getattr(config, "model_type", None),
            "fingerprint": _fingerprint(first.get_base_layer().weight),
        },
        "head": _head(net, adapter),
    }


def _fingerprint(weight):
    """Sum of ``|w|`` over at most 65536 evenly strided entries of a float base weight (``None`` if quantized)."""
    if not weight.is_floating_point():
        return None
    flat = weight.detach().reshape(-1)
    return float(flat[:: max(1, flat.numel() // 65536)].float().abs().sum())


def _head(net, adapter):
    """Shapes of the adapter's trained copies of whole modules (peft's ``modules_to_save``: a classification head)."""
    from peft.utils import ModulesToSaveWrapper

    return {
        f"{path}.{name}": list(p.shape)
        for path, m in net.named_modules()
        if isinstance(m, ModulesToSaveWrapper) and adapter in m.modules_to_save
        for name, p in m.modules_to_save[adapter].named_parameters()
    }


def differences(expected, actual):
    """Sentences naming each way ``actual`` (:func:`describe` of a model) differs from ``expected`` (the guide's)."""
    out = []
    if expected["model"] != actual["model"]:
        out.append(f"the guide was built for a {expected['model']}, the model is a {actual['model']}")
    if expected["adapter"] != actual["adapter"]:
        out.append(f"the guide is for adapter {expected['adapter']!r}, the model runs adapter {actual['adapter']!r}")
    out += _site_differences(expected["sites"], actual["sites"])
    out += _scaling_differences(expected["scaling"], actual["scaling"])
    eb, ab = expected["base"], actual["base"]
    if (eb["name"], eb["architecture"]) != (ab["name"], ab["architecture"]):
        out.append(f"the guide's base model is {eb['name']!r} ({eb['architecture']}), the model's is {ab['name']!r} ({ab['architecture']})")
    elif None not in (eb["fingerprint"], ab["fingerprint"]) and not math.isclose(
        eb["fingerprint"], ab["fingerprint"], rel_tol=_FINGERPRINT_RTOL
    ):
        out.append("the base weights differ from the ones the guide was built on (another checkpoint of the same architecture)")
    if expected["head"] != actual["head"]:
        out.append(f"the trained head differs: the guide's {_short(expected['head'])}, the model's {_short(actual['head'])}")
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


def check_guide(model, guide, action, same_model=False):
    """Refuse to ``action`` (e.g. ``"predict"``) with ``guide`` on ``model`` unless the guide fits the model.

    :param bool same_model: require ``model`` to be the very object the guide was built on (training: a
        guide's own terms, such as a flow's prior correction, read its model).

    :raises ValueError: naming every difference between the model the guide was built for and ``model``,
        or what changed in the network since (:meth:`~pyro_lora.LoraModel.check_network`), or if ``guide``
        is no :class:`~guides.LoraGuide` (a Pyro autoguide).
    """
    if not hasattr(guide, "signature"):
        raise ValueError(
            f"cannot {action} with a {type(guide).__name__}: pyro_lora needs a guide of the guides package "
            "(guides.LoraGuide); for a Pyro autoguide use pyro.infer.SVI and pyro.infer.Predictive directly"
        )
    if same_model and guide.model is not model:
        raise ValueError(
            f"cannot {action} with this {type(guide).__name__} on another model object than the one it was built on "
            "(its own terms read that model): pass guide.model, or build the guide on this model"
        )
    model.check_network()
    problems = differences(guide.signature, describe(model))
    if problems:
        raise ValueError(f"cannot {action} with this {type(guide).__name__} on this model: " + "; ".join(problems))
