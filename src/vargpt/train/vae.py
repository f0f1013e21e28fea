"""Training the BSQ visual tokenizer (SPEC.md §2.8; BSQ-ViT https://arxiv.org/abs/2406.07548, Infinity's
``MultiScaleBSQ`` / ``BSQ`` in ``infinity/models/bsq_vae/multiscale_bsq.py``).

Per batch of images x in [-1, 1]:

1. f = encoder(x) (B, d, H, W) -- called directly: ``BSQVAE.encode`` / ``decode`` are inference-only (no grad).
2. Multi-scale residual BSQ over the schedule the model generates with (``schedule_for_latent(H, W)``, e.g.
   (1,1), (2,2), (4,4) for the tiny preset) -- so the tokenizer is trained for the token maps VARGPT predicts, as
   Infinity trains its "dynamic" schedules; ``multiscale=False`` quantises the full grid once (plain BSQ). Per scale
   k: r_k = area-downsampled residual, z_k = r_k / |r_k| (per location), q_k = sign(z_k)/sqrt(d) + z_k - sg(z_k)
   (straight-through estimator: the forward value is the BSQ code, the gradient is that of z_k), the residual loses
   sg(up(q_k)) and the quantised latent gains up(q_k). The forward value equals ``multiscale_encode``'s sum exactly
   in bits (tested); the gradient reaches the encoder through every scale's z_k.
3. x_hat = decoder(quantised latent) (not clamped, so the loss sees out-of-range pixels).

Loss = l1_weight |x_hat - x| + l2_weight (x_hat - x)^2 (means over pixels; pixels away from the background weigh
       1 + foreground_weight)
     + commit_weight mean_k ||z_k - sg(q_k)||^2 (mean over elements)
     + entropy_weight (per_sample_entropy_weight H_sample - codebook_entropy_weight H_codebook) / inv_temperature,

with Infinity's soft, factorised BSQ entropies (mean over scales): per bit j, p_j = sigmoid(-4 inv_temperature
z_j / sqrt(d)) is the soft probability of the code's negative side; H_sample = mean over locations of
sum_j H(p_j) (minimised: confident bits), H_codebook = sum_j H(mean over the batch's locations of p_j)
(maximised: every bit used both ways). Defaults are Infinity's BSQ defaults (commitment 0.25, entropy weight 0.1,
gamma0 = gamma = zeta = 1, inv_temperature 100).

Not included: the perceptual (LPIPS) and adversarial (GAN) losses of the official tokenizer recipe -- LPIPS needs
pretrained VGG weights, which cannot be downloaded here. Plug them in by adding terms to ``VAELoss.forward``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from vargpt.models.vae import BSQVAE, bsq_quantize
from vargpt.models.vargpt import schedule_for_latent
from vargpt.processing.image import from_pil

__all__ = ["VAETrainConfig", "VAELoss", "bsq_quantize_ste", "bsq_entropies", "multiscale_quantize_ste",
           "train_vae", "vae_step_fn"]

log = logging.getLogger(__name__)

HW = tuple[int, int]


@dataclass(kw_only=True)
class VAETrainConfig:
    """Visual-tokenizer training (see the module docstring for the loss)."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine": linear warm-up over 5 % of the steps, then cosine decay to 0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    commit_weight: float = 0.25  # Infinity BSQ commitment_loss_weight
    entropy_weight: float = 0.1  # Infinity BSQ entropy_weight (x zeta = 1)
    per_sample_entropy_weight: float = 1.0  # gamma0
    codebook_entropy_weight: float = 1.0  # gamma
    inv_temperature: float = 100.0
    multiscale: bool = True  # residual BSQ over the generation schedule of the latent grid; False = one scale
    # extra weight of the pixel loss on pixels whose target is not the background colour (0 = plain means). Small
    # objects on a flat background (the Shapes world) otherwise lose their colour: the mean colour is a cheap optimum.
    foreground_weight: float = 0.0
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)  # in [-1, 1]; white
    # the first n steps train a continuous autoencoder (the decoder sees the normalised latents, no sign), so that
    # the encoder lays the information out in the latent's directions before the binary bottleneck is switched on
    continuous_warmup_steps: int = 0
    image_size: int | None = None  # PIL inputs are resized to image_size x image_size (None: used as they are)
    mixed_precision: str = "no"  # or "bf16": forward under bf16 autocast (fp32 weights and optimiser)
    log_every: int = 0  # log every n steps (0 = never)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.inv_temperature <= 0:
            raise ValueError(f"inv_temperature must be > 0, got {self.inv_temperature}")
        self.background = tuple(self.background)
        if self.continuous_warmup_steps < 0:
            raise ValueError(f"continuous_warmup_steps must be >= 0, got {self.continuous_warmup_steps}")
        for name in ("l1_weight", "l2_weight", "commit_weight", "entropy_weight", "max_grad_norm",
                     "foreground_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- quantiser
def bsq_quantize_ste(x_Bdhw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """BSQ with a straight-through gradient.

    Returns:
        q_Bdhw: forward value = ``bsq_quantize(x)`` codes (+-1/sqrt(d)); gradient = that of z.
        z_Bdhw: x normalised per location (unit norm over d), differentiable.
        bits_Bld: (B, h*w, d) int64, identical to ``bsq_quantize``'s.
    """
    z_Bdhw = F.normalize(x_Bdhw, dim=1, eps=1e-12)
    codes_Bdhw, bits_Bld = bsq_quantize(x_Bdhw.detach())
    # codes + (z - sg(z)): the forward value is exactly the codes (z - z == 0), the gradient is z's
    return codes_Bdhw + (z_Bdhw - z_Bdhw.detach()), z_Bdhw, bits_Bld


def bsq_entropies(z_Bdhw: Tensor, inv_temperature: float) -> tuple[Tensor, Tensor]:
    """Infinity's soft BSQ entropies (nats) of normalised latents: (per-sample entropy, codebook entropy).

    Per bit j, p_j = sigmoid(-4 inv_temperature z_j / sqrt(d)). Per-sample entropy = mean over locations of
    sum_j H(p_j); codebook entropy = sum_j H(mean over locations of p_j) (the factorised approximation of the
    entropy of the 2^d-code distribution). Both lie in [0, d ln 2].
    """
    d = z_Bdhw.shape[1]
    p_dN = torch.sigmoid(-4 * inv_temperature * z_Bdhw.float() / math.sqrt(d)).transpose(0, 1).reshape(d, -1)

    def h(p: Tensor) -> Tensor:  # binary entropy, elementwise
        return -(p * torch.log(p + 1e-8) + (1 - p) * torch.log(1 - p + 1e-8))

    per_sample = h(p_dN).sum(0).mean()
    codebook = h(p_dN.mean(1)).sum()
    return per_sample, codebook


def multiscale_quantize_ste(f_BdHW: Tensor, schedule: Sequence[HW], inv_temperature: float = 100.0,
                            hard: bool = True) -> tuple[Tensor, dict[str, Tensor], list[Tensor]]:
    """Multi-scale residual BSQ with straight-through gradients (``multiscale_encode`` plus gradients and losses).

    Args:
        f_BdHW: (B, d, H, W) raw encoder output; (H, W) = the last scale.
        schedule: ((h_0, w_0), ..., (H, W)).
        hard: False = continuous (warm-up): every scale passes its normalised residual z_k instead of the codes
            (the bits returned are still z_k's signs).

    Returns:
        summed_BdHW: the quantised latent (forward value = ``multiscale_encode(f)[1]``), differentiable.
        losses: ``commit`` (mean over scales of mean (z_k - sg(q_k))^2), ``per_sample_entropy``,
            ``codebook_entropy`` (means over scales).
        ms_bits_Bld: per scale (B, h*w, d) int64 (as ``multiscale_encode``).
    """
    HW_full = tuple(f_BdHW.shape[-2:])
    if tuple(schedule[-1]) != HW_full:
        raise ValueError(f"last scale {tuple(schedule[-1])} must equal the latent grid {HW_full}")
    residual_BdHW = f_BdHW.float()
    summed_BdHW = torch.zeros_like(residual_BdHW)
    commits, h_sample, h_book, ms_bits = [], [], [], []
    for hw in schedule:
        full = tuple(hw) == HW_full
        # the same 5-D interpolation calls as the quantiser (area down, trilinear up), so bits match exactly
        x_Bdhw = residual_BdHW if full else F.interpolate(residual_BdHW.unsqueeze(2), size=(1, *hw),
                                                          mode="area").squeeze(2)
        q_Bdhw, z_Bdhw, bits_Bld = bsq_quantize_ste(x_Bdhw)
        if not hard:
            q_Bdhw = z_Bdhw
        up_BdHW = q_Bdhw if full else F.interpolate(q_Bdhw.unsqueeze(2), size=(1, *HW_full),
                                                    mode="trilinear").squeeze(2)
        residual_BdHW = residual_BdHW - up_BdHW.detach()
        summed_BdHW = summed_BdHW + up_BdHW
        commits.append(F.mse_loss(z_Bdhw, q_Bdhw.detach()))
        hs, hb = bsq_entropies(z_Bdhw, inv_temperature)
        h_sample.append(hs)
        h_book.append(hb)
        ms_bits.append(bits_Bld)
    losses = {"commit": torch.stack(commits).mean(), "per_sample_entropy": torch.stack(h_sample).mean(),
              "codebook_entropy": torch.stack(h_book).mean()}
    return summed_BdHW, losses, ms_bits


# --------------------------------------------------------------------------------------------------------- loss
class VAELoss(nn.Module):
    """``BSQVAE`` + its training loss as one module, so that the generic loop (DDP synchronises through
    ``forward``) can train it: ``forward(img_B3HW) -> (loss, metrics)``; metrics are detached scalar tensors."""

    def __init__(self, vae: BSQVAE, config: VAETrainConfig) -> None:
        super().__init__()
        self.vae = vae
        self.config = config
        self.hard = True  # False during ``continuous_warmup_steps`` (set by ``train_vae``)

    def schedule(self, h: int, w: int) -> tuple[HW, ...]:
        return schedule_for_latent(h, w)[0] if self.config.multiscale else ((h, w),)

    def forward(self, img_B3HW: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        f_BdHW = self.vae.encoder(img_B3HW)
        summed_BdHW, q_losses, _ = multiscale_quantize_ste(f_BdHW, self.schedule(*f_BdHW.shape[-2:]),
                                                           cfg.inv_temperature, hard=self.hard)
        recon_B3HW = self.vae.decoder(summed_BdHW.to(f_BdHW.dtype))
        err = recon_B3HW.float() - img_B3HW.float()
        if cfg.foreground_weight:
            bg = img_B3HW.new_tensor(cfg.background).view(1, 3, 1, 1).float()
            fg_B1HW = ((img_B3HW.float() - bg).abs().amax(1, keepdim=True) > 0.1).float()
            w_B1HW = 1 + cfg.foreground_weight * fg_B1HW
            l1, l2 = (w_B1HW * err.abs()).mean(), (w_B1HW * err.pow(2)).mean()
        else:
            l1, l2 = err.abs().mean(), err.pow(2).mean()
        recon = cfg.l1_weight * l1 + cfg.l2_weight * l2
        entropy = (cfg.per_sample_entropy_weight * q_losses["per_sample_entropy"]
                   - cfg.codebook_entropy_weight * q_losses["codebook_entropy"]) / cfg.inv_temperature
        loss = recon + cfg.commit_weight * q_losses["commit"] + cfg.entropy_weight * entropy
        metrics = {"loss": loss, "recon": recon, "l1": l1, "l2": l2, "entropy": entropy, **q_losses}
        return loss, {k: v.detach() for k, v in metrics.items()}


def vae_step_fn(model: nn.Module, batch) -> tuple[Tensor, dict[str, Tensor]]:
    """``step_fn`` for ``vargpt.train.loop.train`` with a ``VAELoss`` model; ``batch`` = (B, 3, H, W) images or a
    dict with ``"images"``."""
    img = batch["images"] if isinstance(batch, dict) else batch
    return model(img)


# ---------------------------------------------------------------------------------------------------- the loop
def _batches(images: Iterable, batch_size: int, image_size: int | None) -> Iterator[Tensor]:
    """(B, 3, H, W) batches from PIL images, (3, H, W) tensors (grouped by ``batch_size``) or (B, 3, H, W)
    tensors (used as they come)."""
    buf: list[Tensor] = []
    for item in images:
        if isinstance(item, Image.Image):
            im = item.convert("RGB")
            if image_size is not None and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
            buf.append(from_pil([im])[0])
        elif isinstance(item, Tensor) and item.dim() == 3:
            buf.append(item)
        elif isinstance(item, Tensor) and item.dim() == 4:
            yield item
            continue
        else:
            raise TypeError(f"expected PIL images or image tensors in [-1, 1], got {type(item).__name__}")
        if len(buf) == batch_size:
            yield torch.stack(buf)
            buf = []
    if buf:
        yield torch.stack(buf)


def train_vae(vae: BSQVAE, images: Iterable, config: VAETrainConfig) -> list[dict[str, float]]:
    """Train ``vae`` in place for ``config.steps`` AdamW steps (single device: the VAE's) and return each step's
    metrics (floats: ``loss``, ``recon``, ``l1``, ``l2``, ``commit``, ``per_sample_entropy``,
    ``codebook_entropy``, ``entropy``, and the ``lr`` of the step).

    ``images``: PIL images, (3, H, W) or (B, 3, H, W) tensors in [-1, 1]. A re-iterable collection (list,
    dataset) is cycled until ``steps``; a one-shot iterator ends training when it runs out. Every batch's latent
    grid must be the last scale of a schedule (``multiscale=True``), e.g. 64 px -> 4x4 for the tiny preset.
    For multi-process runs, wrap ``VAELoss(vae, config)`` in ``vargpt.train.loop.train`` with ``vae_step_fn``.
    """
    module = VAELoss(vae, config).train()
    p = next(vae.parameters())
    device, dtype = p.device, p.dtype
    params = [q for q in vae.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 20)

    def lr_factor(step: int) -> float:  # step = number of optimiser steps taken so far
        if config.lr_schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    history: list[dict[str, float]] = []
    one_shot = iter(images) is images
    bar = tqdm(total=config.steps, desc="tokenizer", dynamic_ncols=True)
    while len(history) < config.steps:
        n_before = len(history)
        for img in _batches(images, config.batch_size, config.image_size):
            module.hard = len(history) >= config.continuous_warmup_steps
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16"):
                loss, metrics = module(img.to(device=device, dtype=dtype))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite VAE loss {float(loss)} at step {len(history) + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            lr = opt.param_groups[0]["lr"]  # the rate this step used
            opt.step()
            sched.step()
            history.append({**{k: float(v) for k, v in metrics.items()}, "lr": lr})
            bar.update(1)
            bar.set_postfix(recon=f"{history[-1]['recon']:.4f}", commit=f"{history[-1]['commit']:.4f}")
            if config.log_every and len(history) % config.log_every == 0:
                log.info("vae step %d: %s", len(history), {k: round(v, 5) for k, v in history[-1].items()})
            if len(history) == config.steps:
                break
        if len(history) == n_before:
            raise ValueError("no images to train on")
        if one_shot and len(history) < config.steps:
            log.warning("train_vae: the image iterator ran out after %d of %d steps", len(history), config.steps)
            break
    bar.close()
    opt.zero_grad(set_to_none=True)  # no last-step gradient left on the VAE once it is trained (and frozen)
    vae.eval()
    return history
