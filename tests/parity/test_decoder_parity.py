"""Parity of the visual decoder with the official VARGPT-v1.1 Infinity on the gen_train / gen_infer fixtures.

The official checkpoint is loaded only through the production adapter (``vargpt.checkpoint.load_official``): the
decoder is ``model.decoder``, the output projector ``model.gen_proj_out``, sizes come from ``model.config``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vargpt.checkpoint import load_official
from vargpt.models.decoder import rope2d_table
from vargpt.models.vae.schedules import scale_offsets

from .conftest import assert_close_ref, load_case

CASES = ["gen_train", "gen_train_bsc"]


@pytest.fixture(scope="module")
def setup(fixture_dir: Path):
    model = load_official(fixture_dir)[0].eval()
    cfg_json = json.loads((fixture_dir / "config.json").read_text())
    gen = cfg_json["generation"]
    schedule = tuple((h, w) for _, h, w in gen["scale_schedule_used_for_images"])
    return model, cfg_json, schedule, gen["gen_h_div_w_template"]


def split_memory(case: dict[str, torch.Tensor], start_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``ca_kv_compact`` rows -> padded (B, M, Cm) + mask, lengths = position of <|image_gen_start|>."""
    ids = case["input.input_ids"]
    lens = [int((row == start_id).nonzero()[0]) for row in ids]
    packed = case["intermediate.ca_kv_compact"]
    assert sum(lens) == packed.shape[0]
    M = max(lens)
    memory = torch.full((len(lens), M, packed.shape[1]), 1e4)  # garbage in padding rows must not matter
    mask = torch.zeros(len(lens), M, dtype=torch.bool)
    for b, (s, n) in enumerate(zip([0, *torch.tensor(lens).cumsum(0).tolist()], lens, strict=False)):
        memory[b, :n] = packed[s:s + n]
        mask[b, :n] = True
    return memory, mask


def test_decoder_config_matches_fixture(setup) -> None:
    model, cfg_json, _, _ = setup
    assert model.config.decoder.ffn_hidden == cfg_json["infinity"]["ffn_hidden"]


@torch.no_grad()
@pytest.mark.parametrize("case_name", CASES)
def test_decoder_matches_official(setup, fixture_dir: Path, case_name: str) -> None:
    model, _, schedule, template = setup
    dec = model.decoder
    case = load_case(fixture_dir, case_name)
    B = case["input.input_ids"].shape[0]
    start_BCm = dec.start_embedding.expand(B, -1)

    cond_BD = dec.condition(start_BCm)
    assert_close_ref(cond_BD, case["intermediate.cond_BD"], "cond_BD")
    assert_close_ref(dec.gss(cond_BD), case["intermediate.cond_BD_or_gss"], "gss")
    x_ref = case["intermediate.infinity_x_BLC"]
    assert_close_ref(dec.start_tokens(cond_BD), x_ref[:, :1], "start tokens")
    assert_close_ref(dec.embed_words(case["intermediate.x_BLC_wo_prefix"]), x_ref[:, 1:], "word embeddings")

    memory, mask = split_memory(case, model.config.special_tokens.image_gen_start)
    h_BLC = case["intermediate.gen_hidden_projected_out"]
    ref = case["output.gen_logits"]
    assert_close_ref(dec(h_BLC, cond_BD, memory, mask, schedule, template), ref, "gen_logits (block-causal)")

    offs = scale_offsets(schedule)
    cache = dec.new_cache(B, offs[-1])
    for k in range(len(schedule)):
        logits = dec.forward_scale(h_BLC[:, offs[k]:offs[k + 1]], cond_BD, memory, mask, schedule, template, k, cache)
        assert_close_ref(logits, ref[:, offs[k]:offs[k + 1]], f"gen_logits scale {k} (cached)")


def test_rope_table_matches_official(setup, fixture_dir: Path) -> None:
    model, _, _, template = setup
    dcfg = model.config.decoder
    ref = load_case(fixture_dir, "gen_train")["intermediate.rope2d_cos_sin"]
    table = rope2d_table(template, dcfg.head_dim, dcfg.rope_base, dcfg.rope_grid_size)
    torch.testing.assert_close(table[:, : ref.shape[1]], ref, rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("case_name", ["gen_infer_cfg3", "gen_infer_cfg1"])
def test_cached_cfg_inference_matches_official(setup, fixture_dir: Path, case_name: str) -> None:
    """Scale-by-scale CFG decoding: row 0 = cond (start embedding, prompt memory), row 1 = uncond (cfg_uncond[0],
    memory = the raw first n rows of cfg_uncond); logits / tau combined as cfg*cond + (1-cfg)*uncond."""
    model, _, _, _ = setup
    dec, proj = model.decoder, model.gen_proj_out
    info = json.loads((fixture_dir / "cases.json").read_text())[case_name]
    schedule = tuple((h, w) for _, h, w in info["scale_schedule"])
    template, cfg_scale, tau = info["settings"]["h_div_w"], info["settings"]["cfg"], info["settings"]["tau"]
    case = load_case(fixture_dir, case_name)
    memory_cond = case["intermediate.ca_kv_compact"]
    n = memory_cond.shape[0]
    memory = torch.stack([memory_cond, dec.uncond_embedding[:n]])
    mask = torch.ones(2, n, dtype=torch.bool)
    cond_BD = dec.condition(torch.stack([dec.start_embedding, dec.uncond_embedding[0]]))
    cache = dec.new_cache(2, scale_offsets(schedule)[-1])
    for k in range(len(schedule)):
        h_cond = proj(case[f"intermediate.llm_cond_hidden_scale{k}"])
        unc_key = f"intermediate.llm_uncond_hidden_scale{k}"
        # without CFG the official code skips the uncond pass; any input gives the same combined logits
        h_unc = proj(case[unc_key]) if unc_key in case else h_cond
        logits = dec.forward_scale(torch.cat([h_cond, h_unc]), cond_BD, memory, mask, schedule, template, k, cache)
        logits = logits / tau
        combined = cfg_scale * logits[:1] + (1 - cfg_scale) * logits[1:]
        assert_close_ref(dec.bit_logits(combined).flatten(1, 2), case[f"output.bit_logits_scale{k}"],
                         f"{case_name} bit logits scale {k}")
