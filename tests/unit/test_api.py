"""HTTP API (serve/) over a tiny random engine: every route's happy path against direct engine calls (same seed ->
same pixels), chat streaming (text deltas, one preview per scale, the final image, [DONE]), limits and bad input as
4xx JSON errors, the API key, request batching on the worker, and the ``vargpt serve`` command."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from tests.http_helpers import data_url, png_bytes, source_image  # noqa: E402
from vargpt.config import get_preset  # noqa: E402
from vargpt.engine import Engine  # noqa: E402
from vargpt.generation.params import ImageParams, TextParams  # noqa: E402
from vargpt.models.vargpt import VARGPT  # noqa: E402
from vargpt.processing.processor import Processor  # noqa: E402
from vargpt.processing.tokenizer import char_tokenizer  # noqa: E402
from vargpt.serve import Limits, create_app  # noqa: E402
from vargpt.serve.media import png_b64  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine() -> Engine:
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    return Engine(VARGPT(cfg).eval(), Processor(cfg, char_tokenizer(cfg.special_tokens, cfg.text.vocab_size)))


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, api_key=KEY, model_id="tiny-test"), headers=AUTH) as c:
        yield c


@pytest.fixture(scope="module")
def strict(engine):
    """An app with small limits."""
    limits = Limits(max_body_bytes=4096, max_image_pixels=32 * 32, max_tokens=8, max_n=2)
    with TestClient(create_app(engine, limits=limits)) as c:
        yield c


def decode_b64(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def decode_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return decode_b64(url.split(",", 1)[1])


def assert_error(r, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def sse_events(lines) -> list:
    """``data: ...`` payloads of a server-sent event stream (JSON decoded, "[DONE]" kept as a string)."""
    out = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# -------------------------------------------------------------------------------------------------- routes
def test_health_and_models(client) -> None:
    r = TestClient(client.app).get("/health")  # no key needed
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == "tiny-test"
    r = client.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["tiny-test"] and r.json()["object"] == "list"


def test_generations_equal_the_engine(client, engine) -> None:
    body = {"prompt": "a red circle", "n": 2, "seed": 5, "size": "768x1024", "cfg_scale": 2.0, "temperature": 0.8,
            "top_p": 0.9, "model": "ignored", "user": "ignored"}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["output_format"] == "png" and isinstance(out["created"], int)
    assert [d["seed"] for d in out["data"]] == [5, 6]
    direct = engine.generate_images(["a red circle"] * 2, ImageParams(seed=5, aspect_ratio=1024 / 768, cfg_scale=2.0,
                                                                      temperature=0.8, top_p=0.9))
    for d, g in zip(out["data"], direct, strict=True):
        img = decode_b64(d["b64_json"])
        assert img.size == g.image.size and out["size"] == "{}x{}".format(*img.size)
        assert img.height > img.width  # 3:4 portrait template
        assert d["b64_json"] == png_b64(g.image)  # same seed -> the same bytes
    # no seed: a fresh one, returned so that the image can be reproduced
    r = client.post("/v1/images/generations", json={"prompt": "a red circle"})
    (d,) = r.json()["data"]
    (g,) = engine.generate_images(["a red circle"], ImageParams(seed=d["seed"]))
    assert d["b64_json"] == png_b64(g.image)


def test_edits_multipart_and_json(client, engine) -> None:
    src = source_image(40, 30)
    direct = [engine.edit(src, "make it blue", ImageParams(seed=s, aspect_ratio=30 / 40), seed=s) for s in (3, 4)]
    r = client.post("/v1/images/edits", files={"image": ("src.png", png_bytes(src), "image/png")},
                    data={"prompt": "make it blue", "seed": "3", "n": "2"})
    assert r.status_code == 200, r.text
    assert [d["seed"] for d in r.json()["data"]] == [3, 4]
    assert [d["b64_json"] for d in r.json()["data"]] == [png_b64(g.image) for g in direct]
    assert decode_b64(r.json()["data"][0]["b64_json"]).width > decode_b64(r.json()["data"][0]["b64_json"]).height
    r = client.post("/v1/images/edits", json={"image": data_url(src), "prompt": "make it blue", "seed": 3})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["b64_json"] == png_b64(direct[0].image)
    # multipart with the image as a data-URL text field
    r = client.post("/v1/images/edits", files={"note": ("n.txt", b"")},
                    data={"image": data_url(src), "prompt": "make it blue", "seed": "3"})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["b64_json"] == png_b64(direct[0].image)
    # an explicit size overrides the source's aspect ratio
    r = client.post("/v1/images/edits", json={"image": data_url(src), "prompt": "x", "seed": 3, "size": "512x512"})
    assert r.json()["size"].split("x")[0] == r.json()["size"].split("x")[1]


def test_chat_matches_engine_chat(client, engine) -> None:
    src = source_image(40, 30)
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Redraw this:"},
                                                      {"type": "image_url", "image_url": {"url": data_url(src)}}]}],
            "max_tokens": 4, "seed": 1, "draw": "first", "image": {"cfg_scale": 2.0, "seed": 9}}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "Redraw this:"}, {"type": "image", "image": src}]}]
    direct = engine.chat(messages, TextParams(max_new_tokens=4, seed=1), ImageParams(cfg_scale=2.0, seed=9),
                         draw="first")
    choice = out["choices"][0]
    assert out["object"] == "chat.completion" and out["model"] == "tiny-test" and out["seed"] == 1
    assert choice["finish_reason"] == direct.finish_reason and choice["message"]["role"] == "assistant"
    parts = choice["message"]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["seed"] == 9
    assert parts[0]["image_url"]["url"] == "data:image/png;base64," + png_b64(direct.images[0].image)
    assert "".join(p["text"] for p in parts if p["type"] == "text") == direct.text.replace("<image>", "")
    u = out["usage"]
    assert u["completion_tokens"] == len(direct.token_ids) and u["total_tokens"] == u["prompt_tokens"] + len(
        direct.token_ids) and u["prompt_tokens"] > 0
    # without a drawing the content is a plain string; an assistant image in the history is accepted
    body = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": parts[0][
                             "image_url"]["url"]}}]},
                         {"role": "user", "content": "and now?"}], "max_tokens": 3, "seed": 2, "draw": "never"}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert isinstance(content, str)
    hist = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "image_gen", "image": decode_url(parts[0]["image_url"]["url"]).convert("RGB")}]},
        {"role": "user", "content": "and now?"}]
    assert content == engine.chat(hist, TextParams(max_new_tokens=3, seed=2), draw="never").text


def test_chat_stream_text_previews_image_done(client, engine) -> None:
    body = {"messages": [{"role": "user", "content": "Draw a red circle."}], "max_tokens": 5, "seed": 4,
            "draw": "first", "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    direct = engine.chat([{"role": "user", "content": "Draw a red circle."}], TextParams(max_new_tokens=5, seed=4),
                         ImageParams(seed=4), draw="first")
    n_scales = len(direct.images[0].schedule)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and len({c["id"] for c in chunks}) == 1 for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    previews = [d["image_preview"] for d in deltas if "image_preview" in d]
    assert [(p["index"], p["scale"], p["of"]) for p in previews] == [(0, k, n_scales) for k in range(1, n_scales + 1)]
    sizes = {decode_url(p["url"]).size for p in previews}
    assert sizes == {direct.images[0].image.size}
    images = [d["content"][0] for d in deltas if isinstance(d.get("content"), list)]
    assert len(images) == 1 and images[0]["type"] == "image_url" and images[0]["seed"] == 4
    final = np.asarray(decode_url(images[0]["image_url"]["url"]))
    assert np.array_equal(final, np.asarray(direct.images[0].image))
    # the last preview is the finished image
    assert np.abs(np.asarray(decode_url(previews[-1]["url"]), dtype=np.int16) - final).max() <= 1
    # order: previews, then the image, then text
    kinds = ["preview" if "image_preview" in d else "image" if isinstance(d.get("content"), list) else "text"
             for d in deltas[1:-1]]
    assert kinds == ["preview"] * n_scales + ["image"] + ["text"] * (len(kinds) - n_scales - 1)
    text = "".join(d["content"] for d in deltas[1:-1] if isinstance(d.get("content"), str))
    assert kinds.count("text") >= 1 and text == direct.text.replace("<image>", "")
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == direct.finish_reason and deltas[-1] == {}
    assert last["usage"]["completion_tokens"] == len(direct.token_ids)


# -------------------------------------------------------------------------------------------- limits, errors
def test_limits(client, strict) -> None:
    assert_error(client.post("/v1/images/generations", json={"prompt": "x", "n": 5}), 400, "n")
    assert_error(strict.post("/v1/images/generations", json={"prompt": "x", "n": 3}), 400, "n")
    assert_error(strict.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                           "max_tokens": 9}), 400, "max_tokens")
    assert_error(strict.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                           "max_images": 5}), 400, "max_images")
    big = data_url(Image.new("RGB", (40, 40)))  # 1,600 pixels > 32 * 32, but a small body
    assert_error(strict.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": big}}]}]}), 400, "messages[0].content[0].image_url.url",
        "image_too_large")
    assert_error(strict.post("/v1/images/edits", files={"image": ("a.png", png_bytes(Image.new("RGB", (40, 40))))},
                             data={"prompt": "x"}), 400, "image", "image_too_large")
    # the default limit (4096 x 4096) is checked from the header, before decoding
    huge = data_url(Image.new("RGB", (4097, 4096)))
    assert_error(client.post("/v1/images/edits", json={"prompt": "x", "image": huge}), 400, "image", "image_too_large")
    # body size: declared (Content-Length) and streamed (chunked)
    body = json.dumps({"prompt": "x" * 5000}).encode()
    assert_error(strict.post("/v1/images/generations", content=body, headers={"content-type": "application/json"}),
                 413, code="body_too_large")
    assert_error(strict.post("/v1/images/generations", content=iter([body[:3000], body[3000:]]),
                             headers={"content-type": "application/json"}), 413, code="body_too_large")
    assert_error(strict.post("/v1/images/edits", files={"image": ("a.png", b"\0" * 5000)}, data={"prompt": "x"}), 413)


@pytest.mark.parametrize("url, what", [
    ("https://example.com/cat.png", "data URL"),
    ("data:image/png;base64", "malformed"),
    ("data:image/png;base64,@@not base64@@", "base64"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "not a readable image"),
])
def test_bad_image_urls(client, url, what) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    err = assert_error(r, 400, "messages[0].content[1].image_url.url")
    assert what in err["message"]
    assert_error(client.post("/v1/images/edits", json={"prompt": "x", "image": url}), 400, "image")


def test_bad_requests(client) -> None:
    gen = "/v1/images/generations"
    for size in ("10x1000", "1000x10", "big", "0x512"):
        assert_error(client.post(gen, json={"prompt": "x", "size": size}), 400, "size")
    assert_error(client.post(gen, json={"prompt": "x", "aspect_ratio": 8.0}), 400, "aspect_ratio", "unsupported_size")
    assert_error(client.post(gen, json={"prompt": "x", "size": "512x512", "aspect_ratio": 1.0}), 400, "size")
    assert_error(client.post(gen, json={"prompt": "x", "temperature": -1}), 400, "temperature")
    assert_error(client.post(gen, json={"prompt": "x", "response_format": "url"}), 400, "response_format")
    assert_error(client.post(gen, json={"n": 1}), 400, "prompt")
    assert_error(client.post(gen, content=b"{not json", headers={"content-type": "application/json"}), 400)
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "x"}]
    assert_error(client.post(chat, json={"messages": msgs, "image": {"cfg": 2}}), 400, "image.cfg")
    assert_error(client.post(chat, json={"messages": msgs, "image": {"top_p": 2}}), 400, "image.top_p")
    assert_error(client.post(chat, json={"messages": msgs, "draw": "always"}), 400, "draw")
    assert_error(client.post(chat, json={"messages": [{"role": "user", "content": [{"type": "video"}]}]}), 400,
                 "messages[0].content[0]")
    assert_error(client.post(chat, json={"messages": []}), 400, "messages")
    # refused by the engine on the worker (draw="first" needs an image): 400 before any stream starts
    for stream in (False, True):
        assert_error(client.post(chat, json={"messages": msgs, "draw": "first", "max_images": 0, "stream": stream}),
                     400, "max_images")
    assert_error(client.post("/v1/images/edits", files={"image": ("a.png", b"x")}, data={"prompt": "x"}), 400,
                 "image")
    assert_error(client.post("/v1/images/edits", files={"other": ("a.png", b"x")}, data={"prompt": "x"}), 400,
                 "image")
    assert_error(client.post("/v1/images/edits", files={"mask": ("m.png", b"x")}, data={"prompt": "x"}), 400)
    assert_error(client.post("/v1/images/edits", content=b"x", headers={"content-type": "text/plain"}), 415)
    assert_error(client.get("/v1/nothing"), 404)


def test_api_key(client) -> None:
    anon = TestClient(client.app)
    err = assert_error(anon.get("/v1/models"), 401, code="invalid_api_key")
    assert err["type"] == "authentication_error"
    assert anon.get("/v1/models").headers["www-authenticate"] == "Bearer"
    assert_error(anon.post("/v1/images/generations", json={"prompt": "x"}), 401)
    assert_error(anon.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(anon.get("/v1/models", headers={"Authorization": KEY}), 401)
    assert anon.get("/v1/models", headers=AUTH).status_code == 200
    assert anon.get("/health").status_code == 200


# ------------------------------------------------------------------------------------------------- worker
class CountingEngine:
    """Forwards to an engine and records the batch size of every ``generate_images`` call."""

    def __init__(self, engine, gate: threading.Event | None = None) -> None:
        self._engine, self.calls, self.gate, self.entered = engine, [], gate, threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate_images(self, prompts, params=None, **kw):
        self.calls.append(len(prompts))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        return self._engine.generate_images(prompts, params, **kw)


def test_concurrent_generations_share_one_engine_call(engine) -> None:
    counting = CountingEngine(engine)
    app = create_app(counting, limits=Limits(max_batch=2, batch_window_s=0.5))
    bodies = [{"prompt": "a red circle", "seed": 11}, {"prompt": "a blue square, large", "seed": 12},
              {"prompt": "a red circle", "seed": 11, "cfg_scale": 1.5}]
    with TestClient(app) as c, ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda b: c.post("/v1/images/generations", json=b), bodies))
    # the first two differ only in prompt and seed: one batched call; the third (another cfg_scale) runs alone
    assert sorted(counting.calls) == [1, 2]
    for body, r in zip(bodies, responses, strict=True):
        assert r.status_code == 200, r.text
        (d,) = r.json()["data"]
        assert d["seed"] == body["seed"]
        (alone,) = engine.generate_images([body["prompt"]], ImageParams(seed=body["seed"],
                                                                        cfg_scale=body.get("cfg_scale", 3.0)))
        # batched == alone up to 1/255 (the VAE decodes a batch in float)
        got = np.asarray(decode_b64(d["b64_json"]), dtype=np.int16)
        assert np.abs(got - np.asarray(alone.image, dtype=np.int16)).max() <= 1


def test_full_queue_is_503_and_errors_are_json(engine) -> None:
    gate = threading.Event()
    counting = CountingEngine(engine, gate)
    app = create_app(counting, limits=Limits(max_queue=1, batch_window_s=0))
    worker = app.state.worker
    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.post, "/v1/images/generations", json={"prompt": "a", "seed": 1})
        assert counting.entered.wait(30)  # the worker is busy with the first request
        second = pool.submit(c.post, "/v1/images/generations", json={"prompt": "b", "seed": 2, "cfg_scale": 1.0})
        deadline = time.monotonic() + 30
        while worker.pending < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert_error(c.post("/v1/images/generations", json={"prompt": "c"}), 503)
        gate.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert counting.calls == [1, 1]

    class Broken:
        def generate_images(self, *a, **k):
            raise RuntimeError("boom")

    with TestClient(create_app(Broken()), raise_server_exceptions=False) as c:
        err = assert_error(c.post("/v1/images/generations", json={"prompt": "x"}), 500)
        assert err["type"] == "server_error"


def test_worker_skips_cancelled_requests_and_keeps_order() -> None:
    from vargpt.serve.queue import EngineWorker

    gate, ran = threading.Event(), []
    worker = EngineWorker(object(), batch_window_s=0)
    try:
        first = worker.submit(lambda e: gate.wait(30) and ran.append("first"))
        second = worker.submit(lambda e: ran.append("second"))
        third = worker.submit(lambda e: ran.append("third") or 3)
        assert second.cancel()  # still queued: never runs
        gate.set()
        assert third.result(30) == 3 and first.result(30) is None and ran == ["first", "third"]
        with pytest.raises(ZeroDivisionError):
            worker.submit(lambda e: 1 / 0).result(30)
    finally:
        worker.close(30)
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(lambda e: None)


# ------------------------------------------------------------------------------------------------------ CLI
def test_serve_command(tmp_path, monkeypatch) -> None:
    uvicorn = pytest.importorskip("uvicorn")
    from typer.testing import CliRunner

    from vargpt.checkpoint import save_checkpoint
    from vargpt.cli import app as cli

    ckpt = tmp_path / "my-model"
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = VARGPT(cfg).eval()
    save_checkpoint(model, ckpt)
    Processor(cfg, char_tokenizer(cfg.special_tokens, cfg.text.vocab_size)).save(ckpt)
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port: served.update(app=app, host=host, port=port))
    r = CliRunner().invoke(cli, ["serve", "--checkpoint", str(ckpt), "--port", "8123", "--api-key", "k"])
    assert r.exit_code == 0, r.output
    assert served["host"] == "127.0.0.1" and served["port"] == 8123
    with TestClient(served["app"]) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k"}).json()["data"][0]["id"] == "my-model"
        r = c.post("/v1/images/generations", json={"prompt": "x", "seed": 1}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200, r.text
    r = CliRunner().invoke(cli, ["serve", "--checkpoint", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "does not exist" in r.output
