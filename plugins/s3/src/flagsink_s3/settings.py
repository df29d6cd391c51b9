"""Settings of the ``s3`` exporter."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from flagsink.exporters.objectstore import ObjectStoreSettings

__all__ = ["S3Settings", "ServerSideEncryption", "StorageClass"]

StorageClass = Literal[
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "GLACIER_IR",
    "DEEP_ARCHIVE",
    "EXPRESS_ONEZONE",
    "OUTPOSTS",
    "SNOW",
]
ServerSideEncryption = Literal["AES256", "aws:kms", "aws:kms:dsse"]

# Bucket names as S3 accepts them, including legacy us-east-1 names (upper case, `_`).
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")
# botocore's own check of region names (it raises InvalidRegionError otherwise).
_REGION = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")


class S3Settings(ObjectStoreSettings):
    """Settings of the ``s3`` exporter: where the objects go and how they are stored."""

    bucket: str = Field(
        description="Name of the bucket the objects are written to (it must exist), "
        "without `s3://`.",
    )
    region: str | None = Field(
        None,
        description="AWS region of the bucket, e.g. `eu-west-1` (default: boto3's chain: "
        "`AWS_REGION` / `AWS_DEFAULT_REGION`, then the profile's `region`).",
    )
    endpoint_url: str | None = Field(
        None,
        description="Endpoint of an S3-compatible store (MinIO, Cloudflare R2, Ceph, moto), "
        "e.g. `http://127.0.0.1:9000` (default: AWS, or boto3's `AWS_ENDPOINT_URL_S3` / "
        "`AWS_ENDPOINT_URL`).",
    )
    force_path_style: bool = Field(
        False,
        description="Address objects as `endpoint/bucket/key` instead of "
        "`bucket.endpoint/key`: needed by MinIO and most self-hosted stores without "
        "wildcard DNS (default: boto3's choice, or `addressing_style` in the AWS config file).",
    )
    storage_class: StorageClass | None = Field(
        None,
        description="Storage class of the objects (default: the bucket's, usually `STANDARD`).",
    )
    server_side_encryption: ServerSideEncryption | None = Field(
        None,
        description="Server-side encryption: `AES256` (SSE-S3), `aws:kms` (SSE-KMS) or "
        "`aws:kms:dsse` (default: the bucket's default encryption).",
    )
    sse_kms_key_id: str | None = Field(
        None,
        description="KMS key (id, ARN or `alias/...`) for `aws:kms` / `aws:kms:dsse` "
        "(default: the AWS managed key `aws/s3`, or the bucket's default key).",
    )

    @field_validator("bucket")
    @classmethod
    def _valid_bucket(cls, bucket: str) -> str:
        if bucket.startswith("s3://"):
            raise ValueError("give the bucket name alone, without `s3://` (put folders in `path`)")
        if not _BUCKET.match(bucket):
            raise ValueError(
                f"{bucket!r} is not a valid bucket name: 3 to 255 letters, digits, `.`, `-` "
                "or `_`, starting and ending with a letter or digit"
            )
        return bucket

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
                f"{url!r} must be an http:// or https:// URL such as `http://127.0.0.1:9000`"
            )
        return url

    @field_validator("sse_kms_key_id")
    @classmethod
    def _valid_key_id(cls, key_id: str | None) -> str | None:
        if key_id is not None and not key_id.strip():
            raise ValueError("must not be empty")
        return key_id

    @model_validator(mode="after")
    def _kms_key_needs_kms(self) -> S3Settings:
        if self.sse_kms_key_id and self.server_side_encryption not in ("aws:kms", "aws:kms:dsse"):
            raise ValueError(
                "sseKmsKeyId: needs `serverSideEncryption: aws:kms` (or `aws:kms:dsse`)"
            )
        return self
