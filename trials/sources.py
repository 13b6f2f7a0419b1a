"""Where a trial's model and text come from: reference names, local paths or hub names, resolved before compute."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quailora.errors import QuailoraInputError

REFERENCE_PREFIX = "reference:"
_LOCAL_PREFIXES = ("/", "./", "../", "~")


def resolve_model_path(path: str) -> Path:
    """A checkpoint directory for ``model.path``: reference model, local directory, or a cached hub snapshot."""
    if path.startswith(REFERENCE_PREFIX):
        from reference.cache import resolve_model  # imported late: builds reference models on first use

        return Path(resolve_model(path))
    local = Path(path).expanduser()
    if local.exists() or path.startswith(_LOCAL_PREFIXES):
        if not (local / "config.json").is_file():
            raise QuailoraInputError(f"model.path={path!r}: no model checkpoint (config.json) at {local}")
        return local.resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # offline, unknown repo, no access: all mean the same to the user
        raise QuailoraInputError(
            f"model.path={path!r} is not a local checkpoint directory and could not be fetched from the hub: {err}"
        ) from None


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            if "text" not in record:
                raise QuailoraInputError(f"{path}:{lineno}: a jsonl record needs a 'text' field")
            texts.append(record["text"])
    return texts


_LOCAL_READERS = {".txt": lambda p: [p.read_text()], ".jsonl": _read_jsonl}


def check_text_source(source: str, field: str) -> None:
    """Fail early (before any compute) if a dataset name cannot be read."""
    if source.startswith(REFERENCE_PREFIX):
        return  # the reference helper validates its split names when loading
    path = Path(source).expanduser()
    if path.suffix not in _LOCAL_READERS:
        raise QuailoraInputError(
            f"{field}={source!r}: use 'reference:<split>' or a local {'/'.join(_LOCAL_READERS)} file"
        )
    if not path.is_file():
        raise QuailoraInputError(f"{field}={source!r}: file not found")


def load_texts(source: str, field: str = "data") -> list[str]:
    """Documents of a dataset: ``reference:<split>``, a ``.txt`` file (one document) or ``.jsonl`` (``text`` field)."""
    check_text_source(source, field)
    if source.startswith(REFERENCE_PREFIX):
        from reference.corpora import load_split

        return load_split(source.removeprefix(REFERENCE_PREFIX))
    path = Path(source).expanduser()
    return _LOCAL_READERS[path.suffix](path)


def tokenize_blocks(tokenizer, texts: list[str], seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Concatenate the documents (EOS between them) and cut into full blocks of ``seq_len`` tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        if max_blocks is not None and len(ids) >= max_blocks * seq_len:
            break
    num_blocks = len(ids) // seq_len
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    if num_blocks == 0:
        raise QuailoraInputError(f"dataset has {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(ids[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)
