"""flagsink exporter ``gcs`` (alias ``googleStorage``): one object per flush in a Google
Cloud Storage bucket, as JSON lines, CSV or Parquet."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flagsink
from flagsink.exporter import Exporter
from flagsink_gcs.exporter import GcsExporter
from flagsink_gcs.settings import GcsSettings

__all__ = ["GcsExporter", "GcsSettings", "flagsink_register_exporters"]


@flagsink.hookimpl
def flagsink_register_exporters(register: Callable[[type[Exporter[Any]]], None]) -> None:
    """Register the ``gcs`` exporter (and its GO Feature Flag name ``googleStorage``)."""
    register(GcsExporter)
