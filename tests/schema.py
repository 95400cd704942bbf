"""Protocol v1 frames checked against docs/asyncapi.yaml (JSON Schema, draft 7).

`validate_server_frame(frame)` and `validate_client_frame(frame)` raise `FrameSchemaError` (an
AssertionError, so pytest shows it as a failed check) when a decoded frame does not match the
schema of its `type`. They are cheap enough to run on every frame of the end-to-end suite: the
document is loaded and every validator compiled once, on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

ASYNCAPI_PATH: Final = Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml"
_BASE: Final = "urn:llm-ws-gateway:asyncapi"

#: Frame `type` -> schema name in components/schemas, per direction.
SERVER_FRAMES: Final = {
    "welcome": "Welcome",
    "started": "Started",
    "text_chunk": "TextChunk",
    "reasoning_chunk": "ReasoningChunk",
    "sources": "Sources",
    "tool_call": "ToolCall",
    "progress": "Progress",
    "done": "Done",
    "cancelled": "Cancelled",
    "error": "Error",
    "pong": "Pong",
    "authenticated": "Authenticated",
    "resumed": "Resumed",
}
CLIENT_FRAMES: Final = {
    "start": "Start",
    "cancel": "Cancel",
    "ping": "Ping",
    "auth": "Auth",
    "resume": "Resume",
}


class FrameSchemaError(AssertionError):
    """A frame does not match docs/asyncapi.yaml."""


@functools.cache
def document() -> dict[str, Any]:
    """The parsed AsyncAPI document."""
    with ASYNCAPI_PATH.open(encoding="utf-8") as f:
        doc: dict[str, Any] = yaml.safe_load(f)
    return doc


@functools.cache
def _validators() -> dict[str, Draft7Validator]:
    doc = document()
    registry: Registry[Any] = Registry().with_resource(
        _BASE, Resource.from_contents(doc, default_specification=DRAFT7)
    )
    names = {*SERVER_FRAMES.values(), *CLIENT_FRAMES.values()}
    validators = {}
    for name in names:
        schema = {"$ref": f"{_BASE}#/components/schemas/{name}"}
        Draft7Validator.check_schema(doc["components"]["schemas"][name])
        validators[name] = Draft7Validator(schema, registry=registry)
    return validators


def _validate(frame: Any, by_type: Mapping[str, str], direction: str) -> None:
    if not isinstance(frame, dict):
        raise FrameSchemaError(f"{direction} frame is not a JSON object: {frame!r}")
    kind = frame.get("type")
    name = by_type.get(kind) if isinstance(kind, str) else None
    if name is None:
        raise FrameSchemaError(f"{direction} frame of undocumented type {kind!r}: {frame!r}")
    errors = sorted(_validators()[name].iter_errors(frame), key=lambda e: list(e.path))
    if errors:
        details = "; ".join(
            f"{'/'.join(map(str, e.absolute_path)) or '(frame)'}: {e.message}" for e in errors
        )
        raise FrameSchemaError(f"{direction} {kind!r} frame breaks docs/asyncapi.yaml: {details}")


def validate_server_frame(frame: Any) -> None:
    """Raise `FrameSchemaError` unless `frame` (decoded JSON) is a documented server frame."""
    _validate(frame, SERVER_FRAMES, "server")


def validate_client_frame(frame: Any) -> None:
    """Raise `FrameSchemaError` unless `frame` (decoded JSON) is a documented client frame."""
    _validate(frame, CLIENT_FRAMES, "client")
