"""Integrity manifests: every built artifact directory records its inputs and the sha256 of each file,
so a truncated shard, an edited file or a changed recipe is detected and the artifact rebuilt."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock

MANIFEST_NAME = "quailora-manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(recipe: dict) -> str:
    """A short stable hash of a JSON-able recipe (what an artifact was built from)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(directory: Path, recipe: dict) -> None:
    files = {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    payload = {"fingerprint": fingerprint(recipe), "recipe": recipe, "files": files}
    (directory / MANIFEST_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True))


def verify_manifest(directory: Path, recipe: dict) -> list[str]:
    """Problems found (empty when intact): missing manifest, changed recipe, missing or altered files."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        return [f"{directory}: no {MANIFEST_NAME} (not built, or the build did not finish)"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{manifest_path}: unreadable ({exc})"]
    if manifest.get("fingerprint") != fingerprint(recipe):
        return [f"{directory}: built from another recipe (fingerprint {manifest.get('fingerprint')})"]
    problems = []
    for rel, expected in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{path}: sha256 differs from the manifest (corrupted or edited)")
    return problems


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory.parent / f".{directory.name}.lock")):
        yield


def ensure_built(directory: Path, recipe: dict, build: Callable[[Path], None], force: bool = False) -> Path:
    """Return `directory` once it holds an intact build of `recipe`, building it (under a file lock, into a
    temporary sibling that is renamed into place) when it is missing, broken, stale, or `force` is set.

    Concurrent callers (e.g. parallel trials) wait for one build instead of racing."""
    if not force and not verify_manifest(directory, recipe):
        return directory
    with _locked(directory):
        if not force and not verify_manifest(directory, recipe):
            return directory  # another process built it while we waited
        for stale in directory.parent.glob(f".{directory.name}.tmp-*"):  # left by killed builds
            shutil.rmtree(stale, ignore_errors=True)
        tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        build(tmp)
        write_manifest(tmp, recipe)
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    return directory
