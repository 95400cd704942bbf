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
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from gateway.config import Config
from gateway.session import CancelUpstream, Limits, OpenUpstream, Outbox, Session, Stream
from gateway.upstream import FlowControl, Upstream

log = structlog.get_logger("gateway.server")

WS_PATH: Final = "/v1/ws"
#: Frames above this are refused by websockets itself with close code 1009; frames between
#: max_message_bytes and this get a `message_too_large` error and the socket stays open.
HARD_FRAME_LIMIT_MIN: Final = 1 << 20


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

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(session=self.id)
        opened = time.monotonic()
        log.info("socket.open", peer=_peer(self.ws))
        self.session.welcome()
        writer = _spawn(self._write(), f"writer {self.id}")
        try:
            async for frame in self.ws:
                for command in self.session.receive(frame):
                    if isinstance(command, OpenUpstream):
                        self._open(command.stream)
                    elif isinstance(command, CancelUpstream):
                        self._cancel(command.stream)
        except ConnectionClosed:
            pass  # the peer went away without a close frame; same cleanup as a clean close
        finally:
            for stream in self.session.close():
                self._cancel(stream)
            await self._join()
            writer.cancel()
            await asyncio.wait([writer])
            log.info(
                "socket.close",
                code=self.ws.close_code,
                streams=self.session.streams_started,
                frames_in=self.session.frames_in,
                duration_ms=round((time.monotonic() - opened) * 1000, 1),
            )

    def _open(self, stream: Stream) -> None:
        self.gateway.stream_started()
        task = _spawn(self._relay(stream), f"stream {self.id}/{stream.id}")
        self.tasks[stream] = task
        task.add_done_callback(lambda _t: self._finished(stream))

    def _finished(self, stream: Stream) -> None:
        self.tasks.pop(stream, None)
        self.gateway.stream_ended()

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
        """Drain the outbox into the socket; `send` blocks while the client is behind."""
        wake, outbox, send, flow = self._wake, self.outbox, self.ws.send, self.flow
        try:
            while True:
                await wake.wait()
                wake.clear()
                frames = outbox.drain()
                flow.drained()
                for frame in frames:
                    await send(frame, text=True)
        except ConnectionClosed:
            return


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
        self.upstream = Upstream(config, upstream_url)
        self.connections: set[Connection] = set()
        self.active_streams = 0
        self.draining = False
        self._server: Server | None = None
        #: Set while no stream runs in this process (drains and tests wait on it).
        self.idle = asyncio.Event()
        self.idle.set()

    def stream_started(self) -> None:
        self.active_streams += 1
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
            server_header=None,
        )

    async def stop(self) -> None:
        """Close every socket with 1001, wait for their handlers, then close the upstream."""
        self.draining = True
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        await self.upstream.close()

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            if self.draining:
                return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            return None
        if path == "/healthz":
            return conn.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.draining:
                return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            return conn.respond(HTTPStatus.OK, "ready\n")
        return conn.respond(HTTPStatus.NOT_FOUND, "not found; the WebSocket endpoint is /v1/ws\n")

    async def _handle(self, ws: ServerConnection) -> None:
        connection = Connection(self, ws)
        self.connections.add(connection)
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
