"""The per-socket state machine and its outbox, driven without sockets or clocks."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.protocol import ErrorCode, Start
from gateway.core.session import (
    Authenticate,
    CancelUpstream,
    CloseSocket,
    IllegalTransition,
    Limits,
    OpenUpstream,
    Outbox,
    Refused,
    Session,
    State,
    Stream,
    finish_done,
    finish_fail,
    move,
)
from gateway.core.usage import Meter, Usage, openai_usage


def make(max_streams: int = 16, capacity: bool = True, **limits: Any) -> Session:
    def admit(msg: Start) -> Refused | None:
        if capacity:
            return None
        return Refused(ErrorCode.TOO_MANY_STREAMS, "the gateway is at capacity; retry shortly")

    return Session("sess", Limits(max_streams, 65536, **limits), admit=admit)


def frames(session: Session) -> list[dict[str, Any]]:
    return [orjson.loads(f) for f in session.outbox.take_frames()]


def start(session: Session, sid: str, prompt: str = "hi") -> Stream:
    commands = session.receive(
        orjson.dumps({"type": "start", "id": sid, "prompt": prompt}).decode()
    )
    assert len(commands) == 1
    command = commands[0]
    assert isinstance(command, OpenUpstream)
    return command.stream


def test_welcome_then_started_then_chunks_then_done() -> None:
    """A stream's frames come in protocol order with seq counting sent chunks from 1."""
    s = make()
    s.welcome()
    stream = start(s, "s1")
    assert [f["type"] for f in frames(s)] == ["welcome", "started"]
    stream.push("Hel")
    assert frames(s) == [{"type": "text_chunk", "id": "s1", "seq": 1, "text": "Hel"}]
    stream.push("lo")
    finish_done(stream, {"citations": ["https://a"], "finish_reason": "stop"})
    assert frames(s) == [
        {"type": "text_chunk", "id": "s1", "seq": 2, "text": "lo"},
        {
            "type": "done",
            "id": "s1",
            "seq": 2,
            "text": "Hello",
            "citations": ["https://a"],
            "finish_reason": "stop",
        },
    ]
    assert stream.state is State.DONE
    assert s.streams == {}


def test_deltas_waiting_together_are_coalesced_into_one_frame() -> None:
    """Deltas that arrive before the writer drains become one frame, seq stays contiguous."""
    s = make()
    a, b = start(s, "a"), start(s, "b")
    frames(s)
    for word in ("one ", "two ", "three"):
        a.push(word)
        b.push(word.upper())
    out = frames(s)
    assert out == [
        {"type": "text_chunk", "id": "a", "seq": 1, "text": "one two three"},
        {"type": "text_chunk", "id": "b", "seq": 1, "text": "ONE TWO THREE"},
    ]
    a.push("!")
    assert frames(s) == [{"type": "text_chunk", "id": "a", "seq": 2, "text": "!"}]


def test_outbox_counts_buffered_bytes_and_notifies_once_per_batch() -> None:
    """The outbox reports waiting bytes for backpressure and wakes the writer when it fills,
    and at once (urgent) for a stream's first text, even behind other queued frames."""
    wakes: list[bool] = []
    s = Session("x", Limits(), Outbox(wakes.append))
    stream = start(s, "s")
    assert wakes == [False]  # `started`: the writer may wait for the iteration's rest
    stream.push("abcd")
    assert wakes == [False, True]  # the first text: urgent, though the queue was not empty
    stream.push("ef")
    assert wakes == [False, True]  # still queued: no further wake-up
    assert s.outbox.buffered == len(b'{"type":"started","id":"s"}') + 6
    s.outbox.take_frames()
    assert s.outbox.buffered == 0
    stream.push("g")
    assert wakes == [False, True, False]  # seq 1 was produced: no longer urgent
    other = start(s, "t")
    assert wakes == [False, True, False]  # queued behind `s`: the writer is awake already
    other.push("first")
    assert wakes == [False, True, False, True]


