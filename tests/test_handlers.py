"""Handler contract tests: the seed's unit test for every built-in handler, provenance, registry,
tokenizer policy, templates, stop tokens, target matching and prepare_model_for_training."""

from __future__ import annotations

import pytest

from llm_installer.handlers.registry import BUILTIN_HANDLERS, GENERIC_HANDLERS

SEED_KEYS = (
    "lora_target_modules", "lora_modules_to_save", "training_precision", "gradient_checkpointing",
    "max_seq_length", "supports_flash_attention", "dataset_formats", "special_tokens",
    "recommended_batch_size", "recommended_learning_rate", "dataset_preprocessing", "special_requirements",
)  # fmt: skip
MOE_KEYS = ("moe_training", "expert_selection", "load_balancing_loss_coef")


@pytest.mark.parametrize("handler_cls", [*BUILTIN_HANDLERS, *GENERIC_HANDLERS], ids=lambda c: c.__name__)
def test_seed_training_parameters(handler_cls):
    """The seed's unit test, for every built-in handler."""
    model_info = {"model_id": "test/model", "model_size_gb": 7.0}
    handler = handler_cls(model_info)
    params = handler.get_training_parameters()

    assert "lora_target_modules" in params
    if handler_cls.__name__ == "TransformerHandler":
        # the generic handler: None = auto-detect (the seed's conservative default)
        assert params["lora_target_modules"] is None
    else:
        assert isinstance(params["lora_target_modules"], list)
        assert len(params["lora_target_modules"]) > 0
    assert "dataset_formats" in params
    assert "alpaca" in params["dataset_formats"]

    for key in SEED_KEYS:
        assert key in params, key
    assert params["training_precision"] in ("auto", "fp16", "bf16", "fp32")
    if handler.model_family == "moe":
        for key in MOE_KEYS:
            assert key in params, key
    assert handler.model_id == "test/model"
    assert isinstance(handler.name, str) and handler.name


def test_base_handler_defaults():
    from llm_installer.handlers import BaseHandler

    params = BaseHandler({"model_id": "test/model"}).get_training_parameters()
    assert params["lora_target_modules"] is None  # auto-detect
    assert params["gradient_checkpointing"] is True and params["max_seq_length"] == 2048
    assert params["dataset_preprocessing"]["medical_qa"] == {"add_context": True, "max_context_length": 2048}
    assert params["dataset_preprocessing"]["code_instruct"] == {
        "syntax_highlighting": True,
        "language_tags": True,
    }
    assert {"medical_qa", "code_instruct", "multi_choice"} <= set(params["dataset_formats"])


@pytest.mark.parametrize(
    "size_b, targets, lr, extra",
    [
        (0.135, 7, 5e-4, {}),
        (2.0, 7, 2e-4, {}),
        (3.5, 4, 2e-4, {}),
        (13.0, 7, 1e-4, {"gradient_checkpointing": True}),
        (70.0, 4, 1e-4, {"gradient_checkpointing": True, "force_4bit": True, "quantization": "4bit"}),
    ],
)
def test_size_rules(size_b, targets, lr, extra):
    from llm_installer.handlers.llama import LlamaHandler

    handler = LlamaHandler(
        {"model_id": "org/m-instruct", "model_type": "llama", "num_parameters": int(size_b * 1e9)}
    )
    params = handler.get_training_parameters()
    assert len(params["lora_target_modules"]) == targets
    assert params["recommended_learning_rate"] == lr
    for key, value in extra.items():
        assert params[key] == value
    if size_b > 30:
        assert "qa" not in params["dataset_formats"]  # Pattern 4: limited formats


def test_sources_explain_every_value():
    from llm_installer.handlers.describe import training_parameters_with_sources

    info = {
        "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "model_type": "llama", "num_parameters": 134_515_008,
        "context_length": 8192, "source": "bundled", "is_instruct": True, "has_chat_template": True,
    }  # fmt: skip
    rows = training_parameters_with_sources(info)
    keys = [k for k, _, _ in rows]
    for key in SEED_KEYS:
        assert key in keys
    src = {k: s for k, _, s in rows}
    val = {k: v for k, v, _ in rows}
    assert src["lora_target_modules"].startswith("size rule (<1B")
    assert src["recommended_learning_rate"] == "size rule (<1B)" and val["recommended_learning_rate"] == 5e-4
    assert src["max_seq_length"].startswith("LlamaHandler")
    assert src["lora_modules_to_save"] == "base default"
    assert src["training_precision"].startswith("hardware (")
    assert all(s for s in src.values())


