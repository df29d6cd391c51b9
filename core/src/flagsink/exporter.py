"""The contract every exporter implements, and the errors it raises."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from flagsink.event import Event

__all__ = [
    "Batch",
    "ExportError",
    "Exporter",
    "ExporterSettings",
    "PartialExportError",
    "PermanentExportError",
    "SettingsError",
]


class ExporterSettings(BaseModel):
    """Base of every exporter's settings: camelCase keys, unknown keys rejected.

    Give every field a ``description``: the docs' settings tables are generated from it.
    Mark secrets with ``pydantic.SecretStr`` so they are never echoed.
    """

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
    )


class SettingsError(ValueError):
    """Settings are valid in shape but unusable (e.g. an unwritable directory).

    :param field: the camelCase setting at fault, used to point at it in the config file.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ExportError(Exception):
    """The export failed; every event of the batch is kept and retried with backoff.

    :param retry_after: seconds the sink asked to wait (e.g. HTTP ``Retry-After``); the
        retry comes no sooner, but never later than the scheduler's ``retry_max``.
    """

    def __init__(self, *args: object, retry_after: float | None = None) -> None:
        super().__init__(*args)
        self.retry_after = retry_after


class PermanentExportError(ExportError):
    """The sink refused the batch for good (retrying cannot fix it): the events are dropped,
    counted as rejected and written to the exporter's dead-letter file when it has one
    (with this error's message as the reason)."""


class PartialExportError(ExportError):
    """Part of a batch failed.

    :param failed: events to retry; everything not listed in ``failed`` or ``rejected``
        was delivered.
    :param rejected: events the sink refused for good; dropped, counted as rejected and
        written to the exporter's dead-letter file when it has one.
    :param reasons: why each rejected event was refused (same order as ``rejected``),
        kept with it in the dead-letter file; default: this error's message.
    """

    def __init__(
        self,
        message: str,
        *,
        failed: Sequence[Event] = (),
        rejected: Sequence[Event] = (),
        reasons: Sequence[str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.failed = list(failed)
        self.rejected = list(rejected)
        if reasons is not None and len(reasons) != len(self.rejected):
            raise ValueError("reasons must give one reason per rejected event")
        self.reasons = list(reasons) if reasons is not None else [message] * len(self.rejected)


@dataclass(frozen=True)
class Batch:
    """The identity of one batch, the same on every retry of it and, with a spool, after a
    restart: exporters that can make delivery idempotent (deterministic object names plus
    create-only writes) derive names from it.

    :param origin: a stable id of where the batch was formed: the spool's id, or without
        a spool a random id of the scheduler.
    :param exporter: the exporter's label (``name`` or kind).
    :param first: the sequence number of the batch's first event (unique per origin and
        exporter).
    :param created: Unix time the batch was first formed; names rendered from it (e.g.
        ``{{ .Timestamp}}``) come out the same on a retry.
    """

    origin: str
    exporter: str
    first: int
    created: float

    @property
    def id(self) -> str:
        """``origin/exporter/first``: unique per batch."""
        return f"{self.origin}/{self.exporter}/{self.first}"


SettingsT = TypeVar("SettingsT", bound=ExporterSettings)


class Exporter(ABC, Generic[SettingsT]):
    """Base class of exporters.

    Subclasses set ``kind`` (the name used in config), ``bulk`` (True: batches flushed on
    size or interval; False: a queue exporter sent near real time) and ``settings_model``,
    and implement :meth:`export`. Exporters run on the scheduler's worker thread, never on
    the application's.
    """

    kind: ClassVar[str]
    bulk: ClassVar[bool] = True
    settings_model: ClassVar[type[ExporterSettings]] = ExporterSettings

    def __init__(self, settings: SettingsT | None = None, /, **options: Any) -> None:
        """Build from a settings model, or from keyword options validated into one."""
        if settings is None:
            settings = self.settings_model.model_validate(options)  # type: ignore[assignment]
        elif options:
            raise TypeError("pass either a settings model or keyword options, not both")
        self.settings: SettingsT = settings  # type: ignore[assignment]

    @abstractmethod
    def export(self, events: Sequence[Event]) -> None:
        """Deliver ``events``, or raise.

        Raise :class:`ExportError` (or any exception) to retry the whole batch,
        :class:`PartialExportError` to retry only some events, and
        :class:`PermanentExportError` when retrying cannot help.
        """

    def export_batch(self, events: Sequence[Event], batch: Batch) -> None:
        """Deliver ``events``, formed as ``batch``; the scheduler calls this.

        The default calls :meth:`export`. Override it to make a batch retried after a
        timeout or a crash idempotent (e.g. an object name derived from ``batch`` and a
        create-only write that recognises its own earlier object).
        """
        self.export(events)

    def close(self) -> None:
        """Release clients and connections. Called once, after the last export."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={getattr(self, 'kind', '?')!r}>"
