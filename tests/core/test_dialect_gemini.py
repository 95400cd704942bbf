"""The `gemini` dialect (pure): Gemini `GenerateContentResponse` events to text, parts and one
outcome, and the `streamGenerateContent` request built from a `start`."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.dialects import (
    DIALECTS,
    RequestDefaults,
    UpstreamFailure,
    parse_error_body,
    translator_for,
)
from gateway.core.dialects.gemini import SKIP_SIGNATURE, THINKING_BUDGETS, GeminiTranslator
from gateway.core.parts import KNOWN_PARTS, PartLimits
from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEDecoder, SSEEvent

ALL = KNOWN_PARTS
BASE = "https://generativelanguage.googleapis.com/v1beta"


class Recorder:
    """A PartSink that keeps what it is given, in order, with the answer text interleaved."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []

    def push_reasoning(self, text: str) -> None:
        self.log.append(("reasoning", text))

    def push_sources(self, sources: list[dict[str, Any]]) -> None:
        self.log.append(("sources", sources))

    def push_tool_call(self, call: dict[str, Any]) -> None:
        self.log.append(("tool_call", call))

    def push_progress(self, step: dict[str, Any]) -> None:
        self.log.append(("progress", step))

    def of(self, kind: str) -> list[Any]:
        return [value for k, value in self.log if k == kind]

    def kinds(self) -> list[str]:
        return [k for k, _ in self.log]


def gemini(
    wants: frozenset[str] = ALL, limits: PartLimits | None = None
) -> tuple[GeminiTranslator, Recorder]:
    sink = Recorder()
    tr = translator_for("gemini", wants, sink, limits or PartLimits())
    assert isinstance(tr, GeminiTranslator)
    return tr, sink


def ev(obj: Any) -> SSEEvent:
    return SSEEvent("message", obj if isinstance(obj, str) else orjson.dumps(obj).decode(), None)


USAGE = {"promptTokenCount": 9, "candidatesTokenCount": 3, "totalTokenCount": 12}


def response(
    *parts: dict[str, Any],
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    **candidate: Any,
) -> dict[str, Any]:
    """One `GenerateContentResponse` with candidate 0 holding `parts`."""
    cand: dict[str, Any] = {"content": {"parts": list(parts), "role": "model"}, **candidate}
    if finish is not None:
        cand["finishReason"] = finish
    cand.setdefault("index", 0)
    obj: dict[str, Any] = {"candidates": [cand], "modelVersion": "gemini-2.5-flash"}
    if usage is not None:
        obj["usageMetadata"] = usage
    return obj


def relay(tr: GeminiTranslator, sink: Recorder, events: list[Any], eof: bool = True) -> str:
    """Feed the events (text logged between parts), then a clean EOF; the answer text."""
    text = []
    for obj in events:
        delta = tr.feed(ev(obj))
        if delta is not None:
            text.append(delta)
            sink.log.append(("text", delta))
    if eof:
        tr.end_of_stream()
    return "".join(text)


def call_part(**call: Any) -> dict[str, Any]:
    return {"functionCall": call}


# --------------------------------------------------------------------------------------------
# Text, usage and the end
# --------------------------------------------------------------------------------------------


@given(
    pieces=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 4000), max_size=30),
)
def test_text_stream_split_anywhere_relays_the_text_and_the_last_usage(
    pieces: list[str], cuts: list[int]
) -> None:
    """A CRLF stream of text responses, cut at any bytes, relays the pieces in order, keeps the
    last usageMetadata as sent and ends at EOF after the finishReason with `stop`."""
    events = [
        response({"text": p}, usage={**USAGE, "candidatesTokenCount": i})
        for i, p in enumerate(pieces)
    ]
    events.append(response({"text": ""}, finish="STOP", usage=USAGE))
    body = b"".join(b"data: " + orjson.dumps(e) + b"\r\n\r\n" for e in events)
    bounds = sorted(c % (len(body) + 1) for c in cuts)
    chunks = [body[a:b] for a, b in zip([0, *bounds], [*bounds, len(body)], strict=True)]
    decoder, (tr, _) = SSEDecoder(), gemini()
    text = []
    for chunk in chunks:
        for event in decoder.feed(chunk):
            delta = tr.feed(event)
            if delta is not None:
                text.append(delta)
    assert not tr.finished  # no end marker: only EOF ends a Gemini stream
    tr.end_of_stream()
    assert tr.finished
    assert "".join(text) == "".join(pieces)
    assert tr.meta == {"usage": USAGE, "finish_reason": "stop"}
    assert tr.finish_raw == "STOP"
    assert tr.saw_text


