"""Settings of the ``webhook`` exporter (keys as in GO Feature Flag's relay configuration)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
from pydantic import ConfigDict, Field, SecretStr, field_validator

from flagsink.exporter import ExporterSettings

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_TIMEOUT",
    "HeaderValue",
    "WebhookSettings",
    "redacted_url",
]

#: The largest body flagsink's relay accepts by default (its ``maxBodyBytes``).
DEFAULT_MAX_BODY_BYTES = 5 * 1024 * 1024
#: GO Feature Flag's webhook client timeout.
DEFAULT_TIMEOUT = 10.0

HeaderValue = SecretStr | list[SecretStr]

# RFC 9110 token characters: what a header name may hold.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Header values: visible ASCII, spaces and tabs; never CR, LF or other controls.
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")
# Set by the HTTP client from the body: a configured value would corrupt the request.
_CLIENT_HEADERS = frozenset({"content-length", "transfer-encoding", "host", "connection"})


class WebhookSettings(ExporterSettings):
    """Settings of the ``webhook`` exporter."""

    # Values (header values, the secret) are never echoed in validation errors.
    model_config = ConfigDict(hide_input_in_errors=True)

    endpoint_url: str = Field(
        description="URL the batches are POSTed to (`http://` or `https://`), e.g. "
        "`https://example.com/flag-events` or a flagsink relay's "
        "`http://relay:1031/v1/data/collector`.",
    )
    secret: SecretStr | None = Field(
        None,
        description="Signs each body: header `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 "
        "of the body with this secret>`, as GO Feature Flag and GitHub do (default: unsigned).",
    )
    meta: dict[str, str] = Field(
        default_factory=dict,
        description="Sent as the body's `meta` object, with `hostname` added (this host's "
        "name) unless set here.",
    )
    headers: dict[str, HeaderValue] = Field(
        default_factory=dict,
        description="Extra request headers, e.g. `Authorization: Bearer ...`; a list gives a "
        "header several values. Values are secrets: never logged. `Content-Type` is always "
        "`application/json`.",
    )
    timeout: float = Field(
        DEFAULT_TIMEOUT,
        gt=0,
        description="Seconds allowed for each network step of a request (connect, send, "
        "wait for the answer) before it fails and is retried.",
    )
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES,
        ge=1024,
        description="Largest request body in bytes: larger batches are split into several "
        "requests (default 5 MiB, the relay's own limit). An event that alone exceeds it is "
        "rejected.",
    )

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redacted_url(value) if name == "endpoint_url" else value

    @field_validator("endpoint_url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        value = value.strip()
        try:
            url = httpx.URL(value)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ValueError(f"not a valid URL: {exc}") from None
        if url.scheme not in ("http", "https"):
            raise ValueError("must start with http:// or https://")
        if not url.host:
            raise ValueError("needs a host, e.g. https://example.com/events")
        if url.fragment:
            raise ValueError("must not have a #fragment")
        return value

    @field_validator("meta", mode="before")
    @classmethod
    def _scalars_as_text(cls, value: Any) -> Any:
        # GO Feature Flag's meta is map[string]string; YAML numbers and booleans are text.
        if not isinstance(value, dict):
            return value
        return {
            key: (str(item).lower() if isinstance(item, bool) else str(item))
            if isinstance(item, bool | int | float)
            else item
            for key, item in value.items()
        }

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, value: dict[str, HeaderValue]) -> dict[str, HeaderValue]:
        for name, item in value.items():
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in _CLIENT_HEADERS:
                raise ValueError(f"{name} is set by the HTTP client; remove it")
            for secret in item if isinstance(item, list) else [item]:
                if not _FIELD_VALUE.fullmatch(secret.get_secret_value()):
                    # Never echo the value: it may be a credential.
                    raise ValueError(
                        f"the value of {name} must be printable ASCII (no line breaks)"
                    )
        return value


def redacted_url(url: str) -> str:
    """``url`` as logs and errors show it: no user info, no query string, and only the
    first path segment (webhook URLs often carry a token in the path)."""
    if not url:
        return ""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid URL>"
    first, _, rest = parsed.path.lstrip("/").partition("/")
    path = f"/{first}" + ("/…" if rest else "") + ("?…" if parsed.query else "")
    if not parsed.host:  # a relative URL (a redirect's Location)
        return path
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{host}{port}{path}"
