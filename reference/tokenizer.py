"""A byte-level BPE tokenizer trained with `tokenizers` on both domains, saved as a transformers tokenizer.

Byte-level BPE needs no unknown token and decodes every string exactly, which the round-trip test checks.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from reference.corpora import corpus_recipe, load_split
from reference.manifest import ensure_built
from reference.paths import cache_root

TOKENIZER_VERSION = 1
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` entries (special tokens included) on `texts`."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def tokenizer_recipe(vocab_size: int) -> dict:
    return {"tokenizer_version": TOKENIZER_VERSION, "vocab_size": vocab_size, "corpus": corpus_recipe()}


def tokenizer_dir(vocab_size: int) -> Path:
    return cache_root() / "tokenizers" / f"bpe-{vocab_size}"


def _build(vocab_size: int, out: Path) -> None:
    # Both domains, so fine-tuning prose is not split into single bytes.
    texts = load_split("pretrain-train") + load_split("finetune-train")
    train_tokenizer(texts, vocab_size).save_pretrained(out)


def load_tokenizer(vocab_size: int, force: bool = False) -> PreTrainedTokenizerFast:
    """The project tokenizer of `vocab_size`, trained once per cache."""
    directory = ensure_built(
        tokenizer_dir(vocab_size), tokenizer_recipe(vocab_size), lambda out: _build(vocab_size, out), force
    )
    return AutoTokenizer.from_pretrained(directory)
