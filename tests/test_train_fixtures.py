"""Shared helpers for the training tests (no tests here): installed tiny models and short plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_installed(tiny_model_factory):
    """A tiny random llama (SmolLM2 tokenizer) installed through the real installer as `test/tiny`."""
    from llm_installer.install import install_model

    return install_model(str(tiny_model_factory("llama")), name="test/tiny")


def cli_args(*argv: str) -> dict:
    """Parse `train NAME ...argv` exactly as the CLI does and return the flags the plan receives."""
    import typer

    from llm_installer.cli import app
    from llm_installer.commands.train_cmd import collect_args

    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("llm-installer", ["train", "x", *argv], resilient_parsing=False)
    sub = cmd.get_command(ctx, "train")
    sub_ctx = sub.make_context("train", ["x", *argv], parent=ctx)
    return collect_args(sub_ctx.params)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def run_cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """`llm-installer ARGS` in this process (the console script's code path, without re-importing torch):
    (exit code, stdout, stderr), with an empty stdin."""
    import io
    import sys

    from llm_installer.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err
