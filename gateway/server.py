"""The WebSocket side: accept sockets, drive each one's `Session`, run its streams' upstreams.

The only module that imports websockets. Per socket there are exactly three kinds of task, each
named and owned: the handler (reads client frames, carries out the session's commands), one
writer (drains the outbox into the socket, so a slow client blocks only its own writer), and one
relay task per stream (cancelled on `cancel` or when the socket goes away, and always awaited
before the handler returns, so nothing outlives its socket).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Coroutine
from http import HTTPStatus
from typing import Any, Final

import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from gateway.config import Config
from gateway.observability import Metrics
from gateway.session import CancelUpstream, Limits, OpenUpstream, Outbox, Session, Stream
from gateway.upstream import FlowControl, Upstream

log = structlog.get_logger("gateway.server")

WS_PATH: Final = "/v1/ws"
#: Frames above this are refused by websockets itself with close code 1009; frames between
#: max_message_bytes and this get a `message_too_large` error and the socket stays open.
HARD_FRAME_LIMIT_MIN: Final = 1 << 20
#: Close code for a client that cannot keep up (docs/protocol.md, "Close codes").
CLOSE_SLOW_CONSUMER: Final = 4408
#: How long a drain waits for sockets to flush their last frames and close.
CLOSE_GRACE: Final = 10.0


def _spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Create a named task; the caller owns it and must await or cancel it."""
    return asyncio.get_running_loop().create_task(coro, name=name)


class Connection:
    """One accepted socket: its session, its writer and its streams' relay tasks."""

    def __init__(self, gateway: Gateway, ws: ServerConnection) -> None:
        self.gateway = gateway
        self.ws = ws
        self.id = secrets.token_urlsafe(12)
        self._wake = asyncio.Event()
        outbox = Outbox(self._wake.set)
        self.session = Session(self.id, gateway.limits, outbox, capacity=gateway.has_capacity)
        self.session.accepting = not gateway.draining
        self.outbox = outbox
        self.flow = FlowControl(gateway.config.send_buffer_bytes, lambda: outbox.buffered)
        self.tasks: dict[Stream, asyncio.Task[None]] = {}
        #: (code, reason) once the gateway wants this socket closed after its pending frames.
        self._close_request: tuple[int, str] | None = None
        self._idle_timer: asyncio.Timeout | None = None
        self.close_reason = "client"

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(session=self.id)
        opened = time.monotonic()
        log.info("socket.open", peer=_peer(self.ws))
        self.session.welcome()
        writer = _spawn(self._write(), f"writer {self.id}")
        try:
            await self._read()
        except ConnectionClosed:
            pass  # the peer went away without a close frame; same cleanup as a clean close
        finally:
            for stream in self.session.close():
                self._cancel(stream)
            await self._join()
            if not writer.done() and self._close_request is None:
                writer.cancel()
            await asyncio.wait([writer])
            log.info(
                "socket.close",
                code=self.ws.close_code,
                reason=self.close_reason,
                streams=self.session.streams_started,
                frames_in=self.session.frames_in,
                stalls=self.flow.stalls,
                duration_ms=round((time.monotonic() - opened) * 1000, 1),
            )

    async def _read(self) -> None:
        """Read client frames until the socket closes; close it after --idle-timeout of
        silence with no stream running."""
        try:
            async with asyncio.timeout(None) as timer:
                self._idle_timer = timer
                self._arm_idle()
                async for frame in self.ws:
                    for command in self.session.receive(frame):
                        if isinstance(command, OpenUpstream):
                            self._open(command.stream)
                        elif isinstance(command, CancelUpstream):
                            self._cancel(command.stream)
                    self._arm_idle()
        except TimeoutError:
            self.close_reason = "idle"
            self.request_close(1000, "idle timeout")
            await self.ws.wait_closed()
        finally:
            self._idle_timer = None

    def _arm_idle(self) -> None:
        timer, idle = self._idle_timer, self.gateway.config.idle_timeout
        if timer is None or not idle:
            return
        if self.session.streams or self.tasks:
            timer.reschedule(None)
        else:
            timer.reschedule(asyncio.get_running_loop().time() + idle)

    def request_close(self, code: int, reason: str) -> None:
        """Close the socket once every frame queued so far has been sent."""
        if self._close_request is None:
            self._close_request = (code, reason)
            self._wake.set()

    def interrupt(self, message: str) -> None:
        """End every active stream now (retryable stream_interrupted) and cancel upstreams."""
        for stream in self.session.interrupt(message):
            self._cancel(stream)

    def _open(self, stream: Stream) -> None:
        self.gateway.stream_started()
        task = _spawn(self._relay(stream), f"stream {self.id}/{stream.id}")
        self.tasks[stream] = task
        task.add_done_callback(lambda _t: self._finished(stream))

    def _finished(self, stream: Stream) -> None:
        self.tasks.pop(stream, None)
        self.gateway.stream_ended()
        self._arm_idle()

    async def _relay(self, stream: Stream) -> None:
        structlog.contextvars.bind_contextvars(stream=stream.id)
        await self.gateway.upstream.relay(stream, self.session, self.flow.wait)

    def _cancel(self, stream: Stream) -> None:
        task = self.tasks.get(stream)
        if task is not None:
            task.cancel()

    async def _join(self) -> None:
        """Wait until every relay task of this socket has finished (they were cancelled)."""
        while self.tasks:
            await asyncio.wait(list(self.tasks.values()))

    async def _write(self) -> None:
        """Drain the outbox into the socket; `send` blocks while the client is behind.

        Slow consumers (docs/reliability.md): frames that wait together are already coalesced
        by the outbox; a batch the client cannot take within --slow-client-timeout closes the
        socket with 4408.
        """
        wake, outbox, send, flow = self._wake, self.outbox, self.ws.send, self.flow
        slow = self.gateway.config.slow_client_timeout
        try:
            while True:
                await wake.wait()
                wake.clear()
                frames = outbox.drain()
                flow.drained()
                if frames:
                    try:
                        async with asyncio.timeout(slow):
                            for frame in frames:
                                await send(frame, text=True)
                    except TimeoutError:
                        await self._close_slow_consumer(slow)
                        return
                if self._close_request is not None and not len(outbox):
                    await self.ws.close(*self._close_request)
                    return
        except ConnectionClosed:
            return

    async def _close_slow_consumer(self, waited: float) -> None:
        """Give up on a client that cannot keep up: stop its streams now (their upstreams must
        not run on for a reader that is not there), then close with 4408 behind the frames it
        has not read yet (dropped after --close-timeout if it does not answer)."""
        self.close_reason = "slow_consumer"
        self.gateway.metrics.slow_client_closes.inc()
        log.warning("socket.slow_consumer", timeout_s=waited, buffered=self.outbox.buffered)
        for stream in self.session.close():
            self._cancel(stream)
        await self.ws.close(CLOSE_SLOW_CONSUMER, "slow consumer")


