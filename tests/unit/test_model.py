"""The unified model: purity, save/load round trips, official-quirk switches (both ways), invariances."""

from __future__ import annotations

import builtins
import io
import math
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from vargpt.checkpoint import load_checkpoint, save_checkpoint
from vargpt.config import get_preset
from vargpt.models.vargpt import IGNORE_INDEX, VARGPT, scale_loss_weights

from .helpers import gen_sample, pad_batch, random_images, tiny_model


def test_constructor_is_pure(monkeypatch):
    def no_io(*a, **k):
        raise AssertionError("model constructor opened a file")

    def no_seed(*a, **k):
        raise AssertionError("model constructor seeded an RNG")

    cfg = get_preset("tiny")
    monkeypatch.setattr(builtins, "open", no_io)
    monkeypatch.setattr(torch, "manual_seed", no_seed)
    monkeypatch.setattr(torch.random, "manual_seed", no_seed)
    buf = io.StringIO()
    with redirect_stdout(buf):
        VARGPT(cfg)
    assert buf.getvalue() == ""


def test_library_imports_no_training_serving_or_cli():
    code = ("import sys, vargpt, vargpt.models, vargpt.models.vargpt, vargpt.checkpoint, vargpt.models.official;"
            "bad=[m for m in sys.modules if m.split('.')[:2] in (['vargpt','train'],['vargpt','serve'],"
            "['vargpt','cli'],['vargpt','eval'])]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _gen_batch(model, prompts=((5, 6, 7), (8, 9, 10, 11, 12)), tails=((20, 21), (22,)), side="right"):
    cfg = model.config
    rows = [gen_sample(cfg, list(p), list(t)) for p, t in zip(prompts, tails, strict=True)]
    ids, mask = pad_batch(rows, cfg.special_tokens.endoftext, side)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return dict(input_ids=ids, attention_mask=mask, labels=labels,
                gen_pixel_values=random_images(len(rows)))


def test_save_load_round_trip_exact(tmp_path):
    model = tiny_model()
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == model.config
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    b = _gen_batch(model)
    with torch.no_grad():
        o0, o1 = model(**b), loaded(**b)
    assert torch.equal(o0.gen_logits_NLV, o1.gen_logits_NLV) and torch.equal(o0.loss, o1.loss)
    # each tensor in memory of its own, aligned as PyTorch allocates (the file's views are not: the safetensors
    # header puts them at offsets some CPU kernels round differently on), in the stored dtype and in another
    for dtype in (None, torch.bfloat16):
        again = load_checkpoint(tmp_path, dtype=dtype)
        assert all(t.data_ptr() % 64 == 0 for t in [*again.parameters(), *again.buffers()] if t.numel())


def test_text_loss_targets_both_ways():
    model = tiny_model()
    b = _gen_batch(model)
    gen_pad = model.config.special_tokens.image_gen_pad
    with torch.no_grad():
        out = model(**b)
    logits = out.text_logits_BTV[:, :-1]

    def ce(targets):
        t = targets[:, 1:].masked_fill(b["input_ids"][:, 1:] == gen_pad, IGNORE_INDEX)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=IGNORE_INDEX)

    torch.testing.assert_close(out.text_loss, ce(b["labels"]))  # default: dataset labels
    official = replace(model.config, text_loss_targets="input_ids")
    model.config = official
    with torch.no_grad():
        out2 = model(**b)
    torch.testing.assert_close(out2.text_loss, ce(b["input_ids"]))  # official: every id but gen slots (pads too)
    assert not torch.allclose(out.text_loss, out2.text_loss)
    torch.testing.assert_close(out2.loss, out2.text_loss + 3.0 * out2.bit_loss)


