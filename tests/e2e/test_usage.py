"""Usage, cost and budgets through the running gateway (docs/usage.md, docs/security.md
"Budgets"): every end carries the normalised usage, cancelled streams are charged an estimate,
a price table turns tokens into USD, a principal over budget is refused until the window turns,
and `GET /v1/usage` tells each principal where it stands.

The mock upstream counts a prompt's words as its prompt tokens and each chunk as one completion
token, in every dialect's own usage shape.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest

from gateway.core.prices import parse_prices
from gateway.core.usage import CHARS_PER_TOKEN, TOKENS_PER_MESSAGE
from tests.conftest import Client, FakeClock, Stack, StackFactory, check_stream

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789ab"
SECRET = "a-jwt-secret-for-the-usage-tests-0123456789"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def usage_of(
    http: aiohttp.ClientSession, stack: Stack, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    async with http.get(
        f"http://127.0.0.1:{stack.gateway.port}/v1/usage", headers=headers or {}
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Cache-Control"] == "no-store"
        body: dict[str, Any] = orjson.loads(await resp.read())
        return body


async def settled(stack: Stack) -> None:
    """Every stream's relay is over, so every charge is in (charged as the relay ends)."""
    await stack.gateway.idle.wait()


async def refusal(client: Client, sid: str) -> dict[str, Any]:
    """The error refusing start `sid` (a refusal has no seq: it is not a terminal frame)."""
    return await client.recv_until(lambda f: f["id"] == sid and f["type"] == "error")


def metric(stack: Stack, name: str, **labels: str) -> float:
    value = stack.gateway.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@pytest.mark.parametrize(
    "dialect", ["perplexity", "openai", "events", "anthropic", "openai-responses", "gemini"]
)
async def test_done_carries_the_normalised_usage_in_every_dialect(
    make_stack: StackFactory, dialect: str
) -> None:
    """Whatever shape the upstream reports its usage in, `done` carries it the OpenAI way (two
    prompt words, three chunks), not estimated, and the stream's log line and metrics agree."""
    stack = await make_stack(dialect=dialect)
    client = await stack.client()
    await client.start("s", "blue sky [[mock chunks=3]]")
    frames = (await client.finish("s"))["s"]
    check_stream(frames)
    usage = frames[-1]["usage"]
    assert {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
    }
    assert "estimated" not in usage
    if dialect == "anthropic":  # its cache counts are reported, as zeros
        assert usage["cached_tokens"] == usage["cache_write_tokens"] == 0
    await settled(stack)
    model = stack.gateway.config.default_model
    kinds = {"upstream": "default", "model": model}
    assert metric(stack, "gateway_usage_tokens_total", **kinds, kind="prompt") == 2
    assert metric(stack, "gateway_usage_tokens_total", **kinds, kind="completion") == 3
    assert (
        metric(stack, "gateway_usage_streams_total", **kinds, estimated="false", priced="false")
        == 1
    )
    await stack.assert_no_leaks()


