"""Fuzzing the protocol surface with hypothesis: the pure frame parser and session (the running
gateway against hostile bytes: tests/io/test_hostile_clients.py)."""

from __future__ import annotations

import os
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
