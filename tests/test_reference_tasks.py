"""Generated evaluation tasks: well-formed items, and lm-eval's stock task loader runs them on a micro model."""

import dataclasses
import json
import math
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from quailora.errors import QuailoraInputError
from reference import tasks
from reference.corpora import chunk_paragraphs
from reference.pretrain import pretrain
from reference.specs import get_spec
from reference.tokenizer import train_tokenizer

# Real held-out-like prose: a slice of the pydoc topics, chunked as the fine-tuning corpus is.
DOCS = [chunk for name in sorted(topics)[:30] for chunk in chunk_paragraphs(topics[name])]


def test_continuation_items_hold_the_true_next_sentence_among_foreign_distractors() -> None:
    items = tasks.continuation_items(DOCS)
    assert len(items) > 20
    assert items == tasks.continuation_items(DOCS)  # deterministic
    flat = [" ".join(doc.split()) for doc in DOCS]
    labels = set()
    for item in items:
        assert len(item["choices"]) == tasks.NUM_CHOICES == len(set(item["choices"]))
        answer = item["choices"][item["label"]].strip()
        source = next(doc for doc in flat if item["context"] in doc)
        assert source.find(item["context"]) + len(item["context"]) + 1 == source.find(
            answer, len(item["context"])
        )
        labels.add(item["label"])
    assert labels == set(range(tasks.NUM_CHOICES))  # the answer is not always in the same slot


def test_cloze_items_hold_the_true_next_word() -> None:
    items = tasks.cloze_items(DOCS)
    assert len(items) > 20
    flat = " ".join(" ".join(doc.split()) for doc in DOCS)
    for item in items:
        answer = item["choices"][item["label"]]
        assert f"{item['context']}{answer}" in flat
        assert len(set(item["choices"])) == tasks.NUM_CHOICES


def test_reference_task_names_resolve_and_unknown_ones_are_rejected() -> None:
    assert tasks.resolve_task("reference:cloze") == "quailora_cloze"
    assert tasks.resolve_task("quailora_continuation") == "quailora_continuation"
    assert tasks.resolve_task("hellaswag") == "hellaswag"  # a stock lm-eval task passes through
    with pytest.raises(QuailoraInputError, match="'reference:trivia'"):
        tasks.resolve_task("reference:trivia")


def test_generated_tasks_run_in_stock_lm_eval_on_a_micro_model(tmp_path: Path) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    tasks.write_tasks(DOCS, task_dir)
    for task in tasks.TASK_NAMES:
        assert json.loads((task_dir / f"{task}.jsonl").read_text().splitlines()[0])

    tokenizer = train_tokenizer(DOCS, vocab_size=512)
    # 128 positions: room for the longest choice (200 characters) in this small vocabulary.
    spec = dataclasses.replace(get_spec("llama-micro"), vocab_size=512, seq_len=128, steps=30)
    pretrain(spec, tokenizer, DOCS[::2], DOCS[1::2], tmp_path / "model", progress=False)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    limit = 8
    results = simple_evaluate(
        model=HFLM(
            pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tmp_path / "model"), batch_size=8
        ),
        tasks=list(tasks.TASK_NAMES),
        task_manager=TaskManager(include_path=str(task_dir)),
        limit=limit,
        log_samples=False,
    )
    scores = results["results"]
    for task in ("quailora_continuation", "quailora_cloze"):
        acc = scores[task]["acc,none"]
        assert 0.0 <= acc <= 1.0 and acc * limit == pytest.approx(round(acc * limit)), scores[task]
    assert math.isfinite(scores["quailora_perplexity"]["word_perplexity,none"])
    assert results["n-samples"]["quailora_cloze"]["effective"] == limit
