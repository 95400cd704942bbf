"""The wire formats (gateway/mock/formats/): stream plans, then each dialect's events as a real
client reads them over loopback."""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from gateway.mock.answers import text_chunks
from gateway.mock.formats import (
    Emit,
    Fault,
    StreamSpec,
    keepalive_comment,
    keepalive_offsets,
    plan_stream,
)
from gateway.mock.knobs import GIANT_DEFAULT_SIZE, parse_directive
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
