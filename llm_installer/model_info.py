"""ModelInfo: what detection learns about a model from its config and files, without loading weights.

It is the typed value that flows from `detect` to the handlers, the plan and the store's
`model_info.json`. Handlers also accept a plain dict (the seed's unit test builds
`MyHandler({'model_id': 'test/model', 'model_size_gb': 7.0})`), so every field but `model_id` has a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TaskKind = Literal["causal_lm", "vision_language", "moe", "seq2seq", "encoder", "diffusion", "unknown"]


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_id: str
    source: str = "unknown"  # hub | local | gguf | bundled | unknown
    revision: str | None = None
    model_type: str | None = None  # config.json "model_type", e.g. "llama"
    family: str | None = None  # normalised family, e.g. "llama", "qwen2", "mixtral"
    architecture: str | None = None  # first of config.json "architectures"
    architectures: list[str] = Field(default_factory=list)
    task: TaskKind = "causal_lm"
    trainable: bool = True
    num_parameters: int | None = None
    num_active_parameters: int | None = None  # MoE: parameters used per token (estimate)
    model_size_gb: float | None = None  # on-disk size of the weights
    context_length: int | None = None
    dtype: str | None = None
    has_chat_template: bool = False
    is_instruct: bool = False
    trust_remote_code: bool = False  # the model needs custom code from its repository
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    tie_word_embeddings: bool | None = None
    config: dict[str, Any] = Field(default_factory=dict)  # raw config.json

    @classmethod
    def coerce(cls, value: ModelInfo | Mapping[str, Any]) -> ModelInfo:
        """Accept a ModelInfo or a plain mapping (as the seed's tests pass)."""
        if isinstance(value, ModelInfo):
            return value
        data = dict(value)
        data.setdefault("model_id", "unknown/model")
        return cls.model_validate(data)

    @property
    def merged_config(self) -> dict[str, Any]:
        """config.json with a vision-language model's `text_config` merged in (the outer config's own keys
        win): the one home of that merge, for the handlers and the plan's layer shapes."""
        cfg = dict(self.config or {})
        text = cfg.get("text_config")
        if isinstance(text, dict):
            return {**text, **{k: v for k, v in cfg.items() if k != "text_config"}}
        return cfg

    @property
    def params_billions(self) -> float | None:
        """Parameter count in billions; estimated from on-disk size (bf16) when not counted."""
        if self.num_parameters:
            return self.num_parameters / 1e9
        if self.model_size_gb:
            return self.model_size_gb / 2.0
        return None
