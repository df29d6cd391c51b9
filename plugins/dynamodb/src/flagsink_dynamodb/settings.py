"""Settings of the ``dynamodb`` store."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from flagsink.store import StoreSettings

__all__ = ["DynamoDBSettings"]

# Table names as DynamoDB accepts them.
_TABLE = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")
# botocore's own check of region names (it raises InvalidRegionError otherwise).
_REGION = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")
# Partition keys are at most 2048 bytes; leave room for `:` and the namespace.
_MAX_PREFIX_BYTES = 1024


class DynamoDBSettings(StoreSettings):
    """Settings of the ``dynamodb`` store: which table, and which part of it."""

    table: str = Field(
        description="Name of the DynamoDB table (it must exist, with partition key "
        "`namespace` and sort key `key`, both strings; `flagsink store init` creates it).",
    )
    prefix: str | None = Field(
        None,
        description="Prepended with a colon to every partition key (`prod` stores flags "
        "under `prod:flags`), so several environments share one table without seeing each "
        "other's items; the same as LaunchDarkly's `prefix` (default: no prefix).",
    )
    region: str | None = Field(
        None,
        description="AWS region of the table, e.g. `eu-west-1` (default: boto3's chain: "
        "`AWS_REGION` / `AWS_DEFAULT_REGION`, then the profile's `region`).",
    )
    endpoint_url: str | None = Field(
        None,
        description="Endpoint of a DynamoDB-compatible service (DynamoDB Local, moto, "
        "LocalStack), e.g. `http://127.0.0.1:8000` (default: AWS, or boto3's "
        "`AWS_ENDPOINT_URL_DYNAMODB` / `AWS_ENDPOINT_URL`).",
    )

    @field_validator("table")
    @classmethod
    def _valid_table(cls, table: str) -> str:
        if not _TABLE.match(table):
            raise ValueError(
                f"{table!r} is not a valid DynamoDB table name: 3 to 255 letters, digits, "
                "`_`, `-` or `.`"
            )
        return table

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, prefix: str | None) -> str | None:
        if prefix is None:
            return None
        if prefix != prefix.strip():
            raise ValueError("must not start or end with spaces")
        if len(prefix.encode("utf-8")) > _MAX_PREFIX_BYTES:
            raise ValueError(f"must be at most {_MAX_PREFIX_BYTES} bytes")
        return prefix or None

    @field_validator("region")
    @classmethod
    def _valid_region(cls, region: str | None) -> str | None:
        if region is not None and not _REGION.match(region):
            raise ValueError(f"{region!r} is not a region name such as `eu-west-1`")
        return region

    @field_validator("endpoint_url")
    @classmethod
    def _valid_endpoint(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^https?://[^\s/?#]+", url):
            raise ValueError(
                f"{url!r} must be an http:// or https:// URL such as `http://127.0.0.1:8000`"
            )
        return url
