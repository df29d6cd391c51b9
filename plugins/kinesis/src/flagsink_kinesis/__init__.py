"""flagsink exporter ``kinesis``: feature-flag events to an Amazon Kinesis data stream,
near real time, with batched ``PutRecords`` and per-record retries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flagsink
from flagsink.exporter import Exporter
from flagsink_kinesis.exporter import (
    MAX_RECORD_BYTES,
    MAX_RECORDS_PER_REQUEST,
    MAX_REQUEST_BYTES,
    KinesisExporter,
)
from flagsink_kinesis.settings import DEFAULT_PARTITION_KEY, KinesisSettings

__all__ = [
    "DEFAULT_PARTITION_KEY",
    "MAX_RECORDS_PER_REQUEST",
    "MAX_RECORD_BYTES",
    "MAX_REQUEST_BYTES",
    "KinesisExporter",
    "KinesisSettings",
]


@flagsink.hookimpl
def flagsink_register_exporters(register: Callable[[type[Exporter[Any]]], None]) -> None:
    """Register the ``kinesis`` exporter."""
    register(KinesisExporter)
