"""Settings of the ``kafka`` exporter, nested as GO Feature Flag's goff-proxy.yaml nests them::

exporter:
  kind: kafka
  kafka:
    topic: go-feature-flag-events
    addresses: ["localhost:9092"]
    config:                       # librdkafka producer properties, passed through
      security.protocol: SASL_SSL
      sasl.mechanism: PLAIN
      sasl.username: flags
      sasl.password: ${KAFKA_PASSWORD}
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic.alias_generators import to_camel

from flagsink.exporter import ExporterSettings
from flagsink.exporters.records import key_renderer

__all__ = [
    "DEFAULT_KEY_TEMPLATE",
    "PRODUCER_DEFAULTS",
    "KafkaConnection",
    "KafkaSettings",
    "is_secret_property",
]

DEFAULT_KEY_TEMPLATE = "{{ .UserKey}}"

#: What flagsink sets unless ``kafka.config`` says otherwise. Idempotence keeps librdkafka's
#: own retries from writing a message twice; ``acks=all`` is what idempotence requires.
#: librdkafka's ``message.timeout.ms`` is 5 minutes: an export waits for its delivery
#: reports, so flagsink bounds that wait at 10 s (the producer timeout GO Feature Flag's
#: sarama producer uses) and leaves retrying after that to the scheduler's backoff.
PRODUCER_DEFAULTS: dict[str, str] = {
    "enable.idempotence": "true",
    "acks": "all",
    "message.timeout.ms": "10000",
}

#: Properties the exporter owns: every message must get a delivery report, and the
#: callbacks are the exporter's.
_RESERVED = {
    "delivery.report.only.error": "the exporter needs the report of every message",
    "dr_cb": "the exporter sets its own delivery callbacks",
    "dr_msg_cb": "the exporter sets its own delivery callbacks",
    "on_delivery": "the exporter sets its own delivery callbacks",
    "error_cb": "the exporter sets its own error callback",
    "logger": "librdkafka's logs go to the `flagsink.kafka.librdkafka` logger",
    "transactional.id": "transactions are not supported; the idempotent producer is used",
    "bootstrap.servers": "set the brokers with `kafka.addresses`",
    "metadata.broker.list": "set the brokers with `kafka.addresses`",
}

# librdkafka properties holding credentials (sasl.password, ssl.key.password,
# ssl.keystore.password, sasl.oauthbearer.client.secret, ssl.key.pem, ...).
_SECRET = re.compile(r"(password|secret|\.pem$|sasl\.oauthbearer\.config$|jaas)", re.I)
_USER_KEY_ONLY = re.compile(r"^\{\{\s*\.UserKey\s*\}\}$")


def is_secret_property(name: str) -> bool:
    """True for librdkafka properties that hold credentials: never logged or echoed."""
    return bool(_SECRET.search(name))


def is_user_key_template(template: str) -> bool:
    """True when ``template`` renders the user key alone (the exporter's fast path)."""
    return bool(_USER_KEY_ONLY.match(template))


ConfigValue = str | bool | int | float | SecretStr


class KafkaConnection(BaseModel):
    """The ``kafka`` mapping: where to send, and how the producer is configured."""

    # hide_input_in_errors: a validation error must not echo a password it was given.
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        hide_input_in_errors=True,
    )

    topic: str = Field(
        min_length=1,
        max_length=249,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Topic the events are produced to (it must exist, or the brokers must "
        "create topics automatically).",
    )
    addresses: list[str] = Field(
        description="Bootstrap brokers, `host:port`: a list, or one comma-separated string "
        "(librdkafka's `bootstrap.servers`).",
    )
    config: dict[str, ConfigValue] = Field(
        default_factory=dict,
        description="librdkafka producer properties passed through as they are (strings, "
        "numbers or booleans): SASL/SSL, `compression.type`, `linger.ms`, `acks`, ... "
        "Defaults added by flagsink: `enable.idempotence: true`, `acks: all`, "
        "`message.timeout.ms: 10000`. Values of credential properties (`sasl.password`, "
        "`ssl.key.password`, ...) are secrets, never logged.",
    )
    key_template: str = Field(
        DEFAULT_KEY_TEMPLATE,
        description="Message key per event (so one user's events share a partition); an "
        "empty string sends messages without a key.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Headers added to every message, after `kind` (the event kind).",
    )
    close_timeout: float = Field(
        5.0,
        ge=0,
        description="Seconds `close` waits for messages still in the producer to be "
        "delivered; the rest are purged and logged as undelivered.",
    )

    @field_validator("addresses", mode="before")
    @classmethod
    def _split_addresses(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            return [item.strip() if isinstance(item, str) else item for item in value if item]
        return value

    @field_validator("addresses")
    @classmethod
    def _valid_addresses(cls, addresses: list[str]) -> list[str]:
        addresses = [address for address in addresses if address]
        if not addresses:
            raise ValueError("list at least one broker address, e.g. localhost:9092")
        for address in addresses:
            if any(char.isspace() for char in address) or "," in address:
                raise ValueError(f"{address!r} is not a host:port address")
        return addresses

    @field_validator("config", mode="before")
    @classmethod
    def _hide_secrets(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        out: dict[Any, Any] = {}
        for name, item in value.items():
            secret = isinstance(name, str) and is_secret_property(name) and isinstance(item, str)
            out[name] = SecretStr(item) if secret else item
        return out

    @field_validator("config")
    @classmethod
    def _no_reserved(cls, config: dict[str, ConfigValue]) -> dict[str, ConfigValue]:
        for name in config:
            reason = _RESERVED.get(name)
            if reason is not None:
                raise ValueError(f"property {name!r} cannot be set here: {reason}")
            if not name or name != name.strip():
                raise ValueError(f"property {name!r} is not a librdkafka property name")
        return config

    @field_validator("key_template")
    @classmethod
    def _valid_key_template(cls, template: str) -> str:
        if template:
            key_renderer(template, setting="kafka.keyTemplate")
        return template

    @field_validator("headers")
    @classmethod
    def _no_kind_header(cls, headers: dict[str, str]) -> dict[str, str]:
        if "kind" in headers:
            raise ValueError("the `kind` header is set by the exporter (the event kind)")
        return headers

    def producer_config(self) -> dict[str, str]:
        """The librdkafka configuration: flagsink's defaults, then ``config``, then the
        brokers. Secret values are revealed here only, to hand them to librdkafka."""
        config = dict(PRODUCER_DEFAULTS)
        for name, value in self.config.items():
            config[name] = _property_text(value)
        config["bootstrap.servers"] = ",".join(self.addresses)
        return config

    def secret_values(self) -> list[str]:
        """The secret values, to scrub them from any message that might echo them."""
        return [
            value.get_secret_value()
            for value in self.config.values()
            if isinstance(value, SecretStr) and value.get_secret_value()
        ]


def _property_text(value: ConfigValue) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class KafkaSettings(ExporterSettings):
    """Settings of the ``kafka`` exporter."""

    model_config = ConfigDict(**ExporterSettings.model_config, hide_input_in_errors=True)

    kafka: KafkaConnection = Field(
        description="Topic, brokers and producer properties, as in GO Feature Flag's "
        "`kafka:` section; the keys below."
    )
    format: Literal["json"] = Field(
        "json",
        description="Message value format: `json`, the only one (as in GO Feature Flag); "
        "accepted so that GO Feature Flag configs load unchanged.",
    )
