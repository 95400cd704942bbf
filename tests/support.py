"""Helpers the test modules share (beside conftest.py's fixtures and client)."""

from __future__ import annotations

import asyncio
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


#: Each recording's usage in the gateway's convention (gateway/core/usage.py), worked out by hand
#: from the raw usage in expected.json: prompt includes cached input (and Anthropic's cache reads
#: and writes, counted apart from `input_tokens`), completion includes reasoning (Gemini's
#: `thoughtsTokenCount` sits beside `candidatesTokenCount`; xAI's chat `completion_tokens` leaves
#: its reasoning out, so 2 + 340 and 26 + 227), xAI's `cost_in_usd_ticks` is 10^-10 USD each.
TRANSCRIPT_USAGE: dict[str, dict[str, Any]] = {
    "anthropic-messages-citations": {
        "prompt_tokens": 15665,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "completion_tokens": 795,
        "total_tokens": 16460,
    },
    "anthropic-messages-text": {
        "prompt_tokens": 12,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "completion_tokens": 30,
        "total_tokens": 42,
    },
    "anthropic-messages-thinking": {
        "prompt_tokens": 69,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "completion_tokens": 53,
        "total_tokens": 122,
    },
    "anthropic-messages-tool-use-no-args": {
        "prompt_tokens": 565,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "completion_tokens": 48,
        "total_tokens": 613,
    },
    "anthropic-messages-tool-use-partial-json-max-tokens": {
        "prompt_tokens": 450,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "completion_tokens": 124,
        "total_tokens": 574,
    },
    "anthropic-messages-tool-use": {
        "prompt_tokens": 377,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "completion_tokens": 65,
        "total_tokens": 442,
    },
    "azure-openai-chat-content-filter": {
        "prompt_tokens": 15,
        "cached_tokens": 0,
        "completion_tokens": 78,
        "reasoning_tokens": 64,
        "total_tokens": 93,
    },
    "deepseek-chat-length": {
        "prompt_tokens": 13,
        "cached_tokens": 0,
        "completion_tokens": 400,
        "total_tokens": 413,
    },
    "deepseek-chat-reasoning": {
        "prompt_tokens": 18,
        "cached_tokens": 0,
        "completion_tokens": 219,
        "reasoning_tokens": 205,
        "total_tokens": 237,
    },
    "deepseek-chat-tool-call": {
        "prompt_tokens": 339,
        "cached_tokens": 320,
        "completion_tokens": 83,
        "reasoning_tokens": 39,
        "total_tokens": 422,
    },
    "google-gemini-text": {
        "prompt_tokens": 9,
        "completion_tokens": 208,
        "reasoning_tokens": 185,
        "total_tokens": 217,
    },
    "google-gemini-thinking-signature": {
        "prompt_tokens": 9,
        "completion_tokens": 285,
        "reasoning_tokens": 256,
        "total_tokens": 294,
    },
    "google-gemini-tool-call": {
        "prompt_tokens": 29,
        "completion_tokens": 60,
        "reasoning_tokens": 45,
        "total_tokens": 89,
    },
    "google-vertex-thinking-tool-calls": {
        "prompt_tokens": 249,
        "completion_tokens": 241,
        "reasoning_tokens": 183,
        "total_tokens": 490,
    },
    "groq-chat-reasoning": {
        "prompt_tokens": 17,
        "completion_tokens": 1107,
        "reasoning_tokens": 963,
        "total_tokens": 1124,
    },
    "groq-chat-tool-call": {"prompt_tokens": 210, "completion_tokens": 15, "total_tokens": 225},
    "mistral-chat-reasoning": {"prompt_tokens": 10, "completion_tokens": 46, "total_tokens": 56},
    "mistral-chat-tool-call": {"prompt_tokens": 124, "completion_tokens": 22, "total_tokens": 146},
    "openai-chat-length": {
        "prompt_tokens": 79,
        "completion_tokens": 1,
        "reasoning_tokens": 0,
        "total_tokens": 80,
    },
    "openai-chat-multi-choice": {
        "prompt_tokens": 79,
        "completion_tokens": 42,
        "reasoning_tokens": 0,
        "total_tokens": 121,
    },
    "openai-chat-refusal": {
        "prompt_tokens": 79,
        "completion_tokens": 11,
        "reasoning_tokens": 0,
        "total_tokens": 90,
    },
    "openai-chat-text": {
        "prompt_tokens": 14,
        "completion_tokens": 30,
        "reasoning_tokens": 0,
        "total_tokens": 44,
    },
    "openai-chat-tool-call-single": {
        "prompt_tokens": 44,
        "completion_tokens": 16,
        "reasoning_tokens": 0,
        "total_tokens": 60,
    },
    "openai-chat-tool-calls": {
        "prompt_tokens": 149,
        "completion_tokens": 60,
        "reasoning_tokens": 0,
        "total_tokens": 209,
    },
    "openai-responses-reasoning": {
        "prompt_tokens": 134,
        "cached_tokens": 0,
        "completion_tokens": 28,
        "reasoning_tokens": 0,
        "total_tokens": 162,
    },
    "openai-responses-text": {
        "prompt_tokens": 299,
        "cached_tokens": 0,
        "completion_tokens": 12,
        "reasoning_tokens": 0,
        "total_tokens": 311,
    },
    "openai-responses-web-search": {
        "prompt_tokens": 31073,
        "cached_tokens": 3712,
        "completion_tokens": 4416,
        "reasoning_tokens": 3712,
        "total_tokens": 35489,
    },
    "perplexity-chat-citations": {
        "prompt_tokens": 10,
        "completion_tokens": 336,
        "total_tokens": 346,
    },
    "perplexity-chat-text": {"prompt_tokens": 11, "completion_tokens": 434, "total_tokens": 445},
    "xai-chat-reasoning": {
        "prompt_tokens": 12,
        "cached_tokens": 11,
        "completion_tokens": 342,
        "reasoning_tokens": 340,
        "total_tokens": 354,
        "cost": 0.000172125,
    },
    "xai-chat-tool-call": {
        "prompt_tokens": 307,
        "cached_tokens": 306,
        "completion_tokens": 253,
        "reasoning_tokens": 227,
        "total_tokens": 560,
        "cost": 0.00014975,
    },
    "xai-responses-reasoning": {
        "prompt_tokens": 216,
        "cached_tokens": 192,
        "completion_tokens": 923,
        "reasoning_tokens": 323,
        "total_tokens": 1139,
    },
    "xai-responses-web-search": {
        "prompt_tokens": 1875,
        "cached_tokens": 1578,
        "completion_tokens": 695,
        "reasoning_tokens": 397,
        "total_tokens": 2570,
    },
}


class RedisProxy:
    """A TCP relay in front of the test Redis that the test can cut and restore: Redis, as the
    gateway sees it, goes away mid-run and comes back on the same address."""

    def __init__(self, port: int) -> None:
        self.port = free_port()
        self.target = port
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        loop = asyncio.get_running_loop()
        for task in (
            loop.create_task(pipe(reader, up_writer), name="proxy up"),
            loop.create_task(pipe(up_reader, writer), name="proxy down"),
        ):
            self.pipes.add(task)
            task.add_done_callback(self.pipes.discard)

    async def cut(self) -> None:
        """Stop listening and close every relayed connection (Redis is gone)."""
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        self.writers.clear()
        for task in list(self.pipes):
            task.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)
        await self.server.wait_closed()
        self.server = None

    async def stop(self) -> None:
        if self.server is not None:
            await self.cut()
