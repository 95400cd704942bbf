"""The mock's Anthropic Messages format (gateway/mock/formats/anthropic.py): its streams, read
back through the gateway's own `anthropic` translator, carry the text and parts the mock meant;
its request reading, key and error bodies are the API's."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from gateway.core.dialects import RequestDefaults, UpstreamFailure, parse_error_body
from gateway.core.dialects.anthropic import AnthropicDialect, AnthropicTranslator
from gateway.core.parts import KNOWN_PARTS
from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEDecoder
from gateway.mock.answers import choose_answer, text_chunks
from gateway.mock.formats import Emit, StreamSpec, plan_stream
from gateway.mock.formats.anthropic import _AnthropicFormatter, tool_use_id
from gateway.mock.formats.base import BadRequest
from gateway.mock.knobs import parse_directive
from gateway.mock.script import (
    REFUSAL_TEXT,
    build_parts,
    reasoning_text,
    source_list,
    tool_calls,
)
from gateway.mock.server import MockUpstream
from tests.mock.conftest import LF, fetch, post, sse_blocks, url

SKY = "Why is the sky blue?"
SKY_ANSWER = choose_answer(SKY)
MODEL = "claude-sonnet-4-5"
KEY = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}


class Sink:
    """A PartSink that keeps everything in arrival order."""

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


def read_back(raw: bytes) -> tuple[str, AnthropicTranslator, Sink]:
    """What the gateway's translator makes of a body (every part asked for), EOF included."""
    sink = Sink()
    translator = AnthropicTranslator(KNOWN_PARTS, sink)
    out: list[str] = []
    for event in SSEDecoder().feed(raw):
        piece = translator.feed(event)
        if piece is not None:
            out.append(piece)
            sink.log.append(("text", piece))
        if translator.finished:
            break
    if not translator.finished:
        translator.end_of_stream()
    return "".join(out), translator, sink


