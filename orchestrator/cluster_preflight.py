"""Before a sweep on a cluster starts: every node must see the paths its trials read and write.

A trial's driver and workers land on any node, so storage, the stage cache and the model checkpoints must be
one shared directory seen at the same path everywhere (an NFS mount, say), and tracking must be a server.
Nothing else checks it before compute: a node-local path fails only at the first checkpoint a remote worker
reports, or silently computes twice. So the driver writes a sentinel into each directory it needs, and one
tiny Ray task per alive node reads it back (and writes beside it): a node that cannot see it is named.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from quailora.errors import QuailoraInputError
from reference.paths import CACHE_ENV

SENTINEL_PREFIX = ".quailora-preflight-"
NODE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class SharedPath:
    """A directory the sweep's trials use on whichever node they land: `field` names it in a refusal."""

    field: str
    path: str
    writable: bool  # storage and cache: written by trials; a checkpoint: only read
    remedy: str = "use a directory every node mounts at the same path"


def shared_paths(storage_path: str, cache_path: str | None, checkpoints: dict[str, Path]) -> list[SharedPath]:
    """The local directories a sweep needs on every node; URIs (s3://, gs://) are the storage layer's business."""
    paths = [] if "://" in storage_path else [SharedPath("storage_path", storage_path, True)]
    if cache_path:
        paths.append(SharedPath("cache_path", cache_path, True))
    from reference.cache import is_hub_id  # imports torch: only when a sweep runs

    hub = "a hub snapshot in the driver's hub cache: set HF_HOME to a directory every node mounts, on every node"
    paths += [
        SharedPath(f"model.path={name!r}", str(ckpt), False, *([hub] if is_hub_id(name) else []))
        for name, ckpt in sorted(checkpoints.items())
    ]
    return paths


def shared_reference_cache(storage_path: str) -> dict[str, str]:
    """The environment every process of a cluster sweep gets so that `reference:` models and corpora are
    built once into the shared storage (`<storage>/reference`), not into whichever node's ~/.cache resolves
    them first. Empty where the user named the reference cache (QUAILORA_CACHE) or storage is a URI."""
    if os.environ.get(CACHE_ENV) or "://" in storage_path:
        return {}
    return {CACHE_ENV: f"{storage_path}/reference"}


@contextlib.contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """os.environ with `variables` set for the block, as it was after."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def refuse_file_tracking(tracking_uri: str, nodes: int) -> None:
    """A SQLite or file store lives on one node's disk (and SQLite must not be shared over NFS)."""
    if nodes > 1 and urlparse(tracking_uri).scheme in ("sqlite", "file", ""):
        raise QuailoraInputError(
            f"tracking_uri {tracking_uri!r}: a file store is on one node's disk, and this Ray cluster has "
            f"{nodes} nodes; run an MLflow server (`mlflow server --backend-store-uri ... "
            "--artifacts-destination ...`) and set tracking_uri to its http:// address"
        )


def _fingerprint(path: str) -> list[tuple[str, int]]:
    """What a read-only checkpoint directory holds: its files' names and sizes."""
    return sorted((e.name, e.stat().st_size) for e in os.scandir(path) if e.is_file())


def _look(expected: list[tuple[str, bool, object]], token: str) -> list[str | None]:
    """Runs on one node: per path None when it is the driver's directory, else what is wrong."""
    problems: list[str | None] = []
    for path, writable, seen_by_driver in expected:
        try:
            if writable:
                sentinel = Path(path) / f"{SENTINEL_PREFIX}{token}"
                if sentinel.read_text() != seen_by_driver:
                    raise OSError("another sweep's sentinel there")
                sentinel.with_name(f"{sentinel.name}.{os.getpid()}").write_text("ok")  # and it takes writes
                problems.append(None)
            else:
                problems.append(None if _fingerprint(path) == seen_by_driver else "other files there")
        except OSError as exc:
            problems.append(exc.strerror or str(exc))
    return problems


def check_cluster_paths(paths: list[SharedPath], tracking_uri: str) -> None:
    """On the connected Ray cluster: refuse (one line naming field, path and nodes) what some node cannot see."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    refuse_file_tracking(tracking_uri, len(nodes))
    token = secrets.token_hex(8)
    expected: list[tuple[str, bool, object]] = []
    made: list[Path] = []  # directories made for a sentinel: removed again, so a refusal leaves nothing
    for shared in paths:
        if shared.writable:
            directory = Path(shared.path)
            made += reversed([d for d in [directory, *directory.parents] if not d.exists()])
            directory.mkdir(parents=True, exist_ok=True)
            (Path(shared.path) / f"{SENTINEL_PREFIX}{token}").write_text(token)
            expected.append((shared.path, True, token))
        else:
            expected.append((shared.path, False, _fingerprint(shared.path)))
    look = ray.remote(num_cpus=0, max_retries=0)(_look)
    refs = [
        look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            expected, token
        )
        for n in nodes
    ]
    try:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=NODE_TIMEOUT_S)
        answers = [ray.get(ref) if ref in ready else None for ref in refs]
    finally:
        for shared in paths:
            for sentinel in Path(shared.path).glob(f"{SENTINEL_PREFIX}{token}*") if shared.writable else []:
                sentinel.unlink(missing_ok=True)
        for directory in reversed(made):  # deepest first; one a node or a user wrote into meanwhile stays
            with contextlib.suppress(OSError):
                directory.rmdir()
    silent = [n["NodeManagerAddress"] for n, answer in zip(nodes, answers, strict=True) if answer is None]
    if silent:
        raise QuailoraInputError(
            f"--address: node(s) {', '.join(silent)} did not run the path check within {NODE_TIMEOUT_S:.0f} s"
        )
    for i, shared in enumerate(paths):
        blind = [
            f"{n['NodeManagerAddress']} ({answer[i]})"
            for n, answer in zip(nodes, answers, strict=True)
            if answer[i]
        ]
        if blind:
            raise QuailoraInputError(
                f"{shared.field}: {shared.path!r} is not the same directory on every node of the Ray cluster; "
                f"not seen from {', '.join(blind)}: {shared.remedy}"
            )
