"""The byte-level BPE tokenizer decodes exactly what it encoded, also after a save/load as a transformers tokenizer."""

from pathlib import Path

from transformers import AutoTokenizer

from reference.tokenizer import EOS_TOKEN, PAD_TOKEN, train_tokenizer

TRAIN = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    'class Foo:\n    """A docstring."""\n\n    def bar(self):\n        pass\n',
] * 10
SAMPLES = [
    "def add(a, b):\n    return a + b\n",
    "Unseen words: zyzzyva, façade, naïve, 日本語, 🙂, tabs\tand  double  spaces\n\n",
    "    x = {'k': [1, 2.5e-3]}  # comment",
]


def test_round_trip_and_special_tokens(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(TRAIN, vocab_size=400)
    assert len(tokenizer) <= 400
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    for text in SAMPLES:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # Merges were learned: frequent training text needs far fewer tokens than bytes.
    assert len(tokenizer(TRAIN[1])["input_ids"]) < len(TRAIN[1].encode()) / 3

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert reloaded.eos_token_id == tokenizer.eos_token_id
