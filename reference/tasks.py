"""Evaluation tasks generated from held-out fine-tuning text (`finetune-test`), as lm-eval task YAML over
local JSON files, so the stock `lm_eval --include_path <task_dir()>` runs them.

- `quailora_continuation`: given a passage, pick its true next sentence among sentences of other documents.
- `quailora_cloze`: given a passage, pick its true next word among words from other documents.
- `quailora_perplexity`: rolling log-likelihood of the held-out documents (word/byte perplexity).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import yaml

from quailora.errors import QuailoraInputError
from reference.corpora import corpus_recipe, load_split
from reference.manifest import ensure_built
from reference.paths import cache_root

TASKS_VERSION = 2
NUM_CHOICES = 4
MAX_ITEMS = 400
CONTEXT_CHARS = 400  # short enough to fit the tiny models' 256-token window with the choices
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
WORD = re.compile(r"[A-Za-z]{4,}")
TASK_NAMES = ("quailora_continuation", "quailora_cloze", "quailora_perplexity")


def _tail(text: str, chars: int = CONTEXT_CHARS) -> str:
    """The last `chars` characters of `text`, starting at a word boundary."""
    if len(text) <= chars:
        return text
    cut = text[-chars:]
    return cut[cut.find(" ") + 1 :] if " " in cut else cut


def _sentences(doc: str) -> list[str]:
    """All sentences of `doc` in order; joined with single spaces they give back its flattened text."""
    return SENTENCE_END.split(" ".join(doc.split()))


def _choice_sized(sentence: str) -> bool:
    return 20 <= len(sentence) <= 200


def continuation_items(docs: list[str], seed: int = 0) -> list[dict]:
    """One item per document with a choice-sized third-or-later sentence: the text before it, then 4
    candidate next sentences (the true one and 3 from other documents)."""
    rng = random.Random(seed)
    per_doc = [_sentences(doc) for doc in docs]
    pool = [(i, s) for i, sentences in enumerate(per_doc) for s in sentences if _choice_sized(s)]
    items = []
    for i, sentences in enumerate(per_doc):
        candidates = [k for k in range(2, len(sentences)) if _choice_sized(sentences[k])]
        if not candidates:
            continue
        k = rng.choice(candidates)
        distractors = rng.sample([s for j, s in pool if j != i and s != sentences[k]], NUM_CHOICES - 1)
        choices = distractors[:]
        label = rng.randrange(NUM_CHOICES)
        choices.insert(label, sentences[k])
        items.append(
            {"context": _tail(" ".join(sentences[:k])), "choices": [f" {c}" for c in choices], "label": label}
        )
    return items[:MAX_ITEMS]


def cloze_items(docs: list[str], seed: int = 0) -> list[dict]:
    """Up to two items per document: a passage cut before a word of 4+ letters, and 4 candidate words."""
    rng = random.Random(seed)
    flat = [" ".join(doc.split()) for doc in docs]
    words_by_doc = [set(WORD.findall(doc)) for doc in flat]
    vocabulary = sorted(set().union(*words_by_doc))
    items = []
    for i, doc in enumerate(flat):
        spots = [m for m in WORD.finditer(doc) if m.start() >= 100 and doc[m.start() - 1] == " "]
        for match in rng.sample(spots, min(2, len(spots))):
            answer = match.group()
            distractors = []
            while len(distractors) < NUM_CHOICES - 1:
                word = rng.choice(vocabulary)
                if word not in words_by_doc[i] and word not in distractors:
                    distractors.append(word)
            label = rng.randrange(NUM_CHOICES)
            distractors.insert(label, answer)
            context = _tail(doc[: match.start() - 1])
            items.append({"context": context, "choices": [f" {w}" for w in distractors], "label": label})
    return items[:MAX_ITEMS]


def _multiple_choice_yaml(task: str, data_file: Path) -> dict:
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",  # choices carry their own leading space
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": TASKS_VERSION},
    }


def _perplexity_yaml(data_file: Path) -> dict:
    return {
        "task": "quailora_perplexity",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "word_perplexity"},
            {"metric": "byte_perplexity"},
            {"metric": "bits_per_byte"},
        ],
        "metadata": {"version": TASKS_VERSION},
    }


def write_tasks(docs: list[str], out: Path, final_dir: Path | None = None) -> None:
    """Write the task data and YAML into `out`; YAML paths point at `final_dir` (where `out` will be moved)."""
    final_dir = final_dir or out
    data = {
        "quailora_continuation": continuation_items(docs),
        "quailora_cloze": cloze_items(docs),
        "quailora_perplexity": [{"text": doc} for doc in docs],
    }
    for task, rows in data.items():
        (out / f"{task}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    configs = [
        _multiple_choice_yaml("quailora_continuation", final_dir / "quailora_continuation.jsonl"),
        _multiple_choice_yaml("quailora_cloze", final_dir / "quailora_cloze.jsonl"),
        _perplexity_yaml(final_dir / "quailora_perplexity.jsonl"),
    ]
    for config in configs:
        (out / f"{config['task']}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def tasks_recipe() -> dict:
    return {"tasks_version": TASKS_VERSION, "corpus": corpus_recipe(), "max_items": MAX_ITEMS}


def task_cache_dir() -> Path:
    return cache_root() / "tasks" / f"v{TASKS_VERSION}"


def task_dir(force: bool = False) -> Path:
    """A directory for `lm_eval --include_path`, generated from `finetune-test` on first use."""
    directory = task_cache_dir()
    return ensure_built(
        directory, tasks_recipe(), lambda out: write_tasks(load_split("finetune-test"), out, directory), force
    )


def resolve_task(name: str) -> str:
    """The lm-eval task name for `name`: `reference:cloze` means `quailora_cloze`; other names pass through
    (stock lm-eval tasks). Use with `lm_eval.tasks.TaskManager(include_path=str(task_dir()))`."""
    if not name.startswith("reference:"):
        return name
    task = f"quailora_{name.removeprefix('reference:')}"
    if task not in TASK_NAMES:
        known = ", ".join(f"reference:{t.removeprefix('quailora_')}" for t in TASK_NAMES)
        raise QuailoraInputError(f"lm-eval task {name!r} is unknown; known reference tasks: {known}")
    return task
