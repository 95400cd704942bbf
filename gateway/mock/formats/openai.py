"""OpenAI Chat Completions' wire format: ``chat.completion.chunk`` events, LF separators,
``data: [DONE]`` at the end (OpenAI's chat_completion_chunk types).

The typed parts take the shapes of the real providers' chunks (compare the recorded streams in
``reference/transcripts/`` and upstream-formats.md section 4):

* reasoning=reasoning_content (DeepSeek, xAI): role chunk ``{"role", "content": null,
  "reasoning_content": ""}``, reasoning ``{"content": null, "reasoning_content": ...}``, text
  ``{"content": ..., "reasoning_content": null}``;
* reasoning=reasoning (Groq, vLLM): ``{"reasoning": ...}``, then plain content deltas;
* reasoning=details (OpenRouter): ``{"role", "content": "", "reasoning": ..., "reasoning_details":
  [{"type": "reasoning.text", "text": ..., "format", "index": 0}]}``, text with ``"reasoning":
  null, "reasoning_details": []``;
* reasoning=mistral (Magistral): ``content`` arrays, ``[{"type": "thinking", "thinking":
  [{"type": "text", "text"}]}]`` then ``[{"type": "text", "text"}]``, a finish with content "";
* tools: role chunk with ``"content": null``, ``tool_calls[{index, id, type, function{name,
  arguments: ""}}]`` then ``tool_calls[{index, function{arguments: fragment}}]``, finish
  ``tool_calls``; no_index (Mistral): the whole calls, no ``index``, with the finish in the
  same chunk;
* refusal: role chunk ``{"role", "content": null, "refusal": ""}``, then ``{"refusal": ...}``;
* choices=N: a role chunk per choice, pieces round-robin, a finish chunk per choice.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from gateway.mock.formats.base import _dumps, _Formatter
from gateway.mock.script import (
    ChoiceStart,
    ChoiceText,
    Part,
    Reasoning,
    Refusal,
    ToolArgs,
    ToolStart,
    WholeCalls,
)


class _OpenAIFormatter(_Formatter):
    """Chat Completions: role chunk, content deltas, empty-delta finish chunk, optional usage
    chunk (choices: []), then data: [DONE]."""

    routes = ("/openai", "/v1/chat/completions")
    default_model = "gpt-4o-mini"
    scripts = frozenset(
        {
            "reasoning=think",
            "reasoning=think_open",
            "reasoning=reasoning_content",
            "reasoning=reasoning",
            "reasoning=details",
            "reasoning=mistral",
            "tools",
            "refusal",
            "choices",
            "finish=length",
        }
    )

    @staticmethod
    def make_request_id(token: uuid.UUID) -> str:
        return f"chatcmpl-{token.hex[:24]}"

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
    def choice(
        delta: dict[str, Any], finish_reason: str | None = None, index: int = 0
    ) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def delta_event(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return self.event(_dumps(self.chunk([self.choice(delta, finish_reason)])))

    def preamble(self) -> Iterator[bytes]:
        knobs = self.spec.knobs
        delta: dict[str, Any] = {"role": "assistant", "content": ""}
        if knobs.refusal:
            delta = {"role": "assistant", "content": None, "refusal": ""}
        elif knobs.reasoning == "reasoning_content":
            delta = {"role": "assistant", "content": None, "reasoning_content": ""}
        elif knobs.tools is not None and knobs.tools != "no_index":
            delta = {"role": "assistant", "content": None}
        yield self.delta_event(delta)

    def text(self, piece: str) -> bytes:
        self.text_parts.append(piece)
        shape = self.spec.knobs.reasoning
        if shape == "reasoning_content":
            return self.delta_event({"content": piece, "reasoning_content": None})
        if shape == "details":
            delta = {"role": "assistant", "content": piece, "reasoning": None}
            return self.delta_event({**delta, "reasoning_details": []})
        if shape == "mistral":
            return self.delta_event({"content": [{"type": "text", "text": piece}]})
        return self.delta_event({"content": piece})

    def part(self, part: Part) -> bytes:
        if isinstance(part, Reasoning):
            return self.reasoning(part.text)
        if isinstance(part, ToolStart):
            self.other_tokens += 1
            function = {"name": part.name, "arguments": ""}
            call = {"index": part.index, "id": part.call_id, "type": "function"}
            return self.delta_event({"tool_calls": [{**call, "function": function}]})
        if isinstance(part, ToolArgs):
            self.other_tokens += 1
            call = {"index": part.index, "function": {"arguments": part.fragment}}
            return self.delta_event({"tool_calls": [call]})
        if isinstance(part, WholeCalls):
            self.other_tokens += len(part.calls)
            calls = [
                {"id": c.call_id, "function": {"name": c.name, "arguments": c.arguments}}
                for c in part.calls
            ]
            finish = "tool_calls" if self.spec.knobs.finish else None
            return self.delta_event({"content": None, "tool_calls": calls}, finish)
        if isinstance(part, Refusal):
            self.text_parts.append(part.text)
            return self.delta_event({"refusal": part.text})
        if isinstance(part, ChoiceStart):
            role = self.choice({"role": "assistant", "content": ""}, index=part.index)
            return self.event(_dumps(self.chunk([role])))
        if isinstance(part, ChoiceText):
            self.text_parts.append(part.text)
            piece = self.choice({"content": part.text}, index=part.index)
            return self.event(_dumps(self.chunk([piece])))
        return super().part(part)

    def reasoning(self, piece: str) -> bytes:
        self.reasoning_parts.append(piece)
        shape = self.spec.knobs.reasoning
        if shape == "reasoning_content":
            return self.delta_event({"content": None, "reasoning_content": piece})
        if shape == "details":
            detail = {"type": "reasoning.text", "text": piece, "format": "unknown", "index": 0}
            delta = {"role": "assistant", "content": "", "reasoning": piece}
            return self.delta_event({**delta, "reasoning_details": [detail]})
        if shape == "mistral":
            thinking = [{"type": "thinking", "thinking": [{"type": "text", "text": piece}]}]
            return self.delta_event({"content": thinking})
        return self.delta_event({"reasoning": piece})

    def finale(self) -> Iterator[tuple[bytes, bool]]:
        knobs = self.spec.knobs
        # Mistral's whole calls carry their finish_reason (no_index).
        if knobs.finish and knobs.tools != "no_index":
            reason = "length" if knobs.finish == "length" else "stop"
            if knobs.tools is not None:
                reason = "tool_calls"
            delta: dict[str, Any] = {}
            if knobs.reasoning == "reasoning_content":
                delta = {"content": "", "reasoning_content": None}
            elif knobs.reasoning == "mistral":
                delta = {"content": ""}
            for index in range(knobs.choices):
                finish = self.chunk([self.choice(delta, reason, index)])
                yield self.event(_dumps(finish)), index == 0
        if self.spec.include_usage:
            usage_chunk = self.chunk([])
            usage_chunk["usage"] = self.usage()
            yield self.event(_dumps(usage_chunk)), False
        if knobs.done is None or knobs.done:
            yield self.event(b"[DONE]"), False

    def giant(self, size: int) -> bytes:
        return self.event(self.padded(self.chunk([self.choice({"content": ""})]), size))
