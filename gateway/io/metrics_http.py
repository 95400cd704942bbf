"""`GET /metrics` on a listener of its own (--metrics-port).

Then the port clients reach answers `/metrics` with 404 (io.server), so that a public Service or
Ingress in front of it never exposes the gateway's numbers; Prometheus scrapes this port on each
instance instead. A small aiohttp server: scrapes are rare plain HTTP requests, which need none of
the WebSocket shell's own HTTP handling (io.websocket). With --workers every worker listens on
this port too (SO_REUSEPORT), and whichever answers reports them all (gateway/metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.config import listen_failed


class MetricsListener:
    """Serves `render()` (the Prometheus text format) at `GET /metrics`; anything else is 404."""

    def __init__(self, render: Callable[[], bytes]) -> None:
        self._render = render
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Listen on host:port (0: a free port), or raise StartupError (port in use, ...)."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        # No access log: a scrape every few seconds is not news.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
        except OSError as exc:
            await runner.cleanup()
            raise listen_failed("--metrics-port", host, port, exc) from None
        self._runner = runner

    @property
    def port(self) -> int:
        """The port listened on (the chosen one when started with 0)."""
        assert self._runner is not None
        port: int = self._runner.addresses[0][1]
        return port

    async def close(self) -> None:
        """Stop listening (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
