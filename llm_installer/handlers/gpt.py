"""GPT-2 (Conv1D layers) and GPT-NeoX / Pythia (fused query_key_value)."""

from __future__ import annotations

from typing import Any

from llm_installer.handlers.transformer import TransformerHandler


class GPT2Handler(TransformerHandler):
    """GPT-2: `Conv1D` layers stored (in, out); PEFT adapts them with fan_in_fan_out=True."""

    name = "gpt2"
    families = ("gpt2",)
    model_types = ("gpt2",)
    architectures = ("GPT2LMHeadModel",)
    description = "GPT-2 (Conv1D c_attn/c_proj/c_fc; plain-text template)"
    attention_modules = ("attn.c_attn", "attn.c_proj")
    mlp_modules = ("mlp.c_fc", "mlp.c_proj")
    best_seq_length = 1024
    default_chat_template = "plain"

    def get_training_parameters(self) -> dict[str, Any]:
        params = super().get_training_parameters()
        params["lora_fan_in_fan_out"] = True  # Conv1D weights are (in, out)
        return params


class GPTNeoXHandler(TransformerHandler):
    """GPT-NeoX / Pythia: fused `query_key_value`, `dense`, `dense_h_to_4h`, `dense_4h_to_h`."""

    name = "gpt_neox"
    families = ("gpt_neox", "pythia")
    model_types = ("gpt_neox",)
    architectures = ("GPTNeoXForCausalLM",)
    description = "GPT-NeoX / Pythia (fused query_key_value)"
    attention_modules = ("attention.query_key_value", "attention.dense")
    mlp_modules = ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    best_seq_length = 2048
    default_chat_template = "plain"
