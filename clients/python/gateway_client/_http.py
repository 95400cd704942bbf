"""The HTTP transport: the gateway's HTTP streams (docs/protocol.md, "HTTP streams") behind the
part of websockets' `ClientConnection` the client uses, so streams, cancel, parts and resume
run unchanged where a network blocks WebSocket upgrades.

A `start` becomes `POST /v1/streams` read as Server-Sent Events, a `resume` a `GET` with the
resume token and the last seq, a `cancel` a `DELETE`; every message the gateway sends arrives
through `recv()` as it would on a socket. A stream whose response breaks off closes this
"connection" as a WebSocket's network loss does (1006): the client reconnects and resumes.

Needs httpx: ``pip install 'llm-ws-gateway-client[http]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close
from websockets.protocol import State

from gateway_client._frames import PROTOCOL_VERSION, decode, dumps

try:
    import httpx
except ImportError:  # pragma: no cover - depends on the install
    httpx = None  # type: ignore[assignment]

#: The part kinds a start may ask for (what the gateway's welcome lists).
_PARTS: Final = ("reasoning", "sources", "tools", "progress")
_TERMINAL: Final = frozenset({"done", "cancelled", "error"})
#: What the HTTP transport's welcome announces (the gateway decides per request).
_MAX_STREAMS: Final = 1 << 20
_MAX_BODY: Final = 1 << 24


async def reachable(url: str, seconds: float | None) -> bool:
    """Whether the gateway's HTTP side answers (its `/healthz`) within `seconds`: worth falling
    back to."""
    if httpx is None:
        return False
    try:
        async with httpx.AsyncClient(timeout=seconds) as client:
            response = await client.get(http_base(url) + "/healthz")
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def available() -> bool:
    """Whether the HTTP transport can be used (httpx is installed)."""
    return httpx is not None


def http_base(url: str) -> str:
    """The HTTP base of a gateway's WebSocket URL: ws(s)://host/v1/ws -> http(s)://host."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.removesuffix("/").removesuffix("/v1/ws")
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class HttpConnection:
    """One "connection" of the HTTP transport: the streams it carries are HTTP requests."""

    def __init__(self, url: str, token: str | None, timeout: float | None) -> None:
        if httpx is None:
            raise RuntimeError(
                "the HTTP transport needs httpx: pip install 'llm-ws-gateway-client[http]'"
            )
        self._base = http_base(url)
        self._token = token
        # No read timeout: a stream is read for as long as it runs (the gateway sends
        # keep-alive comments while the upstream thinks).
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, read=None), headers={"Accept": "text/event-stream"}
        )
        self._inbox: asyncio.Queue[str | None] = asyncio.Queue()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._others: set[asyncio.Task[None]] = set()
        self._tokens: dict[str, str] = {}
        self.state = State.OPEN
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._closed = asyncio.Event()
        #: A first `auth` (before anything else) is the welcome's, as on a socket.
        self._answered_auth = False
        self._deliver(
            {
                "type": "welcome",
                "protocol": PROTOCOL_VERSION,
                "session": "http",
                "transport": "http",
                # No socket limits of its own: each stream is one request, held to the
                # gateway's limits there (a body over --max-message-bytes is refused, 413).
                "limits": {"max_streams": _MAX_STREAMS, "max_message_bytes": _MAX_BODY},
                "parts": list(_PARTS),
            }
        )

    # ---------------------------------------------------------------- what the client calls

    async def send(self, message: str) -> None:
        if self.state is not State.OPEN:
            raise ConnectionClosedOK(Close(self.close_code or 1000, ""), None)
        frame = decode(message)
        kind = frame.get("type")
        if kind != "auth":
            self._answered_auth = True
        if kind == "ping":
            self._deliver({"type": "pong"})
        elif kind == "auth":
            self._token = frame.get("token")
            if self._answered_auth:  # a refresh; the first auth is answered by the welcome
                self._deliver({"type": "authenticated", "expires_at": None})
            self._answered_auth = True
        elif kind == "start":
            sid = frame["id"]
            body = {k: v for k, v in frame.items() if k != "type"}
            self._run(sid, "POST", "/v1/streams", json=body)
        elif kind == "resume":
            sid = frame["id"]
            self._tokens[sid] = frame["resume_token"]
            headers = {
                "X-Resume-Token": frame["resume_token"],
                "Last-Event-ID": str(frame.get("after", 0)),
            }
            self._run(sid, "GET", f"/v1/streams/{quote(sid, safe='')}", headers=headers)
        elif kind == "cancel":
            self._spawn_other(self._cancel(frame["id"]))
        else:
            self._deliver(
                {
                    "type": "error",
                    "id": None,
                    "code": "unknown_type",
                    "message": f"unknown type {kind!r}",
                    "retryable": False,
                }
            )

    async def recv(self) -> str:
        message = await self._inbox.get()
        if message is None:
            self._inbox.put_nowait(None)  # every later recv() sees the close too
            raise self._closed_error()
        return message

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        while True:
            try:
                yield await self.recv()
            except ConnectionClosedOK:
                return

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self._shut(code, reason)
        tasks = [*self._tasks.values(), *self._others]
        for task in self._tasks.values():
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self._http.aclose()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # ---------------------------------------------------------------- internals

    def _closed_error(self) -> ConnectionClosedOK | ConnectionClosedError:
        close = Close(self.close_code or 1000, self.close_reason or "")
        if close.code == 1000:
            return ConnectionClosedOK(close, None)
        return ConnectionClosedError(close, None)

    def _deliver(self, message: dict[str, Any]) -> None:
        if self.state is State.OPEN:
            self._inbox.put_nowait(dumps(message))

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _run(self, sid: str, method: str, path: str, **kwargs: Any) -> None:
        task = asyncio.get_running_loop().create_task(
            self._stream(sid, method, path, **kwargs), name=f"gateway_client http {sid}"
        )
        self._tasks[sid] = task
        task.add_done_callback(lambda done: self._forget(sid, done))

    def _forget(self, sid: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(sid) is task:
            del self._tasks[sid]

    def _spawn_other(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name="gateway_client http cancel")
        self._others.add(task)
        task.add_done_callback(self._others.discard)

    async def _stream(self, sid: str, method: str, path: str, **kwargs: Any) -> None:
        assert httpx is not None
        headers = self._headers(kwargs.pop("headers", None))
        ended = False
        try:
            async with self._http.stream(
                method, self._base + path, headers=headers, **kwargs
            ) as response:
                if response.status_code >= 400:
                    await self._refused(sid, response)
                    return
                async for data in _sse_data(response.aiter_lines()):
                    message = decode(data)
                    if message.get("type") == "started" and "resume_token" in message:
                        self._tokens[sid] = message["resume_token"]
                    self._deliver(message)
                    if message.get("type") in _TERMINAL:
                        ended = True
        except asyncio.CancelledError:
            raise
        except httpx.HTTPError:
            pass  # the request failed or its response broke off
        if not ended and self.state is State.OPEN:
            self._shut(1006, "a stream's response broke off")

    async def _refused(self, sid: str, response: Any) -> None:
        await response.aread()
        try:
            error = decode(response.content)
        except ValueError:
            error = None
        if not isinstance(error, dict):
            error = {
                "code": "internal" if response.status_code >= 500 else "bad_message",
                "message": f"HTTP {response.status_code}",
                "retryable": response.status_code >= 500,
            }
        retry_after = response.headers.get("Retry-After")
        if retry_after and retry_after.isdigit() and "retry_after_ms" not in error:
            error["retry_after_ms"] = int(retry_after) * 1000
        self._deliver({**error, "type": "error", "id": sid})

    async def _cancel(self, sid: str) -> None:
        """DELETE the stream; its open response then ends with `cancelled`."""
        assert httpx is not None
        token = self._tokens.get(sid)
        if token is None:
            return
        with contextlib.suppress(httpx.HTTPError):
            response = await self._http.delete(
                f"{self._base}/v1/streams/{quote(sid, safe='')}",
                headers=self._headers({"X-Resume-Token": token}),
            )
            if response.status_code == 404:
                self._deliver(
                    {
                        "type": "error",
                        "id": sid,
                        "code": "unknown_id",
                        "message": "no such stream",
                        "retryable": False,
                    }
                )

    def _shut(self, code: int, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.close_code, self.close_reason = code, reason
        self._inbox.put_nowait(None)
        current = asyncio.current_task()
        for task in self._tasks.values():
            if task is not current:
                task.cancel()
        self._closed.set()


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each Server-Sent Event (`event:` and `id:` repeat what the JSON says)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
