"""The upstream-body seam: aiohttp pushes each piece of body into the relay (`PushReader`, a
class swap onto aiohttp's private reader layout), with its self-test. The public-API fallback,
pull mode, is `_BodyFeed.pull` in gateway/io/upstream.py (`resp.content.iter_any()`)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final, Protocol

import aiohttp


class BodySink(Protocol):
    """Where a pushed body goes (upstream._BodyFeed)."""

    def data(self, data: bytes) -> None: ...

    def eof(self) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


#: Upstream bodies being relayed by push: aiohttp's StreamReader -> its sink.
FEEDS: Final[dict[aiohttp.StreamReader, BodySink]] = {}


class PushReader(aiohttp.StreamReader):
    """aiohttp's body StreamReader, turned inside out for the relay's hot path.

    While a sink is attached, every piece of body aiohttp's HTTP parser decodes goes straight
    into it in the same callback: no buffer, no future and no task switch per upstream read. A
    sink attaches by assigning `__class__` (this class adds no slots, so the layout is
    aiohttp's) and detaches by assigning it back; EOF, errors, pooling and pausing stay
    aiohttp's own code.
    """

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        sink = FEEDS.get(self)
        if sink is None:
            return super().feed_data(data, size)
        self.total_bytes += len(data)
        sink.data(data)
        return False  # no more decompressed data pending

    def end_http_chunk_receiving(self) -> None:
        # Chunk boundaries are kept for readchunk(), which nothing calls while a sink is
        # attached; aiohttp would otherwise pause reading after 128 unread boundaries.
        if self not in FEEDS:
            super().end_http_chunk_receiving()

    def feed_eof(self) -> None:
        super().feed_eof()
        sink = FEEDS.get(self)
        if sink is not None:
            sink.eof()

    def set_exception(self, exc: BaseException, exc_cause: BaseException | None = None) -> None:
        if exc_cause is None:
            super().set_exception(exc)
        else:
            super().set_exception(exc, exc_cause)
        sink = FEEDS.get(self)
        if sink is not None:
            sink.fail(exc)


def attach_push(content: aiohttp.StreamReader, sink: BodySink) -> None:
    """From now on aiohttp pushes `content`'s body into `sink` (push mode only)."""
    FEEDS[content] = sink
    try:
        content.__class__ = PushReader
    except TypeError:
        del FEEDS[content]
        raise


def detach_push(content: aiohttp.StreamReader) -> None:
    """`content` is an ordinary StreamReader again (a no-op if it was not attached)."""
    if FEEDS.pop(content, None) is not None:
        content.__class__ = aiohttp.StreamReader


def set_reading(resp: aiohttp.ClientResponse, on: bool) -> None:
    """Pause or resume reading an upstream connection (push mode: the relay stops taking
    the body; gone once the connection is released)."""
    connection = resp.connection
    protocol = connection.protocol if connection is not None else None
    if protocol is not None:
        if on:
            protocol.resume_reading()  # may feed more body right away
        else:
            protocol.pause_reading()


def pool_idle(connector: aiohttp.BaseConnector | None) -> int:
    """Idle keep-alive connections in the connector's pool (each holds a file descriptor).
    aiohttp keeps no public count: read its pool, or say 0 where it has none."""
    conns = getattr(connector, "_conns", None)
    if not isinstance(conns, dict):
        return 0
    return sum(len(c) for c in conns.values())


class _Recorder:
    """The self-test's sink: keeps the body and, like a relay whose socket falls behind,
    pauses the connection from inside the first push and resumes it a loop turn later."""

    def __init__(self) -> None:
        self.body = b""
        self.error: BaseException | None = None
        self.over = asyncio.Event()
        self.resp: aiohttp.ClientResponse | None = None

    def data(self, data: bytes) -> None:
        self.body += data
        resp, self.resp = self.resp, None
        if resp is not None:
            set_reading(resp, False)
            asyncio.get_running_loop().call_soon(set_reading, resp, True)

    def eof(self) -> None:
        self.over.set()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.over.set()


#: The self-test's body: chunked, in two writes, so it goes through the parser's chunk path.
_SELF_TEST_CHUNKS: Final = (b"data: one\n\n", b"data: two\n\n")


async def push_self_test() -> str | None:
    """Relay a real chunked response over loopback in push mode, with a pause and a resume in
    the middle (as flow control does); None when every piece arrived and the end was seen,
    else what went wrong."""
    sent = asyncio.Event()
    resume = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            for chunk in _SELF_TEST_CHUNKS:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
                sent.set()
                await resume.wait()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    recorder = _Recorder()
    try:
        async with (
            asyncio.timeout(5),
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/") as resp,
        ):
            content = resp.content
            await sent.wait()
            attach_push(content, recorder)
            try:
                recorder.data(content.read_nowait())
                recorder.resp = resp
                resume.set()
                await recorder.over.wait()
            finally:
                detach_push(content)
            if type(content) is not aiohttp.StreamReader:
                return "the reader did not detach"
    except Exception as exc:  # any failure at all means: do not use push
        return f"{type(exc).__name__}: {exc}"
    finally:
        resume.set()
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
    if recorder.error is not None:
        return f"the body failed: {recorder.error!r}"
    if recorder.body != b"".join(_SELF_TEST_CHUNKS):
        return f"the body arrived as {recorder.body!r}"
    return None
