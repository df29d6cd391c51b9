"""flagsink exporter ``webhook``: batches of events POSTed to an HTTP endpoint as GO Feature
Flag's webhook body ``{"meta": {...}, "events": [...]}``, optionally signed with
``X-Hub-Signature-256``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flagsink
from flagsink.exporter import Exporter
from flagsink_webhook.exporter import (
    SIGNATURE_HEADER,
    WebhookExporter,
    WebhookExportError,
    WebhookPartialExportError,
    WebhookRefusedError,
    sign,
)
from flagsink_webhook.settings import DEFAULT_MAX_BODY_BYTES, WebhookSettings

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "SIGNATURE_HEADER",
    "WebhookExportError",
    "WebhookExporter",
    "WebhookPartialExportError",
    "WebhookRefusedError",
    "WebhookSettings",
    "sign",
]


@flagsink.hookimpl
def flagsink_register_exporters(register: Callable[[type[Exporter[Any]]], None]) -> None:
    """Register the ``webhook`` exporter."""
    register(WebhookExporter)
