"""A fake LLM upstream: an aiohttp server that streams answers the way real APIs do.

It serves two masters:

* the offline demo of `make run`: plausible multi-sentence answers with citations, chosen
  deterministically from the question and streamed word by word at a human-readable pace;
* the test suite: a ``[[mock key=value ...]]`` directive in the last user message turns knobs
  (chunk count, pace, HTTP errors, transport faults, framing variants) and every request leaves a
  `RequestRecord` so tests can observe what the upstream saw, including client disconnects.

Routes (streams are POST with an OpenAI-style JSON body and ``"stream": true``):

=============================================  ==============================================
``/perplexity``, ``/chat/completions``          Perplexity Sonar: fat ``chat.completion`` chunks,
                                                CRLF separators, no ``[DONE]``, clean EOF ends it
``/openai``, ``/v1/chat/completions``           OpenAI ``chat.completion.chunk``, ``data: [DONE]``
``/events``                                     ``event: text_chunk`` ... ``event: done``
``GET /_mock/stats``, ``POST /_mock/reset``     observation from another process
=============================================  ==============================================

Knobs (``[[mock chunks=3 fault=reset after=1 tag=x]]``; unknown keys or useless combinations are
answered 400 naming the key): chunks, delay_ms, header_delay_ms, status (+ body=json|html|text,
retry_after; underscores become spaces; times=N with tag= errs only on the first N requests of
that tag), fault=reset|stall|malformed|eof|giant|endless (+ after=K, size=BYTES for giant),
keepalive_ms (``: ping`` comments while a started stream waits), ignore_close=1 (keep writing
after the client left), words=N (words per chunk), crlf=0|1, bytewise=1, done=0|1, finish=0,
comments=1, tag. Benchmarks: fast=1 (+ rate=R, stamp=1). See `Knobs`.

``GET /_mock/stats`` takes ``?records=0`` (counters only, cheap to poll) and ``?tag=T`` (only the
records tagged T).

Wire formats follow the upstream-formats research notes (Perplexity captures from
perplexityai/api-discussion#209, OpenAI's chat_completion_chunk types, the seed events format).

The module is layered: answers, the directive parser and the wire formatters are pure (no I/O, no
clock; `plan_stream` yields `Emit`/`Fault` steps), and only `MockUpstream` touches asyncio/aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import math
import re
import time
import uuid
import zlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final, Literal, get_args

import orjson
from aiohttp import hdrs, web

__all__ = [
    "ANSWERS",
    "ENDLESS_WRITE_BYTES",
    "GIANT_DEFAULT_SIZE",
    "ROUTES",
    "Answer",
    "DirectiveError",
    "Emit",
    "Fault",
    "Knobs",
    "MockUpstream",
    "RequestRecord",
    "Source",
    "StreamSpec",
    "choose_answer",
    "error_body",
    "keepalive_comment",
    "keepalive_offsets",
    "parse_directive",
    "plan_stream",
    "serve_forever",
    "text_chunks",
    "validate_for_dialect",
]

Dialect = Literal["perplexity", "openai", "events"]
FaultKind = Literal["reset", "stall", "malformed", "eof", "giant", "endless"]
BodyKind = Literal["json", "html", "text"]
Outcome = Literal["completed", "client_closed", "fault", "error_status", "server_stopped", "open"]

ROUTES: Final[Mapping[str, Dialect]] = {
    "/perplexity": "perplexity",
    "/chat/completions": "perplexity",
    "/openai": "openai",
    "/v1/chat/completions": "openai",
    "/events": "events",
}
DEFAULT_MODELS: Final[Mapping[Dialect, str]] = {
    "perplexity": "sonar",
    "openai": "gpt-4o-mini",
    "events": "sonar",
}
GIANT_DEFAULT_SIZE: Final = 8 * 1024 * 1024
#: Size of each write of `fault=endless` (the line of x's that never ends).
ENDLESS_WRITE_BYTES: Final = 64 * 1024


# --------------------------------------------------------------------------------------------
# Answers (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """One web source behind an answer (Perplexity's `search_results` entry)."""

    title: str
    url: str
    date: str


@dataclass(frozen=True, slots=True)
class Answer:
    """A canned answer: its text (with Perplexity-style [n] markers) and the sources it cites."""

    keywords: frozenset[str]
    text: str
    sources: tuple[Source, ...]

    @property
    def citations(self) -> list[str]:
        return [s.url for s in self.sources]

    @property
    def search_results(self) -> list[dict[str, str]]:
        return [{"title": s.title, "url": s.url, "date": s.date} for s in self.sources]


def _answer(keywords: str, text: str, *sources: tuple[str, str, str]) -> Answer:
    return Answer(
        frozenset(keywords.split()), " ".join(text.split()), tuple(Source(*s) for s in sources)
    )


ANSWERS: Final[tuple[Answer, ...]] = (
    _answer(
        "sky blue sunset sunsets rayleigh scattering atmosphere daytime",
        """Sunlight looks white but mixes every visible wavelength[1]. Air molecules scatter
        short wavelengths far more strongly than long ones: this is Rayleigh scattering[2]. Blue
        light is therefore spread across the whole sky and reaches our eyes from every
        direction, while violet is partly absorbed high up and our eyes are less sensitive to
        it[1][3]. At sunset the light crosses much more air, the blue is scattered away, and the
        sky turns orange and red.""",
        (
            "Rayleigh scattering - Wikipedia",
            "https://en.wikipedia.org/wiki/Rayleigh_scattering",
            "2025-01-20",
        ),
        (
            "Why is the sky blue? - NASA Space Place",
            "https://spaceplace.nasa.gov/blue-sky/",
            "2024-06-11",
        ),
        (
            "Diffuse sky radiation - Wikipedia",
            "https://en.wikipedia.org/wiki/Diffuse_sky_radiation",
            "2024-11-02",
        ),
    ),
    _answer(
        "cat cats purr purring kitten kittens feline",
        """Cats purr by rapidly twitching the muscles of the larynx, which open and close the
        glottis about 25 to 150 times a second as they breathe[1]. A neural
        oscillator in the brainstem drives the rhythm, so the sound continues through both
        phases of breathing[2]. Cats purr when content, but also when stressed, injured or
        giving birth, which suggests purring also soothes them; its
        low frequencies have even been linked to bone and tissue healing[1][3].""",
        ("Purr - Wikipedia", "https://en.wikipedia.org/wiki/Purr", "2025-03-02"),
        (
            "How do cats purr? - Scientific American",
            "https://www.scientificamerican.com/article/how-do-cats-purr/",
            "2023-10-05",
        ),
        (
            "The felid purr: a healing mechanism? - JASA",
            "https://pubs.aip.org/asa/jasa/article/110/5_Supplement/2666/555345",
            "2001-11-01",
        ),
    ),
    _answer(
        "websocket websockets ws socket sockets realtime handshake duplex rfc6455",
        """WebSockets provide a full-duplex channel over a single TCP connection[1]. A client starts
        with an HTTP/1.1 Upgrade request, and once the server answers 101 Switching Protocols both
        sides exchange framed messages without further HTTP overhead[2]. Client frames are masked,
        large messages can be fragmented, and ping/pong control frames keep idle connections alive
        through proxies[1][3]. That makes them a good fit for chat, live dashboards and streamed
        model output.""",
        (
            "RFC 6455: The WebSocket Protocol",
            "https://datatracker.ietf.org/doc/html/rfc6455",
            "2011-12-01",
        ),
        (
            "The WebSocket API (WebSockets) - MDN",
            "https://developer.mozilla.org/en-US/docs/Web/API/WebSockets_API",
            "2025-03-13",
        ),
        (
            "Keepalive and latency - websockets",
            "https://websockets.readthedocs.io/en/stable/topics/keepalive.html",
            "2025-01-10",
        ),
    ),
    _answer(
        "sse server sent events eventsource stream streaming streamed",
        """Server-Sent Events are a simple one-way streaming format: the server keeps an HTTP
        response open and writes text events separated by blank lines[1]. Each event is made of
        field lines such as data, event, id and retry; browsers expose them through the
        EventSource interface, which reconnects automatically[2]. Lines may end in LF, CR or CRLF,
        so a robust parser has to accept all three[1]. LLM APIs reuse the format to deliver tokens
        as soon as they are generated[3].""",
        (
            "HTML Standard: Server-sent events",
            "https://html.spec.whatwg.org/multipage/server-sent-events.html",
            "2025-06-20",
        ),
        (
            "Using server-sent events - MDN",
            "https://developer.mozilla.org/en-US/docs/Web/API/Server-sent_events/Using_server-sent_events",
            "2024-11-02",
        ),
        (
            "Streaming Responses - Perplexity",
            "https://docs.perplexity.ai/guides/streaming",
            "2025-04-08",
        ),
    ),
    _answer(
        "python asyncio async await coroutine coroutines loop task tasks concurrency",
        """asyncio is Python's standard library for writing concurrent code with the async and
        await syntax[1]. A single event loop runs coroutines cooperatively: whenever one awaits
        I/O, the loop switches to another task that is ready, so thousands of sockets can be
        served by one thread[1][2]. Since Python 3.11, TaskGroup and timeout() make structured
        concurrency and cancellation much easier to get right[2]. CPU-heavy work still belongs in
        a thread or process pool.""",
        (
            "asyncio — Asynchronous I/O",
            "https://docs.python.org/3/library/asyncio.html",
            "2025-05-01",
        ),
        (
            "Coroutines and Tasks",
            "https://docs.python.org/3/library/asyncio-task.html",
            "2025-05-01",
        ),
    ),
    _answer(
        "photosynthesis plant plants chlorophyll leaf leaves sunlight oxygen algae green",
        """Photosynthesis is the process by which plants, algae and cyanobacteria turn light
        energy into chemical energy[1]. In the light-dependent reactions, chlorophyll in the
        thylakoid membranes absorbs mostly blue and red light and splits water, which releases
        oxygen[2]. The Calvin cycle then uses the resulting ATP and NADPH to fix carbon dioxide
        into sugars[3]. Nearly all the oxygen in the atmosphere and most of the energy in food
        chains come from this process.""",
        (
            "Photosynthesis - Wikipedia",
            "https://en.wikipedia.org/wiki/Photosynthesis",
            "2025-02-14",
        ),
        (
            "Photosynthesis | Britannica",
            "https://www.britannica.com/science/photosynthesis",
            "2024-12-30",
        ),
        (
            "Photosynthesis in plants - Khan Academy",
            "https://www.khanacademy.org/science/biology/photosynthesis-in-plants",
            "2023-09-18",
        ),
    ),
    _answer(
        "mars planet planets rover nasa space red perseverance solar",
        """Mars is the fourth planet from the Sun, a cold desert world about half the diameter of
        Earth[1]. Its red colour comes from iron oxide dust, and its thin atmosphere is mostly
        carbon dioxide, with a surface pressure below one percent of Earth's[1][2]. NASA's
        Perseverance rover has been exploring Jezero Crater since February 2021, collecting rock
        cores that a future mission may return to Earth[3]. Average surface temperatures sit
        around \u221260 °C.""",
        ("Mars: Facts - NASA Science", "https://science.nasa.gov/mars/facts/", "2025-01-22"),
        ("Mars - Wikipedia", "https://en.wikipedia.org/wiki/Mars", "2025-03-02"),
        (
            "Mars 2020: Perseverance Rover - NASA Science",
            "https://science.nasa.gov/mission/mars-2020-perseverance/",
            "2024-10-15",
        ),
    ),
    _answer(
        "coffee caffeine espresso brew brewing beans roast roasting cafe",
        """Coffee gets most of its flavour from roasting, when Maillard reactions and
        caramelisation create hundreds of aroma compounds[1]. For brewing, a common starting
        point is about one part coffee to sixteen parts water, at 90\u201396 °C[2]. Espresso
        forces hot water through a fine, compacted puck at roughly nine bar, which extracts more
        body and crema in under thirty seconds[3]. A typical café cup contains somewhere between
        80 and 100 mg of caffeine.""",
        (
            "Coffee roasting - Wikipedia",
            "https://en.wikipedia.org/wiki/Coffee_roasting",
            "2024-08-09",
        ),
        (
            "Coffee Standards - Specialty Coffee Association",
            "https://sca.coffee/research/coffee-standards",
            "2023-05-11",
        ),
        ("Espresso - Wikipedia", "https://en.wikipedia.org/wiki/Espresso", "2025-02-27"),
    ),
    _answer(
        "http tcp latency network networking proxy proxies nginx timeout timeouts keepalive",
        """Long-lived HTTP streams are fragile in ways that short requests are not. Reverse proxies
        such as nginx buffer responses by default and close connections that stay idle longer than
        their read timeout, typically sixty seconds[1]. Disabling proxy buffering for event
        streams, sending periodic comment lines as heartbeats and tuning TCP keepalive all
        help[1][2]. Clients should still treat a body that ends without its terminal marker as
        truncated, not finished[3].""",
        (
            "Module ngx_http_proxy_module",
            "https://nginx.org/en/docs/http/ngx_http_proxy_module.html",
            "2025-04-16",
        ),
        (
            "Keep-Alive header - MDN",
            "https://developer.mozilla.org/en-US/docs/Web/HTTP/Headers/Keep-Alive",
            "2024-07-25",
        ),
        ("RFC 9112: HTTP/1.1", "https://www.rfc-editor.org/rfc/rfc9112.html", "2022-06-06"),
    ),
    _answer(
        "llm llms model models ai perplexity gpt openai language token tokens sonar chatbot",
        """Large language models generate text one token at a time, predicting each token from
        everything that came before it[1]. Streaming APIs send those tokens to the client as soon
        as they are produced, which cuts the perceived latency from many seconds to a few hundred
        milliseconds[2]. Search-augmented models such as Perplexity's Sonar[4] also return the web
        sources they used as citations, so that readers can check each claim against the original
        pages[3].""",
        (
            "Large language model - Wikipedia",
            "https://en.wikipedia.org/wiki/Large_language_model",
            "2025-03-10",
        ),
        (
            "Streaming API responses - OpenAI",
            "https://platform.openai.com/docs/guides/streaming-responses",
            "2025-03-11",
        ),
        (
            "Perplexity API overview",
            "https://docs.perplexity.ai/getting-started/overview",
            "2025-04-01",
        ),
        (
            "Sonar models - Perplexity",
            "https://docs.perplexity.ai/models/models/sonar",
            "2025-04-01",
        ),
    ),
)

_WORD_RE: Final = re.compile(r"[a-z0-9]+")


def choose_answer(question: str) -> Answer:
    """Pick the canned answer sharing most keywords with the question; a stable hash breaks a
    no-match (crc32, not `hash()`, which is salted per process)."""
    words = set(_WORD_RE.findall(question.lower()))
    scores = [len(words & a.keywords) for a in ANSWERS]
    best = max(scores)
    if best > 0:
        return ANSWERS[scores.index(best)]
    normalized = " ".join(question.lower().split())
    return ANSWERS[zlib.crc32(normalized.encode()) % len(ANSWERS)]


def text_chunks(text: str, count: int | None = None, words: int = 1) -> list[str]:
    """Split an answer into `count` chunks of `words` words, each word with its following space
    (none after the last chunk), cycling through the answer's words when they run out. Without
    `count`, just enough chunks to cover the answer once."""
    vocab = text.split()
    size = len(vocab)
    if words < 1:
        raise ValueError("words must be positive")
    if count is None:  # the answer once, the last chunk as long as the words left
        spans = [" ".join(vocab[i : i + words]) for i in range(0, size, words)]
        return [span + " " for span in spans[:-1]] + spans[-1:]
    n = count
    if not vocab or n == 0:
        return []
    # A chunk starts at one of `size` offsets, so chunks are shared strings: a million-chunk
    # stream (a load or slow-client test) costs a list of references, not a million strings.
    cache: dict[int, str] = {}

    def piece(start: int) -> str:
        if start not in cache:
            cache[start] = "".join(vocab[(start + j) % size] + " " for j in range(words))
        return cache[start]

    pieces = [piece(i * words % size) for i in range(n)]
    pieces[-1] = pieces[-1].removesuffix(" ")
    return pieces


# --------------------------------------------------------------------------------------------
# The [[mock ...]] directive (pure)
# --------------------------------------------------------------------------------------------

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


def validate_for_dialect(knobs: Knobs, dialect: Dialect) -> None:
    """Reject knobs that mean nothing for `dialect` (the events format has no finish chunk)."""
    if dialect == "events" and not knobs.finish:
        raise DirectiveError("finish", "finish=0 applies to /perplexity and /openai only")
    if dialect == "perplexity" and knobs.fast:
        # Every Perplexity chunk repeats the whole text so far: nothing to pre-render.
        raise DirectiveError("fast", "fast=1 applies to /openai and /events only")


# --------------------------------------------------------------------------------------------
# Wire formats (pure): a stream is planned as a sequence of steps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """Everything needed to render one stream; ids and clock are inputs, so rendering is pure."""

    dialect: Dialect
    model: str
    answer: Answer
    pieces: tuple[str, ...]
    prompt_tokens: int
    knobs: Knobs = Knobs()
    include_usage: bool = False  # OpenAI stream_options.include_usage
    request_id: str = "mock"
    created: int = 0

    @property
    def eol(self) -> bytes:
        crlf = self.dialect == "perplexity" if self.knobs.crlf is None else self.knobs.crlf
        return b"\r\n" if crlf else b"\n"


@dataclass(frozen=True, slots=True)
class Emit:
    """Write these bytes. `paced` events are separated by the chunk delay; `kind` says whether
    the event carries answer text (counted in `chunks_sent`) or is an injected fault."""

    data: bytes
    paced: bool = False
    kind: Literal["meta", "text", "fault"] = "meta"


@dataclass(frozen=True, slots=True)
class Fault:
    """A transport fault the I/O layer must perform; the stream plan ends after it."""

    kind: Literal["reset", "stall", "eof", "endless"]


Step = Emit | Fault


def _dumps(obj: object) -> bytes:
    return orjson.dumps(obj)


def keepalive_comment(eol: bytes) -> bytes:
    """The SSE comment block sent as a heartbeat (``comments=1``, ``keepalive_ms``)."""
    return b": ping" + eol + eol


def keepalive_offsets(wait: float, interval: float) -> list[float]:
    """When, counted from the start of a `wait` (seconds), heartbeats are due: every
    `interval`, strictly before the wait ends (the chunk that ends it shows the stream alive)."""
    if interval <= 0:
        raise ValueError("interval must be positive")
    count = max(0, math.ceil(wait / interval) - 1)
    return [interval * (i + 1) for i in range(count)]


class _Formatter(ABC):
    """One dialect's events. Stateful (running text, token count): call in stream order."""

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.eol = spec.eol
        self.text_parts: list[str] = []

    def event(self, data: bytes, name: str | None = None) -> bytes:
        lines = [b"data: " + data]
        if name is not None:
            lines.insert(0, b"event: " + name.encode())
        return self.eol.join(lines) + self.eol + self.eol

    def usage(self) -> dict[str, int]:
        completion = len(self.text_parts)
        prompt = self.spec.prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def padded(self, obj: dict[str, Any], size: int) -> bytes:
        """`obj` plus a "padding" string sized so the JSON is `size` bytes (if it can be)."""
        obj["padding"] = ""
        base = len(_dumps(obj))
        obj["padding"] = "x" * max(0, size - base)
        return _dumps(obj)

    def preamble(self) -> Iterator[bytes]:
        return iter(())

    @abstractmethod
    def text(self, piece: str) -> bytes:
        """The event carrying one text piece."""

    @abstractmethod
    def finale(self) -> Iterator[tuple[bytes, bool]]:
        """Terminal events as (bytes, paced)."""

    def malformed(self) -> bytes:
        return b'data: {"choices": [' + self.eol + self.eol

    @abstractmethod
    def giant(self, size: int) -> bytes:
        """One event of about `size` bytes that is still valid for the dialect."""


class _PerplexityFormatter(_Formatter):
    """Sonar "full" mode: every chunk carries message (text so far), delta, cumulative usage and
    citations; search_results come with the final chunk; no [DONE] unless done=1."""

    def chunk(self, delta: str, finish_reason: str | None, final: bool = False) -> dict[str, Any]:
        spec = self.spec
        chunk: dict[str, Any] = {
            "id": spec.request_id,
            "model": spec.model,
            "created": spec.created,
            "usage": self.usage(),
            "citations": spec.answer.citations,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": finish_reason,
                    "message": {"role": "assistant", "content": "".join(self.text_parts)},
                    "delta": {"role": "assistant", "content": delta},
                }
            ],
        }
        if final:
            chunk["search_results"] = spec.answer.search_results
        return chunk

    def text(self, piece: str) -> bytes:
        self.text_parts.append(piece)
        return self.event(_dumps(self.chunk(piece, None)))

    def finale(self) -> Iterator[tuple[bytes, bool]]:
        knobs = self.spec.knobs
        if knobs.finish:
            yield self.event(_dumps(self.chunk("", "stop", final=True))), True
        if knobs.done:  # sonar-deep-research style
            yield self.event(b"[DONE]"), False

    def giant(self, size: int) -> bytes:
        return self.event(self.padded(self.chunk("", None), size))


