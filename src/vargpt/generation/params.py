"""Generation parameters: plain, validated, serialisable dataclasses (every result records the ones it used).

``TextParams`` drive next-token decoding, ``ImageParams`` the next-scale image loop (SPEC.md §1.4). The sampling
fields of ``ImageParams`` (``SAMPLING_FIELDS``) default to None = the checkpoint's defaults: its
``image_generation_config.json`` (``IMAGE_CONFIG_FILE``, written by the training run that chose them) where it has
one, else the official VARGPT-v1.1 inference settings (``OFFICIAL_SAMPLING``: CFG 3 on logits, tau 0.5, per-bit
top-p 0.97). The seed, which the official code takes from the clock, comes from the caller.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vargpt.models.vae.schedules import ASPECT_TEMPLATES

__all__ = ["TextParams", "ImageParams", "CFG_MODES", "POSITION_MODES", "SAMPLING_FIELDS", "OFFICIAL_SAMPLING",
           "IMAGE_CONFIG_FILE", "sampling_defaults", "load_sampling_defaults", "save_sampling_defaults"]

#: Unconditional CFG branches. ``official``: the released construction (the LLM runs each scale's chunk with no
#: context at all, positions from 0; the decoder cross-attends the first n rows of the learned ``uncond_embedding``
#: table and is conditioned on its row 0) -- use it for released weights. ``null_prompt``: the same pipeline on an
#: empty user prompt with its own KV cache (what condition dropout on the prompt trains).
CFG_MODES = ("official", "null_prompt")
#: Positions of image-generation tokens in the LLM. ``official``: the raw cache index (the official sampler ignores
#: the M-RoPE delta of understanding images); ``mrope``: the continuation of the text positions (= training with
#: M-RoPE positions). Identical when the prompt holds no understanding image.
POSITION_MODES = ("official", "mrope")
#: The per-bit sampling settings a checkpoint may set defaults for (None in ``ImageParams`` = the default).
SAMPLING_FIELDS = ("cfg_scale", "temperature", "top_k", "top_p")
#: The official VARGPT-v1.1 settings: the defaults of a checkpoint without ``IMAGE_CONFIG_FILE``.
OFFICIAL_SAMPLING = {"cfg_scale": 3.0, "temperature": 0.5, "top_k": 0, "top_p": 0.97}
#: A checkpoint directory's default image-sampling settings (a JSON object of some of ``SAMPLING_FIELDS``).
IMAGE_CONFIG_FILE = "image_generation_config.json"


def _check(cond: bool, field_name: str, value, expected: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}={value!r}: expected {expected}")


@dataclass(kw_only=True)
class TextParams:
    """Next-token decoding.

    Args:
        max_new_tokens: hard limit on generated tokens (image tokens not counted).
        temperature: 0 = greedy (argmax); > 0 = sampling.
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling threshold (0 = off).
        stop_token_ids: extra ids ending a turn (``<|im_end|>`` always does).
        seed: seed of the per-sample generator (sample i of a batch uses ``seed + i`` unless seeds are given).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 0, "max_new_tokens", self.max_new_tokens, "an integer >= 0")
        _check(self.temperature >= 0, "temperature", self.temperature, "a number >= 0 (0 = greedy)")
        _check(self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        _check(0 <= self.top_p <= 1, "top_p", self.top_p, "a number in [0, 1] (0 = off)")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class ImageParams:
    """Next-scale image generation (per-bit sampling, classifier-free guidance on logits).

    The sampling fields (``cfg_scale``, ``temperature``, ``top_k``, ``top_p``) left None take the engine's defaults:
    the checkpoint's ``image_generation_config.json``, else ``OFFICIAL_SAMPLING``.

    Args:
        cfg_scale: guidance scale; logits = cfg * cond + (1 - cfg) * uncond (1 = no guidance, the unconditional
            branch is skipped).
        cfg_mode: one of ``CFG_MODES``; None = the engine's default (``official`` for released checkpoints).
        temperature: tau, bit logits are divided by it (0 = argmax per bit).
        top_k: per-bit top-k over the 2 values (0 = off; 1 = argmax).
        top_p: per-bit nucleus threshold (0 = off); 0.97 makes a bit deterministic when its minority value has
            probability <= 0.03.
        aspect_ratio: requested height / width; the nearest of the 15 templates is used.
        schedule: pixel budget name (``0.06M``, ``0.25M``, ``0.60M``, ``1M`` or ``first-N``); None = the model
            config's ``gen_schedule``.
        positions: one of ``POSITION_MODES``; None = the engine's default.
        seed: seed of the per-sample generator (image i of a batch uses ``seed + i`` unless seeds are given; the
            k-th image of a chat turn uses ``seed + k``).
    """

    cfg_scale: float | None = None
    cfg_mode: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    aspect_ratio: float = 1.0
    schedule: str | None = None
    positions: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_sampling(self)
        if self.top_k is not None:
            self.top_k = int(self.top_k)
        _check(self.cfg_mode is None or self.cfg_mode in CFG_MODES, "cfg_mode", self.cfg_mode, f"one of {CFG_MODES}")
        _check(self.positions is None or self.positions in POSITION_MODES, "positions", self.positions,
               f"one of {POSITION_MODES}")
        lo, hi = min(ASPECT_TEMPLATES), max(ASPECT_TEMPLATES)
        _check(self.aspect_ratio > 0, "aspect_ratio", self.aspect_ratio,
               f"a positive height/width ratio (templates span {lo}..{hi})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_sampling(p) -> None:
    """Validate the sampling fields of ``p`` (an ``ImageParams``; None = unset)."""
    checks = {"cfg_scale": (lambda v: v >= 0, "a number >= 0"),
              "temperature": (lambda v: v >= 0, "a number >= 0 (0 = argmax per bit)"),
              "top_k": (lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0 (0 = off)"),
              "top_p": (lambda v: 0 <= v <= 1, "a number in [0, 1] (0 = off)")}
    for name, (ok, expected) in checks.items():
        v = getattr(p, name)
        _check(v is None or (isinstance(v, int | float) and not isinstance(v, bool) and ok(v)), name, v, expected)


def sampling_defaults(values: Mapping | ImageParams | None = None, where: str = "sampling") -> ImageParams:
    """``OFFICIAL_SAMPLING`` overridden by ``values`` (a mapping of some of ``SAMPLING_FIELDS``, each set, or the
    fields set in an ``ImageParams``), validated; a bad key or value raises ``ValueError`` starting with ``where``."""
    if isinstance(values, ImageParams):
        values = {k: getattr(values, k) for k in SAMPLING_FIELDS if getattr(values, k) is not None}
    values = dict(values or {})
    unknown = sorted(set(values) - set(SAMPLING_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; expected some of {', '.join(SAMPLING_FIELDS)}")
    unset = [k for k, v in values.items() if v is None]
    if unset:
        raise ValueError(f"{where}: {unset[0]}=None: expected a value")
    try:
        return ImageParams(**{**OFFICIAL_SAMPLING, **values})
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_sampling_defaults(path: str | Path) -> ImageParams:
    """The default sampling settings of checkpoint directory ``path`` (``sampling_defaults`` of its
    ``IMAGE_CONFIG_FILE``; none = ``OFFICIAL_SAMPLING``). A malformed file raises ``ValueError`` naming the file and
    the field."""
    f = Path(path) / IMAGE_CONFIG_FILE
    if not f.is_file():
        return sampling_defaults()
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{f}: expected a JSON object of {', '.join(SAMPLING_FIELDS)}")
    return sampling_defaults(data, str(f))


def save_sampling_defaults(path: str | Path, params: ImageParams) -> Path:
    """Write the sampling fields set in ``params`` as checkpoint directory ``path``'s defaults."""
    _check(all(getattr(params, k) is not None for k in SAMPLING_FIELDS), "params", params,
           f"every one of {', '.join(SAMPLING_FIELDS)} set")
    f = Path(path) / IMAGE_CONFIG_FILE
    f.write_text(json.dumps({k: getattr(params, k) for k in SAMPLING_FIELDS}, indent=1) + "\n")
    return f
