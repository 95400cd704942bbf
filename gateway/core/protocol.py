"""Wire protocol v1: the client frames we accept and the server frames we send.

PURE module: no I/O, no asyncio. `docs/protocol.md` is the human reference; every rule below cites
the section of it that it implements. Parsing raises `ProtocolViolation`, which the session turns
into an `error` frame (the socket stays open); encoding returns UTF-8 JSON bytes ready to be sent
as a text frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import orjson

from gateway.core.parts import KNOWN_PARTS, PART_KINDS

PROTOCOL_VERSION: Final = 1

#: Stream ids: 1 to 64 characters of [A-Za-z0-9._:-] (protocol.md, "Stream ids"). The character
#: set needs no JSON escaping, which lets the hot path splice ids into frames verbatim.
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:\-]{1,64}")

#: Roles a client may put in `messages` (the upstream APIs accept exactly these for chat; `tool`
#: carries a tool's result back, with the `tool_call_id` it answers).
ROLES: Final = frozenset({"system", "user", "assistant", "tool"})

#: Tools a client may declare for one request, and the length of a tool or call id.
MAX_TOOLS: Final = 128
MAX_TOOL_ID: Final = 256
_TOOL_NAME: Final = re.compile(r"[A-Za-z0-9_\-.]{1,128}")

#: Upstream request options a client may set (protocol.md, "start"). Everything else is refused
#: with `bad_message` so a typo is loud and no internal or billing-relevant field can be smuggled
#: upstream (`stream`, `stream_mode`, underscore fields, `model` outside its own field, ...).
ALLOWED_OPTIONS: Final = frozenset(
    {
        # generation
        "temperature",
        "max_tokens",
        "top_p",
        "top_k",
        "presence_penalty",
        "frequency_penalty",
        "stop",
        "seed",
        "response_format",
        "reasoning_effort",
        "language_preference",
        # Perplexity search controls
        "search_domain_filter",
        "search_recency_filter",
        "search_after_date_filter",
        "search_before_date_filter",
        "last_updated_after_filter",
        "last_updated_before_filter",
        "search_mode",
        "search_language_filter",
        "return_images",
        "image_domain_filter",
        "image_format_filter",
        "return_related_questions",
        "web_search_options",
        "disable_search",
        "enable_search_classifier",
        # tools (OpenAI-compatible upstreams; checked by _tools below)
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        # Perplexity's answer shape: "full" (default) or "concise" (reasoning steps as progress)
        "stream_mode",
    }
)

#: Bounds on nested JSON in client frames: deep nesting is refused before it reaches any code
#: that might recurse on it (orjson itself caps at 1024; we are stricter).
MAX_JSON_DEPTH: Final = 32


class ErrorCode(StrEnum):
    """Every `code` an `error` frame can carry (protocol.md, "Errors")."""

    # connection-level (id is null, the socket stays open)
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    MESSAGE_TOO_LARGE = "message_too_large"
    # stream-level
    DUPLICATE_ID = "duplicate_id"
    UNKNOWN_ID = "unknown_id"
    TOO_MANY_STREAMS = "too_many_streams"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_PROTOCOL_ERROR = "upstream_protocol_error"
    STREAM_INTERRUPTED = "stream_interrupted"
    SHUTTING_DOWN = "shutting_down"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    BUDGET_EXCEEDED = "budget_exceeded"
    PROMPT_TOO_LARGE = "prompt_too_large"
    RESUME_UNAVAILABLE = "resume_unavailable"
    INTERNAL = "internal"


#: Whether a client may retry the same request as is (protocol.md, "Errors"). Upstream errors
#: decide per case (e.g. 429 yes, 400 no) and pass their own value.
RETRYABLE: Final[dict[ErrorCode, bool]] = {
    ErrorCode.BAD_JSON: False,
    ErrorCode.BAD_MESSAGE: False,
    ErrorCode.UNKNOWN_TYPE: False,
    ErrorCode.MESSAGE_TOO_LARGE: False,
    ErrorCode.DUPLICATE_ID: False,
    ErrorCode.UNKNOWN_ID: False,
    ErrorCode.TOO_MANY_STREAMS: True,
    ErrorCode.UPSTREAM_UNAVAILABLE: True,
    ErrorCode.UPSTREAM_ERROR: False,
    ErrorCode.UPSTREAM_TIMEOUT: True,
    ErrorCode.UPSTREAM_PROTOCOL_ERROR: False,
    ErrorCode.STREAM_INTERRUPTED: True,
    ErrorCode.SHUTTING_DOWN: True,
    ErrorCode.UNAUTHORIZED: False,
    ErrorCode.RATE_LIMITED: True,
    ErrorCode.BUDGET_EXCEEDED: False,
    ErrorCode.PROMPT_TOO_LARGE: False,
    ErrorCode.RESUME_UNAVAILABLE: False,
    ErrorCode.INTERNAL: True,
}


class ProtocolViolation(Exception):
    """A client frame broke protocol v1; becomes an `error` frame, never a crash."""

    def __init__(self, code: ErrorCode, message: str, stream_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.stream_id = stream_id


# --------------------------------------------------------------------------- client frames


@dataclass(frozen=True, slots=True)
class Start:
    """`start`: open a stream. `messages` is normalised (a `prompt` becomes one user message)."""

    id: str
    messages: tuple[dict[str, Any], ...]
    model: str | None
    options: dict[str, Any]
    #: The part kinds the client asked for besides text (protocol.md, "Parts").
    parts: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Cancel:
    """`cancel`: stop a stream and its upstream request at once."""

    id: str


@dataclass(frozen=True, slots=True)
class Ping:
    """`ping`: an application-level liveness probe, answered by `pong`."""


@dataclass(frozen=True, slots=True)
class Auth:
    """`auth`: a bearer token sent as the first message (browsers) or to refresh one."""

    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Resume:
    """`resume`: follow a stream started on another (dropped) socket, from after seq `after`."""

    id: str
    resume_token: str = field(repr=False)
    after: int


ClientMessage = Start | Cancel | Ping | Auth | Resume


def _depth_ok(value: Any, limit: int) -> bool:
    """True when `value` nests no deeper than `limit` containers (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item)
    return True


