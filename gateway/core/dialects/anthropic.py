"""The Anthropic Messages dialect (pure): `anthropic` (`POST /v1/messages`, `"stream": true`).

Reading the stream (upstream-formats.md, 1c and 4; the recorded streams in
reference/transcripts/, INDEX.md "Anthropic"):

- Every event is named (`event:`) after its JSON `type`; an unnamed event is read by its `type`.
  `ping` and unknown event types are ignored (the API "may add new event types").
- Answer text is each `text_delta` (all text blocks joined, with no separator), plus the text a
  text block's `content_block_start` carries (always "" in practice; the SDKs keep it).
- Reasoning is each `thinking_delta` (and a thinking block's initial text). `signature_delta`
  and `redacted_thinking` blocks are not relayed: they are opaque, only of use to send the turn
  back to Anthropic, which the protocol's messages cannot carry.
- A `tool_use` block is a tool call: id and name from `content_block_start`, arguments the
  `input_json_delta` fragments, complete at `content_block_stop` (or at the end of the
  message). When no fragment carried any text, the arguments are the start's `input`.
- `server_tool_use` (and `mcp_tool_use`) blocks are the provider's own tools, relayed as
  `progress` steps when complete: `web_search` a `search` step with its query, `web_fetch` a
  `fetch` step with its URL, the code-execution tools a `code` step, any other `other`.
- Sources are the cited URLs only: each `citations_delta` (`citation.url`, `title`,
  `cited_text` as the snippet; a `search_result_location` citation's `source`), and the
  citations a text block's start carries, numbered by order of first citation (`SourceIndex`).
  A `web_search_tool_result` block is not a source by itself; its results give a title to a
  later citation that has none.
- `usage` is `message_start.message.usage` overlaid with each `message_delta.usage` (which is
  cumulative), exactly as sent. `finish_reason` is `message_delta.delta.stop_reason`
  normalised (`refusal` is `content_filter`; `pause_turn`, a server-tool turn the API paused
  for the client to continue, is left out of `done`, `finish_raw` keeps it); an answer that
  called tools and ended with a plain stop says `tool_calls`.
- An `error` event is `upstream_error`, retryable for `overloaded_error`, `api_error` and
  `rate_limit_error` (`error_retryable`).
- The answer is complete when a `message_delta` with a `stop_reason` arrived, then
  `message_stop` or a clean EOF (a final `message_stop` without a blank line before EOF is
  dropped by the SSE rules, as in the anthropic-sdk recordings). A clean EOF before the
  `stop_reason` is `stream_interrupted`; a `message_stop` without one is a protocol error.
"""

from __future__ import annotations

import base64
from collections.abc import Collection, Mapping
from typing import Any, ClassVar, Final
from urllib.parse import unquote_to_bytes

import orjson

from gateway.core.dialects.base import (
    DEFAULT_LIMITS,
    Dialect,
    PartsTranslator,
    RequestDefaults,
    Translator,
    UpstreamFailure,
    UpstreamRequest,
    byte_len,
    error_message,
    error_retryable,
    loads_event,
    normalise_finish,
    parsed_call,
    protocol_error,
)
from gateway.core.parts import NULL_SINK, PartLimits, PartSink
from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEEvent
from gateway.core.usage import Usage, count

#: The API version the request names (the only stable one; docs "Versioning").
ANTHROPIC_VERSION: Final = "2023-06-01"

#: Block types that are the provider's own tools (progress, not tool calls).
_SERVER_TOOLS: Final = frozenset({"server_tool_use", "mcp_tool_use"})
#: Code-execution server tools and the input field that holds what they run.
_CODE_TOOLS: Final = {
    "code_execution": "code",
    "bash_code_execution": "command",
    "text_editor_code_execution": "command",
}


class _Block:
    """A `tool_use` or server-tool block being streamed: its input arrives in fragments."""

    __slots__ = ("args", "call_id", "kind", "name", "size", "start_input")

    def __init__(self, kind: str, block: dict[str, Any]) -> None:
        self.kind = kind
        call_id = block.get("id")
        self.call_id = call_id if isinstance(call_id, str) else ""
        name = block.get("name")
        self.name = name if isinstance(name, str) else ""
        self.start_input = block.get("input")
        self.args: list[str] = []
        self.size = 0


