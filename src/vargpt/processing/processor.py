"""Conversations -> model inputs: tokenizer + chat template + Qwen2-VL image processor (SPEC.md §2.4, §2.5).

transformers' ``Qwen2VLProcessor`` cannot be built without torchvision (ENV-NOTES.md), so this is the project's
own small processor. A checkpoint directory may carry the tokenizer files, a chat template (in
``tokenizer_config.json``, ``chat_template.jinja`` or ``chat_template.json``) and ``preprocessor_config.json``
(``min_pixels`` / ``max_pixels``, ``image_mean`` / ``image_std``); ``Processor.from_dir`` uses them, offline.
Without a chat template the built-in Qwen2-VL format (``render_prompt``) is used and ``template_source`` says so.

Messages: ``{"role": "system" | "user" | "assistant", "content": str | list[item]}`` with items
``{"type": "text", "text": str}``, ``{"type": "image", "image": PIL.Image}`` (an understanding input) and, in
assistant turns, ``{"type": "image_gen", "bits": [per-scale (h*w, d) tensors], "schedule": ...}`` or
``{"type": "image_gen", "image": PIL.Image}`` (a generated image in the history; without bits it is re-encoded by
the VAE on the nearest schedule).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from vargpt.config import VARGPTConfig
from vargpt.processing.chat import expand_image_pads, image_processor, render_prompt

__all__ = ["EncodedPrompt", "HistoryImage", "Processor"]

GEN_PLACEHOLDER = "<|image_gen_start|><|image_gen_pad|><|image_gen_end|>"


@dataclass
class HistoryImage:
    """A generated image already in the conversation: its per-scale bits (1, h*w, d) or its pixels."""

    bits: list[torch.Tensor] | None = None
    schedule: tuple[tuple[int, int], ...] | None = None
    image: Image.Image | None = None


@dataclass
class EncodedPrompt:
    """Token ids of one prompt plus its images (understanding inputs and generated images in the history).

    ``input_ids`` has every ``<|image_pad|>`` already expanded; generated images in the history appear as
    ``<|image_gen_start|>`` + one ``<|image_gen_pad|>`` + ``<|image_gen_end|>`` and are expanded by the engine.
    """

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    history_images: list[HistoryImage] = field(default_factory=list)


class Processor:
    """Tokenizer + chat template + image processor for one model config."""

    def __init__(self, config: VARGPTConfig, tokenizer: PreTrainedTokenizerBase, *, min_pixels: int = 3136,
                 max_pixels: int = 1_003_520, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None, use_tokenizer_template: bool | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.image_processor = image_processor(config, min_pixels, max_pixels, image_mean, image_std)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_tokenizer_template = has_template if use_tokenizer_template is None else use_tokenizer_template
        self.template_source = "tokenizer chat_template" if self.use_tokenizer_template else "built-in Qwen2-VL"
        st = config.special_tokens
        for name in ("im_end", "image_gen_start", "image_gen_end", "image_gen_pad", "image_pad"):
            text = {"im_end": "<|im_end|>", "image_gen_start": "<|image_gen_start|>",
                    "image_gen_end": "<|image_gen_end|>", "image_gen_pad": "<|image_gen_pad|>",
                    "image_pad": "<|image_pad|>"}[name]
            got = tokenizer.convert_tokens_to_ids(text)
            if got != getattr(st, name):
                raise ValueError(f"tokenizer maps {text} to id {got}, the model config expects "
                                 f"{getattr(st, name)} (special_tokens.{name})")

    # ----- loading / saving -----

    @classmethod
    def from_dir(cls, path: str | Path, config: VARGPTConfig) -> Processor:
        """Tokenizer, chat template and preprocessor settings saved in ``path`` (offline)."""
        path = Path(path)
        if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
            raise FileNotFoundError(
                f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json). Save one there, or pass "
                "tokenizer=... to Engine.load (vargpt.processing.char_tokenizer suits small vocabularies)")
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        for key in ("local_files_only", "is_local"):  # how it was loaded, not what it is: kept out of a later save
            tok.init_kwargs.pop(key, None)
        kw = {}
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            try:
                data = json.loads(pre.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{pre}: line {e.lineno}: invalid JSON ({e.msg})") from e
            for key in ("min_pixels", "max_pixels"):
                if key in data:
                    kw[key] = int(data[key])
            for key in ("image_mean", "image_std"):
                if key in data:
                    val = data[key]
                    if not (isinstance(val, list) and len(val) == 3
                            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in val)):
                        raise ValueError(f"{pre}: field {key!r}: expected a list of 3 numbers (RGB), got {val!r}")
                    if key == "image_std" and min(val) <= 0:
                        raise ValueError(f"{pre}: field 'image_std': every value must be > 0, got {val!r}")
                    kw[key] = [float(x) for x in val]
        return cls(config, tok, **kw)

    def save(self, path: str | Path) -> None:
        """Write the tokenizer files and ``preprocessor_config.json`` (min/max pixels, normalisation) to ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        v = self.config.vision
        (path / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels, "patch_size": v.patch_size, "merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "image_mean": [float(x) for x in self.image_processor.image_mean],
            "image_std": [float(x) for x in self.image_processor.image_std]}, indent=1))

    # ----- encoding -----

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Chat string; understanding images as ``<|vision_start|><|image_pad|><|vision_end|>`` and generated
        images as ``<|image_gen_start|><|image_gen_pad|><|image_gen_end|>``."""
        norm = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r:.80}")
            content = m["content"]
            if isinstance(content, str):
                norm.append({"role": m["role"], "content": content})
                continue
            items = []
            for j, it in enumerate(content):
                kind = it.get("type") if isinstance(it, dict) else None
                if kind == "text":
                    items.append({"type": "text", "text": it["text"]})
                elif kind == "image":
                    items.append({"type": "image"})
                elif kind == "image_gen":
                    items.append({"type": "text", "text": GEN_PLACEHOLDER})
                else:
                    raise ValueError(f"messages[{i}].content[{j}]: expected type 'text', 'image' or 'image_gen', "
                                     f"got {kind!r}")
            norm.append({"role": m["role"], "content": items})
        if self.use_tokenizer_template:
            return self.tokenizer.apply_chat_template(norm, tokenize=False, add_generation_prompt=add_generation_prompt)
        return render_prompt(norm, add_generation_prompt=add_generation_prompt)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, messages: list[dict], *, add_generation_prompt: bool = True,
               assistant_prefix: str = "") -> EncodedPrompt:
        """Messages (+ an optional start of the assistant answer) -> ``EncodedPrompt``."""
        images: list[Image.Image] = []
        history: list[HistoryImage] = []
        for m in messages:
            if isinstance(m["content"], str):
                continue
            for it in m["content"]:
                if it.get("type") == "image":
                    img = it.get("image")
                    if not isinstance(img, Image.Image):
                        raise ValueError(f"image items need a PIL image under 'image', got {type(img).__name__}")
                    images.append(img)
                elif it.get("type") == "image_gen":
                    history.append(HistoryImage(bits=it.get("bits"), schedule=it.get("schedule"),
                                                image=it.get("image")))
        ids = self.encode_text(self.render(messages, add_generation_prompt) + assistant_prefix)
        pixel_values = grid = None
        if images:
            out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
            pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
            ids = expand_image_pads(ids, grid, self.config.special_tokens.image_pad,
                                    self.config.vision.spatial_merge_size)
        elif self.config.special_tokens.image_pad in ids:
            raise ValueError("the prompt holds <|image_pad|> tokens but no image was given")
        return EncodedPrompt(ids, pixel_values, grid, history)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)