def _stream_id(obj: dict[str, Any]) -> str:
    sid = obj.get("id")
    if not isinstance(sid, str) or ID_PATTERN.fullmatch(sid) is None:
        raise ProtocolViolation(
            ErrorCode.BAD_MESSAGE,
            "'id' must be a string of 1 to 64 characters from [A-Za-z0-9._:-]",
        )
    return sid


def _messages(obj: dict[str, Any], sid: str) -> tuple[dict[str, Any], ...]:
    prompt = obj.get("prompt")
    raw = obj.get("messages")
    if prompt is not None and raw is not None:
        raise ProtocolViolation(
            ErrorCode.BAD_MESSAGE, "give either 'prompt' or 'messages', not both", sid
        )
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise ProtocolViolation(
                ErrorCode.BAD_MESSAGE, "'prompt' must be a non-empty string", sid
            )
        return ({"role": "user", "content": prompt},)
    if raw is None:
        raise ProtocolViolation(ErrorCode.BAD_MESSAGE, "'start' needs 'prompt' or 'messages'", sid)
    if not isinstance(raw, list) or not raw:
        raise ProtocolViolation(ErrorCode.BAD_MESSAGE, "'messages' must be a non-empty list", sid)
    out: list[dict[str, Any]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ProtocolViolation(ErrorCode.BAD_MESSAGE, f"messages[{i}] must be an object", sid)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ProtocolViolation(
                ErrorCode.BAD_MESSAGE,
                f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}",
                sid,
            )
        calls = m.get("tool_calls") if role == "assistant" else None
        message: dict[str, Any] = {"role": role}
        if calls is not None:
            message["tool_calls"] = _tool_calls(calls, i, sid)
        # Content is a string, or a list of typed parts (multimodal) passed through as given;
        # an assistant message that calls tools may have none (null).
        if content is None and calls is not None:
            pass
        elif not (isinstance(content, str) or (isinstance(content, list) and content)):
            raise ProtocolViolation(
                ErrorCode.BAD_MESSAGE,
                f"messages[{i}].content must be a string or a non-empty list of parts",
                sid,
            )
        elif isinstance(content, list) and not all(
            isinstance(p, dict) and isinstance(p.get("type"), str) for p in content
        ):
            raise ProtocolViolation(
                ErrorCode.BAD_MESSAGE,
                f"messages[{i}].content parts must be objects with a string 'type'",
                sid,
            )
        message["content"] = content
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not 0 < len(call_id) <= MAX_TOOL_ID:
                raise ProtocolViolation(
                    ErrorCode.BAD_MESSAGE,
                    f"messages[{i}].tool_call_id must be the call_id of the tool call it answers",
                    sid,
                )
            message["tool_call_id"] = call_id
        out.append(message)
    return tuple(out)


