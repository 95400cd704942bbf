"""The Python client (clients/python) against the real gateway and mock upstream.

Streams, concurrency, cancel, typed errors, ids, reconnects and the `gateway-client` CLI run over
loopback sockets; the resume path and token delivery, which the gateway does not implement yet,
run against a small scripted protocol-v1 server. Nothing synchronises by sleeping: tests wait on
events and frames with timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import gateway_client
import orjson
import pytest
import structlog.testing
from gateway_client import (
    Answer,
    Backoff,
    ConnectionLost,
    GatewayBusy,
    GatewayClient,
    GatewayError,
    ProgressPart,
    ProtocolError,
    ReasoningPart,
    Source,
    SourcesPart,
    Stream,
    StreamInterrupted,
    TextPart,
    ToolCallPart,
    Unauthorized,
    UpstreamError,
)
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from gateway.config import Config
from gateway.io.server import Gateway
from gateway.mock import choose_answer
from gateway.mock.script import reasoning_text
from tests.conftest import TIMEOUT, Stack, StackFactory
from tests.schema import validate_client_frame, validate_server_frame
from tests.support import expected_text, free_port

CLIENT_SRC = Path(__file__).resolve().parents[2] / "clients" / "python"
FAST = Backoff(base=0.01, cap=0.05, max_attempts=None)


async def collect(stream: Stream) -> str:
    """Iterate a stream to its end and return the concatenated chunks."""
    return "".join([chunk async for chunk in stream])


def metric(stack: Stack, name: str, **labels: str) -> float:
    """Read one sample from the gateway's Prometheus registry."""
    value = stack.gateway.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


# ------------------------------------------------------------------ the public surface


def test_public_surface_is_pinned() -> None:
    """The package exports exactly the curated names, and nothing else public."""
    assert gateway_client.__all__ == [
        "DEFAULT_URL",
        "Answer",
        "Backoff",
        "BudgetExceeded",
        "ConnectionLost",
        "GatewayBusy",
        "GatewayClient",
        "GatewayError",
        "InternalError",
        "Part",
        "ProgressPart",
        "ProtocolError",
        "ReasoningPart",
        "Source",
        "SourcesPart",
        "Stream",
        "StreamInterrupted",
        "TextPart",
        "ToolCall",
        "ToolCallPart",
        "Unauthorized",
        "UpstreamError",
        "Welcome",
    ]
    public = {n for n in vars(gateway_client) if not n.startswith("_")}
    assert public == set(gateway_client.__all__)
    for name in gateway_client.__all__:
        obj = getattr(gateway_client, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, GatewayError), name
    assert (CLIENT_SRC / "gateway_client" / "py.typed").exists()


# ------------------------------------------------------------------ streams


async def test_one_stream_yields_its_chunks_and_a_result(stack: Stack) -> None:
    """Iterating a stream yields the answer's text chunk by chunk; `result` then holds the full
    text, citations, usage and finish_reason."""
    prompt = "Why is the sky blue? [[mock chunks=12 tag=one]]"
    async with GatewayClient(stack.url) as gw:
        assert gw.welcome is not None
        assert gw.welcome.protocol == 1
        stream = await gw.start(prompt, model="sonar")
        chunks = [chunk async for chunk in stream]
        answer = stream.result
    assert all(isinstance(c, str) and c for c in chunks)
    assert "".join(chunks) == expected_text(prompt) == answer.text
    assert isinstance(answer, Answer)
    assert answer.citations == tuple(choose_answer("Why is the sky blue?").citations)
    assert answer.usage is not None
    assert answer.usage["completion_tokens"] > 0
    assert answer.finish_reason == "stop"
    assert (answer.id, answer.seq, answer.cancelled) == (stream.id, stream.seq, False)
    assert stream.done
    record = stack.mock.record("one")
    assert record.outcome == "completed"
    assert record.body["model"] == "sonar"
    await stack.assert_no_leaks()


