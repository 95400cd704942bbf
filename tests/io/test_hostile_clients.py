"""The running gateway against hostile bytes (docs/security.md, "Input hardening"); the pure
parser and session are fuzzed with hypothesis in tests/core/test_fuzz.py."""

from __future__ import annotations

import random

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.core.protocol import ErrorCode
from tests.conftest import Stack, check_stream

CODES = {code.value for code in ErrorCode}


async def test_hostile_clients_never_hurt_the_gateway(stack: Stack) -> None:
    """Random bytes, binary and huge frames, deep JSON, floods and rapid open/close: every bad
    frame gets an error or a close, and afterwards the gateway still serves a clean stream with
    nothing leaked."""
    rng = random.Random(1234)
    deep = "[" * 5000 + "]" * 5000
    nasty = [
        deep,
        '{"type":"start","id":"a","prompt":' + deep + "}",
        '{"type":"start","id":"a","messages":[' + "{}," * 3000 + "{}]}",
        "\u0000\u2028\ufeff",
        '{"type":"start","id":"a","prompt":"x","options":{"temperature":1e400}}',
        '{"type":"start","id":"a\\u0000","prompt":"x"}',
        '{"type":"cancel","id":"' + "z" * 10_000 + '"}',
        "x" * 70_000,  # over max_message_bytes, under the hard limit
    ]
    client = await stack.client()
    for frame in nasty:
        await client.ws.send(frame)
        answer = await client.recv()
        assert answer["type"] == "error", frame[:40]
        assert answer["code"] in CODES
    for _ in range(200):
        blob = rng.randbytes(rng.randint(0, 300))
        await client.ws.send(blob if rng.random() < 0.5 else blob.decode("latin-1"))
        assert (await client.recv())["type"] == "error"
    # Rapid open/close, some mid-start, some without a close frame.
    for i in range(40):
        ws = await connect(stack.url)
        if i % 2:
            await ws.send(
                orjson.dumps(
                    {"type": "start", "id": "q", "prompt": "sky [[mock chunks=50]]"}
                ).decode()
            )
        if i % 3 == 0:
            ws.transport.abort()
        else:
            await ws.close()
    # A frame over the hard limit closes that socket with 1009, and only that one.
    huge = await stack.client()
    await huge.ws.send("y" * (2 << 20))
    with pytest.raises(ConnectionClosed):
        await huge.recv(timeout=5)
    assert huge.ws.close_code == 1009
    await client.start("ok", "sky [[mock chunks=5]]")
    check_stream((await client.finish("ok"))["ok"])
    await stack.assert_no_leaks()  # and the fixture checks that no handler task outlived it
