"""The server: accept sockets (HTTP routes, origin and credential checks before the upgrade),
own every stream's relay task, and drain on shutdown.

With connection.py and websocket.py, the WebSocket shell (the only modules that import
websockets). Relay tasks are owned here rather than by a socket because a stream may outlive its
socket (resume): a deliberate close cancels them at once, a drop keeps them for --resume-grace,
and `stop()` awaits every one of them, so nothing outlives the server.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import ssl
from collections.abc import Coroutine
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from gateway.auth import (
    LOOPBACK_ORIGINS,
    AuthError,
    Principal,
    TokenAuthenticator,
    origin_allowed,
    query_has_token,
)
from gateway.config import Config, check_exposure, listen_failed
from gateway.core.clock import Clock, Timer
from gateway.core.deadlines import Deadlines
from gateway.core.protocol import ErrorCode
from gateway.core.quotas import Quotas
from gateway.core.resume import Registry
from gateway.core.session import (
    Limits,
    State,
    Stream,
    finish_fail,
    move,
)
from gateway.io import seams
from gateway.io.accounting import Accounting
from gateway.io.connection import Connection, spawn
from gateway.io.http import HttpExchange
from gateway.io.http_api import HttpApi
from gateway.io.metrics_http import MetricsListener
from gateway.io.redis_store import RedisStore
from gateway.io.timers import LoopClock
from gateway.io.upstream import FlowControl, Upstream
from gateway.io.websocket import WRITE_LIMIT, Handler, Listener, WebSocket
from gateway.memory import FullCollections
from gateway.metrics import LoopLag, Metrics

log = structlog.get_logger("gateway.server")

WS_PATH: Final = "/v1/ws"
#: Frames above this are refused by websockets itself with close code 1009; frames between
#: max_message_bytes and this get a `message_too_large` error and the socket stays open.
HARD_FRAME_LIMIT_MIN: Final = 1 << 20
#: Logged when a self-test made `auto` take a public-API fallback (gateway/io/seams/).
SEAM_FALLBACK: Final = (
    "a dependency's internals are not what the fast path expects: using the public-API "
    "fallback (correct, somewhat slower); report the versions of aiohttp and websockets"
)
#: How long a drain waits for sockets to flush their last frames and close.
CLOSE_GRACE: Final = 10.0


_HERE = Path(__file__).resolve().parent.parent  # the gateway package
_WEB = _HERE / "web"
_JS = "text/javascript; charset=utf-8"
_CSS = "text/css; charset=utf-8"
_SVG = "image/svg+xml"
#: GET paths served as files: the demo page, its code and the JS client it uses as is, all
#: package data (pyproject.toml), so that an installed wheel serves them. web/js/ is a copy of
#: clients/js that a test keeps identical; web/vendor/README.md says where the rest comes from.
STATIC_FILES: Final[dict[str, tuple[Path, str]]] = {
    "/": (_WEB / "index.html", "text/html; charset=utf-8"),
    "/app.js": (_WEB / "app.js", _JS),
    "/app.css": (_WEB / "app.css", _CSS),
    "/favicon.svg": (_WEB / "favicon.svg", _SVG),
    "/favicon.ico": (_WEB / "favicon.svg", _SVG),
    "/js/index.js": (_WEB / "js" / "index.js", _JS),
    "/js/index.d.ts": (_WEB / "js" / "index.d.ts", "text/plain; charset=utf-8"),
    "/vendor/marked/marked.esm.js": (_WEB / "vendor" / "marked" / "marked.esm.js", _JS),
    "/vendor/dompurify/purify.min.js": (_WEB / "vendor" / "dompurify" / "purify.min.js", _JS),
}
#: The page's marker of who answers; served as SIMULATED_MARKER when the built-in mock does.
LIVE_MARKER: Final = b'<meta name="gateway-upstream" content="live">'
SIMULATED_MARKER: Final = b'<meta name="gateway-upstream" content="simulated">'
_static_cache: dict[tuple[str, bool], tuple[bytes, str]] = {}


def _static(path: str, simulated: bool = False) -> Response:
    """A file of STATIC_FILES (read once, then served from memory; a missing file is looked for
    again on the next request, not remembered as missing). `simulated`: the page says that the
    built-in mock upstream answers."""
    cached = _static_cache.get((path, simulated))
    if cached is None:
        file, content_type = STATIC_FILES[path]
        try:
            body = file.read_bytes()
        except OSError:
            headers = Headers([("Content-Type", "text/plain; charset=utf-8")])
            return Response(HTTPStatus.NOT_FOUND, "Not Found", headers, b"not installed\n")
        if simulated:
            body = body.replace(LIVE_MARKER, SIMULATED_MARKER, 1)
        cached = _static_cache[path, simulated] = (body, content_type)
    body, content_type = cached
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
            # Every plain HTTP answer ends its connection (this port speaks WebSocket).
            ("Connection", "close"),
        ]
    )
    return Response(HTTPStatus.OK, "OK", headers, body)


def _model_limits(config: Config) -> dict[str, Any]:
    """The models a start may name: a routes file's rules (exact names and globs), else
    --allowed-models, else any."""
    table = config.routes
    if table is None:
        allowed = frozenset(config.allowed_models) if config.allowed_models else None
        return {"allowed_models": allowed}
    return {
        "allowed_models": frozenset(rule.name for rule in table.rules if not rule.is_glob),
        "model_globs": tuple(rule.name for rule in table.rules if rule.is_glob),
        "model_required": table.default_model is None,
    }


class Gateway:
    """The server: the listening socket, the upstream client and every open connection."""

    def __init__(self, config: Config, upstream_url: str, clock: Clock | None = None) -> None:
        self.config = config
        #: Every timer of the gateway (grace, retention, deadlines, keepalive, read gaps) and
        #: every reading of time goes through this: tests pass a ManualClock.
        self.clock: Clock = clock if clock is not None else LoopClock()
        self.limits = Limits(
            max_streams=config.max_streams,
            max_message_bytes=config.max_message_bytes,
            max_prompt_chars=config.max_prompt_chars,
            max_streams_per_principal=config.max_streams_per_principal,
            starts_per_minute=config.starts_per_minute,
            **_model_limits(config),
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
        #: Principals authenticated from the upgrade's header, until the socket opens.
        self._principals: dict[WebSocket, Principal] = {}
        self.metrics = Metrics()
        self.loop_lag = LoopLag(
            self.metrics.loop_lag,
            limit=config.max_loop_lag,
            on_change=self._on_overload,
            on_tick=self.metrics.refresh,  # writes the shared gauges (--workers); else a no-op
        )
        self.upstream = Upstream(config, upstream_url, self.metrics, self.clock)
        #: The HTTP side of the streams (POST/GET/DELETE /v1/streams), on the same port.
        self.http_api = HttpApi(self)
        #: The seams' modes in force (decided in start(), by the self-tests for `auto`).
        self.modes = seams.Modes(config.upstream_body, config.client_frames)
        self.connections: set[Connection] = set()
        #: Every running relay task, by stream: owned here because streams outlive sockets.
        self.relays: dict[Stream, asyncio.Task[None]] = {}
        #: The socket each running stream's output goes to (absent while detached).
        self.followers: dict[Stream, Connection] = {}
        self.registry: Registry[Stream] = Registry(
            config.resume_max_bytes, config.resume_total_bytes, config.resume_tombstones
        )
        #: The shared store for resume across instances (--redis-url), else None.
        self.store: RedisStore | None = (
            RedisStore(config.redis_url, config.resume_retention) if config.redis_url else None
        )
        #: Usage per principal and budgets (shared through the store when there is one).
        self.accounting = Accounting(config, self.metrics, self.clock, self.store)
        #: Fire-and-forget is banned: control messages to other instances, remote follows and
        #: writers of closed sockets finishing are owned here.
        self._control_tasks: set[asyncio.Task[None]] = set()
        #: Grace timers of detached streams and retention timers of ended ones.
        self._grace: dict[Stream, Timer] = {}
        self._retention: dict[Stream, Timer] = {}
        self.active_streams = 0
        self.draining = False
        self._listener: Listener | None = None
        #: /metrics on a port of its own (--metrics-port), else None.
        self.metrics_listener: MetricsListener | None = None
        #: The context the gateway was started in (a worker's index is bound there): socket
        #: callbacks and relays run in copies of it, so no stream's or socket's bindings leak
        #: into another's log lines.
        self.context = contextvars.copy_context()
        #: Set while no stream runs in this process (drains and tests wait on it).
        self.idle = asyncio.Event()
        self.idle.set()
        #: The sockets' idle (--idle-timeout) and authentication (--auth-timeout) deadlines.
        self.idle_deadlines: Deadlines[Connection] = Deadlines(
            self.clock, config.idle_timeout, Connection.timed_out
        )
        self.auth_deadlines: Deadlines[Connection] = Deadlines(
            self.clock, config.auth_timeout, Connection.timed_out
        )
        #: Set while no socket is open (after its handshake).
        self._no_connections = asyncio.Event()
        self._no_connections.set()
        m = self.metrics
        m.mirror(m.open_sockets, lambda: len(self.connections))
        m.mirror(m.active_streams, lambda: self.active_streams)
        m.mirror(m.upstream_open, lambda: self.upstream.open_responses)
        m.mirror(m.upstream_pool_idle, self.upstream.pool_idle)
        m.mirror(m.tasks, lambda: len(asyncio.all_tasks()))
        m.mirror(m.draining, lambda: int(self.draining))
        m.mirror(m.overloaded, lambda: int(self.loop_lag.overloaded))
        m.mirror(m.resume_retained_bytes, lambda: self.registry.retained_bytes)
        m.mirror(m.resume_retained_streams, lambda: self.registry.retained_streams)
        m.mirror(m.resume_tombstones, lambda: self.registry.tombstones)
        #: A full collection every few minutes: the bound on anything a dependency leaves in a
        #: reference cycle (gateway/memory.py).
        self.full_collections = FullCollections(m.gc_full_collection, config.gc_interval)

    # ------------------------------------------------------------------ stream lifecycle

    def open_stream(self, stream: Stream) -> None:
        """Start `stream`'s relay task (owned here, not by the socket: it may outlive it)."""
        self.active_streams += 1
        self.upstream.count_started(stream)
        self.idle.clear()
        stream.started_at = self.clock.now()
        if self.store is not None:
            self.store.register(stream)
        # The relay's log lines (and its end's, in the done callback) say which stream,
        # socket and principal they are about: bound in a context of their own, because a
        # socket's callbacks run in whatever context scheduled them.
        context = self.context.copy()
        context.run(
            structlog.contextvars.bind_contextvars,
            stream=stream.id,
            session=stream.owner.id if stream.owner is not None else None,
            principal=stream.principal,
        )
        task = asyncio.get_running_loop().create_task(
            self.upstream.relay(stream, self.flow_for), name=f"stream {stream.id}", context=context
        )
        self.relays[stream] = task
        task.add_done_callback(lambda _t: self._relay_done(stream), context=context)

    def flow_for(self, stream: Stream) -> FlowControl | None:
        """Backpressure: the flow control of the socket following `stream` (none: go on)."""
        connection = self.followers.get(stream)
        return connection.flow if connection is not None else None

    def _relay_done(self, stream: Stream) -> None:
        self.relays.pop(stream, None)
        self.upstream.stream_ended(stream, stream.started_at)
        self.accounting.charge(stream)
        self.active_streams -= 1
        if self.active_streams == 0:
            self.idle.set()
        if stream.principal is not None:
            self.quotas.end_stream(stream.principal, self.clock.now())
        timer = self._grace.pop(stream, None)
        if timer is not None:
            timer.cancel()
        if self.store is not None and not stream.terminal_sent:
            self.store.stream_gone(stream)  # cancelled without a frame anyone could replay
        if self.registry.ended(stream):
            self._retention[stream] = self.clock.call_later(
                self.config.resume_retention, self._retention_over, stream
            )
        connection = self.followers.pop(stream, None)
        if connection is not None:
            connection.stream_finished(stream)

    def control(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a control message to another instance as an owned task."""
        self.own(spawn(coro, "redis control message"))

    def own(self, task: asyncio.Task[None]) -> None:
        """Keep `task` until it is done; stop() awaits it."""
        self._control_tasks.add(task)
        task.add_done_callback(self._control_tasks.discard)

    def _on_control(self, verb: str, token: str) -> None:
        """A message from another instance about a stream this one owns."""
        stream = self.registry.lookup(token)
        if not isinstance(stream, Stream):
            return
        if verb == "cancel" and stream.active:
            # The follower elsewhere sends its client the `cancelled`.
            move(stream, State.CANCELLED, "cancelled")
            self.cancel_stream(stream)
        elif verb == "moved":
            # Followed elsewhere now: produce what was pending here into the shared store,
            # stop sending to any local socket, and no grace timer (someone follows it).
            previous = stream.owner
            if previous is not None:
                previous.release(stream, finished=False)
            stream.leave_sink()
            connection = self.followers.pop(stream, None)
            if connection is not None:
                connection.following.pop(stream, None)
                connection.flow.wake()  # its relay may be paused for this socket: re-check
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
            stream.cancelled_at = self.clock.now()
            self.upstream.abort(stream)
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
            self._grace[stream] = self.clock.call_later(
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
            previous.following.pop(stream, None)
            previous.flow.wake()  # its relay may be paused for the old socket: re-check
        log.info("stream.resumed", stream=stream.id, seq=stream.seq)

    def _grace_over(self, stream: Stream) -> None:
        """Nobody resumed `stream` in time: stop its upstream (no one would read the answer)."""
        self._grace.pop(stream, None)
        if stream.owner is None and stream.active:
            move(stream, State.CANCELLED, "abandoned")
            log.info("stream.abandoned", stream=stream.id)
            self.cancel_stream(stream)

    def _on_open(self, ws: WebSocket) -> Connection:
        """A socket finished its handshake: it becomes a Connection."""
        connection = Connection(self, ws, self._principals.pop(ws, None))
        self.connections.add(connection)
        self._no_connections.clear()
        connection.start()
        return connection

    # ------------------------------------------------------------------ the HTTP side

    def _on_http(self, transport: asyncio.Transport, received: bytes) -> None:
        """A connection whose request is plain HTTP (gateway/io/http.py): answered by the HTTP
        side of the streams (gateway/io/http_api.py)."""
        exchange = HttpExchange(
            transport,
            self.http_api,
            self.clock,
            max_body=self.config.max_message_bytes,
            open_timeout=self.config.open_timeout,
        )
        transport.set_protocol(exchange)
        exchange.data_received(received)

    def http_opened(self, connection: Connection) -> None:
        self.connections.add(connection)
        self._no_connections.clear()

    def http_closed(self, connection: Connection) -> None:
        self._on_closed(connection)

    def http_counted(self, route: str, status: int) -> None:
        self.metrics.http_requests.labels(route, str(status)).inc()

    def own_origin(self, host: str | None) -> str | None:
        """This gateway's own origin, as a page it serves would send it."""
        return f"{'https' if self.config.tls_cert else 'http'}://{host}" if host else None

    def spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self.own(spawn(coro, name))

    def _on_reject(self, ws: WebSocket) -> None:
        self._principals.pop(ws, None)

    def _on_closed(self, handler: Handler) -> None:
        """An open socket is gone (its Connection has released everything)."""
        assert isinstance(handler, Connection)
        self.connections.discard(handler)
        if not self.connections:
            self._no_connections.set()

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
        assert self._listener is not None
        return self._listener.sockets

    @property
    def port(self) -> int:
        port: int = self.sockets[0].getsockname()[1]
        return port

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
        """Listen, or raise StartupError (a misconfiguration). Nothing is logged until the
        sockets listen, so that a misconfiguration is the only line; stop() releases what a
        failed start opened."""
        check_exposure(self.config)
        if self.store is not None:
            await self.store.start()
            self.store.on_control = self._on_control
        self.accounting.start()
        await self.upstream.start()
        self.modes = await seams.choose(self.config.upstream_body, self.config.client_frames)
        self.upstream.push = self.modes.upstream_body == "push"
        for seam, mode in (
            ("upstream_body", self.modes.upstream_body),
            ("client_frames", self.modes.client_frames),
        ):
            self.metrics.seam_mode.labels(seam, mode).set(1)
        self.context = contextvars.copy_context()
        self._listener = Listener(
            process_request=self._process_request,
            on_open=self._on_open,
            on_reject=self._on_reject,
            on_closed=self._on_closed,
            context=self.context,
            max_size=max(4 * self.config.max_message_bytes, HARD_FRAME_LIMIT_MIN),
            # What a socket legitimately has unsent: up to --send-buffer-bytes of frames
            # flushed at once after a slow client caught up, over the transport's own buffer.
            max_buffer=2 * self.config.send_buffer_bytes + 4 * WRITE_LIMIT,
            compression=self.config.compression,
            # A client must send its request within this after connecting (a slowloris holds
            # a file descriptor otherwise); 10 s is websockets' own default.
            open_timeout=self.config.open_timeout,
            # A peer that does not answer our close (dead network, ping timeout) is dropped
            # after this; websockets' default of 10 s keeps its streams running for nothing.
            close_timeout=self.config.close_timeout,
            ping_interval=self.config.ping_interval,
            ping_timeout=self.config.ping_timeout,
            clock=self.clock,
            on_http=self._on_http,
        )
        self._listener.fast_frames = self.modes.client_frames == "fast"
        ssl_context = self._ssl_context()
        # Workers share the port; the kernel spreads new connections across them.
        reuse_port = self.config.workers > 1
        try:
            await self._listener.start(
                self.config.host, self.config.port, ssl_context, reuse_port=reuse_port
            )
        except OSError as exc:
            raise listen_failed("--port", self.config.host, self.config.port, exc) from None
        if self.config.metrics_port is not None:
            self.metrics_listener = MetricsListener(self.metrics.render)
            await self.metrics_listener.start(
                self.config.host, self.config.metrics_port, reuse_port=reuse_port
            )
        self.loop_lag.start()
        self.full_collections.start()
        if self.store is not None:
            log.info("redis.connected", instance=self.store.instance)
        if self.modes.fallbacks:
            log.warning("gateway.seams", **self.modes.__dict__, message=SEAM_FALLBACK)
        else:
            log.info(
                "gateway.seams",
                upstream_body=self.modes.upstream_body,
                client_frames=self.modes.client_frames,
            )
        if not self.auth.enabled:
            log.warning(
                "auth.disabled",
                message="no authentication configured: anyone who can connect may use the gateway",
            )

    async def drain(self, grace: float | None = None) -> None:
        """Graceful shutdown (docs/reliability.md, "Graceful drain").

        Refuse new sockets (503) and new starts (`shutting_down`), let streams in flight finish
        for up to `grace` seconds (default --drain-timeout), end the rest with a retryable
        `stream_interrupted`, stop listening, then close every socket with 1001 after its last
        frames.
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
        # Stop listening before the 1001s go out: the clients reconnect at once, and should
        # find this instance gone (and try the next one), not be accepted as it closes.
        if self._listener is not None:
            self._listener.close()
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
        listener = self._listener
        if listener is not None:
            listener.close()
            listener.abort_handshakes()
            for connection in list(self.connections):
                connection.close_reason = "shutdown"
                connection.request_close(1001, "going away")
            # A socket is aborted after --close-timeout if its client does not answer the close;
            # one whose writer is still waiting for a slow client is aborted here.
            if self.connections:
                try:
                    await asyncio.wait_for(
                        self._no_connections.wait(), self.config.close_timeout + 1
                    )
                except TimeoutError:
                    for connection in list(self.connections):
                        connection.ws.abort()
                    await self._no_connections.wait()
            listener.keepalive.stop()
        self.idle_deadlines.stop()
        self.auth_deadlines.stop()
        for timer in [*self._grace.values(), *self._retention.values()]:
            timer.cancel()
        self._grace.clear()
        self._retention.clear()
        for retained in self.registry.retained():  # nothing serves their resumes any more
            self.registry.forget(retained)
        streams = list(self.relays)
        for stream in streams:
            if stream.active:  # no socket is left to tell
                move(stream, State.CANCELLED, "shutdown")
            self.cancel_stream(stream)
        await self.join(streams)
        if self._control_tasks:
            await asyncio.wait(self._control_tasks)
        await self.accounting.close()
        if self.store is not None:
            await self.store.close()
        await self.upstream.close()
        if self.metrics_listener is not None:  # last: a drain can be watched to its end
            await self.metrics_listener.close()
        self.loop_lag.stop()
        self.full_collections.stop()

    def _on_overload(self, overloaded: bool, lag: float) -> None:
        """--max-loop-lag: readiness follows the loop's lag; say so when it changes."""
        limit_ms = round(self.config.max_loop_lag * 1000, 1)
        if overloaded:
            log.warning("gateway.overloaded", loop_lag_ms=round(lag * 1000, 1), limit_ms=limit_ms)
        else:
            log.info("gateway.recovered", loop_lag_ms=round(lag * 1000, 1), limit_ms=limit_ms)

    def _process_request(self, conn: WebSocket, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            return self._check_upgrade(conn, request)
        if path == "/healthz":
            return conn.protocol.reject(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.draining:
                return conn.protocol.reject(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            if self.loop_lag.overloaded:
                return conn.protocol.reject(HTTPStatus.SERVICE_UNAVAILABLE, "overloaded\n")
            return conn.protocol.reject(HTTPStatus.OK, "ready\n")
        if path in STATIC_FILES:
            return _static(path, self.config.uses_mock)
        if path == "/v1/models":
            return self._models(conn, request)
        if path == "/metrics" and self.config.metrics_port is None:  # else on its own port
            body = self.metrics.render()
            headers = Headers(
                [
                    ("Content-Type", CONTENT_TYPE_LATEST),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                ]
            )
            return Response(HTTPStatus.OK, "OK", headers, body)
        return conn.protocol.reject(
            HTTPStatus.NOT_FOUND, "not found; the WebSocket endpoint is /v1/ws\n"
        )

    def _models(self, conn: WebSocket, request: Request) -> Response:
        """`GET /v1/models`: the models a start may name, in the shape of OpenAI's list (plus
        `default`, the model of a start that names none, and `any_model`). Behind the same
        credentials as the WebSocket when authentication is on."""
        if self.auth.enabled:
            scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
            try:
                if scheme.lower() != "bearer" or not token.strip():
                    raise AuthError("use Authorization: Bearer")
                self.auth.authenticate(token.strip(), self.clock.wall())
            except AuthError as exc:
                return self._refuse(conn, HTTPStatus.UNAUTHORIZED, "unauthorized", str(exc))
        limits, table = self.limits, self.upstream.table
        any_model = limits.allowed_models is None
        names = (
            [table.default_model or self.config.default_model]
            if any_model
            else [*sorted(limits.allowed_models or ()), *limits.model_globs]
        )
        body = orjson.dumps(
            {
                "object": "list",
                "data": [{"id": n, "object": "model", "owned_by": "llm-ws-gateway"} for n in names],
                "default": table.default_model,
                "any_model": any_model,
            }
        )
        headers = Headers(
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
                ("Connection", "close"),
            ]
        )
        return Response(HTTPStatus.OK, "OK", headers, body)

    def _refuse(self, conn: WebSocket, status: HTTPStatus, reason: str, text: str) -> Response:
        self.metrics.rejected.labels(reason).inc()
        log.info("upgrade.refused", reason=reason, status=int(status))
        response = conn.protocol.reject(status, text + "\n")
        if status == HTTPStatus.UNAUTHORIZED:
            response.headers["WWW-Authenticate"] = 'Bearer realm="llm-ws-gateway"'
        return response

    def _check_upgrade(self, conn: WebSocket, request: Request) -> Response | None:
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
                principal = self.auth.authenticate(token.strip(), self.clock.wall())
            except AuthError as exc:
                return self._refuse(conn, HTTPStatus.UNAUTHORIZED, "unauthorized", str(exc))
            self._principals[conn] = principal
        return None
