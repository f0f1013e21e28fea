"""Shapes evaluation suites: held-out sizes, determinism, and an oracle engine scoring 1.0 (the suites judge what
they should), a wrong oracle scoring 0."""

from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import pytest
import torch

from vargpt.data.shapes import parse_edit, parse_gen_prompt, render, scene_for_prompt
from vargpt.data.shapes.grammar import answer_question, apply_edit, caption
from vargpt.data.shapes.world import Obj, Scene
from vargpt.engine import Engine
from vargpt.eval.shapes import editing_items, generation_items, read_caption, run_suite, understanding_items
from vargpt.processing.processor import Processor
from vargpt.processing.tokenizer import char_tokenizer

from .helpers import tiny_model


def test_held_out_suites_have_the_contract_sizes_and_are_fixed() -> None:
    gen, und, edi = generation_items(), understanding_items(), editing_items()
    assert len(gen) == 1600 and {g["category"] for g in gen} == {g["category"] for g in gen[:: 200]}
    assert len(und) >= 1000 and len(edi) >= 500
    assert [g["prompt"] for g in generation_items()] == [g["prompt"] for g in gen]
    assert [u["question"] for u in understanding_items()] == [u["question"] for u in und]


def _user_text(engine: Engine, ids: list[int]) -> str:
    text = engine.processor.decode(ids)
    image = r"(?:<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>)?"
    return re.search(r"<\|im_start\|>user\n" + image + r"(.*?)<\|im_end\|>", text, re.S).group(1)


@pytest.fixture(scope="module")
def oracle():
    cfg = tiny_model().config
    engine = Engine(tiny_model(), Processor(cfg, char_tokenizer(cfg.special_tokens, cfg.text.vocab_size)))
    edits = editing_items()
    scenes = {it["question"] + str(it["index"]): it for it in understanding_items()}

    def generate_images(encs, params, seeds=None, **kw):
        out = []
        for enc in encs:
            text = _user_text(engine, enc.input_ids)
            if enc.pixel_values is not None:  # an edit: apply it to the source scene shown
                it = next(it for it in edits if it["instruction"] == text and torch.equal(
                    enc.pixel_values, engine.processor.encode([{"role": "user", "content": [
                        {"type": "image", "image": render(it["scene"])}]}]).pixel_values))
                out.append(SimpleNamespace(image=render(apply_edit(it["scene"], parse_edit(text)))))
            else:
                out.append(SimpleNamespace(image=render(scene_for_prompt(random.Random(0), parse_gen_prompt(text)))))
        return out

    def generate_text(encs, params, seeds=None):
        # answer from the rendered image itself (read back), as a perfect model would
        answers = []
        st = engine.config.special_tokens
        for enc in encs:
            q = _user_text(engine, enc.input_ids)
            if q in {it["instruction"] for it in edits}:  # an edit's reply: the edited scene, then the image
                assert st.image_gen_start in params.stop_token_ids
                it = next(it for it in edits if it["instruction"] == q and torch.equal(
                    enc.pixel_values, engine.processor.encode([{"role": "user", "content": [
                        {"type": "image", "image": render(it["scene"])}]}]).pixel_values))
                answers.append(engine.processor.encode_text(f"Here is {caption(it['target'])}.") +
                               [st.image_gen_start])
                continue
            scene = next(it["scene"] for k, it in scenes.items() if it["question"] == q and
                         torch.equal(enc.pixel_values, engine.processor.encode(
                             [{"role": "user", "content": [{"type": "image", "image": render(it["scene"])},
                                                           {"type": "text", "text": q}]}]).pixel_values))
            answers.append(engine.processor.encode_text(answer_question(q, scene)))
        return answers

    engine.generate_images = generate_images
    engine.generate_text = generate_text
    return engine


@pytest.mark.parametrize("suite", ["generation", "understanding", "editing"])
def test_an_oracle_scores_one(oracle, suite, tmp_path) -> None:
    result = run_suite(oracle, suite, limit=4, out_dir=tmp_path)
    assert result.scores["overall"] == 1.0 and all(v == 1.0 for v in result.scores.values())
    assert (tmp_path / f"{suite}.json").is_file() and (tmp_path / f"{suite}_grid.png").is_file()
    assert "**overall**" in (tmp_path / f"{suite}.md").read_text()
    rows = json.loads((tmp_path / f"{suite}.json").read_text())["items"]
    if suite == "editing":  # what was read back is written for analysis: here the expected scene, caption for caption
        assert all(r["read"] == r["expected"] == caption(it["target"]) and r["source"] == caption(it["scene"])
                   for r, it in zip(rows, result.items, strict=True))
        # the reply the model wrote before its image (here the oracle's: the edited scene)
        assert all(r["reply"] == f"Here is {r['expected']}." for r in rows)
    if suite == "generation":
        assert all(r["read"] == caption(scene_for_prompt(random.Random(0), parse_gen_prompt(r["prompt"])))
                   for r in rows)


def test_read_caption_orders_like_the_caption_and_keeps_what_no_scene_can_hold() -> None:
    scene = Scene((Obj("circle", "red", "small", "bottom right"), Obj("square", "blue", "large", "top")))
    assert read_caption(scene.objects) == caption(scene)
    assert caption(scene) == "a large blue square in the top, a small red circle in the bottom right"
    two_in_a_cell = (Obj("circle", "red", "small", "top"), Obj("circle", "blue", "small", "top"))
    assert read_caption(two_in_a_cell) == "a small blue circle in the top, a small red circle in the top"
    assert read_caption(()) == ""


def test_a_random_model_scores_near_zero_on_generation() -> None:
    cfg = tiny_model().config
    engine = Engine(tiny_model(), Processor(cfg, char_tokenizer(cfg.special_tokens, cfg.text.vocab_size)))
    result = run_suite(engine, "generation", limit=2)
    assert result.scores["overall"] == 0.0
    assert all(it["pass"] is False for it in result.items) and len(result.items) == 16


def test_a_suite_runs_on_given_items_without_changing_them(oracle) -> None:
    items = generation_items(per_category=2, seed=12345)  # e.g. validation prompts for choosing sampling settings
    assert {it["prompt"] for it in items} != {it["prompt"] for it in generation_items(per_category=2)}
    result = run_suite(oracle, "generation", items=items)
    assert [it["prompt"] for it in result.items] == [it["prompt"] for it in items]
    assert result.scores["overall"] == 1.0 and len(result.items) == 16
    assert all("pass" not in it and "image" not in it for it in items)
