"""The final sampling choice of a finished Shapes run again, with the current recipe's settings: the candidate of
``SAMPLING_CANDIDATES`` scoring best on the validation generation prompts and, with ``sampling_edits`` > 0, the
validation edits (``_select_sampling(edits=True)``, EVAL.md "Probes after run 23"), written as CHECKPOINT's sampling
defaults (``image_generation_config.json``). The choice runs after the last training step and is seeded, so on a run
made before ``sampling_edits`` existed it gives the defaults the current recipe would have shipped with the same
weights. The run's settings come from RUN_DIR/run_config.json; fields it lacks take the current defaults.

usage: python scripts/shapes_choose_sampling.py RUN_DIR [CHECKPOINT]   (CHECKPOINT: default RUN_DIR/final)
"""

import sys
from pathlib import Path

import torch

from vargpt.checkpoint import load_model
from vargpt.generation.params import save_sampling_defaults
from vargpt.processing.processor import Processor
from vargpt.train.shapes import ShapesRunConfig, _select_sampling

run_dir = Path(sys.argv[1])
ckpt = Path(sys.argv[2]) if len(sys.argv) > 2 else run_dir / "final"
run, _ = ShapesRunConfig.from_run(run_dir)
torch.manual_seed(run.seed)
model = load_model(ckpt, dtype=torch.float32)
sampling = _select_sampling(model, Processor.from_dir(ckpt, model.config), run, run_dir, "choice", edits=True)
save_sampling_defaults(ckpt, sampling)
print(f"{ckpt}: {sampling}")