class _OpenAIFormatter(_Formatter):
    """Chat Completions: role chunk, content deltas, empty-delta finish chunk, optional usage
    chunk (choices: []), then data: [DONE]."""

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        spec = self.spec
        chunk: dict[str, Any] = {
            "id": spec.request_id,
            "object": "chat.completion.chunk",
            "created": spec.created,
            "model": spec.model,
            "system_fingerprint": "fp_mock",
            "choices": choices,
        }
        if spec.include_usage:
            chunk["usage"] = None
        return chunk

    @staticmethod
    def choice(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def preamble(self) -> Iterator[bytes]:
        yield self.event(_dumps(self.chunk([self.choice({"role": "assistant", "content": ""})])))

    def text(self, piece: str) -> bytes:
        self.text_parts.append(piece)
        return self.event(_dumps(self.chunk([self.choice({"content": piece})])))

    def finale(self) -> Iterator[tuple[bytes, bool]]:
        knobs = self.spec.knobs
        if knobs.finish:
            yield self.event(_dumps(self.chunk([self.choice({}, "stop")]))), True
        if self.spec.include_usage:
            usage_chunk = self.chunk([])
            usage_chunk["usage"] = self.usage()
            yield self.event(_dumps(usage_chunk)), False
        if knobs.done is None or knobs.done:
            yield self.event(b"[DONE]"), False

    def giant(self, size: int) -> bytes:
        return self.event(self.padded(self.chunk([self.choice({"content": ""})]), size))


class _EventsFormatter(_Formatter):
    """The seed format: `event: text_chunk` per word, then `event: done` with the full answer."""

    def text(self, piece: str) -> bytes:
        self.text_parts.append(piece)
        return self.event(_dumps({"type": "text_chunk", "text": piece}), "text_chunk")

    def finale(self) -> Iterator[tuple[bytes, bool]]:
        if self.spec.knobs.done is None or self.spec.knobs.done:
            done = {
                "type": "done",
                "text": "".join(self.text_parts),
                "citations": self.spec.answer.citations,
                "usage": self.usage(),
            }
            yield self.event(_dumps(done), "done"), True

    def malformed(self) -> bytes:
        return (
            b"event: text_chunk"
            + self.eol
            + b'data: {"type": "text_chunk", "text": '
            + self.eol
            + self.eol
        )

    def giant(self, size: int) -> bytes:
        return self.event(self.padded({"type": "text_chunk", "text": ""}, size), "text_chunk")


_FORMATTERS: Final[Mapping[Dialect, Callable[[StreamSpec], _Formatter]]] = {
    "perplexity": _PerplexityFormatter,
    "openai": _OpenAIFormatter,
    "events": _EventsFormatter,
}


def plan_stream(spec: StreamSpec) -> Iterator[Step]:
    """The steps of one streamed answer, faults included, in wire order."""
    fmt = _FORMATTERS[spec.dialect](spec)
    knobs = spec.knobs
    ping = keepalive_comment(spec.eol) if knobs.comments else b""
    fault_at = min(knobs.after, len(spec.pieces)) if knobs.fault is not None else -1

    for data in fmt.preamble():
        yield Emit(ping + data, paced=True)
    for i in range(len(spec.pieces) + 1):
        if i == fault_at:
            if knobs.fault == "malformed":
                yield Emit(ping + fmt.malformed(), kind="fault")
            elif knobs.fault == "giant":
                yield Emit(ping + fmt.giant(knobs.size), kind="fault")
            elif knobs.fault is not None:
                yield Fault(knobs.fault)
                return
        if i < len(spec.pieces):
            yield Emit(ping + fmt.text(spec.pieces[i]), paced=True, kind="text")
    for data, paced in fmt.finale():
        yield Emit(ping + data, paced=paced)


# --------------------------------------------------------------------------------------------
# HTTP error bodies (pure)
# --------------------------------------------------------------------------------------------

_ERROR_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_denied",
    404: "not_found",
    408: "timeout",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def error_body(status: int, kind: BodyKind, message: str | None = None) -> tuple[bytes, str]:
    """(body, content type) of an error answer: Perplexity/OpenAI JSON (integer code, as
    Perplexity sends), an openresty HTML page (Perplexity's 401 really looks like this) or text."""
    reason = "Authorization Required" if status == 401 else _reason(status)
    if kind == "json":
        error = {
            "message": message or f"{reason} (simulated by the mock upstream)",
            "type": _ERROR_TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "code": status,
        }
        return _dumps({"error": error}), "application/json"
    if kind == "html":
        page = (
            f"<html><head><title>{status} {reason}</title></head><body>"
            f"<center><h1>{status} {reason}</h1></center><hr><center>openresty/1.27.4</center>"
            "</body></html>\n"
        )
        return page.encode(), "text/html"
    return f"{status} {reason}\n".encode(), "text/plain"


# --------------------------------------------------------------------------------------------
# Request decoding (pure)
# --------------------------------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _content_text(content: object) -> str:
    """A message's text: a string, or the text parts of an OpenAI-style content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _decode_request(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    return body


def _question_and_knobs(body: Mapping[str, Any]) -> tuple[str, Knobs, int]:
    """(question, knobs, prompt_tokens) from the messages; the directive is read from the last
    user message only."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _BadRequest("'messages' must be a list of objects", "messages")
    texts = [_content_text(m.get("content")) for m in messages]
    user = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    question, knobs = parse_directive(texts[user[-1]]) if user else ("", Knobs())
    prompt_tokens = sum(len(_DIRECTIVE_RE.sub(" ", t).split()) for t in texts)
    return question, knobs, max(prompt_tokens, 1)


# --------------------------------------------------------------------------------------------
# The server (I/O)
# --------------------------------------------------------------------------------------------


# -- fast mode (benchmarks) ------------------------------------------------------------------

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
        self, fast: _FastRender, pieces: tuple[str, ...], rate: float, rec: RequestRecord
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


@dataclass(eq=False)
class RequestRecord:
    """What the mock saw of one streaming request, and how it ended."""

    tag: str | None
    path: str
    body: Any
    authorization: str | None
    status: int | None = None
    chunks_sent: int = 0
    outcome: Outcome = "open"
    fault: FaultKind | None = None
    #: Body bytes handed to the transport (an endless line shows how much the client took).
    bytes_sent: int = 0
    #: `: ping` heartbeats written because of keepalive_ms.
    keepalives_sent: int = 0
    #: Whether the client went away while the handler ran (seen through handler cancellation).
    client_gone: bool = False
    #: time.monotonic_ns() when the handler finished (the benchmark joins it with the times its
    #: clients cancelled, to measure cancel-to-upstream-close).
    ended_ns: int | None = None
    #: time.monotonic_ns() when the mock's server first heard that the connection was lost
    #: (aiohttp's connection_lost, before the handler's cancellation is even scheduled): when
    #: the upstream learned of a cancel, without the mock's own task switches after it.
    closed_ns: int | None = None
    #: The client's address ("host:port"): requests that share it came over one kept-alive
    #: connection (tests check that the gateway pools its upstream connections).
    peer: str | None = None
    #: Set when the handler finished for any reason (client disconnect included).
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    #: Set when the requested fault took effect (e.g. the stall began, the reset happened).
    fault_fired: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "path": self.path,
            "body": self.body,
            "authorization": self.authorization,
            "status": self.status,
            "chunks_sent": self.chunks_sent,
            "outcome": self.outcome,
            "fault": self.fault,
            "bytes_sent": self.bytes_sent,
            "keepalives_sent": self.keepalives_sent,
            "ended": self.ended.is_set(),
            "ended_ns": self.ended_ns,
            "closed_ns": self.closed_ns,
            "peer": self.peer,
        }


