"""flagsink-s3 benchmark: events/s uploaded to a local S3 server, and peak memory of a flush.

A standalone script, not part of the pass/fail suite (pytest does not collect ``bench_*``
files)::

    .venv/bin/python tests/benchmarks/bench_s3.py            # full run (about a minute)
    .venv/bin/python tests/benchmarks/bench_s3.py --quick    # fewer trials

It starts moto's S3 server (``python -m moto.server``, from the ``test`` dependency group)
on 127.0.0.1 and exports through :class:`flagsink_s3.S3Exporter` with its default settings
(8 MiB parts: a 100,000-event JSON batch, about 22 MB, goes up as a 3-part multipart
upload; everything else in one PutObject). Each figure is the median of ``--trials``
exports of the same batch (encoding + upload, every object deleted after it is measured).

Memory: the peak of Python allocations (tracemalloc) during one ``export`` of 100,000
events, above what was allocated before it, against the encoded object's size; the
issue's target is at most 2x. pyarrow's own buffers (Parquet encoding) are allocated
outside Python's allocator and are not in that figure.

moto is a Python server: the figures measure flagsink against it on this machine, not S3.
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
    import boto3
    from flagsink_s3 import DEFAULT_PART_SIZE, S3Exporter
except ImportError as missing:  # e.g. `nox -s bench`, which installs core only
    print(f"# flagsink-s3 benchmark skipped: {missing} (install plugins/s3 and moto[server])")
    sys.exit(0)

FORMATS = ("parquet", "json")
BATCHES = (10_000, 100_000)
MEMORY_EVENTS = 100_000
TARGET_MEMORY_RATIO = 2.0
BUCKET = "bench-events"


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on a free 127.0.0.1 port; yields its endpoint."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                        break
                except (urllib.error.URLError, OSError):
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        tail = log.read()[-2000:]
                        raise SystemExit(f"moto server did not start: {tail!r}") from None
                    time.sleep(0.02)
            yield endpoint
        finally:
            process.terminate()
            process.wait(10)


def _export_once(exporter: S3Exporter, s3: Any, events: list[Event]) -> tuple[float, int]:
    """Seconds for one export, and the object's size; the object is deleted after."""
    started = time.perf_counter()
    exporter.export(events)
    elapsed = time.perf_counter() - started
    size = int(s3.head_object(Bucket=BUCKET, Key=exporter.last_key)["ContentLength"])
    s3.delete_object(Bucket=BUCKET, Key=exporter.last_key)
    return elapsed, size


def throughput(endpoint: str, s3: Any, trials: int) -> list[dict[str, Any]]:
    rows = []
    for fmt in FORMATS:
        exporter = S3Exporter(bucket=BUCKET, endpointUrl=endpoint, format=fmt)
        for batch in BATCHES:
            events = sample_events(batch, prefix=f"{fmt}-{batch}")
            _export_once(exporter, s3, events)  # warm up: connections, encoders
            times = []
            size = 0
            for _ in range(trials):
                elapsed, size = _export_once(exporter, s3, events)
                times.append(elapsed)
            median = statistics.median(times)
            rows.append(
                {
                    "format": fmt,
                    "batch": batch,
                    "events_per_s": batch / median,
                    "seconds": median,
                    "object_mb": size / 1e6,
                    "multipart": size > DEFAULT_PART_SIZE,
                }
            )
        exporter.close()
    return rows


class _UploadPeak(S3Exporter):
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


def memory(endpoint: str, s3: Any) -> list[dict[str, Any]]:
    rows = []
    for fmt in ("json", "csv", "parquet"):
        exporter = _UploadPeak(bucket=BUCKET, endpointUrl=endpoint, format=fmt)
        events = sample_events(MEMORY_EVENTS, prefix=f"mem-{fmt}")
        _export_once(exporter, s3, events)  # warm up outside the measurement
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            exporter.export(events)
            _, peak = tracemalloc.get_traced_memory()
            peak = max(peak, exporter.encode_peak)  # the upload reset the peak
        finally:
            tracemalloc.stop()
        size = int(s3.head_object(Bucket=BUCKET, Key=exporter.last_key)["ContentLength"])
        s3.delete_object(Bucket=BUCKET, Key=exporter.last_key)
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
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    print(
        f"# flagsink-s3 benchmark: Python {platform.python_version()}, boto3 "
        f"{boto3.__version__}, {os.cpu_count()} CPUs, {trials} trials (median), moto server"
    )
    with moto_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        rows = throughput(endpoint, s3, trials)
        print("\n## Upload throughput (encode + upload, one object per export)\n")
        print("| format | batch | events/s | s/export | object MB | upload |")
        print("|---|---:|---:|---:|---:|---|")
        for row in rows:
            upload = "multipart (8 MiB parts)" if row["multipart"] else "PutObject"
            print(
                f"| {row['format']} | {row['batch']:,} | {row['events_per_s']:,.0f} | "
                f"{row['seconds']:.3f} | {row['object_mb']:.2f} | {upload} |"
            )
        mem = memory(endpoint, s3)
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
