"""The smoke job (README main command), the reference loops and the sampling primitives."""

from __future__ import annotations

import torch
from PIL import Image
from typer.testing import CliRunner

from vargpt.cli import app
from vargpt.generation.reference import generate_image_uncached
from vargpt.generation.sampling import cfg_combine, filter_top_k_top_p, sample
from vargpt.models.vae import decode_bits
from vargpt.models.vae.schedules import get_schedule

from .helpers import tiny_model


def test_smoke_command_writes_a_reproducible_image(tmp_path):
    runner = CliRunner()
    r1 = runner.invoke(app, ["smoke", "--out", str(tmp_path / "a"), "--max-new-tokens", "4"])
    r2 = runner.invoke(app, ["smoke", "--out", str(tmp_path / "b"), "--max-new-tokens", "4"])
    assert r1.exit_code == 0, r1.output
    assert "answer (random weights)" in r1.output and "image:" in r1.output
    a, b = Image.open(tmp_path / "a" / "image.png"), Image.open(tmp_path / "b" / "image.png")
    assert a.size == (64, 64) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert r1.output.replace(str(tmp_path / "a"), "X") == r2.output.replace(str(tmp_path / "b"), "X")


def test_reference_image_loop_is_consistent_and_seeded():
    model = tiny_model()
    sched = get_schedule(1.0, "first-3")
    prompt = torch.tensor([[241, 5, 6, 7, 242, 241]])
    r1 = generate_image_uncached(model, prompt, sched, generator=torch.Generator().manual_seed(3))
    r2 = generate_image_uncached(model, prompt, sched, generator=torch.Generator().manual_seed(3))
    r3 = generate_image_uncached(model, prompt, sched, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(r1.ms_bits_Bld, r2.ms_bits_Bld, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(r1.ms_bits_Bld, r3.ms_bits_Bld, strict=True))
    assert [b.shape for b in r1.ms_bits_Bld] == [(1, h * w, 16) for h, w in sched]
    torch.testing.assert_close(r1.summed_BdHW, decode_bits(r1.ms_bits_Bld, sched))
    assert r1.image_B3HW.shape == (1, 3, 64, 64) and float(r1.image_B3HW.abs().max()) <= 1.0


def test_top_p_makes_confident_bits_deterministic():
    # minority probability 0.02 <= 1 - 0.97 -> removed; 0.2 -> kept
    p = torch.tensor([[0.98, 0.02], [0.8, 0.2]])
    out = filter_top_k_top_p(p.log(), top_p=0.97)
    assert torch.isinf(out[0, 1]) and torch.isfinite(out[1]).all()
    assert torch.isinf(filter_top_k_top_p(torch.tensor([[1.0, 3.0, 2.0]]), top_k=1)[0, [0, 2]]).all()
    logits = torch.randn(1000, 2)
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(sample(logits, generator=g1), sample(logits, generator=g2))
    torch.testing.assert_close(cfg_combine(torch.tensor(2.0), torch.tensor(1.0), 3.0), torch.tensor(4.0))
