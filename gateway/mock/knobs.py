"""The ``[[mock ...]]`` directive (pure): the knobs a test turns for one request.

A directive in the last user message, ``[[mock chunks=3 fault=reset after=1 tag=x]]``, is cut out
of the question and read into `Knobs`; unknown keys or useless combinations raise
`DirectiveError`, which the server answers 400 naming the key.

Knobs: chunks, delay_ms, header_delay_ms, status (+ body=json|html|text, retry_after; underscores
become spaces; times=N with tag= errs only on the first N requests of that tag),
fault=reset|stall|malformed|eof|giant|endless (+ after=K, size=BYTES for giant), keepalive_ms
(``: ping`` comments while a started stream waits), ignore_close=1 (keep writing after the client
left), linger_ms (wait before ending the body), words=N (words per chunk), crlf=0|1, bytewise=1,
done=0|1, finish=0, comments=1, tag. Benchmarks: fast=1 (+ rate=R, stamp=1). See `Knobs`.

Which knobs a wire format cannot honour (finish=0 where there is no finish chunk, fast=1 where
nothing can be pre-rendered) is the format's to say: `gateway.mock.formats.validate_for_dialect`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

FaultKind = Literal["reset", "stall", "malformed", "eof", "giant", "endless"]
BodyKind = Literal["json", "html", "text"]

GIANT_DEFAULT_SIZE: Final = 8 * 1024 * 1024

_DIRECTIVE_RE: Final = re.compile(r"\[\[mock(?P<args>(?:\s[^\[\]]*)?)\]\]")


class DirectiveError(ValueError):
    """A bad `[[mock ...]]` directive; `key` names the offending knob."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class Knobs:
    """Per-request behaviour chosen by a `[[mock ...]]` directive. None means "dialect/server
    default".

    The reliability knobs, for the fault-injection suite (tests/faults):

    * ``keepalive_ms``: while a stream whose headers are sent waits (the pause between chunks,
      or ``fault=stall``), write an SSE comment ``: ping`` every that many ms, as real upstreams
      do to keep proxies from timing the connection out;
    * ``fault=endless``: after K chunks, one ``data: xxx...`` line that never ends, written in
      64 KiB pieces until the client goes away (a runaway upstream);
    * ``ignore_close``: the handler is shielded from the cancellation aiohttp uses to report a
      client disconnect, so it goes on writing until a write fails (an upstream that does not
      notice a closed connection);
    * ``times=N`` (with ``status`` and ``tag``): only the first N requests carrying the tag get
      the error status; later ones stream normally ("429, then success" for retry tests);
    * ``words=N``: N words per chunk instead of one, so that text (not SSE framing) dominates
      the bytes, as a slow-client test wants;
    * ``linger_ms``: after the last event, wait that long before ending the body (a chunked
      terminator that comes late, or an upstream that holds its connection after ``[DONE]``).

    The benchmark knobs (bench/, ``make bench``), /openai and /events only:

    * ``fast=1``: the events are pre-rendered (a text event is a cached prefix + text + suffix)
      and written about 64 KiB at a time with no await per chunk, so that the upstream outruns
      the gateway;
    * ``rate=R`` (with fast=1): R chunks a second per stream, paced by one timer shared by every
      paced stream, each tick writing whatever is due straight to the transport (1,000 streams
      at 40 chunks/s cost about a thousand ticks a second, not 40,000 task wake-ups);
    * ``stamp=1`` (with fast=1): each chunk's text starts with ``@<ns>;``, the
      ``time.monotonic_ns()`` when it was written. CLOCK_MONOTONIC rather than wall time: a client
      on the same machine reads the same clock (Node's process.hrtime.bigint()), at ns
      resolution and immune to clock steps, to measure upstream-write-to-client latency.
    """

    chunks: int | None = None
    delay_ms: float | None = None
    header_delay_ms: float = 0.0
    status: int | None = None
    body: BodyKind = "json"
    retry_after: str | None = None
    fault: FaultKind | None = None
    after: int = 0
    size: int = GIANT_DEFAULT_SIZE
    crlf: bool | None = None
    bytewise: bool = False
    done: bool | None = None
    finish: bool = True
    comments: bool = False
    tag: str | None = None
    keepalive_ms: float | None = None
    ignore_close: bool = False
    times: int | None = None
    words: int = 1
    fast: bool = False
    rate: float | None = None
    stamp: bool = False
    linger_ms: float | None = None


# ASCII only: int()/float() would also accept "+1", "1_000", " 1" and non-ASCII digits.
_INT_RE: Final = re.compile(r"[0-9]+")
_DECIMAL_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _non_negative_int(value: str) -> int:
    if not _INT_RE.fullmatch(value):
        raise ValueError("expected a non-negative integer")
    return int(value)


def _millis(value: str) -> float:
    if not _DECIMAL_RE.fullmatch(value):
        raise ValueError("expected a non-negative number of milliseconds")
    return float(value)


def _positive_int(value: str) -> int:
    number = _non_negative_int(value)
    if number == 0:
        raise ValueError("expected a positive integer")
    return number


