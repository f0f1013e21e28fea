"""Configs: presets, JSON round trips, validation errors, scale schedules."""

from __future__ import annotations

import json

import pytest

from vargpt.config import PRESETS, ConfigError, VARGPTConfig, get_preset
from vargpt.models.vae.schedules import (
    ASPECT_TEMPLATES,
    get_schedule,
    nearest_template,
    pixel_size,
    scale_offsets,
    schedule_num_tokens,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_json_round_trip(name, tmp_path):
    cfg = get_preset(name)
    cfg.save(tmp_path / "config.json")
    assert VARGPTConfig.load(tmp_path / "config.json") == cfg
    assert VARGPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_official_preset_sizes():
    cfg = get_preset("vargpt-v1.1")
    assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.text.num_heads, cfg.text.num_kv_heads) == (3584, 28, 28, 4)
    assert cfg.text.intermediate_size == 18944 and cfg.text.vocab_size == 152064
    assert (cfg.vision.depth, cfg.vision.embed_dim, cfg.vision.num_heads) == (32, 1280, 16)
    assert (cfg.decoder.width, cfg.decoder.depth, cfg.decoder.num_heads, cfg.decoder.ffn_hidden) == (2048, 32, 16, 8192)
    assert cfg.decoder.pool_num_heads == 16
    assert (cfg.vae.codebook_dim, cfg.vae.base_channels, cfg.vae.downsample) == (32, 128, 16)
    st = cfg.special_tokens
    assert (st.image_gen_start, st.image_gen_end, st.image_gen_pad, st.image_pad) == (151657, 151658, 151659, 151655)


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="gen_schedule|schedule name"):
        VARGPTConfig(gen_schedule="2M")
    with pytest.raises(ConfigError, match="text_loss_targets"):
        VARGPTConfig(text_loss_targets="everything")
    with pytest.raises(ConfigError, match="text_loss_reduction"):
        VARGPTConfig(text_loss_reduction="batch")
    d = get_preset("tiny").to_dict()
    d["decoder"]["widht"] = 3
    with pytest.raises(ConfigError, match="widht"):
        VARGPTConfig.from_dict(d)
    (tmp_path / "config.json").write_text('{"text": ')
    with pytest.raises(ConfigError, match=r"config.json:1"):
        VARGPTConfig.load(tmp_path / "config.json")


def test_fifteen_templates_and_named_schedules():
    assert len(ASPECT_TEMPLATES) == 15
    assert sorted(ASPECT_TEMPLATES)[:7] == [0.333, 0.4, 0.5, 0.571, 0.666, 0.75, 0.8]
    s = get_schedule(1.0, "0.25M")
    assert [h for h, _ in s] == [1, 2, 4, 6, 8, 12, 16, 20, 24, 32]
    assert schedule_num_tokens(s) == 2521 and pixel_size(s) == (512, 512)
    assert scale_offsets(s)[:10] == [0, 1, 5, 21, 57, 121, 265, 521, 921, 1497]
    assert schedule_num_tokens(get_schedule(1.0, "0.06M")) == 521
    assert schedule_num_tokens(get_schedule(1.0, "0.60M")) == 6425
    assert schedule_num_tokens(get_schedule(1.0, "1M")) == 10521
    assert pixel_size(get_schedule(1.25, "0.25M")) == (560, 448)
    assert pixel_size(get_schedule(2.0, "0.25M")) == (736, 368)
    assert pixel_size(get_schedule(0.5, "0.25M")) == (368, 736)
    assert get_schedule(1.0, "first-3") == ((1, 1), (2, 2), (4, 4))
    assert nearest_template(1.9) == 2.0 and nearest_template(0.52) == 0.5
    # every schedule is a prefix of its template's 1M schedule
    for r in ASPECT_TEMPLATES:
        full = get_schedule(r, "1M")
        for pn in ("0.06M", "0.25M", "0.60M"):
            s = get_schedule(r, pn)
            assert full[: len(s)] == s


def test_type_errors_name_the_field():
    d = get_preset("tiny").to_dict()
    for path, value, needle in ((("decoder", "width"), "128", "width"), (("gen_pad_multiple",), "128", "gen_pad"),
                                (("special_tokens", "im_start"), 1.5, "im_start"), (("decoder",), None, "decoder")):
        bad = json.loads(json.dumps(d))
        tgt = bad
        for p in path[:-1]:
            tgt = tgt[p]
        tgt[path[-1]] = value
        with pytest.raises(ConfigError, match=needle):
            VARGPTConfig.from_dict(bad)
    bad = json.loads(json.dumps(d))
    del bad["special_tokens"]["im_start"]
    with pytest.raises(ConfigError, match="im_start"):
        VARGPTConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="format_version"):
        VARGPTConfig.from_dict({**d, "format_version": 99})
    with pytest.raises(ConfigError, match="gen_aspect_ratio"):
        VARGPTConfig.from_dict({**d, "gen_aspect_ratio": -1.0})
