"""VAE features of generation targets, encoded once per distinct image while the VAE is frozen.

An SFT phase sees each generation target many times (stage 3c of the Shapes recipe: 1,600 steps of 16 over 6,000
records), and with the VAE frozen every encoding of one image gives the same features. ``LatentCache`` keeps them,
keyed by the image's bytes, and ``LatentCache.step_fn`` hands them to ``VARGPT.forward`` as ``gen_latents`` in place
of ``gen_pixel_values``; the step then computes what the uncached step computes (``VARGPT._encode_targets`` is
deterministic: float32, autocast off, no gradient). Features encoded in a batch of another size than the step's may
differ by float round-off where a convolution backend picks its algorithm by batch size; on this CPU the tests find
them bit-identical.

The cache is safe against a VAE that changes: it refuses a VAE with trainable parameters, and it forgets everything
when the VAE's weights change in place (an optimiser step or ``load_state_dict``) between two steps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vargpt.train.loop import default_step_fn

__all__ = ["LatentCache"]

StepFn = Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]


def _key(img_3HW: torch.Tensor) -> tuple:
    data = img_3HW.detach().contiguous().cpu().numpy().tobytes()
    return (tuple(img_3HW.shape), str(img_3HW.dtype), hashlib.blake2b(data, digest_size=16).digest())


class LatentCache:
    """Features (d, h, w) of the generation targets a model has encoded, one entry per distinct image.

    ``hits`` / ``misses`` count images looked up; ``len(cache)`` is the number of entries.
    """

    def __init__(self) -> None:
        self._features: dict[tuple, torch.Tensor] = {}
        self._vae_state: tuple | None = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._features)

    def encode(self, model: nn.Module, gen_pixel_values: torch.Tensor) -> torch.Tensor:
        """``model._encode_targets(gen_pixel_values)`` with the features of images seen before taken from the cache.

        Args:
            model: a ``VARGPT`` (or a wrapper of one with ``.module``, as DDP gives) whose VAE is frozen.
            gen_pixel_values: (N, 3, H, W) generation targets in [-1, 1].

        Returns:
            (N, d, H/ds, W/ds) float32 features, on the device of ``gen_pixel_values``.
        """
        model = getattr(model, "module", model)
        vae = model.vae
        trainable = [n for n, p in vae.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"LatentCache needs a frozen VAE; these VAE parameters are trainable: {trainable[:3]}"
                             f"{' ...' if len(trainable) > 3 else ''}")
        # each tensor's in-place version counter moves with an optimiser step or a load_state_dict copy
        state = tuple((id(t), t._version) for t in [*vae.parameters(), *vae.buffers()])
        if state != self._vae_state:
            self._features.clear()
            self._vae_state = state
        keys = [_key(img) for img in gen_pixel_values]
        missing = [i for i, k in enumerate(keys) if k not in self._features]
        if missing:
            feats = model._encode_targets(gen_pixel_values[missing])
            for i, f in zip(missing, feats, strict=True):
                self._features.setdefault(keys[i], f)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([self._features[k] for k in keys]).to(gen_pixel_values.device)

    def step_fn(self, step_fn: StepFn = default_step_fn) -> StepFn:
        """``step_fn`` with the batch's ``gen_pixel_values`` replaced by ``gen_latents`` from this cache."""

        def cached_step(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
            pixels = batch.get("gen_pixel_values")
            if pixels is not None and pixels.shape[0] > 0:
                batch = {k: v for k, v in batch.items() if k != "gen_pixel_values"}
                batch["gen_latents"] = self.encode(model, pixels)
            return step_fn(model, batch)

        return cached_step
