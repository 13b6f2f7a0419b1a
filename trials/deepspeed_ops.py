"""DeepSpeed's JIT-built ops, built under a lock whose holder's death is seen.

On the CPU accelerator `deepspeed.initialize` builds its shared-memory communication op into
TORCH_EXTENSIONS_DIR under torch's `FileBaton`: a bare `lock` file that says nothing of who holds it. A
process killed mid-build (Ctrl-C during a node's first trial) leaves that file, and every later build on the
node waits on it forever (issue 26: trials that hang silently). So the worker builds the op first, holding an
OS file lock (flock, released by the kernel when its holder dies): whoever holds it is the only one of ours
building, so a baton file found then is stale and is removed.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock

# torch's own resolution of TORCH_EXTENSIONS_DIR and its <python>_<accelerator> folder; it has no public twin.
from torch.utils.cpp_extension import _get_build_directory

BATON = "lock"  # torch.utils.cpp_extension's FileBaton file in the extension's build directory
OPS = ("deepspeed_shm_comm",)  # the ops deepspeed.initialize builds on the CPU accelerator


def build_deepspeed_ops() -> None:
    """Build (or load) the ops `deepspeed.initialize` needs, clearing a stale baton first."""
    from deepspeed.comm.torch import build_shm_op

    builds = [Path(_get_build_directory(op, verbose=False)) for op in OPS]
    with FileLock(builds[0].parent / ".quailora-build.flock"):
        for build in builds:
            (build / BATON).unlink(missing_ok=True)
        build_shm_op()  # the built module is cached: deepspeed.initialize then loads it without building
