"""Where each transformers architecture keeps its decoder layers and what runs before layer 0.

Module paths are those of ``AutoModelForCausalLM`` (and of the checkpoints it saves).
Adding an architecture means adding one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from quailora.registry import Registry


@dataclass(frozen=True)
class Family:
    """layers: the ModuleList of decoder layers. pre_layer: modules loaded from the checkpoint to compute
    layer 0's inputs (absent ones, e.g. OPT's optional ``project_in``, are skipped). rebuilt: modules whose
    state is not in the checkpoint (rotary ``inv_freq`` buffers are non-persistent), re-created on CPU as
    ``type(module)(config=config)``."""

    layers: str
    pre_layer: tuple[str, ...]
    rebuilt: tuple[str, ...] = ()


FAMILIES: Registry[Family] = Registry("model family (config.model_type)")

_LLAMA_LIKE = Family(layers="model.layers", pre_layer=("model.embed_tokens",), rebuilt=("model.rotary_emb",))
for _name in ("llama", "mistral", "qwen2"):
    FAMILIES.register(_name)(_LLAMA_LIKE)

FAMILIES.register("opt")(
    Family(
        layers="model.decoder.layers",
        pre_layer=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    )
)
FAMILIES.register("bloom")(
    Family(
        layers="transformer.h",
        pre_layer=("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
    )
)
FAMILIES.register("gpt_neox")(
    Family(layers="gpt_neox.layers", pre_layer=("gpt_neox.embed_in",), rebuilt=("gpt_neox.rotary_emb",))
)
