"""flagsink-gcs benchmark: events/s uploaded to a local GCS server, and peak memory of a flush.

A standalone script, not part of the pass/fail suite (pytest does not collect ``bench_*``
files)::

    .venv/bin/python tests/benchmarks/bench_gcs.py            # full run (about a minute)
    .venv/bin/python tests/benchmarks/bench_gcs.py --quick    # fewer trials

It starts gcp-storage-emulator (``python -m gcp_storage_emulator``, from the ``test``
dependency group) in memory on 127.0.0.1 and exports through
:class:`flagsink_gcs.GcsExporter` with its default settings: a batch up to 1 MiB goes up in
one multipart request, a larger one as a resumable upload in 8 MiB chunks (the
100,000-event JSON batch, about 23 MB, in three). Each figure is the median of
``--trials`` exports of the same batch (encoding + upload; every object is deleted after
it is measured).

Memory: the peak of Python allocations (tracemalloc) during one ``export`` of 100,000
events, above what was allocated before it, against the encoded object's size; the
issue's target is at most 2x. pyarrow's own buffers (Parquet encoding) are allocated
outside Python's allocator and are not in that figure.

The emulator is a single-threaded Python server: the figures measure flagsink against it
on this machine, not Google Cloud Storage.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from flagsink.event import Event
from flagsink.testing import sample_events

try:
    from flagsink_gcs import GcsExporter
    from flagsink_gcs.exporter import CHUNK_SIZE, SINGLE_REQUEST_MAX
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
except ImportError as missing:  # e.g. `nox -s bench`, which installs core only
    print(f"# flagsink-gcs benchmark skipped: {missing} (install plugins/gcs)")
    sys.exit(0)

FORMATS = ("parquet", "json")
BATCHES = (10_000, 100_000)
MEMORY_EVENTS = 100_000
TARGET_MEMORY_RATIO = 2.0
BUCKET = "bench-events"


@contextmanager
def emulator() -> Iterator[str]:
    """gcp-storage-emulator (in memory) on a free 127.0.0.1 port; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gcp_storage_emulator", "start", "--in-memory", "-q"]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/", timeout=1):
                        break
                except (urllib.error.URLError, OSError):
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        tail = log.read()[-2000:]
                        raise SystemExit(f"emulator did not start: {tail!r}") from None
                    time.sleep(0.02)
            yield url
        finally:
            process.terminate()
            process.wait(10)


def _export_once(exporter: GcsExporter, bucket: Any, events: list[Event]) -> tuple[float, int]:
    """Seconds for one export, and the object's size; the object is deleted after."""
    started = time.perf_counter()
    exporter.export(events)
    elapsed = time.perf_counter() - started
    blob = bucket.get_blob(exporter.last_key)
    size = int(blob.size)
    blob.delete()
    return elapsed, size


def throughput(bucket: Any, trials: int) -> list[dict[str, Any]]:
    rows = []
    for fmt in FORMATS:
        exporter = GcsExporter(bucket=BUCKET, format=fmt)
        for batch in BATCHES:
            events = sample_events(batch, prefix=f"{fmt}-{batch}")
            _export_once(exporter, bucket, events)  # warm up: connections, encoders
            times = []
            size = 0
            for _ in range(trials):
                elapsed, size = _export_once(exporter, bucket, events)
                times.append(elapsed)
            median = statistics.median(times)
            rows.append(
                {
                    "format": fmt,
                    "batch": batch,
                    "events_per_s": batch / median,
                    "seconds": median,
                    "object_mb": size / 1e6,
                    "resumable": size > SINGLE_REQUEST_MAX,
                }
            )
        exporter.close()
    return rows


class _UploadPeak(GcsExporter):
    """Also records the tracemalloc peak of the upload alone (above the encoded spool)."""

    upload_extra = 0
    encode_peak = 0  # the peak before the upload started (encoding)

    def put_object(self, key: str, body: BinaryIO, size: int, **options: Any) -> None:
        if tracemalloc.is_tracing():
            start, self.encode_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
        try:
            super().put_object(key, body, size, **options)
        finally:
            if tracemalloc.is_tracing():
                self.upload_extra = tracemalloc.get_traced_memory()[1] - start


def memory(bucket: Any) -> list[dict[str, Any]]:
    rows = []
    for fmt in ("json", "csv", "parquet"):
        exporter = _UploadPeak(bucket=BUCKET, format=fmt)
        events = sample_events(MEMORY_EVENTS, prefix=f"mem-{fmt}")
        _export_once(exporter, bucket, events)  # warm up outside the measurement
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            exporter.export(events)
            _, peak = tracemalloc.get_traced_memory()
            peak = max(peak, exporter.encode_peak)  # the upload reset the peak
        finally:
            tracemalloc.stop()
        blob = bucket.get_blob(exporter.last_key)
        size = int(blob.size)
        blob.delete()
        exporter.close()
        extra = peak - before
        rows.append(
            {
                "format": fmt,
                "object_mb": size / 1e6,
                "peak_extra_mb": extra / 1e6,
                "ratio": extra / size,
                "upload_mb": exporter.upload_extra / 1e6,
                "upload_ratio": exporter.upload_extra / size,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="exports per figure (median)")
    parser.add_argument("--quick", action="store_true", help="2 trials per figure")
    options = parser.parse_args(argv)
    trials = 2 if options.quick else options.trials
    print(
        f"# flagsink-gcs benchmark: Python {platform.python_version()}, google-cloud-storage "
        f"{storage.__version__}, {os.cpu_count()} CPUs, {trials} trials (median), "
        "gcp-storage-emulator"
    )
    with emulator() as url:
        os.environ["STORAGE_EMULATOR_HOST"] = url
        client = storage.Client(project="bench", credentials=AnonymousCredentials())
        bucket = client.create_bucket(BUCKET)
        rows = throughput(bucket, trials)
        print("\n## Upload throughput (encode + upload, one object per export)\n")
        print("| format | batch | events/s | s/export | object MB | upload |")
        print("|---|---:|---:|---:|---:|---|")
        chunk_mib = CHUNK_SIZE // (1024 * 1024)
        for row in rows:
            upload = f"resumable ({chunk_mib} MiB chunks)" if row["resumable"] else "multipart"
            print(
                f"| {row['format']} | {row['batch']:,} | {row['events_per_s']:,.0f} | "
                f"{row['seconds']:.3f} | {row['object_mb']:.2f} | {upload} |"
            )
        mem = memory(bucket)
        client.close()
    print(f"\n## Peak extra memory of a {MEMORY_EVENTS:,}-event export (tracemalloc)\n")
    print(
        "| format | object MB | export: peak extra MB | export / object | "
        "upload alone: peak extra MB | upload / object | export <= 2x |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in mem:
        verdict = "met" if row["ratio"] <= TARGET_MEMORY_RATIO else "MISSED"
        print(
            f"| {row['format']} | {row['object_mb']:.2f} | {row['peak_extra_mb']:.2f} | "
            f"{row['ratio']:.2f}x | {row['upload_mb']:.2f} | {row['upload_ratio']:.2f}x | "
            f"{verdict} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
