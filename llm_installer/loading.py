"""Loading an installed model and its tokenizer/processor for training, chat and serving.

Installs always hold a plain transformers folder (GGUF sources are dequantised at install time), so
loading is transformers' own `from_pretrained`; this module only picks the right Auto class, dtype and
quantisation, and keeps `trust_remote_code` off unless asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}


def quiet_transformers() -> None:
    """Keep transformers' per-load chatter (weight-loading bars, config-alignment notes) off the user's
    screen; our own commands print what matters. `--debug` (LLM_INSTALLER_DEBUG) keeps it all."""
    import os

    if os.environ.get("LLM_INSTALLER_DEBUG"):
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def torch_dtype(name: str | None):
    """'bf16'/'fp16'/'fp32' (or torch names) -> torch.dtype; None/'auto' -> float32 on CPU."""
    import torch

    if not name or name == "auto":
        return torch.float32
    return getattr(torch, _DTYPES.get(name, name))


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    quiet_transformers()
    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)


def load_processor(model_dir: Path, *, trust_remote_code: bool = False):
    """The multimodal processor for vision-language models (None when the folder has none)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError):
        # e.g. Qwen2-VL's processor needs torchvision for its video processor
        return None


def load_model(
    model_dir: Path,
    *,
    task: str = "causal_lm",
    dtype: str | None = None,
    device_map: Any = None,
    quantization_config: Any = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """Load the model for `task` ('causal_lm', 'moe' or 'vision_language')."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if task == "vision_language":
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(str(model_dir), **kwargs)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
