"""Which streams can be resumed, and how much of them the process keeps. PURE: no clock.

A stream is registered under its resume token when it starts. It stays resumable while it runs
(attached to a socket, or detached during the grace after a drop) and, once ended, for the
retention period; the server's timers call `forget`. Retained output is bounded per stream and in
total: a stream whose answer outgrows the per-stream bound is not retained after its end, and the
oldest ended streams are evicted first when the total bound is reached. A forgotten token is
remembered (bounded) as GONE, so a late resume gets `resume_unavailable` instead of a misleading
`unknown_id` (docs/protocol.md, "Resume").
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from gateway.session import Stream


class _Gone:
    """Marker: this token's stream existed, but its output is no longer retained."""

    def __repr__(self) -> str:
        return "GONE"


GONE: Final = _Gone()
#: How many forgotten tokens are remembered as GONE.
TOMBSTONES: Final = 10_000


class Registry:
    """Resume tokens -> streams, with the retention bounds."""

    def __init__(self, max_stream_chars: int = 1 << 20, max_total_chars: int = 256 << 20) -> None:
        self.max_stream_chars = max_stream_chars
        self.max_total_chars = max_total_chars
        self._streams: dict[str, Stream] = {}
        #: Ended, retained streams, oldest first (eviction order), and their total size.
        self._ended: OrderedDict[str, Stream] = OrderedDict()
        self.retained_chars = 0
        self._gone: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: Stream) -> None:
        if stream.resume_token is not None:
            self._streams[stream.resume_token] = stream

    def lookup(self, token: str) -> Stream | _Gone | None:
        stream = self._streams.get(token)
        if stream is not None:
            return stream
        return GONE if token in self._gone else None

    def ended(self, stream: Stream) -> bool:
        """`stream` produced its terminal frame. Returns whether it stays retained (the server
        then forgets it after --resume-retention)."""
        token = stream.resume_token
        if token is None or token not in self._streams:
            return False
        if stream.text_len > self.max_stream_chars:
            self.forget(stream)
            return False
        if token not in self._ended:
            self._ended[token] = stream
            self.retained_chars += stream.text_len
        while self.retained_chars > self.max_total_chars and self._ended:
            _, oldest = next(iter(self._ended.items()))
            self.forget(oldest)
        return token in self._ended

    def forget(self, stream: Stream) -> None:
        """Stop retaining `stream`; its token now answers GONE."""
        token = stream.resume_token
        if token is None or self._streams.get(token) is not stream:
            return
        del self._streams[token]
        if self._ended.pop(token, None) is not None:
            self.retained_chars -= stream.text_len
        self._gone[token] = None
        if len(self._gone) > TOMBSTONES:
            self._gone.popitem(last=False)
