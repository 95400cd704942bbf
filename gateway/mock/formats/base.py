"""What every wire format shares (pure): `_Formatter`, the base class of a format module's
formatter, and `SpecView`, what a formatter reads of the stream it renders.

A format module (`gateway.mock.formats.perplexity`, ...) holds one `_Formatter` subclass: the
dialect's events, and its facts as class attributes (routes, default model, line ending, request
ids, which knobs it can honour). It imports only this module; `gateway.mock.formats` registers it
in its table.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import orjson

from gateway.mock.answers import Answer
from gateway.mock.knobs import Knobs
from gateway.mock.script import Part


class SpecView(Protocol):
    """What a formatter reads of its `gateway.mock.formats.StreamSpec`. That module imports this
    one, so the shape is declared here rather than imported (no import goes back up)."""

    @property
    def model(self) -> str: ...
    @property
    def answer(self) -> Answer: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def knobs(self) -> Knobs: ...
    @property
    def include_usage(self) -> bool: ...
    @property
    def request_id(self) -> str: ...
    @property
    def created(self) -> int: ...
    @property
    def eol(self) -> bytes: ...


def _dumps(obj: object) -> bytes:
    return orjson.dumps(obj)


class BadRequest(Exception):
    """A request the mock refuses with a 400 (the API's own error shape); `param` names the
    field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class MockRequest:
    """What the mock reads of a request, whatever its API: the conversation's turns as (role,
    text), the model, whether a stream was asked for and whether usage was."""

    turns: tuple[tuple[str, str], ...]
    model: str | None
    stream: bool
    include_usage: bool = False


def content_text(content: object) -> str:
    """A message's text: a string, or the text parts of a content list (OpenAI's and
    Anthropic's `{type: text, text}` parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def bearer_key(headers: Mapping[str, str]) -> str | None:
    """The key of an `Authorization: Bearer` header, if any."""
    value = headers.get("Authorization")
    if value is None or not value.startswith("Bearer "):
        return None
    return value[len("Bearer ") :]


class _Formatter(ABC):
    """One dialect's events. Stateful (running text, token count): call in stream order.

    The class attributes are the dialect's facts, which the rest of the mock reads from the
    class (`gateway.mock.formats._FORMATTERS`) without rendering anything."""

    #: The POST routes that serve this format; the first is its short name (``/openai``).
    routes: ClassVar[tuple[str, ...]]
    #: The model the events name when the request names none.
    default_model: ClassVar[str]
    #: Whether lines end in CRLF when the crlf knob does not say.
    crlf: ClassVar[bool] = False
    #: Whether the stream ends with a finish_reason chunk (which finish=0 leaves out).
    finish_chunk: ClassVar[bool] = True
    #: Whether fast=1 can pre-render a text event as prefix + JSON-escaped text + suffix.
    prerenderable: ClassVar[bool] = True
    #: The typed parts this API can carry, as knob tokens: "reasoning=think", "tools",
    #: "sources", "concise", "refusal", "choices" (`validate_for_dialect` refuses the rest).
    scripts: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def read_request(cls, body: Mapping[str, Any], path_model: str | None) -> MockRequest:
        """The conversation, model and stream flag of a request body (chat completions by
        default: `messages`, `model`, `stream`, `stream_options.include_usage`). `path_model`
        is the model named in the URL, for APIs that put it there. Raises BadRequest."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("'messages' must be a list of objects", "messages")
        turns = tuple((str(m.get("role")), content_text(m.get("content"))) for m in messages)
        model = body.get("model")
        options = body.get("stream_options")
        return MockRequest(
            turns,
            model if isinstance(model, str) and model else None,
            body.get("stream") is True,
            isinstance(options, dict) and options.get("include_usage") is True,
        )

    @classmethod
    def api_key(cls, headers: Mapping[str, str]) -> str | None:
        """The credential the request carries, where this API puts it (a Bearer token by
        default)."""
        return bearer_key(headers)

    @classmethod
    def error_json(
        cls, status: int, kind: str, message: str, param: str | None = None
    ) -> dict[str, Any]:
        """This API's JSON error body (OpenAI's shape with Perplexity's integer code by
        default); `kind` is the OpenAI-style error type for `status`, `param` the request
        field at fault (400s only)."""
        error: dict[str, Any] = {"message": message, "type": kind}
        if status == 400:
            error["param"] = param
        error["code"] = status
        return {"error": error}

    @staticmethod
    def make_request_id(token: uuid.UUID) -> str:
        """The stream's id (its events' "id", the X-Request-Id header) from a random UUID."""
        return str(token)

    def __init__(self, spec: SpecView) -> None:
        self.spec = spec
        self.eol = spec.eol
        self.text_parts: list[str] = []
        #: Reasoning pieces sent (counted as completion tokens, like real usage).
        self.reasoning_parts: list[str] = []
        #: Other completion tokens sent (tool-call fragments).
        self.other_tokens = 0

    def event(self, data: bytes, name: str | None = None) -> bytes:
        lines = [b"data: " + data]
        if name is not None:
            lines.insert(0, b"event: " + name.encode())
        return self.eol.join(lines) + self.eol + self.eol

    def usage(self) -> dict[str, Any]:
        completion = len(self.text_parts) + len(self.reasoning_parts) + self.other_tokens
        prompt = self.spec.prompt_tokens
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if self.reasoning_parts:
            usage["completion_tokens_details"] = {"reasoning_tokens": len(self.reasoning_parts)}
        return usage

    def padded(self, obj: dict[str, Any], size: int) -> bytes:
        """`obj` plus a "padding" string sized so the JSON is `size` bytes (if it can be)."""
        obj["padding"] = ""
        base = len(_dumps(obj))
        obj["padding"] = "x" * max(0, size - base)
        return _dumps(obj)

    def preamble(self) -> Iterator[bytes]:
        return iter(())

    @abstractmethod
    def text(self, piece: str) -> bytes:
        """The event carrying one text piece."""

    def part(self, part: Part) -> bytes:
        """The event carrying one typed part (`gateway.mock.script`); only the parts named in
        `scripts` reach a format (`validate_for_dialect`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot render {part!r}")

    @abstractmethod
    def finale(self) -> Iterator[tuple[bytes, bool]]:
        """Terminal events as (bytes, paced)."""

    def malformed(self) -> bytes:
        return b'data: {"choices": [' + self.eol + self.eol

    def error_event(self) -> bytes:
        """A mid-stream error event in this API's shape, for an overloaded server (`fault=error`):
        the chat-completions `{"error": {...}}` data event by default."""
        error = {"message": "Overloaded (simulated by the mock upstream)", "type": "server_error"}
        return self.event(_dumps({"error": error}))

    @abstractmethod
    def giant(self, size: int) -> bytes:
        """One event of about `size` bytes that is still valid for the dialect."""
