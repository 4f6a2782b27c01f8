"""Install a model into the store from any source, atomically.

`install_model(ref)` resolves `ref` (the bundled name, a .gguf file, a local folder or a Hub id), builds
the install in `<models_dir>/.partial-<folder>`, detects the model, writes the manifest and the
train.sh/start.sh wrappers, and only then renames the folder into place, so a failed or interrupted
install never leaves a half-written model where `list`, `train` or `start` would pick it up. A re-run
after Ctrl-C reuses the partial folder of a Hub download: files already complete are not fetched again.
A file lock keeps two installs of the same model from racing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from llm_installer import faults, store
from llm_installer.console import err_console
from llm_installer.errors import InvalidNameError, SourceError, UserError, is_disk_full
from llm_installer.model_info import ModelInfo
from llm_installer.sources import bundled

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SOURCE_MARKER = store.SOURCE_MARKER  # in a partial folder: which source it was being built from


@dataclass(frozen=True)
class ResolvedRef:
    """What a user's model reference points at."""

    kind: str  # bundled | gguf | local | hub
    ref: str
    model_id: str
    default_name: str
    path: Path | None = None


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or ref.endswith(".gguf") or ref.count("/") > 1 or "\\" in ref


def resolve_ref(ref: str) -> ResolvedRef:
    """Classify `ref`: bundled name, existing .gguf file, existing local folder, else a Hub id."""
    ref = ref.strip()
    if not ref:
        raise UserError(
            "no model given: pass a Hub id ('org/name'), a folder, a .gguf file or smollm2-135m-instruct"
        )
    if ref == bundled.BUNDLED_NAME:
        return ResolvedRef("bundled", ref, bundled.BUNDLED_UPSTREAM_ID, bundled.BUNDLED_NAME)
    path = Path(ref).expanduser()
    if not store.path_exists(path):  # also False for a name too long to be a path: it is a name then
        path = Path("/nonexistent-llm-installer-ref")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SourceError(
                f"{ref} is a file but not a .gguf file; pass a .gguf file, a model folder or a Hub id"
            )
        return ResolvedRef("gguf", ref, path.stem, path.stem, path.resolve())
    if path.is_dir():
        resolved = path.resolve()
        return ResolvedRef("local", ref, resolved.name, resolved.name, resolved)
    if _looks_like_path(ref):
        raise SourceError(f"{ref}: no such folder or .gguf file; check the path")
    store.folder_name(ref)  # refuses traversal and odd characters with the store's own message
    if not _HUB_ID.match(ref):
        raise SourceError(
            f"{ref!r} is not the bundled model ({bundled.BUNDLED_NAME}), an existing folder or .gguf file, "
            "nor a Hub id ('org/name')"
        )
    return ResolvedRef("hub", ref, ref, ref)


def _say(message: str) -> None:
    err_console.print(message, soft_wrap=True, highlight=False)


def _free_bytes(where: Path) -> int:
    p = Path(where)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _check_disk(needed_bytes: int, where: Path) -> None:
    free = _free_bytes(where)
    if needed_bytes > free * 0.98:
        raise UserError(
            f"not enough disk space in {where}: the model needs {store.human_size(needed_bytes)}, "
            f"{store.human_size(free)} free; free some space or pass --models-dir on a larger disk"
        )


def _downloaded_anything(partial: Path) -> bool:
    """Whether a Hub partial folder holds any downloaded bytes (a finished file or huggingface_hub's
    `.incomplete` part): only then is it worth keeping for a resume."""
    model_dir = partial / store.MODEL_SUBDIR
    if not model_dir.is_dir():
        return False
    for p in model_dir.rglob("*"):
        try:
            if (
                p.is_file()
                and p.stat().st_size > 0
                and (p.suffix == ".incomplete" or ".cache" not in p.parts)
            ):
                return True
        except OSError:
            continue
    return False


