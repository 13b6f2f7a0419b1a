"""Sweep -> trial matrix: the grid's cartesian product, minus dropped combinations, each validated.

`drop_if` runs before validation, so it can drop combinations that are not valid trials. Sampled
(random/Optuna) fields are left to Ray Tune, but every grid point is validated at every corner of the
sampled fields (each at both ends of its range, together), so a bad bound fails here and not inside a
running trial; `plan` sizes each trial at its worst corner.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from orchestrator.drop_rules import DropRule
from orchestrator.sweep_config import (
    ChoiceDomain,
    GridDomain,
    LogUniformDomain,
    RandIntDomain,
    SweepConfig,
    UniformDomain,
)
from quailora.errors import QuailoraInputError
from trials.config import TrialConfig


@dataclass(frozen=True)
class TrialPoint:
    """One grid combination: its readable name, its grid values and its full trial config."""

    name: str
    grid_values: dict[str, Any]
    config: dict[str, Any]

    def trial_config(self, sampled: Mapping[str, Any] | None = None) -> TrialConfig:
        tree = copy.deepcopy(self.config)
        for path, value in (sampled or {}).items():
            set_path(tree, path, value)
        return TrialConfig.model_validate(tree)


@dataclass
class TrialMatrix:
    sweep: SweepConfig
    points: list[TrialPoint]
    sampled: dict[str, Any]  # path -> non-grid domain, sampled by Tune
    dropped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_trials(self) -> int:
        """Tune's count: the grid repeated num_samples times, or num_samples draws for Optuna."""
        if self.sweep.search.algorithm == "optuna":
            return self.sweep.search.num_samples
        return len(self.points) * self.sweep.search.num_samples

    def corner_trials(self, point: TrialPoint) -> Iterator[TrialConfig]:
        """The point's trial at every corner of the sampled fields: what any sampled trial lies between."""
        for values in corners(self.sampled):
            yield point.trial_config(values)


def describe_validation_error(exc: ValidationError, where: str) -> str:
    """One line naming the first failing field path and its value."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    more = f" [+{exc.error_count() - 1} more]" if exc.error_count() > 1 else ""
    msg = err["msg"].removeprefix("Value error, ")  # model-level checks name their own fields
    return f"{where}: {loc + ': ' if loc else ''}{msg}{shown}{more}"


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path; a mapping value is merged into an existing mapping so coupled fields change together."""
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    if isinstance(value, Mapping) and isinstance(node.get(leaf), Mapping):
        node[leaf] = {**node[leaf], **copy.deepcopy(dict(value))}
    else:
        node[leaf] = copy.deepcopy(value)


def _sub_model(info: FieldInfo) -> type[BaseModel] | None:
    ann = info.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def check_field_path(path: str, *, where: str) -> type[BaseModel] | None:
    """Reject paths that name no TrialConfig field; free-form dicts (tags, init.options) accept any key.

    Returns the sub-config model the path names, if it names one.
    """
    model: type[BaseModel] | None = TrialConfig
    for part in path.split("."):
        if model is None:  # inside a free-form dict
            return None
        info = model.model_fields.get(part)
        if info is None:
            raise QuailoraInputError(
                f"{where}: {path!r} names no trial field ({part!r} is not one of {', '.join(model.model_fields)})"
            )
        model = _sub_model(info)
    return model


def with_defaults(model: type[BaseModel], tree: Mapping[str, Any]) -> dict[str, Any]:
    """`tree` with each omitted field's default filled in, unvalidated: what drop_if sees of a combination
    that may not be a valid trial (dropping such combinations is what drop_if is for)."""
    filled = dict(tree)
    for name, info in model.model_fields.items():
        sub = _sub_model(info)
        if name in tree:
            if sub and isinstance(tree[name], Mapping):
                filled[name] = with_defaults(sub, tree[name])
        elif not info.is_required():
            default = info.get_default(call_default_factory=True)
            filled[name] = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
    return filled


def _shown(path: str, value: Any) -> str:
    """A value as a name shows it; mappings (a quant, an init with options) flattened in schema field order,
    so YAML key order does not change names. A boolean shows only as its field's name, where it is true
    against a false default ('init=svd-zero_start'); other booleans are left out."""
    if isinstance(value, Mapping):
        model = check_field_path(path, where=f"space.{path}")
        order = list(model.model_fields) if model else sorted(value)
        parts = []
        for k in sorted(value, key=lambda k: order.index(k) if k in order else len(order)):
            if not isinstance(value[k], bool):
                parts.append(_shown(f"{path}.{k}", value[k]))
            elif (
                value[k]
                and model is not None
                and k in model.model_fields
                and model.model_fields[k].default is False
            ):
                parts.append(k)
        return "-".join(parts)
    return str(value).rstrip("/").rsplit("/", 1)[-1].removeprefix("reference:")


