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
