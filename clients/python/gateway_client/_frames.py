"""Protocol v1 frames: decoding and validating what the gateway sends, encoding what we send.

Pure code (no I/O). `parse_server_frame` accepts exactly the server frames that
docs/asyncapi.yaml describes, with two deliberate leniencies so that a newer gateway never breaks
an older client: a frame of an unknown `type` is ignored (returns None), and an `error` with an
unknown `code` becomes a plain `GatewayError`. Unknown fields are ignored everywhere.

A stream's content messages (`text_chunk` and the parts of docs/protocol.md, "Parts":
`reasoning_chunk`, `sources`, `tool_call`, `progress`) all become a `Content` frame holding one
typed part; they share the stream's one `seq` counter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from gateway_client._errors import INVALID_FRAME, GatewayError, ProtocolError, error_from_frame

try:  # orjson is optional: faster, same results
    import orjson

    def dumps(obj: Any) -> str:
        """Encode one frame as compact JSON text."""
        return orjson.dumps(obj).decode()

    def loads(data: str | bytes) -> Any:
        """Decode one JSON frame (raises ValueError)."""
        return orjson.loads(data)

except ImportError:  # pragma: no cover - exercised only without orjson

    def dumps(obj: Any) -> str:
        """Encode one frame as compact JSON text."""
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)

    def loads(data: str | bytes) -> Any:
        """Decode one JSON frame (raises ValueError)."""
        return json.loads(data)


PROTOCOL_VERSION: Final = 1
#: Stream ids (docs/protocol.md, "start").
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:\-]{1,64}")
#: Longest resume token the gateway hands out (and accepts back).
MAX_RESUME_TOKEN: Final = 256
#: Every error code of docs/protocol.md, "Errors".
ERROR_CODES: Final = frozenset(
    {
        "bad_json",
        "bad_message",
        "unknown_type",
        "message_too_large",
        "duplicate_id",
        "unknown_id",
        "too_many_streams",
        "shutting_down",
        "unauthorized",
        "rate_limited",
        "budget_exceeded",
        "prompt_too_large",
        "resume_unavailable",
        "upstream_unavailable",
        "upstream_error",
        "upstream_timeout",
        "upstream_protocol_error",
        "stream_interrupted",
        "internal",
    }
)
#: Token counts that `usage` carries as non-negative integers when present.
USAGE_COUNTS: Final = (
    "prompt_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "total_tokens",
)
_USAGE_REQUIRED: Final = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})
#: The part kinds a start may ask for besides text (docs/protocol.md, "Parts"), as `welcome`
#: lists them.
PART_KINDS: Final = ("reasoning", "sources", "tools", "progress")
#: Kinds of a `progress` step.
STEP_KINDS: Final = frozenset({"search", "fetch", "code", "thought", "other"})


def build_start(
    stream_id: str,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    model: str | None = None,
    options: Mapping[str, Any] | None = None,
    parts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The `start` frame for a stream (the caller has checked prompt xor messages). Without
    `parts` (or with none) the frame is protocol 1's as before parts existed."""
    frame: dict[str, Any] = {"type": "start", "id": stream_id}
    if prompt is not None:
        frame["prompt"] = prompt
    if messages is not None:
        frame["messages"] = [dict(m) for m in messages]
    if model is not None:
        frame["model"] = model
    if options:
        frame["options"] = dict(options)
    if parts:
        frame["parts"] = list(parts)
    return frame


@dataclass(frozen=True, slots=True)
class Welcome:
    """The gateway's first frame on a socket: protocol version, session id and limits."""

    protocol: int
    session: str
    max_streams: int
    max_message_bytes: int
    #: Every limit the gateway announced (also the optional max_prompt_chars,
    #: max_streams_per_principal, starts_per_minute and allowed_models).
    limits: Mapping[str, Any] = field(repr=False)
    raw: Mapping[str, Any] = field(repr=False, compare=False)
    #: The part kinds a start may ask for on this gateway (empty: an older gateway, text only).
    parts: tuple[str, ...] = ()