def test_text_loss_reduction_sample_weights_each_row_equally():
    model = tiny_model()
    b = _gen_batch(model)  # rows with different numbers of text targets
    gen_pad = model.config.special_tokens.image_gen_pad
    with torch.no_grad():
        token = model(**b)
        model.config = replace(model.config, text_loss_reduction="sample")
        sample = model(**b)
    logits = token.text_logits_BTV[:, :-1]
    t = b["labels"][:, 1:].masked_fill(b["input_ids"][:, 1:] == gen_pad, IGNORE_INDEX)
    rows = [F.cross_entropy(logits[i], t[i], ignore_index=IGNORE_INDEX) for i in range(len(t))]
    counts = [(t[i] != IGNORE_INDEX).sum().item() for i in range(len(t))]
    assert len(set(counts)) > 1
    torch.testing.assert_close(sample.text_loss, torch.stack(rows).mean())
    torch.testing.assert_close(token.text_loss, sum(r * n for r, n in zip(rows, counts, strict=True)) / sum(counts))
    assert not torch.allclose(token.text_loss, sample.text_loss)
    with torch.no_grad():  # a row without targets is left out of the mean, not counted as 0
        b["labels"][1] = IGNORE_INDEX
        torch.testing.assert_close(model(**b).text_loss, rows[0])


def test_gen_pad_multiple_changes_only_text_after_the_image():
    m1 = tiny_model()
    m128 = tiny_model(gen_pad_multiple=128)
    b1, b128 = _gen_batch(m1), _gen_batch(m128)
    assert b128["input_ids"].shape[1] - b1["input_ids"].shape[1] == 128 - 21
    with torch.no_grad():
        o1, o128 = m1(**b1), m128(**b128)
    torch.testing.assert_close(o1.gen_logits_NLV, o128.gen_logits_NLV, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o1.bit_loss, o128.bit_loss)
    with pytest.raises(ValueError, match="image_gen_pad"):
        m128(**b1)


def test_train_positions_both_ways():
    model = tiny_model()
    b = _gen_batch(model)
    ids, mask = b["input_ids"], b["attention_mask"]
    pos_m = model.position_ids(ids, mask, None)
    assert torch.equal(pos_m[0], pos_m[1]) and torch.equal(pos_m[0, 1, :5], torch.arange(5))
    assert int(pos_m[0, 1].max()) == int(mask[1].sum()) - 1  # text-only rows: 0..n-1 over real tokens
    pos_1d = model.position_ids(ids, mask, None, mode="1d")
    assert torch.equal(pos_1d[0, 1], torch.arange(ids.shape[1]))
    with torch.no_grad():
        implicit = model(**b)
        explicit = model(**b, position_ids=pos_m)
        model.config = replace(model.config, train_positions="1d")
        implicit_1d = model(**b)
        explicit_1d = model(**b, position_ids=pos_1d)
    assert torch.equal(implicit.text_logits_BTV, explicit.text_logits_BTV)
    assert torch.equal(implicit_1d.text_logits_BTV, explicit_1d.text_logits_BTV)
    # right padding: real-token positions agree, so real-token outputs agree
    real = mask.bool()
    torch.testing.assert_close(implicit.text_logits_BTV[real], implicit_1d.text_logits_BTV[real])


