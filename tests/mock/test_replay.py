"""Replaying real recorded streams (gateway/mock/replay.py): every transcript goes out as its
provider framed it, byte for byte where the recorded body exists, whatever the split; split=
really cuts the body into separate writes.

The transcripts are not in this repository: they are read from ../shared/reference/transcripts
(or $GATEWAY_TRANSCRIPTS), and these tests skip when it is absent."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway.__main__ import main
from gateway.core.sse import SSEDecoder
from gateway.mock.knobs import DirectiveError, Knobs, Split, parse_directive
from gateway.mock.replay import (
    DEFAULT_FRAMING,
    FRAMINGS,
    Splitter,
    Transcript,
    TranscriptLibrary,
    events_from_jsonl,
    events_from_sse,
    framing_for,
    plan_replay,
)
from gateway.mock.server import MockUpstream, serve_forever
from tests.mock.conftest import fetch, post, url

TRANSCRIPTS = Path(
    os.environ.get("GATEWAY_TRANSCRIPTS")
    or Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "transcripts"
)
NO_TRANSCRIPTS = (
    f"no recorded streams at {TRANSCRIPTS} (set GATEWAY_TRANSCRIPTS to their directory)"
)
needs_transcripts = pytest.mark.skipif(not TRANSCRIPTS.is_dir(), reason=NO_TRANSCRIPTS)


def _names(suffix: str | None = None) -> list[str]:
    if not TRANSCRIPTS.is_dir():
        return []
    return sorted(
        p.stem
        for p in TRANSCRIPTS.iterdir()
        if p.suffix in (".sse", ".jsonl") and (suffix is None or p.suffix == suffix)
    )


def _params(names: list[str]) -> list[object]:
    """The names as test parameters, or one skipped parameter saying why there are none."""
    return list(dict.fromkeys(names)) or [
        pytest.param("none", marks=pytest.mark.skip(NO_TRANSCRIPTS))
    ]


ALL = _params(_names())
WITH_SSE = _params(_names(".sse"))
JSONL = _params(_names(".jsonl"))


def expected_body(name: str) -> bytes:
    """What the mock must send: the recorded body, else the body built from the json lines."""
    sse = TRANSCRIPTS / f"{name}.sse"
    if sse.exists():
        return sse.read_bytes()
    raw = (TRANSCRIPTS / f"{name}.jsonl").read_bytes()
    return b"".join(events_from_jsonl(raw, framing_for(name)))


def payloads(name: str) -> list[tuple[str | None, bytes]]:
    """(event name or None, data bytes) of each json line, as INDEX.md defines them."""
    out: list[tuple[str | None, bytes]] = []
    for line in (TRANSCRIPTS / f"{name}.jsonl").read_bytes().splitlines():
        if not line:
            continue
        wrapper = orjson.loads(line)
        if set(wrapper) == {"event", "data"}:
            # "take the text from just after "data": up to the line's final }"
            out.append((wrapper["event"], line[line.index(b',"data":') + 8 : -1]))
        else:
            out.append((None, line))
    return out


def random_cuts(body: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    pieces, start = [], 0
    while start < len(body):
        size = rng.randint(1, 40)
        pieces.append(body[start : start + size])
        start += size
    return pieces


@pytest.fixture
async def replayer() -> AsyncIterator[MockUpstream]:
    upstream = MockUpstream(default_delay_ms=0, transcripts_dir=TRANSCRIPTS)
    await upstream.start()
    yield upstream
    await upstream.stop()


# --------------------------------------------------------------------------------------------
# Pure: framing, the bodies built from json lines, the splitter
# --------------------------------------------------------------------------------------------


def test_framing_follows_each_provider() -> None:
    """OpenAI-compatible chat ends with [DONE] on LF; Perplexity and Gemini use CRLF and end at
    EOF; Anthropic and Responses name their events; an unknown provider gets INDEX.md's default."""
    assert framing_for("openai-chat-text") == (b"\n", False, True)
    for chat in ("azure-openai-chat-x", "deepseek-chat-x", "xai-chat-x", "mistral-chat-x"):
        assert framing_for(chat) == FRAMINGS["openai-chat"]
    assert framing_for("groq-chat-reasoning").done
    assert framing_for("perplexity-chat-citations") == (b"\r\n", False, False)
    assert framing_for("google-vertex-thinking-tool-calls").eol == b"\r\n"
    assert framing_for("google-gemini-text") == (b"\r\n", False, False)
    for typed in ("anthropic-messages-text", "openai-responses-text", "xai-responses-x"):
        assert framing_for(typed) == (b"\n", True, False)
    assert framing_for("openai-chatty") == DEFAULT_FRAMING  # a prefix only as a whole word
    assert framing_for("cohere-chat-text") == DEFAULT_FRAMING


