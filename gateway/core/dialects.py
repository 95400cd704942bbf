"""Upstream dialects: request bodies out, SSE events in, answer text, typed parts and one outcome
back.

PURE module. A `Translator` is fed the SSE events of one upstream response. `feed()` returns the
answer-text delta an event carries (or None): the hot path. What else the event reveals
(reasoning, sources, tool calls, progress steps: `gateway.core.parts`) goes to the translator's
`PartSink`, only for the kinds the client asked for, in the order the upstream revealed it (a part
revealed by an event is pushed before that event's text is returned). `feed()` raises
`UpstreamFailure` when the upstream reports an error, sends something unparsable or goes over a
`PartLimits` bound, and sets `finished` when a terminal marker was seen; `end_of_stream()` judges
a clean EOF. Metadata for `done` (citations, usage, ...) is kept in `meta` with "last value wins",
because Perplexity repeats cumulative values on every chunk (upstream-formats.md, 1a).

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

import re
from abc import ABC, abstractmethod
from collections.abc import Collection
from typing import Any, Final

import orjson

from gateway.core.parts import NULL_SINK, PartLimits, PartSink
from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEEvent

#: Top-level metadata keys relayed in `done` when the upstream sent them (protocol.md, "done").
META_KEYS: Final = ("citations", "search_results", "images", "related_questions", "videos", "usage")
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
_DEFAULT_LIMITS: Final = PartLimits()


class UpstreamFailure(Exception):
    """The upstream stream ended badly; carries the protocol error the client will see."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool | None = None,
        status: int | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after_ms = retry_after_ms


def _loads(data: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamFailure(
            ErrorCode.UPSTREAM_PROTOCOL_ERROR, "upstream sent an event that is not valid JSON"
        ) from None


#: What may identify internal infrastructure or carry a credential in an upstream message.
_URL_RE: Final = re.compile(r"\b(?:https?|wss?)://\S+", re.IGNORECASE)
_SECRET_RE: Final = re.compile(
    r"\b(?:sk|pplx|key|tok|bearer)[-_][A-Za-z0-9_\-]{8,}|\bBearer\s+\S+", re.IGNORECASE
)
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]+")


def sanitize(text: str, limit: int = 300) -> str:
    """Make upstream text safe to show a client: no URLs or hostnames, nothing shaped like a
    key, no control characters, bounded length (docs/security.md, "Input hardening")."""
    text = _URL_RE.sub("[url]", text)
    text = _SECRET_RE.sub("[redacted]", text)
    text = _CONTROL_RE.sub(" ", text).strip()
    return text[:limit]


def _error_message(error: Any) -> str:
    """The human text of an upstream error object, bounded and sanitised."""
    if isinstance(error, dict):
        msg = error.get("message")
        if isinstance(msg, str) and msg:
            return sanitize(msg)
        kind = error.get("type")
        if isinstance(kind, str):
            return sanitize(kind, 100)
    if isinstance(error, str):
        return sanitize(error)
    return "upstream reported an error"


def _error_retryable(error: Any) -> bool:
    kind = error.get("type") if isinstance(error, dict) else None
    return kind in ("server_error", "overloaded_error", "api_error", "rate_limit_error")


#: finish_reason values seen across OpenAI-compatible (and other) upstreams, lower-cased, to the
#: protocol's four (`parts.FINISH_REASONS`).
_FINISH: Final[dict[str, str]] = {
    "stop": "stop",
    "end_turn": "stop",
    "eos": "stop",
    "eos_token": "stop",
    "stop_sequence": "stop",
    "complete": "stop",
    "completed": "stop",
    "length": "length",
    "max_tokens": "length",
    "max_output_tokens": "length",
    "model_length": "length",
    "model_context_window_exceeded": "length",
    "tool_calls": "tool_calls",
    "tool_call": "tool_calls",
    "tool_use": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
    "content_filtered": "content_filter",
    "safety": "content_filter",
    "recitation": "content_filter",
    "prohibited_content": "content_filter",
    "blocklist": "content_filter",
    "spii": "content_filter",
    "refusal": "content_filter",
}


