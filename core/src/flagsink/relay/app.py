"""The relay's ASGI application (Starlette).

Routes: ``POST /v1/data/collector`` (GO Feature Flag's collector protocol),
``POST /v1/flag/configuration`` (flags from the configured store, for in-process
providers), ``GET /health``,
``GET /info``, ``GET /metrics`` (Prometheus), ``GET /v1/status`` (every exporter's
accounting, as JSON) and ``GET /openapi.json``. The exporters are
built when the application starts (after any worker fork) and flushed when it stops.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from flagsink.accounting import STATUS_PATH
from flagsink.config import Config
from flagsink.event import Event
from flagsink.flags import flag_definition
from flagsink.pipeline import Pipeline, from_config
from flagsink.plugins import core_version, installed_plugins
from flagsink.relay.auth import KeyChecker
from flagsink.relay.idempotency import (
    HEADER,
    REPLAYED_HEADER,
    Claim,
    IdempotencyStore,
    MemoryIdempotencyStore,
    StoredResponse,
    fingerprint,
    key_problem,
    presented_key,
    request_scope,
)
from flagsink.relay.metrics import CONTENT_TYPE, RelayMetrics, status_document
from flagsink.relay.openapi import openapi_document
from flagsink.store import FLAGS
from flagsink.store_cache import CachedStore
from flagsink.wire import CollectorBodyError, decode_collector_body

__all__ = ["create_app"]

logger = logging.getLogger("flagsink.relay")

COLLECTOR = "/v1/data/collector"
FLAG_CONFIGURATION = "/v1/flag/configuration"
STATUS = STATUS_PATH
OPEN_PATHS = frozenset({"/health", "/info"})
ROUTES = frozenset(
    {COLLECTOR, FLAG_CONFIGURATION, STATUS, "/health", "/info", "/metrics", "/openapi.json"}
)
NO_STORE = (
    "no flag store configured: add a `store:` section (e.g. `store: {kind: file, path: "
    "flags.yaml}`) to the relay's config to serve flag configuration"
)
# Metric labels take only known values, so clients cannot grow the registry without bound.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_SHOWN_REJECTIONS = 100
_IDEMPOTENCY_HEADER = "idempotency-key"
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


#: Seconds of ``shutdownTimeout`` kept for what follows the pipeline's close: the end of
#: the lifespan, uvicorn's exit and the process exit.
EXIT_RESERVE = 0.05


class _Relay:
    """Request handlers sharing the pipeline and metrics of one application."""

    def __init__(
        self,
        config: Config,
        pipeline: Pipeline | None,
        idempotency: IdempotencyStore | None = None,
    ) -> None:
        self.config = config
        if idempotency is None:
            idempotency = MemoryIdempotencyStore(config.service.idempotency_ttl)
        self.idempotency = idempotency
        self.secured = bool(config.service.keys)
        self.max_body = config.service.max_body_bytes
        self._pipeline = pipeline
        self.metrics: RelayMetrics | None = None
        self.store: CachedStore | None = None
        self.enrichment = config.evaluation_context_enrichment
        self.document = _encode(openapi_document(core_version(), secured=bool(config.service.keys)))
        #: When the stop signal came (``time.monotonic()``), if the server reported it:
        #: the shutdown budget runs from there, not from the end of the server's own
        #: shutdown steps.
        self.stop_signal_at: float | None = None

    def note_stop_signal(self) -> None:
        """The server got its stop signal now (the first call counts)."""
        if self.stop_signal_at is None:
            self.stop_signal_at = time.monotonic()

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise RuntimeError("the relay has not started")
        return self._pipeline

    def _keep_answers_in_spool(self, pipeline: Pipeline) -> None:
        """With a spool, ``Idempotency-Key`` answers survive a restart: kept there, and
        loaded back on start."""
        spool = pipeline.spool
        store = self.idempotency
        if spool is None or not isinstance(store, MemoryIdempotencyStore):
            return
        for scope, digest, status, body, left in spool.answers():
            store.preload(scope, digest, StoredResponse(status, body), min(left, store.ttl))

        def keep(scope: str, digest: bytes, response: StoredResponse, ttl: float) -> None:
            spool.remember_answer(scope, digest, response.status, response.body, ttl)

        store.on_complete = keep

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
        self._keep_answers_in_spool(self._pipeline)
        self.metrics = RelayMetrics(self._pipeline, self.idempotency)
        names = ", ".join(s.name for s in self._pipeline.schedulers)
        logger.info("relay started with exporters: %s", names)
        try:
            yield
        finally:
            timeout = self.config.service.shutdown_timeout
            since = self.stop_signal_at if self.stop_signal_at is not None else time.monotonic()
            budget = max(since + timeout - EXIT_RESERVE - time.monotonic(), 0.0)
            logger.info("relay stopping: flushing exporters (up to %.2fs)", budget)
            delivered = await asyncio.to_thread(self._pipeline.close, budget)
            if delivered:
                logger.info("relay stopped: every accepted event was delivered")
            else:
                stats = self._pipeline.stats()
                left = sum(
                    s.dropped_by_reason.get("shutdown", 0) + s.buffered + s.in_flight for s in stats
                )
                if self._pipeline.spool is not None:
                    logger.warning(
                        "relay stopped with %d events undelivered: they stay in the spool "
                        "and are sent after the next start",
                        left,
                    )
                else:
                    logger.error("relay stopped with %d events undelivered at shutdown", left)
            if self.store is not None:
                self.store.close()

    async def collector(self, request: Request) -> Response:
        key = request.headers.get(_IDEMPOTENCY_HEADER)
        if key is not None:
            problem = key_problem(request.headers.getlist(_IDEMPOTENCY_HEADER))
            if problem is not None:
                return _error(problem, 400)
        try:
            body = await self._read_body(request)
        except _BodyTooLarge:
            return _error(
                f"request body larger than maxBodyBytes ({self.max_body} bytes); "
                "send smaller batches",
                413,
            )
        if key is None:
            return await self._ingest(body)
        return await self._ingest_once(request, key, body)

    async def _ingest_once(self, request: Request, key: str, body: bytes) -> Response:
        """``_ingest`` unless this client already sent ``key``: then the stored answer (same
        body), 422 (another body) or 409 (still being processed). Only 2xx are remembered."""
        store = self.idempotency
        client = presented_key(*_credentials(request.scope)) if self.secured else ""
        outcome = store.begin(request_scope(client, key), fingerprint(body))
        if not isinstance(outcome, Claim):
            return self._not_again(outcome)
        try:
            response = await self._ingest(body)
        except BaseException:
            store.release(outcome)
            raise
        if 200 <= response.status_code < 300:
            media_type = response.media_type or "application/json"
            answer = StoredResponse(response.status_code, bytes(response.body), media_type)
            store.complete(outcome, answer)
        else:
            store.release(outcome)  # not remembered: the client's retry is processed
        return response

    def _not_again(self, outcome: StoredResponse | Literal["in_progress", "mismatch"]) -> Response:
        metrics = self.metrics
        if isinstance(outcome, StoredResponse):
            if metrics is not None:
                metrics.idempotent_replays.inc()
            return Response(
                outcome.body,
                outcome.status,
                {REPLAYED_HEADER: "true"},
                media_type=outcome.media_type,
            )
        if metrics is not None:
            metrics.idempotency_conflicts.labels(outcome).inc()
        if outcome == "mismatch":
            return _error(
                f"this {HEADER} was already used for a request with a different "
                "body; send a new key with each new request",
                422,
            )
        return _error(
            f"a request with this {HEADER} is still being processed; retry shortly",
            409,
            {"Retry-After": "1"},
        )

    async def _ingest(self, body: bytes) -> Response:
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
        if pipeline.spool is None:
            pipeline.add_events(kept)
        elif kept and not await _durable(pipeline, kept):
            if metrics is not None:
                metrics.events_rejected.labels("overloaded").inc(len(kept))
            return _error(
                "the spool is full (the exporters are failing or slower than the event "
                "rate) and could not take these events in time; retry later",
                503,
                {"Retry-After": "5"},
            )
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

    async def status(self, _: Request) -> Response:
        """Every exporter's accounting (``accepted == delivered + dropped + pending``),
        the spool's figures and the relay's counters; protected like ``/metrics``."""
        return _json(status_document(self.pipeline, self.metrics, core_version()))

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


def _credentials(scope: Scope) -> tuple[str | None, str | None]:
    """``(X-API-Key, Authorization)`` as :meth:`_Guard._allowed` reads them."""
    api_key = authorization = None
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            api_key = value.decode("latin-1")
        elif name == b"authorization":
            authorization = value.decode("latin-1")
    return api_key, authorization


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


async def _durable(pipeline: Pipeline, events: Sequence[Event]) -> bool:
    """Hand ``events`` to the spool; True once the group commit holding them is done."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool] = loop.create_future()

    def settle(ok: bool) -> None:
        if not done.done():
            done.set_result(ok)

    def committed(ok: bool) -> None:  # on the spool's writer thread
        loop.call_soon_threadsafe(settle, ok)

    pipeline.submit(events, committed)
    return await done


