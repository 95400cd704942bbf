"""The `anthropic` dialect (pure): Messages API events to text, parts and one outcome, and a
`start` to a Messages API request."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.dialects import (
    DIALECTS,
    RequestDefaults,
    UpstreamFailure,
    parse_error_body,
    status_retryable,
    translator_for,
)
from gateway.core.dialects.anthropic import (
    ANTHROPIC_VERSION,
    THINKING_BUDGETS,
    AnthropicDialect,
    AnthropicTranslator,
)
from gateway.core.parts import KNOWN_PARTS, PartLimits
from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEDecoder, SSEEvent

# --------------------------------------------------------------------------------------------
# Helpers: events in the API's shapes, a recording sink, a relay loop
# --------------------------------------------------------------------------------------------


def ev(obj: Any, name: str | None = None) -> SSEEvent:
    """An event named after its `type`, as the API sends it (or `name`)."""
    data = obj if isinstance(obj, str) else orjson.dumps(obj).decode()
    if name is None:
        name = obj["type"] if isinstance(obj, dict) else "message"
    return SSEEvent(name, data, None)


USAGE_START = {
    "input_tokens": 12,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
    "output_tokens": 1,
    "service_tier": "standard",
}


def message_start(usage: dict[str, Any] | None = None) -> SSEEvent:
    message = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": dict(USAGE_START if usage is None else usage),
    }
    return ev({"type": "message_start", "message": message})


def block_start(index: int, block: dict[str, Any]) -> SSEEvent:
    return ev({"type": "content_block_start", "index": index, "content_block": block})


def delta(index: int, body: dict[str, Any]) -> SSEEvent:
    return ev({"type": "content_block_delta", "index": index, "delta": body})


def text(index: int, piece: str) -> SSEEvent:
    return delta(index, {"type": "text_delta", "text": piece})


def block_stop(index: int) -> SSEEvent:
    return ev({"type": "content_block_stop", "index": index})


def message_delta(stop: str | None = "end_turn", usage: dict[str, Any] | None = None) -> SSEEvent:
    return ev(
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": 30} if usage is None else usage,
        }
    )


MESSAGE_STOP = ev({"type": "message_stop"})
PING = ev({"type": "ping"})


def text_stream(*pieces: str, stop: str = "end_turn") -> list[SSEEvent]:
    return [
        message_start(),
        block_start(0, {"type": "text", "text": ""}),
        PING,
        *(text(0, p) for p in pieces),
        block_stop(0),
        message_delta(stop),
        MESSAGE_STOP,
    ]


def tool_block(index: int, call_id: str, name: str, fragments: list[str]) -> list[SSEEvent]:
    start = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
    return [
        block_start(index, start),
        *(delta(index, {"type": "input_json_delta", "partial_json": f}) for f in fragments),
        block_stop(index),
    ]


@dataclass
class Recorder:
    """A PartSink that keeps everything in arrival order, with the text interleaved."""

    log: list[tuple[str, Any]] = field(default_factory=list)

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


def relay(
    events: list[SSEEvent],
    wants: frozenset[str] = KNOWN_PARTS,
    limits: PartLimits | None = None,
    eof: bool = True,
) -> tuple[str, AnthropicTranslator, Recorder]:
    """Feed `events` (stopping at the end marker), then a clean EOF unless it was seen."""
    sink = Recorder()
    translator = AnthropicTranslator(wants, sink, limits or PartLimits())
    out: list[str] = []
    for event in events:
        piece = translator.feed(event)
        if piece is not None:
            out.append(piece)
            sink.log.append(("text", piece))
        if translator.finished:
            break
    if eof and not translator.finished:
        translator.end_of_stream()
    return "".join(out), translator, sink


# --------------------------------------------------------------------------------------------
# Text, usage, finish and the end rule
# --------------------------------------------------------------------------------------------


def test_dialect_is_registered_with_its_translator() -> None:
    """`anthropic` is in the dialect table and reads with `AnthropicTranslator`."""
    assert isinstance(DIALECTS["anthropic"], AnthropicDialect)
    assert isinstance(translator_for("anthropic"), AnthropicTranslator)


def test_text_deltas_are_the_answer_and_message_stop_ends_it() -> None:
    """Each text_delta is answer text; message_stop sets `finished`; usage is message_start's
    overlaid with message_delta's; end_turn is `stop`."""
    out, tr, sink = relay(text_stream("Hello", "! How", " are you?"), eof=False)
    assert out == "Hello! How are you?"
    assert tr.finished
    assert tr.saw_text
    assert tr.meta["usage"] == {**USAGE_START, "output_tokens": 30}
    assert tr.meta["finish_reason"] == "stop"
    assert tr.finish_raw == "end_turn"
    assert sink.log == [("text", "Hello"), ("text", "! How"), ("text", " are you?")]