async def test_messages_and_options_reach_the_upstream(stack: Stack) -> None:
    """`start(messages=..., options=...)` sends them unchanged."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tides? [[mock chunks=2 tag=body]]"},
    ]
    async with GatewayClient(stack.url) as gw:
        stream = await gw.start(messages=messages, options={"temperature": 0.3})
        await stream.wait()
    body = stack.mock.record("body").body
    assert body["messages"] == messages
    assert body["temperature"] == 0.3


async def test_concurrent_streams_on_one_socket_via_gather(stack: Stack) -> None:
    """Eight streams started together on one socket each receive exactly their own answer."""
    topics = ["sky blue", "tides moon", "coffee", "bread", "leaves", "stars", "ocean", "cats"]
    prompts = [f"Why {t}? [[mock chunks={10 + i} delay_ms=2]]" for i, t in enumerate(topics)]
    async with GatewayClient(stack.url) as gw:
        streams = await asyncio.gather(*(gw.start(p) for p in prompts))
        assert len(stack.gateway.connections) == 1
        texts = await asyncio.gather(*(collect(s) for s in streams))
    assert texts == [expected_text(p) for p in prompts]
    assert [s.result.text for s in streams] == texts
    await stack.assert_no_leaks()


async def test_cancel_stops_one_stream_and_its_upstream(stack: Stack) -> None:
    """`cancel()` ends the stream with `cancelled` (the upstream sees its connection close)
    while another stream on the socket finishes untouched."""
    async with GatewayClient(stack.url) as gw:
        victim = await gw.start("sky [[mock chunks=500 delay_ms=20 tag=victim]]")
        other = await gw.start("tides [[mock chunks=20 delay_ms=5 tag=other]]")
        first = await anext(victim)
        await victim.cancel()
        assert victim.done
        rest = await collect(victim)  # the chunks queued before the cancel, then the end
        answer = victim.result
        assert answer.cancelled
        assert answer.text == first + rest
        assert await collect(other) == expected_text("tides [[mock chunks=20]]")
        await victim.cancel()  # a second cancel is a no-op
    record = stack.mock.record("victim")
    await asyncio.wait_for(record.ended.wait(), TIMEOUT)
    assert record.outcome == "client_closed"
    assert record.chunks_sent < 500
    assert metric(stack, "gateway_streams_ended_total", dialect="perplexity", outcome="cancelled")
    await stack.assert_no_leaks()


async def test_leaving_async_with_stream_cancels_it(stack: Stack) -> None:
    """Breaking out of `async with stream:` early cancels the stream at the gateway."""
    async with GatewayClient(stack.url) as gw:
        stream = await gw.start("sky [[mock chunks=500 delay_ms=20 tag=left]]")
        async with stream:
            async for _chunk in stream:
                break
        assert stream.result.cancelled
    record = stack.mock.record("left")
    await asyncio.wait_for(record.ended.wait(), TIMEOUT)
    assert record.outcome == "client_closed"


async def test_generated_ids_are_unique_and_given_ids_are_used(stack: Stack) -> None:
    """Ids are generated unique unless `id=` is given; an id still active is refused locally."""
    async with GatewayClient(stack.url) as gw:
        streams = await asyncio.gather(*(gw.start(f"q{i} [[mock chunks=1]]") for i in range(12)))
        assert len({s.id for s in streams}) == 12
        mine = await gw.start("sky [[mock chunks=50 delay_ms=20]]", id="mine")
        assert mine.id == "mine"
        with pytest.raises(ProtocolError) as info:
            await gw.start("again", id="mine")
        assert (info.value.code, info.value.retryable) == ("duplicate_id", False)
        with pytest.raises(ValueError, match="id must be"):
            await gw.start("bad", id="no spaces")
        await mine.cancel()
        await asyncio.gather(*(s.wait() for s in streams))


async def test_ping_measures_a_round_trip(stack: Stack) -> None:
    """`ping()` sends an application ping and returns when its pong arrives."""
    async with GatewayClient(stack.url) as gw:
        assert 0 <= await gw.ping() < TIMEOUT


# ------------------------------------------------------------------ typed errors


@pytest.mark.parametrize(("status", "retryable"), [(503, True), (429, True), (400, False)])
async def test_upstream_errors_are_typed(
    make_stack: StackFactory, status: int, retryable: bool
) -> None:
    """An upstream HTTP error surfaces as UpstreamError with the protocol's code, status and
    retryable flag, both from iteration and from `result`."""
    stack = await make_stack(upstream_retries=0)
    async with GatewayClient(stack.url) as gw:
        stream = await gw.start(f"sky [[mock status={status}]]")
        with pytest.raises(UpstreamError) as info:
            await collect(stream)
    error = info.value
    assert (error.code, error.retryable, error.status) == ("upstream_error", retryable, status)
    assert (error.stream_id, error.seq) == (stream.id, 0)
    assert isinstance(error, GatewayError)
    with pytest.raises(UpstreamError):
        _ = stream.result


async def test_interrupted_upstream_is_stream_interrupted(stack: Stack) -> None:
    """An upstream reset mid-answer raises StreamInterrupted after the chunks already sent."""
    async with GatewayClient(stack.url) as gw:
        stream = await gw.start("sky [[mock chunks=5 fault=reset after=2]]")
        received: list[str] = []

        async def read() -> None:
            async for chunk in stream:
                received.append(chunk)

        with pytest.raises(StreamInterrupted) as info:
            await read()
    assert info.value.retryable
    assert info.value.seq == stream.seq
    assert "".join(received) == stream.text != ""


async def test_refused_starts_raise_from_start(make_stack: StackFactory) -> None:
    """A start the gateway refuses raises from `start()`: a bad option is a ProtocolError, one
    stream too many is a retryable GatewayBusy, and the socket keeps working."""
    stack = await make_stack(max_streams=1)
    async with GatewayClient(stack.url) as gw:
        with pytest.raises(ProtocolError) as bad:
            await gw.start("sky", options={"stream": False})
        assert (bad.value.code, bad.value.retryable) == ("bad_message", False)
        busy = await gw.start("sky [[mock chunks=100 delay_ms=20]]")
        with pytest.raises(GatewayBusy) as full:
            await gw.start("tides")
        assert (full.value.code, full.value.retryable) == ("too_many_streams", True)
        await busy.cancel()
        assert await collect(await gw.start("tides [[mock chunks=2]]"))


async def test_oversized_start_is_refused_before_sending(make_stack: StackFactory) -> None:
    """A start over the welcome's max_message_bytes raises without reaching the gateway."""
    stack = await make_stack(max_message_bytes=4096)
    async with GatewayClient(stack.url) as gw:
        with pytest.raises(ProtocolError) as info:
            await gw.start("x" * 5000)
        assert info.value.code == "message_too_large"
        assert stack.gateway.active_streams == 0
        assert await gw.ping() >= 0


async def test_unreachable_gateway_raises_connection_lost() -> None:
    """Connecting to a port nobody listens on raises a retryable ConnectionLost."""
    with pytest.raises(ConnectionLost) as info:
        async with GatewayClient(f"ws://127.0.0.1:{free_port()}/v1/ws"):
            pass
    assert info.value.retryable


# ------------------------------------------------------------------ reconnects


