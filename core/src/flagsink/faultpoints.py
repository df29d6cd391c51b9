"""Named crash points for the fault suite: ``FLAGSINK_CRASH_AT=name`` kills the process
with SIGKILL the first time it reaches that point (``name:N`` the N-th time).

Points: ``spool.after_append_before_fsync``, ``spool.during_compaction``,
``export.after_send_before_confirm``, ``objectstore.during_multipart``. Without the
variable, :func:`hit` is one global lookup and a comparison; it is never on the
``add_event`` path.
"""

from __future__ import annotations

import os
import signal

__all__ = ["hit"]

_armed: str | None = None
_countdown = 0


def _arm(spec: str | None) -> None:
    global _armed, _countdown
    if not spec:
        _armed, _countdown = None, 0
        return
    name, _, count = spec.partition(":")
    _armed = name
    _countdown = int(count) if count.isdigit() and int(count) > 0 else 1


def hit(name: str) -> None:
    """Kill this process at once if the crash point ``name`` is armed and due."""
    global _countdown
    if _armed is None or name != _armed:
        return
    _countdown -= 1
    if _countdown <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


_arm(os.environ.get("FLAGSINK_CRASH_AT"))
