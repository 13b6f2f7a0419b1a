"""One transformers config builder per architecture family, so every family pretrains through the same loop."""

from __future__ import annotations

from collections.abc import Callable

from transformers import BloomConfig, GPTNeoXConfig, LlamaConfig, OPTConfig, PretrainedConfig

from quailora.registry import Registry
from reference.specs import ModelSpec

ConfigBuilder = Callable[[ModelSpec, dict], PretrainedConfig]
FAMILIES: Registry[ConfigBuilder] = Registry("model family")


@FAMILIES.register("llama")
def llama_config(spec: ModelSpec, special: dict) -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.seq_len,
        tie_word_embeddings=False,
        **special,
    )


@FAMILIES.register("opt")
def opt_config(spec: ModelSpec, special: dict) -> PretrainedConfig:
    return OPTConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        ffn_dim=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        word_embed_proj_dim=spec.hidden_size,
        max_position_embeddings=spec.seq_len,
        do_layer_norm_before=True,
        dropout=0.0,  # a single short epoch does not overfit
        attention_dropout=0.0,
        **special,
    )


@FAMILIES.register("bloom")
def bloom_config(spec: ModelSpec, special: dict) -> PretrainedConfig:
    # BLOOM's MLP width is fixed at 4 x hidden (checked in ModelSpec).
    return BloomConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        n_layer=spec.num_layers,
        n_head=spec.num_heads,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **special,
    )


@FAMILIES.register("gpt-neox")
def gpt_neox_config(spec: ModelSpec, special: dict) -> PretrainedConfig:
    # Pythia's choices: partial rotary embeddings and parallel attention/MLP residuals.
    return GPTNeoXConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        max_position_embeddings=spec.seq_len,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        **special,
    )
