"""fast=1, the benchmark's upstream (gateway/mock/pacer.py; bench/, `make bench`): pre-rendered
events in big writes, and rate=R streams paced by one shared timer."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.mock.answers import choose_answer, text_chunks
from gateway.mock.server import MockUpstream
from tests.mock.conftest import (
    LF,
    MARS,
    MARS_ANSWER,
    chunks_json,
    datas,
    fetch,
    post,
    read_until,
    url,
)

STAMP_RE = re.compile(r"@([0-9]+);")


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
