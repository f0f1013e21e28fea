"""The visual decoder: Infinity-style next-scale transformer on top of the LLM (SPEC.md §1.3 steps 4-10, §1.4,
§2.7; Infinity ``infinity/models/infinity.py`` as configured by VARGPT-v1.1).

Data flow of one generated image (B images, C = width, Cm = memory width, d = bits per token):

* ``condition(e)``: the learned start vector e (Cm,) -> RMSNorm -> attentive pool -> ``cond_BD`` (B, C), the AdaLN
  condition of every block and of the head. The official pool attends over a single key, so its softmax is 1 and
  its learned query and key projection have no effect: ``cond = proj(W_v . RMSNorm(e) + b_v)`` (only the V half
  of the official ``mat_kv`` is kept).
* ``start_tokens(cond)`` = cond + pos_start is the decoder-side input of scale 0; ``embed_words(x)`` maps the
  resampled accumulated codes (B, l, d) of later scales to width C. Both go *into the LLM* (through a projector);
* what comes *out* of the LLM (+ output projector), ``h_BLC``, is what ``forward`` / ``forward_scale`` decode:
  level embedding, ``depth`` blocks (block-causal self-attention with RoPE-2D, cross-attention to the memory =
  the projected LLM states of the prompt, AdaLN from ``gss(cond)``), AdaLN head -> logits (B, L, 2d), read as d
  bits x 2 classes (pair [2k, 2k+1] = bit k is 0 / 1).

Schedules are tuples of (h, w) grids and must be a prefix of their aspect template's 13 steps
(``vargpt.models.vae.schedules``); token order is scale by scale, each scale row-major.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.config import DecoderConfig
from vargpt.models.decoder.attention import memory_attn_bias
from vargpt.models.decoder.block import DecoderBlock, ada_layer_norm
from vargpt.models.decoder.kv_cache import DecoderKVCache
from vargpt.models.decoder.rope2d import rope2d_table
from vargpt.models.vae.schedules import ASPECT_TEMPLATES, Schedule, nearest_template, scale_offsets

__all__ = ["VisualDecoder", "RMSNorm"]


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` computed in fp32, returned in ``x``'s dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


class VisualDecoder(nn.Module):
    """Next-scale visual decoder with a bitwise head.

    Args:
        cfg: the decoder configuration.
        codebook_dim: d, bits per visual token (the VAE's codebook dim); the head emits 2d logits.
    """

    def __init__(self, cfg: DecoderConfig, codebook_dim: int) -> None:
        super().__init__()
        C, Cm, d = cfg.width, cfg.memory_dim, codebook_dim
        self.cfg, self.codebook_dim = cfg, codebook_dim
        self.start_embedding = nn.Parameter(torch.zeros(Cm))
        self.uncond_embedding = nn.Parameter(torch.zeros(cfg.uncond_rows, Cm))
        self.cond_norm = RMSNorm(Cm, cfg.norm_eps)
        self.cond_pool_v = nn.Linear(Cm, C)
        self.cond_pool_proj = nn.Linear(C, C)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.lvl_embed = nn.Embedding(cfg.num_levels, C)
        self.word_embed = nn.Linear(d, C)
        self.shared_ada_lin = nn.Linear(C, 6 * C)
        # linspace(0, rate, depth) in plain Python so that construction works under torch.device("meta")
        n = cfg.depth
        rates = [cfg.drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        self.blocks = nn.ModuleList(DecoderBlock(cfg, rate) for rate in rates)
        self.head_ada_lin = nn.Linear(C, 2 * C)
        self.head = nn.Linear(C, 2 * d)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Infinity-style initialisation for training from scratch (a loaded checkpoint overwrites it): linear and
        embedding weights N(0, 0.02) truncated, zero biases; residual output projections shrunk by sqrt(2 depth);
        the AdaLN gates gamma start near 0 so every block starts close to the identity."""
        C, std = self.cfg.width, 0.02
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.blocks:
            blk.sa.proj.weight.div_(math.sqrt(2 * self.cfg.depth))
            blk.ffn.fc2.weight.div_(math.sqrt(2 * self.cfg.depth))
            blk.ada_gss[:, :, :2].mul_(1e-5)  # gamma1, gamma2
            blk.ada_gss[:, :, 2:].mul_(0.5)
        self.shared_ada_lin.weight[: 2 * C].mul_(1e-5)  # rows producing gamma1, gamma2
        self.shared_ada_lin.weight[2 * C:].mul_(0.5)
        nn.init.trunc_normal_(self.start_embedding, std=1.0)
        nn.init.trunc_normal_(self.uncond_embedding, std=self.cfg.memory_dim**-0.5)
        nn.init.trunc_normal_(self.pos_start, std=std)

    # ----- conditioning and input embeddings (used on the LLM-input side) -----

    def condition(self, start_BCm: torch.Tensor) -> torch.Tensor:
        """Start vectors (B, Cm) (``start_embedding`` or ``uncond_embedding[0]`` per sample) -> cond_BD (B, C)."""
        return self.cond_pool_proj(self.cond_pool_v(self.cond_norm(start_BCm)))

    def gss(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """Shared AdaLN: (B, C) -> (B, 1, 6, C) = gamma1, gamma2, scale1, scale2, shift1, shift2 (before ada_gss)."""
        return self.shared_ada_lin(F.silu(cond_BD)).view(-1, 1, 6, self.cfg.width)

    def start_tokens(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """Scale-0 input: (B, C) -> (B, 1, C) = cond + pos_start."""
        return cond_BD[:, None, :] + self.pos_start

    def embed_words(self, x_Bld: torch.Tensor) -> torch.Tensor:
        """Resampled accumulated codes (B, l, d) of scales >= 1 -> (B, l, C)."""
        return self.word_embed(x_Bld)

    # ----- decoding the LLM outputs -----

    def forward(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor, memory_BMCm: torch.Tensor,
                memory_mask_BM: torch.Tensor, schedule: Schedule, template: float) -> torch.Tensor:
        """Training path: all L tokens of the schedule at once under a block-causal mask.

        Args:
            h_BLC: (B, L, C) LLM outputs after the output projector, L = sum of h*w; row 0 is scale 0 (no shift:
                the row holding scale k's input predicts scale k's bits).
            cond_BD: (B, C) from ``condition``.
            memory_BMCm: (B, M, Cm) cross-attention memory, padded; padding rows are ignored (zeroed, then masked).
            memory_mask_BM: (B, M) bool, True = real row; every sample needs at least one.
            schedule: tuple of (h, w), a prefix of the template's steps.
            template: aspect template (a key of ``ASPECT_TEMPLATES`` or any h/w ratio, mapped to the nearest).
        Returns:
            logits_BLV: (B, L, 2d).
        """
        schedule, tkey = self._resolve(schedule, template)
        offs = scale_offsets(schedule)
        L = offs[-1]
        if h_BLC.shape[1] != L:
            raise ValueError(f"h_BLC has {h_BLC.shape[1]} tokens, schedule {schedule} has {L}")
        # scale index of every token, built on the CPU (no device sync) then moved
        sizes = torch.tensor([h * w for h, w in schedule])
        scale_L = torch.repeat_interleave(torch.arange(len(schedule)), sizes).to(h_BLC.device)
        x_BLC = h_BLC + self.lvl_embed(scale_L).to(h_BLC.dtype)  # once, before the first block
        # block-causal: a token of scale k sees every token of scales <= k
        zero = torch.zeros((), dtype=h_BLC.dtype, device=h_BLC.device)
        attn_bias_11LL = torch.where(scale_L[None, :] <= scale_L[:, None], zero, float("-inf"))[None, None]
        cos_sin_2LF = self._rope(tkey, 0, L, h_BLC.device)
        return self._run_blocks(x_BLC, cond_BD, memory_BMCm, memory_mask_BM, cos_sin_2LF, attn_bias_11LL, None)

    def forward_scale(self, h_BlC: torch.Tensor, cond_BD: torch.Tensor, memory_BMCm: torch.Tensor,
                      memory_mask_BM: torch.Tensor, schedule: Schedule, template: float, scale_index: int,
                      cache: DecoderKVCache) -> torch.Tensor:
        """Inference path: one scale, attending to every earlier scale through ``cache`` (then advanced by l).

        Args:
            h_BlC: (B, l, C) LLM outputs (after the output projector) for scale ``scale_index``, l = h*w.
            cond_BD, memory_BMCm, memory_mask_BM, schedule, template: as in ``forward``.
            scale_index: k; scales 0..k-1 must already be in ``cache`` (``cache.pos`` = their token count).
            cache: from ``new_cache``.
        Returns:
            logits_BlV: (B, l, 2d).
        """
        schedule, tkey = self._resolve(schedule, template)
        offs = scale_offsets(schedule)
        if not 0 <= scale_index < len(schedule):
            raise ValueError(f"scale_index {scale_index} outside schedule of {len(schedule)} scales")
        start, end = offs[scale_index], offs[scale_index + 1]
        if h_BlC.shape[1] != end - start:
            raise ValueError(f"h_BlC has {h_BlC.shape[1]} tokens, scale {scale_index} has {end - start}")
        if cache.pos != start:
            raise ValueError(f"cache holds {cache.pos} tokens but scale {scale_index} starts at token {start}")
        x_BlC = h_BlC + self.lvl_embed.weight[scale_index].to(h_BlC.dtype)
        cos_sin_2lF = self._rope(tkey, start, end, h_BlC.device)
        logits_BlV = self._run_blocks(x_BlC, cond_BD, memory_BMCm, memory_mask_BM, cos_sin_2lF, None, cache)
        cache.advance(end - start)
        return logits_BlV

    def new_cache(self, batch: int, max_tokens: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> DecoderKVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_tokens`` tokens (defaults: the params' dtype and
        device)."""
        p = self.pos_start
        return DecoderKVCache(len(self.blocks), batch, self.cfg.num_heads, self.cfg.head_dim, max_tokens,
                              dtype or p.dtype, device if device is not None else p.device)

    def head_logits(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """AdaLN-before-head then the bitwise head: (B, L, C), (B, C) -> (B, L, 2d)."""
        scale_B1C, shift_B1C = self.head_ada_lin(F.silu(cond_BD)).view(-1, 1, 2, self.cfg.width).unbind(2)
        return self.head(ada_layer_norm(x_BLC, scale_B1C, shift_B1C, self.cfg.norm_eps))

    def bit_logits(self, logits_BLV: torch.Tensor) -> torch.Tensor:
        """(B, L, 2d) -> (B, L, d, 2); [..., k, 0] / [..., k, 1] score bit k = 0 / 1."""
        return logits_BLV.unflatten(-1, (self.codebook_dim, 2))

    # ----- internals -----

    def _run_blocks(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, memory_BMCm: torch.Tensor,
                    memory_mask_BM: torch.Tensor, cos_sin_2LF: torch.Tensor, attn_bias: torch.Tensor | None,
                    cache: DecoderKVCache | None) -> torch.Tensor:
        gss_B16C = self.gss(cond_BD)
        # zero the padding rows so that garbage there (even inf) cannot turn a zero attention weight into NaN
        memory_BMCm = torch.where(memory_mask_BM[..., None], memory_BMCm, torch.zeros((), dtype=memory_BMCm.dtype,
                                                                                      device=memory_BMCm.device))
        memory_bias_B11M = memory_attn_bias(memory_mask_BM, x_BLC.dtype)
        for i, blk in enumerate(self.blocks):
            x_BLC = blk(x_BLC, gss_B16C, memory_BMCm, memory_bias_B11M, cos_sin_2LF, attn_bias, cache, i)
        return self.head_logits(x_BLC, cond_BD)

    def _rope(self, template: float, start: int, end: int, device: torch.device) -> torch.Tensor:
        table = rope2d_table(template, self.cfg.head_dim, self.cfg.rope_base, self.cfg.rope_grid_size)
        return table[:, start:end].to(device)

    @staticmethod
    def _resolve(schedule: Schedule, template: float) -> tuple[Schedule, float]:
        tkey = nearest_template(float(template))
        sched = tuple((int(h), int(w)) for h, w in schedule)
        steps = ASPECT_TEMPLATES[tkey]
        if not sched or sched != steps[: len(sched)]:
            raise ValueError(f"schedule {sched} is not a prefix of the steps of template {tkey}: {steps}")
        return sched, tkey
