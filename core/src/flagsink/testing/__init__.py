"""Test helpers for exporter authors and users.

- :class:`InMemoryExporter`: keeps exported events in memory (and can be told to fail), to
  test a setup without a backend.
- :mod:`flagsink.testing.contract`: :class:`~flagsink.testing.contract.ExporterContract`,
  pytest checks every exporter plugin runs against its real server (needs pytest:
  ``pip install 'flagsink[testing]'``).
- :class:`MemoryStore`: a flag store backend in memory (instances built with one
  :class:`MemoryData` share it); :mod:`flagsink.testing.store_contract` holds
  :class:`~flagsink.testing.store_contract.StoreContract`, the checks every store plugin runs.
"""

from flagsink.testing.memory import InMemoryExporter, sample_events, wait_until
from flagsink.testing.memory_store import MemoryData, MemoryStore

__all__ = ["InMemoryExporter", "MemoryData", "MemoryStore", "sample_events", "wait_until"]
