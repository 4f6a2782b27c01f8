"""Padding a batch of prepared examples.

Labels are padded with -100 by *position*, never by comparing ids with the pad id: many tokenizers use
the EOS token as padding (SmolLM2's pad is `<|im_end|>`), and masking every pad-id token would silently
stop the model from learning to end its answers.
"""

from __future__ import annotations

from typing import Any

from llm_installer.data.render import IGNORE_INDEX


def collate(features: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad input_ids (pad id), attention_mask (0) and labels (-100) to the longest example."""
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
    if any(f.get("token_type_ids") is not None for f in features):  # Gemma 3: 1 marks an image token
        types = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            if f.get("token_type_ids") is not None:
                types[row, : len(f["token_type_ids"])] = torch.as_tensor(f["token_type_ids"])
        batch["token_type_ids"] = types
    for key in ("pixel_values", "image_sizes", "pixel_values_videos", "image_grid_thw", "video_grid_thw"):
        if key in features[0]:
            batch[key] = torch.cat([torch.as_tensor(f[key]) for f in features if key in f])
    return batch
