"""BaseHandler: the seed's training contract (handler-training-development.md) and what serving needs.

A handler holds the knowledge about one model family: which modules LoRA should adapt, which precision
and sequence length suit it, which dataset formats it supports, how its tokenizer must be set up for
training, its chat template and its stop tokens. Subclasses call `super()` and override only what
differs, exactly like the seed's examples.

Provenance: every `get_training_parameters()` defined in a handler class is wrapped (see
`__init_subclass__`) so that after the whole `super()` chain has run we know which class — or which
named rule inside it ("size rule (<1B)", "hardware (CPU: bf16 vs fp32 measured at plan time)") — set each key. `train --dry-run`
and `show NAME --training` print that as "value and why".
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from llm_installer.console import warn
from llm_installer.errors import UserError
from llm_installer.model_info import ModelInfo

if TYPE_CHECKING:
    from llm_installer.chat_format import ChatFormat
    from llm_installer.handlers.params import HandlerParams

logger = logging.getLogger(__name__)

BASE_SOURCE = "base default"

# Every dataset format the data module (llm_installer/data/formats.py) converts. Text-only handlers
# support all text formats (the seed's "Support for all formats"); vision handlers add the image ones.
TEXT_FORMATS: tuple[str, ...] = (
    "alpaca", "sharegpt", "openai", "chat", "qa", "completion", "text",
    "medical_qa", "code_instruct", "multi_choice",
)  # fmt: skip
VISION_FORMATS: tuple[str, ...] = ("vision_qa", "image_caption", "video_qa")

# The seed's preprocessing hints for its custom dataset formats (data/ reads them).
DEFAULT_PREPROCESSING: dict[str, dict[str, Any]] = {
    "medical_qa": {"add_context": True, "max_context_length": 2048},
    "code_instruct": {"syntax_highlighting": True, "language_tags": True},
    "multi_choice": {"shuffle_choices": False, "answer_format": "letter"},
}

# Common spellings of end-of-turn tokens, kept for code that imports it. The token a model really ends
# turns with is not looked up here: resolve_chat_format finds it in the chosen template (chat_format.py).
END_OF_TURN_TOKENS: tuple[str, ...] = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
    "<|end_of_text|>", "</s>",
)  # fmt: skip

# Tokens that can pad without being the EOS: the model must still learn to stop, so the pad must not be
# the EOS when padding could ever leak into the labels (our labels come from an explicit mask anyway).
PAD_CANDIDATES: tuple[str, ...] = (
    "<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|fim_pad|>", "<|endoftext|>",
    "<|end_of_text|>", "<unk>",
)  # fmt: skip


def _params_changed(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> list[str]:
    """Keys of `after` that are new or whose value differs from `before`."""
    if before is None:
        return list(after)
    out = []
    for key, value in after.items():
        if key not in before:
            out.append(key)
            continue
        try:
            same = bool(before[key] == value)
        except Exception:  # values whose == is odd (arrays): treat as changed
            same = False
        if not same:
            out.append(key)
    return out


def _track_sources(func: Callable[..., dict[str, Any]], owner: str) -> Callable[..., dict[str, Any]]:
    """Wrap one class's get_training_parameters so the keys it sets are attributed to `owner`.

    Each wrapped layer, after running its body (which runs the inner layers through super()), compares
    its result with the last snapshot an inner layer left and attributes the changed keys to itself —
    unless a named rule (`self.set_param(..., source=...)`) set them during this layer.
    """

    @functools.wraps(func)
    def wrapper(self: BaseHandler, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = self.__dict__.setdefault("_tp_state", {"depth": 0, "snapshot": None, "rules": {}})
        if state["depth"] == 0:
            state["snapshot"] = None
            state["rules"] = {}
            self._param_sources = {}
        state["depth"] += 1
        try:
            params = func(self, *args, **kwargs)
        finally:
            state["depth"] -= 1
        if not isinstance(params, dict):
            return params
        rules = state["rules"]
        for key in _params_changed(state["snapshot"], params):
            self._param_sources[key] = rules.pop(key, owner)
        for key, source in rules.items():  # a rule that confirmed the value it found still explains it
            if key in params:
                self._param_sources[key] = source
        state["rules"] = {}
        for key in list(self._param_sources):
            if key not in params:
                del self._param_sources[key]
        try:
            state["snapshot"] = copy.deepcopy(params)
        except Exception:
            state["snapshot"] = dict(params)
        if state["depth"] == 0:  # the seed's "verbose logging" tip: LLM_INSTALLER_DEBUG / logging.DEBUG
            logger.debug("training params for %s (%s): %s", self.model_id, type(self).__name__, params)
        return params

    wrapper._tracks_sources = True  # type: ignore[attr-defined]
    return wrapper


class BaseHandler:
    """The seed's contract, with conservative defaults that work for most causal LMs.

    Coverage (what the registry matches a model against; user handlers declare the same):
      - `model_types`: config.json `model_type` values, e.g. ("llama",)
      - `architectures`: config.json `architectures` class names, e.g. ("LlamaForCausalLM",)
      - `model_id_patterns`: regular expressions searched in the lower-cased model id, e.g. (r"coder",)
        — more specific than `model_type` (a qwen2 model called *-Coder is a code model)
      - `priority`: breaks ties between handlers matching the same way (higher wins)
    """

    name: ClassVar[str] = "base"
    families: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    architectures: ClassVar[tuple[str, ...]] = ()
    model_id_patterns: ClassVar[tuple[str, ...]] = ()
    priority: ClassVar[int] = 0
    description: ClassVar[str] = "conservative defaults for any causal language model"
    # "transformer" | "vision_language" | "moe" — the seed compares self.model_family == 'vision_language'
    default_model_family: ClassVar[str] = "transformer"
    # Set by the registry for handlers loaded from a user folder or an entry point.
    origin: ClassVar[str] = "built-in"
    # The token that ends a chat turn in the family's template ("<|im_end|>" for ChatML): when set, the
    # base get_training_parameters() makes special_tokens {"end_of_turn": it}, credited to the class
    # that sets it. A subclass that wants more special tokens extends that dict in its own override.
    end_of_turn_token: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        func = cls.__dict__.get("get_training_parameters")
        if func is not None and not getattr(func, "_tracks_sources", False):
            cls.get_training_parameters = _track_sources(func, cls.__name__)  # type: ignore[method-assign]
        if "name" not in cls.__dict__:
            cls.name = re.sub(r"Handler$", "", cls.__name__).lower() or cls.__name__.lower()

    def __init__(self, model_info: ModelInfo | Mapping[str, Any]) -> None:
        self.model_info: ModelInfo = ModelInfo.coerce(model_info)
        self.model_id: str = self.model_info.model_id
        self.model_family: str = self.default_model_family
        self._param_sources: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} for {self.model_id!r}>"

    # ---- helpers for subclasses ------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """The model's raw config.json (text config merged in for vision-language models)."""
        return self.model_info.merged_config

    def _estimate_model_size(self) -> float | None:
        """Parameters in billions (counted, else estimated from the weights' size on disk)."""
        return self.model_info.params_billions

    def size_class(self) -> str:
        """'<1B', '1-7B', '7-30B' or '>30B' (unknown size counts as 1-7B: the conservative middle)."""
        size = self._estimate_model_size()
        if size is None:
            return "1-7B"
        if size < 1:
            return "<1B"
        if size < 7:
            return "1-7B"
        if size <= 30:
            return "7-30B"
        return ">30B"

    def set_param(self, params: dict[str, Any], key: str, value: Any, source: str) -> None:
        """Set `params[key]` and record `source` (a rule such as "size rule (<1B)") as its provenance."""
        params[key] = value
        state = self.__dict__.setdefault("_tp_state", {"depth": 0, "snapshot": None, "rules": {}})
        state["rules"][key] = source

    def is_base_model(self) -> bool:
        """A pretrained (not instruction-tuned) model: 'base' in its name, or known to lack a chat template."""
        mid = self.model_id.lower()
        if re.search(r"(^|[-_/.])base($|[-_/.])", mid):
            return True
        if re.search(r"instruct|chat|-it($|[-_.])|sft|dpo|rlhf", mid):
            return False
        info = self.model_info
        return info.source != "unknown" and not info.is_instruct and not info.has_chat_template

    # ---- the seed's contract ---------------------------------------------------------------------

    def get_training_parameters(self) -> dict[str, Any]:
        """Model-specific training parameters (the seed's keys). None for lora_target_modules = auto-detect."""
        from llm_installer.handlers.params import default_params

        # every key's type, default and meaning: handlers/params.py (HandlerParams); gradient checkpointing
        # is the seed's safe default, which the plan turns off on small CPU runs
        params = default_params(TEXT_FORMATS, DEFAULT_PREPROCESSING)
        if self.end_of_turn_token:
            owner = next(c for c in type(self).__mro__ if "end_of_turn_token" in c.__dict__)
            self.set_param(params, "special_tokens", {"end_of_turn": self.end_of_turn_token}, owner.__name__)
        if self.is_base_model():
            params["special_requirements"] = {
                "base_model": True,
                "notes": (
                    f"{self.model_id} looks like a base (not instruction-tuned) model: it trains fine, but "
                    "chat results are best from an -instruct/-chat variant; its chat template is the "
                    "handler's family default"
                ),
            }
        return params

    def training_params(self) -> HandlerParams:
        """`get_training_parameters()` validated, asked once per handler: the plan records it and seeds
        the trainer's handler with it (`use_training_params`), so no later stage asks the handler again."""
        cached = self.__dict__.get("_training_params")
        if cached is None:
            from llm_installer.handlers.params import handler_params

            cached = self._training_params = handler_params(self)
        return cached

    def use_training_params(self, params: HandlerParams | Mapping[str, Any]) -> None:
        """Answer `training_params()` with what the plan recorded (validated again: it came from JSON)."""
        from llm_installer.handlers.params import HandlerParams, validate_params

        if not isinstance(params, HandlerParams):
            params = validate_params(params, self.name)
        self._training_params = params

    def training_parameters_with_sources(self) -> list[tuple[str, Any, str]]:
        """(key, value, source) for every training parameter, after the hardware fit."""
        params = self.get_training_parameters()
        sources = dict(self._param_sources)
        params, hw_sources = self._fit_to_hardware(params)
        sources.update(hw_sources)
        return [(key, value, sources.get(key, BASE_SOURCE)) for key, value in params.items()]

    def _fit_to_hardware(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Precision and flash attention this machine can really do (the plan applies the same rule)."""
        from llm_installer import hardware
        from llm_installer.precision import fit_handler_precision

        hw = hardware.detect()
        out = dict(params)
        sources: dict[str, str] = {}
        fitted = fit_handler_precision(out.get("training_precision"), hw)
        if fitted is not None:
            out["training_precision"] = fitted
            sources["training_precision"] = _hardware_label(hw)
        if out.get("supports_flash_attention") and not hw.supports_flash_attention():
            out["supports_flash_attention"] = False
            sources["supports_flash_attention"] = _hardware_label(hw)
        return out, sources

    def prepare_model_for_training(self, model: Any, training_config: dict[str, Any]) -> Any:
        """Validate the config, freeze the base weights, switch on checkpointing, report memory.

        `training_config` keys read here (all optional): max_seq_length, batch_size, use_4bit /
        quantization / method ('qlora'), gradient_checkpointing, debug_memory, require_instruct.
        """
        cfg = dict(training_config or {})
        debug_memory = bool(cfg.get("debug_memory"))
        if debug_memory:
            print(f"Model memory before: {_memory_report()}")
        params = self.training_params()
        # "best" is what the model was trained for (its context length), else the handler's own length
        best_len = self.model_info.context_length or self.config.get("max_position_embeddings")
        best_len = int(best_len or params.get("max_seq_length") or 0)
        seq_len = cfg.get("max_seq_length") or 0
        if best_len and seq_len > best_len:
            warn(f"{self.model_id}: this model performs best with sequences <= {best_len} (asked {seq_len})")
        batch = cfg.get("batch_size") or cfg.get("per_device_batch_size") or 1
        if batch > 4 and _uses_4bit(cfg, model):
            warn(f"batch size {batch} with 4-bit quantisation may cause instability; try 4 or less")
        if cfg.get("require_instruct") and self.is_base_model():
            raise UserError(
                f"{self.model_id} appears to be a base model; training is optimised for instruction-tuned "
                "variants (use the -instruct/-chat version, or drop --require-instruct)"
            )
        # Freezing policy: base weights are frozen; LoRA (and modules_to_save) add what trains.
        if cfg.get("freeze_base", True):
            for param in model.parameters():
                param.requires_grad = False
        gc = cfg.get("gradient_checkpointing", params.get("gradient_checkpointing"))
        if gc:
            self._enable_gradient_checkpointing(model)
        if debug_memory:
            print(f"Model memory after: {_memory_report()}")
        return model

    def verify_target_modules(self, model: Any) -> dict[str, list[str]]:
        """The seed's debugging tip as a method: {pattern: matched names}; warns on patterns matching nothing."""
        from llm_installer.handlers.targets import verify_target_modules

        return verify_target_modules(model, self.training_params().lora_target_modules)

    def _enable_gradient_checkpointing(self, model: Any) -> None:
        """Checkpointing with input grads, so frozen embeddings still pass gradients to LoRA layers."""
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False

    def get_tokenizer_config(self) -> dict[str, Any]:
        """Tokenizer settings for training (applied by `apply_tokenizer_config`).

        add_bos_token / add_eos_token None = keep the tokenizer's own behaviour; the chat template adds
        the turn markers. The pad policy keeps the pad distinct from the EOS when the vocabulary allows,
        and labels come from an explicit loss mask (padding is -100), so the EOS is always trained.
        """
        params_len = None
        try:
            params_len = self.training_params().max_seq_length
        except Exception:  # a broken user override must not hide the tokenizer defaults
            params_len = None
        return {
            "padding_side": "right",
            "truncation_side": "right",
            "add_bos_token": None,
            "add_eos_token": None,
            "max_length": params_len or 2048,
            "pad_token": None,  # None = choose by the policy below
            "pad_token_policy": "distinct_from_eos",
        }

    # ---- tokenizer, template, stop tokens ----------------------------------------------------------

    def apply_tokenizer_config(self, tokenizer: Any) -> Any:
        """Apply `get_tokenizer_config()` to a (fast) tokenizer or a processor's tokenizer; returns it."""
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        cfg = self.get_tokenizer_config()
        if cfg.get("padding_side"):
            tok.padding_side = cfg["padding_side"]
        if cfg.get("truncation_side"):
            tok.truncation_side = cfg["truncation_side"]
        if cfg.get("max_length"):
            current = getattr(tok, "model_max_length", None)
            if not current or current > 10**8 or current < cfg["max_length"]:
                tok.model_max_length = int(cfg["max_length"])
        for key in ("add_bos_token", "add_eos_token"):
            value = cfg.get(key)
            if value is not None and hasattr(tok, key):
                try:
                    setattr(tok, key, bool(value))
                except (AttributeError, ValueError, TypeError, NotImplementedError):
                    pass
        pad = cfg.get("pad_token") or choose_pad_token(tok)
        if pad is not None and pad != tok.pad_token:
            tok.pad_token = pad
        return tokenizer

    default_chat_template: ClassVar[str | None] = None  # family default for base models without one

    def resolve_chat_format(self, tokenizer: Any) -> ChatFormat:
        """The one chat format training, the report, `chat`, `start` and `export` use for this model.

        The tokenizer's own template, else this handler's family template, else ChatML, else plain
        text; the end-of-turn token is the single token the chosen template closes answers with (see
        llm_installer/chat_format.py for the rule and why). A subclass (or a user handler) that
        overrides `get_chat_template` or `get_stop_token_ids` is still honoured: its template is tried
        first and its stop ids are added after the end-of-turn token.
        """
        from llm_installer.chat_format import resolve_chat_format

        cls = type(self)
        handler_template = None
        extra: list[int] = []
        # An override that calls super() lands back here: answer it with the base rule (no recursion).
        if not self.__dict__.get("_resolving_chat_format"):
            self._resolving_chat_format = True
            try:
                if cls.get_chat_template is not BaseHandler.get_chat_template:
                    handler_template = self.get_chat_template(tokenizer)
                if cls.get_stop_token_ids is not BaseHandler.get_stop_token_ids:
                    extra = list(self.get_stop_token_ids(tokenizer) or [])
            finally:
                self._resolving_chat_format = False
        return resolve_chat_format(
            tokenizer,
            family=self.default_chat_template,
            handler_template=handler_template,
            handler_name=self.name,
            config_eos_ids=self.config.get("eos_token_id"),
            extra_stop_ids=extra,
        )

    def get_chat_template(self, tokenizer: Any) -> str:
        """The chat template of `resolve_chat_format` (kept for callers and handlers that override it)."""
        return self.resolve_chat_format(tokenizer).template

    def get_stop_token_ids(self, tokenizer: Any) -> list[int]:
        """The end-of-turn id first, then the EOS and the config's eos ids (from `resolve_chat_format`)."""
        return list(self.resolve_chat_format(tokenizer).stop_token_ids)


def choose_pad_token(tok: Any) -> str | None:
    """A pad token that is not the EOS: the tokenizer's own, else an unused special token, else the EOS.

    Returning the EOS (last resort, e.g. GPT-2) is safe here because training labels come from an
    explicit loss mask — padding positions are -100 and the real EOS at the end of each answer keeps
    its label — but we never add a token, which would force resizing the embeddings.
    """
    eos = getattr(tok, "eos_token", None)
    pad = getattr(tok, "pad_token", None)
    if pad is not None and pad != eos:
        return pad
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    for cand in PAD_CANDIDATES:
        if cand != eos and cand in vocab:
            return cand
    unk = getattr(tok, "unk_token", None)
    if unk is not None and unk != eos:
        return unk
    return eos


def _hardware_label(hw: Any) -> str:
    if hw.cuda and hw.compute_capability:
        major, minor = hw.compute_capability
        return f"hardware (GPU compute capability {major}.{minor})"
    if hw.mps:
        return "hardware (Apple GPU)"
    return "hardware (CPU: bf16 vs fp32 measured at plan time)"


def _uses_4bit(cfg: Mapping[str, Any], model: Any) -> bool:
    if cfg.get("use_4bit") or cfg.get("quantization") == "4bit" or cfg.get("method") == "qlora":
        return True
    return bool(getattr(model, "is_loaded_in_4bit", False))


def _memory_report() -> str:
    """CUDA memory in use, else this process's resident memory (CPU training)."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.memory_allocated() / 1e9:.2f} GB (CUDA allocated)"
    except ImportError:
        pass
    try:
        with open(f"/proc/{os.getpid()}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return f"{int(line.split()[1]) / 1024**2:.2f} GB (process RSS)"
    except OSError:
        pass
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB (peak RSS)"


# The base layer is tracked too, so each subclass's diff starts from the base defaults.
BaseHandler.get_training_parameters = _track_sources(  # type: ignore[method-assign]
    BaseHandler.get_training_parameters, BASE_SOURCE
)
