"""The sweep schema: a base trial, a search space over dotted trial-field paths, and how to run it.

Unknown fields are errors (a typo in a sweep must not silently run the wrong experiment).
`SweepConfig.model_json_schema()` is what `quailora schema` exports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from quailora.errors import QuailoraInputError
from trials.config import read_yaml_file
from trials.contract import STEP, VAL_PPL, VAL_PPL_FINAL

# Relative to the working directory; the one default of storage_path, tracking_uri and every --storage.
DEFAULT_STORAGE = "runs"


def default_storage_path() -> str:
    return str(Path(DEFAULT_STORAGE).resolve())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GridDomain(_Strict):
    """Every listed value is tried (the cartesian product with the other grids)."""

    grid: list[Any] = Field(min_length=1)


class ChoiceDomain(_Strict):
    """One listed value is drawn per sample (random or Optuna search)."""

    choice: list[Any] = Field(min_length=1)


def _ordered(bounds: tuple, *, positive: bool = False) -> tuple:
    low, high = bounds
    if not low < high:
        raise ValueError(f"bounds {list(bounds)} must satisfy low < high")
    if positive and low <= 0:
        raise ValueError(f"bounds {list(bounds)} must be > 0 for a log-uniform domain")
    return bounds


class UniformDomain(_Strict):
    uniform: tuple[float, float]

    _check = field_validator("uniform")(classmethod(lambda cls, v: _ordered(v)))


class LogUniformDomain(_Strict):
    loguniform: tuple[float, float]

    _check = field_validator("loguniform")(classmethod(lambda cls, v: _ordered(v, positive=True)))


class RandIntDomain(_Strict):
    """Integers in [low, high) as in `ray.tune.randint`."""

    randint: tuple[int, int]

    _check = field_validator("randint")(classmethod(lambda cls, v: _ordered(v)))


DOMAIN_KINDS: dict[str, type[_Strict]] = {
    "grid": GridDomain,
    "choice": ChoiceDomain,
    "uniform": UniformDomain,
    "loguniform": LogUniformDomain,
    "randint": RandIntDomain,
}


def _domain_kind(value: Any) -> str | None:
    """The domain's single key, so a typo reports one clear error instead of one per union member."""
    if isinstance(value, _Strict):
        return next(k for k, cls in DOMAIN_KINDS.items() if isinstance(value, cls))
    if isinstance(value, dict) and len(value) == 1:
        key = next(iter(value))
        return key if key in DOMAIN_KINDS else None
    return None


Domain = Annotated[
    Annotated[GridDomain, Tag("grid")]
    | Annotated[ChoiceDomain, Tag("choice")]
    | Annotated[UniformDomain, Tag("uniform")]
    | Annotated[LogUniformDomain, Tag("loguniform")]
    | Annotated[RandIntDomain, Tag("randint")],
    Discriminator(
        _domain_kind,
        custom_error_type="unknown_domain",
        custom_error_message=f"a domain is a mapping with exactly one key of: {', '.join(DOMAIN_KINDS)}",
    ),
]
CATEGORICAL_DOMAINS = (GridDomain, ChoiceDomain)


