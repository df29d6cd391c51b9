"""Settings of the ``pubsub`` exporter (GO Feature Flag's ``pubsub``: ``projectID``, ``topic``)."""

from __future__ import annotations

import re

from pydantic import AliasChoices, Field, field_validator, model_validator

from flagsink.exporter import ExporterSettings
from flagsink.exporters.records import key_renderer

__all__ = [
    "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTE_KEY_BYTES",
    "MAX_ATTRIBUTE_VALUE_BYTES",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_MESSAGES",
    "MAX_ORDERING_KEY_BYTES",
    "PubSubSettings",
]

# Pub/Sub's documented limits (https://cloud.google.com/pubsub/quotas#resource_limits).
MAX_BATCH_MESSAGES = 1_000
"""Messages per publish request."""
MAX_BATCH_BYTES = 10_000_000
"""Bytes per publish request, and so per message."""
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1_024
MAX_ORDERING_KEY_BYTES = 1_024

# Topic IDs: 3-255 characters, a letter first, then letters, digits and `-_.~+%`.
_TOPIC_ID = re.compile(r"[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}")
_TOPIC_PATH = re.compile(r"projects/(?P<project>[^/\s]+)/topics/(?P<topic>[^/\s]+)")
# Project IDs (6-30 characters), also the older domain-scoped `example.com:my-project`.
_PROJECT_ID = re.compile(r"([a-z0-9.\-]+:)?[a-z][a-z0-9\-]{4,28}[a-z0-9]")
# Names `PublisherClient.publish` takes as its own keyword arguments: attributes are passed
# as `**attributes`, so an attribute with one of these names cannot be sent.
_RESERVED_ATTRIBUTES = frozenset({"topic", "data", "ordering_key", "retry", "timeout"})


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _check_attribute_key(key: str) -> None:
    if not key:
        raise ValueError("an attribute name is empty")
    if key.startswith("goog"):
        raise ValueError(f"attribute {key!r}: names starting with `goog` are reserved by Google")
    if _utf8_len(key) > MAX_ATTRIBUTE_KEY_BYTES:
        raise ValueError(f"attribute {key[:40]!r}...: name over {MAX_ATTRIBUTE_KEY_BYTES} bytes")
    if key in _RESERVED_ATTRIBUTES:
        raise ValueError(
            f"attribute {key!r}: this name cannot be sent by the Python client "
            f"(reserved: {', '.join(sorted(_RESERVED_ATTRIBUTES))})"
        )


