"""The Shapes world contract (SHAPES.md): exact rendering and read-back, grammar round trips, pass rules."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from vargpt.data.shapes import (
    CELLS,
    COLORS,
    EDIT_KINDS,
    GEN_CATEGORIES,
    QUESTION_KINDS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    caption,
    check_answer,
    check_gen,
    parse_caption,
    parse_edit,
    parse_gen_prompt,
    parse_question,
    random_scene,
    read_image,
    render,
    sample_edit,
    sample_gen_prompt,
    sample_question,
    scene_for_prompt,
)
from vargpt.data.shapes.grammar import LAYOUTS, GenPrompt, _gp
from vargpt.data.shapes.tasks import build_split


def read_key(img) -> frozenset:
    return frozenset(o.key() for o in read_image(img))


def test_scorer_reads_back_10000_random_scenes_exactly() -> None:
    rng = random.Random(12345)
    misses = [s for s in (random_scene(rng) for _ in range(10_000)) if read_key(render(s)) != s.key()]
    assert misses == []


def test_every_object_at_every_cell_and_extreme_jitter_reads_back() -> None:
    for shape, color, size, cell in itertools.product(SHAPES, COLORS, SIZES, CELLS):
        for jitter in ((-1, -1), (1, 1), (-1, 1), (1, -1)):
            s = Scene((Obj(shape, color, size, cell, jitter),))
            assert read_key(render(s)) == s.key(), s


def test_rendering_is_exact_palette_on_white() -> None:
    arr = np.asarray(render(random_scene(random.Random(0), 3)))
    colors = {tuple(c) for c in arr.reshape(-1, 3)}
    assert colors <= {(255, 255, 255), *COLORS.values()}


def test_fill_ratios_fall_in_the_contract_bands() -> None:
    for shape, size in itertools.product(SHAPES, SIZES):
        (o,) = read_image(render(Scene((Obj(shape, "red", size, "center"),))))
        assert (o.shape, o.size) == (shape, size)


def test_every_generation_prompt_round_trips_and_its_scenes_pass() -> None:
    rng = random.Random(3)
    colors = list(COLORS)
    all_prompts: list[GenPrompt] = []
    all_prompts += [_gp("single_object", shape=s) for s in SHAPES]
    all_prompts += [_gp("two_objects", shape1=a, shape2=b) for a, b in itertools.permutations(SHAPES, 2)]
    all_prompts += [_gp("counting", shape=s, count=n) for s in SHAPES for n in (2, 3)]
    all_prompts += [_gp("colors", color=c, shape=s) for c in colors for s in SHAPES]
    all_prompts += [_gp("position", color1=c1, shape1=s1, color2=c2, shape2=s2, relation=r)
                    for c1, s1, c2, s2 in itertools.product(colors, SHAPES, colors, SHAPES) if (c1, s1) != (c2, s2)
                    for r in ("to the left of", "to the right of", "above", "below")]
    all_prompts += [_gp("color_attribution", color1=c1, shape1=s1, color2=c2, shape2=s2)
                    for c1, c2 in itertools.permutations(colors, 2) for s1, s2 in itertools.permutations(SHAPES, 2)]
    all_prompts += [_gp("size", size=z, color=c, shape=s) for z in SIZES for c in colors for s in SHAPES]
    all_prompts += [_gp("cell", color=c, shape=s, cell=x) for c in colors for s in SHAPES for x in CELLS]
    assert {p.category for p in all_prompts} == set(GEN_CATEGORIES)
    for p in all_prompts:
        assert parse_gen_prompt(p.text) == p, p.text
        for layout in LAYOUTS:
            scene = scene_for_prompt(rng, p, layout)
            assert check_gen(p, read_image(render(scene))), (p.text, layout, scene)
    for c in GEN_CATEGORIES:  # the sampler only produces grammatical prompts
        assert all(parse_gen_prompt(sample_gen_prompt(rng, c).text).category == c for _ in range(50))


def test_canonical_layout_fixes_what_the_prompt_leaves_open() -> None:
    rng = random.Random(3)

    def cells(text: str) -> list[str]:
        return [o.cell for o in scene_for_prompt(rng, parse_gen_prompt(text), "canonical").objects]

    assert cells("a circle") == ["center"]
    assert cells("a triangle and a square") == ["left", "right"]
    assert cells("three squares") == ["left", "center", "right"]
    assert cells("a red circle below a blue square") == ["bottom", "top"]
    assert cells("a red circle to the right of a blue square") == ["right", "left"]
    assert cells("a red circle in the top left") == ["top left"]
    sizes = {o.size for t in ("a circle", "two circles", "a red square and a blue circle") for _ in range(20)
             for o in scene_for_prompt(rng, parse_gen_prompt(t), "canonical").objects}
    assert sizes == {"large"}
    assert {scene_for_prompt(rng, parse_gen_prompt("a small red circle"), "canonical").objects[0].size} == {"small"}
    # colours left open are still drawn (every colour appears in 200 draws)
    colors = {scene_for_prompt(rng, parse_gen_prompt("a circle"), "canonical").objects[0].color for _ in range(200)}
    assert colors == set(COLORS)
    with pytest.raises(ValueError, match="layout='grid'"):
        scene_for_prompt(rng, parse_gen_prompt("a circle"), "grid")


def test_fixed_layout_makes_the_scene_a_function_of_the_prompt() -> None:
    rng = random.Random(5)
    for c in GEN_CATEGORIES:
        for _ in range(30):
            p = sample_gen_prompt(rng, c)
            scenes = {scene_for_prompt(random.Random(seed), p, "fixed") for seed in range(4)}
            assert len(scenes) == 1, p.text
            (scene,) = scenes
            canonical = scene_for_prompt(random.Random(0), p, "canonical")
            # the canonical cells and sizes, no jitter, and the colours the prompt names
            assert [(o.shape, o.size, o.cell) for o in scene.objects] == [
                (o.shape, o.size, o.cell) for o in canonical.objects]
            assert all(o.jitter == (0, 0) for o in scene.objects)
            named = [v for k, v in p.p.items() if k.startswith("color")]
            if named:
                assert [o.color for o in scene.objects] == named
    fixed = lambda text: [(o.color, o.shape, o.cell)  # noqa: E731
                          for o in scene_for_prompt(rng, parse_gen_prompt(text), "fixed").objects]
    assert fixed("a triangle") == [("green", "triangle", "center")]
    assert fixed("a square and a circle") == [("blue", "square", "left"), ("red", "circle", "right")]
    assert fixed("three circles") == [("red", "circle", "left"), ("red", "circle", "center"),
                                      ("red", "circle", "right")]
    assert fixed("a purple square below a green circle") == [("purple", "square", "bottom"), ("green", "circle", "top")]


def test_generation_pass_rules_reject_wrong_images() -> None:
    red_circle = Obj("circle", "red", "small", "left")
    blue_square = Obj("square", "blue", "small", "right")
    objs = read_image(render(Scene((red_circle, blue_square))))
    assert check_gen(parse_gen_prompt("a red circle to the left of a blue square"), objs)
    assert not check_gen(parse_gen_prompt("a red circle to the right of a blue square"), objs)
    assert not check_gen(parse_gen_prompt("a red circle above a blue square"), objs)  # same row
    assert check_gen(parse_gen_prompt("a red circle and a blue square"), objs)
    assert not check_gen(parse_gen_prompt("a blue circle and a red square"), objs)
    assert not check_gen(parse_gen_prompt("a circle"), objs)  # "exactly": the square is extra
    assert check_gen(parse_gen_prompt("a circle and a square"), objs)
    assert not check_gen(parse_gen_prompt("two circles"), objs)
    one = read_image(render(Scene((Obj("triangle", "green", "large", "top"),))))
    assert check_gen(parse_gen_prompt("a large green triangle"), one)
    assert not check_gen(parse_gen_prompt("a small green triangle"), one)
    assert check_gen(parse_gen_prompt("a green triangle in the top"), one)
    assert not check_gen(parse_gen_prompt("a green triangle in the top left"), one)


def test_questions_round_trip_and_answers_are_judged_exactly() -> None:
    rng = random.Random(5)
    for _ in range(400):
        scene = random_scene(rng)
        for kind in QUESTION_KINDS:
            qa = sample_question(rng, scene, kind)
            if qa is None:
                continue
            q, a = qa
            assert parse_question(q)[0] == kind
            assert check_answer(q, a, scene)
            assert not check_answer(q, a + "s", scene)
    scene = Scene((Obj("circle", "red", "small", "top left"), Obj("square", "blue", "large", "center")))
    assert caption(scene) == "a small red circle in the top left, a large blue square in the center"
    assert parse_caption(caption(scene)) == scene.key()
    # a caption in another order describes the same scene; a wrong one does not
    assert check_answer("Describe the image.", "a large blue square in the center, a small red circle in the top left",
                        scene)
    assert not check_answer("Describe the image.", "a large blue square in the center", scene)
    assert parse_caption("a huge red circle in the top") is None


def test_exists_questions_are_half_no() -> None:
    rng = random.Random(9)
    answers = [sample_question(rng, random_scene(rng), "exists")[1] for _ in range(2000)]
    assert abs(answers.count("no") / len(answers) - 0.5) < 0.04


def test_edits_round_trip_and_targets_read_back() -> None:
    rng = random.Random(7)
    seen = set()
    for _ in range(600):
        scene = random_scene(rng)
        for kind in EDIT_KINDS:
            r = sample_edit(rng, scene, kind)
            if r is None:
                continue
            edit, target = r
            seen.add(kind)
            assert parse_edit(edit.text) == edit
            assert read_key(render(target)) == target.key()
            assert target.key() != scene.key()
    assert seen == set(EDIT_KINDS)
    with pytest.raises(ValueError, match="not a Shapes"):
        parse_edit("Paint it black.")


def test_build_split_writes_records_in_the_official_format(tmp_path) -> None:
    held_out = [random_scene(random.Random(1)) for _ in range(5)]
    paths = build_split(tmp_path, seed=0, n_understanding=6, n_generation=8, n_editing=4, exclude=held_out)
    und = [json.loads(line) for line in paths.understanding.read_text().splitlines()]
    gen = [json.loads(line) for line in paths.generation.read_text().splitlines()]
    edi = [json.loads(line) for line in paths.editing.read_text().splitlines()]
    assert (len(und), len(gen), len(edi)) == (6, 8, 4)
    assert {r["meta"]["category"] for r in gen} == set(GEN_CATEGORIES)
    for r in und + gen + edi:
        text = "".join(m["content"] for m in r["messages"])
        assert text.count("<image>") + text.count("<image_gen>") == len(r["images"])
        assert all((tmp_path / p).is_file() for p in r["images"])
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
    for r in gen:
        prompt = parse_gen_prompt(r["meta"]["prompt"])
        from PIL import Image

        assert check_gen(prompt, read_image(Image.open(tmp_path / r["images"][0])))


def test_one_object_questions_are_extra_and_leave_the_split_unchanged(tmp_path) -> None:
    held_out = [random_scene(random.Random(1)) for _ in range(5)]
    plain = build_split(tmp_path / "a", seed=3, n_understanding=5, n_generation=8, n_editing=4, exclude=held_out)
    more = build_split(tmp_path / "b", seed=3, n_understanding=5, n_generation=8, n_editing=4, exclude=held_out,
                       n_single=12)
    assert plain.understanding_single is None
    for name in ("understanding", "generation", "editing"):  # the same records as without the warm-up set
        assert getattr(plain, name).read_text() == getattr(more, name).read_text()
    from PIL import Image

    single = [json.loads(line) for line in more.understanding_single.read_text().splitlines()]
    assert len(single) == 12
    kinds = set()
    for r in single:
        objs = read_image(Image.open(tmp_path / "b" / r["images"][0]))
        assert len(objs) == 1
        question = r["messages"][0]["content"].removeprefix("<image>")
        kinds.add(parse_question(question)[0])
    assert len(kinds) >= 4  # every question kind is askable about one object


def test_captioned_edit_replies_name_the_edited_scene_and_captions_draw_their_text(tmp_path) -> None:
    from PIL import Image

    from vargpt.data.shapes.grammar import parse_caption
    from vargpt.data.shapes.world import Obj, Scene

    held_out = [random_scene(random.Random(1)) for _ in range(5)]
    kw = dict(seed=4, n_understanding=5, n_generation=8, n_editing=8, exclude=held_out)
    plain = build_split(tmp_path / "a", **kw)
    planned = build_split(tmp_path / "b", **kw, edit_reply="caption", n_captions=10)
    assert plain.captions is None
    for name in ("understanding", "generation"):  # the other records are the same
        assert getattr(plain, name).read_text() == getattr(planned, name).read_text()
    fixed = [json.loads(line) for line in plain.editing.read_text().splitlines()]
    edits = [json.loads(line) for line in planned.editing.read_text().splitlines()]
    for r, f in zip(edits, fixed, strict=True):
        assert r["messages"][0] == f["messages"][0] and r["meta"] == f["meta"]  # the same edits of the same scenes
        reply = r["messages"][1]["content"]
        assert reply.startswith("Here is ") and reply.endswith(".<image_gen>")
        named = parse_caption(reply.removeprefix("Here is ").removesuffix(".<image_gen>"))
        target = read_image(Image.open(tmp_path / "b" / r["images"][1]))
        assert named == frozenset(o.key() for o in target)  # the reply names the edited scene ...
        for x, y in zip(r["images"], f["images"], strict=True):  # ... and the images are the fixed split's
            pixels = [np.asarray(Image.open(tmp_path / d / p)) for d, p in (("b", x), ("a", y))]
            assert np.array_equal(*pixels)
    caps = [json.loads(line) for line in planned.captions.read_text().splitlines()]
    assert len(caps) == 10 and {len(parse_caption(r["meta"]["prompt"])) for r in caps} == {1, 2, 3}
    for r in caps:
        text = r["meta"]["prompt"]
        assert text in r["messages"][0]["content"] and r["messages"][1]["content"] == f"Here is {text}.<image_gen>"
        drawn = Scene(tuple(Obj(*k) for k in parse_caption(text)))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / r["images"][0])), np.asarray(render(drawn)))
    # ``exclude_captions``: scenes no caption record draws; the rest of the split stays the same
    shown = [Scene(tuple(Obj(*k) for k in parse_caption(r["meta"]["prompt"]))) for r in caps[:4]]
    other = build_split(tmp_path / "c", **kw, edit_reply="caption", n_captions=10, exclude_captions=shown)
    for name in ("understanding", "generation", "editing"):
        assert getattr(planned, name).read_text() == getattr(other, name).read_text()
    keys = {parse_caption(json.loads(line)["meta"]["prompt"]) for line in other.captions.read_text().splitlines()}
    assert len(keys) == 10 and not keys & {s.key() for s in shown}
    with pytest.raises(ValueError, match="edit_reply='plan'"):
        build_split(tmp_path / "x", **kw, edit_reply="plan")
    with pytest.raises(ValueError, match="n_captions=-1"):
        build_split(tmp_path / "x", **kw, n_captions=-1)


def test_cell_plan_names_each_cell_first_and_parses_back() -> None:
    from vargpt.data.shapes.grammar import cell_plan, key_caption, parse_cell_plan

    scene = Scene((Obj("square", "blue", "large", "center"), Obj("circle", "red", "small", "top left")))
    assert cell_plan(scene) == "in the top left a small red circle, in the center a large blue square"
    rng = random.Random(5)
    for _ in range(2000):
        s = random_scene(rng)
        assert parse_cell_plan(cell_plan(s)) == s.key() and key_caption(s.key()) == caption(s)
    assert parse_cell_plan(caption(scene)) is None and parse_caption(cell_plan(scene)) is None
    # two objects in one cell, an unknown word or a missing cell: not a plan
    assert parse_cell_plan("in the top a small red circle, in the top a large blue square") is None
    assert parse_cell_plan("in the top a huge red circle") is None
    assert parse_cell_plan("a small red circle") is None


def test_cells_edit_replies_and_caption_records_name_the_scene_cell_first(tmp_path) -> None:
    """``edit_reply="cells"``: the caption split's records, with each reply the ``cell_plan`` of the same scene."""
    from vargpt.data.shapes.grammar import parse_cell_plan

    kw = dict(seed=4, n_understanding=5, n_generation=8, n_editing=8, n_captions=10)
    captioned = build_split(tmp_path / "a", **kw, edit_reply="caption")
    cells = build_split(tmp_path / "b", **kw, edit_reply="cells")
    for name in ("understanding", "generation"):
        assert getattr(captioned, name).read_text() == getattr(cells, name).read_text()
    for name in ("editing", "captions"):
        pairs = zip(*(getattr(split, name).read_text().splitlines() for split in (captioned, cells)), strict=True)
        for a, b in map(lambda ab: [json.loads(x) for x in ab], pairs):
            assert a["images"] == b["images"] and a["messages"][0] == b["messages"][0] and a["meta"] == b["meta"]
            ra, rb = a["messages"][1]["content"], b["messages"][1]["content"]
            assert rb.startswith("Here is in the ") and rb.endswith(".<image_gen>")
            strip = lambda r: r.removeprefix("Here is ").removesuffix(".<image_gen>")  # noqa: E731
            assert parse_cell_plan(strip(rb)) == parse_caption(strip(ra)) is not None


def test_multi_object_kinds_ask_those_kinds_about_two_or_three_objects(tmp_path) -> None:
    from PIL import Image

    split = build_split(tmp_path, seed=2, n_understanding=120, n_generation=0, n_editing=0,
                        multi_object_kinds=("color", "exists"))
    counts: dict[str, set[int]] = {}
    for line in split.understanding.read_text().splitlines():
        r = json.loads(line)
        kind = parse_question(r["messages"][0]["content"].removeprefix("<image>"))[0]
        counts.setdefault(kind, set()).add(len(read_image(Image.open(tmp_path / r["images"][0]))))
    assert counts["color"] <= {2, 3} and counts["exists"] <= {2, 3}
    assert 1 in counts["count"] | counts["describe"] | counts["shape"] | counts["where"]  # the rest: 1-3 objects
    assert len(counts) == 6  # every kind still asked
    with pytest.raises(ValueError, match=r"unknown question kind\(s\) \['colour'\]"):
        build_split(tmp_path / "x", seed=2, n_understanding=1, n_generation=0, n_editing=0,
                    multi_object_kinds=("colour",))