# ---------------------------------------------------------------- typed parts


@dataclass(frozen=True, slots=True)
class Source:
    """A source the answer rests on. `index` is the number its `[n]` markers use."""

    index: int
    url: str
    title: str | None = None
    snippet: str | None = None
    date: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call of a tool the client declared, for the client to run.

    `arguments` is the parsed JSON the model wrote; when that was not valid JSON, `arguments`
    is None and `arguments_raw` holds the string as sent (never dropped).
    """

    call_id: str
    name: str
    arguments: Any = None
    arguments_raw: str | None = None

    def message_item(self) -> dict[str, Any]:
        """This call as an item of an assistant message's `tool_calls`, for the next start of
        a tool loop (`{"id", "type": "function", "function": {"name", "arguments"}}`, the
        arguments as the JSON string OpenAI's chat API takes)."""
        raw = self.arguments_raw if self.arguments_raw is not None else dumps(self.arguments)
        return {
            "id": self.call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": raw},
        }


@dataclass(frozen=True, slots=True)
class TextPart:
    """A piece of the answer's text (what `async for chunk in stream` yields)."""

    seq: int
    text: str
    kind: Literal["text"] = field(default="text", init=False)


@dataclass(frozen=True, slots=True)
class ReasoningPart:
    """A piece of the model's reasoning (a start that asked for "reasoning")."""

    seq: int
    text: str
    kind: Literal["reasoning"] = field(default="reasoning", init=False)


@dataclass(frozen=True, slots=True)
class SourcesPart:
    """Sources not announced before in this stream (a start that asked for "sources")."""

    seq: int
    sources: tuple[Source, ...]
    kind: Literal["sources"] = field(default="sources", init=False)


@dataclass(frozen=True, slots=True)
class ToolCallPart:
    """One complete tool call (a start that asked for "tools", or passed `tools=`)."""

    seq: int
    call: ToolCall
    kind: Literal["tool_call"] = field(default="tool_call", init=False)

    @property
    def call_id(self) -> str:
        return self.call.call_id

    @property
    def name(self) -> str:
        return self.call.name

    @property
    def arguments(self) -> Any:
        return self.call.arguments

    @property
    def arguments_raw(self) -> str | None:
        return self.call.arguments_raw


@dataclass(frozen=True, slots=True)
class ProgressPart:
    """A step of the upstream's own work (a start that asked for "progress"): `step["kind"]`
    is `search` (`queries`, `results`), `fetch` (`urls`), `code` (`code`, `result`), `thought`
    (`text`) or `other`."""

    seq: int
    step: Mapping[str, Any]
    kind: Literal["progress"] = field(default="progress", init=False)


#: What `Stream.parts()` yields; tell them apart by `kind` (or by class).
Part = TextPart | ReasoningPart | SourcesPart | ToolCallPart | ProgressPart


@dataclass(frozen=True, slots=True)
class Answer:
    """The outcome of a finished stream: its full text and the upstream's metadata.

    Metadata the upstream did not send is empty (`()`, "") or None. A stream ended by `cancel()`
    has `cancelled=True`, and the text and parts received until then.
    """

    id: str
    text: str
    #: The seq of the stream's last content message (0 when there was none).
    seq: int
    citations: tuple[str, ...] = ()
    search_results: tuple[Mapping[str, Any], ...] = ()
    images: tuple[Any, ...] = ()
    related_questions: tuple[str, ...] = ()
    videos: tuple[Any, ...] = ()
    usage: Mapping[str, Any] | None = None
    #: `stop`, `length`, `tool_calls` or `content_filter` (None when the upstream said nothing).
    finish_reason: str | None = None
    cancelled: bool = False
    #: The model's reasoning (when the start asked for "reasoning"; never part of `text`).
    reasoning: str = ""
    #: The sources streamed as `sources` messages (when the start asked for "sources"), in the
    #: order they arrived; `citations` and `search_results` are the upstream's own lists.
    sources: tuple[Source, ...] = ()
    #: The tool calls the model made (when the start asked for "tools").
    tool_calls: tuple[ToolCall, ...] = ()
    #: Whether the answer is the model's refusal (its text is the refusal).
    refusal: bool = False
    #: The `done` frame as received (empty for a cancelled stream).
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def assistant_message(self) -> dict[str, Any]:
        """This answer as the assistant message that continues the conversation: for a tool
        loop, with its `tool_calls` (and `content` None when it has no text); append a
        `{"role": "tool", "tool_call_id": ..., "content": ...}` message per result."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.tool_calls:
            message["tool_calls"] = [call.message_item() for call in self.tool_calls]
        elif message["content"] is None:
            message["content"] = ""
        return message


@dataclass(frozen=True, slots=True)
class Started:
    """`started`: the start was accepted; `resume_token` when the gateway can resume it."""

    id: str
    resume_token: str | None


@dataclass(frozen=True, slots=True)
class Content:
    """A content message of a stream (`text_chunk`, `reasoning_chunk`, `sources`, `tool_call`,
    `progress`), as its typed part."""

    id: str
    part: Part


@dataclass(frozen=True, slots=True)
class Done:
    """`done`: the stream's terminal frame on success."""

    answer: Answer


@dataclass(frozen=True, slots=True)
class Cancelled:
    """`cancelled`: the stream's terminal frame after a cancel (with the upstream's `usage`
    when it had sent any)."""

    id: str
    seq: int
    usage: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """`error`: connection-level (`id` None), a refusal (`seq` None) or a terminal error."""

    id: str | None
    seq: int | None
    error: GatewayError


@dataclass(frozen=True, slots=True)
class Pong:
    """`pong`: the answer to a `ping`."""


@dataclass(frozen=True, slots=True)
class Authenticated:
    """`authenticated`: a token sent in an `auth` frame on an open socket was accepted."""

    expires_at: float | None


@dataclass(frozen=True, slots=True)
class Resumed:
    """`resumed`: the gateway re-attached a stream to this socket; the frames after seq
    `after` follow."""

    id: str
    after: int


ServerFrame = (
    Welcome | Started | Content | Done | Cancelled | ErrorFrame | Pong | Authenticated | Resumed
)


class _Invalid(Exception):
    pass


def _is_int(value: Any) -> bool:
    # JSON Schema's "integer" is any number with a zero fractional part (1.0 included).
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _int(obj: Mapping[str, Any], key: str, minimum: int, maximum: int | None = None) -> int:
    value: Any = obj.get(key)
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        raise _Invalid(f"{key!r} must be an integer >= {minimum}")
    return int(value)


def _opt_int(
    obj: Mapping[str, Any], key: str, minimum: int, maximum: int | None = None
) -> int | None:
    return None if key not in obj else _int(obj, key, minimum, maximum)


def _str(obj: Mapping[str, Any], key: str, min_length: int = 0) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) < min_length:
        raise _Invalid(f"{key!r} must be a string")
    return value


