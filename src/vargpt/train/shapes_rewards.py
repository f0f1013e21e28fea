"""The DPO rounds' rankings and teacher candidates on the Shapes world (``vargpt.train.shapes``): generation
prompts (stages 3b and 3d: ``shapes_reward``, ``shapes_teacher``), caption prompts (the round after the editing
SFT, ``ShapesRunConfig.edit_dpo_prompts``: ``caption_reward``, ``caption_teacher``, ``caption_prompts``) and edits
(the round after it, ``ShapesRunConfig.edit_dpo_edits``: ``edit_prompts``, ranked and taught as captions)."""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from vargpt.data.records import load_records
from vargpt.data.shapes import check_gen, parse_gen_prompt, read_image
from vargpt.data.shapes.grammar import parse_caption, scene_for_prompt
from vargpt.data.shapes.tasks import EDIT_PLAN_REPLY
from vargpt.data.shapes.world import Obj, Scene, render
from vargpt.eval.shapes import fit_canvas
from vargpt.train.dpo import IMAGE_GEN_TEXT, PairPrompt

__all__ = ["shapes_reward", "shapes_teacher", "caption_reward", "caption_teacher", "caption_prompts", "edit_prompts"]


def shapes_reward(prompt: str, image) -> float:
    """DPO ranking: 1 for a pass (SHAPES.md rules), plus partial credit for the right number and kinds of shapes."""
    p = parse_gen_prompt(prompt)
    objs = read_image(fit_canvas(image))
    want = scene_for_prompt(random.Random(0), p)
    score = float(check_gen(p, objs))
    score += 0.25 * (len(objs) == len(want.objects))
    got = sorted(o.shape for o in objs)
    need = sorted(o.shape for o in want.objects)
    common = sum(min(got.count(s), need.count(s)) for s in set(need))
    return score + 0.25 * common / max(len(need), len(got), 1)


def shapes_teacher(layout: str) -> Callable[[str], Image.Image]:
    """``teacher_fn`` of ``build_pairs``: the rendered scene of a prompt (``scene_for_prompt`` with ``layout``, its
    open choices drawn from a seed derived from the prompt text), which passes the scorer by construction."""
    def teacher(prompt: str) -> Image.Image:
        rng = random.Random(zlib.crc32(prompt.encode()))
        return render(scene_for_prompt(rng, parse_gen_prompt(prompt), layout))

    return teacher


def _caption_scene(prompt: str) -> Scene:
    """The scene a canonical caption names, without jitter (as the caption records draw it)."""
    key = parse_caption(prompt)
    if key is None:
        raise ValueError(f"not a caption of a valid scene (SHAPES.md object phrases, one per cell): {prompt!r}")
    return Scene(tuple(Obj(*k) for k in key))  # (shape, colour, size, cell), no jitter


def caption_reward(prompt: str, image) -> float:
    """DPO ranking of a caption prompt's drawing: 1 when the image reads back (SHAPES.md rules) as exactly the scene
    the caption names, plus 0.5 x the share of its objects read back as named (shape, colour, size and cell)."""
    want = parse_caption(prompt)
    if want is None:
        raise ValueError(f"caption_reward: not a caption of a valid scene: {prompt!r}")
    got = {o.key() for o in read_image(fit_canvas(image))}
    return float(got == want) + 0.5 * len(got & want) / len(want)


def caption_teacher(prompt: str) -> Image.Image:
    """``teacher_fn`` of ``build_pairs`` for caption prompts: the rendered scene the caption names (no jitter, as
    the caption records' images), which reads back as the caption by construction."""
    return render(_caption_scene(prompt))


def caption_prompts(path: str | Path) -> list[str]:
    """The captions (``meta.prompt``) of a split's caption records (``captions.jsonl``), in order; a record without
    one raises ``ValueError`` naming the file and line."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            prompt = json.loads(line).get("meta", {}).get("prompt")
            if not isinstance(prompt, str) or parse_caption(prompt) is None:
                raise ValueError(f"{path}:{i}: meta.prompt: expected the record's caption, got {prompt!r}")
            prompts.append(prompt)
    return prompts


def edit_prompts(path: str | Path, n: int) -> list[PairPrompt]:
    """The first ``n`` edits of a split's editing records (``editing.jsonl``, ``edit_reply="caption"``) as
    ``build_pairs`` requests: the source image and the instruction, the record's reply (``EDIT_PLAN_REPLY``: the
    edited scene's caption) as the answer before the image, and that caption as the key (``caption_reward``,
    ``caption_teacher``). A reply that does not name a scene raises ``ValueError`` naming the file and record."""
    head, tail = EDIT_PLAN_REPLY.split("{caption}")
    out = []
    for rec in load_records(path).records[:n]:
        if len(rec.messages) != 2 or len(rec.images) != 2:
            raise ValueError(f"{rec.source}: expected an edit (one user turn with the source image, one answer "
                             f"drawing the edited one); got {len(rec.messages)} turns and {len(rec.images)} images")
        user, answer = rec.messages
        caption = answer.content.removesuffix(IMAGE_GEN_TEXT)
        caption = caption[len(head): len(caption) - len(tail)] if caption.startswith(head) and caption.endswith(tail) \
            else None
        if caption is None or parse_caption(caption) is None:
            raise ValueError(f"{rec.source}: messages[1].content: expected {EDIT_PLAN_REPLY!r} naming the edited scene "
                             f"(a split built with edit_reply='caption'), then {IMAGE_GEN_TEXT}; got "
                             f"{answer.content!r:.120}")
        with Image.open(rec.images[0]) as im:
            source = im.convert("RGB")
        out.append(PairPrompt(user.content, (source,), answer.content, caption))
    if len(out) < n:
        raise ValueError(f"{path}: {len(out)} editing records, {n} asked for")
    return out
