"""Small builders shared by unit tests: a tiny random model and generation batches in the model's token layout."""

from __future__ import annotations

import torch

from vargpt.config import VARGPTConfig, get_preset
from vargpt.models.vae.schedules import get_schedule, schedule_num_tokens
from vargpt.models.vargpt import VARGPT


def tiny_model(seed: int = 0, **overrides) -> VARGPT:
    """The ``tiny`` preset with seeded random weights, every parameter perturbed away from 0/1 constants."""
    from dataclasses import replace

    cfg: VARGPTConfig = replace(get_preset("tiny"), **overrides)
    torch.manual_seed(seed)
    model = VARGPT(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("backbone"):
                continue
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() < 2 else 0.05))
    return model.eval()


def gen_sample(cfg: VARGPTConfig, prompt: list[int], tail: list[int]) -> list[int]:
    """prompt + <|image_gen_start|> + P x <|image_gen_pad|> + <|image_gen_end|> + tail, for the config's schedule."""
    st = cfg.special_tokens
    L = schedule_num_tokens(get_schedule(cfg.gen_aspect_ratio, cfg.gen_schedule))
    m = cfg.gen_pad_multiple
    P = -(-L // m) * m
    return prompt + [st.image_gen_start] + [st.image_gen_pad] * P + [st.image_gen_end] + tail


def pad_batch(rows: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of rows padded to the longest."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def random_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1
