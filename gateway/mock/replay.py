"""Replaying real recorded streams (``transcript=NAME``), and cutting any body into writes
(``split=``).

The transcripts stay where they are (``reference/transcripts/``, outside the repository): the
server is given their directory (``MockUpstream(transcripts_dir=...)``, ``mock-upstream
--transcripts DIR``) and a name is looked up in that directory's listing, so no path is ever
built from a prompt. A name's ``.sse`` file, where one exists, is the byte-exact HTTP body and is
sent as it is. Otherwise the body is built from its ``.jsonl`` by the replay rules of the
directory's INDEX.md: each line is one ``data:`` payload, its bytes verbatim (an event+data line,
``{"event":NAME,"data":PAYLOAD}``, gives its event name and the PAYLOAD bytes as written), framed
as its provider frames a stream (`FRAMINGS`, chosen by the file name's prefix):

=====================================  ======  ========  ========  ============================
file name prefix                       EOL     event:    [DONE]    evidence
=====================================  ======  ========  ========  ============================
openai-chat                            LF      no        yes       the 6 openai-python ``.sse``
azure-openai-chat, deepseek-chat,      LF      no        yes       OpenAI-compatible chat; the
xai-chat, mistral-chat, groq-chat                                  providers document the
                                                                   ``data: [DONE]`` end
perplexity-chat                        CRLF    no        no        upstream-formats.md 1a
                                                                   (#209, onit#113): CRLF, EOF
anthropic-messages                     LF      = type    no        the 2 anthropic-sdk ``.sse``
openai-responses, xai-responses        LF      = type    no        INDEX.md: name = ``type``,
                                                                   ends at response.completed
google-gemini, google-vertex           CRLF    no        no        Gemini/Vertex ``alt=sse``
                                                                   frames end in CRLF
(anything else)                        LF      event+data files only   no
=====================================  ======  ========  ========  ============================

A replay is planned as the scripted streams are (`Emit`/`Fault` steps, one per event), so
``delay_ms``, ``keepalive_ms``, ``fault=reset|stall|eof|endless after=K`` (K events),
``linger_ms``, ``status`` and ``split`` work on it as on any stream.

`Splitter` cuts a body into writes at fixed or seeded random sizes, across event boundaries:
the server writes each piece on its own.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

import orjson

from gateway.mock.formats import Emit, Fault, Step
from gateway.mock.knobs import DirectiveError, Knobs, Split

# --------------------------------------------------------------------------------------------
# Framing: how each provider writes a stream
# --------------------------------------------------------------------------------------------


class Framing(NamedTuple):
    """How a provider frames its stream: line ending, ``event:`` lines named after the
    payload's ``type``, and a ``data: [DONE]`` last event."""

    eol: bytes
    named: bool
    done: bool


_CHAT: Final = Framing(b"\n", named=False, done=True)
_TYPED: Final = Framing(b"\n", named=True, done=False)
_CRLF_PLAIN: Final = Framing(b"\r\n", named=False, done=False)

#: File name prefix -> framing (see the module docstring for the evidence of each).
FRAMINGS: Final = {
    "openai-chat": _CHAT,
    "azure-openai-chat": _CHAT,
    "deepseek-chat": _CHAT,
    "xai-chat": _CHAT,
    "mistral-chat": _CHAT,
    "groq-chat": _CHAT,
    "perplexity-chat": _CRLF_PLAIN,
    "anthropic-messages": _TYPED,
    "openai-responses": _TYPED,
    "xai-responses": _TYPED,
    "google-gemini": _CRLF_PLAIN,
    "google-vertex": _CRLF_PLAIN,
}
#: An unknown provider: the INDEX.md default (``data:`` lines, LF, no ``[DONE]``).
DEFAULT_FRAMING: Final = Framing(b"\n", named=False, done=False)


def framing_for(name: str) -> Framing:
    """The framing of transcript `name` (its longest known prefix)."""
    for prefix in sorted(FRAMINGS, key=len, reverse=True):
        if name.startswith(prefix + "-") or name == prefix:
            return FRAMINGS[prefix]
    return DEFAULT_FRAMING


_EVENT_DATA_PREFIX: Final = b'{"event":'
_DATA_KEY: Final = b',"data":'


def _event_and_data(line: bytes) -> tuple[str, bytes] | None:
    """(event name, PAYLOAD bytes verbatim) of an event+data line, or None for a plain payload.

    INDEX.md: "take the text from just after "data": up to the line's final }"."""
    if not line.startswith(_EVENT_DATA_PREFIX):
        return None
    wrapper = orjson.loads(line)
    if not isinstance(wrapper, dict) or set(wrapper) != {"event", "data"}:
        return None
    name = wrapper["event"]
    start = line.index(_DATA_KEY, len(_EVENT_DATA_PREFIX) + len(orjson.dumps(name)))
    payload = line[start + len(_DATA_KEY) : -1]
    if not line.endswith(b"}") or orjson.loads(payload) != wrapper["data"]:
        raise ValueError(f"not an event+data line: {line[:80]!r}")
    return str(name), payload


def events_from_jsonl(raw: bytes, framing: Framing) -> list[bytes]:
    """The SSE events of a json-lines transcript, framed as its provider frames them."""
    eol = framing.eol
    events: list[bytes] = []
    for line in raw.split(b"\n"):
        line = line.removesuffix(b"\r")
        if not line:
            continue
        named = _event_and_data(line)
        if named is not None:
            name, payload = named
        else:
            payload = line
            name = None
            if framing.named:
                parsed = orjson.loads(payload)
                if isinstance(parsed, dict) and isinstance(parsed.get("type"), str):
                    name = parsed["type"]
        head = b"event: " + name.encode() + eol if name is not None else b""
        events.append(head + b"data: " + payload + eol + eol)
    if framing.done:
        events.append(b"data: [DONE]" + eol + eol)
    return events


