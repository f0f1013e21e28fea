"""The Shapes ViT pre-training (``vargpt.train.shapes_vit``)."""

from __future__ import annotations

import pytest
import torch

from vargpt.config import get_preset
from vargpt.data.shapes import CELLS, Obj, Scene, render
from vargpt.models.vargpt import VARGPT
from vargpt.train.shapes import shapes_processor
from vargpt.train.shapes_vit import MERGED_SIDE, cell_token, pretrain_vit, token_labels

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def proc():
    return shapes_processor(get_preset("shapes"))


@pytest.mark.parametrize("cell", CELLS)
def test_an_objects_token_lies_over_the_object(proc, cell) -> None:
    # the processor orders patches by 2 x 2 merge window, windows row-major: merged token k holds patches 4k..4k+3
    for size in ("small", "large"):
        out = proc.image_processor(images=[render(Scene((Obj("square", "red", size, cell),)))], return_tensors="pt")
        patches = out["pixel_values"].view(MERGED_SIDE ** 2, 4, -1)
        covered = (patches.abs().sum(-1) > 1e-3).any(-1)  # background is 0 after the Shapes normalisation
        assert covered[cell_token(cell)], (cell, size, covered.nonzero().flatten().tolist())
    assert len({cell_token(c) for c in CELLS}) == 9


def test_token_labels() -> None:
    scene = Scene((Obj("triangle", "cyan", "small", "top right"), Obj("circle", "red", "large", "center")))
    lab = token_labels(scene)
    assert lab.shape == (16, 4)
    assert lab[3].tolist() == [6, 2, 0, 2] and lab[10].tolist() == [1, 0, 1, 4]  # cyan=6 triangle=2 small=0 cell 2
    empty = [k for k in range(16) if k not in (3, 10)]
    assert lab[empty, 0].eq(0).all() and lab[empty, 1:].eq(-100).all()


def test_pretrain_vit_trains_only_the_vit_and_is_reproducible(proc) -> None:
    torch.manual_seed(0)
    model = VARGPT(get_preset("shapes"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    val = [Scene((Obj("square", "blue", "large", "left"),))]
    kw = dict(steps=40, batch_size=16, lr=3e-3, n_scenes=256, seed=1, val_scenes=val, progress=False)
    res = pretrain_vit(model, proc, **kw)
    assert sum(res.losses[-5:]) / 5 < 0.6 * res.losses[0]
    assert res.val_exact in (0.0, 1.0)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("backbone.model.visual.") for n in changed)
    again = VARGPT(get_preset("shapes"))
    again.load_state_dict({n: before[n] for n in before})
    assert pretrain_vit(again, proc, **kw).losses == res.losses


def test_stage_2_keeps_a_pretrained_vit_frozen() -> None:
    from vargpt.train.recipes import apply_stage
    from vargpt.train.shapes import SHAPES_STAGES

    model = VARGPT(get_preset("shapes"))
    trained = apply_stage(model, SHAPES_STAGES["stage2_frozen_vit"])
    assert not any(n.startswith("backbone.model.visual.") for n in trained)
    assert any(n.startswith("backbone.model.language_model.") for n in trained)
    assert any(n.startswith("decoder.") for n in trained) and any(n.startswith("gen_proj_in") for n in trained)
    with_vit = apply_stage(model, SHAPES_STAGES["stage2"])  # without pre-training the ViT trains in stage 2
    assert set(with_vit) - set(trained) == {n for n in with_vit if n.startswith("backbone.model.visual.")} != set()
