"""lm-eval tasks on the in-memory model, split over the trial's workers (perplexity over the workers:
quailora.text.perplexity)."""

from __future__ import annotations

import functools
import hashlib
import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from quailora.errors import QuailoraInputError
from trials.contract import accuracy_metric

if TYPE_CHECKING:
    from trials.config import EvalSpec


def lm_eval_tasks(names: list[str]):
    """lm-eval task names for ``eval.lm_eval_tasks`` and a TaskManager that knows them.

    ``reference:<task>`` names the project's tasks, generated from local text (no hub); other names are
    stock lm-eval tasks. Raises QuailoraInputError for a task neither knows.
    """
    from reference.tasks import resolve_task, task_dir

    tasks = [resolve_task(name) for name in names]
    uses_reference = any(name.startswith("reference:") for name in names)
    uses_stock = not all(name.startswith("reference:") for name in names)
    manager = _task_manager(str(task_dir()) if uses_reference else None, include_defaults=uses_stock)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise QuailoraInputError(f"eval.lm_eval_tasks: unknown task(s) {unknown}")
    return tasks, manager


@functools.cache
def _task_manager(include_path: str | None, include_defaults: bool):
    """One TaskManager per process: indexing lm-eval's own task YAMLs takes ~12 s, so it is done only when a
    stock task is asked for (a trial of reference tasks indexes three files), and once per process (a sweep
    validates each of its trials before starting any)."""
    from lm_eval.tasks import TaskManager  # imported only when lm-eval tasks are asked for

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def lm_eval_accuracies(model: nn.Module, tokenizer, spec: EvalSpec, batch_size: int) -> dict[str, float]:
    """``lmeval_<task>_acc`` for each of ``spec.lm_eval_tasks``, through lm-eval's Python API on the model
    already in memory, with ``spec``'s limit for the model's size (EvalSpec.lm_eval_limit_for).

    Called on every rank of the trial's process group: each rank scores its share of the requests
    (ProcessGroupLM). lm-eval hands the results only to the process with LOCAL_RANK 0 ({} elsewhere).
    """
    tasks, manager = lm_eval_tasks(spec.lm_eval_tasks)
    limit = spec.lm_eval_limit_for(model_parameters(model))
    results = lm_eval_results(process_group_lm(model, tokenizer, batch_size), tasks, manager, limit)
    if results is None:
        return {}
    return {
        accuracy_metric(task): float(values["acc,none"])
        for task, values in results["results"].items()
        if "acc,none" in values
    }


def model_parameters(model: nn.Module) -> int:
    """The model's parameter count as its checkpoint holds it (what validation counts, TrialPlan.num_parameters),
    rebuilt from its config on the meta device: the parameters in memory are packed by quantization, joined by
    LoRA's, and partitioned by ZeRO-3 (0 elements on each rank)."""
    return config_parameters(model.config)


def config_parameters(config) -> int:
    """The parameter count of a model of this transformers config, without weights."""
    from quailora.architectures.derive import meta_model

    return sum(p.numel() for p in meta_model(config).parameters())


def lm_eval_results(lm, tasks: list[str], manager, limit: int | None) -> dict | None:
    """lm-eval's ``simple_evaluate`` results of ``tasks`` on ``lm`` (its model in eval mode meanwhile)."""
    from lm_eval import simple_evaluate

    model = lm.model
    was_training = model.training
    model.eval()
    try:
        return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    finally:
        model.train(was_training)


def process_group_lm(model: nn.Module, tokenizer, batch_size: int):
    """lm-eval's HFLM on the in-memory model, its log-likelihood requests split over the process group."""
    return _process_group_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


