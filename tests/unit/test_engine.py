"""The inference engine on the tiny preset: batching invariance (left padding, per-row generators), cached ==
uncached (text, images, text after a drawn image, multi-turn history), CFG modes, streaming, editing, aspect
ratios and parameter validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vargpt.engine import ChatResult, Done, Engine, ImageDone, ImagePreview, TextDelta
from vargpt.generation.params import ImageParams, TextParams
from vargpt.generation.reference import generate_image_uncached, greedy_text_uncached
from vargpt.models.vae import accumulate_codes, next_scale_input
from vargpt.models.vae.schedules import nearest_template, schedule_num_tokens
from vargpt.processing.processor import EncodedPrompt, Processor
from vargpt.processing.tokenizer import char_tokenizer

from .helpers import tiny_model

SAMPLING = dict(cfg_scale=3.0, temperature=1.0, top_p=0.9)


def mixing_model(seed: int = 0, **overrides):
    """``tiny_model`` with a backbone that actually mixes context: at its default init (std 0.02, unit norms) the
    tiny LLM is nearly a bigram model (the residual stream is the last token's embedding), so positions, history
    rows or padding mistakes would not change a single token. Unit-variance weights make every token count."""
    model = tiny_model(seed, **overrides)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):  # norms
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _engine(**overrides) -> Engine:
    model = mixing_model(**overrides)
    cfg = model.config
    return Engine(model, Processor(cfg, char_tokenizer(cfg.special_tokens, cfg.text.vocab_size)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return _engine()


def pil(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def user(*items) -> list[dict]:
    """One user turn; PIL images become understanding inputs, strings text items."""
    content = [{"type": "image", "image": it} if isinstance(it, Image.Image) else {"type": "text", "text": it}
               for it in items]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def prompts(engine: Engine) -> list[EncodedPrompt]:
    """Three prompts of different lengths: one image, two images of different sizes, text only."""
    p = engine.processor
    return [
        p.encode(user(pil(56, 56, 1), "what is this?")),
        p.encode(user(pil(56, 84, 2), pil(84, 56, 3), "compare the two pictures")),
        p.encode(user("a text-only question that is somewhat longer than the others, to shift the padding")),
    ]


def assert_same_images(a, b, *, pixel_tol: int = 0, logits: bool = True) -> None:
    """Same seed, schedule and bits at every scale; logits close; PIL pixels within ``pixel_tol``."""
    assert a.seed == b.seed and a.schedule == b.schedule and a.params == b.params
    assert len(a.bits) == len(b.bits) == len(a.schedule)
    for k, (x, y) in enumerate(zip(a.bits, b.bits, strict=True)):
        assert torch.equal(x, y), f"bits of scale {k} differ"
    if logits:
        for k, (x, y) in enumerate(zip(a.logits, b.logits, strict=True)):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-4 * float(y.abs().max()), msg=f"logits of scale {k}")
    diff = np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16))
    assert a.image.size == b.image.size and int(diff.max()) <= pixel_tol


def image_rows(model, bits: list[torch.Tensor], schedule) -> torch.Tensor:
    """The decoder-width LLM input rows (1, L, C) of a generated image, built as the reference loop builds them."""
    dec = model.decoder
    cond = dec.condition(dec.start_embedding.unsqueeze(0))
    rows = [dec.start_tokens(cond)]
    H, W = schedule[-1]
    summed = torch.zeros(1, model.config.vae.codebook_dim, H, W)
    for k in range(len(schedule) - 1):
        summed = accumulate_codes(summed, bits[k].unsqueeze(0), schedule[k])
        rows.append(dec.embed_words(next_scale_input(summed, schedule[k + 1])))
    return torch.cat(rows, dim=1)


# --------------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize("params", [
    TextParams(max_new_tokens=8),
    TextParams(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9),
], ids=["greedy", "sampling"])
def test_generate_text_batched_equals_single(engine: Engine, prompts, params: TextParams) -> None:
    lengths = [len(p.input_ids) for p in prompts]
    assert len(set(lengths)) == 3  # left padding differs per row
    batched = engine.generate_text(prompts, params, seeds=[0, 1, 2])
    singles = [engine.generate_text([p], params, seeds=[i])[0] for i, p in enumerate(prompts)]
    assert batched == singles
    assert all(len(ids) == params.max_new_tokens for ids in batched)  # no stop token: every row ran to the end
    # default seeds are params.seed + i
    shifted = TextParams(**{**params.to_dict(), "seed": 1})
    assert engine.generate_text(prompts[1:], shifted) == batched[1:]
    if params.temperature > 0:
        assert engine.generate_text(prompts[:1], params, seeds=[5]) != batched[:1]
    # rows that stop early: every row is its unstopped output cut after the first stop token (the others go on,
    # unchanged: a stopped row feeds invisible slots and its generator draws as before)
    stop = batched[0][2]
    cut = [ids[: ids.index(stop) + 1] if stop in ids else ids for ids in batched]
    assert len({len(c) for c in cut}) > 1
    stopping = TextParams(**{**params.to_dict(), "stop_token_ids": (stop,)})
    assert engine.generate_text(prompts, stopping, seeds=[0, 1, 2]) == cut
    assert [engine.generate_text([p], stopping, seeds=[i])[0] for i, p in enumerate(prompts)] == cut


def test_generate_text_cached_equals_uncached(engine: Engine, prompts) -> None:
    im_end = engine.config.special_tokens.im_end
    for enc in (prompts[1], prompts[2]):
        got = engine.generate_text([enc], TextParams(max_new_tokens=10))[0]
        ref = greedy_text_uncached(engine.model, torch.tensor([enc.input_ids]), pixel_values=enc.pixel_values,
                                   image_grid_thw=enc.image_grid_thw, max_new_tokens=10, stop_ids=(im_end,))
        assert got == ref


# -------------------------------------------------------------------------------------------------- image
@pytest.mark.parametrize("with_image,aspect", [(False, 1.0), (True, 1.0), (True, 2.0)],
                         ids=["text", "edit-like", "edit-like-aspect2"])
def test_image_cached_equals_uncached(engine: Engine, with_image: bool, aspect: float) -> None:
    model = engine.model
    items = (pil(56, 84, 4), "make it brighter") if with_image else ("a red circle on blue",)
    enc = engine.processor.encode(user(*items))
    params = ImageParams(cfg_scale=1.0, temperature=0, positions="mrope", aspect_ratio=aspect)
    (img,) = engine.generate_images([enc], params, return_tensors=True)
    schedule = engine.schedule(params)
    assert img.schedule == schedule and len(schedule) == 3
    if aspect == 2.0:
        assert schedule[-1] == (4, 2) and img.image.size == (32, 64)
    ref_logits: list[torch.Tensor] = []
    ref = generate_image_uncached(model, torch.tensor([enc.input_ids]), schedule, template=nearest_template(aspect),
                                  pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw, temperature=0,
                                  logits_out=ref_logits)
    for k in range(len(schedule)):
        assert torch.equal(img.bits[k], ref.ms_bits_Bld[k][0]), f"bits of scale {k}"
        want = model.decoder.bit_logits(ref_logits[k])[0]
        torch.testing.assert_close(img.logits[k], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    torch.testing.assert_close(img.decoded, ref.image_B3HW[0], rtol=0, atol=1e-5)
    if with_image:
        # the understanding image compresses the M-RoPE positions: the raw cache index is a different model input
        official = ImageParams(**{**params.to_dict(), "positions": "official"})
        (off,) = engine.generate_images([enc], official, return_tensors=True)
        assert not torch.allclose(off.logits[0], img.logits[0], atol=1e-4 * float(img.logits[0].abs().max()))


@pytest.mark.parametrize("cfg_mode", ["official", "null_prompt"])
def test_generate_images_batched_equals_single(engine: Engine, prompts, cfg_mode: str) -> None:
    batch = ["a red circle", prompts[0], "a much longer prompt: a small blue square on a wide green field"]
    params = ImageParams(cfg_mode=cfg_mode, seed=11, **SAMPLING)
    out = engine.generate_images(batch, params, return_tensors=True)
    assert [r.seed for r in out] == [11, 12, 13] and [r.params["seed"] for r in out] == [11, 12, 13]
    assert all(r.params["cfg_mode"] == cfg_mode and r.params["positions"] == "mrope" for r in out)
    for i, p in enumerate(batch):
        (single,) = engine.generate_images([p], params, seeds=[11 + i], return_tensors=True)
        # batched float VAE decode may round a pixel differently; bits are exact
        assert_same_images(out[i], single, pixel_tol=1)
    # explicit seeds are honoured (and are what the results record)
    swapped = engine.generate_images(batch[:2], params, seeds=[12, 11], return_tensors=True)
    assert [r.seed for r in swapped] == [12, 11] and [r.params["seed"] for r in swapped] == [12, 11]
    (alone,) = engine.generate_images(batch[:1], params, seeds=[12], return_tensors=True)
    assert_same_images(swapped[0], alone, pixel_tol=1)
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        engine.generate_images(batch, params, seeds=[1, 2])


def test_generate_images_reproducible_and_seeded(engine: Engine) -> None:
    params = ImageParams(seed=3, **SAMPLING)
    a = engine.generate_images(["a cat", "a dog"], params)
    b = engine.generate_images(["a cat", "a dog"], params)
    for x, y in zip(a, b, strict=True):
        assert_same_images(x, y, logits=False)
        assert x.image.tobytes() == y.image.tobytes()
    (c,) = engine.generate_images(["a cat"], params, seeds=[4])
    assert not all(torch.equal(x, y) for x, y in zip(a[0].bits, c.bits, strict=True))
    # the engine never touches the global RNG
    state = torch.get_rng_state()
    engine.generate_images(["a cat"], params)
    assert torch.equal(state, torch.get_rng_state())


def test_official_cfg_rejects_prompts_longer_than_the_uncond_table(engine: Engine) -> None:
    n = engine.config.decoder.uncond_rows  # 512 in the tiny preset
    overhead = len(engine.processor.encode(user("x")).input_ids) - 1
    assert n > overhead
    fits, too_long = "x" * (n - overhead), "x" * (n + 1 - overhead)
    assert len(engine.processor.encode(user(fits)).input_ids) == n
    official = ImageParams(cfg_mode="official", seed=0, **SAMPLING)
    engine.generate_images([fits], official)  # exactly n tokens before <|image_gen_start|> is allowed
    with pytest.raises(ValueError, match=rf"(?s)at most {n} tokens.*got {n + 1}.*null_prompt"):
        engine.generate_images([too_long], official)
    with pytest.raises(ValueError, match="null_prompt"):  # also inside a batch of short prompts
        engine.generate_images(["short", too_long], official)
    (a,) = engine.generate_images([too_long], ImageParams(cfg_mode="null_prompt", seed=0, **SAMPLING))
    (b,) = engine.generate_images([too_long], ImageParams(**{**official.to_dict(), "cfg_scale": 1.0}))
    assert a.image.size == b.image.size == (64, 64)


def test_cfg_modes_differ_only_with_guidance(engine: Engine) -> None:
    def run(mode: str, cfg: float):
        p = ImageParams(cfg_mode=mode, seed=5, **{**SAMPLING, "cfg_scale": cfg})
        return engine.generate_images(["a green triangle"], p, return_tensors=True)[0]

    off, null = run("official", 3.0), run("null_prompt", 3.0)
    assert not torch.allclose(off.logits[0], null.logits[0])
    off1, null1 = run("official", 1.0), run("null_prompt", 1.0)
    for x, y in zip(off1.logits, null1.logits, strict=True):
        assert torch.equal(x, y)
    for x, y in zip(off1.bits, null1.bits, strict=True):
        assert torch.equal(x, y)
    assert off1.image.tobytes() == null1.image.tobytes()
    assert not torch.allclose(off.logits[0], off1.logits[0])  # guidance changes the logits


def test_scale0_logits_are_tempered_guided_combinations(engine: Engine) -> None:
    """Scale 0 comes before any sampled bit, so its guided logits can be rebuilt from independent pieces:
    cfg * cond + (1 - cfg) * uncond, all divided by tau; uncond = the empty prompt (null_prompt) or the context-free
    official branch (LLM sees only the start row at position 0, memory = the first n rows of the uncond table)."""
    model, dec = engine.model, engine.model.decoder
    prompt = "a yellow star"
    n = len(engine.processor.encode(user(prompt)).input_ids)

    def scale0(p: str, **kw) -> torch.Tensor:
        params = ImageParams(**{"temperature": 1.0, "top_p": 0.9, "seed": 0, **kw})
        return engine.generate_images([p], params, return_tensors=True)[0].logits[0]

    cond = scale0(prompt, cfg_scale=1.0)
    null = scale0("", cfg_scale=1.0)
    with torch.no_grad():
        cond_u = dec.condition(dec.uncond_embedding[:1])
        emb = model.gen_proj_in(dec.start_tokens(cond_u))
        h = model.language_model(inputs_embeds=emb, position_ids=torch.zeros(3, 1, 1, dtype=torch.long),
                                 use_cache=False).last_hidden_state
        official = dec.bit_logits(dec(model.gen_proj_out(h), cond_u, dec.uncond_embedding[:n].unsqueeze(0),
                                      torch.ones(1, n, dtype=torch.bool), ((1, 1),), 1.0))[0]
    for mode, uncond in (("null_prompt", null), ("official", official)):
        want = 3.0 * cond + (1 - 3.0) * uncond
        got = scale0(prompt, cfg_scale=3.0, cfg_mode=mode)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()), msg=mode)
        tempered = scale0(prompt, cfg_scale=3.0, cfg_mode=mode, temperature=0.5)
        torch.testing.assert_close(tempered, 2 * got, rtol=1e-5, atol=1e-5 * float(got.abs().max()), msg=mode)


# ------------------------------------------------------------------------------------------ chat / stream
def test_stream_equals_chat(engine: Engine) -> None:
    messages = user(pil(56, 56, 7), "draw this, then describe it")
    tp = TextParams(max_new_tokens=6, temperature=1.0, seed=3)
    ip = ImageParams(seed=5, **SAMPLING)
    events = list(engine.stream(messages, tp, ip, draw="first"))
    chat = engine.chat(messages, tp, ip, draw="first")

    assert isinstance(events[-1], Done) and not any(isinstance(e, Done) for e in events[:-1])
    res: ChatResult = events[-1].result
    assert (res.text, res.token_ids, res.finish_reason) == (chat.text, chat.token_ids, chat.finish_reason)
    assert len(res.images) == len(chat.images) == 1
    assert_same_images(res.images[0], chat.images[0], logits=False)
    assert res.images[0].image.tobytes() == chat.images[0].image.tobytes()

    # one preview per scale, in order, then ImageDone; the last preview is the final image
    n = len(res.images[0].schedule)
    done_at = next(i for i, e in enumerate(events) if isinstance(e, ImageDone))
    previews = events[:done_at]
    assert all(isinstance(e, ImagePreview) for e in previews)
    assert [(e.scale_index, e.num_scales, e.row) for e in previews] == [(k, n, 0) for k in range(n)]
    assert previews[-1].image.tobytes() == res.images[0].image.tobytes()
    assert events[done_at].image is res.images[0]
    # text = the deltas in order with "<image>" where each image was finished
    rebuilt = "".join(e.text if isinstance(e, TextDelta) else "<image>" for e in events
                      if isinstance(e, (TextDelta, ImageDone)))
    assert rebuilt == res.text and res.text.startswith("<image>")
    assert not any(isinstance(e, ImagePreview) for e in events[done_at:])
    # the assistant message: the image (with its bits), then the text
    content = res.message["content"]
    assert res.message["role"] == "assistant" and content[0]["type"] == "image_gen"
    assert all(torch.equal(x, y) for x, y in zip(content[0]["bits"], res.images[0].bits, strict=True))
    assert "".join(c["text"] for c in content[1:]) == res.text[len("<image>"):]


@pytest.mark.parametrize("pad_multiple", [1, 8])
def test_chat_continuation_after_image_equals_uncached(pad_multiple: int) -> None:
    engine = _engine(gen_pad_multiple=pad_multiple)
    model = engine.model
    st = engine.config.special_tokens
    messages = user(pil(56, 84, 8), "draw it")
    ip = ImageParams(seed=2, **SAMPLING)
    res = engine.chat(messages, TextParams(max_new_tokens=6), ip, draw="first")
    (img,) = res.images
    L = schedule_num_tokens(img.schedule)
    P = model.gen_slots(L)
    assert (P > L) == (pad_multiple == 8)
    ids = res.token_ids
    assert ids[: P + 2] == [st.image_gen_start] + [st.image_gen_pad] * P + [st.image_gen_end]
    text = ids[P + 2:]
    assert len(text) >= 1 and st.image_gen_start not in text
    assert res.text == "<image>" + engine.processor.decode(text)
    # the image is what generate_images draws for the same prompt and seed
    enc = engine.processor.encode(messages)
    (same,) = engine.generate_images([enc], ip)
    assert_same_images(img, same, logits=False)

    # uncached: the whole sequence at once (image rows in the pad slots, P - L zero rows), M-RoPE positions
    full = torch.tensor([enc.input_ids + ids])
    rows = F.pad(image_rows(model, img.bits, img.schedule), (0, 0, 0, P - L))
    with torch.no_grad():
        pos = model.position_ids(full, None, enc.image_grid_thw, mode="mrope")
        hidden = model.llm_hidden(full, None, pos, enc.pixel_values, enc.image_grid_thw, rows)
        pred = model.backbone.lm_head(hidden[0]).argmax(-1).tolist()
    n0 = len(enc.input_ids) + P + 2  # index of the first text token
    assert pred[n0 - 1: len(ids) + len(enc.input_ids) - 1] == text
    if res.finish_reason == "stop":
        assert pred[-1] == st.im_end

    # multi-turn: the drawn image comes back from the history (bits) as the same P rows
    messages2 = messages + [res.message, {"role": "user", "content": "and now?"}]
    r1 = engine.chat(messages2, TextParams(max_new_tokens=5), draw="never")
    r2 = engine.chat(messages2, TextParams(max_new_tokens=5), draw="never")
    assert r1.token_ids == r2.token_ids and r1.text == r2.text and not r1.images
    assert st.image_gen_start not in r1.token_ids
    enc2 = engine.processor.encode(messages2)
    assert enc2.input_ids.count(st.image_gen_pad) == 1
    k = enc2.input_ids.index(st.image_gen_pad)
    ids2 = enc2.input_ids[:k] + [st.image_gen_pad] * P + enc2.input_ids[k + 1:]
    full2 = torch.tensor([ids2 + r1.token_ids])
    with torch.no_grad():
        pos2 = model.position_ids(full2, None, enc2.image_grid_thw, mode="mrope")
        h2 = model.llm_hidden(full2, None, pos2, enc2.pixel_values, enc2.image_grid_thw, rows)
        logits2 = model.backbone.lm_head(h2[0]).float()
    logits2[:, st.image_gen_start] = float("-inf")
    pred2 = logits2.argmax(-1).tolist()
    assert pred2[len(ids2) - 1: len(ids2) + len(r1.token_ids) - 1] == r1.token_ids
    # the same, numerically: the engine's prefill of the history (P slots from the bits) == the uncached states
    session, last = engine.prefill([enc2])
    n2 = len(ids2)
    tol = 1e-4 * float(h2.abs().max())
    torch.testing.assert_close(session.hidden_BTC[0], h2[0, :n2], rtol=0, atol=tol)
    torch.testing.assert_close(last[0], h2[0, n2 - 1], rtol=0, atol=tol)
    with torch.no_grad():  # (the check has teeth: without the image rows the states are far off)
        h0 = model.llm_hidden(full2[:, :n2], None, pos2[..., :n2], enc2.pixel_values, enc2.image_grid_thw,
                              torch.zeros_like(rows))
    assert float((h0[0] - h2[0, :n2]).abs().max()) > 100 * tol


def test_chat_draw_never_and_bad_draw(engine: Engine) -> None:
    st = engine.config.special_tokens
    messages = user("hello")
    res = engine.chat(messages, TextParams(max_new_tokens=4, temperature=1.0, seed=0), draw="never")
    assert st.image_gen_start not in res.token_ids and not res.images
    with pytest.raises(ValueError, match="draw='sometimes'"):
        engine.chat(messages, draw="sometimes")


def _favour_image_start(engine: Engine, monkeypatch) -> None:
    """Make <|image_gen_start|> every step's most likely text token (the engine samples from ``lm_logits``)."""
    import vargpt.engine as engine_module

    start, orig = engine.config.special_tokens.image_gen_start, engine_module.lm_logits

    def favour(model, hidden):
        logits = orig(model, hidden).clone()
        logits[:, start] += 1e4
        return logits

    monkeypatch.setattr(engine_module, "lm_logits", favour)


def test_image_start_is_banned_where_no_image_may_be_drawn(engine: Engine, prompts, monkeypatch) -> None:
    tp = TextParams(max_new_tokens=4, temperature=1.0, seed=1)
    plain_text = engine.generate_text(prompts, tp)
    plain_chat = engine.chat(user("hello"), tp, draw="never")
    first = engine.chat(user("hello"), TextParams(max_new_tokens=1), ImageParams(cfg_scale=1.0), draw="first")
    _favour_image_start(engine, monkeypatch)
    # banned (-inf), so the boost changes nothing, not even the sampling RNG stream
    assert engine.generate_text(prompts, tp) == plain_text
    never = engine.chat(user("hello"), tp, draw="never")
    assert (never.token_ids, never.text, never.images) == (plain_chat.token_ids, plain_chat.text, [])
    # "auto" lets the model draw: its first image is the one "first" forces (same prompt, same image seed)
    events = engine.stream(user("hello"), TextParams(max_new_tokens=1), ImageParams(cfg_scale=1.0), previews=False)
    drawn = next(e.image for e in events if isinstance(e, ImageDone))
    events.close()
    assert_same_images(drawn, first.images[0], logits=False)


def test_write_replies_stops_where_the_model_opens_the_image(engine: Engine, prompts, monkeypatch) -> None:
    import vargpt.engine as engine_module

    st = engine.config.special_tokens
    greedy = engine.generate_text(prompts, TextParams(max_new_tokens=5))
    # the model opens the image at its third step: the reply is the two greedy tokens before it
    start, orig, calls = st.image_gen_start, engine_module.lm_logits, []

    def third_step_opens(model, hidden):
        logits = orig(model, hidden).clone()
        calls.append(1)
        if len(calls) == 3:
            logits[:, start] += 1e4
        return logits

    monkeypatch.setattr(engine_module, "lm_logits", third_step_opens)
    stop = TextParams(max_new_tokens=5, stop_token_ids=(start,))
    assert engine.generate_text(prompts, stop) == [g[:2] + [start] for g in greedy]
    # ... and banned when it is not a stop token: the boost changes nothing
    calls.clear()
    assert engine.generate_text(prompts, TextParams(max_new_tokens=5)) == greedy
    calls.clear()
    encs = [EncodedPrompt(list(p.input_ids), p.pixel_values, p.image_grid_thw) for p in prompts]
    replies = engine.write_replies(encs)
    for enc, p, g, reply in zip(encs, prompts, greedy, replies, strict=True):
        assert enc.input_ids == list(p.input_ids) + g[:2] and reply == engine.processor.decode(g[:2]).strip()


def test_drawing_is_bounded_by_max_images(engine: Engine, monkeypatch) -> None:
    _favour_image_start(engine, monkeypatch)
    for max_images in (4, 2):
        events = list(engine.stream(user("hello"), TextParams(max_new_tokens=2), ImageParams(cfg_scale=1.0),
                                    max_images=max_images, previews=False))
        n_images = sum(isinstance(ev, ImageDone) for ev in events)
        result = events[-1].result
        assert isinstance(events[-1], Done) and n_images == len(result.images) == max_images
        # after the last allowed image the start token is banned: the turn ends on text tokens
        assert result.token_ids[-1] != engine.config.special_tokens.image_gen_end
    with pytest.raises(ValueError, match="max_images"):
        engine.chat(user("hello"), draw="first", max_images=0)


def test_forced_first_image_does_not_count_as_text(engine: Engine) -> None:
    res = engine.chat(user("hello"), TextParams(max_new_tokens=0), ImageParams(cfg_scale=1.0), draw="first")
    st = engine.config.special_tokens
    assert len(res.images) == 1 and res.token_ids[0] == st.image_gen_start and res.token_ids[-1] == st.image_gen_end
    assert res.finish_reason == "length" and res.text == "<image>"


def test_understand_decodes_generate_text(engine: Engine) -> None:
    images, question = [pil(56, 84, 2), pil(84, 56, 3)], "compare"
    tp = TextParams(max_new_tokens=6, temperature=1.0, seed=7)
    enc = engine.processor.encode(user(*images, question))
    ids = engine.generate_text([enc], tp)[0]
    want = engine.processor.decode([t for t in ids if t != engine.config.special_tokens.im_end])
    assert engine.understand(images, question, tp) == want and len(want) > 0


def test_edit_equals_generate_images_on_the_same_turn(engine: Engine) -> None:
    src = pil(56, 56, 9)
    params = ImageParams(seed=0, **SAMPLING)
    out = engine.edit(src, "make it red", params, seed=4, assistant_prefix="")
    assert out.seed == 4 and out.params["seed"] == 4
    (ref,) = engine.generate_images([engine.processor.encode(user(src, "make it red"))], params, seeds=[4])
    assert_same_images(out, ref, logits=False)
    assert out.image.tobytes() == ref.image.tobytes()
    # by default the model writes its reply first (``write_replies``) and draws after it
    enc = engine.processor.encode(user(src, "make it red"))
    n = len(enc.input_ids)
    (reply,) = engine.write_replies([enc])
    assert len(enc.input_ids) > n and engine.processor.decode(enc.input_ids[n:]).strip() == reply
    (ref,) = engine.generate_images([enc], params, seeds=[4])
    assert_same_images(engine.edit(src, "make it red", params, seed=4), ref, logits=False)
    # the source image is a model input: another source changes the logits and, at the same seed, the bits.
    # (Argmax bits do not move on the random tiny model: the smallest argmax margin is ~0.13 while another source
    # image moves the logits by ~0.06, so the check is on the logits and on sampled bits.)
    other = pil(56, 56, 10)
    b = engine.edit(other, "make it red", params, seed=4, assistant_prefix="")
    assert not all(torch.equal(x, y) for x, y in zip(out.bits, b.bits, strict=True))
    greedy = ImageParams(cfg_scale=3.0, temperature=0)
    la, lb = (engine.generate_images([engine.processor.encode(user(im, "make it red"))], greedy,
                                     return_tensors=True)[0].logits for im in (src, other))
    for x, y in zip(la, lb, strict=True):
        assert float((x - y).abs().max()) > 1e-2


@pytest.mark.parametrize("aspect", [0.5, 1.0, 2.0, 1.333])
def test_aspect_ratio_sets_the_image_size(engine: Engine, aspect: float) -> None:
    params = ImageParams(aspect_ratio=aspect, seed=0, **SAMPLING)
    (img,) = engine.generate_images(["a tree"], params)
    schedule = engine.schedule(params)
    h, w = schedule[-1]
    assert img.schedule == schedule and img.image.mode == "RGB"
    assert img.image.size == (16 * w, 16 * h)
    assert [b.shape for b in img.bits] == [(hh * ww, engine.config.vae.codebook_dim) for hh, ww in schedule]
    expected = {0.5: (64, 32), 1.0: (64, 64), 2.0: (32, 64), 1.333: (48, 64)}[aspect]
    assert img.image.size == expected


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("make,field", [
    (lambda: ImageParams(top_p=1.5), "top_p"),
    (lambda: ImageParams(cfg_mode="x"), "cfg_mode"),
    (lambda: ImageParams(positions="x"), "positions"),
    (lambda: ImageParams(aspect_ratio=0), "aspect_ratio"),
    (lambda: ImageParams(cfg_scale=-1), "cfg_scale"),
    (lambda: TextParams(temperature=-1), "temperature"),
    (lambda: TextParams(top_p=2), "top_p"),
    (lambda: TextParams(max_new_tokens=-1), "max_new_tokens"),
])
def test_parameter_validation_names_the_field(make, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}="):
        make()
