"""The last steps of a finished Shapes run again with the current recipe's settings (``rerun_editing``): from
RUN_DIR/post_dpo (or, ``--start pre_dpo``, the stage-3d DPO round first) the editing SFT and the final sampling
choice, into OUT_DIR/final (log in OUT_DIR/log.txt). The run's settings come from RUN_DIR/run_config.json; fields it
lacks (options added after the run) take the current defaults. Everything before these steps is the run's own; the
phases' random streams are seeded with the run's seed at the first rerun step rather than carried on.

usage: python scripts/shapes_rerun_editing.py RUN_DIR OUT_DIR [--start post_dpo|pre_dpo]
"""

import argparse
from pathlib import Path

from vargpt.train.shapes import ShapesRunConfig, rerun_editing

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("run_dir", type=Path)
parser.add_argument("out_dir", type=Path)
parser.add_argument("--start", default="post_dpo", choices=("post_dpo", "pre_dpo"))
args = parser.parse_args()
run, missing = ShapesRunConfig.from_run(args.run_dir)
print(f"{args.run_dir}: taking the current defaults for {missing}")
print(rerun_editing(args.run_dir, args.out_dir, run, start=args.start))
