"""Data sources through Hugging Face datasets (local files the test writes), templates and label masking."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from quailora.errors import QuailoraInputError
from quailora.text import IGNORE_INDEX
from testkit.micro import make_tokenizer, prose_lines
from trials.sources import check_data, load_texts, token_blocks

TEXTS = prose_lines()[:60]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _write_all(root, records: list[dict]) -> dict[str, str]:
    data = datasets.Dataset.from_list(records)
    paths = {fmt: root / f"data.{fmt}" for fmt in ("parquet", "jsonl", "csv")}
    data.to_parquet(str(paths["parquet"]))
    data.to_json(str(paths["jsonl"]))
    data.to_csv(str(paths["csv"]), index=False)
    paths["json"] = root / "data.json"
    paths["json"].write_text(json.dumps(records))
    data.save_to_disk(str(root / "saved"))
    paths["save_to_disk"] = root / "saved"
    paths["arrow"] = next((root / "saved").glob("*.arrow"))
    return {fmt: str(path) for fmt, path in paths.items()}


def test_every_local_format_gives_the_same_blocks(tokenizer, tmp_path):
    sources = _write_all(tmp_path, [{"body": text, "n": i} for i, text in enumerate(TEXTS)])
    expected, _ = token_blocks(tokenizer, sources["jsonl"], 32, text_field="body")
    assert expected.shape[1] == 32 and len(expected) > 10
    for fmt, source in sources.items():
        ids, labels = token_blocks(tokenizer, source, 32, text_field="body", max_blocks=5)
        assert torch.equal(ids, expected[:5]), fmt
        assert torch.equal(labels, ids), fmt  # plain text: every position is trained on
    assert load_texts(sources["parquet"], text_field="body") == TEXTS
    with pytest.raises(
        QuailoraInputError, match=r"needs field\(s\) \['text'\]; the records have \['body', 'n'\]"
    ):
        check_data(tokenizer, sources["csv"], "data.train", "text", "text")


def test_alpaca_prompts_are_masked_out_of_the_loss(tokenizer, tmp_path):
    records = [
        {"instruction": f"Say {i}.", "input": "" if i % 2 else "context", "output": TEXTS[i]}
        for i in range(40)
    ]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    ids, labels = token_blocks(tokenizer, str(path), 64, template="alpaca")
    stream, targets = ids.flatten().tolist(), labels.flatten().tolist()
    response = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(stream)) if stream[i : i + len(response)] == response)
    assert targets[start : start + len(response)] == response  # the response is trained on
    assert all(t == IGNORE_INDEX for t in targets[:start])  # the first prompt is not
    assert "### Instruction:\nSay 0." in tokenizer.decode(stream[:start])
    assert 0 < sum(t == IGNORE_INDEX for t in targets) < len(targets)


def test_chat_records_go_through_the_chat_template(tokenizer, tmp_path):
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
    records = [
        {"messages": [{"role": "user", "content": TEXTS[i]}, {"role": "assistant", "content": TEXTS[i + 1]}]}
        for i in range(30)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    check_data(tokenizer, str(path), "data.train", "chat", "text")
    ids, labels = token_blocks(tokenizer, str(path), 64, template="chat")
    prompt_text = tokenizer.apply_chat_template(
        records[0]["messages"][:1], add_generation_prompt=True, tokenize=False
    )
    first_prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert ids.flatten()[: len(first_prompt)].tolist() == first_prompt
    assert (labels.flatten()[: len(first_prompt)] == IGNORE_INDEX).all()
    trained = labels.flatten()[len(first_prompt) :]
    assert (trained[:5] != IGNORE_INDEX).all()


def test_hub_sources_name_the_source_when_offline(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        QuailoraInputError, match="data.train='hf:wikitext/wikitext-2-raw-v1:train' could not be loaded"
    ):
        token_blocks(tokenizer, "hf:wikitext/wikitext-2-raw-v1:train", 32, field="data.train")
    with pytest.raises(QuailoraInputError, match=r"write hf:<dataset>\[:<config>\]:<split>"):
        check_data(tokenizer, "hf:wikitext", "data.train", "text", "text")
