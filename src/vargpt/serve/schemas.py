"""Request bodies of the HTTP API (OpenAI's field names plus vargpt extras) and their translation into the
engine's ``TextParams`` / ``ImageParams`` (whose ``__post_init__`` stays the one place values are validated).

Unknown top-level fields are ignored, as OpenAI clients send some we do not use (``user``, ``quality``, ...);
the ``image`` extras object is strict, so a misspelt sampling field is an error rather than a silent default.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, fields
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from vargpt.generation.params import ImageParams, TextParams
from vargpt.models.vae.schedules import ASPECT_TEMPLATES
from vargpt.serve.errors import ApiError, from_value_error
from vargpt.serve.media import data_url, decode_data_url, png_b64

__all__ = ["Limits", "ImageOptions", "ChatRequest", "GenerationRequest", "EditRequest", "image_params",
           "text_params", "new_seed", "engine_messages", "image_part", "message_content", "usage", "images_body"]

SeedField = Annotated[int | None, Field(ge=0, lt=2**63)]


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one request may ask for, and how the worker batches.

    Args:
        max_body_bytes: request body size (413 past it).
        max_image_pixels: width x height of any input image.
        max_n: images per ``images/*`` request.
        max_tokens: cap on a chat request's ``max_tokens`` (the default is ``TextParams``', capped by this).
        max_images_per_turn: images one chat answer may draw.
        max_batch: images in one batched ``generate_images`` call.
        batch_window_s: how long a generation request waits for others to batch with.
        max_queue: requests waiting for the model (503 past it).
        aspect_tolerance: how far (relative) beyond the template span 1/3..3 an aspect ratio may lie.
    """

    max_body_bytes: int = 32 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_n: int = 4
    max_tokens: int = 1024
    max_images_per_turn: int = 4
    max_batch: int = 8
    batch_window_s: float = 0.005
    max_queue: int = 64
    aspect_tolerance: float = 0.15

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            low = 0 if f.name in ("max_images_per_turn", "batch_window_s", "aspect_tolerance") else 1
            if not v >= low:
                raise ValueError(f"Limits.{f.name}={v!r}: expected >= {low}")


class ImageOptions(BaseModel):
    """Image sampling (mirrors ``ImageParams``); ``size`` "WxH" or ``aspect_ratio`` (height / width) pick the
    nearest of the 15 aspect templates; the pixel size follows from the model's schedule."""

    model_config = ConfigDict(extra="forbid")

    cfg_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    aspect_ratio: float | None = None
    size: str | None = None
    seed: SeedField = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class ChatRequest(BaseModel):
    """OpenAI chat completion (``n`` = 1 only) plus ``draw``, ``image``, ``max_images`` and ``previews``."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    seed: SeedField = None
    n: Literal[1] = 1
    stream: bool = False
    draw: Literal["auto", "first", "never"] = "auto"
    image: ImageOptions | None = None
    max_images: int | None = Field(None, ge=0)
    previews: bool = True  # streaming: one preview per finished scale


class GenerationRequest(BaseModel):
    """OpenAI ``images/generations`` (``response_format`` b64_json only) plus the ``ImageOptions`` fields."""

    model: str | None = None
    prompt: str = Field(min_length=1)
    n: int = Field(1, ge=1)
    size: str | None = None
    aspect_ratio: float | None = None
    seed: SeedField = None
    cfg_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    response_format: Literal["b64_json"] = "b64_json"


class EditRequest(GenerationRequest):
    """OpenAI ``images/edits``: as ``GenerationRequest`` plus the source image (a data URL in a JSON body; the
    ``image`` file in a multipart one). Without ``size``/``aspect_ratio`` the source's aspect ratio is kept."""

    image: str | None = None


def new_seed() -> int:
    """A fresh seed for requests that give none (it is returned with the result, so the output is reproducible)."""
    return secrets.randbelow(2**31)


