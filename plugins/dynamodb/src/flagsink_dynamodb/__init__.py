"""flagsink flag store ``dynamodb``: flags and segments in an Amazon DynamoDB table, in the
layout of LaunchDarkly's DynamoDB persistent store (partition key ``namespace``, sort key
``key``), with conditional writes so several processes can share it safely."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flagsink
from flagsink.store import StoreError
from flagsink_dynamodb.settings import DynamoDBSettings
from flagsink_dynamodb.store import (
    INITED,
    ITEM_ATTRIBUTE,
    PARTITION_KEY,
    SORT_KEY,
    VERSION_ATTRIBUTE,
    DynamoDBStore,
)

__all__ = [
    "INITED",
    "ITEM_ATTRIBUTE",
    "PARTITION_KEY",
    "SORT_KEY",
    "VERSION_ATTRIBUTE",
    "DynamoDBSettings",
    "DynamoDBStore",
    "StoreError",
]


@flagsink.hookimpl
def flagsink_register_stores(register: Callable[[type[Any]], None]) -> None:
    """Register the ``dynamodb`` store."""
    register(DynamoDBStore)
