"""Real recorded upstream streams through the running gateway: the mock upstream replays each
chat-completions recording of ../shared/reference/transcripts/ with its real framing, its body
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

from gateway.core.dialects import normalise_finish
from tests.conftest import TRANSCRIPTS, StackFactory, is_terminal

if TRANSCRIPTS is None or not (TRANSCRIPTS / "expected.json").is_file():
    pytest.skip(
        "no recorded transcripts beside the repository (../shared/reference/transcripts) and "
        "GATEWAY_TRANSCRIPTS unset",
        allow_module_level=True,
    )

EXPECTED: dict[str, Any] = orjson.loads((TRANSCRIPTS / "expected.json").read_bytes())
CHAT_PREFIXES = (
    "perplexity-chat-",
    "openai-chat-",
    "azure-",
    "deepseek-",
    "xai-chat-",
    "mistral-",
    "groq-",
)
CHAT = sorted(n for n in EXPECTED if n.endswith(".jsonl") and n.startswith(CHAT_PREFIXES))
ALL_PARTS = ["reasoning", "sources", "tools", "progress"]


def dialect_of(name: str) -> str:
    return "perplexity" if name.startswith("perplexity-") else "openai"


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


@pytest.mark.parametrize("name", CHAT)
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
    assert text == done["text"] == want["text"] + (want["refusal"] or "")
    assert done.get("refusal") is (True if want["refusal"] else None)
    assert "".join(f["text"] for f in of("reasoning_chunk")) == (want["reasoning"] or "")
    assert done.get("reasoning") == want["reasoning"]
    sources = [s for f in of("sources") for s in f["sources"]]
    assert [s["url"] for s in sorted(sources, key=lambda s: s["index"])] == want["sources"]
    calls = of("tool_call")
    assert [(c["call_id"], c["name"]) for c in calls] == [
        (c["id"], c["name"]) for c in want["tool_calls"]
    ]
    for call, expected in zip(calls, want["tool_calls"], strict=True):
        if expected["arguments_parsed"] is None:
            assert call["arguments_raw"] == expected["arguments"]
        else:
            assert call["arguments"] == expected["arguments_parsed"]
    assert done.get("finish_reason") == normalise_finish(want["finish_reason"])
    assert done.get("usage") == want["usage"]


@pytest.mark.parametrize("name", CHAT)
async def test_recording_for_a_client_that_asks_for_no_parts(
    make_stack: StackFactory, name: str
) -> None:
    """Protocol 1 as it was: started, text chunks, done; the same answer text."""
    want = EXPECTED[name]
    frames = await relay(make_stack, name, seed=7, parts=[])
    assert {f["type"] for f in frames} <= {"started", "text_chunk", "done"}
    assert frames[-1]["text"] == want["text"] + (want["refusal"] or "")
    assert "reasoning" not in frames[-1]
    assert "tool_calls" not in frames[-1]
