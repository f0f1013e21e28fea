"""One visual-decoder block: AdaLN self-attention, cross-attention, AdaLN FFN (SPEC.md §2.7; Infinity
``CrossAttnBlock`` on its fused-norm branch, the one the official setup runs).

    gamma1, gamma2, scale1, scale2, shift1, shift2 = (ada_gss + gss_B16C).unbind(2)      # fp32
    x = x + drop_path(gamma1 * SA(LN(x) * (1 + scale1) + shift1))
    x = x + CA(ca_norm(x), memory)                                                        # no gate, no drop-path
    x = x + drop_path(gamma2 * FFN(LN(x) * (1 + scale2) + shift2))

``LN`` is an affine-free LayerNorm computed in fp32 (then cast back); ``ca_norm`` is an affine LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.config import DecoderConfig
from vargpt.models.decoder.attention import CrossAttention, SelfAttention
from vargpt.models.decoder.kv_cache import DecoderKVCache

__all__ = ["DecoderBlock", "FFN", "ada_layer_norm", "drop_path"]


def ada_layer_norm(x_BLC: torch.Tensor, scale_B1C: torch.Tensor, shift_B1C: torch.Tensor, eps: float) -> torch.Tensor:
    """Affine-free LayerNorm in fp32, modulated: ``LN(x) * (1 + scale) + shift``, returned in ``x``'s dtype."""
    y = F.layer_norm(x_BLC.float(), (x_BLC.shape[-1],), eps=eps)
    return (y * (1 + scale_B1C.float()) + shift_B1C.float()).to(x_BLC.dtype)


def drop_path(x_BLC: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: per sample, zero the branch with probability ``rate`` and rescale the kept ones by
    1 / (1 - rate). Identity unless ``training`` and ``rate > 0``. Draws from the *global* torch RNG
    (``torch.rand`` on ``x``'s device), so ``torch.manual_seed`` makes it reproducible."""
    if not training or rate <= 0.0:
        return x_BLC
    keep = 1.0 - rate
    mask_B11 = (torch.rand(x_BLC.shape[0], 1, 1, device=x_BLC.device) < keep).to(x_BLC.dtype)
    return x_BLC * mask_B11 / keep


class FFN(nn.Module):
    """Linear -> GELU (tanh approximation) -> Linear, with biases."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.ffn_hidden)
        self.fc2 = nn.Linear(cfg.ffn_hidden, cfg.width)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_BLC), approximate="tanh"))


class DecoderBlock(nn.Module):
    """One block. ``drop_path_rate`` is this block's stochastic-depth rate (the decoder spaces them linearly)."""

    def __init__(self, cfg: DecoderConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        C = cfg.width
        self.eps = cfg.norm_eps
        self.drop_path_rate = drop_path_rate
        # per-block offset of the shared AdaLN output (Infinity init: randn / sqrt(C))
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        self.sa = SelfAttention(cfg)
        self.ca = CrossAttention(cfg)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.ffn = FFN(cfg)

    def forward(self, x_BLC: torch.Tensor, gss_B16C: torch.Tensor, memory_BMCm: torch.Tensor,
                memory_bias_B11M: torch.Tensor, cos_sin_2LF: torch.Tensor, attn_bias: torch.Tensor | None = None,
                cache: DecoderKVCache | None = None, block_index: int = 0) -> torch.Tensor:
        """
        Args:
            x_BLC: (B, L, C) tokens.
            gss_B16C: (B, 1, 6, C) shared AdaLN output ``VisualDecoder.gss(cond_BD)``.
            memory_BMCm, memory_bias_B11M: cross-attention memory (B, M, Cm) and its additive mask (B, 1, 1, M).
            cos_sin_2LF: (2, L, Dh/2) RoPE-2D rows of the L tokens.
            attn_bias: self-attention additive mask (training path), or None with ``cache`` (inference path).
            cache, block_index: explicit KV cache and this block's slot in it.
        Returns:
            (B, L, C)
        """
        gains = (self.ada_gss.float() + gss_B16C.float()).unbind(2)  # 6 x (B, 1, C), fp32
        gamma1, gamma2, scale1, scale2, shift1, shift2 = gains
        training = self.training
        h = self.sa(ada_layer_norm(x_BLC, scale1, shift1, self.eps), cos_sin_2LF, attn_bias, cache, block_index)
        x_BLC = x_BLC + drop_path(h * gamma1, self.drop_path_rate, training).to(x_BLC.dtype)
        x_BLC = x_BLC + self.ca(self.ca_norm(x_BLC), memory_BMCm, memory_bias_B11M, cache,
                                block_index).to(x_BLC.dtype)
        h = self.ffn(ada_layer_norm(x_BLC, scale2, shift2, self.eps))
        x_BLC = x_BLC + drop_path(h * gamma2, self.drop_path_rate, training).to(x_BLC.dtype)
        return x_BLC
