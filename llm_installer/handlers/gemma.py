"""Gemma, Gemma 2 and Gemma 3 (text): llama module names, <start_of_turn>/<end_of_turn> template."""

from __future__ import annotations

from typing import Any

from llm_installer.handlers.modules import LLAMA_ATTENTION, LLAMA_MLP
from llm_installer.handlers.transformer import TransformerHandler


class GemmaHandler(TransformerHandler):
    """Gemma 1 and 2: BOS required, eager attention recommended for Gemma 2's soft-capping."""

    name = "gemma"
    families = ("gemma", "gemma2")
    model_types = ("gemma", "gemma2")
    architectures = ("GemmaForCausalLM", "Gemma2ForCausalLM")
    description = "Gemma / Gemma 2 (<start_of_turn> template)"
    attention_modules = LLAMA_ATTENTION
    mlp_modules = LLAMA_MLP
    best_seq_length = 2048
    default_chat_template = "gemma"

    def get_training_parameters(self) -> dict[str, Any]:
        params = super().get_training_parameters()
        params["special_tokens"] = {"end_of_turn": "<end_of_turn>", "start_of_turn": "<start_of_turn>"}
        if self.model_info.model_type == "gemma2":
            # Gemma 2's attention logit soft-capping is not in flash attention 2.
            params["supports_flash_attention"] = False
            params["special_requirements"] = {
                **params.get("special_requirements", {}),
                "attn_implementation": "eager",
            }
        return params

    def get_tokenizer_config(self) -> dict[str, Any]:
        config = super().get_tokenizer_config()
        config["add_bos_token"] = True  # Gemma degrades badly without <bos>
        return config


class Gemma3TextHandler(GemmaHandler):
    """Gemma 3 text-only checkpoints (gemma3_text, e.g. gemma-3-1b)."""

    name = "gemma3_text"
    families = ("gemma3 (text)",)
    model_types = ("gemma3_text",)
    architectures = ("Gemma3ForCausalLM",)
    description = "Gemma 3 text-only models"
    best_seq_length = 2048