def test_cancel_drops_unsent_text_and_is_the_last_frame() -> None:
    """Cancel answers `cancelled` with the last seq sent; unsent text and later output vanish."""
    s = make()
    stream = start(s, "s1")
    stream.push("sent")
    frames(s)
    stream.push("never sent")
    commands = s.receive('{"type":"cancel","id":"s1"}')
    assert commands == [CancelUpstream(stream)]
    stream.push("late")
    finish_done(stream, {})
    finish_fail(stream, ErrorCode.STREAM_INTERRUPTED, "late")
    assert frames(s) == [{"type": "cancelled", "id": "s1", "seq": 1}]
    assert stream.state is State.CANCELLED


def test_cancel_racing_the_end_yields_exactly_one_terminal() -> None:
    """A cancel arriving after the stream finished is ignored: the done stays the only terminal."""
    s = make()
    stream = start(s, "s1")
    stream.push("x")
    finish_done(stream, {})
    assert s.receive('{"type":"cancel","id":"s1"}') == []
    out = frames(s)
    assert [f["type"] for f in out] == ["started", "text_chunk", "done"]


def test_cancel_of_unknown_id_is_an_error_with_that_id() -> None:
    """Cancelling an id that never ran answers unknown_id."""
    s = make()
    assert s.receive('{"type":"cancel","id":"nope"}') == []
    [err] = frames(s)
    assert err["code"] == "unknown_id"
    assert err["id"] == "nope"
    assert err["retryable"] is False


def test_duplicate_and_too_many_streams() -> None:
    """A start reusing an active id, or over max_streams, is refused with that id."""
    s = make(max_streams=2)
    start(s, "a")
    start(s, "b")
    frames(s)
    assert s.receive('{"type":"start","id":"a","prompt":"x"}') == []
    assert s.receive('{"type":"start","id":"c","prompt":"x"}') == []
    dup, many = frames(s)
    assert (dup["code"], dup["id"]) == ("duplicate_id", "a")
    assert (many["code"], many["id"], many["retryable"]) == ("too_many_streams", "c", True)


def test_id_can_be_reused_after_its_stream_ended() -> None:
    """Ids are unique among active streams only."""
    s = make()
    first = start(s, "a")
    finish_done(first, {})
    second = start(s, "a")
    assert second is not first


def test_process_capacity_refuses_start() -> None:
    """When the process is at --max-active-streams, starts get a retryable too_many_streams."""
    s = make(capacity=False)
    assert s.receive('{"type":"start","id":"a","prompt":"x"}') == []
    [err] = frames(s)
    assert (err["code"], err["retryable"]) == ("too_many_streams", True)


def test_not_accepting_answers_shutting_down() -> None:
    """While draining, a start is refused with a retryable shutting_down."""
    s = make()
    s.accepting = False
    s.receive('{"type":"start","id":"a","prompt":"x"}')
    [err] = frames(s)
    assert (err["code"], err["id"], err["retryable"]) == ("shutting_down", "a", True)


def test_protocol_errors_become_frames_and_the_session_goes_on() -> None:
    """Bad frames produce error frames; a following good frame still works."""
    s = make()
    s.receive("{oops")
    s.receive(b"\x00\x01")
    s.receive('{"type":"ping"}')
    out = frames(s)
    assert [(f["type"], f.get("code")) for f in out] == [
        ("error", "bad_json"),
        ("error", "bad_message"),
        ("pong", None),
    ]


def test_failure_carries_code_seq_and_extras() -> None:
    """An upstream failure ends the stream with an error frame that says how far it got."""
    s = make()
    stream = start(s, "s")
    stream.push("partial")
    finish_fail(stream, ErrorCode.UPSTREAM_ERROR, "upstream answered HTTP 503", True, status=503)
    out = frames(s)
    assert out[-1] == {
        "type": "error",
        "id": "s",
        "code": "upstream_error",
        "message": "upstream answered HTTP 503",
        "retryable": True,
        "seq": 1,
        "status": 503,
    }


