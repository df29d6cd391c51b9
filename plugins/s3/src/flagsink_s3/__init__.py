"""flagsink exporter ``s3``: one object per flush in Amazon S3 or an S3-compatible store
(MinIO, Cloudflare R2, Ceph, moto), in JSON lines, CSV or Parquet."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flagsink
from flagsink.exporter import Exporter
from flagsink.exporters.objectstore import ObjectExistsError
from flagsink_s3.exporter import DEFAULT_PART_SIZE, MIN_PART_SIZE, S3Exporter
from flagsink_s3.settings import S3Settings

__all__ = [
    "DEFAULT_PART_SIZE",
    "MIN_PART_SIZE",
    "ObjectExistsError",
    "S3Exporter",
    "S3Settings",
]


@flagsink.hookimpl
def flagsink_register_exporters(register: Callable[[type[Exporter[Any]]], None]) -> None:
    """Register the ``s3`` exporter."""
    register(S3Exporter)
