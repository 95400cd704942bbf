"""Shared fixtures: a real mock upstream, a real gateway and real WebSocket clients on loopback.

Everything runs in the test's event loop so that tests can also inspect both servers' state
(open upstream responses, active streams, live tasks) to prove that nothing leaked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect

from gateway.config import Config
from gateway.core.clock import ManualClock, Timer
from gateway.io.seams import FEEDS as upstream_feeds
from gateway.io.server import Gateway
from gateway.mock import MockUpstream
from tests.schema import validate_server_frame

TIMEOUT = 10.0

#: Real upstream streams recorded by other projects (../shared/reference/transcripts: they may
#: not be copied into this repository), or $GATEWAY_TRANSCRIPTS; None where neither exists.
_TRANSCRIPTS = Path(
    os.environ.get("GATEWAY_TRANSCRIPTS")
    or Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "transcripts"
)
TRANSCRIPTS: Path | None = _TRANSCRIPTS if _TRANSCRIPTS.is_dir() else None
TERMINAL = ("done", "cancelled")


def is_terminal(frame: dict[str, Any]) -> bool:
    """A frame that ends a stream: done, cancelled, or an error carrying `seq`."""
    return frame["type"] in TERMINAL or (frame["type"] == "error" and "seq" in frame)


class Client:
    """A thin protocol-v1 test client over a real websockets connection."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}
        #: Frames received per stream id (None for connection-level frames).
        self.by_id: dict[str | None, list[dict[str, Any]]] = {}
        #: Every frame received, in wire order.
        self.log: list[dict[str, Any]] = []

    async def send(self, obj: Any) -> None:
        await self.ws.send(orjson.dumps(obj).decode())

    async def start(self, sid: str, prompt: str, **fields: Any) -> None:
        await self.send({"type": "start", "id": sid, "prompt": prompt, **fields})

    async def cancel(self, sid: str) -> None:
        await self.send({"type": "cancel", "id": sid})

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        frame: dict[str, Any] = orjson.loads(raw)
        validate_server_frame(frame)  # every frame of the e2e suite matches docs/asyncapi.yaml
        self.by_id.setdefault(frame.get("id"), []).append(frame)
        self.log.append(frame)
        return frame

    async def recv_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv()
                if predicate(frame):
                    return frame

    async def finish(self, *ids: str, timeout: float = TIMEOUT) -> dict[str, list[dict[str, Any]]]:
        """Read until every id got its terminal frame; return each id's frames."""
        waiting = {i for i in ids if not any(is_terminal(f) for f in self.by_id.get(i, []))}
        async with asyncio.timeout(timeout):
            while waiting:
                frame = await self.recv()
                if frame.get("id") in waiting and is_terminal(frame):
                    waiting.discard(frame["id"])
        return {i: self.by_id[i] for i in ids}


def check_stream(frames: list[dict[str, Any]]) -> str:
    """Assert a stream's frames obey protocol v1; return its concatenated text."""
    assert frames[0]["type"] == "started", frames
    assert sum(is_terminal(f) for f in frames) == 1, frames
    assert is_terminal(frames[-1]), frames
    chunks = [f for f in frames if f["type"] == "text_chunk"]
    assert [c["seq"] for c in chunks] == list(range(1, len(chunks) + 1))
    assert frames[-1].get("seq", len(chunks)) == len(chunks)
    text = "".join(c["text"] for c in chunks)
    if frames[-1]["type"] == "done":
        assert frames[-1]["text"] == text
    return text


class FakeClock(ManualClock):
    """The gateway's clock in tests of time-based behaviour (grace, retention, auth and idle
    deadlines, keepalive, read gaps, handshake and close timeouts): it moves only when the test
    calls `advance()`, and the test can wait until the gateway has set a timer, which it does
    from network callbacks, at a moment the test cannot otherwise know. The wall clock starts
    at the real time, so that tokens made by the tests are valid on it."""

    def __init__(self) -> None:
        super().__init__(wall_start=time.time())
        #: Delays of the timers set and not yet waited for by `timer_set`.
        self.set_delays: list[float] = []
        self._changed = asyncio.Event()

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        self.set_delays.append(delay)
        self._changed.set()
        return super().call_later(delay, callback, *args)

    async def timer_set(self, delay: float, timeout: float = TIMEOUT) -> None:
        """Wait until a timer of `delay` seconds has been set (each one is waited for once)."""
        async with asyncio.timeout(timeout):
            while True:
                for i, set_delay in enumerate(self.set_delays):
                    if abs(set_delay - delay) < 1e-6:
                        del self.set_delays[i]
                        return
                self._changed.clear()
                await self._changed.wait()


