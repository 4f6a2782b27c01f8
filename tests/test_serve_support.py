"""Helpers shared by the serve/chat/export/webpage tests: an installed tiny model with a real PEFT adapter.

No tests live here; the module name only keeps it inside this area's files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llm_installer.serve.app import background_server


def install_tiny(
    models_dir: Path,
    tiny_dir: Path,
    name: str = "tiny",
    *,
    with_lora: bool = True,
    lora_seed: int = 1,
    link: bool = False,
) -> Path:
    """Lay out <models_dir>/<name>/ like the installer does, plus a non-trivial LoRA adapter in lora/."""
    from llm_installer.model_info import ModelInfo

    root = Path(models_dir) / name
    model_dir = root / "model"
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    if link:  # big models: symlink the files instead of copying hundreds of MB
        model_dir.mkdir()
        for f in Path(tiny_dir).iterdir():
            (model_dir / f.name).symlink_to(f.resolve())
    else:
        shutil.copytree(tiny_dir, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    info = ModelInfo(
        model_id=f"test/{name}",
        source="local",
        model_type=cfg.get("model_type"),
        family=cfg.get("model_type"),
        architecture=(cfg.get("architectures") or [None])[0],
        architectures=cfg.get("architectures") or [],
        context_length=cfg.get("max_position_embeddings"),
        has_chat_template=True,
        is_instruct=True,
        vocab_size=cfg.get("vocab_size"),
        config=cfg,
    )
    (root / "model_info.json").write_text(json.dumps({"info": info.model_dump(), "manifest": {}}))
    if with_lora:
        make_adapter(model_dir, root / "lora", seed=lora_seed)
    return root


def make_adapter(model_dir: Path, out_dir: Path, seed: int = 1, scale: float = 0.5) -> Path:
    """A LoRA adapter on q/k/v/o_proj with random (non-zero) B, so the adapted model answers differently."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, scale)
    peft_model.save_pretrained(str(out_dir))
    (Path(out_dir) / "adapter_info.json").write_text(
        json.dumps({"base_model": "test/tiny", "handler": "llama", "metrics": {"train_loss": 1.0}})
    )
    return Path(out_dir)


# The live-server helper lives in the package (bench/ and embedders use it too).
running_server = background_server
