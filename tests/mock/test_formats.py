"""The wire formats (gateway/mock/formats/): stream plans, then each dialect's events as a real
client reads them over loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.mock.answers import choose_answer, text_chunks
from gateway.mock.formats import (
    Emit,
    Fault,
    StreamSpec,
    keepalive_comment,
    keepalive_offsets,
    plan_stream,
)
from gateway.mock.knobs import GIANT_DEFAULT_SIZE, parse_directive
from gateway.mock.script import (
    REFUSAL_TEXT,
    other_answer,
    reasoning_text,
    think_block,
    tool_calls,
)
from gateway.mock.server import MockUpstream
from tests.mock.conftest import (
    CRLF,
    LF,
    MARS,
    MARS_ANSWER,
    chunks_json,
    data_of,
    datas,
    fetch,
    post,
    read_until,
    sse_blocks,
    url,
)

# --------------------------------------------------------------------------------------------
# Pure: stream plans and heartbeats
# --------------------------------------------------------------------------------------------


def test_plan_stream_clamps_the_fault_position_and_stops_after_a_transport_fault() -> None:
    """A fault asked after more chunks than exist fires after the last chunk and ends the plan."""
    _, knobs = parse_directive("[[mock chunks=2 fault=reset after=9]]")
    spec = StreamSpec(
        dialect="perplexity",
        model="sonar",
        answer=MARS_ANSWER,
        pieces=tuple(text_chunks(MARS_ANSWER.text, 2)),
        prompt_tokens=5,
        knobs=knobs,
    )
    steps = list(plan_stream(spec))
    assert [s.kind for s in steps] == ["text", "text", "reset"]
    assert isinstance(steps[-1], Fault)
    assert all(isinstance(s, Emit) for s in steps[:-1])


def test_plan_stream_ends_with_the_endless_fault_after_k_chunks() -> None:
    """fault=endless is a transport fault: the plan stops at it after K text chunks."""
    _, knobs = parse_directive("[[mock chunks=4 fault=endless after=1]]")
    spec = StreamSpec(
        dialect="openai",
        model="gpt-4o",
        answer=MARS_ANSWER,
        pieces=tuple(text_chunks(MARS_ANSWER.text, 4)),
        prompt_tokens=5,
        knobs=knobs,
    )
    steps = list(plan_stream(spec))
    assert [s.kind for s in steps] == ["meta", "text", "endless"]
    assert steps[-1] == Fault("endless")


def test_keepalive_offsets_fall_strictly_inside_the_wait() -> None:
    """Heartbeats come every interval while a wait lasts, none at its very end."""
    assert keepalive_offsets(0.25, 0.1) == pytest.approx([0.1, 0.2])
    assert keepalive_offsets(0.3, 0.1) == pytest.approx([0.1, 0.2])
    assert keepalive_offsets(0.12, 0.025) == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert keepalive_offsets(0.1, 0.1) == []
    assert keepalive_offsets(0.05, 0.1) == []
    assert keepalive_offsets(0.0, 0.1) == []
    with pytest.raises(ValueError, match="positive"):
        keepalive_offsets(1.0, 0.0)


def test_keepalive_comment_is_a_comment_block_in_the_stream_line_ending() -> None:
    """The heartbeat is an SSE comment followed by a blank line, in the dialect's EOL."""
    assert keepalive_comment(LF) == b": ping\n\n"
    assert keepalive_comment(CRLF) == b": ping\r\n\r\n"


