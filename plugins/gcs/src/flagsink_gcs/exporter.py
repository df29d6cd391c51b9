"""The ``gcs`` exporter: one object per flush in a Google Cloud Storage bucket.

Uploads are create-only (``ifGenerationMatch=0``): the server refuses a name that is taken
(HTTP 412) and the base class moves on to the next free ``-N`` name, so objects never
overwrite each other. Bodies up to 1 MiB go up in one multipart request, larger ones as a
resumable upload in 8 MiB chunks; either way GCS creates the object only once every byte
has arrived, so a failed upload leaves no object behind.

Batches from the scheduler are idempotent: each object carries the batch id as custom
metadata ``flagsink-batch``, and a 412 is followed by a read of the existing object's
metadata that tells this batch's earlier, already stored upload (nothing is uploaded again)
from another writer's object (the next name is tried).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

import google.auth
from google.api_core import exceptions as api
from google.auth import exceptions as auth
from google.auth.credentials import AnonymousCredentials
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account

from flagsink.exporter import ExportError, SettingsError
from flagsink.exporters.objectstore import (
    BatchCheckDeniedError,
    ObjectExistsError,
    ObjectMissingError,
    ObjectStoreExporter,
)
from flagsink_gcs.settings import GcsSettings

if TYPE_CHECKING:
    from google.api_core.retry import Retry
    from google.auth.credentials import Credentials

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_RETRY_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "SINGLE_REQUEST_MAX",
    "GcsExporter",
]

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"

SINGLE_REQUEST_MAX = 1024 * 1024
"""Bodies up to this size go up in one multipart request. The client builds that request
in memory (about three copies of the body at its peak), so larger bodies go up as a
resumable upload instead: one request more, and at most two chunks in memory."""

CHUNK_SIZE = 8 * 1024 * 1024
"""Bytes per request of a resumable upload (a multiple of 256 KiB)."""

DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 60.0)
"""Seconds to connect, and to wait for each response, per HTTP request."""

DEFAULT_RETRY_TIMEOUT = 10.0
"""Seconds the client keeps retrying transient failures (429, 5xx, connection errors)
within one export before it fails and the scheduler retries the batch with backoff."""

_SUPPORTED_KEY_TYPES = ("service_account", "authorized_user")


class _Default:
    """Marks an argument left out (``None`` means "no retry" for ``retry``)."""


_DEFAULT: Any = _Default()


class GcsExporter(ObjectStoreExporter[GcsSettings]):
    """Writes each batch as one new object in ``bucket``.

    One ``google.cloud.storage.Client`` serves every export of this exporter. Pass a ready
    one as ``client=`` (it is used as it is, and not closed by :meth:`close`); otherwise
    it is created at the first export from ``credentialsFile``, the emulator named by
    ``STORAGE_EMULATOR_HOST``, or Application Default Credentials, in that order.

    :param retry: the ``google.api_core.retry.Retry`` of each upload (default: the
        storage client's policy, cut to :data:`DEFAULT_RETRY_TIMEOUT` seconds); ``None``
        leaves every retry to the scheduler.
    :param timeout: seconds per HTTP request, or ``(connect, read)``.
    """

    kind = "gcs"
    aliases = ("googleStorage",)
    settings_model = GcsSettings

    def __init__(
        self,
        settings: GcsSettings | None = None,
        /,
        *,
        client: Any = None,
        retry: Retry | None = _DEFAULT,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        **options: Any,
    ) -> None:
        super().__init__(settings, **options)
        self._client: Any = client
        self._owns_client = client is None
        self._credentials: Credentials | None = None
        self._credentials_project: str | None = None
        if client is None and self.settings.credentials_file is not None:
            self._credentials, self._credentials_project = _load_key_file(
                self.settings.credentials_file
            )
        self._retry = retry
        self.timeout = timeout

    @property
    def retry(self) -> Retry | None:
        """The retry policy of each upload."""
        if self._retry is _DEFAULT:
            self._retry = _default_retry()
        return self._retry

    @property
    def client(self) -> Any:
        """The ``google.cloud.storage.Client`` of this exporter (created on first use)."""
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _new_client(self) -> Any:
        # Imported here: google.cloud.storage takes a few hundred milliseconds to import,
        # which `flagsink validate` and settings checks need not pay.
        from google.cloud import storage  # type: ignore[import-untyped]  # noqa: PLC0415

        project = self.settings.project
        credentials = self._credentials
        if credentials is not None:
            project = project or self._credentials_project
        elif os.environ.get(EMULATOR_ENV):
            credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
        else:
            try:
                credentials, found_project = google.auth.default()
            except auth.DefaultCredentialsError:
                raise ExportError(
                    f"no Google credentials found for bucket {self.settings.bucket!r}: set "
                    "credentialsFile, or provide Application Default Credentials "
                    "(GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default "
                    "login`, or the metadata server of a Google Cloud runtime)"
                ) from None
            project = project or found_project
        # project=None: no project, which uploads do not need (no lookup in the environment).
        return storage.Client(project=project, credentials=credentials)

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
        """Create ``key`` from ``size`` bytes of ``body``, only if no object has that name."""
        bucket = self.settings.bucket
        blob = self.client.bucket(bucket).blob(key, chunk_size=CHUNK_SIZE)
        if content_encoding is not None:
            blob.content_encoding = content_encoding
        if metadata:
            blob.metadata = dict(metadata)
        # size=None: a resumable upload that reads `body` to its end (the spool holds
        # exactly `size` bytes); a known size up to 8 MiB would make it one multipart request.
        try:
            blob.upload_from_file(
                body,
                size=size if size <= SINGLE_REQUEST_MAX else None,
                content_type=content_type,
                if_generation_match=0,
                retry=self.retry,
                timeout=self.timeout,
            )
        except api.PreconditionFailed:
            raise ObjectExistsError(f"gs://{bucket}/{key} exists") from None
        except api.NotFound:
            raise ExportError(
                f"bucket {bucket!r} does not exist; create it, or fix `bucket`"
            ) from None
        except (api.Unauthorized, auth.RefreshError):
            raise ExportError(
                f"access denied to bucket {bucket!r}: the credentials were refused; check "
                "credentialsFile or the Application Default Credentials"
            ) from None
        except api.Forbidden:
            raise ExportError(
                f"access denied to bucket {bucket!r}: check the credentials; they need "
                "storage.objects.create on it (role roles/storage.objectCreator)"
            ) from None
        except auth.TransportError as exc:
            raise ExportError(
                f"cannot reach the Google token endpoint to authenticate for bucket "
                f"{bucket!r}: {_reason(exc)}"
            ) from None
        except api.RetryError as exc:
            raise ExportError(
                f"upload of {key!r} to bucket {bucket!r} failed, retries included: "
                f"{_reason(exc.cause or exc)}"
            ) from exc.cause
        except api.GoogleAPICallError as exc:
            raise ExportError(
                f"upload of {key!r} to bucket {bucket!r} failed: {_reason(exc)}"
            ) from exc
        except OSError as exc:  # requests' ConnectionError and Timeout are OSErrors
            raise ExportError(
                f"cannot reach Google Cloud Storage to upload {key!r} to bucket {bucket!r}: "
                f"{_reason(exc)}"
            ) from exc

    def read_batch_id(self, key: str) -> str | None:
        """The batch id in ``key``'s custom metadata, None without one."""
        bucket = self.settings.bucket
        try:
            blob = self.client.bucket(bucket).get_blob(key, retry=self.retry, timeout=self.timeout)
        except api.Forbidden:
            raise BatchCheckDeniedError(
                f"reading object metadata in bucket {bucket!r} was denied: the credentials "
                "need storage.objects.get as well as storage.objects.create (e.g. role "
                "roles/storage.objectUser)"
            ) from None
        except (api.GoogleAPICallError, api.RetryError, auth.GoogleAuthError, OSError) as exc:
            cause = (exc.cause or exc) if isinstance(exc, api.RetryError) else exc
            raise ExportError(
                f"cannot check whether {key!r} in bucket {bucket!r} holds this batch "
                f"({_reason(cause)}); the batch is retried"
            ) from exc
        if blob is None:
            raise ObjectMissingError(key)
        value = (blob.metadata or {}).get(self.batch_metadata_key)
        return str(value) if value is not None else None

    def close(self) -> None:
        """Close the client this exporter created (a client passed in is left open)."""
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            client.close()


def _default_retry() -> Retry:
    from google.cloud.storage.retry import (  # type: ignore[import-untyped]  # noqa: PLC0415
        DEFAULT_RETRY,
    )

    # with_timeout is the newer name of with_deadline (google-api-core 2.17+).
    with_timeout = getattr(DEFAULT_RETRY, "with_timeout", None) or DEFAULT_RETRY.with_deadline
    retry: Retry = with_timeout(DEFAULT_RETRY_TIMEOUT)
    return retry


def _reason(exc: BaseException) -> str:
    """A one-line reason: the exception's class and message, without response bodies."""
    if isinstance(exc, api.GoogleAPICallError):
        text = f"HTTP {exc.code} {exc.message}"
    else:
        text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _load_key_file(path: str) -> tuple[Credentials, str | None]:
    """Credentials and project from a key file; :class:`SettingsError` if it is unusable.

    Messages name the file and the problem, never its content.
    """
    setting = "credentialsFile"
    expanded = os.path.expanduser(path)
    try:
        with open(expanded, encoding="utf-8") as handle:
            info = json.load(handle)
    except FileNotFoundError:
        raise SettingsError(setting, f"file {path!r} does not exist") from None
    except OSError as exc:
        raise SettingsError(setting, f"cannot read {path!r}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise SettingsError(setting, f"{path!r} is not a JSON credentials file") from None
    kind = info.get("type") if isinstance(info, dict) else None
    if kind not in _SUPPORTED_KEY_TYPES:
        raise SettingsError(
            setting,
            f"{path!r} holds credentials of type {kind!r}; credentialsFile takes "
            f"{' or '.join(_SUPPORTED_KEY_TYPES)} keys. For other kinds (workload identity "
            "federation, impersonation) point GOOGLE_APPLICATION_CREDENTIALS at the file "
            "and leave credentialsFile out",
        )
    loader: Callable[[dict[str, Any]], Credentials]
    if kind == "service_account":
        loader = service_account.Credentials.from_service_account_info
    else:
        loader = user_credentials.Credentials.from_authorized_user_info
    try:
        credentials = loader(info)
    except (ValueError, TypeError):
        raise SettingsError(
            setting,
            f"{path!r} is not a usable {kind} key (missing fields or a malformed key)",
        ) from None
    project = info.get("project_id") or info.get("quota_project_id")
    return credentials, project if isinstance(project, str) else None
