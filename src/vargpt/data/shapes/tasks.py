"""Shapes datasets in the project's record format (official sharegpt records, SPEC.md §4.7), so that the same
training code runs on Shapes and on real data.

``build_split`` renders scenes to PNG files and writes JSONL files of records:

* understanding: user ``<image>{question}``, assistant ``{answer}`` (and, for a warm-up phase, the same over
  one-object scenes: ``understanding_single.jsonl``);
* generation: user = the prompt wrapped in a varied instruction, assistant = a short sentence + ``<image_gen>``;
* editing: user ``<image>{instruction}``, assistant = a short sentence + ``<image_gen>``; images = [source, target]
  (``edit_reply="caption"`` / ``"cells"``: the sentence names the edited scene, ``EDIT_PLAN_REPLY``);
* captions (``n_captions``): user = the canonical caption of a random scene wrapped in a varied instruction,
  assistant = ``plan_reply`` + ``<image_gen>`` -- the scenes an edit's reply names, drawn from their caption.

Evaluation scenes are drawn first from their own seed; training scenes whose read-back key equals an evaluation
scene's are rejected, so the scenes behind evaluation questions and edits are never seen in training.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from vargpt.data.shapes.grammar import (
    EDIT_KINDS,
    GEN_CATEGORIES,
    QUESTION_KINDS,
    GenPrompt,
    caption,
    cell_plan,
    check_question_kinds,
    sample_edit,
    sample_gen_prompt,
    sample_question,
    scene_for_prompt,
)
from vargpt.data.shapes.world import Scene, random_scene, render

__all__ = ["GEN_WRAPPERS", "GEN_REPLIES", "EDIT_REPLIES", "EDIT_PLAN_REPLY", "EDIT_REPLY_MODES", "plan_reply",
           "wrap_prompt", "build_split", "SplitPaths", "eval_scenes"]

GEN_WRAPPERS = ("{p}", "Draw {p}.", "Please create an image of {p}.", "Can you depict {p}?",
                "I need a picture of {p}.", "Generate {p}.")
GEN_REPLIES = ("Here is {p}.", "I have drawn {p}.", "Here is an image of {p}.")
EDIT_REPLIES = ("Here is the edited image.", "Done.", "The output image is:")
#: ``build_split(edit_reply="caption")``: the reply of an edit (and of a caption record) names the scene it draws, in
#: the canonical caption's words (SHAPES.md "Describe the image."), so that the LLM writes the edit out in text and
#: the decoder draws what the text says; ``edit_reply="cells"``: the same with the scene as a ``cell_plan`` (each
#: object's cell before its attributes: "Here is in the top left a small red circle, in the center ...").
EDIT_PLAN_REPLY = "Here is {caption}."
EDIT_REPLY_MODES = ("fixed", "caption", "cells")


def plan_reply(scene: Scene, edit_reply: str) -> str:
    """The reply that names ``scene`` (``EDIT_PLAN_REPLY``): its ``caption`` (``edit_reply`` "caption" or "fixed",
    for caption records) or its ``cell_plan`` ("cells")."""
    return EDIT_PLAN_REPLY.format(caption=cell_plan(scene) if edit_reply == "cells" else caption(scene))


def wrap_prompt(rng: random.Random, prompt: GenPrompt) -> tuple[str, str]:
    """(user text, assistant text before the image) for a generation prompt."""
    return rng.choice(GEN_WRAPPERS).format(p=prompt.text), rng.choice(GEN_REPLIES).format(p=prompt.text)


@dataclass
class SplitPaths:
    understanding: Path
    generation: Path
    editing: Path
    understanding_single: Path | None = None  # one-object scenes (``n_single`` > 0)
    captions: Path | None = None  # caption-to-image records (``n_captions`` > 0)


def eval_scenes(seed: int, n: int) -> list[Scene]:
    """The held-out evaluation scenes (fixed by ``seed``)."""
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(n)]


def _save(img, path: Path) -> str:
    """Save and return the path relative to the split folder (``images/<name>``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return f"images/{path.name}"


def _write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def build_split(out_dir: str | Path, *, seed: int, n_understanding: int, n_generation: int, n_editing: int,
                exclude: Iterable[Scene] = (), gen_categories: tuple[str, ...] = GEN_CATEGORIES,
                n_single: int = 0, gen_layout: str = "random", multi_object_kinds: Iterable[str] = (),
                n_vertical: int = 0, edit_reply: str = "fixed", n_captions: int = 0,
                exclude_captions: Iterable[Scene] = ()) -> SplitPaths:
    """Render a training split into ``out_dir`` (``images/``, ``understanding.jsonl``, ``generation.jsonl``,
    ``editing.jsonl`` and, when ``n_single`` > 0, ``understanding_single.jsonl`` of questions about one-object
    scenes; image paths are relative to ``out_dir``). ``gen_layout``: the ``layout`` of ``scene_for_prompt`` for
    the generation targets. ``multi_object_kinds``: question kinds (``QUESTION_KINDS``) asked in
    ``understanding.jsonl`` only about scenes of two or three objects, where answering about any object of the
    scene is not enough (empty: every kind about scenes of 1-3 objects, and the same records as before the option
    existed). ``n_vertical``: position records whose relation is "above" or "below" (alternately), added to the
    ``n_generation`` generation records (images ``v*.png``); they are drawn after every other record, so the rest of
    the split is the same as without them.

    ``edit_reply``: "fixed" (one of ``EDIT_REPLIES``), "caption" or "cells": the reply names the edited scene
    (``plan_reply``: its caption, or its ``cell_plan`` with each cell first, as do the caption records' replies);
    the images are the same either way (the draw of the fixed reply is made either way too,
    so every other record stays the same; run 22 drew its edited images without jitter, which changed the
    tokenizer's training images). ``n_captions``: caption-to-image records (``captions.jsonl``, images ``c*.png``):
    random scenes of 1-3 objects, jitter-free, drawn from their canonical caption (after every other record), none
    of them one of ``exclude`` or ``exclude_captions`` (e.g. the edited scenes of the editing suite, whose caption
    record would show the decoder an answer; excluded from these records only, so the rest of the split stays the
    same)."""
    for name, value in (("n_vertical", n_vertical), ("n_captions", n_captions)):
        if value < 0:
            raise ValueError(f"build_split({name}={value}): expected >= 0")
    if edit_reply not in EDIT_REPLY_MODES:
        raise ValueError(f"build_split(edit_reply={edit_reply!r}): expected one of {EDIT_REPLY_MODES}")
    multi_object_kinds = check_question_kinds(multi_object_kinds, "build_split(multi_object_kinds=...)")
    out = Path(out_dir)
    rng = random.Random(seed)
    banned = {s.key() for s in exclude}

    def fresh_scene(n: int | None = None) -> Scene:
        while True:
            s = random_scene(rng, n)
            if s.key() not in banned:
                return s

    def questions(n_records: int, prefix: str, n_objects: int | None) -> list[dict]:
        records = []
        for i in range(n_records):
            # with multi_object_kinds the kind comes first (it decides the object count) and stays through retries
            kind = rng.choice(QUESTION_KINDS) if multi_object_kinds and n_objects is None else None
            while True:
                if kind is None:
                    scene = fresh_scene(n_objects)
                    qa = sample_question(rng, scene, rng.choice(QUESTION_KINDS))
                else:
                    scene = fresh_scene(rng.choice((2, 3)) if kind in multi_object_kinds else None)
                    qa = sample_question(rng, scene, kind)
                if qa:
                    break
            path = _save(render(scene), out / "images" / f"{prefix}{i:06d}.png")
            records.append({"messages": [{"role": "user", "content": f"<image>{qa[0]}"},
                                         {"role": "assistant", "content": qa[1]}], "images": [path]})
        return records

    def generation(prompt: GenPrompt, name: str) -> dict:
        scene = scene_for_prompt(rng, prompt, gen_layout)
        user, reply = wrap_prompt(rng, prompt)
        path = _save(render(scene), out / "images" / f"{name}.png")
        return {"messages": [{"role": "user", "content": user},
                             {"role": "assistant", "content": f"{reply}<image_gen>"}], "images": [path],
                "meta": {"category": prompt.category, "prompt": prompt.text}}

    und, edit = questions(n_understanding, "u", None), []
    gen = [generation(sample_gen_prompt(rng, gen_categories[i % len(gen_categories)]), f"g{i:06d}")
           for i in range(n_generation)]
    for i in range(n_editing):
        while True:
            scene = fresh_scene()
            r = sample_edit(rng, scene, EDIT_KINDS[i % len(EDIT_KINDS)])
            if r:
                break
        e, target = r
        reply = rng.choice(EDIT_REPLIES)
        if edit_reply != "fixed":
            reply = plan_reply(target, edit_reply)
        src = _save(render(scene), out / "images" / f"e{i:06d}_src.png")
        tgt = _save(render(target), out / "images" / f"e{i:06d}_tgt.png")
        edit.append({"messages": [{"role": "user", "content": f"<image>{e.text}"},
                                  {"role": "assistant", "content": f"{reply}<image_gen>"}],
                     "images": [src, tgt], "meta": {"kind": e.kind}})
    single = _write_jsonl(out / "understanding_single.jsonl", questions(n_single, "s", 1)) if n_single else None
    gen += [generation(sample_gen_prompt(rng, "position", relations=(("above", "below")[i % 2],)), f"v{i:06d}")
            for i in range(n_vertical)]
    caps = []
    banned |= {s.key() for s in exclude_captions}
    for i in range(n_captions):
        scene = _still(fresh_scene())
        text = caption(scene)
        path = _save(render(scene), out / "images" / f"c{i:06d}.png")
        reply = plan_reply(scene, edit_reply)
        caps.append({"messages": [{"role": "user", "content": rng.choice(GEN_WRAPPERS).format(p=text)},
                                  {"role": "assistant", "content": f"{reply}<image_gen>"}],
                     "images": [path], "meta": {"category": "caption", "prompt": text}})
    captions = _write_jsonl(out / "captions.jsonl", caps) if n_captions else None
    return SplitPaths(_write_jsonl(out / "understanding.jsonl", und), _write_jsonl(out / "generation.jsonl", gen),
                      _write_jsonl(out / "editing.jsonl", edit), single, captions)


def _still(scene: Scene) -> Scene:
    """``scene`` without jitter (every object centred in its cell)."""
    return Scene(tuple(replace(o, jitter=(0, 0)) for o in scene.objects))
