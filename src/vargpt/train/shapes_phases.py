"""The Shapes recipe's phase runners (``vargpt.train.shapes``): the run log, an SFT phase (``sft_phase``), a DPO
round on sampled pairs (``dpo_round``), the checkpoints a run writes (``save_run``) and the record of the phases
done that lets an interrupted run go on (``RunProgress``)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import zlib
from pathlib import Path

import torch
from torch import nn

from vargpt.checkpoint import load_model, save_checkpoint
from vargpt.data.collate import DPOCollator, SFTCollator
from vargpt.data.records import load_records
from vargpt.engine import Engine
from vargpt.eval.shapes import run_suite
from vargpt.generation.params import ImageParams, load_sampling_defaults, save_sampling_defaults
from vargpt.models.vargpt import VARGPT
from vargpt.processing.processor import Processor
from vargpt.train.dpo import DPOStep, PairPrompt, build_pairs, disable_dropout
from vargpt.train.latents import LatentCache
from vargpt.train.loop import TrainConfig, train
from vargpt.train.recipes import STAGES, Stage, apply_stage
from vargpt.train.shapes_config import ShapesRunConfig
from vargpt.train.shapes_data import batch_group
from vargpt.train.state import capture_rng_state, restore_rng_state

__all__ = ["LOW_RES", "FULL_RES", "run_log", "tail_mean", "set_schedule", "monitor_fn", "text_loss_step", "sft_phase",
           "dpo_round", "save_run", "RunProgress", "RunStopped"]

LOW_RES, FULL_RES = "first-3", "first-5"  # 32 px (1, 2, 4) and 64 px (1, 2, 4, 6, 8): the 8x tokenizer
MONITOR_LIMIT = 4


def run_log(out: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(out / "log.txt", "a") as f:
        f.write(line + "\n")


def tail_mean(losses: list[float]) -> float:
    """Mean of the last 10 losses."""
    return sum(losses[-10:]) / len(losses[-10:])


def set_schedule(model: VARGPT, schedule: str) -> None:
    model.config = dataclasses.replace(model.config, gen_schedule=schedule)


def monitor_fn(processor, suite: str, out: Path, name: str, limit: int | None = MONITOR_LIMIT,
               sampling: ImageParams | None = None):
    """An ``eval_fn`` that logs a slice (``limit`` items per category; None = all) of a suite while a phase trains
    -- progress monitoring only: nothing is selected on it; the reported scores are the full suites'."""

    def eval_fn(model) -> dict[str, float]:
        scores = run_suite(Engine(model, processor, sampling=sampling), suite, limit=limit).scores
        run_log(out, f"{name}: {suite} ({limit or 'all'} per category) " +
                " ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        return {f"{suite}/{k}": v for k, v in scores.items()}

    return eval_fn


def text_loss_step(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """``step_fn`` training on the answers' text alone: ``VARGPT.forward``'s ``text_loss`` with the decoder not run
    (``run_decoder=False``; its bit loss would send no gradient here)."""
    out = model(**batch, run_decoder=False)
    return out.text_loss, {"text_loss": out.text_loss}


def sft_phase(model, processor, records, stage: Stage, steps: int, run: ShapesRunConfig, out: Path, name: str,
              lr: float | None = None, monitor: str | None = None, sampling: ImageParams | None = None,
              module_lr: dict[str, float] | None = None, step_fn=None) -> list[float]:
    """An SFT phase; ``step_fn`` (None: the loop's default; the replies' phase: ``text_loss_step``) is the training
    step, given the targets' VAE features from a latent cache with ``run.cache_latents``."""
    apply_stage(model, stage)
    gen = torch.Generator().manual_seed(run.seed + zlib.crc32(name.encode()) % 1000)
    collate = SFTCollator(model.config, processor, generator=gen, prompt_drop_rate=run.prompt_drop_rate)
    cfg = TrainConfig(lr=lr or run.lr, module_lr=module_lr or {}, weight_decay=run.weight_decay, max_steps=steps,
                      batch_size=run.batch_size, warmup_ratio=0.05, seed=run.seed, out_dir=str(out / name),
                      log_every=max(1, steps // 20), eval_every=run.monitor_every if monitor else 0,
                      mixed_precision=run.mixed_precision)
    eval_fn = monitor_fn(processor, monitor, out, name, sampling=sampling) if monitor else None
    # one task (and length bucket) per batch where possible: an answer of a few tokens is not padded to a row with
    # 121 image slots (or to a caption)
    keys = [batch_group(r) if run.length_groups else r.task for r in records]
    index = {k: i for i, k in enumerate(sorted(set(keys)))}
    # the VAE is frozen after the tokenizer phase: each target is encoded once per phase (the same features)
    if run.cache_latents:
        step_fn = LatentCache().step_fn() if step_fn is None else LatentCache().step_fn(step_fn)
    result = train(model, records, collate, cfg, step_fn=step_fn, eval_fn=eval_fn,
                   group_ids=[index[k] for k in keys])
    return result.losses


def dpo_round(model, processor, run: ShapesRunConfig, out: Path, name: str, round_seed: int, sampling: ImageParams,
              prompts: list[str | PairPrompt], reward_fn, teacher_fn, steps: int, lr: float) -> list[float]:
    """Pairs sampled with ``sampling`` (``run.dpo_candidates`` per prompt, and ``teacher_fn``'s candidate), ranked
    by ``reward_fn``; then ``steps`` DPO steps at ``lr`` against a frozen copy of the model (the rest: ``run``'s DPO
    settings)."""
    engine = Engine(model.eval(), processor, sampling=sampling)
    pairs = build_pairs(engine, prompts, n_candidates=run.dpo_candidates, reward_fn=reward_fn,
                        params=ImageParams(seed=round_seed), out_dir=out / name / "pairs", seed=round_seed,
                        teacher_fn=teacher_fn)
    records = load_records(pairs, kind="dpo").records
    if not records:
        run_log(out, f"{name}: every prompt tied (no pair); DPO skipped")
        return []
    reference = VARGPT(model.config)
    reference.load_state_dict(model.state_dict())
    reference.eval().requires_grad_(False)
    apply_stage(model, STAGES["dpo"])
    step = DPOStep(reference, beta=run.dpo_beta, sft_weight=run.dpo_sft_weight, seed=run.seed,
                   bsc_max_strength=run.dpo_bsc)
    collate = DPOCollator(model.config, processor, crop="center")
    cfg = TrainConfig(lr=lr, max_steps=steps, batch_size=max(1, run.batch_size // 4),
                      warmup_ratio=0.1, seed=run.seed, out_dir=str(out / name), log_every=1)
    run_log(out, f"{name}: {len(records)} preference pairs from {len(prompts)} prompts")
    losses = train(model.train(), records, collate, cfg, step_fn=step).losses
    if losses:
        # the mean of the last steps, as the SFT phases log it (one DPO step sees only batch_size // 4 pairs)
        run_log(out, f"{name}: {len(losses)} DPO steps, loss {losses[0]:.3f} -> {tail_mean(losses):.3f}")
    return losses


def save_run(model: VARGPT, processor: Processor, path: Path, sampling: ImageParams) -> Path:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    save_checkpoint(model, path)
    processor.save(path)
    save_sampling_defaults(path, sampling)
    return path


class RunStopped(Exception):
    """Raised by ``RunProgress.done`` after the phase a run was asked to stop after (``run_shapes(stop_after=...)``)."""


def _dropout_off(model: nn.Module) -> bool:
    """Whether every dropout and drop-path rate of ``model`` is 0 (``disable_dropout``'s state; DPO rounds leave it)."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p != 0.0:
            return False
        for attr in ("drop_path_rate", "attention_dropout"):
            if isinstance(getattr(m, attr, None), float) and getattr(m, attr) != 0.0:
                return False
    return True


class RunProgress:
    """The phases of a run that are done, and what a run needs to go on after the last of them.

    After each phase, ``done`` writes a snapshot ``DIR/resume/NN-PHASE/``: the whole model in our checkpoint format
    (float32, as it trains), the sampling defaults chosen so far, the global RNG states (Python, numpy, torch) and,
    last, ``state.json`` (the phases done, the seconds they took, whether dropout is off -- the DPO rounds turn it
    off in place, outside the weights). A snapshot counts only with its ``state.json``; the one before is removed
    once the new one is complete, so an interruption at any point leaves one whole snapshot.

    ``restore`` loads the last snapshot; ``run_shapes(resume=True)`` rebuilds the data and the processor as the
    first run did (both are functions of the seed), skips the phases done and runs the rest, computing what the
    uninterrupted run computes (``tests/unit/test_shapes_resume.py``: the same final weights, bit for bit).

    ``RunProgress(None)`` records nothing: every phase is pending and ``done`` only checks ``stop_after``.
    """

    def __init__(self, out: Path | None, stop_after: str | None = None) -> None:
        self.out = out
        self.stop_after = stop_after
        self.phases: list[str] = []
        self.seconds = 0.0
        self._t0 = time.perf_counter()

    @property
    def root(self) -> Path | None:
        return None if self.out is None else self.out / "resume"

    def last_snapshot(self) -> Path | None:
        """The newest complete snapshot (None: none)."""
        if self.root is None or not self.root.is_dir():
            return None
        done = sorted(p for p in self.root.iterdir() if (p / "state.json").is_file())
        return done[-1] if done else None

    def pending(self, name: str) -> bool:
        return name not in self.phases

    def elapsed(self) -> float:
        """Seconds of the run so far: this part's since this object was made, and the finished phases' of the parts
        before (what an interrupted phase had run is lost)."""
        return self.seconds + time.perf_counter() - self._t0

    def done(self, name: str, model: VARGPT, sampling: ImageParams) -> None:
        """Record phase ``name`` as done with ``model`` and ``sampling`` as they now are; raises ``RunStopped`` if
        it is the phase to stop after."""
        self.phases.append(name)
        if self.root is not None:
            snap = self.root / f"{len(self.phases):02d}-{name}"
            if snap.exists():  # a leftover of an interrupted write
                shutil.rmtree(snap)
            save_checkpoint(model, snap)
            save_sampling_defaults(snap, sampling)
            torch.save(capture_rng_state(), snap / "rng.pt")
            state = {"phases": self.phases, "seconds": self.elapsed(), "dropout_off": _dropout_off(model)}
            tmp = snap / "state.json.tmp"  # whole or absent: a cut-off write leaves no state.json
            tmp.write_text(json.dumps(state, indent=1) + "\n")
            tmp.replace(snap / "state.json")
            for old in self.root.iterdir():
                if old != snap:
                    shutil.rmtree(old)
        if name == self.stop_after:
            raise RunStopped(name)

    def restore(self, device: str | torch.device = "cpu") -> tuple[VARGPT, ImageParams]:
        """The model and the sampling defaults of the last snapshot, with the phases done, the time taken, the
        dropout state and the global RNG states as they were after it."""
        snap = self.last_snapshot()
        if snap is None:
            raise FileNotFoundError(f"{self.root}: no snapshot of a finished phase to resume from (none written, or "
                                    "the run stopped in its first phase): start the run again without resuming")
        state = json.loads((snap / "state.json").read_text())
        self.phases, self.seconds = list(state["phases"]), float(state["seconds"])
        model = load_model(snap, dtype=torch.float32, device=device)
        if state["dropout_off"]:
            disable_dropout(model)
        restore_rng_state(torch.load(snap / "rng.pt", weights_only=True))
        return model, load_sampling_defaults(snap)
