"""Wire formats (pure): a stream is planned as a sequence of steps.

`plan_stream` turns a `StreamSpec` into `Emit` (bytes to write) and `Fault` (a transport fault
for the server to perform) steps, in wire order; the dialect's formatter renders the events. The
formats follow the upstream-formats research notes (Perplexity captures from
perplexityai/api-discussion#209, OpenAI's chat_completion_chunk types, the seed events format).

One module per upstream API, each a `_Formatter` subclass (`base`): `perplexity`, `openai`,
`events`. Adding a format is adding its module and one entry in `_FORMATTERS`; the routes, default
models and dialect checks are read from that table.

A scripted stream (typed parts, `gateway.mock.script`) has a body of `Part`s instead of text
pieces: each format renders the parts its API has (its `scripts`), in its providers' shapes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, Literal

from gateway.mock.answers import Answer
from gateway.mock.formats.anthropic import _AnthropicFormatter
from gateway.mock.formats.base import _dumps, _Formatter
from gateway.mock.formats.events import _EventsFormatter
from gateway.mock.formats.gemini import _GeminiFormatter
from gateway.mock.formats.openai import _OpenAIFormatter
from gateway.mock.formats.perplexity import _PerplexityFormatter
from gateway.mock.formats.responses import _PerplexityAgentFormatter, _ResponsesFormatter
from gateway.mock.knobs import BodyKind, DirectiveError, Knobs
from gateway.mock.script import Part, is_answer_text

#: A dialect's name: a key of `_FORMATTERS`.
Dialect = str

# --------------------------------------------------------------------------------------------
# What a planned stream is made of
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """Everything needed to render one stream; ids and clock are inputs, so rendering is pure."""

    dialect: Dialect
    model: str
    answer: Answer
    pieces: tuple[str, ...]
    prompt_tokens: int
    knobs: Knobs = Knobs()  # noqa: RUF009 (frozen: one shared default is safe)
    include_usage: bool = False  # OpenAI stream_options.include_usage
    request_id: str = "mock"
    created: int = 0
    #: A scripted stream's body (typed parts, `gateway.mock.script.build_parts`); None: the
    #: text pieces alone.
    parts: tuple[Part, ...] | None = None

    @property
    def eol(self) -> bytes:
        crlf = _FORMATTERS[self.dialect].crlf if self.knobs.crlf is None else self.knobs.crlf
        return b"\r\n" if crlf else b"\n"


@dataclass(frozen=True, slots=True)
class Emit:
    """Write these bytes. `paced` events are separated by the chunk delay; `kind` says whether
    the event carries answer text (counted in `chunks_sent`), another typed part (reasoning, a
    tool call, a progress step) or is an injected fault."""

    data: bytes
    paced: bool = False
    kind: Literal["meta", "text", "part", "fault"] = "meta"


@dataclass(frozen=True, slots=True)
class Fault:
    """A transport fault the I/O layer must perform; the stream plan ends after it."""

    kind: Literal["reset", "stall", "eof", "endless"]


Step = Emit | Fault


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


# --------------------------------------------------------------------------------------------
# The dialect -> formatter table: adding a wire format is adding its module and one entry here
# --------------------------------------------------------------------------------------------

_FORMATTERS: Final[Mapping[Dialect, type[_Formatter]]] = {
    "perplexity": _PerplexityFormatter,
    "openai": _OpenAIFormatter,
    "events": _EventsFormatter,
    "openai-responses": _ResponsesFormatter,
    "perplexity-agent": _PerplexityAgentFormatter,
    "anthropic": _AnthropicFormatter,
    "gemini": _GeminiFormatter,
}

#: POST route -> dialect, and the model each dialect's events name by default: from the table.
ROUTES: Final[Mapping[str, Dialect]] = {
    route: dialect for dialect, fmt in _FORMATTERS.items() for route in fmt.routes
}
DEFAULT_MODELS: Final[Mapping[Dialect, str]] = {
    dialect: fmt.default_model for dialect, fmt in _FORMATTERS.items()
}


def scripted_tokens(knobs: Knobs) -> list[str]:
    """The typed parts `knobs` ask for, as the tokens of a format's `scripts`."""
    tokens = [f"reasoning={knobs.reasoning}"] if knobs.reasoning is not None else []
    if knobs.finish == "length":
        tokens.append("finish=length")
    for token, on in (
        ("tools", knobs.tools is not None),
        ("sources", knobs.sources is not None),
        ("concise", knobs.concise),
        ("refusal", knobs.refusal),
        ("choices", knobs.choices > 1),
    ):
        if on:
            tokens.append(token)
    return tokens


