"""Typed configuration of the unified VARGPT-v1.1 model, and the presets.

One dataclass per component, composed into :class:`VARGPTConfig` (SPEC.md §2). Configs are plain data:
they serialise to and from ``config.json`` (``to_dict`` / ``from_dict`` / ``save`` / ``load``) and are the
only source used to rebuild a model. Derived sizes are properties, validation runs in ``__post_init__``.

Presets (``PRESETS``):

* ``tiny``        -- a few-hundred-kilobyte model for tests and CI (every code path, seconds on a CPU).
* ``shapes``      -- the shipped default model's size (SHAPES.md world: 64 x 64 images, a 384-token vocabulary:
  characters + BPE merges; 12.3 M parameters, trains on a 2-core CPU).
* ``base-100m``   -- about 100 M parameters (LLM 512 wide x 12 layers, decoder 512 x 10, 256 px): benchmarks.
* ``vargpt-v1.1`` -- the exact official 7B LLM + 2B visual decoder sizes (SPEC.md §2.1, §2.2, §2.7, §2.8).

Official-behaviour switches (SPEC.md §6, DESIGN.md "Compatibility and corrections") are named fields of
:class:`VARGPTConfig`; each documents the official value and our default.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "VisionConfig",
    "TextConfig",
    "SpecialTokens",
    "VAEConfig",
    "DecoderConfig",
    "VARGPTConfig",
    "PRESETS",
    "get_preset",
    "ConfigError",
]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what was expected."""


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


