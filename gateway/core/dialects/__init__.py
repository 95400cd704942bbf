"""Upstream dialects (pure): request bodies out, SSE events in, answer text, typed parts and one
outcome back.

A `Dialect` builds the request for one `start` (URL, headers with the credential, JSON body); its
`Translator` is fed the SSE events of one upstream response. `feed()` returns the answer-text
delta an event carries (or None): the hot path. What else the event reveals (reasoning, sources,
tool calls, progress steps: `gateway.core.parts`) goes to the translator's `PartSink`, only for
the kinds the client asked for, in the order the upstream revealed it (a part revealed by an event
is pushed before that event's text is returned). `feed()` raises `UpstreamFailure` when the
upstream reports an error, sends something unparsable or goes over a `PartLimits` bound, and sets
`finished` when the dialect's end marker was seen; `end_of_stream()` judges a clean EOF. Metadata
for `done` (usage, citations, ...) is kept in `meta`.

One module per upstream API (docs/upstreams.md says what maps to what for each):

- `chat`: `openai` (OpenAI Chat Completions and the APIs that copy it) and `perplexity`;
- `events`: the seed's `text_chunk`/`done` format;
- `anthropic`: Anthropic Messages;
- `responses`: `openai-responses` (OpenAI and xAI Responses) and `perplexity-agent`;
- `gemini`: Google Gemini `streamGenerateContent`.

Shared pieces: `base` (the interfaces, `UpstreamFailure`, error and finish helpers), `think`
(leading `<think>` blocks), `sources` (numbering sources, progress steps). Adding a dialect is
adding its module and one entry in `DIALECTS`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

from gateway.core.dialects.anthropic import AnthropicDialect
from gateway.core.dialects.base import (
    DEFAULT_LIMITS,
    META_KEYS,
    Dialect,
    RequestDefaults,
    Translator,
    UpstreamFailure,
    UpstreamRequest,
    normalise_finish,
    parse_error_body,
    sanitize,
    status_retryable,
)
from gateway.core.dialects.chat import (
    OpenAIDialect,
    OpenAITranslator,
    PerplexityDialect,
    PerplexityTranslator,
)
from gateway.core.dialects.events import EventsDialect, EventsTranslator
from gateway.core.dialects.gemini import GeminiDialect
from gateway.core.dialects.responses import OpenAIResponsesDialect, PerplexityAgentDialect
from gateway.core.dialects.sources import SourceIndex, progress_step
from gateway.core.dialects.think import ThinkSplitter
from gateway.core.parts import NULL_SINK, PartLimits, PartSink

__all__ = [
    "DIALECTS",
    "META_KEYS",
    "Dialect",
    "EventsTranslator",
    "OpenAITranslator",
    "PerplexityTranslator",
    "RequestDefaults",
    "SourceIndex",
    "ThinkSplitter",
    "Translator",
    "UpstreamFailure",
    "UpstreamRequest",
    "dialect_for",
    "normalise_finish",
    "parse_error_body",
    "progress_step",
    "sanitize",
    "status_retryable",
    "translator_for",
]

#: Every dialect by the name `--dialect` and the routes file use.
DIALECTS: Final[dict[str, Dialect]] = {
    dialect.name: dialect
    for dialect in (
        PerplexityDialect(),
        OpenAIDialect(),
        EventsDialect(),
        AnthropicDialect(),
        OpenAIResponsesDialect(),
        PerplexityAgentDialect(),
        GeminiDialect(),
    )
}


def dialect_for(name: str) -> Dialect:
    """The dialect called `name` (a KeyError names it when there is none)."""
    return DIALECTS[name]


def translator_for(
    dialect: str,
    wants: Collection[str] = frozenset(),
    sink: PartSink = NULL_SINK,
    limits: PartLimits = DEFAULT_LIMITS,
) -> Translator:
    """A fresh translator for one upstream response, putting the parts named in `wants` into
    `sink` (nothing by default: a client that asked for no parts)."""
    return DIALECTS[dialect].new_translator(wants, sink, limits)
