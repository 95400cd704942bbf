"""The Responses wire formats: OpenAI's Responses API (``POST /v1/responses``) and Perplexity's
Agent API (the same events plus its own search and fetch events). Named events whose name is
their JSON ``type``, each with a ``sequence_number`` counting from 0, LF separators, no
``[DONE]`` (compare the recorded ``openai-responses-*`` and ``xai-responses-*`` streams in
``reference/transcripts/``; Perplexity's from perplexity-py's ``ResponseStreamChunk`` types).

An OpenAI stream is ``response.created``, ``response.in_progress``, its output items (each
``response.output_item.added``, its own events, ``response.output_item.done``) and
``response.completed`` with the whole response and its ``usage`` (``input_tokens``,
``output_tokens``, ``total_tokens`` and their details). A message item is
``response.content_part.added``, ``response.output_text.delta`` per piece (with ``item_id``,
``output_index``, ``content_index``), ``response.output_text.done`` and
``response.content_part.done``. finish=0 leaves out the terminal event (an answer cut off);
finish=length ends with ``response.incomplete`` (``incomplete_details.reason:
"max_output_tokens"``); done=1 adds a chat-style ``data: [DONE]`` (some compatible servers do).

Typed parts, in the APIs' shapes:

* reasoning=summary (OpenAI): a ``reasoning`` item first, with one summary part
  (``response.reasoning_summary_part.added``, ``response.reasoning_summary_text.delta``s,
  ``.done``s); reasoning=reasoning: its ``reasoning_text`` content instead (the open-weight
  models' raw reasoning, ``response.reasoning_text.delta``s);
* tools=1|2|bad_json: ``function_call`` items (``fc_`` ids, the script's ``call_`` ids),
  ``response.function_call_arguments.delta``s and ``.done``; no_index: whole calls, each item
  added and done with its arguments and no deltas (as Perplexity sends them);
* sources=N | sources=grow:N (OpenAI): a ``web_search_call`` item (its ``in_progress``,
  ``searching`` and ``completed`` events; its ``action`` at done: the query and the N sources)
  before the message, whose text carries one ``url_citation`` annotation per source
  (``response.output_text.annotation.added``) at its end (grow: one after each text piece, the
  rest at the end).

Perplexity's Agent API (``/perplexity-agent``) has no content-part or reasoning-summary events:
a message is added, its text deltas, ``output_text.done``, done. sources=N | sources=grow:N
script its search: ``response.reasoning.started``, ``.search_queries``, ``.search_results``
(the N sources with ``id`` 1..N, which the answer's ``[n]`` cite; grow: one result per event),
``.fetch_url_queries`` and ``.fetch_url_results`` (the first source), ``.stopped``, then a
``search_results`` output item. Its usage always has ``cost`` (``currency``, ``input_cost``,
``output_cost``, ``cache_read_cost``, ``tool_calls_cost``, ``total_cost``); its
``response.failed`` carries ``error`` on the event (``fault=error``). tools= as above.
"""

from __future__ import annotations

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
    ToolArgs,
    ToolCall,
    ToolStart,
    WholeCalls,
    search_result,
    source_list,
)

#: OpenAI's error `code` for the statuses that have one (its error-codes guide).
_ERROR_CODES: Final[Mapping[int, str]] = {
    401: "invalid_api_key",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
}
_OVERLOADED: Final = "The server is overloaded (simulated by the mock upstream)"


def _item_id(prefix: str, seed: str, index: int) -> str:
    return f"{prefix}_{hashlib.sha256(f'{seed}:{index}'.encode()).hexdigest()[:48]}"


