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
import ssl
import time
import weakref
from collections.abc import Coroutine
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final

import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State as WsState

from gateway.auth import (
    LOOPBACK_ORIGINS,
    AuthError,
    Principal,
    TokenAuthenticator,
    is_loopback_host,
    origin_allowed,
    query_has_token,
)
from gateway.config import Config
from gateway.observability import Metrics
from gateway.protocol import ErrorCode, Resume, Start, encode_authenticated, encode_error
from gateway.quotas import Quotas
from gateway.redis_store import RedisStore
from gateway.resume import Registry
from gateway.session import (
    CLOSE_UNAUTHORIZED,
    DETACHED,
    Authenticate,
    CancelUpstream,
    Limits,
    OpenUpstream,
    Outbox,
    Refused,
    RemoteResume,
    Resumed,
    Session,
    State,
    Stream,
    finish_fail,
)
from gateway.upstream import FlowControl, Upstream

log = structlog.get_logger("gateway.server")

WS_PATH: Final = "/v1/ws"
#: Frames above this are refused by websockets itself with close code 1009; frames between
#: max_message_bytes and this get a `message_too_large` error and the socket stays open.
HARD_FRAME_LIMIT_MIN: Final = 1 << 20
WS_OPEN: Final = WsState.OPEN
#: Close codes (docs/protocol.md, "Close codes").
CLOSE_SLOW_CONSUMER: Final = 4408
CLOSE_TOO_MANY_CONNECTIONS: Final = 4429
#: How long a drain waits for sockets to flush their last frames and close.
CLOSE_GRACE: Final = 10.0


_HERE = Path(__file__).resolve().parent
#: GET paths served as files: the demo page and the JS client it uses as is (issue 6). The JS
#: client lives in clients/js of a source checkout; an installed wheel answers 404 for it.
STATIC_FILES: Final[dict[str, tuple[Path, str]]] = {
    "/": (_HERE / "web" / "index.html", "text/html; charset=utf-8"),
    "/js/index.js": (
        _HERE.parent / "clients" / "js" / "index.js",
        "text/javascript; charset=utf-8",
    ),
    "/js/index.d.ts": (_HERE.parent / "clients" / "js" / "index.d.ts", "text/plain; charset=utf-8"),
}
_static_cache: dict[str, tuple[bytes, str]] = {}


