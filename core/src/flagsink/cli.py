"""The ``flagsink`` command: list plugins, validate a config, replay events through it,
manage the flag store. The commands ``replay`` and ``status`` are thin: their machinery
is in :mod:`flagsink.replay` and :mod:`flagsink.status`."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import click

from flagsink.cli_support import (
    EXIT_LOST,
    EXIT_USAGE,
    SHOWN_ERRORS,
    fail,
    fail_config,
    wait_for_room,
)
from flagsink.config import Config, ConfigError, StoreConfig, load_config
from flagsink.flags import FlagFileError, flag_item, load_flag_file, next_version, tracks_events
from flagsink.pipeline import Pipeline, from_config
from flagsink.plugins import PluginError, core_version, installed_plugins
from flagsink.replay import replay_letters
from flagsink.status import (
    EXIT_UNREADABLE,
    StatusUnreadable,
    print_status,
    relay_status,
    spool_status,
    status_url,
    verdict,
)
from flagsink.store import FLAGS, StoreError
from flagsink.store_cache import CachedStore
from flagsink.wire import EventDecodeError, decode_event

__all__ = ["main"]


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        fail_config(exc)
    except PluginError as exc:
        fail(str(exc))
        raise  # unreachable


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(core_version(), "--version", "-V", prog_name="flagsink")
@click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Level of flagsink's own log messages (on stderr).",
)
def main(log_level: str) -> None:
    """Export feature-flag evaluation events to where you keep data."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List installed plugins (read from package metadata; nothing is imported)."""
    rows = [
        {
            "kind": plugin.name,
            "distribution": plugin.distribution,
            "version": plugin.version,
            "mode": plugin.mode or "-",
            "module": plugin.module,
            "disabled": plugin.disabled,
        }
        for plugin in installed_plugins()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    headers = ["KIND", "DISTRIBUTION", "VERSION", "MODE", "STATUS"]
    table: list[list[str]] = [headers]
    for r in rows:
        status = "disabled" if r["disabled"] else ""
        table.append(
            [str(r["kind"]), str(r["distribution"]), str(r["version"]), str(r["mode"]), status]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    for line in table:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
def validate(config: str) -> None:
    """Check CONFIG (YAML or JSON) and that its exporters can be built."""
    loaded = _load(config)
    problems: list[str] = []
    for section in loaded.exporters:
        try:
            section.build().close()
        except ConfigError as exc:
            problems.extend(exc.problems)
    if loaded.store is not None:
        try:
            loaded.store.build_backend().close()
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(f"{config}: OK, {len(loaded.exporters)} exporter(s)")
    for section in loaded.exporters:
        mode = "bulk" if section.exporter_class.bulk else "queue"
        click.echo(f"  {section.path}: {section.label} ({mode}, {section.scheduling.event_type})")
    if loaded.store is not None:
        click.echo(f"  store: {loaded.store.kind} (cacheTTL {loaded.store.cache_ttl:g}s)")


@dataclass
class _Replay:
    lines: int = 0
    accepted: int = 0
    rejected: int = 0


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config file.")
@click.option("--host", default=None, help="Interface to bind (default: from config, 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Port (default: from config, 1031).")
@click.option("--workers", default=1, show_default=True, help="Worker processes.")
def serve(config_path: str | None, host: str | None, port: int | None, workers: int) -> None:
    """Run the relay: GO Feature Flag's /v1/data/collector, routed to the exporters.

    With no --config, events go to JSON lines files under ./flagsink-data.
    """
    try:
        from flagsink.relay.server import serve as run  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        fail(f"the relay needs extra packages ({exc.name}): pip install 'flagsink[relay]'")
        raise  # unreachable
    config = _load(config_path) if config_path else None
    try:
        run(config, host=host, port=port, workers=workers)
    except ConfigError as exc:
        fail_config(exc)
    # Every exporter is closed and its undelivered count logged: end the process now,
    # without the interpreter's teardown (0.05-0.3 s) or exit hooks that join threads
    # still stuck on a dead sink, so that SIGTERM ends within shutdownTimeout.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@main.command()
@click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Config file."
)
@click.argument("events", default="-", type=click.File("rb"))
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    help="Seconds to wait for a failing exporter to recover before giving up.",
)
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar (default: on a terminal)."
)
def export(config_path: str, events: IO[bytes], timeout: float, progress: bool | None) -> None:
    """Replay EVENTS (JSON lines; '-' for stdin) through the configured exporters.

    Malformed lines are reported with their line number and skipped; the exit code is 1
    if any line was rejected or any event was not delivered.
    """
    config = _load(config_path)
    try:
        pipeline = from_config(config)
    except ConfigError as exc:
        fail_config(exc)
    name = getattr(events, "name", "-")
    name = "<stdin>" if name in ("-", "<stdin>") else name
    show = sys.stderr.isatty() if progress is None else progress
    replay = _Replay()
    stopped: click.ClickException | None = None
    try:
        _replay(pipeline, events, name, replay, show=show, timeout=timeout)
    except click.ClickException as exc:
        stopped = exc
    finally:
        delivered = pipeline.close(timeout)
    if stopped is not None:
        click.echo(f"error: {stopped.message}", err=True)
    stats = pipeline.stats()
    lost = sum(s.dropped for s in stats) + sum(s.buffered + s.in_flight for s in stats)
    exported = ", ".join(f"{s.exporter}: {s.exported} exported" for s in stats)
    click.echo(
        f"{replay.lines} lines: {replay.accepted} accepted, {replay.rejected} rejected; "
        f"{exported}; {lost} lost",
        err=True,
    )
    if stopped is not None or replay.rejected or lost or not delivered:
        sys.exit(EXIT_LOST)