def test_usage_is_overlaid_by_every_message_delta() -> None:
    """Usage is cumulative: each message_delta's fields replace message_start's, new fields
    are added, untouched ones stay."""
    events = [
        message_start(),
        message_delta(None, {"output_tokens": 5}),
        message_delta("end_turn", {"input_tokens": 20, "server_tool_use": {"web_search": 1}}),
        MESSAGE_STOP,
    ]
    _, tr, _ = relay(events)
    assert tr.meta["usage"] == {
        **USAGE_START,
        "input_tokens": 20,
        "output_tokens": 5,
        "server_tool_use": {"web_search": 1},
    }


def test_unnamed_events_are_read_by_their_type() -> None:
    """Without `event:` lines (a "message" event), the JSON `type` names the event."""
    events = [SSEEvent("message", e.data, None) for e in text_stream("a", "b")]
    out, tr, _ = relay(events, eof=False)
    assert out == "ab"
    assert tr.finished


def test_eof_after_the_stop_reason_completes_the_answer() -> None:
    """A clean EOF after a message_delta with a stop_reason is a complete answer (the
    anthropic-sdk recordings' last event has no blank line, so the decoder drops it)."""
    body = b"".join(
        f"event: {e.event}\ndata: {e.data}\n\n".encode() for e in text_stream("Hi", " there")
    ).removesuffix(b"\n\n")
    events = SSEDecoder().feed(body)
    assert events[-1].event == "message_delta"
    out, tr, _ = relay(events, eof=False)
    assert not tr.finished
    tr.end_of_stream()
    assert tr.finished
    assert out == "Hi there"
    assert tr.meta["finish_reason"] == "stop"


@pytest.mark.parametrize("cut", [0, 1, 3, 5])
def test_eof_before_the_stop_reason_is_interrupted(cut: int) -> None:
    """A clean EOF before any stop_reason (even after the last block closed) is
    `stream_interrupted`, retryable by the protocol's table."""
    events = text_stream("a", "b")[:cut]
    with pytest.raises(UpstreamFailure) as info:
        relay(events)
    assert info.value.code is ErrorCode.STREAM_INTERRUPTED


def test_a_stop_reason_of_null_does_not_complete_the_answer() -> None:
    """A message_delta whose stop_reason is null is not the end; EOF then is interrupted."""
    with pytest.raises(UpstreamFailure) as info:
        relay([message_start(), message_delta(None)])
    assert info.value.code is ErrorCode.STREAM_INTERRUPTED


def test_message_stop_without_a_stop_reason_is_a_protocol_error() -> None:
    """The API always says why a message stopped; a message_stop without it is malformed."""
    with pytest.raises(UpstreamFailure) as info:
        relay([message_start(), MESSAGE_STOP])
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", None),
        ("something_new", None),
    ],
)
def test_stop_reasons_are_normalised(stop: str, finish: str | None) -> None:
    """stop_reason becomes the protocol's finish_reason; one it does not know (pause_turn: a
    server-tool turn paused for the client to continue) is left out but still ends the answer,
    and `finish_raw` keeps it."""
    _, tr, _ = relay(text_stream("x", stop=stop))
    assert tr.finished
    assert tr.meta.get("finish_reason") == finish
    assert tr.finish_raw == stop


def test_a_turn_that_called_tools_and_stopped_plainly_says_tool_calls() -> None:
    """An answer that called tools says `tool_calls` even if the API called its end end_turn."""
    events = [message_start(), *tool_block(0, "toolu_1", "f", ["{}"]), message_delta("end_turn")]
    _, tr, _ = relay(events, wants=frozenset())
    assert tr.meta["finish_reason"] == "tool_calls"


def test_ping_and_unknown_events_and_deltas_are_ignored() -> None:
    """`ping`, event types and delta types the API may add later, and empty data change
    nothing."""
    events = text_stream("a", "b")
    events[3:3] = [
        PING,
        ev({"type": "brand_new_event", "x": 1}),
        delta(0, {"type": "brand_new_delta", "x": "y"}),
        delta(0, {"type": "text_delta", "text": ""}),
        SSEEvent("message", "", None),
    ]
    out, tr, sink = relay(events)
    assert out == "ab"
    assert tr.finished
    assert sink.kinds() == ["text", "text"]


