"""Training parameters with the source of each value, for `show NAME --training` and `train --dry-run`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llm_installer.model_info import ModelInfo


def training_parameters_with_sources(model_info: ModelInfo | Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """[(key, value, source)] from the model's handler, after fitting precision to this machine.

    Sources name the class or rule that set each value: "base default", "TransformerHandler",
    "LlamaHandler", "size rule (<1B)", "hardware (CPU: bf16 vs fp32 measured at plan time)", "MoEHandler", ...
    """
    from llm_installer.handlers.registry import get_handler

    return get_handler(model_info).training_parameters_with_sources()


def handler_summary(model_info: ModelInfo | Mapping[str, Any]) -> dict[str, str]:
    """Which handler a model gets, where it comes from and why."""
    from llm_installer.handlers.registry import select_handler_class

    info = ModelInfo.coerce(model_info)
    cls, why = select_handler_class(info)
    return {"handler": cls.name, "class": cls.__name__, "origin": cls.origin, "why": why}


def format_value(value: Any) -> str:
    """A compact one-line rendering of a parameter value for tables."""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else "[]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "; ".join(f"{k}: {format_value(v)}" for k, v in value.items())
    if value is None:
        return "None (auto-detect)"
    return str(value)


def render_training_parameters(model_info: ModelInfo | Mapping[str, Any]):
    """A rich Table of the resolved training parameters and why each has its value."""
    from rich.table import Table

    summary = handler_summary(model_info)
    table = Table(title=f"Training parameters (handler {summary['handler']}: {summary['why']})")
    table.add_column("parameter")
    table.add_column("value", overflow="fold")
    table.add_column("source")
    for key, value, source in training_parameters_with_sources(model_info):
        table.add_row(key, format_value(value), source)
    return table
