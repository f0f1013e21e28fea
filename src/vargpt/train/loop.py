"""The one shared training loop (STYLE C12): accumulation, mixed precision, clipping, LR schedule, evaluation,
logging, checkpoint/resume. Objectives plug in as a ``step_fn(model, batch) -> (loss, metrics)``.

The model is single-device code; ``accelerate`` applies the parallelism (DDP, FSDP, DeepSpeed) chosen by the
launch configuration (``configs/accelerate/``, docs/training.md). On a machine without an accelerator the loop
builds ``Accelerator(cpu=True)``: under ``torchrun`` that is DDP over gloo (without ``cpu=True`` every process would
silently train alone).

Semantics, chosen so that runs are reproducible and comparable across process counts:

* a *step* is one optimizer update = ``grad_accum`` micro-batches of ``batch_size`` samples on every process;
* the data order depends only on ``seed`` (``vargpt.train.state.ResumableBatchSampler``): N processes with batch b
  see, step by step, the same samples as one process with batch N*b;
* the LR schedule (``transformers.get_cosine_schedule_with_warmup``) counts optimizer steps. It is stepped by the
  loop, not by accelerate, whose scheduler wrapper steps it once per process;
* ``TrainResult.losses[i]`` is the loss of one step: mean over its micro-batches, then over processes;
* global RNGs are seeded with ``seed + process index`` (different dropout per process), and their states are part
  of every checkpoint, so an interrupted and resumed run reproduces the uninterrupted losses bit for bit
  (``num_workers=0``; with worker processes, randomness *inside* workers restarts per epoch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from vargpt.train.state import (
    ResumableBatchSampler,
    TrainerState,
    frozen_checksum,
    latest_checkpoint,
    load_rng,
    load_sharded_state,
    load_training_checkpoint,
    read_trainer_state,
    save_training_checkpoint,
)

__all__ = ["TrainConfig", "TrainResult", "StepInfo", "train", "default_step_fn", "make_accelerator",
           "build_optimizer", "TrainConfigError"]

StepFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]]


class TrainConfigError(ValueError):
    """A TrainConfig value is invalid; the message names the field."""


def _require(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise TrainConfigError(f"TrainConfig.{name}: {msg}")


@dataclass(kw_only=True)
class TrainConfig:
    """Hyper-parameters and bookkeeping of one run. Defaults follow SPEC.md §4.3 where it is known (lr 5e-5, cosine,
    warm-up ratio 0.1, clip 1.0, weight decay 0, AdamW); the rest are LLaMA-Factory / transformers defaults.

    ``warmup_steps`` (an int) overrides ``warmup_ratio`` (of ``max_steps``). ``eval_every``/``save_every`` 0 = only at
    the end. Weight decay applies to parameters of >= 2 dimensions (not to biases, norms, gains).

    ``module_lr`` maps parameter-name prefixes to their own peak rate (e.g. ``{"backbone.model.language_model":
    3e-4}``): a parameter takes the rate of the longest prefix it matches (its name equals the prefix or continues it
    after a dot), ``lr`` otherwise. The schedule scales every rate alike. A prefix that matches no trainable parameter
    is an error (a typo would otherwise train everything at ``lr``).
    """

    lr: float = 5e-5
    module_lr: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int | None = None
    warmup_ratio: float = 0.1
    max_steps: int = 1000
    batch_size: int = 1  # per process
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0 = no clipping
    mixed_precision: Literal["no", "bf16"] = "no"
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_last_checkpoints: int = 0  # 0 = keep all
    save_full_model: bool = False  # also write config.json + model.safetensors (VARGPT) into each checkpoint
    out_dir: str = "runs/train"
    num_workers: int = 0
    find_unused_parameters: bool = True  # DDP: cond-drop leaves cfg_uncond / the start vector unused on some steps

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON gives a list
        _require(self.lr > 0 and math.isfinite(self.lr), "lr", f"must be a positive number, got {self.lr}")
        self.module_lr = {str(k): float(v) for k, v in dict(self.module_lr).items()}
        for prefix, rate in self.module_lr.items():
            _require(bool(prefix) and not prefix.endswith("."), "module_lr",
                     f"prefix {prefix!r} must be a parameter name or a module path without a trailing dot")
            _require(rate > 0 and math.isfinite(rate), "module_lr",
                     f"{prefix!r}: must be a positive number, got {rate}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                 f"expected two values in [0, 1), got {self.betas}")
        _require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        _require(self.warmup_steps is None or 0 <= self.warmup_steps <= self.max_steps, "warmup_steps",
                 f"must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        _require(0 <= self.warmup_ratio <= 1, "warmup_ratio", f"must be in [0, 1], got {self.warmup_ratio}")
        for name in ("batch_size", "grad_accum", "log_every"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "keep_last_checkpoints", "num_workers"):
            _require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _require(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0 (0 = off), got {self.max_grad_norm}")
        _require(self.mixed_precision in ("no", "bf16"), "mixed_precision",
                 f"expected 'no' or 'bf16' (fp16 is not supported), got {self.mixed_precision!r}")
        _require(bool(self.out_dir), "out_dir", "must be a directory path")

    @property
    def num_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * self.max_steps)  # as transformers' TrainingArguments

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainConfigError(f"TrainConfig: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


@dataclass
class StepInfo:
    """What callbacks see after every optimizer step. A callback returning True stops the run after this step (a
    checkpoint is written first)."""

    step: int
    max_steps: int
    loss: float
    lr: float
    grad_norm: float | None
    metrics: dict[str, float]
    eval_metrics: dict[str, float] | None
    checkpoint: Path | None


@dataclass
class TrainResult:
    """``losses`` holds the steps run by this call (``first_step + 1`` ... ``steps``)."""

    losses: list[float]
    steps: int
    first_step: int
    checkpoint: Path | None
    evals: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    trainable: list[str] = field(default_factory=list)


def default_step_fn(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """``model(**batch).loss``; VARGPT's text and bit losses, when present, become metrics."""
    out = model(**batch)
    metrics = {k: getattr(out, k) for k in ("text_loss", "bit_loss") if getattr(out, k, None) is not None}
    return out.loss, metrics


