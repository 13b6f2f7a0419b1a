"""The one way a `quailora` subcommand is declared: ``@commands.command(name, help, arg(...), ...)`` on its
handler, in orchestrator/cli.py, reference/commands.py and trials/commands.py alike.

In reference because it is the lowest package with CLI code (trials and orchestrator import reference,
quailora has no CLI), so each package declares its commands without importing one above it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

Handler = Callable[[argparse.Namespace], int]  # a command's function: its exit status
Argument = tuple[tuple[str, ...], dict]


def arg(*flags: str, **options) -> Argument:
    """One argument of a command, in argparse's ``add_argument`` terms."""
    return flags, options


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: tuple[Argument, ...] = ()
    run: Handler | None = None  # a leaf's handler
    subcommands: Commands | None = None  # a group's commands


class Commands:
    """An ordered set of subcommands: leaves declared with ``@commands.command(...)`` and groups of their own
    subcommands with ``commands.group(...)``. ``add_to(subparsers)`` adds them in declaration order, each
    leaf setting ``args.func`` to its handler."""

    def __init__(self, dest: str = "command") -> None:
        self.dest = dest  # where the chosen name lands when these are a group's subcommands
        self._commands: dict[str, Command] = {}

    def _add(self, command: Command) -> None:
        if command.name in self._commands:
            raise ValueError(f"command {command.name!r} declared twice")
        self._commands[command.name] = command

    def command(self, name: str, help: str, *arguments: Argument) -> Callable[[Handler], Handler]:
        def deco(run: Handler) -> Handler:
            self._add(Command(name, help, arguments, run=run))
            return run

        return deco

    def group(self, name: str, help: str, dest: str) -> Commands:
        """A command whose own subcommands (required, the chosen one's name in ``args.<dest>``) are the
        returned set's."""
        subcommands = Commands(dest)
        self._add(Command(name, help, subcommands=subcommands))
        return subcommands

    def add_to(self, subparsers: argparse._SubParsersAction) -> None:
        for command in self._commands.values():
            parser = subparsers.add_parser(command.name, help=command.help)
            for flags, options in command.arguments:
                parser.add_argument(*flags, **options)
            if command.subcommands is not None:
                nested = parser.add_subparsers(dest=command.subcommands.dest, required=True)
                command.subcommands.add_to(nested)
            else:
                parser.set_defaults(func=command.run)
