"""Typed answer parts through the running gateway, from the mock upstream's scripted streams:
what a client that asks for them gets, what one that does not gets, and the bounds
(docs/protocol.md, "Parts")."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Client, Stack, StackFactory, check_stream, is_terminal

ALL = ["reasoning", "sources", "tools", "progress"]


async def run(client: Client, sid: str, prompt: str, parts: list[str]) -> list[dict[str, Any]]:
    await client.send({"type": "start", "id": sid, "prompt": prompt, "parts": parts})
    frames = [await client.recv_until(lambda f: f.get("id") == sid)]
    while not is_terminal(frames[-1]):
        frames.append(await client.recv_until(lambda f: f.get("id") == sid))
    return frames


def metric(stack: Stack, name: str, **labels: str) -> float:
    text = stack.gateway.metrics.render().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@pytest.mark.parametrize("split", [1, 2, 3, 7])
async def test_a_think_block_split_anywhere_never_reaches_the_answer(
    make_stack: StackFactory, split: int
) -> None:
    """Perplexity's reasoning models: the leading <think> block, its tags cut every N
    characters, is reasoning for a client that asked and dropped for one that did not; the
    answer text is the same either way."""
    stack = await make_stack()
    client = await stack.client()
    prompt = f"Why is the sky blue? [[mock reasoning=think think_split={split} chunks=6]]"
    asked = await run(client, "a", prompt, ["reasoning"])
    plain = await run(client, "b", prompt, [])
    check_stream(plain)
    reasoning = "".join(f["text"] for f in asked if f["type"] == "reasoning_chunk")
    assert reasoning
    assert "think>" not in reasoning
    assert asked[-1]["reasoning"] == reasoning
    for frames in (asked, plain):
        text = "".join(f["text"] for f in frames if f["type"] == "text_chunk")
        assert text == frames[-1]["text"]
        assert text.startswith("Sunlight")
        assert "think>" not in text
    assert {f["type"] for f in plain} == {"started", "text_chunk", "done"}
    await stack.assert_no_leaks()


async def test_reasoning_over_its_bound_ends_the_stream_with_upstream_protocol_error(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(dialect="openai", max_reasoning_bytes=16)
    client = await stack.client()
    frames = await run(
        client, "r", "Why is the sky blue? [[mock reasoning=reasoning_content]]", ["reasoning"]
    )
    assert (frames[-1]["type"], frames[-1]["code"]) == ("error", "upstream_protocol_error")
    await stack.assert_no_leaks()


async def test_sources_beyond_the_bound_are_dropped_and_counted(make_stack: StackFactory) -> None:
    stack = await make_stack(max_sources=3)
    client = await stack.client()
    frames = await run(client, "s", "Why is the sky blue? [[mock sources=8 chunks=4]]", ["sources"])
    assert frames[-1]["type"] == "done"
    sources = [s for f in frames if f["type"] == "sources" for s in f["sources"]]
    assert len(sources) == 3
    assert len({s["url"] for s in sources}) == 3  # each URL once, though sent on every chunk
    assert metric(stack, "gateway_sources_dropped_total") == 5
    assert metric(stack, "gateway_parts_total", kind="sources") >= 1
    await stack.assert_no_leaks()


async def test_tool_calls_end_the_answer_and_a_tool_result_starts_the_next(
    make_stack: StackFactory,
) -> None:
    """An agentic loop over the gateway: the calls arrive whole, `done` says tool_calls, and the
    conversation with the assistant's calls and the tool's result is a valid next start."""
    stack = await make_stack(dialect="openai")
    client = await stack.client()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    await client.send(
        {
            "type": "start",
            "id": "t",
            "prompt": "Weather in Paris? [[mock tools=2]]",
            "parts": ["tools"],
            "options": {"tools": tools, "tool_choice": "auto"},
        }
    )
    frames = [await client.recv_until(lambda f: f.get("id") == "t")]
    while not is_terminal(frames[-1]):
        frames.append(await client.recv_until(lambda f: f.get("id") == "t"))
    calls = [f for f in frames if f["type"] == "tool_call"]
    assert len(calls) == 2
    assert frames[-1]["finish_reason"] == "tool_calls"
    assert frames[-1]["tool_calls"] == [
        {k: v for k, v in c.items() if k not in ("type", "id", "seq")} for c in calls
    ]
    body = stack.mock.records[-1].body
    assert body["tools"] == tools
    assert body["tool_choice"] == "auto"
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": c["call_id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": '{"city": "Paris"}'},
                }
                for c in calls
            ],
        },
        *({"role": "tool", "tool_call_id": c["call_id"], "content": "18 C"} for c in calls),
    ]
    await client.send({"type": "start", "id": "u", "messages": messages})
    answer = await client.finish("u")
    assert answer["u"][-1]["type"] == "done"
    sent = stack.mock.records[-1].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == calls[0]["call_id"]
    assert sent[2] == {"role": "tool", "tool_call_id": calls[0]["call_id"], "content": "18 C"}
    await stack.assert_no_leaks()


async def test_concise_mode_streams_progress_then_the_answer(make_stack: StackFactory) -> None:
    stack = await make_stack()
    client = await stack.client()
    await client.send(
        {
            "type": "start",
            "id": "c",
            "prompt": "Why is the sky blue?",
            "parts": ALL,
            "options": {"stream_mode": "concise"},
        }
    )
    frames = [await client.recv_until(lambda f: f.get("id") == "c")]
    while not is_terminal(frames[-1]):
        frames.append(await client.recv_until(lambda f: f.get("id") == "c"))
    kinds = [f["type"] for f in frames]
    assert "progress" in kinds
    assert kinds.index("progress") < kinds.index("text_chunk")
    assert {f["step"]["kind"] for f in frames if f["type"] == "progress"} <= {
        "search",
        "fetch",
        "code",
        "thought",
        "other",
    }
    assert frames[-1]["type"] == "done"
    content = frames[1:-1]
    assert [f["seq"] for f in content] == list(range(1, len(content) + 1))
    await stack.assert_no_leaks()