def _id(obj: Mapping[str, Any]) -> str:
    value = obj.get("id")
    if not isinstance(value, str) or ID_PATTERN.fullmatch(value) is None:
        raise _Invalid("'id' must be a stream id")
    return value


def _list(obj: Mapping[str, Any], key: str, item: type | None = None) -> tuple[Any, ...]:
    if key not in obj:
        return ()
    value = obj[key]
    if not isinstance(value, list) or (
        item is not None and not all(isinstance(v, item) for v in value)
    ):
        raise _Invalid(f"{key!r} must be a list" + (f" of {item.__name__}" if item else ""))
    return tuple(value)


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    return None if key not in obj else _str(obj, key)


def _welcome(obj: Mapping[str, Any]) -> Welcome:
    limits = obj.get("limits")
    if not isinstance(limits, dict):
        raise _Invalid("'limits' must be an object")
    for key in ("max_prompt_chars", "max_streams_per_principal", "starts_per_minute"):
        _opt_int(limits, key, 1)
    _list(limits, "allowed_models", str)
    # Kinds this client does not know (a newer gateway's) are left out, not an error.
    parts = tuple(p for p in _list(obj, "parts", str) if p in PART_KINDS)
    return Welcome(
        _int(obj, "protocol", 1),
        _str(obj, "session", 1),
        _int(limits, "max_streams", 1),
        _int(limits, "max_message_bytes", 1),
        limits,
        obj,
        parts,
    )