def test_text_and_finish_in_one_event_and_vertex_without_index() -> None:
    """The last text may come with the finishReason, and a Vertex candidate without `index` is
    candidate 0."""
    tr, _ = gemini()
    first = response({"text": "Hello"})
    del first["candidates"][0]["index"]
    text = relay(tr, Recorder(), [first, response({"text": " world"}, finish="STOP")])
    assert text == "Hello world"
    assert tr.meta["finish_reason"] == "stop"


SHAPES = st.sampled_from(["plain", "rated", "two_parts", "no_index", "signed", "late_usage"])


@given(pieces=st.lists(st.tuples(st.text(min_size=1, max_size=8), SHAPES), min_size=1))
def test_every_text_shape_relays_the_same_text(pieces: list[tuple[str, str]]) -> None:
    """Text in any candidate shape (one part or several, extra candidate fields, no index, a
    signed part, usage missing) gives the same answer, whether the fast path takes it or not."""
    events = []
    for text, shape in pieces:
        part: dict[str, Any] = {"text": text}
        if shape == "signed":
            part["thoughtSignature"] = "sig"
        parts = [part, {"text": ""}] if shape == "two_parts" else [part]
        event = response(*parts, usage=None if shape == "late_usage" else USAGE)
        if shape == "rated":
            event["candidates"][0]["safetyRatings"] = [{"category": "X", "probability": "LOW"}]
        if shape == "no_index":
            del event["candidates"][0]["index"]
        events.append(event)
    tr, sink = gemini()
    assert relay(tr, sink, [*events, response(finish="STOP")]) == "".join(t for t, _ in pieces)
    assert tr.meta.get("usage") == (USAGE if any(s != "late_usage" for _, s in pieces) else None)


@pytest.mark.parametrize(
    "event",
    [{"candidates": ["text"]}, {"candidates": [None]}, {"candidates": [{"index": 1}, 3]}],
)
def test_a_candidate_that_is_not_an_object_is_a_protocol_error(event: dict[str, Any]) -> None:
    """Candidates must be objects."""
    tr, _ = gemini()
    with pytest.raises(UpstreamFailure) as info:
        tr.feed(ev(event))
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


def test_odd_shapes_carry_nothing() -> None:
    """Candidates or content of other types, or parts that are not objects, carry no text."""
    tr, sink = gemini()
    events = [
        {"candidates": {"0": {}}},
        {"candidates": "x"},
        response(),
        {"candidates": [{"content": "text"}]},
        {"candidates": [{"content": {"parts": "text"}}]},
        {"candidates": [{"content": {"parts": ["text", 1, None]}}]},
        {"candidates": [{"content": {"parts": [{"text": 5}]}}]},
    ]
    assert relay(tr, sink, events, eof=False) == ""
    assert sink.log == []
    assert not tr.saw_text


def test_eof_before_a_finish_reason_is_stream_interrupted() -> None:
    """A clean EOF after text but before any finishReason is `stream_interrupted`, as is an
    empty body."""
    tr, sink = gemini()
    relay(tr, sink, [response({"text": "Half an"}, usage=USAGE)], eof=False)
    with pytest.raises(UpstreamFailure) as info:
        tr.end_of_stream()
    assert info.value.code is ErrorCode.STREAM_INTERRUPTED
    assert not tr.finished
    empty, _ = gemini()
    with pytest.raises(UpstreamFailure) as info:
        empty.end_of_stream()
    assert info.value.code is ErrorCode.STREAM_INTERRUPTED


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("IMAGE_SAFETY", "content_filter"),
        ("OTHER", None),
        ("MALFORMED_FUNCTION_CALL", None),
        ("FINISH_REASON_UNSPECIFIED", None),
    ],
)
def test_finish_reasons_are_normalised(raw: str, normal: str | None) -> None:
    """Gemini's finishReason becomes the protocol's four values; one it does not map is left out
    of `done` but still ends the answer, and the raw value is kept."""
    tr, _ = gemini()
    relay(tr, Recorder(), [response({"text": "x"}), response(finish=raw)])
    assert tr.finished
    assert tr.meta.get("finish_reason") == normal
    assert tr.finish_raw == raw


def test_a_blocked_prompt_is_a_complete_empty_answer_filtered() -> None:
    """`promptFeedback.blockReason` without candidates ends the answer with `content_filter`
    (an answer, not an error: EOF after it is accepted)."""
    tr, sink = gemini()
    blocked = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": USAGE}
    assert relay(tr, sink, [blocked]) == ""
    assert tr.finished
    assert tr.meta == {"usage": USAGE, "finish_reason": "content_filter"}
    assert tr.finish_raw == "SAFETY"
    feedback_only, _ = gemini()
    feedback_only.feed(ev({"promptFeedback": {"safetyRatings": []}, **response({"text": "a"})}))
    with pytest.raises(UpstreamFailure):
        feedback_only.end_of_stream()  # feedback without a block reason ends nothing


