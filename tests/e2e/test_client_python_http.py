"""The Python client's HTTP transport (clients/python, `transport="http"` and "auto"'s
fallback) against the real gateway: behind a proxy that refuses WebSocket upgrades, as some
corporate proxies do, and that can cut a response off (a dropped mobile connection).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from gateway_client import GatewayClient, UpstreamError

from tests.conftest import TIMEOUT, Stack, StackFactory
from tests.support import expected_text

PROMPT = "Why is the sky blue? [[mock chunks=12 delay_ms=5]]"


class Proxy:
    """An HTTP proxy in front of the gateway that refuses WebSocket upgrades (403) and passes
    everything else through, streaming; it can cut the next POST's response after N bytes."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.refused = 0
        self.cut_after: int | None = None
        self.methods: list[str] = []
        self._runner: web.ServerRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        server = web.Server(self._handle)
        self._runner = web.ServerRunner(server)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"ws://127.0.0.1:{port}/v1/ws"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            self.refused += 1
            return web.Response(status=403, text="WebSocket is not allowed here\n")
        self.methods.append(request.method)
        assert self._session is not None
        hop = ("host", "connection", "keep-alive", "transfer-encoding", "content-length")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
        body = await request.read()
        async with self._session.request(
            request.method,
            self.target + request.rel_url.path_qs,
            headers=headers,
            data=body or None,
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for name in ("Content-Type", "Retry-After", "WWW-Authenticate"):
                if name in upstream.headers:
                    response.headers[name] = upstream.headers[name]
            await response.prepare(request)
            cut = self.cut_after if request.method == "POST" else None
            if cut is not None:
                self.cut_after = None
            sent = 0
            async for data in upstream.content.iter_any():
                if cut is not None and sent + len(data) > cut:
                    await response.write(data[: cut - sent])
                    assert request.transport is not None
                    request.transport.abort()  # the connection drops mid-answer
                    return response
                sent += len(data)
                await response.write(data)
            await response.write_eof()
            return response


ProxyFactory = Callable[[Stack], Awaitable[Proxy]]


@pytest.fixture
async def proxied() -> AsyncIterator[ProxyFactory]:
    proxies: list[Proxy] = []

    async def factory(stack: Stack) -> Proxy:
        proxy = Proxy(f"http://127.0.0.1:{stack.gateway.port}")
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield factory
    for proxy in proxies:
        await proxy.stop()


async def test_auto_falls_back_to_http_behind_a_proxy_that_refuses_websocket(
    make_stack: StackFactory, proxied: ProxyFactory
) -> None:
    """The upgrade is refused, the HTTP side answers: the client switches for good and streams
    exactly as over WebSocket; cancel sends DELETE and closes the upstream request."""
    stack = await make_stack()
    proxy = await proxied(stack)
    async with GatewayClient(proxy.url) as gw:
        assert gw.transport == "http"
        assert proxy.refused == 1
        stream = await gw.start(PROMPT, parts=["sources"])
        text = "".join([chunk async for chunk in stream])
        assert text == expected_text(PROMPT)
        answer = stream.result
        assert answer.text == text
        assert answer.finish_reason == "stop"
        victim = await gw.start("sky [[mock chunks=500 delay_ms=20 tag=py-http-cancel]]")
        async for _ in victim:
            break
        await victim.cancel()
    record = stack.mock.record("py-http-cancel")
    await asyncio.wait_for(record.ended.wait(), TIMEOUT)
    assert record.outcome == "client_closed"
    assert "DELETE" in proxy.methods
    await stack.assert_no_leaks()


async def test_http_transport_resumes_a_response_that_breaks_off(
    make_stack: StackFactory, proxied: ProxyFactory
) -> None:
    """A response cut mid-answer: the client reconnects and resumes with GET after its last seq;
    the text has no gap and no repeat."""
    stack = await make_stack()
    proxy = await proxied(stack)
    proxy.cut_after = 700
    async with GatewayClient(proxy.url, transport="http") as gw:
        stream = await gw.start("Why is the sky blue? [[mock chunks=30 delay_ms=10]]")
        text = "".join([chunk async for chunk in stream])
    assert text == expected_text("Why is the sky blue? [[mock chunks=30 delay_ms=10]]")
    assert "GET" in proxy.methods
    await stack.assert_no_leaks()


async def test_http_errors_are_the_same_typed_errors(make_stack: StackFactory) -> None:
    """An upstream error over HTTP is the same UpstreamError, with its status."""
    stack = await make_stack()
    async with GatewayClient(f"ws://127.0.0.1:{stack.gateway.port}/v1/ws", transport="http") as gw:
        stream = await gw.start("hello [[mock status=400]]")
        with pytest.raises(UpstreamError) as info:
            await stream.wait()
    assert info.value.status == 400


async def test_auto_stays_on_websocket_when_it_works(make_stack: StackFactory) -> None:
    """No proxy in the way: the WebSocket is used."""
    stack = await make_stack()
    async with GatewayClient(f"ws://127.0.0.1:{stack.gateway.port}/v1/ws") as gw:
        assert gw.transport == "websocket"
        stream = await gw.start(PROMPT)
        assert (await stream.wait()).text == expected_text(PROMPT)
