"""Infinity-style next-scale visual decoder: RoPE-2D, cosine self-attention, cross-attention, KV cache."""

from vargpt.models.decoder.attention import CrossAttention, SelfAttention, memory_attn_bias
from vargpt.models.decoder.block import FFN, DecoderBlock, ada_layer_norm, drop_path
from vargpt.models.decoder.decoder import RMSNorm, VisualDecoder
from vargpt.models.decoder.kv_cache import DecoderKVCache
from vargpt.models.decoder.rope2d import apply_rope2d, rope2d_positions, rope2d_table

__all__ = [
    "VisualDecoder",
    "DecoderKVCache",
    "DecoderBlock",
    "SelfAttention",
    "CrossAttention",
    "FFN",
    "RMSNorm",
    "ada_layer_norm",
    "drop_path",
    "memory_attn_bias",
    "rope2d_positions",
    "rope2d_table",
    "apply_rope2d",
]
