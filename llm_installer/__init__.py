"""llm-installer: install, fine-tune (LoRA/QLoRA through per-family handlers), chat with and serve LLMs.

Heavy libraries (torch, transformers, peft) are imported inside the functions that need them so that
`llm-installer --help` stays instant.
"""

__version__ = "0.1.0"
