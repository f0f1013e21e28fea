"""The web page at ``/`` in a real browser: uvicorn serves the app over a tiny random engine on a free port, and
headless Chromium (Debian's ``/usr/bin/chromium``, driven by playwright without its own browser download) chats
about an uploaded image, generates an image with streamed coarse-to-fine previews, and edits an uploaded image.

Marked ``browser``: missing Chromium or playwright FAILS (it does not skip). Install them with
``apt-get update && apt-get install -y chromium chromium-driver`` and ``pip install playwright==1.65.2``;
run only these with ``pytest -m browser``, leave them out with ``pytest -m "not browser"``."""

from __future__ import annotations

import base64
import io
import os

import pytest
import torch
from PIL import Image
from tests.http_helpers import data_url, png_bytes, served, source_image

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("VARGPT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
INSTALL = ("install them with `apt-get update && apt-get install -y chromium chromium-driver` and "
           "`pip install playwright==1.65.2` (or deselect with -m 'not browser')")
KEY = "web-key"
WAIT_MS = 120_000


def decode_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,"), url[:40]
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


@pytest.fixture(scope="module")
def server():
    """``http://127.0.0.1:PORT`` of the app (with an API key) over a tiny random engine, served by uvicorn on a
    background thread."""
    try:
        import uvicorn  # noqa: F401  (served() runs it)
    except ImportError:
        pytest.fail("uvicorn is not installed (pip install -e '.[serve]')")
    from vargpt.config import get_preset
    from vargpt.engine import Engine
    from vargpt.models.vargpt import VARGPT
    from vargpt.processing.processor import Processor
    from vargpt.processing.tokenizer import char_tokenizer
    from vargpt.serve import create_app

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    engine = Engine(VARGPT(cfg).eval(), Processor(cfg, char_tokenizer(cfg.special_tokens, cfg.text.vocab_size)))
    with served(create_app(engine, api_key=KEY, model_id="tiny-web")) as url:
        yield url
    torch.set_num_threads(n_threads)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: {INSTALL}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright for Python is not installed: {INSTALL}")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture()
def page(browser, server):
    ctx = browser.new_context()
    p = ctx.new_page()
    p.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.goto(server + "/")
    assert p.locator("#api-key").is_visible()  # the app has a key: the page asks for it
    p.fill("#api-key", KEY)
    p.fill("#max-tokens", "5")
    p.fill("#seed", "4")
    yield p
    ctx.close()
    assert not errors, errors


def wait_done(page, status_id: str) -> str:
    """Wait for a panel's request to end; fail with the page's message when it ended in an error."""
    page.wait_for_function(
        "id => { const el = document.getElementById(id);"
        " return el.classList.contains('error') || el.textContent.startsWith('done'); }", arg=status_id)
    text = page.text_content(f"#{status_id}")
    assert text.startswith("done"), f"#{status_id}: {text}"
    return text


def upload(page, selector: str, img: Image.Image) -> None:
    page.set_input_files(selector, files=[{"name": "src.png", "mimeType": "image/png", "buffer": png_bytes(img)}])


def natural_size(page, selector: str) -> tuple[int, int]:
    return tuple(page.eval_on_selector(selector, "img => [img.naturalWidth, img.naturalHeight]"))


def test_wrong_key_shows_the_error(page) -> None:
    page.fill("#api-key", "wrong")
    page.fill("#chat-prompt", "hi")
    page.click("#chat-send")
    page.wait_for_selector("#chat-status.error")
    assert "API key" in page.text_content("#chat-status")


def test_chat_about_an_uploaded_image(page, server) -> None:
    import httpx

    upload(page, "#chat-image", source_image())
    page.fill("#chat-prompt", "What is in this picture?")
    page.select_option("#chat-draw", "never")
    page.click("#chat-send")
    wait_done(page, "chat-status")
    answer = page.text_content("#chat-answer")
    # the same request straight to the API (same seed, greedy) gives the same answer
    url = data_url(source_image())
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "draw": "never", "max_tokens": 5, "seed": 4}
    r = httpx.post(server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=WAIT_MS / 1000)
    assert r.status_code == 200, r.text
    assert answer == r.json()["choices"][0]["message"]["content"] and answer.strip()


def test_generate_shows_previews_then_the_image(page) -> None:
    # record how many previews had arrived when the final image appeared
    page.evaluate("""() => new MutationObserver(() => {
        if (document.getElementById('gen-image').getAttribute('src'))
            window.previewsBeforeFinal ??= document.querySelectorAll('#gen-previews img').length;
    }).observe(document.getElementById('gen-image'), {attributes: true, attributeFilter: ['src']})""")
    page.fill("#gen-prompt", "Draw a red circle.")
    page.click("#gen-send")
    wait_done(page, "gen-status")
    thumbs = page.locator("#gen-previews img")
    n = thumbs.count()
    assert n >= 1
    scales = [int(thumbs.nth(i).get_attribute("data-scale")) for i in range(n)]
    assert scales == list(range(1, n + 1))
    assert page.evaluate("window.previewsBeforeFinal") == n  # every preview came before the image
    assert page.locator("#gen-image").is_visible()
    src = page.get_attribute("#gen-image", "src")
    w, h = natural_size(page, "#gen-image")
    assert w > 0 and h > 0 and decode_url(src).size == (w, h)
    assert decode_url(thumbs.nth(n - 1).get_attribute("src")).size == (w, h)


def test_edit_an_uploaded_image(page) -> None:
    upload(page, "#edit-image", source_image(40, 30))
    page.fill("#edit-prompt", "Make it blue.")
    page.click("#edit-send")
    wait_done(page, "edit-status")
    assert page.locator("#edit-result").is_visible()
    src = page.get_attribute("#edit-result", "src")
    w, h = natural_size(page, "#edit-result")
    assert w > 0 and h > 0 and decode_url(src).size == (w, h)
    assert w > h  # the source's aspect ratio (40 x 30) is kept
