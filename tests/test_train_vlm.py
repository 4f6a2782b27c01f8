"""Training a vision-language model on image data: a tiny LLaVA through the real plan, trainer and CLI.

Image examples train in padded batches (packing is switched off and the plan says why), their pixel_values
reach the model's forward through the loss, the adapter learns, and it reloads to the same logits.
"""

from __future__ import annotations

import json
import warnings

import pytest

from llm_installer.errors import UserError
from llm_installer.train.plan import build_plan
from llm_installer.train.trainer import run_training
from tests import test_train_fixtures as fx
from tests.test_train_fixtures import cli_args, read_json

tiny_installed = fx.tiny_installed  # the shared text-only fixture

COLOURS = {"Red": (255, 0, 0), "Blue": (0, 0, 255), "Green": (0, 160, 0), "Yellow": (255, 255, 0)}


@pytest.fixture
def llava_installed(tiny_model_factory):
    """The tiny random LLaVA of tests/tiny.py (CLIP tower, projector, llama text model) as `test/tiny-llava`."""
    from llm_installer.install import install_model

    return install_model(str(tiny_model_factory("llava")), name="test/tiny-llava")


@pytest.fixture
def image_data(tmp_path):
    """vision_qa records on four generated PNGs (one colour each), image paths relative to the file."""
    from PIL import Image

    folder = tmp_path / "vqa"
    folder.mkdir()
    rows = []
    for name, colour in COLOURS.items():
        image = Image.new("RGB", (40, 30), colour)
        image.putpixel((3, 3), (255 - colour[0], 255 - colour[1], 255 - colour[2]))
        image.save(folder / f"{name.lower()}.png")
        rows.append({"image": f"{name.lower()}.png", "question": "What colour is it?", "answer": f"{name}."})
    path = folder / "images.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _prepared(plan):
    """(tokenizer, prepared data) exactly as the trainer prepares them for the plan's model."""
    from llm_installer.train.trainer import load_components, load_tokenizer_for, prepare_run_data

    folder, info, handler = load_components(plan)
    tokenizer = load_tokenizer_for(folder, handler, info)
    return tokenizer, prepare_run_data(plan, folder, info, tokenizer, handler)


def _base_model(folder):
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(folder.model_dir), dtype=torch.float32)
    return model.eval()


def _forward_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("labels", "num_real_tokens")}


class _LogitsAtEnd:
    """A TrainerCallback that keeps the trained model's logits on `batch` (eval mode) when training ends."""

    def __init__(self, batch):
        from transformers import TrainerCallback

        holder = self

        class _CB(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, **kwargs):
                import torch

                was = model.training
                model.eval()
                device = next(model.parameters()).device
                with torch.no_grad():
                    inputs = {k: v.to(device) for k, v in _forward_inputs(batch).items()}
                    holder.logits = model(**inputs, use_cache=False).logits.float().cpu()
                model.train(was)

        self.callback = _CB()
        self.logits = None


