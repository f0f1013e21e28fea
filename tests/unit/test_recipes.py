"""Freeze policies (SPEC.md §4.2) and recipes (§4.3): exactly the intended parameters train, and stage 1 learns."""

from __future__ import annotations

import json

import pytest
import torch

from tests.dist.synthetic import gen_collate, gen_dataset
from vargpt.models.vae.schedules import get_schedule, pixel_size
from vargpt.models.vargpt import IGNORE_INDEX
from vargpt.train import RECIPES, STAGES, Recipe, Stage, TrainConfig, apply_stage, get_recipe, stage3_schedule, train

from .helpers import gen_sample, pad_batch, random_images, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


# Written out independently of vargpt.train.recipes (SPEC §4.2 table, translated to our module names).
LLM = ("backbone.model.language_model.", "backbone.lm_head.")
PROJ = ("gen_proj_in.", "gen_proj_out.")
EXPECTED = {
    "stage1": lambda n: n.startswith(PROJ) or n == "decoder.start_embedding",
    "stage2": lambda n: n.startswith(LLM),
    "stage3": lambda n: n.startswith(PROJ + ("decoder.",)),
    "edit": lambda n: n.startswith(PROJ + ("decoder.",)),
    "dpo": lambda n: n.startswith(PROJ + ("decoder.",)),
}


def _mixed_batch(model):
    """Row 0: understanding image + question, then a generated image; row 1: text, then a generated image. Right
    padding; labels = input ids with padding ignored; row 0's start vector dropped (condition dropout), row 1's kept,
    so both ``decoder.start_embedding`` and ``decoder.uncond_embedding`` take part."""
    from PIL import Image

    from vargpt.processing.chat import expand_image_pads, preprocess_images

    cfg = model.config
    st = cfg.special_tokens
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(56, 84, 3, generator=g) * 255).to(torch.uint8).numpy())
    pv, grid = preprocess_images(cfg, [img])
    row0 = expand_image_pads([5, st.vision_start, st.image_pad, st.vision_end, 9, 10], grid, st.image_pad,
                             cfg.vision.spatial_merge_size)
    rows = [gen_sample(cfg, row0, [20, st.im_end]), gen_sample(cfg, [7, 8, 9], [21])]
    ids, mask = pad_batch(rows, st.endoftext)
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, IGNORE_INDEX), pixel_values=pv,
                image_grid_thw=grid, gen_pixel_values=random_images(2), cond_drop_N=torch.tensor([True, False]))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_apply_stage_sets_exactly_the_intended_parameters(stage):
    model = tiny_model()
    names = apply_stage(model, stage)
    expected = [n for n, _ in model.named_parameters() if EXPECTED[stage](n)]
    assert names == expected and names
    assert [n for n, p in model.named_parameters() if p.requires_grad] == expected
    assert not any(n.startswith(("backbone.model.visual.", "vae.")) for n in names)  # ViT + VAE: frozen in every stage


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_one_backward_gives_grads_exactly_to_the_trainable_parameters(stage):
    """Train mode (drop-path, bitwise self-correction on, seeded), one forward/backward of a mixed batch: every
    trainable parameter gets a non-zero gradient and every frozen one none. No trainable parameter is exempt:
    ``decoder.uncond_embedding`` (only used under condition dropout) is reached through ``cond_drop_N``, and in stage 1
    the text and bit losses both reach the projectors through the frozen LLM and decoder."""
    model = tiny_model()
    names = set(apply_stage(model, stage))
    model.train()
    torch.manual_seed(0)
    out = model(**_mixed_batch(model))
    assert out.text_loss is not None and out.bit_loss is not None
    out.loss.backward()
    no_grad = sorted(n for n, p in model.named_parameters() if n in names and (p.grad is None or p.grad.norm() == 0))
    leaked = sorted(n for n, p in model.named_parameters() if n not in names and p.grad is not None)
    assert no_grad == [] and leaked == []


def test_stages_never_train_the_vit_encoder_or_the_vae():
    model = tiny_model()
    for bad in ("vae", "backbone.model.visual", "backbone.model.visual.blocks.0"):
        with pytest.raises(ValueError, match="frozen in every stage"):
            apply_stage(model, Stage(name="bad", trainable=("gen_proj_in", bad)))
    # the figure's stage 2 (merger = "understanding projector" trainable) is expressible as a custom stage
    figure = Stage(name="stage2-figure", trainable=STAGES["stage2"].trainable + ("backbone.model.visual.merger",))
    names = apply_stage(model, figure)
    assert any(n.startswith("backbone.model.visual.merger.") for n in names)
    assert not any(n.startswith("backbone.model.visual.blocks.") for n in names)


