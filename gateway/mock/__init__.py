"""A fake LLM upstream: an aiohttp server that streams answers the way real APIs do.

It serves two masters:

* the offline demo of `make run`: plausible multi-sentence answers with citations, chosen
  deterministically from the question and streamed word by word at a human-readable pace;
* the test suite: a ``[[mock key=value ...]]`` directive in the last user message turns knobs
  (chunk count, pace, HTTP errors, transport faults, framing variants, typed answer parts, a
  recorded stream to replay, how the body is cut into writes) and every request leaves a
  `RequestRecord` so tests can observe what the upstream saw, including client disconnects.

Routes (streams are POST with each API's own JSON body; docs/upstreams.md has every format):

=============================================  ==============================================
``/perplexity``, ``/chat/completions``          Perplexity Sonar: fat ``chat.completion`` chunks,
                                                CRLF separators, no ``[DONE]``, clean EOF ends it
``/openai``, ``/v1/chat/completions``           OpenAI ``chat.completion.chunk``, ``data: [DONE]``
``/events``                                     ``event: text_chunk`` ... ``event: done``
``/anthropic``, ``/v1/messages``                Anthropic Messages: ``message_start`` ...
                                                ``message_stop`` (``x-api-key``)
``/openai-responses``, ``/v1/responses``        OpenAI Responses: ``response.*`` events
``/perplexity-agent``                           Perplexity's Agent API (Responses + search events)
``/gemini/models/{model}:streamGenerateContent``  Gemini: a whole response per event, CRLF
                                                (``x-goog-api-key``; ``/v1beta/...`` too)
``GET /_mock/stats``, ``POST /_mock/reset``     observation from another process
=============================================  ==============================================

`MockUpstream.force` (a directive's knobs) overrides every request's own: one upstream of
several misbehaving whatever the prompt, for routing and fallback tests.

The knobs are listed in `gateway.mock.knobs`.

The modules are layered, each importing only those below it (an import-linter contract in
pyproject.toml checks it):

* `server`: `MockUpstream` and `serve_forever`, the only aiohttp code (I/O);
* `pacer`: the benchmark's fast=1 writer: pre-rendered events, one timer for every paced stream;
* `replay`: recorded streams from a transcripts directory, framed as their providers do, planned
  as steps; the `Splitter` that cuts a body into writes (``split=``);
* `formats`: the wire formats, one module per upstream API (pure: `plan_stream` yields
  `Emit`/`Fault` steps);
* `script`: the typed parts of a scripted answer (reasoning, tool calls, sources, progress
  steps, refusal, choices) and their canned content (pure);
* `knobs`: the ``[[mock ...]]`` directive and its `Knobs` (pure);
* `answers`: the canned answers and how a stream cuts them into chunks (pure).
"""

from gateway.mock.answers import ANSWERS, Answer, Source, choose_answer, text_chunks
from gateway.mock.formats import (
    ROUTES,
    Emit,
    Fault,
    StreamSpec,
    error_body,
    keepalive_comment,
    keepalive_offsets,
    plan_stream,
    validate_for_dialect,
)
from gateway.mock.knobs import GIANT_DEFAULT_SIZE, DirectiveError, Knobs, parse_directive
from gateway.mock.replay import FRAMINGS, Transcript, TranscriptLibrary
from gateway.mock.script import build_parts
from gateway.mock.server import ENDLESS_WRITE_BYTES, MockUpstream, RequestRecord, serve_forever

__all__ = [
    "ANSWERS",
    "ENDLESS_WRITE_BYTES",
    "FRAMINGS",
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
    "Transcript",
    "TranscriptLibrary",
    "build_parts",
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