def _spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Create a named task; the caller owns it and must await or cancel it."""
    return asyncio.get_running_loop().create_task(coro, name=name)


class Connection:
    """One accepted socket: its session and its writer. The streams' relay tasks belong to the
    gateway, because a stream may outlive its socket (resume)."""

    def __init__(self, gateway: Gateway, ws: ServerConnection) -> None:
        self.gateway = gateway
        self.ws = ws
        self.id = secrets.token_urlsafe(12)
        self._wake = asyncio.Event()
        outbox = Outbox(self._wake.set)
        #: Who is connected: from the upgrade's Authorization header, a first-message `auth`,
        #: or (auth off) the peer address, so per-principal quotas still mean something.
        self.principal: Principal | None = gateway.take_principal(ws)
        awaiting_auth = gateway.auth.enabled and self.principal is None
        if not gateway.auth.enabled:
            self.principal = Principal("ip:" + _peer(ws).rsplit(":", 1)[0])
        self.session = Session(
            self.id,
            gateway.limits,
            outbox,
            admit=self._admit,
            awaiting_auth=awaiting_auth,
            registry=gateway.registry,
            principal=self.principal.name if self.principal else None,
            remote=gateway.store is not None,
        )
        #: Streams followed from another instance: proxy -> (owner instance, token, task).
        self.remote: dict[Stream, tuple[str, str, asyncio.Task[None]]] = {}
        self.session.accepting = not gateway.draining
        self._socket_counted = False
        self._expiry: asyncio.TimerHandle | None = None
        self._opened_at = asyncio.get_running_loop().time()
        self.outbox = outbox
        self.flow = FlowControl(gateway.config.send_buffer_bytes, outbox)
        #: Streams whose output this socket receives (their relays belong to the gateway).
        self.following: set[Stream] = set()
        #: (code, reason) once the gateway wants this socket closed after its pending frames.
        self._close_request: tuple[int, str] | None = None
        self._idle_timer: asyncio.Timeout | None = None
        self.close_reason = "client"
        #: Set once the gateway has decided to close this socket (tests and drains wait on it).
        self.closing = asyncio.Event()
        self._remote_pending: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(session=self.id)
        opened = time.monotonic()
        log.info("socket.open", peer=_peer(self.ws))
        if not self.session.awaiting_auth:
            if not await self._admit_socket():
                return
            self.session.welcome()
            self._arm_expiry()
        writer = _spawn(self._write(), f"writer {self.id}")
        try:
            await self._read()
        except ConnectionClosed:
            pass  # the peer went away without a close frame; same cleanup as a clean close
        finally:
            if self._expiry is not None:
                self._expiry.cancel()
            await self._release_streams()
            for task in self._remote_pending:
                task.cancel()
            if self._remote_pending:
                await asyncio.wait(self._remote_pending)
            if self._socket_counted and self.principal is not None:
                self.gateway.quotas.close_socket(self.principal.name, time.monotonic())
            if not writer.done() and self._close_request is None:
                writer.cancel()
            await asyncio.wait([writer])
            log.info(
                "socket.close",
                principal=self.principal.name if self.principal else None,
                code=self.ws.close_code,
                reason=self.close_reason,
                streams=self.session.streams_started,
                frames_in=self.session.frames_in,
                stalls=self.flow.stalls,
                duration_ms=round((time.monotonic() - opened) * 1000, 1),
            )

    def dropped(self) -> bool:
        """Whether the socket went away without the client meaning it (no close frame from
        the client: network loss, ping timeout; or our 4408), so its streams wait for a resume."""
        if self.close_reason == "slow_consumer":
            return True
        # websockets' sans-I/O protocol records the peer's close frame, if one came.
        return self.close_reason == "client" and self.ws.protocol.close_rcvd is None

    async def _release_streams(self) -> None:
        """Socket gone: a deliberate close cancels its streams at once; a drop detaches them
        for --resume-grace (docs/protocol.md, "Resume")."""
        gateway = self.gateway
        for stream in self.following:
            if gateway.followers.get(stream) is self:
                del gateway.followers[stream]
        self.following.clear()
        dropped = gateway.config.resume_grace > 0 and self.dropped()
        for proxy in list(self.remote):
            # The owner keeps the stream for a resume (dropped) or stops it (closed on purpose).
            self._stop_remote(proxy, "dropped" if dropped else "cancel")
        if dropped:
            for stream in self.session.detach():
                gateway.detach(stream)
            return
        cancelled = self.session.close()
        for stream in cancelled:
            gateway.cancel_stream(stream)
        await gateway.join(cancelled)

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
                            self.gateway.open_stream(command.stream)
                            self._follow(command.stream)
                        elif isinstance(command, CancelUpstream):
                            if command.stream in self.remote:
                                self._stop_remote(command.stream, "cancel")
                            else:
                                self.gateway.cancel_stream(command.stream)
                        elif isinstance(command, Authenticate):
                            await self._authenticate(command.token)
                        elif isinstance(command, Resumed):
                            self._follow(command.stream, resumed=True)
                        elif isinstance(command, RemoteResume):
                            self._resume_remote(command.msg)
                        else:
                            self.close_reason = "protocol"
                            self.request_close(command.code, command.reason)
                    self._arm_idle()
        except TimeoutError:
            if self.session.awaiting_auth:
                self.close_reason = "auth_timeout"
                self.request_close(CLOSE_UNAUTHORIZED, "authentication timed out")
            else:
                self.close_reason = "idle"
                self.request_close(1000, "idle timeout")
            await self.ws.wait_closed()
        finally:
            self._idle_timer = None

    def _arm_idle(self) -> None:
        timer, idle = self._idle_timer, self.gateway.config.idle_timeout
        if timer is None:
            return
        if self.session.awaiting_auth:
            timer.reschedule(self._opened_at + self.gateway.config.auth_timeout)
            return
        if not idle or self.session.streams:
            timer.reschedule(None)
        else:
            timer.reschedule(asyncio.get_running_loop().time() + idle)

    # ------------------------------------------------------------------ auth and quotas

    async def _admit_socket(self) -> bool:
        """Count this socket against its principal's quota; close it with 4429 when over."""
        assert self.principal is not None
        structlog.contextvars.bind_contextvars(principal=self.principal.name)
        refused = self.gateway.quotas.open_socket(self.principal.name)
        if refused is not None:
            self.close_reason = "quota"
            self.gateway.metrics.rejected.labels("quota").inc()
            log.warning("socket.refused", reason=refused.message)
            await self.ws.close(CLOSE_TOO_MANY_CONNECTIONS, refused.message)
            return False
        self._socket_counted = True
        return True

    def _admit(self, msg: Start) -> Refused | None:
        """Process capacity and per-principal quotas for one start."""
        if not self.gateway.has_capacity():
            return Refused(ErrorCode.TOO_MANY_STREAMS, "the gateway is at capacity; retry shortly")
        assert self.principal is not None
        refused = self.gateway.quotas.start_stream(self.principal.name, time.monotonic())
        if refused is None:
            return None
        if refused.retry_after_ms is not None:
            return Refused(ErrorCode.RATE_LIMITED, refused.message, refused.retry_after_ms)
        return Refused(ErrorCode.TOO_MANY_STREAMS, refused.message)

    async def _authenticate(self, token: str) -> None:
        """A first-message `auth` (then `welcome`), or a token refresh on an open socket."""
        auth = self.gateway.auth
        if not auth.enabled:
            self.outbox.push_frame(encode_authenticated(None))
            return
        try:
            principal = auth.authenticate(token, time.time())
        except AuthError as exc:
            self.close_reason = "unauthorized"
            log.info("auth.failed", reason=str(exc))
            self.request_close(CLOSE_UNAUTHORIZED, str(exc))
            return
        if self.session.awaiting_auth:
            self.principal = principal
            self.session.principal = principal.name
            if not await self._admit_socket():
                return
            self.session.welcome()
        elif self.principal is None or principal.name != self.principal.name:
            self.close_reason = "unauthorized"
            self.request_close(CLOSE_UNAUTHORIZED, "a refresh must be for the same principal")
            return
        else:
            self.principal = principal
            self.session.authorized = True
            self.outbox.push_frame(encode_authenticated(principal.expires_at))
        log.info("auth.ok", expires_at=principal.expires_at)
        self._arm_expiry()

    def _arm_expiry(self) -> None:
        """When the credential expires: refuse new starts, and close with 4401 once the
        streams in flight are done (unless a fresh `auth` arrives first)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.principal is None or self.principal.expires_at is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self.principal.expires_at - time.time())
        self._expiry = loop.call_at(loop.time() + delay, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        self.session.authorized = False
        log.info("auth.expired")
        self._close_if_expired_and_idle()

    def _close_if_expired_and_idle(self) -> None:
        if not self.session.authorized and not self.session.streams:
            self.close_reason = "expired"
            self.request_close(CLOSE_UNAUTHORIZED, "credential expired")

    def request_close(self, code: int, reason: str) -> None:
        """Close the socket once every frame queued so far has been sent."""
        if self._close_request is None:
            self._close_request = (code, reason)
            self.closing.set()
            self._wake.set()

    def _follow(self, stream: Stream, resumed: bool = False) -> None:
        """This socket now receives `stream`'s output (its writer paces the relay)."""
        if resumed:
            self.gateway.attach(stream, self)
        if stream.active:
            self.gateway.followers[stream] = self
            self.following.add(stream)

    # ------------------------------------------------------------------ remote streams

    def _resume_remote(self, msg: Resume) -> None:
        """Resume a stream another instance owns: replay and follow it through Redis."""
        task = _spawn(self._follow_remote(msg), f"follow {self.id}/{msg.id}")
        self._remote_pending.add(task)
        task.add_done_callback(self._remote_pending.discard)

    async def _follow_remote(self, msg: Resume) -> None:
        store = self.gateway.store
        assert store is not None
        session = self.session
        try:
            meta = await store.lookup(msg.resume_token)
        except (RedisError, OSError):
            meta = None
            log.warning("redis.lookup_failed")
        if meta is None or meta.get("p", "") != (session.principal or ""):
            self.outbox.push_frame(
                encode_error(ErrorCode.UNKNOWN_ID, "no stream for that resume_token", msg.id)
            )
            return
        if msg.id in session.streams:
            self.outbox.push_frame(
                encode_error(ErrorCode.DUPLICATE_ID, "that id is active on this socket", msg.id)
            )
            return
        proxy: Stream | None = None

        async def replayed(first: int) -> bool:
            nonlocal proxy
            if first > msg.after + 1:
                self.outbox.push_frame(
                    encode_error(
                        ErrorCode.RESUME_UNAVAILABLE,
                        "that stream's output is no longer retained",
                        msg.id,
                    )
                )
                return False
            proxy = session.attach_remote(msg)
            task = asyncio.current_task()
            assert task is not None
            self.remote[proxy] = (meta["o"], msg.resume_token, task)
            await store.send_control(meta["o"], "moved", msg.resume_token)
            return True

        def on_chunk(seq: int, text: str) -> None:
            assert proxy is not None
            session.forward(proxy, seq, text)

        def on_terminal(frame: bytes) -> None:
            assert proxy is not None
            session.end_remote(proxy, frame)

        def on_lost(reason: str) -> None:
            assert proxy is not None
            finish_fail(proxy, ErrorCode.STREAM_INTERRUPTED, reason, True)

        try:
            await store.follow(
                msg.resume_token,
                msg.after,
                on_chunk,
                on_terminal,
                on_lost,
                replayed,
                self.flow.wait,
            )
        except (RedisError, OSError):
            if proxy is not None:
                on_lost("the shared store is unreachable")
        finally:
            if proxy is not None:
                self.remote.pop(proxy, None)
                self._arm_idle()

    def _stop_remote(self, proxy: Stream, verb: str) -> None:
        """Stop following a remote stream; tell its owner to cancel it or keep it for later."""
        entry = self.remote.pop(proxy, None)
        if entry is None:
            return
        owner, token, task = entry
        task.cancel()
        store = self.gateway.store
        assert store is not None
        self.gateway.control(store.send_control(owner, verb, token))

    def stream_finished(self, stream: Stream) -> None:
        """The relay of a stream this socket followed has finished."""
        self.following.discard(stream)
        self._arm_idle()
        self._close_if_expired_and_idle()

    async def _write(self) -> None:
        """Drain the outbox into the socket; `send` blocks while the client is behind.

        Slow consumers (docs/reliability.md): frames that wait together are already coalesced
        by the outbox; a batch the client cannot take within --slow-client-timeout closes the
        socket with 4408.
        """
        wake, outbox, flow, ws = self._wake, self.outbox, self.flow, self.ws
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
                            if ws.protocol.state is WS_OPEN and not ws.paused:
                                self._write_frames(frames)
                                if ws.paused:  # over the high-water mark: wait for the client
                                    await ws.drain()
                            else:  # behind or closing: the documented, flow-controlled route
                                for frame in frames:
                                    await ws.send(frame, text=True)
                    except TimeoutError:
                        await self._close_slow_consumer(slow)
                        return
                if self._close_request is not None and not len(outbox):
                    await ws.close(*self._close_request)
                    return
        except (ConnectionClosed, OSError):
            return

    def _write_frames(self, frames: list[bytes]) -> None:
        """The hot path: frame every message with websockets' sans-I/O protocol and hand the
        whole batch to the transport in one write, one syscall instead of one per frame
        (measured here: 12 us -> 2 to 4 us of CPU per frame). Only while the socket is open
        and not behind; websockets' own pings and close go through the same protocol."""
        protocol = self.ws.protocol
        send_text = protocol.send_text
        for frame in frames:
            send_text(frame)
        data = protocol.data_to_send()
        self.ws.transport.write(data[0] if len(data) == 1 else b"".join(data))

    async def _close_slow_consumer(self, waited: float) -> None:
        """Give up on a client that cannot keep up: close with 4408 behind the frames it has not
        read yet (dropped after --close-timeout if it does not answer). Its streams are then
        detached for --resume-grace like any dropped socket's."""
        self.close_reason = "slow_consumer"
        self.closing.set()
        self.gateway.metrics.slow_client_closes.inc()
        log.warning("socket.slow_consumer", timeout_s=waited, buffered=self.outbox.buffered)
        # close() would wait for the full send buffer to drain before the close frame goes
        # out; bound the whole closing handshake, then drop the connection.
        try:
            await asyncio.wait_for(
                self.ws.close(CLOSE_SLOW_CONSUMER, "slow consumer"),
                self.gateway.config.close_timeout,
            )
        except TimeoutError:
            self.ws.transport.abort()


