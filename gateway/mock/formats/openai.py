"""OpenAI Chat Completions' wire format: ``chat.completion.chunk`` events, LF separators,
``data: [DONE]`` at the end (OpenAI's chat_completion_chunk types).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from gateway.mock.formats.base import _dumps, _Formatter


class _OpenAIFormatter(_Formatter):
    """Chat Completions: role chunk, content deltas, empty-delta finish chunk, optional usage
    chunk (choices: []), then data: [DONE]."""

    routes = ("/openai", "/v1/chat/completions")
    default_model = "gpt-4o-mini"

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
