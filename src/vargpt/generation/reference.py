"""Reference (uncached) generation loops: every step recomputes the whole sequence from scratch.

They are slow on purpose: simple enough to be obviously right, so the cached engine can be tested against them
(cached == uncached), and small enough to drive the smoke run. Batch size 1, conditional branch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vargpt.generation.sampling import sample
from vargpt.models.vae import accumulate_codes, next_scale_input
from vargpt.models.vae.schedules import Schedule, nearest_template, scale_offsets
from vargpt.models.vargpt import VARGPT

__all__ = ["ImageTokens", "greedy_text_uncached", "generate_image_uncached"]


@torch.no_grad()
def greedy_text_uncached(
    model: VARGPT, input_ids_1T: torch.Tensor, *, pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None, max_new_tokens: int = 16, stop_ids: tuple[int, ...] = (),
) -> list[int]:
    """Greedy continuation of one prompt; M-RoPE positions recomputed for the whole sequence at every step."""
    ids = input_ids_1T
    new: list[int] = []
    for _ in range(max_new_tokens):
        pos = model.position_ids(ids, None, image_grid_thw, mode="mrope")
        hidden = model.llm_hidden(ids, None, pos, pixel_values, image_grid_thw)
        nxt = int(model.backbone.lm_head(hidden[:, -1]).argmax(-1))
        new.append(nxt)
        if nxt in stop_ids:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
    return new


@dataclass
class ImageTokens:
    """Result of an image generation: per-scale bits, the summed codes and the decoded image."""

    ms_bits_Bld: list[torch.Tensor]
    summed_BdHW: torch.Tensor
    image_B3HW: torch.Tensor  # in [-1, 1]
    schedule: Schedule


@torch.no_grad()
def generate_image_uncached(
    model: VARGPT, prompt_ids_1T: torch.Tensor, schedule: Schedule, *, template: float | None = None,
    pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
    temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0, generator: torch.Generator | None = None,
    logits_out: list | None = None,
) -> ImageTokens:
    """Next-scale generation after ``prompt_ids_1T`` (which must not contain ``<|image_gen_start|>``).

    For each scale k the LLM runs over prompt + ``<|image_gen_start|>`` + the inputs of scales 0..k, the
    decoder's block-causal path over scales 0..k, and the bits of scale k are sampled (SPEC.md §1.4 without
    caches and without CFG). ``logits_out``, when given, receives each scale's raw bit logits (1, l, 2d).
    """
    cfg = model.config
    st = cfg.special_tokens
    dec = model.decoder
    template = nearest_template(schedule[-1][0] / schedule[-1][1]) if template is None else template
    n = prompt_ids_1T.shape[1]
    device = prompt_ids_1T.device
    cond_1D = dec.condition(dec.start_embedding.unsqueeze(0))
    rows_1lC = dec.start_tokens(cond_1D)
    H, W = schedule[-1]
    summed = torch.zeros(1, cfg.vae.codebook_dim, H, W, device=device)
    offs = scale_offsets(schedule)
    ms_bits = []
    for k, hw in enumerate(schedule):
        l_sofar = offs[k + 1]
        ids = torch.cat([prompt_ids_1T, torch.tensor([[st.image_gen_start] + [st.image_gen_pad] * l_sofar],
                                                     device=device)], dim=1)
        pos = model.position_ids(ids, None, image_grid_thw, mode="mrope")
        hidden = model.llm_hidden(ids, None, pos, pixel_values, image_grid_thw, rows_1lC)
        g = model.gen_proj_out(hidden[:, n + 1:])
        mem = model.gen_proj_out(hidden[:, :n])
        mask = torch.ones(1, n, dtype=torch.bool, device=device)
        logits = dec(g, cond_1D, mem, mask, schedule[: k + 1], template)[:, offs[k]:]
        if logits_out is not None:
            logits_out.append(logits)
        bits = sample(dec.bit_logits(logits), temperature=temperature, top_k=top_k, top_p=top_p,
                      generator=generator)  # (1, l, d)
        ms_bits.append(bits)
        summed = accumulate_codes(summed, bits, hw)
        if k + 1 < len(schedule):
            rows_1lC = torch.cat([rows_1lC, dec.embed_words(next_scale_input(summed, schedule[k + 1]))], dim=1)
    image = model.vae.decode(summed)
    return ImageTokens(ms_bits_Bld=ms_bits, summed_BdHW=summed, image_B3HW=image, schedule=schedule)