def test_backoff_is_jittered_exponential_and_capped() -> None:
    """Each attempt waits rand * min(cap, base * factor**n); attempts run out at max_attempts."""
    backoff = Backoff(base=0.5, factor=2, cap=4, max_attempts=3)
    assert [backoff.ceiling(n) for n in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert backoff.delay(0, 0.0) == 0
    assert backoff.delay(2, 0.5) == 1
    assert backoff.delay(10_000, 0.999) == pytest.approx(3.996)
    assert [backoff.gives_up(n) for n in (1, 2, 3)] == [False, False, True]
    assert not Backoff(max_attempts=None).gives_up(10**6)
    with pytest.raises(ValueError, match="max_attempts"):
        Backoff(max_attempts=0)


async def test_reconnects_after_the_gateway_goes_away(make_stack: StackFactory) -> None:
    """After a drain closes the socket with 1001, the client reconnects with backoff to the
    gateway that listens next on the same address, and new streams run there."""
    stack = await make_stack(drain_timeout=5)
    port = stack.gateway.port
    successor: Gateway | None = None
    try:
        async with GatewayClient(stack.url, backoff=FAST) as gw:
            assert gw.welcome is not None
            first_session = gw.welcome.session
            assert await collect(await gw.start("sky [[mock chunks=2]]"))
            await stack.gateway.drain()
            successor = Gateway(Config(port=port), stack.gateway.upstream.url)
            await successor.start()
            stream = await asyncio.wait_for(gw.start("tides [[mock chunks=3]]"), TIMEOUT)
            assert await collect(stream) == expected_text("tides [[mock chunks=3]]")
            assert gw.welcome.session != first_session
            assert gw.connected
    finally:
        if successor is not None:
            await successor.stop()


async def test_resumes_a_stream_after_the_network_drops(stack: Stack) -> None:
    """When the socket dies without a close frame mid-answer, the client reconnects, resumes the
    stream with its resume_token from the last seq it received, and the answer completes with
    no chunk lost or repeated."""
    prompt = "sky [[mock chunks=40 delay_ms=10 tag=net]]"
    frames: list[dict[str, Any]] = []
    async with GatewayClient(stack.url, backoff=FAST, on_frame=frames.append) as gw:
        stream = await gw.start(prompt)
        assert stream.resumable
        received = [await anext(stream), await anext(stream)]
        (connection,) = stack.gateway.connections
        connection.ws.transport.abort()  # the network goes: no close frame reaches the client
        received += [chunk async for chunk in stream]
        answer = stream.result
    assert "".join(received) == answer.text == expected_text(prompt)
    assert answer.seq == stream.seq
    resumed = [f for f in frames if f["type"] == "resumed"]
    assert len(resumed) == 1
    assert resumed[0]["after"] >= 2
    assert [f["type"] for f in frames].count("welcome") == 2
    assert stack.mock.record("net").outcome == "completed"
    await stack.assert_no_leaks()


async def test_cancel_while_reconnecting_still_stops_the_upstream(stack: Stack) -> None:
    """A cancel issued while the socket is down is delivered after the resume on the new
    socket, so the upstream stops now instead of running on for the resume grace."""
    async with GatewayClient(stack.url, backoff=FAST) as gw:
        stream = await gw.start("sky [[mock chunks=500 delay_ms=20 tag=rc]]")
        assert await anext(stream)
        (connection,) = stack.gateway.connections
        connection.ws.transport.abort()
        await asyncio.wait_for(stream.cancel(), TIMEOUT)
        assert stream.result.cancelled
    record = stack.mock.record("rc")
    await asyncio.wait_for(record.ended.wait(), TIMEOUT)
    assert record.outcome == "client_closed"
    assert record.chunks_sent < 500
    assert metric(stack, "gateway_streams_ended_total", dialect="perplexity", outcome="cancelled")
    await stack.assert_no_leaks()


async def test_without_reconnect_a_dropped_stream_fails_with_connection_lost(stack: Stack) -> None:
    """With reconnect=False, a stream in flight when the gateway closes the socket (1001) fails
    with a retryable ConnectionLost carrying the close code, and later starts fail at once."""
    async with GatewayClient(stack.url, reconnect=False) as gw:
        stream = await gw.start("sky [[mock fault=stall after=1 tag=cut]]")
        assert await anext(stream)
        await stack.gateway.stop()
        with pytest.raises(ConnectionLost) as info:
            await collect(stream)
        assert (info.value.retryable, info.value.close_code) == (True, 1001)
        with pytest.raises(ConnectionLost):
            await gw.start("again")


# ------------------------------------------------------------------ authentication (real gateway)

TOKEN = "client-test-token-0123456789"


async def start_auth_stack(make_stack: StackFactory, tmp_path: Path, auth_timeout: float) -> Stack:
    """A gateway that requires the bearer token TOKEN (principal `alice`)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} alice\n", encoding="utf-8")
    return await make_stack(auth_tokens_file=str(tokens), auth_timeout=auth_timeout)


@pytest.fixture
async def auth_stack(make_stack: StackFactory, tmp_path: Path) -> Stack:
    """A gateway that requires the bearer token TOKEN, with a 1 s auth timeout."""
    return await start_auth_stack(make_stack, tmp_path, auth_timeout=1.0)


@pytest.mark.parametrize("auth", ["header", "message"])
async def test_token_is_accepted_by_an_authenticating_gateway(
    auth_stack: Stack, auth: Literal["header", "message"]
) -> None:
    """With the right token, sent as a header or as the first frame, streams run."""
    async with GatewayClient(auth_stack.url, token=TOKEN, auth=auth) as gw:
        stream = await gw.start("sky [[mock chunks=3]]")
        assert await collect(stream) == expected_text("sky [[mock chunks=3]]")


@pytest.mark.parametrize(("auth", "close_code"), [("header", None), ("message", 4401)])
async def test_wrong_token_raises_unauthorized(
    auth_stack: Stack, auth: Literal["header", "message"], close_code: int | None
) -> None:
    """A refused token raises Unauthorized (HTTP 401 on the upgrade, or close 4401 after a
    first-message auth), never retryable."""
    with pytest.raises(Unauthorized) as info:
        async with GatewayClient(auth_stack.url, token="wrong-token-0123456789", auth=auth):
            pass
    assert (info.value.retryable, info.value.close_code) == (False, close_code)


async def test_without_a_token_unauthorized_comes_at_once(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    """A client without a token learns at once that the gateway wants one: its first frame (a
    ping) is not `auth`, so the gateway closes with 4401 instead of waiting out its auth
    timeout (60 s here), and the error says that a token is required, not that it was refused."""
    stack = await start_auth_stack(make_stack, tmp_path, auth_timeout=60.0)
    async with asyncio.timeout(5):
        with pytest.raises(Unauthorized) as info:
            async with GatewayClient(stack.url):
                pass
    assert (info.value.retryable, info.value.close_code) == (False, 4401)
    assert info.value.message == "the gateway requires a token and none was given"


# ------------------------------------------------------------------ scripted server (auth, resume)

Handler = Callable[[ServerConnection, int], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted(
    handler: Handler, *, probe: bool = True
) -> AsyncIterator[tuple[str, list[ServerConnection]]]:
    """A protocol-v1 server whose n-th connection runs `handler(ws, n)` after the welcome.

    With `probe`, each connection first answers the ping that a client without a token sends
    to learn whether the server requires one (an open server answers pong)."""
    seen: list[ServerConnection] = []

    async def run(ws: ServerConnection) -> None:
        seen.append(ws)
        await ws.send(orjson.dumps(WELCOME).decode())
        if probe:
            assert await recv_json(ws) == {"type": "ping"}
            await send_json(ws, {"type": "pong"})
        await handler(ws, len(seen))

    async with serve(run, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/ws", seen


WELCOME = {
    "type": "welcome",
    "protocol": 1,
    "session": "scripted-session-0001",
    "limits": {"max_streams": 16, "max_message_bytes": 65536},
    "parts": ["reasoning", "sources", "tools", "progress"],
}


async def recv_json(ws: ServerConnection) -> dict[str, Any]:
    """Receive one client frame and check it against docs/asyncapi.yaml."""
    frame: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    validate_client_frame(frame)
    return frame


async def send_json(ws: ServerConnection, frame: dict[str, Any]) -> None:
    validate_server_frame(frame)  # the script itself speaks the documented protocol
    await ws.send(orjson.dumps(frame).decode())


async def test_token_goes_in_the_upgrade_header_or_an_auth_frame() -> None:
    """`token=` is sent as `Authorization: Bearer` by default, as a first auth frame with
    auth="message"."""
    frames: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection, n: int) -> None:
        with contextlib.suppress(ConnectionClosed):
            frames.append(await recv_json(ws))

    async with scripted(handler, probe=False) as (url, seen):
        async with GatewayClient(url, token="t0k3n"):
            pass
        async with GatewayClient(url, token="t0k3n", auth="message"):
            pass
        assert seen[0].request is not None
        assert seen[1].request is not None
        assert seen[0].request.headers["Authorization"] == "Bearer t0k3n"
        assert "Authorization" not in seen[1].request.headers
    assert {"type": "auth", "token": "t0k3n"} in frames


async def test_close_4401_raises_unauthorized_and_never_reconnects() -> None:
    """A socket closed with 4401 fails its streams with Unauthorized and is not reopened."""

    async def handler(ws: ServerConnection, n: int) -> None:
        start = await recv_json(ws)
        await send_json(ws, {"type": "started", "id": start["id"]})
        await ws.close(4401, "unauthorized")

    async with scripted(handler) as (url, seen), GatewayClient(url, backoff=FAST) as gw:
        stream = await gw.start("hi")
        with pytest.raises(Unauthorized) as info:
            await collect(stream)
        assert not info.value.retryable
        with pytest.raises(Unauthorized):
            await gw.start("again")
        assert len(seen) == 1


async def test_resume_after_a_drop_continues_the_stream_without_duplicates() -> None:
    """A stream whose `started` carried a resume_token survives a dropped socket: the client
    reconnects, sends resume with the last seq it received, skips re-sent chunks and finishes."""
    resumes: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection, n: int) -> None:
        if n == 1:
            start = await recv_json(ws)
            sid = start["id"]
            await send_json(ws, {"type": "started", "id": sid, "resume_token": "rt-1"})
            await send_json(ws, {"type": "text_chunk", "id": sid, "seq": 1, "text": "The "})
            await send_json(ws, {"type": "text_chunk", "id": sid, "seq": 2, "text": "sky "})
            await ws.close(1001, "going away")
            return
        resume = await recv_json(ws)
        resumes.append(resume)
        sid = resume["id"]
        await send_json(ws, {"type": "resumed", "id": sid, "after": 2})
        await send_json(ws, {"type": "text_chunk", "id": sid, "seq": 2, "text": "sky "})
        await send_json(ws, {"type": "text_chunk", "id": sid, "seq": 3, "text": "is blue."})
        done = {"type": "done", "id": sid, "seq": 3, "text": "The sky is blue."}
        await send_json(ws, {**done, "citations": ["https://example.org/sky"]})
        await ws.wait_closed()

    async with scripted(handler) as (url, seen), GatewayClient(url, backoff=FAST) as gw:
        stream = await gw.start("Why is the sky blue?")
        assert stream.resumable
        assert await collect(stream) == "The sky is blue."
        assert stream.result.citations == ("https://example.org/sky",)
        assert len(seen) == 2
    assert resumes == [{"type": "resume", "id": stream.id, "resume_token": "rt-1", "after": 2}]


async def test_refused_resume_fails_the_stream_with_the_gateway_code() -> None:
    """A resume the gateway refuses (`resume_unavailable`) fails the stream with a
    ConnectionLost carrying that code; the socket stays usable."""

    async def handler(ws: ServerConnection, n: int) -> None:
        first = await recv_json(ws)
        if n == 1:
            await send_json(ws, {"type": "started", "id": first["id"], "resume_token": "rt-9"})
            await ws.close(1011, "internal error")
            return
        refusal = {"type": "error", "id": first["id"], "code": "resume_unavailable"}
        await send_json(ws, {**refusal, "message": "no longer retained", "retryable": False})
        ping = await recv_json(ws)
        assert ping == {"type": "ping"}
        await send_json(ws, {"type": "pong"})
        await ws.wait_closed()

    async with scripted(handler) as (url, _seen), GatewayClient(url, backoff=FAST) as gw:
        stream = await gw.start("hi")
        with pytest.raises(ConnectionLost) as info:
            await collect(stream)
        assert (info.value.code, info.value.retryable) == ("resume_unavailable", True)
        assert await gw.ping() >= 0


# ------------------------------------------------------------------ typed parts (scripted)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
SKY = "https://en.wikipedia.org/wiki/Rayleigh_scattering"
SKY_SOURCE = {"index": 1, "url": SKY, "title": "Rayleigh scattering", "date": "2025-01-20"}


def part_frames(sid: str) -> list[dict[str, Any]]:
    """One message of every content kind, seq 1 to 7, then `done`."""
    return [
        {"type": "reasoning_chunk", "id": sid, "seq": 1, "text": "The user asks "},
        {"type": "reasoning_chunk", "id": sid, "seq": 2, "text": "about light."},
        {"type": "progress", "id": sid, "seq": 3, "step": {"kind": "search", "queries": ["sky"]}},
        {"type": "sources", "id": sid, "seq": 4, "sources": [SKY_SOURCE]},
        {"type": "text_chunk", "id": sid, "seq": 5, "text": "Blue light scatters more[1]. "},
        {"type": "tool_call", "id": sid, "seq": 6, "call_id": "call_1", "name": "get_weather",
         "arguments": {"city": "Paris"}},
        {"type": "tool_call", "id": sid, "seq": 7, "call_id": "call_2", "name": "get_weather",
         "arguments_raw": '{"city": Par'},
        {"type": "done", "id": sid, "seq": 7, "text": "Blue light scatters more[1]. ",
         "citations": [SKY], "reasoning": "The user asks about light.",
         "tool_calls": [
             {"call_id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}},
             {"call_id": "call_2", "name": "get_weather", "arguments_raw": '{"city": Par'},
         ],
         "finish_reason": "tool_calls"},
    ]  # fmt: skip


async def test_parts_yield_every_kind_in_order_while_iteration_stays_text() -> None:
    """`start(parts=..., tools=..., tool_choice=...)` asks for the parts (tools in options,
    the "tools" part implied); `stream.parts()` yields every kind as a typed part in the order
    sent, text included, while `async for chunk in stream` still yields only the text; the
    result carries the reasoning, sources, tool calls and finish reason."""
    starts: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection, n: int) -> None:
        start = await recv_json(ws)
        starts.append(start)
        await send_json(ws, {"type": "started", "id": start["id"]})
        for frame in part_frames(start["id"]):
            await send_json(ws, frame)
        await ws.wait_closed()

    async with scripted(handler) as (url, _seen), GatewayClient(url) as gw:
        assert gw.welcome is not None
        assert gw.welcome.parts == ("reasoning", "sources", "tools", "progress")
        stream = await gw.start(
            "Why is the sky blue?",
            parts=["reasoning", "sources", "progress"],
            tools=[WEATHER_TOOL],
            tool_choice="auto",
        )
        parts = [part async for part in stream.parts()]
        text = await collect(stream)  # the other view of the same messages
        answer = stream.result
    assert starts[0]["parts"] == ["reasoning", "sources", "progress", "tools"]
    assert starts[0]["options"] == {"tools": [WEATHER_TOOL], "tool_choice": "auto"}
    assert [p.kind for p in parts] == [
        "reasoning", "reasoning", "progress", "sources", "text", "tool_call", "tool_call",
    ]  # fmt: skip
    assert [p.seq for p in parts] == [1, 2, 3, 4, 5, 6, 7]
    reasoning, _, progress, sources, chunk, call, bad = parts
    assert isinstance(reasoning, ReasoningPart)
    assert reasoning.text == "The user asks "
    assert isinstance(progress, ProgressPart)
    assert progress.step == {"kind": "search", "queries": ["sky"]}
    assert isinstance(sources, SourcesPart)
    assert sources.sources == (Source(1, SKY, "Rayleigh scattering", None, "2025-01-20"),)
    assert chunk == TextPart(5, "Blue light scatters more[1]. ")
    assert isinstance(call, ToolCallPart)
    assert (call.call_id, call.name, call.arguments, call.arguments_raw) == (
        "call_1", "get_weather", {"city": "Paris"}, None,
    )  # fmt: skip
    assert isinstance(bad, ToolCallPart)
    assert (bad.arguments, bad.arguments_raw) == (None, '{"city": Par')
    assert text == answer.text == "Blue light scatters more[1]. "
    assert answer.reasoning == stream.reasoning == "The user asks about light."
    assert answer.sources == stream.sources == sources.sources
    assert answer.tool_calls == (call.call, bad.call)
    assert (answer.finish_reason, answer.refusal, answer.seq) == ("tool_calls", False, 7)


async def test_a_stream_without_parts_sends_the_protocol_1_start() -> None:
    """Without parts or tools, the start frame has no `parts` (protocol 1 exactly), and a
    refusal's `done.refusal` reaches the result."""
    starts: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection, n: int) -> None:
        start = await recv_json(ws)
        starts.append(start)
        sid = start["id"]
        await send_json(ws, {"type": "started", "id": sid})
        await send_json(ws, {"type": "text_chunk", "id": sid, "seq": 1, "text": "I can't."})
        done = {"type": "done", "id": sid, "seq": 1, "text": "I can't.", "refusal": True}
        await send_json(ws, done)
        await ws.wait_closed()

    async with scripted(handler) as (url, _seen), GatewayClient(url) as gw:
        stream = await gw.start("Do something bad", id="plain")
        assert [p async for p in stream.parts()] == [TextPart(1, "I can't.")]
        assert stream.result.refusal
    assert starts == [{"type": "start", "id": "plain", "prompt": "Do something bad"}]


