"""flagsink.testing.faults.TcpProxy against a real HTTP server (http.server on a thread):
each mode proven from both ends, the client's socket and what the server received."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagsink.testing import wait_until
from flagsink.testing.faults import TcpProxy

TIMEOUT = 10.0


@dataclass
class Seen:
    """What the server received: one entry per request it started to read."""

    paths: list[str] = field(default_factory=list)
    #: body bytes each POST received before its end or an error, and how it ended.
    bodies: list[tuple[int, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as HTTP clients use it
    seen: Seen

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        with self.seen.lock:
            self.seen.paths.append(self.path)
        self._answer(b"hello")

    def do_POST(self) -> None:
        with self.seen.lock:
            self.seen.paths.append(self.path)
        length = int(self.headers["Content-Length"])
        body = bytearray()
        ended = "complete"
        try:
            while len(body) < length:
                chunk = self.rfile.read1(length - len(body))
                if not chunk:
                    ended = "eof"
                    break
                body += chunk
        except OSError as exc:
            ended = type(exc).__name__
        with self.seen.lock:
            self.seen.bodies.append((len(body), ended))
        if ended == "complete":
            self._answer(bytes(body))  # echo
        else:
            self.close_connection = True


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # resets are what these tests make happen


@dataclass
class Server:
    port: int
    seen: Seen


@pytest.fixture
def server() -> Iterator[Server]:
    seen = Seen()
    handler = type("BoundHandler", (Handler,), {"seen": seen})
    httpd = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=httpd.serve_forever, args=(0.05,), name="test-http", daemon=True
    )
    thread.start()
    try:
        yield Server(httpd.server_address[1], seen)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT)


@pytest.fixture
def proxy(server: Server) -> Iterator[TcpProxy]:
    with TcpProxy(server.port) as made:
        yield made


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("flagsink-tcp-proxy")]


def get_request(path: str = "/hello") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()


def post_head(length: int, path: str = "/echo") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {length}\r\n\r\n".encode()


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(raw response bytes, body) of one HTTP/1.1 response with a Content-Length."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {raw!r}")
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed in the body")
        raw += chunk
        body += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return raw, body


def read_responses(sock: socket.socket, count: int) -> None:
    for _ in range(count):
        read_response(sock)


def connect(proxy: TcpProxy, timeout: float = TIMEOUT) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=timeout)


def exchange(proxy: TcpProxy, request: bytes) -> bytes:
    """One request on a new connection; the body of the answer."""
    with connect(proxy) as sock:
        sock.sendall(request)
        return read_response(sock)[1]


def fetch(proxy: TcpProxy, path: str = "/hello", timeout: float = TIMEOUT) -> bytes:
    connection = http.client.HTTPConnection(*proxy.address, timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().read()
    finally:
        connection.close()


# -- pass-through ---------------------------------------------------------------------------


def test_pass_through_forwards_both_ways_and_counts_exactly(
    server: Server, proxy: TcpProxy
) -> None:
    assert proxy.mode == "pass"
    up = down = 0
    with connect(proxy) as sock:
        for index in range(3):  # one keep-alive connection, three requests
            request = get_request(f"/hello/{index}")
            sock.sendall(request)
            raw, body = read_response(sock)
            assert body == b"hello"
            up, down = up + len(request), down + len(raw)
    assert server.seen.paths == ["/hello/0", "/hello/1", "/hello/2"]
    assert wait_until(lambda: proxy.stats().active == 0, TIMEOUT)
    stats = proxy.stats()
    assert (stats.connections, stats.bytes_up, stats.bytes_down) == (1, up, down)
    assert (stats.resets, stats.cuts, stats.bytes_discarded, stats.upstream_failures) == (
        0,
        0,
        0,
        0,
    )


def test_large_bodies_arrive_intact_both_ways(server: Server, proxy: TcpProxy) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)  # several times the proxy's 1 MiB buffer
    connection = http.client.HTTPConnection(*proxy.address, timeout=TIMEOUT)
    try:
        connection.request("POST", "/echo", body=payload)
        assert connection.getresponse().read() == payload
    finally:
        connection.close()
    assert server.seen.bodies == [(len(payload), "complete")]
    # Counted just after each send: the client may read a byte before it is counted.
    assert wait_until(lambda: proxy.stats().bytes_down > len(payload), TIMEOUT)
    assert proxy.stats().bytes_up > len(payload)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    sizes=st.lists(st.integers(0, 200_000), min_size=1, max_size=4),
    delay=st.sampled_from([0.0, 0.001, 0.005]),
)
def test_any_sequence_of_bodies_is_echoed_byte_for_byte(
    proxy: TcpProxy, sizes: list[int], delay: float
) -> None:
    if delay:
        proxy.delay(delay)
    else:
        proxy.restore()
    with connect(proxy) as sock:
        for size in sizes:
            payload = os.urandom(size)
            sock.sendall(post_head(size) + payload)
            _, body = read_response(sock)
            assert body == payload


def test_a_server_that_is_down_is_a_reset_for_the_client() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # nothing listens there once closed
    with TcpProxy(dead_port) as proxy:
        # Depending on timing the reset meets the client in connect, send or receive.
        with pytest.raises(ConnectionError):
            exchange(proxy, get_request())
        assert wait_until(lambda: proxy.stats().upstream_failures == 1, TIMEOUT)
        assert proxy.stats().bytes_up == 0


# -- delay ------------------------------------------------------------------------------------


def test_delay_holds_every_chunk_in_both_directions_then_restore_is_immediate(
    server: Server, proxy: TcpProxy
) -> None:
    with connect(proxy) as sock:
        sock.sendall(get_request())
        read_response(sock)  # connection open before the delay: the delay applies to it too
        proxy.delay(0.3)
        assert proxy.mode == "delay"
        started = time.monotonic()
        sock.sendall(get_request("/slow"))
        time.sleep(0.1)  # a third of the delay: the server must not have it yet
        assert server.seen.paths == ["/hello"]
        _, body = read_response(sock)
        slow = time.monotonic() - started
        proxy.restore()
        started = time.monotonic()
        sock.sendall(get_request("/fast"))
        read_response(sock)
        fast = time.monotonic() - started
    assert body == b"hello"
    assert 0.6 <= slow < 5.0  # 0.3 s on the way in, 0.3 s on the way out
    assert fast < 0.3
    assert server.seen.paths == ["/hello", "/slow", "/fast"]


# -- cut ----------------------------------------------------------------------------------------


def test_cut_resets_open_connections_refuses_new_ones_until_restore(
    server: Server, proxy: TcpProxy
) -> None:
    with connect(proxy) as sock:
        sock.sendall(get_request())
        read_response(sock)
        proxy.cut()
        assert proxy.mode == "cut"
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    with pytest.raises(ConnectionRefusedError):
        connect(proxy, timeout=2.0)
    stats = proxy.stats()
    assert (stats.cuts, stats.resets, stats.active) == (1, 1, 0)
    proxy.restore()
    assert fetch(proxy, "/restored") == b"hello"  # the same port again
    assert server.seen.paths == ["/hello", "/restored"]  # nothing of the reset connection


def test_cut_and_restore_many_times_keeps_the_port(server: Server, proxy: TcpProxy) -> None:
    port = proxy.port
    for _ in range(5):
        proxy.cut()
        proxy.restore()
        assert fetch(proxy) == b"hello"
    assert proxy.port == port
    assert proxy.stats().cuts == 5


# -- blackhole -------------------------------------------------------------------------------


def test_blackhole_accepts_and_never_answers_then_restore_resets_those_connections(
    server: Server, proxy: TcpProxy
) -> None:
    proxy.blackhole()
    assert proxy.mode == "blackhole"
    request = get_request("/into-the-void")
    with connect(proxy, timeout=0.5) as sock:  # the connection itself is accepted
        sock.sendall(request)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert wait_until(lambda: proxy.stats().bytes_discarded == len(request), TIMEOUT)
        assert server.seen.paths == []
        proxy.restore()
        sock.settimeout(TIMEOUT)
        with pytest.raises(ConnectionResetError):
            sock.recv(1)  # never forwarded, so never to be answered: reset
    assert proxy.stats().resets == 1
    assert fetch(proxy, "/after") == b"hello"
    assert server.seen.paths == ["/after"]


def test_blackhole_stalls_open_connections_and_restore_resumes_them(
    server: Server, proxy: TcpProxy
) -> None:
    with connect(proxy) as sock:
        sock.sendall(get_request("/before"))
        read_response(sock)
        proxy.blackhole()
        sock.settimeout(0.5)
        sock.sendall(get_request("/stalled"))
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert server.seen.paths == ["/before"]  # nothing went through
        proxy.restore()
        sock.settimeout(TIMEOUT)
        _, body = read_response(sock)  # the same connection carries on
    assert body == b"hello"
    assert server.seen.paths == ["/before", "/stalled"]
    assert proxy.stats().resets == 0


# -- reset mid-request ---------------------------------------------------------------------------


def test_reset_after_n_bytes_lets_exactly_n_through_then_resets_both_sides(
    server: Server, proxy: TcpProxy
) -> None:
    body = os.urandom(10_000)
    head = post_head(len(body), "/upload")
    proxy.reset_after(len(head) + 100, times=1)
    assert proxy.mode == "reset"
    with connect(proxy) as sock:
        sock.sendall(head + body)
        with pytest.raises(ConnectionResetError):
            read_response(sock)
    # The server read the headers and exactly 100 body bytes, then saw the reset.
    assert wait_until(lambda: len(server.seen.bodies) == 1, TIMEOUT)
    assert server.seen.bodies == [(100, "ConnectionResetError")]
    stats = proxy.stats()
    assert stats.resets == 1
    assert stats.bytes_up == len(head) + 100
    # times=1: back to pass-through after that one reset.
    assert proxy.mode == "pass"
    assert fetch(proxy, "/next") == b"hello"


def test_reset_after_counts_bytes_per_connection_from_when_it_is_set(
    server: Server, proxy: TcpProxy
) -> None:
    request = get_request()
    with connect(proxy) as sock:
        sock.sendall(request)
        read_response(sock)  # these bytes are before the mode: not counted
        proxy.reset_after(len(request) + 5)
        sock.sendall(request)  # fits the budget
        read_response(sock)
        sock.sendall(request)  # the budget ends 5 bytes in
        with pytest.raises(ConnectionResetError):
            read_response(sock)
    assert len(server.seen.paths) == 2
    assert proxy.mode == "reset"  # no `times`: every connection from now on
    with connect(proxy) as sock:
        sock.sendall(request + request)
        with pytest.raises(ConnectionResetError):
            read_responses(sock, 2)
    assert proxy.stats().resets == 2


# -- lifecycle ----------------------------------------------------------------------------------


def test_close_resets_connections_and_leaves_no_thread(server: Server) -> None:
    before = len(proxy_threads())
    proxy = TcpProxy(server.port)
    assert len(proxy_threads()) == before + 1
    with contextlib.ExitStack() as stack:
        open_one = stack.enter_context(connect(proxy))
        open_one.sendall(get_request())
        read_response(open_one)
        proxy.blackhole()
        held = stack.enter_context(connect(proxy))
        held.sendall(get_request())
        assert wait_until(lambda: proxy.stats().active == 2, TIMEOUT)
        proxy.close()
        assert len(proxy_threads()) == before
        for sock in (open_one, held):
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
    proxy.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        proxy.cut()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=2.0)


def test_bad_arguments_are_refused(proxy: TcpProxy) -> None:
    with pytest.raises(ValueError, match="seconds"):
        proxy.delay(-1)
    with pytest.raises(ValueError, match="n_bytes"):
        proxy.reset_after(-1)
    with pytest.raises(ValueError, match="times"):
        proxy.reset_after(10, times=0)
    assert proxy.mode == "pass"
    assert "TcpProxy" in repr(proxy)
