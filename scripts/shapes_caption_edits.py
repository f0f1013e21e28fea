"""The editing SFT with captioned replies, continued from a finished Shapes run: how the shipped checkpoint
(``checkpoints/shapes``, run 21 + this script twice; EVAL.md "Run 22 and the shipped model") was made.

Reads ``runs/shapes21`` (``vargpt train shapes --out runs/shapes21`` with the defaults: run 21's recipe) and starts
from its ``post_dpo`` checkpoint, or from START. Each edit of the run's training split gets the reply "Here is
{caption of the edited scene}." (the caption read back from the target image, which the scorer reads exactly);
each of the first N_CAPTIONS understanding images becomes a caption record (its caption, wrapped in a varied
instruction, -> the image). The mix (these, 3,000 generation records and 3,000 questions) trains the LLM at 1e-4
and the decoder and the projectors at 3e-4 for STEPS steps (batch 16), keeps the start checkpoint's sampling
defaults, writes OUT/final, and evaluates it (the full editing and understanding suites, 50 generation prompts per
category). The shipped checkpoint:

    python scripts/shapes_caption_edits.py runs/plan1 1500                        # 7.8 min
    python scripts/shapes_caption_edits.py runs/plan2 1500 3000 runs/plan1/final  # 12.4 min (beside a test run)
    vargpt convert runs/plan2/final checkpoints/shapes --dtype bf16

usage: python scripts/shapes_caption_edits.py OUT STEPS [N_CAPTIONS [START]]
"""
import random
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from vargpt.checkpoint import load_model
from vargpt.data.records import Message, SFTRecord, load_records
from vargpt.data.shapes import read_image
from vargpt.data.shapes.tasks import GEN_WRAPPERS
from vargpt.engine import Engine
from vargpt.eval.shapes import read_caption, run_suite
from vargpt.generation.params import load_sampling_defaults
from vargpt.processing.processor import Processor
from vargpt.train.shapes import FULL_RES, SHAPES_STAGES, ShapesRunConfig, _log, _save, _set_schedule, _sft

out, steps = Path(sys.argv[1]), int(sys.argv[2])
n_captions = int(sys.argv[3]) if len(sys.argv) > 3 else 3000
out.mkdir(parents=True, exist_ok=True)
src = Path("runs/shapes21")
start = Path(sys.argv[4]) if len(sys.argv) > 4 else src / "post_dpo"
run = ShapesRunConfig()  # its batch size, seed, prompt drop rate and bf16 autocast (run 21's, the defaults)
model = load_model(start, dtype=torch.float32)
proc = Processor.from_dir(start, model.config)
sampling = load_sampling_defaults(start)
recs = {n: load_records(src / "data" / f"{n}.jsonl").records for n in ("understanding", "generation", "editing")}
torch.manual_seed(0)
rng = random.Random(5)


def cap(path) -> str:
    """The canonical caption of a rendered scene, read back from its image."""
    return read_caption(read_image(Image.open(path).convert("RGB")))


edits = [SFTRecord((r.messages[0], Message("assistant", f"Here is {cap(r.images[1])}.<image_gen>")), r.images,
                   source=r.source) for r in recs["editing"]]
captions = []
for r in recs["understanding"][:n_captions]:
    c = cap(r.images[0])
    captions.append(SFTRecord((Message("user", rng.choice(GEN_WRAPPERS).format(p=c)),
                               Message("assistant", f"Here is {c}.<image_gen>")), (r.images[0],), source=r.source))
print(edits[0].messages, captions[0].messages)
mix = edits + captions + recs["generation"][:3000] + recs["understanding"][:3000]
_set_schedule(model, FULL_RES)
t0 = time.time()
losses = _sft(model, proc, mix, SHAPES_STAGES["edit"], steps, run, out, "plan", lr=3e-4,
              module_lr={"backbone.model.language_model": 1e-4})
_log(out, f"plan: {steps} steps loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f} in "
          f"{(time.time() - t0) / 60:.1f} min")
_save(model, proc, out / "final", sampling)
engine = Engine(model.eval(), proc, sampling=sampling)
for suite, limit in (("editing", None), ("generation", 50), ("understanding", None)):
    t1 = time.time()
    result = run_suite(engine, suite, limit=limit, out_dir=out / f"eval_{suite}")
    _log(out, f"{suite} ({limit}): " + " ".join(f"{k} {v:.3f}" for k, v in result.scores.items()) +
              f" [{time.time() - t1:.0f}s]")