class _ResponsesFormatter(_Formatter):
    """OpenAI Responses events; one output item open at a time, closed when the next kind of
    part begins or the response ends."""

    routes: ClassVar[tuple[str, ...]] = ("/openai-responses", "/responses", "/v1/responses")
    default_model: ClassVar[str] = "gpt-5-mini"
    # Every event has its own sequence_number: nothing to pre-render.
    prerenderable: ClassVar[bool] = False
    scripts: ClassVar[frozenset[str]] = frozenset(
        {"reasoning=summary", "reasoning=reasoning", "tools", "sources", "finish=length"}
    )
    #: Whether message items have content-part events (Perplexity's have none).
    content_parts: ClassVar[bool] = True

    @classmethod
    def read_request(cls, body: Mapping[str, Any], path_model: str | None) -> MockRequest:
        """`input` (a string, or items: messages with string or part content, function call
        outputs), `instructions`, `model` and `stream`."""
        turns: list[tuple[str, str]] = []
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            turns.append(("system", instructions))
        turns += cls.input_turns(body.get("input"))
        model = body.get("model")
        return MockRequest(
            tuple(turns),
            model if isinstance(model, str) and model else None,
            body.get("stream") is True,
        )

    @staticmethod
    def input_turns(value: Any) -> list[tuple[str, str]]:
        """The conversation of an `input`: a string is one user turn; of the items, messages
        (`role`, `content`) and `function_call_output`s (a tool turn) count."""
        if isinstance(value, str):
            return [("user", value)]
        if not isinstance(value, list) or not all(isinstance(i, dict) for i in value):
            raise BadRequest("'input' must be a string or a list of input items", "input")
        turns = []
        for item in value:
            kind = item.get("type", "message")
            if kind == "message" and "role" in item:
                turns.append((str(item["role"]), content_text(item.get("content"))))
            elif kind == "function_call_output":
                turns.append(("tool", content_text(item.get("output"))))
        return turns

    @classmethod
    def error_json(
        cls, status: int, kind: str, message: str, param: str | None = None
    ) -> dict[str, Any]:
        """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}` (`code` a
        string or null)."""
        return {
            "error": {
                "message": message,
                "type": kind,
                "param": param,
                "code": _ERROR_CODES.get(status),
            }
        }

    @staticmethod
    def make_request_id(token: uuid.UUID) -> str:
        return f"resp_{token.hex}{token.hex[:16]}"

    def __init__(self, spec: SpecView) -> None:
        super().__init__(spec)
        knobs = spec.knobs
        self.seq = 0
        #: sources=N: the sources searched and cited (the answer's own first).
        self.sources = (
            source_list(spec.answer, knobs.sources.count) if knobs.sources is not None else ()
        )
        self.cited = 0
        self.cited_annotations: list[dict[str, Any]] = []
        #: Output items done so far (the terminal response's `output`), and the open one.
        self.output: list[dict[str, Any]] = []
        self.item: dict[str, Any] | None = None
        self.item_text: list[str] = []
        #: Whether the preamble opens the message: the body starts with text unless reasoning
        #: or tool calls come first.
        self.opens_text = knobs.reasoning is None and knobs.tools is None

    # -- events

    def typed(self, kind: str, **fields: Any) -> bytes:
        """One event, named after its `type`, with the next sequence number."""
        obj = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return self.event(_dumps(obj), kind)

    @property
    def output_index(self) -> int:
        return len(self.output)

    def response(
        self, status: str, *, usage: dict[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        """The response object the lifecycle events carry."""
        spec = self.spec
        tools = [{"type": "web_search"}] if self.sources else []
        return {
            "id": spec.request_id,
            "object": "response",
            "created_at": spec.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "max_output_tokens": None,
            "model": spec.model,
            "output": list(self.output),
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": tools,
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "metadata": {},
            **extra,
        }

    def usage(self) -> dict[str, Any]:
        completion = len(self.text_parts) + len(self.reasoning_parts) + self.other_tokens
        prompt = self.spec.prompt_tokens
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": len(self.reasoning_parts)},
            "total_tokens": prompt + completion,
        }

    # -- output items

    def add(self, item: dict[str, Any]) -> bytes:
        """Close the open item and open `item`."""
        out = self.close()
        self.item = item
        self.item_text = []
        return out + self.typed(
            "response.output_item.added", output_index=self.output_index, item=item
        )

    def close(self) -> bytes:
        """The events that end the open item, then its `output_item.done`."""
        item = self.item
        if item is None:
            return b""
        kind = item["type"]
        text = "".join(self.item_text)
        out = b""
        if kind == "message":
            out += self.end_message(item, text)
        elif kind == "reasoning":
            out += self.end_reasoning(item, text)
        elif kind == "function_call":
            out += self.typed(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=self.output_index,
                arguments=text,
            )
            item = {**item, "status": "completed", "arguments": text}
        self.item = None
        return out + self.done(item)

    def done(self, item: dict[str, Any]) -> bytes:
        event = self.typed("response.output_item.done", output_index=self.output_index, item=item)
        self.output.append(item)
        return event

    def message_item(self) -> dict[str, Any]:
        item_id = _item_id("msg", self.spec.request_id, self.output_index)
        return {
            "id": item_id,
            "type": "message",
            "status": "in_progress",
            "content": [],
            "role": "assistant",
        }

    def open_message(self) -> bytes:
        out = self.close()  # first: the new item's id is from its output index
        out += self.add(self.message_item())
        if self.content_parts:
            out += self.typed(
                "response.content_part.added",
                item_id=self.item_id,
                output_index=self.output_index,
                content_index=0,
                part=self.text_part(""),
            )
        return out

    @property
    def item_id(self) -> str:
        assert self.item is not None
        return str(self.item["id"])

    def text_part(
        self, text: str, annotations: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        return {
            "type": "output_text",
            "annotations": annotations or [],
            "logprobs": [],
            "text": text,
        }

    def end_message(self, item: dict[str, Any], text: str) -> bytes:
        out = self.annotations(len(self.sources) - self.cited)
        fields = {"item_id": item["id"], "output_index": self.output_index, "content_index": 0}
        out += self.typed("response.output_text.done", **fields, text=text, logprobs=[])
        part = self.text_part(text, list(self.cited_annotations))
        if self.content_parts:
            out += self.typed("response.content_part.done", **fields, part=part)
        item.update(status="completed", content=[part])
        return out

    def annotation(self, source: Any, end: int) -> dict[str, Any]:
        return {
            "type": "url_citation",
            "end_index": end,
            "start_index": end,
            "title": source.title,
            "url": source.url,
        }

    def annotations(self, count: int) -> bytes:
        """The next `count` sources' `url_citation` annotations, at the end of the text so
        far (OpenAI puts each after the sentence it cites)."""
        out = b""
        end = len("".join(self.item_text))
        for source in self.sources[self.cited : self.cited + count]:
            annotation = self.annotation(source, end)
            out += self.typed(
                "response.output_text.annotation.added",
                item_id=self.item_id,
                output_index=self.output_index,
                content_index=0,
                annotation_index=self.cited,
                annotation=annotation,
            )
            self.cited_annotations.append(annotation)
            self.cited += 1
        return out

    def reasoning_item(self) -> bytes:
        out = self.close()
        item_id = _item_id("rs", self.spec.request_id, self.output_index)
        out += self.add({"id": item_id, "type": "reasoning", "summary": []})
        if self.spec.knobs.reasoning == "summary":
            kind, part = "response.reasoning_summary_part.added", {"summary_index": 0}
            body = {"type": "summary_text", "text": ""}
        else:
            kind, part = "response.content_part.added", {"content_index": 0}
            body = {"type": "reasoning_text", "text": ""}
        return out + self.typed(
            kind, item_id=item_id, output_index=self.output_index, **part, part=body
        )

    def end_reasoning(self, item: dict[str, Any], text: str) -> bytes:
        fields = {"item_id": item["id"], "output_index": self.output_index}
        if self.spec.knobs.reasoning == "summary":
            part = {"type": "summary_text", "text": text}
            out = self.typed(
                "response.reasoning_summary_text.done", **fields, summary_index=0, text=text
            )
            out += self.typed(
                "response.reasoning_summary_part.done", **fields, summary_index=0, part=part
            )
            item["summary"] = [part]
            return out
        part = {"type": "reasoning_text", "text": text}
        out = self.typed("response.reasoning_text.done", **fields, content_index=0, text=text)
        out += self.typed("response.content_part.done", **fields, content_index=0, part=part)
        item["content"] = [part]
        return out

    def call_item(self, call_id: str, name: str, arguments: str = "") -> dict[str, Any]:
        return {
            "id": _item_id("fc", self.spec.request_id, self.output_index),
            "type": "function_call",
            "status": "in_progress",
            "arguments": arguments,
            "call_id": call_id,
            "name": name,
        }

    def whole_call(self, call: ToolCall) -> bytes:
        """A call added and done with its arguments, no deltas (Perplexity's way)."""
        out = self.close()
        item = self.call_item(call.call_id, call.name, call.arguments)
        out += self.typed("response.output_item.added", output_index=self.output_index, item=item)
        return out + self.done({**item, "status": "completed"})

    # -- the stream

    def preamble(self) -> Iterator[bytes]:
        yield self.typed("response.created", response=self.response("in_progress"))
        yield self.typed("response.in_progress", response=self.response("in_progress"))
        if self.sources:
            yield from self.search()
        if self.opens_text:
            yield self.open_message()

    def search(self) -> Iterator[bytes]:
        """The web search the sources come from: a `web_search_call` item."""
        item_id = _item_id("ws", self.spec.request_id, self.output_index)
        yield self.add({"id": item_id, "type": "web_search_call", "status": "in_progress"})
        for stage in ("in_progress", "searching", "completed"):
            yield self.typed(
                f"response.web_search_call.{stage}", output_index=self.output_index, item_id=item_id
            )
        self.item = None
        action = {
            "type": "search",
            "query": _topic(self.spec),
            "sources": [{"type": "url", "url": s.url} for s in self.sources],
        }
        yield self.done(
            {"id": item_id, "type": "web_search_call", "status": "completed", "action": action}
        )

    def text(self, piece: str) -> bytes:
        self.text_parts.append(piece)
        out = b""
        if self.item is None or self.item["type"] != "message":
            out = self.open_message()
        self.item_text.append(piece)
        fields: dict[str, Any] = {"item_id": self.item_id, "output_index": self.output_index}
        fields.update(content_index=0, delta=piece)
        if self.content_parts:
            fields["logprobs"] = []
        out += self.typed("response.output_text.delta", **fields)
        knobs = self.spec.knobs
        if knobs.sources is not None and knobs.sources.grow:
            out += self.annotations(1)
        return out

    def part(self, part: Part) -> bytes:
        if isinstance(part, Reasoning):
            self.reasoning_parts.append(part.text)
            out = b""
            if self.item is None or self.item["type"] != "reasoning":
                out = self.reasoning_item()
            self.item_text.append(part.text)
            fields: dict[str, Any] = {"item_id": self.item_id, "output_index": self.output_index}
            if self.spec.knobs.reasoning == "summary":
                kind = "response.reasoning_summary_text.delta"
                fields["summary_index"] = 0
            else:
                kind = "response.reasoning_text.delta"
                fields["content_index"] = 0
            return out + self.typed(kind, **fields, delta=part.text)
        if isinstance(part, ToolStart):
            self.other_tokens += 1
            out = self.close()
            return out + self.add(self.call_item(part.call_id, part.name))
        if isinstance(part, ToolArgs):
            self.other_tokens += 1
            self.item_text.append(part.fragment)
            return self.typed(
                "response.function_call_arguments.delta",
                item_id=self.item_id,
                output_index=self.output_index,
                delta=part.fragment,
            )
        if isinstance(part, WholeCalls):
            self.other_tokens += len(part.calls)
            return b"".join(self.whole_call(call) for call in part.calls)
        return super().part(part)

    def finale(self) -> Iterator[tuple[bytes, bool]]:
        knobs = self.spec.knobs
        out = self.close()
        if knobs.finish == "length":
            details = {"reason": "max_output_tokens"}
            response = self.response("incomplete", usage=self.usage(), incomplete_details=details)
            out += self.typed("response.incomplete", response=response)
        elif knobs.finish:
            out += self.typed(
                "response.completed", response=self.response("completed", usage=self.usage())
            )
        if out:
            yield out, True
        if knobs.done:
            yield self.event(b"[DONE]"), False

    def malformed(self) -> bytes:
        return self.event(
            b'{"type":"response.output_text.delta","delta":', "response.output_text.delta"
        )

    def error_event(self) -> bytes:
        """A server error mid-stream, as the recorded one comes: an `error` event (its error
        nested), then `response.failed` with the error on the response."""
        error = {
            "type": "server_error",
            "code": "server_error",
            "message": _OVERLOADED,
            "param": None,
        }
        out = self.typed("error", error=error)
        failed = {"code": "server_error", "message": _OVERLOADED}
        return out + self.typed("response.failed", response=self.response("failed", error=failed))

    def giant(self, size: int) -> bytes:
        """A `response.in_progress` event padded to `size` bytes (its data): valid anywhere."""
        obj = {"type": "response.in_progress", "sequence_number": self.seq}
        obj["response"] = self.response("in_progress")
        self.seq += 1
        return self.event(self.padded(obj, size), "response.in_progress")


def _topic(spec: SpecView) -> str:
    sources = spec.answer.sources
    return sources[0].title.split(" - ")[0] if sources else "the question"


class _PerplexityAgentFormatter(_ResponsesFormatter):
    """Perplexity's Agent API: Responses events without content parts, its own search and
    fetch events, usage with `cost`."""

    routes: ClassVar[tuple[str, ...]] = ("/perplexity-agent",)
    default_model: ClassVar[str] = "openai/gpt-5-mini"
    scripts: ClassVar[frozenset[str]] = frozenset({"tools", "sources", "finish=length"})
    content_parts: ClassVar[bool] = False

    @classmethod
    def read_request(cls, body: Mapping[str, Any], path_model: str | None) -> MockRequest:
        """As OpenAI's, with the model in `model`, `models` (a fallback chain) or `preset`, one
        of which is required."""
        request = super().read_request(body, path_model)
        models = body.get("models")
        preset = body.get("preset")
        model = request.model
        if model is None and isinstance(models, list) and models and isinstance(models[0], str):
            model = models[0]
        if model is None and isinstance(preset, str) and preset:
            model = preset
        if model is None:
            raise BadRequest("one of 'model', 'models' or 'preset' is required", "model")
        return MockRequest(request.turns, model, request.stream)

    @classmethod
    def error_json(
        cls, status: int, kind: str, message: str, param: str | None = None
    ) -> dict[str, Any]:
        """Perplexity's error body: `{"error": {"message", "type", "code"}}`."""
        return {"error": {"message": message, "type": kind, "code": kind}}

    @staticmethod
    def make_request_id(token: uuid.UUID) -> str:
        return str(token)

    def response(
        self, status: str, *, usage: dict[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        spec = self.spec
        return {
            "id": spec.request_id,
            "object": "response",
            "created_at": spec.created,
            "model": spec.model,
            "status": status,
            "output": list(self.output),
            "error": None,
            "usage": usage,
            **extra,
        }

    def usage(self) -> dict[str, Any]:
        completion = len(self.text_parts) + len(self.reasoning_parts) + self.other_tokens
        prompt = self.spec.prompt_tokens
        input_cost = round(prompt * 0.00000125, 8)
        output_cost = round(completion * 0.00001, 8)
        tool_cost = 0.005 if self.sources else 0.0
        usage: dict[str, Any] = {
            "input_tokens": prompt,
            "output_tokens": completion,
            "total_tokens": prompt + completion,
            "input_tokens_details": {"cache_read_input_tokens": 0},
            "cost": {
                "currency": "USD",
                "input_cost": input_cost,
                "output_cost": output_cost,
                "cache_read_cost": 0.0,
                "tool_calls_cost": tool_cost,
                "total_cost": round(input_cost + output_cost + tool_cost, 8),
            },
        }
        if self.sources:
            usage["tool_calls_details"] = {"web_search": {"invocation": 1}}
        return usage

    def search(self) -> Iterator[bytes]:
        """Perplexity's research steps: a search (queries, then results with ids 1..N), a
        fetch of the first result, then the results again as a `search_results` item."""
        topic = _topic(self.spec)
        queries = [topic, f"{topic} explained"]
        results = [{"id": k, **search_result(s)} for k, s in enumerate(self.sources, 1)]
        yield self.typed("response.reasoning.started", thought=f"Researching {topic}")
        yield self.typed(
            "response.reasoning.search_queries",
            queries=queries,
            thought=f"Searching the web for {topic}",
        )
        knobs = self.spec.knobs
        grow = knobs.sources is not None and knobs.sources.grow
        for batch in [[r] for r in results] if grow else [results]:
            yield self.typed("response.reasoning.search_results", results=batch)
        first = self.sources[0]
        yield self.typed(
            "response.reasoning.fetch_url_queries",
            urls=[first.url],
            thought=f"Reading {first.title}",
        )
        page = {"url": first.url, "title": first.title, "snippet": search_result(first)["snippet"]}
        yield self.typed("response.reasoning.fetch_url_results", contents=[page])
        yield self.typed("response.reasoning.stopped", thought="Writing the answer")
        item = {"type": "search_results", "queries": queries, "results": results}
        yield self.typed("response.output_item.added", output_index=self.output_index, item=item)
        yield self.done(item)

    def annotations(self, count: int) -> bytes:
        """None: Perplexity's sources are its search results (its events have no annotation
        event)."""
        return b""

    def end_message(self, item: dict[str, Any], text: str) -> bytes:
        fields = {"item_id": item["id"], "output_index": self.output_index, "content_index": 0}
        out = self.typed("response.output_text.done", **fields, text=text)
        item.update(
            status="completed", content=[{"type": "output_text", "text": text, "annotations": []}]
        )
        return out

    def error_event(self) -> bytes:
        """Perplexity's `response.failed`: the error on the event itself."""
        error = {"message": _OVERLOADED, "code": "server_error", "type": "server_error"}
        return self.typed("response.failed", error=error)
