"""TransformerHandler: decoder-only language models, with the seed's size and hardware patterns.

Family handlers only declare their module names (`attention_modules`, `mlp_modules`) and what differs
(context, template, formats); the size rule here turns the module names into `lora_target_modules`:

| size    | LoRA targets                         | learning rate | checkpointing | other                 |
|---------|--------------------------------------|---------------|---------------|-----------------------|
| <1B     | attention + MLP (Pattern 3)          | 5e-4          | base default  | batch 4               |
| 1-7B    | attention + MLP (<3B, Pattern 3),    | 2e-4          | base default  | batch 4               |
|         | attention only from 3B (seed 1-7B)   |               |               |                       |
| 7-30B   | attention + MLP (seed >7B)           | 1e-4          | on            | batch 2               |
| >30B    | attention only (Pattern 4)           | 1e-4          | on            | 4-bit forced, batch 1 |

The seed's dynamic-adjustment example trains only q/v below 1B; its Pattern 3 says small models "can
train more modules" and are cheap to adapt fully, which is what measured runs on SmolLM2 favour, so
small models get attention + MLP (documented in docs/handlers.md).
"""

from __future__ import annotations

from typing import Any, ClassVar

from llm_installer.handlers.base import BaseHandler

LIMITED_FORMATS = ["alpaca", "sharegpt", "openai", "chat", "completion", "text"]


class TransformerHandler(BaseHandler):
    """Any decoder-only transformer; all linear layers but the output head when the family is unknown."""

    name = "transformer"
    families = ("generic",)
    description = "generic decoder-only model: auto-detected linear layers (not the output head)"
    default_model_family = "transformer"
    # Short module names (suffixes); empty = auto-detect all linear layers except the output head.
    attention_modules: ClassVar[tuple[str, ...]] = ()
    mlp_modules: ClassVar[tuple[str, ...]] = ()
    # The training sequence length to use (capped by the model's context length): the seed's
    # conservative 2048 — chat/instruction data rarely needs more, and memory grows with it.
    best_seq_length: ClassVar[int] = 2048
    default_chat_template = "chatml"
    # A generic fallback (this class, MultimodalHandler, MoEHandler themselves, not their subclasses):
    # its guessed module names may not exist, so all linear layers are the fallback. Read from the
    # class's own __dict__, so a family subclass is not generic.
    is_generic: ClassVar[bool] = True

    def target_modules_for_size(self) -> tuple[list[str] | None, str]:
        """(LoRA target modules, source label) by the size rule; None when the family is unknown."""
        size_class = self.size_class()
        size = self._estimate_model_size()
        attention = list(self.attention_modules)
        everything = attention + list(self.mlp_modules)
        if not attention:
            return None, f"size rule ({size_class}): auto-detect"
        if size_class == ">30B":
            return attention, "size rule (>30B: attention only)"
        if size_class == "7-30B":
            return everything, "size rule (7-30B: attention + MLP)"
        if size_class == "<1B" or (size is not None and size < 3):
            return everything, f"size rule ({size_class}, small model: attention + MLP)"
        return attention, "size rule (1-7B: attention)"

    def get_training_parameters(self) -> dict[str, Any]:
        params = super().get_training_parameters()
        size_class = self.size_class()
        label = f"size rule ({size_class})"

        targets, target_label = self.target_modules_for_size()
        self.set_param(params, "lora_target_modules", targets, target_label)

        context = self.model_info.context_length or self.config.get("max_position_embeddings")
        best = min(int(context), self.best_seq_length) if context else min(2048, self.best_seq_length)
        self.set_param(
            params, "max_seq_length", best, f"{type(self).__name__} (context {context or 'unknown'})"
        )

        if size_class == "<1B":
            self.set_param(params, "recommended_learning_rate", 5e-4, label)
            self.set_param(params, "recommended_batch_size", 4, label)  # the output head dominates memory
        elif size_class == "1-7B":
            self.set_param(params, "recommended_learning_rate", 2e-4, label)
            self.set_param(params, "recommended_batch_size", 4, label)
        else:
            self.set_param(params, "recommended_learning_rate", 1e-4, label)
            self.set_param(params, "recommended_batch_size", 2 if size_class == "7-30B" else 1, label)
            self.set_param(params, "gradient_checkpointing", True, label)
            self.set_param(params, "recommended_lora_r", 16 if size_class == "7-30B" else 8, label)
            self.set_param(params, "recommended_lora_alpha", 32 if size_class == "7-30B" else 16, label)
        if size_class == ">30B":
            self.set_param(params, "force_4bit", True, label)
            self.set_param(params, "quantization", "4bit", label)
            self.set_param(params, "dataset_formats", list(LIMITED_FORMATS), label)

        if type(self).__dict__.get("is_generic", False):
            # a fallback for an unknown architecture: its guessed names may not exist -> all linear layers
            params["lora_targets_fallback"] = "all-linear"
        self._apply_hardware(params)
        return params

    def _apply_hardware(self, params: dict[str, Any]) -> None:
        """The seed's hardware-aware precision: CC>=8 bf16 + flash attention, CC 7 fp16, else fp32."""
        from llm_installer import hardware
        from llm_installer.handlers.base import _hardware_label
        from llm_installer.precision import handler_precision

        hw = hardware.detect()
        label = _hardware_label(hw)
        # off CUDA "auto": the plan measures bf16 against fp32 on this machine's own layer shapes (CPU flags
        # mispredicted it both ways on the machines measured)
        precision, flash = handler_precision(hw)
        self.set_param(params, "training_precision", precision, label)
        self.set_param(params, "supports_flash_attention", flash, label)
