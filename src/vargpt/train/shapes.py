"""The whole VARGPT-v1.1 recipe on the Shapes world, from nothing, on a CPU (``vargpt train shapes --out DIR``).

Phases (SPEC.md §4.2, adapted to a model trained from scratch -- there is no pretrained Qwen2-VL or Infinity, so
the stages that officially start from pretrained parts also train those parts here; each adaptation is named):

0. data: a training split of understanding, generation and editing records (``vargpt.data.shapes.tasks``), with
   every held-out evaluation scene excluded; the text tokenizer: BPE merges learned on the split's texts
   (``bpe_tokenizer``: each grammar word one token);
1. tokenizer: the BSQ multi-scale VAE on the training images (``vargpt.train.vae``);
   1b. the ViT, pre-trained to write each object into the merged token over its cell (``vargpt.train.shapes_vit``;
   the stand-in for Qwen2-VL's pretrained encoder, and frozen from here on, as the official ViT is);
2. stage 1 (generation alignment): projectors + start vector, and -- from scratch -- the visual decoder;
3. stage 2 (mixed SFT): the LLM + lm_head, and -- from scratch -- the decoder and the projectors, on all three tasks
   (one task per batch where possible), after a warm-up on questions about one-object scenes (with
   ``vit_steps=0`` the ViT is not pre-trained and trains here too, as in runs 1-6);
4. stage 3a: decoder + projectors (and the LLM at ``stage3_llm_lr``, with questions in the mix, since run 13),
   generation SFT at the lower resolution (32 px, 3 scales);
   stage 3b: DPO at 32 px (pairs sampled by the engine, ranked by the Shapes scorer), reference = 3a;
   stage 3c: generation SFT at the full resolution (64 px, 5 scales); stage 3d: DPO at 64 px, reference = 3c;
   before each DPO round the default sampling settings are chosen among ``SAMPLING_CANDIDATES`` on validation
   prompts (``VALIDATION_SEED``, never the suite's); DPO samples its pairs with them and the checkpoints ship them
   (``image_generation_config.json``); ``DPOStep`` sets the policy's drop-path and dropout rates to 0
   (``disable_dropout``) and they stay 0, so stage 3c and the editing SFT train without them (every run so far);
   with ``stage3c_frozen_steps`` stage 3c begins with that many steps of the decoder and the projectors alone;
5. editing SFT: decoder + projectors (``edit_llm=True``: the LLM too, at ``edit_llm_lr``, with questions in the
   mix, as in runs 7 and 22; its own learning rate with ``edit_lr``, run 9); then (``edit_dpo_prompts``) a DPO round
   on caption prompts, the rendered scene as the teacher's candidate, reference = the editing SFT's result, and
   (``edit_dpo_edits``) one on edits (source image, instruction and reply; reference = the caption round's result),
   both after (``reply_steps``) the LLM alone on the replies and questions, on the text loss; then the final
   checkpoint's sampling defaults are chosen again the same way.

Edits (``edit_reply="caption"``, runs 22-23): an edit's reply names the edited scene in the words of a description
("Here is a small red circle in the top left, ..."), and caption records (``n_captions``) teach the decoder to
draw such a text; the LLM learns to write the edit out in stage 2's mix (``stage2_editing`` edits) and the editing
SFT (with ``edit_llm``), and, with ``stage3_editing`` / ``stage3_captions``, the decoder learns to draw it in stage
3 too (the frozen phase of stage 3c included; run 22).

The generation targets are a function of their prompt (``gen_layout="fixed"``, ``scene_for_prompt``): what a prompt
leaves open of the cells, the size and the colours is fixed, and there is no jitter, because the bitwise head samples
each bit of a scale on its own and cannot draw from a many-mode token (EVAL.md runs 8 and 18: open cells, then open
colours, whose mixtures read back as extra objects). ``multi_object_weight`` > 1 draws the categories with two
or more objects that many times as often as the others (run 9; off in the shipped recipe).

Every phase runs through the shared loop (``vargpt.train.loop.train``) and writes its final weights; the last one is
the complete checkpoint directory ``DIR/final`` (config, weights, tokenizer, preprocessor settings).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

import torch
from PIL import Image

from vargpt.checkpoint import load_model
from vargpt.config import get_preset
from vargpt.data.records import load_records
from vargpt.data.shapes import GEN_CATEGORIES, sample_gen_prompt
from vargpt.data.shapes.tasks import eval_scenes
from vargpt.engine import Engine
from vargpt.eval.shapes import EVAL_SEED, editing_items, generation_items, run_suite
from vargpt.generation.params import OFFICIAL_SAMPLING, ImageParams, load_sampling_defaults
from vargpt.models.vargpt import VARGPT
from vargpt.processing.processor import Processor
from vargpt.train.recipes import STAGES, Stage
from vargpt.train.shapes_config import LLM_MODULES, ShapesRunConfig
from vargpt.train.shapes_data import (
    COPY_INSTRUCTION,
    COPY_REPLY,
    GROUP_CHARS,
    SHAPES_CHAT_TEMPLATE,
    SHAPES_IMAGE_MEAN,
    SHAPES_IMAGE_STD,
    ShapesData,
    batch_group,
    copy_records,
    describe_records,
    editing_mix,
    question_kind,
    render_split,
    shapes_corpus,
    shapes_processor,
)
from vargpt.train.shapes_phases import (
    FULL_RES,
    LOW_RES,
    RunProgress,
    RunStopped,
    dpo_round,
    monitor_fn,
    run_log,
    save_run,
    set_schedule,
    sft_phase,
    tail_mean,
    text_loss_step,
)
from vargpt.train.shapes_rewards import (
    caption_prompts,
    caption_reward,
    caption_teacher,
    edit_prompts,
    shapes_reward,
    shapes_teacher,
)
from vargpt.train.shapes_vit import pretrain_vit
from vargpt.train.vae import VAETrainConfig, train_vae

__all__ = ["ShapesRunConfig", "SHAPES_STAGES", "SAMPLING_CANDIDATES", "VALIDATION_SEED", "shapes_reward",
           "shapes_teacher", "caption_reward", "caption_teacher", "caption_prompts", "run_shapes", "run_phases",
           "ShapesRunError", "rerun_editing",
           # re-exported from ``vargpt.train.shapes_data``
           "SHAPES_IMAGE_MEAN", "SHAPES_IMAGE_STD", "SHAPES_CHAT_TEMPLATE", "GROUP_CHARS", "COPY_INSTRUCTION",
           "COPY_REPLY", "ShapesData", "batch_group", "copy_records", "describe_records", "question_kind",
           "render_split", "shapes_corpus", "shapes_processor"]

#: The seed of each DPO round (its prompts and its candidates' sampling seeds derive from it).
DPO_ROUND_SEEDS = {"stage3b": 101, "stage3d": 303, "edit_dpo": 505, "edit_dpo_edits": 707}
#: Seed of the validation prompts the sampling defaults are chosen on (the generation suite uses ``EVAL_SEED``).
VALIDATION_SEED = EVAL_SEED + 777
#: Default sampling settings tried before each DPO round and after the editing SFT (first = the official ones; ties
#: keep the earlier).
SAMPLING_CANDIDATES = (
    ImageParams(**OFFICIAL_SAMPLING),
    ImageParams(cfg_scale=3.0, temperature=1.0, top_k=0, top_p=0.0),
    ImageParams(cfg_scale=6.0, temperature=1.0, top_k=0, top_p=0.0),
    ImageParams(cfg_scale=1.5, temperature=1.0, top_k=0, top_p=0.0),
    ImageParams(cfg_scale=1.0, temperature=0.5, top_k=0, top_p=0.0),  # no guidance: one pass, about 1.5x faster
)

SHAPES_STAGES: dict[str, Stage] = {
    "stage1": Stage(name="shapes-stage1", trainable=("gen_proj_in", "gen_proj_out", "decoder"),
                    note="stage 1 + the decoder (no pretrained Infinity to start from)"),
    "stage2": Stage(name="shapes-stage2", trainable=("backbone.model.language_model", "backbone.lm_head",
                                                     "backbone.model.visual", "decoder", "gen_proj_in",
                                                     "gen_proj_out"), train_vit=True,
                    note="stage 2 + the ViT, the decoder and the projectors (nothing is pretrained: the decoder "
                         "learns from every generation and edit record of the mixed stage too)"),
    # with a pre-trained ViT (``vit_steps`` > 0) it stays frozen, as the official stage 2 keeps Qwen2-VL's
    "stage2_frozen_vit": Stage(name="shapes-stage2-frozen-vit",
                               trainable=("backbone.model.language_model", "backbone.lm_head", "decoder",
                                          "gen_proj_in", "gen_proj_out"),
                               note="stage 2 + the decoder and the projectors; the pre-trained ViT frozen"),
    "stage3": STAGES["stage3"],
    "stage3_llm": Stage(name="shapes-stage3-llm", trainable=STAGES["stage3"].trainable + LLM_MODULES,
                        note="stage 3 with the LLM trainable too (``stage3_llm_lr``; questions in the mix)"),
    "edit": Stage(name="shapes-edit", trainable=("decoder", "gen_proj_in", "gen_proj_out",
                                                 "backbone.model.language_model"),
                  note="edit SFT with the LLM trainable (it must read the instruction against the source image)"),
    "edit_frozen_llm": Stage(name="shapes-edit-frozen-llm", trainable=("decoder", "gen_proj_in", "gen_proj_out"),
                             note="edit SFT of the decoder and the projectors only (``edit_llm=False``)"),
    "reply": Stage(name="shapes-reply", trainable=("backbone.model.language_model",),
                   note="the LLM alone on the replies and questions after the editing SFT (``reply_steps``)"),
}


def _select_sampling(model, processor, run: ShapesRunConfig, out: Path, name: str, edits: bool = False) -> ImageParams:
    """The candidate of ``SAMPLING_CANDIDATES`` scoring best on the validation prompts (``VALIDATION_SEED``).

    ``edits`` (the final checkpoint's choice, when ``run.sampling_edits`` > 0): the score is the mean of the
    generation score and the editing score on ``run.sampling_edits`` validation edits (the model writes its own
    replies; the sampling settings draw the image after them), so that the one default serves both tasks."""
    items = generation_items(per_category=run.sampling_per_category, seed=VALIDATION_SEED)
    edit_items = editing_items(run.sampling_edits, seed=VALIDATION_SEED) if edits and run.sampling_edits else []
    model.eval()
    best, best_score = SAMPLING_CANDIDATES[0], -1.0
    for cand in SAMPLING_CANDIDATES:
        engine = Engine(model, processor, sampling=cand)
        score = run_suite(engine, "generation", items=items).scores["overall"]
        what = f"validation {score:.3f} ({len(items)} prompts)"
        if edit_items:
            edit_score = run_suite(engine, "editing", items=edit_items).scores["overall"]
            gen_score, score = score, (score + edit_score) / 2
            what = (f"validation {score:.3f} (generation {gen_score:.3f} on {len(items)} prompts, "
                    f"editing {edit_score:.3f} on {len(edit_items)} edits)")
        run_log(out, f"{name}: sampling cfg {cand.cfg_scale} tau {cand.temperature} top-p {cand.top_p}: {what}")
        if round(score, 9) > round(best_score, 9):  # a tie keeps the earlier (scores are means of means)
            best, best_score = cand, score
    run_log(out, f"{name}: default sampling cfg {best.cfg_scale} tau {best.temperature} top-p {best.top_p}")
    return best


def _llm_rate(stage: Stage, rate: float | None) -> dict[str, float] | None:
    """``TrainConfig.module_lr`` giving the LLM modules ``stage`` trains the peak ``rate`` (None: none, or no rate)."""
    return {m: rate for m in LLM_MODULES if m in stage.trainable} if rate else None


def _dpo(model, processor, run: ShapesRunConfig, out: Path, name: str, round_seed: int,
         sampling: ImageParams) -> list[float]:
    """A DPO round on generation prompts (stages 3b and 3d)."""
    rng = random.Random(run.seed + round_seed)
    prompts = [sample_gen_prompt(rng, GEN_CATEGORIES[i % len(GEN_CATEGORIES)]).text for i in range(run.dpo_prompts)]
    return dpo_round(model, processor, run, out, name, round_seed, sampling, prompts, shapes_reward,
                     shapes_teacher(run.gen_layout) if run.dpo_teacher else None, run.dpo_steps, run.dpo_lr)


def _caption_dpo(model, processor, run: ShapesRunConfig, out: Path, sampling: ImageParams,
                 prompts: list[str]) -> list[float]:
    """The DPO round on caption prompts after the editing SFT (``run.edit_dpo_prompts`` of ``prompts``)."""
    if not run.edit_dpo_prompts:
        return []
    if len(prompts) < run.edit_dpo_prompts:
        raise ValueError(f"edit_dpo_prompts={run.edit_dpo_prompts}: only {len(prompts)} caption records' captions")
    return dpo_round(model, processor, run, out, "edit_dpo", DPO_ROUND_SEEDS["edit_dpo"], sampling,
                     prompts[: run.edit_dpo_prompts], caption_reward, caption_teacher, run.edit_dpo_steps,
                     run.edit_dpo_lr)


def _edit_dpo(model, processor, run: ShapesRunConfig, out: Path, sampling: ImageParams,
              edits: Path | None) -> list[float]:
    """The DPO round on edits after the caption round (``run.edit_dpo_edits`` of the split's editing records in
    ``edits``: the source image, the instruction and the record's reply, ranked and taught by the reply's caption)."""
    if not run.edit_dpo_edits:
        return []
    if edits is None or not Path(edits).exists():
        raise FileNotFoundError(f"{edits}: the editing records the edit DPO round takes its prompts from "
                                f"(edit_dpo_edits={run.edit_dpo_edits}; 0 turns the round off)")
    return dpo_round(model, processor, run, out, "edit_dpo_edits", DPO_ROUND_SEEDS["edit_dpo_edits"], sampling,
                     edit_prompts(edits, run.edit_dpo_edits), caption_reward, caption_teacher, run.edit_dpo_steps,
                     run.edit_dpo_lr)


class ShapesRunError(ValueError):
    """A ``run_shapes`` call that cannot start: a ``stop_after`` that names no phase, or a ``resume`` without a run
    to go on with or with other settings than the run's."""


def run_phases(run: ShapesRunConfig) -> list[str]:
    """The names of ``run``'s phases in order, as ``run_shapes`` records them done (``stop_after`` takes one)."""
    curriculum = [f"stage2_{'+'.join(ks)}" for ks, _ in run.curriculum()] if run.stage2_curriculum else []
    return ["tokenizer", "vit", "stage1", "stage2_warmup", *curriculum, "stage2", "stage3a", "stage3b",
            "stage3c_frozen", "stage3c", "stage3d", "edit", "reply", "edit_dpo", "edit_dpo_edits", "final"]


def run_shapes(out_dir: str | Path, run: ShapesRunConfig | None = None, *, resume: bool = False,
               stop_after: str | None = None) -> Path | None:
    """Train the Shapes model from nothing into ``out_dir``; returns ``out_dir/final``.

    Each finished phase leaves a snapshot in ``out_dir/resume`` (``RunProgress``). ``stop_after`` (a name of
    ``run_phases(run)``) ends the run after that phase and returns None; ``resume=True`` goes on from the last
    snapshot of the run in ``out_dir`` (after an interruption or a ``stop_after``) with its settings
    (``out_dir/run_config.json``; ``run``, if given, must equal them) and computes what one uninterrupted run
    computes."""
    out = Path(out_dir)
    if resume:
        if not (out / "run_config.json").is_file():
            raise ShapesRunError(f"resume: {out / 'run_config.json'} not found (no shapes run in {out})")
        saved, missing = ShapesRunConfig.from_run(out)
        if missing:
            raise ShapesRunError(f"{out / 'run_config.json'}: no value for {', '.join(missing)} (written by an older "
                                 "vargpt); a run resumes only with the settings it started with")
        if run is not None and run != saved:
            diff = [f"{f.name}={getattr(run, f.name)!r} (the run's: {getattr(saved, f.name)!r})"
                    for f in dataclasses.fields(run) if getattr(run, f.name) != getattr(saved, f.name)]
            raise ShapesRunError(f"resume: settings differ from {out / 'run_config.json'}: {'; '.join(diff)}")
        run = saved
    run = run or ShapesRunConfig()
    if stop_after is not None and stop_after not in run_phases(run):
        raise ShapesRunError(f"stop_after={stop_after!r}: expected one of {', '.join(run_phases(run))}")
    progress = RunProgress(out, stop_after)
    if resume and progress.last_snapshot() is None:
        raise ShapesRunError(f"{out / 'resume'}: no snapshot of a finished phase to go on from (the run stopped in "
                             "its first phase): start it again in a fresh folder")
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out / "run_config.json").write_text(json.dumps(dataclasses.asdict(run), indent=1))
    torch.manual_seed(run.seed)

    # 0. data (held-out evaluation scenes excluded); a resumed run renders the same split again
    data = render_split(run, out / "data")
    split, held_out = data.split, data.held_out
    und, single, gen, edi, caps, desc = data.und, data.single, data.gen, data.edi, data.caps, data.desc
    run_log(out, f"data: {len(und)} understanding (+ {len(single)} one-object), {len(gen)} generation, "
            f"{len(edi)} editing, {len(caps)} caption records (edit replies: {run.edit_reply}), {len(desc)} "
            f"describe records of the caption images ({len(desc[:run.stage2_describe])} in stage 2)")

    cfg = dataclasses.replace(get_preset(run.preset), text_loss_reduction=run.text_loss_reduction)
    if run.vae_padding_mode is not None:
        cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, padding_mode=run.vae_padding_mode))
    # (a resumed run takes its model from the snapshot, after the processor, as the first run built it)
    model = None if resume else VARGPT(cfg).to(run.device)
    texts = shapes_corpus(und + single + gen + edi + caps) if run.tokenizer == "bpe" else None
    processor = shapes_processor(cfg, system_turn=run.system_turn, texts=texts)
    sampling = SAMPLING_CANDIDATES[0]
    if resume:
        model, sampling = progress.restore(run.device)
        if stop_after in progress.phases:
            raise ShapesRunError(f"stop_after={stop_after!r}: that phase is done already in {out} (done: "
                                 f"{', '.join(progress.phases)})")
        for name in run_phases(run):  # what an interrupted phase left (its log, pairs, checkpoint) goes
            if progress.pending(name) and (out / name).is_dir():
                shutil.rmtree(out / name)
        run_log(out, f"resumed after {progress.phases[-1]} ({progress.elapsed() / 60:.1f} min so far)")
    try:
        final = _run_phases(model, processor, run, out, progress, sampling, split, und, single, gen, edi, caps,
                            desc, held_out)
    except RunStopped as stop:
        run_log(out, f"stopped after {stop.args[0]} ({progress.elapsed() / 60:.1f} min so far); go on with "
                f"vargpt train shapes --out {out} --resume latest")
        return None
    run_log(out, f"done in {progress.elapsed() / 60:.1f} min -> {final}")
    return final


