"""The fused LoRA layers compute what PEFT computes, and give way to PEFT wherever they were not built for."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from llm_installer.train.lora_fast import fuse_lora_layers, unfuse_lora_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(dropout: float = 0.0, use_dora: bool = False, bias: bool = False):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        attention_bias=bias,
        mlp_bias=bias,
    )
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, use_dora=use_dora),
    )
    for name, p in model.named_parameters():  # B starts at zero: give it values so the LoRA path counts
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _step(model, seed: int = 1):
    torch.manual_seed(seed)
    ids = torch.randint(3, 300, (2, 11))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), float(out.loss), grads


@pytest.mark.parametrize("dropout,bias", [(0.0, False), (0.0, True), (0.2, False)])
def test_fused_layers_match_peft_logits_and_gradients(dropout, bias):
    model = _model(dropout=dropout, bias=bias)
    model.train()
    ref_logits, ref_loss, ref_grads = _step(model)
    assert fuse_lora_layers(model) == 2 * len(TARGETS)
    logits, loss, grads = _step(model)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert set(grads) == set(ref_grads) and len(grads) == 2 * 2 * len(TARGETS)
    for name in ref_grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6), name


def test_fused_layers_follow_adapter_state_and_survive_copy_and_save(tmp_path):
    model = _model()
    fuse_lora_layers(model)
    ids = torch.randint(3, 300, (1, 9))
    model.eval()
    with torch.no_grad():
        with_lora = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert not torch.allclose(with_lora, base, atol=1e-4)  # disabling really turns the adapter off
    assert torch.allclose(again, with_lora)

    twin = copy.deepcopy(model)  # the fused forward is a bound method: the copy calls its own layers
    for name, p in twin.named_parameters():
        if "lora_B" in name:
            torch.nn.init.zeros_(p)
    with torch.no_grad():
        assert torch.allclose(twin(input_ids=ids).logits, base, atol=1e-5)
        assert torch.allclose(model(input_ids=ids).logits, with_lora)

    model.save_pretrained(tmp_path / "lora")
    unfuse_lora_layers(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, with_lora, atol=1e-6)
    merged = model.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, with_lora, atol=1e-4)


def test_dora_layers_are_left_to_peft():
    model = _model(use_dora=True)
    ref_logits, ref_loss, _ = _step(model)
    fuse_lora_layers(model)
    logits, loss, _ = _step(model)  # DoRA has a lora_variant: the fused path must step aside per call
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert torch.allclose(logits, ref_logits, atol=1e-6)


# Under autocast both paths round to the autocast dtype, in a different order: they agree to a few of
# its epsilons, not to float32's. The bounds are relative norms, in multiples of that epsilon.
_DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _autocast_step(model, device: str, dtype: torch.dtype, ids: torch.Tensor):
    torch.manual_seed(1)  # the same dropout masks for both paths
    with torch.autocast(device, dtype=dtype):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), float(out.loss), grads


def _assert_autocast_match(model, device: str, dtype: torch.dtype, ids: torch.Tensor, monkeypatch) -> None:
    from peft.tuners.lora.layer import Linear as LoraLinear

    eps = torch.finfo(dtype).eps
    model.to(device).train()
    ids = ids.to(device)
    ref_logits, ref_loss, ref_grads = _autocast_step(model, device, dtype, ids)
    assert fuse_lora_layers(model) > 0

    def peft_forward(*args, **kwargs):
        raise AssertionError("the fused path gave way to PEFT under autocast")

    with monkeypatch.context() as m:  # every fused layer must take the fused path, whatever its input dtype
        m.setattr(LoraLinear, "forward", peft_forward)
        logits, loss, grads = _autocast_step(model, device, dtype, ids)
    assert logits.dtype == ref_logits.dtype == dtype  # what PEFT's forward returns under autocast
    assert loss == pytest.approx(ref_loss, rel=4 * eps)
    assert _rel(logits, ref_logits) < 8 * eps
    assert set(grads) == set(ref_grads) and any("lora_A" in n for n in grads)
    for name, p in model.named_parameters():
        if name in ref_grads:
            assert grads[name].dtype == p.dtype == torch.float32, name  # each parameter's own dtype
            assert _rel(grads[name], ref_grads[name]) < 16 * eps, name


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout,bias", [(0.0, False), (0.0, True), (0.2, False)])
def test_fused_layers_match_peft_under_autocast(device, dtype, dropout, bias, monkeypatch):
    model = _model(dropout=dropout, bias=bias)
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(2))
    _assert_autocast_match(model, device, dtype, ids, monkeypatch)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_tiny_qwen2_matches_peft_under_bf16_autocast(tiny_model_factory, dropout, monkeypatch):
    """A tiny model from tests/tiny.py (q/k/v biases, the real vocabulary) through its own full forward."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_factory("qwen2"), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(3, 1000, (2, 13), generator=torch.Generator().manual_seed(3))
    _assert_autocast_match(model, "cpu", torch.bfloat16, ids, monkeypatch)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_fused_layer_under_autocast_returns_peft_dtypes(x_dtype, monkeypatch):
    """A bf16 input (an attention output under autocast) is fused too; each gradient keeps its input's dtype."""
    model = _model(bias=True)
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4)).to(x_dtype)
    results = []
    for fused in (False, True):
        if fused:
            from peft.tuners.lora.layer import Linear as LoraLinear

            fuse_lora_layers(model)
            monkeypatch.setattr(LoraLinear, "forward", None)  # no way back to PEFT: the fused path must run
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        (y.float() ** 2).sum().backward()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        results.append((y.detach(), xi.grad, a.grad, b.grad))
        assert y.dtype == torch.bfloat16 and xi.grad.dtype == x_dtype
        assert a.grad.dtype == b.grad.dtype == torch.float32
        a.grad = b.grad = None
    eps = torch.finfo(torch.bfloat16).eps
    for got, want in zip(results[1], results[0], strict=True):
        assert _rel(got, want) < 8 * eps
