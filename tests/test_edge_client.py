"""The relay's HTTP/1.1 client (installer/edge/client.py) against a real socket server that answers
with exact bytes and records, per TCP connection, the bytes it received.

What is asserted: which upstream connection each request arrived on (a connection is reused only
after a clean, complete, non-error exchange), and the bytes the upstream got (a body exactly as
framed). No mocks: a real listening socket, real connections, the client's own event loop.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from installer.edge.client import (BodyError, Pool, UpstreamProtocolError, UpstreamTimeout,
                                   UpstreamUnreachable)


@dataclass
class Received:
    connection: int
    head: bytes
    body: bytes   # as framed on the wire (chunk sizes included)


@dataclass
class Upstream:
    """answer(request, its number on its connection) -> (bytes to send, close after sending)."""
    answer: Callable[[Received, int], tuple[bytes, bool]]
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    sock: socket.socket = field(default_factory=socket.socket)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def start(self) -> Upstream:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        try:
            self._exchanges(conn, number)
        except OSError:
            pass  # the client aborted the connection: what several tests make it do

    def _exchanges(self, conn: socket.socket, number: int) -> None:
        buffer = b""
        served = 0
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                body, buffer = self._body(conn, head, buffer)
                if body is None:
                    return
                request = Received(number, head, body)
                self.received.append(request)
                served += 1
                reply, close = self.answer(request, served)
                if reply:
                    conn.sendall(reply)
                if close:
                    return

    @staticmethod
    def _body(conn: socket.socket, head: bytes, buffer: bytes) -> tuple[bytes | None, bytes]:
        lowered = head.lower()

        def need(count: int) -> bool:
            nonlocal buffer
            while len(buffer) < count:
                data = conn.recv(65536)
                if not data:
                    return False
                buffer += data
            return True

        if b"transfer-encoding: chunked" in lowered:
            end = 0
            while True:
                while b"\r\n" not in buffer[end:]:
                    if not need(len(buffer) + 1):
                        return None, b""
                line_end = buffer.index(b"\r\n", end)
                size = int(buffer[end:line_end], 16)
                end = line_end + 2 + size + 2
                if not need(end):
                    return None, b""
                if size == 0:
                    return buffer[:end], buffer[end:]
        length = 0
        for line in lowered.split(b"\r\n")[1:]:
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if not need(length):
            return None, b""
        return buffer[:length], buffer[length:]


def ok(body: bytes = b"pong", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


@pytest.fixture
def serve() -> Callable[..., Upstream]:
    started: list[Upstream] = []

    def start(answer: Callable[[Received, int], tuple[bytes, bool]]) -> Upstream:
        upstream = Upstream(answer).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


async def _get(pool: Pool, target: str = "/ping", method: str = "GET") -> tuple[int, bytes]:
    response = await pool.request(method, target, [("Host", "upstream"), ("X-Test", "1")])
    try:
        body = b"".join([chunk async for chunk in response.chunks()])
    finally:
        response.finish()
    return response.status, body


def _pool(upstream: Upstream, **kwargs) -> Pool:
    return Pool("127.0.0.1", upstream.port, **kwargs)


def _get_twice(upstream: Upstream) -> list[tuple[int, bytes]]:
    """Two requests in a row through one pool: whether the second reused the first's connection is
    what the upstream's `received` says."""
    async def run() -> list[tuple[int, bytes]]:
        pool = _pool(upstream)
        return [await _get(pool), await _get(pool)]

    return asyncio.run(run())


# ------------------------------------------------------------------------------------------------ reuse

def test_a_connection_is_reused_after_a_clean_exchange(serve) -> None:
    upstream = serve(lambda request, n: (ok(), False))

    async def run() -> list[tuple[int, bytes]]:
        pool = _pool(upstream)
        return [await _get(pool) for _ in range(3)]

    assert asyncio.run(run()) == [(200, b"pong")] * 3
    assert [r.connection for r in upstream.received] == [1, 1, 1]
    assert upstream.received[0].head.startswith(b"GET /ping HTTP/1.1\r\nHost: upstream\r\nX-Test: 1")


@pytest.mark.parametrize("status", [400, 404, 500, 503])
def test_a_connection_is_not_reused_after_an_error_status(serve, status: int) -> None:
    upstream = serve(lambda request, n: (b"HTTP/1.1 %d Nope\r\nContent-Length: 2\r\n\r\nno" % status
                                         if request.head.startswith(b"GET /bad") else ok(), False))

    async def run() -> list[tuple[int, bytes]]:
        pool = _pool(upstream)
        return [await _get(pool, "/bad"), await _get(pool)]

    assert asyncio.run(run()) == [(status, b"no"), (200, b"pong")]
    assert [r.connection for r in upstream.received] == [1, 2]


