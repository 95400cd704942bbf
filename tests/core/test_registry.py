"""The resume registry (gateway/core/resume.py): replay, bounds, tombstones, and retention
accounting under any sequence of stream outcomes (a hypothesis state machine)."""

from __future__ import annotations

import secrets

import orjson
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gateway.core.protocol import ErrorCode
from gateway.core.resume import GONE, Registry
from gateway.core.session import Limits, OpenUpstream, Session, Stream, finish_done, finish_fail


def test_replay_reproduces_the_frames_with_a_new_id() -> None:
    """A stream replays every chunk after `after` (and its terminal) exactly as produced,
    under the id the resuming socket uses."""
    registry = Registry()
    session = Session("x", Limits(), registry=registry, new_token=lambda: "tok")
    [command] = session.receive('{"type":"start","id":"a","prompt":"p"}')
    assert isinstance(command, OpenUpstream)
    stream = command.stream
    for word in ("one ", "two ", "three"):
        stream.push(word)
        session.outbox.take_frames()
    finish_done(stream, {"usage": {"n": 3}})
    session.outbox.take_frames()
    assert registry.lookup("tok") is stream
    frames = [f.decode() for f in stream.replay(1, "b")]
    assert frames[0] == '{"type":"text_chunk","id":"b","seq":2,"text":"two "}'
    assert frames[1] == '{"type":"text_chunk","id":"b","seq":3,"text":"three"}'
    assert '"type":"done","id":"b","seq":3,"text":"one two three"' in frames[2]
    assert stream.replay(3, "b")[0].startswith(b'{"type":"done"')


def test_registry_bounds_and_tombstones() -> None:
    """Ended streams over the per-stream bound are not retained; the oldest are evicted past
    the total bound; forgotten tokens answer GONE."""
    size = Stream.retained_size  # of a 6-character answer in one chunk
    registry = Registry(max_stream_bytes=1150, max_total_bytes=2300)
    streams = []
    for i, text in enumerate(["x" * 100, "y" * 6, "z" * 6, "w" * 6]):
        session = Session("s", Limits(), registry=registry, new_token=lambda i=i: f"t{i}")
        [command] = session.receive('{"type":"start","id":"a","prompt":"p"}')
        assert isinstance(command, OpenUpstream)
        stream: Stream = command.stream
        stream.push(text)
        session.outbox.take_frames()
        finish_done(stream, {})
        session.outbox.take_frames()
        streams.append(stream)
        registry.ended(stream)
    assert registry.lookup("t0") is GONE  # over the per-stream bound
    assert registry.lookup("t1") is GONE  # evicted: oldest beyond the total bound
    assert registry.lookup("t2") is streams[2]
    assert registry.lookup("t3") is streams[3]
    assert registry.retained_bytes == size(streams[2]) + size(streams[3]) <= 2300
    assert size(streams[0]) > 1150 >= size(streams[1])
    assert registry.lookup("never") is None


# ------------------------------------------------------------------ over real sockets


class RetentionMachine(RuleBasedStateMachine):
    """Any sequence of starts, chunks, slow drains, ends, drops, resumes, forgets and evictions
    keeps the retained byte count equal to the sum over the retained streams, never negative
    and within the total bound (the server's calls, in the server's order)."""

    def __init__(self) -> None:
        super().__init__()
        self.registry = Registry(max_stream_bytes=1300, max_total_bytes=4000)
        self.sessions = [
            Session(
                f"s{i}",
                Limits(max_streams=1000),
                registry=self.registry,
                new_token=lambda: secrets.token_urlsafe(16),
            )
            for i in range(3)
        ]
        self.streams: list[Stream] = []
        self.ids = 0

    @rule(session=st.integers(0, 2))
    def start(self, session: int) -> None:
        self.ids += 1
        frame = orjson.dumps({"type": "start", "id": f"x{self.ids}", "prompt": "p" * 40})
        [opened] = self.sessions[session].receive(frame.decode())
        assert isinstance(opened, OpenUpstream)
        self.streams.append(opened.stream)

    @rule(data=st.data(), text=st.text(min_size=1, max_size=120))
    def chunk(self, data: st.DataObject, text: str) -> None:
        if self.streams:
            data.draw(st.sampled_from(self.streams)).push(text)

    @rule(session=st.integers(0, 2))
    def drain(self, session: int) -> None:
        self.sessions[session].outbox.take_frames()

    @rule(data=st.data(), how=st.sampled_from(["done", "fail", "cancel"]))
    def end(self, data: st.DataObject, how: str) -> None:
        active = [s for s in self.streams if s.active]
        if not active:
            return
        stream = data.draw(st.sampled_from(active))
        if how == "done":
            finish_done(stream, {"citations": ["https://example.com/" + "c" * 30]})
        elif how == "fail":
            finish_fail(stream, ErrorCode.STREAM_INTERRUPTED, "broke", True)
        elif stream.owner is not None:
            stream.owner.receive(orjson.dumps({"type": "cancel", "id": stream.id}).decode())
            self.registry.forget(stream)  # the server's cancel_stream
        else:
            return
        # The relay task is over: the server asks whether the stream stays retained.
        self.registry.ended(stream)

    @rule(session=st.integers(0, 2))
    def drop(self, session: int) -> None:
        self.sessions[session].detach()

    @rule(data=st.data(), session=st.integers(0, 2))
    def resume(self, data: st.DataObject, session: int) -> None:
        candidates = [s for s in self.streams if self.registry.lookup(s.resume_token or "") is s]
        if candidates:
            stream = data.draw(st.sampled_from(candidates))
            self.ids += 1
            msg = {
                "type": "resume",
                "id": f"r{self.ids}",
                "resume_token": stream.resume_token,
                "after": data.draw(st.integers(0, stream.seq)),
            }
            self.sessions[session].receive(orjson.dumps(msg).decode())

    @rule(data=st.data())
    def retention_over(self, data: st.DataObject) -> None:
        retained = self.registry.retained()
        if retained:
            self.registry.forget(data.draw(st.sampled_from(retained)))

    @invariant()
    def accounting_holds(self) -> None:
        registry = self.registry
        retained = registry.retained()
        assert registry.retained_bytes == sum(s.retained_size() for s in retained)
        assert 0 <= registry.retained_bytes <= registry.max_total_bytes
        assert all(s.retained_size() <= registry.max_stream_bytes for s in retained)
        assert all(not s.active for s in retained)


TestRetentionAccounting = RetentionMachine.TestCase
TestRetentionAccounting.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
