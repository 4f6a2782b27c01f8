"""Choosing the next token of one row from its logits, with OpenAI's settings (temperature, top_p, seed,
presence/frequency penalties applied exactly as OpenAI documents them). torch is imported lazily."""

from __future__ import annotations

from typing import Any

from llm_installer.serve.request import SamplingParams


def seeded_generator(seed: int, device: Any) -> Any:
    """The row's own random generator, so a seeded request answers the same in any batch."""
    import torch

    return torch.Generator(device=device).manual_seed(int(seed))


def sample_token(logits: Any, params: SamplingParams, generated: list[int], generator: Any = None) -> int:
    """The next token id for a row whose tokens so far are `generated` (1-D `logits` of the last position).

    Temperature 0 is greedy. Otherwise in float64 and relative to the best logit, so that any temperature
    in (0, 2] is finite: dividing float32 logits by 1e-39 gave inf/inf = NaN and a crashed batch.
    """
    import torch

    p = params
    if (p.presence_penalty or p.frequency_penalty) and generated:
        ids = torch.tensor(generated, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)
    if p.temperature <= 0:
        return int(torch.argmax(logits))
    logits = (logits.double() - logits.max().double()) / p.temperature
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs_sorted = torch.softmax(sorted_logits, dim=-1)
        drop = probs_sorted.cumsum(-1) - probs_sorted >= p.top_p
        drop[0] = False  # the top token always stays (a top_p of 1e-227 is 0 in float32: all dropped)
        sorted_logits[drop] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(torch.argmax(logits))  # nothing left to sample from: the most likely token
    return int(torch.multinomial(probs, 1, generator=generator))