def test_sources_track_user_subclass_overrides():
    from llm_installer.handlers import TransformerHandler

    class MyHandler(TransformerHandler):
        def get_training_parameters(self):
            params = super().get_training_parameters()
            params["max_seq_length"] = 1234
            params["custom_flag"] = True
            return params

    rows = {k: (v, s) for k, v, s in MyHandler({"model_id": "a/b"}).training_parameters_with_sources()}
    assert rows["max_seq_length"] == (1234, "MyHandler")
    assert rows["custom_flag"] == (True, "MyHandler")
    assert rows["dataset_formats"][1] == "base default"


def test_base_model_detection_warns_but_trains():
    from llm_installer.errors import UserError
    from llm_installer.handlers.llama import LlamaHandler

    handler = LlamaHandler({"model_id": "meta-llama/Llama-3.2-1B-base", "model_type": "llama"})
    assert handler.is_base_model()
    params = handler.get_training_parameters()
    assert params["special_requirements"]["base_model"] is True
    assert "instruct" in params["special_requirements"]["notes"]
    assert not LlamaHandler({"model_id": "org/x-Instruct"}).is_base_model()

    import torch

    model = torch.nn.Linear(2, 2)
    handler.prepare_model_for_training(model, {"gradient_checkpointing": False})  # trainable by default
    with pytest.raises(UserError, match="base model"):
        handler.prepare_model_for_training(model, {"require_instruct": True})


def test_hardware_precision_rule(monkeypatch):
    from llm_installer import hardware
    from llm_installer.handlers.llama import LlamaHandler

    def fake(cc):
        gpus = (hardware.GPU("gpu", 80.0, cc),) if cc else ()
        return hardware.Hardware(cpu_count=2, ram_gb=24, ram_available_gb=20, cuda=bool(cc), gpus=gpus)

    for cc, precision, flash in (
        ((9, 0), "bf16", True),
        ((7, 5), "fp16", True),
        ((6, 1), "fp32", False),
        (None, "auto", False),
    ):  # fmt: skip (CPU: the plan measures)
        monkeypatch.setattr(hardware, "detect", lambda cc=cc: fake(cc))
        params = LlamaHandler({"model_id": "a/b-instruct", "model_type": "llama"}).get_training_parameters()
        assert (params["training_precision"], params["supports_flash_attention"]) == (precision, flash), cc


def test_registry_picks_most_specific_and_falls_back(capsys):
    from llm_installer.handlers import get_handler

    assert type(get_handler({"model_id": "a/b", "model_type": "llama"})).__name__ == "LlamaHandler"
    assert (
        type(get_handler({"model_id": "a/b", "architectures": ["Phi3ForCausalLM"]})).__name__ == "Phi3Handler"
    )
    assert (
        type(get_handler({"model_id": "Qwen/Qwen2.5-Coder-7B", "model_type": "qwen2"})).__name__
        == "CodeHandler"
    )
    assert (
        type(get_handler({"model_id": "codellama/CodeLlama-7b", "model_type": "llama"})).__name__
        == "CodeHandler"
    )
    coder_moe = {"model_id": "deepseek-ai/DeepSeek-Coder-V2-Lite", "model_type": "deepseek_v2", "task": "moe"}
    assert type(get_handler(coder_moe)).__name__ == "DeepSeekMoEHandler"
    gemma3_text = {"model_id": "g/gemma-3-1b-it", "model_type": "gemma3_text", "family": "gemma3"}
    assert type(get_handler(gemma3_text)).__name__ == "Gemma3TextHandler"

    unknown = get_handler({"model_id": "x/new-arch", "model_type": "brand_new_arch"})
    assert type(unknown).__name__ == "TransformerHandler"
    assert "brand_new_arch" in capsys.readouterr().err
    vlm = get_handler({"model_id": "x/vlm", "model_type": "new_vlm", "task": "vision_language"})
    assert vlm.model_family == "vision_language"
    moe = get_handler({"model_id": "x/moe", "model_type": "new_moe", "task": "moe", "num_experts": 8})
    assert moe.model_family == "moe"