def test_only_candidate_zero_is_relayed() -> None:
    """Other candidates are ignored, wherever candidate 0 is in the list."""
    tr, _ = gemini()
    other = {"content": {"parts": [{"text": "NO"}]}, "index": 1}
    zero = {"content": {"parts": [{"text": "yes"}]}, "index": 0}
    events = [
        {"candidates": [other]},
        {"candidates": [other, zero]},
        {"candidates": [{**other, "finishReason": "MAX_TOKENS"}, {**zero, "finishReason": "STOP"}]},
    ]
    assert relay(tr, Recorder(), events) == "yesyes"
    assert tr.meta["finish_reason"] == "stop"


def test_unknown_fields_and_parts_are_ignored() -> None:
    """New top-level fields, candidate fields and part kinds (inline data, signatures alone,
    anything else) are skipped without failing the stream."""
    tr, sink = gemini()
    events = [
        {"somethingNew": {"x": 1}, **response({"text": "A"})},
        response({"inlineData": {"mimeType": "image/png", "data": "iVBORw0"}}),
        response({"text": "", "thoughtSignature": "EqsFCqgF"}, safetyRatings=[]),
        response({"videoMetadata": {}}, {"text": "B"}, citationMetadata={"citations": []}),
        {"usageMetadata": USAGE},
        {"candidates": []},
        response(finish="STOP"),
    ]
    assert relay(tr, sink, events) == "AB"
    assert sink.log == [("text", "A"), ("text", "B")]
    assert tr.meta["usage"] == USAGE


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        ({"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}, True),
        ({"code": 429, "message": "Quota exceeded.", "status": "RESOURCE_EXHAUSTED"}, True),
        ({"code": 500, "message": "Internal error.", "status": "INTERNAL"}, True),
        ({"message": "Deadline", "status": "DEADLINE_EXCEEDED"}, True),
        ({"code": 400, "message": "Bad request.", "status": "INVALID_ARGUMENT"}, False),
        ({"code": 403, "message": "Denied.", "status": "PERMISSION_DENIED"}, False),
    ],
)
def test_error_event_fails_the_stream(error: dict[str, Any], retryable: bool) -> None:
    """An `{"error": ...}` event is `upstream_error` with Google's message; overloaded, rate
    limited and server errors are retryable, the others not."""
    tr, _ = gemini()
    assert tr.feed(ev(response({"text": "Hi"}))) == "Hi"
    with pytest.raises(UpstreamFailure) as info:
        tr.feed(ev({"error": error}))
    assert info.value.code is ErrorCode.UPSTREAM_ERROR
    assert info.value.message == error["message"]
    assert info.value.retryable is retryable


def test_error_message_is_sanitised() -> None:
    """A URL or key in Google's message never reaches the client."""
    tr, _ = gemini()
    error = {
        "code": 400,
        "message": "See https://console.cloud.google.com/x?key=AIzaSy123",
        "status": "X",
    }
    with pytest.raises(UpstreamFailure) as info:
        tr.feed(ev({"error": error}))
    assert "https://" not in info.value.message
    assert info.value.message.startswith("See [url]")


def test_http_error_bodies_in_googles_shape_are_read() -> None:
    """A non-2xx body `{"error": {code, message, status}}` gives its message."""
    body = orjson.dumps(
        {"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT"}}
    )
    assert parse_error_body(400, "application/json; charset=UTF-8", body) == (
        "upstream answered HTTP 400: API key not valid."
    )


@pytest.mark.parametrize("data", ['{"candidates": [', "[1, 2]", '"text"', "null"])
def test_unparsable_or_non_object_events_are_protocol_errors(data: str) -> None:
    """An event that is not a JSON object is `upstream_protocol_error`."""
    tr, _ = gemini()
    with pytest.raises(UpstreamFailure) as info:
        tr.feed(ev(data))
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


def test_empty_data_is_ignored() -> None:
    """An event without data (a lone `data:` line) carries nothing."""
    tr, _ = gemini()
    assert tr.feed(SSEEvent("message", "", None)) is None
    assert not tr.saw_text


# --------------------------------------------------------------------------------------------
# Reasoning
# --------------------------------------------------------------------------------------------


