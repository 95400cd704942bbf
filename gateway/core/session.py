"""One socket's streams as a state machine, and the ordered outbox of what it still has to send.

PURE module: no asyncio, no sockets, no clock. The server feeds it client frames (`receive`) and
upstream results (`text`, `done`, `fail`); it answers with frames in the `Outbox` and with
`Command`s (open or cancel an upstream request) for the server to carry out.

Invariants (protocol.md, "Streams"), each pinned by tests:
- every accepted stream gets exactly one terminal frame (`done`, `cancelled` or `error`), and no
  frame of that stream follows it: terminal states are sticky and the outbox drops late output;
- `seq` numbers a stream's content messages actually sent (text_chunk and the parts a client
  asked for: reasoning_chunk, sources, tool_call, progress), from 1, without gaps. Text is turned
  into a frame only when the writer takes it (`Outbox.take_frames`), so deltas that wait together
  for a busy socket are coalesced into one frame rather than queued one by one; reasoning is
  coalesced the same way, and any other part takes its seq when it arrives, in order.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from fnmatch import fnmatchcase
from typing import Any, Final, Protocol

from gateway.core.protocol import (
    PONG,
    Auth,
    Cancel,
    ErrorCode,
    Ping,
    ProtocolViolation,
    Resume,
    Start,
    chunk_prefix,
    clean_meta,
    encode_cancelled,
    encode_chunk,
    encode_done,
    encode_error,
    encode_meta,
    encode_part,
    encode_resumed,
    encode_started,
    encode_welcome,
    parse_client_frame,
)
from gateway.core.resume import GONE, Registry
from gateway.core.usage import Meter, Usage

#: Stands for the stream id in terminal frames kept for other instances (any follower
#: substitutes its own id; see redis_store.terminal_for).
ID_PLACEHOLDER: Final = "__ID__"

#: What a retained stream holds besides its answer and chunk offsets (the Stream itself, its
#: token and id, its registry entries, its terminal builder and retention timer), in bytes.
RETAINED_OVERHEAD: Final = 1024

#: A str object's own size before its characters (sys.getsizeof("") is 49 to 73).
STR_HEADER: Final = 64

#: How many finished stream ids a socket remembers, so that a `cancel` racing the stream's own
#: end is recognised and ignored instead of answered with a second terminal `unknown_id`.
RECENT_IDS: Final = 256


class State(Enum):
    """A stream's lifecycle. Everything but ACTIVE is terminal and sticky."""

    ACTIVE = "active"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


