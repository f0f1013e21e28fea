"""Supervised pre-training of the Shapes ViT: the stand-in for Qwen2-VL's pretrained vision encoder.

The official model starts from a pretrained ViT and keeps it frozen (SPEC.md §4.2). The Shapes model has none, and a
ViT trained from scratch only through the LLM's answers learned the world slowly: after the whole stage 2 of run 4,
a linear probe on its merged features read back fewer scenes than on an untrained ViT's (EVAL.md, run 7). This
phase gives the ViT what a pretrained encoder brings: it trains ``backbone.model.visual`` (ViT + merger) with a
throwaway linear head so that each object is written, with its colour, shape, size and cell, into one fixed merged
token -- the token over its cell's centre (``cell_token``) -- and every other token reads "no object". The LLM then
learns to look objects up rather than to see them.

Labels come from the scenes the images are rendered from (the Shapes world's own ground truth); no image of the
held-out evaluation suites is used.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vargpt.data.shapes import CELLS, COLORS, SHAPES, SIZES, Scene, random_scene, render

__all__ = ["MERGED_SIDE", "VitResult", "cell_token", "token_labels", "pretrain_vit"]

#: Merged tokens per side for a 64 px Shapes image shown at 112 px (8 x 8 patches of 14 px, 2 x 2 merge).
MERGED_SIDE = 4
#: Merged-token row / column of each grid row / column: the 16 px token band holding the cell centre (10.7, 32 and
#: 53.3 px: bands 0, 2 and 3).
_BAND = (0, 2, 3)
_COLORS, _SHAPES, _SIZES = list(COLORS), list(SHAPES), list(SIZES)
#: Head outputs per token: no object + 6 colours, 3 shapes, 2 sizes, 9 cells.
_SPLITS = (1 + len(_COLORS), len(_SHAPES), len(_SIZES), len(CELLS))


def cell_token(cell: str) -> int:
    """Index (row-major over the 4 x 4 merged grid) of the merged token that carries the object in ``cell``."""
    row, col = divmod(CELLS.index(cell), 3)
    return _BAND[row] * MERGED_SIDE + _BAND[col]


def token_labels(scene: Scene) -> torch.Tensor:
    """(16, 4) long: per merged token, colour (0 = no object, 1-6), shape, size, cell (-100 where no object)."""
    out = torch.full((MERGED_SIDE ** 2, 4), -100, dtype=torch.long)
    out[:, 0] = 0
    for o in scene.objects:
        out[cell_token(o.cell)] = torch.tensor([1 + _COLORS.index(o.color), _SHAPES.index(o.shape),
                                                _SIZES.index(o.size), CELLS.index(o.cell)])
    return out


def _loss(logits_NTK: torch.Tensor, labels_NT4: torch.Tensor) -> torch.Tensor:
    parts = logits_NTK.float().split(_SPLITS, dim=-1)
    return sum(F.cross_entropy(p.reshape(-1, p.shape[-1]), labels_NT4[..., i].reshape(-1))
               for i, p in enumerate(parts))


@dataclass
class VitResult:
    """``losses``: per step; ``val_exact``: fraction of validation scenes whose 16 tokens all read back right
    (colour or no object, and shape, size and cell where there is an object)."""

    losses: list[float]
    val_exact: float


def _pixels(processor, scenes: Sequence[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 64, D) patches per image and (N, 3) patch grids; every Shapes image has the same 8 x 8 grid."""
    pixels, grids = [], []
    for i in range(0, len(scenes), 512):
        out = processor.image_processor(images=[render(s) for s in scenes[i:i + 512]], return_tensors="pt")
        n = len(out["image_grid_thw"])
        pixels.append(out["pixel_values"].view(n, -1, out["pixel_values"].shape[-1]))
        grids.append(out["image_grid_thw"])
    grid_N3 = torch.cat(grids)
    if not bool((grid_N3 == grid_N3[0]).all()) or int(grid_N3[0].prod()) // 4 != MERGED_SIDE ** 2:
        raise ValueError(f"pretrain_vit expects {MERGED_SIDE} x {MERGED_SIDE} merged tokens per image; the processor "
                         f"gives patch grids {grid_N3.unique(dim=0).tolist()}")
    return torch.cat(pixels), grid_N3


def _logits(visual, head, px_NPD: torch.Tensor, grid_N3: torch.Tensor) -> torch.Tensor:
    device = next(visual.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16):
        feats = visual(px_NPD.reshape(-1, px_NPD.shape[-1]).to(device), grid_thw=grid_N3.to(device)).pooler_output
        return head(feats).float().view(len(px_NPD), MERGED_SIDE ** 2, -1)


def pretrain_vit(model, processor, *, steps: int, batch_size: int = 64, lr: float = 1e-3, n_scenes: int = 20000,
                 seed: int = 0, exclude: Iterable[Scene] = (), val_scenes: Sequence[Scene] = (),
                 progress: bool = True) -> VitResult:
    """Train ``model.backbone.model.visual`` on ``n_scenes`` random scenes (``exclude`` and ``val_scenes`` skipped)
    for ``steps`` AdamW steps of ``batch_size`` images (linear warm-up, cosine decay from ``lr``), then read
    ``val_scenes`` back. Losses: the sum of the four token-level cross-entropies. Only the visual parameters
    change; the head is discarded."""
    visual = model.backbone.model.visual
    device = next(visual.parameters()).device
    rng = random.Random(seed)
    banned = {s.key() for s in exclude} | {s.key() for s in val_scenes}
    scenes: list[Scene] = []
    while len(scenes) < n_scenes:
        s = random_scene(rng)
        if s.key() not in banned:
            scenes.append(s)
    pixels_NPD, grid_N3 = _pixels(processor, scenes)
    labels_NT4 = torch.stack([token_labels(s) for s in scenes])
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(model.config.text.hidden_size, sum(_SPLITS))
    with torch.no_grad():  # seeded like the batches (nn.Linear's own init draws from the global RNG)
        bound = head.in_features ** -0.5
        head.weight.copy_(torch.rand(head.weight.shape, generator=gen) * 2 * bound - bound)
        head.bias.zero_()
    head.to(device)
    visual.train().requires_grad_(True)
    params = list(visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    for _ in tqdm(range(steps), desc="vit", disable=not progress):
        idx = torch.randint(0, n_scenes, (batch_size,), generator=gen)
        loss = _loss(_logits(visual, head, pixels_NPD[idx], grid_N3[idx]), labels_NT4[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    opt.zero_grad(set_to_none=True)  # no last-step gradient left on the ViT (frozen from here on)
    visual.eval()
    return VitResult(losses, _val_exact(visual, head, processor, val_scenes))


@torch.no_grad()
def _val_exact(visual, head, processor, scenes: Sequence[Scene]) -> float:
    if not scenes:
        return float("nan")
    px, grid = _pixels(processor, scenes)
    labels = torch.stack([token_labels(s) for s in scenes])
    ok = []
    for i in range(0, len(scenes), 256):
        parts = _logits(visual, head, px[i:i + 256], grid[i:i + 256]).split(_SPLITS, dim=-1)
        pred = torch.stack([p.argmax(-1) for p in parts], dim=-1).cpu()
        lab = labels[i:i + 256]
        ok.append(((pred == lab) | (lab == -100)).all(-1).all(-1))
    return torch.cat(ok).float().mean().item()
