"""The conformance matrix (docs/architectures.md): every supported architecture, as a random micro model,
through calibration, initialization, the peft adapter, a training step and a stock-peft reload, in-process.

    .venv/bin/pytest -q tests/test_architectures.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from quailora.architectures import Layout, ModelWeights
from quailora.architectures.experts import peft_sees_split_experts
from quailora.architectures.stock_adapter import stock_adapter
from quailora.calibration import collect_grams
from quailora.linalg import calibrated_error
from quailora.peft_init import (
    apply_adapters,
    checkpoint_name,
    compute_adapters,
    lora_layer_names,
    validate_lora_targets,
)
from quailora.quantizers.bnb.layers import exact_cpu_4bit
from quailora.supported_architectures import SUPPORTED
from testkit.micro import make_micro_checkpoint
from trials.adapters import build_adapter
from trials.config import TrialConfig
from trials.quantized_model import load_quantized_model

IDS = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def whole_model_grams(checkpoint) -> dict[str, torch.Tensor]:
    """H = XᵀX/N of every linear inside the decoder layers, from hooks on one forward of the whole model."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    layout = Layout.of(model)
    sums, rows = {}, {}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in layout.linears()]
    model(input_ids=IDS, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: (total / rows[name]).float() for name, total in sums.items()}


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_architecture(name, tmp_path):
    checkpoint = make_micro_checkpoint(name, tmp_path / "ckpt")
    layout = Layout.from_config(str(checkpoint))

    # 1. Layer-by-layer Grams equal those of hooks on the whole model.
    store = collect_grams(checkpoint, IDS, tmp_path / "grams", batch_size=2)
    expected = whole_model_grams(checkpoint)
    assert store.names() == sorted(expected) == sorted(layout.linears())
    for module, gram in expected.items():
        torch.testing.assert_close(store.get(module), gram, rtol=1e-5, atol=1e-5 * gram.abs().max().item())

    # 2. The adapter attaches to every linear of the decoder layers but the routers.
    config = TrialConfig(model={"path": str(checkpoint)}, lora={"rank": 4}, init={"method": "quailora"})
    targets = validate_lora_targets(layout.model, "all-linear", 4, exclude=layout.is_router)
    assert sorted(targets) == sorted(n for n in layout.linears() if not layout.is_router(n))
    model = build_adapter(
        load_quantized_model(checkpoint, config, torch.float32, torch.device("cpu")), config, targets
    )
    exact_cpu_4bit(model)
    assert sorted(lora_layer_names(model)) == sorted(f"base_model.model.{t}" for t in targets)

    # 3. The calibrated init lowers the calibrated objective of every layer.
    weights = ModelWeights(checkpoint, layout)
    updates = compute_adapters(model, "quailora", weights, store, iterations=5)
    apply_adapters(model, updates)
    modules = dict(model.named_modules())
    for peft_name, update in updates.items():
        base = modules[peft_name].get_base_layer()
        key = checkpoint_name(peft_name)
        error = weights.get(f"{key}.weight") - exact_dequantize(base)
        product = modules[peft_name].scaling["default"] * update.lora_B @ update.lora_A
        gram = store.get(key)
        assert calibrated_error(error, product, gram) < calibrated_error(error, 0 * error, gram), peft_name

    # 4. A forward/backward step trains every adapter.
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert torch.isfinite(loss)
    for peft_name in lora_layer_names(model):
        grad = modules[peft_name].lora_B["default"].weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, peft_name

    # 5. The saved adapter reloads with stock peft and gives the same logits.
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    base = load_quantized_model(checkpoint, config, torch.float32, torch.device("cpu"))
    exact_cpu_4bit(base)
    with (
        peft_sees_split_experts()
    ):  # MoE: the experts of the quantized model are split (nothing else changes)
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, logits, rtol=1e-4, atol=1e-4)


def exact_dequantize(layer: nn.Module) -> torch.Tensor:
    from quailora.base_layers import base_layer_kind

    return base_layer_kind(layer).dequantize(layer)


