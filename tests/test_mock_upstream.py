"""Tests for the mock upstream: pure answer/directive/format code, then real loopback streams."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDictProxy

from gateway.mock.upstream import (
    ANSWERS,
    ENDLESS_WRITE_BYTES,
    GIANT_DEFAULT_SIZE,
    DirectiveError,
    Emit,
    Fault,
    Knobs,
    MockUpstream,
    StreamSpec,
    choose_answer,
    keepalive_comment,
    keepalive_offsets,
    parse_directive,
    plan_stream,
    serve_forever,
    text_chunks,
)

CRLF = b"\r\n"
LF = b"\n"
MARS = "Tell me about the planet Mars"
MARS_ANSWER = choose_answer(MARS)

# --------------------------------------------------------------------------------------------
# Helpers: a minimal SSE splitter (complete bodies only) and an HTTP client wrapper
# --------------------------------------------------------------------------------------------

Block = list[tuple[str, str]]


def sse_blocks(raw: bytes, eol: bytes) -> list[Block]:
    """Split a complete stream on blank lines; each event becomes its (field, value) lines."""
    sep = eol * 2
    assert raw.endswith(sep), raw[-60:]
    blocks: list[Block] = []
    for chunk in raw[: -len(sep)].split(sep):
        lines: Block = []
        for line in chunk.split(eol):
            name, _, value = line.decode().partition(":")
            lines.append((name, value.removeprefix(" ")))
        blocks.append(lines)
    return blocks


def data_of(block: Block) -> str | None:
    values = [value for name, value in block if name == "data"]
    return "\n".join(values) if values else None


def datas(raw: bytes, eol: bytes) -> list[str]:
    """The data of every event that has some (comment-only blocks are skipped)."""
    return [d for d in map(data_of, sse_blocks(raw, eol)) if d is not None]


def chunks_json(raw: bytes, eol: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(d) for d in datas(raw, eol) if d != "[DONE]"]


def request_body(content: str, *, model: str = "sonar", **extra: Any) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": True}
    return orjson.dumps({**body, **extra})


def post(
    session: aiohttp.ClientSession,
    url: str,
    content: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Any:
    return session.post(
        url,
        data=request_body(content, **extra),
        headers={"Content-Type": "application/json", **(headers or {})},
    )


async def fetch(
    session: aiohttp.ClientSession, url: str, content: str, **extra: Any
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with post(session, url, content, **extra) as resp:
        return resp.status, resp.headers, await resp.read()


async def read_until(resp: aiohttp.ClientResponse, marker: bytes, count: int) -> bytes:
    """Read until `marker` occurs `count` times (the body is not complete yet)."""
    raw = b""
    async with asyncio.timeout(5):
        while raw.count(marker) < count:
            raw += await resp.content.readany()
    return raw


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    upstream = MockUpstream(default_delay_ms=0)
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        yield client


def url(mock: MockUpstream, path: str) -> str:
    assert mock.base_url is not None
    return mock.base_url + path


# --------------------------------------------------------------------------------------------
# Pure: directive parser
# --------------------------------------------------------------------------------------------


def test_parse_directive_without_directive_keeps_text_and_defaults() -> None:
    """Text without a directive comes back unchanged with default knobs."""
    assert parse_directive("What is SSE?") == ("What is SSE?", Knobs())


def test_parse_directive_reads_every_knob() -> None:
    """Every documented key is parsed into its typed knob."""
    text = (
        "Q? [[mock chunks=3 delay_ms=1.5 header_delay_ms=20 fault=giant after=2 size=1000 "
        "crlf=1 bytewise=1 done=0 finish=0 comments=1 tag=t-1]]"
    )
    question, knobs = parse_directive(text)
    assert question == "Q?"
    assert knobs == Knobs(
        chunks=3,
        delay_ms=1.5,
        header_delay_ms=20.0,
        fault="giant",
        after=2,
        size=1000,
        crlf=True,
        bytewise=True,
        done=False,
        finish=False,
        comments=True,
        tag="t-1",
    )
    _, errors = parse_directive("[[mock status=429 body=html retry_after=Wed,_21_Oct_2015]]")
    assert (errors.status, errors.body, errors.retry_after) == (429, "html", "Wed, 21 Oct 2015")


def test_parse_directive_is_removed_from_anywhere_in_the_question() -> None:
    """A directive in the middle of the text is cut out and the spacing tidied."""
    question, knobs = parse_directive("What is [[mock chunks=2]] a websocket?")
    assert question == "What is a websocket?"
    assert knobs.chunks == 2
    assert parse_directive("[[mock]] hi") == ("hi", Knobs())


def test_parse_directive_names_an_unknown_key() -> None:
    """A typo in a key raises DirectiveError naming that key."""
    with pytest.raises(DirectiveError, match="'chunk'") as info:
        parse_directive("hi [[mock chunk=3]]")
    assert info.value.key == "chunk"


@pytest.mark.parametrize(
    ("directive", "key"),
    [
        ("chunks=-1", "chunks"),
        ("chunks=1.5", "chunks"),
        ("chunks=\u0661\u0662", "chunks"),
        ("chunks=1_000", "chunks"),
        ("delay_ms=inf", "delay_ms"),
        ("delay_ms=abc", "delay_ms"),
        ("delay_ms=nan", "delay_ms"),
        ("header_delay_ms=-5", "header_delay_ms"),
        ("status=99", "status"),
        ("status=204", "status"),
        ("status=429 body=xml", "body"),
        ("fault=explode", "fault"),
        ("crlf=2", "crlf"),
        ("bytewise=yes", "bytewise"),
        ("chunks", "chunks"),
        ("tag=", "tag"),
        ("chunks=1 chunks=2", "chunks"),
    ],
)
def test_parse_directive_rejects_bad_values(directive: str, key: str) -> None:
    """A bad, missing or repeated value raises DirectiveError naming the key."""
    with pytest.raises(DirectiveError) as info:
        parse_directive(f"hi [[mock {directive}]]")
    assert info.value.key == key


@pytest.mark.parametrize(
    ("directive", "key"),
    [
        ("body=html", "body"),
        ("retry_after=3", "retry_after"),
        ("after=3", "after"),
        ("fault=reset size=10", "size"),
        ("status=500 fault=reset", "fault"),
    ],
)
def test_parse_directive_rejects_knobs_that_would_do_nothing(directive: str, key: str) -> None:
    """A knob that needs a companion knob (body needs status, after needs fault) is an error."""
    with pytest.raises(DirectiveError) as info:
        parse_directive(f"[[mock {directive}]]")
    assert info.value.key == key


def test_parse_directive_reads_the_reliability_knobs() -> None:
    """keepalive_ms, ignore_close, times (with status and tag) and linger_ms are parsed."""
    _, knobs = parse_directive("[[mock fault=stall keepalive_ms=25.5 ignore_close=1]]")
    assert (knobs.fault, knobs.keepalive_ms, knobs.ignore_close) == ("stall", 25.5, True)
    _, knobs = parse_directive("[[mock fault=endless after=2]]")
    assert (knobs.fault, knobs.after) == ("endless", 2)
    _, knobs = parse_directive("[[mock status=429 retry_after=1 times=2 tag=r1 keepalive_ms=5]]")
    assert (knobs.status, knobs.times, knobs.tag, knobs.keepalive_ms) == (429, 2, "r1", 5.0)
    assert Knobs().keepalive_ms is None
    assert Knobs().ignore_close is False
    assert Knobs().times is None
    _, knobs = parse_directive("[[mock linger_ms=30]]")
    assert knobs.linger_ms == 30.0
    assert Knobs().linger_ms is None


@pytest.mark.parametrize(
    ("directive", "key"),
    [
        ("keepalive_ms=0", "keepalive_ms"),
        ("keepalive_ms=0.0", "keepalive_ms"),
        ("keepalive_ms=-5", "keepalive_ms"),
        ("keepalive_ms=1e3", "keepalive_ms"),
        ("ignore_close=2", "ignore_close"),
        ("ignore_close=true", "ignore_close"),
        ("status=429 tag=t times=0", "times"),
        ("status=429 tag=t times=-1", "times"),
        ("status=429 tag=t times=1.5", "times"),
        ("words=0", "words"),
        ("words=two", "words"),
        ("fault=endlessly", "fault"),
        ("linger_ms=0", "linger_ms"),
        ("linger_ms=soon", "linger_ms"),
        ("fast=1 linger_ms=5", "linger_ms"),
    ],
)
def test_parse_directive_rejects_bad_reliability_values(directive: str, key: str) -> None:
    """Zero or negative heartbeat periods and counts, and non-flag values, name their key."""
    with pytest.raises(DirectiveError) as info:
        parse_directive(f"hi [[mock {directive}]]")
    assert info.value.key == key


@pytest.mark.parametrize(
    ("directive", "key"),
    [
        ("times=2", "times"),
        ("times=2 tag=t", "times"),
        ("status=429 times=2", "times"),
        ("status=503 keepalive_ms=10", "keepalive_ms"),
        ("status=503 ignore_close=1", "ignore_close"),
        ("delay_ms=0 keepalive_ms=10", "keepalive_ms"),
        ("delay_ms=0 fault=eof keepalive_ms=10", "keepalive_ms"),
        ("fault=stall ignore_close=1", "ignore_close"),
        ("fault=endless size=10", "size"),
        ("status=500 fault=endless", "fault"),
    ],
)
def test_parse_directive_rejects_reliability_knobs_that_would_do_nothing(
    directive: str, key: str
) -> None:
    """times needs status and tag; heartbeats need a wait; a silent stall cannot ignore a close."""
    with pytest.raises(DirectiveError) as info:
        parse_directive(f"[[mock {directive}]]")
    assert info.value.key == key


def test_parse_directive_accepts_heartbeats_on_a_stall_without_delay() -> None:
    """delay_ms=0 with keepalive_ms is fine when a stall gives the heartbeats a wait."""
    _, knobs = parse_directive("[[mock delay_ms=0 fault=stall keepalive_ms=10 ignore_close=1]]")
    assert (knobs.delay_ms, knobs.keepalive_ms, knobs.ignore_close) == (0.0, 10.0, True)


# --------------------------------------------------------------------------------------------
# Pure: answers and stream plans
# --------------------------------------------------------------------------------------------


def test_text_chunks_are_words_with_their_following_space() -> None:
    """Chunks are single words with a trailing space (none on the last) that rebuild the text."""
    pieces = text_chunks("Hello brave  new\nworld.")
    assert pieces == ["Hello ", "brave ", "new ", "world."]
    assert "".join(text_chunks(MARS_ANSWER.text)) == MARS_ANSWER.text


def test_text_chunks_cycle_when_more_are_asked_than_there_are_words() -> None:
    """Asking for more chunks than words cycles through the words."""
    assert text_chunks("a b c", 5) == ["a ", "b ", "c ", "a ", "b"]
    assert text_chunks("a b c", 0) == []


def test_text_chunks_can_carry_several_words_each() -> None:
    """words=N makes chunks of N words; without a count they cover the text exactly once."""
    assert text_chunks("a b c d e", words=2) == ["a b ", "c d ", "e"]
    assert text_chunks("a b c", 2, words=2) == ["a b ", "c a"]
    assert text_chunks("a b c", 3, words=3) == ["a b c ", "a b c ", "a b c"]
    assert "".join(text_chunks(MARS_ANSWER.text, words=7)) == MARS_ANSWER.text
    with pytest.raises(ValueError, match="positive"):
        text_chunks("a b", 2, words=0)


def test_text_chunks_share_strings_so_huge_streams_stay_cheap() -> None:
    """Cycled chunks are the same string objects, not copies (a million chunks = references)."""
    n = len(MARS_ANSWER.text.split())
    pieces = text_chunks(MARS_ANSWER.text, 3 * n + 1)
    assert pieces[0] is pieces[n] is pieces[2 * n]
    assert len({id(p) for p in pieces}) <= n + 1


def test_choose_answer_is_topical_and_deterministic() -> None:
    """The answer matches the question's topic, and an off-topic question always gets the same."""
    assert "WebSockets" in choose_answer("How do websockets work?").text
    assert "Mars" in MARS_ANSWER.text
    assert choose_answer("zzz qqq") is choose_answer("ZZZ   qqq")


