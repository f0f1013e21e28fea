"""The final sampling choice of a finished Shapes run again, with the current recipe's settings: the candidate of
``SAMPLING_CANDIDATES`` scoring best on the validation generation prompts and, with ``sampling_edits`` > 0, the
validation edits (``_select_sampling(edits=True)``, EVAL.md "Probes after run 23"), written as CHECKPOINT's sampling
defaults (``image_generation_config.json``). The choice runs after the last training step and is seeded, so on a run
made before ``sampling_edits`` existed it gives the defaults the current recipe would have shipped with the same
weights. The run's settings come from RUN_DIR/run_config.json; fields it lacks take the current defaults, and
``--set KEY=VALUE`` (as for ``vargpt train shapes``) sets a field over both. The choice is logged in RUN_DIR/log.txt
(``--log-dir``: elsewhere); ``--dry-run`` writes no sampling defaults.

usage: python scripts/shapes_choose_sampling.py RUN_DIR [CHECKPOINT] [--set KEY=VALUE ...] [--log-dir DIR] [--dry-run]
       (CHECKPOINT: default RUN_DIR/final)
"""

import argparse
import sys
from pathlib import Path

import torch

from vargpt.checkpoint import load_model
from vargpt.generation.params import save_sampling_defaults
from vargpt.processing.processor import Processor
from vargpt.train.run_config import TrainCommandError, apply_sets
from vargpt.train.shapes import ShapesRunConfig, _select_sampling

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("run_dir", type=Path)
parser.add_argument("checkpoint", type=Path, nargs="?")
parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a ShapesRunConfig field over the run's settings (repeatable)")
parser.add_argument("--log-dir", type=Path, help="where the choice is logged (log.txt; default RUN_DIR)")
parser.add_argument("--dry-run", action="store_true", help="log the choice without writing it into CHECKPOINT")
args = parser.parse_args()
ckpt = args.checkpoint or args.run_dir / "final"
run, _ = ShapesRunConfig.from_run(args.run_dir)
try:
    run = apply_sets(run, args.sets)
except TrainCommandError as e:
    sys.exit(str(e))
log_dir = args.log_dir or args.run_dir
log_dir.mkdir(parents=True, exist_ok=True)
torch.manual_seed(run.seed)
model = load_model(ckpt, dtype=torch.float32)
sampling = _select_sampling(model, Processor.from_dir(ckpt, model.config), run, log_dir, "choice", edits=True)
if not args.dry_run:
    save_sampling_defaults(ckpt, sampling)
print(f"{ckpt}: {sampling}" + (" (dry run: not written)" if args.dry_run else ""))
