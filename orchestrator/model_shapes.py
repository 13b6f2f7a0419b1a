"""The dimensions `plan` needs to estimate memory, derived from a model's config alone.

The model's modules are built on the meta device (no memory, no weights) and read through
quailora.architectures: every linear layer of every decoder layer (MoE experts split, each counted,
fused projections as they are), the rest of the parameters, and the sizes the activation terms need.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quailora.errors import QuailoraInputError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    layers: int
    vocab: int
    heads: int
    linear_layers: tuple[tuple[tuple[str, int, int], ...], ...]  # per decoder layer: (name, in, out)
    other_params: int  # embeddings, the head unless tied, norms, routers: kept at model.dtype
    experts_per_token: int = (
        0  # a MoE's routed experts per token (its config's num_experts_per_tok); 0: dense
    )

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of every linear layer in every decoder layer."""
        return [linear for layer in self.linear_layers for linear in layer]

    def num_parameters(self) -> int:
        """Every parameter: the linear layers' weights and the others (biases are in neither: a rounding)."""
        return sum(n_in * n_out for _, n_in, n_out in self.linears()) + self.other_params

    def experts(self) -> int:
        """Routed experts in the widest MoE layer, counted from the linear layers' names (0: a dense model)."""
        return max(
            (len({expert_index(n) for n, _, _ in layer} - {None}) for layer in self.linear_layers), default=0
        )

    def active_parameters(self) -> int:
        """Parameters a token passes through: all but the routed experts it is not sent to."""
        experts = self.experts()
        if not experts:
            return self.num_parameters()
        routed = sum(n_in * n_out for name, n_in, n_out in self.linears() if expert_index(name) is not None)
        return self.num_parameters() - routed * (experts - self.experts_per_token) // experts

    def layer_params(self) -> int:
        """Linear parameters of the largest decoder layer (calibration holds one layer at a time)."""
        return max(sum(n_in * n_out for _, n_in, n_out in layer) for layer in self.linear_layers)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelShape:
        values = json.loads(text)
        layers = tuple(tuple(tuple(linear) for linear in layer) for layer in values.pop("linear_layers"))
        return cls(**values, linear_layers=layers)

    def gram_inputs(self, index: int) -> list[int]:
        """Widths of the distinct linear inputs of decoder layer ``index``: one Gram each
        (quailora.calibration.accumulate keys a Gram by the input tensor, so siblings that read one
        tensor, see shares_input, share it)."""
        seen: set[str] = set()
        widths = []
        for name, n_in, _ in self.linear_layers[index]:
            key = input_key(name)
            if key not in seen:
                seen.add(key)
                widths.append(n_in)
        return widths

    def gram_widths(self) -> list[int]:
        """Distinct input widths of the layer whose Grams are largest (calibration holds one layer's)."""
        return max(
            (self.gram_inputs(i) for i in range(len(self.linear_layers))),
            key=lambda w: sum(n * n for n in w),
        )


