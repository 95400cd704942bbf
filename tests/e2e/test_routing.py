"""Routes through the running gateway (docs/upstreams.md): three mock upstreams of three
dialects (Anthropic, Perplexity, the seed's events) behind one routes file; fallback before
the first token on each kind of failure, invisible to the client; no switch after it; the
circuit breaker opening, half-opening and closing on the fake clock; Retry-After; model
renames; the models a client may name.

Each mock upstream is told to misbehave with `MockUpstream.force` (knobs that replace every
request's own), so one prompt meets a broken upstream and then a working one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.config import Config
from gateway.core.dialects import DIALECTS
from gateway.core.routes import UpstreamSpec, parse_routes
from gateway.io.server import Gateway
from gateway.mock import MockUpstream
from tests.conftest import SEAM_MODES, TIMEOUT, Client, FakeClock, check_stream
from tests.support import expected_text, free_port

PROMPT = "why is the sky blue [[mock chunks=4]]"


@dataclass
class Routed:
    """A gateway in front of mock upstreams `a`, `b` and `c` (and `dead`, where nothing
    listens)."""

    gateway: Gateway
    mocks: dict[str, MockUpstream]
    clock: FakeClock | None
    clients: list[Client]

    async def client(self) -> Client:
        from websockets.asyncio.client import connect

        ws = await connect(f"ws://127.0.0.1:{self.gateway.port}/v1/ws")
        client = Client(ws)
        client.welcome = await client.recv()
        self.clients.append(client)
        return client

    def requests(self, name: str) -> list[dict[str, Any]]:
        """The bodies upstream `name` received."""
        return [r.body or {} for r in self.mocks[name].records]

    def metric(self, name: str, **labels: str) -> float:
        value = self.gateway.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


ROUTES = """\
[upstreams.a]
url = "{a}/anthropic"
dialect = "anthropic"
breaker_failures = 2
breaker_cooldown = 30
first_byte_timeout = {first_byte}

[upstreams.b]
url = "{b}/perplexity"
dialect = "perplexity"

[upstreams.c]
url = "{c}/events"
dialect = "events"

[upstreams.dead]
url = "http://127.0.0.1:{dead}/openai"
dialect = "openai"

[[models]]
name = "fast"
upstreams = ["a", "b", "c"]
rename = {{ a = "a-model", b = "b-model" }}

[[models]]
name = "via-dead"
upstreams = ["dead", "b"]

[[models]]
name = "only-a"
upstreams = ["a"]

