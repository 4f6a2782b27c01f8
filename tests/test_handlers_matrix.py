"""Every family trains its tiny random model through its handler: the issue's matrix.

For each family: build a tiny model (+ tokenizer / processor), detect it, pick its handler from the
registry, prepare the model, verify and resolve LoRA targets, wrap with PEFT, take two optimizer steps
on real token sequences (SmolLM2's tokenizer through the handler's chat template), check the loss is
finite and only intended parameters changed (vision tower frozen, experts and router trained for MoE),
check the parameter-group table, save the adapter, reload it on a fresh base model: same logits.
"""

from __future__ import annotations

import math

import pytest

from tests.tiny import FAMILIES, IMAGE_PLACEHOLDER, MOE_FAMILIES, VISION_FAMILIES

EXPECTED_HANDLER = {
    "llama": "LlamaHandler",
    "mistral": "MistralHandler",
    "qwen2": "Qwen2Handler",
    "qwen3": "Qwen3Handler",
    "gemma": "GemmaHandler",
    "gemma2": "GemmaHandler",
    "gemma3_text": "Gemma3TextHandler",
    "phi3": "Phi3Handler",
    "starcoder2": "StarCoder2Handler",
    "mixtral": "MixtralHandler",
    "qwen2_moe": "QwenMoEHandler",
    "qwen3_moe": "QwenMoEHandler",
    "gpt2": "GPT2Handler",
    "gpt_neox": "GPTNeoXHandler",
    "deepseek_v2": "DeepSeekMoEHandler",
    "deepseek_v3": "DeepSeekMoEHandler",
    "llava": "LlavaHandler",
    "qwen2_vl": "Qwen2VLHandler",
    "gemma3": "Gemma3VisionHandler",
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "Seven is prime."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}],
]  # fmt: skip


def _text_batch(handler, tokenizer):
    """Real token sequences rendered through the handler's template, padded by its pad policy."""
    import torch

    handler.apply_tokenizer_config(tokenizer)
    template = handler.get_chat_template(tokenizer)
    texts = [tokenizer.apply_chat_template(c, chat_template=template, tokenize=False) for c in CONVERSATIONS]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    assert torch.all(batch["attention_mask"].sum(-1) > 5)
    return {**batch, "labels": labels}


def _vision_batch(family, folder, handler):
    from PIL import Image

    from llm_installer.loading import load_processor

    images = [Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGB", (40, 40), (20, 30, 220))]
    texts = [f"{IMAGE_PLACEHOLDER[family]} What colour is this? It is red.",
             f"{IMAGE_PLACEHOLDER[family]} What colour is this? It is blue."]  # fmt: skip
    if family == "qwen2_vl":
        from tests.tiny import qwen2_vl_inputs

        batch = qwen2_vl_inputs(folder, texts, images)
    else:
        processor = load_processor(folder)
        assert processor is not None, "AutoProcessor.from_pretrained(folder) must work"
        handler.apply_tokenizer_config(processor)
        per_sample = [[im] for im in images] if family == "gemma3" else images  # gemma3 nests images per text
        batch = dict(processor(text=texts, images=per_sample, return_tensors="pt", padding=True))
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    specials = handler.get_training_parameters()["special_tokens"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    for token in specials.values():
        tid = tok.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tok.unk_token_id:
            labels[batch["input_ids"] == tid] = -100
    batch["labels"] = labels
    return batch


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_through_its_handler(family, tiny_model_factory, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoTokenizer

    from llm_installer.detect import detect
    from llm_installer.handlers import get_handler
    from llm_installer.handlers.targets import parameter_group, parameter_group_table, resolve_lora_targets
    from llm_installer.loading import load_model

    torch.manual_seed(0)
    folder = tiny_model_factory(family)
    info = detect(folder, model_id=f"tiny/{family}-instruct", source="local")
    handler = get_handler(info)
    assert type(handler).__name__ == EXPECTED_HANDLER[family]
    params = handler.get_training_parameters()

    model = load_model(folder, task=info.task, dtype="fp32")
    model = handler.prepare_model_for_training(
        model, {"gradient_checkpointing": False, "max_seq_length": 64, "batch_size": 2}
    )
    kwargs = resolve_lora_targets(model, params)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", **kwargs)
    peft_model = get_peft_model(model, config)

    if family in VISION_FAMILIES:
        batch = _vision_batch(family, folder, handler)
    else:
        batch = _text_batch(handler, AutoTokenizer.from_pretrained(str(folder)))

    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable
    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    peft_model.train()
    losses = []
    for _ in range(2):
        out = peft_model(**batch)
        assert math.isfinite(out.loss.item())
        losses.append(out.loss.item())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "two optimizer steps changed nothing"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    for name in changed:  # only adapters and modules_to_save copies move
        assert "lora_" in name or "modules_to_save" in name, name
    groups_changed = {parameter_group(n) for n in changed}
    assert "attention" in groups_changed
    assert "vision" not in groups_changed and "embeddings" not in groups_changed

    rows = {g: (t, a) for g, t, a in parameter_group_table(peft_model)}
    assert rows["attention"][0] > 0
    assert rows["embeddings"][0] == 0 and rows["embeddings"][1] > 0
    if family in VISION_FAMILIES:
        assert rows["vision"][0] == 0 and rows["vision"][1] > 0, rows
        assert rows["projector"][0] > 0, rows
        assert "projector" in groups_changed
        assert params["supports_flash_attention"] is False
        assert handler.model_family == "vision_language"
    if family in MOE_FAMILIES:
        assert rows["experts"][0] > 0 and rows["router"][0] > 0, rows
        assert {"experts", "router"} <= groups_changed
        assert "target_parameters" in kwargs  # fused 3-D experts: PEFT target_parameters
        assert params["moe_training"] is True and params["expert_selection"].startswith("top-")
    else:
        assert "experts" not in rows and "router" not in rows
    if family == "gpt2":
        assert kwargs.get("fan_in_fan_out") is True

    # save, reload on a fresh base model, same logits
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    fresh = load_model(folder, task=info.task, dtype="fp32")
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    reloaded.eval()
    with torch.no_grad():
        got = reloaded(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()
