"""Micro checkpoints: tiny random-initialized causal LMs of each tested architecture, saved as (sharded)
safetensors, with a byte-level BPE tokenizer trained on stdlib prose, the text splits a trial reads, and a
trial config over them.

    make_micro_checkpoint("llama", tmp_path / "ckpt")     # weights only (vocab 128)
    make_trial_checkpoint(tmp_path / "ckpt"), make_texts(tmp_path)   # what a trial needs

Outside tests/ because scripts/gpu_check.py and benchmarks/ build the same checkpoints (testkit/__init__.py
says why top-level). The architectures are quailora/supported_architectures.py's one list.
"""

from __future__ import annotations

import pydoc_data.topics
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quailora.supported_architectures import SUPPORTED

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

    from trials.config import TrialConfig

VOCAB = 320  # a trial checkpoint's vocabulary: its tokenizer's size


def make_micro_config(
    family: str,
    num_layers: int = 2,
    hidden: int = 64,
    intermediate: int | None = None,
    heads: int = 4,
    vocab: int = 128,
    max_positions: int = 256,
) -> PretrainedConfig:
    """The micro config of a tested architecture (a name of quailora.supported_architectures.SUPPORTED)."""
    if family not in SUPPORTED:
        raise ValueError(f"unknown micro model family {family!r}; known: {sorted(SUPPORTED)}")
    return SUPPORTED[family].build(
        num_layers, hidden, intermediate or 2 * hidden, heads, vocab, max_positions
    )


def make_micro_checkpoint(
    family: str,
    path: str | Path,
    num_layers: int = 2,
    hidden: int = 64,
    intermediate: int | None = None,
    heads: int = 4,
    vocab: int = 128,
    max_positions: int = 256,
    max_shard_size: str | int = "100KB",
    seed: int = 0,
    noise: float = 0.05,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a random model of ``family`` to ``path`` (in ``dtype``, sharded by ``max_shard_size``); return the path.

    ``noise`` is added to every parameter so norms and biases are not at their 1/0 defaults, which would
    hide a module left unloaded.
    """
    from transformers import AutoModelForCausalLM

    config = make_micro_config(family, num_layers, hidden, intermediate, heads, vocab, max_positions)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(noise * torch.randn_like(param))
    path = Path(path)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    return path


def prose_lines() -> list[str]:
    """English prose every Python install has (the pydoc topics), one paragraph per line."""
    return [
        line.strip()
        for line in Path(pydoc_data.topics.__file__).read_text().splitlines()
        if len(line.strip()) > 40
    ]


def make_tokenizer(path: Path, vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE small enough for a micro model's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(prose_lines()[:3000], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.save_pretrained(path)
    return fast


def make_trial_checkpoint(path: Path, family: str = "llama", **kwargs) -> Path:
    """A micro checkpoint with the tokenizer a trial needs (vocab VOCAB); ``kwargs`` go to make_micro_checkpoint."""
    make_micro_checkpoint(family, path, vocab=VOCAB, **kwargs)
    make_tokenizer(path)
    return path


def make_texts(root: Path) -> dict[str, Path]:
    """train, validation, calibration and test .txt files of prose under ``root``."""
    lines = prose_lines()
    files = {
        "train": lines[:400],
        "validation": lines[400:480],
        "calibration": lines[480:560],
        "test": lines[560:640],
    }
    out = {}
    for name, chunk in files.items():
        out[name] = root / f"{name}.txt"
        out[name].write_text("\n".join(chunk))
    return out


def micro_trial_config(checkpoint: Path, texts: dict[str, Path], **overrides) -> TrialConfig:
    """A four-step two-worker NF4 trial on the micro files; each override replaces or updates a section."""
    from trials.config import TrialConfig

    base = {
        "name": "micro",
        "model": {"path": str(checkpoint)},
        "quant": {"method": "nf4", "bits": 4},
        "lora": {"rank": 4, "alpha": 8.0, "target_modules": "all-linear"},
        "init": {"method": "svd"},
        "calibration": {"dataset": str(texts["calibration"]), "num_sequences": 4, "seq_len": 32},
        "data": {
            "train": str(texts["train"]),
            "validation": str(texts["validation"]),
            "test": str(texts["test"]),
            "seq_len": 32,
            "max_eval_sequences": 8,
        },
        "train": {"max_steps": 4, "batch_size": 2, "learning_rate": 3e-3, "checkpoint_every": 2},
        "resources": {"num_workers": 2},
    }
    for section, values in overrides.items():
        base[section] = (
            {**base[section], **values} if isinstance(values, dict) and section in base else values
        )
    return TrialConfig.model_validate(base)
