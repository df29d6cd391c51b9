"""The ``kinesis`` exporter: events to an Amazon Kinesis data stream with ``PutRecords``.

Each event becomes one record: its GO Feature Flag JSON, keyed by the ``partitionKey``
template (the user key by default, so users spread over the shards and each user's
events stay in order on one shard). A batch handed over by the scheduler goes out in
``PutRecords`` requests of at most 500 records and 5 MiB, one after the other (records of
one key keep their order). Kinesis answers per record: the records it refused
(throttling, internal failures) are reported back to the scheduler as
``PartialExportError.failed`` and retried alone, in order; the others are never sent
twice. A record over 1 MiB (data + partition key) can never be accepted: it is rejected,
counted, logged and handed back as ``PartialExportError.rejected`` with its reason, which
the scheduler writes to the exporter's ``deadLetterFile``.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from botocore import exceptions as boto  # type: ignore[import-untyped]

from flagsink.event import Event
from flagsink.exporter import Exporter, ExportError, PartialExportError, SettingsError
from flagsink.exporters.records import encode_records, key_renderer
from flagsink_kinesis.settings import KinesisSettings, is_hash_key, parse_stream_arn

__all__ = [
    "MAX_RECORDS_PER_REQUEST",
    "MAX_RECORD_BYTES",
    "MAX_REQUEST_BYTES",
    "KinesisExporter",
]

logger = logging.getLogger("flagsink.kinesis")

#: Kinesis limits of one PutRecords request, and of one record (data + partition key).
MAX_RECORDS_PER_REQUEST = 500
MAX_REQUEST_BYTES = 5 * 1024 * 1024
MAX_RECORD_BYTES = 1024 * 1024
_MAX_KEY_CHARS = 256
_EMPTY_KEY = "default"

_ACCESS_CODES = frozenset(
    {
        "AccessDeniedException",
        "ExpiredToken",
        "ExpiredTokenException",
        "IncompleteSignature",
        "IncompleteSignatureException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "MissingAuthenticationToken",
        "UnrecognizedClientException",
    }
)
_THROTTLE_CODES = frozenset(
    {"LimitExceededException", "ProvisionedThroughputExceededException", "ThrottlingException"}
)

# One record on its way: the event, the PutRecords entry, its size in bytes.
_Pending = tuple[Event, dict[str, Any], int]


class KinesisExporter(Exporter[KinesisSettings]):
    """Sends events to a Kinesis data stream, near real time, with ``PutRecords``.

    :param settings: a :class:`~flagsink_kinesis.KinesisSettings`, or pass its keys as
        keyword options (``streamName="flag-events", region="eu-west-1"``).
    :param client: a ready boto3 Kinesis client to use instead of building one (its
        region, endpoint, credentials and retry settings are used: do not set ``region``
        or ``endpointUrl`` too). The caller keeps ownership: :meth:`close` leaves it open.
    :param session: a boto3 ``Session`` to build the client from (a profile, assumed-role
        credentials); default: a new session on boto3's standard credential chain.
    :param config: a ``botocore.config.Config`` merged over the exporter's defaults
        (5 s connect timeout, 30 s read timeout, standard retry mode with 3 attempts,
        no client-side parameter validation).
    """

    kind = "kinesis"
    bulk = False
    settings_model = KinesisSettings

    def __init__(
        self,
        settings: KinesisSettings | None = None,
        /,
        *,
        client: Any = None,
        session: Any = None,
        config: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(settings, **options)
        settings = self.settings
        if client is not None and (session is not None or config is not None):
            raise TypeError("pass either client= or session=/config=, not both")
        if client is not None and (settings.region or settings.endpoint_url):
            raise TypeError(
                "a ready client= carries its own region and endpoint: do not also set "
                "region or endpointUrl"
            )
        if settings.stream_arn is not None:
            self._target: dict[str, str] = {"StreamARN": settings.stream_arn}
            if settings.stream_name is not None:
                _, arn_name = parse_stream_arn(settings.stream_arn)
                log = logger.info if arn_name == settings.stream_name else logger.warning
                log(
                    "kinesis: both streamArn and streamName are set: writing to streamArn %s "
                    "(streamName %r is ignored)",
                    settings.stream_arn,
                    settings.stream_name,
                )
        else:
            self._target = {"StreamName": str(settings.stream_name)}
        self._render_key = key_renderer(settings.partition_key, setting="partitionKey")
        self._render_hash_key: Callable[[Event], str] | None = None
        if settings.explicit_hash_key is not None:
            self._render_hash_key = key_renderer(
                settings.explicit_hash_key, setting="explicitHashKey"
            )
        #: What this exporter did so far: ``requests`` (PutRecords calls), ``records_sent``,
        #: ``records_failed`` (refused by Kinesis, handed back for retry) and
        #: ``rejected_<reason>`` (``too_large``, ``unencodable``, ``hash_key``).
        self.counters: Counter[str] = Counter()
        self._owns_client = client is None
        self.client: Any = client if client is not None else self._new_client(session, config)

    def _new_client(self, session: Any, config: Any) -> Any:
        import boto3  # type: ignore[import-untyped]  # noqa: PLC0415 - keep plugin import light
        from botocore.config import Config  # type: ignore[import-untyped]  # noqa: PLC0415

        defaults = Config(
            connect_timeout=5,
            read_timeout=30,
            retries={"mode": "standard", "max_attempts": 3},
            tcp_keepalive=True,
            # The exporter builds every request itself within the service's limits;
            # botocore's own check of each entry would cost 40% of the export's CPU.
            parameter_validation=False,
            user_agent_extra="flagsink-kinesis",
        )
        if config is not None:
            defaults = defaults.merge(config)
        region = self.settings.region
        if region is None and self.settings.stream_arn is not None:
            region, _ = parse_stream_arn(self.settings.stream_arn)
        if session is None:
            session = boto3.session.Session()
        try:
            return session.client(
                "kinesis",
                region_name=region,
                endpoint_url=self.settings.endpoint_url,
                config=defaults,
            )
        except boto.InvalidRegionError:
            raise SettingsError("region", f"{region!r} is not a valid region name") from None
        except ValueError as exc:
            raise SettingsError("endpointUrl", str(exc)) from None

    # -- export ---------------------------------------------------------------------------

    def export(self, events: Sequence[Event]) -> None:
        """Put ``events`` on the stream; raise for the ones that did not make it."""
        records, unencodable = encode_records(events)
        rejected: list[tuple[Event, str, str]] = [
            (event, "unencodable", "a value is not JSON-serialisable") for event in unencodable
        ]
        pending: list[_Pending] = []
        render_key = self._render_key
        render_hash_key = self._render_hash_key
        for event, data in records:
            key = render_key(event)
            if not key:
                key = _EMPTY_KEY
            elif len(key) > _MAX_KEY_CHARS:
                key = hashlib.sha256(key.encode()).hexdigest()
            size = len(data) + len(key.encode())
            if size > MAX_RECORD_BYTES:
                reason = (
                    f"record of {size} bytes (data + partition key) is over the "
                    f"{MAX_RECORD_BYTES}-byte (1 MiB) limit of a Kinesis record"
                )
                rejected.append((event, "too_large", reason))
                continue
            entry: dict[str, Any] = {"Data": data, "PartitionKey": key}
            if render_hash_key is not None:
                hash_key = render_hash_key(event)
                if hash_key:
                    if not is_hash_key(hash_key):
                        reason = f"explicitHashKey {hash_key[:50]!r} is not an integer 0..2^128-1"
                        rejected.append((event, "hash_key", reason))
                        continue
                    entry["ExplicitHashKey"] = hash_key
            pending.append((event, entry, size))
        if rejected:
            self._reject(rejected, len(events))
        failed, codes, error = self._put_all(pending)
        if not failed and not rejected:
            return
        sent = len(pending) - len(failed)
        parts = []
        if error is not None:
            parts.append(self._explain(error))
        if codes:
            refused = ", ".join(f"{code} x{count}" for code, count in codes.most_common())
            parts.append(f"Kinesis refused {sum(codes.values())} records ({refused})")
        if failed:
            parts.append(f"{len(failed)} of {len(events)} events to retry, {sent} delivered")
        if rejected:
            parts.append(f"{len(rejected)} rejected for good ({_summary(rejected)})")
        message = f"stream {self.settings.stream_label}: " + "; ".join(parts)
        if error is not None and sent == 0 and not rejected:
            raise ExportError(message) from error
        raise PartialExportError(
            message,
            failed=failed,
            rejected=[event for event, _, _ in rejected],
            reasons=[reason for _, _, reason in rejected],
        )

    def _put_all(
        self, pending: list[_Pending]
    ) -> tuple[list[Event], Counter[str], Exception | None]:
        """Send ``pending`` in chunks; the events to retry (in order), the error codes of
        the refused records, and the error that stopped the sending, if any."""
        failed: list[Event] = []
        codes: Counter[str] = Counter()
        counters = self.counters
        for start, end in _chunks([size for _, _, size in pending]):
            chunk = pending[start:end]
            counters["requests"] += 1
            try:
                answer = self.client.put_records(
                    Records=[entry for _, entry, _ in chunk], **self._target
                )
            except Exception as exc:
                # Nothing of this chunk is known to be stored: it and every later one are
                # retried. (A response lost after Kinesis stored the records makes the
                # retry a duplicate: the protocol cannot tell.)
                rest = [event for event, _, _ in pending[start:]]
                failed.extend(rest)
                counters["records_failed"] += len(rest)
                return failed, codes, exc
            results = answer.get("Records") or []
            chunk_failed = 0
            for index, (event, _, _) in enumerate(chunk):
                code = results[index].get("ErrorCode") if index < len(results) else "NoResult"
                if code:
                    failed.append(event)
                    codes[str(code)] += 1
                    chunk_failed += 1
            counters["records_sent"] += len(chunk) - chunk_failed
            counters["records_failed"] += chunk_failed
        return failed, codes, None

    def _reject(self, rejected: list[tuple[Event, str, str]], total: int) -> None:
        for _, counter, _ in rejected:
            self.counters[f"rejected_{counter}"] += 1
        logger.error(
            "kinesis: stream %s: %d of %d events rejected for good: %s",
            self.settings.stream_label,
            len(rejected),
            total,
            _summary(rejected),
        )

    # -- errors ---------------------------------------------------------------------------

    def _explain(self, exc: Exception) -> str:
        if isinstance(exc, boto.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code") or "")
            if code == "ResourceNotFoundException":
                return (
                    f"the stream does not exist at {self._endpoint()} (region "
                    f"{self._region()}): create it or fix `streamArn` / `streamName`"
                )
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _ACCESS_CODES or status == 403:
                return (
                    f"access denied ({code}): check the credentials and that they allow "
                    "kinesis:PutRecords on the stream"
                )
            if code.startswith("KMS"):
                return (
                    f"the stream's KMS key refused the records ({code}): allow "
                    "kms:GenerateDataKey on the key"
                )
            if code in _THROTTLE_CODES:
                return f"throttled ({code}): add shards or lower the event rate"
            message = str(error.get("Message") or "no message")[:300]
            return f"PutRecords failed: {code or status}: {message}"
        if isinstance(exc, (boto.NoCredentialsError, boto.PartialCredentialsError)):
            return (
                f"no usable AWS credentials ({type(exc).__name__}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile (AWS_PROFILE), or run with a role"
            )
        if isinstance(exc, boto.ConnectionError):
            return f"cannot reach {self._endpoint()}: {exc}"
        return f"PutRecords failed: {type(exc).__name__}: {exc}"

    def _endpoint(self) -> str:
        url = getattr(getattr(self.client, "meta", None), "endpoint_url", None)
        return str(url or self.settings.endpoint_url or "Kinesis")

    def _region(self) -> str:
        region = getattr(getattr(self.client, "meta", None), "region_name", None)
        return str(region or self.settings.region or "?")

    def close(self) -> None:
        """Close the client's connections, unless the client was passed in. Nothing is
        buffered here: the scheduler holds every event not yet delivered."""
        if self._owns_client:
            close = getattr(self.client, "close", None)
            if close is not None:
                close()


def _chunks(sizes: Sequence[int]) -> Iterator[tuple[int, int]]:
    """``(start, end)`` slices of at most 500 records and 5 MiB (every size <= 1 MiB)."""
    start = 0
    total = 0
    for index, size in enumerate(sizes):
        if index - start == MAX_RECORDS_PER_REQUEST or total + size > MAX_REQUEST_BYTES:
            yield start, index
            start, total = index, 0
        total += size
    if start < len(sizes):
        yield start, len(sizes)


def _summary(rejected: list[tuple[Event, str, str]]) -> str:
    reasons = Counter(reason for _, _, reason in rejected)
    shown = [f"{count} x {reason}" for reason, count in reasons.most_common(3)]
    if len(reasons) > 3:
        shown.append(f"{len(reasons) - 3} more reasons")
    return "; ".join(shown)
