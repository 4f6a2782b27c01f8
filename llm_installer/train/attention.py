"""Attention for training: per-example attention on packed rows, and the one rule that picks the implementation.

Packed rows. A padding-free batch is one row holding several examples, with `position_ids` restarting for
each example and no attention mask. transformers would turn the restarting positions into a block-diagonal
mask, but SDPA with an arbitrary mask still computes (and on CPU materialises) the full row x row score
matrix, which was measured slower than padding. `packed_sdpa` instead finds the examples of each row from
`position_ids` (a new example starts wherever the position does not continue the previous one, the rule
transformers' `find_packed_sequence_indices` uses) and computes each example's attention on its own
slice: the cost is sum(len^2), and no example sees another. Per example it reproduces what transformers
5.24 computes for that example alone:

- plain causal layers: PyTorch's fused causal SDPA (grouped-query heads without copying K/V);
- sliding-window layers: the layer's `sliding_window` (passed by the model on the layers that have one,
  e.g. every layer of Mistral/Phi-3, every other layer of Gemma-2/3; Qwen2-MoE only sets it on the module)
  means a query at position i sees keys j with i - window < j <= i (masking_utils'
  `sliding_window_overlay` on top of the causal mask). An example no longer than the window needs nothing
  more than causal attention; a longer one gets that banded mask;
- logit soft-capping (Gemma-2's `softcap`) and attention sinks (`s_aux`, gpt-oss): SDPA can do neither, so
  that example's attention is computed explicitly as the models' eager attention does: scores = q k^T *
  scaling, then tanh(scores / cap) * cap, then the causal/window mask, then (sinks appended as one more
  logit per head and dropped after) softmax in fp32, then the weights times V.

The same function is registered twice: as `packed_sdpa`, and as `packed_eager` for model classes that
refuse SDPA (transformers refuses any implementation whose name contains "sdpa" for a class with
`_supports_sdpa = False`, such as Gemma2ForCausalLM; `packed_eager` loads through `from_pretrained`).

Other calls (generation with a KV cache, a padding mask, a bidirectional module such as a vision tower)
need the mask transformers would build. Our mask function (registered for both names) returns no mask
for the training shape (no padding mask, queries = keys, no cache offset, no custom overlay) and
otherwise delegates to transformers' `sdpa_mask`; with such a mask the attention runs like transformers'
`sdpa` (or, with soft-capping or sinks, explicitly with that mask). Nothing is silently approximated: a
packed training row whose position ids do not reach the attention, or a non-causal module given a packed
row, raises.

`choose_attention` is the one home of the rule (packed or padded rows, CPU or CUDA with flash-attn);
`packing_blocker` says when packed rows cannot be exact for a model, and `attention_load_kwargs` gives
what `from_pretrained` needs for the chosen implementation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NAME = "packed_sdpa"
EAGER_NAME = "packed_eager"
PACKED_IMPLEMENTATIONS = (NAME, EAGER_NAME)
FLASH = "flash_attention_2"

_registered = False
_SDPA_GQA: bool = False

# Families whose packed rows were checked against each example alone through eager attention
# (tests/test_train_attention.py: loss and gradients, sliding windows shorter than the examples included).
VERIFIED_TEXT_FAMILIES = frozenset(
    {
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "starcoder2",
        "gpt2", "gpt_neox", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss",
    }
)  # fmt: skip
# Vision-language wrappers whose text rows pack exactly (their language model is one of the above and
# receives the position ids); image rows are never packed (the trainer pads them).
VERIFIED_VISION_FAMILIES = frozenset({"llava", "gemma3"})
_ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


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


# ---------------------------------------------------------------------------------------------------------
# the attention function


def _example_lengths(position_ids: Any, batch: int, length: int) -> list[list[int]]:
    """Lengths of the examples in each row: a new one starts where the position does not continue (+1)."""
    import torch

    if position_ids.ndim != 2:
        raise ValueError(
            f"{NAME}: position_ids of shape {tuple(position_ids.shape)}; packed rows need (batch, length)"
        )
    pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    starts = torch.ones(batch, length, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    rows, cols = starts.nonzero(as_tuple=True)
    per_row: list[list[int]] = [[] for _ in range(batch)]
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):  # one device sync for the whole batch
        per_row[r].append(c)
    return [[e - s for s, e in zip(st, [*st[1:], length], strict=True)] for st in per_row]


def _repeat_kv(x: Any, groups: int) -> Any:
    """(b, kv_heads, n, d) -> (b, kv_heads * groups, n, d), each key/value head serving `groups` query heads."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def _causal_keep(n: int, window: int | None, device: Any) -> Any:
    """Boolean (n, n) mask, True where a query may attend: causal, and within `window` when given."""
    import torch

    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    keep = j <= i
    if window is not None:
        keep &= j > i - window
    return keep


