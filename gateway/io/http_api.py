"""The HTTP side of the gateway's streams (docs/protocol.md, "HTTP streams"): the same
streams as the WebSocket's, for clients whose network blocks WebSocket upgrades.

- `POST /v1/streams` with a body shaped like `start` answers `200 text/event-stream`: one SSE
  event per protocol message, the first `started` (with the stream's id and resume token), the
  last its terminal message.
- `GET /v1/streams/{id}` with `X-Resume-Token` and `Last-Event-ID` resumes it: `resumed`, the
  messages after that seq, then live, exactly once, on any instance with Redis.
- `DELETE /v1/streams/{id}` with `X-Resume-Token` cancels it (the upstream request is closed).
- `OPTIONS`: the CORS preflight of the allowed origins.
- `GET /v1/usage` answers the caller its usage in the current budget window and what is left
  of its budget (gateway/io/accounting.py).

Each streamed response runs a `Connection` (gateway/io/connection.py) over an `SseSocket`
(gateway/io/http.py): the session, quotas, limits, flow control, resume grace and drain are the
WebSocket's own. Refusals before the stream starts are plain HTTP statuses with a JSON body
shaped like the protocol's `error`.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, Final, Protocol
from urllib.parse import unquote

import orjson
import structlog
from redis.exceptions import RedisError

from gateway.auth import AuthError, Principal, origin_allowed, query_has_token
from gateway.core.ai_sdk import UiStream, chat_start
from gateway.core.protocol import ErrorCode, ProtocolViolation
from gateway.core.session import State, Stream, move
from gateway.io.connection import Connection, GatewayPort
from gateway.io.http import AiSdkSocket, HttpExchange, HttpRequest, SseSocket, error_body

log = structlog.get_logger("gateway.http")

STREAMS_PATH: Final = "/v1/streams"
AI_SDK_PATH: Final = "/v1/ai-sdk/chat"
USAGE_PATH: Final = "/v1/usage"
#: Chats whose stream the AI SDK may reconnect to (--ai-sdk-resume), remembered per process.
MAX_CHATS: Final = 10_000
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
        #: --ai-sdk-resume: chat id -> (resume token, message id) of its latest stream, oldest
        #: first (bounded: the oldest chats are forgotten first).
        self._chats: OrderedDict[str, tuple[str, str]] = OrderedDict()

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
        if path == AI_SDK_PATH:
            return "ai_sdk", self._ai_sdk_post if method == "POST" else None
        if path == USAGE_PATH:
            return "usage", self._usage if method == "GET" else None
        if path.startswith(AI_SDK_PATH + "/") and path.endswith("/stream"):
            if method == "GET":
                return "ai_sdk_stream", self._ai_sdk_reconnect
            if method == "DELETE":
                return "ai_sdk_stream", self._ai_sdk_stop
            return "ai_sdk_stream", None
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

    # ------------------------------------------------------------------ usage

    def _usage(
        self,
        exchange: HttpExchange,
        request: HttpRequest,
        principal: Principal,
        cors: list[tuple[str, str]],
    ) -> None:
        """`GET /v1/usage`: the caller's own usage and budget (docs/security.md, "Budgets")."""

        async def answer() -> None:
            report = await self.gateway.accounting.report(principal)
            exchange.respond_json(200, report, [*cors, ("Cache-Control", "no-store")])
            self.gateway.http_counted("usage", 200)

        self.gateway.spawn_task(answer(), "GET /v1/usage")

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
        sid = unquote(request.path[len(STREAMS_PATH) + 1 :])  # `:` arrives as %3A
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

    # ------------------------------------------------------------------ the Vercel AI SDK

    def _ai_sdk_post(
        self,
        exchange: HttpExchange,
        request: HttpRequest,
        principal: Principal,
        cors: list[tuple[str, str]],
    ) -> None:
        """`useChat`'s request: its UI messages as a start, answered as a UI message stream."""
        if self.gateway.draining:
            self._refuse(
                exchange,
                "ai_sdk",
                503,
                ErrorCode.SHUTTING_DOWN,
                "the gateway is shutting down; retry on another instance",
                [*cors, ("Retry-After", "1")],
            )
            return
        try:
            body = orjson.loads(request.body)
            sid = "ai-" + secrets.token_urlsafe(9)
            start = chat_start(body, sid)
        except orjson.JSONDecodeError:
            self._refuse(
                exchange, "ai_sdk", 400, ErrorCode.BAD_JSON, "the body is not valid JSON", cors
            )
            return
        except ProtocolViolation as exc:
            self._refuse(exchange, "ai_sdk", 400, exc.code, str(exc), cors)
            return
        chat = body.get("id")
        message_id = body.get("messageId")
        if not isinstance(message_id, str) or not message_id:
            message_id = "msg-" + secrets.token_urlsafe(12)
        resume = self.gateway.config.ai_sdk_resume
        sse = AiSdkSocket(
            exchange,
            self.gateway.config.http_keepalive,
            cors,
            UiStream(message_id),
            cancel_on_drop=not resume,
        )
        if resume and isinstance(chat, str) and 0 < len(chat) <= 256:

            def remember(token: str) -> None:
                self._chats.pop(chat, None)
                self._chats[chat] = (token, message_id)
                while len(self._chats) > MAX_CHATS:
                    self._chats.popitem(last=False)

            sse.on_started = remember
        self._open(exchange, principal, cors, "ai_sdk", orjson.dumps(start), sse)

    def _active_chat(self, request: HttpRequest, principal: Principal) -> tuple[str, str] | None:
        """The running stream of the chat in the path, if this principal's."""
        chat = unquote(request.path[len(AI_SDK_PATH) + 1 : -len("/stream")])
        entry = self._chats.get(chat)
        if entry is None:
            return None
        found = self.gateway.registry.lookup(entry[0])
        if not isinstance(found, Stream) or not found.active or found.principal != principal.name:
            if not isinstance(found, Stream) or not found.active:
                del self._chats[chat]
            return None
        return entry

    def _ai_sdk_reconnect(
        self,
        exchange: HttpExchange,
        request: HttpRequest,
        principal: Principal,
        cors: list[tuple[str, str]],
    ) -> None:
        """The SDK's reconnect (`resume: true`): the whole message again, then live; 204 when
        the chat has no stream running."""
        entry = self._active_chat(request, principal) if self.gateway.config.ai_sdk_resume else None
        if entry is None:
            exchange.respond(204, cors)
            self.gateway.http_counted("ai_sdk_stream", 204)
            return
        token, message_id = entry
        sse = AiSdkSocket(
            exchange, self.gateway.config.http_keepalive, cors, UiStream(message_id), False
        )
        resume = {"type": "resume", "id": "ai-resume", "resume_token": token, "after": 0}
        self._open(exchange, principal, cors, "ai_sdk_stream", orjson.dumps(resume), sse)

    def _ai_sdk_stop(
        self,
        exchange: HttpExchange,
        request: HttpRequest,
        principal: Principal,
        cors: list[tuple[str, str]],
    ) -> None:
        """Stop in the resumable mode: the chat's stream is cancelled (204 either way)."""
        entry = self._active_chat(request, principal)
        if entry is not None:
            found = self.gateway.registry.lookup(entry[0])
            if isinstance(found, Stream):
                self._cancel(found)
        exchange.respond(204, cors)
        self.gateway.http_counted("ai_sdk_stream", 204)

    # ------------------------------------------------------------------ a streamed response

    def _open(
        self,
        exchange: HttpExchange,
        principal: Principal,
        cors: list[tuple[str, str]],
        route: str,
        message: bytes,
        sse: SseSocket | None = None,
    ) -> None:
        gateway = self.gateway
        if sse is None:
            sse = SseSocket(exchange, gateway.config.http_keepalive, cors)
        sse.on_status = lambda status: gateway.http_counted(route, status)
        transport = "ai_sdk" if isinstance(sse, AiSdkSocket) else "http"
        connection = Connection(gateway, sse, principal, transport=transport)
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
