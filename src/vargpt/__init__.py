"""vargpt: VARGPT-v1.1, a unified visual autoregressive multimodal model.

Understands images (next-token prediction), generates images (next-scale prediction over a BSQ multi-scale VAE)
and edits images, on a Hugging Face transformers Qwen2-VL backbone.

The engine and its parameter classes are imported lazily (``vargpt.Engine`` loads torch and transformers on first
use), so that ``import vargpt`` and ``vargpt --help`` stay fast.
"""

from __future__ import annotations

from vargpt.config import PRESETS, VARGPTConfig, get_preset

__version__ = "0.1.0"
__all__ = ["VARGPTConfig", "PRESETS", "get_preset", "Engine", "ImageParams", "TextParams", "ChatResult",
           "GeneratedImage", "__version__"]

_LAZY = {"Engine": "vargpt.engine", "ChatResult": "vargpt.engine", "GeneratedImage": "vargpt.engine",
         "ImageParams": "vargpt.generation.params", "TextParams": "vargpt.generation.params"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vargpt' has no attribute {name!r}")
