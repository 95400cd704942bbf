"""Protocol v1 end to end: real gateway, real aiohttp mock upstream, real WebSocket clients.

Each test proves a rule of docs/protocol.md over loopback sockets; the `make_stack` fixture
checks after every test that no task outlived the servers.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.client_proto import ResponseHandler
from websockets.exceptions import ConnectionClosed

from gateway.core.protocol import ErrorCode
from gateway.io.upstream import _BodyFeed
from gateway.io.websocket import WebSocket
from gateway.mock import choose_answer
from tests.conftest import TIMEOUT, FakeClock, Stack, StackFactory, check_stream, is_terminal
from tests.support import expected_text, free_port


async def test_welcome_announces_protocol_session_and_limits(make_stack: StackFactory) -> None:
    """The first frame is welcome with the protocol version, a session id and the limits."""
    stack = await make_stack(max_streams=5, max_message_bytes=4096)
    client = await stack.client()
    assert client.welcome["protocol"] == 1
    assert isinstance(client.welcome["session"], str)
    assert len(client.welcome["session"]) >= 16
    assert client.welcome["limits"] == {"max_streams": 5, "max_message_bytes": 4096}
    other = await stack.client()
    assert other.welcome["session"] != client.welcome["session"]


@pytest.mark.parametrize("dialect", ["perplexity", "openai", "events"])
async def test_one_stream_per_dialect(make_stack: StackFactory, dialect: str) -> None:
    """Each dialect relays every word in order and ends with one done carrying the metadata."""
    stack = await make_stack(dialect=dialect)
    client = await stack.client()
    prompt = "Why is the sky blue? [[mock chunks=12 tag=one]]"
    await client.start("s1", prompt)
    frames = (await client.finish("s1"))["s1"]
    assert check_stream(frames) == expected_text(prompt)
    done = frames[-1]
    assert done["type"] == "done"
    if dialect != "openai":  # OpenAI has no citations
        assert done["citations"] == choose_answer("Why is the sky blue?").citations
    assert done["usage"]["completion_tokens"] > 0
    if dialect != "events":
        assert done["finish_reason"] == "stop"
    if dialect == "perplexity":
        assert done["search_results"][0]["url"].startswith("https://")
    record = stack.mock.record("one")
    assert record.outcome == "completed"
    assert record.body["stream"] is True
    assert record.body["messages"] == [{"role": "user", "content": prompt}]
    await stack.assert_no_leaks()


async def test_messages_model_and_options_reach_the_upstream(stack: Stack) -> None:
    """The upstream body carries the client's messages, model and allowed options unchanged."""
    client = await stack.client()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about tides [[mock chunks=2 tag=body]]"},
    ]
    await client.send(
        {
            "type": "start",
            "id": "m",
            "messages": messages,
            "model": "sonar-pro",
            "options": {"temperature": 0.3, "search_domain_filter": ["nasa.gov"]},
        }
    )
    await client.finish("m")
    body = stack.mock.record("body").body
    assert body == {
        "model": "sonar-pro",
        "messages": messages,
        "stream": True,
        "temperature": 0.3,
        "search_domain_filter": ["nasa.gov"],
    }


async def test_default_model_and_api_key_stay_server_side(make_stack: StackFactory) -> None:
    """The upstream gets the default model and the Bearer key; no client frame contains it."""
    secret = "pplx-test-SECRET-key-123"
    stack = await make_stack(api_key=secret, default_model="sonar-reasoning-pro")
    client = await stack.client()
    await client.start("k", "hello [[mock chunks=3 tag=key]]")
    await client.finish("k")
    record = stack.mock.record("key")
    assert record.authorization == f"Bearer {secret}"
    assert record.body["model"] == "sonar-reasoning-pro"
    everything = orjson.dumps(
        [client.welcome, client.by_id], option=orjson.OPT_NON_STR_KEYS
    ).decode()
    assert secret not in everything


