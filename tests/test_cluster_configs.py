"""The cluster recipes of docs/cluster.md, checked as far as this machine can: none can be run here (no
cloud, no Kubernetes, no Slurm), so the launcher config is validated against the installed Ray's own schema,
the RayJob's entrypoint is parsed by our CLI, and the sbatch script is parsed by bash."""

from __future__ import annotations

import copy
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestrator.cli import build_parser

CLUSTER = Path(__file__).resolve().parents[1] / "configs" / "cluster"


def test_the_launcher_config_is_valid_for_the_installed_ray():
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's fill-in of defaults, then its JSON schema
    with pytest.raises(
        jsonschema.ValidationError, match="head_start_ray_comands"
    ):  # a misspelt field is caught
        bad = {**config, "head_start_ray_comands": config["head_start_ray_commands"]}
        validate_config(prepare_config(bad))
    head = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head and '"head": 1' in head  # drivers only: driver_cpus 0 + {head: 0.01}


def test_the_rayjob_runs_a_quailora_sweep_on_its_cluster():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    command = shlex.split(spec["entrypoint"])
    assert command[0].endswith("/quailora")
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.address) == ("run", "auto")
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # every pod mounts the shared volume at the same path
        assert [m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]] == ["/shared"]


def test_the_slurm_script_parses_and_gives_each_node_its_address():
    script = CLUSTER / "slurm.sbatch"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    assert text.count("--node-ip-address") == 2 and "RAY_AUTH_MODE=token" in text
