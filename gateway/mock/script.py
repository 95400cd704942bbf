"""Scripted answers with typed parts (pure): what a stream says besides its text (issue 18).

The typed-parts knobs (``reasoning``, ``tools``, ``sources``, ``concise``, ``refusal``,
``choices``; see `gateway.mock.knobs`) turn the plain list of text pieces into a list of
`Part`s: reasoning pieces, tool-call starts and argument fragments, progress steps, refusal text,
the pieces of other choices. `build_parts` makes that list; a wire format
(`gateway.mock.formats`) renders each part as its API does. A plain text piece stays a `str`,
so an unscripted stream is exactly what it was.

The canned content here (the reasoning, the tool calls, the extra sources) is derived from the
answer, deterministically, so a test knows what to expect without a table of its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final

from gateway.mock.answers import ANSWERS, Answer, Source, text_chunks
from gateway.mock.knobs import Knobs

# --------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reasoning:
    """A piece of reasoning, in a field of its own (reasoning_content, reasoning, ...)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolStart:
    """The first chunk of a tool call: its index, id and name (arguments "")."""

    index: int
    call_id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolArgs:
    """A fragment of a tool call's JSON arguments, by the call's index."""

    index: int
    fragment: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One whole call: what a test expects the gateway to relay."""

    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class WholeCalls:
    """Whole calls in one delta with no ``index`` (Mistral)."""

    calls: tuple[ToolCall, ...]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A piece of ``delta.refusal`` text."""

    text: str


@dataclass(frozen=True, slots=True)
class ChoiceStart:
    """The role chunk of choice `index` (choices=N; choice 0's is the preamble)."""

    index: int


@dataclass(frozen=True, slots=True)
class ChoiceText:
    """A text piece of choice `index`."""

    index: int
    text: str


@dataclass(frozen=True, slots=True, eq=False)
class ProgressStep:
    """One Perplexity reasoning step (concise mode's ``chat.reasoning``), as the API types it:
    ``{"thought", "type", <type>: {...}}``."""

    step: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ReasoningDone:
    """The end of Perplexity's reasoning stage (``chat.reasoning.done``)."""


Part = (
    str
    | Reasoning
    | ToolStart
    | ToolArgs
    | WholeCalls
    | Refusal
    | ChoiceStart
    | ChoiceText
    | ProgressStep
    | ReasoningDone
)


def is_answer_text(part: Part) -> bool:
    """Whether the part carries the relayed answer's text (counted in ``chunks_sent``)."""
    return isinstance(part, str | Refusal) or (isinstance(part, ChoiceText) and part.index == 0)


# --------------------------------------------------------------------------------------------
# Canned content, derived from the answer
# --------------------------------------------------------------------------------------------

THINK_OPEN: Final = "<think>"
THINK_CLOSE: Final = "</think>"
REFUSAL_TEXT: Final = "I'm sorry, but I can't help with that request."


def _topic(answer: Answer) -> str:
    return answer.sources[0].title.split(" - ")[0] if answer.sources else "this question"


def reasoning_text(answer: Answer) -> str:
    """The reasoning a scripted answer starts with."""
    titles = "; ".join(s.title for s in answer.sources) or "none"
    return (
        f"The user asks about {_topic(answer)}. I found {len(answer.sources)} sources: "
        f"{titles}. They agree on the main points, so I will explain those briefly and cite "
        "each one."
    )


def think_block(answer: Answer, closed: bool = True) -> str:
    """The ``<think>`` block before the answer (its text, without the answer)."""
    inner = f"{THINK_OPEN}\n{reasoning_text(answer)}"
    return f"{inner}\n{THINK_CLOSE}\n\n" if closed else inner


def source_list(answer: Answer, count: int) -> tuple[Source, ...]:
    """`count` sources: the answer's own, then numbered made-up ones."""
    extra = tuple(
        Source(
            title=f"Mock source {k} - Example Encyclopedia",
            url=f"https://example.org/mock/{k}",
            date=f"2025-{(k % 12) + 1:02d}-01",
        )
        for k in range(len(answer.sources) + 1, count + 1)
    )
    return (answer.sources + extra)[:count]


def search_result(source: Source) -> dict[str, str]:
    """A source as Perplexity's ``search_results`` entry (APIPublicSearchResult)."""
    return {
        "title": source.title,
        "url": source.url,
        "date": source.date,
        "last_updated": source.date,
        "snippet": f"{source.title}: what this page says about the question.",
        "source": "web",
    }


def progress_steps(answer: Answer, sources: tuple[Source, ...]) -> tuple[dict[str, Any], ...]:
    """Perplexity's reasoning steps for concise mode: a web search, a URL fetch, a code run."""
    topic = _topic(answer)
    found = [search_result(s) for s in sources[:3]]
    steps: list[dict[str, Any]] = [
        {
            "thought": f"Searching the web for {topic}...",
            "type": "web_search",
            "web_search": {
                "search_keywords": [topic, f"{topic} explained"],
                "search_results": found,
            },
        }
    ]
    if found:
        steps.append(
            {
                "thought": f"Reading {found[0]['title']}",
                "type": "fetch_url_content",
                "fetch_url_content": {"contents": found[:1]},
            }
        )
    steps.append(
        {
            "thought": "Checking the count of sources with a short calculation",
            "type": "execute_python",
            "execute_python": {"code": "print(len(sources))", "result": str(len(found))},
        }
    )
    return tuple(steps)


