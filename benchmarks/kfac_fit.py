"""KFAC Laplace cost: fitting time against one forward+backward pass, GLM against the sampled predictive.

A random-initialised Llama-architecture sequence classifier with LoRA (weights do not change timings),
random token batches; with ``--cloze``, a causal LM scoring ``--labels`` random continuations per question
(multiple choice in the cloze format: one row per choice, whose gradients one backward pass gives). Prints
markdown rows; every time is the median of ``--repeats`` runs after a warm-up. With ``--memory``, also the fit's
peak memory over ``--batches`` and twice as many batches, streamed from a generator (it should not depend on the
data size).

    python benchmarks/kfac_fit.py                    # CPU, small config
    python benchmarks/kfac_fit.py --cloze --batch 2           # cloze multiple choice: 2 questions x 4 choices per batch
    python benchmarks/kfac_fit.py --device cuda --hidden 1024 --layers 8 --seq 256
    python benchmarks/kfac_fit.py --device cuda --size 1b --targets all --batch 4 --seq 256 --memory
"""

import argparse
import sys

import _common as C  # noqa: I001  (first: puts the working tree's pyro_lora on the path)
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from pyro_lora import LoraModel, MultipleChoice, SequenceClassification, predict
from pyro_lora.guides.laplace import LaplaceGuide


def build(args):
    cls, task, extra = (LlamaForCausalLM, "CAUSAL_LM", {}) if args.cloze else (LlamaForSequenceClassification, "SEQ_CLS", {"num_labels": args.labels})
    if args.size:  # a preset of svi_step's (its MLP width and grouped-query heads)
        net = C.build_llama(cls, args.size, args.device, args.dtype, args.targets, args.r, task, 0.02, **extra)
    else:
        config = dict(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=args.seq, **extra,
        )
        net = C.build_llama(cls, "small", args.device, args.dtype, args.targets, args.r, task, 0.02, **config)
    net = net.eval()
    data = list(batches(net.config.vocab_size, args, args.batches))
    # the hooks of the KFAC pass and the GLM predictive read one forward per batch: every choice's row in full
    likelihood = MultipleChoice(format="cloze", share_prefix=False) if args.cloze else SequenceClassification()
    return LoraModel(net, likelihood, num_data=args.batch * args.batches), data


CONTINUATION = 8  # cloze: the scored tokens at the end of each choice's row


