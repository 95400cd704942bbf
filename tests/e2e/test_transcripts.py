"""Real recorded upstream streams through the running gateway: the mock upstream replays each
recording of ../shared/reference/transcripts/ (every dialect) with its real framing, its body
cut at random byte boundaries into separate writes, and a client that asked for every part
gets exactly what `expected.json` says the stream carries (text, reasoning, sources, tool
calls, finish reason, usage), as protocol messages with one contiguous seq.

The recordings are read where they live (a workplace rule keeps them out of this repository);
without them the module is skipped. tests/core/test_transcripts.py checks the same at the
dialect level, over many more byte splits.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.conftest import TRANSCRIPTS, StackFactory, is_terminal
from tests.support import TRANSCRIPT_USAGE, dialect_of, expected_finish

if TRANSCRIPTS is None or not (TRANSCRIPTS / "expected.json").is_file():
    pytest.skip(
        "no recorded transcripts beside the repository (../shared/reference/transcripts) and "
        "GATEWAY_TRANSCRIPTS unset",
        allow_module_level=True,
    )

EXPECTED: dict[str, Any] = orjson.loads((TRANSCRIPTS / "expected.json").read_bytes())
ALL = sorted(n for n in EXPECTED if n.endswith(".jsonl"))
FAILED = [n for n in ALL if EXPECTED[n]["error"] is not None]
COMPLETE = [n for n in ALL if n not in FAILED]
ALL_PARTS = ["reasoning", "sources", "tools", "progress"]


async def relay(make_stack: StackFactory, name: str, seed: int, parts: list[str]) -> list[Any]:
    stack = await make_stack(dialect=dialect_of(name))
    client = await stack.client(max_size=None)
    stem = name.removesuffix(".jsonl")
    await client.send(
        {
            "type": "start",
            "id": "t",
            "prompt": f"replay [[mock transcript={stem} split=random:{seed}]]",
            "parts": parts,
        }
    )
    frames = [await client.recv_until(lambda f: f.get("id") == "t")]
    while not is_terminal(frames[-1]):
        frames.append(await client.recv_until(lambda f: f.get("id") == "t"))
    await stack.assert_no_leaks()
    return frames


@pytest.mark.parametrize("name", COMPLETE)
async def test_recording_relays_through_the_gateway(make_stack: StackFactory, name: str) -> None:
    want = EXPECTED[name]
    frames = await relay(make_stack, name, seed=sum(map(ord, name)), parts=ALL_PARTS)
    assert frames[0]["type"] == "started"
    done = frames[-1]
    assert done["type"] == "done", done
    content = frames[1:-1]
    assert [f["seq"] for f in content] == list(range(1, len(content) + 1))
    assert done["seq"] == len(content)

    def of(kind: str) -> list[dict[str, Any]]:
        return [f for f in content if f["type"] == kind]

    text = "".join(f["text"] for f in of("text_chunk"))
    # A refusal is the answer's text, flagged in done (expected.json keeps it apart).
    assert text == done["text"] == want["text"] + (want.get("refusal") or "")
    assert done.get("refusal") is (True if want.get("refusal") else None)
    assert "".join(f["text"] for f in of("reasoning_chunk")) == (want["reasoning"] or "")
    assert done.get("reasoning") == want["reasoning"]
    sources = [s for f in of("sources") for s in f["sources"]]
    assert [s["url"] for s in sorted(sources, key=lambda s: s["index"])] == want["sources"]
    calls = of("tool_call")
    assert [c["name"] for c in calls] == [c["name"] for c in want["tool_calls"]]
    for call, expected in zip(calls, want["tool_calls"], strict=True):
        if expected.get("id") is not None:  # Gemini's calls have none: the gateway numbers them
            assert call["call_id"] == expected["id"]
        if expected["arguments_parsed"] is None:
            assert call["arguments_raw"] == expected["arguments"]
        else:
            assert call["arguments"] == expected["arguments_parsed"]
    assert done.get("finish_reason") == expected_finish(want)
    # The upstream's usage, normalised (tests/support.py has the table, worked
    # out by hand from expected.json).
    assert done["usage"] == TRANSCRIPT_USAGE[name.removesuffix(".jsonl")]


@pytest.mark.parametrize("name", COMPLETE)
async def test_recording_for_a_client_that_asks_for_no_parts(
    make_stack: StackFactory, name: str
) -> None:
    """Protocol 1 as it was: started, text chunks, done; the same answer text."""
    want = EXPECTED[name]
    frames = await relay(make_stack, name, seed=7, parts=[])
    assert {f["type"] for f in frames} <= {"started", "text_chunk", "done"}
    assert frames[-1]["text"] == want["text"] + (want.get("refusal") or "")
    assert "reasoning" not in frames[-1]
    assert "tool_calls" not in frames[-1]


@pytest.mark.parametrize("name", FAILED)
async def test_failed_recording_ends_in_an_error_frame(make_stack: StackFactory, name: str) -> None:
    """A stream the upstream failed after answering 200 (an error event) ends in one `error`
    frame with the upstream's message, made safe (no URL)."""
    frames = await relay(make_stack, name, seed=3, parts=ALL_PARTS)
    error = frames[-1]
    assert (error["type"], error["code"]) == ("error", "upstream_error")
    assert error["message"].startswith(EXPECTED[name]["error"]["message"][:40])
    assert "https://" not in error["message"]
