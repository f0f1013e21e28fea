"""KV-cached text decoding: prefill (or extend) and one-token decode steps as separate functions.

Positions are M-RoPE: ``extend`` computes them for the new tokens with transformers' pure ``get_rope_index``
and shifts them by each row's next text position; a decode step feeds ``next_pos_B`` (= the cache position
plus the row's rope delta, SPEC.md §2.4). Left padding is handled by the session's visibility mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vargpt.generation.llm_session import LLMSession
from vargpt.generation.sampling import filter_top_k_top_p
from vargpt.models.vargpt import VARGPT

__all__ = ["left_pad", "extend", "decode_step", "sample_tokens", "make_generators"]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> (input_ids (B, T), attention_mask (B, T))."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every prompt needs at least one token")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[b, T - len(s):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def extend(
    session: LLMSession, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None, *,
    pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
    gen_rows_NPC: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append tokens (a prompt, or the next turn of a conversation) to every row; returns their hidden states.

    Args:
        session: the batch state (empty for a prefill).
        input_ids_BT: (B, T) left-padded ids; understanding images as expanded ``<|image_pad|>`` runs.
        attention_mask_BT: (B, T) 1 = real token (default: all real).
        pixel_values, image_grid_thw: the understanding images of these tokens, in order.
        gen_rows_NPC: decoder-width rows for ``<|image_gen_pad|>`` slots (generated images already in the history).
    Returns:
        hidden_BTC (B, T, Ht); the last column holds each row's last token.
    """
    model = session.model
    B, T = input_ids_BT.shape
    mask_BT = torch.ones_like(input_ids_BT) if attention_mask_BT is None else attention_mask_BT
    embeds = model.input_embeddings(input_ids_BT, pixel_values, image_grid_thw, gen_rows_NPC)
    pos_3BT = model.position_ids(input_ids_BT, mask_BT, image_grid_thw, mode="mrope")
    pos_3BT = pos_3BT + session.next_pos_B.view(1, B, 1)
    valid = mask_BT.bool()
    hidden = session.step(embeds.to(session.dtype), pos_3BT, valid)
    last_pos_B = torch.where(valid[None], pos_3BT, torch.full_like(pos_3BT, -1)).amax(dim=(0, 2))
    session.next_pos_B = torch.maximum(session.next_pos_B, last_pos_B + 1)
    return hidden


@torch.no_grad()
def decode_step(session: LLMSession, tokens_B: torch.Tensor, alive_B: torch.Tensor | None = None) -> torch.Tensor:
    """Feed one token per row (rows with ``alive_B`` False feed an invisible slot) -> hidden (B, 1, Ht)."""
    model = session.model
    B = tokens_B.shape[0]
    alive_B = torch.ones(B, dtype=torch.bool, device=tokens_B.device) if alive_B is None else alive_B
    embeds = model.embed_tokens(tokens_B.view(B, 1)).to(session.dtype)
    pos = session.next_pos_B.view(1, B, 1).expand(3, B, 1)
    hidden = session.step(embeds, pos, alive_B.view(B, 1))
    session.next_pos_B = session.next_pos_B + alive_B.long()
    return hidden


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per sample (the engine never touches the global RNG)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def sample_tokens(logits_BV: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
                  generators: Sequence[torch.Generator], banned: Sequence[int] = ()) -> torch.Tensor:
    """Next token per row: argmax when ``temperature == 0``, else a draw from row b's own generator."""
    logits = logits_BV.float()
    if banned:
        logits[:, list(banned)] = float("-inf")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_top_k_top_p(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=generators[b]).view(1)
                      for b in range(probs.shape[0])])


def lm_logits(model: VARGPT, hidden_BC: torch.Tensor) -> torch.Tensor:
    """Text logits (B, V) of the last hidden states."""
    return model.backbone.lm_head(hidden_BC)
