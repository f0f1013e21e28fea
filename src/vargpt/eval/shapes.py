"""Shapes evaluation suites (SHAPES.md): generation (GenEval-like), understanding (VQA-like), editing.

Every suite is fixed by its seed: the held-out scenes behind questions and edits come from
``vargpt.data.shapes.tasks.eval_scenes`` (training splits exclude them); generation prompts come from the small
grammar and may recur in training, so what is held out there is the sampling seed and the judgement of the image.

``run_suite(engine, name, ...)`` returns a ``SuiteResult`` (per-category and overall scores, the items with their
outputs) and can write ``<suite>.json``, ``<suite>.md`` and ``<suite>_grid.png``.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from vargpt.data.shapes import (
    CELLS,
    EDIT_KINDS,
    GEN_CATEGORIES,
    QUESTION_KINDS,
    check_answer,
    check_gen,
    parse_gen_prompt,
    read_image,
    render,
    sample_edit,
    sample_gen_prompt,
    sample_question,
)
from vargpt.data.shapes.grammar import object_phrase
from vargpt.data.shapes.tasks import eval_scenes
from vargpt.engine import Engine
from vargpt.generation.params import ImageParams, TextParams

__all__ = ["SUITES", "SuiteResult", "generation_items", "understanding_items", "editing_items", "run_suite",
           "EVAL_SEED", "fit_canvas", "read_caption", "reads_back"]

SUITES = ("understanding", "generation", "editing", "tokenizer")
EVAL_SEED = 20261126  # the held-out scenes and prompts; training splits must use other seeds
GEN_REPLY = "Here is {p}."


@dataclass
class SuiteResult:
    suite: str
    scores: dict[str, float]  # per category + "overall"
    counts: dict[str, int]
    items: list[dict] = field(default_factory=list)
    params: dict | None = None  # generation / editing: the resolved ImageParams (seed = the base seed)

    def to_markdown(self) -> str:
        lines = [f"| {self.suite} category | n | score |", "|---|---|---|"]
        for k, v in self.scores.items():
            if k != "overall":
                lines.append(f"| {k} | {self.counts[k]} | {v:.3f} |")
        lines.append(f"| **overall** | {sum(self.counts.values())} | **{self.scores['overall']:.3f}** |")
        return "\n".join(lines)


def generation_items(per_category: int = 200, seed: int = EVAL_SEED) -> list[dict]:
    rng = random.Random(seed)
    return [{"category": c, "prompt": sample_gen_prompt(rng, c).text, "seed": seed + 1000 * i + k}
            for k, c in enumerate(GEN_CATEGORIES) for i in range(per_category)]


def understanding_items(n: int = 1000, seed: int = EVAL_SEED) -> list[dict]:
    rng = random.Random(seed + 1)
    scenes = eval_scenes(seed, n)
    items = []
    for i, scene in enumerate(scenes):
        kinds = list(QUESTION_KINDS)
        rng.shuffle(kinds)
        for kind in kinds:  # the first askable kind, uniformly over kinds
            qa = sample_question(rng, scene, kind)
            if qa:
                items.append({"scene": scene, "question": qa[0], "answer": qa[1], "category": kind, "index": i})
                break
    return items


def editing_items(n: int = 500, seed: int = EVAL_SEED) -> list[dict]:
    rng = random.Random(seed + 2)
    scenes = eval_scenes(seed + 3, 4 * n)
    items = []
    for scene in scenes:
        r = sample_edit(rng, scene, EDIT_KINDS[len(items) % len(EDIT_KINDS)])
        if r:
            items.append({"scene": scene, "instruction": r[0].text, "target": r[1], "category": r[0].kind})
        if len(items) == n:
            break
    return items


def _score(items: list[dict]) -> tuple[dict[str, float], dict[str, int]]:
    by = defaultdict(list)
    for it in items:
        by[it["category"]].append(bool(it["pass"]))
    scores = {k: sum(v) / len(v) for k, v in by.items()}
    scores["overall"] = sum(scores.values()) / len(scores)
    return scores, {k: len(v) for k, v in by.items()}


def _batches(items: list, size: int, desc: str):
    for i in tqdm(range(0, len(items), size), desc=desc, unit="batch", leave=False):
        yield items[i:i + size]


def run_suite(engine: Engine, suite: str, *, params: ImageParams | None = None, batch_size: int = 32,
              limit: int | None = None, out_dir: str | Path | None = None,
              items: list[dict] | None = None) -> SuiteResult:
    """Run one suite (``limit`` takes the first items of each category, for quick checks). ``items``: other items of
    the suite's form (e.g. ``generation_items(seed=...)`` for a validation set) instead of the held-out ones."""
    if suite not in SUITES:
        raise ValueError(f"suite={suite!r}: expected one of {SUITES} (or 'all' on the command line)")
    params = params or ImageParams()
    proc = engine.processor
    if suite == "tokenizer":
        return _tokenizer_suite(engine, limit=limit, batch_size=batch_size, out_dir=out_dir)
    if items is None:
        items = {"generation": generation_items, "understanding": understanding_items,
                 "editing": editing_items}[suite]()
    items = [dict(it) for it in items]  # results are written into the items
    if limit:
        per = defaultdict(int)
        kept = []
        for it in items:
            if per[it["category"]] < limit:
                kept.append(it)
                per[it["category"]] += 1
        items = kept
    if suite == "generation":
        for chunk in _batches(items, batch_size, "generation"):
            encs = [proc.encode([{"role": "user", "content": it["prompt"]}],
                                assistant_prefix=GEN_REPLY.format(p=it["prompt"])) for it in chunk]
            imgs = engine.generate_images(encs, params, seeds=[it["seed"] for it in chunk])
            for it, img in zip(chunk, imgs, strict=True):
                objs = read_image(fit_canvas(img.image))
                it["image"], it["read"] = img.image, read_caption(objs)
                it["pass"] = check_gen(parse_gen_prompt(it["prompt"]), objs)
    elif suite == "understanding":
        tp = TextParams(max_new_tokens=96)
        for chunk in _batches(items, batch_size, "understanding"):
            encs = [proc.encode([{"role": "user", "content": [{"type": "image", "image": render(it["scene"])},
                                                              {"type": "text", "text": it["question"]}]}])
                    for it in chunk]
            outs = engine.generate_text(encs, tp)
            for it, ids in zip(chunk, outs, strict=True):
                st = engine.config.special_tokens
                it["output"] = proc.decode([t for t in ids if t != st.im_end]).strip()
                it["pass"] = check_answer(it["question"], it["output"], it["scene"])
    else:
        for n, chunk in enumerate(_batches(items, batch_size, "editing")):
            encs = [proc.encode([{"role": "user", "content": [{"type": "image", "image": render(it["scene"])},
                                                              {"type": "text", "text": it["instruction"]}]}])
                    for it in chunk]
            replies = engine.write_replies(encs)
            seeds = [params.seed + n * batch_size + i for i in range(len(chunk))]
            imgs = engine.generate_images(encs, params, seeds=seeds)
            for it, img, reply in zip(chunk, imgs, replies, strict=True):
                it["reply"] = reply
                objs = read_image(fit_canvas(img.image))
                it["image"], it["read"] = img.image, read_caption(objs)
                it["source"], it["expected"] = read_caption(it["scene"].objects), read_caption(it["target"].objects)
                it["pass"] = _is_scene(objs, it["target"])
    scores, counts = _score(items)
    result = SuiteResult(suite, scores, counts, items,
                         params=engine.resolve(params).to_dict() if suite != "understanding" else None)
    if out_dir is not None:
        write_result(result, out_dir)
    return result


