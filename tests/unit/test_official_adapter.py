"""The official-layout adapter: all 1706 official keys of the full-size model, round trips, dead parameters."""

from __future__ import annotations

import json

import pytest
import torch

from vargpt.checkpoint import load_official, read_state_dict, save_official
from vargpt.config import get_preset
from vargpt.models.official import OfficialLayout, official_to_ours, ours_to_official, read_official_config
from vargpt.models.vargpt import VARGPT

from ..parity.conftest import fixture_dirs, fixtures_root

FULL_KEYS = fixtures_root() / "official_keys_full.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}


@pytest.fixture(scope="module")
def full_entries():
    d = json.loads(FULL_KEYS.read_text())
    assert d["num_entries"] == len(d["entries"]) == 1706
    return {e["name"]: e for e in d["entries"]}


@pytest.fixture(scope="module")
def full_model_state():
    cfg = get_preset("vargpt-v1.1")
    with torch.device("meta"):
        model = VARGPT(cfg)
    return cfg, model.state_dict()


FULL_LAYOUT = OfficialLayout(block_chunks=8, sos_rows=151658)


def test_full_size_export_covers_every_official_key(full_entries, full_model_state):
    cfg, ours = full_model_state
    official = ours_to_official(ours, cfg, FULL_LAYOUT)
    assert set(official) == set(full_entries), (
        f"missing: {sorted(set(full_entries) - set(official))[:10]}, "
        f"extra: {sorted(set(official) - set(full_entries))[:10]}")
    for name, e in full_entries.items():
        assert list(official[name].shape) == e["shape"], name
    assert sum(e["numel"] for e in full_entries.values() if e["kind"] == "parameter") == 10_948_395_235


def test_full_size_import_maps_every_official_key(full_entries, full_model_state):
    cfg, ours = full_model_state
    fake = {n: torch.empty(e["shape"], dtype=_DTYPES[e["dtype_in_bf16_checkpoint"]], device="meta")
            for n, e in full_entries.items()}
    mapped, dropped = official_to_ours(fake, cfg, FULL_LAYOUT)
    assert set(mapped) == set(ours)
    for k, t in mapped.items():
        assert t.shape == ours[k].shape, k
    # every official key is either mapped or named as dropped (wholly or partly: sos rows, the pool's K half)
    dropped_names = {d.split(" ")[0] for d in dropped}
    assert dropped_names == _expected_dead(full_entries)
    assert len(dropped_names) == 77  # 4 ln_q + 4 text_proj_for_ca + mat_q + 65 zero_k_bias + mask + sos + mat_kv


def _expected_dead(names) -> set[str]:
    pats = ("image_gen_projector.ln_q.", "image_gen_projector_out.ln_q.", "text_proj_for_ca.",
            "text_proj_for_sos.ca.mat_q", "zero_k_bias", "quantizer.lfq.mask")
    return {n for n in names if any(p in n for p in pats)} | {
        "sos_embedding.weight", "vargpt_gen.text_proj_for_sos.ca.mat_kv.weight"}


