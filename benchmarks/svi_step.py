"""One SVI step of each guide, and the S-sample predictive, as ratios to plain peft LoRA in the same process;
and their peak memory against a plain LoRA step and a plain forward.

CPU by default on a small random Llama (per-site overhead shows there); ``--size 1b --device cuda`` is
a ~1B Llama-architecture config (LoRA r=8 on all 7 projections, batch 4x256, bf16 base). An SVI step is the
median time between the ends of consecutive steps of one ``fit`` call (steady state); each call's fixed cost
(checks, optimizer, point snapshot) is shown beside it. ``meanfield_pyro`` steps the mean-field guide with Pyro's own
``SVI`` and ``pyro.optim.Adam``, as a user's script does: the library follows those steps (which guide owns the
head, what the training left) instead of keeping ``fit``'s books.

    python benchmarks/svi_step.py                      # CPU, small, fp32
    python benchmarks/svi_step.py --size 1b --device cuda --guides map,meanfield,flow

``--ops`` also counts the aten ops a step dispatches (:func:`_common.ops_per_step`): at the GPU goal's shape a step
is bound by the host launching kernels, and the counts are exact on the CPU too.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the live tensors before the block plus
the peak of the allocations torch.profiler traces within it (exact; sampling the resident set is too coarse
for a small model). ``--no-memory`` skips it.
"""

import argparse
import math
import statistics
import sys
import time

import _common as C  # noqa: I001  (first: puts the working tree's pyro_lora on the path)
import pyro.optim
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO
from transformers import LlamaForCausalLM

from pyro_lora import CausalLM, LoraModel, MultipleChoice, ScalaBLModel, fit, predict
from pyro_lora.guides import FlowGuide, MAPGuide, MeanFieldGuide, ScalaBLGuide

# name -> (random sites, guide constructor)
GUIDES = {
    "map": ("AB", MAPGuide),
    "meanfield": ("A", MeanFieldGuide),
    "meanfield_flipout": ("A", lambda model: MeanFieldGuide(model, flipout=True)),
    "meanfield_pyro": ("A", MeanFieldGuide),  # stepped by Pyro's SVI (pyro_svi_steps), not fit
    "flow": ("A", FlowGuide),
    "scalabl": ("S", ScalaBLGuide),  # the model is a ScalaBLModel (its rotation keeps B A)
}
LABELS = {"meanfield_flipout": "meanfield + flipout", "meanfield_pyro": "meanfield, Pyro's own SVI and pyro.optim.Adam,"}


def plain_steps(net, batch, steps, device, autocast):
    """``steps`` plain peft LoRA training steps (AdamW, fused on CUDA, as ``fit``'s), one optimizer kept across calls."""
    params = [p for n, p in net.named_parameters() if "lora_" in n]  # trainable again: a LoraModel may have frozen them
    for p in params:
        p.requires_grad_(True)
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


def lora_state(net):
    """The network's LoRA weights as they are now, for :func:`restore`."""
    return {n: p.detach().clone() for n, p in net.named_parameters() if "lora_" in n}


def restore(net, saved):
    """Put the LoRA weights of :func:`lora_state` back: a guide's fit trained the network's point LoRA matrices beside
    its own values, which a model built next over the adapter would refuse to pair; each guide starts afresh."""
    params = dict(net.named_parameters())
    with torch.no_grad():
        for n, v in saved.items():
            params[n].copy_(v)


def make_model(net, name):
    random, make_guide = GUIDES[name]
    if random == "S":
        model = ScalaBLModel(net, CausalLM(), prior=1.0, num_data=1000)
    else:
        model = LoraModel(net, CausalLM(), random=random, prior=0.2, num_data=1000)
    return model, make_guide(model).to(model.device)


def svi_steps(model, guide, batch, steps, stamps=None):
    """``fit`` over ``steps`` copies of ``batch``; with ``stamps`` (a list), each call appends the list of its
    steps' end times (``fit`` reads each step's loss, so a step ends when the GPU finished its backward)."""
    elbo = TraceMeanField_ELBO()

    def run():
        callbacks = ()
        if stamps is not None:
            stamps.append([])
            callbacks = (lambda state: stamps[-1].append(time.perf_counter()),)
        # stop_on_divergence=False: its one forward per epoch is no part of a step (this epoch has only `steps` steps)
        fit(model, guide, [batch] * steps, lr=1e-5, elbo=elbo, stop_on_divergence=False, progress=False, callbacks=callbacks)

    return run