async def test_ten_interleaved_streams_never_cross(stack: Stack) -> None:
    """Ten concurrent streams on one socket interleave, and each gets exactly its own answer."""
    client = await stack.client()
    topics = [
        "sky blue",
        "tides moon",
        "coffee sleep",
        "bread rise",
        "leaves autumn",
        "stars twinkle",
        "ocean salty",
        "cats purr",
        "rainbow colors",
        "thunder lightning",
    ]
    prompts = {
        f"s{i}": f"Why {topic}? [[mock chunks={20 + i} delay_ms=2]]"
        for i, topic in enumerate(topics)
    }
    for sid, prompt in prompts.items():
        await client.start(sid, prompt)
    result = await client.finish(*prompts)
    for sid, prompt in prompts.items():
        assert check_stream(result[sid]) == expected_text(prompt)
    # The streams really ran side by side: chunks of different streams alternate on the wire.
    first_done = next(i for i, f in enumerate(client.log) if f["type"] == "done")
    before = {f["id"] for f in client.log[:first_done] if f["type"] == "text_chunk"}
    assert len(before) == len(prompts)
    await stack.assert_no_leaks()


async def test_cancel_closes_the_upstream_and_spares_other_streams(stack: Stack) -> None:
    """Cancel answers `cancelled`, the upstream sees its connection close, nothing follows, and
    the other streams on the socket finish untouched."""
    client = await stack.client()
    await client.start("victim", "sky [[mock chunks=500 delay_ms=20 tag=victim]]")
    await client.start("other", "tides [[mock chunks=30 delay_ms=5 tag=other]]")
    await client.recv_until(lambda f: f["type"] == "text_chunk" and f["id"] == "victim")
    await client.cancel("victim")
    result = await client.finish("victim", "other")
    victim = result["victim"]
    assert victim[-1]["type"] == "cancelled"
    check_stream(victim)
    record = stack.mock.record("victim")
    await asyncio.wait_for(record.ended.wait(), 5)
    assert record.outcome == "client_closed"
    assert record.chunks_sent < 500
    assert check_stream(result["other"]) == expected_text("tides [[mock chunks=30]]")
    assert stack.mock.record("other").outcome == "completed"
    # Nothing of the cancelled stream follows its terminal frame.
    await client.send({"type": "ping"})
    await client.recv_until(lambda f: f["type"] == "pong")
    assert client.by_id["victim"] == victim
    await stack.assert_no_leaks()


async def test_cancel_before_the_upstream_answers(stack: Stack) -> None:
    """A cancel while the upstream has not even sent its headers still ends cleanly."""
    client = await stack.client()
    await client.start("slow", "sky [[mock header_delay_ms=5000 tag=slow]]")
    await stack.mock.wait_request("slow")
    await client.cancel("slow")
    frames = (await client.finish("slow"))["slow"]
    assert [f["type"] for f in frames] == ["started", "cancelled"]
    assert frames[-1]["seq"] == 0
    await stack.assert_no_leaks()


async def test_cancel_racing_the_end_gives_one_terminal(stack: Stack) -> None:
    """Cancels sent right as streams finish never produce a second terminal frame."""
    client = await stack.client()
    for round_ in range(30):
        sid = f"r{round_}"
        await client.start(sid, "sky [[mock chunks=1]]")
        await client.recv_until(lambda f, sid=sid: f["id"] == sid and f["type"] == "text_chunk")
        await client.cancel(sid)
    await client.finish(*(f"r{i}" for i in range(30)))
    await client.send({"type": "ping"})
    await client.recv_until(lambda f: f["type"] == "pong")
    for i in range(30):
        frames = client.by_id[f"r{i}"]
        assert sum(is_terminal(f) for f in frames) == 1, frames
        assert not [f for f in frames if f.get("code") == "unknown_id"], frames
    await stack.assert_no_leaks()


async def test_closing_the_socket_cancels_every_upstream(stack: Stack) -> None:
    """A socket that goes away closes all its upstream connections and leaves no task."""
    client = await stack.client()
    for i in range(6):
        await client.start(f"s{i}", f"sky [[mock fault=stall after=2 tag=d{i}]]")
    for i in range(6):
        await stack.mock.wait_request(f"d{i}")
    await client.recv_until(lambda f: f["type"] == "text_chunk")
    await client.ws.close()
    await stack.assert_no_leaks()
    assert {stack.mock.record(f"d{i}").outcome for i in range(6)} == {"client_closed"}