def test_released_config_uses_official_sizes(tmp_path):
    # a released checkpoint's config.json is a flat Qwen2-VL config without fixture fields
    fx = fixture_dirs()[0]
    raw = json.loads((fx / "config.json").read_text())["qwen2vl_config"]
    raw = {k: v for k, v in raw.items() if k != "fixture_overrides"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg, layout = read_official_config(tmp_path)
    assert (cfg.decoder.width, cfg.decoder.depth, cfg.decoder.num_heads, cfg.decoder.ffn_hidden) == (2048, 32, 16, 8192)
    assert (cfg.vae.codebook_dim, cfg.vae.base_channels, cfg.vae.num_res_blocks) == (32, 128, 2)
    assert layout.block_chunks == 8 and cfg.gen_schedule == "0.25M"


def test_round_trip_is_bit_identical(fixture_dir, tmp_path):
    model, layout = load_official(fixture_dir)
    save_official(model, layout, tmp_path)
    original = read_state_dict(fixture_dir)
    exported = read_state_dict(tmp_path)
    assert set(exported) == set(original), "official key set not complete after export"
    cfg, _ = read_official_config(fixture_dir)
    live, dropped = official_to_ours(original, cfg, layout)
    for k in original:
        assert exported[k].shape == original[k].shape and exported[k].dtype == original[k].dtype, k
    # every live parameter is bit-identical after import -> export -> import
    live2, _ = official_to_ours(exported, cfg, layout)
    assert set(live2) == set(live)
    for k in live:
        assert torch.equal(live[k], live2[k]), k
    # and the live official tensors themselves come back unchanged
    dead = {d.split(" ")[0] for d in dropped}
    for k in set(original) - dead:
        assert torch.equal(exported[k], original[k]), k
    assert torch.equal(exported["vae_local.quantizer.lfq.mask"], original["vae_local.quantizer.lfq.mask"])


def test_dead_parameters_are_dead(fixture_dir):
    """Every dropped official tensor is dead: replace each by random values, load, and still reproduce the
    official outputs, which were recorded with the original (non-trivial, randomly drawn) values."""
    from vargpt.checkpoint import build_empty, load_into
    from vargpt.models.official import with_official_training_quirks

    from ..parity.conftest import assert_close_ref, load_case

    cfg, layout = read_official_config(fixture_dir)
    cfg = with_official_training_quirks(cfg)
    sd = read_state_dict(fixture_dir)
    _, dropped = official_to_ours(sd, cfg, layout)
    dead = {d.split(" ")[0] for d in dropped}
    assert dead == _expected_dead(sd)
    g = torch.Generator().manual_seed(7)
    start, C = cfg.special_tokens.image_gen_start, cfg.decoder.width
    garbage = dict(sd)
    for k in dead:
        t = sd[k]
        if not t.is_floating_point() or k.endswith("zero_k_bias"):
            continue  # constant buffers: the mask is recomputed from d, zero_k_bias is zero by definition
        # the recorded values were non-trivial, so matching without them is informative
        assert t.float().std() > 0, k
        noise = torch.randn(t.shape, generator=g) * 3
        if k == "sos_embedding.weight":
            noise[start] = t[start]  # the one live row
        if k.endswith("text_proj_for_sos.ca.mat_kv.weight"):
            noise[C:] = t[C:]  # the live V half
        garbage[k] = noise.to(t.dtype)
    ours, _ = official_to_ours(garbage, cfg, layout)
    model = load_into(build_empty(cfg), ours)
    c = load_case(fixture_dir, "gen_train")
    with torch.no_grad():
        out = model(input_ids=c["input.input_ids"], attention_mask=c["input.attention_mask"],
                    labels=c["input.labels"], gen_pixel_values=c["input.pixel_gen_values"])
    assert_close_ref(out.text_logits_BTV, c["output.text_logits"], "text logits")
    assert_close_ref(out.gen_logits_NLV, c["output.gen_logits"], "gen logits")


def test_sharded_official_checkpoint_loads_identically(fixture_dir, tmp_path):
    from safetensors.torch import save_file

    sd = read_state_dict(fixture_dir)
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(tmp_path / name))
        weight_map.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((fixture_dir / "config.json").read_text())
    sharded, _ = load_official(tmp_path)
    single, _ = load_official(fixture_dir)
    a, b = sharded.state_dict(), single.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a shard that lost a tensor is a clear error naming the index
    save_file({k: sd[k].contiguous() for k in shards["model-00002-of-00002.safetensors"][1:]},
              str(tmp_path / "model-00002-of-00002.safetensors"))
    with pytest.raises(KeyError, match="index.json"):
        load_official(tmp_path)


def test_bf16_checkpoint_loads_into_requested_dtype(fixture_dir, tmp_path):
    from safetensors.torch import save_file

    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in read_state_dict(fixture_dir).items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((fixture_dir / "config.json").read_text())
    m32, _ = load_official(tmp_path, dtype=torch.float32)
    m16, _ = load_official(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in m32.parameters()} == {torch.float32}
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    w = "backbone.lm_head.weight"
    assert torch.equal(m32.state_dict()[w], sd["lm_head.weight"].float())


def test_corrupt_or_incomplete_official_checkpoints_are_named(fixture_dir, tmp_path):
    from safetensors.torch import save_file

    sd = read_state_dict(fixture_dir)
    (tmp_path / "config.json").write_text((fixture_dir / "config.json").read_text())
    k = next(k for k in sd if k.endswith("sa.zero_k_bias"))
    save_file({**sd, k: sd[k] + 1}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="zero_k_bias"):
        load_official(tmp_path)
    save_file({**sd, "vae_local.quantizer.lfq.mask": sd["vae_local.quantizer.lfq.mask"][1:]},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="powers of two"):
        load_official(tmp_path)
    dead = next(k for k in sd if "text_proj_for_ca" in k)
    save_file({k: v for k, v in sd.items() if k != dead}, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="text_proj_for_ca"):
        load_official(tmp_path)
