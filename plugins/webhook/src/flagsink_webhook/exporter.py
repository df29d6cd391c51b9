"""The ``webhook`` exporter: batches POSTed as GO Feature Flag's webhook body, signed."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import logging
import socket
import time
from collections import Counter, deque
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import httpx
import msgspec

from flagsink.event import Event
from flagsink.exporter import (
    Exporter,
    ExportError,
    PartialExportError,
    PermanentExportError,
    SettingsError,
)
from flagsink_webhook.settings import WebhookSettings, redacted_url

__all__ = [
    "SIGNATURE_HEADER",
    "WebhookExportError",
    "WebhookExporter",
    "WebhookPartialExportError",
    "WebhookRefusedError",
    "sign",
]

logger = logging.getLogger("flagsink.webhook")

SIGNATURE_HEADER = "X-Hub-Signature-256"
#: Characters of a response body kept in errors and logs.
EXCERPT_CHARS = 200
# Response bodies are read up to this size (then the connection is dropped, not reused).
_READ_LIMIT = 64 * 1024
_RETRYABLE = frozenset({408, 429})
_TOO_LARGE = 413
_UNENCODABLE = (TypeError, ValueError, OverflowError, msgspec.EncodeError)
# Go's encoding/json escapes these inside strings; so do we, for identical bodies.
_GO_ESCAPES = (
    (b"&", b"\\u0026"),
    (b"<", b"\\u003c"),
    (b">", b"\\u003e"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)


def sign(body: bytes, secret: bytes) -> str:
    """The ``X-Hub-Signature-256`` value for ``body``: ``sha256=`` + hex HMAC-SHA256, as
    GO Feature Flag's ``signer.Sign`` (and GitHub's webhooks) compute it."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookExportError(ExportError):
    """The webhook could not take the batch now (5xx, 408, 429, network error): retried.

    :param status: the HTTP status, or None for a network error.
    :param retry_after: seconds the server asked to wait (``Retry-After``); the scheduler
        waits at least that long before the retry.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class WebhookPartialExportError(PartialExportError):
    """Some requests of a split batch failed: only their events are retried (``failed``)
    or dropped (``rejected``, each with its reason in ``reasons``); ``retry_after`` as in
    :class:`WebhookExportError`."""

    def __init__(
        self,
        message: str,
        *,
        failed: Sequence[Event] = (),
        rejected: Sequence[Event] = (),
        reasons: Sequence[str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, failed=failed, rejected=rejected, reasons=reasons)
        self.retry_after = retry_after


class WebhookRefusedError(WebhookPartialExportError, PermanentExportError):
    """The webhook refused every event of the batch for good (a 4xx other than 408, 413
    and 429, or events that can never be sent). A :class:`PermanentExportError` that also
    carries each event's reason (``rejected``, ``reasons``), so the dead-letter file keeps
    the exact answer for each event."""


Record = tuple[Event, bytes]


class WebhookExporter(Exporter[WebhookSettings]):
    """POSTs each batch as ``{"meta": {...}, "events": [...]}`` to ``endpointUrl``.

    Batches larger than ``maxBodyBytes`` are split over several requests; when some of them
    fail, only their events are retried (or rejected, each with the reason, which the
    scheduler keeps in the exporter's ``deadLetterFile``). Counters: :attr:`requests`,
    :attr:`rejected_by_status`.
    """

    kind = "webhook"
    bulk = True
    settings_model = WebhookSettings

    def __init__(self, settings: WebhookSettings | None = None, /, **options: Any) -> None:
        super().__init__(settings, **options)
        s = self.settings
        url = httpx.URL(s.endpoint_url)
        # Credentials in the URL become Basic auth unless an Authorization header is set
        # (Go's rule), and are kept out of the URL that httpx logs.
        self.url = url.copy_with(username=None, password=None)
        basic_auth = _basic_auth(url)
        #: Where logs and errors say the requests go: no credentials, no query string.
        self.where = redacted_url(s.endpoint_url)
        meta = dict(s.meta)
        if "hostname" not in meta:  # as GO Feature Flag: a configured hostname wins
            meta["hostname"] = socket.gethostname()
        self.meta = meta
        self._encode = msgspec.json.Encoder(order="deterministic").encode
        self._prefix = b'{"meta":' + _go_escape(self._encode(meta)) + b',"events":['
        self._suffix = b"]}"
        if len(self._prefix) + len(self._suffix) + 256 > s.max_body_bytes:
            raise SettingsError(
                "maxBodyBytes", f"{s.max_body_bytes} bytes leave no room for events next to meta"
            )
        self._secret = s.secret.get_secret_value().encode() if s.secret else b""
        #: Current body limit: ``maxBodyBytes``, lowered when the server answers 413.
        self.max_body_bytes = s.max_body_bytes
        self.requests = 0
        self.rejected_by_status: Counter[str] = Counter()
        headers = [
            (name, item.get_secret_value())
            for name, value in s.headers.items()
            for item in (value if isinstance(value, list) else [value])
        ]
        names = {name.lower() for name, _ in headers}
        if "user-agent" not in names:
            headers.append(("User-Agent", _user_agent()))
        if basic_auth and "authorization" not in names:
            headers.append(("Authorization", basic_auth))
        base = httpx.Headers(headers)
        base["Content-Type"] = "application/json"  # always, as GO Feature Flag does
        self._client = httpx.Client(
            headers=base,
            timeout=httpx.Timeout(s.timeout),
            # A redirect is a configuration error; following it would also send the
            # headers (credentials) to wherever it points.
            follow_redirects=False,
        )
        # httpx logs each request's URL at INFO: show it there without its query string.
        self._log_filter = _RedactUrl(self.url, self.where)
        logging.getLogger("httpx").addFilter(self._log_filter)

    # -- export ---------------------------------------------------------------------------

    def export(self, events: Sequence[Event]) -> None:
        """POST ``events`` in as few requests as ``maxBodyBytes`` allows.

        Raises :class:`WebhookExportError` when nothing was delivered and everything can be
        retried, :class:`WebhookRefusedError` (a :class:`PermanentExportError`) when
        everything was refused for good, and :class:`WebhookPartialExportError` naming
        exactly the failed and refused events otherwise; refused events come with a reason
        each (``reasons``).
        """
        report = _Report()
        records = self._sendable(events, report)
        self._send(records, report)
        if not report.failed and not report.rejected:
            return
        message = "; ".join(dict.fromkeys(report.reasons))
        if not report.delivered and not report.rejected:
            raise WebhookExportError(message, status=report.status, retry_after=report.retry_after)
        if not report.failed and len(report.rejected) == len(events):
            raise WebhookRefusedError(
                message, rejected=report.rejected, reasons=report.rejected_reasons
            )
        raise WebhookPartialExportError(
            f"{report.delivered} of {len(events)} events delivered; {message}",
            failed=report.failed,
            rejected=report.rejected,
            reasons=report.rejected_reasons,
            retry_after=report.retry_after,
        )

    def _sendable(self, events: Sequence[Event], report: _Report) -> list[Record]:
        """The events' records, less those that can never be sent (rejected in ``report``)."""
        records, unencodable = self._records(events)
        if unencodable:
            report.reject(
                unencodable,
                f"{len(unencodable)} events have values that cannot be encoded",
                ["a value cannot be encoded as JSON"] * len(unencodable),
            )
        room = self.max_body_bytes - len(self._prefix) - len(self._suffix)
        if any(len(data) > room for _, data in records):
            limit = self.max_body_bytes
            oversize = [(event, len(data)) for event, data in records if len(data) > room]
            reason = (
                f"{len(oversize)} events are larger than maxBodyBytes ({limit} bytes) even alone"
            )
            report.reject(
                self._refuse([event for event, _ in oversize], reason),
                reason,
                [
                    f"event of {size} bytes does not fit in a body of maxBodyBytes "
                    f"({limit} bytes) even alone"
                    for _, size in oversize
                ],
            )
            records = [record for record in records if len(record[1]) <= room]
        return records

    def _send(self, records: list[Record], report: _Report) -> None:
        pending = deque(self._chunks(records))
        while pending:
            chunk = pending.popleft()
            body = self._body(chunk)
            outcome = self._post(body)
            report.status = outcome.status
            if outcome.ok:
                report.delivered += len(chunk)
            elif outcome.status == _TOO_LARGE and len(chunk) > 1:
                self._lower_limit(len(body))
                parts = self._chunks(chunk)
                if len(parts) == 1:  # the limit cannot go lower: halve the chunk
                    parts = [chunk[: len(chunk) // 2], chunk[len(chunk) // 2 :]]
                pending.extendleft(reversed(parts))
            elif outcome.retryable:
                # The webhook is down or overloaded: the rest would fail too. Keep it all.
                report.failed = [e for e, _ in chunk] + [e for part in pending for e, _ in part]
                report.retry_after = outcome.retry_after
                report.reasons.insert(0, outcome.message)
                return
            else:
                if outcome.status is not None:
                    self.rejected_by_status[str(outcome.status)] += len(chunk)
                events = [event for event, _ in chunk]
                report.reject(self._refuse(events, outcome.message), outcome.message)

    def close(self) -> None:
        """Close the HTTP client and its connections."""
        self._client.close()
        logging.getLogger("httpx").removeFilter(self._log_filter)

    # -- bodies ---------------------------------------------------------------------------

    def _records(self, events: Sequence[Event]) -> tuple[list[Record], list[Event]]:
        encode = self._encode
        records: list[Record] = []
        rejected: list[Event] = []
        for event in events:
            try:
                data = encode(event)
            except _UNENCODABLE:
                rejected.append(event)
                continue
            records.append((event, _go_escape(data)))
        return records, rejected

    def _chunks(self, records: Sequence[Record]) -> list[list[Record]]:
        """Consecutive runs of records whose bodies fit in the body limit."""
        limit = self.max_body_bytes
        chunks: list[list[Record]] = []
        chunk: list[Record] = []
        size = len(self._prefix) + len(self._suffix)
        for record in records:
            extra = len(record[1]) + (1 if chunk else 0)
            if chunk and size + extra > limit:
                chunks.append(chunk)
                chunk = []
                size = len(self._prefix) + len(self._suffix)
                extra = len(record[1])
            chunk.append(record)
            size += extra
        if chunk:
            chunks.append(chunk)
        return chunks

    def _body(self, records: Sequence[Record]) -> bytes:
        return b"".join((self._prefix, b",".join(data for _, data in records), self._suffix))

    def _lower_limit(self, refused: int) -> None:
        limit = max(refused // 2, 1024)
        if limit < self.max_body_bytes:
            logger.warning(
                "webhook %s: answered 413 for a body of %d bytes; sending bodies of at most "
                "%d bytes from now on (set maxBodyBytes to the server's limit)",
                self.where,
                refused,
                limit,
            )
            self.max_body_bytes = limit

    # -- HTTP -----------------------------------------------------------------------------

    def _post(self, body: bytes) -> _Outcome:
        headers = {SIGNATURE_HEADER: sign(body, self._secret)} if self._secret else None
        self.requests += 1
        try:
            with self._client.stream("POST", self.url, content=body, headers=headers) as response:
                status = response.status_code
                if 200 <= status < 300:
                    _read_some(response)
                    return _Outcome(status, ok=True)
                text = _excerpt(_read_some(response))
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except httpx.HTTPError as exc:
            detail = str(exc) or "no detail"
            return _Outcome(
                None, retryable=True, message=f"webhook {self.where} unreachable: {detail}"
            )
        retryable = status >= 500 or status in _RETRYABLE
        message = f"webhook {self.where} answered HTTP {status}"
        if 300 <= status < 400:
            location = redacted_url(response.headers.get("Location", ""))
            message += f" (redirect to {location or '?'}: set endpointUrl to the final URL)"
        if text:
            message += f": {text}"
        return _Outcome(status, retryable=retryable, retry_after=retry_after, message=message)

    def _refuse(self, events: list[Event], reason: str) -> list[Event]:
        """Log refused events (the scheduler keeps them in the dead-letter file)."""
        logger.error("webhook %s: %d events refused: %s", self.where, len(events), reason)
        return events


class _Report:
    """What became of one ``export`` call's events."""

    def __init__(self) -> None:
        self.delivered = 0
        self.failed: list[Event] = []
        self.rejected: list[Event] = []
        self.rejected_reasons: list[str] = []  # one per rejected event
        self.reasons: list[str] = []
        self.status: int | None = None
        self.retry_after: float | None = None

    def reject(
        self, events: Sequence[Event], reason: str, each: Sequence[str] | None = None
    ) -> None:
        """Refuse ``events`` for ``reason`` (the batch's summary); ``each``: a reason per
        event for the dead-letter file (default: ``reason``)."""
        self.rejected.extend(events)
        self.rejected_reasons.extend(each if each is not None else [reason] * len(events))
        self.reasons.append(reason)


class _Outcome:
    __slots__ = ("message", "ok", "retry_after", "retryable", "status")

    def __init__(
        self,
        status: int | None,
        *,
        ok: bool = False,
        retryable: bool = False,
        retry_after: float | None = None,
        message: str = "",
    ) -> None:
        self.status = status
        self.ok = ok
        self.retryable = retryable
        self.retry_after = retry_after
        self.message = message


class _RedactUrl(logging.Filter):
    """Replaces one URL in httpx's log records by its redacted form."""

    def __init__(self, url: httpx.URL, shown: str) -> None:
        super().__init__()
        self.url = url
        self.shown = shown

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(self._ours(arg) for arg in args):
            record.args = tuple(self.shown if self._ours(arg) else arg for arg in args)
        return True

    def _ours(self, arg: object) -> bool:
        return isinstance(arg, httpx.URL) and arg == self.url


def _basic_auth(url: httpx.URL) -> str | None:
    if not url.userinfo:
        return None
    token = base64.b64encode(f"{url.username}:{url.password}".encode()).decode("ascii")
    return f"Basic {token}"


def _go_escape(data: bytes) -> bytes:
    # Each of these bytes only occurs inside JSON strings, where the escape means the same.
    for raw, escaped in _GO_ESCAPES:
        if raw in data:
            data = data.replace(raw, escaped)
    return data


def _read_some(response: httpx.Response) -> bytes:
    data = bytearray()
    for chunk in response.iter_raw():
        data += chunk
        if len(data) >= _READ_LIMIT:
            break
    return bytes(data)


def _excerpt(data: bytes) -> str:
    text = " ".join(data[: EXCERPT_CHARS * 4].decode("utf-8", "replace").split())
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delay-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _user_agent() -> str:
    try:
        return f"flagsink-webhook/{version('flagsink-webhook')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "flagsink-webhook"
