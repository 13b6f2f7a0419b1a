"""Reference models: a micro pretraining run learns, saves a sharded standard checkpoint, and the cache
detects a corrupted shard and rebuilds it. Runs on a small slice of the real stdlib, in a temporary cache."""

import argparse
import json
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quailora.errors import QuailoraInputError
from reference import cache, commands, corpora
from reference.manifest import ensure_built
from reference.specs import get_spec

STDLIB_SLICE = (
    "multiprocessing"  # ~160 kB of real stdlib source in train and validation: enough for micro models
)


def _small_corpora(out: Path) -> None:
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"]) / STDLIB_SLICE
    few_topics = {name: topics[name] for name in sorted(topics)[:40]}
    for name, docs in corpora.build_splits(stdlib, few_topics).items():
        (out / f"{name}.json").write_text(json.dumps(docs))


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache whose corpora come from a stdlib slice (same recipe key, so the rest of the pipeline uses them)."""
    root = tmp_path_factory.mktemp("quailora-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUAILORA_CACHE", str(root))
        ensure_built(corpora.corpus_dir(), corpora.corpus_recipe(), _small_corpora)
    return root


@pytest.fixture
def cache_env(small_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QUAILORA_CACHE", str(small_cache))
    return small_cache


def test_micro_pretraining_learns_and_saves_a_standard_sharded_checkpoint(cache_env: Path) -> None:
    path = cache.resolve_model("reference:llama-micro")
    metrics = cache.model_metrics("llama-micro")
    assert metrics["final_loss"] < metrics["first_loss"] - 1.0, metrics
    assert metrics["validation_perplexity"] < metrics["unigram_perplexity"], metrics

    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) >= 2, shards  # calibration reads one layer at a time from shards
    model = AutoModelForCausalLM.from_pretrained(path)
    spec = get_spec("llama-micro")
    assert model.config.hidden_size == spec.hidden_size and model.config.num_hidden_layers == spec.num_layers
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    # Built once: a second resolve returns the same directory without retraining.
    mtime = (path / "config.json").stat().st_mtime_ns
    assert cache.resolve_model("reference:llama-micro") == path
    assert (path / "config.json").stat().st_mtime_ns == mtime


def test_check_detects_a_corrupted_shard_and_rebuilds_it(cache_env: Path, capsys) -> None:
    path = cache.build_model("opt-micro", progress=False)
    shard = sorted(path.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside the tensor data
    shard.write_bytes(bytes(data))

    report = cache.check(rebuild=False)
    assert report["corpora"] == [] and report["llama-micro"] == []
    assert len(report["opt-micro"]) == 1 and shard.name in report["opt-micro"][0]
    assert commands.cmd_check(argparse.Namespace(no_rebuild=True)) == 1
    assert "opt-micro: BROKEN" in capsys.readouterr().out

    cache.check(rebuild=True, progress=False)
    assert cache.check(rebuild=False)["opt-micro"] == []
    AutoModelForCausalLM.from_pretrained(path)


def test_resolve_model_accepts_local_dirs_and_hub_ids_and_rejects_the_rest(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")
    assert cache.resolve_model(str(tmp_path / "ckpt")) == (tmp_path / "ckpt").resolve()
    with pytest.raises(
        QuailoraInputError, match="'EleutherAI/pythia-70m'.*could not be fetched from the hub"
    ):
        cache.resolve_model("EleutherAI/pythia-70m")  # offline in the tests
    with pytest.raises(QuailoraInputError, match="no model checkpoint"):
        cache.resolve_model(str(tmp_path))
    with pytest.raises(QuailoraInputError, match="no model checkpoint"):
        cache.resolve_model(str(tmp_path / "missing"))
    with pytest.raises(QuailoraInputError, match="'llama-huge'"):
        cache.resolve_model("reference:llama-huge")


def test_build_command_rejects_unknown_names_before_building(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("QUAILORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(QuailoraInputError, match="'gpt5-tiny'"):
        commands.cmd_build(argparse.Namespace(names=["llama-micro", "gpt5-tiny"], force=False))
    assert not (tmp_path / "cache").exists()
