"""Synthetic models and datasets shared by the training-loop tests and the distributed script (``ddp_train.py``).

* ``MLP`` / ``mlp_dataset``: a deterministic fp32 regression problem (no randomness in the model), for exact
  comparisons between process counts.
* ``gen_dataset`` / ``gen_collate``: a fixed set of generation samples for the tiny VARGPT: prompt = two tokens
  naming a class, target = a 64 px image made of class-dependent colour blocks (so the bits are learnable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tests.unit.helpers import gen_sample, pad_batch, tiny_model
from vargpt.models.vargpt import IGNORE_INDEX

DIM = 8


@dataclass
class Output:
    loss: torch.Tensor  # a dataclass, not a SimpleNamespace: DDP(find_unused_parameters) must find the tensors


class MLP(nn.Module):
    """Frozen input layer -> Linear -> tanh -> Linear; squared error. ``dropout > 0`` adds global-RNG randomness."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.frozen = nn.Linear(DIM, DIM)
        self.frozen.requires_grad_(False)  # DDP and the optimizer must leave it alone
        self.fc1 = nn.Linear(DIM, 32)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(32, 1)

    def forward(self, x, y):
        pred = self.fc2(self.drop(torch.tanh(self.fc1(self.frozen(x)))))
        return Output(loss=((pred - y) ** 2).mean())


def build_mlp(dropout: float = 0.0, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(dropout)


def mlp_dataset(n: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, DIM, generator=g)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g)
    return [(x[i], y[i]) for i in range(n)]


def mlp_collate(items):
    return {"x": torch.stack([a for a, _ in items]), "y": torch.stack([b for _, b in items])}


def class_image(k: int, size: int = 64) -> torch.Tensor:
    """(3, size, size) in [-1, 1]: a 2x2 grid of blocks whose colours depend on the class ``k``."""
    g = torch.Generator().manual_seed(100 + k)
    colours = torch.rand(4, 3, generator=g) * 2 - 1
    img = torch.empty(3, size, size)
    h = size // 2
    for q, (r, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        img[:, r * h:(r + 1) * h, c * h:(c + 1) * h] = colours[q].view(3, 1, 1)
    return img


def gen_dataset(cfg, n: int, num_classes: int = 4) -> list[tuple[list[int], torch.Tensor]]:
    """``n`` (prompt ids, target image) pairs over ``num_classes`` classes."""
    return [([5 + 2 * (i % num_classes), 6 + 2 * (i % num_classes)], class_image(i % num_classes)) for i in range(n)]


def gen_collate(cfg):
    """Collator: prompt + <|image_gen_start|> + slots + <|image_gen_end|> + <|im_end|>, right-padded; labels =
    input ids with padding ignored; ``gen_pixel_values`` stacked."""
    st = cfg.special_tokens

    def collate(items):
        rows = [gen_sample(cfg, prompt, [st.im_end]) for prompt, _ in items]
        ids, mask = pad_batch(rows, st.endoftext)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX),
                "gen_pixel_values": torch.stack([img for _, img in items])}

    return collate


def stage1_model(seed: int = 0):
    """The tiny VARGPT with the stage-1 freeze policy."""
    from vargpt.train.recipes import apply_stage

    model = tiny_model(seed)
    apply_stage(model, "stage1")
    return model