def test_done_with_upstream_full_text_sends_the_missing_tail() -> None:
    """When the upstream's done carries more text than was streamed, the rest is sent first."""
    s = make()
    stream = start(s, "s")
    stream.push("Hello")
    frames(s)
    finish_done(stream, {}, final_text="Hello world")
    chunk, done = frames(s)
    assert chunk["text"] == " world"
    assert (done["seq"], done["text"]) == (2, "Hello world")


def test_done_with_disagreeing_upstream_text_keeps_what_was_sent() -> None:
    """done.text always equals the concatenated chunks the client received."""
    s = make()
    stream = start(s, "s")
    stream.push("abc")
    finish_done(stream, {}, final_text="xyz")
    assert frames(s)[-1]["text"] == "abc"


def test_close_ends_all_active_streams() -> None:
    """A closed socket ends every active stream and hands them back for upstream cancellation."""
    s = make()
    a, b = start(s, "a"), start(s, "b")
    finish_done(b, {})
    gone = s.close()
    assert gone == [a]
    assert a.state is State.CANCELLED
    assert a.outcome == "client_gone"


def test_detached_streams_produce_their_later_output_whether_queued_or_not() -> None:
    """A drop detaches every stream, also one with nothing queued at that moment: what it
    receives afterwards is produced at once (retained, mirrored to other instances), not left
    in the dead socket's outbox. (Found when client frames moved into callbacks: the drop
    then often came between two chunks, and a finished stream's `done` never reached Redis.)"""
    s = make()
    s.welcome()
    idle, busy = start(s, "idle"), start(s, "busy")
    idle.push("a")
    busy.push("b")
    frames(s)  # sent: neither stream is queued now
    busy.push("c")  # queued at the drop
    produced: list[tuple[str, int, str]] = []
    terminals: list[str] = []
    for stream in (idle, busy):
        stream.on_chunk = lambda st, seq, text: produced.append((st.id, seq, text))
        stream.on_terminal = lambda st, frame: terminals.append(st.id)
    assert s.detach() == [idle, busy]
    idle.push("x")
    finish_done(idle, {})
    busy.push("y")
    finish_done(busy, {})
    assert produced == [("busy", 2, "c"), ("idle", 2, "x"), ("busy", 3, "y")]
    assert terminals == ["idle", "busy"]
    assert idle.terminal_sent
    assert busy.terminal_sent
    assert s.outbox.take_frames() == []


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["start", "cancel", "text", "done", "fail", "drain", "junk"]),
            st.sampled_from(["a", "b", "c"]),
            st.text(max_size=5),
        ),
        max_size=60,
    )
)
def test_invariants_hold_for_any_interleaving(ops: list[tuple[str, str, str]]) -> None:
    """Under any sequence of events: one terminal per stream, nothing after it, contiguous seqs,
    and done.text equal to the concatenated chunks."""
    s = make(max_streams=2)
    live: dict[str, Stream] = {}
    sent: list[dict[str, Any]] = []
    for op, sid, text in ops:
        if op == "start":
            for cmd in s.receive(
                orjson.dumps({"type": "start", "id": sid, "prompt": "p"}).decode()
            ):
                assert isinstance(cmd, OpenUpstream)
                live[sid] = cmd.stream
        elif op == "cancel":
            s.receive(orjson.dumps({"type": "cancel", "id": sid}).decode())
        elif op == "junk":
            s.receive(text)
        elif sid in live:
            stream = live[sid]
            if op == "text" and text:
                stream.push(text)
            elif op == "done":
                finish_done(stream, {})
            elif op == "fail":
                finish_fail(stream, ErrorCode.STREAM_INTERRUPTED, "x")
        if op == "drain":
            sent.extend(frames(s))
    sent.extend(frames(s))
    # Group by stream "life": a started frame opens one, a terminal closes it.
    open_lives: dict[str, dict[str, Any]] = {}
    for f in sent:
        sid = f.get("id")
        if f["type"] == "started":
            assert sid not in open_lives
            open_lives[sid] = {"seq": 0, "text": []}
        elif f["type"] == "text_chunk":
            life = open_lives[sid]
            assert f["seq"] == life["seq"] + 1
            life["seq"] = f["seq"]
            life["text"].append(f["text"])
        elif f["type"] in ("done", "cancelled") or (f["type"] == "error" and "seq" in f):
            # An error ends a started stream only when it carries `seq`; refusals of a start
            # (duplicate_id, too_many_streams, ...) never do (protocol.md, "Errors").
            life = open_lives.pop(sid)
            assert f["seq"] == life["seq"]
            if f["type"] == "done":
                assert f["text"] == "".join(life["text"])


