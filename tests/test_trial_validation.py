"""Bad trial input fails with a clear error naming field and value, before Ray, MLflow or any weights."""

from __future__ import annotations

import pytest
import ray
import torch
from pydantic import BaseModel, ValidationError

from quailora.errors import QuailoraInputError
from testkit.micro import micro_trial_config
from trials.commands import load_trial_config
from trials.config import ResourcesSpec, TrainSpec, check_resources
from trials.deepspeed_config import compute_dtype, deepspeed_config, resolve_precision
from trials.run import run_trial
from trials.tracking import default_tracking_uri, flat_params
from trials.validation import validate_trial


def test_good_config_lists_every_linear_layer_but_the_head(micro_trial):
    plan = validate_trial(micro_trial_config(*micro_trial))
    assert plan.model_type == "llama"
    assert len(plan.target_names) == 2 * 7  # q k v o gate up down per decoder layer
    assert not any("lm_head" in n for n in plan.target_names)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"model": {"path": "/does/not/exist"}}, "model.path='/does/not/exist'"),
        ({"lora": {"rank": 65}}, "lora.rank=65 exceeds layer"),
        ({"lora": {"target_modules": ["q_proj", "wq"]}}, "'wq' matches no linear module"),
        ({"init": {"method": "magic"}}, "unknown initialization method 'magic'"),
        (
            {"init": {"method": "svd", "options": {"bogus": 1}}},
            "init.options (method 'svd'): method 'svd' has no option(s) ['bogus']",
        ),
        ({"init": {"method": "qalora_zero"}}, "needs quant.method='int'"),
        (
            {"init": {"method": "svd", "options": {"niter": "4"}}},
            "(method 'svd'): option niter='4' must be an integer",
        ),
        (
            {"init": {"method": "svd", "options": {"solver": "qr"}}},
            "(method 'svd'): option solver='qr' must be one of",
        ),
        (
            {
                "quant": {"method": "int", "bits": 4, "group_size": 16},
                "init": {"method": "qalora_zero", "options": {"group_size": 32}},
            },
            "init.options.group_size=32 differs from quant.group_size=16",
        ),
        ({"quant": {"method": "nf4", "bits": 4, "blocksize": 128}}, "quant.blocksize=128"),
        ({"quant": {"method": "int", "bits": 4, "group_size": 48}}, "not divisible by quant.group_size=48"),
        (
            {"quant": {"method": "int", "bits": 4, "group_size": 32}, "init": {"method": "qalora_zero"}},
            "lora.rank=4 exceeds min(out_features, in_features / quant.group_size)=2",
        ),
        ({"data": {"train": "/no/such/train.txt"}}, "data.train='/no/such/train.txt'"),
        ({"data": {"test": "/no/such/test.txt"}}, "data.test='/no/such/test.txt'"),
        ({"data": {"seq_len": 512}}, "data.seq_len=512 exceeds"),
        (
            {"init": {"method": "quailora"}, "calibration": {"seq_len": 512}},
            "calibration.seq_len=512 exceeds",
        ),
        ({"resources": {"use_gpu": True, "gpus_per_worker": 2}}, "resources.gpus_per_worker=2: a worker"),
        ({"resources": {"use_gpu": True, "gpus_per_worker": 0.5}}, "which NCCL refuses"),  # 2 workers
        ({"resources": {"gpus_per_worker": 0.5}}, "needs resources.use_gpu: true"),
    ],
)
def test_bad_input_is_named(micro_trial, overrides, needle):
    with pytest.raises(QuailoraInputError) as err:
        validate_trial(micro_trial_config(*micro_trial, **overrides))
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "resources",
    [{"use_gpu": True}, {"use_gpu": True, "gpus_per_worker": 1, "num_workers": 4},
     {"use_gpu": True, "gpus_per_worker": 0.5, "num_workers": 1}, {"num_workers": 3}],
)  # fmt: skip
def test_resources_every_worker_uses_pass(resources):
    check_resources(ResourcesSpec(**resources))  # 0.5: one-worker trials sharing a GPU, each its own group


@pytest.mark.parametrize(("method", "bits"), [("nf4", 3), ("int8", 4), ("int", 5)])
def test_bit_width_the_quantizer_cannot_do(micro_trial, method, bits):
    with pytest.raises(
        ValidationError, match=f"quant.bits={bits} is not possible with quant.method='{method}'"
    ):
        micro_trial_config(*micro_trial, quant={"method": method, "bits": bits})


