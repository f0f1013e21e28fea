"""Collators: validated records -> the keyword arguments of ``VARGPT.forward`` (SPEC.md §2.4-2.6, §4.4, §4.6).

One SFT row (text-to-image, tiny preset: 64 px target, L = 21 decoder tokens, ``gen_pad_multiple`` m = 1)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n
    <|im_start|>assistant\\n{reply}<|image_gen_start|> 21 x <|image_gen_pad|> <|image_gen_end|><|im_end|>\\n
    labels: -100 ............................................. -100 | {reply}<|image_gen_start|> -100 x 21
            <|image_gen_end|><|im_end|> | -100

Only assistant content and its closing ``<|im_end|>`` are trained (LLaMA-Factory's masking: system, user turns,
the ``<|im_start|>assistant\\n`` header, the separator newline and padding are -100; ``<|image_gen_pad|>`` slots
are always -100). An understanding ``<image>`` becomes ``<|vision_start|>`` + t*h*w/4 ``<|image_pad|>`` +
``<|vision_end|>`` (Qwen2-VL processor); an ``<image_gen>`` becomes ``<|image_gen_start|>`` + P
``<|image_gen_pad|>`` + ``<|image_gen_end|>`` with P = ceil(L / m) * m (``VARGPT.gen_slots``). Rows are
right-padded with ``<|endoftext|>``. ``position_ids`` are not produced: ``VARGPT.forward`` computes them per
``config.train_positions`` (``"mrope"`` = exactly the engine's prefill positions).

Generation targets (``gen_pixel_values``, (N, 3, S, S) in [-1, 1], row-major over the batch): the shorter side is
resized to round(1.125 S) with Lanczos (torchvision ``Resize(int)`` semantics: the longer side is truncated to
an int, an image already at that size is not resampled), then an S x S crop (random or center, torchvision
``RandomCrop`` / ``CenterCrop`` offsets). The official plugin first shrinks any image above 512 x 512 px with
nearest-neighbour resampling and only then applies Lanczos, i.e. it resamples twice (SPEC.md D6); we resample once,
from the original. Understanding images likewise go straight to the Qwen2-VL image processor (the official
nearest-neighbour 512 x 512 cap is not applied), so training sees them as the engine does.

Randomness (crops, prompt dropout) comes from ``generator``; with ``generator=None`` the global torch RNG is used,
which ``torch.utils.data.DataLoader`` seeds differently in each worker (a shared ``torch.Generator`` would be
copied into every worker and repeat the same draws there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from vargpt.config import VARGPTConfig
from vargpt.data.records import (
    IMAGE_GEN_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    DPORecord,
    Message,
    RecordError,
    SFTRecord,
    split_placeholders,
)
from vargpt.models.vae.schedules import get_schedule, pixel_size, schedule_num_tokens
from vargpt.models.vargpt import IGNORE_INDEX, schedule_for_latent
from vargpt.processing.image import from_pil
from vargpt.processing.processor import Processor

__all__ = [
    "CropMode",
    "EncodedRow",
    "SFTCollator",
    "DPOCollator",
    "load_image",
    "resize_for_crop",
    "crop_offsets",
    "generation_target",
    "pad_rows",
]

CropMode = Literal["random", "center"]


# ------------------------------------------------------------------------------------------ image transforms
def load_image(path: Path, source: str = "<record>", field: str = "images") -> Image.Image:
    """An RGB PIL image; a missing or unreadable file raises ``RecordError`` naming the record and field."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise RecordError(source, field, f"image file not found: {path}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... for broken files
        raise RecordError(source, field, f"unreadable image {path} ({type(e).__name__}: {e})") from None


def resize_for_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side -> round(1.125 * size) with Lanczos, aspect kept (longer side truncated, as torchvision)."""
    mid = round(1.125 * size)
    w, h = image.size
    if w <= h:
        new_w, new_h = mid, int(mid * h / w)
    else:
        new_w, new_h = int(mid * w / h), mid
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.Resampling.LANCZOS)


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform in [0, high) from ``generator`` (global RNG when None)."""
    return int(torch.randint(0, high, (1,), generator=generator))


def crop_offsets(height: int, width: int, size: int, crop: CropMode,
                 generator: torch.Generator | None = None) -> tuple[int, int]:
    """(top, left) of an S x S window: torchvision ``RandomCrop`` (top drawn first) or ``CenterCrop`` offsets."""
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from a {width}x{height} image")
    if crop == "center":
        return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    top = _randint(height - size + 1, generator)
    left = _randint(width - size + 1, generator)
    return top, left


