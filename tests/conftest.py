"""Shared fixtures: the bundled SmolLM2 tokenizer/model and tiny random-weight models per architecture.

Everything is built offline. Session-scoped fixtures convert the bundled GGUF once per test session.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the precision probe's cache: one per test session, never the user's
os.environ.setdefault("LLM_INSTALLER_CACHE_DIR", tempfile.mkdtemp(prefix="llm-installer-cache-"))

from tests.tiny import build_tiny_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_models_dir(tmp_path, monkeypatch):
    """Every test gets its own models folder unless it sets another."""
    from llm_installer import store

    d = tmp_path / "models"
    monkeypatch.setenv("LLM_INSTALLER_MODELS_DIR", str(d))
    store.set_models_dir(None)
    yield d
    store.set_models_dir(None)


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    from llm_installer.sources.bundled import bundled_gguf_path

    return bundled_gguf_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory, bundled_gguf) -> Path:
    """A folder holding SmolLM2's tokenizer (with its chat template), taken from the bundled GGUF."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok = AutoTokenizer.from_pretrained(str(bundled_gguf.parent), gguf_file=bundled_gguf.name)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir))


@pytest.fixture(scope="session")
def smollm2_model_dir(tmp_path_factory, bundled_gguf) -> Path:
    """The bundled SmolLM2-135M-Instruct as a plain safetensors folder (about 20 s, once per session)."""
    from llm_installer.sources.gguf import convert_gguf

    out = tmp_path_factory.mktemp("smollm2-model")
    return convert_gguf(bundled_gguf, out)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, smollm2_tokenizer_dir):
    """build(family) -> folder with a tiny random-weight model of that family + SmolLM2's tokenizer."""
    cache: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[family] = build_tiny_model(family, out, smollm2_tokenizer_dir)
        return cache[family]

    return build


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A local Hugging Face Hub stand-in (tests/hub_server.py) with HF_ENDPOINT pointing at it.

    huggingface_hub reads its endpoint and offline flag from the environment at import time, so the
    fixture also patches its `constants` module for a process that imported it already.
    """
    from tests.hub_server import HubServer

    server = HubServer().start()
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    try:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HOME", env["HF_HOME"])
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
    except ImportError:
        pass
    yield server
    server.stop()


@pytest.fixture
def hub_small_model(hub_server, tiny_model_factory):
    """`test/small-model` on the local Hub: the tiny random llama of tests/tiny.py (with SmolLM2's tokenizer)."""
    hub_server.add_repo("test/small-model", tiny_model_factory("llama"))
    return hub_server
