"""The dependency shortcuts and their public-API fallbacks (gateway/io/seams/): the self-tests
pass on the releases we allow, `auto` falls back when a dependency's internals change, and
every mode relays streams correctly. `make test-seams` also runs the end-to-end tests with the
fallbacks forced."""

from __future__ import annotations

from typing import Any

import aiohttp
import aiohttp.client_proto
import aiohttp.http_parser
import pytest
from structlog.testing import capture_logs

from gateway.io import seams
from gateway.io.seams import client_frames
from tests.conftest import Stack, StackFactory, check_stream
from tests.support import expected_text


def mode(stack: Stack, seam: str) -> str:
    registry = stack.gateway.metrics.registry
    modes = [
        m
        for m in ("push", "pull", "fast", "standard")
        if registry.get_sample_value("gateway_seam_mode", {"seam": seam, "mode": m}) == 1
    ]
    assert len(modes) == 1, modes
    return modes[0]


async def relay_one(stack: Stack) -> None:
    """A whole answer, then a cancelled one whose upstream connection closes."""
    client = await stack.client()
    prompt = "sky [[mock chunks=12]]"
    await client.start("a", prompt)
    assert check_stream((await client.finish("a"))["a"]) == expected_text(prompt)
    await client.start("b", "ocean [[mock chunks=400 delay_ms=5 tag=cancel]]")
    await client.recv_until(lambda f: f["type"] == "text_chunk")
    await client.cancel("b")
    await client.finish("b")
    record = stack.mock.record("cancel")
    await record.ended.wait()
    assert record.outcome == "client_closed"
    await stack.assert_no_leaks()


async def test_the_fast_paths_pass_their_self_tests_on_the_installed_releases() -> None:
    """On the aiohttp and websockets releases installed (the newest and, in `make test-min`,
    the oldest pyproject.toml allows) both shortcuts work: if a release breaks one, this fails
    in CI instead of production quietly running the fallback."""
    assert await seams.push_self_test() is None
    assert seams.frames_self_test() is None


@pytest.mark.parametrize(
    ("upstream_body", "client_frames"),
    [("push", "fast"), ("pull", "standard"), ("pull", "fast"), ("push", "standard")],
)
async def test_every_mode_relays_and_cancels(
    make_stack: StackFactory, upstream_body: str, client_frames: str
) -> None:
    """Forced modes are taken as they are, exported, and relay and cancel streams alike."""
    stack = await make_stack(upstream_body=upstream_body, client_frames=client_frames)
    assert mode(stack, "upstream_body") == upstream_body
    assert mode(stack, "client_frames") == client_frames
    assert stack.gateway.upstream.push is (upstream_body == "push")
    await relay_one(stack)


class _ChangedReader(aiohttp.StreamReader):
    """What a future aiohttp might hand out: its body reader with another slot layout."""

    __slots__ = ("_new_field",)


@pytest.fixture
def changed_aiohttp(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp's client parses responses with its Python parser, which creates bodies as
    `_ChangedReader`s: the push shortcut's class swap no longer fits (the C parser keeps its
    reader class where a test cannot reach it)."""
    monkeypatch.setattr(aiohttp.http_parser, "StreamReader", _ChangedReader)
    monkeypatch.setattr(
        aiohttp.client_proto, "HttpResponseParser", aiohttp.http_parser.HttpResponseParserPy
    )


@pytest.mark.usefixtures("changed_aiohttp")
async def test_auto_takes_pull_when_aiohttp_changes_its_body_reader(
    make_stack: StackFactory,
) -> None:
    """With a body reader the push shortcut cannot take over, the self-test says why, `auto`
    runs on the public API, says so in the log and in /metrics, and every stream completes."""
    assert await seams.push_self_test() is not None
    with capture_logs() as logs:
        stack = await make_stack(upstream_body="auto")
    assert mode(stack, "upstream_body") == "pull"
    [event] = [e for e in logs if e["event"] == "gateway.seams"]
    assert event["log_level"] == "warning"
    assert "upstream_body" in event["fallbacks"]
    await relay_one(stack)


@pytest.fixture
def changed_websockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """websockets' frame parser waits somewhere else when idle (its generators changed): the
    boundary check can no longer recognise it."""

    def elsewhere() -> None:
        pass

    monkeypatch.setattr(client_frames, "_AT_EOF", elsewhere.__code__)


@pytest.mark.usefixtures("changed_websockets")
async def test_auto_takes_standard_frames_when_websockets_changes_its_parser(
    make_stack: StackFactory,
) -> None:
    """With a parser the fast path cannot see at a frame boundary, `auto` gives every frame to
    websockets, says so, and clients are served as before."""
    assert seams.frames_self_test() is not None
    with capture_logs() as logs:
        stack = await make_stack(client_frames="auto")
    assert mode(stack, "client_frames") == "standard"
    [event] = [e for e in logs if e["event"] == "gateway.seams"]
    assert "client_frames" in event["fallbacks"]
    await relay_one(stack)


def test_a_boundary_check_that_lies_fails_the_self_test() -> None:
    """The frames self-test catches a check that is always true (it would parse frames in the
    middle of another) as well as one that is never true."""

    def always(_protocol: Any) -> bool:
        return True

    def never(_protocol: Any) -> bool:
        return False

    assert "middle of a frame" in str(seams.frames_self_test(always))
    assert "idle" in str(seams.frames_self_test(never))


@pytest.mark.usefixtures("changed_aiohttp")
async def test_forcing_push_on_a_changed_aiohttp_is_the_outage_the_fallback_avoids(
    make_stack: StackFactory,
) -> None:
    """The incompatibility above is real: with push forced, a stream cannot be relayed (it
    ends `internal`, the way every stream would have in production without the fallback)."""
    stack = await make_stack(upstream_body="push")
    client = await stack.client()
    await client.start("a", "sky [[mock chunks=12]]")
    end = (await client.finish("a"))["a"][-1]
    assert end["type"] == "error"
    assert end["code"] == "internal"