[[models]]
name = "solo*"
upstreams = ["c"]
"""

Factory = Callable[..., Awaitable[Routed]]


@pytest.fixture
async def routed() -> AsyncIterator[Factory]:
    made: list[Routed] = []

    async def factory(
        clock: FakeClock | None = None, first_byte: float = 30, **overrides: Any
    ) -> Routed:
        mocks = {name: MockUpstream(default_delay_ms=0) for name in "abc"}
        urls = {name: await mock.start() for name, mock in mocks.items()}
        text = ROUTES.format(**urls, dead=free_port(), first_byte=first_byte)
        defaults = UpstreamSpec("", "", "openai", retries=2)
        table = parse_routes(text, "routes.toml", defaults, tuple(DIALECTS), {}, None)
        config = Config(port=0, routes=table, routes_file="routes.toml", **SEAM_MODES, **overrides)
        gateway = Gateway(config, urls["a"], clock=clock)
        await gateway.start()
        stack = Routed(gateway, mocks, clock, [])
        made.append(stack)
        return stack

    yield factory
    for stack in made:
        for client in stack.clients:
            await client.ws.close()
        await stack.gateway.stop()
        for mock in stack.mocks.values():
            assert mock.open_requests == 0
            await mock.stop()


async def run(client: Client, sid: str, model: str, prompt: str = PROMPT) -> list[dict[str, Any]]:
    await client.start(sid, prompt, model=model)
    return (await client.finish(sid))[sid]


FAILURES = {
    "429": "status=429",
    "503": "status=503",
    "500": "status=500",
    "overloaded event": "fault=error after=0",  # Anthropic's overloaded_error in a 200
}


@pytest.mark.parametrize("kind", list(FAILURES))
async def test_a_failure_before_the_first_token_moves_the_stream_on(
    routed: Factory, kind: str
) -> None:
    """429, 5xx and an error event in a 200 answer, before any token, move the stream to the
    next upstream, with its own model name: the client sees one clean stream from seq 1."""
    stack = await routed()
    stack.mocks["a"].force = FAILURES[kind]
    client = await stack.client()
    frames = await run(client, "s", "fast")
    assert check_stream(frames) == expected_text(PROMPT)
    assert frames[-1]["type"] == "done"
    assert next(f["seq"] for f in frames if f["type"] == "text_chunk") == 1
    # a was tried once (no retry on the way to a fallback), b answered with its renamed model.
    assert [r["model"] for r in stack.requests("a")] == ["a-model"]
    assert [r["model"] for r in stack.requests("b")] == ["b-model"]
    assert stack.requests("c") == []
    assert stack.metric("gateway_upstream_fallbacks_total", upstream="a", reason="error") == 1
    assert stack.metric("gateway_upstream_requests_total", upstream="b") == 1
    # b's usage (5 prompt words, 4 chunks); an upstream that took the request and then failed
    # (the overloaded event after its message_start, which counted the prompt and 1 output
    # token) is charged too: the usage is then the sum, an estimate (docs/usage.md).
    usage = frames[-1]["usage"]
    if kind == "overloaded event":
        assert usage == {
            "prompt_tokens": 10,
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "completion_tokens": 5,
            "total_tokens": 15,
            "estimated": True,
        }
    else:
        assert usage == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


async def test_an_unreachable_upstream_moves_the_stream_on(routed: Factory) -> None:
    """A connect failure (nothing listens) is a fallback too."""
    stack = await routed()
    client = await stack.client()
    frames = await run(client, "s", "via-dead")
    assert check_stream(frames) == expected_text(PROMPT)
    assert [r["model"] for r in stack.requests("b")] == ["via-dead"]
    failures = stack.metric(
        "gateway_upstream_failures_total", upstream="dead", code="upstream_unavailable"
    )
    assert failures == 1


async def test_a_first_byte_timeout_moves_the_stream_on(routed: Factory) -> None:
    """An upstream that answers nothing within its own first_byte_timeout is left for the next
    (its connection closed: the mock sees the request end)."""
    stack = await routed(first_byte=0.2)
    stack.mocks["a"].force = "header_delay_ms=10000"
    client = await stack.client()
    frames = await run(client, "s", "fast")
    assert check_stream(frames) == expected_text(PROMPT)
    assert [r["model"] for r in stack.requests("b")] == ["b-model"]
    await stack.mocks["a"].wait_idle(TIMEOUT)
    assert stack.mocks["a"].records[0].outcome == "client_closed"


@pytest.mark.parametrize("fault", ["fault=reset after=2", "fault=error after=2"])
async def test_no_switch_after_the_first_token(routed: Factory, fault: str) -> None:
    """Once a token has gone to the client, a failure ends the stream with the honest error;
    no other upstream is asked."""
    stack = await routed()
    stack.mocks["a"].force = f"chunks=4 {fault}"
    client = await stack.client()
    frames = await run(client, "s", "fast")
    assert [f["type"] for f in frames] == ["started", "text_chunk", "text_chunk", "error"]
    assert frames[-1]["code"] in ("stream_interrupted", "upstream_error")
    assert stack.requests("b") == []
    assert stack.metric("gateway_upstream_fallbacks_total", upstream="a", reason="error") == 0


async def test_a_request_the_upstream_refuses_as_bad_is_not_moved_on(routed: Factory) -> None:
    """A 400 says the request is wrong, not the upstream: the client gets it, b is not asked."""
    stack = await routed()
    stack.mocks["a"].force = "status=400"
    client = await stack.client()
    frames = await run(client, "s", "fast")
    assert (frames[-1]["type"], frames[-1]["code"], frames[-1]["status"]) == (
        "error",
        "upstream_error",
        400,
    )
    assert stack.requests("b") == []


async def test_the_last_upstream_gets_its_retries(routed: Factory) -> None:
    """With nowhere left to go, a 503 is retried on the same upstream as before routes."""
    stack = await routed()
    client = await stack.client()
    frames = await run(client, "s", "only-a", "sky [[mock status=503 times=1 tag=r]]")
    assert frames[-1]["type"] == "done"
    assert len(stack.requests("a")) == 2


async def test_breaker_opens_skips_then_probes_and_closes(routed: Factory) -> None:
    """After breaker_failures failures in a row the upstream is skipped (no request reaches it,
    no time lost); after the cooldown one probe goes; its success closes the breaker."""
    clock = FakeClock()
    stack = await routed(clock=clock)
    a = stack.mocks["a"]
    a.force = "status=503"
    client = await stack.client()
    state = "gateway_upstream_breaker_state"
    for sid in ("1", "2"):
        assert (await run(client, sid, "fast"))[-1]["type"] == "done"
    assert len(stack.requests("a")) == 2
    assert stack.metric(state, upstream="a") == 2  # open
    assert (await run(client, "3", "fast"))[-1]["type"] == "done"
    assert len(stack.requests("a")) == 2  # skipped
    assert stack.metric("gateway_upstream_fallbacks_total", upstream="a", reason="breaker") == 1
    assert len(stack.requests("b")) == 3

    a.force = None  # a recovers; the breaker does not know until its probe
    clock.advance(29)
    assert (await run(client, "4", "fast"))[-1]["type"] == "done"
    assert len(stack.requests("a")) == 2
    clock.advance(1)
    frames = await run(client, "5", "fast")
    assert frames[-1]["type"] == "done"
    assert len(stack.requests("a")) == 3  # the probe
    assert len(stack.requests("b")) == 4
    assert stack.metric(state, upstream="a") == 0  # closed
    assert (await run(client, "6", "fast"))[-1]["type"] == "done"
    assert len(stack.requests("a")) == 4


async def test_a_failed_probe_opens_the_breaker_again(routed: Factory) -> None:
    """half-open -> open when the probe fails: the next streams skip the upstream again for a
    whole cooldown."""
    clock = FakeClock()
    stack = await routed(clock=clock)
    stack.mocks["a"].force = "status=503"
    client = await stack.client()
    for sid in ("1", "2"):
        await run(client, sid, "fast")
    clock.advance(30)
    await run(client, "probe", "fast")
    assert len(stack.requests("a")) == 3
    assert stack.metric("gateway_upstream_breaker_state", upstream="a") == 2
    clock.advance(29)
    await run(client, "4", "fast")
    assert len(stack.requests("a")) == 3


async def test_retry_after_keeps_the_upstream_out_of_rotation_that_long(routed: Factory) -> None:
    """A 429 with Retry-After moves the stream on at once and keeps a out for that long, even
    though one failure is below breaker_failures."""
    clock = FakeClock()
    stack = await routed(clock=clock)
    a = stack.mocks["a"]
    a.force = "status=429 retry_after=5"
    client = await stack.client()
    assert (await run(client, "1", "fast"))[-1]["type"] == "done"
    a.force = None
    assert (await run(client, "2", "fast"))[-1]["type"] == "done"
    assert len(stack.requests("a")) == 1
    clock.advance(5)
    assert (await run(client, "3", "fast"))[-1]["type"] == "done"
    assert len(stack.requests("a")) == 2


async def test_every_upstream_out_of_rotation_is_a_retryable_error_with_a_wait(
    routed: Factory,
) -> None:
    """When every upstream of a model is out of rotation the stream fails at once, retryable,
    saying how long until one is tried again."""
    clock = FakeClock()
    stack = await routed(clock=clock)
    stack.mocks["a"].force = "status=503"
    client = await stack.client()
    for sid in ("1", "2"):
        frames = await run(client, sid, "only-a")
        assert frames[-1]["code"] == "upstream_error"
    clock.advance(10)
    frames = await run(client, "3", "only-a")
    error = frames[-1]
    assert (error["code"], error["retryable"]) == ("upstream_unavailable", True)
    assert error["retry_after_ms"] == 20000
    assert len(stack.requests("a")) == 2 * 3  # 2 streams with 2 retries each, then none


async def test_models_are_the_routes_rules(routed: Factory) -> None:
    """welcome lists the rules' names (globs as written); a model no rule matches is
    bad_message naming them; a glob serves what it matches; GET /v1/models lists them too."""
    stack = await routed()
    client = await stack.client()
    assert client.welcome["limits"]["allowed_models"] == ["fast", "only-a", "via-dead", "solo*"]
    await client.start("x", PROMPT, model="gpt-5")
    error = await client.recv_until(lambda f: f.get("id") == "x")
    assert error["code"] == "bad_message"
    assert "'gpt-5' is not served here" in error["message"]
    assert "fast, only-a, via-dead, solo*" in error["message"]
    frames = await run(client, "g", "solo-1")
    assert check_stream(frames) == expected_text(PROMPT)
    assert [r["model"] for r in stack.requests("c")] == ["solo-1"]
    url = f"http://127.0.0.1:{stack.gateway.port}/v1/models"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        listing = orjson.loads(await resp.read())
    assert [m["id"] for m in listing["data"]] == ["fast", "only-a", "via-dead", "solo*"]
    assert listing["default"] == "fast"


async def test_a_stream_cancelled_while_its_first_upstream_hangs_is_not_moved_on(
    routed: Factory,
) -> None:
    """A cancel during the first attempt ends the stream: nothing is tried after it, and the
    waiting upstream request is closed."""
    stack = await routed()
    stack.mocks["a"].force = "header_delay_ms=10000 tag=hang"
    client = await stack.client()
    await client.start("s", PROMPT, model="fast")
    await client.recv_until(lambda f: f["type"] == "started")
    await stack.mocks["a"].wait_request("hang")
    await client.cancel("s")
    frames = (await client.finish("s"))["s"]
    assert frames[-1]["type"] == "cancelled"
    await stack.mocks["a"].wait_idle(TIMEOUT)
    assert stack.requests("b") == []
