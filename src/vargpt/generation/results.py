"""What the engine returns: generated images, chat turns and the events of a stream (``vargpt.engine`` re-exports
them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from vargpt.models.vae.schedules import Schedule

__all__ = ["GeneratedImage", "ChatResult", "TextDelta", "ImagePreview", "ImageDone", "Done", "Event"]


@dataclass
class GeneratedImage:
    """One generated image and everything needed to reproduce it."""

    image: Image.Image
    seed: int
    params: dict  # the resolved ImageParams
    schedule: Schedule
    bits: list[torch.Tensor]  # per scale (h*w, d) int64, CPU
    seconds: float  # wall time of the call that produced it, divided by the batch size
    logits: list[torch.Tensor] | None = None  # with return_tensors: per scale (h*w, d, 2), tempered and guided
    decoded: torch.Tensor | None = None  # with return_tensors: (3, H, W) float in [-1, 1] before rounding


@dataclass
class ChatResult:
    """One assistant turn: its text, its images, and the message to append to the conversation."""

    text: str  # generated text; each image appears as "<image>"
    images: list[GeneratedImage]
    token_ids: list[int]  # generated ids (an image as <|image_gen_start|> P x <|image_gen_pad|> <|image_gen_end|>)
    message: dict  # {"role": "assistant", "content": [...]} with "image_gen" items (bits included)
    finish_reason: str  # "stop" (end of turn) or "length"
    text_params: dict = field(default_factory=dict)


@dataclass
class TextDelta:
    text: str


@dataclass
class ImagePreview:
    """The image decoded from the codes accumulated after scale ``scale_index`` (of ``num_scales``)."""

    scale_index: int
    num_scales: int
    image: Image.Image
    row: int = 0  # which image of a batch


@dataclass
class ImageDone:
    image: GeneratedImage


@dataclass
class Done:
    result: ChatResult


Event = TextDelta | ImagePreview | ImageDone | Done
