"""A content-addressed cache of stage artifacts (quantized base, calibration Grams, init adapters).

Layout under the cache root: ``<stage>/<digest>/`` holds one complete entry: the stage's files plus
``inputs.json`` (what the key was made of) and ``meta.json`` (compute seconds, when, where). An entry
exists only under its final name once it is complete: writers fill ``<stage>/.tmp-<digest>-<id>/`` while
holding ``<stage>/.locks/<digest>.lock`` and rename it into place. The lock is an OS file lock (flock),
so a killed writer releases it and leaves only a ``.tmp-`` directory, which the next writer of that key
(or ``prune``) removes. On a cluster the root must be a filesystem shared by the nodes that supports
flock (NFSv4, Lustre, GPFS, CephFS).

``obtain`` is the one way stages use it: reuse the entry, or compute it under the lock, or wait while
another process computes it. It is written against a tiny ``Group`` (leader + broadcast) so the ranks of
one trial decide together, and nobody blocks in a collective while another rank works for hours: a wait
is a loop of short broadcasts and sleeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from filelock import FileLock, Timeout

from quailora.errors import QuailoraInputError
from trials.contract import STAGES

INPUTS_FILE = "inputs.json"
META_FILE = "meta.json"
LAST_USED_FILE = ".last_used"  # its mtime is the entry's last use
TMP_PREFIX = ".tmp-"
LOCK_DIR = ".locks"
# precomputed: reused, and computed for this sweep by its stage jobs (orchestrator/stage_service.py)
Status = Literal["computed", "reused", "skipped", "precomputed"]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class StageKey:
    """A stage and exactly the inputs its artifact depends on; equal inputs, equal digest."""

    stage: str
    inputs: dict[str, Any]

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise QuailoraInputError(f"stage {self.stage!r} is not one of {STAGES}")

    @property
    def digest(self) -> str:
        text = canonical_json({"stage": self.stage, "inputs": self.inputs})
        return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class StageOutcome:
    """What a stage did in this trial: seconds it took here, the compute seconds a reuse saved it (less the
    seconds it waited while another process computed the entry), and those seconds waited."""

    stage: str
    status: Status
    digest: str | None = None
    path: Path | None = None
    seconds: float = 0.0
    saved_seconds: float = 0.0
    waited_seconds: float = 0.0
    peak_memory_mb: float = 0.0  # the stage's own peak on the device (RSS on CPU); 0: not measured


@dataclass(frozen=True)
class EntryInfo:
    stage: str
    digest: str
    path: Path
    size_bytes: int
    created: float
    last_used: float
    compute_seconds: float
    inputs: dict[str, Any]


class Group(Protocol):
    """The processes that obtain an entry together (one trial's ranks); the leader does the file work."""

    @property
    def leader(self) -> bool: ...
    def broadcast(self, value: Any) -> Any: ...


class SingleProcess:
    leader = True

    def broadcast(self, value: Any) -> Any:
        return value


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class StageCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def entry_path(self, key: StageKey) -> Path:
        return self.root / key.stage / key.digest

    def _lock(self, stage: str, digest: str) -> FileLock:
        locks = self.root / stage / LOCK_DIR
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(locks / f"{digest}.lock"))

    def is_complete(self, key: StageKey) -> bool:
        return (self.entry_path(key) / META_FILE).is_file()

    def touch(self, key: StageKey) -> None:
        (self.entry_path(key) / LAST_USED_FILE).touch()

    def meta(self, key: StageKey) -> dict[str, Any]:
        return json.loads((self.entry_path(key) / META_FILE).read_text())

    def try_lock(self, stage: str, digest: str) -> FileLock | None:
        """The writer lock of a key if no other process holds it, else None (never blocks)."""
        lock = self._lock(stage, digest)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            return None
        return lock

    def begin(self, key: StageKey) -> Path:
        """A fresh temporary directory for the entry; the caller holds the key's lock, so any other
        temporary directory of this key was left by a killed writer and is removed."""
        stage_dir = self.root / key.stage
        for stale in stage_dir.glob(f"{TMP_PREFIX}{key.digest}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = stage_dir / f"{TMP_PREFIX}{key.digest}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, key: StageKey, tmp: Path, compute_seconds: float) -> Path:
        """Describe the entry and rename it into place: from here on it is complete."""
        (tmp / INPUTS_FILE).write_text(json.dumps(key.inputs, indent=1, sort_keys=True, default=str))
        meta = {
            "stage": key.stage,
            "digest": key.digest,
            "compute_seconds": compute_seconds,
            "created": time.time(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        (tmp / LAST_USED_FILE).touch()
        final = self.entry_path(key)
        os.rename(tmp, final)  # atomic on one filesystem; fails if final exists (it cannot: we hold the lock)
        return final

    def entries(self) -> list[EntryInfo]:
        found = []
        for stage in STAGES:
            stage_dir = self.root / stage
            if not stage_dir.is_dir():
                continue
            for path in sorted(stage_dir.iterdir()):
                if path.name.startswith(".") or not (path / META_FILE).is_file():
                    continue
                meta = json.loads((path / META_FILE).read_text())
                last_used = path / LAST_USED_FILE
                found.append(
                    EntryInfo(
                        stage=stage,
                        digest=path.name,
                        path=path,
                        size_bytes=tree_size(path),
                        created=meta["created"],
                        last_used=last_used.stat().st_mtime if last_used.exists() else meta["created"],
                        compute_seconds=meta["compute_seconds"],
                        inputs=json.loads((path / INPUTS_FILE).read_text()),
                    )
                )
        return found

    def remove(self, entry: EntryInfo) -> bool:
        """Delete an entry unless a writer holds its key (it is then being rebuilt); True if removed."""
        lock = self.try_lock(entry.stage, entry.digest)
        if lock is None:
            return False
        try:
            trash = entry.path.parent / f"{TMP_PREFIX}{entry.digest}-removed-{uuid.uuid4().hex[:8]}"
            os.rename(entry.path, trash)  # readers never see a half-deleted entry
            shutil.rmtree(trash, ignore_errors=True)
        finally:
            lock.release()
        return True

    def prune(
        self,
        *,
        older_than_s: float | None = None,
        max_size_bytes: int | None = None,
        now: float | None = None,
    ) -> list[EntryInfo]:
        """Remove entries unused for ``older_than_s``, then least recently used ones until the cache holds at
        most ``max_size_bytes``; also removes temporary directories that no writer holds. Returns the removed."""
        now = time.time() if now is None else now
        self._remove_orphans()
        entries = sorted(self.entries(), key=lambda e: e.last_used)
        removed = []
        if older_than_s is not None:
            for entry in [e for e in entries if now - e.last_used > older_than_s]:
                if self.remove(entry):
                    removed.append(entry)
        if max_size_bytes is not None:
            kept = [e for e in entries if e not in removed]
            total = sum(e.size_bytes for e in kept)
            for entry in kept:  # oldest use first
                if total <= max_size_bytes:
                    break
                if self.remove(entry):
                    removed.append(entry)
                    total -= entry.size_bytes
        return removed

    def _remove_orphans(self) -> None:
        for stage in STAGES:
            for tmp in (self.root / stage).glob(f"{TMP_PREFIX}*"):
                digest = tmp.name.removeprefix(TMP_PREFIX).split("-")[0]
                lock = self.try_lock(stage, digest)
                if lock is not None:
                    try:
                        shutil.rmtree(tmp, ignore_errors=True)
                    finally:
                        lock.release()


def obtain(
    cache: StageCache,
    key: StageKey,
    compute: Callable[[Path | None], None],
    group: Group | None = None,
    *,
    poll_s: float = 2.0,
) -> StageOutcome:
    """The entry for ``key``: reused if complete, else computed by this group under the key's lock, else
    waited for while another process computes it. Every process of ``group`` calls this together;
    ``compute(tmp)`` runs on all of them (tmp is the directory to fill, given to the leader only).
    """
    group = group or SingleProcess()
    began = time.perf_counter()
    lock = None
    waited = 0.0
    try:
        while True:
            decision = None
            if group.leader:
                if cache.is_complete(key):
                    decision = ("reused", cache.meta(key)["compute_seconds"])
                else:
                    lock = cache.try_lock(key.stage, key.digest)
                    if lock is not None and cache.is_complete(key):  # finished between the two checks
                        lock.release()
                        lock = None
                        decision = ("reused", cache.meta(key)["compute_seconds"])
                    else:
                        decision = ("compute", None) if lock is not None else ("wait", None)
            kind, value = group.broadcast(decision)
            if kind == "reused":
                if group.leader:
                    cache.touch(key)
                return StageOutcome(key.stage, "reused", key.digest, cache.entry_path(key),
                                    time.perf_counter() - began, max(0.0, value - waited), waited)  # fmt: skip
            if kind == "compute":
                tmp = cache.begin(key) if group.leader else None
                started = time.perf_counter()
                compute(tmp)
                if group.leader:
                    cache.commit(key, tmp, time.perf_counter() - started)
                group.broadcast(None)  # the entry is in place for every rank
                return StageOutcome(key.stage, "computed", key.digest, cache.entry_path(key),
                                    time.perf_counter() - began, waited_seconds=waited)  # fmt: skip
            time.sleep(poll_s)
            waited = time.perf_counter() - began
    finally:
        if lock is not None:
            lock.release()