async def test_abrupt_tcp_close_cancels_every_upstream(make_stack: StackFactory) -> None:
    """With --resume-grace 0, a client that vanishes without a close frame has its upstreams
    cancelled at once (with a grace, tests/e2e/test_resume.py)."""
    stack = await make_stack(resume_grace=0)
    client = await stack.client()
    for i in range(4):
        await client.start(f"s{i}", f"sky [[mock fault=stall after=1 tag=a{i}]]")
    for i in range(4):
        await stack.mock.wait_request(f"a{i}")
    transport = client.ws.transport
    transport.abort()
    await stack.assert_no_leaks()
    assert {stack.mock.record(f"a{i}").outcome for i in range(4)} == {"client_closed"}


async def test_ping_pong(stack: Stack) -> None:
    """An application ping is answered by pong."""
    client = await stack.client()
    await client.send({"type": "ping"})
    assert await client.recv() == {"type": "pong"}


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{nope", "bad_json"),
        ('["start"]', "bad_message"),
        ('{"type":"start","prompt":"x"}', "bad_message"),
        ('{"type":"start","id":"bad id","prompt":"x"}', "bad_message"),
        ('{"type":"bogus"}', "unknown_type"),
    ],
)
async def test_connection_level_errors_keep_the_socket_open(
    stack: Stack, frame: str, code: str
) -> None:
    """Bad frames get an error with id null, and the socket keeps working."""
    client = await stack.client()
    await client.ws.send(frame)
    err = await client.recv()
    assert (err["type"], err["id"], err["code"], err["retryable"]) == ("error", None, code, False)
    await client.start("ok", "sky [[mock chunks=2]]")
    check_stream((await client.finish("ok"))["ok"])


async def test_binary_frame_is_bad_message(stack: Stack) -> None:
    """Binary frames are refused with bad_message; the socket stays open."""
    client = await stack.client()
    await client.ws.send(b'{"type":"ping"}')
    err = await client.recv()
    assert (err["code"], err["id"]) == ("bad_message", None)
    await client.send({"type": "ping"})
    assert (await client.recv())["type"] == "pong"


async def test_message_too_large_and_hard_limit(make_stack: StackFactory) -> None:
    """Frames over max_message_bytes get message_too_large; far larger ones close with 1009."""
    stack = await make_stack(max_message_bytes=1024)
    client = await stack.client()
    await client.start("big", "x" * 2000)
    err = await client.recv()
    assert (err["code"], err["id"]) == ("message_too_large", None)
    await client.send({"type": "ping"})
    assert (await client.recv())["type"] == "pong"
    await client.start("huge", "x" * (2 << 20))
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert client.ws.close_code == 1009


async def test_bad_start_fields_name_the_stream(stack: Stack) -> None:
    """A start with a valid id and a disallowed option is refused with that id and no seq."""
    client = await stack.client()
    await client.start("s1", "x", options={"stream": False})
    err = await client.recv()
    assert (err["code"], err["id"]) == ("bad_message", "s1")
    assert "seq" not in err
    assert "stream" in err["message"]


async def test_duplicate_unknown_and_too_many(make_stack: StackFactory) -> None:
    """duplicate_id, unknown_id and too_many_streams carry the id they are about."""
    stack = await make_stack(max_streams=2)
    client = await stack.client()
    await client.start("a", "sky [[mock fault=stall]]")
    await client.start("b", "sky [[mock fault=stall]]")
    await client.start("a", "again")
    dup = await client.recv_until(lambda f: f["type"] == "error")
    assert (dup["code"], dup["id"], dup["retryable"]) == ("duplicate_id", "a", False)
    await client.start("c", "one too many")
    many = await client.recv_until(lambda f: f["type"] == "error")
    assert (many["code"], many["id"], many["retryable"]) == ("too_many_streams", "c", True)
    await client.cancel("zzz")
    unknown = await client.recv_until(lambda f: f["type"] == "error")
    assert (unknown["code"], unknown["id"]) == ("unknown_id", "zzz")
    # The refusals did not end the active streams.
    await client.cancel("a")
    await client.cancel("b")
    result = await client.finish("a", "b")
    assert result["a"][-1]["type"] == "cancelled"
    assert result["b"][-1]["type"] == "cancelled"
    await stack.assert_no_leaks()


