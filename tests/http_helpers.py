"""Shared by the HTTP tests (API, openai client, web page): PNG bytes / data URLs of PIL images, and an app served by
uvicorn on a free local port in a background thread."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator

from PIL import Image


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def source_image(w: int = 40, h: int = 30) -> Image.Image:
    """A grey canvas with one red rectangle: the uploaded image of the HTTP tests."""
    img = Image.new("RGB", (w, h), (230, 230, 230))
    img.paste((200, 30, 30), (8, 6, 24, 20))
    return img


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(app, start_timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` (lifespan on) with uvicorn until the block ends; yields ``http://127.0.0.1:PORT``."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
