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


def test_a_full_disk_during_training_is_one_line_and_keeps_the_finished_adapter(tiny_model_factory, tmp_path):
    """A real small filesystem (tmpfs, as root) that fills up while a second training runs."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        env = dict(os.environ, LLM_INSTALLER_MODELS_DIR=str(mnt / "models"), PYTHONPATH=str(REPO))
        env.pop("LLM_INSTALLER_FAULT", None)

        def cli(*argv: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [str(REPO / "llm-installer"), *argv], env=env, capture_output=True, text=True, timeout=400
            )

        assert cli("install", str(tiny_model_factory("llama")), "--name", "test/tiny").returncode == 0
        first = cli("train", "test/tiny", *ARGS, "--max-steps", "2")
        assert first.returncode == 0, first.stdout + first.stderr
        lora = mnt / "models" / "test_tiny" / "lora"
        finished = (lora / "adapter_model.safetensors").read_bytes()
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        (mnt / "filler").write_bytes(b"\0" * max(0, free - 64 * 1024))  # leave 64 KiB
        full = cli("train", "test/tiny", *ARGS, "--epochs", "1")
        out = full.stdout + full.stderr
        assert full.returncode != 0 and "the disk is full" in out, out[-2000:]
        assert "Traceback" not in out and "unexpected" not in out
        assert (lora / "adapter_model.safetensors").read_bytes() == finished
        assert not [p for p in lora.parent.iterdir() if p.name.startswith(".lora.")]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