# --------------------------------------------------------------------------------------------
# Loopback: the three dialects' wire shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/perplexity", "/chat/completions"])
async def test_perplexity_stream_has_the_real_wire_shape(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str
) -> None:
    """Perplexity chunks are fat, cumulative, CRLF-separated, and end in a clean EOF, no [DONE]."""
    status, headers, raw = await fetch(session, url(mock, path), f"{MARS} [[mock chunks=3]]")
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert b"\n\n" not in raw
    assert b"[DONE]" not in raw
    events = chunks_json(raw, CRLF)
    assert len(events) == 4
    pieces = text_chunks(MARS_ANSWER.text, 3)
    for i, event in enumerate(events):
        assert event["object"] == "chat.completion"
        assert event["model"] == "sonar"
        assert event["id"] == events[0]["id"]
        assert isinstance(event["created"], int)
        assert event["citations"] == MARS_ANSWER.citations
        choice = event["choices"][0]
        assert choice["index"] == 0
        done = min(i + 1, 3)
        assert choice["message"] == {"role": "assistant", "content": "".join(pieces[:done])}
        usage = event["usage"]
        assert usage["completion_tokens"] == done
        assert usage["total_tokens"] == usage["prompt_tokens"] + done
    assert [e["choices"][0]["delta"]["content"] for e in events] == [*pieces, ""]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, None, "stop"]
    assert "search_results" not in events[0]
    assert [r["url"] for r in events[-1]["search_results"]] == MARS_ANSWER.citations
    assert {"title", "url", "date"} <= events[-1]["search_results"][0].keys()
    rec = mock.records[-1]
    assert (rec.path, rec.status, rec.chunks_sent, rec.outcome) == (path, 200, 3, "completed")
    assert rec.ended.is_set()


@pytest.mark.parametrize("path", ["/openai", "/v1/chat/completions"])
async def test_openai_stream_has_the_real_wire_shape(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str
) -> None:
    """OpenAI chunks are LF-separated: role chunk, content deltas, finish chunk, then [DONE]."""
    status, _, raw = await fetch(
        session, url(mock, path), f"{MARS} [[mock chunks=2]]", model="gpt-4o"
    )
    assert status == 200
    assert b"\r" not in raw
    all_data = datas(raw, LF)
    assert all_data[-1] == "[DONE]"
    events = [orjson.loads(d) for d in all_data[:-1]]
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "gpt-4o" for e in events)
    assert all("usage" not in e for e in events)
    assert [e["choices"][0]["delta"] for e in events] == [
        {"role": "assistant", "content": ""},
        *({"content": p} for p in text_chunks(MARS_ANSWER.text, 2)),
        {},
    ]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, None, "stop"]
    assert mock.records[-1].outcome == "completed"


