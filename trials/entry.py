"""The function every Ray Train worker of a trial runs, in a module that imports nothing heavy.

Ray pickles ``train_loop_per_worker`` by reference, so each process that unpickles it (the Train controller
as well as the workers) imports its module: from here the controller skips the worker's ~11 s of torch,
peft and DeepSpeed imports, which it never uses.
"""

from __future__ import annotations


def train_loop(loop_config: dict) -> None:
    from trials.worker import train_trial

    train_trial(loop_config)


def stage_loop(loop_config: dict) -> None:
    from trials.stage_job import compute_stages

    compute_stages(loop_config)