def _explicit_attention(
    query: Any,
    key: Any,
    value: Any,
    keep: Any,
    *,
    scaling: float,
    softcap: float | None,
    sinks: Any,
    dropout: float,
    training: bool,
) -> Any:
    """Eager attention, in the order the models' eager functions use. Returns (b, heads, q_len, head_dim).

    `keep` is None (attend everywhere), a boolean mask (True = attend) or an additive float mask."""
    import torch

    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if keep is not None:
        if keep.dtype == torch.bool:
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        else:
            scores = scores + keep
    if sinks is not None:
        # one more logit per head that takes part in the softmax and is dropped after (gpt-oss's sinks)
        sink = sinks.reshape(1, -1, 1, 1).to(scores.dtype).expand(scores.shape[0], -1, scores.shape[2], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    probs = torch.nn.functional.dropout(probs.to(query.dtype), p=dropout, training=training)
    return torch.matmul(probs, value)


def _one_example(
    q: Any,
    k: Any,
    v: Any,
    *,
    window: int | None,
    softcap: float | None,
    sinks: Any,
    scaling: float,
    dropout: float,
    training: bool,
) -> Any:
    """Causal attention of one example alone, (1, heads, n, head_dim), by the cheapest exact route."""
    import torch.nn.functional as F

    n = q.shape[2]
    banded = window is not None and n > window
    if softcap is not None or sinks is not None:
        keep = _causal_keep(n, window if banded else None, q.device)
        return _explicit_attention(
            q, k, v, keep, scaling=scaling, softcap=softcap, sinks=sinks, dropout=dropout, training=training
        )
    groups = q.shape[1] // k.shape[1]
    if not banded:
        gqa: dict[str, bool] = {}
        if groups > 1:
            if _SDPA_GQA:
                gqa = {"enable_gqa": True}  # no repeated copy of K/V per query head
            else:
                k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, **gqa
        )
    # a masked SDPA with enable_gqa falls back to the math kernel on CUDA: repeat this example's K/V instead
    keep = _causal_keep(n, window, q.device)
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout, scale=scaling)


def _with_mask(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    *,
    causal: bool,
    softcap: float | None,
    sinks: Any,
    scaling: float | None,
    dropout: float,
    kwargs: dict[str, Any],
):
    """Calls that are not a packed training row: transformers' mask (or none) decides, as with `sdpa`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if softcap is None and sinks is None:
        rest = {k: v for k, v in kwargs.items() if k not in ("softcap", "s_aux", "sliding_window")}
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **rest
        )
    q_len = query.shape[2]
    keep = attention_mask
    if keep is None and causal and q_len > 1:
        # sdpa's is_causal is top-left aligned (transformers only omits the mask when that is right)
        keep = _causal_keep(q_len, None, query.device)
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _explicit_attention(
        query, key, value, keep, scaling=scale, softcap=softcap, sinks=sinks, dropout=dropout,
        training=module.training,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def _layer_settings(module: Any, kwargs: dict[str, Any]) -> tuple[Any, Any, Any, bool]:
    """(softcap, attention sinks, sliding window, causal) of this call, as transformers passes them."""
    # the layer's window: passed as a keyword by most models, only kept on the module by some (Qwen2-MoE)
    window = (
        kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    )
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    return kwargs.get("softcap"), kwargs.get("s_aux"), window, bool(causal)


def _refuse_bidirectional_packing(module: Any, position_ids: Any, b: int, q_len: int) -> None:
    """A bidirectional layer cannot keep a packed row's examples apart: refuse such a row."""
    if position_ids is not None and q_len > 1:
        if any(len(r) > 1 for r in _example_lengths(position_ids, b, q_len)):
            raise ValueError(
                f"{NAME}: {type(module).__name__} attends bidirectionally, and this row holds several "
                "examples; train this model on padded rows (no packing)"
            )