async def test_start_refuses_tools_given_twice_and_parts_given_as_a_string() -> None:
    """`tools=` and `options={"tools": ...}` together, or `parts="reasoning"`, raise before
    anything is sent."""
    async with scripted(lambda ws, n: ws.wait_closed()) as (url, _seen), GatewayClient(url) as gw:
        with pytest.raises(TypeError, match="tools once"):
            await gw.start("x", tools=[WEATHER_TOOL], options={"tools": [WEATHER_TOOL]})
        with pytest.raises(TypeError, match="parts must be a list"):
            await gw.start("x", parts="reasoning")


async def test_resume_after_a_drop_keeps_every_kind_exactly_once() -> None:
    """The seq that text and parts share is what the client resumes from: after a drop in the
    middle of the parts, every message arrives once, in order, replayed ones skipped."""
    resumes: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection, n: int) -> None:
        if n == 1:
            sid = (await recv_json(ws))["id"]
            await send_json(ws, {"type": "started", "id": sid, "resume_token": "rt-parts"})
            for frame in part_frames(sid)[:4]:
                await send_json(ws, frame)
            await ws.close(1001, "going away")
            return
        resume = await recv_json(ws)
        resumes.append(resume)
        sid = resume["id"]
        await send_json(ws, {"type": "resumed", "id": sid, "after": resume["after"]})
        for frame in part_frames(sid)[2:]:  # from an earlier seq: the client skips 3 and 4
            await send_json(ws, frame)
        await ws.wait_closed()

    async with scripted(handler) as (url, seen), GatewayClient(url, backoff=FAST) as gw:
        stream = await gw.start("sky", parts=["reasoning", "sources", "progress", "tools"])
        parts = [part async for part in stream.parts()]
        assert len(seen) == 2
    assert resumes == [{"type": "resume", "id": stream.id, "resume_token": "rt-parts", "after": 4}]
    assert [p.seq for p in parts] == [1, 2, 3, 4, 5, 6, 7]
    assert stream.result.text == "Blue light scatters more[1]. "
    assert len(stream.result.sources) == 1


