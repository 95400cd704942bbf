"""Budgets across instances through a real Redis (docs/security.md, "Budgets"): what one
instance charges, the others know within a pub/sub message; two gateway processes enforce one
budget; Redis going away mid-run degrades to per-process accounting (a warning, a metric, no
refusal of everyone, no crash) and the charges made meanwhile reach Redis once it is back.

Each test uses principals of its own (a tokens file), so runs sharing the test Redis never see
one another's spend.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from gateway.config import Config
from gateway.core.budget import window_start
from gateway.io.redis_store import RedisStore
from gateway.io.server import Gateway
from gateway.mock import MockUpstream
from tests.conftest import TIMEOUT, Client, is_terminal, require_redis
from tests.e2e.test_cli import spawn
from tests.support import RedisProxy, free_port

PROMPT = "blue sky [[mock chunks=3]]"  # 2 prompt tokens + 3 completion tokens = 5


async def principals_file(tmp_path: Path, *names: str) -> tuple[Path, dict[str, str]]:
    """A tokens file for fresh principals (unique per run): name -> token."""
    run = secrets.token_hex(4)
    tokens = {name: f"{name}-{secrets.token_hex(12)}" for name in names}
    path = tmp_path / "tokens"
    path.write_text("".join(f"{tokens[n]} {n}-{run}\n" for n in names))
    return path, {n: tokens[n] for n in names} | {f"@{n}": f"{n}-{run}" for n in names}


async def client_of(gateway: Gateway, token: str) -> Client:
    ws = await connect(
        f"ws://127.0.0.1:{gateway.port}/v1/ws",
        additional_headers={"Authorization": f"Bearer {token}"},
    )
    client = Client(ws)
    client.welcome = await client.recv()
    return client


async def run(client: Client, sid: str) -> dict[str, Any]:
    """Start a stream; its last frame (its terminal one, or the error refusing it)."""
    await client.start(sid, PROMPT)
    return await client.recv_until(
        lambda f: f["id"] == sid and (is_terminal(f) or f["type"] == "error")
    )


async def wait_until(event: asyncio.Event, condition: Any) -> None:
    """Wait on `event` (set by the gateway as its state changes) until `condition()` holds."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            event.clear()
            if condition():
                return
            await event.wait()


@pytest.fixture
async def mock() -> AsyncIterator[str]:
    upstream = MockUpstream(default_delay_ms=0)
    base = await upstream.start()
    yield f"{base}/perplexity"
    await upstream.stop()


async def test_a_charge_on_one_instance_reaches_the_other_through_redis(
    mock: str, tmp_path: Path
) -> None:
    """Two instances, one budget of 8 tokens: alice spends 10 on instance A; B learns of it
    from A's published totals (no request of its own) and refuses her next start there."""
    redis_url = await require_redis()
    tokens_file, tokens = await principals_file(tmp_path, "alice")
    gateways = []
    for _ in range(2):
        config = Config(
            port=0, redis_url=redis_url, auth_tokens_file=str(tokens_file), budget_tokens=8
        )
        gateway = Gateway(config, mock)
        await gateway.start()
        gateways.append(gateway)
    a, b = gateways
    try:
        on_b = await client_of(b, tokens["alice"])  # B reads her total (0) as she connects
        on_a = await client_of(a, tokens["alice"])
        assert (await run(on_a, "1"))["type"] == "done"
        assert (await run(on_a, "2"))["type"] == "done"  # crosses 8 and still finishes
        alice = tokens["@alice"]
        await wait_until(
            b.accounting.updated,
            lambda: b.accounting.ledger.spent(alice, b.clock.wall()).total_tokens == 10,
        )
        refused = await run(on_b, "3")
        assert refused["code"] == "budget_exceeded", refused
        report = await b.accounting.report(b.auth.authenticate(tokens["alice"], 0))
        assert report["usage"]["total_tokens"] == 10
        assert report["shared"] is True
        for client in (on_a, on_b):
            await client.ws.close()
    finally:
        for gateway in gateways:
            await gateway.stop()


