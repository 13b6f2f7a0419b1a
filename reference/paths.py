"""Where reference artifacts live: one cache per machine, so corpora, tokenizer and models are built once."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "QUAILORA_CACHE"


def cache_root() -> Path:
    """The reference cache directory: `$QUAILORA_CACHE`, else `~/.cache/quailora`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "quailora").expanduser()
