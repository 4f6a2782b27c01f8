"""User handlers: `*.py` files in a folder and the `llm_installer.handlers` entry point group.

Folder: `$LLM_INSTALLER_HANDLERS_DIR` (several folders separated by `os.pathsep`), else
`$XDG_CONFIG_HOME/llm-installer/handlers`, else `~/.config/llm-installer/handlers`.

A file may be written exactly like the seed's examples — a class subclassing `TransformerHandler`,
`MultimodalHandler`, `MoEHandler` or `BaseHandler`, using `Dict`/`Any`, with no import lines: it is
executed with those names, every `typing` name, `logging`, and a lazy `torch` pre-seeded in its
namespace. Imports of its own work too. Every handler class *defined* in the file is registered.

Which models it covers: class attributes `model_types`, `architectures`, `model_id_patterns` and
`priority` (see BaseHandler). A class that declares none of them covers the `model_type` named by its
file name (`llama.py` -> llama), so dropping the seed's Example 1 into `llama.py` overrides Llama.
A file that fails to load is reported as a warning naming it and skipped: one broken file must not stop
every command.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_installer.console import warn

ENTRY_POINT_GROUP = "llm_installer.handlers"


class _LazyModule(types.ModuleType):
    """A module imported on first attribute access (keeps `torch` out of files that never use it)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_name"] = name

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__dict__["_lazy_name"])
        return getattr(module, attr)


def handlers_dirs() -> list[Path]:
    """The user handler folders, in precedence order."""
    env = os.environ.get("LLM_INSTALLER_HANDLERS_DIR")
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [Path(base) / "llm-installer" / "handlers"]


def _seed_namespace(module_name: str, path: Path) -> dict[str, Any]:
    from llm_installer.handlers.base import BaseHandler
    from llm_installer.handlers.moe import MoEHandler
    from llm_installer.handlers.multimodal import MultimodalHandler
    from llm_installer.handlers.transformer import TransformerHandler

    ns: dict[str, Any] = {name: getattr(typing, name) for name in typing.__all__ if hasattr(typing, name)}
    ns.update(
        {
            "__name__": module_name,
            "__file__": str(path),
            "__builtins__": __builtins__,
            "BaseHandler": BaseHandler,
            "TransformerHandler": TransformerHandler,
            "MultimodalHandler": MultimodalHandler,
            "MoEHandler": MoEHandler,
            "logging": logging,
            "torch": _LazyModule("torch"),
        }
    )
    return ns


@dataclass
class LoadedHandler:
    cls: type
    origin: str  # "user file PATH" | "entry point NAME (DIST)"


def _handler_classes(ns: dict[str, Any], module_name: str) -> list[type]:
    from llm_installer.handlers.base import BaseHandler

    return [
        obj
        for obj in ns.values()
        if inspect.isclass(obj) and issubclass(obj, BaseHandler) and obj.__module__ == module_name
    ]


def _declares_coverage(cls: type) -> bool:
    return any(attr in cls.__dict__ for attr in ("model_types", "architectures", "model_id_patterns"))


def load_file(path: Path) -> list[LoadedHandler]:
    """Execute one handler file (seed-style names pre-seeded) and return its handler classes."""
    module_name = f"llm_installer_user_handlers.{path.stem}"
    try:
        source = path.read_text(encoding="utf-8")
        code = compile(source, str(path), "exec")
        module = types.ModuleType(module_name)
        module.__dict__.update(_seed_namespace(module_name, path))
        module.__file__ = str(path)
        sys.modules[module_name] = module  # dataclasses/pickling look modules up by name
        exec(code, module.__dict__)  # noqa: S102 - the user's own handler file, by design
    except Exception as exc:  # a user's file: report it, keep going
        sys.modules.pop(module_name, None)
        warn(f"user handler file {path} failed to load ({type(exc).__name__}: {exc}); skipped")
        return []
    out = []
    for cls in _handler_classes(module.__dict__, module_name):
        if not _declares_coverage(cls):
            cls.model_types = (path.stem,)
        cls.origin = f"user file {path}"
        out.append(LoadedHandler(cls, cls.origin))
    if not out:
        warn(
            f"user handler file {path} defines no handler class (subclass TransformerHandler or BaseHandler)"
        )
    return out


def load_folder_handlers() -> list[LoadedHandler]:
    """Handlers from every `*.py` in the user folders (sorted by name)."""
    out: list[LoadedHandler] = []
    for folder in handlers_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.py")):
            if not path.name.startswith("_"):
                out.extend(load_file(path))
    return out


def load_entry_point_handlers() -> list[LoadedHandler]:
    """Handlers registered by installed packages under the `llm_installer.handlers` entry point group.

    An entry point may name a handler class or a module (every handler class defined in it counts).
    """
    from llm_installer.handlers.base import BaseHandler

    out: list[LoadedHandler] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
        try:
            obj = ep.load()
        except Exception as exc:
            warn(
                f"handler entry point {ep.name} ({dist}) failed to load ({type(exc).__name__}: {exc}); skipped"
            )
            continue
        classes: list[type]
        if inspect.isclass(obj) and issubclass(obj, BaseHandler):
            classes = [obj]
        elif inspect.ismodule(obj):
            classes = _handler_classes(vars(obj), obj.__name__)
        else:
            warn(f"handler entry point {ep.name} ({dist}) is neither a handler class nor a module; skipped")
            continue
        for cls in classes:
            if not _declares_coverage(cls):
                cls.model_types = (ep.name,)
            cls.origin = f"entry point {ep.name} ({dist})"
            out.append(LoadedHandler(cls, cls.origin))
    return out
