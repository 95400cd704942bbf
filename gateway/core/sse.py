"""Incremental decoder for ``text/event-stream`` bodies (upstream LLM answers).

Implements the WHATWG HTML Living Standard, section 9.2.6 "Interpreting an event stream"
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation),
fed with arbitrary byte chunks as they come off the network. The module is pure: no I/O and no
event loop, so the same decoder serves aiohttp, tests and outside conformance suites.

This is the gateway's per-chunk hot path, so the work is done in bulk by C-level ``bytes`` and
``str`` methods: each feed is cut once at its last line ending, everything up to its last blank
line is decoded in one call and scanned with ``str.find``, and a lone ``data: ...`` line followed
by a blank line (one LLM token event) becomes an event without the general field handling. An
unterminated line waits in a ``bytearray`` that is only appended to, so nothing is re-copied.
"""

from collections.abc import Callable
from contextlib import suppress
from typing import Final, NamedTuple, cast

__all__ = ["SSEDecoder", "SSEEvent", "SSEEventTooLarge"]

_BOM: Final = b"\xef\xbb\xbf"
_CR: Final = 0x0D
_LF: Final = 0x0A


class SSEEvent(NamedTuple):
    """One dispatched event, as the spec's "dispatch the event" step would fire it.

    A NamedTuple, not a frozen dataclass: one is built per upstream token, and a frozen
    dataclass's __init__ (object.__setattr__ per field) cost about 11% of the relay's CPU in
    the throughput profile (bench/results/2026-11-25.pyspy-top.txt)."""

    event: str
    """Event type; ``"message"`` when the event type buffer was empty."""
    data: str
    """Data buffer with one trailing LF removed, kept verbatim for byte-faithful relaying."""
    id: str | None
    """Last-event-ID string at dispatch; ``None`` if no ``id`` field was ever accepted."""


#: `SSEEvent(event, data, id)` without NamedTuple's generated `__new__`, a Python function: one
#: interpreter frame less per upstream token.
_event: Final = cast(
    Callable[[type[SSEEvent], tuple[str, str, str | None]], SSEEvent], tuple.__new__
)


class SSEEventTooLarge(ValueError):
    """An event (its data plus the line being read) outgrew ``max_event_bytes``."""


