"""The causal-LM loss, computing the output head only at positions that carry a label.

Why: SmolLM2's head is 576 x 49,152; on a prompt-masked instruction batch most positions have no label, yet
a plain forward computes (and keeps for backward) a 49k-wide logit row and its log-softmax for every token.
Here the backbone runs once, the hidden states at labelled positions are gathered, and only those rows go
through the head and the cross-entropy. The result equals the usual shifted mean cross-entropy.

Models whose forward does more than `lm_head(hidden)` (logit soft-capping, logit scaling, MoE router
losses, vision towers) fall back to the model's own forward.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100
_SPECIAL_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "output_router_logits")


def split_head(model: Any) -> tuple[Any, Any] | None:
    """(backbone, output head) of a plain causal LM (PEFT-wrapped or not), else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if not (name.endswith("ForCausalLM") or name.endswith("LMHeadModel")):
        return None
    cfg = getattr(base, "config", None)
    for attr in _SPECIAL_HEAD_ATTRS:
        value = getattr(cfg, attr, None)
        if value not in (None, False):
            return None
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling not in (None, 1, 1.0):
        return None
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is base:
        return None
    return backbone, head


def causal_lm_loss(
    model: Any,
    inputs: dict[str, Any],
    *,
    head_on_labels: bool = True,
    num_items: Any = None,
    aux_scale: float = 1.0,
):
    """Next-token cross-entropy over labelled positions of `inputs` (input_ids, labels, ...).

    The mean over this batch's labelled tokens, or, with `num_items` (the labelled tokens of the whole
    optimizer step, over every micro-batch and process), the sum divided by it: then gradient accumulation
    and several processes weigh every token alike, exactly as one big batch would. An MoE router's
    load-balancing loss is per micro-batch: `aux_scale` (1 / accumulation steps) makes it a mean too.
    """
    import torch.nn.functional as F

    reduction = "mean" if num_items is None else "sum"

    labels = inputs["labels"]
    fwd = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
    targets = labels[:, 1:]
    keep = targets != IGNORE
    parts = split_head(model) if head_on_labels else None
    if parts is None:
        from llm_installer.data.collate import MEDIA_KEYS, TOKEN_KEYS

        # vision-language batches: the images/videos go to the model's own forward with the text
        media = {k: inputs[k] for k in (*MEDIA_KEYS, *TOKEN_KEYS) if inputs.get(k) is not None}
        out = model(**fwd, **media, use_cache=False)
        logits = out.logits[:, :-1]
        if not bool(keep.any()):
            return logits.sum() * 0.0
        loss = _scaled(F.cross_entropy(logits[keep].float(), targets[keep], reduction=reduction), num_items)
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            coef = getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0) or 0.0
            loss = loss + coef * aux_scale * aux
        return loss
    backbone, head = parts
    hidden = backbone(**fwd, use_cache=False)[0]
    if not bool(keep.any()):
        return hidden.sum() * 0.0
    selected = hidden[:, :-1][keep]
    logits = head(selected).float()
    return _scaled(F.cross_entropy(logits, targets[keep], reduction=reduction), num_items)


def _scaled(loss: Any, num_items: Any) -> Any:
    return loss if num_items is None else loss / num_items


__all__ = ["causal_lm_loss", "split_head"]
