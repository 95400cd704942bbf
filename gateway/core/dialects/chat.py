"""The chat-completions dialects (pure): `openai` (OpenAI and every OpenAI-compatible API:
Azure, DeepSeek, xAI, Mistral, Groq, vLLM, OpenRouter) and `perplexity` (Sonar).

Chat-completions rules (the `openai` and `perplexity` dialects; protocol.md, "Parts"):

- Answer text is `delta.content` (a string, or the `text` parts of Mistral's content arrays) and
  `delta.refusal` (then `meta["refusal"] = True`). Only choice index 0 is relayed.
- Reasoning is `delta.reasoning_content` (DeepSeek, xAI), else `delta.reasoning` (Groq, vLLM,
  OpenRouter), else the text of OpenRouter's `delta.reasoning_details` (`reasoning.text` and
  `reasoning.summary`; OpenRouter sends the same text in `reasoning` too, so details are read
  only when neither field carries any), Mistral's `thinking` parts, and a leading
  `<think>...</think>` block of the answer text (`ThinkSplitter`). Never answer text.
- Tool calls (`delta.tool_calls`) are accumulated one at a time, by `index`, or by `id` when
  there is no index (Mistral); a call is complete when another starts or the answer ends.
- Sources: Perplexity's `citations` and `search_results`, `url_citation` annotations, and the
  search results of Perplexity's reasoning steps (`SourceIndex` numbers them).
- Progress: Perplexity's `stream_mode: "concise"` reasoning steps (`progress_step`).
- `finish_reason` is normalised (`normalise_finish`); the answer ends at a finish_reason,
  Perplexity's `chat.completion.done`, `[DONE]` or a clean EOF.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, ClassVar, Final

from gateway.core.dialects.base import (
    DEFAULT_LIMITS,
    META_KEYS,
    Dialect,
    PartsTranslator,
    RequestDefaults,
    Translator,
    UpstreamFailure,
    UpstreamRequest,
    bearer,
    byte_len,
    error_message,
    error_retryable,
    loads_event,
    normalise_finish,
    parsed_call,
    protocol_error,
)
from gateway.core.dialects.sources import progress_step
from gateway.core.dialects.think import ThinkSplitter
from gateway.core.parts import NULL_SINK, PartLimits, PartSink
from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEEvent

#: The same, to tell in one C call whether an event carries any (most OpenAI chunks carry none).
_META_SET: Final = frozenset(META_KEYS)
#: Delta keys that carry something besides plain answer text: a delta without text and without
#: any of them (a role chunk, an empty last delta) is told in one C call (`isdisjoint`).
_PART_KEYS: Final = frozenset(
    {
        "reasoning_content",
        "reasoning",
        "reasoning_details",
        "tool_calls",
        "function_call",
        "refusal",
        "annotations",
        "reasoning_steps",
    }
)
#: Perplexity's concise-mode chunk objects that close a stage (they carry usage and sources).
_DONE_OBJECTS: Final = frozenset({"chat.reasoning.done", "chat.completion.done"})


def _choice_zero(choices: Any) -> dict[str, Any] | None:
    """The choice with index 0 (or none given) among an event's choices."""
    if not isinstance(choices, list):
        return None
    for choice in choices:
        if not isinstance(choice, dict):
            raise protocol_error("upstream choice is not a JSON object")
        if not choice.get("index"):  # 0, or absent (as the fast path tells)
            return choice
    return None


def _details_text(details: Any) -> str:
    """The readable text of OpenRouter's `reasoning_details` (encrypted entries have none)."""
    if not isinstance(details, list):
        return ""
    texts = []
    for detail in details:
        if isinstance(detail, dict):
            kind = detail.get("type")
            text = (
                detail.get("text")
                if kind == "reasoning.text"
                else detail.get("summary")
                if kind == "reasoning.summary"
                else None
            )
            if isinstance(text, str) and text:
                texts.append(text)
    return "".join(texts)


class _ToolCall:
    """A tool call being streamed: its arguments arrive in fragments."""

    __slots__ = ("args", "call_id", "index", "name", "size")

    def __init__(self, index: int | None, call_id: str | None) -> None:
        self.index = index
        self.call_id = call_id
        self.name = ""
        self.args: list[str] = []
        self.size = 0