def test_a_text_blocks_start_text_is_answer_text() -> None:
    """Text a text block's content_block_start carries (the SDKs keep it) comes first."""
    events = text_stream("b")
    events[1] = block_start(0, {"type": "text", "text": "a"})
    out, _, _ = relay(events)
    assert out == "ab"


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "retryable"),
    [
        ("overloaded_error", True),
        ("api_error", True),
        ("rate_limit_error", True),
        ("invalid_request_error", False),
        ("permission_error", False),
    ],
)
def test_error_event_is_upstream_error_retryable_by_kind(kind: str, retryable: bool) -> None:
    """An `error` event is `upstream_error` with the upstream's message made safe (no URL),
    retryable for overloaded, server and rate-limit errors."""
    error = {"type": kind, "message": "Overloaded, see https://status.anthropic.com now"}
    with pytest.raises(UpstreamFailure) as info:
        relay([message_start(), text(0, "a"), ev({"type": "error", "error": error})])
    assert info.value.code is ErrorCode.UPSTREAM_ERROR
    assert info.value.retryable is retryable
    assert info.value.message.startswith("Overloaded, see")
    assert "https://" not in info.value.message


def test_error_event_without_a_message_names_its_type() -> None:
    """An error object with no message is described by its type."""
    with pytest.raises(UpstreamFailure) as info:
        relay([ev({"type": "error", "error": {"type": "overloaded_error"}})])
    assert info.value.message == "overloaded_error"


@pytest.mark.parametrize(
    "event",
    [
        SSEEvent("content_block_delta", '{"type":"content_block_delta","delta":', None),
        SSEEvent("message_start", "{not json", None),
        SSEEvent("content_block_delta", "[1, 2]", None),
        SSEEvent("message_delta", '"a string"', None),
        ev({"type": "content_block_delta", "index": 0, "delta": "text"}),
        ev({"type": "content_block_delta", "index": 0}),
        delta(0, {"type": "text_delta", "text": 5}),
        delta(0, {"type": "text_delta"}),
        ev({"type": "content_block_start", "index": 0, "content_block": None}),
    ],
)
def test_unparsable_or_malformed_events_are_protocol_errors(event: SSEEvent) -> None:
    """Invalid JSON, a non-object, and a known event without its required shape are
    `upstream_protocol_error`."""
    with pytest.raises(UpstreamFailure) as info:
        relay([message_start(), event])
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


