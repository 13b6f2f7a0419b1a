"""A sweep on a faithful multi-node cluster: nodes with their own addresses and node-local disks (tests/netns_cluster.py).

One cluster start (a 0-CPU head with an `mlflow server`, two 1-CPU worker nodes) serves every test here.
The driver runs on the head node, as `quailora run --address` does there; the sweep's directories are
either in `shared` (the "NFS" mount every node sees) or on a node's own /tmp or ~/.cache. Worker nodes have
the dependencies but not the project's packages: the sweep's job ships them (issue 26 item 4).
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import yaml

from tests.cli_output import refusal_line
from tests.mlflow_server import server_command
from tests.netns_cluster import REPO, NamespacedCluster, available
from tests.test_orchestrator_e2e import MICRO_BASE as E2E_MICRO_BASE

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available()))]

MLFLOW_PORT = 5000
TRAIN_WORKER = "ray::RayTrainWorker"
MICRO_BASE = {**E2E_MICRO_BASE, "resources": {"num_workers": 1, "cpus_per_worker": 1}}


@pytest.fixture(scope="module")
def cluster():
    with NamespacedCluster(workers=2) as c:
        allowed, default = c.shared / "mlflow", c.shared / "mlflow-default-hosts"
        for root in (allowed, default):
            root.mkdir()
        c.start(c.head, server_command(c.head.ip, MLFLOW_PORT, allowed, "--allowed-hosts", f"{c.head.ip}:{MLFLOW_PORT}"),
                c.root / "mlflow.log")  # fmt: skip
        # And one left at mlflow's default --allowed-hosts, which 198.18.0.0/15 is not part of.
        c.start(c.head, server_command(c.head.ip, MLFLOW_PORT + 1, default), c.root / "mlflow2.log")
        c.tracking_uri = f"http://{c.head.ip}:{MLFLOW_PORT}"
        for port in (MLFLOW_PORT, MLFLOW_PORT + 1):
            c._wait_for(lambda port=port: c._port_open(c.head, port), f"the MLflow server on port {port}")
        yield c


def _quailora(c: NamespacedCluster, args: list[str], timeout: float = 600):
    """`quailora ARGS` on the head node, from the shared directory."""
    script = f"import sys; from orchestrator.cli import main; sys.exit(main({args!r}))"
    return c.run(c.head, [sys.executable, "-c", script], timeout=timeout)


def _sweep(c: NamespacedCluster, name: str, **fields) -> str:
    sweep = {"name": name, "base": MICRO_BASE, "space": {"lora.rank": {"grid": [4]}}, "driver_cpus": 0,
             "driver_resources": {"head": 0.01}, "tracking_uri": c.tracking_uri,
             "storage_path": str(c.shared / "runs"), **fields}  # fmt: skip
    path = c.shared / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return str(path)


def test_node_local_paths_and_file_tracking_are_refused_before_compute(cluster):
    c = cluster
    on_head = c.run(c.head, [sys.executable, "-c", (  # a checkpoint on the head's own disk, and a hub
        # snapshot in its own hub cache (~/.cache/huggingface, resolved offline by huggingface_hub)
        "from pathlib import Path; from testkit.micro import make_trial_checkpoint; "
        "make_trial_checkpoint(Path('/tmp/head-model')); "
        "repo = Path.home() / '.cache/huggingface/hub/models--test--micro'; "
        "make_trial_checkpoint(repo / 'snapshots' / ('0' * 40)); "
        "(repo / 'refs').mkdir(); (repo / 'refs' / 'main').write_text('0' * 40)")], timeout=300)  # fmt: skip
    assert on_head.returncode == 0, on_head.stderr[-2000:]
    workers = [n.ip for n in c.nodes[1:]]
    cases = [  # (sweep fields, what the one line must name)
        ({"tracking_uri": None}, ["tracking_uri", "sqlite:///", "3 nodes", "http://"]),
        ({"tracking_uri": f"http://{c.head.ip}:{MLFLOW_PORT + 1}"}, ["refuses the Host header", "--allowed-hosts"]),
        ({"storage_path": "/tmp/runs"}, ["storage_path: '/tmp/runs'", *workers]),
        ({"cache_path": "~/.cache/stages"}, ["cache_path: '/root/.cache/stages'", *workers]),
        ({"base": {**MICRO_BASE, "model": {"path": "/tmp/head-model"}}}, ["model.path='/tmp/head-model'", *workers]),
        ({"base": {**MICRO_BASE, "model": {"path": "test/micro"}}}, ["model.path='test/micro'", "HF_HOME", *workers]),
    ]  # fmt: skip
    configs = [_sweep(c, f"refused-{i}", **fields) for i, (fields, _) in enumerate(cases)]
    # One process runs every refusal in turn, as six `quailora run` commands would (each connects to the
    # cluster and leaves it again), without paying the interpreter's start-up and imports six times.
    script = (
        "import contextlib, io, json, sys, time\nfrom orchestrator.cli import main\nresults = []\n"
        f"for config in {configs!r}:\n"
        "    err, began = io.StringIO(), time.monotonic()\n"
        "    with contextlib.redirect_stderr(err):\n"
        f"        code = main(['run', config, '--address', {c.address!r}])\n"
        "    results.append([code, err.getvalue(), time.monotonic() - began])\n"
        "print('RESULTS' + json.dumps(results))\n"
    )
    done = c.run(c.head, [sys.executable, "-c", script], timeout=600)
    assert done.returncode == 0 and "RESULTS" in done.stdout, done.stderr[-3000:]
    results = json.loads(done.stdout.split("RESULTS", 1)[1])
    for (code, stderr, seconds), (_, fragments) in zip(results, cases, strict=True):
        assert code == 2, stderr[-3000:]
        line = refusal_line(stderr)
        for fragment in fragments:
            assert fragment in line, line
        if "not seen from" in line:
            assert c.head.ip not in line.split("not seen from")[-1]  # the head (the driver's node) sees it
        assert seconds < 120
    # No experiment, no stage cache, no sentinel left behind; only the reference cache the checks built the
    # sweep's `reference:` model into (shared storage, as on one machine its ~/.cache: shared_reference_cache).
    assert [p.name for p in (c.shared / "runs").iterdir()] == ["reference"]
    assert not list(c.shared.glob("**/.quailora-preflight-*"))


@pytest.fixture(scope="module")
def shared_base(cluster) -> dict:
    """A trial base whose model and texts are in the shared directory."""
    c = cluster
    made = c.run(c.head, [sys.executable, "-c", (
        "from pathlib import Path; from testkit.micro import make_texts, make_trial_checkpoint; "
        f"make_trial_checkpoint(Path({str(c.shared / 'model')!r})); make_texts(Path({str(c.shared)!r}))")],
        timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    text = {name: str(c.shared / f"{name}.txt") for name in ("train", "validation", "calibration", "test")}
    return {**MICRO_BASE, "model": {"path": str(c.shared / "model")}, "init": {"method": "quailora"},
            "calibration": {**MICRO_BASE["calibration"], "dataset": text["calibration"]},
            "data": {**MICRO_BASE["data"], "train": text["train"], "validation": text["validation"],
                     "test": text["test"]}}  # fmt: skip


def test_a_sweep_on_shared_paths_runs_with_drivers_on_a_cpu_less_head(cluster):
    """Storage and cache in `shared`, tracking on the head's server, drivers on the head (driver_cpus 0), the
    model `reference:llama-micro` with the reference corpora: built once into the shared storage, not into
    the driver node's ~/.cache, so the checks pass, and three trials that share every stage (computed ahead
    by one stage job over both worker nodes) finish on the worker nodes. One has two workers of a whole CPU each, and each worker node has one CPU: it spans both
    nodes, whose hostnames resolve to 127.0.1.1 (tests/netns_cluster.py), so its process group must
    rendezvous over the Ray node addresses, and its rank on the second node gets the stage entries it reads
    from rank 0 over that process group (trials/stage_transfer.py), not from the cache."""
    c = cluster
    bare = c.run(c.nodes[1], [sys.executable, "-c", "import trials.run"], timeout=60)
    assert bare.returncode != 0 and "No module named 'trials.run'" in bare.stderr  # only the job brings it
    config = _sweep(c, "shared", base={**MICRO_BASE, "init": {"method": "quailora"}},
                    space={"resources.num_workers": {"grid": [2, 1]}, "train.learning_rate": {"grid": [3e-3, 1e-3]}},
                    drop_if=["resources.num_workers == 2 and train.learning_rate == 1e-3"],
                    search={"max_concurrent_trials": 2})  # fmt: skip
    done = _quailora(c, ["run", config, "--address", c.address])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = _child_runs(c, "shared")
    assert [r["status"] for r in runs] == ["FINISHED"] * 3, runs
    # The three share one calibration: the sweep's stage job computed it ahead, on both worker nodes.
    assert {r["tags"].get("quailora.stage.calibrate") for r in runs} == {"precomputed"}, runs
    sent = sorted((r["params"]["resources.num_workers"], r["metrics"]["stage_transfer_bytes"]) for r in runs)
    assert [workers for workers, n in sent if n > 0] == ["2"], sent  # to the spanning trial's second node
    assert not list(c.shared.glob("**/.quailora-preflight-*"))
    assert (c.shared / "runs" / "reference" / "models" / "llama-micro" / "config.json").is_file()


def test_a_worker_node_lost_mid_trial_is_retried_on_the_other(cluster, shared_base):
    """The node running the trial's worker dies (every process killed at once) after a checkpoint reached the
    shared storage: Tune retries the trial on the surviving node, in the same MLflow run. Last in the module:
    the cluster has one worker node fewer after it."""
    c = cluster
    train = {**shared_base["train"], "max_steps": 40, "checkpoint_every": 4, "max_failures": 0}
    config = _sweep(c, "node-loss", base={**shared_base, "train": train}, search={"max_failures": 1})
    script = f"import sys; from orchestrator.cli import main; sys.exit(main({['run', config, '--address', c.address]!r}))"
    driver = c.start(c.head, [sys.executable, "-c", script], c.root / "node-loss.log", PYTHONPATH=str(REPO))
    lost = survivor = None
    deadline = time.monotonic() + 400
    while driver.poll() is None and time.monotonic() < deadline:
        training = [n for n in c.nodes[1:] if any(TRAIN_WORKER in cmd for cmd in c.processes(n).values())]
        if lost is None and training and list(c.shared.glob("runs/node-loss/train/*/checkpoint_*")):
            lost = training[0]
            c.kill(lost)
        elif lost is not None and training and training[0] is not lost:
            survivor = training[0]
            break
        time.sleep(0.5)
    assert driver.wait(timeout=max(1, deadline - time.monotonic())) == 0, (
        c.root / "node-loss.log"
    ).read_text()[-4000:]
    assert lost is not None and survivor is not None and survivor is not lost
    log = (c.root / "node-loss.log").read_text()
    assert "retrying" in log, log[-6000:]  # Tune restarted the failed trial
    runs = _child_runs(c, "node-loss")
    assert [r["status"] for r in runs] == ["FINISHED"], runs  # the retry continued the trial's MLflow run


def _child_runs(c: NamespacedCluster, experiment: str) -> list[dict]:
    """The sweep's trial runs, read on the head (the tracking server is reachable only inside the cluster)."""
    script = (
        "import json; from mlflow.tracking import MlflowClient; "
        f"from orchestrator.experiment import ExperimentState; from orchestrator.tracking import child_runs; "
        f"state = ExperimentState.load({experiment!r}, {str(c.shared / 'runs')!r}); "
        "runs = child_runs(MlflowClient(state.tracking_uri), state.parent_run_id); "
        "print(json.dumps([{'status': r.info.status, 'tags': r.data.tags, 'params': r.data.params, "
        "'metrics': r.data.metrics} for r in runs]))"
    )
    done = c.run(c.head, [sys.executable, "-c", script], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
