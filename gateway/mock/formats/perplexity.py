"""Perplexity Sonar's wire format: fat ``chat.completion`` chunks, CRLF separators, no
``[DONE]``, a clean EOF ends it (Perplexity captures from perplexityai/api-discussion#209).

Typed parts: reasoning=think puts a leading ``<think>`` block in the content (sonar-reasoning),
so ``message.content`` carries it too; sources=N repeats the citations and search_results
(title, url, date, last_updated, snippet, source) on every chunk, as the 2026 captures do;
concise mode (``stream_mode: "concise"``, or concise=1) follows Perplexity's stream-mode guide:
``chat.reasoning`` chunks (one reasoning step each, ``"type": "message"``),
``chat.reasoning.done`` (usage so far and the search results), ``chat.completion.chunk`` deltas
(``message.content`` stays ""), and ``chat.completion.done`` (the whole message with its
reasoning steps, search results, usage with cost). The guide's examples carry no
``citations`` in concise mode, so neither does the mock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gateway.mock.formats.base import SpecView, _dumps, _Formatter
from gateway.mock.script import Part, ProgressStep, ReasoningDone, search_result, source_list


class _PerplexityFormatter(_Formatter):
    """Sonar "full" mode: every chunk carries message (text so far), delta, cumulative usage and
    citations; search_results come with the final chunk; no [DONE] unless done=1."""

    routes = ("/perplexity", "/chat/completions")
    default_model = "sonar"
    crlf = True
    # Every Perplexity chunk repeats the whole text so far: nothing to pre-render.
    prerenderable = False
    scripts = frozenset(
        {"reasoning=think", "reasoning=think_open", "sources", "concise", "finish=length"}
    )

    def __init__(self, spec: SpecView) -> None:
        super().__init__(spec)
        knobs = spec.knobs
        #: sources=N: the sources shown (None: the answer's own, the unscripted shape).
        self.sources = (
            source_list(spec.answer, knobs.sources.count) if knobs.sources is not None else None
        )
        self.steps: list[dict[str, Any]] = []
        #: Events of the body rendered so far (sources=grow:N shows one more per event).
        self.events = 0

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
        if self.sources is not None:
            shown = self.sources
            knobs = spec.knobs
            if knobs.sources is not None and knobs.sources.grow and not final:
                shown = shown[: self.events]
            chunk["citations"] = [s.url for s in shown]
            chunk["search_results"] = [search_result(s) for s in shown]
        elif final:
            chunk["search_results"] = spec.answer.search_results
        return chunk

    def text(self, piece: str) -> bytes:
        self.text_parts.append(piece)
        self.events += 1
        if self.spec.knobs.concise:
            return self.event(_dumps(self.concise("chat.completion.chunk", piece)))
        return self.event(_dumps(self.chunk(piece, None)))

    # -- concise mode ------------------------------------------------------------------------

    def search_results(self) -> list[dict[str, str]]:
        sources = self.sources if self.sources is not None else self.spec.answer.sources
        return [search_result(s) for s in sources]

    def concise(
        self,
        obj: str,
        delta: str,
        *,
        steps: list[dict[str, Any]] | None = None,
        message: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        top: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One concise-mode chunk (the stream-mode guide's "Structure" examples)."""
        spec = self.spec
        delta_obj: dict[str, Any] = {"role": "assistant", "content": delta}
        if steps is not None:
            delta_obj["reasoning_steps"] = steps
        chunk: dict[str, Any] = {
            "id": spec.request_id,
            "model": spec.model,
            "created": spec.created,
            "object": obj,
            **(top or {}),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": finish_reason,
                    "message": message or {"role": "assistant", "content": ""},
                    "delta": delta_obj,
                }
            ],
        }
        return chunk

    def part(self, part: Part) -> bytes:
        self.events += 1
        if isinstance(part, ProgressStep):
            self.steps.append(part.step)
            chunk = self.concise("chat.reasoning", "", steps=[part.step])
            chunk["type"] = "message"
            return self.event(_dumps(chunk))
        if isinstance(part, ReasoningDone):
            usage = {**self.usage(), "search_context_size": "low"}
            message = {"role": "assistant", "content": "", "reasoning_steps": self.steps}
            top = {"usage": usage, "search_results": self.search_results()}
            return self.event(
                _dumps(self.concise("chat.reasoning.done", "", message=message, top=top))
            )
        return super().part(part)

    def concise_done(self) -> dict[str, Any]:
        usage: dict[str, Any] = {**self.usage(), "search_context_size": "low"}
        output_cost = round(usage["completion_tokens"] * 0.000015, 6)
        usage["cost"] = {
            "input_tokens_cost": round(usage["prompt_tokens"] * 0.000003, 6),
            "output_tokens_cost": output_cost,
            "request_cost": 0.006,
            "total_cost": round(usage["prompt_tokens"] * 0.000003 + output_cost + 0.006, 6),
        }
        message = {
            "role": "assistant",
            "content": "".join(self.text_parts),
            "reasoning_steps": self.steps,
        }
        top = {"usage": usage, "search_results": self.search_results()}
        return self.concise(
            "chat.completion.done", "", message=message, finish_reason="stop", top=top
        )

    def finale(self) -> Iterator[tuple[bytes, bool]]:
        knobs = self.spec.knobs
        if knobs.finish:
            if knobs.concise:
                yield self.event(_dumps(self.concise_done())), True
            else:
                reason = "length" if knobs.finish == "length" else "stop"
                yield self.event(_dumps(self.chunk("", reason, final=True))), True
        if knobs.done:  # sonar-deep-research style
            yield self.event(b"[DONE]"), False

    def giant(self, size: int) -> bytes:
        return self.event(self.padded(self.chunk("", None), size))
