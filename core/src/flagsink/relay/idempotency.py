"""``Idempotency-Key`` for the relay's collector: a retried request is answered, not ingested.

A client that sends ``Idempotency-Key: <key>`` with a collector request and retries it
(same key, same body) after a lost answer gets the first answer again, byte for byte,
with ``Idempotent-Replayed: true``, and its events are not ingested a second time.

The relay asks an :class:`IdempotencyStore` before it ingests (:meth:`~IdempotencyStore.begin`)
and tells it the outcome afterwards: :meth:`~IdempotencyStore.complete` with a 2xx answer
to remember, or :meth:`~IdempotencyStore.release` for anything else (an error, a 4xx/5xx
answer), so the retry is processed normally. Keys are remembered per client
(:func:`request_scope`) for ``ttl`` seconds after the answer.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = [
    "HEADER",
    "KEY_PATTERN",
    "KEY_RULE",
    "MAX_KEY_LENGTH",
    "REPLAYED_HEADER",
    "Claim",
    "IdempotencyStats",
    "IdempotencyStore",
    "MemoryIdempotencyStore",
    "Outcome",
    "StoredResponse",
    "fingerprint",
    "key_problem",
    "presented_key",
    "request_scope",
]

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
KEY_RULE = (
    f"1-{MAX_KEY_LENGTH} printable ASCII characters (space to `~`), not starting or "
    "ending with a space, e.g. a UUID"
)
# Also the OpenAPI pattern: a visible character first and last, printable ones between.
KEY_PATTERN = rf"^[!-~]([ -~]{{0,{MAX_KEY_LENGTH - 2}}}[!-~])?$"
_VALID_KEY = re.compile(KEY_PATTERN.removeprefix("^").removesuffix("$"))


def key_problem(values: Sequence[str]) -> str | None:
    """Why the ``Idempotency-Key`` header values of a request are unusable, or None."""
    if len(values) != 1:
        return f"send one {HEADER} header, not {len(values)}"
    value = values[0]
    if _VALID_KEY.fullmatch(value) is None:
        return f"header {HEADER} must be {KEY_RULE} (got {len(value)} characters)"
    return None


def presented_key(api_key: str | None, authorization: str | None) -> str:
    """The API key a request authenticated with: the one :class:`~flagsink.relay.auth.KeyChecker`
    checks (``X-API-Key``, else the ``Authorization: Bearer`` token)."""
    if api_key is not None:
        return api_key
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return token.strip()
    return ""


def request_scope(client: str, key: str) -> str:
    """Where ``key`` is remembered: a hash of the client's API key (``""`` with
    authentication off) and the header value, so two clients' keys never collide and no
    API key is kept in memory."""
    client_digest = hashlib.sha256(client.encode()).digest()  # fixed length: unambiguous
    return hashlib.sha256(client_digest + key.encode()).hexdigest()


def fingerprint(body: bytes) -> bytes:
    """What identifies a request's body: its SHA-256."""
    return hashlib.sha256(body).digest()


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A 2xx answer kept for replay."""

    status: int
    body: bytes
    media_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class Claim:
    """The right to process a request; hand it back to ``complete`` or ``release``."""

    scope: str
    fingerprint: bytes
    token: int


Outcome = Claim | StoredResponse | Literal["in_progress", "mismatch"]
"""What :meth:`IdempotencyStore.begin` says: process it (:class:`Claim`), replay this
answer (:class:`StoredResponse`), a request with that key is still being processed
(``"in_progress"``, 409) or the key was used with a different body (``"mismatch"``, 422)."""


@dataclass(frozen=True, slots=True)
class IdempotencyStats:
    """``keys``: keys held now (in progress or answered); ``evicted``: keys forgotten
    before their TTL to keep the store within its bounds."""

    keys: int
    evicted: int


class IdempotencyStore(Protocol):
    """Remembers which requests were answered, per scope, for ``ttl`` seconds.

    Implementations are thread-safe. ``complete`` and ``release`` ignore a claim whose
    key has meanwhile expired or been evicted (and perhaps claimed again).
    """

    ttl: float

    def begin(self, scope: str, fingerprint: bytes) -> Outcome:
        """Claim ``scope`` for a request with body ``fingerprint``, unless it is known."""
        ...

    def complete(self, claim: Claim, response: StoredResponse) -> None:
        """Remember ``response`` as the answer for the claim's scope (TTL from now)."""
        ...

    def release(self, claim: Claim) -> None:
        """Forget the claim without an answer: the next request with its key is processed."""
        ...

    def stats(self) -> IdempotencyStats:
        """Current figures, for metrics."""
        ...


