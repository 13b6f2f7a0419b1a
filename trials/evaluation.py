"""Validation perplexity over the trial's workers, and lm-eval tasks on the in-memory model."""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from quailora.errors import QuailoraInputError
from trials.contract import accuracy_metric


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """exp(mean token NLL) over all ``blocks``, each worker scoring a strided share.

    Every worker runs the same number of forwards (short shares are padded with weight-0 blocks) because
    ZeRO-3 gathers parameters collectively inside each forward.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    per_worker = math.ceil(len(blocks) / world_size)
    mine = list(range(rank, len(blocks), world_size))
    weights = [1.0] * len(mine) + [0.0] * (per_worker - len(mine))
    mine += [0] * (per_worker - len(mine))
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed NLL, token count
    for start in range(0, per_worker, batch_size):
        ids = blocks[mine[start : start + batch_size]].to(device)
        weight = torch.tensor(weights[start : start + batch_size], device=device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(dim=1)
        totals[0] += (nll * weight).sum().double()
        totals[1] += weight.sum().double() * (ids.shape[1] - 1)
    dist.all_reduce(totals)
    model.train(was_training)
    return math.exp(totals[0].item() / totals[1].item())


def lm_eval_tasks(names: list[str]):
    """lm-eval task names for ``eval.lm_eval_tasks`` and a TaskManager that knows them.

    ``reference:<task>`` names the project's tasks, generated from local text (no hub); other names are
    stock lm-eval tasks. Raises QuailoraInputError for a task neither knows.
    """
    from reference.tasks import resolve_task, task_dir

    tasks = [resolve_task(name) for name in names]
    uses_reference = any(name.startswith("reference:") for name in names)
    manager = _task_manager(str(task_dir()) if uses_reference else None)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise QuailoraInputError(f"eval.lm_eval_tasks: unknown task(s) {unknown}")
    return tasks, manager


@functools.cache
def _task_manager(include_path: str | None):
    """One TaskManager per process: building one indexes every lm-eval task YAML (seconds), and a sweep
    validates each of its trials before starting any."""
    from lm_eval.tasks import TaskManager  # imported only when lm-eval tasks are asked for

    return TaskManager(include_path=include_path)


def lm_eval_accuracies(
    model: nn.Module, tokenizer, names: list[str], limit: int | None, batch_size: int
) -> dict[str, float]:
    """``lmeval_<task>_acc`` for each task, through lm-eval's Python API on the model already in memory."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks, manager = lm_eval_tasks(names)
    was_training = model.training
    model.eval()
    results = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        log_samples=False,
    )
    model.train(was_training)
    if results is None:  # lm-eval hands its results only to the process with LOCAL_RANK 0
        return {}
    return {
        accuracy_metric(task): float(values["acc,none"])
        for task, values in results["results"].items()
        if "acc,none" in values
    }
