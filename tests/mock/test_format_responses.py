"""The Responses wire formats (gateway/mock/formats/responses.py): each scripted stream read back
through the gateway's own `openai-responses` / `perplexity-agent` translator gives the answer,
parts and end the mock meant; the request reading, key and error bodies; and the routes over
loopback."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.core.dialects import UpstreamFailure, translator_for
from gateway.core.parts import KNOWN_PARTS
from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEDecoder
from gateway.mock.answers import text_chunks
from gateway.mock.formats import Emit, StreamSpec, error_body, plan_stream, validate_for_dialect
from gateway.mock.formats.base import BadRequest
from gateway.mock.formats.responses import _PerplexityAgentFormatter, _ResponsesFormatter
from gateway.mock.knobs import DirectiveError, parse_directive
from gateway.mock.script import build_parts, reasoning_text, source_list, tool_calls
from gateway.mock.server import MockUpstream
from tests.mock.conftest import LF, MARS, MARS_ANSWER, datas, sse_blocks, url

SEED = "resp_0123456789abcdef"
DIALECTS = ("openai-responses", "perplexity-agent")


@dataclass
class Read:
    """What the gateway made of a rendered stream."""

    text: str = ""
    log: list[tuple[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    failure: UpstreamFailure | None = None

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


def render(dialect: str, directive: str) -> bytes:
    """The body the mock writes for `[[mock directive]]` on `dialect` (no faults performed)."""
    _, knobs = parse_directive(f"[[mock {directive}]]")
    validate_for_dialect(knobs, dialect)
    pieces = tuple(text_chunks(MARS_ANSWER.text, knobs.chunks, knobs.words))
    spec = StreamSpec(
        dialect=dialect,
        model="test-model",
        answer=MARS_ANSWER,
        pieces=pieces,
        prompt_tokens=7,
        knobs=knobs,
        request_id=SEED,
        created=1_700_000_000,
        parts=build_parts(MARS_ANSWER, knobs, pieces, SEED) if knobs.scripted else None,
    )
    return b"".join(step.data for step in plan_stream(spec) if isinstance(step, Emit))


def read(dialect: str, directive: str) -> Read:
    """The rendered stream through the dialect's translator, every part asked for, then a
    clean EOF."""
    out = Read()
    translator = translator_for(dialect, KNOWN_PARTS, out)
    texts = []
    try:
        for event in SSEDecoder().feed(render(dialect, directive)):
            delta = translator.feed(event)
            if delta is not None:
                texts.append(delta)
            if translator.finished:
                break
        translator.end_of_stream()
    except UpstreamFailure as exc:
        out.failure = exc
    out.text = "".join(texts)
    out.meta = translator.meta
    return out


def events(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(d) for d in datas(raw, LF) if d != "[DONE]"]


# --------------------------------------------------------------------------------------------
# The stream's shape
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize(
    "directive", ["chunks=3", "reasoning=summary chunks=2", "tools=2", "sources=3 chunks=2"]
)
def test_every_event_is_named_after_its_type_and_numbered_in_order(
    dialect: str, directive: str
) -> None:
    """Each event has an `event:` line equal to its JSON `type` and a `sequence_number`
    counting from 0 without gaps; lines end in LF only."""
    if dialect == "perplexity-agent" and "reasoning" in directive:
        directive = "chunks=2"
    raw = render(dialect, directive)
    assert b"\r" not in raw
    blocks = sse_blocks(raw, LF)
    for block in blocks:
        assert block[0][0] == "event"
        assert orjson.loads(block[1][1])["type"] == block[0][1]
    assert [e["sequence_number"] for e in events(raw)] == list(range(len(blocks)))


def test_plain_text_stream_is_openais_lifecycle() -> None:
    """A text answer is created, in_progress, one message item (content part, a delta per
    piece, done events) and completed with the whole response and its usage."""
    raw = render("openai-responses", "chunks=3")
    got = events(raw)
    pieces = text_chunks(MARS_ANSWER.text, 3)
    assert [e["type"] for e in got] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["delta"] for e in got[4:7]] == pieces
    item_id = got[2]["item"]["id"]
    assert all(e["item_id"] == item_id for e in got[3:9])
    final = got[-1]["response"]
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == "".join(pieces)
    assert final["usage"] == {
        "input_tokens": 7,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 10,
    }


@pytest.mark.parametrize("dialect", DIALECTS)
def test_plain_text_reads_back_as_the_answer(dialect: str) -> None:
    """Through the gateway's translator the text is the answer's pieces, finish `stop`, and
    usage the terminal response's."""
    got = read(dialect, "chunks=4")
    assert got.failure is None
    assert got.text == "".join(text_chunks(MARS_ANSWER.text, 4))
    assert got.log == []
    assert got.meta["finish_reason"] == "stop"
    assert got.meta["usage"]["output_tokens"] == 4


