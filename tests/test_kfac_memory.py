"""The KFAC fit streams its data: what it holds does not grow with the number of batches, and each batch is
released before the one after next is made. Deterministic: tensor bytes and weak references, no RSS or timing.

Each check also runs against a fit that keeps its batches, which it must catch (the checks can fail).
"""

import gc
import weakref

import pytest
import torch
from conftest import random_batch, tiny_bert
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from pyro_lora import LoraModel, SequenceClassification
from pyro_lora.guides import LaplaceGuide

N = 3  # batches of the short stream; the long one has 10 N


def bert_model():
    return LoraModel(tiny_bert(r=2, num_labels=3), SequenceClassification())


class Stream:
    """``n`` labelled batches made one at a time. When it makes batch ``k`` it records which batches ``j <= k - 2`` still
    have a tensor alive (``late``): a streaming consumer holds at most the batch it works on and the one before."""

    def __init__(self, n, seed=0):
        self.n, self.seed = n, seed
        self.refs, self.late = [], []

    def __iter__(self):
        for k in range(self.n):
            for j in range(k - 1):
                if any(ref() is not None for ref in self.refs[j]):
                    self.late.append((j, k))
            batch = random_batch(batch=3, seq=7, seed=self.seed + k)
            batch["labels"] = torch.randint(0, 3, (3,), generator=torch.Generator().manual_seed(self.seed + k))
            self.refs.append([weakref.ref(t) for t in batch.values()])
            yield batch
            del batch  # the generator itself must not hold the batch it handed out

    def __len__(self):
        return self.n


class KeepingLaplace(LaplaceGuide):
    """A fit that keeps every batch it was given (on the guide), and their labels in its state: what the checks
    below must catch."""

    def fit(self, data, progress=True):
        self.seen = []

        def keep(stream):
            for batch in stream:
                self.seen.append(batch)
                yield batch

        super().fit(keep(data), progress)
        self.register_buffer("labels_seen", torch.cat([b["labels"] for b in self.seen]))
        return self


def state_bytes(guide):
    """Bytes of the guide's state (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in guide.state_dict().values())


def reachable_bytes(root):
    """Bytes of every tensor storage reachable from ``root`` through attributes and containers (each storage once)."""
    seen, storages, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__ not in ("builtins", "types"):
            stack.extend(vars(obj).values())
    return sum(storages.values())


def live_tensor_bytes():
    """Bytes of the storages of every live tensor the garbage collector sees (each storage once).

    Fake and functional tensors (left by a torch.compile test earlier in the same worker) hold no memory
    and have no data pointer: they are skipped.
    """
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if (issubclass(type(obj), torch.Tensor) and not isinstance(obj, (FakeTensor, FunctionalTensor))
                and obj.device.type == "cpu"):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("fisher", ["mc", "exact"])
def test_kfac_fit_holds_the_same_state_whatever_the_data_size(fisher):
    model = bert_model()
    short, long = LaplaceGuide(model, fisher=fisher, rank=2), LaplaceGuide(model, fisher=fisher, rank=2)
    short.fit(Stream(N), progress=False)
    long.fit(Stream(10 * N, seed=100), progress=False)
    assert int(long.num_data) == 10 * int(short.num_data) == 90  # the long fit did read ten times the examples
    assert state_bytes(long) == state_bytes(short)
    assert reachable_bytes(long) == reachable_bytes(short)


def test_kfac_fit_leaves_no_tensor_behind():
    guide = LaplaceGuide(bert_model(), fisher="mc", rank=2)
    guide.fit(Stream(N), progress=False)  # first fit: whatever is made once
    after_short = live_tensor_bytes()
    guide.fit(Stream(10 * N, seed=100), progress=False)
    assert live_tensor_bytes() == after_short


@pytest.mark.parametrize("fisher", ["mc", "exact"])
def test_kfac_fit_releases_each_batch_as_it_streams(fisher):
    guide = LaplaceGuide(bert_model(), fisher=fisher, rank=2)
    stream = Stream(10 * N)
    guide.fit(stream, progress=False)
    assert len(stream.refs) == 10 * N
    assert stream.late == []  # batch j was still alive when batch k >= j + 2 was made


def test_the_checks_catch_a_fit_that_keeps_its_batches():
    model = bert_model()
    short, long = KeepingLaplace(model, rank=2), KeepingLaplace(model, rank=2)
    stream = Stream(10 * N, seed=100)
    short.fit(Stream(N), progress=False)
    long.fit(stream, progress=False)
    assert stream.late  # the release check fails
    assert state_bytes(long) > state_bytes(short)  # the state check fails
    del long.labels_seen, short.labels_seen
    assert state_bytes(long) == state_bytes(short)  # the batches on the guide: the state does not see them,
    assert reachable_bytes(long) > reachable_bytes(short)  # the reachable-tensor check does

    keeping = KeepingLaplace(model, rank=2)  # the live-tensor check of test_kfac_fit_leaves_no_tensor_behind fails
    keeping.fit(Stream(N), progress=False)
    after_short = live_tensor_bytes()
    keeping.fit(Stream(10 * N, seed=100), progress=False)
    assert live_tensor_bytes() > after_short


def test_a_list_of_batches_is_caught_by_the_release_check():
    stream = Stream(4)
    kept = list(stream)
    assert len(kept) == 4
    assert stream.late == [(0, 2), (0, 3), (1, 3)]
