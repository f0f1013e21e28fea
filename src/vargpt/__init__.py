"""vargpt: VARGPT-v1.1, a unified visual autoregressive multimodal model.

Understands images (next-token prediction), generates images (next-scale prediction over a BSQ multi-scale VAE)
and edits images, on a Hugging Face transformers Qwen2-VL backbone.
"""

from vargpt.config import PRESETS, VARGPTConfig, get_preset
from vargpt.engine import ChatResult, Engine, GeneratedImage
from vargpt.generation.params import ImageParams, TextParams

__version__ = "0.1.0"
__all__ = ["VARGPTConfig", "PRESETS", "get_preset", "Engine", "ImageParams", "TextParams", "ChatResult",
           "GeneratedImage", "__version__"]
