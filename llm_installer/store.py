"""The model store: where models live and how a name maps to a folder.

Layout of one installed model (see docs/architecture.md):

    <models_dir>/<org>_<name>/
        model/            weights (safetensors), config, tokenizer, chat template
        model_info.json   ModelInfo + manifest (source, revision, files with size and sha256)
        train.sh start.sh thin wrappers that call the CLI for this folder
        lora/             the active adapter (adapter files, adapter_info.json, report)
        runs/<timestamp>/ checkpoints, logs, loss plot, training report

Models folder, first that is set: `--models-dir`, `LLM_INSTALLER_MODELS_DIR`, `./models` beside the
checkout's `./llm-installer` script (it exports LLM_INSTALLER_CHECKOUT_MODELS_DIR), else
`$XDG_DATA_HOME/llm-installer/models` (default `~/.local/share/llm-installer/models`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from llm_installer.errors import InvalidNameError, ModelNotFoundError
from llm_installer.model_info import ModelInfo

INFO_FILE = "model_info.json"
MODEL_SUBDIR = "model"
LORA_SUBDIR = "lora"
RUNS_SUBDIR = "runs"
PARTIAL_PREFIX = ".partial-"  # in-progress installs are built in <models_dir>/.partial-<folder>

_models_dir_override: Path | None = None

# One path segment: letters, digits, '.', '_', '-' (no leading dot, so '..' and hidden names are out).
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def set_models_dir(path: str | os.PathLike[str] | None) -> None:
    """Set the models folder for this process (the CLI's --models-dir)."""
    global _models_dir_override
    _models_dir_override = Path(path).expanduser().resolve() if path else None


def models_dir() -> Path:
    """The models folder in force (see the module docstring for the order)."""
    if _models_dir_override is not None:
        return _models_dir_override
    for var in ("LLM_INSTALLER_MODELS_DIR", "LLM_INSTALLER_CHECKOUT_MODELS_DIR"):
        value = os.environ.get(var)
        if value:
            return Path(value).expanduser().resolve()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "llm-installer" / "models"


def folder_name(model_ref: str) -> str:
    """Map a model reference to its folder name: 'org/name' -> 'org_name', 'name' -> 'name'.

    Refuses anything that could escape the models folder or carries odd characters.
    """
    ref = model_ref.strip()
    parts = ref.split("/")
    if not ref or len(parts) > 2 or not all(_SEGMENT.match(p) for p in parts) or ".." in ref:
        raise InvalidNameError(
            f"invalid model name {model_ref!r}: use 'org/name' or 'name' made of letters, digits, '.', '_' and '-'"
        )
    return "_".join(parts)


@dataclass(frozen=True)
class ModelFolder:
    """Paths of one model folder in the store."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_SUBDIR

    @property
    def info_path(self) -> Path:
        return self.root / INFO_FILE

    @property
    def lora_dir(self) -> Path:
        return self.root / LORA_SUBDIR

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS_SUBDIR

    @property
    def is_complete(self) -> bool:
        return self.info_path.is_file() and self.model_dir.is_dir()

    @property
    def has_adapter(self) -> bool:
        return (self.lora_dir / "adapter_config.json").is_file()

    def load_info(self) -> ModelInfo:
        """Read model_info.json (ModelInfo fields plus the manifest under 'manifest')."""
        try:
            data = json.loads(self.info_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelNotFoundError(
                f"{self.root} is not a complete install (no {INFO_FILE}); reinstall it with --force"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelNotFoundError(f"{self.info_path} is damaged ({exc}); reinstall with --force") from None
        return ModelInfo.model_validate(data.get("info", data))

    def read_raw_info(self) -> dict:
        """The whole model_info.json as a dict (info + manifest)."""
        return json.loads(self.info_path.read_text(encoding="utf-8"))


def folder_for(model_ref: str) -> ModelFolder:
    """The folder a model reference maps to in the store (it may not exist yet)."""
    return ModelFolder(models_dir() / folder_name(model_ref))


def find_model(name_or_path: str) -> ModelFolder:
    """Find an installed model by folder name, model id ('org/name') or a path to its folder.

    A path (containing os.sep or starting with '.' or '~') must point at a complete model folder;
    names are looked up in the models folder only, so they can never escape it.
    """
    ref = name_or_path.strip()
    looks_like_path = ref.startswith((".", "/", "~")) or os.sep in ref and Path(ref).expanduser().exists()
    if looks_like_path:
        root = Path(ref).expanduser().resolve()
        folder = ModelFolder(root)
        if not folder.is_complete:
            raise ModelNotFoundError(f"{ref} is not an installed model folder (no {INFO_FILE} and model/)")
        return folder
    folder = folder_for(ref)
    if not folder.root.exists():
        raise ModelNotFoundError(
            f"model {ref!r} is not installed in {models_dir()}; run `llm-installer list` to see installed models "
            f"or `llm-installer install {ref}`"
        )
    if not folder.is_complete:
        raise ModelNotFoundError(
            f"model {ref!r} is an incomplete install; run `llm-installer install {ref} --force` to redo it"
        )
    return folder


def installed_folders() -> list[ModelFolder]:
    """Every model folder in the store (complete or not), sorted by name; partial builds excluded."""
    base = models_dir()
    if not base.is_dir():
        return []
    return sorted(
        (ModelFolder(p) for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda f: f.name,
    )


# ---- manifest, hashing, verification -------------------------------------------------------------

# Files inside model/ that are bookkeeping, not part of the model (huggingface_hub's local_dir cache).
_IGNORED_DIRS = (".cache",)


def sha256_file(path: Path, progress=None, task=None) -> str:
    """sha256 of a file, read in 1 MiB blocks (weights can be tens of GB); advances a rich progress task."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
            if progress is not None and task is not None:
                progress.update(task, advance=len(block))
    return h.hexdigest()


def model_files(model_dir: Path) -> list[Path]:
    """Every file of a model folder (symlinks to files included), relative paths sorted."""
    out = []
    for p in sorted(Path(model_dir).rglob("*")):
        rel = p.relative_to(model_dir)
        if rel.parts and rel.parts[0] in _IGNORED_DIRS:
            continue
        if p.is_file():
            out.append(rel)
    return out


def _hash_progress():
    """A transient rich progress bar over bytes, on stderr so stdout stays clean for scripts."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from llm_installer.console import err_console

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


def build_manifest_files(model_dir: Path, *, description: str = "hashing") -> list[dict]:
    """[{path, size, sha256}] for every file of `model_dir` (paths relative to the model folder's root)."""
    files = model_files(model_dir)
    total = sum((Path(model_dir) / f).stat().st_size for f in files)
    entries = []
    with _hash_progress() as progress:
        task = progress.add_task(description, total=total)
        for rel in files:
            p = Path(model_dir) / rel
            entries.append(
                {
                    "path": f"{MODEL_SUBDIR}/{rel.as_posix()}",
                    "size": p.stat().st_size,
                    "sha256": sha256_file(p, progress, task),
                }
            )
    return entries


@dataclass
class VerifyResult:
    """What `verify` found: files named in the manifest that are gone or differ, and unlisted files."""

    checked: int
    missing: list[str]
    changed: list[str]
    extra: list[str]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.changed


def verify_folder(folder: ModelFolder) -> VerifyResult:
    """Re-hash every file listed in the manifest of `folder` and compare sizes and sha256."""
    raw = folder.read_raw_info()
    entries = raw.get("manifest", {}).get("files", [])
    total = 0
    for e in entries:
        p = folder.root / e["path"]
        if p.is_file():
            total += p.stat().st_size
    missing: list[str] = []
    changed: list[str] = []
    with _hash_progress() as progress:
        task = progress.add_task(f"verifying {folder.name}", total=total)
        for e in entries:
            p = folder.root / e["path"]
            if not p.is_file():
                missing.append(e["path"])
                continue
            if p.stat().st_size != e["size"]:
                changed.append(e["path"])
                progress.update(task, advance=p.stat().st_size)
                continue
            if sha256_file(p, progress, task) != e["sha256"]:
                changed.append(e["path"])
    listed = {e["path"] for e in entries}
    extra = [
        f"{MODEL_SUBDIR}/{rel.as_posix()}"
        for rel in (model_files(folder.model_dir) if folder.model_dir.is_dir() else [])
        if f"{MODEL_SUBDIR}/{rel.as_posix()}" not in listed
    ]
    return VerifyResult(len(entries), missing, changed, extra)


def folder_status(folder: ModelFolder) -> str:
    """'ready', 'incomplete' (no model_info.json or model/) or 'damaged' (unreadable info, missing files).

    Cheap: compares file presence and sizes with the manifest, never hashes (that is `verify`).
    """
    if not folder.is_complete:
        return "incomplete"
    try:
        raw = folder.read_raw_info()
        entries = raw["manifest"]["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "damaged"
    for e in entries:
        p = folder.root / e["path"]
        if not p.is_file() or p.stat().st_size != e["size"]:
            return "damaged"
    return "ready"


def partial_dir(folder: str) -> Path:
    """Where an install of `folder` is built before it is renamed into place."""
    return models_dir() / f"{PARTIAL_PREFIX}{folder}"


def lock_path(folder: str) -> Path:
    """The lock file that keeps two installs (or an install and a remove) of one model apart."""
    return models_dir() / f".{folder}.lock"


def folder_lock(folder: str):
    """A `filelock.FileLock` for one model folder; acquire with a timeout, raise UserError when busy."""
    from filelock import FileLock

    models_dir().mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_path(folder)))


# ---- wrappers --------------------------------------------------------------------------------------

_WRAPPER = """#!/usr/bin/env bash
# {command} this model: runs `python -m llm_installer {command} <this folder> "$@"`.
# No `cd`: relative paths such as --data stay relative to where you run it from.
set -e
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
py={python}
[ -x "$py" ] || py="$(command -v python3)"
export PYTHONPATH={package_parent}"${{PYTHONPATH:+:$PYTHONPATH}}"
exec "$py" -m llm_installer {command} "$here" "$@"
"""


def _python_for_wrappers() -> str:
    """The checkout's .venv python when there is one, else the interpreter doing the install."""
    import sys

    package_parent = Path(__file__).resolve().parent.parent
    venv = package_parent / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def write_wrappers(root: Path) -> list[Path]:
    """Write executable train.sh and start.sh into a model folder."""
    import shlex

    package_parent = str(Path(__file__).resolve().parent.parent)
    written = []
    for command, filename in (("train", "train.sh"), ("start", "start.sh")):
        path = Path(root) / filename
        path.write_text(
            _WRAPPER.format(
                command=command,
                python=shlex.quote(_python_for_wrappers()),
                package_parent=shlex.quote(package_parent),
            ),
            encoding="utf-8",
        )
        path.chmod(0o755)
        written.append(path)
    return written