def test_anthropic_http_error_bodies_are_described_by_their_message() -> None:
    """A non-2xx answer's `{"type": "error", "error": {"type", "message"}}` gives its message;
    529 (overloaded) is retryable like every 5xx."""
    body = orjson.dumps(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    assert (
        parse_error_body(529, "application/json", body) == "upstream answered HTTP 529: Overloaded"
    )
    assert status_retryable(529)
    assert not status_retryable(400)


# --------------------------------------------------------------------------------------------
# Reasoning
# --------------------------------------------------------------------------------------------

THINKING = [
    message_start(),
    block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
    delta(0, {"type": "thinking_delta", "thinking": "Let me"}),
    delta(0, {"type": "thinking_delta", "thinking": " think."}),
    delta(0, {"type": "thinking_delta", "thinking": ""}),
    delta(0, {"type": "signature_delta", "signature": "EvQBCkYICxgCKkAx"}),
    block_stop(0),
    block_start(1, {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3p"}),
    block_stop(1),
    block_start(2, {"type": "text", "text": ""}),
    text(2, "42"),
    block_stop(2),
    message_delta(),
    MESSAGE_STOP,
]


def test_thinking_deltas_are_reasoning_before_the_text() -> None:
    """thinking_delta is reasoning, pushed before the answer; `done.reasoning` has it all;
    signatures and redacted thinking are not relayed."""
    out, tr, sink = relay(THINKING)
    assert out == "42"
    assert sink.log == [("reasoning", "Let me"), ("reasoning", " think."), ("text", "42")]
    assert tr.meta["reasoning"] == "Let me think."


def test_reasoning_is_not_pushed_unless_asked_for() -> None:
    """A client that did not ask for reasoning gets none, and `done` has no `reasoning`."""
    out, tr, sink = relay(THINKING, wants=frozenset({"sources", "tools"}))
    assert out == "42"
    assert sink.kinds() == ["text"]
    assert "reasoning" not in tr.meta


def test_a_thinking_blocks_start_text_is_reasoning() -> None:
    """Thinking a thinking block's content_block_start carries is reasoning too."""
    events = list(THINKING)
    events[1] = block_start(0, {"type": "thinking", "thinking": "So, ", "signature": ""})
    _, tr, _ = relay(events)
    assert tr.meta["reasoning"] == "So, Let me think."


def test_redacted_thinking_alone_is_content() -> None:
    """A stream with only redacted thinking was not empty (`saw_text`), though nothing is
    relayed."""
    events = [message_start(), block_start(0, {"type": "redacted_thinking", "data": "x"})]
    _, tr, sink = relay(events, eof=False)
    assert tr.saw_text
    assert sink.log == []


@pytest.mark.parametrize("wants", [KNOWN_PARTS, frozenset()])
def test_reasoning_over_the_limit_fails_whether_or_not_asked_for(wants: frozenset[str]) -> None:
    """Reasoning bytes are counted against `max_reasoning_bytes` (UTF-8) even when not
    relayed; over it the stream fails with a protocol error."""
    limits = PartLimits(max_reasoning_bytes=10)
    events = [
        message_start(),
        block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
        delta(0, {"type": "thinking_delta", "thinking": "ééééé"}),  # 10 bytes: at the limit
    ]
    relay(events, wants, limits, eof=False)
    with pytest.raises(UpstreamFailure) as info:
        relay([*events, delta(0, {"type": "thinking_delta", "thinking": "x"})], wants, limits)
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


# --------------------------------------------------------------------------------------------
# Tool calls
# --------------------------------------------------------------------------------------------


def test_tool_use_blocks_are_tool_calls_complete_at_their_block_stop() -> None:
    """id and name from content_block_start, arguments from the input_json_delta fragments,
    pushed at content_block_stop (before text that follows); `done.tool_calls` lists them."""
    events = [
        message_start(),
        block_start(0, {"type": "text", "text": ""}),
        text(0, "Checking."),
        block_stop(0),
        *tool_block(1, "toolu_A", "get_weather", ["", '{"locati', 'on": "P', 'aris"}']),
        *tool_block(2, "toolu_B", "get_time", ['{"tz": "CET"}']),
        block_start(3, {"type": "text", "text": ""}),
        text(3, "Done."),
        block_stop(3),
        message_delta("tool_use"),
        MESSAGE_STOP,
    ]
    out, tr, sink = relay(events)
    assert out == "Checking.Done."
    calls = [
        {"call_id": "toolu_A", "name": "get_weather", "arguments": {"location": "Paris"}},
        {"call_id": "toolu_B", "name": "get_time", "arguments": {"tz": "CET"}},
    ]
    assert sink.log == [
        ("text", "Checking."),
        ("tool_call", calls[0]),
        ("tool_call", calls[1]),
        ("text", "Done."),
    ]
    assert tr.meta["tool_calls"] == calls
    assert tr.meta["finish_reason"] == "tool_calls"


def test_a_tool_without_argument_text_takes_the_starts_input() -> None:
    """When no fragment carried any text, the arguments are content_block_start's `input`
    (`{}` for a tool without parameters)."""
    start = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}
    events = [
        message_start(),
        block_start(0, start),
        delta(0, {"type": "input_json_delta", "partial_json": ""}),
        block_stop(0),
        *tool_block(1, "toolu_2", "g", [""]),
        message_delta("tool_use"),
    ]
    _, tr, sink = relay(events)
    assert sink.of("tool_call") == [
        {"call_id": "toolu_1", "name": "f", "arguments": {"a": 1}},
        {"call_id": "toolu_2", "name": "g", "arguments": {}},
    ]
    assert tr.meta["tool_calls"] == sink.of("tool_call")


def test_arguments_cut_off_at_max_tokens_are_relayed_raw() -> None:
    """A call whose input is not valid JSON (cut at max_tokens) keeps its string as sent, and
    a block never stopped is completed when the message ends."""
    events = [
        message_start(),
        block_start(0, {"type": "tool_use", "id": "toolu_1", "name": "make_file", "input": {}}),
        delta(0, {"type": "input_json_delta", "partial_json": '{"filename": "tax'}),
        message_delta("max_tokens"),
    ]
    _, tr, sink = relay(events)
    assert sink.of("tool_call") == [
        {"call_id": "toolu_1", "name": "make_file", "arguments_raw": '{"filename": "tax'}
    ]
    assert tr.meta["finish_reason"] == "length"


def test_tool_calls_are_not_pushed_unless_asked_for() -> None:
    """A client that did not ask for tools gets no tool_call and no `done.tool_calls`, but the
    stream counts as having content."""
    events = [
        message_start(),
        *tool_block(0, "toolu_1", "f", ['{"x": 1}']),
        message_delta("tool_use"),
    ]
    out, tr, sink = relay(events, wants=frozenset({"reasoning", "sources", "progress"}))
    assert out == ""
    assert sink.log == []
    assert "tool_calls" not in tr.meta
    assert tr.saw_text
    assert tr.meta["finish_reason"] == "tool_calls"


def test_tool_arguments_over_the_limit_fail_the_stream() -> None:
    """One call's argument bytes are bounded by `max_tool_args_bytes`, fragments and a start
    input alike."""
    limits = PartLimits(max_tool_args_bytes=8)
    with pytest.raises(UpstreamFailure) as info:
        relay([message_start(), *tool_block(0, "t", "f", ['{"a": ', '"long"}'])], limits=limits)
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR
    start = {"type": "tool_use", "id": "t", "name": "f", "input": {"a": "long value"}}
    with pytest.raises(UpstreamFailure) as info:
        relay([message_start(), block_start(0, start), block_stop(0)], limits=limits)
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


def test_a_block_index_that_is_not_an_integer_is_tolerated() -> None:
    """Block events whose `index` is not an integer (a list, absent) still pair up: the call
    is relayed, nothing crashes."""
    start = {"type": "tool_use", "id": "t", "name": "f", "input": {}}
    events = [
        message_start(),
        ev({"type": "content_block_start", "index": [0], "content_block": start}),
        ev(
            {
                "type": "content_block_delta",
                "index": [0],
                "delta": {"type": "input_json_delta", "partial_json": '{"a": 1}'},
            }
        ),
        ev({"type": "content_block_stop", "index": [0]}),
        ev({"type": "content_block_stop"}),
        message_delta("tool_use"),
    ]
    _, _, sink = relay(events)
    assert sink.of("tool_call") == [{"call_id": "t", "name": "f", "arguments": {"a": 1}}]


def test_a_tool_use_without_id_gets_one() -> None:
    """A call is never relayed without an id."""
    start = {"type": "tool_use", "name": "f", "input": {}}
    _, _, sink = relay([message_start(), block_start(0, start), block_stop(0), message_delta()])
    assert sink.of("tool_call") == [{"call_id": "toolu_0", "name": "f", "arguments": {}}]


# --------------------------------------------------------------------------------------------
# Server tools (progress) and citations (sources)
# --------------------------------------------------------------------------------------------


def server_tool(index: int, name: str, input_json: str) -> list[SSEEvent]:
    start = {"type": "server_tool_use", "id": f"srvtoolu_{index}", "name": name, "input": {}}
    return [
        block_start(index, start),
        delta(index, {"type": "input_json_delta", "partial_json": ""}),
        delta(index, {"type": "input_json_delta", "partial_json": input_json[:5]}),
        delta(index, {"type": "input_json_delta", "partial_json": input_json[5:]}),
        block_stop(index),
    ]


def search_result(index: int, results: list[tuple[str, str]]) -> SSEEvent:
    content = [
        {
            "type": "web_search_result",
            "title": t,
            "url": u,
            "encrypted_content": "E",
            "page_age": None,
        }
        for u, t in results
    ]
    block = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_0", "content": content}
    return block_start(index, block)


def citation(url: str, title: str | None = "Page", cited: str = "quoted") -> dict[str, Any]:
    found = {"type": "web_search_result_location", "cited_text": cited, "url": url}
    if title is not None:
        found["title"] = title
    return {"type": "citations_delta", "citation": {**found, "encrypted_index": "Eo8B"}}


def test_server_tools_are_progress_steps_not_tool_calls() -> None:
    """web_search is a `search` step with its query, web_fetch a `fetch` step with its URL,
    code execution a `code` step, any other server or MCP tool `other`; none is a tool
    call."""
    events = [
        message_start(),
        *server_tool(0, "web_search", '{"query": "tech news today"}'),
        *server_tool(1, "web_fetch", '{"url": "https://example.com/a"}'),
        *server_tool(2, "code_execution", '{"code": "print(1)"}'),
        *server_tool(3, "bash_code_execution", '{"command": "ls"}'),
        *server_tool(4, "tool_search", '{"q": 1}'),
        block_start(5, {"type": "mcp_tool_use", "id": "m", "name": "lookup", "input": {"k": 1}}),
        block_stop(5),
        message_delta(),
    ]
    _, tr, sink = relay(events)
    assert sink.of("progress") == [
        {"kind": "search", "queries": ["tech news today"]},
        {"kind": "fetch", "urls": ["https://example.com/a"]},
        {"kind": "code", "code": "print(1)"},
        {"kind": "code", "code": "ls"},
        {"kind": "other", "type": "tool_search"},
        {"kind": "other", "type": "lookup"},
    ]
    assert sink.of("tool_call") == []
    assert "tool_calls" not in tr.meta
    assert tr.meta["finish_reason"] == "stop"


def test_progress_is_not_pushed_unless_asked_for() -> None:
    """Without `progress` in wants a server tool use pushes nothing."""
    events = [message_start(), *server_tool(0, "web_search", '{"query": "q"}'), message_delta()]
    _, tr, sink = relay(events, wants=frozenset({"tools", "sources", "reasoning"}))
    assert sink.log == []
    assert tr.saw_text


def test_citations_are_sources_numbered_by_first_citation() -> None:
    """citations_delta URLs are sources, each once, numbered 1..n in order of first citation,
    pushed before the cited text; search results alone are not sources but give a title to a
    citation that has none."""
    events = [
        message_start(),
        *server_tool(0, "web_search", '{"query": "q"}'),
        search_result(1, [("https://a.example/", "A page"), ("https://b.example/", "B page")]),
        block_stop(1),
        block_start(2, {"citations": [], "type": "text", "text": ""}),
        delta(2, citation("https://b.example/", title=None, cited="B says")),
        delta(2, citation("https://b.example/", cited="B again")),
        text(2, "B is right."),
        block_stop(2),
        block_start(3, {"citations": [], "type": "text", "text": ""}),
        delta(3, citation("https://c.example/", title="C page", cited="C says")),
        text(3, " So is C."),
        block_stop(3),
        message_delta(),
        MESSAGE_STOP,
    ]
    out, _, sink = relay(events)
    assert out == "B is right. So is C."
    assert sink.of("sources") == [
        [{"index": 1, "url": "https://b.example/", "title": "B page", "snippet": "B says"}],
        [{"index": 2, "url": "https://c.example/", "title": "C page", "snippet": "C says"}],
    ]
    assert sink.kinds() == ["progress", "sources", "text", "sources", "text"]


def test_citations_on_a_text_blocks_start_are_sources() -> None:
    """A text block may start with its citations (and a search_result_location citation
    names its URL `source`)."""
    cited = [
        {"type": "web_search_result_location", "url": "https://a.example/", "title": "A"},
        {"type": "char_location", "document_index": 0, "cited_text": "no url"},
        {"type": "search_result_location", "source": "https://s.example/", "title": "S"},
    ]
    events = [message_start(), block_start(0, {"type": "text", "text": "", "citations": cited})]
    _, _, sink = relay([*events, text(0, "x"), message_delta()])
    assert [s["url"] for batch in sink.of("sources") for s in batch] == [
        "https://a.example/",
        "https://s.example/",
    ]


def test_sources_are_not_pushed_unless_asked_for() -> None:
    """Without `sources` in wants citations push nothing."""
    events = [
        message_start(),
        block_start(0, {"citations": [], "type": "text", "text": ""}),
        delta(0, citation("https://a.example/")),
        text(0, "a"),
        message_delta(),
    ]
    out, _, sink = relay(events, wants=frozenset({"tools", "progress", "reasoning"}))
    assert out == "a"
    assert sink.kinds() == ["text"]


def test_sources_over_the_limit_are_dropped_and_counted() -> None:
    """Past `max_sources` further cited URLs are dropped (and counted once each)."""
    events = [message_start(), block_start(0, {"citations": [], "type": "text", "text": ""})]
    events += [delta(0, citation(f"https://{k}.example/")) for k in (1, 2, 3, 3, 4)]
    _, tr, sink = relay([*events, message_delta()], limits=PartLimits(max_sources=2))
    assert [s["index"] for batch in sink.of("sources") for s in batch] == [1, 2]
    assert tr.sources_dropped == 2


# --------------------------------------------------------------------------------------------
# Properties: any text, any byte boundaries
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=12), data=st.data())
def test_any_text_split_anywhere_relays_exactly(pieces: list[str], data: st.DataObject) -> None:
    """Whatever the text (any Unicode) and however the body is cut into reads, the answer is
    the text deltas joined, the reasoning before it, and a stream without its message_stop
    ends complete at EOF."""
    stream = text_stream(*pieces)
    events = [stream[0], *THINKING[1:7], *stream[1:-1]]  # a thinking block, then the text
    body = b"".join(f"event: {e.event}\ndata: {e.data}\n\n".encode() for e in events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=30), label="cuts"))
    decoder = SSEDecoder()
    events = [
        e
        for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)
        for e in decoder.feed(body[a:b])
    ]
    out, tr, sink = relay(events)
    assert out == "".join(pieces)
    assert tr.finished
    assert tr.meta["reasoning"] == "Let me think."
    assert sink.kinds()[:2] == ["reasoning", "reasoning"]


