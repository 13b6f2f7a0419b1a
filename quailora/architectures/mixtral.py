"""mixtral: sparse MoE. Checkpoints keep the legacy ``block_sparse_moe.experts.<e>.w1/w3/w2`` names."""

from quailora.architectures.spec import ARCHITECTURES, Architecture, ExpertNames

ARCHITECTURES.register("mixtral")(
    Architecture(
        routers=("mlp.gate",),
        experts=ExpertNames(gate="w1", up="w3", down="w2"),
        checkpoint_renames=((".mlp.", ".block_sparse_moe."),),
    )
)
