"""MultimodalHandler and the vision-language families (the seed's Pattern 1).

Pattern 1: the vision encoder is frozen; LoRA goes on the language model, the projector between
them is trained in full (it is small and is what aligns image features with the text space); flash
attention is off with images; image/video special tokens; image-text formats plus text-only ones.
"""

from __future__ import annotations

from typing import Any, ClassVar

from llm_installer.handlers.base import TEXT_FORMATS, VISION_FORMATS
from llm_installer.handlers.modules import LLAMA_ATTENTION, LLAMA_MLP
from llm_installer.handlers.transformer import TransformerHandler

# Attribute names under which transformers keeps the vision encoder / projector.
VISION_TOWER_NAMES = ("vision_tower", "vision_model", "visual", "image_encoder", "vision_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "merger", "connector", "visual_projection")


def find_submodules(model: Any, names: tuple[str, ...]) -> list[tuple[str, Any]]:
    """(qualified name, module) of the outermost submodules whose own name is one of `names`."""
    found: list[tuple[str, Any]] = []
    for qname, module in model.named_modules():
        last = qname.rsplit(".", 1)[-1]
        if last in names and not any(qname.startswith(f + ".") for f, _ in found):
            found.append((qname, module))
    return found


class MultimodalHandler(TransformerHandler):
    """Vision-language models: language model adapted, projector trained, vision tower frozen."""

    name = "multimodal"
    families = ("vision-language (generic)",)
    description = "generic vision-language model (vision tower frozen, language model + projector trained)"
    default_model_family = "vision_language"
    is_generic = True
    attention_modules = LLAMA_ATTENTION
    mlp_modules = LLAMA_MLP
    projector_modules: ClassVar[tuple[str, ...]] = ("multi_modal_projector",)
    image_token: ClassVar[str] = "<image>"
    video_token: ClassVar[str | None] = "<video>"

    def target_modules_for_size(self) -> tuple[list[str] | None, str]:
        """The size rule's modules, scoped to the language model (`language_model.q_proj` style)."""
        targets, label = super().target_modules_for_size()
        if targets is None:
            return None, label
        return [f"language_model.{t}" for t in targets], f"{label}, language model only"

    def get_training_parameters(self) -> dict[str, Any]:
        params = super().get_training_parameters()
        params["lora_modules_to_save"] = list(self.projector_modules)
        params["supports_flash_attention"] = False  # not with images
        tokens = {"image_token": self.image_token}
        if self.video_token:
            tokens["video_token"] = self.video_token
        params["special_tokens"] = tokens
        params["dataset_formats"] = [*VISION_FORMATS, *TEXT_FORMATS]
        params["freeze_vision_tower"] = True
        return params

    def prepare_model_for_training(self, model: Any, training_config: dict[str, Any]) -> Any:
        cfg = dict(training_config or {})
        gc = cfg.pop("gradient_checkpointing", None)
        if gc is None:
            gc = self.training_params().gradient_checkpointing
        model = super().prepare_model_for_training(model, {**cfg, "gradient_checkpointing": False})

        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        # Freeze the vision encoder (the seed names vision_model / vision_tower; transformers also uses visual)
        # unless a handler sets freeze_vision_tower False; LoRA then wraps only what its targets name.
        if self.training_params().freeze_vision_tower is not False:
            for _, tower in find_submodules(model, VISION_TOWER_NAMES):
                for param in tower.parameters():
                    param.requires_grad = False
        # Checkpointing for the language model only: the frozen vision tower needs no recomputation.
        if gc:
            language_model = getattr(model, "language_model", None)
            if language_model is not None and hasattr(language_model, "gradient_checkpointing_enable"):
                language_model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
                if getattr(model, "config", None) is not None:
                    model.config.use_cache = False
            else:
                self._enable_gradient_checkpointing(model)
        return model


class LlavaHandler(MultimodalHandler):
    """LLaVA 1.5 (CLIP vision tower, MLP projector, llama/mistral/vicuna language model)."""

    name = "llava"
    families = ("llava",)
    model_types = ("llava", "llava_next", "llava_onevision")
    architectures = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
    description = "LLaVA (CLIP tower frozen; projector trained; language model LoRA)"
    projector_modules = ("multi_modal_projector",)
    image_token = "<image>"
    video_token = "<video>"


class Qwen2VLHandler(MultimodalHandler):
    """Qwen2-VL / Qwen2.5-VL: `visual` tower frozen, its patch `merger` trained, M-RoPE text model."""

    name = "qwen2_vl"
    families = ("qwen2-vl", "qwen2.5-vl")
    model_types = ("qwen2_vl", "qwen2_5_vl")
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    description = "Qwen2-VL / Qwen2.5-VL (visual tower frozen; merger trained)"
    projector_modules = ("merger",)
    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"
    default_chat_template = "chatml"

    def get_training_parameters(self) -> dict[str, Any]:
        params = super().get_training_parameters()
        params["special_tokens"] = {
            **params["special_tokens"],
            "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>",
            "end_of_turn": "<|im_end|>",
        }
        return params

    def prepare_model_for_training(self, model: Any, training_config: dict[str, Any]) -> Any:
        model = super().prepare_model_for_training(model, training_config)
        # The merger lives inside `visual` but is the projector: it trains (as modules_to_save).
        for _, merger in find_submodules(model, ("merger",)):
            for param in merger.parameters():
                param.requires_grad = True
        return model


class Gemma3VisionHandler(MultimodalHandler):
    """Gemma 3 with images (SigLIP tower frozen; projector is a raw weight, trained in full)."""

    name = "gemma3"
    families = ("gemma3 (vision)",)
    model_types = ("gemma3",)
    architectures = ("Gemma3ForConditionalGeneration",)
    description = "Gemma 3 vision-language (SigLIP frozen; projector trained)"
    projector_modules = ("multi_modal_projector",)
    # The placeholder written in the text: Gemma3Processor expands each <start_of_image> into
    # "\n\n<start_of_image>" + <image_soft_token> x 256 + "<end_of_image>\n\n".
    image_token = "<start_of_image>"
    video_token = None
    default_chat_template = "gemma"

    def get_training_parameters(self) -> dict[str, Any]:
        params = super().get_training_parameters()
        params["special_tokens"] = {
            **params["special_tokens"],
            "image_soft_token": "<image_soft_token>",
            "image_start": "<start_of_image>",
            "image_end": "<end_of_image>",
            "end_of_turn": "<end_of_turn>",
        }
        params["dataset_formats"] = [f for f in params["dataset_formats"] if f != "video_qa"]
        return params

    def get_tokenizer_config(self) -> dict[str, Any]:
        config = super().get_tokenizer_config()
        config["add_bos_token"] = True
        return config
