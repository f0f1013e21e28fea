"""Behaviour of the visual decoder on a small random model: cached == block-causal, batching with padded memory,
causality over scales, RoPE-2D positions, drop-path, the reduced attentive pool, and the state-dict layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vargpt.config import DecoderConfig
from vargpt.models.decoder import VisualDecoder, apply_rope2d, rope2d_positions, rope2d_table
from vargpt.models.vae.schedules import ASPECT_TEMPLATES, scale_offsets

D_BITS = 8
SQUARE = (1.0, ASPECT_TEMPLATES[1.0][:4])  # 1,2,4,6 -> 57 tokens
WIDE = (0.5, ASPECT_TEMPLATES[0.5][:4])  # (1,1) (2,2) (2,4) (3,6) -> 31 tokens
TALL = (1.333, ASPECT_TEMPLATES[1.333][:4])  # (1,1) (2,2) (4,3) (8,6) -> 65 tokens


def small_cfg(**kw) -> DecoderConfig:
    base = dict(width=128, depth=2, num_heads=2, mlp_ratio=2.0, memory_dim=128, pool_head_dim=64, uncond_rows=16)
    return DecoderConfig(**{**base, **kw})


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter non-trivial (no 0/1 constants), so a dropped bias or norm weight would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.dim() == 2 and not name.endswith(("embedding", "lvl_embed.weight")):
                p.copy_(r / math.sqrt(p.shape[1]))
            elif name.endswith("scale_mul_1H11"):
                p.copy_(math.log(4.0) + 0.2 * r)
            elif name.endswith(("norm.weight", "cond_norm.weight")):
                p.copy_(1 + 0.1 * r)
            elif name.endswith("ada_gss"):
                p.copy_(0.2 * r)
            elif "embed" in name or name == "pos_start":
                p.copy_(0.5 * r)
            else:
                p.copy_(0.1 * r)
    return model


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def dec(request) -> VisualDecoder:
    """The same weights under either attention implementation (every test that takes it runs on both)."""
    return randomize_(VisualDecoder(small_cfg(attn_implementation=request.param), D_BITS)).eval()


def inputs(dec: VisualDecoder, schedule, lens=(5, 9), seed=1):
    """Random LLM outputs, conditions and a padded memory whose padding rows hold garbage."""
    g = torch.Generator().manual_seed(seed)
    B, L, C, Cm = len(lens), scale_offsets(schedule)[-1], dec.cfg.width, dec.cfg.memory_dim
    h = torch.randn(B, L, C, generator=g)
    cond = dec.condition(torch.randn(B, Cm, generator=g))
    memory = torch.randn(B, max(lens), Cm, generator=g)
    mask = torch.arange(max(lens))[None] < torch.tensor(lens)[:, None]
    memory[~mask] = 1e6  # garbage
    return h, cond, memory, mask


@torch.no_grad()
@pytest.mark.parametrize("template,schedule", [SQUARE, WIDE, TALL], ids=["1.0", "0.5", "1.333"])
def test_cached_scale_by_scale_equals_block_causal(dec, template, schedule) -> None:
    h, cond, memory, mask = inputs(dec, schedule)
    full = dec(h, cond, memory, mask, schedule, template)
    offs = scale_offsets(schedule)
    cache = dec.new_cache(h.shape[0], offs[-1])
    for k in range(len(schedule)):
        part = dec.forward_scale(h[:, offs[k]:offs[k + 1]], cond, memory, mask, schedule, template, k, cache)
        torch.testing.assert_close(part, full[:, offs[k]:offs[k + 1]], atol=1e-5, rtol=1e-5)
    assert cache.pos == offs[-1]
    with pytest.raises(ValueError):  # the cache already holds every scale: scale 0 cannot start again
        dec.forward_scale(h[:, :1], cond, memory, mask, schedule, template, 0, cache)


@torch.no_grad()
@pytest.mark.parametrize("garbage", [1e6, float("nan"), float("inf")])
def test_batched_equals_one_by_one_with_padded_memory(dec, garbage) -> None:
    template, schedule = WIDE
    h, cond, memory, mask = inputs(dec, schedule, lens=(3, 11, 7))
    memory[~mask] = garbage
    batched = dec(h, cond, memory, mask, schedule, template)
    assert torch.isfinite(batched).all()
    for b in range(h.shape[0]):
        n = int(mask[b].sum())
        one = dec(h[b:b + 1], cond[b:b + 1], memory[b:b + 1, :n], mask[b:b + 1, :n], schedule, template)
        torch.testing.assert_close(batched[b:b + 1], one, atol=1e-5, rtol=1e-5)
    # the memory matters: other real rows give other logits
    memory2 = memory.clone()
    memory2[0, 0] += 1.0
    assert not torch.allclose(dec(h, cond, memory2, mask, schedule, template)[0], batched[0])


@pytest.mark.parametrize("template,schedule", [SQUARE, TALL], ids=["1.0", "1.333"])
def test_eager_attention_equals_sdpa_with_gradients(template, schedule) -> None:
    """``attn_implementation="eager"`` computes what SDPA computes: the block-causal training forward with a padded
    memory, and the gradients of every parameter and input, to float32 round-off."""
    decs = [randomize_(VisualDecoder(small_cfg(attn_implementation=impl), D_BITS)).eval() for impl in ("sdpa", "eager")]
    outs, grads = [], []
    for d in decs:
        h, cond, memory, mask = inputs(d, schedule, lens=(3, 11))
        memory[~mask] = 0.0
        h.requires_grad_(True)
        memory.requires_grad_(True)
        out = d(h, cond, memory, mask, schedule, template)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outs.append(out.detach())
        grads.append([h.grad, memory.grad] + [p.grad for p in d.parameters() if p.grad is not None])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert len(grads[0]) == len(grads[1]) > 2
    for a, b in zip(grads[0], grads[1], strict=True):  # round-off of sums over many terms: relative to the tensor
        assert (b - a).abs().max() <= 1e-5 * a.abs().max()
    with pytest.raises(ValueError, match="DecoderConfig.attn_implementation"):
        small_cfg(attn_implementation="flash")


@torch.no_grad()
def test_block_causal_mask(dec) -> None:
    template, schedule = SQUARE
    h, cond, memory, mask = inputs(dec, schedule)
    offs = scale_offsets(schedule)
    ref = dec(h, cond, memory, mask, schedule, template)
    for k in range(len(schedule) - 1):
        h2 = h.clone()
        h2[:, offs[k + 1]:offs[k + 2]] += torch.randn_like(h2[:, offs[k + 1]:offs[k + 2]])
        out = dec(h2, cond, memory, mask, schedule, template)
        torch.testing.assert_close(out[:, : offs[k + 1]], ref[:, : offs[k + 1]], atol=1e-6, rtol=0)
        assert (out[:, offs[k + 1]:offs[k + 2]] - ref[:, offs[k + 1]:offs[k + 2]]).abs().max() > 1e-3
    # tokens inside one scale see each other (not token-causal)
    h3 = h.clone()
    h3[:, offs[-1] - 1] += torch.randn_like(h3[:, 0])  # (not a constant shift: the LayerNorms would remove it)
    out = dec(h3, cond, memory, mask, schedule, template)
    assert (out[:, offs[-2]] - ref[:, offs[-2]]).abs().max() > 1e-3


def test_rope_positions_round_half_to_even() -> None:
    steps = ASPECT_TEMPLATES[0.5]
    assert steps[2] == (2, 4) and steps[-1] == (45, 90)
    off = scale_offsets(steps)[2]
    pos = rope2d_positions(0.5)[off:off + 8].view(2, 4, 2)
    assert pos[0, :, 1].tolist() == [0, 22, 45, 68]  # 67.5 -> 68 (even), 22.5 -> 22
    assert pos[:, 0, 0].tolist() == [0, 22]
    sq = rope2d_positions(1.0)
    assert sq[1:5].tolist() == [[0, 0], [0, 32], [32, 0], [32, 32]]
    assert len(sq) == scale_offsets(ASPECT_TEMPLATES[1.0])[-1]


def test_rope_table_angles_and_rotation_preserves_norm() -> None:
    Dh = 16
    table = rope2d_table(0.5, Dh, 10000.0, 128)
    pos = rope2d_positions(0.5)
    t = 7  # some token with row != col
    r, c = pos[t].tolist()
    inv = 10000.0 ** (-torch.arange(Dh // 4, dtype=torch.float64) * 2 / (Dh // 2))
    expect = torch.cat([r * inv, c * inv])
    torch.testing.assert_close(table[0, t].double(), expect.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(table[1, t].double(), expect.sin(), atol=1e-6, rtol=0)

    x = torch.randn(2, 3, 31, Dh)
    y = apply_rope2d(x, table[:, :31])
    pair_norm = lambda z: z.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y[:, :, 1:], x[:, :, 1:])
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # token 0 sits at (0, 0): no rotation


@torch.no_grad()
def test_drop_path_only_in_training() -> None:
    a = randomize_(VisualDecoder(small_cfg(drop_path_rate=0.0), D_BITS))
    b = VisualDecoder(small_cfg(drop_path_rate=0.9), D_BITS)
    b.load_state_dict(a.state_dict())
    template, schedule = WIDE
    h, cond, memory, mask = inputs(a, schedule, lens=(4, 4, 4, 4, 4, 4, 4, 4))
    ref = a.eval()(h, cond, memory, mask, schedule, template)
    torch.testing.assert_close(b.eval()(h, cond, memory, mask, schedule, template), ref)
    b.train()
    torch.manual_seed(0)
    t1 = b(h, cond, memory, mask, schedule, template)
    torch.manual_seed(0)
    t2 = b(h, cond, memory, mask, schedule, template)
    torch.testing.assert_close(t1, t2)  # global RNG: reproducible under manual_seed
    assert not torch.allclose(t1, ref)


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_condition_equals_single_key_attentive_pool(dec, seed) -> None:
    """Official TextAttentivePool over one key with arbitrary learned query and K half == condition()."""
    g = torch.Generator().manual_seed(seed)
    C, Cm = dec.cfg.width, dec.cfg.memory_dim
    H = dec.cfg.pool_num_heads
    Dh = C // H
    query_1HDh = 3 * torch.randn(1, H, Dh, generator=g)
    w_k = 3 * torch.randn(C, Cm, generator=g)
    k_bias = torch.randn(C, generator=g)
    e_BCm = torch.randn(4, Cm, generator=g)

    x = dec.cond_norm(e_BCm)  # (B, Cm): the single key/value row of each sample
    w_kv = torch.cat([w_k, dec.cond_pool_v.weight])
    kv = F.linear(x, w_kv, torch.cat([k_bias, dec.cond_pool_v.bias])).view(-1, 2, H, Dh)
    k_BHDh, v_BHDh = kv.unbind(1)
    scores_BH1 = (query_1HDh * k_BHDh).sum(-1, keepdim=True) / math.sqrt(Dh)
    attn = scores_BH1.softmax(dim=-1)  # softmax over one key
    pooled = dec.cond_pool_proj((attn * v_BHDh).reshape(-1, C))
    torch.testing.assert_close(dec.condition(e_BCm), pooled, atol=1e-5, rtol=1e-5)


def test_state_dict_keys_and_shapes() -> None:
    cfg = small_cfg(depth=3)
    dec = VisualDecoder(cfg, D_BITS)
    C, Cm, H, F_ = cfg.width, cfg.memory_dim, cfg.num_heads, cfg.ffn_hidden
    expect = {
        "start_embedding": (Cm,), "uncond_embedding": (cfg.uncond_rows, Cm), "cond_norm.weight": (Cm,),
        "cond_pool_v.weight": (C, Cm), "cond_pool_v.bias": (C,), "cond_pool_proj.weight": (C, C),
        "cond_pool_proj.bias": (C,), "pos_start": (1, 1, C), "lvl_embed.weight": (cfg.num_levels, C),
        "word_embed.weight": (C, D_BITS), "word_embed.bias": (C,), "shared_ada_lin.weight": (6 * C, C),
        "shared_ada_lin.bias": (6 * C,), "head_ada_lin.weight": (2 * C, C), "head_ada_lin.bias": (2 * C,),
        "head.weight": (2 * D_BITS, C), "head.bias": (2 * D_BITS,),
    }
    for i in range(cfg.depth):
        expect.update({
            f"blocks.{i}.ada_gss": (1, 1, 6, C), f"blocks.{i}.sa.scale_mul_1H11": (1, H, 1, 1),
            f"blocks.{i}.sa.mat_qkv.weight": (3 * C, C), f"blocks.{i}.sa.q_bias": (C,),
            f"blocks.{i}.sa.v_bias": (C,), f"blocks.{i}.sa.proj.weight": (C, C), f"blocks.{i}.sa.proj.bias": (C,),
            f"blocks.{i}.ca.mat_q.weight": (C, C), f"blocks.{i}.ca.mat_q.bias": (C,),
            f"blocks.{i}.ca.mat_kv.weight": (2 * C, Cm), f"blocks.{i}.ca.v_bias": (C,),
            f"blocks.{i}.ca.proj.weight": (C, C), f"blocks.{i}.ca.proj.bias": (C,),
            f"blocks.{i}.ca_norm.weight": (C,), f"blocks.{i}.ca_norm.bias": (C,),
            f"blocks.{i}.ffn.fc1.weight": (F_, C), f"blocks.{i}.ffn.fc1.bias": (F_,),
            f"blocks.{i}.ffn.fc2.weight": (C, F_), f"blocks.{i}.ffn.fc2.bias": (C,),
        })
    got = {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    assert got == expect
    assert all(v.dtype == torch.float32 for v in dec.state_dict().values())


def test_bit_logits_layout_and_schedule_checks(dec) -> None:
    logits = torch.arange(2 * 3 * 2 * D_BITS, dtype=torch.float32).view(2, 3, 2 * D_BITS)
    bits = dec.bit_logits(logits)
    assert bits.shape == (2, 3, D_BITS, 2)
    assert bits[1, 2, 5, 0] == logits[1, 2, 10] and bits[1, 2, 5, 1] == logits[1, 2, 11]
    h, cond, memory, mask = inputs(dec, SQUARE[1])
    with pytest.raises(ValueError):  # not a prefix of the 1.0 template
        dec(h[:, :5], cond, memory, mask, ((1, 1), (1, 4)), 1.0)
    with pytest.raises(ValueError):  # wrong token count
        dec(h[:, :4], cond, memory, mask, ((1, 1), (2, 2)), 1.0)
    with pytest.raises(ValueError):  # a sample without any real memory row
        dec(h, cond, memory, torch.zeros_like(mask), SQUARE[1], 1.0)