def _run_phases(model, processor, run: ShapesRunConfig, out: Path, progress: RunProgress, sampling: ImageParams,
                split, und, single, gen, edi, caps, desc, held_out) -> Path:
    """``run_shapes``'s phases from the tokenizer on, each skipped when ``progress`` has it done."""
    # 1. tokenizer, on the generation targets, the edited images (the first ``vae_edits``) and ``vae_scenes``
    # understanding images: with fixed generation targets (few cells, large objects, three colours), the edits' and
    # the questions' random scenes keep every cell, size, colour and object count in its training images
    if progress.pending("tokenizer"):
        images = [Image.open(r.images[-1]).convert("RGB") for r in gen + edi[: run.vae_edits] + und[: run.vae_scenes]]
        vae_cfg = VAETrainConfig(steps=run.vae_steps, batch_size=run.vae_batch, lr=run.vae_lr, lr_schedule="cosine",
                                 foreground_weight=run.vae_foreground_weight, mixed_precision=run.vae_mixed_precision)
        losses = train_vae(model.vae, images, vae_cfg)
        model.vae.eval().requires_grad_(False)
        run_log(out, f"tokenizer: {run.vae_steps} steps, recon {losses[0]['recon']:.4f} -> "
                f"{losses[-1]['recon']:.4f}")
        monitor_fn(processor, "tokenizer", out, "tokenizer", limit=None)(model)  # all 500 held-out scenes
        progress.done("tokenizer", model, sampling)
    model.vae.eval().requires_grad_(False)

    # 1b. the ViT (the stand-in for a pretrained vision encoder), checked on validation scenes
    stage2 = SHAPES_STAGES["stage2_frozen_vit" if run.vit_steps else "stage2"]
    if progress.pending("vit"):
        if run.vit_steps:
            vit = pretrain_vit(model, processor, steps=run.vit_steps, batch_size=run.vit_batch, lr=run.vit_lr,
                               n_scenes=run.vit_scenes, seed=run.seed, exclude=held_out,
                               val_scenes=eval_scenes(VALIDATION_SEED, 500))
            run_log(out, f"vit: {run.vit_steps} steps, loss {vit.losses[0]:.3f} -> {tail_mean(vit.losses):.3f}, "
                    f"validation scenes read back from the tokens {vit.val_exact:.3f} (500)")
        progress.done("vit", model, sampling)

    # 2. stage 1, 3. stage 2 (warm-up on one-object questions, then the mix)
    set_schedule(model, FULL_RES)
    phases = [("stage1", SHAPES_STAGES["stage1"], gen, run.stage1_steps, "generation"),
              ("stage2_warmup", stage2, single, run.stage2_warmup_steps, "understanding")]
    if run.stage2_curriculum:
        kinds = [question_kind(r) for r in und]
        phases += [(f"stage2_{'+'.join(ks)}", stage2, [r for r, k in zip(und, kinds, strict=True) if k in ks], steps,
                    "understanding") for ks, steps in run.curriculum()]
    phases += [("stage2", stage2, und + gen[: run.stage2_generation] + edi[: run.stage2_editing]
                + desc[: run.stage2_describe], run.stage2_steps, "understanding")]
    for name, stage, recs, steps, monitor in phases:
        if not progress.pending(name):
            continue
        if not recs or not steps:  # e.g. n_single = 0: no warm-up
            run_log(out, f"{name}: skipped ({len(recs)} records, {steps} steps)")
        else:
            losses = sft_phase(model, processor, recs, stage, steps, run, out, name, monitor=monitor,
                               module_lr=_llm_rate(stage, run.llm_lr))
            run_log(out, f"{name}: {steps} steps, loss {losses[0]:.3f} -> {tail_mean(losses):.3f}")
        progress.done(name, model, sampling)

    # 4. stage 3: low resolution, DPO, full resolution, DPO (each round samples with the defaults chosen before it)
    stage3 = SHAPES_STAGES["stage3_llm" if run.stage3_llm_lr else "stage3"]
    # with the LLM trainable, questions join the mix; edits, captions and copies of the edits' sources if asked for
    questions = und[: run.stage3_questions] if run.stage3_llm_lr else []
    edits, copies = edi[: run.stage3_editing], copy_records(edi[: run.stage3_copies])
    caps3 = caps[: run.stage3_captions]
    recs3 = gen + caps3 + questions + edits + copies
    if progress.pending("stage3a"):
        run_log(out, f"stage3: {len(recs3)} records in the mix ({len(gen)} generation, {len(caps3)} captions, "
                f"{len(questions)} questions, {len(edits)} edits, {len(copies)} copies)")
    for name, schedule, steps in (("stage3a", LOW_RES, run.stage3a_steps), ("stage3c", FULL_RES, run.stage3c_steps)):
        dpo_name = {"stage3a": "stage3b", "stage3c": "stage3d"}[name]
        if not progress.pending(dpo_name):
            continue
        set_schedule(model, schedule)
        if name == "stage3c" and progress.pending("stage3c_frozen"):
            if run.stage3c_frozen_steps:  # the decoder alone first, then a fresh schedule
                # (the edits with captioned replies too: the decoder learns to draw what the reply names)
                frozen = gen + caps3 + (edits if run.edit_reply != "fixed" else [])
                losses = sft_phase(model, processor, frozen, SHAPES_STAGES["stage3"], run.stage3c_frozen_steps, run,
                                   out, "stage3c_frozen", monitor="generation", sampling=sampling)
                run_log(out, f"stage3c_frozen ({schedule}): {run.stage3c_frozen_steps} steps, loss {losses[0]:.3f} "
                        f"-> {tail_mean(losses):.3f}")
            progress.done("stage3c_frozen", model, sampling)
        if progress.pending(name):
            losses = sft_phase(model, processor, recs3, stage3, steps, run, out, name, monitor="generation",
                               sampling=sampling, module_lr=_llm_rate(stage3, run.stage3_llm_lr))
            run_log(out, f"{name} ({schedule}): {steps} steps, loss {losses[0]:.3f} -> "
                    f"{tail_mean(losses):.3f}")
            sampling = _select_sampling(model, processor, run, out, name)
            if name == "stage3c":  # keep the pre-DPO checkpoint so that the DPO gain can be measured
                save_run(model, processor, out / "pre_dpo", sampling)
            progress.done(name, model, sampling)
        _dpo(model, processor, run, out, dpo_name, DPO_ROUND_SEEDS[dpo_name], sampling)
        if name == "stage3c":  # ... and the one right after DPO (DPO gain = post_dpo - pre_dpo, same settings)
            save_run(model, processor, out / "post_dpo", sampling)
        progress.done(dpo_name, model, sampling)

    # 5. editing
    cap_prompts = caption_prompts(split.captions) if split.captions else []
    return _finish(model, processor, gen, edi, und, run, out, sampling, caps, desc, cap_prompts, split.editing,
                   progress=progress)


