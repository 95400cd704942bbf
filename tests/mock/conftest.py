"""Helpers for the mock upstream's tests: a minimal SSE splitter (complete bodies only), an HTTP
client wrapper, and fixtures for a running `MockUpstream` and a client session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDictProxy

from gateway.mock.answers import choose_answer
from gateway.mock.server import MockUpstream

CRLF = b"\r\n"
LF = b"\n"
MARS = "Tell me about the planet Mars"
MARS_ANSWER = choose_answer(MARS)

# --------------------------------------------------------------------------------------------
# Helpers: a minimal SSE splitter (complete bodies only) and an HTTP client wrapper
# --------------------------------------------------------------------------------------------

Block = list[tuple[str, str]]


def sse_blocks(raw: bytes, eol: bytes) -> list[Block]:
    """Split a complete stream on blank lines; each event becomes its (field, value) lines."""
    sep = eol * 2
    assert raw.endswith(sep), raw[-60:]
    blocks: list[Block] = []
    for chunk in raw[: -len(sep)].split(sep):
        lines: Block = []
        for line in chunk.split(eol):
            name, _, value = line.decode().partition(":")
            lines.append((name, value.removeprefix(" ")))
        blocks.append(lines)
    return blocks


def data_of(block: Block) -> str | None:
    values = [value for name, value in block if name == "data"]
    return "\n".join(values) if values else None


def datas(raw: bytes, eol: bytes) -> list[str]:
    """The data of every event that has some (comment-only blocks are skipped)."""
    return [d for d in map(data_of, sse_blocks(raw, eol)) if d is not None]


def chunks_json(raw: bytes, eol: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(d) for d in datas(raw, eol) if d != "[DONE]"]


def request_body(content: str, *, model: str = "sonar", **extra: Any) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": True}
    return orjson.dumps({**body, **extra})


def post(
    session: aiohttp.ClientSession,
    url: str,
    content: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Any:
    return session.post(
        url,
        data=request_body(content, **extra),
        headers={"Content-Type": "application/json", **(headers or {})},
    )


async def fetch(
    session: aiohttp.ClientSession, url: str, content: str, **extra: Any
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with post(session, url, content, **extra) as resp:
        return resp.status, resp.headers, await resp.read()


async def read_until(resp: aiohttp.ClientResponse, marker: bytes, count: int) -> bytes:
    """Read until `marker` occurs `count` times (the body is not complete yet)."""
    raw = b""
    async with asyncio.timeout(5):
        while raw.count(marker) < count:
            raw += await resp.content.readany()
    return raw


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    upstream = MockUpstream(default_delay_ms=0)
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        yield client


def url(mock: MockUpstream, path: str) -> str:
    assert mock.base_url is not None
    return mock.base_url + path
