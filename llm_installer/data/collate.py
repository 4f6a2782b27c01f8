"""Padding a batch of prepared examples.

Labels are padded with -100 by *position*, never by comparing ids with the pad id: many tokenizers use
the EOS token as padding (SmolLM2's pad is `<|im_end|>`), and masking every pad-id token would silently
stop the model from learning to end its answers.
"""

from __future__ import annotations

from typing import Any

from llm_installer.data.render import IGNORE_INDEX

# Per-example tensors a vision-language processor adds beside input_ids; batched by concatenation.
MEDIA_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
# Per-token lists beside input_ids that some processors return (Gemma 3: 1 marks an image token); padded
# with 0 like the ids, and passed to the model's forward with the media.
TOKEN_KEYS = ("token_type_ids",)


def _media_tensor(key: str, values: list[Any]) -> Any:
    """One batch tensor from the examples' `key` tensors (concatenated along dim 0).

    LLaVA-NeXT style `pixel_values` (images x patches x C x H x W) differ in their patch count from image to
    image; they are zero-padded to the largest, which is what the processor itself does inside a batch (the
    model drops the padding patches using `image_sizes`).
    """
    import torch

    tensors = [torch.as_tensor(v) for v in values]
    if (
        key == "pixel_values"
        and len({t.shape[1:] for t in tensors}) > 1
        and all(t.dim() == 5 for t in tensors)
    ):
        most = max(t.shape[1] for t in tensors)
        tensors = [
            torch.cat([t, t.new_zeros((t.shape[0], most - t.shape[1], *t.shape[2:]))], dim=1) for t in tensors
        ]
    return torch.cat(tensors)


def collate(features: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad input_ids (pad id), attention_mask (0), labels (-100) and per-token lists (0) to the longest
    example; concatenate the media tensors of the examples that have them."""
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(features), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        ids[row, :n] = torch.as_tensor(f["input_ids"])
        labels[row, :n] = torch.as_tensor(f["labels"])
        mask[row, :n] = 1
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for key in TOKEN_KEYS:
        if any(f.get(key) is not None for f in features):
            values = torch.zeros((len(features), longest), dtype=torch.long)
            for row, f in enumerate(features):
                if f.get(key) is not None:
                    values[row, : len(f[key])] = torch.as_tensor(f[key])
            batch[key] = values
    for key in MEDIA_KEYS:  # of the examples that have them: a batch may mix text and image examples
        media = [f[key] for f in features if f.get(key) is not None]
        if media:
            batch[key] = _media_tensor(key, media)
    return batch
