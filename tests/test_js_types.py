"""clients/js/index.d.ts against docs/asyncapi.yaml: every frame type of the protocol has a
TypeScript interface with the same fields, required where the schema requires them, so the JS
types cannot drift from the spec (the e2e suite already pins the spec to the gateway)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.schema import CLIENT_FRAMES, SERVER_FRAMES, document

#: The repository's own files (docs, deployment, packaging, the page): checked once by `make test`,
#: not again on other Pythons or dependency floors (`make test-min`, `make test-python`).
pytestmark = pytest.mark.repo

DTS = Path(__file__).resolve().parents[1] / "clients" / "js" / "index.d.ts"
#: Frame type -> TypeScript interface(s) holding its fields.
TS_NAMES = {
    "welcome": ["WelcomeFrame"],
    "started": ["StartedFrame"],
    "text_chunk": ["TextChunkFrame"],
    "reasoning_chunk": ["ReasoningChunkFrame"],
    "sources": ["SourcesFrame"],
    "tool_call": [
        "ToolCallFrameHead",
        "ToolCallBodyBase",
        "ToolCallWithArguments",
        "ToolCallWithRawArguments",
    ],
    "progress": ["ProgressFrame"],
    "done": ["DoneFrame"],
    "cancelled": ["CancelledFrame"],
    "error": ["ErrorFrame"],
    "pong": ["PongFrame"],
    "authenticated": ["AuthenticatedFrame"],
    "resumed": ["ResumedFrame"],
    "start": ["StartBase", "StartPromptFrame", "StartMessagesFrame"],
    "cancel": ["CancelFrame"],
    "ping": ["PingFrame"],
    "auth": ["AuthFrame"],
    "resume": ["ResumeFrame"],
}


def interfaces() -> dict[str, dict[str, bool]]:
    """Interface name -> {field: optional?}, from index.d.ts (comments stripped)."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", DTS.read_text(encoding="utf-8"), flags=re.S)
    found: dict[str, dict[str, bool]] = {}
    for match in re.finditer(r"interface\s+(\w+)(?:\s+extends\s+\w+)?\s*\{(.*?)\n\}", text, re.S):
        fields: dict[str, bool] = {}
        for line in match.group(2).splitlines():
            field = re.match(r"\s*(?:readonly\s+)?(\w+)(\??):", line)
            if field:
                fields[field.group(1)] = field.group(2) == "?"
        found[match.group(1)] = fields
    return found


def resolved(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with its `$ref` followed and its `allOf` merged into one object schema
    (properties, required and oneOf of every part), which is what a TypeScript interface
    that extends others, or an intersection of them, declares."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        schema = document()["components"]["schemas"][name]
    merged: dict[str, Any] = {
        "properties": dict(schema.get("properties", {})),
        "required": list(schema.get("required", [])),
        "oneOf": list(schema.get("oneOf", [])),
    }
    for part in schema.get("allOf", []):
        inner = resolved(part)
        merged["properties"].update(inner["properties"])
        merged["required"] += inner["required"]
        merged["oneOf"] += inner["oneOf"]
    return merged


def schema_for(kind: str) -> dict[str, Any]:
    name = {**SERVER_FRAMES, **CLIENT_FRAMES}[kind]
    return resolved(document()["components"]["schemas"][name])


def alternatives(schema: dict[str, Any]) -> set[str]:
    """Fields required in one branch of a `oneOf` (start's prompt or messages, a tool call's
    arguments or arguments_raw): TypeScript declares each branch as an interface of its own,
    required there and `?: never` in the others."""
    return {field for branch in schema["oneOf"] for field in branch.get("required", [])}


@pytest.mark.parametrize("kind", sorted({*SERVER_FRAMES, *CLIENT_FRAMES}))
def test_every_frame_has_matching_typescript(kind: str) -> None:
    """The interface(s) of a frame declare every schema property, and exactly the schema's
    required ones as required."""
    ts = interfaces()
    fields: dict[str, bool] = {}
    for name in TS_NAMES[kind]:
        assert name in ts, f"index.d.ts has no interface {name} for {kind!r}"
        for field, optional in ts[name].items():
            fields[field] = fields.get(field, True) and optional
    schema = schema_for(kind)
    properties = set(schema["properties"])
    required = set(schema["required"])
    missing = properties - set(fields)
    assert not missing, f"{kind}: index.d.ts lacks {sorted(missing)}"
    extra = {f for f in fields if f not in properties and fields[f] is False}
    assert not extra, f"{kind}: index.d.ts requires fields the spec does not know: {sorted(extra)}"
    either = alternatives(schema)
    ts_required = {f for f, optional in fields.items() if not optional} - either
    assert ts_required == required - either, (
        f"{kind}: required {sorted(ts_required)} != {sorted(required - either)}"
    )
    for field in either:  # required in the interface of its own branch
        assert any(ts[name].get(field) is False for name in TS_NAMES[kind]), (kind, field)


def test_error_codes_match() -> None:
    """index.d.ts's ProtocolErrorCode union lists exactly the spec's error codes."""
    text = DTS.read_text(encoding="utf-8")
    union = re.search(r"type ProtocolErrorCode\s*=(.*?);", text, re.S)
    assert union is not None
    ts_codes = set(re.findall(r'"(\w+)"', union.group(1)))
    spec_codes = set(document()["components"]["schemas"]["ErrorCode"]["enum"])
    assert ts_codes == spec_codes
