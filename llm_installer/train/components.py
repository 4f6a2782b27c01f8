"""The pieces a training run is built from, each from the plan: the model folder and its handler, the
tokenizer and processor, the prepared data (and the padded-batch switch for image data), and the base
model wrapped with LoRA/DoRA. `run_training` and `train --dry-run` share them, so they make the same
choices.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_installer.consent import allow_remote_code
from llm_installer.errors import UserError
from llm_installer.train.plan import TrainingPlan

if TYPE_CHECKING:
    from llm_installer.handlers.params import HandlerParams


def data_settings_for(plan: TrainingPlan) -> Any:
    """The data pipeline's DataSettings from the plan."""
    from llm_installer.data.prepare import DataSettings

    return DataSettings(
        format=None if plan.value("format") in (None, "auto") else plan.value("format"),
        max_seq_length=plan.value("max_seq_length"),
        max_examples=plan.value("max_examples"),
        validation_split=plan.value("validation_split"),
        train_on_inputs=plan.value("train_on_inputs"),
        seed=plan.value("seed"),
        strict=bool(plan.value("strict")),
        system_prompt=plan.value("system_prompt"),
        # prepared data is cached per model folder, keyed by data + tokenizer + settings
        cache_dir=str(Path(plan.model["folder"]) / ".cache" / "data"),
    )


def prepare_data(plan: TrainingPlan, tokenizer: Any, handler: Any, rejects_path: Path | None = None) -> Any:
    """prepare_dataset with the plan's data settings and the handler parameters the plan recorded."""
    from llm_installer.data.prepare import prepare_dataset

    settings = data_settings_for(plan)
    if rejects_path is not None:
        settings.rejects_path = str(rejects_path)
    return prepare_dataset(
        plan.value("data"), tokenizer, handler, settings, params=plan_handler_params(plan, handler)
    )


def load_components(plan: TrainingPlan) -> tuple[Any, Any, Any]:
    """(model folder, ModelInfo, handler) for the plan's model; the handler is the class the plan was made
    with (refused, with one line, when the registry now picks another) and answers from the plan's record."""
    from llm_installer.handlers.registry import get_handler
    from llm_installer.store import ModelFolder
    from llm_installer.train.plan import handler_class_path

    folder = ModelFolder(Path(plan.model["folder"]))
    info = folder.load_info()
    handler = get_handler(info)
    planned = plan.model.get("handler_class")
    if planned and handler_class_path(type(handler)) != planned:
        raise UserError(
            f"the plan for {info.model_id} was made with handler {planned}, but the registry now picks "
            f"{handler_class_path(type(handler))} (a user handler added or removed?): plan the run again"
        )
    if plan.handler_params is not None:
        handler.use_training_params(plan.handler_params)
    return folder, info, handler


def plan_handler_params(plan: TrainingPlan, handler: Any = None) -> HandlerParams:
    """The handler parameters the plan recorded (a plan without them, from an older file, asks `handler`)."""
    from llm_installer.handlers.params import validate_params

    if plan.handler_params is not None:
        return validate_params(plan.handler_params, str(plan.model.get("handler")))
    return handler.training_params()


def load_tokenizer_for(folder: Any, handler: Any, info: Any) -> Any:
    from llm_installer.loading import load_tokenizer

    tok = load_tokenizer(folder.model_dir, trust_remote_code=allow_remote_code(info))
    if hasattr(handler, "apply_tokenizer_config"):
        tok = handler.apply_tokenizer_config(tok) or tok
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_data_processor(folder: Any, info: Any, tokenizer: Any) -> Any:
    """A vision-language model's processor (sharing `tokenizer`), so that image and video records become
    pixel tensors; None for text models, or when the folder's processor cannot be loaded."""
    if getattr(info, "task", None) != "vision_language":
        return None
    from llm_installer.loading import load_processor

    processor = load_processor(folder.model_dir, trust_remote_code=allow_remote_code(info))
    if processor is None or not (
        hasattr(processor, "image_processor") or hasattr(processor, "video_processor")
    ):
        return None
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer = tokenizer  # the handler-configured tokenizer the rest of the run uses
    return processor


def prepare_run_data(
    plan: TrainingPlan, folder: Any, info: Any, tokenizer: Any, handler: Any, rejects_path: Path | None = None
) -> Any:
    """prepare_data with the model's processor for vision-language models (images -> pixel_values)."""
    from llm_installer.errors import DataError

    processor = load_data_processor(folder, info, tokenizer)
    try:
        return prepare_data(plan, processor or tokenizer, handler, rejects_path=rejects_path)
    except DataError as exc:
        if processor is not None or "no image processor" not in str(exc):
            raise
        if getattr(info, "task", None) == "vision_language":
            raise DataError(
                f"--data {plan.value('data')}: the data has images or video but the processor of "
                f"{info.model_id} could not be loaded from {folder.model_dir} (Qwen2-VL's needs torchvision); "
                "fix the processor or use text-only data"
            ) from None
        raise DataError(
            f"--data {plan.value('data')}: the data has images or video but {info.model_id} is a text-only "
            "model: train a vision-language model (such as a LLaVA) on it or use text-only data"
        ) from None


