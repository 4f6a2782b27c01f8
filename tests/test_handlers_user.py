"""User handlers: written exactly like the seed's examples (no imports), from a folder or an entry point,
taking precedence over the built-in ones."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The seed's Example 1, verbatim: no import lines, Dict/Any used as-is.
SEED_EXAMPLE_1 = '''
class MyTransformerHandler(TransformerHandler):
    """Handler for a custom transformer model."""

    def get_training_parameters(self) -> Dict[str, Any]:
        params = super().get_training_parameters()

        # Specific architecture modules
        params['lora_target_modules'] = [
            "self_attn.q_proj",
            "self_attn.v_proj",
            "self_attn.k_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj"
        ]

        # Model prefers bfloat16
        params['training_precision'] = 'bf16'

        # Context window
        params['max_seq_length'] = 4096

        # Supports standard formats
        params['dataset_formats'] = ['alpaca', 'sharegpt', 'openai', 'chat']

        return params
'''

# The seed's Example 2, verbatim.
SEED_EXAMPLE_2 = '''
class MyMultimodalHandler(MultimodalHandler):
    """Handler for a vision-language model."""

    def get_training_parameters(self) -> Dict[str, Any]:
        params = super().get_training_parameters()

        # Only train language model parts
        params['lora_target_modules'] = [
            "language_model.q_proj",
            "language_model.v_proj",
            "cross_attention.q_proj",
            "cross_attention.v_proj"
        ]

        # Don't use flash attention with images
        params['supports_flash_attention'] = False

        # Special tokens
        params['special_tokens'] = {
            'image_token': '<image>',
            'video_token': '<video>'
        }

        # Supported formats
        params['dataset_formats'] = [
            'vision_qa',
            'image_caption',
            'video_qa',
            'alpaca'  # Also supports text-only
        ]

        return params

    def prepare_model_for_training(self, model: Any, training_config: Dict[str, Any]) -> Any:
        model = super().prepare_model_for_training(model, training_config)

        # Freeze vision encoder
        if hasattr(model, 'vision_tower'):
            for param in model.vision_tower.parameters():
                param.requires_grad = False
            print("Vision encoder frozen for training")

        # Enable gradient checkpointing only for language model
        if hasattr(model, 'language_model'):
            model.language_model.gradient_checkpointing_enable()

        return model
'''

# The seed's Example 3, verbatim (it shadows the built-in MoEHandler name with its own class).
SEED_EXAMPLE_3 = '''
class MoEHandler(BaseHandler):
    """Handler for Mixture of Experts models."""

    def get_training_parameters(self) -> Dict[str, Any]:
        params = super().get_training_parameters()

        # MoE specific modules
        params['lora_target_modules'] = [
            "self_attn.q_proj",
            "self_attn.v_proj",
            "block_sparse_moe.gate",  # Train router
            "block_sparse_moe.experts.*.w1",  # All expert MLPs
            "block_sparse_moe.experts.*.w2",
            "block_sparse_moe.experts.*.w3"
        ]

        # MoE training settings
        params['moe_training'] = True
        params['expert_selection'] = 'top-2'
        params['load_balancing_loss_coef'] = 0.01

        # Larger batch size for MoE
        params['recommended_batch_size'] = 8

        return params
'''


@pytest.fixture
def handlers_dir(tmp_path, monkeypatch):
    d = tmp_path / "handlers"
    d.mkdir()
    monkeypatch.setenv("LLM_INSTALLER_HANDLERS_DIR", str(d))
    return d


LLAMA = {"model_id": "org/some-llama-instruct", "model_type": "llama", "num_parameters": 1_000_000_000}


def test_seed_example_1_overrides_builtin_llama(handlers_dir):
    from llm_installer.handlers import get_handler
    from llm_installer.handlers.registry import explain_choice

    assert type(get_handler(LLAMA)).__name__ == "LlamaHandler"
    (handlers_dir / "llama.py").write_text(SEED_EXAMPLE_1)  # the file name says which model_type it covers
    handler = get_handler(LLAMA)
    assert type(handler).__name__ == "MyTransformerHandler"
    params = handler.get_training_parameters()
    assert params["lora_target_modules"][0] == "self_attn.q_proj"
    assert params["max_seq_length"] == 4096 and params["dataset_formats"] == [
        "alpaca",
        "sharegpt",
        "openai",
        "chat",
    ]
    sources = {k: s for k, _, s in handler.training_parameters_with_sources()}
    assert sources["max_seq_length"] == "MyTransformerHandler"
    assert sources["recommended_learning_rate"].startswith("size rule")
    assert "user handler" in explain_choice(LLAMA) and str(handlers_dir) in explain_choice(LLAMA)
    # a model of another family is unaffected
    assert type(get_handler({"model_id": "a/b", "model_type": "qwen2"})).__name__ == "Qwen2Handler"


def test_declared_coverage_and_priority(handlers_dir):
    from llm_installer.handlers import get_handler

    (handlers_dir / "mine.py").write_text(
        textwrap.dedent("""
        class QwenTweaks(TransformerHandler):
            model_types = ("qwen2", "qwen3")
            priority = 5
            attention_modules = ("q_proj", "v_proj")

            def get_training_parameters(self) -> Dict[str, Any]:
                params = super().get_training_parameters()
                params["special_requirements"] = {"notes": "mine"}
                return params
    """)
    )
    handler = get_handler({"model_id": "Qwen/Qwen3-0.6B", "model_type": "qwen3", "num_parameters": 6e8})
    assert type(handler).__name__ == "QwenTweaks"
    assert handler.get_training_parameters()["lora_target_modules"] == ["q_proj", "v_proj"]


def test_broken_user_file_is_named_and_skipped(handlers_dir, capsys):
    from llm_installer.handlers import get_handler

    (handlers_dir / "broken.py").write_text("class Oops(TransformerHandler:\n")
    (handlers_dir / "llama.py").write_text(SEED_EXAMPLE_1)
    assert type(get_handler(LLAMA)).__name__ == "MyTransformerHandler"
    err = capsys.readouterr().err
    assert "broken.py" in err and "SyntaxError" in err


def test_seed_example_1_trains_tiny_llama(handlers_dir, tiny_model_factory):
    import torch
    from peft import LoraConfig, get_peft_model

    from llm_installer.detect import detect
    from llm_installer.handlers import get_handler
    from llm_installer.handlers.targets import resolve_lora_targets
    from llm_installer.loading import load_model

    (handlers_dir / "llama.py").write_text(SEED_EXAMPLE_1)
    folder = tiny_model_factory("llama")
    handler = get_handler(detect(folder, model_id="tiny/llama", source="local"))
    assert type(handler).__name__ == "MyTransformerHandler"
    model = handler.prepare_model_for_training(load_model(folder), {"gradient_checkpointing": False})
    kwargs = resolve_lora_targets(model, handler.get_training_parameters())
    assert set(kwargs["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM", **kwargs))
    ids = torch.randint(3, 1000, (2, 12))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_seed_example_2_on_tiny_llava(handlers_dir, tiny_model_factory, capsys):
    from llm_installer.detect import detect
    from llm_installer.handlers import get_handler
    from llm_installer.handlers.targets import resolve_lora_targets
    from llm_installer.loading import load_model

    (handlers_dir / "llava.py").write_text(SEED_EXAMPLE_2)
    folder = tiny_model_factory("llava")
    info = detect(folder, model_id="tiny/llava", source="local")
    handler = get_handler(info)
    assert type(handler).__name__ == "MyMultimodalHandler" and handler.model_family == "vision_language"
    model = load_model(folder, task=info.task)
    model = handler.prepare_model_for_training(model, {"gradient_checkpointing": False})
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    kwargs = resolve_lora_targets(model, handler.get_training_parameters())
    assert "cross_attention.q_proj" in capsys.readouterr().err  # named: matches nothing in LLaVA
    assert "vision_tower" not in str(kwargs["target_modules"])
    assert kwargs["modules_to_save"] == ["model.multi_modal_projector"]


def test_seed_example_3_on_tiny_mixtral(handlers_dir, tiny_model_factory):
    from llm_installer.detect import detect
    from llm_installer.handlers import get_handler
    from llm_installer.handlers.targets import resolve_lora_targets
    from llm_installer.loading import load_model

    (handlers_dir / "mixtral.py").write_text(SEED_EXAMPLE_3)
    folder = tiny_model_factory("mixtral")
    handler = get_handler(detect(folder, model_id="tiny/mixtral", source="local"))
    assert type(handler).__name__ == "MoEHandler" and "user file" in handler.origin
    kwargs = resolve_lora_targets(load_model(folder), handler.get_training_parameters())
    assert kwargs["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]


def test_entry_point_handler(tmp_path, monkeypatch):
    """A package registering a handler under the `llm_installer.handlers` entry point group."""
    from llm_installer.handlers import get_handler, registry

    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "acme_handlers.py").write_text(
        textwrap.dedent("""
        from llm_installer.handlers import TransformerHandler

        class AcmeGPT2Handler(TransformerHandler):
            name = "acme-gpt2"
            model_types = ("gpt2",)
            attention_modules = ("attn.c_attn",)
    """)
    )
    dist = pkg / "acme_handlers-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-handlers\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[llm_installer.handlers]\nacme = acme_handlers:AcmeGPT2Handler\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("LLM_INSTALLER_HANDLERS_DIR", str(tmp_path / "none"))
    registry.user_handlers(reload=True)
    try:
        handler = get_handler({"model_id": "openai-community/gpt2", "model_type": "gpt2"})
        assert type(handler).__name__ == "AcmeGPT2Handler"
        assert "entry point acme (acme-handlers)" in handler.origin
    finally:
        monkeypatch.undo()
        registry.user_handlers(reload=True)
    assert type(get_handler({"model_id": "gpt2", "model_type": "gpt2"})).__name__ == "GPT2Handler"


def test_cli_lists_user_handler(handlers_dir, tmp_path):
    (handlers_dir / "llama.py").write_text(SEED_EXAMPLE_1)
    env = {**os.environ, "LLM_INSTALLER_HANDLERS_DIR": str(handlers_dir), "COLUMNS": "250"}
    result = subprocess.run(
        [str(REPO / "llm-installer"), "--models-dir", str(tmp_path / "m"), "handlers", "--verbose"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "mytransformer" in out and "user file" in out
    assert out.index("mytransformer") < out.index("llama ")  # user handlers listed (and matched) first
    for name in ("mixtral", "qwen2_vl", "llava", "deepseek", "gpt_neox", "starcoder2", "code"):
        assert name in out
    assert sys.executable  # the wrapper picks python3 itself
