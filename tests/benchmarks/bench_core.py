"""flagsink core benchmarks: hot path, event construction, file formats, memory.

A standalone script, not part of the pass/fail suite (pytest does not collect ``bench_*``
files)::

    .venv/bin/python tests/benchmarks/bench_core.py            # full run (a few minutes)
    .venv/bin/python tests/benchmarks/bench_core.py --quick    # smaller sizes, same tables

Every figure is the median of ``--trials`` trials (default 5). Peers run in the same
process, interleaved with flagsink inside each trial, so ratios are not skewed by drift.
Optional peers (OpenTelemetry SDK, the GO Feature Flag Python provider, pyarrow) come from
the ``bench`` dependency group; a peer that cannot run says why in its row.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import cycle, repeat
from pathlib import Path
from typing import Any

from flagsink.event import Event, FeatureEvent, new_feature_event
from flagsink.exporter import Exporter
from flagsink.exporters.file import FileExporter
from flagsink.formats.fields import go_text
from flagsink.scheduler import DataExporterScheduler

# Targets from issue 2 ("Benchmark").
TARGET_ADD_NS = 150.0
TARGET_ADD_VS_OTEL = 0.25
TARGET_BUILD_ADD_NS = 500.0
TARGET_EVENTS_PER_S = {"json": 1_000_000, "csv": 400_000, "parquet": 700_000}
TARGET_BYTES_PER_EVENT = 300.0

BIG = 50_000_000  # a threshold no timed loop reaches: nothing flushes while we time
FLAGS = [f"flag-{name}" for name in ("new-checkout", "dark-mode", "search-v2", "pricing-test")]
FLAGS += [f"experiment-{i:02d}" for i in range(16)]
VARIATIONS = ["enabled", "disabled", "control", "treatment-a", "treatment-b"]
VERSION = "1.4.2"
SOURCE = "SERVER"


# -- harness ---------------------------------------------------------------------------------


class Unavailable(Exception):
    """A peer that cannot run here; the message says why."""


RAW = False


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """Relative spread of the trials around their median, e.g. ``±3%``."""
    mid = median(values)
    if len(values) < 2 or not mid:
        return ""
    text = f"±{100 * (max(values) - min(values)) / 2 / mid:.0f}%"
    if RAW:
        text += " [" + ", ".join(f"{v:.4g}" for v in values) + "]"
    return text


def time_loop(call: Callable[[Any], Any], arg: Any, n: int) -> float:
    """ns per ``call(arg)``, including the loop (measured separately as 'empty loop')."""
    start = time.perf_counter_ns()
    for _ in repeat(None, n):
        call(arg)
    return (time.perf_counter_ns() - start) / n


def time_threads(call: Callable[[Any], Any], arg: Any, n: int, threads: int) -> float:
    """Wall-clock ns per call while ``threads`` threads each make ``n // threads`` calls."""
    per_thread = n // threads
    barrier = threading.Barrier(threads + 1)

    def work() -> None:
        barrier.wait()
        for _ in repeat(None, per_thread):
            call(arg)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    start = time.perf_counter_ns()
    barrier.wait()
    for worker in workers:
        worker.join()
    return (time.perf_counter_ns() - start) / (per_thread * threads)


def settle() -> None:
    gc.collect()


def _noop(_: Any) -> None:
    return None


class NullExporter(Exporter[Any]):
    """Discards every batch (bulk mode)."""

    kind = "null"
    bulk = True

    def export(self, events: Sequence[Event]) -> None:
        return None


# -- subjects for the add_event benchmark ----------------------------------------------------
# Each factory returns (add, event, cleanup): ``add(event)`` is what the application calls.

Subject = tuple[Callable[[Any], None], Any, Callable[[], None]]


def prebuilt_event() -> FeatureEvent:
    return new_feature_event(
        f"user-{uuid.uuid4()}", FLAGS[0], True, VARIATIONS[0], version=VERSION, source=SOURCE
    )


def flagsink_subject() -> Subject:
    scheduler = DataExporterScheduler(
        NullExporter(), flush_interval=3600, max_events_in_memory=BIG, name="bench"
    )

    def cleanup() -> None:
        scheduler.close(timeout=60)

    return scheduler.add_event, prebuilt_event(), cleanup


