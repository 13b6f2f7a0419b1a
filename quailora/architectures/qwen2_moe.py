"""qwen2_moe: sparse MoE plus a shared expert behind a sigmoid gate; both gates are routers."""

from quailora.architectures.spec import ARCHITECTURES, Architecture, ExpertNames

ARCHITECTURES.register("qwen2_moe")(
    Architecture(routers=("mlp.gate", "mlp.shared_expert_gate"), experts=ExpertNames())
)