def test_thought_parts_are_reasoning_only_when_asked() -> None:
    """`thought: true` text goes to the sink and `done.reasoning`, before the answer text, and
    never into the answer; without `reasoning` asked it is dropped."""
    events = [
        response({"text": "Let me think.", "thought": True}),
        response({"text": " Done thinking.", "thought": True}, {"text": "Answer"}),
        response({"text": "!"}, finish="STOP"),
    ]
    tr, sink = gemini()
    assert relay(tr, sink, events) == "Answer!"
    assert sink.kinds() == ["reasoning", "reasoning", "text", "text"]
    assert tr.meta["reasoning"] == "Let me think. Done thinking."
    quiet, quiet_sink = gemini(frozenset())
    assert relay(quiet, quiet_sink, events) == "Answer!"
    assert quiet_sink.kinds() == ["text", "text"]
    assert "reasoning" not in quiet.meta


def test_reasoning_over_the_limit_fails_even_when_not_asked() -> None:
    """Reasoning bytes are counted against the limit whether or not the client wants them."""
    limits = PartLimits(max_reasoning_bytes=10)
    for wants in (ALL, frozenset()):
        tr, _ = gemini(wants, limits)
        tr.feed(ev(response({"text": "é" * 5, "thought": True})))  # 10 bytes: at the limit
        with pytest.raises(UpstreamFailure) as info:
            tr.feed(ev(response({"text": "x", "thought": True})))
        assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


# --------------------------------------------------------------------------------------------
# Tool calls
# --------------------------------------------------------------------------------------------


def test_whole_function_calls_are_tool_calls_and_stop_means_tool_calls() -> None:
    """Each functionCall is one complete call at once: its own id when it has one, else
    `call_<n>`; no args is `{}`; a STOP after calls is `tool_calls`."""
    tr, sink = gemini()
    events = [
        response(
            call_part(name="weather", args={"location": "Paris"}),
            {"thoughtSignature": "sig"},
        ),
        response(call_part(name="time", id="fc-7"), call_part(name="news", args={})),
        response({"text": ""}, finish="STOP", usage=USAGE),
    ]
    assert relay(tr, sink, events) == ""
    calls = [
        {"call_id": "call_0", "name": "weather", "arguments": {"location": "Paris"}},
        {"call_id": "fc-7", "name": "time", "arguments": {}},
        {"call_id": "call_2", "name": "news", "arguments": {}},
    ]
    assert sink.of("tool_call") == calls
    assert tr.meta["tool_calls"] == calls
    assert tr.meta["finish_reason"] == "tool_calls"
    assert tr.saw_text


def test_tool_calls_not_asked_for_still_make_the_finish_tool_calls() -> None:
    """A client that did not ask for tools gets no call parts, but the answer still ends with
    `tool_calls`."""
    tr, sink = gemini(frozenset())
    relay(tr, sink, [response(call_part(name="weather", args={"a": 1})), response(finish="STOP")])
    assert sink.log == []
    assert "tool_calls" not in tr.meta
    assert tr.meta["finish_reason"] == "tool_calls"
    streamed, streamed_sink = gemini(frozenset(), PartLimits(max_tool_args_bytes=4))
    piece = {"jsonPath": "$.text", "stringValue": "more than four bytes"}
    events = [
        response(call_part(name="f", willContinue=True)),
        response(call_part(partialArgs=[piece], willContinue=True)),
        response(call_part()),
        response(finish="STOP"),
    ]
    relay(streamed, streamed_sink, events)  # arguments nobody wants are neither kept nor bounded
    assert streamed_sink.log == []
    assert streamed.meta["finish_reason"] == "tool_calls"


def test_function_call_args_that_are_not_an_object_are_raw() -> None:
    """`args` of another JSON type (a malformed upstream) is relayed as `arguments_raw`; a
    string holding a JSON object is parsed."""
    tr, sink = gemini()
    relay(
        tr,
        sink,
        [
            response(call_part(name="a", args='{"x": unquoted}')),
            response(call_part(name="b", args=[1, 2])),
            response(call_part(name="c", args='{"x": 1}')),
            response(finish="STOP"),
        ],
    )
    assert sink.of("tool_call") == [
        {"call_id": "call_0", "name": "a", "arguments_raw": '{"x": unquoted}'},
        {"call_id": "call_1", "name": "b", "arguments_raw": "[1,2]"},
        {"call_id": "call_2", "name": "c", "arguments": {"x": 1}},
    ]


def test_function_call_args_over_the_limit_fail() -> None:
    """Arguments larger than `max_tool_args_bytes` fail the stream (whole or streamed)."""
    limits = PartLimits(max_tool_args_bytes=20)
    tr, _ = gemini(ALL, limits)
    with pytest.raises(UpstreamFailure) as info:
        tr.feed(ev(response(call_part(name="f", args={"text": "x" * 20}))))
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR
    streamed, _ = gemini(ALL, limits)
    streamed.feed(ev(response(call_part(name="f", willContinue=True))))
    piece = {"jsonPath": "$.text", "stringValue": "x" * 8, "willContinue": True}
    streamed.feed(ev(response(call_part(partialArgs=[piece], willContinue=True))))
    with pytest.raises(UpstreamFailure):
        streamed.feed(ev(response(call_part(partialArgs=[piece], willContinue=True))))


