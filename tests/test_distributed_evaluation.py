"""lm-eval split over a trial's ranks (trials.evaluation.ProcessGroupLM) on real gloo process groups under
DeepSpeed ZeRO-3, no Ray: each rank scores about half of the requests, every rank runs the same number of
forwards (ZeRO-3 gathers the parameters collectively in each), and the accuracies equal one process's."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.ports import free_port

TASKS = ["reference:cloze", "reference:continuation"]
BATCH_SIZE = 2
LIMIT = 9  # documents per task, 4 choices each: 72 requests (each choice is a group of its own here)
# Token requests (context, continuation) beside lm-eval's: requests sharing context + continuation[:-1] are one
# forward in HFLM's logits cache, so stay on one rank. 5 such groups at batch 2: 2 forwards on rank 0, 1 on
# rank 1, which then runs an idle one; one request: rank 1 scores nothing and still runs one forward.
_A, _B = [5, 9, 14, 30, 2], [7, 7, 40, 41, 42, 43]
SPLITS = [
    [(_A, [11]), (_B, [12, 13]), (_A, [12]), ([3, 4], [5]), ([8] * 9, [60, 61, 62]), (_A, [90]), ([6], [6])],
    [(_B, [50, 51])],
]


def _load(checkpoint: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(checkpoint)


def _evaluate(model, tokenizer, limit: int) -> dict:
    """The figures the test compares: accuracies, every request's score, forwards run and, per request list,
    the indices this process scored; then the same for hand-made token requests (SPLITS)."""
    from trials.evaluation import lm_eval_results, lm_eval_tasks, process_group_lm

    tasks, manager = lm_eval_tasks(TASKS)
    lm = process_group_lm(model, tokenizer, BATCH_SIZE)
    scores = []
    loglikelihood = lm.loglikelihood

    def keep_scores(requests, disable_tqdm=False):
        scores.extend(values := loglikelihood(requests, disable_tqdm))
        return values

    lm.loglikelihood = keep_scores
    results = lm_eval_results(lm, tasks, manager, limit)
    figures = {  # lm-eval hands its results to the process with LOCAL_RANK 0 only (the trial broadcasts them)
        "metrics": results
        and {
            task: {key: values[key] for key in ("acc,none", "acc_norm,none")}
            for task, values in results["results"].items()
        },
        "scores": scores,
        "forwards": lm.forwards,
        "shares": lm.shares,
        "splits": [],
    }
    for requests in SPLITS:
        before = lm.forwards
        scored = lm._loglikelihood_tokens(
            [(None, context, continuation) for context, continuation in requests]
        )
        figures["splits"].append({"scores": scored, "forwards": lm.forwards - before})
    return figures


def _zero3_worker(rank, world_size, port, checkpoint, limit, out):
    import deepspeed

    from trials.deepspeed_ops import build_deepspeed_ops

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model, tokenizer = _load(checkpoint)
        build_deepspeed_ops()
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=list(model.parameters()),
            config={
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": 3},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                "steps_per_print": 2**31 - 1,
            },
            dist_init_required=False,
        )
        partitioned = [p.numel() for p in engine.module.parameters()]
        figures = _evaluate(engine.module, tokenizer, limit)
        figures["partitioned"] = all(n == 0 for n in partitioned)  # ZeRO-3 holds each parameter sharded
        Path(out, f"rank{rank}.json").write_text(json.dumps(figures))
    finally:
        dist.destroy_process_group()


def _run(fn, nprocs, *args, timeout=420):
    """``nprocs`` processes, killed after ``timeout`` seconds: unequal ZeRO-3 forwards would hang, not fail."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{fn.__name__} still running after {timeout} s: ranks waiting on each other")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_trial):
    root = tmp_path_factory.mktemp("distributed_eval")
    checkpoint = str(micro_trial[0])
    _run(_zero3_worker, 2, 2, free_port(), checkpoint, LIMIT, str(root))
    one = json.loads(json.dumps(_evaluate(*_load(checkpoint), LIMIT)))  # this process: no process group
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    return one, ranks


def test_lm_eval_on_two_zero3_ranks_splits_requests_and_equals_one_process(runs):
    one, ranks = runs
    assert all(rank["partitioned"] for rank in ranks)
    # one process: lm-eval saw no process group and scored everything itself
    assert one["shares"] == []
    requests = 0
    lm_eval_shares = [rank["shares"][: -len(SPLITS)] for rank in ranks]  # the SPLITS' calls come last
    for share0, share1 in zip(*lm_eval_shares, strict=True):
        (total, mine0), (total1, mine1) = share0, share1
        assert total == total1
        assert set(mine0).isdisjoint(mine1) and sorted(mine0 + mine1) == list(range(total))
        for mine in (mine0, mine1):  # a strict subset, about half: whole groups of one document's choices
            assert 0 < len(mine) < total and abs(len(mine) - total / 2) <= 4
        requests += total
    assert requests == len(TASKS) * LIMIT * 4  # every choice of every document, on each rank's list
    # the same number of forwards on both ranks (ZeRO-3), half of one process's (lm-eval's, SPLITS apart)
    assert ranks[0]["forwards"] == ranks[1]["forwards"] == one["forwards"] // 2 == 18
    assert ranks[0]["metrics"] == one["metrics"] and ranks[1]["metrics"] is None
    for rank in ranks:  # every rank holds every request's score (gathered), one process's to rounding
        _assert_same_scores(rank["scores"], one["scores"])


def test_uneven_shares_run_equal_forwards(runs):
    """Requests grouped by HFLM's logits cache, an odd number of groups, a rank with nothing to score."""
    one, ranks = runs
    for split, expected_forwards in zip(range(len(SPLITS)), (2, 1), strict=True):
        forwards = [rank["splits"][split]["forwards"] for rank in ranks]
        assert forwards == [expected_forwards] * 2
        for rank in ranks:
            _assert_same_scores(rank["splits"][split]["scores"], one["splits"][split]["scores"])
    (total, mine0), (_, mine1) = ranks[0]["shares"][-2], ranks[1]["shares"][-2]
    # groups in order of first appearance, strided: {0, 2, 5} {1} | {3} {4} | {6}
    assert (total, sorted(mine0), sorted(mine1)) == (7, [0, 2, 3, 5, 6], [1, 4])
    assert [len(rank["shares"][-1][1]) for rank in ranks] == [1, 0]


def _assert_same_scores(scores, expected):
    assert len(scores) == len(expected)
    for (logprob, greedy), (logprob_one, greedy_one) in zip(scores, expected, strict=True):
        assert greedy == greedy_one and logprob == pytest.approx(logprob_one, rel=1e-5, abs=1e-5)
