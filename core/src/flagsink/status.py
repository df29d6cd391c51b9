"""``flagsink status``: each exporter's accounting, ``accepted = delivered + dropped +
pending``, read from a running relay (its ``GET /v1/status`` document, built by
:func:`flagsink.relay.metrics.status_document`) or from a spool directory (read-only).

The public surface: :func:`relay_status` and :func:`spool_status` build a report (the
status document, each exporter judged here with :func:`flagsink.accounting.balanced`),
:func:`print_status` and :func:`verdict` show it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from flagsink.accounting import SPOOL_REASONS, STATUS_PATH, balanced
from flagsink.cli_support import EXIT_LOST, fail
from flagsink.deadletter import SPOOL_FOLDER

__all__ = [
    "EXIT_UNREADABLE",
    "STATUS_PATH",
    "StatusUnreadable",
    "print_status",
    "relay_status",
    "spool_status",
    "status_url",
    "verdict",
]

EXIT_UNREADABLE = 3
# A spool read while a relay commits may straddle a commit: read again before judging.
_SPOOL_READS = 3


class StatusUnreadable(Exception):
    """The relay or the spool directory cannot be read (the message says what to do)."""


def _shown_url(url: str) -> str:
    """``url`` without any ``user:password@`` part, for messages."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme}{sep}{host.rpartition('@')[2]}{slash}{path}"


def status_url(url: str) -> str:
    """The ``/v1/status`` URL of the relay at ``url`` (a base URL, with or without the
    path; ``host:port`` means ``http://host:port``)."""
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    scheme = url.partition("://")[0].lower()
    if scheme not in ("http", "https"):
        fail(f"--url {_shown_url(url)}: use an http:// or https:// URL of the relay")
    url = url.rstrip("/")
    return url if url.endswith(STATUS_PATH) else url + STATUS_PATH


