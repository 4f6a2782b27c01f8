"""The registry: pick the most specific handler for a model; user handlers first.

Matching (see BaseHandler's coverage attributes), best first:
  1. user handlers (folder, then entry points) before built-in ones;
  2. a `model_id_patterns` match (a qwen2 model named *-Coder is a code model) before a
     `model_type` / `architectures` match;
  3. higher `priority`.
A model nothing matches gets the generic handler of its kind — TransformerHandler (all linear layers
but the output head), MultimodalHandler or MoEHandler — with a warning, never a refusal.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from llm_installer.console import warn
from llm_installer.errors import UserError
from llm_installer.handlers.base import BaseHandler
from llm_installer.handlers.code import CodeHandler, StarCoder2Handler
from llm_installer.handlers.gemma import Gemma3TextHandler, GemmaHandler
from llm_installer.handlers.gpt import GPT2Handler, GPTNeoXHandler
from llm_installer.handlers.llama import LlamaHandler, MistralHandler
from llm_installer.handlers.moe import DeepSeekMoEHandler, MixtralHandler, MoEHandler, QwenMoEHandler
from llm_installer.handlers.multimodal import (
    Gemma3VisionHandler,
    LlavaHandler,
    MultimodalHandler,
    Qwen2VLHandler,
)
from llm_installer.handlers.phi import Phi3Handler
from llm_installer.handlers.qwen import Qwen2Handler, Qwen3Handler
from llm_installer.handlers.transformer import TransformerHandler
from llm_installer.model_info import ModelInfo

BUILTIN_HANDLERS: tuple[type[BaseHandler], ...] = (
    LlamaHandler,
    MistralHandler,
    Qwen2Handler,
    Qwen3Handler,
    GemmaHandler,
    Gemma3TextHandler,
    Phi3Handler,
    GPT2Handler,
    GPTNeoXHandler,
    CodeHandler,
    StarCoder2Handler,
    LlavaHandler,
    Qwen2VLHandler,
    Gemma3VisionHandler,
    MixtralHandler,
    QwenMoEHandler,
    DeepSeekMoEHandler,
)
GENERIC_HANDLERS: tuple[type[BaseHandler], ...] = (TransformerHandler, MultimodalHandler, MoEHandler)

_user_cache: dict[str, Any] = {"key": None, "handlers": []}
_warned: set[str] = set()


def _folder_state() -> tuple:
    from llm_installer.handlers.user import handlers_dirs

    state = []
    for folder in handlers_dirs():
        if folder.is_dir():
            for p in sorted(folder.glob("*.py")):
                try:
                    state.append((str(p), p.stat().st_mtime_ns))
                except OSError:
                    continue
    return (os.environ.get("LLM_INSTALLER_HANDLERS_DIR"), tuple(state))


def user_handlers(*, reload: bool = False) -> list[type[BaseHandler]]:
    """User handler classes (folder files re-read when they change; entry points once per process)."""
    from llm_installer.handlers.user import load_entry_point_handlers, load_folder_handlers

    key = _folder_state()
    if reload or _user_cache["key"] != key:
        if reload or "entry_points" not in _user_cache:
            _user_cache["entry_points"] = [h.cls for h in load_entry_point_handlers()]
        _user_cache["handlers"] = [h.cls for h in load_folder_handlers()] + _user_cache["entry_points"]
        _user_cache["key"] = key
    return list(_user_cache["handlers"])


def all_handlers() -> list[type[BaseHandler]]:
    """Every handler class: user ones first, then built-in families, then the generic ones."""
    return [*user_handlers(), *BUILTIN_HANDLERS, *GENERIC_HANDLERS]


def _task_family(info: ModelInfo) -> str:
    if info.task == "vision_language":
        return "vision_language"
    if info.task == "moe" or (info.num_experts or 0) > 1:
        return "moe"
    return "transformer"


def match_level(cls: type[BaseHandler], info: ModelInfo) -> int:
    """3 = model id pattern, 2 = exact model_type / architecture, 1 = normalised family, 0 = none."""
    kind_ok = cls.default_model_family == _task_family(info)
    mid = info.model_id.lower()
    # an id match must not put a text handler on a model of another kind (deepseek-coder-v2 is MoE)
    if cls.model_id_patterns and kind_ok and any(re.search(p, mid) for p in cls.model_id_patterns):
        return 3
    archs = set(info.architectures or []) | ({info.architecture} if info.architecture else set())
    if (info.model_type and info.model_type in cls.model_types) or archs & set(cls.architectures):
        return 2
    if info.family and info.family in cls.model_types and kind_ok:
        return 1
    return 0


def select_handler_class(info: ModelInfo) -> tuple[type[BaseHandler], str]:
    """(handler class, why) for a model."""
    users = user_handlers()
    best: tuple[tuple[int, int, int], type[BaseHandler]] | None = None
    for cls in [*users, *BUILTIN_HANDLERS]:
        level = match_level(cls, info)
        if not level:
            continue
        key = (1 if cls in users else 0, level, cls.priority)
        if best is None or key > best[0]:
            best = (key, cls)
    if best is not None:
        (is_user, level, _), cls = best
        # a matching subclass of the winner is more specific (StarCoder2Handler over CodeHandler)
        for other in [*users, *BUILTIN_HANDLERS]:
            if other is not cls and issubclass(other, cls) and match_level(other, info):
                cls = other
        how = {3: "model id", 2: f"model_type {info.model_type}", 1: f"family {info.family}"}[level]
        return cls, f"{'user handler' if is_user else 'built-in'} matched by {how}"
    kind = _task_family(info)
    generic = {"vision_language": MultimodalHandler, "moe": MoEHandler}.get(kind, TransformerHandler)
    what = info.model_type or info.architecture or "unknown"
    return generic, f"no handler for {what}: generic {generic.name} handler"


def get_handler(model_info: ModelInfo | Mapping[str, Any], name: str | None = None) -> BaseHandler:
    """The most specific handler for `model_info` (user handlers first); `name` forces one by name."""
    info = ModelInfo.coerce(model_info)
    if name:
        return handler_by_name(name)(info)
    cls, why = select_handler_class(info)
    if cls in GENERIC_HANDLERS:
        what = info.model_type or info.architecture or "unknown"
        if what not in _warned:
            _warned.add(what)
            warn(
                f"no handler knows architecture {what} ({info.model_id}); using the generic {cls.name} handler "
                "(LoRA on all linear layers except the output head). Add a handler to customise it: "
                "see docs/handlers.md"
            )
    return cls(info)


def handler_by_name(name: str) -> type[BaseHandler]:
    """A handler class by its `name` (or class name), user handlers first."""
    for cls in all_handlers():
        if name in (cls.name, cls.__name__):
            return cls
    known = ", ".join(sorted({c.name for c in all_handlers()}))
    raise UserError(f"no handler named {name!r}; known handlers: {known}")


def explain_choice(model_info: ModelInfo | Mapping[str, Any]) -> str:
    """One line: which handler a model gets and why (for `show` and `train --dry-run`)."""
    info = ModelInfo.coerce(model_info)
    cls, why = select_handler_class(info)
    return f"{cls.name} ({cls.__name__}, {cls.origin}): {why}"
