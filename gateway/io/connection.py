"""One open WebSocket: its session, its writer, auth and quotas, and remote followers.

Part of the WebSocket shell (with websocket.py, the socket's I/O, and server.py, which accepts
sockets and owns the relays). No task per socket: client messages arrive as callbacks from
websocket.py and the session's commands are carried out there and then. The outbox is written
by a callback run once per loop iteration while the client keeps up (no task switch per chunk);
only a client that falls behind gets a writer task of its own, so a slow client blocks nothing
but itself. Relay tasks belong to the gateway, because a stream may outlive its socket (resume).
"""

from __future__ import annotations

import asyncio
import contextvars
import secrets
from collections.abc import Coroutine
from typing import Any, Final, Protocol

import structlog
from redis.exceptions import RedisError

from gateway.auth import AuthError, Principal, TokenAuthenticator
from gateway.config import Config
from gateway.core.clock import Clock, Timer
from gateway.core.deadlines import Deadlines
from gateway.core.protocol import ErrorCode, Resume, Start, encode_authenticated, encode_error
from gateway.core.quotas import Quotas
from gateway.core.resume import Registry
from gateway.core.session import (
    CLOSE_UNAUTHORIZED,
    Authenticate,
    CancelUpstream,
    Limits,
    OpenUpstream,
    Outbox,
    Refused,
    RemoteResume,
    Resumed,
    Session,
    Stream,
    finish_fail,
)
from gateway.io.accounting import Accounting
from gateway.io.redis_store import RedisStore
from gateway.io.upstream import FlowControl
from gateway.metrics import Metrics


class ClientSocket(Protocol):
    """What a connection writes to: a WebSocket (gateway/io/websocket.py), or a streamed HTTP
    response standing in for one (gateway/io/http.py's SseSocket)."""

    @property
    def peer(self) -> str: ...
    @property
    def paused(self) -> bool: ...
    @property
    def close_code(self) -> int | None: ...
    @property
    def close_rcvd(self) -> bool: ...

    def write_frames(self, messages: list[bytes]) -> None: ...

    async def wait_writable(self) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def abort(self) -> None: ...


class GatewayPort(Protocol):
    """What a connection uses of the server (gateway/io/server.py's Gateway), declared here so
    that this module does not import the server's: the process-wide settings, stores and
    timers, and the streams' relays, which belong to the server because a stream may outlive
    its socket."""

    config: Config
    auth: TokenAuthenticator
    limits: Limits
    quotas: Quotas
    accounting: Accounting
    metrics: Metrics
    registry: Registry[Stream]
    store: RedisStore | None
    draining: bool
    context: contextvars.Context
    clock: Clock
    idle_deadlines: Deadlines[Connection]
    auth_deadlines: Deadlines[Connection]
    followers: dict[Stream, Connection]

    def open_stream(self, stream: Stream) -> None: ...

    def cancel_stream(self, stream: Stream) -> None: ...

    def attach(self, stream: Stream, connection: Connection) -> None: ...

    def detach(self, stream: Stream) -> None: ...

    def has_capacity(self) -> bool: ...

    def control(self, coro: Coroutine[Any, Any, None]) -> None: ...

    def own(self, task: asyncio.Task[None]) -> None: ...


log = structlog.get_logger("gateway.server")

#: Close codes (docs/protocol.md, "Close codes").
CLOSE_SLOW_CONSUMER: Final = 4408
CLOSE_TOO_MANY_CONNECTIONS: Final = 4429


def new_resume_token() -> str:
    """An unguessable resume token (128 bits)."""
    return secrets.token_urlsafe(16)


def spawn(
    coro: Coroutine[Any, Any, None], name: str, context: contextvars.Context | None = None
) -> asyncio.Task[None]:
    """Create a named task; the caller owns it and must await or cancel it."""
    return asyncio.get_running_loop().create_task(coro, name=name, context=context)