def stop_signal_hook(app: ASGIApp) -> Callable[[], None]:
    """What the server calls when its stop signal comes, for an application from
    :func:`create_app`: the relay's ``shutdownTimeout`` then runs from that moment."""
    if isinstance(app, _Guard):
        return app.relay.note_stop_signal
    return lambda: None


def create_app(
    config: Config,
    *,
    pipeline: Pipeline | None = None,
    idempotency: IdempotencyStore | None = None,
) -> ASGIApp:
    """The relay application for ``config``.

    :param pipeline: use this pipeline instead of building one from the config when the
        application starts (it is still closed when the application stops).
    :param idempotency: where ``Idempotency-Key`` answers are kept (default: in memory,
        for ``idempotencyTtl`` seconds).
    """
    relay = _Relay(config, pipeline, idempotency)
    app = Starlette(
        routes=[
            Route(COLLECTOR, relay.collector, methods=["POST"]),
            Route(FLAG_CONFIGURATION, relay.flag_configuration, methods=["POST"]),
            Route("/health", relay.health, methods=["GET"]),
            Route("/info", relay.info, methods=["GET"]),
            Route("/metrics", relay.prometheus, methods=["GET"]),
            Route(STATUS, relay.status, methods=["GET"]),
            Route("/openapi.json", relay.openapi, methods=["GET"]),
        ],
        lifespan=relay.lifespan,
        exception_handlers={HTTPException: _http_error},
    )
    return _Guard(app, relay, KeyChecker(config.service.keys))
