"""Conformance and robustness tests for the incremental SSE decoder (gateway/core/sse.py).

The vectors in data/sse-vectors.json (a copy of the shared reference file, so CI does not depend
on ../shared) are run whole, byte by byte, in their given chunkings and in random chunkings.
Random streams are also checked against a small whole-stream parser written directly from the
WHATWG "Interpreting an event stream" text, so the decoder's bulk fast path is compared with
the plain algorithm rather than with itself.
"""

import ast
import base64
import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.core.sse import SSEDecoder, SSEEvent, SSEEventTooLarge

VECTORS_FILE = Path(__file__).parents[1] / "data" / "sse-vectors.json"
SSE_SOURCE = Path(__file__).parents[2] / "gateway" / "core" / "sse.py"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))["vectors"]
CHUNKED = [v for v in VECTORS if "chunks_b64" in v or "chunk_size" in v]

# (events as (type, data, id) tuples, retry, last_event_id)
Outcome = tuple[list[tuple[str, str, str | None]], int | None, str | None]


def vector_bytes(vector: dict[str, Any]) -> bytes:
    """The vector's byte stream: input_b64 when given (authoritative), else UTF-8 of input."""
    if vector.get("input_b64") is not None:
        return base64.b64decode(vector["input_b64"])
    text: str = vector["input"]
    return text.encode("utf-8")


def expected(vector: dict[str, Any]) -> Outcome:
    """The vector's expected events, retry and last_event_id in Outcome form."""
    events = [(e["event"], e["data"], e["id"]) for e in vector["events"]]
    return events, vector["retry"], vector["last_event_id"]


def decode(chunks: list[bytes], max_event_bytes: int = 4 * 1024 * 1024) -> Outcome:
    """Feed the chunks to a fresh decoder and collect everything the spec makes observable."""
    decoder = SSEDecoder(max_event_bytes=max_event_bytes)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    assert all(type(e) is SSEEvent for e in events)
    return [(e.event, e.data, e.id) for e in events], decoder.retry, decoder.last_event_id


