"""OpenAI-style HTTP API over an ``Engine`` (FastAPI): parse, queue the engine call, serialise -- nothing else.

Routes (those under ``/v1`` need ``Authorization: Bearer KEY`` when the app has an ``api_key``):

``POST /v1/chat/completions``
    OpenAI chat completion. ``messages[].content``: a string or parts ``{"type": "text", "text"}`` /
    ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` (an image in a user or system turn
    is an input to understand; in an assistant turn, an image the assistant drew). ``max_tokens`` (or
    ``max_completion_tokens``), ``temperature`` (default 0: greedy), ``top_p``, ``seed``; extras ``draw``
    (auto | first | never), ``max_images``, ``image`` (``ImageOptions``: cfg_scale, temperature, top_k, top_p,
    aspect_ratio | size, seed -- default: the request's seed; the k-th image of the answer uses seed + k).
    Answer: ``choices[0].message.content`` is a string, or, when the model drew, a list of parts
    ``{"type": "text", "text"}`` and ``{"type": "image_url", "image_url": {"url": data URL}, "seed"}``; plus
    ``usage`` and ``seed``. With ``"stream": true``: server-sent events ``data: {chat.completion.chunk}``:
    first ``delta: {"role": "assistant", "content": ""}``, then ``delta: {"content": "text"}`` per text piece,
    ``delta: {"image_preview": {"index": i, "scale": k, "of": n, "url": data URL}}`` after scale k = 1..n of
    image i (unless ``"previews": false``), ``delta: {"content": [image_url part]}`` per finished image, a last
    chunk with ``finish_reason`` and ``usage``, then ``data: [DONE]``. An error after the stream started arrives
    as ``data: {"error": {...}}`` before ``[DONE]``.
``POST /v1/images/generations``
    ``prompt``, ``n``, ``size`` "WxH" or ``aspect_ratio`` (h / w; the nearest of the 15 templates is drawn at the
    model's pixel budget), ``seed`` (image i uses seed + i; random when absent), ``cfg_scale``, ``temperature``,
    ``top_k``, ``top_p`` (absent: the checkpoint's defaults, ``Engine.sampling``), ``response_format``
    "b64_json" -> ``{"created", "size", "output_format": "png", "data": [{"b64_json", "seed"}]}``. Concurrent
    requests with equal parameters (the seed aside) are batched.
``POST /v1/images/edits``
    ``multipart/form-data`` with an ``image`` file and the same fields as form fields, or JSON with ``image`` as
    a data URL; same answer. Without size/aspect_ratio the source image's aspect ratio is kept.
``GET /v1/models`` (the one loaded model) and ``GET /health`` (no key needed).
``GET /``
    A small web page (``serve/static/index.html``, no key needed to load it) over the routes above: chat with an
    image upload, streamed generation with the coarse-to-fine previews, and editing an uploaded image. It shows an
    API-key field when the app has a key.

Errors: ``{"error": {"message", "type", "param", "code"}}`` with 400 (invalid values, limits), 401 (key),
413 (body size), 503 (queue full). Every model call runs on one worker thread (``serve.queue``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import queue
import secrets
import threading
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vargpt.engine import Done, ImageDone, ImagePreview, TextDelta
from vargpt.serve.errors import ApiError, BodyLimit, error_response, from_validation_errors, from_value_error
from vargpt.serve.media import data_url, decode_data_url, open_image, parse_multipart
from vargpt.serve.queue import EngineWorker
from vargpt.serve.schemas import (
    ChatRequest,
    EditRequest,
    GenerationRequest,
    ImageOptions,
    Limits,
    engine_messages,
    image_params,
    image_part,
    images_body,
    message_content,
    new_seed,
    text_params,
    usage,
)

__all__ = ["create_app", "Limits"]

log = logging.getLogger(__name__)

DEFAULT_LIMITS = Limits()


class _ClientGone(Exception):
    pass


def web_page(needs_key: bool) -> str:
    """The web page served at ``/`` (``static/index.html``, shipped as package data)."""
    html = importlib.resources.files("vargpt.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return html.replace("__NEEDS_KEY__", "true" if needs_key else "false")


# ----------------------------------------------------------------------------------------------------- app
def create_app(engine, *, api_key: str | None = None, limits: Limits = DEFAULT_LIMITS,
               model_id: str = "vargpt") -> FastAPI:
    """The API over ``engine`` (see the module docstring). ``model_id`` is what ``/v1/models`` lists."""
    worker = EngineWorker(engine, max_batch=limits.max_batch, batch_window_s=limits.batch_window_s,
                          max_queue=limits.max_queue)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(worker.close, 60)

    app = FastAPI(title="vargpt", summary="VARGPT-v1.1 over an OpenAI-style API", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.state.worker, app.state.limits, app.state.model_id = worker, limits, model_id

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return error_response(from_validation_errors(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 413:
            return error_response(BodyLimit(None, limits.max_body_bytes).error())
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(err.status_code, str(err.detail), type=kind))

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception):  # logged by Starlette's ServerErrorMiddleware
        return error_response(ApiError(500, f"internal error ({type(err).__name__})", type="server_error"))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    def submit(method, *args):
        try:
            return method(*args)
        except queue.Full:
            raise ApiError(503, f"the server is busy ({limits.max_queue} requests waiting); retry later",
                           type="server_busy") from None

    async def on_worker(method, *args):
        fut = submit(method, *args)
        try:
            return await asyncio.wrap_future(fut)
        except ValueError as e:
            raise from_value_error(e) from None

    def check_n(n: int) -> None:
        if n > limits.max_n:
            raise ApiError(400, f"n={n}: the limit is {limits.max_n} images per request", "n")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    page = web_page(api_key is not None)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "queued": worker.pending}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": started,
                                            "owned_by": "vargpt"}]}

    @v1.post("/images/generations")
    async def images_generations(req: GenerationRequest):
        check_n(req.n)
        seed = req.seed if req.seed is not None else new_seed()
        params = image_params(req, limits, seed=seed)
        images = await on_worker(worker.submit_generate, [req.prompt] * req.n, params,
                                 [seed + i for i in range(req.n)])
        return await run_in_threadpool(images_body, images)

    edit_schema = EditRequest.model_json_schema()
    edit_form = {**edit_schema, "required": ["image", "prompt"],
                 "properties": {**edit_schema["properties"], "image": {"type": "string", "format": "binary"}}}

    @v1.post("/images/edits", openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": edit_form}, "application/json": {"schema": edit_schema}}}})
    async def images_edits(request: Request):
        ctype = request.headers.get("content-type", "")
        mime = ctype.split(";")[0].strip().lower()
        body = await request.body()
        try:
            if mime == "multipart/form-data":
                fields, files = parse_multipart(body, ctype)
                if "mask" in files or "mask" in fields:
                    raise ApiError(400, "mask: masked edits are not supported (the instruction edits the whole "
                                        "image)", "mask")
                raw = files.get("image", files.get("image[]"))
                req = EditRequest.model_validate(fields)
                if raw is None and req.image is None:
                    raise ApiError(400, "image: a file field 'image' (or a data URL) is required", "image")

                def load():
                    if raw is None:
                        return decode_data_url(req.image, "image", limits.max_image_pixels)
                    return open_image(raw, "image", limits.max_image_pixels)
            elif mime in ("application/json", ""):
                req = EditRequest.model_validate_json(body)
                if req.image is None:
                    raise ApiError(400, "image: a data URL is required (or send multipart/form-data)", "image")

                def load():
                    return decode_data_url(req.image, "image", limits.max_image_pixels)
            else:
                raise ApiError(415, f"content-type {mime!r}: expected multipart/form-data or application/json")
        except ValidationError as e:
            raise from_validation_errors(e.errors()) from None
        check_n(req.n)
        image = await run_in_threadpool(load)
        seed = req.seed if req.seed is not None else new_seed()
        params = image_params(req, limits, seed=seed, default_aspect=image.height / image.width)
        seeds = [seed + i for i in range(req.n)]
        images = await on_worker(worker.submit, lambda e: [e.edit(image, req.prompt, params, seed=s) for s in seeds])
        return await run_in_threadpool(images_body, images)

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatRequest):
        messages = await run_in_threadpool(engine_messages, req.messages, limits.max_image_pixels)
        seed = req.seed if req.seed is not None else new_seed()
        tp = text_params(req, limits, seed=seed)
        opts = req.image or ImageOptions()
        ip = image_params(opts, limits, seed=opts.seed if opts.seed is not None else seed, prefix="image.")
        max_images = limits.max_images_per_turn if req.max_images is None else req.max_images
        if max_images > limits.max_images_per_turn:
            raise ApiError(400, f"max_images={max_images}: the limit is {limits.max_images_per_turn}", "max_images")
        head = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": model_id}
        kw = dict(draw=req.draw, max_images=max_images)
        if req.stream:
            return await _stream(messages, tp, ip, kw, req.previews, head, seed)

        def job(e):
            return len(e.processor.encode(messages).input_ids), e.chat(messages, tp, ip, **kw)

        n_prompt, result = await on_worker(worker.submit, job)
        content = await run_in_threadpool(message_content, result)
        return {**head, "object": "chat.completion", "seed": seed,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": result.finish_reason}],
                "usage": usage(n_prompt, result)}

    async def _stream(messages, tp, ip, kw, previews, head, seed):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()  # the client left: the worker stops at the next event

        def put(item) -> None:
            if gone.is_set():
                raise _ClientGone
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is closed
                gone.set()
                raise _ClientGone from None

        def job(e) -> None:
            try:
                n_prompt = len(e.processor.encode(messages).input_ids)
                stream = e.stream(messages, tp, ip, previews=previews, **kw)
                try:
                    for i, ev in enumerate(stream):
                        if i == 0:  # the engine accepted the request: the response can start (200)
                            put(("start", n_prompt))
                        put(("event", ev))
                finally:
                    stream.close()
            except _ClientGone:
                pass
            except Exception as err:  # noqa: BLE001 -- reported to the client
                if not isinstance(err, ValueError):
                    log.exception("chat stream failed")
                with contextlib.suppress(_ClientGone):
                    put(("error", err))

        fut = submit(worker.submit, job)
        kind, first = await events.get()
        if kind == "error":
            gone.set()
            if isinstance(first, ValueError):
                raise from_value_error(first)
            raise first

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            obj = {**head, "object": "chat.completion.chunk", "seed": seed,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(obj)}\n\n"

        async def sse():
            n_images = 0
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, ev = await events.get()
                    if kind == "error":
                        err = from_value_error(ev) if isinstance(ev, ValueError) else ApiError(
                            500, "internal error while generating", type="server_error")
                        yield f"data: {json.dumps(err.body())}\n\n"
                        break
                    if isinstance(ev, TextDelta):
                        yield chunk({"content": ev.text})
                    elif isinstance(ev, ImagePreview):
                        url = await run_in_threadpool(data_url, ev.image)
                        yield chunk({"image_preview": {"index": n_images, "scale": ev.scale_index + 1,
                                                       "of": ev.num_scales, "url": url}})
                    elif isinstance(ev, ImageDone):
                        yield chunk({"content": [await run_in_threadpool(image_part, ev.image)]})
                        n_images += 1
                    elif isinstance(ev, Done):
                        yield chunk({}, ev.result.finish_reason, usage=usage(first, ev.result))
                        break
                yield "data: [DONE]\n\n"
            finally:
                gone.set()
                fut.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.include_router(v1)
    return app
