"""Cost of the TFB sigma_q search against one plain forward pass over the anchors, in the same process.

A small random Llama (LoRA r=8 on all 7 projections, B random so the adapter is not at zero), letter
multiple choice over 4 answers, the library's search settings (``TFB_SEARCH``) unless given, but S=10 samples per
candidate (``--samples``; the library's default is 4, the goal's figures were taken at 10). The search makes the
sigma=0 reference pass and, per candidate, ``num_samples`` rows for each anchor it scores (under ``"flip"`` an
infeasible candidate stops once its flips pass the tolerance): the passes counted are the anchors scored over the
anchor count. The ratio to a plain forward shows what the batched S-sample forward costs against those rows. A search
that ended at an end of its range (``high`` already feasible, or ``low`` infeasible: ``sigma_q = 0``) did no bisection:
its figures are marked degenerate, not a search's cost. CPU by default.

    python benchmarks/tfb_search.py                    # CPU, small
    python benchmarks/tfb_search.py --device cuda --size 1b --anchors 500
"""

import argparse
import statistics
import time

import _common as C  # noqa: I001  (first: puts the working tree's pyro_lora on the path)
import torch
from transformers import LlamaForCausalLM

from pyro_lora import LoraModel, MultipleChoice
from pyro_lora.guides.tfb import TFB_SEARCH, TFBGuide


def timed_once(fn, device):
    C.sync(device)
    t = time.perf_counter()
    out = fn()
    C.sync(device)
    return time.perf_counter() - t, out


def run(size="small", device="cpu", dtype=None, anchors=128, batch=16, seq=64, samples=10, iterations=TFB_SEARCH["iterations"],
        criterion=TFB_SEARCH["criterion"], tolerance=TFB_SEARCH["tolerance"], repeats=3, net=None, log=print):
    """Measure; returns a dict of figures that :func:`tables` prints. ``net``: a LoRA Llama to reuse (else one is built)."""
    device = torch.device(device)
    dtype = dtype or C.default_dtype(device)
    net = (net if net is not None else C.build_llama(LlamaForCausalLM, size, device, dtype)).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(0, anchors, batch):
        n = min(batch, anchors - i)
        ids = torch.randint(1, net.config.vocab_size, (n, seq), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "choice_mask": torch.ones(n, 4, dtype=torch.bool)})
    model = LoraModel(net, MultipleChoice(answer_token_ids=[5, 6, 7, 8]), random="AB")
    on_device = [{k: v.to(device) for k, v in b.items()} for b in batches]

    def plain_pass():
        with torch.no_grad():
            return [model.logits(b) for b in on_device]

    plain_pass()  # warm-up
    forward = statistics.median(timed_once(plain_pass, device)[0] for _ in range(repeats))
    build_s, guide = timed_once(lambda: TFBGuide(model), device)
    search_s, trace = timed_once(
        lambda: guide.search(batches, criterion=criterion, tolerance=tolerance, iterations=iterations, num_samples=samples, progress=False),
        device,
    )
    scored = sum(t["anchors"] for t in trace) / anchors  # candidate passes: a stopped candidate scored part of one
    out = {
        "device": str(device), "dtype": dtype, "size": size, "anchors": anchors, "batch": batch, "seq": seq, "samples": samples,
        "criterion": criterion, "tolerance": tolerance, "iterations": iterations, "candidates": len(trace),
        "passes": 1 + scored,  # the sigma = 0 reference, then what the candidates scored
        "rows": 1 + samples * scored,  # forward rows per anchor, in plain-forward units
        "build": build_s, "forward": forward, "search": search_s, "sigma_q": float(guide.sigma_q),
        "trace": ", ".join(f"{t['sigma']:.4g}:{'ok' if t['feasible'] else 'x'}" for t in trace),
        # where the search ended at an end of its range (high already feasible, or low infeasible: sigma_q = 0) it
        # gave up without bisecting: its passes measure no search, and the suite's goal row says so
        "edge": guide.search_edge,
        # the search's own warnings (too few anchors for the tolerance, an end of the range): the table shows them
        "note": guide.search_note,
    }
    log(f"# tfb_search: {size} Llama, {anchors} anchors x {seq} tokens, S={samples}: {out['passes']:.3g} anchor passes, search {search_s:.2f} s, "
        f"plain forward {forward:.3f} s")
    return out


def tables(out) -> str:
    return "\n".join([
        f"sigma_q = {out['sigma_q']:.6g} ({out['criterion']}, tolerance {out['tolerance']}); trace: {out['trace']}"
        + (f"; degenerate search, no bisection: {out['edge']}" if out.get("edge") else "")
        + (f"; the search said: {out['note']}" if out.get("note") else ""),
        "",
        "| device | anchors | S | candidates | anchor passes | forward rows / anchor | SVD build s | plain forward s | search s | search / forward |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {torch.device(out['device']).type} | {out['anchors']} | {out['samples']} | {out['candidates']} | {out['passes']:.3g} | {out['rows']:.3g} | "
        f"{out['build']:.3f} | {out['forward']:.3f} | {out['search']:.2f} | {out['search'] / out['forward']:.1f} |",
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=C.SIZES, default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=C.DTYPES, default=None, help="base weights (default bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--anchors", type=C.positive_int, default=128)
    ap.add_argument("--batch", type=C.positive_int, default=16)
    ap.add_argument("--seq", type=C.positive_int, default=64)
    ap.add_argument("--samples", type=C.positive_int, default=10)
    ap.add_argument("--iterations", type=C.positive_int, default=TFB_SEARCH["iterations"])
    ap.add_argument("--criterion", default=TFB_SEARCH["criterion"])
    ap.add_argument("--tolerance", type=float, default=TFB_SEARCH["tolerance"])
    ap.add_argument("--repeats", type=C.positive_int, default=3, help="plain-forward timings (median)")
    args = ap.parse_args()
    out = run(args.size, args.device, args.dtype, args.anchors, args.batch, args.seq, args.samples, args.iterations, args.criterion,
              args.tolerance, args.repeats, log=lambda *a: None)
    print(f"# {args.size} Llama, LoRA r=8 on 7 projections, {args.anchors} anchors x {args.seq} tokens, batch {args.batch}, {out['device']}, {out['dtype']}")
    print(tables(out))


if __name__ == "__main__":
    main()