def test_vertex_streamed_arguments_are_reassembled() -> None:
    """Vertex's `partialArgs` pieces build the arguments (strings continued while a piece says
    willContinue, numbers, booleans, null, nested paths and arrays); an empty functionCall ends
    the call, and the next named call or the finish ends an open one."""
    tr, sink = gemini()
    events = [
        response({"text": "Plan.", "thought": True}),
        response(call_part(name="search", willContinue=True)),
        response(
            call_part(
                partialArgs=[
                    {"jsonPath": "$.query", "stringValue": "sky ", "willContinue": True},
                    {"jsonPath": "$.limit", "numberValue": 3},
                ],
                willContinue=True,
            )
        ),
        response(
            call_part(
                partialArgs=[
                    {"jsonPath": "$.query", "stringValue": "colour"},
                    {"jsonPath": "$.filters.safe", "boolValue": True},
                    {"jsonPath": "$.filters['lang code']", "stringValue": "en"},
                    {"jsonPath": "$.tags[1]", "stringValue": "b"},
                    {"jsonPath": "$.tags[0]", "stringValue": "a"},
                    {"jsonPath": "$.cursor", "nullValue": None},
                ],
                willContinue=True,
            )
        ),
        response(call_part()),
        response(call_part(name="read", willContinue=True)),
        response(
            call_part(partialArgs=[{"jsonPath": "$.id", "stringValue": "A"}], willContinue=True)
        ),
        response(call_part(name="read", args={"id": "B"}, willContinue=True)),
        response({"text": ""}, finish="STOP"),
    ]
    relay(tr, sink, events)
    assert sink.of("tool_call") == [
        {
            "call_id": "call_0",
            "name": "search",
            "arguments": {
                "query": "sky colour",
                "limit": 3,
                "filters": {"safe": True, "lang code": "en"},
                "tags": ["a", "b"],
                "cursor": None,
            },
        },
        {"call_id": "call_1", "name": "read", "arguments": {"id": "A"}},
        {"call_id": "call_2", "name": "read", "arguments": {"id": "B"}},
    ]
    assert sink.kinds() == ["reasoning", "tool_call", "tool_call", "tool_call"]
    assert tr.meta["finish_reason"] == "tool_calls"


def test_text_after_an_open_streamed_call_ends_it_first() -> None:
    """A text part while a streamed call is open completes the call before the text."""
    tr, sink = gemini()
    events = [response(call_part(name="f", willContinue=True)), response({"text": "ok"})]
    assert relay(tr, sink, events, eof=False) == "ok"
    assert sink.kinds() == ["tool_call", "text"]


@pytest.mark.parametrize(
    "fragment",
    [
        {"partialArgs": [{"jsonPath": "$.x", "stringValue": "y"}]},  # no call open
        {"name": "f", "partialArgs": [{"jsonPath": "x", "stringValue": "y"}]},  # not a path
        {"name": "f", "partialArgs": [{"jsonPath": "$", "stringValue": "y"}]},  # the root
        {"name": "f", "partialArgs": [{"jsonPath": "$.a[", "stringValue": "y"}]},
        {"name": "f", "partialArgs": [{"jsonPath": "$.a[99999]", "stringValue": "y"}]},
        {"name": "f", "partialArgs": [{"stringValue": "y"}]},
        {"name": "f", "partialArgs": [{"jsonPath": "$.a", "stringValue": 5}]},
        {"name": "f", "partialArgs": "nope"},
        {"name": "f", "partialArgs": ["nope"]},
        {
            "name": "f",
            "partialArgs": [
                {"jsonPath": "$.a", "stringValue": "y"},
                {"jsonPath": "$.a.b", "stringValue": "z"},
            ],
        },
        {
            "name": "f",
            "partialArgs": [
                {"jsonPath": "$.a", "stringValue": "y"},
                {"jsonPath": "$.a[0]", "stringValue": "z"},
            ],
        },
    ],
)
def test_broken_streamed_arguments_are_protocol_errors(fragment: dict[str, Any]) -> None:
    """Arguments without a call, or with paths that are not paths (or do not fit each other),
    fail the stream as `upstream_protocol_error`."""
    tr, _ = gemini()
    with pytest.raises(UpstreamFailure) as info:
        tr.feed(ev(response({"functionCall": fragment})))
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


def test_an_empty_function_call_with_nothing_open_is_ignored() -> None:
    """A stray `functionCall: {}` ends nothing and makes no call."""
    tr, sink = gemini()
    relay(tr, sink, [response(call_part()), response(finish="STOP")])
    assert sink.log == []
    assert tr.meta["finish_reason"] == "stop"


