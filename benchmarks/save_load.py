"""Cost of ``save_guide`` / ``load_guide`` against peft's own ``save_pretrained`` of the adapter, in the same process.

``save_guide`` records SHA-256 digests of each base weight (as held, and for a float32 weight as cast to bfloat16
and float16), so that ``load_guide`` can refuse a guide on another checkpoint; ``load_guide``
reads the base once more to compare. Each digest pass reads every base weight (on a GPU, across to the host).
This script times one digest pass, building, saving and loading a MAP guide, and peft's adapter save, on a random
Llama. CPU by default.

    python benchmarks/save_load.py                         # CPU, small, fp32
    python benchmarks/save_load.py --device cuda --size 1b --dtype bf16
"""

import argparse
import tempfile
from pathlib import Path

import _common as C  # noqa: I001  (first: puts the working tree's pyro_lora on the path)
import torch
from transformers import LlamaForSequenceClassification

from pyro_lora import LoraModel, SequenceClassification, load_guide, save_guide
from pyro_lora.contract import digested_parameters, weights_digest
from pyro_lora.guides import MAPGuide


def run(size="small", device="cpu", dtype=None, repeats=3, log=print):
    """Measure; returns a dict of figures that :func:`tables` prints."""
    device = torch.device(device)
    dtype = dtype or C.default_dtype(device)
    net = C.build_llama(LlamaForSequenceClassification, size, device, dtype, task_type="SEQ_CLS", num_labels=4).eval()
    model = LoraModel(net, SequenceClassification())
    guide = MAPGuide(model)
    base_bytes = sum(p.numel() * p.element_size() for _, p in digested_parameters(net))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        peft_s = C.timed(lambda: net.save_pretrained(tmp / "peft"), device, repeats)
        digest_s = C.timed(lambda: weights_digest(net), device, repeats)
        build_s = C.timed(lambda: MAPGuide(model), device, repeats)  # a new guide records the base's digests
        save_s = C.timed(lambda: save_guide(guide, tmp / "guide"), device, repeats)
        load_s = C.timed(lambda: load_guide(tmp / "guide", model), device, repeats)
    out = {"device": str(device), "dtype": dtype, "size": size, "base_gb": base_bytes / 1e9, "peft_save": peft_s,
           "digest": digest_s, "build": build_s, "save": save_s, "load": load_s}
    log(f"# save_load: {size} Llama ({dtype}), base {out['base_gb']:.2f} GB: digest {digest_s:.2f} s, save_guide {save_s:.2f} s, "
        f"load_guide {load_s:.2f} s, peft save_pretrained {peft_s:.3f} s")
    return out


def tables(out) -> str:
    rows = [("peft save_pretrained (the adapter)", out["peft_save"]), ("one digest pass over the base (weights_digest)", out["digest"]),
            ("MAPGuide(model) (records the base's digests)", out["build"]), ("save_guide (MAP guide)", out["save"]),
            ("load_guide (MAP guide)", out["load"])]
    return "\n".join([
        f"Base weights digested: {out['base_gb']:.3f} GB ({out['dtype']}); one digest pass reads them at "
        f"{out['base_gb'] / out['digest']:.2f} GB/s.",
        "",
        "| step | seconds | / peft save_pretrained | / one digest pass |",
        "|---|---|---|---|",
        *[f"| {name} | {s:.3f} | {s / out['peft_save']:.1f} | {s / out['digest']:.2f} |" for name, s in rows],
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=C.SIZES, default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=C.DTYPES, default=None, help="base weights (default bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--repeats", type=C.positive_int, default=3, help="timings per step (median)")
    args = ap.parse_args()
    out = run(args.size, args.device, args.dtype, args.repeats, log=lambda *a: None)
    print(f"# {args.size} Llama, LoRA r=8 on 7 projections, {out['device']}, {out['dtype']}, {C.device_name(args.device)}")
    print(tables(out))


if __name__ == "__main__":
    main()
