"""KV-cache surgery for continuous batching: requests that arrive while others decode are prefilled
apart, then their cache and attention mask are left-padded to the running batch's width and stacked onto
it; rows that finish are dropped and all-padding columns on the left trimmed. Works on transformers'
`DynamicCache` made of plain `DynamicLayer`s only (a sliding-window or quantised cache is not joinable,
and its batch then runs without joiners). torch and transformers are imported lazily."""

from __future__ import annotations

from typing import Any


def new_cache(config: Any) -> Any:
    """An empty DynamicCache for a model with this config."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # older transformers
        return DynamicCache()


def is_joinable(cache: Any) -> bool:
    """Whether `concat` and `trim_left` can work on this cache (every layer a plain DynamicLayer)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def trim_left(mask: Any, cache: Any) -> tuple[Any, Any]:
    """Drop leading columns that are padding for every row (after long rows left the batch)."""
    import torch

    col_used = mask.any(dim=0)
    if bool(col_used[0]) or not bool(col_used.any()):
        return mask, cache
    start = int(torch.nonzero(col_used)[0])
    if start <= 0 or not is_joinable(cache):
        return mask, cache
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.numel():
            layer.keys = layer.keys[:, :, start:, :].contiguous()
            layer.values = layer.values[:, :, start:, :].contiguous()
    return mask[:, start:], cache


def _left_pad(t: Any, n: int, dim: int) -> Any:
    import torch

    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


def concat(mask_a: Any, cache_a: Any, mask_b: Any, cache_b: Any) -> tuple[Any, Any]:
    """Join two batches: left-pad the shorter KV cache and mask, then stack along the batch (into
    `cache_a`, which is returned with the joined mask)."""
    import torch

    la, lb = mask_a.shape[1], mask_b.shape[1]
    width = max(la, lb)
    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers, strict=True):
        layer_a.keys = torch.cat(
            [_left_pad(layer_a.keys, width - la, 2), _left_pad(layer_b.keys, width - lb, 2)], dim=0
        )
        layer_a.values = torch.cat(
            [_left_pad(layer_a.values, width - la, 2), _left_pad(layer_b.values, width - lb, 2)], dim=0
        )
    mask = torch.cat([_left_pad(mask_a, width - la, 1), _left_pad(mask_b, width - lb, 1)], dim=0)
    return mask, cache_a
