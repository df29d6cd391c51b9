"""The ``azureblob`` exporter: one block blob per flush in an Azure Blob Storage container.

Each upload is create-only (``If-None-Match: *``): a name another writer already took is
reported as :class:`~flagsink.exporters.objectstore.ObjectExistsError`, and the base class
moves on to the next free ``-N`` name. Up to 2 MiB goes up in one request; a larger body
is read from the spooled file 2 MiB at a time and staged as blocks, which one final call
commits. Staged blocks stay invisible until that commit, and the service discards them
(within a week) if it never comes, so a failed upload leaves no blob behind.

Batches from the scheduler are idempotent: each blob carries the batch id as metadata
``flagsinkbatch`` (Azure metadata names are C# identifiers: no ``-``), and a
``BlobAlreadyExists`` is followed by a Get Blob Properties that tells this batch's earlier,
already stored upload (nothing is uploaded again) from another writer's blob (the next name
is tried).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from typing import Any, BinaryIO, ClassVar
from urllib.parse import urlsplit

from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import (
    BlobClient,
    BlobServiceClient,
    ContainerClient,
    ContentSettings,
    LinearRetry,
    StorageErrorCode,
)

from flagsink.exporter import ExportError, SettingsError
from flagsink.exporters.objectstore import (
    BatchCheckDeniedError,
    ObjectExistsError,
    ObjectMissingError,
    ObjectStoreExporter,
)
from flagsink_azureblob.settings import AzureBlobSettings

__all__ = ["AzureBlobExporter", "client_options"]

IDENTITY_EXTRA = "flagsink-azureblob[identity]"
SINGLE_PUT_BYTES = 2 * 1024 * 1024
BLOCK_BYTES = 2 * 1024 * 1024
_UPLOAD_ID = "flagsinkupload"
# Secrets that may appear in text from the SDK or the transport (SAS signatures, keys).
_SECRET_TEXT = re.compile(
    r"(sig=|AccountKey=|SharedAccessSignature=|SharedKey [^:\s]+:)[^\s&;'\"]*", re.IGNORECASE
)


class AzureBlobExporter(ObjectStoreExporter[AzureBlobSettings]):
    """Writes each batch as a new block blob in ``container``.

    Credentials come from the settings (``connectionString``, ``accountKey``) or, without
    them, from ``DefaultAzureCredential`` (the ``identity`` extra). From Python, pass
    ``credential=`` (any Azure credential, e.g. a ``ManagedIdentityCredential``) or a ready
    ``client=`` (a ``BlobServiceClient``, or a ``ContainerClient`` for ``container``) to
    configure the SDK yourself, without ``accountKey``, ``connectionString`` and
    ``serviceUrl``; the exporter then does not close it.
    """

    kind = "azureblob"
    aliases: ClassVar[tuple[str, ...]] = ("azureBlobStorage",)
    bulk = True
    settings_model = AzureBlobSettings
    batch_metadata_key: ClassVar[str] = "flagsinkbatch"

    def __init__(
        self,
        settings: AzureBlobSettings | None = None,
        /,
        *,
        client: BlobServiceClient | ContainerClient | None = None,
        credential: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(settings, **options)
        if client is not None:
            given = [
                key
                for key, value in (
                    ("credential", credential),
                    ("accountKey", self.settings.account_key),
                    ("connectionString", self.settings.connection_string),
                    ("serviceUrl", self.settings.service_url),
                )
                if value is not None
            ]
            if given:
                raise TypeError(
                    f"client= brings its own endpoint and credential: do not also pass "
                    f"{', '.join(given)}"
                )
        self._owned: list[Any] = []  # clients and credentials this exporter closes
        _redact_sas_in_urllib3_logs()
        if isinstance(client, ContainerClient):
            if client.container_name != self.settings.container:
                raise SettingsError(
                    "container",
                    f"{self.settings.container!r} differs from the ContainerClient's "
                    f"container {client.container_name!r}",
                )
            self.container_client = client
        elif client is not None:
            self.container_client = client.get_container_client(self.settings.container)
        else:
            try:
                service = self._new_service_client(credential)
            except BaseException:
                self.close()
                raise
            self.container_client = service.get_container_client(self.settings.container)
        self.account = self.container_client.account_name or self.settings.account_name or "?"
        self.endpoint = _public_url(self.container_client.primary_endpoint)

    # -- client ---------------------------------------------------------------------------

    def _new_service_client(self, credential: Any) -> BlobServiceClient:
        settings = self.settings
        options = client_options(settings.timeout)
        if settings.connection_string is not None:
            try:
                service = BlobServiceClient.from_connection_string(
                    settings.connection_string.get_secret_value(),
                    credential=credential,
                    **options,
                )
            except ValueError:
                raise SettingsError(
                    "connectionString",
                    "is not a valid storage connection string (expected "
                    "AccountName=...;AccountKey=... or BlobEndpoint=...;"
                    "SharedAccessSignature=...)",
                ) from None
            self._owned.append(service)
            return service
        account = settings.account_name
        url = settings.service_url or f"https://{account}.blob.core.windows.net"
        if credential is None and settings.account_key is not None:
            credential = AzureNamedKeyCredential(
                str(account), settings.account_key.get_secret_value()
            )
        if credential is None:
            credential = _default_azure_credential()
            self._owned.append(credential)
        try:
            service = BlobServiceClient(url, credential=credential, **options)
        except ValueError as exc:  # e.g. "Token credential is only supported with HTTPS."
            raise SettingsError(
                "serviceUrl",
                f"cannot use {_public_url(url)}: {exc} Give accountKey or connectionString "
                "for a plain http:// endpoint such as Azurite",
            ) from None
        self._owned.append(service)
        return service

    # -- upload ---------------------------------------------------------------------------

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
        """Upload ``size`` bytes of ``body`` as a new block blob ``key`` (create-only)."""
        blob = self.container_client.get_blob_client(key)
        upload_id = uuid.uuid4().hex
        try:
            blob.upload_blob(
                body,
                length=size,
                overwrite=False,
                content_settings=ContentSettings(
                    content_type=content_type, content_encoding=content_encoding
                ),
                metadata={**(metadata or {}), _UPLOAD_ID: upload_id},
                max_concurrency=1,
            )
        except ResourceExistsError as exc:
            if _error_code(exc) != StorageErrorCode.BLOB_ALREADY_EXISTS:
                raise self._export_error(exc, key) from exc
            # A request the SDK retried may have been stored the first time.
            if _uploaded_by(blob, upload_id):
                return
            raise ObjectExistsError(key) from None
        except AzureError as exc:
            raise self._export_error(exc, key) from exc

    def read_batch_id(self, key: str) -> str | None:
        """The batch id in ``key``'s metadata (Get Blob Properties), None without one."""
        container = f"container {self.settings.container!r}"
        try:
            properties = self.container_client.get_blob_client(key).get_blob_properties()
        except ResourceNotFoundError:
            raise ObjectMissingError(key) from None
        except HttpResponseError as exc:
            if exc.status_code == 403:
                raise BatchCheckDeniedError(
                    f"reading blob properties in {container} was denied "
                    f"({_error_code(exc)}): give the credentials read access too (role "
                    "Storage Blob Data Contributor, or a SAS with read, create and write "
                    "permissions)"
                ) from None
            raise ExportError(
                f"cannot check whether {key!r} in {container} holds this batch (HTTP "
                f"{exc.status_code} {_error_code(exc)}: {_first_line(exc)}); the batch is "
                "retried"
            ) from exc
        except AzureError as exc:
            raise ExportError(
                f"cannot check whether {key!r} in {container} at {self.endpoint} holds this "
                f"batch ({type(exc).__name__}: {_first_line(exc)}); the batch is retried"
            ) from exc
        value = (properties.metadata or {}).get(self.batch_metadata_key)
        return str(value) if value is not None else None

    def _export_error(self, exc: AzureError, key: str) -> ExportError:
        container = f"container {self.settings.container!r}"
        account = f"storage account {self.account!r}"
        if isinstance(exc, HttpResponseError) and exc.status_code is not None:
            code = _error_code(exc)
            if exc.status_code == 404 and code == StorageErrorCode.CONTAINER_NOT_FOUND:
                return ExportError(
                    f"{container} does not exist in {account}: create it (the exporter "
                    "never creates containers) or fix `container`"
                )
            if exc.status_code == 404:
                return ExportError(
                    f"{account} not found at {self.endpoint} ({code}) while writing to "
                    f"{container}: check accountName and serviceUrl"
                )
            if exc.status_code in (401, 403):
                return ExportError(
                    f"access denied to {container} in {account} ({code}): check the "
                    "credentials, and that they may create blobs there (role Storage Blob "
                    "Data Contributor, or a SAS with create and write permissions)"
                )
            return ExportError(
                f"upload of {key!r} to {container} in {account} failed with HTTP "
                f"{exc.status_code} ({code}): {_first_line(exc)}"
            )
        if isinstance(exc, ClientAuthenticationError):  # from azure-identity, no response
            return ExportError(
                f"no Azure credential to write to {container} in {account}: "
                f"{_first_line(exc)}. Set accountKey or connectionString, or configure an "
                "identity DefaultAzureCredential finds (environment, managed identity, "
                "Azure CLI)"
            )
        if isinstance(exc, ServiceRequestError | ServiceResponseError):
            return ExportError(
                f"cannot reach {container} at {self.endpoint} "
                f"({type(exc).__name__}: {_first_line(exc)})"
            )
        return ExportError(
            f"upload of {key!r} to {container} in {account} failed: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        )

    def close(self) -> None:
        """Close the clients (and the identity credential) this exporter created."""
        owned, self._owned = self._owned, []
        for resource in reversed(owned):
            try:
                resource.close()
            except Exception:  # noqa: S112 - best effort on shutdown
                continue


class _RetryPolicy(LinearRetry):
    """The scheduler retries failed exports with backoff; the SDK retries a single request
    (a dropped block, a 503, a timeout) at most twice, about 1 s apart, and never a refused
    connection or a missing credential."""

    def __init__(self) -> None:
        super().__init__(backoff=1, retry_total=2, random_jitter_range=0, retry_connect=0)
        self.random_jitter_range = 0.5  # type: ignore[assignment]  # floats work at runtime

    def increment(
        self,
        settings: dict[str, Any],
        request: Any,
        response: Any = None,
        error: AzureError | None = None,
    ) -> bool:
        if isinstance(error, ClientAuthenticationError) and response is None:
            return False  # the credential has no token: asking again will not help
        return bool(super().increment(settings, request, response, error))


class _RedactSas(logging.Filter):
    """Hides SAS signatures in urllib3's debug lines, which show each request's URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "sig=" in message.lower():
            record.msg, record.args = _scrub(message), None
        return True


_REDACT_SAS = _RedactSas()


def _redact_sas_in_urllib3_logs() -> None:
    logger = logging.getLogger("urllib3.connectionpool")
    if _REDACT_SAS not in logger.filters:
        logger.addFilter(_REDACT_SAS)


def client_options(timeout: float = 30.0) -> dict[str, Any]:
    """Keyword arguments for ``BlobServiceClient`` as the exporter builds its own: request
    timeouts, a short retry policy and the upload sizes. Use them for a client you pass as
    ``client=``, adding your own (``transport``, ``proxies``, ``raw_request_hook``...)."""
    return {
        "retry_policy": _RetryPolicy(),
        "connection_timeout": timeout,
        "read_timeout": timeout,
        "max_single_put_size": SINGLE_PUT_BYTES,
        "max_block_size": BLOCK_BYTES,
    }


def _default_azure_credential() -> Any:
    try:
        from azure.identity import DefaultAzureCredential  # noqa: PLC0415
    except ImportError:
        raise SettingsError(
            "accountKey",
            "no credentials: give accountKey or connectionString, or install "
            f"'{IDENTITY_EXTRA}' (pip install '{IDENTITY_EXTRA}') to use "
            "DefaultAzureCredential (environment, workload or managed identity, Azure CLI)",
        ) from None
    return DefaultAzureCredential()


def _uploaded_by(blob: BlobClient, upload_id: str) -> bool:
    """Whether the existing blob is the one this upload stored (False if unreadable)."""
    try:
        properties = blob.get_blob_properties()
    except AzureError:
        return False
    return bool(properties.metadata.get(_UPLOAD_ID) == upload_id)


def _error_code(exc: HttpResponseError) -> str:
    code: Any = getattr(exc, "error_code", None)
    if code is None and exc.response is not None:
        code = getattr(exc.response, "headers", {}).get("x-ms-error-code")
    return str(getattr(code, "value", code) or "no error code")


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip().splitlines()
    return _scrub(text[0]) if text else type(exc).__name__


def _scrub(text: str) -> str:
    return _SECRET_TEXT.sub(lambda match: f"{match.group(1)}REDACTED", text)


def _public_url(url: str) -> str:
    """``url`` without its query (a SAS token) or user info."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/")
