"""Upstream dialects: SSE events to text deltas and outcomes (pure), with recorded shapes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.core.dialects import (
    EventsTranslator,
    OpenAITranslator,
    PerplexityTranslator,
    Translator,
    UpstreamFailure,
    parse_error_body,
    status_retryable,
    translator_for,
)
from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEDecoder, SSEEvent


def ev(data: Any, event: str = "message") -> SSEEvent:
    return SSEEvent(event, data if isinstance(data, str) else orjson.dumps(data).decode(), None)


def run(translator: Translator, events: list[SSEEvent]) -> list[str]:
    out = []
    for e in events:
        text = translator.feed(e)
        if text is not None:
            out.append(text)
        if translator.finished:
            break
    return out


def pplx_chunk(content: str, so_far: str, tokens: int, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "8c1596dd",
        "model": "sonar",
        "created": 1741689451,
        "usage": {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens},
        "citations": ["https://a.example/1", "https://b.example/2"],
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "finish_reason": finish,
                "message": {"role": "assistant", "content": so_far},
                "delta": {"role": "assistant", "content": content},
            }
        ],
    }


def test_perplexity_recorded_shape_crlf_no_done() -> None:
    """A captured-shape Perplexity stream (CRLF, fat chunks, no [DONE]) relays deltas, ends at EOF
    and keeps the last cumulative usage and citations."""
    words = ["Why", " did", " the", " sky"]
    body = b""
    so_far = ""
    for i, w in enumerate(words):
        so_far += w
        body += b"data: " + orjson.dumps(pplx_chunk(w, so_far, 2 * i + 1)) + b"\r\n\r\n"
    final = pplx_chunk("", so_far, 9, "stop")
    final["search_results"] = [{"title": "A", "url": "https://a.example/1"}]
    body += b"data: " + orjson.dumps(final) + b"\r\n\r\n"
    decoder, tr = SSEDecoder(), PerplexityTranslator()
    texts: list[str] = []
    for i in range(0, len(body), 7):  # arbitrary network chunking
        texts += run(tr, decoder.feed(body[i : i + 7]))
    assert not tr.finished
    tr.end_of_stream()
    assert tr.finished
    assert "".join(texts) == "Why did the sky"
    assert tr.meta["usage"]["completion_tokens"] == 9
    assert tr.meta["citations"] == ["https://a.example/1", "https://b.example/2"]
    assert tr.meta["search_results"][0]["title"] == "A"
    assert tr.meta["finish_reason"] == "stop"


def test_perplexity_eof_without_finish_reason_is_done() -> None:
    """Perplexity's clean EOF is its end marker even when no finish_reason was sent."""
    tr = PerplexityTranslator()
    assert run(tr, [ev(pplx_chunk("Hi", "Hi", 1))]) == ["Hi"]
    tr.end_of_stream()
    assert tr.finished
    assert "finish_reason" not in tr.meta


def test_perplexity_done_marker_is_accepted() -> None:
    """sonar-deep-research's `[DONE]` ends the stream too."""
    tr = PerplexityTranslator()
    run(tr, [ev(pplx_chunk("a", "a", 1)), ev("[DONE]")])
    assert tr.finished


def test_perplexity_empty_stream_is_protocol_error() -> None:
    """A 200 that carried no event at all is not an answer."""
    with pytest.raises(UpstreamFailure) as info:
        PerplexityTranslator().end_of_stream()
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


def openai_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def test_openai_stream_with_usage_chunk_and_done() -> None:
    """OpenAI: role chunk, content deltas, finish chunk, usage chunk with no choices, [DONE]."""
    tr = OpenAITranslator()
    events = [
        ev(openai_chunk({"role": "assistant", "content": ""})),
        ev(openai_chunk({"content": "Hello"})),
        ev(openai_chunk({"content": " there"})),
        ev(openai_chunk({}, "stop")),
        ev({"id": "x", "choices": [], "usage": {"total_tokens": 12}}),
        ev("[DONE]"),
    ]
    assert run(tr, events) == ["Hello", " there"]
    assert tr.finished
    assert tr.meta == {"finish_reason": "stop", "usage": {"total_tokens": 12}}


