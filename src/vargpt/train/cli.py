"""The ``vargpt train`` command: a recipe, data files and starting weights -> a trained checkpoint directory.

``vargpt/cli.py`` declares the options (typer) and calls ``run_train``; everything else lives here, so the command
line stays a thin adapter over the library (STYLE C10): records (``vargpt.data``), the recipes and stages
(``vargpt.train.recipes``), the loop (``vargpt.train.loop``) and the objectives (``DPOStep``, ``VAELoss``, LoRA).

Settings are dataclasses and are resolved in this order (later wins):

1. the recipe's ``TrainConfig`` (``RECIPES[name].train``; the ``vae`` recipe: ``VAETrainConfig``'s optimiser
   defaults) and the defaults of the option sections below;
2. ``--config FILE`` (JSON, or YAML when PyYAML is importable): an object of ``TrainConfig`` fields plus optional
   section objects ``"data"``, ``"dpo"``, ``"lora"``, ``"vae"`` -- the format of ``final/train_config.json``;
3. ``--set key=value`` (repeatable): a ``TrainConfig`` field (``lr=1e-3``) or ``section.field``
   (``dpo.beta=0.2``), parsed by the field's type (``betas=0.9,0.95``; ``warmup_steps=none``);
4. ``--max-steps N``; ``out_dir`` = ``--out``.

A section is accepted only where it is used: ``data`` always (``prompt_drop_rate`` for SFT recipes only), ``dpo``
for DPO recipes, ``lora`` with ``--lora``, ``vae`` (the loss weights of ``VAETrainConfig``) for the ``vae`` recipe.

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
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vargpt.train.loop import TrainConfig, TrainConfigError
from vargpt.train.recipes import RECIPES, Recipe, apply_stage
from vargpt.train.state import latest_checkpoint

__all__ = ["TrainCommandError", "DataOptions", "DPOOptions", "LoraOptions", "RunConfig", "resolve_config",
           "run_train", "VAE_RECIPE", "STAGE_LORA_TARGETS"]

VAE_RECIPE = "vae"
CHAR_VOCAB_MAX = 4096  # --preset builds a character tokenizer; past this size it would be mostly reserved ids
# LoRA target groups (vargpt.train.lora.LORA_TARGETS) covering what each stage trains (recipes.STAGES)
STAGE_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "stage1": ("projectors",), "stage2": ("llm",), "stage3": ("decoder", "projectors"),
    "edit": ("decoder", "projectors"), "dpo": ("decoder", "projectors"),
}
# the VAETrainConfig fields the vae recipe takes from the "vae" section; steps, lr, batch ... come from TrainConfig
VAE_LOSS_FIELDS = ("l1_weight", "l2_weight", "commit_weight", "entropy_weight", "per_sample_entropy_weight",
                   "codebook_entropy_weight", "inv_temperature", "multiscale")


class TrainCommandError(ValueError):
    """A problem with the command's inputs; the message is one line naming the file / option / field."""


# ------------------------------------------------------------------------------------------------ option sections
@dataclass(kw_only=True)
class DataOptions:
    """Collation. ``image_size``: side of the generation targets (default: the model's generation schedule at 1:1;
    the ``vae`` recipe trains on images of this size); ``crop``: window of the target; ``prompt_drop_rate``: SFT
    prompt dropout for classifier-free guidance (``SFTCollator``)."""

    image_size: int | None = None
    crop: Literal["random", "center"] = "random"
    prompt_drop_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size <= 0:
            raise TrainCommandError(f"data.image_size: must be > 0, got {self.image_size}")
        if not 0.0 <= self.prompt_drop_rate <= 1.0:
            raise TrainCommandError(f"data.prompt_drop_rate: must be in [0, 1], got {self.prompt_drop_rate}")