def _finish(model, processor, gen, edi, und, run: ShapesRunConfig, out: Path, sampling: ImageParams,
            caps=(), desc=(), cap_prompts=(), edits: Path | None = None, progress: RunProgress | None = None) -> Path:
    """The recipe's last steps: the editing SFT (edits, ``caps`` caption records, generation records and, with
    ``edit_llm``, questions and ``desc`` describe records), then ``_last_steps``."""
    progress = progress or RunProgress(None)
    set_schedule(model, FULL_RES)
    if progress.pending("edit"):
        # with the LLM training here too, understanding records stay in the mix (the first run trained on edits and
        # generation only and its answers collapsed into edit replies, EVAL.md)
        mix = editing_mix(edi, caps, gen, und, desc, with_questions=run.edit_llm)
        stage = SHAPES_STAGES["edit" if run.edit_llm else "edit_frozen_llm"]
        llm_rate = {"backbone.model.language_model": run.edit_llm_lr} if run.edit_llm and run.edit_llm_lr else None
        losses = sft_phase(model, processor, mix, stage, run.edit_steps, run, out, "edit", lr=run.edit_lr,
                           monitor="editing", sampling=sampling, module_lr=llm_rate)
        run_log(out, f"edit: {run.edit_steps} steps, loss {losses[0]:.3f} -> {tail_mean(losses):.3f}")
        progress.done("edit", model, sampling)
    return _last_steps(model, processor, run, out, sampling, list(cap_prompts), edits, edi, und, progress=progress)