# --------------------------------------------------------------------------------------------
# The request
# --------------------------------------------------------------------------------------------

DEFAULTS = RequestDefaults()
URL = "https://api.anthropic.com/v1/messages"


def build(
    messages: list[dict[str, Any]],
    options: dict[str, Any] | None = None,
    api_key: str | None = "sk-ant-test",
    defaults: RequestDefaults = DEFAULTS,
) -> tuple[dict[str, str], dict[str, Any]]:
    req = AnthropicDialect().request(
        URL, "claude-sonnet-4-5", tuple(messages), options or {}, api_key, defaults
    )
    assert req.url == URL
    return dict(req.headers), req.body


def test_request_uses_x_api_key_and_the_api_version() -> None:
    """The key goes in `x-api-key` (no Authorization), with `anthropic-version: 2023-06-01`;
    without a key there is no key header."""
    headers, _ = build([{"role": "user", "content": "Hi"}])
    assert headers == {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
    assert ANTHROPIC_VERSION == "2023-06-01"
    headers, _ = build([{"role": "user", "content": "Hi"}], api_key=None)
    assert headers == {"anthropic-version": "2023-06-01"}


def test_request_body_streams_with_max_tokens_and_a_top_level_system() -> None:
    """model, max_tokens (the default when the start gives none), stream true; system messages
    become the top-level `system`, joined with blank lines."""
    _, body = build(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
            {"role": "user", "content": "Hi"},
        ]
    )
    assert body == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 4096,
        "system": "Be brief.\n\nBe kind.",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
    }
    _, body = build([{"role": "user", "content": "Hi"}], defaults=RequestDefaults(max_tokens=99))
    assert body["max_tokens"] == 99
    assert "system" not in body
    _, body = build([{"role": "user", "content": "Hi"}], {"max_tokens": 7})
    assert body["max_tokens"] == 7


