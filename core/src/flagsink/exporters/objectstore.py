"""Shared base of exporters that write one object per flush (S3, GCS, Azure Blob ...).

A batch is encoded into a spooled temporary file (in memory up to a few MiB, on disk past
that), so a large batch is never held twice in memory, then uploaded under a name from the
``path`` and ``filename`` templates. Uploads are create-only: when another process already
wrote that name, the next free ``-N`` name is used, so objects never overwrite each other.
"""

from __future__ import annotations

import gzip
import tempfile
from abc import abstractmethod
from collections.abc import Sequence
from typing import IO, Any, BinaryIO, Literal, TypeVar, cast

from pydantic import Field, field_validator

from flagsink.event import Event
from flagsink.exporter import Exporter, PartialExportError
from flagsink.exporters.batchfile import FileFormatSettings, build_format
from flagsink.naming import FILENAME_FIELDS, ObjectNamer, check_relative_path
from flagsink.template import Template

__all__ = ["ObjectExistsError", "ObjectStoreExporter", "ObjectStoreSettings"]

SPOOL_BYTES = 4 * 1024 * 1024
_MAX_NAME_ATTEMPTS = 1_000


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


SettingsT = TypeVar("SettingsT", bound=ObjectStoreSettings)


class ObjectStoreExporter(Exporter[SettingsT]):
    """Writes each batch as one object; subclasses implement :meth:`put_object`."""

    bulk = True

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

    @abstractmethod
    def put_object(
        self,
        key: str,
        body: BinaryIO,
        size: int,
        *,
        content_type: str,
        content_encoding: str | None,
    ) -> None:
        """Upload ``size`` bytes from ``body`` as ``key``, only if ``key`` does not exist.

        Raise :class:`ObjectExistsError` when the name is taken, any other exception to
        have the batch retried. Never leave a partial object behind.
        """

    def export(self, events: Sequence[Event]) -> None:
        """Encode ``events`` and upload them as one new object."""
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
            rejected = self._encode(events, cast(BinaryIO, spool))
            if len(rejected) < len(events):
                size = spool.tell()
                self.last_key = self._upload(cast(BinaryIO, spool), size)
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
