"""Training modes: named bundles of concrete settings layered over defaults, handler and hardware.

A mode sits above the handler and the hardware in the plan's precedence (default < handler < hardware <
mode < user flags) because it states what the user asked for ("quick try", "best quality"), while explicit
flags still win. The learning rate and rank are factors of the handler's recommendation (a 70B model
and a 135M one need different rates), everything else is an absolute value. Every value here is documented in docs/training.md; keep the two in step.
"""

from __future__ import annotations

from typing import Any

MODES: dict[str, dict[str, Any]] = {
    # Quick iteration: few epochs, a high LoRA learning rate so small datasets move within minutes,
    # no LoRA dropout (its random masks cost ~17% of a CPU step), short sequences, early stop after one bad eval.
    "fast": {
        "epochs": 3,
        "learning_rate_factor": 2.0,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "lora_dropout": 0.0,
        "max_seq_length": 512,
        "patience": 1,
        "logging_steps": 1,
        "report_prompts": 2,
        "report_max_new_tokens": 32,
    },
    # The default: the usual LoRA recipe.
    "medium": {
        "epochs": 3,
        "learning_rate_factor": 1.0,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.03,
        "lora_dropout": 0.05,
        "patience": 3,
        "logging_steps": 5,
        "report_prompts": 3,
        "report_max_new_tokens": 64,
    },
    # Quality: more epochs at a lower rate, a larger rank, more patience and more regularisation.
    "slow": {
        "epochs": 5,
        "learning_rate_factor": 0.5,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.05,
        "lora_dropout": 0.1,
        "lora_rank_factor": 2,
        "patience": 5,
        "weight_decay": 0.01,
        "logging_steps": 5,
        "report_prompts": 5,
        "report_max_new_tokens": 96,
    },
    # Repeat a small dataset (one cycle = one epoch) until the training loss plateaus or the cycle limit.
    "circle": {
        "epochs": 20,
        "learning_rate_factor": 1.0,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "lora_dropout": 0.05,
        "plateau_cycles": 2,
        "plateau_tolerance": 0.01,
        "patience": 3,
        "logging_steps": 1,
        "report_prompts": 3,
        "report_max_new_tokens": 64,
    },
    # Run until interrupted (Ctrl-C / SIGTERM); evaluate and checkpoint periodically, keep the best adapter.
    "non-stop": {
        "epochs": 100_000,
        "learning_rate_factor": 0.5,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "lora_dropout": 0.05,
        "auto_stop": False,
        "keep_best": True,
        "eval_steps": 50,
        "save_steps": 50,
        "logging_steps": 5,
        "report_prompts": 3,
        "report_max_new_tokens": 64,
    },
}


def mode_settings(mode: str) -> dict[str, Any]:
    """The concrete settings of `mode` (a copy), raising KeyError for an unknown one."""
    return dict(MODES[mode])
