"""The contract of an output format."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, ClassVar

from flagsink.event import Event

__all__ = ["Format", "FormatOptions"]


@dataclass(frozen=True)
class FormatOptions:
    """Format settings shared by every file-writing exporter."""

    csv_template: str | None = None
    parquet_compression_codec: str = "SNAPPY"


class Format(ABC):
    """Encodes batches of events. Construction validates the options (raise ``ValueError``
    naming the setting), so bad config fails at start-up, not at the first flush."""

    name: ClassVar[str]
    extension: ClassVar[str]
    content_type: ClassVar[str] = "application/octet-stream"

    def __init__(self, options: FormatOptions | None = None) -> None:
        self.options = options or FormatOptions()

    @abstractmethod
    def write(self, events: Sequence[Event], out: BinaryIO) -> list[Event]:
        """Write ``events`` to ``out``.

        :returns: the events that could not be encoded (e.g. a value that is not
            JSON-serialisable); they were not written and are reported as rejected.
        """
