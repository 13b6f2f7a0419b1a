"""What cannot be derived from a model and must be written down, one ``Architecture`` per file of this package."""

from __future__ import annotations

from dataclasses import dataclass

from quailora.registry import Registry


@dataclass(frozen=True)
class ExpertNames:
    """Names of one expert's projections in checkpoints (``experts.<e>.<name>.weight``): transformers 5
    fuses experts into 3-D ``gate_up_proj``/``down_proj`` parameters at load time, quailora keeps one
    nn.Linear per expert so bitsandbytes quantizes them and peft adapts them."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


@dataclass(frozen=True)
class Architecture:
    """Facts about one ``config.model_type`` that the model's modules do not reveal.

    routers: module-name suffixes inside a decoder layer that route tokens to experts; never adapted by
    ``all-linear``. experts: checkpoint names of a fused-experts module's per-expert projections.
    checkpoint_renames: (module-name fragment, checkpoint-key fragment) pairs where transformers renames
    legacy checkpoint keys on load (e.g. Mixtral's ``block_sparse_moe`` is the module ``mlp``).
    """

    routers: tuple[str, ...] = ()
    experts: ExpertNames | None = None
    checkpoint_renames: tuple[tuple[str, str], ...] = ()


ARCHITECTURES: Registry[Architecture] = Registry("architecture (config.model_type)")