def _row_lengths(module: Any, position_ids: Any, b: int, q_len: int) -> list[list[int]]:
    """The example lengths of each row, from where its position ids restart."""
    if position_ids is not None:
        return _example_lengths(position_ids, b, q_len)
    if module.training:
        raise ValueError(
            f"{NAME}: {type(module).__name__} got no position_ids, so the examples of a packed row cannot "
            "be told apart; train this model on padded rows (no packing)"
        )
    return [[q_len]] * b  # no positions: each row is one sequence (as transformers assumes then)


def _attend_rows(query: Any, key: Any, value: Any, lengths: list[list[int]], **one: Any) -> Any:
    """Each example of each row attended on its own (`_one_example`), joined back into the batch."""
    import torch

    rows = []
    for r in range(query.shape[0]):
        # split (not slicing): its backward is one concatenation, where each slice's backward would
        # allocate and fill a zero tensor of the whole row
        parts = [
            _one_example(q, k, v, **one)
            for q, k, v in zip(
                query[r : r + 1].split(lengths[r], dim=2),
                key[r : r + 1].split(lengths[r], dim=2),
                value[r : r + 1].split(lengths[r], dim=2),
                strict=True,
            )
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


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
    """Per-example attention on packed rows (see the module docstring); transformers' semantics otherwise."""
    import torch

    softcap, sinks, window, causal = _layer_settings(module, kwargs)
    position_ids = kwargs.get("position_ids")
    b, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
    p = dropout if module.training else 0.0

    training_shape = attention_mask is None and q_len == k_len
    if not causal:
        if training_shape:
            _refuse_bidirectional_packing(module, position_ids, b, q_len)
        training_shape = False
    if not training_shape:
        return _with_mask(
            module, query, key, value, attention_mask, causal=causal, softcap=softcap, sinks=sinks,
            scaling=scaling, dropout=p, kwargs=kwargs,
        )  # fmt: skip
    lengths = _row_lengths(module, position_ids, b, q_len)
    dtype = query.dtype
    if query.device.type == "cpu" and (dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")):
        # PyTorch's CPU flash-attention kernel is slower in bf16 than in fp32, backward above all (SmolLM2
        # training step on AMX: 1.23 s of bf16 attention backward against 0.37 s in fp32): attend in fp32,
        # outside autocast (which would cast the inputs back to bf16)
        with torch.autocast("cpu", enabled=False):
            out, _ = packed_sdpa_attention(
                module, query.float(), key.float(), value.float(), attention_mask, dropout, scaling, **kwargs
            )
        return out.to(dtype), None
    out = _attend_rows(
        query, key, value, lengths, window=window, softcap=softcap, sinks=sinks,
        scaling=scaling if scaling is not None else query.shape[-1] ** -0.5, dropout=p, training=module.training,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def packed_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    attention_mask: Any = None,
    **kwargs: Any,
) -> Any:
    """The mask transformers builds for our implementations: none for a packed training row, else sdpa's.

    A training row (no padding mask, as many keys as queries, no cache offset) needs no mask:
    `packed_sdpa_attention` takes the examples from the position ids and the window from the layer.
    Custom overlays (`use_vmap`, e.g. image tokens attending to each other) and every generation or padded
    call get transformers' own `sdpa_mask`."""
    import torch
    from transformers.masking_utils import sdpa_mask

    if (
        attention_mask is None
        and q_length == kv_length
        and not isinstance(q_offset, torch.Tensor)
        and q_offset == 0
        and kv_offset == 0
        and not kwargs.get("use_vmap", False)
    ):
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def register() -> str:
    """Register `packed_sdpa` and `packed_eager` (attention and mask) with transformers (idempotent).

    Returns `packed_sdpa`'s name (what callers that predate `packed_eager` use)."""
    global _registered, _SDPA_GQA
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        _SDPA_GQA = _sdpa_has_gqa()
        for name in PACKED_IMPLEMENTATIONS:
            AttentionInterface.register(name, packed_sdpa_attention)
            AttentionMaskInterface.register(name, packed_mask)
        _registered = True
    return NAME


def attention_load_kwargs(implementation: str | None) -> dict[str, str]:
    """Keyword arguments for `from_pretrained` (or `from_config`) that load a model with `implementation`.

    Registers our per-example implementations first (transformers only accepts registered names). Both
    load directly: `packed_eager` exists because a class with `_supports_sdpa = False` refuses any name
    containing "sdpa", through `from_pretrained` and `set_attn_implementation` alike."""
    if not implementation:
        return {}
    if implementation in PACKED_IMPLEMENTATIONS:
        register()
    return {"attn_implementation": implementation}


def attends_per_example(implementation: str | None) -> bool:
    """Whether `implementation` keeps the examples of one packed row apart by itself, at sum(len^2) cost.

    True for ours and for flash-attention 2 (transformers turns restarting position ids into varlen
    cu_seqlens for it), so a whole batch can be one row; with sdpa/eager the block-diagonal mask costs
    row^2, so rows should stay short."""
    return implementation in (*PACKED_IMPLEMENTATIONS, FLASH)


# ---------------------------------------------------------------------------------------------------------
# the rule


def _config_object(model_type: str, config: Mapping[str, Any]) -> Any:
    """The transformers config for `config` (class defaults filled in), or None for an unknown model type."""
    from transformers import AutoConfig

    from llm_installer.loading import quiet_transformers

    quiet_transformers()  # config-alignment notes are not the user's business here
    try:
        return AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    except (KeyError, ValueError, TypeError):
        return None


def _text_settings(model_type: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """Attention-relevant settings of the (text) model, with the config class's defaults."""
    obj = _config_object(model_type, config)
    text = obj.get_text_config() if obj is not None else None
    raw = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config

    def get(name: str, default: Any = None) -> Any:
        return getattr(text, name, default) if text is not None else raw.get(name, default)

    rope = get("rope_parameters") or get("rope_scaling") or {}
    return {
        "model_type": get("model_type", raw.get("model_type", model_type)),
        "sliding_window": get("sliding_window"),
        "layer_types": list(get("layer_types") or []),
        "softcap": get("attn_logit_softcapping"),
        "bidirectional": bool(get("use_bidirectional_attention", False)) or get("is_causal", True) is False,
        "mrope": isinstance(rope, Mapping) and "mrope_section" in rope,
        "chunked": get("attention_chunk_size") is not None,
    }


def model_class(model_type: str, config: Mapping[str, Any]) -> Any:
    """The transformers class that would load `config` (no weights): its architecture, else the auto mapping."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    names = list(config.get("architectures") or [])
    for mapping in (
        auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        auto.MODEL_MAPPING_NAMES,
    ):
        if model_type in mapping:
            found = mapping[model_type]
            names.append(found[0] if isinstance(found, (list, tuple)) else found)
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return None


def _passes_sinks(cls: Any) -> bool:
    """Whether the class's modeling code passes attention sinks (`s_aux`), which flash-attention 2 lacks."""
    import inspect
    import sys

    try:
        return "s_aux=" in inspect.getsource(sys.modules[cls.__module__])
    except (KeyError, OSError, TypeError):
        return False


def packing_blocker(model_type: str, config: Mapping[str, Any]) -> str | None:
    """Why packed rows (several examples in one row) would not be exact for this model, or None if they are.

    Where this returns a reason, the caller turns packing off (padded rows) and shows the reason."""
    s = _text_settings(model_type, config)
    text_type = s["model_type"]
    if s["bidirectional"]:
        return "its attention is bidirectional, so examples in one packed row would see each other"
    if s["mrope"]:
        return (
            "its multimodal rotary positions (M-RoPE) only keep examples apart when given 4-row position ids, "
            "and packed rows carry plain ones"
        )
    other = sorted(set(s["layer_types"]) - _ATTENTION_LAYER_TYPES)
    if other:
        return f"its {', '.join(other)} layers mix tokens across a whole row"
    if s["chunked"]:
        return "its chunked attention is not reproduced per example"
    verified = model_type in VERIFIED_TEXT_FAMILIES or (
        model_type in VERIFIED_VISION_FAMILIES and text_type in VERIFIED_TEXT_FAMILIES | {model_type}
    )
    if not verified:
        return (
            f"per-example attention on packed rows is verified for {', '.join(sorted(VERIFIED_TEXT_FAMILIES))} "
            f"and {', '.join(sorted(VERIFIED_VISION_FAMILIES))} text rows, not {model_type}"
        )
    return None


def choose_attention(
    model_type: str,
    config: Mapping[str, Any],
    *,
    packing: bool,
    device: str,
    flash_available: bool,
) -> tuple[str, str]:
    """(attn_implementation, why) for training `model_type` with `config` (its config.json as a dict).

    - CUDA with flash-attn installed (`flash_available`), a class with `_supports_flash_attn`, and no
      soft-capping or attention sinks (flash-attn 2 reproduces neither reliably): `flash_attention_2`.
      Packed rows work with it as they are: transformers sees the restarting position ids of a one-row
      batch and runs flash's varlen kernel with per-example cu_seqlens (and the window per example).
    - packed rows: `packed_sdpa` (per-example attention, exact for plain, sliding-window, soft-capped and
      sink layers), or `packed_eager` (the same function) for a class that refuses SDPA, e.g. Gemma-2.
      Call `packing_blocker` first: packed rows for a model it names raise ValueError here.
    - padded rows: `sdpa` where the class supports it (`_supports_sdpa`), else `eager`.
    """
    cls = model_class(model_type, config)
    cls_name = cls.__name__ if cls is not None else model_type
    supports_sdpa = bool(getattr(cls, "_supports_sdpa", True)) if cls is not None else True
    if packing:
        blocker = packing_blocker(model_type, config)
        if blocker:
            raise ValueError(f"packed rows are not exact for {model_type}: {blocker}")
    s = _text_settings(model_type, config)
    sinks = cls is not None and _passes_sinks(cls)
    if (
        device == "cuda"
        and flash_available
        and cls is not None
        and getattr(cls, "_supports_flash_attn", False)
        and s["softcap"] is None
        and not sinks
    ):
        rows = (
            "packed rows as varlen sequences from the restarting position ids" if packing else "padded rows"
        )
        return FLASH, f"CUDA with flash-attn installed: flash attention 2 ({rows})"
    extras = [
        what
        for what, present in (
            (f"a {s['sliding_window']}-token sliding window per example", s["sliding_window"]),
            (f"logits soft-capped at {s['softcap']}", s["softcap"] is not None),
            ("attention sinks", sinks),
        )
        if present
    ]
    detail = f" ({'; '.join(extras)})" if extras else ""
    if packing:
        if supports_sdpa:
            return NAME, f"packed rows: per-example fused SDPA{detail}, sum of len^2, exact"
        return (
            EAGER_NAME,
            f"packed rows: per-example attention{detail}, exact; named {EAGER_NAME} because {cls_name} "
            "refuses SDPA",
        )
    if supports_sdpa:
        return "sdpa", "padded rows: PyTorch SDPA with transformers' mask"
    return "eager", f"padded rows: {cls_name} does not support SDPA (soft-capping or sinks); eager attention"
