"""`llm-installer chat`: the one-shot --prompt mode and the interactive loop, run as a user runs them."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.test_serve_support import install_tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_factory):
    d = tmp_path_factory.mktemp("chat-models")
    install_tiny(d, tiny_model_factory("llama"), name="tiny")
    return d


def _cli(models, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLM_INSTALLER_MODELS_DIR": str(models), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "llm_installer", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def engine(models):
    from llm_installer.serve.engine import Engine

    eng = Engine.load(str(models / "tiny")).start()
    yield eng
    eng.stop()


def _greedy(engine, text: str, adapter: str | None, n: int) -> str:
    from llm_installer.serve.engine import SamplingParams

    ids = engine.chat_prompt_ids([{"role": "user", "content": text}])
    return engine.generate(ids, adapter, SamplingParams(max_tokens=n, temperature=0)).text


def test_prompt_mode_prints_only_the_answer(models, engine):
    res = _cli(models, "chat", "tiny", "--prompt", "Hello there", "--max-tokens", "8", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout == _greedy(engine, "Hello there", "lora", 8).strip() + "\n"


def test_prompt_mode_no_lora(models, engine, capsys, monkeypatch):
    args = ("chat", "tiny", "--prompt", "Hello there", "--max-tokens", "8", "--temperature", "0")
    code, out, err = _main(capsys, monkeypatch, models, *args, "--no-lora")
    assert code == 0, err
    assert out == _greedy(engine, "Hello there", None, 8).strip() + "\n"
    code, lora_out, _ = _main(capsys, monkeypatch, models, *args)
    assert lora_out != out


def _main(capsys, monkeypatch, models, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """Run the CLI in this process (same code path as the console script, without re-importing torch)."""
    from llm_installer.cli import main

    monkeypatch.setenv("LLM_INSTALLER_MODELS_DIR", str(models))
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_interactive_loop_with_commands(models, engine, capsys, monkeypatch):
    from llm_installer.serve.engine import SamplingParams

    script = "Hello there\n/base\nHello there\n/adapter on\n/system Be brief.\n/reset\nHi\n/nonsense\n/exit\nnever\n"
    code, out, err = _main(
        capsys, monkeypatch, models, "chat", "tiny", "--max-tokens", "6", "--temperature", "0", stdin=script
    )
    assert code == 0, err
    brief = engine.chat_prompt_ids(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    third = engine.generate(brief, "lora", SamplingParams(max_tokens=6, temperature=0)).text
    expected = (
        f"tiny:lora> {_greedy(engine, 'Hello there', 'lora', 6)}\n"
        f"tiny> {_greedy(engine, 'Hello there', None, 6)}\n"
        f"tiny:lora> {third}\n"
    )
    assert out == expected  # nothing after /exit
    assert "now chatting with tiny:lora" in err
    assert "system prompt set" in err
    assert "unknown command /nonsense" in err


def test_session_history_reset_and_system(engine):
    from llm_installer.serve.chat import ChatSession
    from llm_installer.serve.engine import SamplingParams

    s = ChatSession(engine, use_adapter=True, params=SamplingParams(max_tokens=4, temperature=0))
    buf = io.StringIO()
    first = s.ask("one", out=buf)
    assert buf.getvalue() == first
    s.ask("two")
    assert [m["role"] for m in s.history] == ["user", "assistant", "user", "assistant"]
    assert s.messages("three")[-3]["content"] == "two"
    assert s.command("/reset") == "conversation cleared" and s.history == []
    s.command("/system You are terse.")
    assert s.messages("x")[0] == {"role": "system", "content": "You are terse."}
    assert s.command("/base") == "now chatting with tiny" and s.adapter is None
    assert s.command("/lora") == "now chatting with tiny:lora" and s.adapter == "lora"
    assert s.command("/quit") is None


def test_bad_input_is_one_line_error(models, capsys, monkeypatch):
    code, _, err = _main(capsys, monkeypatch, models, "chat", "nope", "--prompt", "hi")
    assert code == 2
    assert err.strip().startswith("error: model 'nope' is not installed")
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    code, _, err = _main(capsys, monkeypatch, models, "chat", "tiny", "--lora", str(models), "--prompt", "hi")
    assert code == 2 and "no adapter_config.json" in err
