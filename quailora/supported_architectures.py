"""The architectures quailora is tested on: one list, each entry with the variant its micro config exercises
and the builder of that config. The conformance tests build every entry (tests/test_architectures.py,
tests/test_architecture_methods.py, tests/test_groupwise_loading.py); `quailora architectures` prints it;
`quailora plan` and a trial's tags call any other model type "derived, untested" (its layout is derived from its
modules, quailora/architectures/derive.py, but no test has run it); docs/architectures.md's matrix lists the
same rows (a test checks). Outside quailora/architectures/ because that package imports torch and
transformers, which `quailora plan` must not (a builder imports transformers only when called).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# (num_layers, hidden, intermediate, heads, vocab, max_positions) -> a micro config
ConfigBuilder = Callable[[int, int, int, int, int, int], "PretrainedConfig"]
TESTED, UNTESTED = "tested", "derived, untested"


@dataclass(frozen=True)
class Supported:
    variant: str  # what the micro config exercises (docs/architectures.md's "variant in the test")
    build: ConfigBuilder

    @property
    def model_type(self) -> str:
        return self.build.model_type  # set by _auto: known without building the config


def _auto(model_type: str, **extra) -> ConfigBuilder:
    """Any architecture through AutoConfig; ``extra`` sets what differs from the common fields."""

    def build(num_layers, hidden, intermediate, heads, vocab, max_positions):
        from transformers import AutoConfig

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

    build.model_type = model_type  # read without building (and importing transformers)
    return build


_GQA = {"num_key_value_heads": 2}
SUPPORTED: dict[str, Supported] = {
    "llama": Supported(
        "GQA",
        _auto("llama", **_GQA, tie_word_embeddings=False),
    ),
    "llama3": Supported(
        "GQA, llama3 rope scaling, tied embeddings",
        _auto(
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
        ),
    ),
    "mistral": Supported(
        "GQA",
        _auto("mistral", **_GQA),
    ),
    "mixtral": Supported(
        "4 experts, top-2; experts split into nn.Linear; legacy `block_sparse_moe`, `w1`/`w3`/`w2` names",
        _auto("mixtral", **_GQA, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": Supported(
        "4 experts + shared expert; linear shared-expert gate (a router)",
        _auto(
            "qwen2_moe",
            **_GQA,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
        ),
    ),
    "qwen3_moe": Supported(
        "4 experts, top-2, q/k norms",
        _auto(
            "qwen3_moe", **_GQA, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
        ),
    ),
    "deepseek_v3": Supported(
        "MLA attention (q/kv LoRA ranks), dense layer 0, 4 routed experts in 2 groups + a shared expert",
        _auto(
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
        ),
    ),
    "olmoe": Supported(
        "4 experts, top-2",
        _auto("olmoe", **_GQA, num_experts=4, num_experts_per_tok=2),
    ),
    "gpt_oss": Supported(
        "experts stored fused and transposed, gate/up interleaved, biases, clamped SwiGLU; sliding/full layers, attention sinks",
        _auto(
            "gpt_oss",
            **_GQA,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
        ),
    ),
    "qwen2": Supported(
        "GQA",
        _auto("qwen2", **_GQA),
    ),
    "qwen3": Supported(
        "q/k norms",
        _auto("qwen3", **_GQA, head_dim=16),
    ),
    "gemma": Supported(
        "scaled embeddings",
        _auto("gemma", **_GQA, head_dim=16),
    ),
    "gemma2": Supported(
        "alternating sliding/global attention",
        _auto("gemma2", **_GQA, head_dim=16, sliding_window=8),
    ),
    "gemma3_text": Supported(
        "sliding and global layers, two rotary tables",
        _auto(
            "gemma3_text",
            **_GQA,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "phi3": Supported(
        "fused `qkv_proj`, `gate_up_proj`",
        _auto("phi3", **_GQA),
    ),
    "falcon": Supported(
        "fused `query_key_value`, multi-query, parallel attention",
        _auto(
            "falcon",
            multi_query=True,
            parallel_attn=True,
            new_decoder_architecture=False,
            ffn_hidden_size=128,
        ),
    ),
    "gptj": Supported(
        "partial rotary",
        _auto("gptj", rotary_dim=8, n_inner=128),
    ),
    "gpt2": Supported(
        "Conv1D (trained as nn.Linear; the adapter loads on the stock Conv1D model)",
        _auto("gpt2", n_inner=128),
    ),
    "opt": Supported(
        "learned positions, ReLU MLP",
        _auto("opt", ffn_dim=128, word_embed_proj_dim=64),
    ),
    "bloom": Supported(
        "alibi",
        _auto("bloom"),
    ),
    "gpt_neox": Supported(
        "partial rotary, parallel residual",
        _auto("gpt_neox", rotary_pct=0.25, use_parallel_residual=True),
    ),
    "olmo2": Supported(
        "q/k norms, norms after attention and MLP",
        _auto("olmo2", **_GQA),
    ),
}


def tested_model_types() -> set[str]:
    return {entry.model_type for entry in SUPPORTED.values()}


def support(model_type: str) -> str:
    """ "tested" for a model type of SUPPORTED, else "derived, untested"."""
    return TESTED if model_type in tested_model_types() else UNTESTED
