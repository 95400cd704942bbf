"""One socket's streams as a state machine, and the ordered outbox of what it still has to send.

PURE module: no asyncio, no sockets, no clock. The server feeds it client frames (`receive`) and
upstream results (`text`, `done`, `fail`); it answers with frames in the `Outbox` and with
`Command`s (open or cancel an upstream request) for the server to carry out.

Invariants (protocol.md, "Streams"), each pinned by tests:
- every accepted stream gets exactly one terminal frame (`done`, `cancelled` or `error`), and no
  frame of that stream follows it: terminal states are sticky and the outbox drops late output;
- `seq` numbers the text_chunk frames actually sent, from 1, without gaps. Text is turned into a
  frame only when the writer takes it (`Outbox.drain`), so deltas that wait together for a busy
  socket are coalesced into one frame rather than queued one by one.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

from gateway.protocol import (
    PONG,
    Auth,
    Cancel,
    ErrorCode,
    Ping,
    ProtocolViolation,
    Start,
    chunk_prefix,
    encode_cancelled,
    encode_chunk,
    encode_done,
    encode_error,
    encode_started,
    encode_welcome,
    parse_client_frame,
)

#: How many finished stream ids a socket remembers, so that a `cancel` racing the stream's own
#: end is recognised and ignored instead of answered with a second terminal `unknown_id`.
RECENT_IDS: Final = 256


class State(Enum):
    """A stream's lifecycle. Everything but ACTIVE is terminal and sticky."""

    ACTIVE = "active"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


class Stream:
    """One prompt stream: its request, its output so far and where it is in its lifecycle."""

    __slots__ = (
        "_terminal",
        "bytes_in",
        "cancelled_at",
        "chunks_in",
        "coalesced",
        "id",
        "outcome",
        "parts",
        "pending",
        "prefix",
        "queued",
        "request",
        "seq",
        "state",
    )

    def __init__(self, request: Start) -> None:
        self.id = request.id
        self.request = request
        self.prefix = chunk_prefix(request.id)
        self.state = State.ACTIVE
        #: Last seq sent (text_chunk frames produced by the outbox).
        self.seq = 0
        #: Every delta of the answer, for `done.text`.
        self.parts: list[str] = []
        #: Deltas not yet turned into a frame.
        self.pending: list[str] = []
        #: Whether this stream has an entry in its outbox's queue.
        self.queued = False
        #: Builds the terminal frame from the final seq once the last text is flushed.
        self._terminal: Callable[[int], bytes] | None = None
        self.chunks_in = 0
        self.bytes_in = 0
        #: Deltas merged into another delta's frame (a slow-client signal for metrics).
        self.coalesced = 0
        #: When the server decided to cancel this stream (its clock), for cancel latency.
        self.cancelled_at: float | None = None
        #: Short outcome word for the stream's summary log line and metrics.
        self.outcome = "active"

    @property
    def active(self) -> bool:
        return self.state is State.ACTIVE

    def flush(self) -> list[bytes]:
        """Frames for everything pending: at most one text_chunk, then the terminal if set."""
        frames: list[bytes] = []
        pending = self.pending
        if pending:
            if len(pending) == 1:
                text = pending[0]
            else:
                text = "".join(pending)
                self.coalesced += len(pending) - 1
            pending.clear()
            self.seq += 1
            frames.append(encode_chunk(self.prefix, self.seq, text))
        if self._terminal is not None:
            frames.append(self._terminal(self.seq))
            self._terminal = None
        self.queued = False
        return frames


class Outbox:
    """What one socket still has to send, in order.

    Entries are ready frames (bytes) or streams with pending output; a stream holds one place in
    the queue however many deltas arrive before the writer gets to it. `buffered` counts the
    bytes waiting, so the server can pause upstream reads of a socket that falls behind.
    """

    __slots__ = ("_notify", "_queue", "buffered")

    def __init__(self, notify: Callable[[], None] | None = None) -> None:
        self._queue: deque[bytes | Stream] = deque()
        self.buffered = 0
        #: Called when the queue goes from empty to non-empty (wakes the writer).
        self._notify = notify

    def __len__(self) -> int:
        return len(self._queue)

    def set_notify(self, notify: Callable[[], None]) -> None:
        self._notify = notify

    def _enqueue(self, entry: bytes | Stream) -> None:
        if not self._queue and self._notify is not None:
            self._notify()
        self._queue.append(entry)

    def push_frame(self, frame: bytes) -> None:
        """Queue a frame that is complete as it is (welcome, started, pong, errors)."""
        self.buffered += len(frame)
        self._enqueue(frame)

    def push_text(self, stream: Stream, text: str) -> None:
        """Queue a text delta of `stream` (hot path: one append, no encoding)."""
        stream.pending.append(text)
        self.buffered += len(text)
        if not stream.queued:
            stream.queued = True
            self._enqueue(stream)

    def push_terminal(self, stream: Stream, build: Callable[[int], bytes]) -> None:
        """Queue `stream`'s terminal frame after its pending text; built with the final seq."""
        stream._terminal = build
        if not stream.queued:
            stream.queued = True
            self._enqueue(stream)

    def discard_pending(self, stream: Stream) -> None:
        """Drop text of `stream` not yet sent (it was cancelled: unsent text never counts)."""
        for text in stream.pending:
            self.buffered -= len(text)
        stream.pending.clear()

    def drain(self) -> list[bytes]:
        """Everything queued, as frames in order; the outbox is empty afterwards."""
        frames: list[bytes] = []
        queue = self._queue
        while queue:
            entry = queue.popleft()
            if isinstance(entry, bytes):
                frames.append(entry)
            else:
                frames.extend(entry.flush())
        self.buffered = 0
        return frames


