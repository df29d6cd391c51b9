"""flagsink exporter ``kafka``: each event as one message on a Kafka topic, near real time,
from an idempotent producer (confluent-kafka / librdkafka)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flagsink
from flagsink.exporter import Exporter
from flagsink_kafka.exporter import KafkaExporter
from flagsink_kafka.settings import (
    DEFAULT_KEY_TEMPLATE,
    PRODUCER_DEFAULTS,
    KafkaConnection,
    KafkaSettings,
)

__all__ = [
    "DEFAULT_KEY_TEMPLATE",
    "PRODUCER_DEFAULTS",
    "KafkaConnection",
    "KafkaExporter",
    "KafkaSettings",
]


@flagsink.hookimpl
def flagsink_register_exporters(register: Callable[[type[Exporter[Any]]], None]) -> None:
    """Register the ``kafka`` exporter."""
    register(KafkaExporter)
