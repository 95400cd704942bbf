"""Google Gemini's wire format (``POST /v1beta/models/{model}:streamGenerateContent?alt=sse``,
Vertex AI's ``.../publishers/google/models/{model}:streamGenerateContent?alt=sse``): one
``data:`` event per piece, each a whole ``GenerateContentResponse``, CRLF line endings, no
event names and no ``[DONE]``; a clean EOF after the candidate with a ``finishReason`` ends it
(compare the recorded streams ``google-gemini-*`` in ``reference/transcripts/``).

Each event is ``{"candidates": [{"content": {"parts": [...], "role": "model"}, "index": 0}],
"usageMetadata": {...}, "modelVersion", "responseId"}`` with the running usage
(``promptTokenCount``, ``candidatesTokenCount``, ``thoughtsTokenCount``, ``totalTokenCount``).
The last has an empty text part (with a ``thoughtSignature``, as Gemini 3 sends it) and
``finishReason: "STOP"`` (``MAX_TOKENS`` with finish=length; finish=0 leaves it out).

Typed parts, in the API's shapes:

* reasoning=thought: ``{"text": ..., "thought": true}`` parts before the answer
  (``includeThoughts``), counted in ``thoughtsTokenCount``;
* tools=1|2|bad_json|no_index: ``functionCall`` parts, each call whole in one event
  (``{"name", "args": {...}}``, no id, a ``thoughtSignature`` on the first), no text, and
  ``finishReason: "STOP"`` as Gemini ends a turn that calls functions; no_index sends the calls
  together in one event (Gemini's parallel calls); bad_json's ``args`` is the broken JSON as a
  string (Gemini itself always sends an object: a malformed upstream);
* sources=N | sources=grow:N: the hosted Google Search's ``groundingMetadata`` on the last event
  (``webSearchQueries``, ``groundingChunks[].web {uri, title}``, ``groundingSupports`` citing
  every chunk, ``searchEntryPoint``); grow: each text event carries it too, one more chunk each
  time up to N. The URIs are the sources' own (Gemini's are redirect URLs to them).
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Final

import orjson

from gateway.mock.formats.base import BadRequest, MockRequest, SpecView, _dumps, _Formatter
from gateway.mock.script import (
    Part,
    Reasoning,
    ToolArgs,
    ToolCall,
    ToolStart,
    WholeCalls,
    source_list,
    tool_calls,
)

#: The google.rpc status Google's APIs give each HTTP status (its "API errors" page).
_STATUSES: Final[Mapping[int, str]] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_ROLES: Final = {"user": "user", "model": "assistant"}


def _parts_text(parts: Any) -> str:
    """The text of a Content's parts (function calls and responses have none)."""
    if not isinstance(parts, list):
        return ""
    return " ".join(
        p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)
    )