def test_a_connection_is_not_reused_after_connection_close(serve) -> None:
    upstream = serve(lambda request, n: (ok(extra=b"Connection: close\r\n"), False))

    assert _get_twice(upstream) == [(200, b"pong")] * 2
    assert [r.connection for r in upstream.received] == [1, 2]


def test_a_truncated_body_is_an_error_and_the_connection_is_dropped(serve) -> None:
    upstream = serve(lambda request, n: (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", True)
                     if request.head.startswith(b"GET /cut") else (ok(), False))

    async def run() -> tuple[int, bytes]:
        pool = _pool(upstream)
        response = await pool.request("GET", "/cut", [])
        try:
            with pytest.raises(UpstreamProtocolError):
                async for _ in response.chunks():
                    pass
            assert not response.complete
        finally:
            response.finish()
        assert pool.idle_connections == 0 and pool.open_connections == 0
        return await _get(pool)

    assert asyncio.run(run()) == (200, b"pong")
    assert [r.connection for r in upstream.received] == [1, 2]


def test_a_body_left_unread_is_never_reused(serve) -> None:
    big = b"x" * 300_000
    upstream = serve(lambda request, n: (ok(big), False))

    async def run() -> None:
        pool = _pool(upstream)
        response = await pool.request("GET", "/big", [])
        first = await response.chunks().__anext__()
        assert 0 < len(first) < len(big) or response.complete
        response.finish()  # the client went away after the first chunk
        assert pool.idle_connections == 0
        assert await _get(pool) == (200, big)

    asyncio.run(run())
    assert [r.connection for r in upstream.received] == [1, 2]


def test_bytes_beyond_the_response_mean_the_connection_is_dropped(serve) -> None:
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!"
    upstream = serve(lambda request, n: (ok() + smuggled if request.connection == 1 else ok(b"second"), False))

    assert _get_twice(upstream) == [(200, b"pong"), (200, b"second")]
    assert [r.connection for r in upstream.received] == [1, 2]


def test_a_response_framed_by_close_is_read_to_the_end_and_not_reused(serve) -> None:
    upstream = serve(lambda request, n: (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", True))

    assert _get_twice(upstream) == [(200, b"until the end")] * 2
    assert [r.connection for r in upstream.received] == [1, 2]


def test_a_chunked_response_is_decoded_and_its_connection_reused(serve) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\nX-Trailer: t\r\n\r\n"
    upstream = serve(lambda request, n: (chunked, False))

    assert _get_twice(upstream) == [(200, b"abcdefg")] * 2
    assert [r.connection for r in upstream.received] == [1, 1]


def test_a_reused_connection_closed_unanswered_is_retried_once_only_without_a_body(serve) -> None:
    # The upstream closes each connection, unanswered, at its second request: what a keep-alive
    # timeout on its side looks like when it strikes as the request arrives.
    upstream = serve(lambda request, n: (ok(), False) if n == 1 else (b"", True))

    async def run() -> None:
        pool = _pool(upstream)
        assert await _get(pool) == (200, b"pong")
        assert await _get(pool) == (200, b"pong"), "retried on a fresh connection"
        with pytest.raises(UpstreamUnreachable):
            await pool.request("POST", "/write", [], _chunks(b"data"), 4)

    asyncio.run(run())
    assert [r.connection for r in upstream.received] == [1, 1, 2, 2]
    assert upstream.received[-1].head.startswith(b"POST /write") and upstream.received[-1].body == b"data"
    assert sum(r.head.startswith(b"POST") for r in upstream.received) == 1, "a body is sent once, never again"


def test_idle_connections_expire(serve) -> None:
    upstream = serve(lambda request, n: (ok(), False))

    async def run() -> None:
        pool = _pool(upstream, idle_timeout=0.2)
        await _get(pool)
        await asyncio.sleep(0.3)
        await _get(pool)

    asyncio.run(run())
    assert [r.connection for r in upstream.received] == [1, 2]


# ------------------------------------------------------------------------------------------------ bodies

async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)
        yield part


def test_a_request_body_with_a_length_is_relayed_exactly(serve) -> None:
    upstream = serve(lambda request, n: (ok(), False))
    parts = (b"a" * 70_000, b"", b"\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n", b"z")
    total = sum(len(p) for p in parts)

    async def run() -> None:
        pool = _pool(upstream)
        response = await pool.request("POST", "/upload", [("Host", "u")], _chunks(*parts), total)
        response.finish()
        assert await _get(pool) == (200, b"pong")

    asyncio.run(run())
    first = upstream.received[0]
    assert b"\r\nContent-Length: %d\r\n" % total in first.head + b"\r\n"
    assert b"transfer-encoding" not in first.head.lower()
    assert first.body == b"".join(parts)
    assert [r.head.split(b" ")[1] for r in upstream.received] == [b"/upload", b"/ping"]


def test_a_chunked_request_body_is_relayed_as_chunks(serve) -> None:
    upstream = serve(lambda request, n: (ok(), False))

    async def run() -> None:
        pool = _pool(upstream)
        response = await pool.request("PUT", "/upload", [], _chunks(b"hello ", b"world"), None)
        response.finish()

    asyncio.run(run())
    received = upstream.received[0]
    assert b"Transfer-Encoding: chunked" in received.head and b"content-length" not in received.head.lower()
    assert received.body == b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"


def test_a_body_shorter_than_its_length_is_refused_and_never_completed_upstream(serve) -> None:
    upstream = serve(lambda request, n: (ok(), False))

    async def run() -> None:
        pool = _pool(upstream)
        with pytest.raises(BodyError):
            await pool.request("POST", "/upload", [], _chunks(b"12345"), 10)
        assert pool.open_connections == 0
        with pytest.raises(BodyError):
            await pool.request("POST", "/upload", [], _chunks(b"12345678901"), 10)

    asyncio.run(run())
    time.sleep(0.2)
    assert upstream.received == [], "the upstream never saw a complete request"


def test_a_body_is_never_sent_again_when_its_connection_fails(serve) -> None:
    upstream = serve(lambda request, n: (b"", True))

    async def run() -> None:
        pool = _pool(upstream)
        with pytest.raises(UpstreamUnreachable):
            await pool.request("POST", "/once", [], _chunks(b"data"), 4)

    asyncio.run(run())
    assert len(upstream.received) == 1


def test_a_bodyless_post_says_content_length_zero(serve) -> None:
    upstream = serve(lambda request, n: (ok(), False))
    asyncio.run(_get(_pool(upstream), "/p", method="POST"))
    assert b"\r\nContent-Length: 0" in upstream.received[0].head


# ------------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\npong!",
    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npong\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\npong",
    b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 4\r\n\r\npong",
    b"HTTP/1.1 200 OK\r\n folded: x\r\nContent-Length: 4\r\n\r\npong",
    b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 4\r\n\r\npong",
    b"HTTP/1.1 2000 OK\r\nContent-Length: 4\r\n\r\npong",
    b"HTTP/1.1 200 OK\r\nContent-Length: -4\r\n\r\npong",
    b"ICY 200 OK\r\n\r\npong",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
], ids=["two-lengths", "te-and-length", "te-gzip", "space-in-name", "folding", "bare-lf", "status", "negative",
        "not-http", "upgrade"])
