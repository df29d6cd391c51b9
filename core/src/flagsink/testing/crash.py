"""Crash harness for the fault suite (issue 8, cases 1 and 6): kill the relay, restart it,
prove that nothing it acknowledged was lost.

:class:`RelayProcess` runs ``flagsink serve`` as a child process on a free port with a
config that has a ``spool:`` section, and waits for ``/health`` with a deadline.
:class:`Poster` posts batches of events to its collector from one or more threads and
records which requests were acknowledged (2xx: the events are durable in the spool) and
which got no answer (the process died meanwhile: their events may or may not be in the
spool, so they may be delivered but need not be).

:class:`CrashHarness` runs trials. A trial starts the relay, posts, and ends with a
SIGKILL: at a random time, or at a named crash point (``FLAGSINK_CRASH_AT=<point>:N``, see
:mod:`flagsink.faultpoints`), where the process kills itself. After every kill the
spool's durable counters are checked (:func:`check_accounting`: per exporter ``accepted ==
delivered + dropped + pending``, and every acknowledged event is counted). Then
:meth:`CrashHarness.recover` restarts the relay on the same spool until every exporter has
nothing pending, stops it with SIGTERM and checks the counters again.

The caller then reads the sink back with a reader of its own (independent of the exporter)
into :class:`Delivered` items, and :meth:`CrashHarness.result` has the oracle
(:class:`~flagsink.testing.oracle.Oracle`) compare them with what was acknowledged: lost,
duplicated and corrupted events, and for object stores the objects that hold an already
stored batch again (:func:`duplicate_objects`). :func:`run_crash_case` does it all::

    result = run_crash_case(
        "s3",
        {"exporter": {"kind": "s3", "bucket": "events", "maxEventInMemory": 50}},
        tmp_path,
        plans=short_plans(["spool.after_append_before_fsync", "spool.during_compaction"]),
        read_back=read_bucket,  # () -> list[Delivered]
        objects=True,
    )
    result.assert_sound(duplicate_objects_allowed=False)

Every wait has a deadline; the only timed wait is the random delay before a SIGKILL.
Figures are appended as one JSON line to ``$FLAGSINK_FAULT_REPORT`` when it is set.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from flagsink.event import Event, FeatureEvent, TrackingEvent
from flagsink.spool import ConsumerStats, SpoolError, inspect_spool
from flagsink.testing.memory import wait_until
from flagsink.testing.oracle import Oracle, OracleReport

__all__ = [
    "CRASH_ENV",
    "CRASH_POINTS",
    "REPORT_ENV",
    "AccountingCheck",
    "CrashHarness",
    "CrashPlan",
    "CrashResult",
    "Delivered",
    "MemoryFigures",
    "PostOutcome",
    "Poster",
    "RelayDied",
    "RelayProcess",
    "RssSampler",
    "TrialRecord",
    "check_accounting",
    "collector_body",
    "duplicate_objects",
    "free_port",
    "long_plans",
    "read_memory",
    "record_figures",
    "run_crash_case",
    "short_plans",
]

#: The environment variable :mod:`flagsink.faultpoints` reads.
CRASH_ENV = "FLAGSINK_CRASH_AT"
#: Where figures are appended as JSON lines, when set.
REPORT_ENV = "FLAGSINK_FAULT_REPORT"
#: Every named crash point (``objectstore.during_multipart`` is reached by the s3
#: exporter's multipart uploads only).
CRASH_POINTS = (
    "spool.after_append_before_fsync",
    "spool.during_compaction",
    "export.after_send_before_confirm",
    "objectstore.during_multipart",
)
COLLECTOR = "/v1/data/collector"
_STREAM_OF: dict[type, str] = {FeatureEvent: "feature", TrackingEvent: "tracking"}
_encode_json = msgspec.json.Encoder().encode


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def collector_body(events: Sequence[Event]) -> bytes:
    """The ``POST /v1/data/collector`` body GO Feature Flag's providers send."""
    return b'{"events":[' + b",".join(_encode_json(e) for e in events) + b'],"meta":{}}'


def _stream(event: Event) -> str:
    return _STREAM_OF[type(event)]


# -- memory of a process ------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryFigures:
    """A process's resident memory, in bytes, from ``/proc/<pid>/status``.

    :ivar rss: resident now (``VmRSS``).
    :ivar hwm: the highest resident size since the process started (``VmHWM``).
    """

    rss: int
    hwm: int


