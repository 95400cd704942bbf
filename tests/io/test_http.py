"""The HTTP exchange on the WebSocket port (gateway/io/http.py) at the byte level: which
requests it takes, malformed and slow requests, bodies split anywhere, and that every
connection ends after its answer."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway.io.http import MAX_HEAD_BYTES, is_http_request
from tests.conftest import TIMEOUT, FakeClock, Stack, StackFactory


@pytest.mark.parametrize(
    ("head", "verdict"),
    [
        (b"POST /v1/streams HTTP/1.1\r\n", True),
        (b"DELETE /v1/streams/a HTTP/1.1\r\n", True),
        (b"OPTIONS /v1/streams HTTP/1.1\r\n", True),
        (b"GET /v1/streams/a HTTP/1.1\r\n", True),
        (b"GET /v1/ws HTTP/1.1\r\n", False),
        (b"GET /healthz HTTP/1.1\r\n", False),
        (b"GET /v1/streams HTTP/1.1\r\n", False),
        (b"POST /v1/str", None),
        (b"G", None),
        (b"x" * MAX_HEAD_BYTES, True),
    ],
)
def test_which_connections_are_plain_http(head: bytes, verdict: bool | None) -> None:
    """The request line decides; until it is complete, nothing is decided (a request line
    that never ends goes to the HTTP side, which refuses it)."""
    assert is_http_request(head) is verdict


async def exchange(stack: Stack, pieces: list[bytes]) -> bytes:
    """Send `pieces` as separate writes; everything the gateway answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
    async with asyncio.timeout(TIMEOUT):
        answer = await reader.read()  # until the gateway closes the connection
    writer.close()
    return answer


def request(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/streams HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


async def test_a_request_split_into_single_bytes_streams_whole(make_stack: StackFactory) -> None:
    """A request (head and body) that arrives a byte at a time is read whole: the answer is
    chunked SSE ending with `done`, and the connection is closed after it."""
    stack = await make_stack()
    raw = request(orjson.dumps({"prompt": "sky [[mock chunks=3]]"}))
    answer = await exchange(stack, [raw[i : i + 1] for i in range(len(raw))])
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"connection: close" in head.lower()
    assert b"event: started" in body
    assert b"event: done" in body
    assert body.endswith(b"0\r\n\r\n")
    await stack.assert_no_leaks()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST /v1/streams HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
        (b"POST /v1/streams HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        (
            b"POST /v1/streams HTTP/1.1\r\n"
            + b"X-Big: "
            + b"y" * (MAX_HEAD_BYTES + 10)
            + b"\r\n\r\n",
            400,
        ),
        (b"PUT /v1/streams HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 404),
    ],
)
async def test_malformed_requests_are_refused_and_closed(
    make_stack: StackFactory, raw: bytes, status: int
) -> None:
    """A request h11 cannot take (bad length, two Hosts, a head over 16 KiB) is a 400 with an
    error body; an unknown route is a 404; either way the connection ends."""
    stack = await make_stack()
    answer = await exchange(stack, [raw])
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())
    body = answer.partition(b"\r\n\r\n")[2]
    assert orjson.loads(body)["type"] == "error"


async def test_a_request_that_never_ends_is_dropped_after_the_open_timeout(
    make_stack: StackFactory,
) -> None:
    """A client that sends half a request and waits is dropped after --open-timeout (on the
    fake clock), as a slow WebSocket handshake is."""
    clock = FakeClock()
    stack = await make_stack(clock=clock, open_timeout=10, ping_interval=0)
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
    writer.write(b"POST /v1/streams HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    await clock.timer_set(10)
    clock.advance(10)
    # Dropped with a reset, as a stalled WebSocket handshake is: nothing answered.
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(ConnectionResetError):
            await reader.read()
    writer.close()


async def test_a_pipelined_second_request_is_not_answered(make_stack: StackFactory) -> None:
    """One request per connection: a second one sent behind the first is ignored (the
    connection closes after the first answer)."""
    stack = await make_stack()
    first = request(orjson.dumps({"prompt": "sky [[mock chunks=2]]"}))
    answer = await exchange(stack, [first + first])
    assert answer.count(b"HTTP/1.1 ") == 1
    assert answer.count(b"event: started") == 1