def test_a_function_call_that_is_not_an_object_is_a_protocol_error() -> None:
    """`functionCall` must be an object."""
    tr, _ = gemini()
    with pytest.raises(UpstreamFailure) as info:
        tr.feed(ev(response({"functionCall": "weather"})))
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


# --------------------------------------------------------------------------------------------
# Grounding (sources, search progress) and code execution
# --------------------------------------------------------------------------------------------


def grounding(
    urls: list[str], cited: list[int] | None = None, queries: list[str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "groundingChunks": [{"web": {"uri": u, "title": f"t{i}"}} for i, u in enumerate(urls)],
        "webSearchQueries": queries or ["sky colour"],
    }
    if cited is not None:
        meta["groundingSupports"] = [
            {"segment": {"startIndex": 0, "endIndex": 3}, "groundingChunkIndices": [i]}
            for i in cited
        ]
    return meta


def test_grounding_gives_the_cited_chunks_as_sources_and_the_search_as_progress() -> None:
    """The search queries are one progress step (with every chunk as a result); only the chunks
    the supports cite are sources, numbered in chunk order, before the event's text."""
    tr, sink = gemini()
    urls = ["https://a.example/1", "https://b.example/2", "https://c.example/3"]
    event = response({"text": "The sky"}, groundingMetadata=grounding(urls, cited=[2, 0]))
    relay(tr, sink, [event, response(finish="STOP")])
    assert sink.kinds() == ["progress", "sources", "text"]
    assert sink.of("progress") == [
        {
            "kind": "search",
            "queries": ["sky colour"],
            "results": [{"url": u, "title": f"t{i}"} for i, u in enumerate(urls)],
        }
    ]
    assert sink.of("sources") == [
        [
            {"index": 1, "url": "https://a.example/1", "title": "t0"},
            {"index": 2, "url": "https://c.example/3", "title": "t2"},
        ]
    ]


def test_grounding_without_supports_gives_every_chunk_and_repeats_add_only_new_ones() -> None:
    """Without supports every web chunk is a source; metadata repeated on later events adds
    only the sources and queries not sent before."""
    tr, sink = gemini()
    events = [
        response({"text": "a"}, groundingMetadata=grounding(["https://a.example"])),
        response(
            {"text": "b"},
            groundingMetadata=grounding(
                ["https://a.example", "https://b.example"], queries=["sky colour", "why blue"]
            ),
        ),
        response(
            finish="STOP", groundingMetadata=grounding(["https://a.example", "https://b.example"])
        ),
    ]
    relay(tr, sink, events)
    assert [[s["url"] for s in batch] for batch in sink.of("sources")] == [
        ["https://a.example"],
        ["https://b.example"],
    ]
    assert [s["index"] for batch in sink.of("sources") for s in batch] == [1, 2]
    assert [step["queries"] for step in sink.of("progress")] == [["sky colour"], ["why blue"]]


def test_grounding_parts_only_when_asked_and_within_max_sources() -> None:
    """No sources or progress for a client that asked for none; past max_sources the rest are
    dropped and counted."""
    urls = [f"https://s.example/{i}" for i in range(5)]
    event = response({"text": "x"}, groundingMetadata=grounding(urls))
    quiet, quiet_sink = gemini(frozenset())
    relay(quiet, quiet_sink, [event, response(finish="STOP")])
    assert quiet_sink.kinds() == ["text"]
    assert quiet.sources_dropped == 0
    capped, sink = gemini(frozenset({"sources"}), PartLimits(max_sources=2))
    relay(capped, sink, [event, response(finish="STOP")])
    assert [s["url"] for s in sink.of("sources")[0]] == urls[:2]
    assert capped.sources_dropped == 3
    assert sink.of("progress") == []


def test_code_execution_parts_are_code_progress_steps() -> None:
    """executableCode and its codeExecutionResult make one `code` step; code whose result never
    comes is a step of its own at the finish."""
    tr, sink = gemini()
    events = [
        response({"executableCode": {"language": "PYTHON", "code": "print(2+2)"}}),
        response({"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": "4\n"}}),
        response({"text": "It is 4."}),
        response({"executableCode": {"language": "PYTHON", "code": "loop()"}}, finish="STOP"),
    ]
    assert relay(tr, sink, events) == "It is 4."
    assert sink.log == [
        ("progress", {"kind": "code", "code": "print(2+2)", "result": "4\n"}),
        ("text", "It is 4."),
        ("progress", {"kind": "code", "code": "loop()"}),
    ]
    quiet, quiet_sink = gemini(frozenset())
    relay(quiet, quiet_sink, events)
    assert quiet_sink.kinds() == ["text"]


