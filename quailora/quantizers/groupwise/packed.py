"""quailora's own on-disk format for a model with GroupwiseLinear layers: packed codes, scales and zeros as
the layers hold them, so it loads without quantizing again.

It is the int backend's ``save`` / ``load_saved`` (``quailora.quantizers.groupwise.backend``), i.e. the
quantize stage's cache entry, and holds a QA-LoRA-merged model as well (fractional zero points kept
exactly). Files: ``config.json``, the manifest ``quailora_groupwise.json`` (architecture, dtype and each
GroupwiseLinear's shape, bits, group size, bias) and ``model.safetensors`` (every tensor; tied duplicates
such as lm_head = embed_tokens stored once). The stock format is ``compressed`` (compressed-tensors).
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
import transformers

from quailora.errors import QuailoraInputError
from quailora.quantizers.groupwise.layer import GroupwiseLinear

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "quailora_groupwise.json"


def save_packed(model: transformers.PreTrainedModel, out_dir: str | Path) -> Path:
    """Write config.json, the GroupwiseLinear manifest and one safetensors file (codes, scales, zeros)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bits": m.bits,
            "group_size": m.group_size,
            "bias": m.bias is not None,
        }
        for name, m in model.named_modules()
        if isinstance(m, GroupwiseLinear)
    }
    if not layers:
        raise QuailoraInputError(
            "save_packed: the model has no GroupwiseLinear layer (is a QA-LoRA model merged and unloaded?)"
        )
    model.config.save_pretrained(out)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    (out / MANIFEST_FILE).write_text(
        json.dumps({"architecture": type(model).__name__, "dtype": dtype, "layers": layers}, indent=1)
    )
    # save_model (not save_file) drops tied duplicates such as lm_head = embed_tokens.
    safetensors.torch.save_model(model, str(out / WEIGHTS_FILE))
    return out


def load_packed(model_dir: str | Path) -> transformers.PreTrainedModel:
    """Rebuild the architecture from config.json, put GroupwiseLinear shells in place, load the tensors."""
    src = Path(model_dir)
    for required in ("config.json", MANIFEST_FILE, WEIGHTS_FILE):
        if not (src / required).is_file():
            raise QuailoraInputError(f"load_packed: {src} has no {required} (not written by save_packed)")
    manifest = json.loads((src / MANIFEST_FILE).read_text())
    config = transformers.AutoConfig.from_pretrained(src)
    model = getattr(transformers, manifest["architecture"])(config).to(getattr(torch, manifest["dtype"]))
    for name, spec in manifest["layers"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, GroupwiseLinear(**spec))
    safetensors.torch.load_model(model, str(src / WEIGHTS_FILE), strict=True)
    return model.eval()
