"""Detection over real transformers configs of many families, without building or loading models.

Each config is `AutoConfig.for_model(...).to_dict()` written as config.json next to a small safetensors
file whose tensor shapes we know, so the parameter count read from the header can be checked exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from llm_installer.detect import detect, safetensors_header
from llm_installer.errors import SourceError

# (model_type given to AutoConfig.for_model, architectures, expected task, expected family, expected context)
CASES = [
    ("llama", ["LlamaForCausalLM"], "causal_lm", "llama", 2048),
    ("mistral", ["MistralForCausalLM"], "causal_lm", "mistral", 131072),
    ("qwen2", ["Qwen2ForCausalLM"], "causal_lm", "qwen2", 32768),
    ("qwen3", ["Qwen3ForCausalLM"], "causal_lm", "qwen3", 32768),
    ("gemma2", ["Gemma2ForCausalLM"], "causal_lm", "gemma2", 8192),
    ("gemma3_text", ["Gemma3ForCausalLM"], "causal_lm", "gemma3", 131072),
    ("gemma3", ["Gemma3ForConditionalGeneration"], "vision_language", "gemma3", 131072),
    ("phi3", ["Phi3ForCausalLM"], "causal_lm", "phi3", 4096),
    ("gpt2", ["GPT2LMHeadModel"], "causal_lm", "gpt2", 1024),
    ("gpt_neox", ["GPTNeoXForCausalLM"], "causal_lm", "gpt_neox", 2048),
    ("mixtral", ["MixtralForCausalLM"], "moe", "mixtral", 131072),
    ("qwen2_moe", ["Qwen2MoeForCausalLM"], "moe", "qwen2_moe", 32768),
    ("llava", ["LlavaForConditionalGeneration"], "vision_language", "llava", 2048),
    ("qwen2_vl", ["Qwen2VLForConditionalGeneration"], "vision_language", "qwen2_vl", 32768),
    ("t5", ["T5ForConditionalGeneration"], "seq2seq", "t5", None),
    ("bert", ["BertForMaskedLM"], "encoder", "bert", 512),
]

# Known shapes: 10x4 + 4 = 44 parameters, plus 2 x (8 experts x 4 x 4) = 256 expert parameters for MoE.
DENSE = {"model.embed_tokens.weight": (10, 4), "model.norm.weight": (4,)}
EXPERTS = {
    "model.layers.0.mlp.experts.gate_up_proj": (8, 4, 4),
    "model.layers.0.mlp.experts.down_proj": (8, 4, 4),
}


def _write_model(folder: Path, config: dict, tensors: dict[str, tuple[int, ...]], dtype=np.float32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file({k: np.zeros(s, dtype=dtype) for k, s in tensors.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(
    ("model_type", "archs", "task", "family", "context"), CASES, ids=[c[0] for c in CASES]
)
def test_detect_family(tmp_path, model_type, archs, task, family, context):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type).to_dict()
    config["architectures"] = archs
    moe = task == "moe"
    tensors = {**DENSE, **(EXPERTS if moe else {})}
    folder = _write_model(tmp_path / model_type, config, tensors)

    info = detect(folder, model_id=f"org/{model_type}-base", source="local")

    assert info.model_type == config["model_type"]
    assert info.family == family
    assert info.architecture == archs[0]
    assert info.task == task
    assert info.trainable is True
    assert info.context_length == context
    assert info.num_parameters == 44 + (256 if moe else 0)
    assert info.dtype == "float32"  # from the safetensors header (the config has no dtype)
    assert info.trust_remote_code is False
    assert info.has_chat_template is False and info.is_instruct is False
    assert info.model_size_gb == pytest.approx(
        (folder / "model.safetensors").stat().st_size / 1024**3, abs=1e-4
    )
    if moe:
        experts, per_tok = (8, 2) if model_type == "mixtral" else (60, 4)
        assert (info.num_experts, info.num_experts_per_tok) == (experts, per_tok)
        assert info.num_active_parameters == int(44 + 256 * per_tok / experts)
    else:
        assert info.num_experts is None
        assert info.num_active_parameters == info.num_parameters


def test_dtype_from_config_and_chat_template_makes_instruct(tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama").to_dict() | {
        "architectures": ["LlamaForCausalLM"],
        "dtype": "bfloat16",
    }
    folder = _write_model(tmp_path / "m", config, DENSE)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ messages }}"}), encoding="utf-8"
    )

    info = detect(folder, model_id="org/tiny", source="local")

    assert info.dtype == "bfloat16"
    assert info.has_chat_template and info.is_instruct
    # A chat template in a separate file counts too; a '-base' name stays a base model.
    (folder / "tokenizer_config.json").unlink()
    (folder / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    base = detect(folder, model_id="org/tiny-base", source="local")
    assert base.has_chat_template and not base.is_instruct


def test_remote_code_needed_only_for_unknown_model_types(tmp_path):
    auto_map = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    custom = _write_model(tmp_path / "custom", {"model_type": "x-custom", "auto_map": auto_map}, DENSE)
    known = _write_model(tmp_path / "known", {"model_type": "llama", "auto_map": auto_map}, DENSE)

    assert detect(custom, model_id="org/x", source="local").trust_remote_code is True
    assert detect(known, model_id="org/y", source="local").trust_remote_code is False


def test_diffusion_is_recognised_and_not_trainable(tmp_path):
    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline"}), encoding="utf-8"
    )
    _write_model(folder / "unet", {"_class_name": "UNet2DConditionModel"}, DENSE)

    info = detect(folder, model_id="org/sd", source="local")

    assert info.task == "diffusion" and info.trainable is False
    assert info.family == "StableDiffusionPipeline"
    assert info.num_parameters == 44


def test_safetensors_header_is_read_without_the_tensors(tmp_path):
    folder = _write_model(tmp_path / "m", {"model_type": "llama"}, {"w": (1000, 1000)})
    header = safetensors_header(folder / "model.safetensors")
    assert header["w"]["shape"] == [1000, 1000] and header["w"]["dtype"] == "F32"


def test_broken_files_give_one_line_errors(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    with pytest.raises(SourceError, match=r"has no config.json; it is not a transformers model folder"):
        detect(folder, model_id="x", source="local")
    (folder / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(SourceError, match=r"cannot read .*config.json"):
        detect(folder, model_id="x", source="local")
    (folder / "config.json").write_text("{}", encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(SourceError, match=r"model.safetensors is not a valid safetensors file"):
        detect(folder, model_id="x", source="local")


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", True),
        ("google/gemma-2-2b-it", True),
        ("HuggingFaceTB/SmolLM2-135M", None),
        ("org/model-base", False),
        ("org/base-chat-v1", False),  # the two regexes disagreed here: 'base' wins
        ("org/edit-model", None),  # 'it' inside a word is not '-it'
    ],
)
def test_instruct_by_name_is_the_one_naming_rule(model_id, expected):
    from llm_installer.detect import instruct_by_name

    assert instruct_by_name(model_id) is expected
