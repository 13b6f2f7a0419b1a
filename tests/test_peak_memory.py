"""Peak-memory phases (quailora/peak_memory.py), as trials and benchmarks read them."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from quailora.peak_memory import held_memory_mb, peak_memory_mb, reset_peak_memory

linux_proc = pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc"
)


@linux_proc
def test_peak_memory_phase_starts_after_a_reset():
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    block = torch.ones(64 * 2**20)  # 256 MiB, every page touched
    del block
    init_peak = peak_memory_mb(cpu)
    reset_peak_memory(cpu)
    assert set(init_peak) == {
        "peak_memory_mb",
        "peak_rss_mb",
    }  # CUDA's reserved and device figures only on CUDA
    after = peak_memory_mb(cpu)
    for name in init_peak:  # both the sampled anonymous peak and the kernel's high-water mark saw the block
        assert init_peak[name] - after[name] > 200, (name, init_peak, after)
    assert held_memory_mb(cpu) <= after["peak_memory_mb"] + 1


@linux_proc
def test_mapped_file_pages_count_in_rss_only(tmp_path):
    """A tensor read from a memory-mapped file is resident as file-backed pages: the kernel's high-water mark
    counts them, the anonymous peak a CPU worker is planned against does not; a copy counts in both."""
    save_file({"w": torch.ones(64 * 2**20)}, tmp_path / "w.safetensors")  # 256 MiB
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    mapped = load_file(tmp_path / "w.safetensors")["w"]  # a view of the mapping
    assert float(mapped.sum()) == 64 * 2**20  # every page read
    peak = peak_memory_mb(cpu)
    assert peak["peak_rss_mb"] - peak["peak_memory_mb"] > 200, peak
    reset_peak_memory(cpu)
    before = held_memory_mb(cpu)
    copy = mapped.clone()
    del mapped
    assert peak_memory_mb(cpu)["peak_memory_mb"] - before > 200
    del copy