def _positive_millis(value: str) -> float:
    millis = _millis(value)
    if millis == 0:
        raise ValueError("expected a positive number of milliseconds")
    return millis


def _rate(value: str) -> float:
    if not _DECIMAL_RE.fullmatch(value) or float(value) == 0:
        raise ValueError("expected a positive number of chunks per second")
    return float(value)


def _status(value: str) -> int:
    status = _non_negative_int(value)
    # 204/205/304 cannot carry the error body.
    if not 200 <= status <= 599 or status in (204, 205, 304):
        raise ValueError("expected an HTTP status in 200..599 that allows a body")
    return status


def _flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError("expected 0 or 1")
    return value == "1"


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return value

    return parse


_KNOB_PARSERS: Final[Mapping[str, Callable[[str], object]]] = {
    "chunks": _non_negative_int,
    "delay_ms": _millis,
    "header_delay_ms": _millis,
    "status": _status,
    "body": _choice(get_args(BodyKind)),
    # Underscores stand for spaces so that an HTTP-date fits in one token.
    "retry_after": lambda v: v.replace("_", " "),
    "fault": _choice(get_args(FaultKind)),
    "after": _non_negative_int,
    "size": _non_negative_int,
    "crlf": _flag,
    "bytewise": _flag,
    "done": _flag,
    "finish": _flag,
    "comments": _flag,
    "tag": str,
    "keepalive_ms": _positive_millis,
    "ignore_close": _flag,
    "times": _positive_int,
    "words": _positive_int,
    "fast": _flag,
    "rate": _rate,
    "stamp": _flag,
    "linger_ms": _positive_millis,
}


def parse_directive(text: str) -> tuple[str, Knobs]:
    """Strip every `[[mock k=v ...]]` from `text`; return the cleaned text and the knobs.

    Raises DirectiveError on an unknown key, a bad value, a repeated key or a knob that has no
    effect without another one (e.g. `body` without `status`), so that test typos fail loudly.
    """
    values: dict[str, Any] = {}
    for match in _DIRECTIVE_RE.finditer(text):
        for token in match["args"].split():
            key, sep, raw = token.partition("=")
            if key not in _KNOB_PARSERS:
                raise DirectiveError(key, f"unknown mock directive key {key!r}")
            if not sep or not raw:
                raise DirectiveError(key, f"mock directive key {key!r} needs a value: {key}=...")
            if key in values:
                raise DirectiveError(key, f"mock directive key {key!r} given twice")
            try:
                values[key] = _KNOB_PARSERS[key](raw)
            except ValueError as exc:
                raise DirectiveError(
                    key, f"bad value for mock directive {key}={raw}: {exc}"
                ) from exc
    _check_combinations(values)
    cleaned = " ".join(_DIRECTIVE_RE.sub(" ", text).split())
    return cleaned, dataclasses.replace(Knobs(), **values)


#: Knobs that shape a slow, step-by-step stream; fast=1 has its own writer and refuses them.
_NOT_FAST: Final = (
    "fault",
    "status",
    "delay_ms",
    "bytewise",
    "comments",
    "keepalive_ms",
    "ignore_close",
    "linger_ms",
)


def _check_combinations(values: Mapping[str, Any]) -> None:
    if values.get("fast"):
        for key in _NOT_FAST:
            if key in values:
                raise DirectiveError(key, f"mock directive key {key!r} does not apply to fast=1")
    else:
        for key in ("rate", "stamp"):
            if key in values:
                raise DirectiveError(key, f"mock directive key {key!r} needs fast=1")
    for key in ("body", "retry_after"):
        if key in values and "status" not in values:
            raise DirectiveError(key, f"mock directive key {key!r} needs status=NNN")
    if "after" in values and "fault" not in values:
        raise DirectiveError("after", "mock directive key 'after' needs fault=...")
    if "size" in values and values.get("fault") != "giant":
        raise DirectiveError("size", "mock directive key 'size' needs fault=giant")
    if "status" in values and "fault" in values:
        raise DirectiveError("fault", "mock directive keys 'status' and 'fault' exclude each other")
    if "times" in values:
        if "status" not in values:
            raise DirectiveError("times", "mock directive key 'times' needs status=NNN")
        if "tag" not in values:
            raise DirectiveError("times", "mock directive key 'times' needs tag=... to count by")
    # Knobs that act on a started stream mean nothing for an error answer (unless `times` lets
    # later requests stream).
    for key in ("keepalive_ms", "ignore_close"):
        if key in values and "status" in values and "times" not in values:
            raise DirectiveError(key, f"mock directive key {key!r} needs a stream, not status=")
    stall = values.get("fault") == "stall"
    if "keepalive_ms" in values and values.get("delay_ms") == 0 and not stall:
        raise DirectiveError(
            "keepalive_ms", "keepalive_ms needs a wait: delay_ms > 0 or fault=stall"
        )
    if values.get("ignore_close") and stall and "keepalive_ms" not in values:
        # A silent stall never writes, so it would never notice the client left: it would
        # hold the request open forever.
        raise DirectiveError("ignore_close", "ignore_close=1 with fault=stall needs keepalive_ms")