@dataclass(kw_only=True)
class DPOOptions:
    """``DPOStep`` arguments (see its docstring); the flip seed always comes from the loop's RNG, so resumes
    replay it."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    bsc_max_strength: float | None = None
    cond_drop_rate: float = 0.0
    average: bool = False
    disable_dropout: bool = True
    randomness: Literal["shared", "independent"] = "shared"

    def __post_init__(self) -> None:
        checks = [("beta", self.beta > 0, "> 0"), ("label_smoothing", 0 <= self.label_smoothing < 0.5, "in [0, 0.5)"),
                  ("sft_weight", self.sft_weight >= 0, ">= 0"), ("cond_drop_rate", 0 <= self.cond_drop_rate <= 1,
                                                                 "in [0, 1]"),
                  ("bsc_max_strength", self.bsc_max_strength is None or self.bsc_max_strength >= 0, ">= 0")]
        for name, ok, want in checks:
            if not ok:
                raise TrainCommandError(f"dpo.{name}: must be {want}, got {getattr(self, name)}")


@dataclass(kw_only=True)
class LoraOptions:
    """``add_lora`` arguments; ``targets`` None = the groups covering the recipe's stage (``STAGE_LORA_TARGETS``)."""

    targets: tuple[str, ...] | None = None
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise TrainCommandError(f"lora: expected r >= 1, alpha > 0, dropout in [0, 1); got r={self.r}, "
                                    f"alpha={self.alpha}, dropout={self.dropout}")


@dataclass
class RunConfig:
    """Everything the run uses: the loop's ``TrainConfig`` and the sections this recipe accepts (None = unused)."""

    train: TrainConfig
    objective: Literal["sft", "dpo", "vae"]
    data: DataOptions = field(default_factory=DataOptions)
    dpo: DPOOptions | None = None
    lora: LoraOptions | None = None
    vae: dict[str, Any] | None = None  # VAETrainConfig loss fields

    def to_dict(self) -> dict[str, Any]:
        """The ``--config`` format: TrainConfig fields + section objects (only what this objective reads)."""
        data = dataclasses.asdict(self.data)
        if self.objective != "sft":
            del data["prompt_drop_rate"]
        d: dict[str, Any] = {**self.train.to_dict(), "data": data}
        for name in ("dpo", "lora"):
            if getattr(self, name) is not None:
                d[name] = dataclasses.asdict(getattr(self, name))
        if self.vae is not None:
            d["vae"] = dict(self.vae)
        return d


# ------------------------------------------------------------------------------------------------- typed values
def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        return f"comma-separated {_type_name(args[0])}s" if args[-1] is Ellipsis else \
            f"{len(args)} comma-separated values"
    return "none" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _convert(value: Any, hint, where: str, *, text: bool) -> Any:
    """``value`` (a string from ``--set`` when ``text``, else a decoded JSON/YAML value) as the type ``hint``."""
    bad = TrainCommandError(f"{where}: expected {_type_name(hint)}, got {value!r}")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (text and value.strip().lower() in ("none", "null"))):
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _convert(value, a, where, text=text)
            except TrainCommandError:
                pass
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise bad
    if origin is tuple:
        if text:
            value = [p.strip() for p in value.strip().strip("()[]").split(",") if p.strip()]
        if not isinstance(value, list | tuple):
            raise bad
        elems = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(elems) != len(value):
            raise bad
        return tuple(_convert(v, t, where, text=text) for v, t in zip(value, elems, strict=True))
    if hint is bool:
        if text and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        if not text and isinstance(value, bool):
            return value
        raise bad
    if hint in (int, float):
        if isinstance(value, bool):
            raise bad
        if text:
            try:
                return hint(value)
            except ValueError:
                raise bad from None
        if isinstance(value, int) or (hint is float and isinstance(value, float)):
            return hint(value)
        raise bad
    if hint is str and isinstance(value, str):
        return value
    raise bad


# ------------------------------------------------------------------------------------------------ config resolution
def _sections(recipe: Recipe | None, lora: bool) -> dict[str, tuple[Any, tuple[str, ...]]]:
    """Section name -> (dataclass, accepted fields) for this run."""
    data = tuple(f for f in _field_types(DataOptions) if f != "prompt_drop_rate" or
                 (recipe is not None and recipe.objective == "sft"))
    out: dict[str, tuple[Any, tuple[str, ...]]] = {"data": (DataOptions, data)}
    if recipe is not None and recipe.objective == "dpo":
        out["dpo"] = (DPOOptions, tuple(_field_types(DPOOptions)))
    if lora:
        out["lora"] = (LoraOptions, tuple(_field_types(LoraOptions)))
    if recipe is None:
        from vargpt.train.vae import VAETrainConfig

        out["vae"] = (VAETrainConfig, VAE_LOSS_FIELDS)
    return out


