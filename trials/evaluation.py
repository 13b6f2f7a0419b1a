"""lm-eval tasks on the in-memory model (perplexity over the workers: quailora.text.perplexity)."""

from __future__ import annotations

import functools

from torch import nn

from quailora.errors import QuailoraInputError
from trials.contract import accuracy_metric


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
