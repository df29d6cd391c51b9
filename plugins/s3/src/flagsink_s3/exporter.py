"""The ``s3`` exporter: one object per flush in Amazon S3 or an S3-compatible store.

Uploads are create-only S3 conditional writes (``If-None-Match: *``): a name another
writer already took answers 412 and the next free ``-N`` name is tried, so objects never
overwrite each other. A batch up to :data:`DEFAULT_PART_SIZE` goes up in one ``PutObject``
streamed from the spooled file; a larger one as a multipart upload read part by part from
the spooled file (one part in memory at a time), completed with ``If-None-Match: *`` too,
and aborted on any failure, so no half-written object and no orphaned upload is left.

Batches from the scheduler are idempotent: each object carries the batch id as user
metadata ``x-amz-meta-flagsink-batch``, and a 412 is followed by a ``HeadObject`` that tells
this batch's earlier, already stored upload (nothing is uploaded again) from another
writer's object (the next name is tried).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, BinaryIO

from botocore import exceptions as boto  # type: ignore[import-untyped]

from flagsink import faultpoints
from flagsink.exporter import ExportError, SettingsError
from flagsink.exporters.objectstore import (
    BatchCheckDeniedError,
    ObjectExistsError,
    ObjectMissingError,
    ObjectStoreExporter,
)
from flagsink_s3.settings import S3Settings

__all__ = ["DEFAULT_PART_SIZE", "MIN_PART_SIZE", "S3Exporter"]

logger = logging.getLogger("flagsink.s3")

#: Size of each part of a multipart upload, and the largest body sent in one PutObject.
DEFAULT_PART_SIZE = 8 * 1024 * 1024
#: S3 refuses parts under 5 MiB (but the last) when the upload is completed.
MIN_PART_SIZE = 5 * 1024 * 1024
_MAX_PARTS = 10_000  # S3's limit of parts per upload
_CHECKSUM = "CRC32"  # what boto3's own transfers use when checksums are on
# Error codes that mean the credentials are wrong, expired or not allowed to write.
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
    }
)
_REGION_CODES = frozenset(
    {"AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "PermanentRedirect"}
)
# The name is taken (412), or another conditional write to it is under way (409).
_TAKEN_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class S3Exporter(ObjectStoreExporter[S3Settings]):
    """Writes each batch as one new object in an S3 bucket.

    :param settings: an :class:`~flagsink_s3.S3Settings`, or pass its keys as keyword
        options (``bucket="events", path="flags/"``).
    :param client: a ready boto3 S3 client to use instead of building one (its region,
        endpoint, credentials and retry settings are used; do not also set ``region``,
        ``endpointUrl`` or ``forcePathStyle``).
        The caller keeps ownership: :meth:`close` does not close it.
    :param session: a boto3 ``Session`` to build the client from (e.g. one with a
        profile or assumed-role credentials); default: a new session on boto3's standard
        credential chain.
    :param part_size: bytes per part of a multipart upload, and the largest object sent
        in a single ``PutObject``; at least :data:`MIN_PART_SIZE` (5 MiB, S3's minimum).
    """

    kind = "s3"
    settings_model = S3Settings

    def __init__(
        self,
        settings: S3Settings | None = None,
        /,
        *,
        client: Any = None,
        session: Any = None,
        part_size: int = DEFAULT_PART_SIZE,
        **options: Any,
    ) -> None:
        super().__init__(settings, **options)
        if client is not None and session is not None:
            raise TypeError("pass either client= or session=, not both")
        if client is not None and (
            self.settings.region or self.settings.endpoint_url or self.settings.force_path_style
        ):
            raise TypeError(
                "a ready client= carries its own region, endpoint and addressing style: "
                "do not also set region, endpointUrl or forcePathStyle"
            )
        if part_size < MIN_PART_SIZE:
            raise ValueError(
                f"part_size must be at least {MIN_PART_SIZE} bytes (5 MiB): "
                "S3 refuses smaller parts"
            )
        self.part_size = part_size
        self._owns_client = client is None
        self.client: Any = client if client is not None else self._new_client(session)
        config = getattr(getattr(self.client, "meta", None), "config", None)
        self._checksums = getattr(config, "request_checksum_calculation", None) == (
            "when_supported"
        )

    def _new_client(self, session: Any) -> Any:
        import boto3  # type: ignore[import-untyped]  # noqa: PLC0415 - keep plugin import light
        from botocore.config import Config  # type: ignore[import-untyped]  # noqa: PLC0415

        config = Config(
            connect_timeout=10,
            read_timeout=60,
            retries={"mode": "standard", "max_attempts": 3},
            user_agent_extra="flagsink-s3",
            s3={"addressing_style": "path"} if self.settings.force_path_style else None,
        )
        if session is None:
            session = boto3.session.Session()
        try:
            return session.client(
                "s3",
                region_name=self.settings.region,
                endpoint_url=self.settings.endpoint_url,
                config=config,
            )
        except boto.InvalidRegionError:
            raise SettingsError(
                "region", f"{self.settings.region!r} is not a valid region name"
            ) from None
        except ValueError as exc:
            raise SettingsError("endpointUrl", str(exc)) from None

    # -- uploads --------------------------------------------------------------------------

    def put_object(
        self,
        key: str,
        body: BinaryIO,
        size: int,
        *,
        content_type: str,
        content_encoding: str | None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Create ``key`` from ``size`` bytes of ``body``; ObjectExistsError if it exists."""
        args: dict[str, Any] = {
            "Bucket": self.settings.bucket,
            "Key": key,
            "ContentType": content_type,
        }
        if content_encoding:
            args["ContentEncoding"] = content_encoding
        if metadata:
            args["Metadata"] = dict(metadata)
        if self.settings.storage_class:
            args["StorageClass"] = self.settings.storage_class
        if self.settings.server_side_encryption:
            args["ServerSideEncryption"] = self.settings.server_side_encryption
        if self.settings.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.settings.sse_kms_key_id
        try:
            if size <= self.part_size:
                self.client.put_object(Body=body, ContentLength=size, IfNoneMatch="*", **args)
            else:
                self._put_multipart(args, body, size)
        except boto.ClientError as exc:
            if _code(exc) in _TAKEN_CODES or _status(exc) == 412:
                raise ObjectExistsError(key) from None
            raise ExportError(self._explain(exc, key)) from exc
        except (boto.NoCredentialsError, boto.PartialCredentialsError) as exc:
            raise ExportError(
                f"cannot write to bucket {self.settings.bucket!r}: no usable AWS credentials "
                f"({type(exc).__name__}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "a profile (AWS_PROFILE), or run with an instance or task role"
            ) from exc
        except boto.ConnectionError as exc:
            raise ExportError(
                f"cannot reach {self._endpoint()} to write to bucket "
                f"{self.settings.bucket!r}: {exc}"
            ) from exc
        except boto.BotoCoreError as exc:
            raise ExportError(
                f"upload of {key!r} to bucket {self.settings.bucket!r} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def read_batch_id(self, key: str) -> str | None:
        """The batch id in ``key``'s user metadata (``HeadObject``), None without one."""
        bucket = self.settings.bucket
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except boto.ClientError as exc:
            code = _code(exc)
            if code in _MISSING_CODES or _status(exc) == 404:
                raise ObjectMissingError(key) from None
            if code in _ACCESS_CODES or code == "403" or _status(exc) == 403:
                raise BatchCheckDeniedError(
                    f"HeadObject on bucket {bucket!r} was denied: allow s3:GetObject on "
                    "the bucket's objects as well as s3:PutObject"
                ) from None
            message = exc.response.get("Error", {}).get("Message") or "no message"
            raise ExportError(
                f"cannot check whether {key!r} in bucket {bucket!r} holds this batch "
                f"(HeadObject: {code or _status(exc)}: {message}); the batch is retried"
            ) from exc
        except boto.BotoCoreError as exc:
            raise ExportError(
                f"cannot check whether {key!r} in bucket {bucket!r} holds this batch "
                f"({type(exc).__name__}: {exc}); the batch is retried"
            ) from exc
        value = (head.get("Metadata") or {}).get(self.batch_metadata_key)
        return str(value) if value is not None else None

    def _put_multipart(self, args: dict[str, Any], body: BinaryIO, size: int) -> None:
        part_size = max(self.part_size, math.ceil(size / _MAX_PARTS))
        create = dict(args)
        part_checksum: dict[str, str] = {}
        if self._checksums:
            create["ChecksumAlgorithm"] = _CHECKSUM
            part_checksum["ChecksumAlgorithm"] = _CHECKSUM
        upload_id: str = self.client.create_multipart_upload(**create)["UploadId"]
        target = {"Bucket": args["Bucket"], "Key": args["Key"], "UploadId": upload_id}
        try:
            parts: list[dict[str, Any]] = []
            remaining = size
            while remaining > 0:
                chunk = body.read(min(part_size, remaining))
                if not chunk:
                    raise ExportError(f"the encoded batch ended {remaining} bytes early")
                number, length = len(parts) + 1, len(chunk)
                answer = self.client.upload_part(
                    Body=chunk, PartNumber=number, ContentLength=length, **target, **part_checksum
                )
                del chunk  # before the next read: one part in memory at a time
                part = {"PartNumber": number, "ETag": answer["ETag"]}
                checksum = f"Checksum{_CHECKSUM}"
                if self._checksums and checksum in answer:
                    part[checksum] = answer[checksum]
                parts.append(part)
                remaining -= length
                if remaining > 0:  # between two parts: a crash leaves an unfinished upload
                    faultpoints.hit("objectstore.during_multipart")
            self.client.complete_multipart_upload(
                MultipartUpload={"Parts": parts}, IfNoneMatch="*", **target
            )
        except BaseException:
            self._abort(target)
            raise

    def _abort(self, target: dict[str, Any]) -> None:
        try:
            self.client.abort_multipart_upload(**target)
        except Exception as exc:  # the upload's own error matters more
            logger.warning(
                "s3: could not abort the unfinished multipart upload of %r in bucket %r "
                "(%s); a bucket lifecycle rule `AbortIncompleteMultipartUpload` removes it",
                target["Key"],
                target["Bucket"],
                type(exc).__name__,
            )

    # -- errors ---------------------------------------------------------------------------

    def _explain(self, exc: boto.ClientError, key: str) -> str:
        bucket = self.settings.bucket
        code = _code(exc)
        if code == "NoSuchBucket":
            return (
                f"bucket {bucket!r} does not exist at {self._endpoint()}: create it or fix `bucket`"
            )
        if code in _ACCESS_CODES:
            return (
                f"cannot write to bucket {bucket!r}: access denied ({code}): check the "
                "credentials and that they allow s3:PutObject on the bucket"
            )
        if code in _REGION_CODES:
            return (
                f"bucket {bucket!r} is not in region {self._region()!r} ({code}): "
                "set `region` to the bucket's region"
            )
        if code.startswith("KMS."):
            return (
                f"cannot write to bucket {bucket!r}: the KMS key refused the upload ({code}): "
                "check `sseKmsKeyId` and kms:GenerateDataKey / kms:Decrypt permissions"
            )
        message = exc.response.get("Error", {}).get("Message") or "no message"
        return f"upload of {key!r} to bucket {bucket!r} failed: {code or _status(exc)}: {message}"

    def _endpoint(self) -> str:
        url = getattr(getattr(self.client, "meta", None), "endpoint_url", None)
        return str(url or self.settings.endpoint_url or "S3")

    def _region(self) -> str:
        region = getattr(getattr(self.client, "meta", None), "region_name", None)
        return str(region or self.settings.region or "us-east-1")

    def close(self) -> None:
        """Close the client's connections, unless the client was passed in."""
        if self._owns_client:
            close = getattr(self.client, "close", None)
            if close is not None:
                close()


def _code(exc: boto.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or "")


def _status(exc: boto.ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None