def test_parts_of_one_event_keep_their_order_before_its_text() -> None:
    """In one event, reasoning, a tool call and sources are pushed in that order, and the text
    the event carries is returned after them."""
    tr, sink = gemini()
    event = response(
        {"text": "hmm", "thought": True},
        {"text": "Look: "},
        call_part(name="f", args={}),
        groundingMetadata=grounding(["https://a.example"], cited=[0]),
    )
    relay(tr, sink, [event, response(finish="STOP")])
    assert sink.kinds() == ["reasoning", "tool_call", "progress", "sources", "text"]


# --------------------------------------------------------------------------------------------
# The request
# --------------------------------------------------------------------------------------------

DEFAULTS = RequestDefaults()


def build(
    messages: list[dict[str, Any]],
    options: dict[str, Any] | None = None,
    model: str = "gemini-2.5-flash",
    key: str | None = "AIza-key",
    url: str = BASE,
) -> tuple[str, dict[str, str], dict[str, Any]]:
    req = DIALECTS["gemini"].request(url, model, tuple(messages), options or {}, key, DEFAULTS)
    orjson.dumps(req.body)  # always serialisable
    return req.url, dict(req.headers), req.body


def test_request_url_headers_and_minimal_body() -> None:
    """The model goes into the path of the streaming URL with alt=sse, the key into
    x-goog-api-key (no Authorization), and a prompt becomes one user turn."""
    url, headers, body = build([{"role": "user", "content": "Hi"}])
    assert url == f"{BASE}/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert headers == {"x-goog-api-key": "AIza-key"}
    assert body == {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}
    url, headers, _ = build([{"role": "user", "content": "Hi"}], key=None, url=BASE + "/")
    assert url == f"{BASE}/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert headers == {}
    url, _, _ = build([{"role": "user", "content": "Hi"}], model="models/gemini-2.5-pro")
    assert url == f"{BASE}/models/gemini-2.5-pro:streamGenerateContent?alt=sse"


@given(model=st.text(min_size=1, max_size=40))
def test_a_model_name_never_changes_the_path(model: str) -> None:
    """Whatever the client names as model, it stays one quoted path segment before
    `:streamGenerateContent`: no `/`, `?` or `#` of its own reaches the URL."""
    url, _, _ = build([{"role": "user", "content": "Hi"}], model=model)
    prefix = f"{BASE}/models/"
    suffix = ":streamGenerateContent?alt=sse"
    assert url.startswith(prefix)
    assert url.endswith(suffix)
    segment = url[len(prefix) : -len(suffix)]
    assert not set("/?#") & set(segment)
    assert unquote(segment) == model.removeprefix("models/")


def test_conversation_mapping_system_roles_merging_and_images() -> None:
    """System messages become systemInstruction, assistant turns `model`, consecutive turns of
    one role merge, empty text is left out, and images become inlineData (data: URLs) or
    fileData (other URLs)."""
    _, _, body = build(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": [{"type": "text", "text": "Cite."}]},
            {"role": "user", "content": "Look:"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "this"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                    {"type": "image_url", "image_url": {"url": "https://x.example/cat.JPG?s=1"}},
                    {"type": "image_url", "image_url": "gs://bucket/file"},
                    {"type": "image_url", "image_url": {"url": "data:text/plain,a%20b"}},
                    {"type": "input_audio", "input_audio": {"data": "..."}},
                    {"type": "text", "text": ""},
                ],
            },
            {"role": "assistant", "content": "Nice."},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "Thanks"},
        ]
    )
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}, {"text": "Cite."}]}
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "Look:"},
                {"text": "this"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBO"}},
                {
                    "fileData": {
                        "fileUri": "https://x.example/cat.JPG?s=1",
                        "mimeType": "image/jpeg",
                    }
                },
                {"fileData": {"fileUri": "gs://bucket/file"}},
                {"inlineData": {"mimeType": "text/plain", "data": "YSBi"}},
            ],
        },
        {"role": "model", "parts": [{"text": "Nice."}]},
        {"role": "user", "parts": [{"text": "Thanks"}]},
    ]


