"""The Qwen2-VL backbone (vision tower + Qwen2 LLM with M-RoPE), taken from Hugging Face transformers.

We configure and call ``transformers.Qwen2VLForConditionalGeneration``; we do not fork it. This module turns our
typed config into the transformers config, and computes position ids with pure functions (the model's
``rope_deltas`` attribute is never relied upon: positions are always passed explicitly, ENV-NOTES.md).

Module tree used by the rest of vargpt (transformers 5.24):
``backbone.model.visual`` (ViT + merger), ``backbone.model.language_model`` (``embed_tokens``, ``layers``, ``norm``,
``rotary_emb``), ``backbone.lm_head``.
"""

from __future__ import annotations

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from vargpt.config import VARGPTConfig

__all__ = ["hf_config", "build_backbone", "mrope_position_ids", "text_position_ids", "image_token_type_ids"]


def hf_config(cfg: VARGPTConfig) -> Qwen2VLConfig:
    """The transformers ``Qwen2VLConfig`` equivalent to ``cfg`` (all ids and eps set explicitly)."""
    t, v, st = cfg.text, cfg.vision, cfg.special_tokens
    text = dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        hidden_act="silu", max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
        use_sliding_window=False, attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)},
        bos_token_id=st.endoftext, eos_token_id=st.im_end, pad_token_id=st.endoftext,
    )
    vision = dict(
        depth=v.depth, embed_dim=v.embed_dim, hidden_size=t.hidden_size, hidden_act=v.hidden_act,
        mlp_ratio=v.mlp_ratio, num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
        spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
    )
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=st.image_pad, video_token_id=st.video_pad,
        vision_start_token_id=st.vision_start, vision_end_token_id=st.vision_end,
        tie_word_embeddings=t.tie_word_embeddings,
    )


def build_backbone(cfg: VARGPTConfig) -> Qwen2VLForConditionalGeneration:
    """A randomly initialised Qwen2-VL for ``cfg`` (weights are loaded by the caller)."""
    return Qwen2VLForConditionalGeneration._from_config(hf_config(cfg), attn_implementation=cfg.attn_implementation)


def image_token_type_ids(input_ids_BT: torch.Tensor, image_pad_id: int) -> torch.Tensor:
    """``mm_token_type_ids`` for transformers: 1 at understanding-image slots, 0 elsewhere (gen slots are text)."""
    return (input_ids_BT == image_pad_id).to(torch.int64)


def mrope_position_ids(
    backbone: Qwen2VLForConditionalGeneration,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor | None,
    image_grid_thw_N3: torch.Tensor | None,
    image_pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids (3, B, T) and per-sample deltas (B, 1), as Qwen2-VL computes them at prefill.

    Text tokens (including ``<|image_gen_*|>`` tokens) advance all three axes together; each understanding image
    occupies a (t, h/2, w/2) block. Example for ``[txt, txt, <img 2x2 merged>, txt]``: temporal
    ``0 1 2 2 2 2 4``, height ``0 1 2 2 3 3 4``, width ``0 1 2 3 2 3 4``; delta = 5 - 7 = -2. Padded positions
    (``attention_mask == 0``) get 0. Decoding continues at ``cache_position + delta``.
    """
    if image_grid_thw_N3 is None:
        T = input_ids_BT.shape[1]
        pos_BT = text_position_ids(attention_mask_BT, input_ids_BT.shape[0], T, input_ids_BT.device)
        lengths = pos_BT.amax(dim=1, keepdim=True) + 1
        real = attention_mask_BT.sum(dim=1, keepdim=True) if attention_mask_BT is not None else T
        return pos_BT.unsqueeze(0).expand(3, -1, -1).clone(), (lengths - real).to(torch.int64)
    types = image_token_type_ids(input_ids_BT, image_pad_id)
    return backbone.model.get_rope_index(
        input_ids_BT, mm_token_type_ids=types, image_grid_thw=image_grid_thw_N3, attention_mask=attention_mask_BT
    )


def text_position_ids(
    attention_mask_BT: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """1-D positions (B, T): 0.. over the real tokens of each row (padding gets 0)."""
    if attention_mask_BT is None:
        return torch.arange(length, device=device).unsqueeze(0).expand(batch, -1).clone()
    m = attention_mask_BT.to(torch.int64)
    return ((m.cumsum(dim=1) - 1) * m).clamp_min(0)