def pyro_svi_steps(model, guide, batch, steps, device, autocast, stamps=None):
    """``steps`` steps of Pyro's own ``SVI`` with ``pyro.optim.Adam`` (kept across calls), under the autocast ``fit``
    runs; with ``stamps`` (a list), each call appends the list of its steps' end times (``svi.step`` returns the loss
    as a float, so a step ends when the GPU finished it)."""
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-5}), TraceMeanField_ELBO())

    def run():
        if stamps is not None:
            stamps.append([])
        model.net.train()
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                svi.step(batch)
            if stamps is not None:
                stamps[-1].append(time.perf_counter())

    return run


def run(size="small", device="cpu", dtype=None, batch=4, seq=None, steps=5, repeats=3, samples=8, guides=",".join(GUIDES),
        memory=True, memory_guides="meanfield,flow", chunks=(1, 2, 8), net=None, log=print, ops=False):
    """Measure; returns a dict of figures (seconds, MiB) that :func:`tables` prints. ``net``: a LoRA Llama of
    :func:`_common.build_llama` to reuse (else one is built). A measurement that fails is left out and its error
    listed in ``out["errors"]``; the others go on. ``ops``: count each step's aten ops too (``out["ops"]``)."""
    device = torch.device(device)
    dtype = dtype or C.default_dtype(device)
    seq = seq or (64 if size == "small" else 256)
    # fit runs under bf16 autocast on CUDA whatever the base's dtype, and a bf16 base always does (LoraModel):
    # the plain step does as they do
    autocast = device.type == "cuda" or dtype == "bf16"
    net = net if net is not None else C.build_llama(LlamaForCausalLM, size, device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, net.config.vocab_size, (batch, seq), generator=g).to(device)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    out = {"size": size, "device": str(device), "dtype": dtype, "batch": batch, "seq": seq, "samples": samples,
           "lora_params": C.lora_parameters(net), "steps": {}, "predictive": {}, "memory": {}, "ops": {}, "errors": []}
    errors = out["errors"]
    log(f"# svi_step: {size} Llama, LoRA r=8 on 7 projections ({out['lora_params'] / 1e6:.2f}M LoRA params), batch {batch}x{seq}, {device}, {dtype}")

    start = lora_state(net)
    step = C.timed(plain_steps(net, data, steps, device, autocast), device, repeats) / steps
    out["steps"]["plain"] = {"seconds": step}
    log(f"  plain peft LoRA step {step:.4f} s")
    if ops:
        out["ops"]["plain"] = C.ops_per_step(lambda k: plain_steps(net, data, k, device, autocast))
    for name in guides.split(","):

        def time_guide():
            model, guide = make_model(net, name)
            # the guide trained the network's point parameters beside its own LoRA values: the next one starts afresh.
            # A step is the median time between the ends of consecutive steps within a fit call; each call also pays a
            # fixed cost (its checks, the optimizer's construction, the point snapshot) that a long run spreads thin
            stamps = []
            pyro_svi = name.endswith("_pyro")

            def steps_of(k, ends=None):  # a runner of k steps; ends: as stamps
                return (pyro_svi_steps(model, guide, data, k, device, autocast, ends) if pyro_svi
                        else svi_steps(model, guide, data, k, ends))

            call = C.timed(steps_of(steps + 1, stamps), device, repeats)
            step = statistics.median(b - a for run in stamps[1:] for a, b in zip(run, run[1:]))  # [0]: the warm-up
            if ops:
                out["ops"][name] = C.ops_per_step(steps_of)
            return {"seconds": step, "fixed": None if pyro_svi else call - (steps + 1) * step, "sites": len(model.sites)}

        timing = C.attempt(errors, f"SVI step, {name}", time_guide)
        restore(net, start)
        C.free(device)
        if timing is not None:
            out["steps"][name] = timing
            log(f"  SVI step, {name} {timing['seconds']:.4f} s ({timing['seconds'] / out['steps']['plain']['seconds']:.2f}x)"
                + ("" if timing["fixed"] is None else f", fit's fixed cost {timing['fixed']:.4f} s"))

    # predictive: S samples in one batched forward against S separate forwards (last-token class logits)
    choices = {
        "input_ids": ids, "attention_mask": data["attention_mask"], "choice_mask": torch.ones(batch, 4, dtype=torch.bool, device=device),
        "labels": torch.randint(0, 4, (batch,), generator=g).to(device),
    }
    model = LoraModel(net, MultipleChoice(answer_token_ids=[5, 6, 7, 8]), random="AB")

    def time_predictive():
        values = {k: v + 0.01 * torch.randn(samples, *v.shape, device=device) for k, v in model.adapter_values().items()}
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            one = C.timed(lambda: model.logits(choices), device, repeats)
            batched = C.timed(lambda: model.logits(choices, values, samples), device, repeats)
            looped = C.timed(lambda: [model.logits(choices, {k: v[s] for k, v in values.items()}) for s in range(samples)], device, repeats)
            # a fast path that computed something else would read as a speed-up: the batched logits must be the loop's
            fast = model.logits(choices, values, samples)
            slow = torch.stack([model.logits(choices, {k: v[s] for k, v in values.items()}) for s in range(samples)])
        gap = float((fast.float() - slow.float()).abs().max())
        if gap > (1e-4 if fast.dtype == torch.float32 else 0.05):  # bf16 autocast on CUDA rounds each row its own way
            raise AssertionError(f"the batched predictive's logits are up to {gap:.3g} from the looped ones': no timing")
        return {"forward": one, "batched": batched, "looped": looped}

    net.eval()
    out["predictive"] = C.attempt(errors, "predictive", time_predictive) or {}
    net.train()
    if out["predictive"]:
        p = out["predictive"]
        log(f"  predictive S={samples}: batched {p['batched']:.4f} s, looped {p['looped']:.4f} s ({p['batched'] / p['looped']:.2f}x)")
    if memory:
        out["memory"] = measure_memory(net, data, choices, model, device, autocast, memory_guides, samples, chunks, errors, log)
    restore(net, start)  # the network as given, for the next benchmark of the suite
    return out


