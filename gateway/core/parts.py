"""Typed answer parts besides text: what a client may ask for, and where a dialect puts them.

PURE module. A client names the kinds it wants in `start.parts` (protocol.md, "Parts"); text is
always sent. A dialect's translator turns upstream events into answer text (the value `feed`
returns: the hot path) and into parts, which it hands to a `PartSink` (the stream) as soon as
each is complete. Every content message of a stream, text or part, takes the next `seq`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Protocol

#: The kinds a client may ask for besides text, in the order `welcome` lists them.
PART_KINDS: Final = ("reasoning", "sources", "tools", "progress")
KNOWN_PARTS: Final = frozenset(PART_KINDS)

#: Kinds of a progress step (`progress.step.kind`).
STEP_KINDS: Final = frozenset({"search", "fetch", "code", "thought", "other"})

#: finish_reason values after normalisation (protocol.md, "done").
FINISH_REASONS: Final = frozenset({"stop", "length", "tool_calls", "content_filter"})


class PartSink(Protocol):
    """Where a translator puts what it finds (implemented by `session.Stream`). Each method is
    called only for a kind the client asked for."""

    def push_reasoning(self, text: str) -> None:
        """A reasoning delta (coalesced like text into `reasoning_chunk` messages)."""

    def push_sources(self, sources: list[dict[str, Any]]) -> None:
        """Sources not sent before in this stream, each `{"index", "url", "title"?, "snippet"?,
        "date"?}`, `index` being the 1-based number the answer's `[n]` markers use."""

    def push_tool_call(self, call: dict[str, Any]) -> None:
        """One complete tool call: `{"call_id", "name", "arguments": {...}}`, or
        `"arguments_raw": "..."` when its arguments are not a JSON object."""

    def push_progress(self, step: dict[str, Any]) -> None:
        """One step of the upstream's own work: `{"kind": one of STEP_KINDS, ...}`."""


@dataclass(frozen=True, slots=True)
class PartLimits:
    """Bounds on what one stream's parts may hold (flags of the same names)."""

    #: Reasoning text per stream, in UTF-8 bytes; over it the stream fails
    #: (`upstream_protocol_error`).
    max_reasoning_bytes: int = 1 << 20
    #: One tool call's arguments, in bytes; over it the stream fails.
    max_tool_args_bytes: int = 256 << 10
    #: Distinct sources per stream; further ones are dropped (and counted).
    max_sources: int = 200


class NullSink:
    """A sink that keeps nothing (a client that asked for no parts)."""

    __slots__ = ()

    def push_reasoning(self, text: str) -> None:
        return None

    def push_sources(self, sources: list[dict[str, Any]]) -> None:
        return None

    def push_tool_call(self, call: dict[str, Any]) -> None:
        return None

    def push_progress(self, step: dict[str, Any]) -> None:
        return None


NULL_SINK: Final = NullSink()
