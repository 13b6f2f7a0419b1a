"""`quailora export` on trial runs logged in-process, one per (quantizer, adapter family).

Each run holds what trials/worker.py logs at the end of a trial (peft adapter, probe ids and logits,
resolved DeepSpeed config, flat params), made here by the trial's own loading and adapter code with a
trained-looking (random, non-zero) adapter, without Ray: the real-trial exports are in
test_trial_e2e.py (NF4, two workers) and test_trial_qalora.py (QA-LoRA, stock lm-eval CLI).
The exports are loaded by running their README's snippet: stock transformers and peft only.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import dequantize_bnb_weight
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from orchestrator.cli import main
from quailora.architectures import ModelWeights
from quailora.base_layers import base_layer_kind
from quailora.errors import QuailoraInputError
from quailora.initializers import changes_base
from quailora.peft_init import initialize_peft_model, save_base_residuals
from quailora.quantizers.bnb.layers import exact_cpu_4bit
from quailora.quantizers.groupwise.compressed import save_compressed
from quailora.quantizers.groupwise.layer import quantize_model_groupwise
from quailora.zero_start import add_zero_start
from testkit.micro import make_texts, make_trial_checkpoint, micro_trial_config
from tests.cli_output import refusal_line
from trials.adapters import build_adapter
from trials.contract import BASE_ARTIFACT
from trials.export import LOAD_FILE, README_FILE
from trials.probe import make_probe
from trials.quantized_model import load_quantized_model
from trials.tracking import default_tracking_uri, flat_params
from trials.validation import validate_trial

# Relative max error of an export's logits against the trial's probe logits. Stock bitsandbytes on a
# CPU computes 4-bit layers through bf16 (the trial used the exact fp32 path), hence the loose bound there.
STOCK_BOUND = 1e-2
EXACT_BOUND = 1e-5  # float32 paths: compressed-tensors INT-k, float merges
# LLM.int8 also quantizes the activations (vector-wise int8 with fp16 outliers), which a float merge
# cannot: its merged logits differ from the trial's by that (9.7e-3 here), while its weights fold exactly.
INT8_MERGED_BOUND = 2e-2


def rel_max_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits.float() - reference).abs().max() / reference.abs().max())


def log_trial_run(root: Path, uri: str, log_base: bool = True, family: str = "llama", **overrides) -> str:
    """A FINISHED MLflow run with a trial's params and end-of-trial artifacts (on ``root``'s micro
    ``family`` checkpoint); returns its run id."""
    checkpoint = root / "ckpt"
    if not checkpoint.exists():
        make_trial_checkpoint(checkpoint, family)
    config = micro_trial_config(checkpoint, make_texts(root), **overrides)
    plan = validate_trial(config)
    torch.manual_seed(0)
    model = build_adapter(
        load_quantized_model(checkpoint, config, torch.float32, torch.device("cpu")),
        config,
        plan.target_names,
    )
    updates = {}
    if changes_base(config.init.method):  # LoftQ: the base moves too, as in a trial's initialize stage
        updates = initialize_peft_model(model, config.init.method, ModelWeights(checkpoint), iterations=2)
    if config.init.zero_start:  # the method's factors and the frozen start adapter that cancels them
        initialize_peft_model(model, config.init.method, ModelWeights(checkpoint))
        add_zero_start(model)
    exact_cpu_4bit(model)  # as the trial evaluates on a CPU
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and param.requires_grad:  # a trained adapter: B is no longer zero
                param.normal_(std=0.05)
        probe_ids = torch.randint(0, 320, (2, 32))
        logits = model.eval()(input_ids=probe_ids).logits.float()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("export") or client.get_experiment(
        client.create_experiment("export")
    )
    run_id = client.create_run(experiment.experiment_id, run_name=config.name).info.run_id
    for key, value in flat_params(config).items():
        client.log_param(run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/adapter", safe_serialization=True)
        Path(tmp, "probe").mkdir()
        save_file(make_probe(probe_ids, logits), f"{tmp}/probe/logits.safetensors")
        Path(tmp, "deepspeed_config.json").write_text(json.dumps({"bf16_enabled": False}))
        client.log_artifacts(run_id, f"{tmp}/adapter", "adapter")
        client.log_artifacts(run_id, f"{tmp}/probe", "probe")
        client.log_artifact(run_id, f"{tmp}/deepspeed_config.json")
        Path(tmp, BASE_ARTIFACT).mkdir()
        if log_base and save_base_residuals(updates, f"{tmp}/{BASE_ARTIFACT}"):  # trials/worker.py logs it
            client.log_artifacts(run_id, f"{tmp}/{BASE_ARTIFACT}", BASE_ARTIFACT)
    client.set_terminated(run_id, "FINISHED")
    LOGGED_MODELS[run_id] = model
    return run_id


LOGGED_MODELS: dict[str, nn.Module] = {}  # run id -> the model its probe logits came from


def load_readme_snippet(export: Path) -> dict:
    """Run the export's README snippet (what a user copies) and return its variables."""
    code = re.search(r"```python\n(.*?)```", (export / README_FILE).read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(export / README_FILE), "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return root, default_tracking_uri(root)


CASES = {
    # name: (trial overrides, bound on the adapter export's relative max error)
    "nf4-gaussian": ({"quant": {"method": "nf4", "bits": 4}, "init": {"method": "gaussian"}}, STOCK_BOUND),
    "llm_int8-quailora": (
        {"quant": {"method": "int8", "bits": 8}, "init": {"method": "quailora"}},
        STOCK_BOUND,
    ),
    "int4-closed_form": (
        {"quant": {"method": "int", "bits": 4, "group_size": 16}, "init": {"method": "closed_form"}},
        EXACT_BOUND,
    ),
    "int8-qalora_closed_form": (
        {"quant": {"method": "int", "bits": 8, "group_size": 16}, "init": {"method": "qalora_closed_form"}},
        EXACT_BOUND,
    ),
    "nf4-svd-zero_start": (  # exported as one rank-2r adapter, the sum of the trained and the start one
        {"quant": {"method": "nf4", "bits": 4}, "init": {"method": "svd", "zero_start": True}},
        STOCK_BOUND,
    ),
    "int3-qalora_zero": (
        {"quant": {"method": "int", "bits": 3, "group_size": 16}, "init": {"method": "qalora_zero"}},
        EXACT_BOUND,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_and_merged_export_reproduce_the_trials_logits(store, tmp_path, case, capsys):
    root, uri = store
    overrides, bound = CASES[case]
    run_id = log_trial_run(root, uri, **overrides)

    assert main(["export", run_id, str(tmp_path / "export"), "--tracking-uri", uri]) == 0
    assert README_FILE in capsys.readouterr().out
    spec = json.loads((tmp_path / "export" / LOAD_FILE).read_text())
    assert spec == {"base": "base", "quantization_config": None, "adapter": "adapter"}
    loaded = load_readme_snippet(tmp_path / "export")
    assert rel_max_error(loaded["top"], loaded["probe"]["top_logits"]) <= bound
    base_config = json.loads((tmp_path / "export" / "base" / "config.json").read_text())
    expected_method = "compressed-tensors" if overrides["quant"]["method"] == "int" else "bitsandbytes"
    assert base_config["quantization_config"]["quant_method"] == expected_method
    adapter = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert not adapter.get("use_qalora")  # stock peft runs plain LoRA on any linear layer
    if overrides["init"].get("zero_start"):  # one adapter: the trained one and the start one side by side
        assert adapter["r"] == 2 * 4 and not (tmp_path / "export" / "adapter" / "start").exists()

    assert main(["export", run_id, str(tmp_path / "merged"), "--tracking-uri", uri, "--merged"]) == 0
    assert json.loads((tmp_path / "merged" / LOAD_FILE).read_text())["adapter"] is None
    merged = load_readme_snippet(tmp_path / "merged")
    merged_bound = INT8_MERGED_BOUND if case.startswith("llm_int8") else EXACT_BOUND
    assert rel_max_error(merged["top"], merged["probe"]["top_logits"]) <= merged_bound
    if expected_method == "bitsandbytes":
        assert_float_merge_is_q_plus_sba(tmp_path / "export", merged["model"])
    merged_config = json.loads((tmp_path / "merged" / "model" / "config.json").read_text())
    if "qalora" in case:  # still INT-k, its fractional zero points held as floats
        weights = merged_config["quantization_config"]["config_groups"]["group_0"]["weights"]
        assert (weights["num_bits"], weights["strategy"]) == (overrides["quant"]["bits"], "tensor_group")
        assert merged_config["quantization_config"]["format"] == "pack-quantized"
    else:  # Q + sBA as plain float weights
        assert "quantization_config" not in merged_config


@torch.no_grad()
def assert_float_merge_is_q_plus_sba(export: Path, merged_model) -> None:
    """Every LoRA layer of the merged checkpoint holds the exported base's Q plus peft's own delta s·B·A.
    (Read from a fresh load: bnb repacks 4-bit weights for its CPU kernel at the first forward.)"""
    base = AutoModelForCausalLM.from_pretrained(export / "base")
    adapter_model = PeftModel.from_pretrained(base, export / "adapter")
    layers = [(n, m) for n, m in adapter_model.get_base_model().named_modules() if isinstance(m, LoraLayer)]
    assert layers
    for name, layer in layers:
        base = layer.get_base_layer()
        q = dequantize_bnb_weight(base.weight, state=getattr(base, "state", None)).float()
        expected = q + layer.get_delta_weight("default").float()
        torch.testing.assert_close(merged_model.get_submodule(name).weight, expected, rtol=1e-6, atol=1e-6)


def test_loftq_export_rebuilds_the_changed_base_bit_for_bit(store, tmp_path, capsys):
    """LoftQ re-quantized the base: export rebuilds W' = W − L·R from the logged thin factors, and stock
    loading of the export holds exactly the trial's Q' in every layer."""
    root, uri = store
    run_id = log_trial_run(root, uri, init={"method": "loftq"})
    assert main(["export", run_id, str(tmp_path / "export"), "--tracking-uri", uri]) == 0
    loaded = load_readme_snippet(tmp_path / "export")
    assert rel_max_error(loaded["top"], loaded["probe"]["top_logits"]) <= STOCK_BOUND
    trial = dict(LOGGED_MODELS[run_id].named_modules())
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "base")  # before any forward
    checked = 0
    for name, module in stock.named_modules():
        layer = trial.get(f"base_model.model.{name}")
        if isinstance(layer, LoraLayer):
            ours = base_layer_kind(layer.get_base_layer()).dequantize(layer.get_base_layer())
            assert torch.equal(base_layer_kind(module).dequantize(module), ours), name
            checked += 1
    assert checked == sum(isinstance(m, LoraLayer) for m in trial.values())


def test_export_refuses_what_it_cannot_do(store, tmp_path, capsys):
    root, uri = store
    loftq = log_trial_run(
        root, uri, init={"method": "loftq"}, log_base=False
    )  # as runs before base_residuals/
    capsys.readouterr()
    assert main(["export", loftq, str(tmp_path / "loftq"), "--tracking-uri", uri]) == 2
    err = refusal_line(capsys.readouterr().err)
    assert "init.method='loftq' changed the base" in err and "base_residuals/" in err, err
    assert not (tmp_path / "loftq").exists()  # refused before writing anything

    assert main(["export", "0123abcd", str(tmp_path / "none"), "--tracking-uri", uri]) == 2
    assert "no such MLflow run" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["export", loftq, str(tmp_path / "full"), "--tracking-uri", uri]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'nothing.db'}"
    assert main(["export", loftq, str(tmp_path / "x"), "--tracking-uri", missing]) == 2
    assert "no MLflow database there" in capsys.readouterr().err


def test_compressed_tensors_refuses_bit_widths_its_format_cannot_hold(tmp_path):
    model = quantize_model_groupwise(nn.Sequential(nn.Linear(16, 4)), 4, 16)
    model[0].bits = 16  # no quantizer here makes 16-bit codes; a layer that had them could not be written
    with pytest.raises(
        QuailoraInputError, match="16-bit codes do not fit compressed-tensors' pack-quantized"
    ):
        save_compressed(model, tmp_path / "out")


# Not deepseek_v3 or qwen2_moe here: stock bitsandbytes' CPU 4-bit kernel (the README snippet's load) fails on
# their micro models' layers, q_b_proj 32 wide (< blocksize 64) and the shared-expert gate's single output.
@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_moe_export_loads_on_the_stock_fused_model(store, tmp_path, family, capsys):
    """An NF4 MoE trial (experts split and quantized per expert): the export's base holds transformers'
    fused experts with the trial's dequantized weights (stock bitsandbytes keeps fused experts in full
    precision), its adapter LoRA on the fused parameters (peft's target_parameters); the README snippet
    reproduces the trial's logits, as does the merged export. An INT-k MoE exports only merged."""
    _, uri = store
    root = tmp_path / "run"
    root.mkdir()
    run_id = log_trial_run(root, uri, family=family, init={"method": "gaussian"})
    assert main(["export", run_id, str(tmp_path / "export"), "--tracking-uri", uri]) == 0
    adapter = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert "model.layers.1.mlp.experts.gate_up_proj" in adapter["target_parameters"]
    loaded = load_readme_snippet(tmp_path / "export")
    assert rel_max_error(loaded["top"], loaded["probe"]["top_logits"]) <= STOCK_BOUND
    experts = loaded["model"].get_base_model().model.layers[1].mlp.experts
    assert experts.get_base_layer().down_proj.ndim == 3  # transformers' fused experts, adapted by peft

    assert main(["export", run_id, str(tmp_path / "merged"), "--tracking-uri", uri, "--merged"]) == 0
    merged = load_readme_snippet(tmp_path / "merged")
    assert rel_max_error(merged["top"], merged["probe"]["top_logits"]) <= EXACT_BOUND

    int_run = log_trial_run(root, uri, family=family, quant={"method": "int", "bits": 4, "group_size": 16})
    capsys.readouterr()
    assert main(["export", int_run, str(tmp_path / "int"), "--tracking-uri", uri]) == 2
    assert "cannot load its experts from a compressed-tensors checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "int").exists()
