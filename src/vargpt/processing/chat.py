"""Chat prompts in the Qwen2-VL format (SPEC.md §2.4) and understanding-image preprocessing.

``render_prompt`` turns messages into the chat string; each image item becomes
``<|vision_start|><|image_pad|><|vision_end|>`` and ``expand_image_pads`` then repeats each ``<|image_pad|>``
grid_t*grid_h*grid_w / merge^2 times, as the Qwen2-VL processor does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from vargpt.config import VARGPTConfig

__all__ = ["DEFAULT_SYSTEM", "render_prompt", "image_processor", "expand_image_pads"]

DEFAULT_SYSTEM = "You are a helpful assistant."


def render_prompt(messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """Messages ``{"role", "content"}`` where content is a string or a list of ``{"type": "text"|"image"}``
    items. A system message is prepended when the first message is not one."""
    parts = []
    if not messages or messages[0]["role"] != "system":
        parts.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            text = content
        else:
            text = "".join("<|vision_start|><|image_pad|><|vision_end|>" if it["type"] == "image" else it["text"]
                           for it in content)
        parts.append(f"<|im_start|>{m['role']}\n{text}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def image_processor(cfg: VARGPTConfig, min_pixels: int = 3136, max_pixels: int = 1_003_520,
                    image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None):
    """The Qwen2-VL image processor (PIL backend, offline) for ``cfg``'s vision tower. ``image_mean`` /
    ``image_std`` (per RGB channel, on pixels scaled to [0, 1]) default to Qwen2-VL's (the CLIP statistics)."""
    v = cfg.vision
    norm = {k: list(map(float, x)) for k, x in (("image_mean", image_mean), ("image_std", image_std)) if x is not None}
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=v.patch_size,
                                    temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
                                    **norm)


def expand_image_pads(ids: list[int], grids_N3: torch.Tensor, image_pad_id: int, merge: int) -> list[int]:
    """Repeat the k-th ``<|image_pad|>`` of ``ids`` t*h*w/merge^2 times for the k-th image grid."""
    out: list[int] = []
    k = 0
    for t in ids:
        if t == image_pad_id:
            if k >= grids_N3.shape[0]:
                raise ValueError(f"prompt has more image placeholders than the {grids_N3.shape[0]} image(s) given")
            out.extend([image_pad_id] * (int(grids_N3[k].prod()) // merge**2))
            k += 1
        else:
            out.append(t)
    if k != grids_N3.shape[0]:
        raise ValueError(f"prompt has {k} image placeholder(s) but {grids_N3.shape[0]} image(s) were given")
    return out


def preprocess_images(cfg: VARGPTConfig, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values (N_patches, C*T*P*P), image_grid_thw (N, 3)) for RGB PIL images."""
    out = image_processor(cfg)(images=[im.convert("RGB") for im in images], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]