def _reply_sft(model, processor, run: ShapesRunConfig, out: Path, edi, und) -> list[float]:
    """The LLM alone on the edits' replies and as many questions (``run.reply_steps`` steps at ``run.reply_lr``,
    text loss only: the decoder, the projectors and the ViT stay as they are)."""
    if not run.reply_steps:
        return []
    mix = editing_mix(edi, (), (), und, with_questions=True)
    losses = sft_phase(model, processor, mix, SHAPES_STAGES["reply"], run.reply_steps, run, out, "reply",
                       lr=run.reply_lr, step_fn=text_loss_step)
    run_log(out, f"reply: {run.reply_steps} steps on {len(mix)} records, text loss {losses[0]:.3f} -> "
            f"{tail_mean(losses):.3f}")
    return losses


def _last_steps(model, processor, run: ShapesRunConfig, out: Path, sampling: ImageParams, cap_prompts: list[str],
                edits: Path | None, edi=(), und=(), progress: RunProgress | None = None) -> Path:
    """After the editing SFT: the LLM alone on the replies (``run.reply_steps``; ``edi`` edits and ``und``
    questions), the DPO round on caption prompts (``run.edit_dpo_prompts`` of ``cap_prompts``), the one on edits
    (``run.edit_dpo_edits`` of the editing records in ``edits``), then the final checkpoint's sampling defaults ->
    ``out/final`` (each step skipped when ``progress`` has it done)."""
    progress = progress or RunProgress(None)
    for name, phase in (("reply", lambda: _reply_sft(model, processor, run, out, edi, und)),
                        ("edit_dpo", lambda: _caption_dpo(model, processor, run, out, sampling, cap_prompts)),
                        ("edit_dpo_edits", lambda: _edit_dpo(model, processor, run, out, sampling, edits))):
        if progress.pending(name):
            phase()
            progress.done(name, model, sampling)
    if progress.pending("final"):
        # the editing SFT moves the decoder (run 4: the stage-3c choice fell behind the official settings on the
        # final model), so the final checkpoint's defaults are chosen again, on validation edits as well
        # (``sampling_edits``)
        sampling = _select_sampling(model, processor, run, out, "edit", edits=True)
        save_run(model, processor, out / "final", sampling)
        progress.done("final", model, sampling)
    return out / "final"


