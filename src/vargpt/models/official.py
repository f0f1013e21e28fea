"""Adapter between the official VARGPT-v1.1 checkpoint layout (SPEC.md §3) and ours.

Official layout (``VARGPTQwen2VLForConditionalGeneration`` state dict) -> ours:

===========================================  ==========================================================
official                                     ours
===========================================  ==========================================================
``visual.*``                                 ``backbone.model.visual.*``
``model.*``                                  ``backbone.model.language_model.*``
``lm_head.weight``                           ``backbone.lm_head.weight``
``image_gen_projector.mlp.{0,2}.*``          ``gen_proj_in.{fc1,fc2}.*``
``image_gen_projector_out.mlp.{0,2}.*``      ``gen_proj_out.{fc1,fc2}.*``
``sos_embedding.weight[<|image_gen_start|>]`` ``decoder.start_embedding``
``vargpt_gen.cfg_uncond``                    ``decoder.uncond_embedding``
``vargpt_gen.text_norm.weight``              ``decoder.cond_norm.weight``
``vargpt_gen.text_proj_for_sos.ca.mat_kv``   V half -> ``decoder.cond_pool_v.weight``
``vargpt_gen.text_proj_for_sos.ca.v_bias``   ``decoder.cond_pool_v.bias``
``vargpt_gen.text_proj_for_sos.ca.proj.*``   ``decoder.cond_pool_proj.*``
``vargpt_gen.shared_ada_lin.1.*``            ``decoder.shared_ada_lin.*``
``vargpt_gen.head_nm.ada_lin.1.*``           ``decoder.head_ada_lin.*``
``vargpt_gen.block_chunks.{c}.module.{j}.*`` ``decoder.blocks.{c * per_chunk + j}.*``
``vargpt_gen.{pos_start,lvl_embed,word_embed,head}.*``  ``decoder.*`` (same names)
``vae_local.<path>.{conv,norm}.{weight,bias}``  ``vae.<path>.{weight,bias}`` (wrapper segment removed)
===========================================  ==========================================================

Dropped because they are dead (each proven by ``tests/unit/test_official_adapter.py``; SPEC.md §6 D9, fixture
README §6.9): ``image_gen_projector(_out).ln_q.*`` (never applied), ``vargpt_gen.text_proj_for_ca.*`` (computed and
discarded), ``text_proj_for_sos.ca.mat_q`` and the K half of ``text_proj_for_sos.ca.mat_kv`` (attention over a
single key has weight 1 whatever the query and key), every row of ``sos_embedding`` except the start token's, and
the constant buffers ``*.zero_k_bias`` (zeros) and ``vae_local.quantizer.lfq.mask`` (powers of two). On export
these are written back with neutral values (zeros; ones for LayerNorm weights; the original mask), so the official
key set is complete.

Sizes: ``config.json`` of a released checkpoint is a flat Qwen2-VL config (``model_type`` ``vargpt_qwen2_vl``);
the decoder and VAE are then the official Infinity-2B and BSQ-VAE d32. The parity fixtures nest that config under
``qwen2vl_config`` and carry their decoder / VAE sizes in ``fixture_overrides.vargpt_gen_args``; those win.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vargpt.config import (
    ConfigError,
    DecoderConfig,
    SpecialTokens,
    TextConfig,
    VAEConfig,
    VARGPTConfig,
    VisionConfig,
)

__all__ = [
    "OfficialLayout",
    "is_official_checkpoint",
    "read_official_config",
    "official_to_ours",
    "ours_to_official",
    "with_official_training_quirks",
    "check_official_keys",
    "OFFICIAL_DECODER",
    "OFFICIAL_VAE",
]

#: Infinity-2B as configured by the official code (SPEC.md §2.7); 8 block chunks of 4.
OFFICIAL_DECODER = dict(width=2048, depth=32, num_heads=16, mlp_ratio=4.0, memory_dim=2048, block_chunks=8)
#: BSQ-VAE d32 (SPEC.md §2.8).
OFFICIAL_VAE = dict(codebook_dim=32, base_channels=128, encoder_ch_mult=[1, 2, 4, 4, 4],
                    decoder_ch_mult=[1, 2, 4, 4, 4], num_res_blocks=2)

_DEAD_PATTERNS = (
    re.compile(r"^image_gen_projector(_out)?\.ln_q\.(weight|bias)$"),
    re.compile(r"^vargpt_gen\.text_proj_for_ca\..*$"),
    re.compile(r"^vargpt_gen\.text_proj_for_sos\.ca\.mat_q$"),
    re.compile(r"^vargpt_gen\..*zero_k_bias$"),
    re.compile(r"^vae_local\.quantizer\.lfq\.mask$"),
)


@dataclass(kw_only=True)
class OfficialLayout:
    """What the official layout needs beyond our config to be written back exactly."""

    block_chunks: int
    sos_rows: int  # rows of the official sos_embedding table
    hf_config: dict[str, Any] = field(default_factory=dict)  # the original config.json, written back on export


def is_official_checkpoint(path: str | Path) -> bool:
    """True when ``path/config.json`` is an official (Qwen2-VL style) config rather than ours."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return False
    try:
        d = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path}:{e.lineno}: invalid JSON ({e.msg})") from e
    return "qwen2vl_config" in d or d.get("model_type") == "vargpt_qwen2_vl"


