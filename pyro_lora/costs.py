"""Peak memory of a block of work: CUDA peak allocated on a GPU, peak resident memory on the CPU."""

from __future__ import annotations

import os
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakMemory:
    """Context manager; ``.megabytes`` is the peak after the block.

    On CUDA it reads ``torch.cuda.max_memory_allocated`` (reset on entry). On the CPU it samples the
    process's resident set every ``interval`` seconds in a thread, since the kernel's own peak
    (``ru_maxrss``) cannot be reset between methods.
    """

    def __init__(self, device, interval: float = 0.01):
        self.device = torch.device(device)
        self.interval = interval
        self.megabytes = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.megabytes = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.megabytes = max(self._peak, _rss_bytes()) / 2**20
        return False