def test_awaiting_auth_takes_only_auth() -> None:
    """Before a first-message auth, an auth frame asks for validation and anything else closes
    the socket with 4401; no welcome is sent until the server says so."""
    s = Session("x", Limits(), awaiting_auth=True)
    assert s.receive('{"type":"auth","token":"abc"}') == [Authenticate("abc")]
    assert s.receive('{"type":"ping"}') == [CloseSocket(4401, "send an auth message first")]
    assert s.receive("{broken") == [CloseSocket(4401, "send an auth message first")]
    assert frames(s) == []
    s.welcome()
    assert not s.awaiting_auth
    assert frames(s)[0]["type"] == "welcome"


def test_expired_credential_refuses_starts() -> None:
    """Once the credential expired, starts get `unauthorized` (and no stream is opened)."""
    s = make()
    s.authorized = False
    assert s.receive('{"type":"start","id":"a","prompt":"x"}') == []
    [err] = frames(s)
    assert (err["code"], err["id"], err["retryable"]) == ("unauthorized", "a", False)


def test_model_allow_list_and_prompt_size() -> None:
    """Models outside the allow-list are bad_message; prompts over the limit prompt_too_large;
    both limits appear in welcome."""
    s = make(max_prompt_chars=10, allowed_models=frozenset({"sonar"}))
    s.welcome()
    assert frames(s)[0]["limits"] == {
        "max_streams": 16,
        "max_message_bytes": 65536,
        "max_prompt_chars": 10,
        "allowed_models": ["sonar"],
    }
    s.receive('{"type":"start","id":"a","prompt":"x","model":"gpt-5"}')
    s.receive('{"type":"start","id":"b","prompt":"01234567890"}')
    parts = '[{"type":"text","text":"0123456"},{"type":"text","text":"7890"}]'
    s.receive('{"type":"start","id":"c","messages":[{"role":"user","content":' + parts + "}]}")
    s.receive('{"type":"start","id":"d","prompt":"0123456789","model":"sonar"}')
    out = frames(s)
    assert [(f["id"], f.get("code", f["type"])) for f in out] == [
        ("a", "bad_message"),
        ("b", "prompt_too_large"),
        ("c", "prompt_too_large"),
        ("d", "started"),
    ]


def test_prompt_size_counts_a_tool_loop_conversation() -> None:
    """An assistant turn that only called tools (content null) counts as no text: the prompt
    limit and the usage estimate read the rest of the conversation (it used to crash)."""
    s = make(max_prompt_chars=10)
    s.welcome()
    frames(s)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "01234"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "56789"},
    ]
    s.receive(orjson.dumps({"type": "start", "id": "t", "messages": messages}).decode())
    messages[0]["content"] = "012345"
    s.receive(orjson.dumps({"type": "start", "id": "u", "messages": messages}).decode())
    out = frames(s)
    assert [(f["id"], f.get("code", f["type"])) for f in out] == [
        ("t", "started"),
        ("u", "prompt_too_large"),
    ]


def test_admission_refusal_carries_retry_after() -> None:
    """A rate-limit refusal from the server's admission check reaches the client with its
    retry_after_ms."""
    s = Session(
        "x",
        Limits(),
        admit=lambda msg: Refused(ErrorCode.RATE_LIMITED, "slow down", 1500),
    )
    s.receive('{"type":"start","id":"a","prompt":"x"}')
    [err] = frames(s)
    assert (err["code"], err["retry_after_ms"], err["retryable"]) == ("rate_limited", 1500, True)