def _replay(
    pipeline: Pipeline, stream: IO[bytes], name: str, replay: _Replay, *, show: bool, timeout: float
) -> None:
    size = _size_of(stream)
    bar: Any = (
        click.progressbar(length=size, label="exporting", file=sys.stderr, show_pos=size is None)
        if show
        else _NoBar()
    )
    room = wait_for_room(pipeline, timeout)
    with bar:
        for number, line in enumerate(stream, start=1):
            replay.lines = number
            bar.update(len(line) if size is not None else 1)
            if not line.strip():
                continue
            try:
                event = decode_event(line)
            except EventDecodeError as exc:
                replay.rejected += 1
                if replay.rejected <= SHOWN_ERRORS:
                    click.echo(f"{name}:{number}: rejected: {exc}", err=True)
                continue
            pipeline.add_event(event)
            replay.accepted += 1
            room -= 1
            if room < 1:
                room = wait_for_room(pipeline, timeout)
    if replay.rejected > SHOWN_ERRORS:
        click.echo(f"{name}: ... {replay.rejected - SHOWN_ERRORS} more rejected", err=True)


def _size_of(stream: IO[bytes]) -> int | None:
    try:
        if stream.seekable():
            position = stream.tell()
            size = stream.seek(0, 2) - position
            stream.seek(position)
            return size
    except OSError:
        pass
    return None


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def update(self, _: int) -> None:
        return None


# -- replay of dead letters (the machinery: flagsink.replay) -------------------------------


@main.command()
@click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Config file."
)
@click.option(
    "--exporter",
    "wanted",
    default=None,
    help="Send to this exporter (its `name`, or its kind), and only the letters it wrote. "
    "Default: the exporter named in the letters, when they name only one.",
)
@click.option(
    "--reason",
    default=None,
    metavar="TEXT",
    help="Send only the letters whose reason contains TEXT; the others stay in FILE.",
)
@click.option(
    "--dry-run", is_flag=True, help="Count the letters by exporter and reason; send nothing."
)
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    help="Seconds to wait for a failing exporter to recover before giving up.",
)
@click.argument(
    "files", nargs=-1, required=True, metavar="FILE...", type=click.Path(dir_okay=False)
)
def replay(
    *,
    config_path: str,
    wanted: str | None,
    reason: str | None,
    dry_run: bool,
    timeout: float,
    files: tuple[str, ...],
) -> None:
    """Send the events of dead-letter FILEs again, after the cause is fixed.

    Each FILE is first renamed to FILE.replaying-<unix time>, so that events refused
    again go to a new FILE (or the exporter's deadLetterFile) and not into what is being
    read. Letters not selected (--exporter, --reason), unreadable lines, and letters not
    delivered in time are written back to FILE. The renamed file is deleted once every
    line of it is accounted for; a replay that was interrupted is resumed by the next
    one, skipping what it had finished. Exit code: 0 when every selected letter was
    delivered, 1 otherwise, 2 for a usage or config error.
    """
    config = _load(config_path)
    code = replay_letters(
        config, files, wanted=wanted, reason=reason, dry_run=dry_run, timeout=timeout
    )
    if code:
        sys.exit(code)


# -- flag store ----------------------------------------------------------------------------


def _store_config(config_path: str) -> StoreConfig:
    loaded = _load(config_path)
    if loaded.store is None:
        fail(f"{config_path}: no `store:` section; add one, e.g. `store: {{kind: dynamodb, ...}}`")
    assert loaded.store is not None
    return loaded.store


def _open_store(config_path: str) -> CachedStore:
    section = _store_config(config_path)
    try:
        return CachedStore(section.build_backend(), ttl=0)
    except ConfigError as exc:
        fail_config(exc)


@main.group()
def flags() -> None:
    """Read and write the flags of the configured store."""