@dataclasses.dataclass
class Stack:
    """A running mock upstream + gateway, and a way to open clients against them."""

    mock: MockUpstream
    gateway: Gateway
    clients: list[Client]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.gateway.port}/v1/ws"

    async def client(self, **kwargs: Any) -> Client:
        ws = await connect(self.url, **kwargs)
        client = Client(ws)
        client.welcome = await client.recv()
        assert client.welcome["type"] == "welcome"
        self.clients.append(client)
        return client

    async def slow_client(self, **kwargs: Any) -> Client:
        """A client on a slow link: 4 KiB kernel buffers on both ends (accepted sockets inherit
        SO_SNDBUF from the listening socket), so a backlog cannot hide in the kernel and a
        client that stops reading makes the gateway's flow control act."""
        for listener in self.gateway.sockets:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", self.gateway.port))
        return await self.client(sock=sock, **{"max_queue": 4, **kwargs})

    async def assert_no_leaks(self) -> None:
        """Every upstream request ended at the mock, and the gateway holds no stream state."""
        await self.mock.wait_idle(TIMEOUT)
        await asyncio.wait_for(self.gateway.idle.wait(), TIMEOUT)
        assert self.mock.open_requests == 0
        assert self.gateway.active_streams == 0
        assert self.gateway.upstream.open_responses == 0
        assert self.gateway.upstream.live_bodies == 0


StackFactory = Callable[..., Awaitable[Stack]]


REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")

#: The seams' modes every test gateway runs in (gateway/io/seams/): `make test-seams` runs the
#: end-to-end tests again with the public-API fallbacks forced.
SEAM_MODES: dict[str, str] = {
    key: os.environ[env]
    for key, env in (
        ("upstream_body", "GATEWAY_TEST_UPSTREAM_BODY"),
        ("client_frames", "GATEWAY_TEST_CLIENT_FRAMES"),
    )
    if os.environ.get(env)
}


async def require_redis() -> str:
    """The test Redis URL; skip locally (fail in CI, which starts Redis) when none answers."""
    probe = aioredis.Redis.from_url(REDIS_URL)
    try:
        await probe.ping()
    except OSError:
        if os.environ.get("CI"):
            raise
        pytest.skip("no Redis on 127.0.0.1:6379 (CI starts one)")
    finally:
        await probe.aclose()
    return REDIS_URL


@pytest.fixture
async def make_stack() -> AsyncIterator[StackFactory]:
    """Start a mock upstream and a gateway in front of it; stop both and check for leaks."""
    stacks: list[Stack] = []
    baseline = asyncio.all_tasks()

    async def factory(
        dialect: str = "perplexity",
        url: str | None = None,
        clock: ManualClock | None = None,
        **overrides: Any,
    ) -> Stack:
        """`clock`: a ManualClock that the gateway's timers run on (grace, retention, auth
        and idle deadlines, keepalive, read gaps), which the test moves instead of sleeping."""
        mock = MockUpstream(default_delay_ms=0, transcripts_dir=TRANSCRIPTS)
        base = await mock.start()
        config = Config(port=0, dialect=dialect, **{**SEAM_MODES, **overrides})
        gateway = Gateway(config, url or f"{base}/{dialect}", clock=clock)
        await gateway.start()
        stack = Stack(mock, gateway, [])
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        for client in stack.clients:
            await client.ws.close()
        await stack.gateway.stop()
        await stack.mock.stop()
    # No upstream body is still attached to a relay feed (gateway.io.seams.FEEDS).
    assert not upstream_feeds, upstream_feeds
    # Nothing the servers started may outlive them (tasks are owned and awaited).
    leftover = {t for t in asyncio.all_tasks() - baseline if not t.done()}
    leftover.discard(asyncio.current_task())  # type: ignore[arg-type]
    assert not leftover, leftover


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()
