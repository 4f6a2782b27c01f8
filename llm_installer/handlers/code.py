"""Code models (the seed's Pattern 2): all linear layers, long context, code_instruct data.

StarCoder2 is matched by model_type; CodeLlama, Qwen2.5-Coder, DeepSeek-Coder and other *coder*
models keep their base architecture's module names and are recognised by their model id.
"""

from __future__ import annotations

from typing import Any

from llm_installer.handlers.modules import LLAMA_ATTENTION, LLAMA_MLP
from llm_installer.handlers.transformer import TransformerHandler

CODE_PREPROCESSING = {"syntax_highlighting": True, "language_tags": True}
CODE_SPECIAL_TOKENS = {
    "fim_prefix": "<fim_prefix>",
    "fim_middle": "<fim_middle>",
    "fim_suffix": "<fim_suffix>",
    "file_separator": "<file_sep>",
}


class CodeHandler(TransformerHandler):
    """Llama/Qwen-shaped code models found by id: CodeLlama, Qwen2.5-Coder, DeepSeek-Coder, *coder*."""

    name = "code"
    families = ("codellama", "qwen2.5-coder", "deepseek-coder")
    model_id_patterns = (r"code[-_]?llama", r"coder", r"codegemma", r"codeqwen")
    description = "code models by id (all linear layers, 16K context, code_instruct first)"
    attention_modules = LLAMA_ATTENTION
    mlp_modules = LLAMA_MLP
    best_seq_length = 16384
    default_chat_template = "chatml"

    def target_modules_for_size(self) -> tuple[list[str] | None, str]:
        """Pattern 2: every linear layer of the blocks, at any size below 30B."""
        targets, label = super().target_modules_for_size()
        if self.size_class() == ">30B":
            return targets, label
        return list(self.attention_modules) + list(
            self.mlp_modules
        ), "code model (Pattern 2: all linear layers)"

    def get_training_parameters(self) -> dict[str, Any]:
        params = super().get_training_parameters()
        context = self.model_info.context_length or self.config.get("max_position_embeddings") or 16384
        params["max_seq_length"] = max(min(int(context), self.best_seq_length), min(int(context), 8192))
        formats = [f for f in params["dataset_formats"] if f != "code_instruct"]
        params["dataset_formats"] = ["code_instruct", *formats]
        params["dataset_preprocessing"] = {
            **params.get("dataset_preprocessing", {}),
            "code_instruct": dict(CODE_PREPROCESSING),
        }
        params["special_tokens"] = dict(CODE_SPECIAL_TOKENS)
        params["special_requirements"] = {
            **params.get("special_requirements", {}),
            "preserve_code_tokens": True,
        }
        return params


class StarCoder2Handler(CodeHandler):
    """StarCoder2: q/k/v/o_proj attention, c_fc/c_proj MLP."""

    name = "starcoder2"
    families = ("starcoder2",)
    model_types = ("starcoder2",)
    architectures = ("Starcoder2ForCausalLM",)
    model_id_patterns = ()
    description = "StarCoder2 (code: all linear layers, 16K context)"
    attention_modules = LLAMA_ATTENTION
    mlp_modules = ("mlp.c_fc", "mlp.c_proj")