async def test_a_cancelled_stream_is_charged_an_estimate(
    make_stack: StackFactory, http: Any
) -> None:
    """An upstream that reports usage only at the end (OpenAI) is cancelled mid-answer: the
    `cancelled` frame carries an estimate (the prompt's characters and messages, the answer
    relayed), marked `estimated`, and the principal is charged exactly that."""
    stack = await make_stack(dialect="openai")
    client = await stack.client()
    prompt = "why is the sky blue [[mock chunks=500 delay_ms=20 words=3 tag=v]]"
    await client.start("v", prompt)
    for _ in range(4):
        await client.recv_until(lambda f: f["type"] == "text_chunk" and f["id"] == "v")
    await client.cancel("v")
    frames = (await client.finish("v"))["v"]
    cancelled = frames[-1]
    assert cancelled["type"] == "cancelled"
    relayed = check_stream(frames)
    usage = cancelled["usage"]
    assert usage["estimated"] is True
    assert usage["prompt_tokens"] == math.ceil(len(prompt) / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE
    # At least what reached the client; what was still on its way counts too.
    assert usage["completion_tokens"] >= math.ceil(len(relayed) / CHARS_PER_TOKEN) > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    await settled(stack)
    report = await usage_of(http, stack)
    assert report["usage"] == {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
        "cost": 0,
    }
    model = stack.gateway.config.default_model
    assert (
        metric(
            stack,
            "gateway_usage_streams_total",
            upstream="default",
            model=model,
            estimated="true",
            priced="false",
        )
        == 1
    )
    await stack.assert_no_leaks()


async def test_a_cancel_keeps_what_the_upstream_had_already_reported(
    make_stack: StackFactory,
) -> None:
    """Perplexity reports a running usage on every chunk: a cancelled stream's prompt count is
    the upstream's exact one, and its completion never less than the upstream had counted."""
    stack = await make_stack(dialect="perplexity")
    client = await stack.client()
    await client.start("v", "one two three four [[mock chunks=500 delay_ms=20 tag=v]]")
    for _ in range(3):
        await client.recv_until(lambda f: f["type"] == "text_chunk" and f["id"] == "v")
    await client.cancel("v")
    frames = (await client.finish("v"))["v"]
    usage = frames[-1]["usage"]
    assert usage["prompt_tokens"] == 4  # the upstream's count, not the estimate
    assert usage["completion_tokens"] >= 3
    assert usage["estimated"] is True
    await stack.assert_no_leaks()


async def test_a_price_table_turns_tokens_into_cost(make_stack: StackFactory, http: Any) -> None:
    """With no cost from the upstream, the price of the model (a glob here) gives `cost`:
    input and output per million tokens plus the per-request fee; it is counted by model."""
    prices = parse_prices(
        '[prices."son*"]\ninput_per_mtok = 3.0\noutput_per_mtok = 15.0\nrequest = 0.005\n',
        "prices.toml",
    )
    stack = await make_stack(prices=prices)
    client = await stack.client()
    await client.start("s", "blue sky [[mock chunks=3]]")
    done = (await client.finish("s"))["s"][-1]
    want = (2 * 3.0 + 3 * 15.0) / 1e6 + 0.005
    assert done["usage"]["cost"] == pytest.approx(want)
    await settled(stack)
    assert metric(stack, "gateway_usage_cost_usd_total", upstream="default", model="sonar") == (
        pytest.approx(want)
    )
    assert (await usage_of(http, stack))["usage"]["cost"] == pytest.approx(want)
    await stack.assert_no_leaks()


async def test_the_upstreams_own_cost_wins_over_the_price_table(make_stack: StackFactory) -> None:
    """Perplexity sends `usage.cost.total_cost` (concise mode here): that is the cost relayed,
    whatever the price table says."""
    prices = parse_prices(
        '[prices."sonar"]\ninput_per_mtok = 100.0\noutput_per_mtok = 100.0\n', "prices.toml"
    )
    stack = await make_stack(prices=prices)
    client = await stack.client()
    await client.start("s", "blue sky [[mock chunks=3 concise=1]]")
    done = (await client.finish("s"))["s"][-1]
    usage = done["usage"]
    upstream_cost = round(
        usage["prompt_tokens"] * 0.000003 + round(usage["completion_tokens"] * 0.000015, 6) + 0.006,
        6,
    )
    assert usage["cost"] == pytest.approx(upstream_cost)
    await stack.assert_no_leaks()


async def test_over_budget_the_next_start_is_refused_until_the_window_turns(
    make_stack: StackFactory, http: Any
) -> None:
    """A stream that crosses the budget finishes whole; the next start is refused with
    `budget_exceeded` (not retryable, `retry_after_ms` to the window's end, UTC-aligned); once
    the window turns (fake clock) starts are accepted again."""
    clock = FakeClock()
    stack = await make_stack(
        clock=clock, budget_tokens=8, budget_window=3600, ping_interval=0, idle_timeout=0
    )
    client = await stack.client()
    for sid in ("a", "b"):  # 5 tokens each: the second crosses 8 and still finishes
        await client.start(sid, "blue sky [[mock chunks=3]]")
        frames = (await client.finish(sid))[sid]
        assert frames[-1]["type"] == "done"
        await settled(stack)
    await client.start("c", "blue sky [[mock chunks=3]]")
    refused = await refusal(client, "c")
    assert refused["code"] == "budget_exceeded"
    assert refused["retryable"] is False
    wall = clock.wall()
    window_end = (wall // 3600 + 1) * 3600
    assert refused["retry_after_ms"] == max(1, math.ceil((window_end - wall) * 1000))
    assert "token budget used up: 10 of 8 tokens in this 1h window" in refused["message"]
    report = await usage_of(http, stack)
    assert report["budget"] == {"tokens": 8, "cost": None}
    assert report["remaining"] == {"tokens": 0, "cost": None}
    assert report["window"] == "1h"
    assert metric(stack, "gateway_budget_refusals_total", measure="tokens") == 1
    clock.advance(refused["retry_after_ms"] / 1000)
    await client.start("d", "blue sky [[mock chunks=3]]")
    assert (await client.finish("d"))["d"][-1]["type"] == "done"
    await settled(stack)
    report = await usage_of(http, stack)
    assert report["usage"]["total_tokens"] == 5
    assert report["remaining"]["tokens"] == 3
    await stack.assert_no_leaks()


async def test_a_cost_budget_refuses_once_spent(make_stack: StackFactory) -> None:
    """`--budget-cost` counts USD (here from the price table): over it, budget_exceeded."""
    prices = parse_prices(
        '[prices."sonar"]\ninput_per_mtok = 0\noutput_per_mtok = 0\nrequest = 0.01\n',
        "prices.toml",
    )
    stack = await make_stack(prices=prices, budget_cost=0.015)
    client = await stack.client()
    for sid in ("a", "b"):
        await client.start(sid, "sky [[mock chunks=1]]")
        assert (await client.finish(sid))[sid][-1]["type"] == "done"
        await settled(stack)
    await client.start("c", "sky [[mock chunks=1]]")
    refused = await refusal(client, "c")
    assert refused["code"] == "budget_exceeded"
    assert "cost budget used up: $0.0200 of $0.0150" in refused["message"]
    await stack.assert_no_leaks()


async def test_budgets_are_per_principal_with_overrides_from_the_tokens_file_and_jwt(
    make_stack: StackFactory, tmp_path: Path, http: Any
) -> None:
    """The tokens file gives alice 5 tokens over a default of 100; bob has the default; a JWT's
    `budget` claim gives carol 5: each is refused on its own spend, never on another's, and
    `GET /v1/usage` answers each its own figures (401 without a credential)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ALICE} alice budget_tokens=5\n{BOB} bob\n")
    stack = await make_stack(auth_tokens_file=str(tokens), jwt_secret=SECRET, budget_tokens=100)
    carol = jwt.encode({"sub": "carol", "budget": {"tokens": 5}}, SECRET, algorithm="HS256")
    for token in (ALICE, BOB, carol):
        client = await stack.client(additional_headers=bearer(token))
        await client.start("a", "blue sky [[mock chunks=3]]")
        assert (await client.finish("a"))["a"][-1]["type"] == "done"
        await settled(stack)
        await client.start("b", "blue sky [[mock chunks=3]]")
        last = await client.recv_until(lambda f: f["id"] == "b" and f["type"] in ("done", "error"))
        assert last["type"] == ("done" if token == BOB else "error"), (token, last)
    await settled(stack)
    alice = await usage_of(http, stack, bearer(ALICE))
    assert alice["principal"] == "alice"
    assert alice["usage"]["total_tokens"] == 5
    assert alice["budget"] == {"tokens": 5, "cost": None}
    assert alice["remaining"] == {"tokens": 0, "cost": None}
    bob = await usage_of(http, stack, bearer(BOB))
    assert (bob["usage"]["total_tokens"], bob["remaining"]["tokens"]) == (10, 90)
    assert (await usage_of(http, stack, bearer(carol)))["budget"]["tokens"] == 5
    async with http.get(f"http://127.0.0.1:{stack.gateway.port}/v1/usage") as resp:
        assert resp.status == 401
    await stack.assert_no_leaks()


async def test_usage_report_without_any_budget(make_stack: StackFactory, http: Any) -> None:
    """Without budgets, `GET /v1/usage` still counts (budget and remaining null, the window's
    end given: a UTC day by default)."""
    clock = FakeClock()
    stack = await make_stack(clock=clock)
    report = await usage_of(http, stack)
    assert report["principal"] == "ip:127.0.0.1"
    assert report["window"] == "1d"
    assert report["usage"] == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "cost": 0,
    }
    assert report["budget"] == {"tokens": None, "cost": None}
    assert report["remaining"] == {"tokens": None, "cost": None}
    assert report["resets_at"].endswith("T00:00:00Z")
    assert report["shared"] is False


async def test_an_http_stream_over_budget_is_a_429(make_stack: StackFactory, http: Any) -> None:
    """`POST /v1/streams` over budget answers 429 with `budget_exceeded` and Retry-After."""
    stack = await make_stack(budget_tokens=1)
    client = await stack.client()
    await client.start("a", "sky [[mock chunks=1]]")
    await client.finish("a")
    await settled(stack)
    async with http.post(
        f"http://127.0.0.1:{stack.gateway.port}/v1/streams",
        json={"prompt": "sky [[mock chunks=1]]"},
    ) as resp:
        assert resp.status == 429
        body = orjson.loads(await resp.read())
        assert body["code"] == "budget_exceeded"
        assert body["retryable"] is False
        assert int(resp.headers["Retry-After"]) == math.ceil(body["retry_after_ms"] / 1000)
    await stack.assert_no_leaks()
