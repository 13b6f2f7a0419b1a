"""The sweep's own record next to Tune's experiment: its config, tracking URI and MLflow parent run.

`resume`, `report` and `status` find everything from this one file, so they need only the
experiment name (or path). Written through pyarrow's filesystem so a shared URI works like a local dir.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.fs

from orchestrator.sweep_config import SweepConfig, default_storage_path
from quailora.errors import QuailoraInputError

STATE_FILE = "quailora_sweep.json"


def _fs(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    return pyarrow.fs.FileSystem.from_uri(uri if "://" in uri else str(Path(uri).resolve()))


@dataclass
class ExperimentState:
    name: str
    storage_path: str
    tracking_uri: str
    sweep: dict
    parent_run_id: str | None = None

    @property
    def path(self) -> str:
        """Tune's experiment directory (or URI)."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def sweep_config(self) -> SweepConfig:
        return SweepConfig.model_validate(self.sweep)

    def save(self) -> None:
        fs, root = _fs(self.path)
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root}/{STATE_FILE}") as out:
            out.write(json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def for_sweep(cls, sweep: SweepConfig) -> ExperimentState:
        return cls(
            name=sweep.name,
            storage_path=sweep.resolved_storage_path(),
            tracking_uri=sweep.resolved_tracking_uri(),
            sweep=sweep.model_dump(mode="json"),
        )

    @classmethod
    def load(cls, experiment: str, storage_path: str | None = None) -> ExperimentState:
        """`experiment` is a path/URI of the experiment dir, or a name under `storage_path` (default ./runs)."""
        candidates = [experiment] if ("/" in experiment or "://" in experiment) else []
        candidates.append(f"{storage_path or default_storage_path()}/{experiment}")
        for candidate in candidates:
            fs, root = _fs(candidate)
            if fs.get_file_info(f"{root}/{STATE_FILE}").type == pyarrow.fs.FileType.File:
                return _read_state(fs, f"{root}/{STATE_FILE}")
        raise QuailoraInputError(
            f"experiment {experiment!r}: no {STATE_FILE} found in {', '.join(candidates)}"
        )

    @staticmethod
    def list_under(storage_path: str) -> list[ExperimentState]:
        fs, root = _fs(storage_path)
        if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
            return []
        found = []
        for info in fs.get_file_info(pyarrow.fs.FileSelector(root)):
            if info.type == pyarrow.fs.FileType.Directory:
                state = f"{info.path}/{STATE_FILE}"
                if fs.get_file_info(state).type == pyarrow.fs.FileType.File:
                    found.append(_read_state(fs, state))
        return sorted(found, key=lambda s: s.name)


def _read_state(fs: pyarrow.fs.FileSystem, path: str) -> ExperimentState:
    """The record at ``path``; one that is not UTF-8 JSON of these fields is bad input, not a traceback."""
    with fs.open_input_stream(path) as f:
        data = f.read()
    try:
        return ExperimentState(**json.loads(data.decode("utf-8")))
    except UnicodeDecodeError as exc:
        problem = f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
    except json.JSONDecodeError as exc:
        problem = f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    except TypeError as exc:
        problem = f"does not hold a sweep record ({exc})"
    raise QuailoraInputError(f"{path} {problem}; it is written by `quailora run`, do not edit it")