def events_from_sse(body: bytes) -> list[bytes]:
    """A byte-exact body cut after each blank line (the last event may be unterminated):
    the pieces join back to `body` exactly."""
    sep = b"\r\n\r\n" if b"\r\n" in body else b"\n\n"
    events: list[bytes] = []
    start = 0
    while start < len(body):
        end = body.find(sep, start)
        end = len(body) if end < 0 else end + len(sep)
        events.append(body[start:end])
        start = end
    return events


# --------------------------------------------------------------------------------------------
# The transcripts directory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transcript:
    """One recorded stream, ready to send: its events, which join to the body."""

    name: str
    events: tuple[bytes, ...]
    #: Whether the body is the recorded ``.sse`` itself (else built from the ``.jsonl``).
    exact: bool

    @property
    def body(self) -> bytes:
        return b"".join(self.events)

    @property
    def eol(self) -> bytes:
        """The body's line ending (for heartbeats sent while the replay waits)."""
        return b"\r\n" if self.events and b"\r\n" in self.events[0] else b"\n"


_SUFFIXES: Final = (".sse", ".jsonl")


class TranscriptLibrary:
    """The transcripts of one directory, by name (a file name without extension).

    Names are matched against the directory's listing, never joined into a path: a name with a
    separator or ``..`` cannot name a file outside it. Files are read on each request (a few
    hundred KiB at most; a replaced file is picked up)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise NotADirectoryError(f"transcripts directory {str(self.directory)!r} not found")

    def files(self) -> dict[str, dict[str, Path]]:
        """name -> {suffix: path} for every ``.sse`` and ``.jsonl`` file."""
        found: dict[str, dict[str, Path]] = {}
        for entry in self.directory.iterdir():
            if entry.suffix in _SUFFIXES and entry.is_file():
                found.setdefault(entry.stem, {})[entry.suffix] = entry
        return found

    def names(self) -> list[str]:
        return sorted(self.files())

    def load(self, name: str) -> Transcript:
        """The transcript `name`; DirectiveError (a 400 naming the knob) if there is none."""
        try:
            files = self.files()
        except OSError as exc:
            raise DirectiveError(
                "transcript", f"transcripts directory {str(self.directory)!r}: {exc}"
            ) from exc
        if name not in files:
            known = ", ".join(sorted(files)[:60]) or "none"
            raise DirectiveError(
                "transcript",
                f"unknown transcript {name!r} in {str(self.directory)!r} (known: {known})",
            )
        paths = files[name]
        if ".sse" in paths:
            return Transcript(name, tuple(events_from_sse(paths[".sse"].read_bytes())), True)
        raw = paths[".jsonl"].read_bytes()
        try:
            events = events_from_jsonl(raw, framing_for(name))
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            raise DirectiveError("transcript", f"transcript {name!r} is malformed: {exc}") from exc
        return Transcript(name, tuple(events), False)


def no_library(name: str) -> DirectiveError:
    """The error for transcript= on a server started without a transcripts directory."""
    return DirectiveError(
        "transcript",
        f"transcript={name} needs a transcripts directory: start the mock with "
        "MockUpstream(transcripts_dir=...) or `python -m gateway mock-upstream --transcripts DIR`",
    )


def plan_replay(transcript: Transcript, knobs: Knobs) -> Iterator[Step]:
    """The steps of a replay: each event paced (counted in ``chunks_sent``), then the fault
    after K events if one is asked."""
    events = transcript.events
    fault_at = min(knobs.after, len(events)) if knobs.fault is not None else -1
    for i in range(len(events) + 1):
        if i == fault_at and knobs.fault in ("reset", "stall", "eof", "endless"):
            yield Fault(knobs.fault)
            return
        if i < len(events):
            yield Emit(events[i], paced=True, kind="text")


# --------------------------------------------------------------------------------------------
# Cutting a body into writes
# --------------------------------------------------------------------------------------------

#: split=random:SEED draws each write's size as randint(1, 2**randint(0, 9)): 1 to 512 bytes,
#: mostly small, so tags and multi-byte characters are cut often and events still share writes.
_RANDOM_MAX_EXP: Final = 9


class Splitter:
    """Cuts a stream's bytes into writes (``split=``): what it is fed comes out in pieces of
    the asked sizes, the remainder waiting for the next feed (so a write can end one event
    and start the next) until `flush`. The same body gives the same pieces however it is
    fed, unless a flush intervenes."""

    def __init__(self, split: Split) -> None:
        self._fixed = split.size
        self._rng = random.Random(split.seed)
        self._buffer = b""
        self._next = self._draw()

    def _draw(self) -> int:
        if self._fixed is not None:
            return self._fixed
        return self._rng.randint(1, 1 << self._rng.randint(0, _RANDOM_MAX_EXP))

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data
        pieces: list[bytes] = []
        start = 0
        while len(buffer) - start >= self._next:
            pieces.append(buffer[start : start + self._next])
            start += self._next
            self._next = self._draw()
        self._buffer = buffer[start:]
        return pieces

    def flush(self) -> bytes:
        """What is left (shorter than the next piece); the next piece size is kept."""
        rest, self._buffer = self._buffer, b""
        return rest