def aspect_ratio(size: str | None, ratio: float | None, limits: Limits, prefix: str = "") -> float | None:
    """height / width from ``size`` ("WxH" or "auto") or ``aspect_ratio``; None when neither is given."""
    if size is not None and ratio is not None:
        raise ApiError(400, "give size or aspect_ratio, not both", prefix + "size")
    param = prefix + ("size" if size is not None else "aspect_ratio")
    if size is not None and size != "auto":
        m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", size)
        if m is None or int(m[1]) == 0 or int(m[2]) == 0:
            raise ApiError(400, f"size={size!r}: expected 'WIDTHxHEIGHT' (e.g. '1024x768') or 'auto'", param)
        ratio = int(m[2]) / int(m[1])
    if ratio is None:
        return None
    lo, hi = min(ASPECT_TEMPLATES), max(ASPECT_TEMPLATES)
    tol = 1 + limits.aspect_tolerance
    if not lo / tol <= ratio <= hi * tol:
        raise ApiError(400, f"{param}: aspect ratio height/width {ratio:.3g} is not supported (the model draws "
                            f"{lo:.3g}..{hi:.3g}: 1:3 to 3:1)", param, code="unsupported_size")
    return ratio


def image_params(opts: ImageOptions | GenerationRequest, limits: Limits, *, seed: int,
                 default_aspect: float | None = None, prefix: str = "") -> ImageParams:
    """The request's image fields over ``ImageParams``' defaults (400 on invalid values)."""
    kw = {k: getattr(opts, k) for k in ("cfg_scale", "temperature", "top_k", "top_p")
          if getattr(opts, k) is not None}
    ratio = aspect_ratio(opts.size, opts.aspect_ratio, limits, prefix)
    if ratio is None:
        ratio = default_aspect
    if ratio is not None:
        kw["aspect_ratio"] = ratio
    try:
        return ImageParams(seed=seed, **kw)
    except ValueError as e:
        raise from_value_error(e, prefix) from None


def text_params(req: ChatRequest, limits: Limits, *, seed: int) -> TextParams:
    """``max_completion_tokens`` (or ``max_tokens``; capped by ``limits.max_tokens``), temperature, top_p."""
    n = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if n is not None and n > limits.max_tokens:
        raise ApiError(400, f"{param}={n}: the limit is {limits.max_tokens}", param)
    kw = {k: getattr(req, k) for k in ("temperature", "top_p") if getattr(req, k) is not None}
    if n is None:
        n = min(TextParams().max_new_tokens, limits.max_tokens)
    try:
        return TextParams(max_new_tokens=n, seed=seed, **kw)
    except ValueError as e:
        raise from_value_error(e) from None


# ------------------------------------------------------------------------------------ messages in, answers out
def engine_messages(messages: list[ChatMessage], max_pixels: int) -> list[dict]:
    """OpenAI messages -> the engine's (images decoded; ``developer`` is ``system``)."""
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str):
            out.append({"role": role, "content": m.content})
            continue
        items = []
        for j, part in enumerate(m.content):
            if part.type == "text":
                items.append({"type": "text", "text": part.text})
            else:
                img = decode_data_url(part.image_url.url, f"messages[{i}].content[{j}].image_url.url", max_pixels)
                items.append({"type": "image_gen" if role == "assistant" else "image", "image": img})
        out.append({"role": role, "content": items})
    return out


def image_part(img) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(img.image)}, "seed": img.seed}


def message_content(result) -> str | list[dict]:
    """The answer as a string, or (when it holds images) as text and image_url parts in order."""
    if not result.images:
        return result.text
    parts, k = [], 0
    for item in result.message["content"]:
        if item["type"] == "text" and item["text"]:
            parts.append({"type": "text", "text": item["text"]})
        elif item["type"] == "image_gen":
            parts.append(image_part(result.images[k]))
            k += 1
    return parts


def usage(prompt_tokens: int, result) -> dict:
    """Token counts (completion tokens include each drawn image's slots; prompt tokens count an image of the
    history as its placeholder)."""
    n = len(result.token_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}


def images_body(images) -> dict:
    w, h = images[0].image.size
    return {"created": int(time.time()), "size": f"{w}x{h}", "output_format": "png",
            "data": [{"b64_json": png_b64(g.image), "seed": g.seed} for g in images]}