def media_keys(examples: list[dict[str, Any]]) -> list[str]:
    """The keys beside input_ids/labels that the examples carry (pixel_values etc. for image data)."""
    keys: set[str] = set()
    for ex in examples:
        if len(ex) > 2:  # text examples hold input_ids and labels only
            keys.update(
                k for k, v in ex.items() if v is not None and not (hasattr(v, "__len__") and not len(v))
            )
    return sorted(keys - {"input_ids", "labels"})


def settings_for_media(plan: TrainingPlan, keys: list[str], info: Any) -> bool:
    """Switch the plan to padded batches for image/video examples; refuse keys no collator can batch.

    Padding-free packing cannot carry per-example pixel tensors, so such data trains with padded, masked
    rows (and plain sdpa, since packed_sdpa was chosen for packed rows); the plan records why, with source
    `data`. Returns True when the plan changed.
    """
    from llm_installer.data.collate import MEDIA_KEYS, TOKEN_KEYS
    from llm_installer.train.attention import PACKED_IMPLEMENTATIONS
    from llm_installer.train.plan import resolve_attention

    unknown = [k for k in keys if k not in (*MEDIA_KEYS, *TOKEN_KEYS)]
    if unknown:
        raise UserError(
            f"--data {plan.value('data')}: the model's processor gives "
            f"{', '.join(unknown)}, which the trainer cannot batch yet (it batches {', '.join(MEDIA_KEYS)}); "
            "use text-only data for this model"
        )
    if not keys:
        return False
    why = "image/video examples: padded batches (packed rows cannot carry per-example pixel tensors)"
    changed = False
    if plan.value("packing"):
        plan.set("packing", False, "data", why)
        changed = True
    # the packed-rows attention was derived from packing; padded rows take the plan's padded choice
    if plan.value("attn_implementation") in PACKED_IMPLEMENTATIONS:
        resolve_attention(plan, plan.value("device"), info, plan_handler_params(plan), allow_flash=False)
        plan.set("attn_implementation", plan.value("attn_implementation"), "data", why)
        changed = True
    return changed


def apply_media_settings(plan: TrainingPlan, data: Any, console: Any, info: Any) -> list[str]:
    """settings_for_media for prepared `data`, saying so on `console` when packing goes off; the media keys.

    The training run and `--dry-run` both go through here, so they make (and print) the same choice."""
    keys = media_keys([*data.train, *data.validation])
    if settings_for_media(plan, keys, info):
        console.print(
            "packing is off for image data: padded batches (packed rows cannot carry per-example pixel "
            f"tensors); attention {plan.value('attn_implementation')}",
            soft_wrap=True,
        )
    return keys


def load_training_model(plan: TrainingPlan, folder: Any, info: Any, handler: Any) -> Any:
    """Base model in the plan's precision (4-bit for QLoRA), prepared by the handler, wrapped with LoRA/DoRA."""
    import torch

    from llm_installer.loading import load_model

    method = plan.value("method")
    precision = plan.value("precision")
    device = plan.value("device")
    quant = None
    load_dtype = "fp32"
    if device == "cuda" and precision in ("bf16", "fp16"):
        load_dtype = precision
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
        )
    from llm_installer.train.attention import attention_load_kwargs

    model = load_model(
        folder.model_dir,
        task=getattr(info, "task", "causal_lm") or "causal_lm",
        dtype=load_dtype,
        device_map={"": 0} if quant is not None else None,
        quantization_config=quant,
        trust_remote_code=allow_remote_code(info),
        **attention_load_kwargs(plan.value("attn_implementation")),
    )
    model.config.use_cache = False
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(plan.value("gradient_checkpointing"))
        )
    model = handler.prepare_model_for_training(model, plan.values()) or model
    # handlers may switch gradient checkpointing on; the plan has the final word (hardware-aware)
    ckpt_attr = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    if not plan.value("gradient_checkpointing") and getattr(model, ckpt_attr, False):
        model.gradient_checkpointing_disable()
    from llm_installer.train.lora_setup import build_peft_model

    model = build_peft_model(
        model,
        r=plan.value("lora_r"),
        alpha=plan.value("lora_alpha"),
        dropout=plan.value("lora_dropout"),
        method=method,
        target_kwargs=lora_target_kwargs(model, plan, handler),
    )
    if plan.value("fused_lora"):
        from llm_installer.train.lora_fast import fuse_lora_layers

        fuse_lora_layers(model)
    return model


def lora_target_kwargs(model: Any, plan: TrainingPlan, handler: Any) -> dict[str, Any]:
    """Target modules through the handlers' resolver (user's --target-modules or the handler's list)."""
    from llm_installer.handlers.targets import resolve_lora_targets

    params = plan_handler_params(plan, handler).to_dict()
    targets = plan.value("target_modules")
    if targets is not None:
        params["lora_target_modules"] = targets
    if plan.value("modules_to_save") is not None:
        params["lora_modules_to_save"] = plan.value("modules_to_save")
    return dict(resolve_lora_targets(model, params))
