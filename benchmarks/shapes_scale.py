"""The Shapes recipe with more training steps, on any device: how far does more compute take the same recipe?

The shipped recipe (``vargpt train shapes``) is sized for 90 minutes on a 2-core CPU, and every quality target of
the Shapes model is missed there. This script runs the same recipe (``run_shapes``) with the step counts of the
SFT phases multiplied by ``--scale`` (data, model and everything else unchanged) and scores the final checkpoint on
the full held-out suites, the pre-/post-DPO checkpoints on the generation suite. Meant for a GPU machine, where the
recipe runs many times faster; the results are reported in EVAL.md, never shipped.

    python benchmarks/shapes_scale.py --out runs/scale3 --scale 3 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from vargpt.engine import Engine
from vargpt.eval.shapes import run_suite
from vargpt.train.shapes import ShapesRunConfig, run_shapes

#: The phases whose step counts ``--scale`` multiplies (the tokenizer, stage 1 and DPO keep theirs).
SCALED = ("stage2_warmup_steps", "stage2_steps", "stage3a_steps", "stage3c_steps", "edit_steps")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="a fresh folder")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplier of the SFT phases' step counts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--padding", default=None, choices=("zeros", "replicate"),
                    help="the tokenizer's padding mode (default: the shapes preset's)")
    ap.add_argument("--quick", action="store_true", help="start from ShapesRunConfig.quick() (a smoke test)")
    ap.add_argument("--limit", type=int, default=None, help="items per category of each suite (default: all)")
    args = ap.parse_args()

    base = ShapesRunConfig.quick() if args.quick else ShapesRunConfig()
    run = dataclasses.replace(base, device=args.device, vae_padding_mode=args.padding,
                              **{f: round(getattr(base, f) * args.scale) for f in SCALED})
    t0 = time.perf_counter()
    run_shapes(args.out, run)
    train_min = (time.perf_counter() - t0) / 60
    scores: dict = {"scale": args.scale, "padding": args.padding, "device": args.device,
                    "train_minutes": round(train_min, 2), "steps": {f: getattr(run, f) for f in SCALED}}
    for name, suites in (("final", ("understanding", "generation", "editing", "tokenizer")),
                         ("pre_dpo", ("generation",)), ("post_dpo", ("generation",))):
        engine = Engine.load(args.out / name, device=args.device)
        for suite in suites:
            scores[f"{name}/{suite}"] = run_suite(engine, suite, limit=args.limit).scores
            print(name, suite, json.dumps(scores[f"{name}/{suite}"]), flush=True)
    (args.out / "scores.json").write_text(json.dumps(scores, indent=1))
    print(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
