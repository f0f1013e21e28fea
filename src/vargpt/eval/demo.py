"""A demo gallery (HTML + PNGs) of a Shapes model: understanding, generation and editing examples side by side."""

from __future__ import annotations

from pathlib import Path

from vargpt.engine import Engine

__all__ = ["write_demo"]


def write_demo(engine: Engine, out: Path, *, seed: int = 0, n: int = 8) -> Path:
    """Write ``out/index.html`` and its images (``n`` examples per task, fixed by ``seed``); returns the page."""
    import html
    import random

    from PIL import Image

    from vargpt.data.shapes import (
        GEN_CATEGORIES,
        check_gen,
        parse_gen_prompt,
        random_scene,
        read_image,
        render,
        sample_edit,
        sample_gen_prompt,
    )
    from vargpt.data.shapes.grammar import check_answer, sample_question
    from vargpt.eval.shapes import GEN_REPLY, fit_canvas, reads_back
    from vargpt.generation.params import ImageParams, TextParams

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []

    def verdict(ok: bool) -> str:  # the suites' own judgement (SHAPES.md read-back rules)
        return '<b style="color:#080">pass</b>' if ok else '<b style="color:#b00">fail</b>'

    def save(img: Image.Image, name: str) -> str:
        img.resize((128, 128), Image.Resampling.NEAREST).save(out / name)
        return name

    scenes = [random_scene(rng) for _ in range(n)]
    qas = [sample_question(rng, s, "describe" if i % 2 else None) or sample_question(rng, s, "count")
           for i, s in enumerate(scenes)]
    st = engine.config.special_tokens
    encs = [engine.processor.encode([{"role": "user", "content": [{"type": "image", "image": render(s)},
                                                                  {"type": "text", "text": q}]}])
            for s, (q, _) in zip(scenes, qas, strict=True)]
    answers = [engine.processor.decode([t for t in ids if t != st.im_end])
               for ids in engine.generate_text(encs, TextParams(max_new_tokens=96))]
    for i, (s, (q, a), ans) in enumerate(zip(scenes, qas, answers, strict=True)):
        rows.append(("understanding", save(render(s), f"u{i}.png"), None, f"Q: {q}<br>model: {html.escape(ans)}"
                     f"<br>truth: {html.escape(a)}<br>{verdict(check_answer(q, ans, s))}"))
    prompts = [sample_gen_prompt(rng, GEN_CATEGORIES[i % len(GEN_CATEGORIES)]).text for i in range(n)]
    encs = [engine.processor.encode([{"role": "user", "content": p}], assistant_prefix=GEN_REPLY.format(p=p))
            for p in prompts]
    for i, (p, img) in enumerate(zip(prompts, engine.generate_images(encs, ImageParams(seed=seed)), strict=True)):
        ok = check_gen(parse_gen_prompt(p), read_image(fit_canvas(img.image)))
        rows.append(("generation", save(img.image, f"g{i}.png"), None,
                     f"{html.escape(p)} (seed {img.seed})<br>{verdict(ok)}"))
    for i in range(n):
        while (r := sample_edit(rng, scene := random_scene(rng))) is None:
            pass
        edit, target = r
        enc = engine.processor.encode([{"role": "user", "content": [{"type": "image", "image": render(scene)},
                                                                    {"type": "text", "text": edit.text}]}])
        (reply,) = engine.write_replies([enc])  # the model's own sentence before its image
        (img,) = engine.generate_images([enc], ImageParams(seed=seed + i))
        rows.append(("editing", save(render(scene), f"e{i}_src.png"), save(img.image, f"e{i}_out.png"),
                     f"{html.escape(edit.text)}<br>reply: {html.escape(reply)}"
                     f"<br>expected: <img src=\"{save(render(target), f'e{i}_want.png')}\">"
                     f"<br>{verdict(reads_back(img.image, target))}"))
    body = []
    for task in ("understanding", "generation", "editing"):
        body.append(f"<h2>{task}</h2><table>")
        for t, a, b, text in rows:
            if t == task:
                imgs = f'<img src="{a}">' + (f' &rarr; <img src="{b}">' if b else "")
                body.append(f"<tr><td>{imgs}</td><td>{text}</td></tr>")
        body.append("</table>")
    page = out / "index.html"
    page.write_text("<!doctype html><meta charset=utf-8><title>vargpt demo</title>"
                    "<style>body{font-family:sans-serif} img{image-rendering:pixelated;border:1px solid #ccc}"
                    "td{padding:4px 12px}</style><h1>vargpt demo</h1>" + "".join(body))
    return page
