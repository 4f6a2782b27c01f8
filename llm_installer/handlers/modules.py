"""Module names that several handler families share (one home, so no handler imports another's file).

Llama's layer names are the de-facto standard: Mistral, Qwen, Gemma, the code models, the MoE attention
blocks and the language models inside LLaVA-style vision models all use them.
"""

from __future__ import annotations

LLAMA_ATTENTION: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
