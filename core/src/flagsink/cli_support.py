"""What the ``flagsink`` command's modules share: exit codes, usage errors, and the
back-pressure that keeps a replay from outrunning an exporter (``flagsink export`` and
``flagsink replay``)."""

from __future__ import annotations

import sys
import time
from typing import NoReturn

import click

from flagsink.config import ConfigError
from flagsink.pipeline import Pipeline
from flagsink.scheduler import DataExporterScheduler
from flagsink.spooled import SpoolScheduler

__all__ = ["EXIT_LOST", "EXIT_USAGE", "SHOWN_ERRORS", "fail", "fail_config", "wait_for_room"]

SHOWN_ERRORS = 20
_CHECK_EVERY = 1024  # events between back-pressure checks, at most
EXIT_LOST = 1
EXIT_USAGE = 2


def fail(message: str) -> None:
    """Print ``flagsink: message`` on stderr and exit with :data:`EXIT_USAGE`."""
    click.echo(f"flagsink: {message}", err=True)
    sys.exit(EXIT_USAGE)


def fail_config(exc: ConfigError) -> NoReturn:
    """Print each of ``exc``'s problems as ``error: problem`` on stderr and exit with
    :data:`EXIT_USAGE`."""
    for problem in exc.problems:
        click.echo(f"error: {problem}", err=True)
    sys.exit(EXIT_USAGE)


def _room(scheduler: DataExporterScheduler | SpoolScheduler) -> int:
    """Events ``scheduler`` can take now without any being dropped or refused (in memory:
    before its cap, counting a failed batch that comes back; with a spool: before the
    events waiting for a commit pile up, and never while the spool is full)."""
    return scheduler.free_capacity


def _make_room(scheduler: DataExporterScheduler | SpoolScheduler, timeout: float) -> bool:
    """Let ``scheduler`` catch up for up to ``timeout`` seconds; True when it did."""
    if isinstance(scheduler, SpoolScheduler):
        # The spool takes everything it has room for: wait for the commit, not the sink.
        return scheduler.consumer.spool.sync(timeout) and _room(scheduler) > 0
    return scheduler.flush(timeout)


def wait_for_room(pipeline: Pipeline, timeout: float) -> int:
    """Back-pressure: a replay never outruns an exporter into dropping events.

    :returns: how many events may be added before the next call.
    """
    for scheduler in pipeline.schedulers:
        deadline = time.monotonic() + timeout
        while _room(scheduler) < 1:
            if _make_room(scheduler, max(deadline - time.monotonic(), 0.0)):
                break
            if time.monotonic() >= deadline:
                error = scheduler.stats().last_error
                raise click.ClickException(
                    f"exporter {scheduler.name} kept failing for {timeout:.0f}s "
                    f"(last error: {error}); stopping the replay"
                )
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
    return min([_CHECK_EVERY, *(_room(scheduler) for scheduler in pipeline.schedulers)])
