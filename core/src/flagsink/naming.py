"""Names for exported files and objects, from GO Feature Flag's ``filename`` template.

Fields: ``Hostname``, ``Timestamp`` (Unix seconds), ``Format`` (extension), and the flush
time in UTC as ``Year``, ``Month``, ``Day``, ``Hour``, ``Minute`` (for partitioned paths).
Two names from one :class:`ObjectNamer` never repeat: a name rendered again (a flush in the
same second, a clock stepped back, a template that cycles such as ``{{ .Minute}}``) gets a
``-1``, ``-2`` ... suffix before the extension (the last :data:`REMEMBERED` distinct names
are remembered). A name can never leave its directory: absolute paths and ``..`` are
rejected.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from flagsink.template import Template, TemplateError

__all__ = [
    "DEFAULT_FILENAME",
    "FILENAME_FIELDS",
    "REMEMBERED",
    "ObjectNamer",
    "check_relative_path",
    "hostname",
    "with_suffix",
]

DEFAULT_FILENAME = "flag-variation-{{ .Hostname}}-{{ .Timestamp}}.{{ .Format}}"
FILENAME_FIELDS = frozenset(
    {"Hostname", "Timestamp", "Format", "Year", "Month", "Day", "Hour", "Minute"}
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Distinct rendered names an ObjectNamer remembers to keep its names unique.
REMEMBERED = 10_000


def hostname() -> str:
    """This host's name, reduced to characters safe in a file or object name."""
    name = _UNSAFE.sub("-", socket.gethostname()).strip("-.")
    return name or "unknown-host"


def check_relative_path(name: str, *, setting: str = "filename") -> str:
    """Return ``name`` if it is a relative path that stays inside its directory."""
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise TemplateError(f"{setting}: {name!r} must be a relative name, not an absolute path")
    parts = name.replace("\\", "/").split("/")
    if any(part in ("", ".", "..") for part in parts) or "\x00" in name:
        raise TemplateError(
            f"{setting}: {name!r} must not contain empty, '.' or '..' path segments"
        )
    return name


def _values(now: float, extension: str, host: str) -> dict[str, str]:
    moment = datetime.fromtimestamp(now, UTC)
    return {
        "Hostname": host,
        "Timestamp": str(int(now)),
        "Format": extension,
        "Year": f"{moment.year:04d}",
        "Month": f"{moment.month:02d}",
        "Day": f"{moment.day:02d}",
        "Hour": f"{moment.hour:02d}",
        "Minute": f"{moment.minute:02d}",
    }


class ObjectNamer:
    """Renders unique names from a template.

    :param template: e.g. :data:`DEFAULT_FILENAME`; checked now (unknown fields, paths).
    :param extension: the format's extension, substituted for ``{{ .Format}}``.
    :param setting: the setting name for error messages.
    """

    def __init__(self, template: str, extension: str, *, setting: str = "filename") -> None:
        self.template = Template.parse(template, FILENAME_FIELDS, setting=setting)
        self.extension = extension
        self.setting = setting
        self.host = hostname()
        self._lock = threading.Lock()
        # Rendered name -> last sequence handed out for it, least recently used first.
        self._used: dict[str, int] = {}
        check_relative_path(self.render_base(time.time()), setting=setting)

    def render_base(self, now: float) -> str:
        """The template rendered for ``now``, without a uniqueness suffix."""
        return self.template.render(_values(now, self.extension, self.host))

    def next_name(self, now: float | None = None) -> str:
        """A name no earlier call of this namer returned."""
        base = self.render_base(time.time() if now is None else now)
        check_relative_path(base, setting=self.setting)
        with self._lock:
            sequence = self._used.pop(base, -1) + 1
            self._used[base] = sequence
            if len(self._used) > REMEMBERED:
                del self._used[next(iter(self._used))]
        return with_suffix(base, sequence, self.extension)

    def candidates(self, moment: float) -> Iterator[str]:
        """The names for a batch formed at ``moment``, in a fixed order: the template
        rendered for ``moment``, then ``-1``, ``-2`` ... Unlike :meth:`next_name` nothing
        is remembered, so a batch retried (even by another process) walks the same names
        and finds the object an earlier attempt wrote."""
        base = self.render_base(moment)
        check_relative_path(base, setting=self.setting)
        sequence = 0
        while True:
            yield with_suffix(base, sequence, self.extension)
            sequence += 1


def with_suffix(name: str, sequence: int, extension: str) -> str:
    """``name`` with ``-sequence`` before its extension (unchanged for 0)."""
    if sequence == 0:
        return name
    dot = f".{extension}"
    if extension and name.endswith(dot):
        return f"{name[: -len(dot)]}-{sequence}{dot}"
    return f"{name}-{sequence}"
