"""The ASGI application: the three dialects' routes behind the safety layers.

From the outside in: one log line per request (method, path, model, tokens, tok/s, status,
time; never the prompt), CORS (localhost origins unless told otherwise), a cap on request
bodies (413), the API key (401), then the routes. Every error is JSON in the shape of the
dialect the path belongs to: /v1/messages Anthropic's, other /v1/ paths OpenAI's, the rest
Ollama's."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import anthropic_api, ollama_api, openai_api
from .errors import APIError, api_error
from .pool import ModelPool

log = logging.getLogger("mlxqwen.server")

LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


def log_to_stderr() -> None:
    """Show the server's log (one line per request, loads and unloads) on stderr."""
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)


def error_response(path: str, e: APIError) -> JSONResponse:
    if path.startswith("/v1/messages"):
        body = anthropic_api.error_body(e)
    elif path.startswith("/v1/"):
        body = openai_api.error_body(e)
    else:
        body = ollama_api.error_body(e)
    return JSONResponse(body, status_code=e.status, headers=e.headers)


async def _on_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        exc = APIError(exc.status_code, exc.detail, "not_found" if exc.status_code == 404 else "invalid_request")
    return error_response(request.url.path, api_error(exc))


class RequestLog:
    """One line per request, when its response has been sent; the handlers put the model and
    token counts in `request.state`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 0

        async def send_logged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            state: dict[str, Any] = scope.get("state", {})
            tokens = state.get("tokens")
            log.info(
                "%s %s model=%s tokens=%s tok/s=%s status=%s %.2fs",
                scope["method"], scope["path"], state.get("model", "-"),
                f"{tokens[0]}+{tokens[1]}" if tokens else "-",
                f"{state['tps']:.1f}" if state.get("tps") else "-",
                status or "-", time.perf_counter() - start,
            )  # fmt: skip


class BodyLimit:
    """Refuses request bodies over `limit` bytes with a 413, by the declared length or as they arrive."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is over the server's limit of {self.limit} bytes", "too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(scope["path"], too_large)(scope, receive, send)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise too_large
            return message

        await self.app(scope, limited, send)


class APIKey:
    """With a key, every request but CORS preflights needs `Authorization: Bearer KEY` or `x-api-key: KEY`."""

    def __init__(self, app: ASGIApp, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        bearer = headers.get(b"authorization", b"").decode(errors="replace")
        given = (
            bearer[7:] if bearer[:7].lower() == "bearer " else headers.get(b"x-api-key", b"").decode(errors="replace")
        )
        if not hmac.compare_digest(given.encode(), self.key.encode()):
            e = APIError(
                401, "missing or wrong API key: send Authorization: Bearer KEY or x-api-key: KEY", "authentication"
            )
            return await error_response(scope["path"], e)(scope, receive, send)
        await self.app(scope, receive, send)


async def _root(request: Request) -> Response:
    return PlainTextResponse("mlxqwen is running: Ollama (/api), OpenAI (/v1) and Anthropic (/v1/messages) APIs")


def create_app(
    pool: ModelPool,
    *,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    max_body: int = 16 * 2**20,
    preload: Sequence[str] = (),
) -> Starlette:
    """The server for `pool`'s models. cors_origins: origins allowed besides localhost ones
    ("*" for any). preload: models to load at start."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        for name in preload:
            pool.release(await pool.acquire(name, pool.keep_alive))
        reaper = asyncio.create_task(pool.reap_forever())
        try:
            yield
        finally:
            reaper.cancel()

    origins = list(cors_origins)
    middleware = [
        Middleware(RequestLog),
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_origin_regex=None if "*" in origins else LOCAL_ORIGINS,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
        ),
        Middleware(BodyLimit, limit=max_body),
        Middleware(APIKey, key=api_key),
    ]
    routes = [
        Route("/", _root, methods=["GET", "HEAD"]),
        *ollama_api.routes,
        *openai_api.routes,
        *anthropic_api.routes,
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={Exception: _on_error, HTTPException: _on_error, APIError: _on_error},
        lifespan=lifespan,
    )
    app.state.pool = pool
    return app
