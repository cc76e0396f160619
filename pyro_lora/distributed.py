"""Data-parallel helpers on ``torch.distributed`` (DDP processes launched by ``torchrun`` or HF ``accelerate``).

Every function is a no-op (or the identity) when no process group is initialised, so the library runs
unchanged in one process. Convention of the library under ``W > 1`` processes: :func:`~pyro_lora.fit`,
:func:`~pyro_lora.predict`, ``LaplaceGuide.fit`` and ``TFBGuide.search`` take the *same full data on
every rank* and each rank keeps its contiguous block of the batches (:func:`split_batches`); results
are summed or gathered across ranks, so every rank returns what one process would.

Collectives run on CUDA for the NCCL backend and on CPU otherwise; tensors are moved there and back.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import numbers
import pickle
import warnings
import zlib
from collections.abc import Mapping, Sequence, Set

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, Subset

from .checks import check_batches
from .callers import user_stacklevel


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


def check_not_wrapped(net) -> None:
    """Refuse a network (or a part of it) wrapped for data parallelism: ``DistributedDataParallel``, ``DataParallel``,
    FSDP. This library averages the gradients across ranks itself, each rank weighted by its step's examples; DDP's
    hooks would average them first, equally (a rank's short last batch weighed as a full one: a head 0.07 off one
    process), and FSDP shards the parameters the sites hand weights to.

    :raises ValueError: naming the wrapper and what to pass instead.
    """
    from torch.distributed import fsdp

    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel, fsdp.FullyShardedDataParallel,
                *((fsdp.FSDPModule,) if hasattr(fsdp, "FSDPModule") else ()))
    wrapped = [f"{name or 'the network'} ({type(m).__name__})" for name, m in net.named_modules() if isinstance(m, wrappers)]
    if wrapped:
        raise ValueError(f"{wrapped[0]} is wrapped for data parallelism: pyro_lora averages the gradients across ranks itself "
                         "(each rank weighted by its step's examples), so pass the unwrapped network (ddp.module) and the "
                         "same full data on every rank (docs/distributed.md)")


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
    """(Batch) sampler yielding this rank's block of another (batch) sampler's items, indices only: the other ranks'
    batches are never loaded or collated. Re-drawn per epoch as rank 0 draws it (its indices are broadcast): a
    shuffling loader whose generator differs across ranks would otherwise give overlapping blocks. Each rank's own draw
    must hold rank 0's items in some order (unless the sampler draws a random part: :func:`_draws_part`): a sampler
    that shards by hand, which no attribute shows, would otherwise leave the other ranks' parts unread."""

    def __init__(self, batch_sampler, even):
        self.batch_sampler, self.even = batch_sampler, even

    def __iter__(self):
        drawn, items = _draw(self.batch_sampler)
        if not _draws_part(getattr(self.batch_sampler, "sampler", self.batch_sampler)):
            check_same(sorted(items, key=lambda i: (0, i, "") if isinstance(i, int) else (1, 0, repr(i))),
                       "items to draw batches from (their sampler's indices, in any order)",
                       "each rank's sampler must draw the whole data (pyro_lora gives each rank its block of rank 0's "
                       "batches); do not shard it by hand, and seed a sampler that draws a random part alike on every rank")
        return iter(shard(broadcast_object(drawn), self.even))

    def __len__(self):
        start, stop = _bounds(len(self.batch_sampler), self.even)
        return stop - start


def _draw(batch_sampler) -> tuple[list, list]:
    """One pass of a (batch) sampler: its batches (or items), and every item its sampler drew, in order. A torch
    ``BatchSampler``'s items are its sampler's whole order, before ``drop_last`` drops the remainder (a shuffle per
    rank drops other items on each), so it is batched here as its ``__iter__`` batches it."""
    if type(batch_sampler).__iter__ is BatchSampler.__iter__:
        order, size = list(batch_sampler.sampler), batch_sampler.batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        if batch_sampler.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        return batches, order
    drawn = list(batch_sampler)
    return drawn, [i for b in drawn for i in (b if isinstance(b, (list, tuple)) else [b])]