def normalise_finish(value: str) -> str | None:
    """The protocol's finish_reason for an upstream's (any case), or None for a value we do not
    know: such a value is left out of `done` (the protocol's set stays closed, so a client can
    switch on it) but still counts as the upstream having finished (`Translator.finish_raw`
    keeps it for logs)."""
    known = _FINISH.get(value)
    return known if known is not None else _FINISH.get(value.lower())


_OPEN_TAG: Final = "<think>"
_CLOSE_TAG: Final = "</think>"
#: Leading whitespace held while waiting to see whether a `<think>` follows; past this much, the
#: answer is taken to have no block (so a stream of blanks costs no quadratic re-scanning).
_LEAD_LIMIT: Final = 4096


class ThinkSplitter:
    """Splits a leading `<think>...</think>` block off an answer's text, whatever the chunking.

    A small state machine fed the answer's text deltas; `feed()` returns `(answer, reasoning)`
    for each. Only a leading block is reasoning: whitespace may precede `<think>` (it is dropped
    with the block); once the first non-whitespace text is not the start of `<think>`, everything
    is answer text, a later `<think>` included. Inside the block, a possible partial `</think>`
    at the end of a delta is held back until the next one says. The whitespace between
    `</think>` and the answer is dropped (the answer starts at its first non-whitespace
    character); the block's own text is reasoning verbatim. A block never closed is all
    reasoning (`finish()`); text held before the decision is answer text at the end (an answer
    such as "<" or "  " is relayed as it came).

    Once `state` is `PASS` the splitter has nothing left to do: the translator drops it, so the
    rest of the answer passes with one attribute check.
    """

    LEAD: Final = 0  # before the first non-whitespace text: is it `<think>`?
    OPEN: Final = 1  # inside the block
    AFTER: Final = 2  # after `</think>`: dropping the whitespace before the answer
    PASS: Final = 3  # plain answer text from here on

    __slots__ = ("_held", "state")

    def __init__(self) -> None:
        self.state = self.LEAD
        #: LEAD: the whitespace and partial `<think>` seen so far; OPEN: a partial `</think>`.
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """`(answer, reasoning)` in `text`, given everything fed before."""
        state = self.state
        if state == self.PASS:
            return text, ""
        if state == self.LEAD:
            held = self._held + text
            body = held.lstrip()
            if not body and len(held) <= _LEAD_LIMIT:
                self._held = held
                return "", ""
            if body and len(body) < len(_OPEN_TAG) and _OPEN_TAG.startswith(body):
                self._held = held  # "<th": wait for the rest of the tag
                return "", ""
            self._held = ""
            if not body.startswith(_OPEN_TAG):
                self.state = self.PASS
                return held, ""
            state = self.state = self.OPEN
            text = body[len(_OPEN_TAG) :]
        reasoning = ""
        if state == self.OPEN:
            data = self._held + text if self._held else text
            end = data.find(_CLOSE_TAG)
            if end < 0:
                # Hold back a suffix that may be the start of `</think>`: it begins with the
                # tag's only "<", so with the last "<" among the final len-1 characters.
                cut = data.rfind("<", max(0, len(data) - len(_CLOSE_TAG) + 1))
                if cut >= 0 and _CLOSE_TAG.startswith(data[cut:]):
                    self._held = data[cut:]
                    return "", data[:cut]
                self._held = ""
                return "", data
            self._held = ""
            self.state = self.AFTER
            reasoning = data[:end]
            text = data[end + len(_CLOSE_TAG) :]
        answer = text.lstrip()
        if answer:
            self.state = self.PASS
        return answer, reasoning

    def finish(self) -> tuple[str, str]:
        """The answer is over: `(answer, reasoning)` still held. An unclosed block's held text is
        reasoning; text held before the decision is answer text."""
        held, self._held = self._held, ""
        state, self.state = self.state, self.PASS
        if state == self.LEAD:
            return held, ""
        if state == self.OPEN:
            return "", held
        return "", ""