async def test_redis_going_away_degrades_to_per_process_accounting(
    mock: str, tmp_path: Path
) -> None:
    """Redis goes away mid-run: streams go on, the instance warns, exports
    gateway_budget_shared 0 and keeps enforcing the budget with what it counts itself; when
    Redis is back, the charges made meanwhile are sent and the shared total is whole."""
    redis_url = await require_redis()
    proxy = RedisProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    await proxy.start()
    db = redis_url.rsplit("/", 1)[1]
    tokens_file, tokens = await principals_file(tmp_path, "bob")
    config = Config(
        port=0,
        redis_url=f"redis://127.0.0.1:{proxy.port}/{db}",
        auth_tokens_file=str(tokens_file),
        budget_tokens=12,
    )
    gateway = Gateway(config, mock)
    await gateway.start()
    accounting = gateway.accounting
    direct = aioredis.Redis.from_url(redis_url)
    bob = tokens["@bob"]
    key = f"gw:u:{window_start(gateway.clock.wall(), config.budget_window)}:{bob}"
    try:
        client = await client_of(gateway, tokens["bob"])
        assert (await run(client, "1"))["type"] == "done"
        await wait_until(accounting.synced, lambda: accounting.ledger.unacknowledged() == 0)
        assert int(await direct.hget(key, "t") or 0) == 5

        await proxy.cut()
        assert (await run(client, "2"))["type"] == "done"  # streaming goes on
        await wait_until(accounting.changed, lambda: not accounting.shared)
        registry = gateway.metrics.registry
        assert registry.get_sample_value("gateway_budget_shared") == 0
        assert (registry.get_sample_value("gateway_budget_sync_failures_total") or 0) >= 1
        assert (await run(client, "3"))["type"] == "done"  # 10 of 12: still admitted
        refused = await run(client, "4")  # 15 of 12, counted by this process alone
        assert refused["code"] == "budget_exceeded", refused
        report = await accounting.report(gateway.auth.authenticate(tokens["bob"], 0))
        assert (report["usage"]["total_tokens"], report["shared"]) == (15, False)

        await proxy.start()
        await wait_until(accounting.synced, lambda: accounting.ledger.unacknowledged() == 0)
        assert int(await direct.hget(key, "t") or 0) == 15  # nothing charged was lost
        await wait_until(accounting.changed, lambda: accounting.shared)
        assert registry.get_sample_value("gateway_budget_shared") == 1
        await client.ws.close()
    finally:
        await gateway.stop()
        await proxy.stop()
        await direct.delete(key)
        await direct.aclose()


async def test_two_gateway_processes_share_one_budget(tmp_path: Path) -> None:
    """Two `python -m gateway serve` processes on one Redis: carol spends her 8 tokens on the
    first; the second reports her usage and refuses her start; its /metrics shows the budget
    shared."""
    redis_url = await require_redis()
    upstream = MockUpstream(default_delay_ms=0)
    base = await upstream.start()
    tokens_file, tokens = await principals_file(tmp_path, "carol")
    processes = []
    try:
        ports = []
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
                "--auth-tokens-file",
                str(tokens_file),
                "--budget-tokens",
                "8",
                "--log-format",
                "json",
            )
            processes.append(process)
            await process.wait_for("gateway.listening")
            ports.append(port)
        headers = {"Authorization": f"Bearer {tokens['carol']}"}
        urls = [f"ws://127.0.0.1:{port}/v1/ws" for port in ports]
        for sid in ("1", "2"):
            async with connect(urls[0], additional_headers=headers) as ws:
                client = Client(ws)
                await client.recv()
                assert (await run(client, sid))["type"] == "done"
        first = await processes[0].wait_for("stream.end")
        assert first["total_tokens"] == 5
        assert first["usage_estimated"] is False
        async with aiohttp.ClientSession() as http:
            # The second process reads her window's total from Redis (charges land as each
            # relay ends: wait, bounded, until both are in).
            async with asyncio.timeout(TIMEOUT):
                while True:
                    async with http.get(
                        f"http://127.0.0.1:{ports[1]}/v1/usage", headers=headers
                    ) as resp:
                        report = orjson.loads(await resp.read())
                    if report["usage"]["total_tokens"] == 10:
                        break
                    await asyncio.sleep(0.05)  # another process's state: poll its answer
            assert report["remaining"] == {"tokens": 0, "cost": None}
            async with connect(urls[1], additional_headers=headers) as ws:
                client = Client(ws)
                await client.recv()
                refused = await run(client, "3")
            assert refused["code"] == "budget_exceeded", refused
            async with http.get(f"http://127.0.0.1:{ports[1]}/metrics") as resp:
                assert "gateway_budget_shared 1.0" in await resp.text()
    finally:
        for process in processes:
            if process.proc.returncode is None:
                process.proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(process.proc.wait(), 40)
        await upstream.stop()
        direct = aioredis.Redis.from_url(redis_url)
        async for key in direct.scan_iter(match=f"gw:u:*:{tokens['@carol']}"):
            await direct.delete(key)
        await direct.aclose()


