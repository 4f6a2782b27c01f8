"""Memory-fit estimates (`check`) against described machines: a laptop CPU, a 24 GiB and an 80 GiB GPU."""

from __future__ import annotations

import pytest

from llm_installer.fit import estimate
from llm_installer.hardware import GPU, Hardware
from llm_installer.model_info import ModelInfo

CPU_16 = Hardware(cpu_count=8, ram_gb=16, ram_available_gb=14)
CPU_32 = Hardware(cpu_count=8, ram_gb=32, ram_available_gb=30)
GPU_24 = Hardware(
    cpu_count=8, ram_gb=64, ram_available_gb=60, cuda=True, gpus=(GPU("RTX 4090", 24.0, (8, 9)),)
)
GPU_80 = Hardware(
    cpu_count=16, ram_gb=128, ram_available_gb=120, cuda=True, gpus=(GPU("H100", 80.0, (9, 0)),)
)


def _llm(params_b: float, layers: int, hidden: int) -> ModelInfo:
    return ModelInfo(
        model_id=f"org/{params_b}b",
        num_parameters=int(params_b * 1e9),
        num_layers=layers,
        hidden_size=hidden,
        vocab_size=128_256,
        context_length=8192,
    )


SMALL = _llm(0.135, 30, 576)
MID = _llm(8, 32, 4096)
LARGE = _llm(70, 80, 8192)


def _rows(report):
    return {r.label.split(" (")[0]: r for r in report.rows}


def test_small_model_trains_on_a_laptop_cpu():
    report = estimate(SMALL, CPU_16)
    rows = _rows(report)
    assert (
        rows["inference fp32"].gb
        > rows["inference bf16"].gb
        > rows["inference int8"].gb
        > rows["inference int4"].gb
    )
    assert rows["LoRA training"].fits_ram and rows["LoRA training"].fits_gpu is None
    assert rows["QLoRA training"].fits_ram is False  # bitsandbytes 4-bit needs CUDA
    from llm_installer.precision import choose_precision

    measured = choose_precision("auto", CPU_16, hidden=576, intermediate=None, rows=4 * 512).precision
    assert report.verdict.startswith(f"fits: LoRA training on the CPU in {measured}")
    assert report.settings["device"] == "cpu" and report.settings["quantization"] == "none"


def test_8b_needs_qlora_on_24gb_and_is_inference_only_on_a_cpu():
    report = estimate(MID, GPU_24)
    rows = _rows(report)
    assert rows["LoRA training"].fits_gpu is False and rows["QLoRA training"].fits_gpu is True
    assert report.settings == {
        "device": "cuda",
        "precision": "bf16",
        "quantization": "4-bit nf4",
        "method": "qlora",
        "batch_size": 4,
        "max_seq_length": 1024,
        "gradient_checkpointing": True,
    }
    assert estimate(MID, CPU_32).verdict == (
        "inference only, at bf16 on the CPU: training needs more memory than this machine has"
    )
    assert estimate(MID, CPU_16).verdict == "too large for this machine, even for inference"


def test_8b_lora_on_80gb_and_70b_int4_inference_only():
    report = estimate(MID, GPU_80)
    assert report.settings["method"] == "lora" and report.settings["gradient_checkpointing"] is False
    assert estimate(LARGE, GPU_80).verdict == (
        "inference only, at int4 on the GPU: training needs more memory than this machine has"
    )
    assert estimate(LARGE, GPU_24).verdict == "too large for this machine, even for inference"


def test_a_model_its_handler_trains_4bit_cannot_train_on_a_cpu_however_much_memory():
    """The seed's pattern 4 (models over 30B train 4-bit): `check` gives the plan's refusal, not "fits"."""
    huge_cpu = Hardware(cpu_count=64, ram_gb=2048, ram_available_gb=2000)
    report = estimate(_llm(40, 60, 6656), huge_cpu)
    assert report.verdict.startswith(
        "cannot train here: org/40b is a 40B-parameter model its handler trains 4-bit"
    )
    assert "--method lora" in report.verdict
    # the plan refuses the same way, and takes QLoRA where a GPU has bitsandbytes
    assert estimate(_llm(20, 48, 6144), huge_cpu).verdict.startswith("fits: LoRA training on the CPU")


def test_diffusion_is_reported_not_trainable():
    info = ModelInfo(model_id="org/sd", task="diffusion", trainable=False, num_parameters=10**9)
    report = estimate(info, GPU_24)
    assert report.verdict.startswith("diffusion model: recognised, but not trainable")
    assert report.settings == {}


def test_size_only_models_are_estimated_from_bytes():
    info = ModelInfo(model_id="org/pickled", model_size_gb=2.0, dtype="float32")
    by_size = _rows(estimate(info, CPU_16))["inference fp32"].gb
    counted = ModelInfo(model_id="org/x", num_parameters=int(2.0 * 1024**3 / 4), dtype="float32")
    assert by_size == pytest.approx(_rows(estimate(counted, CPU_16))["inference fp32"].gb)
