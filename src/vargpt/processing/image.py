"""Image <-> tensor conversions for generation targets and outputs."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["to_pil", "from_pil"]


def to_pil(img_B3HW: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] float images -> RGB PIL images, rounding to the nearest uint8 (the official code truncates)."""
    x = ((img_B3HW.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), mode="RGB") for a in x]


def from_pil(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> (B, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1
