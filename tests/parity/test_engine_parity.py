"""The inference engine reproduces the official sampler (``vargpt_sample`` + ``autoregressive_infer_cfg``) through
its public API: greedy understanding ids, and text-to-image with CFG 1 and 3 (per-scale bit logits within
tolerance, sampled bits exact, decoded image within tolerance)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vargpt.engine import Engine
from vargpt.generation.params import ImageParams, TextParams
from vargpt.models.official import read_official_config
from vargpt.processing.processor import EncodedPrompt
from vargpt.processing.tokenizer import char_tokenizer

from .conftest import assert_close_ref, load_case


@pytest.fixture(scope="module")
def engine(fixture_dir: Path) -> Engine:
    cfg, _ = read_official_config(fixture_dir)
    # the fixtures carry no tokenizer files; these tests feed token ids, the tokenizer only has to match the ids
    return Engine.load(fixture_dir, tokenizer=char_tokenizer(cfg.special_tokens, cfg.text.vocab_size))


def test_official_directory_defaults_to_official_compat(engine: Engine) -> None:
    p = engine.resolve(None)
    assert (engine.compat, p.cfg_mode, p.positions) == ("official", "official", "official")


def test_greedy_understanding_ids_match_official(engine: Engine, fixture_dir: Path) -> None:
    case = load_case(fixture_dir, "understanding_generate_greedy")
    ids = case["input.input_ids"][0].tolist()
    ref = case["output.sequences"][0, len(ids):].tolist()
    enc = EncodedPrompt(ids, case["input.pixel_values"], case["input.image_grid_thw"])
    assert engine.generate_text([enc], TextParams(max_new_tokens=len(ref))) == [ref]


@pytest.mark.parametrize("case_name", ["gen_infer_cfg1", "gen_infer_cfg3"])
def test_text_to_image_matches_official(engine: Engine, fixture_dir: Path, case_name: str) -> None:
    info = json.loads((fixture_dir / "cases.json").read_text())[case_name]
    s = info["settings"]
    case = load_case(fixture_dir, case_name)
    prompt = case["input.input_ids"][0].tolist()
    params = ImageParams(cfg_scale=s["cfg"], temperature=s["tau"], top_k=s["top_k"], top_p=s["top_p"],
                         seed=s["seed"], aspect_ratio=s["h_div_w"])
    (img,) = engine.generate_images([EncodedPrompt(prompt)], params, return_tensors=True)

    assert [tuple(hw) for hw in img.schedule] == [(h, w) for _, h, w in info["scale_schedule"]]
    for k, (logits, bits) in enumerate(zip(img.logits, img.bits, strict=True)):
        assert_close_ref(logits.flatten(0, 1), case[f"output.bit_logits_scale{k}"][0], f"bit logits scale {k}")
        assert torch.equal(bits, case[f"output.sampled_bits_scale{k}"][0]), f"sampled bits of scale {k}"
    assert_close_ref(img.decoded, case["output.decoded_image"][0], "decoded image")
    # the PIL image is the rounded decoded image (the official file is truncated and BGR; ours rounds, RGB)
    ref_rgb = ((case["output.decoded_image"][0].permute(1, 2, 0) + 1) / 2 * 255).round().clamp(0, 255)
    diff = np.abs(np.asarray(img.image, dtype=np.int16) - ref_rgb.to(torch.int16).numpy())
    assert diff.max() <= 1 and img.image.mode == "RGB"

    # the official sequences: prompt, <|image_gen_start|>, then one argmax token that is never fed back
    seq = case["output.sequences"][0].tolist()
    start = engine.config.special_tokens.image_gen_start
    assert seq[: len(prompt) + 1] == prompt + [start]
    _, last_hidden = engine.prefill([EncodedPrompt(prompt + [start])])
    assert int(engine.model.backbone.lm_head(last_hidden).argmax(-1)) == seq[len(prompt) + 1]
