"""Handlers: per-family training knowledge (the seed's contract) and the registry that picks one.

`get_handler(model_info)` returns the most specific handler (user handlers first; unknown
architectures get a generic one with a warning). See docs/handlers.md to write your own.
"""

from llm_installer.handlers.base import BaseHandler
from llm_installer.handlers.moe import MoEHandler
from llm_installer.handlers.multimodal import MultimodalHandler
from llm_installer.handlers.registry import get_handler
from llm_installer.handlers.transformer import TransformerHandler

__all__ = ["BaseHandler", "MoEHandler", "MultimodalHandler", "TransformerHandler", "get_handler"]
