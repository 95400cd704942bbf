"""Resume after a dropped socket (in-process store): exactly once, in order, bounded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import TIMEOUT, FakeClock, Stack, StackFactory, is_terminal
from tests.support import chunks_text, drop, expected_text, resume, start_and_drop

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef01"


async def test_resume_after_a_drop_is_exactly_once(stack: Stack) -> None:
    """A dropped socket's stream keeps running; resuming on a new socket with the last seq seen
    replays what was missed, then continues live: the text is the full answer, once."""
    prompt = "tides [[mock chunks=60 delay_ms=10 tag=r]]"
    started, before = await start_and_drop(stack, prompt)
    last = max(f["seq"] for f in before if f["type"] == "text_chunk")
    client = await stack.client()
    after = await resume(client, started["resume_token"], last)
    seqs = [f["seq"] for f in after if f["type"] == "text_chunk"]
    assert seqs == list(range(last + 1, last + 1 + len(seqs)))
    assert after[-1]["type"] == "done"
    assert chunks_text(before) + chunks_text(after) == expected_text(prompt)
    assert after[-1]["text"] == expected_text(prompt)
    assert stack.mock.record("r").outcome == "completed"  # the upstream ran through the drop
    await stack.assert_no_leaks()


async def test_resume_after_the_stream_ended_replays_the_end(stack: Stack) -> None:
    """A client that missed the end (the stream finished during the drop) gets the rest and the
    terminal frame from the retained output."""
    prompt = "coffee [[mock chunks=30 delay_ms=2 tag=e]]"
    started, before = await start_and_drop(stack, prompt, after_chunks=1)
    await asyncio.wait_for(stack.mock.record("e").ended.wait(), 5)
    await stack.assert_no_leaks()  # finished: nothing runs, only output is retained
    client = await stack.client()
    after = await resume(client, started["resume_token"], 1, sid="again")
    assert [f["id"] for f in after] == ["again"] * len(after)
    assert after[-1]["type"] == "done"
    assert after[-1]["text"] == expected_text(prompt)
    first = [f for f in before if f["type"] == "text_chunk"]
    assert [f["seq"] for f in first] == [1]
    assert chunks_text(first) + chunks_text(after) == expected_text(prompt)


async def test_resume_moves_a_stream_from_a_live_socket(stack: Stack) -> None:
    """A stream is followed by one socket at a time: resuming elsewhere moves it."""
    first = await stack.client()
    await first.start("s", "stars [[mock chunks=80 delay_ms=10 tag=m]]")
    started = await first.recv_until(lambda f: f["type"] == "started")
    seen = await first.recv_until(lambda f: f["type"] == "text_chunk")
    second = await stack.client()
    frames = await resume(second, started["resume_token"], seen["seq"])
    assert frames[-1]["type"] == "done"
    # The first socket got nothing of that stream after the move, and never a terminal.
    await first.send({"type": "ping"})
    await first.recv_until(lambda f: f["type"] == "pong")
    assert not any(is_terminal(f) for f in first.by_id["s"])


async def test_clean_close_cancels_and_resume_is_unavailable(stack: Stack) -> None:
    """Closing the socket on purpose cancels its streams at once; their tokens are then
    resume_unavailable."""
    client = await stack.client()
    await client.start("s", "sky [[mock fault=stall after=2 tag=c]]")
    started = await client.recv_until(lambda f: f["type"] == "started")
    await client.recv_until(lambda f: f["type"] == "text_chunk")
    await client.ws.close()
    await asyncio.wait_for(stack.mock.record("c").ended.wait(), 5)
    assert stack.mock.record("c").outcome == "client_closed"
    other = await stack.client()
    await other.send(
        {"type": "resume", "id": "s", "resume_token": started["resume_token"], "after": 0}
    )
    err = await other.recv()
    assert (err["code"], err["id"], err["retryable"]) == ("resume_unavailable", "s", False)


async def test_grace_expiry_cancels_the_upstream(make_stack: StackFactory) -> None:
    """A dropped stream nobody resumes within --resume-grace has its upstream cancelled (not a
    moment before); a late resume is resume_unavailable. On the fake clock: no waiting."""
    clock = FakeClock()
    stack = await make_stack(clock=clock, resume_grace=30, ping_interval=0)
    started, _ = await start_and_drop(stack, "sky [[mock fault=stall after=2 tag=g]]", 1)
    await clock.timer_set(30)  # the gateway saw the drop: the grace runs
    clock.advance(29.9)
    assert stack.gateway.active_streams == 1  # still running, waiting for a resume
    clock.advance(0.1)
    record = stack.mock.record("g")
    await asyncio.wait_for(record.ended.wait(), 5)
    assert record.outcome == "client_closed"
    await stack.assert_no_leaks()
    client = await stack.client()
    await client.send(
        {"type": "resume", "id": "s", "resume_token": started["resume_token"], "after": 1}
    )
    assert (await client.recv())["code"] == "resume_unavailable"


async def test_retention_ends(make_stack: StackFactory) -> None:
    """An ended stream is resumable for --resume-retention (counted from its end, not from
    the last resume), then resume_unavailable."""
    clock = FakeClock()
    stack = await make_stack(clock=clock, resume_retention=120, ping_interval=0)
    client = await stack.client()
    await client.start("s", "sky [[mock chunks=3]]")
    started = await client.recv_until(lambda f: f["type"] == "started")
    await client.finish("s")
    await clock.timer_set(120)  # the stream's end was retained
    clock.advance(119.9)
    again = await resume(client, started["resume_token"], 0, sid="t")
    assert again[-1]["type"] == "done"
    clock.advance(0.1)
    await client.send(
        {"type": "resume", "id": "u", "resume_token": started["resume_token"], "after": 0}
    )
    assert (await client.recv())["code"] == "resume_unavailable"


async def test_bad_resumes(stack: Stack, tmp_path: Path) -> None:
    """Unknown tokens are unknown_id, an `after` beyond the last seq is bad_message, and an id
    already active on the socket is duplicate_id."""
    client = await stack.client()
    await client.start("s", "sky [[mock fault=stall after=2]]")
    started = await client.recv_until(lambda f: f["type"] == "started")
    await client.recv_until(lambda f: f["type"] == "text_chunk" and f["seq"] == 2)
    token = started["resume_token"]
    await client.send({"type": "resume", "id": "x", "resume_token": "nope" * 6, "after": 0})
    assert (await client.recv())["code"] == "unknown_id"
    await client.send({"type": "resume", "id": "x", "resume_token": token, "after": 99})
    assert (await client.recv())["code"] == "bad_message"
    await client.start("busy", "sky [[mock fault=stall]]")
    await client.recv_until(lambda f: f.get("id") == "busy")
    await client.send({"type": "resume", "id": "busy", "resume_token": token, "after": 0})
    assert (await client.recv_until(lambda f: f.get("type") == "error"))["code"] == "duplicate_id"


async def test_another_principal_cannot_resume(make_stack: StackFactory, tmp_path: Path) -> None:
    """A resume token is bound to its principal: anyone else gets unknown_id."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ALICE} alice\n{BOB} bob\n")
    stack = await make_stack(auth_tokens_file=str(tokens))
    headers = {"Authorization": f"Bearer {ALICE}"}
    started, _ = await start_and_drop(
        stack, "sky [[mock chunks=40 delay_ms=20]]", 1, additional_headers=headers
    )
    bob = await stack.client(additional_headers={"Authorization": f"Bearer {BOB}"})
    await bob.send(
        {"type": "resume", "id": "s", "resume_token": started["resume_token"], "after": 0}
    )
    assert (await bob.recv())["code"] == "unknown_id"
    alice = await stack.client(additional_headers=headers)
    frames = await resume(alice, started["resume_token"], 0)
    assert frames[-1]["type"] == "done"


