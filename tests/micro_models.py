"""Tiny random-initialized causal LMs of each supported family, saved as (sharded) safetensors checkpoints.

Shared by the tests: ``make_micro_checkpoint("llama", tmp_path / "ckpt")``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BloomConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

# family -> config builder(num_layers, hidden, intermediate, heads, vocab, max_positions)
ConfigBuilder = Callable[[int, int, int, int, int, int], PretrainedConfig]


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


def _auto(model_type: str, **extra) -> ConfigBuilder:
    """Any architecture through AutoConfig; ``extra`` sets what differs from the common fields."""

    def build(num_layers, hidden, intermediate, heads, vocab, max_positions):
        fields = dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            max_position_embeddings=max_positions,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        return AutoConfig.for_model(model_type, **(fields | extra))

    return build


_GQA = {"num_key_value_heads": 2}
# The conformance matrix (docs/architectures.md): one micro config per architecture and variant.
ARCHITECTURES: dict[str, ConfigBuilder] = {
    "llama": _auto("llama", **_GQA, tie_word_embeddings=False),
    "llama3": _auto(
        "llama",
        **_GQA,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),  # fmt: skip
    "mistral": _auto("mistral", **_GQA),
    "mixtral": _auto("mixtral", **_GQA, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": _auto(
        "qwen2_moe",
        **_GQA,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    ),  # fmt: skip
    "qwen3_moe": _auto(
        "qwen3_moe", **_GQA, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
    ),
    "deepseek_v3": _auto(
        "deepseek_v3",
        **_GQA,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        moe_intermediate_size=32,
        n_shared_experts=1,
        first_k_dense_replace=1,  # layer 0 dense, layer 1 MoE
        q_lora_rank=32,
        kv_lora_rank=32,  # QA-LoRA pools kv_b_proj's input in groups of 8: 4 >= rank 4
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=16,
    ),  # fmt: skip
    "olmoe": _auto("olmoe", **_GQA, num_experts=4, num_experts_per_tok=2),
    "gpt_oss": _auto(
        "gpt_oss",
        **_GQA,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    ),  # fmt: skip
    "qwen2": _auto("qwen2", **_GQA),
    "qwen3": _auto("qwen3", **_GQA, head_dim=16),
    "gemma": _auto("gemma", **_GQA, head_dim=16),
    "gemma2": _auto("gemma2", **_GQA, head_dim=16, sliding_window=8),
    "gemma3_text": _auto(
        "gemma3_text",
        **_GQA,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "phi3": _auto("phi3", **_GQA),
    "falcon": _auto(
        "falcon", multi_query=True, parallel_attn=True, new_decoder_architecture=False, ffn_hidden_size=128
    ),
    "gptj": _auto("gptj", rotary_dim=8, n_inner=128),
    "gpt2": _auto("gpt2", n_inner=128),
    "opt": _auto("opt", ffn_dim=128, word_embed_proj_dim=64),
    "bloom": _auto("bloom"),
    "gpt_neox": _auto("gpt_neox", rotary_pct=0.25, use_parallel_residual=True),
    "olmo2": _auto("olmo2", **_GQA),
}
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
