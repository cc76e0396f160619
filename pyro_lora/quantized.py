"""Quantised bases (bitsandbytes' 4-bit and 8-bit layers, loaded through transformers): what a posterior over their
LoRA matrices needs from them."""

from __future__ import annotations

import torch


def keep_differentiable(net) -> None:
    """Keep every bitsandbytes 4-bit layer of ``net`` on its differentiable kernels, holding its checkpoint's weights.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a faster inference kernel the first time the
    layer runs in eval mode on an input without gradient (every ``torch.no_grad`` prediction), and from then on
    uses that kernel, which has no backward, in training too: the gradients of the LoRA matrices below it come out
    silently wrong. This switches the repacking off. A layer repacked already is refused, whether it is packed now
    or was unpacked since (bitsandbytes' inverse, which its ``state_dict()`` and so ``save_pretrained`` run): the
    repacking rounds its block scales to bfloat16, which no inverse undoes, and bitsandbytes' inverse leaves a layer
    without double quantisation its scales in other blocks' places (weights up to 0.2% off with double quantisation,
    22% without, on a tiny Llama). The repacking marks the layer's quantisation state, and the inverse leaves the
    mark.

    :raises ValueError: where bitsandbytes repacked a 4-bit layer of ``net`` already.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no quantised layers
        return
    repacked = []
    for name, module in net.named_modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            if hasattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu"):  # False once unpacked
                repacked.append(name)
    if repacked:
        more = f" and {len(repacked) - 1} more" if len(repacked) > 1 else ""
        raise ValueError(
            f"bitsandbytes repacked the 4-bit layer {repacked[0]}{more} for its CPU inference kernel (an eval forward "
            "without gradients ran before this LoraModel was built), rounding its block scales to bfloat16: its weights "
            "are no longer the checkpoint's, unpacked since or not (state_dict() and save_pretrained unpack it), and no "
            "inverse restores them; load the network again from its original checkpoint (not a copy saved after the "
            "repack: it holds the changed weights) and build the "
            "LoraModel before running it (a network from pyro_lora.pretrained.load_pretrained never repacks)"
        )


# where PyTorch's quantised modules keep their packed weights: Linear, Embedding, Conv (dense or sparse), and the
# dynamic LSTM/GRU and their cells
_PACKED = ("_packed_params", "_all_weight_values", "_packed_weight_ih")


def check_no_torch_quantized(net) -> None:
    """Refuse a network holding a module of PyTorch's own quantisation (``torch.ao.quantization.quantize_dynamic``,
    ``convert``): no gradient runs through its quantised kernels, so the LoRA matrices below it would train on the
    LoRA branch's part of their gradient alone, and a dynamically quantised layer scales its input per forward, so a
    prediction would depend on the rows batched with it (probabilities 0.3 apart between batch sizes 1 and 6 on
    SmolLM2).

    :raises ValueError: naming the first such module, its type and what to load instead.
    """
    from torch.ao.nn.quantized import Quantize

    # by what the module does, not its package: packed quantised weights (dynamic or static, dense or sparse: Linear,
    # Embedding, Conv), or the entry to quantised activations (convert's QuantStub); FloatFunctional, reference
    # modules and QAT's fake quantisation run in float with gradients, and pass
    found = [(name, m) for name, m in net.named_modules()
             if any(hasattr(m, a) for a in _PACKED) or isinstance(m, Quantize)]
    found = [(name, m) for name, m in found if not any(name.startswith(f"{outer}.") for outer, _ in found)]  # its params
    if found:
        name, module = found[0]
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise ValueError(
            f"{name or 'the network'} is a {type(module).__module__}.{type(module).__name__}{more}, a module of PyTorch's own "
            "quantisation (torch.ao.quantization.quantize_dynamic or convert): no gradient runs through it, and a dynamic "
            "one scales its input per forward, so a prediction would depend on its batch; load the model in floating "
            "point, or quantised by bitsandbytes (transformers' BitsAndBytesConfig), and add the LoRA to that")


def has_int8_layers(net) -> bool:
    """Whether ``net`` holds a bitsandbytes LLM.int8() layer, whose output for one row depends on the other rows run
    with it: its outlier decomposition runs in 16 bits every input column that holds a value beyond its threshold
    (``llm_int8_threshold``, 6) in any row of the forward, on every device."""
    try:
        from bitsandbytes.nn import Linear8bitLt
    except ImportError:
        return False
    return any(isinstance(module, Linear8bitLt) for module in net.modules())


def dense_weight(module) -> torch.Tensor | None:
    """The float32 ``[d_out, d_in]`` weight a bitsandbytes 4-bit or 8-bit layer computes with (dequantised), or
    ``None`` for a layer that is not one of them."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    w = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    scales = int8_scales(module)
    if isinstance(module, bnb.nn.Linear8bitLt) and scales is not None:
        return w.data.float() * scales.float()[:, None] / 127  # LLM.int8(): row-wise absmax scaling
    return None


def int8_scales(module) -> torch.Tensor | None:
    """The row scales of a bitsandbytes LLM.int8() layer (``None`` for any other module): on its weight (``SCB``)
    until its first forward, which moves them into the layer's ``state`` and sets the weight's to ``None``."""
    weight = getattr(module, "weight", None)
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(module, "state", None), "SCB", None)
    return scales if isinstance(scales, torch.Tensor) else None


def is_quantized(p) -> bool:
    """Whether the parameter ``p`` holds bitsandbytes' quantized codes: an integer tensor, or a 4-bit or 8-bit
    parameter stored in a float dtype (``bnb_4bit_quant_storage=torch.bfloat16``, FSDP-QLoRA's setting), whose
    values are packed codes, not weights."""
    return not p.is_floating_point() or type(p).__name__ in ("Params4bit", "Int8Params")
