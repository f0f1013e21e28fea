"""The web page at ``/``: served as HTML without a key, with the element ids the browser test
(tests/e2e/test_web.py) drives, and the API-key field switched on only when the app has a key."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from vargpt.serve import create_app  # noqa: E402

# the ids tests/e2e/test_web.py uses
IDS = ["api-key", "key-box", "max-tokens", "seed",
       "chat-image", "chat-prompt", "chat-draw", "chat-send", "chat-status", "chat-answer", "chat-images",
       "gen-prompt", "gen-send", "gen-status", "gen-previews", "gen-preview", "gen-image", "gen-text",
       "edit-image", "edit-prompt", "edit-send", "edit-status", "edit-result"]


class _NoEngine:
    """``create_app`` only hands the engine to the worker; the page needs no model."""


@pytest.mark.parametrize("api_key", [None, "k"])
def test_index_page(api_key) -> None:
    with TestClient(create_app(_NoEngine(), api_key=api_key)) as c:
        r = c.get("/")  # no key needed for the page itself
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert set(IDS) <= set(ids), set(IDS) - set(ids)
    assert f'data-needs-key="{"true" if api_key else "false"}"' in html and "__NEEDS_KEY__" not in html
    # it talks to the app's own routes and loads nothing from elsewhere
    for route in ("/v1/chat/completions", "/v1/images/edits", "image_preview", '"first"'):
        assert route in html
    assert not re.search(r'(src|href)="(https?:)?//', html) and "import(" not in html
