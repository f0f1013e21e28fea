"""Training: the shared loop (``loop``), its run state and checkpoints (``state``), stages and recipes
(``recipes``). Objectives (SFT, DPO, VAE, LoRA) contribute a ``step_fn`` and a collator; see docs/training.md."""

from vargpt.train.loop import StepInfo, TrainConfig, TrainConfigError, TrainResult, default_step_fn, train
from vargpt.train.recipes import RECIPES, STAGES, Recipe, Stage, apply_stage, get_recipe, stage3_schedule
from vargpt.train.state import DataPosition, ResumableBatchSampler, latest_checkpoint

__all__ = ["train", "TrainConfig", "TrainConfigError", "TrainResult", "StepInfo", "default_step_fn", "STAGES",
           "Stage", "apply_stage", "Recipe", "RECIPES", "get_recipe", "stage3_schedule", "DataPosition",
           "ResumableBatchSampler", "latest_checkpoint"]
