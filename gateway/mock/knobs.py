"""The ``[[mock ...]]`` directive (pure): the knobs a test turns for one request.

A directive in the last user message, ``[[mock chunks=3 fault=reset after=1 tag=x]]``, is cut out
of the question and read into `Knobs`; unknown keys or useless combinations raise
`DirectiveError`, which the server answers 400 naming the key.

Knobs: chunks, delay_ms, header_delay_ms, status (+ body=json|html|text, retry_after; underscores
become spaces; times=N with tag= errs only on the first N requests of that tag),
fault=reset|stall|malformed|eof|giant|endless|error (+ after=K, size=BYTES for giant), keepalive_ms
(``: ping`` comments while a started stream waits), ignore_close=1 (keep writing after the client
left), linger_ms (wait before ending the body), words=N (words per chunk), crlf=0|1, bytewise=1,
done=0|1, finish=0|length, comments=1, tag. Benchmarks: fast=1 (+ rate=R, stamp=1). See `Knobs`.

Real recorded streams and typed answer parts (issue 18):

* transcript=NAME: replay the recorded stream NAME (a file of the server's transcripts
  directory, without extension) byte for byte, on any route; see `gateway.mock.replay`.
* split=N | split=random:SEED: cut the body into writes of N bytes, or of seeded random sizes
  (1 to 512 bytes, mostly small), across event boundaries; each write reaches the socket on its
  own. Any stream but fast=1; not with bytewise.
* reasoning=think|think_open|reasoning_content|reasoning|details|mistral|thinking|summary|thought:
  the answer starts with reasoning, in that shape: a leading ``<think>...</think>`` in the content
  (think_open: never closed, no answer), DeepSeek's ``delta.reasoning_content``,
  Groq/vLLM/OpenRouter's ``delta.reasoning`` (Responses: ``response.reasoning_text.delta``),
  OpenRouter's ``reasoning`` + ``reasoning_details``, Mistral's content arrays of ``thinking``
  and ``text`` parts, Anthropic's ``thinking`` block (``thinking_delta``s, then a
  ``signature_delta``), OpenAI Responses' ``response.reasoning_summary_text.delta``s, Gemini's
  ``thought: true`` text parts.
  think_split=N (with think or think_open) re-cuts the whole content, tags included, into
  N-character deltas (N=1: every tag split at every byte).
* tools=1|2|bad_json|no_index: the answer is tool calls (no text): one, two in parallel, one
  whose arguments are not valid JSON, or two whole calls in one delta without ``index``
  (Mistral).
* sources=N | sources=grow:N: Perplexity citations and search_results with N sources on every
  chunk (grow: the list grows by one per chunk up to N).
* concise=1: Perplexity ``stream_mode: "concise"`` (also chosen by the request's own
  ``stream_mode``): ``chat.reasoning`` chunks with reasoning steps (a web search, a URL fetch, a
  code run), ``chat.reasoning.done``, ``chat.completion.chunk`` deltas, ``chat.completion.done``.
* refusal=1: the answer is a ``delta.refusal`` text. choices=N: N choices interleaved (n>1).

With these, after=K counts every event after the preamble (text, reasoning, tool-call and
progress chunks; a transcript's events).

Which knobs a wire format cannot honour (finish=0 where there is no finish chunk, fast=1 where
nothing can be pre-rendered, tools= where the API has none) is the format's to say:
`gateway.mock.formats.validate_for_dialect`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

FaultKind = Literal["reset", "stall", "malformed", "eof", "giant", "endless", "error"]
BodyKind = Literal["json", "html", "text"]
ReasoningShape = Literal[
    "think",
    "think_open",
    "reasoning_content",
    "reasoning",
    "details",
    "mistral",
    "thinking",
    "summary",
    "thought",
]
ToolsKind = Literal["1", "2", "bad_json", "no_index"]

GIANT_DEFAULT_SIZE: Final = 8 * 1024 * 1024

_DIRECTIVE_RE: Final = re.compile(r"\[\[mock(?P<args>(?:\s[^\[\]]*)?)\]\]")


class DirectiveError(ValueError):
    """A bad `[[mock ...]]` directive; `key` names the offending knob."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class Split:
    """How the body is cut into writes (``split=``): every `size` bytes, or at sizes drawn from
    `random.Random(seed)` (see `gateway.mock.replay.Splitter`)."""

    size: int | None = None
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class SourceList:
    """``sources=N`` (all N on every chunk) or ``sources=grow:N`` (one more per chunk)."""

    count: int
    grow: bool = False