async def test_a_gap_in_the_shared_seq_fails_the_stream() -> None:
    """A message whose seq skips one (of any kind) fails the stream with invalid_frame: a
    part lost is an answer silently wrong."""

    async def handler(ws: ServerConnection, n: int) -> None:
        sid = (await recv_json(ws))["id"]
        await send_json(ws, {"type": "started", "id": sid})
        await send_json(ws, {"type": "reasoning_chunk", "id": sid, "seq": 1, "text": "Hm."})
        await send_json(ws, {"type": "text_chunk", "id": sid, "seq": 3, "text": "Blue."})
        await ws.wait_closed()

    async with scripted(handler) as (url, _seen), GatewayClient(url) as gw:
        stream = await gw.start("sky", parts=["reasoning"])
        with pytest.raises(ProtocolError) as info:
            await collect(stream)
    assert info.value.code == "invalid_frame"
    assert "seq jumped from 1 to 3" in info.value.message


async def test_cancelled_and_failed_streams_keep_their_usage_and_parts() -> None:
    """`cancelled` and a terminal `error` carry the upstream's usage: a cancelled result has it
    (with the reasoning and sources received), a failed stream's error has it."""
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}

    async def handler(ws: ServerConnection, n: int) -> None:
        first = await recv_json(ws)
        a = first["id"]
        await send_json(ws, {"type": "started", "id": a})
        await send_json(ws, part_frames(a)[0])
        await send_json(ws, part_frames(a)[3] | {"seq": 2})
        assert await recv_json(ws) == {"type": "cancel", "id": a}
        await send_json(ws, {"type": "cancelled", "id": a, "seq": 2, "usage": usage})
        b = (await recv_json(ws))["id"]
        await send_json(ws, {"type": "started", "id": b})
        error = {"type": "error", "id": b, "code": "stream_interrupted", "message": "reset"}
        await send_json(ws, error | {"retryable": True, "seq": 0, "usage": usage})
        await ws.wait_closed()

    async with scripted(handler) as (url, _seen), GatewayClient(url) as gw:
        stream = await gw.start("sky", parts=["reasoning", "sources"])
        parts = stream.parts()
        assert (await anext(parts)).kind == "reasoning"
        assert (await anext(parts)).kind == "sources"
        await stream.cancel()
        answer = stream.result
        assert (answer.cancelled, answer.usage) == (True, usage)
        assert (answer.reasoning, len(answer.sources)) == ("The user asks ", 1)
        failing = await gw.start("tides")
        with pytest.raises(StreamInterrupted) as info:
            await collect(failing)
        assert info.value.usage == usage


# ------------------------------------------------------------------ typed parts (real gateway)