@pytest.mark.parametrize("answer", ANSWERS, ids=lambda a: a.text.split()[0])
def test_every_answer_reads_like_a_real_one(answer: Any) -> None:
    """Each canned answer has 40-80 words, 2-4 sources, and only cites sources it has."""
    assert 40 <= len(answer.text.split()) <= 80
    assert 2 <= len(answer.sources) <= 4
    cited = {int(n) for n in re.findall(r"\[(\d)\]", answer.text)}
    assert cited == set(range(1, len(answer.sources) + 1))
    assert all(s.url.startswith("https://") for s in answer.sources)


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


async def test_default_stream_is_the_whole_answer_word_by_word(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """Without knobs the whole chosen answer streams, one word per chunk."""
    _, _, raw = await fetch(session, url(mock, "/events"), MARS)
    bodies = [orjson.loads(d) for d in datas(raw, LF)]
    texts = [b["text"] for b in bodies if b["type"] == "text_chunk"]
    assert len(texts) == len(MARS_ANSWER.text.split())
    assert "".join(texts) == MARS_ANSWER.text == bodies[-1]["text"]


async def test_words_knob_puts_several_words_in_each_chunk(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """words=N gives chunks of N words each, cycling through the answer."""
    _, _, raw = await fetch(session, url(mock, "/events"), f"{MARS} [[mock chunks=3 words=4]]")
    texts = [orjson.loads(d)["text"] for d in datas(raw, LF)[:-1]]
    assert texts == text_chunks(MARS_ANSWER.text, 3, words=4)
    assert [len(t.split()) for t in texts] == [4, 4, 4]
    assert mock.records[-1].chunks_sent == 3


async def test_chunks_knob_cycles_the_answer_words(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """chunks=N gives exactly N text chunks, cycling the words beyond the answer's length."""
    n = len(MARS_ANSWER.text.split()) + 5
    _, _, raw = await fetch(session, url(mock, "/events"), f"{MARS} [[mock chunks={n}]]")
    texts = [orjson.loads(d)["text"] for d in datas(raw, LF)[:-1]]
    assert texts == text_chunks(MARS_ANSWER.text, n)
    assert mock.records[-1].chunks_sent == n


# --------------------------------------------------------------------------------------------
# Loopback: pacing and HTTP errors
# --------------------------------------------------------------------------------------------


async def test_delay_ms_paces_the_chunks(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """delay_ms puts at least that pause between consecutive chunks."""
    start = time.monotonic()
    await fetch(session, url(mock, "/perplexity"), "hi [[mock chunks=3 delay_ms=40]]")
    # 3 text chunks + the finish chunk = 3 pauses.
    assert time.monotonic() - start >= 0.11


async def test_default_delay_comes_from_the_constructor(session: aiohttp.ClientSession) -> None:
    """Without delay_ms the server's default_delay_ms paces the stream."""
    async with MockUpstream(default_delay_ms=40) as slow:
        start = time.monotonic()
        await fetch(session, url(slow, "/events"), "hi [[mock chunks=3]]")
        assert time.monotonic() - start >= 0.11


async def test_header_delay_ms_holds_back_the_response_headers(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """header_delay_ms delays the status line itself."""
    start = time.monotonic()
    async with post(session, url(mock, "/openai"), "hi [[mock header_delay_ms=80 chunks=1]]") as r:
        assert time.monotonic() - start >= 0.07
        assert r.status == 200
        await r.read()


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


async def test_retry_after_sets_the_header(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """retry_after=V sends a Retry-After header, underscores becoming spaces."""
    _, headers, _ = await fetch(
        session, url(mock, "/openai"), "hi [[mock status=429 retry_after=7]]"
    )
    assert headers["Retry-After"] == "7"
    content = "hi [[mock status=503 retry_after=Wed,_21_Oct_2015_07:28:00_GMT]]"
    _, headers, _ = await fetch(session, url(mock, "/openai"), content)
    assert headers["Retry-After"] == "Wed, 21 Oct 2015 07:28:00 GMT"


async def test_unknown_knob_is_a_400_naming_the_key(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """A typo in a directive key is answered 400 with a JSON error naming the key."""
    status, _, raw = await fetch(session, url(mock, "/events"), "hi [[mock chunk=3]]")
    assert status == 400
    error = orjson.loads(raw)["error"]
    assert "'chunk'" in error["message"]
    assert error["param"] == "chunk"
    assert (mock.records[-1].status, mock.records[-1].outcome) == (400, "error_status")


async def test_finish_knob_is_rejected_where_it_means_nothing(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """finish=0 on the events dialect (which has no finish chunk) is a 400."""
    status, _, raw = await fetch(session, url(mock, "/events"), "hi [[mock finish=0]]")
    assert status == 400
    assert orjson.loads(raw)["error"]["param"] == "finish"


async def test_malformed_requests_are_rejected(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """A non-streaming request or a body that is not JSON gets a 400 JSON error."""
    status, _, raw = await fetch(session, url(mock, "/openai"), "hi", stream=False)
    assert status == 400
    assert orjson.loads(raw)["error"]["param"] == "stream"
    async with session.post(url(mock, "/openai"), data=b"{nope") as resp:
        assert resp.status == 400
        assert "not valid JSON" in orjson.loads(await resp.read())["error"]["message"]
    assert mock.records[-1].body is None


async def test_require_key_answers_401_html_without_the_right_bearer(
    session: aiohttp.ClientSession,
) -> None:
    """With require_key, a missing or wrong key gets an HTML 401 and the right one streams."""
    async with MockUpstream(default_delay_ms=0, require_key="sk-test") as guarded:
        status, headers, raw = await fetch(session, url(guarded, "/perplexity"), "hi")
        assert status == 401
        assert headers["Content-Type"].startswith("text/html")
        assert b"401 Authorization Required" in raw
        wrong = {"Authorization": "Bearer nope"}
        async with post(session, url(guarded, "/perplexity"), "hi", headers=wrong) as resp:
            assert resp.status == 401
        right = {"Authorization": "Bearer sk-test"}
        async with post(session, url(guarded, "/perplexity"), "hi", headers=right) as resp:
            assert resp.status == 200
            await resp.read()
        assert [r.outcome for r in guarded.records] == ["error_status", "error_status", "completed"]
        assert guarded.records[-1].authorization == "Bearer sk-test"


# --------------------------------------------------------------------------------------------
# Loopback: faults
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "eol"), [("/perplexity", CRLF), ("/events", LF)])
async def test_reset_fault_is_a_payload_error_after_k_chunks(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str, eol: bytes
) -> None:
    """fault=reset aborts the connection after K chunks; the client sees a payload error."""
    received: list[bytes] = []

    async def consume(resp: aiohttp.ClientResponse) -> None:
        async for data in resp.content.iter_any():
            received.append(data)

    async with post(session, url(mock, path), "hi [[mock fault=reset after=2 tag=r]]") as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await consume(resp)
    assert b"".join(received).count(eol * 2) == 2
    rec = mock.record("r")
    await asyncio.wait_for(rec.ended.wait(), 5)
    assert (rec.outcome, rec.fault, rec.chunks_sent) == ("fault", "reset", 2)
    assert rec.fault_fired.is_set()


async def test_stall_fault_holds_until_the_client_closes(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """fault=stall sends K chunks then nothing until the client leaves, which the record shows."""
    async with post(session, url(mock, "/openai"), "hi [[mock fault=stall after=2 tag=s]]") as resp:
        rec = await mock.wait_request("s")
        await asyncio.wait_for(rec.fault_fired.wait(), 5)
        raw = await read_until(resp, LF * 2, 3)  # role chunk + 2 text chunks
        assert raw.count(LF * 2) == 3
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(resp.content.readany(), 0.05)
        assert not rec.ended.is_set()
        assert mock.open_requests == 1
        resp.close()
        await asyncio.wait_for(rec.ended.wait(), 5)
    assert (rec.outcome, rec.chunks_sent) == ("client_closed", 2)
    assert mock.open_requests == 0


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


@pytest.mark.parametrize(
    ("path", "eol", "terminal"),
    [("/perplexity", CRLF, b'"stop"'), ("/openai", LF, b"[DONE]"), ("/events", LF, b"done")],
)
async def test_eof_fault_ends_cleanly_without_a_terminal_marker(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str, eol: bytes, terminal: bytes
) -> None:
    """fault=eof ends the body cleanly after K chunks with no finish, [DONE] or done event."""
    status, _, raw = await fetch(session, url(mock, path), "hi [[mock chunks=5 fault=eof after=2]]")
    assert status == 200
    assert terminal not in raw
    assert b'"stop"' not in raw
    texts = [d for d in datas(raw, eol) if '"content":""' not in d]
    assert len(texts) == 2
    assert (mock.records[-1].outcome, mock.records[-1].chunks_sent) == ("fault", 2)


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


async def test_bytewise_delivers_the_body_in_tiny_pieces(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """bytewise=1 writes one byte at a time; reassembled, the stream (UTF-8 included) is intact."""
    reads = 0
    raw = b""
    async with post(session, url(mock, "/events"), f"{MARS} [[mock bytewise=1]]") as resp:
        async for data in resp.content.iter_any():
            reads += 1
            raw += data
    assert reads >= len(raw) // 16
    texts = [orjson.loads(d)["text"] for d in datas(raw, LF)]
    assert "".join(texts[:-1]) == MARS_ANSWER.text == texts[-1]
    assert "\u221260 °C" in MARS_ANSWER.text


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
# Loopback: observation
# --------------------------------------------------------------------------------------------


async def test_records_keep_tag_body_and_authorization(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """Each request is recorded with its tag, parsed body and Authorization header."""
    headers = {"Authorization": "Bearer k-1"}
    async with post(session, url(mock, "/openai"), "hi [[mock tag=a1]]", headers=headers) as resp:
        rec = await mock.wait_request("a1", timeout=5)
        await resp.read()
    await asyncio.wait_for(rec.ended.wait(), 5)
    assert rec is mock.record("a1")
    assert rec.authorization == "Bearer k-1"
    assert rec.body["messages"][0]["content"] == "hi [[mock tag=a1]]"
    assert rec.body["stream"] is True
    with pytest.raises(KeyError):
        mock.record("nope")
    with pytest.raises(TimeoutError):
        await mock.wait_request("nope", timeout=0.01)


async def test_wait_idle_returns_once_an_aborting_client_is_gone(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """Cancelling a reader mid-stream closes its connection, so wait_idle sees the handler end."""
    first_chunk = asyncio.Event()

    async def reader() -> None:
        async with post(session, url(mock, "/perplexity"), "hi [[mock delay_ms=20 tag=gone]]") as r:
            await r.content.readany()
            first_chunk.set()
            await r.read()

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(reader())
        await asyncio.wait_for(first_chunk.wait(), 5)
        task.cancel()
    await mock.wait_idle(timeout=5)
    rec = mock.record("gone")
    assert rec.outcome == "client_closed"
    assert 1 <= rec.chunks_sent < len(text_chunks(choose_answer("hi").text))


async def test_stats_endpoint_reports_counts_and_reset_clears_them(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """GET /_mock/stats reports open, total and outcome counts; POST /_mock/reset clears them."""
    await fetch(session, url(mock, "/events"), "hi [[mock chunks=1 tag=ok]]")
    async with post(session, url(mock, "/events"), "hi [[mock fault=stall tag=st]]") as resp:
        rec = await mock.wait_request("st")
        await asyncio.wait_for(rec.fault_fired.wait(), 5)
        async with session.get(url(mock, "/_mock/stats")) as r:
            stats = orjson.loads(await r.read())
        assert (stats["open"], stats["total"], stats["completed"]) == (1, 2, 1)
        resp.close()
    await mock.wait_idle()
    async with session.get(url(mock, "/_mock/stats")) as r:
        stats = orjson.loads(await r.read())
    assert (stats["open"], stats["total"], stats["client_closed"]) == (0, 2, 1)
    assert [(r["tag"], r["outcome"], r["ended"]) for r in stats["records"]] == [
        ("ok", "completed", True),
        ("st", "client_closed", True),
    ]
    async with session.post(url(mock, "/_mock/reset")) as r:
        assert orjson.loads(await r.read()) == {"cleared": 2}
    assert mock.records == []
    assert mock.stats()["total"] == 0


async def test_stop_cuts_a_stalled_stream(session: aiohttp.ClientSession) -> None:
    """stop() cuts stalled streams instead of waiting, and their clients see a payload error."""
    upstream = MockUpstream(default_delay_ms=0)
    await upstream.start()
    async with post(session, url(upstream, "/openai"), "hi [[mock fault=stall tag=st]]") as resp:
        rec = await upstream.wait_request("st")
        await asyncio.wait_for(rec.fault_fired.wait(), 5)
        await asyncio.wait_for(upstream.stop(), 5)
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert rec.outcome == "server_stopped"


async def test_serve_forever_serves_until_cancelled(
    session: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    """serve_forever prints its URL, streams answers, and stops cleanly when cancelled."""
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(serve_forever("127.0.0.1", 0, 0.0, on_ready=ready.set_result))
        base = await asyncio.wait_for(ready, 5)
        status, _, raw = await fetch(session, base + "/events", "hi [[mock chunks=2]]")
        assert status == 200
        assert b"event: done" in raw
        task.cancel()
    assert base in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Loopback: reliability knobs (heartbeats, endless line, ignored close, errors N times)
# --------------------------------------------------------------------------------------------


async def test_keepalive_sends_pings_between_paced_chunks(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """keepalive_ms=25 with delay_ms=120 puts exactly four `: ping` blocks into every pause."""
    content = "hi [[mock chunks=2 delay_ms=120 keepalive_ms=25 tag=ka]]"
    status, _, raw = await fetch(session, url(mock, "/perplexity"), content)
    assert status == 200
    blocks = sse_blocks(raw, CRLF)
    shape = ["ping" if b == [("", "ping")] else "data" for b in blocks]
    # text 1, pause, text 2, pause, finish chunk (Perplexity: no [DONE]).
    assert shape == ["data", *["ping"] * 4, "data", *["ping"] * 4, "data"]
    rec = mock.record("ka")
    assert (rec.keepalives_sent, rec.chunks_sent, rec.outcome) == (8, 2, "completed")
    assert rec.bytes_sent == len(raw)


async def test_keepalive_sends_nothing_before_the_headers(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """During header_delay_ms no heartbeat can be sent: the first bytes are the first event."""
    content = "hi [[mock chunks=1 header_delay_ms=100 delay_ms=30 keepalive_ms=20 tag=hd]]"
    _, _, raw = await fetch(session, url(mock, "/events"), content)
    assert raw.startswith(b"event: text_chunk\n")
    assert raw.count(b": ping\n\n") == 1  # the one pause (text -> done) is 30 ms
    assert mock.record("hd").keepalives_sent == 1


async def test_keepalive_pings_a_stall_until_the_client_leaves(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """fault=stall with keepalive_ms sends K chunks, then only heartbeats, paced at the period."""
    content = "hi [[mock fault=stall after=1 keepalive_ms=20 tag=ks]]"
    async with post(session, url(mock, "/openai"), content) as resp:
        rec = await mock.wait_request("ks")
        started = time.monotonic()
        raw = await read_until(resp, b": ping\n\n", 4)
        elapsed = time.monotonic() - started
        assert elapsed >= 0.06
        data_blocks = datas(raw[: raw.rindex(LF * 2) + 2], LF)
        assert len(data_blocks) == 2  # role chunk + one text chunk, never more
        assert rec.fault_fired.is_set()
        assert not rec.ended.is_set()
        resp.close()
        await asyncio.wait_for(rec.ended.wait(), 5)
    assert (rec.outcome, rec.chunks_sent) == ("client_closed", 1)
    assert rec.keepalives_sent >= 4


async def test_endless_fault_writes_one_line_that_never_ends(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """fault=endless sends K chunks, then `data: xxx...` without a line end, as long as read."""
    content = "hi [[mock chunks=3 fault=endless after=1 tag=en]]"
    async with post(session, url(mock, "/perplexity"), content) as resp:
        raw = b""
        async with asyncio.timeout(10):
            while len(raw) < 1_000_000:
                raw += await resp.content.readany()
        resp.close()
    head, sep, line = raw.rpartition(CRLF * 2)
    assert sep
    assert len(chunks_json(head + sep, CRLF)) == 1
    assert line.startswith(b"data: xxx")
    assert set(line.removeprefix(b"data: ")) == {ord("x")}
    rec = mock.record("en")
    await asyncio.wait_for(rec.ended.wait(), 5)
    assert (rec.outcome, rec.fault, rec.chunks_sent) == ("client_closed", "endless", 1)
    assert rec.fault_fired.is_set()
    assert rec.bytes_sent >= len(raw)


async def test_endless_fault_is_paced_by_the_reader(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """A client that stops reading stops the endless writer too (TCP backpressure), so the mock
    itself never buffers without bound."""
    async with post(session, url(mock, "/openai"), "hi [[mock fault=endless tag=ep]]") as resp:
        assert resp.status == 200
        rec = await mock.wait_request("ep")
        await asyncio.wait_for(rec.fault_fired.wait(), 5)
        await asyncio.sleep(0.3)
        first = rec.bytes_sent
        await asyncio.sleep(0.2)
        assert rec.bytes_sent == first
        # Client buffer + both kernel socket buffers on loopback: megabytes, not more.
        assert first < 64 * 1024 * 1024
        assert first > ENDLESS_WRITE_BYTES
        resp.close()
    await asyncio.wait_for(rec.ended.wait(), 5)
    assert rec.outcome == "client_closed"


async def test_ignore_close_keeps_the_handler_writing_until_a_write_fails(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """With ignore_close=1 a disconnect does not end the handler; its next write does."""
    content = "hi [[mock chunks=20 delay_ms=250 ignore_close=1 tag=ic]]"
    async with post(session, url(mock, "/events"), content) as resp:
        await read_until(resp, LF * 2, 1)
        rec = mock.record("ic")
        resp.close()
    closed = time.monotonic()
    await asyncio.sleep(0.1)
    assert not rec.ended.is_set()
    assert mock.open_requests == 1
    assert rec.client_gone
    await asyncio.wait_for(rec.ended.wait(), 5)
    # It ended at its next write, one pause after the first chunk (not at the disconnect).
    assert time.monotonic() - closed >= 0.1
    assert (rec.outcome, rec.chunks_sent) == ("client_closed", 1)
    assert mock.open_requests == 0
    assert mock.stats()["client_closed"] == 1


async def test_ignore_close_on_a_stall_ends_at_the_next_heartbeat(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """An ignore_close stall notices the disconnect only when a heartbeat write fails."""
    content = "hi [[mock fault=stall keepalive_ms=200 ignore_close=1 tag=is]]"
    async with post(session, url(mock, "/perplexity"), content) as resp:
        rec = await mock.wait_request("is")
        await asyncio.wait_for(rec.fault_fired.wait(), 5)
        await read_until(resp, CRLF * 2, 1)
        resp.close()
    await asyncio.sleep(0.05)
    assert not rec.ended.is_set()
    await asyncio.wait_for(rec.ended.wait(), 5)
    assert rec.outcome == "client_closed"
    assert rec.keepalives_sent >= 1


async def test_stop_cuts_an_ignore_close_stream(session: aiohttp.ClientSession) -> None:
    """stop() cancels a stream that ignores its client's close as promptly as any other."""
    upstream = MockUpstream(default_delay_ms=0)
    await upstream.start()
    content = "hi [[mock fault=stall keepalive_ms=5000 ignore_close=1 tag=st]]"
    async with post(session, url(upstream, "/openai"), content) as resp:
        rec = await upstream.wait_request("st")
        await asyncio.wait_for(rec.fault_fired.wait(), 5)
        started = time.monotonic()
        await asyncio.wait_for(upstream.stop(), 5)
        assert time.monotonic() - started < 2
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert rec.outcome == "server_stopped"
    assert not rec.client_gone


async def test_times_errs_for_the_first_n_requests_of_a_tag_only(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """status=429 times=2 answers 429 twice for a tag, then streams; tags count separately."""
    content = "hi [[mock chunks=2 status=429 retry_after=1 times=2 tag=rt]]"
    results = [await fetch(session, url(mock, "/openai"), content) for _ in range(3)]
    assert [status for status, _, _ in results] == [429, 429, 200]
    assert results[0][1]["Retry-After"] == "1"
    assert datas(results[2][2], LF)[-1] == "[DONE]"
    other = "hi [[mock chunks=2 status=429 times=2 tag=other]]"
    status, _, _ = await fetch(session, url(mock, "/openai"), other)
    assert status == 429
    recs = [r for r in mock.records if r.tag == "rt"]
    assert [(r.status, r.outcome) for r in recs] == [
        (429, "error_status"),
        (429, "error_status"),
        (200, "completed"),
    ]
    async with session.post(url(mock, "/_mock/reset")) as r:
        assert r.status == 200
    status, _, _ = await fetch(session, url(mock, "/openai"), content)
    assert status == 429  # reset forgets the counts


async def test_stats_can_leave_records_out_or_filter_them_by_tag(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """?records=0 answers the counters only; ?tag=T keeps the records tagged T."""
    for tag in ("a", "b", "a"):
        await fetch(session, url(mock, "/events"), f"hi [[mock chunks=1 tag={tag}]]")
    async with session.get(url(mock, "/_mock/stats?records=0")) as r:
        assert orjson.loads(await r.read()) == {
            "open": 0,
            "total": 3,
            "completed": 3,
            "client_closed": 0,
        }
    async with session.get(url(mock, "/_mock/stats?tag=a")) as r:
        stats = orjson.loads(await r.read())
    assert [rec["tag"] for rec in stats["records"]] == ["a", "a"]
    assert {"bytes_sent", "keepalives_sent"} <= stats["records"][0].keys()
    async with session.get(url(mock, "/_mock/stats?records=yes")) as r:
        assert r.status == 400
        assert orjson.loads(await r.read())["error"]["param"] == "records"


# --------------------------------------------------------------------------------------------
# fast=1: the benchmark's upstream (bench/, `make bench`)
# --------------------------------------------------------------------------------------------

STAMP_RE = re.compile(r"@([0-9]+);")


def test_parse_directive_reads_the_benchmark_knobs() -> None:
    """fast, rate and stamp parse; rate takes decimals."""
    _, knobs = parse_directive("q [[mock fast=1 chunks=9 rate=12.5 stamp=1 words=2 tag=b]]")
    assert (knobs.fast, knobs.rate, knobs.stamp, knobs.chunks, knobs.words) == (
        True,
        12.5,
        True,
        9,
        2,
    )
    assert (Knobs().fast, Knobs().rate, Knobs().stamp) == (False, None, False)


@pytest.mark.parametrize(
    ("directive", "key"),
    [
        ("[[mock rate=10]]", "rate"),
        ("[[mock stamp=1]]", "stamp"),
        ("[[mock fast=1 rate=0]]", "rate"),
        ("[[mock fast=1 rate=-3]]", "rate"),
        ("[[mock fast=2]]", "fast"),
        ("[[mock fast=1 fault=reset]]", "fault"),
        ("[[mock fast=1 status=500]]", "status"),
        ("[[mock fast=1 delay_ms=5]]", "delay_ms"),
        ("[[mock fast=1 bytewise=1]]", "bytewise"),
        ("[[mock fast=1 comments=1]]", "comments"),
    ],
)
def test_parse_directive_rejects_bad_benchmark_knobs(directive: str, key: str) -> None:
    """rate and stamp need fast=1; fast=1 refuses the knobs of the step-by-step writer."""
    with pytest.raises(DirectiveError) as err:
        parse_directive(directive)
    assert err.value.key == key


async def test_fast_stream_is_the_same_answer_as_the_slow_one(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """fast=1 writes the same events as the normal writer (role chunk, deltas, finish, [DONE])."""
    _, _, slow = await fetch(session, url(mock, "/openai"), f"{MARS} [[mock chunks=40]]")
    status, headers, fast = await fetch(
        session, url(mock, "/openai"), f"{MARS} [[mock fast=1 chunks=40 tag=f]]"
    )
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")

    def shape(raw: bytes) -> list[Any]:
        return [e["choices"] for e in chunks_json(raw, LF)]

    assert shape(fast) == shape(slow)
    assert datas(fast, LF)[-1] == "[DONE]"
    rec = mock.record("f")
    assert (rec.outcome, rec.chunks_sent, rec.bytes_sent) == ("completed", 40, len(fast))


async def test_fast_events_stream_ends_with_the_full_text(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """On /events the done event carries the concatenation of the fast chunks (stamps too)."""
    _, _, raw = await fetch(session, url(mock, "/events"), "hi [[mock fast=1 chunks=5 stamp=1]]")
    bodies = [orjson.loads(d) for d in datas(raw, LF)]
    texts = [b["text"] for b in bodies[:-1]]
    assert len(texts) == 5
    assert all(STAMP_RE.match(t) for t in texts)
    assert bodies[-1]["type"] == "done"
    assert bodies[-1]["text"] == "".join(texts)
    assert bodies[-1]["usage"]["completion_tokens"] == 5


async def test_fast_stream_of_many_chunks_is_written_in_big_batches(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """100,000 chunks arrive complete and in order, in far fewer reads than chunks."""
    reads = 0
    raw = b""
    async with post(session, url(mock, "/openai"), "hi [[mock fast=1 chunks=100000]]") as resp:
        async for data in resp.content.iter_any():
            reads += 1
            raw += data
    deltas = [e["choices"][0]["delta"].get("content") for e in chunks_json(raw, LF)[1:-1]]
    assert deltas == text_chunks(choose_answer("hi").text, 100_000)
    assert reads < 100_000 / 50


async def test_stamp_is_the_monotonic_time_of_the_write(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """stamp=1 prefixes each text with @<time.monotonic_ns()>; the word follows unchanged."""
    before = time.monotonic_ns()
    _, _, raw = await fetch(
        session, url(mock, "/openai"), f"{MARS} [[mock fast=1 chunks=3 stamp=1]]"
    )
    after = time.monotonic_ns()
    texts = [e["choices"][0]["delta"]["content"] for e in chunks_json(raw, LF)[1:-1]]
    for text, piece in zip(texts, text_chunks(MARS_ANSWER.text, 3), strict=True):
        match = STAMP_RE.match(text)
        assert match is not None
        assert before <= int(match.group(1)) <= after
        assert text[match.end() :] == piece


async def test_rate_paces_the_chunks_by_the_monotonic_clock(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """rate=50: chunk i is written about i/50 s after the first, and the stream ends normally."""
    _, _, raw = await fetch(
        session, url(mock, "/openai"), "hi [[mock fast=1 chunks=6 rate=50 stamp=1 tag=p]]"
    )
    events = chunks_json(raw, LF)
    texts = [e["choices"][0]["delta"]["content"] for e in events[1:-1]]
    stamps = [int(STAMP_RE.match(t).group(1)) for t in texts]  # type: ignore[union-attr]
    gaps_ms = [(b - a) / 1e6 for a, b in itertools.pairwise(stamps)]
    assert len(gaps_ms) == 5
    assert all(10 <= g <= 60 for g in gaps_ms), gaps_ms
    assert 80 <= (stamps[-1] - stamps[0]) / 1e6 <= 200
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert datas(raw, LF)[-1] == "[DONE]"
    assert mock.record("p").outcome == "completed"


async def test_many_paced_streams_share_one_timer_and_all_finish(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """Thirty paced streams at once (staggered by the pacer's heap) all complete in time."""

    async def one(i: int) -> list[str]:
        _, _, raw = await fetch(
            session, url(mock, "/events"), f"hi [[mock fast=1 chunks=5 rate=100 tag=m{i}]]"
        )
        return [orjson.loads(d)["text"] for d in datas(raw, LF)[:-1]]

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(30)))
    assert time.monotonic() - started < 2.0
    assert all(r == text_chunks(choose_answer("hi").text, 5) for r in results)
    assert all(mock.record(f"m{i}").outcome == "completed" for i in range(30))


async def test_a_client_leaving_a_paced_stream_ends_it_and_records_when(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """Closing the connection mid-stream ends the handler (client_closed) and stamps closed_ns
    (when the server heard of the loss) and ended_ns (when the handler finished), which the
    benchmark joins with its cancel times."""
    async with post(
        session, url(mock, "/openai"), "hi [[mock fast=1 chunks=1000 rate=20 tag=gone]]"
    ) as resp:
        await read_until(resp, b'"content":"', 2)
        left = time.monotonic_ns()
        resp.close()
    await mock.wait_idle(timeout=5)
    rec = mock.record("gone")
    assert rec.outcome == "client_closed"
    assert 1 <= rec.chunks_sent < 1000
    assert rec.ended_ns is not None
    assert rec.closed_ns is not None
    assert left <= rec.closed_ns <= rec.ended_ns
    assert rec.to_json()["ended_ns"] == rec.ended_ns
    assert rec.to_json()["closed_ns"] == rec.closed_ns


async def test_a_completed_stream_has_no_closed_stamp(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """closed_ns is for requests whose connection was lost mid-request; a connection that is
    kept alive after a completed answer, or closed later, does not stamp it."""
    async with post(session, url(mock, "/openai"), "hi [[mock fast=1 chunks=3 tag=whole]]") as resp:
        await resp.read()
    await mock.wait_idle(timeout=5)
    rec = mock.record("whole")
    assert rec.outcome == "completed"
    assert rec.ended_ns is not None
    assert rec.closed_ns is None


@pytest.mark.parametrize("path", ["/perplexity", "/chat/completions"])
async def test_fast_is_refused_on_perplexity_routes(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str
) -> None:
    """Perplexity chunks repeat the whole text so far: fast=1 is a 400 naming the key there."""
    status, _, raw = await fetch(session, url(mock, path), "hi [[mock fast=1]]")
    assert status == 400
    assert orjson.loads(raw)["error"]["param"] == "fast"


def test_paced_fast_stream_works_on_uvloop() -> None:
    """The pacer writes to the transport itself; uvloop's transports (what the benchmark and the
    gateway run on) are not asyncio.Transport subclasses, so check them for real."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[str]:
        async with MockUpstream(default_delay_ms=0) as upstream, aiohttp.ClientSession() as client:
            _, _, raw = await fetch(
                client, url(upstream, "/openai"), "hi [[mock fast=1 chunks=3 rate=100 tag=u]]"
            )
            assert upstream.record("u").outcome == "completed"
            return [e["choices"][0]["delta"].get("content") for e in chunks_json(raw, LF)[1:-1]]

    assert uvloop.run(main()) == text_chunks(choose_answer("hi").text, 3)
