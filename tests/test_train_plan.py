"""The plan: layer precedence with provenance, modes, flags reaching the trainer, clear refusals."""

from __future__ import annotations

import json

import pytest

from llm_installer.errors import UserError
from llm_installer.hardware import GPU, Hardware
from llm_installer.train.modes import MODES
from llm_installer.train.plan import TrainingPlan, auto_lora_rank, build_plan
from tests import test_train_fixtures as fx
from tests.test_train_fixtures import cli_args

tiny_installed = fx.tiny_installed  # the shared fixture

CPU = Hardware(cpu_count=2, ram_gb=24.0, ram_available_gb=20.0)
A100 = Hardware(cpu_count=8, ram_gb=64.0, ram_available_gb=60.0, cuda=True, gpus=(GPU("A100", 80.0, (8, 0)),))


def plan_for(folder, *argv, hardware=CPU):
    return build_plan(folder, cli_args(*argv), hardware=hardware)


def test_plan_is_plain_json_with_a_source_for_every_setting(tiny_installed):
    plan = plan_for(tiny_installed, "--data", "test_data.json")
    again = TrainingPlan.from_dict(json.loads(plan.to_json()))
    assert again == plan
    for key, entry in plan["settings"].items():
        assert set(entry) == {"value", "source", "why"}, key
        assert entry["source"] in {"default", "handler", "hardware", "mode", "user", "model size"}, key
    assert plan.model["handler"] == "llama"
    assert plan.model["model_id"] == tiny_installed.load_info().model_id


def test_precedence_default_handler_hardware_mode_user(tiny_installed):
    plan = plan_for(tiny_installed, "--data", "d.json")
    # handler (size rule for a <1B llama) over the defaults
    from llm_installer.handlers.registry import get_handler

    handler_params = get_handler(tiny_installed.load_info()).get_training_parameters()
    assert plan.source("batch_size") == "handler"
    assert plan.value("batch_size") == handler_params["recommended_batch_size"]
    assert plan.source("target_modules") == "handler"
    assert "q_proj" in plan.value("target_modules")
    # hardware over the handler: the handler's seed default asks for checkpointing, a small CPU run does not
    assert (
        plan.source("gradient_checkpointing") == "hardware" and plan.value("gradient_checkpointing") is False
    )
    assert plan.source("precision") == "hardware" and plan.value("device") == "cpu"
    assert plan["settings"]["precision"]["why"].startswith("measured on this CPU")
    assert plan.source("torch_threads") == "hardware" and plan.value("torch_threads") == 2
    # mode (medium by default) over hardware/handler
    assert plan.source("lora_dropout") == "mode" and plan.value("lora_dropout") == 0.05
    # user over everything
    plan = plan_for(
        tiny_installed,
        "--data",
        "d.json",
        "--batch-size",
        "3",
        "--lora-dropout",
        "0.2",
        "--learning-rate",
        "0.0003",
    )
    assert (plan.value("batch_size"), plan.source("batch_size")) == (3, "user")
    assert (plan.value("lora_dropout"), plan.source("lora_dropout")) == (0.2, "user")
    assert (plan.value("learning_rate"), plan.source("learning_rate")) == (0.0003, "user")


def test_precision_is_measured_on_a_cpu_and_follows_the_gpu(tiny_installed):
    from llm_installer.precision import probe_cpu_precision

    cpu = plan_for(tiny_installed, "--data", "d", hardware=CPU)
    probe = probe_cpu_precision(64, 128, rows=4 * 512)  # the tiny model's shapes: the cached measurement
    assert cpu.value("precision") == probe.choice and cpu.source("precision") == "hardware"
    why = cpu["settings"]["precision"]["why"]
    assert why.startswith("measured on this CPU") and f"fp32 {probe.fp32_ms:.1f} ms" in why
    gpu = plan_for(tiny_installed, "--data", "d", hardware=A100)
    assert gpu.value("precision") == "bf16" and gpu.value("device") == "cuda"
    for flag in ("fp32", "bf16"):  # explicit: honoured on a CPU whatever the measurement says
        plan = plan_for(tiny_installed, "--data", "d", "--precision", flag, hardware=CPU)
        assert (plan.value("precision"), plan.source("precision")) == (flag, "user")
    with pytest.raises(UserError, match="--precision fp16"):
        plan_for(tiny_installed, "--data", "d", "--precision", "fp16", hardware=CPU)
    with pytest.raises(UserError, match="--precision 'fp8' is unknown"):
        plan_for(tiny_installed, "--data", "d", "--precision", "fp8", hardware=CPU)