def test_json_lines_are_framed_with_their_bytes_verbatim() -> None:
    """A plain line is a data: payload as written; an event+data line gives its event name and
    its PAYLOAD bytes untouched (padding included); [DONE] only where the framing says."""
    raw = (
        b'{"a":1}\n'
        b'{"event":"ping","data":{"type": "ping"}}\n'
        b'{"event":"content_block_start","data":{"type":"text","text":""}         }\n'
    )
    events = events_from_jsonl(raw, FRAMINGS["openai-chat"])
    assert events == [
        b'data: {"a":1}\n\n',
        b'event: ping\ndata: {"type": "ping"}\n\n',
        b'event: content_block_start\ndata: {"type":"text","text":""}         \n\n',
        b"data: [DONE]\n\n",
    ]
    typed = events_from_jsonl(b'{"type":"response.created","x":1}\n', FRAMINGS["openai-responses"])
    assert typed == [b'event: response.created\ndata: {"type":"response.created","x":1}\n\n']
    crlf = events_from_jsonl(b'{"a":1}\n', FRAMINGS["perplexity-chat"])
    assert crlf == [b'data: {"a":1}\r\n\r\n']


def test_a_recorded_body_is_cut_after_each_blank_line() -> None:
    """The events of a recorded body join back to it exactly, an unterminated last one kept."""
    body = b"event: a\ndata: 1\n\ndata: 2\n\ndata: 3"
    assert events_from_sse(body) == [b"event: a\ndata: 1\n\n", b"data: 2\n\n", b"data: 3"]
    assert events_from_sse(b"data: 1\r\n\r\ndata: 2\r\n\r\n") == [
        b"data: 1\r\n\r\n",
        b"data: 2\r\n\r\n",
    ]


@needs_transcripts
@pytest.mark.parametrize("name", WITH_SSE)
def test_the_framing_rules_rebuild_every_recorded_body(name: str) -> None:
    """Each .sse is rebuilt exactly from its .jsonl by the provider's framing (the anthropic-sdk
    captures lack the last blank line: INDEX.md's "unterminated last event")."""
    sse = (TRANSCRIPTS / f"{name}.sse").read_bytes()
    built = b"".join(
        events_from_jsonl((TRANSCRIPTS / f"{name}.jsonl").read_bytes(), framing_for(name))
    )
    if name.startswith("anthropic-"):
        assert built == sse + b"\n\n"
    else:
        assert built == sse
    assert b"".join(events_from_sse(sse)) == sse


@needs_transcripts
@pytest.mark.parametrize("name", JSONL)
def test_built_bodies_decode_to_exactly_the_recorded_payloads(name: str) -> None:
    """The gateway's own SSE decoder, fed the replayed body in random pieces, gets back every
    payload byte for byte, event names where the provider sends them, and [DONE] only where the
    provider is known to send it."""
    body = expected_body(name)
    decoder = SSEDecoder()
    events = [e for piece in random_cuts(body, seed=len(name)) for e in decoder.feed(piece)]
    if not body.endswith((b"\n\n", b"\r\n\r\n")):
        events += decoder.feed(b"\n\n")  # the unterminated last event of a recorded body
    framing = framing_for(name)
    if framing.done:
        assert events[-1].data == "[DONE]"
        events = events[:-1]
    assert [e.data.encode() for e in events] == [p for _, p in payloads(name)]
    for event, (wrapped, payload) in zip(events, payloads(name), strict=True):
        if wrapped is not None:
            assert event.event == wrapped
        elif framing.named:
            assert event.event == orjson.loads(payload)["type"]
        else:
            assert event.event == "message"


def test_splitter_cuts_fixed_sizes_across_feeds() -> None:
    """split=N: pieces of exactly N bytes whatever the feeds; the rest waits for flush."""
    splitter = Splitter(Split(size=3))
    assert splitter.feed(b"abcd") == [b"abc"]
    assert splitter.feed(b"efghij") == [b"def", b"ghi"]
    assert splitter.flush() == b"j"
    assert splitter.flush() == b""