async def test_reasoning_and_sources_stream_from_a_think_block(stack: Stack) -> None:
    """Against the real gateway and a Perplexity-shaped upstream whose answer starts with a
    `<think>` block and carries citations: the reasoning and the sources arrive as parts before
    the text, seqs contiguous across kinds, and the text has no reasoning in it."""
    prompt = "Why is the sky blue? [[mock reasoning=think sources=3 chunks=8 tag=think]]"
    async with GatewayClient(stack.url) as gw:
        assert gw.welcome is not None
        assert set(gw.welcome.parts) >= {"reasoning", "sources"}
        stream = await gw.start(prompt, parts=["reasoning", "sources"])
        parts = [part async for part in stream.parts()]
        answer = stream.result
    assert [p.seq for p in parts] == list(range(1, len(parts) + 1))
    kinds = [p.kind for p in parts]
    assert set(kinds) == {"reasoning", "sources", "text"}
    assert kinds.index("reasoning") < kinds.index("text")
    text = "".join(p.text for p in parts if p.kind == "text")
    assert text == answer.text
    assert "<think>" not in text
    assert answer.text.strip() == expected_text(prompt).strip()
    reasoning = reasoning_text(choose_answer("Why is the sky blue?"))
    assert answer.reasoning.strip() == reasoning
    assert [s.index for s in answer.sources] == [1, 2, 3]
    assert all(s.url.startswith("https://") for s in answer.sources)
    assert [s.url for s in answer.sources] == list(answer.citations)
    await stack.assert_no_leaks()


async def test_reasoning_never_mixes_into_text_when_not_asked(stack: Stack) -> None:
    """A client that asks for no parts gets the answer without its `<think>` block, and no
    part messages."""
    prompt = "Why is the sky blue? [[mock reasoning=think chunks=6]]"
    frames: list[dict[str, Any]] = []
    async with GatewayClient(stack.url, on_frame=frames.append) as gw:
        stream = await gw.start(prompt)
        parts = [part async for part in stream.parts()]
    assert {p.kind for p in parts} == {"text"}
    assert "<think>" not in stream.result.text
    assert stream.result.reasoning == ""
    assert {f["type"] for f in frames} == {"welcome", "started", "text_chunk", "done"}


async def test_concise_mode_streams_progress_steps(stack: Stack) -> None:
    """Perplexity's concise mode: its reasoning steps arrive as progress parts (a search with
    its queries first), before the answer's text."""
    prompt = "Why is the sky blue? [[mock concise=1 tag=concise]]"
    async with GatewayClient(stack.url) as gw:
        stream = await gw.start(
            prompt, parts=["progress", "sources"], options={"stream_mode": "concise"}
        )
        parts = [part async for part in stream.parts()]
    steps = [p.step for p in parts if isinstance(p, ProgressPart)]
    assert steps
    assert steps[0]["kind"] == "search"
    assert steps[0]["queries"]
    kinds = [p.kind for p in parts]
    assert kinds.index("progress") < kinds.index("text")
    assert stack.mock.record("concise").body["stream_mode"] == "concise"


async def test_tool_loop_over_the_gateway(make_stack: StackFactory) -> None:
    """An OpenAI-compatible upstream answers with two tool calls: they arrive as ToolCallParts
    and in the result (finish_reason tool_calls); the next start carries the assistant message
    with its tool_calls (content None) and one tool message per result, which reach the
    upstream as sent."""
    stack = await make_stack(dialect="openai")
    async with GatewayClient(stack.url) as gw:
        question = {"role": "user", "content": "Weather and time in Paris? [[mock tools=2]]"}
        first = await gw.start(messages=[question], tools=[WEATHER_TOOL], tool_choice="auto")
        calls = [part async for part in first.parts() if isinstance(part, ToolCallPart)]
        answer = first.result
        assert [c.name for c in calls] == ["get_weather", "get_time"]
        assert calls[0].arguments == {"location": "Paris, France", "unit": "celsius"}
        assert answer.tool_calls == tuple(c.call for c in calls)
        assert answer.finish_reason == "tool_calls"
        assistant = answer.assistant_message()
        assert assistant["content"] is None
        results = [
            {"role": "tool", "tool_call_id": c.call_id, "content": f'{{"ok": {i}}}'}
            for i, c in enumerate(calls)
        ]
        follow_up = [
            {"role": "user", "content": "Weather and time in Paris? [[mock tag=loop]]"},
            assistant,
            *results,
        ]
        second = await gw.start(messages=follow_up, tools=[WEATHER_TOOL])
        assert await collect(second)
    body = stack.mock.record("loop").body
    assert body["messages"][1:] == [assistant, *results]
    assert body["messages"][1]["tool_calls"][0]["function"]["arguments"] == (
        '{"location":"Paris, France","unit":"celsius"}'
    )
    assert body["tools"] == [WEATHER_TOOL]


async def test_resume_with_parts_against_the_real_gateway(stack: Stack) -> None:
    """A socket lost while reasoning streams: the client resumes from the shared seq and
    every part and chunk arrives exactly once."""
    prompt = "sky [[mock reasoning=think sources=grow:4 chunks=30 delay_ms=10 tag=rp]]"
    async with GatewayClient(stack.url, backoff=FAST) as gw:
        stream = await gw.start(prompt, parts=["reasoning", "sources"])
        parts = stream.parts()
        received = [await anext(parts), await anext(parts)]
        (connection,) = stack.gateway.connections
        connection.ws.transport.abort()
        received += [part async for part in parts]
        answer = stream.result
    assert [p.seq for p in received] == list(range(1, len(received) + 1))
    assert "".join(p.text for p in received if p.kind == "text") == answer.text
    assert [s.index for s in answer.sources] == [1, 2, 3, 4]
    assert stack.mock.record("rp").outcome == "completed"
    await stack.assert_no_leaks()


# ------------------------------------------------------------------ the CLI