def _draws_part(sampler) -> bool:
    """Whether ``sampler`` draws a random part of its data, another on each rank unless its generator is seeded alike:
    torch's samplers with ``replacement`` (``WeightedRandomSampler``'s default), or of ``num_samples`` other than the
    data's length."""
    if getattr(sampler, "replacement", False):
        return True
    # RandomSampler's data, or WeightedRandomSampler's weights (one per item)
    source = getattr(sampler, "data_source", getattr(sampler, "weights", None))
    return isinstance(getattr(sampler, "num_samples", None), int) and source is not None and \
        sampler.num_samples != _length(source)


def broadcast_object(obj):
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself without a process group."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# float dtypes whose -0.0 is read as 0.0 (float8 has no addition)
_SIGNED_ZERO = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128}


def _digest(value, crc: int = 0, depth: int = 0) -> int:
    """A CRC-32 of a batch (or record), the same on two ranks where they hold equal values: tensors' and numeric
    arrays' dtypes, shapes and bytes (-0.0 read as 0.0), mappings by key, sequences item by item, sets order-free,
    numbers and strings by value, other objects by their attributes (a dataclass); of an object without any (or
    nested deeper than 8) only its type: its repr may hold its address, and Python's ``hash`` differs across
    processes."""
    crc = zlib.crc32(type(value).__name__.encode(), crc)
    if depth > 8:
        return crc
    if isinstance(value, (str, bytes, bytearray, numbers.Number, np.generic, datetime.date, datetime.time,
                          datetime.timedelta)) or value is None:
        return zlib.crc32(repr(value + 0 if isinstance(value, float) else value).encode(), crc)
    if isinstance(value, Mapping):
        for key in sorted(value, key=repr):
            crc = _digest(value[key], _digest(key, crc, depth + 1), depth + 1)
        return crc
    if isinstance(value, (Set, frozenset)):
        return zlib.crc32(repr(sorted(_digest(v, 0, depth + 1) for v in value)).encode(), crc)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc" or value.dtype.itemsize > 8:  # strings, dates, records, long double
            return _digest(value.tolist(), zlib.crc32(str(value.shape).encode(), crc), depth + 1)
        value = torch.from_numpy(np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("=")))
    if torch.is_tensor(value):
        if value.is_nested:
            return _digest(list(value.unbind()), crc, depth + 1)
        flat = (value.to_dense() if value.layout != torch.strided else value).detach().cpu().contiguous().reshape(-1)
        flat = flat + 0 if flat.dtype in _SIGNED_ZERO else flat  # -0.0 + 0 = 0.0
        crc = zlib.crc32(f"{flat.dtype}{tuple(value.shape)}".encode(), crc)
        return zlib.crc32(flat.view(torch.uint8).numpy(), crc)
    if isinstance(value, (Sequence, collections.deque)):
        for item in value:
            crc = _digest(item, crc, depth + 1)
        return zlib.crc32(str(len(value)).encode(), crc)
    attributes = getattr(value, "__dict__", None)
    return _digest(attributes, crc, depth + 1) if isinstance(attributes, dict) and attributes else crc


def _fail_together(error, what: str):
    """Raise on every rank once all know that one failed to ``what``: a ``ValueError`` on each (the failing rank's
    chained from its own error), so that a ``refused_together`` block around the call sees every rank refuse."""
    if error is None:
        raise ValueError(f"another rank failed to {what} (its error is raised there)")
    if isinstance(error, ValueError):
        raise error
    raise ValueError(f"this rank failed to {what}: {type(error).__name__}: {error}") from error


