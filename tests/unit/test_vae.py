"""Unit tests of the BSQ-VAE auto-encoder and the multi-scale BSQ quantiser / bitwise self-correction."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from vargpt.config import ConfigError, VAEConfig
from vargpt.models.vae import (
    BSQVAE,
    NoFlips,
    RandomBitFlips,
    RecordedFlips,
    bits_to_codes,
    bsc_teacher_forcing,
    bsq_quantize,
    codes_to_bits,
    decode_bits,
    multiscale_encode,
    next_scale_input,
)

SQUARE = ((1, 1), (2, 2), (4, 4))
NON_SQUARE = ((1, 1), (2, 2), (4, 3), (8, 6))


def _latent(schedule, B=2, d=8, seed=0) -> torch.Tensor:
    H, W = schedule[-1]
    return torch.randn(B, d, H, W, generator=torch.Generator().manual_seed(seed))


def _up(codes_Bdhw: torch.Tensor, HW) -> torch.Tensor:
    return F.interpolate(codes_Bdhw.unsqueeze(2), size=(1, *HW), mode="trilinear").squeeze(2)


# ------------------------------------------------------------------------------------------------ BSQ basics


def test_bits_codes_round_trip_exact() -> None:
    g = torch.Generator().manual_seed(1)
    bits_Bld = torch.randint(0, 2, (3, 4 * 3, 7), generator=g)
    codes_Bdhw = bits_to_codes(bits_Bld, (4, 3))
    assert codes_Bdhw.shape == (3, 7, 4, 3) and codes_Bdhw.dtype == torch.float32
    assert torch.equal(codes_to_bits(codes_Bdhw), bits_Bld)
    assert torch.equal(bits_to_codes(codes_to_bits(codes_Bdhw), (4, 3)), codes_Bdhw)
    # row-major tokens: token t is location (t // w, t % w)
    assert torch.equal(codes_Bdhw[:, :, 2, 1] > 0, bits_Bld[:, 2 * 3 + 1].bool())


@pytest.mark.parametrize("d", [1, 5, 16, 32])
def test_codes_unit_norm_and_sign(d: int) -> None:
    x_Bdhw = torch.randn(2, d, 3, 5, generator=torch.Generator().manual_seed(d))
    codes_Bdhw, bits_Bld = bsq_quantize(x_Bdhw)
    torch.testing.assert_close(codes_Bdhw.norm(dim=1), torch.ones(2, 3, 5))
    assert torch.equal(codes_Bdhw.abs(), torch.full_like(codes_Bdhw, 1 / math.sqrt(d)))
    assert torch.equal(bits_Bld, codes_to_bits(x_Bdhw))
    assert bits_Bld.dtype == torch.int64 and bits_Bld.shape == (2, 15, d)


def test_zero_counts_as_minus_one() -> None:
    x_Bdhw = torch.tensor([0.0, 1.0, -1.0, 0.0]).view(1, 4, 1, 1)
    codes_Bdhw, bits_Bld = bsq_quantize(x_Bdhw)
    assert bits_Bld.flatten().tolist() == [0, 1, 0, 0]
    assert (codes_Bdhw.flatten() * 2).tolist() == [-1.0, 1.0, -1.0, -1.0]
    _, bits_Bld = bsq_quantize(torch.zeros(1, 4, 2, 2))  # norm 0: all bits 0, no NaN
    assert bits_Bld.sum() == 0


# ------------------------------------------------------------------------------------------------ multi-scale


@pytest.mark.parametrize("schedule", [SQUARE, NON_SQUARE])
@pytest.mark.parametrize("B,d", [(1, 4), (3, 5)])
def test_multiscale_encode_then_decode_bits(schedule, B: int, d: int) -> None:
    f_BdHW = _latent(schedule, B, d)
    ms_bits_Bld, summed_BdHW = multiscale_encode(f_BdHW, schedule)
    assert [tuple(b.shape) for b in ms_bits_Bld] == [(B, h * w, d) for h, w in schedule]
    assert summed_BdHW.shape == f_BdHW.shape
    assert torch.equal(decode_bits(ms_bits_Bld, schedule), summed_BdHW)
    # the quantised latent approximates f better than the coarsest scale alone
    first_BdHW = _up(bits_to_codes(ms_bits_Bld[0], schedule[0]), schedule[-1])
    assert (f_BdHW - summed_BdHW).norm() < (f_BdHW - first_BdHW).norm()


def test_multiscale_encode_first_scale_is_area_mean() -> None:
    f_BdHW = _latent(NON_SQUARE, 2, 6)
    ms_bits_Bld, _ = multiscale_encode(f_BdHW, NON_SQUARE)
    assert torch.equal(ms_bits_Bld[0][:, 0], (f_BdHW.mean(dim=(2, 3)) > 0).long())


def test_schedule_must_end_at_latent_grid() -> None:
    with pytest.raises(ValueError, match="last scale"):
        multiscale_encode(torch.randn(1, 4, 4, 4), ((1, 1), (2, 2)))
    with pytest.raises(ValueError, match="last scale"):
        bsc_teacher_forcing(torch.randn(1, 4, 4, 4), ((1, 1), (4, 3)))


def test_next_scale_input_layout() -> None:
    summed_BdHW = _latent(NON_SQUARE, 2, 3)
    x_Bld = next_scale_input(summed_BdHW, (8, 6))  # same size: identity, tokens row-major
    assert torch.equal(x_Bld, summed_BdHW.flatten(2).transpose(1, 2))
    assert next_scale_input(summed_BdHW, (4, 3)).shape == (2, 12, 3)


# ------------------------------------------------------------------------------------------------ BSC


@pytest.mark.parametrize("schedule", [SQUARE, NON_SQUARE])
def test_bsc_without_flips_matches_multiscale_encode(schedule) -> None:
    B, d = 2, 6
    f_BdHW = _latent(schedule, B, d, seed=3)
    ms_bits_Bld, summed_BdHW = multiscale_encode(f_BdHW, schedule)
    res = bsc_teacher_forcing(f_BdHW, schedule, NoFlips())
    L = sum(h * w for h, w in schedule)
    assert res.labels_BLd.shape == (B, L, d) and res.labels_BLd.dtype == torch.int64
    assert res.inputs_BLd.shape == (B, L - 1, d) and res.inputs_BLd.dtype == torch.float32
    assert torch.equal(res.labels_BLd, torch.cat(ms_bits_Bld, dim=1))
    assert all(torch.equal(u, b) for u, b in zip(res.ms_used_bits_Bld, ms_bits_Bld, strict=True))
    # the input of the last scale is the running sum of all earlier scales, resized to the last grid
    partial_BdHW = sum(_up(bits_to_codes(b, hw), schedule[-1])
                       for b, hw in zip(ms_bits_Bld[:-1], schedule[:-1], strict=True))
    h, w = schedule[-1]
    torch.testing.assert_close(res.inputs_BLd[:, -h * w:], next_scale_input(partial_BdHW, (h, w)))
    # default flips = none
    assert torch.equal(bsc_teacher_forcing(f_BdHW, schedule).labels_BLd, res.labels_BLd)


def test_bsc_with_recorded_flips() -> None:
    schedule, B, d = NON_SQUARE, 2, 5
    f_BdHW = _latent(schedule, B, d, seed=4)
    clean = bsc_teacher_forcing(f_BdHW, schedule)
    flipped0_Bld = 1 - clean.labels_BLd[:, :1]  # flip every bit of scale 0, keep later scales as returned
    rec = [flipped0_Bld.view(B, 1, 1, 1, d)] + [None] * (len(schedule) - 1)

    class FlipFirst(RecordedFlips):
        def __call__(self, si, bits_Bld):
            return super().__call__(si, bits_Bld) if si == 0 else bits_Bld

    res = bsc_teacher_forcing(f_BdHW, schedule, FlipFirst(rec))
    assert torch.equal(res.labels_BLd[:, :1], clean.labels_BLd[:, :1])  # labels are always the true bits
    assert torch.equal(res.ms_used_bits_Bld[0], flipped0_Bld)
    codes0_BdHW = _up(bits_to_codes(flipped0_Bld, (1, 1)), schedule[-1])
    torch.testing.assert_close(res.inputs_BLd[:, :4], next_scale_input(codes0_BdHW, (2, 2)))
    # scale 1 now quantises f - (corrupted sum): labels differ from the clean run
    assert not torch.equal(res.labels_BLd[:, 1:5], clean.labels_BLd[:, 1:5])


def test_recorded_flips_shape_check() -> None:
    flips = RecordedFlips([torch.zeros(1, 1, 2, 2, 3, dtype=torch.int64)])
    assert flips(0, torch.ones(1, 4, 3, dtype=torch.int64)).sum() == 0
    with pytest.raises(ValueError):
        flips(0, torch.ones(1, 4, 5, dtype=torch.int64))


def test_random_bit_flips_reproducible_and_bounded() -> None:
    bits_Bld = torch.zeros(2, 2500, 2, dtype=torch.int64)  # 10,000 bits: the flip fraction is p +- 0.005
    rng_state = torch.get_rng_state()
    a = RandomBitFlips(0.3, torch.Generator().manual_seed(7))
    b = RandomBitFlips(0.3, torch.Generator().manual_seed(7))
    c = RandomBitFlips(0.3, torch.Generator().manual_seed(8))
    outs_a = [a(si % 3, bits_Bld) for si in range(150)]
    outs_b = [b(si % 3, bits_Bld) for si in range(150)]
    outs_c = [c(si % 3, bits_Bld) for si in range(150)]
    assert torch.equal(torch.get_rng_state(), rng_state)  # only the given generator is used
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(outs_a, outs_c, strict=True))
    rates = torch.tensor([o.float().mean().item() for o in outs_a])
    assert rates.max() <= 0.3 + 0.03  # p never exceeds 0.30
    assert rates.max() >= 0.25 and rates.min() <= 0.03  # p spans 0 .. 0.30
    assert abs(rates.mean().item() - 0.15) < 0.03  # uniform over {0, 0.01, ..., 0.30}
    assert all(set(o.unique().tolist()) <= {0, 1} and o.dtype == torch.int64 for o in outs_a)
    # flipping is an involution on the chosen mask: flipped ones become zeros
    ones = RandomBitFlips(0.3, torch.Generator().manual_seed(7))(0, 1 - bits_Bld)
    assert torch.equal(ones, 1 - outs_a[0])


def test_random_bit_flips_in_bsc() -> None:
    schedule = NON_SQUARE
    f_BdHW = _latent(schedule, 2, 8, seed=5)
    r1 = bsc_teacher_forcing(f_BdHW, schedule, RandomBitFlips(0.3, torch.Generator().manual_seed(0)))
    r2 = bsc_teacher_forcing(f_BdHW, schedule, RandomBitFlips(0.3, torch.Generator().manual_seed(0)))
    assert torch.equal(r1.labels_BLd, r2.labels_BLd) and torch.equal(r1.inputs_BLd, r2.inputs_BLd)
    assert r1.inputs_BLd.shape == (2, sum(h * w for h, w in schedule) - 1, 8)


# ------------------------------------------------------------------------------------------------ auto-encoder


def _tiny_cfg(d: int = 8) -> VAEConfig:
    # level 1 doubles the width (nin_shortcut in encoder and decoder); 3 levels -> stride 4
    return VAEConfig(codebook_dim=d, base_channels=24, encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2],
                     num_res_blocks=1)


def _expected_keys(cfg: VAEConfig) -> set[str]:
    """The state-dict keys listed by the design (official keys minus prefix and wrapper segment)."""
    ch, E, D, n = cfg.base_channels, cfg.encoder_ch_mult, cfg.decoder_ch_mult, cfg.num_res_blocks

    def res(prefix: str, c_in: int, c_out: int) -> list[str]:
        names = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if c_in != c_out else [])
        return [f"{prefix}.{m}" for m in names]

    mods = ["encoder.conv_in", "encoder.norm_out", "encoder.conv_out", "decoder.conv_in", "decoder.norm_out",
            "decoder.conv_out"]
    in_mult = (1, *E)
    for i in range(len(E)):
        for j in range(n):
            mods += res(f"encoder.down.{i}.block.{j}", ch * (in_mult[i] if j == 0 else E[i]), ch * E[i])
        if i < len(E) - 1:
            mods.append(f"encoder.down.{i}.downsample.conv")
    block_in = ch * D[-1]
    for part in ("encoder", "decoder"):
        mods += res(f"{part}.mid.block_1", 1, 1) + res(f"{part}.mid.block_2", 1, 1)
    for i in reversed(range(len(D))):
        for j in range(n + 1):
            mods += res(f"decoder.up.{i}.block.{j}", block_in, ch * D[i])
            block_in = ch * D[i]
        if i != 0:
            mods.append(f"decoder.up.{i}.upsample.conv")
    return {f"{m}.{p}" for m in mods for p in ("weight", "bias")}


def test_state_dict_keys() -> None:
    cfg = _tiny_cfg()
    sd = BSQVAE(cfg).state_dict()
    assert set(sd) == _expected_keys(cfg)
    assert sd["encoder.down.1.block.0.nin_shortcut.weight"].shape == (48, 24, 1, 1)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (24, 48, 1, 1)
    assert sd["encoder.conv_out.weight"].shape == (8, 48, 3, 3)
    assert sd["decoder.conv_in.weight"].shape == (48, 8, 3, 3)
    assert sd["decoder.conv_out.weight"].shape == (3, 24, 3, 3)
    gn = BSQVAE(cfg).encoder.norm_out
    assert (gn.num_groups, gn.eps) == (24, 1e-6)  # 48 is not a multiple of 32


@pytest.fixture(scope="module")
def tiny_vae() -> BSQVAE:
    torch.manual_seed(0)
    return BSQVAE(_tiny_cfg()).eval()


def test_encode_decode_shapes_and_clamp(tiny_vae: BSQVAE) -> None:
    img_B3HW = torch.rand(2, 3, 16, 12) * 2 - 1
    f_BdHW = tiny_vae.encode(img_B3HW)
    assert f_BdHW.shape == (2, 8, 4, 3) and f_BdHW.dtype == torch.float32
    img_out = tiny_vae.decode(100 * f_BdHW)
    assert img_out.shape == (2, 3, 16, 12)
    assert img_out.min() >= -1 and img_out.max() <= 1 and (img_out.abs() == 1).any()


def test_batched_encode_equals_one_by_one(tiny_vae: BSQVAE) -> None:
    img_B3HW = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    batched = tiny_vae.encode(img_B3HW)
    single = torch.cat([tiny_vae.encode(img_B3HW[i:i + 1]) for i in range(3)])
    # conv kernels may block the batch differently: equal up to float rounding
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_encode_runs_in_fp32_for_bf16_weights(tiny_vae: BSQVAE) -> None:
    vae_bf16 = BSQVAE(tiny_vae.cfg).eval()
    vae_bf16.load_state_dict(tiny_vae.state_dict())
    vae_bf16.to(torch.bfloat16)
    vae_ref = BSQVAE(tiny_vae.cfg).eval()  # the same (rounded) weights, held in fp32
    vae_ref.load_state_dict({k: v.float() for k, v in vae_bf16.state_dict().items()})
    img_B3HW = torch.rand(1, 3, 8, 8, dtype=torch.bfloat16) * 2 - 1
    f_BdHW = vae_bf16.encode(img_B3HW)
    assert f_BdHW.dtype == torch.float32
    assert torch.equal(f_BdHW, vae_ref.encode(img_B3HW.float()))
    assert vae_bf16.encoder.conv_in.weight.dtype == torch.bfloat16  # the module itself is untouched


def test_replicate_padding_is_position_invariant_on_a_constant_image() -> None:
    torch.manual_seed(0)
    replicate = BSQVAE(dataclasses.replace(_tiny_cfg(), padding_mode="replicate")).eval()
    zeros = BSQVAE(_tiny_cfg()).eval()
    zeros.load_state_dict(replicate.state_dict())  # same weights: the mode is not a parameter
    white = torch.ones(1, 3, 16, 16)
    f_rep, f_zero = replicate.encode(white), zeros.encode(white)
    # replicate: one latent at every position, exactly; zeros: the border shows in every position of a small grid
    assert torch.equal(f_rep, f_rep[..., :1, :1].expand_as(f_rep))
    assert (f_zero - f_zero[..., :1, :1]).abs().max() > 1e-2
    code = torch.randn(1, 8, 1, 1).expand(1, 8, 4, 4)
    img = replicate.decode(code)
    assert torch.equal(img, img[..., :1, :1].expand_as(img))
    # a non-constant image: replicate and zeros differ only through the border
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert not torch.allclose(replicate.encode(x), zeros.encode(x))
    with pytest.raises(ConfigError, match="VAEConfig.padding_mode"):
        dataclasses.replace(_tiny_cfg(), padding_mode="reflect")
