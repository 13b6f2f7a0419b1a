"""Shared pieces of the trial tests: a micro checkpoint with a tokenizer, small text files, a base config.

(tests/micro_models.py writes weights only; a trial also needs a tokenizer, built here from stdlib prose.)
"""

from __future__ import annotations

import pydoc_data.topics
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tests.micro_models import make_micro_checkpoint
from trials.config import TrialConfig

VOCAB = 320


def prose_lines() -> list[str]:
    """English prose every Python install has (the pydoc topics), one paragraph per line."""
    return [
        line.strip()
        for line in Path(pydoc_data.topics.__file__).read_text().splitlines()
        if len(line.strip()) > 40
    ]


def make_tokenizer(path: Path, vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE small enough for a micro model's vocabulary."""
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
    make_micro_checkpoint(family, path, vocab=VOCAB, **kwargs)
    make_tokenizer(path)
    return path


def make_texts(root: Path) -> dict[str, Path]:
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


def test_tokenizer_fits_the_micro_model(tmp_path):
    checkpoint = make_trial_checkpoint(tmp_path / "ckpt")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer("The import statement finds a module.")["input_ids"]
    assert len(tokenizer) <= VOCAB
    assert max(ids) < VOCAB and len(ids) > 3