# Sibling projections that read the very same tensor in one forward, hence share one Gram at run time
# (tests/test_calibration.py SHARING checks it on every reference family). A sibling set not listed here
# (e.g. GPT-J's parallel attention and MLP) counts a Gram per module: an upper bound, never less.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def expert_index(name: str) -> int | None:
    """The routed expert a linear layer belongs to (``...experts.<e>.<proj>``), None for any other linear
    (shared experts are named ``shared_expert(s)`` and serve every token)."""
    match = re.search(r"\.experts\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def input_key(name: str) -> str:
    """``name`` itself, or for a module of a SHARED_INPUTS set its parent plus the set: equal keys, one Gram."""
    parent, _, leaf = name.rpartition(".")
    for group in SHARED_INPUTS:
        if leaf in group:
            return f"{parent}.{'/'.join(group)}"
    return name


def shape_from_config(config: PretrainedConfig) -> ModelShape:
    from quailora.architectures import Layout

    layout = Layout.from_config(config)
    linear_layers = tuple(
        tuple((name, n_in, n_out) for name, (n_in, n_out) in layout.linears(i).items())
        for i in range(layout.num_layers)
    )
    # parameters() yields a tied parameter once, so tied embeddings are counted once.
    total = sum(p.numel() for p in layout.model.parameters())
    linear = sum(n_in * n_out for layer in linear_layers for _, n_in, n_out in layer)
    return ModelShape(
        model_type=config.model_type,
        hidden=config.hidden_size,
        layers=layout.num_layers,
        vocab=config.vocab_size,
        heads=config.num_attention_heads,
        linear_layers=linear_layers,
        other_params=total - linear,  # linear biases stay unquantized too
        experts_per_token=getattr(config, "num_experts_per_tok", None) or 0,
    )


PUBLISHED_CONFIGS = Path(__file__).with_name("published_configs.json")
SHAPES_VERSION = 2  # part of every stored shape's key: bump it when shape_from_config changes


def published_config(model_path: str) -> dict | None:
    """The sizing fields of the published config.json of a hub model a shipped sweep names (so `plan` sizes
    the paper's grid offline), or None."""
    return json.loads(PUBLISHED_CONFIGS.read_text()).get(model_path)


def _hub_cached_config(model_path: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_path, "config.json")
    except Exception:  # not a valid repo id: not in the cache
        return None
    return Path(found).read_text() if isinstance(found, str) else None


def _config_source(model_path: str) -> tuple[str | None, Callable[[], PretrainedConfig]]:
    """(the text that identifies the config, or None when only fetching it tells; a loader of the config).
    The text is read without transformers, so a shape already derived is found without importing it."""
    where = f"model.path={model_path!r}"
    if model_path.startswith("reference:"):
        from reference.specs import get_spec

        spec = get_spec(model_path.removeprefix("reference:"))

        def reference_config() -> PretrainedConfig:
            from reference.families import FAMILIES

            return FAMILIES.get(spec.family)(spec, {})

        return json.dumps({"reference": spec.as_dict()}, sort_keys=True), reference_config
    local = Path(model_path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise QuailoraInputError(f"{where}: no config.json in {local}")
        return (local / "config.json").read_text(), lambda: _load_config(local, where)
    cached = _hub_cached_config(model_path)
    if cached is not None:
        return cached, lambda: _config_from_dict(json.loads(cached), where)
    published = published_config(model_path)
    if published is not None:
        return json.dumps(published, sort_keys=True), lambda: _config_from_dict(published, where)

    def fetched() -> PretrainedConfig:
        try:
            return _load_config(model_path, where)
        except QuailoraInputError as err:
            raise QuailoraInputError(
                f"{err} (plan reads only the config; offline, a hub model must be in the hub cache)"
            ) from None

    return None, fetched


def _load_config(checkpoint: str | Path, where: str) -> PretrainedConfig:
    from quailora.architectures import load_model_config

    return load_model_config(checkpoint, where)


def _config_from_dict(values: dict, where: str) -> PretrainedConfig:
    from transformers import AutoConfig

    from quailora.architectures import check_causal_lm

    values = dict(values)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    check_causal_lm(config, where)
    return config


def _shapes_dir() -> Path:
    from reference.paths import cache_root

    return cache_root() / "shapes"


def resolve_shape(model_path: str) -> ModelShape:
    """Shape of `model.path` from its config only: a reference model's spec, a local checkpoint's
    config.json, a hub model's config (the hub cache, the published configs of the shipped sweeps' models,
    or fetched when online). Derived once per config (through transformers, on the meta device) and kept
    under the cache keyed by the config's content, so later plans import neither torch nor transformers."""
    text, load = _config_source(model_path)
    path = None
    if text is not None:
        digest = hashlib.sha256(f"{SHAPES_VERSION}\n{text}".encode()).hexdigest()[:24]
        path = _shapes_dir() / f"{digest}.json"
    if path is not None and path.is_file():
        return ModelShape.from_json(path.read_text())
    shape = shape_from_config(load())
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(shape.to_json())
        os.replace(tmp, path)  # atomic: concurrent plans never read half a file
    return shape
