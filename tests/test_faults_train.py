"""Training killed at its dangerous moments (real processes, real SIGKILL at named fault points): nothing
finished is lost, and what a kill leaves is never taken for whole.

- during a checkpoint save (files written, completion marker not yet): `--resume` does not take it;
- during the adapter write (the finished adapter moved aside, the new one not yet in place): the next run
  puts the finished adapter back before anything else.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests import test_train_fixtures as fx
from tests.test_train_fixtures import REPO, read_json

tiny_installed = fx.tiny_installed  # the shared fixture

ARGS = ["--data", "test_data.json", "--mode", "fast", "--batch-size", "4", "--validation-split", "0",
        "--no-tensorboard", "--precision", "fp32"]  # fmt: skip


def _train(folder, *argv: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, LLM_INSTALLER_MODELS_DIR=str(folder.root.parent), PYTHONPATH=str(REPO))
    env.pop("LLM_INSTALLER_FAULT", None)
    if fault:
        env["LLM_INSTALLER_FAULT"] = fault
    return subprocess.run(
        [str(REPO / "llm-installer"), "train", "test/tiny", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )


@pytest.mark.parametrize("moment", ["checkpoint.partial", "checkpoint.written"])
def test_a_kill_during_a_checkpoint_save_leaves_nothing_resume_would_take(tiny_installed, moment):
    """Killed with the adapter and optimizer written but no trainer state (before: "unexpected ValueError:
    Can't find a valid checkpoint"), or with every file written but the save not finished."""
    killed = _train(tiny_installed, *ARGS, "--epochs", "2", fault=f"{moment}=kill")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    (run,) = [p for p in tiny_installed.runs_dir.iterdir() if p.is_dir()]
    (cut,) = list(run.glob("checkpoint-*"))
    assert (cut / "adapter_model.safetensors").is_file() and not (cut / ".complete").exists()
    # resume says there is nothing whole to resume instead of trusting it
    resumed = _train(tiny_installed, "--resume")
    assert resumed.returncode == 2, resumed.stdout + resumed.stderr
    assert "no checkpoint found" in resumed.stderr and "Traceback" not in resumed.stderr
    assert "unexpected" not in resumed.stderr
    # a new run trains normally, and its checkpoints are marked whole
    done = _train(tiny_installed, *ARGS, "--epochs", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    info = read_json(tiny_installed.lora_dir / "adapter_info.json")
    assert all((c / ".complete").is_file() for c in Path(info["run_dir"]).glob("checkpoint-*"))


def test_a_kill_during_the_adapter_write_loses_no_finished_adapter(tiny_installed):
    first = _train(tiny_installed, *ARGS, "--max-steps", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    finished = (tiny_installed.lora_dir / "adapter_model.safetensors").read_bytes()
    killed = _train(
        tiny_installed, *ARGS, "--max-steps", "3", "--learning-rate", "0.02", fault="adapter.old-aside=kill"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    root = tiny_installed.root
    assert not (root / "lora").exists()  # the kill fell between the two renames
    aside = [p for p in root.iterdir() if p.name.startswith(".lora.old-")]
    assert len(aside) == 1 and (aside[0] / "adapter_model.safetensors").read_bytes() == finished
    # the next run puts the finished adapter back before it trains (this one is killed at its checkpoint,
    # before it writes an adapter of its own)
    interrupted = _train(tiny_installed, *ARGS, "--epochs", "1", fault="checkpoint.written=kill")
    assert interrupted.returncode == -signal.SIGKILL
    assert (root / "lora" / "adapter_model.safetensors").read_bytes() == finished
    assert not [p for p in root.iterdir() if p.name.startswith(".lora.")]