def test_modes_have_their_concrete_settings(tiny_installed):
    base_lr = plan_for(tiny_installed, "--data", "d", "--mode", "medium").value("learning_rate")
    for mode, settings in MODES.items():
        plan = plan_for(tiny_installed, "--data", "d", "--mode", mode)
        for key, value in settings.items():
            if key in ("max_seq_length",):
                continue
            assert plan.value(key) == value, (mode, key)
        assert plan.value("learning_rate") == pytest.approx(base_lr * settings["learning_rate_factor"])
    assert plan_for(tiny_installed, "--data", "d", "--mode", "fast").value("lora_dropout") == 0.0
    slow = plan_for(tiny_installed, "--data", "d", "--mode", "slow")
    assert slow.value("lora_r") == 2 * plan_for(tiny_installed, "--data", "d").value("lora_r")
    assert slow.value("lora_alpha") == 2 * slow.value("lora_r")
    nonstop = plan_for(tiny_installed, "--data", "d", "--mode", "non-stop")
    assert nonstop.value("auto_stop") is False and nonstop.value("keep_best") is True
    circle = plan_for(tiny_installed, "--data", "d", "--mode", "circle")
    assert circle.value("plateau_cycles") == 2 and circle.value("epochs") == 20


def test_auto_lora_rank_by_size():
    assert auto_lora_rank(135_000_000)[0] == 16
    assert auto_lora_rank(7_000_000_000)[0] == 32
    assert auto_lora_rank(70_000_000_000)[0] == 64


def test_every_flag_reaches_the_training_arguments(tiny_installed, tmp_path):
    from llm_installer.train.trainer import data_settings_for, training_arguments

    argv = [
        "--data",
        "test_data.json",
        "--format",
        "alpaca",
        "--mode",
        "slow",
        "--method",
        "dora",
        "--epochs",
        "7",
        "--max-steps",
        "11",
        "--batch-size",
        "3",
        "--gradient-accumulation",
        "2",
        "--learning-rate",
        "0.0007",
        "--lora-r",
        "4",
        "--lora-alpha",
        "9",
        "--lora-dropout",
        "0.15",
        "--target-modules",
        "q_proj,v_proj",
        "--max-seq-length",
        "128",
        "--max-examples",
        "5",
        "--validation-split",
        "0.25",
        "--patience",
        "4",
        "--overfitting-threshold",
        "0.3",
        "--force-epochs",
        "--optimizer",
        "sgd",
        "--seed",
        "7",
        "--train-on-inputs",
        "--no-packing",
        "--output",
        str(tmp_path / "out"),
        "--no-tensorboard",
        "--strict",
        "--system-prompt",
        "Answer briefly.",
    ]
    plan = plan_for(tiny_installed, *argv)
    v = plan.values()
    expected = {
        "data": "test_data.json",
        "format": "alpaca",
        "mode": "slow",
        "method": "dora",
        "epochs": 7,
        "max_steps": 11,
        "batch_size": 3,
        "gradient_accumulation": 2,
        "learning_rate": 0.0007,
        "lora_r": 4,
        "lora_alpha": 9,
        "lora_dropout": 0.15,
        "target_modules": ["q_proj", "v_proj"],
        "max_seq_length": 128,
        "max_examples": 5,
        "validation_split": 0.25,
        "patience": 4,
        "overfitting_threshold": 0.3,
        "force_epochs": True,
        "auto_stop": False,
        "optimizer": "sgd",
        "seed": 7,
        "train_on_inputs": True,
        "packing": False,
        "output": str(tmp_path / "out"),
        "tensorboard": False,
        "strict": True,
        "system_prompt": "Answer briefly.",
    }
    for key, value in expected.items():
        assert v[key] == value, key
        if key != "auto_stop":
            assert plan.source(key) == "user", key
    args = training_arguments(plan, tmp_path / "run", has_eval=True)
    assert args.num_train_epochs == 7 and args.max_steps == 11
    assert args.per_device_train_batch_size == 3 and args.gradient_accumulation_steps == 2
    assert args.learning_rate == 0.0007 and args.seed == 7 and args.data_seed == 7
    assert getattr(args.optim, "value", args.optim) == "sgd"
    assert args.report_to in ([], ["none"], "none", None) or "tensorboard" not in args.report_to
    assert args.train_sampling_strategy == "group_by_length"  # --no-packing: length-grouped padded batches
    ds = data_settings_for(plan)
    assert (
        ds.format,
        ds.max_seq_length,
        ds.max_examples,
        ds.validation_split,
        ds.train_on_inputs,
        ds.seed,
        ds.strict,
        ds.system_prompt,
    ) == ("alpaca", 128, 5, 0.25, True, 7, True, "Answer briefly.")
    # resume flags
    assert plan_for(tiny_installed, "--data", "d", "--resume").value("resume") == "latest"
    assert plan_for(tiny_installed, "--data", "d", "--resume-from", "runs/x").value("resume") == "runs/x"
    # tensorboard on by default
    assert (
        "tensorboard" in training_arguments(plan_for(tiny_installed, "--data", "d"), tmp_path, True).report_to
    )


