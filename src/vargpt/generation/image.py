"""Next-scale image generation with LLM and decoder KV caches, CFG and per-sample generators (SPEC.md §1.4).

Entry state: an ``LLMSession`` of B rows whose last visible slot is ``<|image_gen_start|>``. Per image b:

* memory M_b = GenProjOut(hidden states of the row's visible slots before the start token) -- prompt, images,
  generated text (the official ``past_hidden_states[:-1]``);
* with guidance (cfg != 1) B unconditional rows are added to the same LLM batch and to the same decoder batch:
  ``official``: context-free LLM rows (see only the current chunk, positions from 0), memory = the first n_b rows
  of ``uncond_embedding``, decoder condition from ``uncond_embedding[0]``; ``null_prompt``: rows of a session
  prefilled with the empty prompt (own cache and memory), decoder condition from the start vector;
* scale k: LLM chunk = GenProjIn(x_k) for every row (x_0 = the row's decoder condition + pos_start,
  x_k = word_embed(resampled accumulated codes)), decoder ``forward_scale`` with its cache, logits / tau, CFG
  on logits, per-bit sampling with row b's generator, code accumulation;
* finally the VAE decodes the accumulated codes.

``image_steps`` is a generator of ``ScaleStep`` events (so that streaming and non-streaming share one loop) and
returns an ``ImageBatch``.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vargpt.generation.llm_session import LLMSession
from vargpt.generation.sampling import filter_top_k_top_p
from vargpt.models.vae import accumulate_codes, next_scale_input
from vargpt.models.vae.schedules import Schedule, nearest_template, scale_offsets
from vargpt.models.vargpt import VARGPT

__all__ = ["ScaleStep", "ImageBatch", "image_steps", "sample_bits", "visible_memory", "gen_rows_from_bits"]


@dataclass
class ScaleStep:
    """One finished scale: its index, grid, the logits handed to the sampler (B, h*w, d, 2; tempered and guided),
    the sampled bits (B, h*w, d) and the accumulated codes (B, d, H, W)."""

    index: int
    hw: tuple[int, int]
    logits_BlD2: torch.Tensor
    bits_Bld: torch.Tensor
    summed_BdHW: torch.Tensor


@dataclass
class ImageBatch:
    """Result of one batched image generation."""

    ms_bits_Bld: list[torch.Tensor]  # per scale (B, h*w, d) int64
    summed_BdHW: torch.Tensor
    image_B3HW: torch.Tensor  # decoded, clamped to [-1, 1]
    schedule: Schedule
    template: float
    session: LLMSession  # the conditional rows, every image token in the cache (for continuing the text)
    memory_lengths: list[int]


def sample_bits(logits_BlD2: torch.Tensor, *, top_k: int, top_p: float, argmax: bool,
                generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Per-bit sampling of already tempered/guided logits (B, l, d, 2) -> bits (B, l, d) int64.

    Each bit is drawn as ``u < P(bit = 1)`` with ``u ~ U[0, 1)`` from row b's generator (top-k/top-p filtering
    first, so a filtered bit is deterministic). ``argmax`` (tau = 0) takes the larger logit.
    """
    if argmax:
        return logits_BlD2.argmax(dim=-1)
    p1 = filter_top_k_top_p(logits_BlD2.float(), top_k, top_p).softmax(dim=-1)[..., 1]
    u = torch.stack([torch.rand(p1.shape[1:], generator=g, device=g.device).to(p1.device) for g in generators])
    return (u < p1).long()


