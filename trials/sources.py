"""Where a trial's text comes from, and how it becomes training blocks: checked before compute.

A source is ``reference:<split>`` (the project's corpora), a local file (``.txt``: one document; ``.parquet``,
``.json``/``.jsonl``, ``.csv``, ``.arrow``), a folder written by ``datasets``' ``save_to_disk``, or a hub
dataset ``hf:<dataset>[:<config>]:<split>`` (``hf:wikitext/wikitext-2-raw-v1:train`` also reads as dataset
``wikitext``, config ``wikitext-2-raw-v1``). Everything but ``reference:`` goes through Hugging Face
``datasets``, whose cache also keeps the tokenized examples.

Templates turn records into token blocks of ``seq_len`` with labels: ``text`` (the ``text_field`` of each
record, documents packed), ``alpaca`` (``instruction``/``input``/``output``; the prompt is masked out of
the loss) and ``chat`` (a ``messages`` list through the tokenizer's chat template; only the last
assistant message is trained on).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from quailora.errors import QuailoraInputError
from quailora.registry import Registry
from quailora.text import IGNORE_INDEX

REFERENCE_PREFIX = "reference:"
HUB_PREFIX = "hf:"
LOCAL_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)


def _hub_parts(source: str, field: str) -> tuple[str, str | None, str]:
    parts = source.removeprefix(HUB_PREFIX).split(":")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2 and parts[0] and parts[1]:
        return parts[0], None, parts[1]
    raise QuailoraInputError(f"{field}={source!r}: write hf:<dataset>[:<config>]:<split>")


def check_text_source(source: str, field: str) -> None:
    """Fail early (before any compute) if a source is malformed or a local one is missing."""
    if source.startswith(REFERENCE_PREFIX):
        return  # the reference helper validates its split names when loading
    if source.startswith(HUB_PREFIX):
        _hub_parts(source, field)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise QuailoraInputError(
                f"{field}={source!r}: a folder must be written by datasets' save_to_disk"
            )
        return
    if path.suffix not in (".txt", *LOCAL_BUILDERS):
        raise QuailoraInputError(
            f"{field}={source!r}: use 'reference:<split>', 'hf:<dataset>[:<config>]:<split>', a save_to_disk "
            f"folder or a local {'/'.join(('.txt', *LOCAL_BUILDERS))} file"
        )
    if not path.is_file():
        raise QuailoraInputError(f"{field}={source!r}: file not found")


def _load_hub(source: str, field: str):
    import datasets

    name, config, split = _hub_parts(source, field)
    attempts = [(name, config)]
    if config is None and name.count("/") == 1:  # hf:wikitext/wikitext-2-raw-v1:train
        attempts.append(tuple(name.split("/")))
    errors = []
    for path, conf in attempts:
        try:
            return datasets.load_dataset(path, conf, split=split)
        except Exception as err:  # offline, unknown dataset or config: name the source, keep the cause
            errors.append(f"{type(err).__name__}: {err}")
    raise QuailoraInputError(f"{field}={source!r} could not be loaded from the hub: {'; '.join(errors)}")


def load_records(source: str, field: str = "data"):
    """The source as a ``datasets.Dataset`` (one split)."""
    import datasets

    check_text_source(source, field)
    if source.startswith(REFERENCE_PREFIX):
        from reference.corpora import load_split

        return datasets.Dataset.from_dict({"text": load_split(source.removeprefix(REFERENCE_PREFIX))})
    if source.startswith(HUB_PREFIX):
        return _load_hub(source, field)
    path = Path(source).expanduser()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise QuailoraInputError(
                f"{field}={source!r} holds splits {sorted(loaded)}; save_to_disk one split (dataset['train'])"
            )
        return loaded
    if path.suffix == ".txt":
        return datasets.Dataset.from_dict({"text": [path.read_text()]})
    return datasets.load_dataset(LOCAL_BUILDERS[path.suffix], data_files=str(path), split="train")


def _require(records, columns: list[str], field: str, template: str) -> None:
    missing = [c for c in columns if c not in records.column_names]
    if missing:
        raise QuailoraInputError(
            f"{field}: template {template!r} needs field(s) {missing}; the records have {records.column_names}"
        )


# template(tokenizer, batch of records, text_field) -> {"input_ids": [[...]], "labels": [[...]]} per record
Template = Callable[[object, dict, str], dict]
TEMPLATES: Registry[Template] = Registry("data template")
TEMPLATE_FIELDS = {"text": None, "alpaca": ["instruction", "output"], "chat": ["messages"]}


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


@TEMPLATES.register("text")
def text_template(tokenizer, batch: dict, text_field: str) -> dict:
    ids = [
        tokens + _eos(tokenizer)
        for tokens in tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
    ]
    return {"input_ids": ids, "labels": ids}


def _prompt_and_response(prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], list[int]]:
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


@TEMPLATES.register("alpaca")
def alpaca_template(tokenizer, batch: dict, text_field: str) -> dict:
    out: dict = {"input_ids": [], "labels": []}
    inputs = batch.get("input") or [""] * len(batch["instruction"])
    for instruction, context, response in zip(batch["instruction"], inputs, batch["output"], strict=True):
        prompt = ALPACA_PROMPT.format(
            context=", paired with an input that provides further context" if context else "",
            instruction=instruction,
            input=f"### Input:\n{context}\n\n" if context else "",
        )
        ids, labels = _prompt_and_response(
            tokenizer(prompt, add_special_tokens=False)["input_ids"],
            tokenizer(response, add_special_tokens=False)["input_ids"] + _eos(tokenizer),
        )
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


@TEMPLATES.register("chat")
def chat_template(tokenizer, batch: dict, text_field: str) -> dict:
    out: dict = {"input_ids": [], "labels": []}
    for messages in batch["messages"]:
        if not messages or messages[-1]["role"] != "assistant":
            raise QuailoraInputError("chat template: each record's last message must be the assistant's")
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        if not full.startswith(prompt):
            raise QuailoraInputError(
                "chat template: the rendered conversation does not start with its prompt"
            )
        # Tokenized apart, so the prompt/response boundary is a token boundary (BPE may merge across it).
        ids, labels = _prompt_and_response(
            tokenizer(prompt, add_special_tokens=False)["input_ids"],
            tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"],
        )
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


def check_data(tokenizer, source: str, field: str, template: str, text_field: str) -> None:
    """Before compute: the source's syntax; for a local source, that its records have the template's fields
    (hub sources are fetched by the workers); a chat template on the tokenizer for ``chat``."""
    TEMPLATES.get(template, where=f"{field} template")
    check_text_source(source, field)
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise QuailoraInputError(
            f"{field}: template 'chat' needs a tokenizer with a chat template; this one has none"
        )
    if not source.startswith((HUB_PREFIX, REFERENCE_PREFIX)):
        _require(load_records(source, field), TEMPLATE_FIELDS[template] or [text_field], field, template)


def _pack(batch: dict, seq_len: int) -> dict:
    """Concatenate records and cut into full blocks of ``seq_len`` (the tail shorter than a block is dropped)."""
    ids = [t for row in batch["input_ids"] for t in row]
    labels = [t for row in batch["labels"] for t in row]
    n = len(ids) // seq_len * seq_len
    return {
        "input_ids": [ids[i : i + seq_len] for i in range(0, n, seq_len)],
        "labels": [labels[i : i + seq_len] for i in range(0, n, seq_len)],
    }


def token_blocks(
    tokenizer,
    source: str,
    seq_len: int,
    *,
    field: str = "data",
    template: str = "text",
    text_field: str = "text",
    max_blocks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, both ``[num_blocks, seq_len]`` long tensors: the source's records through
    ``template``, packed into blocks. Labels are IGNORE_INDEX where a position is not trained on (prompts);
    for plain text they equal the input ids."""
    apply = TEMPLATES.get(template, where=f"{field} template")
    records = load_records(source, field)
    _require(records, TEMPLATE_FIELDS[template] or [text_field], field, template)
    if max_blocks is not None:  # enough records for max_blocks without tokenizing a whole large corpus
        records = records.select(range(min(len(records), max_blocks * seq_len)))
    tokenized = records.map(
        lambda batch: apply(tokenizer, batch, text_field),
        batched=True,
        remove_columns=records.column_names,
        desc=f"tokenizing {field}",
    )
    packed = tokenized.map(lambda batch: _pack(batch, seq_len), batched=True, batch_size=1000, desc="packing")
    if len(packed) == 0:
        total = sum(len(row) for row in tokenized["input_ids"])
        raise QuailoraInputError(
            f"{field}={source!r} has {total} tokens, fewer than one block of seq_len={seq_len}"
        )
    if max_blocks is not None:
        packed = packed.select(range(min(len(packed), max_blocks)))
    rows = packed.with_format("torch")[:]
    return rows["input_ids"].long(), rows["labels"].long()


def load_texts(source: str, field: str = "data", text_field: str = "text") -> list[str]:
    """The ``text_field`` of every record of a source (calibration reads plain text)."""
    records = load_records(source, field)
    _require(records, [text_field], field, "text")
    return list(records[text_field])
