"""Plain HTTP on the WebSocket port: one request per connection, parsed with h11.

The listener's sockets start as `WebSocket`s; a connection whose request is not a WebSocket
upgrade of ours (a `POST`, `DELETE` or `OPTIONS`, or a `GET` of `/v1/streams/...`) is handed
over here with the bytes read so far (`WebSocket._sniff`). `HttpExchange` reads the request and
its body (bounded), calls the gateway's HTTP handler once, and writes its answer: a whole
response, or a streamed one (SSE, chunked) written synchronously like a WebSocket's frames,
with the transport's pause/resume as backpressure. The connection closes after the answer
(`Connection: close`): a stream's response is long-lived anyway, and a request that is not for
this shell (`GET /healthz`, say) must reach the WebSocket side's plain-HTTP answers, which a
kept-alive connection would not.

`SseSocket` adapts a streamed response to what `gateway.io.connection.Connection` writes to:
protocol messages become SSE events (`event:` the message type, `id:` its seq, `data:` the
JSON), so an HTTP stream runs on the same session, outbox, flow control, resume and drain as a
WebSocket's (docs/protocol.md, "HTTP streams").
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, Protocol

import h11
import orjson
import structlog

from gateway.core.ai_sdk import UiStream
from gateway.core.clock import Clock, Timer
from gateway.core.protocol import ErrorCode

if TYPE_CHECKING:
    from gateway.io.connection import Connection

log = structlog.get_logger("gateway.http")

#: Largest request head (request line and headers) accepted.
MAX_HEAD_BYTES: Final = 16 * 1024
_RESET: Final = struct.pack("ii", 1, 0)
#: The paths a `GET` is an HTTP-stream request on (every other GET is the WebSocket side's).
HTTP_GET_PREFIXES: Final = (b"/v1/streams/", b"/v1/ai-sdk/", b"/v1/usage")
_HTTP_METHODS: Final = (b"POST", b"DELETE", b"OPTIONS", b"PUT", b"PATCH", b"HEAD")


def is_http_request(head: bytes) -> bool | None:
    """Whether a connection's first bytes are a request for this shell (None: too few bytes to
    tell yet). Only the request line is looked at."""
    end = head.find(b"\n")
    if end < 0:
        return None if len(head) < MAX_HEAD_BYTES else True
    method, _, rest = head[:end].partition(b" ")
    if method in _HTTP_METHODS:
        return True
    return method == b"GET" and rest.startswith(HTTP_GET_PREFIXES)


class HttpRequest:
    """What the handler gets: method, path (without the query), query string, headers
    (lower-case names; repeated ones joined with ", ") and the body."""

    __slots__ = ("body", "headers", "method", "path", "query")

    def __init__(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path, _, self.query = target.partition("?")
        self.headers = headers
        self.body = body


class HttpHandler(Protocol):
    """The gateway's side: answers one request on `exchange` (now or later)."""

    def __call__(self, exchange: HttpExchange, request: HttpRequest) -> None: ...


