"""Group-wise INT-k models in the format stock libraries read (the int backend's stock export).

``save_compressed``: a model with GroupwiseLinear layers as a compressed-tensors ``pack-quantized``
checkpoint, which stock ``AutoModelForCausalLM.from_pretrained`` loads when the ``compressed-tensors``
package is installed. Our layer holds W = α(c − z) per (row, group of L inputs), codes c in [0, 2^k − 1];
the format stores the signed codes c − 2^(k−1) packed in int32 and computes (q − zp)·scale in the scale's
dtype, so scale = α (float16 values, stored as float32) and zp = z − 2^(k−1) give W back:

- zero points that are integers in [0, 2^k − 1] (a model as quantized): strategy ``group``, zero points
  packed as k-bit integers, the layout other readers (vLLM) expect; bit for bit;
- any other zero point (a QA-LoRA merge makes them fractional, z' = z − δ/α; a group whose weights all
  share one sign has z outside the range): strategy ``tensor_group`` with a unit global scale and float32
  zero points, the pack-quantized layout whose zero points need not be k-bit integers. (z − 2^(k−1))
  is rounded to float32 once, so W comes back within one float32 ulp.

Both are written with ``"dequantize": true`` in the checkpoint's quantization_config, a transformers
loading option: transformers 5.24 with compressed-tensors 0.20 cannot load packed group zero points in
compressed form (it allocates them unpacked, a size mismatch), and dequantizing at load reads them right.
On a CPU the weights are dequantized at the first forward either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.base import compress_module
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization
from torch import nn

from quailora.errors import QuailoraInputError
from quailora.quantizers.groupwise.layer import GroupwiseLinear

PACKED_BITS = range(1, 9)  # what pack-quantized holds: 1 to 8 bits per code, packed into int32


def _integer_zero_points(layers: list[GroupwiseLinear], bits: int) -> bool:
    return all(
        bool(((z := layer.zero_values()) == z.round()).all() and z.min() >= 0 and z.max() <= 2**bits - 1)
        for layer in layers
    )


def _weight_args(layers: list[GroupwiseLinear]) -> QuantizationArgs:
    """The one quantization scheme of the model's group-wise layers (see the module docstring)."""
    settings = {(layer.bits, layer.group_size) for layer in layers}
    if len(settings) != 1:
        raise QuailoraInputError(
            f"save_compressed: the layers mix (bits, group_size) settings {sorted(settings)}; one is needed"
        )
    ((bits, group_size),) = settings
    if bits not in PACKED_BITS:
        raise QuailoraInputError(
            f"save_compressed: {bits}-bit codes do not fit compressed-tensors' pack-quantized format "
            f"({PACKED_BITS.start} to {PACKED_BITS.stop - 1} bits)"
        )
    if _integer_zero_points(layers, bits):
        return QuantizationArgs(
            num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group_size
        )
    return QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=False,
        strategy="tensor_group",
        group_size=group_size,
        zp_dtype=torch.float32,
    )


@torch.no_grad()
def _compressed_linear(layer: GroupwiseLinear, scheme: QuantizationScheme) -> nn.Linear:
    """An nn.Linear carrying the layer's scheme, scales and zero points, compressed (one layer dense at a time)."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    linear.weight.data = layer.dequantize()
    if layer.bias is not None:
        linear.bias.data = layer.bias.detach().clone()
    initialize_module_for_quantization(linear, scheme)
    linear.weight_scale.data = layer.scale_values().float()
    linear.weight_zero_point.data = (layer.zero_values() - 2 ** (layer.bits - 1)).to(
        linear.weight_zero_point.dtype
    )
    if hasattr(linear, "weight_global_scale"):
        linear.weight_global_scale.data.fill_(1.0)
    compress_module(linear, CompressionFormat.pack_quantized)
    return linear


def save_compressed(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``model`` (a transformers model whose quantized layers are GroupwiseLinear) as a pack-quantized
    compressed-tensors checkpoint. The model's GroupwiseLinear layers are replaced in place."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GroupwiseLinear)}
    if not layers:
        raise QuailoraInputError("save_compressed: the model has no GroupwiseLinear layer")
    scheme = QuantizationScheme(targets=["Linear"], weights=_weight_args(list(layers.values())))
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _compressed_linear(layer, scheme))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    out = Path(out_dir)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["dequantize"] = True  # see the module docstring
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