def _prepare_partial(partial: Path, marker: dict) -> None:
    """Reuse a partial folder built from the same source (a resumed Hub download), else start clean."""
    marker_path = partial / _SOURCE_MARKER
    if partial.exists():
        try:
            same = json.loads(marker_path.read_text(encoding="utf-8")) == marker
        except (OSError, ValueError):
            same = False
        if same and marker.get("kind") == "hub":
            _say(f"resuming the earlier install in {partial}")
            return
        shutil.rmtree(partial)  # `recover` ran first, so no lora/ or runs/ is in here
    (partial / store.MODEL_SUBDIR).mkdir(parents=True)
    marker_path.write_text(json.dumps(marker), encoding="utf-8")


def _fetch_hub(
    src: ResolvedRef, revision: str | None, dest: Path, *, allow_pickle: bool, trust_remote_code: bool
):
    from llm_installer.detect import read_json
    from llm_installer.sources import hub
    from llm_installer.sources.files import select_files

    info = hub.model_info(src.ref, revision)
    sha = info.sha
    siblings = {s.rfilename: (s.size or 0) for s in (info.siblings or [])}
    if "config.json" not in siblings and "model_index.json" not in siblings:
        ggufs = [n for n in siblings if n.endswith(".gguf")]
        hint = (
            f"; it holds GGUF files ({ggufs[0]}, ...): download one and install the .gguf file"
            if ggufs
            else ""
        )
        raise SourceError(f"{src.ref} has no config.json, so it is not a transformers model{hint}")
    sel = select_files(list(siblings), allow_pickle=allow_pickle, what=src.ref)
    if not sel.weights and "model_index.json" not in siblings:
        raise SourceError(f"{src.ref} has no weight files (*.safetensors) at revision {revision or 'main'}")
    if "config.json" in siblings:  # before any weights: refuse remote code early
        hub.download_file(src.ref, "config.json", sha, dest)
        _check_remote_code(read_json(dest / "config.json"), src.ref, trust_remote_code)
    _check_disk(sum(siblings[f] for f in sel.files), dest)
    faults.point("install.fetching")
    skipped = len(sel.skipped)
    _say(
        f"downloading {len(sel.files)} files of {src.ref} at {revision or 'main'} ({sha[:10]})"
        + (f"; skipping {skipped} not needed" if skipped else "")
    )
    hub.download(src.ref, sha, sel.files, dest, sizes=siblings)
    return sha


def _check_remote_code(config: dict, what: str, trust_remote_code: bool) -> None:
    from llm_installer.detect import _known_model_types

    if (
        config.get("auto_map")
        and str(config.get("model_type")) not in _known_model_types()
        and not trust_remote_code
    ):
        raise SourceError(
            f"{what} needs custom Python code from its repository (model_type {config.get('model_type')!r} is not "
            "built into transformers); read that code, then pass --trust-remote-code to allow it"
        )


