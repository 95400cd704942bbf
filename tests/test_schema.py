"""docs/asyncapi.yaml is protocol v1: it accepts every example of docs/protocol.md, rejects
broken frames, agrees with the gateway's own tables, and the Python client's parser accepts
exactly the server frames it describes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_client import ProtocolError
from gateway_client._frames import ERROR_CODES, build_start, parse_server_frame

from gateway.core.protocol import ALLOWED_OPTIONS, ErrorCode, ProtocolViolation, parse_client_frame
from tests.schema import (
    CLIENT_FRAMES,
    SERVER_FRAMES,
    FrameSchemaError,
    document,
    validate_client_frame,
    validate_server_frame,
)

#: The repository's own files (docs, deployment, packaging, the page): checked once by `make test`,
#: not again on other Pythons or dependency floors (`make test-min`, `make test-python`).
pytestmark = pytest.mark.repo

PROTOCOL_MD = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def protocol_md_examples() -> list[dict[str, Any]]:
    """Every frame shown in docs/protocol.md: ```json blocks and inline `{"type":...}` spans."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    frames: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    for block in re.findall(r"```json\n(.*?)```", text, re.DOTALL):
        pos = 0
        while True:
            while pos < len(block) and block[pos].isspace():
                pos += 1
            if pos == len(block):
                break
            frame, pos = decoder.raw_decode(block, pos)
            frames.append(frame)
    frames.extend(json.loads(span) for span in re.findall(r'`(\{"type":[^`]*\})`', text))
    return frames


def validate(frame: dict[str, Any]) -> None:
    """Validate a frame in the direction its type belongs to."""
    if frame["type"] in CLIENT_FRAMES:
        validate_client_frame(frame)
    else:
        validate_server_frame(frame)


def asyncapi_examples() -> list[dict[str, Any]]:
    """The example payloads of every message in docs/asyncapi.yaml."""
    messages = document()["components"]["messages"]
    return [ex["payload"] for m in messages.values() for ex in m.get("examples", [])]


# ------------------------------------------------------------------ the document


def test_document_is_an_asyncapi_3_description_of_the_socket() -> None:
    """The document is AsyncAPI 3.0 with the /v1/ws channel, every frame type as a message of
    the right operation, and the close codes of protocol.md."""
    doc = document()
    assert doc["asyncapi"] == "3.0.0"
    channel = doc["channels"]["ws"]
    assert channel["address"] == "/v1/ws"
    assert set(channel["messages"]) == set(SERVER_FRAMES) | set(CLIENT_FRAMES)
    ops = doc["operations"]

    def names(op: str) -> set[str]:
        return {ref["$ref"].rsplit("/", 1)[1] for ref in ops[op]["messages"]}

    assert (ops["receiveClientFrames"]["action"], ops["sendServerFrames"]["action"]) == (
        "receive",
        "send",
    )
    assert names("receiveClientFrames") == set(CLIENT_FRAMES)
    assert names("sendServerFrames") == set(SERVER_FRAMES)
    codes = [c["code"] for c in doc["info"]["x-close-codes"]]
    assert codes == [1000, 1001, 1002, 1007, 1009, 1011, 4401, 4408, 4429]
    table = re.findall(r"^\| (\d{4}) \|", PROTOCOL_MD.read_text(encoding="utf-8"), re.MULTILINE)
    assert [int(c) for c in table] == codes


def test_error_codes_agree_with_protocol_md_the_gateway_and_the_client() -> None:
    """The ErrorCode enum is exactly protocol.md's error table, the gateway's ErrorCode and the
    codes the Python client knows."""
    enum = document()["components"]["schemas"]["ErrorCode"]["enum"]
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    errors_section = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    table = re.findall(r"^\| `([a-z_]+)` \|", errors_section, re.MULTILINE)
    assert len(enum) == len(set(enum))
    assert set(enum) == set(table) == {c.value for c in ErrorCode} == ERROR_CODES


def test_options_agree_with_the_gateway() -> None:
    """The allowed start options are exactly the gateway's ALLOWED_OPTIONS."""
    options = document()["components"]["schemas"]["Options"]["propertyNames"]["enum"]
    assert set(options) == ALLOWED_OPTIONS


# ------------------------------------------------------------------ examples


def test_every_protocol_md_example_is_valid() -> None:
    """Each frame shown in docs/protocol.md validates against the schema of its type."""
    examples = protocol_md_examples()
    for frame in examples:
        validate(frame)
    shown = {f["type"] for f in examples}
    assert shown >= {"welcome", "start", "cancel", "ping", "pong", "started", "text_chunk"}
    assert shown >= {"done", "error", "auth", "authenticated"}


def test_every_asyncapi_example_is_valid_and_parses() -> None:
    """The document's own examples validate, and the client parses each server example."""
    for frame in asyncapi_examples():
        validate(frame)
        if frame["type"] in SERVER_FRAMES:
            assert parse_server_frame(frame) is not None


BROKEN_SERVER = [
    {"type": "welcome", "protocol": 1, "session": "s"},
    {"type": "welcome", "protocol": 0, "session": "s", "limits": {"max_streams": 1}},
    {"type": "started"},
    {"type": "started", "id": "has space"},
    {"type": "started", "id": "x" * 65},
    {"type": "started", "id": "s1", "resume_token": ""},
    {"type": "text_chunk", "id": "s1", "seq": 0, "text": "x"},
    {"type": "text_chunk", "id": "s1", "seq": 1},
    {"type": "text_chunk", "id": "s1", "seq": "1", "text": "x"},
    {"type": "done", "id": "s1", "text": "x"},
    {"type": "done", "id": "s1", "seq": 1, "text": "x", "citations": [{"url": "u"}]},
    {"type": "done", "id": "s1", "seq": 1, "text": "x", "usage": {"total_tokens": -1}},
    {"type": "done", "id": "s1", "seq": 1, "text": "x", "finish_reason": None},
    {"type": "cancelled", "id": "s1"},
    {"type": "error", "code": "internal", "message": "m", "retryable": True},
    {"type": "error", "id": None, "code": "nope", "message": "m", "retryable": True},
    {"type": "error", "id": None, "code": "internal", "message": "m", "retryable": "yes"},
    {"type": "error", "id": "s", "code": "upstream_error", "message": "m", "retryable": True,
     "seq": 0, "status": 99},
    {"type": "authenticated"},
    {"type": "authenticated", "expires_at": "soon"},
    {"type": "resumed", "id": "s1", "after": -1},
    {"type": "welcomed"},
    ["not", "an", "object"],
]  # fmt: skip

BROKEN_CLIENT = [
    {"type": "start", "id": "s1"},
    {"type": "start", "id": "s1", "prompt": ""},
    {"type": "start", "id": "s1", "prompt": "a", "messages": [{"role": "user", "content": "b"}]},
    {"type": "start", "id": "s1", "messages": []},
    {"type": "start", "id": "s1", "messages": [{"role": "tool", "content": "b"}]},
    {"type": "start", "id": "s1", "messages": [{"role": "user", "content": []}]},
    {"type": "start", "id": "s1", "prompt": "a", "model": ""},
    {"type": "start", "id": "s1", "prompt": "a", "model": "m" * 129},
    {"type": "start", "id": "s1", "prompt": "a", "options": {"stream": True}},
    {"type": "start", "id": "bad id", "prompt": "a"},
    {"type": "cancel"},
    {"type": "auth", "token": ""},
    {"type": "resume", "id": "s1", "resume_token": "t"},
    {"type": "bogus"},
]


@pytest.mark.parametrize("frame", BROKEN_SERVER, ids=lambda f: str(f)[:60])
def test_broken_server_frames_are_rejected(frame: Any) -> None:
    """Server frames that break protocol v1 fail validation."""
    with pytest.raises(FrameSchemaError):
        validate_server_frame(frame)


@pytest.mark.parametrize("frame", BROKEN_CLIENT, ids=lambda f: str(f)[:60])
def test_broken_client_frames_are_rejected_by_schema_and_gateway(frame: dict[str, Any]) -> None:
    """Client frames that break protocol v1 fail validation, and the gateway refuses them too."""
    with pytest.raises(FrameSchemaError):
        validate_client_frame(frame)
    with pytest.raises(ProtocolViolation):
        parse_client_frame(json.dumps(frame), 65536)


def test_valid_client_frames_are_accepted_by_the_gateway() -> None:
    """Every schema-valid client example is accepted by the gateway's parser."""
    frames = [f for f in protocol_md_examples() + asyncapi_examples() if f["type"] in CLIENT_FRAMES]
    assert frames
    for frame in frames:
        validate_client_frame(frame)
        parse_client_frame(json.dumps(frame), 65536)


def test_client_builds_schema_valid_start_frames() -> None:
    """The start frames the Python client sends match the schema."""
    validate_client_frame(build_start("a-1", prompt="Why?"))
    messages = [{"role": "system", "content": "Brief."}, {"role": "user", "content": "Hi"}]
    validate_client_frame(
        build_start("b.2", messages=messages, model="sonar-pro", options={"temperature": 0.1})
    )


# ------------------------------------------------------------------ the client's parser


MUTANTS: list[Any] = [None, True, 0, -1, 1, 2.0, 1.5, "", "x", "bad id", [], ["x"], [1], {}]


def mutations(frame: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Variants of `frame` with one field dropped or replaced (also one level down)."""
    for key, value in frame.items():
        if key == "type":
            continue
        yield f"-{key}", {k: v for k, v in frame.items() if k != key}
        for mutant in MUTANTS:
            yield f"{key}={mutant!r}", {**frame, key: mutant}
        if isinstance(value, dict):
            for inner in [*value, "max_prompt_chars", "allowed_models", "total_tokens"]:
                for mutant in MUTANTS:
                    yield f"{key}.{inner}={mutant!r}", {**frame, key: {**value, inner: mutant}}
        if isinstance(value, list):
            yield f"{key}[]+{{}}", {**frame, key: [*value, {}]}
    if frame["type"] == "started":
        yield "resume_token=''", {**frame, "resume_token": ""}
        yield "resume_token='t'", {**frame, "resume_token": "t"}
        yield "resume_token=257", {**frame, "resume_token": "t" * 257}
    if frame["type"] == "error":
        for extra in ("seq", "status", "retry_after_ms"):
            for mutant in MUTANTS:
                yield f"+{extra}={mutant!r}", {**frame, extra: mutant}


def schema_accepts(frame: Any) -> bool:
    try:
        validate_server_frame(frame)
    except FrameSchemaError:
        return False
    return True


def parser_accepts(frame: Any) -> bool:
    try:
        parse_server_frame(frame)
    except ProtocolError:
        return False
    return True


def test_client_parser_accepts_exactly_what_the_schema_describes() -> None:
    """Over every server example and hundreds of one-field mutations of them, the client's
    parser accepts a frame exactly when the schema does, except two deliberate leniencies for
    newer gateways: an unknown `type` is ignored and an unknown error `code` is accepted."""
    examples = [
        f for f in asyncapi_examples() + protocol_md_examples() if f["type"] in SERVER_FRAMES
    ]
    checked = 0
    for example in examples:
        assert schema_accepts(example)
        assert parser_accepts(example)
        for what, frame in mutations(example):
            schema, parser = schema_accepts(frame), parser_accepts(frame)
            lenient = (
                frame["type"] == "error"
                and what.startswith("code=")
                and isinstance(frame["code"], str)
                and frame["code"] != ""
            )
            if lenient:
                assert (schema, parser) == (False, True), (what, frame)
            else:
                assert schema == parser, (what, frame, schema, parser)
            checked += 1
    assert checked > 500
    unknown = {"type": "from_the_future", "id": "s1"}
    assert not schema_accepts(unknown)
    assert parse_server_frame(unknown) is None
