"""Settings of the ``kinesis`` exporter."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from flagsink.exporter import ExporterSettings
from flagsink.exporters.records import key_renderer

__all__ = ["DEFAULT_PARTITION_KEY", "KinesisSettings", "is_hash_key", "parse_stream_arn"]

#: Each user's events go to one shard, and users spread over all the shards.
DEFAULT_PARTITION_KEY = "{{ .UserKey}}"

_STREAM_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,128}$")
_STREAM_ARN = re.compile(
    r"^arn:(?P<partition>aws[a-zA-Z-]*):kinesis:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
    r"stream/(?P<name>[a-zA-Z0-9_.-]{1,128})$"
)
# botocore's own check of region names (it raises InvalidRegionError otherwise).
_REGION = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")


def parse_stream_arn(arn: str) -> tuple[str, str]:
    """The region and the stream name in a stream ARN; ``ValueError`` if it is not one."""
    match = _STREAM_ARN.match(arn)
    if match is None:
        raise ValueError(
            f"{arn!r} is not a Kinesis stream ARN such as "
            "`arn:aws:kinesis:eu-west-1:111122223333:stream/flag-events`"
        )
    return match["region"], match["name"]


class KinesisSettings(ExporterSettings):
    """Settings of the ``kinesis`` exporter: the stream and how records are keyed."""

    stream_arn: str | None = Field(
        None,
        description="ARN of the data stream, e.g. "
        "`arn:aws:kinesis:eu-west-1:111122223333:stream/flag-events`. Set this or "
        "`streamName`; when both are set, `streamArn` wins. Its region is the default "
        "`region`.",
    )
    stream_name: str | None = Field(
        None,
        description="Name of the data stream (in `region`). Set this or `streamArn`.",
    )
    partition_key: str = Field(
        DEFAULT_PARTITION_KEY,
        description="Template of each record's partition key, which picks its shard: the "
        "default keeps each user's events in order on one shard and spreads users over "
        "all shards. `default` sends everything to one shard, as GO Feature Flag does. An "
        "empty result becomes `default`; one over 256 characters its SHA-256 in hex.",
    )
    explicit_hash_key: str | None = Field(
        None,
        description="Template of an explicit hash key (a decimal integer from 0 to "
        "2^128-1) that picks the shard instead of the partition key's hash. An empty "
        "result falls back to the partition key; any other non-integer rejects the event.",
    )
    region: str | None = Field(
        None,
        description="AWS region of the stream, e.g. `eu-west-1` (default: the region in "
        "`streamArn`, else boto3's chain: `AWS_REGION` / `AWS_DEFAULT_REGION`, then the "
        "profile's `region`).",
    )
    endpoint_url: str | None = Field(
        None,
        description="Endpoint of a Kinesis-compatible service (LocalStack, moto, a VPC "
        "endpoint), e.g. `http://127.0.0.1:4566` (default: AWS, or boto3's "
        "`AWS_ENDPOINT_URL_KINESIS` / `AWS_ENDPOINT_URL`).",
    )

    @field_validator("stream_arn")
    @classmethod
    def _valid_arn(cls, arn: str | None) -> str | None:
        if arn is not None:
            parse_stream_arn(arn)
        return arn

    @field_validator("stream_name")
    @classmethod
    def _valid_name(cls, name: str | None) -> str | None:
        if name is not None and not _STREAM_NAME.match(name):
            raise ValueError(
                f"{name!r} is not a stream name: 1 to 128 letters, digits, `_`, `.` or `-` "
                "(give a full ARN in `streamArn`)"
            )
        return name

    @field_validator("partition_key")
    @classmethod
    def _valid_partition_key(cls, template: str) -> str:
        if not template:
            raise ValueError("must not be empty: use `default` for a constant key")
        key_renderer(template, setting="partitionKey")
        return template

    @field_validator("explicit_hash_key")
    @classmethod
    def _valid_hash_key(cls, template: str | None) -> str | None:
        if template is not None:
            key_renderer(template, setting="explicitHashKey")
            if "{{" not in template and not is_hash_key(template):
                raise ValueError(f"{template!r} is not an integer from 0 to 2^128-1")
        return template

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
                f"{url!r} must be an http:// or https:// URL such as `http://127.0.0.1:4566`"
            )
        return url

    @model_validator(mode="after")
    def _one_stream(self) -> KinesisSettings:
        if self.stream_arn is None and self.stream_name is None:
            raise ValueError(
                "set `streamArn` (e.g. arn:aws:kinesis:eu-west-1:111122223333:stream/"
                "flag-events) or `streamName` (e.g. flag-events): the stream to write to"
            )
        if self.stream_arn is not None and self.region is not None:
            arn_region, _ = parse_stream_arn(self.stream_arn)
            if arn_region != self.region:
                raise ValueError(
                    f"`streamArn` is in region {arn_region!r} but `region` is "
                    f"{self.region!r}: remove `region` or make them agree"
                )
        return self

    @property
    def stream_label(self) -> str:
        """The stream as shown in logs: its ARN when set, else its name."""
        return self.stream_arn or self.stream_name or "?"


def is_hash_key(text: str) -> bool:
    """True for a decimal integer from 0 to 2^128-1, as Kinesis wants an ExplicitHashKey."""
    return text.isascii() and text.isdigit() and len(text) <= 39 and int(text) < 2**128