def read_memory(pid: int) -> MemoryFigures | None:
    """``VmRSS`` and ``VmHWM`` of ``pid``, or None when it is gone (or not on Linux)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024  # kB
    if len(values) < 2:
        return None
    return MemoryFigures(values["VmRSS"], values["VmHWM"])


class RssSampler:
    """Samples a process's ``VmRSS`` every ``interval`` seconds on a thread, until
    :meth:`stop`; :attr:`peak` is the highest sample (compare with ``VmHWM``)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.last: MemoryFigures | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            figures = read_memory(self.pid)
            if figures is None:
                return
            self.last = figures
            self.samples.append((time.monotonic(), figures.rss))
            self._stop.wait(self.interval)

    @property
    def peak(self) -> int:
        """The highest ``VmRSS`` sampled, in bytes (0 before the first sample)."""
        return max((rss for _, rss in self.samples), default=0)

    def stop(self) -> MemoryFigures | None:
        """Stop sampling; the last figures read (``hwm`` is the process's own peak)."""
        self._stop.set()
        self._thread.join(5)
        return self.last


# -- the relay process --------------------------------------------------------------------


class RelayDied(RuntimeError):
    """The relay process exited while it was being started (the message has its log)."""

    def __init__(self, returncode: int, log: str) -> None:
        super().__init__(f"the relay exited with status {returncode} while starting:\n{log}")
        self.returncode = returncode


