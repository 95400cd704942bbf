"""Protocol v1 frames: decoding and validating what the gateway sends, encoding what we send.

Pure code (no I/O). `parse_server_frame` accepts exactly the server frames that
docs/asyncapi.yaml describes, with two deliberate leniencies so that a newer gateway never breaks
an older client: a frame of an unknown `type` is ignored (returns None), and an `error` with an
unknown `code` becomes a plain `GatewayError`. Unknown fields are ignored everywhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

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
#: Token counts that `done.usage` carries as non-negative integers when present.
USAGE_COUNTS: Final = ("prompt_tokens", "completion_tokens", "total_tokens")


def build_start(
    stream_id: str,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    model: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `start` frame for a stream (the caller has checked prompt xor messages)."""
    frame: dict[str, Any] = {"type": "start", "id": stream_id}
    if prompt is not None:
        frame["prompt"] = prompt
    if messages is not None:
        frame["messages"] = [dict(m) for m in messages]
    if model is not None:
        frame["model"] = model
    if options:
        frame["options"] = dict(options)
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


@dataclass(frozen=True, slots=True)
class Answer:
    """The outcome of a finished stream: its full text and the upstream's metadata.

    Metadata the upstream did not send is empty (`()`) or None. A stream ended by `cancel()` has
    `cancelled=True` and the text received until then.
    """

    id: str
    text: str
    #: The seq of the last text chunk (0 when there was none).
    seq: int
    citations: tuple[str, ...] = ()
    search_results: tuple[Mapping[str, Any], ...] = ()
    images: tuple[Any, ...] = ()
    related_questions: tuple[str, ...] = ()
    videos: tuple[Any, ...] = ()
    usage: Mapping[str, Any] | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    #: The `done` frame as received (empty for a cancelled stream).
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Started:
    """`started`: the start was accepted; `resume_token` when the gateway can resume it."""

    id: str
    resume_token: str | None


@dataclass(frozen=True, slots=True)
class TextChunk:
    """`text_chunk`: the next piece of a stream's answer."""

    id: str
    seq: int
    text: str


@dataclass(frozen=True, slots=True)
class Done:
    """`done`: the stream's terminal frame on success."""

    answer: Answer


@dataclass(frozen=True, slots=True)
class Cancelled:
    """`cancelled`: the stream's terminal frame after a cancel."""

    id: str
    seq: int


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
    Welcome | Started | TextChunk | Done | Cancelled | ErrorFrame | Pong | Authenticated | Resumed
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


def _welcome(obj: Mapping[str, Any]) -> Welcome:
    limits = obj.get("limits")
    if not isinstance(limits, dict):
        raise _Invalid("'limits' must be an object")
    for key in ("max_prompt_chars", "max_streams_per_principal", "starts_per_minute"):
        _opt_int(limits, key, 1)
    _list(limits, "allowed_models", str)
    return Welcome(
        _int(obj, "protocol", 1),
        _str(obj, "session", 1),
        _int(limits, "max_streams", 1),
        _int(limits, "max_message_bytes", 1),
        limits,
        obj,
    )


def _started(obj: Mapping[str, Any]) -> Started:
    token = _str(obj, "resume_token", 1) if "resume_token" in obj else None
    if token is not None and len(token) > MAX_RESUME_TOKEN:
        raise _Invalid(f"'resume_token' must be at most {MAX_RESUME_TOKEN} characters")
    return Started(_id(obj), token)


def _done(obj: Mapping[str, Any]) -> Done:
    usage = obj.get("usage")
    if "usage" in obj:
        if not isinstance(usage, dict):
            raise _Invalid("'usage' must be an object")
        for key in USAGE_COUNTS:
            _opt_int(usage, key, 0)
    finish = obj.get("finish_reason")
    if "finish_reason" in obj and not isinstance(finish, str):
        raise _Invalid("'finish_reason' must be a string")
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
    "text_chunk": lambda o: TextChunk(_id(o), _int(o, "seq", 1), _str(o, "text")),
    "done": _done,
    "cancelled": lambda o: Cancelled(_id(o), _int(o, "seq", 0)),
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
