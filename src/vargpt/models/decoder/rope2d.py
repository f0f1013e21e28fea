"""2-D rotary position embedding of the visual decoder's self-attention (SPEC.md §2.7 "RoPE-2D").

Infinity's ``rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2`` variant (``precompute_rope2d_freqs_grid`` and
``apply_rotary_emb`` in Infinity's ``infinity/models/basic.py``):

* A head of ``Dh`` channels is ``Dh/2`` rotation pairs of *adjacent* channels (2m, 2m+1) (interleaved, not
  rotate-half). Pairs ``0 .. Dh/4-1`` rotate by ``row * w_i``, pairs ``Dh/4 .. Dh/2-1`` by ``col * w_i``, with
  ``w_i = base ** (-2i / (Dh/2))``, i = 0 .. Dh/4-1. Angles exist for integer rows/cols ``0 .. grid_size-1``.
* Every scale of an aspect template is placed on the grid of the template's **last** (1M) step (H1, W1):
  token (i, j) of an (h, w) scale uses row ``round(i * (H1 / h))`` and column ``round(j * (W1 / w))``, computed in
  float32 with half-to-even rounding (as ``torch.round``).
* The per-token table of all 13 steps is concatenated in scale order: a (2, L_1M, Dh/2) tensor, row 0 = cos,
  row 1 = sin. Any schedule of the template is a prefix of its 13 steps, so scale k of a schedule reads table rows
  ``[offset_k, offset_k + h_k * w_k)``.

Worked example, template 0.5 (1M grid 45 x 90): a (2, 4) scale uses rows round(i * 22.5) = 0, 22 (22.5 rounds to
even) and columns round(j * 22.5) = 0, 22, 45, 68 (67.5 rounds to even 68).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from vargpt.models.vae.schedules import ASPECT_TEMPLATES, nearest_template

__all__ = ["rope2d_positions", "rope2d_table", "apply_rope2d"]


def rope2d_positions(template: float) -> torch.Tensor:
    """Integer (row, col) grid positions of every token of a template's 13 steps.

    Args:
        template: a key of ``ASPECT_TEMPLATES`` (any other ratio is mapped with ``nearest_template``).
    Returns:
        int64 tensor (L_1M, 2), rows in scale order, each scale flattened row-major.
    """
    steps = ASPECT_TEMPLATES[nearest_template(template)]
    H1, W1 = steps[-1]
    out = []
    for h, w in steps:
        # float32 arithmetic then round-half-to-even, exactly as the official table builder does it
        rows = (torch.arange(h, dtype=torch.float32) * (H1 / h)).round().long()
        cols = (torch.arange(w, dtype=torch.float32) * (W1 / w)).round().long()
        out.append(torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(h * w, 2))
    return torch.cat(out, dim=0)


@lru_cache(maxsize=32)
def rope2d_table(template: float, head_dim: int, base: float, grid_size: int) -> torch.Tensor:
    """The cos/sin table of a template (pure function of its arguments, cached on CPU; do not modify in place).

    Args:
        template: aspect template (mapped with ``nearest_template``).
        head_dim: Dh, a multiple of 4.
        base: RoPE base (10000).
        grid_size: number of precomputed integer rows/cols (128 = 2048 px / 16).
    Returns:
        float32 tensor (2, L_1M, Dh/2): [0] = cos, [1] = sin of pair m's angle for every token of the 13 steps.
    """
    if head_dim % 4:
        raise ValueError(f"RoPE-2D needs a head dim that is a multiple of 4, got {head_dim}")
    pos_L2 = rope2d_positions(template)
    if int(pos_L2.max()) >= grid_size:
        raise ValueError(f"template {template}: positions up to {int(pos_L2.max())} exceed rope grid {grid_size}")
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))  # (Dh/4,)
    # angles for the integer grid first (as the official code), then gathered per token
    ang_GF = torch.outer(torch.arange(grid_size, dtype=torch.int64).float(), inv_freq)  # (grid, Dh/4)
    ang_LF = torch.cat([ang_GF[pos_L2[:, 0]], ang_GF[pos_L2[:, 1]]], dim=-1)  # (L_1M, Dh/2): rows, then cols
    return torch.stack([ang_LF.cos(), ang_LF.sin()], dim=0).contiguous()


def apply_rope2d(x_BHLDh: torch.Tensor, cos_sin_2LF: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` (computed in fp32, returned in ``x``'s dtype).

    Args:
        x_BHLDh: (B, H, L, Dh) queries or keys.
        cos_sin_2LF: (2, L, Dh/2) rows of ``rope2d_table`` for these L tokens.
    Returns:
        (B, H, L, Dh): out_even = cos*x_even - sin*x_odd, out_odd = sin*x_even + cos*x_odd.
    """
    cos_LF, sin_LF = cos_sin_2LF.to(device=x_BHLDh.device, dtype=torch.float32).unbind(0)
    x = x_BHLDh.float().unflatten(-1, (-1, 2))  # (B, H, L, Dh/2, 2)
    xe, xo = x.unbind(-1)
    out = torch.stack([cos_LF * xe - sin_LF * xo, sin_LF * xe + cos_LF * xo], dim=-1)
    return out.flatten(-2).to(x_BHLDh.dtype)