async def test_upstream_unavailable(make_stack: StackFactory) -> None:
    """A refused upstream connection ends the stream with retryable upstream_unavailable."""
    stack = await make_stack(url=f"http://127.0.0.1:{free_port()}/perplexity")
    client = await stack.client()
    await client.start("s", "hello")
    frames = (await client.finish("s"))["s"]
    err = frames[-1]
    assert (err["code"], err["retryable"], err["seq"]) == ("upstream_unavailable", True, 0)


@pytest.mark.parametrize(
    ("knobs", "status", "retryable", "message"),
    [
        ("status=503", 503, True, "upstream answered HTTP 503: "),
        ("status=429 retry_after=7", 429, True, "upstream answered HTTP 429: "),
        ("status=400", 400, False, "upstream answered HTTP 400: "),
        ("status=401 body=html", 401, False, "upstream answered HTTP 401"),
    ],
)
async def test_upstream_http_errors(
    make_stack: StackFactory, knobs: str, status: int, retryable: bool, message: str
) -> None:
    """Non-2xx answers become upstream_error with the status, retryable for 429/5xx only."""
    stack = await make_stack(upstream_retries=0)  # retries: tests/io/test_reliability.py
    client = await stack.client()
    await client.start("s", f"sky [[mock {knobs}]]")
    err = (await client.finish("s"))["s"][-1]
    assert (err["code"], err["status"], err["retryable"]) == ("upstream_error", status, retryable)
    assert err["message"].startswith(message)
    assert "<" not in err["message"]  # no HTML relayed
    if status == 429:
        assert err["retry_after_ms"] == 7000
    await stack.assert_no_leaks()


@pytest.mark.parametrize(
    ("knobs", "code", "min_chunks"),
    [
        ("chunks=10 fault=reset after=4", ErrorCode.STREAM_INTERRUPTED, 1),
        ("chunks=10 fault=malformed after=3", ErrorCode.UPSTREAM_PROTOCOL_ERROR, 1),
        ("chunks=10 fault=giant after=2 size=5000000", ErrorCode.UPSTREAM_PROTOCOL_ERROR, 1),
    ],
)
async def test_upstream_faults_mid_stream(
    stack: Stack, knobs: str, code: ErrorCode, min_chunks: int
) -> None:
    """Faults after partial output end the stream with the right code; sent chunks stand.
    The failed body is freed by reference counting at once (checked with the cyclic GC off): no
    traceback ties the relay, its body feed and the bytes read into a cycle, which held 5 MiB
    per oversized event until a rare full collection."""
    client = await stack.client()
    gc.collect()
    gc.disable()
    try:
        await client.start("s", f"sky [[mock {knobs}]]")
        frames = (await client.finish("s"))["s"]
        text = check_stream(frames)
        err = frames[-1]
        assert err["code"] == code.value
        assert err["seq"] >= min_chunks
        assert expected_text("sky [[mock chunks=10]]").startswith(text)
        await stack.assert_no_leaks()
        assert not [o for o in gc.get_objects() if isinstance(o, _BodyFeed)]
    finally:
        gc.enable()


@pytest.mark.parametrize("dialect", ["openai", "events"])
async def test_clean_eof_without_end_marker_is_interrupted(
    make_stack: StackFactory, dialect: str
) -> None:
    """OpenAI and events streams that stop without their end marker are stream_interrupted."""
    stack = await make_stack(dialect=dialect)
    client = await stack.client()
    await client.start("s", "sky [[mock chunks=8 fault=eof after=3]]")
    frames = (await client.finish("s"))["s"]
    assert (
        check_stream(frames) == expected_text("sky [[mock chunks=8]]")[: len(check_stream(frames))]
    )
    assert frames[-1]["code"] == "stream_interrupted"
    assert frames[-1]["retryable"] is True


async def test_perplexity_clean_eof_is_done(stack: Stack) -> None:
    """Perplexity's clean EOF without finish_reason is a complete answer."""
    client = await stack.client()
    await client.start("s", "sky [[mock chunks=8 fault=eof after=5]]")
    frames = (await client.finish("s"))["s"]
    assert frames[-1]["type"] == "done"
    assert "finish_reason" not in frames[-1]
    assert frames[-1]["seq"] >= 1


