"""Batches for causal-LM training: padding-free packed rows, or padded rows as the fallback.

Why padding-free: with dynamic padding a third of the computed tokens of a typical instruction dataset are
padding. Here a batch of examples is packed (first-fit decreasing) into as few rows of at most
`max_row_tokens` tokens as it takes, and each example gets `position_ids` restarting at 0. With no attention
mask, transformers (5.x, SDPA/flash) turns restarting position ids into a block-diagonal causal mask, so
packed examples never attend to each other and the loss equals the unpacked loss. The batch size still
counts examples, so learning rates and step counts keep their usual meaning.

Every example's first label is set to -100: in a packed row the token before it belongs to another
example, and in an unpacked one the first token is never predicted anyway, so both layouts see the same
targets.

Image and video examples (vision-language models) always take the padded layout: a packed row would have to
carry several examples' pixel tensors and the vision tower's tokens per example, which padding-free packing
cannot express; `PaddedCollator` concatenates their media tensors along the first dimension, as the
models' own processors do for a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IGNORE = -100
# Per-example tensors a vision-language processor adds beside input_ids; batched by concatenation.
MEDIA_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
# Per-token lists beside input_ids that some processors return (Gemma 3: 1 marks an image token); padded
# with 0 like the ids, and passed to the model's forward with the media.
TOKEN_KEYS = ("token_type_ids",)


def _example(ex: dict[str, Any]) -> tuple[list[int], list[int]]:
    ids = list(ex["input_ids"])
    labels = list(ex.get("labels", ids))
    if len(labels) != len(ids):
        raise ValueError("an example's labels and input_ids differ in length")
    if labels:
        labels[0] = IGNORE
    return ids, labels


def pack_rows(lengths: Sequence[int], max_row_tokens: int) -> list[list[int]]:
    """First-fit-decreasing bins of example indices; a longer-than-row example gets a row of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(max_row_tokens - n, 0))
    for row in rows:
        row.sort()  # keep the dataset order inside a row: deterministic and easy to read
    return rows


class PaddingFreeCollator:
    """Packs a list of tokenized examples into rows with restarting position ids and no padding compute."""

    def __init__(self, pad_token_id: int, max_row_tokens: int) -> None:
        self.pad_token_id = pad_token_id
        self.max_row_tokens = max_row_tokens

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        examples = [_example(f) for f in features]
        rows = pack_rows([len(ids) for ids, _ in examples], self.max_row_tokens)
        width = max(sum(len(examples[i][0]) for i in row) for row in rows)
        input_ids, labels, positions = [], [], []
        real = 0
        for row in rows:
            ids_r: list[int] = []
            lab_r: list[int] = []
            pos_r: list[int] = []
            for i in row:
                ids, lab = examples[i]
                ids_r += ids
                lab_r += lab
                pos_r += list(range(len(ids)))
            real += len(ids_r)
            pad = width - len(ids_r)
            # Padding forms its own "sequence" (positions restart at 0): it attends only to itself and
            # carries no labels, so it changes nothing for the real examples.
            ids_r += [self.pad_token_id] * pad
            lab_r += [IGNORE] * pad
            pos_r += list(range(pad))
            input_ids.append(ids_r)
            labels.append(lab_r)
            positions.append(pos_r)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "num_real_tokens": torch.tensor(real, dtype=torch.long),
        }


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


class PaddedCollator:
    """Classic right-padded batch with an attention mask (`--no-packing`, image/video data, and models that
    need a mask); media tensors (MEDIA_KEYS) of the examples that have them are concatenated."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        examples = [_example(f) for f in features]
        width = max(len(ids) for ids, _ in examples)
        input_ids, labels, mask = [], [], []
        real = 0
        for ids, lab in examples:
            pad = width - len(ids)
            real += len(ids)
            input_ids.append(ids + [self.pad_token_id] * pad)
            labels.append(lab + [IGNORE] * pad)
            mask.append([1] * len(ids) + [0] * pad)
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "num_real_tokens": torch.tensor(real, dtype=torch.long),
        }
        for key in TOKEN_KEYS:
            if any(f.get(key) is not None for f in features):
                batch[key] = torch.tensor(
                    [
                        list(f.get(key) or [0] * len(f["input_ids"])) + [0] * (width - len(f["input_ids"]))
                        for f in features
                    ],
                    dtype=torch.long,
                )
        for key in MEDIA_KEYS:
            values = [f[key] for f in features if f.get(key) is not None]
            if values:
                batch[key] = _media_tensor(key, values)
        return batch