def test_random_splits_depend_on_the_seed_only() -> None:
    """split=random:SEED: the same body gives the same pieces however it is fed; another seed
    gives others; sizes run from 1 to 512 bytes."""
    body = bytes(range(256)) * 40

    def cut(seed: int, feeds: list[bytes]) -> list[bytes]:
        splitter = Splitter(Split(seed=seed))
        pieces = [p for feed in feeds for p in splitter.feed(feed)]
        return [*pieces, splitter.flush()]

    whole = cut(7, [body])
    assert b"".join(whole) == body
    assert cut(7, random_cuts(body, seed=1)) == whole
    assert cut(8, [body]) != whole
    sizes = [len(p) for p in whole[:-1]]
    assert min(sizes) == 1
    assert max(sizes) <= 512
    assert len(set(sizes)) > 10


def test_plan_replay_paces_each_event_and_stops_at_the_fault() -> None:
    """A replay is one paced step per event; fault=... after=K comes after K events."""
    transcript = Transcript("t", (b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"), exact=True)
    steps = list(plan_replay(transcript, Knobs()))
    assert [(s.kind, s.paced) for s in steps] == [("text", True)] * 3
    _, knobs = parse_directive("[[mock transcript=t fault=stall after=2]]")
    assert [s.kind for s in plan_replay(transcript, knobs)] == ["text", "text", "stall"]
    _, knobs = parse_directive("[[mock transcript=t fault=eof after=9]]")
    assert [s.kind for s in plan_replay(transcript, knobs)] == ["text", "text", "text", "eof"]


# --------------------------------------------------------------------------------------------
# The library: names are looked up in the listing, never joined into a path
# --------------------------------------------------------------------------------------------


def test_a_transcript_name_cannot_leave_the_directory(tmp_path: Path) -> None:
    """Separators and leading dots fail the knob's syntax; a name outside the listing (another
    file kind, a file next to the directory) is unknown; known names load."""
    inner = tmp_path / "transcripts"
    inner.mkdir()
    (inner / "ok.jsonl").write_bytes(b'{"a":1}\n')
    (inner / "notes.md").write_text("not a transcript")
    (tmp_path / "secret.jsonl").write_bytes(b'{"secret":1}\n')
    for bad in ("../secret", "a/b", ".hidden", "..", "a\\b", "x" * 201):
        with pytest.raises(DirectiveError) as info:
            parse_directive(f"[[mock transcript={bad}]]")
        assert info.value.key == "transcript"
    library = TranscriptLibrary(inner)
    assert library.names() == ["ok"]
    for unknown in ("notes", "secret", "ok.jsonl", "transcripts"):
        with pytest.raises(DirectiveError, match="unknown transcript") as info:
            library.load(unknown)
        assert info.value.key == "transcript"
    assert library.load("ok").body == b'data: {"a":1}\n\n'
    with pytest.raises(NotADirectoryError):
        TranscriptLibrary(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# Over loopback: what the mock sends
# --------------------------------------------------------------------------------------------


def directive(name: str, extra: str = "") -> str:
    return f"Replay please [[mock transcript={name} {extra} tag={name}]]"


@needs_transcripts
@pytest.mark.parametrize("name", ALL)
async def test_every_transcript_replays_byte_exact_whatever_the_split(
    replayer: MockUpstream, session: aiohttp.ClientSession, name: str
) -> None:
    """The body is the recorded .sse (else the .jsonl framed as its provider does), unsplit,
    cut at random boundaries and cut one byte per write."""
    expected = expected_body(name)
    for split in ("", f"split=random:{len(name)}", "split=1"):
        if split == "split=1" and len(expected) > 20_000:
            continue  # a byte per write: the small ones prove it, the big ones take long
        status, headers, raw = await fetch(
            session, url(replayer, "/openai"), directive(name, split)
        )
        assert status == 200
        assert headers["Content-Type"].startswith("text/event-stream")
        assert raw == expected, split
        rec = replayer.record(name)
        assert rec.outcome == "completed"
        assert rec.chunks_sent == len(events_from_sse(expected))
        if split:
            assert rec.write_sizes is not None
            assert sum(rec.write_sizes) == len(expected)
        else:
            assert rec.write_sizes is None


@needs_transcripts
async def test_split_sends_each_piece_as_its_own_write(
    replayer: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """split=1 writes byte by byte and split=random:SEED at the same random sizes each time; a
    client reading what arrives (Nagle is off on the mock's side) sees many separate pieces."""
    name = "openai-chat-tool-call-single"
    expected = expected_body(name)
    await fetch(session, url(replayer, "/openai"), directive(name, "split=1"))
    assert replayer.record(name).write_sizes == [1] * len(expected)

    sizes = []
    for _ in range(2):
        await fetch(session, url(replayer, "/openai"), directive(name, "split=random:42"))
        sizes.append(replayer.record(name).write_sizes)
    assert sizes[0] == sizes[1]
    assert sizes[0] is not None
    assert len(set(sizes[0])) > 5

    reads = []
    async with post(session, url(replayer, "/openai"), directive(name, "split=7")) as resp:
        async for piece in resp.content.iter_any():
            reads.append(piece)
    assert b"".join(reads) == expected
    assert len(reads) > 10
    assert replayer.record(name).write_sizes == [7] * (len(expected) // 7) + (
        [len(expected) % 7] if len(expected) % 7 else []
    )


@needs_transcripts
async def test_a_transcript_replays_on_every_route(
    replayer: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """The route does not change a replay: the test picks the gateway dialect that applies."""
    name = "perplexity-chat-citations"
    for route in ("/perplexity", "/chat/completions", "/openai", "/v1/chat/completions", "/events"):
        status, _, raw = await fetch(session, url(replayer, route), directive(name))
        assert (status, raw) == (200, expected_body(name)), route


@needs_transcripts
async def test_replay_takes_faults_after_k_events(
    replayer: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """fault=eof after=K ends cleanly after K whole events (split or not); fault=reset after=K
    cuts the connection there."""
    name = "openai-chat-text"
    events = events_from_sse(expected_body(name))
    status, _, raw = await fetch(
        session, url(replayer, "/openai"), directive(name, "fault=eof after=3 split=random:3")
    )
    assert (status, raw) == (200, b"".join(events[:3]))
    assert replayer.record(name).outcome == "fault"
    async with post(
        session, url(replayer, "/openai"), directive(name, "fault=reset after=2")
    ) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert replayer.record(name).chunks_sent == 2


@needs_transcripts
async def test_replay_is_paced_with_heartbeats_between_events(
    replayer: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """delay_ms paces the events and keepalive_ms pings between them (never inside an event,
    even when split= holds part of one back)."""
    name = "openai-chat-length"
    events = events_from_sse(expected_body(name))
    _, _, raw = await fetch(
        session,
        url(replayer, "/openai"),
        directive(name, "delay_ms=30 keepalive_ms=12 split=random:5"),
    )
    rec = replayer.record(name)
    assert rec.keepalives_sent >= len(events) - 1
    assert raw.replace(b": ping\n\n", b"") == b"".join(events)
    blocks = [b for b in raw.split(b"\n\n") if b]
    assert all(b == b": ping" or b.startswith(b"data: ") for b in blocks)


async def test_transcript_needs_a_directory(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """A mock started without a transcripts directory refuses transcript= with a 400 that says
    how to give it one."""
    status, _, raw = await fetch(
        session, url(mock, "/openai"), "hi [[mock transcript=openai-chat-text]]"
    )
    assert status == 400
    error = orjson.loads(raw)["error"]
    assert error["param"] == "transcript"
    assert "--transcripts DIR" in error["message"]


@needs_transcripts
async def test_an_unknown_transcript_is_a_400_listing_the_known_ones(
    replayer: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """A name not in the directory is refused, and the error names the ones there are."""
    status, _, raw = await fetch(session, url(replayer, "/openai"), directive("no-such-stream"))
    assert status == 400
    error = orjson.loads(raw)["error"]
    assert error["param"] == "transcript"
    assert "openai-chat-text" in error["message"]


@needs_transcripts
async def test_serve_forever_and_the_command_take_a_transcripts_directory(
    capsys: pytest.CaptureFixture[str], session: aiohttp.ClientSession
) -> None:
    """serve_forever replays from its transcripts_dir and says where they are; the command
    refuses a --transcripts that is not a directory in one line, exit 2."""
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.get_running_loop().create_task(
        serve_forever(
            "127.0.0.1", 0, 0.0, on_ready=ready.set_result, transcripts_dir=str(TRANSCRIPTS)
        ),
        name="mock serve_forever",
    )
    try:
        base = await asyncio.wait_for(ready, 5)
        status, _, raw = await fetch(session, base + "/openai", directive("openai-chat-length"))
        assert (status, raw) == (200, expected_body("openai-chat-length"))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert f"transcripts in {TRANSCRIPTS}" in capsys.readouterr().out
    assert main(["mock-upstream", "--port", "0", "--transcripts", str(TRANSCRIPTS / "nope")]) == 2
    assert "--transcripts" in capsys.readouterr().err