def validate_for_dialect(knobs: Knobs, dialect: Dialect) -> None:
    """Reject knobs that mean nothing for `dialect` (the events format has no finish chunk, and
    only the chat formats carry typed parts, each those of its API)."""
    fmt = _FORMATTERS[dialect]
    for token in scripted_tokens(knobs):
        if token not in fmt.scripts:
            where = " and ".join(f.routes[0] for f in _FORMATTERS.values() if token in f.scripts)
            shown = token if "=" in token else f"key {token!r}"
            raise DirectiveError(
                token.partition("=")[0], f"mock directive {shown} applies to {where} only"
            )
    if not knobs.finish and not fmt.finish_chunk:
        where = " and ".join(f.routes[0] for f in _FORMATTERS.values() if f.finish_chunk)
        raise DirectiveError("finish", f"finish=0 applies to {where} only")
    if knobs.fast and not fmt.prerenderable:
        where = " and ".join(f.routes[0] for f in _FORMATTERS.values() if f.prerenderable)
        raise DirectiveError("fast", f"fast=1 applies to {where} only")


# --------------------------------------------------------------------------------------------
# A stream is planned as a sequence of steps
# --------------------------------------------------------------------------------------------


def plan_stream(spec: StreamSpec) -> Iterator[Step]:
    """The steps of one streamed answer, faults included, in wire order."""
    fmt = _FORMATTERS[spec.dialect](spec)
    knobs = spec.knobs
    ping = keepalive_comment(spec.eol) if knobs.comments else b""
    body = spec.pieces if spec.parts is None else spec.parts
    fault_at = min(knobs.after, len(body)) if knobs.fault is not None else -1

    for data in fmt.preamble():
        yield Emit(ping + data, paced=True)
    for i in range(len(body) + 1):
        if i == fault_at:
            if knobs.fault == "malformed":
                yield Emit(ping + fmt.malformed(), kind="fault")
            elif knobs.fault == "giant":
                yield Emit(ping + fmt.giant(knobs.size), kind="fault")
            elif knobs.fault == "error":
                yield Emit(ping + fmt.error_event(), kind="fault")
                return
            elif knobs.fault is not None:
                yield Fault(knobs.fault)
                return
        if i < len(body):
            part = body[i]
            if isinstance(part, str):
                yield Emit(ping + fmt.text(part), paced=True, kind="text")
            else:
                kind: Literal["text", "part"] = "text" if is_answer_text(part) else "part"
                yield Emit(ping + fmt.part(part), paced=True, kind=kind)
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


def error_body(
    status: int, kind: BodyKind, message: str | None = None, dialect: Dialect = "perplexity"
) -> tuple[bytes, str]:
    """(body, content type) of an error answer: the dialect's JSON error (Perplexity/OpenAI's
    has an integer code, as Perplexity sends), an openresty HTML page (Perplexity's 401 really
    looks like this) or text."""
    reason = "Authorization Required" if status == 401 else _reason(status)
    if kind == "json":
        error_type = _ERROR_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        text = message or f"{reason} (simulated by the mock upstream)"
        return _dumps(_FORMATTERS[dialect].error_json(status, error_type, text)), "application/json"
    if kind == "html":
        page = (
            f"<html><head><title>{status} {reason}</title></head><body>"
            f"<center><h1>{status} {reason}</h1></center><hr><center>openresty/1.27.4</center>"
            "</body></html>\n"
        )
        return page.encode(), "text/html"
    return f"{status} {reason}\n".encode(), "text/plain"
