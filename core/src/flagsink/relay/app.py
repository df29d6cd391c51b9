"""The relay's ASGI application (Starlette).

Routes: ``POST /v1/data/collector`` (GO Feature Flag's collector protocol),
``POST /v1/flag/configuration`` (flags from the configured store, for in-process
providers), ``GET /health``,
``GET /info``, ``GET /metrics`` (Prometheus) and ``GET /openapi.json``. The exporters are
built when the application starts (after any worker fork) and flushed when it stops.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
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
from flagsink.flags import flag_definition
from flagsink.pipeline import Pipeline, from_config
from flagsink.plugins import core_version, installed_plugins
from flagsink.relay.auth import KeyChecker
from flagsink.relay.metrics import CONTENT_TYPE, RelayMetrics
from flagsink.relay.openapi import openapi_document
from flagsink.store import FLAGS
from flagsink.store_cache import CachedStore
from flagsink.wire import CollectorBodyError, decode_collector_body

__all__ = ["create_app"]

logger = logging.getLogger("flagsink.relay")

COLLECTOR = "/v1/data/collector"
FLAG_CONFIGURATION = "/v1/flag/configuration"
OPEN_PATHS = frozenset({"/health", "/info"})
ROUTES = frozenset({COLLECTOR, FLAG_CONFIGURATION, "/health", "/info", "/metrics", "/openapi.json"})
NO_STORE = (
    "no flag store configured: add a `store:` section (e.g. `store: {kind: file, path: "
    "flags.yaml}`) to the relay's config to serve flag configuration"
)
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
        self.store: CachedStore | None = None
        self.enrichment = config.evaluation_context_enrichment
        self.document = _encode(openapi_document(core_version(), secured=bool(config.service.keys)))

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise RuntimeError("the relay has not started")
        return self._pipeline

    @asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        if self.config.store is not None:
            self.store = await asyncio.to_thread(self.config.store.build)
        if self._pipeline is None:
            try:
                self._pipeline = from_config(self.config, store=self.store)
            except BaseException:
                if self.store is not None:
                    self.store.close()
                raise
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
            if self.store is not None:
                self.store.close()

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
        accepted = len(events)
        kept, filtered = pipeline.filter_events(events)
        if filtered:
            pipeline.count_filtered(filtered)
            if metrics is not None:
                metrics.events_filtered.inc(filtered)
        verdict, scheduler = pipeline.check_room(kept) if kept else ("ok", None)
        if verdict != "ok" and scheduler is not None:
            if metrics is not None:
                metrics.events_rejected.labels("overloaded").inc(len(kept))
            if verdict == "too_large":
                return _error(
                    f"batch of {len(kept)} events is larger than exporter "
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
        pipeline.add_events(kept)
        if metrics is not None:
            metrics.events_accepted.inc(len(kept))
        answer: dict[str, Any] = {
            "ingestedContentCount": accepted,
            "rejectedContentCount": len(rejected),
            "rejected": [
                {"index": index, "reason": reason} for index, reason in rejected[:_SHOWN_REJECTIONS]
            ],
        }
        if filtered:  # present only when some events were filtered (trackEvents: false)
            answer["filteredContentCount"] = filtered
        return _json(answer)

    async def flag_configuration(self, request: Request) -> Response:
        """GO Feature Flag's ``POST /v1/flag/configuration``: the flags (all, or those
        named in ``{"flags": [...]}``) with an ETag; ``If-None-Match`` -> 304."""
        store = self.store
        if store is None:
            return _error(NO_STORE, 404)
        try:
            body = await self._read_body(request)
        except _BodyTooLarge:
            return _error(f"request body larger than maxBodyBytes ({self.max_body} bytes)", 413)
        wanted: list[str] = []
        if body.strip():
            try:
                parsed = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                return _error('invalid JSON body: expected {"flags": ["flag-key", ...]}', 400)
            if not isinstance(parsed, dict):
                return _error('expected a JSON object: {"flags": ["flag-key", ...]}', 400)
            keys = parsed.get("flags")
            if keys is not None:
                if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                    return _error("`flags` must be a list of flag keys (strings)", 400)
                wanted = keys
        try:
            items = await asyncio.to_thread(store.all, FLAGS)
        except Exception as exc:
            logger.error("cannot read flags from the store: %s", exc)
            return _error(f"cannot read flags from the store: {exc}", 503, {"Retry-After": "5"})
        if wanted:
            chosen = {key: items[key] for key in dict.fromkeys(wanted) if key in items}
        else:
            chosen = items
        payload = {
            "flags": {key: flag_definition(item) for key, item in sorted(chosen.items())},
            "evaluationContextEnrichment": self.enrichment,
        }
        encoded = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
        etag = '"' + hashlib.sha256(encoded).hexdigest()[:32] + '"'
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if _etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        return Response(encoded, 200, headers, media_type="application/json")

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


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    if header.strip() == "*":
        return True
    candidates = {part.strip().removeprefix("W/") for part in header.split(",")}
    return etag in candidates or etag.strip('"') in candidates


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
            Route(FLAG_CONFIGURATION, relay.flag_configuration, methods=["POST"]),
            Route("/health", relay.health, methods=["GET"]),
            Route("/info", relay.info, methods=["GET"]),
            Route("/metrics", relay.prometheus, methods=["GET"]),
            Route("/openapi.json", relay.openapi, methods=["GET"]),
        ],
        lifespan=relay.lifespan,
        exception_handlers={HTTPException: _http_error},
    )
    return _Guard(app, relay, KeyChecker(config.service.keys))
