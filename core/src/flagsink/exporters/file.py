"""The ``file`` exporter: one file per flush in a local directory.

Files appear atomically: each is written to a hidden temporary file in the same directory,
synced, then linked to its final name, which fails instead of overwriting, so a reader
never sees half a file and two writers (threads, processes, restarts) never clobber a name.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from flagsink.event import Event
from flagsink.exporter import Exporter, PartialExportError, SettingsError
from flagsink.exporters.batchfile import FileFormatSettings, build_format
from flagsink.hookspecs import hookimpl
from flagsink.naming import ObjectNamer, with_suffix

# The `file` entry point also provides the `file` store (flags from a flag file).
from flagsink.stores.file import flagsink_register_stores

__all__ = ["FileExporter", "FileSettings", "flagsink_register_stores"]

_BUFFER = 1 << 20
_MAX_SUFFIX = 10_000


class FileSettings(FileFormatSettings):
    """Settings of the ``file`` exporter."""

    output_dir: str = Field(
        description="Directory the files are written to; created if missing.",
    )


class FileExporter(Exporter[FileSettings]):
    """Writes each batch to a new file under ``outputDir``."""

    kind = "file"
    bulk = True
    settings_model = FileSettings

    def __init__(self, settings: FileSettings | None = None, /, **options: Any) -> None:
        super().__init__(settings, **options)
        self.directory = Path(self.settings.output_dir).expanduser()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SettingsError(
                "outputDir", f"cannot create directory {str(self.directory)!r}: {exc.strerror}"
            ) from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise SettingsError(
                "outputDir",
                f"directory {str(self.directory)!r} is not writable by this process; "
                "fix its permissions or choose another outputDir",
            )
        self.format = build_format(self.settings)
        self.namer = ObjectNamer(self.settings.filename, self.format.extension)

    def export(self, events: Sequence[Event]) -> None:
        """Write ``events`` to one new file; unencodable events are reported as rejected."""
        name = self.namer.next_name()
        target = self.directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(temporary, "wb", buffering=_BUFFER) as handle:
                rejected = self.format.write(events, handle)
                handle.flush()
                os.fsync(handle.fileno())
            if len(rejected) < len(events):
                self.last_path = _publish(temporary, target, self.format.extension)
        finally:
            temporary.unlink(missing_ok=True)
        if rejected:
            raise PartialExportError(
                f"{len(rejected)} events have values that cannot be encoded as "
                f"{self.format.name} (first: flag {rejected[0].key!r})",
                rejected=rejected,
            )


def _publish(temporary: Path, target: Path, extension: str) -> Path:
    """Link ``temporary`` to ``target`` (or a suffixed name if taken); never overwrite."""
    for sequence in range(_MAX_SUFFIX):
        candidate = target.with_name(with_suffix(target.name, sequence, extension))
        try:
            os.link(temporary, candidate)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            if candidate.exists():  # no hard links here: best-effort exclusive rename
                continue
            os.replace(temporary, candidate)
        _sync_directory(candidate.parent)
        return candidate
    raise FileExistsError(f"no free name for {target} after {_MAX_SUFFIX} attempts")


def _sync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@hookimpl
def flagsink_register_exporters(register: Callable[[type[Exporter[Any]]], None]) -> None:
    register(FileExporter)