async def test_upstream_read_timeout(make_stack: StackFactory) -> None:
    """An upstream that goes silent longer than the read timeout ends with upstream_timeout,
    between 1 and 1.25 times the timeout after its last bytes. On the fake clock."""
    clock = FakeClock()
    stack = await make_stack(clock=clock, upstream_read_timeout=60, ping_interval=0)
    client = await stack.client()
    await client.start("s", "sky [[mock chunks=10 fault=stall after=2 tag=t]]")
    await client.recv_until(lambda f: f["type"] == "text_chunk" and f["seq"] == 2)
    await stack.mock.record("t").fault_fired.wait()  # the last bytes have been sent
    await client.send({"type": "ping"})  # ...and read: the gateway answers in order
    await client.recv_until(lambda f: f["type"] == "pong")
    clock.advance(59)
    assert stack.gateway.active_streams == 1
    assert not stack.mock.record("t").ended.is_set()
    clock.advance(16)
    frames = (await client.finish("s"))["s"]
    assert (frames[-1]["code"], frames[-1]["retryable"]) == ("upstream_timeout", True)
    check_stream(frames)
    await stack.assert_no_leaks()
    assert stack.mock.record("t").outcome == "client_closed"


@pytest.mark.parametrize("dialect", ["perplexity", "openai", "events"])
async def test_upstream_connections_are_pooled(make_stack: StackFactory, dialect: str) -> None:
    """After an answer's last event the gateway reads the rest of the body (here the chunked
    terminator comes 30 ms after `[DONE]`/`done`), so the connection goes back to the pool:
    three streams in a row use one upstream connection. The client's `done` does not wait."""
    stack = await make_stack(dialect=dialect)
    client = await stack.client()
    for i in range(3):
        await client.start(f"s{i}", f"sky [[mock chunks=3 linger_ms=30 tag=p{i}]]")
        frames = (await client.finish(f"s{i}"))[f"s{i}"]
        assert frames[-1]["type"] == "done"
        if dialect != "perplexity":  # Perplexity's body ends with the last event: no tail
            assert not stack.mock.record(f"p{i}").ended.is_set()  # done came first
        await asyncio.wait_for(stack.gateway.idle.wait(), TIMEOUT)
    assert len({stack.mock.record(f"p{i}").peer for i in range(3)}) == 1
    assert stack.gateway.upstream.pool_idle() == 1
    await stack.assert_no_leaks()


