"""The shortcuts into dependencies' internals, each behind one small interface with a public-API
fallback beside it, and the startup self-tests that pick between them.

Twice a release of a dependency changed its private internals under the hot path. So every
shortcut here has a mode that uses only the public API, a self-test that runs the shortcut for
real at startup, and a flag that forces either mode:

- **upstream body** (`--upstream-body auto|push|pull`): `push` turns aiohttp's body reader
  inside out, so each piece of body its HTTP parser decodes goes straight into the relay in the
  same callback (`PushReader`: a class swap that relies on the reader's slot layout, on
  `feed_data`, `feed_eof`, `set_exception` and `total_bytes`, and on pausing the connection's
  protocol); `pull` reads `resp.content.iter_any()` in the relay's task, and a relay whose
  socket is behind simply stops reading (aiohttp's own buffer limit then pauses the socket).
- **client frames** (`--client-frames auto|fast|standard`): `fast` parses whole, unfragmented
  client frames in the gateway itself when websockets' parser is at a frame boundary, which it
  learns by walking the parser's generators (`at_frame_boundary`); `standard` gives every byte
  to websockets' `receive_data`.

`auto` runs the self-test and takes the fast mode only when it passes; otherwise it logs why and
takes the fallback. The modes in force are logged (`gateway.seams`) and exported
(`gateway_seam_mode`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import aiohttp
from websockets.frames import Frame
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader as WsStreamReader

# ------------------------------------------------------------------ upstream body: push


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


# ------------------------------------------------------------------ client frames: fast path

#: Where websockets' frame parser waits when it is at a frame boundary with nothing buffered.
_AT_EOF: Final = WsStreamReader.at_eof.__code__


def at_frame_boundary(protocol: ServerProtocol) -> bool:
    """Whether websockets' parser waits for the first byte of a frame, with nothing buffered:
    its innermost generator is then `StreamReader.at_eof()`, at the top of its frame loop.
    If websockets' internals change, this is never true and every frame goes its way."""
    gen: Any = protocol.parser
    while True:
        inner = getattr(gen, "gi_yieldfrom", None)
        if inner is None:
            return getattr(gen, "gi_code", None) is _AT_EOF
        gen = inner


_UPGRADE: Final = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def frames_self_test(boundary: Callable[[ServerProtocol], bool] = at_frame_boundary) -> str | None:
    """Drive a websockets server protocol through a handshake and a frame cut in two: the
    boundary check must say yes when idle, no in the middle of a frame, yes after it. None
    when it does, else what it said."""
    try:
        protocol = ServerProtocol()
        protocol.receive_data(_UPGRADE)
        [request] = protocol.events_received()
        assert isinstance(request, Request)
        protocol.send_response(protocol.accept(request))
        if protocol.state is not State.OPEN:
            return "the self-test's handshake failed"
        if not boundary(protocol):
            return "the parser is not seen at a frame boundary when idle"
        frame = b"\x81\x82k3y!" + bytes(a ^ b for a, b in zip(b"{}", b"k3", strict=True))
        protocol.receive_data(frame[:3])
        if boundary(protocol):
            return "the parser is seen at a frame boundary in the middle of a frame"
        protocol.receive_data(frame[3:])
        events = protocol.events_received()
        if not (len(events) == 1 and isinstance(events[0], Frame) and events[0].data == b"{}"):
            return f"the frame was parsed as {events!r}"
        if not boundary(protocol):
            return "the parser is not seen at a frame boundary after a frame"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------ choosing


@dataclass(frozen=True)
class Modes:
    """The mode of each seam in force, and why `auto` fell back where it did."""

    upstream_body: str
    client_frames: str
    fallbacks: dict[str, str] = field(default_factory=dict)


async def choose(upstream_body: str, client_frames: str) -> Modes:
    """Resolve `auto` by running the self-tests; forced modes are taken as they are."""
    fallbacks: dict[str, str] = {}
    if upstream_body == "auto":
        problem = await push_self_test()
        upstream_body = "push" if problem is None else "pull"
        if problem is not None:
            fallbacks["upstream_body"] = problem
    if client_frames == "auto":
        problem = frames_self_test()
        client_frames = "fast" if problem is None else "standard"
        if problem is not None:
            fallbacks["client_frames"] = problem
    return Modes(upstream_body, client_frames, fallbacks)