def trained_split_adapter(name: str, tmp_path: Path) -> tuple[Path, Path, torch.Tensor]:
    """A micro checkpoint, the adapter a trial saves for it (on nn.Linear layers: GPT-2's Conv1D transposed,
    MoE experts split; B ~ N(0, 0.1)) and that adapted model's logits."""
    checkpoint = make_micro_checkpoint(name, tmp_path / "ckpt")
    config = TrialConfig(model={"path": str(checkpoint)}, lora={"rank": 4})
    prepared = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    layout = Layout.of(prepared)
    targets = validate_lora_targets(prepared, "all-linear", 4, exclude=layout.is_router)
    model = build_adapter(prepared, config, targets)
    with torch.no_grad():
        for lora_name in lora_layer_names(model):
            nn.init.normal_(dict(model.named_modules())[lora_name].lora_B["default"].weight, std=0.1)
        logits = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    return checkpoint, tmp_path / "adapter", logits


@pytest.mark.parametrize(
    "name", ["gpt2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
)
def test_adapter_fits_the_stock_transformers_model(name, tmp_path):
    """Rewritten by stock_adapter (MoE experts: LoRA on the fused 3-D parameters, peft's target_parameters),
    the trial's adapter loads on transformers' own model (Conv1D; fused experts) with stock peft and
    computes the same function."""
    checkpoint, adapter, logits = trained_split_adapter(name, tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    rewritten = stock_adapter(adapter, checkpoint, tmp_path / "stock")
    reloaded = PeftModel.from_pretrained(stock, rewritten).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, logits, rtol=1e-5, atol=1e-5)


# What peft 0.21's own v4-to-v5 MoE conversion does with the adapter as the trial saves it (why
# stock_adapter rewrites it), located with forward hooks on each module of the trial's and the reloaded
# model (docs/architectures.md, MoE notes):
PEFT_ALONE = {
    "gpt_oss": "peft has no conversion for gpt_oss (its checkpoints store the experts fused): the experts' "
    "gate_proj/up_proj/down_proj adapters match no module and are dropped; layers.0.mlp.experts differs first",
    "qwen2_moe": "peft's _MODEL_TO_CONVERSION_PATTERN has no qwen2_moe key (qwen3_moe, olmoe, deepseek_v3 "
    "map to it): the config is not rewritten, the expert weights are, and the experts' adapters are dropped "
    "(shared_expert keeps its own); layers.0.mlp.experts differs first",
    "deepseek_v3": "peft rewrites every gate_proj/up_proj/down_proj target onto the fused experts: the dense "
    "layer 0's mlp and the shared_experts lose their adapters; layers.0.mlp.gate_proj differs first",
}


@pytest.mark.parametrize(
    "name",
    ["mixtral", "qwen3_moe", "olmoe"]
    + [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=r)) for n, r in PEFT_ALONE.items()],
)
def test_peft_alone_loads_the_split_experts_adapter(name, tmp_path):
    """peft's own conversion of the adapter as saved is right where its table maps the model type and only
    the experts carry the expert projections' names. An XPASS means peft now handles that type itself."""
    checkpoint, adapter, logits = trained_split_adapter(name, tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(stock, adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, logits, rtol=1e-5, atol=1e-5)


MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss"]


@pytest.mark.parametrize("name", MOE)
def test_split_experts_compute_the_fused_module(name, tmp_path):
    """Split from the fused module's own layout (gpt-oss: transposed, interleaved gate/up, biases, clamped
    SwiGLU), the experts give the stock model's logits; each expert's tensors read from the checkpoint (per
    expert under transformers' legacy names, or sliced from gpt-oss's fused tensors) are the split weights."""
    checkpoint = make_micro_checkpoint(name, tmp_path / "ckpt")
    stock = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    split = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    layout = Layout.of(split)
    assert layout.experts() and not any(
        isinstance(p, nn.Parameter) and p.ndim == 3 for p in split.parameters()
    )
    with torch.no_grad():
        torch.testing.assert_close(
            split(input_ids=IDS).logits, stock(input_ids=IDS).logits, rtol=1e-5, atol=1e-5
        )
    weights = ModelWeights(checkpoint, layout)
    state = split.state_dict()
    for key, tensor in weights.read(list(state)):
        assert torch.equal(tensor, state[key]), key
    # Routers are the linears a MoE block holds beside its experts: qwen2_moe's shared_expert_gate only
    # (transformers 5's router modules are no nn.Linear).
    expected = (
        {f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)} if name == "qwen2_moe" else set()
    )
    assert layout.routers == expected


