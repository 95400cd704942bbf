"""The benchmark's upstream (fast=1, bench/ and ``make bench``): pre-rendered events, and one
timer that paces every rate=R stream.

`_FastRender` cuts a dialect's text event once into prefix + text + suffix, so a chunk costs one
bytes concatenation; `_Pacer` writes each paced stream's due chunks straight to its transport from
one shared timer (a heap of due times), instead of a sleeping task per stream. The server
(`MockUpstream._stream_fast`) starts them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from typing import Final, Protocol

from gateway.mock.formats import _FORMATTERS, StreamSpec
from gateway.mock.formats.base import _dumps


class _Counted(Protocol):
    """What a paced job counts on its request's record (`gateway.mock.server.RequestRecord`,
    which imports this module: a Protocol, not an import)."""

    chunks_sent: int
    bytes_sent: int


#: fast=1 without rate: bytes of pre-rendered events per write (one await per batch, and one
#: yield to the other requests after it, instead of one per chunk).
FAST_BATCH_BYTES: Final = 64 * 1024
#: fast=1 with rate: a pacer tick also writes the chunks due within this many seconds.
PACER_SLACK: Final = 0.0005
_MARK: Final = "\x01"


class _FastRender:
    """The pre-rendered events of one fast=1 stream.

    A text event is prefix + JSON-escaped text + suffix, cut once from the dialect's formatter,
    so a chunk costs one bytes concatenation (plain chunks are cached per distinct piece, and a
    stamped one is a small f-string). The preamble and the finale come from the formatter as is.
    """

    def __init__(self, spec: StreamSpec) -> None:
        fmt = _FORMATTERS[spec.dialect](spec)
        marked = fmt.text(_MARK)
        fmt.text_parts.clear()
        self.prefix, self.suffix = marked.split(_dumps(_MARK)[1:-1])
        self.fmt = fmt
        self.stamp = spec.knobs.stamp
        self.preamble = b"".join(fmt.preamble())
        self._cache: dict[str, bytes] = {}
        #: Every chunk's text so far (the finale's usage count and `done` text).
        self.texts: list[str] = []

    def text(self, piece: str, stamp_ns: int) -> bytes:
        if self.stamp:
            text = f"@{stamp_ns};{piece}"
            self.texts.append(text)
            return self.prefix + _dumps(text)[1:-1] + self.suffix
        self.texts.append(piece)
        event = self._cache.get(piece)
        if event is None:
            event = self._cache[piece] = self.prefix + _dumps(piece)[1:-1] + self.suffix
        return event

    def finale(self) -> bytes:
        self.fmt.text_parts = self.texts
        return b"".join(data for data, _paced in self.fmt.finale())


def _http_chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunked-encoding frame (the pacer writes to the transport itself)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class _PacedJob:
    """One fast=1 rate=R stream: chunk i is due at t0 + i/R (monotonic seconds)."""

    __slots__ = ("done", "fast", "finished", "next_due", "pieces", "rate", "rec", "sent", "t0")

    def __init__(
        self, fast: _FastRender, pieces: tuple[str, ...], rate: float, rec: _Counted
    ) -> None:
        self.fast = fast
        self.pieces = pieces
        self.rate = rate
        self.rec = rec
        self.t0 = time.monotonic()
        self.next_due = self.t0
        self.sent = 0
        self.finished = False
        #: Resolved when the last event is written, or failed when the client is gone.
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def run(self, now: float, transport: asyncio.Transport | None) -> None:
        """Write every chunk due by `now` (at least one: it is called when one is due) and,
        after the last, the finale, as one chunked-encoding frame."""
        # (No isinstance check: uvloop's transports are not asyncio.Transport subclasses.)
        if transport is None or transport.is_closing():
            self.finish(ConnectionResetError("the client went away"))
            return
        total = len(self.pieces)
        due = min(total, max(self.sent + 1, math.floor((now - self.t0) * self.rate + 1e-6) + 1))
        stamp = time.monotonic_ns()
        fast, pieces = self.fast, self.pieces
        events = [fast.text(pieces[i], stamp) for i in range(self.sent, due)]
        self.rec.chunks_sent += due - self.sent
        self.sent = due
        if due == total:
            events.append(fast.finale())
        data = b"".join(events)
        self.rec.bytes_sent += len(data)
        transport.write(_http_chunk(data))
        if due == total:
            self.finish(None)
        else:
            self.next_due = self.t0 + due / self.rate

    def finish(self, exc: BaseException | None) -> None:
        self.finished = True
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)


class _Pacer:
    """One timer for every paced fast=1 stream: each tick writes whatever is due (a heap of
    (due time, job)), so pacing costs ticks rather than a sleeping task per stream."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _PacedJob, asyncio.Transport | None]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = math.inf

    def add(self, job: _PacedJob, transport: asyncio.Transport | None) -> None:
        """Write the first chunk now, then schedule the rest."""
        job.run(job.t0, transport)
        if not job.finished:
            heapq.heappush(self._heap, (job.next_due, next(self._order), job, transport))
            self._arm()

    def _arm(self) -> None:
        heap = self._heap
        while heap and heap[0][2].finished:
            heapq.heappop(heap)
        if not heap:
            return
        due = heap[0][0]
        if self._timer is not None:
            if self._armed_for <= due:
                return
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._armed_for = due
        # The loop's clock may be coarser (uvloop: 1 ms); the wait is from time.monotonic().
        self._timer = loop.call_at(loop.time() + max(0.0, due - time.monotonic()), self._tick)

    def _tick(self) -> None:
        self._timer, self._armed_for = None, math.inf
        heap = self._heap
        now = time.monotonic()
        limit = now + PACER_SLACK
        while heap and heap[0][0] <= limit:
            _, _, job, transport = heapq.heappop(heap)
            if job.finished:
                continue
            job.run(max(now, job.next_due), transport)
            if not job.finished:
                heapq.heappush(heap, (job.next_due, next(self._order), job, transport))
        self._arm()
