"""The reference models: one small spec per family and size, looked up by name (`llama-tiny`, ...).

Sizes: `micro` builds in seconds (tests, smoke runs), `tiny` in a few minutes on a 2-core CPU (the
default; quickstart), `mini` (twice as wide; meant to build within half an hour there, not yet measured),
`small` is meant for a GPU. All widths are multiples of 64 so that group-wise quantization with group 64
applies to every linear layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from quailora.errors import QuailoraInputError

QUANT_GROUP = 64


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # a key of reference.families.FAMILIES
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    seq_len: int
    batch_size: int
    steps: int
    learning_rate: float
    warmup_steps: int
    vocab_size: int = 4096
    weight_decay: float = 0.1
    seed: int = 0
    eval_tokens: int = 65536  # pretrain-validation tokens scored after training
    num_shards: int = 4  # safetensors shards (calibration reads one layer at a time from shards)

    def __post_init__(self) -> None:
        for field in ("hidden_size", "intermediate_size"):
            value = getattr(self, field)
            if value % QUANT_GROUP:
                raise QuailoraInputError(f"{self.name}: {field}={value} is not a multiple of {QUANT_GROUP}")
        if self.hidden_size % self.num_heads:
            raise QuailoraInputError(
                f"{self.name}: hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}"
            )
        if self.family == "bloom" and self.intermediate_size != 4 * self.hidden_size:
            raise QuailoraInputError(
                f"{self.name}: bloom's intermediate_size is 4 x hidden_size, got {self.intermediate_size}"
            )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# name prefix -> family
PREFIXES = {"llama": "llama", "opt": "opt", "bloom": "bloom", "pythia": "gpt-neox"}

SIZES = {
    "micro": dict(
        hidden_size=64, intermediate_size=256, num_layers=2, num_heads=1, seq_len=64,
        batch_size=8, steps=100, learning_rate=5e-3, warmup_steps=10, eval_tokens=4096, num_shards=2,
    ),
    # Chosen so that quantization hurts (docs/reference.md): narrow and 4 layers deep, trained on 4.1 M tokens
    # (~16 per non-embedding parameter) at a moderate learning rate, ~6 min on a 2-core CPU.
    "tiny": dict(
        hidden_size=64, intermediate_size=256, num_layers=4, num_heads=2, seq_len=128,
        batch_size=16, steps=2000, learning_rate=2e-3, warmup_steps=60,
    ),
    # Issue 17: wide enough that LoRA ranks 8, 16 and 32 are at most a quarter of every layer's width, the
    # tiny recipe otherwise (so 1.5 times more tokens for 4 times the non-embedding parameters).
    "mini": dict(
        hidden_size=128, intermediate_size=512, num_layers=4, num_heads=2, seq_len=128,
        batch_size=16, steps=3000, learning_rate=2e-3, warmup_steps=90,
    ),
    "small": dict(
        hidden_size=512, intermediate_size=2048, num_layers=8, num_heads=8, seq_len=512,
        batch_size=32, steps=3000, learning_rate=1e-3, warmup_steps=200, num_shards=8,
    ),
}  # fmt: skip

MODEL_SPECS: dict[str, ModelSpec] = {
    f"{prefix}-{size}": ModelSpec(name=f"{prefix}-{size}", family=family, **dims)
    for prefix, family in PREFIXES.items()
    for size, dims in SIZES.items()
}
DEFAULT_MODELS = tuple(f"{prefix}-tiny" for prefix in PREFIXES)


def get_spec(name: str) -> ModelSpec:
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise QuailoraInputError(
            f"reference model {name!r} is unknown; known: {', '.join(sorted(MODEL_SPECS))}"
        ) from None