def test_experts_with_too_few_tokens_fall_back_to_the_uncalibrated_solve(tmp_path):
    """An expert routed fewer calibration tokens than its input width (or none) is solved with H = I, the
    uncalibrated objective, and flagged; the others use their Gram. The trial tags the fallbacks."""
    from quailora.peft_init import too_few_tokens
    from trials.stages import uncalibrated_note

    checkpoint = make_micro_checkpoint("qwen3_moe", tmp_path / "ckpt")
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(1))  # 96 tokens
    store = collect_grams(checkpoint, ids, tmp_path / "grams")  # 2 of 4 experts each: 48 on average
    layout = Layout.from_config(str(checkpoint))
    experts = [n for n in layout.linears() if ".experts." in n]
    counts = {n: store.tokens(n) for n in experts}
    assert sum(counts.values()) == 2 * 96 * 3 * 2  # top-2 of 96 tokens, 3 projections, 2 layers
    assert all(counts[n] == 0 for n in experts if n not in store.names())
    assert store.tokens("model.layers.0.self_attn.q_proj") == 96
    config = TrialConfig(model={"path": str(checkpoint)}, lora={"rank": 4}, init={"method": "quailora"})
    targets = validate_lora_targets(layout.model, "all-linear", 4, exclude=layout.is_router)
    model = build_adapter(
        load_quantized_model(checkpoint, config, torch.float32, torch.device("cpu")), config, targets
    )
    exact_cpu_4bit(model)
    weights = ModelWeights(checkpoint, layout)
    updates = compute_adapters(model, "quailora", weights, store, iterations=5)
    shapes = layout.linears()
    fell_back = {checkpoint_name(n) for n, u in updates.items() if u.uncalibrated}
    assert fell_back == {n for n in targets if too_few_tokens(store, n, shapes[n][0])}
    assert fell_back and fell_back < set(
        experts
    )  # experts routed >= 64 (gate/up) or 32 (down) tokens keep theirs
    name = next(n for n in updates if checkpoint_name(n) in fell_back)
    svd = compute_adapters(model, "svd", weights, names=[name])[name]
    torch.testing.assert_close(
        updates[name].lora_B @ updates[name].lora_A, svd.lora_B @ svd.lora_A, atol=1e-5, rtol=1e-4
    )
    note = uncalibrated_note(updates)
    assert note.startswith(f"{len(fell_back)} of {len(updates)} layers solved with H = I")


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"model_type": "t5"}, "model_type 't5' is not a decoder-only causal LM"),
        ({"model_type": "no-such-model"}, "transformers cannot read its config"),
    ],
)
def test_unsupported_models_are_refused_before_compute(config, fragment, tmp_path, capsys):
    """plan, run and trial exit 2 naming the model_type and what is missing; no Ray, no weights read."""
    import json

    import yaml

    from orchestrator.cli import main

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    save_file({"unused": torch.zeros(1)}, tmp_path / "model" / "model.safetensors")
    sweep = {
        "name": "refused",
        "base": {"model": {"path": str(tmp_path / "model")}},
        "space": {"seed": {"grid": [0]}},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump({"model": {"path": str(tmp_path / "model")}}))
    for argv in (["plan", str(tmp_path / "sweep.yaml")], ["trial", str(tmp_path / "trial.yaml")]):
        assert main(argv) == 2, argv
        assert fragment in capsys.readouterr().err, argv
    import ray

    assert not ray.is_initialized()


