"""The dimensions `plan` needs to estimate memory: from a checkpoint's config.json or a table of known sizes.

The table lets `plan` size the paper's models (LLaMA, OPT, BLOOM, Pythia) without downloading them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quailora.errors import QuailoraInputError
from quailora.registry import Registry


@dataclass(frozen=True)
class ModelShape:
    family: str  # a key of LINEAR_LAYOUTS
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int | None = None  # grouped-query attention; None: same as heads
    tied_embeddings: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden * (self.kv_heads or self.heads) // self.heads

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of each linear layer in one decoder block."""
        return LINEAR_LAYOUTS.get(self.family, where="model family")(self)

    def distinct_inputs(self) -> list[int]:
        """Widths of the distinct linear inputs of one block (one Gram matrix each, see methods.md)."""
        return INPUT_LAYOUTS.get(self.family, where="model family")(self)


LINEAR_LAYOUTS: Registry[Callable[[ModelShape], list[tuple[str, int, int]]]] = Registry("linear layout")
INPUT_LAYOUTS: Registry[Callable[[ModelShape], list[int]]] = Registry("input layout")


@LINEAR_LAYOUTS.register("llama")
def _llama(s: ModelShape) -> list[tuple[str, int, int]]:
    h, i, kv = s.hidden, s.intermediate, s.kv_dim
    return [("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h),
            ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]  # fmt: skip


@LINEAR_LAYOUTS.register("opt")
def _opt(s: ModelShape) -> list[tuple[str, int, int]]:
    h, i = s.hidden, s.intermediate
    return [
        ("q_proj", h, h),
        ("k_proj", h, h),
        ("v_proj", h, h),
        ("out_proj", h, h),
        ("fc1", h, i),
        ("fc2", i, h),
    ]


def _fused_qkv(s: ModelShape) -> list[tuple[str, int, int]]:
    h, i = s.hidden, s.intermediate
    return [("query_key_value", h, 3 * h), ("dense", h, h), ("dense_h_to_4h", h, i), ("dense_4h_to_h", i, h)]


LINEAR_LAYOUTS.register("bloom")(_fused_qkv)
LINEAR_LAYOUTS.register("gpt_neox")(_fused_qkv)
INPUT_LAYOUTS.register("llama")(lambda s: [s.hidden, s.hidden, s.hidden, s.intermediate])
INPUT_LAYOUTS.register("opt")(lambda s: [s.hidden, s.hidden, s.hidden, s.intermediate])
INPUT_LAYOUTS.register("bloom")(lambda s: [s.hidden, s.hidden, s.hidden, s.intermediate])
INPUT_LAYOUTS.register("gpt_neox")(lambda s: [s.hidden, s.hidden, s.hidden, s.intermediate])


def _shape(family: str, h: int, i: int, layers: int, vocab: int, heads: int, tied: bool) -> ModelShape:
    return ModelShape(family, h, i, layers, vocab, heads, tied_embeddings=tied)


# Published configs (config.json on the hub) of the paper's model families.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "llama-7b": _shape("llama", 4096, 11008, 32, 32000, 32, False),
    "llama-13b": _shape("llama", 5120, 13824, 40, 32000, 40, False),
    "llama-30b": _shape("llama", 6656, 17920, 60, 32000, 52, False),
    "opt-1.3b": _shape("opt", 2048, 8192, 24, 50272, 32, True),
    "opt-2.7b": _shape("opt", 2560, 10240, 32, 50272, 32, True),
    "opt-6.7b": _shape("opt", 4096, 16384, 32, 50272, 32, True),
    "opt-13b": _shape("opt", 5120, 20480, 40, 50272, 40, True),
    "opt-30b": _shape("opt", 7168, 28672, 48, 50272, 56, True),
    "bloom-560m": _shape("bloom", 1024, 4096, 24, 250880, 16, True),
    "bloom-1b7": _shape("bloom", 2048, 8192, 24, 250880, 16, True),
    "bloom-3b": _shape("bloom", 2560, 10240, 30, 250880, 32, True),
    "bloom-7b1": _shape("bloom", 4096, 16384, 30, 250880, 32, True),
    "pythia-410m": _shape("gpt_neox", 1024, 4096, 24, 50304, 16, False),
    "pythia-1.4b": _shape("gpt_neox", 2048, 8192, 24, 50304, 16, False),
    "pythia-2.8b": _shape("gpt_neox", 2560, 10240, 32, 50304, 32, False),
    "pythia-6.9b": _shape("gpt_neox", 4096, 16384, 32, 50432, 32, False),
    "pythia-12b": _shape("gpt_neox", 5120, 20480, 36, 50688, 40, False),
}

_FAMILY_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "opt": "opt",
                         "bloom": "bloom", "gpt_neox": "gpt_neox"}  # fmt: skip


def shape_from_config_json(path: Path) -> ModelShape:
    cfg = json.loads(path.read_text())
    model_type = cfg.get("model_type", "")
    family = _FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        raise QuailoraInputError(
            f"{path}: model_type={model_type!r} is not supported; known: {sorted(_FAMILY_OF_MODEL_TYPE)}"
        )
    hidden = cfg.get("hidden_size") or cfg["n_embed"]
    return ModelShape(
        family=family,
        hidden=hidden,
        intermediate=cfg.get("intermediate_size") or cfg.get("ffn_dim") or 4 * hidden,
        layers=cfg.get("num_hidden_layers") or cfg["n_layer"],
        vocab=cfg["vocab_size"],
        heads=cfg.get("num_attention_heads") or cfg["n_head"],
        kv_heads=cfg.get("num_key_value_heads"),
        tied_embeddings=cfg.get("tie_word_embeddings", family in {"opt", "bloom"}),
    )


def _reference_shape(name: str) -> ModelShape:
    """From the reference model's spec, so planning never has to build the model."""
    from reference.specs import get_spec

    spec = get_spec(name)
    family = spec.family.replace("-", "_")
    return ModelShape(family=family, hidden=spec.hidden_size, intermediate=spec.intermediate_size,
                      layers=spec.num_layers, vocab=spec.vocab_size, heads=spec.num_heads,
                      tied_embeddings=family in {"opt", "bloom"})  # fmt: skip


def _known_name(model_path: str) -> str | None:
    leaf = model_path.rstrip("/").rsplit("/", 1)[-1].lower()
    return leaf if leaf in KNOWN_SHAPES else None


def resolve_shape(model_path: str) -> ModelShape:
    """Shape of `model.path`: a reference model's spec, a local checkpoint's config.json, or a known size by name."""
    if model_path.startswith("reference:"):
        return _reference_shape(model_path.removeprefix("reference:"))
    local = Path(model_path).expanduser()
    if (local / "config.json").is_file():
        return shape_from_config_json(local / "config.json")
    known = _known_name(model_path)
    if known:
        return KNOWN_SHAPES[known]
    raise QuailoraInputError(
        f"model.path={model_path!r}: no config.json there and not a known size ({', '.join(KNOWN_SHAPES)})"
    )