def deque_subject() -> Subject:
    buffer: deque[Any] = deque()
    return buffer.append, prebuilt_event(), buffer.clear


def otel_subject() -> Subject:
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
    except ImportError as exc:
        raise Unavailable(
            f"opentelemetry-sdk not installed ({exc}); uv sync --group bench"
        ) from None

    class NoopSpanExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            return None

    span = TracerProvider().get_tracer("bench").start_span("evaluate")
    span.end()
    # Queue and batch size above the loop length: no drop and no export while timing.
    processor = BatchSpanProcessor(
        NoopSpanExporter(),
        max_queue_size=BIG,
        max_export_batch_size=BIG,
        schedule_delay_millis=3_600_000,
    )
    return processor.on_end, span, processor.shutdown


def goff_classes() -> tuple[Any, Any, Any, Any]:
    try:
        from gofeatureflag_python_provider.options import GoFeatureFlagOptions  # type: ignore[import-untyped]
        from gofeatureflag_python_provider.services.api import GoFeatureFlagApi  # type: ignore[import-untyped]
        from gofeatureflag_python_provider.services.event_publisher import EventPublisher  # type: ignore[import-untyped]
        from gofeatureflag_python_provider.services.model.request_data_collector import (  # type: ignore[import-untyped]
            FeatureEvent as GoffFeatureEvent,
        )
    except ImportError as exc:
        raise Unavailable(
            f"gofeatureflag-python-provider not installed ({exc}); uv sync --group bench"
        ) from None
    return GoFeatureFlagOptions, GoFeatureFlagApi, EventPublisher, GoffFeatureEvent


def goff_publisher() -> tuple[Any, Callable[[], None]]:
    """A started EventPublisher that never touches the network.

    The endpoint is the unused discard port on 127.0.0.1, the pending-event threshold and
    flush interval are beyond any timed loop, and the API object's send method is replaced
    by a no-op so the final flush in ``stop()`` makes no request either.
    """
    options_cls, api_cls, publisher_cls, _ = goff_classes()
    options = options_cls(
        endpoint="http://127.0.0.1:9",
        max_pending_events=BIG,
        data_flush_interval=3_600_000,
    )
    api = api_cls(options)
    api.send_event_to_data_collector = lambda events, metadata: None
    publisher = publisher_cls(api, options)
    publisher.start()
    return publisher, lambda: publisher.stop(timeout=60)


def goff_event(user_key: str) -> Any:
    event_cls = goff_classes()[3]
    return event_cls(
        contextKind="user",
        userKey=user_key,
        creationDate=int(time.time()),
        key=FLAGS[0],
        variation=VARIATIONS[0],
        value=True,
        default=False,
        version=VERSION,
        source="INPROCESS",
    )


def goff_subject() -> Subject:
    publisher, cleanup = goff_publisher()
    return publisher.add_event, goff_event(f"user-{uuid.uuid4()}"), cleanup


# -- 1. add_event ----------------------------------------------------------------------------


def bench_add(n: int, trials: int) -> dict[str, Any]:
    subjects: dict[str, Callable[[], Subject]] = {
        "loop + call of an empty Python function": lambda: (_noop, None, lambda: None),
        "deque.append (floor)": deque_subject,
        "flagsink DataExporterScheduler.add_event": flagsink_subject,
        "OTel BatchSpanProcessor.on_end": otel_subject,
        "GOFF EventPublisher.add_event": goff_subject,
    }
    results: dict[str, dict[int, list[float]]] = {name: {1: [], 4: []} for name in subjects}
    errors: dict[str, str] = {}
    for _ in range(trials):
        for name, factory in subjects.items():
            if name in errors:
                continue
            for threads in (1, 4):
                try:
                    add, arg, cleanup = factory()
                except Unavailable as exc:
                    errors[name] = str(exc)
                    break
                except Exception as exc:  # a peer that cannot be built offline
                    errors[name] = f"{type(exc).__name__}: {exc}"
                    break
                settle()
                try:
                    if threads == 1:
                        results[name][1].append(time_loop(add, arg, n))
                    else:
                        results[name][4].append(time_threads(add, arg, n, threads))
                finally:
                    cleanup()
    return {"results": results, "errors": errors}


