"""The socket layer (gateway/io/websocket.py) against real websockets clients and raw TCP: what
websockets' asyncio server used to do for us and this module now does itself."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from tests.conftest import TIMEOUT, FakeClock, Stack, StackFactory, check_stream


async def test_fragmented_message_is_handled_as_one(stack: Stack) -> None:
    """A text message sent in several frames (continuations) is one client message."""
    client = await stack.client()
    message = orjson.dumps({"type": "start", "id": "f", "prompt": "sky"}).decode()
    await client.ws.send([message[:5], message[5:17], message[17:]])
    frames = (await client.finish("f"))["f"]
    assert frames[0]["type"] == "started"
    assert frames[-1]["type"] == "done"
    await stack.assert_no_leaks()


async def test_invalid_utf8_closes_with_1007(stack: Stack) -> None:
    """A text frame that is not UTF-8 fails the socket with 1007 (RFC 6455, 8.1)."""
    client = await stack.client()
    async with client.ws.send_context():
        client.ws.protocol.send_frame(Frame(Opcode.TEXT, b'{"type":"ping","x":"\xff"}'))
    await asyncio.wait_for(client.ws.wait_closed(), TIMEOUT)
    assert client.ws.close_code == 1007
    assert not stack.gateway.connections


async def test_keepalive_pings_every_socket_and_keeps_answering_ones_open(
    make_stack: StackFactory,
) -> None:
    """The keepalive wheel pings each socket once per --ping-interval, spread over the
    interval rather than in a burst; a client that answers stays open however many
    --ping-timeouts pass, and nothing waits on it afterwards. On the fake clock."""
    clock = FakeClock()
    stack = await make_stack(clock=clock, ping_interval=20, ping_timeout=10)
    clients = [await stack.client() for _ in range(3)]
    pings: dict[int, list[float]] = {i: [] for i in range(len(clients))}

    for i, client in enumerate(clients):
        original = client.ws.process_event

        def counting(event: Any, i: int = i, original: Any = original) -> None:
            if isinstance(event, Frame) and event.opcode is Opcode.PING:
                pings[i].append(clock.now())
            original(event)  # answers with a pong

        client.ws.process_event = counting  # type: ignore[method-assign]
    start = clock.now()
    for rounds in range(1, 5):
        clock.advance(20)
        for client in clients:
            # A round trip: the ping (sent before the pong) has arrived and been answered,
            # and the gateway has read the answer before it reads this.
            await client.send({"type": "ping"})
            await client.recv_until(lambda f: f["type"] == "pong")
        assert [len(times) for times in pings.values()] == [rounds] * 3
    assert len(stack.gateway.connections) == 3
    # Each socket's pings are one interval apart, and the sockets', not all at one tick.
    for times in pings.values():
        assert [round(b - a, 6) for a, b in itertools.pairwise(times)] == [20.0] * 3
        assert start < times[0] <= start + 20
    assert not stack.gateway._listener.keepalive.waiting  # type: ignore[union-attr]
    await clients[0].start("k", "sky")
    frames = (await clients[0].finish("k"))["k"]
    assert frames[-1]["type"] == "done"


async def test_stop_does_not_wait_for_a_silent_handshake(stack: Stack) -> None:
    """A TCP connection that never sends its upgrade request (a slowloris) does not hold a
    shutdown up: stop() drops it instead of waiting out the 10 s handshake timeout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
    open_client = await stack.client()
    started = time.monotonic()
    await asyncio.wait_for(stack.gateway.stop(), 5)
    assert time.monotonic() - started < 2
    with pytest.raises(ConnectionResetError):  # dropped, with a reset (docs/reliability.md)
        await asyncio.wait_for(reader.read(), TIMEOUT)
    await asyncio.wait_for(open_client.ws.wait_closed(), TIMEOUT)
    assert open_client.ws.close_code == 1001
    writer.close()
    with contextlib.suppress(ConnectionResetError):  # the reset, once more
        await writer.wait_closed()


