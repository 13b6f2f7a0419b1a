"""The dimensions `plan` needs to estimate memory, derived from a model's config alone.

The model's modules are built on the meta device (no memory, no weights) and read through
quailora.architectures: every linear layer of every decoder layer (MoE experts split, each counted,
fused projections as they are), the rest of the parameters, and the sizes the activation terms need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from quailora.architectures import Layout, load_model_config
from quailora.errors import QuailoraInputError


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    layers: int
    vocab: int
    heads: int
    linear_layers: tuple[tuple[tuple[str, int, int], ...], ...]  # per decoder layer: (name, in, out)
    other_params: int  # embeddings, the head unless tied, norms, routers: kept at model.dtype

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of every linear layer in every decoder layer."""
        return [linear for layer in self.linear_layers for linear in layer]

    def layer_params(self) -> int:
        """Linear parameters of the largest decoder layer (calibration holds one layer at a time)."""
        return max(sum(n_in * n_out for _, n_in, n_out in layer) for layer in self.linear_layers)

    def gram_widths(self) -> list[int]:
        """Input widths of the largest layer's linear layers: an upper bound on its Grams, since layers
        that read the same input (q/k/v, gate/up) share one Gram at run time."""
        return max(
            ([n_in for _, n_in, _ in layer] for layer in self.linear_layers),
            key=lambda w: sum(n * n for n in w),
        )


def shape_from_config(config: PretrainedConfig) -> ModelShape:
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
    )


def resolve_shape(model_path: str) -> ModelShape:
    """Shape of `model.path` from its config only: a reference model's spec, a local checkpoint's
    config.json, or a hub model's config (fetched when online, else read from the hub cache)."""
    where = f"model.path={model_path!r}"
    if model_path.startswith("reference:"):
        from reference.families import FAMILIES
        from reference.specs import get_spec

        spec = get_spec(model_path.removeprefix("reference:"))
        return shape_from_config(FAMILIES.get(spec.family)(spec, {}))
    local = Path(model_path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise QuailoraInputError(f"{where}: no config.json in {local}")
    try:
        config = load_model_config(local if local.exists() else model_path, where)
    except QuailoraInputError as err:
        raise QuailoraInputError(
            f"{err} (plan reads only the config; offline, a hub model must be in the hub cache)"
        ) from None
    return shape_from_config(config)
