"""Images and video frames for vision-language models, through the model's own processor.

The text side (template, mask) is done exactly as for text models; the processor then expands each image
placeholder into the model's image tokens and produces `pixel_values`. Labels are carried over by walking
both token sequences: tokens the processor inserted (the expanded image tokens) get -100.
"""

from __future__ import annotations

from typing import Any

from llm_installer.data.records import Record, RecordError
from llm_installer.data.render import IGNORE_INDEX


def _open(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise RecordError(f"cannot read image {path}: {exc}") from None


def attach_media(
    example: dict[str, Any], record: Record, processor: Any, text: str, max_seq_length: int
) -> dict:
    """Run the processor on the rendered `text` with the record's images/frames; align the labels."""
    images = [_open(p) for p in record.images] or None
    videos = [[_open(f) for f in frames] for frames in record.videos] or None
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    try:
        out = processor(**kwargs, add_special_tokens=False)
    except TypeError:
        out = processor(**kwargs)
    except (ValueError, RuntimeError) as exc:
        raise RecordError(
            f"the model's processor refused this record: {str(exc).splitlines()[0][:200]}"
        ) from None
    ids = out["input_ids"][0].tolist()
    src_ids, src_labels = example["input_ids"], example["labels"]
    labels: list[int] = []
    i = 0
    for token in ids:
        if i < len(src_ids) and token == src_ids[i]:
            labels.append(src_labels[i])
            i += 1
        else:
            labels.append(IGNORE_INDEX)  # inserted by the processor (expanded image/video tokens)
    if i != len(src_ids):
        raise RecordError(
            "the processor's tokens do not line up with the rendered text (image token missing?)"
        )
    if len(ids) > max_seq_length:
        raise RecordError(
            f"{len(ids)} tokens with the image tokens, longer than max_seq_length={max_seq_length} "
            "(raise --max-seq-length)"
        )
    result: dict[str, Any] = {"input_ids": ids, "labels": labels}
    for key, value in out.items():
        if key not in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
            result[key] = value
    return result