async def test_a_batch_sent_again_is_counted_once() -> None:
    """A batch of charges whose answer was lost is sent again with the same number: Redis counts
    it once and answers the same totals; the instance's next batch counts; another instance's
    batch of the same number counts too (the numbers are per instance)."""
    redis_url = await require_redis()
    store, elsewhere = RedisStore(redis_url, 30), RedisStore(redis_url, 30)
    principal = f"dave-{secrets.token_hex(4)}"
    rows = [(principal, 3600, (2, 3, 5, 7))]
    try:
        first = await store.usage_add(1, rows, 2**31)
        again = await store.usage_add(1, rows, 2**31)
        following = await store.usage_add(2, rows, 2**31)
        assert first == again == [(2, 3, 5, 7)]
        assert following == [(4, 6, 10, 14)]
        elsewhere.instance = "another"
        assert await elsewhere.usage_add(1, rows, 2**31) == [(6, 9, 15, 21)]
        assert await store.redis.ttl(f"gw:u:3600:{principal}") > 0
    finally:
        await store.redis.delete(f"gw:u:3600:{principal}")
        await store.redis.aclose()
        await elsewhere.redis.aclose()


async def test_charges_land_once_when_the_redis_user_may_not_publish(
    mock: str, tmp_path: Path
) -> None:
    """A Redis whose ACL user lacks the gw:usage channel (a deployment from before it): the
    increments are taken and acknowledged, the failed publish is a warning, and nothing is sent
    (and counted) again."""
    from tests.e2e.test_deploy import running_redis

    password = secrets.token_hex(8)
    args = ["--save", "", "--appendonly", "no", "--user", "default", "off"]
    args += ["--user", "gateway", "on", f">{password}", "~gw:*", "&gw:ctl:*", "+@all"]
    tokens_file, tokens = await principals_file(tmp_path, "erin")
    async with running_redis(args, tmp_path / "redis") as port:
        url = f"redis://gateway:{password}@127.0.0.1:{port}/0"
        config = Config(port=0, redis_url=url, auth_tokens_file=str(tokens_file))
        gateway = Gateway(config, mock)
        await gateway.start()
        accounting = gateway.accounting
        try:
            client = await client_of(gateway, tokens["erin"])
            for sid in ("1", "2"):
                assert (await run(client, sid))["type"] == "done"
                await gateway.idle.wait()
                await wait_until(accounting.synced, lambda: accounting.ledger.unacknowledged() == 0)
            key = f"gw:u:{window_start(gateway.clock.wall(), config.budget_window)}:"
            direct = aioredis.Redis.from_url(url)
            assert int(await direct.hget(key + tokens["@erin"], "t") or 0) == 10
            await direct.aclose()
            assert accounting._batch is None  # nothing left to send again
            assert accounting.shared is True
            await client.ws.close()
        finally:
            await gateway.stop()
