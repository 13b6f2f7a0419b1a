"""The stage cache: keys depend on exactly their inputs, one computation per key under concurrency, a killed
writer leaves nothing that looks complete, `quailora cache ls/prune`. No Ray: processes and files only."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from orchestrator.cache_commands import list_entries, parse_duration, parse_size
from orchestrator.cli import main
from quailora.errors import QuailoraInputError
from testkit.micro import micro_trial_config
from trials.cache import INPUTS_FILE, StageCache, StageKey, obtain
from trials.stage_keys import calibrate_key, checkpoint_identity, initialize_key, quantize_key

F32 = torch.float32


def _keys(checkpoint, texts, ids=None, dtype=F32, targets=("a", "b"), **overrides):
    config = micro_trial_config(checkpoint, texts, **overrides)
    ids = torch.arange(64).view(2, 32) if ids is None else ids
    q = quantize_key(config, checkpoint, dtype)
    c = calibrate_key(config, checkpoint, ids, dtype)
    return q, c, initialize_key(config, q, c, list(targets))


# (overrides, which of quantize / calibrate / initialize must change); the base init is the calibrated
# quailora, so the initialize key also follows the calibrate key.
CHANGES = [
    ({"quant": {"method": "fp4"}}, {"quantize", "initialize"}),
    ({"quant": {"double_quant": False}}, {"quantize", "initialize"}),
    ({"train": {"zero_stage": 3}}, {"quantize", "initialize"}),  # bnb 4-bit storage follows ZeRO-3
    ({"quant": {"group_size": 32}}, set()),  # not a setting of the NF4 quantizer
    ({"calibration": {"propagate": "quantized"}}, {"calibrate", "initialize"}),
    ({"calibration": {"dataset": "reference:calibration"}}, {"calibrate", "initialize"}),
    ({"calibration": {"num_sequences": 9}}, set()),  # only through the token ids (below)
    ({"lora": {"rank": 8}}, {"initialize"}),
    ({"lora": {"alpha": 4.0}}, {"initialize"}),
    ({"lora": {"use_rslora": True}}, {"initialize"}),
    ({"init": {"method": "quailora", "options": {"iterations": 2}}}, {"initialize"}),
    ({"seed": 3}, {"initialize"}),  # quailora draws its randomized SVD from the seed
    ({"lora": {"dropout": 0.1}}, set()),
    ({"train": {"learning_rate": 1e-5, "max_steps": 99, "batch_size": 7}}, set()),
    ({"data": {"seq_len": 16}}, set()),
    ({"resources": {"num_workers": 1}}, set()),
    ({"name": "other", "tags": {"x": "y"}}, set()),
]


@pytest.mark.parametrize(("overrides", "changed"), CHANGES)
def test_a_stage_key_follows_exactly_its_inputs(micro_trial, overrides, changed):
    checkpoint, texts = micro_trial
    base = {"init": {"method": "quailora"}}
    before = _keys(checkpoint, texts, **base)
    merged = {k: ({**base[k], **v} if k in base else v) for k, v in overrides.items()}
    after = _keys(checkpoint, texts, **{**base, **merged})
    differs = {k.stage for k, o in zip(before, after, strict=True) if k.digest != o.digest}
    assert differs == changed


def test_keys_of_the_token_ids_dtype_targets_and_the_seed_of_unseeded_methods(micro_trial):
    checkpoint, texts = micro_trial
    q, c, i = _keys(checkpoint, texts, init={"method": "quailora"})
    assert _keys(checkpoint, texts, ids=torch.arange(64).view(2, 32) + 1, init={"method": "quailora"})[1] != c
    assert _keys(checkpoint, texts, dtype=torch.bfloat16, init={"method": "quailora"})[0] != q
    assert _keys(checkpoint, texts, targets=("a",), init={"method": "quailora"})[2] != i
    # The seed counts where it is drawn from: the randomized SVD (solver auto/randomized), gaussian's A.
    for init, follows_seed in (
        ({"method": "closed_form"}, True),
        ({"method": "closed_form", "options": {"solver": "exact"}}, False),
        ({"method": "gaussian"}, True),
    ):
        one = _keys(checkpoint, texts, init=init)[2]
        assert (one != _keys(checkpoint, texts, init=init, seed=5)[2]) is follows_seed, init
    # an uncalibrated method's init does not depend on calibration at all
    assert "calibrate" not in _keys(checkpoint, texts, init={"method": "svd"})[2].inputs


def test_checkpoint_identity_is_content_not_place(micro_trial, tmp_path):
    checkpoint, _ = micro_trial
    copy = Path(shutil.copytree(checkpoint, tmp_path / "copy"))
    assert checkpoint_identity(copy) == checkpoint_identity(checkpoint)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one byte of one tensor
    weights.write_bytes(bytes(data))
    assert checkpoint_identity(copy) != checkpoint_identity(checkpoint)


KEY = StageKey("calibrate", {"what": "test"})


def _obtain_counting(root: str, log: str, hold_s: float) -> tuple[str, float, float]:
    def compute(tmp):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(hold_s)
        (tmp / "payload.txt").write_text("done")

    outcome = obtain(StageCache(root), KEY, compute, poll_s=0.05)
    return outcome.status, outcome.saved_seconds, outcome.waited_seconds


def test_concurrent_processes_compute_a_key_once(tmp_path):
    """Two of three processes wait while the first computes: they reuse its entry, but what they saved is
    the computation less their wait (issue 28: a waiter was credited the whole computation)."""
    log = tmp_path / "computations.log"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        outcomes = pool.starmap(_obtain_counting, [(str(tmp_path / "cache"), str(log), 1.0)] * 3)
    assert sorted(status for status, _, _ in outcomes) == ["computed", "reused", "reused"]
    assert len(log.read_text().splitlines()) == 1
    (entry,) = StageCache(tmp_path / "cache").entries()
    for status, saved, waited in outcomes:
        if status == "reused":
            assert waited > 0.5 and saved == pytest.approx(max(0.0, entry.compute_seconds - waited), abs=1e-6)
    assert (entry.path / "payload.txt").read_text() == "done" and entry.compute_seconds >= 1.0
    assert (entry.path / INPUTS_FILE).is_file()


def _obtain_forever(root: str) -> None:
    def compute(tmp):
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        time.sleep(600)

    obtain(StageCache(root), KEY, compute)


def test_a_killed_writer_leaves_nothing_that_looks_complete(tmp_path):
    cache = StageCache(tmp_path / "cache")
    writer = multiprocessing.get_context("spawn").Process(target=_obtain_forever, args=(str(cache.root),))
    writer.start()
    deadline = time.time() + 60
    while not list((cache.root / "calibrate").glob(".tmp-*/half.bin")):
        assert time.time() < deadline and writer.is_alive(), "the writer never started its entry"
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    assert not cache.is_complete(KEY) and cache.entries() == []
    assert "empty" in list_entries(cache)
    # The lock died with the writer: the next process computes at once and clears the leftover.
    outcome = obtain(cache, KEY, lambda tmp: (tmp / "payload.txt").write_text("done"), poll_s=0.05)
    assert outcome.status == "computed" and outcome.seconds < 30
    assert not list((cache.root / "calibrate").glob(".tmp-*"))


def _entry(cache: StageCache, name: str, size: int, used_at: float):
    key = StageKey("quantize", {"quantizer": {"method": name}, "dtype": "float32", "checkpoint": {}})
    obtain(cache, key, lambda tmp: (tmp / "w.bin").write_bytes(b"x" * size))
    os.utime(cache.entry_path(key) / ".last_used", (used_at, used_at))
    return key


def test_prune_by_age_then_size_and_orphans(tmp_path):
    cache = StageCache(tmp_path)
    now = time.time()
    old, mid, new = (
        _entry(cache, n, 10_000, now - age) for n, age in (("a", 10 * 86400), ("b", 3600), ("c", 60))
    )
    orphan = cache.root / "quantize" / ".tmp-deadbeef-1234"
    orphan.mkdir()
    removed = cache.prune(older_than_s=parse_duration("7d"))
    assert [e.digest for e in removed] == [old.digest] and not orphan.exists()
    assert cache.is_complete(mid) and cache.is_complete(new)
    cache.prune(max_size_bytes=15_000)  # room for one: the least recently used goes
    assert not cache.is_complete(mid) and cache.is_complete(new)


def test_cache_cli_lists_and_prunes(tmp_path, capsys):
    cache = StageCache(tmp_path / "c")
    _entry(cache, "nf4", 2048, time.time() - 2 * 86400)
    assert main(["cache", "ls", "--path", str(cache.root)]) == 0
    out = capsys.readouterr().out
    assert (
        "quantize" in out and "method=nf4" in out and "1 entries, 2." in out
    )  # 2 KiB of payload plus the entry's JSON
    assert main(["cache", "prune", "--path", str(cache.root), "--older-than", "1d"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out and cache.entries() == []
    assert main(["cache", "prune", "--path", str(cache.root), "--older-than", "soon"]) == 2
    assert "--older-than='soon'" in capsys.readouterr().err


def test_size_and_duration_parsing():
    assert (
        parse_size("20G") == 20 * 2**30
        and parse_size("1.5M") == int(1.5 * 2**20)
        and parse_size("512") == 512
    )
    assert parse_duration("12h") == 43200 and parse_duration("2w") == 14 * 86400
    with pytest.raises(QuailoraInputError, match="--max-size"):
        parse_size("lots")
