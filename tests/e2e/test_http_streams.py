"""The HTTP side of the streams (docs/protocol.md, "HTTP streams") through the running gateway:
`POST /v1/streams` answers SSE, `GET /v1/streams/{id}` resumes exactly once, `DELETE` cancels,
with the WebSocket's auth, origins, quotas, limits and drain, on the same port.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yarl

from gateway.core.sse import SSEDecoder
from tests.conftest import TIMEOUT, FakeClock, Stack, StackFactory, check_stream
from tests.support import expected_text

PROMPT = "why is the sky blue [[mock chunks=6]]"


class SseResponse:
    """An open SSE response: its status, headers and the events read so far."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status
        self.headers = response.headers
        self.events: list[dict[str, Any]] = []
        self.comments = 0
        self._decoder = SSEDecoder()
        self._chunks = response.content.iter_any()

    async def next(self) -> dict[str, Any] | None:
        """The next event (None at the end of the response)."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                pending = [e for e in self.events if not e.get("_read")]
                if pending:
                    pending[0]["_read"] = True
                    return pending[0]
                try:
                    data = await anext(self._chunks)
                except StopAsyncIteration:
                    return None
                self.comments += data.count(b"\n: ") + data.startswith(b": ")
                for event in self._decoder.feed(data):
                    message = orjson.loads(event.data)
                    assert message["type"] == event.event
                    if "seq" in message:
                        assert event.id == str(message["seq"])
                    self.events.append({**message})

    async def until(self, kind: str) -> dict[str, Any]:
        while True:
            event = await self.next()
            assert event is not None, f"the response ended before a {kind!r} event"
            if event["type"] == kind:
                return event

    async def rest(self) -> list[dict[str, Any]]:
        while await self.next() is not None:
            pass
        return [{k: v for k, v in e.items() if k != "_read"} for e in self.events]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def base(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.gateway.port}"


async def post(
    http: aiohttp.ClientSession, stack: Stack, body: dict[str, Any], **headers: str
) -> SseResponse:
    response = await http.post(f"{base(stack)}/v1/streams", json=body, headers=headers)
    return SseResponse(response)


async def test_post_streams_the_answer_as_sse_events(
    make_stack: StackFactory, http: aiohttp.ClientSession
) -> None:
    """One SSE event per protocol message: `started` with the id and resume token, the text
    chunks with their seq as the event id, then `done`; the response ends after it."""
    stack = await make_stack()
    sse = await post(http, stack, {"prompt": PROMPT, "id": "mine"})
    assert sse.status == 200
    assert sse.headers["Content-Type"].startswith("text/event-stream")
    assert sse.headers["Cache-Control"] == "no-cache"
    events = await sse.rest()
    started = events[0]
    assert (started["type"], started["id"]) == ("started", "mine")
    assert started["resume_token"]
    assert check_stream(events) == expected_text(PROMPT)
    assert events[-1]["type"] == "done"
    registry = stack.gateway.metrics.registry
    assert registry.get_sample_value("gateway_transport_streams_total", {"transport": "http"}) == 1
    assert (
        registry.get_sample_value(
            "gateway_http_requests_total", {"route": "streams", "status": "200"}
        )
        == 1
    )
    await stack.assert_no_leaks()


async def test_post_without_an_id_gets_one_and_parts_arrive(
    make_stack: StackFactory, http: aiohttp.ClientSession
) -> None:
    """The gateway names a stream the body does not; parts asked for are events too."""
    stack = await make_stack(dialect="openai")
    body = {"prompt": "sky [[mock chunks=3 reasoning=reasoning_content]]", "parts": ["reasoning"]}
    events = await (await post(http, stack, body)).rest()
    assert events[0]["id"]
    assert {e["id"] for e in events} == {events[0]["id"]}
    assert "reasoning_chunk" in [e["type"] for e in events]
    assert events[-1]["reasoning"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "bad_json"),
        (b"[1]", 400, "bad_message"),
        (b'{"prompt": "x", "type": "cancel"}', 400, "bad_message"),
        (b'{"prompt": ""}', 400, "bad_message"),
        (b'{"prompt": "x", "options": {"stream": false}}', 400, "bad_message"),
    ],
)
async def test_a_bad_body_is_a_plain_400_shaped_like_an_error(
    make_stack: StackFactory,
    http: aiohttp.ClientSession,
    body: bytes,
    status: int,
    code: str,
) -> None:
    """Refusals before the stream starts are HTTP statuses with a JSON `error` body."""
    stack = await make_stack()
    async with http.post(f"{base(stack)}/v1/streams", data=body) as response:
        assert response.status == status
        error = orjson.loads(await response.read())
    assert (error["type"], error["code"], error["retryable"]) == ("error", code, False)
    assert error["message"]


async def test_a_body_over_the_message_limit_is_413(
    make_stack: StackFactory, http: aiohttp.ClientSession
) -> None:
    """The body is bounded by --max-message-bytes, like a WebSocket message."""
    stack = await make_stack(max_message_bytes=1000)
    body = {"prompt": "x" * 2000}
    async with http.post(f"{base(stack)}/v1/streams", json=body) as response:
        assert response.status == 413
        assert orjson.loads(await response.read())["code"] == "message_too_large"


async def test_delete_cancels_and_the_open_response_ends_with_cancelled(
    make_stack: StackFactory, http: aiohttp.ClientSession
) -> None:
    """DELETE with the resume token answers 204 at once and closes the upstream request; the
    stream's open response ends with `cancelled`."""
    stack = await make_stack()
    sse = await post(http, stack, {"prompt": "sky [[mock chunks=5 fault=stall after=1 tag=d]]"})
    started = await sse.until("started")
    await sse.until("text_chunk")
    url = f"{base(stack)}/v1/streams/{started['id']}"
    async with http.delete(url, headers={"X-Resume-Token": started["resume_token"]}) as deleted:
        assert deleted.status == 204
    events = await sse.rest()
    assert events[-1]["type"] == "cancelled"
    record = stack.mock.record("d")
    await asyncio.wait_for(record.ended.wait(), TIMEOUT)
    assert record.outcome == "client_closed"
    async with http.delete(url, headers={"X-Resume-Token": "no-such-token"}) as unknown:
        assert unknown.status == 404
    await stack.assert_no_leaks()