def same_data(items, what: str = "batch", length=None) -> list:
    """``items`` (batches, or a loader's records) in rank 0's order, refusing ranks whose items differ: each rank keeps
    its block of the data it is given, so data sharded by hand or drawn per rank would score some examples twice and
    others never. The same items in another order (a list shuffled with each rank's own stream, e.g. inside ``fit``,
    where each rank draws from a stream of its own) are put in rank 0's order, as a ``DataLoader`` is drawn.

    A rank that fails to read its items (or ``length()``, their stated number) fails every rank: the others would
    wait for it in the next collective.

    :raises ValueError: on every rank, where the ranks hold different items (not only in another order), or another
        number of them than ``length()`` states, or where reading them failed on some rank (there chained from its
        own error).
    """
    plural = what + ("es" if what.endswith("ch") else "s")
    error = None
    try:
        items = list(items)
        stated = len(items) if length is None else length()
        try:
            digests = [_digest(item) for item in items]
        except Exception as e:  # an odd value _digest cannot read: one sentence, raised on every rank alike
            raise ValueError(f"cannot compare the {plural} across ranks: {type(e).__name__}: {e}") from e
    except Exception as e:  # raised below, after the other ranks have heard of it
        items, digests, stated, error = [], [], 0, e
    low, high = spread(torch.tensor([float(error is not None), len(items), stated], dtype=torch.float64))
    if high[0] > 0:
        _fail_together(error, f"read its {plural}")
    if low[1] != high[1]:
        raise ValueError(f"the ranks were given {int(low[1])} to {int(high[1])} {plural}: every rank must be given the "
                         "same full data (each keeps its block of it)")
    if low[2] != high[2] or stated != len(items):
        raise ValueError(f"the data yielded {len(items)} {plural} where its len() says {int(low[2])} to {int(high[2])}")
    if not items:  # empty on every rank: nothing to compare (and no empty collective)
        return items
    low, high = spread(torch.tensor(digests, dtype=torch.float64))  # < 2^32: exact in float64
    if torch.equal(low, high):
        return items
    low, high = spread(torch.tensor(sorted(digests), dtype=torch.float64))
    if bool((low != high).any()):
        # counted against rank 0's as multisets: the sorted lists shift at the first difference, and every position after
        # it differed (one flipped label read as "3 of 3")
        unmatched = collections.Counter(digests) - collections.Counter(broadcast_object(digests))
        most = int(spread(torch.tensor([float(sum(unmatched.values()))], dtype=torch.float64))[1][0])
        raise ValueError(f"the ranks hold different {plural} ({most} of {len(items)} differ from rank 0's, not only in order): "
                         "every rank must be given the same full data (each keeps its block of it); do not shard it by "
                         "hand, nor shuffle examples into batches with a stream of each rank's own (pass a DataLoader, "
                         "drawn as rank 0 draws it, or a list)")
    at = {}
    for i, d in enumerate(digests):
        at.setdefault(d, []).append(i)
    return [items[at[d].pop()] for d in broadcast_object(digests)]


class _Blocks:
    """This rank's block of a re-iterable's batches, read again on each pass: an iterable that orders its batches
    anew per pass (per epoch of ``fit``) keeps doing so, as in one process (in rank 0's order)."""

    def __init__(self, data, even, size):
        self.data, self.even, self.size = data, even, size

    def __iter__(self):
        return iter(shard(same_data(self.data, length=lambda: len(self.data)), self.even))

    def __len__(self):
        start, stop = _bounds(self.size, self.even)
        return stop - start