def generation_target(image: Image.Image, size: int, offset: tuple[int, int]) -> torch.Tensor:
    """(3, S, S) float in [-1, 1]: the S x S window at ``offset`` (top, left) of an already resized image."""
    top, left = offset
    return from_pil([image.crop((left, top, left + size, top + size))])[0]


def _shared_offsets(sizes: Sequence[tuple[int, int]], size: int, crop: CropMode,
                    generator: torch.Generator | None) -> list[tuple[int, int]]:
    """One crop window for several resized images (w, h): drawn for the first, reused by every image of the same
    size and placed at the same relative position in an image of another size."""
    w0, h0 = sizes[0]
    top, left = crop_offsets(h0, w0, size, crop, generator)
    out = []
    for w, h in sizes:
        if (w, h) == (w0, h0):
            out.append((top, left))
            continue
        ft = top / (h0 - size) if h0 > size else 0.5
        fl = left / (w0 - size) if w0 > size else 0.5
        out.append((round(ft * (h - size)), round(fl * (w - size))))
    return out


# --------------------------------------------------------------------------------------------------- encoding
@dataclass
class EncodedRow:
    """One sequence before padding.

    input_ids / labels: (T,) with every placeholder expanded; pixel_values (n_patches, patch_dim) and
    image_grid_thw (n_images, 3) of the understanding images (None without any); gen_targets: (3, S, S) each.
    """

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    gen_targets: list[torch.Tensor] = field(default_factory=list)