def _tokenizer_suite(engine: Engine, *, limit: int | None, batch_size: int, out_dir) -> SuiteResult:
    """VAE round trip of 500 held-out scenes: encode, multi-scale BSQ over the generation schedule, decode, read back;
    a scene passes when the scorer reads exactly the same scene (category = number of objects)."""
    import torch

    from vargpt.models.vae import decode_bits, multiscale_encode
    from vargpt.models.vae.schedules import get_schedule
    from vargpt.processing.image import from_pil, to_pil

    model = engine.model
    schedule = get_schedule(1.0, model.config.gen_schedule)
    scenes = eval_scenes(EVAL_SEED + 7, 500)
    if limit:
        scenes = scenes[: 3 * limit]
    items = [{"scene": s, "category": f"{len(s.objects)} object(s)"} for s in scenes]
    vae = model.vae
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        for chunk in _batches(items, batch_size, "tokenizer"):
            x = from_pil([render(it["scene"]) for it in chunk]).to(engine.device)
            f = vae.encode(x)
            bits, _ = multiscale_encode(f, schedule)
            recon = vae.decode(decode_bits(bits, schedule).to(dtype)).float()
            for it, img in zip(chunk, to_pil(recon), strict=True):
                it["image"] = img
                it["pass"] = reads_back(img, it["scene"])
    scores, counts = _score(items)
    result = SuiteResult("tokenizer", scores, counts, items)
    if out_dir is not None:
        write_result(result, out_dir)
    return result


def fit_canvas(img: Image.Image) -> Image.Image:
    """The scorer reads 64 x 64 images; larger generations are downsampled (nearest) to the canvas."""
    return img if img.size == (64, 64) else img.convert("RGB").resize((64, 64), Image.Resampling.NEAREST)


def read_caption(objects) -> str:
    """The objects (e.g. what the scorer read back from an image) as "a {size} {color} {shape} in the {cell}"
    parts in reading order, joined by ", " -- the canonical caption's form, also for object sets that are not a valid
    scene (two objects in one cell); "" for none. Written into the suites' JSON items (``read``; editing also
    ``source`` and ``expected``)."""
    return ", ".join(map(object_phrase, sorted(objects, key=lambda o: (CELLS.index(o.cell), o.key()))))


def reads_back(img: Image.Image, scene) -> bool:
    """The image reads back (SHAPES.md rules) as exactly ``scene``: every object's colour, shape, size and cell."""
    return _is_scene(read_image(fit_canvas(img)), scene)


def _is_scene(objects, scene) -> bool:
    """The objects read back are exactly ``scene``'s: every object's colour, shape, size and cell."""
    return frozenset(o.key() for o in objects) == scene.key()


def write_result(result: SuiteResult, out_dir: str | Path, grid_items: int = 32) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for it in result.items:
        row = {k: v for k, v in it.items() if k not in ("image", "scene", "target")}
        rows.append(row)
    (out / f"{result.suite}.json").write_text(json.dumps({"suite": result.suite, "scores": result.scores,
                                                          "counts": result.counts, "params": result.params,
                                                          "items": rows}, indent=1))
    (out / f"{result.suite}.md").write_text(result.to_markdown() + "\n")
    pics = [it.get("image") or render(it["scene"]) for it in result.items[:grid_items]]
    if pics:
        w, h = pics[0].size
        cols = 8
        grid = Image.new("RGB", (cols * (w + 2), ((len(pics) + cols - 1) // cols) * (h + 2)), "gray")
        for i, p in enumerate(pics):
            grid.paste(p.convert("RGB").resize((w, h)), ((i % cols) * (w + 2), (i // cols) * (h + 2)))
        grid.save(out / f"{result.suite}_grid.png")
