"""Understanding parity with the official VARGPT-v1.1 code (cases understanding_single, understanding_batch_leftpad)."""

from __future__ import annotations

import pytest
import torch

from vargpt.checkpoint import load_official

from .conftest import assert_close_ref, load_case


@pytest.fixture(scope="module")
def model(fixture_dir):
    torch.manual_seed(0)
    return load_official(fixture_dir)[0]


def _forward(model, c, position_ids):
    with torch.no_grad():
        return model(input_ids=c["input.input_ids"], attention_mask=c["input.attention_mask"],
                     position_ids=position_ids, pixel_values=c["input.pixel_values"],
                     image_grid_thw=c["input.image_grid_thw"])


def test_understanding_single_mrope(model, fixture_dir):
    c = load_case(fixture_dir, "understanding_single")
    pos = model.position_ids(c["input.input_ids"], c["input.attention_mask"], c["input.image_grid_thw"], mode="mrope")
    assert torch.equal(pos, c["input.position_ids_mrope"]), "M-RoPE position ids differ from the official ones"
    with torch.no_grad():
        feats = model.image_features(c["input.pixel_values"], c["input.image_grid_thw"])
    assert_close_ref(feats, c["intermediate.image_embeds"], "ViT image_embeds")
    out = _forward(model, c, pos)
    assert_close_ref(out.hidden_BTC, c["output.last_hidden_state"], "last_hidden_state")
    assert_close_ref(out.text_logits_BTV, c["output.logits"], "logits (M-RoPE)")


def test_understanding_single_1d_positions(model, fixture_dir):
    c = load_case(fixture_dir, "understanding_single")
    pos = model.position_ids(c["input.input_ids"], c["input.attention_mask"], c["input.image_grid_thw"], mode="1d")
    out = _forward(model, c, pos)
    assert_close_ref(out.hidden_BTC, c["output.last_hidden_state_1d_positions"], "last_hidden_state (1-D)")
    assert_close_ref(out.text_logits_BTV, c["output.logits_1d_positions"], "logits (1-D positions)")


def test_understanding_batch_leftpad(model, fixture_dir):
    c = load_case(fixture_dir, "understanding_batch_leftpad")
    mask = c["input.attention_mask"].bool()
    pos = model.position_ids(c["input.input_ids"], c["input.attention_mask"], c["input.image_grid_thw"], mode="mrope")
    assert torch.equal(pos[:, mask], c["input.position_ids_mrope"][:, mask])
    out = _forward(model, c, pos)
    assert_close_ref(out.hidden_BTC[mask], c["output.last_hidden_state"][mask], "last_hidden_state (where mask)")
    assert_close_ref(out.text_logits_BTV[mask], c["output.logits"][mask], "logits (where mask)")
