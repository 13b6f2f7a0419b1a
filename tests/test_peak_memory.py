"""Peak-memory phases (quailora/peak_memory.py), as trials and benchmarks read them."""

from __future__ import annotations

import os

import pytest
import torch

from quailora.peak_memory import held_memory_mb, peak_memory_mb, reset_peak_memory


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")
def test_peak_memory_phase_starts_after_a_reset():
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    block = torch.ones(64 * 2**20)  # 256 MiB, every page touched
    del block
    init_peak = peak_memory_mb(cpu)
    reset_peak_memory(cpu)
    assert set(init_peak) == {"peak_memory_mb"}  # CUDA's reserved and device figures only on CUDA
    assert init_peak["peak_memory_mb"] - peak_memory_mb(cpu)["peak_memory_mb"] > 200
    assert held_memory_mb(cpu) <= peak_memory_mb(cpu)["peak_memory_mb"] + 1