async def test_handshake_timeout_drops_a_silent_connection(make_stack: StackFactory) -> None:
    """A connection that sends no request within --open-timeout is dropped, and one that does
    is not (the timer is cancelled by the handshake). On the fake clock."""
    clock = FakeClock()
    stack = await make_stack(clock=clock, open_timeout=10, ping_interval=0)
    assert stack.gateway._listener is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
    await clock.timer_set(10)  # the gateway has accepted it
    client = await stack.client()
    clock.advance(9.9)
    assert len(stack.gateway._listener.handshaking) == 1
    clock.advance(0.1)
    with pytest.raises(ConnectionResetError):  # dropped, with a reset (docs/reliability.md)
        await asyncio.wait_for(reader.read(), TIMEOUT)
    assert not stack.gateway._listener.handshaking
    # The client that finished its handshake outlives the timeout and still works.
    await client.start("s", "hello [[mock chunks=2 delay_ms=0]]")
    frames = (await client.finish("s"))["s"]
    assert frames[-1]["type"] == "done"
    writer.close()
    with contextlib.suppress(ConnectionResetError):  # the reset, once more
        await writer.wait_closed()


async def test_plain_http_gets_an_answer_and_the_connection_ends(stack: Stack) -> None:
    """Routes other than the upgrade are answered (healthz), then the connection is closed
    by the gateway after the client's EOF, leaving no handshake state behind."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), TIMEOUT)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(b"ok\n")
    writer.close()
    await writer.wait_closed()
    assert stack.gateway._listener is not None
    assert not stack.gateway._listener.handshaking
    assert not stack.gateway.connections


async def test_close_frame_from_client_cancels_at_once_and_is_answered(stack: Stack) -> None:
    """A client's close frame is answered with a close (the closing handshake completes with
    the client's code) and its streams are cancelled, not kept for a resume."""
    async with connect(f"ws://127.0.0.1:{stack.gateway.port}/v1/ws") as ws:
        await ws.recv()  # welcome
        await ws.send(
            '{"type":"start","id":"c","prompt":"sky [[mock chunks=500 delay_ms=20 tag=c]]"}'
        )
        while orjson.loads(await ws.recv())["type"] != "text_chunk":
            pass
        await ws.close(4000, "bye")
    assert ws.close_code == 4000
    record = stack.mock.record("c")
    await asyncio.wait_for(record.ended.wait(), TIMEOUT)
    assert record.outcome == "client_closed"
    await stack.assert_no_leaks()


async def test_ping_flood_from_a_client_that_reads_nothing_is_dropped(
    make_stack: StackFactory,
) -> None:
    """Pongs are not flow-controlled like the gateway's own frames: a client that keeps
    sending pings but reads nothing is dropped once its unsent pongs pass the bound (twice
    --send-buffer-bytes plus 128 KiB), instead of growing the gateway's memory without end."""
    stack = await make_stack(send_buffer_bytes=16 * 1024)
    client = await stack.slow_client()
    client.ws.transport.pause_reading()  # reads nothing from now on
    payload = b"p" * 125
    with contextlib.suppress(ConnectionError, ConnectionClosed):
        for i in range(20_000):
            if client.ws.transport.is_closing():
                break
            async with client.ws.send_context():
                client.ws.protocol.send_ping(payload[:121] + i.to_bytes(4, "big"))
    # The gateway dropped the socket (its pongs stay unread): no connection is left.
    await asyncio.wait_for(stack.gateway._no_connections.wait(), TIMEOUT)
    assert not stack.gateway.connections
    client.ws.transport.abort()


