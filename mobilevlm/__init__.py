"""mobilevlm: a MobileVLM-style vision-language model from PyTorch to phones.

The public API. It is imported eagerly: `mobilevlm.generate` must be the function, not the module
of the same name, which a lazy import would let the import system put in its place.
"""

from __future__ import annotations

from .checkpoint import load_config, load_model, load_processor, save_pretrained
from .config import PRESETS, MobileVLMConfig, get_preset
from .errors import MobileVLMError
from .generate import generate, generate_ids, generate_stream
from .model import MobileVLM
from .processing import Processor, Tokenizer, load_image

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "MobileVLM", "MobileVLMConfig", "MobileVLMError", "Processor", "Tokenizer", "generate",
    "generate_ids", "generate_stream", "get_preset", "load_config", "load_image", "load_model",
    "load_processor", "save_pretrained",
]
