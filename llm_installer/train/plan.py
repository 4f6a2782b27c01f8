"""The training plan: every setting of a run, resolved once, with where its value came from.

Precedence, lowest first: built-in default < the model's handler (`get_training_parameters()`) < this
machine's hardware < the chosen mode < the user's flags. The plan is a plain JSON-serialisable dict so it
can be printed by `train --dry-run`, stored in `adapter_info.json` and hashed into the resume fingerprint;
the trainer reads only the plan, never the command line.

The setting types and defaults are `plan_types.PlanValues`; `build_plan` runs the layers below in order
(`normalize_user_flags`, `apply_defaults`, `apply_handler`, `apply_hardware`, `apply_mode`, `apply_user`,
`derive_settings`, `check_plan`), each a step a reader can name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_installer.errors import UserError
from llm_installer.train.modes import MODES, mode_settings
from llm_installer.train.plan_types import DEFAULTS, NOT_FINGERPRINTED, PLAN_VERSION, PlanValues, TrainingPlan

if TYPE_CHECKING:
    from llm_installer.handlers.params import HandlerParams

__all__ = [
    "DEFAULTS",
    "NOT_FINGERPRINTED",
    "PLAN_VERSION",
    "PlanValues",
    "TrainingPlan",
    "build_plan",
]  # plan_types re-exported

# Handler parameter names (the seed's contract and common synonyms) -> plan keys.
HANDLER_KEYS: dict[str, str] = {
    "lora_target_modules": "target_modules",
    "lora_modules_to_save": "modules_to_save",
    "training_precision": "precision",
    "gradient_checkpointing": "gradient_checkpointing",
    "max_seq_length": "max_seq_length",
    "recommended_learning_rate": "learning_rate",
    "learning_rate": "learning_rate",
    "recommended_batch_size": "batch_size",
    "batch_size": "batch_size",
    "recommended_lora_r": "lora_r",
    "lora_r": "lora_r",
    "lora_rank": "lora_r",
    "recommended_lora_alpha": "lora_alpha",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "preference_beta": "beta",
    "dpo_beta": "beta",
    "preference_loss_type": "loss_type",
}

# User flags (CLI option names with '-' -> '_') that map straight onto plan keys.
USER_KEYS = (
    "data",
    "format",
    "mode",
    "method",
    "epochs",
    "max_steps",
    "batch_size",
    "gradient_accumulation",
    "learning_rate",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "max_seq_length",
    "max_examples",
    "validation_split",
    "patience",
    "overfitting_threshold",
    "force_epochs",
    "resume",
    "optimizer",
    "seed",
    "train_on_inputs",
    "packing",
    "precision",
    "output",
    "tensorboard",
    "strict",
    "system_prompt",
    "objective",
    "beta",
    "loss_type",
    "init_adapter",
)


OPTIMIZERS = {
    "adamw": "adamw_torch",
    "adamw_torch": "adamw_torch",
    "adamw_torch_fused": "adamw_torch_fused",
    "adamw_8bit": "adamw_bnb_8bit",
    "adamw_bnb_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "adafactor": "adafactor",
    "sgd": "sgd",
    "adagrad": "adagrad",
    "rmsprop": "rmsprop",
}
BNB_OPTIMIZERS = {"adamw_bnb_8bit", "paged_adamw_8bit"}
METHODS = ("lora", "qlora", "dora")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def auto_lora_rank(num_parameters: int | None) -> tuple[int, str]:
    """LoRA rank by model size: small models need relatively more capacity, large ones have plenty."""
    if not num_parameters:
        return 16, "model size unknown"
    b = num_parameters / 1e9
    if b < 1:
        return 16, f"{b * 1000:.0f}M parameters (< 1B)"
    if b < 13:
        return 32, f"{b:.1f}B parameters (1-13B)"
    return 64, f"{b:.0f}B parameters (>= 13B)"


def _args_dict(args: Any) -> dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return dict(args)
    return dict(vars(args))


def _parse_targets(value: Any) -> list[str] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        items = [t.strip() for t in value.split(",") if t.strip()]
        if items == ["all-linear"]:
            return "all-linear"
        if not items:
            raise UserError("--target-modules is empty: give module names like q_proj,v_proj or all-linear")
        return items
    return list(value)


def _check_user_values(user: dict[str, Any]) -> None:
    """Refuse impossible flag values with a message naming the flag (never a traceback later on)."""
    positive = ("epochs", "batch_size", "gradient_accumulation", "lora_r", "max_seq_length", "max_examples")
    for key in positive:
        v = user.get(key)
        if v is not None and v <= 0:
            raise UserError(f"--{key.replace('_', '-')} must be positive, got {v}")
    for key in ("max_steps", "patience"):
        v = user.get(key)
        if v is not None and v < 0:
            raise UserError(f"--{key.replace('_', '-')} must be zero or more, got {v}")
    lr = user.get("learning_rate")
    if lr is not None and not (0 < lr < 1):
        raise UserError(f"--learning-rate must be between 0 and 1, got {lr}")
    vs = user.get("validation_split")
    if vs is not None and not (0 <= vs < 1):
        raise UserError(f"--validation-split must be in [0, 1), got {vs}")
    dr = user.get("lora_dropout")
    if dr is not None and not (0 <= dr < 1):
        raise UserError(f"--lora-dropout must be in [0, 1), got {dr}")
    ot = user.get("overfitting_threshold")
    if ot is not None and ot < 0:
        raise UserError(f"--overfitting-threshold must be zero or more, got {ot}")
    if user.get("mode") is not None and user["mode"] not in MODES:
        raise UserError(f"--mode {user['mode']!r} is unknown: use one of {', '.join(MODES)}")
    if user.get("method") is not None and user["method"] not in METHODS:
        raise UserError(f"--method {user['method']!r} is unknown: use one of {', '.join(METHODS)}")
    if user.get("precision") is not None and user["precision"] not in PRECISIONS:
        raise UserError(f"--precision {user['precision']!r} is unknown: use one of {', '.join(PRECISIONS)}")
    if user.get("optimizer") is not None and user["optimizer"] not in OPTIMIZERS:
        raise UserError(
            f"--optimizer {user['optimizer']!r} is unknown: use one of {', '.join(sorted(OPTIMIZERS))}"
        )


def _bitsandbytes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def forces_4bit(hparams: HandlerParams | Mapping[str, Any]) -> bool:
    """The handler asks for 4-bit base weights (the seed's pattern 4 for models over 30B)."""
    return bool(hparams.get("force_4bit")) or hparams.get("quantization") in ("4bit", "4-bit", "nf4")


def check_method(method: str, source: str, hw: Any, info: Any) -> None:
    """Refuse, with one line, a method this machine cannot run (the plan and `check` share this rule)."""
    if method != "qlora":
        return
    size = f"{info.params_billions:.0f}B-parameter " if getattr(info, "params_billions", None) else ""
    if not hw.cuda:
        if source == "handler":
            raise UserError(
                f"{info.model_id} is a {size}model its handler trains 4-bit (QLoRA), which needs an NVIDIA GPU "
                "with bitsandbytes; this machine has none: train it on a GPU machine, or pass --method lora "
                "to train full-precision weights on the CPU (very slow, needs the memory `check` shows)"
            )
        raise UserError(
            "--method qlora needs an NVIDIA GPU (bitsandbytes 4-bit); this machine has none: use --method lora"
        )
    if not _bitsandbytes_available():
        raise UserError("--method qlora needs bitsandbytes: pip install bitsandbytes (or use --method lora)")


def model_shapes(info: Any) -> tuple[int, int | None]:
    """(hidden size, MLP width) from the model's config, for the precision probe (defaults when absent)."""
    cfg = info.merged_config
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or info.hidden_size or 1024
    inter = cfg.get("intermediate_size") or cfg.get("moe_intermediate_size") or cfg.get("n_inner")
    return int(hidden), (int(inter) if inter else None)


def resolve_precision(plan: TrainingPlan, hw: Any, info: Any) -> None:
    """The precision the run applies: the user's --precision, else measured on this machine (CPU) or the
    GPU's compute capability; a handler's wish is shown when the measurement overrules it."""
    from llm_installer.precision import choose_precision

    source, wanted = plan.source("precision"), plan.value("precision")
    requested = wanted if source == "user" else "auto"
    hidden, inter = model_shapes(info)
    rows = int(plan.value("batch_size")) * int(plan.value("max_seq_length"))
    choice = choose_precision(requested, hw, hidden=hidden, intermediate=inter, rows=rows)
    if source == "user":
        plan.set("precision", choice.precision, "user", choice.why)
        return
    asked = f" (handler asked {wanted})" if source == "handler" and wanted != choice.precision else ""
    plan.set("precision", choice.precision, "hardware", choice.why + asked)


def resolve_attention(
    plan: TrainingPlan, device: str, info: Any, hparams: HandlerParams, *, allow_flash: bool = True
) -> None:
    """Packing and the attention implementation through `train.attention`'s rule (one home for it).

    Packing goes off, with the reason, for a model whose packed rows would not be exact (an explicit
    --packing there is refused); the handler's `supports_flash_attention` lets flash-attention 2 in on CUDA,
    and its `special_requirements['attn_implementation']` names the padded-rows implementation. Image
    data re-runs it with packing off (`components.settings_for_media`, without flash attention)."""
    import importlib.util

    from llm_installer.train.attention import choose_attention, packing_blocker

    cfg = dict(info.config or {})
    model_type = info.model_type or cfg.get("model_type") or ""
    if plan.value("packing"):
        blocker = packing_blocker(model_type, cfg)
        if blocker:
            if plan.source("packing") == "user":
                raise UserError(
                    f"--packing: packed rows are not exact for {info.model_id}: {blocker}; drop --packing"
                )
            plan.set("packing", False, "handler", f"padded rows: {blocker}")
    flash = (
        allow_flash
        and bool(hparams.supports_flash_attention)
        and importlib.util.find_spec("flash_attn") is not None
    )
    impl, why = choose_attention(
        model_type, cfg, packing=bool(plan.value("packing")), device=device, flash_available=flash
    )
    wanted = hparams.special_requirements.get("attn_implementation")
    if not plan.value("packing") and wanted and impl != "flash_attention_2" and wanted != impl:
        impl, why = wanted, f"padded rows: the handler's special_requirements ask {wanted}"
    plan.set("attn_implementation", impl, "handler" if wanted == impl else plan.source("packing"), why)


def resolve_expert_lora(plan: TrainingPlan) -> None:
    """State what fused MoE experts get: PEFT's expert wrapper takes no dropout and no DoRA, so they train
    plain LoRA without dropout while the other layers keep the mode's settings (train.lora_setup)."""
    from llm_installer.train.lora_setup import describe_expert_settings

    targets = plan.value("target_modules")
    if not isinstance(targets, list):
        return
    experts = [t for t in targets if "experts." in t and not t.startswith("shared_expert")]
    if not experts:
        return
    others = [t for t in targets if t not in experts]
    why = describe_expert_settings(
        {"target_parameters": experts, "target_modules": others},
        dropout=plan.value("lora_dropout"),
        method=plan.value("method"),
    )
    plan.set("expert_lora", "dropout 0, plain LoRA", "handler", why or "")


# ---- build_plan's steps, in their order ------------------------------------------------------------------


def normalize_user_flags(args: Any) -> dict[str, Any]:
    """The flags the user gave (None = not given), in plan keys and checked: --no-tensorboard, --resume and
    --resume-from, --target-modules lists, --precision auto (= not given) and optimizer aliases."""
    user = {k: v for k, v in _args_dict(args).items() if v is not None}
    if "no_tensorboard" in user:
        if user.pop("no_tensorboard"):
            user["tensorboard"] = False
    if "resume_from" in user:
        user["resume"] = str(user.pop("resume_from"))
    elif user.get("resume") is True:
        user["resume"] = "latest"
    elif user.get("resume") is False:
        user.pop("resume")
    if "target_modules" in user:
        user["target_modules"] = _parse_targets(user["target_modules"])
    from llm_installer.train.preference import check_preference_flags

    check_preference_flags(user)  # --method dpo|orpo -> objective; --beta, --loss-type
    _check_user_values(user)
    if user.get("precision") == "auto":
        user.pop("precision")  # the hardware layer decides, as without the flag
    if user.get("optimizer"):
        user["optimizer"] = OPTIMIZERS[user["optimizer"]]
    return user


def model_record(root: Path, info: Any, handler: Any) -> dict[str, Any]:
    """The plan's `model` section: what was trained, and the handler class that planned it."""
    return {
        "folder": str(root),
        "model_id": info.model_id,
        "revision": info.revision,
        "source": info.source,
        "family": info.family or info.model_type,
        "architecture": info.architecture,
        "task": info.task,
        "num_parameters": info.num_parameters,
        "context_length": info.context_length,
        "handler": getattr(handler, "name", type(handler).__name__),
        "handler_class": handler_class_path(type(handler)),
    }


def handler_class_path(cls: type) -> str:
    """`module.QualName` of a handler class, as the plan records it (the trainer checks it)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def apply_defaults(plan: TrainingPlan) -> None:
    """Layer 1: the built-in defaults (plan_types.PlanValues), each with the reason it exists."""
    for key, (value, why) in DEFAULTS.items():
        plan.set(key, value, "default", why)


def apply_handler(plan: TrainingPlan, hparams: HandlerParams, info: Any, handler_name: str) -> None:
    """Layer 2: the handler's recommendations (HANDLER_KEYS), the context cap, forced 4-bit, and the
    rank by model size where the handler states none."""
    for hkey, pkey in HANDLER_KEYS.items():
        value = getattr(hparams, hkey)
        if value is None or (hkey == "training_precision" and value == "auto"):
            continue
        if pkey == "target_modules":
            value = _parse_targets(value)
        plan.set(pkey, value, "handler", f"{handler_name}: {hkey}")
    _cap_to_context(plan, info, "handler")
    if forces_4bit(hparams):
        why = f"{handler_name}: force_4bit (the seed's pattern 4: >30B models train 4-bit)"
        plan.set("method", "qlora", "handler", why)
    # auto rank by size sits at the handler layer: the handler may state its own rank
    if plan.source("lora_r") == "default":
        rank, why = auto_lora_rank(info.num_parameters or (info.params_billions or 0) * 1e9 or None)
        plan.set("lora_r", rank, "model size", why)


def _cap_to_context(plan: TrainingPlan, info: Any, source: str) -> None:
    if info.context_length and plan.value("max_seq_length") > info.context_length:
        plan.set("max_seq_length", info.context_length, source, f"model context length {info.context_length}")


def apply_hardware(plan: TrainingPlan, hw: Any, info: Any) -> None:
    """Layer 3: device and threads (precision and attention are derived once the batch shape is known)."""
    plan.set("device", hw.accelerator, "hardware", f"{hw.accelerator} detected")
    plan.set("torch_threads", hw.cpu_count, "hardware", f"{hw.cpu_count} CPU cores")
    if hw.accelerator == "cpu" and plan.value("gradient_checkpointing") and (info.params_billions or 0) < 3:
        why = "CPU with a small model: recomputation costs ~27% and memory is ample"
        plan.set("gradient_checkpointing", False, "hardware", why)


def apply_mode(plan: TrainingPlan, mode: str) -> None:
    """Layer 4: the mode's settings. Modes scale the handler's learning rate and rank rather than replace
    them: a 70B model and a 135M one need very different rates, and the handler knows which."""
    for key, value in mode_settings(mode).items():
        plan.set(key, value, "mode", f"--mode {mode}")
    factor = plan.value("learning_rate_factor")
    if factor != 1:
        base_lr = plan.value("learning_rate")
        why = f"--mode {mode}: {factor:g} x {base_lr:g} ({plan.source('learning_rate')})"
        plan.set("learning_rate", float(f"{base_lr * factor:.3g}"), "mode", why)
    rank_factor = plan.value("lora_rank_factor")
    if rank_factor != 1:
        base_r = plan.value("lora_r")
        plan.set(
            "lora_r", int(base_r * rank_factor), "mode", f"--mode {mode}: rank x{rank_factor} of {base_r}"
        )
        if plan.source("lora_alpha") == "handler":
            plan.set("lora_alpha", None, "mode", "2 x rank")


def apply_user(plan: TrainingPlan, user: Mapping[str, Any]) -> None:
    """Layer 5: the user's flags, each credited to its flag."""
    for key in USER_KEYS:
        if key in user:
            plan.set(key, user[key], "user", "--" + key.replace("_", "-"))
    if "tensorboard" in user and not user["tensorboard"]:
        plan.set("tensorboard", False, "user", "--no-tensorboard")
    if "resume" in user:
        plan.set(
            "resume", user["resume"], "user", "--resume-from" if user["resume"] != "latest" else "--resume"
        )


def derive_settings(
    plan: TrainingPlan, hw: Any, info: Any, hparams: HandlerParams, user: Mapping[str, Any]
) -> None:
    """Settings that follow from the others: precision, attention, fused LoRA, expert LoRA, alpha,
    --force-epochs and --max-steps 0."""
    from llm_installer.train.preference import resolve_preference

    resolve_preference(plan, user)  # padded pair batches, before attention is chosen for them
    resolve_precision(plan, hw, info)
    resolve_attention(plan, hw.accelerator, info, hparams)
    if plan.value("method") != "lora":
        plan.set("fused_lora", False, plan.source("method"), "DoRA/QLoRA layers run PEFT's own forward")
    resolve_expert_lora(plan)
    if plan.source("lora_r") == "user" and plan.source("lora_alpha") != "user":
        plan.set("lora_alpha", None, "user", "2 x rank")
    if plan.value("lora_alpha") is None:
        plan.set("lora_alpha", 2 * plan.value("lora_r"), plan.source("lora_r"), "2 x rank")
    if plan.value("force_epochs"):
        why = "--force-epochs turns early stopping, overfitting and perfect-loss stops off"
        plan.set("auto_stop", False, "user", why)
        plan.set("plateau_cycles", None, "user", "--force-epochs")
    if plan.value("max_steps") == 0:
        plan.set("max_steps", None, "user", "--max-steps 0 means no limit")


def check_plan(plan: TrainingPlan, hw: Any, info: Any, user: Mapping[str, Any]) -> None:
    """Refuse, with one line, a plan this machine cannot run or one without data."""
    if plan.value("optimizer") in BNB_OPTIMIZERS and not (hw.cuda and _bitsandbytes_available()):
        raise UserError(
            f"--optimizer {plan.value('optimizer')} needs bitsandbytes on an NVIDIA GPU; use --optimizer adamw"
        )
    check_method(plan.value("method"), plan.source("method"), hw, info)
    if plan.value("data") is None and not user.get("_allow_no_data"):
        raise UserError("--data is required: a dataset file, folder, glob or bundled example name")


def build_plan(
    model_folder: Any,
    args: Any = None,
    *,
    info: Any = None,
    handler: Any = None,
    hardware: Any = None,
) -> TrainingPlan:
    """Resolve every training setting for `model_folder` from the layers, recording each one's source.

    `args` holds the user's flags (a mapping or argparse-like namespace; None or missing = not given).
    `info`, `handler` and `hardware` default to the folder's ModelInfo, the registry's handler for it and
    `hardware.detect()`; they are parameters so other front ends (a web UI, a sweep) can reuse the resolver.
    """
    from llm_installer import hardware as hw_mod
    from llm_installer.handlers.params import handler_params
    from llm_installer.model_info import ModelInfo

    user = normalize_user_flags(args)
    root = Path(model_folder.root) if hasattr(model_folder, "root") else Path(model_folder)
    info = ModelInfo.coerce(model_folder.load_info() if info is None else info)
    if handler is None:
        from llm_installer.handlers.registry import get_handler

        handler = get_handler(info)
    hw = hardware or hw_mod.detect()
    # the handler is asked once, here: later stages read what the plan recorded
    hparams = handler.training_params() if hasattr(handler, "training_params") else handler_params(handler)
    plan = TrainingPlan(
        version=PLAN_VERSION, model=model_record(root, info, handler), handler_params=hparams.to_dict()
    )
    apply_defaults(plan)
    apply_handler(plan, hparams, info, plan.model["handler"])
    apply_hardware(plan, hw, info)
    apply_mode(plan, user.get("mode", "medium"))
    _cap_to_context(plan, info, "mode")
    apply_user(plan, user)
    derive_settings(plan, hw, info, hparams, user)
    check_plan(plan, hw, info, user)
    return plan


# ---------------------------------------------------------------------------------------------------------
# Memory estimate


def estimate_memory(
    plan: TrainingPlan,
    *,
    lora_params: int | None = None,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """A rough peak-memory estimate (GiB) for the plan: `fit.training_memory` (the rule `check` uses)
    with the plan's precision, method, tokens per step, checkpointing and output-head setting."""
    from llm_installer.fit import training_memory

    return training_memory(
        plan.model.get("num_parameters") or 0,
        precision=plan.value("precision"),
        method=plan.value("method"),
        tokens=plan.value("batch_size") * plan.value("max_seq_length"),
        hidden_size=hidden_size,
        num_layers=num_layers,
        vocab_size=vocab_size,
        gradient_checkpointing=bool(plan.value("gradient_checkpointing")),
        head_on_labels=bool(plan.value("head_on_labels")),
        lora_params=lora_params,
    )
