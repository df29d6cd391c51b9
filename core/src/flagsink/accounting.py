"""Every exporter's accounting identity, ``accepted == delivered + dropped + pending``:
its check and the drop reasons always reported, shared by the relay (``GET /v1/status``,
``/metrics``) and ``flagsink status``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["MEMORY_REASONS", "SPOOL_REASONS", "STATUS_PATH", "balanced"]

# Drop reasons always shown (zero until they happen), so rate() and alerts work from the
# start; any other reason appears once it has counted something.
MEMORY_REASONS = ("overflow", "rejected", "shutdown")
#: The relay's JSON status endpoint, read by ``flagsink status --url``.
STATUS_PATH = "/v1/status"
SPOOL_REASONS = ("rejected", "spool_full", "damaged")


def balanced(figures: Mapping[str, Any]) -> bool:
    """True when ``accepted == delivered + dropped + pending`` and no figure is negative."""
    try:
        dropped = [int(n) for n in dict(figures["dropped"]).values()]
        parts = [int(figures["delivered"]), int(figures["pending"]), *dropped]
        accepted = int(figures["accepted"])
    except (KeyError, TypeError, ValueError):
        return False
    return accepted == sum(parts) and min([accepted, *parts]) >= 0
