"""Load a checkpoint straight into group-wise INT-k, one tensor at a time, on the device it will run on.

Loading the whole model in full precision first (``from_pretrained`` then quantize) holds every weight at
once: ~65 GB of host RAM per worker for a 30B model in bf16. Here the model is built on the meta device,
each linear layer's weight is read from the safetensors checkpoint, moved to ``device``, quantized there
and dropped; the other tensors (embeddings, norms, head) are then read in place. Weights are read in their
stored dtype straight onto ``device`` and converted there, a few ahead on a thread pool
(quailora.checkpoint.read_threads). Peak: the quantized model plus the weights in flight (at most
``read_threads()`` of them, and about that many 64 MiB chunks beyond one weight).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from quailora.architectures import Layout, ModelWeights, load_model_config, rebuild_buffers
from quailora.errors import QuailoraInputError
from quailora.quantizers.groupwise.codes import GroupwiseIntQuantizer
from quailora.quantizers.groupwise.layer import GroupwiseLinear, check_groupwise_targets, groupwise_targets


def load_groupwise_model(
    checkpoint_dir: str | Path, bits: int, group_size: int, *, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """The checkpoint's causal LM with every linear layer but the head a GroupwiseLinear, on ``device``,
    the rest in ``dtype``: the model ``quantize_model_groupwise(from_pretrained(dtype=dtype))`` gives, with
    projections prepared as quailora.architectures.prepare makes them (Conv1D, fused experts)."""
    quantizer = GroupwiseIntQuantizer(bits, group_size)  # validates bits and group_size
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_model_config(checkpoint_dir, "model.path"), dtype=dtype)
    weights = ModelWeights(checkpoint_dir, Layout.of(model))
    targets = groupwise_targets(model)
    check_groupwise_targets(targets, group_size)
    # Read ahead on the reader's thread pool (the next weights are read while this one is quantized), each
    # in its stored dtype straight onto the device and converted there.
    keys = [
        key
        for name, module in targets
        for key in (f"{name}.weight", f"{name}.bias")[: 1 + (module.bias is not None)]
    ]
    reads = weights.read(keys, device=device, dtype=dtype)
    for name, module in targets:
        weight = next(reads)[1]
        bias = None if module.bias is None else next(reads)[1]
        layer = GroupwiseLinear.from_quantized(quantizer.quantize(weight, name=name), bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        del weight
    reads.close()
    pending = [key for key, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
    # Rotary tables and other non-persistent buffers are in no checkpoint: computed on the CPU, as
    # from_pretrained does, then moved.
    rebuild_buffers(model, model, "cpu")
    state = dict(weights.read([key for key in pending if key in weights], device=device, dtype=dtype))
    model.load_state_dict(state, strict=False, assign=True)  # adopts the read tensors: no second copy
    model.tie_weights()  # a tied head is not in the checkpoint: it shares the embedding's tensor
    missing = [key for key, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
    if missing:
        raise QuailoraInputError(
            f"checkpoint {str(checkpoint_dir)!r} lacks tensor(s) {missing[:5]} of its model_type "
            f"{model.config.model_type!r}"
        )
    return model.to(device).eval()