class _RowEncoder:
    """Conversation + images -> ``EncodedRow`` (template, labels, placeholder expansion). Shared by both collators."""

    def __init__(self, config: VARGPTConfig, processor: Processor, image_size: int | None, crop: CropMode,
                 generator: torch.Generator | None) -> None:
        if processor.config.special_tokens != config.special_tokens:
            raise ValueError("the processor was built for other special-token ids than the config; build "
                             "Processor(config, tokenizer) with the same config")
        if crop not in ("random", "center"):
            raise ValueError(f"crop={crop!r}: expected 'random' or 'center'")
        ds = config.vae.downsample
        if image_size is None:
            image_size = pixel_size(get_schedule(1.0, config.gen_schedule), ds)[0]
        if image_size <= 0 or image_size % ds:
            raise ValueError(f"image_size={image_size}: expected a positive multiple of the VAE stride {ds}")
        schedule, _ = schedule_for_latent(image_size // ds, image_size // ds)
        self.config, self.processor, self.crop, self.generator = config, processor, crop, generator
        self.image_size = image_size
        self.num_gen_tokens = schedule_num_tokens(schedule)  # L
        m = config.gen_pad_multiple
        self.gen_slots = math.ceil(self.num_gen_tokens / m) * m  # P, = VARGPT.gen_slots(L)

    # -- images
    def load_targets(self, paths: Sequence[Path], fields: Sequence[str], source: str) -> list[Image.Image]:
        return [resize_for_crop(load_image(p, source, f), self.image_size) for p, f in zip(paths, fields, strict=True)]

    # -- tokens
    def _chat(self, messages: Sequence[Message], images: list[Image.Image], source: str) -> list[dict]:
        """Messages for ``Processor.render``: user ``<image>`` -> image items, assistant ``<image_gen>`` ->
        image_gen items (one ``<|image_gen_pad|>``, expanded later)."""
        chat, k = [], 0
        for i, m in enumerate(messages):
            items = []
            for piece in split_placeholders(m.content):
                if piece == IMAGE_PLACEHOLDER and m.role == "user" and k < len(images):
                    items.append({"type": "image", "image": images[k]})
                    k += 1
                elif piece == IMAGE_GEN_PLACEHOLDER and m.role == "assistant":
                    items.append({"type": "image_gen"})
                elif piece in (IMAGE_PLACEHOLDER, IMAGE_GEN_PLACEHOLDER):
                    raise RecordError(source, f"messages[{i}].content", f"unexpected {piece} in a {m.role} turn "
                                      f"({len(images)} understanding image(s) given)")
                else:
                    items.append({"type": "text", "text": piece})
            # system prompts stay plain strings (chat templates do not all accept item lists there)
            chat.append({"role": m.role, "content": m.content if m.role == "system" else items})
        return chat

    def _ids(self, chat: list[dict], add_generation_prompt: bool) -> list[int]:
        p = self.processor
        return p.encode_text(p.render(chat, add_generation_prompt=add_generation_prompt))

    def encode(self, messages: Sequence[Message], images: Sequence[Image.Image], targets: Sequence[torch.Tensor],
               source: str) -> EncodedRow:
        """Token ids and labels of a conversation whose understanding images are ``images`` (PIL, in order) and
        whose generated images are ``targets`` ((3, S, S) each, in order)."""
        st = self.config.special_tokens
        chat = self._chat(messages, list(images), source)
        ids = self._ids(chat, False)
        labels = [IGNORE_INDEX] * len(ids)
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            # the answer's tokens = render(turns <= i) minus render(turns < i + generation prompt)
            before = self._ids(chat[:i], True)
            upto = self._ids(chat[: i + 1], False)
            if upto[: len(before)] != before or ids[: len(upto)] != upto:
                raise ValueError(f"{source}: the chat template ({self.processor.template_source}) does not render "
                                 f"messages[{i}] as a continuation of the turns before it; labels cannot be placed")
            answer = upto[len(before):]
            if st.im_end not in answer:
                raise ValueError(f"{source}: the chat template ({self.processor.template_source}) does not end "
                                 f"the assistant turn messages[{i}] with <|im_end|>")
            end = len(before) + len(answer) - answer[::-1].index(st.im_end)
            labels[len(before):end] = ids[len(before):end]

        grid = pixel_values = None
        if images:
            out = self.processor.image_processor(images=list(images), return_tensors="pt")
            pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
        merge = self.config.vision.spatial_merge_size
        ids_T, labels_T, k_img, k_gen = [], [], 0, 0
        for t, lab in zip(ids, labels, strict=True):
            if t == st.image_pad:
                n = int(grid[k_img].prod()) // merge**2 if k_img < len(images) else 1
                k_img += 1
            elif t == st.image_gen_pad:
                n = self.gen_slots
                k_gen += 1
            else:
                ids_T.append(t)
                labels_T.append(lab)
                continue
            ids_T.extend([t] * n)
            labels_T.extend([IGNORE_INDEX] * n)
        if (k_img, k_gen) != (len(images), len(targets)):
            raise ValueError(f"{source}: the rendered conversation holds {k_img} <|image_pad|> and {k_gen} "
                             f"<|image_gen_pad|> placeholder(s) for {len(images)} understanding and "
                             f"{len(targets)} generated image(s)")
        return EncodedRow(ids_T, labels_T, pixel_values, grid, list(targets))


def pad_rows(rows: Sequence[EncodedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into forward kwargs: input_ids / attention_mask / labels (B, T) long, pixel_values
    (n_patches, patch_dim) + image_grid_thw (n_images, 3) and gen_pixel_values (N, 3, S, S), the last three only
    when some row has such images (row-major order)."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    B, T = len(rows), max(len(r.input_ids) for r in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[b, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(r.labels, dtype=torch.long)
        attention_mask[b, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    pv = [r.pixel_values for r in rows if r.pixel_values is not None]
    if pv:
        batch["pixel_values"] = torch.cat(pv)
        batch["image_grid_thw"] = torch.cat([r.image_grid_thw for r in rows if r.image_grid_thw is not None])
    targets = [t for r in rows for t in r.gen_targets]
    if targets:
        batch["gen_pixel_values"] = torch.stack(targets)
    return batch


def _fields(placeholders: Sequence[str], kind: str, offset: int = 0) -> list[str]:
    return [f"images[{offset + j}]" for j, p in enumerate(placeholders) if p == kind]


# -------------------------------------------------------------------------------------------------- collators
class SFTCollator:
    """SFT records (understanding, text-to-image, editing; mixed freely) -> ``VARGPT.forward`` kwargs.

    Args:
        config: the model config (special tokens, generation schedule, ``gen_pad_multiple``).
        processor: tokenizer + chat template + Qwen2-VL image processor for ``config``.
        image_size: side S of the generation targets; default the pixel size of ``config.gen_schedule`` at 1:1.
        crop: ``"random"`` (training) or ``"center"`` window of the S x S target.
        generator: source of crop offsets and prompt dropout (None: the global torch RNG).
        prompt_drop_rate: probability that a text-to-image record (``<image_gen>`` and no ``<image>``, a single
            user turn) is trained with an empty user turn, the condition the engine's ``null_prompt`` CFG mode
            feeds (empty user turn, same assistant text). A system turn, if any, is kept.
    """

    def __init__(self, config: VARGPTConfig, processor: Processor, *, image_size: int | None = None,
                 crop: CropMode = "random", generator: torch.Generator | None = None,
                 prompt_drop_rate: float = 0.0) -> None:
        if not 0.0 <= prompt_drop_rate <= 1.0:
            raise ValueError(f"prompt_drop_rate={prompt_drop_rate}: expected a probability in [0, 1]")
        self.encoder = _RowEncoder(config, processor, image_size, crop, generator)
        self.config, self.processor, self.generator = config, processor, generator
        self.prompt_drop_rate = prompt_drop_rate

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    def _drop_prompt(self, record: SFTRecord) -> bool:
        if self.prompt_drop_rate == 0.0 or record.task != "generation":
            return False
        if sum(m.role == "user" for m in record.messages) != 1:
            return False
        return bool(torch.rand((), generator=self.generator) < self.prompt_drop_rate)

    def encode(self, record: SFTRecord) -> EncodedRow:
        """One record -> one row (draws prompt dropout, then one crop per generated image, in order)."""
        messages = record.messages
        if self._drop_prompt(record):
            messages = tuple(Message("user", "") if m.role == "user" else m for m in messages)
        ph = record.placeholders
        if len(ph) != len(record.images):
            raise RecordError(record.source, "images", f"{len(record.images)} image path(s) for {len(ph)} "
                                                       "placeholder(s)")
        und = [p for p, k in zip(record.images, ph, strict=True) if k == IMAGE_PLACEHOLDER]
        gen = [p for p, k in zip(record.images, ph, strict=True) if k == IMAGE_GEN_PLACEHOLDER]
        images = [load_image(p, record.source, f) for p, f in zip(und, _fields(ph, IMAGE_PLACEHOLDER), strict=True)]
        enc = self.encoder
        targets = []
        for img in enc.load_targets(gen, _fields(ph, IMAGE_GEN_PLACEHOLDER), record.source):
            w, h = img.size
            targets.append(generation_target(img, enc.image_size, crop_offsets(h, w, enc.image_size, enc.crop,
                                                                               self.generator)))
        return enc.encode(messages, images, targets, record.source)

    def __call__(self, records: Sequence[SFTRecord]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, labels (B, T); pixel_values, image_grid_thw and gen_pixel_values
        (N, 3, S, S) when the batch has such images."""
        return pad_rows([self.encode(r) for r in records], self.config.special_tokens.endoftext)


class DPOCollator:
    """DPO pairs -> ``VARGPT.forward`` kwargs + ``num_pairs``: rows = all chosen sequences, then all rejected ones
    (same order); ``gen_pixel_values`` likewise. A pair's two targets are cropped with one window (SPEC.md D5).

    Args: as ``SFTCollator`` (no prompt dropout).
    """

    def __init__(self, config: VARGPTConfig, processor: Processor, *, image_size: int | None = None,
                 crop: CropMode = "random", generator: torch.Generator | None = None) -> None:
        self.encoder = _RowEncoder(config, processor, image_size, crop, generator)
        self.config, self.processor, self.generator = config, processor, generator

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    def encode_pair(self, record: DPORecord) -> tuple[EncodedRow, EncodedRow]:
        """(chosen row, rejected row) of one record."""
        enc = self.encoder
        n = len(record.prompt_images)
        n_ph = sum(m.content.count(IMAGE_PLACEHOLDER) for m in record.prompt)
        if n_ph != n:
            raise RecordError(record.source, "images", f"{n} prompt image(s) for {n_ph} {IMAGE_PLACEHOLDER} "
                                                       "placeholder(s)")
        images = [load_image(p, record.source, f"images[{j}]") for j, p in enumerate(record.prompt_images)]
        pair = enc.load_targets([record.chosen_image, record.rejected_image], [f"images[{n}]", f"images[{n + 1}]"],
                                record.source)
        offsets = _shared_offsets([im.size for im in pair], enc.image_size, enc.crop, self.generator)
        rows = []
        for side, img, off in zip(("chosen", "rejected"), pair, offsets, strict=True):
            messages = record.prompt + (Message("assistant", getattr(record, side)),)
            rows.append(enc.encode(messages, images, [generation_target(img, enc.image_size, off)], record.source))
        return rows[0], rows[1]

    def __call__(self, records: Sequence[DPORecord]) -> dict[str, torch.Tensor | int]:
        pairs = [self.encode_pair(r) for r in records]
        batch = pad_rows([c for c, _ in pairs] + [r for _, r in pairs], self.config.special_tokens.endoftext)
        batch["num_pairs"] = len(pairs)
        return batch
