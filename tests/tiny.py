"""Tiny random-weight models per architecture, built offline from a transformers config in seconds.

`build_tiny_model(family, out_dir, tokenizer_dir)` writes a complete transformers folder (config,
safetensors weights, SmolLM2's tokenizer and chat template) so tests exercise the real code paths of
each family without any download.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_VOCAB = 49152  # SmolLM2's tokenizer

# Keyword arguments shared by the decoder-only text configs: small but structurally complete.
_SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    vocab_size=TOKENIZER_VOCAB,
)


def _config(family: str):
    from transformers import AutoConfig

    if family == "llama":
        return AutoConfig.for_model("llama", **_SMALL, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    raise KeyError(f"no tiny config for family {family!r}")


def build_tiny_model(family: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Build a tiny random model of `family` into `out_dir` with the tokenizer from `tokenizer_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(family)
    model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, out_dir / f.name)
    return out_dir