def test_stage_errors_are_clear():
    model = tiny_model()
    with pytest.raises(KeyError, match="unknown stage 'stage4'"):
        apply_stage(model, "stage4")
    with pytest.raises(ValueError, match=r"\['decoder.typo'\] match no parameter"):
        apply_stage(model, Stage(name="typo", trainable=("decoder.typo",)))
    # a prefix matches whole path components only
    with pytest.raises(ValueError, match="match no parameter"):
        apply_stage(model, Stage(name="partial", trainable=("gen_proj",)))


def test_recipes_carry_the_known_hyper_parameters():
    for r in RECIPES.values():
        t = r.train
        assert (t.lr, t.warmup_ratio, t.max_grad_norm, t.weight_decay) == (5e-5, 0.1, 1.0, 0.0)
        assert (t.batch_size, t.grad_accum, t.mixed_precision) == (1, 2, "bf16")
        assert r.stage in STAGES
    cfg = get_recipe("stage1").train_config(max_steps=7, out_dir="x")
    assert cfg.max_steps == 7 and cfg.lr == 5e-5 and cfg.num_warmup_steps == 1
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_stage3_schedule_alternates_sft_and_dpo_at_256_then_512():
    phases = stage3_schedule()
    assert [(p.name, p.objective, p.stage, p.train.max_steps, p.reference) for p in phases] == [
        ("stage3a", "sft", "stage3", 40_000, None),
        ("stage3b", "dpo", "dpo", 5_000, "stage3a"),
        ("stage3c", "sft", "stage3", 30_000, None),
        ("stage3d", "dpo", "dpo", 3_000, "stage3c"),
    ]
    sizes = [pixel_size(get_schedule(1.0, p.gen_schedule)) for p in phases]
    assert sizes == [(256, 256), (256, 256), (512, 512), (512, 512)]
    model_cfg = phases[2].model_config(tiny_model().config)
    assert model_cfg.gen_schedule == "0.25M"
    assert get_recipe("edit").gen_schedule == "0.25M" and get_recipe("edit").stage == "edit"
    with pytest.raises(ValueError, match="reference"):
        Recipe(name="x", stage="dpo", objective="dpo", gen_schedule="0.06M")
    with pytest.raises(ValueError, match="unknown stage"):
        Recipe(name="x", stage="nope", objective="sft", gen_schedule="0.06M")
    with pytest.raises(KeyError, match="unknown recipe"):
        get_recipe("stage9")


def test_stage1_lowers_the_generation_loss(tmp_path):
    """Stage 1 (projectors + start vector; LLM, decoder, ViT, VAE frozen), tiny model, 8 fixed samples of 4 classes
    (2 prompt tokens -> 64 px image of coloured blocks), batch 4, lr 1e-2, 40 steps, fp32, train-mode randomness on.

    Measured (seeded, deterministic): bit loss 0.838 at step 1 -> 0.657 (mean of the last 5 steps), -22 %; total loss
    8.37 -> 7.39, -12 %; clean eval-mode bit loss on 4 fixed samples 0.820 before -> 0.665 after, below chance (ln 2 =
    0.693). Asserted: bit loss >= 15 % below step 1, total loss >= 8 % below, eval bit loss < 0.68. The text loss
    barely moves by design: with the LLM frozen it trains only through the image slots (SPEC §4.2 notes)."""
    model = tiny_model()
    apply_stage(model, "stage1")
    data, collate = gen_dataset(model.config, 8), gen_collate(model.config)
    fixed = collate(data[:4])

    def clean_bit_loss(m):
        return {"bit_loss": m(**fixed).bit_loss}

    with torch.no_grad():
        before = float(clean_bit_loss(model.eval())["bit_loss"])
    config = get_recipe("stage1").train_config(lr=1e-2, max_steps=40, batch_size=4, grad_accum=1, warmup_steps=2,
                                               mixed_precision="no", out_dir=str(tmp_path), eval_every=40)
    result = train(model, data, collate, config, eval_fn=clean_bit_loss)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    bits = [r["bit_loss"] for r in log]
    assert len(bits) == 40
    assert sum(bits[-5:]) / 5 <= 0.85 * bits[0], bits
    assert sum(result.losses[-5:]) / 5 <= 0.92 * result.losses[0], result.losses
    after = result.evals[-1]["bit_loss"]
    assert after < 0.68 < before, (before, after)