# -- 2. build + add --------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class SlotsEvent:
    """The obvious pure-Python alternative: immutable, but GC-tracked and built through
    ``object.__setattr__`` per field."""

    context_kind: str
    user_key: str
    creation_date: int
    key: str
    variation: str
    value: Any
    default: bool
    version: str
    source: str
    metadata: dict[str, Any] | None = None


@dataclass(slots=True)
class MutableSlotsEvent:
    context_kind: str
    user_key: str
    creation_date: int
    key: str
    variation: str
    value: Any
    default: bool
    version: str
    source: str
    metadata: dict[str, Any] | None = None


def make_rows(n: int) -> list[tuple[str, str, Any, str]]:
    """(user key, flag, value, variation) per event: fresh keys, shared low-cardinality
    strings, as an application evaluating a few flags for many users produces."""
    rows = []
    for i in range(n):
        variation = VARIATIONS[i % len(VARIATIONS)]
        rows.append(
            (f"user-{uuid.uuid4()}", FLAGS[i % len(FLAGS)], variation != "disabled", variation)
        )
    return rows


def build_add_flagsink(rows: list[tuple[str, str, Any, str]]) -> float:
    scheduler = DataExporterScheduler(NullExporter(), flush_interval=3600, max_events_in_memory=BIG)
    add = scheduler.add_event
    new = new_feature_event
    settle()
    start = time.perf_counter_ns()
    for user, flag, value, variation in rows:
        add(new(user, flag, value, variation, version=VERSION, source=SOURCE))
    elapsed = time.perf_counter_ns() - start
    scheduler.close(timeout=60)
    return elapsed / len(rows)


CONTEXT_POOL = 1024  # contexts cycled through: fresh events, contexts warm in cache


def _build_add_contexts(rows: list[tuple[str, str, Any, str]], contexts: list[Any]) -> float:
    scheduler = DataExporterScheduler(NullExporter(), flush_interval=3600, max_events_in_memory=BIG)
    add = scheduler.add_event
    new = new_feature_event
    settle()
    start = time.perf_counter_ns()
    for (_user, flag, value, variation), context in zip(rows, cycle(contexts)):
        add(new(context, flag, value, variation, version=VERSION, source=SOURCE))
    elapsed = time.perf_counter_ns() - start
    scheduler.close(timeout=60)
    return elapsed / len(rows)


def build_add_flagsink_mapping(rows: list[tuple[str, str, Any, str]]) -> float:
    """With a mapping context ``{"targetingKey": ..., "plan": ...}``."""
    contexts = [{"targetingKey": row[0], "plan": "pro"} for row in rows[:CONTEXT_POOL]]
    return _build_add_contexts(rows, contexts)


def build_add_flagsink_openfeature(rows: list[tuple[str, str, Any, str]]) -> float:
    """With an OpenFeature ``EvaluationContext``, as an OpenFeature hook receives it."""
    try:
        from openfeature.evaluation_context import EvaluationContext
    except ImportError as exc:
        raise Unavailable(f"openfeature-sdk not installed ({exc}); uv sync --group bench") from None
    contexts = [EvaluationContext(row[0], {"plan": "pro"}) for row in rows[:CONTEXT_POOL]]
    return _build_add_contexts(rows, contexts)


def build_only_flagsink(rows: list[tuple[str, str, Any, str]]) -> float:
    keep: list[FeatureEvent] = []
    append = keep.append
    now = int(time.time())
    settle()
    start = time.perf_counter_ns()
    for user, flag, value, variation in rows:
        append(FeatureEvent("user", user, now, flag, variation, value, False, VERSION, SOURCE))
    elapsed = time.perf_counter_ns() - start
    return elapsed / len(rows)


def build_only_slots(rows: list[tuple[str, str, Any, str]]) -> float:
    keep: list[SlotsEvent] = []
    append = keep.append
    now = int(time.time())
    settle()
    start = time.perf_counter_ns()
    for user, flag, value, variation in rows:
        append(SlotsEvent("user", user, now, flag, variation, value, False, VERSION, SOURCE))
    elapsed = time.perf_counter_ns() - start
    return elapsed / len(rows)