def _json_response(obj: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_dumps(obj), content_type="application/json")


def _client_closed(rec: RequestRecord, exc: ConnectionResetError) -> None:
    """The gateway went away mid-answer. aiohttp keeps the exception on the request's body
    reader, and its traceback holds this handler's frames, which hold the request: a reference
    cycle per dropped request unless the traceback goes."""
    rec.outcome = "client_closed"
    exc.__traceback__ = None


class MockUpstream:
    """The fake upstream server; see the module docstring for routes and knobs."""

    def __init__(
        self,
        default_delay_ms: float = 35.0,
        require_key: str | None = None,
        *,
        max_records: int = 10_000,
    ) -> None:
        self.default_delay_ms = default_delay_ms
        self.require_key = require_key
        #: Streaming requests in arrival order; only the newest `max_records` are kept, so that
        #: a long demo or load test does not grow without bound.
        self.records: list[RequestRecord] = []
        self.max_records = max_records
        self.open_requests = 0
        self._total = 0
        self._outcomes: Counter[str] = Counter()
        #: Requests seen per tag among those with `times=N` (which errors only N times).
        self._times_seen: Counter[str] = Counter()
        self.base_url: str | None = None
        self._runner: web.AppRunner | None = None
        self._handler_tasks: set[asyncio.Task[Any]] = set()
        #: The record of each connection's request in flight (for `closed_ns`).
        self._in_flight: dict[object, RequestRecord] = {}
        self._stopping = False
        # Replaced on every change; waiters re-check their condition when it fires.
        self._changed = asyncio.Event()
        #: Paces every fast=1 rate=R stream with one timer.
        self._pacer = _Pacer()

    # -- lifecycle --------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application()
        for path, dialect in ROUTES.items():
            app.router.add_post(path, self._stream_handler(dialect))
        app.router.add_get("/_mock/stats", self._stats)
        app.router.add_post("/_mock/reset", self._reset)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 = any free port); return the base URL."""
        if self._runner is not None:
            raise RuntimeError("mock upstream already started")
        # handler_cancellation: a client disconnect cancels its handler, which is how we see it.
        runner = web.AppRunner(self.make_app(), handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        self._stamp_connection_lost(runner.server)
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.base_url = f"http://{shown}:{bound_port}"
        return self.base_url

    def _stamp_connection_lost(self, server: web.Server | None) -> None:
        """Stamp `closed_ns` on the request in flight when its connection is lost. aiohttp has
        no hook for it: its per-connection handler tells the server first thing in its own
        connection_lost, so the server's method is wrapped (on this instance only)."""
        if server is None:
            return
        lost = server.connection_lost
        in_flight = self._in_flight

        def connection_lost(handler: Any, exc: BaseException | None) -> None:
            rec = in_flight.get(handler)
            if rec is not None and rec.closed_ns is None:
                rec.closed_ns = time.monotonic_ns()
            lost(handler, exc)

        server.connection_lost = connection_lost  # type: ignore[method-assign,assignment]

    async def stop(self) -> None:
        """Cut every open stream (outcome "server_stopped") and close the listener."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping = True
        try:
            for task in list(self._handler_tasks):
                task.cancel()
            # runner.cleanup() below force-closes whatever is still left.
            with contextlib.suppress(TimeoutError):
                await self.wait_idle(timeout=5.0)
            await runner.cleanup()
        finally:
            self._stopping = False

    async def __aenter__(self) -> MockUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- observation ------------------------------------------------------------------------

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_until(self, predicate: Callable[[], bool], limit: float) -> None:
        async with asyncio.timeout(limit):
            while not predicate():
                await self._changed.wait()

    async def wait_idle(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 (API)
        """Wait until no streaming request is open (TimeoutError otherwise)."""
        await self._wait_until(lambda: self.open_requests == 0, timeout)

    def record(self, tag: str) -> RequestRecord:
        """The most recent request tagged `tag` (KeyError if none)."""
        for rec in reversed(self.records):
            if rec.tag == tag:
                return rec
        raise KeyError(tag)

    async def wait_request(self, tag: str, timeout: float = 5.0) -> RequestRecord:  # noqa: ASYNC109
        """Wait until a request tagged `tag` has arrived; return its record."""
        await self._wait_until(lambda: any(r.tag == tag for r in self.records), timeout)
        return self.record(tag)

    def stats(self, *, records: bool = True, tag: str | None = None) -> dict[str, Any]:
        """Counters since start (or the last reset) and the retained records, as JSON.

        `records=False` leaves the records out (a poller wants the counters, and ten thousand
        records are a megabyte of JSON); `tag` keeps only the records with that tag.
        """
        stats: dict[str, Any] = {
            "open": self.open_requests,
            "total": self._total,
            "completed": self._outcomes["completed"],
            "client_closed": self._outcomes["client_closed"],
        }
        if records:
            stats["records"] = [r.to_json() for r in self.records if tag is None or r.tag == tag]
        return stats

    async def _stats(self, request: web.Request) -> web.Response:
        query = request.query
        with_records = query.get("records", "1")
        if with_records not in ("0", "1"):
            error = {"message": "records must be 0 or 1", "param": "records", "code": 400}
            return _json_response({"error": error}, status=400)
        return _json_response(self.stats(records=with_records == "1", tag=query.get("tag")))

    async def _reset(self, request: web.Request) -> web.Response:
        cleared = len(self.records)
        self.records.clear()
        self._total = 0
        self._outcomes.clear()
        self._times_seen.clear()
        self._notify()
        return _json_response({"cleared": cleared})

    # -- streaming endpoints ----------------------------------------------------------------

    def _stream_handler(
        self, dialect: Dialect
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._handle(request, dialect)

        return handler

    async def _handle(self, request: web.Request, dialect: Dialect) -> web.StreamResponse:
        raw = await request.read()
        body: dict[str, Any] | None = None
        problem: _BadRequest | DirectiveError | None = None
        question, knobs, prompt_tokens = "", Knobs(), 1
        try:
            body = _decode_request(raw)
            question, knobs, prompt_tokens = _question_and_knobs(body)
            validate_for_dialect(knobs, dialect)
        except (_BadRequest, DirectiveError) as exc:
            problem = exc
        rec = RequestRecord(
            tag=knobs.tag,
            path=request.path,
            body=body,
            authorization=request.headers.get(hdrs.AUTHORIZATION),
            fault=knobs.fault,
            peer=_peer(request),
        )
        task = asyncio.current_task()
        self._in_flight[request.protocol] = rec
        self.records.append(rec)
        if len(self.records) > self.max_records:
            del self.records[: len(self.records) - self.max_records]
        self._total += 1
        self.open_requests += 1
        if task is not None:
            self._handler_tasks.add(task)
        self._notify()
        try:
            if self.require_key is not None and rec.authorization != f"Bearer {self.require_key}":
                return await self._send_error(request, rec, 401, "html")
            if problem is not None:
                return await self._send_bad_request(request, rec, problem)
            assert body is not None
            if body.get("stream") is not True:
                problem = _BadRequest(
                    'the mock upstream only streams: set "stream": true', "stream"
                )
                return await self._send_bad_request(request, rec, problem)
            if knobs.header_delay_ms > 0:
                await asyncio.sleep(knobs.header_delay_ms / 1000)
            if knobs.status is not None and self._error_due(knobs):
                return await self._send_error(
                    request, rec, knobs.status, knobs.body, knobs.retry_after
                )
            spec = self._spec(dialect, body, question, knobs, prompt_tokens)
            if knobs.fast:
                return await self._stream_fast(request, rec, spec)
            if knobs.ignore_close:
                return await self._stream_ignoring_close(request, rec, spec)
            return await self._stream(request, rec, spec)
        except asyncio.CancelledError:
            rec.client_gone = not self._stopping
            if rec.outcome == "open":
                rec.outcome = "server_stopped" if self._stopping else "client_closed"
            raise
        except Exception:
            if rec.outcome == "open":
                rec.outcome = "error_status"
                rec.status = rec.status or 500
            raise
        finally:
            if task is not None:
                self._handler_tasks.discard(task)
            if self._in_flight.get(request.protocol) is rec:
                del self._in_flight[request.protocol]
            self.open_requests -= 1
            self._outcomes[rec.outcome] += 1
            rec.ended_ns = time.monotonic_ns()
            rec.ended.set()
            self._notify()

    def _error_due(self, knobs: Knobs) -> bool:
        """Whether this request gets its `status`: always, or with `times=N` only the first N
        requests of its tag."""
        if knobs.times is None or knobs.tag is None:
            return True
        self._times_seen[knobs.tag] += 1
        return self._times_seen[knobs.tag] <= knobs.times

    async def _stream_ignoring_close(
        self, request: web.Request, rec: RequestRecord, spec: StreamSpec
    ) -> web.StreamResponse:
        """`ignore_close=1`: run the stream in its own task that a disconnect does not cancel.

        aiohttp reports a disconnect by cancelling the handler; the handler then waits for the
        stream task, which notices only when a write fails. `stop()` still cancels both (the
        task is registered with the handler tasks).
        """
        task = asyncio.get_running_loop().create_task(
            self._stream(request, rec, spec), name=f"mock stream ignoring close {rec.tag}"
        )
        self._handler_tasks.add(task)
        task.add_done_callback(self._handler_tasks.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if self._stopping:
                task.cancel()
            else:
                rec.client_gone = True
                # Keep writing: the shielded task runs on until a write fails. Another
                # cancellation here (stop()) also reaches the task through _handler_tasks.
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                if rec.outcome in ("open", "completed"):
                    rec.outcome = "client_closed"
            raise

    def _spec(
        self,
        dialect: Dialect,
        body: Mapping[str, Any],
        question: str,
        knobs: Knobs,
        prompt_tokens: int,
    ) -> StreamSpec:
        answer = choose_answer(question)
        model = body.get("model")
        options = body.get("stream_options")
        return StreamSpec(
            dialect=dialect,
            model=model if isinstance(model, str) and model else DEFAULT_MODELS[dialect],
            answer=answer,
            pieces=tuple(text_chunks(answer.text, knobs.chunks, knobs.words)),
            prompt_tokens=prompt_tokens,
            knobs=knobs,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            request_id=f"chatcmpl-{uuid.uuid4().hex[:24]}"
            if dialect == "openai"
            else str(uuid.uuid4()),
            created=int(time.time()),
        )

    async def _send_bad_request(
        self, request: web.Request, rec: RequestRecord, problem: _BadRequest | DirectiveError
    ) -> web.StreamResponse:
        param = problem.key if isinstance(problem, DirectiveError) else problem.param
        error = {
            "message": str(problem),
            "type": "invalid_request_error",
            "param": param,
            "code": 400,
        }
        return await self._send(request, rec, 400, _dumps({"error": error}), "application/json")

    async def _send_error(
        self,
        request: web.Request,
        rec: RequestRecord,
        status: int,
        kind: BodyKind,
        retry_after: str | None = None,
    ) -> web.StreamResponse:
        payload, content_type = error_body(status, kind)
        headers: dict[str, str] = {hdrs.RETRY_AFTER: retry_after} if retry_after is not None else {}
        return await self._send(request, rec, status, payload, content_type, headers)

    async def _send(
        self,
        request: web.Request,
        rec: RequestRecord,
        status: int,
        payload: bytes,
        content_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        """Send a whole non-stream answer inside the handler, so `ended` means "sent"."""
        resp = web.Response(status=status, body=payload, content_type=content_type, headers=headers)
        rec.status = status
        rec.outcome = "error_status"
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionResetError as exc:
            _client_closed(rec, exc)
        return resp

    async def _stream(
        self, request: web.Request, rec: RequestRecord, spec: StreamSpec
    ) -> web.StreamResponse:
        delay = (
            spec.knobs.delay_ms if spec.knobs.delay_ms is not None else self.default_delay_ms
        ) / 1000
        resp = web.StreamResponse(
            status=200,
            headers={
                hdrs.CONTENT_TYPE: "text/event-stream; charset=utf-8",
                hdrs.CACHE_CONTROL: "no-cache",
                "X-Request-Id": spec.request_id,
            },
        )
        try:
            await resp.prepare(request)
            rec.status = 200
            paced_before = False
            for step in plan_stream(spec):
                if isinstance(step, Fault):
                    rec.fault_fired.set()
                    await self._perform(request, resp, rec, step, spec)
                    return resp
                if step.paced:
                    if paced_before and delay > 0:
                        await self._pause(resp, rec, spec, delay)
                    elif delay == 0:
                        # write() does not suspend while the transport takes the data, so an
                        # unpaced stream to a fast reader would starve every other request.
                        await asyncio.sleep(0)
                    paced_before = True
                await self._write(request, resp, rec, step.data, spec.knobs.bytewise)
                if step.kind == "text":
                    rec.chunks_sent += 1
                elif step.kind == "fault":
                    rec.fault_fired.set()
            if spec.knobs.linger_ms is not None:
                await asyncio.sleep(spec.knobs.linger_ms / 1000)
            await resp.write_eof()
            rec.outcome = "completed"
        except ConnectionResetError as exc:  # aiohttp: "Cannot write to closing transport"
            _client_closed(rec, exc)
        return resp

    async def _stream_fast(
        self, request: web.Request, rec: RequestRecord, spec: StreamSpec
    ) -> web.StreamResponse:
        """fast=1: pre-rendered events in big writes (no rate), or paced by the shared pacer
        (rate=R). A client that goes away cancels the handler, as on the slow path."""
        resp = web.StreamResponse(
            status=200,
            headers={
                hdrs.CONTENT_TYPE: "text/event-stream; charset=utf-8",
                hdrs.CACHE_CONTROL: "no-cache",
                "X-Request-Id": spec.request_id,
            },
        )
        fast = _FastRender(spec)
        try:
            await resp.prepare(request)
            rec.status = 200
            if spec.knobs.rate is None:
                await self._write_fast(resp, rec, fast, spec.pieces)
            else:
                # Headers and preamble through aiohttp; then the pacer writes chunked-encoding
                # frames to the transport itself, and write_eof() ends the body as usual.
                if fast.preamble:
                    await resp.write(fast.preamble)
                    rec.bytes_sent += len(fast.preamble)
                else:
                    # aiohttp 3.11+ holds the headers back for the first body write; before,
                    # prepare() wrote them and there is no send_headers().
                    send_headers = getattr(request.writer, "send_headers", None)
                    if send_headers is not None:
                        send_headers()
                job = _PacedJob(fast, spec.pieces, spec.knobs.rate, rec)
                try:
                    self._pacer.add(job, request.transport)
                    await job.done
                finally:
                    job.finished = True
            await resp.write_eof()
            rec.outcome = "completed"
        except ConnectionResetError as exc:
            _client_closed(rec, exc)
        return resp

    @staticmethod
    async def _write_fast(
        resp: web.StreamResponse, rec: RequestRecord, fast: _FastRender, pieces: tuple[str, ...]
    ) -> None:
        batch = [fast.preamble]
        size = len(fast.preamble)
        stamp = time.monotonic_ns()
        for piece in pieces:
            if size >= FAST_BATCH_BYTES:
                data = b"".join(batch)
                await resp.write(data)
                rec.bytes_sent += len(data)
                batch.clear()
                size = 0
                # write() does not suspend while the transport takes the data: yield, so the
                # other streams (and the pacer) get their turn.
                await asyncio.sleep(0)
                stamp = time.monotonic_ns()
            event = fast.text(piece, stamp)
            batch.append(event)
            size += len(event)
            rec.chunks_sent += 1
        batch.append(fast.finale())
        data = b"".join(batch)
        await resp.write(data)
        rec.bytes_sent += len(data)

    @staticmethod
    async def _pause(
        resp: web.StreamResponse, rec: RequestRecord, spec: StreamSpec, wait: float
    ) -> None:
        """Sleep `wait` seconds, sending `: ping` heartbeats meanwhile if keepalive_ms says so."""
        if spec.knobs.keepalive_ms is None:
            await asyncio.sleep(wait)
            return
        ping = keepalive_comment(spec.eol)
        elapsed = 0.0
        for offset in keepalive_offsets(wait, spec.knobs.keepalive_ms / 1000):
            await asyncio.sleep(offset - elapsed)
            elapsed = offset
            await resp.write(ping)
            rec.bytes_sent += len(ping)
            rec.keepalives_sent += 1
        await asyncio.sleep(wait - elapsed)

    async def _perform(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        rec: RequestRecord,
        fault: Fault,
        spec: StreamSpec,
    ) -> None:
        if fault.kind == "stall":
            # Hold the connection open until the client goes away (its handler gets cancelled,
            # or with ignore_close a heartbeat fails) or the server stops.
            keepalive_ms = spec.knobs.keepalive_ms
            if keepalive_ms is None:
                await asyncio.Event().wait()
                return
            ping = keepalive_comment(spec.eol)
            while True:
                await asyncio.sleep(keepalive_ms / 1000)
                await self._write(request, resp, rec, ping, False)
                rec.keepalives_sent += 1
        elif fault.kind == "endless":
            # One data line that never ends: "data: " then x's, 64 KiB per write, until the
            # client goes away (a failed write raises ConnectionResetError; a disconnect
            # otherwise cancels the handler). write() drains, so this is paced by the client.
            piece = b"x" * ENDLESS_WRITE_BYTES
            await self._write(request, resp, rec, b"data: ", False)
            while True:
                await self._write(request, resp, rec, piece, False)
                await asyncio.sleep(0)  # fair to other requests while the reader keeps up
        elif fault.kind == "eof":
            # A clean end without any terminal marker (chunked terminator included).
            await resp.write_eof()
            rec.outcome = "fault"
        else:  # reset
            transport = request.transport
            if transport is not None:
                # Let what was written reach the socket first: abort() drops the write buffer.
                transport.set_write_buffer_limits(high=0)
                await request.writer.drain()
                transport.abort()
            rec.outcome = "fault"

    @staticmethod
    async def _write(
        request: web.Request,
        resp: web.StreamResponse,
        rec: RequestRecord,
        data: bytes,
        bytewise: bool,
    ) -> None:
        if not bytewise:
            await resp.write(data)
            rec.bytes_sent += len(data)
            return
        view = memoryview(data)
        for i in range(len(view)):
            await resp.write(view[i : i + 1])
            rec.bytes_sent += 1
            await request.writer.drain()
            # Yield so that every byte can reach the peer on its own.
            await asyncio.sleep(0)


async def serve_forever(
    host: str = "127.0.0.1",
    port: int = 8081,
    default_delay_ms: float = 35.0,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run a MockUpstream until cancelled (the `python -m gateway mock-upstream` command)."""
    mock = MockUpstream(default_delay_ms=default_delay_ms)
    url = await mock.start(host, port)
    print(
        f"mock upstream listening on {url} (POST /perplexity /openai /events; GET /_mock/stats)",
        flush=True,
    )
    if on_ready is not None:
        on_ready(url)
    try:
        await asyncio.Event().wait()
    finally:
        await mock.stop()


def _peer(request: web.Request) -> str | None:
    peername = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peername[0]}:{peername[1]}" if peername else None