def test_perplexity_agent_has_no_content_parts_and_its_usage_has_cost() -> None:
    """The Agent API's message has no content-part events and no logprobs; its usage carries
    `cost` with the SDK's fields."""
    raw = render("perplexity-agent", "chunks=2")
    kinds = [e["type"] for e in events(raw)]
    assert "response.content_part.added" not in kinds
    delta = next(e for e in events(raw) if e["type"] == "response.output_text.delta")
    assert set(delta) == {
        "type",
        "sequence_number",
        "item_id",
        "output_index",
        "content_index",
        "delta",
    }
    usage = read("perplexity-agent", "chunks=2").meta["usage"]
    assert set(usage["cost"]) == {
        "currency",
        "input_cost",
        "output_cost",
        "cache_read_cost",
        "tool_calls_cost",
        "total_cost",
    }
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


# --------------------------------------------------------------------------------------------
# Scripted parts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "delta_type"),
    [
        ("summary", "response.reasoning_summary_text.delta"),
        ("reasoning", "response.reasoning_text.delta"),
    ],
)
def test_reasoning_item_comes_first_and_reads_back_as_reasoning(
    shape: str, delta_type: str
) -> None:
    """reasoning=summary|reasoning: a reasoning item of summary (or raw) deltas before the
    message; the gateway relays it as reasoning, before the text."""
    raw = render("openai-responses", f"reasoning={shape} chunks=2")
    kinds = [e["type"] for e in events(raw)]
    assert kinds.index(delta_type) < kinds.index("response.output_text.delta")
    got = read("openai-responses", f"reasoning={shape} chunks=2")
    assert "".join(got.of("reasoning")) == reasoning_text(MARS_ANSWER)
    assert got.meta["reasoning"] == reasoning_text(MARS_ANSWER)
    assert got.text == "".join(text_chunks(MARS_ANSWER.text, 2))
    assert got.meta["usage"]["output_tokens_details"]["reasoning_tokens"] == len(
        got.of("reasoning")
    )


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("tools", ["1", "2", "bad_json", "no_index"])
def test_tool_calls_read_back_as_the_scripted_calls(dialect: str, tools: str) -> None:
    """tools=N: function_call items (argument deltas, or whole for no_index) read back as the
    scripted calls, no text, finish `tool_calls`."""
    got = read(dialect, f"tools={tools}")
    _, knobs = parse_directive(f"[[mock tools={tools}]]")
    expected = tool_calls(knobs, SEED)
    calls = got.of("tool_call")
    assert [(c["call_id"], c["name"]) for c in calls] == [(c.call_id, c.name) for c in expected]
    for call, want in zip(calls, expected, strict=True):
        if tools == "bad_json":
            assert call["arguments_raw"] == want.arguments
        else:
            assert call["arguments"] == orjson.loads(want.arguments)
    assert got.text == ""
    assert got.meta["finish_reason"] == "tool_calls"


