"""The API's error type and its JSON shape (OpenAI's): ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

__all__ = ["ApiError", "BodyLimit", "error_response", "from_validation_errors", "from_value_error"]


class ApiError(Exception):
    """A request the server refuses (4xx) or cannot serve (5xx)."""

    def __init__(self, status: int, message: str, param: str | None = None, *,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _param(loc) -> str | None:
    """pydantic's error location -> ``messages[0].content[1].image_url.url`` (union branch tags dropped)."""
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif x == "body" and not out or "[" in x or x in ("str", "function-after", "function-before"):
            continue
        else:
            out += ("." if out else "") + x
    return out or None


def from_validation_errors(errors) -> ApiError:
    """pydantic errors -> one 400 naming the most specific (deepest) failing field."""
    if not errors:
        return ApiError(400, "invalid request")
    e = max(errors, key=lambda e: len(e.get("loc", ())))
    if e.get("type") == "json_invalid":
        return ApiError(400, f"malformed JSON body ({e.get('ctx', {}).get('error', 'decode error')})")
    param = _param(e.get("loc", ()))
    return ApiError(400, f"{param or 'request body'}: {e.get('msg', 'invalid')}", param)


def from_value_error(err: ValueError, prefix: str = "") -> ApiError:
    """A ``ValueError`` of the params dataclasses or the engine (``"field=value: expected ..."``) -> 400."""
    m = re.match(r"(\w+)=", str(err))
    return ApiError(400, str(err), prefix + m[1] if m else None)


class BodyLimit:
    """ASGI middleware: 413 with the API's JSON error for bodies over ``max_bytes`` -- at once when the
    Content-Length says so, else as soon as the streamed body passes the limit (raised from ``receive`` into the
    route, whose exception handler renders it). Starlette's own limiter answers in plain text."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def error(self) -> ApiError:
        return ApiError(413, f"the request body is larger than the limit of {self.max_bytes:,} bytes",
                        code="body_too_large")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await error_response(self.error())(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413)
            return message

        await self.app(scope, limited, send)


def error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)