def build_only_mutable_slots(rows: list[tuple[str, str, Any, str]]) -> float:
    keep: list[MutableSlotsEvent] = []
    append = keep.append
    now = int(time.time())
    settle()
    start = time.perf_counter_ns()
    for user, flag, value, variation in rows:
        append(MutableSlotsEvent("user", user, now, flag, variation, value, False, VERSION, SOURCE))
    elapsed = time.perf_counter_ns() - start
    return elapsed / len(rows)


def build_only_loop(rows: list[tuple[str, str, Any, str]]) -> float:
    keep: list[Any] = []
    append = keep.append
    settle()
    start = time.perf_counter_ns()
    for user, _flag, _value, _variation in rows:
        append(user)
    elapsed = time.perf_counter_ns() - start
    return elapsed / len(rows)


def build_add_goff(rows: list[tuple[str, str, Any, str]]) -> float:
    publisher, cleanup = goff_publisher()
    event_cls = goff_classes()[3]
    add = publisher.add_event
    settle()
    start = time.perf_counter_ns()
    for user, flag, value, variation in rows:
        # As the provider's DataCollectorHook builds it (creationDate from time.time()).
        add(
            event_cls(
                contextKind="user",
                userKey=user,
                creationDate=int(time.time()),
                key=flag,
                variation=variation,
                value=value,
                default=False,
                version=VERSION,
                source="INPROCESS",
            )
        )
    elapsed = time.perf_counter_ns() - start
    cleanup()
    return elapsed / len(rows)


def bench_build(n: int, trials: int) -> dict[str, Any]:
    rows = make_rows(n)
    cases: dict[str, Callable[[list[tuple[str, str, Any, str]]], float]] = {
        "loop over rows + list.append (floor)": build_only_loop,
        "FeatureEvent(...) bare constructor": build_only_flagsink,
        "frozen slots dataclass(...) bare constructor (peer)": build_only_slots,
        "mutable slots dataclass(...) bare constructor (peer)": build_only_mutable_slots,
        "new_feature_event(key, ...) + add_event": build_add_flagsink,
        "new_feature_event({'targetingKey': key}, ...) + add_event": build_add_flagsink_mapping,
        "new_feature_event(EvaluationContext, ...) + add_event": build_add_flagsink_openfeature,
        "GOFF FeatureEvent(pydantic) + EventPublisher.add_event": build_add_goff,
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    errors: dict[str, str] = {}
    for _ in range(trials):
        for name, case in cases.items():
            if name in errors:
                continue
            try:
                results[name].append(case(rows))
            except Unavailable as exc:
                errors[name] = str(exc)
            settle()
    return {"results": results, "errors": errors}


# -- 3. file exporter throughput -------------------------------------------------------------


def make_events(n: int) -> list[FeatureEvent]:
    """Typical evaluation events: fresh user keys, 20 flags, bool/str/int values."""
    events = []
    base = int(time.time()) - 3600
    for i in range(n):
        variation = VARIATIONS[i % len(VARIATIONS)]
        kind = i % 10
        value: Any = variation != "disabled" if kind < 6 else (variation if kind < 9 else i % 100)
        events.append(
            new_feature_event(
                f"user-{uuid.uuid4()}",
                FLAGS[i % len(FLAGS)],
                value,
                variation,
                version=VERSION,
                source=SOURCE,
                creation_date=base + i // 1000,
            )
        )
    return events


def as_dict(event: FeatureEvent) -> dict[str, Any]:
    return {
        "kind": "feature",
        "contextKind": event.context_kind,
        "userKey": event.user_key,
        "creationDate": event.creation_date,
        "key": event.key,
        "variation": event.variation,
        "value": event.value,
        "default": event.default,
        "version": event.version,
        "source": event.source,
    }


def as_row(event: FeatureEvent) -> tuple[str, ...]:
    return (
        "feature",
        event.context_kind,
        event.user_key,
        str(event.creation_date),
        event.key,
        event.variation,
        go_text(event.value),
        "true" if event.default else "false",
        event.source,
    )


def peer_json(dicts: list[dict[str, Any]], path: Path) -> None:
    dumps = json.dumps
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as handle:
        write = handle.write
        for record in dicts:
            write(dumps(record))
            write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def peer_csv(rows: list[tuple[str, ...]], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="", buffering=1 << 20) as handle:
        csv.writer(handle, delimiter=";", lineterminator="\n").writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())