def test_content_parts_become_anthropic_blocks() -> None:
    """Text parts are text blocks; a base64 data: URL image is a base64 image source (a
    percent-encoded one is encoded), any other URL a url source; unknown parts pass as is."""
    doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
    _, body = build(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                    {"type": "image_url", "image_url": {"url": "data:image/svg+xml,%3Csvg%3E"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    doc,
                ],
            }
        ]
    )
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"},
        },
        {
            "type": "image",
            "source": {
                "type": "base64",
                "media_type": "image/svg+xml",
                "data": base64.b64encode(b"<svg>").decode(),
            },
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        doc,
    ]


def test_a_tool_loop_becomes_tool_use_and_merged_tool_results() -> None:
    """An assistant's tool_calls are tool_use blocks (arguments parsed, `{}` when empty or not
    an object); consecutive tool results are one user message of tool_result blocks, and a
    user message after them joins it."""
    calls = [
        {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "toolu_2", "type": "function", "function": {"name": "g", "arguments": ""}},
        {"id": "toolu_3", "type": "function", "function": {"name": "h", "arguments": '{"cut'}},
    ]
    _, body = build(
        [
            {"role": "user", "content": "Go"},
            {"role": "assistant", "content": "Calling.", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "one"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "2"}]},
            {"role": "tool", "tool_call_id": "toolu_3", "content": "three"},
            {"role": "user", "content": "And?"},
            {"role": "assistant", "content": None, "tool_calls": calls[:1]},
        ]
    )
    assert body["messages"] == [
        {"role": "user", "content": "Go"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Calling."},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
                {"type": "tool_use", "id": "toolu_2", "name": "g", "input": {}},
                {"type": "tool_use", "id": "toolu_3", "name": "h", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "one"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [{"type": "text", "text": "2"}],
                },
                {"type": "tool_result", "tool_use_id": "toolu_3", "content": "three"},
                {"type": "text", "text": "And?"},
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}],
        },
    ]


