"""Scenes of the Shapes world (SHAPES.md "Scenes"): objects, sampling and exact rendering.

A scene is 1-3 objects on a 64 x 64 white canvas, each centred in a different cell of a 3 x 3 grid with at most
1 px of jitter per axis. Rendering is exact (no anti-aliasing) so that the scorer (``scorer.py``) reads every
rendered scene back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

__all__ = ["CANVAS", "COLORS", "SHAPES", "SIZES", "CELLS", "Obj", "Scene", "render", "random_scene", "cell_center"]

CANVAS = 64
BACKGROUND = (255, 255, 255)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 80, 220),
    "yellow": (235, 210, 30), "purple": (140, 50, 180), "cyan": (30, 190, 200),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 12, "large": 18}  # bounding-box side in pixels
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")


def cell_center(cell: str) -> tuple[float, float]:
    """(x, y) centre of a grid cell in pixel coordinates (pixel i spans [i, i + 1))."""
    k = CELLS.index(cell)
    row, col = divmod(k, 3)
    step = CANVAS / 3
    return (col + 0.5) * step, (row + 0.5) * step


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour, size and cell, plus its jitter (dx, dy) in {-1, 0, 1}."""

    shape: str
    color: str
    size: str
    cell: str
    jitter: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        for name, value, allowed in (("shape", self.shape, SHAPES), ("color", self.color, tuple(COLORS)),
                                     ("size", self.size, tuple(SIZES)), ("cell", self.cell, CELLS)):
            if value not in allowed:
                raise ValueError(f"Obj.{name}={value!r}: expected one of {allowed}")
        if any(abs(j) > 1 for j in self.jitter):
            raise ValueError(f"Obj.jitter={self.jitter}: each component must be in -1..1")

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Bounding box (x0, y0, x1, y1), end-exclusive, in pixels."""
        s = SIZES[self.size]
        cx, cy = cell_center(self.cell)
        x0 = int(round(cx - s / 2)) + self.jitter[0]
        y0 = int(round(cy - s / 2)) + self.jitter[1]
        return x0, y0, x0 + s, y0 + s

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def key(self) -> tuple[str, str, str, str]:
        """What the scorer reads back (jitter is not observable)."""
        return self.shape, self.color, self.size, self.cell


@dataclass(frozen=True)
class Scene:
    """1-3 objects in distinct cells."""

    objects: tuple[Obj, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"Scene: two objects share a cell ({cells})")

    def key(self) -> frozenset:
        return frozenset(o.key() for o in self.objects)

    def reading_order(self) -> list[Obj]:
        """Objects top to bottom, then left to right (by cell)."""
        return sorted(self.objects, key=lambda o: CELLS.index(o.cell))

    def replace_obj(self, old: Obj, new: Obj | None) -> Scene:
        objs = [o for o in self.objects if o is not old]
        if new is not None:
            objs.append(new)
        return Scene(tuple(objs))

    def with_jitter(self, rng: random.Random) -> Scene:
        return Scene(tuple(replace(o, jitter=(rng.randint(-1, 1), rng.randint(-1, 1))) for o in self.objects))


def _mask(obj: Obj) -> tuple[np.ndarray, tuple[int, int]]:
    """Boolean mask (s, s) of the filled shape and its top-left corner."""
    x0, y0, x1, y1 = obj.box
    s = x1 - x0
    c = (np.arange(s) + 0.5) - s / 2  # pixel-centre offsets from the box centre
    yy, xx = np.meshgrid(c, c, indexing="ij")
    if obj.shape == "square":
        m = np.ones((s, s), dtype=bool)
    elif obj.shape == "circle":
        m = xx**2 + yy**2 <= (s / 2) ** 2
    else:  # triangle: apex at the top centre, base along the bottom edge, height = base
        depth = yy + s / 2  # 0 at the top edge, s at the bottom
        m = np.abs(xx) <= depth / 2
    return m, (x0, y0)


def render(scene: Scene) -> Image.Image:
    """The 64 x 64 RGB image of ``scene`` (exact palette colours on white)."""
    img = np.full((CANVAS, CANVAS, 3), 255, dtype=np.uint8)
    for obj in scene.objects:
        m, (x0, y0) = _mask(obj)
        s = m.shape[0]
        region = img[y0:y0 + s, x0:x0 + s]
        region[m] = COLORS[obj.color]
    return Image.fromarray(img, mode="RGB")


def random_obj(rng: random.Random, cell: str, **fixed) -> Obj:
    return Obj(shape=fixed.get("shape") or rng.choice(SHAPES), color=fixed.get("color") or rng.choice(list(COLORS)),
               size=fixed.get("size") or rng.choice(list(SIZES)), cell=cell,
               jitter=(rng.randint(-1, 1), rng.randint(-1, 1)))


def random_scene(rng: random.Random, n: int | None = None) -> Scene:
    """A uniformly random scene of ``n`` (default 1-3) objects in distinct random cells."""
    n = rng.randint(1, 3) if n is None else n
    cells = rng.sample(CELLS, n)
    return Scene(tuple(random_obj(rng, c) for c in cells))