def test_tool_loop_mapping() -> None:
    """Assistant tool calls become functionCall parts (args parsed, with the documented
    signature sentinel); tool results a user turn of functionResponse parts named after the
    call they answer, the content as the response when it is a JSON object."""
    _, _, body = build(
        [
            {"role": "user", "content": "Weather and time in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_0",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "time", "arguments": ""},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "odd", "arguments": "[1]"},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_0", "content": '{"temp": 21}'},
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
            {
                "role": "tool",
                "tool_call_id": "call_9",
                "content": [{"type": "text", "text": "[1]"}],
            },
        ]
    )
    assert body["contents"][1:] == [
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"name": "weather", "args": {"city": "Paris"}},
                    "thoughtSignature": SKIP_SIGNATURE,
                },
                {"functionCall": {"name": "time", "args": {}}, "thoughtSignature": SKIP_SIGNATURE},
                {
                    "functionCall": {"name": "odd", "args": {"arguments": "[1]"}},
                    "thoughtSignature": SKIP_SIGNATURE,
                },
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "weather", "response": {"temp": 21}}},
                {"functionResponse": {"name": "time", "response": {"result": "12:00"}}},
                {"functionResponse": {"name": "call_9", "response": {"result": "[1]"}}},
            ],
        },
    ]


def test_generation_options_map_to_generation_config() -> None:
    """Sampling options, limits, stop sequences, the seed and penalties take Gemini's names."""
    _, _, body = build(
        [{"role": "user", "content": "Hi"}],
        {
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 40,
            "max_tokens": 256,
            "stop": "END",
            "seed": 7,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.25,
        },
    )
    assert body["generationConfig"] == {
        "temperature": 0.2,
        "topP": 0.9,
        "topK": 40,
        "maxOutputTokens": 256,
        "seed": 7,
        "presencePenalty": 0.5,
        "frequencyPenalty": 0.25,
        "stopSequences": ["END"],
    }
    _, _, body = build([{"role": "user", "content": "Hi"}], {"stop": ["a", "b"]})
    assert body["generationConfig"] == {"stopSequences": ["a", "b"]}


def test_response_format_maps_to_json_output() -> None:
    """json_object asks for JSON; json_schema also gives its JSON Schema as
    responseJsonSchema; text asks for nothing."""
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "additionalProperties": False,
    }
    cases = [
        ({"type": "json_object"}, {"responseMimeType": "application/json"}),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}},
            {"responseMimeType": "application/json", "responseJsonSchema": schema},
        ),
        ({"type": "text"}, None),
    ]
    for response_format, config in cases:
        _, _, body = build(
            [{"role": "user", "content": "Hi"}], {"response_format": response_format}
        )
        assert body.get("generationConfig") == config


@pytest.mark.parametrize("effort", sorted(THINKING_BUDGETS))
def test_reasoning_effort_maps_to_a_thinking_budget(effort: str) -> None:
    """reasoning_effort sets thinkingBudget and asks for thoughts, except `none` (budget 0,
    thinking off)."""
    _, _, body = build([{"role": "user", "content": "Hi"}], {"reasoning_effort": effort})
    budget = THINKING_BUDGETS[effort]
    assert body["generationConfig"]["thinkingConfig"] == {
        "includeThoughts": budget > 0,
        "thinkingBudget": budget,
    }


def test_tools_and_tool_choice_map_to_function_declarations_and_tool_config() -> None:
    """Function tools become one functionDeclarations entry (JSON Schema parameters as
    parametersJsonSchema); tool_choice becomes the function-calling mode."""
    parameters = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Weather.",
                "parameters": parameters,
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "now"}},
    ]
    _, _, body = build(
        [{"role": "user", "content": "Hi"}], {"tools": tools, "tool_choice": "required"}
    )
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {"name": "weather", "description": "Weather.", "parametersJsonSchema": parameters},
                {"name": "now"},
            ]
        }
    ]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    for choice, mode in (("auto", "AUTO"), ("none", "NONE")):
        _, _, body = build(
            [{"role": "user", "content": "Hi"}], {"tools": tools, "tool_choice": choice}
        )
        assert body["toolConfig"] == {"functionCallingConfig": {"mode": mode}}
    named = {"type": "function", "function": {"name": "now"}}
    _, _, body = build([{"role": "user", "content": "Hi"}], {"tools": tools, "tool_choice": named})
    assert body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["now"]}
    }


def test_web_search_options_turn_on_google_search() -> None:
    """web_search_options asks for Gemini's hosted Google Search tool."""
    _, _, body = build([{"role": "user", "content": "News?"}], {"web_search_options": {}})
    assert body["tools"] == [{"googleSearch": {}}]


def test_options_gemini_does_not_take_are_dropped() -> None:
    """Perplexity's search filters, parallel_tool_calls, stream_mode and unknown efforts reach
    no field of the request."""
    _, _, body = build(
        [{"role": "user", "content": "Hi"}],
        {
            "parallel_tool_calls": False,
            "search_domain_filter": ["a.example"],
            "search_recency_filter": "week",
            "return_images": True,
            "return_related_questions": True,
            "disable_search": True,
            "language_preference": "fr",
            "stream_mode": "concise",
            "reasoning_effort": "extreme",
        },
    )
    assert body == {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}
