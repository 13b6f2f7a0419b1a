"""DeepSpeed's CPU communication op: a build lock left by a killed build is cleared; a live builder is waited for."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from filelock import FileLock
from torch.utils.cpp_extension import _get_build_directory

REPO = Path(__file__).resolve().parents[1]
BUILD = "from trials.deepspeed_ops import build_deepspeed_ops; build_deepspeed_ops(); print('ready')"


def _build() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILD], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def test_a_build_lock_whose_holder_died_is_cleared_and_a_live_one_is_waited_for():
    build = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    baton = build / "lock"
    baton.touch()  # what a build killed mid-way leaves: torch's FileBaton then waits for it forever
    done = _build()
    out, err = done.communicate(timeout=400)  # a first build on this machine compiles (~30-90 s)
    assert done.returncode == 0 and out.strip().endswith("ready"), err[-3000:]
    assert not baton.exists()

    with FileLock(build.parent / ".quailora-build.flock"):  # another worker building right now
        waiting = _build()
        time.sleep(5)
        assert waiting.poll() is None  # it waits for the live builder rather than clearing its lock
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and out.strip().endswith("ready"), err[-3000:]
