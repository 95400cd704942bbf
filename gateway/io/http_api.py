"""The HTTP side of the gateway's streams (docs/protocol.md, "HTTP streams"): the same
streams as the WebSocket's, for clients whose network blocks WebSocket upgrades.

- `POST /v1/streams` with a body shaped like `start` answers `200 text/event-stream`: one SSE
  event per protocol message, the first `started` (with the stream's id and resume token), the
  last its terminal message.
- `GET /v1/streams/{id}` with `X-Resume-Token` and `Last-Event-ID` resumes it: `resumed`, the
  messages after that seq, then live, exactly once, on any instance with Redis.
- `DELETE /v1/streams/{id}` with `X-Resume-Token` cancels it (the upstream request is closed).
- `OPTIONS`: the CORS preflight of the allowed origins.

Each streamed response runs a `Connection` (gateway/io/connection.py) over an `SseSocket`
(gateway/io/http.py): the session, quotas, limits, flow control, resume grace and drain are the
WebSocket's own. Refusals before the stream starts are plain HTTP statuses with a JSON body
shaped like the protocol's `error`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Coroutine
from typing import Any, Final, Protocol

import orjson
import structlog
from redis.exceptions import RedisError

from gateway.auth import AuthError, Principal, origin_allowed, query_has_token
from gateway.core.protocol import ErrorCode
from gateway.core.session import State, Stream, move
from gateway.io.connection import Connection, GatewayPort
from gateway.io.http import HttpExchange, HttpRequest, SseSocket, error_body

log = structlog.get_logger("gateway.http")

STREAMS_PATH: Final = "/v1/streams"
#: What a preflight allows (docs/security.md, "Browsers").
_ALLOW_METHODS: Final = "GET, POST, DELETE, OPTIONS"
_ALLOW_HEADERS: Final = "Authorization, Content-Type, X-Resume-Token, Last-Event-ID"
#: The fields of a POST body (those of `start` but `type`).
_START_FIELDS: Final = frozenset({"id", "prompt", "messages", "model", "options", "parts"})


class HttpPort(GatewayPort, Protocol):
    """What the HTTP side uses of the server beyond a connection's needs."""

    allowed_origins: tuple[str, ...]

    def http_opened(self, connection: Connection) -> None: ...

    def http_closed(self, connection: Connection) -> None: ...

    def http_counted(self, route: str, status: int) -> None: ...

    def own_origin(self, host: str | None) -> str | None: ...

    def spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> None: ...


