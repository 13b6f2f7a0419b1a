"""The `quailora` command: plan, run, resume, report, status and schema of sweeps, export of a trial (plus `models` and `trial`).

Bad input (YAML, schema, addresses) prints one line naming the field or address and exits 2
before any Ray cluster or MLflow run exists. Other packages' log records and warnings go to a log file
(orchestrator/log_routing.py), so that line stays the only one whatever they print.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from orchestrator.log_routing import route_third_party_logs
from quailora.errors import QuailoraInputError

EXIT_BAD_INPUT = 2
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
# Modules of the other packages whose `register(subparsers)` adds their subcommands (`models`, `trial`).
OPTIONAL_COMMANDS = ("reference.commands", "trials.commands")


def command(
    name: str,
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn

    return deco


def _load(path: str):
    from orchestrator.sweep_config import load_sweep

    try:
        return load_sweep(path)
    except ValidationError as exc:
        from orchestrator.expand import describe_validation_error

        raise QuailoraInputError(describe_validation_error(exc, path)) from None


@command("plan")
def _plan(args: argparse.Namespace) -> int:
    from orchestrator.expand import expand
    from orchestrator.plan import describe, plan_trials, refuse_misfits

    matrix = expand(_load(args.config))
    planned = plan_trials(matrix)
    print(describe(matrix, planned, every_trial=args.trials))
    refuse_misfits(matrix, planned)
    return 0


@command("run")
def _run(args: argparse.Namespace) -> int:
    from orchestrator.runner import run

    return run(_load(args.config), args.address)


@command("resume")
def _resume(args: argparse.Namespace) -> int:
    from orchestrator.runner import resume

    return resume(args.experiment, args.storage, args.address)


@command("report")
def _report(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from orchestrator.experiment import ExperimentState
    from orchestrator.preflight import check_tracking_uri
    from orchestrator.report import publish_report

    state = ExperimentState.load(args.experiment, args.storage)
    check_tracking_uri(state.tracking_uri)
    if not state.parent_run_id:
        raise QuailoraInputError(f"experiment {args.experiment!r} has not started (no MLflow parent run)")
    print(publish_report(MlflowClient(state.tracking_uri), state))
    return 0


@command("status")
def _status(args: argparse.Namespace) -> int:
    from orchestrator.preflight import check_ray_address
    from orchestrator.status import cluster_summary, experiments_table
    from orchestrator.sweep_config import default_storage_path

    check_ray_address(args.address)
    storage = args.storage or default_storage_path()
    table = experiments_table(storage)
    print(table.to_markdown(index=False) if not table.empty else f"no experiments under {storage}")
    if args.address:
        print(cluster_summary(args.address))
    return 0


@command("cache")
def _cache(args: argparse.Namespace) -> int:
    from orchestrator.cache_commands import list_entries, prune_entries, resolve_cache

    cache = resolve_cache(args.path)
    print(
        list_entries(cache) if args.action == "ls" else prune_entries(cache, args.older_than, args.max_size)
    )
    return 0


@command("export")
def _export(args: argparse.Namespace) -> int:
    from orchestrator.preflight import check_tracking_uri
    from orchestrator.sweep_config import DEFAULT_STORAGE
    from trials.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(DEFAULT_STORAGE)
    check_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise QuailoraInputError(f"--tracking-uri {uri!r}: no MLflow database there")
    from trials.export import README_FILE, export_run

    out = export_run(uri, args.run_id, args.dir, merged=args.merged)
    print(f"exported run {args.run_id} to {out}; how to load it: {out / README_FILE}")
    return 0


@command("architectures")
def _architectures(args: argparse.Namespace) -> int:
    from quailora.supported_architectures import SUPPORTED, UNTESTED

    width = max(map(len, SUPPORTED))
    for name, entry in SUPPORTED.items():
        print(f"{name:<{width}}  {entry.model_type:<{width}}  {entry.variant}")
    print(
        f"\n{len(SUPPORTED)} tested (docs/architectures.md). Any other causal LM transformers builds runs "
        f"{UNTESTED}: its layout is derived from its modules; one that cannot be derived is refused before compute."
    )
    return 0


@command("schema")
def _schema(args: argparse.Namespace) -> int:
    from orchestrator.sweep_config import SweepConfig

    text = json.dumps(SweepConfig.model_json_schema(), indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quailora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "plan",
        help="print the sweep's summary (stage computations, disk), resources and memory estimates; "
        "refuse what cannot fit",
    )
    p.add_argument("config")
    p.add_argument(
        "--trials", action="store_true", help="one table row per trial (default: one per distinct footprint)"
    )
    p = sub.add_parser("run", help="run a sweep on an embedded local Ray or an existing cluster")
    p.add_argument("config")
    p.add_argument(
        "--address", help="existing Ray cluster (host:port or ray://host:port); default: start a local one"
    )
    for name, text in [
        ("resume", "continue a sweep without rerunning finished trials"),
        ("report", "tables, plots and HTML of a sweep"),
    ]:
        p = sub.add_parser(name, help=text)
        p.add_argument("experiment", help="experiment name (under --storage) or its directory")
        p.add_argument("--storage", help="storage path the sweep used (default ./runs)")
        if name == "resume":
            p.add_argument("--address")
    p = sub.add_parser(
        "status", help="experiments under the storage path, and the Ray cluster if --address is given"
    )
    p.add_argument("--storage")
    p.add_argument("--address")
    p = sub.add_parser("cache", help="the shared stage cache: list entries, or prune them")
    p.add_argument("action", choices=["ls", "prune"])
    p.add_argument("--path", help="cache root (default: ./runs/cache, the sweeps' default cache_path)")
    p.add_argument("--older-than", help="prune: remove entries unused for this long, e.g. 7d, 12h")
    p.add_argument("--max-size", help="prune: then remove least recently used entries down to this, e.g. 50G")
    p = sub.add_parser("export", help="a finished trial's model as files stock transformers and peft load")
    p.add_argument("run_id", help="the trial's MLflow run id")
    p.add_argument("dir", help="where to write (new or empty)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under ./runs, as sweeps use)")
    p.add_argument(
        "--merged",
        action="store_true",
        help="fold the adapter in: INT-k for QA-LoRA, float weights otherwise",
    )
    sub.add_parser("architectures", help="the architectures quailora is tested on, and what runs untested")
    p = sub.add_parser("schema", help="export the sweep config JSON Schema")
    p.add_argument("--output", "-o")
    _register_optional(sub)
    return parser


def _register_optional(sub: argparse._SubParsersAction) -> None:
    """The subcommands of OPTIONAL_COMMANDS whose package is installed.

    Only the package (or its commands module) being absent is skipped; any other ImportError is a broken
    install or a bug inside the package, and is raised rather than silently dropping its subcommands.
    """
    for module in OPTIONAL_COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name not in (module, module.split(".")[0]):
                raise
            continue
        mod.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    route_third_party_logs()
    handler = COMMANDS.get(args.command) or getattr(args, "func", None)
    try:
        return handler(args) or 0
    except BrokenPipeError:  # `quailora plan ... | head`: the reader has gone; what is left to print, too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as the Python docs advise (signal)
        return 0
    except QuailoraInputError as exc:
        print(f"quailora {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValidationError as exc:
        from orchestrator.expand import describe_validation_error

        print(f"quailora {args.command}: error: {describe_validation_error(exc, exc.title)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
