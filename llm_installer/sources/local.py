"""Local folder source: a transformers folder (config.json + weights) copied or linked into the store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llm_installer.errors import SourceError
from llm_installer.sources.files import Selection, select_files


def list_folder(folder: Path) -> list[str]:
    """Relative POSIX paths of every file under `folder` (hidden folders such as .git left out)."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts[:-1]):
            out.append(rel.as_posix())
    return out


def select_local(folder: Path, *, allow_pickle: bool) -> Selection:
    """Check `folder` is a model folder and choose its files (same rules as for the Hub)."""
    if not (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
        raise SourceError(
            f"{folder} has no config.json; point at a transformers model folder (config.json + weights)"
        )
    sel = select_files(list_folder(folder), allow_pickle=allow_pickle, what=str(folder))
    if not sel.weights:
        raise SourceError(
            f"{folder} has no weight files (*.safetensors); it holds only {len(sel.files)} config files"
        )
    return sel


def copy_files(folder: Path, files: list[str], dest: Path, *, link: bool) -> None:
    """Copy (or symlink with `link`) `files` of `folder` into `dest`, with a progress bar over bytes."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from llm_installer.console import err_console

    total = sum((folder / f).stat().st_size for f in files)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("linking" if link else "copying", total=total)
        for rel in files:
            src = (folder / rel).resolve()
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() or target.is_symlink():
                target.unlink()
            if link:
                os.symlink(src, target)
            else:
                try:
                    shutil.copy2(src, target)
                except OSError as exc:
                    raise SourceError(
                        f"cannot copy {src}: {exc.strerror}; check the disk space and permissions"
                    ) from None
            progress.update(task, advance=src.stat().st_size)