@dataclass(frozen=True, slots=True)
class OpenUpstream:
    """Command: start the upstream request of `stream`."""

    stream: Stream


@dataclass(frozen=True, slots=True)
class CancelUpstream:
    """Command: abort the upstream request of `stream` now (close its connection)."""

    stream: Stream


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Command: validate `token` (first-message auth or a refresh) and report back."""

    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class CloseSocket:
    """Command: close the socket with `code` once the frames queued so far are sent."""

    code: int
    reason: str


Command = OpenUpstream | CancelUpstream | Authenticate | CloseSocket

#: Close code for a socket that did not (or could no longer) authenticate.
CLOSE_UNAUTHORIZED: Final = 4401


@dataclass(frozen=True, slots=True)
class Limits:
    """Every limit a socket is held to; all of them are announced in `welcome.limits`."""

    max_streams: int = 16
    max_message_bytes: int = 65536
    #: 0 = unlimited for the three below.
    max_prompt_chars: int = 0
    max_streams_per_principal: int = 0
    starts_per_minute: int = 0
    #: None = any model.
    allowed_models: frozenset[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        limits: dict[str, Any] = {
            "max_streams": self.max_streams,
            "max_message_bytes": self.max_message_bytes,
        }
        if self.max_prompt_chars:
            limits["max_prompt_chars"] = self.max_prompt_chars
        if self.max_streams_per_principal:
            limits["max_streams_per_principal"] = self.max_streams_per_principal
        if self.starts_per_minute:
            limits["starts_per_minute"] = self.starts_per_minute
        if self.allowed_models is not None:
            limits["allowed_models"] = sorted(self.allowed_models)
        return limits


@dataclass(frozen=True, slots=True)
class Refused:
    """An admission check said no: the error to send for the start."""

    code: ErrorCode
    message: str
    retry_after_ms: int | None = None


def prompt_chars(messages: tuple[dict[str, Any], ...]) -> int:
    """Characters of text in a conversation (string contents and `text` parts)."""
    total = 0
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            total += len(content)
        else:
            for part in content:
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text)
    return total


class Session:
    """The protocol state of one WebSocket: its active streams and the frames it owes.

    With authentication configured and no token on the upgrade, the session starts
    `awaiting_auth`: the only frame it takes is `auth`; anything else closes with 4401.
    """

    def __init__(
        self,
        session_id: str,
        limits: Limits,
        outbox: Outbox | None = None,
        *,
        admit: Callable[[Start], Refused | None] | None = None,
        awaiting_auth: bool = False,
    ) -> None:
        self.id = session_id
        self.limits = limits
        self.outbox = outbox if outbox is not None else Outbox()
        self.streams: dict[str, Stream] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()
        #: False once the server drains: new starts are refused with `shutting_down`.
        self.accepting = True
        #: Process-level admission (capacity, per-principal quotas), asked before a start.
        self._admit = admit
        #: True until a first-message `auth` succeeds (only when auth needs one).
        self.awaiting_auth = awaiting_auth
        #: False once the principal's credential expired (starts get `unauthorized`).
        self.authorized = True
        self.streams_started = 0
        self.frames_in = 0

    def welcome(self) -> None:
        """Queue `welcome`, the first frame on every socket (after auth, when required)."""
        self.awaiting_auth = False
        self.outbox.push_frame(encode_welcome(self.id, self.limits.as_dict()))

    # ------------------------------------------------------------------ client side

    def receive(self, data: str | bytes) -> list[Command]:
        """Handle one client frame; errors become `error` frames, never exceptions."""
        self.frames_in += 1
        try:
            msg = parse_client_frame(data, self.limits.max_message_bytes)
        except ProtocolViolation as exc:
            if self.awaiting_auth:
                return [CloseSocket(CLOSE_UNAUTHORIZED, "send an auth message first")]
            self.outbox.push_frame(encode_error(exc.code, exc.message, exc.stream_id))
            return []
        if isinstance(msg, Auth):
            return [Authenticate(msg.token)]
        if self.awaiting_auth:
            return [CloseSocket(CLOSE_UNAUTHORIZED, "send an auth message first")]
        if isinstance(msg, Start):
            return self._start(msg)
        if isinstance(msg, Cancel):
            return self._cancel(msg.id)
        assert isinstance(msg, Ping)
        self.outbox.push_frame(PONG)
        return []

    def _refuse(self, code: ErrorCode, message: str, stream_id: str, **extra: Any) -> list[Command]:
        self.outbox.push_frame(encode_error(code, message, stream_id, **extra))
        return []

    def _start(self, msg: Start) -> list[Command]:
        sid, limits = msg.id, self.limits
        if not self.accepting:
            return self._refuse(
                ErrorCode.SHUTTING_DOWN, "the gateway is shutting down; reconnect", sid
            )
        if not self.authorized:
            return self._refuse(
                ErrorCode.UNAUTHORIZED, "credential expired; send a fresh auth message", sid
            )
        if sid in self.streams:
            return self._refuse(
                ErrorCode.DUPLICATE_ID, f"stream {sid!r} is already active on this socket", sid
            )
        allowed = limits.allowed_models
        if allowed is not None and msg.model is not None and msg.model not in allowed:
            return self._refuse(
                ErrorCode.BAD_MESSAGE, "model not allowed (see welcome.limits)", sid
            )
        if limits.max_prompt_chars and prompt_chars(msg.messages) > limits.max_prompt_chars:
            return self._refuse(
                ErrorCode.PROMPT_TOO_LARGE,
                f"prompt over {limits.max_prompt_chars} characters",
                sid,
            )
        if len(self.streams) >= limits.max_streams:
            return self._refuse(
                ErrorCode.TOO_MANY_STREAMS,
                f"at most {limits.max_streams} concurrent streams per socket",
                sid,
            )
        if self._admit is not None:
            refused = self._admit(msg)
            if refused is not None:
                extra = {}
                if refused.retry_after_ms is not None:
                    extra["retry_after_ms"] = refused.retry_after_ms
                return self._refuse(refused.code, refused.message, sid, **extra)
        stream = Stream(msg)
        self.streams[sid] = stream
        self._recent.pop(sid, None)
        self.streams_started += 1
        self.outbox.push_frame(encode_started(sid))
        return [OpenUpstream(stream)]

    def _cancel(self, sid: str) -> list[Command]:
        stream = self.streams.get(sid)
        if stream is None:
            if sid in self._recent:
                # The stream ended on its own while this cancel was in flight: its terminal
                # frame is (or was) sent, and it must stay the only one (protocol.md, "cancel").
                return []
            return self._refuse(ErrorCode.UNKNOWN_ID, f"no active stream {sid!r}", sid)
        self.outbox.discard_pending(stream)
        self._end(stream, State.CANCELLED, "cancelled", lambda seq: encode_cancelled(sid, seq))
        return [CancelUpstream(stream)]

    # ------------------------------------------------------------------ upstream side

    def text(self, stream: Stream, text: str) -> None:
        """A text delta from the upstream of `stream` (hot path). Ignored once terminal."""
        if stream.state is State.ACTIVE:
            stream.parts.append(text)
            stream.chunks_in += 1
            self.outbox.push_text(stream, text)

    def done(self, stream: Stream, meta: dict[str, Any], final_text: str | None = None) -> None:
        """The upstream finished the answer. `final_text` is its own full text, if it sent one.

        `done.text` must equal the concatenated chunks, so an upstream full text that extends
        what was relayed sends its remainder as a last chunk first; one that disagrees loses.
        """
        if stream.state is not State.ACTIVE:
            return
        if final_text is not None:
            so_far = "".join(stream.parts)
            if len(final_text) > len(so_far) and final_text.startswith(so_far):
                self.text(stream, final_text[len(so_far) :])
        sid = stream.id
        parts = stream.parts

        def build(seq: int) -> bytes:
            return encode_done(sid, seq, "".join(parts), meta)

        self._end(stream, State.DONE, "done", build)

    def fail(
        self,
        stream: Stream,
        code: ErrorCode,
        message: str,
        retryable: bool | None = None,
        **extra: Any,
    ) -> None:
        """The stream ended with an error; the chunks already sent stand."""
        if stream.state is not State.ACTIVE:
            return
        sid = stream.id

        def build(seq: int) -> bytes:
            return encode_error(code, message, sid, retryable, seq=seq, **extra)

        self._end(stream, State.FAILED, code.value, build)

    def _end(
        self, stream: Stream, state: State, outcome: str, build: Callable[[int], bytes]
    ) -> None:
        stream.state = state
        stream.outcome = outcome
        self.outbox.push_terminal(stream, build)
        del self.streams[stream.id]
        self._recent[stream.id] = None
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)

    def interrupt(self, message: str) -> list[Stream]:
        """End every active stream with a retryable stream_interrupted (the gateway is going
        away); returns them so their upstream requests can be cancelled."""
        streams = list(self.streams.values())
        for stream in streams:
            self.fail(stream, ErrorCode.STREAM_INTERRUPTED, message, True)
        return streams

    def close(self) -> list[Stream]:
        """The socket is gone: every active stream ends (no frame can reach anyone now)."""
        gone = list(self.streams.values())
        for stream in gone:
            stream.state = State.CANCELLED
            stream.outcome = "client_gone"
            stream.pending.clear()
        self.streams.clear()
        return gone
