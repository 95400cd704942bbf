"""`ThinkSplitter` (pure): the reasoning of models that write it as a leading `<think>...</think>`
block of their answer text (DeepSeek R1 and its distillations behind OpenAI-compatible servers,
Perplexity's reasoning models; upstream-formats.md, 4)."""

from __future__ import annotations

from typing import Final

_OPEN_TAG: Final = "<think>"
_CLOSE_TAG: Final = "</think>"
#: Leading whitespace held while waiting to see whether a `<think>` follows; past this much, the
#: answer is taken to have no block (so a stream of blanks costs no quadratic re-scanning).
_LEAD_LIMIT: Final = 4096


class ThinkSplitter:
    """Splits a leading `<think>...</think>` block off an answer's text, whatever the chunking.

    A small state machine fed the answer's text deltas; `feed()` returns `(answer, reasoning)`
    for each. Only a leading block is reasoning: whitespace may precede `<think>` (it is dropped
    with the block); once the first non-whitespace text is not the start of `<think>`, everything
    is answer text, a later `<think>` included. Inside the block, a possible partial `</think>`
    at the end of a delta is held back until the next one says. The whitespace between
    `</think>` and the answer is dropped (the answer starts at its first non-whitespace
    character); the block's own text is reasoning verbatim. A block never closed is all
    reasoning (`finish()`); text held before the decision is answer text at the end (an answer
    such as "<" or "  " is relayed as it came).

    Once `state` is `PASS` the splitter has nothing left to do: the translator drops it, so the
    rest of the answer passes with one attribute check.
    """

    LEAD: Final = 0  # before the first non-whitespace text: is it `<think>`?
    OPEN: Final = 1  # inside the block
    AFTER: Final = 2  # after `</think>`: dropping the whitespace before the answer
    PASS: Final = 3  # plain answer text from here on

    __slots__ = ("_held", "state")

    def __init__(self) -> None:
        self.state = self.LEAD
        #: LEAD: the whitespace and partial `<think>` seen so far; OPEN: a partial `</think>`.
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """`(answer, reasoning)` in `text`, given everything fed before."""
        state = self.state
        if state == self.PASS:
            return text, ""
        if state == self.LEAD:
            held = self._held + text
            body = held.lstrip()
            if not body and len(held) <= _LEAD_LIMIT:
                self._held = held
                return "", ""
            if body and len(body) < len(_OPEN_TAG) and _OPEN_TAG.startswith(body):
                self._held = held  # "<th": wait for the rest of the tag
                return "", ""
            self._held = ""
            if not body.startswith(_OPEN_TAG):
                self.state = self.PASS
                return held, ""
            state = self.state = self.OPEN
            text = body[len(_OPEN_TAG) :]
        reasoning = ""
        if state == self.OPEN:
            data = self._held + text if self._held else text
            end = data.find(_CLOSE_TAG)
            if end < 0:
                # Hold back a suffix that may be the start of `</think>`: it begins with the
                # tag's only "<", so with the last "<" among the final len-1 characters.
                cut = data.rfind("<", max(0, len(data) - len(_CLOSE_TAG) + 1))
                if cut >= 0 and _CLOSE_TAG.startswith(data[cut:]):
                    self._held = data[cut:]
                    return "", data[:cut]
                self._held = ""
                return "", data
            self._held = ""
            self.state = self.AFTER
            reasoning = data[:end]
            text = data[end + len(_CLOSE_TAG) :]
        answer = text.lstrip()
        if answer:
            self.state = self.PASS
        return answer, reasoning

    def finish(self) -> tuple[str, str]:
        """The answer is over: `(answer, reasoning)` still held. An unclosed block's held text is
        reasoning; text held before the decision is answer text."""
        held, self._held = self._held, ""
        state, self.state = self.state, self.PASS
        if state == self.LEAD:
            return held, ""
        if state == self.OPEN:
            return "", held
        return "", ""
