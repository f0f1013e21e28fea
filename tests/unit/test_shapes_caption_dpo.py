"""The DPO rounds after the editing SFT, on caption prompts (``ShapesRunConfig.edit_dpo_prompts``) and on edits
(``edit_dpo_edits``): their reward, their teacher, where their prompts come from, and the settings' checks."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vargpt.data.shapes.grammar import caption, parse_caption
from vargpt.data.shapes.scorer import read_image
from vargpt.data.shapes.world import Obj, Scene, render
from vargpt.train.shapes import ShapesRunConfig, caption_prompts, caption_reward, caption_teacher
from vargpt.train.shapes_rewards import edit_prompts

TWO = Scene((Obj(shape="triangle", color="red", size="large", cell="top left", jitter=(0, 0)),
             Obj(shape="circle", color="blue", size="small", cell="bottom right", jitter=(0, 0))))


def test_the_teacher_draws_the_captioned_scene_without_jitter() -> None:
    text = caption(TWO)
    assert text == "a large red triangle in the top left, a small blue circle in the bottom right"
    img = caption_teacher(text)
    assert img.tobytes() == render(TWO).tobytes()  # the caption record's own image, pixel for pixel
    assert {(o.shape, o.color, o.size, o.cell) for o in read_image(img)} == parse_caption(text)


def test_the_reward_is_one_for_the_scene_plus_half_the_share_of_objects_drawn_as_named() -> None:
    text = caption(TWO)
    assert caption_reward(text, caption_teacher(text)) == 1.5
    assert caption_reward(text, Image.new("RGB", (64, 64), "white")) == 0.0
    # the triangle drawn as a circle (the failure the round targets): one object of two right, no pass
    wrong = Scene((Obj(shape="circle", color="red", size="large", cell="top left", jitter=(0, 0)), TWO.objects[1]))
    assert caption_reward(text, render(wrong)) == 0.25
    # an extra object: both named objects right, but not the scene
    extra = Scene((*TWO.objects, Obj(shape="square", color="green", size="small", cell="center", jitter=(0, 0))))
    assert caption_reward(text, render(extra)) == 0.5
    with pytest.raises(ValueError, match="not a caption of a valid scene"):
        caption_reward("a red circle", render(TWO))


def test_caption_prompts_reads_the_split_captions_in_order_and_names_a_bad_line(tmp_path) -> None:
    texts = [caption(TWO), "a small green square in the center"]
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps({"messages": [], "images": [], "meta": {"category": "caption", "prompt": t}})
                            + "\n" for t in texts))
    assert caption_prompts(path) == texts
    path.write_text(path.read_text() + json.dumps({"messages": [], "meta": {"category": "caption"}}) + "\n")
    with pytest.raises(ValueError, match=r"captions.jsonl:3: meta.prompt: expected the record's caption, got None"):
        caption_prompts(path)


@pytest.mark.parametrize(("fields", "message"), [
    ({"edit_dpo_prompts": -1}, "edit_dpo_prompts=-1: expected >= 0"),
    ({"edit_dpo_steps": -2}, "edit_dpo_steps=-2: expected >= 0"),
    ({"edit_dpo_prompts": 13000}, r"edit_dpo_prompts=13000: expected <= n_captions \(12000\)"),
    ({"edit_dpo_prompts": 10, "n_captions": 0}, r"edit_dpo_prompts=10: expected <= n_captions \(0\)"),
    ({"edit_dpo_lr": 0.0}, "edit_dpo_lr=0.0: expected a positive rate"),
    ({"edit_dpo_edits": -1}, "edit_dpo_edits=-1: expected >= 0"),
    ({"edit_dpo_edits": 12001}, r"edit_dpo_edits=12001: expected <= n_editing \(12000\)"),
    ({"edit_dpo_edits": 10, "edit_reply": "cells"}, "expected edit_reply='caption', got 'cells'"),
])
def test_caption_dpo_settings_are_checked(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        ShapesRunConfig(**fields)
    assert ShapesRunConfig(edit_dpo_prompts=0, n_captions=0).edit_dpo_prompts == 0  # off: no caption records needed


def test_a_rerun_without_the_caption_records_names_the_missing_file_before_loading_anything(tmp_path) -> None:
    from vargpt.train.shapes import rerun_editing

    with pytest.raises(FileNotFoundError, match=r"data/captions.jsonl: the caption records the caption DPO round"):
        rerun_editing(tmp_path / "run", tmp_path / "out", ShapesRunConfig(), start="final")
    assert not (tmp_path / "out").exists()


def _edit_records(tmp_path, replies: list[str]):
    src, tgt = render(TWO), render(Scene(TWO.objects[1:]))
    src.save(tmp_path / "src.png")
    tgt.save(tmp_path / "tgt.png")
    path = tmp_path / "editing.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "<image>Remove the red triangle."},
                                                     {"role": "assistant", "content": r}],
                                        "images": ["src.png", "tgt.png"]}) + "\n" for r in replies))
    return path, src


def test_edit_prompts_are_the_split_edits_with_their_reply_and_its_caption_as_the_key(tmp_path) -> None:
    want = caption(Scene(TWO.objects[1:]))
    path, src = _edit_records(tmp_path, [f"Here is {want}.<image_gen>"] * 3)
    reqs = edit_prompts(path, 2)
    assert len(reqs) == 2
    (req, _) = reqs
    assert req.text == "<image>Remove the red triangle." and req.response == f"Here is {want}.<image_gen>"
    assert req.key == want == "a small blue circle in the bottom right"
    assert req.images[0].tobytes() == src.tobytes()
    assert caption_reward(req.key, Image.open(tmp_path / "tgt.png")) == 1.5  # the record's target passes its key
    with pytest.raises(ValueError, match=r"editing.jsonl: 3 editing records, 4 asked for"):
        edit_prompts(path, 4)


@pytest.mark.parametrize("reply", ["Done.<image_gen>", "Here is a red blob.<image_gen>"])
def test_edit_prompts_name_a_reply_that_names_no_scene(tmp_path, reply) -> None:
    path, _ = _edit_records(tmp_path, [f"Here is {caption(TWO)}.<image_gen>", reply])
    with pytest.raises(ValueError, match=r"editing.jsonl: record 1 \(line 2\).*messages\[1\].content: expected "
                                         r"'Here is \{caption\}.'"):
        edit_prompts(path, 2)


def test_a_rerun_with_edit_dpo_and_no_editing_records_names_the_missing_file(tmp_path) -> None:
    from vargpt.train.shapes import rerun_editing

    with pytest.raises(FileNotFoundError, match=r"data/editing.jsonl: the editing records the edit DPO round"):
        rerun_editing(tmp_path / "run", tmp_path / "out", ShapesRunConfig(edit_dpo_prompts=0, edit_dpo_edits=5),
                      start="final")
    assert not (tmp_path / "out").exists()