class PubSubSettings(ExporterSettings):
    """Settings of the ``pubsub`` exporter."""

    project_id: str | None = Field(
        None,
        alias="projectID",
        validation_alias=AliasChoices("projectID", "projectId", "project_id"),
        description="Google Cloud project of the topic (GO Feature Flag's `projectID`; "
        "`projectId` is accepted too). Required unless `topic` is a full "
        "`projects/PROJECT/topics/TOPIC` name.",
    )
    topic: str = Field(
        description="Topic the events are published to: its ID (`flag-events`) or its full "
        "name (`projects/my-project/topics/flag-events`). It must exist; the exporter "
        "never creates it.",
    )
    emitter: str | None = Field(
        "flagsink",
        description="Value of the `emitter` attribute of every message (GO Feature Flag "
        "sends `GO Feature Flag`); `null` leaves the attribute out.",
    )
    attributes: dict[str, str] = Field(
        default_factory=dict,
        description="More attributes on every message, name -> value. Values are "
        "templates such as `{{ .Kind}}` or `{{ .Key}}`, rendered per event, so "
        "subscriptions can filter on them; text without `{{` is sent as it is.",
    )
    ordering_key: str | None = Field(
        None,
        description="Template of each message's ordering key, e.g. `{{ .UserKey}}`. "
        "Setting it turns on message ordering in the publisher: messages with the same key "
        "are delivered in publish order to subscriptions with ordering enabled. Unset: no "
        "ordering key, no ordering.",
    )
    batch_max_messages: int = Field(
        100,
        ge=1,
        le=MAX_BATCH_MESSAGES,
        description="The publisher sends a batch (one publish request) once it holds this "
        "many messages (at most 1000).",
    )
    batch_max_bytes: int = Field(
        1_000_000,
        ge=1,
        le=MAX_BATCH_BYTES,
        description="... or this many bytes (at most 10000000, Pub/Sub's request limit).",
    )
    batch_max_latency: float = Field(
        0.01,
        ge=0,
        le=60,
        description="... or when its first message has waited this many seconds.",
    )
    publish_timeout: float = Field(
        10.0,
        gt=0,
        le=600,
        description="Seconds one export may spend publishing, transient errors retried "
        "by the client within them (with `orderingKey`: the timeout of each request, tried "
        "once); after that the messages not published go back to the scheduler, which "
        "retries them with backoff.",
    )
    credentials_file: str | None = Field(
        None,
        description="Path of a service-account key (or `gcloud auth application-default "
        "login` user credentials) JSON file. Default: Application Default Credentials; with "
        "`PUBSUB_EMULATOR_HOST` set, no credentials (the emulator).",
    )
    endpoint: str | None = Field(
        None,
        description="API endpoint `host:port`, e.g. a regional endpoint "
        "`europe-west1-pubsub.googleapis.com:443`. Default: the global endpoint. "
        "`PUBSUB_EMULATOR_HOST` takes precedence.",
    )

    @field_validator("project_id")
    @classmethod
    def _valid_project(cls, project: str | None) -> str | None:
        if project is not None and not _PROJECT_ID.fullmatch(project):
            raise ValueError(
                f"not a project ID: {project[:80]!r} (6-30 lowercase letters, digits or "
                "hyphens, a letter first)"
            )
        return project

    @field_validator("topic")
    @classmethod
    def _valid_topic(cls, topic: str) -> str:
        path = _TOPIC_PATH.fullmatch(topic)
        topic_id = path.group("topic") if path else topic
        if topic_id.startswith("goog") or not _TOPIC_ID.fullmatch(topic_id):
            raise ValueError(
                f"not a topic ID: {topic_id[:80]!r} (3-255 letters, digits or `-_.~+%`, a "
                "letter first, not starting with `goog`), or give the full name "
                "`projects/PROJECT/topics/TOPIC`"
            )
        return topic

    @field_validator("emitter")
    @classmethod
    def _short_emitter(cls, emitter: str | None) -> str | None:
        if emitter is not None and _utf8_len(emitter) > MAX_ATTRIBUTE_VALUE_BYTES:
            raise ValueError(f"over {MAX_ATTRIBUTE_VALUE_BYTES} bytes, Pub/Sub's attribute limit")
        return emitter

    @field_validator("attributes")
    @classmethod
    def _valid_attributes(cls, attributes: dict[str, str]) -> dict[str, str]:
        if len(attributes) >= MAX_ATTRIBUTES:
            raise ValueError(f"at most {MAX_ATTRIBUTES - 1} (with `emitter`, {MAX_ATTRIBUTES})")
        for key, value in attributes.items():
            _check_attribute_key(key)
            if key == "emitter":
                raise ValueError("set the `emitter` attribute with the `emitter` key")
            key_renderer(value, setting=f"attributes.{key}")
            if "{{" not in value and _utf8_len(value) > MAX_ATTRIBUTE_VALUE_BYTES:
                raise ValueError(f"attribute {key!r}: value over {MAX_ATTRIBUTE_VALUE_BYTES} bytes")
        return attributes

    @field_validator("ordering_key")
    @classmethod
    def _valid_ordering_key(cls, template: str | None) -> str | None:
        if template is None:
            return None
        if not template.strip():
            raise ValueError("empty; leave orderingKey out to publish without ordering")
        key_renderer(template, setting="orderingKey")
        return template

    @field_validator("credentials_file", "endpoint")
    @classmethod
    def _non_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("empty; leave the key out to use the default")
        return value

    @model_validator(mode="after")
    def _project_known(self) -> PubSubSettings:
        path = _TOPIC_PATH.fullmatch(self.topic)
        if path is None and self.project_id is None:
            raise ValueError(
                "projectID: required (or give `topic` as `projects/PROJECT/topics/TOPIC`)"
            )
        if path is not None and self.project_id not in (None, path.group("project")):
            raise ValueError(
                f"projectID: {self.project_id!r} differs from the project in topic "
                f"({path.group('project')!r}); give one of them"
            )
        return self

    @property
    def topic_path(self) -> str:
        """The topic's full name, ``projects/PROJECT/topics/TOPIC``."""
        if _TOPIC_PATH.fullmatch(self.topic):
            return self.topic
        return f"projects/{self.project_id}/topics/{self.topic}"
