"""Qwen2 / Qwen2.5 and Qwen3 text models: llama-style module names, ChatML template."""

from __future__ import annotations

from typing import Any

from llm_installer.handlers.modules import LLAMA_ATTENTION, LLAMA_MLP
from llm_installer.handlers.transformer import TransformerHandler


class Qwen2Handler(TransformerHandler):
    """Qwen2 and Qwen2.5 (q/k/v projections carry a bias; ChatML with <|im_end|>)."""

    name = "qwen2"
    families = ("qwen2", "qwen2.5")
    model_types = ("qwen2",)
    architectures = ("Qwen2ForCausalLM",)
    description = "Qwen2 / Qwen2.5 (ChatML)"
    attention_modules = LLAMA_ATTENTION
    mlp_modules = LLAMA_MLP
    best_seq_length = 2048
    default_chat_template = "chatml"
    end_of_turn_token = "<|im_end|>"


class Qwen3Handler(Qwen2Handler):
    """Qwen3 dense models (q/k norms; thinking blocks in the template)."""

    name = "qwen3"
    families = ("qwen3",)
    model_types = ("qwen3",)
    architectures = ("Qwen3ForCausalLM",)
    description = "Qwen3 dense models (ChatML, optional <think> blocks)"

    def get_training_parameters(self) -> dict[str, Any]:
        params = super().get_training_parameters()
        params["special_tokens"] = {
            **params["special_tokens"],
            "think_start": "<think>",
            "think_end": "</think>",
        }
        return params