def test_done_metadata_of_odd_shapes_is_held_to_the_documented_schema() -> None:
    """Upstream metadata of the wrong shape (citations as objects, a negative or text token
    count, a numeric finish_reason, usage as a list) is cleaned: the `done` frame matches
    docs/asyncapi.yaml and the Python client accepts it, with every well-formed field kept."""
    from gateway_client._frames import Done, parse_server_frame

    from tests.schema import validate_server_frame

    s = make()
    s.welcome()
    stream = start(s, "m")
    stream.meter = metered({"prompt_tokens": 5, "completion_tokens": -1, "total_tokens": "7"})
    stream.push("answer")
    finish_done(
        stream,
        {
            "citations": ["https://a", {"url": "https://b"}, 3],
            "search_results": [{"title": "t", "url": "https://a"}, "https://c"],
            "related_questions": ["why?", None],
            "images": [{"image_url": "https://i"}],
            "videos": "not a list",
            "usage": {"prompt_tokens": 5, "completion_tokens": -1, "total_tokens": "7", "cost": 1},
            "finish_reason": 1,
        },
    )
    done = frames(s)[-1]
    validate_server_frame(done)
    assert done["citations"] == ["https://a"]
    assert done["search_results"] == [{"title": "t", "url": "https://a"}]
    assert done["related_questions"] == ["why?"]
    assert done["images"] == [{"image_url": "https://i"}]
    assert "videos" not in done
    # The raw usage is not relayed: its well-formed counts are normalised (a bad count is 0).
    assert done["usage"] == {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}
    assert "finish_reason" not in done
    parsed = parse_server_frame(done)
    assert isinstance(parsed, Done)
    assert parsed.answer.text == "answer"
    assert parsed.answer.citations == ("https://a",)


# ------------------------------------------------------------------ the lifecycle table


def test_the_lifecycle_table_moves_active_streams_once_and_terminal_ones_never() -> None:
    """ACTIVE may end as DONE, CANCELLED or FAILED; a terminal state moves nowhere (the table
    is data, and `move` is the only way through it): a second end is an illegal move."""
    from gateway.core.session import TRANSITIONS

    assert TRANSITIONS[State.ACTIVE] == {State.DONE, State.CANCELLED, State.FAILED}
    for terminal in (State.DONE, State.CANCELLED, State.FAILED):
        assert not TRANSITIONS[terminal]
        s = make()
        [command] = s.receive('{"type":"start","id":"a","prompt":"p"}')
        assert isinstance(command, OpenUpstream)
        stream = command.stream
        move(stream, terminal, "test")
        assert (stream.state, stream.outcome) == (terminal, "test")
        for to in State:
            with pytest.raises(IllegalTransition):
                move(stream, to, "again")
        assert (stream.state, stream.outcome) == (terminal, "test")


def test_finishing_an_ended_stream_is_ignored_not_an_illegal_move() -> None:
    """The upstream's own end racing a cancel is normal: finish_done and finish_fail leave a
    stream that already ended as it is (exactly one terminal), without raising."""
    s = make()
    [command] = s.receive('{"type":"start","id":"a","prompt":"p"}')
    assert isinstance(command, OpenUpstream)
    stream = command.stream
    s.receive('{"type":"cancel","id":"a"}')
    finish_done(stream, {})
    finish_fail(stream, ErrorCode.STREAM_INTERRUPTED, "late")
    frames = [f for f in s.outbox.take_frames() if b'"id":"a"' in f]
    assert [orjson.loads(f)["type"] for f in frames] == ["started", "cancelled"]


# ------------------------------------------------------------------ typed parts


def start_with_parts(session: Session, sid: str, parts: list[str]) -> Stream:
    [command] = session.receive(
        orjson.dumps({"type": "start", "id": sid, "prompt": "p", "parts": parts}).decode()
    )
    assert isinstance(command, OpenUpstream)
    return command.stream


