"""Multi-node: real micro-model trials on a `ray.cluster_utils.Cluster` (several Ray nodes on one machine).

The head node carries a `head` resource that only trial drivers ask for, so drivers (and the Train
controllers Ray pins to their node) stay on the head while the trials' Train workers, which need a whole
CPU, can only run on the worker nodes. Where each worker ran is read from the GCS actor table.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from orchestrator.cli import main
from orchestrator.experiment import ExperimentState
from orchestrator.tracking import child_runs
from tests.cli_output import refusal_line
from tests.mlflow_server import mlflow_server
from tests.ports import free_ports
from tests.test_orchestrator_e2e import MICRO_BASE as E2E_MICRO_BASE

pytestmark = pytest.mark.slow

# The e2e sweep's micro trial, with a whole CPU per worker: each worker node has one.
MICRO_BASE = {**E2E_MICRO_BASE, "resources": {"num_workers": 1, "cpus_per_worker": 1}}
NODE_ARGS = {"num_cpus": 1, "object_store_memory": 80 * 1024**2}
TRAIN_WORKER = "RayTrainWorker"


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A cluster of several nodes refuses a file store (orchestrator/cluster_preflight.py): a real server."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture
def cluster():
    # Fast node-death detection, so a killed node fails its trial in seconds.
    head = {**NODE_ARGS, "resources": {"head": 1}, "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}}  # fmt: skip
    c = Cluster(initialize_head=True, head_node_args=head)
    workers = [c.add_node(**NODE_ARGS) for _ in range(2)]
    c.wait_for_nodes()
    yield c, workers
    c.shutdown()


def _sweep(
    tmp_path: Path, name: str, space: dict, train: dict | None = None, tracking: str | None = None
) -> str:
    base = {**MICRO_BASE, "train": {**MICRO_BASE["train"], **(train or {})}}
    sweep = {"name": name, "base": base, "space": space, "driver_cpus": 0.05, "tracking_uri": tracking,
             "driver_resources": {"head": 0.01}, "search": {"max_concurrent_trials": 2, "max_failures": 1}}  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return str(path)


def _train_workers(c: Cluster, state: str | None = None) -> list[dict]:
    actors = c.global_state.actor_table(None).values()
    return [a for a in actors if a["ActorClassName"] == TRAIN_WORKER and state in (None, a["State"])]


def _finished_children(name: str) -> list:
    state = ExperimentState.load(name)
    runs = child_runs(MlflowClient(state.tracking_uri), state.parent_run_id)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert math.isfinite(run.data.metrics["val_ppl_final"])
    return runs


def _logged_initial_ppl(name: str) -> bool:
    try:
        state = ExperimentState.load(name)
        runs = child_runs(MlflowClient(state.tracking_uri), state.parent_run_id)
    except Exception:  # the sweep has not written its state or database yet
        return False
    return any("val_ppl_init" in run.data.metrics for run in runs)


def test_trials_spread_across_nodes(cluster, tracking, tmp_path, monkeypatch):
    c, workers = cluster
    monkeypatch.chdir(tmp_path)
    config = _sweep(tmp_path, "spread", {"lora.rank": {"grid": [4, 8]}}, tracking=tracking)
    assert main(["run", config, "--address", c.address]) == 0

    assert len(_finished_children("spread")) == 2
    used = {a["Address"]["NodeID"] for a in _train_workers(c)}
    assert used == {w.node_id for w in workers}  # one trial's worker on each worker node, none on the head


def test_node_killed_during_a_trial_is_retried_to_completion(
    cluster, tracking, tmp_path, monkeypatch, capsys
):
    c, workers = cluster
    monkeypatch.chdir(tmp_path)
    killed: list[str] = []

    def kill_the_worker_node_once_training_started() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            alive = _train_workers(c, "ALIVE")
            if alive and _logged_initial_ppl("node-failure"):  # the worker group is up and training
                node = next(w for w in workers if w.node_id == alive[0]["Address"]["NodeID"])
                killed.append(node.node_id)
                c.remove_node(node, allow_graceful=False)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_the_worker_node_once_training_started, daemon=True)
    killer.start()
    # train.max_failures=0: the trial itself fails, so the sweep's Tune FailureConfig is what retries it.
    config = _sweep(
        tmp_path,
        "node-failure",
        {"lora.rank": {"grid": [4]}},
        train={"max_failures": 0, "max_steps": 100},
        tracking=tracking,
    )
    assert main(["run", config, "--address", c.address]) == 0
    killer.join(timeout=5)

    assert killed, "no Train worker was seen alive"
    assert "retrying" in capsys.readouterr().out  # Tune restarted the failed trial
    runs = _finished_children("node-failure")
    assert len(runs) == 1  # the retry reused the trial's MLflow run
    nodes = [a["Address"]["NodeID"] for a in sorted(_train_workers(c), key=lambda a: a["StartTime"])]
    assert nodes[0] == killed[0] and nodes[-1] != killed[0]  # the retry ran on the surviving node


@pytest.fixture
def token_head(tmp_path):
    """A real `ray start --head` with token authentication on (as Ray 2.60 does when the head has a token),
    on free ports, with its own token file and temp dir, so nothing of this machine's Ray setup is used."""
    token = tmp_path / "cluster_token"
    token.write_text(uuid.uuid4().hex)
    flags = ("port", "node-manager-port", "object-manager-port", "dashboard-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")  # fmt: skip
    ports = dict(zip(flags, free_ports(len(flags)), strict=True))
    # The workers' range must hold none of those ports: Ray refuses to start when one falls inside it.
    workers = next(
        p for p in iter(lambda: free_ports(1)[0], None) if not any(p <= q <= p + 100 for q in ports.values())
    )
    temp_dir = tempfile.mkdtemp(prefix="qray")  # short: Ray's socket paths must stay under 108 bytes
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "2",
               "--resources", '{"head": 1}', "--include-dashboard", "false", "--disable-usage-stats",
               "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
               "--min-worker-port", str(workers), "--max-worker-port", str(workers + 100),
               *(arg for flag, port in ports.items() for arg in (f"--{flag}", str(port)))]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (tmp_path / "head.log").read_text():
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()
            time.sleep(0.5)
        yield f"127.0.0.1:{ports['port']}", token
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # the head's session: GCS, raylet, agents and workers
        head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cli_in_own_process(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter: Ray keeps a process's authentication mode and token once read, so a
    token-authenticated join in pytest's own process would make every later local `ray.init` of the suite
    fail to authenticate with its own GCS."""
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
            "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}  # fmt: skip
    script = f"import sys; from orchestrator.cli import main; sys.exit(main({args!r}))"
    return subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120,
        env={**base, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env},
    )  # fmt: skip


def test_a_token_authenticated_head_is_joined_with_this_machines_token(token_head, tmp_path):
    address, token = token_head
    home = tmp_path / "home"  # no ~/.ray/auth_token
    config = _sweep(tmp_path, "token", {"lora.rank": {"grid": [4]}}, train={"max_steps": 2})

    began = time.monotonic()
    done = _cli_in_own_process(["run", str(config), "--address", address], tmp_path, HOME=str(home))
    assert done.returncode == 2, done.stderr  # no token here: say what to set, at once
    assert time.monotonic() - began < 20
    err = refusal_line(done.stderr)
    assert "requires token authentication" in err and "RAY_AUTH_MODE=token" in err, err
    assert not (tmp_path / "runs").exists()

    # The cluster's token on this machine, RAY_AUTH_MODE unset (what `ray start --head` users have): the
    # driver joins. `status` joins exactly as `run` does (preflight, then ray.init(address)), without a sweep.
    done = _cli_in_own_process(
        ["status", "--address", address], tmp_path, HOME=str(home), RAY_AUTH_TOKEN_PATH=str(token)
    )
    assert done.returncode == 0, done.stderr
    assert f"ray cluster {address}: 1 alive node(s); CPU 2/2 free" in done.stdout
