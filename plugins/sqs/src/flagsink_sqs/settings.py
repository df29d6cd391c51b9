"""Settings of the ``sqs`` exporter."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from flagsink.exporter import ExporterSettings
from flagsink.exporters.records import key_renderer

__all__ = [
    "DEFAULT_EMITTER",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MESSAGE_GROUP_ID",
    "MAX_MESSAGE_BYTES",
    "SqsSettings",
    "queue_endpoint",
    "queue_region",
]

DEFAULT_EMITTER = "flagsink"
#: FIFO queues: each user's events in order, users processed in parallel.
DEFAULT_MESSAGE_GROUP_ID = "{{ .UserKey}}"
#: The classic SQS limit of a message, and of a whole SendMessageBatch request.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
#: The largest message SQS accepts today (queues created since August 2025 default to it).
MAX_MESSAGE_BYTES = 1024 * 1024

_REGION = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")
# A region label inside an AWS host name: us-east-1, eu-central-2, us-gov-west-1, ...
_REGION_LABEL = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-\d{1,2}$")
_AWS_HOSTS = (".amazonaws.com", ".amazonaws.com.cn", ".api.aws")
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")


def _is_aws_host(host: str) -> bool:
    return host.endswith(_AWS_HOSTS) or host in {"queue.amazonaws.com"}


def queue_region(url: str) -> str | None:
    """The region in an AWS queue URL (``https://sqs.eu-west-1.amazonaws.com/...``), if any."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "queue.amazonaws.com":  # the legacy us-east-1 host
        return "us-east-1"
    if not _is_aws_host(host):
        return None
    for label in host.split("."):
        if _REGION_LABEL.match(label):
            return label
    return None


def queue_endpoint(url: str) -> str | None:
    """``scheme://host:port`` of a queue URL outside AWS (LocalStack, ElasticMQ, moto),
    used as the endpoint when ``endpointUrl`` is not set; ``None`` for an AWS URL."""
    parts = urlsplit(url)
    if _is_aws_host((parts.hostname or "").lower()):
        return None
    return f"{parts.scheme}://{parts.netloc}"


class SqsSettings(ExporterSettings):
    """Settings of the ``sqs`` exporter: the queue and the messages' attributes."""

    queue_url: str = Field(
        description="URL of the queue, e.g. "
        "`https://sqs.eu-west-1.amazonaws.com/111122223333/flag-events` (a name ending in "
        "`.fifo` is a FIFO queue). Outside AWS (LocalStack, ElasticMQ) its "
        "`scheme://host:port` is the default `endpointUrl`.",
    )
    region: str | None = Field(
        None,
        description="AWS region of the queue, e.g. `eu-west-1` (default: the region in "
        "`queueUrl`, else boto3's chain: `AWS_REGION` / `AWS_DEFAULT_REGION`, then the "
        "profile's `region`).",
    )
    endpoint_url: str | None = Field(
        None,
        description="Endpoint of the SQS API, e.g. `http://127.0.0.1:4566` (default: AWS, "
        "boto3's `AWS_ENDPOINT_URL_SQS` / `AWS_ENDPOINT_URL`, or the origin of a "
        "`queueUrl` outside AWS).",
    )
    emitter: str | None = Field(
        DEFAULT_EMITTER,
        description="Value of the `emitter` message attribute of every message (GO "
        'Feature Flag sends `"GO Feature Flag"`); `null` sends no attribute.',
    )
    message_group_id: str | None = Field(
        None,
        description="Template of each message's group id. FIFO queues: messages of one "
        "group are delivered in order (default `{{ .UserKey}}`). Standard queues: sent "
        "only when set (fair queues). A result that SQS would refuse (empty, over 128 "
        "characters, other than ASCII letters, digits and punctuation) becomes its SHA-256 "
        "in hex.",
    )
    max_message_size: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES,
        ge=1024,
        le=MAX_MESSAGE_BYTES,
        description="Largest message in bytes (body + attributes), also the largest "
        "SendMessageBatch request: larger events are rejected. Default 262144 (256 KiB) "
        "works with every queue; up to 1048576 (1 MiB) for queues whose "
        "`MaximumMessageSize` allows it.",
    )
    concurrent_requests: int = Field(
        4,
        ge=1,
        le=64,
        description="SendMessageBatch requests in flight at once for a standard queue "
        "(FIFO queues: always 1, to keep each group's order).",
    )

    @field_validator("queue_url")
    @classmethod
    def _valid_queue_url(cls, url: str) -> str:
        parts = urlsplit(url)
        segments = [segment for segment in parts.path.split("/") if segment]
        name = segments[-1] if len(segments) >= 2 else ""  # /ACCOUNT/NAME
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"{url!r} is not a queue URL such as "
                "`https://sqs.eu-west-1.amazonaws.com/111122223333/flag-events`"
            )
        base = name.removesuffix(".fifo")
        if not _QUEUE_NAME.match(base) or parts.query or parts.fragment:
            raise ValueError(
                f"{url!r} does not end with /ACCOUNT/QUEUE-NAME (a name has up to 80 "
                "letters, digits, `-` or `_`, plus `.fifo` for a FIFO queue)"
            )
        return url

    @field_validator("region")
    @classmethod
    def _valid_region(cls, region: str | None) -> str | None:
        if region is not None and not _REGION.match(region):
            raise ValueError(f"{region!r} is not a region name such as `eu-west-1`")
        return region

    @field_validator("endpoint_url")
    @classmethod
    def _valid_endpoint(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^https?://[^\s/?#]+", url):
            raise ValueError(
                f"{url!r} must be an http:// or https:// URL such as `http://127.0.0.1:4566`"
            )
        return url

    @field_validator("emitter")
    @classmethod
    def _valid_emitter(cls, emitter: str | None) -> str | None:
        if emitter is not None and not emitter:
            raise ValueError("must not be empty: use null to send no attribute")
        return emitter

    @field_validator("message_group_id")
    @classmethod
    def _valid_group_id(cls, template: str | None) -> str | None:
        if template is not None:
            if not template:
                raise ValueError("must not be empty")
            key_renderer(template, setting="messageGroupId")
        return template

    @property
    def fifo(self) -> bool:
        """True for a FIFO queue (its name ends in ``.fifo``)."""
        return self.queue_url.rstrip("/").endswith(".fifo")
