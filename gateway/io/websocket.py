"""Client sockets: one asyncio Protocol per TCP connection, on websockets' sans-I/O protocol.

websockets' `ServerProtocol` does all of RFC 6455 here: the opening handshake's checks, frame
parsing and masking, size limits, permessage-deflate, pings' pongs and the closing handshake.
This module does only the I/O around it. Why not websockets' asyncio server: it gives every
socket a handler task, a keepalive task, a message assembler (two deques and futures) and an
object dict, close to half of an idle socket's memory (docs/performance.md), and a task switch
per client frame. Here a client frame is handled in `data_received` itself (a `cancel` closes
its upstream in the same callback), and one `Keepalive` pings every socket from a timer wheel.

`WebSocket` calls its `Handler` (gateway/io/connection.py) back; the `Listener` owns the listening
socket and the sockets still in their handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from http import HTTPStatus
from typing import Final, Protocol, cast

import structlog
from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from gateway.core.clock import Clock, Timer

try:
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask as _apply_mask

from gateway.io.http import is_http_request
from gateway.io.seams import at_frame_boundary, forget_parser_error

log = structlog.get_logger("gateway.websocket")

OPEN: Final = State.OPEN
_TEXT: Final = Opcode.TEXT
_BINARY: Final = Opcode.BINARY
_CONT: Final = Opcode.CONT
_PONG: Final = Opcode.PONG
#: The transport's high-water mark (websockets' default): above it, `paused` is set and the
#: writer waits for the client (connection.py).
WRITE_LIMIT: Final = 1 << 15
#: The keepalive wheel: every socket is pinged once per interval, one slot per tick.
KEEPALIVE_SLOTS: Final = 16
#: SO_LINGER on, 0 s: close() resets the connection and discards what the client has not read.
_RESET: Final = struct.pack("ii", 1, 0)
#: Unmasked final text frame headers for payloads under 126 bytes (most tokens).
_SHORT_HEADERS: Final = tuple(bytes((0x81, size)) for size in range(126))


def text_frames(messages: list[bytes]) -> bytes:
    """`messages` (UTF-8 JSON) as consecutive unmasked, final WebSocket text frames, the way
    a server without extensions sends them (RFC 6455, 5.2: FIN, opcode 1, no mask)."""
    parts: list[bytes] = []
    append = parts.append
    for message in messages:
        size = len(message)
        if size < 126:
            append(_SHORT_HEADERS[size])
        elif size < 65536:
            append(b"\x81\x7e" + size.to_bytes(2, "big"))
        else:
            append(b"\x81\x7f" + size.to_bytes(8, "big"))
        append(message)
    return b"".join(parts)


class Handler(Protocol):
    """What an open socket calls back (gateway/io/connection.py's Connection)."""

    def on_message(self, data: str | bytes) -> None:
        """One whole client message: str for a text message, bytes for a binary one."""

    def on_close(self) -> None:
        """The TCP connection is gone (after a closing handshake or not)."""


class WebSocket(asyncio.Protocol):
    """One client TCP connection: the opening handshake, then frames in and out."""

    # One per socket, 20,000 per process.
    __slots__ = (
        "_fragments",
        "_fragments_text",
        "_head",
        "_sniff",
        "_timer",
        "_writable",
        "handler",
        "listener",
        "paused",
        "ping_data",
        "protocol",
        "slot",
        "transport",
    )

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.protocol = ServerProtocol(
            extensions=listener.extensions,
            max_size=listener.max_size,
            logger=listener.ws_logger,
        )
        self.transport: asyncio.Transport | None = None
        #: The Connection once the handshake succeeded.
        self.handler: Handler | None = None
        #: The transport's buffer is over its high-water mark (the client is behind).
        self.paused = False
        self._writable: asyncio.Future[None] | None = None
        #: The handshake deadline, then the closing handshake's deadline.
        self._timer: Timer | None = None
        self._fragments: bytearray | None = None
        self._fragments_text = False
        #: Until the request's headers have ended: the last bytes seen (their end may be split
        #: across reads); None afterwards.
        self._head: bytes | None = b""
        #: Until the request line is in: the bytes received, to tell a WebSocket upgrade from
        #: a plain HTTP request for gateway/io/http.py (None once told).
        self._sniff: bytes | None = b"" if listener.on_http is not None else None
        #: The keepalive ping awaiting its pong (None: none outstanding).
        self.ping_data: bytes | None = None
        #: This socket's slot in the keepalive wheel (-1: not in it).
        self.slot = -1

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_LIMIT)
        listener = self.listener
        if listener.closing:
            self.abort()
            return
        listener.handshaking[self] = None
        self._timer = listener.clock.call_later(listener.open_timeout, self.abort)

    def data_received(self, data: bytes) -> None:
        if self._sniff is not None:
            sniff = self._sniff + data
            verdict = is_http_request(sniff)
            if verdict is None:
                self._sniff = sniff
                return
            self._sniff = None
            if verdict:
                self._divert(sniff)
                return
            data = sniff
        if self._head is not None:
            # Still in the opening handshake. websockets would parse frames pipelined behind
            # the request at once, and queue their answers (a pong, a close) before our
            # response: give it the request alone, answer it, then the rest.
            head = self._head + data
            end = head.find(b"\r\n\r\n")
            if end == -1:
                self._head = head[-3:]
                self._receive(data)
                return
            self._head = None
            cut = end + 4 - (len(head) - len(data))
            self._receive(data[:cut])
            if cut < len(data) and self.protocol.state is OPEN:
                self._receive(data[cut:])
            return
        self._receive(data)

    def _receive(self, data: bytes) -> None:
        protocol = self.protocol
        if (
            protocol.state is OPEN
            and self._fragments is None  # RFC 6455, 5.4: a fragmented message is going on
            and self.listener.fast_frames
            and not protocol.extensions
            and not protocol.debug
            and at_frame_boundary(protocol)
        ):
            data = self._data_frames(data)
            if not data:
                return
        protocol.receive_data(data)
        events = protocol.events_received()
        self._send_data()  # pongs and close replies that websockets queued itself
        transport = self.transport
        assert transport is not None
        if self.paused and transport.get_write_buffer_size() > self.listener.max_buffer:
            # A client that sends pings but reads nothing would have us buffer its pongs
            # without end: its own frames are flow-controlled, these are not.
            log.warning(
                "socket.write_buffer_overflow",
                peer=self.peer,
                buffered=transport.get_write_buffer_size(),
            )
            self.abort()
            return
        for event in events:
            if type(event) is Frame:
                self._frame(event)
            else:
                assert isinstance(event, Request)
                self._request(event)
        if protocol.close_expected():
            self._expect_close()

    def _divert(self, received: bytes) -> None:
        """Not a WebSocket: the connection becomes an HTTP exchange (gateway/io/http.py), with
        what it sent so far."""
        listener = self.listener
        listener.handshaking.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport, self.transport = self.transport, None
        assert transport is not None
        assert listener.on_http is not None
        listener.on_http(transport, received)

    def eof_received(self) -> None:
        # WebSockets close with a closing handshake; after EOF nothing more is written, so
        # returning None lets asyncio close the transport.
        self.protocol.receive_eof()
        self.protocol.events_received()
        self._send_data()

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()  # idempotent: the state is CLOSED now
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        listener = self.listener
        listener.handshaking.pop(self, None)
        listener.keepalive.remove(self)
        self._wake_writer()
        self._fragments = None
        forget_parser_error(self.protocol)  # a reference cycle per hostile socket otherwise
        handler, self.handler = self.handler, None
        if handler is not None:
            # In the gateway's context: a connection_lost is scheduled by whatever noticed the
            # loss, maybe a relay's write, whose log bindings are not this socket's.
            try:
                listener.context.copy().run(handler.on_close)
            finally:
                listener.on_closed(handler)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_writer()

    # ------------------------------------------------------------------ what the gateway calls

    @property
    def open(self) -> bool:
        """Whether frames can still be sent (handshake done, no close sent or received, the
        connection not being aborted)."""
        transport = self.transport
        return self.protocol.state is OPEN and transport is not None and not transport.is_closing()

    @property
    def close_rcvd(self) -> bool:
        """Whether the client sent a close frame (else a drop: network loss, timeout, abort)."""
        return self.protocol.close_rcvd is not None

    @property
    def close_code(self) -> int | None:
        """The close code the client sent; 1006 when it sent none; None while open."""
        return self.protocol.close_code

    @property
    def peer(self) -> str:
        """`host:port` of the client, or "?"."""
        try:
            assert self.transport is not None
            host, port = self.transport.get_extra_info("peername")[:2]
        except (AssertionError, TypeError, ValueError):
            return "?"
        return f"{host}:{port}"

    def write_frames(self, messages: list[bytes]) -> None:
        """Send `messages` as text frames in one write (one syscall for the batch), or drop them
        when the socket is no longer `open`, as everything written to a closed socket is.

        Without extensions the frames are built here directly (text_frames); with
        permessage-deflate websockets frames them, since it owns the compression context.
        Whole frames only, so keepalive pings and a close interleave safely. The openness check
        is `open`'s, inlined: this runs once per flush (the hot path)."""
        protocol = self.protocol
        transport = self.transport
        if protocol.state is not OPEN or transport is None or transport.is_closing():
            return
        if protocol.extensions:
            send_text = protocol.send_text
            for message in messages:
                send_text(message)
            self._send_data()
            return
        if len(messages) == 1:
            # The usual batch, one token of one stream: its header and payload, no list.
            message = messages[0]
            size = len(message)
            if size < 126:
                transport.write(_SHORT_HEADERS[size] + message)
                return
        transport.write(text_frames(messages))

    async def wait_writable(self) -> None:
        """Return once the client has read enough that writing may go on (or the socket is
        gone)."""
        if not self.paused or self.transport is None or self.transport.is_closing():
            return
        if self._writable is None:
            self._writable = self.listener.loop.create_future()
        await asyncio.shield(self._writable)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake behind everything written so far; the connection is
        aborted if the client has not finished it within --close-timeout."""
        if self.protocol.state is OPEN:
            self.protocol.send_close(code, reason)
            self._send_data()
            self._expect_close()
        elif self.handler is None:  # still in the handshake
            self.abort()

    def fail(self, code: int, reason: str) -> None:
        """Close at once with `code` after a protocol problem (websockets' fail)."""
        if self.protocol.state is OPEN:
            self.protocol.fail(code, reason)
            self._send_data()
            self._expect_close()

    def abort(self) -> None:
        """Drop the TCP connection now, with a reset (no closing handshake).

        We only abort a client we gave up on (no close answer within --close-timeout, a stalled
        handshake, an overflowing buffer). A plain close would hand what it has not read (up to
        the kernel's send buffer, 4 MiB) to an orphaned socket that keeps retrying it for
        minutes; the reset frees it at once, and the client learns the connection is gone."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        transport.abort()

    def ping(self, data: bytes) -> None:
        """Send a keepalive ping (called by Keepalive)."""
        if self.open:
            self.ping_data = data
            self.protocol.send_ping(data)
            self._send_data()

    # ------------------------------------------------------------------ internals

    def _send_data(self) -> None:
        transport = self.transport
        assert transport is not None
        for data in self.protocol.data_to_send():
            if transport.is_closing():
                return
            if data:
                transport.write(data)
            elif transport.can_write_eof():  # half-close once our side is done (not TLS)
                try:
                    transport.write_eof()
                except (OSError, RuntimeError):  # uvloop raises RuntimeError when closed
                    transport.abort()
            else:
                transport.close()

    def _expect_close(self) -> None:
        """The connection should end soon: abort it after --close-timeout if it has not."""
        if self._timer is None:
            listener = self.listener
            self._timer = listener.clock.call_later(listener.close_timeout, self.abort)

    def _wake_writer(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _request(self, request: Request) -> None:
        """The opening handshake's request: an HTTP route, a refusal, or the upgrade."""
        listener = self.listener
        protocol = self.protocol
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        listener.handshaking.pop(self, None)
        try:
            response = listener.process_request(self, request)
            if response is None and _other_version(request):
                # RFC 6455, 4.2.2 and 4.4: name the version we speak, so the client can retry.
                response = protocol.reject(
                    HTTPStatus.UPGRADE_REQUIRED, "Unsupported Sec-WebSocket-Version; use 13.\n"
                )
                response.headers["Sec-WebSocket-Version"] = "13"
            if response is None:
                response = protocol.accept(request)
                if response.status_code == 101 and listener.closing:
                    response = protocol.reject(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
        except Exception:
            log.exception("websocket.process_request_failed")
            response = protocol.reject(
                HTTPStatus.INTERNAL_SERVER_ERROR, "Failed to open a WebSocket connection.\n"
            )
        protocol.send_response(response)
        self._send_data()
        # Nothing reads the handshake's headers again, and the parser's frame would keep them
        # (about 2 KiB) for the socket's life.
        request.headers.clear()
        response.headers.clear()
        if protocol.state is OPEN:
            try:
                self.handler = listener.on_open(self)
            except Exception:
                log.exception("websocket.open_failed")
                self.fail(1011, "")
                return
            listener.keepalive.add(self)
        else:
            listener.on_reject(self)
            self._expect_close()

    def _frame(self, frame: Frame) -> None:
        """One data or control frame from the client; whole messages go to the handler."""
        opcode = frame.opcode
        if opcode is _TEXT or opcode is _BINARY:
            if not frame.fin:
                self._fragments = bytearray(frame.data)
                self._fragments_text = opcode is _TEXT
                return
            self._message(frame.data, opcode is _TEXT)
        elif opcode is _CONT:
            # websockets checks that a continuation follows a start, and the whole message's
            # size against max_size; a bytearray keeps a many-fragment message compact.
            fragments = self._fragments
            assert fragments is not None
            fragments += frame.data
            if frame.fin:
                self._fragments = None
                self._message(bytes(fragments), self._fragments_text)
        elif opcode is _PONG and self.ping_data is not None and frame.data == self.ping_data:
            self.ping_data = None
            self.listener.keepalive.answered(self)

    def _data_frames(self, data: bytes) -> bytes:
        """Deliver the whole, unfragmented, masked text and binary frames at the head of
        `data`, which starts at a frame boundary (RFC 6455, 5.2), and return the rest.

        The fast path for client messages: websockets' parser (a generator per frame, a Frame
        object, an event list) is a measurable part of a start's time to first chunk
        (docs/performance.md).
        Anything else (control frames, fragments, a 64-bit length, over max_size, a partial
        frame) stays websockets' to parse, from a frame boundary as it expects, so its checks
        and errors are unchanged.
        """
        protocol = self.protocol
        # The limit websockets was given (a message limit, no fragment limit): the listener's,
        # not read back from websockets, whose attribute names differ between releases.
        limit = self.listener.max_size
        size = len(data)
        at = 0
        while size - at >= 6:
            first, second = data[at], data[at + 1]
            # FIN set, RSV1-3 clear, opcode text (1) or binary (2); MASK set.
            if first not in (0x81, 0x82) or second < 0x80:
                break
            length = second & 0x7F
            head = at + 2
            if length == 126:
                length = int.from_bytes(data[head : head + 2], "big")
                head += 2
            elif length == 127:
                break
            start = head + 4
            end = start + length
            if end > size or (limit is not None and length > limit):
                break
            at = end
            self._message(_apply_mask(data[start:end], data[head:start]), first == 0x81)
            if protocol.state is not OPEN:
                break  # closed by the handler: the rest is websockets' to discard
        return data[at:] if at else data

    def _message(self, data: bytes | bytearray | memoryview, text: bool) -> None:
        handler = self.handler
        if handler is None or self.protocol.state is not OPEN:
            return  # after a close, frames still in flight are discarded
        raw = bytes(data)  # no copy when it is bytes already
        message: str | bytes = raw
        if text:
            try:
                message = raw.decode()
            except UnicodeDecodeError as exc:
                self.fail(1007, f"{exc.reason} at position {exc.start}")
                return
        try:
            handler.on_message(message)
        except Exception:
            log.exception("websocket.handler_failed")
            self.fail(1011, "")


def _other_version(request: Request) -> bool:
    """An upgrade request for a WebSocket version other than 13 (the only one, RFC 6455)."""
    versions = request.headers.get_all("Sec-WebSocket-Version")
    return bool(versions) and versions != ["13"]


class Keepalive:
    """Pings every open socket once per --ping-interval from one timer, and closes with 1011
    those whose pong has not come within --ping-timeout.

    Sockets sit in a wheel of KEEPALIVE_SLOTS slots; each tick pings one slot. So the pings
    are spread over the interval (20,000 sockets: a few hundred per tick, not a burst), and a
    socket costs a dict entry instead of a task, a coroutine and a sleeping future.
    """

    def __init__(self, clock: Clock, interval: float, timeout: float) -> None:
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self.tick = interval / KEEPALIVE_SLOTS
        self.slots: list[dict[WebSocket, None]] = [{} for _ in range(KEEPALIVE_SLOTS)]
        self.index = 0
        #: Sockets pinged whose pong has not come yet: when the ping went out.
        self.waiting: dict[WebSocket, float] = {}
        self._timer: Timer | None = None
        self._count = 0
        self.sockets = 0

    def add(self, ws: WebSocket) -> None:
        """Start pinging `ws`: its first ping goes out about one interval from now."""
        if not self.interval:
            return
        ws.slot = (self.index - 1) % KEEPALIVE_SLOTS
        self.slots[ws.slot][ws] = None
        self.sockets += 1
        if self._timer is None:
            self._timer = self.clock.call_later(self.tick, self._tick)

    def remove(self, ws: WebSocket) -> None:
        if ws.slot >= 0:
            del self.slots[ws.slot][ws]
            ws.slot = -1
            self.sockets -= 1
        self.waiting.pop(ws, None)

    def answered(self, ws: WebSocket) -> None:
        self.waiting.pop(ws, None)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        now = self.clock.now()
        if self.waiting:
            late = [ws for ws, sent in self.waiting.items() if now - sent >= self.timeout]
            for ws in late:
                del self.waiting[ws]
                ws.fail(1011, "keepalive ping timeout")
        slot = self.slots[self.index]
        self.index = (self.index + 1) % KEEPALIVE_SLOTS
        if slot:
            self._count += 1
            data = struct.pack("!I", self._count & 0xFFFFFFFF)
            waiting = self.waiting
            for ws in slot:
                if ws not in waiting:
                    ws.ping(data)
                    waiting[ws] = now
        self._timer = (
            self.clock.call_later(self.tick, self._tick) if self.sockets or self.waiting else None
        )


class Listener:
    """The listening socket and the sockets still in their opening handshake.

    `process_request(ws, request)` answers a request (None: accept the upgrade); `on_open(ws)`
    returns the open socket's Handler; `on_reject(ws)` says a handshake ended without one;
    `on_closed(handler)` follows an open socket's `on_close`.
    """

    def __init__(
        self,
        *,
        process_request: Callable[[WebSocket, Request], Response | None],
        on_open: Callable[[WebSocket], Handler],
        on_reject: Callable[[WebSocket], None],
        on_closed: Callable[[Handler], None],
        context: contextvars.Context,
        max_size: int,
        max_buffer: int,
        compression: bool,
        open_timeout: float,
        close_timeout: float,
        ping_interval: float,
        ping_timeout: float,
        clock: Clock,
        on_http: Callable[[asyncio.Transport, bytes], None] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        #: Takes a connection whose request is plain HTTP (gateway/io/http.py), with the bytes
        #: it sent so far; None: every connection is a WebSocket's.
        self.on_http = on_http
        self.clock = clock
        self.process_request = process_request
        self.on_open = on_open
        self.on_reject = on_reject
        self.on_closed = on_closed
        self.context = context
        self.max_size = max_size
        #: A socket whose unsent bytes exceed this while its client sends (pings, say) and
        #: reads nothing is dropped: see data_received.
        self.max_buffer = max_buffer
        # Off by default (--compression): tiny token frames gain little and every socket
        # would pay about 40 KiB of zlib state (STYLE.md).
        self.extensions = enable_server_permessage_deflate(None) if compression else None
        #: Whole client frames are parsed by the gateway itself (--client-frames; the server
        #: sets it from the self-test's verdict, gateway/io/seams/).
        self.fast_frames = True
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self.keepalive = Keepalive(clock, ping_interval, ping_timeout)
        self.ws_logger = logging.getLogger("websockets.server")
        #: Sockets accepted whose handshake has not finished (stop() aborts them).
        self.handshaking: dict[WebSocket, None] = {}
        #: Set once listening stopped: late accepts are dropped.
        self.closing = False
        self.server: asyncio.Server | None = None

    async def start(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None, reuse_port: bool
    ) -> None:
        self.server = await self.loop.create_server(
            lambda: WebSocket(self),
            host,
            port,
            ssl=ssl_context,
            reuse_port=reuse_port or None,
            # A connect burst (clients reconnecting after a deploy) queues in the kernel
            # instead of being refused; the kernel caps it at net.core.somaxconn.
            backlog=4096,
        )

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets."""
        return list(self.server.sockets) if self.server is not None else []

    def close(self) -> None:
        """Stop listening; connections accepted from now on are dropped."""
        self.closing = True
        if self.server is not None:
            self.server.close()

    def abort_handshakes(self) -> None:
        """Drop every socket still in its opening handshake (stop(): nothing waits for a
        client that never sends its request)."""
        for ws in list(self.handshaking):
            ws.abort()
        self.handshaking.clear()