async def test_static_file_missing_then_present_is_served(
    stack: Stack, tmp_path: Any, monkeypatch: Any
) -> None:
    """A static file that is missing answers 404 and is looked for again next time (it used to
    be remembered as missing for the process's lifetime)."""
    from gateway.io import server

    page = tmp_path / "late.html"
    monkeypatch.setitem(server.STATIC_FILES, "/", (page, "text/html; charset=utf-8"))
    monkeypatch.setattr(server, "_static_cache", {})

    async def get() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
        await writer.wait_closed()
        return response

    assert (await get()).startswith(b"HTTP/1.1 404 ")
    page.write_bytes(b"<p>hello</p>")
    response = await get()
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nConnection: close\r\n" in response  # the gateway ends the connection
    assert response.endswith(b"<p>hello</p>")


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes = b"k3y!") -> bytes:
    """A frame as a client sends it (RFC 6455, 5.2): masked, shortest length encoding."""
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65536:
        head += bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + size.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_frames_split_anywhere_give_the_same_messages(stack: Stack) -> None:
    """Whole data frames are parsed by the gateway's fast path and everything else by
    websockets, from a frame boundary: byte streams of both kinds, cut at random points (so a
    frame's bytes straddle the two), yield every message once and in order."""
    client = await stack.client()
    ((connection),) = stack.gateway.connections
    server_ws = connection.ws
    # A binary frame whose masked payload reads as a whole text frame, cut after its header:
    # websockets then waits for that payload, and the fast path must leave it alone.
    inner = client_frame(0x1, orjson.dumps({"type": "cancel", "id": "inner"}))
    mask = b"m4sk"
    outer = client_frame(0x2, bytes(b ^ mask[i % 4] for i, b in enumerate(inner)), mask=mask)
    assert outer[6:] == inner
    server_ws.data_received(outer[:6])
    server_ws.data_received(outer[6:])
    assert (await client.recv()).get("id") is None  # `binary frames are not accepted`
    rng = random.Random(4)
    for case in range(40):
        stream = bytearray()
        expected: list[str] = []
        for i in range(rng.randint(1, 12)):
            sid = f"c{case}-{i}"
            # An unknown id: each message gets an error frame naming it, in order.
            message = orjson.dumps(
                {
                    "type": "cancel",
                    "id": sid,
                    "pad": "p" * rng.choice((0, 3, 100, 120, 126, 200, 400, 3000)),
                }
            )
            shape = rng.choice(("whole", "whole", "fragmented", "binary", "ping first"))
            if shape == "ping first":  # a control frame: websockets answers it itself
                stream += client_frame(0x9, b"hi")
            if shape == "fragmented":
                cut = rng.randint(1, len(message) - 1)
                stream += client_frame(0x1, message[:cut], fin=False)
                if rng.random() < 0.5:  # a control frame may come between fragments
                    stream += client_frame(0x9, b"mid")
                stream += client_frame(0x0, message[cut:])
                expected.append(sid)
            elif shape == "binary":
                stream += client_frame(0x2, message)
                expected.append("binary")
            else:
                stream += client_frame(0x1, message)
                expected.append(sid)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 8))))
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            server_ws.data_received(bytes(stream[start:end]))
        got: list[str] = []
        while len(got) < len(expected):
            frame = await client.recv()
            assert frame["type"] == "error"
            got.append(frame.get("id") or "binary")
        assert got == expected, case
    await client.start("after", "sky [[mock chunks=3]]")
    check_stream((await client.finish("after"))["after"])
    await stack.assert_no_leaks()


