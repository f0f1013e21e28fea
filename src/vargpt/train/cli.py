"""The ``vargpt train`` command: a recipe, data files and starting weights -> a trained checkpoint directory.

``vargpt/cli.py`` declares the options (typer) and calls ``run_train``; everything else lives here, so the command
line stays a thin adapter over the library (STYLE C10): records (``vargpt.data``), the recipes and stages
(``vargpt.train.recipes``), the loop (``vargpt.train.loop``) and the objectives (``DPOStep``, ``VAELoss``, LoRA).

Settings (the recipe's, ``--config``, ``--set``, ``--max-steps``) are resolved by ``vargpt.train.run_config``.

The run writes ``OUT/checkpoints/step-*/`` and ``OUT/log.jsonl`` (the loop) and, at the end, ``OUT/final/``: a
complete checkpoint (``config.json``, ``model.safetensors``, tokenizer files, ``preprocessor_config.json``) that
``Engine.load`` and ``--init`` read, plus ``train_config.json`` (the resolved settings, usable as ``--config``) and
``run.json`` (recipe, data files, starting weights, steps, last loss).

Resuming (``--resume DIR|latest``) continues a run exactly when it is given the same options (a ``--preset`` start is
rebuilt from ``TrainConfig.seed``; the DPO reference default is the starting weights, not the resumed ones).
Raising ``--max-steps`` on resume extends the run but is not the uninterrupted longer run: the cosine schedule is a
function of ``max_steps``, and the loop warns about the change.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vargpt.train.recipes import RECIPES, apply_stage
from vargpt.train.run_config import TrainCommandError, resolve_config
from vargpt.train.state import latest_checkpoint

__all__ = ["TrainCommandError", "run_train", "STAGE_LORA_TARGETS"]

CHAR_VOCAB_MAX = 4096  # --preset builds a character tokenizer; past this size it would be mostly reserved ids
# LoRA target groups (vargpt.train.lora.LORA_TARGETS) covering what each stage trains (recipes.STAGES)
STAGE_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "stage1": ("projectors",), "stage2": ("llm",), "stage3": ("decoder", "projectors"),
    "edit": ("decoder", "projectors"), "dpo": ("decoder", "projectors"),
}


# -------------------------------------------------------------------------------------------------------- pieces
def _peek_kind(path: Path) -> str:
    """"dpo" when the file's first record has ``conversations`` (the DPO format), else "sft" (vae recipe only)."""
    try:
        text = path.read_text(encoding="utf-8")
        first = (json.loads(next(line for line in text.split("\n") if line.strip())) if path.suffix == ".jsonl"
                 else json.loads(text)[0])
    except (OSError, ValueError, StopIteration, IndexError, KeyError, TypeError):
        return "sft"  # load_records reports the problem
    return "dpo" if isinstance(first, dict) and "conversations" in first else "sft"


def _load_data(files: list[Path], kind: str | None, skip_bad: bool, recipe: str, echo) -> list:
    from vargpt.data import RecordError, load_records

    records: list = []
    skipped = 0
    for f in files:
        k = kind or _peek_kind(Path(f))
        try:
            loaded = load_records(f, k, skip_bad=skip_bad)
        except RecordError as e:
            other = {"sft": ("conversations", "chosen", "rejected"), "dpo": ("messages",)}[k]
            hint = (f" (recipe {recipe} reads {k.upper()} records)"
                    if e.field.split(".")[0] in ("messages", "conversations") or e.field in other else "")
            raise TrainCommandError(f"{e}{hint}") from None
        except (OSError, ValueError) as e:
            raise TrainCommandError(f"--data {f}: {e}") from None
        if loaded.skipped:
            echo(f"{f}: skipped {loaded.skipped} bad record(s) (first: {loaded.errors[0]})")
        skipped += loaded.skipped
        records.extend(loaded.records)
    if not records:
        raise TrainCommandError(f"no usable records in {', '.join(map(str, files))}")
    echo(f"data: {len(records)} record(s) from {len(files)} file(s)" + (f", {skipped} skipped" if skipped else ""))
    return records


def _check_start(init: Path | None, preset: str | None):
    """Cheap checks of the starting-weights options (before the data is read); returns the preset's config."""
    from vargpt.config import ConfigError, get_preset

    if (init is None) == (preset is None):
        raise TrainCommandError("give exactly one of --init CHECKPOINT_DIR and --preset NAME")
    if init is not None:
        if not Path(init).is_dir():
            raise TrainCommandError(f"--init {init}: not a checkpoint directory")
        return None
    try:
        cfg = get_preset(preset)
    except ConfigError as e:
        raise TrainCommandError(f"--preset: {e}") from None
    if cfg.text.vocab_size > CHAR_VOCAB_MAX:
        raise TrainCommandError(f"--preset {preset}: its vocabulary has {cfg.text.vocab_size} tokens; the character "
                                f"tokenizer of --preset suits small vocabularies (<= {CHAR_VOCAB_MAX}); start from a "
                                "checkpoint that carries its tokenizer (--init DIR)")
    return cfg


