"""The official ``openai`` Python client against the HTTP API, served by uvicorn on a free port over a tiny random
engine: the README's client snippet runs as written (only the port changed), and the same client calls give the
engine's own answers (greedy chat text; same seed -> the same PNG bytes, image i seeded with seed + i)."""

from __future__ import annotations

import base64
import contextlib
import io
import re
from pathlib import Path

import openai  # the test extra installs it: a missing client is a failure, not a skip
import pytest
import torch
from PIL import Image

from tests.http_helpers import data_url, png_bytes, served, source_image
from vargpt.config import get_preset
from vargpt.engine import Engine
from vargpt.generation.params import ImageParams, TextParams
from vargpt.models.vargpt import VARGPT
from vargpt.processing.processor import Processor
from vargpt.processing.tokenizer import char_tokenizer
from vargpt.serve import create_app
from vargpt.serve.media import png_b64
from vargpt.serve.schemas import message_content

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[2] / "README.md"
README_URL = "http://127.0.0.1:8000/v1"
MODEL_ID = "my-checkpoint"  # what `vargpt serve` lists: the checkpoint directory's name
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def readme_client_snippet() -> str:
    """The README's python block that uses the ``openai`` client."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    (snippet,) = [b for b in blocks if "from openai import OpenAI" in b]
    assert README_URL in snippet
    return snippet


@pytest.fixture(scope="module")
def engine() -> Engine:
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    return Engine(VARGPT(cfg).eval(), Processor(cfg, char_tokenizer(cfg.special_tokens, cfg.text.vocab_size)))


@pytest.fixture(scope="module")
def base_url(engine) -> str:
    """``http://127.0.0.1:PORT/v1`` of the app (no API key, like ``vargpt serve`` without ``--api-key``), served by
    uvicorn on a background thread."""
    with served(create_app(engine, model_id=MODEL_ID)) as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def engine_chat(engine, img: Image.Image, question: str, max_tokens: int, seed: int):
    """What the server's engine answers for the README's chat request (greedy text; image options default to the
    request's seed)."""
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": question}]}]
    return engine.chat(messages, TextParams(max_new_tokens=max_tokens, seed=seed), ImageParams(seed=seed))


def test_readme_snippet_runs_as_written(base_url, engine, tmp_path, monkeypatch, capsys) -> None:
    code = readme_client_snippet().replace(README_URL, base_url)
    photo = source_image()
    (tmp_path / "photo.png").write_bytes(png_bytes(photo))
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, str(README) + ":openai-snippet", "exec"), ns)
    assert ns["model"] == MODEL_ID
    # the printed answer is the engine's own (greedy, max_tokens=64, seed=1)
    direct = engine_chat(engine, photo, "What is in the picture?", 64, 1)
    assert not direct.images  # a plain string answer
    assert capsys.readouterr().out == f"{direct.text}\n"
    # circle.png: the first of n=2 images drawn with seed 1
    first, _ = engine.generate_images(["a red circle"] * 2, ImageParams(seed=1))
    saved = (tmp_path / "circle.png").read_bytes()
    assert saved.startswith(PNG_MAGIC) and saved == base64.b64decode(png_b64(first.image))


def test_models_list(client) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID] and models.data[0].object == "model"


def test_chat_equals_the_engine(client, engine) -> None:
    photo = source_image(48, 32)
    kw = dict(
        model=MODEL_ID,
        max_tokens=16,
        seed=3,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(photo)}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    )
    resp = client.chat.completions.create(**kw)
    direct = engine_chat(engine, photo, "What is this?", 16, 3)
    content = resp.choices[0].message.content
    assert isinstance(content, str) and content == message_content(direct) == direct.text
    assert resp.object == "chat.completion" and resp.model == MODEL_ID
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].finish_reason == direct.finish_reason
    assert resp.usage.completion_tokens == len(direct.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert client.chat.completions.create(**kw).choices[0].message.content == content


def test_images_generate(client, engine) -> None:
    kw = dict(model=MODEL_ID, prompt="a red circle", n=2, response_format="b64_json")
    out = client.images.generate(**kw, extra_body={"seed": 7})
    assert len(out.data) == 2 and isinstance(out.created, int)
    raw = [base64.b64decode(d.b64_json) for d in out.data]
    direct = engine.generate_images(["a red circle"] * 2, ImageParams(seed=7))
    for d, b, g in zip(out.data, raw, direct, strict=True):
        assert b.startswith(PNG_MAGIC)
        with contextlib.closing(Image.open(io.BytesIO(b))) as img:
            assert img.format == "PNG" and img.size == g.image.size
        assert d.b64_json == png_b64(g.image)
    assert out.size == "{}x{}".format(*direct[0].image.size)
    assert [d.model_extra.get("seed") for d in out.data] == [7, 8]  # vargpt's extra field: image i uses seed + i
    assert raw[0] != raw[1]  # different seeds, different images
    again = client.images.generate(**kw, extra_body={"seed": 7})
    assert [base64.b64decode(d.b64_json) for d in again.data] == raw  # same seed, the same bytes