def test_padded_collator_keeps_media_tensors():
    import torch

    from llm_installer.train.collate import IGNORE, PaddedCollator, PaddingFreeCollator

    pixels = torch.rand(1, 3, 32, 32)
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "pixel_values": pixels},
        {"input_ids": [8, 9], "labels": [8, 9]},  # a text-only example in the same batch
    ]
    batch = PaddedCollator(0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert int(batch["num_real_tokens"]) == 5
    assert torch.equal(batch["pixel_values"], pixels)
    # text batches are what they were: no media keys appear
    assert set(PaddedCollator(0)(features[1:])) == {
        "input_ids",
        "labels",
        "attention_mask",
        "num_real_tokens",
    }
    assert "pixel_values" not in PaddingFreeCollator(0, 16)(features[1:])
    # LLaVA-NeXT style pixel_values (images x patches x C x H x W) with unequal patch counts are zero-padded
    a, b = torch.rand(1, 5, 3, 4, 4), torch.rand(1, 3, 3, 4, 4)
    nxt = PaddedCollator(0)(
        [
            {"input_ids": [1], "labels": [1], "pixel_values": a, "image_sizes": torch.tensor([[4, 4]])},
            {"input_ids": [1], "labels": [1], "pixel_values": b, "image_sizes": torch.tensor([[4, 4]])},
        ]
    )
    assert nxt["pixel_values"].shape == (2, 5, 3, 4, 4) and nxt["image_sizes"].shape == (2, 2)
    assert torch.equal(nxt["pixel_values"][1, :3], b[0]) and not nxt["pixel_values"][1, 3:].any()


def test_loss_sends_pixel_values_to_the_vlm(llava_installed, image_data):
    import torch

    from llm_installer.train.collate import PaddedCollator
    from llm_installer.train.loss import causal_lm_loss, split_head

    plan = build_plan(llava_installed, cli_args("--data", str(image_data), "--validation-split", "0"))
    tokenizer, data = _prepared(plan)
    assert len(data.train) == 4 and all("pixel_values" in ex for ex in data.train)
    batch = PaddedCollator(tokenizer.pad_token_id)(list(data.train))
    model = _base_model(llava_installed)
    assert split_head(model) is None  # a *ForConditionalGeneration: the model's own forward runs
    with torch.no_grad():
        ours = causal_lm_loss(model, batch, head_on_labels=True)
        own = model(**_forward_inputs(batch), labels=batch["labels"]).loss
        other = dict(batch, pixel_values=batch["pixel_values"].roll(1, dims=0))
        swapped = causal_lm_loss(model, other, head_on_labels=True)
    assert torch.allclose(ours, own, atol=1e-5)
    assert not torch.allclose(ours, swapped, atol=1e-6)  # the images themselves reach the model


def test_vlm_trains_on_images_and_the_adapter_reloads(llava_installed, image_data, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from llm_installer.train.collate import PaddedCollator
    from llm_installer.train.loss import causal_lm_loss

    argv = ["--data", str(image_data), "--validation-split", "0", "--batch-size", "4", "--max-steps", "12"]
    argv += ["--learning-rate", "0.01", "--force-epochs", "--epochs", "100", "--no-tensorboard"]
    plan = build_plan(llava_installed, cli_args(*argv))
    assert plan.value("packing") is True and plan.value("attn_implementation") == "packed_sdpa"
    tokenizer, data = _prepared(plan)
    batch = PaddedCollator(tokenizer.pad_token_id)(list(data.train))
    base = _base_model(llava_installed)
    with torch.no_grad():
        loss_before = float(causal_lm_loss(base, batch))
        base_logits = base(**_forward_inputs(batch), use_cache=False).logits.float()

    capture = _LogitsAtEnd(batch)
    result = run_training(plan, show_progress=False, extra_callbacks=[capture.callback])

    lora = llava_installed.lora_dir
    assert result.adapter_dir == lora and result.metrics["global_step"] == 12
    assert (lora / "adapter_config.json").is_file() and (lora / "adapter_model.safetensors").is_file()
    info = read_json(lora / "adapter_info.json")
    settings = info["plan"]["settings"]
    assert settings["packing"]["value"] is False and settings["packing"]["source"] == "data"
    assert "pixel tensors" in settings["packing"]["why"]
    assert settings["attn_implementation"]["value"] == "sdpa"
    assert info["handler"] == "llava" and info["data"]["train_examples"] == 4
    saved = load_file(str(lora / "adapter_model.safetensors"))
    assert any("multi_modal_projector" in k for k in saved)  # the projector trains in full
    assert any("lora_A" in k and "language_model" in k for k in saved)
    assert not any("vision_tower" in k for k in saved)  # the vision tower stays frozen
    report = (result.run_dir / "report.md").read_text()
    assert report.count("- after:") == 3 and "- expected: " in report

    with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(base, str(lora)).eval()
    with torch.no_grad():
        loss_after = float(causal_lm_loss(model, batch))
        logits = model(**_forward_inputs(batch), use_cache=False).logits.float()
        other = dict(_forward_inputs(batch), pixel_values=batch["pixel_values"].roll(1, dims=0))
        swapped = model(**other, use_cache=False).logits.float()
    # about 1.1 nats lower at this seed; a random tiny model's logits are small (RMS-normed 64-wide hidden
    # state x 0.02-std head), so the loss cannot fall far below ln(vocab) = 10.8 whatever the adapter
    assert loss_after < loss_before - 0.75, (loss_before, loss_after)
    assert (logits - base_logits).abs().max() > 1e-2  # the adapter changes the answers
    assert capture.logits is not None
    assert torch.allclose(logits, capture.logits, atol=1e-4)  # reloaded adapter == trained model
    assert (logits - swapped).abs().max() > 1e-4  # the trained model still looks at the picture


def test_report_answers_about_the_image_or_text_only(llava_installed, image_data):
    from llm_installer.train.report import generate_answers, held_out_prompts

    plan = build_plan(llava_installed, cli_args("--data", str(image_data), "--validation-split", "0"))
    tokenizer, data = _prepared(plan)
    prompts = held_out_prompts(list(data.train), 2)
    assert len(prompts) == 2 and all("pixel_values" in p["media"] for p in prompts)
    model = _base_model(llava_installed)
    with_images = generate_answers(model, tokenizer, prompts, max_new_tokens=4)
    text_only = generate_answers(
        model, tokenizer, [{k: v for k, v in p.items() if k != "media"} for p in prompts], max_new_tokens=4
    )
    assert len(with_images) == len(text_only) == 2 and all(
        isinstance(a, str) for a in with_images + text_only
    )


def test_train_command_on_image_data(llava_installed, image_data, capsys):
    from llm_installer.cli import main

    argv = ["train", "test/tiny-llava", "--data", str(image_data), "--max-steps", "2", "--batch-size", "2"]
    argv += ["--validation-split", "0.25", "--no-tensorboard"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--dry-run"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "packing is off for image data" in out and "dry run: nothing was trained" in out
    assert not (llava_installed.lora_dir / "adapter_config.json").exists()

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "packing is off for image data" in out and "reached --max-steps 2" in out
    info = read_json(llava_installed.lora_dir / "adapter_info.json")
    assert info["data"]["validation_examples"] == 1 and info["metrics"]["global_step"] == 2
    assert info["metrics"]["last_eval_loss"] is not None  # evaluation ran on an image example too


def test_text_only_model_given_images_is_one_clear_error(tiny_installed, image_data):
    # vision_qa: the text model's handler does not list the format
    with pytest.raises(UserError, match="does not support dataset format vision_qa"):
        run_training(build_plan(tiny_installed, cli_args("--data", str(image_data))), show_progress=False)
    # a format the text handler takes (openai messages), carrying an image part
    chat = image_data.parent / "chat.jsonl"
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": "red.png"}, {"type": "text", "text": "Colour?"}],
        },
        {"role": "assistant", "content": "Red."},
    ]
    chat.write_text(json.dumps({"messages": messages}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="is a text-only model: train a vision-language model") as err:
        run_training(build_plan(tiny_installed, cli_args("--data", str(chat))), show_progress=False)
    assert "\n" not in str(err.value)
    runs = tiny_installed.runs_dir
    assert not runs.exists() or not list(runs.iterdir())  # no empty run folder left behind


def test_text_data_on_a_vlm_still_packs(llava_installed, capsys):
    argv = ["--data", "test_data.json", "--max-steps", "1", "--validation-split", "0", "--no-tensorboard"]
    result = run_training(build_plan(llava_installed, cli_args(*argv)), show_progress=False)
    settings = read_json(result.adapter_dir / "adapter_info.json")["plan"]["settings"]
    assert settings["packing"]["value"] is True and settings["attn_implementation"]["value"] == "packed_sdpa"
    assert "packing is off" not in capsys.readouterr().out
