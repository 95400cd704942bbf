"""Resume across instances through a real Redis: two gateways, one shared store."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.config import Config
from gateway.io.redis_store import RedisStore
from gateway.io.server import Gateway
from gateway.mock import MockUpstream
from tests.conftest import TIMEOUT, Client, check_stream, require_redis
from tests.support import (
    RedisProxy,
    chunks_text,
    drop,
    expected_text,
    resume,
    resume_frame,
)


class Pair:
    """Two gateway instances in front of one mock upstream, sharing Redis."""

    def __init__(self, mock: MockUpstream, a: Gateway, b: Gateway) -> None:
        self.mock, self.a, self.b = mock, a, b
        self.clients: list[Client] = []

    async def client(self, gateway: Gateway) -> Client:
        from websockets.asyncio.client import connect

        client = Client(await connect(f"ws://127.0.0.1:{gateway.port}/v1/ws"))
        client.welcome = await client.recv()
        self.clients.append(client)
        return client


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    redis_url = await require_redis()
    mock = MockUpstream(default_delay_ms=0)
    base = await mock.start()
    gateways = []
    for _ in range(2):
        config = Config(port=0, redis_url=redis_url, resume_retention=30)
        gateway = Gateway(config, f"{base}/perplexity")
        await gateway.start()
        gateways.append(gateway)
    pair = Pair(mock, *gateways)
    yield pair
    for client in pair.clients:
        await client.ws.close()
    for gateway in gateways:
        await gateway.stop()
    await mock.stop()


async def started_and_dropped(
    pair: Pair, prompt: str, chunks: int = 2
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    client = await pair.client(pair.a)
    await client.start("s", prompt)
    started = await client.recv_until(lambda f: f["type"] == "started")
    for _ in range(chunks):
        await client.recv_until(lambda f: f["type"] == "text_chunk")
    await drop(client)
    return started, client.by_id["s"]


async def test_resume_on_another_instance_is_exactly_once(pair: Pair) -> None:
    """A stream started on instance A and dropped is resumed on instance B: B replays what
    was missed from Redis and follows the live output; the text is the full answer, once."""
    prompt = "leaves autumn [[mock chunks=60 delay_ms=10 tag=x]]"
    started, before = await started_and_dropped(pair, prompt)
    last = max(f["seq"] for f in before if f["type"] == "text_chunk")
    client = await pair.client(pair.b)
    after = await resume(client, started["resume_token"], last)
    seqs = [f["seq"] for f in after if f["type"] == "text_chunk"]
    assert seqs == list(range(last + 1, last + 1 + len(seqs)))
    assert after[-1]["type"] == "done"
    assert chunks_text(before) + chunks_text(after) == expected_text(prompt)
    assert after[-1]["text"] == expected_text(prompt)
    assert pair.mock.record("x").outcome == "completed"


async def test_cancel_on_the_follower_reaches_the_owner(pair: Pair) -> None:
    """A cancel sent to instance B stops the upstream request that instance A owns."""
    started, _ = await started_and_dropped(pair, "sky [[mock fault=stall after=3 tag=c]]", 2)
    client = await pair.client(pair.b)
    await client.send(resume_frame("s", started["resume_token"], 2))
    await client.recv_until(lambda f: f["type"] == "resumed")
    await client.cancel("s")
    frames = (await client.finish("s"))["s"]
    assert frames[-1]["type"] == "cancelled"
    record = pair.mock.record("c")
    await asyncio.wait_for(record.ended.wait(), 5)
    assert record.outcome == "client_closed"
    await asyncio.wait_for(pair.a.idle.wait(), 5)


async def test_finished_stream_is_replayed_elsewhere(pair: Pair) -> None:
    """A client that missed the end fetches the rest and the done frame from another
    instance."""
    prompt = "ocean salty [[mock chunks=12 tag=f]]"
    started, before = await started_and_dropped(pair, prompt, 1)
    await asyncio.wait_for(pair.mock.record("f").ended.wait(), 5)
    await asyncio.wait_for(pair.a.idle.wait(), 5)
    client = await pair.client(pair.b)
    after = await resume(client, started["resume_token"], 1, sid="later")
    assert after[-1]["type"] == "done"
    assert after[-1]["id"] == "later"
    assert chunks_text(before[:2]) + chunks_text(after) == expected_text(prompt)
    check_stream([{"type": "started", "id": "later"}, *before[1:2], *after])


async def test_owner_death_ends_followers_with_interrupted(pair: Pair) -> None:
    """When the owning instance dies (its lease lapses), a follower on another instance ends
    the stream with stream_interrupted after the retained output, instead of hanging."""
    started, _ = await started_and_dropped(pair, "sky [[mock fault=stall after=3 tag=d]]", 1)
    client = await pair.client(pair.b)
    await client.send(resume_frame("s", started["resume_token"], 1))
    await client.recv_until(lambda f: f["type"] == "resumed")
    # Instance A "dies": its store stops writing and renewing leases (as after kill -9).
    store = pair.a.store
    assert store is not None
    for task in store._tasks:
        task.cancel()
    frames = (await client.finish("s", timeout=15))["s"]
    assert frames[-1]["type"] == "error"
    assert (frames[-1]["code"], frames[-1]["retryable"]) == ("stream_interrupted", True)


async def test_other_principal_and_unknown_tokens(pair: Pair) -> None:
    """Unknown tokens are unknown_id on every instance."""
    client = await pair.client(pair.b)
    await client.send(resume_frame("s", "no-such-token-anywhere-123", 0))
    assert (await client.recv())["code"] == "unknown_id"


async def test_stream_paused_by_a_slow_socket_goes_on_when_resumed_on_another_instance() -> None:
    """A relay paused because its socket (still open, not reading) fell behind is let go when
    the stream is resumed on another instance ("moved"): the follower there gets the whole
    answer without waiting for the old socket to time out as a slow consumer."""
    from websockets.asyncio.client import connect

    redis_url = await require_redis()
    mock = MockUpstream(default_delay_ms=0)
    base = await mock.start()
    gateways: list[Gateway] = []
    clients: list[Client] = []
    try:
        for _ in range(2):
            config = Config(
                port=0,
                dialect="openai",
                redis_url=redis_url,
                resume_retention=30,
                send_buffer_bytes=4 * 1024,
                slow_client_timeout=60,
            )
            gateway = Gateway(config, f"{base}/openai")
            await gateway.start()
            gateways.append(gateway)
        a, b = gateways
        for listener in a.sockets:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", a.port))
        slow = Client(await connect(f"ws://127.0.0.1:{a.port}/v1/ws", sock=sock, max_queue=4))
        clients.append(slow)
        slow.welcome = await slow.recv()
        prompt = "ocean salty [[mock chunks=6000 tag=moved]]"
        await slow.start("s", prompt)
        started = await slow.recv_until(lambda f: f["type"] == "started")
        connection = next(iter(a.connections))
        await asyncio.wait_for(connection.flow.stalled.wait(), 10)
        fresh = Client(await connect(f"ws://127.0.0.1:{b.port}/v1/ws"))
        clients.append(fresh)
        fresh.welcome = await fresh.recv()
        frames = await asyncio.wait_for(resume(fresh, started["resume_token"], 0), 20)
        assert frames[-1]["type"] == "done", frames[-1]
        assert chunks_text(frames) == expected_text(prompt)
        slow.ws.transport.abort()  # its unread backlog would hold a closing handshake up
    finally:
        for client in clients:
            await client.ws.close()
        for gateway in gateways:
            await gateway.stop()
        await mock.stop()


async def test_parts_are_resumed_on_another_instance_exactly_once(pair: Pair) -> None:
    """Parts share the stream's seq across instances too: instance B replays A's reasoning,
    sources and text from Redis and follows live, each message once, in seq order."""
    client = await pair.client(pair.a)
    await client.send(
        {
            "type": "start",
            "id": "s",
            "prompt": "Why is the sky blue? "
            "[[mock reasoning=think sources=3 chunks=40 delay_ms=10]]",
            "parts": ["reasoning", "sources"],
        }
    )
    started = await client.recv_until(lambda f: f["type"] == "started")
    await client.recv_until(lambda f: f["type"] == "text_chunk")
    await drop(client)
    before = [f for f in client.by_id["s"] if "seq" in f]
    assert {f["type"] for f in before} >= {"reasoning_chunk", "text_chunk"}
    other = await pair.client(pair.b)
    # From the start: what A produced comes back from Redis, parts included, then B follows.
    after = await resume(other, started["resume_token"], 0)
    replayed = [f for f in after if "seq" in f]
    assert replayed[: len(before)] == before
    content = [f for f in after if "seq" in f and f["type"] != "done"]
    assert [f["seq"] for f in content] == list(range(1, len(content) + 1))
    kinds = {f["type"] for f in content}
    assert {"reasoning_chunk", "sources", "text_chunk"} <= kinds
    done = after[-1]
    assert done["type"] == "done"
    assert done["text"] == "".join(f["text"] for f in content if f["type"] == "text_chunk")
    assert done["reasoning"] == "".join(
        f["text"] for f in content if f["type"] == "reasoning_chunk"
    )


async def _sse(response: Any) -> list[dict[str, Any]]:
    import orjson

    from gateway.core.sse import SSEDecoder

    decoder = SSEDecoder()
    return [orjson.loads(e.data) for e in decoder.feed(await response.read())]


async def test_an_http_stream_cut_on_one_instance_resumes_over_http_on_another(
    pair: Pair,
) -> None:
    """POST on instance A, the response cut after two chunks, GET on instance B with the
    resume token and Last-Event-ID: the rest, exactly once, through Redis. DELETE of another
    stream on B stops the upstream request A owns."""
    import aiohttp
    import orjson

    from gateway.core.sse import SSEDecoder

    prompt = "leaves autumn [[mock chunks=40 delay_ms=10 tag=h]]"
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            f"http://127.0.0.1:{pair.a.port}/v1/streams", json={"prompt": prompt, "id": "h"}
        )
        decoder = SSEDecoder()
        seen: list[dict[str, Any]] = []
        async for data in response.content.iter_any():
            seen += [orjson.loads(e.data) for e in decoder.feed(data)]
            if sum(m["type"] == "text_chunk" for m in seen) >= 2:
                break
        response.close()
        started = seen[0]
        chunks = [m for m in seen if m["type"] == "text_chunk"]
        headers = {
            "X-Resume-Token": started["resume_token"],
            "Last-Event-ID": str(chunks[-1]["seq"]),
        }
        async with http.get(f"http://127.0.0.1:{pair.b.port}/v1/streams/h", headers=headers) as r:
            assert r.status == 200
            rest = await _sse(r)
        assert rest[0]["type"] == "resumed"
        assert rest[-1]["type"] == "done"
        assert chunks_text(chunks) + chunks_text(rest) == expected_text(prompt)

        stalled = await http.post(
            f"http://127.0.0.1:{pair.a.port}/v1/streams",
            json={"prompt": "sky [[mock fault=stall after=1 tag=hc]]", "id": "c"},
        )
        decoder = SSEDecoder()
        first: list[dict[str, Any]] = []
        while not first:
            first = [orjson.loads(e.data) for e in decoder.feed(await stalled.content.readany())]
        token = first[0]["resume_token"]
        stalled.close()
        async with http.delete(
            f"http://127.0.0.1:{pair.b.port}/v1/streams/c", headers={"X-Resume-Token": token}
        ) as deleted:
            assert deleted.status == 204
    record = pair.mock.record("hc")
    await asyncio.wait_for(record.ended.wait(), 5)
    assert record.outcome == "client_closed"


async def test_control_messages_reach_an_instance_again_after_a_redis_outage() -> None:
    """Redis goes away for longer than redis-py's own retries and comes back: the instance
    subscribes to its control channel again, so a cancel sent from another instance reaches
    it (it used to stop listening for good)."""
    redis_url = await require_redis()
    proxy = RedisProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    await proxy.start()
    db = redis_url.rsplit("/", 1)[1]
    owner = RedisStore(f"redis://127.0.0.1:{proxy.port}/{db}", 30)
    other = RedisStore(redis_url, 30)
    received: list[tuple[str, str]] = []
    arrived = asyncio.Event()

    def on_control(verb: str, token: str) -> None:
        received.append((verb, token))
        arrived.set()

    await owner.start()
    await other.start()
    owner.on_control = on_control
    try:
        assert owner.subscribed.is_set()
        await proxy.cut()
        await asyncio.wait_for(owner.unsubscribed.wait(), TIMEOUT)
        await proxy.start()
        await asyncio.wait_for(owner.subscribed.wait(), TIMEOUT)
        await other.send_control(owner.instance, "cancel", "after-the-outage")
        await asyncio.wait_for(arrived.wait(), TIMEOUT)
        assert received == [("cancel", "after-the-outage")]
    finally:
        await owner.close()
        await other.close()
        await proxy.stop()
