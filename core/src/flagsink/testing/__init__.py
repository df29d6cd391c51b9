"""Test helpers for exporter authors and users.

- :class:`InMemoryExporter`: keeps exported events in memory (and can be told to fail), to
  test a setup without a backend.
- :mod:`flagsink.testing.contract`: :class:`~flagsink.testing.contract.ExporterContract`,
  pytest checks every exporter plugin runs against its real server (needs pytest:
  ``pip install 'flagsink[testing]'``).
"""

from flagsink.testing.memory import InMemoryExporter, sample_events, wait_until

__all__ = ["InMemoryExporter", "sample_events", "wait_until"]