def test_init_options_of_the_declared_types_pass(micro_trial):
    config = micro_trial_config(
        *micro_trial,
        quant={"method": "int", "bits": 4, "group_size": 16},
        init={"method": "qalora_closed_form", "options": {"group_size": 16, "damping": 1, "solver": "exact"}},
    )
    validate_trial(config)  # an int where a float is declared is fine; group_size may repeat quant's


def test_a_trial_without_a_test_split_is_valid(micro_trial):
    validate_trial(micro_trial_config(*micro_trial, data={"test": None}))  # no test_ppl_final then


def test_calibration_settings_matter_only_to_calibrated_methods(micro_trial):
    validate_trial(micro_trial_config(*micro_trial, init={"method": "svd"}, calibration={"seq_len": 512}))


def test_run_trial_rejects_before_any_compute(micro_trial, tmp_path):
    config = micro_trial_config(*micro_trial, lora={"rank": 1000})
    with pytest.raises(QuailoraInputError, match="lora.rank=1000"):
        run_trial(
            config,
            tracking_uri=default_tracking_uri(tmp_path),
            experiment_name="x",
            storage_path=str(tmp_path),
        )
    assert not (tmp_path / "mlflow.db").exists()
    assert not ray.is_initialized()


def test_yaml_schema_errors_name_the_field(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("model: {path: x}\ntrain: {zero_stage: 4, max_stepz: 3}\n")
    with pytest.raises(QuailoraInputError) as err:
        load_trial_config(path)
    assert "train.zero_stage" in str(err.value) and "train.max_stepz" in str(err.value)


def test_example_config_is_valid():
    config = load_trial_config("configs/trial_micro.yaml")
    assert config.resources.num_workers == 2 and config.train.zero_stage in (2, 3)


def test_every_config_field_is_a_param(micro_trial):
    config = micro_trial_config(*micro_trial, init={"method": "quailora", "options": {"iterations": 3}})
    params = flat_params(config)
    assert params["train.zero_stage"] == "2" and params["lora.rank"] == "4"
    assert params["init.options"] == '{"iterations": 3}'
    expected = {
        f"{name}.{sub}" if isinstance(value, BaseModel) else name
        for name, value in config
        for sub in (type(value).model_fields if isinstance(value, BaseModel) else [None])
    }
    # every field once; init.options and tags as one JSON param each; init.zero_start only where true
    # (trials/config.py: every other trial's key stays what it was), tests/test_zero_start.py
    assert set(params) == expected - {"init.zero_start"}


def test_deepspeed_config_follows_the_trial():
    ds = deepspeed_config(TrainSpec(batch_size=3, grad_accum=4, zero_stage=3), world_size=2, precision="fp32")
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


def test_fp16_is_deepspeed_fp16_with_dynamic_loss_scaling():
    ds = deepspeed_config(TrainSpec(precision="fp16"), world_size=1, precision="fp16")
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    assert ds["fp16"]["loss_scale"] == 0 and ds["fp16"]["initial_scale_power"] == 16  # 0: dynamic
    assert deepspeed_config(TrainSpec(), world_size=1, precision="bf16")["bf16"]["enabled"] is True
    assert compute_dtype("fp16", "float32") == torch.float16
    assert compute_dtype("bf16", "float32") == torch.bfloat16
    assert compute_dtype("fp32", "bfloat16") == torch.bfloat16  # fp32 training keeps model.dtype


def test_auto_precision_follows_the_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("fp16", cpu) == "fp16" and resolve_precision("bf16", cuda) == "bf16"
    # No GPU here: the device's bf16 capability is stubbed; tests/test_gpu.py resolves it on a real one.
    monkeypatch.setattr("trials.deepspeed_config.native_bf16", lambda device: True)
    assert resolve_precision("auto", cuda) == "bf16"  # A100, H100
    monkeypatch.setattr("trials.deepspeed_config.native_bf16", lambda device: False)
    assert resolve_precision("auto", cuda) == "fp16"  # V100, T4


def test_warmup_schedule_runs_the_full_rate_from_step_one_without_warmup():
    """DeepSpeed's WarmupLR ran the first two steps at rate 0 with warmup_steps=0; ours does not."""
    import torch

    from trials.deepspeed_config import warmup_factor, warmup_scheduler

    assert [warmup_factor(k, 0) for k in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert [warmup_factor(k, 4) for k in (1, 2, 3, 4, 5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = warmup_scheduler(2)(optimizer)
    used = []
    for _ in range(3):  # the rate each step runs at, read before the scheduler moves
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used == pytest.approx([0.05, 0.1, 0.1])
