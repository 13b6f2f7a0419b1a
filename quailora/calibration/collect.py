"""Layer-sharded Gram collection: one full-precision decoder layer in memory at a time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from quailora.calibration.accumulate import GramAccumulator
from quailora.calibration.distributed import GramReducer
from quailora.calibration.layerwise import LayerCall, LayerwiseModel
from quailora.calibration.store import GramStore, write_index, write_layer
from quailora.errors import QuailoraInputError
from quailora.registry import Registry

if TYPE_CHECKING:  # only the protocol is needed; importing quantizers would pull in bitsandbytes
    from quailora.quantizers.base import Quantizer

# propagate(layer, calls, grams, quantizer): accumulate the layer's Grams and replace each call's
# hidden states by what the next layer should read.
Propagation = Callable[[nn.Module, list[LayerCall], GramAccumulator, "Quantizer | None"], None]
PROPAGATIONS: Registry[Propagation] = Registry("propagate mode")


@PROPAGATIONS.register("teacher")
def propagate_teacher(layer, calls, grams, quantizer) -> None:
    """The full-precision outputs feed the next layer (the model the adapters will imitate)."""
    for call in calls:
        call.hidden = call.run(layer)
        grams.end_batch()


@PROPAGATIONS.register("quantized")
def propagate_quantized(layer, calls, grams, quantizer) -> None:
    """GPTQ-style: Grams from the full-precision layer, then outputs of the layer with its Linear weights
    fake-quantized feed the next layer, so later Grams see the quantization error of earlier layers."""
    for call in calls:
        call.run(layer)
        grams.end_batch()
    grams.remove()  # the second pass must not add to the Grams
    for module in layer.modules():
        if isinstance(module, nn.Linear):
            module.weight.copy_(quantizer.fake_quantize(module.weight))
    for call in calls:
        call.hidden = call.run(layer)


def _validate(
    model: LayerwiseModel, input_ids, propagate, quantizer, dtype, batch_size, *, allow_empty: bool
) -> None:
    PROPAGATIONS.get(propagate, where="collect_grams(propagate=...)")
    if propagate == "quantized" and not callable(getattr(quantizer, "fake_quantize", None)):
        raise QuailoraInputError(
            f"propagate='quantized' needs a quantizer with fake_quantize, got {quantizer!r}"
        )
    if propagate != "quantized" and quantizer is not None:
        raise QuailoraInputError(f"quantizer={quantizer!r} is only used with propagate='quantized'")
    if dtype not in (torch.float32, torch.float64):
        raise QuailoraInputError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise QuailoraInputError(f"batch_size must be a positive int, got {batch_size!r}")
    empty = isinstance(input_ids, torch.Tensor) and input_ids.numel() == 0 and not allow_empty
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or empty:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise QuailoraInputError(f"input_ids must be a non-empty [num_seq, seq_len] tensor, got {shape}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise QuailoraInputError(f"input_ids must be an integer (long) tensor, got dtype {input_ids.dtype}")
    vocab = model.config.vocab_size
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
        raise QuailoraInputError(
            f"input_ids values must lie in [0, vocab_size={vocab}), got [{input_ids.min()}, {input_ids.max()}]"
        )
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and input_ids.shape[1] > max_positions:
        raise QuailoraInputError(
            f"input_ids seq_len {input_ids.shape[1]} exceeds max_position_embeddings={max_positions}"
        )


@torch.no_grad()
def collect_grams(
    checkpoint_dir: str | Path,
    input_ids: torch.Tensor,
    out_dir: str | Path | None,
    *,
    propagate: str = "teacher",
    quantizer: Quantizer | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    progress: bool = False,
    device: str | torch.device = "cpu",
    forward_dtype: torch.dtype = torch.float32,
    reducer: GramReducer | None = None,
) -> GramStore | None:
    """Write H = XᵀX / N for every distinct nn.Linear input of every decoder layer to ``out_dir``.

    N is the number of calibration tokens (input_ids has no padding). ``dtype`` is the accumulation
    precision (float64 for very long calibration sets); stored Grams are float32. Layers run on
    ``device`` in ``forward_dtype``. With a ``reducer`` (data-parallel), ``input_ids`` is this process's
    share and only the process whose reducer ``writes`` needs an ``out_dir``; the others return None.
    """
    model = LayerwiseModel(checkpoint_dir, device=device, dtype=forward_dtype)
    _validate(model, input_ids, propagate, quantizer, dtype, batch_size, allow_empty=reducer is not None)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise QuailoraInputError(f"out_dir {str(out)!r} exists and is not a directory")
    calls = model.capture_inputs(input_ids.long(), batch_size)
    return run_layers(
        model,
        calls,
        out,
        propagate=propagate,
        quantizer=quantizer,
        dtype=dtype,
        progress=progress,
        reducer=reducer,
    )


def _module_records(grams: GramAccumulator, index: int) -> dict[str, dict]:
    """The index's record of each hooked linear of layer ``index``: which stored Gram it reads and how many
    tokens reached it. A linear no token reached (a MoE expert nothing was routed to) has no Gram."""
    records = {name: {"layer": index, "gram": None, "tokens": 0} for name in grams.names}
    for name, key in grams.group_of.items():
        records[name] = {"layer": index, "gram": key, "tokens": grams.rows[key]}
    return records


@torch.no_grad()
def run_layers(
    model: LayerwiseModel,
    calls: list[LayerCall],
    out_dir: str | Path | None,
    *,
    propagate: str = "teacher",
    quantizer: Quantizer | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    reducer: GramReducer | None = None,
) -> GramStore | None:
    """The layer loop of ``collect_grams``, on already captured layer-0 calls. On return each call's
    ``hidden`` holds the last decoder layer's output (what the final norm would read)."""
    writes = reducer is None or reducer.writes
    if writes:
        if out_dir is None:
            raise QuailoraInputError("out_dir is required on the process that writes the Grams")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    run_layer = PROPAGATIONS.get(propagate, where="propagate")
    layer_files: dict[str, str] = {}
    modules: dict[str, dict] = {}
    for index in tqdm(range(model.num_layers), desc="calibration", disable=not progress):
        with model.layer(index) as layer:
            grams = GramAccumulator(layer, model.layer_name(index), dtype)
            try:
                run_layer(layer, calls, grams, quantizer)
            finally:
                grams.remove()
        if reducer is not None:
            reducer.reduce(grams)
        if writes:
            layer_files[str(index)] = write_layer(out_dir, index, grams.grams())  # the layer is freed by now
        modules.update(_module_records(grams, index))
        del grams
    num_tokens = sum(call.hidden.shape[0] * call.hidden.shape[1] for call in calls)
    if reducer is not None:
        num_tokens = reducer.total(num_tokens)
    if not writes:
        return None
    write_index(
        out_dir,
        {
            "num_tokens": num_tokens,
            "checkpoint_dir": str(model.checkpoint_dir.resolve()),
            "model_type": model.config.model_type,
            "propagate": propagate,
            "quantizer": getattr(quantizer, "name", None),
            "accumulate_dtype": str(dtype).removeprefix("torch."),
            "layers": layer_files,
            "modules": modules,
        },
    )
    return GramStore(out_dir)