def feed_all(raw: bytes, texts: list[str]) -> None:
    """Feed a body to a fresh translator, collecting its text, until it raises."""
    translator = AnthropicTranslator(KNOWN_PARTS, Sink())
    for event in SSEDecoder().feed(raw):
        piece = translator.feed(event)
        if piece:
            texts.append(piece)


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) of every event of a complete body."""
    out = []
    for block in sse_blocks(raw, LF):
        fields = dict(block)
        out.append((fields["event"], orjson.loads(fields["data"])))
    return out


async def stream(
    session: aiohttp.ClientSession, mock: MockUpstream, knobs: str, path: str = "/anthropic"
) -> bytes:
    status, headers, raw = await fetch(
        session, url(mock, path), f"{SKY} [[mock {knobs}]]", model=MODEL, max_tokens=1024
    )
    assert status == 200, raw
    assert headers["Content-Type"].startswith("text/event-stream")
    return raw


# --------------------------------------------------------------------------------------------
# Plain text
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/anthropic", "/v1/messages"])
async def test_plain_stream_has_the_real_wire_shape(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str
) -> None:
    """message_start (usage with input_tokens), a text block with one text_delta per piece
    (after a ping), message_delta with end_turn and the output tokens, message_stop; every
    event named after its type, LF only; the translator reads back the answer."""
    raw = await stream(session, mock, "chunks=3", path)
    assert b"\r" not in raw
    got = events(raw)
    assert all(name == data["type"] for name, data in got)
    assert [name for name, _ in got] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    message = got[0][1]["message"]
    assert message["model"] == MODEL
    assert message["id"].startswith("msg_01")
    assert message["usage"]["input_tokens"] > 0
    assert got[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    pieces = text_chunks(SKY_ANSWER.text, 3)
    assert [d["delta"] for _, d in got[3:6]] == [{"type": "text_delta", "text": p} for p in pieces]
    assert got[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert got[-2][1]["usage"]["output_tokens"] == 3
    text, translator, sink = read_back(raw)
    assert text == "".join(pieces)
    assert translator.meta["finish_reason"] == "stop"
    assert translator.meta["usage"]["input_tokens"] == message["usage"]["input_tokens"]
    assert translator.meta["usage"]["output_tokens"] == 3
    assert [k for k, _ in sink.log] == ["text"] * 3
    rec = mock.records[-1]
    assert (rec.path, rec.chunks_sent, rec.outcome) == (path, 3, "completed")


async def test_done_zero_ends_at_eof_after_the_stop_reason(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """done=0 leaves out message_stop: a clean EOF after the stop_reason is complete."""
    raw = await stream(session, mock, "chunks=2 done=0")
    assert events(raw)[-1][0] == "message_delta"
    text, translator, _ = read_back(raw)
    assert text == "".join(text_chunks(SKY_ANSWER.text, 2))
    assert translator.finished


async def test_finish_zero_sends_no_stop_reason_and_fails(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """finish=0 leaves out message_delta: the message_stop that follows is a protocol error."""
    raw = await stream(session, mock, "chunks=2 finish=0")
    assert "message_delta" not in [name for name, _ in events(raw)]
    with pytest.raises(UpstreamFailure) as info:
        read_back(raw)
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


@pytest.mark.parametrize("extra", ["", "tools=1"])
async def test_finish_length_stops_at_max_tokens(
    mock: MockUpstream, session: aiohttp.ClientSession, extra: str
) -> None:
    """finish=length: stop_reason max_tokens (a tool call cut off too), read back as
    `length`."""
    raw = await stream(session, mock, f"finish=length {extra}".strip())
    assert events(raw)[-2][1]["delta"]["stop_reason"] == "max_tokens"
    _, translator, _ = read_back(raw)
    assert translator.meta["finish_reason"] == "length"
    assert translator.finished


async def test_fast_streams_prerendered_text_deltas(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """fast=1 pre-renders the text event: the same answer reads back."""
    raw = await stream(session, mock, "fast=1 chunks=50")
    text, translator, _ = read_back(raw)
    assert text == "".join(text_chunks(SKY_ANSWER.text, 50))
    assert translator.meta["usage"]["output_tokens"] == 50


# --------------------------------------------------------------------------------------------
# Scripted parts
# --------------------------------------------------------------------------------------------


async def test_reasoning_is_a_thinking_block_before_the_text(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """reasoning=thinking: a thinking block (thinking_deltas, then a signature_delta) at index
    0, then the text block at index 1; read back as reasoning before the text."""
    raw = await stream(session, mock, "reasoning=thinking chunks=2")
    got = events(raw)
    starts = [d for name, d in got if name == "content_block_start"]
    assert [(s["index"], s["content_block"]["type"]) for s in starts] == [
        (0, "thinking"),
        (1, "text"),
    ]
    kinds = [d["delta"]["type"] for name, d in got if name == "content_block_delta"]
    signature = kinds.index("signature_delta")
    assert set(kinds[:signature]) == {"thinking_delta"}
    assert kinds[signature + 1 :] == ["text_delta", "text_delta"]
    text, translator, sink = read_back(raw)
    assert "".join(sink.of("reasoning")) == reasoning_text(SKY_ANSWER)
    assert translator.meta["reasoning"] == reasoning_text(SKY_ANSWER)
    assert text == "".join(text_chunks(SKY_ANSWER.text, 2))
    last_reasoning = max(i for i, (k, _) in enumerate(sink.log) if k == "reasoning")
    assert sink.log[last_reasoning + 1][0] == "text"
    assert mock.records[-1].chunks_sent == 2


@pytest.mark.parametrize("kind", ["1", "2", "bad_json", "no_index"])
async def test_tools_are_tool_use_blocks_with_streamed_input(
    mock: MockUpstream, session: aiohttp.ClientSession, kind: str
) -> None:
    """tools=: tool_use blocks (toolu_ ids, input {}), an empty input_json_delta then the
    argument fragments, stop_reason tool_use; read back as the scripted calls."""
    raw = await stream(session, mock, f"tools={kind}")
    got = events(raw)
    starts = [d["content_block"] for name, d in got if name == "content_block_start"]
    assert all(s["type"] == "tool_use" and s["input"] == {} for s in starts)
    assert all(s["id"].startswith("toolu_") for s in starts)
    first_deltas = [
        got[i + 1][1]["delta"] for i, (name, _) in enumerate(got) if name == "content_block_start"
    ]
    assert all(d == {"type": "input_json_delta", "partial_json": ""} for d in first_deltas)
    assert got[-2][1]["delta"]["stop_reason"] == "tool_use"
    text, translator, sink = read_back(raw)
    assert text == ""
    expected = tool_calls(parse_directive(f"[[mock tools={kind}]]")[1], "seed")
    calls = sink.of("tool_call")
    assert [c["name"] for c in calls] == [c.name for c in expected]
    assert [c["call_id"] for c in calls] == [s["id"] for s in starts]
    for call, want in zip(calls, expected, strict=True):
        if kind == "bad_json":
            assert call["arguments_raw"] == want.arguments
        else:
            assert call["arguments"] == orjson.loads(want.arguments)
    assert translator.meta["finish_reason"] == "tool_calls"
    assert translator.meta["tool_calls"] == calls


def test_scripted_call_ids_become_toolu_ids() -> None:
    """A script's `call_` id keeps its characters behind Anthropic's `toolu_` prefix."""
    assert tool_use_id("call_abc123") == "toolu_abc123"


@pytest.mark.parametrize(("knob", "count"), [("sources=3", 3), ("sources=grow:5", 5)])
async def test_sources_are_a_web_search_and_citations(
    mock: MockUpstream, session: aiohttp.ClientSession, knob: str, count: int
) -> None:
    """sources=N: a server_tool_use web search and its web_search_tool_result, then
    citations_delta (web_search_result_location) in the text block; read back as a search
    progress step and N sources in order, the answer's own first."""
    raw = await stream(session, mock, f"{knob} chunks=2")
    got = events(raw)
    starts = [d["content_block"] for name, d in got if name == "content_block_start"]
    assert [s["type"] for s in starts] == ["server_tool_use", "web_search_tool_result", "text"]
    assert starts[0]["name"] == "web_search"
    assert starts[2]["citations"] == []
    expected = source_list(SKY_ANSWER, count)
    assert [r["url"] for r in starts[1]["content"]] == [s.url for s in expected]
    citations = [
        d["delta"]["citation"]
        for name, d in got
        if name == "content_block_delta" and d["delta"]["type"] == "citations_delta"
    ]
    assert {c["type"] for c in citations} == {"web_search_result_location"}
    assert got[-2][1]["usage"]["server_tool_use"] == {"web_search_requests": 1}
    text, translator, sink = read_back(raw)
    assert text == "".join(text_chunks(SKY_ANSWER.text, 2))
    (step,) = sink.of("progress")
    assert step["kind"] == "search"
    assert step["queries"] == [SKY_ANSWER.sources[0].title.split(" - ")[0]]
    sources = [s for batch in sink.of("sources") for s in batch]
    assert [(s["index"], s["url"], s["title"]) for s in sources] == [
        (i, s.url, s.title) for i, s in enumerate(expected, 1)
    ]
    assert translator.meta["usage"]["server_tool_use"] == {"web_search_requests": 1}


