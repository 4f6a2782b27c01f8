"""The plan's typed settings and the `TrainingPlan` that carries them between the stages.

`PlanValues` declares every setting once: its type, its built-in default and the reason that default
exists (the plan's "why" for a default). Adding a setting is one field line. A `TrainingPlan` holds, for
each setting, `{"value", "source", "why"}` — the JSON `train --dry-run` prints, `adapter_info.json` stores
and the resume fingerprint hashes — and refuses a value of the wrong type or a key that is no setting
(`plan.value("typo")` raises). It also records the model, the handler class and the handler's validated
parameters, so no stage after `build_plan` asks the handler again.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PLAN_VERSION = 1
_UNSET: Any = object()


def _opt(description: str) -> Any:
    """A setting that exists only when a rule sets it (no default entry in every plan)."""
    return Field(None, description=description, json_schema_extra={"optional": True})


class PlanValues(BaseModel):
    """Every plan setting: type, built-in default, and why that default (the plan's lowest layer)."""

    model_config = ConfigDict(extra="forbid")

    data: Any = Field(None, description="required: --data")
    format: str = Field("auto", description="detect the dataset format per file")
    mode: str = Field("medium", description="the balanced mode")
    method: str = Field("lora", description="plain LoRA works on every device")
    epochs: int | float = Field(3, description="usual LoRA recipe")
    max_steps: int | None = Field(None, description="no step limit")
    batch_size: int = Field(4, description="examples per optimizer micro-step")
    gradient_accumulation: int = Field(1, description="no accumulation")
    learning_rate: float = Field(2e-4, description="usual LoRA learning rate")
    lr_scheduler: str = Field("cosine", description="usual LoRA schedule")
    warmup_ratio: float = Field(0.03, description="short warmup")
    weight_decay: float = Field(0.0, description="LoRA weights are small already")
    max_grad_norm: float = Field(1.0, description="gradient clipping")
    lora_r: int = Field(16, description="LoRA rank")
    lora_alpha: int | float | None = Field(None, description="2 x rank")
    lora_dropout: float = Field(0.05, description="light regularisation")
    lora_rank_factor: int | float = Field(1, description="rank multiplier of the mode")
    learning_rate_factor: float = Field(1.0, description="learning-rate multiplier of the mode")
    target_modules: list[str] | str | None = Field(None, description="every linear layer")
    modules_to_save: list[str] | None = Field(None, description="none")
    max_seq_length: int = Field(2048, description="conservative sequence limit")
    max_examples: int | None = Field(None, description="use every example")
    validation_split: float = Field(0.1, description="10% held out for early stopping and the report")
    patience: int = Field(3, description="evaluations without improvement before stopping")
    overfitting_threshold: float = Field(
        0.5, description="stop when validation loss exceeds training loss by this much and keeps growing"
    )
    perfect_loss: float = Field(0.01, description="training loss this low cannot improve: stop")
    auto_stop: bool = Field(True, description="early stopping, overfitting and perfect-loss checks on")
    force_epochs: bool = Field(False, description="auto-stop allowed")
    plateau_cycles: int | None = Field(None, description="no plateau stop outside circle mode")
    plateau_tolerance: float = Field(
        0.01, description="relative improvement below which the loss counts as flat"
    )
    keep_best: bool = Field(False, description="the adapter is the last state")
    optimizer: str = Field("adamw_torch", description="AdamW, the LoRA standard")
    seed: int = Field(42, description="reproducible runs")
    train_on_inputs: bool = Field(False, description="loss on assistant answers only")
    strict: bool = Field(
        False, description="bad records are skipped and written to rejects.jsonl in the run folder"
    )
    system_prompt: str | None = Field(None, description="the chat template's own default")
    packing: bool = Field(
        True, description="padding-free batches: no compute on padding, no cross-example attention"
    )
    head_on_labels: bool = Field(True, description="output head only where the loss needs it")
    fused_lora: bool = Field(
        True, description="LoRA layers in one fused forward/backward (plain LoRA, no dropout)"
    )
    precision: str = Field("fp32", description="safe everywhere")
    gradient_checkpointing: bool = Field(False, description="not needed for small models")
    attn_implementation: str = Field("sdpa", description="PyTorch fused attention, packing-aware")
    torch_threads: int | None = Field(None, description="torch's default")
    eval_steps: int | None = Field(None, description="evaluate once per epoch")
    save_steps: int | None = Field(None, description="checkpoint once per epoch")
    save_total_limit: int | None = Field(3, description="keep the 3 newest checkpoints")
    logging_steps: int = Field(5, description="log every 5 steps")
    tensorboard: bool = Field(True, description="TensorBoard logs in the run folder")
    report_prompts: int = Field(3, description="held-out prompts answered before/after in report.md")
    report_max_new_tokens: int = Field(64, description="answer length in the report")
    output: Any = Field(None, description="the model folder's lora/")
    resume: Any = Field(None, description="start a new run")
    device: str = Field("cpu", description="no accelerator")
    # preference training (train/preference.py): the objective beside the adapter kind
    objective: str = Field("sft", description="supervised: loss on the answers")
    beta: float = Field(0.1, description="DPO's usual beta (TRL's default); ORPO's odds-ratio weight")
    loss_type: str | None = Field(None, description="the objective's own loss (sigmoid for DPO)")
    init_adapter: str | None = Field(None, description="a new adapter")
    expert_lora: str | None = _opt("what fused MoE experts train with")


def _is_optional(name: str) -> bool:
    extra = PlanValues.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("optional"))