def split_batches(data, even: bool = False):
    """This rank's contiguous block of the batches of ``data`` (a ``DataLoader`` or a list of batches).

    A ``DataLoader`` is rebuilt over the same dataset, collate function and workers with a batch sampler
    that keeps this rank's batches; other iterables must have a length, and are read again on each pass. Without a
    process group, ``data`` itself.

    :param bool even: every rank gets ``len(data) // W`` batches (the last ``len(data) % W`` are dropped).
    :raises ValueError: for one batch (a dict) instead of batches, data that differ across ranks (a list's batches, a loader's list of records; in number
        for any data), a ``DataLoader`` that already shards or whose dataset differs across ranks (sharded by hand:
        :func:`check_unsharded`), or one over an ``IterableDataset``.
    """
    check_batches(data)
    if not is_distributed():
        return data
    check_unsharded(data, "splits the batches across ranks itself (each rank would see 1/W of its part)")
    if isinstance(data, DataLoader) and isinstance(data.dataset, IterableDataset):
        raise ValueError("under torch.distributed a DataLoader over an IterableDataset cannot be split into blocks of "
                         "batches: pass a map-style Dataset, or a list of batches (the same on every rank)")
    if not hasattr(data, "__len__"):
        raise ValueError(f"under torch.distributed the data must have a length to be split across ranks, got {type(data).__name__}")
    try:  # a len() that fails on one rank must fail every rank, not leave the others waiting in spread()
        size, error = len(data), None
    except Exception as e:
        size, error = 0, e
    low, high = spread(torch.tensor([float(error is not None), size], dtype=torch.float64))
    if high[0] > 0:
        _fail_together(error, "give its data's length")
    fewest, most = int(low[1]), int(high[1])
    if fewest != most:
        raise ValueError(f"the ranks were given {fewest} to {most} batches: every rank must be given the same "
                         "full data (each keeps its block of it)")
    if even and size < world_size():
        raise ValueError(f"{size} batches cannot give each of {world_size()} ranks one: use smaller batches")
    if even and size % world_size() and is_main():  # every rank must take as many optimizer steps
        warnings.warn(f"{size} batches over {world_size()} ranks: each rank trains on {size // world_size()} per epoch, "
                      f"and the last {size % world_size()} of each epoch's order are never trained on (a list's, or an "
                      f"unshuffled DataLoader's, always the same examples); give a number of batches divisible by "
                      f"{world_size()} (the batch size, or drop_last)", stacklevel=user_stacklevel())
    if isinstance(data, DataLoader):
        # records in memory are cheap to compare (rank 0's indices must name the same records everywhere)
        dataset = same_data(data.dataset, "record") if isinstance(data.dataset, (list, tuple)) else data.dataset
        options = {k: getattr(data, k) for k in _LOADER_OPTIONS if hasattr(data, k)}  # workers' init, generator, ...
        if data.batch_sampler is None:  # batch_size=None: the dataset's items are the batches, drawn by the sampler
            return DataLoader(dataset, batch_size=None, sampler=_BlockSampler(data.sampler, even), **options)
        return DataLoader(dataset, batch_sampler=_BlockSampler(data.batch_sampler, even), **options)
    if isinstance(data, (list, tuple)):
        return shard(same_data(data), even)
    return _Blocks(data, even, size)


# what a DataLoader is built with besides its dataset and sampling: kept when it is rebuilt over this rank's block
_LOADER_OPTIONS = ("collate_fn", "num_workers", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                   "generator", "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order")

# samplers and loaders that already give each rank its part: torch's, and those accelerate's prepare() makes
_SHARDING = {"DistributedSampler", "BatchSamplerShard", "DataLoaderShard", "DataLoaderDispatcher", "IterableDatasetShard"}


def _shards(x) -> bool:
    return any(c.__name__ in _SHARDING for c in type(x).__mro__)