async def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    stdout: int = asyncio.subprocess.PIPE,
    stderr: int = asyncio.subprocess.PIPE,
) -> asyncio.subprocess.Process:
    """Start `python -m gateway_client ...`, by default with piped stdout and stderr (pass
    `stderr=asyncio.subprocess.STDOUT` for both on one pipe, as on a terminal)."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_URL", "GATEWAY_TOKEN")}
    full_env = {**inherited, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(CLIENT_SRC), *filter(None, [full_env.get("PYTHONPATH")])]
    )
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway_client",
        *args,
        stdout=stdout,
        stderr=stderr,
        env=full_env,
    )


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    """Wait for the CLI to exit: its status and the rest of what it wrote to the pipes."""
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, (out or b"").decode(), (err or b"").decode()


async def test_cli_ask_streams_the_answer_and_numbers_citations(stack: Stack) -> None:
    """`gateway-client ask` prints the answer, then the citations as a numbered list; exit 0."""
    prompt = "Why is the sky blue? [[mock chunks=6]]"
    code, out, err = await finish(await run_cli("ask", prompt, "--url", stack.url))
    assert (code, err) == (0, "")
    citations = choose_answer("Why is the sky blue?").citations
    sources = "".join(f"[{n}] {url}\n" for n, url in enumerate(citations, 1))
    assert out == expected_text(prompt) + "\n\nSources:\n" + sources


async def test_cli_ask_works_where_signal_handlers_cannot_be_installed(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    """Off the main thread the loop refuses signal handlers (RuntimeError; some platforms raise
    NotImplementedError): `ask` then runs without its Ctrl-C handler, and still answers."""
    from gateway_client._cli import main

    prompt = "Why is the sky blue? [[mock chunks=3]]"
    # The in-process gateway logs to the same stdout, from the loop's thread: captured instead,
    # or a line of it may land in the middle of the answer.
    with structlog.testing.capture_logs():
        code = await asyncio.to_thread(main, ["ask", prompt, "--url", stack.url])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith(expected_text(prompt) + "\n\nSources:\n[1] ")


async def test_cli_json_prints_every_frame(stack: Stack) -> None:
    """`--json` prints the raw protocol frames one per line, each valid per docs/asyncapi.yaml."""
    prompt = "Why is the sky blue? [[mock chunks=4]]"
    code, out, _err = await finish(await run_cli("ask", prompt, "--url", stack.url, "--json"))
    assert code == 0
    frames = [orjson.loads(line) for line in out.splitlines()]
    for frame in frames:
        validate_server_frame(frame)
    kinds = [f["type"] for f in frames]
    assert kinds[:2] == ["welcome", "started"]
    assert kinds[-1] == "done"
    assert set(kinds[2:-1]) == {"text_chunk"}
    assert frames[-1]["text"] == expected_text(prompt)


async def test_cli_error_exits_nonzero_with_the_code(make_stack: StackFactory) -> None:
    """An upstream error makes the CLI exit 1 with a message naming the protocol code."""
    stack = await make_stack(upstream_retries=0)
    code, _out, err = await finish(
        await run_cli("ask", "x [[mock status=400]]", "--url", stack.url)
    )
    assert code == 1
    assert "upstream_error" in err


async def test_cli_sends_the_token_from_token_env(auth_stack: Stack) -> None:
    """`--token-env NAME` authenticates with the token held by NAME, and without the flag the
    token in GATEWAY_TOKEN is used; with neither, the CLI exits 1 naming `unauthorized`."""
    env = {"GATEWAY_CLIENT_TEST_TOKEN": TOKEN}
    args = ("ask", "sky [[mock chunks=2]]", "--url", auth_stack.url)
    proc = await run_cli(*args, "--token-env", "GATEWAY_CLIENT_TEST_TOKEN", env=env)
    code, out, _err = await finish(proc)
    assert code == 0
    assert out.startswith(expected_text("sky [[mock chunks=2]]"))
    code, out, _err = await finish(await run_cli(*args, env={"GATEWAY_TOKEN": TOKEN}))
    assert code == 0
    assert out.startswith(expected_text("sky [[mock chunks=2]]"))
    code, _out, err = await finish(await run_cli(*args))
    assert code == 1
    assert "unauthorized" in err


async def test_cli_missing_token_env_is_a_usage_error(stack: Stack) -> None:
    """`--token-env NAME` with NAME unset exits 2 and names the variable."""
    env = {"GATEWAY_CLIENT_TEST_TOKEN": ""}
    proc = await run_cli(
        "ask", "hi", "--url", stack.url, "--token-env", "GATEWAY_CLIENT_TEST_TOKEN", env=env
    )
    code, _out, err = await finish(proc)
    assert code == 2
    assert "GATEWAY_CLIENT_TEST_TOKEN" in err


async def test_cli_sigint_cancels_the_stream_and_exits_130(stack: Stack) -> None:
    """Ctrl-C mid-stream sends `cancel` (the gateway ends the stream as cancelled and closes
    the upstream) and the CLI exits 130; with stdout and stderr on one terminal, the partial
    answer is ended with a newline so that `gateway-client: cancelled` has a line of its own."""
    prompt = "sky [[mock chunks=500 delay_ms=20 tag=sigint]]"
    proc = await run_cli("ask", prompt, "--url", stack.url, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.read(1), TIMEOUT)  # the answer is streaming
    assert first
    proc.send_signal(signal.SIGINT)
    code, rest, _err = await finish(proc)
    assert code == 130
    partial, sep, message = (first.decode() + rest).rpartition("\n" + CANCELLED)
    assert (sep, message) == ("\n" + CANCELLED, "")
    assert partial
    assert expected_text(prompt).startswith(partial)
    record = stack.mock.record("sigint")
    await asyncio.wait_for(record.ended.wait(), TIMEOUT)
    assert record.outcome == "client_closed"
    assert record.chunks_sent < 500
    await stack.assert_no_leaks()
    ended = metric(stack, "gateway_streams_ended_total", dialect="perplexity", outcome="cancelled")
    assert ended == 1  # a cancel frame, not just a closed socket


CANCELLED = "gateway-client: cancelled\n"


@pytest.mark.parametrize("text", ["The sky is", "The sky is blue.\n"], ids=["mid-line", "eol"])
async def test_cli_cancelled_message_starts_a_line_of_its_own(text: str) -> None:
    """After Ctrl-C the output so far is ended with a newline only when it does not already end
    with one, so `gateway-client: cancelled` starts its own line with no blank line before."""
    cancels: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection, n: int) -> None:
        sid = (await recv_json(ws))["id"]
        await send_json(ws, {"type": "started", "id": sid})
        await send_json(ws, {"type": "text_chunk", "id": sid, "seq": 1, "text": text})
        cancels.append(await recv_json(ws))
        await send_json(ws, {"type": "cancelled", "id": sid, "seq": 1})
        await ws.wait_closed()

    async with scripted(handler) as (url, _seen):
        proc = await run_cli("ask", "sky", "--url", url, stderr=asyncio.subprocess.STDOUT)
        assert proc.stdout is not None
        shown = await asyncio.wait_for(proc.stdout.readexactly(len(text.encode())), TIMEOUT)
        proc.send_signal(signal.SIGINT)
        code, rest, _err = await finish(proc)
    assert code == 130
    assert shown.decode() + rest == text.removesuffix("\n") + "\n" + CANCELLED
    assert [c["type"] for c in cancels] == ["cancel"]


@pytest.mark.parametrize("json_mode", [True, False], ids=["json", "plain"])
async def test_cli_closed_stdout_cancels_the_stream_and_exits_141(
    stack: Stack, json_mode: bool
) -> None:
    """`gateway-client ask ... | head -3`: once the reader of stdout has gone, the CLI cancels
    the stream with a `cancel` frame (the upstream stops after a few of its 400 chunks) and exits
    141 (128 + SIGPIPE) without a word on stderr: no traceback, no BrokenPipeError."""
    prompt = "sky [[mock chunks=400 delay_ms=20 tag=pipe]]"
    read_fd, write_fd = os.pipe()
    try:
        args = ("ask", prompt, "--url", stack.url, *(["--json"] if json_mode else []))
        proc = await run_cli(*args, stdout=write_fd)
    finally:
        os.close(write_fd)
    reader = asyncio.StreamReader()
    transport, _protocol = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
    )
    try:
        if json_mode:  # head -3
            lines = [await asyncio.wait_for(reader.readline(), TIMEOUT) for _ in range(3)]
            assert [orjson.loads(line)["type"] for line in lines] == [
                "welcome",
                "started",
                "text_chunk",
            ]
        else:  # head -c 1
            assert await asyncio.wait_for(reader.read(1), TIMEOUT)
    finally:
        transport.close()  # the reader goes away
    code, _out, err = await finish(proc)
    assert (code, err) == (141, "")
    record = stack.mock.record("pipe")
    await asyncio.wait_for(record.ended.wait(), TIMEOUT)
    assert record.outcome == "client_closed"
    assert record.chunks_sent < 100
    await stack.assert_no_leaks()
    ended = metric(stack, "gateway_streams_ended_total", dialect="perplexity", outcome="cancelled")
    assert ended == 1  # a cancel frame, not just a closed socket


def cli_parts_script(texts: list[str], starts: list[dict[str, Any]]) -> Handler:
    """A server that answers with reasoning (a leading newline), then the text pieces `texts`
    with a source arriving after the first one."""

    async def handler(ws: ServerConnection, n: int) -> None:
        start = await recv_json(ws)
        starts.append(start)
        sid = start["id"]
        frames: list[dict[str, Any]] = [
            {"type": "reasoning_chunk", "id": sid, "text": "\nThe user asks "},
            {"type": "reasoning_chunk", "id": sid, "text": "about light."},
            {"type": "text_chunk", "id": sid, "text": texts[0]},
            {"type": "sources", "id": sid, "sources": [SKY_SOURCE]},
            *({"type": "text_chunk", "id": sid, "text": text} for text in texts[1:]),
        ]
        await send_json(ws, {"type": "started", "id": sid})
        for seq, frame in enumerate(frames, 1):
            await send_json(ws, {**frame, "seq": seq})
        done = {"type": "done", "id": sid, "seq": len(frames), "text": "".join(texts)}
        await send_json(ws, {**done, "citations": [SKY], "reasoning": "The user asks about light."})
        await ws.wait_closed()

    return handler


SOURCE_LINE = f"[1] {SKY} - Rayleigh scattering\n"


async def test_cli_reasoning_comes_before_the_answer_and_sources_go_to_stderr() -> None:
    """`ask --reasoning --sources` asks for both parts; stdout (not a terminal: no escape codes)
    is the reasoning, a blank line and the answer; each source goes to stderr as it arrives, and
    no citation list follows the answer."""
    starts: list[dict[str, Any]] = []
    texts = ["\n\nBlue light ", "scatters more[1]."]
    async with scripted(cli_parts_script(texts, starts)) as (url, _seen):
        proc = await run_cli("ask", "sky", "--url", url, "--reasoning", "--sources")
        code, out, err = await finish(proc)
    assert starts[0]["parts"] == ["reasoning", "sources"]
    assert (code, err) == (0, SOURCE_LINE)
    assert out == "The user asks about light.\n\nBlue light scatters more[1].\n"


async def test_cli_a_source_never_splits_a_line_of_the_answer() -> None:
    """With stdout and stderr on one file (a terminal, 2>&1), a source that arrives mid-line is
    held until that line of the answer ends."""
    starts: list[dict[str, Any]] = []
    texts = ["Blue light ", "scatters.\nMore ", "text."]
    async with scripted(cli_parts_script(texts, starts)) as (url, _seen):
        proc = await run_cli(
            "ask", "sky", "--url", url, "--sources", stderr=asyncio.subprocess.STDOUT
        )
        code, out, _err = await finish(proc)
    assert starts[0]["parts"] == ["sources"]
    assert code == 0
    assert out == "Blue light scatters.\n" + SOURCE_LINE + "More text.\n"


@pytest.mark.parametrize("no_color", ["", "1"], ids=["color", "NO_COLOR"])
async def test_cli_reasoning_is_dimmed_only_on_a_terminal(no_color: str) -> None:
    """On a terminal the reasoning is dimmed (ANSI faint, then normal intensity before the
    answer), unless NO_COLOR is set."""
    starts: list[dict[str, Any]] = []
    master, slave = pty.openpty()
    try:
        async with scripted(cli_parts_script(["Blue."], starts)) as (url, _seen):
            env = {"NO_COLOR": no_color, "TERM": "xterm"}
            proc = await run_cli("ask", "sky", "--url", url, "--reasoning", stdout=slave, env=env)
            os.close(slave)
            slave = -1
            code, _out, err = await finish(proc)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once everything written was read
            while chunk := os.read(master, 4096):
                shown += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert (code, err) == (0, "")
    text = shown.decode().replace("\r\n", "\n")
    reasoning = "The user asks about light."
    if no_color:
        assert text == f"{reasoning}\n\nBlue.\n\nSources:\n[1] {SKY}\n"
    else:
        assert text == f"\x1b[2m{reasoning}\x1b[22m\n\nBlue.\n\nSources:\n[1] {SKY}\n"


BAD_USAGE = [
    ["ask", ""],
    ["ask", " \t\n"],
    [],
    ["ask"],
    ["ask", "Why?", "--model", ""],
    ["ask", "Why?", "--url", "http://127.0.0.1:8080/v1/ws"],
    ["ask", "Why?", "--no-such-flag"],
]


async def test_cli_bad_usage_is_one_line_and_exit_2() -> None:
    """An empty or blank prompt, no prompt or command, an empty model, a URL that is not
    ws:// or wss://, an unknown flag: each exits 2 with one line on stderr (what is wrong and
    which --help to read), nothing on stdout, and no traceback."""
    procs = [await run_cli(*argv) for argv in BAD_USAGE]
    results = await asyncio.gather(*(finish(proc) for proc in procs))
    for argv, (code, out, err) in zip(BAD_USAGE, results, strict=True):
        assert (code, out) == (2, ""), (argv, err)
        assert err.startswith("gateway-client: "), (argv, err)
        assert err.endswith(" --help')\n"), (argv, err)
        assert err.count("\n") == 1, (argv, err)
    assert "the prompt is empty" in results[0][2]
    assert "the prompt is empty" in results[1][2]


async def test_cli_without_a_token_says_at_once_how_to_pass_one(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    """Against a gateway that requires a token, `ask` without one fails at once, not after the
    gateway's auth timeout (60 s here), and says how to give one: GATEWAY_TOKEN or
    --token-env NAME."""
    stack = await start_auth_stack(make_stack, tmp_path, auth_timeout=60.0)
    began = time.monotonic()
    code, out, err = await finish(await run_cli("ask", "sky", "--url", stack.url))
    assert time.monotonic() - began < 5  # the interpreter's start included
    assert (code, out) == (1, "")
    assert err.startswith("gateway-client: unauthorized: the gateway requires a token")
    assert "GATEWAY_TOKEN" in err
    assert "--token-env NAME" in err
    assert err.count("\n") == 1
