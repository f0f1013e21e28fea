"""Run state of the training loop: the resumable data order, RNG states and atomic training checkpoints.

Data order (``ResumableBatchSampler``): epoch ``e`` is ``randperm(n)`` drawn from a private generator seeded with
``seed * 1_000_003 + e`` (a pure function of (seed, epoch): nothing to save but the position). The permutation is cut
into *global* batches of ``batch_size x num_processes`` samples (the incomplete tail is dropped, so every process
sees the same number of batches); process ``r`` takes the ``r``-th slice of each. One process with batch ``2b``
therefore sees exactly the samples that two processes with batch ``b`` see together. The position is
``DataPosition(epoch, samples consumed in the epoch)``, so a run can resume with another process count as long as
the offset is a multiple of the new global batch.

Checkpoint directory ``<out_dir>/checkpoints/step-00000006`` (written as ``.tmp-step-00000006``, then renamed)::

    trainer_state.json       step, data position, process count, the losses so far (see ``TrainerState``)
    train_config.json        the TrainConfig of the run
    trainable.safetensors    the trainable parameters (requires_grad), named as in the unwrapped model
    optimizer.pt, scheduler.pt   single process / DDP (identical on every process, written by the main one)
    rng/rank{r}.pt           python ``random``, numpy, torch CPU and CUDA generator states of process r
    config.json, model.safetensors   optional full model (``TrainConfig.save_full_model``, VARGPT models only):
                             the directory is then also a model checkpoint that ``load_checkpoint`` / the engine read
    accelerate/              FSDP / DeepSpeed only: ``Accelerator.save_state`` (sharded model + optimizer)

All files hold tensors, numbers and strings only, so they load with ``torch.load(weights_only=True)``.
Multi-node runs need ``out_dir`` on a file system shared by all nodes (every process writes its RNG file).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Sampler

__all__ = [
    "DataPosition",
    "ResumableBatchSampler",
    "TrainerState",
    "capture_rng_state",
    "frozen_checksum",
    "restore_rng_state",
    "checkpoint_name",
    "latest_checkpoint",
    "save_training_checkpoint",
    "load_training_checkpoint",
]

STATE_FORMAT = "vargpt-train-state"
STATE_VERSION = 1
_CKPT_PREFIX = "step-"


# ------------------------------------------------------------------------------------------------------ data order
@dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands: ``offset`` samples of epoch ``epoch``'s permutation have been consumed."""

    epoch: int = 0
    offset: int = 0

    def advance(self, num_samples: int, global_batch: int) -> DataPosition:
        """The position after one more global batch (the incomplete tail of an epoch is skipped)."""
        offset = self.offset + global_batch
        if offset + global_batch > num_samples:
            return DataPosition(self.epoch + 1, 0)
        return DataPosition(self.epoch, offset)

    def fraction(self, num_samples: int) -> float:
        """Epochs completed, as a float (for logs)."""
        return self.epoch + self.offset / num_samples


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=g)


def grouped_permutation(groups_N: torch.Tensor, global_batch: int, seed: int, epoch: int) -> torch.Tensor:
    """An epoch order whose consecutive windows of ``global_batch`` samples come from one group each (except the
    few windows that straddle two groups), windows in random order; a pure function of (groups, seed, epoch).

    Samples are shuffled as in ``epoch_permutation``, stably sorted by group (random order within each group), cut
    into windows and the full windows are shuffled; the remainder (< one window) stays last.
    """
    perm = epoch_permutation(len(groups_N), seed, epoch)
    order = perm[torch.argsort(groups_N[perm], stable=True)]
    n_full = len(order) // global_batch
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_009)
    windows = order[: n_full * global_batch].view(n_full, global_batch)[torch.randperm(n_full, generator=g)]
    return torch.cat([windows.flatten(), order[n_full * global_batch:]])