@dataclass(kw_only=True)
class VisionConfig:
    """Qwen2-VL vision transformer + 2x2 patch merger (SPEC.md §2.2). Output width = the LLM width."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: int = 4
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        _require(self.embed_dim % self.num_heads == 0, "VisionConfig.embed_dim",
                 f"{self.embed_dim} must be divisible by num_heads={self.num_heads}")
        _require((self.embed_dim // self.num_heads) % 4 == 0, "VisionConfig.embed_dim",
                 "head dim must be a multiple of 4 (2-D rotary over rows and columns)")


@dataclass(kw_only=True)
class TextConfig:
    """Qwen2 LLM with M-RoPE (SPEC.md §2.1)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self) -> None:
        _require(self.hidden_size % self.num_heads == 0, "TextConfig.hidden_size",
                 f"{self.hidden_size} must be divisible by num_heads={self.num_heads}")
        _require(self.num_heads % self.num_kv_heads == 0, "TextConfig.num_kv_heads",
                 f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        _require(len(self.mrope_section) == 3 and sum(self.mrope_section) * 2 == self.head_dim,
                 "TextConfig.mrope_section",
                 f"expected 3 sections summing to head_dim/2={self.head_dim // 2}, got {self.mrope_section}")


@dataclass(kw_only=True)
class SpecialTokens:
    """Ids of the special tokens (SPEC.md §2.3). Qwen2-VL's relative layout from a base id R.

    ``from_base(R)`` gives the official ids for R = 151643.
    """

    endoftext: int  # bos = pad
    im_start: int
    im_end: int  # eos
    vision_start: int
    vision_end: int
    vision_pad: int
    image_pad: int
    video_pad: int
    image_gen_start: int
    image_gen_end: int
    image_gen_pad: int

    @classmethod
    def from_base(cls, base: int) -> SpecialTokens:
        return cls(endoftext=base, im_start=base + 1, im_end=base + 2, vision_start=base + 9,
                   vision_end=base + 10, vision_pad=base + 11, image_pad=base + 12, video_pad=base + 13,
                   image_gen_start=base + 14, image_gen_end=base + 15, image_gen_pad=base + 16)

    def __post_init__(self) -> None:
        ids = dataclasses.asdict(self)
        _require(len(set(ids.values())) == len(ids), "SpecialTokens", f"ids must be distinct, got {ids}")


@dataclass(kw_only=True)
class VAEConfig:
    """BSQ multi-scale VAE (SPEC.md §2.8). Encoder has ``num_res_blocks`` per level, decoder one more."""

    codebook_dim: int = 32  # d: bits per visual token = latent channels
    base_channels: int = 128
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4, 4])
    num_res_blocks: int = 2
    in_channels: int = 3
    norm_eps: float = 1e-6
    #: Padding of every convolution and of the downsampling pad: "zeros" (the official model) or "replicate". With
    #: zeros every latent position of a small image sees the canvas border, so a plain background encodes to a
    #: different latent at every position (EVAL.md, Shapes); with "replicate" a constant image encodes to one
    #: constant latent and a constant code decodes to a constant image. It changes no weight shape.
    padding_mode: str = "zeros"

    @property
    def downsample(self) -> int:
        """Pixel stride of one latent cell (16 for 5 levels)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def __post_init__(self) -> None:
        _require(len(self.encoder_ch_mult) == len(self.decoder_ch_mult), "VAEConfig.decoder_ch_mult",
                 "encoder and decoder must have the same number of levels")
        for m in (*self.encoder_ch_mult, *self.decoder_ch_mult):
            c = m * self.base_channels
            _require(c % 32 == 0 or c % 24 == 0, "VAEConfig.base_channels",
                     f"every level width must be a multiple of 32 or 24 (GroupNorm groups), got {c}")
        _require(self.codebook_dim >= 1, "VAEConfig.codebook_dim", "must be >= 1")
        _require(self.padding_mode in ("zeros", "replicate"), "VAEConfig.padding_mode",
                 f"expected 'zeros' or 'replicate', got {self.padding_mode!r}")


@dataclass(kw_only=True)
class DecoderConfig:
    """Infinity-style next-scale visual decoder (SPEC.md §2.7)."""

    width: int = 2048  # C
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    memory_dim: int = 2048  # width of the start embedding, cfg_uncond rows and cross-attention memory
    num_levels: int = 15  # rows of the level embedding
    uncond_rows: int = 512  # rows of cfg_uncond (Infinity's text_maxlen)
    pool_head_dim: int = 128  # head dim of the start-embedding attentive pool (official: 128 unless width > 4096)
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.1
    cond_drop_rate: float = 0.1  # probability of replacing the start embedding by cfg_uncond[0] in training
    rope_base: float = 10000.0
    rope_grid_size: int = 128  # rows/cols of the precomputed 2-D RoPE grid (2048 px / 16)
    max_scale_mul: float = math.log(100.0)
    # the decoder's attention (``vargpt.models.decoder.attention.attend``): "sdpa" (fused kernels) or "eager"
    # (matmuls and a float32 softmax: faster to train on a small CPU model, e.g. the ``shapes`` preset)
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        """round(C * mlp_ratio / 256) * 256, as Infinity sizes its FFN."""
        return round(self.width * self.mlp_ratio / 256) * 256

    @property
    def pool_num_heads(self) -> int:
        return self.memory_dim // self.pool_head_dim

    def __post_init__(self) -> None:
        _require(self.width % self.num_heads == 0, "DecoderConfig.width",
                 f"{self.width} must be divisible by num_heads={self.num_heads}")
        _require(self.head_dim % 4 == 0, "DecoderConfig.num_heads", "head dim must be a multiple of 4 (RoPE-2D)")
        # the official pool uses memory_dim // pool_head_dim heads (floor) of width // heads channels each
        _require(self.memory_dim >= self.pool_head_dim, "DecoderConfig.memory_dim",
                 f"must be >= pool_head_dim={self.pool_head_dim}, got {self.memory_dim}")
        _require(self.ffn_hidden > 0, "DecoderConfig.mlp_ratio", "FFN width rounds to 0")
        _require(self.attn_implementation in ("sdpa", "eager"), "DecoderConfig.attn_implementation",
                 f"expected 'sdpa' or 'eager', got {self.attn_implementation!r}")


@dataclass(kw_only=True)
class VARGPTConfig:
    """The whole model: Qwen2-VL backbone + visual decoder + BSQ VAE + the two generation projectors.

    Official-behaviour switches (both behaviours implemented and tested):

    * ``text_loss_targets``: ``"labels"`` (default; the dataset labels, prompt and padding masked) or
      ``"input_ids"`` (official ``get_gen_loss_1_1``: every input id except ``<|image_gen_pad|>`` is a target
      whenever the batch holds a generation image; SPEC.md §2.10, D2).
    * ``gen_pad_multiple``: number of ``<|image_gen_pad|>`` slots is L rounded up to this multiple
      (official 128, D7; default 1 = no dummy slots).
    * ``train_positions``: ``"mrope"`` (default; M-RoPE ids exactly as at inference) or ``"1d"``
      (official training: positions 0..T-1 on all three axes, D3).
    * ``bit_loss_weighting``: ``"mean"`` (default and official effective behaviour: plain mean over all bits of
      all scales, D1) or ``"scale"`` (Infinity's intended weighting: per-token mean over bits, token weight
      proportional to sqrt(area of the last scale / area of its scale), normalised per sequence).

    Training choice (not an official switch): ``text_loss_reduction`` ``"token"`` (default, as the official code
    and Hugging Face models: the mean over every text target of the batch) or ``"sample"`` (each row's mean over
    its targets, then the mean over the rows that have any: a one-word answer weighs as much as a long caption).
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    special_tokens: SpecialTokens = field(default_factory=lambda: SpecialTokens.from_base(151643))
    gen_schedule: str = "0.25M"  # scale schedule for generation: "0.06M" | "0.25M" | "0.60M" | "1M" | "first-N"
    gen_aspect_ratio: float = 1.0  # h / w of training targets and the default generation aspect
    bit_loss_weight: float = 3.0  # lambda in L = CE_text + lambda * CE_bits
    bsc_max_strength: float = 0.3  # bitwise self-correction in training: flip rate drawn from {0, .01, ..., this}
    text_loss_targets: Literal["labels", "input_ids"] = "labels"
    gen_pad_multiple: int = 1
    train_positions: Literal["mrope", "1d"] = "mrope"
    bit_loss_weighting: Literal["mean", "scale"] = "mean"
    text_loss_reduction: Literal["token", "sample"] = "token"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    def __post_init__(self) -> None:
        from vargpt.models.vae.schedules import parse_schedule_name  # local: schedules is pure data

        _require(self.decoder.memory_dim == self.decoder.width, "VARGPTConfig.decoder.memory_dim",
                 f"must equal decoder.width={self.decoder.width}: GenProjOut feeds both the decoder tokens and its "
                 f"cross-attention memory (got {self.decoder.memory_dim})")
        parse_schedule_name(self.gen_schedule)  # raises ConfigError on a bad name
        _require(self.text_loss_targets in ("labels", "input_ids"), "VARGPTConfig.text_loss_targets",
                 f"expected 'labels' or 'input_ids', got {self.text_loss_targets!r}")
        _require(self.train_positions in ("mrope", "1d"), "VARGPTConfig.train_positions",
                 f"expected 'mrope' or '1d', got {self.train_positions!r}")
        _require(self.bit_loss_weighting in ("mean", "scale"), "VARGPTConfig.bit_loss_weighting",
                 f"expected 'mean' or 'scale', got {self.bit_loss_weighting!r}")
        _require(self.text_loss_reduction in ("token", "sample"), "VARGPTConfig.text_loss_reduction",
                 f"expected 'token' or 'sample', got {self.text_loss_reduction!r}")
        _require(0.0 <= self.bsc_max_strength < 0.5, "VARGPTConfig.bsc_max_strength",
                 f"expected a flip rate in [0, 0.5), got {self.bsc_max_strength}")
        _require(self.gen_aspect_ratio > 0, "VARGPTConfig.gen_aspect_ratio",
                 f"must be > 0, got {self.gen_aspect_ratio}")
        _require(self.gen_pad_multiple >= 1, "VARGPTConfig.gen_pad_multiple", "must be >= 1")
        _require(self.attn_implementation in ("sdpa", "eager"), "VARGPTConfig.attn_implementation",
                 f"expected 'sdpa' or 'eager', got {self.attn_implementation!r}")
        _require(self.special_tokens.image_gen_pad < self.text.vocab_size, "VARGPTConfig.special_tokens",
                 f"ids must be < text.vocab_size={self.text.vocab_size}")
        _require(self.decoder.num_levels >= 13, "VARGPTConfig.decoder.num_levels",
                 "must cover the 13 steps of the 1M schedule")

    # ----------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return {"format": "vargpt", "format_version": 1, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<dict>") -> VARGPTConfig:
        d = dict(d)
        if d.pop("format", "vargpt") != "vargpt":
            raise ConfigError(f"{source}: field 'format' must be 'vargpt'")
        version = d.pop("format_version", 1)
        if version != 1:
            raise ConfigError(f"{source}: format_version {version!r} is not supported (expected 1)")
        _check_types(cls, {k: v for k, v in d.items() if k not in ("vision", "text", "decoder", "vae",
                                                                    "special_tokens")}, source)
        subs = {"vision": VisionConfig, "text": TextConfig, "decoder": DecoderConfig, "vae": VAEConfig,
                "special_tokens": SpecialTokens}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {sorted(unknown)}; expected a subset of {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for k, v in d.items():
            if k in subs:
                sub = subs[k]
                if not isinstance(v, dict):
                    raise ConfigError(f"{source}: field '{k}' must be an object, got {type(v).__name__}")
                _check_types(sub, v, f"{source}: '{k}'")
                sub_known = {f.name for f in dataclasses.fields(sub)}
                bad = set(v) - sub_known
                if bad:
                    raise ConfigError(
                        f"{source}: unknown field(s) {sorted(bad)} in '{k}'; expected {sorted(sub_known)}")
                try:
                    kwargs[k] = sub(**v)
                except TypeError as e:
                    raise ConfigError(f"{source}: '{k}': {e}") from e
            else:
                kwargs[k] = v
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VARGPTConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
        return cls.from_dict(d, source=str(path))


def _check_types(cls, values: dict[str, Any], where: str) -> None:
    """Each value has the type of its field's default (an int is accepted for a float field)."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING and f.type in ("list[int]",):
            defaults[f.name] = []
        elif f.type == "int":
            defaults[f.name] = 0
    for k, v in values.items():
        if k not in defaults:
            continue
        want = type(defaults[k])
        ok = isinstance(v, want) and not (want is int and isinstance(v, bool))
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if want is list and ok:
            ok = all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        if not ok:
            raise ConfigError(f"{where}: field '{k}' expected {want.__name__}, got {v!r}")


def _tiny() -> VARGPTConfig:
    return VARGPTConfig(
        vision=VisionConfig(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4),
        text=TextConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, mrope_section=[2, 3, 3]),
        decoder=DecoderConfig(width=128, depth=2, num_heads=2, mlp_ratio=2.0, memory_dim=128),
        vae=VAEConfig(codebook_dim=16, base_channels=24, encoder_ch_mult=[1, 1, 1, 1, 2],
                      decoder_ch_mult=[1, 1, 1, 1, 2], num_res_blocks=1),
        special_tokens=SpecialTokens.from_base(240),
        gen_schedule="first-3",
    )


def _shapes() -> VARGPTConfig:
    # 64 x 64 Shapes images; a 4-level (8x) tokenizer: 8 x 8 latent grid, first-5 schedule (1, 2, 4, 6, 8) = 121
    # tokens of 32 bits (a 16x tokenizer's 4 x 4 grid could not keep the shapes apart, EVAL.md); 384 text ids: the 96
    # characters, the special tokens and BPE merges learned on the training texts (``bpe_tokenizer``; 216 in run 7);
    # zero padding in the tokenizer (replicate padding read back 0.60-0.69 of the scenes against 0.94, EVAL.md);
    # eager attention in the LLM and the decoder (a generation training step about 12 % shorter on this CPU than
    # with SDPA, ``benchmarks/train_step.py``; checkpoints up to run 16 were trained with SDPA)
    return VARGPTConfig(
        vision=VisionConfig(depth=2, embed_dim=128, num_heads=2, mlp_ratio=4),
        text=TextConfig(vocab_size=384, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                        num_kv_heads=2, mrope_section=[8, 12, 12]),
        decoder=DecoderConfig(width=256, depth=4, num_heads=2, mlp_ratio=4.0, memory_dim=256,
                              attn_implementation="eager"),
        vae=VAEConfig(codebook_dim=32, base_channels=32, encoder_ch_mult=[1, 1, 2, 4],
                      decoder_ch_mult=[1, 1, 2, 4], num_res_blocks=1),
        special_tokens=SpecialTokens.from_base(100),
        gen_schedule="first-5",
        attn_implementation="eager",
    )


def _shapes_small() -> VARGPTConfig:
    # the ``shapes`` preset at half the width of the LLM (128, 2 heads of 64, one KV head) and of the decoder (128, one
    # head of 128), the ViT and the tokenizer unchanged: an editing-SFT step of the default recipe 28 against 100
    # GFLOP and about 0.38x the time on this CPU (one measurement, random weights). An experiment toward a
    # 90-minute recipe (run 42, not run yet), not the shipped model's preset
    base = _shapes()
    return dataclasses.replace(
        base,
        text=dataclasses.replace(base.text, hidden_size=128, intermediate_size=384, num_heads=2, num_kv_heads=1),
        decoder=dataclasses.replace(base.decoder, width=128, num_heads=1, memory_dim=128),
    )


def _base_100m() -> VARGPTConfig:
    return VARGPTConfig(
        vision=VisionConfig(depth=4, embed_dim=256, num_heads=4, mlp_ratio=4),
        text=TextConfig(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_layers=12, num_heads=8,
                        num_kv_heads=4, mrope_section=[8, 12, 12]),
        decoder=DecoderConfig(width=512, depth=10, num_heads=4, mlp_ratio=4.0, memory_dim=512),
        vae=VAEConfig(codebook_dim=16, base_channels=32, encoder_ch_mult=[1, 1, 2, 2, 4],
                      decoder_ch_mult=[1, 1, 2, 2, 4], num_res_blocks=1),
        special_tokens=SpecialTokens.from_base(2030),
        gen_schedule="0.06M",
    )


def _vargpt_v1_1() -> VARGPTConfig:
    return VARGPTConfig()


PRESETS: dict[str, Any] = {"tiny": _tiny, "shapes": _shapes, "shapes-small": _shapes_small, "base-100m": _base_100m,
                           "vargpt-v1.1": _vargpt_v1_1}


def get_preset(name: str) -> VARGPTConfig:
    """A fresh config for the preset ``name`` (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()
