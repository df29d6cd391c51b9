"""Output formats: how a batch of events becomes bytes in a file or object."""

from flagsink.formats.base import Format, FormatOptions

__all__ = ["Format", "FormatOptions"]
