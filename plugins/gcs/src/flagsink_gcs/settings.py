"""Settings of the ``gcs`` exporter (GO Feature Flag's ``googleStorage``)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from flagsink.exporters.objectstore import ObjectStoreSettings

__all__ = ["GcsSettings"]

# Bucket names: 3-63 characters (up to 222 with dots, each dot-separated part at most 63) of
# lowercase letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]*[a-z0-9]")


class GcsSettings(ObjectStoreSettings):
    """Settings of the ``gcs`` exporter."""

    bucket: str = Field(
        description="Name of the bucket the objects are written to, without `gs://`. "
        "It must exist; the exporter never creates it.",
    )
    project: str | None = Field(
        None,
        description="Google Cloud project the client acts for (quota and billing). "
        "Default: the project of the credentials or of the environment; uploads work "
        "without one.",
    )
    credentials_file: str | None = Field(
        None,
        description="Path of a service-account key (or `gcloud auth application-default "
        "login` user credentials) JSON file. Default: Application Default Credentials; "
        "with `STORAGE_EMULATOR_HOST` set, anonymous access to the emulator.",
    )

    @field_validator("bucket")
    @classmethod
    def _valid_bucket(cls, bucket: str) -> str:
        if bucket.startswith("gs://"):
            raise ValueError(f"give the bucket name alone, without gs:// ({bucket[5:]!r})")
        if "/" in bucket:
            raise ValueError("a bucket name has no `/`; put folders in `path`")
        if not 3 <= len(bucket) <= 222 or not _BUCKET.fullmatch(bucket):
            raise ValueError(
                "not a valid bucket name: 3-63 lowercase letters, digits, `-`, `_` or `.`, "
                "starting and ending with a letter or digit"
            )
        if any(len(part) > 63 for part in bucket.split(".")):
            raise ValueError("not a valid bucket name: a dot-separated part is over 63 long")
        return bucket

    @field_validator("credentials_file")
    @classmethod
    def _non_empty(cls, path: str | None) -> str | None:
        if path is not None and not path.strip():
            raise ValueError("empty path; leave credentialsFile out to use the default")
        return path
