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

from llm_installer.constants import IGNORE_INDEX

IGNORE = IGNORE_INDEX


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


class PaddedCollator:
    """Classic right-padded batch with an attention mask (`--no-packing`, image/video data, and models that
    need a mask); media tensors (MEDIA_KEYS) of the examples that have them are concatenated."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from llm_installer.data.collate import collate

        examples = [_example(f) for f in features]
        batch = collate(
            [dict(f, labels=lab) for f, (_, lab) in zip(features, examples, strict=True)], self.pad_token_id
        )
        batch["num_real_tokens"] = torch.tensor(sum(len(ids) for ids, _ in examples), dtype=torch.long)
        return batch