def _static(path: str) -> Response:
    """The demo page and the JS client it imports (read once, then served from memory)."""
    cached = _static_cache.get(path)
    if cached is None:
        file, content_type = STATIC_FILES[path]
        try:
            body = file.read_bytes()
        except OSError:
            body = b""
        cached = _static_cache[path] = (body, content_type)
    body, content_type = cached
    if not body:
        headers = Headers([("Content-Type", "text/plain; charset=utf-8")])
        return Response(HTTPStatus.NOT_FOUND, "Not Found", headers, b"not installed\n")
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
        ]
    )
    return Response(HTTPStatus.OK, "OK", headers, body)


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
        self.limits = Limits(
            max_streams=config.max_streams,
            max_message_bytes=config.max_message_bytes,
            max_prompt_chars=config.max_prompt_chars,
            max_streams_per_principal=config.max_streams_per_principal,
            starts_per_minute=config.starts_per_minute,
            allowed_models=frozenset(config.allowed_models) if config.allowed_models else None,
        )
        self.auth = TokenAuthenticator(
            Path(config.auth_tokens_file) if config.auth_tokens_file else None,
            jwt_secret=config.jwt_secret,
            jwt_public_key=(
                Path(config.jwt_public_key).read_text() if config.jwt_public_key else None
            ),
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
        )
        self.quotas = Quotas(
            config.max_sockets_per_principal,
            config.max_streams_per_principal,
            config.starts_per_minute,
        )
        if config.allowed_origins is not None:
            self.allowed_origins: tuple[str, ...] = config.allowed_origins
        else:
            # Open mode: only pages served from this machine may connect, so a site the
            # developer visits cannot spend their key (cross-site WebSocket hijacking).
            self.allowed_origins = () if self.auth.enabled else LOOPBACK_ORIGINS
        #: Principals authenticated from the upgrade's header, until the handler takes them.
        self._principals: weakref.WeakKeyDictionary[ServerConnection, Principal] = (
            weakref.WeakKeyDictionary()
        )
        self.metrics = Metrics()
        self.upstream = Upstream(config, upstream_url, self.metrics)
        self.connections: set[Connection] = set()
        #: Every running relay task, by stream: owned here because streams outlive sockets.
        self.relays: dict[Stream, asyncio.Task[None]] = {}
        #: The socket each running stream's output goes to (absent while detached).
        self.followers: dict[Stream, Connection] = {}
        self.registry = Registry(config.resume_max_bytes, config.resume_total_bytes)
        #: The shared store for resume across instances (--redis-url), else None.
        self.store: RedisStore | None = (
            RedisStore(config.redis_url, config.resume_retention) if config.redis_url else None
        )
        #: Fire-and-forget is banned: control messages to other instances are owned here.
        self._control_tasks: set[asyncio.Task[None]] = set()
        #: Grace timers of detached streams and retention timers of ended ones.
        self._grace: dict[Stream, asyncio.TimerHandle] = {}
        self._retention: dict[Stream, asyncio.TimerHandle] = {}
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

    # ------------------------------------------------------------------ stream lifecycle

    def open_stream(self, stream: Stream) -> None:
        """Start `stream`'s relay task (owned here, not by the socket: it may outlive it)."""
        self.active_streams += 1
        self.metrics.streams_started.labels(self.upstream.dialect).inc()
        self.idle.clear()
        stream.started_at = time.monotonic()
        if self.store is not None:
            self.store.register(stream)
        task = _spawn(self._relay(stream), f"stream {stream.id}")
        self.relays[stream] = task
        task.add_done_callback(lambda _t: self._relay_done(stream))

    async def _relay(self, stream: Stream) -> None:
        structlog.contextvars.bind_contextvars(stream=stream.id)
        await self.upstream.relay(stream, self.flow_for)

    def flow_for(self, stream: Stream) -> FlowControl | None:
        """Backpressure: the flow control of the socket following `stream` (none: go on)."""
        connection = self.followers.get(stream)
        return connection.flow if connection is not None else None

    def _relay_done(self, stream: Stream) -> None:
        self.relays.pop(stream, None)
        self.upstream.stream_ended(stream, stream.started_at)
        self.active_streams -= 1
        if self.active_streams == 0:
            self.idle.set()
        if stream.principal is not None:
            self.quotas.end_stream(stream.principal, time.monotonic())
        timer = self._grace.pop(stream, None)
        if timer is not None:
            timer.cancel()
        if self.store is not None and not stream.terminal_sent:
            self.store.stream_gone(stream)  # cancelled without a frame anyone could replay
        if self.registry.ended(stream):
            loop = asyncio.get_running_loop()
            self._retention[stream] = loop.call_later(
                self.config.resume_retention, self._retention_over, stream
            )
        connection = self.followers.pop(stream, None)
        if connection is not None:
            connection.stream_finished(stream)

    def control(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a control message to another instance as an owned task."""
        task = _spawn(coro, "redis control message")
        self._control_tasks.add(task)
        task.add_done_callback(self._control_tasks.discard)

    def _on_control(self, verb: str, token: str) -> None:
        """A message from another instance about a stream this one owns."""
        stream = self.registry.lookup(token)
        if not isinstance(stream, Stream):
            return
        if verb == "cancel" and stream.active:
            stream.state = State.CANCELLED
            stream.outcome = "cancelled"
            self.cancel_stream(stream)
        elif verb == "moved":
            # Followed elsewhere now: produce what was pending here into the shared store,
            # stop sending to any local socket, and no grace timer (someone follows it).
            previous = stream.owner
            if previous is not None:
                previous._forget(stream, finished=False)
            if stream.sink is not DETACHED:
                stream.flush()
                stream.sink = DETACHED
            connection = self.followers.pop(stream, None)
            if connection is not None:
                connection.following.discard(stream)
            timer = self._grace.pop(stream, None)
            if timer is not None:
                timer.cancel()
        elif verb == "dropped" and stream.active and stream.owner is None:
            self.detach(stream)

    def _retention_over(self, stream: Stream) -> None:
        self._retention.pop(stream, None)
        self.registry.forget(stream)

    def cancel_stream(self, stream: Stream) -> None:
        """Abort `stream`'s upstream request now (its connection is closed, not pooled)."""
        self.registry.forget(stream)
        task = self.relays.get(stream)
        if task is not None and not task.done():
            stream.cancelled_at = time.monotonic()
            task.cancel()

    async def join(self, streams: list[Stream]) -> None:
        """Wait until the relays of `streams` have finished."""
        tasks = [self.relays[s] for s in streams if s in self.relays]
        if tasks:
            await asyncio.wait(tasks)

    def detach(self, stream: Stream) -> None:
        """No socket follows `stream` now: keep it running for --resume-grace, then give up."""
        self.followers.pop(stream, None)
        if stream.active and stream in self.relays:
            loop = asyncio.get_running_loop()
            self._grace[stream] = loop.call_later(
                self.config.resume_grace, self._grace_over, stream
            )
            log.info("stream.detached", stream=stream.id, grace_s=self.config.resume_grace)

    def attach(self, stream: Stream, connection: Connection) -> None:
        """A resume moved `stream` to `connection`."""
        timer = self._grace.pop(stream, None)
        if timer is not None:
            timer.cancel()
        previous = self.followers.pop(stream, None)
        if previous is not None and previous is not connection:
            previous.following.discard(stream)
        log.info("stream.resumed", stream=stream.id, seq=stream.seq)

    def _grace_over(self, stream: Stream) -> None:
        """Nobody resumed `stream` in time: stop its upstream (no one would read the answer)."""
        self._grace.pop(stream, None)
        if stream.owner is None and stream.active:
            stream.state = State.CANCELLED
            stream.outcome = "abandoned"
            log.info("stream.abandoned", stream=stream.id)
            self.cancel_stream(stream)

    def take_principal(self, ws: ServerConnection) -> Principal | None:
        """The principal authenticated during `ws`'s handshake, if any."""
        return self._principals.pop(ws, None)

    def reload_tokens(self) -> None:
        """SIGHUP: re-read --auth-tokens-file; a bad file keeps the tokens in force."""
        try:
            count = self.auth.load()
        except (OSError, ValueError) as exc:
            log.error("auth.reload_failed", error=str(exc))
            return
        log.info("auth.reloaded", tokens=count)

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

    def check_exposure(self) -> None:
        """Refuse to serve an open gateway beyond this machine unless told so explicitly."""
        if self.auth.enabled:
            return
        if not is_loopback_host(self.config.host) and not self.config.insecure_no_auth:
            raise SystemExit(
                f"refusing to listen on {self.config.host} without authentication: anyone "
                "who can reach it could spend the upstream key. Configure --auth-tokens-file "
                "or --jwt-secret-env / --jwt-public-key, or pass --insecure-no-auth."
            )
        log.warning(
            "auth.disabled",
            message="no authentication configured: anyone who can connect may use the gateway",
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return context

    @property
    def scheme(self) -> str:
        return "wss" if self.config.tls_cert else "ws"

    async def start(self) -> None:
        self.check_exposure()
        if self.store is not None:
            await self.store.start()
            self.store.on_control = self._on_control
        await self.upstream.start()
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            # Off by default (--compression): tiny token frames gain little and every socket
            # would pay about 40 KiB of zlib state (STYLE.md).
            compression="deflate" if self.config.compression else None,
            # Workers share the port; the kernel spreads new connections across them.
            reuse_port=self.config.workers > 1 or None,
            max_size=max(4 * self.config.max_message_bytes, HARD_FRAME_LIMIT_MIN),
            ping_interval=self.config.ping_interval or None,
            ping_timeout=self.config.ping_timeout,
            # A peer that does not answer our close (dead network, ping timeout) is dropped
            # after this; websockets' default of 10 s keeps its streams running for nothing.
            close_timeout=self.config.close_timeout,
            server_header=None,
            ssl=self._ssl_context(),
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
            for stream in list(self.relays):
                finish_fail(
                    stream,
                    ErrorCode.STREAM_INTERRUPTED,
                    "the gateway is shutting down; retry on another connection",
                    True,
                )
                self.cancel_stream(stream)
        for connection in list(self.connections):
            connection.close_reason = "shutdown"
            connection.request_close(1001, "going away")
        try:
            await asyncio.wait_for(self._no_connections.wait(), CLOSE_GRACE)
        except TimeoutError:
            log.warning("gateway.close_timeout", sockets=len(self.connections))
        await self.stop()

    async def stop(self) -> None:
        """Close every remaining socket with 1001, wait for their handlers, stop every relay
        (detached ones too), close the upstream."""
        self.draining = True
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        for timer in [*self._grace.values(), *self._retention.values()]:
            timer.cancel()
        self._grace.clear()
        self._retention.clear()
        streams = list(self.relays)
        for stream in streams:
            self.cancel_stream(stream)
        await self.join(streams)
        if self._control_tasks:
            await asyncio.wait(self._control_tasks)
        if self.store is not None:
            await self.store.close()
        await self.upstream.close()

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            return self._check_upgrade(conn, request)
        if path == "/healthz":
            return conn.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.draining:
                return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            return conn.respond(HTTPStatus.OK, "ready\n")
        if path in STATIC_FILES:
            return _static(path)
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

    def _refuse(
        self, conn: ServerConnection, status: HTTPStatus, reason: str, text: str
    ) -> Response:
        self.metrics.rejected.labels(reason).inc()
        log.info("upgrade.refused", reason=reason, status=int(status))
        response = conn.respond(status, text + "\n")
        if status == HTTPStatus.UNAUTHORIZED:
            response.headers["WWW-Authenticate"] = 'Bearer realm="llm-ws-gateway"'
        return response

    def _check_upgrade(self, conn: ServerConnection, request: Request) -> Response | None:
        """Everything decided before the upgrade: drain, credentials, origin (security.md)."""
        if self.draining:
            return self._refuse(conn, HTTPStatus.SERVICE_UNAVAILABLE, "draining", "draining")
        if query_has_token(request.path):
            return self._refuse(
                conn,
                HTTPStatus.BAD_REQUEST,
                "query_token",
                "credentials are not accepted in the URL (they end up in proxy logs); use "
                "the Authorization header or an auth message",
            )
        origin = request.headers.get("Origin")
        if origin is not None:
            host = request.headers.get("Host")
            own = f"{'https' if self.config.tls_cert else 'http'}://{host}" if host else None
            if not origin_allowed(origin, self.allowed_origins, own):
                return self._refuse(conn, HTTPStatus.FORBIDDEN, "origin", "origin not allowed")
        header = request.headers.get("Authorization")
        if header is not None and self.auth.enabled:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return self._refuse(
                    conn, HTTPStatus.UNAUTHORIZED, "unauthorized", "use Authorization: Bearer"
                )
            try:
                principal = self.auth.authenticate(token.strip(), time.time())
            except AuthError as exc:
                return self._refuse(conn, HTTPStatus.UNAUTHORIZED, "unauthorized", str(exc))
            self._principals[conn] = principal
        return None

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
