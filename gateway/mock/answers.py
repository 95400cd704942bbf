"""The mock upstream's canned answers (pure): what it says, and how a stream cuts it up.

`choose_answer` picks an answer for a question, deterministically; `text_chunks` cuts its text
into the pieces a stream sends (the ``chunks`` and ``words`` knobs).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Final


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
