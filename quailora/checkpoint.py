"""Lazy reads from a (sharded) safetensors checkpoint, straight onto the device that will use them.

Calibration materializes one decoder layer at a time, so nothing here may load a whole shard. A tensor is
read in its stored dtype from the memory-mapped file onto its target device and converted to the compute
dtype there: a bf16 checkpoint read for a GPU never exists as a float32 copy in host memory. Reads run on
a small thread pool (``read_threads``): the copies out of the mapped file (where the page faults, i.e. the
disk reads, happen) and the conversions are torch ops that release the GIL, and a large tensor is split
into row chunks so that even one weight is read by several threads. (This is what
``safe_open(path, framework="pt", device=...)`` does, a view of the mapping moved to the device as stored,
done per chunk: safe_open would move a whole tensor from one thread.)
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

from quailora.errors import QuailoraInputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

READ_THREADS_ENV = "QUAILORA_READ_THREADS"
MAX_READ_THREADS = 8
CHUNK_BYTES = 64 * 2**20  # a tensor larger than this is read in row chunks of about this size, in parallel
INLINE_BYTES = 2**20  # a tensor smaller than this (a norm, a bias) is copied by the calling thread: handing
# it to the pool and back costs more than the copy


def read_threads() -> int:
    """Threads reading checkpoint tensors: ``$QUAILORA_READ_THREADS`` if set, else the CPUs this process may
    run on (its affinity mask, which a container or Slurm restricts), at most MAX_READ_THREADS."""
    value = os.environ.get(READ_THREADS_ENV, "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise QuailoraInputError(f"{READ_THREADS_ENV}={value!r}: expected a positive integer")
        return threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_READ_THREADS, cpus))


def _device(device: torch.device | str | int) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _chunks(tensor: torch.Tensor) -> list[slice | None]:
    """Row ranges of about CHUNK_BYTES each along dim 0 (None: the whole tensor in one piece)."""
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.dim() == 0 or nbytes <= CHUNK_BYTES or tensor.shape[0] < 2:
        return [None]
    pieces = min(tensor.shape[0], -(-nbytes // CHUNK_BYTES))
    step = -(-tensor.shape[0] // pieces)
    return [slice(start, min(start + step, tensor.shape[0])) for start in range(0, tensor.shape[0], step)]


def _copy_chunk(out: torch.Tensor, stored: torch.Tensor) -> None:
    """``out[...] = stored`` where ``stored`` is (part of) a view of the mapped file and ``out`` lies on the
    target device in the target dtype: the stored bytes cross to the device as they are, and the conversion
    runs there (a CPU target converts while copying out of the mapping, one pass)."""
    if out.device != stored.device and out.dtype != stored.dtype:
        stored = stored.to(out.device)  # stored dtype across; converted below, on the device
    if stored.is_floating_point() and stored.element_size() > 4 and out.dtype != stored.dtype:
        stored = stored.to(torch.float32)  # wider than float32: rounded through float32, as reads always were
    out.copy_(stored)


class _Read:
    """One tensor being read: its destination and the futures of its chunks."""

    def __init__(self, name: str, out: torch.Tensor, futures: list[Future], nbytes: int) -> None:
        self.name, self.out, self.futures, self.nbytes = name, out, futures, nbytes

    def result(self) -> torch.Tensor:
        for future in self.futures:
            future.result()
        return self.out


class SafetensorsWeights:
    """Tensor name -> shard file map of a checkpoint directory; tensors are read on demand, by default as
    float32 on the CPU, or in their stored dtype (``dtype=None``) or any other, on any device."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self._file_of = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, Path]:
        index = self.checkpoint_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise QuailoraInputError(
                    f"checkpoint index {index} is not a safetensors index: {err}"
                ) from None
            file_of = {name: self.checkpoint_dir / shard for name, shard in weight_map.items()}
            missing = sorted({str(path) for path in file_of.values() if not path.is_file()})
            if missing:
                raise QuailoraInputError(f"checkpoint index {str(index)!r} names missing shard(s) {missing}")
            return file_of
        single = self.checkpoint_dir / SINGLE_FILE
        if single.is_file():
            with safe_open(single, framework="pt") as f:
                return dict.fromkeys(f.keys(), single)
        raise QuailoraInputError(
            f"checkpoint_dir {str(self.checkpoint_dir)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}"
        )

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._resolve(name) is not None

    def _resolve(self, name: str) -> str | None:
        """The stored key for a model key. Checkpoints saved from the bare base model (e.g. bigscience's
        BLOOM) lack the causal-LM wrapper's prefix ("transformer.", "model."), as transformers tolerates."""
        if name in self._file_of:
            return name
        bare = name.partition(".")[2]
        return bare if bare in self._file_of else None

    def _file(self, name: str) -> tuple[str, Path]:
        key = self._resolve(name)
        if key is None:
            raise QuailoraInputError(f"tensor {name!r} is not in checkpoint {str(self.checkpoint_dir)!r}")
        return key, self._file_of[key]

    def stored_key(self, name: str) -> tuple[str, Path]:
        """The key a model tensor has in the checkpoint, and the file holding it."""
        return self._file(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from the file header, without reading its data."""
        key, path = self._file(name)
        with safe_open(path, framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def get(
        self,
        name: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = torch.float32,
        threads: int | None = None,
    ) -> torch.Tensor:
        """One tensor, an owned copy (never a view of the mapped file) on ``device``: read in its stored dtype,
        converted on the device to ``dtype`` (None: the stored dtype; integer and bool tensors keep theirs).
        A large tensor is read in row chunks by ``threads`` threads (default ``read_threads()``)."""
        return dict(self.read([name], device=device, dtype=dtype, threads=threads))[name]

    def read(
        self,
        names: Iterable[str],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = torch.float32,
        threads: int | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for each of ``names``, in order, each as ``get`` returns it, read ahead on a pool of
        ``threads`` threads (default ``read_threads()``).

        Every name is resolved before any read. At most ``threads`` tensors, and about ``threads`` chunks'
        worth of bytes (CHUNK_BYTES each) beyond one tensor, are in flight at once: reading a module holds one
        copy of it plus that bound, and a caller consuming tensors one by one holds only the bound. A tensor's
        file is mapped only while it is being read.
        """
        device, threads = _device(device), threads or read_threads()
        if threads < 1:
            raise QuailoraInputError(f"threads={threads}: expected a positive integer")
        todo = deque((name, *self._file(name)) for name in names)
        pending: deque[_Read] = deque()
        pool: ThreadPoolExecutor | None = None

        def run(out: torch.Tensor, stored: torch.Tensor) -> Future:
            nonlocal pool
            if threads == 1 or stored.numel() * stored.element_size() < INLINE_BYTES:
                future: Future = Future()
                _copy_chunk(out, stored)
                future.set_result(None)
                return future
            if pool is None:
                pool = ThreadPoolExecutor(threads, thread_name_prefix="quailora-read")
            return pool.submit(_copy_chunk, out, stored)

        try:
            while todo or pending:
                while todo and (
                    not pending
                    or (len(pending) < threads and sum(r.nbytes for r in pending) < threads * CHUNK_BYTES)
                ):
                    name, key, path = todo.popleft()
                    with safe_open(path, framework="pt") as f:
                        stored = f.get_tensor(key)  # a view of the mapping: its bytes are read by the copies
                    floating = stored.is_floating_point() and dtype is not None
                    out = torch.empty(stored.shape, dtype=dtype if floating else stored.dtype, device=device)
                    futures = [
                        run(out, stored) if rows is None else run(out[rows], stored[rows])
                        for rows in _chunks(stored)
                    ]
                    pending.append(_Read(name, out, futures, stored.numel() * stored.element_size()))
                    del stored
                read = pending.popleft()
                yield read.name, read.result()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def state_dict(
        self,
        prefix: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = torch.float32,
        threads: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """All tensors under ``prefix`` (a module path), keyed relative to it, as ``load_state_dict`` wants, each
        as ``get`` returns it.

        Read through ``read``: in parallel, with a bounded number of tensors in flight, each tensor's mapped
        pages released once it is copied, so the peak stays at one copy of the module plus that bound.
        """
        module = prefix.rstrip(".")
        for prefix in (
            module + ".",
            module.partition(".")[2] + ".",
        ):  # the second: a bare base-model checkpoint
            names = [name for name in self._file_of if name.startswith(prefix)] if prefix != "." else []
            if names:
                break
        else:
            raise QuailoraInputError(f"no tensor under {module!r} in checkpoint {str(self.checkpoint_dir)!r}")
        return {
            name[len(prefix) :]: tensor
            for name, tensor in self.read(names, device=device, dtype=dtype, threads=threads)
        }


BIN_INDEX_FILE = "pytorch_model.bin.index.json"
SINGLE_BIN_FILE = "pytorch_model.bin"


def has_safetensors(checkpoint_dir: Path) -> bool:
    return (checkpoint_dir / SINGLE_FILE).is_file() or (checkpoint_dir / INDEX_FILE).is_file()


def bin_shards(checkpoint_dir: Path) -> list[str]:
    """The pickled PyTorch shards of a ``.bin``-only checkpoint (empty when there are none)."""
    index = checkpoint_dir / BIN_INDEX_FILE
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [SINGLE_BIN_FILE] if (checkpoint_dir / SINGLE_BIN_FILE).is_file() else []


def convert_bin_checkpoint(src: Path, out: Path) -> None:
    """Write ``src``'s ``.bin`` shards as safetensors shards (same tensor names) plus its other files to ``out``.

    Shard by shard, so the peak is one shard. Tensors sharing storage (tied embeddings) are cloned:
    safetensors stores each tensor on its own.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shards = bin_shards(src)
    weight_map: dict[str, str] = {}
    for shard in shards:
        state = torch.load(src / shard, map_location="cpu", weights_only=True, mmap=True)
        name = shard.replace("pytorch_model", "model").replace(".bin", ".safetensors")
        save_file(
            {k: t.contiguous().clone() for k, t in state.items()}, out / name, metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(state, name))
        del state
    if len(shards) > 1:
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    for path in src.iterdir():
        if path.is_file() and path.name not in (*shards, BIN_INDEX_FILE):
            (out / path.name).write_bytes(path.read_bytes())
