"""``ShapesRunConfig``: the sizes, step counts and options of the Shapes recipe (``vargpt.train.shapes.run_shapes``;
``vargpt train shapes --set KEY=VALUE`` sets any field). The defaults are the shipped model's recipe: run 31 (the
recipe of run 30, 85.8 min on run 30's machine on 2026-12-07, with its editing SFT at ``edit_lr=1e-3``; run 31 took
152.4 min on a machine about 1.9x slower, EVAL.md "Run 31") with its editing SFT's LLM at ``edit_llm_lr=3e-4``,
12,000 editing steps rather than 6,000 and the final sampling choice on 400 validation edits, which the shipped
checkpoint ran again from run 31's ``post_dpo`` (EVAL.md "Run 31f"; the doubled editing SFT takes about 63 min more
on that slower machine, about 33 more on run 30's, so the one command no longer fits 90 min), then a DPO round
on caption prompts (``edit_dpo_prompts``; EVAL.md "Run 31g", about 9 min more on this machine) and one on edits
(``edit_dpo_edits``; EVAL.md "Run 31h", about 13 min more), with the LLM trained alone on the replies before
them (``reply_steps``; EVAL.md "Run 31i", about 19 min more). What each option did in the runs that tried it is in
EVAL.md."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from vargpt.data.shapes import GEN_CATEGORIES
from vargpt.data.shapes.grammar import LAYOUTS, MULTI_OBJECT_CATEGORIES, check_question_kinds
from vargpt.data.shapes.tasks import EDIT_REPLY_MODES

SHAPES_PRESETS = ("shapes", "shapes-small")

__all__ = ["ShapesRunConfig", "LLM_MODULES"]

#: the LLM's parameters (``ShapesRunConfig.llm_lr``): the decoder-only transformer with its embeddings, and the head
LLM_MODULES: tuple[str, ...] = ("backbone.model.language_model", "backbone.lm_head")


@dataclass(kw_only=True)
class ShapesRunConfig:
    """Sizes and step counts of the Shapes run (defaults: the shipped model; ``quick()`` for a smoke run)."""

    seed: int = 0
    n_understanding: int = 16000  # answers are a few tokens: stage 2 sees more of them than of the rest
    n_single: int = 4000  # questions about one-object scenes (the warm-up of stage 2)
    n_generation: int = 6000
    # each category with two or more objects (``MULTI_OBJECT_CATEGORIES``) this many times per cycle of the
    # generation split's categories (1: uniform, the shipped run 8; run 9 had 2 with n_generation=9000 and scored
    # lower: the one-object categories lost more than the multi-object ones gained, EVAL.md run 9)
    multi_object_weight: int = 1
    # position records whose relation is "above" or "below" added to the ``n_generation`` generation records
    # (``build_split(n_vertical=...)``). With the fixed layout only these prompts and the cell category put objects in
    # the top and bottom cells, and run 18 failed 60 of its 107 above/below suite prompts against 8 of 93 left/right
    # ones; from run 18's pre_dpo, 400 frozen stage-3c steps with 1,477 more of them: position 0.62 -> 0.81 on 800
    # suite prompts (EVAL.md "Probe after run 18"). In a full run (run 19, 1,500 with two other changes) above/below
    # passed as often as in run 18 and pre-DPO generation fell 0.906 -> 0.849. 0: none (runs 1-18, 20-21)
    n_vertical: int = 0
    # edits (runs 1-27: 3000). From run 24's post_dpo, its editing SFT with 12,000 edits and 12,000 caption records
    # (probe 28): understanding 0.898 -> 0.934, editing 0.306 -> 0.318; in a full run (run 28, with ``n_captions``
    # 12000 and ``vae_edits=3000``): understanding 0.933, but editing 0.248 and a DPO gain of +0.004; run 29 (the
    # recipe shipped before run 30: run 28 with ``stage3c_steps=2000``): understanding 0.929, editing 0.290; run 30
    # (with ``vae_scenes=6000``): 0.934, 0.310; run 30e (its editing SFT at ``edit_lr=1e-3``):
    # 0.939, 0.386; run 31e (the LLM at ``edit_llm_lr=3e-4`` too): 0.957, 0.488; run 31f (the shipped recipe, 12,000
    # editing steps): 0.977, 0.574 (EVAL.md)
    n_editing: int = 12000
    # "fixed" (runs 1-21): an edit's reply is one of ``EDIT_REPLIES`` ("Done."), and editing
    # scored 0 to 0.002 in every run: the decoder never learned to redraw the source from the LLM's states.
    # "caption" (run 22): the reply names the edited scene ("Here is a small red circle in the top left, ...";
    # ``build_split(edit_reply=...)``): the LLM writes the edit out in text, as it writes a description, and the
    # decoder draws what the text says, as it draws a prompt. From run 21's post_dpo, 3,000 steps of the editing SFT
    # with the LLM on such edits and captions: editing 0.002 -> 0.144; run 22 (with every run-22 value below): editing
    # 0.146, generation 0.842 with position 0.590 (EVAL.md "Run 22 and the model shipped before run 23"); run 23
    # (captions and edits in the editing SFT only): editing 0.198, generation 0.911; run 24 (6,000 editing steps):
    # editing 0.306; run 29: 0.290; run 30: 0.310; run 30e: 0.386; run 31e: 0.488; run 31f (the shipped recipe):
    # 0.574.
    # "cells": the same scene as a ``cell_plan``, each object's cell before its attributes ("Here is in the top left
    # a small red circle, ..."; the caption records' replies too): in run 24's wrong replies the cells are right and
    # the attributes go to the wrong object, and with the cell named first the LLM reads the object it has just
    # placed
    edit_reply: str = "caption"
    # caption-to-image records (``build_split(n_captions=...)``: random scenes drawn from their canonical caption,
    # what an edit's reply names) in the editing SFT's mix (and, ``stage3_captions``, stage 3's); 0: none (runs 1-21;
    # run 22: 6000; runs 23-27: 3000; runs 28-30, the shipped recipe: 12000, with ``n_editing``). After run 24's
    # editing SFT 0.628 of the one-object edits pass, 0.277 of the two-object and 0.050 of the three-object ones
    # (run 29: 0.559 / 0.303 / 0.031; run 30: 0.614 / 0.297 / 0.050; run 30e: 0.710 / 0.400 / 0.075; run 31e:
    # 0.800 / 0.487 / 0.206; run 31f: 0.821 / 0.631 / 0.281): the decoder draws a named cell for one object, rarely
    # several
    n_captions: int = 12000
    # the first this many caption records in stage 3's mixes (the frozen phase of stage 3c included); the editing SFT
    # has all of them. Run 22: 6000, and half of stage 3's generation steps went to captions and edits (generation
    # 0.842, position 0.590); 0: none (runs 1-21, 23-24)
    stage3_captions: int = 0
    # describe records (``describe_records``: "<image>Describe the image." -> the caption) of the first this many
    # caption images with two or three objects, in the editing SFT's mix, and the first ``stage2_describe`` of them
    # in stage 2's. After run 24 describe scored 0.677 (every other question kind >= 0.896): the LLM attaches
    # attributes to the wrong object. From run 24's final, 1,500 more editing-SFT steps with 2,730 of them: describe
    # 0.665 -> 0.799, understanding 0.892 -> 0.919, editing 0.306 either way (EVAL.md "Probe after run 24");
    # 0: none (runs 1-24, the shipped recipe). Run 25 (both 3000): describe 0.848, understanding 0.913, but generation
    # 0.878 (pre-DPO 0.813 against run 24's 0.905) and editing 0.286; run 24's editing SFT again from its post_dpo with
    # ``n_describe=3000`` (``scripts/shapes_rerun_editing.py``): understanding 0.924, generation 0.896, editing 0.266
    # against run 24's 0.898, 0.909 and 0.306 (EVAL.md run 25 and "Rerun 24d"); run 29's editing SFT again with
    # ``n_describe=12000`` (10,861 records): understanding 0.929 -> 0.941, editing 0.290 -> 0.232 (EVAL.md "Probe
    # after run 29")
    n_describe: int = 0
    stage2_describe: int = 0
    stage2_generation: int = 2000  # generation / editing records in stage 2's mix (stage 3 and editing see all)
    # run 22: 3000, where with ``edit_reply="caption"`` the LLM learns to write edits out, with its questions
    stage2_editing: int = 1000
    # ViT pre-training (``vargpt.train.shapes_vit``; 0 = none: the ViT learns in stage 2). Runs 11-15: 1000 (read-back
    # of the validation scenes from its tokens 0.998); runs 16-17: 600 (0.996), 1 min less
    vit_steps: int = 600
    vit_batch: int = 64
    vit_lr: float = 1e-3
    vit_scenes: int = 20000
    vae_steps: int = 3800  # runs 8-14: 3000 (tokenizer read-back 0.943); run 15: 3800 (0.975)
    vae_batch: int = 16
    vae_lr: float = 2e-3
    # understanding images (random scenes of 1-3 objects in any cell, colour and size: the first ``vae_scenes`` of the
    # split's) added to the tokenizer's training images, the generation targets and the edited images. Run 18's
    # fixed targets have three colours and no jitter, and its tokenizer read back 0.957 of the held-out scenes; with
    # 6,000 of them 0.989 and 0.990 (runs 19-20), but pre-DPO generation fell 0.906 -> 0.849 and 0.868, with
    # "A to the right of B" failing about half its prompts (EVAL.md runs 19-20). Run 30 (run 29 with 6000, the shipped
    # recipe): read-back 0.990, and the editing SFT's images read back as their replies more often (0.388 -> 0.442,
    # editing 0.290 -> 0.310), pre-DPO generation 0.841 -> 0.769, final 0.897 -> 0.858 (every category >= 0.73).
    # 0: none (runs 1-18, 21-29)
    vae_scenes: int = 6000
    # the first this many edited images among the tokenizer's training images (None: every one, runs 1-25). With more
    # edits than run 24's 3,000 (``n_editing``) and ``vae_edits=3000`` (runs 28-30, the shipped recipe) the tokenizer
    # trains on run 24's images (runs 28-29: run 24's tokenizer, read-back 0.957; run 30 adds ``vae_scenes``)
    vae_edits: int | None = 3000
    vae_foreground_weight: float = 5.0  # small objects on white: without it every colour collapses (EVAL.md)
    vae_mixed_precision: str = "bf16"
    stage1_steps: int = 200
    stage2_warmup_steps: int = 500
    # phases of questions of some kinds only, in order, before stage 2's mix: "kind+kind:steps" items (e.g.
    # ("color:500", "shape:500")); empty: none (run 8). In stage 2's mix the LLM never learns to look an object up
    # by what a question names (run 8 answers every colour question about a scene with the same colour); on colour
    # questions alone a fresh LLM learns it in 800 steps, but run 10 (``("color:800",)`` without the warm-up) lost
    # it again in the mix and understanding fell 0.745 -> 0.470 (EVAL.md run 10)
    stage2_curriculum: tuple[str, ...] = ()
    # question kinds asked in the understanding split only about scenes of two or three objects
    # (``build_split(multi_object_kinds=...)``): about one object, "What color is the circle?" is answered by reading
    # any object, and that is what run 8's LLM does for every scene; empty: every kind about 1-3 objects (run 8)
    multi_object_questions: tuple[str, ...] = ()
    # the model's ``text_loss_reduction``: "token" (run 8: the mean over every answer token of a batch, so a
    # caption of ~20 tokens outweighs ten one-word answers) or "sample" (each record's mean, then the mean over the
    # batch: a one-word look-up answer weighs as much as a caption)
    text_loss_reduction: str = "token"
    stage2_steps: int = 4000
    stage3a_steps: int = 300
    # run 8: 1300 (its pre-DPO generation 0.349); runs 11-12: 1600 (0.379, 0.448); run 13: 2500, with the LLM
    # trainable (0.471); run 14: 1200 with the LLM, after ``stage3c_frozen_steps`` = 1600 without it (0.569; runs
    # 14-28). From run 28's state after the frozen phase (EVAL.md "Probes after run 28"): 1200 steps again with another
    # seed 0.736 (run 28: 0.769), 2000 steps 0.797, position 0.235 -> 0.495 and colour attribution 0.105 -> 0.330;
    # run 29 (2000): 0.841, and editing 0.290 against run 28's 0.248; run 30 (2000, the shipped recipe): 0.769
    stage3c_steps: int = 2000
    # the LLM's rate in stage 3a / 3c (None: the LLM stays frozen there, runs 1-12); set, the LLM trains with the
    # decoder and the projectors, with the first ``stage3_questions`` understanding records in the mix. A probe from
    # run 12's pre_dpo (1,000 more stage-3c steps) reached 0.56 on a generation slice with the LLM at 1e-4 and 3,000
    # questions, against 0.51 with the LLM frozen and 0.455 before (EVAL.md "Probes after run 12"); run 13 (1e-4,
    # 2,500 stage-3c steps): generation 0.429 -> 0.465 over run 12, understanding 0.889 -> 0.874
    stage3_llm_lr: float | None = 1e-4
    stage3_questions: int = 3000
    # steps of a stage-3c phase before ``stage3c_steps`` that trains the decoder and the projectors alone, on the
    # generation records, with its own warm-up and cosine; the LLM-trainable steps then start a fresh schedule
    # (0: none, runs 1-13). Probe B after run 12 took this path (1,600 frozen steps, then 1,000 with the LLM) and
    # reached 0.56 on its generation slice, where run 13's one schedule of 2,500 reached 0.47; run 14 (1,600 + 1,200):
    # pre-DPO generation 0.471 -> 0.569 over run 13, understanding held (EVAL.md)
    # run 22: 2400, with the captions and the edits in that phase's mix as well as the generation records (runs 14-21:
    # 1600 on the generation records alone)
    stage3c_frozen_steps: int = 1600
    # editing records in stage 3a / 3c's mix (the first ``stage3_editing`` of the split) and copy records made from
    # the sources of the first ``stage3_copies`` (``copy_records``: "<image>Draw this image again." -> the source
    # image); 0: none (runs 1-13, where the decoder sees edits only in stage 2's mix and the editing SFT). In probes
    # from run 13's post_dpo, 1,000 edit-heavy steps took editing on 100 suite edits from 0 to 0.01, and to 0.03 with
    # copy records in the mix; in stage 3's own mix with 3,000 of each, 0 (an expected object in 16 of 100 outputs,
    # against 4) with generation held (EVAL.md "Probes after run 13"); untested in a full run
    # (run 22, with ``edit_reply="caption"``: 3000, every edit, in the frozen phase of stage 3c too, with the
    # captions)
    stage3_editing: int = 0
    stage3_copies: int = 0
    # runs 1-14 (in-run): 40. Run 24's stage-3d round again with 800 prompts and 240 steps: 327 pairs (160),
    # post-DPO 0.924 against 0.928 (EVAL.md "Probes after run 28")
    dpo_steps: int = 120
    # run 8: 600; runs 9-15: 200 (300 in run 9); runs 16-21: 100; run 22: 1500; run 23: 3000 (editing 0.198); runs
    # 24-31: 6000 (editing 0.306 in run 24, 0.488 in run 31e). From run 31's post_dpo with run 31e's rates, 12,000
    # (run 31f, the shipped recipe; ``scripts/shapes_rerun_editing.py --set edit_steps=12000``): editing 0.488 ->
    # 0.574 (the reply right 0.670 -> 0.830), understanding 0.957 -> 0.977, generation 0.860 -> 0.859, at twice the
    # phase's time (59.2 -> 120.7 min for the rerun on a slow machine; EVAL.md "Run 31f")
    edit_steps: int = 12000
    # a DPO round on caption prompts after the editing SFT, before the final sampling choice (``edit_dpo`` in the
    # log): the captions of the first ``edit_dpo_prompts`` caption records as plain prompts, ``dpo_candidates``
    # samples each and the caption's rendered scene as the teacher's candidate (``caption_teacher``), ranked by
    # ``caption_reward``; ``edit_dpo_steps`` steps at ``edit_dpo_lr``, the other settings stage 3d's. 0: none (runs
    # 1-31f). The drawings that fail are the objects' shapes near the top and side borders (a top-left triangle 0.70
    # of the time, a centre one 0.03), where the decoder's own coarse scales lead it astray: with the true ones
    # (teacher forcing) it predicts those tokens as well as anywhere (EVAL.md "Probes after run 31f"). From run 31f's
    # final (probe 35b, 1,200 random scenes, 360 steps at 3e-5): editing 0.582 -> 0.616 in fp32; 400 prompts and
    # 120 steps at 1e-5: no gain. Run 31g (the shipped recipe: run 31f's final with this round,
    # ``scripts/shapes_rerun_editing.py --start final``): editing 0.574 -> 0.646, generation 0.859 -> 0.902,
    # understanding 0.977 either way (the round does not train the LLM; EVAL.md "Run 31g")
    edit_dpo_prompts: int = 1200
    edit_dpo_steps: int = 360
    edit_dpo_lr: float = 3e-5
    # a DPO round on edits after the caption round (``edit_dpo_edits`` in the log): the first ``edit_dpo_edits``
    # editing records of the split as requests (the source image, the instruction, the record's reply naming the
    # edited scene; ``edit_prompts``), ``dpo_candidates`` samples each drawn after that reply as the editing suite
    # draws after the model's own, the reply's rendered scene as the teacher's candidate, ranked by
    # ``caption_reward``; ``edit_dpo_steps`` steps at ``edit_dpo_lr``. 0: none (runs 1-31g). The caption round
    # corrects the drawing of plain captions, but a second caption round leaves editing flat (probe 36: 0.646 ->
    # 0.642); an edit's drawing is conditioned on the source image and the instruction too. Run 31h (run 31g's
    # final with this round alone, ``scripts/shapes_rerun_editing.py --start final --set edit_dpo_prompts=0 --set
    # reply_steps=0``; 678 pairs, the other 522 edits' four samples all passed): editing 0.646 -> 0.714 (given a
    # right reply 0.778 -> 0.855), generation 0.902 -> 0.936, understanding 0.977 (EVAL.md "Run 31h"); run 31i, the
    # shipped recipe, runs it after ``reply_steps``
    edit_dpo_edits: int = 1200
    # after the editing SFT, before the DPO rounds (``reply`` in the log): ``reply_steps`` steps of the LLM alone
    # (``SHAPES_STAGES["reply"]``) on the edits and as many questions, at ``reply_lr``, on the text loss only, so the
    # decoder is untouched and the rounds after it train the drawing on the LLM's final prompt states. 0: none
    # (runs 1-31h). The editing SFT's 12,000 steps leave the reply undertrained (6,000: right 0.670; 12,000: 0.830);
    # 3,000 such steps from run 31h's final (ad hoc, before the option): reply 0.830 -> 0.856, understanding 0.977
    # -> 0.982, editing 0.714 -> 0.720. Run 31i (the shipped recipe: run 31f's final with this phase and both
    # rounds, ``scripts/shapes_rerun_editing.py --start final --set reply_steps=3000``; the phase 18.5 min): reply
    # 0.858, understanding 0.980, generation 0.959, editing 0.722 (EVAL.md "Run 31i")
    reply_steps: int = 3000
    reply_lr: float = 1e-4
    # the editing SFT's learning rate (None: ``lr``). Editing scored 0 at every setting tried before run 21, and the
    # phase costs generation: run 8 (600 steps at 1e-3) -0.052, run 9 (300 at 1e-4) -0.049, run 11 (200 at 1e-4) -0.079,
    # from the post-DPO to the final checkpoint; at 1e-5 +0.017 (run 11's rerun), -0.014 (run 12), -0.007 (run 13) and
    # -0.006 (run 14), within the suite's spread, then -0.018, -0.017 and -0.017 (runs 18-20; in runs 19-20 about what
    # stage 3d had gained); from run 20's post_dpo at 1e-6: -0.001 (EVAL.md "Probe after run 20"); run 21 1e-6:
    # +0.006, and its editing scored 0.002, its first pass in a full run. Run 22 (captioned replies, the LLM training
    # too, generation and captions in the mix): 3e-4, the probe's; runs 23-30: 3e-4 (runs 23-24: from post-DPO to final,
    # generation went 0.928 -> 0.911 and 0.909 on the suite). From run 30's post_dpo at 1e-3 (probe 31, run 30e,
    # shipped before run 31e; ``scripts/shapes_rerun_editing.py --set edit_lr=1e-3``): editing 0.310 -> 0.386 (the
    # image reads back as its reply 0.442 -> 0.562), generation 0.858 -> 0.870, understanding 0.934 -> 0.939 (EVAL.md
    # "Run 30e")
    edit_lr: float | None = 1e-3
    # False (runs 8-21): the editing SFT trains the decoder and the projectors only, without questions in its mix (a
    # probe from run 7's post_dpo: understanding 0.737 against 0.697, editing 0 either way, EVAL.md run 7); True:
    # the LLM trains too, at ``edit_llm_lr``, with questions in the mix (run 7; runs 22-24, which write their edits
    # out: the shipped recipe)
    edit_llm: bool = True
    # the LLM's peak rate there with ``edit_llm`` (None: ``edit_lr``; run 7). Runs 22-31: 1e-4. From run 31's
    # post_dpo at 3e-4 (run 31e; ``scripts/shapes_rerun_editing.py --set edit_llm_lr=3e-4``):
    # understanding 0.937 -> 0.957 (describe 0.793 -> 0.872), the reply names the expected scene 0.554 -> 0.670, and
    # at CFG 1.5 / tau 1.0 editing 0.402 -> 0.488 and generation 0.866 -> 0.860; at 6e-4 (probe 33): understanding
    # 0.934, editing 0.426 (EVAL.md "Run 31e")
    edit_llm_lr: float | None = 3e-4
    batch_size: int = 16
    # the SFT phases' peak rate (the LLM's in stage 2: ``llm_lr``). At 1e-3 the LLM's answer-position heads saturate
    # on one image token (runs 1-11); in a probe the warm-up + 2,500 mixed steps at 3e-4 reached 0.86 on an
    # understanding slice against run 8's 0.738, and run 12 trained the LLM at 3e-4 (EVAL.md)
    lr: float = 1e-3
    # the LLM's own peak rate in stage 2 (the warm-up, the curriculum phases and the mix; ``LLM_MODULES`` take it
    # through ``TrainConfig.module_lr``, the decoder, the projectors and an unfrozen ViT keep ``lr``); None: ``lr``
    # (runs 1-11). Stage 3 trains the LLM at ``stage3_llm_lr``; the editing SFT freezes it by default. Run 12 (3e-4):
    # understanding 0.745 -> 0.889 and generation 0.372 -> 0.429 over run 11 (EVAL.md)
    llm_lr: float | None = 3e-4
    # AdamW weight decay of the SFT phases (tensors of >= 2 dimensions; 0: the shipped recipe). Run 8's LLM answers
    # with saturated attention: at the answer position two or three of four heads in each of layers 1-3 put 0.84-1.00
    # of their weight on one image token, the same whatever object the question names; 0.1 halved such heads in a
    # 1,500-step probe, and the look-up still did not start (EVAL.md "Probes before and after run 11")
    weight_decay: float = 0.0
    dpo_lr: float = 1e-5
    dpo_beta: float = 0.1
    # the bitwise self-correction of the DPO passes (``DPOStep(bsc_max_strength=...)``): None: the model config's
    # (0.3, runs 1-14: the teacher-forced labels are the residual bits against a running sum with up to 30 % of its
    # bits flipped, not the tokens of the sampled image); 0: clean teacher forcing, the likelihood of the pair as
    # sampled (re-encoded). From run 14's pre_dpo, on 800 suite prompts: 0.3 -0.032, 0 -0.006 (160 prompts, 40
    # steps), 0 with 480 prompts and 120 steps +0.023; the full suite +0.005 (EVAL.md run 14)
    dpo_bsc: float | None = 0.0
    dpo_sft_weight: float = 0.0  # the SFT term on the chosen images (``DPOStep(sft_weight=...)``, official pref_ftx)
    # True: each DPO prompt also gets the rendered scene of the prompt (``shapes_teacher``) as a candidate, the
    # Shapes stand-in for the stronger generator behind the official chosen images; False: the policy's samples only.
    # From run 15's pre_dpo with clean teacher forcing, on 800 suite prompts: +0.030 with it, +0.023 without (within
    # the spread; EVAL.md "DPO probe after run 16"); from run 18's: +0.012 to +0.022 with it (three settings),
    # -0.001 without (EVAL.md "DPO probe after run 18"); in full runs, stage 3d +0.020 and +0.019 with it (runs 19-20,
    # against -0.002 in run 18 without it), +0.008 in run 21, from +0.004 to +0.044 in runs 22-30 (the shipped
    # recipe: True)
    dpo_teacher: bool = True
    dpo_prompts: int = 400  # runs 1-14 (in-run): 160; run 15: 480; runs 16-17: 400
    dpo_candidates: int = 4
    prompt_drop_rate: float = 0.1
    mixed_precision: str = "bf16"  # the SFT phases (1.4x faster on this CPU than fp32; DPO runs in fp32)
    monitor_every: int = 500  # log a small slice of the suite a phase trains for every n steps (0 = at the end only)
    # validation prompts per category for choosing the sampling defaults (runs 12-15: 25; runs 16-17: 20)
    sampling_per_category: int = 20
    # validation edits (``editing_items(seed=VALIDATION_SEED)``, the four kinds in turn) in the final checkpoint's
    # choice: its score is the mean of the generation and the editing validation scores. 0: generation alone (runs
    # 1-23; run 24's final choice was redone with 80 by ``scripts/shapes_choose_sampling.py``: the same CFG 1.5 /
    # tau 1.0). After 6,000 editing steps in two schedules (EVAL.md "Probes after run 23", B) generation alone chose
    # CFG 3 / tau 0.5 / top-p 0.97, where the editing suite scores 0.240, against 0.286 at CFG 1.5 / tau 1.0.
    # Runs 24-31: 80 (about 0.05 of sampling error on the editing score). Run 31 and run 31e chose CFG 3 with 80
    # (by 0.003 and 0.013), where the full suites' mean is higher at CFG 1.5 / tau 1.0 (by 0.014 and 0.012); with
    # 400 both chose CFG 1.5 / tau 1.0, each by 0.001: the two settings are close on the mean, and 400 edits make
    # the choice follow the full suites' ranking here (about 30 s more per candidate on this machine; EVAL.md
    # "Run 31e"). Run 31f (12,000 editing steps) chose CFG 1.5 / tau 1.0 by 0.012
    sampling_edits: int = 400
    vae_padding_mode: str | None = None  # None: the shapes preset's ("zeros"; "replicate" was tried, EVAL.md)
    # Two ways to shorter CPU steps, off in the shipped recipe (run 6 had both, with 4,200 stage-2 steps in 77.5
    # min, and scored lower; EVAL.md): the chat template without the default system turn (SHAPES_CHAT_TEMPLATE),
    # and batches drawn from one text-length bucket as well as one task (``batch_group``).
    system_turn: bool = True
    length_groups: bool = False
    # "bpe": merges learned on the training split's texts (each grammar word one token: a question row is about
    # 3x shorter than in characters); "char": one token per character (runs 1-6)
    tokenizer: str = "bpe"
    # the layout of the generation targets (``scene_for_prompt``): "fixed" (run 18) fixes everything a prompt leaves
    # open (cells and size as "canonical", a colour by the shape, no jitter), so that a target is a function of its
    # prompt: generation 0.699 -> 0.886 over run 17, tokenizer read-back 0.975 -> 0.957 (its training images lose
    # the open colours' variety); "canonical" (runs 8-17) fixes the cells and the size only; "random" (runs 1-7)
    # draws all of them (EVAL.md runs 8 and 18)
    gen_layout: str = "fixed"
    # True: each SFT phase encodes a generation target with the frozen VAE once and reuses its features
    # (``vargpt.train.latents.LatentCache``; the same losses bit for bit; an isolated generation step 0.89x-0.93x as
    # long, no gain measured above the noise in the recipe's loop, BENCHMARKS.md); False: runs 1-17
    cache_latents: bool = True
    device: str = "cpu"  # where the model trains and samples ("cuda" on a GPU machine; the recipe is sized for CPU)
    # the model's preset (``vargpt.config.PRESETS``): "shapes" (every run up to 41, the shipped model) or
    # "shapes-small" (half the width of the LLM and the decoder: an experiment toward a 90-minute recipe, run 42)
    preset: str = "shapes"

    def __post_init__(self) -> None:
        if self.preset not in SHAPES_PRESETS:
            raise ValueError(f"ShapesRunConfig.preset={self.preset!r}: expected one of {SHAPES_PRESETS} (the presets "
                             "sized for the Shapes world's 64 px images and 384 text ids)")
        if self.tokenizer not in ("bpe", "char"):
            raise ValueError(f"ShapesRunConfig.tokenizer={self.tokenizer!r}: expected 'bpe' or 'char'")
        if self.gen_layout not in LAYOUTS:
            raise ValueError(f"ShapesRunConfig.gen_layout={self.gen_layout!r}: expected one of {LAYOUTS}")
        for name in ("n_vertical", "vae_scenes", "n_captions", "stage3_captions", "sampling_edits", "n_describe",
                     "stage2_describe"):
            if getattr(self, name) < 0:
                raise ValueError(f"ShapesRunConfig.{name}={getattr(self, name)}: expected >= 0")
        if self.reply_steps < 0 or not self.reply_lr > 0:
            raise ValueError(f"ShapesRunConfig.reply_steps={self.reply_steps}, reply_lr={self.reply_lr}: expected "
                             "steps >= 0 (0: none) and a positive rate")
        if self.reply_steps and not self.edit_llm:
            raise ValueError(f"ShapesRunConfig.reply_steps={self.reply_steps} trains the LLM after the editing SFT: "
                             "expected edit_llm=True (the replies are the LLM's)")
        for name in ("edit_dpo_prompts", "edit_dpo_steps", "edit_dpo_edits"):
            if getattr(self, name) < 0:
                raise ValueError(f"ShapesRunConfig.{name}={getattr(self, name)}: expected >= 0 (0: no caption DPO)")
        if self.edit_dpo_prompts > self.n_captions:
            raise ValueError(f"ShapesRunConfig.edit_dpo_prompts={self.edit_dpo_prompts}: expected <= n_captions "
                             f"({self.n_captions}), the caption records whose captions it takes")
        if self.edit_dpo_edits > self.n_editing:
            raise ValueError(f"ShapesRunConfig.edit_dpo_edits={self.edit_dpo_edits}: expected <= n_editing "
                             f"({self.n_editing}), the editing records it takes")
        if self.edit_dpo_edits and self.edit_reply != "caption":
            raise ValueError(f"ShapesRunConfig.edit_dpo_edits={self.edit_dpo_edits} ranks each edit by the caption "
                             f"its reply names: expected edit_reply='caption', got {self.edit_reply!r}")
        if not self.edit_dpo_lr > 0:
            raise ValueError(f"ShapesRunConfig.edit_dpo_lr={self.edit_dpo_lr}: expected a positive rate")
        if self.vae_edits is not None and self.vae_edits < 0:
            raise ValueError(f"ShapesRunConfig.vae_edits={self.vae_edits}: expected None (every edit) or >= 0")
        if self.vae_scenes > self.n_understanding:
            raise ValueError(f"ShapesRunConfig.vae_scenes={self.vae_scenes}: expected <= n_understanding "
                             f"({self.n_understanding}), the understanding images it takes from")
        if self.multi_object_weight < 1:
            raise ValueError(f"ShapesRunConfig.multi_object_weight={self.multi_object_weight}: expected >= 1")
        if self.edit_lr is not None and not self.edit_lr > 0:
            raise ValueError(f"ShapesRunConfig.edit_lr={self.edit_lr}: expected None (= lr) or a positive rate")
        if self.edit_llm_lr is not None and not self.edit_llm_lr > 0:
            raise ValueError(f"ShapesRunConfig.edit_llm_lr={self.edit_llm_lr}: expected None (= edit_lr) or a "
                             "positive rate")
        if self.edit_reply not in EDIT_REPLY_MODES:
            raise ValueError(f"ShapesRunConfig.edit_reply={self.edit_reply!r}: expected one of {EDIT_REPLY_MODES}")
        if self.llm_lr is not None and not self.llm_lr > 0:
            raise ValueError(f"ShapesRunConfig.llm_lr={self.llm_lr}: expected None (= lr) or a positive rate")
        if self.stage3_llm_lr is not None and not self.stage3_llm_lr > 0:
            raise ValueError(f"ShapesRunConfig.stage3_llm_lr={self.stage3_llm_lr}: expected None (the LLM frozen in "
                             "stage 3) or a positive rate")
        for name in ("stage3_questions", "stage3c_frozen_steps", "stage3_editing", "stage3_copies"):
            if getattr(self, name) < 0:
                raise ValueError(f"ShapesRunConfig.{name}={getattr(self, name)}: expected >= 0")
        self.curriculum()  # validates stage2_curriculum
        if self.dpo_bsc is not None and not 0 <= self.dpo_bsc < 0.5:
            raise ValueError(f"ShapesRunConfig.dpo_bsc={self.dpo_bsc}: expected None (the model config's) or a flip "
                             "rate in [0, 0.5)")
        if self.weight_decay < 0:
            raise ValueError(f"ShapesRunConfig.weight_decay={self.weight_decay}: expected >= 0")
        if self.text_loss_reduction not in ("token", "sample"):
            raise ValueError(f"ShapesRunConfig.text_loss_reduction={self.text_loss_reduction!r}: expected 'token' or "
                             "'sample'")
        check_question_kinds(self.multi_object_questions, "ShapesRunConfig.multi_object_questions")

    def curriculum(self) -> list[tuple[tuple[str, ...], int]]:
        """``stage2_curriculum`` parsed: (question kinds, steps) per phase."""
        phases = []
        for i, item in enumerate(self.stage2_curriculum):
            where = f"ShapesRunConfig.stage2_curriculum[{i}]={item!r}"
            kinds, sep, steps = str(item).rpartition(":")
            if not sep or not kinds or not steps.strip().isdigit() or int(steps) < 1:
                raise ValueError(f"{where}: expected 'kind+kind:steps' with steps >= 1")
            names = check_question_kinds((k.strip() for k in kinds.split("+")), where)
            phases.append((names, int(steps)))
        return phases

    def gen_categories(self) -> tuple[str, ...]:
        """One cycle of the generation split's categories (``build_split(gen_categories=...)``), with each of
        ``MULTI_OBJECT_CATEGORIES`` ``multi_object_weight`` times."""
        return tuple(c for c in GEN_CATEGORIES
                     for _ in range(self.multi_object_weight if c in MULTI_OBJECT_CATEGORIES else 1))

    @classmethod
    def from_run(cls, run_dir) -> tuple[ShapesRunConfig, list[str]]:
        """The settings of a finished run (``run_dir/run_config.json``, written by ``run_shapes``) and the names of
        the fields it lacks, which take the current defaults (options added after the run); fields no longer in
        the config are dropped."""
        saved = json.loads((Path(run_dir) / "run_config.json").read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        run = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})
        return run, sorted(fields - set(saved))

    @classmethod
    def fast(cls) -> ShapesRunConfig:
        """The recipe cut to fit 90 minutes on the 2-core CPU (``vargpt train shapes --fast``): every phase of the
        default recipe, on the same data, with fewer steps -- the tokenizer 2,200 (default 3,800), the ViT 400 (600),
        stage 1 100 (200), stage 2 1,600 (4,000), stage 3c 600 + 800 (1,600 + 2,000), the editing SFT 2,000
        (12,000), the replies 400 (3,000), the two DPO rounds after it 300 prompts and 90 steps each (1,200 and
        360), 120 validation edits in the final sampling choice (400) and a monitor every 1,000 steps (500). The
        default recipe takes about 4 hours here; what the cut costs in scores: EVAL.md "Run 40"."""
        return cls(vae_steps=2200, vit_steps=400, stage1_steps=100, stage2_steps=1600, stage3c_frozen_steps=600,
                   stage3c_steps=800, edit_steps=2000, reply_steps=400, edit_dpo_prompts=300, edit_dpo_edits=300,
                   edit_dpo_steps=90, sampling_edits=120, monitor_every=1000)

    @classmethod
    def quick(cls) -> ShapesRunConfig:
        """A few minutes end to end: checks the mechanics, not the quality."""
        return cls(n_understanding=64, n_single=16, n_generation=64, n_editing=32, stage2_generation=32,
                   stage2_editing=16, vae_steps=20, vae_batch=8, stage1_steps=4, stage2_warmup_steps=2,
                   stage2_steps=4, vit_steps=3, vit_batch=4, vit_scenes=32, stage3a_steps=3, stage3c_steps=3,
                   stage3c_frozen_steps=2, n_captions=16, vae_scenes=16,
                   dpo_steps=2, edit_steps=3, batch_size=4, dpo_prompts=4, dpo_candidates=2, sampling_per_category=1,
                   sampling_edits=4, edit_dpo_prompts=4, edit_dpo_steps=2, edit_dpo_edits=4, reply_steps=2)