def test_moe_and_fused_shapes_from_the_config_alone():
    """plan counts every expert as resident and fused projections as they are."""
    from orchestrator.model_shapes import shape_from_config
    from testkit.micro import make_micro_config

    mixtral = shape_from_config(make_micro_config("mixtral"))
    per_layer = (
        2 * (64 * 64) + 2 * (64 * 32) + 4 * 3 * (64 * 128)
    )  # q, o; k, v at 32 wide (GQA); 4 experts x 3
    assert sum(n_in * n_out for _, n_in, n_out in mixtral.linears()) == 2 * per_layer
    assert sum(".experts." in name for name, _, _ in mixtral.linears()) == 2 * 4 * 3
    phi3 = shape_from_config(make_micro_config("phi3"))
    assert ("model.layers.0.self_attn.qkv_proj", 64, 64 + 2 * 32) in phi3.linears()
    assert ("model.layers.0.mlp.gate_up_proj", 64, 2 * 128) in phi3.linears()


def test_legacy_llama_and_bin_only_checkpoints(tmp_path, monkeypatch):
    """A checkpoint with per-layer rotary_emb.inv_freq (old LLaMA) calibrates; a .bin-only one is
    converted once to safetensors into the cache and gives the same Grams."""
    from safetensors.torch import load_file

    from quailora.checkpoint import bin_shards
    from reference.cache import resolve_model

    monkeypatch.setenv("QUAILORA_CACHE", str(tmp_path / "cache"))
    checkpoint = make_micro_checkpoint("llama", tmp_path / "ckpt", max_shard_size="10GB")
    state = load_file(checkpoint / "model.safetensors")
    legacy = dict(state)
    for i in range(2):
        legacy[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(legacy, checkpoint / "model.safetensors", metadata={"format": "pt"})
    reference = collect_grams(checkpoint, IDS, tmp_path / "a")

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(state, bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text((checkpoint / "config.json").read_text())
    assert bin_shards(bin_dir) == ["pytorch_model.bin"]
    converted = resolve_model(str(bin_dir))
    assert converted.is_relative_to(tmp_path / "cache") and (converted / "model.safetensors").is_file()
    assert resolve_model(str(bin_dir)) == converted  # once
    grams = collect_grams(converted, IDS, tmp_path / "b")
    for name in reference.names():
        torch.testing.assert_close(grams.get(name), reference.get(name))


def test_one_list_of_tested_architectures_read_by_the_docs_the_cli_and_the_trial_tags(capsys):
    """quailora.supported_architectures is the list: the conformance tests build its entries,
    docs/architectures.md's matrix has its rows and variants, `quailora architectures` prints it, and a trial of
    any other model type is tagged "derived, untested"."""
    import re

    from orchestrator.cli import main
    from quailora.supported_architectures import TESTED, UNTESTED
    from trials.config import TrialConfig
    from trials.contract import ARCHITECTURE_TAG
    from trials.tracking import trial_tags

    docs = (Path(__file__).resolve().parents[1] / "docs" / "architectures.md").read_text()
    matrix = docs[docs.index("| architecture | variant in the test |") :].split("\n\n")[0]
    rows = dict(re.findall(r"^\| (\w+) \| (.*?) \| yes \|", matrix, re.M))
    assert rows == {name: entry.variant for name, entry in SUPPORTED.items()}
    for name in ("llama3", "gpt_oss"):  # the model type the builder makes is the one the entry names
        assert SUPPORTED[name].build(2, 64, 128, 4, 128, 64).model_type == SUPPORTED[name].model_type

    assert main(["architectures"]) == 0
    printed = capsys.readouterr().out
    assert all(
        re.search(rf"^{name}\s+{entry.model_type}\s", printed, re.M) for name, entry in SUPPORTED.items()
    )

    trial = TrialConfig.model_validate({"model": {"path": "x"}})
    assert trial_tags(trial, "gpt_oss", 10)[ARCHITECTURE_TAG] == TESTED
    assert trial_tags(trial, "starcoder2", 10)[ARCHITECTURE_TAG] == UNTESTED
