"""`packed_sdpa`: attention for padding-free packed rows that costs sum(len^2), not row_len^2.

transformers turns restarting position ids into a block-diagonal mask for SDPA, but SDPA with an arbitrary
mask still computes (and on CPU materialises) the full row x row score matrix. This attention function
instead finds the examples of each row from `position_ids` (a new example starts where the position is 0)
and runs PyTorch's fused causal SDPA on each example's slice: exact per-example causal attention, no mask
tensor, no compute across examples. Registered under transformers' `AttentionInterface`; because it has no
mask function of its own, transformers builds no mask for it at all.

Anything it was not designed for (a mask given, a KV cache where queries and keys differ in length)
goes to transformers' own SDPA path.
"""

from __future__ import annotations

from typing import Any

NAME = "packed_sdpa"
_registered = False


def _sdpa_has_gqa() -> bool:
    """Whether this torch's SDPA takes `enable_gqa` (2.5+); it is a builtin without a signature, so ask it."""
    import torch
    import torch.nn.functional as F

    q = torch.zeros(1, 2, 1, 1)
    try:
        F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True)
    except TypeError:
        return False
    return True


_SDPA_GQA: bool = False


def packed_sdpa_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
):
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    q_len, k_len = query.shape[2], key.shape[2]
    if (
        attention_mask is not None
        or position_ids is None
        or q_len != k_len
        or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sliding_window"))
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    gqa = {}
    if groups > 1:
        if _SDPA_GQA:
            gqa = {"enable_gqa": True}  # no repeated copy of K/V per query head
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    p = dropout if module.training else 0.0
    pos = position_ids.expand(query.shape[0], -1) if position_ids.shape[0] != query.shape[0] else position_ids
    rows = []
    for b in range(query.shape[0]):
        starts = (pos[b] == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        lengths = [e - s for s, e in zip(starts, [*starts[1:], q_len], strict=True)]
        # split (not slicing): its backward is one concatenation, where each slice's backward would
        # allocate and fill a zero tensor of the whole row
        parts = [
            F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scaling, **gqa)
            for q, k, v in zip(
                query[b : b + 1].split(lengths, dim=2),
                key[b : b + 1].split(lengths, dim=2),
                value[b : b + 1].split(lengths, dim=2),
                strict=True,
            )
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register `packed_sdpa` with transformers (idempotent) and return its name."""
    global _registered, _SDPA_GQA
    if not _registered:
        from transformers import AttentionInterface

        _SDPA_GQA = _sdpa_has_gqa()
        AttentionInterface.register(NAME, packed_sdpa_attention)
        _registered = True
    return NAME
