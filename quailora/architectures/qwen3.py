"""qwen3: everything is derived from the model (quailora.architectures.derive)."""

from quailora.architectures.spec import ARCHITECTURES, Architecture

ARCHITECTURES.register("qwen3")(Architecture())