#: Dropped URLs remembered (so a URL repeated on every chunk is counted once); past this many,
#: further drops are counted each time they are seen in a changed list.
_DROPPED_MEMORY: Final = 4096


class SourceIndex:
    """Numbers one stream's sources: each URL is sent once, with an `index` that never changes.

    The index is what the answer's `[n]` markers refer to. A URL in Perplexity's `citations` gets
    its 1-based position there. Any other URL (only in `search_results`, a `url_citation`
    annotation, a reasoning step's search result) gets the next number after every index given
    and every citation position seen so far, in order of first appearance. Citations normally
    come whole in the first chunk that has them (every capture); if they grow later, a new
    citation keeps its position unless a URL sent earlier already holds that number, in which
    case it takes the next free one (an index, once sent, is never reused or moved).

    At most `limit` sources; further URLs are dropped and counted in `dropped`.
    """

    __slots__ = ("_by_url", "_dropped_urls", "_limit", "_taken", "_top", "dropped")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._by_url: dict[str, int] = {}
        self._taken: set[int] = set()
        #: The highest index given, or citation position seen.
        self._top = 0
        self._dropped_urls: set[str] = set()
        self.dropped = 0

    def perplexity(self, citations: Any, results: Any) -> list[dict[str, Any]]:
        """New sources in Perplexity's cumulative `citations` (URLs) and `search_results`
        (`{title, url, date, snippet, ...}`, merged into the citation of the same URL)."""
        found: list[dict[str, Any]] = []
        info: dict[str, dict[str, Any]] = {}
        if isinstance(results, list):
            for result in results:
                if isinstance(result, dict):
                    url = result.get("url")
                    if isinstance(url, str) and url:
                        info.setdefault(url, result)
        if isinstance(citations, list):
            top = self._top
            self._top = max(top, len(citations))
            for position, url in enumerate(citations, 1):
                if isinstance(url, str) and url and url not in self._by_url:
                    index = position if position not in self._taken else None
                    self._add(found, url, info.get(url), index)
        for url, result in info.items():
            if url not in self._by_url:
                self._add(found, url, result)
        return found

    def reveal(self, url: Any, about: Any = None) -> dict[str, Any] | None:
        """A source by order of first appearance (annotations, search steps), if it is new."""
        if not isinstance(url, str) or not url or url in self._by_url:
            return None
        found: list[dict[str, Any]] = []
        self._add(found, url, about if isinstance(about, dict) else None)
        return found[0] if found else None

    def _add(
        self,
        found: list[dict[str, Any]],
        url: str,
        about: dict[str, Any] | None,
        index: int | None = None,
    ) -> None:
        if len(self._by_url) >= self._limit:
            if url not in self._dropped_urls:
                self.dropped += 1
                if len(self._dropped_urls) < _DROPPED_MEMORY:
                    self._dropped_urls.add(url)
            return
        if index is None:
            index = self._top + 1
        self._top = max(self._top, index)
        self._by_url[url] = index
        self._taken.add(index)
        source: dict[str, Any] = {"index": index, "url": url}
        if about is not None:
            for key in ("title", "snippet", "date"):
                value = about.get(key)
                if isinstance(value, str) and value:
                    source[key] = value
        found.append(source)


def _strings(value: Any) -> list[str]:
    return [x for x in value if isinstance(x, str) and x] if isinstance(value, list) else []


def _pages(value: Any) -> list[dict[str, Any]]:
    """`[{url, title?}]` of a list of search results or fetched pages."""
    pages: list[dict[str, Any]] = []
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                url = item.get("url")
                if isinstance(url, str) and url:
                    title = item.get("title")
                    pages.append(
                        {"url": url, "title": title}
                        if isinstance(title, str) and title
                        else {"url": url}
                    )
    return pages


