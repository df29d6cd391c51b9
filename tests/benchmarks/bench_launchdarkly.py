"""What the flagsink LaunchDarkly event processor adds to ``client.variation()``.

A standalone script (pytest does not collect ``bench_*`` files)::

    .venv/bin/python tests/benchmarks/bench_launchdarkly.py            # full run
    .venv/bin/python tests/benchmarks/bench_launchdarkly.py --quick    # fewer calls

Three real LaunchDarkly clients (offline, TestData source) in the same process, timed
interleaved inside each trial so drift does not skew the difference:

- ``events off``: ``send_events=False`` (the SDK's null processor): the SDK's own
  evaluation cost;
- ``flagsink``: ``event_processor_class=flagsink_event_processor(pipeline)``, the pipeline
  buffering into one scheduler that does not flush while timed;
- ``LaunchDarkly events``: the SDK's own ``DefaultEventProcessor`` (events URI a closed
  local port; it only queues while timed), for reference.

Also times ``FlagsinkEventProcessor.send_event`` alone on a prebuilt SDK event. Subjects
alternate in chunks of 2,000 calls (``n / 2000 * --trials`` rounds, GC off while timed);
every figure is the median over rounds. Target (issue 7): flagsink adds at most 1 µs.
"""

from __future__ import annotations

import argparse
import gc
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any

from ldclient import Context, LDClient
from ldclient.config import Config
from ldclient.impl.events.types import EventInputEvaluation
from ldclient.integrations.test_data import TestData

from flagsink.event import Event
from flagsink.exporter import Exporter
from flagsink.integrations.launchdarkly import FlagsinkEventProcessor, flagsink_event_processor
from flagsink.pipeline import Pipeline
from flagsink.scheduler import DataExporterScheduler

TARGET_ADDED_NS = 1000.0
BIG = 50_000_000  # nothing flushes while timed


class NullExporter(Exporter[Any]):
    """Discards every batch."""

    kind = "null"
    bulk = True

    def export(self, events: Sequence[Event]) -> None:
        return None


def time_variation(client: LDClient, key: str, context: Context, default: Any, n: int) -> float:
    variation = client.variation
    start = time.perf_counter_ns()
    for _ in repeat(None, n):
        variation(key, context, default)
    return (time.perf_counter_ns() - start) / n


def time_send(send: Callable[[Any], None], event: Any, n: int) -> float:
    start = time.perf_counter_ns()
    for _ in repeat(None, n):
        send(event)
    return (time.perf_counter_ns() - start) / n


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls per trial")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument(
        "-n",
        type=int,
        default=None,
        help="calls per trial and subject (rounds = n / 2000 * trials)",
    )
    args = parser.parse_args(argv)
    n = args.n or (20_000 if args.quick else 200_000)
    logging.getLogger("ldclient").setLevel(logging.ERROR)

    td = TestData.data_source()
    td.update(td.flag("string-flag").variations("red", "green", "blue").fallthrough_variation(1))
    td.update(td.flag("bool-flag").boolean_flag().variation_for_all(True))

    scheduler = DataExporterScheduler(
        NullExporter(), flush_interval=3600, max_events_in_memory=BIG, max_buffered_events=BIG
    )
    pipeline = Pipeline([(scheduler, "feature")])
    holder: list[FlagsinkEventProcessor] = []
    factory = flagsink_event_processor(pipeline)

    def build(config: Config) -> FlagsinkEventProcessor:
        holder.append(factory(config))
        return holder[-1]

    def client(**options: Any) -> LDClient:
        config = Config("sdk-bench", update_processor_class=td, diagnostic_opt_out=True, **options)
        return LDClient(config=config, start_wait=5)

    clients = {
        "events off": client(send_events=False),
        "flagsink": client(send_events=True, event_processor_class=build),
        "LaunchDarkly events": client(
            send_events=True, events_uri="http://127.0.0.1:9", flush_interval=3600
        ),
    }
    user = Context.builder("user-1").set("plan", "pro").build()
    cases = [("string-flag", "none"), ("bool-flag", False)]
    sample = EventInputEvaluation(
        int(time.time() * 1000), user, "string-flag", None, 1, "green", None, "none"
    )
    processor = holder[0]
    # Many short chunks, subjects alternating inside each round: a load spike or frequency
    # change hits every subject alike, and the median over rounds discards outliers.
    chunk = 2_000
    rounds = max(n // chunk, 1) * args.trials
    results: dict[tuple[str, str], list[float]] = {}
    gc.collect()
    gc.disable()
    try:
        for done in range(rounds):
            for key, default in cases:
                for name, ld in clients.items():
                    ns = time_variation(ld, key, user, default, chunk)
                    results.setdefault((key, name), []).append(ns)
            results.setdefault(("send_event", "flagsink"), []).append(
                time_send(processor.send_event, sample, chunk)
            )
            if done % 20 == 19:
                scheduler.flush(10)  # empty the buffer: memory stays flat
                gc.collect()
    finally:
        gc.enable()
    n = chunk * rounds

    print(
        f"Python {platform.python_version()} on {platform.machine()}, "
        f"{n:,} calls per subject in {rounds} interleaved rounds (median of rounds)"
    )
    print(f"{'flag':<14}{'subject':<22}{'ns/call':>10}{'added':>10}")
    worst = 0.0
    for key, _ in cases:
        base = statistics.median(results[(key, "events off")])
        for name in clients:
            ns = statistics.median(results[(key, name)])
            added = "" if name == "events off" else f"{ns - base:+.0f}"
            if name == "flagsink":
                worst = max(worst, ns - base)
            print(f"{key:<14}{name:<22}{ns:>10.0f}{added:>10}")
    send = statistics.median(results[("send_event", "flagsink")])
    print(f"{'(prebuilt)':<14}{'send_event alone':<22}{send:>10.0f}")
    verdict = "OK" if worst <= TARGET_ADDED_NS else "OVER"
    print(
        f"flagsink adds {worst:.0f} ns per variation() (target <= {TARGET_ADDED_NS:.0f}): {verdict}"
    )
    for ld in clients.values():
        ld.close()
    pipeline.close(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
