"""Scale schedules and the dynamic aspect-ratio table (SPEC.md §2.6).

Infinity's dynamic-resolution table has 8 base ratios r = h / w; every r != 1 also yields its transpose with key
floor(1000 / r) / 1000 and swapped (h, w), 15 templates in all. Each template lists 13 steps (h, w) of latent
grid sizes; a pixel budget ``pn`` takes a prefix of them:

=======  =====  ================================
pn       steps  1:1 example
=======  =====  ================================
0.06M    7      1,2,4,6,8,12,16 -> 256 x 256 px
0.25M    10     ... 20,24,32    -> 512 x 512 px
0.60M    12     ... 40,48       -> 768 x 768 px
1M       13     ... 64          -> 1024 x 1024 px
first-N  N      the first N steps (prefix of 1M)
=======  =====  ================================

A schedule is a tuple of ``(h, w)`` latent grids (the temporal entry of Infinity's (t, h, w) is always 1 for
images and is not stored). Pixel size = last grid x the VAE stride (16).

Worked example: ``get_schedule(1.25, "0.25M")`` -> ((1,1), (2,2), (3,3), (5,4), (10,8), (15,12), (20,16),
(25,20), (30,24), (35,28)), 560 x 448 px, 2,171 tokens.
"""

from __future__ import annotations

import re
from functools import cache

from vargpt.config import ConfigError

__all__ = [
    "BASE_RATIO_STEPS",
    "ASPECT_TEMPLATES",
    "PN_NUM_STEPS",
    "Schedule",
    "parse_schedule_name",
    "nearest_template",
    "template_steps",
    "get_schedule",
    "schedule_num_tokens",
    "scale_offsets",
    "pixel_size",
]

Schedule = tuple[tuple[int, int], ...]

# r = h / w -> 13 steps of (h, w)  (Infinity's infinity/utils/dynamic_resolution.py)
BASE_RATIO_STEPS: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32),
            (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28),
            (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27),
            (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26),
            (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24),
            (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23),
            (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20),
            (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18),
            (72, 24), (90, 30), (111, 37)),
}


def _build_templates() -> dict[float, tuple[tuple[int, int], ...]]:
    out: dict[float, tuple[tuple[int, int], ...]] = {}
    for r, steps in BASE_RATIO_STEPS.items():
        out[r] = steps
        if r != 1.0:
            out[int(1000 / r) / 1000] = tuple((w, h) for h, w in steps)
    return dict(sorted(out.items()))


#: All 15 templates: h/w ratio -> 13 steps of (h, w).
ASPECT_TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = _build_templates()

#: Number of steps of each named pixel budget.
PN_NUM_STEPS: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

_FIRST_N = re.compile(r"^first-(\d+)$")


def parse_schedule_name(name: str) -> int:
    """Number of steps for a schedule name: a key of ``PN_NUM_STEPS`` or ``"first-N"`` with 1 <= N <= 13."""
    if name in PN_NUM_STEPS:
        return PN_NUM_STEPS[name]
    m = _FIRST_N.match(str(name))
    if m and 1 <= int(m.group(1)) <= 13:
        return int(m.group(1))
    raise ConfigError(f"schedule name {name!r}: expected one of {sorted(PN_NUM_STEPS)} or 'first-N' with 1 <= N <= 13")


def nearest_template(h_div_w: float) -> float:
    """The template ratio nearest to ``h_div_w`` (argmin |h/w - template|, first on ties)."""
    if not h_div_w > 0:
        raise ValueError(f"aspect ratio h/w must be > 0, got {h_div_w}")
    return min(ASPECT_TEMPLATES, key=lambda t: abs(t - h_div_w))


def template_steps(h_div_w: float) -> tuple[tuple[int, int], ...]:
    """All 13 steps (the 1M schedule) of the template nearest to ``h_div_w``."""
    return ASPECT_TEMPLATES[nearest_template(h_div_w)]


@cache
def get_schedule(h_div_w: float, name: str) -> Schedule:
    """The schedule ``name`` (see ``parse_schedule_name``) of the template nearest to ``h_div_w``."""
    return template_steps(h_div_w)[: parse_schedule_name(name)]


def schedule_num_tokens(schedule: Schedule) -> int:
    """L: total tokens over all scales."""
    return sum(h * w for h, w in schedule)


def scale_offsets(schedule: Schedule) -> list[int]:
    """Index of each scale's first token in the flattened sequence, plus the total L at the end."""
    offs = [0]
    for h, w in schedule:
        offs.append(offs[-1] + h * w)
    return offs


def pixel_size(schedule: Schedule, downsample: int = 16) -> tuple[int, int]:
    """(height, width) in pixels of images of this schedule."""
    h, w = schedule[-1]
    return h * downsample, w * downsample
