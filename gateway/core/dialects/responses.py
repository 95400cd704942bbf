"""The Responses dialects (pure): `openai-responses` (OpenAI's and xAI's `POST /v1/responses`)
and `perplexity-agent` (Perplexity's Agent API, `POST /v1/responses`: the Responses events plus
its own search and fetch events).

Every event is named after its JSON `type` (INDEX.md: true of every recording), so the
translator reads `type` and never the SSE event name. Rules (protocol.md, "Parts";
upstream-formats.md, 4; the recordings in reference/transcripts/):

- Answer text is every `response.output_text.delta`, concatenated across message items, and
  `response.refusal.delta` (then `meta["refusal"] = True`).
- Reasoning is `response.reasoning_summary_text.delta` and `response.reasoning_text.delta`. A
  new part (another item, summary or content index) after reasoning already relayed begins with
  a blank line: each summary part is a paragraph of its own ("**Title**\\n\\nbody"), which
  joined with nothing would run into the last one's final sentence.
- Tool calls are `function_call` items: call_id and name from `response.output_item.added`,
  arguments from `response.function_call_arguments.delta`, complete at
  `response.function_call_arguments.done` or at the item's `response.output_item.done` (whose
  `arguments` serve when no delta came: Perplexity streams none).
- The upstream's own tools (`web_search_call`, `file_search_call`, `code_interpreter_call`, ...
  items) are not tool calls: each is a `progress` step at its `response.output_item.done` (whose
  `action` says what was done).
- Sources: `url_citation` annotations (`response.output_text.annotation.added`, and those of a
  message item at its done), by first appearance; Perplexity's search results
  (`response.reasoning.search_results`, `search_results` output items) numbered by their `id`,
  which is what the answer's `[n]` markers cite (Perplexity's streaming-citations guide).
- Progress: Perplexity's `response.reasoning.*` events (`started`/`stopped` thoughts, search
  queries and results, fetched URLs) and the hosted tool calls above.
- The answer is complete at `response.completed` (`stop`, or `tool_calls` when it called
  functions) or `response.incomplete` (`incomplete_details.reason`, normalised);
  `response.failed` and `error` raise `upstream_error` at the first of them. A clean EOF before
  one of the two is `stream_interrupted`. `meta["usage"]` is the terminal response's `usage` as
  sent (Perplexity's carries `cost`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, ClassVar, Final

import orjson

from gateway.core.dialects.base import (
    DEFAULT_LIMITS,
    Dialect,
    PartsTranslator,
    RequestDefaults,
    Translator,
    UpstreamFailure,
    UpstreamRequest,
    bearer,
    byte_len,
    error_message,
    loads_event,
    normalise_finish,
    parsed_call,
    protocol_error,
)
from gateway.core.parts import NULL_SINK, PartLimits, PartSink
from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEEvent
from gateway.core.usage import XAI_TICKS_PER_USD, Usage, amount, count

#: The hot path's event: one answer-text delta.
_TEXT: Final = "response.output_text.delta"
#: Error `type`s and `code`s that may succeed when tried again (OpenAI's `server_error` and
#: `rate_limit_exceeded` codes, the error types `error_retryable` knows, Perplexity's).
_RETRYABLE: Final = frozenset(
    {
        "server_error",
        "api_error",
        "internal_error",
        "internal_server_error",
        "overloaded",
        "overloaded_error",
        "service_unavailable",
        "rate_limit_error",
        "rate_limit_exceeded",
    }
)
#: Output items that end in `_call` but are calls for the client to run, not hosted tools.
_CLIENT_CALLS: Final = frozenset({"function_call", "custom_tool_call"})
#: A Perplexity search result `id` above this is not used as a source index (it would make the
#: position list that `SourceIndex.perplexity` takes that long).
_MAX_RESULT_ID: Final = 10_000
#: What separates two reasoning parts (see the module docstring).
_PART_BREAK: Final = "\n\n"


def _failure(error: Any) -> UpstreamFailure:
    """The `upstream_error` an error object reports; retryable for server and rate-limit kinds
    (by its `type` or its `code`)."""
    retryable = False
    if isinstance(error, dict):
        for key in ("type", "code"):
            kind = error.get(key)
            if isinstance(kind, str) and kind in _RETRYABLE:
                retryable = True
    return UpstreamFailure(ErrorCode.UPSTREAM_ERROR, error_message(error), retryable=retryable)


def _strings(value: Any) -> list[str]:
    return [x for x in value if isinstance(x, str) and x] if isinstance(value, list) else []


def _pages(value: Any) -> list[dict[str, Any]]:
    """`[{url, title?}]` of a list of search results, fetched pages or `{type: url, url}`."""
    pages: list[dict[str, Any]] = []
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                url = item.get("url")
                if isinstance(url, str) and url:
                    title = item.get("title")
                    page: dict[str, Any] = {"url": url}
                    if isinstance(title, str) and title:
                        page["title"] = title
                    pages.append(page)
    return pages


def _with_thought(step: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    thought = obj.get("thought")
    if isinstance(thought, str) and thought:
        step["text"] = thought
    return step


def hosted_step(item: dict[str, Any]) -> dict[str, Any]:
    """A hosted tool call (an output item the upstream ran itself) as a progress step.

    `web_search_call`: its `action` (OpenAI: `search` with `query`/`queries` and the `sources`
    it found, `open_page` with `url`, `find_in_page`), or xAI's `arguments` (a JSON string with
    the `query`); `file_search_call`: its `queries`; `code_interpreter_call`: its `code` and
    the text of its `logs` outputs; anything else: `other` with the item's `type`."""
    kind = item.get("type")
    if kind == "web_search_call":
        action = item.get("action")
        if not isinstance(action, dict):
            action = {"type": "search"}
            args = item.get("arguments")
            if isinstance(args, str):
                try:
                    parsed = orjson.loads(args)
                except orjson.JSONDecodeError:
                    parsed = None
                if isinstance(parsed, dict):
                    action["query"] = parsed.get("query")
        what = action.get("type")
        if what == "search":
            queries = action.get("queries")
            if not isinstance(queries, list):
                queries = [action.get("query")]
            return {
                "kind": "search",
                "queries": _strings(queries),
                "results": _pages(action.get("sources")),
            }
        if what == "open_page":
            return {"kind": "fetch", "urls": _strings([action.get("url")])}
        return {"kind": "other", "type": what if isinstance(what, str) else "web_search_call"}
    if kind == "file_search_call":
        return {"kind": "search", "queries": _strings(item.get("queries")), "results": []}
    if kind == "code_interpreter_call":
        step: dict[str, Any] = {"kind": "code"}
        code = item.get("code")
        if isinstance(code, str):
            step["code"] = code
        outputs = item.get("outputs")
        if isinstance(outputs, list):
            found = [o.get("logs") for o in outputs if isinstance(o, dict)]
            logs = [text for text in found if isinstance(text, str)]
            if logs:
                step["result"] = "".join(logs)
        return step
    return {"kind": "other", "type": kind if isinstance(kind, str) else "unknown"}


