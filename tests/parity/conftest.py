"""Parity-fixture discovery and helpers.

Every ``tiny_*`` directory under ``$VARGPT_PARITY_FIXTURES`` (default ``../shared/fixtures/parity`` next to the
repository) is a fixture: an official-layout checkpoint plus recorded official outputs (``cases/*.safetensors``).
Tests take the ``fixture_dir`` argument and are parametrized by the directory name, so a run shows which
fixtures it exercised. Nothing here may assume one fixture's sizes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO_ROOT.parent / "shared" / "fixtures" / "parity"


def fixtures_root() -> Path:
    return Path(os.environ.get("VARGPT_PARITY_FIXTURES", str(DEFAULT_ROOT))).resolve()


def fixture_dirs() -> list[Path]:
    root = fixtures_root()
    if not root.is_dir():
        raise FileNotFoundError(
            f"parity fixtures root {root} does not exist; set VARGPT_PARITY_FIXTURES to the folder holding tiny_* dirs"
        )
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("tiny_"))
    if not dirs:
        raise FileNotFoundError(f"no tiny_* fixture directories under {root}")
    return dirs


def load_case(fixture_dir: Path, name: str) -> dict[str, torch.Tensor]:
    """All tensors of ``cases/<name>.safetensors``."""
    return load_file(str(fixture_dir / "cases" / f"{name}.safetensors"))


def assert_close_ref(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """The parity tolerance: rtol 1e-4 and atol 1e-4 * max|reference|."""
    expected = expected.to(actual.dtype)
    atol = 1e-4 * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol, msg=lambda m: f"{what}: {m}")