class HttpApi:
    """Answers the HTTP requests the listener hands over (one per connection)."""

    def __init__(self, gateway: HttpPort) -> None:
        self.gateway = gateway

    def __call__(self, exchange: HttpExchange, request: HttpRequest) -> None:
        route, handle = self._route(request)
        cors = self._cors(request)
        if cors is None:
            self._refuse(exchange, route, 403, ErrorCode.UNAUTHORIZED, "origin not allowed", [])
            return
        if request.method == "OPTIONS":
            exchange.respond(
                204,
                [
                    *cors,
                    ("Access-Control-Allow-Methods", _ALLOW_METHODS),
                    ("Access-Control-Allow-Headers", _ALLOW_HEADERS),
                    ("Access-Control-Max-Age", "600"),
                ],
            )
            self.gateway.http_counted(route, 204)
            return
        if handle is None:
            self._refuse(exchange, route, 404, ErrorCode.BAD_MESSAGE, "not found", cors)
            return
        if query_has_token(request.path + "?" + request.query):
            self._refuse(
                exchange,
                route,
                400,
                ErrorCode.BAD_MESSAGE,
                "credentials are not accepted in the URL (they end up in proxy logs); use "
                "the Authorization header",
                cors,
            )
            return
        principal = self._principal(exchange, request, route, cors)
        if principal is None:
            return
        handle(exchange, request, principal, cors)

    # ------------------------------------------------------------------ routing

    def _route(
        self, request: HttpRequest
    ) -> tuple[
        str, Callable[[HttpExchange, HttpRequest, Principal, list[tuple[str, str]]], None] | None
    ]:
        path, method = request.path, request.method
        if path == STREAMS_PATH:
            return "streams", self._post if method == "POST" else None
        if path.startswith(STREAMS_PATH + "/") and "/" not in path[len(STREAMS_PATH) + 1 :]:
            if method == "GET":
                return "stream", self._resume
            if method == "DELETE":
                return "stream", self._delete
            return "stream", None
        return "other", None

    def _cors(self, request: HttpRequest) -> list[tuple[str, str]] | None:
        """The CORS headers for the request's origin (none without an Origin); None when its
        origin may not use the gateway (the WebSocket's origin rule)."""
        origin = request.headers.get("origin")
        if origin is None:
            return []
        gateway = self.gateway
        if not origin_allowed(
            origin, gateway.allowed_origins, gateway.own_origin(request.headers.get("host"))
        ):
            return None
        return [
            ("Access-Control-Allow-Origin", origin),
            ("Access-Control-Allow-Credentials", "true"),
            ("Access-Control-Expose-Headers", "Retry-After"),
            ("Vary", "Origin"),
        ]

    def _principal(
        self,
        exchange: HttpExchange,
        request: HttpRequest,
        route: str,
        cors: list[tuple[str, str]],
    ) -> Principal | None:
        auth = self.gateway.auth
        if not auth.enabled:
            return Principal("ip:" + exchange.peer.rsplit(":", 1)[0])
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError("use Authorization: Bearer <token>")
            return auth.authenticate(token.strip(), self.gateway.clock.wall())
        except AuthError as exc:
            self._refuse(
                exchange,
                route,
                401,
                ErrorCode.UNAUTHORIZED,
                str(exc),
                [*cors, ("WWW-Authenticate", 'Bearer realm="llm-ws-gateway"')],
            )
            return None

    def _refuse(
        self,
        exchange: HttpExchange,
        route: str,
        status: int,
        code: ErrorCode,
        message: str,
        headers: list[tuple[str, str]],
    ) -> None:
        exchange.respond_json(status, error_body(code, message), headers)
        self.gateway.http_counted(route, status)

    # ------------------------------------------------------------------ the three verbs

    def _post(
        self,
        exchange: HttpExchange,
        request: HttpRequest,
        principal: Principal,
        cors: list[tuple[str, str]],
    ) -> None:
        """A new stream: the body is a `start` without its `type`."""
        if self.gateway.draining:
            self._refuse(
                exchange,
                "streams",
                503,
                ErrorCode.SHUTTING_DOWN,
                "the gateway is shutting down; retry on another instance",
                [*cors, ("Retry-After", "1")],
            )
            return
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            self._refuse(
                exchange, "streams", 400, ErrorCode.BAD_JSON, "the body is not valid JSON", cors
            )
            return
        if not isinstance(body, dict):
            self._refuse(
                exchange,
                "streams",
                400,
                ErrorCode.BAD_MESSAGE,
                "the body must be a JSON object shaped like `start` (without `type`)",
                cors,
            )
            return
        unknown = sorted(k for k in body if k not in _START_FIELDS)
        if unknown:
            self._refuse(
                exchange,
                "streams",
                400,
                ErrorCode.BAD_MESSAGE,
                f"unknown field {unknown[0][:64]!r} (the body takes: "
                f"{', '.join(sorted(_START_FIELDS))})",
                cors,
            )
            return
        start = {"type": "start", **body}
        start.setdefault("id", "h" + secrets.token_urlsafe(9))
        self._open(exchange, principal, cors, "streams", orjson.dumps(start))

    def _resume(
        self,
        exchange: HttpExchange,
        request: HttpRequest,
        principal: Principal,
        cors: list[tuple[str, str]],
    ) -> None:
        """Replay from `Last-Event-ID` and follow, like a WebSocket `resume`."""
        sid = request.path[len(STREAMS_PATH) + 1 :]
        token = request.headers.get("x-resume-token", "")
        last = request.headers.get("last-event-id", "0").strip() or "0"
        if not token or not last.isdigit() or len(last) > 12:
            self._refuse(
                exchange,
                "stream",
                400,
                ErrorCode.BAD_MESSAGE,
                "resume with the stream's resume token in X-Resume-Token and the last seq "
                "received in Last-Event-ID (0: from the start)",
                cors,
            )
            return
        resume = {"type": "resume", "id": sid, "resume_token": token, "after": int(last)}
        self._open(exchange, principal, cors, "stream", orjson.dumps(resume))

    def _delete(
        self,
        exchange: HttpExchange,
        request: HttpRequest,
        principal: Principal,
        cors: list[tuple[str, str]],
    ) -> None:
        """Cancel the stream (its upstream request is closed now); its open response, if any,
        ends with `cancelled`."""
        token = request.headers.get("x-resume-token", "")
        gateway = self.gateway
        found = gateway.registry.lookup(token) if token else None
        if isinstance(found, Stream):
            if found.principal != principal.name:
                self._refuse(exchange, "stream", 404, ErrorCode.UNKNOWN_ID, "no such stream", cors)
                return
            self._cancel(found)
            exchange.respond(204, cors)
            gateway.http_counted("stream", 204)
            return
        if found is None and token and gateway.store is not None:
            gateway.spawn_task(self._delete_remote(exchange, token, principal, cors), "http cancel")
            return
        self._refuse(exchange, "stream", 404, ErrorCode.UNKNOWN_ID, "no such stream", cors)

    async def _delete_remote(
        self,
        exchange: HttpExchange,
        token: str,
        principal: Principal,
        cors: list[tuple[str, str]],
    ) -> None:
        store = self.gateway.store
        assert store is not None
        try:
            meta = await store.lookup(token)
        except (RedisError, OSError):
            log.warning("redis.lookup_failed")
            meta = None
        if meta is None or meta.get("p", "") != principal.name:
            self._refuse(exchange, "stream", 404, ErrorCode.UNKNOWN_ID, "no such stream", cors)
            return
        await store.send_control(meta["o"], "cancel", token)
        exchange.respond(204, cors)
        self.gateway.http_counted("stream", 204)

    def _cancel(self, stream: Stream) -> None:
        gateway = self.gateway
        follower = gateway.followers.get(stream)
        if follower is not None:
            # Its connection cancels it the way a client's `cancel` does: `cancelled` is the
            # last event of its response.
            follower.on_message(orjson.dumps({"type": "cancel", "id": stream.id}).decode())
            return
        if stream.active:  # detached (its response broke off): nobody to tell
            move(stream, State.CANCELLED, "cancelled")
            gateway.cancel_stream(stream)

    # ------------------------------------------------------------------ a streamed response

    def _open(
        self,
        exchange: HttpExchange,
        principal: Principal,
        cors: list[tuple[str, str]],
        route: str,
        message: bytes,
    ) -> None:
        gateway = self.gateway
        sse = SseSocket(exchange, gateway.config.http_keepalive, cors)
        sse.on_status = lambda status: gateway.http_counted(route, status)
        connection = Connection(gateway, sse, principal, transport="http")
        sse.connection = connection
        connection.session.accepting = not gateway.draining
        gateway.http_opened(connection)

        def lost() -> None:
            connection.on_close()
            gateway.http_closed(connection)

        exchange.on_lost = lost
        log.info(
            "http.stream",
            session=connection.id,
            peer=exchange.peer,
            principal=principal.name,
            route=route,
        )
        connection.on_message(message.decode())
