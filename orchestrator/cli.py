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
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from orchestrator.log_routing import route_third_party_logs
from quailora.errors import QuailoraInputError
from reference.cli_registry import Commands, arg

EXIT_BAD_INPUT = 2
# Each command declared on its handler (reference/cli_registry.py), as reference/ and trials/ declare theirs.
COMMANDS = Commands()
command = COMMANDS.command
# Modules of the other packages whose `COMMANDS` are added after these (`models`, `trial`).
OPTIONAL_COMMANDS = ("reference.commands", "trials.commands")


def _load(path: str):
    from orchestrator.sweep_config import load_sweep

    try:
        return load_sweep(path)
    except ValidationError as exc:
        from orchestrator.expand import describe_validation_error

        raise QuailoraInputError(describe_validation_error(exc, path)) from None


@command(
    "plan",
    "print the sweep's summary (stage computations, disk), resources and memory estimates; "
    "refuse what cannot fit",
    arg("config"),
    arg(
        "--trials", action="store_true", help="one table row per trial (default: one per distinct footprint)"
    ),
)
def _plan(args: argparse.Namespace) -> int:
    from orchestrator.expand import expand
    from orchestrator.plan import describe, plan_trials, refuse_misfits

    matrix = expand(_load(args.config))
    planned = plan_trials(matrix)
    print(describe(matrix, planned, every_trial=args.trials))
    refuse_misfits(matrix, planned)
    return 0


@command(
    "run",
    "run a sweep on an embedded local Ray or an existing cluster",
    arg("config"),
    arg("--address", help="existing Ray cluster (host:port or ray://host:port); default: start a local one"),
)
def _run(args: argparse.Namespace) -> int:
    from orchestrator.runner import run

    return run(_load(args.config), args.address)


EXPERIMENT_ARGUMENTS = (  # resume's and report's
    arg("experiment", help="experiment name (under --storage) or its directory"),
    arg("--storage", help="storage path the sweep used (default ./runs)"),
)


@command(
    "resume", "continue a sweep without rerunning finished trials", *EXPERIMENT_ARGUMENTS, arg("--address")
)
def _resume(args: argparse.Namespace) -> int:
    from orchestrator.runner import resume

    return resume(args.experiment, args.storage, args.address)


@command(
    "report",
    "tables, plots and HTML of a sweep",
    *EXPERIMENT_ARGUMENTS,
    arg("--with", dest="follow_ups", action="append", default=[], metavar="EXPERIMENT",
        help="a follow-up sweep (same --storage, same tracking store) whose trials join the report; repeatable"),
)  # fmt: skip
def _report(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from orchestrator.experiment import ExperimentState
    from orchestrator.preflight import check_tracking_uri
    from orchestrator.report import publish_report

    states = [ExperimentState.load(name, args.storage) for name in (args.experiment, *args.follow_ups)]
    state = states[0]
    check_tracking_uri(state.tracking_uri)
    for other in states:
        if not other.parent_run_id:
            raise QuailoraInputError(f"experiment {other.name!r} has not started (no MLflow parent run)")
        if other.tracking_uri != state.tracking_uri:
            raise QuailoraInputError(
                f"--with {other.name}: its tracking store is {other.tracking_uri}, not {state.tracking_uri}"
            )
    print(publish_report(MlflowClient(state.tracking_uri), state, states[1:]))
    return 0


@command(
    "status",
    "experiments under the storage path, and the Ray cluster if --address is given",
    arg("--storage"),
    arg("--address"),
)
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


@command(
    "cache",
    "the shared stage cache: list entries, or prune them",
    arg("action", choices=["ls", "prune"]),
    arg("--path", help="cache root (default: ./runs/cache, the sweeps' default cache_path)"),
    arg("--older-than", help="prune: remove entries unused for this long, e.g. 7d, 12h"),
    arg("--max-size", help="prune: then remove least recently used entries down to this, e.g. 50G"),
)
def _cache(args: argparse.Namespace) -> int:
    from orchestrator.cache_commands import list_entries, prune_entries, resolve_cache

    cache = resolve_cache(args.path)
    print(
        list_entries(cache) if args.action == "ls" else prune_entries(cache, args.older_than, args.max_size)
    )
    return 0


@command(
    "export",
    "a finished trial's model as files stock transformers and peft load",
    arg("run_id", help="the trial's MLflow run id"),
    arg("dir", help="where to write (new or empty)"),
    arg("--tracking-uri", help="MLflow tracking URI (default: sqlite under ./runs, as sweeps use)"),
    arg(
        "--merged",
        action="store_true",
        help="fold the adapter in: INT-k for QA-LoRA, float weights otherwise",
    ),
)
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


@command("architectures", "the architectures quailora is tested on, and what runs untested")
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


@command("schema", "export the sweep config JSON Schema", arg("--output", "-o"))
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
    COMMANDS.add_to(sub)
    _add_optional(sub)
    return parser


def _add_optional(sub: argparse._SubParsersAction) -> None:
    """The commands (`COMMANDS`) of OPTIONAL_COMMANDS whose package is installed.

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
        mod.COMMANDS.add_to(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    route_third_party_logs()
    try:
        return args.func(args) or 0
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
