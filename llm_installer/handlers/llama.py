"""Llama (1/2/3.x, and SmolLM2 which is a llama) and Mistral: q/k/v/o_proj + gate/up/down_proj."""

from __future__ import annotations

from typing import Any

from llm_installer.handlers.modules import LLAMA_ATTENTION, LLAMA_MLP
from llm_installer.handlers.transformer import TransformerHandler

__all__ = ["LLAMA_ATTENTION", "LLAMA_MLP", "LlamaHandler", "MistralHandler"]  # names kept importable here


class LlamaHandler(TransformerHandler):
    """Llama 1/2/3.x and llama-shaped models (SmolLM, TinyLlama, DeepSeek-Coder v1...)."""

    name = "llama"
    families = ("llama", "llama3")
    model_types = ("llama",)
    architectures = ("LlamaForCausalLM",)
    description = "Llama 1/2/3.x and llama-shaped models (SmolLM2, TinyLlama)"
    attention_modules = LLAMA_ATTENTION
    mlp_modules = LLAMA_MLP
    best_seq_length = 2048
    default_chat_template = "llama3"  # used only when the tokenizer has Llama-3's header tokens

    def get_training_parameters(self) -> dict[str, Any]:
        params = super().get_training_parameters()
        if self._is_llama3():
            params["special_tokens"] = {"end_of_turn": "<|eot_id|>", "header_start": "<|start_header_id|>"}
        return params

    def _is_llama3(self) -> bool:
        vocab = self.config.get("vocab_size") or 0
        return vocab >= 128000 or "llama-3" in self.model_id.lower() or "llama3" in self.model_id.lower()


class MistralHandler(TransformerHandler):
    """Mistral 7B and its fine-tunes: llama module names, sliding-window attention."""

    name = "mistral"
    families = ("mistral",)
    model_types = ("mistral",)
    architectures = ("MistralForCausalLM",)
    description = "Mistral 7B family (sliding-window attention)"
    attention_modules = LLAMA_ATTENTION
    mlp_modules = LLAMA_MLP
    best_seq_length = 2048
    default_chat_template = "mistral"