def measure_memory(net, data, choices, mc_model, device, autocast, memory_guides, samples, chunks, errors, log=print):
    """Peak memory (total, above resident; MiB) of two training steps of plain LoRA and of each SVI guide, of a
    plain forward and of the ``samples``-sample predictive with each chunk size (one batch). A block that fails
    reads ``(nan, nan)``."""
    nan = (float("nan"), float("nan"))
    mem = {"samples": samples}
    for p in net.parameters():
        p.grad = None
    # a fresh optimizer: its state is allocated within the block, as fit's is
    mem["plain_step"] = C.attempt(errors, "memory, plain step", C.peak_memory, plain_steps(net, data, 2, device, autocast), device) or nan
    for name in filter(None, memory_guides.split(",")):

        def svi_block():
            model, guide = make_model(net, name)
            svi_steps(model, guide, data, 1)()  # warm-up outside the block (lazily built state)
            return C.peak_memory(svi_steps(model, guide, data, 2), device)

        start = lora_state(net)
        mem[f"svi_{name}"] = C.attempt(errors, f"memory, SVI step {name}", svi_block) or nan
        restore(net, start)
        C.free(device)
    guide = MeanFieldGuide(mc_model, b="normal").to(device)  # every LoRA matrix sampled: the largest draw
    mem["sample_mib"] = sum(4 * math.prod(site.shape) for site in mc_model.sites.values()) / 2**20  # one float32 draw of every site

    def predictive_block(num_samples, chunk_size=None, with_guide=True):
        block = lambda: predict(mc_model, guide if with_guide else None, [choices], num_samples=num_samples, chunk_size=chunk_size)  # noqa: E731
        block()  # warm-up
        return C.peak_memory(block, device)

    mem["forward"] = C.attempt(errors, "memory, plain forward", predictive_block, 1, with_guide=False) or nan
    mem["one_sample"] = C.attempt(errors, "memory, predictive S=1", predictive_block, 1) or nan  # the unit of "bounded by chunk_size"
    for c in chunks:
        mem[f"chunk_{c}"] = C.attempt(errors, f"memory, predictive chunk_size={c}", predictive_block, samples, c) or nan
    log("  memory (MiB, total / above resident): " + ", ".join(f"{k} {v[0]:.0f}/{v[1]:.1f}" for k, v in mem.items() if isinstance(v, tuple)))
    return mem


def tables(out) -> str:
    """The figures of :func:`run` as markdown tables (RESULTS.md's)."""
    plain = out["steps"]["plain"]["seconds"]
    lines = ["| what | seconds | ratio to plain LoRA |", "|---|---|---|", f"| plain peft LoRA step | {plain:.4f} | 1.00 |"]
    for name, r in out["steps"].items():
        if name != "plain":
            fixed = "" if r["fixed"] is None else f"; fit's fixed cost {r['fixed']:.4f} s a call"
            lines.append(f"| SVI step, {LABELS.get(name, name)} guide ({r['sites']} sites{fixed}) "
                         f"| {r['seconds']:.4f} | {r['seconds'] / plain:.2f} |")
    p, s = out["predictive"], out["samples"]
    if p:
        lines += [
            f"| plain forward | {p['forward']:.4f} | 1.00 |",
            f"| predictive, S={s} in one batched forward | {p['batched']:.4f} | {p['batched'] / p['forward']:.2f} |",
            f"| predictive, S={s} looped | {p['looped']:.4f} | {p['looped'] / p['forward']:.2f} |",
            f"| batched / looped | | {p['batched'] / p['looped']:.2f} |",
        ]
    if out.get("ops"):
        plain_ops = out["ops"].get("plain", math.nan)
        lines += ["", "| aten ops a step | ops | ratio to plain LoRA |", "|---|---|---|"]
        lines += [f"| {'plain peft LoRA step' if name == 'plain' else f'SVI step, {LABELS.get(name, name)} guide'} | {n:.0f} "
                  f"| {C.ratio(n, plain_ops):.2f} |" for name, n in out["ops"].items()]
    if out["memory"]:
        lines += ["", memory_table(out["memory"], s)]
    if out.get("errors"):
        lines += ["", "Failed: " + "; ".join(out["errors"])]
    return "\n".join(lines)


