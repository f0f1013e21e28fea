"""Parity of the BSQ-VAE and the multi-scale quantiser with the official VARGPT-v1.1 code.

Cases: ``vae`` (encode, multi-scale bits, decode of z and of bits) and the VAE part of ``gen_train`` /
``gen_train_bsc`` (teacher-forcing labels and decoder inputs, without and with recorded bit flips).
Bits are compared exactly, floats with the fixture tolerance. The official checkpoint is loaded only through the
production adapter (``vargpt.checkpoint.load_official``); the VAE is ``model.vae``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vargpt.checkpoint import load_official
from vargpt.models.vae import NoFlips, RecordedFlips, bsc_teacher_forcing, decode_bits, multiscale_encode
from vargpt.models.vargpt import VARGPT

from .conftest import assert_close_ref, load_case


def _schedule(fixture_dir: Path) -> list[tuple[int, int]]:
    gen = json.loads((fixture_dir / "config.json").read_text())["generation"]
    # entries are (t, h, w) with t = 1 for images
    return [(h, w) for _, h, w in gen["scale_schedule_used_for_images"]]


@pytest.fixture(scope="module")
def model(fixture_dir: Path) -> VARGPT:
    return load_official(fixture_dir)[0].eval()


@pytest.fixture(autouse=True)
def _one_thread():
    # the fixtures were produced with one thread; keep the same reduction orders where it is cheap to do so
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_vae_case(fixture_dir: Path, model: VARGPT) -> None:
    vae = model.vae
    case = load_case(fixture_dir, "vae")
    schedule = _schedule(fixture_dir)

    f_BdHW = vae.encode(case["input.image"])
    assert f_BdHW.dtype == torch.float32
    assert_close_ref(f_BdHW, case["output.raw_features"], "raw_features")

    ms_bits_Bld, z_BdHW = multiscale_encode(f_BdHW, schedule)
    for si, bits_Bld in enumerate(ms_bits_Bld):
        ref = case[f"output.bit_indices_scale{si}"]  # (B, 1, h, w, d)
        assert torch.equal(bits_Bld, ref.reshape(bits_Bld.shape).long()), f"bits of scale {si}"
    assert torch.equal(torch.cat(ms_bits_Bld, dim=1), case["output.bit_indices_concat"].long())
    assert_close_ref(z_BdHW, case["output.z_quantized_sum"], "z_quantized_sum")
    assert_close_ref(vae.decode(z_BdHW), case["output.recon_from_z"], "recon_from_z")

    ref_bits = [case[f"output.bit_indices_scale{si}"] for si in range(len(schedule))]
    B, d = f_BdHW.shape[0], model.config.vae.codebook_dim
    summed_BdHW = decode_bits([b.reshape(B, -1, d) for b in ref_bits], schedule)
    assert_close_ref(summed_BdHW, case["output.summed_codes_from_bits"].squeeze(2), "summed_codes_from_bits")
    assert_close_ref(vae.decode(summed_BdHW), case["output.recon_from_bits"], "recon_from_bits")


@pytest.mark.parametrize("case_name", ["gen_train", "gen_train_bsc"])
def test_teacher_forcing_case(fixture_dir: Path, model: VARGPT, case_name: str) -> None:
    case = load_case(fixture_dir, case_name)
    schedule = _schedule(fixture_dir)
    f_BdHW = model.vae.encode(case["input.pixel_gen_values"])
    if case_name == "gen_train_bsc":
        recorded = [case[f"intermediate.bsc_flipped_bits_scale{si}"] for si in range(len(schedule))]
        flips = RecordedFlips(recorded)
    else:
        recorded, flips = None, NoFlips()
    res = bsc_teacher_forcing(f_BdHW, schedule, flips)
    assert torch.equal(res.labels_BLd, case["intermediate.gt_BL_bits"].long()), "labels (gt_BL_bits)"
    assert_close_ref(res.inputs_BLd, case["intermediate.x_BLC_wo_prefix"], "x_BLC_wo_prefix")
    if recorded is not None:
        for used_Bld, rec in zip(res.ms_used_bits_Bld, recorded, strict=True):
            assert torch.equal(used_Bld, rec.reshape(used_Bld.shape).long())