def check_unsharded(data, why: str) -> None:
    """Refuse data that gives each rank a part of it, where the library ``why`` (it splits the batches itself, or needs
    the whole data on every rank): a ``DataLoader`` with a ``DistributedSampler`` or prepared by accelerate, and ranks
    given other data (:func:`_identity`: a map-style dataset sharded by hand, ``Subset(ds, range(rank, N, W))``, a
    Hugging Face ``.shard()`` or a ``SubsetRandomSampler`` over part of it, would be split again, each rank seeing
    ``1/W`` of its part). A collective: every rank calls it."""
    try:
        check_same(_identity(data), "data", f"pyro_lora {why}: pass the whole dataset, the same on every rank (do not "
                   "shard it by hand)")
    except ValueError as error:
        if "._fingerprint: " not in str(error):
            raise
        # datasets gives a transform it cannot hash (pickle) a random fingerprint, another in each process
        raise ValueError(f"{error}; if the ranks did load the same data, a .map or .filter whose function cannot be "
                         "hashed gave each rank a random fingerprint (datasets warns 'couldn't be hashed properly'): pass "
                         "new_fingerprint='...' to that call, or save_to_disk the dataset once and load_from_disk it on "
                         "every rank") from None
    if not isinstance(data, DataLoader):
        return
    sampler = getattr(data.batch_sampler, "sampler", data.sampler)
    sharding = [type(x).__name__ for x in (data, data.batch_sampler, sampler, data.sampler) if _shards(x)]
    if sharding:
        raise ValueError(f"the DataLoader already gives each rank a part of the data ({sharding[0]}: a DistributedSampler, "
                         f"or accelerate's prepare), and pyro_lora {why}: pass a plain loader over the whole data, the "
                         "same on every rank (shuffle=True is fine)")


def _identity(data) -> dict:
    """What tells ``data`` from a part of it without reading an item (a random augmentation would differ across ranks),
    by name: its type and, for a ``DataLoader``, its dataset's type and ``len()``, a torch ``Subset``'s indices (a CRC-32)
    and what it subsets, a Hugging Face dataset's ``_fingerprint``, and what its sampler and batch sampler select (their
    type, ``len()``, ``indices`` and ``weights``: a ``SubsetRandomSampler(range(rank, N, W))`` shards the whole dataset).
    Lists of batches or records are compared by value later (:func:`same_data`)."""
    identity = {"type(data)": type(data).__name__}
    if not isinstance(data, DataLoader):
        return identity
    dataset, path = data.dataset, "dataset"
    while dataset is not None and not isinstance(dataset, (list, tuple)):
        identity[f"type({path})"] = type(dataset).__name__
        identity[f"len({path})"] = _length(dataset)
        fingerprint = getattr(dataset, "_fingerprint", None)
        if isinstance(fingerprint, str):
            identity[f"{path}._fingerprint"] = fingerprint
        if not isinstance(dataset, Subset):
            break
        identity[f"{path}.indices"] = _crc(dataset.indices, np.int64)
        dataset, path = dataset.dataset, f"{path}.dataset"
    seen = set()
    samplers = {"sampler": data.sampler, "batch_sampler": data.batch_sampler,
                "batch_sampler.sampler": getattr(data.batch_sampler, "sampler", None)}
    for path, sampler in samplers.items():
        if sampler is None or id(sampler) in seen:  # the batch sampler's sampler is most often the loader's
            continue
        seen.add(id(sampler))
        identity[f"type({path})"] = type(sampler).__name__
        if _shards(sampler):  # its part differs by rank by design: refused by name in check_unsharded
            continue
        identity[f"len({path})"] = _length(sampler)
        for name, dtype in (("indices", np.int64), ("weights", np.float64)):  # WeightedRandomSampler's weights
            if getattr(sampler, name, None) is not None:
                identity[f"{path}.{name}"] = _crc(getattr(sampler, name), dtype)
    return identity


def _length(x):
    try:
        return len(x)
    except Exception as e:  # compared like a length: failing on one rank only is a difference
        return f"raises {type(e).__name__}"


def _crc(values, dtype) -> str:
    """A CRC-32 of a sequence of numbers (a list, range, array or tensor alike) or, where it is not one, of its value."""
    values = values.cpu() if torch.is_tensor(values) else values
    try:
        values = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError):
        pass
    return f"CRC-32 {_digest(values):08x}"


