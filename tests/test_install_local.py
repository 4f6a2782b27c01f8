"""Installs from a local folder and the bundled GGUF; bad names and arguments; locking; atomic replace."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from llm_installer import store
from llm_installer.errors import InvalidNameError, SourceError, UserError
from llm_installer.install import install_model, resolve_ref


def _entries(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


@pytest.fixture
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


def test_install_local_folder_copy(tiny_llama, tmp_path, _isolated_models_dir):
    src = tmp_path / "my-model"
    shutil.copytree(tiny_llama, src)
    (src / "model.onnx").write_bytes(b"x")  # another runtime's copy: not installed

    folder = install_model(str(src))

    assert folder.root == _isolated_models_dir / "my-model"
    assert sorted(p.name for p in folder.model_dir.iterdir()) == sorted(p.name for p in tiny_llama.iterdir())
    assert not any(p.is_symlink() for p in folder.model_dir.iterdir())
    info = folder.load_info()
    assert info.source == "local" and info.model_id == "my-model"
    assert folder.read_raw_info()["manifest"]["ref"] == str(src)
    assert store.verify_folder(folder).ok


def test_install_local_folder_link(tiny_llama, _isolated_models_dir):
    folder = install_model(str(tiny_llama), name="linked", link=True)

    assert folder.load_info().model_id == "linked"  # a local model is known by its --name
    weights = folder.model_dir / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (tiny_llama / "model.safetensors").resolve()
    assert store.verify_folder(folder).ok


def test_local_pickle_refused_then_allowed(tiny_llama, tmp_path, _isolated_models_dir):
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(tiny_llama / "config.json", src)
    (src / "pytorch_model.bin").write_bytes(b"pickle bytes")
    with pytest.raises(SourceError) as exc:
        install_model(str(src))
    assert str(exc.value) == (
        f"{src} has only pickle weights (pytorch_model.bin), which can run code when loaded; "
        "pass --allow-pickle if you trust it"
    )
    assert not (_isolated_models_dir / "pickled").exists()
    assert not any(p.name.startswith(".partial-") for p in _isolated_models_dir.iterdir())


def test_remote_code_refused_without_flag(tiny_llama, tmp_path, _isolated_models_dir):
    src = tmp_path / "custom"
    shutil.copytree(tiny_llama, src)
    config = json.loads((src / "config.json").read_text())
    config |= {"model_type": "my-custom-arch", "auto_map": {"AutoModelForCausalLM": "modeling.MyModel"}}
    (src / "config.json").write_text(json.dumps(config))

    with pytest.raises(SourceError) as exc:
        install_model(str(src))
    assert str(exc.value) == (
        f"{src} needs custom Python code from its repository (model_type 'my-custom-arch' is not built into "
        "transformers); read that code, then pass --trust-remote-code to allow it"
    )
    assert "custom" not in _entries(_isolated_models_dir)
    info = install_model(str(src), trust_remote_code=True).load_info()
    assert info.trust_remote_code is True


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"ref": "smollm2-135m-instruct", "name": "../escape"},
            InvalidNameError,
            "invalid model name '../escape': use 'org/name' or 'name' made of letters, digits, '.', '_' and '-'",
        ),
        (
            {"ref": "smollm2-135m-instruct", "name": "/etc/passwd"},
            InvalidNameError,
            "invalid model name '/etc/passwd': use 'org/name' or 'name' made of letters, digits, '.', '_' and '-'",
        ),
        (
            {"ref": "org/na$me"},
            InvalidNameError,
            "invalid model name 'org/na$me': use 'org/name' or 'name' made of letters, digits, '.', '_' and '-'",
        ),
        (
            {"ref": "../not-there"},
            SourceError,
            "../not-there: no such folder or .gguf file; check the path",
        ),
        (
            {"ref": "no-such-model"},
            SourceError,
            "'no-such-model' is not the bundled model (smollm2-135m-instruct), an existing folder or .gguf file, "
            "nor a Hub id ('org/name')",
        ),
        (
            {"ref": "smollm2-135m-instruct", "revision": "main"},
            UserError,
            "--revision applies only to Hub models; smollm2-135m-instruct is a bundled source",
        ),
        (
            {"ref": "org/name", "link": True},
            UserError,
            "--link applies only to a local model folder; org/name is a hub source",
        ),
        (
            {"ref": "org/name", "force": True, "exist_ok": True},
            UserError,
            "--force and --exist-ok contradict each other: pass only one",
        ),
    ],
)
def test_bad_names_and_arguments_write_nothing(kwargs, error, message, _isolated_models_dir):
    ref = kwargs.pop("ref")
    with pytest.raises(error) as exc:
        install_model(ref, **kwargs)
    assert str(exc.value) == message
    assert not _isolated_models_dir.exists()


def test_not_a_gguf_file(tmp_path, _isolated_models_dir):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(SourceError) as exc:
        resolve_ref(str(f))
    assert (
        str(exc.value) == f"{f} is a file but not a .gguf file; pass a .gguf file, a model folder or a Hub id"
    )


def test_broken_gguf_file_is_refused_before_loading(tmp_path, _isolated_models_dir):
    f = tmp_path / "model.Q4_0.gguf"
    f.write_bytes(b"not a gguf file at all")
    with pytest.raises(SourceError) as exc:
        install_model(str(f))
    assert str(exc.value) == f"{f} is not a readable GGUF file (no GGUF magic); re-download it"
    assert not (_isolated_models_dir / "model.Q4_0").exists()
    assert not store.partial_dir("model.Q4_0").exists()


def test_concurrent_install_is_locked_out(tiny_llama, _isolated_models_dir):
    lock = store.folder_lock("busy")
    lock.acquire()
    try:
        with pytest.raises(UserError) as exc:
            install_model(str(tiny_llama), name="busy")
        assert str(exc.value) == (
            f"another install of busy is running (lock {_isolated_models_dir / '.busy.lock'}); "
            "wait for it to finish"
        )
    finally:
        lock.release()
    assert not (_isolated_models_dir / "busy").exists()


def test_exist_ok_and_force_keep_the_adapter(tiny_llama, _isolated_models_dir):
    folder = install_model(str(tiny_llama), name="m")
    (folder.lora_dir).mkdir()
    (folder.lora_dir / "adapter_config.json").write_text("{}")

    assert install_model(str(tiny_llama), name="m", exist_ok=True) == folder
    again = install_model(str(tiny_llama), name="m", force=True)
    assert again.has_adapter  # a reinstall of the same model keeps its trained adapter
    assert _entries(_isolated_models_dir) == [".m.lock", "m"] or _entries(_isolated_models_dir) == ["m"]


def test_failed_fetch_leaves_no_partial_and_old_install_intact(tiny_llama, tmp_path, _isolated_models_dir):
    folder = install_model(str(tiny_llama), name="m")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"\x00\x01")  # not a safetensors file

    with pytest.raises(SourceError, match=r"model.safetensors is not a valid safetensors file"):
        install_model(str(broken), name="m", force=True)

    assert store.folder_status(folder) == "ready"  # the earlier install is untouched
    assert not store.partial_dir("m").exists()


def test_wrappers_run_the_cli_for_their_folder(tiny_llama, tmp_path):
    import subprocess

    folder = install_model(str(tiny_llama), name="w")
    text = (folder.root / "train.sh").read_text()
    assert 'run()\' train "$here" "$@"' in text and "\ncd " not in text
    # Run from another directory with a clean PYTHONPATH: the wrapper finds the package itself.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(folder.root / "start.sh"), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout


@pytest.mark.slow
def test_bundled_model_installs_offline_and_answers(_isolated_models_dir, monkeypatch):
    """End to end: the bundled SmolLM2 GGUF -> safetensors folder -> greedy chat answer names Paris."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any network use would fail
    folder = install_model("smollm2-135m-instruct")

    assert folder.root == _isolated_models_dir / "smollm2-135m-instruct"
    info = folder.load_info()
    assert info.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and info.source == "bundled"
    assert info.family == "llama" and info.has_chat_template and info.is_instruct
    assert 134_000_000 < info.num_parameters < 136_000_000

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder.model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(folder.model_dir), dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
