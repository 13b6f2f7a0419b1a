"""Third-party log records go to a file, not to the CLI's stderr.

Why: a refusal is one line on stderr (and exit 2), yet transformers, bitsandbytes, kernels and the hub client log
warnings on import that change with every release (issue 32: a new `kernels` warning broke that line). Records of
the project's own loggers still reach stderr, and so does every record at ERROR or above, so a real failure is
never hidden; the rest is kept in the log file (QUAILORA_LOG_FILE, default ~/.cache/quailora/cli.log).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable
from pathlib import Path

OWN_PACKAGES = ("quailora", "trials", "orchestrator", "reference", "__main__")
LOG_BYTES = 10 * 2**20
_routed_to: Path | None = None


def default_log_file() -> Path:
    return Path(os.environ.get("QUAILORA_LOG_FILE") or Path.home() / ".cache" / "quailora" / "cli.log")


def is_own(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] in OWN_PACKAGES


class _CurrentStderr(logging.Handler):
    """Writes to sys.stderr as it is at each record (pytest and tools swap it), as logging's last resort does."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def route_third_party_logs(log_file: Path | None = None) -> Path:
    """Route the process's log records and Python warnings: own or ERROR+ to stderr, the rest to the file.

    Once per process: a second call (the CLI's main called again in-process) returns the first call's file.
    """
    global _routed_to
    if _routed_to is not None:
        return _routed_to
    path = _routed_to = log_file or default_log_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    to_stderr = _CurrentStderr()
    to_stderr.addFilter(lambda record: is_own(record) or record.levelno >= logging.ERROR)
    # delay: the file is created by the first record routed to it, not by every command.
    to_file = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_BYTES, backupCount=1, delay=True)
    to_file.addFilter(lambda record: not is_own(record))
    to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(to_stderr)
    logging.getLogger().addHandler(to_file)
    logging.captureWarnings(True)  # warnings.warn -> the `py.warnings` logger -> the file
    # transformers and the hub client print through stderr handlers of their own, made when they are imported.
    # Importing them here would cost `quailora --help` half a second, so their handlers go once they exist.
    _after_import("transformers.utils.logging", _propagate_transformers)
    _after_import("huggingface_hub.utils.logging", _propagate_hub)
    return path


def _propagate_transformers() -> None:
    import transformers.utils.logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()


def _propagate_hub() -> None:
    hub = logging.getLogger("huggingface_hub")  # it has no call that removes its default handler: by hand
    for handler in [h for h in hub.handlers if type(h) is logging.StreamHandler]:
        hub.removeHandler(handler)


def _after_import(module: str, callback: Callable[[], None]) -> None:
    """Run callback once `module` is imported: now if it is, else right after its import (a post-import hook)."""
    if module in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _PostImportHook(module, callback))


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Finds one module with the usual path finder and runs a callback after its loader has executed it."""

    def __init__(self, module: str, callback: Callable[[], None]) -> None:
        self.module, self.callback = module, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_callback(module) -> None:
                exec_module(module)
                self.callback()

            spec.loader.exec_module = exec_then_callback
        return spec
