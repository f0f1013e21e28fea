"""Self- and cross-attention of the visual decoder blocks (SPEC.md §2.7; Infinity ``SelfAttention`` /
``CrossAttention`` in ``infinity/models/basic.py``).

Self-attention is *cosine* attention: per head, q and k are L2-normalised, q is multiplied by
``exp(min(s_h, max_scale_mul))`` with a learnable per-head ``s_h``, and the softmax scale is 1 (the temperature lives
in ``s_h``). RoPE-2D is applied after that normalisation. The qkv projection has no bias; a learnable q-bias and
v-bias are added (the k-bias is fixed at zero, so it is not a parameter here).

Cross-attention is plain scaled dot-product attention (scale 1/sqrt(Dh)) from the decoder tokens to a
variable-length memory (the projected LLM states of the prompt), given padded with a boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.config import DecoderConfig
from vargpt.models.decoder.kv_cache import DecoderKVCache
from vargpt.models.decoder.rope2d import apply_rope2d

__all__ = ["SelfAttention", "CrossAttention", "attend", "memory_attn_bias"]


def attend(q_BHLD: torch.Tensor, k_BHMD: torch.Tensor, v_BHMD: torch.Tensor, bias: torch.Tensor | None,
           scale: float | None, implementation: str = "sdpa") -> torch.Tensor:
    """softmax(q k^T * scale + bias) v -> (B, H, L, Dh); ``scale`` None = 1/sqrt(Dh).

    ``implementation``: ``"sdpa"`` (``F.scaled_dot_product_attention``: fused kernels, no (L, M) score tensor; the
    default, and the one for long sequences and GPUs) or ``"eager"`` (two matmuls and a float32 softmax, as
    transformers' eager attention). On this project's 2-core CPU, at the ``shapes`` preset's sizes, the eager path's
    forward and backward are faster than the CPU flash kernel's (a whole generation training step 0.88x as long with
    eager attention in the LLM and the decoder: ``benchmarks/train_step.py``, BENCHMARKS.md).
    """
    if implementation == "sdpa":
        return F.scaled_dot_product_attention(q_BHLD, k_BHMD, v_BHMD, attn_mask=bias, scale=scale)
    scores_BHLM = q_BHLD @ k_BHMD.transpose(-1, -2)
    scores_BHLM = scores_BHLM * (q_BHLD.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        scores_BHLM = scores_BHLM + bias
    return scores_BHLM.float().softmax(-1).to(v_BHMD.dtype) @ v_BHMD


def memory_attn_bias(memory_mask_BM: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive cross-attention bias: 0 on real memory rows, -inf on padding -> (B, 1, 1, M).

    Every sample must have at least one real row (otherwise its softmax would be all -inf, i.e. NaN).
    """
    # (the check syncs with the device; skipped under torch.compile to keep the per-scale step graph-friendly)
    if not torch.compiler.is_compiling() and not bool(memory_mask_BM.any(dim=1).all()):
        raise ValueError("every sample needs at least one real memory row (memory_mask_BM all False in a row)")
    zero = torch.zeros((), dtype=dtype, device=memory_mask_BM.device)
    return torch.where(memory_mask_BM, zero, float("-inf"))[:, None, None, :]


class SelfAttention(nn.Module):
    """Cosine self-attention with RoPE-2D; block-causal through ``attn_bias`` or scale-by-scale through a cache."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        C, H = cfg.width, cfg.num_heads
        self.num_heads, self.head_dim = H, cfg.head_dim
        self.max_scale_mul = cfg.max_scale_mul
        self.attn_implementation = cfg.attn_implementation
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())  # Infinity init: ln 4
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def forward(self, x_BLC: torch.Tensor, cos_sin_2LF: torch.Tensor, attn_bias: torch.Tensor | None = None,
                cache: DecoderKVCache | None = None, block_index: int = 0) -> torch.Tensor:
        """
        Args:
            x_BLC: (B, L, C) normalised + modulated tokens (L = one scale when ``cache`` is given).
            cos_sin_2LF: (2, L, Dh/2) RoPE-2D rows of these tokens.
            attn_bias: optional additive (1, 1, L, L) or broadcastable float mask (0 / -inf); unused with a cache.
            cache: if given, this scale's K/V are appended at ``cache.pos`` and the queries attend to every cached
                token (all earlier scales and this one, so no mask is needed).
            block_index: which of the cache's per-block buffers to use.
        Returns:
            (B, L, C)
        """
        B, L, C = x_BLC.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        # call the module (not F.linear on its weight) so that wrappers such as LoRA adapters take effect
        qkv = (self.mat_qkv(x_BLC) + bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh)
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        q = F.normalize(q, dim=-1) * scale_mul
        k = F.normalize(k, dim=-1)
        q, k = apply_rope2d(q, cos_sin_2LF), apply_rope2d(k, cos_sin_2LF)
        if cache is not None:
            k, v = cache.update(block_index, k.to(cache.k_BHLDh[block_index].dtype),
                                v.to(cache.v_BHLDh[block_index].dtype))
            attn_bias = None
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        # scale 1: the temperature is the learned per-head scale_mul applied to the unit-norm queries
        out = attend(q, k.to(q.dtype), v.to(q.dtype), attn_bias, 1.0, self.attn_implementation)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Attention from decoder tokens (width C) to a padded memory (width Cm); k-bias fixed at zero."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        C = cfg.width
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.attn_implementation = cfg.attn_implementation
        self.mat_q = nn.Linear(C, C)
        self.mat_kv = nn.Linear(cfg.memory_dim, 2 * C, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def memory_kv(self, memory_BMCm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the memory, each (B, H, M, Dh)."""
        B, M, _ = memory_BMCm.shape
        bias = torch.cat([torch.zeros_like(self.v_bias), self.v_bias])
        kv = (self.mat_kv(memory_BMCm) + bias).view(B, M, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x_BLC: torch.Tensor, memory_BMCm: torch.Tensor, memory_bias_B11M: torch.Tensor,
                cache: DecoderKVCache | None = None, block_index: int = 0) -> torch.Tensor:
        """
        Args:
            x_BLC: (B, L, C) queries (after ``ca_norm``).
            memory_BMCm: (B, M, Cm) padded memory (padding rows should be finite, e.g. zeroed).
            memory_bias_B11M: (B, 1, 1, M) additive bias from ``memory_attn_bias`` (-inf on padding rows).
            cache: with a cache, the memory's keys/values are computed at the first scale and reused (the memory
                of one image does not change between scales).
        Returns:
            (B, L, C)
        """
        B, L, C = x_BLC.shape
        q = self.mat_q(x_BLC).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        if cache is None:
            k, v = self.memory_kv(memory_BMCm)
        else:
            if block_index not in cache.memory_kv:
                cache.memory_kv[block_index] = self.memory_kv(memory_BMCm)
            k, v = cache.memory_kv[block_index]
        out = attend(q, k, v, memory_bias_B11M.to(q.dtype), None, self.attn_implementation)  # scale 1/sqrt(Dh)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))
