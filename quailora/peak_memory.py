"""The peak memory of one phase of this process, measured one way for trials, benchmarks and tests.

On CUDA the caching allocator's statistics. On CPU (torch has no CPU allocator statistics, hence /proc):
- ``peak_memory_mb``: the peak anonymous resident memory (RssAnon), sampled on a thread. What a CPU worker
  needs: Linux's own high-water mark (VmHWM) counts file-backed pages too, and a trial maps its checkpoint
  and stage-cache files, whose pages the kernel reclaims under pressure: VmHWM overstated a worker's need
  by up to the checkpoint's size (measured at LLaMA-30B layer shapes: docs/results/scale.md).
- ``peak_rss_mb``: that high-water mark (VmHWM), exact, reset to the current RSS by writing "5" to
  /proc/self/clear_refs. Where the reset is refused (not Linux) it spans the whole process.
A reset on CPU first returns the heap's free pages to the system (glibc keeps them), so a phase's figures
start from what the process holds, not from what an earlier phase freed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

SAMPLE_SECONDS = 0.005  # a tensor large enough to matter takes longer than this to fill


def _status_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:")) / 1024


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up once (find_library runs ldconfig in a subprocess); None without glibc."""
    libc_name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None


def return_free_memory_to_os() -> None:
    """glibc keeps freed memory in its heap; without trimming, a later phase's growth would read as 0."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _AnonymousPeak:
    """The peak of RssAnon since the last reset, sampled every SAMPLE_SECONDS on a daemon thread (written by
    hand: the kernel keeps a high-water mark of the whole resident set only). A lock orders samples and
    resets, so a reading taken before a reset never lands after it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._peak = _status_mb("RssAnon")
        threading.Thread(target=self._sample, name="quailora-peak-memory", daemon=True).start()

    def _sample(self) -> None:
        while True:
            with self._lock:
                self._peak = max(self._peak, _status_mb("RssAnon"))
            time.sleep(SAMPLE_SECONDS)

    def reset(self) -> None:
        with self._lock:
            self._peak = _status_mb("RssAnon")

    def read(self) -> float:
        with self._lock:
            return max(self._peak, _status_mb("RssAnon"))


_anonymous: _AnonymousPeak | None = None


def _anonymous_peak() -> _AnonymousPeak:
    global _anonymous
    if _anonymous is None:
        _anonymous = _AnonymousPeak()
    return _anonymous


def reset_peak_memory(device: torch.device | str = "cpu") -> None:
    """Start a new phase: the next peak read covers only what comes after this call."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    return_free_memory_to_os()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    _anonymous_peak().reset()


def held_memory_mb(device: torch.device | str = "cpu") -> float:
    """MiB held now: CUDA's allocated memory, or on CPU the process's anonymous resident memory (RssAnon)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) / 2**20
    return _status_mb("RssAnon")


def peak_memory_mb(device: torch.device | str = "cpu") -> dict[str, float]:
    """MiB since the last reset. ``peak_memory_mb``: CUDA's max allocated, or on CPU the peak anonymous
    resident memory. On CUDA also ``peak_reserved_mb``, the caching allocator's max reserved (allocated or
    cached: what the process held), and ``device_used_mb``, the device's used memory now, which also counts
    the CUDA context, library workspaces and any other process on the device. On CPU also ``peak_rss_mb``,
    the peak resident set with file-backed pages (VmHWM)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        return {
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
            "device_used_mb": (total - free) / 2**20,
        }
    return {"peak_memory_mb": _anonymous_peak().read(), "peak_rss_mb": _status_mb("VmHWM")}


class PhasePeaks:
    """The peaks of the spans of one phase (a trial's stages), each from a reset at its start, and of the phase
    as a whole, the max over its spans: one peak counter serves both, since reading a span's peak resets it."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.whole: dict[str, float] = {}
        reset_peak_memory(self.device)

    def end_span(self) -> dict[str, float]:
        """The span's peaks (``peak_memory_mb`` ...); the next span starts now."""
        peaks = peak_memory_mb(self.device)
        for name, value in peaks.items():
            self.whole[name] = max(self.whole.get(name, 0.0), value)
        reset_peak_memory(self.device)
        return peaks