def check_same(value, what: str, advice: str = "give every rank the same", compared=lambda v: v) -> None:
    """Refuse, on every rank alike, a ``value`` (a path, a setting; a mapping's entries one by one) that differs across
    ranks. Values are compared by :func:`_digest` of ``compared(value)`` (by value and type) and named by their own
    ``repr``: rank 0's and each other rank's that differs, for the first 4 entries that differ. A collective: every rank
    calls it.

    :raises ValueError: ``the ranks were given different {what} (...): {advice}``.
    """
    if not is_distributed():
        return
    named = value if isinstance(value, Mapping) else {None: value}
    said = [None] * world_size()
    dist.all_gather_object(said, {key: (_digest(compared(v)), _shown(v)) for key, v in named.items()})
    absent = (None, "nothing")
    differ = []
    for key in dict.fromkeys(k for held in said for k in held):  # a key some ranks lack differs too
        first = said[0].get(key, absent)
        others = [(r, held.get(key, absent)[1]) for r, held in enumerate(said) if held.get(key, absent)[0] != first[0]]
        if others:
            listed = ", ".join(f"{shown} on rank {r}" for r, shown in [(0, first[1]), *others[:3]])
            listed += f" and {len(others) - 3} more ranks" if len(others) > 3 else ""
            differ.append(listed if key is None else f"{key}: {listed}")
    if differ:  # the first few: a per-site prior per rank differs at every site
        listed = "; ".join(differ[:4]) + (f"; and {len(differ) - 4} more" if len(differ) > 4 else "")
        raise ValueError(f"the ranks were given different {what} ({listed}): {advice}")


def check_settings(action: str, settings: Mapping) -> None:
    """Refuse, on every rank at once and before any work, ``settings`` of a collective ``action`` (a search, a
    predictive: every rank scores the whole data, or sums its block's, and must return what one process would) that
    differ across ranks: a grid, a method, a seed per rank (the DDP habit ``seed + rank``) would give each rank its own
    result, or leave the ranks in other collectives. Call it first, before any check that may refuse on one rank only.
    A collective: every rank calls it (:func:`check_same`, by value, one number however typed: :func:`_setting`;
    a callable counts as its type).

    :raises ValueError: ``the ranks were given different settings of {action} ({name}: {rank 0's} on rank 0, {other}
        on rank {r})``, on every rank.
    """
    check_same(settings, f"settings of {action}", "give every rank the same settings (not a seed, grid or bound per "
               "rank): every rank runs it on the same whole data and must reach one process's result", _setting)


def _setting(value):
    """A setting as the calls read it: a number (Python's, numpy's, a 0-dim tensor, a bool) as a float, and a sequence,
    an array or a tensor as a list of them, so that ranks handed ``8`` and ``8.0``, or one grid as a list and as a
    tensor, agree; anything else as it is."""
    if torch.is_tensor(value) or isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_setting(v) for v in value]
    return value


