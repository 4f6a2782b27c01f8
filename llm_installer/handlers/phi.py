"""Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv_proj and gate_up_proj, <|end|> turns."""

from __future__ import annotations

from llm_installer.handlers.transformer import TransformerHandler


class Phi3Handler(TransformerHandler):
    """Phi-3 family: attention is one fused `qkv_proj`, the MLP one fused `gate_up_proj`."""

    name = "phi3"
    families = ("phi3", "phi3.5", "phi4-mini")
    model_types = ("phi3",)
    architectures = ("Phi3ForCausalLM",)
    description = "Phi-3 family (fused qkv_proj / gate_up_proj)"
    attention_modules = ("qkv_proj", "o_proj")
    mlp_modules = ("gate_up_proj", "down_proj")
    best_seq_length = 2048
    default_chat_template = "phi3"
    end_of_turn_token = "<|end|>"