def make_accelerator(config: TrainConfig):
    """``Accelerator`` for ``config``: CPU (gloo under torchrun) when no GPU is visible, the launch configuration's
    strategy otherwise."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, config.mixed_precision):
        # accelerate keeps the precision in a process-wide singleton and refuses to change it; one process may run
        # several phases (e.g. SFT then DPO), so forget the accelerator-level state (not the process group).
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)],
    )


def _module_rate(name: str, module_lr: dict[str, float], default: float) -> tuple[str | None, float]:
    """(the longest prefix of ``module_lr`` that ``name`` matches or None, its rate or ``default``)."""
    hits = [p for p in module_lr if name == p or name.startswith(p + ".")]
    if not hits:
        return None, default
    prefix = max(hits, key=len)
    return prefix, module_lr[prefix]


def build_optimizer(named_params: Sequence[tuple[str, nn.Parameter]], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the given (trainable) parameters; weight decay only on tensors of >= 2 dimensions; peak rates per
    ``config.module_lr`` (one parameter group per rate and decay)."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    used: set[str] = set()
    for name, p in named_params:
        prefix, rate = _module_rate(name, config.module_lr, config.lr)
        if prefix is not None:
            used.add(prefix)
        groups.setdefault((rate, p.ndim >= 2), []).append(p)
    unused = sorted(set(config.module_lr) - used)
    if unused:
        raise TrainConfigError(f"TrainConfig.module_lr: prefix(es) {unused} match no trainable parameter; trainable "
                               f"modules: {sorted({n.rsplit('.', 1)[0] for n, _ in named_params})[:20]}")
    # the groups at ``lr`` first (decayed, then not: the layout without ``module_lr``), so that ``param_groups[0]``
    # is the run's base rate where any parameter has it
    order = sorted(groups, key=lambda k: (k[0] != config.lr, not k[1]))
    param_groups = [{"params": groups[k], "lr": k[0], "weight_decay": config.weight_decay if k[1] else 0.0}
                    for k in order]
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=config.betas, eps=config.eps)


def train(
    model: nn.Module,
    dataset,
    collate_fn: Callable[[list[Any]], Any],
    config: TrainConfig,
    *,
    step_fn: StepFn | None = None,
    eval_fn: Callable[[nn.Module], dict[str, Any]] | None = None,
    resume: str | Path | None = None,
    callbacks: Sequence[Callable[[StepInfo], bool | None]] = (),
    accelerator=None,
    group_ids: Sequence[int] | None = None,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad for ``config.max_steps`` optimizer steps.

    Args:
        model: single-device module; its ``requires_grad`` flags define what trains (``recipes.apply_stage``).
            Trained in place (under FSDP/DeepSpeed read the weights back from the final checkpoint).
        dataset: map-style dataset (``len`` + ``__getitem__``).
        collate_fn: list of items -> batch (typically a dict of ``VARGPT.forward`` keyword arguments).
        config: the run's TrainConfig.
        step_fn: ``(prepared_model, batch) -> (loss, metrics)``; default ``model(**batch).loss``. It must call the
            prepared model's ``forward`` (DDP synchronises through it) and runs under the mixed-precision autocast.
            ``metrics`` (floats or scalar tensors) are logged as the main process's values.
        eval_fn: ``(unwrapped_model) -> dict`` run on every process every ``eval_every`` steps and at the end, in
            eval mode under ``no_grad``.
        resume: a checkpoint directory written by this loop; restores weights, optimizer, scheduler, data position and
            RNG states. ``model`` must be built as for the original run (frozen weights are not in the checkpoint).
        callbacks: called after each step with a ``StepInfo``; returning True stops training.
        accelerator: an ``accelerate.Accelerator`` to use instead of ``make_accelerator(config)``.
        group_ids: optional group id per dataset item (e.g. its task): each global batch is then drawn from one group
            where possible (``state.grouped_permutation``), so rows of very different lengths (a short answer, a
            sequence with 121 image slots) are not padded to each other. A resumed run must pass the same ids.
    """
    from accelerate.utils import DistributedType, send_to_device, set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    accelerator = accelerator or make_accelerator(config)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    step_fn = step_fn or default_step_fn
    out_dir = Path(config.out_dir)
    ckpt_root = out_dir / "checkpoints"
    log_file = out_dir / "log.jsonl"
    if resume is None and latest_checkpoint(out_dir) is not None:
        raise FileExistsError(f"{out_dir} already holds checkpoints of another run: pass resume=... to continue it "
                              "or choose a new out_dir")
    set_seed(config.seed + rank)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("no parameter of the model requires grad: nothing to train (apply a stage first)")
    trainable = [n for n, _ in named]
    optimizer = build_optimizer(named, config)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.num_warmup_steps, config.max_steps)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    state = TrainerState(num_processes=world, global_batch=config.batch_size * world, trainable=trainable,
                         frozen_checksum=None if sharded else frozen_checksum(model))
    if resume is not None:
        _check_resumed_config(Path(resume), config)
        if sharded:
            state = read_trainer_state(resume)
        else:
            state = load_training_checkpoint(resume, model=model, optimizer=optimizer, scheduler=scheduler,
                                             trainable=trainable)
        state.num_processes, state.global_batch = world, config.batch_size * world

    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is not None:  # DeepSpeed needs the micro-batch size and clipping before prepare (no dataloader)
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
        if ds_plugin.is_auto("gradient_clipping"):
            ds_plugin.deepspeed_config["gradient_clipping"] = config.max_grad_norm
    model, optimizer = accelerator.prepare(model, optimizer)
    # the norm and the clipping cover what this run trains: a frozen parameter may still hold the gradient of an
    # earlier phase (a tokenizer or ViT trained before, in place), which would count in the norm and clip for nothing
    clipped = [p for p in model.parameters() if p.requires_grad]
    if accelerator.gradient_accumulation_steps != config.grad_accum:
        raise ValueError(f"the launch configuration sets gradient accumulation to "
                         f"{accelerator.gradient_accumulation_steps}, TrainConfig.grad_accum is {config.grad_accum}; "
                         "leave it unset (auto) in the accelerate/DeepSpeed config")
    if resume is not None:
        load_sharded_state(resume, accelerator)

    sampler = ResumableBatchSampler(len(dataset), config.batch_size, num_replicas=world, rank=rank, seed=config.seed,
                                    start=state.position, groups=group_ids)
    # the loader's own generator: creating its iterator must not draw from the global RNG (that would shift the
    # dropout / noise stream of a resumed run against the uninterrupted one)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=config.num_workers,
                        generator=torch.Generator().manual_seed(config.seed * 1_000_003 + state.position.epoch),
                        pin_memory=accelerator.device.type == "cuda")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_file, state.step)
    if resume is not None:
        load_rng(resume, rank, fallback_seed=config.seed + rank + state.step)

    first_step = state.step
    result = TrainResult(losses=[], steps=state.step, first_step=first_step, checkpoint=None, trainable=trainable)
    last_saved = first_step if resume is not None else None
    samples_per_step = config.batch_size * world * config.grad_accum
    bar = tqdm(total=config.max_steps, initial=first_step, disable=not main, desc="train", dynamic_ncols=True)
    batches = iter(loader)
    model.train()

    try:
        while state.step < config.max_steps:
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            metric_sums: dict[str, float] = {}
            grad_norm = lr = None
            for _ in range(config.grad_accum):
                batch = send_to_device(next(batches), accelerator.device)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss, metrics = step_fn(model, batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss {float(loss.detach())} at step {state.step + 1}")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        lr = optimizer.param_groups[0]["lr"]  # the rate this update uses
                        if config.max_grad_norm > 0:
                            norm = accelerator.clip_grad_norm_(clipped, config.max_grad_norm)
                            grad_norm = None if norm is None else float(norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach().double()
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
                state.position = state.position.advance(len(dataset), state.global_batch)
            if not accelerator.sync_gradients:  # accelerate's micro-step counter disagrees with ours
                raise RuntimeError("gradient accumulation out of step with accelerate")
            state.step += 1
            step_loss = float(accelerator.reduce(loss_sum / config.grad_accum, "mean"))
            state.losses.append(step_loss)
            result.losses.append(step_loss)
            metrics = {k: v / config.grad_accum for k, v in metric_sums.items()}
            dt = time.perf_counter() - t0

            eval_metrics = None
            if eval_fn is not None and ((config.eval_every and state.step % config.eval_every == 0)
                                        or state.step == config.max_steps):
                eval_metrics = _evaluate(eval_fn, accelerator, model)
                result.evals.append({"step": state.step, **eval_metrics})
            if main and (state.step % config.log_every == 0 or eval_metrics is not None):
                record = {"step": state.step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                          "samples_per_s": samples_per_step / dt, "epoch": state.position.fraction(len(dataset)),
                          **metrics, **{f"eval/{k}": v for k, v in (eval_metrics or {}).items()}}
                with log_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", samples_s=f"{samples_per_step / dt:.1f}")

            checkpoint = None
            if config.save_every and state.step % config.save_every == 0:
                checkpoint = _save(ckpt_root, accelerator, model, optimizer, scheduler, config, state)
                result.checkpoint, last_saved = checkpoint, state.step
            info = StepInfo(step=state.step, max_steps=config.max_steps, loss=step_loss, lr=lr, grad_norm=grad_norm,
                            metrics=metrics, eval_metrics=eval_metrics, checkpoint=checkpoint)
            stop = any([bool(cb(info)) for cb in callbacks])
            if callbacks and world > 1:  # any process asking to stop stops all of them
                flag = accelerator.reduce(torch.tensor(float(stop), device=accelerator.device), "sum")
                stop = bool(flag > 0)
            if stop:
                result.stopped_early = state.step < config.max_steps
                break
    finally:
        bar.close()
        # accelerate's mixed precision wraps the model's own ``forward`` in autocast (on the caller's object, not only
        # on a DDP wrapper); without this, every later use of the model -- sampling, an fp32 phase such as DPO, whose
        # fresh fp32 reference would then differ from the policy at step 0 -- would still run in bf16
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)

    if last_saved != state.step:
        result.checkpoint = _save(ckpt_root, accelerator, model, optimizer, scheduler, config, state)
    elif result.checkpoint is None:  # resumed at max_steps: nothing ran
        result.checkpoint = Path(resume)
    result.steps = state.step
    return result


def _save(root, accelerator, model, optimizer, scheduler, config: TrainConfig, state: TrainerState) -> Path:
    return save_training_checkpoint(root, accelerator=accelerator, model=model, optimizer=optimizer,
                                    scheduler=scheduler, train_config=config, state=state,
                                    save_full_model=config.save_full_model, keep_last=config.keep_last_checkpoints)


@torch.no_grad()
def _evaluate(eval_fn, accelerator, model) -> dict[str, Any]:
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    try:
        with accelerator.autocast():
            out = eval_fn(unwrapped)
    finally:
        model.train()
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


# fields that may differ between the original and the resumed run without breaking the exact continuation
_BOOKKEEPING = {"log_every", "eval_every", "save_every", "keep_last_checkpoints", "save_full_model", "out_dir",
                "num_workers"}


def _check_resumed_config(path: Path, config: TrainConfig) -> None:
    import warnings

    f = path / "train_config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not a training checkpoint (no train_config.json)")
    saved = TrainConfig.from_dict(json.loads(f.read_text())).to_dict()
    diff = sorted(k for k, v in config.to_dict().items() if saved.get(k) != v and k not in _BOOKKEEPING)
    if diff:
        warnings.warn(f"resuming {path} with changed settings {diff}: the run will not continue the original exactly",
                      stacklevel=3)


def _truncate_log(log_file: Path, step: int) -> None:
    """Drop log records past ``step`` (written by an interrupted run after the checkpoint it resumes from)."""
    if not log_file.is_file():
        return
    keep = [line for line in log_file.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    log_file.write_text("".join(line + "\n" for line in keep))