def _get(d: dict, key: str, where: str, default: Any = ...) -> Any:
    if key in d:
        return d[key]
    if default is ...:
        raise ConfigError(f"{where}: missing field '{key}'")
    return default


def read_official_config(path: str | Path) -> tuple[VARGPTConfig, OfficialLayout]:
    """Our config and the layout facts for the official checkpoint directory ``path``."""
    cfg_path = Path(path) / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{cfg_path}: not found (an official checkpoint directory needs config.json)") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path}:{e.lineno}: invalid JSON ({e.msg})") from e
    hf = raw["qwen2vl_config"] if "qwen2vl_config" in raw else raw
    where = str(cfg_path)
    vc = _get(hf, "vision_config", where)
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    text = TextConfig(
        vocab_size=_get(hf, "vocab_size", where), hidden_size=_get(hf, "hidden_size", where),
        intermediate_size=_get(hf, "intermediate_size", where), num_layers=_get(hf, "num_hidden_layers", where),
        num_heads=_get(hf, "num_attention_heads", where), num_kv_heads=_get(hf, "num_key_value_heads", where),
        rms_norm_eps=_get(hf, "rms_norm_eps", where, 1e-6), rope_theta=_get(hf, "rope_theta", where,
                                                                            rope.get("rope_theta", 1e6)),
        mrope_section=list(_get(rope, "mrope_section", where + " rope_scaling")),
        max_position_embeddings=_get(hf, "max_position_embeddings", where, 32768),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    vision = VisionConfig(
        depth=_get(vc, "depth", where + " vision_config"), embed_dim=_get(vc, "embed_dim", where + " vision_config"),
        num_heads=_get(vc, "num_heads", where + " vision_config"), mlp_ratio=vc.get("mlp_ratio", 4),
        patch_size=vc.get("patch_size", vc.get("spatial_patch_size", 14)),
        temporal_patch_size=vc.get("temporal_patch_size", 2), spatial_merge_size=vc.get("spatial_merge_size", 2),
        in_channels=vc.get("in_channels", vc.get("in_chans", 3)), hidden_act=vc.get("hidden_act", "quick_gelu"),
    )
    base = _get(hf, "bos_token_id", where, 151643)
    specials = SpecialTokens.from_base(base)
    gen_ids = hf.get("special_tokens") or {}
    explicit = dict(
        im_end=hf.get("eos_token_id"), vision_start=hf.get("vision_start_token_id"),
        vision_end=hf.get("vision_end_token_id"), vision_pad=hf.get("vision_token_id"),
        image_pad=hf.get("image_token_id"), video_pad=hf.get("video_token_id"),
        image_gen_start=gen_ids.get("image_gen_start_token_id"), image_gen_end=gen_ids.get("image_gen_end_token_id"),
        image_gen_pad=gen_ids.get("image_gen_pad_token_id"),
    )
    specials = replace(specials, **{k: v for k, v in explicit.items() if v is not None})

    fx = (hf.get("fixture_overrides") or {}).get("vargpt_gen_args")
    if fx is not None:
        mk = fx["tiny_model_kwargs"]
        vk = fx["tiny_vae_kwargs"]
        width = int(mk["embed_dim"])
        decoder = DecoderConfig(width=width, depth=int(mk["depth"]), num_heads=int(mk["num_heads"]),
                                mlp_ratio=float(mk["mlp_ratio"]), memory_dim=int(fx["text_channels"]),
                                drop_path_rate=float(mk.get("drop_path_rate", 0.1)))
        block_chunks = int(mk["block_chunks"])
        vae = VAEConfig(codebook_dim=int(fx["vae_type"]), base_channels=int(vk["base_ch"]),
                        encoder_ch_mult=list(vk["encoder_ch_mult"]), decoder_ch_mult=list(vk["decoder_ch_mult"]),
                        num_res_blocks=int(vk["num_res_blocks"]))
        pn = str(fx.get("pn", "0.25M"))
        aspect = float(fx.get("h_div_w_template", 1.0))
    else:
        od = dict(OFFICIAL_DECODER)
        block_chunks = od.pop("block_chunks")
        decoder = DecoderConfig(**od)
        vae = VAEConfig(**copy.deepcopy(OFFICIAL_VAE))
        pn = "0.25M"
        aspect = 1.0
    m = re.fullmatch(r"tiny(\d+)", pn)
    gen_schedule = f"first-{m.group(1)}" if m else pn
    cfg = VARGPTConfig(vision=vision, text=text, decoder=decoder, vae=vae, special_tokens=specials,
                       gen_schedule=gen_schedule, gen_aspect_ratio=aspect)
    layout = OfficialLayout(block_chunks=block_chunks, sos_rows=specials.image_gen_start + 1, hf_config=raw)
    return cfg, layout


def with_official_training_quirks(cfg: VARGPTConfig) -> VARGPTConfig:
    """``cfg`` with every official training behaviour switched on (SPEC.md §6 D1, D2, D3, D7)."""
    return replace(cfg, text_loss_targets="input_ids", gen_pad_multiple=128, train_positions="1d",
                   bit_loss_weighting="mean")


def _vae_key(official_suffix: str) -> str:
    return re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", official_suffix)


def _is_dead(key: str) -> bool:
    return any(p.match(key) for p in _DEAD_PATTERNS)


def official_to_ours(
    sd: dict[str, torch.Tensor], cfg: VARGPTConfig, layout: OfficialLayout
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map an official state dict to ours. Returns (our state dict, official keys dropped as dead).

    Raises KeyError naming every official key that is neither mapped nor known dead.
    """
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    C = cfg.decoder.width
    per_chunk = cfg.decoder.depth // layout.block_chunks
    start = cfg.special_tokens.image_gen_start
    for k, t in sd.items():
        if t.device.type == "meta":  # shape-only (key-map checks): no values to verify
            pass
        elif k.endswith("zero_k_bias") and bool(t.any()):
            raise ValueError(f"official key {k}: expected a zero buffer (the K bias is fixed at 0), got non-zeros")
        elif k == "vae_local.quantizer.lfq.mask":
            d = cfg.vae.codebook_dim
            if not torch.equal(t.to(torch.int64).cpu(), 2 ** torch.arange(d - 1, -1, -1, dtype=torch.int64)):
                raise ValueError(f"official key {k}: expected the {d} powers of two 2^{d - 1}..2^0 "
                                 f"(codebook_dim={d}), got shape {tuple(t.shape)}")
        if _is_dead(k):
            dropped.append(k)
        elif k.startswith("visual."):
            out["backbone.model." + k] = t
        elif k.startswith("model."):
            out["backbone.model.language_model." + k[len("model."):]] = t
        elif k == "lm_head.weight":
            out["backbone.lm_head.weight"] = t
        elif m := re.fullmatch(r"image_gen_projector(_out)?\.mlp\.([02])\.(weight|bias)", k):
            out[f"gen_proj_{'out' if m.group(1) else 'in'}.fc{1 if m.group(2) == '0' else 2}.{m.group(3)}"] = t
        elif k == "sos_embedding.weight":
            if t.shape[0] <= start:
                raise ValueError(f"sos_embedding has {t.shape[0]} rows; row <|image_gen_start|>={start} is missing")
            out["decoder.start_embedding"] = t[start].clone()
            dropped.append(k + f" (all rows but {start})")
        elif k.startswith("vae_local."):
            out["vae." + _vae_key(k[len("vae_local."):])] = t
        elif k.startswith("vargpt_gen."):
            r = k[len("vargpt_gen."):]
            if m := re.fullmatch(r"block_chunks\.(\d+)\.module\.(\d+)\.(.+)", r):
                out[f"decoder.blocks.{int(m.group(1)) * per_chunk + int(m.group(2))}.{m.group(3)}"] = t
            elif r == "cfg_uncond":
                out["decoder.uncond_embedding"] = t
            elif r == "text_norm.weight":
                out["decoder.cond_norm.weight"] = t
            elif r == "text_proj_for_sos.ca.mat_kv.weight":
                out["decoder.cond_pool_v.weight"] = t[C:].clone()
                dropped.append(k + " (K half)")
            elif r == "text_proj_for_sos.ca.v_bias":
                out["decoder.cond_pool_v.bias"] = t
            elif m := re.fullmatch(r"text_proj_for_sos\.ca\.proj\.(weight|bias)", r):
                out[f"decoder.cond_pool_proj.{m.group(1)}"] = t
            elif m := re.fullmatch(r"shared_ada_lin\.1\.(weight|bias)", r):
                out[f"decoder.shared_ada_lin.{m.group(1)}"] = t
            elif m := re.fullmatch(r"head_nm\.ada_lin\.1\.(weight|bias)", r):
                out[f"decoder.head_ada_lin.{m.group(1)}"] = t
            elif re.fullmatch(r"(pos_start|lvl_embed\.weight|word_embed\.(weight|bias)|head\.(weight|bias))", r):
                out["decoder." + r] = t
            else:
                unknown.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise KeyError(f"official checkpoint has {len(unknown)} unrecognised key(s): {unknown[:20]}")
    return out, dropped


def check_official_keys(sd_keys, expected_keys, source: str) -> None:
    """Raise naming the official keys a checkpoint lacks or has in excess of the expected official key set."""
    missing, extra = sorted(set(expected_keys) - set(sd_keys)), sorted(set(sd_keys) - set(expected_keys))
    if missing or extra:
        raise KeyError(f"{source}: official key set mismatch; missing {len(missing)}: {missing[:10]}; "
                       f"unexpected {len(extra)}: {extra[:10]}")


def ours_to_official(
    sd: dict[str, torch.Tensor], cfg: VARGPTConfig, layout: OfficialLayout
) -> dict[str, torch.Tensor]:
    """Map our state dict to the complete official key set (dead entries filled with neutral values)."""
    out: dict[str, torch.Tensor] = {}
    C = cfg.decoder.width
    per_chunk = cfg.decoder.depth // layout.block_chunks
    start = cfg.special_tokens.image_gen_start
    unknown: list[str] = []
    for k, t in sd.items():
        if k.startswith("backbone.model.visual."):
            out[k[len("backbone.model."):]] = t
        elif k.startswith("backbone.model.language_model."):
            out["model." + k[len("backbone.model.language_model."):]] = t
        elif k == "backbone.lm_head.weight":
            out["lm_head.weight"] = t
        elif m := re.fullmatch(r"gen_proj_(in|out)\.fc([12])\.(weight|bias)", k):
            out[f"image_gen_projector{'_out' if m.group(1) == 'out' else ''}.mlp."
                f"{0 if m.group(2) == '1' else 2}.{m.group(3)}"] = t
        elif k.startswith("vae."):
            r = k[len("vae."):]
            wrapper = "norm" if re.search(r"(^|\.)norm[^.]*\.(weight|bias)$", r) else "conv"
            out["vae_local." + re.sub(r"\.(weight|bias)$", rf".{wrapper}.\1", r)] = t
        elif k.startswith("decoder."):
            r = k[len("decoder."):]
            if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", r):
                i = int(m.group(1))
                out[f"vargpt_gen.block_chunks.{i // per_chunk}.module.{i % per_chunk}.{m.group(2)}"] = t
            elif r == "start_embedding":
                table = torch.zeros(layout.sos_rows, t.shape[0], dtype=t.dtype, device=t.device)
                table[start] = t
                out["sos_embedding.weight"] = table
            elif r == "uncond_embedding":
                out["vargpt_gen.cfg_uncond"] = t
            elif r == "cond_norm.weight":
                out["vargpt_gen.text_norm.weight"] = t
            elif r == "cond_pool_v.weight":
                out["vargpt_gen.text_proj_for_sos.ca.mat_kv.weight"] = torch.cat([torch.zeros_like(t), t], 0)
            elif r == "cond_pool_v.bias":
                out["vargpt_gen.text_proj_for_sos.ca.v_bias"] = t
            elif m := re.fullmatch(r"cond_pool_proj\.(weight|bias)", r):
                out[f"vargpt_gen.text_proj_for_sos.ca.proj.{m.group(1)}"] = t
            elif m := re.fullmatch(r"shared_ada_lin\.(weight|bias)", r):
                out[f"vargpt_gen.shared_ada_lin.1.{m.group(1)}"] = t
            elif m := re.fullmatch(r"head_ada_lin\.(weight|bias)", r):
                out[f"vargpt_gen.head_nm.ada_lin.1.{m.group(1)}"] = t
            else:
                out["vargpt_gen." + r] = t
        else:
            unknown.append(k)
    if unknown:
        raise KeyError(f"our state dict has {len(unknown)} key(s) with no official home: {unknown[:20]}")
    # dead / constant entries, neutral values
    ref = out["vargpt_gen.cfg_uncond"]
    dt, dev = ref.dtype, ref.device
    Cm, Ht, Cd = cfg.decoder.memory_dim, cfg.text.hidden_size, cfg.decoder.width
    for name, dim in (("image_gen_projector", Cd), ("image_gen_projector_out", Ht)):
        out[f"{name}.ln_q.weight"] = torch.ones(dim, dtype=dt, device=dev)
        out[f"{name}.ln_q.bias"] = torch.zeros(dim, dtype=dt, device=dev)
    for i in (0, 2):
        out[f"vargpt_gen.text_proj_for_ca.{i}.weight"] = torch.zeros(Cd, Cm if i == 0 else Cd, dtype=dt, device=dev)
        out[f"vargpt_gen.text_proj_for_ca.{i}.bias"] = torch.zeros(Cd, dtype=dt, device=dev)
    pool_heads = cfg.decoder.pool_num_heads
    out["vargpt_gen.text_proj_for_sos.ca.mat_q"] = torch.zeros(1, pool_heads, C // pool_heads, dtype=dt, device=dev)
    out["vargpt_gen.text_proj_for_sos.ca.zero_k_bias"] = torch.zeros(C, dtype=dt, device=dev)
    for i in range(cfg.decoder.depth):
        pre = f"vargpt_gen.block_chunks.{i // per_chunk}.module.{i % per_chunk}"
        out[f"{pre}.sa.zero_k_bias"] = torch.zeros(C, dtype=dt, device=dev)
        out[f"{pre}.ca.zero_k_bias"] = torch.zeros(C, dtype=dt, device=dev)
    d = cfg.vae.codebook_dim
    out["vae_local.quantizer.lfq.mask"] = 2 ** torch.arange(d - 1, -1, -1, dtype=torch.int64, device=dev)
    return out
