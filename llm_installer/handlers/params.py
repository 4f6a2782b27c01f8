"""HandlerParams: the typed form of the seed's `get_training_parameters()` dict.

Handlers (built-in and user ones written from the seed's examples) keep the seed's dict interface:
`params = super().get_training_parameters(); params["x"] = ...; return params`. The framework validates
that dict once, here, into `HandlerParams`, so a typo'd key or a wrong type is one line naming the key
instead of a setting silently ignored; the plan records the validated values and nothing after the plan
asks the handler again (`BaseHandler.training_params()` answers from that one validation).

Adding a key a handler may set is one typed field below.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llm_installer.errors import UserError

Precision = Literal["auto", "fp16", "bf16", "fp32"]


class HandlerParams(BaseModel):
    """Every key of the seed's handler contract (and the extensions our handlers use), typed."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- the seed's key parameters (every handler has them: BaseHandler sets them all) -------------
    lora_target_modules: list[str] | str | None = Field(
        None, description="modules LoRA adapts (short names, dotted paths, globs); None = auto-detect"
    )
    lora_modules_to_save: list[str] | None = Field(None, description="modules trained in full (projectors)")
    training_precision: Precision = Field("auto", description="the handler's wish; the plan decides")
    gradient_checkpointing: bool = Field(True, description="the seed's safe default")
    max_seq_length: int = Field(2048, gt=1, description="training sequence length (capped by the context)")
    supports_flash_attention: bool = Field(False, description="flash-attention 2 allowed (CUDA only)")
    dataset_formats: list[str] = Field(
        default_factory=list, description="dataset formats the model trains on"
    )
    special_tokens: dict[str, str] = Field(
        default_factory=dict, description="end_of_turn, image_token, video_token..."
    )
    recommended_batch_size: int = Field(4, gt=0, description="examples per micro-step")
    recommended_learning_rate: float = Field(2e-4, gt=0, lt=1, description="learning rate")
    recommended_lora_r: int = Field(16, gt=0, description="LoRA rank")
    recommended_lora_alpha: int | None = Field(32, gt=0, description="LoRA alpha")
    dataset_preprocessing: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-format hints (medical_qa's max_context_length...)"
    )
    special_requirements: dict[str, Any] = Field(
        default_factory=dict, description="free-form notes; 'attn_implementation' names the padded attention"
    )

    # --- optional keys (absent unless a handler sets them) -------------------------------------------
    lora_targets_fallback: str | None = Field(None, description="'all-linear' when the targets are guessed")
    lora_fan_in_fan_out: bool | None = Field(None, description="Conv1D weights stored (in, out): GPT-2")
    lora_dropout: float | None = Field(None, ge=0, lt=1, description="LoRA dropout")
    force_4bit: bool | None = Field(None, description="train 4-bit (QLoRA): the seed's pattern 4")
    quantization: str | None = Field(None, description="'4bit' = force_4bit")
    freeze_vision_tower: bool | None = Field(None, description="vision models: freeze the encoder (default)")
    moe_training: bool | None = Field(None, description="MoE: router balancing loss on")
    expert_selection: str | int | None = Field(None, description="MoE: 'top-k' routing while training")
    load_balancing_loss_coef: float | None = Field(None, ge=0, description="MoE: balancing-loss weight")
    preference_beta: float | None = Field(None, gt=0, description="DPO/ORPO: beta (train/preference.py)")
    preference_loss_type: str | None = Field(None, description="DPO/ORPO: the loss variant")
    # synonyms the plan also reads (the seed's examples use both spellings)
    learning_rate: float | None = Field(None, gt=0, lt=1, description="= recommended_learning_rate")
    batch_size: int | None = Field(None, gt=0, description="= recommended_batch_size")
    lora_r: int | None = Field(None, gt=0, description="= recommended_lora_r")
    lora_rank: int | None = Field(None, gt=0, description="= recommended_lora_r")
    lora_alpha: int | None = Field(None, gt=0, description="= recommended_lora_alpha")
    dpo_beta: float | None = Field(None, gt=0, description="= preference_beta")

    def to_dict(self) -> dict[str, Any]:
        """The seed's dict: the keys every handler has, plus the optional ones a handler set."""
        return self.model_dump(exclude=set(OPTIONAL_KEYS) - self.model_fields_set)

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """dict-style read (the seed's `params.get(...)`); an unknown key is refused, never None."""
        if key not in type(self).model_fields:
            raise KeyError(f"{key!r} is not a handler parameter")
        value = getattr(self, key)
        return default if value is None else value


# The keys BaseHandler.get_training_parameters() always returns, in its order.
CORE_KEYS: tuple[str, ...] = (
    "lora_target_modules", "lora_modules_to_save", "training_precision", "gradient_checkpointing",
    "max_seq_length", "supports_flash_attention", "dataset_formats", "special_tokens",
    "recommended_batch_size", "recommended_learning_rate", "recommended_lora_r", "recommended_lora_alpha",
    "dataset_preprocessing", "special_requirements",
)  # fmt: skip
OPTIONAL_KEYS: tuple[str, ...] = tuple(k for k in HandlerParams.model_fields if k not in CORE_KEYS)


def default_params(text_formats: tuple[str, ...], preprocessing: Mapping[str, Any]) -> dict[str, Any]:
    """The base handler's dict: every core key with its default (a fresh copy each call)."""
    params = HandlerParams().model_dump(include=set(CORE_KEYS))
    params["dataset_formats"] = list(text_formats)
    params["dataset_preprocessing"] = copy.deepcopy(dict(preprocessing))
    return params


def validate_params(params: Any, handler_name: str) -> HandlerParams:
    """The dict a handler returned as HandlerParams; one line naming the key when it is wrong."""
    if not isinstance(params, Mapping):
        raise UserError(
            f"handler {handler_name}: get_training_parameters() must return a dict, got {type(params).__name__}"
        )
    try:
        return HandlerParams.model_validate(dict(params))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "?"
        if err["type"] == "extra_forbidden":
            raise UserError(
                f"handler {handler_name}: unknown training parameter {key!r} (known: "
                f"{', '.join(HandlerParams.model_fields)}; put free-form notes in special_requirements)"
            ) from None
        raise UserError(
            f"handler {handler_name}: training parameter {key!r}={err.get('input')!r}: {err['msg']}"
        ) from None


def handler_params(handler: Any) -> HandlerParams:
    """Ask the handler once (`get_training_parameters()`) and validate: the plan and the handler tables
    are built from this, and everything after the plan reads what it recorded."""
    name = getattr(handler, "name", type(handler).__name__)
    try:
        raw = handler.get_training_parameters()
    except UserError:
        raise
    except Exception as exc:  # a user handler that breaks must not hide behind a traceback
        raise UserError(f"handler {name} failed in get_training_parameters(): {exc}") from None
    return validate_params(raw, name)
