"""Which files the studio may touch: the models folder, its own upload folder and the bundled examples.

Everything the page sends that names a file goes through `resolve_data_path`, `model_folder` or
`save_upload`; nothing else opens a path from a request. A path is given relative to one of the roots
(`uploads/x.jsonl`, `examples/fictional_facts.jsonl`, `models/NAME/...`), never absolute and never with
`..`; after symlinks are resolved it must still lie inside its root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llm_installer import store
from llm_installer.errors import UserError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
STUDIO_DIR = ".studio"  # inside the models folder; dot-prefixed, so `list` never takes it for a model


def studio_dir() -> Path:
    return store.models_dir() / STUDIO_DIR


def uploads_dir() -> Path:
    return studio_dir() / "uploads"


def examples_dir() -> Path:
    from llm_installer.data.loaders import EXAMPLES_DIR

    return EXAMPLES_DIR


def roots() -> dict[str, Path]:
    """The three places a data path may point into, by the prefix the page uses."""
    return {"uploads": uploads_dir(), "examples": examples_dir(), "models": store.models_dir()}


def _inside(path: Path, root: Path) -> bool:
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    return real == real_root or real_root in real.parents


def resolve_data_path(ref: str) -> Path:
    """`uploads/NAME`, `examples/NAME` or `models/...` -> the real file; anything else is a UserError."""
    ref = (ref or "").strip()
    allowed = ", ".join(f"{k}/" for k in roots())
    if not ref:
        raise UserError(f"no data file given: upload one or pick one under {allowed}")
    if ref.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", ref):
        raise UserError(f"{ref}: absolute paths are not accepted; pick a file under {allowed}")
    parts = ref.replace("\\", "/").split("/")
    if ".." in parts:
        raise UserError(f"{ref}: '..' is not allowed in a path; pick a file under {allowed}")
    root_name, rest = parts[0], [p for p in parts[1:] if p not in ("", ".")]
    root = roots().get(root_name)
    if root is None or not rest:
        raise UserError(f"{ref}: not a studio path; pick a file under {allowed}")
    path = root.joinpath(*rest)
    if not _inside(path, root):
        raise UserError(f"{ref}: it leads outside {root_name}/ (a symlink?); the studio reads only {allowed}")
    if root_name == "models" and STUDIO_DIR in rest[:1]:
        raise UserError(f"{ref}: pick uploads under uploads/, not inside the studio's own folder")
    if not path.is_file():
        raise UserError(f"{ref}: no such file")
    return path


def studio_path(path: Path) -> str:
    """The page's name for a real file under one of the roots (the inverse of `resolve_data_path`)."""
    real = Path(os.path.realpath(path))
    for name, root in roots().items():
        real_root = Path(os.path.realpath(root))
        if real_root in real.parents:
            return f"{name}/{real.relative_to(real_root).as_posix()}"
    raise UserError(f"{path} is not under a studio folder")


def list_data_files() -> list[str]:
    """Data files the page may offer: the uploads and the bundled examples (model folders hold models)."""
    out: list[str] = []
    for name in ("uploads", "examples"):
        root = roots()[name]
        if root.is_dir():
            out += [f"{name}/{p.name}" for p in sorted(root.iterdir()) if p.is_file() and _inside(p, root)]
    return out


def model_folder(name: str) -> store.ModelFolder:
    """An installed model by its folder name only: no path, id or symlink that leads elsewhere."""
    name = (name or "").strip()
    if not _NAME.match(name):
        raise UserError(f"{name!r} is not a model name of the models folder (pick one from the table)")
    base = store.models_dir()
    root = base / name
    if not root.is_dir() or root.is_symlink() or not _inside(root, base):
        raise UserError(f"no installed model named {name} in {base}")
    return store.ModelFolder(root)


def upload_name(filename: str) -> str:
    """A safe file name for an upload: its last component, letters, digits, '.', '_' and '-' only."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    if not _NAME.match(base):
        raise UserError(
            f"{filename!r}: an upload name must start with a letter or digit and use only letters, digits, "
            "'.', '_' and '-'"
        )
    return base


class UploadTooLarge(UserError):
    """An upload over the studio's limit (HTTP 413)."""

    status = 413


def open_upload(filename: str) -> tuple[Path, Path]:
    """(temporary file, final path) for an upload; the caller writes the temp and renames it."""
    final = uploads_dir() / upload_name(filename)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{id(final)}.part")
    return tmp, final