def _starting_model(init: Path | None, preset: str | None, seed: int):
    """(model in fp32, processor, description) from a checkpoint directory or a fresh preset."""
    from vargpt.processing.processor import Processor

    cfg = _check_start(init, preset)
    if init is not None:
        from vargpt.checkpoint import load_model

        try:
            model = load_model(init, dtype=torch.float32)
            return model, Processor.from_dir(init, model.config), f"checkpoint {init}"
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise TrainCommandError(f"--init {init}: " + " ".join(str(e).split())[:500]) from None
    from vargpt.models.vargpt import VARGPT
    from vargpt.processing.tokenizer import char_tokenizer

    try:
        tokenizer = char_tokenizer(cfg.special_tokens, cfg.text.vocab_size)
    except ValueError as e:
        raise TrainCommandError(f"--preset {preset}: {e}") from None
    torch.manual_seed(seed)  # frozen weights are not in training checkpoints: a resumed run must rebuild the same
    model = VARGPT(cfg)
    return model, Processor(cfg, tokenizer), f"preset {preset} (random weights, seed {seed})"


def _with_schedule(model, name: str) -> None:
    from vargpt.config import ConfigError

    try:
        model.config = dataclasses.replace(model.config, gen_schedule=name)
    except ConfigError as e:
        raise TrainCommandError(f"--gen-schedule {name}: {e}") from None


def _resume_path(resume: str | None, out: Path) -> Path | None:
    if resume is None:
        existing = latest_checkpoint(out)
        if existing is not None:
            raise TrainCommandError(f"--out {out} already holds checkpoints of a run ({existing.name}): pass "
                                    "--resume latest to continue it, or choose another --out")
        return None
    if resume == "latest":
        path = latest_checkpoint(out)
        if path is None:
            raise TrainCommandError(f"--resume latest: no checkpoint under {out / 'checkpoints'}")
        return path
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise TrainCommandError(f"--resume {resume}: not a training checkpoint (no trainer_state.json)")
    return path


class _ImageData:
    """The vae recipe's dataset: image paths (``RecordError`` names the record if one cannot be read)."""

    def __init__(self, records: list) -> None:
        seen: dict[Path, tuple[str, str]] = {}
        for r in records:
            paths = (r.images if hasattr(r, "messages") else
                     (*r.prompt_images, r.chosen_image, r.rejected_image))
            for j, p in enumerate(paths):
                seen.setdefault(p, (r.source, f"images[{j}]"))
        self.items = list(seen.items())

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _image_collate(size: int, crop: str) -> Callable:
    from vargpt.data.collate import crop_offsets, generation_target, load_image, resize_for_crop

    def collate(items) -> torch.Tensor:
        out = []
        for path, (source, fld) in items:
            img = resize_for_crop(load_image(path, source, fld), size)
            out.append(generation_target(img, size, crop_offsets(img.height, img.width, size, crop)))
        return torch.stack(out)

    return collate


