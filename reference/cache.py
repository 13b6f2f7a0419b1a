"""Resolve a model name to a checkpoint directory, building project reference models once per machine.

`reference:<name>` checkpoints live under `$QUAILORA_CACHE/models/<name>` with a manifest of sha256
hashes; a missing, corrupted or stale (recipe changed) checkpoint is rebuilt on use or by `check`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from quailora.checkpoint import bin_shards, convert_bin_checkpoint, has_safetensors
from quailora.errors import QuailoraInputError
from reference.corpora import corpus_dir, corpus_recipe, ensure_corpora, load_split
from reference.manifest import ensure_built, fingerprint, verify_manifest
from reference.paths import cache_root
from reference.pretrain import METRICS_FILE, pretrain
from reference.specs import MODEL_SPECS, get_spec
from reference.tasks import task_cache_dir, task_dir, tasks_recipe
from reference.tokenizer import load_tokenizer, tokenizer_dir, tokenizer_recipe

REFERENCE_PREFIX = "reference:"
PRETRAIN_VERSION = 2
# "org/name" or "name": what the hub accepts as a repository id.
LOCAL_PREFIXES = ("/", "./", "../", "~")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def model_recipe(name: str) -> dict:
    spec = get_spec(name)
    return {
        "pretrain_version": PRETRAIN_VERSION,
        "spec": spec.as_dict(),
        "tokenizer": tokenizer_recipe(spec.vocab_size),
    }


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def _build(name: str, out: Path, progress: bool) -> None:
    spec = get_spec(name)
    metrics = pretrain(
        spec,
        load_tokenizer(spec.vocab_size),
        load_split("pretrain-train"),
        load_split("pretrain-validation"),
        out,
        progress=progress,
    )
    print(
        f"{name}: validation perplexity {metrics['validation_perplexity']:.2f} "
        f"(unigram {metrics['unigram_perplexity']:.2f}) after {metrics['train_seconds']:.0f} s, "
        f"{metrics['train_tokens']} tokens"
    )


def build_model(name: str, force: bool = False, progress: bool = True) -> Path:
    """The checkpoint of reference model `name`, built (or rebuilt when broken, stale or forced) if needed."""
    return ensure_built(model_dir(name), model_recipe(name), lambda out: _build(name, out, progress), force)


def model_metrics(name: str) -> dict | None:
    path = model_dir(name) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _with_safetensors(checkpoint: Path, name: str) -> Path:
    """``checkpoint`` itself, or for a ``.bin``-only one its safetensors copy, converted once into the cache
    (calibration reads tensors lazily from safetensors files)."""
    if has_safetensors(checkpoint):
        return checkpoint
    if not bin_shards(checkpoint):
        raise QuailoraInputError(
            f"model.path={name!r}: {checkpoint} has a config.json but no model.safetensors(.index.json) "
            "or pytorch_model.bin(.index.json) weights"
        )
    stat = {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(checkpoint.iterdir()) if p.is_file()
    }
    recipe = {"converted_from": str(checkpoint.resolve()), "files": stat}
    out = cache_root() / "converted" / fingerprint(recipe)
    return ensure_built(out, recipe, lambda tmp: convert_bin_checkpoint(checkpoint, tmp), False)


def _hub_snapshot(name: str) -> Path:
    """The hub repository's config, tokenizer and safetensors weights (its .bin weights if it has no others)."""
    from huggingface_hub import snapshot_download

    common = ["*.json", "*.model", "*.txt", "*.tiktoken"]
    try:
        path = Path(snapshot_download(name, allow_patterns=[*common, "*.safetensors"]))
        if not has_safetensors(path):
            path = Path(snapshot_download(name, allow_patterns=[*common, "pytorch_model*.bin"]))
    except Exception as err:  # offline, unknown repo, no access: all mean the same to the user
        raise QuailoraInputError(
            f"model.path={name!r} is not a local checkpoint directory and could not be fetched from the hub: {err}"
        ) from None
    return path


def is_hub_id(name: str) -> bool:
    """Whether resolve_model fetches ``name`` from the hub (into this machine's hub cache, HF_HOME)."""
    if name.startswith((REFERENCE_PREFIX, *LOCAL_PREFIXES)) or Path(name).expanduser().exists():
        return False
    return bool(HUB_ID.match(name))


def resolve_model(name: str) -> Path:
    """The local checkpoint directory (config.json + safetensors weights) for a model name.

    `reference:<name>`: the project-built checkpoint (built on first use, hashes verified).
    A local directory: used as is once it is seen to hold a config.json.
    A hub id (`org/name`): a snapshot in the hub cache (fetched when online).
    A `.bin`-only checkpoint is converted once to safetensors under `$QUAILORA_CACHE/converted/`.
    """
    if name.startswith(REFERENCE_PREFIX):
        return build_model(name.removeprefix(REFERENCE_PREFIX))
    local = Path(name).expanduser()
    if local.exists() or name.startswith(LOCAL_PREFIXES):
        if not (local / "config.json").is_file():
            raise QuailoraInputError(f"model.path={name!r}: no model checkpoint (config.json) at {local}")
        return _with_safetensors(local.resolve(), name)
    if is_hub_id(name):
        return _with_safetensors(_hub_snapshot(name), name)
    raise QuailoraInputError(
        f"model.path={name!r} does not exist locally and is not a hub id or reference:<name> "
        f"(reference models: {', '.join(sorted(MODEL_SPECS))})"
    )


def check(rebuild: bool = True, progress: bool = True) -> dict[str, list[str]]:
    """Verify the corpora, tokenizers, tasks and every built model against their manifests.

    Returns the problems found per artifact (empty lists when intact); with `rebuild`, broken ones are
    rebuilt. Models never built are not checked."""
    report: dict[str, list[str]] = {}
    corpus_problems = verify_manifest(corpus_dir(), corpus_recipe())
    report["corpora"] = corpus_problems
    if corpus_problems and rebuild:
        ensure_corpora()
    vocab_sizes = sorted({spec.vocab_size for spec in MODEL_SPECS.values()})
    for vocab_size in vocab_sizes:
        directory = tokenizer_dir(vocab_size)
        if directory.exists():
            report[f"tokenizer bpe-{vocab_size}"] = problems = verify_manifest(
                directory, tokenizer_recipe(vocab_size)
            )
            if problems and rebuild:
                load_tokenizer(vocab_size)
    if task_cache_dir().exists():
        report["tasks"] = problems = verify_manifest(task_cache_dir(), tasks_recipe())
        if problems and rebuild:
            task_dir(force=True)
    for name in sorted(MODEL_SPECS):
        if model_dir(name).exists():
            report[name] = problems = verify_manifest(model_dir(name), model_recipe(name))
            if problems and rebuild:
                build_model(name, progress=progress)
    return report