def test_pad_token_policy_keeps_eos_trainable(smollm2_tokenizer):
    import copy

    from llm_installer.handlers.llama import LlamaHandler

    tok = copy.deepcopy(smollm2_tokenizer)
    assert tok.pad_token == tok.eos_token  # SmolLM2 ships pad == eos
    handler = LlamaHandler({"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "model_type": "llama"})
    cfg = handler.get_tokenizer_config()
    assert {"padding_side", "add_bos_token", "add_eos_token", "max_length"} <= set(cfg)
    out = handler.apply_tokenizer_config(tok)
    assert out is tok
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    assert len(tok) == len(smollm2_tokenizer)  # no token added: no embedding resize needed


def test_chat_templates_and_stop_tokens(smollm2_tokenizer):
    import copy

    from llm_installer.handlers import templates
    from llm_installer.handlers.gemma import GemmaHandler
    from llm_installer.handlers.gpt import GPT2Handler
    from llm_installer.handlers.llama import LlamaHandler

    tok = copy.deepcopy(smollm2_tokenizer)
    handler = LlamaHandler({"model_id": "a/b", "model_type": "llama"})
    assert handler.get_chat_template(tok) == tok.chat_template  # the tokenizer's own first
    stops = handler.get_stop_token_ids(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops and tok.eos_token_id == stops[0]

    tok.chat_template = None  # a base model without a template
    # Llama-3's header tokens are absent, so ChatML (which this vocabulary has) is used
    assert handler.get_chat_template(tok) == templates.CHATML
    assert GemmaHandler({"model_id": "a/b"}).get_chat_template(tok) == templates.CHATML
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tok.apply_chat_template(msgs, chat_template=templates.CHATML, tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert GPT2Handler({"model_id": "gpt2"}).get_chat_template(tok) == templates.PLAIN


def test_target_pattern_matching():
    from llm_installer.handlers.targets import match_pattern

    name = "model.language_model.layers.3.self_attn.q_proj"
    assert match_pattern("q_proj", name)
    assert match_pattern("self_attn.q_proj", name)
    assert match_pattern("language_model.q_proj", name)  # the seed's Example 2 spelling
    assert match_pattern(name, name)
    assert match_pattern("layers.*.self_attn.q_proj", name)
    assert match_pattern("re:.*layers\\.3\\..*q_proj", name)
    assert not match_pattern("k_proj", name)
    assert not match_pattern("vision_tower.q_proj", name)
    assert not match_pattern("mlp.q_proj", name)
    assert match_pattern("block_sparse_moe.experts.*.w1", "model.layers.0.block_sparse_moe.experts.7.w1")


def _tiny_model(family, tiny_model_factory):
    from llm_installer.detect import detect
    from llm_installer.handlers import get_handler
    from llm_installer.loading import load_model

    folder = tiny_model_factory(family)
    info = detect(folder, model_id=f"tiny/{family}", source="local")
    return load_model(folder, task=info.task), get_handler(info)


def test_verify_targets_warns_and_errors(tiny_model_factory, capsys):
    from llm_installer.errors import UserError
    from llm_installer.handlers.targets import resolve_lora_targets, verify_target_modules

    model, handler = _tiny_model("llama", tiny_model_factory)
    assert all(len(v) == 2 for v in handler.verify_target_modules(model).values())  # 2 layers each
    found = verify_target_modules(model, ["self_attn.q_proj", "cross_attention.q_proj"])
    assert len(found["self_attn.q_proj"]) == 2 and found["cross_attention.q_proj"] == []
    assert "cross_attention.q_proj" in capsys.readouterr().err
    with pytest.raises(UserError, match="none of the LoRA target modules"):
        verify_target_modules(model, ["nonexistent_proj"])
    auto = resolve_lora_targets(model, {"lora_target_modules": None})
    assert "lm_head" not in str(auto["target_modules"])
    assert set(auto["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_seed_moe_example_names_map_to_fused_experts(tiny_model_factory, capsys):
    """The seed's Example 3 names Mixtral's pre-v5 layout; it must still find router and experts."""
    from llm_installer.handlers.targets import resolve_lora_targets

    model, _ = _tiny_model("mixtral", tiny_model_factory)
    seed_targets = [
        "self_attn.q_proj", "self_attn.v_proj", "block_sparse_moe.gate",
        "block_sparse_moe.experts.*.w1", "block_sparse_moe.experts.*.w2", "block_sparse_moe.experts.*.w3",
    ]  # fmt: skip
    kwargs = resolve_lora_targets(model, {"lora_target_modules": seed_targets})
    assert kwargs["target_modules"] == ["q_proj", "v_proj"]
    assert kwargs["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert kwargs["modules_to_save"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert "matched nothing" not in capsys.readouterr().err


def test_moe_keys_act_expert_selection_routes_and_moe_training_switches_the_balancing_loss(
    tiny_model_factory,
):
    """A handler's expert_selection sets how many experts each token is routed to during training, and
    moe_training False leaves the router's balancing loss off: the keys change what the model computes."""
    import torch

    from llm_installer.handlers.moe import MixtralHandler

    model, handler = _tiny_model("mixtral", tiny_model_factory)
    ids = torch.randint(3, 1000, (1, 12))
    with torch.no_grad():
        top2 = model(input_ids=ids).logits

    class TopOne(MixtralHandler):
        def get_training_parameters(self):
            params = super().get_training_parameters()
            params["expert_selection"] = "top-1"
            params["moe_training"] = False
            return params

    mine = TopOne(handler.model_info)
    model = mine.prepare_model_for_training(model, {"gradient_checkpointing": False})
    routers = [m for m in model.modules() if hasattr(m, "top_k") and isinstance(m.top_k, int)]
    assert routers and all(m.top_k == 1 for m in routers) and model.config.num_experts_per_tok == 1
    assert not model.config.output_router_logits  # moe_training False: no balancing loss
    with torch.no_grad():
        top1 = model(input_ids=ids).logits
    assert not torch.allclose(top1, top2)  # routing to one expert computes something else


def test_moe_prepare_applies_load_balancing(tiny_model_factory):
    import torch

    model, handler = _tiny_model("mixtral", tiny_model_factory)
    params = handler.get_training_parameters()
    model = handler.prepare_model_for_training(
        model, {"gradient_checkpointing": False, "load_balancing_loss_coef": 0.05}
    )
    assert model.config.output_router_logits is True
    assert model.router_aux_loss_coef == 0.05 and params["expert_selection"] == "top-2"
    ids = torch.randint(3, 1000, (1, 8))
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)


def test_prepare_model_validation_checkpointing_and_memory(tiny_model_factory, capsys):
    model, handler = _tiny_model("llama", tiny_model_factory)
    cfg = {"max_seq_length": 100_000, "batch_size": 8, "use_4bit": True, "debug_memory": True,
           "gradient_checkpointing": True}  # fmt: skip
    model = handler.prepare_model_for_training(model, cfg)
    out = capsys.readouterr()
    assert "performs best with sequences <=" in out.err
    assert "4-bit" in out.err
    assert "Model memory before:" in out.out and "GB" in out.out
    assert model.is_gradient_checkpointing
    assert not any(p.requires_grad for p in model.parameters())  # base frozen; LoRA adds what trains


def test_vision_prepare_freezes_tower(tiny_model_factory):
    model, handler = _tiny_model("llava", tiny_model_factory)
    for p in model.parameters():
        p.requires_grad = True
    model = handler.prepare_model_for_training(model, {"gradient_checkpointing": True, "freeze_base": False})
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert any(p.requires_grad for p in model.model.language_model.parameters())
    assert handler.get_training_parameters()["special_tokens"]["image_token"] == "<image>"


def test_hardware_fit_downgrades_only_unsupported_precision(monkeypatch):
    from llm_installer import hardware
    from llm_installer.handlers import TransformerHandler

    class WantsBf16(TransformerHandler):
        def get_training_parameters(self):
            params = super().get_training_parameters()
            params["training_precision"] = "bf16"  # as the seed's Example 1
            return params

    cpu = hardware.Hardware(cpu_count=2, ram_gb=24, ram_available_gb=20)
    monkeypatch.setattr(hardware, "detect", lambda: cpu)
    rows = {k: (v, s) for k, v, s in WantsBf16({"model_id": "a/b"}).training_parameters_with_sources()}
    assert rows["training_precision"] == ("auto", "hardware (CPU: bf16 vs fp32 measured at plan time)")

    gpu = hardware.Hardware(
        cpu_count=2, ram_gb=24, ram_available_gb=20, cuda=True, gpus=(hardware.GPU("h100", 80, (9, 0)),)
    )
    monkeypatch.setattr(hardware, "detect", lambda: gpu)
    rows = {k: (v, s) for k, v, s in WantsBf16({"model_id": "a/b"}).training_parameters_with_sources()}
    assert rows["training_precision"][0] == "bf16"  # kept: this GPU does bf16
    assert rows["supports_flash_attention"] == (True, "hardware (GPU compute capability 9.0)")


def test_generic_fallback_handler_adapts_unknown_names(tiny_model_factory, capsys):
    """A generic MoE handler guessed llama-style names; on GPT-NeoX-style layers it falls back to all linear."""
    from llm_installer.handlers import MoEHandler
    from llm_installer.handlers.targets import resolve_lora_targets

    model, _ = _tiny_model("gpt_neox", tiny_model_factory)
    params = MoEHandler({"model_id": "x/unknown-moe", "task": "moe"}).get_training_parameters()
    kwargs = resolve_lora_targets(model, params)
    assert set(kwargs["target_modules"]) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert "using all linear layers" in capsys.readouterr().err
