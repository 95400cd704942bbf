"""The seed's events dialect (pure): `text_chunk` events, then one `done`
(seed/streaming-sse.txt)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from gateway.core.dialects.base import (
    META_KEYS,
    Dialect,
    RequestDefaults,
    Translator,
    UpstreamFailure,
    UpstreamRequest,
    bearer,
    error_message,
    error_retryable,
    loads_event,
)
from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEEvent


class EventsTranslator(Translator):
    """The seed format: `text_chunk` events, then one `done` (streaming-sse.txt)."""

    name = "events"
    __slots__ = ()

    def feed(self, event: SSEEvent) -> str | None:
        data = event.data
        if not data:
            return None
        obj = loads_event(data)
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
                ErrorCode.UPSTREAM_ERROR, error_message(err), retryable=error_retryable(err)
            )
        return None  # unknown event types are ignored, as SSE consumers must

    def end_of_stream(self) -> None:
        if not self.finished:
            raise UpstreamFailure(
                ErrorCode.STREAM_INTERRUPTED, "upstream ended the stream without a 'done' event"
            )


class EventsDialect(Dialect):
    """The seed's format: the chat-completions body, answered with `text_chunk`/`done` events."""

    name: ClassVar[str] = "events"
    translator: ClassVar[type[Translator]] = EventsTranslator

    def request(
        self,
        url: str,
        model: str,
        messages: tuple[dict[str, Any], ...],
        options: Mapping[str, Any],
        api_key: str | None,
        defaults: RequestDefaults,
    ) -> UpstreamRequest:
        body: dict[str, Any] = dict(options)
        body["model"] = model
        body["messages"] = list(messages)
        body["stream"] = True
        return UpstreamRequest(url, bearer(api_key), body)
