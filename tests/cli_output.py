"""What a CLI refusal looks like to the tests: its own line and the exit code, not the whole of stderr."""

from __future__ import annotations

import re

REFUSAL = re.compile(r"^quailora [a-z]+: error: ")


def refusal_line(stderr: str) -> str:
    """The one refusal line in stderr (`quailora COMMAND: error: ...`); no second one and no traceback beside it.

    Other packages' chatter (log records, warnings) may share stderr; the CLI routes it to its log file
    (orchestrator/log_routing.py) and tests/test_orchestrator_cli.py checks that routing on its own.
    """
    lines = [line for line in stderr.splitlines() if REFUSAL.match(line)]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]
