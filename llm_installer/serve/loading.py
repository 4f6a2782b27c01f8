"""Loading what the engine serves: an installed model folder, its tokenizer, and the adapter in lora/
(or the one --lora names) as the named PEFT adapter "lora", optionally merged. Each step is a function
so `Engine.load` reads as the list of them; torch, transformers and peft are imported lazily."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_installer.errors import UserError

ADAPTER_NAME = "lora"
SERVABLE_TASKS = ("causal_lm", "moe", "vision_language", "unknown")


def check_servable(folder: Any, info: Any) -> None:
    """Refuse a model that does not generate text (an embedding or classification model)."""
    if info.task not in SERVABLE_TASKS:
        raise UserError(
            f"model {folder.name} is a {info.task} model; chat and serving support text-generating models "
            "(causal LM, MoE, vision-language as text-only)"
        )


def adapter_dir(folder: Any, lora: str | Path | None, no_lora: bool, merge_adapter: bool) -> Path | None:
    """The adapter folder to serve: --lora's, else the model's lora/ (unless --no-lora), else none."""
    if lora is not None and no_lora:
        raise UserError("--lora and --no-lora contradict each other; pass one of them")
    lora_dir: Path | None = None
    if lora is not None:
        lora_dir = Path(lora).expanduser().resolve()
        if not (lora_dir / "adapter_config.json").is_file():
            raise UserError(f"--lora {lora}: no adapter_config.json there; point it at a PEFT adapter folder")
    elif not no_lora and folder.has_adapter:
        lora_dir = folder.lora_dir
    if merge_adapter and lora_dir is None:
        raise UserError("--merge-adapter needs an adapter: train one first or pass --lora PATH")
    return lora_dir


def default_dtype() -> str:
    """The dtype serving loads in on this machine: `precision.serving_precision`, the one rule."""
    from llm_installer import hardware
    from llm_installer.precision import serving_precision

    return serving_precision(hardware.detect())


def load_model(folder: Any, info: Any, *, dtype: str, trust: bool) -> tuple[Any, Any]:
    """(model in eval mode on the GPU if there is one, tokenizer) of an installed folder."""
    import torch

    from llm_installer import loading

    tokenizer = loading.load_tokenizer(folder.model_dir, trust_remote_code=trust)
    task = info.task if info.task in ("moe", "vision_language") else "causal_lm"
    model = loading.load_model(folder.model_dir, task=task, dtype=dtype, trust_remote_code=trust)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, tokenizer


def attach_adapter(model: Any, folder: Any, lora_dir: Path, merge: bool) -> Any:
    """The model with the adapter attached as "lora" (or merged into its weights); a mismatch is one line."""
    from llm_installer.train.lora_setup import load_adapter

    try:
        model = load_adapter(model, lora_dir, adapter_name=ADAPTER_NAME, is_trainable=False)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise UserError(f"adapter {lora_dir} does not fit model {folder.name}: {exc}") from None
    return model.merge_and_unload() if merge else model


def context_length(info: Any, model: Any) -> int:
    """The model's context: the install's record, else the config's max_position_embeddings, else 2048."""
    cfg = getattr(model, "config", None)
    for value in (getattr(info, "context_length", None), getattr(cfg, "max_position_embeddings", None)):
        if value:
            return int(value)
    return 2048


def adapter_info(lora_dir: Path | None) -> dict[str, Any] | None:
    """The parts of the adapter's training record that /info shows (None without a readable one)."""
    if lora_dir is None:
        return None
    path = lora_dir / "adapter_info.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keep = ("base_model", "handler", "method", "mode", "dataset", "metrics", "stop_reason", "created")
    return {k: data[k] for k in keep if k in data}


def describe(info: Any, model: Any, lora_dir: Path | None, dtype: str, chat_format: Any) -> dict[str, Any]:
    """The engine's `info`: what /info and the web page show about the loaded model."""
    return {
        "model_id": info.model_id,
        "family": info.family or info.model_type,
        "parameters": info.num_parameters,
        "source": info.source,
        "adapter": str(lora_dir) if lora_dir else None,
        "adapter_info": adapter_info(lora_dir),
        "dtype": str(dtype),
        "device": str(next(model.parameters()).device),
        "chat_format": {k: v for k, v in chat_format.to_dict().items() if k != "template"},
    }


def mixes_adapters(model: Any) -> bool:
    """Whether PEFT can run base and adapter rows in one batch (`adapter_names`) for this adapter: not with
    DoRA layers nor with fused-expert wrappers (MoE), which refuse it; those batches take one kind of row."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    for module in model.modules():
        if isinstance(module, ParamWrapper):
            return False
        if isinstance(module, LoraLayer) and any(getattr(module, "lora_magnitude_vector", {}) or {}):
            return False
    return True
