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
