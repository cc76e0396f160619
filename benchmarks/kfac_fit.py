"""KFAC Laplace cost: fitting time against one forward+backward pass, GLM against the sampled predictive.

A random-initialised Llama-architecture sequence classifier with LoRA (weights do not change timings),
random token batches. Prints markdown rows; every time is the median of ``--repeats`` runs after a warm-up.

    python benchmarks/kfac_fit.py                    # CPU, small config
    python benchmarks/kfac_fit.py --device cuda --hidden 1024 --layers 8 --seq 256
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForSequenceClassification

from pyro_lora.guides.laplace import LaplaceGuide
from pyro_lora import LoraModel, SequenceClassification, predict


def build(args):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=args.seq,
        num_labels=args.labels, pad_token_id=0,
    )
    lora = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=args.targets.split(","), task_type="SEQ_CLS")
    net = get_peft_model(LlamaForSequenceClassification(config), lora).to(args.device).eval()
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    data = [
        {
            "input_ids": torch.randint(1, args.vocab, (args.batch, args.seq), generator=g).to(args.device),
            "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=args.device),
            "labels": torch.randint(0, args.labels, (args.batch,), generator=g).to(args.device),
        }
        for _ in range(args.batches)
    ]
    return LoraModel(net, SequenceClassification(), num_data=args.batch * args.batches), data


def timed(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(model, data):
    """What a plain LoRA training pass costs: forward, cross-entropy, backward into the LoRA weights."""
    params = model.random_parameters()
    for p in params:
        p.requires_grad_(True)
    try:
        for batch in data:
            loss = F.cross_entropy(model.logits(batch), batch["labels"])
            loss.backward()
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--rank", type=int, default=10, help="KFAC rank of the large factors")
    parser.add_argument("--samples", type=int, default=8, help="weight samples of the sampled predictive")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, data = build(args)
    device = str(model.device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device: {name}; Llama {args.layers}x{args.hidden}, LoRA r={args.r} on {args.targets}, "
        f"{args.batches} batches of {args.batch}x{args.seq}, {args.labels} classes, KFAC rank {args.rank}\n"
    )
    base = timed(lambda: forward_backward(model, data), device, args.repeats)
    mc = LaplaceGuide(model, fisher="mc", rank=args.rank)
    exact = LaplaceGuide(model, fisher="exact", rank=args.rank)
    fit_mc = timed(lambda: mc.fit(data, progress=False), device, args.repeats)
    fit_exact = timed(lambda: exact.fit(data, progress=False), device, args.repeats)
    print("| step | seconds | / forward+backward |")
    print("|---|---|---|")
    print(f"| forward+backward (LoRA training pass) | {base:.3f} | 1.00 |")
    print(f"| KFAC fit, MC Fisher | {fit_mc:.3f} | {fit_mc / base:.2f} |")
    passes = f"{args.labels - 1} backward pass(es)"
    print(f"| KFAC fit, exact Fisher ({args.labels} classes: {passes}) | {fit_exact:.3f} | {fit_exact / base:.2f} |")
    mc.optimize_prior_precision("marglik", per_layer=True)
    forward = timed(lambda: predict(model, None, data), device, args.repeats)
    sampled = timed(lambda: predict(model, mc, data, num_samples=args.samples), device, args.repeats)
    glm = timed(lambda: mc.predict_glm(data), device, args.repeats)
    print("\n| predictive | seconds | / MAP forward | / sampled |")
    print("|---|---|---|---|")
    print(f"| MAP forward | {forward:.3f} | 1.00 | {forward / sampled:.2f} |")
    print(f"| sampled, S={args.samples} (one batched forward) | {sampled:.3f} | {sampled / forward:.2f} | 1.00 |")
    print(f"| GLM probit ({args.labels} backward passes) | {glm:.3f} | {glm / forward:.2f} | {glm / sampled:.2f} |")


if __name__ == "__main__":
    main()
