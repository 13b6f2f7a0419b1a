"""The micro trial files (testkit/micro.py): a tokenizer that fits the micro model's vocabulary."""

from __future__ import annotations

from transformers import AutoTokenizer

from testkit.micro import VOCAB, make_trial_checkpoint


def test_tokenizer_fits_the_micro_model(tmp_path):
    checkpoint = make_trial_checkpoint(tmp_path / "ckpt")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer("The import statement finds a module.")["input_ids"]
    assert len(tokenizer) <= VOCAB
    assert max(ids) < VOCAB and len(ids) > 3