def test_openai_eof_after_finish_reason_is_done_without_is_interrupted() -> None:
    """A clean EOF is complete only after a finish_reason (upstream-formats.md 0.7)."""
    tr = OpenAITranslator()
    run(tr, [ev(openai_chunk({"content": "a"}, "length"))])
    tr.end_of_stream()
    assert tr.meta["finish_reason"] == "length"
    cut = OpenAITranslator()
    run(cut, [ev(openai_chunk({"content": "a"}))])
    with pytest.raises(UpstreamFailure) as info:
        cut.end_of_stream()
    assert info.value.code is ErrorCode.STREAM_INTERRUPTED


def test_openai_error_event_is_upstream_error() -> None:
    """A `data: {"error": ...}` event mid-stream ends the stream with its message."""
    tr = OpenAITranslator()
    with pytest.raises(UpstreamFailure) as info:
        run(tr, [ev({"error": {"message": "The server had an error", "type": "server_error"}})])
    assert info.value.code is ErrorCode.UPSTREAM_ERROR
    assert info.value.message == "The server had an error"
    assert info.value.retryable is True


@pytest.mark.parametrize("data", ['{"choices": [', "[1]", '{"choices": [5]}'])
def test_unparsable_event_is_protocol_error(data: str) -> None:
    """Events that are not the documented JSON end the stream with upstream_protocol_error."""
    with pytest.raises(UpstreamFailure) as info:
        run(OpenAITranslator(), [ev(data)])
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


def test_openai_body_asks_for_usage_perplexity_body_does_not() -> None:
    """The request body carries model, messages, stream and options; only OpenAI gets
    stream_options."""
    msgs = ({"role": "user", "content": "hi"},)
    body = OpenAITranslator.build_body("m", msgs, {"temperature": 0.1})
    assert body == {
        "temperature": 0.1,
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert "stream_options" not in PerplexityTranslator.build_body("m", msgs, {})
    assert translator_for("events").build_body("m", msgs, {"stream": False})["stream"] is True


def test_events_dialect_named_and_typed_events() -> None:
    """The seed format: type from `event:` or from `type` in the data; done ends the stream."""
    tr = EventsTranslator()
    events = [
        ev({"type": "text_chunk", "text": "Hel"}, "text_chunk"),
        ev({"type": "text_chunk", "text": "lo"}),  # unnamed: type from the data
        ev({"type": "progress"}, "progress"),  # unknown: ignored
        ev({"type": "done", "answer": "Hello", "citations": ["u"], "usage": {"n": 1}}, "done"),
    ]
    assert run(tr, events) == ["Hel", "lo"]
    assert tr.finished
    assert tr.final_text == "Hello"
    assert tr.meta == {"citations": ["u"], "usage": {"n": 1}}


def test_events_dialect_without_done_is_interrupted() -> None:
    """An events stream that ends without `done` is stream_interrupted."""
    tr = EventsTranslator()
    run(tr, [ev({"type": "text_chunk", "text": "a"}, "text_chunk")])
    with pytest.raises(UpstreamFailure) as info:
        tr.end_of_stream()
    assert info.value.code is ErrorCode.STREAM_INTERRUPTED


def test_events_text_chunk_without_text_is_protocol_error() -> None:
    """A text_chunk whose text is not a string is refused."""
    with pytest.raises(UpstreamFailure) as info:
        run(EventsTranslator(), [ev({"type": "text_chunk"}, "text_chunk")])
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("status", "ctype", "body", "expected"),
    [
        (
            400,
            "application/json",
            b'{"error":{"message":"Invalid model","type":"invalid_model","code":400}}',
            "upstream answered HTTP 400: Invalid model",
        ),
        (
            401,
            "text/html",
            b"<html><title>401 Authorization Required</title>openresty/1.27.4</html>",
            "upstream answered HTTP 401",
        ),
        (
            422,
            "application/json",
            b'{"detail":[{"loc":["body"],"msg":"field required","type":"missing"}]}',
            "upstream answered HTTP 422: field required",
        ),
        (503, "application/json", b"{broken", "upstream answered HTTP 503"),
    ],
)
def test_error_bodies_are_read_defensively(
    status: int, ctype: str, body: bytes, expected: str
) -> None:
    """JSON, FastAPI and HTML error bodies become a short message; HTML is never relayed."""
    assert parse_error_body(status, ctype, body) == expected


def test_retryable_statuses() -> None:
    """429 and 5xx are retryable; 4xx client errors are not."""
    assert [
        s for s in (400, 401, 403, 404, 408, 422, 429, 500, 502, 503) if status_retryable(s)
    ] == [
        408,
        429,
        500,
        502,
        503,
    ]
