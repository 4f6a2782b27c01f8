"""Consent for a model's own Python code is a flag of each command, never a line in the model folder.

A tiny llama whose config names code of its own (auto_map, an unknown model type); importing that code
writes a marker file, so each test can tell whether it ran.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

CUSTOM_CODE = """
import os
from pathlib import Path

Path(os.environ["HARDEN_CODE_MARKER"]).write_text("the model's own code ran")

from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "harden_custom"


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


@pytest.fixture
def custom_model(tiny_model_factory, tmp_path, monkeypatch, _isolated_models_dir):
    """(installed folder name, marker path): installed with --trust-remote-code, as a user would."""
    from llm_installer.install import install_model

    src = tmp_path / "custom-src"
    shutil.copytree(tiny_model_factory("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(
        model_type="harden_custom",
        architectures=["CustomForCausalLM"],
        auto_map={
            "AutoConfig": "custom_code.CustomConfig",
            "AutoModelForCausalLM": "custom_code.CustomForCausalLM",
        },
    )
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "custom_code.py").write_text(CUSTOM_CODE)
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("HARDEN_CODE_MARKER", str(marker))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    folder = install_model(str(src), name="custom", trust_remote_code=True)
    assert json.loads(folder.info_path.read_text())["info"]["trust_remote_code"] is True
    assert not marker.exists()  # installing reads JSON only
    return folder, marker


def _main(*argv: str) -> int:
    from llm_installer import consent
    from llm_installer.cli import main

    consent.grant(False)  # each command starts without consent, as a new process does
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code


REFUSED = (
    "error: custom needs custom Python code from its model folder, which runs when it is loaded; read that "
    "code, then pass --trust-remote-code to this command to allow it"
)


def test_chat_train_and_inspect_through_the_path_refuse_without_the_flag(custom_model, tmp_path, capsys):
    folder, marker = custom_model
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "hi", "output": "there"}\n')
    for argv in (
        ("chat", str(folder.root), "--prompt", "hi"),
        ("train", str(folder.root), "--dry-run"),
        ("data", "inspect", str(data), "--model", str(folder.root)),
        ("start", str(folder.root), "--port", "0"),
    ):
        capsys.readouterr()
        assert _main(*argv) == 2, argv
        err = " ".join(capsys.readouterr().err.split())
        assert err.endswith(REFUSED) and err.count("error:") == 1, (argv, err)  # one line, no traceback
        assert not marker.exists(), f"{argv[0]} ran the model's code without --trust-remote-code"


def test_with_the_flag_the_code_runs_and_says_so(custom_model, capsys):
    folder, marker = custom_model
    assert _main("chat", str(folder.root), "--prompt", "hi", "--max-tokens", "2", "--trust-remote-code") == 0
    assert marker.read_text() == "the model's own code ran"
    assert "running custom's own Python code from its model folder (--trust-remote-code)" in " ".join(
        capsys.readouterr().err.split()
    )


def test_python_callers_pass_their_own_consent(custom_model):
    from llm_installer import consent
    from llm_installer.errors import UserError
    from llm_installer.serve.engine import Engine

    folder, marker = custom_model
    consent.grant(True)  # even with this process's flag set, a caller's own False wins
    try:
        with pytest.raises(UserError):
            Engine.load(str(folder.root), trust_remote_code=False)
    finally:
        consent.grant(False)
    with pytest.raises(UserError):
        Engine.load(str(folder.root))
    assert not marker.exists()


def test_a_folder_that_hides_its_need_is_still_caught(custom_model):
    """model_info.json edited to say no code is needed: the config's auto_map still says it is."""
    from llm_installer.consent import allow_remote_code

    folder, marker = custom_model
    raw = json.loads(folder.info_path.read_text())
    raw["info"]["trust_remote_code"] = False
    folder.info_path.write_text(json.dumps(raw))
    with pytest.raises(Exception, match="needs custom Python code"):
        allow_remote_code(folder.load_info())
    assert Path(folder.root).is_dir()