def visible_memory(model: VARGPT, session: LLMSession, exclude_last: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention memory of each row: GenProjOut of its visible slots except the last ``exclude_last``
    visible ones (the ``<|image_gen_start|>`` token) -> (B, M, Cm), bool mask (B, M), left-aligned."""
    vis = session.visible_BT.clone()
    # drop each row's last visible slot(s)
    for _ in range(exclude_last):
        last = (vis.long() * torch.arange(1, vis.shape[1] + 1, device=vis.device)).argmax(dim=1)
        vis[torch.arange(vis.shape[0], device=vis.device), last] = False
    counts = vis.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("a generated image has no prompt token before its <|image_gen_start|>")
    M = int(counts.max())
    order = torch.argsort((~vis).to(torch.int8), dim=1, stable=True)[:, :M]
    h = session.hidden_BTC[torch.arange(vis.shape[0], device=vis.device)[:, None], order]
    mask = torch.arange(M, device=vis.device)[None] < counts[:, None]
    return model.gen_proj_out(h), mask


def gen_rows_from_bits(model: VARGPT, ms_bits_Bld: Sequence[torch.Tensor], schedule: Schedule) -> torch.Tensor:
    """Decoder-width LLM rows (B, L, C) of an image already generated (history): [start ; word_embed(inputs)]."""
    dec = model.decoder
    B = ms_bits_Bld[0].shape[0]
    dtype = dec.pos_start.dtype
    cond = dec.condition(dec.start_embedding.unsqueeze(0).expand(B, -1))
    rows = [dec.start_tokens(cond)]
    H, W = schedule[-1]
    summed = torch.zeros(B, model.config.vae.codebook_dim, H, W, device=cond.device)
    for k in range(len(schedule) - 1):
        summed = accumulate_codes(summed, ms_bits_Bld[k].to(cond.device), schedule[k])
        rows.append(dec.embed_words(next_scale_input(summed, schedule[k + 1]).to(dtype)))
    return torch.cat(rows, dim=1)


@torch.no_grad()
def image_steps(
    model: VARGPT, session: LLMSession, schedule: Schedule, *, generators: Sequence[torch.Generator],
    cfg_scale: float, cfg_mode: str, temperature: float, top_k: int, top_p: float, positions: str,
    uncond_session: LLMSession | None = None, template: float | None = None, decode_chunk: int = 0,
) -> Generator[ScaleStep, None, ImageBatch]:
    """Generate one image per row of ``session`` (see the module docstring); yields one ``ScaleStep`` per scale.

    Args:
        session: B rows, each ending with ``<|image_gen_start|>``.
        schedule: latent grids (h, w), a prefix of one aspect template.
        generators: one per row.
        cfg_scale, cfg_mode: guidance (``cfg_scale == 1`` runs no unconditional rows).
        temperature, top_k, top_p: per-bit sampling (temperature 0 = argmax).
        positions: ``official`` (raw cache index) or ``mrope`` (continue the text positions).
        uncond_session: for ``null_prompt``: B rows of the empty prompt ending with ``<|image_gen_start|>``.
        decode_chunk: VAE-decode at most this many images at once (0 = all; small chunks keep the full-resolution
            activations in the CPU cache).
    """
    cfg = model.config
    dec = model.decoder
    B = session.batch
    if len(generators) != B:
        raise ValueError(f"{len(generators)} generators for {B} images")
    template = nearest_template(schedule[-1][0] / schedule[-1][1]) if template is None else template
    device, dtype = session.device, session.dtype

    mem_c, mask_c = visible_memory(model, session)
    lengths = [int(n) for n in mask_c.sum(1)]
    start_1Cm = dec.start_embedding.unsqueeze(0)
    cond_c = dec.condition(start_1Cm).expand(B, -1)
    guided = cfg_scale != 1.0
    if guided and cfg_mode == "official":
        n_max = dec.uncond_embedding.shape[0]
        if max(lengths) > n_max:
            raise ValueError(
                f"cfg_mode='official' supports prompts of at most {n_max} tokens before <|image_gen_start|> "
                f"(the released unconditional table has {n_max} rows); got {max(lengths)}. Shorten the prompt, "
                "use cfg_mode='null_prompt', or cfg_scale=1")
        M = mem_c.shape[1]
        mem_u = dec.uncond_embedding[:M].unsqueeze(0).expand(B, -1, -1).to(mem_c.dtype)
        mask_u = mask_c
        cond_u = dec.condition(dec.uncond_embedding[:1]).expand(B, -1)
        llm = session.with_blank_rows(B)
        see_past = torch.cat([torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)]).to(device)
    elif guided and cfg_mode == "null_prompt":
        if uncond_session is None or uncond_session.batch != B:
            raise ValueError("cfg_mode='null_prompt' needs an uncond_session with one row per image")
        mem_u, mask_u = visible_memory(model, uncond_session)
        cond_u = cond_c
        llm = session.concat_rows(uncond_session)
        see_past = None
    elif guided:
        raise ValueError(f"unknown cfg_mode {cfg_mode!r}")
    else:
        llm, see_past = session, None
    if guided:
        M = max(mem_c.shape[1], mem_u.shape[1])
        memory = torch.cat([F.pad(mem_c, (0, 0, 0, M - mem_c.shape[1])), F.pad(mem_u, (0, 0, 0, M - mem_u.shape[1]))])
        memory_mask = torch.cat([F.pad(mask_c, (0, M - mask_c.shape[1])), F.pad(mask_u, (0, M - mask_u.shape[1]))])
        cond = torch.cat([cond_c, cond_u])
    else:
        memory, memory_mask, cond = mem_c, mask_c, cond_c
    R = llm.batch  # B or 2B rows

    offs = scale_offsets(schedule)
    cache = dec.new_cache(R, offs[-1], dtype=dtype, device=device)
    H, W = schedule[-1]
    summed = torch.zeros(B, cfg.vae.codebook_dim, H, W, device=device)
    # scale 0: each row's own start token (cond + pos_start; the unconditional rows use their condition);
    # later scales: the same resampled codes for a sample's conditional and unconditional rows
    x_RlC = dec.start_tokens(cond)
    ms_bits = []
    for k, (h, w) in enumerate(schedule):
        l = h * w  # noqa: E741
        emb = model.gen_proj_in(x_RlC.to(dtype))
        ar = torch.arange(l, device=device)
        if positions == "official":
            start_pos = llm.num_tokens_B.clone()
        else:
            start_pos = llm.next_pos_B.clone()
        if see_past is not None:  # context-free official rows restart at 0 every scale
            start_pos = torch.where(see_past, start_pos, torch.zeros_like(start_pos))
        pos = (start_pos[:, None] + ar[None]).unsqueeze(0).expand(3, R, l)
        valid = torch.ones(R, l, dtype=torch.bool, device=device)
        keep = valid if see_past is None else valid & see_past[:, None]
        hidden = llm.step(emb, pos, valid, keep, see_past)
        llm.next_pos_B = torch.maximum(llm.next_pos_B, start_pos + l)
        logits = dec.forward_scale(model.gen_proj_out(hidden), cond, memory, memory_mask, schedule, template, k,
                                   cache).float()
        if temperature > 0:
            logits = logits / temperature
        if guided:
            logits = cfg_scale * logits[:B] + (1 - cfg_scale) * logits[B:]
        logits_BlD2 = dec.bit_logits(logits)
        bits = sample_bits(logits_BlD2, top_k=top_k, top_p=top_p, argmax=temperature == 0,
                           generators=generators)
        ms_bits.append(bits)
        summed = accumulate_codes(summed, bits, (h, w))
        yield ScaleStep(k, (h, w), logits_BlD2, bits, summed)
        if k + 1 < len(schedule):
            x_BlC = dec.embed_words(next_scale_input(summed, schedule[k + 1]).to(dec.pos_start.dtype))
            x_RlC = x_BlC.repeat(R // B, 1, 1)
    vae_dtype = next(model.vae.parameters()).dtype
    chunk = decode_chunk or B
    image = torch.cat([model.vae.decode(summed[i:i + chunk].to(vae_dtype)).float() for i in range(0, B, chunk)])
    cond_session = llm.select_rows(list(range(B))) if R != B else llm
    return ImageBatch(ms_bits, summed, image, schedule, template, cond_session, lengths)
