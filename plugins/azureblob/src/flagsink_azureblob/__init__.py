"""flagsink exporter ``azureblob``: one blob per flush in Azure Blob Storage.

GO Feature Flag's kind name ``azureBlobStorage`` is accepted too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flagsink
from flagsink import Exporter
from flagsink_azureblob.exporter import AzureBlobExporter, client_options
from flagsink_azureblob.settings import AzureBlobSettings

__all__ = [
    "AzureBlobExporter",
    "AzureBlobSettings",
    "client_options",
    "flagsink_register_exporters",
]


@flagsink.hookimpl
def flagsink_register_exporters(register: Callable[[type[Exporter[Any]]], None]) -> None:
    """Register :class:`AzureBlobExporter` (kind ``azureblob``, alias ``azureBlobStorage``)."""
    register(AzureBlobExporter)
