"""Settings of ``vargpt train``: the option sections and their resolution from the recipe, ``--config`` and ``--set``.

Settings are dataclasses and are resolved in this order (later wins):

1. the recipe's ``TrainConfig`` (``RECIPES[name].train``; the ``vae`` recipe: ``VAETrainConfig``'s optimiser
   defaults) and the defaults of the option sections below;
2. ``--config FILE`` (JSON, or YAML when PyYAML is importable): an object of ``TrainConfig`` fields plus optional
   section objects ``"data"``, ``"dpo"``, ``"lora"``, ``"vae"`` -- the format of ``final/train_config.json``;
3. ``--set key=value`` (repeatable): a ``TrainConfig`` field (``lr=1e-3``) or ``section.field``
   (``dpo.beta=0.2``), parsed by the field's type (``betas=0.9,0.95``; ``warmup_steps=none``);
4. ``--max-steps N``; ``out_dir`` = ``--out``.

A section is accepted only where it is used: ``data`` always (``prompt_drop_rate`` for SFT recipes only), ``dpo``
for DPO recipes, ``lora`` with ``--lora``, ``vae`` (the loss settings of ``VAETrainConfig``) for the ``vae`` recipe.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vargpt.train.loop import TrainConfig, TrainConfigError
from vargpt.train.recipes import RECIPES, Recipe

__all__ = ["TrainCommandError", "apply_sets", "DataOptions", "DPOOptions", "LoraOptions", "RunConfig", "resolve_config",
           "VAE_RECIPE", "VAE_LOSS_FIELDS"]

VAE_RECIPE = "vae"
# the VAETrainConfig fields the vae recipe takes from the "vae" section (those VAELoss reads; the generic loop runs
# it, so train_vae's own settings -- continuous_warmup_steps, lr_schedule, mixed_precision -- do not apply);
# steps, lr, batch ... come from TrainConfig
VAE_LOSS_FIELDS = ("l1_weight", "l2_weight", "commit_weight", "entropy_weight", "per_sample_entropy_weight",
                   "codebook_entropy_weight", "inv_temperature", "multiscale", "foreground_weight", "background")


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
    """``add_lora`` arguments; ``targets`` None = the groups covering the recipe's stage
    (``vargpt.train.cli.STAGE_LORA_TARGETS``)."""

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
    if origin is dict:
        return f"comma-separated KEY:VALUE pairs ({_type_name(args[0])} keys, {_type_name(args[1])} values)"
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
    if origin is dict:  # --set module_lr=backbone.lm_head:3e-4,decoder:1e-3; in a file, an object
        if text:
            items = [p.strip() for p in value.strip().strip("{}").split(",") if p.strip()]
            pairs = [item.rpartition(":") for item in items]
            if any(not sep or not k.strip() for k, sep, _ in pairs):
                raise bad
            value = {k.strip(): v.strip() for k, _, v in pairs}
        if not isinstance(value, dict):
            raise bad
        return {_convert(k, args[0], where, text=text): _convert(v, args[1], f"{where}[{k!r}]", text=text)
                for k, v in value.items()}
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


def _split_set(item: str, where: str) -> tuple[str, str]:
    """(key, value text) of a ``KEY=VALUE`` item; no ``=`` is an error naming the item."""
    key, eq, text = item.partition("=")
    if not eq:
        raise TrainCommandError(f"{where} {item!r}: expected KEY=VALUE")
    return key.strip(), text


def apply_sets(obj, sets: list[str], where: str = "--set"):
    """A copy of the dataclass ``obj`` with ``KEY=VALUE`` items applied (each value converted to the field's type;
    a bad key or value is a ``TrainCommandError`` naming the item, the field and what was expected). Used for
    ``vargpt train shapes --set`` on ``ShapesRunConfig``; the field's own checks run on the result."""
    hints = _field_types(type(obj))
    values: dict[str, Any] = {}
    for item in sets:
        key, text = _split_set(item, where)
        if not key:
            raise TrainCommandError(f"{where} {item!r}: expected KEY=VALUE")
        if key not in hints:
            raise TrainCommandError(f"{where} {item!r}: {type(obj).__name__} has no field {key!r}; expected one of "
                                    f"{sorted(hints)}")
        values[key] = _convert(text, hints[key], f"{where} {key}", text=True)
    try:
        return dataclasses.replace(obj, **values)
    except ValueError as e:
        raise TrainCommandError(f"{where}: {e}") from None


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
        key, text = _split_set(item, "--set")
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
