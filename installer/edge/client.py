"""The HTTP/1.1 client the relay sends admitted requests with: keep-alive pools and strict framing.

aiohttp's ClientSession cost the proxy more CPU per relayed request than everything
else together (URL objects, request and response classes, a timer per phase, its
own header handling on top of ours). The relay needs much less: one request per
connection at a time, the headers it was given sent as they are, the response
head parsed strictly and its body framed exactly, so this client does only that.

Rules, each of which keeps one client's bytes out of another client's exchange:
- a response is read only as its own framing says (Content-Length, chunked, or
  until the upstream closes); a head that is malformed, too large, or frames its
  body ambiguously (Transfer-Encoding other than chunked, Transfer-Encoding with
  Content-Length, differing Content-Lengths) is an error, never guessed at;
- a connection goes back into the pool only after a complete exchange: request
  body sent as framed, response body read to its end with no byte beyond it,
  status below 400, HTTP/1.1 without `Connection: close`. Anything else (an
  exception, a cancellation, a truncated body, an error status) closes it;
- a request body is sent exactly as the client framed it: Content-Length bytes,
  counted (fewer is an error), or chunks re-framed as chunks;
- idle connections are dropped after `idle_timeout` (below common upstream
  keep-alive limits), and only a request without a body is retried, once, on a
  fresh connection, when a reused one was closed before any answer came.
Timeouts: `connect_timeout` to connect, `read_timeout` for the longest silence
while sending or waiting for the upstream.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable

__all__ = ["BodyError", "Pool", "UpstreamError", "UpstreamResponse", "UpstreamTimeout", "UpstreamUnreachable"]

_MAX_HEAD = 64 * 1024
_MAX_CHUNK_LINE = 4096
_HIGH_WATER = 256 * 1024   # buffered upstream bytes beyond which the upstream socket stops being read
_LOW_WATER = 64 * 1024
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_HEADER_BLOCK = re.compile(_TOKEN + rb":[^\r\n\0]*(?:\r\n" + _TOKEN + rb":[^\r\n\0]*)*")
_BODYLESS_STATUS = frozenset({204, 304})
_NO_BODY_RETRY = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
_LENGTH_ZERO_METHODS = frozenset({"POST", "PUT", "PATCH"})


class UpstreamError(Exception):
    """The upstream could not be used for this request (the connection is closed)."""


class UpstreamUnreachable(UpstreamError):
    """Not connected, refused, or closed before answering."""


class UpstreamTimeout(UpstreamError):
    """No progress within the connect or read timeout."""


class UpstreamProtocolError(UpstreamError):
    """The upstream's answer broke HTTP/1.1 framing or syntax."""


class BodyError(Exception):
    """The client's request body ended early or could not be read."""


