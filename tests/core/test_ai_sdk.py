"""The AI SDK's UI message stream (gateway/core/ai_sdk.py): useChat's request as a start, and
a stream's messages as UI chunks. Pure."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.ai_sdk import AI_SDK_PARTS, UiStream, chat_start
from gateway.core.protocol import ProtocolViolation


def ui(role: str, *parts: dict[str, Any]) -> dict[str, Any]:
    return {"id": "m", "role": role, "parts": list(parts)}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def test_a_chat_becomes_a_start_with_its_text_and_images() -> None:
    """Text parts are joined; a user's image files become image_url parts; the answer's own
    parts (reasoning, sources, tools) are not sent back; model and options ride along."""
    body = {
        "id": "chat",
        "messages": [
            ui("system", text("Be brief.")),
            ui(
                "user",
                text("Look "),
                text("at this"),
                {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AA=="},
            ),
            ui(
                "assistant",
                {"type": "reasoning", "text": "hmm"},
                {"type": "source-url", "url": "https://x"},
                text("A cat."),
            ),
            ui("assistant", {"type": "step-start"}),
            ui("user", text("Why?")),
        ],
        "trigger": "submit-message",
        "messageId": None,
        "model": "sonar-pro",
        "options": {"temperature": 0.1},
    }
    start = chat_start(body, "ai-1")
    assert start == {
        "type": "start",
        "id": "ai-1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look at this"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                ],
            },
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "Why?"},
        ],
        "model": "sonar-pro",
        "options": {"temperature": 0.1},
        "parts": list(AI_SDK_PARTS),
    }


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ([], "JSON object"),
        ({"messages": []}, "non-empty list"),
        ({"messages": ["x"]}, "messages[0] must be an object"),
        ({"messages": [{"role": "tool", "parts": []}]}, "role must be system, user or assistant"),
        ({"messages": [{"role": "user"}]}, "parts must be a list"),
        ({"messages": [ui("user", {"type": "reasoning", "text": "x"})]}, "carry no text"),
    ],
)
def test_a_body_that_cannot_be_used_is_bad_message(body: Any, words: str) -> None:
    """Each refusal says what is wrong."""
    with pytest.raises(ProtocolViolation) as info:
        chat_start(body, "ai-1")
    assert words in str(info.value)


def test_ai_sdk_4_content_strings_are_accepted() -> None:
    """A message with `content` instead of `parts` (AI SDK 4) is taken as its text."""
    start = chat_start({"messages": [{"role": "user", "content": "hi"}]}, "s")
    assert start["messages"] == [{"role": "user", "content": "hi"}]


def test_a_stream_becomes_start_blocks_and_finish() -> None:
    """Reasoning then text: each a start/delta/end block with its own id; sources as
    source-url; done closes the open block, then finish-step and finish with the reason and
    the usage as message metadata."""
    stream = UiStream("msg-1")
    messages = [
        {"type": "started", "id": "s", "resume_token": "t"},
        {"type": "reasoning_chunk", "id": "s", "seq": 1, "text": "Think"},
        {"type": "reasoning_chunk", "id": "s", "seq": 2, "text": "ing"},
        {
            "type": "sources",
            "id": "s",
            "seq": 3,
            "sources": [{"index": 1, "url": "https://a", "title": "A"}],
        },
        {"type": "text_chunk", "id": "s", "seq": 4, "text": "Hello"},
        {"type": "progress", "id": "s", "seq": 5, "step": {"kind": "thought", "text": "x"}},
        {"type": "text_chunk", "id": "s", "seq": 6, "text": " world"},
        {
            "type": "done",
            "id": "s",
            "seq": 6,
            "text": "Hello world",
            "finish_reason": "length",
            "usage": {"total_tokens": 3},
        },
    ]
    chunks = [chunk for message in messages for chunk in stream.chunks(message)]
    assert chunks == [
        {"type": "start", "messageId": "msg-1"},
        {"type": "start-step"},
        {"type": "reasoning-start", "id": "reasoning-1"},
        {"type": "reasoning-delta", "id": "reasoning-1", "delta": "Think"},
        {"type": "reasoning-delta", "id": "reasoning-1", "delta": "ing"},
        {"type": "source-url", "sourceId": "source-1", "url": "https://a", "title": "A"},
        {"type": "reasoning-end", "id": "reasoning-1"},
        {"type": "text-start", "id": "text-2"},
        {"type": "text-delta", "id": "text-2", "delta": "Hello"},
        {"type": "data-progress", "data": {"kind": "thought", "text": "x"}, "transient": True},
        {"type": "text-delta", "id": "text-2", "delta": " world"},
        {"type": "text-end", "id": "text-2"},
        {"type": "finish-step"},
        {
            "type": "finish",
            "finishReason": "length",
            "messageMetadata": {"usage": {"total_tokens": 3}, "finish_reason": "length"},
        },
    ]


def test_tool_calls_cancel_and_errors() -> None:
    """A tool call is its input, started and available; a cancel is an abort; an error closes
    the open block and says why."""
    stream = UiStream("m")
    call = {
        "type": "tool_call",
        "id": "s",
        "seq": 2,
        "call_id": "c1",
        "name": "weather",
        "arguments": {"city": "Oslo"},
    }
    assert stream.chunks({"type": "text_chunk", "text": "x", "seq": 1}) == [
        {"type": "text-start", "id": "text-1"},
        {"type": "text-delta", "id": "text-1", "delta": "x"},
    ]
    assert stream.chunks(call) == [
        {"type": "text-end", "id": "text-1"},
        {"type": "tool-input-start", "toolCallId": "c1", "toolName": "weather"},
        {
            "type": "tool-input-available",
            "toolCallId": "c1",
            "toolName": "weather",
            "input": {"city": "Oslo"},
        },
    ]
    assert stream.chunks({"type": "cancelled", "seq": 2}) == [
        {"type": "abort", "reason": "cancelled"}
    ]
    other = UiStream("m")
    other.chunks({"type": "reasoning_chunk", "text": "r", "seq": 1})
    assert other.chunks(
        {"type": "error", "code": "upstream_error", "message": "Overloaded", "seq": 1}
    ) == [
        {"type": "reasoning-end", "id": "reasoning-1"},
        {"type": "error", "errorText": "Overloaded"},
    ]


def test_tool_calls_and_their_results_go_back_as_a_tool_loop() -> None:
    """An assistant message's tool parts (static `tool-<name>` and `dynamic-tool`) become its
    `tool_calls`, and each result the app added a `tool` message after it, so the next turn
    continues the loop; a call still without output is sent as a call only."""
    body = {
        "messages": [
            ui("user", text("Weather in Oslo and Rome?")),
            ui(
                "assistant",
                text("Checking."),
                {
                    "type": "tool-weather",
                    "toolCallId": "c1",
                    "state": "output-available",
                    "input": {"city": "Oslo"},
                    "output": {"celsius": 3},
                },
                {
                    "type": "dynamic-tool",
                    "toolName": "weather",
                    "toolCallId": "c2",
                    "state": "output-error",
                    "input": {"city": "Rome"},
                    "errorText": "timeout",
                },
            ),
            ui("user", text("Thanks")),
        ]
    }
    messages = chat_start(body, "s")["messages"]
    assert messages[1:] == [
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"celsius":3}'},
        {"role": "tool", "tool_call_id": "c2", "content": "error: timeout"},
        {"role": "user", "content": "Thanks"},
    ]