async def test_openai_include_usage_adds_a_usage_chunk_before_done(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """include_usage makes usage null on every chunk but a last, choices-less one that has it."""
    _, _, raw = await fetch(
        session,
        url(mock, "/openai"),
        "hi [[mock chunks=2]]",
        stream_options={"include_usage": True},
    )
    events = chunks_json(raw, LF)
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == []
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + 2
    assert datas(raw, LF)[-1] == "[DONE]"


async def test_events_stream_has_text_chunks_then_a_done_event(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """The events dialect sends one text_chunk event per word and a done event with everything."""
    _, _, raw = await fetch(session, url(mock, "/events"), f"{MARS} [[mock chunks=3]]")
    blocks = sse_blocks(raw, LF)
    pieces = text_chunks(MARS_ANSWER.text, 3)
    assert [b[0] for b in blocks] == [("event", "text_chunk")] * 3 + [("event", "done")]
    assert raw.startswith(b'event: text_chunk\ndata: {"type":"text_chunk","text":')
    bodies = [orjson.loads(d) for d in datas(raw, LF)]
    assert bodies[:3] == [{"type": "text_chunk", "text": p} for p in pieces]
    done = bodies[3]
    assert done["type"] == "done"
    assert done["text"] == "".join(pieces)
    assert done["citations"] == MARS_ANSWER.citations
    assert done["usage"]["completion_tokens"] == 3


# --------------------------------------------------------------------------------------------
# Loopback: knobs a dialect cannot honour
# --------------------------------------------------------------------------------------------


async def test_finish_knob_is_rejected_where_it_means_nothing(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """finish=0 on the events dialect (which has no finish chunk) is a 400."""
    status, _, raw = await fetch(session, url(mock, "/events"), "hi [[mock finish=0]]")
    assert status == 400
    assert orjson.loads(raw)["error"]["param"] == "finish"


@pytest.mark.parametrize("path", ["/perplexity", "/chat/completions"])
async def test_fast_is_refused_on_perplexity_routes(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str
) -> None:
    """Perplexity chunks repeat the whole text so far: fast=1 is a 400 naming the key there."""
    status, _, raw = await fetch(session, url(mock, path), "hi [[mock fast=1]]")
    assert status == 400
    assert orjson.loads(raw)["error"]["param"] == "fast"


# --------------------------------------------------------------------------------------------
# Loopback: HTTP error bodies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "content_type", "needle"),
    [
        ("json", "application/json", b'"code":503'),
        ("html", "text/html", b"<center>openresty/"),
        ("text", "text/plain", b"503 Service Unavailable"),
    ],
)
async def test_status_knob_answers_with_an_error_body(
    mock: MockUpstream,
    session: aiohttp.ClientSession,
    kind: str,
    content_type: str,
    needle: bytes,
) -> None:
    """status=NNN answers that status with a JSON, HTML or text error body instead of a stream."""
    content = f"hi [[mock status=503 body={kind} tag=err]]"
    status, headers, raw = await fetch(session, url(mock, "/perplexity"), content)
    assert status == 503
    assert headers["Content-Type"].startswith(content_type)
    assert needle in raw
    assert "Retry-After" not in headers
    rec = mock.record("err")
    assert (rec.status, rec.outcome) == (503, "error_status")


async def test_json_error_body_is_openai_perplexity_style(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """The JSON error body is {"error": {message, type, code}} with an integer code."""
    _, _, raw = await fetch(session, url(mock, "/openai"), "hi [[mock status=429]]")
    error = orjson.loads(raw)["error"]
    assert error["code"] == 429
    assert error["type"] == "rate_limit_exceeded"
    assert error["message"]


# --------------------------------------------------------------------------------------------
# Loopback: faults that are events (malformed, giant)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "eol"), [("/perplexity", CRLF), ("/events", LF)])
async def test_malformed_fault_sends_one_bad_event_then_continues(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str, eol: bytes
) -> None:
    """fault=malformed injects one event with invalid JSON and the stream then ends normally."""
    content = f"{MARS} [[mock chunks=3 fault=malformed after=1]]"
    status, _, raw = await fetch(session, url(mock, path), content)
    assert status == 200
    all_data = datas(raw, eol)
    bad = []
    for i, d in enumerate(all_data):
        try:
            orjson.loads(d)
        except orjson.JSONDecodeError:
            bad.append(i)
    assert bad == [1]
    assert len(all_data) == 5  # 3 text + 1 malformed + finish/done
    assert mock.records[-1].outcome == "completed"


@pytest.mark.parametrize(("path", "eol"), [("/perplexity", CRLF), ("/openai", LF), ("/events", LF)])
async def test_giant_fault_sends_one_event_of_the_asked_size(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str, eol: bytes
) -> None:
    """fault=giant size=B sends one valid JSON event of exactly B data bytes, then continues."""
    content = "hi [[mock chunks=3 fault=giant after=1 size=300000]]"
    _, _, raw = await fetch(session, url(mock, path), content)
    all_data = datas(raw, eol)
    sizes = [len(d.encode()) for d in all_data]
    assert sizes.count(300_000) == 1
    giant = orjson.loads(all_data[sizes.index(300_000)])
    assert set(giant["padding"]) == {"x"}
    assert max(s for s in sizes if s != 300_000) < 5000
    assert mock.records[-1].outcome == "completed"
    assert mock.records[-1].chunks_sent == 3


async def test_giant_fault_defaults_to_8_mib(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """Without size, the giant event carries 8 MiB of data."""
    _, _, raw = await fetch(session, url(mock, "/openai"), "hi [[mock chunks=1 fault=giant]]")
    sizes = [len(d.encode()) for d in datas(raw, LF)]
    assert GIANT_DEFAULT_SIZE == 8 * 1024 * 1024
    assert sizes.count(GIANT_DEFAULT_SIZE) == 1


# --------------------------------------------------------------------------------------------
# Loopback: framing knobs
# --------------------------------------------------------------------------------------------


async def test_crlf_knob_overrides_the_dialect_separator(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """crlf=0 makes Perplexity use LF, and crlf=1 makes the others use CRLF on every line."""
    _, _, raw = await fetch(session, url(mock, "/perplexity"), "hi [[mock chunks=2 crlf=0]]")
    assert b"\r" not in raw
    assert len(datas(raw, LF)) == 3
    _, _, raw = await fetch(session, url(mock, "/openai"), "hi [[mock chunks=2 crlf=1]]")
    assert b"\n\n" not in raw
    assert datas(raw, CRLF)[-1] == "[DONE]"
    _, _, raw = await fetch(session, url(mock, "/events"), "hi [[mock chunks=1 crlf=1]]")
    assert raw.startswith(b"event: text_chunk\r\ndata: ")
    assert raw.count(b"\n") == raw.count(b"\r\n")


async def test_done_knob_adds_or_removes_the_done_marker(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """done=0 drops OpenAI's [DONE] and the done event; done=1 adds [DONE] to Perplexity."""
    _, _, raw = await fetch(session, url(mock, "/openai"), "hi [[mock chunks=1 done=0]]")
    assert b"[DONE]" not in raw
    assert orjson.loads(datas(raw, LF)[-1])["choices"][0]["finish_reason"] == "stop"
    _, _, raw = await fetch(session, url(mock, "/perplexity"), "hi [[mock chunks=1 done=1]]")
    tail = datas(raw, CRLF)[-2:]
    assert tail[1] == "[DONE]"
    assert orjson.loads(tail[0])["choices"][0]["finish_reason"] == "stop"
    _, _, raw = await fetch(session, url(mock, "/events"), "hi [[mock chunks=1 done=0]]")
    assert b"event: done" not in raw
    assert len(datas(raw, LF)) == 1


@pytest.mark.parametrize(("path", "eol"), [("/perplexity", CRLF), ("/openai", LF)])
async def test_finish_zero_omits_the_finish_reason_chunk(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str, eol: bytes
) -> None:
    """finish=0 leaves out the finish_reason chunk (and with it Perplexity's search_results)."""
    _, _, raw = await fetch(session, url(mock, path), "hi [[mock chunks=2 finish=0]]")
    events = chunks_json(raw, eol)
    assert all(e["choices"][0]["finish_reason"] is None for e in events)
    assert b"search_results" not in raw
    assert (b"[DONE]" in raw) == (path == "/openai")


async def test_comments_knob_sends_a_ping_before_each_chunk(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """comments=1 puts a `: ping` comment block before every event."""
    _, _, raw = await fetch(session, url(mock, "/openai"), "hi [[mock chunks=2 comments=1]]")
    blocks = sse_blocks(raw, LF)
    assert blocks[0::2] == [[("", "ping")]] * (len(blocks) // 2)
    assert [data_of(b) is not None for b in blocks[1::2]] == [True] * (len(blocks) // 2)
    assert data_of(blocks[-1]) == "[DONE]"


# --------------------------------------------------------------------------------------------
# Loopback: scripted typed parts (reasoning, tool calls, sources, progress, refusal, choices)
# --------------------------------------------------------------------------------------------

SKY = "Why is the sky blue?"
SKY_ANSWER = choose_answer(SKY)
REASONING = reasoning_text(SKY_ANSWER)


async def scripted(
    session: aiohttp.ClientSession, mock: MockUpstream, path: str, knobs: str, **extra: Any
) -> list[dict[str, Any]]:
    """The JSON chunks of a scripted stream (CRLF on the Perplexity routes)."""
    status, _, raw = await fetch(session, url(mock, path), f"{SKY} [[mock {knobs}]]", **extra)
    assert status == 200, raw
    return chunks_json(raw, CRLF if path == "/perplexity" else LF)


def deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


def reasoning_and_text(delta: dict[str, Any], shape: str) -> tuple[str, str]:
    """(reasoning, text) one delta carries, read the way each provider's shape says."""
    if shape == "mistral":
        content = delta.get("content")
        if not isinstance(content, list):
            return "", content or ""
        thinking = [t["text"] for p in content if p["type"] == "thinking" for t in p["thinking"]]
        text = [p["text"] for p in content if p["type"] == "text"]
        return "".join(thinking), "".join(text)
    field = {"reasoning_content": "reasoning_content", "reasoning": "reasoning"}.get(
        shape, "reasoning"
    )
    return delta.get(field) or "", delta.get("content") or ""


@pytest.mark.parametrize("shape", ["reasoning_content", "reasoning", "details", "mistral"])
async def test_openai_reasoning_comes_first_in_each_providers_shape(
    mock: MockUpstream, session: aiohttp.ClientSession, shape: str
) -> None:
    """Each reasoning shape streams the reasoning, then the answer, in its own fields; usage
    counts the reasoning tokens."""
    chunks = await scripted(
        session,
        mock,
        "/openai",
        f"reasoning={shape} chunks=4",
        stream_options={"include_usage": True},
    )
    read = [reasoning_and_text(d, shape) for d in deltas(chunks)]
    assert "".join(r for r, _ in read) == REASONING
    assert "".join(t for _, t in read) == "".join(text_chunks(SKY_ANSWER.text, 4))
    kinds = "".join("r" if r else "t" for r, t in read if r or t)
    assert kinds == "r" * len(text_chunks(REASONING)) + "t" * 4
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    reasoning_tokens = len(text_chunks(REASONING))
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == reasoning_tokens + 4
    assert usage["completion_tokens_details"] == {"reasoning_tokens": reasoning_tokens}
    first = deltas(chunks)[1]
    if shape == "reasoning_content":  # DeepSeek: the other field is null, never absent
        assert deltas(chunks)[0] == {"role": "assistant", "content": None, "reasoning_content": ""}
        assert first["content"] is None
        assert deltas(chunks)[-1] == {"content": "", "reasoning_content": None}
    elif shape == "details":  # OpenRouter: both fields, a reasoning.text detail
        assert first["reasoning_details"] == [
            {"type": "reasoning.text", "text": first["reasoning"], "format": "unknown", "index": 0}
        ]
    elif shape == "mistral":
        assert first["content"][0]["type"] == "thinking"
        assert deltas(chunks)[-1] == {"content": ""}
    else:
        assert first == {"reasoning": first["reasoning"]}


@pytest.mark.parametrize("path", ["/perplexity", "/openai"])
@pytest.mark.parametrize("shape", ["think", "think_open"])
async def test_a_think_block_leads_the_content(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str, shape: str
) -> None:
    """reasoning=think puts <think>reasoning</think> at the start of the content, the answer
    after it; think_open never closes it and sends no answer; the stream ends normally."""
    chunks = await scripted(session, mock, path, f"reasoning={shape}")
    content = "".join(d.get("content") or "" for d in deltas(chunks))
    if shape == "think":
        assert content == think_block(SKY_ANSWER) + SKY_ANSWER.text
        assert content.startswith("<think>\n")
        assert "\n</think>\n\n" in content
    else:
        assert content == think_block(SKY_ANSWER, closed=False)
        assert "</think>" not in content
    assert next(d["content"] for d in deltas(chunks) if d.get("content")) == "<think>"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    if path == "/perplexity":
        assert chunks[-1]["choices"][0]["message"]["content"] == content


@pytest.mark.parametrize("path", ["/perplexity", "/openai"])
async def test_think_split_cuts_the_tags_at_every_byte(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str
) -> None:
    """think_split=1 sends the whole content a character per delta (every tag split at every
    byte); think_split=3 splits the tags across deltas (<th + ink>)."""
    expected = think_block(SKY_ANSWER) + SKY_ANSWER.text
    chunks = await scripted(session, mock, path, "reasoning=think think_split=1")
    pieces = [d["content"] for d in deltas(chunks) if d.get("content")]
    assert pieces == list(expected)
    chunks = await scripted(session, mock, path, "reasoning=think think_split=3")
    pieces = [d["content"] for d in deltas(chunks) if d.get("content")]
    assert "".join(pieces) == expected
    assert pieces[:3] == ["<th", "ink", ">\nT"]
    assert any(p.endswith("</") or p.startswith("k>") for p in pieces)


@pytest.mark.parametrize("kind", ["1", "2", "bad_json"])
async def test_openai_tool_calls_stream_their_arguments_by_index(
    mock: MockUpstream, session: aiohttp.ClientSession, kind: str
) -> None:
    """tools=1|2|bad_json: the role chunk has content null, each call starts with its index,
    id, type and name (arguments ""), then argument fragments by index; finish tool_calls."""
    chunks = await scripted(session, mock, "/openai", f"tools={kind}")
    assert deltas(chunks)[0] == {"role": "assistant", "content": None}
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas(chunks)[1:-1]:
        assert set(delta) == {"tool_calls"}
        (call,) = delta["tool_calls"]
        if "id" in call:
            assert call["type"] == "function"
            assert call["function"]["arguments"] == ""
            calls[call["index"]] = {"id": call["id"], "name": call["function"]["name"], "args": ""}
        else:
            assert set(call) == {"index", "function"}
            calls[call["index"]]["args"] += call["function"]["arguments"]
    expected = tool_calls(parse_directive(f"[[mock tools={kind}]]")[1], "seed")
    assert [(c["name"], c["args"]) for c in calls.values()] == [
        (c.name, c.arguments) for c in expected
    ]
    assert all(c["id"].startswith("call_") and len(c["id"]) == 29 for c in calls.values())
    assert len({c["id"] for c in calls.values()}) == len(calls)
    for call in calls.values():
        if kind == "bad_json":
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(call["args"])
        else:
            assert isinstance(orjson.loads(call["args"]), dict)
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }


async def test_mistral_tool_calls_come_whole_without_index(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """tools=no_index: two whole calls in one delta, no index, Mistral's 9-character ids, the
    finish_reason in the same chunk."""
    chunks = await scripted(session, mock, "/openai", "tools=no_index")
    assert len(chunks) == 2
    assert deltas(chunks)[0] == {"role": "assistant", "content": ""}
    choice = chunks[1]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["delta"]["content"] is None
    calls = choice["delta"]["tool_calls"]
    assert [set(c) for c in calls] == [{"id", "function"}] * 2
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert all(len(c["id"]) == 9 for c in calls)
    assert [orjson.loads(c["function"]["arguments"]) for c in calls][1] == {
        "timezone": "Europe/Paris"
    }


async def test_reasoning_then_tool_calls_without_text(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """DeepSeek's tool turn: reasoning_content first, then the call, and no answer text."""
    chunks = await scripted(session, mock, "/openai", "reasoning=reasoning_content tools=1")
    read = [reasoning_and_text(d, "reasoning_content") for d in deltas(chunks)]
    assert "".join(r for r, _ in read) == REASONING
    assert "".join(t for _, t in read) == ""
    assert "tool_calls" in deltas(chunks)[-2]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_perplexity_sources_repeat_on_every_chunk(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """sources=N: N citations and N search_results (title, url, date, last_updated, snippet,
    source) on every chunk, the answer's own first; grow:N adds one per chunk; 0 is none."""
    chunks = await scripted(session, mock, "/perplexity", "chunks=3 sources=5")
    urls = [c["citations"] for c in chunks]
    assert all(len(u) == 5 for u in urls)
    assert urls[0][:3] == SKY_ANSWER.citations
    assert all([r["url"] for r in c["search_results"]] == c["citations"] for c in chunks)
    assert set(chunks[0]["search_results"][4]) == {
        "title",
        "url",
        "date",
        "last_updated",
        "snippet",
        "source",
    }
    chunks = await scripted(session, mock, "/perplexity", "chunks=6 sources=grow:4")
    assert [len(c["citations"]) for c in chunks] == [1, 2, 3, 4, 4, 4, 4]
    chunks = await scripted(session, mock, "/perplexity", "chunks=2 sources=0")
    assert all(c["citations"] == [] and c["search_results"] == [] for c in chunks)


@pytest.mark.parametrize("how", ["knob", "request"])
async def test_perplexity_concise_mode_streams_progress_then_the_answer(
    mock: MockUpstream, session: aiohttp.ClientSession, how: str
) -> None:
    """concise=1 or the request's stream_mode "concise": chat.reasoning chunks with one step
    each (a web search, a URL fetch, a code run), chat.reasoning.done with the search results,
    chat.completion.chunk deltas, chat.completion.done with the whole message; no citations."""
    if how == "knob":
        chunks = await scripted(session, mock, "/perplexity", "chunks=3 concise=1")
    else:
        chunks = await scripted(session, mock, "/perplexity", "chunks=3", stream_mode="concise")
    assert [c["object"] for c in chunks] == ["chat.reasoning"] * 3 + [
        "chat.reasoning.done",
        *["chat.completion.chunk"] * 3,
        "chat.completion.done",
    ]
    steps = [c["choices"][0]["delta"]["reasoning_steps"][0] for c in chunks[:3]]
    assert [s["type"] for s in steps] == ["web_search", "fetch_url_content", "execute_python"]
    assert all(s["thought"] for s in steps)
    assert steps[0]["web_search"]["search_keywords"]
    assert steps[1]["fetch_url_content"]["contents"][0]["url"] == SKY_ANSWER.citations[0]
    assert all(c["type"] == "message" for c in chunks[:3])
    done = chunks[3]
    assert [r["url"] for r in done["search_results"]] == SKY_ANSWER.citations
    assert done["usage"]["completion_tokens"] == 0
    assert done["choices"][0]["message"]["reasoning_steps"] == steps
    text = [c["choices"][0]["delta"]["content"] for c in chunks[4:7]]
    assert text == text_chunks(SKY_ANSWER.text, 3)
    assert all(c["choices"][0]["message"]["content"] == "" for c in chunks[4:7])
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["choices"][0]["message"]["content"] == "".join(text)
    assert final["usage"]["cost"]["total_cost"] > 0
    assert all("citations" not in c for c in chunks)


async def test_stream_mode_is_checked_and_full_changes_nothing(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """stream_mode "full" is the default shape, another value is a 400 naming it, and the
    OpenAI routes ignore the field (the API has none)."""
    _, _, plain = await fetch(session, url(mock, "/perplexity"), f"{SKY} [[mock chunks=2]]")
    _, _, full = await fetch(
        session, url(mock, "/perplexity"), f"{SKY} [[mock chunks=2]]", stream_mode="full"
    )
    assert [c["object"] for c in chunks_json(full, CRLF)] == ["chat.completion"] * 3
    assert len(full) == len(plain)
    status, _, raw = await fetch(session, url(mock, "/perplexity"), SKY, stream_mode="brief")
    assert (status, orjson.loads(raw)["error"]["param"]) == (400, "stream_mode")
    chunks = await scripted(session, mock, "/openai", "chunks=2", stream_mode="concise")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


async def test_openai_refusal_streams_refusal_deltas(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """refusal=1: role chunk with content null and refusal "", the text in delta.refusal."""
    chunks = await scripted(session, mock, "/openai", "refusal=1")
    assert deltas(chunks)[0] == {"role": "assistant", "content": None, "refusal": ""}
    assert all(set(d) == {"refusal"} for d in deltas(chunks)[1:-1])
    assert "".join(d["refusal"] for d in deltas(chunks)[1:-1]) == REFUSAL_TEXT
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert mock.records[-1].chunks_sent == len(text_chunks(REFUSAL_TEXT))


async def test_openai_choices_interleave_each_with_its_finish(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """choices=3: each choice's role chunk, its pieces round-robin, a finish chunk each; choice
    0 is the answer, the others other answers."""
    chunks = await scripted(session, mock, "/openai", "choices=3 chunks=4")
    texts: dict[int, str] = {0: "", 1: "", 2: ""}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
    assert texts[0] == "".join(text_chunks(SKY_ANSWER.text, 4))
    for k in (1, 2):
        assert texts[k] == "".join(text_chunks(other_answer(SKY_ANSWER, k).text, 4))
        assert texts[k] != texts[0]
    assert [c["choices"][0]["index"] for c in chunks[:6]] == [0, 0, 1, 1, 2, 2]
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks[-3:]]
    assert finishes == [(0, "stop"), (1, "stop"), (2, "stop")]
    assert mock.records[-1].chunks_sent == 4


@pytest.mark.parametrize(
    ("path", "directive", "key"),
    [
        ("/perplexity", "reasoning=mistral", "reasoning"),
        ("/perplexity", "reasoning=reasoning_content", "reasoning"),
        ("/perplexity", "tools=1", "tools"),
        ("/perplexity", "refusal=1", "refusal"),
        ("/perplexity", "choices=2", "choices"),
        ("/openai", "concise=1", "concise"),
        ("/openai", "sources=3", "sources"),
        ("/events", "reasoning=think", "reasoning"),
        ("/events", "sources=1", "sources"),
    ],
)
async def test_typed_parts_are_refused_where_the_api_has_none(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str, directive: str, key: str
) -> None:
    """A part a route's API never sends is a 400 naming the knob and where it applies."""
    status, _, raw = await fetch(session, url(mock, path), f"hi [[mock {directive}]]")
    assert status == 400
    error = orjson.loads(raw)["error"]
    assert error["param"] == key
    assert "applies to" in error["message"]


async def test_scripted_streams_keep_faults_and_count_answer_text_only(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """after=K counts every event after the preamble (reasoning included); chunks_sent counts
    the answer's text events only."""
    chunks = await scripted(session, mock, "/openai", "reasoning=reasoning fault=eof after=5")
    assert len(chunks) == 6
    assert all("reasoning" in d for d in deltas(chunks)[1:])
    assert mock.records[-1].chunks_sent == 0
    await scripted(session, mock, "/openai", "reasoning=reasoning chunks=3")
    assert mock.records[-1].chunks_sent == 3
    async with post(
        session, url(mock, "/openai"), f"{SKY} [[mock tools=2 fault=stall after=3 tag=st]]"
    ) as resp:
        raw = await read_until(resp, b"\n\n", 4)
        rec = await mock.wait_request("st")
        await asyncio.wait_for(rec.fault_fired.wait(), 5)
    assert len(chunks_json(raw, LF)) == 4


async def test_split_cuts_a_scripted_stream_without_changing_it(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """split= applies to any stream: the same events arrive, in writes of the asked sizes."""

    def stable(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in c.items() if k not in ("id", "created")} for c in chunks]

    plain = await scripted(session, mock, "/perplexity", "reasoning=think chunks=5")
    split = await scripted(session, mock, "/perplexity", "reasoning=think chunks=5 split=random:3")
    assert stable(split) == stable(plain)
    sizes = mock.records[-1].write_sizes
    assert sizes is not None
    assert min(sizes) >= 1
    assert len(sizes) > len(split)
