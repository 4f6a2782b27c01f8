"""Tiny random-weight models per architecture, built offline from a transformers config in seconds.

`build_tiny_model(family, out_dir, tokenizer_dir)` writes a complete transformers folder (config,
safetensors weights, SmolLM2's tokenizer and chat template) so tests exercise the real code paths of
each family without any download. Vision-language families (llava, qwen2_vl, gemma3) also get their
image tokens added to the tokenizer and their image processor saved into the folder; for llava and
gemma3 `AutoProcessor.from_pretrained(folder)` works. qwen2_vl's processor cannot be built here (see
`qwen2_vl_inputs`).

The shapes are small but structurally complete: every family keeps its own module names (fused
`qkv_proj` for phi3, `Conv1D` for gpt2, fused 3-D expert parameters for the MoE families, a vision
tower + projector for the VLMs), which is what the handlers must get right.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

TOKENIZER_VOCAB = 49152  # SmolLM2's tokenizer
BOS_ID, EOS_ID = 1, 2  # SmolLM2's <|im_start|> / <|im_end|>

# Keyword arguments shared by the decoder-only text configs: small but structurally complete.
_SMALL: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    vocab_size=TOKENIZER_VOCAB,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)

# Families with a plain decoder-only config built from _SMALL (plus per-family extras).
_TEXT_EXTRA: dict[str, dict[str, Any]] = {
    "llama": dict(tie_word_embeddings=True),
    "mistral": {},
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16, sliding_window=64),
    "phi3": dict(pad_token_id=0),
    "starcoder2": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=1,
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
}

# DeepSeek multi-head latent attention + MoE, shrunk.
_MLA: dict[str, Any] = dict(
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,  # layer 0 dense MLP, layer 1 MoE: both kinds are exercised
    n_group=1,
    topk_group=1,
)

TEXT_FAMILIES = (*_TEXT_EXTRA, "gpt2", "gpt_neox", "deepseek_v2", "deepseek_v3")
VISION_FAMILIES = ("llava", "qwen2_vl", "gemma3")
FAMILIES = TEXT_FAMILIES + VISION_FAMILIES
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")

IMAGE_SIZE = 32  # pixels; llava/gemma3 vision towers see 32x32 images in 8x8 patches

# The text that stands for one image in a prompt, per vision family (before processor expansion).
IMAGE_PLACEHOLDER = {
    "llava": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "gemma3": "<start_of_image>",
}


def _text_config(family: str, vocab_size: int = TOKENIZER_VOCAB):
    from transformers import AutoConfig

    small = dict(_SMALL, vocab_size=vocab_size)
    if family in _TEXT_EXTRA:
        return AutoConfig.for_model(family, **small, **_TEXT_EXTRA[family])
    if family == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512, vocab_size=vocab_size,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        )  # fmt: skip
    if family == "gpt_neox":
        small.pop("num_key_value_heads")
        return AutoConfig.for_model("gpt_neox", **small)
    if family in ("deepseek_v2", "deepseek_v3"):
        # MLA has no grouped-query attention: as many key/value heads as query heads.
        return AutoConfig.for_model(
            family, **{**small, **_MLA, "num_key_value_heads": small["num_attention_heads"]}
        )
    raise KeyError(f"no tiny config for family {family!r}; known: {', '.join(FAMILIES)}")


_VISION_TOKENS: dict[str, dict[str, str]] = {
    "llava": {"image_token": "<image>"},
    "qwen2_vl": {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    },
    "gemma3": {
        "image_token": "<image_soft_token>",
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
    },
}


def _vision_tokenizer(family: str, tokenizer_dir: Path):
    """SmolLM2's tokenizer with the family's image (and video) tokens added as special tokens."""
    from transformers import AutoTokenizer

    extra = _VISION_TOKENS[family]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), extra_special_tokens=extra)
    tok.add_special_tokens({"additional_special_tokens": list(extra.values())})
    return tok


class _ImageTextFiles:
    """An image processor + tokenizer pair saved side by side (for a processor we cannot build here)."""

    def __init__(self, image_processor: Any, tokenizer: Any) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    def save_pretrained(self, out_dir: str) -> None:
        self.image_processor.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)


def qwen2_vl_inputs(folder: Path, texts: list[str], images: list[Any]) -> dict[str, Any]:
    """Model inputs for a tiny qwen2_vl folder: what Qwen2VLProcessor does, without its video part.

    Qwen2VLProcessor insists on a video processor, which needs torchvision, and the PyPI torchvision
    wheel does not work with the CPU torch build here ("operator torchvision::nms does not exist").
    Each text holds one `<|image_pad|>` per image; it is repeated once per merged vision patch.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    image_processor = AutoImageProcessor.from_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder))
    vision = image_processor(images=images, return_tensors="pt")
    merge = image_processor.merge_size**2
    counts = iter(int(n) // merge for n in vision["image_grid_thw"].prod(-1))
    expanded = []
    for text in texts:
        parts = text.split("<|image_pad|>")
        out = parts[0]
        for part in parts[1:]:
            out += "<|image_pad|>" * next(counts) + part
        expanded.append(out)
    batch = tok(expanded, return_tensors="pt", padding=True)
    # M-RoPE needs each token's modality: 0 text, 1 image (2 video), as the processor returns.
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    batch["mm_token_type_ids"] = (batch["input_ids"] == image_id).long()
    return {**batch, "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}


def _vision_model_and_processor(family: str, tokenizer_dir: Path):
    """(model, processor) for a tiny vision-language model of `family`."""
    from transformers import AutoModelForImageTextToText

    tok = _vision_tokenizer(family, tokenizer_dir)
    text = dict(_SMALL, vocab_size=len(tok))
    chat_template = tok.chat_template
    if family == "llava":
        from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor

        cfg = LlavaConfig(
            text_config=dict(model_type="llama", **text),
            vision_config=dict(
                model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8, projection_dim=32,
            ),
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="default",
        )  # fmt: skip
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
        processor = LlavaProcessor(
            image_processor=image_processor, tokenizer=tok, patch_size=8,
            vision_feature_select_strategy="default", chat_template=chat_template,
            num_additional_image_tokens=1,
        )  # fmt: skip
    elif family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLImageProcessor

        cfg = Qwen2VLConfig(
            text_config=dict(**text, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
            vision_config=dict(
                depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2,
            ),
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
            bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        )  # fmt: skip
        image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56 * 4)
        processor = _ImageTextFiles(image_processor, tok)
    elif family == "gemma3":
        from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor

        cfg = Gemma3Config(
            text_config=dict(**text, head_dim=16, sliding_window=64),
            vision_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=IMAGE_SIZE, patch_size=8, vision_use_head=False,
            ),
            mm_tokens_per_image=4,
            image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
            boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
            eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        )  # fmt: skip
        image_processor = Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        processor = Gemma3Processor(
            image_processor=image_processor, tokenizer=tok, chat_template=chat_template, image_seq_length=4
        )
    else:
        raise KeyError(f"no tiny vision config for family {family!r}; known: {', '.join(VISION_FAMILIES)}")
    model = AutoModelForImageTextToText.from_config(cfg)
    return model, processor


def build_tiny_model(family: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Build a tiny random model of `family` into `out_dir` with the tokenizer from `tokenizer_dir`.

    Text families get SmolLM2's tokenizer files copied; vision families get the tokenizer with their
    image tokens added and their image processor (plus a full processor for llava and gemma3).
    """
    import torch

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if family in VISION_FAMILIES:
        model, processor = _vision_model_and_processor(family, Path(tokenizer_dir))
        model.save_pretrained(str(out_dir))
        processor.save_pretrained(str(out_dir))
        return out_dir

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_text_config(family))
    model.save_pretrained(str(out_dir))
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, out_dir / f.name)
    return out_dir


def tiny_text_config(family: str, vocab_size: int = TOKENIZER_VOCAB, **overrides: Any):
    """The tiny config of text `family` with `overrides` (e.g. `sliding_window=8`), or of another family
    that takes the shared small shape (e.g. `gpt_oss`).

    The overrides go to the config class itself rather than being set afterwards, so what the class derives
    from them (Qwen2's per-layer `layer_types` from `use_sliding_window`) follows."""
    from transformers import AutoConfig

    if not overrides and family in TEXT_FAMILIES:
        return _text_config(family, vocab_size)
    if family in ("gpt2", "gpt_neox", "deepseek_v2", "deepseek_v3"):
        raise KeyError(
            f"overrides are only supported for the families built from the shared shape, not {family}"
        )
    small = dict(_SMALL, vocab_size=vocab_size)
    return AutoConfig.for_model(family, **{**small, **_TEXT_EXTRA.get(family, {}), **overrides})