def rerun_editing(run_dir: str | Path, out_dir: str | Path, run: ShapesRunConfig | None = None,
                  start: str = "post_dpo", data_dir: str | Path | None = None) -> Path:
    """The last steps of ``run`` again from a finished ``run_shapes`` in ``run_dir`` (its training split in
    ``data_dir``, default ``run_dir/data``) -> ``out_dir/final`` (log in ``out_dir/log.txt``): from
    ``start="post_dpo"`` the editing SFT, the replies' phase (``reply_steps``), the DPO rounds on caption prompts and
    edits (``edit_dpo_prompts``, ``edit_dpo_edits``) and the final
    sampling choice; from ``start="pre_dpo"`` the stage-3d DPO round first (with ``run``'s DPO settings and the
    sampling defaults ``pre_dpo`` holds; its result is written to ``out_dir/post_dpo``); from ``start="final"`` (a
    finished run's, or a rerun's, editing SFT) the replies' phase (``reply_steps``), the two DPO rounds (captions, then
    edits) and the sampling choice only, with the sampling defaults ``final`` holds.

    Everything before these steps is the run's own, so this equals ``run_shapes`` with ``run``'s settings for them
    but for the random streams the phases share through the global torch RNG (the editing SFT's bit flips and
    condition dropout: seeded with ``run.seed`` right before the first rerun step rather than carried on from the
    phases before). The shipped checkpoints of run 11 (from post_dpo), run 14 (from pre_dpo), run 30e (from run 30's
    post_dpo, with ``edit_lr=1e-3``), run 31e (from run 31's, with ``edit_llm_lr=3e-4``), run 31f (the same with
    ``edit_steps=12000``), run 31g (from run 31f's final), run 31h (from run 31g's, the edit round alone) and run 31i
    (from run 31f's, the replies' phase and both rounds) were made this way (EVAL.md)."""
    if start not in ("post_dpo", "pre_dpo", "final"):
        raise ValueError(f"start={start!r}: expected 'post_dpo', 'pre_dpo' or 'final'")
    run = run or ShapesRunConfig()
    run_dir, out = Path(run_dir), Path(out_dir)
    data = Path(data_dir) if data_dir is not None else run_dir / "data"
    captions = data / "captions.jsonl"
    if run.edit_dpo_prompts and not captions.exists():
        raise FileNotFoundError(f"{captions}: the caption records the caption DPO round takes its prompts from "
                                f"(edit_dpo_prompts={run.edit_dpo_prompts}; 0 turns the round off)")
    if run.edit_dpo_edits and not (data / "editing.jsonl").exists():
        raise FileNotFoundError(f"{data / 'editing.jsonl'}: the editing records the edit DPO round takes its "
                                f"prompts from (edit_dpo_edits={run.edit_dpo_edits}; 0 turns the round off)")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    (out / "run_config.json").write_text(json.dumps(dataclasses.asdict(run), indent=1))
    source = run_dir / start
    model = load_model(source, dtype=torch.float32, device=run.device)
    processor = Processor.from_dir(source, model.config)
    sampling = load_sampling_defaults(source)
    cap_prompts = caption_prompts(captions) if run.n_captions and captions.exists() else []
    torch.manual_seed(run.seed)  # after loading (building the model draws from the global RNG)
    if start == "final":
        set_schedule(model, FULL_RES)
        edi, und = ((load_records(data / "editing.jsonl").records, load_records(data / "understanding.jsonl").records)
                    if run.reply_steps else ((), ()))
        final = _last_steps(model, processor, run, out, sampling, cap_prompts, data / "editing.jsonl", edi, und)
        run_log(out, f"done in {(time.perf_counter() - t0) / 60:.1f} min (from {source}) -> {final}")
        return final
    records = {name: load_records(data / f"{name}.jsonl").records
               for name in ("understanding", "generation", "editing")}
    caps = load_records(captions).records if run.n_captions and captions.exists() else []
    desc = describe_records(caps, run.n_describe)
    if start == "pre_dpo":  # (pre_dpo's config holds the full-resolution schedule)
        _dpo(model, processor, run, out, "stage3d", DPO_ROUND_SEEDS["stage3d"], sampling)
        save_run(model, processor, out / "post_dpo", sampling)
    final = _finish(model, processor, records["generation"], records["editing"], records["understanding"], run, out,
                    sampling, caps, desc, cap_prompts, data / "editing.jsonl")
    run_log(out, f"done in {(time.perf_counter() - t0) / 60:.1f} min (from {source}) -> {final}")
    return final