def batches(vocab, args, n, seed=1):
    """``n`` random labelled batches on the device, made one at a time (a generator: the data need not be held).
    Cloze: ``args.batch`` questions of ``args.labels`` rows each, the last ``CONTINUATION`` tokens scored."""
    g = torch.Generator().manual_seed(seed)
    rows = args.batch * args.labels if args.cloze else args.batch
    for _ in range(n):
        batch = {
            "input_ids": torch.randint(1, vocab, (rows, args.seq), generator=g),
            "attention_mask": torch.ones(rows, args.seq, dtype=torch.long),
            "labels": torch.randint(0, args.labels, (args.batch,), generator=g),
        }
        if args.cloze:
            batch["target_mask"] = torch.arange(args.seq).expand(rows, -1) >= args.seq - CONTINUATION
            batch["choice_mask"] = torch.ones(args.batch, args.labels, dtype=torch.bool)
        yield {k: v.to(args.device) for k, v in batch.items()}


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


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", choices=C.SIZES, default=None, help="a preset Llama (as svi_step's); overrides --hidden/--layers/--heads/--vocab")
    p.add_argument("--dtype", choices=C.DTYPES, default=None, help="base weights (default bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--hidden", type=C.positive_int, default=256)
    p.add_argument("--layers", type=C.positive_int, default=4)
    p.add_argument("--heads", type=C.positive_int, default=4)
    p.add_argument("--vocab", type=C.positive_int, default=1000)
    p.add_argument("--seq", type=C.positive_int, default=64)
    p.add_argument("--batch", type=C.positive_int, default=8)
    p.add_argument("--batches", type=C.positive_int, default=8)
    p.add_argument("--labels", type=C.positive_int, default=4)
    p.add_argument("--r", type=C.positive_int, default=8, help="LoRA rank")
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated LoRA targets, or 'all' (the 7 projections)")
    p.add_argument("--rank", type=C.positive_int, default=10, help="KFAC rank of the large factors")
    p.add_argument("--samples", type=C.positive_int, default=8, help="weight samples of the sampled predictive")
    p.add_argument("--repeats", type=C.positive_int, default=3)
    p.add_argument("--threads", type=C.positive_int, default=None, help="torch CPU threads")
    p.add_argument("--memory", action="store_true", help="also the fit's peak memory over N and 2N streamed batches")
    p.add_argument("--no-predictive", action="store_true", help="time the fit only")
    p.add_argument("--cloze", action="store_true", help="a causal LM scoring --labels choices per question (cloze multiple choice)")
    return p


def run(args, log=print):
    """Measure; returns a dict of figures (seconds, MiB) that :func:`tables` prints."""
    args.dtype = args.dtype or C.default_dtype(args.device)
    args.targets = C.TARGETS if args.targets == "all" else args.targets.split(",") if isinstance(args.targets, str) else list(args.targets)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, data = build(args)
    device = str(model.device)
    config = model.net.config
    out = {
        "device": device, "dtype": args.dtype, "layers": config.num_hidden_layers, "hidden": config.hidden_size, "targets": args.targets,
        "r": args.r, "batches": args.batches, "batch": args.batch, "seq": args.seq, "labels": args.labels, "rank": args.rank,
        "samples": args.samples, "cloze": args.cloze,
    }
    log(f"# kfac_fit: Llama {out['layers']}x{out['hidden']}, LoRA r={args.r} on {','.join(args.targets)}, {args.batches} batches of "
        f"{args.batch}x{args.seq}, {args.labels} classes, KFAC rank {args.rank}, {device}, {args.dtype}")
    out["forward_backward"] = C.timed(lambda: forward_backward(model, data), device, args.repeats)
    mc = LaplaceGuide(model, fisher="mc", rank=args.rank)
    out["fit_mc"] = C.timed(lambda: mc.fit(data, progress=False), device, args.repeats)
    log(f"  forward+backward {out['forward_backward']:.3f} s, KFAC fit (MC) {out['fit_mc']:.3f} s")
    errors = out["errors"] = []

    def fit_exact():
        exact = LaplaceGuide(model, fisher="exact", rank=args.rank)
        return C.timed(lambda: exact.fit(data, progress=False), device, args.repeats)

    exact = C.attempt(errors, "KFAC fit, exact Fisher", fit_exact)
    if exact is not None:
        out["fit_exact"] = exact
    if args.memory:
        vocab = config.vocab_size

        def fit_memory():
            stream = LaplaceGuide(model, fisher="mc", rank=args.rank)
            stream.fit(batches(vocab, args, 1), progress=False)  # warm-up: lazily built state outside the blocks
            return {
                n: C.peak_memory(lambda: stream.fit(batches(vocab, args, n, seed=2), progress=False), device)
                for n in (args.batches, 2 * args.batches)
            }

        memory = C.attempt(errors, "KFAC fit memory", fit_memory)
        if memory is not None:
            out["fit_memory"] = memory
            log("  KFAC fit peak memory (MiB): " + ", ".join(f"{n} batches {v[0]:.1f}" for n, v in memory.items()))
    if not args.no_predictive:

        def predictives():
            mc.optimize_prior_precision("marglik", per_layer=True)
            return {
                "forward": C.timed(lambda: predict(model, None, data), device, args.repeats),
                "sampled": C.timed(lambda: predict(model, mc, data, num_samples=args.samples), device, args.repeats),
                "glm": C.timed(lambda: mc.predict_glm(data), device, args.repeats),
            }

        timings = C.attempt(errors, "KFAC predictives", predictives)
        if timings is not None:
            out.update(timings)
            log(f"  MAP forward {out['forward']:.3f} s, sampled {out['sampled']:.3f} s, GLM {out['glm']:.3f} s")
    return out


def tables(out) -> str:
    """The figures of :func:`run` as markdown tables (RESULTS.md's)."""
    base = out["forward_backward"]
    # a cloze batch's choices are rows of their own: one backward pass gives every choice's gradient
    one = "1 backward pass, one row per choice"
    passes = f"{out['labels']} choices: {one}" if out["cloze"] else f"{out['labels']} classes: {out['labels'] - 1} backward pass(es)"
    glm_passes = one if out["cloze"] else f"{out['labels']} backward passes"
    lines = [
        "| step | seconds | / forward+backward |",
        "|---|---|---|",
        f"| forward+backward (LoRA training pass) | {base:.3f} | 1.00 |",
        f"| KFAC fit, MC Fisher | {out['fit_mc']:.3f} | {out['fit_mc'] / base:.2f} |",
    ]
    if "fit_exact" in out:
        lines.append(f"| KFAC fit, exact Fisher ({passes}) | {out['fit_exact']:.3f} | {out['fit_exact'] / base:.2f} |")
    if "fit_memory" in out:
        (n, small), (n2, large) = out["fit_memory"].items()
        lines += [
            "",
            "| KFAC fit (MC), batches streamed from a generator | peak MiB | MiB above resident | / the first row's peak |",
            "|---|---|---|---|",
            f"| {n} batches | {small[0]:.1f} | {small[1]:.1f} | 1.000 |",
            f"| {n2} batches | {large[0]:.1f} | {large[1]:.1f} | {C.ratio(large[0], small[0]):.3f} |",
        ]
    if "glm" in out:
        forward, sampled, glm = out["forward"], out["sampled"], out["glm"]
        lines += [
            "",
            "| predictive | seconds | / MAP forward | / sampled |",
            "|---|---|---|---|",
            f"| MAP forward | {forward:.3f} | 1.00 | {forward / sampled:.2f} |",
            f"| sampled, S={out['samples']} (one batched forward) | {sampled:.3f} | {sampled / forward:.2f} | 1.00 |",
            f"| GLM probit ({glm_passes}) | {glm:.3f} | {glm / forward:.2f} | {glm / sampled:.2f} |",
        ]
    if out.get("errors"):
        lines += ["", "Failed: " + "; ".join(out["errors"])]
    return "\n".join(lines)


def main(argv=None):
    args = parser().parse_args(argv)
    out = run(args, log=lambda *a: None)
    name = C.device_name(out["device"])
    print(
        f"device: {name}; Llama {out['layers']}x{out['hidden']}, LoRA r={out['r']} on {','.join(out['targets'])}, "
        f"{out['batches']} batches of {out['batch']}x{out['seq']}, {out['labels']} {'cloze choices' if out['cloze'] else 'classes'}, KFAC rank {out['rank']}, {out['dtype']}\n"
    )
    print(tables(out))
    sys.exit(1 if out["errors"] else 0)


if __name__ == "__main__":
    main()