class ResumableBatchSampler(Sampler[list[int]]):
    """Endless stream of this process's index batches, starting at ``start`` (see the module docstring).

    Args:
        num_samples: length of the map-style dataset.
        batch_size: samples per process per batch.
        num_replicas, rank: process count and this process's index.
        seed: seeds the epoch permutations.
        start: position of the first batch to yield.
        groups: optional group id per sample (e.g. the task): every global batch then comes from one group, except
            at group boundaries (``grouped_permutation``) -- rows of similar length, less padding.
    """

    def __init__(self, num_samples: int, batch_size: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 start: DataPosition = DataPosition(), groups: Sequence[int] | None = None) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.global_batch = batch_size * num_replicas
        if num_samples < self.global_batch:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch of "
                             f"{batch_size} x {num_replicas} processes = {self.global_batch}")
        if start.offset % self.global_batch or start.offset + self.global_batch > num_samples:
            raise ValueError(f"data position {start} is not at a batch boundary for a global batch of "
                             f"{self.global_batch} (resuming with a different batch size or process count?)")
        if groups is not None and len(groups) != num_samples:
            raise ValueError(f"groups has {len(groups)} entries for {num_samples} samples")
        self.groups = None if groups is None else torch.as_tensor(list(groups), dtype=torch.int64)
        self.start = start

    def _order(self, epoch: int) -> torch.Tensor:
        if self.groups is None:
            return epoch_permutation(self.num_samples, self.seed, epoch)
        return grouped_permutation(self.groups, self.global_batch, self.seed, epoch)

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start
        perm = self._order(pos.epoch)
        while True:
            lo = pos.offset + self.rank * self.batch_size
            yield perm[lo: lo + self.batch_size].tolist()
            nxt = pos.advance(self.num_samples, self.global_batch)
            if nxt.epoch != pos.epoch:
                perm = self._order(nxt.epoch)
            pos = nxt


# -------------------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """Python ``random``, numpy (legacy global) and torch CPU (+ every CUDA device) generator states."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's key array as a tensor so the file loads with weights_only=True
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- checkpoints
@dataclass(kw_only=True)
class TrainerState:
    """The loop's counters, saved as ``trainer_state.json``.

    ``step`` counts optimizer steps; ``losses[i]`` is the loss of step ``i + 1`` (mean over micro-batches and
    processes); ``trainable`` lists the trainable parameter names and ``frozen_checksum`` summarises the frozen
    weights, which the checkpoint does not hold (both checked on resume).
    """

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    num_processes: int = 1
    global_batch: int = 1
    losses: list[float] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    frozen_checksum: float | None = None  # see ``frozen_checksum``: the frozen weights must match on resume

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["position"] = {"epoch": self.position.epoch, "offset": self.position.offset}
        return {"format": STATE_FORMAT, "format_version": STATE_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<dict>") -> TrainerState:
        d = dict(d)
        if d.pop("format", None) != STATE_FORMAT or d.pop("format_version", None) != STATE_VERSION:
            raise ValueError(f"{source}: not a {STATE_FORMAT} v{STATE_VERSION} file")
        d["position"] = DataPosition(**d["position"])
        return cls(**d)


def frozen_checksum(model) -> float:
    """Sum of |w| over the frozen parameters (float64): a cheap check that a resumed run was given the same frozen
    weights (they are not saved in training checkpoints)."""
    total = 0.0
    for p in model.parameters():
        if not p.requires_grad:
            total += float(p.detach().double().abs().sum())
    return total


def checkpoint_name(step: int) -> str:
    return f"{_CKPT_PREFIX}{step:08d}"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``out_dir/checkpoints`` (temporary dirs ignored)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith(_CKPT_PREFIX) and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name[len(_CKPT_PREFIX):]), default=None)


def _is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _trainable_tensors(accelerator, model, names: list[str]) -> dict[str, torch.Tensor]:
    """Full (gathered) values of the trainable parameters, on the CPU; empty on non-main processes under FSDP."""
    sd = accelerator.get_state_dict(model)  # unwraps DDP; gathers FSDP / ZeRO-3 shards onto the main process
    if not sd:
        return {}
    missing = [n for n in names if n not in sd]
    if missing:
        raise KeyError(f"trainable parameters missing from the model's state dict: {missing[:10]}")
    # a real copy: safetensors refuses tensors sharing storage, and the live parameters keep training
    return {n: sd[n].detach().to("cpu", copy=True).contiguous() for n in names}


