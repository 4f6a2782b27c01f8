"""GGUF source: dequantise a GGUF file into an ordinary safetensors transformers folder.

Every later stage (detection, handlers, training, serving) then sees a plain transformers model with
its tokenizer and chat template; nothing downstream has to know the model came from GGUF.
"""

from __future__ import annotations

from pathlib import Path


def convert_gguf(gguf_path: Path, out_dir: Path, *, dtype: str = "float32") -> Path:
    """Load `gguf_path` with transformers (needs `gguf`), write safetensors + tokenizer into `out_dir`.

    transformers refuses to save a GGUF-loaded model as "quantized" until the quantizer marker is
    cleared; by then the weights are already plain tensors, so clearing it is safe.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=getattr(torch, dtype)
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