class _RecordingTransport:
    """The real transport, with every write also recorded."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_write_frames_frames_batches_and_writes_nothing_once_closing(stack: Stack) -> None:
    """The writer's one call per flush: a lone short message goes out as its 2-byte header and
    payload, a batch as consecutive frames in one write, each read by a real client as one
    message; once the gateway has sent its close frame, frames are dropped, not written after
    it (a protocol error for the client)."""
    client = await stack.client()
    ((connection),) = stack.gateway.connections
    server_ws = connection.ws
    recorder = _RecordingTransport(server_ws.transport)
    server_ws.transport = recorder  # type: ignore[assignment]
    small, big = b'{"n":1}', orjson.dumps({"n": 2, "pad": "x" * 300})
    server_ws.write_frames([small])
    server_ws.write_frames([big])
    server_ws.write_frames([small, big, small])
    assert recorder.writes == [
        b"\x81\x07" + small,
        b"\x81\x7e" + len(big).to_bytes(2, "big") + big,
        b"\x81\x07" + small + b"\x81\x7e" + len(big).to_bytes(2, "big") + big + b"\x81\x07" + small,
    ]
    for message in (small, big, small, big, small):
        assert await asyncio.wait_for(client.ws.recv(), TIMEOUT) == message.decode()
    server_ws.close(1000, "bye")
    written = len(recorder.writes)
    server_ws.write_frames([small])
    assert len(recorder.writes) == written
    with contextlib.suppress(ConnectionClosed):
        assert await asyncio.wait_for(client.ws.recv(), TIMEOUT) is None  # nothing after close
    assert client.ws.close_code == 1000
    server_ws.transport = recorder.real
    await stack.assert_no_leaks()


# ------------------------------------------------------------------ RFC 6455 edge cases, raw bytes

UPGRADE = (
    b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything the gateway sends until it closes the connection."""
    received = b""
    async with asyncio.timeout(TIMEOUT):
        while data := await reader.read(65536):
            received += data
    return received


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    return first & 0x0F, await reader.readexactly(length)


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked server frame in `data` (after the 101 response)."""
    frames = []
    at = 0
    while at < len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length == 126:
            length = int.from_bytes(data[at : at + 2], "big")
            at += 2
        frames.append((opcode, data[at : at + length]))
        at += length
    return frames


async def test_a_whole_frame_inside_a_fragmented_message_closes_with_1002(stack: Stack) -> None:
    """RFC 6455, 5.4: after a first fragment (FIN=0), only continuation and control frames may
    come. A complete text frame there is a protocol error (1002), also when it arrives in a
    TCP segment of its own, where the client-frame fast path used to take it for a message
    (a `ping` was answered, a `start` opened an upstream request)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
    writer.write(UPGRADE)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    opcode, welcome = await read_frame(reader)
    assert opcode == 0x1
    assert b'"welcome"' in welcome
    # A first fragment (FIN=0), then a WebSocket ping (allowed between fragments): its pong
    # proves the gateway has read the fragment, so the next frame comes in a read of its own.
    writer.write(bytes.fromhex("0188000000007b2274797065223a") + client_frame(0x9, b"p"))
    assert await read_frame(reader) == (0xA, b"p")
    writer.write(bytes.fromhex("818f00000000") + b'{"type":"ping"}')
    frames = server_frames(await read_all(reader))
    writer.close()
    assert all(opcode != 0x1 for opcode, _ in frames), frames  # no pong, nothing else
    assert frames, frames
    assert frames[-1][0] == 0x8
    assert int.from_bytes(frames[-1][1][:2], "big") == 1002


async def test_an_unsupported_websocket_version_gets_426_naming_version_13(stack: Stack) -> None:
    """RFC 6455, 4.2.2 and 4.4: a handshake with another Sec-WebSocket-Version is answered
    426 Upgrade Required with `Sec-WebSocket-Version: 13`, so the client can retry with it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
    writer.write(UPGRADE.replace(b"Version: 13", b"Version: 8"))
    response = await read_all(reader)
    writer.close()
    status, _, rest = response.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 426"), response
    headers = rest.split(b"\r\n\r\n", 1)[0].lower()
    assert b"sec-websocket-version: 13" in headers.split(b"\r\n"), response


@pytest.mark.parametrize(
    ("pipelined", "expect"),
    [
        (client_frame(0x9, b"hi"), "pong"),  # a ping right behind the request
        (client_frame(0x1, b'{"type":"ping"}'), "message"),
        (b"\x8f\x80\0\0\0\0", "close"),  # a bad frame right behind the request
    ],
    ids=["ping", "text", "bad-frame"],
)
async def test_frames_pipelined_behind_the_upgrade_come_after_the_101(
    stack: Stack, pipelined: bytes, expect: str
) -> None:
    """Frames a client sends in the same segment as its upgrade request are handled after the
    handshake: the response starts with the 101 status line, and their answers follow it
    (a ping's pong used to be written before the status line, a malformed response)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
    writer.write(UPGRADE + pipelined)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    if expect == "close":
        frames = server_frames(await read_all(reader))
        assert frames[-1][0] == 0x8
        assert int.from_bytes(frames[-1][1][:2], "big") == 1002
    else:
        frames = []
        async with asyncio.timeout(TIMEOUT):
            while not any(
                op == (0xA if expect == "pong" else 0x1) and b"welcome" not in p for op, p in frames
            ):
                frames += server_frames(await reader.read(65536))
        if expect == "message":
            assert any(b'"type":"pong"' in p for _, p in frames), frames
    writer.close()
