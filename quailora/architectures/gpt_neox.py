"""gpt_neox: everything else is derived from the model (quailora.architectures.derive). transformers 5 names
the head module ``lm_head``; checkpoints (its own save_pretrained included) store it as ``embed_out``."""

from quailora.architectures.spec import ARCHITECTURES, Architecture

ARCHITECTURES.register("gpt_neox")(Architecture(checkpoint_renames=(("lm_head.", "embed_out."),)))
