"""How well the decoder draws the editing suite's expected scenes from their captions alone: each held-out edit's
target caption as a plain generation prompt (no source image, no instruction; the reply "Here is {caption}." as the
generation suite writes it), with the editing suite's seeds and the checkpoint's sampling defaults, read back by the
scorer. Printed by the number of objects, beside the editing suite's pass rate where the model's reply was right
(from its JSON), so the drawing of a caption with and without the edit's context can be compared (EVAL.md run 31f).

usage: python scripts/caption_draw.py CHECKPOINT EDITING_JSON [--cfg X --temperature X --top-p X]
(EDITING_JSON: ``vargpt eval shapes --checkpoint CHECKPOINT --suite editing --out DIR`` -> DIR/editing.json; the
sampling options, each left out: the checkpoint's default)
"""

import argparse
import json
import sys
from collections import Counter

from vargpt.data.shapes.tasks import EDIT_PLAN_REPLY
from vargpt.engine import Engine
from vargpt.eval.shapes import GEN_REPLY, _batches, editing_items, read_caption, reads_back
from vargpt.generation.params import ImageParams

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("checkpoint")
parser.add_argument("editing_json")
parser.add_argument("--cfg", type=float)
parser.add_argument("--temperature", type=float)
parser.add_argument("--top-p", type=float)
args = parser.parse_args()
engine = Engine.load(args.checkpoint)
suite = json.loads(open(args.editing_json).read())["items"]
items = editing_items()
if len(suite) != len(items) or any(s["expected"] != read_caption(it["target"].objects)
                                   for s, it in zip(suite, items, strict=True)):
    sys.exit(f"{args.editing_json}: not the full editing suite's items in order (expected {len(items)} edits)")
# the editing suite's seeds (from 0 in item order); the checkpoint's sampling defaults where an option is left out
params = ImageParams(cfg_scale=args.cfg, temperature=args.temperature, top_p=args.top_p)
batch = 32
n, drawn, right, right_pass = Counter(), Counter(), Counter(), Counter()
for b, chunk in enumerate(_batches(items, batch, "captions")):
    caps = [read_caption(it["target"].objects) for it in chunk]
    encs = [engine.processor.encode([{"role": "user", "content": c}], assistant_prefix=GEN_REPLY.format(p=c))
            for c in caps]
    imgs = engine.generate_images(encs, params, seeds=[params.seed + b * batch + i for i in range(len(chunk))])
    for i, (it, img) in enumerate(zip(chunk, imgs, strict=True)):
        k, s = len(it["target"].objects), suite[b * batch + i]
        n[k] += 1
        drawn[k] += reads_back(img.image, it["target"])
        if s["reply"] == EDIT_PLAN_REPLY.format(caption=s["expected"]):
            right[k] += 1
            right_pass[k] += s["pass"]
for k in sorted(n) + ["all"]:
    a, d, r, rp = (sum(c.values()) if k == "all" else c[k] for c in (n, drawn, right, right_pass))
    print(f"{k} object(s): {a} edits; caption alone drawn right {d / a:.3f}; "
          f"edits with a right reply {r}, passed {rp / max(1, r):.3f}")