def _shown(value, width: int = 80) -> str:
    """``repr(value)``, its middle elided past ``width`` characters: paths differing by rank differ at their end."""
    text = repr(value)
    return text if len(text) <= width else text[: width // 2 - 2] + "..." + text[-(width - width // 2 - 1):]


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
    :raises ValueError: on every rank, where the ranks give tensors of other dtypes or shapes (gloo summed another
        rank's bytes read as this rank's dtype, or reshaped them, without an error).
    """
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    group = [tensors] if torch.is_tensor(tensors) else list(tensors)
    if op == "mean" and not all(t.is_floating_point() for t in group):
        raise ValueError("all_reduce_(op='mean') needs floating-point tensors: an integer tensor cannot hold the mean")
    if not is_distributed():
        return tensors
    device = _comm_device()
    layout = [(str(t.dtype), tuple(t.shape)) for t in group]
    code = torch.tensor([_layout_code(layout)], device=device)
    codes = [torch.zeros_like(code) for _ in range(world_size())]
    dist.all_gather(codes, code)
    _check_layouts(codes, layout, "all_reduce_", "tensors")
    for dtype in sorted({t.dtype for t in group}, key=str):
        same = [t for t in group if t.dtype == dtype]
        flat = _flat(same, device)
        dist.all_reduce(flat, ops[op])
        if op == "mean":
            flat /= world_size()
        _unflat_(flat, same)
    return tensors


def _layout_code(layout) -> int:
    """A checksum of ``[(dtype, shape), ...]``, compared across ranks before a collective over those tensors."""
    return zlib.crc32(repr(layout).encode())


def _check_layouts(codes, layout, who: str, what: str) -> None:
    """Refuse, on every rank, where the ranks' ``codes`` (:func:`_layout_code` of each rank's ``layout``) differ;
    the layouts are then gathered to name them (every rank takes this branch: no rank waits alone)."""
    if len({int(c) for c in codes}) == 1:
        return
    layouts = [None] * world_size()
    dist.all_gather_object(layouts, layout)
    shown = "; ".join(f"rank {r}: {', '.join(f'{d} {list(s)}' for d, s in l)}" for r, l in enumerate(layouts))
    raise ValueError(f"{who}: the ranks give tensors of other dtypes or shapes ({what}): {shown}; a collective over them "
                     "reads one rank's bytes as another's: give every rank tensors of one dtype and shape")


def spread(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and the largest of ``values`` over the ranks, elementwise, in one ``all_reduce`` (``values``
    itself twice without a process group): equal where every rank holds the same."""
    both = all_reduce_(torch.cat([values.reshape(-1), -values.reshape(-1)]), op="max")
    n = values.numel()
    return -both[n:].view_as(values), both[:n].view_as(values)