@dataclass(frozen=True, slots=True)
class Knobs:
    """Per-request behaviour chosen by a `[[mock ...]]` directive. None means "dialect/server
    default".

    The reliability knobs, for the fault-injection suite (tests/faults):

    * ``keepalive_ms``: while a stream whose headers are sent waits (the pause between chunks,
      or ``fault=stall``), write an SSE comment ``: ping`` every that many ms, as real upstreams
      do to keep proxies from timing the connection out;
    * ``fault=error``: after K chunks, the API's own mid-stream error event (an overloaded or
      server error: Anthropic's ``overloaded_error``, OpenAI's ``{"error": ...}``, ...), then
      the end of the body, as providers do when they fail after answering 200;
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
    #: False: no finish chunk (finish=0); "length": the answer ends out of tokens, in the
    #: format's way (finish=length, where the format's `scripts` list it).
    finish: bool | Literal["length"] = True
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
    transcript: str | None = None
    split: Split | None = None
    reasoning: ReasoningShape | None = None
    think_split: int | None = None
    tools: ToolsKind | None = None
    sources: SourceList | None = None
    concise: bool = False
    refusal: bool = False
    choices: int = 1

    @property
    def scripted(self) -> bool:
        """Whether a typed-parts knob (reasoning, tools, sources, ...) shapes the stream."""
        return (
            self.reasoning is not None
            or self.tools is not None
            or self.sources is not None
            or self.concise
            or self.refusal
            or self.choices > 1
        )


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


def _finish(value: str) -> bool | Literal["length"]:
    if value == "length":
        return "length"
    if value not in ("0", "1"):
        raise ValueError("expected 0, 1 or length")
    return value == "1"


#: A transcript's name: a file name without extension. Only a syntax check: the server looks
#: the name up in its directory's listing, so no path is ever built from it.
_TRANSCRIPT_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
MAX_SOURCES: Final = 1000
MAX_CHOICES: Final = 8


def _transcript(value: str) -> str:
    if not _TRANSCRIPT_RE.fullmatch(value):
        raise ValueError("expected a transcript name (letters, digits, '.', '_', '-')")
    return value


def _split(value: str) -> Split:
    kind, sep, seed = value.partition(":")
    if kind == "random" and sep:
        if not _INT_RE.fullmatch(seed):
            raise ValueError("expected random:SEED with a non-negative integer seed")
        return Split(seed=int(seed))
    if not sep:
        return Split(size=_positive_int(value))
    raise ValueError("expected N (bytes per write) or random:SEED")


def _sources(value: str) -> SourceList:
    grow = value.startswith("grow:")
    count = _non_negative_int(value.removeprefix("grow:"))
    if count > MAX_SOURCES or (grow and count == 0):
        raise ValueError(f"expected N or grow:N, N up to {MAX_SOURCES} (grow: at least 1)")
    return SourceList(count, grow)


def _choices(value: str) -> int:
    count = _positive_int(value)
    if count > MAX_CHOICES:
        raise ValueError(f"expected 1..{MAX_CHOICES}")
    return count


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
    "finish": _finish,
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
    "transcript": _transcript,
    "split": _split,
    "reasoning": _choice(get_args(ReasoningShape)),
    "think_split": _positive_int,
    "tools": _choice(get_args(ToolsKind)),
    "sources": _sources,
    "concise": _flag,
    "refusal": _flag,
    "choices": _choices,
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
    "transcript",
    "split",
    "reasoning",
    "think_split",
    "tools",
    "sources",
    "concise",
    "refusal",
    "choices",
)

#: Knobs that shape a scripted answer, which a replayed transcript does not have.
_NOT_TRANSCRIPT: Final = (
    "chunks",
    "words",
    "crlf",
    "done",
    "finish",
    "comments",
    "bytewise",
    "reasoning",
    "think_split",
    "tools",
    "sources",
    "concise",
    "refusal",
    "choices",
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
    _check_parts(values)


def _check_parts(values: Mapping[str, Any]) -> None:
    """The transcript and typed-parts knobs: what they exclude and what they need."""
    if "transcript" in values:
        for key in _NOT_TRANSCRIPT:
            if key in values:
                raise DirectiveError(
                    key, f"mock directive key {key!r} does not apply to a replayed transcript"
                )
        if values.get("fault") in ("malformed", "giant", "error"):
            raise DirectiveError(
                "fault", "a replayed transcript takes fault=reset|stall|eof|endless only"
            )
    if "split" in values and values.get("bytewise"):
        raise DirectiveError(
            "split", "mock directive keys 'split' and 'bytewise' exclude each other"
        )
    if "think_split" in values and values.get("reasoning") not in ("think", "think_open"):
        raise DirectiveError("think_split", "think_split=N needs reasoning=think or think_open")
    # Each of these scripts a whole kind of answer; two at once would be a made-up stream.
    alone = [
        key
        for key, on in (
            ("tools", "tools" in values),
            ("refusal", values.get("refusal") is True),
            ("choices", values.get("choices", 1) > 1),
        )
        if on
    ]
    if len(alone) > 1:
        raise DirectiveError(
            alone[1], f"mock directive keys {alone[0]!r} and {alone[1]!r} exclude each other"
        )
    for key in ("refusal", "choices"):
        if key in alone and "reasoning" in values:
            raise DirectiveError(key, f"mock directive key {key!r} scripts no reasoning")
    sources = values.get("sources")
    if values.get("concise") and isinstance(sources, SourceList) and sources.grow:
        raise DirectiveError("sources", "sources=grow:N applies to full mode, not concise=1")
    if "tools" in values and "chunks" in values:
        raise DirectiveError("chunks", "tools= streams no answer text: 'chunks' means nothing")
