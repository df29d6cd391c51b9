"""Settings and helpers shared by every exporter that writes batches as files or objects."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from flagsink.exporter import ExporterSettings
from flagsink.formats.base import Format, FormatOptions
from flagsink.formats.fields import compile_event_template
from flagsink.formats.parquet import CODECS
from flagsink.naming import DEFAULT_FILENAME, ObjectNamer
from flagsink.plugins import PluginError, default_registry

__all__ = ["FileFormatSettings", "build_format"]


class FileFormatSettings(ExporterSettings):
    """Format and naming settings, as in GO Feature Flag's file-based exporters."""

    format: str = Field(
        "json",
        description="Output format: `json` (JSON lines), `csv`, `parquet`, or one a plugin adds.",
    )
    filename: str = Field(
        DEFAULT_FILENAME,
        description="Name template; fields `Hostname`, `Timestamp`, `Format`, `Year`, "
        "`Month`, `Day`, `Hour`, `Minute`. Names never repeat: a `-N` suffix is added "
        "when needed.",
    )
    csv_template: str | None = Field(
        None,
        description="Go-template line for `csv` (default: GO Feature Flag's "
        "`{{ .Kind}};{{ .ContextKind}};...`), with fields such as `.UserKey`, `.Value`, "
        "`.FormattedDate`.",
    )
    parquet_compression_codec: str = Field(
        "SNAPPY",
        description="Parquet codec: SNAPPY, GZIP, ZSTD, BROTLI, LZ4 or UNCOMPRESSED.",
    )

    @field_validator("format")
    @classmethod
    def _known_format(cls, name: str) -> str:
        try:
            default_registry().format(name)
        except PluginError as exc:
            raise ValueError(str(exc)) from None
        return name

    @field_validator("csv_template")
    @classmethod
    def _valid_csv_template(cls, template: str | None) -> str | None:
        if template is not None:
            compile_event_template(template, setting="csvTemplate")
        return template

    @field_validator("parquet_compression_codec")
    @classmethod
    def _known_codec(cls, codec: str) -> str:
        if codec.upper() not in CODECS:
            raise ValueError(f"this codec is not supported; choose one of {', '.join(CODECS)}")
        return codec.upper()

    @model_validator(mode="after")
    def _buildable(self) -> FileFormatSettings:
        ObjectNamer(self.filename, build_format(self).extension)
        return self


def build_format(settings: FileFormatSettings) -> Format:
    """The configured :class:`Format`, validated (raises ``ValueError`` naming the setting)."""
    try:
        cls: Any = default_registry().format(settings.format)
    except PluginError as exc:
        raise ValueError(f"format: {exc}") from None
    fmt: Format = cls(
        FormatOptions(
            csv_template=settings.csv_template,
            parquet_compression_codec=settings.parquet_compression_codec,
        )
    )
    return fmt
