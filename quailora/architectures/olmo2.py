"""olmo2: everything is derived from the model (quailora.architectures.derive)."""

from quailora.architectures.spec import ARCHITECTURES, Architecture

ARCHITECTURES.register("olmo2")(Architecture())
