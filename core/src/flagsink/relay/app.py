"""The relay's ASGI application (Starlette).

Routes: ``POST /v1/data/collector`` (GO Feature Flag's collector protocol), ``GET /health``,
``GET /info``, ``GET /metrics`` (Prometheus) and ``GET /openapi.json``. The exporters are
built when the application starts (after any worker fork) and flushed when it stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from flagsink.config import Config
from flagsink.pipeline import Pipeline, from_config
from flagsink.plugins import core_version, installed_plugins
from flagsink.relay.auth import KeyChecker
from flagsink.relay.metrics import CONTENT_TYPE, RelayMetrics
from flagsink.relay.openapi import openapi_document
from flagsink.wire import CollectorBodyError, decode_collector_body

__all__ = ["create_app"]

logger = logging.getLogger("flagsink.relay")

COLLECTOR = "/v1/data/collector"
OPEN_PATHS = frozenset({"/health", "/info"})
ROUTES = frozenset({COLLECTOR, "/health", "/info", "/metrics", "/openapi.json"})
# Metric labels take only known values, so clients cannot grow the registry without bound.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_SHOWN_REJECTIONS = 100
_encode = msgspec.json.Encoder().encode

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _BodyTooLarge(Exception):
    pass


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encode(payload), status, headers, media_type="application/json")


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return _json({"error": message}, status, headers)


class _Relay:
    """Request handlers sharing the pipeline and metrics of one application."""

    def __init__(self, config: Config, pipeline: Pipeline | None) -> None:
        self.config = config
        self.max_body = config.service.max_body_bytes
        self._pipeline = pipeline
        self.metrics: RelayMetrics | None = None
        self.document = _encode(openapi_document(core_version(), secured=bool(config.service.keys)))

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise RuntimeError("the relay has not started")
        return self._pipeline

    @asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        if self._pipeline is None:
            self._pipeline = from_config(self.config)
        self.metrics = RelayMetrics(self._pipeline)
        names = ", ".join(s.name for s in self._pipeline.schedulers)
        logger.info("relay started with exporters: %s", names)
        try:
            yield
        finally:
            timeout = self.config.service.shutdown_timeout
            logger.info("relay stopping: flushing exporters (up to %.0fs)", timeout)
            delivered = await asyncio.to_thread(self._pipeline.close, timeout)
            if delivered:
                logger.info("relay stopped: every accepted event was delivered")
            else:
                stats = self._pipeline.stats()
                left = sum(
                    s.dropped_by_reason.get("shutdown", 0) + s.buffered + s.in_flight for s in stats
                )
                logger.error("relay stopped with %d events undelivered at shutdown", left)

    async def collector(self, request: Request) -> Response:
        try:
            body = await self._read_body(request)
        except _BodyTooLarge:
            return _error(
                f"request body larger than maxBodyBytes ({self.max_body} bytes); "
                "send smaller batches",
                413,
            )
        try:
            events, rejected = decode_collector_body(body)
        except CollectorBodyError as exc:
            return _error(str(exc), 400)
        metrics = self.metrics
        pipeline = self.pipeline
        total = len(events) + len(rejected)
        if metrics is not None:
            metrics.events_received.inc(total)
            if rejected:
                metrics.events_rejected.labels("invalid").inc(len(rejected))
        verdict, scheduler = pipeline.check_room(events) if events else ("ok", None)
        if verdict != "ok" and scheduler is not None:
            if metrics is not None:
                metrics.events_rejected.labels("overloaded").inc(len(events))
            if verdict == "too_large":
                return _error(
                    f"batch of {len(events)} events is larger than exporter "
                    f"{scheduler.name} can ever buffer (maxBufferedEvents "
                    f"{scheduler.max_buffered_events}); send smaller batches",
                    413,
                )
            return _error(
                f"exporter {scheduler.name} has no room (it is failing or slower than the "
                "event rate); retry later",
                503,
                {"Retry-After": "5"},
            )
        pipeline.add_events(events)
        if metrics is not None:
            metrics.events_accepted.inc(len(events))
        return _json(
            {
                "ingestedContentCount": len(events),
                "rejectedContentCount": len(rejected),
                "rejected": [
                    {"index": index, "reason": reason}
                    for index, reason in rejected[:_SHOWN_REJECTIONS]
                ],
            }
        )

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise _BodyTooLarge
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise _BodyTooLarge
        return bytes(body)

    async def health(self, _: Request) -> Response:
        return _json({"status": "ok"})

    async def info(self, _: Request) -> Response:
        plugins = installed_plugins()
        return _json(
            {
                "version": core_version(),
                "kinds": sorted({p.name for p in plugins if p.mode and not p.disabled}),
                "exporters": [s.name for s in self.pipeline.schedulers],
            }
        )

    async def prometheus(self, _: Request) -> Response:
        body = self.metrics.render() if self.metrics is not None else b""
        return Response(body, media_type=CONTENT_TYPE)

    async def openapi(self, _: Request) -> Response:
        return Response(self.document, media_type="application/json")


class _Guard:
    """ASGI middleware: API-key check and request counting by route and status."""

    def __init__(self, app: ASGIApp, relay: _Relay, checker: KeyChecker) -> None:
        self.app = app
        self.relay = relay
        self.checker = checker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.checker.enabled and path not in OPEN_PATHS and not self._allowed(scope):
                response = _error(
                    "missing or wrong API key: send X-API-Key or Authorization: Bearer", 401
                )
                await response(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            metrics = self.relay.metrics
            if metrics is not None:
                route = path if path in ROUTES else "other"
                method = scope["method"] if scope["method"] in METHODS else "other"
                metrics.requests.labels(method, route, str(status)).inc()

    def _allowed(self, scope: Scope) -> bool:
        api_key = authorization = None
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                api_key = value.decode("latin-1")
            elif name == b"authorization":
                authorization = value.decode("latin-1")
        return self.checker.allows(api_key, authorization)


async def _http_error(_: Request, exc: Exception) -> Response:
    """404, 405 ... as the same JSON error shape as every other answer."""
    assert isinstance(exc, HTTPException)
    return _error(exc.detail, exc.status_code, dict(exc.headers or {}))


def create_app(config: Config, *, pipeline: Pipeline | None = None) -> ASGIApp:
    """The relay application for ``config``.

    :param pipeline: use this pipeline instead of building one from the config when the
        application starts (it is still closed when the application stops).
    """
    relay = _Relay(config, pipeline)
    app = Starlette(
        routes=[
            Route(COLLECTOR, relay.collector, methods=["POST"]),
            Route("/health", relay.health, methods=["GET"]),
            Route("/info", relay.info, methods=["GET"]),
            Route("/metrics", relay.prometheus, methods=["GET"]),
            Route("/openapi.json", relay.openapi, methods=["GET"]),
        ],
        lifespan=relay.lifespan,
        exception_handlers={HTTPException: _http_error},
    )
    return _Guard(app, relay, KeyChecker(config.service.keys))
