"""``quailora trial CONFIG.yaml``: one trial without the orchestrator, for debugging a config or a method."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from quailora.errors import QuailoraInputError
from reference.cli_registry import Commands, arg
from trials.config import TrialConfig, read_yaml_file

DEFAULT_ROOT = Path("runs") / "trials"


def load_trial_config(path: str | Path) -> TrialConfig:
    """A TrialConfig from YAML; schema errors become one QuailoraInputError naming each bad field."""
    path = Path(path)
    if not path.is_file():
        raise QuailoraInputError(f"trial config {str(path)!r}: file not found")
    try:
        return TrialConfig.model_validate(read_yaml_file(path, "trial config") or {})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors())
        raise QuailoraInputError(f"{path}: {problems}") from None


COMMANDS = Commands()


@COMMANDS.command(
    "trial",
    "run one trial from a TrialConfig YAML, without the orchestrator",
    arg("config", help="TrialConfig YAML (see configs/trial_micro.yaml)"),
    arg("--root", default=str(DEFAULT_ROOT), help="where the default MLflow store and Ray storage go"),
    arg("--tracking-uri", default=None, help="MLflow URI (default: SQLite under --root)"),
    arg("--storage-path", default=None, help="Ray Train storage (default: <root>/ray)"),
    arg("--cache-path", default=None, help="stage cache shared with other trials (default: <root>/cache)"),
    arg(
        "--no-shared-cache", action="store_true", help="keep this trial's stages private (no reuse by others)"
    ),
    arg("--experiment", default="quailora-trials", help="MLflow experiment name"),
    arg("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)"),
    arg(
        "--ray-address", default=None, help="join this Ray cluster ('auto', host:port) instead of a local one"
    ),
)
def run_trial_command(args: argparse.Namespace) -> int:
    from trials.run import TrialStoppedError, ensure_ray, run_trial
    from trials.tracking import default_tracking_uri
    from trials.validation import validate_trial

    config = load_trial_config(args.config)
    validate_trial(config)  # bad input (an unsupported architecture, ...) exits 2 before Ray starts
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    ensure_ray(args.ray_address, num_cpus=args.num_cpus)
    try:
        metrics = run_trial(
            config,
            tracking_uri=args.tracking_uri or default_tracking_uri(root),
            experiment_name=args.experiment,
            storage_path=args.storage_path or str(root / "ray"),
            cache_path=None if args.no_shared_cache else (args.cache_path or str(root / "cache")),
        )
    except TrialStoppedError as err:
        print(f"quailora trial: {err}", file=sys.stderr)
        return 1
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m trials.commands CONFIG.yaml``) for when the orchestrator is not installed."""
    parser = argparse.ArgumentParser(prog="quailora")
    COMMANDS.add_to(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["trial", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.func(args)
    except QuailoraInputError as err:
        print(f"quailora trial: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
