"""Memory that is freed when its stream or socket is done, and bounds that hold (issue: runs for
weeks). The per-stream and per-socket paths make no reference cycles, so reference counting
frees them at once, whatever the collector's settings (docs/reliability.md, "Memory")."""

from __future__ import annotations

import asyncio
import gc
import platform
import socket
import tracemalloc
import types
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import redis.asyncio as aioredis
import uvloop

from gateway.config import Config
from gateway.core.resume import GONE, TOMBSTONES, Registry
from gateway.core.session import Limits, OpenUpstream, Outbox, Session, Stream, finish_done
from gateway.io.connection import Connection, new_resume_token
from gateway.io.server import Gateway
from gateway.mock import MockUpstream
from tests.conftest import TIMEOUT, Stack, StackFactory, check_stream, require_redis
from tests.support import drop, resume

#: Every knob that makes the outcomes below quick: a stalled upstream times out in 0.4 s, a
#: client that does not read is closed after 2 s, a dropped socket's streams wait 0.3 s.
FAST_OUTCOMES: dict[str, Any] = {
    "slow_client_timeout": 2.0,
    "close_timeout": 0.3,
    "send_buffer_bytes": 16 * 1024,
    "resume_grace": 0.3,
    "upstream_read_timeout": 0.4,
    "upstream_first_byte_timeout": 2.0,
    "upstream_retries": 0,
    "max_streams": 6,
}


def is_ours(obj: object) -> bool:
    """Whether `obj` is one of the gateway's own objects: an instance of a class, a function
    (closures included) or a frame or coroutine of code in the `gateway` package."""
    kind = type(obj)  # not isinstance(): a dead weak proxy raises on __class__
    module = kind.__module__
    if kind is types.FunctionType:
        module = str(getattr(obj, "__module__", ""))
    code = None
    if kind is types.FrameType:
        code = obj.f_code  # type: ignore[attr-defined]
    elif kind is types.CoroutineType:
        code = obj.cr_code  # type: ignore[attr-defined]
    if code is not None:
        return "/gateway/" in code.co_filename and "/gateway/mock/" not in code.co_filename
    return (module == "gateway" or module.startswith("gateway.")) and not module.startswith(MOCK)


#: The mock upstream is the test's aiohttp *server*, in the same process. On Python 3.12 and
#: later, aiohttp cancels a request handler whose client went away, and the cancelled task
#: keeps its CancelledError, whose traceback holds the handler's frames, which hold the
#: request, whose protocol holds the task: aiohttp's cycle, not the gateway's, with the mock's
#: frames and objects in it. The gateway is only ever aiohttp's client.
MOCK = "gateway.mock"


@contextmanager
def collector_off() -> Iterator[None]:
    """Run with the cyclic collector off (as if its full collections never came), starting
    from a clean heap."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def unreachable() -> dict[str, bool]:
    """What a full collection would free (objects that only reference cycles keep alive), as
    type names, each with whether it is one of the gateway's own (`is_ours`)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found: dict[str, bool] = {}
        for obj in gc.garbage:
            name = f"{type(obj).__module__}.{type(obj).__qualname__}"
            found[name] = found.get(name, False) or is_ours(obj)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    gc.collect()  # now free them for real
    return found


def live(kind: type) -> list[object]:
    return [o for o in gc.get_objects() if type(o) is kind]


# ------------------------------------------------------------------ every outcome, once


