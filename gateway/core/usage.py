"""What a stream cost: the upstream's usage in one convention, or an estimate when it sent none.

PURE. Every provider counts differently (docs/usage.md, "Normalised usage"); the gateway reports
them all the OpenAI way:

- `prompt_tokens`: all input, cached included (`cached_tokens` beside it when known; Anthropic's
  cache writes as `cache_write_tokens`);
- `completion_tokens`: all output, reasoning included (`reasoning_tokens` beside it when known);
- `total_tokens` = prompt + completion;
- `cost` in USD when known: the upstream's own figure, else the price table's (`gateway.core.
  prices`), else left out;
- `estimated: true` when the upstream did not report the final figures (a cancelled or broken
  stream, or an upstream that reports none): then the counts come from what was relayed and the
  prompt, never less than what the upstream had reported so far.

Each dialect's translator turns its raw `meta["usage"]` into a `Usage` (`Translator.usage`);
`Meter` settles one stream's usage once, at the moment it ends (`gateway.core.session.move`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

#: Characters per token of an estimate: the usual figure for English text with OpenAI's and
#: Anthropic's tokenizers (a cancelled stream is charged about what it used, never nothing).
CHARS_PER_TOKEN: Final = 4
#: Tokens each message of a conversation adds to its prompt (role and separators), as OpenAI's
#: counting guide has it.
TOKENS_PER_MESSAGE: Final = 4
#: USD in the integer unit budgets are kept in (exact sums, Redis HINCRBY): nano-dollars.
NANOS: Final = 1_000_000_000


@dataclass(slots=True)
class Usage:
    """One stream's usage in the gateway's convention (module docstring)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    cost: float | None = None
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost_nanos(self) -> int:
        """The cost in nano-USD (0 when unknown)."""
        return round(self.cost * NANOS) if self.cost is not None else 0

    def as_dict(self) -> dict[str, Any]:
        """The `usage` object of `done`, `cancelled` and `error` (docs/asyncapi.yaml, Usage)."""
        out: dict[str, Any] = {"prompt_tokens": self.prompt_tokens}
        if self.cached_tokens is not None:
            out["cached_tokens"] = self.cached_tokens
        if self.cache_write_tokens is not None:
            out["cache_write_tokens"] = self.cache_write_tokens
        out["completion_tokens"] = self.completion_tokens
        if self.reasoning_tokens is not None:
            out["reasoning_tokens"] = self.reasoning_tokens
        out["total_tokens"] = self.total_tokens
        if self.cost is not None:
            out["cost"] = round(self.cost, 9)
        if self.estimated:
            out["estimated"] = True
        return out


def count(obj: Any, *path: str) -> int | None:
    """A token count at `path` in a raw usage object: a non-negative integer (a float that is
    one counts), else None."""
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    if isinstance(obj, bool):
        return None
    if isinstance(obj, int):
        return obj if obj >= 0 else None
    if isinstance(obj, float) and obj.is_integer() and obj >= 0:
        return int(obj)
    return None


def amount(obj: Any, *path: str) -> float | None:
    """A cost in USD at `path`: a finite non-negative number, else None."""
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    if isinstance(obj, bool) or not isinstance(obj, int | float):
        return None
    value = float(obj)
    return value if 0.0 <= value < float("inf") else None


#: xAI reports cost in "USD ticks": 10^10 ticks to the dollar.
XAI_TICKS_PER_USD: Final = 10_000_000_000


def openai_usage(raw: Any) -> Usage | None:
    """The OpenAI convention (Chat Completions and the APIs that copy it: Perplexity, DeepSeek,
    xAI, Mistral, Groq, Azure), with each one's quirks:

    - cached input in `prompt_tokens_details.cached_tokens` (DeepSeek also says
      `prompt_cache_hit_tokens`);
    - reasoning in `completion_tokens_details.reasoning_tokens` (Perplexity: `reasoning_tokens`);
    - xAI leaves reasoning out of `completion_tokens` but not out of `total_tokens`: when the
      total only adds up with reasoning added, it is added;
    - cost from Perplexity's `cost.total_cost` or xAI's `cost_in_usd_ticks`.
    """
    if not isinstance(raw, Mapping):
        return None
    prompt = count(raw, "prompt_tokens")
    completion = count(raw, "completion_tokens")
    total = count(raw, "total_tokens")
    if prompt is None and completion is None:
        return None
    prompt = prompt or 0
    if completion is None:
        completion = max(0, total - prompt) if total is not None else 0
    reasoning = count(raw, "completion_tokens_details", "reasoning_tokens")
    if reasoning is None:
        reasoning = count(raw, "reasoning_tokens")
    if (
        reasoning
        and total is not None
        and total != prompt + completion
        and total == prompt + completion + reasoning
    ):
        completion += reasoning
    cached = count(raw, "prompt_tokens_details", "cached_tokens")
    if cached is None:
        cached = count(raw, "prompt_cache_hit_tokens")
    cost = amount(raw, "cost", "total_cost")
    if cost is None:
        ticks = count(raw, "cost_in_usd_ticks")
        if ticks is not None:
            cost = ticks / XAI_TICKS_PER_USD
    return Usage(prompt, completion, reasoning, cached, None, cost)