def all_reduce_gradients(params: list[torch.Tensor], loss: float | None = None, weight: float = 1.0) -> float | None:
    r"""Average ``.grad`` over ranks in one flattened ``all_reduce``, and the ``loss`` with it, rank ``r`` weighted
    by ``weight_r / sum weight`` (``weight``: the examples of its step; equal weights are DDP's plain mean).

    A parameter keeps ``grad=None`` only where no rank produced a gradient (so AdamW skips it exactly as
    one process would); elsewhere missing gradients count as zero.

    :param params: list of tensors, in the same order on every rank.
    :param float loss: this rank's loss, averaged along (free: it rides in the same buffer).
    :param float weight: this rank's weight (> 0).
    :returns: the rank-averaged loss (or ``None``).
    """
    if not is_distributed():
        return loss
    params = list(params)
    device = _comm_device()
    # float32 sums (a half-precision gradient's too), float64 where a parameter is: its gradients and loss kept whole;
    # a loss alone (the divergence watch's) in float64
    dtype = torch.float64 if not params or any(p.dtype == torch.float64 for p in params) else torch.float32
    parts = [(p.grad * weight if p.grad is not None else torch.zeros_like(p)).to(dtype) for p in params]
    flags = torch.tensor([float(p.grad is not None) for p in params] + [0.0 if loss is None else float(loss) * weight, weight],
                         device=device, dtype=dtype)
    flat = torch.cat([_flat(parts, device), flags]) if parts else flags
    dist.all_reduce(flat)
    flat[:-1] /= flat[-1]
    start = 0
    for p in params:
        n = p.numel()
        p.grad = flat[start : start + n].view_as(p).to(p.device, p.dtype)
        start += n
    for p, present in zip(params, flat[start : start + len(params)].tolist()):
        if present == 0:
            p.grad = None
    return None if loss is None else flat[-2].item()


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
    :raises ValueError: on every rank, where the ranks' dtypes or ``rest`` differ (each rank got the others' bytes
        read as its own dtype and shape, without an error).
    """
    if tensor.dim() == 0:
        raise ValueError("gather_cat concatenates along dim 0: give a tensor of at least one dimension (t.reshape(1))")
    if not is_distributed():
        return tensor
    device = _comm_device()
    local = tensor.to(device)
    layout = [(str(local.dtype), tuple(local.shape[1:]))]
    said = [torch.zeros(2, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(said, torch.tensor([local.shape[0], _layout_code(layout)], device=device))  # one collective for both
    _check_layouts([s[1:] for s in said], layout, "gather_cat", "tensor's dtype and dims after the first")
    sizes = [int(s[0]) for s in said]
    padded = torch.cat([local, local.new_zeros(max(sizes) - local.shape[0], *local.shape[1:])])
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:n] for o, n in zip(out, sizes)]).to(tensor.device)


@contextlib.contextmanager
def rank_streams():
    """Within the block every rank draws from a random stream of its own (weight noise, dropout, MC labels: ranks
    must not draw alike); after it, every rank from one stream again, so that later draws agree across ranks (a
    loader's shuffle, a sampled predictive). Both streams are seeded from rank 0's current one: deterministic given
    its seed."""
    if not is_distributed():
        yield
        return
    seeds = broadcast_parameters([torch.randint(2**62, (2,))])[0].tolist()
    torch.manual_seed(seeds[0] + rank())
    try:
        yield
    finally:
        torch.manual_seed(seeds[1])


@contextlib.contextmanager
def refused_together(action: str):
    """Checks that may refuse on some ranks only (a head changed on one of them): every rank runs the block, then all
    learn whether any refused, and all raise, so that none waits in a later collective for a rank that stopped. Its
    error on the rank that refused; on the others a ``ValueError`` of the same class naming that rank's (a caller that
    catches one kind, as a width search catches :class:`~pyro_lora.predictive.NonFinitePredictionError`, then takes
    the same path on every rank), or a plain ``ValueError`` naming another kind of error (a ``KeyError`` of a collate
    function). A collective: every rank enters it."""
    error = None
    try:
        yield
    except dist.DistError:  # the process group itself failed: no further collective can tell the others
        raise
    except Exception as caught:  # any failure on one rank: the others must not go on into the next collective
        error = caught
    if is_distributed():
        said = [None] * world_size()
        dist.all_gather_object(said, None if error is None else (_sendable(type(error)), type(error).__name__, str(error)))
        refused = [(r, m) for r, m in enumerate(said) if m is not None]
        if refused and error is None:
            rank, (kind, name, message) = refused[0]
            if kind is not None:
                raise _same_kind(kind, f"cannot {action}: rank {rank} refused: {message}")
            raise ValueError(f"cannot {action}: rank {rank} failed: {name}: {message}")
    if error is not None:
        raise error


def _sendable(kind):
    """``kind``, a ``ValueError`` class, where it can be sent to the other ranks (a class pickles by its import path:
    one defined in a function cannot), else ``None``: they raise a plain ``ValueError`` naming it."""
    if not issubclass(kind, ValueError):
        return None
    try:
        pickle.dumps(kind)
    except Exception:  # noqa: BLE001 -- any failure to pickle it: sent by name
        return None
    return kind


def _same_kind(kind, message: str) -> ValueError:
    """A ``kind`` error (a ``ValueError`` class another rank raised) saying ``message``; a plain ``ValueError`` where
    that class takes no message alone."""
    try:
        return kind(message)
    except TypeError:
        return ValueError(message)


def on_main(write, what: str):
    """Run ``write()`` on rank 0 only, and return on every rank once it has finished (a file rank 0 wrote is there
    for the others to read); if it failed, every rank raises (rank 0 its own error). Its result on rank 0, else
    ``None``. A collective: every rank calls it."""
    if not is_distributed():
        return write()
    result, error = None, None
    if is_main():
        try:
            result = write()
        except BaseException as caught:  # noqa: BLE001 - re-raised below, after the others are told
            error = caught
    failed = all_reduce_(torch.tensor([float(error is not None)]), op="max").item()
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"rank 0 failed to {what}: see its error")
    return result