async def test_grown_sources_come_one_per_text_piece(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """sources=grow:N cites one more source before each text piece."""
    raw = await stream(session, mock, "sources=grow:3 chunks=4")
    _, _, sink = read_back(raw)
    kinds = [k for k, _ in sink.log]
    assert kinds == ["progress", "sources", "text", "sources", "text", "sources", "text", "text"]


async def test_the_search_follows_the_thinking_block(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """With reasoning, the web search comes after the thinking block and before the text, as
    the API orders them; with tool calls and no text, the citations get a text block of their
    own at the end."""
    raw = await stream(session, mock, "reasoning=thinking sources=2 chunks=2")
    got = events(raw)
    starts = [
        (d["index"], d["content_block"]["type"]) for n, d in got if n == "content_block_start"
    ]
    assert starts == [
        (0, "thinking"),
        (1, "server_tool_use"),
        (2, "web_search_tool_result"),
        (3, "text"),
    ]
    _, _, sink = read_back(raw)
    kinds = [k for k, _ in sink.log if k != "reasoning"]
    assert kinds == ["progress", "sources", "sources", "text", "text"]
    assert sink.log[0][0] == "reasoning"
    raw = await stream(session, mock, "tools=1 sources=2")
    got = events(raw)
    starts = [d["content_block"]["type"] for n, d in got if n == "content_block_start"]
    assert starts == ["server_tool_use", "web_search_tool_result", "tool_use", "text"]
    _, translator, sink = read_back(raw)
    assert [k for k, _ in sink.log] == ["progress", "tool_call", "sources", "sources"]
    assert translator.meta["finish_reason"] == "tool_calls"


async def test_refusal_streams_text_and_stops_with_refusal(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """refusal=1: the refusal text as text deltas, stop_reason refusal (content_filter)."""
    raw = await stream(session, mock, "refusal=1")
    assert events(raw)[-2][1]["delta"]["stop_reason"] == "refusal"
    text, translator, _ = read_back(raw)
    assert text == REFUSAL_TEXT
    assert translator.meta["finish_reason"] == "content_filter"


@pytest.mark.parametrize("directive", ["reasoning=reasoning_content", "concise=1", "choices=2"])
async def test_parts_the_api_has_not_are_refused(
    mock: MockUpstream, session: aiohttp.ClientSession, directive: str
) -> None:
    """A scripted part Anthropic never sends is a 400 in Anthropic's error shape."""
    status, _, raw = await fetch(
        session, url(mock, "/anthropic"), f"hi [[mock {directive}]]", max_tokens=5
    )
    assert status == 400
    body = orjson.loads(raw)
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "applies to" in body["error"]["message"]


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


async def test_fault_error_is_an_overloaded_error_event(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """fault=error: after K pieces an `error` event with overloaded_error, then the end: a
    retryable upstream_error after the text already read."""
    raw = await stream(session, mock, "chunks=3 fault=error after=1")
    name, data = events(raw)[-1]
    assert name == "error"
    assert data["error"]["type"] == "overloaded_error"
    texts: list[str] = []
    with pytest.raises(UpstreamFailure) as info:
        feed_all(raw, texts)
    assert texts == text_chunks(SKY_ANSWER.text, 3)[:1]
    assert info.value.code is ErrorCode.UPSTREAM_ERROR
    assert info.value.retryable is True
    assert info.value.message.startswith("Overloaded")


async def test_fault_malformed_is_a_protocol_error(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """fault=malformed: a content_block_delta whose JSON is cut short."""
    raw = await stream(session, mock, "chunks=3 fault=malformed after=1")
    with pytest.raises(UpstreamFailure) as info:
        read_back(raw)
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


async def test_fault_giant_is_one_valid_event_of_the_asked_size(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """fault=giant: one `ping` event whose data is the asked size; the answer is unchanged."""
    raw = await stream(session, mock, "chunks=2 fault=giant after=1 size=100000")
    (giant,) = [b for b in sse_blocks(raw, LF) if len(b[-1][1]) > 1000]
    assert giant[0] == ("event", "ping")
    assert len(giant[1][1]) == 100_000
    text, translator, _ = read_back(raw)
    assert text == "".join(text_chunks(SKY_ANSWER.text, 2))
    assert translator.finished


# --------------------------------------------------------------------------------------------
# The request side: reading it, the key, error bodies
# --------------------------------------------------------------------------------------------


def test_read_request_reads_system_messages_model_and_stream() -> None:
    """`system` (a string or text blocks) is the first turn; message contents are strings or
    blocks (their text); tool results carry no text."""
    body = {
        "model": MODEL,
        "max_tokens": 100,
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
        ],
        "stream": True,
    }
    request = _AnthropicFormatter.read_request(body, None)
    assert request.turns == (
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello"),
        ("user", ""),
    )
    assert (request.model, request.stream, request.include_usage) == (MODEL, True, False)
    request = _AnthropicFormatter.read_request({"max_tokens": 1, "messages": []}, None)
    assert (request.turns, request.model, request.stream) == ((), None, False)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"max_tokens": 0, "messages": []}, "max_tokens"),
        ({"max_tokens": True, "messages": []}, "max_tokens"),
        ({"max_tokens": 5, "messages": "x"}, "messages"),
        ({"max_tokens": 5}, "messages"),
    ],
)
def test_read_request_refuses_what_the_api_refuses(body: dict[str, Any], param: str) -> None:
    """max_tokens is required (a positive integer) and messages must be a list of objects."""
    with pytest.raises(BadRequest) as info:
        _AnthropicFormatter.read_request(body, None)
    assert info.value.param == param


def test_api_key_is_read_from_x_api_key() -> None:
    """The key is the `x-api-key` header (any case); a Bearer token is not Anthropic's."""
    assert _AnthropicFormatter.api_key(CIMultiDict({"X-Api-Key": "sk-ant-1"})) == "sk-ant-1"
    assert _AnthropicFormatter.api_key(CIMultiDict({"Authorization": "Bearer sk-ant-1"})) is None


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (529, "overloaded_error"),
        (503, "api_error"),
    ],
)
async def test_status_knob_answers_anthropics_error_body(
    mock: MockUpstream, session: aiohttp.ClientSession, status: int, kind: str
) -> None:
    """status=N answers `{"type": "error", "error": {"type", "message"}}` with the API's type
    for N, which the gateway describes by its message."""
    got, headers, raw = await fetch(
        session, url(mock, "/anthropic"), f"hi [[mock status={status}]]", max_tokens=5
    )
    assert got == status
    body = orjson.loads(raw)
    assert body == {"type": "error", "error": {"type": kind, "message": body["error"]["message"]}}
    message = body["error"]["message"]
    assert parse_error_body(status, headers["Content-Type"], raw) == (
        f"upstream answered HTTP {status}: {message}"
    )


