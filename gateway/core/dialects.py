"""Upstream dialects: request bodies out, SSE events in, text deltas and one outcome back.

PURE module. A `Translator` is fed the SSE events of one upstream response. `feed()` returns the
text delta an event carries (or None), raises `UpstreamFailure` when the upstream reports an
error or sends something unparsable, and sets `finished` when a terminal marker was seen;
`end_of_stream()` judges a clean EOF. Metadata (citations, usage, ...) is kept with "last value
wins", because Perplexity repeats cumulative values on every chunk (upstream-formats.md, 1a).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, Final

import orjson

from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEEvent

#: Top-level metadata keys relayed in `done` when the upstream sent them (protocol.md, "done").
META_KEYS: Final = ("citations", "search_results", "images", "related_questions", "videos", "usage")
#: The same, to tell in one C call whether an event carries any (most OpenAI chunks carry none).
_META_SET: Final = frozenset(META_KEYS)


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


class Translator(ABC):
    """Base: the state every dialect shares. Subclasses implement `feed` and `end_of_stream`."""

    name: str = ""
    __slots__ = ("final_text", "finished", "meta", "saw_text")

    def __init__(self) -> None:
        self.finished = False
        #: The upstream's own full answer, when it sends one (the `events` dialect's done).
        self.final_text: str | None = None
        self.meta: dict[str, Any] = {}
        self.saw_text = False

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


class OpenAITranslator(Translator):
    """OpenAI `chat.completion.chunk` events; the end is `[DONE]` or EOF after a finish_reason."""

    name = "openai"
    __slots__ = ()

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
            return None
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
        meta = self.meta
        if not _META_SET.isdisjoint(obj):
            for key in META_KEYS:
                value = obj.get(key)
                if value is not None:
                    meta[key] = value
        choices = obj.get("choices")
        if not choices or not isinstance(choices, list):
            return None
        choice = choices[0]
        if not isinstance(choice, dict):
            raise UpstreamFailure(
                ErrorCode.UPSTREAM_PROTOCOL_ERROR, "upstream choice is not a JSON object"
            )
        finish = choice.get("finish_reason")
        if finish is not None:
            meta["finish_reason"] = finish
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            if isinstance(text, str) and text:
                self.saw_text = True
                return text
        return None

    def end_of_stream(self) -> None:
        if self.finished:
            return
        # A clean EOF after a finish_reason is a complete answer; without one it was cut off
        # (upstream-formats.md, 0.7: SDKs silently accept this, we do not).
        if "finish_reason" in self.meta:
            self.finished = True
            return
        raise UpstreamFailure(
            ErrorCode.STREAM_INTERRUPTED, "upstream ended the stream before the answer was complete"
        )


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
            self.finished = True
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


def translator_for(dialect: str) -> Translator:
    """A fresh translator for one upstream response."""
    return TRANSLATORS[dialect]()


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