def test_malformed_or_ambiguous_responses_are_refused(serve, answer: bytes) -> None:
    upstream = serve(lambda request, n: (answer, False))

    async def run() -> None:
        pool = _pool(upstream)
        with pytest.raises(UpstreamProtocolError):
            await _get(pool)
        assert pool.open_connections == 0

    asyncio.run(run())


def test_interim_answers_are_skipped(serve) -> None:
    upstream = serve(lambda request, n: (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(), False))
    assert asyncio.run(_get(_pool(upstream))) == (200, b"pong")


def test_a_silent_upstream_times_out(serve) -> None:
    upstream = serve(lambda request, n: (b"", False))

    async def run() -> None:
        pool = _pool(upstream, read_timeout=0.3)
        began = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await _get(pool)
        assert time.monotonic() - began < 3
        assert pool.open_connections == 0

    asyncio.run(run())


def test_an_unreachable_upstream_is_named_as_such() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def run() -> None:
        pool = Pool("127.0.0.1", port)
        with pytest.raises(UpstreamUnreachable):
            await _get(pool)
        assert pool.open_connections == 0

    asyncio.run(run())


def test_header_values_with_line_breaks_are_refused_before_anything_is_sent(serve) -> None:
    upstream = serve(lambda request, n: (ok(), False))

    async def run() -> None:
        pool = _pool(upstream)
        with pytest.raises(ValueError, match="line break"):
            await pool.request("GET", "/x", [("X-A", "1\r\nX-Injected: 2")])

    asyncio.run(run())
    assert upstream.connections == 0


def test_the_pool_limit_queues_requests(serve) -> None:
    def slow(request: Received, n: int) -> tuple[bytes, bool]:
        time.sleep(0.1)
        return ok(), False

    upstream = serve(slow)

    async def run() -> None:
        pool = _pool(upstream, limit=2)
        results = await asyncio.gather(*(_get(pool) for _ in range(6)))
        assert results == [(200, b"pong")] * 6
        assert pool.open_connections <= 2

    asyncio.run(run())
    assert upstream.connections == 2
