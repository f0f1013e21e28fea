"""The last steps of a finished Shapes run again with the current recipe's settings (``rerun_editing``): from
RUN_DIR/post_dpo (or, ``--start pre_dpo``, the stage-3d DPO round first) the editing SFT, the DPO round on caption
prompts and the final sampling choice, into OUT_DIR/final (log in OUT_DIR/log.txt); ``--start final``: from
RUN_DIR/final the caption DPO round and the sampling choice only. The run's settings come from
RUN_DIR/run_config.json; fields it lacks (options added after the run) take the current defaults, and ``--set
KEY=VALUE`` (as for ``vargpt train shapes``) sets a field over both. Everything before these steps is the run's
own; the phases' random streams are seeded with the run's seed at the first rerun step rather than carried on.

usage: python scripts/shapes_rerun_editing.py RUN_DIR OUT_DIR [--start post_dpo|pre_dpo|final] [--data DIR]
       [--set KEY=VALUE ...]
(--data: the run's training split, default RUN_DIR/data; a rerun's OUT_DIR has none, e.g. run 31f's: runs/probe34
with --data runs/shapes31/data)
"""

import argparse
import sys
from pathlib import Path

from vargpt.train.run_config import TrainCommandError, apply_sets
from vargpt.train.shapes import ShapesRunConfig, rerun_editing

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("run_dir", type=Path)
parser.add_argument("out_dir", type=Path)
parser.add_argument("--start", default="post_dpo", choices=("post_dpo", "pre_dpo", "final"))
parser.add_argument("--data", type=Path, help="the run's training split (default RUN_DIR/data)")
parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a ShapesRunConfig field over the run's settings (repeatable)")
args = parser.parse_args()
run, missing = ShapesRunConfig.from_run(args.run_dir)
print(f"{args.run_dir}: taking the current defaults for {missing}")
try:
    run = apply_sets(run, args.sets)
except TrainCommandError as e:
    sys.exit(str(e))
print(rerun_editing(args.run_dir, args.out_dir, run, start=args.start, data_dir=args.data))
