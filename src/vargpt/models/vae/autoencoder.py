"""The BSQ-VAE convolutional auto-encoder (SPEC.md §2.8): a Flux-VQGAN style encoder and decoder, no attention.

The quantiser is not part of this module: it has no parameters and lives in ``quantizer.py`` as pure functions.
``BSQVAE.encode`` returns the raw, unquantised latent ``f`` (what VARGPT's training path and the multi-scale
quantiser consume, SPEC.md §1.3 step 2); ``BSQVAE.decode`` maps (summed) BSQ codes back to pixels.

Shapes (full-size model: ch = 128, multipliers [1, 2, 4, 4, 4], d = 32)::

    encode: img (B, 3, H, W) in [-1, 1] -> conv_in -> 5 levels (4 stride-2 downsamples) -> mid -> f (B, d, H/16, W/16)
    decode: codes (B, d, h, w) -> conv_in -> mid -> 5 levels (4 nearest x2 upsamples) -> img (B, 3, 16h, 16w), clamped

State-dict keys are the official ``vae_local.*`` keys with the prefix and the official ``Conv``/``Normalize``
wrapper segment (``.conv.`` / ``.norm.`` right before ``weight``/``bias``) removed, e.g. official
``vae_local.encoder.down.0.downsample.conv.conv.weight`` is our ``encoder.down.0.downsample.conv.weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vargpt.config import VAEConfig

__all__ = ["BSQVAE", "VAEEncoder", "VAEDecoder", "ResBlock"]


def _group_norm(channels: int, eps: float) -> nn.GroupNorm:
    # Official Normalize(): 32 groups, falling back to 24 for widths that are not a multiple of 32 (tiny models).
    return nn.GroupNorm(32 if channels % 32 == 0 else 24, channels, eps=eps, affine=True)


def _swish(x: Tensor) -> Tensor:
    # Written out rather than F.silu: the fused kernel rounds differently (~1e-6 on the latent); this form
    # reproduces the official encoder output exactly, which keeps near-zero latents on the official side of 0.
    return x * torch.sigmoid(x)


def _conv3x3(c_in: int, c_out: int, padding_mode: str, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=padding, padding_mode=padding_mode)


class ResBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, c_in: int, c_out: int, eps: float, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.norm1 = _group_norm(c_in, eps)
        self.conv1 = _conv3x3(c_in, c_out, padding_mode)
        self.norm2 = _group_norm(c_out, eps)
        self.conv2 = _conv3x3(c_out, c_out, padding_mode)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else None

    def forward(self, x_BCHW: Tensor) -> Tensor:
        h = self.conv1(_swish(self.norm1(x_BCHW)))
        h = self.conv2(_swish(self.norm2(h)))
        skip = x_BCHW if self.nin_shortcut is None else self.nin_shortcut(x_BCHW)
        return skip + h


class Downsample(nn.Module):
    """Pad right and bottom by one (zeros, or a copy of the edge), then a stride-2 3x3 conv without padding:
    (H, W) -> (H/2, W/2)."""

    def __init__(self, channels: int, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.conv = _conv3x3(channels, channels, padding_mode, stride=2, padding=0)
        self.pad_mode = "constant" if padding_mode == "zeros" else padding_mode

    def forward(self, x_BCHW: Tensor) -> Tensor:
        # Asymmetric padding (as in the official/Flux code), not conv padding=1: it changes which pixels each output
        # sees, so it matters for parity.
        return self.conv(F.pad(x_BCHW, (0, 1, 0, 1), mode=self.pad_mode))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv: (h, w) -> (2h, 2w)."""

    def __init__(self, channels: int, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.conv = _conv3x3(channels, channels, padding_mode)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.conv(F.interpolate(x_BCHW, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, eps: float, padding_mode: str) -> None:
        super().__init__()
        self.block_1 = ResBlock(channels, channels, eps, padding_mode)
        self.block_2 = ResBlock(channels, channels, eps, padding_mode)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.block_2(self.block_1(x_BCHW))


class _Level(nn.Module):
    """One resolution level: ``block`` (ModuleList of ResBlocks) and an optional ``downsample``/``upsample``."""

    def __init__(self, blocks: list[ResBlock], resample: nn.Module | None, resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    @property
    def resample(self) -> nn.Module | None:
        return getattr(self, self.resample_name, None)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        for blk in self.block:
            x_BCHW = blk(x_BCHW)
        resample = self.resample
        return x_BCHW if resample is None else resample(x_BCHW)


class VAEEncoder(nn.Module):
    """img (B, in_channels, H, W) -> raw latent f (B, d, H / 2^(levels-1), W / 2^(levels-1))."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, mult, eps, pad = cfg.base_channels, cfg.encoder_ch_mult, cfg.norm_eps, cfg.padding_mode
        self.conv_in = _conv3x3(cfg.in_channels, ch, pad)
        in_mult = (1, *mult)
        levels = []
        for i, m in enumerate(mult):
            block_in, block_out = ch * in_mult[i], ch * m
            # the first block of a level changes the width, the others keep it
            blocks = [ResBlock(block_in if j == 0 else block_out, block_out, eps, pad)
                      for j in range(cfg.num_res_blocks)]
            down = Downsample(block_out, pad) if i < len(mult) - 1 else None
            levels.append(_Level(blocks, down, "downsample"))
        self.down = nn.ModuleList(levels)
        c_top = ch * mult[-1]
        self.mid = _Mid(c_top, eps, pad)
        self.norm_out = _group_norm(c_top, eps)
        self.conv_out = _conv3x3(c_top, cfg.codebook_dim, pad)

    def forward(self, img_B3HW: Tensor) -> Tensor:
        h = self.conv_in(img_B3HW)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VAEDecoder(nn.Module):
    """codes (B, d, h, w) -> img (B, 3, h * 2^(levels-1), w * 2^(levels-1)), not clamped."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, mult, eps, pad = cfg.base_channels, cfg.decoder_ch_mult, cfg.norm_eps, cfg.padding_mode
        block_in = ch * mult[-1]
        self.conv_in = _conv3x3(cfg.codebook_dim, block_in, pad)
        self.mid = _Mid(block_in, eps, pad)
        # Built from the top level down (the order the data flows), stored by level index so that key
        # ``up.{i}`` is level i, as in the official checkpoint.
        levels: list[_Level] = []
        for i in reversed(range(len(mult))):
            block_out = ch * mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):  # the decoder has one more block per level than the encoder
                blocks.append(ResBlock(block_in, block_out, eps, pad))
                block_in = block_out
            up = Upsample(block_in, pad) if i != 0 else None
            levels.insert(0, _Level(blocks, up, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in, eps)
        self.conv_out = _conv3x3(block_in, 3, pad)

    def forward(self, codes_BdHW: Tensor) -> Tensor:
        h = self.mid(self.conv_in(codes_BdHW))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))


class BSQVAE(nn.Module):
    """The frozen BSQ-VAE of VARGPT-v1.1 (encoder + decoder; the quantiser is in ``quantizer.py``).

    Here ``H, W`` in ``f_BdHW`` / ``codes_BdHW`` denote the full latent grid (= the last scale of a schedule), and
    ``img_B3HW`` is in pixels (16x larger for the 5-level model).
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VAEEncoder(cfg)
        self.decoder = VAEDecoder(cfg)

    @torch.no_grad()
    def encode(self, img_B3HW: Tensor) -> Tensor:
        """Raw (unquantised) latent of images.

        Args:
            img_B3HW: (B, 3, H, W) float in [-1, 1], H and W multiples of ``cfg.downsample``.

        Returns:
            f_BdHW: (B, d, H / ds, W / ds) float32.

        Always computed in float32 with autocast off, whatever the dtype of the weights or the input (the
        official code runs the VAE encoder in fp32; bf16 would flip bits of near-zero latents).
        """
        x = img_B3HW.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            if all(t.dtype == torch.float32 for t in self.encoder.parameters()):
                return self.encoder(x)
            # Weights kept in another dtype (e.g. a bf16 checkpoint): run on fp32 copies without touching the module.
            fp32 = {k: v.float() for k, v in self.encoder.state_dict().items()}
            return torch.func.functional_call(self.encoder, fp32, (x,))

    @torch.no_grad()
    def decode(self, codes_BdHW: Tensor) -> Tensor:
        """Images from summed BSQ codes.

        Args:
            codes_BdHW: (B, d, h, w) float, e.g. the sum over scales of upsampled codes (``decode_bits``).

        Returns:
            img_B3HW: (B, 3, h * ds, w * ds) clamped to [-1, 1], in the dtype of the decoder weights.
        """
        dtype = self.decoder.conv_in.weight.dtype
        # channels-last activations: the decoder's narrow convolutions at full resolution run about 1.6x faster
        # (oneDNN) than in NCHW on CPU; the result is returned in the standard layout
        x = codes_BdHW.to(dtype).contiguous(memory_format=torch.channels_last)
        return self.decoder(x).clamp(-1.0, 1.0).contiguous()
