"""The server (gateway/mock/server.py) over real loopback streams: the answer it streams, pacing,
errors, transport faults, heartbeats, and what it records of each request."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from gateway.mock.answers import choose_answer, text_chunks
from gateway.mock.server import ENDLESS_WRITE_BYTES, MockUpstream, serve_forever
from tests.mock.conftest import (
    CRLF,
    LF,
    MARS,
    MARS_ANSWER,
    chunks_json,
    datas,
    fetch,
    post,
    read_until,
    sse_blocks,
    url,
)

# --------------------------------------------------------------------------------------------
# The answer streamed
# --------------------------------------------------------------------------------------------


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
# Pacing, HTTP errors and bad requests
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
# Transport faults (reset, stall, eof) and byte-wise writes
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


# --------------------------------------------------------------------------------------------
# Observation
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
# Reliability knobs (heartbeats, endless line, ignored close, errors N times)
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
