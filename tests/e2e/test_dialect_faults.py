"""The scripted-fault suite for every dialect, through the running gateway: the mock upstream
speaks each API (its events, its error bodies, its mid-stream error event) and breaks in each
way it can; the client gets the answer, or the one honest error, with the right code and
`retryable`, and nothing is left open.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.dialects import DIALECTS
from tests.conftest import FakeClock, StackFactory, check_stream
from tests.support import expected_text

ALL = sorted(DIALECTS)
PROMPT = "why is the sky blue"


async def run(
    make_stack: StackFactory, dialect: str, knobs: str, **overrides: Any
) -> list[dict[str, Any]]:
    stack = await make_stack(dialect=dialect, **{"upstream_retries": 0, **overrides})
    client = await stack.client()
    await client.start("s", f"{PROMPT} [[mock {knobs}]]")
    frames = (await client.finish("s"))["s"]
    await stack.assert_no_leaks()
    return frames


@pytest.mark.parametrize("dialect", ALL)
async def test_a_whole_answer(make_stack: StackFactory, dialect: str) -> None:
    """The answer arrives chunk by chunk, in order, and `done` carries it whole, with a
    normalised finish reason."""
    frames = await run(make_stack, dialect, "chunks=5")
    assert check_stream(frames) == expected_text(f"{PROMPT} [[mock chunks=5]]")
    done = frames[-1]
    assert done["type"] == "done"
    if dialect != "events":  # the seed format has no finish reason
        assert done["finish_reason"] == "stop"


@pytest.mark.parametrize("dialect", [d for d in ALL if d != "events"])  # no finish reason
async def test_finish_by_length(make_stack: StackFactory, dialect: str) -> None:
    """An answer cut by the token limit says `length`."""
    frames = await run(make_stack, dialect, "chunks=3 finish=length")
    assert frames[-1]["type"] == "done"
    assert frames[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("dialect", ALL)
async def test_reset_after_the_first_tokens(make_stack: StackFactory, dialect: str) -> None:
    """A connection reset mid-answer: the chunks sent stand, then `stream_interrupted`."""
    frames = await run(make_stack, dialect, "chunks=5 fault=reset after=2")
    assert [f["type"] for f in frames] == ["started", "text_chunk", "text_chunk", "error"]
    assert (frames[-1]["code"], frames[-1]["retryable"]) == ("stream_interrupted", True)


@pytest.mark.parametrize("dialect", ALL)
async def test_clean_eof_before_the_end_marker(make_stack: StackFactory, dialect: str) -> None:
    """A clean EOF before the dialect's end is a cut-off answer (`stream_interrupted`),
    except for Perplexity, whose end marker is the EOF itself."""
    frames = await run(make_stack, dialect, "chunks=5 fault=eof after=2")
    if dialect == "perplexity":
        assert frames[-1]["type"] == "done"
    else:
        assert (frames[-1]["type"], frames[-1]["code"]) == ("error", "stream_interrupted")
        assert frames[-1]["seq"] == 2


@pytest.mark.parametrize("dialect", ALL)
@pytest.mark.parametrize("after", [0, 2])
async def test_the_apis_own_error_event(make_stack: StackFactory, dialect: str, after: int) -> None:
    """The API's mid-stream overloaded/server error event ends the stream with
    `upstream_error`, retryable, its message relayed (before or after the first tokens)."""
    frames = await run(make_stack, dialect, f"chunks=5 fault=error after={after}")
    error = frames[-1]
    assert (error["type"], error["code"], error["retryable"]) == ("error", "upstream_error", True)
    assert error["seq"] == after
    assert error["message"]


@pytest.mark.parametrize("dialect", ALL)
async def test_a_malformed_event(make_stack: StackFactory, dialect: str) -> None:
    """An event that is not the API's JSON: `upstream_protocol_error`, not retryable."""
    frames = await run(make_stack, dialect, "chunks=5 fault=malformed after=1")
    error = frames[-1]
    assert (error["code"], error["retryable"]) == ("upstream_protocol_error", False)


@pytest.mark.parametrize("dialect", ALL)
async def test_an_oversized_event(make_stack: StackFactory, dialect: str) -> None:
    """An event over 4 MiB is refused without being buffered whole."""
    frames = await run(make_stack, dialect, "chunks=3 fault=giant after=1 size=5000000")
    assert frames[-1]["code"] == "upstream_protocol_error"
    assert "over 4194304 bytes" in frames[-1]["message"]


@pytest.mark.parametrize("dialect", ALL)
@pytest.mark.parametrize(
    ("status", "body", "retryable"),
    [(429, "json", True), (503, "json", True), (400, "json", False), (401, "html", False)],
)
async def test_http_errors_in_the_apis_shape(
    make_stack: StackFactory, dialect: str, status: int, body: str, retryable: bool
) -> None:
    """An error status with the API's error body (or an HTML page): `upstream_error` with the
    status, the body's message when it is JSON, never the HTML."""
    frames = await run(make_stack, dialect, f"status={status} body={body}")
    error = frames[-1]
    assert (error["code"], error["status"], error["retryable"]) == (
        "upstream_error",
        status,
        retryable,
    )
    if body == "json":
        assert "simulated by the mock upstream" in error["message"]
    else:
        assert "<" not in error["message"]