def estimate_tokens(chars: int) -> int:
    """Tokens in `chars` characters of text (rounded up: a started piece is a token)."""
    return -(-chars // CHARS_PER_TOKEN) if chars > 0 else 0


def prompt_estimate(prompt_chars: int, messages: int) -> int:
    """Tokens of a prompt of `messages` messages holding `prompt_chars` characters of text."""
    return estimate_tokens(prompt_chars) + TOKENS_PER_MESSAGE * messages


class Reading(Protocol):
    """What a meter reads of one upstream response (a dialect's translator)."""

    def usage(self) -> Usage | None:
        """The upstream's own usage so far, normalised (None when it sent none)."""
        ...

    def output_chars(self) -> int:
        """Characters of output besides the answer text: reasoning, tool-call arguments."""
        ...


class _Settled:
    """What a meter reads once it has settled: nothing more."""

    def usage(self) -> Usage | None:
        return None

    def output_chars(self) -> int:
        return 0


_SETTLED: Final = _Settled()

#: Prices a usage: `(models to look up, usage) -> cost in USD or None` (gateway.core.prices).
Pricer = Callable[[tuple[str, ...], Usage], float | None]


class Meter:
    """Settles what one stream used, once it ends: set by the relay for each upstream attempt
    (a fallback replaces it: an upstream that never answered billed nothing).

    `answered` is set once the upstream accepted the request (a 2xx); before that a failure is
    charged nothing, and a cancel the prompt (the upstream may have started on it).
    """

    __slots__ = ("answered", "carried", "models", "price", "prompt_tokens", "reading")

    def __init__(
        self,
        reading: Reading,
        prompt_tokens: int,
        models: tuple[str, ...],
        price: Pricer | None,
        carried: Usage | None = None,
    ) -> None:
        self.reading: Reading = reading
        #: The prompt's estimate (used when the upstream reported no input count).
        self.prompt_tokens = prompt_tokens
        #: Names the price table is asked for, in order (the upstream model, then the client's).
        self.models = models
        self.price = price
        self.answered = False
        #: What earlier attempts of the stream used (upstreams that took the request, then
        #: failed before any token, so that the stream moved on): charged with this one's.
        self.carried = carried

    def carry(self) -> Usage | None:
        """This attempt failed and the stream moves on: what it used, plus what it carried
        (None when no upstream took the request)."""
        usage = self.settle(0, finished=False, cancelled=False)
        return usage if usage.total_tokens or usage.cost else None

    def settle(self, text_chars: int, finished: bool, cancelled: bool) -> Usage:
        """The stream's usage: the upstream's own when it `finished` and reported one, else an
        estimate from `text_chars` of answer relayed, the other output seen and the prompt,
        never below what the upstream had reported so far."""
        reading = self.reading
        # Settled once: the reading (a translator, whose sink is the stream that holds this
        # meter) is let go, so no reference cycle outlives the stream's end.
        self.reading = _SETTLED
        reported = reading.usage()
        if finished and reported is not None:
            usage = reported
        elif not self.answered:
            if not cancelled:
                # The upstream refused or never took the request: nothing was used, not even
                # a per-request fee.
                usage = Usage(0, 0, estimated=True)
                return _plus(usage, self.carried) if self.carried is not None else usage
            usage = Usage(self.prompt_tokens, 0, estimated=True)
        else:
            output = estimate_tokens(text_chars + reading.output_chars())
            usage = Usage(self.prompt_tokens, output, estimated=True)
            if reported is not None:
                # The upstream's counts so far are exact as far as they go (Anthropic sends the
                # input at the start; Perplexity and Gemini send running totals).
                if reported.prompt_tokens:
                    usage.prompt_tokens = reported.prompt_tokens
                usage.cached_tokens = reported.cached_tokens
                usage.cache_write_tokens = reported.cache_write_tokens
                usage.completion_tokens = max(output, reported.completion_tokens)
                usage.reasoning_tokens = reported.reasoning_tokens
                usage.cost = reported.cost
        if self.price is not None and (usage.cost is None or usage.estimated):
            priced = self.price(self.models, usage)
            if priced is not None:
                usage.cost = priced if usage.cost is None else max(usage.cost, priced)
        return _plus(usage, self.carried) if self.carried is not None else usage


def _plus(usage: Usage, earlier: Usage) -> Usage:
    """`usage` with what earlier attempts used added (then an estimate as a whole)."""

    def add(a: int | None, b: int | None) -> int | None:
        return None if a is None and b is None else (a or 0) + (b or 0)

    cost = (
        None
        if usage.cost is None and earlier.cost is None
        else ((usage.cost or 0.0) + (earlier.cost or 0.0))
    )
    return Usage(
        usage.prompt_tokens + earlier.prompt_tokens,
        usage.completion_tokens + earlier.completion_tokens,
        add(usage.reasoning_tokens, earlier.reasoning_tokens),
        add(usage.cached_tokens, earlier.cached_tokens),
        add(usage.cache_write_tokens, earlier.cache_write_tokens),
        cost,
        estimated=True,
    )