class SSEDecoder:
    """Feed raw body bytes in, get completed events out; results never depend on chunking.

    ``max_event_bytes`` bounds what one event can make the decoder hold: the raw bytes of the
    line being read plus the current event's data buffer (the raw bytes of each ``data`` value
    plus one LF each). Exceeding it raises :class:`SSEEventTooLarge` from :meth:`feed`, and the
    decoder then stays failed. Events completed earlier in that same failing ``feed()`` call are
    not returned. Like the spec, there is no end-of-stream hook: at EOF a partial line and an
    undispatched block are simply discarded.
    """

    __slots__ = (
        "_at_start",
        "_data",
        "_data_bytes",
        "_event_type",
        "_failed",
        "_id_buffer",
        "_max",
        "_pending",
        "_skip_lf",
        "last_event_id",
        "retry",
    )

    def __init__(self, max_event_bytes: int = 4 * 1024 * 1024) -> None:
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be positive")
        self.retry: int | None = None
        """Reconnection time (ms) from the last valid ``retry`` field, else ``None``."""
        self.last_event_id: str | None = None
        """The event source's last-event-ID string (set at dispatch); ``None`` = never set."""
        self._max = max_event_bytes
        self._pending = bytearray()  # unterminated line tail; never contains CR or LF
        self._skip_lf = False  # the last byte seen was a CR that ended a line
        self._at_start = True  # a leading BOM may still arrive
        self._data: list[str] = []  # data buffer, as the values of its data lines
        self._data_bytes = 0  # raw size of the data buffer, for the cap
        self._event_type = ""
        self._id_buffer: str | None = None  # the spec's "last event ID buffer"
        self._failed = False

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Consume the next bytes of the stream and return the events they complete, in order."""
        if (
            data[:6] == b"data: "
            and not (self._pending or self._data or self._event_type)
            and not (self._skip_lf or self._at_start or self._failed)
            and len(data) <= self._max
        ):
            # Fast path: exactly one `data: ` line and its blank line, with nothing open before
            # it: how LLM APIs send a token when it arrives alone (one read per token). The same
            # event, id and last_event_id as the general path below gives; anything else
            # (another line, a CR inside an LF stream, a split) goes the general way.
            # Slices, and `in` on the decoded text, not find()/endswith() (they parse their
            # arguments with PyArg_ParseTuple) nor `in` on bytes (it first tries the operand
            # as an int and formats a TypeError): each cost more than the search
            # (docs/performance.md).
            # A CR or LF byte decodes to that character and nothing else decodes to one.
            tail = data[-4:]
            value = None
            if tail == b"\r\n\r\n":
                value = data[6:-4]
            elif tail[2:] == b"\n\n":
                value = data[6:-2]
            if value is not None:
                text = value.decode("utf-8", "replace")
                if "\n" not in text and "\r" not in text:
                    self.last_event_id = self._id_buffer
                    return [_event(SSEEvent, ("message", text, self._id_buffer))]
        if self._failed:
            raise SSEEventTooLarge("decoder already failed: an event exceeded max_event_bytes")
        if self._skip_lf and data:
            # Spec: a CRLF pair is one line ending; its CR already ended the line.
            self._skip_lf = False
            if data[0] == _LF:
                data = data[1:]
        if self._at_start and data:
            # Spec: "One leading U+FEFF BYTE ORDER MARK character must be ignored if any are
            # present." Decided on bytes, so the BOM may arrive split across feeds.
            head = bytes(self._pending) + data
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._pending[:] = head
                return []
            self._at_start = False
            self._pending.clear()
            data = head[len(_BOM) :] if head.startswith(_BOM) else head
        size = len(data)
        if not size:
            return []

        # Spec: lines end with CRLF, a lone LF or a lone CR. Find the last line ending; what
        # follows it is an unterminated line that must wait for more bytes.
        last = size - 1
        final = data[last]
        if final != _LF and final != _CR:
            last = data.rfind(b"\n")
            cr = data.rfind(b"\r", last + 1)
            if cr >= 0:
                last = cr
            elif last < 0:
                self._pending += data
                if len(self._pending) + self._data_bytes > self._max:
                    self._fail()
                return []
            final = data[last]
        if final == _CR:
            # A CRLF may be split across feeds: this CR ends the line now, and an LF opening
            # the next feed is swallowed. (A CR before the end of data is not followed by LF.)
            self._skip_lf = last == size - 1
            sep = b"\r\r"
        elif last and data[last - 1] == _CR:
            sep = b"\r\n\r\n"
        else:
            sep = b"\n\n"
        pending = self._pending
        if pending:
            pending += data[: last + 1]
            block: bytes | bytearray = pending
            self._pending = bytearray(data[last + 1 :])
        elif last == size - 1:
            block = data
        else:
            block = data[: last + 1]
            pending += data[last + 1 :]

        out: list[SSEEvent] = []
        if self._data_bytes + len(block) > self._max:
            # Near the cap: check every line precisely (a line adds at most its own bytes).
            self._lines_checked(block, out)
        else:
            # Bulk path for everything up to the last blank line, all of which dispatches now.
            # The blank line's form (sep, with the line ending before it) is guessed from the
            # last line ending, as streams are consistent in practice; a wrong guess only moves
            # lines to the line-by-line path.
            cut = block.rfind(sep)
            if cut < 0:
                self._lines_checked(block, out)
            else:
                cut += len(sep)
                if cut == len(block):
                    self._blocks(block, out)
                else:
                    self._blocks(block[:cut], out)
                    self._lines_checked(block[cut:], out)
        if len(self._pending) + self._data_bytes > self._max:
            self._fail()
        return out

    def _blocks(self, body: bytes | bytearray, out: list[SSEEvent]) -> None:
        """Process complete lines that end in a blank line, so all of them dispatch now.

        Line ends are found with ``str.find`` (memchr speed). A ``data: `` line directly
        followed by a blank line, with no event block left open, is the usual LLM token event:
        it becomes an event without going through the general field rules.
        """
        # Spec: the stream is decoded as UTF-8 with replacement. Decoding whole lines at once
        # equals decoding the stream, since a truncated sequence is ended by the CR/LF after it.
        text = body.decode("utf-8", "replace")
        find = text.find
        startswith = text.startswith
        append = out.append
        id_buffer = self._id_buffer
        clean = not (self._data or self._event_type)  # no block left open by an earlier feed
        size = len(text)
        pos = 0
        while pos < size:
            # Spec: a line ends at the first CR or LF; a CR directly followed by LF is one end.
            lf = find("\n", pos)
            cr = find("\r", pos, size if lf < 0 else lf)
            if clean and startswith("data: ", pos):
                if cr < 0:
                    if startswith("\n", lf + 1):  # an LF-ended data line, then a blank line
                        append(_event(SSEEvent, ("message", text[pos + 6 : lf], id_buffer)))
                        pos = lf + 2
                        continue
                elif cr == lf - 1 and startswith("\r\n", lf + 1):  # the same with CRLF
                    append(_event(SSEEvent, ("message", text[pos + 6 : cr], id_buffer)))
                    pos = lf + 3
                    continue
            start = pos
            if cr < 0:
                end = lf
                pos = lf + 1
            else:
                end = cr
                pos = lf + 1 if cr == lf - 1 else cr + 1
            if end == start:
                self._dispatch(out)
            else:
                self._field(text[start:end])
            id_buffer = self._id_buffer
            clean = not (self._data or self._event_type)
        # Spec, dispatch step 1: the last event ID string takes the buffer's value. body ends
        # with a blank line, so this is the value at the last dispatch.
        self.last_event_id = id_buffer

    def _lines_checked(self, block: bytes | bytearray, out: list[SSEEvent]) -> None:
        """Process terminated lines one at a time, enforcing the cap before each line."""
        limit = self._max
        # bytes.splitlines() splits on exactly CR, LF and CRLF (unlike str.splitlines()), and
        # block ends with a line ending, so every element is a complete line.
        for raw in block.splitlines():
            if self._data_bytes + len(raw) > limit:
                self._fail()
            if not raw:
                self._dispatch(out)
            elif self._field(raw.decode("utf-8", "replace")):
                # Raw bytes of the value plus the LF the spec appends; "data" is ASCII, so the
                # prefix "data:" or "data: " has the same length in bytes as in characters.
                prefix = 6 if raw.startswith(b"data: ") else min(5, len(raw))
                self._data_bytes += len(raw) - prefix + 1

    def _field(self, line: str) -> bool:
        """Apply one non-empty line per the spec's field rules; return True if data was added."""
        # Spec: "If the line starts with a U+003A COLON character (:)": ignore the line.
        if line[0] == ":":
            return False
        # Spec: field name up to the first colon; value after it, minus one leading U+0020.
        # A line without a colon is a field name with the empty string as value.
        colon = line.find(":")
        if colon < 0:
            name, value = line, ""
        else:
            name = line[:colon]
            value = line[colon + 2 :] if line.startswith(" ", colon + 1) else line[colon + 1 :]
        if name == "data":
            # Spec: append the value, then a single LF, to the data buffer.
            self._data.append(value)
            return True
        if name == "event":
            # Spec: set the event type buffer to the field value.
            self._event_type = value
        elif name == "id":
            # Spec: "If the field value does not contain U+0000 NULL, then set the last event
            # ID buffer to the field value. Otherwise, ignore the field."
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():
            # Spec: "If the field value consists of only ASCII digits, then interpret the field
            # value as an integer in base ten" and set the reconnection time. The empty value
            # is ignored (see the retry_empty_value vector).
            # A value past int()'s digit limit (sys.get_int_max_str_digits) is ignored.
            with suppress(ValueError):
                self.retry = int(value.lstrip("0") or "0")
        # Spec: any other field name is ignored.
        return False

    def _dispatch(self, out: list[SSEEvent]) -> None:
        """Spec "dispatch the event", run on each blank line."""
        # Step 1: the last event ID string takes the buffer's value (even with no data).
        self.last_event_id = self._id_buffer
        event_type = self._event_type
        self._event_type = ""
        data = self._data
        if not data:
            # Step 2: an empty data buffer resets the buffers and fires nothing.
            return
        self._data = []
        self._data_bytes = 0
        # Step 3: joining the values drops the single trailing LF the buffer would end with.
        text = data[0] if len(data) == 1 else "\n".join(data)
        out.append(SSEEvent(event_type or "message", text, self._id_buffer))

    def _fail(self) -> None:
        """Enter the permanent failed state, drop the buffers, and raise SSEEventTooLarge."""
        self._failed = True
        self._pending = bytearray()
        self._data = []
        raise SSEEventTooLarge(
            f"SSE event exceeds max_event_bytes={self._max} (data so far plus the current line)"
        )
