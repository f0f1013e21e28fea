"""Where the decoder's drawings go wrong: random scenes drawn from their captions (a plain prompt, the reply "Here is
{caption}." as the generation suite writes it, the checkpoint's sampling defaults, image i with seed i), each object
of the scene looked up in the image read back (SHAPES.md rules) in its own cell. Printed as markdown tables: for
each attribute, the share of objects drawn wrong (missing from their cell, or another shape, colour or size), and for
each cell and shape the share drawn as another shape, beside the same share for the tokenizer's round trip of the
rendered scene (encode, multi-scale BSQ over the generation schedule, decode), which the drawing cannot beat
(EVAL.md "Probes after run 31f").

usage: python scripts/drawing_errors.py CHECKPOINT [--scenes N] [--seed S]
(the scenes: ``eval_scenes(S, N)``, default S = EVAL_SEED + 11 and N = 1600; the decoder draws training captions as
well as held-out ones, EVAL.md, so the stream need not be held out)
"""

import argparse
from collections import Counter

import torch

from vargpt.data.shapes import CELLS, SHAPES, render
from vargpt.data.shapes.grammar import caption
from vargpt.data.shapes.scorer import read_image
from vargpt.data.shapes.tasks import eval_scenes
from vargpt.engine import Engine
from vargpt.eval.shapes import EVAL_SEED, GEN_REPLY, _batches, fit_canvas
from vargpt.generation.params import ImageParams
from vargpt.models.vae import decode_bits, multiscale_encode
from vargpt.models.vae.schedules import get_schedule
from vargpt.processing.image import from_pil, to_pil

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("checkpoint")
parser.add_argument("--scenes", type=int, default=1600)
parser.add_argument("--seed", type=int, default=EVAL_SEED + 11)
args = parser.parse_args()
engine = Engine.load(args.checkpoint)
model = engine.model
schedule = get_schedule(1.0, model.config.gen_schedule)
dtype = next(model.vae.parameters()).dtype
scenes = eval_scenes(args.seed, args.scenes)


def round_trip(chunk):
    """The tokenizer's reconstructions of the rendered scenes."""
    with torch.no_grad():
        x = from_pil([render(s) for s in chunk]).to(engine.device, dtype)
        bits, _ = multiscale_encode(model.vae.encode(x), schedule)
        return to_pil(model.vae.decode(decode_bits(bits, schedule).to(dtype)).float())


def wrong(obj, read) -> tuple[str, ...]:
    """The attributes of ``obj`` that the objects ``read`` back from an image get wrong (("missing",): none in its
    cell)."""
    got = [o for o in read if o.cell == obj.cell]
    if not got:
        return ("missing",)
    return tuple(a for a in ("shape", "color", "size") if getattr(got[0], a) != getattr(obj, a))


n, drawn, tok, attrs = Counter(), Counter(), Counter(), Counter()
B = 32
for b, chunk in enumerate(_batches(scenes, B, "scenes")):
    caps = [caption(s) for s in chunk]
    encs = [engine.processor.encode([{"role": "user", "content": c}], assistant_prefix=GEN_REPLY.format(p=c))
            for c in caps]
    imgs = engine.generate_images(encs, ImageParams(), seeds=[b * B + i for i in range(len(chunk))])
    for scene, img, rec in zip(chunk, imgs, round_trip(chunk), strict=True):
        read, read_rec = read_image(fit_canvas(img.image)), read_image(fit_canvas(rec))
        for o in scene.objects:
            w = wrong(o, read)
            n[o.cell, o.shape] += 1
            attrs["objects"] += 1
            for a in w:
                attrs[a] += 1
            drawn[o.cell, o.shape] += "shape" in w or "missing" in w
            tok[o.cell, o.shape] += bool({"shape", "missing"} & set(wrong(o, read_rec)))

total = attrs.pop("objects")
print(f"{args.checkpoint}: {len(scenes)} scenes, {total} objects\n")
print("| drawn wrong | " + " | ".join(["missing", "shape", "color", "size"]) + " |")
print("|---|" + "---|" * 4)
print("| share of objects | " + " | ".join(f"{attrs[a] / total:.3f}" for a in ("missing", "shape", "color", "size"))
      + " |\n")
print("| cell | " + " | ".join(f"{s}: drawn / tokenizer" for s in SHAPES) + " | all: drawn / tokenizer |")
print("|---|" + "---|" * (len(SHAPES) + 1))


def cell_row(keys) -> str:
    k = sum(n[x] for x in keys)
    return f"{sum(drawn[x] for x in keys) / k:.3f} / {sum(tok[x] for x in keys) / k:.3f} ({k})" if k else "-"


for cell in CELLS:
    print(f"| {cell} | " + " | ".join(cell_row([(cell, s)]) for s in SHAPES) + " | "
          + cell_row([(cell, s) for s in SHAPES]) + " |")
print("| all | " + " | ".join(cell_row([(c, s) for c in CELLS]) for s in SHAPES) + " | "
      + cell_row(list(n)) + " |")
