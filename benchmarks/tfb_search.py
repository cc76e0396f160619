"""Cost of the TFB sigma_q search against one plain forward pass over the anchors, in the same process.

A small random Llama (LoRA r=8 on all 7 projections, B random so the adapter is not at zero), letter
multiple choice over 4 answers. The search makes ``1 + candidates`` passes over the anchors (the sigma=0
reference, then ``num_samples`` rows per anchor for each candidate); the ratio to a plain forward shows
what the batched S-sample forward costs against that row count. CPU by default.

    python benchmarks/tfb_search.py                    # CPU, small
    python benchmarks/tfb_search.py --device cuda --size 1b --anchors 500
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_lora.guides.tfb import TFBGuide  # noqa: E402
from pyro_lora import LoraModel, MultipleChoice  # noqa: E402

SIZES = {
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=2048),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(size, device):
    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(**SIZES[size], max_position_embeddings=4096)).to(device)
    net = get_peft_model(net, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return net.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--anchors", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--criterion", default="nll")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=3, help="plain-forward timings (median)")
    args = ap.parse_args()
    device = torch.device(args.device)
    net = build(args.size, device)
    g = torch.Generator().manual_seed(0)
    anchors = []
    for i in range(0, args.anchors, args.batch):
        n = min(args.batch, args.anchors - i)
        ids = torch.randint(1, net.config.vocab_size, (n, args.seq), generator=g)
        anchors.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "choice_mask": torch.ones(n, 4, dtype=torch.bool)})
    model = LoraModel(net, MultipleChoice(answer_token_ids=[5, 6, 7, 8]), random="AB")
    on_device = [{k: v.to(device) for k, v in b.items()} for b in anchors]

    def plain_pass():
        with torch.no_grad():
            return [model.logits(b) for b in on_device]

    plain_pass()  # warm-up
    forward = statistics.median(timed(plain_pass, device)[0] for _ in range(args.repeats))
    build_s, guide = timed(lambda: TFBGuide(model), device)
    search_s, trace = timed(
        lambda: guide.search(anchors, criterion=args.criterion, tolerance=args.tolerance, iterations=args.iterations, num_samples=args.samples, progress=False),
        device,
    )
    passes = 1 + len(trace)
    rows = 1 + args.samples * len(trace)  # forward rows per anchor, in plain-forward units
    print(f"# {args.size} Llama, LoRA r=8 on 7 projections, {args.anchors} anchors x {args.seq} tokens, batch {args.batch}, {device}")
    print(f"# sigma_q = {float(guide.sigma_q):.6g} ({args.criterion}, tolerance {args.tolerance}); trace: "
          + ", ".join(f"{t['sigma']:.4g}:{'ok' if t['feasible'] else 'x'}" for t in trace))
    print("| device | anchors | S | candidates | anchor passes | forward rows / anchor | SVD build s | plain forward s | search s | search / forward |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {device.type} | {args.anchors} | {args.samples} | {len(trace)} | {passes} | {rows} | {build_s:.3f} | {forward:.3f} | {search_s:.2f} | {search_s / forward:.1f} |")


if __name__ == "__main__":
    main()