async def test_started_is_written_after_the_upstream_request(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start's upstream request goes out before its `started` frame is written, so the
    upstream begins its answer, which the user waits on, that much sooner."""
    order: list[str] = []
    write_bytes = aiohttp.ClientRequest.write_bytes

    async def request_written(self: aiohttp.ClientRequest, *args: Any, **kwargs: Any) -> None:
        order.append("request")
        await write_bytes(self, *args, **kwargs)

    write_frames = WebSocket.write_frames

    def frames_written(self: WebSocket, messages: list[bytes]) -> None:
        order.extend(orjson.loads(m)["type"] for m in messages)
        write_frames(self, messages)

    monkeypatch.setattr(aiohttp.ClientRequest, "write_bytes", request_written)
    monkeypatch.setattr(WebSocket, "write_frames", frames_written)
    client = await stack.client()
    for sid in ("a", "b", "c"):
        await client.start(sid, f"sky [[mock chunks=2 tag={sid}]]")
        check_stream((await client.finish(sid))[sid])
        await asyncio.wait_for(stack.gateway.idle.wait(), TIMEOUT)  # its connection is pooled
    # The first stream's request waits for a new connection; the others reuse it.
    assert order[6:] == ["request", "started", "text_chunk", "text_chunk", "done"] * 2
    await stack.assert_no_leaks()


async def test_a_streams_first_text_is_written_at_once(stack: Stack) -> None:
    """A stream's first text is written in the very callback that delivers it (under load the
    rest of a loop iteration takes milliseconds); later text waits for the iteration's end, so
    that deltas arriving together share a frame and a write."""
    client = await stack.client()
    await client.start("s", "sky [[mock header_delay_ms=5000 tag=s]]")
    await client.recv_until(lambda f: f["type"] == "started")
    await stack.mock.wait_request("s")
    ((stream, connection),) = stack.gateway.followers.items()
    stream.push("first")  # as the upstream's first delta would be
    assert len(connection.outbox) == 0  # written already
    assert stream.seq == 1
    stream.push("second")
    stream.push(" and third")
    assert len(connection.outbox) == 1  # queued, for one frame at the end of the iteration
    await client.recv_until(lambda f: f["type"] == "text_chunk" and f["seq"] == 2)
    await client.cancel("s")
    frames = (await client.finish("s"))["s"]
    assert [(f["type"], f.get("text")) for f in frames] == [
        ("started", None),
        ("text_chunk", "first"),
        ("text_chunk", "second and third"),
        ("cancelled", None),
    ]
    await stack.assert_no_leaks()


async def test_upstream_that_lingers_after_its_last_event_is_not_pooled(
    make_stack: StackFactory,
) -> None:
    """An upstream that holds its body open after `[DONE]` is not waited for beyond
    TAIL_TIMEOUT: the client has its `done` at once, the connection is closed (not pooled) and
    the next stream gets a new one."""
    stack = await make_stack(dialect="openai")
    client = await stack.client()
    await client.start("a", "sky [[mock chunks=3 linger_ms=60000 tag=a]]")
    assert (await client.finish("a"))["a"][-1]["type"] == "done"
    record = stack.mock.record("a")
    await asyncio.wait_for(record.ended.wait(), TIMEOUT)
    assert record.outcome == "client_closed"
    await client.start("b", "sky [[mock chunks=3 tag=b]]")
    assert (await client.finish("b"))["b"][-1]["type"] == "done"
    assert stack.mock.record("b").peer != record.peer
    await stack.assert_no_leaks()


@pytest.mark.parametrize("knobs", ["bytewise=1", "crlf=0", "comments=1", "done=1"])
async def test_perplexity_framing_variants(stack: Stack, knobs: str) -> None:
    """Byte-by-byte delivery, LF framing, keep-alive comments and [DONE] all relay exactly."""
    client = await stack.client()
    prompt = f"coffee [[mock chunks=9 {knobs}]]"
    await client.start("s", prompt)
    frames = (await client.finish("s"))["s"]
    assert frames[-1]["type"] == "done"
    assert check_stream(frames) == expected_text(prompt)


async def test_internal_bug_is_reported_not_crashed(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception in the relay becomes `internal`; the socket keeps working."""
    from gateway.core import dialects

    def boom(self: Any, event: Any) -> str:
        raise RuntimeError("bug")

    monkeypatch.setattr(dialects.PerplexityTranslator, "feed", boom)
    client = await stack.client()
    await client.start("s", "sky [[mock chunks=3]]")
    err = (await client.finish("s"))["s"][-1]
    assert (err["code"], err["retryable"]) == ("internal", True)
    monkeypatch.undo()
    await client.start("t", "sky [[mock chunks=3]]")
    assert (await client.finish("t"))["t"][-1]["type"] == "done"
    await stack.assert_no_leaks()


async def test_slow_reader_pauses_the_upstream_then_gets_everything(
    make_stack: StackFactory,
) -> None:
    """A client that stops reading makes the gateway stop reading the upstream (bounded buffer);
    when it reads again, every word arrives, coalesced into fewer frames."""
    # OpenAI-shaped events stay small (Perplexity's repeat the whole text so far).
    stack = await make_stack(dialect="openai", send_buffer_bytes=16 * 1024)
    client = await stack.slow_client()  # 4 KiB kernel buffers, as on a slow phone link
    chunks = 30_000  # far more than fits in the 16 KiB limit and the 4 KiB kernel buffers
    prompt = f"ocean salty [[mock chunks={chunks} tag=slow]]"
    await client.start("s", prompt)
    await stack.mock.wait_request("slow")
    record = stack.mock.record("slow")
    connection = next(iter(stack.gateway.connections))
    # The reader of this stream parks in flow control once the socket's outbox is full.
    await asyncio.wait_for(connection.flow.stalled.wait(), 10)
    assert record.chunks_sent < chunks
    assert not record.ended.is_set()
    # Bounded: the limit plus at most one upstream read.
    assert connection.outbox.buffered <= 16 * 1024 + 256 * 1024
    frames = (await client.finish("s", timeout=60))["s"]
    assert check_stream(frames) == expected_text(prompt)
    assert len(frames) - 2 < chunks  # coalesced: fewer frames than upstream chunks
    await stack.assert_no_leaks()