def run_exporter(directory: Path, fmt: str, events: list[FeatureEvent], batch: int) -> float:
    """Seconds for ``FileExporter.export`` of ``events`` in batches of ``batch``."""
    exporter = FileExporter(output_dir=str(directory), format=fmt)
    settle()
    start = time.perf_counter()
    for offset in range(0, len(events), batch):
        exporter.export(events[offset : offset + batch])
    elapsed = time.perf_counter() - start
    exporter.close()
    return elapsed


def run_in_memory(directory: Path, fmt: str, events: list[FeatureEvent], batch: int) -> float:
    """Seconds for ``format.write`` into memory: the encoding alone, no disk."""
    encoder = FileExporter(output_dir=str(directory), format=fmt).format
    settle()
    start = time.perf_counter()
    for offset in range(0, len(events), batch):
        encoder.write(events[offset : offset + batch], io.BytesIO())
    return time.perf_counter() - start


def run_pipeline(directory: Path, fmt: str, events: list[FeatureEvent], batch: int) -> float:
    """Seconds from the first add_event to close(): application thread and worker share
    the GIL, as in a real process."""
    scheduler = DataExporterScheduler(
        FileExporter(output_dir=str(directory), format=fmt),
        flush_interval=3600,
        max_events_in_memory=batch,
        max_buffered_events=len(events) + batch,
    )
    add = scheduler.add_event
    settle()
    start = time.perf_counter()
    for event in events:
        add(event)
    delivered = scheduler.close(timeout=600)
    elapsed = time.perf_counter() - start
    if not delivered:
        raise RuntimeError(f"pipeline {fmt}: events left undelivered: {scheduler.stats()}")
    return elapsed


def check_parquet() -> str | None:
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        return f"pyarrow not installed ({exc}); uv sync --group test"
    return None


def bench_files(n: int, trials: int, batch: int) -> dict[str, Any]:
    events = make_events(n)
    dicts = [as_dict(e) for e in events]
    rows = [as_row(e) for e in events]
    formats = ["json", "csv", "parquet"]
    errors: dict[str, str] = {}
    reason = check_parquet()
    if reason:
        errors["parquet"] = reason
        formats.remove("parquet")
    one: dict[str, list[float]] = {f: [] for f in formats}
    batched: dict[str, list[float]] = {f: [] for f in formats}
    pipeline: dict[str, list[float]] = {f: [] for f in formats}
    memory: dict[str, list[float]] = {f: [] for f in formats}
    peers: dict[str, list[float]] = {"json": [], "csv": []}
    sizes: dict[str, int] = {}
    root = Path(tempfile.mkdtemp(prefix="flagsink-bench-"))
    try:
        for _ in range(trials):
            for fmt in formats:
                for store, run, size in (
                    (one, run_exporter, n),
                    (batched, run_exporter, batch),
                    (pipeline, run_pipeline, batch),
                    (memory, run_in_memory, n),
                ):
                    directory = root / fmt
                    seconds = run(directory, fmt, events, size)
                    store[fmt].append(n / seconds)
                    if store is one:
                        sizes[fmt] = sum(p.stat().st_size for p in directory.iterdir())
                    shutil.rmtree(directory)
            peer_runs: list[tuple[str, Callable[[Path], None]]] = [
                ("json", lambda path: peer_json(dicts, path)),
                ("csv", lambda path: peer_csv(rows, path)),
            ]
            for name, peer in peer_runs:
                path = root / f"peer.{name}"
                settle()
                start = time.perf_counter()
                peer(path)
                peers[name].append(n / (time.perf_counter() - start))
                path.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "one": one,
        "batched": batched,
        "pipeline": pipeline,
        "memory": memory,
        "peers": peers,
        "sizes": sizes,
        "errors": errors,
    }