def test_no_index_calls_have_no_argument_deltas() -> None:
    """tools=no_index sends each call whole: added and done with its arguments, no deltas."""
    kinds = [e["type"] for e in events(render("openai-responses", "tools=no_index"))]
    assert "response.function_call_arguments.delta" not in kinds
    assert kinds.count("response.output_item.done") == 2


@pytest.mark.parametrize("sources", ["3", "grow:3"])
def test_openai_sources_are_a_web_search_and_url_citations(sources: str) -> None:
    """sources=N: a web_search_call item (read as a search progress step with the query and
    the N pages), then one url_citation annotation per source, read as sources 1..N."""
    got = read("openai-responses", f"sources={sources} chunks=2")
    wanted = source_list(MARS_ANSWER, 3)
    found = [s for batch in got.of("sources") for s in batch]
    assert [(s["index"], s["url"], s["title"]) for s in found] == [
        (i, s.url, s.title) for i, s in enumerate(wanted, 1)
    ]
    [step] = got.of("progress")
    assert step["kind"] == "search"
    assert [r["url"] for r in step["results"]] == [s.url for s in wanted]
    assert got.text == "".join(text_chunks(MARS_ANSWER.text, 2))
    kinds = [k for k, _ in got.log]
    assert kinds[0] == "progress"


def test_grow_interleaves_annotations_with_the_text() -> None:
    """sources=grow:N puts one annotation after each text delta (the rest at the end)."""
    kinds = [e["type"] for e in events(render("openai-responses", "sources=grow:3 chunks=2"))]
    first = kinds.index("response.output_text.delta")
    assert kinds[first + 1] == "response.output_text.annotation.added"
    assert kinds.count("response.output_text.annotation.added") == 3


@pytest.mark.parametrize("sources", ["3", "grow:3"])
def test_perplexity_agent_research_reads_back_as_progress_and_sources(sources: str) -> None:
    """sources=N on the Agent API: its reasoning, search and fetch events are progress steps
    and its search results (ids 1..N) the sources; usage counts the search's cost."""
    got = read("perplexity-agent", f"sources={sources} chunks=2")
    wanted = source_list(MARS_ANSWER, 3)
    found = [s for batch in got.of("sources") for s in batch]
    assert [(s["index"], s["url"]) for s in found] == [(i, s.url) for i, s in enumerate(wanted, 1)]
    kinds = [step["kind"] for step in got.of("progress")]
    assert kinds[0] == "thought"
    assert kinds[1] == "search"
    assert "fetch" in kinds
    assert got.meta["usage"]["cost"]["tool_calls_cost"] > 0
    assert got.meta["usage"]["tool_calls_details"] == {"web_search": {"invocation": 1}}
    raw_kinds = [e["type"] for e in events(render("perplexity-agent", f"sources={sources}"))]
    assert raw_kinds.count("response.reasoning.search_results") == (3 if "grow" in sources else 1)
    assert "response.output_text.annotation.added" not in raw_kinds


