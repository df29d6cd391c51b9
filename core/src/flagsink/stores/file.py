"""The ``file`` store: flags read from a GO Feature Flag flag file, reloaded on change.

The file (YAML, JSON or TOML) is the source of truth: writes through the store API
(``upsert``/``delete``, ``flagsink flags push``) change the data in memory only and are
lost at the next reload or restart. Edit the file to change flags.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import Field

from flagsink.flags import FlagFileError, content_hash, flag_item, load_flag_file, numeric_version
from flagsink.hookspecs import hookimpl
from flagsink.store import FLAGS, Item, StoreBackend, StoreError, StoreSettings, is_newer

__all__ = ["FileStore", "FileStoreSettings"]

logger = logging.getLogger("flagsink.stores.file")


class FileStoreSettings(StoreSettings):
    """Settings of the ``file`` store."""

    path: str = Field(
        min_length=1,
        description="Flag file (GO Feature Flag format; `.yaml`/`.yml`, `.json` or `.toml`).",
    )
    poll_interval: float = Field(
        1.0,
        ge=0,
        description="Seconds between checks of the file's modification time and size; "
        "`0` turns reloading off.",
    )


class FileStore(StoreBackend[FileStoreSettings]):
    """Flags from a file, in namespace ``flags``. Reloads when the file changes; a broken
    file keeps the last good data (and the error is logged with the file and line)."""

    kind = "file"
    settings_model = FileStoreSettings

    def __init__(self, settings: FileStoreSettings | None = None, /, **options: Any) -> None:
        super().__init__(settings, **options)
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Item]] = {FLAGS: {}}
        self._hashes: dict[str, tuple[str, int]] = {}  # key -> (content hash, version)
        self._stamp: tuple[int, int] | None = None
        self.last_error: str | None = None
        self.reloads = 0
        self._stop = threading.Event()
        try:
            self._load(raise_errors=True)
        except FlagFileError as exc:
            raise StoreError(f"file store: {exc}") from None
        self._thread: threading.Thread | None = None
        if self.settings.poll_interval > 0:
            self._thread = threading.Thread(
                target=self._poll, name="flagsink-file-store", daemon=True
            )
            self._thread.start()

    # -- loading --------------------------------------------------------------------------

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.settings.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _load(self, raise_errors: bool = False) -> bool:
        stamp = self._file_stamp()
        try:
            flags = load_flag_file(self.settings.path)
        except FlagFileError as exc:
            self._stamp = stamp  # do not report the same broken file again and again
            self.last_error = str(exc)
            if raise_errors:
                raise
            logger.error("%s; keeping the flags loaded before", exc)
            return False
        items: dict[str, Item] = {}
        hashes: dict[str, tuple[str, int]] = {}
        for key, definition in flags.items():
            digest = content_hash(definition)
            own = numeric_version(definition)
            previous = self._hashes.get(key)
            if own is not None:
                version = own
            elif previous is None:
                version = 1
            elif previous[0] == digest:
                version = previous[1]
            else:
                version = previous[1] + 1
            hashes[key] = (digest, version)
            items[key] = flag_item(key, definition, version)
        with self._lock:
            self._data = {FLAGS: items}
            self._hashes = hashes
            self._stamp = stamp
            self.last_error = None
            self.reloads += 1
        logger.info("loaded %d flags from %s", len(items), self.settings.path)
        return True

    def reload_if_changed(self) -> bool:
        """Reload now if the file's modification time or size changed; True if reloaded."""
        if self._file_stamp() == self._stamp:
            return False
        return self._load()

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.poll_interval):
            try:
                self.reload_if_changed()
            except Exception:  # pragma: no cover - never let the poller die
                logger.exception("file store: reloading %s failed", self.settings.path)

    # -- StoreBackend ---------------------------------------------------------------------

    def init_items(self, data: Mapping[str, Mapping[str, Item]]) -> None:
        """Replace the data in memory (the file is not written)."""
        with self._lock:
            self._data = {ns: {k: dict(v) for k, v in items.items()} for ns, items in data.items()}

    def get_item(self, namespace: str, key: str) -> Item | None:
        with self._lock:
            return self._data.get(namespace, {}).get(key)

    def all_items(self, namespace: str) -> dict[str, Item]:
        with self._lock:
            return dict(self._data.get(namespace, {}))

    def upsert_item(self, namespace: str, item: Item) -> Item:
        """Store ``item`` in memory only (lost at the next reload of the file)."""
        key = str(item["key"])
        with self._lock:
            items = self._data.setdefault(namespace, {})
            current = items.get(key)
            if is_newer(item, current):
                items[key] = dict(item)
                return item
            assert current is not None
            return current

    def is_initialized(self) -> bool:
        return True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)


@hookimpl
def flagsink_register_stores(register: Callable[[type[StoreBackend[Any]]], None]) -> None:
    register(FileStore)
