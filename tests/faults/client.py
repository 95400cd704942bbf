"""A protocol-v1 WebSocket client for the suite, and the per-stream invariant check.

The client reads in a background task and files every frame under its stream id, so a scenario
can send (start, cancel, ping) while frames arrive, abort its TCP connection, or stop reading at
the transport level (`pause`) to play a client that is slow or dead.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

Frame = dict[str, Any]
TextRule = Literal["exact", "prefix", "any"]

#: Linux's TCP state after a reset (include/net/tcp_states.h; ESTABLISHED is 1, CLOSE_WAIT 8).
TCP_CLOSE = 7


def tcp_state(sock: Any) -> int:
    """The kernel's TCP state of a socket (the first byte of struct tcp_info): CLOSE once the
    peer reset the connection, CLOSE_WAIT after its FIN, ESTABLISHED while it holds on."""
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0])


def is_terminal(frame: Frame) -> bool:
    """done, cancelled, or an error that carries `seq` (protocol.md, "Errors")."""
    return frame.get("type") in ("done", "cancelled") or (
        frame.get("type") == "error" and "seq" in frame
    )


def terminal_kind(frame: Frame) -> str:
    """ "done", "cancelled" or the error code of a terminal frame."""
    return str(frame["code"]) if frame.get("type") == "error" else str(frame.get("type"))


@dataclass(frozen=True, slots=True)
class Expect:
    """How one stream must end.

    `terminal` is "done", "cancelled" or an error code (a tuple allows any of several, e.g. a
    cancel racing the end). `text`: "exact" = the mock's whole answer, "prefix" = a prefix of
    it (the chunks sent before a fault stand), "any". `within`: seconds after the start by
    which the terminal must have arrived; later is a hang.
    """

    terminal: str | tuple[str, ...]
    retryable: bool | None = None
    status: int | None = None
    text: TextRule = "any"
    max_seq: int | None = None
    message_excludes: tuple[str, ...] = ()
    within: float = 5.0

    @property
    def allowed(self) -> tuple[str, ...]:
        return (self.terminal,) if isinstance(self.terminal, str) else self.terminal


def check_stream(frames: list[Frame], expect: Expect | None, full_text: str | None) -> list[str]:
    """Every way `frames` (one stream's, in wire order) break protocol v1 or `expect`."""
    problems: list[str] = []
    if not frames:
        return ["no frame at all"]
    if frames[0].get("type") != "started":
        problems.append(f"first frame is {frames[0].get('type')!r}, not started")
    terminals = [f for f in frames if is_terminal(f)]
    if len(terminals) != 1:
        problems.append(f"{len(terminals)} terminal frames")
    if not terminals:
        return problems
    if not is_terminal(frames[-1]):
        problems.append(f"a {frames[-1].get('type')} frame follows the terminal")
    strays = [f for f in frames if f.get("type") == "error" and "seq" not in f]
    if strays:
        problems.append(f"unexpected error for the id: {strays[0].get('code')}")
    chunks = [f for f in frames if f.get("type") == "text_chunk"]
    seqs = [c.get("seq") for c in chunks]
    if seqs != list(range(1, len(chunks) + 1)):
        problems.append(f"seqs not contiguous from 1: {seqs[:8]}...")
    end = terminals[0]
    if end.get("seq") != len(chunks):
        problems.append(f"terminal seq {end.get('seq')} != {len(chunks)} chunks")
    text = "".join(str(c.get("text", "")) for c in chunks)
    if end.get("type") == "done" and end.get("text") != text:
        problems.append("done.text differs from the chunks")
    if expect is None:
        return problems
    kind = terminal_kind(end)
    if kind not in expect.allowed:
        detail = f" ({end.get('message')})" if end.get("type") == "error" else ""
        problems.append(f"ended {kind}{detail}, expected {' or '.join(expect.allowed)}")
        return problems
    if expect.retryable is not None and end.get("retryable") is not expect.retryable:
        problems.append(f"retryable={end.get('retryable')}, expected {expect.retryable}")
    if expect.status is not None and end.get("status") != expect.status:
        problems.append(f"status={end.get('status')}, expected {expect.status}")
    if expect.max_seq is not None and len(chunks) > expect.max_seq:
        problems.append(f"{len(chunks)} chunks, expected at most {expect.max_seq}")
    message = str(end.get("message", ""))
    for needle in expect.message_excludes:
        if needle.lower() in message.lower():
            problems.append(f"message contains {needle!r}: {message[:80]!r}")
    if full_text is not None and (kind == "done" or expect.text == "prefix"):
        rule = "exact" if kind == "done" and expect.text != "prefix" else expect.text
        if rule == "exact" and text != full_text:
            problems.append(f"text is not the whole answer ({len(text)}/{len(full_text)} chars)")
        elif rule == "prefix" and not full_text.startswith(text):
            problems.append(f"text is not a prefix of the answer: {text[:40]!r}")
    return problems


class WsClient:
    """One WebSocket to the gateway, read in the background (see the module docstring)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: Frame = {}
        self.frames: defaultdict[str | None, list[Frame]] = defaultdict(list)
        self.log: list[Frame] = []
        self.pongs = 0
        self.closed_at: float | None = None
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        sock: socket.socket | None = None,
        max_queue: int = 16,
        timeout: float = 5.0,
    ) -> WsClient:
        """Connect and wait for `welcome`. Client pings are off: only the gateway pings."""
        ws = await connect(
            url,
            sock=sock,
            ping_interval=None,
            max_queue=max_queue,
            open_timeout=timeout,
            close_timeout=2,
            compression=None,
            # As the Python client: a client far behind gets chunks up to about the send
            # buffer (1 MiB) and a `done` carries the whole answer (docs/protocol.md).
            max_size=1 << 24,
        )
        client = cls(ws)
        client._reader = asyncio.get_running_loop().create_task(
            client._read(), name="faults client reader"
        )
        if not await client.wait_for(lambda: bool(client.log), timeout):
            await client.abort()
            raise TimeoutError("no welcome frame")
        client.welcome = client.log[0]
        return client

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame: Frame = orjson.loads(raw)
                if frame.get("type") == "pong":
                    self.pongs += 1
                self.frames[frame.get("id")].append(frame)
                self.log.append(frame)
                self._pulse()
        except ConnectionClosed:
            pass
        finally:
            self.closed_at = time.monotonic()
            self._pulse()

    def _pulse(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    @property
    def close_code(self) -> int | None:
        """The close code received (1006 when the connection died without a close frame)."""
        return self.ws.close_code

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` holds (re-checked on every frame and on close)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return predicate()
        return True

    async def send(self, obj: Any) -> None:
        await self.ws.send(orjson.dumps(obj).decode())

    async def start(self, sid: str, prompt: str, **fields: Any) -> None:
        await self.send({"type": "start", "id": sid, "prompt": prompt, **fields})

    async def cancel(self, sid: str) -> None:
        await self.send({"type": "cancel", "id": sid})

    def terminal(self, sid: str, since: int = 0) -> Frame | None:
        """`sid`'s terminal frame among its frames from index `since` (ids can be reused)."""
        for frame in self.frames.get(sid, [])[since:]:
            if is_terminal(frame):
                return frame
        return None

    def count(self, sid: str, kind: str, since: int = 0) -> int:
        return sum(1 for f in self.frames.get(sid, [])[since:] if f.get("type") == kind)

    async def wait_frame(
        self, sid: str, kinds: tuple[str, ...], timeout: float, since: int = 0
    ) -> bool:
        """Wait until `sid` has a frame of one of these types (from index `since`)."""
        return await self.wait_for(
            lambda: any(f.get("type") in kinds for f in self.frames.get(sid, [])[since:]),
            timeout,
        )

    async def wait_terminals(
        self, sids: Iterable[str], timeout: float, since: dict[str, int] | None = None
    ) -> list[str]:
        """Wait for every stream's terminal frame; return the ids still without one."""
        ids = list(sids)
        offsets = since or {}

        def missing() -> list[str]:
            return [s for s in ids if self.terminal(s, offsets.get(s, 0)) is None]

        await self.wait_for(lambda: not missing(), timeout)
        return missing()

    async def barrier(self, timeout: float = 5.0) -> bool:
        """Send a ping and wait for its pong: the gateway has handled everything sent before
        (frames are handled in order), so any answer to them has arrived."""
        target = self.pongs + 1
        await self.send({"type": "ping"})
        return await self.wait_for(lambda: self.pongs >= target, timeout)

    def tcp_state(self) -> int:
        """This socket's kernel TCP state (see `tcp_state`)."""
        return tcp_state(self.ws.transport.get_extra_info("socket"))

    def pause(self) -> None:
        """Stop reading the socket (the kernel buffer fills, pings go unanswered)."""
        self.ws.transport.pause_reading()

    def resume(self) -> None:
        self.ws.transport.resume_reading()

    async def abort(self) -> None:
        """Drop the TCP connection without a close frame (RST), as a crashed client does."""
        self.ws.transport.abort()
        await self._join(2.0)

    async def close(self, timeout: float = 3.0) -> None:
        """A normal close handshake (aborting if it does not complete in time)."""
        if not self.closed:
            try:
                await asyncio.wait_for(self.ws.close(), timeout)
            except (TimeoutError, ConnectionClosed, OSError):
                self.ws.transport.abort()
        await self._join(timeout)

    async def _join(self, timeout: float) -> None:
        if self._reader is None:
            return
        if not self._reader.done():
            await asyncio.wait([self._reader], timeout=timeout)
        if not self._reader.done():
            self._reader.cancel()
            await asyncio.wait([self._reader])