def _started(obj: Mapping[str, Any]) -> Started:
    token = _str(obj, "resume_token", 1) if "resume_token" in obj else None
    if token is not None and len(token) > MAX_RESUME_TOKEN:
        raise _Invalid(f"'resume_token' must be at most {MAX_RESUME_TOKEN} characters")
    return Started(_id(obj), token)


def _usage(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    if "usage" not in obj:
        return None
    usage = obj["usage"]
    if not isinstance(usage, dict):
        raise _Invalid("'usage' must be an object")
    for key in USAGE_COUNTS:
        if key in _USAGE_REQUIRED:
            _int(usage, key, 0)
        else:
            _opt_int(usage, key, 0)
    if "cost" in usage:
        cost = usage["cost"]
        if isinstance(cost, bool) or not isinstance(cost, int | float) or not cost >= 0:
            raise _Invalid("'cost' must be a number >= 0")
    if "estimated" in usage and usage["estimated"] is not True:
        raise _Invalid("'estimated' must be true when present")
    return usage


def _source(obj: Any) -> Source:
    if not isinstance(obj, dict):
        raise _Invalid("a source must be an object")
    return Source(
        _int(obj, "index", 1),
        _str(obj, "url"),
        _opt_str(obj, "title"),
        _opt_str(obj, "snippet"),
        _opt_str(obj, "date"),
    )


def _tool_call(obj: Any) -> ToolCall:
    """A ToolCallBody: call_id, name, and exactly one of arguments and arguments_raw."""
    if not isinstance(obj, dict):
        raise _Invalid("a tool call must be an object")
    if ("arguments" in obj) == ("arguments_raw" in obj):
        raise _Invalid("a tool call has exactly one of 'arguments' and 'arguments_raw'")
    return ToolCall(
        _str(obj, "call_id"),
        _str(obj, "name"),
        obj.get("arguments"),
        _opt_str(obj, "arguments_raw"),
    )


def _content(obj: Mapping[str, Any], part: Part) -> Content:
    return Content(_id(obj), part)


def _sources(obj: Mapping[str, Any]) -> Content:
    items = obj.get("sources")
    if not isinstance(items, list) or not items:
        raise _Invalid("'sources' must be a non-empty list")
    return _content(obj, SourcesPart(_int(obj, "seq", 1), tuple(_source(s) for s in items)))


def _progress(obj: Mapping[str, Any]) -> Content:
    step = obj.get("step")
    kind = step.get("kind") if isinstance(step, dict) else None
    if not isinstance(step, dict) or not isinstance(kind, str):
        raise _Invalid("'step' must be an object with a string 'kind'")
    if kind not in STEP_KINDS:  # a newer gateway's kind: shown as "other", as documented
        step = {**step, "kind": "other", "upstream_kind": kind}
    return _content(obj, ProgressPart(_int(obj, "seq", 1), step))


def _done(obj: Mapping[str, Any]) -> Done:
    usage = _usage(obj)
    finish = obj.get("finish_reason")
    if "finish_reason" in obj and not isinstance(finish, str):
        raise _Invalid("'finish_reason' must be a string")
    if "refusal" in obj and obj["refusal"] is not True:
        raise _Invalid("'refusal' must be true when present")
    answer = Answer(
        id=_id(obj),
        text=_str(obj, "text"),
        seq=_int(obj, "seq", 0),
        citations=_list(obj, "citations", str),
        search_results=_list(obj, "search_results", dict),
        images=_list(obj, "images"),
        related_questions=_list(obj, "related_questions", str),
        videos=_list(obj, "videos"),
        usage=usage,
        finish_reason=finish,
        reasoning=_opt_str(obj, "reasoning") or "",
        tool_calls=tuple(_tool_call(c) for c in _list(obj, "tool_calls")),
        refusal="refusal" in obj,
        raw=obj,
    )
    return Done(answer)


def _error(obj: Mapping[str, Any]) -> ErrorFrame:
    sid = None if obj.get("id", ...) is None else _id(obj)
    _str(obj, "code", 1)
    _str(obj, "message")
    if not isinstance(obj.get("retryable"), bool):
        raise _Invalid("'retryable' must be a boolean")
    seq = _opt_int(obj, "seq", 0)
    _opt_int(obj, "status", 100, 599)
    _opt_int(obj, "retry_after_ms", 0)
    _usage(obj)
    return ErrorFrame(sid, seq, error_from_frame(obj))


def _authenticated(obj: Mapping[str, Any]) -> Authenticated:
    expires: Any = obj.get("expires_at", ...)
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int | float)):
        raise _Invalid("'expires_at' must be a number or null")
    return Authenticated(None if expires is None else float(expires))


