"""The mock upstream's canned answers (pure): what it says, and how a stream cuts it up.

`choose_answer` picks an answer for a question, deterministically; `text_chunks` cuts its text
into the pieces a stream sends (the ``chunks`` and ``words`` knobs).

Besides the topical prose answers (`ANSWERS`), two Markdown answers (`MARKDOWN_ANSWERS`) show
what a client page must render, and render safely: ask about "markdown" for headings, a list, a
code block and a table; ask about "xss" for an answer that carries an ``<img onerror>``, a
``<script>``, a ``javascript:`` link and a remote image (inert on a page that sanitises; the
demo page's test proves it). They are chosen only by those keywords, never for an off-topic
question, and they keep their layout when streamed: their whitespace is their meaning.
"""

from __future__ import annotations

import re
import textwrap
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


def _markdown(keywords: str, text: str, *sources: tuple[str, str, str]) -> Answer:
    """An answer whose line breaks and indentation are kept (Markdown)."""
    return Answer(
        frozenset(keywords.split()),
        textwrap.dedent(text).strip(),
        tuple(Source(*s) for s in sources),
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
    _answer(
        "ocean oceans sea seas salt salty saltwater salinity seawater",
        """The ocean is salty because rivers carry dissolved minerals into it[1]. Rain is
        slightly acidic, so it weathers rocks and washes sodium, calcium and other ions
        downstream; when seawater evaporates the water leaves and the salts stay behind[1][2].
        Hydrothermal vents on the sea floor add more, and over hundreds of millions of years the
        inflow and the minerals settling into sediments have balanced at about 3.5 percent
        salt[2][3].""",
        (
            "Why is the ocean salty? - NOAA",
            "https://oceanservice.noaa.gov/facts/whysalty.html",
            "2024-06-16",
        ),
        (
            "Seawater - Wikipedia",
            "https://en.wikipedia.org/wiki/Seawater",
            "2025-02-11",
        ),
        (
            "Salinity - NASA Earth Observatory",
            "https://earthobservatory.nasa.gov/features/OceanSalinity",
            "2023-11-02",
        ),
    ),
    _answer(
        "tide tides tidal moon lunar gravity high low ebb flood",
        """Tides are the rise and fall of the sea caused mostly by the Moon's gravity[1]. The
        Moon pulls hardest on the side of the Earth facing it and least on the far side, which
        stretches the oceans into two bulges; as the Earth turns through them, most coasts get
        two high and two low tides a day[1][2]. The Sun adds a smaller pull: tides are strongest
        when Sun and Moon line up and weakest at right angles[3].""",
        (
            "Tides and water levels - NOAA",
            "https://oceanservice.noaa.gov/education/tutorial_tides/",
            "2024-02-26",
        ),
        ("Tide - Wikipedia", "https://en.wikipedia.org/wiki/Tide", "2025-01-30"),
        (
            "What causes tides? - NASA Space Place",
            "https://spaceplace.nasa.gov/tides/",
            "2024-09-12",
        ),
    ),
)

