"""Packed rows are exact on every family: one row of several examples vs each example alone (eager).

Each case builds a tiny random model of a family with the attention `choose_attention` picks for packed
rows, runs one packed row (the trainer's collator and loss) forward and backward, then switches the same
model to eager attention and runs each example alone. Loss and gradients must agree, and so must greedy
generation (the KV-cache path, with prompts longer than the 8-token windows). The sliding-window cases use
windows shorter than the examples, so the banded per-example mask is what is checked.
"""

from __future__ import annotations

import random

import pytest
import torch

from llm_installer.train.attention import (
    EAGER_NAME,
    NAME,
    attends_per_example,
    attention_load_kwargs,
    choose_attention,
    packing_blocker,
)
from llm_installer.train.collate import PaddingFreeCollator
from llm_installer.train.loss import causal_lm_loss
from tests.tiny import _SMALL, TEXT_FAMILIES, tiny_text_config

VOCAB = 512
LENGTHS = [23, 37, 12, 40, 29]
WINDOWED: list[tuple[str, dict]] = [
    ("mistral", {"sliding_window": 8}),
    ("phi3", {"sliding_window": 8}),
    ("mistral", {"sliding_window": None}),
    ("gemma2", {"sliding_window": 8}),  # every other layer, soft-capped
    ("gemma3_text", {"sliding_window": 8}),
    ("starcoder2", {"sliding_window": 8}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    # Qwen2-MoE does not pass the window to the attention function: only its module carries it
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
    # attention sinks (s_aux) on alternating 8-token windows
    ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8, "head_dim": 16}),
]
CASES = [(f, {}) for f in TEXT_FAMILIES] + WINDOWED
GRAD_NAMES = ("q_proj.weight", "o_proj.weight", "qkv_proj.weight", "c_attn.weight", "query_key_value.weight",
              "q_b_proj.weight", "kv_a_proj_with_mqa.weight", "sinks")  # fmt: skip


def _examples(seed: int = 0) -> list[dict[str, list[int]]]:
    rnd = random.Random(seed)
    out = []
    for n in LENGTHS:
        ids = [rnd.randrange(3, VOCAB) for _ in range(n)]
        cut = rnd.randrange(1, n // 2)
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def _grads(model) -> dict[str, torch.Tensor]:
    """Gradients of the attention projections (and sinks) of every layer."""
    return {
        k: p.grad.clone()
        for k, p in model.named_parameters()
        if p.grad is not None and k.endswith(GRAD_NAMES)
    }


def _case_id(case: tuple[str, dict]) -> str:
    family, over = case
    return family + "".join(
        f"-{k}={v}" for k, v in over.items() if k in ("sliding_window", "use_sliding_window")
    )


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_packed_row_matches_each_example_alone(case):
    from transformers import AutoModelForCausalLM

    family, overrides = case
    cfg = tiny_text_config(family, vocab_size=VOCAB, **overrides)
    assert packing_blocker(family, cfg.to_dict()) is None
    impl, why = choose_attention(family, cfg.to_dict(), packing=True, device="cpu", flash_available=False)
    assert impl in (NAME, EAGER_NAME) and attends_per_example(impl), why
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, **attention_load_kwargs(impl)).eval()
    assert model.config._attn_implementation == impl

    examples = _examples()
    batch = PaddingFreeCollator(pad_token_id=0, max_row_tokens=10_000)(examples)
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    batch.pop("num_real_tokens")
    model.zero_grad(set_to_none=True)
    packed_loss = causal_lm_loss(model, batch)
    packed_loss.backward()
    packed_grads = _grads(model)
    assert packed_grads, "no gradient checked"
    prompt = torch.tensor([examples[3]["input_ids"][:12]])
    gen = {
        "max_new_tokens": 6,
        "do_sample": False,
        "attention_mask": torch.ones_like(prompt),
        "pad_token_id": 0,
    }
    packed_gen = model.generate(input_ids=prompt, **gen)

    model.set_attn_implementation("eager")
    model.zero_grad(set_to_none=True)
    n_total = sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in examples)
    ref_loss = 0.0
    for ex in examples:
        one = {"input_ids": torch.tensor([ex["input_ids"]]), "labels": torch.tensor([ex["labels"]])}
        n = int((one["labels"][:, 1:] != -100).sum())
        loss = causal_lm_loss(model, one) * n / n_total
        loss.backward()
        ref_loss += float(loss.detach())
    ref_grads = _grads(model)
    ref_gen = model.generate(input_ids=prompt, **gen)

    assert float(packed_loss.detach()) == pytest.approx(ref_loss, abs=1e-5)
    for k, ref in ref_grads.items():
        scale = float(ref.abs().max())
        assert scale > 0, k
        assert float((packed_grads[k] - ref).abs().max()) <= 1e-5 * scale, k
    assert packed_gen.tolist() == ref_gen.tolist()