# --------------------------------------------------------------------------------------------
# Ends and faults
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_finish_length_is_an_incomplete_response(dialect: str) -> None:
    """finish=length ends with `response.incomplete` (max_output_tokens): finish `length`."""
    raw = render(dialect, "finish=length chunks=2")
    final = events(raw)[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    got = read(dialect, "finish=length chunks=2")
    assert got.failure is None
    assert got.meta["finish_reason"] == "length"


@pytest.mark.parametrize("dialect", DIALECTS)
def test_finish_0_leaves_out_the_end_so_eof_is_interrupted(dialect: str) -> None:
    """finish=0 sends no terminal event: the gateway reads the EOF as `stream_interrupted`."""
    got = read(dialect, "finish=0 chunks=2")
    assert got.text == "".join(text_chunks(MARS_ANSWER.text, 2))
    assert got.failure is not None
    assert got.failure.code is ErrorCode.STREAM_INTERRUPTED


def test_done_1_adds_a_done_sentinel_the_gateway_ignores() -> None:
    """done=1 appends `data: [DONE]` after the terminal event; the answer is unchanged."""
    raw = render("openai-responses", "done=1 chunks=2")
    assert datas(raw, LF)[-1] == "[DONE]"
    assert read("openai-responses", "done=1 chunks=2").failure is None


@pytest.mark.parametrize("dialect", DIALECTS)
def test_fault_error_is_a_retryable_upstream_error(dialect: str) -> None:
    """fault=error: OpenAI's `error` event then `response.failed` (Perplexity: its
    `response.failed`); the gateway stops at the first with a retryable `upstream_error`."""
    raw = render(dialect, "chunks=3 fault=error after=1")
    kinds = [e["type"] for e in events(raw)]
    wanted = ["error", "response.failed"] if dialect == "openai-responses" else ["response.failed"]
    assert kinds[-len(wanted) :] == wanted
    got = read(dialect, "chunks=3 fault=error after=1")
    assert got.text == text_chunks(MARS_ANSWER.text, 3)[0]
    assert got.failure is not None
    assert got.failure.code is ErrorCode.UPSTREAM_ERROR
    assert got.failure.retryable is True
    assert "overloaded" in got.failure.message


@pytest.mark.parametrize("dialect", DIALECTS)
def test_fault_malformed_is_a_protocol_error(dialect: str) -> None:
    """fault=malformed: an event whose JSON is cut short is `upstream_protocol_error`."""
    got = read(dialect, "chunks=3 fault=malformed after=1")
    assert got.failure is not None
    assert got.failure.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


@pytest.mark.parametrize("dialect", DIALECTS)
def test_fault_giant_is_one_valid_event_the_answer_survives(dialect: str) -> None:
    """fault=giant: one valid event of about `size` bytes, which the gateway ignores; the
    answer completes."""
    raw = render(dialect, "chunks=2 fault=giant after=1 size=20000")
    assert max(len(d) for d in datas(raw, LF)) >= 20000
    got = read(dialect, "chunks=2 fault=giant after=1 size=20000")
    assert got.failure is None
    assert got.text == "".join(text_chunks(MARS_ANSWER.text, 2))


@pytest.mark.parametrize(
    ("dialect", "directive", "key"),
    [
        ("openai-responses", "reasoning=think", "reasoning"),
        ("openai-responses", "concise=1", "concise"),
        ("openai-responses", "refusal=1", "refusal"),
        ("perplexity-agent", "reasoning=summary", "reasoning"),
        ("events", "finish=length", "finish"),
        ("perplexity", "reasoning=summary", "reasoning"),
    ],
)
def test_knobs_a_format_cannot_honour_are_refused(dialect: str, directive: str, key: str) -> None:
    """Typed parts the API has no shape for, and finish=length where no format says it, are
    refused naming the knob."""
    _, knobs = parse_directive(f"[[mock {directive}]]")
    with pytest.raises(DirectiveError) as info:
        validate_for_dialect(knobs, dialect)
    assert info.value.key == key


# --------------------------------------------------------------------------------------------
# Requests, keys and error bodies
# --------------------------------------------------------------------------------------------


def test_read_request_takes_input_instructions_model_and_stream() -> None:
    """`input` (a string or items), `instructions`, `model` and `stream` are the request the
    mock reads; function call outputs are tool turns, function calls no turn."""
    body = {
        "model": "gpt-5",
        "stream": True,
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": "Hi"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello"}],
            },
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "42"},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Why?"}],
            },
        ],
    }
    request = _ResponsesFormatter.read_request(body, None)
    assert request.turns == (
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello"),
        ("tool", "42"),
        ("user", "Why?"),
    )
    assert (request.model, request.stream) == ("gpt-5", True)
    request = _ResponsesFormatter.read_request({"input": "Just this"}, None)
    assert (request.turns, request.model, request.stream) == ((("user", "Just this"),), None, False)