@functools.cache
def _process_group_lm_class():
    """The ProcessGroupLM class, made on first use: lm-eval is imported only for trials that run tasks."""
    from lm_eval.models.huggingface import HFLM

    class ProcessGroupLM(HFLM):
        """HFLM whose log-likelihood requests are scored data-parallel over the torch.distributed ranks.

        Hand-written, not lm-eval's own split (its evaluator with ``world_size > 1``), because that one
        evens out request counts, not forward passes: its logits cache runs one forward per group of requests
        sharing a context, and a rank holding no document of a task skips that request type, while under
        ZeRO-3 every forward gathers the parameters collectively, so unequal forward counts hang the trial.

        So lm-eval itself sees one process: every rank builds the same, whole request list (the evaluator's
        ``rank``/``world_size`` stay 0/1) and hands it to ``_loglikelihood_tokens``, which splits it here by
        the logits cache's groups (strided over the ranks), scores this rank's share with HFLM's own batching,
        adds idle forwards (one token, discarded) up to the busiest rank's count (ZeRO-3's collectives), and
        all-gathers the scores into the request order. Every rank then computes the same metrics, equal to one process's.
        ``loglikelihood_rolling`` (perplexity tasks) goes through the same method; ``generate_until`` is not
        split (every rank generates the whole task).
        """

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            distributed = dist.is_available() and dist.is_initialized()
            self.group_rank = dist.get_rank() if distributed else 0
            self.group_size = dist.get_world_size() if distributed else 1
            self.forwards = 0  # model calls, the idle ones included
            # per call: the requests in all, and the indices of those this rank scored
            self.shares: list[tuple[int, list[int]]] = []

        def _model_call(self, inps, attn_mask=None, labels=None):
            self.forwards += 1
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if self.group_size == 1:
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            rank, world = self.group_rank, self.group_size
            _check_same_requests(requests, world)
            groups = _context_groups(requests, self.backend == "causal" and self.logits_cache)
            shares = [[i for group in groups[r::world] for i in group] for r in range(world)]
            # HFLM runs one forward per batch of its groups (its batch size is an int here: override_bs and
            # "auto" apply only to batch_size="auto"), and a share holds whole groups, so each rank's count is
            # known to every rank before any forward.
            forwards = max(math.ceil(len(groups[r::world]) / self.batch_size) for r in range(world))
            mine = shares[rank]
            before = self.forwards
            scored = (
                super()._loglikelihood_tokens(
                    [requests[i] for i in mine], disable_tqdm or rank > 0, override_bs
                )
                if mine
                else []
            )
            missing = forwards - (self.forwards - before)
            if missing < 0:
                raise RuntimeError(f"lm-eval ran {self.forwards - before} forwards, {forwards} were planned")
            for _ in range(missing):  # idle: the same collectives as the busier ranks' last batches
                self._model_call(torch.tensor([[self.prefix_token_id]], device=self.device))
            gathered = [None] * world
            dist.all_gather_object(gathered, scored)
            results = [None] * len(requests)
            for share, values in zip(shares, gathered, strict=True):
                for index, value in zip(share, values, strict=True):
                    results[index] = value
            self.shares.append((len(requests), mine))
            return results

    return ProcessGroupLM


def _context_groups(requests, cached: bool) -> list[list[int]]:
    """Indices of ``requests`` ((strings, context tokens, continuation tokens) each) grouped as HFLM's logits
    cache groups them, by context + continuation[:-1] (lm-eval's ``_lookup_one_token_cont``), in order of first
    appearance; without the cache every request is its own group."""
    if not cached:
        return [[i] for i in range(len(requests))]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (_, context, continuation) in enumerate(requests):
        groups.setdefault(tuple(context + continuation[:-1]), []).append(i)
    return list(groups.values())


def _check_same_requests(requests, world_size: int) -> None:
    """Every rank must split the same list (each builds it from the same task files and seeds): compared by a
    digest before any forward, so a difference fails on every rank instead of hanging the trial."""
    digest = hashlib.sha256(repr([(c, t) for _, c, t in requests]).encode()).hexdigest()
    digests = [None] * world_size
    dist.all_gather_object(digests, (len(requests), digest))
    if len(set(digests)) != 1:
        raise RuntimeError(f"lm-eval built different requests on the trial's ranks: {digests}")
