"""vision_qa data through a tiny llava's processor: images become pixel_values, image tokens are masked,
and one optimizer step runs on the prepared batch."""

from __future__ import annotations

import json

from llm_installer.data.collate import collate
from llm_installer.data.prepare import DataSettings, prepare_dataset
from llm_installer.data.render import IGNORE_INDEX


def _png(path, color):
    from PIL import Image

    Image.new("RGB", (40, 30), color).save(path)
    return path.name


def test_tiny_llava_trains_one_step_on_vision_qa(tmp_path, tiny_model_factory):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llm_installer.handlers.registry import get_handler
    from llm_installer.model_info import ModelInfo

    folder = tiny_model_factory("llava")
    processor = AutoProcessor.from_pretrained(str(folder))
    data = tmp_path / "vqa.jsonl"
    rows = [
        {
            "image": _png(tmp_path / "red.png", (255, 0, 0)),
            "question": "What colour is it?",
            "answer": "Red.",
        },
        {
            "image": _png(tmp_path / "blue.png", (0, 0, 255)),
            "question": "What colour is it?",
            "answer": "Blue.",
        },
        {"image": "missing.png", "question": "What colour is it?", "answer": "Green."},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    handler = get_handler(
        ModelInfo(
            model_id="test/tiny-llava", model_type="llava", family="llava", task="vision_language",
            architecture="LlavaForConditionalGeneration", architectures=["LlavaForConditionalGeneration"],
            has_chat_template=True, is_instruct=True,
        )
    )  # fmt: skip
    assert handler.get_training_parameters()["special_tokens"]["image_token"] == "<image>"
    prepared = prepare_dataset(
        str(data),
        processor,
        handler,
        DataSettings(max_seq_length=256, shuffle=False, rejects_path=str(tmp_path / "r")),
    )
    assert len(prepared.train) == 2
    assert prepared.stats["rejects"] == 1
    assert "vision_qa: image not found: missing.png" in (tmp_path / "r").read_text()

    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    tok = processor.tokenizer
    for example, answer in zip(prepared.train, ["Red.", "Blue."], strict=True):
        ids, labels = example["input_ids"], example["labels"]
        n_image = sum(1 for t in ids if t == image_id)
        assert n_image > 1  # the processor expanded the placeholder into the model's image tokens
        assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels, strict=True) if t == image_id)
        trained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
        assert trained == answer + "<|im_end|>"
        assert tuple(example["pixel_values"].shape[-2:]) == (32, 32)

    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)
    model.train()
    batch = collate(prepared.train, pad_token_id=tok.pad_token_id)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "multi_modal_projector" in n}
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    optim.step()
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed  # the image path got gradients: pixel_values reached the model
