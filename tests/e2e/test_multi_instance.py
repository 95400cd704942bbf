"""Several instances behind nginx on one Redis, as deployed (deploy/nginx.conf, docs/deploy.md):
a client resumes through nginx on the *other* instance, and an instance killed with SIGKILL
leaves its followers with stream_interrupted, never a hang, while the survivor keeps serving."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import connect

from gateway.mock import MockUpstream
from tests.conftest import Client, check_stream, require_redis
from tests.e2e.test_cli import Process, spawn
from tests.e2e.test_deploy import require_nginx, running_nginx
from tests.support import chunks_text, drop, expected_text, free_port, resume_frame


class Cluster:
    """Two gateway processes (ports a, b) behind nginx (port), one mock upstream, one Redis."""

    def __init__(self, mock: MockUpstream, gateways: dict[int, Process], nginx_port: int) -> None:
        self.mock = mock
        self.gateways = gateways
        self.url = f"ws://127.0.0.1:{nginx_port}/v1/ws"

    async def open_sockets(self, port: int) -> int:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            text = await resp.text()
        line = next(x for x in text.splitlines() if x.startswith("gateway_open_sockets "))
        return int(float(line.split()[1]))

    async def counts(self) -> dict[int, int]:
        return {port: await self.open_sockets(port) for port in self.gateways}

    async def wait_counts(self, expected: dict[int, int]) -> None:
        """Wait (bounded) until each instance holds the expected number of sockets."""
        async with asyncio.timeout(10):
            # Another process's state: its /metrics is the only window, so poll it (bounded).
            while await self.counts() != expected:  # noqa: ASYNC110
                await asyncio.sleep(0.02)

    async def client_on(self, port: int) -> Client:
        """A socket through nginx that landed on the instance at `port` (nginx balances by
        least connections: a socket held on the other instance steers the next one here)."""
        others: list[Client] = []
        try:
            for _ in range(4):
                before = await self.counts()
                client = Client(await connect(self.url))
                client.welcome = await client.recv()
                landed = None
                async with asyncio.timeout(10):
                    while landed is None:
                        now = await self.counts()
                        landed = next((p for p in now if now[p] > before[p]), None)
                        if landed is None:
                            await asyncio.sleep(0.02)
                if landed == port:
                    return client
                others.append(client)
            raise AssertionError("nginx never chose the wanted instance")
        finally:
            for other in others:
                await other.ws.close()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    nginx = require_nginx()
    redis_url = await require_redis()
    mock = MockUpstream(default_delay_ms=0)
    base = await mock.start()
    gateways: dict[int, Process] = {}
    try:
        for _ in range(2):
            port = free_port()
            process = await spawn(
                "serve",
                "--port",
                str(port),
                "--redis-url",
                redis_url,
                "--upstream-url",
                f"{base}/perplexity",
                "--log-format",
                "json",
                "--close-timeout",
                "1",
            )
            await process.wait_for("gateway.listening")
            gateways[port] = process
        async with running_nginx(nginx, tmp_path, list(gateways)) as nginx_port:
            yield Cluster(mock, gateways, nginx_port)
    finally:
        for process in gateways.values():
            if process.proc.returncode is None:
                process.proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(process.proc.wait(), 40)
        await mock.stop()


async def test_resume_through_nginx_on_the_other_instance_then_survive_a_kill(
    cluster: Cluster,
) -> None:
    """Through nginx: a dropped client resumes on the other instance with the exact answer;
    then SIGKILL of the instance owning a followed stream ends that stream with
    stream_interrupted on the follower, and the surviving instance keeps serving."""
    first, second = list(cluster.gateways)
    # 1. Resume on the other instance.
    client = await cluster.client_on(first)
    prompt = "thunder lightning [[mock chunks=80 delay_ms=15 tag=through]]"
    await client.start("s", prompt)
    started = await client.recv_until(lambda f: f["type"] == "started")
    for _ in range(3):
        await client.recv_until(lambda f: f["type"] == "text_chunk")
    before = client.by_id["s"]
    await drop(client)
    await cluster.wait_counts({first: 0, second: 0})
    follower = await cluster.client_on(second)
    last = max(f["seq"] for f in before if f["type"] == "text_chunk")
    await follower.send(resume_frame("s", started["resume_token"], last))
    resumed = await follower.recv_until(lambda f: f.get("id") == "s")
    assert resumed["type"] == "resumed"
    after = (await follower.finish("s", timeout=20))["s"]
    assert after[-1]["type"] == "done"
    assert chunks_text(before) + chunks_text(after) == expected_text(prompt)
    assert after[-1]["text"] == expected_text(prompt)
    await follower.ws.close()
    await cluster.wait_counts({first: 0, second: 0})

    # 2. SIGKILL the owner of a stream that another instance follows.
    owner_client = await cluster.client_on(first)
    await owner_client.start("k", "sky [[mock fault=stall after=3 tag=killed]]")
    k_started = await owner_client.recv_until(lambda f: f["type"] == "started")
    seen = await owner_client.recv_until(lambda f: f["type"] == "text_chunk")
    await drop(owner_client)
    await cluster.wait_counts({first: 0, second: 0})
    reader = await cluster.client_on(second)
    await reader.send(resume_frame("k", k_started["resume_token"], seen["seq"]))
    await reader.recv_until(lambda f: f.get("id") == "k" and f["type"] == "resumed")
    cluster.gateways[first].proc.send_signal(signal.SIGKILL)
    frames = (await reader.finish("k", timeout=20))["k"]
    assert frames[-1]["type"] == "error"
    assert (frames[-1]["code"], frames[-1]["retryable"]) == ("stream_interrupted", True)
    seqs = [f["seq"] for f in frames if f["type"] == "text_chunk"]
    assert seqs == list(range(seen["seq"] + 1, seen["seq"] + 1 + len(seqs)))
    assert frames[-1]["seq"] == (seqs[-1] if seqs else seen["seq"])

    # 3. The survivor serves new work through nginx.
    async with connect(cluster.url) as ws:
        survivor = Client(ws)
        await survivor.recv()
        await survivor.start("n", "coffee [[mock chunks=5]]")
        assert check_stream((await survivor.finish("n"))["n"])