async def test_cancel_after_resume_stops_at_once(stack: Stack) -> None:
    """An explicit cancel of a resumed stream stops it and its upstream immediately."""
    started, _ = await start_and_drop(stack, "sky [[mock fault=stall after=3 tag=x]]", 2)
    client = await stack.client()
    await client.send(
        {"type": "resume", "id": "s", "resume_token": started["resume_token"], "after": 2}
    )
    await client.recv_until(lambda f: f["type"] == "resumed")
    await client.cancel("s")
    frames = (await client.finish("s"))["s"]
    assert frames[-1]["type"] == "cancelled"
    await asyncio.wait_for(stack.mock.record("x").ended.wait(), 5)
    await stack.assert_no_leaks()


@pytest.mark.parametrize("old_socket", ["dropped", "open"])
async def test_stream_paused_by_a_slow_socket_goes_on_after_a_resume(
    make_stack: StackFactory, old_socket: str
) -> None:
    """A relay paused by flow control because its socket fell behind is let go when the stream
    leaves that socket (dropped, or still open but not reading): a resume on a new socket gets
    the whole answer."""
    stack = await make_stack(dialect="openai", send_buffer_bytes=16 * 1024)
    client = await stack.slow_client()
    prompt = "ocean salty [[mock chunks=20000 tag=paused]]"
    await client.start("s", prompt)
    started = await client.recv_until(lambda f: f["type"] == "started")
    connection = next(iter(stack.gateway.connections))
    await asyncio.wait_for(connection.flow.stalled.wait(), TIMEOUT)
    if old_socket == "dropped":
        await drop(client)
    fresh = await stack.client()
    frames = await resume(fresh, started["resume_token"], 0)
    assert frames[-1]["type"] == "done", frames[-1]
    assert chunks_text(frames) == expected_text(prompt)
    await stack.assert_no_leaks()
    if old_socket == "open":
        # Its close would wait --close-timeout behind the megabytes it never read.
        await drop(client)


# ------------------------------------------------------------------ retention accounting
