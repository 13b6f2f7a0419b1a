"""`quailora models build|list|check`: the reference-model part of the CLI (wired in by orchestrator/cli.py)."""

from __future__ import annotations

import argparse

from reference.cli_registry import Commands, arg
from reference.specs import DEFAULT_MODELS, MODEL_SPECS, get_spec

# reference.cache (pretraining: torch, transformers) is imported in each command, not here: declaring the
# commands runs on every `quailora` start, before the arguments are parsed.


COMMANDS = Commands()
MODELS = COMMANDS.group(
    "models", "build, list and check the project's reference models", dest="models_command"
)


@MODELS.command(
    "build",
    "pretrain reference models into the cache (once per machine)",
    arg("names", nargs="*", default=list(DEFAULT_MODELS), help="default: the -tiny models"),
    arg("--force", action="store_true", help="rebuild even when an intact build exists"),
)
def cmd_build(args: argparse.Namespace) -> int:
    from reference.cache import build_model, model_metrics

    for name in args.names:
        get_spec(name)  # every name checked before the first build starts
    for name in args.names:
        path = build_model(name, force=args.force)
        metrics = model_metrics(name)
        print(
            f"{name}: {path}  validation perplexity {metrics['validation_perplexity']:.2f}"
            f" vs unigram {metrics['unigram_perplexity']:.2f}"
        )
    return 0


@MODELS.command("list", "known reference models, built or not")
def cmd_list(args: argparse.Namespace) -> int:
    from reference.cache import model_dir, model_metrics

    print(f"{'name':14} {'family':9} {'hidden':>6} {'layers':>6} {'steps':>6}  status")
    for name, spec in sorted(MODEL_SPECS.items()):
        metrics = model_metrics(name)
        status = (
            f"built, val ppl {metrics['validation_perplexity']:.2f} (unigram {metrics['unigram_perplexity']:.2f})"
            if metrics
            else "not built"
        )
        print(f"{name:14} {spec.family:9} {spec.hidden_size:6} {spec.num_layers:6} {spec.steps:6}  {status}")
        if metrics:
            print(f"{'':14} {model_dir(name)}")
    return 0


@MODELS.command(
    "check",
    "verify hashes of built artifacts; rebuild what is broken",
    arg("--no-rebuild", action="store_true", help="only report"),
)
def cmd_check(args: argparse.Namespace) -> int:
    from reference.cache import check

    report = check(rebuild=not args.no_rebuild)
    broken = 0
    for artifact, problems in report.items():
        verdict = "ok" if not problems else ("rebuilt" if not args.no_rebuild else "BROKEN")
        print(f"{artifact}: {verdict}")
        for problem in problems:
            print(f"  {problem}")
        broken += bool(problems)
    return 1 if broken and args.no_rebuild else 0
