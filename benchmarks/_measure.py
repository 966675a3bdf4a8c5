"""Timing and peak-memory helpers shared by the benchmarks.

* :func:`timed` runs a callable once and returns ``(result, seconds)``; on CUDA it synchronises
  once before starting the clock and once after the call (the only synchronisation inside the
  timed region), so the time covers the queued kernels.
* :func:`peak_memory` runs a callable once and returns ``(result, peak_bytes)``, the peak of the
  memory the call added on top of what was in use when it started:

  - CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around the call,
    after ``torch.cuda.reset_peak_memory_stats()`` (tensors held by the caching allocator only);
  - CPU: the resident set size (RSS) of the process,
    ``peak = max(sampled RSS, ru_maxrss if it grew) - RSS at the start``; the high-water mark
    ``ru_maxrss`` is exact when the call sets a new one (as in a fresh process), and a thread
    sampling ``/proc/self/statm`` every ``interval`` seconds covers the other case (a lower bound).
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

_PAGE = os.sysconf("SC_PAGE_SIZE")


def synchronize(device: torch.device | str) -> None:
    """Wait for the queued kernels of ``device`` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, float]:
    """``(fn(), seconds)``: wall-clock time of one call, garbage collector off inside.

    ``gc.collect()`` runs before the clock starts; on CUDA the device is synchronised before the
    clock starts and once at the end of the timed region.
    """
    gc.collect()
    synchronize(device)
    gc.disable()
    try:
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        gc.enable()
    return result, seconds


def rss_bytes() -> int:
    """Current resident set size of this process (``/proc/self/statm``, Linux only)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def max_rss_bytes() -> int:
    """High-water mark of the resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``, KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RssSampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, rss_bytes())


def peak_memory(
    fn: Callable[[], T], device: torch.device | str | None = None, interval: float = 0.001
) -> tuple[T, int]:
    """``(fn(), peak_bytes)``: the peak memory ``fn`` added on top of what was in use before it.

    Parameters
    ----------
    fn:
        The call to measure (run once).
    device:
        ``"cuda"`` (or a CUDA device) measures the CUDA caching allocator's allocated bytes,
        ``peak = max_memory_allocated - memory_allocated`` (at the start); ``"cpu"`` measures
        the process's resident set size (see the module docstring). ``None`` (the default):
        the current CUDA device if this process has initialised CUDA
        (``torch.cuda.is_initialized()``, i.e. some tensor went to the GPU), else the CPU.
    interval:
        CPU only: seconds between two RSS samples of the sampling thread.

    Returns
    -------
    The result of ``fn()`` and the peak in bytes (``>= 0``). Memory ``fn`` returns (its result)
    counts, as it was alive at the end of the call.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_initialized() else "cpu"
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, max(0, torch.cuda.max_memory_allocated(device) - base)
    if not os.path.exists("/proc/self/statm"):
        raise RuntimeError(
            "peak_memory on the CPU reads /proc/self/statm, which this system lacks (Linux only); "
            "measure on Linux or pass a CUDA device."
        )
    base = rss_bytes()
    hwm_before = max_rss_bytes()
    sampler = _RssSampler(interval)
    sampler.start()
    try:
        result = fn()
    finally:
        sampled = sampler.stop()
    hwm_after = max_rss_bytes()
    peak = max(sampled, hwm_after) if hwm_after > hwm_before else sampled
    return result, max(0, peak - base)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
