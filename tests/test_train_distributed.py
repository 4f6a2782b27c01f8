"""`train` as two processes (torchrun, what `accelerate launch` runs underneath): one run, one adapter, one voice."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests import test_train_fixtures as fx
from tests.test_train_fixtures import REPO, read_json

tiny_installed = fx.tiny_installed  # the shared fixture


def test_two_process_run_writes_one_run_folder_and_one_adapter(tiny_installed):
    env = dict(
        os.environ,
        LLM_INSTALLER_MODELS_DIR=str(tiny_installed.root.parent),
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # single machine, a free rendezvous port
            "--nproc_per_node",
            "2",
            "-m",
            "llm_installer",
            "train",
            "test/tiny",
            "--data",
            "test_data.json",
            "--max-steps",
            "4",
            "--batch-size",
            "2",
            "--learning-rate",
            "0.01",
            "--no-tensorboard",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # one voice: the main process reports, the other stays quiet
    assert out.count("stopped: reached --max-steps 4") == 1, out[-3000:]
    assert out.count("adapter: ") == 1 and "tokens/s over 2 processes" in out
    runs = [p for p in tiny_installed.runs_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # one run folder shared by both processes
    assert (runs[0] / "report.md").is_file() and (runs[0] / "loss.png").is_file()
    assert read_json(runs[0] / "run_info.json")["processes"] == 2

    info = read_json(tiny_installed.lora_dir / "adapter_info.json")
    m = info["metrics"]
    assert m["processes"] == 2 and m["global_step"] == 4
    # the two processes share the machine's cores instead of each taking all of them (oversubscribed
    # OpenMP threads spin: a 2-process run on 2 cores was 8x slower before this)
    cores = info["plan"]["settings"]["torch_threads"]["value"]
    assert m["threads_per_process"] == max(1, cores // 2)
    # each step trained 2 examples on each process: the token count covers both processes' batches
    assert m["trained_tokens"] > 0 and m["tokens_per_second"] > 0
    weights = load_file(str(tiny_installed.lora_dir / "adapter_model.safetensors"))
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and any(float(t.abs().max()) > 0 for t in lora_b)  # B starts at zero: it trained
    assert all(torch.isfinite(t).all() for t in weights.values())


def _run(argv: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def test_two_processes_train_the_same_adapter_as_one_at_the_same_global_batch(tiny_installed, tmp_path):
    """Gradients are synchronised, and every token weighs the same: 2 processes x 2 examples per step give
    the adapter that 1 process x 4 examples gives (each step sees all 4 examples, of different lengths, so
    a per-process mean loss would weigh them differently and move the weights elsewhere)."""
    import json

    rows = [
        ("Say hi.", "Hi."),
        ("Name a colour.", "Blue is a colour that many people like a great deal."),
        ("What is two plus two?", "Two plus two is four."),
        ("Tell me a fact.", "The Pacific is the largest and deepest of the oceans on the planet Earth."),
    ]
    data = tmp_path / "four.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            + "\n"
            for q, a in rows
        )
    )
    env = dict(
        os.environ,
        LLM_INSTALLER_MODELS_DIR=str(tiny_installed.root.parent),
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
    )
    common = ["train", "test/tiny", "--data", str(data), "--mode", "fast", "--precision", "fp32",
              "--epochs", "2", "--validation-split", "0", "--optimizer", "sgd", "--learning-rate", "0.5",
              "--no-tensorboard",
              "--force-epochs", "--seed", "5"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "llm_installer", *common, "--batch-size", "4", "--output", str(one)], env)
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "llm_installer", *common, "--batch-size", "2", "--output", str(two)],
        env,
    )  # fmt: skip
    assert read_json(one / "adapter_info.json")["metrics"]["global_step"] == 2
    assert read_json(two / "adapter_info.json")["metrics"]["global_step"] == 2
    a = load_file(str(one / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k)
    assert moved > 1e-3  # training moved the weights: the comparison below means something
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5 * max(1.0, moved) + 2e-6, f"two-process adapter differs from one-process by {diff:.2e}"
