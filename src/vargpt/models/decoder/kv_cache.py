"""Explicit self-attention KV cache of the visual decoder (STYLE.md C8).

Next-scale decoding appends one whole scale per step: every block writes that scale's keys/values at
``[pos, pos + l)`` of its pre-allocated buffers and attends to ``[0, pos + l)``; after the last block the caller
(``VisualDecoder.forward_scale``) advances ``pos`` by ``l``. The cache is created by the caller
(``VisualDecoder.new_cache``) and passed in; the decoder never keeps it.
"""

from __future__ import annotations

import torch

__all__ = ["DecoderKVCache"]


class DecoderKVCache:
    """Per-block K/V buffers (B, H, L_max, Dh) plus the number of tokens already filled.

    Args:
        num_blocks: decoder depth.
        batch: B (the CFG-doubled batch when guidance is used).
        num_heads, head_dim: H, Dh of the self-attention.
        max_tokens: L_max, at least the number of tokens of the schedule to decode.
        dtype, device: of the buffers (the dtype of the keys/values the blocks produce).
    """

    def __init__(self, num_blocks: int, batch: int, num_heads: int, head_dim: int, max_tokens: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        shape = (batch, num_heads, max_tokens, head_dim)
        self.k_BHLDh = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_blocks)]
        self.v_BHLDh = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_blocks)]
        self.pos = 0  # tokens of completed scales
        self.max_tokens = max_tokens
        # cross-attention keys/values of the (fixed) memory, per block, filled at the first scale
        self.memory_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, block: int, k_BHlDh: torch.Tensor, v_BHlDh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this scale's keys/values of ``block`` at ``[pos, pos + l)``; return all keys/values ``[0, pos + l)``.

        Does not advance ``pos`` (every block of the same scale writes at the same place); call ``advance``.
        """
        end = self.pos + k_BHlDh.shape[2]
        if end > self.max_tokens:
            raise ValueError(f"KV cache overflow: {end} tokens > max_tokens={self.max_tokens}")
        kb, vb = self.k_BHLDh[block], self.v_BHLDh[block]
        kb[:, :, self.pos:end] = k_BHlDh
        vb[:, :, self.pos:end] = v_BHlDh
        return kb[:, :, :end], vb[:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Mark ``num_tokens`` more tokens (one scale) as filled."""
        self.pos += num_tokens

    def reset(self) -> None:
        """Start a new image (buffers are overwritten, not cleared)."""
        self.pos = 0
        self.memory_kv = {}
