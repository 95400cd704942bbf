"""Perplexity Sonar's wire format: fat ``chat.completion`` chunks, CRLF separators, no
``[DONE]``, a clean EOF ends it (Perplexity captures from perplexityai/api-discussion#209).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gateway.mock.formats.base import _dumps, _Formatter


class _PerplexityFormatter(_Formatter):
    """Sonar "full" mode: every chunk carries message (text so far), delta, cumulative usage and
    citations; search_results come with the final chunk; no [DONE] unless done=1."""

    routes = ("/perplexity", "/chat/completions")
    default_model = "sonar"
    crlf = True
    # Every Perplexity chunk repeats the whole text so far: nothing to pre-render.
    prerenderable = False

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
        if final:
            chunk["search_results"] = spec.answer.search_results
        return chunk

    def text(self, piece: str) -> bytes:
        self.text_parts.append(piece)
        return self.event(_dumps(self.chunk(piece, None)))

    def finale(self) -> Iterator[tuple[bytes, bool]]:
        knobs = self.spec.knobs
        if knobs.finish:
            yield self.event(_dumps(self.chunk("", "stop", final=True))), True
        if knobs.done:  # sonar-deep-research style
            yield self.event(b"[DONE]"), False

    def giant(self, size: int) -> bytes:
        return self.event(self.padded(self.chunk("", None), size))
