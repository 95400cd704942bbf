"""Anthropic Messages' wire format (``POST /v1/messages``): named events whose name is their
JSON ``type``, LF separators, no ``[DONE]`` (upstream-formats.md 1c; compare the recorded
streams ``anthropic-messages-*`` in ``reference/transcripts/``).

A stream is ``message_start`` (usage with ``input_tokens``), ``ping``, content blocks
(``content_block_start``, ``content_block_delta``s, ``content_block_stop``), ``message_delta``
(``stop_reason`` and the cumulative usage) and ``message_stop``. finish=0 leaves out the
``message_delta`` (so the message has no stop_reason); done=0 leaves out ``message_stop`` (a
clean EOF after the stop_reason, as the anthropic-sdk recordings end).

Typed parts, in the API's shapes:

* reasoning=thinking: a ``thinking`` block first (``thinking_delta``s, then one
  ``signature_delta``), then the text block;
* tools=1|2|bad_json|no_index: ``tool_use`` blocks (``toolu_`` ids, ``input: {}``), an empty
  ``input_json_delta`` then the argument fragments (no_index: the whole input in one), and
  ``stop_reason: "tool_use"``;
* sources=N | sources=grow:N: a ``server_tool_use`` web search (its query in
  ``input_json_delta``s), a ``web_search_tool_result`` with the N results, then the text block,
  opened with ``"citations": []``, carries one ``citations_delta``
  (``web_search_result_location``) per source before its first text (grow: one before each
  text piece; any left over before the block ends); usage counts the search;
* refusal=1: the refusal text as ``text_delta``s and ``stop_reason: "refusal"``;
* finish=length: ``stop_reason: "max_tokens"`` (whatever else the stream is).
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Final

from gateway.mock.formats.base import (
    BadRequest,
    MockRequest,
    SpecView,
    _dumps,
    _Formatter,
    content_text,
)
from gateway.mock.script import (
    Part,
    Reasoning,
    Refusal,
    ToolArgs,
    ToolStart,
    WholeCalls,
    source_list,
)

#: The error `type` Anthropic's API gives each status (its "Errors" page).
_ERROR_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class _AnthropicFormatter(_Formatter):
    """Messages API events; one content block open at a time, closed when the next kind of
    part begins or the message ends."""

    routes = ("/anthropic", "/v1/messages")
    default_model = "claude-sonnet-4-5"
    scripts: ClassVar[frozenset[str]] = frozenset(
        {"reasoning=thinking", "tools", "sources", "refusal", "finish=length"}
    )

    @classmethod
    def read_request(cls, body: Mapping[str, Any], path_model: str | None) -> MockRequest:
        """`system` (a string or text blocks) and `messages` (content a string or blocks),
        `model`, `stream`; `max_tokens` is required, as the API requires it."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("messages: Input should be a valid list of objects", "messages")
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest("max_tokens: Field required (a positive integer)", "max_tokens")
        system = content_text(body.get("system"))
        turns = [("system", system)] if system else []
        turns += [(str(m.get("role")), content_text(m.get("content"))) for m in messages]
        model = body.get("model")
        return MockRequest(
            tuple(turns),
            model if isinstance(model, str) and model else None,
            body.get("stream") is True,
        )

    @classmethod
    def api_key(cls, headers: Mapping[str, str]) -> str | None:
        return headers.get("x-api-key")

    @classmethod
    def error_json(
        cls, status: int, kind: str, message: str, param: str | None = None
    ) -> dict[str, Any]:
        """Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`, the type
        the API gives `status` (`kind`, OpenAI's name for it, is not used)."""
        error_type = _ERROR_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        return {"type": "error", "error": {"type": error_type, "message": message}}

    @staticmethod
    def make_request_id(token: uuid.UUID) -> str:
        return f"msg_01{token.hex[:22]}"

    def __init__(self, spec: SpecView) -> None:
        super().__init__(spec)
        knobs = spec.knobs
        self.searched = knobs.sources is not None
        #: sources=N: the results and citations (the answer's own sources first).
        self.sources = (
            source_list(spec.answer, knobs.sources.count) if knobs.sources is not None else ()
        )
        self.cited = 0
        #: The open block's kind ("text", "thinking", "tool_use") and index, and the next index.
        self.block: str | None = None
        self.index = -1
        self.next_index = 0
        #: Whether the preamble opens the text block: the body starts with text unless
        #: reasoning or tool calls come first (an unscripted stream always has one, so that a
        #: text event is just its delta: fast=1 pre-renders it).
        self.opens_text = knobs.reasoning is None and knobs.tools is None
        #: The web search (sources=) comes before the first block that is not thinking, as
        #: the API orders them; in the preamble when that is the text block.
        self.search_done = False
        if self.opens_text:
            self.next_index = 2 if self.searched else 0
            self.block, self.index = "text", self.next_index
            self.next_index += 1

    # -- events

    def typed(self, obj: dict[str, Any]) -> bytes:
        """One event, named after its `type`."""
        return self.event(_dumps(obj), obj["type"])

    def delta(self, delta: dict[str, Any], index: int | None = None) -> bytes:
        return self.typed(
            {
                "type": "content_block_delta",
                "index": self.index if index is None else index,
                "delta": delta,
            }
        )

    def start(self, kind: str, block: dict[str, Any]) -> bytes:
        """Close the open block and open the next one (after the web search, if it is due)."""
        out = self.stop()
        if kind != "thinking" and self.searched and not self.search_done:
            out += b"".join(self.search(self.next_index))
            self.next_index += 2
        self.block, self.index = kind, self.next_index
        self.next_index += 1
        return out + self.typed(
            {"type": "content_block_start", "index": self.index, "content_block": block}
        )

    def stop(self) -> bytes:
        """Close the open block (a thinking block ends with its signature)."""
        if self.block is None:
            return b""
        out = b""
        if self.block == "thinking":
            out = self.delta({"type": "signature_delta", "signature": self.signature()})
        self.block = None
        return out + self.typed({"type": "content_block_stop", "index": self.index})

    def signature(self) -> str:
        digest = hashlib.sha256(self.spec.request_id.encode()).digest()
        return base64.b64encode(digest * 3).decode()

    def text_block(self) -> dict[str, Any]:
        if self.searched:
            return {"citations": [], "type": "text", "text": ""}
        return {"type": "text", "text": ""}

    def citations(self, count: int) -> bytes:
        """The next `count` sources' citations (in the open text block)."""
        out = b""
        for source in self.sources[self.cited : self.cited + count]:
            citation = {
                "type": "web_search_result_location",
                "cited_text": f"{source.title}: what this page says about the question.",
                "url": source.url,
                "title": source.title,
                "encrypted_index": base64.b64encode(source.url.encode()).decode(),
            }
            out += self.delta({"type": "citations_delta", "citation": citation})
        self.cited = min(len(self.sources), self.cited + count)
        return out

    def usage(self) -> dict[str, Any]:
        completion = len(self.text_parts) + len(self.reasoning_parts) + self.other_tokens
        usage: dict[str, Any] = {
            "input_tokens": self.spec.prompt_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": completion,
        }
        if self.searched:
            usage["server_tool_use"] = {"web_search_requests": 1}
        return usage

    # -- the stream

    def preamble(self) -> Iterator[bytes]:
        spec = self.spec
        usage = {**self.usage(), "output_tokens": 1, "service_tier": "standard"}
        usage.pop("server_tool_use", None)
        message: dict[str, Any] = {
            "id": spec.request_id,
            "type": "message",
            "role": "assistant",
            "model": spec.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        yield self.typed({"type": "message_start", "message": message})
        if self.searched and self.opens_text:
            yield from self.search(0)
        if self.opens_text:
            yield self.typed(
                {
                    "type": "content_block_start",
                    "index": self.index,
                    "content_block": self.text_block(),
                }
            )
        yield self.typed({"type": "ping"})

    def search(self, first: int) -> Iterator[bytes]:
        """The web search the sources come from: a `server_tool_use` block, its result block
        (indexes `first` and the next)."""
        self.search_done = True
        answer = self.spec.answer
        topic = answer.sources[0].title.split(" - ")[0] if answer.sources else "the question"
        tool_id = "srvtoolu_01" + hashlib.sha256(self.spec.request_id.encode()).hexdigest()[:22]
        use = {"type": "server_tool_use", "id": tool_id, "name": "web_search", "input": {}}
        yield self.typed({"type": "content_block_start", "index": first, "content_block": use})
        query = _dumps({"query": topic}).decode()
        for fragment in ("", query[:10], query[10:]):
            yield self.delta({"type": "input_json_delta", "partial_json": fragment}, first)
        yield self.typed({"type": "content_block_stop", "index": first})
        results = [
            {
                "type": "web_search_result",
                "title": s.title,
                "url": s.url,
                "encrypted_content": base64.b64encode(s.title.encode()).decode(),
                "page_age": s.date,
            }
            for s in self.sources
        ]
        result = {"type": "web_search_tool_result", "tool_use_id": tool_id, "content": results}
        yield self.typed(
            {"type": "content_block_start", "index": first + 1, "content_block": result}
        )
        yield self.typed({"type": "content_block_stop", "index": first + 1})

    def text(self, piece: str) -> bytes:
        self.text_parts.append(piece)
        out = b"" if self.block == "text" else self.start("text", self.text_block())
        if self.cited < len(self.sources):
            grow = self.spec.knobs.sources is not None and self.spec.knobs.sources.grow
            out += self.citations(1 if grow else len(self.sources))
        return out + self.delta({"type": "text_delta", "text": piece})

    def part(self, part: Part) -> bytes:
        if isinstance(part, Reasoning):
            self.reasoning_parts.append(part.text)
            out = b""
            if self.block != "thinking":
                out = self.start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            return out + self.delta({"type": "thinking_delta", "thinking": part.text})
        if isinstance(part, Refusal):
            return self.text(part.text)
        if isinstance(part, ToolStart):
            self.other_tokens += 1
            return self.tool_start(part.call_id, part.name)
        if isinstance(part, ToolArgs):
            self.other_tokens += 1
            return self.delta({"type": "input_json_delta", "partial_json": part.fragment})
        if isinstance(part, WholeCalls):
            out = b""
            for call in part.calls:
                self.other_tokens += 1
                out += self.tool_start(call.call_id, call.name)
                out += self.delta({"type": "input_json_delta", "partial_json": call.arguments})
            return out
        return super().part(part)

    def tool_start(self, call_id: str, name: str) -> bytes:
        """A `tool_use` block's start (the script's `call_` id as a `toolu_` one) and the empty
        `input_json_delta` the API sends first."""
        block = {"type": "tool_use", "id": tool_use_id(call_id), "name": name, "input": {}}
        out = self.start("tool_use", block)
        return out + self.delta({"type": "input_json_delta", "partial_json": ""})

    def finale(self) -> Iterator[tuple[bytes, bool]]:
        knobs = self.spec.knobs
        out = b""
        # Sources not cited yet (grow:N with fewer pieces than N, or no text at all) are
        # cited in a text block of their own; a search not made yet is made.
        if self.cited < len(self.sources):
            if self.block != "text":
                out += self.start("text", self.text_block())
            out += self.citations(len(self.sources))
        out += self.stop()
        if self.searched and not self.search_done:
            out += b"".join(self.search(self.next_index))
        if knobs.finish:
            reason = "end_turn"
            if knobs.finish == "length":
                reason = "max_tokens"
            elif knobs.tools is not None:
                reason = "tool_use"
            elif knobs.refusal:
                reason = "refusal"
            delta = {"stop_reason": reason, "stop_sequence": None}
            out += self.typed({"type": "message_delta", "delta": delta, "usage": self.usage()})
        if out:
            yield out, True
        if knobs.done is None or knobs.done:
            yield self.typed({"type": "message_stop"}), False

    def malformed(self) -> bytes:
        data = b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
        return self.event(data, "content_block_delta")

    def error_event(self) -> bytes:
        """The API's mid-stream overload (an HTTP 529 outside a stream)."""
        error = {
            "type": "overloaded_error",
            "message": "Overloaded (simulated by the mock upstream)",
        }
        return self.typed({"type": "error", "error": error})

    def giant(self, size: int) -> bytes:
        """A `ping` event padded to `size` bytes (its data): valid anywhere in a stream."""
        return self.event(self.padded({"type": "ping"}, size), "ping")


def tool_use_id(call_id: str) -> str:
    """A scripted call id (`call_...`) in Anthropic's style (`toolu_...`)."""
    return "toolu_" + call_id.removeprefix("call_")