class AshaSpec(_Strict):
    """Asynchronous successive halving at the trial's eval points, measured in optimizer steps."""

    metric: str = VAL_PPL  # reported at every eval point (train.eval_every), unlike the final sweep metric
    # Every report carries the step; Tune's training_iteration would also count checkpoint-only reports.
    time_attr: str = STEP
    max_t: int = Field(100, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    # Swept fields ASHA compares trials across, e.g. [train.learning_rate, seed]: trials that agree on every
    # other swept field form their own ASHA, so one arm's learning rates compete with each other and not with
    # other arms, models or ranks. None: every trial in one ASHA (Ray's).
    compare_across: list[str] | None = None


class SearchSpec(_Strict):
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    # Grid: repetitions of the whole grid. Random/Optuna: number of samples drawn.
    num_samples: int = Field(1, ge=1)
    metric: str = VAL_PPL_FINAL
    mode: Literal["min", "max"] = "min"
    # None: as many trials at once as the cluster's CPUs (GPUs) hold.
    max_concurrent_trials: int | None = Field(None, ge=1)
    asha: AshaSpec | None = None
    # Tune retries of a failed trial (a dead node, an OOM kill, ...).
    max_failures: int = Field(1, ge=0)
    seed: int | None = 0


class DevicesSpec(_Strict):
    """What one trial worker may use; `plan` refuses trials whose estimate exceeds it."""

    kind: Literal["cpu", "gpu"] = "cpu"
    memory_gb: float = Field(16.0, gt=0)


class SweepConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    # A (partial) TrialConfig; every expanded trial is validated through TrialConfig.
    base: dict[str, Any]
    # Dotted TrialConfig field path -> domain, e.g. "lora.rank": {grid: [8, 16]}.
    # A path may name a whole sub-config ("quant": {grid: [{method: nf4, bits: 4}, ...]}),
    # merged over the base so that coupled fields change together.
    space: dict[str, Domain] = Field(default_factory=dict)
    # Combinations for which any expression is true are dropped, e.g. "quant.bits == 8 and init.method != 'gaussian'".
    drop_if: list[str] = Field(default_factory=list)
    search: SearchSpec = Field(default_factory=SearchSpec)
    devices: DevicesSpec = Field(default_factory=DevicesSpec)
    # CPUs held by each trial's driver (the Tune function that starts the TorchTrainer); its workers hold their own.
    # 0 with a driver_resources entry: drivers on a head started with `--num-cpus 0`.
    driver_cpus: float = Field(0.1, ge=0)
    # Custom Ray resources each trial driver also asks for, e.g. {head: 0.01} to keep drivers (and the Train
    # controllers Ray attaches to their node) on a node that outlives the worker nodes.
    driver_resources: dict[str, float] = Field(default_factory=dict)
    storage_path: str | None = None  # default: ./runs ; a local dir or a pyarrow URI (s3://, gs://, ...)
    tracking_uri: str | None = None  # default: sqlite:///<abs>/runs/mlflow.db
    # The stage cache (quantized bases, Grams, init adapters) that trials share, within and across sweeps.
    # Default: <storage_path>/cache. On a cluster: a directory every node mounts (with flock support).
    cache_path: str | None = None
    # False: each trial computes its stages privately (reused only by its own restarts), as a baseline.
    share_stages: bool = True
    # True: stages two or more trials share are computed ahead of them by stage jobs using the free workers
    # (orchestrator/stage_graph.py); False: inside the first trial that needs them, on demand (a baseline).
    stage_jobs: bool = True

    @field_validator("space")
    @classmethod
    def _paths_are_dotted_names(cls, space: dict[str, Any]) -> dict[str, Any]:
        for path in space:
            if not path or not all(part.isidentifier() for part in path.split(".")):
                raise ValueError(f"space key {path!r} is not a dotted field path like 'lora.rank'")
        return space

    @model_validator(mode="after")
    def _space_is_not_empty(self) -> SweepConfig:
        if not self.space:
            raise ValueError(
                "space: the search space is empty; sweep at least one field, e.g. 'lora.rank': {grid: [8]} "
                "(`quailora trial` runs a single trial)"
            )
        return self

    @model_validator(mode="after")
    def _grid_search_has_only_grids(self) -> SweepConfig:
        if self.search.algorithm == "grid":
            for path, domain in self.space.items():
                if not isinstance(domain, GridDomain):
                    raise ValueError(
                        f"space.{path}: search.algorithm='grid' allows only 'grid' domains; "
                        "use algorithm 'random' or 'optuna' to sample"
                    )
        return self

    @model_validator(mode="after")
    def _asha_compares_across_swept_fields(self) -> SweepConfig:
        asha = self.search.asha
        for path in (asha.compare_across or []) if asha else []:
            if path not in self.space:
                raise ValueError(
                    f"search.asha.compare_across: {path!r} is not a swept field (space: {', '.join(self.space)})"
                )
        return self

    def resolved_storage_path(self) -> str:
        """Where Tune writes the experiment `<storage>/<name>`; local paths become absolute."""
        root = self.storage_path or DEFAULT_STORAGE
        return root if "://" in root else str(Path(root).expanduser().resolve())

    @model_validator(mode="after")
    def _drivers_ask_for_something(self) -> SweepConfig:
        if self.driver_cpus == 0 and not any(self.driver_resources.values()):
            raise ValueError(
                "driver_cpus: 0 needs a driver_resources entry (e.g. {head: 0.01}) that places the drivers"
            )
        return self

    @model_validator(mode="after")
    def _uri_storage_names_its_cache(self) -> SweepConfig:
        if self.share_stages and not self.cache_path and "://" in (self.storage_path or ""):
            raise ValueError(
                f"cache_path: storage_path {self.storage_path!r} is a URI, which cannot hold the stage cache; "
                "set cache_path to a directory every node mounts (or share_stages: false)"
            )
        return self

    def resolved_cache_path(self) -> str | None:
        """The shared stage cache, None when stages are not shared (a URI storage needs an explicit one)."""
        if not self.share_stages:
            return None
        if self.cache_path:
            return str(Path(self.cache_path).expanduser().resolve())
        return f"{self.resolved_storage_path()}/cache"

    def resolved_tracking_uri(self) -> str:
        from trials.tracking import default_tracking_uri  # imports mlflow, which plan and schema never need

        return self.tracking_uri or default_tracking_uri(DEFAULT_STORAGE)


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep YAML; unreadable text and malformed YAML are QuailoraInputError, schema
    errors surface as pydantic's ValidationError."""
    path = Path(path)
    if not path.is_file():
        raise QuailoraInputError(f"sweep config {str(path)!r} does not exist")
    raw = read_yaml_file(path, "sweep config")
    if not isinstance(raw, dict):
        raise QuailoraInputError(
            f"sweep config {str(path)!r} must be a YAML mapping, got {type(raw).__name__}"
        )
    return SweepConfig.model_validate(raw)