def split_at(raw: bytes, cuts: set[int]) -> list[bytes]:
    """Split raw at the given offsets (empty chunks included, as a network read may yield)."""
    bounds = [0, *sorted(cuts), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def reference(raw: bytes) -> Outcome:
    """Whole-stream SSE parser transcribed step by step from the WHATWG algorithm."""
    text = raw.decode("utf-8", "replace")  # UTF-8 decode: replacement, one leading BOM dropped
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = re.split("\r\n|\r|\n", text)
    lines.pop()  # what follows the last line ending is an incomplete line: never processed
    events: list[tuple[str, str, str | None]] = []
    data, event_type, id_buffer = "", "", None
    last_event_id: str | None = None
    retry: int | None = None
    for line in lines:
        if line == "":
            last_event_id = id_buffer
            if data == "":
                event_type = ""
                continue
            if data.endswith("\n"):
                data = data[:-1]
            events.append((event_type or "message", data, last_event_id))
            data, event_type = "", ""
            continue
        if line.startswith(":"):
            continue
        if ":" in line:
            name, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            name, value = line, ""
        if name == "event":
            event_type = value
        elif name == "data":
            data += value + "\n"
        elif name == "id":
            if "\0" not in value:
                id_buffer = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    return events, retry, last_event_id


# Stream material: field lines of every kind, all three line endings, BOMs, invalid and split
# UTF-8, NULs, and arbitrary bytes, so random joins hit every parser branch and boundary.
FRAGMENTS = st.sampled_from(
    [
        b"data: x",
        b"data:y",
        b"data",
        b"data:  two",
        b'data: {"a": [1, "\xc3\xa9\xf0\x9f\x8e\x89"]}',
        b"data: \xe6\x97",
        b"\xe6\x97\xa5",
        b"\xf0\x9f",
        b"\xff",
        b"\xef\xbb\xbf",
        b"id: 7",
        b"id",
        b"id: a\x00b",
        b"event: add",
        b"event:",
        b"retry: 1500",
        b"retry: 1x",
        b"retry:",
        b": comment",
        b":",
        b"foo: bar",
        b" data: no",
        b"\r",
        b"\n",
        b"\r\n",
        b"\r\n\r\n",
        b"\n\n",
        b" ",
        b"\x00",
    ]
)
STREAMS = st.lists(st.one_of(FRAGMENTS, st.binary(max_size=6)), max_size=40).map(b"".join)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_whole(vector: dict[str, Any]) -> None:
    """Each vector's stream fed in a single call yields exactly its expected outcome."""
    assert decode([vector_bytes(vector)]) == expected(vector)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_byte_by_byte(vector: dict[str, Any]) -> None:
    """Each vector fed one byte per call yields the same outcome as the spec requires."""
    raw = vector_bytes(vector)
    assert decode([raw[i : i + 1] for i in range(len(raw))]) == expected(vector)


@pytest.mark.parametrize("vector", CHUNKED, ids=[v["name"] for v in CHUNKED])
def test_vector_given_chunking(vector: dict[str, Any]) -> None:
    """Vectors that prescribe chunks_b64 or chunk_size pass when fed exactly that way."""
    raw = vector_bytes(vector)
    if "chunks_b64" in vector:
        chunks = [base64.b64decode(c) for c in vector["chunks_b64"]]
    else:
        size = vector["chunk_size"]
        chunks = [raw[i : i + size] for i in range(0, len(raw), size)]
    assert b"".join(chunks) == raw
    assert len(chunks) > 1
    assert decode(chunks) == expected(vector)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_vector_random_chunking(vector: dict[str, Any], data: st.DataObject) -> None:
    """Each vector yields its expected outcome however its bytes are cut into feeds."""
    raw = vector_bytes(vector)
    cuts = data.draw(st.sets(st.integers(0, len(raw)), max_size=24), label="cuts")
    assert decode(split_at(raw, cuts)) == expected(vector)


@settings(max_examples=400, deadline=None)
@given(raw=STREAMS, data=st.data())
def test_random_streams_match_reference_parser(raw: bytes, data: st.DataObject) -> None:
    """Arbitrary streams, in arbitrary chunkings, decode exactly as the spec-literal parser."""
    cuts = data.draw(st.sets(st.integers(0, len(raw)), max_size=12), label="cuts")
    assert decode(split_at(raw, cuts)) == reference(raw)


#: One `data:` line and what ends it, fed alone: the shape of a token read off an LLM API (the
#: decoder's per-feed fast path), with near misses the fast path must leave to the general rules.
TOKEN_FEEDS = st.tuples(
    st.sampled_from(
        [
            b"data: x",
            b"data: ",
            b"data:  two",
            b'data: {"a": "\xc3\xa9"}',
            b"data: \xe6\x97",
            b"data: a\x00b",
            b"data: a\rb",
            b"data: a\nb",
            b"data: a\r\nid: 3",
            b"data: \xef\xbb\xbfz",
        ]
    ),
    st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n", b"\r\n\n", b"\n", b"\r\n", b""]),
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(before=STREAMS, tokens=st.lists(TOKEN_FEEDS, max_size=8))
@example(before=b"id: 7\n", tokens=[b"data: x\n\n"])  # the event carries the id, and sets it
@example(before=b"id: 7\r\n", tokens=[b"data: x\r\n\r\n"])
@example(before=b"data: a\r", tokens=[b"\ndata: x\n\n"])  # the LF that ends a split CRLF
def test_token_sized_feeds_match_reference_parser(before: bytes, tokens: list[bytes]) -> None:
    """Token-sized feeds, after any decoder state (an open block, a pending line, a CR that may
    be half of a CRLF, a BOM not yet decided), decode exactly as the spec-literal parser."""
    feeds = [before, *tokens]
    assert decode(feeds) == reference(b"".join(feeds))
    assert decode(tokens) == reference(b"".join(tokens))


def test_reference_parser_agrees_with_vectors() -> None:
    """The test-only reference parser itself reproduces every vector, so it can be trusted."""
    for vector in VECTORS:
        assert reference(vector_bytes(vector)) == expected(vector), vector["name"]


NEAR_MISSES = [
    # Streams that almost look like "data: value" + blank line, the decoder's bulk fast path.
    (b"data: a\rdata: b\n\r\n", [("message", "a\nb", None)]),
    (b"data: a\rid: 5\r\n\r\n", [("message", "a", "5")]),
    (b"data: a\r\ndata: b\r\n\r\n", [("message", "a\nb", None)]),
    (b"data: a\n\rdata: b\n\n", [("message", "a", None), ("message", "b", None)]),
    (b"data: a\r\n\ndata: b\n\r\n", [("message", "a", None), ("message", "b", None)]),
    (b"event: e\r\ndata: a\r\n\r\ndata: b\r\n\r\n", [("e", "a", None), ("message", "b", None)]),
    (b": c\ndata:  a\n\ndata:a\n\n", [("message", " a", None), ("message", "a", None)]),
    (b"data: a\r\r\ndata: b\r\n\r\n", [("message", "a", None), ("message", "b", None)]),
]


@pytest.mark.parametrize(("raw", "events"), NEAR_MISSES)
def test_fast_path_near_misses(raw: bytes, events: list[tuple[str, str, str | None]]) -> None:
    """Streams that nearly match the single-data-line shape decode per the general rules."""
    last_id = events[-1][2]
    assert decode([raw]) == (events, None, last_id) == reference(raw)
    assert decode([raw[i : i + 1] for i in range(len(raw))]) == (events, None, last_id)
    for cut in range(len(raw) + 1):
        assert decode([raw[:cut], raw[cut:]]) == (events, None, last_id)


def test_events_are_returned_by_the_feed_that_completes_them() -> None:
    """feed() returns only the events its bytes complete, in stream order."""
    decoder = SSEDecoder()
    assert decoder.feed(b"event: a\ndata: 1\n") == []
    assert decoder.feed(b"\ndata: 2\n\ndata: 3") == [
        SSEEvent("a", "1", None),
        SSEEvent("message", "2", None),
    ]
    assert decoder.feed(b"\n\n") == [SSEEvent("message", "3", None)]


def test_event_is_immutable() -> None:
    """SSEEvent is a frozen value, so a relay can share it without defensive copies."""
    event = SSEDecoder().feed(b"data: x\n\n")[0]
    with pytest.raises(AttributeError):
        event.data = "y"  # type: ignore[misc]


def test_huge_retry_value_is_handled_in_base_ten() -> None:
    """retry with thousands of leading zeros reads in base ten; an absurdly long one is ignored."""
    decoder = SSEDecoder()
    decoder.feed(b"retry: " + b"0" * 6000 + b"1234\n")
    assert decoder.retry == 1234
    decoder.feed(b"retry: " + b"9" * 6000 + b"\n")
    assert decoder.retry == 1234


def test_event_over_cap_raises() -> None:
    """An event whose data line is one byte over max_event_bytes raises SSEEventTooLarge."""
    line = b"data: " + b"x" * 95  # 101 bytes
    with pytest.raises(SSEEventTooLarge):
        SSEDecoder(max_event_bytes=100).feed(line + b"\r\n\r\n")


def test_event_at_cap_passes() -> None:
    """A data line of exactly max_event_bytes (prefix included) still decodes."""
    line = b"data: " + b"x" * 94  # 100 bytes
    assert SSEDecoder(max_event_bytes=100).feed(line + b"\r\n\r\n") == [
        SSEEvent("message", "x" * 94, None)
    ]


def test_cap_counts_data_accumulated_across_lines() -> None:
    """Small data lines of one event trip the cap once held data plus the next line exceed it."""
    decoder = SSEDecoder(max_event_bytes=1000)
    line = b"data: 0123456789\n"  # 16 bytes before its LF; adds 11 data bytes (value plus LF)
    for _ in range(90):  # after these, 990 data bytes are held: 979 + 16 <= 1000 still held
        assert decoder.feed(line) == []
    with pytest.raises(SSEEventTooLarge):
        decoder.feed(line)  # 990 + 16 > 1000


def test_cap_is_per_event_not_per_stream() -> None:
    """Many events each under the cap pass, in any feed size, since dispatch resets the count."""
    event = b"data: " + b"y" * 90 + b"\r\n\r\n"
    stream = event * 1000
    for size in (1, 7, 96, 65536):
        decoder = SSEDecoder(max_event_bytes=100)
        events = [
            e for i in range(0, len(stream), size) for e in decoder.feed(stream[i : i + size])
        ]
        assert len(events) == 1000
        assert events[-1] == SSEEvent("message", "y" * 90, None)


def test_comment_lines_do_not_accumulate_towards_cap() -> None:
    """Only data counts across lines: a long run of keep-alive comments never trips the cap."""
    decoder = SSEDecoder(max_event_bytes=100)
    for _ in range(1000):
        assert decoder.feed(b": keep-alive ping\n") == []
    assert decoder.feed(b"data: ok\n\n") == [SSEEvent("message", "ok", None)]


def test_endless_line_raises_before_buffering_past_cap() -> None:
    """A line that never ends raises in the very feed that takes its buffered bytes past the cap."""
    cap = 64 * 1024
    decoder = SSEDecoder(max_event_bytes=cap)
    chunk = b"z" * 1000
    for _ in range(cap // len(chunk)):  # 65,000 bytes buffered: still within the cap
        assert decoder.feed(chunk) == []
    with pytest.raises(SSEEventTooLarge):
        decoder.feed(chunk)


def test_decoder_stays_failed() -> None:
    """After the cap trips, every later feed raises too, even with valid or empty input."""
    decoder = SSEDecoder(max_event_bytes=10)
    with pytest.raises(SSEEventTooLarge):
        decoder.feed(b"data: 0123456789\n\n")
    for later in (b"data: ok\n\n", b"\n", b""):
        with pytest.raises(SSEEventTooLarge):
            decoder.feed(later)


@settings(max_examples=300, deadline=None)
@given(raw=STREAMS, cap=st.integers(1, 60), data=st.data())
def test_cap_outcome_independent_of_chunking(raw: bytes, cap: int, data: st.DataObject) -> None:
    """Whether the cap trips, and what decodes when it does not, is the same for any chunking."""
    cuts = data.draw(st.sets(st.integers(0, len(raw)), max_size=12), label="cuts")

    def outcome(chunks: list[bytes]) -> Outcome | None:
        try:
            return decode(chunks, max_event_bytes=cap)
        except SSEEventTooLarge:
            return None

    whole = outcome([raw])
    assert outcome(split_at(raw, cuts)) == whole
    if whole is not None:
        assert whole == reference(raw)


def test_module_imports_no_async_io() -> None:
    """gateway/core/sse.py stays pure: it imports nothing from asyncio, aiohttp or websockets."""
    tree = ast.parse(SSE_SOURCE.read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports would hide what sse.py depends on"
            imported.add((node.module or "").split(".")[0])
    assert imported, "found no imports at all: the AST walk is broken"
    assert imported.isdisjoint({"asyncio", "aiohttp", "websockets"}), imported
