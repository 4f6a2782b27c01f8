"""vision_qa data through a tiny llava's / Gemma 3's processor: images become pixel_values, image tokens are
masked, and one optimizer step runs on the prepared batch. Video on a processor without video support is
a per-record reject, never a text-only example."""

from __future__ import annotations

import json

import pytest

from llm_installer.data.collate import collate
from llm_installer.data.prepare import DataSettings, prepare_dataset
from llm_installer.data.render import IGNORE_INDEX
from llm_installer.errors import DataError


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


def _handler(family: str, model_type: str, architecture: str):
    from llm_installer.handlers.registry import get_handler
    from llm_installer.model_info import ModelInfo

    return get_handler(
        ModelInfo(
            model_id=f"test/tiny-{family}", model_type=model_type, family=family, task="vision_language",
            architecture=architecture, architectures=[architecture], has_chat_template=True, is_instruct=True,
        )
    )  # fmt: skip


def test_video_on_a_processor_without_video_is_rejected(tmp_path, tiny_model_factory):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_model_factory("llava")))  # LLaVA 1.5: images only
    handler = _handler("llava", "llava", "LlavaForConditionalGeneration")
    frames = tmp_path / "clip"
    frames.mkdir()
    for i in range(3):
        _png(frames / f"f{i}.png", (80 * i, 0, 0))
    data = tmp_path / "mixed.jsonl"
    rows = [
        {"video": "clip", "question": "How many frames?", "answer": "Three."},
        {
            "image": _png(tmp_path / "red.png", (255, 0, 0)),
            "question": "What colour is it?",
            "answer": "Red.",
        },
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = DataSettings(max_seq_length=256, shuffle=False, rejects_path=str(tmp_path / "r"))
    prepared = prepare_dataset(str(data), processor, handler, settings)
    assert len(prepared.train) == 1 and "pixel_values" in prepared.train[0]  # the image record only
    assert prepared.stats["rejects"] == 1
    (line,) = (tmp_path / "r").read_text().splitlines()
    assert json.loads(line)["origin"] == f"{data}:1"
    assert json.loads(line)["reason"] == "video_qa: this model's processor takes no video"
    tok = processor.tokenizer
    assert all("<video>" not in tok.decode(e["input_ids"]) for e in prepared.train)

    with pytest.raises(
        DataError, match=r"mixed.jsonl:1: video_qa: this model's processor takes no video \(--strict"
    ):
        prepare_dataset(
            str(data), processor, handler, DataSettings(max_seq_length=256, shuffle=False, strict=True)
        )


def test_media_given_but_no_pixel_tensors_back_is_a_reject(tmp_path, tiny_model_factory):
    """A processor that takes the frames/images yet returns no pixel tensors: rejected, never trained as text."""
    from transformers import AutoProcessor

    from llm_installer.data.media import attach_media
    from llm_installer.data.records import Record, RecordError

    processor = AutoProcessor.from_pretrained(str(tiny_model_factory("llava")))

    class TextOnlyOutput:
        image_processor = video_processor = object()
        tokenizer = processor.tokenizer

        def __call__(self, text, images=None, videos=None, **kwargs):
            return processor(text=text, **kwargs)

    path = str(tmp_path / _png(tmp_path / "red.png", (255, 0, 0)))
    example = {"input_ids": [1, 2], "labels": [-100, 2]}
    for record, reason in (
        (Record(messages=[], text=None, images=[path], format="vision_qa"), "no pixel_values"),
        (Record(messages=[], text=None, videos=[[path, path]], format="video_qa"), "no pixel_values_videos"),
    ):
        with pytest.raises(RecordError, match=reason):
            attach_media(example, record, TextOnlyOutput(), "<|im_start|>user\nHi<|im_end|>\n", 256, [(0, 3)])


def test_tiny_gemma3_vision_qa_labels_and_one_training_step(tmp_path, tiny_model_factory):
    """Gemma3Processor expands <start_of_image> into "\\n\\n<start_of_image><image_soft_token>...<end_of_image>\\n\\n";
    the newlines merge with the text's own, so the labels are built on the processor's ids and offsets."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llm_installer.train.loss import causal_lm_loss

    folder = tiny_model_factory("gemma3")
    processor = AutoProcessor.from_pretrained(str(folder))
    assert type(processor).__name__ == "Gemma3Processor"
    handler = _handler("gemma3", "gemma3", "Gemma3ForConditionalGeneration")
    assert handler.get_training_parameters()["special_tokens"]["image_token"] == "<start_of_image>"
    data = tmp_path / "vqa.jsonl"
    rows = [
        {
            "image": _png(tmp_path / "red.png", (255, 0, 0)),
            "question": "What colour is it?",
            "answer": "Red.",
        },
        {
            "images": [_png(tmp_path / "blue.png", (0, 0, 255)), "red.png"],
            "question": "And these two?",
            "answer": "Blue, then red.",
        },
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = DataSettings(max_seq_length=256, shuffle=False, rejects_path=str(tmp_path / "r"))
    prepared = prepare_dataset(str(data), processor, handler, settings)
    assert prepared.stats["rejects"] == 0 and len(prepared.train) == 2

    tok = processor.tokenizer
    soft, boi, eoi = (
        tok.convert_tokens_to_ids(t) for t in ("<image_soft_token>", "<start_of_image>", "<end_of_image>")
    )
    for example, answer, n_images in zip(prepared.train, ["Red.", "Blue, then red."], [1, 2], strict=True):
        ids, labels = example["input_ids"], example["labels"]
        assert ids.count(soft) == 4 * n_images  # mm_tokens_per_image=4 soft tokens per image
        assert ids.count(boi) == ids.count(eoi) == n_images
        assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels, strict=True) if t in (soft, boi, eoi))
        trained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
        assert trained == answer + "<|im_end|>"  # only the answer and its end of turn
        assert tuple(example["pixel_values"].shape) == (n_images, 3, 32, 32)
        # image tokens carry type 1 (Gemma 3 attends among them bidirectionally), everything else 0
        assert example["token_type_ids"] == [int(t == soft) for t in ids]

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)
    model.train()
    batch = collate(prepared.train, pad_token_id=tok.pad_token_id)
    assert batch["pixel_values"].shape[0] == 3
    projector = {n: p.detach().clone() for n, p in model.named_parameters() if "multi_modal_projector" in n}
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    from llm_installer.train.collate import PaddedCollator

    trainer_batch = PaddedCollator(tok.pad_token_id)(prepared.train)
    assert torch.equal(trainer_batch["token_type_ids"], batch["token_type_ids"])
    loss = causal_lm_loss(model, batch)
    assert torch.isfinite(loss)
    # the token types reach the model: without them image tokens attend causally (shown on noise images:
    # a one-colour image gives identical image tokens, for which both attentions agree)
    # (the tiny random model's logits are near-uniform, so compare its last hidden states, not the loss)
    noisy = {k: v for k, v in batch.items() if k != "labels"}
    noisy["pixel_values"] = torch.randn_like(batch["pixel_values"])
    with torch.no_grad():
        both = model(**noisy, output_hidden_states=True).hidden_states[-1]
        noisy.pop("token_type_ids")
        causal = model(**noisy, output_hidden_states=True).hidden_states[-1]
    assert float((both - causal).abs().max()) > 1e-4
    loss.backward()
    optim.step()
    changed = [n for n, p in model.named_parameters() if n in projector and not torch.equal(p, projector[n])]
    assert changed  # gradients reached the projector: the images went through the model