def _peer(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
    except (TypeError, ValueError):
        return "?"
    return f"{host}:{port}"


class Gateway:
    """The server: the listening socket, the upstream client and every open connection."""

    def __init__(self, config: Config, upstream_url: str) -> None:
        self.config = config
        self.limits = Limits(config.max_streams, config.max_message_bytes)
        self.metrics = Metrics()
        self.upstream = Upstream(config, upstream_url, self.metrics)
        self.connections: set[Connection] = set()
        self.active_streams = 0
        self.draining = False
        self._server: Server | None = None
        #: Set while no stream runs in this process (drains and tests wait on it).
        self.idle = asyncio.Event()
        self.idle.set()
        #: Set when the last connection handler has returned.
        self._no_connections = asyncio.Event()
        self._no_connections.set()
        m = self.metrics
        m.open_sockets.set_function(lambda: len(self.connections))
        m.active_streams.set_function(lambda: self.active_streams)
        m.upstream_open.set_function(lambda: self.upstream.open_responses)
        m.upstream_pool_idle.set_function(self.upstream.pool_idle)
        m.tasks.set_function(lambda: len(asyncio.all_tasks()))
        m.draining.set_function(lambda: int(self.draining))

    def stream_started(self) -> None:
        self.active_streams += 1
        self.metrics.streams_started.labels(self.upstream.dialect).inc()
        self.idle.clear()

    def stream_ended(self) -> None:
        self.active_streams -= 1
        if self.active_streams == 0:
            self.idle.set()

    def has_capacity(self) -> bool:
        """Whether one more stream fits under --max-active-streams."""
        return self.active_streams < self.config.max_active_streams

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets (for the actual port, and for tests that tune them)."""
        assert self._server is not None
        return list(self._server.sockets)

    @property
    def port(self) -> int:
        port: int = self.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        await self.upstream.start()
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            # Off by default: tiny token frames gain little and every socket would pay about
            # 40 KiB of zlib state (STYLE.md).
            compression=None,
            max_size=max(4 * self.config.max_message_bytes, HARD_FRAME_LIMIT_MIN),
            ping_interval=self.config.ping_interval or None,
            ping_timeout=self.config.ping_timeout,
            # A peer that does not answer our close (dead network, ping timeout) is dropped
            # after this; websockets' default of 10 s keeps its streams running for nothing.
            close_timeout=self.config.close_timeout,
            server_header=None,
        )

    async def drain(self, grace: float | None = None) -> None:
        """Graceful shutdown (docs/reliability.md, "Graceful drain").

        Refuse new sockets (503) and new starts (`shutting_down`), let streams in flight finish
        for up to `grace` seconds (default --drain-timeout), end the rest with a retryable
        `stream_interrupted`, close every socket with 1001 after its last frames, then stop
        listening.
        """
        timeout = self.config.drain_timeout if grace is None else grace
        self.draining = True
        for connection in self.connections:
            connection.session.accepting = False
        log.info("gateway.draining", streams=self.active_streams, timeout_s=timeout)
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except TimeoutError:
            log.warning("gateway.drain_timeout", interrupted=self.active_streams)
            for connection in self.connections:
                connection.interrupt("the gateway is shutting down; retry on another connection")
        for connection in list(self.connections):
            connection.close_reason = "shutdown"
            connection.request_close(1001, "going away")
        try:
            await asyncio.wait_for(self._no_connections.wait(), CLOSE_GRACE)
        except TimeoutError:
            log.warning("gateway.close_timeout", sockets=len(self.connections))
        await self.stop()

    async def stop(self) -> None:
        """Close every remaining socket with 1001, wait for their handlers, close the upstream."""
        self.draining = True
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        await self.upstream.close()

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            if self.draining:
                self.metrics.rejected.labels("draining").inc()
                return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            return None
        if path == "/healthz":
            return conn.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.draining:
                return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            return conn.respond(HTTPStatus.OK, "ready\n")
        if path == "/metrics":
            body = self.metrics.render()
            headers = Headers(
                [
                    ("Content-Type", CONTENT_TYPE_LATEST),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                ]
            )
            return Response(HTTPStatus.OK, "OK", headers, body)
        return conn.respond(HTTPStatus.NOT_FOUND, "not found; the WebSocket endpoint is /v1/ws\n")

    async def _handle(self, ws: ServerConnection) -> None:
        connection = Connection(self, ws)
        self.connections.add(connection)
        self._no_connections.clear()
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
            if not self.connections:
                self._no_connections.set()
