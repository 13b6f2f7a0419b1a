"""Deterministic text corpora built from what every Python install has: the standard library.

Pretraining domain: CPython standard-library source code. Fine-tuning domain: English prose, from
`pydoc_data.topics` (the language reference) plus docstrings of *other* stdlib modules than those
pretrained on. Each source file is assigned to one domain by a hash of its path, and each document to
one split by a hash of its text, so splits are disjoint and reproducible on any machine with the same
Python version (the stdlib differs between versions; the version is part of the cache key).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
import sysconfig
import warnings
from pathlib import Path

from quailora.errors import QuailoraInputError
from reference.manifest import ensure_built
from reference.paths import cache_root

CORPUS_VERSION = 2
SPLITS = (
    "pretrain-train",
    "pretrain-validation",
    "calibration",
    "finetune-train",
    "finetune-validation",
    "finetune-test",
)
# Test suites hold deliberately odd files (bad encodings, generated data); site-packages is not stdlib;
# `encodings` is mostly generated codec tables (trivial to predict, they would flatter perplexity);
# `pydoc_data` is the fine-tuning prose itself.
EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data"}
)
PRETRAIN_CHAR_CAP = 6_000_000  # far more than a default pretraining run reads; keeps the cache small
PRETRAIN_VALIDATION_FRACTION = 0.06
# Fine-tuning documents: [0, .1) calibration, [.1, .2) validation, [.2, .3) test, rest train.
FINETUNE_BOUNDS = (("calibration", 0.1), ("finetune-validation", 0.2), ("finetune-test", 0.3))
MIN_DOCSTRING_CHARS = 200
TOPIC_CHUNK_CHARS = 1500


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by `key` alone (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def stdlib_sources(root: Path) -> list[tuple[str, str]]:
    """(relative path, text) of the stdlib's .py files, sorted by path, undecodable files skipped."""
    sources = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            sources.append((rel.as_posix(), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return sources


def docstrings(source: str) -> list[str]:
    """Module, class and function docstrings of at least MIN_DOCSTRING_CHARS characters."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source)
    except SyntaxError:
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return [doc for doc in found if doc and len(doc) >= MIN_DOCSTRING_CHARS]


def chunk_paragraphs(text: str, target: int = TOPIC_CHUNK_CHARS) -> list[str]:
    """Split long prose at blank lines into documents of roughly `target` characters."""
    chunks, current = [], ""
    for para in re.split(r"\n\s*\n", text.strip()):
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= target:
            chunks.append(current)
            current = ""
    if current:
        chunks.append(current)
    return chunks


def build_splits(stdlib_root: Path, topics: dict[str, str]) -> dict[str, list[str]]:
    """All six splits from a stdlib tree and the pydoc topics."""
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    pretrain_chars = 0
    prose: list[str] = []
    for rel, text in stdlib_sources(stdlib_root):
        if stable_fraction(f"domain:{rel}") < 0.5:
            if stable_fraction(f"split:{rel}") < PRETRAIN_VALIDATION_FRACTION:
                splits["pretrain-validation"].append(text)
            elif pretrain_chars < PRETRAIN_CHAR_CAP:
                splits["pretrain-train"].append(text)
                pretrain_chars += len(text)
        else:
            prose.extend(docstrings(text))
    for topic in sorted(topics):
        prose.extend(chunk_paragraphs(topics[topic]))
    # Keyed by content, so a docstring repeated in several files cannot land in two splits.
    for text in dict.fromkeys(prose):
        u = stable_fraction(f"split:{text}")
        name = next((split for split, bound in FINETUNE_BOUNDS if u < bound), "finetune-train")
        splits[name].append(text)
    return splits


def corpus_recipe() -> dict:
    return {"corpus_version": CORPUS_VERSION, "python": ".".join(map(str, sys.version_info[:3]))}


def corpus_dir() -> Path:
    recipe = corpus_recipe()
    return cache_root() / "corpora" / f"v{recipe['corpus_version']}-py{recipe['python']}"


def _write_splits(out: Path) -> None:
    from pydoc_data.topics import topics

    for name, docs in build_splits(Path(sysconfig.get_paths()["stdlib"]), topics).items():
        (out / f"{name}.json").write_text(json.dumps(docs))


def ensure_corpora(force: bool = False) -> Path:
    """Build the corpora into the cache if missing or broken; return their directory."""
    return ensure_built(corpus_dir(), corpus_recipe(), _write_splits, force=force)


def load_split(name: str) -> list[str]:
    """Documents of one split (`pretrain-train`, ..., `finetune-test`); a `reference:` prefix is accepted."""
    split = name.removeprefix("reference:")
    if split not in SPLITS:
        raise QuailoraInputError(f"corpus split {name!r} is unknown; known: {', '.join(SPLITS)}")
    return json.loads((ensure_corpora() / f"{split}.json").read_text())