def test_parts_share_the_streams_seq_and_keep_the_upstreams_order() -> None:
    """Reasoning is coalesced like text; a part numbers the text waiting before it first; every
    content message takes the next seq, whatever its kind."""
    s = make()
    stream = start_with_parts(s, "s", ["reasoning", "sources", "tools", "progress"])
    frames(s)
    stream.push_reasoning("Let me ")
    stream.push_reasoning("think.")
    stream.push_progress({"kind": "search", "queries": ["sky"]})
    stream.push("The sky")
    stream.push(" is blue[1].")
    stream.push_sources([{"index": 1, "url": "https://a"}])
    stream.push(" Done.")
    stream.push_tool_call({"call_id": "c1", "name": "f", "arguments": {"x": 1}})
    finish_done(stream, {"finish_reason": "tool_calls"})
    got = frames(s)
    assert [(f["type"], f["seq"]) for f in got] == [
        ("reasoning_chunk", 1),
        ("progress", 2),
        ("text_chunk", 3),
        ("sources", 4),
        ("text_chunk", 5),
        ("tool_call", 6),
        ("done", 6),
    ]
    assert got[0]["text"] == "Let me think."
    assert got[1]["step"] == {"kind": "search", "queries": ["sky"]}
    assert got[2]["text"] == "The sky is blue[1]."
    assert got[3]["sources"] == [{"index": 1, "url": "https://a"}]
    assert got[5] == {
        "type": "tool_call",
        "id": "s",
        "seq": 6,
        "call_id": "c1",
        "name": "f",
        "arguments": {"x": 1},
    }
    assert got[-1]["text"] == "The sky is blue[1]. Done."


def test_a_client_that_asks_for_no_parts_gets_protocol_one_frames() -> None:
    """The same upstream output without `parts`: text and done only (the translator pushes no
    parts then; the stream would refuse none, so this pins what the session itself emits)."""
    s = make()
    stream = start(s, "s")
    frames(s)
    stream.push("a")
    stream.push("b")
    finish_done(stream, {})
    assert frames(s) == [
        {"type": "text_chunk", "id": "s", "seq": 1, "text": "ab"},
        {"type": "done", "id": "s", "seq": 1, "text": "ab"},
    ]


def test_replay_of_a_stream_with_parts_is_the_same_frames_under_the_new_id() -> None:
    """A resume replays text chunks and parts in their seq order, renamed, from any `after`."""
    s = make()
    stream = start_with_parts(s, "s", ["reasoning", "sources"])
    frames(s)
    sent: list[dict[str, Any]] = []
    stream.push_reasoning("hmm")
    stream.push("A")
    sent += frames(s)
    stream.push_sources([{"index": 1, "url": "https://a"}])
    stream.push("B")
    stream.push("C")
    stream.push_reasoning("more")
    sent += frames(s)
    finish_done(stream, {})
    sent += frames(s)
    assert [f["seq"] for f in sent] == [1, 2, 3, 4, 5, 5]
    for after in range(0, 6):
        replayed = [orjson.loads(f) for f in stream.replay(after, "t")]
        expected = [{**f, "id": "t"} for f in sent if f["seq"] > after or f["type"] == "done"]
        assert replayed == expected, after


def test_parts_of_a_detached_stream_are_retained_and_counted() -> None:
    """With no socket, parts are produced at once into the retained log (and mirrored), and a
    retained stream's size counts them."""
    s = make()
    stream = start_with_parts(s, "s", ["sources"])
    frames(s)
    s.detach()
    mirrored: list[tuple[int, bytes]] = []
    stream.on_part = lambda _s, seq, template: mirrored.append((seq, template))
    before = stream.retained_size()
    stream.push_sources([{"index": 1, "url": "https://example.com/" + "x" * 500}])
    stream.push("text")
    finish_done(stream, {})
    assert [seq for seq, _ in mirrored] == [1]
    assert b'"id":"__ID__"' in mirrored[0][1]
    assert stream.retained_size() - before >= 500
    assert [orjson.loads(f)["type"] for f in stream.replay(0, "s")] == [
        "sources",
        "text_chunk",
        "done",
    ]


