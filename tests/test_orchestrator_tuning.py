"""Trial resources against the cluster: concurrency over CPUs and GPUs, and trials no node can hold (no Ray started)."""

from __future__ import annotations

import pytest

from orchestrator.expand import expand
from orchestrator.sweep_config import SweepConfig
from orchestrator.tuning import check_fits_cluster, default_concurrency
from quailora.errors import QuailoraInputError

GPU_NODE = {"CPU": 16.0, "GPU": 2.0, "memory": 1e11, "node:10.0.0.1": 1.0}
CPU_NODE = {"CPU": 64.0}


def _matrix(resources: dict, **fields):
    base = {"model": {"path": "reference:llama-micro"}, "resources": resources}
    return expand(
        SweepConfig.model_validate(
            {"name": "t", "base": base, "space": {"lora.rank": {"grid": [4, 8]}}, **fields}
        )
    )


def test_concurrency_counts_gpus_as_well_as_cpus():
    gpu = _matrix({"use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 2})
    # The CPUs alone would hold floor(80 / 2.1) = 38 trials; the two GPUs hold two.
    assert default_concurrency(gpu, {"CPU": 80.0, "GPU": 2.0}) == 2
    # use_gpu with gpus_per_worker 0 still reserves one GPU per worker (as trials.run asks Ray Train).
    assert default_concurrency(_matrix({"use_gpu": True, "num_workers": 2}), {"CPU": 80.0, "GPU": 4.0}) == 2
    # CPU trials: 0.9 per worker + 0.1 per driver, two at once on two cores (the quickstart).
    assert default_concurrency(_matrix({"cpus_per_worker": 0.9}), {"CPU": 2.0}) == 2


def test_trials_no_node_can_hold_are_refused():
    check_fits_cluster(_matrix({"use_gpu": True, "gpus_per_worker": 2}), [GPU_NODE, CPU_NODE])
    with pytest.raises(
        QuailoraInputError,
        match=r"trial 'rank=4': one of its workers need\(s\) \{CPU: 1, GPU: 4\}, more than any node",
    ):
        check_fits_cluster(_matrix({"use_gpu": True, "gpus_per_worker": 4}), [GPU_NODE, CPU_NODE])
    # Two 2-GPU workers fit on two GPU nodes, but not on a cluster with one.
    two = _matrix({"use_gpu": True, "gpus_per_worker": 2, "num_workers": 2})
    check_fits_cluster(two, [GPU_NODE, GPU_NODE])
    with pytest.raises(
        QuailoraInputError, match=r"all its workers and driver need\(s\) .*GPU: 4.*more than the cluster has"
    ):
        check_fits_cluster(two, [GPU_NODE, CPU_NODE])
    with pytest.raises(QuailoraInputError, match=r"its driver need\(s\) \{head: 0.01, CPU: 0.1\}"):
        check_fits_cluster(_matrix({}, driver_resources={"head": 0.01}), [CPU_NODE])


def test_sampled_resources_are_checked_at_their_largest():
    matrix = _matrix(
        {"use_gpu": True, "gpus_per_worker": 1},
        space={"resources.num_workers": {"choice": [1, 3]}},
        search={"algorithm": "random"},
    )
    with pytest.raises(QuailoraInputError, match=r"all its workers and driver .*GPU: 3"):
        check_fits_cluster(matrix, [GPU_NODE])
    assert default_concurrency(matrix, {"CPU": 32.0, "GPU": 6.0}) == 2


def test_grouped_asha_prunes_learning_rates_within_an_arm_not_arms_against_each_other():
    """Ray's ASHA and Trial objects, no cluster: two arms x two learning rates; the 8-bit arm's perplexities are
    all lower than the 4-bit arm's, so one global ASHA would stop 4-bit QLoRA itself."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from orchestrator.tuning import _scheduler, param_space

    space = {
        "quant": {"grid": [{"method": "int8", "bits": 8}, {"method": "nf4", "bits": 4}]},
        "train.learning_rate": {"grid": [1e-3, 1e-4]},
    }
    asha = {"max_t": 8, "grace_period": 2, "reduction_factor": 2}
    grouped = _matrix({}, space=space, search={"asha": {**asha, "compare_across": ["train.learning_rate"]}})
    assert sorted(param_space(grouped)) == ["point", "sampled"]
    ppl = {(8, 1e-3): 10.0, (8, 1e-4): 11.0, (4, 1e-3): 20.0, (4, 1e-4): 21.0}

    def decisions(matrix) -> dict:
        scheduler, trials = _scheduler(matrix), []
        for index, point in enumerate(matrix.points):
            trial = Trial("driver", config={"point": index, "sampled": {}}, stub=True)
            scheduler.on_trial_add(None, trial)
            trials.append((point, trial))
        out = {}
        for point, trial in trials:  # in grid order: the 8-bit arm reaches the rung first
            key = (point.grid_values["quant"]["bits"], point.grid_values["train.learning_rate"])
            out[key] = scheduler.on_trial_result(None, trial, {"step": 2, "val_ppl": ppl[key]})
        return out

    stop, go = TrialScheduler.STOP, TrialScheduler.CONTINUE
    # Within each arm the first rate is kept (nothing to compare with yet), the worse second one stopped.
    assert decisions(grouped) == {(8, 1e-3): go, (8, 1e-4): stop, (4, 1e-3): go, (4, 1e-4): stop}
    flat = _matrix({}, space=space, search={"asha": asha})  # Ray's ASHA: the 4-bit arm loses to the 8-bit one
    assert decisions(flat)[(4, 1e-3)] == stop

    with pytest.raises(ValueError, match=r"compare_across: 'seed' is not a swept field"):
        _matrix({}, space=space, search={"asha": {**asha, "compare_across": ["seed"]}})
