"""Training stages (freeze policies) and recipes of VARGPT-v1.1 (SPEC.md §4.2, §4.3).

A ``Stage`` names the parameters that train; ``apply_stage(model, stage)`` sets ``requires_grad`` accordingly. The
ViT encoder (patch embedding and blocks) and the VAE are frozen in every stage; a custom ``Stage`` that tries to
train them is rejected.

| stage | trainable (our names) | official (``vargpt_train_stage``, SPEC §4.2) |
|---|---|---|
| stage1 | ``gen_proj_in``, ``gen_proj_out``, ``decoder.start_embedding`` | 1: both gen projectors, ``sos_embedding`` |
| stage2 | ``backbone.model.language_model``, ``backbone.lm_head`` | 2: ``model.*``, ``lm_head`` |
| stage3 | ``decoder``, ``gen_proj_in``, ``gen_proj_out`` | 3: ``vargpt_gen``, both projectors, ``sos_embedding`` |
| edit   | as stage3 (**UNKNOWN** in the sources, SPEC §4.5) | — |
| dpo    | as stage3 (**UNKNOWN**, "most likely the stage-3 set", SPEC §4.6) | — |

Figure/code disagreement (stage 2): the paper's figure trains the "understanding projector" (Qwen2-VL's patch
merger), but the merger lives under ``visual.*``, which the official code freezes by prefix. We follow the code.
To train the merger as the figure says, use ``Stage("stage2-figure", trainable=STAGES["stage2"].trainable +
("backbone.model.visual.merger",))``.

Our ``decoder.start_embedding`` is the one used row of the official 151,658-row ``sos_embedding``;
``decoder.uncond_embedding`` is Infinity's ``cfg_uncond`` (part of ``vargpt_gen``, so frozen in stage 1 as
officially). It only receives gradient on steps where condition dropout replaces a start vector.

Recipes carry the known hyper-parameters (SPEC §4.3: AdamW, lr 5e-5, cosine, warm-up ratio 0.1, clip 1.0, weight
decay 0, bf16, per-device batch 1 x accumulation 2 from the released stage-3 demo config) and the generation
resolution. Everything else (per-stage lr, batch, steps of stages 1-2, DPO beta) is **UNKNOWN**; the defaults below
are those of the demo config, marked as such.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from vargpt.train.loop import TrainConfig

__all__ = ["Stage", "STAGES", "ALWAYS_FROZEN", "apply_stage", "trainable_names", "Recipe", "RECIPES", "get_recipe",
           "stage3_schedule"]

# never trained: the ViT encoder (its merger may be, see the module docstring) and the VAE
ALWAYS_FROZEN: tuple[str, ...] = ("backbone.model.visual.patch_embed", "backbone.model.visual.blocks", "vae")


@dataclass(frozen=True, kw_only=True)
class Stage:
    """A freeze policy: ``trainable`` holds module paths / parameter names of ``VARGPT``; a parameter trains iff its
    name equals one of them or starts with one followed by a dot."""

    name: str
    trainable: tuple[str, ...]
    official_stage_id: int | None = None
    note: str = ""
    # models trained from scratch (the Shapes model) have no pretrained ViT: such a stage may train it
    train_vit: bool = False


_STAGE3 = ("decoder", "gen_proj_in", "gen_proj_out")
STAGES: dict[str, Stage] = {
    "stage1": Stage(name="stage1", trainable=("gen_proj_in", "gen_proj_out", "decoder.start_embedding"),
                    official_stage_id=1, note="pre-training: the generation projectors and the start vector"),
    "stage2": Stage(name="stage2", trainable=("backbone.model.language_model", "backbone.lm_head"),
                    official_stage_id=2,
                    note="understanding SFT: LLM + lm_head; the ViT merger stays frozen as in the official code "
                         "(the paper's figure trains it)"),
    "stage3": Stage(name="stage3", trainable=_STAGE3, official_stage_id=3,
                    note="iterative generation training: visual decoder + both generation projectors"),
    "edit": Stage(name="edit", trainable=_STAGE3,
                  note="editing SFT: trainable set UNKNOWN in the sources (SPEC §4.5); stage-3 set assumed"),
    "dpo": Stage(name="dpo", trainable=_STAGE3,
                 note="DPO: trainable set UNKNOWN (SPEC §4.6, 'most likely the stage-3 set'); stage-3 set assumed"),
}


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def trainable_names(model: nn.Module, stage: str | Stage) -> list[str]:
    """Names of the parameters ``stage`` trains, in ``named_parameters`` order (nothing is modified)."""
    stage = STAGES[stage] if isinstance(stage, str) else stage
    names = [n for n, _ in model.named_parameters()]
    unmatched = [p for p in stage.trainable if not any(_matches(n, (p,)) for n in names)]
    if unmatched:
        raise ValueError(f"stage {stage.name!r}: {unmatched} match no parameter of {type(model).__name__} "
                         "(apply stages to the VARGPT module itself, before wrapping it)")
    chosen = [n for n in names if _matches(n, stage.trainable)]
    frozen = ("vae",) if stage.train_vit else ALWAYS_FROZEN
    forbidden = [n for n in chosen if _matches(n, frozen)]
    if forbidden:
        raise ValueError(f"stage {stage.name!r} would train {forbidden[:3]}...: the ViT encoder and the VAE are frozen "
                         "in every stage (a from-scratch stage may train the ViT with train_vit=True; the VAE is "
                         "trained on its own, vargpt.train.vae)")
    return chosen


def apply_stage(model: nn.Module, stage: str | Stage) -> list[str]:
    """Set ``requires_grad`` for ``stage`` (a name in ``STAGES`` or a ``Stage``); returns the trainable names."""
    if isinstance(stage, str) and stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; expected one of {sorted(STAGES)}")
    chosen = set(trainable_names(model, stage))
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return [n for n, _ in model.named_parameters() if n in chosen]


# ------------------------------------------------------------------------------------------------------ recipes
def _demo_config(**overrides) -> TrainConfig:
    """The released stage-3 demo configuration (SPEC §4.3) with ``overrides``."""
    base = dict(lr=5e-5, weight_decay=0.0, warmup_ratio=0.1, max_grad_norm=1.0, mixed_precision="bf16",
                batch_size=1, grad_accum=2)
    return TrainConfig(**{**base, **overrides})


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """One training phase: a stage, an objective, the generation resolution and default hyper-parameters.

    ``gen_schedule`` is the scale schedule of the generation targets (``"0.06M"`` = 256 px / 16x16 latent,
    ``"0.25M"`` = 512 px / 32x32); set it on the model config (``model_config``) and size the data to it.
    ``reference`` (DPO only) names the phase whose final checkpoint is the frozen reference model.
    """

    name: str
    stage: str
    objective: Literal["sft", "dpo"]
    gen_schedule: str
    train: TrainConfig = field(default_factory=_demo_config)
    reference: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"Recipe.stage: unknown stage {self.stage!r}; expected one of {sorted(STAGES)}")
        if (self.objective == "dpo") != (self.reference is not None):
            raise ValueError(f"Recipe.reference: a DPO recipe needs a reference phase and only DPO has one "
                             f"({self.name}: objective={self.objective!r}, reference={self.reference!r})")

    def train_config(self, **overrides) -> TrainConfig:
        """The recipe's TrainConfig with ``overrides`` (e.g. ``max_steps``, ``out_dir``), validated again."""
        return dataclasses.replace(self.train, **overrides)

    def model_config(self, cfg):
        """``cfg`` (a VARGPTConfig) with this recipe's generation schedule."""
        return dataclasses.replace(cfg, gen_schedule=self.gen_schedule)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(name="stage1", stage="stage1", objective="sft", gen_schedule="0.06M",
               note="8.3M generation pairs; lr/batch/steps UNKNOWN (demo values); 256 px probable (SPEC §7.2)"),
        Recipe(name="stage2", stage="stage2", objective="sft", gen_schedule="0.06M",
               note="1.2M understanding mix + 50K generation samples; hyper-parameters UNKNOWN (demo values)"),
        Recipe(name="stage3a", stage="stage3", objective="sft", gen_schedule="0.06M",
               train=_demo_config(max_steps=40_000), note="generation SFT, 256x256, 40K steps"),
        Recipe(name="stage3b", stage="dpo", objective="dpo", gen_schedule="0.06M", reference="stage3a",
               train=_demo_config(max_steps=5_000), note="DPO, 256x256, 5K steps; lr/beta UNKNOWN"),
        Recipe(name="stage3c", stage="stage3", objective="sft", gen_schedule="0.25M",
               train=_demo_config(max_steps=30_000),
               note="generation SFT, 512x512, 30K steps; whether optimizer/scheduler restart is UNKNOWN (we restart)"),
        Recipe(name="stage3d", stage="dpo", objective="dpo", gen_schedule="0.25M", reference="stage3c",
               train=_demo_config(max_steps=3_000), note="DPO, 512x512, 3K steps; lr/beta UNKNOWN"),
        Recipe(name="edit", stage="edit", objective="sft", gen_schedule="0.25M",
               note="StyleBooth editing SFT at 512x512 (VARGPT-v1.1-edit); modules, steps and lr UNKNOWN"),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[name]


def stage3_schedule() -> list[Recipe]:
    """Stage 3 as data: SFT 256 -> DPO 256 (reference = the SFT 256 result) -> SFT 512 -> DPO 512 (reference = the
    SFT 512 result). Each phase starts from the previous phase's final weights with a fresh optimizer and schedule."""
    return [RECIPES[n] for n in ("stage3a", "stage3b", "stage3c", "stage3d")]