# -- 4. memory per buffered event ------------------------------------------------------------


def traced(build: Callable[[int], Any], n: int) -> float:
    """Bytes per event still allocated after ``build(n)``, measured with tracemalloc."""
    settle()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build(n)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    settle()
    return (after - before) / n


def _event_args(i: int) -> tuple[str, str, bool, str]:
    variation = VARIATIONS[i % len(VARIATIONS)]
    return f"user-{uuid.uuid4()}", FLAGS[i % len(FLAGS)], variation != "disabled", variation


def mem_flagsink(n: int) -> Any:
    scheduler = DataExporterScheduler(
        NullExporter(), max_events_in_memory=BIG, start=False, name="bench"
    )
    for i in range(n):
        user, flag, value, variation = _event_args(i)
        scheduler.add_event(new_feature_event(user, flag, value, variation, version=VERSION))
    return scheduler


def mem_slots(n: int) -> Any:
    buffer: deque[SlotsEvent] = deque()
    for i in range(n):
        user, flag, value, variation = _event_args(i)
        buffer.append(
            SlotsEvent(
                "user", user, int(time.time()), flag, variation, value, False, VERSION, SOURCE
            )
        )
    return buffer


def mem_dict(n: int) -> Any:
    buffer: deque[dict[str, Any]] = deque()
    for i in range(n):
        user, flag, value, variation = _event_args(i)
        buffer.append(
            {
                "kind": "feature",
                "contextKind": "user",
                "userKey": user,
                "creationDate": int(time.time()),
                "key": flag,
                "variation": variation,
                "value": value,
                "default": False,
                "version": VERSION,
                "source": SOURCE,
            }
        )
    return buffer


def mem_goff(n: int) -> Any:
    event_cls = goff_classes()[3]
    buffer: list[Any] = []
    for i in range(n):
        user, flag, value, variation = _event_args(i)
        buffer.append(
            event_cls(
                contextKind="user",
                userKey=user,
                creationDate=int(time.time()),
                key=flag,
                variation=variation,
                value=value,
                default=False,
                version=VERSION,
                source="INPROCESS",
            )
        )
    return buffer


def mem_keys_only(n: int) -> Any:
    return deque(_event_args(i)[0] for i in range(n))


