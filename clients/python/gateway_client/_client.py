"""The asyncio client: one WebSocket, many concurrent prompt streams, typed errors, reconnects.

One reader task per client owns the socket's receiving side: it demultiplexes frames by stream
id into per-stream queues, and when the socket drops it reconnects with jittered exponential
backoff and resumes the streams the gateway handed a `resume_token` for. Streams that cannot be
resumed fail with a retryable `ConnectionLost`.

Frame ordering is what makes the bookkeeping simple: the gateway answers client frames in the
order it received them, so an `error` with `id: null` (a frame the gateway could not tie to a
stream) belongs to the oldest of our frames still waiting for its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from enum import Enum
from types import TracebackType
from typing import Any, Final, Literal, Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.protocol import State
from websockets.uri import parse_uri

from gateway_client._backoff import Backoff
from gateway_client._errors import (
    ConnectionLost,
    GatewayError,
    ProtocolError,
    Unauthorized,
)
from gateway_client._frames import (
    ID_PATTERN,
    PROTOCOL_VERSION,
    Answer,
    Authenticated,
    Cancelled,
    Content,
    Done,
    ErrorFrame,
    Part,
    Pong,
    Resumed,
    ServerFrame,
    Source,
    Started,
    ToolCall,
    Welcome,
    build_start,
    decode,
    dumps,
    invalid_frame,
    parse_server_frame,
)
from gateway_client._http import HttpConnection, available, reachable

log = logging.getLogger("gateway_client")

DEFAULT_URL: Final = "ws://127.0.0.1:8080/v1/ws"
#: The gateway refused our credentials: never reconnect.
CLOSE_UNAUTHORIZED: Final = 4401
#: Close codes after which nothing is wrong with the gateway (normal closure, e.g. its idle
#: timeout; our own oversized frame): reconnect only when a stream or a call needs the socket.
#: Every other code (1001 going away, 1006 network loss, 1011, 4408 slow consumer, 4429, ...)
#: reconnects at once, with jitter.
ON_DEMAND_CLOSE_CODES: Final = frozenset({1000, 1009})
#: Largest frame we accept from the gateway (a `done` carries the whole answer).
MAX_FRAME_BYTES: Final = 1 << 24

FrameHook = Callable[[Mapping[str, Any]], None]
#: A connection to the gateway: a WebSocket, or the HTTP transport behind the same interface.
Connection = ClientConnection | HttpConnection


class _Phase(Enum):
    STARTING = "starting"  # start sent, waiting for started
    ACTIVE = "active"
    RESUMING = "resuming"  # the socket dropped; waiting to resume on a new one
    ENDED = "ended"


class Stream:
    """One prompt stream: an async iterator over the answer's text chunks as they arrive.

    Iterating yields each chunk's text (str) and ends after the stream's terminal frame, raising
    the stream's typed `GatewayError` if it failed. `result` then holds the `Answer`. Chunks
    are buffered until read, so a stream iterated late loses nothing. `parts()` iterates the
    same stream as typed parts instead: text and everything else the start asked for, in the
    order the gateway sent them. Streams are created by `GatewayClient.start`, never directly.
    """

    def __init__(self, client: GatewayClient, stream_id: str) -> None:
        self.id: Final = stream_id
        self._client = client
        self._phase = _Phase.STARTING
        self._accepted = False
        self._started = asyncio.Event()
        self._ended = asyncio.Event()
        #: Every content message received, in seq order (text and parts); the text iterator
        #: and the parts iterator each read it from their own position.
        self._log: list[Part] = []
        self._text_pos = 0
        self._parts_pos = 0
        self._grew = asyncio.Event()
        self._texts: list[str] = []
        self._reasoning: list[str] = []
        self._sources: list[Source] = []
        self._tool_calls: list[ToolCall] = []
        self._seq = 0
        self._resume_token: str | None = None
        self._answer: Answer | None = None
        self._error: GatewayError | None = None
        self._cancel_requested = False

    def __repr__(self) -> str:
        return f"<Stream {self.id!r} {self._phase.value} seq={self._seq}>"

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._texts)

    @property
    def reasoning(self) -> str:
        """The reasoning received so far (a start that asked for "reasoning")."""
        return "".join(self._reasoning)

    @property
    def sources(self) -> tuple[Source, ...]:
        """The sources received so far (a start that asked for "sources")."""
        return tuple(self._sources)

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        """The tool calls received so far (a start that asked for "tools")."""
        return tuple(self._tool_calls)

    @property
    def seq(self) -> int:
        """The seq of the last content message received (0 before the first); text and parts
        share it."""
        return self._seq

    @property
    def done(self) -> bool:
        """Whether the stream has ended (done, cancelled or failed)."""
        return self._phase is _Phase.ENDED

    @property
    def resumable(self) -> bool:
        """Whether the gateway gave this stream a resume token (it survives a reconnect)."""
        return self._resume_token is not None

    @property
    def result(self) -> Answer:
        """The `Answer` of an ended stream; raises its `GatewayError` if it failed, and
        `RuntimeError` while it is still running."""
        if self._error is not None:
            raise self._error
        if self._answer is None:
            raise RuntimeError(f"stream {self.id!r} has not ended yet: iterate it or await wait()")
        return self._answer

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str:
        while True:
            log = self._log
            while self._text_pos < len(log):
                part = log[self._text_pos]
                self._text_pos += 1
                if part.kind == "text":
                    return part.text
            await self._wait_for_more()

    def parts(self) -> AsyncIterator[Part]:
        """Iterate the stream as typed parts: `TextPart`s (the same text `async for chunk in
        stream` yields) and the `ReasoningPart`, `SourcesPart`, `ToolCallPart` and
        `ProgressPart` messages the start asked for, in the order the gateway sent them, so a
        UI renders one ordered stream. Ends like the text iteration (raising the stream's error
        if it failed). The text and the parts are two independent views of the same messages:
        reading one does not consume the other."""
        return _Parts(self)

    async def _next_part(self) -> Part:
        while self._parts_pos >= len(self._log):
            await self._wait_for_more()
        part = self._log[self._parts_pos]
        self._parts_pos += 1
        return part

    async def _wait_for_more(self) -> None:
        """Wait until the log grows; at the end of an ended stream raise its end instead (and
        again on every later call: iterating an ended stream ends again)."""
        if self._phase is _Phase.ENDED:
            if self._error is not None:
                raise self._error
            raise StopAsyncIteration
        self._grew.clear()
        await self._grew.wait()

    async def wait(self) -> Answer:
        """Wait until the stream ends and return its `Answer` (raises its error if it failed).
        Does not consume the chunks that `async for` yields."""
        await self._ended.wait()
        return self.result

    async def cancel(self) -> None:
        """Cancel the stream: send `cancel` and wait for its terminal frame.

        Afterwards `result` is an `Answer` with `cancelled=True` and the text received so far
        (or the real outcome, if the stream ended on its own before the cancel reached the
        gateway). Does nothing on an ended stream.
        """
        await self._client._cancel(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Leaving `async with stream:` cancels the stream unless it has ended."""
        if not self.done:
            await self.cancel()

    # ---------------------------------------------------------------- driven by the client

    def _on_started(self, resume_token: str | None) -> None:
        self._phase = _Phase.ACTIVE
        self._accepted = True
        self._resume_token = resume_token
        self._started.set()

    def _on_content(self, part: Part) -> None:
        """A content message: every kind takes the stream's next seq (docs/protocol.md,
        "Parts"), so one counter detects replays after a resume and gaps for all of them."""
        seq = part.seq
        if seq <= self._seq:
            return  # already received before a reconnect
        if seq != self._seq + 1:
            self._fail(invalid_frame(f"seq jumped from {self._seq} to {seq}", self.id))
            return
        self._seq = seq
        if part.kind == "text":
            self._texts.append(part.text)
        elif part.kind == "reasoning":
            self._reasoning.append(part.text)
        elif part.kind == "sources":
            self._sources.extend(part.sources)
        elif part.kind == "tool_call":
            self._tool_calls.append(part.call)
        self._log.append(part)
        self._grew.set()

    def _finish(self, answer: Answer) -> None:
        if self._phase is not _Phase.ENDED:
            # `done` repeats the reasoning and tool calls (when asked); sources come only as
            # messages. What `done` lacks is taken from what streamed.
            self._answer = dataclasses.replace(
                answer,
                reasoning=answer.reasoning or self.reasoning,
                sources=self.sources,
                tool_calls=answer.tool_calls or self.tool_calls,
            )
            self._end()

    def _finish_cancelled(self, usage: Mapping[str, Any] | None = None) -> None:
        if self._phase is not _Phase.ENDED:
            self._answer = Answer(
                self.id,
                self.text,
                self._seq,
                usage=usage,
                cancelled=True,
                reasoning=self.reasoning,
                sources=self.sources,
                tool_calls=self.tool_calls,
            )
            self._end()

    def _fail(self, error: GatewayError) -> None:
        if self._phase is not _Phase.ENDED:
            self._error = error
            self._end()

    def _end(self) -> None:
        self._phase = _Phase.ENDED
        self._started.set()
        self._ended.set()
        self._grew.set()
        self._client._forget(self)