async def raw_socket(port: int, frame: bytes) -> None:
    """A hostile client: a real handshake, then `frame` as raw bytes; wait for the close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await reader.readuntil(b"\r\n\r\n")
    writer.write(frame)
    async with asyncio.timeout(TIMEOUT):
        while await reader.read(65536):
            pass
    writer.close()
    await writer.wait_closed()


def masked(opcode: int, payload: bytes) -> bytes:
    """One client frame (FIN set, mask 0: the payload is sent as it is)."""
    size = len(payload)
    if size < 126:
        header = bytes([0x80 | opcode, 0x80 | size])
    elif size < 65536:
        header = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + size.to_bytes(8, "big")
    return header + b"\0\0\0\0" + payload


async def every_outcome(stack: Stack) -> None:
    """One of each way a stream or a socket can end (knobs: FAST_OUTCOMES)."""
    gateway = stack.gateway
    client = await stack.client()
    # done, cancelled, and each upstream failure the relay maps.
    await client.start("done", "sky")
    await client.start("cancel", "ocean [[mock chunks=500 delay_ms=5]]")
    await client.recv_until(lambda f: f.get("id") == "cancel" and f["type"] == "text_chunk")
    await client.cancel("cancel")
    await client.finish("done", "cancel")
    outcomes = {
        "status": "sky [[mock status=400]]",
        "unavailable": "sky [[mock status=503]]",
        "reset": "sky [[mock chunks=6 fault=reset after=2]]",
        "malformed": "sky [[mock chunks=6 fault=malformed after=2]]",
        "stall": "sky [[mock chunks=6 fault=stall after=2]]",
        "giant": "sky [[mock chunks=6 fault=giant after=1]]",
    }
    for sid, prompt in outcomes.items():
        await client.start(sid, prompt)
    ended = await client.finish(*outcomes)
    assert {sid: frames[-1].get("code") for sid, frames in ended.items()} == {
        "status": "upstream_error",
        "unavailable": "upstream_error",
        "reset": "stream_interrupted",
        "malformed": "upstream_protocol_error",
        "stall": "upstream_timeout",
        "giant": "upstream_protocol_error",
    }
    # Refusals and bad frames (the socket stays open).
    await client.send({"type": "bogus"})
    await client.cancel("never-ran")
    await client.ws.send("{" * 10)
    for sid in ("a", "b", "c", "d", "e", "f", "g"):
        await client.start(sid, "sky [[mock chunks=40 delay_ms=5]]")
    await client.start("a", "sky")
    await client.finish("a", "b", "c", "d", "e", "f", timeout=TIMEOUT)
    refused = [f for f in client.log if f["type"] == "error" and "seq" not in f]
    codes = {f["code"] for f in refused}
    assert codes >= {"unknown_type", "bad_json", "unknown_id", "too_many_streams", "duplicate_id"}
    # A deliberate close with a stream in flight: cancelled with the socket.
    await client.start("gone", "ocean [[mock chunks=500 delay_ms=5]]")
    await client.recv_until(lambda f: f.get("id") == "gone" and f["type"] == "text_chunk")
    await client.ws.close()

    # Dropped, then resumed on another socket.
    first = await stack.client()
    await first.start("s", "ocean [[mock chunks=30 delay_ms=5]]")
    started = await first.recv_until(lambda f: f["type"] == "started")
    await first.recv_until(lambda f: f["type"] == "text_chunk")
    await drop(first)
    second = await stack.client()
    frames = await resume(second, started["resume_token"], 1)
    assert frames[-1]["type"] == "done"
    await second.ws.close()
    # Dropped and never resumed: abandoned when the grace runs out.
    lost = await stack.client()
    await lost.start("s", "ocean [[mock chunks=500 delay_ms=5]]")
    await lost.recv_until(lambda f: f["type"] == "text_chunk")
    await drop(lost)

    # A slow reader: the gateway pauses its upstream, then it reads everything.
    slow = await stack.slow_client()
    await slow.start("s", "ocean [[mock chunks=3000 words=3]]")
    await slow.recv_until(lambda f: f["type"] == "started")
    connection = next(c for c in gateway.connections if c.session.streams.get("s"))
    await asyncio.wait_for(connection.flow.stalled.wait(), TIMEOUT)
    check_stream((await slow.finish("s", timeout=30))["s"])
    await slow.ws.close()

    # A client that never reads again: 4408, reset after the close timeout, then abandoned.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gateway.port))
    frozen = await stack.client(max_queue=2, sock=sock)
    await frozen.start("s", "ocean [[mock chunks=200000]]")
    await frozen.recv_until(lambda f: f["type"] == "text_chunk")
    frozen.ws.transport.pause_reading()
    connection = next(c for c in gateway.connections if c.session.streams.get("s"))
    await asyncio.wait_for(connection.closing.wait(), TIMEOUT)
    assert connection.close_reason == "slow_consumer"

    # Hostile sockets: bad framing (1002), invalid UTF-8 (1007), a frame over the hard limit.
    await raw_socket(gateway.port, b"\x8f\x80\0\0\0\0")
    await raw_socket(gateway.port, masked(0x1, b"\xff\xfe"))
    await raw_socket(gateway.port, masked(0x1, b"x" * (2 << 20)))

    await asyncio.wait_for(gateway._no_connections.wait(), TIMEOUT)
    frozen.ws.transport.abort()
    await stack.assert_no_leaks()


def assert_freed(gateway: Gateway, garbage: dict[str, bool]) -> None:
    ours = sorted(name for name, own in garbage.items() if own)
    assert not ours, f"reference cycles of the gateway's own objects: {ours}"
    # Nothing else holds them either: no socket object survives its socket, and the only
    # streams alive are the ones retained for a resume.
    assert not gateway.connections
    assert not gateway.registry.retained()
    for kind in (Connection, Session, Outbox, Stream):
        assert not live(kind), kind


async def test_no_stream_or_socket_outcome_leaves_a_reference_cycle(
    make_stack: StackFactory,
) -> None:
    """With the collector off, every way a stream or socket ends leaves nothing of the
    gateway's that only a full collection could free (asyncio's event loop): once its
    retention is over, no socket or stream object is left at all."""
    stack = await make_stack(**FAST_OUTCOMES)
    with collector_off():
        await every_outcome(stack)
        stack.clients.clear()
        # Streams retained for a resume keep nothing of the closed sockets they were sent on.
        assert stack.gateway.registry.retained()
        for kind in (Connection, Session, Outbox):
            assert not live(kind), kind
        await stack.gateway.stop()  # and so lets go of the streams it retained for resumes
        garbage = unreachable()
    assert_freed(stack.gateway, garbage)


#: Where the gateway's side of a socket or stream lives: nothing of these may be left to the
#: cyclic collector. (The test's own websockets clients share the event loop, so the loop's own
#: objects cannot be told apart: on the oldest releases we allow, websockets' client leaves a
#: transport, a timer and a CancelledError in a cycle. Their protocol keeps its parser's last
#: exception in one too, which the gateway breaks for its server sockets.)
SERVER_SIDE = ("gateway", "aiohttp.", "websockets.server", "websockets.asyncio.server")


def test_no_reference_cycle_on_the_servers_side_on_uvloop() -> None:
    """On uvloop (the production loop) the same outcomes leave nothing unreachable on the
    server side at all: neither the gateway nor aiohttp nor websockets' server makes a cycle
    per stream or socket there."""

    async def scenario() -> tuple[Gateway, dict[str, bool]]:
        mock = MockUpstream(default_delay_ms=0)
        base = await mock.start()
        gateway = Gateway(Config(port=0, **FAST_OUTCOMES), f"{base}/perplexity")
        await gateway.start()
        stack = Stack(mock, gateway, [])
        try:
            with collector_off():
                await every_outcome(stack)
                stack.clients.clear()
                garbage = unreachable()
        finally:
            await gateway.stop()
            await mock.stop()
        return gateway, garbage

    gateway, garbage = uvloop.run(scenario())
    assert_freed(gateway, garbage)
    server_side = sorted(name for name in garbage if name.startswith(SERVER_SIDE))
    assert not server_side, server_side


# ------------------------------------------------------------------ the documented bounds, filled


@contextmanager
def traced() -> Iterator[list[int]]:
    """Python memory allocated inside the block and still held at its end, in bytes."""
    held = [0]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        yield held
        gc.collect()
        held[0] = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def ended_stream(session: Session, sid: str, chunks: int, size: int) -> Stream:
    """A stream that streamed `chunks` token-sized deltas, each sent, then ended with `done`."""
    [opened] = session.receive(orjson.dumps({"type": "start", "id": sid, "prompt": "q"}).decode())
    assert isinstance(opened, OpenUpstream)
    stream = opened.stream
    for i in range(chunks):
        stream.push(f"{i:0{size}d}")
        session.outbox.take_frames()
    finish_done(stream, {"citations": ["https://example.com/a"], "usage": {"total_tokens": 9}})
    session.outbox.take_frames()
    return stream


def test_retained_streams_hold_no_more_memory_than_the_total_bound() -> None:
    """Four times --resume-total-bytes of answers end and are retained: the registry keeps at most
    the bound, and the memory the process actually holds for them (traced) is within it: the
    recorded sizes are what the retained streams cost."""
    bound = 1 << 20
    with traced() as held:
        registry = Registry(max_stream_bytes=64 << 10, max_total_bytes=bound)
        session = Session(
            "s", Limits(max_streams=1 << 20), registry=registry, new_token=new_resume_token
        )
        for n in range(1400):  # token-sized chunks: the chunk offsets cost as much as the text
            registry.ended(ended_stream(session, f"s{n}", chunks=150, size=5))
            assert 0 <= registry.retained_bytes <= bound
        del session
        retained_bytes = registry.retained_bytes
    assert registry.retained_streams < 1400 / 4  # the oldest were evicted
    assert retained_bytes > 0.9 * bound  # the bound was reached, not just neared
    # Tombstones (10,000 at most, about 100 bytes each) are outside the bound: allowed for.
    assert held[0] <= bound + TOMBSTONES * 150, (held[0], retained_bytes)


def test_one_answer_over_the_per_stream_bound_is_not_retained() -> None:
    """An answer over --resume-max-bytes is forgotten at its end: its memory is freed, and its
    token answers GONE (resume_unavailable)."""
    with traced() as held:
        registry = Registry(max_stream_bytes=64 << 10, max_total_bytes=1 << 30)
        session = Session("s", Limits(), registry=registry, new_token=new_resume_token)
        stream = ended_stream(session, "big", chunks=2000, size=50)  # about 100 KiB
        token = stream.resume_token
        assert token is not None
        assert registry.ended(stream) is False
        del session, stream
    assert registry.lookup(token) is GONE
    assert registry.retained_bytes == 0
    assert held[0] < 4096, held[0]


def test_tombstones_are_bounded() -> None:
    """Forgotten tokens are remembered as GONE up to TOMBSTONES, the oldest dropped first; three
    times as many forgets hold no more."""
    registry = Registry()
    session = Session(
        "s", Limits(max_streams=1 << 20), registry=registry, new_token=new_resume_token
    )
    tokens = []
    with traced() as held:
        for n in range(3 * TOMBSTONES):
            stream = ended_stream(session, f"s{n}", chunks=1, size=3)
            assert stream.resume_token is not None
            tokens.append(stream.resume_token)
            registry.ended(stream)
            registry.forget(stream)
        del stream
    assert registry.tombstones == TOMBSTONES
    assert registry.lookup(tokens[-1]) is GONE
    assert registry.lookup(tokens[0]) is None  # the oldest tombstone went first
    assert held[0] < TOMBSTONES * 300 + len(tokens) * 100, held[0]  # tokens list included


async def test_a_socket_that_stops_reading_holds_at_most_its_send_buffer(
    make_stack: StackFactory,
) -> None:
    """Four endless streams to a client that reads nothing: once --send-buffer-bytes wait for
    that socket, the gateway stops reading every one of their upstreams, so what it holds for
    the socket stays within the buffer plus one upstream read per stream, and the transport's
    own limit."""
    limit = 64 << 10
    stack = await make_stack(
        dialect="openai", send_buffer_bytes=limit, slow_client_timeout=60, resume_grace=0
    )
    client = await stack.slow_client()
    client.ws.transport.pause_reading()
    for n in range(4):
        # Paced (1 ms): an unpaced mock in this process would hold the event loop. 20,000
        # chunks of 200 words is far more than the buffers hold (and quick to plan).
        prompt = f"ocean [[mock chunks=20000 words=200 delay_ms=1 tag=f{n}]]"
        await client.start(f"s{n}", prompt)
    for n in range(4):
        await stack.mock.wait_request(f"f{n}")
    connection = next(iter(stack.gateway.connections))
    await asyncio.wait_for(all_paused(connection, 4), 30)
    buffered = connection.outbox.buffered
    transport = connection.ws.transport
    assert transport is not None
    assert buffered <= limit + 4 * (256 << 10), buffered
    assert transport.get_write_buffer_size() <= connection.ws.listener.max_buffer
    # Paused for good: the upstreams are not read while the client does not read.
    sent = [stack.mock.record(f"f{n}").chunks_sent for n in range(4)]
    assert all(s < 20_000 for s in sent)
    assert connection.outbox.buffered == buffered
    client.ws.transport.abort()
    await stack.assert_no_leaks()


async def all_paused(connection: Connection, streams: int) -> None:
    """Until `streams` relays wait for `connection`'s socket (its flow control has no event
    for this: polled)."""
    flow = connection.flow
    while len(flow._parked or ()) < streams:  # noqa: ASYNC110 (no event to wait on)
        await asyncio.sleep(0.01)


async def test_resumes_waiting_for_the_shared_store_count_against_max_streams(
    make_stack: StackFactory,
) -> None:
    """A client that sends resumes for unknown tokens while the shared store is slow gets
    too_many_streams past --max-streams: the gateway holds at most that many lookups (a task
    and a Redis request each) per socket. Redis is really paused (CLIENT PAUSE)."""
    url = await require_redis()
    stack = await make_stack(redis_url=url, max_streams=4)
    client = await stack.client()
    admin = aioredis.Redis.from_url(url)
    try:
        await admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        for n in range(12):
            await client.send(
                {"type": "resume", "id": f"r{n}", "resume_token": f"unknown-{n}", "after": 0}
            )
        frames = [await client.recv() for _ in range(12)]
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
    codes = Counter(f["code"] for f in frames)
    assert codes == {"too_many_streams": 8, "unknown_id": 4}, frames
    connection = next(iter(stack.gateway.connections))
    assert not connection._remote_pending


# ------------------------------------------------------------------ the periodic collection


async def test_the_periodic_full_collection_frees_cycles_trims_and_records_its_pause() -> None:
    """Each run collects every generation (a cycle made outside the gateway is gone), then
    gives the C heap's free pages back (malloc_trim), records the pause and sets the next run."""
    from prometheus_client import CollectorRegistry, Histogram

    from gateway.memory import FullCollections

    registry = CollectorRegistry()
    pause = Histogram("pause_seconds", "test", registry=registry)
    trims: list[int] = []

    def trim(pad: int) -> int:
        trims.append(pad)
        return 1

    class Cycle:
        pass

    with collector_off():
        cycle = Cycle()
        cycle.me = cycle  # type: ignore[attr-defined]
        del cycle
        collections = FullCollections(pause, interval=3600, trim=trim)
        collections._run()  # what the timer calls
        try:
            assert not live(Cycle)
            assert trims == [0]
            assert registry.get_sample_value("pause_seconds_count") == 1
            assert collections._timer is not None  # the next run is set
        finally:
            collections.stop()


def test_malloc_trim_is_found_where_glibc_is() -> None:
    """On Linux with glibc (this machine and the image) the trim is there; elsewhere it is
    None and the collection runs alone."""
    from gateway.memory import _find_malloc_trim

    trim = _find_malloc_trim()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert trim is not None
        assert trim(0) in (0, 1)
    else:
        assert trim is None