def _why_unused(key: str) -> str:
    section = key.split(".")[0]
    return {"dpo": "dpo.* applies to DPO recipes (" + ", ".join(n for n, r in RECIPES.items()
                                                                 if r.objective == "dpo") + ")",
            "lora": "lora.* needs --lora", "vae": "vae.* applies to the vae recipe",
            "data": "data.prompt_drop_rate applies to SFT recipes"}.get(section, "")


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TrainCommandError(f"--config {path}: file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise TrainCommandError(f"--config {path}: reading YAML needs PyYAML (not installed); "
                                    "use a .json file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise TrainCommandError(f"--config {path}: invalid YAML ({' '.join(str(e).split())})") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TrainCommandError(f"--config {path}:{e.lineno}: invalid JSON ({e.msg})") from None
    else:
        raise TrainCommandError(f"--config {path}: expected a .json, .yaml or .yml file")
    if not isinstance(data, dict):
        raise TrainCommandError(f"--config {path}: expected an object of settings, got {type(data).__name__}")
    return data


def resolve_config(recipe: str, *, out_dir: str | Path, config_file: Path | None = None, sets: list[str] = (),
                   max_steps: int | None = None, lora: bool = False) -> RunConfig:
    """The run's settings (see the module docstring for the order); every error names the file / key / field."""
    rec = RECIPES.get(recipe)
    if rec is None and recipe != VAE_RECIPE:
        raise TrainCommandError(f"unknown recipe {recipe!r}; expected one of {sorted([*RECIPES, VAE_RECIPE])}")
    if rec is not None:
        base = rec.train.to_dict()
    else:
        from vargpt.train.vae import VAETrainConfig

        v = VAETrainConfig()
        base = TrainConfig(lr=v.lr, betas=v.betas, weight_decay=v.weight_decay, max_grad_norm=v.max_grad_norm,
                           batch_size=v.batch_size, max_steps=v.steps, warmup_ratio=0.0).to_dict()
    sections = _sections(rec, lora)
    train_types = _field_types(TrainConfig)
    values: dict[str, Any] = {}  # "lr" or "dpo.beta" -> value
    valid = sorted(train_types) + [f"{s}.{f}" for s, (_, fs) in sections.items() for f in fs]
    every = {f"{s}.{f}" for r in [*RECIPES.values(), None]  # what some run accepts
             for s, (_, fs) in _sections(r, True).items() for f in fs}

    def hint(key: str):
        if "." not in key:
            return train_types[key]
        s, f = key.split(".", 1)
        return _field_types(sections[s][0])[f]

    def check_key(key: str, where: str) -> None:
        if key in valid:
            return
        if key in every:
            raise TrainCommandError(f"{where}: '{key}' is not used by recipe {recipe} ({_why_unused(key)})")
        raise TrainCommandError(f"{where}: unknown key '{key}'; valid keys: {', '.join(valid)}")

    if config_file is not None:
        where = f"--config {config_file}"
        for k, v in _read_config_file(Path(config_file)).items():
            if k in ("data", "dpo", "lora", "vae"):
                if not isinstance(v, dict):
                    raise TrainCommandError(f"{where}: '{k}' must be an object of {k}.* settings, got {v!r}")
                for f, fv in v.items():
                    check_key(f"{k}.{f}", where)
                    values[f"{k}.{f}"] = _convert(fv, hint(f"{k}.{f}"), f"{where}: {k}.{f}", text=False)
                continue
            check_key(k, where)
            values[k] = _convert(v, hint(k), f"{where}: {k}", text=False)
    for item in sets:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq:
            raise TrainCommandError(f"--set {item!r}: expected KEY=VALUE")
        check_key(key, "--set")
        values[key] = _convert(text, hint(key), f"--set {key}", text=True)
    if max_steps is not None:
        values["max_steps"] = max_steps
    values["out_dir"] = str(out_dir)

    try:
        train = TrainConfig(**{**base, **{k: v for k, v in values.items() if "." not in k}})
    except TrainConfigError as e:
        raise TrainCommandError(str(e)) from None

    def section(name: str):
        if name not in sections:
            return None
        cls, fields = sections[name]
        kw = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(name + ".")}
        if name == "vae":
            defaults = dataclasses.asdict(cls())
            kw = {f: kw.get(f, defaults[f]) for f in fields}
            try:
                cls(**kw)  # validation
            except ValueError as e:
                raise TrainCommandError(f"vae: {e}") from None
            return kw
        return cls(**kw)

    return RunConfig(train=train, objective=rec.objective if rec is not None else "vae", data=section("data"),
                     dpo=section("dpo"), lora=section("lora"), vae=section("vae"))


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