def test_lora_flags_reach_the_peft_model(tiny_installed):
    from llm_installer.store import ModelFolder
    from llm_installer.train.trainer import load_training_model

    plan = plan_for(
        tiny_installed,
        "--data",
        "d",
        "--lora-r",
        "4",
        "--lora-alpha",
        "9",
        "--lora-dropout",
        "0.15",
        "--target-modules",
        "q_proj,v_proj",
        "--method",
        "dora",
    )
    folder = ModelFolder(tiny_installed.root)
    from llm_installer.handlers.registry import get_handler

    info = folder.load_info()
    model = load_training_model(plan, folder, info, get_handler(info))
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_dora) == (4, 9, 0.15, True)
    adapted = {
        n.rsplit(".", 1)[-1]
        for n, _ in model.named_modules()
        if n.endswith(("q_proj", "v_proj", "k_proj")) and hasattr(_, "lora_A")
    }
    assert adapted == {"q_proj", "v_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize(("method", "fused"), [("lora", True), ("dora", False)])
def test_plain_lora_trains_through_the_fused_layers(tiny_installed, method, fused):
    """The plan decides (with its reason) and the trainer's model follows: DoRA keeps PEFT's layers."""
    from llm_installer.handlers.registry import get_handler
    from llm_installer.store import ModelFolder
    from llm_installer.train.lora_fast import _fused_forward
    from llm_installer.train.trainer import load_training_model

    plan = plan_for(tiny_installed, "--data", "d", "--method", method)
    assert plan.value("fused_lora") is fused
    folder = ModelFolder(tiny_installed.root)
    info = folder.load_info()
    model = load_training_model(plan, folder, info, get_handler(info))
    routed = [
        m for m in model.modules() if getattr(m.__dict__.get("forward"), "__func__", None) is _fused_forward
    ]
    adapted = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert adapted and len(routed) == (len(adapted) if fused else 0)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--method", "qlora"], "--method qlora needs an NVIDIA GPU"),
        (["--optimizer", "adamw_8bit"], "--optimizer adamw_bnb_8bit needs bitsandbytes"),
        (["--lora-r", "0"], "--lora-r must be positive"),
        (["--validation-split", "1.5"], "--validation-split"),
        (["--learning-rate", "3"], "--learning-rate"),
        (["--optimizer", "lion9"], "--optimizer 'lion9' is unknown"),
        (["--mode", "turbo"], "--mode 'turbo' is unknown"),
        (["--target-modules", ","], "--target-modules is empty"),
    ],
)
def test_bad_flags_are_one_line_user_errors(tiny_installed, argv, needle):
    with pytest.raises(UserError) as err:
        plan_for(tiny_installed, "--data", "d", *argv)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_data_is_required(tiny_installed):
    with pytest.raises(UserError, match="--data is required"):
        plan_for(tiny_installed)


def test_fingerprint_tracks_model_data_and_recipe_not_bookkeeping(tiny_installed):
    a = plan_for(tiny_installed, "--data", "d")
    assert a.fingerprint("x") == plan_for(tiny_installed, "--data", "d", "--no-tensorboard").fingerprint("x")
    assert a.fingerprint("x") != a.fingerprint("y")
    assert a.fingerprint("x") != plan_for(tiny_installed, "--data", "d", "--lora-r", "8").fingerprint("x")
    assert a.fingerprint("x") != plan_for(tiny_installed, "--data", "d", "--seed", "1").fingerprint("x")


def test_dry_run_prints_plan_parameters_data_and_memory(tiny_installed, capsys):
    from llm_installer.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "test/tiny", "--data", "test_data.json", "--mode", "fast", "--dry-run"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for needle in (
        "Training plan for test/tiny",
        "learning_rate",
        "Parameters by group",
        "attention",
        "train_examples",
        "Memory estimate",
        "estimated peak",
        "dry run: nothing was trained",
    ):
        assert needle in out, needle
    assert not tiny_installed.lora_dir.exists() and not tiny_installed.runs_dir.exists()
