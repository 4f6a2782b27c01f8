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

import errno
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from llm_installer import faults
from llm_installer.errors import InvalidNameError, ModelNotFoundError, UserError
from llm_installer.model_info import ModelInfo

INFO_FILE = "model_info.json"
MODEL_SUBDIR = "model"
LORA_SUBDIR = "lora"
RUNS_SUBDIR = "runs"
PARTIAL_PREFIX = ".partial-"  # in-progress installs are built in <models_dir>/.partial-<folder>
SOURCE_MARKER = ".source.json"  # in a partial folder while it is being built: which source it comes from
OLD_PREFIX = ".replaced-"  # a reinstall's previous install, between the swap and its deletion
REMOVING_PREFIX = ".deleting-"  # a removed model, between its rename and the end of its deletion
MAX_NAME = 96  # longest path segment of a model name: far under any filesystem's 255-byte limit

_models_dir_override: Path | None = None

# One path segment: letters, digits, '.', '_', '-' (no leading dot, so '..' and hidden names are out).
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def _checked_models_dir(value: str | os.PathLike[str], what: str) -> Path:
    """`value` as an absolute models folder; a UserError naming `what` when it is empty or not a folder.

    An empty value must not quietly mean "the current directory" (Path('') is '.'), and a file in its
    place must not surface later as an unexpected FileExistsError from mkdir.
    """
    text = os.fspath(value)
    if not str(text).strip():
        raise UserError(f"{what} is empty; pass the models folder to use (or leave it out for the default)")
    try:
        path = Path(text).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise UserError(f"{what} {text} is a file, not a folder; pass a folder to keep the models in")
    except OSError as exc:
        raise UserError(f"{what} {text}: {exc.strerror or exc}; pass another folder") from None
    return path


def set_models_dir(path: str | os.PathLike[str] | None) -> None:
    """Set the models folder for this process (the CLI's --models-dir)."""
    global _models_dir_override
    _models_dir_override = None if path is None else _checked_models_dir(path, "--models-dir")


def models_dir() -> Path:
    """The models folder in force (see the module docstring for the order)."""
    if _models_dir_override is not None:
        return _models_dir_override
    for var in ("LLM_INSTALLER_MODELS_DIR", "LLM_INSTALLER_CHECKOUT_MODELS_DIR"):
        value = os.environ.get(var)
        if value:
            return _checked_models_dir(value, var)
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "llm-installer" / "models"


def folder_name(model_ref: str) -> str:
    """Map a model reference to its folder name: 'org/name' -> 'org_name', 'name' -> 'name'.

    Refuses anything that could escape the models folder or carries odd characters.
    """
    ref = model_ref.strip()
    parts = ref.split("/")
    if any(len(p) > MAX_NAME for p in parts):
        raise InvalidNameError(
            f"model name {ref[:40]}... is {len(ref)} characters long; each part of 'org/name' may have at most "
            f"{MAX_NAME} (pass a shorter --name)"
        )
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
    looks_like_path = ref.startswith((".", "/", "~")) or os.sep in ref and path_exists(ref)
    if looks_like_path:
        root = Path(ref).expanduser().resolve()
        folder = ModelFolder(root)
        if not path_exists(root) or not folder.is_complete:
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


def path_exists(path: str | os.PathLike[str]) -> bool:
    """Whether `path` exists; False (not an OSError) for names the filesystem cannot even look up.

    `Path.exists` raises for a name over the filesystem's limit (ENAMETOOLONG): a 300-character model
    name typed by a user is not a path and must get the name rule's message, not "unexpected OSError".
    """
    try:
        return Path(path).expanduser().exists()
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.EACCES, errno.ELOOP, errno.ENOTDIR, errno.EINVAL):
            return False
        raise


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


def old_dir(folder: str) -> Path:
    """Where a reinstall puts the previous install of `folder` between the swap and its deletion."""
    return models_dir() / f"{OLD_PREFIX}{folder}"


