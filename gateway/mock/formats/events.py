"""The seed events format: ``event: text_chunk`` per word, then ``event: done`` with the full
answer, its citations and usage.
"""

from __future__ import annotations

from collections.abc import Iterator

from gateway.mock.formats.base import _dumps, _Formatter


class _EventsFormatter(_Formatter):
    """The seed format: `event: text_chunk` per word, then `event: done` with the full answer."""

    routes = ("/events",)
    default_model = "sonar"
    # There is no finish chunk: the done event ends the stream (finish=0 means nothing here).
    finish_chunk = False

    def text(self, piece: str) -> bytes:
        self.text_parts.append(piece)
        return self.event(_dumps({"type": "text_chunk", "text": piece}), "text_chunk")

    def finale(self) -> Iterator[tuple[bytes, bool]]:
        if self.spec.knobs.done is None or self.spec.knobs.done:
            done = {
                "type": "done",
                "text": "".join(self.text_parts),
                "citations": self.spec.answer.citations,
                "usage": self.usage(),
            }
            yield self.event(_dumps(done), "done"), True

    def malformed(self) -> bytes:
        return (
            b"event: text_chunk"
            + self.eol
            + b'data: {"type": "text_chunk", "text": '
            + self.eol
            + self.eol
        )

    def error_event(self) -> bytes:
        error = {"message": "Overloaded (simulated by the mock upstream)", "type": "server_error"}
        return self.event(_dumps({"type": "error", "error": error}), "error")

    def giant(self, size: int) -> bytes:
        return self.event(self.padded({"type": "text_chunk", "text": ""}, size), "text_chunk")
