"""Network faults on demand: a TCP proxy in front of a real server.

:class:`TcpProxy` listens on ``127.0.0.1`` (an ephemeral port) and forwards every
connection to a real server. A test points its client at :attr:`TcpProxy.url` and
changes the network's behaviour while traffic flows::

    with TcpProxy(server_port) as proxy:
        client = make_client(proxy.url)
        proxy.delay(0.2)          # every chunk forwarded 200 ms late, in order
        proxy.cut()               # connections reset, new ones refused ...
        proxy.restore()           # ... until here: pass-through again
        proxy.blackhole()         # connections accepted, never answered
        proxy.reset_after(1_000)  # a TCP reset once 1,000 request bytes went upstream

One thread runs everything on non-blocking sockets (``selectors``), so the thread that
closes a socket is always the one that uses it: a reset is a real RST (``SO_LINGER`` 0,
then close) and :meth:`TcpProxy.close` leaves no thread or socket behind. Control
methods run on that thread too and return once the change took effect.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from types import TracebackType
from typing import Literal, TypeVar

__all__ = ["ProxyStats", "TcpProxy"]

logger = logging.getLogger("flagsink.testing.faults")

_T = TypeVar("_T")
_CHUNK = 65_536
#: Bytes a connection may hold for one direction before the proxy stops reading its source.
_HIGH_WATER = 1 << 20
_CONTROL_TIMEOUT = 10.0
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE

_Kind = Literal["pass", "delay", "blackhole", "reset"]


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of a :class:`TcpProxy`'s counters.

    :ivar connections: connections accepted since the start.
    :ivar active: connections open now.
    :ivar bytes_up: bytes forwarded from clients to the server.
    :ivar bytes_down: bytes forwarded from the server to clients.
    :ivar bytes_discarded: bytes read from blackholed connections and thrown away.
    :ivar resets: connections the proxy reset on purpose (:meth:`TcpProxy.cut`,
        :meth:`TcpProxy.reset_after`, the end of a blackhole).
    :ivar cuts: calls of :meth:`TcpProxy.cut`.
    :ivar upstream_failures: connections reset because the server could not be reached.
    """

    connections: int
    active: int
    bytes_up: int
    bytes_down: int
    bytes_discarded: int
    resets: int
    cuts: int
    upstream_failures: int


@dataclass(frozen=True)
class _Mode:
    kind: _Kind = "pass"
    seconds: float = 0.0
    limit: int = 0
    times: int | None = None


@dataclass(eq=False)
class _Pipe:
    """One direction of a connection: chunks waiting for their time, then bytes to write."""

    up: bool
    waiting: deque[tuple[float, bytes]] = field(default_factory=deque)
    out: bytearray = field(default_factory=bytearray)
    held: int = 0  # bytes in waiting + out
    eof: bool = False  # the source closed its side
    shut: bool = False  # the end of stream was passed on to the sink


@dataclass(eq=False)
class _Conn:
    client: socket.socket
    upstream: socket.socket | None
    blackholed: bool = False
    connecting: bool = False
    up: _Pipe = field(default_factory=lambda: _Pipe(up=True))
    down: _Pipe = field(default_factory=lambda: _Pipe(up=False))
    generation: int = 0  # the mode generation ``budget_used`` counts for
    budget_used: int = 0  # request bytes taken under the current reset_after mode
    reset_pending: bool = False
    masks: dict[int, int] = field(default_factory=dict)