def progress_step(step: dict[str, Any]) -> dict[str, Any]:
    """A Perplexity reasoning step (`{thought, type, web_search?, fetch_url_content?,
    execute_python?}`, perplexity-py `ReasoningStepOutput`) as a protocol progress step:
    `search` (`queries`, `results`), `fetch` (`urls`), `code` (`code`, `result`), `thought`
    (`text`) or `other` (`type`). The step's thought, when it has one, is its `text`."""
    kind = step.get("type")
    thought = step.get("thought")
    out: dict[str, Any]
    search = step.get("web_search")
    fetch = step.get("fetch_url_content")
    code = step.get("execute_python")
    if isinstance(search, dict) or kind == "web_search":
        search = search if isinstance(search, dict) else {}
        out = {
            "kind": "search",
            "queries": _strings(search.get("search_keywords")),
            "results": _pages(search.get("search_results")),
        }
    elif isinstance(fetch, dict) or kind == "fetch_url_content":
        fetch = fetch if isinstance(fetch, dict) else {}
        out = {"kind": "fetch", "urls": [page["url"] for page in _pages(fetch.get("contents"))]}
    elif isinstance(code, dict) or kind == "execute_python":
        code = code if isinstance(code, dict) else {}
        out = {"kind": "code"}
        for key in ("code", "result"):
            value = code.get(key)
            if isinstance(value, str):
                out[key] = value
    elif kind is None or kind == "thought" or kind == "reasoning":
        out = {"kind": "thought"}
    else:
        out = {"kind": "other"}
        if isinstance(kind, str):
            out["type"] = kind
    if isinstance(thought, str) and thought:
        out["text"] = thought
    elif out["kind"] == "thought":
        out["text"] = ""
    return out


class Translator(ABC):
    """Base: the state every dialect shares. Subclasses implement `feed` and `end_of_stream`.

    `wants`, `sink` and `limits` are the typed parts a client asked for, where they go and their
    bounds (`gateway.core.parts`); a dialect that has no parts ignores them."""

    name: str = ""
    __slots__ = ("final_text", "finished", "meta", "saw_text")

    def __init__(
        self,
        wants: Collection[str] = frozenset(),
        sink: PartSink = NULL_SINK,
        limits: PartLimits = _DEFAULT_LIMITS,
    ) -> None:
        self.finished = False
        #: The upstream's own full answer, when it sends one (the `events` dialect's done), or
        #: answer text still held when a clean EOF ended the stream (`ThinkSplitter.finish`).
        self.final_text: str | None = None
        self.meta: dict[str, Any] = {}
        #: Any content arrived (text, reasoning, a tool call): the stream was not empty.
        self.saw_text = False

    @property
    def sources_dropped(self) -> int:
        """Sources dropped over `PartLimits.max_sources` (a metric)."""
        return 0

    @staticmethod
    def build_body(
        model: str, messages: tuple[dict[str, Any], ...], options: dict[str, Any]
    ) -> dict[str, Any]:
        """The POST body for one prompt (protocol.md, "Upstream request")."""
        body: dict[str, Any] = dict(options)
        body["model"] = model
        body["messages"] = list(messages)
        body["stream"] = True
        return body

    @abstractmethod
    def feed(self, event: SSEEvent) -> str | None:
        """The text delta `event` carries, if any; raises UpstreamFailure on an error."""

    @abstractmethod
    def end_of_stream(self) -> None:
        """Judge a clean EOF: set `finished`, or raise UpstreamFailure."""


def _protocol_error(message: str) -> UpstreamFailure:
    return UpstreamFailure(ErrorCode.UPSTREAM_PROTOCOL_ERROR, message)


def _byte_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _choice_zero(choices: Any) -> dict[str, Any] | None:
    """The choice with index 0 (or none given) among an event's choices."""
    if not isinstance(choices, list):
        return None
    for choice in choices:
        if not isinstance(choice, dict):
            raise _protocol_error("upstream choice is not a JSON object")
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