async def test_a_cut_response_resumes_exactly_once(
    make_stack: StackFactory, http: aiohttp.ClientSession
) -> None:
    """A response that breaks off is a drop: the stream runs on for the resume grace, and
    GET with X-Resume-Token and Last-Event-ID replays what followed that seq, then the rest,
    so the client has every chunk exactly once."""
    stack = await make_stack()
    prompt = "sky [[mock chunks=8 delay_ms=30]]"
    sse = await post(http, stack, {"prompt": prompt, "id": "r:1"})
    started = await sse.until("started")
    first = [await sse.until("text_chunk"), await sse.until("text_chunk")]
    sse.response.close()  # the network drops it
    headers = {"X-Resume-Token": started["resume_token"], "Last-Event-ID": str(first[-1]["seq"])}
    # The id's `:` percent-encoded, as encodeURIComponent (the JS client) sends it.
    url = yarl.URL(f"{base(stack)}/v1/streams/r%3A1", encoded=True)
    resumed = SseResponse(await http.get(url, headers=headers))
    assert resumed.status == 200
    events = await resumed.rest()
    assert events[0] == {"type": "resumed", "id": "r:1", "after": first[-1]["seq"]}
    chunks = [*first, *(e for e in events if e["type"] == "text_chunk")]
    assert [c["seq"] for c in chunks] == list(range(1, len(chunks) + 1))
    assert "".join(c["text"] for c in chunks) == expected_text(prompt)
    assert events[-1]["type"] == "done"
    await stack.assert_no_leaks()


async def test_resume_with_a_wrong_token_is_404_and_an_expired_one_an_error_event(
    make_stack: StackFactory, http: aiohttp.ClientSession
) -> None:
    """An unknown (or another principal's) token is 404; a stream no longer retained answers
    one `resume_unavailable` event."""
    clock = FakeClock()
    stack = await make_stack(clock=clock, resume_retention=60)
    events = await (await post(http, stack, {"prompt": PROMPT, "id": "e"})).rest()
    token = events[0]["resume_token"]
    url = f"{base(stack)}/v1/streams/e"
    async with http.get(url, headers={"X-Resume-Token": "nope"}) as unknown:
        assert unknown.status == 404
        assert orjson.loads(await unknown.read())["code"] == "unknown_id"
    again = await (
        SseResponse(await http.get(url, headers={"X-Resume-Token": token, "Last-Event-ID": "2"}))
    ).rest()
    assert again[0]["type"] == "resumed"
    assert again[-1]["type"] == "done"
    clock.advance(61)
    expired = SseResponse(await http.get(url, headers={"X-Resume-Token": token}))
    assert expired.status == 200
    [error] = await expired.rest()
    assert (error["type"], error["code"]) == ("error", "resume_unavailable")