def lock_path(folder: str) -> Path:
    """The lock file that keeps two installs (or an install and a remove) of one model apart."""
    return models_dir() / f".{folder}.lock"


class LockBusy(Exception):
    """Another process holds the lock of this model folder."""


class FolderLock:
    """An exclusive lock on one model folder that removes its lock file when released.

    `flock` on `<models>/.<folder>.lock`. Deleting a lock file is only safe while holding it and only if
    every acquirer checks, after locking, that the file it locked is still the one at the path (else a
    waiter could lock a deleted inode while a newcomer locks a fresh file): `acquire` does that check and
    retries, so `release` can unlink the file and nothing is left behind. The kernel drops the lock of a
    killed process; its file is then removed by the next install or remove of that model.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, timeout: float | None = None) -> FolderLock:
        """Take the lock; wait at most `timeout` seconds (None: as long as it takes), else LockBusy."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockBusy(str(self.path)) from None
                time.sleep(0.05)
                continue
            try:
                held, current = os.fstat(fd), os.stat(self.path)
                same = (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return self
            os.close(fd)  # the holder before us removed this file: lock the new one

    def release(self) -> None:
        """Remove the lock file (while still holding it), then let go."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def is_locked(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def folder_lock(folder: str) -> FolderLock:
    """The lock of one model folder (see FolderLock); `acquire(timeout)` raises LockBusy when busy."""
    models_dir().mkdir(parents=True, exist_ok=True)
    return FolderLock(lock_path(folder))


def partial_is_complete(partial: Path) -> bool:
    """A partial folder whose build finished (manifest written, source marker removed): ready to swap in."""
    return (partial / INFO_FILE).is_file() and not (partial / SOURCE_MARKER).exists()


def _model_id_of(root: Path) -> str | None:
    try:
        return ModelFolder(root).load_info().model_id
    except (UserError, OSError, ValueError):
        return None


def _rescue_user_data(src: Path, target: Path) -> list[str]:
    """Move lora/ and runs/ from `src` back into `target` where `target` has none (one rename each)."""
    moved = []
    for sub in (LORA_SUBDIR, RUNS_SUBDIR):
        if (src / sub).exists() and not (target / sub).exists():
            os.replace(src / sub, target / sub)
            moved.append(sub)
    return moved


# Older versions named these `.old-F-<pid>` and `.removing-F-<pid>` (never cleaned up): the pid suffix
# makes the folder name unambiguous, and the new prefixes above cannot be mistaken for them.
_LEGACY_LEFTOVER = re.compile(r"^\.(old|removing)-(?P<folder>.+)-\d+$")


def recover(folder: str) -> list[str]:
    """Finish or undo what a killed install, reinstall or remove of `folder` left; call with its lock held.

    The states a kill can leave (docs/robustness.md) and what is done with each:
    * `.old-F` and `F`: the swap finished but the old copy was not deleted: rescue user data, delete it.
    * `.old-F` and no `F`: killed between the two renames of the swap: the new build is complete (the
      swap starts only then), so it is renamed into place; the old copy is deleted as above.
    * `.partial-F` holding lora/ or runs/ while `F` exists: killed after moving them for the swap and
      before it: they go back to `F` (the partial build is then rebuilt or resumed as usual).
    * `.removing-F`: a remove was killed mid-delete: finish deleting it.
    Returns one line per thing done (the callers print them).
    """
    base = models_dir()
    target, partial, old = base / folder, partial_dir(folder), old_dir(folder)
    notes: list[str] = []
    if old.exists():
        if not target.exists():
            if partial_is_complete(partial):
                os.replace(partial, target)
                notes.append(f"finished the interrupted reinstall of {folder}")
            else:
                os.replace(old, target)
                notes.append(f"restored {folder} from an interrupted reinstall")
        if old.exists():
            if _model_id_of(old) == _model_id_of(target):
                _rescue_user_data(old, target)
            shutil.rmtree(old)
            notes.append(f"deleted the previous copy of {folder} left by an interrupted reinstall")
    if partial.exists() and target.exists():
        moved = _rescue_user_data(partial, target)
        if moved:
            notes.append(f"moved {' and '.join(f'{m}/' for m in moved)} back into {target}")
    leftovers = [base / f"{REMOVING_PREFIX}{folder}"]
    if base.is_dir():
        leftovers += [
            p
            for p in base.iterdir()
            if (m := _LEGACY_LEFTOVER.match(p.name)) and m.group("folder") == folder and p.is_dir()
        ]
    for p in leftovers:
        if p.exists():
            shutil.rmtree(p)
            notes.append(f"deleted {p.name}, left by an interrupted install or remove")
    return notes


def recover_all() -> list[str]:
    """`recover` every folder with leftovers whose lock is free right now (for `list`); busy ones wait."""
    base = models_dir()
    if not base.is_dir():
        return []
    names = set()
    for p in base.iterdir():
        if m := _LEGACY_LEFTOVER.match(p.name):
            names.add(m.group("folder"))
        for prefix in (OLD_PREFIX, REMOVING_PREFIX):
            if p.name.startswith(prefix):
                names.add(p.name[len(prefix) :])
        if p.name.startswith(PARTIAL_PREFIX) and any(
            (p / sub).exists() for sub in (LORA_SUBDIR, RUNS_SUBDIR)
        ):
            names.add(p.name[len(PARTIAL_PREFIX) :])  # user data moved for a swap that never happened
    notes: list[str] = []
    for name in sorted(names):
        lock = folder_lock(name)
        try:
            lock.acquire(timeout=0)
        except LockBusy:
            continue
        try:
            notes += recover(name)
        finally:
            lock.release()
    return notes


def remove_model(folder: str) -> Path:
    """Delete installed model `folder` (and any partial build of it) under its lock; returns what went.

    The lock comes first, so a remove can never pull a partial folder from under a running install:
    it answers "being installed" instead. The model leaves its place with one rename, so a kill during
    the (long) deletion leaves only `.removing-F`, which the next install, remove or list deletes.
    """
    base = models_dir()
    target, partial = base / folder, partial_dir(folder)
    lock = folder_lock(folder)
    try:
        lock.acquire(timeout=0.5)
    except LockBusy:
        raise UserError(
            f"{folder} is being installed right now (lock {lock.path}); wait for that to finish, then remove it"
        ) from None
    try:
        faults.point("remove.locked")
        recover(folder)
        if target.exists():
            trash = base / f"{REMOVING_PREFIX}{folder}"
            os.replace(target, trash)
            faults.point("remove.trashed")
            shutil.rmtree(trash)
            shutil.rmtree(partial, ignore_errors=True)
            return target
        if partial.exists():
            shutil.rmtree(partial)
            return partial
        raise ModelNotFoundError(
            f"model {folder!r} is not installed in {base}; run `llm-installer list` to see installed models"
        )
    finally:
        lock.release()


def human_size(n_bytes: float) -> str:
    """Bytes for people: '812 KiB', '3.4 MiB', '1.25 GiB' (never '0.0 GiB' for a small model)."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n_bytes >= scale:
            value = n_bytes / scale
            return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
    return f"{int(n_bytes)} bytes"


# ---- wrappers --------------------------------------------------------------------------------------

_WRAPPER = """#!/usr/bin/env bash
# {command} this model: runs `python -m llm_installer {command} <this folder> "$@"`.
# No `cd`: relative paths such as --data stay relative to where you run it from.
set -e
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
py={python}
[ -x "$py" ] || py="$(command -v python3)"
export PYTHONPATH={package_parent}"${{PYTHONPATH:+:$PYTHONPATH}}"
# -S -c (see ./llm-installer of the checkout): a Ctrl-C during start-up exits 130, never "Fatal Python error".
exec "$py" -S -c $'import sys\\ntry:\\n    from llm_installer.__main__ import run\\nexcept KeyboardInterrupt:\\n    sys.exit(130)\\nrun()' {command} "$here" "$@"
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
