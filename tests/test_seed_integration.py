"""The seed's integration test (handler-training-development.md, "Integration Test"), body verbatim.

The fixture builds what the seed assumes: a workspace whose `./llm-installer` is this checkout's script,
models going to `./models`, and `test/small-model` served by the tests' local Hub (a tiny random llama
with SmolLM2's tokenizer). `test_data.json` resolves to the bundled example of that name.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def seed_workspace(hub_small_model, tmp_path, monkeypatch):
    ws = tmp_path / "workspace"
    ws.mkdir()
    (ws / "llm-installer").symlink_to(REPO / "llm-installer")
    monkeypatch.setenv("LLM_INSTALLER_MODELS_DIR", str(ws / "models"))
    # no PYTHONPATH help: ./llm-installer resolves its own symlink to find the checkout
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(ws)
    return ws


# fmt: off
def test_training_integration(seed_workspace):
    """Test full training integration."""
    import subprocess

    # Install test model
    result = subprocess.run([
        './llm-installer', 'install', 'test/small-model'
    ], capture_output=True)
    assert result.returncode == 0

    # Run training
    result = subprocess.run([
        './train.sh',
        '--data', 'test_data.json',
        '--max-examples', '10',
        '--mode', 'fast'
    ], cwd='models/test_small-model', capture_output=True)

    assert result.returncode == 0
    assert Path('models/test_small-model/lora').exists()
# fmt: on


def test_seed_run_left_a_complete_adapter(seed_workspace):
    """Beyond the seed's check: the adapter it leaves is complete and says what it was trained on."""
    import json

    assert (
        subprocess.run(["./llm-installer", "install", "test/small-model"], capture_output=True).returncode
        == 0
    )
    result = subprocess.run(
        ["./train.sh", "--data", "test_data.json", "--max-examples", "10", "--mode", "fast"],
        cwd="models/test_small-model",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lora = Path("models/test_small-model/lora")
    info = json.loads((lora / "adapter_info.json").read_text())
    assert (lora / "adapter_model.safetensors").is_file()
    assert info["base_model"]["model_id"] == "test/small-model"
    assert info["data"]["train_examples"] + info["data"]["validation_examples"] == 10
    assert info["plan"]["settings"]["mode"]["value"] == "fast"
