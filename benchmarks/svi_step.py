"""One SVI step of each guide, and the S-sample predictive, as ratios to plain peft LoRA in the same process.

CPU by default on a small random Llama (per-site overhead shows there); ``--size 1b --device cuda`` is
a ~1B Llama-architecture config (LoRA r=8 on all 7 projections, batch 4x256).

    python benchmarks/svi_step.py                      # CPU, small
    python benchmarks/svi_step.py --size 1b --device cuda --guides map,meanfield,flow
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pyro.infer import TraceMeanField_ELBO
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_lora.guides import FlowGuide, MAPGuide, MeanFieldGuide, ScalaBLGuide  # noqa: E402
from pyro_lora import CausalLM, LoraModel, MultipleChoice, ScalaBLModel, fit  # noqa: E402

SIZES = {
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=2048),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (random sites, guide constructor)
GUIDES = {
    "map": ("AB", MAPGuide),
    "meanfield": ("A", MeanFieldGuide),
    "meanfield_flipout": ("A", lambda model: MeanFieldGuide(model, flipout=True)),
    "flow": ("A", FlowGuide),
    "scalabl": ("S", ScalaBLGuide),  # the model is a ScalaBLModel (its rotation keeps B A)
}


def build(size, device, dtype):
    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(**SIZES[size], max_position_embeddings=4096)).to(device, dtype)
    net = get_peft_model(net, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return net


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def plain_steps(net, batch, steps, device, autocast):
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    def run():
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 64 small, 256 1b)")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--guides", default=",".join(GUIDES))
    args = ap.parse_args()
    device = torch.device(args.device)
    seq = args.seq or (64 if args.size == "small" else 256)
    autocast = device.type == "cuda"
    net = build(args.size, device, torch.float32)
    vocab = net.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (args.batch, seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    n_lora = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
    print(f"# {args.size} Llama, LoRA r=8 on 7 projections ({n_lora / 1e6:.2f}M LoRA params), batch {args.batch}x{seq}, {device}")

    plain = timed(plain_steps(net, batch, args.steps, device, autocast), device, args.repeats) / args.steps
    print("| what | seconds | ratio to plain LoRA |\n|---|---|---|")
    print(f"| plain peft LoRA step | {plain:.4f} | 1.00 |")
    for name in args.guides.split(","):
        random, make_guide = GUIDES[name]
        if random == "S":
            model = ScalaBLModel(net, CausalLM(), prior=1.0, num_data=1000)
        else:
            model = LoraModel(net, CausalLM(), random=random, prior=0.2, num_data=1000)
        guide = make_guide(model).to(device)
        elbo = TraceMeanField_ELBO()
        # stop_on_divergence=False: its one forward per epoch is no part of a step (this epoch has only `steps` steps)
        run = lambda: fit(model, guide, [batch] * args.steps, lr=1e-5, elbo=elbo, stop_on_divergence=False, progress=False)  # noqa: E731
        step = timed(run, device, args.repeats) / args.steps
        print(f"| SVI step, {name} guide ({len(model.sites)} sites) | {step:.4f} | {step / plain:.2f} |")
        del guide  # it trained the network's point parameters beside its own LoRA values: the next guide starts afresh

    # predictive: S samples in one batched forward against S separate forwards (last-token class logits)
    choices = {"input_ids": ids, "attention_mask": batch["attention_mask"], "choice_mask": torch.ones(args.batch, 4, dtype=torch.bool, device=device)}
    model = LoraModel(net, MultipleChoice(answer_token_ids=[5, 6, 7, 8]), random="AB")
    values = {k: v + 0.01 * torch.randn(args.samples, *v.shape, device=device) for k, v in model.adapter_values().items()}
    net.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        one = timed(lambda: model.logits(choices), device, args.repeats)
        batched = timed(lambda: model.logits(choices, values, args.samples), device, args.repeats)
        looped = timed(lambda: [model.logits(choices, {k: v[s] for k, v in values.items()}) for s in range(args.samples)], device, args.repeats)
    print(f"| plain forward | {one:.4f} | 1.00 |")
    print(f"| predictive, S={args.samples} batched | {batched:.4f} | {batched / one:.2f} |")
    print(f"| predictive, S={args.samples} looped | {looped:.4f} | {looped / one:.2f} |")
    print(f"| batched / looped | | {batched / looped:.2f} |")


if __name__ == "__main__":
    main()
