"""API-key checks for the relay, in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

__all__ = ["KeyChecker"]


class KeyChecker:
    """Accepts ``X-API-Key: <key>`` or ``Authorization: Bearer <key>`` when keys are set.

    Every configured key is compared (``hmac.compare_digest``) on each call, so the time
    taken does not depend on which key matched or how much of a key was right.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [key.encode() for key in keys if key]

    @property
    def enabled(self) -> bool:
        """True when at least one key is configured."""
        return bool(self._keys)

    def allows(self, api_key: str | None, authorization: str | None) -> bool:
        """True if either header carries a configured key (or no key is configured)."""
        if not self._keys:
            return True
        candidate = api_key
        if candidate is None and authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer":
                candidate = token.strip()
        if not candidate:
            return False
        given = candidate.encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        return matched
