"""The ``spool:`` section of the config, the spool's error, and the figures it reports
(see :mod:`flagsink.spool`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

__all__ = ["ConsumerStats", "SpoolError", "SpoolSettings", "SpoolStats"]


class SpoolSettings(BaseModel):
    """The ``spool:`` section: where and how events are kept on disk before delivery."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    dir: str = Field(description="Directory of the spool (created if missing); one process.")
    max_bytes: int = Field(
        1024**3,
        ge=1024 * 1024,
        description="Largest size of the spooled events on disk, in bytes (default 1 GiB).",
    )
    when_full: Literal["block", "dropOldest"] = Field(
        "block",
        description="When `maxBytes` is reached: `block` holds new events in memory (the "
        "relay answers 503 with Retry-After) for up to `blockTimeout`, then refuses them, "
        "counted; `dropOldest` deletes the oldest undelivered events, counted.",
    )
    block_timeout: int = Field(
        5_000, ge=0, description="Milliseconds `block` waits for room before refusing events."
    )
    commit_interval: float = Field(
        10.0,
        gt=0,
        le=1_000,
        description="Milliseconds between group commits (each one fsync): the longest an "
        "event waits to be durable, and the relay's added latency.",
    )
    max_pending_in_memory: int = Field(
        200_000,
        ge=1_000,
        description="Events waiting in memory for a commit at most (only reached while the "
        "disk is slow or the spool is full); past it the oldest are refused, counted.",
    )

    @field_validator("dir")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a directory, e.g. /var/lib/flagsink/spool")
        return value


class SpoolError(Exception):
    """The spool cannot be opened or used (the message names the directory and cause)."""


@dataclass
class ConsumerStats:
    """One exporter's durable counters: ``accepted == delivered + dropped + pending``."""

    exporter: str
    stream: str
    accepted: int
    delivered: int
    dropped_by_reason: dict[str, int]
    pending: int
    cursor: int

    @property
    def dropped(self) -> int:
        """All drops, whatever the reason."""
        return sum(self.dropped_by_reason.values())


@dataclass
class SpoolStats:
    """The spool's own figures."""

    directory: str
    bytes_used: int
    max_bytes: int
    waiting: int
    committed: dict[str, int]
    commits: int
    refused: int
    damaged: int
    consumers: list[ConsumerStats] = field(default_factory=list)
