"""Loading and saving checkpoints: ours and the official VARGPT-v1.1 layout.

Our checkpoint directory: ``config.json`` (``VARGPTConfig.to_dict()``, the only source used to rebuild the model)
and ``model.safetensors`` (our state dict). An official directory: a Qwen2-VL style ``config.json`` plus
``model.safetensors`` or sharded ``model-XXXXX-of-YYYYY.safetensors`` with ``model.safetensors.index.json``.

Models are built with parameters on the meta device and loaded with ``assign=True`` under ``strict=True``, so a
full-size model never allocates random weights first.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file

from vargpt.config import VARGPTConfig
from vargpt.models.official import (
    OfficialLayout,
    check_official_keys,
    is_official_checkpoint,
    official_to_ours,
    ours_to_official,
    read_official_config,
    with_official_training_quirks,
)
from vargpt.models.vargpt import VARGPT

__all__ = [
    "SHIPPED_CHECKPOINT",
    "default_checkpoint",
    "read_state_dict",
    "build_empty",
    "load_into",
    "load_official",
    "save_official",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
]


SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "shapes"  # the repository's default model


def default_checkpoint() -> Path:
    """The checkpoint used when none is given: ``$VARGPT_CHECKPOINT`` if set, else the shipped Shapes model
    (``checkpoints/shapes`` of the repository; an editable install finds it)."""
    env = os.environ.get("VARGPT_CHECKPOINT")
    return Path(env) if env else SHIPPED_CHECKPOINT


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of ``path/model.safetensors`` or of the shards listed in ``path/model.safetensors.index.json``."""
    path = Path(path)
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: expected a JSON object with a 'weight_map' field ({e})") from e
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_sd = load_file(str(path / shard))
            stray = sorted(k for k in shard_sd if weight_map.get(k) != shard)
            if stray:
                raise KeyError(f"{path / shard}: {len(stray)} tensor(s) not listed for this shard in {index}: "
                               f"{stray[:10]}")
            sd.update(shard_sd)
        missing = set(weight_map) - set(sd)
        if missing:
            raise KeyError(
                f"{index}: {len(missing)} key(s) listed but not found in their shard: {sorted(missing)[:10]}")
        return sd
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def build_empty(cfg: VARGPTConfig) -> VARGPT:
    """A model whose parameters live on the meta device (buffers are real); fill it with ``load_into``."""
    with init_empty_weights(include_buffers=False):
        return VARGPT(cfg)


def _own_memory(v: torch.Tensor) -> torch.Tensor:
    """``v``, or a copy in memory of its own (64-byte aligned, as PyTorch allocates) where ``v`` is a CPU view at an
    address that is not: a safetensors file's tensors are views into its buffer at the offsets of the file, and some
    CPU kernels round differently on such memory, so a loaded model would not compute bit for bit what the model it
    was saved from computes (measured: a DPO round run again from a loaded checkpoint drew one candidate image
    differently, and identically with the copies; ``tests/unit/test_shapes_run.py``)."""
    return v.clone() if v.device.type == "cpu" and v.data_ptr() % 64 else v


def load_into(model: VARGPT, sd: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None,
              device: str | torch.device = "cpu") -> VARGPT:
    """Strictly load ``sd`` into ``model`` (assigning tensors), cast floats to ``dtype``, move to ``device``.
    Tensors end in memory of their own, aligned as PyTorch allocates (``_own_memory``)."""
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    sd = {k: _own_memory(v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load_official(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                  official_training: bool = False) -> tuple[VARGPT, OfficialLayout]:
    """Load an official-layout directory into our model (strict; dead parameters dropped by name).

    ``official_training=True`` also switches on the official training quirks (text-loss targets, 128-slot
    padding, 1-D training positions) so that training forwards reproduce the official losses.
    """
    cfg, layout = read_official_config(path)
    if official_training:
        cfg = with_official_training_quirks(cfg)
    sd = read_state_dict(path)
    model = build_empty(cfg)
    check_official_keys(sd, ours_to_official(model.state_dict(), cfg, layout), str(path))
    ours, _dropped = official_to_ours(sd, cfg, layout)
    return load_into(model, ours, dtype=dtype, device=device), layout


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_official(model: VARGPT, layout: OfficialLayout, path: str | Path) -> None:
    """Write ``model`` in the official layout (complete key set) with the original ``config.json``."""
    path = Path(path)
    sd = ours_to_official(model.state_dict(), model.config, layout)
    _atomic_write(path / "model.safetensors", lambda p: save_file(_contiguous(sd), p))
    _atomic_write(path / "config.json", lambda p: Path(p).write_text(json.dumps(layout.hf_config, indent=1)))


def save_checkpoint(model: VARGPT, path: str | Path) -> None:
    """Write our checkpoint: ``config.json`` + ``model.safetensors`` (atomic per file)."""
    path = Path(path)
    _atomic_write(path / "model.safetensors", lambda p: save_file(_contiguous(model.state_dict()), p))
    _atomic_write(path / "config.json", lambda p: model.config.save(p))


def load_checkpoint(path: str | Path, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> VARGPT:
    """Load our checkpoint directory (strict)."""
    cfg = VARGPTConfig.load(Path(path) / "config.json")
    return load_into(build_empty(cfg), read_state_dict(path), dtype=dtype, device=device)


def load_model(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> VARGPT:
    """Load either kind of directory (official layout detected from its ``config.json``)."""
    if is_official_checkpoint(path):
        return load_official(path, dtype=dtype, device=device)[0]
    return load_checkpoint(path, dtype=dtype, device=device)