#: The stream lifecycle as data (h11 style): the states each state may move to. Terminal states
#: move nowhere, so a second end is an illegal move, never a second terminal frame.
TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    State.ACTIVE: frozenset({State.DONE, State.CANCELLED, State.FAILED}),
    State.DONE: frozenset(),
    State.CANCELLED: frozenset(),
    State.FAILED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A move the lifecycle table does not allow: a bug in the caller."""


def move(stream: Stream, to: State, outcome: str) -> None:
    """The one place a stream's state changes; `outcome` is the word its log line and metrics
    give for how it ended. Raises IllegalTransition for a move TRANSITIONS does not allow."""
    if to not in TRANSITIONS[stream.state]:
        raise IllegalTransition(f"stream {stream.id!r}: {stream.state.value} -> {to.value}")
    stream.state = to
    stream.outcome = outcome
    # What it used is settled once, as it ends: its terminal frame, its log line, its metrics
    # and its principal's budget all see the same figures (gateway.core.usage).
    # (None when it never reached an upstream request: it cost nothing.)
    meter = stream.meter
    if meter is not None:
        # The answer is joined once here (`done` needs it joined anyway).
        stream.usage = meter.settle(len(stream.text()), to is State.DONE, to is State.CANCELLED)


class Sink(Protocol):
    """Where a stream's output goes: a socket's `Outbox`, or `DETACHED` while no socket
    follows it (its output is then only retained for a resume)."""

    @property
    def buffered(self) -> int:
        """Bytes waiting to be sent (backpressure: the relay pauses its upstream when high)."""
        ...

    def push_text(self, stream: Stream, text: str) -> None: ...

    def push_part(self, stream: Stream, size: int) -> None: ...

    def push_terminal(self, stream: Stream, build: TerminalBuilder) -> None: ...


#: Builds a terminal frame of a stream from its id (which a resume may change) and its final seq.
#: The stream is an argument, never captured: a builder kept on its stream must not refer back
#: to it (a reference cycle outlives the stream until a full collection; docs/reliability.md).
TerminalBuilder = Callable[["Stream", str, int], bytes]


class Stream:
    """One prompt stream: its request, its output so far and where it is in its lifecycle.

    The output is kept as the upstream deltas (`parts`, needed for `done.text` anyway) plus the
    end offset of every text_chunk sent (`ends`), so any chunk can be replayed on a resume
    without storing the text twice. The other messages (the parts a client asked for) are kept
    as frames by seq, their id a placeholder (`part_frames`), for replays and other instances.
    """

    __slots__ = (
        "_terminal",
        "bytes_in",
        "cancelled_at",
        "chunks_in",
        "coalesced",
        "ends",
        "fallbacks",
        "id",
        "meta_bytes",
        "meter",
        "on_chunk",
        "on_part",
        "on_terminal",
        "outcome",
        "owner",
        "part_bytes",
        "part_frames",
        "parts",
        "pending",
        "pending_reasoning",
        "prefix",
        "principal",
        "queued",
        "ready",
        "request",
        "resume_token",
        "route",
        "seq",
        "sink",
        "started_at",
        "state",
        "terminal_sent",
        "text_len",
        "usage",
        "wants",
    )

    def __init__(
        self,
        request: Start,
        sink: Sink | None = None,
        *,
        resume_token: str | None = None,
        principal: str | None = None,
    ) -> None:
        self.id = request.id
        self.request = request
        self.prefix = chunk_prefix(request.id)
        self.state = State.ACTIVE
        #: Last seq produced (text_chunk frames handed to a socket or retained for resume).
        self.seq = 0
        #: Every delta of the answer, for `done.text` and replays.
        self.parts: list[str] = []
        #: End offset (in characters of the joined answer) of each text_chunk, by seq - 1 (a
        #: list while the stream runs, a compact array once it is retained: see `compact`).
        self.ends: list[int] | array[int] = []
        self.text_len = 0
        #: Deltas not yet turned into a frame.
        self.pending: list[str] = []
        #: Whether this stream has an entry in its sink's queue.
        self.queued = False
        self.sink: Sink = sink if sink is not None else DETACHED
        #: The session whose socket follows this stream (None while detached).
        self.owner: Session | None = None
        self.resume_token = resume_token
        self.principal = principal
        #: Builds the terminal frame once the last text is flushed; kept for replays.
        self._terminal: TerminalBuilder | None = None
        self.terminal_sent = False
        self.chunks_in = 0
        self.bytes_in = 0
        #: Deltas merged into another delta's frame (a slow-client signal for metrics).
        self.coalesced = 0
        #: When the server decided to cancel this stream (its clock), for cancel latency.
        self.cancelled_at: float | None = None
        #: When the server accepted it (its clock), for the duration metric.
        self.started_at = 0.0
        #: Mirrors of the output as it is produced (the shared store, for other instances).
        self.on_chunk: Callable[[Stream, int, str], None] | None = None
        self.on_terminal: Callable[[Stream, bytes], None] | None = None
        #: Short outcome word for the stream's summary log line and metrics.
        self.outcome = "active"
        #: Size of the metadata its `done` carries (citations, usage...), for retention.
        self.meta_bytes = 0
        #: The part kinds its client asked for besides text.
        self.wants = request.parts
        #: Reasoning deltas not yet turned into a frame (coalesced like text).
        self.pending_reasoning: list[str] = []
        #: Frames already numbered (a part, and the text before it) that the writer has not
        #: taken yet: they go out before anything still pending.
        self.ready: list[bytes] = []
        #: Every part message by seq, with the id a placeholder (None while there is none).
        self.part_frames: dict[int, bytes] | None = None
        self.part_bytes = 0
        self.on_part: Callable[[Stream, int, bytes], None] | None = None
        #: Settles what the stream used when it ends (set by the relay for each upstream
        #: attempt), and what it used, once it has ended (gateway.core.usage).
        self.meter: Meter | None = None
        self.usage: Usage | None = None
        #: The upstream (route name) serving it now, and how many it moved on from before its
        #: first token (gateway.core.routes): for its log line and metrics.
        self.route: str | None = None
        self.fallbacks = 0

    @property
    def active(self) -> bool:
        return self.state is State.ACTIVE

    @property
    def produced(self) -> bool:
        """Whether the upstream has given it anything yet (text, reasoning or a part): from
        then on it may not move to another upstream (docs/upstreams.md, "Fallback")."""
        return self.chunks_in > 0 or self.seq > 0 or bool(self.pending_reasoning)

    def push(self, text: str) -> None:
        """A text delta from the upstream (hot path). Ignored once the stream is terminal."""
        if self.state is State.ACTIVE:
            if self.pending_reasoning:
                self._number_reasoning()
            self.parts.append(text)
            self.chunks_in += 1
            self.sink.push_text(self, text)

    # -- parts (gateway.core.parts.PartSink): only for kinds the client asked for

    def push_reasoning(self, text: str) -> None:
        """A reasoning delta: coalesced into `reasoning_chunk` frames like text."""
        if self.state is State.ACTIVE and text:
            if self.pending:
                self._number_text()
            self.pending_reasoning.append(text)
            self.sink.push_part(self, len(text))

    def push_sources(self, sources: list[dict[str, Any]]) -> None:
        if sources:
            self._push_part("sources", {"sources": sources})

    def push_tool_call(self, call: dict[str, Any]) -> None:
        self._push_part("tool_call", call)

    def push_progress(self, step: dict[str, Any]) -> None:
        self._push_part("progress", {"step": step})

    def _push_part(self, kind: str, fields: dict[str, Any]) -> None:
        if self.state is not State.ACTIVE:
            return
        if self.pending:
            self._number_text()
        if self.pending_reasoning:
            self._number_reasoning()
        size = self._number(encode_part(kind, ID_PLACEHOLDER, self.seq + 1, fields))
        self.sink.push_part(self, size)

    def _number(self, template: bytes) -> int:
        """Give the part frame `template` (placeholder id) the next seq: kept for replays and
        mirrors, and made ready for the socket. Returns its size."""
        self.seq += 1
        if self.part_frames is None:
            self.part_frames = {}
        self.part_frames[self.seq] = template
        self.part_bytes += len(template)
        if self.on_part is not None:
            self.on_part(self, self.seq, template)
        frame = terminal_for(template, self.id)
        self.ready.append(frame)
        return len(frame)

    def _number_reasoning(self) -> None:
        pending = self.pending_reasoning
        text = pending[0] if len(pending) == 1 else "".join(pending)
        pending.clear()
        self._number(encode_part("reasoning_chunk", ID_PLACEHOLDER, self.seq + 1, {"text": text}))

    def _number_text(self) -> None:
        """Turn the pending text into its frame now (a part follows it)."""
        frame = self._encode_text()
        if frame is not None:
            self.ready.append(frame)

    def _encode_text(self) -> bytes | None:
        pending = self.pending
        if not pending:
            return None
        if len(pending) == 1:
            text = pending[0]
        else:
            text = "".join(pending)
            self.coalesced += len(pending) - 1
        pending.clear()
        self.seq += 1
        self.text_len += len(text)
        self.ends.append(self.text_len)
        if self.on_chunk is not None:
            self.on_chunk(self, self.seq, text)
        return encode_chunk(self.prefix, self.seq, text)

    def text(self) -> str:
        """The whole answer so far (joined once, then kept joined)."""
        parts = self.parts
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    def encode_pending(self) -> list[bytes]:
        """Frames for everything pending, in order: what is already numbered (parts, and the
        text before them), then at most one text_chunk (or reasoning_chunk), then the terminal
        if set."""
        frames: list[bytes] = []
        if self.ready:
            frames, self.ready = self.ready, []
        pending = self.pending
        if pending:
            if len(pending) == 1:
                text = pending[0]
            else:
                text = "".join(pending)
                self.coalesced += len(pending) - 1
            pending.clear()
            self.seq += 1
            self.text_len += len(text)
            self.ends.append(self.text_len)
            frames.append(encode_chunk(self.prefix, self.seq, text))
            if self.on_chunk is not None:
                self.on_chunk(self, self.seq, text)
        elif self.pending_reasoning:
            self._number_reasoning()
            frames.extend(self.ready)
            self.ready = []
        terminal = self._terminal
        if terminal is not None and not self.terminal_sent:
            self.terminal_sent = True
            frames.append(terminal(self, self.id, self.seq))
            if self.on_terminal is not None:
                self.on_terminal(self, terminal(self, ID_PLACEHOLDER, self.seq))
            # Nothing of this stream is ever queued again: let go of the socket's outbox, so a
            # stream retained for a resume does not keep a closed socket's objects alive.
            self.sink = DETACHED
        self.queued = False
        return frames

    def replay(self, after: int, stream_id: str) -> list[bytes]:
        """The frames with seq > `after` (and the terminal, if sent), for a resume as `stream_id`.

        Only what was already produced is replayed; pending deltas follow as the next seq.
        """
        full = self.text()
        prefix = chunk_prefix(stream_id)
        ends = self.ends
        part_frames = self.part_frames
        if part_frames is None:
            frames = [
                encode_chunk(prefix, seq, full[ends[seq - 2] if seq > 1 else 0 : ends[seq - 1]])
                for seq in range(after + 1, self.seq + 1)
            ]
        else:
            # Text chunks are numbered among the parts: the n-th text chunk's seq is n plus
            # the parts before it.
            frames = []
            chunk = sum(1 for seq in range(1, after + 1) if seq not in part_frames)
            for seq in range(after + 1, self.seq + 1):
                template = part_frames.get(seq)
                if template is not None:
                    frames.append(terminal_for(template, stream_id))
                    continue
                start = ends[chunk - 1] if chunk else 0
                frames.append(encode_chunk(prefix, seq, full[start : ends[chunk]]))
                chunk += 1
        if self.terminal_sent and self._terminal is not None:
            frames.append(self._terminal(self, stream_id, self.seq))
        return frames

    def leave_sink(self) -> None:
        """Another instance follows this stream now: produce what is pending here (into the
        shared store), and send nothing to a local socket any more."""
        if self.sink is not DETACHED:
            self.encode_pending()
            self.sink = DETACHED

    def compact(self) -> None:
        """The stream ended and is retained for a resume: keep what a replay needs in the
        least memory. The answer is joined once, the chunk offsets become an array (8 bytes
        each instead of a pointer and an int object, 36), and the prompt is dropped."""
        self.text()
        if isinstance(self.ends, list):
            self.ends = array("q", self.ends)
        if self.request.messages:
            self.request = Start(self.request.id, (), self.request.model, {})

    def retained_size(self) -> int:
        """Bytes of memory this ended stream holds for a replay: its answer, its chunk offsets
        (one more if text is still pending: it leaves as one chunk), its `done` metadata and a
        fixed overhead. Measured once, when it is retained; it does not change afterwards."""
        chunks = len(self.ends) + (1 if self.pending else 0)
        text = self.text()
        parts = self.part_bytes + (STR_HEADER if self.part_frames else 0)
        # An ASCII str takes a byte per character. Any other takes up to 4, plus up to 4 for
        # the UTF-8 copy CPython caches on it once it is encoded (a frame, a Redis entry):
        # counted at that bound, so the size does not depend on whether that happened yet.
        text_bytes = len(text) if text.isascii() else 8 * len(text)
        return STR_HEADER + text_bytes + 8 * chunks + self.meta_bytes + parts + RETAINED_OVERHEAD

    def rename(self, stream_id: str) -> None:
        """Take the id a resuming client uses on its new socket."""
        self.id = stream_id
        self.prefix = chunk_prefix(stream_id)


class _Detached:
    """The sink of a stream no socket follows: output is produced at once and only retained,
    so a later resume can replay it (no socket, so nothing to coalesce for)."""

    #: Nothing waits here to be sent (a relay checks its sink's backlog after every read).
    buffered = 0

    def push_text(self, stream: Stream, text: str) -> None:
        stream.pending.append(text)
        stream.encode_pending()

    def push_part(self, stream: Stream, size: int) -> None:
        stream.encode_pending()

    def push_terminal(self, stream: Stream, build: TerminalBuilder) -> None:
        stream._terminal = build
        stream.encode_pending()


DETACHED: Final = _Detached()


class Outbox:
    """What one socket still has to send, in order.

    Entries are ready frames (bytes) or streams with pending output; a stream holds one place in
    the queue however many deltas arrive before the writer gets to it. `buffered` counts the
    bytes waiting, so the server can pause upstream reads of a socket that falls behind.
    """

    __slots__ = ("_notify", "_queue", "buffered")

    def __init__(self, notify: Callable[[bool], None] | None = None) -> None:
        # A list, swapped out whole by take_frames(): an empty deque allocates its first block up
        # front, which every idle socket would pay (docs/performance.md).
        self._queue: list[bytes | Stream] = []
        self.buffered = 0
        #: Wakes the writer: `notify(False)` when the queue goes from empty to non-empty (the
        #: writer may wait for the rest of this loop iteration's output, to send it in one
        #: write), `notify(True)` when a stream's first text is queued (time to first chunk
        #: is what a user waits on: worth a write of its own).
        self._notify = notify

    def __len__(self) -> int:
        return len(self._queue)

    def _enqueue(self, entry: bytes | Stream, urgent: bool = False) -> None:
        queue = self._queue
        first = not queue
        queue.append(entry)
        if (first or urgent) and self._notify is not None:
            self._notify(urgent)

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
            self._enqueue(stream, stream.seq == 0)

    def push_part(self, stream: Stream, size: int) -> None:
        """`stream` has a part (or reasoning text) of `size` bytes to send."""
        self.buffered += size
        if not stream.queued:
            stream.queued = True
            self._enqueue(stream, stream.seq <= 1)

    def push_terminal(self, stream: Stream, build: TerminalBuilder) -> None:
        """Queue `stream`'s terminal frame after its pending text; built with the final seq."""
        stream._terminal = build
        if not stream.queued:
            stream.queued = True
            self._enqueue(stream)

    def unbind(self) -> None:
        """The socket is closed: forget its writer, which refers back to this outbox through
        its connection, and what is still queued, whose streams refer back to this outbox as
        their sink (cycles that would keep a closed socket's objects, and its streams, until a
        full collection)."""
        self._notify = None
        for entry in self._queue:
            if isinstance(entry, Stream) and entry.sink is self:
                entry.sink = DETACHED
                entry.queued = False
        self._queue = []
        self.buffered = 0

    def abandon(self) -> None:
        """The socket is gone: produce every queued stream's pending output into its retained
        log (it may be resumed) and hand the streams to `DETACHED`."""
        for entry in self._queue:
            if isinstance(entry, Stream) and entry.sink is self:
                entry.encode_pending()
        for entry in self._queue:
            if isinstance(entry, Stream) and entry.sink is self:
                entry.sink = DETACHED
        self._queue.clear()
        self.buffered = 0

    def discard_pending(self, stream: Stream) -> None:
        """Drop text of `stream` not yet sent (it was cancelled: unsent text never counts).
        Parts already numbered stay: their seqs are taken."""
        for text in stream.pending:
            self.buffered -= len(text)
        stream.pending.clear()
        stream.pending_reasoning.clear()

    def take_frames(self) -> list[bytes]:
        """Everything queued, as frames in order; the outbox is empty afterwards."""
        queue = self._queue
        if not queue:
            return []
        self._queue = []
        self.buffered = 0
        frames: list[bytes] = []
        for entry in queue:
            if isinstance(entry, bytes):
                frames.append(entry)
            elif entry.sink is self:  # a stream that moved to another socket is not ours
                frames.extend(entry.encode_pending())
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


