"""Which streams can be resumed, and how much of them the process keeps. PURE: no clock.

A stream is registered under its resume token when it starts. It stays resumable while it runs
(attached to a socket, or detached during the grace after a drop) and, once ended, for the
retention period; the server's timers call `forget`. Retained output is bounded per stream and in
total: a stream whose retained size outgrows the per-stream bound is not retained after its end,
and the oldest ended streams are evicted first when the total bound is reached. A forgotten token
is remembered (bounded) as GONE, so a late resume gets `resume_unavailable` instead of a
misleading `unknown_id` (docs/protocol.md, "Resume").

Accounting cannot drift: a stream's size is measured once, when it is retained (it no longer
changes then: an ended stream takes no more text), recorded beside its token, and that recorded
size is what eviction and `forget` subtract. So `retained_bytes` is always the sum of the
recorded sizes of the retained streams, never negative, and within `max_total_bytes`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final, Generic, Protocol, TypeVar


class Retainable(Protocol):
    """What the registry needs of a stream (gateway.core.session.Stream), so that this module
    does not import the session's."""

    @property
    def resume_token(self) -> str | None: ...

    def compact(self) -> None: ...

    def retained_size(self) -> int: ...


Stream = TypeVar("Stream", bound=Retainable)


class _Gone:
    """Marker: this token's stream existed, but its output is no longer retained."""

    def __repr__(self) -> str:
        return "GONE"


GONE: Final = _Gone()
#: How many forgotten tokens are remembered as GONE by default (--resume-tombstones; about 150
#: bytes each).
TOMBSTONES: Final = 10_000


class Registry(Generic[Stream]):
    """Resume tokens -> streams, with the retention bounds (in bytes, see
    `Stream.retained_size`)."""

    __slots__ = (
        "_ended",
        "_gone",
        "_streams",
        "max_stream_bytes",
        "max_tombstones",
        "max_total_bytes",
        "retained_bytes",
    )

    def __init__(
        self,
        max_stream_bytes: int = 1 << 20,
        max_total_bytes: int = 256 << 20,
        max_tombstones: int = TOMBSTONES,
    ) -> None:
        self.max_stream_bytes = max_stream_bytes
        self.max_total_bytes = max_total_bytes
        self.max_tombstones = max_tombstones
        #: Every resumable stream, running or retained, by token.
        self._streams: dict[str, Stream] = {}
        #: Ended, retained streams' tokens, oldest first (eviction order), with the size each
        #: was retained at; `retained_bytes` is their sum.
        self._ended: OrderedDict[str, int] = OrderedDict()
        self.retained_bytes = 0
        self._gone: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def retained_streams(self) -> int:
        """Ended streams kept for a resume."""
        return len(self._ended)

    @property
    def tombstones(self) -> int:
        """Forgotten tokens remembered as GONE."""
        return len(self._gone)

    def retained(self) -> list[Stream]:
        """The ended streams kept for a resume, oldest first."""
        return [self._streams[token] for token in self._ended]

    def add(self, stream: Stream) -> None:
        if stream.resume_token is not None:
            self._streams[stream.resume_token] = stream

    def lookup(self, token: str) -> Stream | _Gone | None:
        stream = self._streams.get(token)
        if stream is not None:
            return stream
        return GONE if token in self._gone else None

    def ended(self, stream: Stream) -> bool:
        """`stream`'s relay is over. Returns whether its output stays retained (the server
        then forgets it after --resume-retention)."""
        token = stream.resume_token
        if token is None or self._streams.get(token) is not stream:
            return False
        if token in self._ended:
            return True
        stream.compact()
        size = stream.retained_size()
        if size > self.max_stream_bytes:
            self.forget(stream)
            return False
        self._ended[token] = size
        self.retained_bytes += size
        while self.retained_bytes > self.max_total_bytes:
            oldest = next(iter(self._ended))
            self.forget(self._streams[oldest])
        return token in self._ended

    def forget(self, stream: Stream) -> None:
        """Stop retaining `stream`; its token now answers GONE."""
        token = stream.resume_token
        if token is None or self._streams.get(token) is not stream:
            return
        del self._streams[token]
        size = self._ended.pop(token, None)
        if size is not None:
            self.retained_bytes -= size
        gone = self._gone
        gone[token] = None
        if len(gone) > self.max_tombstones:
            gone.popitem(last=False)