def bench_memory(n: int, trials: int) -> dict[str, Any]:
    cases: dict[str, Callable[[int], Any]] = {
        "flagsink FeatureEvent in scheduler buffer": mem_flagsink,
        "slots dataclass in deque (peer)": mem_slots,
        "dict in deque (peer)": mem_dict,
        "GOFF FeatureEvent (pydantic) in list (peer)": mem_goff,
        "user key string alone in deque (floor)": mem_keys_only,
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    errors: dict[str, str] = {}
    for _ in range(trials):
        for name, case in cases.items():
            if name in errors:
                continue
            try:
                results[name].append(traced(case, n))
            except Unavailable as exc:
                errors[name] = str(exc)
    return {"results": results, "errors": errors}


# -- report ----------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)


def fmt_rate(value: float) -> str:
    return f"{value / 1e6:.2f} M/s" if value >= 1e6 else f"{value / 1e3:.0f} k/s"


def report_add(data: dict[str, Any], n: int) -> None:
    results, errors = data["results"], data["errors"]
    print(f"\n## 1. add_event, prebuilt event, ns per call ({n:,} calls per trial)\n")
    rows = []
    for name, by_threads in results.items():
        if name in errors:
            rows.append([name, "n/a", "", "n/a", ""])
            continue
        rows.append(
            [
                name,
                f"{median(by_threads[1]):.0f}",
                spread(by_threads[1]),
                f"{median(by_threads[4]):.0f}",
                spread(by_threads[4]),
            ]
        )
    print(table(["path", "1 thread", "spread", "4 threads", "spread"], rows))
    ours = results["flagsink DataExporterScheduler.add_event"]
    print()
    for peer, short in (
        ("OTel BatchSpanProcessor.on_end", "OTel"),
        ("GOFF EventPublisher.add_event", "GOFF"),
    ):
        if peer in errors:
            print(f"flagsink/{short}: n/a ({peer} unavailable: {errors[peer]})")
            continue
        ratios = [f"{median(ours[t]) / median(results[peer][t]):.2f}x" for t in (1, 4)]
        print(f"flagsink/{short}: {ratios[0]} (1 thread), {ratios[1]} (4 threads)")
    single = median(ours[1])
    print(
        f"target <= {TARGET_ADD_NS:.0f} ns single-threaded: {single:.0f} ns, "
        f"{verdict(single <= TARGET_ADD_NS)}"
    )
    otel = "OTel BatchSpanProcessor.on_end"
    if otel not in errors:
        ratio = single / median(results[otel][1])
        print(
            f"target <= {TARGET_ADD_VS_OTEL}x OTel on_end: {ratio:.2f}x, "
            f"{verdict(ratio <= TARGET_ADD_VS_OTEL)}"
        )
    print(
        "4 threads: wall-clock ns per call with 4 threads calling at once "
        "(total time / total calls; the GIL serialises them)."
    )
    print(
        "Set-up: flagsink with a discarding bulk exporter and max_events_in_memory=50M; "
        "OTel with a no-op SpanExporter and max_queue_size = max_export_batch_size = 50M "
        "(no drop, no export while timing); GOFF EventPublisher started with a "
        "GoFeatureFlagApi for the unused endpoint http://127.0.0.1:9, max_pending_events="
        "50M, data_flush_interval=1 h and its send method replaced by a no-op, so no "
        "network call is made."
    )
    for name, error in errors.items():
        print(f"{name}: not measured: {error}")


def report_build(data: dict[str, Any], n: int) -> None:
    results, errors = data["results"], data["errors"]
    print(f"\n## 2. Build + add a fresh event, ns per event ({n:,} events per trial)\n")
    rows = []
    for name, values in results.items():
        if name in errors:
            rows.append([name, f"n/a: {errors[name]}", ""])
        else:
            rows.append([name, f"{median(values):.0f}", spread(values)])
    print(table(["path", "ns/event", "spread"], rows))
    ours = median(results["new_feature_event(key, ...) + add_event"])
    goff = "GOFF FeatureEvent(pydantic) + EventPublisher.add_event"
    print()
    if goff not in errors:
        print(f"flagsink/GOFF build + add: {ours / median(results[goff]):.2f}x")
    print(
        f"target <= {TARGET_BUILD_ADD_NS:.0f} ns build + add: {ours:.0f} ns, "
        f"{verdict(ours <= TARGET_BUILD_ADD_NS)}"
    )
    for name in (
        "new_feature_event({'targetingKey': key}, ...) + add_event",
        "new_feature_event(EvaluationContext, ...) + add_event",
    ):
        if name not in errors:
            value = median(results[name])
            print(f"  same target, {name}: {value:.0f} ns, {verdict(value <= TARGET_BUILD_ADD_NS)}")
    print(
        "Every event stays buffered until the end of the trial (no flush), so garbage "
        "collections see all of them, as a full buffer would."
    )


def report_files(data: dict[str, Any], n: int, batch: int) -> None:
    print(f"\n## 3. file exporter throughput, events/s on one core ({n:,} events per trial)\n")
    rows = []
    labels = {"json": "JSON lines", "csv": "CSV (default template)", "parquet": "Parquet (SNAPPY)"}
    for fmt in ("json", "csv", "parquet"):
        if fmt in data["errors"]:
            rows.append([labels[fmt], f"n/a: {data['errors'][fmt]}", "", "", "", "", ""])
            continue
        one = median(data["one"][fmt])
        target = TARGET_EVENTS_PER_S[fmt]
        rows.append(
            [
                labels[fmt],
                f"{fmt_rate(one)} {spread(data['one'][fmt])}",
                f"{fmt_rate(median(data['batched'][fmt]))} {spread(data['batched'][fmt])}",
                f"{fmt_rate(median(data['pipeline'][fmt]))} {spread(data['pipeline'][fmt])}",
                f"{fmt_rate(median(data['memory'][fmt]))} {spread(data['memory'][fmt])}",
                f"{data['sizes'][fmt] / n:.0f}",
                f">= {fmt_rate(target)}: {verdict(one >= target)}",
            ]
        )
    for name, label in (
        ("json", "peer: stdlib json.dumps per record"),
        ("csv", "peer: csv.writer"),
    ):
        rate = median(data["peers"][name])
        rows.append([label, f"{fmt_rate(rate)} {spread(data['peers'][name])}", "", "", "", "", ""])
    print(
        table(
            [
                "format",
                f"1 file of {n:,}",
                f"files of {batch:,}",
                f"add_event -> scheduler -> file ({batch:,}/flush)",
                "format.write to memory",
                "bytes/event",
                "target (1 file)",
            ],
            rows,
        )
    )
    print()
    for fmt, peer in (("json", "json"), ("csv", "csv")):
        ratio = median(data["one"][fmt]) / median(data["peers"][peer])
        print(f"flagsink {fmt} / stdlib {peer}: {ratio:.1f}x")
    print(
        "Each figure includes opening, fsync and atomically publishing the file. Peers write "
        "prebuilt dicts/tuples (the conversion from events is not timed) and fsync."
    )


def report_memory(data: dict[str, Any], n: int) -> None:
    results, errors = data["results"], data["errors"]
    print(f"\n## 4. Memory per buffered event, bytes ({n:,} events, tracemalloc)\n")
    rows = []
    ours = median(results["flagsink FeatureEvent in scheduler buffer"])
    for name, values in results.items():
        if name in errors:
            rows.append([name, f"n/a: {errors[name]}", ""])
            continue
        value = median(values)
        rows.append([name, f"{value:.0f}", f"{ours / value:.2f}x" if "floor" not in name else ""])
    print(table(["representation", "bytes/event", "flagsink/peer"], rows))
    print()
    print(
        f"target <= {TARGET_BYTES_PER_EVENT:.0f} B: {ours:.0f} B, "
        f"{verdict(ours <= TARGET_BYTES_PER_EVENT)}"
    )
    print(
        "Fresh 'user-<uuid>' key and creationDate per event; 20 flag keys, 5 variations, "
        "version and source shared; value a bool; no metadata."
    )


def machine() -> str:
    import msgspec

    versions = [f"msgspec {msgspec.__version__}"]
    for module, label in (
        ("pyarrow", "pyarrow"),
        ("opentelemetry.sdk.version", "opentelemetry-sdk"),
    ):
        try:
            mod = __import__(module, fromlist=["__version__"])
            versions.append(f"{label} {mod.__version__}")
        except ImportError:
            pass
    try:
        from importlib.metadata import version

        versions.append(f"gofeatureflag-python-provider {version('gofeatureflag-python-provider')}")
    except Exception:
        pass
    return (
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs; " + ", ".join(versions)
    )


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    parser.add_argument("--trials", type=int, default=5, help="trials per figure (median)")
    parser.add_argument(
        "--only",
        choices=["add", "build", "files", "memory"],
        action="append",
        help="run only these sections (repeatable)",
    )
    parser.add_argument("--raw", action="store_true", help="also print every trial's value")
    args = parser.parse_args(argv)
    global RAW
    RAW = args.raw
    sections = args.only or ["add", "build", "files", "memory"]
    n_add = 200_000 if args.quick else 1_000_000
    n_files = 100_000 if args.quick else 1_000_000
    batch = 10_000 if args.quick else 100_000
    n_memory = 100_000
    trials = max(1, args.trials)

    print("# flagsink core benchmark")
    print(f"{machine()}")
    print(f"medians of {trials} trials{' (--quick)' if args.quick else ''}; gc enabled")
    print(f"load average at start: {load()}")
    started = time.perf_counter()
    if "add" in sections:
        report_add(bench_add(n_add, trials), n_add)
    if "build" in sections:
        report_build(bench_build(n_add, trials), n_add)
    if "files" in sections:
        report_files(bench_files(n_files, trials, batch), n_files, batch)
    if "memory" in sections:
        report_memory(bench_memory(n_memory, trials), n_memory)
    print(f"\nload average at end: {load()}; total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
