"""Sampling primitives: temperature, top-k, top-p over the last axis, with an explicit ``torch.Generator``.

Used for text tokens (V = vocabulary) and for bits (V = 2, one distribution per bit; SPEC.md §1.4 step 6).
"""

from __future__ import annotations

import torch

__all__ = ["filter_top_k_top_p", "sample", "cfg_combine"]


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Logits with entries outside the top-k / nucleus set to -inf (``top_k <= 0`` / ``top_p <= 0`` disable).

    Nucleus rule (VAR/Infinity): sort ascending, remove entries whose cumulative probability is <= 1 - top_p,
    never the most likely one. For two classes and top_p = 0.97 a bit whose minority probability is <= 0.03
    becomes deterministic.
    """
    logits = logits.clone()
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One sample per row of ``logits`` (..., V) -> (...) int64. ``temperature == 0`` means argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_top_k_top_p(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: scale * cond + (1 - scale) * uncond."""
    return scale * cond + (1 - scale) * uncond