class OpenAITranslator(Translator):
    """OpenAI-compatible `chat.completion.chunk` events (OpenAI, Azure, DeepSeek, xAI, Mistral,
    Groq, vLLM, OpenRouter); the end is `[DONE]` or EOF after a finish_reason."""

    name = "openai"
    __slots__ = (
        "_call",
        "_call_indexes",
        "_calls",
        "_cited",
        "_closed",
        "_found",
        "_limits",
        "_reasoning",
        "_reasoning_bytes",
        "_saw_finish",
        "_sink",
        "_sources",
        "_steps",
        "_think",
        "_want_progress",
        "_want_tools",
        "finish_raw",
    )

    def __init__(
        self,
        wants: Collection[str] = frozenset(),
        sink: PartSink = NULL_SINK,
        limits: PartLimits = _DEFAULT_LIMITS,
    ) -> None:
        super().__init__()
        self._sink = sink
        self._limits = limits
        self._want_tools = "tools" in wants
        self._want_progress = "progress" in wants
        #: Until the answer is past a leading `<think>` block; None from then on (the fast path).
        self._think: ThinkSplitter | None = ThinkSplitter()
        #: Reasoning kept for `done.reasoning` (only when asked); its bytes are counted anyway.
        self._reasoning: list[str] | None = [] if "reasoning" in wants else None
        self._reasoning_bytes = 0
        self._call: _ToolCall | None = None
        self._calls: list[dict[str, Any]] = []
        self._call_indexes: set[int] = set()
        self._sources = SourceIndex(limits.max_sources) if "sources" in wants else None
        #: The lengths of Perplexity's `citations` and `search_results` last looked at.
        self._cited = 0
        self._found = 0
        #: Reasoning steps seen (for progress or sources), to tell new ones from repeats.
        self._steps: list[Any] | None = (
            [] if self._want_progress or self._sources is not None else None
        )
        self._saw_finish = False
        self._closed = False
        #: The upstream's own finish_reason, as sent (for logs; `meta` has the normalised one).
        self.finish_raw: str | None = None

    @property
    def sources_dropped(self) -> int:
        return self._sources.dropped if self._sources is not None else 0

    @staticmethod
    def build_body(
        model: str, messages: tuple[dict[str, Any], ...], options: dict[str, Any]
    ) -> dict[str, Any]:
        body = Translator.build_body(model, messages, options)
        # Without this OpenAI never reports usage on a stream (upstream-formats.md, 1b).
        body["stream_options"] = {"include_usage": True}
        return body

    def feed(self, event: SSEEvent) -> str | None:
        data = event.data
        if not data:
            return None
        if data == "[DONE]":
            self.finished = True
            return self._close()
        obj = _loads(data)
        if not isinstance(obj, dict):
            raise UpstreamFailure(
                ErrorCode.UPSTREAM_PROTOCOL_ERROR, "upstream event is not a JSON object"
            )
        if "error" in obj:
            err = obj["error"]
            raise UpstreamFailure(
                ErrorCode.UPSTREAM_ERROR, _error_message(err), retryable=_error_retryable(err)
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

    def _reason(self, text: str) -> None:
        """A reasoning delta: counted against the limit whether or not it was asked for."""
        self.saw_text = True
        total = self._reasoning_bytes + _byte_len(text)
        if total > self._limits.max_reasoning_bytes:
            raise _protocol_error(
                f"upstream reasoning exceeded {self._limits.max_reasoning_bytes} bytes"
            )
        self._reasoning_bytes = total
        if self._reasoning is not None:
            self._reasoning.append(text)
            self._sink.push_reasoning(text)

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
                raise _protocol_error("upstream continued a tool call after the next one began")
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
                call.size += _byte_len(args)
                if call.size > self._limits.max_tool_args_bytes:
                    raise _protocol_error(
                        f"upstream tool call arguments exceeded "
                        f"{self._limits.max_tool_args_bytes} bytes"
                    )
                call.args.append(args)

    def _complete_call(self, call: _ToolCall) -> None:
        """Push a complete call: its arguments parsed when they are a JSON object, `{}` when
        empty (a tool without parameters), else the string as sent (`arguments_raw`)."""
        self._call = None
        raw = "".join(call.args)
        done: dict[str, Any] = {
            "call_id": call.call_id or f"call_{len(self._calls)}",
            "name": call.name,
        }
        if not raw.strip():
            done["arguments"] = {}
        else:
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                done["arguments"] = parsed
            else:
                done["arguments_raw"] = raw
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
        if self._reasoning:
            self.meta["reasoning"] = "".join(self._reasoning)
        if self._want_tools and self._calls:
            self.meta["tool_calls"] = self._calls
        return held or None


class PerplexityTranslator(OpenAITranslator):
    """Perplexity: OpenAI-shaped, CRLF, usually no `[DONE]`: a clean EOF is the end (1a)."""

    name = "perplexity"
    __slots__ = ()

    # Perplexity reports usage and citations on every chunk by itself; `stream_options` is an
    # OpenAI field it does not document, so it is not sent.
    build_body = staticmethod(Translator.build_body)

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


class EventsTranslator(Translator):
    """The seed format: `text_chunk` events, then one `done` (streaming-sse.txt)."""

    name = "events"
    __slots__ = ()

    def feed(self, event: SSEEvent) -> str | None:
        data = event.data
        if not data:
            return None
        obj = _loads(data)
        if not isinstance(obj, dict):
            raise UpstreamFailure(
                ErrorCode.UPSTREAM_PROTOCOL_ERROR, "upstream event is not a JSON object"
            )
        # The type comes from the `event:` field, or from `type` in the data when the event is
        # an unnamed "message".
        kind = event.event if event.event != "message" else obj.get("type", "message")
        if kind == "text_chunk":
            text = obj.get("text")
            if not isinstance(text, str):
                raise UpstreamFailure(
                    ErrorCode.UPSTREAM_PROTOCOL_ERROR, "text_chunk event without a string 'text'"
                )
            if text:
                self.saw_text = True
                return text
            return None
        if kind == "done":
            full = obj.get("text", obj.get("answer"))
            if isinstance(full, str):
                self.final_text = full
            for key in META_KEYS:
                value = obj.get(key)
                if value is not None:
                    self.meta[key] = value
            finish = obj.get("finish_reason")
            if isinstance(finish, str):
                self.meta["finish_reason"] = finish
            self.finished = True
            return None
        if kind == "error":
            err = obj.get("error", obj)
            raise UpstreamFailure(
                ErrorCode.UPSTREAM_ERROR, _error_message(err), retryable=_error_retryable(err)
            )
        return None  # unknown event types are ignored, as SSE consumers must

    def end_of_stream(self) -> None:
        if not self.finished:
            raise UpstreamFailure(
                ErrorCode.STREAM_INTERRUPTED, "upstream ended the stream without a 'done' event"
            )


TRANSLATORS: Final[dict[str, type[Translator]]] = {
    "openai": OpenAITranslator,
    "perplexity": PerplexityTranslator,
    "events": EventsTranslator,
}


def translator_for(
    dialect: str,
    wants: Collection[str] = frozenset(),
    sink: PartSink = NULL_SINK,
    limits: PartLimits = _DEFAULT_LIMITS,
) -> Translator:
    """A fresh translator for one upstream response, putting the parts named in `wants` into
    `sink` (nothing by default: a client that asked for no parts)."""
    return TRANSLATORS[dialect](wants, sink, limits)


def parse_error_body(status: int, content_type: str, body: bytes) -> str:
    """A short, safe description of a non-2xx upstream answer (JSON, HTML or text).

    Never relays raw HTML or headers: only the `message` of a JSON error, or the status.
    """
    if "json" in content_type:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            if "error" in obj:
                return f"upstream answered HTTP {status}: {_error_message(obj['error'])}"
            detail = obj.get("detail")
            if isinstance(detail, list) and detail and isinstance(detail[0], dict):
                return f"upstream answered HTTP {status}: {_error_message(detail[0].get('msg'))}"
            if isinstance(detail, str):
                return f"upstream answered HTTP {status}: {sanitize(detail)}"
            if isinstance(obj.get("message"), str):
                return f"upstream answered HTTP {status}: {sanitize(obj['message'])}"
    return f"upstream answered HTTP {status}"


def status_retryable(status: int) -> bool:
    """429 and 5xx may succeed later; every other status will not (protocol.md, "Errors")."""
    return status == 429 or status == 408 or status >= 500