class _Reading:
    """A translator's usage side, as a meter reads it."""

    def __init__(self, raw: Any = None, other_chars: int = 0) -> None:
        self.raw = raw
        self.other_chars = other_chars

    def usage(self) -> Usage | None:
        return openai_usage(self.raw)

    def output_chars(self) -> int:
        return self.other_chars


def metered(raw: Any = None, *, answered: bool = True, other_chars: int = 0) -> Meter:
    """A meter for an upstream that reported `raw` usage (a 10-token prompt estimate)."""
    meter = Meter(_Reading(raw, other_chars), 10, ("m",), None)
    meter.answered = answered
    return meter


def test_every_end_carries_the_usage_settled_as_it_ended() -> None:
    """`done` carries the upstream's final usage; `cancelled` an estimate from what was relayed,
    never below what the upstream had reported; an `error` before the upstream answered
    charges nothing; a stream that never reached an upstream carries none."""
    s = make()
    a, b, c, d = (start(s, sid) for sid in "abcd")
    frames(s)
    a.meter = metered({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    b.meter = metered({"prompt_tokens": 30, "completion_tokens": 1}, other_chars=8)
    c.meter = metered(answered=False)
    a.push("x")
    finish_done(a, {})
    b.push("0123456789ab")  # 12 characters: 3 tokens, and 8 of reasoning: 2 more
    s.receive('{"type":"cancel","id":"b"}')
    finish_fail(c, ErrorCode.UPSTREAM_ERROR, "boom")
    s.receive('{"type":"cancel","id":"d"}')
    got = {f["id"]: f for f in frames(s) if f["type"] in ("done", "cancelled", "error")}
    assert got["a"]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert got["b"]["usage"] == {
        "prompt_tokens": 30,
        "completion_tokens": 5,
        "total_tokens": 35,
        "estimated": True,
    }
    assert got["c"]["usage"] == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "estimated": True,
    }
    assert "usage" not in got["d"]
    assert (a.usage, b.usage, c.usage, d.usage)[:3] == tuple(
        Usage(**{k: v for k, v in got[x]["usage"].items() if k != "total_tokens"}) for x in "abc"
    )
    assert d.usage is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["text", "reasoning", "sources", "tool", "progress", "drain"]),
            st.text(min_size=1, max_size=4),
        ),
        max_size=40,
    ),
    st.integers(min_value=0, max_value=60),
)
def test_any_mix_of_parts_has_contiguous_seqs_and_replays_exactly(
    ops: list[tuple[str, str]], after: int
) -> None:
    """Whatever mix and batching: seqs are contiguous across kinds, text and reasoning keep their
    concatenation, and a replay from any point is the frames that were sent."""
    s = make()
    stream = start_with_parts(s, "s", ["reasoning", "sources", "tools", "progress"])
    frames(s)
    sent: list[dict[str, Any]] = []
    for op, text in ops:
        if op == "text":
            stream.push(text)
        elif op == "reasoning":
            stream.push_reasoning(text)
        elif op == "sources":
            stream.push_sources([{"index": 1, "url": text}])
        elif op == "tool":
            stream.push_tool_call({"call_id": text, "name": "f", "arguments": {}})
        elif op == "progress":
            stream.push_progress({"kind": "thought", "text": text})
        else:
            sent += frames(s)
    finish_done(stream, {})
    sent += frames(s)
    content = [f for f in sent if f["type"] != "done"]
    assert [f["seq"] for f in content] == list(range(1, len(content) + 1))
    assert sent[-1]["seq"] == len(content)
    texts = "".join(f["text"] for f in content if f["type"] == "text_chunk")
    assert texts == "".join(t for op, t in ops if op == "text") == sent[-1]["text"]
    assert "".join(f["text"] for f in content if f["type"] == "reasoning_chunk") == "".join(
        t for op, t in ops if op == "reasoning"
    )
    replayed = [orjson.loads(f) for f in stream.replay(min(after, len(content)), "s")]
    assert replayed == [
        f for f in sent if f["seq"] > min(after, len(content)) or f["type"] == "done"
    ]