async def test_a_request_without_max_tokens_is_a_400_like_the_apis(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """The mock refuses what the API refuses, in the API's shape."""
    status, _, raw = await fetch(session, url(mock, "/anthropic"), "hi")
    assert status == 400
    error = orjson.loads(raw)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("max_tokens")


async def test_require_key_checks_x_api_key(session: aiohttp.ClientSession) -> None:
    """With require_key, the Anthropic routes check `x-api-key`."""
    async with MockUpstream(default_delay_ms=0, require_key="sk-ant-test") as guarded:
        target = url(guarded, "/anthropic")
        bearer = {"Authorization": "Bearer sk-ant-test"}
        async with post(session, target, "hi", headers=bearer, max_tokens=5) as resp:
            assert resp.status == 401
        async with post(session, target, "hi", headers=KEY, max_tokens=5) as resp:
            assert resp.status == 200
            await resp.read()


async def test_the_gateways_own_request_is_served(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """The `anthropic` dialect's request (headers, system, max_tokens, tool loop, thinking)
    is one the mock accepts, and its answer reads back."""
    request = AnthropicDialect().request(
        url(mock, "/v1/messages"),
        MODEL,
        (
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"{SKY} [[mock chunks=4 reasoning=thinking]]"},
        ),
        {"reasoning_effort": "low", "temperature": 1},
        "sk-ant-test",
        RequestDefaults(),
    )
    async with session.post(
        request.url, data=orjson.dumps(request.body), headers=dict(request.headers)
    ) as resp:
        assert resp.status == 200
        raw = await resp.read()
    text, translator, _ = read_back(raw)
    assert text == "".join(text_chunks(SKY_ANSWER.text, 4))
    assert translator.meta["reasoning"] == reasoning_text(SKY_ANSWER)
    assert mock.records[-1].body == request.body


# --------------------------------------------------------------------------------------------
# Pure: plans
# --------------------------------------------------------------------------------------------


def test_after_counts_the_events_after_the_preamble() -> None:
    """A fault's after=K counts body events (thinking and text alike), not the preamble."""
    _, knobs = parse_directive("[[mock chunks=2 reasoning=thinking fault=eof after=3]]")
    pieces = tuple(text_chunks(SKY_ANSWER.text, 2))
    spec = StreamSpec(
        dialect="anthropic",
        model=MODEL,
        answer=SKY_ANSWER,
        pieces=pieces,
        prompt_tokens=5,
        knobs=knobs,
        request_id="msg_01x",
        parts=build_parts(SKY_ANSWER, knobs, pieces, "msg_01x"),
    )
    steps = list(plan_stream(spec))
    assert [s.kind for s in steps] == ["meta", "meta", "part", "part", "part", "eof"]
    body = b"".join(s.data for s in steps if isinstance(s, Emit))
    assert [name for name, _ in events(body)][:2] == ["message_start", "ping"]