def _index(obj: dict[str, Any]) -> int | None:
    """A content block event's `index` (None when it has no integer one)."""
    index = obj.get("index")
    return index if type(index) is int else None


def _server_step(name: str, tool_input: Any) -> dict[str, Any]:
    """A server-side tool use as a protocol progress step."""
    fields = tool_input if isinstance(tool_input, dict) else {}
    if name == "web_search":
        query = fields.get("query")
        return {"kind": "search", "queries": [query] if isinstance(query, str) and query else []}
    if name == "web_fetch":
        url = fields.get("url")
        return {"kind": "fetch", "urls": [url] if isinstance(url, str) and url else []}
    key = _CODE_TOOLS.get(name)
    if key is not None:
        step: dict[str, Any] = {"kind": "code"}
        code = fields.get(key)
        if isinstance(code, str):
            step["code"] = code
        return step
    return {"kind": "other", "type": name}


class AnthropicTranslator(PartsTranslator):
    """Anthropic Messages events: `message_start`, content blocks, `message_delta`,
    `message_stop` (the module docstring has the rules)."""

    name = "anthropic"
    __slots__ = (
        "_blocks",
        "_closed",
        "_stop_seen",
        "_titles",
        "_tool_used",
    )

    def __init__(
        self,
        wants: Collection[str] = frozenset(),
        sink: PartSink = NULL_SINK,
        limits: PartLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(wants, sink, limits)
        #: Open tool and server-tool blocks by index (only those a client asked for).
        self._blocks: dict[int | None, _Block] = {}
        #: Titles of the web search results seen, by URL (for citations that have none).
        self._titles: dict[str, str] = {}
        self._tool_used = False
        self._stop_seen = False
        self._closed = False

    def feed(self, event: SSEEvent) -> str | None:
        data = event.data
        if not data:
            return None
        kind: Any = event.event
        if kind == "content_block_delta":
            obj = loads_event(data)
            # The hot path: a text delta, read with three subscripts; anything else (or a
            # malformed event, which raises here) takes the slow path, which checks it.
            try:
                delta = obj["delta"]
                if delta["type"] == "text_delta":
                    text = delta["text"]
                    if type(text) is str and text:
                        self.saw_text = True
                        return text
            except (KeyError, TypeError):
                pass
            return self._delta(obj)
        obj = loads_event(data)
        if not isinstance(obj, dict):
            raise protocol_error("upstream event is not a JSON object")
        if kind == "message":  # no `event:` line: the JSON `type` names it
            kind = obj.get("type")
            if kind == "content_block_delta":
                return self._delta(obj)
        if kind == "content_block_start":
            return self._block_start(obj)
        if kind == "content_block_stop":
            block = self._blocks.pop(_index(obj), None)
            if block is not None:
                self._complete(block)
            return None
        if kind == "message_delta":
            self._message_delta(obj)
            return None
        if kind == "message_start":
            message = obj.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self.meta["usage"] = dict(usage)
            return None
        if kind == "message_stop":
            if not self._stop_seen:
                raise protocol_error("upstream ended the message without a stop_reason")
            self.finished = True
            self._close()
            return None
        if kind == "error":
            err = obj.get("error", obj)
            raise UpstreamFailure(
                ErrorCode.UPSTREAM_ERROR, error_message(err), retryable=error_retryable(err)
            )
        return None  # `ping`, and event types added after this was written

    def usage(self) -> Usage | None:
        """Anthropic counts cache reads and writes apart from `input_tokens`: the prompt is all
        three (upstream-formats.md, section 2); `output_tokens` includes thinking."""
        raw = self.meta.get("usage")
        fresh, output = count(raw, "input_tokens"), count(raw, "output_tokens")
        if fresh is None and output is None:
            return None
        read = count(raw, "cache_read_input_tokens")
        write = count(raw, "cache_creation_input_tokens")
        prompt = (fresh or 0) + (read or 0) + (write or 0)
        return Usage(prompt, output or 0, None, read, write)

    def end_of_stream(self) -> None:
        if self.finished:
            return
        if self._stop_seen:
            self.finished = True
            self._close()
            return
        raise UpstreamFailure(
            ErrorCode.STREAM_INTERRUPTED, "upstream ended the stream before the answer was complete"
        )

    # -- the slow path

    def _delta(self, obj: Any) -> str | None:
        """A `content_block_delta` other than a non-empty text delta."""
        if not isinstance(obj, dict):
            raise protocol_error("upstream event is not a JSON object")
        delta = obj.get("delta")
        if not isinstance(delta, dict):
            raise protocol_error("upstream content_block_delta without a delta object")
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            if not isinstance(text, str):
                raise protocol_error("upstream text_delta without a string 'text'")
            if text:
                self.saw_text = True
                return text
        elif kind == "thinking_delta":
            thinking = delta.get("thinking")
            if isinstance(thinking, str) and thinking:
                self._reason(thinking)
        elif kind == "input_json_delta":
            block = self._blocks.get(_index(obj))
            fragment = delta.get("partial_json")
            if block is not None and isinstance(fragment, str) and fragment:
                self._fragment(block, fragment)
        elif kind == "citations_delta" and self._sources is not None:
            self._cite(delta.get("citation"))
        # signature_delta (a thinking block's opaque signature) and unknown kinds: nothing.
        return None

    def _block_start(self, obj: dict[str, Any]) -> str | None:
        block = obj.get("content_block")
        if not isinstance(block, dict):
            raise protocol_error("upstream content_block_start without a content_block object")
        kind = block.get("type")
        if kind == "text":
            if self._sources is not None:
                citations = block.get("citations")
                if isinstance(citations, list):
                    for citation in citations:
                        self._cite(citation)
            text = block.get("text")
            if isinstance(text, str) and text:
                self.saw_text = True
                return text
        elif kind == "thinking":
            thinking = block.get("thinking")
            if isinstance(thinking, str) and thinking:
                self._reason(thinking)
        elif kind == "tool_use":
            self.saw_text = True
            self._tool_used = True
            if self._want_tools:
                self._blocks[_index(obj)] = _Block(kind, block)
        elif kind in _SERVER_TOOLS:
            self.saw_text = True
            if self._want_progress:
                self._blocks[_index(obj)] = _Block(kind, block)
        elif kind == "web_search_tool_result":
            if self._sources is not None:
                self._search_results(block.get("content"))
        elif kind == "redacted_thinking":
            self.saw_text = True  # reasoning we cannot read: content all the same
        return None

    def _message_delta(self, obj: dict[str, Any]) -> None:
        usage = obj.get("usage")
        if isinstance(usage, dict):
            current = self.meta.get("usage")
            if isinstance(current, dict):
                current.update(usage)
            else:
                self.meta["usage"] = dict(usage)
        delta = obj.get("delta")
        stop = delta.get("stop_reason") if isinstance(delta, dict) else None
        if isinstance(stop, str) and stop:
            self._stop_seen = True
            self.finish_raw = stop
            normal = normalise_finish(stop)
            if normal == "stop" and self._tool_used:
                normal = "tool_calls"
            if normal is not None:
                self.meta["finish_reason"] = normal

    # -- reasoning, tool calls, sources

    def _fragment(self, block: _Block, fragment: str) -> None:
        block.size += byte_len(fragment)
        if block.size > self._limits.max_tool_args_bytes:
            raise protocol_error(
                f"upstream tool call arguments exceeded {self._limits.max_tool_args_bytes} bytes"
            )
        block.args.append(fragment)

    def _complete(self, block: _Block) -> None:
        """A tool call (`parsed_call`) or a server tool's progress step, pushed."""
        raw = "".join(block.args)
        if block.kind == "tool_use":
            call_id = block.call_id or f"toolu_{len(self._calls)}"
            if raw.strip():
                call = parsed_call(call_id, block.name, raw)
            else:
                # No fragment carried text: the input is the start's (expected.json `_rules`).
                start = block.start_input
                arguments = start if isinstance(start, dict) else {}
                if arguments and byte_len(orjson.dumps(arguments).decode()) > (
                    self._limits.max_tool_args_bytes
                ):
                    raise protocol_error(
                        f"upstream tool call arguments exceeded "
                        f"{self._limits.max_tool_args_bytes} bytes"
                    )
                call = {"call_id": call_id, "name": block.name, "arguments": arguments}
            self._calls.append(call)
            self._sink.push_tool_call(call)
            return
        tool_input = block.start_input
        if raw.strip():
            try:
                tool_input = orjson.loads(raw)
            except orjson.JSONDecodeError:
                tool_input = None
        self._sink.push_progress(_server_step(block.name, tool_input))

    def _search_results(self, content: Any) -> None:
        """Remember the titles of a `web_search_tool_result` block's results."""
        if not isinstance(content, list):
            return  # a `web_search_tool_result_error`
        for result in content:
            if isinstance(result, dict):
                url = result.get("url")
                title = result.get("title")
                if isinstance(url, str) and isinstance(title, str) and title:
                    self._titles.setdefault(url, title)

    def _cite(self, citation: Any) -> None:
        """One citation: a new source when its URL was not cited before."""
        if not isinstance(citation, dict):
            return
        url = citation.get("url")
        if url is None and citation.get("type") == "search_result_location":
            url = citation.get("source")
        if not isinstance(url, str) or not url:
            return
        title = citation.get("title")
        if not isinstance(title, str) or not title:
            title = self._titles.get(url)
        assert self._sources is not None
        source = self._sources.reveal(url, {"title": title, "snippet": citation.get("cited_text")})
        if source is not None:
            self._sink.push_sources([source])

    # -- the end

    def _close(self) -> None:
        """The message is over: open blocks are complete, and `done` gets `reasoning` and
        `tool_calls` for a client that asked for them (left out when there is none)."""
        if self._closed:
            return
        self._closed = True
        blocks, self._blocks = self._blocks, {}
        for block in blocks.values():
            self._complete(block)
        self._record_parts()


# --------------------------------------------------------------------------------------------
# The request: a `start` as a Messages API body
# --------------------------------------------------------------------------------------------

#: `reasoning_effort` -> extended thinking's `budget_tokens` (1024 is the API's minimum).
THINKING_BUDGETS: Final[Mapping[str, int]] = {
    "minimal": 1024,
    "low": 1024,
    "medium": 4096,
    "high": 16384,
}
_TOOL_CHOICES: Final[Mapping[str, str]] = {"auto": "auto", "none": "none", "required": "any"}


def _image(url: Any) -> dict[str, Any]:
    """An `image_url` as an image block: a data: URL as base64 data, any other URL by URL."""
    if isinstance(url, str) and url[:5].lower() == "data:":
        header, _, payload = url[5:].partition(",")
        params = header.split(";")
        media_type = params[0] or "text/plain"
        if "base64" not in params[1:]:  # a percent-encoded data URL: the API takes base64
            payload = base64.b64encode(unquote_to_bytes(payload)).decode()
        source = {"type": "base64", "media_type": media_type, "data": payload}
        return {"type": "image", "source": source}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _part(part: Any) -> Any:
    """One OpenAI-shaped content part as an Anthropic content block; other parts (Anthropic's
    own `image`, `document`, ...) are passed as they are."""
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": part.get("text", "")}
    if kind == "image_url":
        image = part.get("image_url")
        return _image(image.get("url") if isinstance(image, dict) else image)
    return part


def _content(content: Any) -> Any:
    """A message's content: a string as it is, a list of parts converted."""
    if isinstance(content, list):
        return [_part(p) for p in content]
    return content


def _as_blocks(content: Any) -> list[Any]:
    """Content as a list of blocks (to merge two messages): a string is one text block (none
    when empty: the API refuses empty text blocks)."""
    if isinstance(content, list):
        return content
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return []


def _system_text(content: Any) -> str:
    if isinstance(content, list):
        return "\n\n".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return content if isinstance(content, str) else ""


def _tool_use(call: Mapping[str, Any]) -> dict[str, Any]:
    """An assistant's tool call (OpenAI shape) as a `tool_use` block; arguments that are not a
    JSON object (empty, or invalid as a cut-off call's may be) become `{}`."""
    function = call.get("function") or {}
    raw = function.get("arguments") or ""
    try:
        arguments = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        arguments = {}
    return {
        "type": "tool_use",
        "id": call.get("id"),
        "name": function.get("name"),
        "input": arguments if isinstance(arguments, dict) else {},
    }


def anthropic_messages(messages: tuple[dict[str, Any], ...]) -> tuple[str, list[dict[str, Any]]]:
    """(system, messages) for the Messages API: system messages' text joined with blank lines;
    the rest as user and assistant turns, a `tool` message as a user turn with a
    `tool_result` block, consecutive turns of one role merged (the API wants them to
    alternate)."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role == "system":
            text = _system_text(content)
            if text:
                system.append(text)
            continue
        turn: Any
        if role == "tool":
            role = "user"
            result = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id"),
                "content": _content(content),
            }
            turn = [result]
        elif role == "assistant" and message.get("tool_calls"):
            turn = _as_blocks(_content(content))
            turn += [_tool_use(call) for call in message["tool_calls"]]
        else:
            turn = _content(content)
            role = "assistant" if role == "assistant" else "user"
        if out and out[-1]["role"] == role:
            last = out[-1]
            last["content"] = _as_blocks(last["content"]) + _as_blocks(turn)
        else:
            out.append({"role": role, "content": turn})
    return "\n\n".join(system), out


def anthropic_options(
    body: dict[str, Any], options: Mapping[str, Any], defaults: RequestDefaults
) -> None:
    """Put the start's options that the Messages API has into `body` (under their names
    there); the others are left out (docs/upstreams.md, "anthropic")."""
    max_tokens = options.get("max_tokens")
    if max_tokens is None:
        max_tokens = defaults.max_tokens
    body["max_tokens"] = max_tokens
    for key in ("temperature", "top_p", "top_k"):
        if options.get(key) is not None:
            body[key] = options[key]
    stop = options.get("stop")
    if stop is not None:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    tools = options.get("tools")
    if tools:
        body["tools"] = [
            {
                "name": t["function"]["name"],
                **(
                    {"description": t["function"]["description"]}
                    if "description" in t["function"]
                    else {}
                ),
                "input_schema": t["function"].get("parameters")
                or {"type": "object", "properties": {}},
            }
            for t in tools
        ]
    choice = options.get("tool_choice")
    tool_choice: dict[str, Any] | None = None
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        tool_choice = {"type": _TOOL_CHOICES[choice]}
    elif isinstance(choice, dict):
        function = choice.get("function")
        if isinstance(function, dict):
            tool_choice = {"type": "tool", "name": function.get("name")}
    if options.get("parallel_tool_calls") is False and (tools or tool_choice is not None):
        tool_choice = tool_choice or {"type": "auto"}
        if tool_choice["type"] != "none":  # `none` takes no other field
            tool_choice["disable_parallel_tool_use"] = True
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    effort = options.get("reasoning_effort")
    budget = THINKING_BUDGETS.get(effort) if isinstance(effort, str) else None
    if budget is not None:
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
        # The budget counts against max_tokens and must be below it: the answer keeps the
        # max_tokens asked for, on top of the budget.
        if isinstance(max_tokens, int) and max_tokens <= budget:
            body["max_tokens"] = budget + max_tokens


class AnthropicDialect(Dialect):
    """Anthropic Messages (`POST /v1/messages`): `x-api-key` and `anthropic-version` headers."""

    name: ClassVar[str] = "anthropic"
    translator: ClassVar[type[Translator]] = AnthropicTranslator

    def request(
        self,
        url: str,
        model: str,
        messages: tuple[dict[str, Any], ...],
        options: Mapping[str, Any],
        api_key: str | None,
        defaults: RequestDefaults,
    ) -> UpstreamRequest:
        system, turns = anthropic_messages(messages)
        body: dict[str, Any] = {"model": model}
        anthropic_options(body, options, defaults)
        if system:
            body["system"] = system
        body["messages"] = turns
        body["stream"] = True
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return UpstreamRequest(url, headers, body)
