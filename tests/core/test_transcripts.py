"""Real recorded upstream streams (../shared/reference/transcripts/) through the dialects: each
relays to the answer text, reasoning, sources, tool calls, finish reason and usage that its
`expected.json` entry gives, whatever the byte boundaries of the body; a recording of a failed
stream ends in the upstream's error.

The recordings are read where they live (a workplace rule keeps them out of this repository):
next to the repository in `shared/reference/transcripts/`, or where `GATEWAY_TRANSCRIPTS` says.
The wire bodies are built by the mock upstream's replay (`gateway.mock.replay`, INDEX.md's
framing rules), which is what the end-to-end test serves too.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.dialects import UpstreamFailure, translator_for
from gateway.core.parts import KNOWN_PARTS
from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEDecoder, SSEEvent
from gateway.core.usage import Usage
from gateway.mock.formats import Emit
from gateway.mock.knobs import Knobs
from gateway.mock.replay import TranscriptLibrary, plan_replay
from tests.support import TRANSCRIPT_USAGE, dialect_of, expected_finish

TRANSCRIPTS = Path(
    os.environ.get("GATEWAY_TRANSCRIPTS")
    or Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "transcripts"
)
if not (TRANSCRIPTS / "expected.json").is_file():
    pytest.skip(
        f"no recorded transcripts at {TRANSCRIPTS} (set GATEWAY_TRANSCRIPTS to their directory)",
        allow_module_level=True,
    )

EXPECTED: dict[str, Any] = orjson.loads((TRANSCRIPTS / "expected.json").read_bytes())
LIBRARY = TranscriptLibrary(TRANSCRIPTS)
ALL = sorted(name for name in EXPECTED if name.endswith(".jsonl"))
FAILED = [name for name in ALL if EXPECTED[name]["error"] is not None]
COMPLETE = [name for name in ALL if name not in FAILED]


def wire_body(name: str) -> bytes:
    """The response body as the provider framed it: the byte-exact `.sse` capture where there is
    one, else the events the mock's replay builds from the `.jsonl` by INDEX.md's rules (event
    names where the API has them, its line ending, `[DONE]` only where the provider sends it)."""
    steps = plan_replay(LIBRARY.load(name.removesuffix(".jsonl")), Knobs())
    return b"".join(step.data for step in steps if isinstance(step, Emit))


@dataclass
class Recorder:
    """A PartSink that keeps everything in arrival order, with the text interleaved."""

    log: list[tuple[str, Any]] = field(default_factory=list)

    def push_reasoning(self, text: str) -> None:
        self.log.append(("reasoning", text))

    def push_sources(self, sources: list[dict[str, Any]]) -> None:
        self.log.append(("sources", sources))

    def push_tool_call(self, call: dict[str, Any]) -> None:
        self.log.append(("tool_call", call))

    def push_progress(self, step: dict[str, Any]) -> None:
        self.log.append(("progress", step))

    def of(self, kind: str) -> list[Any]:
        return [value for k, value in self.log if k == kind]


@dataclass
class Relayed:
    text: str
    meta: dict[str, Any]
    sink: Recorder
    #: The upstream's usage, normalised (gateway.core.usage).
    usage: Usage | None = None


def relay(name: str, pieces: list[bytes], wants: frozenset[str] = KNOWN_PARTS) -> Relayed:
    """What the gateway makes of the body arriving in `pieces`: the upstream feed's loop
    (gateway/io/upstream.py `_BodyFeed.data`), then a clean EOF unless a `[DONE]` ended it."""
    sink = Recorder()
    translator = translator_for(dialect_of(name), wants, sink)
    decoder = SSEDecoder()
    text: list[str] = []
    for piece in pieces:
        for event in decoder.feed(piece):
            delta = translator.feed(event)
            if delta is not None:
                text.append(delta)
                sink.log.append(("text", delta))
            if translator.finished:
                break
        if translator.finished:
            break
    if not translator.finished:
        translator.end_of_stream()
    assert translator.finished
    if translator.final_text is not None:  # what finish_done relays from it
        text.append(translator.final_text[len("".join(text)) :])
    return Relayed("".join(text), translator.meta, sink, translator.usage())


def check(name: str, got: Relayed) -> None:
    want = EXPECTED[name]
    # The protocol relays a refusal as the answer's text, flagged in `done`; expected.json keeps
    # it apart (`refusal`), so the two are joined here.
    assert got.text == want["text"] + (want.get("refusal") or "")
    assert got.meta.get("refusal", None) is (True if want.get("refusal") else None)
    # For the multi-choice stream expected.json's top level is choice 0, which is the protocol's
    # rule too (the other choices are not relayed).
    reasoning = "".join(got.sink.of("reasoning"))
    assert reasoning == (want["reasoning"] or "")
    assert got.meta.get("reasoning") == want["reasoning"]
    sources = [s for batch in got.sink.of("sources") for s in batch]
    assert [s["url"] for s in sorted(sources, key=lambda s: s["index"])] == want["sources"]
    assert [s["index"] for s in sources] == list(range(1, len(sources) + 1))
    calls = got.sink.of("tool_call")
    assert [c["name"] for c in calls] == [c["name"] for c in want["tool_calls"]]
    for call, expected_call in zip(calls, want["tool_calls"], strict=True):
        # Gemini's calls have no id: the gateway numbers them.
        if expected_call.get("id") is not None:
            assert call["call_id"] == expected_call["id"]
        assert call["call_id"]
        if expected_call["arguments_parsed"] is None:
            assert call["arguments_raw"] == expected_call["arguments"]
        else:
            assert call["arguments"] == expected_call["arguments_parsed"]
    assert len({c["call_id"] for c in calls}) == len(calls)
    assert got.meta.get("tool_calls", []) == calls
    assert got.meta.get("finish_reason") == expected_finish(EXPECTED[name])
    assert got.meta.get("usage") == want["usage"]  # kept as sent, for the normalisation
    assert got.usage is not None
    usage = got.usage.as_dict()
    assert usage == TRANSCRIPT_USAGE[name.removesuffix(".jsonl")]
    raw_total = (want["usage"] or {}).get(
        "total_tokens", (want["usage"] or {}).get("totalTokenCount")
    )
    if raw_total is not None:  # where the upstream gave a total, it is the gateway's total
        assert usage["total_tokens"] == raw_total


def test_the_recordings_are_there_and_unchanged() -> None:
    """Every recording is read by a dialect, and each file is the one expected.json describes
    (its SHA-256)."""
    assert len(ALL) == 34
    for name in ALL:
        assert dialect_of(name)
        digest = hashlib.sha256((TRANSCRIPTS / name).read_bytes()).hexdigest()
        assert digest == EXPECTED[name]["sha256"], name
        wire = EXPECTED[name].get("wire")
        if wire is not None:
            body = (TRANSCRIPTS / wire["sse_file"]).read_bytes()
            assert hashlib.sha256(body).hexdigest() == wire["sse_sha256"], name


@pytest.mark.parametrize("name", COMPLETE)
def test_recording_relays_to_its_expected_result(name: str) -> None:
    """The whole body in one piece gives expected.json's text, reasoning, sources, tool calls,
    finish reason and usage."""
    check(name, relay(name, [wire_body(name)]))


@pytest.mark.parametrize("name", COMPLETE)
def test_recording_without_parts_is_text_and_done_only(name: str) -> None:
    """A client that asked for no parts gets the same text and nothing else: no part pushed,
    no `reasoning` or `tool_calls` in `done`."""
    got = relay(name, [wire_body(name)], frozenset())
    want = EXPECTED[name]
    assert got.text == want["text"] + (want.get("refusal") or "")
    assert [k for k, _ in got.sink.log if k != "text"] == []
    assert "reasoning" not in got.meta
    assert "tool_calls" not in got.meta


@pytest.mark.parametrize("name", COMPLETE)
def test_recording_one_event_per_read_keeps_parts_in_order(name: str) -> None:
    """Parts come in the order the upstream revealed them: reasoning before the answer text
    and tool calls, when the recording has them in that order."""
    got = relay(name, [wire_body(name)])
    kinds = [k for k, _ in got.sink.log]
    if "reasoning" in kinds and ("text" in kinds or "tool_call" in kinds):
        last_reasoning = max(i for i, k in enumerate(kinds) if k == "reasoning")
        first_other = min(i for i, k in enumerate(kinds) if k in ("text", "tool_call"))
        assert last_reasoning < first_other


@pytest.mark.parametrize("name", COMPLETE)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_recording_split_at_any_bytes_changes_nothing(name: str, data: st.DataObject) -> None:
    """The body cut at arbitrary byte boundaries (inside a UTF-8 character, a CRLF, a `data:`
    field) relays to exactly the same result."""
    body = wire_body(name)
    cuts = sorted(
        data.draw(st.lists(st.integers(0, len(body)), max_size=min(40, len(body))), label="cuts")
    )
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    check(name, relay(name, pieces))


@pytest.mark.parametrize("name", FAILED)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_failed_recording_ends_in_the_upstreams_error(name: str, data: st.DataObject) -> None:
    """A stream the upstream failed (an `error` event, `response.failed`) ends in
    `upstream_error` with the upstream's message made safe (no URL), however it is split."""
    body = wire_body(name)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=20), label="cuts"))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    with pytest.raises(UpstreamFailure) as info:
        relay(name, pieces)
    assert info.value.code is ErrorCode.UPSTREAM_ERROR
    message = EXPECTED[name]["error"]["message"]
    assert info.value.message.startswith(message[:40])
    assert "https://" not in info.value.message


def test_chat_events_carry_no_event_names_and_typed_apis_name_theirs() -> None:
    """Chat-completions and Gemini streams use no `event:` names; Anthropic and Responses name
    every event after its `type` (INDEX.md), which is what their dialects read."""
    for name in ALL:
        events: list[SSEEvent] = SSEDecoder().feed(wire_body(name))
        if dialect_of(name) in ("anthropic", "openai-responses"):
            assert all(orjson.loads(e.data)["type"] == e.event for e in events), name
        else:
            assert {e.event for e in events} == {"message"}, name