def _pause_transport_only(self: ResponseHandler) -> None:
    """pause_reading() as aiohttp before 3.14 has it: the transport stops, but the parser goes
    on through the rest of the read it is in, so body still reaches a paused relay."""
    if not self._reading_paused and self.transport is not None:
        self.transport.pause_reading()
        self._reading_paused = True


@pytest.mark.parametrize("parser_pauses", [True, False], ids=["aiohttp", "aiohttp<3.14"])
async def test_flow_control_pause_is_not_an_upstream_timeout(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch, parser_pauses: bool
) -> None:
    """A relay paused because its client is behind is not reading, by our choice: the read-gap
    watchdog must not fail it, however long the pause lasts beyond --upstream-read-timeout,
    even when aiohttp delivers the rest of a read after the pause (before 3.14 it did)."""
    if not parser_pauses:
        monkeypatch.setattr(ResponseHandler, "pause_reading", _pause_transport_only)
    stack = await make_stack(
        dialect="openai", send_buffer_bytes=16 * 1024, upstream_read_timeout=0.2
    )
    client = await stack.slow_client()
    prompt = "ocean salty [[mock chunks=20000 tag=paused]]"
    await client.start("s", prompt)
    connection = next(iter(stack.gateway.connections))
    await asyncio.wait_for(connection.flow.stalled.wait(), 10)
    # The condition under test is time itself: stay paused for 4x the read timeout (the
    # watchdog looks every 50 ms here).
    await asyncio.sleep(0.8)
    frames = (await client.finish("s", timeout=60))["s"]
    assert frames[-1]["type"] == "done", frames[-1]
    assert check_stream(frames) == expected_text(prompt)
    await stack.assert_no_leaks()


@pytest.mark.parametrize("compression", [False, True])
async def test_frames_with_and_without_permessage_deflate(
    make_stack: StackFactory, compression: bool
) -> None:
    """Without extensions the writer frames messages itself; with --compression (and a client
    that offers permessage-deflate) websockets compresses them. Both read back exactly, a
    100 KB chunk (a 64-bit length) included."""
    stack = await make_stack(compression=compression)
    client = await stack.client()  # websockets' client offers permessage-deflate by default
    assert bool(client.ws.protocol.extensions) is compression
    prompt = "sky [[mock chunks=2 words=20000]]"
    await client.start("s", "sky [[mock chunks=6]]")
    await client.start("g", prompt)
    frames = await client.finish("s", "g")
    assert check_stream(frames["s"]) == expected_text("sky [[mock chunks=6]]")
    assert check_stream(frames["g"]) == expected_text(prompt)
    assert max(len(f["text"]) for f in frames["g"] if f["type"] == "text_chunk") > 65536
    await stack.assert_no_leaks()


async def test_cancel_closes_the_upstream_connection_at_once(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel closes the upstream connection in the call that decides it, not when the relay
    task later runs its cancellation (under load, a loop iteration later)."""
    gateway = stack.gateway
    closed_on_return: list[bool] = []
    cancel_stream = gateway.cancel_stream

    def spy(stream: Any) -> None:
        response = gateway.upstream._live[stream]._resp  # white box: the stream's response
        cancel_stream(stream)
        closed_on_return.append(response.closed)

    monkeypatch.setattr(gateway, "cancel_stream", spy)
    client = await stack.client()
    await client.start("s", "sky [[mock chunks=200 delay_ms=20 tag=c]]")
    await client.recv_until(lambda f: f["type"] == "text_chunk")
    await client.cancel("s")
    assert (await client.finish("s"))["s"][-1]["type"] == "cancelled"
    assert closed_on_return == [True]
    await asyncio.wait_for(stack.mock.record("c").ended.wait(), TIMEOUT)
    assert stack.mock.record("c").outcome == "client_closed"
    await stack.assert_no_leaks()
