"""The ``pubsub`` exporter: one Pub/Sub message per event, published from the scheduler's
worker thread.

Each export publishes every event at once through one long-lived ``PublisherClient``,
which packs the messages into batched publish requests, then waits (bounded) for every
message's future. Only the messages whose future failed go back to the scheduler for a
retry; messages Pub/Sub can never accept are rejected, counted and logged, and handed back
with their reason, which the scheduler writes to the exporter's ``deadLetterFile``.

With ``orderingKey`` the publisher orders messages per key. A failed publish then pauses
its key (later messages of that key fail without being sent, so none overtakes it); the
exporter resumes the key once the export is over, and the scheduler sends the failed
messages again first, in their original order. In that mode each publish request is tried
once (the client would otherwise retry it forever); the scheduler's backoff does the
retrying.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from flagsink.event import Event
from flagsink.exporter import Exporter, ExportError, PartialExportError, SettingsError
from flagsink.exporters.records import encode_records, key_renderer
from flagsink_pubsub.settings import (
    MAX_ATTRIBUTE_VALUE_BYTES,
    MAX_BATCH_BYTES,
    MAX_ORDERING_KEY_BYTES,
    PubSubSettings,
)

if TYPE_CHECKING:
    from google.auth.credentials import Credentials

__all__ = ["CLOSE_TIMEOUT", "EMULATOR_ENV", "WAIT_MARGIN", "PubSubExporter"]

logger = logging.getLogger("flagsink.pubsub")

EMULATOR_ENV = "PUBSUB_EMULATOR_HOST"
SCOPES = ("https://www.googleapis.com/auth/pubsub",)

WAIT_MARGIN = 5.0
"""Seconds an export waits for the futures beyond ``publishTimeout`` + ``batchMaxLatency``.
A future still pending then (a stuck connection) goes back for retry and may be delivered
twice; it is counted as ``unresolved``."""

CLOSE_TIMEOUT = 5.0
"""Most seconds :meth:`PubSubExporter.close` waits for publishes still in flight."""

RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)
"""gRPC channel options: after an outage the channel tries to reconnect at least every
5 s (gRPC's default backs off up to 120 s, which would hold exports back that long once
the service is back)."""

# Reasons a message is rejected for good (counted per reason).
TOO_LARGE = "too_large"
UNENCODABLE = "unencodable"
ATTRIBUTE_TOO_LONG = "attribute_too_long"
ORDERING_KEY_TOO_LONG = "ordering_key_too_long"
INVALID = "invalid_argument"

_REASONS = {
    TOO_LARGE: f"message over Pub/Sub's {MAX_BATCH_BYTES} byte limit",
    UNENCODABLE: "a value is not JSON-serialisable",
    ATTRIBUTE_TOO_LONG: f"an attribute value over {MAX_ATTRIBUTE_VALUE_BYTES} bytes",
    ORDERING_KEY_TOO_LONG: f"ordering key over {MAX_ORDERING_KEY_BYTES} bytes",
    INVALID: "Pub/Sub (or its client) refused the message as invalid",
}


class _Rejected(Exception):
    """A message Pub/Sub can never accept: ``reason`` is its counter, ``detail`` says why."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(detail or _REASONS[reason])
        self.reason = reason
        self.detail = detail or _REASONS[reason]


# A rejected event, its counter (a key of _REASONS), and why (for the dead-letter file).
_Refused = tuple[Event, str, str]


Attributes = Callable[[Event], dict[str, str]]

_PENDING, _PUBLISHED, _FAILED, _REJECTED = range(4)


class _Sent:
    """One message handed to the publisher, and what became of it."""

    __slots__ = ("attributes", "data", "event", "future", "key", "reason", "state")

    def __init__(
        self,
        event: Event,
        data: bytes,
        key: str,
        attributes: dict[str, str],
        future: concurrent.futures.Future[Any],
    ) -> None:
        self.event = event
        self.data = data
        self.key = key
        self.attributes = attributes
        self.future = future
        self.state = _PENDING
        self.reason = ""  # why Pub/Sub refused it, once _REJECTED


