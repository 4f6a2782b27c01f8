"""Real short training runs on a tiny model: outputs, interrupt + resume, refusals, atomic adapter writes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import TrainerCallback

from llm_installer.errors import UserError
from llm_installer.train.plan import build_plan
from llm_installer.train.trainer import run_training, write_adapter_atomically
from tests import test_train_fixtures as fx
from tests.test_train_fixtures import REPO, cli_args, read_json

tiny_installed = fx.tiny_installed  # the shared fixture


def test_train_command_writes_adapter_run_folder_and_report(tiny_installed, capsys):
    from llm_installer.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "train",
                "test/tiny",
                "--data",
                "test_data.json",
                "--mode",
                "fast",
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--validation-split",
                "0.2",
                "--force-epochs",
                "--max-seq-length",
                "256",
            ]
        )
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "stopped: completed 2 epoch(s)" in out and "adapter:" in out
    lora = tiny_installed.lora_dir
    assert (lora / "adapter_config.json").is_file() and (lora / "adapter_model.safetensors").is_file()
    info = read_json(lora / "adapter_info.json")
    assert info["base_model"]["model_id"] == tiny_installed.load_info().model_id
    assert info["handler"] == "llama" and info["stop_reason"].startswith("completed 2 epoch")
    assert info["data"]["train_examples"] + info["data"]["validation_examples"] == 14
    assert info["data"]["fingerprint"] and info["fingerprint"]
    assert info["plan"]["settings"]["batch_size"] == {"value": 4, "source": "user", "why": "--batch-size"}
    assert info["metrics"]["global_step"] == 2 * -(-info["data"]["train_examples"] // 4)
    assert info["metrics"]["best_eval_loss"] is not None and info["metrics"]["trained_tokens"] > 0
    run = Path(info["run_dir"])
    assert run.parent == tiny_installed.runs_dir
    assert (run / "loss.png").stat().st_size > 1000 and (lora / "loss.png").is_file()
    report = (run / "report.md").read_text()
    assert "stop reason" in report and "- before:" in report and "- after:" in report
    assert list((run / "tensorboard").rglob("events.out.tfevents*"))
    assert [p.name for p in run.iterdir() if p.name.startswith("checkpoint-")]
    assert not [p for p in tiny_installed.root.iterdir() if p.name.startswith(".lora")]


class _SigtermAt(TrainerCallback):
    """Sends this process a real SIGTERM after optimizer step `step` (as `kill` would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize(
    ("mode", "validation", "cut_at"),
    [("fast", "0", 4), ("medium", "0.2", 3), ("medium", "0.2", 8)],
    ids=["fast-no-dropout", "medium-dropout-eval-epoch1", "medium-dropout-eval-epoch2"],
)
def test_interrupted_then_resumed_equals_uninterrupted(tiny_installed, tmp_path, mode, validation, cut_at):
    """Mid-epoch too, with LoRA dropout drawing from the random stream and evaluations between epochs
    (11 training examples at batch 2: 6 steps an epoch; the cut falls inside epoch 1 or epoch 2)."""
    argv = [
        "--data",
        "test_data.json",
        "--mode",
        mode,
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--validation-split",
        validation,
        "--force-epochs",
        "--precision",
        "fp32",
        "--no-tensorboard",
        "--seed",
        "3",
    ]

    def plan(*extra):
        return build_plan(tiny_installed, cli_args(*argv, *extra))

    full = run_training(plan("--output", str(tmp_path / "full")), show_progress=False)
    cut = run_training(
        plan("--output", str(tmp_path / "cut")), show_progress=False, extra_callbacks=[_SigtermAt(cut_at)]
    )
    assert cut.interrupted and cut.stop_reason.startswith("interrupted (SIGTERM)")
    assert (tmp_path / "cut" / "adapter_model.safetensors").is_file()  # the adapter is saved on interrupt
    steps = [int(p.name.split("-")[1]) for p in cut.run_dir.glob("checkpoint-*")]
    assert steps and max(steps) < full.metrics["global_step"]
    resumed = run_training(plan("--output", str(tmp_path / "resumed"), "--resume"), show_progress=False)
    assert resumed.resumed_from is not None and resumed.resumed_from.parent == cut.run_dir
    assert resumed.metrics["global_step"] == full.metrics["global_step"]
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    c = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4  # the cut run really was behind

    # an incompatible resume is refused with the reason
    with pytest.raises(UserError, match=r"cannot resume .*learning_rate"):
        run_training(plan("--resume", "--learning-rate", "0.01"), show_progress=False)


def test_resume_without_checkpoint_is_a_clear_error(tiny_installed):
    with pytest.raises(UserError, match="--resume: no checkpoint found"):
        run_training(build_plan(tiny_installed, cli_args("--data", "test_data.json", "--resume")))


def test_ctrl_c_saves_checkpoint_and_adapter_and_exits_cleanly(tiny_installed, tmp_path):
    """A real SIGINT to `llm-installer train` in non-stop mode: checkpoint + adapter, exit code 130."""
    env = dict(os.environ, LLM_INSTALLER_MODELS_DIR=str(tiny_installed.root.parent), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            str(REPO / "llm-installer"),
            "train",
            "test/tiny",
            "--data",
            "test_data.json",
            "--mode",
            "non-stop",
            "--batch-size",
            "2",
            "--validation-split",
            "0",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if list(tiny_installed.runs_dir.glob("*/tensorboard/**/events.out.tfevents*")):
                break  # training has logged its first steps
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "interrupted (SIGINT)" in out and "--resume" in out
    info = read_json(tiny_installed.lora_dir / "adapter_info.json")
    assert info["interrupted"] is True and info["stop_reason"].startswith("interrupted (SIGINT)")
    run = Path(info["run_dir"])
    assert list(run.glob("checkpoint-*/adapter_model.safetensors"))
    assert all((c / ".complete").is_file() for c in run.glob("checkpoint-*"))

    # the printed resume command works exactly as printed: it reads the run's own flags (non-stop mode,
    # the data), so nothing has to be repeated; --max-steps bounds the otherwise endless mode
    printed = out[out.index("resume with `") + len("resume with `") :].split("`")[0]
    assert printed == "llm-installer train test/tiny --resume"
    done = max(int(c.name.split("-")[1]) for c in run.glob("checkpoint-*"))
    proc = subprocess.run(
        [str(REPO / "llm-installer"), *printed.split()[1:], "--max-steps", str(done + 2)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = read_json(tiny_installed.lora_dir / "adapter_info.json")
    assert info["resumed_from"] and Path(info["resumed_from"]).parent == run
    assert info["plan"]["settings"]["mode"]["value"] == "non-stop" and not info["interrupted"]


def test_output_that_is_not_an_adapter_folder_is_refused_before_training(tiny_installed, tmp_path):
    """Writing an adapter replaces its folder whole: a folder holding anything else, or the model itself,
    is refused before any training, and left exactly as it was."""
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "thesis.txt").write_text("years of work")
    for target, message in (
        (keep, "holds other files"),
        (tiny_installed.root, "the model's own folder"),
        (tiny_installed.model_dir, "the model's own folder"),
        (tiny_installed.root.parent, "the model's own folder"),
    ):
        with pytest.raises(UserError, match=message):
            run_training(
                build_plan(tiny_installed, cli_args("--data", "test_data.json", "--output", str(target)))
            )
    assert (keep / "thesis.txt").read_text() == "years of work"
    assert (tiny_installed.model_dir / "config.json").is_file()
    assert not tiny_installed.runs_dir.exists() or not list(tiny_installed.runs_dir.iterdir())


def test_interrupted_run_keeps_the_finished_adapter(tiny_installed, tmp_path):
    argv = ["--data", "test_data.json", "--mode", "fast", "--batch-size", "2", "--validation-split", "0",
            "--no-tensorboard", "--precision", "fp32"]  # fmt: skip
    first = run_training(build_plan(tiny_installed, cli_args(*argv, "--max-steps", "2")), show_progress=False)
    assert first.adapter_dir == tiny_installed.lora_dir and not first.interrupted
    finished = (tiny_installed.lora_dir / "adapter_model.safetensors").read_bytes()
    cut = run_training(
        build_plan(tiny_installed, cli_args(*argv, "--learning-rate", "0.02")),
        show_progress=False,
        extra_callbacks=[_SigtermAt(1)],
    )
    assert cut.interrupted and cut.kept_previous == tiny_installed.lora_dir
    assert cut.adapter_dir == cut.run_dir / "adapter"
    assert (tiny_installed.lora_dir / "adapter_model.safetensors").read_bytes() == finished
    assert read_json(cut.adapter_dir / "adapter_info.json")["interrupted"] is True
    assert read_json(tiny_installed.lora_dir / "adapter_info.json")["interrupted"] is False


def test_leftovers_of_a_killed_adapter_write_are_recovered(tmp_path):
    """A kill between moving the old adapter aside and swapping the new one in: the next write puts the
    old one back first, and half-written temp folders of dead processes go."""
    from llm_installer.train.trainer import recover_adapter_leftovers

    dead = _dead_pid()
    (tmp_path / f".lora.old-{dead}").mkdir()
    (tmp_path / f".lora.old-{dead}" / "adapter_model.safetensors").write_text("previous")
    (tmp_path / f".lora.tmp-{dead}").mkdir()
    recover_adapter_leftovers(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_adapter_write_is_atomic(tmp_path):
    target = tmp_path / "lora"
    target.mkdir()
    (target / "adapter_model.safetensors").write_text("old")

    class Broken:
        def save_pretrained(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "adapter_model.safetensors").write_text("half")
            raise OSError("disk full")

    with pytest.raises(OSError):
        write_adapter_atomically(Broken(), target, {"x": 1})
    assert (target / "adapter_model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]

    class Good:
        def save_pretrained(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "adapter_model.safetensors").write_text("new")

    write_adapter_atomically(Good(), target, {"x": 2})
    assert (target / "adapter_model.safetensors").read_text() == "new"
    assert read_json(target / "adapter_info.json") == {"x": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_train_sh_in_the_model_folder_has_the_same_flags(tiny_installed):
    proc = subprocess.run(
        [str(tiny_installed.root / "train.sh"), "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for flag in ("--data", "--mode", "--method", "--resume-from", "--dry-run", "--no-tensorboard"):
        assert flag in proc.stdout


def _fake_checkpoint(path: Path, complete: bool = True) -> None:
    """The files a resume reads; the completion marker only when `complete` (a save that finished)."""
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"x")
    (path / "optimizer.pt").write_bytes(b"x")
    if complete:
        (path / ".complete").write_text("complete\n")


def test_resume_picks_the_newest_run_and_its_highest_checkpoint_numerically(tmp_path):
    from llm_installer.train.trainer import checkpoints, find_resume_checkpoint

    runs = tmp_path / "runs"
    for run, steps in (("20260101-100000", [5]), ("20260102-090000", [9, 10, 2]), ("20260103-080000", [])):
        for s in steps:
            _fake_checkpoint(runs / run / f"checkpoint-{s}")
        (runs / run).mkdir(parents=True, exist_ok=True)
    # a save cut short (no marker) in the newest run, and one whose rotation deleted its optimizer state
    _fake_checkpoint(runs / "20260103-080000" / "checkpoint-3", complete=False)
    _fake_checkpoint(runs / "20260102-090000" / "checkpoint-11")
    (runs / "20260102-090000" / "checkpoint-11" / "optimizer.pt").unlink()
    assert [p.name for p in checkpoints(runs / "20260102-090000")] == [
        "checkpoint-2",
        "checkpoint-9",
        "checkpoint-10",
    ]
    # the newest run has no complete checkpoint: the newest one that has
    assert find_resume_checkpoint(runs, "latest") == runs / "20260102-090000" / "checkpoint-10"
    assert find_resume_checkpoint(runs, "20260101-100000").name == "checkpoint-5"
    given = runs / "20260102-090000" / "checkpoint-9"
    assert find_resume_checkpoint(runs, str(given)) == given.resolve()
    with pytest.raises(UserError, match="that checkpoint is incomplete"):
        find_resume_checkpoint(runs, str(runs / "20260103-080000" / "checkpoint-3"))
    with pytest.raises(UserError, match="--resume-from nowhere: no such run"):
        find_resume_checkpoint(runs, "nowhere")