def _fetch_status(url: str, api_key: str | None, timeout: float) -> dict[str, Any]:
    import urllib.error  # noqa: PLC0415 - only `status --url` needs them
    import urllib.request  # noqa: PLC0415

    shown = _shown_url(url)
    headers = {"Accept": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - scheme checked
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
            body = answer.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            hint = (
                "the key given was refused; check it"
                if api_key
                else "it needs a key: pass --api-key KEY or set FLAGSINK_API_KEY"
            )
            raise StatusUnreadable(f"{shown}: 401 (missing or wrong API key): {hint}") from None
        if exc.code == 404:
            raise StatusUnreadable(
                f"{shown}: 404: not a flagsink relay with {STATUS_PATH} (an older version?); "
                "give the relay's base URL, e.g. --url http://127.0.0.1:1031, or read its "
                "spool with --spool DIR"
            ) from None
        raise StatusUnreadable(
            f"{shown}: the relay answered HTTP {exc.code}; see its log"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusUnreadable(
            f"cannot reach the relay at {shown} ({reason}): is it running (flagsink serve), "
            "and are the host and port right?"
        ) from None
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("exporters"), list):
        raise StatusUnreadable(
            f"{shown}: the answer is not a flagsink status document; is this the relay's URL?"
        )
    return document


def _spool_slots(directory: Path) -> list[tuple[str, Path]]:
    """``(label, path)`` of the spools under ``directory``: itself, or the relay's
    per-worker slots ``worker-<i>``."""
    from flagsink.spool import DB_NAME  # noqa: PLC0415 - status only

    if not directory.is_dir():
        raise StatusUnreadable(
            f"--spool {directory}: no such directory; give the `spool.dir` of the config"
        )
    if (directory / DB_NAME).exists():
        return [("", directory)]
    slots = [p.parent for p in directory.glob(f"worker-*/{DB_NAME}")]
    if not slots:
        raise StatusUnreadable(
            f"--spool {directory}: no spool here (no {DB_NAME}, no worker-*/{DB_NAME}); "
            "give the `spool.dir` of the config"
        )
    return [(f"{slot.name}/", slot) for slot in sorted(slots, key=_slot_number)]


def _slot_number(path: Path) -> tuple[int, str]:
    suffix = path.name.removeprefix("worker-")
    return (int(suffix), "") if suffix.isdigit() else (1 << 30, path.name)


def spool_status(directory: Path) -> dict[str, Any]:
    """The report of the spool at ``directory`` (a spool, or a relay's ``worker-<i>``
    slots): every exporter's durable counters and the dead-letter files kept in it.

    :raises StatusUnreadable: no spool there, or it cannot be read.
    """
    from flagsink.spool import SpoolError, inspect_spool  # noqa: PLC0415 - status only

    rows: list[dict[str, Any]] = []
    letters: list[dict[str, Any]] = []
    for label, path in _spool_slots(directory):
        slot_rows: list[dict[str, Any]] = []
        for _ in range(_SPOOL_READS):
            try:
                consumers = inspect_spool(path)
            except SpoolError as exc:
                raise StatusUnreadable(f"--spool {directory}: {exc}") from None
            slot_rows = []
            for stats in consumers:
                dropped = dict.fromkeys(SPOOL_REASONS, 0)
                dropped.update(stats.dropped_by_reason)
                row: dict[str, Any] = {
                    "name": f"{label}{stats.exporter}",
                    "eventType": stats.stream,
                    "accepted": stats.accepted,
                    "delivered": stats.delivered,
                    "dropped": dropped,
                    "pending": stats.pending,
                    "cursor": stats.cursor,
                }
                row["balanced"] = balanced(row)
                slot_rows.append(row)
            if all(row["balanced"] for row in slot_rows):
                break
        rows += slot_rows
        for file in sorted((path / SPOOL_FOLDER).glob("*.jsonl")):
            with open(file, "rb") as handle:
                count = sum(1 for line in handle if line.strip())
            letters.append({"path": str(file), "letters": count})
    return {
        "source": {"spool": str(directory)},
        "balanced": all(row["balanced"] for row in rows),
        "exporters": rows,
        "deadLetters": letters,
    }


def relay_status(url: str, api_key: str | None, timeout: float) -> dict[str, Any]:
    """The report of the relay whose ``/v1/status`` is at ``url`` (see :func:`status_url`):
    its document, each exporter judged again here.

    :raises StatusUnreadable: the relay cannot be reached or does not answer a status.
    """
    document = _fetch_status(url, api_key, timeout)
    rows: list[dict[str, Any]] = []
    for given in document["exporters"]:
        if isinstance(given, dict):
            row = dict(given)
            row["balanced"] = balanced(row)  # judged here, not taken from the relay
            rows.append(row)
    return {
        **document,
        "source": {"url": _shown_url(url.removesuffix(STATUS_PATH))},
        "balanced": len(rows) == len(document["exporters"])
        and all(row["balanced"] for row in rows),
        "exporters": rows,
    }


def _bytes_text(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"  # pragma: no cover - unreachable


def _dropped_text(dropped: dict[str, Any]) -> str:
    total = sum(int(n) for n in dropped.values())
    detail = ", ".join(f"{reason} {n}" for reason, n in dropped.items() if n)
    return f"{total} ({detail})" if detail else str(total)


def print_status(report: dict[str, Any]) -> None:
    """Print ``report`` as a table, then the spool's, the relay's and the dead letters'
    figures when it has them."""
    source = report["source"]
    if "url" in source:
        version = report.get("version")
        click.echo(f"relay {source['url']}" + (f" (flagsink {version})" if version else ""))
    else:
        click.echo(f"spool {source['spool']}")
    headers = ["EXPORTER", "ACCEPTED", "DELIVERED", "DROPPED", "PENDING", "BALANCED"]
    table = [headers]
    for row in report["exporters"]:
        table.append(
            [
                str(row.get("name", "?")),
                str(row.get("accepted", "?")),
                str(row.get("delivered", "?")),
                _dropped_text(dict(row.get("dropped") or {})),
                str(row.get("pending", "?")),
                "yes" if row["balanced"] else "NO",
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    for line in table:
        cells = [
            cell.ljust(width) if i in (0, 3, 5) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        click.echo("  ".join(cells).rstrip())
    spool = report.get("spool")
    if isinstance(spool, dict):
        click.echo(
            f"spool {spool.get('directory')}: {_bytes_text(int(spool.get('bytes', 0)))} of "
            f"{_bytes_text(int(spool.get('maxBytes', 0)))} (whenFull {spool.get('whenFull')}"
            f"{', full' if spool.get('full') else ''}), {spool.get('waiting')} waiting for "
            f"a commit, {spool.get('refused')} refused, {spool.get('damaged')} damaged"
        )
    relay = report.get("relay")
    if isinstance(relay, dict):
        rejected = dict(relay.get("rejected") or {})
        click.echo(
            f"relay: {relay.get('received')} received, {relay.get('accepted')} accepted, "
            f"{relay.get('filtered')} filtered, {_dropped_text(rejected)} rejected, "
            f"{relay.get('inProgress')} in progress"
        )
    for file in report.get("deadLetters", []):
        click.echo(
            f"dead letters: {file['letters']} in {file['path']} "
            "(flagsink replay sends them again once the cause is fixed)"
        )


def verdict(report: dict[str, Any], drained: bool) -> int:
    """Print whether the identity holds for every exporter of ``report``; the exit code
    (:data:`~flagsink.cli_support.EXIT_LOST` when it does not, or when ``drained`` and
    events are pending)."""
    rows = report["exporters"]
    broken = [row for row in rows if not row["balanced"]]
    pending = sum(int(row.get("pending", 0)) for row in rows if row["balanced"])
    if broken:
        for row in broken:
            click.echo(
                f"accepted = delivered + dropped + pending does NOT hold for "
                f"{row.get('name')}: accepted {row.get('accepted')}, delivered "
                f"{row.get('delivered')}, dropped {_dropped_text(dict(row.get('dropped') or {}))}"
                f", pending {row.get('pending')}; please report it with this output",
                err=True,
            )
        return EXIT_LOST
    if not rows:
        click.echo("no exporters")
        return 0
    click.echo(
        f"accepted = delivered + dropped + pending holds for every exporter "
        f"({pending} events pending)"
    )
    if drained and pending:
        click.echo(f"--drained: {pending} events are not delivered yet", err=True)
        return EXIT_LOST
    return 0