def test_consecutive_messages_of_one_role_are_merged() -> None:
    """The API wants user and assistant turns to alternate: two user messages become one."""
    _, body = build(
        [
            {"role": "user", "content": "a"},
            {"role": "user", "content": [{"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"},
            {"role": "assistant", "content": ""},
        ]
    )
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "c"}]},
    ]


def test_generation_options_map_to_their_fields_and_others_are_dropped() -> None:
    """temperature, top_p and top_k as they are; stop as stop_sequences (a string is one);
    options the API lacks (seed, penalties, response_format, Perplexity's) are left out."""
    _, body = build(
        [{"role": "user", "content": "Hi"}],
        {
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 40,
            "stop": "END",
            "seed": 1,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "response_format": {"type": "json_object"},
            "search_domain_filter": ["a.com"],
            "stream_mode": "concise",
            "language_preference": "fr",
        },
    )
    assert {k: v for k, v in body.items() if k not in ("model", "messages", "stream")} == {
        "max_tokens": 4096,
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "stop_sequences": ["END"],
    }
    _, body = build([{"role": "user", "content": "Hi"}], {"stop": ["a", "b"]})
    assert body["stop_sequences"] == ["a", "b"]


def test_tools_and_tool_choice_map_to_anthropics_shapes() -> None:
    """Function tools become {name, description, input_schema} (an empty object schema when
    there are no parameters); tool_choice auto/none/required/a function become
    auto/none/any/tool; parallel_tool_calls false disables parallel use."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "description": "F.",
                "parameters": {"type": "object", "properties": {"a": {"type": "string"}}},
            },
        },
        {"type": "function", "function": {"name": "g", "strict": True}},
    ]
    user = [{"role": "user", "content": "Hi"}]
    _, body = build(user, {"tools": tools})
    assert body["tools"] == [
        {
            "name": "f",
            "description": "F.",
            "input_schema": {"type": "object", "properties": {"a": {"type": "string"}}},
        },
        {"name": "g", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in body
    for choice, want in [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f"}),
    ]:
        assert build(user, {"tools": tools, "tool_choice": choice})[1]["tool_choice"] == want
    _, body = build(user, {"tools": tools, "parallel_tool_calls": False})
    assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    _, body = build(user, {"tools": tools, "tool_choice": "required", "parallel_tool_calls": False})
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    _, body = build(user, {"tools": tools, "tool_choice": "none", "parallel_tool_calls": False})
    assert body["tool_choice"] == {"type": "none"}
    _, body = build(user, {"tools": tools, "parallel_tool_calls": True})
    assert "tool_choice" not in body
    _, body = build(user, {"parallel_tool_calls": False})
    assert "tool_choice" not in body


@pytest.mark.parametrize(("effort", "budget"), sorted(THINKING_BUDGETS.items()))
def test_reasoning_effort_enables_thinking_with_a_budget(effort: str, budget: int) -> None:
    """reasoning_effort becomes extended thinking with its documented budget (low 1024, medium
    4096, high 16384); max_tokens is raised above the budget when it is not."""
    user = [{"role": "user", "content": "Hi"}]
    _, body = build(user, {"reasoning_effort": effort, "max_tokens": 100_000})
    assert body["thinking"] == {"type": "enabled", "budget_tokens": budget}
    assert body["max_tokens"] == 100_000
    _, body = build(user, {"reasoning_effort": effort, "max_tokens": 500})
    assert body["max_tokens"] == budget + 500
    assert body["max_tokens"] > body["thinking"]["budget_tokens"]


def test_thinking_budgets_are_the_documented_ones() -> None:
    """The mapping docs/upstreams.md states."""
    assert THINKING_BUDGETS["low"] == 1024
    assert THINKING_BUDGETS["medium"] == 4096
    assert THINKING_BUDGETS["high"] == 16384


def test_an_unknown_reasoning_effort_is_dropped() -> None:
    """A reasoning_effort without a budget (none, or a value from the future) asks for no
    thinking."""
    for effort in ("none", "extreme"):
        _, body = build([{"role": "user", "content": "Hi"}], {"reasoning_effort": effort})
        assert "thinking" not in body


_ROLE = st.sampled_from(["system", "user", "assistant", "tool"])
_CONTENT = st.one_of(
    st.text(min_size=1, max_size=5),
    st.lists(
        st.builds(lambda t: {"type": "text", "text": t}, st.text(min_size=1, max_size=5)),
        min_size=1,
        max_size=3,
    ),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_ROLE, _CONTENT), min_size=1, max_size=12))
def test_any_conversation_alternates_roles_and_keeps_every_tool_result(
    turns: list[tuple[str, Any]],
) -> None:
    """Whatever the start's messages, the request's messages alternate user and assistant,
    none is a system message, and every tool message is one tool_result block, in order."""
    messages = []
    for i, (role, content) in enumerate(turns):
        message: dict[str, Any] = {"role": role, "content": content}
        if role == "tool":
            message["tool_call_id"] = f"toolu_{i}"
        messages.append(message)
    _, body = build(messages)
    roles = [m["role"] for m in body["messages"]]
    assert set(roles) <= {"user", "assistant"}
    assert all(a != b for a, b in pairwise(roles))
    results = [
        block["tool_use_id"]
        for m in body["messages"]
        if isinstance(m["content"], list)
        for block in m["content"]
        if block.get("type") == "tool_result"
    ]
    assert results == [f"toolu_{i}" for i, (role, _) in enumerate(turns) if role == "tool"]
    systems = [c for role, c in turns if role == "system"]
    assert ("system" in body) == any(
        (c if isinstance(c, str) else "".join(p["text"] for p in c)) for c in systems
    )