def test_bit_loss_weighting_both_ways():
    model = tiny_model()
    b = _gen_batch(model)
    with torch.no_grad():
        out = model(**b)
    N, L, d = out.gen_labels_NLd.shape
    ce = F.cross_entropy(out.gen_logits_NLV.view(-1, 2), out.gen_labels_NLd.reshape(-1), reduction="none").view(N, L, d)
    torch.testing.assert_close(out.bit_loss, ce.mean())
    w = scale_loss_weights(out.schedule)
    # (1,1),(2,2),(4,4): sqrt(16/1)=4, sqrt(16/4)=2, 1 -> per-token weights 4, 2x4, 1x16 normalised by 4+8+16
    assert torch.allclose(w[:1], torch.tensor([4 / 28])) and torch.allclose(w[1:5], torch.full((4,), 2 / 28))
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)
    model.config = replace(model.config, bit_loss_weighting="scale")
    with torch.no_grad():
        out2 = model(**b)
    torch.testing.assert_close(out2.bit_loss, (ce.mean(-1) * w).sum(-1).mean())


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_equals_one_by_one(side):
    model = tiny_model()
    b = _gen_batch(model, side=side)
    with torch.no_grad():
        both = model(**b)
        for i in range(2):
            real = b["attention_mask"][i].bool()
            single = dict(input_ids=b["input_ids"][i:i + 1, real], attention_mask=b["attention_mask"][i:i + 1, real],
                          labels=b["labels"][i:i + 1, real], gen_pixel_values=b["gen_pixel_values"][i:i + 1])
            one = model(**single)
            torch.testing.assert_close(both.gen_logits_NLV[i], one.gen_logits_NLV[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(both.text_logits_BTV[i, real], one.text_logits_BTV[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(both.gen_labels_NLd[i], one.gen_labels_NLd[0])


def test_generation_slot_errors_are_clear():
    model = tiny_model()
    b = _gen_batch(model)
    b["input_ids"] = b["input_ids"].clone()
    b["input_ids"][0, 5] = 7  # one <|image_gen_pad|> slot missing
    with pytest.raises(ValueError, match="image_gen"):
        model(**b)
    with pytest.raises(ValueError, match="matches no schedule"):
        model(**dict(_gen_batch(model), gen_pixel_values=random_images(2, size=80)))


def test_non_square_four_scale_generation_forward():
    model = tiny_model(gen_aspect_ratio=0.5, gen_schedule="first-4")
    g = torch.Generator().manual_seed(0)
    b = _gen_batch(model)
    b["gen_pixel_values"] = torch.rand(2, 3, 48, 96, generator=g) * 2 - 1  # latent 3x6 = 4th step of template 0.5
    with torch.no_grad():
        out = model(**b)
        n0 = int(b["attention_mask"][0].sum())
        one = model(input_ids=b["input_ids"][:1, :n0], gen_pixel_values=b["gen_pixel_values"][:1])
    assert out.schedule == ((1, 1), (2, 2), (2, 4), (3, 6))
    assert out.gen_logits_NLV.shape == (2, 1 + 4 + 8 + 18, 32)
    torch.testing.assert_close(out.gen_logits_NLV[0], one.gen_logits_NLV[0], rtol=1e-5, atol=1e-5)


def test_cond_drop_replaces_the_start_vector_by_cfg_uncond_row0():
    model = tiny_model()
    b = _gen_batch(model)
    with torch.no_grad():
        dropped = model(**b, cond_drop_N=torch.tensor([True, False]))
        model.decoder.start_embedding.copy_(model.decoder.uncond_embedding[0])
        swapped = model(**b)
    torch.testing.assert_close(dropped.gen_logits_NLV[0], swapped.gen_logits_NLV[0])
    assert not torch.allclose(dropped.gen_logits_NLV[1], swapped.gen_logits_NLV[1])


def test_training_mode_defaults_to_bitwise_self_correction():
    model = tiny_model()
    b = _gen_batch(model)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        noisy = model(**b, cond_drop_N=torch.tensor([False, False]))
    model.eval()
    with torch.no_grad():
        clean = model(**b)
    assert not torch.equal(noisy.gen_labels_NLd, clean.gen_labels_NLd)  # labels follow the corrupted running sum
    model.config = replace(model.config, bsc_max_strength=0.0)
    model.train()
    with torch.no_grad():
        off = model(**b, cond_drop_N=torch.tensor([False, False]))
    assert torch.equal(off.gen_labels_NLd, clean.gen_labels_NLd)


def _editing_batch(cfg):
    """Two left-padded editing rows (a source image of 56 x 56 / 56 x 84 px, text, a generated image):
    (input_ids, attention_mask, pixel_values, image_grid_thw)."""
    from PIL import Image

    from vargpt.processing.chat import expand_image_pads, preprocess_images

    st = cfg.special_tokens
    g = torch.Generator().manual_seed(0)
    imgs = [Image.fromarray((torch.rand(56, 56 + 28 * i, 3, generator=g) * 255).to(torch.uint8).numpy())
            for i in range(2)]
    pv, grid = preprocess_images(cfg, imgs)
    rows = []
    for i in range(2):
        ids = [5 + i, st.vision_start, st.image_pad, st.vision_end, 9, 10][: 6 - i]
        ids = expand_image_pads(ids, grid[i:i + 1], st.image_pad, cfg.vision.spatial_merge_size)
        rows.append(gen_sample(cfg, ids, [20]))
    ids, mask = pad_batch(rows, st.endoftext, "left")
    return ids, mask, pv, grid


def test_editing_batch_mixed_understanding_and_generation_batched_equals_single():
    """Source image (understanding path) + generated image in one sample; M-RoPE positions around both."""
    model = tiny_model()
    ids, mask, pv, grid = _editing_batch(model.config)
    targets = random_images(2)
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
                     gen_pixel_values=targets)
        n0 = grid[0].prod().item()
        for i, (a, b) in enumerate(((0, n0), (n0, pv.shape[0]))):
            real = mask[i].bool()
            one = model(input_ids=ids[i:i + 1, real], pixel_values=pv[a:b], image_grid_thw=grid[i:i + 1],
                        gen_pixel_values=targets[i:i + 1])
            torch.testing.assert_close(both.gen_logits_NLV[i], one.gen_logits_NLV[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(both.text_logits_BTV[i, real], one.text_logits_BTV[0], rtol=1e-5, atol=1e-5)
    pos = model.position_ids(ids, mask, grid)
    assert not torch.equal(pos[1], pos[2])  # image tokens carry 2-D positions


def test_eager_attention_equals_sdpa_in_the_whole_model():
    """``attn_implementation="eager"`` in the LLM (transformers' eager path) and the decoder gives the SDPA model's
    losses, logits and gradients (left-padded editing batch: understanding image, text and a generated image)."""
    base = tiny_model().eval()
    cfg = base.config
    eager_cfg = replace(cfg, attn_implementation="eager", decoder=replace(cfg.decoder, attn_implementation="eager"))
    eager = VARGPT(eager_cfg).eval()
    eager.load_state_dict(base.state_dict())
    ids, mask, pv, grid = _editing_batch(cfg)
    # no target on a row's first real token: a left-padding position predicts it, and the two implementations
    # leave fully masked rows different (neither is meaningful)
    labels = ids.masked_fill(mask.cumsum(1) <= 1, IGNORE_INDEX)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pv, image_grid_thw=grid,
                 gen_pixel_values=random_images(2))
    outs = []
    for model in (base, eager):
        out = model(**batch)
        out.loss.backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (o0, g0), (o1, g1) = outs
    torch.testing.assert_close(o1.loss, o0.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o1.gen_logits_NLV, o0.gen_logits_NLV, rtol=1e-4, atol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(o1.text_logits_BTV[real], o0.text_logits_BTV[real], rtol=1e-4, atol=1e-5)
    assert g0.keys() == g1.keys() and any(n.startswith("backbone.") for n in g0)
    for n in g0:  # round-off of sums over many terms: relative to the tensor
        assert (g1[n] - g0[n]).abs().max() <= 1e-4 * g0[n].abs().max() + 1e-9, n


def test_run_decoder_false_gives_the_text_loss_and_its_gradients_without_the_decoder():
    """``run_decoder=False`` (the replies' phase, ``text_loss_step``): the same text logits, text loss and gradients
    as the full forward's text loss, in training mode too (the bit flips of the slots' inputs draw as before), and
    nothing of the decoder's blocks and head or of the output projector."""
    from vargpt.train.shapes_phases import text_loss_step

    model = tiny_model()
    b = _gen_batch(model)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        grads = []
        for run_decoder in (True, False):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            out = model(**b, run_decoder=run_decoder)
            out.text_loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            if run_decoder:
                full = out
        assert full.bit_loss is not None and out.bit_loss is None and out.gen_logits_NLV is None
        assert torch.equal(out.text_logits_BTV, full.text_logits_BTV) and torch.equal(out.text_loss, full.text_loss)
        assert torch.equal(out.loss, out.text_loss)
        assert grads[0].keys() == grads[1].keys() and any(n.startswith("backbone.") for n in grads[0])
        assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
        # (the decoder's input side -- word_embed, the start vector -- feeds the LLM's slots: it keeps its gradient)
        assert not any(n.startswith(("decoder.blocks.", "decoder.head", "gen_proj_out.")) for n in grads[1])
    torch.manual_seed(0)
    loss, metrics = text_loss_step(model, b)
    assert torch.equal(loss, full.text_loss) and list(metrics) == ["text_loss"]
