"""Stage entries reach a trial's ranks on other nodes over its process group, not through a filesystem.

Rank 0 (the leader) obtains every entry through the stage cache (trials/cache.py). Ranks on the leader's
node read the entry where it lies. On each other node one rank receives the entry's files from the leader
(point to point, in chunks, on the process group's device) into a node-local directory, which the other
ranks of that node then read; the directory is removed once the stages are done. Why not every rank
reading the cache: the cache may be node-local (a private cache under a URI storage_path), and where it is
shared, one reader per trial plus the process group's links (NVLink, InfiniBand) beats every rank of the
trial reading shared storage at once. The shared cache is for reuse across trials.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

CHUNK_BYTES = 64 << 20  # bounds the buffer a chunk needs on each side (host and device)


def _files(root: Path) -> list[tuple[str, int]]:
    return [(str(p.relative_to(root)), p.stat().st_size) for p in sorted(root.rglob("*")) if p.is_file()]


def _send_tree(root: Path, dst: int, device: torch.device) -> int:
    manifest = _files(root)
    dist.send_object_list([manifest], dst=dst, device=device)
    for name, size in manifest:
        with open(root / name, "rb") as f:
            for _ in range(0, size, CHUNK_BYTES):
                chunk = torch.frombuffer(bytearray(f.read(CHUNK_BYTES)), dtype=torch.uint8)
                dist.send(chunk.to(device), dst=dst)
    return sum(size for _, size in manifest)


def _receive_tree(dest: Path, device: torch.device) -> None:
    box: list = [None]
    dist.recv_object_list(box, src=0, device=device)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    for name, size in box[0]:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for start in range(0, size, CHUNK_BYTES):
                chunk = torch.empty(min(CHUNK_BYTES, size - start), dtype=torch.uint8, device=device)
                dist.recv(chunk, src=0)
                f.write(chunk.cpu().numpy().tobytes())
    tmp.mkdir(parents=True, exist_ok=True)  # an entry may hold no file
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


@dataclass
class EntryTransfer:
    """One trial's ranks, grouped by node; ``entry`` makes a leader's entry readable on every rank."""

    node: int  # this worker's node (Ray Train's node rank): ranks of one node share a filesystem
    device: torch.device  # where the process group's collectives run
    run_id: str  # names the node-local directory, so two trials on one node never share it
    sent_bytes: int = 0  # by the leader, over the whole trial
    _nodes: list[int] = field(default_factory=list)
    _received: set[Path] = field(default_factory=set)  # entries this node already has (same on every rank)

    @property
    def root(self) -> Path:
        return Path(tempfile.gettempdir()) / "quailora_received" / self.run_id

    def _receivers(self) -> list[int]:
        """The first rank of every node but the leader's."""
        if not self._nodes:
            self._nodes = [0] * dist.get_world_size()
            dist.all_gather_object(self._nodes, self.node)
            if self._receives():
                shutil.rmtree(self.root, ignore_errors=True)  # what a killed attempt of this trial left
        first = {}
        for rank, node in enumerate(self._nodes):
            first.setdefault(node, rank)
        return sorted(rank for node, rank in first.items() if node != self._nodes[0])

    def _receives(self) -> bool:
        rank = dist.get_rank()
        return self._nodes[rank] != self._nodes[0] and self._nodes.index(self._nodes[rank]) == rank

    def entry(self, path: Path) -> Path:
        """``path`` (an entry as the leader sees it) as this rank can read it; every rank calls this together."""
        receivers = self._receivers()
        if not receivers:
            return path
        local = self.root / path.parent.name / path.name
        if path in self._received:  # every rank asks for the same entries in the same order: all skip
            return path if self._nodes[dist.get_rank()] == self._nodes[0] else local
        self._received.add(path)
        if dist.get_rank() == 0:
            for rank in receivers:
                self.sent_bytes += _send_tree(path, rank, self.device)
        elif self._receives():
            local.parent.mkdir(parents=True, exist_ok=True)
            _receive_tree(local, self.device)
        dist.barrier()  # the node's copy is complete before its other ranks read it
        return path if self._nodes[dist.get_rank()] == self._nodes[0] else local

    def release(self) -> None:
        """Remove this node's received entries once every rank has read what it needs (call together)."""
        if self._receivers():
            dist.barrier()
            if self._receives():
                shutil.rmtree(self.root, ignore_errors=True)
        self._received.clear()