async def test_auth_is_the_websockets(
    make_stack: StackFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """With authentication on, no or a wrong Bearer token is 401 (with WWW-Authenticate); a
    token in the URL is refused; another principal's stream is 404 to resume or cancel."""
    tokens = tmp_path / "tokens"
    tokens.write_text("0123456789abcdef alice\nfedcba9876543210 bob\n")
    stack = await make_stack(auth_tokens_file=str(tokens))
    async with http.post(f"{base(stack)}/v1/streams", json={"prompt": PROMPT}) as none:
        assert none.status == 401
        assert none.headers["WWW-Authenticate"].startswith("Bearer")
    alice = {"Authorization": "Bearer 0123456789abcdef"}
    bob = {"Authorization": "Bearer fedcba9876543210"}
    sse = await post(http, stack, {"prompt": "sky [[mock fault=stall after=1]]"}, **alice)
    started = await sse.until("started")
    url = f"{base(stack)}/v1/streams/{started['id']}"
    as_bob = {**bob, "X-Resume-Token": started["resume_token"]}
    async with http.get(url, headers=as_bob) as resumed:
        assert resumed.status == 404
    async with http.delete(url, headers=as_bob) as deleted:
        assert deleted.status == 404
    async with http.delete(url, headers={**alice, "X-Resume-Token": started["resume_token"]}) as ok:
        assert ok.status == 204
    assert (await sse.rest())[-1]["type"] == "cancelled"
    async with http.post(
        f"{base(stack)}/v1/streams?token=0123456789abcdef", json={"prompt": PROMPT}
    ) as in_url:
        assert in_url.status == 400


async def test_cors_preflight_and_origins(
    make_stack: StackFactory, http: aiohttp.ClientSession
) -> None:
    """An allowed origin gets its preflight answered and CORS headers on the stream; another
    origin is 403."""
    stack = await make_stack(allowed_origins=("https://app.example",))
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization",
    }
    async with http.options(f"{base(stack)}/v1/streams", headers=preflight) as answered:
        assert answered.status == 204
        assert answered.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "POST" in answered.headers["Access-Control-Allow-Methods"]
        assert "Authorization" in answered.headers["Access-Control-Allow-Headers"]
    sse = await post(http, stack, {"prompt": PROMPT}, Origin="https://app.example")
    assert sse.headers["Access-Control-Allow-Origin"] == "https://app.example"
    await sse.rest()
    evil = {**preflight, "Origin": "https://evil.example"}
    async with http.options(f"{base(stack)}/v1/streams", headers=evil) as refused:
        assert refused.status == 403
    async with http.post(
        f"{base(stack)}/v1/streams",
        json={"prompt": PROMPT},
        headers={"Origin": "https://evil.example"},
    ) as refused:
        assert refused.status == 403


async def test_quotas_refuse_with_429_and_retry_after(
    make_stack: StackFactory, http: aiohttp.ClientSession
) -> None:
    """Per-principal limits hold across transports: a second stream over
    --max-streams-per-principal is a 429."""
    stack = await make_stack(max_streams_per_principal=1)
    sse = await post(http, stack, {"prompt": "sky [[mock fault=stall after=1]]"})
    await sse.until("text_chunk")
    async with http.post(f"{base(stack)}/v1/streams", json={"prompt": PROMPT}) as second:
        assert second.status == 429
        assert orjson.loads(await second.read())["retryable"] is True
    sse.response.close()


async def test_while_draining_new_streams_are_503_and_running_ones_finish(
    make_stack: StackFactory, http: aiohttp.ClientSession
) -> None:
    """A drain refuses new POSTs (503) and lets the running stream end with its `done`."""
    stack = await make_stack(drain_timeout=5)
    sse = await post(http, stack, {"prompt": "sky [[mock chunks=6 delay_ms=30]]"})
    await sse.until("text_chunk")
    drain = asyncio.get_running_loop().create_task(stack.gateway.drain(), name="drain")
    await asyncio.sleep(0)
    async with http.post(f"{base(stack)}/v1/streams", json={"prompt": PROMPT}) as refused:
        assert refused.status == 503
        assert orjson.loads(await refused.read())["code"] == "shutting_down"
    events = await sse.rest()
    assert events[-1]["type"] == "done"
    await drain


async def test_keepalive_comments_while_the_upstream_is_silent(
    make_stack: StackFactory, http: aiohttp.ClientSession
) -> None:
    """Once a whole --http-keepalive interval passes with nothing sent, an SSE comment is
    (on the fake clock); an interval in which a chunk went out needs none."""
    clock = FakeClock()
    stack = await make_stack(
        clock=clock, http_keepalive=15, ping_interval=0, upstream_read_timeout=0
    )
    sse = await post(http, stack, {"prompt": "sky [[mock chunks=3 fault=stall after=1]]"})
    await sse.until("text_chunk")
    await clock.timer_set(15)
    clock.advance(15)  # the interval of the first chunk: no comment
    await clock.timer_set(15)
    clock.advance(15)  # a silent interval
    async with asyncio.timeout(TIMEOUT):
        while sse.comments == 0:
            data = await anext(sse._chunks)
            sse.comments += data.count(b": keepalive")
    sse.response.close()


async def test_the_websocket_side_is_unchanged_on_the_same_port(
    make_stack: StackFactory, http: aiohttp.ClientSession
) -> None:
    """WebSocket upgrades, the page and the health endpoints still answer beside the HTTP
    streams."""
    stack = await make_stack()
    client = await stack.client()
    await client.start("w", PROMPT)
    assert check_stream((await client.finish("w"))["w"]) == expected_text(PROMPT)
    async with http.get(f"{base(stack)}/healthz") as health:
        assert health.status == 200
    async with http.get(f"{base(stack)}/v1/streams/x") as no_token:
        assert no_token.status == 400
    async with http.put(f"{base(stack)}/v1/streams") as other:
        assert other.status == 404