# Built-in defaults with the reason each exists (the plan's first layer), from PlanValues.
DEFAULTS: dict[str, tuple[Any, str]] = {
    name: (f.default, f.description or "")
    for name, f in PlanValues.model_fields.items()
    if not _is_optional(name)
}


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


@cache
def _adapter(key: str) -> TypeAdapter:
    return TypeAdapter(PlanValues.model_fields[key].annotation)


def check_setting(key: str, value: Any) -> None:
    """Refuse a key that is no setting, or a value of the wrong type (a programming error, named)."""
    if key not in PlanValues.model_fields:
        raise KeyError(f"{key!r} is not a plan setting (see llm_installer/train/plan_types.py)")
    try:
        _adapter(key).validate_python(value)
    except ValidationError as exc:
        raise TypeError(f"plan setting {key}={value!r}: {exc.errors()[0]['msg']}") from None


class Settings(dict):
    """`{key: {"value", "source", "why"}}`, checked on every assignment (`settings[key] = {...}`)."""

    def __setitem__(self, key: str, entry: Mapping[str, Any]) -> None:
        if set(entry) != {"value", "source", "why"}:
            raise ValueError(
                f"plan setting {key}: an entry is {{'value', 'source', 'why'}}, got {sorted(entry)}"
            )
        check_setting(key, entry["value"])
        super().__setitem__(key, dict(entry))

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        for key, entry in dict(*args, **kwargs).items():
            self[key] = entry

    def setdefault(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if key not in self:
            self[key] = default
        return self[key]


class TrainingPlan:
    """`{"version", "model": {...}, "handler_params": {...}, "settings": {key: {"value", "source", "why"}}}`.

    `plan["settings"]`-style access is kept for callers and tests; `to_dict()` is the JSON. Settings a
    plan read from an older file may lack are filled from the defaults when read (`value`)."""

    def __init__(
        self,
        *,
        version: int = PLAN_VERSION,
        model: Mapping[str, Any] | None = None,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        handler_params: Mapping[str, Any] | None = None,
    ) -> None:
        self.version = int(version)
        self.model: dict[str, Any] = copy.deepcopy(dict(model or {}))
        self.handler_params: dict[str, Any] | None = (
            copy.deepcopy(dict(handler_params)) if handler_params else None
        )
        self.settings = Settings()
        for key, entry in (settings or {}).items():
            self.settings[key] = copy.deepcopy(dict(entry))

    # ---- dict-style access (the plan's JSON keys) ----------------------------------------------------

    _KEYS = ("version", "model", "handler_params", "settings")

    def __getitem__(self, key: str) -> Any:
        if key not in self._KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self._KEYS

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TrainingPlan):
            return self.to_dict() == other.to_dict()
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"TrainingPlan({self.model.get('model_id')!r}, {len(self.settings)} settings)"

    # ---- reading and changing settings ---------------------------------------------------------------

    def value(self, key: str, default: Any = _UNSET) -> Any:
        """The setting's value; a key that is no setting raises (never a silent None). A setting this plan
        lacks (an older file's, or an optional one no rule set) is `default`, else the built-in default."""
        if key not in PlanValues.model_fields:
            raise KeyError(f"{key!r} is not a plan setting (see llm_installer/train/plan_types.py)")
        entry = self.settings.get(key)
        if entry is None:
            return PlanValues.model_fields[key].default if default is _UNSET else default
        return entry["value"]

    def source(self, key: str) -> str | None:
        entry = self.settings.get(key)
        return None if entry is None else entry["source"]

    def why(self, key: str) -> str | None:
        entry = self.settings.get(key)
        return None if entry is None else entry["why"]

    def set(self, key: str, value: Any, source: str, why: str = "") -> None:
        """Change one setting, with where the new value comes from (checked like every assignment)."""
        self.settings[key] = {"value": value, "source": source, "why": why}

    def values(self) -> dict[str, Any]:
        """Every setting's value (no provenance)."""
        return {k: v["value"] for k, v in self.settings.items()}

    def fingerprint(self, data_fingerprint: str | None = None) -> str:
        """sha256 of base model + revision, data fingerprint and the trajectory-relevant settings.

        A resumed run must match it: continuing from a checkpoint of another model, dataset or recipe would
        silently mix two runs.
        """
        relevant = {k: v for k, v in self.values().items() if k not in NOT_FINGERPRINTED}
        payload = {
            "model_id": self.model.get("model_id"),
            "revision": self.model.get("revision"),
            "data": data_fingerprint,
            "settings": relevant,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ---- JSON -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON data (the `plan` of adapter_info.json and run_info.json)."""
        out: dict[str, Any] = {"version": self.version, "model": self.model}
        if self.handler_params is not None:
            out["handler_params"] = self.handler_params
        out["settings"] = dict(self.settings)
        return json.loads(json.dumps(out, default=str))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: TrainingPlan | Mapping[str, Any]) -> TrainingPlan:
        """A plan from its JSON (or a copy of a plan). Settings an older version wrote and this one no
        longer has are dropped, so old adapter_info.json files still load."""
        if isinstance(data, TrainingPlan):
            data = data.to_dict()
        data = json.loads(json.dumps(dict(data), default=str))
        settings = {k: v for k, v in (data.get("settings") or {}).items() if k in PlanValues.model_fields}
        return cls(
            version=data.get("version", PLAN_VERSION),
            model=data.get("model") or {},
            settings=settings,
            handler_params=data.get("handler_params"),
        )
