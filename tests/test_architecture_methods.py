"""The conformance matrix's method columns (docs/architectures.md): every registered init method, LoRA and
QA-LoRA, on every supported architecture, in-process. tests/test_architectures.py checks calibration,
peft attachment and stock reload once per architecture; this checks what differs per method.

    .venv/bin/pytest -q tests/test_architecture_methods.py
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from quailora.architectures import Layout, ModelWeights
from quailora.calibration import collect_grams
from quailora.initializers import INITIALIZERS, adapter_kind
from quailora.peft_init import apply_adapters, compute_adapters, lora_layer_names, validate_lora_targets
from quailora.quantizers.bnb.layers import exact_cpu_4bit
from quailora.supported_architectures import SUPPORTED
from testkit.micro import make_micro_checkpoint
from trials.adapters import build_adapter
from trials.config import TrialConfig
from trials.quantized_model import load_quantized_model

IDS = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
# QA-LoRA's base: group-wise INT4 whose groups divide every micro layer's input width.
QUANT = {"plain": {"method": "nf4", "bits": 4}, "pooled": {"method": "int", "bits": 4, "group_size": 8}}
# The methods that start the adapter at a product that approximates the quantization error (the others
# start it at zero: their adapted model equals the quantized one at step 0).
ERROR_FITTING = {"svd", "quailora", "closed_form", "loftq", "qalora_closed_form"}


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_every_init_method(name, tmp_path):
    checkpoint = make_micro_checkpoint(name, tmp_path / "ckpt")
    layout = Layout.from_config(str(checkpoint))
    store = collect_grams(checkpoint, IDS, tmp_path / "grams", batch_size=2)
    weights = ModelWeights(checkpoint, layout)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        full = reference(input_ids=IDS).logits
    targets = validate_lora_targets(layout.model, "all-linear", 4, exclude=layout.is_router)
    assert set(ERROR_FITTING) < set(INITIALIZERS)

    failures = {}
    for method in sorted(INITIALIZERS):
        kind = adapter_kind(method)
        config = TrialConfig(
            model={"path": str(checkpoint)}, quant=QUANT[kind], lora={"rank": 4}, init={"method": method}
        )
        model = build_adapter(
            load_quantized_model(checkpoint, config, torch.float32, torch.device("cpu")), config, targets
        )
        exact_cpu_4bit(model)
        model.eval()
        with torch.no_grad(), model.disable_adapter():
            quantized = model(input_ids=IDS).logits
        updates = compute_adapters(model, method, weights, store, **dict(config.init.options))
        assert sorted(updates) == sorted(lora_layer_names(model)) and len(updates) == len(targets), method
        apply_adapters(model, updates, weights=weights)
        with torch.no_grad():
            adapted = model(input_ids=IDS).logits
        # The init's whole point: the quantized model plus adapter is closer to the full-precision model.
        before, after = (quantized - full).pow(2).mean().item(), (adapted - full).pow(2).mean().item()
        if method in ERROR_FITTING and not after < before:
            failures[method] = f"logit MSE to full precision {before:.3g} -> {after:.3g}"
        if method not in ERROR_FITTING and not torch.allclose(adapted, quantized, atol=1e-5):
            failures[method] = "a zero-start method changed the model at step 0"

        # One training step reaches every adapter.
        model.train()
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        modules = dict(model.named_modules())
        dead = [
            n
            for n in updates
            if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in modules[n].lora_B.parameters())
        ]
        if not torch.isfinite(loss) or dead:
            failures[method] = f"loss {loss.item()}, no gradient in {dead[:3]}"
    assert not failures, failures