class _Parts:
    """The async iterator `Stream.parts()` returns (one reading position per stream, like the
    text iteration: a second `parts()` continues where the first stopped)."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Part:
        return await self._stream._next_part()


#: What a frame we sent is waiting for (see the module docstring on id-null errors).
_Pending = tuple[Literal["start", "resume"], str]


class GatewayClient:
    """A connection to the gateway that runs many prompt streams at once.

    Use it as ``async with GatewayClient(url, token=...) as gw:`` (or `connect()` / `close()`).

    Args:
        url: the gateway's WebSocket endpoint.
        token: a bearer token, sent as ``Authorization: Bearer`` on the upgrade (``auth=
            "header"``) or as a first ``{"type":"auth","token":...}`` frame (``auth="message"``).
        reconnect: reconnect after the socket drops (close codes 1001, 1006, 1011, 4408, ...,
            never 4401), pacing attempts with `backoff`.
        backoff: reconnect pacing and when to give up.
        open_timeout: seconds to open a socket and receive the gateway's `welcome`.
        transport: ``"auto"`` (default): a WebSocket, switching to the gateway's HTTP streams for
            good when the upgrade fails (or no welcome comes) but the HTTP side answers, as
            behind a proxy that blocks WebSocket; ``"websocket"`` or ``"http"``: only that. The
            HTTP transport needs the ``http`` extra (httpx); without it "auto" stays on
            WebSocket.
        on_frame: called with every server frame (decoded JSON) as it arrives, for tracing
            (except the pong answering the ping that a client without a token sends first, to
            learn at once whether the gateway requires a token).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        auth: Literal["header", "message"] = "header",
        reconnect: bool = True,
        backoff: Backoff | None = None,
        open_timeout: float | None = 10.0,
        on_frame: FrameHook | None = None,
        transport: Literal["auto", "websocket", "http"] = "auto",
    ) -> None:
        if transport not in ("auto", "websocket", "http"):
            raise ValueError("transport must be 'auto', 'websocket' or 'http'")
        if transport == "http" and not available():
            raise ValueError(
                "transport='http' needs httpx: pip install 'llm-ws-gateway-client[http]'"
            )
        try:
            parse_uri(url)
        except InvalidURI as exc:
            raise ValueError(f"not a WebSocket URL: {url!r} ({exc})") from None
        if auth not in ("header", "message"):
            raise ValueError("auth must be 'header' or 'message'")
        if token is not None and not (0 < len(token) <= 8192 and token.isprintable()):
            raise ValueError("token must be 1 to 8192 printable characters")
        self.url: Final = url
        self._token = token
        self._auth = auth
        self._auto_reconnect = reconnect
        self._backoff = backoff if backoff is not None else Backoff()
        self._open_timeout = open_timeout
        self._on_frame = on_frame
        self._rand: Callable[[], float] = random.random
        self._transport = transport
        #: The HTTP transport is in use (chosen, or fallen back to for good).
        self._on_http = transport == "http"
        #: The HTTP status of the last refused upgrade (None: not refused), for "auto".
        self._upgrade_status: int | None = None
        self._ws: Connection | None = None
        self._welcome: Welcome | None = None
        self._streams: dict[str, Stream] = {}
        self._pending: deque[_Pending] = deque()
        self._pongs: deque[asyncio.Future[GatewayError | None]] = deque()
        self._waiters: set[asyncio.Future[GatewayError | None]] = set()
        self._demand = asyncio.Event()
        self._closed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closing = False
        self._fatal: GatewayError | None = None
        #: The current socket still owes the pong for the auth probe `_open` sent.
        self._probe_pong = False
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._id_prefix = secrets.token_hex(3)
        self._ids = itertools.count(1)

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the socket and wait for the gateway's `welcome`.

        Raises `ConnectionLost` when the gateway cannot be reached (not retried here) and
        `Unauthorized` when it refuses the token, or at once when it requires one and none was
        given.
        """
        if self._runner is not None:
            raise RuntimeError("GatewayClient.connect() was already called")
        ws = await self._open()
        self._ws = ws
        self._runner = asyncio.get_running_loop().create_task(
            self._run(ws), name=f"gateway_client reader {self.url}"
        )

    async def close(self) -> None:
        """Close the socket (the gateway cancels every stream still running); streams that had
        not ended fail with a non-retryable `ConnectionLost`."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        closed = ConnectionLost("the client was closed", retryable=False)
        self._wake(closed)
        self._stopping.set()
        self._demand.set()
        if self._tasks:  # let cancels of abandoned starts go out first
            await asyncio.wait(self._tasks, timeout=1.0)
            for task in self._tasks:
                task.cancel()
            await asyncio.wait(self._tasks)
        ws, runner = self._ws, self._runner
        if ws is not None:
            await ws.close()
        if runner is not None:
            if ws is None:
                runner.cancel()  # it is between sockets (backoff or handshake)
            await asyncio.wait({runner})
        for stream in list(self._streams.values()):
            stream._fail(
                ConnectionLost("the client was closed", retryable=False, stream_id=stream.id)
            )
        self._closed.set()

    @property
    def welcome(self) -> Welcome | None:
        """The current socket's `welcome` (protocol, session id, limits); None before connect."""
        return self._welcome

    @property
    def transport(self) -> Literal["websocket", "http"]:
        """The transport of the current (or next) connection."""
        return "http" if self._on_http else "websocket"

    @property
    def connected(self) -> bool:
        """Whether a socket is open right now."""
        return self._ws is not None and self._ws.state is State.OPEN

    # ---------------------------------------------------------------- streams

    async def start(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        model: str | None = None,
        options: Mapping[str, Any] | None = None,
        parts: Sequence[str] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        id: str | None = None,
    ) -> Stream:
        """Start a stream and wait until the gateway accepted it (`started`).

        Give a `prompt` or `messages` (``[{"role": "user", "content": "..."}]``), not both.
        `parts` names what the stream should carry besides text: any of "reasoning",
        "sources", "tools", "progress" (docs/protocol.md, "Parts"; `gw.welcome.parts` lists
        what the gateway offers); `stream.parts()` yields them. `tools` (OpenAI-style function
        declarations) and `tool_choice` go into `options`, and `tools` implies the "tools"
        part (a call the model makes is the client's to run). `id` is generated (unique on this
        client) unless given. Raises the gateway's refusal as a typed `GatewayError` (e.g.
        `ProtocolError` for a bad option or part, `GatewayBusy` for too_many_streams); failures
        after `started` surface while iterating the stream.
        """
        if (prompt is None) == (messages is None):
            raise TypeError("start() needs a prompt or messages=[...], not both")
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise ValueError("prompt must be a non-empty string")
        sid = id if id is not None else f"{self._id_prefix}-{next(self._ids)}"
        if not isinstance(sid, str) or ID_PATTERN.fullmatch(sid) is None:
            raise ValueError("id must be 1 to 64 characters of [A-Za-z0-9._:-]")
        if isinstance(parts, str) or (
            parts is not None and not all(isinstance(p, str) for p in parts)
        ):
            raise TypeError('parts must be a list of kinds, e.g. ["reasoning", "sources"]')
        wanted = list(dict.fromkeys(parts or ()))
        merged = dict(options or {})
        for key, given in (("tools", tools is not None), ("tool_choice", tool_choice is not None)):
            if given and key in merged:
                raise TypeError(f"give {key} once: as {key}= or in options, not both")
        if tools is not None:
            merged["tools"] = [dict(tool) for tool in tools]
        if tool_choice is not None:
            merged["tool_choice"] = tool_choice
        if merged.get("tools") and "tools" not in wanted:
            wanted.append("tools")
        request = build_start(sid, prompt, messages, model, merged, wanted)
        data = dumps(request)
        ws = await self._socket()
        limit = self._welcome.max_message_bytes if self._welcome else None
        if limit is not None and len(data.encode()) > limit:
            raise ProtocolError(
                "message_too_large",
                f"the start frame is over the gateway's max_message_bytes ({limit})",
                retryable=False,
                stream_id=sid,
            )
        if sid in self._streams:
            raise ProtocolError(
                "duplicate_id", f"stream {sid!r} is still active", retryable=False, stream_id=sid
            )
        stream = Stream(self, sid)
        self._streams[sid] = stream
        self._pending.append(("start", sid))
        try:
            try:
                await ws.send(data)
            except ConnectionClosed as exc:
                stream._fail(self._lost_error(sid, exc.rcvd.code if exc.rcvd else 1006, ""))
            await stream._started.wait()
        except asyncio.CancelledError:
            self._abandon(stream)
            raise
        if not stream._accepted:
            assert stream._error is not None
            raise stream._error
        return stream

    async def ping(self) -> float:
        """Send an application `ping`; return the seconds until its `pong`."""
        ws = await self._socket()
        waiter: asyncio.Future[GatewayError | None] = asyncio.get_running_loop().create_future()
        self._pongs.append(waiter)
        began = time.monotonic()
        with contextlib.suppress(ConnectionClosed):  # the reader fails the waiter if it went
            await ws.send(dumps({"type": "ping"}))
        error = await waiter
        if error is not None:
            raise error
        return time.monotonic() - began

    async def _cancel(self, stream: Stream) -> None:
        if stream.done:
            return
        if not stream._cancel_requested:
            stream._cancel_requested = True
            ws = self._ws
            socket_open = ws is not None and ws.state is State.OPEN
            resumable = stream._resume_token is not None and self._auto_reconnect
            if stream._phase is _Phase.RESUMING or (not socket_open and resumable):
                pass  # the reconnect sends resume, then cancel, so the upstream stops too
            elif ws is None or not socket_open:
                stream._finish_cancelled()  # nothing runs for it on any socket
                return
            else:
                with contextlib.suppress(ConnectionClosed):  # if it went, its end decides
                    await ws.send(dumps({"type": "cancel", "id": stream.id}))
        await stream._ended.wait()

    def _abandon(self, stream: Stream) -> None:
        """The caller of `start` was cancelled: cancel the stream it will never see."""
        if stream.done or stream._cancel_requested:
            return
        stream._cancel_requested = True
        ws = self._ws
        if ws is None or ws.state is not State.OPEN:
            stream._finish_cancelled()
            return
        self._spawn(self._send_quietly(ws, {"type": "cancel", "id": stream.id}), "cancel")

    def _forget(self, stream: Stream) -> None:
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]

    # ---------------------------------------------------------------- the socket

    async def _socket(self) -> Connection:
        """The open socket, waiting for a reconnect if one is under way or needed."""
        while True:
            if self._closing:
                raise ConnectionLost("the client was closed", retryable=False)
            if self._fatal is not None:
                raise self._fatal
            ws = self._ws
            if ws is not None and ws.state is State.OPEN:
                return ws
            if self._runner is None:
                raise RuntimeError("not connected: use `async with GatewayClient(...)`")
            waiter: asyncio.Future[GatewayError | None] = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            self._demand.set()
            try:
                error = await waiter
            finally:
                self._waiters.discard(waiter)
            if error is not None:
                raise error

    def _wake(self, error: GatewayError | None) -> None:
        """Release everyone waiting for a socket: with it (None) or with why there is none."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(error)

    async def _open(self) -> Connection:
        """Open a socket, read `welcome`, send the auth frame if configured."""
        ws: Connection
        if self._on_http:
            ws = HttpConnection(
                self.url, self._token if self._auth == "header" else None, self._open_timeout
            )
            return await self._greet(ws)
        try:
            ws = await self._connect_websocket()
            return await self._greet(ws)
        except (ConnectionLost, Unauthorized) as lost:
            if not await self._falls_back(lost):
                raise
            log.warning("gateway_client: no WebSocket (%s); using the HTTP streams", lost)
            self._on_http = True
            return await self._open()

    async def _falls_back(self, lost: ConnectionLost | Unauthorized) -> bool:
        """Whether "auto" moves to the HTTP streams after `lost`: the upgrade failed or no
        welcome came, for a reason that is not the gateway refusing us (401, or 429/503: its
        quota or its drain, which the WebSocket retries), and the HTTP side answers."""
        if self._transport != "auto" or not available():
            return False
        status = self._upgrade_status
        if isinstance(lost, Unauthorized) and status != 403:
            return False  # 403 to a client that sends no Origin: a proxy's, not the gateway's
        if status in (401, 429, 503):
            return False
        return await reachable(self.url, self._open_timeout)

    async def _connect_websocket(self) -> ClientConnection:
        self._upgrade_status = None
        headers = None
        if self._token is not None and self._auth == "header":
            headers = {"Authorization": f"Bearer {self._token}"}
        try:
            return await connect(
                self.url,
                additional_headers=headers,
                open_timeout=self._open_timeout,
                max_size=MAX_FRAME_BYTES,
                compression=None,
            )
        except InvalidStatus as exc:
            status = self._upgrade_status = exc.response.status_code
            message = f"the gateway refused the upgrade with HTTP {status}"
            if status in (401, 403):
                raise Unauthorized(message) from exc
            # 503 while draining, 429 over quota: retry; other 4xx: our request is wrong.
            retryable = status >= 500 or status in (408, 429)
            raise ConnectionLost(message, retryable=retryable) from exc
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            why = str(exc) or type(exc).__name__
            raise ConnectionLost(f"could not connect to {self.url}: {why}") from exc

    async def _greet(self, ws: Connection) -> Connection:
        """Read the new connection's `welcome` (after the auth probe or frame)."""
        self._probe_pong = False
        try:
            if self._token is None:
                # Without a token, learn at once whether the gateway wants one instead of
                # waiting out its auth timeout: a gateway that requires auth closes a socket
                # whose first frame is not `auth` with 4401, while an open one has already sent
                # welcome and answers this ping with a pong (docs/protocol.md, "Authentication").
                await ws.send(dumps({"type": "ping"}))
            elif self._auth == "message":
                # Before welcome: a gateway that requires auth sends welcome only after it.
                await ws.send(dumps({"type": "auth", "token": self._token}))
            async with asyncio.timeout(self._open_timeout):
                raw = await ws.recv()
            obj = decode(raw)
            if self._on_frame is not None:
                self._call_hook(obj)
            welcome = parse_server_frame(obj)
            if not isinstance(welcome, Welcome):
                raise invalid_frame("the first frame on a socket must be welcome")
            if welcome.protocol != PROTOCOL_VERSION:
                raise ProtocolError(
                    "unsupported_protocol",
                    f"the gateway speaks protocol {welcome.protocol}, "
                    f"this client {PROTOCOL_VERSION}",
                    retryable=False,
                )
            self._pending.clear()
            self._probe_pong = self._token is None
        except BaseException as exc:
            await ws.close()
            if isinstance(exc, ConnectionClosed):
                code = ws.close_code
                if code == CLOSE_UNAUTHORIZED:
                    raise self._unauthorized(code) from exc
                raise ConnectionLost(f"the gateway closed the socket (code {code})") from exc
            if isinstance(exc, TimeoutError):
                raise ConnectionLost("the gateway sent no welcome") from exc
            raise
        self._welcome = welcome
        return ws

    async def _run(self, ws: Connection) -> None:
        """The reader task: read the socket until it drops, then reconnect (or stop)."""
        current: Connection | None = ws
        try:
            while current is not None:
                code, reason = await self._read(current)
                self._on_lost(code, reason)
                if self._closing:
                    return
                if code == CLOSE_UNAUTHORIZED or not self._auto_reconnect:
                    self._fatal = (
                        self._unauthorized(code)
                        if code == CLOSE_UNAUTHORIZED
                        else ConnectionLost(
                            f"the socket closed (code {code}) and reconnect is off",
                            retryable=False,
                            close_code=code,
                        )
                    )
                    self._wake(self._fatal)
                    return
                current = await self._reconnect(eager=code not in ON_DEMAND_CLOSE_CODES)
        except Exception:  # a bug here must not leave callers waiting forever
            log.exception("gateway_client reader crashed")
            self._fatal = ConnectionLost("the client's reader crashed", retryable=False)
            self._wake(self._fatal)
            self._on_lost(None, "reader crashed")

    async def _read(self, ws: Connection) -> tuple[int | None, str]:
        try:
            async for raw in ws:
                self._on_raw(raw)
        except ConnectionClosed:
            pass
        await ws.wait_closed()
        return ws.close_code, ws.close_reason or ""

    async def _reconnect(self, eager: bool) -> Connection | None:
        """Open a new socket with jittered exponential backoff and resume what can be resumed.

        Not `eager` (the gateway closed normally): wait until something needs a socket.
        """
        failures = 0
        jitter = eager
        while not self._closing:
            if not eager and not self._needs_socket():
                self._demand.clear()
                await self._demand.wait()
                eager, jitter = True, False
                continue
            delay = self._backoff.delay(failures, self._rand()) if jitter or failures else 0.0
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._closing:
                    return None
            try:
                ws = await self._open()
            except GatewayError as exc:
                if not exc.retryable:  # refused credentials or a request the gateway rejects
                    self._fatal = exc
                    self._fail_resuming(exc)
                    self._wake(exc)
                    return None
                failures += 1
                log.info("gateway_client reconnect %d failed: %s", failures, exc)
                if self._backoff.gives_up(failures):
                    error = ConnectionLost(f"gave up reconnecting after {failures} attempts: {exc}")
                    self._fail_resuming(error)
                    self._wake(error)
                    failures, eager = 0, False
                continue
            self._ws = ws  # from here on, close() closes it
            if self._closing:
                await ws.close()
                return None
            for stream in list(self._streams.values()):
                if stream._phase is _Phase.RESUMING and stream._resume_token is not None:
                    self._pending.append(("resume", stream.id))
                    frame = {
                        "type": "resume",
                        "id": stream.id,
                        "resume_token": stream._resume_token,
                        "after": stream._seq,
                    }
                    if not await self._send_quietly(ws, frame):
                        break
                    if stream._cancel_requested:
                        cancel = {"type": "cancel", "id": stream.id}
                        if not await self._send_quietly(ws, cancel):
                            break
            self._wake(None)
            return ws
        return None

    def _needs_socket(self) -> bool:
        return bool(self._waiters) or any(
            s._phase is _Phase.RESUMING for s in self._streams.values()
        )

    def _fail_resuming(self, error: GatewayError) -> None:
        for stream in list(self._streams.values()):
            if stream._phase is not _Phase.RESUMING:
                continue
            if stream._cancel_requested:
                stream._finish_cancelled()
            elif isinstance(error, Unauthorized):
                stream._fail(Unauthorized(error.message, stream_id=stream.id))
            else:
                stream._fail(ConnectionLost(error.message, stream_id=stream.id))

    def _lost_error(self, sid: str | None, code: int | None, reason: str) -> GatewayError:
        if self._closing:
            return ConnectionLost("the client was closed", retryable=False, stream_id=sid)
        if code == CLOSE_UNAUTHORIZED:
            error = self._unauthorized(code)
            error.stream_id = sid
            return error
        why = f"code {code}" + (f", {reason}" if reason else "")
        return ConnectionLost(
            f"the connection to the gateway was lost ({why})", stream_id=sid, close_code=code
        )

    def _unauthorized(self, code: int | None) -> Unauthorized:
        """The gateway closed the socket with 4401."""
        if self._token is None:
            return Unauthorized("the gateway requires a token and none was given", close_code=code)
        return Unauthorized("the gateway refused the token", close_code=code)

    def _on_lost(self, code: int | None, reason: str) -> None:
        """The socket is gone: resume what can be resumed, fail the rest."""
        self._ws = None
        self._probe_pong = False
        self._pending.clear()
        while self._pongs:
            waiter = self._pongs.popleft()
            if not waiter.done():
                waiter.set_result(self._lost_error(None, code, reason))
        resumable = (
            not self._closing
            and self._auto_reconnect
            and self._fatal is None
            and code != CLOSE_UNAUTHORIZED
        )
        for stream in list(self._streams.values()):
            if resumable and stream._resume_token is not None and stream._accepted:
                stream._phase = _Phase.RESUMING  # (a cancel under way is re-sent after resume)
            elif stream._cancel_requested:
                stream._finish_cancelled()
            else:
                stream._fail(self._lost_error(stream.id, code, reason))

    async def _send_quietly(self, ws: Connection, frame: Mapping[str, Any]) -> bool:
        try:
            await ws.send(dumps(frame))
        except ConnectionClosed:
            return False  # the reader sees the socket go and handles the streams
        return True

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"gateway_client {what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- incoming frames

    def _call_hook(self, obj: Any) -> None:
        assert self._on_frame is not None
        try:
            self._on_frame(obj)
        except Exception:
            log.exception("gateway_client on_frame hook failed")

    def _on_raw(self, raw: str | bytes) -> None:
        try:
            obj = decode(raw)
        except ProtocolError as exc:
            log.warning("gateway_client ignored a frame: %s", exc)
            return
        if self._probe_pong and isinstance(obj, dict) and obj.get("type") == "pong":
            # The answer to the ping `_open` sent (the first pong on the socket: the gateway
            # answers in order), not to a `ping()` call, and not news to `on_frame`.
            self._probe_pong = False
            return
        if self._on_frame is not None:
            self._call_hook(obj)
        try:
            frame = parse_server_frame(obj)
        except ProtocolError as exc:
            stream = self._streams.get(exc.stream_id) if exc.stream_id else None
            if stream is not None:
                stream._fail(exc)
            else:
                log.warning("gateway_client ignored a frame: %s", exc)
            return
        if frame is None:
            log.debug("gateway_client ignored a frame of unknown type %r", obj.get("type"))
            return
        self._dispatch(frame)

    def _settle(self, kind: str, sid: str) -> None:
        """Our `kind` frame for `sid` got its answer, so did every frame sent before it."""
        if (kind, sid) in self._pending:
            while self._pending.popleft() != (kind, sid):
                pass

    def _dispatch(self, frame: ServerFrame) -> None:
        if isinstance(frame, Content):
            stream = self._streams.get(frame.id)
            if stream is not None:
                stream._on_content(frame.part)
        elif isinstance(frame, Started):
            stream = self._streams.get(frame.id)
            if stream is not None and stream._phase is _Phase.STARTING:
                self._settle("start", frame.id)
                stream._on_started(frame.resume_token)
        elif isinstance(frame, Done):
            stream = self._streams.get(frame.answer.id)
            if stream is not None:
                stream._finish(frame.answer)
        elif isinstance(frame, Cancelled):
            stream = self._streams.get(frame.id)
            if stream is not None:
                stream._finish_cancelled(frame.usage)
        elif isinstance(frame, ErrorFrame):
            self._on_error(frame)
        elif isinstance(frame, Pong):
            if self._pongs:
                waiter = self._pongs.popleft()
                if not waiter.done():
                    waiter.set_result(None)
        elif isinstance(frame, Authenticated):
            log.debug("gateway_client: token accepted (expires_at=%s)", frame.expires_at)
        elif isinstance(frame, Resumed):
            stream = self._streams.get(frame.id)
            if stream is not None and stream._phase is _Phase.RESUMING:
                self._settle("resume", frame.id)
                stream._phase = _Phase.ACTIVE
        else:
            log.warning("gateway_client ignored an unexpected %s", type(frame).__name__)

    def _on_error(self, frame: ErrorFrame) -> None:
        error = frame.error
        if frame.id is None:
            # Not tied to a stream: it answers the oldest of our frames still waiting.
            if not self._pending:
                log.warning("gateway_client: the gateway reported %s", error)
                return
            _kind, sid = self._pending.popleft()
            stream = self._streams.get(sid)
            if stream is not None:
                error.stream_id = sid
                stream._fail(error)
            else:
                log.warning("gateway_client: the gateway reported %s", error)
            return
        stream = self._streams.get(frame.id)
        if stream is None:
            log.warning("gateway_client: the gateway reported %s", error)
        elif frame.seq is not None:  # the stream's terminal frame
            stream._fail(error)
        elif stream._phase is _Phase.STARTING:  # our start was refused
            self._settle("start", frame.id)
            stream._fail(error)
        elif stream._phase is _Phase.RESUMING:  # our resume was refused
            self._settle("resume", frame.id)
            if stream._cancel_requested:
                stream._finish_cancelled()
            else:
                stream._fail(
                    ConnectionLost(
                        f"the stream could not be resumed: {error.message}",
                        code=error.code,
                        stream_id=frame.id,
                        frame=error.frame,
                    )
                )
        elif stream._cancel_requested and error.code == "unknown_id":
            stream._finish_cancelled()  # it had already ended at the gateway
        else:
            log.warning("gateway_client: the gateway reported %s", error)