class _Entry:
    __slots__ = ("fingerprint", "response", "size", "stamp", "token")

    def __init__(self, fingerprint: bytes, token: int, stamp: float) -> None:
        self.fingerprint = fingerprint
        self.token = token
        self.stamp = stamp
        self.response: StoredResponse | None = None
        self.size = 0


class MemoryIdempotencyStore:
    """An :class:`IdempotencyStore` in memory, bounded in entries and in answer bytes.

    Entries are kept in the order they were last touched (claimed, then answered), which
    with a fixed TTL is also their expiry order: expiring and evicting take the oldest,
    so every call is O(1) (amortised). Past ``max_entries`` keys or ``max_bytes`` bytes of
    stored answers, the oldest keys are forgotten early and counted in ``stats().evicted``.
    """

    def __init__(
        self,
        ttl: float = 600.0,
        max_entries: int = 100_000,
        *,
        max_bytes: int = 32 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be > 0 seconds, got {ttl}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._bytes = 0
        self._evicted = 0
        #: Called with ``(scope, fingerprint, response, ttl)`` after each completed claim,
        #: e.g. to keep the answer in the spool so it survives a restart.
        self.on_complete: Callable[[str, bytes, StoredResponse, float], None] | None = None

    def preload(
        self, scope: str, fingerprint: bytes, response: StoredResponse, remaining: float
    ) -> None:
        """Remember an answer kept from before a restart, for ``remaining`` seconds."""
        if remaining <= 0:
            return
        with self._lock:
            entry = _Entry(fingerprint, next(self._tokens), self._clock() - self.ttl + remaining)
            entry.response = response
            entry.size = len(response.body)
            old = self._entries.pop(scope, None)
            if old is not None:
                self._bytes -= old.size
            self._entries[scope] = entry
            self._bytes += entry.size
            self._bound()

    def begin(self, scope: str, fingerprint: bytes) -> Outcome:
        with self._lock:
            now = self._clock()
            self._expire(now)
            entry = self._entries.get(scope)
            if entry is not None and now - entry.stamp >= self.ttl:  # a clock set back
                self._drop(scope, entry)
                entry = None
            if entry is not None:
                if entry.fingerprint != fingerprint:
                    return "mismatch"
                return "in_progress" if entry.response is None else entry.response
            token = next(self._tokens)
            self._entries[scope] = _Entry(fingerprint, token, now)
            self._bound()
            return Claim(scope, fingerprint, token)

    def complete(self, claim: Claim, response: StoredResponse) -> None:
        with self._lock:
            entry = self._entries.get(claim.scope)
            if entry is None or entry.token != claim.token or entry.response is not None:
                return
            size = len(response.body)
            if size > self.max_bytes:  # could never be kept: forget the key now
                del self._entries[claim.scope]
                self._evicted += 1
                return
            entry.response = response
            entry.size = size
            entry.stamp = self._clock()
            self._bytes += size
            self._entries.move_to_end(claim.scope)
            self._bound()
        if self.on_complete is not None:
            self.on_complete(claim.scope, claim.fingerprint, response, self.ttl)

    def release(self, claim: Claim) -> None:
        with self._lock:
            entry = self._entries.get(claim.scope)
            if entry is not None and entry.token == claim.token and entry.response is None:
                del self._entries[claim.scope]

    def stats(self) -> IdempotencyStats:
        with self._lock:
            return IdempotencyStats(len(self._entries), self._evicted)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            scope, oldest = next(iter(entries.items()))
            if now - oldest.stamp < self.ttl:
                return
            self._drop(scope, oldest)

    def _drop(self, scope: str, entry: _Entry) -> None:
        del self._entries[scope]
        self._bytes -= entry.size

    def _bound(self) -> None:
        entries = self._entries
        while len(entries) > self.max_entries or self._bytes > self.max_bytes:
            _, oldest = entries.popitem(last=False)
            self._bytes -= oldest.size
            self._evicted += 1