class TcpProxy:
    """A TCP proxy on ``127.0.0.1`` in front of ``target_host:target_port``.

    Starts at once in pass-through mode; use it as a context manager or call
    :meth:`close`. One fault mode holds at a time; each control method replaces the
    previous mode and applies to open connections as well as new ones.

    :param target_port: the real server's port.
    :param target_host: the real server's address (an IP address).
    :param port: the port to listen on (default: an ephemeral port, kept across
        :meth:`cut` and :meth:`restore`).
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target: tuple[str, int] = (target_host, target_port)
        self._family = socket.AF_INET6 if ":" in target_host else socket.AF_INET
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            (
                "connections",
                "bytes_up",
                "bytes_down",
                "bytes_discarded",
                "resets",
                "cuts",
                "upstream_failures",
            ),
            0,
        )
        self._conns: set[_Conn] = set()
        self._mode = _Mode()
        self._generation = 0
        self._commands: SimpleQueue[tuple[Callable[[], object], Future[object]]] = SimpleQueue()
        self._selector = selectors.DefaultSelector()
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._waker_w.setblocking(False)
        self._selector.register(self._waker_r, _READ, self._drain_waker)
        self._listener: socket.socket | None = None
        self._listen(port)
        self.port: int = self._port
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"flagsink-tcp-proxy-{self.port}", daemon=True
        )
        self._thread.start()

    # -- public API -------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` to connect to."""
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: the proxy as an HTTP endpoint."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        """The current mode: ``pass``, ``delay``, ``blackhole``, ``reset`` or ``cut``."""
        return "cut" if self._listener is None and not self._closed else self._mode.kind

    def stats(self) -> ProxyStats:
        """The counters now."""
        with self._lock:
            return ProxyStats(active=len(self._conns), **self._counts)

    def restore(self) -> None:
        """Back to pass-through: listen again after :meth:`cut`, forward without delay,
        resume stalled connections and reset the ones accepted by a blackhole.

        :raises OSError: the port was taken by another socket while cut.
        """
        self._call(self._do_restore)

    def pass_through(self) -> None:
        """Forward every byte at once (the initial mode); the same as :meth:`restore`."""
        self.restore()

    def delay(self, seconds: float) -> None:
        """Forward every chunk read from now on ``seconds`` late, in both directions, in
        order (a slow network). Chunks already waiting keep their time."""
        if seconds < 0:
            raise ValueError("delay(seconds): seconds must be >= 0")
        self._call(lambda: self._set_mode(_Mode("delay", seconds=float(seconds))))

    def cut(self) -> None:
        """Reset every open connection (TCP RST) and refuse new ones (the port is closed)
        until :meth:`restore`."""
        self._call(self._do_cut)

    def blackhole(self) -> None:
        """Accept new connections but never forward nor answer them (their bytes are read
        and thrown away); open connections stall: nothing is forwarded either way until
        :meth:`restore`, which also resets the connections the blackhole accepted."""
        self._call(lambda: self._set_mode(_Mode("blackhole")))

    def reset_after(self, n_bytes: int, times: int | None = None) -> None:
        """Reset a connection (TCP RST, both sides) once ``n_bytes`` of the request went to
        the server: exactly ``n_bytes`` reach it, then the client and the server see a
        reset. Bytes count per connection from now (or from its opening).

        :param times: go back to pass-through after this many resets (default: never).
        """
        if n_bytes < 0:
            raise ValueError("reset_after(n_bytes): n_bytes must be >= 0")
        if times is not None and times < 1:
            raise ValueError("reset_after(times=...): times must be >= 1 or None")
        self._call(lambda: self._set_mode(_Mode("reset", limit=n_bytes, times=times)))

    def close(self) -> None:
        """Reset every connection, close the port and stop the thread. Idempotent."""
        if self._closed:
            return
        if self._thread.is_alive():
            with contextlib.suppress(TimeoutError, RuntimeError):
                self._call(self._do_stop)
            self._thread.join(_CONTROL_TIMEOUT)
        self._closed = True
        self._selector.close()
        for sock in (self._waker_r, self._waker_w):
            sock.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        host, port = self.target
        return f"<TcpProxy 127.0.0.1:{self.port} -> {host}:{port} mode={self.mode}>"

    # -- control (runs on the proxy's thread) -----------------------------------------------

    def _call(self, command: Callable[[], _T]) -> _T:
        if self._closed or self._stopping or not self._thread.is_alive():
            raise RuntimeError("the TcpProxy is closed")
        if threading.current_thread() is self._thread:
            return command()
        done: Future[object] = Future()
        self._commands.put((command, done))
        self._wake()
        result: _T = done.result(_CONTROL_TIMEOUT)  # type: ignore[assignment]
        return result

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._waker_w.send(b"\0")

    def _drain_waker(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._waker_r.recv(4096):
                pass

    def _run_commands(self) -> None:
        while True:
            try:
                command, done = self._commands.get_nowait()
            except Empty:
                return
            try:
                done.set_result(command())
            except BaseException as exc:
                done.set_exception(exc)

    def _set_mode(self, mode: _Mode) -> None:
        previous = self._mode
        self._mode = mode
        self._generation += 1
        if previous.kind == "blackhole" and mode.kind != "blackhole":
            for conn in [c for c in self._conns if c.blackholed]:
                self._abort(conn, on_purpose=True)
        for conn in list(self._conns):
            self._pump(conn)

    def _do_restore(self) -> None:
        if self._listener is None:
            self._listen(self.port)
        self._set_mode(_Mode())

    def _do_cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            self._selector.unregister(listener)
            listener.close()
        with self._lock:
            self._counts["cuts"] += 1
        for conn in list(self._conns):
            self._abort(conn, on_purpose=True)

    def _do_stop(self) -> None:
        self._stopping = True
        listener, self._listener = self._listener, None
        if listener is not None:
            self._selector.unregister(listener)
            listener.close()
        for conn in list(self._conns):
            self._abort(conn, on_purpose=False)

    def _listen(self, port: int) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(128)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            raise OSError(
                exc.errno, f"TcpProxy cannot listen on 127.0.0.1:{port}: {exc.strerror}"
            ) from exc
        self._port = int(listener.getsockname()[1])
        self._listener = listener
        self._selector.register(listener, _READ, self._accept)

    # -- event loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
                for key, mask in self._selector.select(self._timeout()):
                    handler: Callable[[int], None] = key.data
                    handler(mask)
                self._run_due()
            except Exception:  # pragma: no cover - defensive: the proxy must keep serving
                logger.exception("TcpProxy 127.0.0.1:%d: event loop error", self.port)
            self._run_commands()
        self._run_commands()  # answer anything posted while stopping

    def _timeout(self) -> float | None:
        if self._mode.kind == "blackhole":
            return None
        due = [
            pipe.waiting[0][0]
            for conn in self._conns
            for pipe in (conn.up, conn.down)
            if pipe.waiting
        ]
        if not due:
            return None
        return max(min(due) - time.monotonic(), 0.0)

    def _run_due(self) -> None:
        if self._mode.kind == "blackhole":
            return
        now = time.monotonic()
        for conn in list(self._conns):
            if any(p.waiting and p.waiting[0][0] <= now for p in (conn.up, conn.down)):
                self._pump(conn)

    def _accept(self, mask: int) -> None:
        listener = self._listener
        if listener is None:
            return
        while True:
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            client.setblocking(False)
            with contextlib.suppress(OSError):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._counts["connections"] += 1
            if self._mode.kind == "blackhole":
                conn = _Conn(client, None, blackholed=True)
            else:
                upstream = socket.socket(self._family, socket.SOCK_STREAM)
                upstream.setblocking(False)
                with contextlib.suppress(OSError):
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = _Conn(client, upstream, connecting=True)
                code = upstream.connect_ex(self.target)
                if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                    self._track(conn)
                    self._upstream_failed(conn)
                    continue
            conn.generation = self._generation
            self._track(conn)
            self._refresh(conn)

    def _track(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.add(conn)

    def _upstream_failed(self, conn: _Conn) -> None:
        with self._lock:
            self._counts["upstream_failures"] += 1
        self._abort(conn, on_purpose=False)

    def _on_client(self, conn: _Conn, mask: int) -> None:
        if conn not in self._conns:
            return
        if mask & _READ:
            self._read(conn, conn.client, conn.up)
        if conn in self._conns:
            self._pump(conn)

    def _on_upstream(self, conn: _Conn, mask: int) -> None:
        if conn not in self._conns or conn.upstream is None:
            return
        if conn.connecting:
            if not mask & _WRITE:
                return
            if conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._upstream_failed(conn)
                return
            conn.connecting = False
        elif mask & _READ:
            self._read(conn, conn.upstream, conn.down)
        if conn in self._conns:
            self._pump(conn)

    def _read(self, conn: _Conn, source: socket.socket, pipe: _Pipe) -> None:
        try:
            data = source.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._abort(conn, on_purpose=False)  # the peer reset: pass the reset on
            return
        if not data:
            pipe.eof = True
            return
        if conn.blackholed:
            with self._lock:
                self._counts["bytes_discarded"] += len(data)
            return
        mode = self._mode
        if pipe.up and mode.kind == "reset":
            if conn.generation != self._generation:
                conn.generation, conn.budget_used = self._generation, 0
            room = mode.limit - conn.budget_used
            if len(data) >= room:
                data = data[:room]
                conn.reset_pending = True
            conn.budget_used += len(data)
        due = time.monotonic() + mode.seconds if mode.kind == "delay" else 0.0
        if pipe.waiting:  # keep the order: never due before the chunk ahead
            due = max(due, pipe.waiting[-1][0])
        if data:
            pipe.waiting.append((due, data))
            pipe.held += len(data)

    def _pump(self, conn: _Conn) -> None:
        """Move what is due to the sockets, pass ends of stream on, act on a pending reset,
        then update what the connection waits for."""
        if conn not in self._conns:
            return
        if conn.blackholed:
            if conn.up.eof:
                self._abort(conn, on_purpose=False, reset=False)
            return
        if self._mode.kind != "blackhole" and not conn.connecting:
            now = time.monotonic()
            for pipe, sink in ((conn.up, conn.upstream), (conn.down, conn.client)):
                assert sink is not None
                if not self._flush(conn, pipe, sink, now):
                    return
            if conn.reset_pending and not conn.up.held:
                self._reset_on_purpose(conn)
                return
            if conn.up.shut and conn.down.shut:
                self._abort(conn, on_purpose=False, reset=False)
                return
        self._refresh(conn)

    def _flush(self, conn: _Conn, pipe: _Pipe, sink: socket.socket, now: float) -> bool:
        while pipe.waiting and pipe.waiting[0][0] <= now:
            pipe.out += pipe.waiting.popleft()[1]
        if pipe.out:
            try:
                sent = sink.send(pipe.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._abort(conn, on_purpose=False)
                return False
            del pipe.out[:sent]
            pipe.held -= sent
            with self._lock:
                self._counts["bytes_up" if pipe.up else "bytes_down"] += sent
        if pipe.eof and not pipe.held and not pipe.shut and not conn.reset_pending:
            pipe.shut = True
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
        return True

    def _reset_on_purpose(self, conn: _Conn) -> None:
        self._abort(conn, on_purpose=True)
        mode = self._mode
        if mode.kind == "reset" and mode.times is not None:
            if mode.times <= 1:
                self._set_mode(_Mode())
            else:
                self._mode = _Mode("reset", limit=mode.limit, times=mode.times - 1)

    def _refresh(self, conn: _Conn) -> None:
        """Register each socket of ``conn`` for exactly the events it waits for."""
        stalled = self._mode.kind == "blackhole" and not conn.blackholed
        pending = conn.reset_pending
        client = 0
        if not conn.up.eof and not stalled and not pending and conn.up.held < _HIGH_WATER:
            client |= _READ
        if conn.down.out and not stalled:
            client |= _WRITE
        self._register(conn, conn.client, client, self._on_client)
        if conn.upstream is None:
            return
        if conn.connecting:
            upstream = _WRITE
        else:
            upstream = 0
            if not conn.down.eof and not stalled and conn.down.held < _HIGH_WATER:
                upstream |= _READ
            if conn.up.out and not stalled:
                upstream |= _WRITE
        self._register(conn, conn.upstream, upstream, self._on_upstream)

    def _register(
        self,
        conn: _Conn,
        sock: socket.socket,
        mask: int,
        handler: Callable[[_Conn, int], None],
    ) -> None:
        fd = sock.fileno()
        current = conn.masks.get(fd, 0)
        if mask == current:
            return
        if not mask:
            self._selector.unregister(sock)
            del conn.masks[fd]
            return

        def on_event(events: int) -> None:
            handler(conn, events)

        if current:
            self._selector.modify(sock, mask, on_event)
        else:
            self._selector.register(sock, mask, on_event)
        conn.masks[fd] = mask

    def _abort(self, conn: _Conn, *, on_purpose: bool, reset: bool = True) -> None:
        """Close both sockets of ``conn``: with a TCP reset unless ``reset`` is False."""
        with self._lock:
            if conn not in self._conns:
                return
            self._conns.discard(conn)
            if on_purpose:
                self._counts["resets"] += 1
        for sock in (conn.client, conn.upstream):
            if sock is None:
                continue
            if sock.fileno() in conn.masks:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        conn.masks.clear()