@dataclass(frozen=True, slots=True)
class Resumed:
    """Command: `stream` now follows this socket (stop its grace timer, route its flow)."""

    stream: Stream


@dataclass(frozen=True, slots=True)
class RemoteResume:
    """Command: the token is not known here; look for the stream on other instances."""

    msg: Resume


Command = OpenUpstream | CancelUpstream | Authenticate | CloseSocket | Resumed | RemoteResume

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
    #: None = any model. Otherwise the exact names, and `model_globs` the patterns (a routes
    #: file's rules such as `sonar*`): a start's model must be one or match one.
    allowed_models: frozenset[str] | None = None
    model_globs: tuple[str, ...] = ()
    #: A start that names no model is refused (a routes file whose rules give no default).
    model_required: bool = False

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
            limits["allowed_models"] = [*sorted(self.allowed_models), *self.model_globs]
        return limits

    def model_refused(self, model: str | None) -> str | None:
        """Why a start's model is refused (None: it is served), naming the allowed models."""
        if model is None:
            return "name a model: " + self._allowed() if self.model_required else None
        allowed = self.allowed_models
        if allowed is None or model in allowed:
            return None
        if any(fnmatchcase(model, glob) for glob in self.model_globs):
            return None
        return f"model {model[:64]!r} is not served here; " + self._allowed()

    def _allowed(self) -> str:
        names = [*sorted(self.allowed_models or ()), *self.model_globs]
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        return f"allowed: {shown} (welcome.limits.allowed_models)"


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
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):  # None: an assistant message with tool_calls only
            for part in content:
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text)
    return total


