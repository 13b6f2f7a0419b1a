import os
import tempfile

# No hub anywhere: every test runs offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI's routed third-party log records (orchestrator/log_routing.py) stay out of ~/.cache.
os.environ.setdefault(
    "QUAILORA_LOG_FILE", os.path.join(tempfile.mkdtemp(prefix="quailora-test-logs-"), "cli.log")
)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# testkit's checks (testkit/sweeps.py) assert: rewrite them as pytest rewrites a test's own asserts.
pytest.register_assert_rewrite("testkit")

RAY_OPTIONS = {"num_cpus": 2, "object_store_memory": 100 * 2**20, "log_to_driver": False}


@pytest.fixture(scope="session")
def micro_trial(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The default micro trial's files, (checkpoint, texts): a llama with its tokenizer (testkit/micro.py)
    and the train, validation, calibration and test splits. Built once for the session: read only."""
    from testkit.micro import make_texts, make_trial_checkpoint

    root = tmp_path_factory.mktemp("micro_trial")
    return make_trial_checkpoint(root / "ckpt"), make_texts(root)


@pytest.fixture(scope="module")
def local_ray():
    """The suite's one local Ray start (trials.run.ensure_ray, 2 CPUs, a 100 MiB object store, worker logs
    kept off the driver's captured output) for a module's trials and sweeps, shut down after the module.
    Code under test that finds it uses it and leaves it running (`run`, `resume`, run_trial)."""
    import ray

    from trials.run import ensure_ray

    assert ensure_ray(**RAY_OPTIONS), "a Ray instance was already up: a previous module left it running"
    yield
    ray.shutdown()