class _Connection(asyncio.Protocol):
    __slots__ = ("buffer", "closed", "eof", "idle_since", "transport", "_loop", "_waiter", "_drain", "_paused",
                 "_reading_paused", "_timeout", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self._loop = loop
        self._timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.eof = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self._reading_paused = False
        self._timer: asyncio.TimerHandle | None = None

    # -- protocol callbacks ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake(self._waiter)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake(self._waiter)
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = self.eof = True
        self._wake(self._waiter)
        self._wake(self._drain)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake(self._drain)

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- used by the exchange ----------------------------------------------------------------------

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()  # an unfinished exchange: nothing of it may be sent after this

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(UpstreamTimeout())

    async def _wait(self, slot: str) -> None:
        waiter = self._loop.create_future()
        setattr(self, slot, waiter)
        timer = self._loop.call_later(self._timeout, self._expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            setattr(self, slot, None)

    async def wait_data(self) -> None:
        """Until more bytes, the end, or a read timeout (UpstreamTimeout)."""
        if not self.eof:
            await self._wait("_waiter")

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise UpstreamUnreachable("the upstream closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        while self._paused:
            if self.closed:
                raise UpstreamUnreachable("the upstream closed the connection")
            await self._wait("_drain")
        if self.closed:
            raise UpstreamUnreachable("the upstream closed the connection")

    def take(self, limit: int) -> bytes:
        """Up to `limit` buffered bytes, removed from the buffer (reading resumes below the low-water mark)."""
        buffer = self.buffer
        if limit >= len(buffer):
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(buffer[:limit])
            del buffer[:limit]
        if self._reading_paused and len(buffer) < _LOW_WATER and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data


class UpstreamResponse:
    """One response: status, reason, headers as sent (names and values decoded), and its body.

    `body` holds the whole body when it came in with the head; otherwise read `chunks()`.
    Call `finish()` exactly once, when done with it (in a finally).
    """

    __slots__ = ("status", "reason", "headers", "body", "version", "_pool", "_conn", "_mode", "_left",
                 "_complete", "_keep_alive")

    def __init__(self, pool: Pool, conn: _Connection, status: int, reason: str, version: str,
                 headers: list[tuple[str, str]], mode: str, length: int, keep_alive: bool) -> None:
        self._pool, self._conn = pool, conn
        self.status, self.reason, self.version, self.headers = status, reason, version, headers
        self._mode, self._left = mode, length   # mode: "none", "length", "chunked" or "close"
        self._keep_alive = keep_alive
        self._complete = mode == "none"
        self.body: bytes | None = b"" if mode == "none" else None
        if mode == "length" and len(conn.buffer) >= length:
            self.body = conn.take(length)
            self._left = 0
            self._complete = True

    @property
    def complete(self) -> bool:
        """True once every byte of the body was read."""
        return self._complete

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; UpstreamError when it breaks off or is malformed."""
        if self.body is not None:
            if self.body:
                yield self.body
            return
        conn = self._conn
        if self._mode == "length":
            while self._left:
                if not conn.buffer:
                    if conn.eof:
                        raise UpstreamProtocolError("the upstream closed the connection mid-body")
                    await conn.wait_data()
                    continue
                data = conn.take(self._left)
                self._left -= len(data)
                yield data
        elif self._mode == "close":
            while True:
                if conn.buffer:
                    yield conn.take(len(conn.buffer))
                elif conn.eof:
                    break
                else:
                    await conn.wait_data()
        else:
            async for data in self._chunked():
                yield data
        self._complete = True

    async def _line(self) -> bytes:
        conn = self._conn
        while True:
            end = conn.buffer.find(b"\r\n")
            if end >= 0:
                line = conn.take(end + 2)[:-2]
                return line
            if len(conn.buffer) > _MAX_CHUNK_LINE:
                raise UpstreamProtocolError("a chunk header or trailer line is too long")
            if conn.eof:
                raise UpstreamProtocolError("the upstream closed the connection mid-body")
            await conn.wait_data()

    async def _chunked(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            size_text = (await self._line()).split(b";", 1)[0].strip()
            if not size_text or len(size_text) > 16 or not all(c in b"0123456789abcdefABCDEF" for c in size_text):
                raise UpstreamProtocolError("malformed chunk size")
            size = int(size_text, 16)
            if size == 0:
                while await self._line():
                    pass  # trailers are not relayed
                return
            while size:
                if not conn.buffer:
                    if conn.eof:
                        raise UpstreamProtocolError("the upstream closed the connection mid-chunk")
                    await conn.wait_data()
                    continue
                data = conn.take(size)
                size -= len(data)
                yield data
            if await self._line():
                raise UpstreamProtocolError("a chunk did not end where its size said")

    def finish(self) -> None:
        """Return the connection to the pool after a clean exchange; close it otherwise."""
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is None:
            return
        clean = (self._complete and self._keep_alive and self.status < 400 and not conn.buffer
                 and not conn.eof)
        self._pool._release(conn, clean)


def _parse_head(head: bytes, method: str) -> tuple[int, str, str, list[tuple[str, str]], str, int, bool]:
    """(status, reason, version, headers, body mode, length, keep-alive) of a response head, strictly."""
    status_line, _, block = head.partition(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit() \
            or b"\r" in reason or b"\n" in reason or b"\0" in reason:
        raise UpstreamProtocolError("malformed status line")
    status = int(code)
    if not 100 <= status <= 599:
        raise UpstreamProtocolError("malformed status line")
    # One pass validates every line (token name, colon, no CR, LF or NUL in a value, no folding).
    if block and not _HEADER_BLOCK.fullmatch(block):
        raise UpstreamProtocolError("malformed header line")
    pairs: list[tuple[str, str]] = []
    lengths: set[str] = set()
    codings: list[str] = []
    connection: list[str] = []
    for line in block.decode("utf-8", "replace").split("\r\n") if block else ():
        name, _, value = line.partition(":")
        value = value.strip(" \t")
        lowered = name.lower()
        if lowered == "content-length":
            lengths.add(value)
        elif lowered == "transfer-encoding":
            codings.append(value)
        elif lowered == "connection":
            connection.append(value)
        pairs.append((name, value))
    keep_alive = version == b"HTTP/1.1"
    if connection and "close" in {part.strip().lower() for value in connection for part in value.split(",")}:
        keep_alive = False
    if method == "HEAD" or status < 200 or status in _BODYLESS_STATUS:
        mode, length = "none", 0
    elif codings:
        if lengths or ",".join(codings).strip().lower() != "chunked":
            raise UpstreamProtocolError("ambiguous or unsupported response framing")
        mode, length = "chunked", 0
    elif lengths:
        if len(lengths) != 1:
            raise UpstreamProtocolError("conflicting Content-Length values")
        value = lengths.pop()
        if not (value.isascii() and value.isdigit()) or len(value) > 18:
            raise UpstreamProtocolError("malformed Content-Length")
        length = int(value)
        mode = "length" if length else "none"
    else:
        mode, length, keep_alive = "close", 0, False
    return status, reason.decode("utf-8", "replace"), version.decode(), pairs, mode, length, keep_alive


class Pool:
    """Keep-alive connections to one upstream (host and port, or a unix socket)."""

    def __init__(self, host: str | None = None, port: int | None = None, *, unix_path: str | None = None,
                 host_header: str | None = None, limit: int = 100, connect_timeout: float = 5.0, read_timeout: float = 600.0,
                 idle_timeout: float = 4.0) -> None:
        if unix_path is None and (host is None or port is None):
            raise ValueError("a pool needs a host and port, or a unix socket path")
        self.host, self.port, self.unix_path = host, port, unix_path
        self.default_host = host_header or ("localhost" if unix_path is not None else
                                            host if port == 80 else f"{host}:{port}")
        self.limit, self.connect_timeout, self.read_timeout = limit, connect_timeout, read_timeout
        self.idle_timeout = idle_timeout
        self._idle: deque[_Connection] = deque()
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def _acquire(self) -> tuple[_Connection, bool]:
        """(connection, whether it was used before): an idle one, a new one, or the next one freed."""
        while True:
            conn = self._idle_connection()
            if conn is not None:
                return conn, True
            if self._open < self.limit:
                return await self._connect(), False
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: the freed connection is someone else's
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connect(self) -> _Connection:
        self._open += 1
        loop = asyncio.get_running_loop()
        try:
            if self.unix_path is not None:
                connecting = loop.create_unix_connection(lambda: _Connection(loop, self.read_timeout),
                                                         self.unix_path)
            else:
                connecting = loop.create_connection(lambda: _Connection(loop, self.read_timeout),
                                                    self.host, self.port)
            _transport, conn = await asyncio.wait_for(connecting, self.connect_timeout)
        except asyncio.TimeoutError as exc:
            self._gone()
            raise UpstreamTimeout("connecting took too long") from exc
        except OSError as exc:
            self._gone()
            raise UpstreamUnreachable(exc.strerror or exc.__class__.__name__) from exc
        except BaseException:
            self._gone()
            raise
        return conn

    def _gone(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def _idle_connection(self) -> _Connection | None:
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.eof and not conn.buffer and now - conn.idle_since < self.idle_timeout:
                return conn
            conn.close()
            self._gone()
        return None

    def _release(self, conn: _Connection, clean: bool) -> None:
        if not clean or conn.closed or self._closed:
            conn.close()
            self._gone()
            return
        now = time.monotonic()
        conn.idle_since = now
        idle = self._idle
        while idle and now - idle[0].idle_since >= self.idle_timeout:
            idle.popleft().close()
            self._gone()
        idle.append(conn)
        self._wake_one()

    def close(self) -> None:
        """Close every idle connection; connections in use close when their exchange ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
            self._gone()

    async def request(self, method: str, target: str, headers: Iterable[tuple[str, str]],
                      body: AsyncIterator[bytes] | None = None, length: int | None = None) -> UpstreamResponse:
        """Send one request and read the head of its answer.

        `headers` go as given (add Host to them, or the pool's address is sent). A body is
        `length` bytes (Content-Length) or, with `length` None, sent chunked. Raises
        UpstreamUnreachable, UpstreamTimeout, UpstreamProtocolError (502/504 material) or
        BodyError (the client's body broke off); the connection is closed in each case.
        """
        lines = [f"{method} {target} HTTP/1.1\r\n"]
        has_host = False
        for name, value in headers:
            if not has_host and name.lower() == "host":
                has_host = True
            lines.append(f"{name}: {value}\r\n")
        if not has_host:
            lines.append(f"Host: {self.default_host}\r\n")
        if body is not None:
            lines.append(f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n")
        elif method in _LENGTH_ZERO_METHODS:
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        text = "".join(lines)
        if text.count("\n") != len(lines) or text.count("\r") != len(lines):
            raise ValueError("a header name or value holds a line break")  # the server's parser never lets one in
        head = text.encode("utf-8", "surrogateescape")
        retry = body is None and method in _NO_BODY_RETRY
        while True:
            conn, reused = await self._acquire()
            try:
                return await self._exchange(conn, head, method, body, length)
            except UpstreamUnreachable:
                self._release(conn, False)
                if reused and retry and not conn.buffer:
                    retry = False
                    continue  # the upstream closed an idle connection as we used it: once more, on a fresh one
                raise
            except BaseException:
                self._release(conn, False)
                raise

    async def _exchange(self, conn: _Connection, head: bytes, method: str, body: AsyncIterator[bytes] | None,
                        length: int | None) -> UpstreamResponse:
        if body is None:
            conn.write(head)
        else:
            await self._send_body(conn, head, body, length)
        buffer = conn.buffer
        searched = 0
        while True:
            end = buffer.find(b"\r\n\r\n", searched)
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    raise UpstreamProtocolError("the response head is too large")
                if conn.eof:
                    if buffer:
                        raise UpstreamProtocolError("the upstream closed the connection mid-head")
                    raise UpstreamUnreachable("the upstream closed the connection without answering")
                searched = max(0, len(buffer) - 3)
                await conn.wait_data()
                continue
            raw = conn.take(end + 4)[:-4]
            status, reason, version, headers, mode, length_left, keep_alive = _parse_head(raw, method)
            if status < 200:
                if status == 101:
                    raise UpstreamProtocolError("the upstream switched protocols on a plain request")
                searched = 0
                continue  # an interim answer (103 Early Hints): the final one follows
            return UpstreamResponse(self, conn, status, reason, version, headers, mode, length_left, keep_alive)

    @staticmethod
    async def _send_body(conn: _Connection, head: bytes, body: AsyncIterator[bytes], length: int | None) -> None:
        sent = 0
        chunked = length is None
        pending = head
        try:
            async for data in body:
                if not data:
                    continue
                sent += len(data)
                if not chunked and sent > length:  # type: ignore[operator]
                    raise BodyError("the request body is longer than its Content-Length")
                if chunked:
                    data = b"%x\r\n%b\r\n" % (len(data), data)
                if pending:
                    conn.write(pending + data)
                    pending = b""
                else:
                    conn.write(data)
                await conn.drain()
        except (UpstreamError, BodyError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - whatever broke the client's body, it is that body's fault
            raise BodyError(f"the request body could not be read: {exc.__class__.__name__}") from exc
        if not chunked and sent != length:
            raise BodyError("the request body ended before its Content-Length")
        end = b"0\r\n\r\n" if chunked else b""
        if pending or end:
            conn.write(pending + end)
