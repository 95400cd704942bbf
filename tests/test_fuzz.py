"""Fuzzing the protocol surface: the pure frame parser and session with hypothesis, and the
running gateway with hostile bytes (docs/security.md, "Input hardening")."""

from __future__ import annotations

import os
import random
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.core.protocol import ErrorCode, ProtocolViolation, parse_client_frame
from gateway.core.session import (
    Authenticate,
    CancelUpstream,
    Limits,
    OpenUpstream,
    Session,
    finish_done,
    finish_fail,
)
from tests.conftest import Stack, check_stream

CODES = {code.value for code in ErrorCode}
#: Bounded for CI; raise with FUZZ_EXAMPLES for a longer local run.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
ids = st.sampled_from(["a", "b", "c", "", "x" * 65, "bad id", 7, None])
frames = st.one_of(
    # well-formed and near-miss protocol frames
    st.fixed_dictionaries(
        {"type": st.sampled_from(["start", "cancel", "ping", "auth", "resume", "START", ""])},
        optional={
            "id": ids,
            "prompt": st.text(max_size=20) | json_values,
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "system", "tool", 1]), "content": json_values}
                ),
                max_size=3,
            )
            | json_values,
            "model": st.text(max_size=5) | json_values,
            "options": st.dictionaries(
                st.sampled_from(["temperature", "stream", "top_p", "_x"]), json_values, max_size=3
            )
            | json_values,
            "token": json_values,
        },
    ).map(lambda d: orjson.dumps(d).decode()),
    # arbitrary JSON and arbitrary text/bytes
    json_values.map(lambda v: orjson.dumps(v).decode()),
    st.text(max_size=200),
    st.binary(max_size=64),
)


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(frames)
def test_parser_answers_every_frame_with_a_message_or_a_documented_error(frame: Any) -> None:
    """The parser returns a message or raises ProtocolViolation with a documented code; nothing
    else ever escapes it."""
    error: ProtocolViolation | None = None
    try:
        parse_client_frame(frame, 65536)
    except ProtocolViolation as exc:
        error = exc
    if error is not None:
        assert error.code.value in CODES
        assert error.message
        assert error.stream_id is None or isinstance(error.stream_id, str)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            frames.map(lambda f: ("frame", f)),
            st.tuples(st.sampled_from(["text", "done", "fail", "drain"]), st.sampled_from("abc")),
        ),
        max_size=40,
    ),
    st.booleans(),
)
def test_session_never_raises_and_keeps_its_invariants(
    ops: list[tuple[str, Any]], awaiting_auth: bool
) -> None:
    """Random and adversarial frame sequences mixed with upstream events never raise out of the
    session; every frame yields its normal answer or a documented error; one terminal per
    stream and contiguous seqs hold throughout."""
    session = Session(
        "fuzz", Limits(max_streams=2, max_message_bytes=4096), awaiting_auth=awaiting_auth
    )
    live: dict[str, Any] = {}
    sent: list[dict[str, Any]] = []
    closed = False
    for kind, arg in ops:
        if kind == "frame":
            for cmd in session.receive(arg):
                if isinstance(cmd, OpenUpstream):
                    live[cmd.stream.id] = cmd.stream
                elif isinstance(cmd, Authenticate):
                    session.welcome()
                elif not isinstance(cmd, CancelUpstream):
                    closed = True  # CloseSocket: the server would stop here
            if closed:
                break
        elif kind == "drain":
            sent.extend(orjson.loads(f) for f in session.outbox.take_frames())
        elif arg in live:
            stream = live[arg]
            if kind == "text":
                stream.push("t")
            elif kind == "done":
                finish_done(stream, {"usage": {"n": 1}})
            else:
                finish_fail(stream, ErrorCode.STREAM_INTERRUPTED, "x")
    sent.extend(orjson.loads(f) for f in session.outbox.take_frames())
    lives: dict[str, int] = {}
    for f in sent:
        assert isinstance(f, dict)
        assert "type" in f
        if f["type"] == "error":
            assert f["code"] in CODES
        sid = f.get("id")
        if f["type"] == "started":
            assert sid not in lives
            lives[sid] = 0
        elif f["type"] == "text_chunk":
            lives[sid] += 1
            assert f["seq"] == lives[sid]
        elif f["type"] in ("done", "cancelled") or (f["type"] == "error" and "seq" in f):
            assert f["seq"] == lives.pop(sid)


# ------------------------------------------------------------------ against the real gateway


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