class HttpExchange(asyncio.Protocol):
    """One HTTP connection: its request, then its response (whole or streamed)."""

    __slots__ = (
        "_answering",
        "_body",
        "_conn",
        "_handler",
        "_max_body",
        "_request",
        "_timer",
        "_writable",
        "clock",
        "on_lost",
        "paused",
        "peer",
        "transport",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        handler: HttpHandler,
        clock: Clock,
        max_body: int,
        open_timeout: float,
    ) -> None:
        self.transport = transport
        self._handler = handler
        self.clock = clock
        self._max_body = max_body
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._request: h11.Request | None = None
        self._body = bytearray()
        #: The request is being answered: anything the client sends after it is not read.
        self._answering = False
        self.paused = False
        self._writable: asyncio.Future[None] | None = None
        #: Called once when the current response ends, or the connection is lost before it
        #: did (a streamed response's owner).
        self.on_lost: Callable[[], None] | None = None
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        #: Until the request is complete: the rest of the open timeout.
        self._timer: Timer | None = clock.call_later(open_timeout, self.abort)

    # ------------------------------------------------------------------ asyncio callbacks

    def data_received(self, data: bytes) -> None:
        try:
            self._conn.receive_data(data)
        except h11.RemoteProtocolError as exc:
            self._refuse(HTTPStatus.BAD_REQUEST, ErrorCode.BAD_MESSAGE, f"bad HTTP request: {exc}")
            return
        self._next_events()

    def _next_events(self) -> None:
        """Read the next request (and its body) from what h11 holds; dispatch it once whole.
        While a response is being written, a pipelined request waits (h11's PAUSED)."""
        if self._answering:
            return
        try:
            while True:
                event = self._conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Request):
                    self._request = event
                elif isinstance(event, h11.Data):
                    if len(self._body) + len(event.data) > self._max_body:
                        self._refuse(
                            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            ErrorCode.MESSAGE_TOO_LARGE,
                            f"the body is over {self._max_body} bytes",
                        )
                        return
                    self._body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    self._dispatch()
                    return
                else:  # ConnectionClosed: the client is done with this connection
                    self.close()
                    return
        except h11.RemoteProtocolError as exc:
            self._refuse(HTTPStatus.BAD_REQUEST, ErrorCode.BAD_MESSAGE, f"bad HTTP request: {exc}")

    def eof_received(self) -> bool:
        return False  # close the transport (a half-closed client is gone for our purposes)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ answering

    @property
    def closing(self) -> bool:
        return self.transport.is_closing()

    async def wait_writable(self) -> None:
        """Wait until the client has taken what was written (or the connection is gone)."""
        while self.paused and not self.transport.is_closing():
            if self._writable is None:
                self._writable = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._writable)

    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        """A whole response."""
        self.begin(status, [*headers, ("Content-Length", str(len(body)))])
        if body:
            self.send(body)
        self.end()

    def respond_json(
        self, status: int, obj: object, headers: list[tuple[str, str]] | None = None
    ) -> None:
        self.respond(
            status, [("Content-Type", "application/json"), *(headers or [])], orjson.dumps(obj)
        )

    def begin(self, status: int, headers: list[tuple[str, str]]) -> None:
        """The response's status and headers (a body follows with `send`, then `end`)."""
        # IDLE: the request was malformed before it was complete (h11 lets a 400 go then).
        state = self._conn.our_state
        if self.transport.is_closing() or (
            state is not h11.SEND_RESPONSE and state is not h11.IDLE
        ):
            return
        headers = [*headers, ("Connection", "close")]
        self._write(
            self._conn.send(
                h11.Response(status_code=status, headers=headers, reason=_reason(status))
            )
        )

    def send(self, data: bytes) -> None:
        """A piece of the body (a chunk of a streamed response)."""
        if data and self._conn.our_state is h11.SEND_BODY and not self.transport.is_closing():
            self._write(self._conn.send(h11.Data(data=data)))

    def end(self) -> None:
        """The response is complete: the connection closes after it is written (one request
        per connection: see the module docstring)."""
        if self._conn.our_state is h11.SEND_BODY and not self.transport.is_closing():
            self._write(self._conn.send(h11.EndOfMessage()))
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            # The response's owner is done with it; told once the writer that ended it (a
            # flush, say) has returned.
            asyncio.get_running_loop().call_soon(on_lost)
        self.close()

    def close(self) -> None:
        self._cancel_timer()
        self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, with a reset (nothing more is written)."""
        self._cancel_timer()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        self.transport.abort()

    # ------------------------------------------------------------------ internals

    def _write(self, data: bytes | None) -> None:
        if data:
            self.transport.write(data)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _dispatch(self) -> None:
        self._cancel_timer()
        self._answering = True
        request = self._request
        assert request is not None
        headers: dict[str, str] = {}
        for name, value in request.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self._handler(
            self,
            HttpRequest(
                request.method.decode("ascii", "replace"),
                request.target.decode("latin-1"),
                headers,
                bytes(self._body),
            ),
        )

    def _refuse(self, status: HTTPStatus, code: ErrorCode, message: str) -> None:
        self._cancel_timer()
        self._answering = True
        if self._conn.our_state in (h11.SEND_RESPONSE, h11.IDLE):
            with contextlib.suppress(h11.LocalProtocolError):
                self.respond_json(status, error_body(code, message))
                return
        self.close()


def error_body(code: ErrorCode, message: str, **extra: object) -> dict[str, object]:
    """A refusal's JSON body: shaped like the protocol's `error` message."""
    from gateway.core.protocol import RETRYABLE

    body: dict[str, object] = {
        "type": "error",
        "code": code.value,
        "message": message,
        "retryable": RETRYABLE[code],
    }
    body.update(extra)
    return body


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


# ------------------------------------------------------------------------------------------
# A stream's messages as SSE: what Connection writes to
# ------------------------------------------------------------------------------------------

#: Messages a WebSocket client needs and an HTTP stream does not (one stream per response).
_NOT_RELAYED: Final = frozenset({b"welcome", b"pong", b"authenticated"})
#: Refusals before the stream starts, as HTTP statuses (docs/protocol.md, "HTTP streams").
STATUS_OF: Final[dict[str, int]] = {
    "bad_json": 400,
    "bad_message": 400,
    "unknown_type": 400,
    "message_too_large": 413,
    "prompt_too_large": 413,
    "duplicate_id": 409,
    "unknown_id": 404,
    "unauthorized": 401,
    "too_many_streams": 429,
    "rate_limited": 429,
    "budget_exceeded": 429,
    "shutting_down": 503,
    "internal": 500,
}
_SEQ: Final = b'"seq":'


class SseSocket:
    """A streamed HTTP response standing in for a WebSocket under `Connection`.

    The first message decides the status: `started` or `resumed` opens a `200
    text/event-stream`; an `error` before it is a plain HTTP refusal (`STATUS_OF`) with the
    error as a JSON body. From then on each message is one SSE event, and the stream's terminal
    message (`done`, `cancelled`, an `error`) ends the response. While nothing is written for
    `keepalive` seconds, an SSE comment keeps proxies from timing the response out.
    """

    __slots__ = (
        "_cors",
        "_idle",
        "_keepalive",
        "_opened",
        "_timer",
        "close_code",
        "close_rcvd",
        "connection",
        "exchange",
        "keepalives",
        "on_started",
        "on_status",
    )

    def __init__(
        self, exchange: HttpExchange, keepalive: float, cors: list[tuple[str, str]]
    ) -> None:
        self.exchange = exchange
        self.connection: Connection | None = None
        self._keepalive = keepalive
        self._cors = cors
        self._opened = False
        #: Nothing was written since the last keepalive tick.
        self._idle = True
        self._timer: Timer | None = None
        #: What Connection reads of a WebSocket: an HTTP client cannot send a close frame, so
        #: a response that breaks off is always a drop (resume grace), as on a WebSocket.
        self.close_code: int | None = None
        self.close_rcvd = False
        self.keepalives = 0
        #: Told the response's status once it is decided (for metrics).
        self.on_status: Callable[[int], None] | None = None
        #: Told the stream's resume token when `started` goes out.
        self.on_started: Callable[[str], None] | None = None

    @property
    def peer(self) -> str:
        return self.exchange.peer

    @property
    def paused(self) -> bool:
        return self.exchange.paused

    async def wait_writable(self) -> None:
        await self.exchange.wait_writable()

    def write_frames(self, messages: list[bytes]) -> None:
        """Protocol messages (UTF-8 JSON, `{"type":...` first) as SSE events."""
        exchange = self.exchange
        out: list[bytes] = []
        for message in messages:
            kind = message[9 : message.find(b'"', 9)]
            if kind in _NOT_RELAYED:
                continue
            if not self._opened:
                # An expired stream's resume is answered in the stream's own framing (one
                # `error` event); every other refusal before `started` is an HTTP status.
                if kind == b"error" and b'"code":"resume_unavailable"' not in message:
                    self._refuse(message)
                    return
                self._open()
            if kind == b"started" and self.on_started is not None:
                token = orjson.loads(message).get("resume_token")
                if isinstance(token, str):
                    self.on_started(token)
            out.append(self._event(kind, message))
            if kind in (b"done", b"cancelled", b"error"):
                out.append(self._last())
                exchange.send(b"".join(out))
                self._finish()
                return
        if out:
            self._idle = False
            exchange.send(b"".join(out))

    def _event(self, kind: bytes, message: bytes) -> bytes:
        """One protocol message as an SSE event: `event:` its type, `id:` its seq."""
        # Keys come in a fixed order (`type`, `id`, `seq` first), and a `"seq":` inside a
        # JSON string is escaped (`\"seq\":`): the first match is the message's own.
        head = b"event: " + kind + b"\n"
        at = message.find(_SEQ)
        if at > 0:
            end = at + len(_SEQ)
            stop = end
            while stop < len(message) and 48 <= message[stop] <= 57:
                stop += 1
            head += b"id: " + message[end:stop] + b"\n"
        return head + b"data: " + message + b"\n\n"

    def _last(self) -> bytes:
        """What follows the terminal message (nothing; the AI SDK's stream has a marker)."""
        return b""

    def _headers(self) -> list[tuple[str, str]]:
        return []

    def close(self, code: int, reason: str) -> None:
        """The gateway closes this "socket" (a drain's 1001, an expired credential): the
        response ends (a stream still running is detached for a resume, as a dropped socket's)."""
        self.close_code = code
        if not self._opened:
            status = 503 if code == 1001 else 401
            errcode = ErrorCode.SHUTTING_DOWN if code == 1001 else ErrorCode.UNAUTHORIZED
            self._status(status)
            self.exchange.respond_json(status, error_body(errcode, reason), self._cors)
            return
        self._finish()

    def fail(self, code: int, reason: str) -> None:
        self.close(code, reason)

    def abort(self) -> None:
        self._stop_timer()
        self.exchange.abort()

    def _status(self, status: int) -> None:
        on_status, self.on_status = self.on_status, None
        if on_status is not None:
            on_status(status)

    def _open(self) -> None:
        self._opened = True
        self._status(200)
        self.exchange.begin(
            200,
            [
                ("Content-Type", "text/event-stream; charset=utf-8"),
                # `no-cache`, the SSE convention: with `no-store`, Chromium reports every
                # streamed fetch of it as aborted (net::ERR_ABORTED), though it read it whole.
                ("Cache-Control", "no-cache"),
                # nginx buffers proxied responses unless told not to (deploy/nginx.conf).
                ("X-Accel-Buffering", "no"),
                *self._headers(),
                *self._cors,
            ],
        )
        if self._keepalive > 0:
            self._timer = self.exchange.clock.call_later(self._keepalive, self._tick)

    def _refuse(self, message: bytes) -> None:
        error = orjson.loads(message)
        status = STATUS_OF.get(error.get("code"), 400)
        headers = list(self._cors)
        retry_after = error.get("retry_after_ms")
        if isinstance(retry_after, int):
            headers.append(("Retry-After", str(max(1, -(-retry_after // 1000)))))
        error.pop("id", None)
        self._status(status)
        self.exchange.respond_json(status, error, headers)

    def _tick(self) -> None:
        self._timer = None
        if self.exchange.closing:
            return
        if self._idle:
            self.keepalives += 1
            self.exchange.send(b": keepalive\n\n")
        self._idle = True
        self._timer = self.exchange.clock.call_later(self._keepalive, self._tick)

    def _finish(self) -> None:
        self._stop_timer()
        self.exchange.end()

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()


class AiSdkSocket(SseSocket):
    """A streamed response in the Vercel AI SDK's UI message stream protocol (`useChat`'s):
    each protocol message becomes its UI chunks (`gateway.core.ai_sdk.UiStream`), and the
    stream ends with `data: [DONE]`.

    `cancel_on_drop`: a response that breaks off is the user's Stop (the SDK aborts the fetch),
    so the stream is cancelled at once, as a WebSocket closed on purpose; without it (the
    `--ai-sdk-resume` mode) it is a drop, kept for the resume grace."""

    __slots__ = ("_ui",)

    def __init__(
        self,
        exchange: HttpExchange,
        keepalive: float,
        cors: list[tuple[str, str]],
        ui: UiStream,
        cancel_on_drop: bool,
    ) -> None:
        super().__init__(exchange, keepalive, cors)
        self._ui = ui
        self.close_rcvd = cancel_on_drop

    def _event(self, kind: bytes, message: bytes) -> bytes:
        chunks = self._ui.chunks(orjson.loads(message))
        return b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks)

    def _last(self) -> bytes:
        return b"data: [DONE]\n\n"

    def _headers(self) -> list[tuple[str, str]]:
        return [("x-vercel-ai-ui-message-stream", "v1")]
