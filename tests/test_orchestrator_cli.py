"""CLI: plan output, JSON Schema export, and bad input -> one line naming the field/address, exit 2, nothing started."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import ray
import yaml

from orchestrator import cli
from orchestrator.cli import main
from orchestrator.experiment import ExperimentState
from orchestrator.preflight import check_tracking_uri
from orchestrator.sweep_config import SweepConfig
from quailora.errors import QuailoraInputError
from tests.cli_output import refusal_line

QUICK = {
    "name": "cli-test",
    "base": {"model": {"path": "reference:llama-micro"}},
    "space": {"lora.rank": {"grid": [4, 8]}},
}


def _write(tmp_path: Path, data, name="sweep.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once closed


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _assert_one_line_error(capsys, *fragments):
    err = refusal_line(capsys.readouterr().err)
    for fragment in fragments:
        assert fragment in err, err


def _assert_nothing_started(tmp_path):
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists()  # no experiment dir, no MLflow database


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("name: x\nbase: {model: {path: a}\n", ["malformed YAML at line", "sweep.yaml"]),
        ({**QUICK, "spaces": {}}, ["spaces", "Extra inputs are not permitted"]),
        ({**QUICK, "search": {"max_failures": "often"}}, ["search.max_failures", "'often'"]),
        ({**QUICK, "space": {"lora.rank": {"grid": []}}}, ["space.lora.rank", "at least 1 item"]),
        ({**QUICK, "space": {}}, ["space: the search space is empty"]),
        (
            {**QUICK, "space": {"lora.rank": {"grid": [4]}}, "drop_if": ["lora.rank == 4"]},
            ["drop_if removed all"],
        ),
        ({**QUICK, "space": {"lora.rank": {"grid": ["big"]}}}, ["trial", "lora.rank", "'big'"]),
        (
            {**QUICK, "tracking_uri": f"http://127.0.0.1:{_closed_port()}"},
            ["tracking_uri", "cannot connect"],
        ),
        ({**QUICK, "devices": {"kind": "gpu"}}, ["resources.use_gpu=False", "devices.kind='gpu'"]),
        (
            {**QUICK, "base": {**QUICK["base"], "resources": {"use_gpu": True}}},
            ["resources.use_gpu=True", "devices.kind='cpu'"],
        ),
        (
            {
                **QUICK,
                "base": {**QUICK["base"], "resources": {"use_gpu": True, "gpus_per_worker": 2}},
                "devices": {"kind": "gpu"},
            },
            ["resources.gpus_per_worker=2", "reserved and idle"],
        ),
        (
            {
                **QUICK,
                "base": {
                    **QUICK["base"],
                    "resources": {"use_gpu": True, "gpus_per_worker": 0.5, "num_workers": 2},
                },
                "devices": {"kind": "gpu"},
            },
            ["resources.gpus_per_worker=0.5", "resources.num_workers=2", "NCCL"],
        ),
        (
            {**QUICK, "base": {**QUICK["base"], "resources": {"gpus_per_worker": 1}}},
            ["resources.gpus_per_worker=1 needs resources.use_gpu: true"],
        ),
    ],
)
def test_run_bad_input_exits_2_before_starting_anything(tmp_path, capsys, content, fragments):
    assert main(["run", _write(tmp_path, content)]) == 2
    _assert_one_line_error(capsys, *fragments)
    _assert_nothing_started(tmp_path)


def test_unreachable_cluster_address(tmp_path, capsys):
    port = _closed_port()
    assert main(["run", _write(tmp_path, QUICK), "--address", f"127.0.0.1:{port}"]) == 2
    _assert_one_line_error(capsys, "--address", f"127.0.0.1:{port}", "cannot connect")
    _assert_nothing_started(tmp_path)


def test_missing_config_and_unknown_experiment(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    _assert_one_line_error(capsys, "nope.yaml", "does not exist")
    assert main(["resume", "never-ran"]) == 2
    _assert_one_line_error(capsys, "never-ran", "quailora_sweep.json")
    _assert_nothing_started(tmp_path)


def test_resume_without_tune_state_is_one_line_error(tmp_path, capsys):
    # The sweep's record exists (written before Ray starts) but its Tuner never saved any state.
    ExperimentState.for_sweep(SweepConfig.model_validate(QUICK)).save()
    assert main(["resume", "cli-test"]) == 2
    _assert_one_line_error(capsys, "runs/cli-test", "no Tune state to resume")
    assert not ray.is_initialized()


NOT_UTF8 = {
    "binary": bytes(range(256)),
    "utf-16": "name: x\nbase: {model: {path: a}}\n".encode("utf-16"),
    "latin-1": "name: café\nbase: {model: {path: a}}\n".encode("latin-1"),
}


@pytest.mark.parametrize("command", ["plan", "run", "trial", "resume"])
@pytest.mark.parametrize("encoding", sorted(NOT_UTF8))
def test_config_that_is_not_utf8_text_is_one_line_error(tmp_path, capsys, command, encoding):
    if command == "resume":  # resume reads the sweep's record, which `run` wrote
        path = tmp_path / "runs" / "cli-test" / "quailora_sweep.json"
        path.parent.mkdir(parents=True)
        args = ["resume", "cli-test"]
    else:
        path = tmp_path / "config.yaml"
        args = [command, str(path)]
    path.write_bytes(NOT_UTF8[encoding])
    assert main(args) == 2
    _assert_one_line_error(capsys, str(path.name), "is not UTF-8 text")
    assert not ray.is_initialized()


def test_trial_config_with_malformed_yaml_is_one_line_error(tmp_path, capsys):
    path = tmp_path / "trial.yaml"
    path.write_text("model: {path: x\n")
    assert main(["trial", str(path)]) == 2
    _assert_one_line_error(capsys, "trial.yaml", "malformed YAML at line")


def test_optional_commands_skip_only_an_absent_package(tmp_path, monkeypatch):
    package = tmp_path / "broken_optional"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "commands.py").write_text("import a_dependency_that_is_not_installed\n")
    with monkeypatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        patch.setattr(cli, "OPTIONAL_COMMANDS", ("absent_optional_package.commands",))
        assert "plan" in _subcommands(cli.build_parser())  # not installed: its subcommands are left out
        patch.setattr(cli, "OPTIONAL_COMMANDS", ("broken_optional.commands",))
        with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
            cli.build_parser()  # installed but broken: raised, not hidden
    assert {"models", "trial"} <= _subcommands(cli.build_parser())


def _subcommands(parser) -> set[str]:
    (sub,) = (a for a in parser._actions if a.dest == "command")
    return set(sub.choices)


def test_plan_refuses_trials_that_do_not_fit(tmp_path, capsys):
    from tests.test_orchestrator_memory import LLAMA_7B

    (tmp_path / "llama-7b").mkdir()
    (tmp_path / "llama-7b" / "config.json").write_text(json.dumps(LLAMA_7B))
    sweep = {
        "name": "llama7b",
        "base": {"model": {"path": str(tmp_path / "llama-7b"), "dtype": "bfloat16"},
                 "lora": {"rank": 16}, "data": {"seq_len": 512}, "train": {"batch_size": 1, "precision": "bf16"},
                 "resources": {"use_gpu": True, "gpus_per_worker": 1}},
        "space": {"quant": {"grid": [{"method": "nf4", "bits": 4}, {"method": "int8", "bits": 8}]}},
        "devices": {"kind": "gpu", "memory_gb": 9},
    }  # fmt: skip
    assert main(["plan", _write(tmp_path, sweep)]) == 2
    out, err = capsys.readouterr()
    assert "| quant=nf4-4 " in out, out
    assert "7.82 | yes" in out and "11.04 | NO" in out
    assert "1 trial(s) cannot fit devices.memory_gb=9" in err and "quant=int8-8" in err
    sweep["devices"]["memory_gb"] = 12
    assert main(["plan", _write(tmp_path, sweep)]) == 0
    _assert_nothing_started(tmp_path)


def test_plan_groups_rows_by_footprint_and_trials_lists_every_one(tmp_path, capsys):
    """Issue 27 item 6: the summary first, then one row per distinct footprint with its count; the seed
    changes no footprint. `--trials` prints a row per trial."""
    sweep = _write(tmp_path, {**QUICK, "space": {**QUICK["space"], "seed": {"grid": [0, 1, 2]}}})
    assert main(["plan", sweep]) == 0
    out = capsys.readouterr().out
    assert out.index("summary: 6 trials") < out.index("2 distinct footprint(s) over 6 grid point(s)")
    assert "initialize 6 x " in out and "checkpoints (" in out and "artifacts (" in out
    rows = [line for line in out.splitlines() if line.startswith("|") and "_seed=" in line]
    assert [row.split("|")[1:3] for row in rows] == [
        ["             3 ", " rank=4_seed=0 "],
        ["             3 ", " rank=8_seed=0 "],
    ]
    assert main(["plan", sweep, "--trials"]) == 0
    out = capsys.readouterr().out
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| rank=")] == [
        f"rank={r}_seed={s}" for r in (4, 8) for s in (0, 1, 2)
    ]
    _assert_nothing_started(tmp_path)


def test_schema_export(tmp_path):
    out = tmp_path / "schema.json"
    assert main(["schema", "-o", str(out)]) == 0
    schema = json.loads(out.read_text())
    assert schema["title"] == "SweepConfig" and schema["additionalProperties"] is False


def test_status_with_no_experiments(tmp_path, capsys):
    assert main(["status"]) == 0
    assert "no experiments under" in capsys.readouterr().out


class _MlflowLike(BaseHTTPRequestHandler):
    """Answers like an MLflow server on /health and its API, and like some other web server elsewhere;
    with `refuse_host`, like `mlflow server` whose --allowed-hosts leave this Host header out."""

    refuse_host = False

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        api = self.path.startswith("/api/2.0/mlflow/")
        if api and self.refuse_host:
            self.send_response(403)
            self.end_headers()
            self.wfile.write(b"Invalid Host header - possible DNS rebinding attack detected")
            return
        self.send_response(200 if self.path == "/health" or api else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(params=[False, True], ids=["allowed", "host-refused"])
def http_server(request):
    handler = type("Handler", (_MlflowLike,), {"refuse_host": request.param})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", request.param
    server.shutdown()


def test_tracking_uri_must_be_an_mlflow_server_that_takes_its_host_header(http_server):
    uri, refuses_host = http_server
    if refuses_host:  # /health answers any Host; the API then 403s every trial, after its stages ran
        with pytest.raises(QuailoraInputError, match=r"refuses the Host header .*--allowed-hosts 127.0.0.1:"):
            check_tracking_uri(uri)
    else:
        check_tracking_uri(uri)
    with pytest.raises(
        QuailoraInputError, match=r"tracking_uri .*/not-mlflow.*HTTP 404 .*not an MLflow tracking server"
    ):
        check_tracking_uri(f"{uri}/not-mlflow")


HEAVY_MODULES = ("torch", "bitsandbytes", "transformers", "peft", "mlflow", "pandas", "ray", "matplotlib")


@pytest.mark.parametrize("argv", [["--help"], ["plan", "configs/quickstart.yaml"], ["schema"]])
def test_commands_that_compute_nothing_import_no_heavy_module(argv):
    """What made `quailora --help` take 5.6 s and `plan` 6.9 s: torch, bitsandbytes & co. imported before the
    arguments were parsed. A fresh interpreter runs the command and lists what it imported. `plan` derives a
    model's shapes through transformers once per config and keeps them (orchestrator/model_shapes.py): the
    command runs twice, and the second run must import nothing heavy."""
    script = (
        "import sys, contextlib, io\n"
        "from orchestrator.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    main({argv!r})\n"
        f"print([m for m in {HEAVY_MODULES!r} if m in sys.modules])\n"
    )
    repo = Path(__file__).resolve().parents[1]
    for _ in range(2 if argv[0] == "plan" else 1):
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_the_train_controller_unpickles_the_trial_function_without_the_worker_imports():
    """Ray pickles the trial's train function by reference, so the Train controller imports its module on
    every trial: that module (trials/entry.py) must leave torch, peft and DeepSpeed to the workers."""
    from ray import cloudpickle

    from trials.run import train_loop

    script = (
        "import sys\n"
        "from ray import cloudpickle\n"
        "cloudpickle.loads(sys.stdin.buffer.read())\n"
        "print([m for m in ('torch', 'peft', 'deepspeed', 'bitsandbytes', 'transformers') if m in sys.modules])\n"
    )
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, input=cloudpickle.dumps(train_loop), capture_output=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip().splitlines()[-1] == "[]", done.stdout


def test_a_refusal_is_one_line_on_stderr_whatever_other_packages_log(tmp_path):
    """Issue 32: a new release of `kernels` added a warning on import, and the one-line refusal became two.
    Here every kind of chatter is made while the command runs (transformers', the hub client's and plain
    library loggers, a Python warning): stderr holds only what must be seen (a third-party ERROR, the
    project's own warning) and the refusal; the chatter is in the log file."""
    bad = _write(tmp_path, {**QUICK, "bogus": 1})
    script = (
        "import logging, sys, warnings\n"
        "from orchestrator import cli\n"
        "load = cli._load\n"
        "def noisy(path):\n"
        "    import huggingface_hub.utils.logging as hub, transformers.utils.logging as tf\n"
        "    tf.get_logger('transformers.chat').warning('transformers chatter')\n"
        "    hub.get_logger('huggingface_hub.chat').warning('hub chatter')\n"
        "    logging.getLogger('kernels._internals.hf_hub').warning('Skipping publisher trust check')\n"
        "    warnings.warn('a FutureWarning of a dependency', FutureWarning)\n"
        "    logging.getLogger('somelib').error('a real third-party error')\n"
        "    logging.getLogger('trials.chat').warning('our own warning')\n"
        "    return load(path)\n"
        "cli._load = noisy\n"
        f"sys.exit(cli.main(['plan', {bad!r}]))\n"
    )
    log = tmp_path / "logs" / "cli.log"
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120,
        env={**os.environ, "QUAILORA_LOG_FILE": str(log)},
    )  # fmt: skip
    assert done.returncode == 2
    refusal = refusal_line(done.stderr)
    assert "bogus" in refusal and "Extra inputs are not permitted" in refusal
    assert done.stderr.splitlines() == ["a real third-party error", "our own warning", refusal]
    routed = log.read_text()
    for chatter in ("transformers chatter", "hub chatter", "Skipping publisher trust check", "FutureWarning"):
        assert chatter in routed, routed
    assert "our own warning" not in routed


def test_output_piped_into_a_reader_that_leaves_early_is_no_error():
    """`quailora plan big.yaml | head -1`: the rest of the table (~100 KB, more than a pipe holds) has nowhere
    to go, and that is fine."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        f"{sys.executable} -c 'from orchestrator.cli import main; import sys; sys.exit(main())' "
        "plan configs/fair_comparison.yaml | head -1",
        shell=True, cwd=repo, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.stdout.startswith("sweep 'fair-comparison-asha': 360 trials") and done.stderr == "", (
        done.stderr
    )