def chunk_bound(mem):
    """``max_c`` of the S-sample predictive's memory above resident with ``chunk_size=c`` over ``c`` times a one-sample
    predictive's: at most about 1 when the predictive's memory is bounded by the chunk, not by ``S`` (nan if any is missing)."""
    one = mem["one_sample"][1]
    values = [C.ratio(v[1], min(int(k[6:]), mem["samples"]) * one) for k, v in mem.items() if k.startswith("chunk_")]
    return float("nan") if not values or any(math.isnan(v) for v in values) else max(values)


def memory_table(mem, samples) -> str:
    """The peak-memory figures of :func:`measure_memory` as two markdown tables (training, predictive)."""
    step, one = mem["plain_step"], mem["one_sample"]
    lines = [
        "| peak memory, training | MiB | / plain LoRA step | MiB above resident | / plain LoRA step's |",
        "|---|---|---|---|---|",
        f"| plain peft LoRA step (2 steps, fresh AdamW) | {step[0]:.1f} | 1.000 | {step[1]:.1f} | 1.00 |",
    ]
    for k in (k for k in mem if k.startswith("svi_")):
        total, extra = mem[k]
        name = LABELS.get(k[4:], k[4:])
        lines.append(f"| SVI step, {name} guide (2 steps) | {total:.1f} | {C.ratio(total, step[0]):.3f} | {extra:.1f} | {C.ratio(extra, step[1]):.2f} |")
    forward = mem["forward"]
    lines += [
        "",
        f"| peak memory, predictive (one weight sample: {mem['sample_mib']:.2f} MiB) | MiB | / plain LoRA step | MiB above resident | / (chunk x S=1's) |",
        "|---|---|---|---|---|",
        f"| plain forward (predict, no guide) | {forward[0]:.1f} | {C.ratio(forward[0], step[0]):.3f} | {forward[1]:.1f} | |",
        f"| predictive, S=1 | {one[0]:.1f} | {C.ratio(one[0], step[0]):.3f} | {one[1]:.1f} | 1.00 |",
    ]
    for k in (k for k in mem if k.startswith("chunk_")):
        (total, extra), c = mem[k], int(k[6:])
        # a chunk beyond S holds S draws (predict's chunk is min(chunk_size, S))
        lines.append(f"| predictive, S={samples}, chunk_size={c} | {total:.1f} | {C.ratio(total, step[0]):.3f} | {extra:.1f} "
                     f"| {C.ratio(extra, min(c, samples) * one[1]):.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=C.SIZES, default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=C.DTYPES, default=None, help="base weights (default bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--batch", type=C.positive_int, default=4)
    ap.add_argument("--seq", type=C.positive_int, default=None, help="sequence length (default 64 small, 256 1b)")
    ap.add_argument("--steps", type=C.positive_int, default=5, help="optimizer steps per timing")
    ap.add_argument("--repeats", type=C.positive_int, default=3)
    ap.add_argument("--samples", type=C.positive_int, default=8)
    ap.add_argument("--guides", type=C.name_list(GUIDES), default=",".join(GUIDES))
    ap.add_argument("--memory-guides", type=C.name_list(GUIDES, allow_empty=True), default="meanfield,flow", help="guides whose step peak memory is measured")
    ap.add_argument("--chunks", type=C.positive_ints, default=(1, 2, 8), help="predictive chunk sizes whose peak memory is measured")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--ops", action="store_true", help="also count the aten ops a step dispatches")
    args = ap.parse_args()
    out = run(args.size, args.device, args.dtype, args.batch, args.seq, args.steps, args.repeats, args.samples, args.guides,
              not args.no_memory, args.memory_guides, args.chunks, log=lambda *a: None, ops=args.ops)
    print(f"# {args.size} Llama, LoRA r=8 on 7 projections ({out['lora_params'] / 1e6:.2f}M LoRA params), batch {out['batch']}x{out['seq']}, {out['device']}, {out['dtype']}")
    print(tables(out))
    sys.exit(1 if out["errors"] else 0)


if __name__ == "__main__":
    main()
