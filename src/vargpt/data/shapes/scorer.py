"""Reading an image back into a scene (SHAPES.md "Reading an image").

1. each pixel takes the nearest palette colour if its RGB distance to it is below 80, else background;
2. objects = 4-connected components of one colour with at least 15 pixels;
3. shape from the fill ratio r = pixels / bbox area: r >= 0.88 square, 0.62 <= r < 0.88 circle, else triangle;
4. size: large when max(bbox width, height) >= 16;
5. cell from the centroid: column = floor(x / (64/3)), row = floor(y / (64/3)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from vargpt.data.shapes.world import CANVAS, CELLS, COLORS

__all__ = ["ReadObj", "read_image", "relation_holds"]

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (6, 3)
_NAMES = list(COLORS)


@dataclass(frozen=True)
class ReadObj:
    """An object read back from pixels."""

    shape: str
    color: str
    size: str
    cell: str
    center: tuple[float, float]  # centroid (x, y), pixel centres at i + 0.5
    pixels: int

    def key(self) -> tuple[str, str, str, str]:
        return self.shape, self.color, self.size, self.cell


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an (n, 2) array of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    H, W = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        stack = [(y0, x0)]
        seen[y0, x0] = True
        comp = []
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(comp))
    return out


def read_image(image: Image.Image | np.ndarray) -> list[ReadObj]:
    """Objects of a 64 x 64 RGB image, in reading order of their cells (top to bottom, left to right)."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if arr.shape != (CANVAS, CANVAS, 3):
        raise ValueError(f"read_image expects a {CANVAS}x{CANVAS} RGB image, got shape {arr.shape}")
    dist = np.linalg.norm(arr[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, 6)
    nearest = dist.argmin(-1)
    labels = np.where(dist.min(-1) < 80, nearest, -1)
    objs = []
    step = CANVAS / 3
    for ci, name in enumerate(_NAMES):
        for comp in _components(labels == ci):
            n = len(comp)
            if n < 15:
                continue
            ys, xs = comp[:, 0], comp[:, 1]
            h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            r = n / (h * w)
            shape = "square" if r >= 0.88 else "circle" if r >= 0.62 else "triangle"
            size = "large" if max(h, w) >= 16 else "small"
            cx, cy = float(xs.mean() + 0.5), float(ys.mean() + 0.5)
            col, row = min(int(cx // step), 2), min(int(cy // step), 2)
            objs.append(ReadObj(shape, name, size, CELLS[row * 3 + col], (cx, cy), n))
    return sorted(objs, key=lambda o: (CELLS.index(o.cell), o.center))


def relation_holds(a_center: tuple[float, float], b_center: tuple[float, float], relation: str) -> bool:
    """SHAPES.md relations between centres: A {relation} B."""
    (xa, ya), (xb, yb) = a_center, b_center
    if relation == "to the left of":
        return xb - xa >= 8
    if relation == "to the right of":
        return xa - xb >= 8
    if relation == "above":
        return yb - ya >= 8
    if relation == "below":
        return ya - yb >= 8
    raise ValueError(f"unknown relation {relation!r}")