def _resumed(obj: Mapping[str, Any]) -> Resumed:
    return Resumed(_id(obj), _int(obj, "after", 0))


_PARSERS: Final[dict[str, Callable[[Mapping[str, Any]], ServerFrame]]] = {
    "welcome": _welcome,
    "started": _started,
    "text_chunk": lambda o: _content(o, TextPart(_int(o, "seq", 1), _str(o, "text"))),
    "reasoning_chunk": lambda o: _content(o, ReasoningPart(_int(o, "seq", 1), _str(o, "text"))),
    "sources": _sources,
    "tool_call": lambda o: _content(o, ToolCallPart(_int(o, "seq", 1), _tool_call(o))),
    "progress": _progress,
    "done": _done,
    "cancelled": lambda o: Cancelled(_id(o), _int(o, "seq", 0), _usage(o)),
    "error": _error,
    "pong": lambda _o: Pong(),
    "authenticated": _authenticated,
    "resumed": _resumed,
}


def parse_server_frame(obj: Any) -> ServerFrame | None:
    """Validate one decoded server frame and return it typed.

    Returns None for a frame of a type this client does not know (ignored for forward
    compatibility). Raises `ProtocolError` (code `invalid_frame`) for anything else that
    docs/asyncapi.yaml does not allow.
    """
    if not isinstance(obj, dict):
        raise invalid_frame("a frame must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise invalid_frame("a frame needs a string 'type'")
    parser = _PARSERS.get(kind)
    if parser is None:
        return None
    try:
        frame = parser(obj)
    except _Invalid as exc:
        sid = obj.get("id") if isinstance(obj.get("id"), str) else None
        raise invalid_frame(f"bad {kind!r} frame: {exc}", sid, obj) from None
    return frame


def invalid_frame(
    message: str, stream_id: str | None = None, frame: Mapping[str, Any] | None = None
) -> ProtocolError:
    """The error for a server frame that breaks protocol v1 (a gateway bug)."""
    return ProtocolError(INVALID_FRAME, message, retryable=False, stream_id=stream_id, frame=frame)


def decode(data: str | bytes) -> Any:
    """Decode a text frame's JSON; binary frames and invalid JSON raise `ProtocolError`."""
    if isinstance(data, bytes):
        raise invalid_frame("binary frames are not part of protocol v1")
    try:
        return loads(data)
    except ValueError:
        raise invalid_frame("a frame is not valid JSON") from None