def _tool_calls(calls: Any, i: int, sid: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`, as the OpenAI chat API takes them back."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list) or not 0 < len(calls) <= MAX_TOOLS:
        raise ProtocolViolation(
            ErrorCode.BAD_MESSAGE, f"{where} must be a list of 1 to {MAX_TOOLS} calls", sid
        )
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        call_id = call.get("id") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(call_id, str)
            or not 0 < len(call_id) <= MAX_TOOL_ID
            or call.get("type", "function") != "function"
            or not isinstance(function.get("name"), str)
            or _TOOL_NAME.fullmatch(function["name"]) is None
            or not isinstance(function.get("arguments", ""), str)
        ):
            raise ProtocolViolation(
                ErrorCode.BAD_MESSAGE,
                f"{where}[{j}] must be {{'id', 'type': 'function', 'function': {{'name', "
                "'arguments' (a JSON string)}}}",
                sid,
            )
        out.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": function["name"], "arguments": function.get("arguments", "")},
            }
        )
    return out


#: Keys a tool declaration's `function` may have (OpenAI's chat `tools`).
_FUNCTION_KEYS: Final = frozenset({"name", "description", "parameters", "strict"})


def _check_tools(options: dict[str, Any], sid: str) -> None:
    """`options.tools`, `tool_choice`, `parallel_tool_calls` and `stream_mode`, strictly."""
    tools = options.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not 0 < len(tools) <= MAX_TOOLS:
            raise ProtocolViolation(
                ErrorCode.BAD_MESSAGE, f"'options.tools' must be a list of 1 to {MAX_TOOLS}", sid
            )
        for j, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if (
                not isinstance(function, dict)
                or set(tool) - {"type", "function"}
                or tool.get("type") != "function"
                or set(function) - _FUNCTION_KEYS
                or not isinstance(function.get("name"), str)
                or _TOOL_NAME.fullmatch(function["name"]) is None
                or not isinstance(function.get("description", ""), str)
                or not isinstance(function.get("parameters", {}), dict)
                or not isinstance(function.get("strict", False), bool)
            ):
                raise ProtocolViolation(
                    ErrorCode.BAD_MESSAGE,
                    f"options.tools[{j}] must be {{'type': 'function', 'function': {{'name', "
                    "'description'?, 'parameters'? (a JSON schema), 'strict'?}}}",
                    sid,
                )
    choice = options.get("tool_choice")
    if choice is not None and choice not in ("auto", "none", "required"):
        function = choice.get("function") if isinstance(choice, dict) else None
        if (
            not isinstance(function, dict)
            or choice.get("type") != "function"
            or not isinstance(function.get("name"), str)
        ):
            raise ProtocolViolation(
                ErrorCode.BAD_MESSAGE,
                "'options.tool_choice' must be 'auto', 'none', 'required' or "
                "{'type': 'function', 'function': {'name'}}",
                sid,
            )
    parallel = options.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ProtocolViolation(
            ErrorCode.BAD_MESSAGE, "'options.parallel_tool_calls' must be true or false", sid
        )
    mode = options.get("stream_mode")
    if mode is not None and mode not in ("full", "concise"):
        raise ProtocolViolation(
            ErrorCode.BAD_MESSAGE, "'options.stream_mode' must be 'full' or 'concise'", sid
        )


def _parts(obj: dict[str, Any], sid: str) -> frozenset[str]:
    """`start.parts`: the kinds a client wants besides text; an unknown one is named."""
    parts = obj.get("parts")
    if parts is None:
        return frozenset()
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise ProtocolViolation(
            ErrorCode.BAD_MESSAGE, f"'parts' must be a list of: {', '.join(PART_KINDS)}", sid
        )
    for kind in parts:
        if kind not in KNOWN_PARTS:
            raise ProtocolViolation(
                ErrorCode.BAD_MESSAGE,
                f"unknown part {kind[:32]!r} (known: {', '.join(PART_KINDS)})",
                sid,
            )
    return frozenset(parts)


def _options(obj: dict[str, Any], sid: str) -> dict[str, Any]:
    options = obj.get("options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ProtocolViolation(ErrorCode.BAD_MESSAGE, "'options' must be an object", sid)
    unknown = sorted(k for k in options if k not in ALLOWED_OPTIONS)
    if unknown:
        raise ProtocolViolation(
            ErrorCode.BAD_MESSAGE,
            f"option not allowed: {unknown[0][:64]!r} (see protocol.md for the allowed options)",
            sid,
        )
    _check_tools(options, sid)
    return dict(options)


def parse_client_frame(data: str | bytes, max_bytes: int) -> ClientMessage:
    """Validate one client frame and return the message it carries.

    Raises `ProtocolViolation` for every documented error (protocol.md, "Errors"). Unknown fields
    are ignored so that clients may be newer than the server.
    """
    if isinstance(data, bytes):
        raise ProtocolViolation(ErrorCode.BAD_MESSAGE, "binary frames are not accepted; send text")
    # A str of n characters encodes to n..4n UTF-8 bytes: encode only when it could matter.
    if len(data) > max_bytes or (len(data) * 4 > max_bytes and len(data.encode()) > max_bytes):
        raise ProtocolViolation(
            ErrorCode.MESSAGE_TOO_LARGE, f"frame exceeds max_message_bytes ({max_bytes})"
        )
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolViolation(ErrorCode.BAD_JSON, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolViolation(ErrorCode.BAD_MESSAGE, "frame must be a JSON object")
    # Each level of nesting opens a bracket, so a frame with few brackets (most: a handful)
    # needs no walk; brackets inside strings only make the count an overestimate.
    if data.count("{") + data.count("[") > MAX_JSON_DEPTH and not _depth_ok(obj, MAX_JSON_DEPTH):
        raise ProtocolViolation(
            ErrorCode.BAD_MESSAGE, f"frame nests deeper than {MAX_JSON_DEPTH} levels"
        )
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolViolation(ErrorCode.BAD_MESSAGE, "frame needs a string 'type'")
    if kind == "start":
        sid = _stream_id(obj)
        model = obj.get("model")
        if model is not None and (not isinstance(model, str) or not 0 < len(model) <= 128):
            raise ProtocolViolation(
                ErrorCode.BAD_MESSAGE, "'model' must be a string of 1 to 128 characters", sid
            )
        return Start(sid, _messages(obj, sid), model, _options(obj, sid), _parts(obj, sid))
    if kind == "cancel":
        return Cancel(_stream_id(obj))
    if kind == "ping":
        return Ping()
    if kind == "resume":
        sid = _stream_id(obj)
        token = obj.get("resume_token")
        after = obj.get("after")
        if not isinstance(token, str) or not 0 < len(token) <= 256:
            raise ProtocolViolation(
                ErrorCode.BAD_MESSAGE, "'resume_token' must be the string from 'started'", sid
            )
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise ProtocolViolation(
                ErrorCode.BAD_MESSAGE,
                "'after' must be the last seq received (an integer >= 0)",
                sid,
            )
        return Resume(sid, token, after)
    if kind == "auth":
        token = obj.get("token")
        if not isinstance(token, str) or not 0 < len(token) <= 8192:
            raise ProtocolViolation(ErrorCode.BAD_MESSAGE, "'token' must be a non-empty string")
        return Auth(token)
    raise ProtocolViolation(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:32]!r}")


# --------------------------------------------------------------------------- server frames

_dumps = orjson.dumps

PONG: Final = b'{"type":"pong"}'


def encode_welcome(session: str, limits: dict[str, int]) -> bytes:
    """`welcome`, the first frame on every socket: with the part kinds a `start` may ask for."""
    return _dumps(
        {
            "type": "welcome",
            "protocol": PROTOCOL_VERSION,
            "session": session,
            "limits": limits,
            "parts": PART_KINDS,
        }
    )


def encode_authenticated(expires_at: float | None) -> bytes:
    """`authenticated`: a token refresh on an open socket was accepted."""
    return _dumps({"type": "authenticated", "expires_at": expires_at})


def encode_started(stream_id: str, resume_token: str | None = None) -> bytes:
    """`started`: the start was accepted (sent before the upstream answers)."""
    msg: dict[str, Any] = {"type": "started", "id": stream_id}
    if resume_token is not None:
        msg["resume_token"] = resume_token
    return _dumps(msg)


def encode_resumed(stream_id: str, after: int) -> bytes:
    """`resumed`: the frames with seq > `after` follow, then the stream goes on live."""
    return _dumps({"type": "resumed", "id": stream_id, "after": after})


def chunk_prefix(stream_id: str) -> bytes:
    """The constant head of a stream's text_chunk frames, built once per stream (hot path)."""
    return b'{"type":"text_chunk","id":"' + stream_id.encode() + b'","seq":'


def encode_chunk(prefix: bytes, seq: int, text: str) -> bytes:
    """`text_chunk` from a stream's `chunk_prefix`: one join, one JSON string encode."""
    return b"".join((prefix, str(seq).encode(), b',"text":', _dumps(text), b"}"))


def encode_part(kind: str, stream_id: str, seq: int, fields: dict[str, Any]) -> bytes:
    """A part message: `reasoning_chunk` (`text`), `sources` (`sources`), `tool_call`
    (`call_id`, `name`, `arguments` | `arguments_raw`) or `progress` (`step`)."""
    msg: dict[str, Any] = {"type": kind, "id": stream_id, "seq": seq}
    msg.update(fields)
    return _dumps(msg)


#: `done` metadata lists whose items must have one type (docs/asyncapi.yaml, Done).
_META_ITEMS: Final[dict[str, type]] = {
    "citations": str,
    "search_results": dict,
    "related_questions": str,
    "images": object,
    "videos": object,
}
_USAGE_COUNTS: Final = ("prompt_tokens", "completion_tokens", "total_tokens")


def clean_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The upstream's metadata held to the documented `done` schema (docs/asyncapi.yaml).

    Lists keep only items of the documented type, `usage` keeps its token counts only as
    non-negative integers (its other keys as they are), `finish_reason` only as a string; a
    field of the wrong shape is left out. So an upstream that sends an odd shape cannot make a
    client that validates `done` reject an answer that is otherwise whole.
    """
    out: dict[str, Any] = {}
    for key, value in meta.items():
        item_type = _META_ITEMS.get(key)
        if item_type is not None:
            if isinstance(value, list):
                out[key] = (
                    value if item_type is object else [x for x in value if isinstance(x, item_type)]
                )
        elif key == "usage":
            if isinstance(value, dict):
                out[key] = {
                    k: v
                    for k, v in value.items()
                    if k not in _USAGE_COUNTS
                    or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
                }
        elif key == "finish_reason":
            if isinstance(value, str):
                out[key] = value
        else:
            out[key] = value
    return out


def encode_done(stream_id: str, seq: int, text: str, meta: dict[str, Any]) -> bytes:
    """`done`: the full answer plus whatever metadata the upstream sent (last value wins)."""
    msg: dict[str, Any] = {"type": "done", "id": stream_id, "seq": seq, "text": text}
    msg.update(meta)
    return _dumps(msg)


def encode_meta(meta: dict[str, Any]) -> bytes:
    """The metadata of a `done` alone (its size is what a retained stream keeps of it)."""
    return _dumps(meta)


def encode_cancelled(stream_id: str, seq: int, usage: dict[str, Any] | None = None) -> bytes:
    """`cancelled`: the stream was stopped on request; `seq` is the last message sent; `usage`
    when the upstream had reported any."""
    msg: dict[str, Any] = {"type": "cancelled", "id": stream_id, "seq": seq}
    if usage is not None:
        msg["usage"] = usage
    return _dumps(msg)


def encode_error(
    code: ErrorCode,
    message: str,
    stream_id: str | None = None,
    retryable: bool | None = None,
    **extra: Any,
) -> bytes:
    """`error`, connection-level (`id` null) or a stream's terminal message."""
    msg: dict[str, Any] = {
        "type": "error",
        "id": stream_id,
        "code": code.value,
        "message": message,
        "retryable": RETRYABLE[code] if retryable is None else retryable,
    }
    msg.update(extra)
    return _dumps(msg)
