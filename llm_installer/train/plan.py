"""The training plan: every setting of a run, resolved once, with where its value came from.

Precedence, lowest first: built-in default < the model's handler (`get_training_parameters()`) < this
machine's hardware < the chosen mode < the user's flags. The plan is a plain JSON-serialisable dict so it
can be printed by `train --dry-run`, stored in `adapter_info.json` and hashed into the resume fingerprint;
the trainer reads only the plan, never the command line.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llm_installer.errors import UserError
from llm_installer.train.modes import MODES, mode_settings

PLAN_VERSION = 1

# Built-in defaults with the reason each exists.
DEFAULTS: dict[str, tuple[Any, str]] = {
    "data": (None, "required: --data"),
    "format": ("auto", "detect the dataset format per file"),
    "mode": ("medium", "the balanced mode"),
    "method": ("lora", "plain LoRA works on every device"),
    "epochs": (3, "usual LoRA recipe"),
    "max_steps": (None, "no step limit"),
    "batch_size": (4, "examples per optimizer micro-step"),
    "gradient_accumulation": (1, "no accumulation"),
    "learning_rate": (2e-4, "usual LoRA learning rate"),
    "lr_scheduler": ("cosine", "usual LoRA schedule"),
    "warmup_ratio": (0.03, "short warmup"),
    "weight_decay": (0.0, "LoRA weights are small already"),
    "max_grad_norm": (1.0, "gradient clipping"),
    "lora_r": (16, "LoRA rank"),
    "lora_alpha": (None, "2 x rank"),
    "lora_dropout": (0.05, "light regularisation"),
    "lora_rank_factor": (1, "rank multiplier of the mode"),
    "learning_rate_factor": (1.0, "learning-rate multiplier of the mode"),
    "target_modules": (None, "every linear layer"),
    "modules_to_save": (None, "none"),
    "max_seq_length": (2048, "conservative sequence limit"),
    "max_examples": (None, "use every example"),
    "validation_split": (0.1, "10% held out for early stopping and the report"),
    "patience": (3, "evaluations without improvement before stopping"),
    "overfitting_threshold": (
        0.5,
        "stop when validation loss exceeds training loss by this much and keeps growing",
    ),
    "perfect_loss": (0.01, "training loss this low cannot improve: stop"),
    "auto_stop": (True, "early stopping, overfitting and perfect-loss checks on"),
    "force_epochs": (False, "auto-stop allowed"),
    "plateau_cycles": (None, "no plateau stop outside circle mode"),
    "plateau_tolerance": (0.01, "relative improvement below which the loss counts as flat"),
    "keep_best": (False, "the adapter is the last state"),
    "optimizer": ("adamw_torch", "AdamW, the LoRA standard"),
    "seed": (42, "reproducible runs"),
    "train_on_inputs": (False, "loss on assistant answers only"),
    "strict": (False, "bad records are skipped and written to rejects.jsonl in the run folder"),
    "system_prompt": (None, "the chat template's own default"),
    "packing": (True, "padding-free batches: no compute on padding, no cross-example attention"),
    "head_on_labels": (True, "output head only where the loss needs it"),
    "fused_lora": (True, "LoRA layers in one fused forward/backward (plain LoRA, no dropout)"),
    "precision": ("fp32", "safe everywhere"),
    "gradient_checkpointing": (False, "not needed for small models"),
    "attn_implementation": ("sdpa", "PyTorch fused attention, packing-aware"),
    "torch_threads": (None, "torch's default"),
    "eval_steps": (None, "evaluate once per epoch"),
    "save_steps": (None, "checkpoint once per epoch"),
    "save_total_limit": (3, "keep the 3 newest checkpoints"),
    "logging_steps": (5, "log every 5 steps"),
    "tensorboard": (True, "TensorBoard logs in the run folder"),
    "report_prompts": (3, "held-out prompts answered before/after in report.md"),
    "report_max_new_tokens": (64, "answer length in the report"),
    "output": (None, "the model folder's lora/"),
    "resume": (None, "start a new run"),
    "device": ("cpu", "no accelerator"),
    # preference training (issue 15, train/preference.py): the objective beside the adapter kind
    "objective": ("sft", "supervised: loss on the answers"),
    "beta": (0.1, "DPO's usual beta (TRL's default); ORPO's odds-ratio weight"),
    "loss_type": (None, "the objective's own loss (sigmoid for DPO)"),
    "init_adapter": (None, "a new adapter"),
}

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

# Settings that do not change the trajectory of the weights: left out of the resume fingerprint.
NOT_FINGERPRINTED = {
    "resume",
    "output",
    "tensorboard",
    "logging_steps",
    "report_prompts",
    "report_max_new_tokens",
    "patience",
    "overfitting_threshold",
    "perfect_loss",
    "auto_stop",
    "force_epochs",
    "plateau_cycles",
    "plateau_tolerance",
    "keep_best",
    "save_steps",
    "save_total_limit",
    "torch_threads",
    "epochs",
    "max_steps",
}

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


class TrainingPlan(dict):
    """`{"version", "model": {...}, "settings": {key: {"value", "source", "why"}}}` — plain JSON.

    A dict subclass so `json.dumps(plan)` works and the plan can be rebuilt from adapter_info.json;
    `plan[key]`-style access to settings goes through `value(key)`.
    """

    def value(self, key: str, default: Any = None) -> Any:
        entry = self["settings"].get(key)
        return default if entry is None else entry["value"]

    def source(self, key: str) -> str | None:
        entry = self["settings"].get(key)
        return None if entry is None else entry["source"]

    def values(self) -> dict[str, Any]:  # type: ignore[override]
        """Every setting's value (no provenance)."""
        return {k: v["value"] for k, v in self["settings"].items()}

    @property
    def model(self) -> dict[str, Any]:
        return self["model"]

    def fingerprint(self, data_fingerprint: str | None = None) -> str:
        """sha256 of base model + revision, data fingerprint and the trajectory-relevant settings.

        A resumed run must match it: continuing from a checkpoint of another model, dataset or recipe would
        silently mix two runs.
        """
        relevant = {k: v for k, v in self.values().items() if k not in NOT_FINGERPRINTED}
        payload = {
            "model_id": self["model"].get("model_id"),
            "revision": self["model"].get("revision"),
            "data": data_fingerprint,
            "settings": relevant,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(self, indent=2, sort_keys=False, default=str)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingPlan:
        return cls(json.loads(json.dumps(data, default=str)))


class _Resolver:
    """Collects settings layer by layer, remembering the last layer that set each one."""

    def __init__(self) -> None:
        self.settings: dict[str, dict[str, Any]] = {}

    def set(self, key: str, value: Any, source: str, why: str = "") -> None:
        self.settings[key] = {"value": value, "source": source, "why": why}

    def get(self, key: str) -> Any:
        return self.settings[key]["value"]


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


def forces_4bit(hparams: Mapping[str, Any]) -> bool:
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


def _text_config(info: Any) -> dict[str, Any]:
    cfg = dict(info.config or {})
    text = cfg.get("text_config")
    return {**cfg, **text} if isinstance(text, dict) else cfg


def model_shapes(info: Any) -> tuple[int, int | None]:
    """(hidden size, MLP width) from the model's config, for the precision probe (defaults when absent)."""
    cfg = _text_config(info)
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or info.hidden_size or 1024
    inter = cfg.get("intermediate_size") or cfg.get("moe_intermediate_size") or cfg.get("n_inner")
    return int(hidden), (int(inter) if inter else None)


def resolve_precision(r: _Resolver, hw: Any, info: Any) -> None:
    """The precision the run applies: the user's --precision, else measured on this machine (CPU) or the
    GPU's compute capability; a handler's wish is shown when the measurement overrules it."""
    from llm_installer.precision import choose_precision

    entry = r.settings["precision"]
    requested = entry["value"] if entry["source"] == "user" else "auto"
    hidden, inter = model_shapes(info)
    rows = int(r.get("batch_size")) * int(r.get("max_seq_length"))
    choice = choose_precision(requested, hw, hidden=hidden, intermediate=inter, rows=rows)
    if entry["source"] == "user":
        r.set("precision", choice.precision, "user", choice.why)
        return
    asked = (
        f" (handler asked {entry['value']})"
        if entry["source"] == "handler" and entry["value"] != choice.precision
        else ""
    )
    r.set("precision", choice.precision, "hardware", choice.why + asked)


def resolve_attention(r: _Resolver, hw: Any, info: Any, hparams: Mapping[str, Any]) -> None:
    """Packing and the attention implementation through `train.attention`'s rule (one home for it).

    Packing goes off, with the reason, for a model whose packed rows would not be exact (an explicit
    --packing there is refused); the handler's `supports_flash_attention` lets flash-attention 2 in on CUDA,
    and its `special_requirements['attn_implementation']` names the padded-rows implementation."""
    import importlib.util

    from llm_installer.train.attention import choose_attention, packing_blocker

    cfg = dict(info.config or {})
    model_type = info.model_type or cfg.get("model_type") or ""
    if r.get("packing"):
        blocker = packing_blocker(model_type, cfg)
        if blocker:
            if r.settings["packing"]["source"] == "user":
                raise UserError(
                    f"--packing: packed rows are not exact for {info.model_id}: {blocker}; drop --packing"
                )
            r.set("packing", False, "handler", f"padded rows: {blocker}")
    flash = (
        bool(hparams.get("supports_flash_attention")) and importlib.util.find_spec("flash_attn") is not None
    )
    impl, why = choose_attention(
        model_type, cfg, packing=bool(r.get("packing")), device=hw.accelerator, flash_available=flash
    )
    wanted = (hparams.get("special_requirements") or {}).get("attn_implementation")
    if not r.get("packing") and wanted and impl != "flash_attention_2" and wanted != impl:
        impl, why = wanted, f"padded rows: the handler's special_requirements ask {wanted}"
    source = "handler" if wanted == impl else r.settings["packing"]["source"]
    r.set("attn_implementation", impl, source, why)


def resolve_expert_lora(r: _Resolver) -> None:
    """State what fused MoE experts get: PEFT's expert wrapper takes no dropout and no DoRA, so they train
    plain LoRA without dropout while the other layers keep the mode's settings (train.lora_setup)."""
    from llm_installer.train.lora_setup import describe_expert_settings

    targets = r.get("target_modules")
    if not isinstance(targets, list):
        return
    experts = [t for t in targets if "experts." in t and not t.startswith("shared_expert")]
    if not experts:
        return
    others = [t for t in targets if t not in experts]
    why = describe_expert_settings(
        {"target_parameters": experts, "target_modules": others},
        dropout=r.get("lora_dropout"),
        method=r.get("method"),
    )
    r.set("expert_lora", "dropout 0, plain LoRA", "handler", why or "")


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
    from llm_installer.model_info import ModelInfo

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
    from llm_installer.train.preference import check_preference_flags, resolve_preference

    check_preference_flags(user)  # --method dpo|orpo -> objective; --beta, --loss-type
    _check_user_values(user)
    if user.get("precision") == "auto":
        user.pop("precision")  # the hardware layer decides, as without the flag
    if user.get("optimizer"):
        user["optimizer"] = OPTIMIZERS[user["optimizer"]]

    root = Path(model_folder.root) if hasattr(model_folder, "root") else Path(model_folder)
    if info is None:
        info = model_folder.load_info()
    info = ModelInfo.coerce(info)
    if handler is None:
        from llm_installer.handlers.registry import get_handler

        handler = get_handler(info)
    hw = hardware or hw_mod.detect()

    r = _Resolver()
    # 1. defaults
    for key, (value, why) in DEFAULTS.items():
        r.set(key, value, "default", why)

    # 2. handler
    handler_name = getattr(handler, "name", type(handler).__name__)
    try:
        hparams = dict(handler.get_training_parameters() or {})
    except Exception as exc:  # a user handler that breaks must not hide behind a traceback
        raise UserError(f"handler {handler_name} failed in get_training_parameters(): {exc}") from None
    for hkey, pkey in HANDLER_KEYS.items():
        value = hparams.get(hkey)
        if value is None or (hkey == "training_precision" and value == "auto"):
            continue
        if pkey == "target_modules":
            value = _parse_targets(value)
        r.set(pkey, value, "handler", f"{handler_name}: {hkey}")
    if info.context_length and r.get("max_seq_length") > info.context_length:
        r.set("max_seq_length", info.context_length, "handler", f"model context length {info.context_length}")
    if forces_4bit(hparams):
        r.set(
            "method",
            "qlora",
            "handler",
            f"{handler_name}: force_4bit (the seed's pattern 4: >30B models train 4-bit)",
        )

    # auto rank by size sits at the handler layer: the handler may state its own rank
    if r.settings["lora_r"]["source"] == "default":
        rank, why = auto_lora_rank(info.num_parameters or (info.params_billions or 0) * 1e9 or None)
        r.set("lora_r", rank, "model size", why)

    # 3. hardware (precision and attention are decided below, once the batch shape is known)
    r.set("device", hw.accelerator, "hardware", f"{hw.accelerator} detected")
    r.set("torch_threads", hw.cpu_count, "hardware", f"{hw.cpu_count} CPU cores")
    params_b = info.params_billions or 0
    if hw.accelerator == "cpu" and r.get("gradient_checkpointing") and params_b < 3:
        r.set(
            "gradient_checkpointing",
            False,
            "hardware",
            "CPU with a small model: recomputation costs ~27% and memory is ample",
        )

    # 4. mode
    mode = user.get("mode", "medium")
    for key, value in mode_settings(mode).items():
        r.set(key, value, "mode", f"--mode {mode}")
    if info.context_length and r.get("max_seq_length") > info.context_length:
        r.set("max_seq_length", info.context_length, "mode", f"model context length {info.context_length}")
    # Modes scale the handler's recommendations rather than replace them: a 70B model and a 135M one
    # need very different rates, and the handler knows which.
    factor = r.get("learning_rate_factor")
    if factor != 1:
        base_lr = r.get("learning_rate")
        r.set(
            "learning_rate",
            float(f"{base_lr * factor:.3g}"),
            "mode",
            f"--mode {mode}: {factor:g} x {base_lr:g} ({r.settings['learning_rate']['source']})",
        )
    if r.get("lora_rank_factor") != 1:
        base_r = r.get("lora_r")
        r.set(
            "lora_r",
            int(base_r * r.get("lora_rank_factor")),
            "mode",
            f"--mode {mode}: rank x{r.get('lora_rank_factor')} of {base_r}",
        )
        if r.settings["lora_alpha"]["source"] == "handler":
            r.set("lora_alpha", None, "mode", "2 x rank")

    # 5. user flags
    for key in USER_KEYS:
        if key in user:
            flag = "--" + key.replace("_", "-")
            r.set(key, user[key], "user", flag)
    if "tensorboard" in user and not user["tensorboard"]:
        r.set("tensorboard", False, "user", "--no-tensorboard")
    if "resume" in user:
        r.set("resume", user["resume"], "user", "--resume-from" if user["resume"] != "latest" else "--resume")

    # derived settings
    resolve_preference(r, user)  # issue 15: padded pair batches, before attention is chosen for them
    resolve_precision(r, hw, info)
    resolve_attention(r, hw, info, hparams)
    if r.get("method") != "lora":
        r.set("fused_lora", False, r.settings["method"]["source"], "DoRA/QLoRA layers run PEFT's own forward")
    resolve_expert_lora(r)
    if r.settings["lora_r"]["source"] == "user" and r.settings["lora_alpha"]["source"] != "user":
        r.set("lora_alpha", None, "user", "2 x rank")
    if r.get("lora_alpha") is None:
        r.set("lora_alpha", 2 * r.get("lora_r"), r.settings["lora_r"]["source"], "2 x rank")
    if r.get("force_epochs"):
        r.set(
            "auto_stop",
            False,
            "user",
            "--force-epochs turns early stopping, overfitting and perfect-loss stops off",
        )
        r.set("plateau_cycles", None, "user", "--force-epochs")
    if r.get("max_steps") == 0:
        r.set("max_steps", None, "user", "--max-steps 0 means no limit")
    if r.get("optimizer") in BNB_OPTIMIZERS and not (hw.cuda and _bitsandbytes_available()):
        raise UserError(
            f"--optimizer {r.get('optimizer')} needs bitsandbytes on an NVIDIA GPU; use --optimizer adamw"
        )
    check_method(r.get("method"), r.settings["method"]["source"], hw, info)
    if r.get("data") is None and not user.get("_allow_no_data"):
        raise UserError("--data is required: a dataset file, folder, glob or bundled example name")

    model = {
        "folder": str(root),
        "model_id": info.model_id,
        "revision": info.revision,
        "source": info.source,
        "family": info.family or info.model_type,
        "architecture": info.architecture,
        "task": info.task,
        "num_parameters": info.num_parameters,
        "context_length": info.context_length,
        "handler": handler_name,
        "handler_class": f"{type(handler).__module__}.{type(handler).__qualname__}",
    }
    plan = TrainingPlan(version=PLAN_VERSION, model=model, settings=r.settings)
    return TrainingPlan.from_dict(plan)


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
    """A rough peak-memory estimate (GiB) for the plan: weights + LoRA state + activations + output head.

    Rough on purpose: it answers "will this fit?" before loading anything. Activations assume ~34 values of
    hidden width per token per layer kept for backward (attention + MLP), as in the usual transformer
    estimates, in the training precision.
    """
    n = plan.model.get("num_parameters") or 0
    bytes_w = {"fp32": 4, "bf16": 2, "fp16": 2}.get(plan.value("precision"), 4)
    if plan.value("method") == "qlora":
        weights = n * 0.56
    else:
        weights = n * (4 if plan.value("precision") == "fp32" else 2)
    if lora_params is None:
        lora_params = int(n * 0.01)
    lora_state = lora_params * 16  # weight + grad fp32 + two Adam moments
    hidden = hidden_size or int(math.sqrt(max(n, 1) / 12 / max(num_layers or 24, 1))) or 1024
    layers = num_layers or 24
    tokens = plan.value("batch_size") * plan.value("max_seq_length")
    act_factor = 10 if plan.value("gradient_checkpointing") else 34
    activations = tokens * hidden * layers * act_factor * bytes_w / 2
    vocab = vocab_size or 32000
    head_tokens = tokens if not plan.value("head_on_labels") else tokens // 2
    head = head_tokens * vocab * 4 * 3  # logits, log-softmax and its gradient in fp32
    overhead = 0.6 * 1024**3  # torch + python + tokenizer
    total = weights + lora_state + activations + head + overhead
    gib = 1024**3
    return {
        "weights_gb": weights / gib,
        "lora_state_gb": lora_state / gib,
        "activations_gb": activations / gib,
        "output_head_gb": head / gib,
        "overhead_gb": overhead / gib,
        "total_gb": total / gib,
    }