@pytest.mark.parametrize("value", [None, 5, [1], {"role": "user"}])
def test_read_request_refuses_input_that_is_not_a_string_or_items(value: Any) -> None:
    """An `input` missing or of another shape is a 400 naming `input`."""
    with pytest.raises(BadRequest) as info:
        _ResponsesFormatter.read_request({"model": "m", "input": value}, None)
    assert info.value.param == "input"


def test_agent_read_request_needs_a_model_models_or_preset() -> None:
    """The Agent API's model is `model`, else the first of `models`, else the `preset`; with
    none of them it is a 400 naming `model`."""
    read_request = _PerplexityAgentFormatter.read_request
    assert read_request({"input": "q", "model": "openai/gpt-5"}, None).model == "openai/gpt-5"
    assert read_request({"input": "q", "models": ["xai/grok-4", "x"]}, None).model == "xai/grok-4"
    assert read_request({"input": "q", "preset": "pro-search"}, None).model == "pro-search"
    with pytest.raises(BadRequest) as info:
        read_request({"input": "q"}, None)
    assert info.value.param == "model"


def test_keys_and_error_bodies() -> None:
    """Both APIs carry the key as a Bearer token; OpenAI's error body has `message`, `type`,
    `param` and a string-or-null `code`, Perplexity's `message`, `type` and `code`."""
    for fmt in (_ResponsesFormatter, _PerplexityAgentFormatter):
        assert fmt.api_key({"Authorization": "Bearer sk-1"}) == "sk-1"
        assert fmt.api_key({}) is None
    assert _ResponsesFormatter.error_json(400, "invalid_request_error", "bad", "input") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "input", "code": None}
    }
    body, content_type = error_body(429, "json", dialect="openai-responses")
    assert content_type == "application/json"
    assert orjson.loads(body)["error"]["code"] == "rate_limit_exceeded"
    body, _ = error_body(500, "json", "boom", dialect="perplexity-agent")
    assert orjson.loads(body) == {
        "error": {"message": "boom", "type": "server_error", "code": "server_error"}
    }


# --------------------------------------------------------------------------------------------
# Loopback
# --------------------------------------------------------------------------------------------


def responses_body(question: str, **extra: Any) -> bytes:
    return orjson.dumps({"model": "gpt-5-mini", "input": question, "stream": True, **extra})


@pytest.mark.parametrize("path", ["/openai-responses", "/responses", "/v1/responses"])
async def test_openai_routes_stream_responses_events(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str
) -> None:
    """Each OpenAI Responses route streams the answer to a Responses request body."""
    async with session.post(
        url(mock, path),
        data=responses_body(f"{MARS} [[mock chunks=2]]"),
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
    got = events(raw)
    assert got[-1]["type"] == "response.completed"
    assert got[0]["response"]["model"] == "gpt-5-mini"
    deltas = [e["delta"] for e in got if e["type"] == "response.output_text.delta"]
    assert deltas == text_chunks(MARS_ANSWER.text, 2)
    assert mock.records[-1].outcome == "completed"


async def test_agent_route_streams_and_refuses_a_request_without_a_model(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """/perplexity-agent streams for a preset and answers a request naming no model with a
    400 in Perplexity's error shape."""
    headers = {"Content-Type": "application/json"}
    body = orjson.dumps(
        {"preset": "pro-search", "input": f"{MARS} [[mock chunks=1]]", "stream": True}
    )
    async with session.post(url(mock, "/perplexity-agent"), data=body, headers=headers) as resp:
        assert resp.status == 200
        got = events(await resp.read())
    assert got[0]["response"]["model"] == "pro-search"
    assert got[-1]["type"] == "response.completed"
    body = orjson.dumps({"input": "hi", "stream": True})
    async with session.post(url(mock, "/perplexity-agent"), data=body, headers=headers) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "invalid_request_error"
    assert "model" in error["message"]
