"""Client frame parsing and server frame encoding of protocol v1 (pure, no sockets)."""

from __future__ import annotations

import orjson
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from gateway.core.protocol import (
    PONG,
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
    encode_part,
    encode_started,
    encode_welcome,
    parse_client_frame,
)
from gateway.io.websocket import text_frames

MAX = 65536


def parse(obj: object) -> object:
    return parse_client_frame(orjson.dumps(obj).decode(), MAX)


def violation(data: str | bytes, max_bytes: int = MAX) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as info:
        parse_client_frame(data, max_bytes)
    return info.value


def test_start_with_prompt_becomes_one_user_message() -> None:
    """A `prompt` is forwarded unchanged as a single user message."""
    msg = parse({"type": "start", "id": "s1", "prompt": "Why is the sky blue?"})
    assert msg == Start("s1", ({"role": "user", "content": "Why is the sky blue?"},), None, {})


def test_start_with_messages_model_and_allowed_options() -> None:
    """`messages`, `model` and allow-listed `options` are kept as given."""
    msg = parse(
        {
            "type": "start",
            "id": "a.b:c-d_9",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi", "name": "ignored-extra-field"},
            ],
            "model": "sonar-pro",
            "options": {"temperature": 0.2, "search_recency_filter": "week"},
            "unknown_field": "ignored",
        }
    )
    assert isinstance(msg, Start)
    assert msg.model == "sonar-pro"
    assert msg.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    )
    assert msg.options == {"temperature": 0.2, "search_recency_filter": "week"}


def test_cancel_and_ping() -> None:
    """`cancel` carries its id; `ping` has no fields."""
    assert parse({"type": "cancel", "id": "s1"}) == Cancel("s1")
    assert parse({"type": "ping"}) == Ping()


@pytest.mark.parametrize(
    "sid",
    ["", "x" * 65, "has space", "slash/", "é", 5, None, ["s1"]],
)
def test_bad_ids_are_bad_message(sid: object) -> None:
    """Ids outside 1-64 chars of [A-Za-z0-9._:-] are refused with bad_message."""
    exc = violation(orjson.dumps({"type": "start", "id": sid, "prompt": "x"}).decode())
    assert exc.code is ErrorCode.BAD_MESSAGE
    assert exc.stream_id is None


def test_longest_valid_id_is_accepted() -> None:
    """An id of exactly 64 allowed characters is valid."""
    msg = parse({"type": "cancel", "id": "A" * 64})
    assert msg == Cancel("A" * 64)


@pytest.mark.parametrize(
    ("frame", "fragment"),
    [
        ({"type": "start", "id": "s1"}, "needs 'prompt' or 'messages'"),
        ({"type": "start", "id": "s1", "prompt": ""}, "non-empty string"),
        ({"type": "start", "id": "s1", "prompt": 3}, "non-empty string"),
        ({"type": "start", "id": "s1", "prompt": "a", "messages": []}, "not both"),
        ({"type": "start", "id": "s1", "messages": []}, "non-empty list"),
        ({"type": "start", "id": "s1", "messages": ["hi"]}, "must be an object"),
        ({"type": "start", "id": "s1", "messages": [{"role": "robot", "content": "x"}]}, "role"),
        (
            {"type": "start", "id": "s1", "messages": [{"role": "tool", "content": "x"}]},
            "tool_call_id",
        ),
        (
            {"type": "start", "id": "s1", "prompt": "x", "parts": ["reasoning", "thoughts"]},
            "thoughts",
        ),
        ({"type": "start", "id": "s1", "prompt": "x", "parts": "reasoning"}, "parts"),
        (
            {"type": "start", "id": "s1", "prompt": "x", "options": {"stream_mode": "brief"}},
            "stream_mode",
        ),
        (
            {
                "type": "start",
                "id": "s1",
                "prompt": "x",
                "options": {"tools": [{"type": "function"}]},
            },
            "tools",
        ),
        (
            {"type": "start", "id": "s1", "prompt": "x", "options": {"tool_choice": "always"}},
            "tool_choice",
        ),
        (
            {
                "type": "start",
                "id": "s1",
                "messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}],
            },
            "tool_calls",
        ),
        ({"type": "start", "id": "s1", "messages": [{"role": "user", "content": 1}]}, "content"),
        (
            {"type": "start", "id": "s1", "messages": [{"role": "user", "content": [1]}]},
            "parts",
        ),
        ({"type": "start", "id": "s1", "prompt": "a", "model": ""}, "'model'"),
        ({"type": "start", "id": "s1", "prompt": "a", "options": []}, "'options'"),
        ({"type": "start", "id": "s1", "prompt": "a", "options": {"stream": False}}, "stream"),
        ({"type": "start", "id": "s1", "prompt": "a", "options": {"_debug": 1}}, "_debug"),
    ],
)
def test_bad_start_is_bad_message_with_its_id(frame: dict[str, object], fragment: str) -> None:
    """A start with a valid id but bad content is refused with bad_message naming that id."""
    exc = violation(orjson.dumps(frame).decode())
    assert exc.code is ErrorCode.BAD_MESSAGE
    assert exc.stream_id == "s1"
    assert fragment in exc.message


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ("{not json", ErrorCode.BAD_JSON),
        ("", ErrorCode.BAD_JSON),
        ("[1, 2]", ErrorCode.BAD_MESSAGE),
        ('"start"', ErrorCode.BAD_MESSAGE),
        ("{}", ErrorCode.BAD_MESSAGE),
        ('{"type": 1}', ErrorCode.BAD_MESSAGE),
        ('{"type": "launch"}', ErrorCode.UNKNOWN_TYPE),
        (b'{"type": "ping"}', ErrorCode.BAD_MESSAGE),
    ],
)
def test_connection_level_errors(data: str | bytes, code: ErrorCode) -> None:
    """Malformed frames map to the documented connection-level codes, with no stream id."""
    exc = violation(data)
    assert exc.code is code
    assert exc.stream_id is None


