"""Detection: what a model is, read from its config and file headers without loading any weights.

Everything later (handler choice, fit estimates, training plan) keys off the `ModelInfo` built here, so
detection must be cheap (a 70B model is read in milliseconds: config.json plus the JSON header of each
safetensors file) and must never execute model code or unpickle anything.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from llm_installer.errors import SourceError
from llm_installer.model_info import ModelInfo

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")

# model_type values whose config is a text-only variant of a multimodal family.
_FAMILY_ALIASES = {"gemma3_text": "gemma3", "llama4_text": "llama4", "qwen3_vl_text": "qwen3_vl"}

_ENCODER_TYPES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "deberta",
    "deberta-v2",
    "electra",
    "albert",
    "modernbert",
    "mpnet",
    "camembert",
    "nomic_bert",
    "xlm",
}
_ENCODER_ARCH = re.compile(
    r"(MaskedLM|SequenceClassification|TokenClassification|QuestionAnswering|ForPreTraining)$"
)
_VISION_TYPES = {
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "idefics2",
    "idefics3",
    "smolvlm",
    "paligemma",
    "mllama",
    "pixtral",
    "mistral3",
    "llama4",
    "gemma3",
    "gemma3n",
    "internvl",
    "phi4_multimodal",
}
_INSTRUCT_NAME = re.compile(r"instruct|chat|[-_.]it($|[-_.])|sft|dpo|rlhf|assistant", re.IGNORECASE)
_BASE_NAME = re.compile(r"(^|[-_/.])base($|[-_/.])", re.IGNORECASE)


def instruct_by_name(model_id: str) -> bool | None:
    """What a model's name says: False for a base (pretrained) model ('-base'), True for an
    instruction-tuned one ('-Instruct', '-chat', '-it', 'sft', 'dpo', ...), None when it says neither.
    The one rule for `ModelInfo.is_instruct` and for a handler's base-model warning."""
    if _BASE_NAME.search(model_id):
        return False
    if _INSTRUCT_NAME.search(model_id):
        return True
    return None


_DTYPE_NAMES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict, or a one-line SourceError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(
            f"cannot read {path}: {exc}; the model folder is damaged or not a transformers model"
        ) from None
    if not isinstance(data, dict):
        raise SourceError(f"{path} does not hold a JSON object; the model folder is not a transformers model")
    return data


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes) without reading the tensors."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100_000_000:
                raise ValueError("header too large")
            return json.loads(fh.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise SourceError(
            f"{path} is not a valid safetensors file ({exc}); re-download or re-export it"
        ) from None


def _count_parameters(model_dir: Path) -> tuple[int | None, int, str | None]:
    """(total parameters, parameters inside expert layers, most common dtype) from safetensors headers."""
    files = sorted(p for p in model_dir.rglob("*.safetensors") if ".cache" not in p.parts)
    if not files:
        return None, 0, None
    total = experts = 0
    dtypes: Counter[str] = Counter()
    for f in files:
        for name, meta in safetensors_header(f).items():
            if name == "__metadata__" or not isinstance(meta, dict):
                continue
            n = 1
            for dim in meta.get("shape", []):
                n *= int(dim)
            total += n
            dtypes[meta.get("dtype", "")] += n
            if ".experts." in name or name.endswith(".experts") or ".experts_" in name:
                experts += n
    dtype = _DTYPE_NAMES.get(dtypes.most_common(1)[0][0]) if dtypes else None
    return total, experts, dtype


def _first(configs: list[dict[str, Any]], *keys: str) -> Any:
    """The first key present (not None) in the first config that has it (model config, then text_config)."""
    for cfg in configs:
        for key in keys:
            if cfg.get(key) is not None:
                return cfg[key]
    return None


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in Path(model_dir).rglob("*")
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and ".cache" not in p.parts
    )


def has_chat_template(model_dir: Path) -> bool:
    """A chat template in tokenizer_config.json, chat_template.jinja or chat_template.json."""
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        try:
            return bool(json.loads(tc.read_text(encoding="utf-8")).get("chat_template"))
        except (OSError, ValueError):
            return False
    return False


def _known_model_types() -> set[str]:
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency
        return set()
    return set(CONFIG_MAPPING_NAMES)


