"""flagsink exporter ``pubsub``: one Google Cloud Pub/Sub message per event, published
near real time with batching, per-message retries and optional ordering keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flagsink
from flagsink.exporter import Exporter
from flagsink_pubsub.exporter import PubSubExporter
from flagsink_pubsub.settings import PubSubSettings

__all__ = ["PubSubExporter", "PubSubSettings", "flagsink_register_exporters"]


@flagsink.hookimpl
def flagsink_register_exporters(register: Callable[[type[Exporter[Any]]], None]) -> None:
    """Register the ``pubsub`` exporter."""
    register(PubSubExporter)
