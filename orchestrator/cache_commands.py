"""`quailora cache ls` and `quailora cache prune`: what the shared stage cache holds, and freeing space."""

from __future__ import annotations

import re
import time
from pathlib import Path

from quailora.errors import QuailoraInputError
from trials.cache import EntryInfo, StageCache

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_duration(text: str, field: str = "--older-than") -> float:
    """Seconds in '90s', '30m', '12h', '7d' or '2w'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    if not match:
        raise QuailoraInputError(f"{field}={text!r}: give a number and a unit of s, m, h, d or w (e.g. 7d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(text: str, field: str = "--max-size") -> int:
    """Bytes in '500M', '20G', '1.5T' (binary units; a bare number is bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)i?b?\s*", text.lower())
    if not match:
        raise QuailoraInputError(f"{field}={text!r}: give a number and a unit of K, M, G or T (e.g. 20G)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def human_size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _summary(entry: EntryInfo) -> str:
    """The few inputs that tell entries apart at a glance (the whole key is in the entry's inputs.json)."""
    inputs = entry.inputs
    if entry.stage == "quantize":
        return " ".join(f"{k}={v}" for k, v in inputs["quantizer"].items()) + f" dtype={inputs['dtype']}"
    if entry.stage == "calibrate":
        return f"{inputs['source']} {inputs['num_sequences']}x{inputs['seq_len']} {inputs['propagate']}"
    options = ",".join(f"{k}={v}" for k, v in sorted(inputs["options"].items()))
    return f"{inputs['method']} r={inputs['rank']} alpha={inputs['alpha']}" + (
        f" {options}" if options else ""
    )


def list_entries(cache: StageCache, now: float | None = None) -> str:
    now = time.time() if now is None else now
    entries = cache.entries()
    if not entries:
        return f"stage cache {cache.root}: empty"
    rows = [("stage", "key", "size", "computed in", "last used", "what")]
    for e in sorted(entries, key=lambda e: (e.stage, -e.last_used)):
        rows.append((e.stage, e.digest, human_size(e.size_bytes), f"{e.compute_seconds:.1f} s",
                     _ago(now - e.last_used), _summary(e)))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ]
    total = sum(e.size_bytes for e in entries)
    return "\n".join([*lines, f"{len(entries)} entries, {human_size(total)} in {cache.root}"])


def prune_entries(cache: StageCache, older_than: str | None, max_size: str | None) -> str:
    if older_than is None and max_size is None:
        raise QuailoraInputError("cache prune: give --older-than and/or --max-size")
    removed = cache.prune(
        older_than_s=parse_duration(older_than) if older_than is not None else None,
        max_size_bytes=parse_size(max_size) if max_size is not None else None,
    )
    freed = sum(e.size_bytes for e in removed)
    return f"removed {len(removed)} entries ({human_size(freed)}) from {cache.root}"


def resolve_cache(path: str | None) -> StageCache:
    """The given cache root, or the sweeps' default (<default storage>/cache)."""
    from orchestrator.sweep_config import default_storage_path

    root = Path(path).expanduser() if path else Path(default_storage_path()) / "cache"
    if path and not root.is_dir():
        raise QuailoraInputError(f"--path={path!r}: no such directory")
    return StageCache(root)