def save_training_checkpoint(root: str | Path, *, accelerator, model, optimizer, scheduler, train_config,
                             state: TrainerState, save_full_model: bool = False, keep_last: int = 0) -> Path:
    """Write ``root/step-XXXXXXXX`` atomically (every process must call this; see the module docstring).

    ``keep_last > 0`` then deletes all but the newest ``keep_last`` checkpoints. Returns the checkpoint path.
    """
    root = Path(root)
    final = root / checkpoint_name(state.step)
    tmp = root / f".tmp-{final.name}"
    main = accelerator.is_main_process
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)  # left over by a run killed while saving
        (tmp / "rng").mkdir(parents=True)
    accelerator.wait_for_everyone()

    torch.save(capture_rng_state(), tmp / "rng" / f"rank{accelerator.process_index}.pt")
    if _is_sharded(accelerator):
        accelerator.save_state(str(tmp / "accelerate"))
    weights = _trainable_tensors(accelerator, model, state.trainable)
    if main:
        save_file(weights, str(tmp / "trainable.safetensors"))
        if not _is_sharded(accelerator):
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state.to_dict(), indent=1) + "\n")
        (tmp / "train_config.json").write_text(json.dumps(train_config.to_dict(), indent=2) + "\n")
    if save_full_model:
        _save_full_model(accelerator, model, tmp)
    accelerator.wait_for_everyone()

    if main:
        if final.exists():  # the same step saved twice (e.g. a rerun): replace it
            shutil.rmtree(final)
        tmp.rename(final)  # atomic on POSIX: a checkpoint directory is either complete or absent
        if keep_last > 0:
            done = sorted((p for p in root.iterdir() if p.name.startswith(_CKPT_PREFIX)),
                          key=lambda p: int(p.name[len(_CKPT_PREFIX):]))
            for old in done[:-keep_last]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _save_full_model(accelerator, model, path: Path) -> None:
    from vargpt.checkpoint import save_checkpoint
    from vargpt.models.vargpt import VARGPT

    unwrapped = accelerator.unwrap_model(model)
    if not isinstance(unwrapped, VARGPT):
        raise TypeError(f"save_full_model needs a VARGPT model, got {type(unwrapped).__name__}")
    sd = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        if _is_sharded(accelerator):
            raise NotImplementedError("save_full_model under FSDP/DeepSpeed: export the model from the "
                                      "checkpoint's accelerate/ directory with accelerate's merge tools")
        assert sd.keys() == unwrapped.state_dict().keys()
        save_checkpoint(unwrapped, path)


def read_trainer_state(path: str | Path) -> TrainerState:
    f = Path(path) / "trainer_state.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not a training checkpoint (no trainer_state.json)")
    return TrainerState.from_dict(json.loads(f.read_text()), source=str(f))


def load_training_checkpoint(path: str | Path, *, model, optimizer, scheduler, trainable: list[str]) -> TrainerState:
    """Restore weights, optimizer and scheduler of the *unprepared* model/optimizer (single process / DDP path).

    Under FSDP / DeepSpeed call ``load_sharded_state`` after ``accelerator.prepare`` instead of loading the
    optimizer here. RNG states are restored separately (``load_rng``), last, just before the first batch.
    """
    path = Path(path)
    state = read_trainer_state(path)
    if state.trainable != trainable:
        extra, missing = sorted(set(state.trainable) - set(trainable)), sorted(set(trainable) - set(state.trainable))
        raise ValueError(f"{path}: the checkpoint trained other parameters than this model does (only in the "
                         f"checkpoint: {extra[:5]}, only in the model: {missing[:5]}); apply the same stage / "
                         "freeze policy before resuming")
    if state.frozen_checksum is not None:
        now = frozen_checksum(model)
        if abs(now - state.frozen_checksum) > 1e-6 * max(1.0, abs(state.frozen_checksum)):
            warnings.warn(f"{path}: the model's frozen weights differ from the original run's (checksum "
                          f"{now!r} != {state.frozen_checksum!r}); build the model as for that run, or the resumed "
                          "run will not continue it", stacklevel=3)
    sd = load_file(str(path / "trainable.safetensors"))
    result = model.load_state_dict(sd, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"{path}/trainable.safetensors: keys not in the model: {result.unexpected_keys[:10]}")
    opt_file = path / "optimizer.pt"
    if opt_file.is_file():
        optimizer.load_state_dict(torch.load(opt_file, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    # The optimizer restores each group's lr from the old run; recompute it from *this* run's schedule so that a
    # run extended with a larger max_steps continues on the new curve (identical when nothing changed).
    if hasattr(scheduler, "lr_lambdas") and hasattr(scheduler, "base_lrs"):
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas,
                                                                  strict=True)]
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs
    return state


def load_sharded_state(path: str | Path, accelerator) -> None:
    """FSDP / DeepSpeed: restore the prepared model and optimizer from ``path/accelerate``."""
    if _is_sharded(accelerator):
        accelerator.load_state(str(Path(path) / "accelerate"))


def load_rng(path: str | Path, rank: int, *, fallback_seed: int) -> None:
    """Restore this process's RNG states; a process that has no file (more processes than the saved run) is
    seeded with ``fallback_seed`` instead, with a warning (the run is then no longer bit-exact)."""
    f = Path(path) / "rng" / f"rank{rank}.pt"
    if f.is_file():
        restore_rng_state(torch.load(f, weights_only=True))
        return
    warnings.warn(f"{f} not found (the checkpoint was written by fewer processes); seeding process {rank} with "
                  f"{fallback_seed}", stacklevel=2)
    from accelerate.utils import set_seed

    set_seed(fallback_seed)
