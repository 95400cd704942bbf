"""Helpers the test modules share (beside conftest.py's fixtures and client)."""

from __future__ import annotations

import socket
from typing import Any

from gateway.core.dialects import normalise_finish
from gateway.mock import choose_answer, parse_directive, text_chunks
from tests.conftest import Client, Stack


def expected_text(prompt: str) -> str:
    """What the mock upstream streams for `prompt` (deterministic)."""
    question, knobs = parse_directive(prompt)
    return "".join(text_chunks(choose_answer(question).text, knobs.chunks, knobs.words))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def chunks_text(frames: list[dict[str, Any]]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "text_chunk")


async def drop(client: Client) -> None:
    """Lose the network: no close frame reaches the gateway."""
    client.ws.transport.abort()
    await client.ws.wait_closed()


async def start_and_drop(
    stack: Stack, prompt: str, after_chunks: int = 3, **client_kw: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Start a stream, read a few chunks, drop the socket; return `started` and what arrived."""
    client = await stack.client(**client_kw)
    await client.start("s", prompt)
    started = await client.recv_until(lambda f: f["type"] == "started")
    assert isinstance(started["resume_token"], str)
    assert len(started["resume_token"]) >= 20
    for _ in range(after_chunks):
        await client.recv_until(lambda f: f["type"] == "text_chunk")
    await drop(client)
    return started, client.by_id["s"]


def resume_frame(sid: str, token: str, after: int) -> dict[str, Any]:
    return {"type": "resume", "id": sid, "resume_token": token, "after": after}


async def resume(client: Client, token: str, after: int, sid: str = "s") -> list[dict[str, Any]]:
    await client.send(resume_frame(sid, token, after))
    resumed = await client.recv_until(lambda f: f.get("id") == sid)
    assert resumed == {"type": "resumed", "id": sid, "after": after}, resumed
    return (await client.finish(sid))[sid]


#: Recording name prefix -> the gateway dialect that reads it.
DIALECT_PREFIXES = {
    "perplexity-chat-": "perplexity",
    "openai-chat-": "openai",
    "azure-openai-chat-": "openai",
    "deepseek-chat-": "openai",
    "xai-chat-": "openai",
    "mistral-chat-": "openai",
    "groq-chat-": "openai",
    "anthropic-messages-": "anthropic",
    "openai-responses-": "openai-responses",
    "xai-responses-": "openai-responses",
    "google-gemini-": "gemini",
    "google-vertex-": "gemini",
}


def dialect_of(name: str) -> str:
    """The dialect that reads recording `name` (../shared/reference/transcripts/)."""
    for prefix, dialect in DIALECT_PREFIXES.items():
        if name.startswith(prefix):
            return dialect
    raise AssertionError(f"no dialect reads {name}")


def expected_finish(want: dict[str, Any]) -> str | None:
    """The protocol's finish_reason for a recording (its expected.json entry): its upstream
    value normalised, except that an answer that ends by calling tools says `tool_calls`
    whatever the API calls that end (Responses' `completed`, Gemini's `STOP`), so a client
    knows to run them."""
    raw = want["finish_reason"]
    if raw.startswith("incomplete:"):  # Responses: the terminal status and why
        raw = raw.partition(":")[2]
    finish = normalise_finish(raw)
    if want["tool_calls"] and finish == "stop":
        return "tool_calls"
    return finish
