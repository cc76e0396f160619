"""Data-parallel helpers on ``torch.distributed`` (DDP processes launched by ``torchrun`` or HF ``accelerate``).

Every function is a no-op (or the identity) when no process group is initialised, so the library runs
unchanged in one process. Convention of the library under ``W > 1`` processes: :func:`~pyro_lora.fit`,
:func:`~pyro_lora.predict`, ``LaplaceGuide.fit`` and ``TFBGuide.search`` take the *same full data on
every rank* and each rank keeps its contiguous block of the batches (:func:`split_batches`); results
are summed or gathered across ranks, so every rank returns what one process would.

Collectives run on CUDA for the NCCL backend and on CPU otherwise; tensors are moved there and back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset


def is_distributed() -> bool:
    """``True`` inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or no process group): the one that prints and writes files."""
    return rank() == 0


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _bounds(n, even):
    """This rank's ``[start, stop)`` of ``n`` items: contiguous blocks, sizes ``n // W`` (+1 for the first
    ``n % W`` ranks unless ``even``, which drops the last ``n % W`` items so every rank has ``n // W``)."""
    w, r = world_size(), rank()
    if even:
        return r * (n // w), (r + 1) * (n // w)
    size, extra = divmod(n, w)
    start = r * size + min(r, extra)
    return start, start + size + (r < extra)


def shard(items, even: bool = False):
    """This rank's contiguous block of a sequence (list of records, of batches) or a map-style ``Dataset``.

    Blocks concatenated in rank order give back ``items`` (with ``even=True``, less its last ``n % W``),
    which is what makes :func:`gather_cat` return results in the original order.

    :param bool even: equal sizes on every rank (needed where ranks step together, as in training).
    """
    start, stop = _bounds(len(items), even)
    if isinstance(items, torch.utils.data.Dataset) and not isinstance(items, (list, tuple)):
        return Subset(items, range(start, stop))
    return items[start:stop]


class _BlockSampler:
    """Batch sampler yielding this rank's block of another batch sampler's batches (indices only: the
    other ranks' batches are never loaded or collated). Re-drawn per epoch, identically on every rank
    as long as the loader's shuffle generator is seeded alike (``pyro_lora.data.make_loader`` does)."""

    def __init__(self, batch_sampler, even):
        self.batch_sampler, self.even = batch_sampler, even

    def __iter__(self):
        return iter(shard(list(self.batch_sampler), self.even))

    def __len__(self):
        start, stop = _bounds(len(self.batch_sampler), self.even)
        return stop - start


def split_batches(data, even: bool = False):
    """This rank's contiguous block of the batches of ``data`` (a ``DataLoader`` or a list of batches).

    A ``DataLoader`` is rebuilt over the same dataset, collate function and workers with a batch sampler
    that keeps this rank's batches; other iterables must have a length. Without a process group,
    ``data`` itself.

    :param bool even: every rank gets ``len(data) // W`` batches (the last ``len(data) % W`` are dropped).
    """
    if not is_distributed():
        return data
    if even and hasattr(data, "__len__") and len(data) < world_size():
        raise ValueError(f"{len(data)} batches cannot give each of {world_size()} ranks one: use smaller batches")
    if isinstance(data, DataLoader) and data.batch_sampler is not None:
        return DataLoader(
            data.dataset, batch_sampler=_BlockSampler(data.batch_sampler, even), collate_fn=data.collate_fn,
            num_workers=data.num_workers, pin_memory=data.pin_memory,
        )
    if not hasattr(data, "__len__"):
        raise ValueError(f"under torch.distributed the data must have a length to be split across ranks, got {type(data).__name__}")
    return shard(data if isinstance(data, (list, tuple)) else list(data), even)


def _flat(tensors, device):
    return torch.cat([t.detach().reshape(-1).to(device) for t in tensors])


def _unflat_(flat, tensors):
    start = 0
    for t in tensors:
        t.copy_(flat[start : start + t.numel()].view_as(t))
        start += t.numel()


def all_reduce_(tensors: torch.Tensor | list[torch.Tensor], op: str = "sum") -> torch.Tensor | list[torch.Tensor]:
    """In-place ``all_reduce`` of a tensor or a list of tensors, one collective per dtype.

    :param str op: ``"sum"``, ``"mean"``, ``"max"`` or ``"min"``.
    :returns: ``tensors``.
    """
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    if not is_distributed():
        return tensors
    group = [tensors] if torch.is_tensor(tensors) else list(tensors)
    device = _comm_device()
    for dtype in sorted({t.dtype for t in group}, key=str):
        same = [t for t in group if t.dtype == dtype]
        flat = _flat(same, device)
        dist.all_reduce(flat, ops[op])
        if op == "mean":
            flat /= world_size()
        _unflat_(flat, same)
    return tensors


def all_reduce_gradients(params: list[torch.Tensor], loss: float | None = None) -> float | None:
    r"""Average ``.grad`` over ranks in one flattened ``all_reduce`` (DDP's rule), and the ``loss`` with it.

    A parameter keeps ``grad=None`` only where no rank produced a gradient (so AdamW skips it exactly as
    one process would); elsewhere missing gradients count as zero.

    :param params: list of tensors, in the same order on every rank.
    :param float loss: this rank's loss, averaged along (free: it rides in the same buffer).
    :returns: the rank-averaged loss (or ``None``).
    """
    if not is_distributed():
        return loss
    params = list(params)
    device = _comm_device()
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).float() for p in params]
    flags = torch.tensor([float(p.grad is not None) for p in params] + [0.0 if loss is None else float(loss)], device=device)
    flat = torch.cat([_flat(parts, device), flags]) if parts else flags
    dist.all_reduce(flat)
    flat /= world_size()
    start = 0
    for p in params:
        n = p.numel()
        p.grad = flat[start : start + n].view_as(p).to(p.device, p.dtype)
        start += n
    for p, present in zip(params, flat[start : start + len(params)].tolist()):
        if present == 0:
            p.grad = None
    return None if loss is None else flat[-1].item()


def broadcast_parameters(tensors: list[torch.Tensor], src: int = 0) -> list[torch.Tensor]:
    """Overwrite ``tensors`` (parameters, buffers) in place with rank ``src``'s values, one collective per dtype."""
    if not is_distributed():
        return tensors
    tensors = list(tensors)
    device = _comm_device()
    with torch.no_grad():
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            same = [t for t in tensors if t.dtype == dtype]
            flat = _flat(same, device)
            dist.broadcast(flat, src)
            _unflat_(flat, same)
    return tensors


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """``all_gather`` of tensors whose first dim differs across ranks, concatenated in rank order.

    :param tensor: ``[n_rank, *rest]`` (``rest`` equal on every rank).
    :returns: ``[sum_rank n_rank, *rest]`` on ``tensor``'s device, the same on every rank.
    """
    if not is_distributed():
        return tensor
    device = _comm_device()
    local = tensor.to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=device))
    sizes = [int(s) for s in sizes]
    padded = torch.cat([local, local.new_zeros(max(sizes) - local.shape[0], *local.shape[1:])])
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:n] for o, n in zip(out, sizes)]).to(tensor.device)


def seed_per_rank() -> None:
    """Give every rank its own random stream (weight noise, dropout, MC labels) from the current one.

    Draws one seed from the current generator (the same on every rank seeded alike) and reseeds with
    ``seed + rank``: deterministic given the user's seed, different across ranks.
    """
    if is_distributed():
        torch.manual_seed(int(torch.randint(2**62, ())) + rank())
