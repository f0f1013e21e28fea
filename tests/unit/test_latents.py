"""Cached VAE features of generation targets (``vargpt.train.latents``): the model fed ``gen_latents`` computes what it
computes from ``gen_pixel_values``, the cache encodes each image once, refuses a trainable VAE and forgets features
when the VAE's weights change, and a training run with it reproduces the uncached run bit for bit."""

from __future__ import annotations

import pytest
import torch

from tests.dist.synthetic import gen_collate, gen_dataset
from vargpt.train import TrainConfig, apply_stage, train
from vargpt.train.latents import LatentCache

from .helpers import random_images, tiny_model
from .test_model import _gen_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gen_latents_give_the_same_forward_as_pixels():
    model = tiny_model()
    b = _gen_batch(model)
    pixels = b.pop("gen_pixel_values")
    with torch.no_grad():
        latents = model._encode_targets(pixels)
        assert latents.shape == (2, model.config.vae.codebook_dim, 4, 4)
        for mode in ("eval", "train"):  # train: the bit flips and the condition dropout draw from the global RNG
            getattr(model, mode)()
            torch.manual_seed(0)
            a = model(**b, gen_pixel_values=pixels)
            torch.manual_seed(0)
            c = model(**b, gen_latents=latents)
            assert torch.equal(a.gen_logits_NLV, c.gen_logits_NLV) and torch.equal(a.gen_labels_NLd, c.gen_labels_NLd)
            assert torch.equal(a.loss, c.loss)


def test_gen_latents_errors_are_clear():
    model = tiny_model()
    b = _gen_batch(model)
    with pytest.raises(ValueError, match="not both"):
        model(**b, gen_latents=torch.zeros(2, model.config.vae.codebook_dim, 4, 4))
    pixels = b.pop("gen_pixel_values")
    with pytest.raises(ValueError, match=r"gen_latents must be \(N, 16, h, w\) VAE features, got \(2, 3, 64, 64\)"):
        model(**b, gen_latents=pixels)


def test_cache_encodes_each_image_once_and_returns_the_uncached_features():
    model = tiny_model().eval()
    model.vae.requires_grad_(False)
    imgs = random_images(3, seed=1)
    cache = LatentCache()
    first = cache.encode(model, imgs)
    assert (cache.misses, cache.hits, len(cache)) == (3, 0, 3)
    batch = torch.stack([imgs[2], imgs[0], imgs[2]])  # seen images, one twice
    again = cache.encode(model, batch)
    assert (cache.misses, cache.hits, len(cache)) == (3, 3, 3)
    with torch.no_grad():
        assert torch.equal(first, model._encode_targets(imgs))
        assert torch.equal(again, model._encode_targets(batch))
    cache.encode(model, random_images(1, seed=2))
    assert (cache.misses, len(cache)) == (4, 4)


def test_cache_refuses_a_trainable_vae_and_forgets_when_the_vae_changes():
    model = tiny_model().eval()
    imgs = random_images(2, seed=1)
    cache = LatentCache()
    model.vae.requires_grad_(False)
    model.vae.encoder.conv_in.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"frozen VAE; these VAE parameters are trainable: \['encoder.conv_in.weight"):
        cache.encode(model, imgs)
    model.vae.requires_grad_(False)
    before = cache.encode(model, imgs)
    with torch.no_grad():
        model.vae.encoder.conv_in.weight.mul_(1.5)  # an in-place change, as an optimiser step or load_state_dict
    after = cache.encode(model, imgs)
    assert cache.misses == 4 and not torch.equal(before, after)
    with torch.no_grad():
        assert torch.equal(after, model._encode_targets(imgs))


def test_training_with_the_cache_reproduces_the_uncached_run_bit_for_bit(tmp_path):
    """Stage 3 in train mode (bit flips, condition dropout, drop-path: global RNG), 6 steps over 4 records, so that
    targets recur."""

    def run(name, step_fn):
        model = tiny_model()
        apply_stage(model, "stage3")
        cfg = TrainConfig(lr=1e-3, max_steps=6, batch_size=2, seed=3, out_dir=str(tmp_path / name))
        result = train(model, gen_dataset(model.config, 4), gen_collate(model.config), cfg, step_fn=step_fn)
        return result.losses, model.state_dict()

    cache = LatentCache()
    plain_losses, plain = run("plain", None)
    cached_losses, cached = run("cached", cache.step_fn())
    assert cache.hits > 0 and cache.misses == 4
    assert cached_losses == plain_losses
    assert all(torch.equal(plain[k], cached[k]) for k in plain)