# ---------------------------------------------------------------------------------------------------------- run
def run_train(recipe: str, *, data: list[Path], out: Path, config: Path | None = None, init: Path | None = None,
              preset: str | None = None, resume: str | None = None, reference: Path | None = None,
              lora: bool = False, skip_bad: bool = False, max_steps: int | None = None, sets: list[str] = (),
              gen_schedule: str | None = None, echo: Callable[[str], Any] = print) -> Path:
    """Train and write ``out/final``; returns that path. User errors raise ``TrainCommandError``."""
    from vargpt.checkpoint import save_checkpoint
    from vargpt.models.vae.schedules import get_schedule, pixel_size
    from vargpt.models.vargpt import schedule_for_latent
    from vargpt.train.loop import make_accelerator, train

    out = Path(out)
    run = resolve_config(recipe, out_dir=out, config_file=config, sets=list(sets), max_steps=max_steps, lora=lora)
    rec = RECIPES.get(recipe)
    if reference is not None and (rec is None or rec.objective != "dpo"):
        raise TrainCommandError(f"--reference applies to DPO recipes only, not {recipe}")
    if lora and rec is None:
        raise TrainCommandError("--lora does not apply to the vae recipe (the VAE trains in full)")
    if not data:
        raise TrainCommandError("give at least one --data FILE")
    resume_path = _resume_path(resume, out)
    _check_start(init, preset)
    cfg = run.train
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    say = echo if main else (lambda _msg: None)

    kind = None if rec is None else ("dpo" if rec.objective == "dpo" else "sft")
    records = _load_data(list(data), kind, skip_bad, recipe, say)
    model, processor, source = _starting_model(init, preset, cfg.seed)
    schedule = gen_schedule or (rec.gen_schedule if rec is not None else model.config.gen_schedule)
    _with_schedule(model, schedule)
    ds = model.config.vae.downsample
    size = run.data.image_size or pixel_size(get_schedule(1.0, schedule), ds)[0]
    try:
        if size % ds:
            raise ValueError(f"expected a multiple of the VAE stride {ds}")
        schedule_for_latent(size // ds, size // ds)
    except ValueError as e:
        raise TrainCommandError(f"data.image_size={size}: {e}") from None
    say(f"recipe {recipe}: {source}, generation schedule {schedule} ({size} px), {cfg.max_steps} steps, lr "
        f"{cfg.lr:g}, batch {cfg.batch_size} x {accelerator.num_processes} process(es) x accumulation "
        f"{cfg.grad_accum}, precision {cfg.mixed_precision}")

    step_fn = None
    if rec is None:  # the visual tokenizer
        from vargpt.train.vae import VAELoss, VAETrainConfig, vae_step_fn

        model.requires_grad_(False)
        model.vae.requires_grad_(True)
        module = VAELoss(model.vae, VAETrainConfig(**run.vae))
        dataset, collate, step_fn = _ImageData(records), _image_collate(size, run.data.crop), vae_step_fn
    else:
        from vargpt.data import DPOCollator, SFTCollator

        if rec.objective == "dpo":
            from vargpt.checkpoint import load_model
            from vargpt.train.dpo import DPOStep

            if reference is None:  # the starting weights (training checkpoints only hold trainable weights)
                ref = copy.deepcopy(model)
            else:
                try:
                    ref = load_model(reference, dtype=torch.float32)
                except (OSError, ValueError, KeyError, RuntimeError) as e:
                    raise TrainCommandError(f"--reference {reference}: " + " ".join(str(e).split())[:500]) from None
                _with_schedule(ref, schedule)
            step_fn = DPOStep(ref, **dataclasses.asdict(run.dpo))
            collate = DPOCollator(model.config, processor, image_size=size, crop=run.data.crop)
        else:
            collate = SFTCollator(model.config, processor, image_size=size, crop=run.data.crop,
                                  prompt_drop_rate=run.data.prompt_drop_rate)
        if lora:
            from vargpt.train.lora import add_lora

            opts = run.lora
            try:
                add_lora(model, targets=opts.targets or STAGE_LORA_TARGETS[rec.stage], r=opts.r, alpha=opts.alpha,
                         dropout=opts.dropout)
            except ValueError as e:
                raise TrainCommandError(f"lora: {e}") from None
        else:
            apply_stage(model, rec.stage)
        module, dataset = model, records
    if len(dataset) < cfg.batch_size * accelerator.num_processes:
        raise TrainCommandError(f"{len(dataset)} training item(s) are fewer than one global batch (batch_size "
                                f"{cfg.batch_size} x {accelerator.num_processes} process(es))")
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in module.parameters())
    say(f"training {n_train:,} of {n_all:,} parameters" + (" (LoRA)" if lora else "") +
        (f"; resuming {resume_path}" if resume_path else ""))

    result = train(module, dataset, collate, cfg, step_fn=step_fn, resume=resume_path, accelerator=accelerator)

    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        say(f"sharded run: export the model from {result.checkpoint}/accelerate with accelerate's merge tools")
        return out / "final"
    model.eval()
    if lora:
        from vargpt.train.lora import merge_lora

        merge_lora(model)
    final = out / "final"
    if main:
        save_checkpoint(model, final)
        processor.save(final)
        (final / "train_config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
        last = result.losses[-1] if result.losses else None
        (final / "run.json").write_text(json.dumps({
            "recipe": recipe, "data": [str(f) for f in data], "start": source, "init": init and str(init),
            "preset": preset, "reference": reference and str(reference), "lora": lora, "gen_schedule": schedule,
            "resumed_from": resume_path and str(resume_path), "steps": result.steps, "last_loss": last,
            "training_checkpoint": str(result.checkpoint)}, indent=2) + "\n")
        say(f"final checkpoint: {final} (step {result.steps}" + (f", last loss {last:.4f}" if last is not None
                                                                   else "") + ")")
    accelerator.wait_for_everyone()
    return final