def _item_id(obj: dict[str, Any]) -> str:
    """The output item an event is about (`item_id`), "" when it names none."""
    item_id = obj.get("item_id")
    return item_id if isinstance(item_id, str) else ""


class _Call:
    """A function call being streamed: its arguments arrive in fragments."""

    __slots__ = ("args", "call_id", "fallback", "name", "size")

    def __init__(self, item: Mapping[str, Any]) -> None:
        call_id = item.get("call_id")
        name = item.get("name")
        args = item.get("arguments")
        self.call_id = call_id if isinstance(call_id, str) and call_id else None
        self.name = name if isinstance(name, str) else ""
        #: The item's own `arguments`, used when no delta comes.
        self.fallback = args if isinstance(args, str) else ""
        self.args: list[str] = []
        self.size = 0


class ResponsesTranslator(PartsTranslator):
    """OpenAI Responses events (OpenAI, xAI, and Perplexity's Agent API, whose own
    `response.reasoning.*` events are read too); the end is `response.completed` or
    `response.incomplete`."""

    name = "openai-responses"
    __slots__ = (
        "_called",
        "_closed",
        "_done_items",
        "_open_calls",
        "_reasoning_part",
    )

    def __init__(
        self,
        wants: Collection[str] = frozenset(),
        sink: PartSink = NULL_SINK,
        limits: PartLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(wants, sink, limits)
        #: The reasoning part the last reasoning delta belonged to (None: no reasoning yet).
        self._reasoning_part: tuple[Any, ...] | None = None
        #: Function calls under way, by output item id (or call id), in order of appearance.
        self._open_calls: dict[str, _Call] = {}
        #: The item ids of the calls already complete (their `output_item.done` repeats them).
        self._done_items: set[str] = set()
        #: The answer called a function (its finish is `tool_calls`, wanted or not).
        self._called = False
        self._closed = False

    def feed(self, event: SSEEvent) -> str | None:
        data = event.data
        # Some Responses-compatible servers add a chat-style `[DONE]`; the terminal response
        # event, not it, is the end.
        if not data or data == "[DONE]":
            return None
        obj = loads_event(data)
        if not isinstance(obj, dict):
            raise protocol_error("upstream event is not a JSON object")
        kind = obj.get("type")
        if kind == _TEXT:  # the hot path: two dict lookups
            delta = obj.get("delta")
            if isinstance(delta, str) and delta:
                self.saw_text = True
                return delta
            return None
        if not isinstance(kind, str):
            return None
        handler = _HANDLERS.get(kind)
        return None if handler is None else handler(self, obj)

    def usage(self) -> Usage | None:
        """The Responses convention: `input_tokens` (cached included, in
        `input_tokens_details`), `output_tokens` (reasoning included, in
        `output_tokens_details`); cost from the Perplexity Agent API's `cost.total_cost`."""
        raw = self.meta.get("usage")
        prompt, output = count(raw, "input_tokens"), count(raw, "output_tokens")
        if prompt is None and output is None:
            return None
        prompt, output = prompt or 0, output or 0
        reasoning = count(raw, "output_tokens_details", "reasoning_tokens")
        total = count(raw, "total_tokens")
        if reasoning and total == prompt + output + reasoning != prompt + output:
            output += reasoning  # reasoning left out of output_tokens but not of the total
        cost = amount(raw, "cost", "total_cost")
        if cost is None and (ticks := count(raw, "cost_in_usd_ticks")) is not None:
            cost = ticks / XAI_TICKS_PER_USD
        cached = count(raw, "input_tokens_details", "cached_tokens")
        return Usage(prompt, output, reasoning, cached, None, cost)

    def end_of_stream(self) -> None:
        if self.finished:
            return
        raise UpstreamFailure(
            ErrorCode.STREAM_INTERRUPTED, "upstream ended the stream before the answer was complete"
        )

    # -- text and reasoning

    def _refusal(self, obj: dict[str, Any]) -> str | None:
        delta = obj.get("delta")
        if isinstance(delta, str) and delta:
            self.saw_text = True
            self.meta["refusal"] = True
            return delta
        return None

    def _reasoning_delta(self, obj: dict[str, Any]) -> None:
        delta = obj.get("delta")
        if not isinstance(delta, str) or not delta:
            return
        index = obj.get("summary_index", obj.get("content_index"))
        part = (obj.get("type"), obj.get("item_id"), index if isinstance(index, int) else None)
        last = self._reasoning_part
        if last != part:
            self._reasoning_part = part
            if last is not None:
                delta = _PART_BREAK + delta
        self._reason(delta)

    # -- output items: function calls, hosted tools, sources

    def _item_added(self, obj: dict[str, Any]) -> None:
        item = obj.get("item")
        if isinstance(item, dict) and item.get("type") == "function_call":
            self.saw_text = True
            self._called = True
            key = self._item_key(item)
            if self._want_tools and key not in self._open_calls and key not in self._done_items:
                self._open_calls[key] = _Call(item)

    def _item_done(self, obj: dict[str, Any]) -> None:
        item = obj.get("item")
        if not isinstance(item, dict):
            return
        kind = item.get("type")
        if kind == "function_call":
            self.saw_text = True
            self._called = True
            if self._want_tools:
                self._complete(self._item_key(item), item.get("arguments"), item)
        elif kind == "message":
            if self._sources is not None:
                content = item.get("content")
                if isinstance(content, list):
                    for part in content:
                        if isinstance(part, dict) and isinstance(part.get("annotations"), list):
                            self._annotations(part["annotations"])
        elif kind == "search_results":  # Perplexity: the searches' results, again
            self._search_sources(item.get("results"))
        elif isinstance(kind, str) and kind.endswith("_call") and kind not in _CLIENT_CALLS:
            self.saw_text = True
            if self._want_progress:
                self._sink.push_progress(hosted_step(item))

    @staticmethod
    def _item_key(item: dict[str, Any]) -> str:
        """A function call's key: its output item id, else its call id (both are strings in
        every API; a call without either is keyed by nothing, so it is one call)."""
        for field in ("id", "call_id"):
            value = item.get(field)
            if isinstance(value, str) and value:
                return value
        return ""

    def _args_delta(self, obj: dict[str, Any]) -> None:
        self.saw_text = True
        self._called = True
        if not self._want_tools:
            return
        delta = obj.get("delta")
        if not isinstance(delta, str) or not delta:
            return
        key = _item_id(obj)
        if key in self._done_items:
            raise protocol_error("upstream continued a tool call after it was complete")
        call = self._open_calls.get(key)
        if call is None:  # no `output_item.added` for it: its done will name it
            call = self._open_calls[key] = _Call({})
        call.size += byte_len(delta)
        self._check_size(call.size)
        call.args.append(delta)

    def _args_done(self, obj: dict[str, Any]) -> None:
        self.saw_text = True
        self._called = True
        if self._want_tools:
            self._complete(_item_id(obj), obj.get("arguments"))

    def _check_size(self, size: int) -> None:
        if size > self._limits.max_tool_args_bytes:
            raise protocol_error(
                f"upstream tool call arguments exceeded {self._limits.max_tool_args_bytes} bytes"
            )

    def _complete(self, key: str, arguments: Any, item: dict[str, Any] | None = None) -> None:
        """Push a complete call (`parsed_call`): the streamed arguments, else those the done
        event carries, else the item's own."""
        if key in self._done_items:
            return
        call = self._open_calls.pop(key, None)
        if call is None:
            if item is None:
                return  # an arguments.done for a call never seen: its item's done will tell
            call = _Call(item)
        elif item is not None:
            named = _Call(item)
            call.call_id = call.call_id or named.call_id
            call.name = call.name or named.name
        self._done_items.add(key)
        if call.args:
            raw = "".join(call.args)
        else:
            raw = arguments if isinstance(arguments, str) else call.fallback
            self._check_size(byte_len(raw))
        done = parsed_call(call.call_id or key or f"call_{len(self._calls)}", call.name, raw)
        self._calls.append(done)
        self._sink.push_tool_call(done)

    def _annotation(self, obj: dict[str, Any]) -> None:
        if self._sources is not None:
            self._annotations([obj.get("annotation")])

    def _annotations(self, annotations: list[Any]) -> None:
        """`url_citation` annotations (`{type, url, title?, start_index?, end_index?}`; xAI's
        have the url only), numbered by first appearance."""
        assert self._sources is not None
        found = []
        for annotation in annotations:
            if isinstance(annotation, dict) and annotation.get("type") == "url_citation":
                source = self._sources.reveal(annotation.get("url"), annotation)
                if source is not None:
                    found.append(source)
        if found:
            self._sink.push_sources(found)

    def _search_sources(self, results: Any) -> None:
        """Perplexity's search results (`{id, url, title, snippet, date?, ...}`) as sources,
        each indexed by its `id` (the answer's `[n]`) unless that number is taken or absent,
        then by first appearance: `SourceIndex.perplexity` gives a URL its position in a
        citations list, so the URLs are put at their ids' positions."""
        if self._sources is None or not isinstance(results, list):
            return
        positions: list[Any] = []
        for result in results:
            if not isinstance(result, dict):
                continue
            rid = result.get("id")
            if isinstance(rid, int) and not isinstance(rid, bool) and 0 < rid <= _MAX_RESULT_ID:
                if len(positions) < rid:
                    positions.extend([None] * (rid - len(positions)))
                if positions[rid - 1] is None:
                    positions[rid - 1] = result.get("url")
        found = self._sources.perplexity(positions, results)
        if found:
            self._sink.push_sources(found)

    # -- Perplexity's reasoning events: progress (and sources)

    def _pplx_thought(self, obj: dict[str, Any]) -> None:
        """`response.reasoning.started` / `.stopped`: a thought step when it says one."""
        thought = obj.get("thought")
        if isinstance(thought, str) and thought and self._want_progress:
            self._sink.push_progress({"kind": "thought", "text": thought})

    def _pplx_queries(self, obj: dict[str, Any]) -> None:
        if self._want_progress:
            step = {"kind": "search", "queries": _strings(obj.get("queries"))}
            self._sink.push_progress(_with_thought(step, obj))

    def _pplx_results(self, obj: dict[str, Any]) -> None:
        results = obj.get("results")
        if self._want_progress:
            step = {"kind": "search", "results": _pages(results)}
            self._sink.push_progress(_with_thought(step, obj))
        self._search_sources(results)

    def _pplx_fetch_queries(self, obj: dict[str, Any]) -> None:
        if self._want_progress:
            step = {"kind": "fetch", "urls": _strings(obj.get("urls"))}
            self._sink.push_progress(_with_thought(step, obj))

    def _pplx_fetch_results(self, obj: dict[str, Any]) -> None:
        if self._want_progress:
            urls = [page["url"] for page in _pages(obj.get("contents"))]
            self._sink.push_progress(_with_thought({"kind": "fetch", "urls": urls}, obj))

    # -- the end

    def _usage(self, response: Any) -> None:
        if isinstance(response, dict):
            usage = response.get("usage")
            if usage is not None:
                self.meta["usage"] = usage

    def _completed(self, obj: dict[str, Any]) -> None:
        response = obj.get("response")
        self._usage(response)
        status = response.get("status") if isinstance(response, dict) else None
        self.finish_raw = status if isinstance(status, str) else "completed"
        self.meta["finish_reason"] = "tool_calls" if self._called else "stop"
        self.finished = True
        self._close()

    def _incomplete(self, obj: dict[str, Any]) -> None:
        response = obj.get("response")
        self._usage(response)
        details = response.get("incomplete_details") if isinstance(response, dict) else None
        reason = details.get("reason") if isinstance(details, dict) else None
        self.finish_raw = reason if isinstance(reason, str) else "incomplete"
        normal = normalise_finish(self.finish_raw)
        if normal is not None:
            self.meta["finish_reason"] = normal
        self.finished = True
        self._close()

    def _failed(self, obj: dict[str, Any]) -> None:
        response = obj.get("response")
        self._usage(response)
        # Perplexity puts the error on the event, OpenAI on the response.
        error = obj.get("error")
        if error is None and isinstance(response, dict):
            error = response.get("error")
        raise _failure(error)

    def _error(self, obj: dict[str, Any]) -> None:
        # The recorded shape nests it (`{"type": "error", "error": {...}}`); OpenAI's reference
        # puts `code`, `message` and `param` on the event itself.
        error = obj.get("error")
        if not isinstance(error, dict):
            error = {k: v for k, v in obj.items() if k not in ("type", "sequence_number")}
        raise _failure(error)

    def _close(self) -> None:
        """The answer is over: calls still open are complete, and `done` gets `reasoning` and
        `tool_calls` for a client that asked for them (left out when there is none)."""
        if self._closed:
            return
        self._closed = True
        for key in list(self._open_calls):
            self._complete(key, None)
        self._record_parts()


_Handler = Callable[[ResponsesTranslator, dict[str, Any]], str | None]

#: Event type -> what reads it (anything else is ignored: the APIs add event types).
_HANDLERS: Final[dict[str, _Handler]] = {
    "response.refusal.delta": ResponsesTranslator._refusal,
    "response.reasoning_summary_text.delta": ResponsesTranslator._reasoning_delta,
    "response.reasoning_text.delta": ResponsesTranslator._reasoning_delta,
    "response.output_item.added": ResponsesTranslator._item_added,
    "response.output_item.done": ResponsesTranslator._item_done,
    "response.function_call_arguments.delta": ResponsesTranslator._args_delta,
    "response.function_call_arguments.done": ResponsesTranslator._args_done,
    "response.output_text.annotation.added": ResponsesTranslator._annotation,
    "response.reasoning.started": ResponsesTranslator._pplx_thought,
    "response.reasoning.stopped": ResponsesTranslator._pplx_thought,
    "response.reasoning.search_queries": ResponsesTranslator._pplx_queries,
    "response.reasoning.search_results": ResponsesTranslator._pplx_results,
    "response.reasoning.fetch_url_queries": ResponsesTranslator._pplx_fetch_queries,
    "response.reasoning.fetch_url_results": ResponsesTranslator._pplx_fetch_results,
    "response.completed": ResponsesTranslator._completed,
    "response.incomplete": ResponsesTranslator._incomplete,
    "response.failed": ResponsesTranslator._failed,
    "error": ResponsesTranslator._error,
}


class PerplexityAgentTranslator(ResponsesTranslator):
    """Perplexity's Agent API: the same events (its own are read by every Responses
    translator)."""

    name = "perplexity-agent"
    __slots__ = ()


# --------------------------------------------------------------------------------------------
# The request side
# --------------------------------------------------------------------------------------------


def _text_of(content: Any) -> str:
    """A message's text: a string, or its `text` parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def _parts(content: list[Any], role: str, *, detail: bool) -> list[dict[str, Any]]:
    """Chat content parts as Responses ones: `text` is `input_text` for the user and
    `output_text` for the assistant; a user's `image_url` is `input_image` (with its `detail`,
    `auto` by default, where the API has one). Other kinds are left out."""
    out: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            text_kind = "output_text" if role == "assistant" else "input_text"
            out.append({"type": text_kind, "text": part["text"]})
        elif kind == "image_url" and role == "user":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str):
                entry: dict[str, Any] = {"type": "input_image", "image_url": url}
                if detail:
                    level = image.get("detail") if isinstance(image, dict) else None
                    entry["detail"] = level if isinstance(level, str) else "auto"
                out.append(entry)
    return out


def responses_input(
    messages: tuple[dict[str, Any], ...], *, image_detail: bool = True
) -> tuple[list[dict[str, Any]], str | None]:
    """(input items, instructions) for the start's chat messages.

    System messages become `instructions` (joined by a blank line); user and assistant
    messages `{"type": "message", "role", "content"}` items (a string, or parts: `_parts`);
    an assistant's `tool_calls` `function_call` items after its message; a tool message a
    `function_call_output` item."""
    items: list[dict[str, Any]] = []
    instructions: list[str] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role == "system":
            text = _text_of(content)
            if text:
                instructions.append(text)
        elif role == "tool":
            output = {"type": "function_call_output", "call_id": message.get("tool_call_id")}
            output["output"] = _text_of(content)
            items.append(output)
        elif role in ("user", "assistant"):
            if isinstance(content, list):
                content = _parts(content, role, detail=image_detail)
            if isinstance(content, str | list) and (role == "user" or content):
                items.append({"type": "message", "role": role, "content": content})
            calls = message.get("tool_calls") if role == "assistant" else None
            for call in calls if isinstance(calls, list) else ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    items.append(
                        {
                            "type": "function_call",
                            "call_id": call.get("id"),
                            "name": function.get("name"),
                            "arguments": function.get("arguments", ""),
                        }
                    )
    return items, "\n\n".join(instructions) if instructions else None


def function_tools(tools: Any) -> list[dict[str, Any]]:
    """Chat-shaped tools (`{"type": "function", "function": {...}}`) as Responses' flat ones
    (`{"type": "function", "name", "description"?, "parameters"?, "strict"?}`)."""
    out: list[dict[str, Any]] = []
    for tool in tools if isinstance(tools, list) else ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict):
            flat: dict[str, Any] = {"type": "function", "name": function.get("name")}
            for key in ("description", "parameters", "strict"):
                if key in function:
                    flat[key] = function[key]
            out.append(flat)
    return out


def _tool_choice(choice: Any) -> Any:
    """`"auto"`, `"none"` and `"required"` as they are; the chat API's `{"type": "function",
    "function": {"name"}}` as `{"type": "function", "name"}`."""
    if isinstance(choice, dict):
        function = choice.get("function")
        if isinstance(function, dict):
            return {"type": "function", "name": function.get("name")}
    return choice


def _text_format(response_format: Any) -> dict[str, Any] | None:
    """The chat `response_format` as Responses' `text.format`: `json_schema` flattened
    (`{"type": "json_schema", "name", "schema", "strict"?, "description"?}`), `json_object`
    and `text` as they are."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        schema = response_format.get("json_schema")
        flat: dict[str, Any] = {"type": "json_schema"}
        if isinstance(schema, dict):
            flat.update(schema)
        return flat
    if kind in ("json_object", "text"):
        return {"type": kind}
    return None


class OpenAIResponsesDialect(Dialect):
    """OpenAI's Responses API (`POST /v1/responses`), and xAI's copy of it."""

    name: ClassVar[str] = "openai-responses"
    translator: ClassVar[type[Translator]] = ResponsesTranslator

    def request(
        self,
        url: str,
        model: str,
        messages: tuple[dict[str, Any], ...],
        options: Mapping[str, Any],
        api_key: str | None,
        defaults: RequestDefaults,
    ) -> UpstreamRequest:
        items, instructions = responses_input(messages)
        # `store: false`: the gateway keeps no server-side state (every start carries the whole
        # conversation), so nothing is left on the provider's side.
        body: dict[str, Any] = {"model": model, "input": items, "stream": True, "store": False}
        if instructions is not None:
            body["instructions"] = instructions
        for key in ("temperature", "top_p", "parallel_tool_calls"):
            if key in options:
                body[key] = options[key]
        if "max_tokens" in options:
            body["max_output_tokens"] = options["max_tokens"]
        if "reasoning_effort" in options:
            # `summary: auto` makes the reasoning summary stream (reasoning_summary_text).
            body["reasoning"] = {"effort": options["reasoning_effort"], "summary": "auto"}
        if "tools" in options:
            body["tools"] = function_tools(options["tools"])
        if "tool_choice" in options:
            body["tool_choice"] = _tool_choice(options["tool_choice"])
        text_format = _text_format(options.get("response_format"))
        if text_format is not None:
            body["text"] = {"format": text_format}
        return UpstreamRequest(url, bearer(api_key), body)


#: Perplexity's start options that are the web_search tool's `filters` (same names).
_SEARCH_FILTERS: Final = (
    "search_domain_filter",
    "search_recency_filter",
    "search_after_date_filter",
    "search_before_date_filter",
    "last_updated_after_filter",
    "last_updated_before_filter",
)


def web_search_tool(options: Mapping[str, Any]) -> dict[str, Any]:
    """Perplexity's `web_search` tool, with the start's search filters and
    `web_search_options.search_context_size` / `user_location`."""
    tool: dict[str, Any] = {"type": "web_search"}
    filters = {key: options[key] for key in _SEARCH_FILTERS if key in options}
    if filters:
        tool["filters"] = filters
    search = options.get("web_search_options")
    if isinstance(search, dict):
        for key in ("search_context_size", "user_location"):
            if key in search:
                tool[key] = search[key]
    return tool


class PerplexityAgentDialect(Dialect):
    """Perplexity's Agent API (`POST https://api.perplexity.ai/v1/responses`, alias of
    `/v1/agent`): a model (`provider/model`, e.g. `openai/gpt-5`) or a preset (`fast-search`,
    `pro-search`, ...), with Perplexity's web search as a tool."""

    name: ClassVar[str] = "perplexity-agent"
    translator: ClassVar[type[Translator]] = PerplexityAgentTranslator

    def request(
        self,
        url: str,
        model: str,
        messages: tuple[dict[str, Any], ...],
        options: Mapping[str, Any],
        api_key: str | None,
        defaults: RequestDefaults,
    ) -> UpstreamRequest:
        # Its input parts have no `detail` (perplexity-py `InputMessageContentContentPartArray`).
        items, instructions = responses_input(messages, image_detail=False)
        # A model id is `provider/model`; a name without a slash is a preset (its own model,
        # system prompt and tools).
        preset = "/" not in model
        body: dict[str, Any] = {"preset" if preset else "model": model, "input": items}
        body["stream"] = True
        if instructions is not None:
            body["instructions"] = instructions
        if "max_tokens" in options:
            body["max_output_tokens"] = options["max_tokens"]
        if "reasoning_effort" in options:
            body["reasoning"] = {"effort": options["reasoning_effort"]}
        if "language_preference" in options:
            body["language_preference"] = options["language_preference"]
        response_format = options.get("response_format")
        # Its response_format is the chat API's json_schema shape (perplexity-py ResponseFormat).
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            body["response_format"] = response_format
        tools = function_tools(options.get("tools"))
        searching = options.get("disable_search") is not True
        configured = any(key in options for key in (*_SEARCH_FILTERS, "web_search_options"))
        # A model searches only with the tool; a preset has its own tools, replaced only when
        # the start gives some (then web search stays among them).
        if searching and (not preset or tools or configured):
            tools.append(web_search_tool(options))
        if tools:
            body["tools"] = tools
        return UpstreamRequest(url, bearer(api_key), body)