def _token(path: str, value: Any) -> str:
    """A short, slash-free label for a name: 'rank=8', 'quant=nf4-4', 'init=quailora-kaiming_a', 'path=llama-7b'."""
    return f"{path.rsplit('.', 1)[-1]}={_shown(path, value)}".replace("\n", " ")


def sampled_trial_name(point_name: str, sweep_name: str, sampled: Mapping[str, Any]) -> str:
    """A sampled trial's name: its grid name (left out when nothing in the grid varies, so it is the sweep's)
    and each sampled value, floats to 3 significant digits: 'rank=8_learning_rate=0.000316'."""
    tokens = [] if point_name == sweep_name and sampled else [point_name]
    tokens += [
        _token(path, f"{value:.3g}" if isinstance(value, float) else value) for path, value in sampled.items()
    ]
    return "_".join(tokens)


def _corner_values(domain: Any) -> list[Any]:
    """Values that bound a sampled domain, used to validate before anything runs."""
    if isinstance(domain, GridDomain):
        return domain.grid
    if isinstance(domain, ChoiceDomain):
        return domain.choice
    if isinstance(domain, UniformDomain):
        return list(domain.uniform)
    if isinstance(domain, LogUniformDomain):
        return list(domain.loguniform)
    if isinstance(domain, RandIntDomain):
        return [domain.randint[0], domain.randint[1] - 1]
    raise TypeError(domain)


def corners(sampled: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the sampled fields' bounding values ([{}] when nothing is sampled)."""
    bounds = [_corner_values(domain) for domain in sampled.values()]
    return [dict(zip(sampled, values, strict=True)) for values in itertools.product(*bounds)]


def _refuse_duplicate_names(points: list[TrialPoint]) -> None:
    """Names key MLflow runs, Train directories and progress lines; two combinations must not share one."""
    counts = Counter(p.name for p in points)
    clashes = {name: [p.grid_values for p in points if p.name == name] for name, n in counts.items() if n > 1}
    if clashes:
        shown = "; ".join(f"{name!r} from {values}" for name, values in clashes.items())
        raise QuailoraInputError(
            f"{len(clashes)} trial name(s) come from more than one grid combination: {shown} "
            "(a name shows each value's last path component, and a boolean only where it is true against a false "
            "default; make the values differ there)"
        )


def expand(sweep: SweepConfig) -> TrialMatrix:
    """Every grid combination that survives `drop_if`, each validated as a TrialConfig (raises QuailoraInputError)."""
    for path in sweep.space:
        check_field_path(path, where=f"space.{path}")
    grid = {p: d.grid for p, d in sweep.space.items() if isinstance(d, GridDomain)}
    sampled = {p: d for p, d in sweep.space.items() if not isinstance(d, GridDomain)}
    rules = [DropRule(expr, where=f"drop_if[{i}]") for i, expr in enumerate(sweep.drop_if)]
    for rule in rules:
        for name in rule.fields:
            hit = next((p for p in sampled if name == p or name.startswith(p + ".")), None)
            if hit:
                raise QuailoraInputError(
                    f"{rule.where}: field {name!r} is sampled by the search; drop_if may use only fixed or grid fields"
                )

    points: list[TrialPoint] = []
    dropped: list[dict[str, Any]] = []
    for values in itertools.product(*grid.values()):
        grid_values = dict(zip(grid, values, strict=True))
        tree = copy.deepcopy(sweep.base)
        for path, value in grid_values.items():
            set_path(tree, path, value)
        tokens = [_token(p, v) for p, v in grid_values.items() if len(grid[p]) > 1]
        name = "_".join(tokens) or sweep.name
        tree["name"] = name
        tree.setdefault("tags", {})["sweep"] = sweep.name
        if any(rule.matches(with_defaults(TrialConfig, tree)) for rule in rules):
            dropped.append(grid_values)
            continue
        where = f"trial {name!r}" if grid_values else "base"
        try:
            full = TrialConfig.model_validate(tree).model_dump(mode="json")
        except ValidationError as exc:
            raise QuailoraInputError(describe_validation_error(exc, where)) from None
        point = TrialPoint(name=name, grid_values=grid_values, config=full)
        for values in corners(sampled):
            try:
                point.trial_config(values)
            except ValidationError as exc:
                at = ", ".join(f"space.{path}={value!r}" for path, value in values.items())
                raise QuailoraInputError(describe_validation_error(exc, f"{where} with {at}")) from None
        points.append(point)
    if not points:
        raise QuailoraInputError(
            f"sweep {sweep.name!r}: drop_if removed all {len(dropped)} combinations; nothing to run"
        )
    _refuse_duplicate_names(points)
    return TrialMatrix(sweep=sweep, points=points, sampled=sampled, dropped=dropped)