class Connection:
    """One open socket: its session and its writer. The streams' relay tasks belong to the
    gateway, because a stream may outlive its socket (resume)."""

    # Slots: one of these per socket, 20,000 sockets per process (docs/performance.md).
    __slots__ = (
        "_busy",
        "_close_request",
        "_closing",
        "_expiry",
        "_flush_scheduled",
        "_loop",
        "_opened_at",
        "_remote_pending",
        "_socket_counted",
        "_stopped",
        "_writer",
        "close_reason",
        "flow",
        "following",
        "gateway",
        "id",
        "outbox",
        "principal",
        "remote",
        "session",
        "transport",
        "ws",
    )

    def __init__(
        self,
        gateway: GatewayPort,
        ws: ClientSocket,
        principal: Principal | None,
        transport: str = "websocket",
    ) -> None:
        self.gateway = gateway
        self.ws = ws
        #: "websocket", "http" (a stream's SSE response: gateway/io/http.py) or "ai_sdk" (one
        #: in the AI SDK's UI message stream protocol).
        self.transport = transport
        self.id = secrets.token_urlsafe(12)
        self._loop = asyncio.get_running_loop()
        #: A flush is scheduled for this loop iteration (see `_wakeup`).
        self._flush_scheduled = False
        #: A flush or a client message is being handled: a stream's first text queued
        #: meanwhile is written by the flush that follows, not at once (see `_wakeup`).
        self._busy = False
        #: The writer task while a slow client is caught up with; while it exists, it alone
        #: writes to the socket.
        self._writer: asyncio.Task[None] | None = None
        #: The socket is gone: nothing is written any more.
        self._stopped = False
        outbox = Outbox(self._wakeup)
        #: Who is connected: from the upgrade's Authorization header, a first-message `auth`,
        #: or (auth off) the peer address, so per-principal quotas still mean something.
        self.principal = principal
        awaiting_auth = gateway.auth.enabled and self.principal is None
        if not gateway.auth.enabled:
            self.principal = Principal("ip:" + ws.peer.rsplit(":", 1)[0])
        self.session = Session(
            self.id,
            gateway.limits,
            outbox,
            admit=self._admit,
            awaiting_auth=awaiting_auth,
            registry=gateway.registry,
            new_token=new_resume_token,
            principal=self.principal.name if self.principal else None,
            remote=gateway.store is not None,
        )
        #: Streams followed from another instance: proxy -> (owner instance, token, task).
        self.remote: dict[Stream, tuple[str, str, asyncio.Task[None]]] = {}
        self.session.accepting = not gateway.draining
        self._socket_counted = False
        self._expiry: Timer | None = None
        self._opened_at = gateway.clock.now()
        self.outbox = outbox
        self.flow = FlowControl(gateway.config.send_buffer_bytes, outbox)
        #: Streams whose output this socket receives (their relays belong to the gateway).
        self.following: dict[Stream, None] = {}  # a set, as a dict: 64 bytes empty, not 216
        #: (code, reason) once the gateway wants this socket closed after its pending frames.
        self._close_request: tuple[int, str] | None = None
        self.close_reason = "client"
        self._closing: asyncio.Event | None = None
        #: Remote resumes still looking their stream up (created on first use).
        self._remote_pending: dict[asyncio.Task[None], None] | None = None

    def start(self) -> None:
        """The handshake is done: welcome the client (unless it must authenticate first)."""
        log.info("socket.open", session=self.id, peer=self.ws.peer, transport=self.transport)
        if not self.session.awaiting_auth:
            if not self._admit_socket():
                return
            self.session.welcome()
            self._arm_expiry()
        self._arm_idle()

    def on_message(self, data: str | bytes) -> None:
        """One client message: the session decides, this carries out its commands.

        The replies (`started`, errors) are written after the commands are carried out, and
        after a new stream's upstream request has gone out: the upstream's answer, which the
        user waits on, starts sooner (docs/performance.md, "time to first chunk").
        """
        hold = not self._flush_scheduled
        self._flush_scheduled = self._busy = True  # nothing is written while they run
        opened = False
        try:
            opened = self._carry_out(data)
        finally:
            self._busy = False
            if hold:
                if not (len(self.outbox) or self._close_request is not None):
                    self._flush_scheduled = False
                elif opened:
                    # The relay's first step runs next; on Python 3.11 aiohttp writes the
                    # request body in a task that step creates: flush after that one.
                    self._loop.call_soon(self._flush_soon, context=self.gateway.context)
                else:
                    self._flush_scheduled = False
                    self._wakeup(False)
        self._arm_idle()

    def _flush_soon(self) -> None:
        self._loop.call_soon(self._flush, context=self.gateway.context)

    def _carry_out(self, data: str | bytes) -> bool:
        """Carry out what the session decided about `data`; True if a stream was opened."""
        opened = False
        for command in self.session.receive(data):
            if isinstance(command, OpenUpstream):
                self.gateway.open_stream(command.stream)
                self._follow(command.stream)
                self.gateway.metrics.transport_streams.labels(self.transport).inc()
                opened = True
            elif isinstance(command, CancelUpstream):
                if command.stream in self.remote:
                    self._stop_remote(command.stream, "cancel")
                else:
                    self.gateway.cancel_stream(command.stream)
            elif isinstance(command, Authenticate):
                self._authenticate(command.token)
            elif isinstance(command, Resumed):
                self._follow(command.stream, resumed=True)
            elif isinstance(command, RemoteResume):
                self._resume_remote(command.msg)
            else:
                self.close_reason = "protocol"
                self.request_close(command.code, command.reason)
        return opened

    def on_close(self) -> None:
        """The socket is gone: release its streams (cancel or detach), its quota and timers."""
        self._stopped = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.gateway.idle_deadlines.cancel(self)
        self.gateway.auth_deadlines.cancel(self)
        self._release_streams()
        # The outbox and the session call back into this connection: with those links cut, a
        # closed socket's objects are freed by reference counting as soon as nothing uses them.
        self.outbox.unbind()
        self.session.unbind()
        if self._remote_pending:
            for task in self._remote_pending:
                task.cancel()  # owned by the gateway, which awaits it
        if self._socket_counted and self.principal is not None:
            self.gateway.quotas.close_socket(self.principal.name, self.gateway.clock.now())
        # A writer waiting for the client wakes now (the socket's drain waiter is released)
        # and finds the socket stopped; the gateway owns it until it has.
        if self._writer is not None and not self._writer.done():
            self.gateway.own(self._writer)
        log.info(
            "socket.close",
            session=self.id,
            principal=self.principal.name if self.principal else None,
            code=self.ws.close_code,
            reason=self.close_reason,
            transport=self.transport,
            streams=self.session.streams_started,
            frames_in=self.session.frames_in,
            stalls=self.flow.stalls,
            duration_ms=round((self.gateway.clock.now() - self._opened_at) * 1000, 1),
        )

    def dropped(self) -> bool:
        """Whether the socket went away without the client meaning it (no close frame from
        the client: network loss, ping timeout; or our 4408), so its streams wait for a resume."""
        if self.close_reason == "slow_consumer":
            return True
        return self.close_reason == "client" and not self.ws.close_rcvd

    def _release_streams(self) -> None:
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
            # Relays paused because this socket was behind must not wait for it any longer:
            # its outbox is gone, and a resume elsewhere picks their streams up.
            self.flow.wake()
            return
        for stream in self.session.close():
            gateway.cancel_stream(stream)

    def _arm_idle(self) -> None:
        """Closes the socket after --auth-timeout from the open while auth is awaited, and
        after --idle-timeout from now while no stream runs (never while one does)."""
        if self._stopped:
            return
        gateway = self.gateway
        if self.session.awaiting_auth:
            gateway.auth_deadlines.start(self, restart=False)
            return
        gateway.auth_deadlines.cancel(self)
        if not gateway.config.idle_timeout or self.session.streams:
            gateway.idle_deadlines.cancel(self)
        else:
            gateway.idle_deadlines.start(self)

    def timed_out(self) -> None:
        """The auth or idle deadline passed (Deadlines calls this)."""
        if self.session.awaiting_auth:
            self.close_reason = "auth_timeout"
            self.request_close(CLOSE_UNAUTHORIZED, "authentication timed out")
        else:
            self.close_reason = "idle"
            self.request_close(1000, "idle timeout")

    # ------------------------------------------------------------------ auth and quotas

    def _admit_socket(self) -> bool:
        """Count this socket against its principal's quota; close it with 4429 when over."""
        assert self.principal is not None
        refused = self.gateway.quotas.open_socket(self.principal.name)
        if refused is not None:
            self.close_reason = "quota"
            self.gateway.metrics.rejected.labels("quota").inc()
            log.warning(
                "socket.refused",
                session=self.id,
                principal=self.principal.name,
                reason=refused.message,
            )
            self.request_close(CLOSE_TOO_MANY_CONNECTIONS, refused.message)
            return False
        self._socket_counted = True
        self.gateway.accounting.seen(self.principal)
        return True

    def _admit(self, msg: Start) -> Refused | None:
        """Process capacity and per-principal quotas for one start."""
        if not self.gateway.has_capacity():
            return Refused(ErrorCode.TOO_MANY_STREAMS, "the gateway is at capacity; retry shortly")
        assert self.principal is not None
        over_budget = self.gateway.accounting.admit(self.principal)
        if over_budget is not None:
            return over_budget
        refused = self.gateway.quotas.start_stream(self.principal.name, self.gateway.clock.now())
        if refused is None:
            return None
        if refused.retry_after_ms is not None:
            return Refused(ErrorCode.RATE_LIMITED, refused.message, refused.retry_after_ms)
        return Refused(ErrorCode.TOO_MANY_STREAMS, refused.message)

    def _authenticate(self, token: str) -> None:
        """A first-message `auth` (then `welcome`), or a token refresh on an open socket."""
        auth = self.gateway.auth
        if not auth.enabled:
            self.outbox.push_frame(encode_authenticated(None))
            return
        try:
            principal = auth.authenticate(token, self.gateway.clock.wall())
        except AuthError as exc:
            self.close_reason = "unauthorized"
            log.info("auth.failed", session=self.id, reason=str(exc))
            self.request_close(CLOSE_UNAUTHORIZED, str(exc))
            return
        if self.session.awaiting_auth:
            self.principal = principal
            self.session.principal = principal.name
            if not self._admit_socket():
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
        log.info(
            "auth.ok", session=self.id, principal=principal.name, expires_at=principal.expires_at
        )
        self._arm_expiry()

    def _arm_expiry(self) -> None:
        """When the credential expires: refuse new starts, and close with 4401 once the
        streams in flight are done (unless a fresh `auth` arrives first)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.principal is None or self.principal.expires_at is None:
            return
        clock = self.gateway.clock
        self._expiry = clock.call_later(self.principal.expires_at - clock.wall(), self._expired)

    def _expired(self) -> None:
        self._expiry = None
        self.session.authorized = False
        log.info("auth.expired", session=self.id)
        self._close_if_expired_and_idle()

    def _close_if_expired_and_idle(self) -> None:
        if not self.session.authorized and not self.session.streams:
            self.close_reason = "expired"
            self.request_close(CLOSE_UNAUTHORIZED, "credential expired")

    @property
    def closing(self) -> asyncio.Event:
        """Set once the gateway has decided to close this socket (tests and drains wait on
        it). Created on first use: an Event costs about 770 bytes, and most sockets never
        need this one."""
        if self._closing is None:
            self._closing = asyncio.Event()
            if self._close_request is not None or self.close_reason == "slow_consumer":
                self._closing.set()
        return self._closing

    def request_close(self, code: int, reason: str) -> None:
        """Close the socket once every frame queued so far has been sent."""
        if self._close_request is None:
            self._close_request = (code, reason)
            if self._closing is not None:
                self._closing.set()
            self._wakeup(False)

    def _follow(self, stream: Stream, resumed: bool = False) -> None:
        """This socket now receives `stream`'s output (its writer paces the relay)."""
        if resumed:
            self.gateway.attach(stream, self)
        if stream.active:
            self.gateway.followers[stream] = self
            self.following[stream] = None

    # ------------------------------------------------------------------ remote streams

    def _resume_remote(self, msg: Resume) -> None:
        """Resume a stream another instance owns: replay and follow it through Redis.

        Lookups still in flight count against `max_streams` like streams do: a client sending
        resumes for unknown tokens faster than the shared store answers them must not make the
        gateway hold a task (and a Redis request) per message."""
        if self._remote_pending is None:
            self._remote_pending = {}
        pending = self._remote_pending
        max_streams = self.gateway.limits.max_streams
        # Followed remote streams are in `session.streams` and their tasks in `pending`.
        looking_up = len(pending) - len(self.remote)
        if looking_up + len(self.session.streams) >= max_streams:
            self.outbox.push_frame(
                encode_error(
                    ErrorCode.TOO_MANY_STREAMS,
                    f"at most {max_streams} concurrent streams and resumes per socket",
                    msg.id,
                )
            )
            return
        task = spawn(self._follow_remote(msg), f"follow {self.id}/{msg.id}")
        pending[task] = None
        task.add_done_callback(lambda done: pending.pop(done, None))
        self.gateway.own(task)

    async def _follow_remote(self, msg: Resume) -> None:
        structlog.contextvars.bind_contextvars(session=self.id)
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

        def on_chunk(seq: int, entry: str | bytes) -> None:
            assert proxy is not None
            if isinstance(entry, str):
                session.forward(proxy, seq, entry)
            else:
                session.forward_part(proxy, seq, entry)

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
        self.following.pop(stream, None)
        self._arm_idle()
        self._close_if_expired_and_idle()

    def _wakeup(self, urgent: bool) -> None:
        """The outbox got its first entry: flush it once this loop iteration's relays have
        pushed theirs (so deltas and streams that arrive together share one frame and one
        write), unless the writer task owns the socket right now. A stream's first text
        (`urgent`) is written at once: under load, the rest of the iteration can take
        milliseconds, and time to first chunk is what a user notices."""
        if self._writer is not None or self._stopped:
            return
        if urgent and not self._busy:
            self._flush(scheduled=False)  # a flush still scheduled finds less (or nothing)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            # A fixed context: no copy per flush, and the relay that woke us (its stream's log
            # bindings) is not this socket.
            self._loop.call_soon(self._flush, context=self.gateway.context)

    def _flush(self, scheduled: bool = True) -> None:
        """Write everything queued (the hot path: a plain callback, no task switch).

        `scheduled`: this is the flush `_wakeup` scheduled (not an urgent one in between).
        Slow consumers (docs/reliability.md): frames that wait together are already coalesced
        by the outbox. When the socket is over its high-water mark after this write, a writer
        task waits for the client, at most --slow-client-timeout, then closes it with 4408.
        """
        if scheduled:
            self._flush_scheduled = False
        if self._writer is not None or self._stopped:
            return
        frames = self.outbox.take_frames()
        flow = self.flow
        if flow.waiting:
            self._busy = True
            try:
                flow.wake()  # may feed paused upstream reads, and so queue more, right now
            finally:
                self._busy = False
        ws = self.ws
        if frames:
            ws.write_frames(frames)  # dropped if the socket is closing
            # An idle socket must not pin its last batch (orjson keeps a block per frame).
            del frames
            if ws.paused:  # behind now: wait for the client before writing more
                # In the gateway's context: an urgent write runs in the relay's.
                self._writer = spawn(
                    self._catch_up(), f"writer {self.id}", context=self.gateway.context
                )
                return
        if self._close_request is not None and not len(self.outbox):
            ws.close(*self._close_request)

    async def _catch_up(self) -> None:
        """The client is behind: wait until it has taken what was written, for at most
        --slow-client-timeout; then go back to flushing (or close it with 4408)."""
        slow = self.gateway.config.slow_client_timeout
        try:
            async with asyncio.timeout(slow):
                await self.ws.wait_writable()
        except TimeoutError:
            self._close_slow_consumer(slow)
            return  # the writer slot stays taken: nothing more is written
        self._writer = None
        self._flush()

    def _close_slow_consumer(self, waited: float) -> None:
        """Give up on a client that cannot keep up: close with 4408 behind the frames it has not
        read yet (dropped after --close-timeout if it does not answer). Its streams are then
        detached for --resume-grace like any dropped socket's."""
        self.close_reason = "slow_consumer"
        if self._closing is not None:
            self._closing.set()
        self.gateway.metrics.slow_client_closes.inc()
        log.warning(
            "socket.slow_consumer",
            session=self.id,
            timeout_s=waited,
            buffered=self.outbox.buffered,
        )
        self.ws.close(CLOSE_SLOW_CONSUMER, "slow consumer")