@pytest.mark.parametrize("dialect", ALL)
async def test_a_silent_upstream_times_out(make_stack: StackFactory, dialect: str) -> None:
    """An upstream that stops sending mid-answer fails after --upstream-read-timeout (on the
    fake clock), `upstream_timeout`, its connection closed."""
    clock = FakeClock()
    stack = await make_stack(dialect=dialect, clock=clock, upstream_read_timeout=5, ping_interval=0)
    client = await stack.client()
    await client.start("s", f"{PROMPT} [[mock chunks=5 fault=stall after=1 tag=t]]")
    await client.recv_until(lambda f: f["type"] == "text_chunk")
    clock.advance(7)
    frames = (await client.finish("s"))["s"]
    assert (frames[-1]["code"], frames[-1]["retryable"]) == ("upstream_timeout", True)
    record = stack.mock.record("t")
    await record.ended.wait()
    assert record.outcome == "client_closed"
    await stack.assert_no_leaks()


@pytest.mark.parametrize("dialect", ALL)
async def test_cancel_closes_the_upstream_request(make_stack: StackFactory, dialect: str) -> None:
    """A cancel mid-answer closes the upstream connection at once (the mock sees its client
    go) and ends the stream with `cancelled`."""
    stack = await make_stack(dialect=dialect)
    client = await stack.client()
    await client.start("s", f"{PROMPT} [[mock chunks=5 fault=stall after=1 tag=c]]")
    await client.recv_until(lambda f: f["type"] == "text_chunk")
    await client.cancel("s")
    frames = (await client.finish("s"))["s"]
    assert frames[-1]["type"] == "cancelled"
    record = stack.mock.record("c")
    await record.ended.wait()
    assert record.outcome == "client_closed"
    await stack.assert_no_leaks()


def _scripted() -> list[tuple[str, str]]:
    from gateway.mock.formats import _FORMATTERS

    cases = []
    for dialect, fmt in sorted(_FORMATTERS.items()):
        for token in sorted(fmt.scripts):
            if token.startswith("reasoning="):
                cases.append((dialect, token))
            elif token in ("tools", "sources"):
                cases.append((dialect, f"{token}={2 if token == 'tools' else 3}"))
    return cases


PART_OF = {"reasoning": "reasoning_chunk", "tools": "tool_call", "sources": "sources"}


@pytest.mark.parametrize(("dialect", "token"), _scripted())
async def test_scripted_parts_reach_the_client(
    make_stack: StackFactory, dialect: str, token: str
) -> None:
    """Every typed part each API's mock can script (its reasoning shapes, tool calls, sources)
    reaches a client that asked for it, numbered with the text, and `done` agrees; a client
    that asked for none gets the same text and no part."""
    stack = await make_stack(dialect=dialect)
    client = await stack.client()
    # A tool-calling answer has no text to cut into chunks.
    knobs = token if token.startswith("tools") else f"chunks=4 {token}"
    prompt = f"{PROMPT} [[mock {knobs}]]"
    await client.start("s", prompt, parts=["reasoning", "sources", "tools", "progress"])
    await client.start("bare", prompt)
    frames = await client.finish("s", "bare")
    got, bare = frames["s"], frames["bare"]
    done = got[-1]
    assert done["type"] == "done", done
    kind = PART_OF[token.partition("=")[0]]
    parts = [f for f in got if f["type"] == kind]
    assert parts, [f["type"] for f in got]
    content = got[1:-1]
    assert [f["seq"] for f in content] == list(range(1, len(content) + 1))
    text = "".join(f["text"] for f in got if f["type"] == "text_chunk")
    assert text == done["text"]
    if kind == "reasoning_chunk":
        assert done["reasoning"] == "".join(f["text"] for f in parts)
        assert done["reasoning"] not in text
    if kind == "tool_call":
        assert done["tool_calls"] == [
            {k: v for k, v in f.items() if k not in ("type", "id", "seq")} for f in parts
        ]
        assert done["finish_reason"] == "tool_calls"
    assert bare[-1]["type"] == "done"
    assert {f["type"] for f in bare} == {"started", "text_chunk", "done"} or text == ""
    assert bare[-1]["text"] == text
    await stack.assert_no_leaks()


@pytest.mark.parametrize("dialect", ALL)
async def test_the_key_goes_where_the_api_wants_it(make_stack: StackFactory, dialect: str) -> None:
    """With --api-key-env set, each dialect sends the key in its API's own header (Bearer,
    x-api-key, x-goog-api-key): an upstream that checks it streams; a wrong key is its 401,
    not retryable, and the key never reaches the client."""
    stack = await make_stack(dialect=dialect, api_key="sk-test-0123456789")
    stack.mock.require_key = "sk-test-0123456789"
    client = await stack.client()
    await client.start("ok", f"{PROMPT} [[mock chunks=3]]")
    frames = (await client.finish("ok"))["ok"]
    assert frames[-1]["type"] == "done", frames[-1]
    stack.mock.require_key = "another-key-0123456789"
    await client.start("no", f"{PROMPT} [[mock chunks=3]]")
    error = (await client.finish("no"))["no"][-1]
    assert (error["code"], error["status"], error["retryable"]) == ("upstream_error", 401, False)
    assert "sk-test" not in str(client.log)
    await stack.assert_no_leaks()