def test_frame_size_counts_utf8_bytes() -> None:
    """max_message_bytes is measured in UTF-8 bytes, not characters."""
    frame = orjson.dumps({"type": "start", "id": "s", "prompt": "é" * 40}).decode()
    size = len(frame.encode())
    assert isinstance(parse_client_frame(frame, size), Start)
    assert violation(frame, size - 1).code is ErrorCode.MESSAGE_TOO_LARGE


def test_deep_json_is_refused() -> None:
    """Nesting deeper than the bound is refused before anything walks it."""
    deep: object = "x"
    for _ in range(40):
        deep = {"a": deep}
    frame = orjson.dumps({"type": "start", "id": "s", "prompt": "p", "options": deep}).decode()
    exc = violation(frame)
    assert exc.code is ErrorCode.BAD_MESSAGE
    assert "deeper" in exc.message


def test_server_frames_are_the_documented_json() -> None:
    """Every encoder produces exactly the JSON object protocol.md shows."""
    assert orjson.loads(encode_welcome("abc", {"max_streams": 16})) == {
        "type": "welcome",
        "protocol": 1,
        "session": "abc",
        "limits": {"max_streams": 16},
        "parts": ["reasoning", "sources", "tools", "progress"],
    }
    assert orjson.loads(encode_started("s1")) == {"type": "started", "id": "s1"}
    assert orjson.loads(encode_chunk(chunk_prefix("s1"), 7, 'He said "hi"\n')) == {
        "type": "text_chunk",
        "id": "s1",
        "seq": 7,
        "text": 'He said "hi"\n',
    }
    assert orjson.loads(encode_done("s1", 3, "abc", {"usage": {"total_tokens": 5}})) == {
        "type": "done",
        "id": "s1",
        "seq": 3,
        "text": "abc",
        "usage": {"total_tokens": 5},
    }
    assert orjson.loads(encode_cancelled("s1", 2)) == {"type": "cancelled", "id": "s1", "seq": 2}
    assert orjson.loads(encode_cancelled("s1", 2, {"total_tokens": 9})) == {
        "type": "cancelled",
        "id": "s1",
        "seq": 2,
        "usage": {"total_tokens": 9},
    }
    assert orjson.loads(
        encode_part("tool_call", "s1", 4, {"call_id": "c", "name": "f", "arguments": {}})
    ) == {
        "type": "tool_call",
        "id": "s1",
        "seq": 4,
        "call_id": "c",
        "name": "f",
        "arguments": {},
    }
    assert orjson.loads(encode_error(ErrorCode.UPSTREAM_ERROR, "m", "s1", True, status=503)) == {
        "type": "error",
        "id": "s1",
        "code": "upstream_error",
        "message": "m",
        "retryable": True,
        "status": 503,
    }
    assert orjson.loads(encode_error(ErrorCode.BAD_JSON, "m"))["retryable"] is False
    assert orjson.loads(PONG) == {"type": "pong"}


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
def test_text_frames_parse_as_websocket_frames(size: int) -> None:
    """The writer's own framing (no extensions) is what a WebSocket client reads: every length
    class (7-bit, 16-bit, 64-bit) and several frames in one write, in order."""
    messages = [b"a" * size, b'{"type":"pong"}', "é".encode() * (size // 2)]
    client = ClientProtocol(parse_uri("ws://gateway/v1/ws"), state=State.OPEN, max_size=None)
    client.receive_data(text_frames(messages))
    frames = client.events_received()
    assert [(f.opcode, f.fin, f.data) for f in frames] == [(Opcode.TEXT, True, m) for m in messages]
    assert client.state is State.OPEN
    assert client.parser_exc is None