class _Outcome:
    """What an export's wait found: failed events in order, counts, the first error."""

    def __init__(self) -> None:
        self.failed: list[Event] = []
        self.published = 0
        self.error: BaseException | None = None

    def note(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error


class PubSubExporter(Exporter[PubSubSettings]):
    """Publishes each event as one message to ``topic``.

    The ``PublisherClient`` is created at the first export (so that loading a config
    never needs credentials) and reused by every export until :meth:`close`. It talks to
    the emulator named by ``PUBSUB_EMULATOR_HOST`` when that is set, otherwise it uses
    ``credentialsFile`` or Application Default Credentials.

    Message data is the event's GO Feature Flag JSON; attributes are ``emitter`` and the
    configured ``attributes``.
    """

    kind = "pubsub"
    bulk = False
    settings_model = PubSubSettings

    def __init__(self, settings: PubSubSettings | None = None, /, **options: Any) -> None:
        super().__init__(settings, **options)
        config = self.settings
        self.topic_path = config.topic_path
        self.ordering = config.ordering_key is not None
        self._ordering_key: Callable[[Event], str] | None = (
            key_renderer(config.ordering_key, setting="orderingKey")
            if config.ordering_key is not None
            else None
        )
        self._attributes = _attribute_renderer(config)
        self._credentials: Credentials | None = None
        if config.credentials_file is not None:
            self._credentials = _load_credentials(config.credentials_file)
        self._publisher: Any = None
        self._gapic: Any = None
        self._lock = threading.Lock()
        self._closed = False
        self._pending: list[concurrent.futures.Future[Any]] = []
        self._wait_timeout = config.publish_timeout + config.batch_max_latency + WAIT_MARGIN
        #: Messages the service confirmed.
        self.published = 0
        #: Messages whose publish failed and that went back to the scheduler for retry.
        self.failed = 0
        #: Messages still unconfirmed at the end of an export's wait (retried: possible
        #: duplicates).
        self.unresolved = 0
        #: Ordering keys resumed after a failure.
        self.resumed_keys = 0
        #: Messages sent again one per request after Pub/Sub refused their request as
        #: invalid (to reject only the message at fault).
        self.isolated = 0
        #: Events rejected for good, per reason.
        self.rejected: Counter[str] = Counter()

    # -- the client -----------------------------------------------------------------------

    @property
    def publisher(self) -> Any:
        """The ``google.cloud.pubsub_v1.PublisherClient`` (created on first use)."""
        with self._lock:
            if self._closed:
                raise ExportError("the pubsub exporter is closed")
            if self._publisher is None:
                self._publisher = self._new_publisher()
            return self._publisher

    def _new_publisher(self) -> Any:
        # Imported here: google.cloud.pubsub takes about a second to import, which
        # `flagsink validate` and settings checks need not pay.
        import grpc  # type: ignore[import-untyped]  # noqa: PLC0415
        from google.api_core import exceptions as api  # noqa: PLC0415
        from google.api_core.retry import Retry, if_exception_type  # noqa: PLC0415
        from google.auth import exceptions as auth  # noqa: PLC0415
        from google.cloud import pubsub_v1  # type: ignore[import-untyped]  # noqa: PLC0415
        from google.pubsub_v1.services.publisher.transports import (  # noqa: PLC0415
            PublisherGrpcTransport,
        )

        config = self.settings
        timeout = config.publish_timeout
        if self.ordering:
            # The client would retry a publish with an ordering key forever (and ignore
            # our deadline); one try per request, and the scheduler's backoff retries.
            retry: Retry | None = None
        else:
            retry = Retry(
                initial=0.1,
                maximum=min(timeout, 5.0),
                multiplier=2.0,
                timeout=timeout,
                predicate=if_exception_type(
                    api.Aborted,
                    api.Cancelled,
                    api.DeadlineExceeded,
                    api.InternalServerError,
                    api.ResourceExhausted,
                    api.ServiceUnavailable,
                    api.Unknown,
                ),
            )
        kwargs: dict[str, Any] = {}
        emulator = os.environ.get(EMULATOR_ENV)
        if emulator:
            # What the client does for the emulator, with the options its channels to the
            # real service get (no 4 MB cap on messages) and the reconnect options.
            options = [
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", -1),
                *RECONNECT_OPTIONS,
            ]
            channel = grpc.insecure_channel(emulator, options=options)
            kwargs["transport"] = PublisherGrpcTransport(channel=channel)
        else:
            kwargs["transport"] = _transport_with_reconnect_options
            if self._credentials is not None:
                kwargs["credentials"] = self._credentials
            if config.endpoint is not None:
                kwargs["client_options"] = {"api_endpoint": config.endpoint}
        try:
            return pubsub_v1.PublisherClient(
                batch_settings=pubsub_v1.types.BatchSettings(
                    max_bytes=config.batch_max_bytes,
                    max_latency=config.batch_max_latency,
                    max_messages=config.batch_max_messages,
                ),
                publisher_options=pubsub_v1.types.PublisherOptions(
                    enable_message_ordering=self.ordering, retry=retry, timeout=timeout
                ),
                **kwargs,
            )
        except auth.DefaultCredentialsError:
            raise ExportError(
                f"no Google credentials found to publish to {self.topic_path}: set "
                "credentialsFile, or provide Application Default Credentials "
                "(GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`, "
                f"or the metadata server of a Google Cloud runtime); or set {EMULATOR_ENV} "
                "for the emulator"
            ) from None

    # -- export ---------------------------------------------------------------------------

    def export(self, events: Sequence[Event]) -> None:
        """Publish every event; raise for exactly the ones not delivered."""
        publisher = self.publisher
        records, unencodable = encode_records(events)
        rejected: list[_Refused] = [
            (event, UNENCODABLE, _REASONS[UNENCODABLE]) for event in unencodable
        ]
        topic = self.topic_path
        ordering_key = self._ordering_key
        attributes = self._attributes
        from google.cloud.pubsub_v1.publisher.exceptions import (  # type: ignore[import-untyped]  # noqa: PLC0415
            MessageTooLargeError,
        )

        sent: list[_Sent] = []
        for event, data in records:
            key = ""
            attrs: dict[str, str] = {}
            try:
                if len(data) > MAX_BATCH_BYTES:
                    raise _Rejected(
                        TOO_LARGE,
                        f"message of {len(data)} bytes over Pub/Sub's {MAX_BATCH_BYTES} byte limit",
                    )
                if ordering_key is not None:
                    key = ordering_key(event)
                    if (
                        len(key) * 4 > MAX_ORDERING_KEY_BYTES
                        and (size := len(key.encode("utf-8", "surrogatepass")))
                        > MAX_ORDERING_KEY_BYTES
                    ):
                        raise _Rejected(
                            ORDERING_KEY_TOO_LONG,
                            f"ordering key of {size} bytes over {MAX_ORDERING_KEY_BYTES} bytes",
                        )
                attrs = attributes(event)
                future = publisher.publish(topic, data, ordering_key=key, **attrs)
            except _Rejected as exc:
                rejected.append((event, exc.reason, exc.detail))
                continue
            except MessageTooLargeError as exc:
                rejected.append((event, TOO_LARGE, f"{_REASONS[TOO_LARGE]}: {_describe(exc)}"))
                continue
            except (TypeError, ValueError) as exc:  # the client cannot build this message
                rejected.append((event, INVALID, f"{_REASONS[INVALID]}: {_describe(exc)}"))
                continue
            except (RuntimeError, AssertionError) as exc:
                # RuntimeError: the publisher is stopped. AssertionError: the ordered
                # sequencer of google-cloud-pubsub 2.x asserts when a message is added
                # while a failed batch of its key is being torn down. Either way the
                # message was not sent: it fails and is retried.
                future = concurrent.futures.Future()
                future.set_exception(exc)
            sent.append(_Sent(event, data, key, attrs, future))

        outcome = self._collect(sent, rejected)
        failed, first_error = outcome.failed, outcome.error
        self.failed += len(failed)
        if rejected:
            self._reject(rejected, len(events))
        if not failed and not rejected:
            return
        message = self._summary(len(events), failed, first_error, rejected)
        if failed and len(failed) == len(events):
            raise ExportError(message) from first_error
        raise PartialExportError(
            message,
            failed=failed,
            rejected=[event for event, _, _ in rejected],
            reasons=[detail for _, _, detail in rejected],
        ) from first_error

    def _collect(self, sent: list[_Sent], rejected: list[_Refused]) -> _Outcome:
        """Wait for the futures; the events that failed (in order) and the first error."""
        from google.api_core import exceptions as api  # noqa: PLC0415

        _done, pending = concurrent.futures.wait(
            [item.future for item in sent], timeout=self._wait_timeout
        )
        outcome = _Outcome()
        paused: set[str] = set()
        suspects: list[_Sent] = []
        for item in sent:
            if item.future in pending:
                item.state = _FAILED
                continue
            error = item.future.exception()
            if error is None:
                item.state = _PUBLISHED
                continue
            outcome.note(error)
            if item.key:
                paused.add(item.key)
            if isinstance(error, api.InvalidArgument):
                # The request was refused, maybe for one message of it: find which.
                suspects.append(item)
            else:
                item.state = _FAILED
        if suspects:
            self._isolate(suspects, outcome)
        for item in sent:
            if item.state == _PUBLISHED:
                outcome.published += 1
            elif item.state == _FAILED:
                outcome.failed.append(item.event)
            else:
                rejected.append((item.event, INVALID, item.reason))
        self.published += outcome.published
        if pending:
            self.unresolved += len(pending)
            self._pending = [future for future in self._pending if not future.done()]
            self._pending.extend(pending)
            logger.warning(
                "pubsub %s: %d messages still unconfirmed after %.1f s; they go back for "
                "retry and may be delivered twice",
                self.topic_path,
                len(pending),
                self._wait_timeout,
            )
            outcome.note(
                TimeoutError(
                    f"{len(pending)} publishes unconfirmed after {self._wait_timeout:.1f} s"
                )
            )
        if paused:
            self._resume(paused)
        return outcome

    def _isolate(self, suspects: list[_Sent], outcome: _Outcome) -> None:
        """Send the messages of refused requests one per request: those refused alone are
        rejected; the others are published (or failed, and the rest after them with them,
        when the service cannot be reached)."""
        from google.api_core import exceptions as api  # noqa: PLC0415
        from google.pubsub_v1 import PubsubMessage  # noqa: PLC0415
        from google.pubsub_v1.services.publisher import (  # noqa: PLC0415
            PublisherClient as GapicPublisher,
        )

        if self._gapic is None:
            self._gapic = GapicPublisher(transport=self._publisher.transport)
        unreachable = False
        for item in suspects:
            if unreachable:
                item.state = _FAILED
                continue
            message = PubsubMessage(
                data=item.data, attributes=item.attributes, ordering_key=item.key
            )
            try:
                self._gapic.publish(
                    topic=self.topic_path,
                    messages=[message],
                    retry=None,
                    timeout=self.settings.publish_timeout,
                )
            except api.InvalidArgument as exc:
                item.state = _REJECTED
                item.reason = f"Pub/Sub refused the message: {_describe(exc)}"
                logger.error(  # the flag's key, never the user's (it may be personal)
                    "pubsub %s: the message of a %s event for %r was refused: %s",
                    self.topic_path,
                    item.event.kind,
                    item.event.key[:100],
                    _describe(exc),
                )
            except api.GoogleAPICallError as exc:
                item.state = _FAILED
                outcome.note(exc)
                unreachable = True
            else:
                item.state = _PUBLISHED
        self.isolated += len(suspects)

    def _resume(self, keys: set[str]) -> None:
        """Resume ordering keys paused by a failed publish, so their retry can be sent."""
        publisher = self._publisher
        for key in keys:
            try:
                publisher.resume_publish(self.topic_path, key)
            except (RuntimeError, ValueError):  # not paused (still in flight), or stopped
                continue
            self.resumed_keys += 1

    def _reject(self, rejected: list[_Refused], total: int) -> None:
        """Count and log the refused events, per reason (the scheduler dead-letters them)."""
        counts = Counter(reason for _, reason, _ in rejected)
        for reason, count in counts.items():
            self.rejected[reason] += count
            logger.error(
                "pubsub %s: %d of %d events rejected for good (%s)",
                self.topic_path,
                count,
                total,
                _REASONS[reason],
            )

    def _summary(
        self,
        total: int,
        failed: list[Event],
        error: BaseException | None,
        rejected: list[_Refused],
    ) -> str:
        parts = []
        if failed:
            cause = f": {_describe(error)}{self._hint(error)}" if error is not None else ""
            parts.append(f"{len(failed)} of {total} messages not published{cause}")
        for reason, count in Counter(reason for _, reason, _ in rejected).items():
            parts.append(f"{count} rejected ({_REASONS[reason]})")
        return f"pubsub {self.topic_path}: " + "; ".join(parts)

    def _hint(self, error: BaseException) -> str:
        from google.api_core import exceptions as api  # noqa: PLC0415

        if isinstance(error, api.NotFound):
            return (
                f" (topic {self.topic_path} does not exist, or these credentials cannot "
                "see it: create it, or fix `topic`/`projectID`; the events are kept)"
            )
        if isinstance(error, api.PermissionDenied | api.Unauthenticated):
            return (
                f" (the credentials may not publish to {self.topic_path}: they need "
                "pubsub.topics.publish, e.g. role roles/pubsub.publisher; the events are kept)"
            )
        return ""

    # -- shutdown -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the publisher (it sends what it still holds), wait up to
        :data:`CLOSE_TIMEOUT` seconds for publishes in flight, and close its channel."""
        with self._lock:
            self._closed = True
            publisher, self._publisher = self._publisher, None
            self._gapic = None
        if publisher is None:
            return
        with contextlib.suppress(RuntimeError):  # already stopped
            publisher.stop()
        pending = [future for future in self._pending if not future.done()]
        if pending:
            _, left = concurrent.futures.wait(pending, timeout=CLOSE_TIMEOUT)
            if left:
                logger.warning(
                    "pubsub %s: closed with %d publishes unconfirmed", self.topic_path, len(left)
                )
        self._pending = []
        try:
            publisher.transport.close()
        except Exception:  # the channel is going away anyway
            logger.debug("pubsub: closing the channel failed", exc_info=True)

    def counters(self) -> dict[str, Any]:
        """A snapshot of this exporter's own counters."""
        return {
            "published": self.published,
            "failed": self.failed,
            "unresolved": self.unresolved,
            "resumed_keys": self.resumed_keys,
            "isolated": self.isolated,
            "rejected": dict(self.rejected),
        }


def _attribute_renderer(config: PubSubSettings) -> Attributes:
    """A function giving each event's attributes: constants plus rendered templates."""
    constant: dict[str, str] = {}
    if config.emitter is not None:
        constant["emitter"] = config.emitter
    templated: list[tuple[str, Callable[[Event], str]]] = []
    for name, value in config.attributes.items():
        if "{{" in value:
            templated.append((name, key_renderer(value, setting=f"attributes.{name}")))
        else:
            constant[name] = value
    if not templated:
        return lambda _event: constant

    def render(event: Event) -> dict[str, str]:
        attributes = dict(constant)
        for name, template in templated:
            value = template(event)
            if (
                len(value) * 4 > MAX_ATTRIBUTE_VALUE_BYTES
                and (size := len(value.encode("utf-8", "surrogatepass")))
                > MAX_ATTRIBUTE_VALUE_BYTES
            ):
                raise _Rejected(
                    ATTRIBUTE_TOO_LONG,
                    f"attribute {name!r}: value of {size} bytes over "
                    f"{MAX_ATTRIBUTE_VALUE_BYTES} bytes",
                )
            attributes[name] = value
        return attributes

    return render


def _transport_with_reconnect_options(**kwargs: Any) -> Any:
    """The client's gRPC transport, its channel created with :data:`RECONNECT_OPTIONS`."""
    from google.pubsub_v1.services.publisher.transports import (  # noqa: PLC0415
        PublisherGrpcTransport,
    )

    def channel(host: str, **options: Any) -> Any:
        options["options"] = [*options.get("options", ()), *RECONNECT_OPTIONS]
        return PublisherGrpcTransport.create_channel(host, **options)

    return PublisherGrpcTransport(channel=channel, **kwargs)


_KEY_TYPES = ("service_account", "authorized_user")


def _load_credentials(path: str) -> Credentials:
    """Credentials from a key file; :class:`SettingsError` if it is unusable.

    Messages name the file and the problem, never its content.
    """
    from google.oauth2 import credentials as user_credentials  # noqa: PLC0415
    from google.oauth2 import service_account  # noqa: PLC0415

    setting = "credentialsFile"
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            info = json.load(handle)
    except FileNotFoundError:
        raise SettingsError(setting, f"file {path!r} does not exist") from None
    except OSError as exc:
        raise SettingsError(setting, f"cannot read {path!r}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise SettingsError(setting, f"{path!r} is not a JSON credentials file") from None
    kind = info.get("type") if isinstance(info, dict) else None
    if kind not in _KEY_TYPES:
        raise SettingsError(
            setting,
            f"{path!r} holds credentials of type {kind!r}; credentialsFile takes "
            f"{' or '.join(_KEY_TYPES)} keys. For other kinds (workload identity "
            "federation, impersonation) point GOOGLE_APPLICATION_CREDENTIALS at the file "
            "and leave credentialsFile out",
        )
    loader: Callable[..., Credentials]
    if kind == "service_account":
        loader = service_account.Credentials.from_service_account_info
    else:
        loader = user_credentials.Credentials.from_authorized_user_info
    try:
        credentials: Credentials = loader(info, scopes=list(SCOPES))
    except (ValueError, TypeError):
        raise SettingsError(
            setting, f"{path!r} is not a usable {kind} key (missing fields or a malformed key)"
        ) from None
    return credentials


def _describe(error: BaseException | None) -> str:
    """A one-line description of a publish error."""
    if error is None:
        return ""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__