class RelayProcess:
    """``flagsink serve --config <workdir>/relay.json --port <free port>`` as a child
    process; every start appends its stderr to ``<workdir>/relay.log``.

    :param config: the relay's configuration (written as JSON); it needs a ``spool:``
        section with a ``dir``.
    :param env: extra environment variables for the process (on top of this process's).
    :param start_timeout: seconds :meth:`start` waits for ``/health``.
    :param stop_timeout: seconds :meth:`stop` waits for the exit after SIGTERM.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 30.0,
    ) -> None:
        spool = config.get("spool")
        if not isinstance(spool, Mapping) or not spool.get("dir"):
            raise ValueError("config: the crash harness needs a `spool:` section with `dir`")
        self.config = dict(config)
        self.workdir = workdir
        self.spool_dir = Path(str(spool["dir"]))
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.config_path = workdir / "relay.json"
        self.log_path = workdir / "relay.log"
        self.port = 0
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2))

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` of the current (or last) process."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The current process's id."""
        if self.process is None:
            raise RuntimeError("the relay has not been started")
        return self.process.pid

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.process is not None and self.process.poll() is None

    def start(self, crash_at: str | None = None) -> None:
        """Start the relay (with ``FLAGSINK_CRASH_AT=crash_at`` when given) and wait until
        ``/health`` answers 200.

        :raises RelayDied: the process exited first (e.g. an armed crash point reached
            while starting).
        :raises TimeoutError: ``/health`` did not answer within ``start_timeout``.
        """
        if self.alive:
            raise RuntimeError("the relay is already running")
        self.port = free_port()
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env.pop(CRASH_ENV, None)
        if crash_at:
            env[CRASH_ENV] = crash_at
        command = [sys.executable, "-m", "flagsink.cli", "serve"]
        command += ["--config", str(self.config_path), "--port", str(self.port)]
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n== start {self.starts} (crash at: {crash_at or '-'})\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                command,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        process = self.process
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = process.poll()
            if code is not None:
                raise RelayDied(code, self.log_tail())
            if self._healthy():
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise TimeoutError(
                    f"the relay did not answer /health within {self.start_timeout}s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)

    def _healthy(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def wait_exit(self, timeout: float) -> int | None:
        """The exit status once the process exits within ``timeout`` seconds, else None."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int:
        """SIGKILL the process and reap it; its exit status (-9 unless it had exited)."""
        process = self.process
        if process is None:
            raise RuntimeError("the relay has not been started")
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
        return process.wait(30)

    def stop(self) -> int:
        """SIGTERM (the relay flushes and closes its spool) and wait for the exit status.

        :raises TimeoutError: still running after ``stop_timeout`` (it is then killed).
        """
        process = self.process
        if process is None:
            raise RuntimeError("the relay has not been started")
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(
                f"the relay did not stop within {self.stop_timeout}s of SIGTERM:\n{self.log_tail()}"
            ) from None

    def memory(self) -> MemoryFigures | None:
        """The current process's resident memory, None when it is not running."""
        return read_memory(self.pid) if self.alive else None

    def log_tail(self, chars: int = 4000) -> str:
        """The end of ``relay.log``."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Kill the process if it still runs."""
        if self.alive:
            self.kill()


# -- the client ---------------------------------------------------------------------------


@dataclass
class PostOutcome:
    """One collector request.

    :ivar status: the HTTP status, or None when no answer came (the process died).
    :ivar error: why no answer came.
    """

    events: list[Event]
    sent: float
    answered: float | None = None
    status: int | None = None
    error: str | None = None

    @property
    def acked(self) -> bool:
        """Answered 2xx: the relay committed the events to its spool."""
        return self.status is not None and 200 <= self.status < 300


class Poster:
    """Posts batches of ``batch_size`` events from ``make_events`` to the relay at ``url``
    from ``concurrency`` threads (keep-alive connections), at ``rate`` events per second
    in all (None: as fast as the relay answers), until :meth:`stop`.

    ``on_acked`` gets every acknowledged batch at once (e.g. ``Oracle.accepted``). Every
    request is kept in
    :attr:`outcomes`. With ``stop_on_error`` (the crash trials), a thread stops at its
    first request without an answer (the relay died); otherwise it reconnects and goes on.
    A non-2xx answer (503 when the spool refuses) is recorded and the thread goes on.
    """

    def __init__(
        self,
        url: str,
        make_events: Callable[[int], list[Event]],
        *,
        on_acked: Callable[[list[Event]], None] | None = None,
        batch_size: int = 20,
        rate: float | None = None,
        concurrency: int = 1,
        timeout: float = 10.0,
        stop_on_error: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if batch_size < 1 or concurrency < 1:
            raise ValueError("batch_size and concurrency must be >= 1")
        host, _, port = url.removeprefix("http://").partition(":")
        self.host = host
        self.port = int(port.rstrip("/"))
        self.make_events = make_events
        self.on_acked = on_acked
        self.batch_size = batch_size
        self.rate = rate
        self.timeout = timeout
        self.stop_on_error = stop_on_error
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.outcomes: list[PostOutcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sequence = 0
        self._started_at = 0.0
        self._threads = [
            threading.Thread(target=self._run, name=f"poster-{i}", daemon=True)
            for i in range(concurrency)
        ]

    def start(self) -> Poster:
        """Start posting; returns self."""
        self._started_at = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop posting and wait for the threads (each finishes its request first)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"{thread.name} did not finish within {timeout}s")

    @property
    def running(self) -> bool:
        """True while a thread posts."""
        return any(thread.is_alive() for thread in self._threads)

    def _next_batch(self) -> tuple[list[Event], float] | None:
        """New events and the time they are due (rate pacing); None once stopped."""
        with self._lock:
            if self._stop.is_set():
                return None
            index = self._sequence
            self._sequence += 1
            events = self.make_events(self.batch_size)
        due = 0.0
        if self.rate:
            due = self._started_at + index * self.batch_size / self.rate
        return events, due

    def _run(self) -> None:
        connection: http.client.HTTPConnection | None = None
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                events, due = batch
                wait = due - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return
                if connection is None:
                    connection = http.client.HTTPConnection(self.host, self.port, self.timeout)
                current = connection
                outcome = PostOutcome(events, time.monotonic())
                try:
                    current.request("POST", COLLECTOR, collector_body(events), self.headers)
                    answer = current.getresponse()
                    answer.read()
                    outcome.status = answer.status
                    outcome.answered = time.monotonic()
                    if answer.will_close:
                        current.close()
                        connection = None
                except (OSError, http.client.HTTPException) as exc:
                    outcome.error = f"{type(exc).__name__}: {exc}"
                    current.close()
                    connection = None
                if outcome.acked and self.on_acked is not None:
                    self.on_acked(events)
                with self._lock:
                    self.outcomes.append(outcome)
                if outcome.status is None and self.stop_on_error:
                    return
        finally:
            if connection is not None:
                connection.close()

    # -- what happened ----------------------------------------------------------------------

    def acked_events(self) -> list[Event]:
        """Every event of every acknowledged request."""
        with self._lock:
            return [e for o in self.outcomes if o.acked for e in o.events]

    def unanswered_events(self) -> list[Event]:
        """Every event of every request that got no answer (it may have been committed)."""
        with self._lock:
            return [e for o in self.outcomes if o.status is None for e in o.events]

    def refused(self) -> list[PostOutcome]:
        """Requests answered with a non-2xx status."""
        with self._lock:
            return [o for o in self.outcomes if o.status is not None and not o.acked]


# -- accounting ---------------------------------------------------------------------------


@dataclass
class AccountingCheck:
    """Per exporter, from the spool's durable counters (:func:`~flagsink.spool.inspect_spool`):
    ``accepted == delivered + dropped + pending``, and ``accepted`` at least the events
    acknowledged to clients (of that exporter's event type).

    :ivar when: which moment of the run (``after kill 3``, ``after recovery``).
    :ivar acked: events acknowledged to the client so far, per event type.
    """

    when: str
    consumers: list[ConsumerStats]
    acked: dict[str, int]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems

    @property
    def pending(self) -> int:
        """Events pending over every exporter."""
        return sum(c.pending for c in self.consumers)


def check_accounting(
    spool_dir: Path | str, acked: Mapping[str, int], when: str = ""
) -> AccountingCheck:
    """Read the spool's durable counters and check them (see :class:`AccountingCheck`)."""
    try:
        consumers = inspect_spool(spool_dir)
    except SpoolError as exc:
        return AccountingCheck(when, [], dict(acked), [str(exc)])
    check = AccountingCheck(when, consumers, dict(acked))
    if not consumers:
        check.problems.append(f"{spool_dir}: no exporter in the spool")
    for c in consumers:
        total = c.delivered + c.dropped + c.pending
        if c.accepted != total:
            check.problems.append(
                f"exporter {c.exporter}: accepted {c.accepted} != delivered {c.delivered} + "
                f"dropped {c.dropped} {c.dropped_by_reason} + pending {c.pending} = {total}"
            )
        if c.pending < 0:
            check.problems.append(f"exporter {c.exporter}: pending {c.pending} < 0")
        if c.accepted < acked.get(c.stream, 0):
            check.problems.append(
                f"exporter {c.exporter}: the spool counts {c.accepted} accepted {c.stream} "
                f"events but {acked.get(c.stream, 0)} were acknowledged to the client"
            )
    return check


# -- trials -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrashPlan:
    """How one trial ends.

    :param point: a crash point of :data:`CRASH_POINTS` (the process kills itself the
        ``hit``-th time it gets there), or None: the harness sends SIGKILL at a random
        time in ``kill_after`` seconds after ``/health`` answered.
    :param deadline: seconds a named point must be reached in (the trial fails otherwise).
    """

    point: str | None = None
    hit: int = 1
    kill_after: tuple[float, float] = (0.2, 1.5)
    deadline: float = 20.0

    def __post_init__(self) -> None:
        if self.point is not None and self.point not in CRASH_POINTS:
            raise ValueError(f"unknown crash point {self.point!r}; known: {CRASH_POINTS}")
        if self.hit < 1:
            raise ValueError("hit must be >= 1")

    @property
    def crash_at(self) -> str | None:
        """The ``FLAGSINK_CRASH_AT`` value, None for a random-time kill."""
        return None if self.point is None else f"{self.point}:{self.hit}"

    @property
    def label(self) -> str:
        return self.crash_at or "random"


def short_plans(
    points: Sequence[str],
    *,
    random_kills: int = 2,
    hits: Mapping[str, int] | None = None,
) -> list[CrashPlan]:
    """Each named point once, then ``random_kills`` random-time kills.

    ``hits`` overrides which arrival at a point kills (defaults: the 3rd group commit,
    the 5th compaction pass (starting the spool makes 2), the 2nd export, the 1st gap
    between two parts of a multipart upload).
    """
    defaults = {
        "spool.after_append_before_fsync": 3,
        "spool.during_compaction": 5,
        "export.after_send_before_confirm": 2,
        "objectstore.during_multipart": 1,
    }
    defaults.update(hits or {})
    plans = [CrashPlan(point, defaults.get(point, 1)) for point in points]
    plans += [CrashPlan() for _ in range(random_kills)]
    return plans


def long_plans(points: Sequence[str], trials: int, rng: random.Random) -> list[CrashPlan]:
    """``trials`` plans: the named points in turn with a random ``hit`` each, every third
    trial a random-time kill."""
    ranges = {
        "spool.after_append_before_fsync": (1, 12),
        "spool.during_compaction": (3, 14),
        "export.after_send_before_confirm": (1, 6),
        "objectstore.during_multipart": (1, 1),
    }
    plans: list[CrashPlan] = []
    named = itertools.cycle(points)
    for index in range(trials):
        if index % 3 == 2 or not points:
            plans.append(CrashPlan())
            continue
        point = next(named)
        low, high = ranges.get(point, (1, 4))
        plans.append(CrashPlan(point, rng.randint(low, high)))
    return plans


@dataclass
class TrialRecord:
    """What one trial did.

    :ivar killed_by: ``point`` (the armed crash point killed the process), ``point at
        start`` (it did so while the relay started), ``harness`` (the random SIGKILL),
        or ``missed`` (the point was not reached in time: the harness killed it).
    """

    plan: CrashPlan
    killed_by: Literal["point", "point at start", "harness", "missed"]
    returncode: int | None
    seconds: float
    acked: int
    unanswered: int
    refused: int
    accounting: AccountingCheck


@dataclass(frozen=True)
class Delivered:
    """One thing read back from a sink.

    :param records: the events it holds, as the sink holds them (JSON objects).
    :param container: the object, file, message or request that held them.
    :param batch: the batch id stored with it (object metadata), if any.
    """

    records: Sequence[Mapping[str, Any]]
    container: str | None = None
    batch: str | None = None


def duplicate_objects(
    delivered: Sequence[Delivered], identify: Callable[[Mapping[str, Any]], str]
) -> int:
    """Objects that store again what an earlier object (in container order) already
    holds: the same batch id, or any event already in another object."""
    seen_batches: set[str] = set()
    seen_events: set[str] = set()
    duplicates = 0
    for item in sorted(delivered, key=lambda d: d.container or ""):
        ids = {identify(record) for record in item.records}
        again = bool(ids & seen_events) or (item.batch is not None and item.batch in seen_batches)
        duplicates += again
        seen_events |= ids
        if item.batch is not None:
            seen_batches.add(item.batch)
    return duplicates


@dataclass
class CrashResult:
    """The figures of a crash run (see the module docstring).

    :ivar trials: trials run (one kill each).
    :ivar points_reached: named crash point (``name:N``) -> trials it killed.
    :ivar accepted: events acknowledged (2xx) to the client: each must be delivered.
    :ivar unanswered: events posted without an answer (killed meanwhile); they may or
        may not have been committed.
    :ivar unanswered_delivered: those of them read back (committed, the answer lost).
    :ivar committed: events the spool counted as accepted (per event type, the largest
        count of its exporters, summed).
    :ivar delivered: distinct events read back.
    :ivar lost: acknowledged events not read back.
    :ivar duplicates: extra copies read back (an event read back 3 times counts 2).
    :ivar duplicate_bound: the extra copies allowed: per kill one batch per exporter.
    :ivar corrupted: events read back that differ from what was posted.
    :ivar unexpected: events read back that were never posted.
    :ivar duplicate_objects: objects holding a batch or events another object holds.
    :ivar dropped: events the spool counted as dropped (any reason), over all exporters.
    """

    kind: str
    seed: int
    trials: int
    points_reached: dict[str, int]
    accepted: int
    unanswered: int
    unanswered_delivered: int
    committed: int
    delivered: int
    lost: int
    duplicates: int
    duplicate_bound: int
    corrupted: int
    unexpected: int
    duplicate_objects: int
    dropped: int
    seconds: float
    accounting: list[AccountingCheck]
    records: list[TrialRecord]
    report: OracleReport
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def accounting_problems(self) -> list[str]:
        """Every accounting problem of every check, prefixed with its moment."""
        return [f"{c.when}: {p}" for c in self.accounting for p in c.problems]

    @property
    def missed(self) -> list[str]:
        """Named crash points a trial armed but did not reach in time."""
        return [r.plan.label for r in self.records if r.killed_by == "missed"]

    def problems(self, *, duplicate_objects_allowed: bool = True) -> list[str]:
        """Everything that breaks the promise: an acknowledged event lost, an event
        corrupted or never posted, more duplicates than batches in flight, an accounting
        identity broken, a committed event neither delivered nor counted as dropped, a
        crash point never reached; and, unless allowed, a duplicate object."""
        found = [f"{self.lost} acknowledged events lost"] if self.lost else []
        if self.corrupted:
            found.append(f"{self.corrupted} events corrupted")
        if self.unexpected:
            found.append(f"{self.unexpected} events read back that were never posted")
        if self.duplicates > self.duplicate_bound:
            found.append(
                f"{self.duplicates} duplicates, more than the {self.duplicate_bound} events "
                "of the batches in flight at the kills"
            )
        if self.delivered + self.dropped < self.committed:
            found.append(
                f"the spool committed {self.committed} events but {self.delivered} were "
                f"delivered and {self.dropped} dropped"
            )
        if not duplicate_objects_allowed and self.duplicate_objects:
            found.append(f"{self.duplicate_objects} duplicate objects")
        if self.missed:
            found.append(f"crash points not reached: {self.missed}")
        found += self.accounting_problems
        return found

    def assert_sound(self, *, duplicate_objects_allowed: bool = True) -> None:
        """Raise :class:`AssertionError` listing :meth:`problems`, with the figures and
        the oracle's summary, when there is any."""
        found = self.problems(duplicate_objects_allowed=duplicate_objects_allowed)
        if found:
            raise AssertionError(
                f"{self.kind}: " + "; ".join(found) + f"\n{self.summary()}\n{self.report}"
            )

    def figures(self) -> dict[str, Any]:
        """The figures as a JSON-ready mapping (no per-trial detail)."""
        return {
            "kind": self.kind,
            "seed": self.seed,
            "trials": self.trials,
            "points_reached": self.points_reached,
            "accepted": self.accepted,
            "unanswered": self.unanswered,
            "unanswered_delivered": self.unanswered_delivered,
            "committed": self.committed,
            "delivered": self.delivered,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "duplicate_bound": self.duplicate_bound,
            "corrupted": self.corrupted,
            "unexpected": self.unexpected,
            "duplicate_objects": self.duplicate_objects,
            "dropped": self.dropped,
            "accounting_checks": len(self.accounting),
            "accounting_ok": not self.accounting_problems,
            "seconds": round(self.seconds, 1),
            **self.details,
        }

    def summary(self) -> str:
        """One line of figures, for logs and failure messages."""
        return " ".join(f"{k}={v}" for k, v in self.figures().items())


class CrashHarness:
    """Crash trials of one relay configuration on one spool (see the module docstring).

    :param kind: a label for the figures (the sink kind).
    :param config: the relay configuration; a ``spool`` section is added under
        ``workdir/spool`` unless it has one, and ``shutdownTimeout`` defaults to 10 s.
        Each exporter section needs ``maxEventInMemory`` (the largest batch).
    :param oracle: makes the events (``oracle.events(n, **event_options)``) and learns
        which were acknowledged.
    :param batch_size: events per request.
    :param concurrency: client threads posting at once (more requests in flight at a kill).
    :param rate: events per second the trials post in all (None: as fast as the relay
        answers); a slow test server keeps up with a bounded rate.
    :param seed: seeds the random kill times (default: from ``FLAGSINK_CRASH_SEED`` or
        random); it is in the result, to replay a failing run.
    """

    def __init__(
        self,
        kind: str,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        oracle: Oracle,
        event_options: Mapping[str, Any] | None = None,
        batch_size: int = 20,
        concurrency: int = 2,
        rate: float | None = None,
        env: Mapping[str, str] | None = None,
        seed: int | None = None,
    ) -> None:
        config = dict(config)
        spool = dict(config.get("spool") or {})
        spool.setdefault("dir", str(workdir / "spool"))
        config["spool"] = spool
        config.setdefault("shutdownTimeout", 10)
        sections = list(config.get("exporters") or [config.get("exporter")])
        sizes = [s.get("maxEventInMemory") for s in sections if isinstance(s, Mapping)]
        if not sizes or not all(isinstance(n, int) and n > 0 for n in sizes):
            raise ValueError("config: give every exporter a `maxEventInMemory` (its batch size)")
        self.kind = kind
        self.oracle = oracle
        self.event_options = dict(event_options or {})
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.rate = rate
        #: Events one kill may leave in flight: one batch per exporter.
        self.in_flight_bound = sum(n for n in sizes if isinstance(n, int))
        if seed is None:
            seed = int(os.environ.get("FLAGSINK_CRASH_SEED") or random.randrange(2**32))
        self.seed = seed
        self.rng = random.Random(seed)
        self.relay = RelayProcess(config, workdir, env=env)
        self.records: list[TrialRecord] = []
        self.accounting: list[AccountingCheck] = []
        self.acked: Counter[str] = Counter()
        self.acked_events = 0
        self.unanswered_events: list[Event] = []
        self._started = time.monotonic()

    @property
    def spool_dir(self) -> Path:
        """The spool directory every start of the relay uses."""
        return self.relay.spool_dir

    def make_events(self, count: int) -> list[Event]:
        """``count`` new events from the oracle (with ``event_options``)."""
        return self.oracle.events(count, **self.event_options)

    def poster(
        self, *, rate: float | None = None, concurrency: int | None = None, **options: Any
    ) -> Poster:
        """A :class:`Poster` on the running relay that tells the oracle what was acked."""
        return Poster(
            self.relay.url,
            self.make_events,
            on_acked=self.oracle.accepted,
            batch_size=options.pop("batch_size", self.batch_size),
            concurrency=concurrency or self.concurrency,
            rate=rate or self.rate,
            **options,
        )

    def record_posts(self, poster: Poster) -> tuple[int, int, int]:
        """Count ``poster``'s acknowledged and unanswered events in the run's figures;
        ``(acked, unanswered, refused requests)``."""
        acked = poster.acked_events()
        for event in acked:
            self.acked[_stream(event)] += 1
        self.acked_events += len(acked)
        unanswered = poster.unanswered_events()
        self.unanswered_events += unanswered
        return len(acked), len(unanswered), len(poster.refused())

    def check(self, when: str) -> AccountingCheck:
        """Check the spool's durable counters now (see :func:`check_accounting`)."""
        check = check_accounting(self.spool_dir, self.acked, when)
        self.accounting.append(check)
        return check

    def trial(self, plan: CrashPlan) -> TrialRecord:
        """Start the relay (armed with ``plan``'s crash point), post until it dies (or is
        killed at a random time), then check the spool's counters."""
        started = time.monotonic()
        number = len(self.records) + 1
        try:
            self.relay.start(plan.crash_at)
        except RelayDied as exc:
            if plan.point is None:
                raise
            check = self.check(f"after kill {number} ({plan.label}, while starting)")
            seconds = time.monotonic() - started
            record = TrialRecord(plan, "point at start", exc.returncode, seconds, 0, 0, 0, check)
            self.records.append(record)
            return record
        poster = self.poster().start()
        killed_by: Literal["point", "harness", "missed"]
        if plan.point is None:
            code = self.relay.wait_exit(self.rng.uniform(*plan.kill_after))
            if code is not None:
                poster.stop()
                raise AssertionError(
                    f"trial {number}: the relay exited by itself with status {code}:\n"
                    f"{self.relay.log_tail()}"
                )
            code, killed_by = self.relay.kill(), "harness"
        else:
            code = self.relay.wait_exit(plan.deadline)
            if code is None:
                code, killed_by = self.relay.kill(), "missed"
            else:
                killed_by = "point"
        poster.stop()
        acked, unanswered, refused = self.record_posts(poster)
        check = self.check(f"after kill {number} ({plan.label})")
        seconds = time.monotonic() - started
        record = TrialRecord(plan, killed_by, code, seconds, acked, unanswered, refused, check)
        self.records.append(record)
        return record

    def run(self, plans: Iterable[CrashPlan]) -> list[TrialRecord]:
        """:meth:`trial` for each plan."""
        return [self.trial(plan) for plan in plans]

    def _drained(self) -> bool:
        try:
            consumers = inspect_spool(self.spool_dir)
        except SpoolError:
            return False
        return bool(consumers) and all(
            c.pending == 0 and c.accepted >= self.acked.get(c.stream, 0) for c in consumers
        )

    def recover(
        self,
        timeout: float = 60.0,
        *,
        delivered: Callable[[], bool] | None = None,
        restarts: int = 3,
    ) -> AccountingCheck:
        """Restart the relay (unarmed; unless it runs) on the same spool until every
        exporter has nothing pending (and ``delivered()`` is true, when given), then stop
        it with SIGTERM and check the counters.

        :raises AssertionError: still pending after ``restarts`` starts or ``timeout``
            seconds.
        """
        deadline = time.monotonic() + timeout
        check: AccountingCheck | None = None
        for attempt in range(1, restarts + 1):
            if not self.relay.alive:  # a running relay is drained and stopped as it is
                self.relay.start()

            def done() -> bool:
                return self._drained() and (delivered is None or delivered())

            finished = wait_until(done, max(deadline - time.monotonic(), 0.0), 0.05)
            code = self.relay.stop()  # its final flush may deliver what was left
            check = self.check(f"after recovery (start {attempt})")
            if code != 0:
                check.problems.append(f"the relay exited with status {code} after SIGTERM")
            if check.pending == 0 and (finished or delivered is None or delivered()):
                return check
            if time.monotonic() >= deadline:
                break
        assert check is not None
        raise AssertionError(
            f"{self.kind}: events still pending after recovery: {check.consumers} "
            f"{check.problems}\n{self.relay.log_tail()}"
        )

    def result(
        self,
        delivered: Sequence[Delivered],
        *,
        objects: bool = False,
        details: Mapping[str, Any] | None = None,
    ) -> CrashResult:
        """Compare what was read back (``delivered``) with what was acknowledged.

        Unanswered events that were read back were committed (their answer was lost with
        the process): they are accepted then, so the oracle checks their content too.

        :param objects: count :func:`duplicate_objects` (object stores).
        """
        id_of = self.oracle.id_of
        records = [record for item in delivered for record in item.records]
        found = {key for key in map(id_of, records) if key is not None}
        late = [e for e in self.unanswered_events if e.user_key in found]
        self.oracle.accepted(late)
        report = self.oracle.report(records)
        last = self.accounting[-1] if self.accounting else None
        per_stream: dict[str, int] = {}
        dropped = 0
        for c in last.consumers if last else []:
            per_stream[c.stream] = max(per_stream.get(c.stream, 0), c.accepted)
            dropped += c.dropped
        reached = Counter(r.plan.label for r in self.records if r.killed_by.startswith("point"))

        def identify(record: Mapping[str, Any]) -> str:
            return id_of(record) or ""

        trials = len(self.records)
        result = CrashResult(
            kind=self.kind,
            seed=self.seed,
            trials=trials,
            points_reached=dict(reached),
            accepted=self.acked_events,
            unanswered=len(self.unanswered_events),
            unanswered_delivered=len({e.user_key for e in late}),
            committed=sum(per_stream.values()),
            delivered=report.delivered,
            lost=len(report.missing),
            duplicates=report.extra_copies,
            duplicate_bound=trials * self.in_flight_bound,
            corrupted=len(report.corrupted),
            unexpected=len(report.unexpected),
            duplicate_objects=duplicate_objects(delivered, identify) if objects else 0,
            dropped=dropped,
            seconds=time.monotonic() - self._started,
            accounting=list(self.accounting),
            records=list(self.records),
            report=report,
            details=dict(details or {}),
        )
        record_figures("crash", result.figures())
        return result

    def close(self) -> None:
        """Kill the relay if it still runs."""
        self.relay.close()

    def __enter__(self) -> CrashHarness:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def run_crash_case(
    kind: str,
    config: Mapping[str, Any],
    workdir: Path,
    *,
    plans: Sequence[CrashPlan],
    read_back: Callable[[], Sequence[Delivered]],
    objects: bool = False,
    event_options: Mapping[str, Any] | None = None,
    batch_size: int = 20,
    concurrency: int = 2,
    rate: float | None = None,
    env: Mapping[str, str] | None = None,
    recover_timeout: float = 60.0,
    oracle: Oracle | None = None,
) -> CrashResult:
    """One crash run: every plan as a trial, recovery, the sink read back, the figures.

    :param read_back: reads the sink with a client of its own, after the relay stopped.
    """
    with CrashHarness(
        kind,
        config,
        workdir,
        oracle=oracle or Oracle(),
        event_options=event_options,
        batch_size=batch_size,
        concurrency=concurrency,
        rate=rate,
        env=env,
    ) as harness:
        harness.run(plans)
        harness.recover(recover_timeout)
        return harness.result(read_back(), objects=objects)


def record_figures(case: str, figures: Mapping[str, Any]) -> None:
    """Append ``figures`` as one JSON line to ``$FLAGSINK_FAULT_REPORT`` when it is set."""
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"case": case, **figures}, default=str) + "\n")
