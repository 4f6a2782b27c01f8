"""The store: manifest hashing, status of a folder, verify, partial builds, name mapping, find_model."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from llm_installer import store
from llm_installer.errors import InvalidNameError, ModelNotFoundError


def _fake_install(root, files: dict[str, bytes]) -> store.ModelFolder:
    """A model folder with a manifest written by the store's own functions (no model needed)."""
    (root / "model").mkdir(parents=True)
    for rel, data in files.items():
        (root / "model" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "model" / rel).write_bytes(data)
    entries = store.build_manifest_files(root / "model")
    info = {"model_id": "org/fake"}
    (root / store.INFO_FILE).write_text(json.dumps({"info": info, "manifest": {"files": entries}}))
    return store.ModelFolder(root)


def test_manifest_lists_every_file_with_size_and_sha256(_isolated_models_dir):
    folder = _fake_install(
        _isolated_models_dir / "fake", {"config.json": b"{}", "sub/weights.bin": b"abc", ".cache/x": b"skip"}
    )
    entries = folder.read_raw_info()["manifest"]["files"]
    assert entries == [
        {"path": "model/config.json", "size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
        {"path": "model/sub/weights.bin", "size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()},
    ]


def test_status_and_verify(_isolated_models_dir):
    folder = _fake_install(
        _isolated_models_dir / "fake", {"config.json": b"{}", "w.safetensors": b"0123456789"}
    )
    assert store.folder_status(folder) == "ready"
    assert store.verify_folder(folder).ok

    (folder.model_dir / "w.safetensors").write_bytes(b"0123456780")  # same size, one byte changed
    assert store.folder_status(folder) == "ready"  # the cheap check only compares sizes
    result = store.verify_folder(folder)
    assert (result.ok, result.changed, result.missing) == (False, ["model/w.safetensors"], [])

    (folder.model_dir / "extra.txt").write_text("new")
    (folder.model_dir / "config.json").unlink()
    result = store.verify_folder(folder)
    assert result.missing == ["model/config.json"] and result.extra == ["model/extra.txt"]
    assert store.folder_status(folder) == "damaged"

    folder.info_path.write_text("{broken")
    assert store.folder_status(folder) == "damaged"
    folder.info_path.unlink()
    assert store.folder_status(folder) == "incomplete"


def test_partial_builds_are_not_listed(_isolated_models_dir):
    _fake_install(_isolated_models_dir / "a", {"config.json": b"{}"})
    store.partial_dir("b").mkdir(parents=True)
    (_isolated_models_dir / ".b.lock").touch()
    assert [f.name for f in store.installed_folders()] == ["a"]


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/abs/path", "a/b/c", ".hidden", "sp ace", "", "x;rm"])
def test_folder_name_refuses_escapes(bad):
    with pytest.raises(InvalidNameError, match=r"^invalid model name "):
        store.folder_name(bad)


def test_folder_name_maps_org_name():
    assert store.folder_name("test/small-model") == "test_small-model"
    assert store.folder_name("smollm2-135m-instruct") == "smollm2-135m-instruct"


def test_find_model_by_id_name_and_path(_isolated_models_dir):
    folder = _fake_install(_isolated_models_dir / "test_small-model", {"config.json": b"{}"})
    assert store.find_model("test/small-model") == folder
    assert store.find_model("test_small-model") == folder
    assert store.find_model(str(folder.root)) == folder
    with pytest.raises(ModelNotFoundError, match=r"model 'other' is not installed"):
        store.find_model("other")


def test_wrappers_are_executable_bash(tmp_path):
    written = store.write_wrappers(tmp_path)
    assert [p.name for p in written] == ["train.sh", "start.sh"]
    for p in written:
        assert os.access(p, os.X_OK)
        assert p.read_text().startswith("#!/usr/bin/env bash\n")