def finish_done(stream: Stream, meta: dict[str, Any], final_text: str | None = None) -> None:
    """The upstream finished the answer. `final_text` is its own full text, if it sent one.

    `done.text` must equal the concatenated chunks, so an upstream full text that extends what
    was relayed sends its remainder as a last chunk first; one that disagrees loses.
    """
    if stream.state is not State.ACTIVE:
        return
    if final_text is not None:
        so_far = stream.text()
        if len(final_text) > len(so_far) and final_text.startswith(so_far):
            stream.push(final_text[len(so_far) :])

    # The upstream's own usage object is not relayed: `usage` is the normalised one, settled
    # as the stream ends (`move`).
    meta = clean_meta({key: value for key, value in meta.items() if key != "usage"})
    move(stream, State.DONE, "done")
    if stream.usage is not None:
        meta["usage"] = stream.usage.as_dict()
    stream.meta_bytes = len(encode_meta(meta)) if meta else 0

    def build(done: Stream, sid: str, seq: int) -> bytes:
        return encode_done(sid, seq, done.text(), meta)

    _after_end(stream, build)


def finish_fail(
    stream: Stream,
    code: ErrorCode,
    message: str,
    retryable: bool | None = None,
    **extra: Any,
) -> None:
    """The stream ended with an error; the chunks already sent stand."""
    if stream.state is not State.ACTIVE:
        return

    move(stream, State.FAILED, code.value)
    if stream.usage is not None:
        extra["usage"] = stream.usage.as_dict()

    def build(_stream: Stream, sid: str, seq: int) -> bytes:
        return encode_error(code, message, sid, retryable, seq=seq, **extra)

    _after_end(stream, build)