@flags.command("push")
@click.argument("flag_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--replace",
    is_flag=True,
    help="Replace everything (init): flags not in FLAG_FILE are removed. Default: upsert "
    "each flag, leaving other flags alone.",
)
def push(flag_file: str, config_path: str, replace: bool) -> None:
    """Load FLAG_FILE (GO Feature Flag YAML, JSON or TOML) into the configured store.

    Each flag is upserted with a new version when its content changed (its own numeric
    `version` if it has one, else the stored version + 1); unchanged flags are skipped.
    """
    try:
        definitions = load_flag_file(flag_file)
    except FlagFileError as exc:
        fail(str(exc))
    store = _open_store(config_path)
    try:
        current = store.all(FLAGS)
        raw = store.backend.all_items(FLAGS)  # tombstones included, for their versions
        written = skipped = stale = 0
        items = {}
        for key, definition in definitions.items():
            previous = raw.get(key) or current.get(key)
            version = next_version(definition, previous)
            if version is None:
                skipped += 1
                items[key] = previous
                continue
            item = flag_item(key, definition, version)
            items[key] = item
            if replace or store.upsert(FLAGS, item):
                written += 1
            else:
                stale += 1
                click.echo(
                    f"  {key}: not written, the store holds version "
                    f"{store.backend.get_item(FLAGS, key)['version']}"  # type: ignore[index]
                    f" >= {version} (raise the flag's `version`)",
                    err=True,
                )
        if replace:
            store.init({FLAGS: {k: v for k, v in items.items() if v is not None}})
            removed = len(set(current) - set(definitions))
            click.echo(
                f"{flag_file}: replaced the store's flags: {len(definitions)} flag(s), "
                f"{written} changed, {skipped} unchanged, {removed} removed"
            )
        else:
            click.echo(
                f"{flag_file}: {written} flag(s) written, {skipped} unchanged, "
                f"{stale} not written (older version)"
            )
    except StoreError as exc:
        fail(str(exc))
    finally:
        store.close()
    if stale:
        sys.exit(EXIT_LOST)


@flags.command("list")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_flags(config_path: str, as_json: bool) -> None:
    """List the flags in the configured store: key, version, trackEvents."""
    store = _open_store(config_path)
    try:
        items = store.all(FLAGS)
    except StoreError as exc:
        fail(str(exc))
    finally:
        store.close()
    rows = [
        {"key": key, "version": item.get("version"), "trackEvents": tracks_events(item)}
        for key, item in sorted(items.items())
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max([len("KEY"), *(len(str(row["key"])) for row in rows)])
    click.echo(f"{'KEY':<{width}}  VERSION  TRACKEVENTS")
    for row in rows:
        track = "true" if row["trackEvents"] else "false"
        click.echo(f"{row['key']:<{width}}  {row['version']!s:<7}  {track}")


@main.group()
def store() -> None:
    """Manage the configured flag store."""


@store.command("init")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
def store_init(config_path: str) -> None:
    """Create what the store needs (e.g. the DynamoDB table), if the store can."""
    section = _store_config(config_path)
    create = getattr(section.store_class, "create", None)
    if create is None:
        click.echo(f"store {section.kind}: nothing to create")
        return
    try:
        backend = section.build_backend()
    except ConfigError as exc:
        fail_config(exc)
    try:
        result = backend.create()  # type: ignore[attr-defined]
    except StoreError as exc:
        fail(str(exc))
    finally:
        backend.close()
    detail = f": {result}" if isinstance(result, str) and result else ""
    click.echo(f"store {section.kind}: created{detail}")


# -- status (the machinery: flagsink.status) ---------------------------------------------


@main.command()
@click.option(
    "--url", help="Base URL of a running relay, e.g. http://127.0.0.1:1031 (reads /v1/status)."
)
@click.option(
    "--api-key",
    envvar="FLAGSINK_API_KEY",
    show_envvar=True,
    help="The relay's API key, when it has keys (sent as X-API-Key; never printed).",
)
@click.option(
    "--spool",
    "spool_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="A spool directory (the config's spool.dir): read-only, safe while a relay runs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--drained", is_flag=True, help="Also exit 1 while events are pending (not delivered)."
)
@click.option(
    "--timeout", default=10.0, show_default=True, help="Seconds to wait for the relay's answer."
)
def status(  # noqa: PLR0917 - click passes every option by keyword
    url: str | None,
    api_key: str | None,
    spool_dir: Path | None,
    as_json: bool,
    drained: bool,
    timeout: float,
) -> None:
    """Each exporter's accounting: accepted = delivered + dropped + pending.

    Reads a running relay (--url) or a spool directory (--spool). Exit code 0 when the
    identity holds for every exporter, 1 when it does not (or, with --drained, when events
    are pending), 2 for a usage error, 3 when the relay or directory cannot be read.
    """
    if (url is None) == (spool_dir is None):
        fail("give either --url URL (a running relay) or --spool DIR (a spool directory)")
    try:
        if url is not None:
            report = relay_status(status_url(url), api_key, timeout)
        else:
            assert spool_dir is not None
            report = spool_status(spool_dir.expanduser())
    except StatusUnreadable as exc:
        click.echo(f"flagsink: {exc}", err=True)
        sys.exit(EXIT_UNREADABLE)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        code = EXIT_LOST if not report["balanced"] else 0
        if not code and drained and any(int(r.get("pending", 0)) for r in report["exporters"]):
            code = EXIT_LOST
    else:
        print_status(report)
        code = verdict(report, drained)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