def _vision_config(family: str):
    from transformers import Gemma3Config, LlavaConfig, Qwen2VLConfig

    text = dict(_SMALL, vocab_size=VOCAB)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)  # fmt: skip
    if family == "llava":
        return LlavaConfig(
            text_config=dict(model_type="llama", **text),
            vision_config=dict(model_type="clip_vision_model", projection_dim=32, **vision),
            image_token_index=VOCAB - 1,
        )
    if family == "gemma3":
        return Gemma3Config(
            text_config=dict(**text, head_dim=16, sliding_window=8),
            vision_config=dict(vision_use_head=False, **vision),
            mm_tokens_per_image=4, image_token_index=VOCAB - 1, boi_token_index=VOCAB - 2,
            eoi_token_index=VOCAB - 3,
        )  # fmt: skip
    return Qwen2VLConfig(
        text_config=dict(**text, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
        vision_end_token_id=VOCAB - 4,
    )  # fmt: skip


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_text_rows_of_vision_language_models_pack_exactly(family):
    """Text data on a VLM still packs; its language model gets the position ids and the windows."""
    from transformers import AutoModelForImageTextToText

    cfg = _vision_config(family)
    impl, why = choose_attention(family, cfg.to_dict(), packing=True, device="cpu", flash_available=False)
    assert impl == NAME, why
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg, **attention_load_kwargs(impl)).eval()
    examples = _examples(seed=2)
    batch = PaddingFreeCollator(pad_token_id=0, max_row_tokens=10_000)(examples)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        model.set_attn_implementation("eager")
        ids = batch["input_ids"][0]
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        for s, e in zip(starts, [*starts[1:], len(ids)], strict=True):
            alone = model(input_ids=ids[None, s:e]).logits[0]
            assert torch.allclose(packed[s:e], alone, atol=1e-5), (s, e)


def test_the_rule_for_gemma2_and_llama():
    gemma2 = tiny_text_config("gemma2", vocab_size=VOCAB).to_dict()
    impl, why = choose_attention("gemma2", gemma2, packing=False, device="cpu", flash_available=False)
    assert impl == "eager" and "Gemma2ForCausalLM does not support SDPA" in why
    impl, why = choose_attention("gemma2", gemma2, packing=True, device="cpu", flash_available=False)
    assert impl == EAGER_NAME and "soft-capped at 50.0" in why and "4096-token sliding window" in why
    # soft-capping keeps Gemma-2 off flash attention even where flash-attn is installed
    assert (
        choose_attention("gemma2", gemma2, packing=True, device="cuda", flash_available=True)[0] == EAGER_NAME
    )

    llama = tiny_text_config("llama", vocab_size=VOCAB).to_dict()
    assert choose_attention("llama", llama, packing=True, device="cpu", flash_available=False)[0] == NAME
    assert choose_attention("llama", llama, packing=False, device="cpu", flash_available=False)[0] == "sdpa"
    assert choose_attention("llama", llama, packing=True, device="cuda", flash_available=False)[0] == NAME
    impl, why = choose_attention("llama", llama, packing=True, device="cuda", flash_available=True)
    assert impl == "flash_attention_2" and "varlen" in why and attends_per_example(impl)
    assert choose_attention("llama", llama, packing=False, device="cuda", flash_available=True)[0] == impl
    oss = tiny_text_config("gpt_oss", vocab_size=VOCAB, num_local_experts=4, num_experts_per_tok=2).to_dict()
    impl, why = choose_attention("gpt_oss", oss, packing=True, device="cuda", flash_available=True)
    assert impl == EAGER_NAME and "sinks" in why  # flash-attention 2 has no sinks


def test_gemma2_loads_packed_through_from_pretrained(tmp_path):
    """A class that refuses SDPA refuses any name containing "sdpa"; the rule's packed_eager loads."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_text_config("gemma2", vocab_size=VOCAB)).save_pretrained(tmp_path)
    attention_load_kwargs(NAME)  # registered, and still refused by name
    with pytest.raises(ValueError, match="does not support an attention implementation through"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME)
    impl, _ = choose_attention("gemma2", {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]},
                               packing=True, device="cpu", flash_available=False)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tmp_path, **attention_load_kwargs(impl))
    assert model.config._attn_implementation == EAGER_NAME


def test_packing_is_refused_where_it_cannot_be_exact():
    """M-RoPE, bidirectional attention, non-attention layers and unverified families: padded rows."""
    from transformers import AutoConfig

    qwen2_vl = _vision_config("qwen2_vl").to_dict()
    assert "M-RoPE" in packing_blocker("qwen2_vl", qwen2_vl)
    with pytest.raises(ValueError, match="not exact for qwen2_vl"):
        choose_attention("qwen2_vl", qwen2_vl, packing=True, device="cpu", flash_available=False)
    assert (
        choose_attention("qwen2_vl", qwen2_vl, packing=False, device="cpu", flash_available=False)[0]
        == "sdpa"
    )
    bidirectional = tiny_text_config("gemma3_text", vocab_size=VOCAB, use_bidirectional_attention=True)
    assert "bidirectional" in packing_blocker("gemma3_text", bidirectional.to_dict())
    hybrid = AutoConfig.for_model("qwen3_next", **dict(_SMALL, vocab_size=VOCAB)).to_dict()
    assert "linear_attention" in packing_blocker("qwen3_next", hybrid)
    olmo2 = AutoConfig.for_model("olmo2", **dict(_SMALL, vocab_size=VOCAB)).to_dict()
    assert "not olmo2" in packing_blocker("olmo2", olmo2)


def test_a_packed_training_row_without_position_ids_at_the_attention_raises():
    """Qwen2-VL drops plain 2-D position ids before its attention: a packed row there must not train."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_config(_vision_config("qwen2_vl"), **attention_load_kwargs(NAME))
    batch = PaddingFreeCollator(pad_token_id=0, max_row_tokens=10_000)(_examples()[:2])
    model.train()
    with pytest.raises(ValueError, match="got no position_ids"):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