def _build_cancelled(stream: Stream, sid: str, seq: int) -> bytes:
    usage = stream.usage
    return encode_cancelled(sid, seq, usage.as_dict() if usage is not None else None)


def _end(stream: Stream, state: State, outcome: str, build: TerminalBuilder) -> None:
    move(stream, state, outcome)
    _after_end(stream, build)


def _after_end(stream: Stream, build: TerminalBuilder) -> None:
    """A stream that just ended: its terminal frame is queued, and its socket lets it go."""
    stream.sink.push_terminal(stream, build)
    if stream.owner is not None:
        stream.owner.release(stream)


class Session:
    """The protocol state of one WebSocket: its active streams and the frames it owes.

    With authentication configured and no token on the upgrade, the session starts
    `awaiting_auth`: the only frame it takes is `auth`; anything else closes with 4401.
    With a `registry`, streams get a resume token and can outlive the socket (resume.py).
    """

    __slots__ = (
        "_admit",
        "_new_token",
        "_recent",
        "accepting",
        "authorized",
        "awaiting_auth",
        "frames_in",
        "id",
        "limits",
        "outbox",
        "principal",
        "registry",
        "remote",
        "streams",
        "streams_started",
    )

    def __init__(
        self,
        session_id: str,
        limits: Limits,
        outbox: Outbox | None = None,
        *,
        admit: Callable[[Start], Refused | None] | None = None,
        awaiting_auth: bool = False,
        registry: Registry[Stream] | None = None,
        principal: str | None = None,
        new_token: Callable[[], str] | None = None,
        remote: bool = False,
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
        #: Who this socket belongs to; resume tokens are bound to it.
        self.principal = principal
        self.registry = registry
        if registry is not None and new_token is None:
            raise ValueError("resumable streams need a source of unguessable resume tokens")
        #: Makes resume tokens (the shell passes one backed by `secrets`: this module is pure).
        self._new_token = new_token
        #: Whether unknown resume tokens may belong to another instance (a shared store).
        self.remote = remote
        self.streams_started = 0
        self.frames_in = 0

    def unbind(self) -> None:
        """The socket is closed: drop the admission callback, a method of the connection that
        owns this session (a reference cycle otherwise)."""
        self._admit = None

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
        if isinstance(msg, Resume):
            return self._resume(msg)
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
        unserved = limits.model_refused(msg.model)
        if unserved is not None:
            return self._refuse(ErrorCode.BAD_MESSAGE, unserved, sid)
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
        token = self._new_token() if self._new_token is not None else None
        stream = Stream(msg, self.outbox, resume_token=token, principal=self.principal)
        stream.owner = self
        self.streams[sid] = stream
        self._recent.pop(sid, None)
        self.streams_started += 1
        if self.registry is not None:
            self.registry.add(stream)
        self.outbox.push_frame(encode_started(sid, token))
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
        _end(stream, State.CANCELLED, "cancelled", _build_cancelled)
        return [CancelUpstream(stream)]

    def _resume(self, msg: Resume) -> list[Command]:
        """Move a stream to this socket and replay what the client missed (protocol.md,
        "Resume"): `resumed`, every frame with seq > after, then live output."""
        sid = msg.id
        found = self.registry.lookup(msg.resume_token) if self.registry is not None else None
        if found is GONE:
            return self._refuse(
                ErrorCode.RESUME_UNAVAILABLE, "that stream's output is no longer retained", sid
            )
        if found is None and self.remote:
            if sid in self.streams:
                return self._refuse(
                    ErrorCode.DUPLICATE_ID,
                    f"stream {sid!r} is already active on this socket",
                    sid,
                )
            return [RemoteResume(msg)]
        if not isinstance(found, Stream) or found.principal != self.principal:
            # Another principal's token looks exactly like an unknown one.
            return self._refuse(ErrorCode.UNKNOWN_ID, "no stream for that resume_token", sid)
        stream = found
        if msg.after > stream.seq:
            return self._refuse(
                ErrorCode.BAD_MESSAGE,
                f"'after' ({msg.after}) is beyond the last seq sent ({stream.seq})",
                sid,
            )
        current = self.streams.get(sid)
        if current is not None and current is not stream:
            return self._refuse(
                ErrorCode.DUPLICATE_ID, f"stream {sid!r} is already active on this socket", sid
            )
        previous = stream.owner
        if previous is not None:
            previous.release(stream, finished=False)
        self.outbox.push_frame(encode_resumed(sid, msg.after))
        for frame in stream.replay(msg.after, sid):
            self.outbox.push_frame(frame)
        stream.rename(sid)
        if not stream.terminal_sent:  # a finished stream's replay above is all of it
            stream.sink = self.outbox
            stream.queued = False
            if stream.pending or stream._terminal is not None:
                stream.queued = True
                self.outbox._enqueue(stream)
        if stream.active:
            stream.owner = self
            self.streams[sid] = stream
            self._recent.pop(sid, None)
        return [Resumed(stream)]

    # ------------------------------------------------------------------ remote streams

    def attach_remote(self, msg: Resume) -> Stream:
        """Follow a stream owned by another instance: a local proxy whose frames are forwarded
        with the owner's seqs (no coalescing here, so seqs stay the owner's)."""
        proxy = Stream(Start(msg.id, (), None, {}), self.outbox, principal=self.principal)
        proxy.seq = msg.after
        proxy.owner = self
        self.streams[msg.id] = proxy
        self._recent.pop(msg.id, None)
        self.outbox.push_frame(encode_resumed(msg.id, msg.after))
        return proxy

    def forward(self, proxy: Stream, seq: int, text: str) -> None:
        """A chunk of a remote stream, already numbered by its owner."""
        if proxy.state is State.ACTIVE:
            proxy.seq = seq
            proxy.text_len += len(text)
            self.outbox.push_frame(encode_chunk(proxy.prefix, seq, text))

    def forward_part(self, proxy: Stream, seq: int, template: bytes) -> None:
        """A part message of a remote stream (its id the placeholder), numbered by its owner."""
        if proxy.state is State.ACTIVE:
            proxy.seq = seq
            self.outbox.push_frame(terminal_for(template, proxy.id))

    def end_remote(self, proxy: Stream, template: bytes) -> None:
        """The owner's terminal frame (its id is the placeholder) ends the proxy."""
        if proxy.state is not State.ACTIVE:
            return
        ok = template.startswith(b'{"type":"done"')
        _end(
            proxy,
            State.DONE if ok else State.FAILED,
            "done" if ok else "remote_end",
            lambda _proxy, sid, _seq: terminal_for(template, sid),
        )

    def release(self, stream: Stream, finished: bool = True) -> None:
        """`stream` is no longer active on this socket (it ended, or moved elsewhere)."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            if finished:
                self._recent[stream.id] = None
                if len(self._recent) > RECENT_IDS:
                    self._recent.popitem(last=False)
        if stream.owner is self:
            stream.owner = None

    def close(self) -> list[Stream]:
        """The client closed the socket on purpose: every active stream ends now (no frame can
        reach anyone), and is returned so its upstream request can be cancelled."""
        gone = list(self.streams.values())
        for stream in gone:
            move(stream, State.CANCELLED, "client_gone")
            stream.pending.clear()
            stream.owner = None
            if self.registry is not None:
                self.registry.forget(stream)
        self.streams.clear()
        return gone

    def detach(self) -> list[Stream]:
        """The socket dropped (no close frame): its streams keep running without a socket.

        Everything produced for it but not yet sent is produced now (and retained), so a resume
        replays it; the active streams are returned for the grace timer.
        """
        outbox = self.outbox
        outbox.abandon()
        detached = list(self.streams.values())
        for stream in detached:
            stream.owner = None
            # A stream with nothing queued at this moment still points at this outbox: its
            # later output must be produced too (the retained log, other instances' replay).
            if stream.sink is outbox:
                stream.sink = DETACHED
        self.streams.clear()
        return detached


_ID_FIELD: Final = b'"id":"' + ID_PLACEHOLDER.encode() + b'"'


def terminal_for(template: bytes, stream_id: str) -> bytes:
    """A terminal frame kept with the placeholder id, for the id a follower uses. Only the
    `"id":` field can match: inside JSON strings quotes are escaped, so text cannot forge it."""
    return template.replace(_ID_FIELD, b'"id":"' + stream_id.encode() + b'"', 1)