#: The tool calls scripted by tools=: (name, arguments). bad_json's arguments look complete
#: but are not JSON (an unquoted value).
_CALLS: Final = (
    ("get_weather", '{"location": "Paris, France", "unit": "celsius"}'),
    ("get_time", '{"timezone": "Europe/Paris"}'),
)
_BAD_CALL: Final = ("get_weather", '{"location": "Paris, France", "unit": celsius}')
_ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: Argument fragments' lengths, in turn (real ones are a token or two each).
_FRAGMENT_SIZES: Final = (2, 4, 3, 5, 1, 4)


def _call_id(seed: str, index: int, mistral: bool) -> str:
    """A call id in the provider's style: OpenAI ``call_`` + 24, Mistral 9 characters."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    chars = "".join(_ALPHABET[b % len(_ALPHABET)] for b in digest)
    return chars[:9] if mistral else f"call_{chars[:24]}"


def tool_calls(knobs: Knobs, seed: str) -> tuple[ToolCall, ...]:
    """The calls tools= scripts (ids from `seed`, the stream's request id)."""
    if knobs.tools is None:
        return ()
    mistral = knobs.tools == "no_index"
    chosen = {"1": _CALLS[:1], "2": _CALLS, "bad_json": (_BAD_CALL,), "no_index": _CALLS}[
        knobs.tools
    ]
    return tuple(
        ToolCall(_call_id(seed, i, mistral), name, args) for i, (name, args) in enumerate(chosen)
    )


def _fragments(arguments: str) -> list[str]:
    out: list[str] = []
    start = 0
    while start < len(arguments):
        size = _FRAGMENT_SIZES[len(out) % len(_FRAGMENT_SIZES)]
        out.append(arguments[start : start + size])
        start += size
    return out


def _cut(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


# --------------------------------------------------------------------------------------------
# The script
# --------------------------------------------------------------------------------------------


def build_parts(
    answer: Answer, knobs: Knobs, pieces: tuple[str, ...], seed: str
) -> tuple[Part, ...]:
    """The body of a scripted stream, in wire order (after the format's preamble).

    `pieces` are the answer's text chunks (the chunks and words knobs); `seed` makes the tool
    call ids. Without a typed-parts knob the body is `pieces` itself."""
    if not knobs.scripted:
        return pieces
    if knobs.refusal:
        return tuple(Refusal(p) for p in text_chunks(REFUSAL_TEXT, knobs.chunks, knobs.words))
    if knobs.choices > 1:
        return _choices(answer, knobs, pieces)
    parts: list[Part] = []
    if knobs.concise:
        count = knobs.sources.count if knobs.sources is not None else len(answer.sources)
        parts += [ProgressStep(s) for s in progress_steps(answer, source_list(answer, count))]
        parts.append(ReasoningDone())
    text: list[str] = [] if knobs.tools is not None else list(pieces)
    reasoning = text_chunks(reasoning_text(answer), None, knobs.words)
    if knobs.reasoning in ("think", "think_open"):
        closed = knobs.reasoning == "think"
        content = [THINK_OPEN, "\n", *reasoning]
        content += ["\n", THINK_CLOSE, "\n\n", *text] if closed else []
        if knobs.think_split is not None:
            content = _cut("".join(content), knobs.think_split)
        parts += content
    else:
        if knobs.reasoning is not None:
            parts += [Reasoning(p) for p in reasoning]
        parts += text
    calls = tool_calls(knobs, seed)
    if knobs.tools == "no_index":
        parts.append(WholeCalls(calls))
    else:
        for i, call in enumerate(calls):
            parts.append(ToolStart(i, call.call_id, call.name))
            parts += [ToolArgs(i, f) for f in _fragments(call.arguments)]
    return tuple(parts)


def other_answer(answer: Answer, k: int) -> Answer:
    """The answer choice `k` (> 0) gives: another canned answer, so choices differ."""
    start = ANSWERS.index(answer) if answer in ANSWERS else 0
    return ANSWERS[(start + k) % len(ANSWERS)]


def _choices(answer: Answer, knobs: Knobs, pieces: tuple[str, ...]) -> tuple[Part, ...]:
    """n>1: the choices' pieces round-robin (as OpenAI interleaves them), each choice's role
    chunk before its first piece (choice 0's is the preamble)."""
    texts = [list(pieces)] + [
        text_chunks(other_answer(answer, k).text, knobs.chunks, knobs.words)
        for k in range(1, knobs.choices)
    ]
    parts: list[Part] = []
    for r in range(max(len(t) for t in texts)):
        for k, text in enumerate(texts):
            if r == 0 and k > 0:
                parts.append(ChoiceStart(k))
            if r < len(text):
                parts.append(ChoiceText(k, text[r]))
    return tuple(parts)
