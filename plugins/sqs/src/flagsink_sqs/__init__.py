"""flagsink exporter ``sqs``: feature-flag events to an Amazon SQS queue (standard or
FIFO), near real time, with batched ``SendMessageBatch`` and per-message retries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flagsink
from flagsink.exporter import Exporter
from flagsink_sqs.exporter import MAX_BATCH_ENTRIES, SqsExporter
from flagsink_sqs.settings import (
    DEFAULT_EMITTER,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MESSAGE_GROUP_ID,
    MAX_MESSAGE_BYTES,
    SqsSettings,
)

__all__ = [
    "DEFAULT_EMITTER",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MESSAGE_GROUP_ID",
    "MAX_BATCH_ENTRIES",
    "MAX_MESSAGE_BYTES",
    "SqsExporter",
    "SqsSettings",
]


@flagsink.hookimpl
def flagsink_register_exporters(register: Callable[[type[Exporter[Any]]], None]) -> None:
    """Register the ``sqs`` exporter."""
    register(SqsExporter)
