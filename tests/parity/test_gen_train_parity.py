"""Generation training forward parity (cases gen_train, gen_train_bsc) with the official-compat settings."""

from __future__ import annotations

import pytest
import torch

from vargpt.checkpoint import load_official
from vargpt.models.vae import NoFlips, RecordedFlips

from .conftest import assert_close_ref, load_case


@pytest.fixture(scope="module")
def model(fixture_dir):
    return load_official(fixture_dir, official_training=True)[0]


def _flips(c):
    n = sum(1 for k in c if k.startswith("intermediate.bsc_flipped_bits_scale"))
    if n == 0:
        return NoFlips()
    return RecordedFlips([c[f"intermediate.bsc_flipped_bits_scale{i}"] for i in range(n)])


@pytest.mark.parametrize("case", ["gen_train", "gen_train_bsc"])
def test_gen_train(model, fixture_dir, case):
    c = load_case(fixture_dir, case)
    with torch.no_grad():
        out = model(input_ids=c["input.input_ids"], attention_mask=c["input.attention_mask"],
                    labels=c["input.labels"], gen_pixel_values=c["input.pixel_gen_values"], flips=_flips(c))
    assert torch.equal(out.gen_labels_NLd, c["output.image_gen_labels"]), "bit labels differ"
    assert_close_ref(out.hidden_BTC, c["intermediate.llm_last_hidden_state"], "LLM last hidden state")
    assert_close_ref(out.text_logits_BTV, c["output.text_logits"], "text logits")
    assert_close_ref(out.gen_logits_NLV, c["output.gen_logits"], "gen logits")
    assert_close_ref(out.text_loss.reshape(1), c["derived.text_ce_mean"], "text CE")
    assert_close_ref(out.bit_loss.reshape(1), c["derived.bit_ce_mean"], "bit CE")
    assert_close_ref(out.loss.reshape(1), c["output.loss"], "loss")