class _GeminiFormatter(_Formatter):
    """Gemini ``streamGenerateContent?alt=sse``: whole responses, running usage, the last with
    finishReason STOP."""

    routes = (
        "/gemini",
        "/gemini/models/{model}:streamGenerateContent",
        "/v1beta/models/{model}:streamGenerateContent",
        "/v1/projects/{project}/locations/{location}/publishers/google/models/"
        "{model}:streamGenerateContent",
    )
    default_model = "gemini-2.5-flash"
    crlf = True
    # Every event carries the running usage: nothing to pre-render.
    prerenderable = False
    scripts: ClassVar[frozenset[str]] = frozenset(
        {"reasoning=thought", "tools", "sources", "finish=length"}
    )

    @classmethod
    def read_request(cls, body: Mapping[str, Any], path_model: str | None) -> MockRequest:
        """`contents` (user and model turns of parts) and `systemInstruction`; the model is in
        the path and the route itself streams (``alt=sse``), so every request streams."""
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise BadRequest(
                "* GenerateContentRequest.contents: contents is not specified", "contents"
            )
        turns: list[tuple[str, str]] = []
        system = body.get("systemInstruction")
        if isinstance(system, dict):
            text = _parts_text(system.get("parts"))
            if text:
                turns.append(("system", text))
        for content in contents:
            if not isinstance(content, dict):
                raise BadRequest("Invalid value at 'contents': expected a Content", "contents")
            role = content.get("role", "user")
            if role not in _ROLES:
                raise BadRequest("Please use a valid role: user, model.", "contents.role")
            turns.append((_ROLES[role], _parts_text(content.get("parts"))))
        model = path_model.removeprefix("models/") if path_model else None
        return MockRequest(tuple(turns), model or None, stream=True, include_usage=True)

    @classmethod
    def api_key(cls, headers: Mapping[str, str]) -> str | None:
        """The `x-goog-api-key` header (any case)."""
        for name, value in headers.items():
            if name.lower() == "x-goog-api-key":
                return value
        return None

    @classmethod
    def error_json(
        cls, status: int, kind: str, message: str, param: str | None = None
    ) -> dict[str, Any]:
        """Google's error body: `{"error": {"code", "message", "status"}}`, with the field at
        fault of a 400 in a `google.rpc.BadRequest` detail."""
        error: dict[str, Any] = {
            "code": status,
            "message": message,
            "status": _STATUSES.get(status, "INTERNAL" if status >= 500 else "UNKNOWN"),
        }
        if status == 400 and param:
            violation = {"field": param, "description": message}
            error["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [violation],
                }
            ]
        return {"error": error}

    @staticmethod
    def make_request_id(token: uuid.UUID) -> str:
        """A `responseId` like Gemini's (22 URL-safe base64 characters)."""
        return base64.urlsafe_b64encode(token.bytes).decode().rstrip("=")

    def __init__(self, spec: SpecView) -> None:
        super().__init__(spec)
        knobs = spec.knobs
        #: sources=N: the grounding chunks (the answer's own sources first).
        self.sources = (
            source_list(spec.answer, knobs.sources.count) if knobs.sources is not None else ()
        )
        self.grow = knobs.sources is not None and knobs.sources.grow
        #: Grounding chunks shown so far (sources=grow:N).
        self.shown = 0
        #: The scripted calls by id: a call goes out whole at its start.
        self.calls: dict[str, ToolCall] = {c.call_id: c for c in tool_calls(knobs, spec.request_id)}
        #: Whether a thoughtSignature was sent (Gemini 3 signs the first call, else the end).
        self.signed = False

    # -- the pieces of an event

    def signature(self) -> str:
        """An opaque thoughtSignature (base64, as Gemini's), from the request id."""
        digest = hashlib.sha256(self.spec.request_id.encode()).digest()
        return base64.b64encode(digest * 4).decode()

    def usage(self) -> dict[str, Any]:
        prompt = self.spec.prompt_tokens
        candidates = len(self.text_parts) + self.other_tokens
        thoughts = len(self.reasoning_parts)
        usage: dict[str, Any] = {
            "promptTokenCount": prompt,
            "candidatesTokenCount": candidates,
            "totalTokenCount": prompt + candidates + thoughts,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
        }
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        return usage

    def grounding(self, count: int) -> dict[str, Any]:
        """The hosted search's `groundingMetadata` with the first `count` sources, each cited by
        a support over the answer so far (segment offsets in UTF-8 bytes, as Gemini's)."""
        answer = self.spec.answer
        topic = answer.sources[0].title.split(" - ")[0] if answer.sources else "the question"
        text = "".join(self.text_parts)
        segment = {"startIndex": 0, "endIndex": len(text.encode()), "text": text}
        shown = self.sources[:count]
        return {
            "searchEntryPoint": {
                "renderedContent": f'<div class="container"><a class="chip">{topic}</a></div>'
            },
            "groundingChunks": [{"web": {"uri": s.url, "title": s.title}} for s in shown],
            "groundingSupports": [
                {"segment": segment, "groundingChunkIndices": [i], "confidenceScores": [0.9]}
                for i in range(len(shown))
            ],
            "webSearchQueries": [topic],
        }

    def response(
        self,
        parts: list[dict[str, Any]],
        finish: str | None = None,
        grounding: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
        if finish is not None:
            candidate["finishReason"] = finish
        if grounding is not None:
            candidate["groundingMetadata"] = grounding
        candidate["index"] = 0
        spec = self.spec
        return {
            "candidates": [candidate],
            "usageMetadata": self.usage(),
            "modelVersion": spec.model,
            "responseId": spec.request_id,
        }

    def call_part(self, call: ToolCall) -> dict[str, Any]:
        """A whole `functionCall` part; the first call of the answer carries the signature."""
        try:
            args: Any = orjson.loads(call.arguments)
        except orjson.JSONDecodeError:
            args = call.arguments  # bad_json: not an object (Gemini never sends this)
        part: dict[str, Any] = {"functionCall": {"name": call.name, "args": args}}
        if not self.signed:
            self.signed = True
            part["thoughtSignature"] = self.signature()
        return part

    # -- the stream

    def text(self, piece: str) -> bytes:
        self.text_parts.append(piece)
        grounding = None
        if self.grow:
            self.shown = min(self.shown + 1, len(self.sources))
            grounding = self.grounding(self.shown)
        return self.event(_dumps(self.response([{"text": piece}], grounding=grounding)))

    def part(self, part: Part) -> bytes:
        if isinstance(part, Reasoning):
            self.reasoning_parts.append(part.text)
            return self.event(_dumps(self.response([{"text": part.text, "thought": True}])))
        if isinstance(part, ToolStart):
            self.other_tokens += 1
            return self.event(_dumps(self.response([self.call_part(self.calls[part.call_id])])))
        if isinstance(part, ToolArgs):
            return b""  # the call went out whole at its start: Gemini streams no fragments
        if isinstance(part, WholeCalls):
            self.other_tokens += len(part.calls)
            return self.event(_dumps(self.response([self.call_part(c) for c in part.calls])))
        return super().part(part)

    def finale(self) -> Iterator[tuple[bytes, bool]]:
        knobs = self.spec.knobs
        if not knobs.finish:
            return
        last: dict[str, Any] = {"text": ""}
        if not self.signed:
            self.signed = True
            last["thoughtSignature"] = self.signature()
        finish = "MAX_TOKENS" if knobs.finish == "length" else "STOP"
        grounding = self.grounding(len(self.sources)) if self.sources else None
        yield self.event(_dumps(self.response([last], finish, grounding))), True

    def malformed(self) -> bytes:
        return b'data: {"candidates": [{"content": ' + self.eol + self.eol

    def error_event(self) -> bytes:
        """Gemini's overloaded model, as a data event (what its HTTP 503 body says)."""
        error = {
            "code": 503,
            "message": "The model is overloaded. Please try again later.",
            "status": "UNAVAILABLE",
        }
        return self.event(_dumps({"error": error}))

    def giant(self, size: int) -> bytes:
        return self.event(self.padded(self.response([{"text": ""}]), size))