def classify(config: dict[str, Any]) -> str:
    """The task kind of a config: vision_language, seq2seq, encoder, moe, causal_lm or unknown."""
    model_type = str(config.get("model_type") or "")
    archs = [str(a) for a in config.get("architectures") or []]
    text_cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    if config.get("vision_config") or model_type in _VISION_TYPES:
        return "vision_language"
    if (
        config.get("is_encoder_decoder")
        or any("ForConditionalGeneration" in a for a in archs)
        and model_type
        in {
            "t5",
            "mt5",
            "bart",
            "mbart",
            "pegasus",
            "marian",
            "umt5",
            "longt5",
        }
    ):
        return "seq2seq"
    if model_type in _ENCODER_TYPES or (archs and all(_ENCODER_ARCH.search(a) for a in archs)):
        return "encoder"
    experts = _first(
        [config, text_cfg], "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"
    )
    if isinstance(experts, int) and experts > 1:
        return "moe"
    if archs or model_type:
        return "causal_lm"
    return "unknown"


def detect(model_dir: Path, *, model_id: str, source: str, revision: str | None = None) -> ModelInfo:
    """Build a ModelInfo for the transformers (or diffusers) model in `model_dir`; never loads weights."""
    model_dir = Path(model_dir)
    weights = weight_files(model_dir)
    size_gb = sum(p.stat().st_size for p in weights) / 1024**3
    if not (model_dir / "config.json").is_file() and (model_dir / "model_index.json").is_file():
        index = read_json(model_dir / "model_index.json")
        total, _, dtype = _count_parameters(model_dir)
        return ModelInfo(
            model_id=model_id,
            source=source,
            revision=revision,
            model_type="diffusion",
            family=str(index.get("_class_name") or "diffusion"),
            architecture=index.get("_class_name"),
            architectures=[index["_class_name"]] if index.get("_class_name") else [],
            task="diffusion",
            trainable=False,
            num_parameters=total,
            model_size_gb=round(size_gb, 4),
            dtype=dtype,
            config=index,
        )
    if not (model_dir / "config.json").is_file():
        raise SourceError(f"{model_dir} has no config.json; it is not a transformers model folder")
    config = read_json(model_dir / "config.json")
    text_cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    configs = [config, text_cfg]
    model_type = config.get("model_type")
    archs = [str(a) for a in config.get("architectures") or []]
    task = classify(config)
    total, expert_params, header_dtype = _count_parameters(model_dir)
    num_experts = _first(configs, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    per_tok = _first(configs, "num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k")
    if not isinstance(num_experts, int) or num_experts <= 1:
        num_experts, per_tok = None, None
    active = total
    if total and num_experts and isinstance(per_tok, int) and expert_params:
        active = int(total - expert_params * (1 - per_tok / num_experts))
    dtype = _first(configs, "dtype", "torch_dtype") or header_dtype
    remote = bool(config.get("auto_map")) and str(model_type) not in _known_model_types()
    chat = has_chat_template(model_dir)
    by_name = instruct_by_name(model_id)
    is_instruct = chat if by_name is None else by_name
    tie = _first(configs, "tie_word_embeddings")
    return ModelInfo(
        model_id=model_id,
        source=source,
        revision=revision,
        model_type=model_type,
        family=_FAMILY_ALIASES.get(str(model_type), model_type),
        architecture=archs[0] if archs else None,
        architectures=archs,
        task=task,
        trainable=True,
        num_parameters=total,
        num_active_parameters=active,
        model_size_gb=round(size_gb, 4),
        context_length=_first(
            configs, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"
        ),
        dtype=str(dtype) if dtype else None,
        has_chat_template=chat,
        is_instruct=is_instruct,
        trust_remote_code=remote,
        num_experts=num_experts,
        num_experts_per_tok=per_tok if num_experts else None,
        vocab_size=_first(configs, "vocab_size"),
        hidden_size=_first(configs, "hidden_size", "n_embd", "d_model", "dim"),
        num_layers=_first(configs, "num_hidden_layers", "n_layer", "num_layers", "n_layers"),
        tie_word_embeddings=tie if isinstance(tie, bool) else None,
        config=config,
    )