class OpenAITranslator(PartsTranslator):
    """OpenAI-compatible `chat.completion.chunk` events (OpenAI, Azure, DeepSeek, xAI, Mistral,
    Groq, vLLM, OpenRouter); the end is `[DONE]` or EOF after a finish_reason."""

    name = "openai"
    __slots__ = (
        "_call",
        "_call_indexes",
        "_cited",
        "_closed",
        "_found",
        "_saw_finish",
        "_steps",
        "_think",
    )

    def __init__(
        self,
        wants: Collection[str] = frozenset(),
        sink: PartSink = NULL_SINK,
        limits: PartLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(wants, sink, limits)
        #: Until the answer is past a leading `<think>` block; None from then on (the fast path).
        self._think: ThinkSplitter | None = ThinkSplitter()
        self._call: _ToolCall | None = None
        self._call_indexes: set[int] = set()
        #: The lengths of Perplexity's `citations` and `search_results` last looked at.
        self._cited = 0
        self._found = 0
        #: Reasoning steps seen (for progress or sources), to tell new ones from repeats.
        self._steps: list[Any] | None = (
            [] if self._want_progress or self._sources is not None else None
        )
        self._saw_finish = False
        self._closed = False

    def feed(self, event: SSEEvent) -> str | None:
        data = event.data
        if not data:
            return None
        if data == "[DONE]":
            self.finished = True
            return self._close()
        obj = loads_event(data)
        if not isinstance(obj, dict):
            raise UpstreamFailure(
                ErrorCode.UPSTREAM_PROTOCOL_ERROR, "upstream event is not a JSON object"
            )
        if "error" in obj:
            err = obj["error"]
            raise UpstreamFailure(
                ErrorCode.UPSTREAM_ERROR, error_message(err), retryable=error_retryable(err)
            )
        if not _META_SET.isdisjoint(obj):
            meta = self.meta
            for key in META_KEYS:
                if key in obj:  # cheaper than get() for the keys that are absent
                    value = obj[key]
                    if value is not None:
                        meta[key] = value
            if self._sources is not None and ("citations" in obj or "search_results" in obj):
                self._perplexity_sources(obj)
        choices = obj.get("choices")
        if not choices or not isinstance(choices, list):
            return None
        choice = choices[0]
        if not isinstance(choice, dict):
            raise UpstreamFailure(
                ErrorCode.UPSTREAM_PROTOCOL_ERROR, "upstream choice is not a JSON object"
            )
        delta = choice.get("delta")
        # The fast path: choice 0, no finish, a delta with nothing but text (and its role).
        if (
            choice.get("finish_reason") is None
            and not choice.get("index")  # 0, or absent
            and isinstance(delta, dict)
        ):
            text = delta.get("content")
            if isinstance(text, str) and text:
                # Nothing but `content` (OpenAI) or `role` and `content` (Perplexity): two
                # cheap checks (measured: a third of `_PART_KEYS.isdisjoint`'s instructions).
                size = len(delta)
                if size == 1 or (size == 2 and "role" in delta):
                    self.saw_text = True
                    if self._think is None:
                        return text
                    return self._split(text)
            # A delta without text (the first and last chunks) has no part either; Perplexity's
            # concise `*.done` chunks are told here, off the text path.
            elif (
                (text is None or text == "")
                and _PART_KEYS.isdisjoint(delta)
                and obj.get("object") not in _DONE_OBJECTS
            ):
                return None
        return self._slow(obj)

    def end_of_stream(self) -> None:
        if self.finished:
            return
        # A clean EOF after a finish_reason is a complete answer; without one it was cut off
        # (upstream-formats.md, 0.7: SDKs silently accept this, we do not).
        if self._saw_finish:
            self._eof()
            return
        raise UpstreamFailure(
            ErrorCode.STREAM_INTERRUPTED, "upstream ended the stream before the answer was complete"
        )

    def _eof(self) -> None:
        """A clean EOF that ends the answer. Nothing was relayed while the splitter still held
        text, so what it held is the answer's text in full (`finish_done` relays it)."""
        self.finished = True
        held = self._close()
        if held:
            self.final_text = held

    # -- the slow path: anything but a plain text delta (once or a few times per stream)

    def _slow(self, obj: dict[str, Any]) -> str | None:
        kind = obj.get("object")
        out: list[str] = []
        choice = _choice_zero(obj.get("choices"))
        if choice is not None:
            finish = choice.get("finish_reason")
            if finish is not None:
                self._finish(finish)
            delta = choice.get("delta")
            steps = None
            if isinstance(delta, dict):
                self._delta(delta, out)
                steps = delta.get("reasoning_steps")
            if kind == "chat.reasoning.done" and not steps:
                # Its steps may come in `message` only (the whole list: repeats are skipped).
                message = choice.get("message")
                if isinstance(message, dict):
                    self._reasoning_steps(message.get("reasoning_steps"))
            if finish is not None:
                out.append(self._end_answer())
        if kind == "chat.completion.done":
            out.append(self._end_answer())
        text = "".join(out)
        return text or None

    def _delta(self, delta: dict[str, Any], out: list[str]) -> None:
        """Everything a delta carries: reasoning, text (or refusal), tool calls, annotations and
        reasoning steps, pushed or collected in that order."""
        reasoning = delta.get("reasoning_content")
        if not (isinstance(reasoning, str) and reasoning):
            reasoning = delta.get("reasoning")
            if not (isinstance(reasoning, str) and reasoning):
                reasoning = _details_text(delta.get("reasoning_details"))
        if reasoning:
            self._reason(reasoning)
        content = delta.get("content")
        if isinstance(content, str):
            if content:
                self._text(content, out)
        elif isinstance(content, list):
            self._content_parts(content, out)
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            self.meta["refusal"] = True
            self._text(refusal, out)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            self.saw_text = True
            if self._want_tools:
                for fragment in calls:
                    if isinstance(fragment, dict):
                        self._tool_fragment(fragment)
        legacy = delta.get("function_call")  # OpenAI's deprecated single-function form
        if isinstance(legacy, dict):
            self.saw_text = True
            if self._want_tools:
                self._tool_fragment({"function": legacy})
        if self._sources is not None:
            annotations = delta.get("annotations")
            if isinstance(annotations, list):
                self._annotations(annotations)
        steps = delta.get("reasoning_steps")
        if steps:
            self._reasoning_steps(steps)

    def _content_parts(self, parts: list[Any], out: list[str]) -> None:
        """Mistral's content arrays: `text` parts are answer text, `thinking` parts (a list of
        `{type: text, text}`, or a string) reasoning."""
        for part in parts:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if isinstance(text, str) and text:
                    self._text(text, out)
            elif kind == "thinking":
                thinking = part.get("thinking")
                if isinstance(thinking, str):
                    thinking = [{"type": "text", "text": thinking}]
                if isinstance(thinking, list):
                    for item in thinking:
                        if isinstance(item, dict) and item.get("type") == "text":
                            text = item.get("text")
                            if isinstance(text, str) and text:
                                self._reason(text)

    # -- answer text and reasoning

    def _split(self, text: str) -> str | None:
        """Text while the answer may still open with a `<think>` block."""
        think = self._think
        assert think is not None
        answer, reasoning = think.feed(text)
        if reasoning:
            self._reason(reasoning)
        if think.state == ThinkSplitter.PASS:
            self._think = None
        return answer or None

    def _text(self, text: str, out: list[str]) -> None:
        self.saw_text = True
        if self._think is not None:
            split = self._split(text)
            if split:
                out.append(split)
        else:
            out.append(text)

    # -- tool calls

    def _tool_fragment(self, fragment: dict[str, Any]) -> None:
        """One `delta.tool_calls[]` entry: it continues the open call (same index, or no index,
        and no other id) or starts the next one, which completes the open call."""
        index = fragment.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            index = None
        call_id = fragment.get("id")
        if not isinstance(call_id, str) or not call_id:
            call_id = None
        call = self._call
        if (
            call is None
            or (index is not None and index != call.index)
            or (call_id is not None and call.call_id is not None and call_id != call.call_id)
        ):
            if call is not None:
                self._complete_call(call)
            if index is not None and call_id is None and index in self._call_indexes:
                raise protocol_error("upstream continued a tool call after the next one began")
            call = self._call = _ToolCall(index, call_id)
            if index is not None:
                self._call_indexes.add(index)
        elif call.call_id is None:
            call.call_id = call_id
        function = fragment.get("function")
        if isinstance(function, dict):
            name = function.get("name")
            if isinstance(name, str) and name and not call.name:
                call.name = name
            args = function.get("arguments")
            if isinstance(args, str) and args:
                call.size += byte_len(args)
                if call.size > self._limits.max_tool_args_bytes:
                    raise protocol_error(
                        f"upstream tool call arguments exceeded "
                        f"{self._limits.max_tool_args_bytes} bytes"
                    )
                call.args.append(args)

    def _complete_call(self, call: _ToolCall) -> None:
        """Push a complete call (`parsed_call`)."""
        self._call = None
        done = parsed_call(
            call.call_id or f"call_{len(self._calls)}", call.name, "".join(call.args)
        )
        self._calls.append(done)
        self._sink.push_tool_call(done)

    # -- sources and progress

    def _perplexity_sources(self, obj: dict[str, Any]) -> None:
        """New sources in Perplexity's cumulative lists, looked at only when they changed (they
        repeat on every chunk), so a new entry is told by a list's length."""
        citations = obj.get("citations")
        results = obj.get("search_results")
        cited = len(citations) if isinstance(citations, list) else 0
        found = len(results) if isinstance(results, list) else 0
        if cited == self._cited and found == self._found:
            return  # the same lists again: they only ever grow (upstream-formats.md, 1a)
        self._cited = cited
        self._found = found
        assert self._sources is not None
        new = self._sources.perplexity(citations, results)
        if new:
            self._sink.push_sources(new)

    def _annotations(self, annotations: list[Any]) -> None:
        """`url_citation` annotations (OpenAI search models: `{type, url_citation: {url,
        title}}`; some servers put `url` and `title` on the annotation itself)."""
        assert self._sources is not None
        found = []
        for annotation in annotations:
            if isinstance(annotation, dict) and annotation.get("type") == "url_citation":
                cited = annotation.get("url_citation")
                about = cited if isinstance(cited, dict) else annotation
                source = self._sources.reveal(about.get("url"), about)
                if source is not None:
                    found.append(source)
        if found:
            self._sink.push_sources(found)

    def _reasoning_steps(self, steps: Any) -> None:
        """Perplexity concise mode's reasoning steps, as progress (and their search results as
        sources). A list that repeats the steps already seen (a `chat.reasoning.done`) only
        adds what follows them."""
        seen = self._steps
        if seen is None or not isinstance(steps, list):
            return
        count = len(seen)
        if count and len(steps) >= count and steps[:count] == seen:
            steps = steps[count:]
        seen.extend(steps)
        for step in steps:
            if not isinstance(step, dict):
                continue
            if self._want_progress:
                self._sink.push_progress(progress_step(step))
            if self._sources is not None:
                search = step.get("web_search")
                results = search.get("search_results") if isinstance(search, dict) else None
                if isinstance(results, list):
                    found = []
                    for result in results:
                        if isinstance(result, dict):
                            source = self._sources.reveal(result.get("url"), result)
                            if source is not None:
                                found.append(source)
                    if found:
                        self._sink.push_sources(found)

    # -- the end

    def _finish(self, finish: Any) -> None:
        self._saw_finish = True
        if isinstance(finish, str):
            self.finish_raw = finish
            normal = normalise_finish(finish)
            if normal is not None:
                self.meta["finish_reason"] = normal

    def _end_answer(self) -> str:
        """The answer is over (a finish_reason, `chat.completion.done`, the end of the stream):
        the open tool call is complete, and text the splitter held is answer or reasoning."""
        if self._call is not None:
            self._complete_call(self._call)
        think = self._think
        if think is None:
            return ""
        self._think = None
        answer, reasoning = think.finish()
        if reasoning:
            self._reason(reasoning)
        return answer

    def _close(self) -> str | None:
        """The stream is over: what is still held, and `done`'s `reasoning` and `tool_calls`
        for a client that asked for them (left out when there is none)."""
        if self._closed:
            return None
        self._closed = True
        held = self._end_answer()
        self._record_parts()
        return held or None


class PerplexityTranslator(OpenAITranslator):
    """Perplexity: OpenAI-shaped, CRLF, usually no `[DONE]`: a clean EOF is the end (1a)."""

    name = "perplexity"
    __slots__ = ()

    def end_of_stream(self) -> None:
        if self.finished:
            return
        # EOF is Perplexity's end marker, even without a finish_reason (a 2025-08 capture ends
        # with finish_reason null). A 200 that carried no chunk at all is not an answer.
        if self.saw_text or self.meta:
            self._eof()
            return
        raise UpstreamFailure(
            ErrorCode.UPSTREAM_PROTOCOL_ERROR, "upstream ended the stream without sending an event"
        )


def chat_body(
    model: str, messages: tuple[dict[str, Any], ...], options: Mapping[str, Any]
) -> dict[str, Any]:
    """The chat-completions POST body: the start's options, model and messages as they are
    (the protocol's shapes are this API's), streamed."""
    body: dict[str, Any] = dict(options)
    body["model"] = model
    body["messages"] = list(messages)
    body["stream"] = True
    return body


class OpenAIDialect(Dialect):
    """OpenAI Chat Completions (`POST /v1/chat/completions`) and every API that copies it."""

    name: ClassVar[str] = "openai"
    translator: ClassVar[type[Translator]] = OpenAITranslator

    def request(
        self,
        url: str,
        model: str,
        messages: tuple[dict[str, Any], ...],
        options: Mapping[str, Any],
        api_key: str | None,
        defaults: RequestDefaults,
    ) -> UpstreamRequest:
        body = chat_body(model, messages, options)
        # Without this OpenAI never reports usage on a stream (upstream-formats.md, 1b).
        body["stream_options"] = {"include_usage": True}
        return UpstreamRequest(url, bearer(api_key), body)


class PerplexityDialect(Dialect):
    """Perplexity Sonar (`POST /chat/completions`): chat completions with its own extras."""

    name: ClassVar[str] = "perplexity"
    translator: ClassVar[type[Translator]] = PerplexityTranslator

    def request(
        self,
        url: str,
        model: str,
        messages: tuple[dict[str, Any], ...],
        options: Mapping[str, Any],
        api_key: str | None,
        defaults: RequestDefaults,
    ) -> UpstreamRequest:
        # Perplexity reports usage and citations on every chunk by itself; `stream_options` is
        # an OpenAI field it does not document, so it is not sent.
        return UpstreamRequest(url, bearer(api_key), chat_body(model, messages, options))