#: Answers in Markdown for client pages to render: chosen by their keywords only (see the module
#: docstring). Their text is the model's raw output, markup and all.
MARKDOWN_ANSWERS: Final[tuple[Answer, ...]] = (
    _markdown(
        "markdown formatting formatted",
        """
        ## Streaming answers over one WebSocket

        The gateway relays each upstream delta as a `text_chunk` frame, so a page can render
        the answer **while it is still being written**[1]. What one socket gives you:

        - many streams at once, each named by an id the client chooses[1]
        - *cancel* any stream mid-flight: the upstream request closes at once[2]
        - resume after a dropped connection

        ```python
        async with GatewayClient("ws://127.0.0.1:8080/v1/ws") as gw:
            stream = await gw.start("Why is the sky blue?")
            async for chunk in stream:
                print(chunk, end="")
        ```

        | Frame | Direction | Meaning |
        |---|---|---|
        | `start` | client to server | ask a question |
        | `text_chunk` | server to client | the next piece of the answer |
        | `done` | server to client | the whole answer and its sources[3] |
        """,
        (
            "The WebSocket API (WebSockets) - MDN",
            "https://developer.mozilla.org/en-US/docs/Web/API/WebSockets_API",
            "2025-03-13",
        ),
        (
            "Streaming API responses - OpenAI",
            "https://platform.openai.com/docs/guides/streaming-responses",
            "2025-03-11",
        ),
        (
            "GitHub Flavored Markdown Spec",
            "https://github.github.com/gfm/",
            "2019-04-06",
        ),
    ),
    _markdown(
        "xss injection sanitize sanitise sanitizer sanitiser",
        """
        ## Model output is untrusted input

        A prompt injection can make a model write HTML[1]. A page that inserted this answer
        as HTML would run the next two lines:

        <img src=x onerror="window.answerScriptRan='img';document.title='owned'">

        <script>window.answerScriptRan='script';document.title='owned'</script>

        and this [harmless-looking link](javascript:window.answerScriptRan='link') runs script
        when clicked[2]. Even an image leaks: loading
        ![a pixel](https://tracker.example/pixel.png?read=1) tells its server who reads the
        answer. Render answers with a Markdown parser followed by an HTML sanitiser such as
        DOMPurify, never with `innerHTML` alone[2][3].
        """,
        (
            "Cross Site Scripting Prevention Cheat Sheet - OWASP",
            "https://cheatsheetseries.owasp.org/cheatsheets/Cross_Site_Scripting_Prevention_Cheat_Sheet.html",
            "2025-02-01",
        ),
        (
            "Element: innerHTML property, security considerations - MDN",
            "https://developer.mozilla.org/en-US/docs/Web/API/Element/innerHTML",
            "2025-04-10",
        ),
        ("DOMPurify", "https://github.com/cure53/DOMPurify", "2025-05-20"),
    ),
)

_WORD_RE: Final = re.compile(r"[a-z0-9]+")
#: A word with the whitespace after it (how an answer that keeps its layout is cut).
_LAID_OUT_WORD_RE: Final = re.compile(r"\S+\s*")
#: Texts streamed with their layout (line breaks, indentation) rather than single spaces.
_KEEPS_LAYOUT: Final = frozenset(a.text for a in MARKDOWN_ANSWERS)


def choose_answer(question: str) -> Answer:
    """Pick the canned answer sharing most keywords with the question (the prose answers win a
    tie); a stable hash of the question picks a prose answer for a no-match (crc32, not
    `hash()`, which is salted per process)."""
    words = set(_WORD_RE.findall(question.lower()))
    candidates = ANSWERS + MARKDOWN_ANSWERS
    scores = [len(words & a.keywords) for a in candidates]
    best = max(scores)
    if best > 0:
        return candidates[scores.index(best)]
    normalized = " ".join(question.lower().split())
    return ANSWERS[zlib.crc32(normalized.encode()) % len(ANSWERS)]


def _words(text: str) -> tuple[list[str], str]:
    """The text's words, each with the whitespace that follows it, and the separator the last
    one gets when a stream cycles back to the first. Prose is cut on whitespace and rejoined with
    single spaces; a Markdown answer keeps its own whitespace (a line break or an indented code
    line means something there) and starts a new paragraph when it repeats."""
    if text in _KEEPS_LAYOUT:
        words = _LAID_OUT_WORD_RE.findall(text)
        if words:
            words[-1] += "\n\n"
        return words, "\n\n"
    return [word + " " for word in text.split()], " "


def text_chunks(text: str, count: int | None = None, words: int = 1) -> list[str]:
    """Split an answer into `count` chunks of `words` words, each word with its following space
    (none after the last chunk), cycling through the answer's words when they run out. Without
    `count`, just enough chunks to cover the answer once. A Markdown answer's words keep the
    whitespace that follows them (see `_words`)."""
    if words < 1:
        raise ValueError("words must be positive")
    vocab, end = _words(text)
    size = len(vocab)
    if count is None:  # the answer once, the last chunk as long as the words left
        spans = ["".join(vocab[i : i + words]) for i in range(0, size, words)]
        if spans:
            spans[-1] = spans[-1].removesuffix(end)
        return spans
    n = count
    if not vocab or n == 0:
        return []
    # A chunk starts at one of `size` offsets, so chunks are shared strings: a million-chunk
    # stream (a load or slow-client test) costs a list of references, not a million strings.
    cache: dict[int, str] = {}

    def piece(start: int) -> str:
        if start not in cache:
            cache[start] = "".join(vocab[(start + j) % size] for j in range(words))
        return cache[start]

    pieces = [piece(i * words % size) for i in range(n)]
    pieces[-1] = pieces[-1].rstrip()
    return pieces
