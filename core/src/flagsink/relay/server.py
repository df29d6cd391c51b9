"""Running the relay under uvicorn: ``flagsink serve``."""

from __future__ import annotations

import dataclasses
import fcntl
import inspect
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from flagsink.config import Config, load_config, parse_config
from flagsink.relay.app import ASGIApp, create_app, stop_signal_hook

__all__ = ["DEFAULT_CONFIG", "app_from_environment", "default_config", "serve"]

CONFIG_ENV = "FLAGSINK_CONFIG"
SLOTS_ENV = "FLAGSINK_SPOOL_SLOTS"
# Slots a worker tries: more than any worker count, bounded so a broken lock cannot loop.
_MAX_SLOTS = 1024
_slot_lock: IO[bytes] | None = None
DEFAULT_CONFIG: dict[str, Any] = {
    "exporter": {"kind": "file", "outputDir": "./flagsink-data", "format": "json"},
    "listen": 1031,
    "host": "127.0.0.1",
}
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_LEVELS = {"debug": "DEBUG", "info": "INFO", "warn": "WARNING", "warning": "WARNING"}


def default_config() -> Config:
    """The embedded default: JSON lines files under ./flagsink-data, 127.0.0.1:1031."""
    return parse_config(DEFAULT_CONFIG, source="<embedded default>")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(config: Config) -> None:
    """Send flagsink's and uvicorn's logs to stderr in the configured level and format."""
    service = config.service
    handler = logging.StreamHandler(sys.stderr)
    if service.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(service.log_level, service.log_level.upper()))


class _TcpConfig(uvicorn.Config):
    """uvicorn's config, binding its shared listening socket with ``IPPROTO_TCP``.

    uvicorn binds the socket it hands to ``--workers`` processes with protocol 0 (Kludex/uvicorn
    #3149); accepted connections inherit it, asyncio then never sets ``TCP_NODELAY`` on them,
    and every keep-alive request after the first waits ~40 ms for a delayed ACK.
    """

    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto == 0:
            sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, sock.detach())
            sock.set_inheritable(True)
        return sock


class _Server(uvicorn.Server):
    """uvicorn's server, telling the relay when the stop signal came, so that the relay's
    ``shutdownTimeout`` runs from the signal (uvicorn takes 0.1 to 0.2 s before the
    application's shutdown starts)."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stop = on_stop

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_stop()
        super().handle_exit(sig, frame)


def _absorb_signal(_signum: int, _frame: object) -> None:
    """Handler for the stop signal uvicorn raises again after shutting down gracefully."""


def app_from_environment() -> ASGIApp:
    """Application factory for uvicorn workers: reads the config named by FLAGSINK_CONFIG.

    With a spool, each worker process claims its own slot ``<spool.dir>/worker-<i>``
    (the first one no live worker holds), so workers never share a database and a
    restarted worker resumes the slot its predecessor left."""
    path = os.environ.get(CONFIG_ENV)
    config = load_config(path) if path else default_config()
    configure_logging(config)
    if config.spool is not None and os.environ.get(SLOTS_ENV):
        config = _claim_spool_slot(config)
    return create_app(config)


def _claim_spool_slot(config: Config) -> Config:
    global _slot_lock
    assert config.spool is not None
    base = Path(config.spool.dir).expanduser()
    for index in range(_MAX_SLOTS):
        slot = base / f"worker-{index}"
        slot.mkdir(parents=True, exist_ok=True)
        handle = open(slot / "slot.lock", "a+b")  # noqa: SIM115 - held for the process
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _slot_lock = handle
        spool = config.spool.model_copy(update={"dir": str(slot)})
        return dataclasses.replace(config, spool=spool)
    raise RuntimeError(f"spool.dir {base}: no free worker slot among {_MAX_SLOTS}")


def _warn_orphan_slots(base: Path, workers: int) -> None:
    """Slots beyond the worker count are resumed only when that many workers run."""
    from flagsink.spool import SpoolError, inspect_spool  # noqa: PLC0415 - serve only

    for slot in sorted(base.glob("worker-*")):
        suffix = slot.name.removeprefix("worker-")
        if not suffix.isdigit() or int(suffix) < workers:
            continue
        try:
            pending = sum(stats.pending for stats in inspect_spool(slot))
        except SpoolError:
            continue
        if pending:
            print(
                f"flagsink: spool slot {slot} holds {pending} undelivered events but only "
                f"{workers} workers run: start with --workers {int(suffix) + 1} (or more) "
                "to deliver them",
                file=sys.stderr,
            )


def serve(
    config: Config | None,
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int = 1,
) -> None:
    """Run the relay until SIGTERM/SIGINT, then flush every exporter and return."""
    if config is None:
        config = default_config()
        print(
            "flagsink: no --config given: using the embedded default (file exporter writing "
            "JSON lines under ./flagsink-data)",
            file=sys.stderr,
        )
    configure_logging(config)
    for section in config.exporters:  # unusable settings fail here, not in a worker
        section.build().close()
    default_host, default_port = config.service.address
    host = host or default_host
    port = default_port if port is None else port
    print(f"flagsink: starting the relay on http://{host}:{port}", file=sys.stderr, flush=True)
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": None,
        "access_log": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": max(1, int(config.service.shutdown_timeout)),
        "server_header": False,
    }
    if workers > 1:
        if config.source.startswith("<"):
            os.environ.pop(CONFIG_ENV, None)
        else:
            os.environ[CONFIG_ENV] = os.path.abspath(config.source)
        if config.spool is not None:
            os.environ[SLOTS_ENV] = str(workers)
            _warn_orphan_slots(Path(config.spool.dir).expanduser(), workers)
        # What uvicorn.run does for workers > 1, with the socket bound by _TcpConfig.
        multi = _TcpConfig(
            "flagsink.relay.server:app_from_environment", factory=True, workers=workers, **options
        )
        extra: dict[str, Any] = {}
        if "target" in inspect.signature(Multiprocess).parameters:  # older uvicorn releases
            extra["target"] = uvicorn.Server(multi).run
        Multiprocess(multi, sockets=[multi.bind_socket()], **extra).run()
        return
    # uvicorn re-raises the stop signal once its graceful shutdown is done, which would end
    # the process with "killed by SIGTERM" instead of exit status 0: a no-op handler
    # while it runs absorbs that re-raise (uvicorn installs its own handlers meanwhile).
    previous = {sig: signal.signal(sig, _absorb_signal) for sig in _STOP_SIGNALS}
    try:
        app = create_app(config)
        _Server(uvicorn.Config(app, **options), stop_signal_hook(app)).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