def _fetch(
    src: ResolvedRef,
    revision: str | None,
    dest: Path,
    *,
    link: bool,
    allow_pickle: bool,
    trust_remote_code: bool,
) -> str | None:
    """Put the model's files into `dest` (partial/model); returns the revision to record."""
    if src.kind == "hub":
        return _fetch_hub(src, revision, dest, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if src.kind == "local":
        from llm_installer.detect import read_json
        from llm_installer.sources.local import copy_files, select_local

        assert src.path is not None
        sel = select_local(src.path, allow_pickle=allow_pickle)
        if (src.path / "config.json").is_file():
            _check_remote_code(read_json(src.path / "config.json"), str(src.path), trust_remote_code)
        if not link:
            _check_disk(sum((src.path / f).stat().st_size for f in sel.files), dest)
        faults.point("install.fetching")
        _say(f"{'linking' if link else 'copying'} {len(sel.files)} files from {src.path}")
        copy_files(src.path, sel.files, dest, link=link)
        return None
    from llm_installer.sources.gguf import convert_gguf

    if src.kind == "bundled":
        gguf_path = bundled.bundled_gguf_path()
        from importlib import metadata

        rev = f"{bundled.BUNDLED_DIST}=={metadata.version(bundled.BUNDLED_DIST)}"
    else:
        from llm_installer.sources.gguf import read_gguf_metadata

        assert src.path is not None
        gguf_path, rev = src.path, None
        read_gguf_metadata(gguf_path)  # a clear error for a file that is not GGUF, before loading anything
    _check_disk(gguf_path.stat().st_size * 8, dest)  # dequantised to float32
    faults.point("install.fetching")
    with err_console.status(f"dequantising {gguf_path.name} to safetensors (about 20 s for 135M parameters)"):
        try:
            convert_gguf(gguf_path, dest)
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            raise SourceError(
                f"cannot convert {gguf_path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                "transformers must support the GGUF architecture and quantisation"
            ) from None
    return rev


def _write_info(partial: Path, info: ModelInfo, src: ResolvedRef, revision: str | None) -> None:
    from llm_installer import __version__

    files = store.build_manifest_files(partial / store.MODEL_SUBDIR)
    manifest = {
        "source": src.kind,
        "ref": src.ref if src.kind in ("hub", "bundled") else str(src.path),
        "revision": revision,
        "installed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
        "tool_version": __version__,
    }
    payload = {"info": info.model_dump(mode="json"), "manifest": manifest}
    tmp = partial / (store.INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    os.replace(tmp, partial / store.INFO_FILE)


class _NoInterrupt:
    """Hold Ctrl-C (SIGINT, SIGTERM) for the few renames of a swap; it takes effect right after them.

    A kill -9 cannot be held, which is what `store.recover` is for; but Ctrl-C in the middle of a swap
    need not leave anything to recover. Only the main thread can block signals for itself.
    """

    def __enter__(self) -> None:
        self._blocked = threading.current_thread() is threading.main_thread() and hasattr(
            signal, "pthread_sigmask"
        )
        if self._blocked:
            self._old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

    def __exit__(self, *exc: object) -> None:
        if self._blocked:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old)


def _move_into_place(partial: Path, target: Path, model_id: str) -> None:
    """Rename the finished partial folder to `target`; an old install is swapped out, then deleted.

    A reinstall of the same model keeps its trained adapter (`lora/`) and `runs/`. Each step is one
    rename, in an order `store.recover` can finish from any point a kill stops it at:
    lora/ and runs/ into the new folder, old install to `.replaced-F`, new folder to `F`, delete the old.
    """
    with _NoInterrupt():
        if not target.exists():
            os.replace(partial, target)
            return
        old_folder = store.ModelFolder(target)
        try:
            same_model = old_folder.load_info().model_id == model_id
        except UserError:
            same_model = False
        if same_model:
            for sub in (store.LORA_SUBDIR, store.RUNS_SUBDIR):
                if (target / sub).exists():
                    os.replace(target / sub, partial / sub)
        faults.point("swap.user-data-moved")
        old = store.old_dir(target.name)
        os.replace(target, old)
        faults.point("swap.old-aside")
        os.replace(partial, target)
        faults.point("swap.new-in-place")
    shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class InstallResult:
    """What `install` did: the model folder, and whether anything was installed (False for --exist-ok
    finding it already there)."""

    folder: store.ModelFolder
    installed: bool


def install_model(ref: str, **kwargs) -> store.ModelFolder:
    """Install `ref` and return its ModelFolder (`install` says also whether anything was installed)."""
    return install(ref, **kwargs).folder


def _source_and_folder(
    ref: str, name: str | None, revision: str | None, link: bool, force: bool, exist_ok: bool
):
    """(the resolved source, the models-folder name) after refusing options that contradict it."""
    if force and exist_ok:
        raise UserError("--force and --exist-ok contradict each other: pass only one")
    folder = store.folder_name(name) if name is not None else None
    src = resolve_ref(ref)
    if revision is not None and src.kind != "hub":
        raise UserError(f"--revision applies only to Hub models; {ref} is a {src.kind} source")
    if link and src.kind != "local":
        raise UserError(f"--link applies only to a local model folder; {ref} is a {src.kind} source")
    if folder is None:
        try:
            folder = store.folder_name(src.default_name)
        except InvalidNameError:
            raise InvalidNameError(
                f"cannot use {src.default_name!r} as a model name (letters, digits, '.', '_' and '-' only); "
                "pass --name"
            ) from None
    return src, folder


@contextlib.contextmanager
def _install_lock(folder: str) -> Iterator[None]:
    """Hold the folder's install lock; a second install of the same name is refused at once."""
    lock = store.folder_lock(folder)
    try:
        lock.acquire(timeout=0.5)
    except store.LockBusy:
        raise UserError(
            f"another install of {folder} is running (lock {store.lock_path(folder)}); wait for it to finish"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _build(
    src: ResolvedRef,
    ref: str,
    partial: Path,
    *,
    name: str | None,
    revision: str | None,
    link: bool,
    allow_pickle: bool,
    trust_remote_code: bool,
) -> ModelInfo:
    """Fill the partial folder: the model's files, its detected info, the manifest and the wrappers."""
    from llm_installer.detect import detect

    model_dir = partial / store.MODEL_SUBDIR
    _prepare_partial(partial, {"kind": src.kind, "ref": src.ref, "revision": revision, "link": link})
    recorded_revision = _fetch(
        src, revision, model_dir, link=link, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    # Hub and bundled models keep their upstream id; a folder or GGUF file is known by its --name.
    model_id = src.model_id if src.kind in ("hub", "bundled") or name is None else name.strip()
    info = detect(model_dir, model_id=model_id, source=src.kind, revision=recorded_revision)
    if info.trust_remote_code and not trust_remote_code:
        raise SourceError(
            f"{ref} needs custom Python code from its repository; read it, then pass --trust-remote-code"
        )
    _write_info(partial, info, src, recorded_revision)
    store.write_wrappers(partial)
    (partial / _SOURCE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(model_dir / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
    return info


def _after_failure(exc: BaseException, src: ResolvedRef, partial: Path, folder: str) -> None:
    """Keep a Hub download cut by Ctrl-C, the network or a full disk so the next run resumes it (only
    if something was downloaded), clean up anything else; a full disk becomes one line."""
    full = is_disk_full(exc)
    resumable = isinstance(exc, KeyboardInterrupt) or getattr(exc, "resumable", False) or full
    keep = src.kind == "hub" and resumable and _downloaded_anything(partial)
    if keep:
        _say(f"the partial download is kept in {partial}; run the same command again to resume")
    else:
        shutil.rmtree(partial, ignore_errors=True)
    if full:
        raise UserError(
            f"the disk of {store.models_dir()} is full ({store.human_size(_free_bytes(partial))} free) "
            f"while installing {folder}; free some space or pass --models-dir on a larger disk"
            + (", then run the same command again to resume" if keep else "")
        ) from None


def install(
    ref: str,
    *,
    name: str | None = None,
    revision: str | None = None,
    force: bool = False,
    link: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    exist_ok: bool = False,
) -> InstallResult:
    """Install `ref` into the models folder (see the module docstring)."""
    src, folder = _source_and_folder(ref, name, revision, link, force, exist_ok)
    target = store.models_dir() / folder
    with _install_lock(folder):
        faults.point("install.locked")
        for note in store.recover(folder):
            _say(note)
        if target.exists():
            existing = store.ModelFolder(target)
            if exist_ok and store.folder_status(existing) == "ready":
                return InstallResult(existing, installed=False)
            if not force and not exist_ok:
                raise UserError(
                    f"{folder} is already installed in {target}; pass --force to reinstall it "
                    "(or --exist-ok to keep it)"
                )
        partial = store.partial_dir(folder)
        try:
            info = _build(
                src,
                ref,
                partial,
                name=name,
                revision=revision,
                link=link,
                allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code,
            )
        except BaseException as exc:
            _after_failure(exc, src, partial, folder)
            raise
        faults.point("install.complete")
        _move_into_place(partial, target, info.model_id)
        return InstallResult(store.ModelFolder(target), installed=True)
