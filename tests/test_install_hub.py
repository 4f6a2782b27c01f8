"""Hub installs against the local Hub stand-in (tests/hub_server.py) through huggingface_hub's real code.

Covers: install, revision, file selection, pickle refusal, 404/401/gated/unknown revision/no network
messages, an interrupted download resumed, and `verify` catching a changed byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from llm_installer import store
from llm_installer.errors import CheckFailed, SourceError, UserError
from llm_installer.install import install_model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _nothing_written(models: Path) -> bool:
    """No model folder and no partial build: at most lock files in the models folder."""
    return not models.exists() or all(p.name.endswith(".lock") for p in models.iterdir())


@pytest.fixture
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


def test_install_from_hub(hub_small_model, _isolated_models_dir, tiny_llama):
    folder = install_model("test/small-model")

    assert folder.root == _isolated_models_dir / "test_small-model"
    info = folder.load_info()
    assert info.model_id == "test/small-model" and info.source == "hub"
    assert info.revision == hub_small_model.repos["test/small-model"].revisions["main"].sha
    assert info.family == "llama" and info.has_chat_template
    raw = folder.read_raw_info()
    manifest = raw["manifest"]
    assert manifest["source"] == "hub" and manifest["ref"] == "test/small-model"
    by_path = {f["path"]: f for f in manifest["files"]}
    for src in tiny_llama.iterdir():
        entry = by_path[f"model/{src.name}"]
        assert entry["sha256"] == _sha256(src) and entry["size"] == src.stat().st_size
    assert not (folder.model_dir / ".cache").exists()  # huggingface_hub's bookkeeping is not installed
    for script in ("train.sh", "start.sh"):
        assert os.access(folder.root / script, os.X_OK)
    assert sorted(p.name for p in _isolated_models_dir.iterdir() if not p.name.endswith(".lock")) == [
        "test_small-model"
    ]
    assert store.folder_status(folder) == "ready"


def test_install_revision(hub_server, tiny_llama, tmp_path):
    v1 = tmp_path / "v1"
    shutil.copytree(tiny_llama, v1)
    config = json.loads((v1 / "config.json").read_text())
    (v1 / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 256}))
    hub_server.add_repo("org/model", tiny_llama, revisions={"v1": v1})
    v1_sha = hub_server.repos["org/model"].revisions["v1"].sha

    info = install_model("org/model", revision="v1").load_info()

    assert info.context_length == 256 and info.revision == v1_sha
    # A reinstall without --force is refused; with --force it replaces the install atomically.
    with pytest.raises(
        UserError, match=r"org_model is already installed in .*; pass --force to reinstall it"
    ):
        install_model("org/model")
    assert install_model("org/model", force=True).load_info().context_length == 512


def test_file_selection_prefers_safetensors_and_skips_other_formats(hub_server, tiny_llama, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_llama, repo)
    junk = [
        "pytorch_model.bin",
        "model.onnx",
        "onnx/model.onnx",
        "flax_model.msgpack",
        "tf_model.h5",
        "model-q4.gguf",
        "original/consolidated.00.pth",
        "training_args.bin",
        "coreml/model.mlmodel",
    ]
    for name in junk:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(b"not needed")
    (repo / "README.md").write_text("# model card")
    hub_server.add_repo("org/many-formats", repo)

    folder = install_model("org/many-formats")

    installed = sorted(
        p.relative_to(folder.model_dir).as_posix() for p in folder.model_dir.rglob("*") if p.is_file()
    )
    assert installed == sorted([p.name for p in tiny_llama.iterdir()] + ["README.md"])
    fetched = {
        r.path.rsplit("/resolve/", 1)[1].split("/", 1)[1]
        for r in hub_server.requests
        if "/resolve/" in r.path
    }
    assert not fetched & set(junk)


def test_pickle_only_weights_need_allow_pickle(hub_server, tiny_llama, tmp_path, _isolated_models_dir):
    repo = tmp_path / "pickle"
    repo.mkdir()
    shutil.copy(tiny_llama / "config.json", repo / "config.json")
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(tiny_llama / "model.safetensors")), repo / "pytorch_model.bin")
    hub_server.add_repo("org/pickled", repo)

    with pytest.raises(SourceError) as exc:
        install_model("org/pickled")
    assert str(exc.value) == (
        "org/pickled has only pickle weights (pytorch_model.bin), which can run code when loaded; "
        "pass --allow-pickle if you trust it"
    )
    assert _nothing_written(_isolated_models_dir)

    folder = install_model("org/pickled", allow_pickle=True)
    assert (folder.model_dir / "pytorch_model.bin").is_file()
    assert folder.load_info().num_parameters is None  # pickles are never opened to count


def test_unknown_repo_404(hub_server, _isolated_models_dir):
    with pytest.raises(SourceError) as exc:
        install_model("org/missing")
    assert str(exc.value) == (
        f"model org/missing was not found on the Hub (HTTP 404); check the id at {hub_server.url}/org/missing "
        "(or set HF_TOKEN if it is a private repository)"
    )
    assert _nothing_written(_isolated_models_dir)


def test_private_repo_401(hub_server, tiny_llama, _isolated_models_dir):
    hub_server.add_repo("org/private", tiny_llama, private=True)
    with pytest.raises(SourceError) as exc:
        install_model("org/private")
    assert str(exc.value) == (
        f"org/private is private or gated on the Hub (HTTP 401) and no HF_TOKEN is set: request access at "
        f"{hub_server.url}/org/private and set HF_TOKEN to a token that has it"
    )
    assert _nothing_written(_isolated_models_dir)


def test_gated_repo_needs_token(hub_server, tiny_llama, monkeypatch, _isolated_models_dir):
    hub_server.add_repo("org/gated", tiny_llama, gated=True)
    with pytest.raises(SourceError) as exc:
        install_model("org/gated")
    assert str(exc.value) == (
        f"org/gated is a gated model and no HF_TOKEN is set: accept its terms at {hub_server.url}/org/gated, "
        "then set HF_TOKEN to a token with access (https://huggingface.co/settings/tokens)"
    )
    assert _nothing_written(_isolated_models_dir)

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert install_model("org/gated").load_info().model_id == "org/gated"


def test_unknown_revision(hub_small_model, _isolated_models_dir):
    with pytest.raises(SourceError) as exc:
        install_model("test/small-model", revision="v9")
    assert str(exc.value) == (
        "revision 'v9' does not exist for test/small-model on the Hub; pass an existing branch, tag or commit "
        f"with --revision (see {hub_small_model.url}/test/small-model/tree/main)"
    )
    assert _nothing_written(_isolated_models_dir)


def test_no_network(hub_server, monkeypatch, _isolated_models_dir):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    with pytest.raises(SourceError) as exc:
        install_model("org/anything")
    assert str(exc.value) == (
        f"cannot reach the Hub at {dead} to get org/anything; check your network or proxy (HF_ENDPOINT, "
        "HTTPS_PROXY) and run the install again, or install from a local folder or a .gguf file "
        "(offline: llm-installer install smollm2-135m-instruct)"
    )


def test_interrupted_download_is_resumed(hub_small_model, tiny_llama, _isolated_models_dir):
    from huggingface_hub import constants

    weights = tiny_llama / "model.safetensors"
    cut_at = constants.DOWNLOAD_CHUNK_SIZE + 4096
    assert weights.stat().st_size > cut_at
    # The connection drops after the first 10 MiB chunk and the "network" stays down for the retry.
    hub_small_model.interrupt_next("test/small-model", "model.safetensors", cut_at, fail_retries=1)

    with pytest.raises(SourceError, match=r"run the same install again later to resume"):
        install_model("test/small-model")

    partial = store.partial_dir("test_small-model")
    assert (partial / "model" / "config.json").is_file()  # finished files are kept
    assert not (_isolated_models_dir / "test_small-model").exists()  # nothing half-installed in place
    first = hub_small_model.file_requests("model.safetensors")
    assert first[-1].headers.get("Range") == f"bytes={constants.DOWNLOAD_CHUNK_SIZE}-"  # resumed mid-file
    config_gets = len(hub_small_model.file_requests("config.json"))

    folder = install_model("test/small-model")

    assert len(hub_small_model.file_requests("config.json")) == config_gets  # not downloaded again
    assert _sha256(folder.model_dir / "model.safetensors") == _sha256(weights)
    assert not partial.exists()


def test_cut_transfer_resumes_with_range_in_the_same_run(hub_small_model, tiny_llama):
    from huggingface_hub import constants

    hub_small_model.interrupt_next(
        "test/small-model", "model.safetensors", constants.DOWNLOAD_CHUNK_SIZE + 1, fail_retries=0
    )
    folder = install_model("test/small-model")

    ranges = [r.headers.get("Range") for r in hub_small_model.file_requests("model.safetensors")]
    assert ranges == [None, f"bytes={constants.DOWNLOAD_CHUNK_SIZE}-"]
    assert _sha256(folder.model_dir / "model.safetensors") == _sha256(tiny_llama / "model.safetensors")


def test_verify_catches_a_changed_byte(hub_small_model):
    folder = install_model("test/small-model")
    assert store.verify_folder(folder).ok

    weights = folder.model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    (folder.model_dir / "tokenizer.json").unlink()

    result = store.verify_folder(folder)
    assert result.changed == ["model/model.safetensors"]
    assert result.missing == ["model/tokenizer.json"]
    assert store.folder_status(folder) == "damaged"

    from llm_installer.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "test/small-model"])
    assert exit_info.value.code == CheckFailed.exit_code == 1


def test_ctrl_c_keeps_the_partial_install_and_a_rerun_finishes_it(hub_small_model, tmp_path):
    """A real SIGINT to `./llm-installer install` mid-download, then the same command again."""
    import signal
    import subprocess
    import time

    from tests.conftest import REPO_ROOT

    models = tmp_path / "sigint-models"
    partial = models / ".partial-test_small-model"
    cmd = [str(REPO_ROOT / "llm-installer"), "--models-dir", str(models), "install", "test/small-model"]
    hub_small_model.throttle(500_000)  # ~25 s for the weights: plenty of time to interrupt
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not hub_small_model.file_requests("model.safetensors") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == 130
    assert f"the partial download is kept in {partial}; run the same command again to resume" in err
    assert (partial / "model" / "config.json").is_file()
    assert not (models / "test_small-model").exists()
    config_gets = len(hub_small_model.file_requests("config.json"))

    hub_small_model.throttle(None)
    store.set_models_dir(models)
    install_model("test/small-model")  # the same install again, in-process to save a start-up
    assert len(hub_small_model.file_requests("config.json")) == config_gets
    assert store.folder_status(store.ModelFolder(models / "test_small-model")) == "ready"
    assert not partial.exists()


def test_offline_mode_is_named(hub_server, monkeypatch, _isolated_models_dir):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError) as exc:
        install_model("org/anything")
    assert str(exc.value) == (
        "HF_HUB_OFFLINE is set, so org/anything cannot be downloaded; unset HF_HUB_OFFLINE and run the install "
        "again, or install from a local folder or a .gguf file (offline: llm-installer install smollm2-135m-instruct)"
    )
    assert not hub_server.requests  # nothing was even tried


def test_hub_server_speaks_enough_for_snapshot_download(hub_small_model, tiny_llama, tmp_path):
    """Other areas' tests may use huggingface_hub directly against the fixture (tree listing, revisions)."""
    from huggingface_hub import HfApi, snapshot_download

    out = Path(snapshot_download("test/small-model", local_dir=str(tmp_path / "snap")))
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        p.name for p in tiny_llama.iterdir()
    )
    info = HfApi().model_info("test/small-model", files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes["model.safetensors"] == (tiny_llama / "model.safetensors").stat().st_size
