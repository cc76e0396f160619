"""What the benchmark scripts share: the project import from the working tree, the random Llama, timing, peak memory.

Importing this module makes ``pyro_lora`` and ``pyro_lora.guides`` importable from the working tree even where
the project is not installed (a fresh GPU machine): the repository root goes on ``sys.path``, and since
``guides/`` becomes ``pyro_lora.guides`` only through setup.cfg's ``package_dir`` (which an install applies),
``pyro_lora.guides`` is loaded from ``<root>/guides`` when no installed mapping provides it.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_project():
    """Import ``pyro_lora`` and ``pyro_lora.guides``, from the working tree when the project is not installed."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    pyro_lora = importlib.import_module("pyro_lora")
    if "pyro_lora.guides" in sys.modules:
        return pyro_lora
    try:
        importlib.import_module("pyro_lora.guides")  # installed (editable or not): setup.cfg's mapping
    except ModuleNotFoundError as e:
        if e.name != "pyro_lora.guides":
            raise  # a dependency of the guides is missing: say so, do not hide it behind the fallback
        init = ROOT / "guides" / "__init__.py"
        spec = importlib.util.spec_from_file_location("pyro_lora.guides", init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["pyro_lora.guides"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["pyro_lora.guides"]
            raise
        pyro_lora.guides = module
    return pyro_lora


import_project()

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

# random Llama-architecture configs: "small" for CPUs and CI, "1b" the TinyLlama-1.1B shape (22 layers, d=2048)
SIZES = {
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=2048),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def positive_int(text: str) -> int:
    """argparse ``type`` of a count (``--repeats``, ``--steps``, ``--batch``...): an int >= 1. Zero or a negative
    count crashed later (a median of no timings, a division by zero steps) or printed a nonsense row; argparse now
    refuses it with a usage message naming the argument."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer: give a count >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count >= 1: give a positive integer")
    return value


def positive_ints(text: str) -> tuple:
    """argparse ``type`` of a comma-separated list of counts (``--chunks 1,2,8``): a tuple of ints >= 1."""
    return tuple(positive_int(c) for c in text.split(","))


def name_list(choices, allow_empty=False):
    """argparse ``type`` of a comma-separated list of names from ``choices`` (kept as the string given); an unknown
    name is refused with the known ones, instead of a ``KeyError`` after the model is built. ``allow_empty``: empty
    items (``""``: none at all) pass."""
    known = list(choices)

    def parse(text: str) -> str:
        bad = [n for n in text.split(",") if n not in known and not (allow_empty and n == "")]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown name(s) {', '.join(map(repr, bad))} in {text!r}: choose from {', '.join(known)}")
        return text

    return parse


def default_dtype(device) -> str:
    """bf16 on a GPU, fp32 on the CPU (where bf16 matmuls are slow and the goals are not checked)."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def build_llama(cls, size="small", device="cpu", dtype="fp32", targets=TARGETS, r=8, task_type=None, b_std=0.01, **config):
    """A random ``cls`` (``LlamaForCausalLM`` / ``LlamaForSequenceClassification``) with LoRA ``r`` on ``targets``.

    The base is built on ``device`` directly (no 1B-parameter init on the CPU) and cast to ``dtype``; peft's
    adapter weights stay float32, as with a real bf16 checkpoint. B is drawn ``N(0, b_std^2)``, so the
    adapter is not at zero (a trained-looking adapter: Laplace and TFB need ``B != 0``).
    """
    torch.manual_seed(0)
    settings = {**SIZES[size], "max_position_embeddings": 4096, "pad_token_id": 0, **config}
    with torch.device(device):
        net = cls(LlamaConfig(**settings))
    net = net.to(DTYPES[dtype])
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), task_type=task_type)
    net = get_peft_model(net, lora)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, b_std)
    return net


def lora_parameters(net) -> int:
    return sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup=1):
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs (the GPU synchronised around each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ops_per_step(steps_of, steps=2) -> float:
    """The aten ops a step dispatches (each one kernel launch or more on a GPU, where a small step is bound by launching
    them): those of ``steps_of(2 * steps)()`` less those of ``steps_of(steps)()``, over ``steps``, so that a call's fixed
    ops cancel; counted, not timed, so exact on any device. ``steps_of(k)``: a runner of ``k`` steps, run once before
    it is counted (lazily built state). Counted: each aten op not called by another (a backward node's too)."""
    counts = []
    for k in (steps, 2 * steps):
        run = steps_of(k)
        run()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
        counts.append(sum(1 for e in prof.events() if e.name.startswith("aten::")
                          and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))))
    return (counts[1] - counts[0]) / steps


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"CPU ({cpu}; {n} thread{'' if n == 1 else 's'})"


# ------------------------------------------------------------------ peak memory


def free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _live_tensor_bytes() -> int:
    """Bytes of the CPU storages of every live tensor Python can see (each storage once)."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not issubclass(type(obj), torch.Tensor) or obj.device.type != "cpu" or obj.is_meta:  # type(): no __class__ lookups
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001  (tensor subclasses without a storage)
            continue
        key = storage.data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _cpu_block_peak(fn) -> int | None:
    """Peak of the bytes allocated minus freed by the CPU allocator within ``fn()``, from torch.profiler's trace
    of every allocation (exact, not sampled); ``None`` where this torch's profiler does not give it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        events.sort(key=lambda e: e.start_ns())
    except Exception:  # noqa: BLE001  (a private profiler API: report n/a rather than fail the suite)
        return None
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak if events else None


def peak_memory(fn, device):
    """``(peak MiB, peak MiB above what was allocated before)`` of running ``fn()`` once.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset, against ``memory_allocated`` before. CPU: the live
    tensors before (every storage Python can reach) plus the peak of the allocations the profiler traced within
    the block (exact for a model this size, where sampling the resident set is too coarse); ``(nan, nan)``
    where the profiler does not give it.
    """
    device = torch.device(device)
    free(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak / 2**20, (peak - before) / 2**20
    before = _live_tensor_bytes()
    extra = _cpu_block_peak(fn)
    if extra is None:
        return float("nan"), float("nan")
    return (before + extra) / 2**20, extra / 2**20


def ratio(a, b):
    return a / b if b else float("nan")


def attempt(errors: list, label: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or ``None`` with the failure appended to ``errors`` (its traceback on stderr): one
    failing measurement must not cost a GPU run the others."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        errors.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        return None
