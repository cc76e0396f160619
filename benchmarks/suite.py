"""Every benchmark in one process, with the speed and memory goals as ratios measured in the same run.

Run it through ``bash benchmarks/gpu_suite.sh`` (which first provides pyro from the wheels in
``benchmarks/wheels`` where the machine lacks it, and the project from the working tree):

    bash benchmarks/gpu_suite.sh                                  # GPU: ~1B random Llama, bf16, batch 4x256
    bash benchmarks/gpu_suite.sh --out "$OUT/suite.md"            # also append the section to a file
    OMP_NUM_THREADS=1 bash benchmarks/gpu_suite.sh --size small --device cpu   # CI: the same code, ~30 s on 2 cores

It runs ``svi_step`` (a plain peft LoRA step, an SVI step of each guide, the S=8 predictive batched and
looped, the peak memory of the steps and of the predictive by chunk size), ``kfac_fit`` (with the fit's memory
over N and 2N streamed batches), ``tfb_search`` and ``save_load``, and prints one markdown section in
``benchmarks/RESULTS.md``'s format: machine, date, versions, command, the goal table, then each benchmark's
tables.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import _common as C  # noqa: I001  (first: puts the working tree's pyro_lora on the path)
import kfac_fit
import save_load
import svi_step
import tfb_search
import torch
from transformers import LlamaForCausalLM

# what each size runs: 1b is the goals' GPU shape, sized to finish well inside 8 minutes on one GPU;
# small is the CPU/CI shape (about 30 s on 2 cores, one thread)
PRESETS = {
    "1b": dict(
        batch=4, seq=256, steps=3, repeats=3, samples=8, guides="map,meanfield,meanfield_flipout,meanfield_pyro,flow,scalabl",
        kfac=dict(batch=4, seq=256, batches=4, labels=4, repeats=2, samples=8),
        tfb=dict(anchors=128, batch=16, seq=256, samples=10, repeats=2),  # >= 100: a flip tolerance of 0.01 allows one
    ),
    "small": dict(
        batch=4, seq=64, steps=2, repeats=2, samples=8, guides="map,meanfield,meanfield_flipout,meanfield_pyro,flow,scalabl",
        kfac=dict(batch=4, seq=64, batches=2, labels=4, repeats=2, samples=8),
        tfb=dict(anchors=8, batch=8, seq=32, samples=10, repeats=3),
    ),
}
BUDGET_S = {"1b": 480, "small": 60}  # the whole suite, shell included: 8 minutes on the GPU, 1 minute for CI


def goals(svi, kfac, tfb):
    """``(goal, target, measured, met, why)`` rows; ``measured`` is nan and ``met`` None where a figure is missing;
    ``met`` is None and ``why`` says what the run did not do where the figure came from a run that did not do the work
    the goal measures (a TFB search that stopped at an end of its range: no bisection), else ``why`` is None."""
    svi, kfac, tfb = svi or {}, kfac or {}, tfb or {}
    s = svi.get("samples", 8)

    def step(name):
        return svi["steps"][name]["seconds"] / svi["steps"]["plain"]["seconds"]

    # memory above the resident weights, as the predictive's goal reads it: the whole peak, the frozen base included,
    # diluted a step's growth (the flow's 1.07x above resident read 1.04x on a 1B base, and less on a larger one)
    def step_memory(name):
        return C.ratio(svi["memory"][f"svi_{name}"][1], svi["memory"]["plain_step"][1])

    def kfac_memory():
        (_, small), (_, large) = kfac["fit_memory"].items()
        return C.ratio(large[1], small[1])

    chunks = ", ".join(k[6:] for k in svi.get("memory", {}) if k.startswith("chunk_")) or "1, 2, 8"
    rows = [
        ("mean-field SVI step / plain peft LoRA step", "<= 1.10", lambda: step("meanfield"), 1.10),
        ("flow SVI step / plain peft LoRA step", "<= 1.25", lambda: step("flow"), 1.25),
        (f"S={s} predictive in one batched forward / {s} looped forwards", "<= 0.25",
         lambda: svi["predictive"]["batched"] / svi["predictive"]["looped"], 0.25),
        ("KFAC fit (MC Fisher) / one forward+backward over the same batches", "<= 1.5", lambda: kfac["fit_mc"] / kfac["forward_backward"], 1.5),
        ("TFB search: passes over the anchors (the sigma=0 reference + the anchors each candidate scored)", "<= 6",
         lambda: tfb["passes"], 6,
         lambda: tfb.get("edge") and f"degenerate search, sigma_q = {tfb['sigma_q']:.3g} after {tfb['candidates']} candidate(s), "
                                     f"no bisection ({tfb['edge']}): not the cost of a search"),
        ("SVI step peak memory above resident / plain peft LoRA step's, mean-field", "<= 1.05", lambda: step_memory("meanfield"), 1.05),
        ("SVI step peak memory above resident / plain peft LoRA step's, flow", "<= 1.05", lambda: step_memory("flow"), 1.05),
        (f"S={s} predictive memory above resident / (chunk_size x an S=1 predictive's), worst of chunk_size {chunks}", "<= 1.05",
         lambda: svi_step.chunk_bound(svi["memory"]), 1.05),
        ("KFAC fit peak memory above resident, 2N / N streamed batches" if "fit_memory" not in kfac else
         "KFAC fit peak memory above resident, {} / {} streamed batches".format(*reversed(list(kfac["fit_memory"]))),
         "<= 1.01", kfac_memory, 1.01),
    ]
    out = []
    for goal, target, measure, bound, *degenerate in rows:
        try:
            value = float(measure())
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            value = float("nan")
        why = degenerate[0]() if degenerate and not math.isnan(value) else None
        out.append((goal, target, value, None if math.isnan(value) or why else value <= bound, why or None))
    return out


def goal_table(rows) -> str:
    lines = ["| goal | target | measured | |", "|---|---|---|---|"]
    for goal, target, value, met, why in rows:
        shown = "n/a" if math.isnan(value) else f"{value:.0f}" if float(value).is_integer() and value > 2 else f"{value:.2f}"
        verdict = f"n/a: {why}" if why else "n/a" if met is None else "met" if met else "not met"
        lines.append(f"| {goal} | {target} | {shown} | {verdict} |")
    return "\n".join(lines)


def versions() -> str:
    import peft
    import pyro
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, pyro {pyro.__version__}"


def command(argv) -> str:
    cmd = os.environ.get("PYRO_LORA_SUITE_CMD") or shlex.join(["python", "benchmarks/suite.py", *argv])
    threads = os.environ.get("OMP_NUM_THREADS")
    return f"OMP_NUM_THREADS={threads} {cmd}" if threads else cmd


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    start = float(os.environ.get("PYRO_LORA_SUITE_START") or time.time())
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=PRESETS, default="1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=C.DTYPES, default=None, help="base weights (default bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--out", default=None, help="also append the markdown section to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_suite: --device cuda but torch sees no GPU; on a CPU run --size small --device cpu")
    if args.out:  # checked before minutes of device time are spent
        out = Path(args.out)
        if out.is_dir() or not out.parent.is_dir() or (out.exists() and not os.access(out, os.W_OK)):
            sys.exit(f"gpu_suite: --out {args.out} cannot be appended to (a folder, a missing folder, or read-only): "
                     "give a file in an existing folder")
    dtype = args.dtype or C.default_dtype(device)
    preset = PRESETS[args.size]
    # the Laplace evidence names every matrix it holds at its bound (hundreds at 1b); transformers' deprecations
    warnings.filterwarnings("ignore", message="LaplaceGuide evidence")
    warnings.filterwarnings("ignore", category=FutureWarning)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    timings, errors = {}, []  # a benchmark that fails is reported and the others still run: a GPU run is dear

    t = time.time()
    net = C.attempt(errors, "building the Llama", C.build_llama, LlamaForCausalLM, args.size, device, dtype)
    svi = tfb = None
    if net is not None:
        svi = C.attempt(errors, "svi_step", svi_step.run, args.size, device, dtype, preset["batch"], preset["seq"], preset["steps"],
                        preset["repeats"], preset["samples"], preset["guides"], net=net, log=log)
        timings["svi_step"] = time.time() - t
        t = time.time()
        p = preset["tfb"]
        tfb = C.attempt(errors, "tfb_search", tfb_search.run, args.size, device, dtype, p["anchors"], p["batch"], p["seq"], p["samples"],
                        repeats=p["repeats"], net=net, log=log)
        timings["tfb_search"] = time.time() - t
    del net
    C.free(device)
    t = time.time()
    p = preset["kfac"]
    kargs = kfac_fit.parser().parse_args([
        "--device", str(device), "--size", args.size, "--dtype", dtype, "--targets", "all", "--memory",
        *[x for k in ("batch", "seq", "batches", "labels", "repeats", "samples") for x in (f"--{k}", str(p[k]))],
    ])
    kfac = C.attempt(errors, "kfac_fit", kfac_fit.run, kargs, log=log)
    timings["kfac_fit"] = time.time() - t
    C.free(device)
    t = time.time()
    saved = C.attempt(errors, "save_load", save_load.run, args.size, device, dtype, repeats=2, log=log)
    timings["save_load"] = time.time() - t
    for result in (svi, kfac):
        errors += (result or {}).get("errors", [])

    rows = goals(svi, kfac, tfb)
    wall = time.time() - start
    name = C.device_name(device)
    today = datetime.date.today().isoformat()
    n_lora = (svi or {}).get("lora_params", float("nan")) / 1e6
    memory_note = (
        "peak memory is `torch.cuda.max_memory_allocated` per block" if device.type == "cuda" else
        "peak memory on the CPU is the live tensors before each block plus the peak of the allocations torch.profiler "
        "traced within it (exact, unlike sampling the resident set); the time and memory goals are the GPU's, shown here for reference"
    )
    section = "\n".join([
        f"## {today}, {name}, the GPU suite at `--size {args.size}` — `{command(argv)}`",
        "",
        f"Random {args.size} Llama ({net_shape(args.size)}), LoRA r=8 on all 7 projections ({n_lora:.2f}M LoRA parameters), "
        f"{dtype} base with float32 LoRA, batch {preset['batch']}x{preset['seq']}; {versions()}. Every ratio is within this one run; "
        f"{memory_note}. Suite wall time {wall:.0f} s (budget {BUDGET_S[args.size]} s; "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ").",
        "",
        "### Goals",
        "",
        goal_table(rows),
        "",
        f"### SVI step, S-sample predictive and peak memory (`svi_step.py`; {preset['steps']} steps x {preset['repeats']} repeats)",
        "",
        svi_step.tables(svi) if svi else "Failed (see the errors below).",
        "",
        f"### KFAC fit (`kfac_fit.py`; {kargs.batches} batches of {kargs.batch}x{kargs.seq}, {kargs.labels} classes, KFAC rank {kargs.rank})",
        "",
        kfac_fit.tables(kfac) if kfac else "Failed (see the errors below).",
        "",
        f"### TFB search (`tfb_search.py`; {preset['tfb']['anchors']} anchors x {preset['tfb']['seq']} tokens, S={preset['tfb']['samples']} "
        f"samples per candidate (the library's default is {tfb_search.TFB_SEARCH['num_samples']}), the library's search settings otherwise)",
        "",
        tfb_search.tables(tfb) if tfb else "Failed (see the errors below).",
        "",
        "### Save and load (`save_load.py`; a MAP guide, the base's digests)",
        "",
        save_load.tables(saved) if saved else "Failed (see the errors below).",
        "",
        *(["### Errors", "", *[f"- {e}" for e in errors], ""] if errors else []),
    ])
    print("\n" + section, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + section)
        print(f"(appended to {args.out})")
    if wall > BUDGET_S[args.size]:
        print(f"gpu_suite: took {wall:.0f} s, over the {BUDGET_S[args.size]} s budget", file=sys.stderr)
    if errors:
        sys.exit(f"gpu_suite: {len(errors)} measurement(s) failed: " + "; ".join(errors))


def net_shape(size) -> str:
    s = SimpleNamespace(**C.SIZES[size])
    return f"{s.num_hidden_layers} layers, d={s.hidden_size}, MLP {s.intermediate_size}, vocab {s.vocab_size}"


if __name__ == "__main__":
    main()
