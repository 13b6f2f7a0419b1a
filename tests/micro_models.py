"""Tiny random-initialized causal LMs of each supported family, saved as (sharded) safetensors checkpoints.

Shared by the tests: ``make_micro_checkpoint("llama", tmp_path / "ckpt")``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

from quailora.supported_architectures import SUPPORTED, ConfigBuilder


def _llama_like(config_cls) -> ConfigBuilder:
    def build(num_layers, hidden, intermediate, heads, vocab, max_positions):
        return config_cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),  # exercise grouped-query attention
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
        )

    return build


# The reference families the older tests build by name, then every tested architecture.
CONFIGS: dict[str, ConfigBuilder] = {
    "llama": _llama_like(LlamaConfig),
    "mistral": _llama_like(MistralConfig),
    "qwen2": _llama_like(Qwen2Config),
    "opt": lambda num_layers, hidden, intermediate, heads, vocab, max_positions: OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        word_embed_proj_dim=hidden,
        ffn_dim=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
    ),
    "bloom": lambda num_layers, hidden, intermediate, heads, vocab, max_positions: BloomConfig(
        vocab_size=vocab, hidden_size=hidden, n_layer=num_layers, n_head=heads
    ),  # bloom's MLP is fixed at 4 x hidden
    "gpt_neox": lambda num_layers, hidden, intermediate, heads, vocab, max_positions: GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
    ),
}


# The conformance matrix: one micro config per tested architecture and variant (quailora.supported_architectures).
ARCHITECTURES: dict[str, ConfigBuilder] = {name: entry.build for name, entry in SUPPORTED.items()}
CONFIGS.update({name: build for name, build in ARCHITECTURES.items() if name not in CONFIGS})
FAMILIES = sorted(CONFIGS)


def make_micro_config(
    family: str,
    num_layers: int = 2,
    hidden: int = 64,
    intermediate: int | None = None,
    heads: int = 4,
    vocab: int = 128,
    max_positions: int = 256,
) -> PretrainedConfig:
    if family not in CONFIGS:
        raise ValueError(f"unknown micro model family {family!r}; known: {FAMILIES}")
    return CONFIGS[family](num_layers, hidden, intermediate or 2 * hidden, heads, vocab, max_positions)


def make_micro_checkpoint(
    family: str,
    path: str | Path,
    num_layers: int = 2,
    hidden: int = 64,
    intermediate: int | None = None,
    heads: int = 4,
    vocab: int = 128,
    max_positions: int = 256,
    max_shard_size: str | int = "100KB",
    seed: int = 0,
    noise: float = 0.05,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a random model of ``family`` to ``path`` (in ``dtype``, sharded by ``max_shard_size``); return the path.

    ``noise`` is added to every parameter so norms and biases are not at their 1/0 defaults, which would
    hide a module left unloaded.
    """
    config = make_micro_config(family, num_layers, hidden, intermediate, heads, vocab, max_positions)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(noise * torch.randn_like(param))
    path = Path(path)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    return path
