"""What every dialect shares (pure): the translator's interface, the failure it raises, the
request it builds, and the small helpers every wire format needs (error text made safe, finish
reasons normalised, tool-call arguments parsed).

A dialect module (`chat`, `events`, `anthropic`, ...) imports this one and `gateway.core.parts`;
`gateway.core.dialects` registers it in its table.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import orjson

from gateway.core.dialects.sources import SourceIndex
from gateway.core.parts import NULL_SINK, PartLimits, PartSink
from gateway.core.protocol import RETRYABLE, ErrorCode
from gateway.core.sse import SSEEvent
from gateway.core.usage import Usage, openai_usage

#: Top-level metadata keys relayed in `done` when the upstream sent them (protocol.md, "done").
META_KEYS: Final = ("citations", "search_results", "images", "related_questions", "videos", "usage")
DEFAULT_LIMITS: Final = PartLimits()


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

    @property
    def may_retry(self) -> bool:
        """Whether the same request may succeed later (or elsewhere): its own verdict, else its
        code's (protocol.md, "Errors")."""
        return RETRYABLE[self.code] if self.retryable is None else self.retryable


def loads_event(data: str) -> Any:
    """An event's JSON payload, or the protocol error for one that is not JSON."""
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


def error_message(error: Any) -> str:
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


def error_retryable(error: Any) -> bool:
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
        limits: PartLimits = DEFAULT_LIMITS,
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

    def usage(self) -> Usage | None:
        """The upstream's usage so far in the gateway's convention (`gateway.core.usage`); this
        base reads the OpenAI convention, a dialect with its own overrides it."""
        return openai_usage(self.meta.get("usage"))

    def output_chars(self) -> int:
        """Characters of output seen besides the answer text (reasoning, tool-call arguments):
        what an estimate counts, whether or not the client asked for it."""
        return 0

    @abstractmethod
    def feed(self, event: SSEEvent) -> str | None:
        """The text delta `event` carries, if any; raises UpstreamFailure on an error."""

    @abstractmethod
    def end_of_stream(self) -> None:
        """Judge a clean EOF: set `finished`, or raise UpstreamFailure."""


