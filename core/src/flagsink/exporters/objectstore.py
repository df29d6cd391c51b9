"""Shared base of exporters that write one object per flush (S3, GCS, Azure Blob ...).

A batch is encoded into a spooled temporary file (in memory up to a few MiB, on disk past
that), so a large batch is never held twice in memory, then uploaded under a name from the
``path`` and ``filename`` templates. Uploads are create-only: when another process already
wrote that name, the next free ``-N`` name is used, so objects never overwrite each other.

Idempotent batches (:meth:`ObjectStoreExporter.export_batch`): the name is rendered from
the batch's creation time, so every attempt at one batch (a retry, or a restart with a
spool) walks the same names ``base``, ``base-1`` ... in the same order, and each object
carries the batch's id in its metadata. When a create-only upload finds a name taken, the
existing object's metadata says whose it is: this batch's (an earlier attempt stored it
and its answer was lost: nothing is uploaded again) or another's (the next name is tried).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import tempfile
import threading
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import IO, Any, BinaryIO, ClassVar, Literal, TypeVar, cast
from urllib.parse import quote

from pydantic import Field, field_validator

from flagsink.event import Event
from flagsink.exporter import Batch, Exporter, ExportError, PartialExportError
from flagsink.exporters.batchfile import FileFormatSettings, build_format
from flagsink.naming import FILENAME_FIELDS, REMEMBERED, ObjectNamer, check_relative_path
from flagsink.template import Template

__all__ = [
    "BATCH_METADATA",
    "BatchCheckDeniedError",
    "ObjectExistsError",
    "ObjectMissingError",
    "ObjectStoreExporter",
    "ObjectStoreSettings",
    "batch_token",
]

SPOOL_BYTES = 4 * 1024 * 1024
_MAX_NAME_ATTEMPTS = 1_000
#: Metadata key of the batch id (services that allow ``-`` in metadata names).
BATCH_METADATA = "flagsink-batch"
# A name found taken whose object then vanished (deleted, or another writer's upload not
# yet complete) is tried again this many times before the batch is retried with backoff.
_VANISHED_RETRIES = 3
_MAX_TOKEN = 256


class ObjectStoreSettings(FileFormatSettings):
    """Format, naming and path settings of object-store exporters."""

    path: str = Field(
        "",
        description="Folder (key prefix) for the objects, e.g. `events/dt={{ .Year}}-"
        "{{ .Month}}-{{ .Day}}` (fields as in `filename`, from the flush time in UTC). "
        "Leading and trailing `/` are ignored.",
    )
    content_encoding: Literal["gzip"] | None = Field(
        None,
        description="`gzip` compresses each object, stored with `Content-Encoding: gzip` "
        "and a `.gz` suffix after the format's extension.",
    )

    @field_validator("path")
    @classmethod
    def _valid_path(cls, path: str) -> str:
        path = path.strip("/")
        if path:
            Template.parse(path, FILENAME_FIELDS, setting="path")
            check_relative_path(path, setting="path")
        return path


class ObjectExistsError(Exception):
    """Raised by :meth:`ObjectStoreExporter.put_object` when a create-only upload finds
    the name taken."""


class ObjectMissingError(Exception):
    """Raised by :meth:`ObjectStoreExporter.read_batch_id` when no object has the name
    (any more)."""


class BatchCheckDeniedError(Exception):
    """Raised by :meth:`ObjectStoreExporter.read_batch_id` when the credentials may
    create objects but not read their metadata; the message names the permission needed.
    The name then counts as another writer's (the next one is tried), so a batch whose
    earlier answer was lost can be stored twice."""


def batch_token(batch: Batch) -> str:
    """The value stored in an object's metadata for ``batch``: its id, percent-encoded to
    ASCII (metadata values are HTTP header values), or a SHA-256 of it past 256 bytes."""
    token = quote(batch.id, safe="/:@-._~")
    if len(token) > _MAX_TOKEN:
        token = "sha256:" + hashlib.sha256(batch.id.encode("utf-8")).hexdigest()
    return token


SettingsT = TypeVar("SettingsT", bound=ObjectStoreSettings)


class ObjectStoreExporter(Exporter[SettingsT]):
    """Writes each batch as one object; subclasses implement :meth:`put_object`.

    To make :meth:`export_batch` idempotent, a subclass also accepts ``metadata=`` in
    :meth:`put_object` (stored with the object) and overrides :meth:`read_batch_id`;
    without that override, :meth:`export_batch` is :meth:`export`.

    Counters: ``already_delivered`` (batches found stored by an earlier attempt, not
    uploaded again) and ``unverified`` (taken names whose owner could not be read, see
    :class:`BatchCheckDeniedError`).
    """

    bulk = True
    #: The metadata key of the batch id; override it where the service's rules differ.
    batch_metadata_key: ClassVar[str] = BATCH_METADATA

    def __init__(self, settings: SettingsT | None = None, /, **options: Any) -> None:
        super().__init__(settings, **options)
        self.format = build_format(self.settings)
        self.extension = self.format.extension
        if self.settings.content_encoding == "gzip":
            self.extension += ".gz"
        template = self.settings.filename
        if self.settings.path:
            template = f"{self.settings.path}/{template}"
        self.namer = ObjectNamer(template, self.extension, setting="path/filename")
        self.last_key: str | None = None
        self.already_delivered = 0
        self.unverified = 0
        self.idempotent = type(self).read_batch_id is not ObjectStoreExporter.read_batch_id
        self._logger = logging.getLogger(f"flagsink.{getattr(self, 'kind', 'objectstore')}")
        self._warned_denied = False
        # Names known to hold a batch (token) or a foreign object (""), least recent first:
        # a batch skips names it knows to be another's without asking the service again.
        self._owners: dict[str, str] = {}
        self._owners_lock = threading.Lock()

    @abstractmethod
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
        """Upload ``size`` bytes from ``body`` as ``key``, only if ``key`` does not exist.

        Raise :class:`ObjectExistsError` when the name is taken, any other exception to
        have the batch retried. Never leave a partial object behind. ``metadata`` (user
        metadata to store with the object) is passed by :meth:`export_batch` only, and only
        to subclasses that override :meth:`read_batch_id`.
        """

    def read_batch_id(self, key: str) -> str | None:
        """The value stored under :attr:`batch_metadata_key` with the existing object
        ``key``, or None when it has none (an object another writer made).

        Raise :class:`ObjectMissingError` when no object has the name,
        :class:`BatchCheckDeniedError` when the credentials may not read it, and any other
        exception (e.g. :class:`~flagsink.exporter.ExportError` on a network failure) to
        have the batch retried: the answer is never guessed.
        """
        raise NotImplementedError

    def export(self, events: Sequence[Event]) -> None:
        """Encode ``events`` and upload them as one new object."""
        self._export(events, None)

    def export_batch(self, events: Sequence[Event], batch: Batch) -> None:
        """Upload ``events`` as the one object of ``batch``, idempotently.

        The name comes from the templates rendered at ``batch.created``; a name taken by
        another batch moves on to the next ``-N`` candidate, and a name holding this
        batch's id means an earlier attempt delivered it: nothing is uploaded again
        (counted in ``already_delivered``).
        """
        if not self.idempotent:
            self.export(events)
            return
        self._export(events, batch)

    def _export(self, events: Sequence[Event], batch: Batch | None) -> None:
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
            rejected = self._encode(events, cast(BinaryIO, spool))
            if len(rejected) < len(events):
                size = spool.tell()
                if batch is None:
                    self.last_key = self._upload(cast(BinaryIO, spool), size)
                else:
                    self.last_key = self._upload_batch(cast(BinaryIO, spool), size, batch)
        if rejected:
            raise PartialExportError(
                f"{len(rejected)} events have values that cannot be encoded as "
                f"{self.format.name} (first: flag {rejected[0].key!r})",
                rejected=rejected,
            )

    def _encode(self, events: Sequence[Event], spool: BinaryIO) -> list[Event]:
        if self.settings.content_encoding != "gzip":
            return self.format.write(events, spool)
        with gzip.GzipFile(fileobj=cast(IO[bytes], spool), mode="wb", mtime=0) as packed:
            return self.format.write(events, cast(BinaryIO, packed))

    def _upload(self, spool: BinaryIO, size: int) -> str:
        for _ in range(_MAX_NAME_ATTEMPTS):
            key = self.namer.next_name()
            spool.seek(0)
            try:
                self.put_object(
                    key,
                    spool,
                    size,
                    content_type=self.format.content_type,
                    content_encoding=self.settings.content_encoding,
                )
            except ObjectExistsError:
                continue
            return key
        raise ObjectExistsError(f"no free object name after {_MAX_NAME_ATTEMPTS} attempts")

    def _upload_batch(self, spool: BinaryIO, size: int, batch: Batch) -> str:
        token = batch_token(batch)
        metadata = {self.batch_metadata_key: token}
        names = self.namer.candidates(batch.created)
        key = next(names)
        vanished = 0
        for _ in range(_MAX_NAME_ATTEMPTS):
            if self._known_owner(key) not in (None, token):
                key = next(names)
                continue
            spool.seek(0)
            try:
                self.put_object(
                    key,
                    spool,
                    size,
                    content_type=self.format.content_type,
                    content_encoding=self.settings.content_encoding,
                    metadata=metadata,
                )
            except ObjectExistsError:
                pass
            else:
                self._remember(key, token)
                return key
            try:
                owner = self._owner_of(key)
            except ObjectMissingError:
                vanished += 1
                if vanished > _VANISHED_RETRIES:
                    raise ExportError(
                        f"{key!r} is reported taken but has no object (another upload to "
                        "it may be under way); the batch is retried"
                    ) from None
                continue  # the same name again: it may be free now
            self._remember(key, owner or "")
            if owner == token:
                self.already_delivered += 1
                self._logger.info(
                    "%s: batch %s was already stored as %r by an earlier attempt whose "
                    "answer was lost; not uploading it again",
                    self.kind,
                    batch.id,
                    key,
                )
                return key
            key = next(names)
        raise ExportError(
            f"no free object name after {_MAX_NAME_ATTEMPTS} attempts (last tried: {key!r}): "
            "make `filename` or `path` more specific (e.g. with {{ .Timestamp}})"
        )

    def _owner_of(self, key: str) -> str | None:
        try:
            return self.read_batch_id(key)
        except BatchCheckDeniedError as exc:
            self.unverified += 1
            if not self._warned_denied:
                self._warned_denied = True
                self._logger.warning(
                    "%s: cannot read the metadata of %r to tell whether an earlier attempt "
                    "already stored this batch (%s); taken names are treated as another "
                    "writer's, so a batch whose answer was lost can be stored twice",
                    self.kind,
                    key,
                    exc,
                )
            return None

    def _known_owner(self, key: str) -> str | None:
        with self._owners_lock:
            return self._owners.get(key)

    def _remember(self, key: str, owner: str) -> None:
        with self._owners_lock:
            self._owners.pop(key, None)
            self._owners[key] = owner
            if len(self._owners) > REMEMBERED:
                del self._owners[next(iter(self._owners))]
