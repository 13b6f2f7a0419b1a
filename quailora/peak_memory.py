"""The peak memory of one phase of this process, measured one way for trials, benchmarks and tests.

On CUDA the caching allocator's statistics; on CPU the process's peak resident set (VmHWM), which Linux
resets to the current RSS when "5" is written to /proc/self/clear_refs. torch has no CPU allocator
statistics, hence /proc. Where the reset is refused (not Linux), the peak spans the whole process.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def _status_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:")) / 1024


def reset_peak_memory(device: torch.device | str = "cpu") -> None:
    """Start a new phase: the next peak read covers only what comes after this call."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def held_memory_mb(device: torch.device | str = "cpu") -> float:
    """MiB held now: CUDA's allocated memory, or on CPU the process's resident set (VmRSS)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) / 2**20
    return _status_mb("VmRSS")


def peak_memory_mb(device: torch.device | str = "cpu") -> dict[str, float]:
    """MiB since the last reset. ``peak_memory_mb``: CUDA's max allocated, or on CPU the peak RSS (VmHWM).
    On CUDA also ``peak_reserved_mb``, the caching allocator's max reserved (allocated or cached: what the
    process held), and ``device_used_mb``, the device's used memory now, which also counts the CUDA
    context, library workspaces and any other process on the device."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        return {
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
            "device_used_mb": (total - free) / 2**20,
        }
    return {"peak_memory_mb": _status_mb("VmHWM")}


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
