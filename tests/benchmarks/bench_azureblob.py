"""flagsink-azureblob benchmark: events/s uploaded to Azurite, and peak memory of a flush.

A standalone script, not part of the pass/fail suite (pytest does not collect ``bench_*``
files)::

    .venv/bin/python tests/benchmarks/bench_azureblob.py            # full run (under a minute)
    .venv/bin/python tests/benchmarks/bench_azureblob.py --quick    # fewer trials

It needs the plugin (``flagsink-azureblob``) and Azurite: the pinned Azurite 3.35.0 of
``tests/plugins/azureblob`` (installed there with ``npm ci`` if missing, as the tests do),
started on a free 127.0.0.1 port with its data in a temporary folder. Exports go through
:class:`flagsink_azureblob.AzureBlobExporter` with its default settings: up to 2 MiB in
one Put Blob, larger bodies read from the spooled file as 2 MiB blocks and one Put Block
List (a 100,000-event JSON batch, about 23 MB, goes up as 11 blocks). Each figure is the
median of ``--trials`` exports of the same batch (encoding + upload; each blob is deleted
after it is measured).

Memory: the peak of Python allocations (tracemalloc) during one ``export`` of 100,000
events, above what was allocated before it, against the encoded object's size; the
issue's target is at most 2x. pyarrow's own buffers (Parquet encoding) are allocated
outside Python's allocator and are not in that figure.

Azurite is a Node.js emulator on the same machine: the figures measure flagsink against
it, not Azure.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, BinaryIO

from flagsink.event import Event
from flagsink.testing import sample_events

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "plugins" / "azureblob"))

try:
    import azure.storage.blob as azure_blob
    from azblob_support import ACCOUNT, KEY, Azurite, AzuriteUnavailable, install_azurite
    from azure.storage.blob import ContainerClient
    from flagsink_azureblob import AzureBlobExporter
    from flagsink_azureblob.exporter import BLOCK_BYTES, SINGLE_PUT_BYTES
except ImportError as exc:  # e.g. `nox -s bench` without the plugin installed
    print(f"# flagsink-azureblob benchmark skipped: {exc} (install ./plugins/azureblob)")
    raise SystemExit(0) from None

FORMATS = ("parquet", "json")
BATCHES = (10_000, 100_000)
MEMORY_EVENTS = 100_000
TARGET_MEMORY_RATIO = 2.0
CONTAINER = "bench-events"


def _export_once(
    exporter: AzureBlobExporter, container: ContainerClient, events: list[Event]
) -> tuple[float, int]:
    """Seconds for one export, and the blob's size; the blob is deleted after."""
    started = time.perf_counter()
    exporter.export(events)
    elapsed = time.perf_counter() - started
    blob = container.get_blob_client(str(exporter.last_key))
    size = int(blob.get_blob_properties().size)
    blob.delete_blob()
    return elapsed, size


def _exporter(server: Azurite, fmt: str, cls: type[AzureBlobExporter] = AzureBlobExporter) -> Any:
    return cls(
        container=CONTAINER,
        accountName=ACCOUNT,
        accountKey=KEY,
        serviceUrl=server.url,
        format=fmt,
    )


def throughput(server: Azurite, container: ContainerClient, trials: int) -> list[dict[str, Any]]:
    rows = []
    for fmt in FORMATS:
        exporter = _exporter(server, fmt)
        for batch in BATCHES:
            events = sample_events(batch, prefix=f"{fmt}-{batch}")
            _export_once(exporter, container, events)  # warm up: connection, encoders
            times = []
            size = 0
            for _ in range(trials):
                elapsed, size = _export_once(exporter, container, events)
                times.append(elapsed)
            median = statistics.median(times)
            rows.append(
                {
                    "format": fmt,
                    "batch": batch,
                    "events_per_s": batch / median,
                    "seconds": median,
                    "object_mb": size / 1e6,
                    "blocks": -(-size // BLOCK_BYTES) if size > SINGLE_PUT_BYTES else 0,
                }
            )
        exporter.close()
    return rows


class _UploadPeak(AzureBlobExporter):
    """Also records the tracemalloc peak of the upload alone (above the encoded spool)."""

    upload_extra = 0
    encode_peak = 0  # the peak before the upload started (encoding)

    def put_object(self, key: str, body: BinaryIO, size: int, **options: Any) -> None:
        start = 0
        if tracemalloc.is_tracing():
            start, self.encode_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
        try:
            super().put_object(key, body, size, **options)
        finally:
            if tracemalloc.is_tracing():
                self.upload_extra = tracemalloc.get_traced_memory()[1] - start


def memory(server: Azurite, container: ContainerClient) -> list[dict[str, Any]]:
    rows = []
    for fmt in ("json", "csv", "parquet"):
        exporter = _exporter(server, fmt, _UploadPeak)
        events = sample_events(MEMORY_EVENTS, prefix=f"mem-{fmt}")
        _export_once(exporter, container, events)  # warm up outside the measurement
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            exporter.export(events)
            _, peak = tracemalloc.get_traced_memory()
            peak = max(peak, exporter.encode_peak)  # the upload reset the peak
        finally:
            tracemalloc.stop()
        blob = container.get_blob_client(str(exporter.last_key))
        size = int(blob.get_blob_properties().size)
        blob.delete_blob()
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
    try:
        install_azurite()
    except AzuriteUnavailable as exc:
        print(f"# flagsink-azureblob benchmark skipped: {exc}")
        return 0
    print(
        f"# flagsink-azureblob benchmark: Python {platform.python_version()}, "
        f"azure-storage-blob {azure_blob.__version__}, {os.cpu_count()} CPUs, "
        f"{trials} trials (median), Azurite 3.35.0 (data on disk)"
    )
    with tempfile.TemporaryDirectory() as workspace:
        server = Azurite(Path(workspace))
        server.start()
        try:
            container = server.service.create_container(CONTAINER)
            rows = throughput(server, container, trials)
            mem = memory(server, container)
        finally:
            server.stop()
            server.service.close()
    print("\n## Upload throughput (encode + upload, one blob per export)\n")
    print("| format | batch | events/s | s/export | object MB | upload |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        mib = BLOCK_BYTES // (1024 * 1024)
        upload = f"{row['blocks']} blocks of {mib} MiB" if row["blocks"] else "one Put Blob"
        print(
            f"| {row['format']} | {row['batch']:,} | {row['events_per_s']:,.0f} | "
            f"{row['seconds']:.3f} | {row['object_mb']:.2f} | {upload} |"
        )
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