class PartsTranslator(Translator):
    """Base of the dialects that carry typed parts: what they all keep of one answer (the
    parts the client asked for, where they go and their bounds, the reasoning and the tool calls
    for `done`, the sources' numbering, the upstream's own finish), and the reasoning path."""

    __slots__ = (
        "_calls",
        "_limits",
        "_reasoning",
        "_reasoning_bytes",
        "_sink",
        "_sources",
        "_want_progress",
        "_want_tools",
        "finish_raw",
    )

    def __init__(
        self,
        wants: Collection[str] = frozenset(),
        sink: PartSink = NULL_SINK,
        limits: PartLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(wants, sink, limits)
        self._sink = sink
        self._limits = limits
        self._want_tools = "tools" in wants
        self._want_progress = "progress" in wants
        #: Reasoning kept for `done.reasoning` (only when asked); its bytes are counted anyway.
        self._reasoning: list[str] | None = [] if "reasoning" in wants else None
        self._reasoning_bytes = 0
        #: The complete tool calls pushed (for `done.tool_calls`).
        self._calls: list[dict[str, Any]] = []
        self._sources = SourceIndex(limits.max_sources) if "sources" in wants else None
        #: The upstream's own finish, as sent (for logs; `meta` has the normalised one).
        self.finish_raw: str | None = None

    @property
    def sources_dropped(self) -> int:
        return self._sources.dropped if self._sources is not None else 0

    def _record_parts(self) -> None:
        """At the answer's end: `done`'s `reasoning` and `tool_calls`, for a client that asked
        for them (left out when there is none)."""
        if self._reasoning:
            self.meta["reasoning"] = "".join(self._reasoning)
        if self._want_tools and self._calls:
            self.meta["tool_calls"] = self._calls

    def output_chars(self) -> int:
        chars = self._reasoning_bytes
        for call in self._calls:
            raw = call.get("arguments_raw")
            chars += len(raw) if isinstance(raw, str) else len(orjson.dumps(call.get("arguments")))
            chars += len(call.get("name") or "")
        return chars

    def _reason(self, text: str) -> None:
        """A reasoning delta: counted against the limit whether or not it was asked for."""
        self.saw_text = True
        total = self._reasoning_bytes + byte_len(text)
        if total > self._limits.max_reasoning_bytes:
            raise protocol_error(
                f"upstream reasoning exceeded {self._limits.max_reasoning_bytes} bytes"
            )
        self._reasoning_bytes = total
        if self._reasoning is not None:
            self._reasoning.append(text)
            self._sink.push_reasoning(text)


def protocol_error(message: str) -> UpstreamFailure:
    return UpstreamFailure(ErrorCode.UPSTREAM_PROTOCOL_ERROR, message)


def byte_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


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
                return f"upstream answered HTTP {status}: {error_message(obj['error'])}"
            detail = obj.get("detail")
            if isinstance(detail, list) and detail and isinstance(detail[0], dict):
                return f"upstream answered HTTP {status}: {error_message(detail[0].get('msg'))}"
            if isinstance(detail, str):
                return f"upstream answered HTTP {status}: {sanitize(detail)}"
            if isinstance(obj.get("message"), str):
                return f"upstream answered HTTP {status}: {sanitize(obj['message'])}"
    return f"upstream answered HTTP {status}"


def status_retryable(status: int) -> bool:
    """429 and 5xx may succeed later; every other status will not (protocol.md, "Errors")."""
    return status == 429 or status == 408 or status >= 500


def parsed_call(call_id: str, name: str, raw: str) -> dict[str, Any]:
    """A complete tool call as the protocol sends it (protocol.md, "tool_call"): its arguments
    parsed when they are a JSON object, `{}` when empty (a tool without parameters), else the
    string as sent (`arguments_raw`)."""
    done: dict[str, Any] = {"call_id": call_id, "name": name}
    if not raw.strip():
        done["arguments"] = {}
        return done
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        done["arguments"] = parsed
    else:
        done["arguments_raw"] = raw
    return done


# --------------------------------------------------------------------------------------------
# The request side: what a dialect sends for one `start`
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestDefaults:
    """Gateway-wide values a dialect may need to build a valid request."""

    #: `max_tokens` for APIs that require one (Anthropic), when the start gives none.
    max_tokens: int = 4096


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One upstream POST: where, with which headers (credentials included), and the JSON body."""

    url: str
    headers: Mapping[str, str]
    body: dict[str, Any]


class Dialect(ABC):
    """One upstream API: how a `start` becomes its request, and which translator reads its
    answer. Stateless; one instance per dialect in `gateway.core.dialects.DIALECTS`."""

    #: The name used by `--dialect` and the routes file.
    name: ClassVar[str]
    #: Reads one response's events.
    translator: ClassVar[type[Translator]]

    @abstractmethod
    def request(
        self,
        url: str,
        model: str,
        messages: tuple[dict[str, Any], ...],
        options: Mapping[str, Any],
        api_key: str | None,
        defaults: RequestDefaults,
    ) -> UpstreamRequest:
        """The request for one prompt. `messages` and `options` are the start's, as the protocol
        checked them (OpenAI chat shapes: protocol.md, "start"); `url` is the upstream's as
        configured."""

    def new_translator(
        self,
        wants: Collection[str] = frozenset(),
        sink: PartSink = NULL_SINK,
        limits: PartLimits = DEFAULT_LIMITS,
    ) -> Translator:
        """A fresh translator for one response."""
        return self.translator(wants, sink, limits)


def bearer(api_key: str | None) -> dict[str, str]:
    """`Authorization: Bearer <key>`, the header of the OpenAI-compatible APIs (none without a
    key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
