"""Images in and out of the HTTP API: data URLs, base64 PNGs, ``multipart/form-data`` bodies, pixel limits.

Only data URLs are accepted (``data:image/png;base64,...``): the server never fetches a remote URL. Multipart bodies
are split here with the standard library (RFC 7578; no file is written to disk), so serving needs no
``python-multipart``.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from email.message import Message

from PIL import Image, UnidentifiedImageError

from vargpt.serve.errors import ApiError

__all__ = ["png_b64", "data_url", "decode_data_url", "open_image", "parse_multipart"]

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*);base64,(?P<data>.*)", re.S)


def png_b64(image: Image.Image) -> str:
    """Base64 of the image as PNG (no metadata: equal pixels give equal bytes)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + png_b64(image)


def decode_data_url(url: str, param: str, max_pixels: int) -> Image.Image:
    """``data:image/...;base64,...`` -> RGB image (400 when malformed, unreadable or over ``max_pixels``)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ApiError(400, f"{param}: expected a data URL 'data:image/png;base64,...' (the server fetches no "
                            f"remote URL), got {str(url)[:40]!r}", param)
    m = _DATA_URL.fullmatch(url)
    if m is None:
        raise ApiError(400, f"{param}: malformed data URL (expected 'data:image/<type>;base64,<data>')", param)
    try:
        raw = base64.b64decode(re.sub(r"\s+", "", m["data"]), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{param}: the data URL's base64 payload does not decode ({e})", param) from None
    return open_image(raw, param, max_pixels)


def open_image(raw: bytes, param: str, max_pixels: int) -> Image.Image:
    """Encoded image bytes -> RGB image; the pixel count is checked from the header, before decoding."""
    try:
        img = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError) as e:
        raise ApiError(400, f"{param}: not a readable image ({e})", param) from None
    w, h = img.size
    if w * h > max_pixels:
        raise ApiError(400, f"{param}: the image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}", param,
                       code="image_too_large")
    try:
        img.load()
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise ApiError(400, f"{param}: the image does not decode ({e})", param) from None
    return img.convert("RGB")


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, bytes]]:
    """A ``multipart/form-data`` body -> (text fields, file fields by name: raw bytes). Repeated names keep the
    first value."""
    ctype = Message()
    ctype["content-type"] = content_type
    boundary = ctype.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise ApiError(400, "multipart/form-data without a boundary parameter")
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    # Every delimiter is CRLF "--" boundary; the body's first one has no CRLF before it.
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(chunks) < 2 or not chunks[-1].startswith(b"--"):
        raise ApiError(400, "malformed multipart/form-data body (no closing boundary)")
    for chunk in chunks[1:-1]:
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ApiError(400, "malformed multipart/form-data body (a part without headers)")
        part = Message()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                part[name.strip()] = value.strip()
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise ApiError(400, "malformed multipart/form-data body (a part without a name)")
        if part.get_param("filename", header="content-disposition") is not None:
            files.setdefault(name, data)
        else:
            fields.setdefault(name, data.decode("utf-8", "replace"))
    return fields, files
