"""Multi-scale binary spherical quantisation (BSQ) and bitwise self-correction (SPEC.md §1.3 step 3, §2.8, §2.11).

Pure functions, no parameters. BSQ (https://arxiv.org/abs/2406.07548) per latent location: L2-normalise the
d-dim vector, keep its signs. bit = 1 iff the value is > 0 (an exact 0 counts as -1); code = (2 bit - 1) / sqrt(d),
so every code vector has unit norm.

Layouts (``d`` = codebook dim = latent channels; ``H, W`` = full latent grid = the last scale of the schedule;
``h, w`` = the grid of one scale; ``l = h * w``; ``L`` = sum of l over the schedule):

* spatial tensors are channel-first: ``f_BdHW`` (raw latent), ``codes_Bdhw``, ``summed_BdHW``;
* **bits of one scale are ``bits_Bld``: (B, h*w, d) int64 in {0, 1}, tokens in row-major (h, w) order** -- the
  layout the visual decoder reads (labels, sampled bits). Lists over scales carry the prefix ``ms_``; concatenating
  ``ms_bits_Bld`` along dim 1 gives ``bits_BLd`` (the official ``bit_indices_concat`` / ``gt_BL_bits``).

Resizes go through the 5-D view (B, d, 1, h, w) with ``F.interpolate``, exactly as the official code does (area to
go down, trilinear to go up or to resize the running sum), so that bits are reproduced exactly.

Worked example, schedule ((1, 1), (2, 2), (4, 4)), f (B, d, 4, 4):

* ``multiscale_encode``: scale 0 quantises area(f -> 1x1), scale 1 area(f - up(q0) -> 2x2), scale 2 the full-size
  residual; bits (B, 1, d), (B, 4, d), (B, 16, d); L = 21.
* ``bsc_teacher_forcing``: the same labels when nothing is flipped, plus decoder inputs for scales 1 and 2:
  trilinear(A -> 2x2) and trilinear(A -> 4x4) of the running sum A, i.e. (B, 4 + 16, d) = (B, L - 1, d).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bsq_quantize",
    "bits_to_codes",
    "codes_to_bits",
    "multiscale_encode",
    "decode_bits",
    "next_scale_input",
    "accumulate_codes",
    "bsc_teacher_forcing",
    "BSCResult",
    "BitFlips",
    "NoFlips",
    "RandomBitFlips",
    "RecordedFlips",
]

HW = tuple[int, int]


def _resize(x_Bdhw: Tensor, hw: Sequence[int], mode: str) -> Tensor:
    """``F.interpolate`` of (B, d, h, w) to (B, d, *hw) through the official 5-D view (B, d, 1, h, w).

    ``area`` on 5-D is adaptive_avg_pool3d and ``trilinear`` adds a unit-weight time axis; the 4-D variants are
    mathematically equal but may round differently, so we keep the official call.
    """
    h, w = hw
    return F.interpolate(x_Bdhw.unsqueeze(2), size=(1, h, w), mode=mode).squeeze(2)


def _code_scale(d: int) -> float:
    # 1 / sqrt(d) in double precision, rounded once to the tensor dtype (official q_scale = 1. / d ** 0.5)
    return 1.0 / (d**0.5)


def bits_to_codes(bits_Bld: Tensor, hw: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """BSQ codes of one scale's bits.

    Args:
        bits_Bld: (B, h*w, d) integer or bool in {0, 1}, row-major tokens.
        hw: the scale's grid (h, w).
        dtype: floating dtype of the result.

    Returns:
        codes_Bdhw: (B, d, h, w), entries +-1/sqrt(d).
    """
    B, l, d = bits_Bld.shape
    h, w = hw
    if l != h * w:
        raise ValueError(f"bits have {l} tokens, expected h*w = {h}*{w}")
    signs_Bld = bits_Bld.to(dtype) * 2 - 1
    codes_Bld = signs_Bld * _code_scale(d)
    return codes_Bld.transpose(1, 2).reshape(B, d, h, w)


def codes_to_bits(codes_Bdhw: Tensor) -> Tensor:
    """Bits of BSQ codes (or of any latent: the sign is all that counts). (B, d, h, w) -> bits_Bld (B, h*w, d) int64."""
    B, d = codes_Bdhw.shape[:2]
    return (codes_Bdhw > 0).reshape(B, d, -1).transpose(1, 2).long().contiguous()


def bsq_quantize(x_Bdhw: Tensor) -> tuple[Tensor, Tensor]:
    """Binary spherical quantisation of every location.

    Args:
        x_Bdhw: (B, d, h, w) float.

    Returns:
        codes_Bdhw: (B, d, h, w) in x's dtype, +-1/sqrt(d) (unit norm per location).
        bits_Bld: (B, h*w, d) int64, 1 iff the normalised value is > 0.
    """
    # Normalise first, as the official code does: the sign is unchanged, except that a vector of norm 0 (and
    # values that underflow after the division) gives all-0 bits.
    xn_Bdhw = F.normalize(x_Bdhw, dim=1, eps=1e-12)
    bits_Bld = codes_to_bits(xn_Bdhw)
    return bits_to_codes(bits_Bld, x_Bdhw.shape[2:], x_Bdhw.dtype), bits_Bld


def _check_schedule(f_BdHW: Tensor, schedule: Sequence[HW]) -> tuple[int, int]:
    if f_BdHW.dim() != 4:
        raise ValueError(f"expected a (B, d, H, W) latent, got shape {tuple(f_BdHW.shape)}")
    if len(schedule) == 0:
        raise ValueError("empty scale schedule")
    HW_full = (int(f_BdHW.shape[2]), int(f_BdHW.shape[3]))
    if tuple(schedule[-1]) != HW_full:
        raise ValueError(f"last scale {tuple(schedule[-1])} must equal the latent grid {HW_full}")
    return HW_full


def multiscale_encode(f_BdHW: Tensor, schedule: Sequence[HW]) -> tuple[list[Tensor], Tensor]:
    """MultiScaleBSQ: residual quantisation of a raw latent over a scale schedule.

    Per scale (h, w): area-downsample the residual (full size: as is), BSQ-quantise, trilinear-upsample the codes to
    full size, subtract them from the residual and add them to the sum.

    Args:
        f_BdHW: (B, d, H, W) raw encoder output; (H, W) must be the last scale.
        schedule: ((h_0, w_0), ..., (H, W)).

    Returns:
        ms_bits_Bld: per scale (B, h*w, d) int64.
        summed_BdHW: (B, d, H, W) float32, sum of the upsampled codes (the quantised latent to decode).
    """
    HW_full = _check_schedule(f_BdHW, schedule)
    residual_BdHW = f_BdHW.float().contiguous()
    summed_BdHW = torch.zeros_like(residual_BdHW)
    ms_bits_Bld = []
    for hw in schedule:
        full = tuple(hw) == HW_full
        x_Bdhw = residual_BdHW if full else _resize(residual_BdHW, hw, "area")
        codes_Bdhw, bits_Bld = bsq_quantize(x_Bdhw)
        ms_bits_Bld.append(bits_Bld)
        up_BdHW = codes_Bdhw if full else _resize(codes_Bdhw, HW_full, "trilinear")
        residual_BdHW = residual_BdHW - up_BdHW
        summed_BdHW = summed_BdHW + up_BdHW
    return ms_bits_Bld, summed_BdHW


def decode_bits(ms_bits_Bld: Sequence[Tensor], schedule: Sequence[HW]) -> Tensor:
    """Sum over scales of the trilinear-upsampled codes of each scale's bits.

    Args:
        ms_bits_Bld: per scale (B, h*w, d) in {0, 1}, one entry per scale of ``schedule``.
        schedule: ((h_0, w_0), ..., (H, W)).

    Returns:
        summed_BdHW: (B, d, H, W) float32, the latent to ``BSQVAE.decode``.
    """
    if len(ms_bits_Bld) != len(schedule):
        raise ValueError(f"{len(ms_bits_Bld)} bit tensors for a schedule of {len(schedule)} scales")
    HW_full = tuple(schedule[-1])
    summed_BdHW = None
    for bits_Bld, hw in zip(ms_bits_Bld, schedule, strict=True):
        codes_Bdhw = bits_to_codes(bits_Bld, hw)
        up_BdHW = codes_Bdhw if tuple(hw) == HW_full else _resize(codes_Bdhw, HW_full, "trilinear")
        summed_BdHW = up_BdHW if summed_BdHW is None else summed_BdHW + up_BdHW
    return summed_BdHW


def accumulate_codes(summed_BdHW: Tensor, bits_Bld: Tensor, hw: Sequence[int]) -> Tensor:
    """``summed_BdHW`` plus the codes of one scale's bits upsampled (trilinear) to the full grid; the inference
    step of ``decode_bits`` (summing scale by scale gives the same result as ``decode_bits``)."""
    HW_full = tuple(summed_BdHW.shape[-2:])
    codes_Bdhw = bits_to_codes(bits_Bld, hw, dtype=summed_BdHW.dtype)
    return summed_BdHW + (codes_Bdhw if tuple(hw) == HW_full else _resize(codes_Bdhw, HW_full, "trilinear"))


def next_scale_input(summed_BdHW: Tensor, hw: Sequence[int]) -> Tensor:
    """Decoder input of a scale: trilinear resize of the running code sum to (h, w), as tokens.

    Args:
        summed_BdHW: (B, d, H, W) running sum of upsampled codes of the previous scales.
        hw: the grid (h, w) of the scale to predict.

    Returns:
        x_Bld: (B, h*w, d), row-major tokens.
    """
    B, d = summed_BdHW.shape[:2]
    x_Bdhw = _resize(summed_BdHW, hw, "trilinear")
    return x_Bdhw.reshape(B, d, -1).transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Bitwise self-correction
# ---------------------------------------------------------------------------------------------------------------


class BitFlips(Protocol):
    """Which bits the teacher-forcing inputs are built from: ``(scale_index, bits_Bld) -> flipped bits_Bld``."""

    def __call__(self, si: int, bits_Bld: Tensor) -> Tensor: ...


class NoFlips:
    """Plain teacher forcing: the inputs are built from the true bits."""

    def __call__(self, si: int, bits_Bld: Tensor) -> Tensor:
        return bits_Bld


class RandomBitFlips:
    """Official BSC noise: per call and per scale p = n / 100 with n uniform in 0..round(100 * max_strength)
    (0..30 for 0.3); every bit flips independently with probability p (one p for the whole batch).

    Randomness comes only from ``generator`` (the global torch RNG when it is None). The flip mask is drawn on the
    generator's device, then moved to the bits' device.
    """

    def __init__(self, max_strength: float = 0.3, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= max_strength <= 1.0:
            raise ValueError(f"max_strength must be in [0, 1], got {max_strength}")
        self.max_percent = round(100 * max_strength)
        self.generator = generator

    def __call__(self, si: int, bits_Bld: Tensor) -> Tensor:
        g = self.generator
        device = g.device if g is not None else bits_Bld.device
        n = int(torch.randint(0, self.max_percent + 1, (1,), generator=g, device=device).item())
        p = n * 0.01  # official: np.random.randint(0, 31) * 0.01
        flip_Bld = torch.rand(bits_Bld.shape, generator=g, device=device) < p
        return torch.where(flip_Bld.to(bits_Bld.device), 1 - bits_Bld, bits_Bld)


class RecordedFlips:
    """Replays flipped bits recorded elsewhere (e.g. the official fixture's ``bsc_flipped_bits_scale{i}``).

    Args:
        ms_flipped_bits: per scale, bits of shape (B, 1, h, w, d), (B, h, w, d) or (B, h*w, d).
    """

    def __init__(self, ms_flipped_bits: Sequence[Tensor]) -> None:
        self.ms_flipped_bits = list(ms_flipped_bits)

    def __call__(self, si: int, bits_Bld: Tensor) -> Tensor:
        rec = self.ms_flipped_bits[si]
        rec_Bld = rec.reshape(rec.shape[0], -1, rec.shape[-1])
        if rec_Bld.shape != bits_Bld.shape:
            raise ValueError(f"scale {si}: recorded bits {tuple(rec.shape)} do not match {tuple(bits_Bld.shape)}")
        return rec_Bld.to(device=bits_Bld.device, dtype=bits_Bld.dtype)


class BSCResult(NamedTuple):
    labels_BLd: Tensor  # (B, L, d) int64: true bits of every scale's residual (against the corrupted running sum)
    inputs_BLd: Tensor  # (B, L - h_0*w_0, d) float32: decoder inputs of scales 1..K-1
    ms_used_bits_Bld: list[Tensor]  # per scale (B, h*w, d) int64: the (possibly flipped) bits the inputs came from


def bsc_teacher_forcing(f_BdHW: Tensor, schedule: Sequence[HW], flips: BitFlips | None = None) -> BSCResult:
    """Labels and decoder inputs for next-scale teacher forcing, with bitwise self-correction (official
    ``BitwiseSelfCorrection.flip_requant``).

    Running full-resolution sum A = 0. For scale k: r = f - A, area-downsampled to (h_k, w_k) except at the last
    scale; y_k = BSQ bits of r (label); codes of ``flips(k, y_k)``; A += trilinear_up(codes -> (H, W)); for k < K-1
    the input of scale k+1 is ``next_scale_input(A, (h_{k+1}, w_{k+1}))``. Because later residuals are taken against
    the corrupted sum, the labels teach the model to correct earlier mistakes.

    Args:
        f_BdHW: (B, d, H, W) raw encoder output; (H, W) must be the last scale.
        schedule: ((h_0, w_0), ..., (H, W)).
        flips: a ``BitFlips``; ``NoFlips()`` when None.

    Returns:
        ``BSCResult(labels_BLd, inputs_BLd, ms_used_bits_Bld)``.
    """
    flips = NoFlips() if flips is None else flips
    HW_full = _check_schedule(f_BdHW, schedule)
    f_BdHW = f_BdHW.float().contiguous()
    B, d = f_BdHW.shape[:2]
    K = len(schedule)
    sum_BdHW = torch.zeros_like(f_BdHW)
    ms_labels_Bld, ms_used_Bld, ms_inputs_Bld = [], [], []
    for k, hw in enumerate(schedule):
        r_BdHW = f_BdHW - sum_BdHW
        r_Bdhw = r_BdHW if k == K - 1 else _resize(r_BdHW, hw, "area")
        _, bits_Bld = bsq_quantize(r_Bdhw)
        ms_labels_Bld.append(bits_Bld)
        used_Bld = flips(k, bits_Bld)
        ms_used_Bld.append(used_Bld)
        codes_Bdhw = bits_to_codes(used_Bld, hw)
        up_BdHW = codes_Bdhw if tuple(hw) == HW_full else _resize(codes_Bdhw, HW_full, "trilinear")
        sum_BdHW = sum_BdHW + up_BdHW
        if k < K - 1:
            ms_inputs_Bld.append(next_scale_input(sum_BdHW, schedule[k + 1]))
    labels_BLd = torch.cat(ms_labels_Bld, dim=1)
    inputs_BLd = torch.cat(ms_inputs_Bld, dim=1) if ms_inputs_Bld else f_BdHW.new_zeros(B, 0, d)
    return BSCResult(labels_BLd, inputs_BLd, ms_used_Bld)
