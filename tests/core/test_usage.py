"""Usage in one convention (gateway/core/usage.py): the OpenAI-style reading and its providers'
quirks, each dialect's own reading, the `usage` object, estimates, and the meter that settles a
stream's usage once: pure.

The raw usage objects are the real shapes of `shared/reference/transcripts/expected.json`, or
made from the providers' documented fields (upstream-formats.md, section 4); every expected
figure is worked out by hand beside it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.dialects import translator_for
from gateway.core.prices import Price, PriceTable
from gateway.core.usage import (
    Meter,
    Usage,
    estimate_tokens,
    openai_usage,
    prompt_estimate,
)


def read(dialect: str, raw: Any) -> Usage | None:
    """What `dialect`'s translator makes of `raw` as its `meta["usage"]`."""
    translator = translator_for(dialect)
    translator.meta["usage"] = raw
    return translator.usage()


# -- openai_usage: the OpenAI convention and its copies


def test_plain_openai_usage_is_taken_as_sent() -> None:
    """OpenAI's counts pass through, a reported zero reasoning kept as zero and no cost."""
    raw = {
        "prompt_tokens": 14,
        "completion_tokens": 30,
        "total_tokens": 44,
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    usage = openai_usage(raw)
    assert usage == Usage(14, 30, reasoning_tokens=0)
    assert usage is not None
    assert usage.as_dict() == {
        "prompt_tokens": 14,
        "completion_tokens": 30,
        "reasoning_tokens": 0,
        "total_tokens": 44,
    }


def test_plain_usage_without_details_leaves_reasoning_and_cache_unknown() -> None:
    """Mistral's bare counts give no reasoning, cached or cost figure (None, not 0)."""
    usage = openai_usage({"prompt_tokens": 10, "total_tokens": 56, "completion_tokens": 46})
    assert usage == Usage(10, 46)
    assert usage is not None
    assert (usage.reasoning_tokens, usage.cached_tokens, usage.cost) == (None, None, None)


def test_deepseek_cache_hits_count_as_cached_when_details_are_missing() -> None:
    """DeepSeek's `prompt_cache_hit_tokens` is the cached input when no details say it."""
    raw = {
        "prompt_tokens": 339,
        "completion_tokens": 83,
        "total_tokens": 422,
        "completion_tokens_details": {"reasoning_tokens": 39},
        "prompt_cache_hit_tokens": 320,
        "prompt_cache_miss_tokens": 19,
    }
    # 339 + 83 = 422 already: the reasoning is inside the completion, not added again
    assert openai_usage(raw) == Usage(339, 83, reasoning_tokens=39, cached_tokens=320)


def test_cached_details_win_over_deepseeks_cache_hits() -> None:
    """`prompt_tokens_details.cached_tokens` is read first, even when both are sent."""
    raw = {
        "prompt_tokens": 339,
        "completion_tokens": 83,
        "prompt_tokens_details": {"cached_tokens": 300},
        "prompt_cache_hit_tokens": 320,
    }
    assert openai_usage(raw) == Usage(339, 83, cached_tokens=300)


def test_xai_reasoning_is_added_when_only_then_the_total_adds_up() -> None:
    """xAI leaves reasoning out of `completion_tokens` but not the total: it is added back, and
    its `cost_in_usd_ticks` (1e-10 USD each) is the cost."""
    raw = {
        "prompt_tokens": 12,
        "completion_tokens": 2,
        "total_tokens": 354,
        "prompt_tokens_details": {
            "text_tokens": 12,
            "audio_tokens": 0,
            "image_tokens": 0,
            "cached_tokens": 11,
        },
        "completion_tokens_details": {
            "reasoning_tokens": 340,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
        "num_sources_used": 0,
        "cost_in_usd_ticks": 1721250,
    }
    usage = openai_usage(raw)
    # 12 + 2 + 340 = 354: completion 2 + 340 = 342; 1 721 250 ticks = 0.000172125 USD
    assert usage == Usage(12, 342, reasoning_tokens=340, cached_tokens=11, cost=0.000172125)
    assert usage is not None
    assert usage.total_tokens == 354
    assert usage.cost_nanos == 172_125


def test_xai_tool_call_usage_gets_its_reasoning_and_ticks() -> None:
    """A second real xAI usage: 307 + 26 + 227 = 560, 1 497 500 ticks = 0.00014975 USD."""
    raw = {
        "prompt_tokens": 307,
        "completion_tokens": 26,
        "total_tokens": 560,
        "prompt_tokens_details": {"cached_tokens": 306},
        "completion_tokens_details": {"reasoning_tokens": 227},
        "cost_in_usd_ticks": 1497500,
    }
    usage = openai_usage(raw)
    assert usage == Usage(307, 253, reasoning_tokens=227, cached_tokens=306, cost=0.00014975)
    assert usage is not None
    assert usage.cost_nanos == 149_750


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            {
                "completion_tokens": 78,
                "completion_tokens_details": {
                    "accepted_prediction_tokens": 0,
                    "audio_tokens": 0,
                    "reasoning_tokens": 64,
                    "rejected_prediction_tokens": 0,
                },
                "prompt_tokens": 15,
                "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
                "total_tokens": 93,
            },
            Usage(15, 78, reasoning_tokens=64, cached_tokens=0),
            id="azure",
        ),
        pytest.param(
            {
                "prompt_tokens": 18,
                "completion_tokens": 219,
                "total_tokens": 237,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 205},
                "prompt_cache_hit_tokens": 0,
                "prompt_cache_miss_tokens": 18,
            },
            Usage(18, 219, reasoning_tokens=205, cached_tokens=0),
            id="deepseek",
        ),
        pytest.param(
            {
                "queue_time": 0.171721454,
                "prompt_tokens": 17,
                "completion_tokens": 1107,
                "total_tokens": 1124,
                "completion_tokens_details": {"reasoning_tokens": 963},
            },
            Usage(17, 1107, reasoning_tokens=963),
            id="groq",
        ),
    ],
)
def test_reasoning_already_in_the_completion_is_not_added_again(
    raw: dict[str, Any], expected: Usage
) -> None:
    """When prompt + completion is the total already (Azure, DeepSeek, Groq), the completion
    stays as sent."""
    assert openai_usage(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        # a total that adds up neither way: left alone
        {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 100,
            "completion_tokens_details": {"reasoning_tokens": 20},
        },
        # no total to tell by: left alone
        {"prompt_tokens": 10, "completion_tokens": 5, "reasoning_tokens": 20},
    ],
)
def test_reasoning_is_not_added_without_a_total_that_asks_for_it(raw: dict[str, Any]) -> None:
    """Reasoning is added to the completion only when the total equals prompt + completion +
    reasoning."""
    assert openai_usage(raw) == Usage(10, 5, reasoning_tokens=20)


def test_perplexity_cost_and_top_level_reasoning_are_read() -> None:
    """Perplexity's `cost.total_cost` is the cost and its top-level `reasoning_tokens` the
    reasoning (already inside the completion: 10 + 336 = 346)."""
    raw = {
        "prompt_tokens": 10,
        "completion_tokens": 336,
        "total_tokens": 346,
        "reasoning_tokens": 120,
        "citation_tokens": 50,
        "num_search_queries": 1,
        "search_context_size": "low",
        "cost": {
            "input_tokens_cost": 0.00001,
            "output_tokens_cost": 0.000336,
            "reasoning_tokens_cost": 0.0,
            "request_cost": 0.005,
            "total_cost": 0.005346,
        },
    }
    usage = openai_usage(raw)
    assert usage == Usage(10, 336, reasoning_tokens=120, cost=0.005346)
    assert usage is not None
    assert usage.cost_nanos == 5_346_000


def test_completion_details_win_over_top_level_reasoning() -> None:
    """`completion_tokens_details.reasoning_tokens` is read before the top-level figure."""
    raw = {
        "prompt_tokens": 1,
        "completion_tokens": 9,
        "reasoning_tokens": 7,
        "completion_tokens_details": {"reasoning_tokens": 4},
    }
    assert openai_usage(raw) == Usage(1, 9, reasoning_tokens=4)


def test_perplexity_cost_wins_over_xai_ticks() -> None:
    """With both a `cost.total_cost` and ticks, the first is the cost; a zero cost is kept."""
    raw = {"prompt_tokens": 1, "completion_tokens": 1, "cost": {"total_cost": 0}}
    assert openai_usage({**raw, "cost_in_usd_ticks": 10**10}) == Usage(1, 1, cost=0.0)


@pytest.mark.parametrize(
    ("raw", "prompt", "completion"),
    [
        ({"prompt_tokens": 10, "total_tokens": 25}, 10, 15),
        # a total below the prompt never makes a negative completion
        ({"prompt_tokens": 30, "total_tokens": 25}, 30, 0),
        ({"prompt_tokens": 10}, 10, 0),
        ({"completion_tokens": 7, "total_tokens": 99}, 0, 7),
    ],
)
def test_a_missing_count_is_worked_out_from_the_total_or_zero(
    raw: dict[str, Any], prompt: int, completion: int
) -> None:
    """A missing completion is the total less the prompt (0 without a total); a missing prompt
    is 0."""
    assert openai_usage(raw) == Usage(prompt, completion)


def test_completion_from_the_total_already_holds_the_reasoning() -> None:
    """A completion worked out from the total is not given the reasoning a second time."""
    raw = {"prompt_tokens": 10, "total_tokens": 25, "reasoning_tokens": 5}
    assert openai_usage(raw) == Usage(10, 15, reasoning_tokens=5)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        42,
        "usage",
        [("prompt_tokens", 1), ("completion_tokens", 2)],
        {},
        {"total_tokens": 30},
        {"prompt_tokens": "1", "completion_tokens": -2},
    ],
)
def test_no_usage_is_none(raw: Any) -> None:
    """Nothing, a non-object, or an object with no prompt or completion count is no usage."""
    assert openai_usage(raw) is None


BAD_COUNTS = [-1, True, False, "12", 12.5, float("nan"), float("inf"), None, [12], {"n": 12}]


@pytest.mark.parametrize("bad", BAD_COUNTS, ids=repr)
def test_bad_token_counts_are_ignored(bad: Any) -> None:
    """A count that is not a non-negative whole number is as if it were not sent."""
    raw = {
        "prompt_tokens": bad,
        "completion_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": bad},
        "completion_tokens_details": {"reasoning_tokens": bad},
        "reasoning_tokens": 3,
        "cost_in_usd_ticks": bad,
    }
    # the prompt and the cached count are gone; reasoning falls back to the top-level 3
    assert openai_usage(raw) == Usage(0, 7, reasoning_tokens=3)
    assert openai_usage({"prompt_tokens": 5, "completion_tokens": bad}) == Usage(5, 0)


def test_whole_floats_count_as_tokens() -> None:
    """A count sent as 12.0 is 12 tokens, and 2.0 ticks are 2e-10 USD."""
    raw = {"prompt_tokens": 12.0, "completion_tokens": 7.0, "cost_in_usd_ticks": 2.0}
    usage = openai_usage(raw)
    assert usage == Usage(12, 7, cost=2e-10)
    assert usage is not None
    assert (type(usage.prompt_tokens), type(usage.completion_tokens)) == (int, int)


@pytest.mark.parametrize(
    "bad",
    [float("nan"), float("inf"), -0.01, True, "0.01", None, [0.01]],
    ids=repr,
)
def test_a_bad_perplexity_cost_is_ignored_and_ticks_are_used(bad: Any) -> None:
    """A total cost that is not a finite non-negative number is dropped; ticks, when sent, then
    give the cost (5 000 000 ticks = 0.0005 USD)."""
    raw: dict[str, Any] = {"prompt_tokens": 1, "completion_tokens": 1, "cost": {"total_cost": bad}}
    assert openai_usage(raw) == Usage(1, 1)
    assert openai_usage({**raw, "cost_in_usd_ticks": 5_000_000}) == Usage(1, 1, cost=0.0005)


@pytest.mark.parametrize("nested", [5, "x", [{"cached_tokens": 3}], None, 0.02], ids=repr)
def test_nested_objects_that_are_not_objects_are_ignored(nested: Any) -> None:
    """Details or a cost that are not objects give no figure (DeepSeek's cache hits still
    count), and never raise."""
    raw = {
        "prompt_tokens": 8,
        "completion_tokens": 4,
        "prompt_tokens_details": nested,
        "completion_tokens_details": nested,
        "cost": nested,
        "prompt_cache_hit_tokens": 2,
    }
    assert openai_usage(raw) == Usage(8, 4, cached_tokens=2)


@st.composite
def openai_shaped(draw: st.DrawFn) -> dict[str, Any]:
    """A raw OpenAI-style usage: non-negative counts, a total absent, arbitrary, or adding up
    with or without the reasoning; reasoning in details, at the top level or nowhere."""
    counts = st.integers(min_value=0, max_value=10**9)
    prompt, completion, reasoning = draw(counts), draw(counts), draw(counts)
    raw: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
    total = draw(
        st.sampled_from(["absent", "arbitrary", "sum", "sum with reasoning"]),
    )
    if total == "arbitrary":
        raw["total_tokens"] = draw(counts)
    elif total == "sum":
        raw["total_tokens"] = prompt + completion
    elif total == "sum with reasoning":
        raw["total_tokens"] = prompt + completion + reasoning
    where = draw(st.sampled_from(["details", "top", "none"]))
    if where == "details":
        raw["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    elif where == "top":
        raw["reasoning_tokens"] = reasoning
    if draw(st.booleans()):
        raw["prompt_tokens_details"] = {"cached_tokens": draw(counts)}
    if draw(st.booleans()):
        raw["prompt_cache_hit_tokens"] = draw(counts)
    return raw


@given(openai_shaped())
def test_any_openai_shaped_usage_adds_up(raw: dict[str, Any]) -> None:
    """Whatever the counts, the total is prompt + completion, the prompt is as sent, and the
    completion is the one sent or that plus the reasoning, never less."""
    usage = openai_usage(raw)
    assert usage is not None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.as_dict()["total_tokens"] == usage.total_tokens
    assert usage.prompt_tokens == raw["prompt_tokens"]
    assert usage.completion_tokens >= raw["completion_tokens"]
    assert usage.completion_tokens in (
        raw["completion_tokens"],
        raw["completion_tokens"] + (usage.reasoning_tokens or 0),
    )


# -- each dialect's own reading


@pytest.mark.parametrize("dialect", ["openai", "perplexity"])
def test_chat_dialects_read_the_openai_convention(dialect: str) -> None:
    """The chat translators read `meta["usage"]` the OpenAI way, xAI's quirk included."""
    raw = {
        "prompt_tokens": 12,
        "completion_tokens": 2,
        "total_tokens": 354,
        "completion_tokens_details": {"reasoning_tokens": 340},
    }
    assert read(dialect, raw) == Usage(12, 342, reasoning_tokens=340)
    assert translator_for(dialect).usage() is None


def test_anthropic_real_usage_reports_its_zero_cache_fields() -> None:
    """A real Anthropic usage: 12 in, 30 out, the cache reads and writes reported as 0."""
    raw = {
        "input_tokens": 12,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 30,
        "service_tier": "standard",
        "inference_geo": "not_available",
    }
    usage = read("anthropic", raw)
    assert usage == Usage(12, 30, cached_tokens=0, cache_write_tokens=0)
    assert usage is not None
    assert usage.as_dict() == {
        "prompt_tokens": 12,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "completion_tokens": 30,
        "total_tokens": 42,
    }


def test_anthropic_prompt_is_input_plus_cache_reads_plus_cache_writes() -> None:
    """Anthropic's `input_tokens` leave the cache out: the prompt is 50 + 2000 + 300."""
    raw = {
        "input_tokens": 50,
        "cache_read_input_tokens": 2000,
        "cache_creation_input_tokens": 300,
        "output_tokens": 120,
    }
    usage = read("anthropic", raw)
    assert usage == Usage(2350, 120, cached_tokens=2000, cache_write_tokens=300)
    assert usage is not None
    assert usage.total_tokens == 2470
    assert usage.reasoning_tokens is None  # thinking is inside output_tokens, not told apart


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"input_tokens": 25, "output_tokens": 1}, Usage(25, 1)),
        ({"output_tokens": 15}, Usage(0, 15)),
        ({"input_tokens": 25}, Usage(25, 0)),
        (
            {"input_tokens": -1, "cache_read_input_tokens": 9, "output_tokens": 2},
            Usage(9, 2, None, 9),
        ),
        ({"cache_read_input_tokens": 9, "service_tier": "standard"}, None),
        ({}, None),
        (None, None),
        ("usage", None),
    ],
)
def test_anthropic_partial_or_missing_usage(raw: Any, expected: Usage | None) -> None:
    """A message_start or message_delta alone gives what it has; no input or output count is no
    usage, and bad counts are ignored."""
    assert read("anthropic", raw) == expected


def test_responses_real_usage_keeps_reasoning_inside_the_output() -> None:
    """OpenAI's Responses usage: output includes reasoning (31073 + 4416 = 35489), cached
    input reported."""
    raw = {
        "input_tokens": 31073,
        "input_tokens_details": {"cached_tokens": 3712},
        "output_tokens": 4416,
        "output_tokens_details": {"reasoning_tokens": 3712},
        "total_tokens": 35489,
    }
    usage = read("openai-responses", raw)
    assert usage == Usage(31073, 4416, reasoning_tokens=3712, cached_tokens=3712)
    assert usage is not None
    assert usage.total_tokens == 35489


def test_xai_responses_usage_that_adds_up_is_taken_as_sent() -> None:
    """xAI's real Responses usage already holds its reasoning: 216 + 923 = 1139."""
    raw = {
        "input_tokens": 216,
        "input_tokens_details": {"cached_tokens": 192},
        "output_tokens": 923,
        "output_tokens_details": {"reasoning_tokens": 323},
        "total_tokens": 1139,
        "num_sources_used": 0,
        "num_server_side_tools_used": 0,
    }
    assert read("openai-responses", raw) == Usage(216, 923, 323, 192)


def test_responses_reasoning_outside_the_output_is_added_when_the_total_says_so() -> None:
    """Reasoning left out of `output_tokens` but not the total (100 + 50 + 200 = 350) is added
    to the completion; xAI ticks give the cost (30 000 000 ticks = 0.003 USD)."""
    raw = {
        "input_tokens": 100,
        "output_tokens": 50,
        "output_tokens_details": {"reasoning_tokens": 200},
        "total_tokens": 350,
        "cost_in_usd_ticks": 30_000_000,
    }
    assert read("openai-responses", raw) == Usage(100, 250, reasoning_tokens=200, cost=0.003)
    without_total = {key: value for key, value in raw.items() if key != "total_tokens"}
    assert read("openai-responses", without_total) == Usage(100, 50, 200, cost=0.003)


def test_perplexity_agent_usage_carries_its_cost() -> None:
    """The Agent API's `cost.total_cost` is the cost, whatever its other cost fields."""
    raw = {
        "input_tokens": 1200,
        "output_tokens": 300,
        "total_tokens": 1500,
        "cost": {
            "currency": "USD",
            "input_cost": 0.0036,
            "output_cost": 0.0045,
            "cache_read_cost": 0,
            "tool_calls_cost": 0.005,
            "total_cost": 0.0131,
        },
    }
    usage = read("perplexity-agent", raw)
    assert usage == Usage(1200, 300, cost=0.0131)
    assert usage is not None
    assert usage.cost_nanos == 13_100_000


@pytest.mark.parametrize("raw", [None, {}, {"total_tokens": 5}, [1, 2], {"input_tokens": -3}])
def test_responses_without_counts_is_no_usage(raw: Any) -> None:
    """No input or output count (a failed response's null usage included) is no usage."""
    assert read("openai-responses", raw) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            {
                "promptTokenCount": 9,
                "candidatesTokenCount": 23,
                "totalTokenCount": 217,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 9}],
                "thoughtsTokenCount": 185,
            },
            Usage(9, 208, reasoning_tokens=185),  # 23 + 185; 9 + 208 = 217
            id="gemini-text",
        ),
        pytest.param(
            {
                "promptTokenCount": 249,
                "candidatesTokenCount": 58,
                "totalTokenCount": 490,
                "trafficType": "PROVISIONED_THROUGHPUT",
                "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": 58}],
                "thoughtsTokenCount": 183,
            },
            Usage(249, 241, reasoning_tokens=183),  # 58 + 183; 249 + 241 = 490
            id="vertex",
        ),
    ],
)
def test_gemini_thoughts_are_added_to_the_completion(raw: dict[str, Any], expected: Usage) -> None:
    """`candidatesTokenCount` leaves the thoughts out: the completion is both, so the total is
    Gemini's own `totalTokenCount`."""
    usage = read("gemini", raw)
    assert usage == expected
    assert usage is not None
    assert usage.total_tokens == raw["totalTokenCount"]


def test_gemini_tool_use_prompt_is_input_and_cached_content_is_reported() -> None:
    """Tool results Gemini fetched itself count as prompt (100 + 40); cached content is the
    cached figure."""
    raw = {
        "promptTokenCount": 100,
        "toolUsePromptTokenCount": 40,
        "candidatesTokenCount": 20,
        "cachedContentTokenCount": 64,
        "totalTokenCount": 160,
    }
    usage = read("gemini", raw)
    assert usage == Usage(140, 20, cached_tokens=64)
    assert usage is not None
    assert usage.total_tokens == 160


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"thoughtsTokenCount": 30}, Usage(0, 30, reasoning_tokens=30)),
        ({"promptTokenCount": 9}, Usage(9, 0)),
        ({"toolUsePromptTokenCount": 40, "cachedContentTokenCount": 8}, None),
        ({"totalTokenCount": 50}, None),
        ({}, None),
        (None, None),
    ],
)
def test_gemini_partial_or_missing_usage(raw: Any, expected: Usage | None) -> None:
    """A running usage with only some counts gives what it has; without a prompt, answer or
    thoughts count there is none."""
    assert read("gemini", raw) == expected


# -- the usage object


def test_as_dict_orders_every_key_and_rounds_the_cost() -> None:
    """All fields appear in the documented order, the cost rounded to 9 decimal places."""
    usage = Usage(100, 50, 20, 30, 10, 0.0123456789012, estimated=True)
    out = usage.as_dict()
    assert list(out) == [
        "prompt_tokens",
        "cached_tokens",
        "cache_write_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "total_tokens",
        "cost",
        "estimated",
    ]
    assert out == {
        "prompt_tokens": 100,
        "cached_tokens": 30,
        "cache_write_tokens": 10,
        "completion_tokens": 50,
        "reasoning_tokens": 20,
        "total_tokens": 150,
        "cost": 0.012345679,
        "estimated": True,
    }


def test_as_dict_omits_unknown_figures_but_keeps_zeros() -> None:
    """None figures and `estimated: false` are left out; known zeros (a free stream) stay."""
    assert Usage().as_dict() == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert list(Usage(3, 4).as_dict()) == ["prompt_tokens", "completion_tokens", "total_tokens"]
    zeros = Usage(0, 0, reasoning_tokens=0, cached_tokens=0, cache_write_tokens=0, cost=0.0)
    assert zeros.as_dict() == {
        "prompt_tokens": 0,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "completion_tokens": 0,
        "reasoning_tokens": 0,
        "total_tokens": 0,
        "cost": 0.0,
    }


@pytest.mark.parametrize(
    ("cost", "nanos"),
    [(None, 0), (0.0, 0), (1.5, 1_500_000_000), (0.000172125, 172_125), (4e-10, 0), (6e-10, 1)],
)
def test_cost_nanos_rounds_the_cost_to_nano_dollars(cost: float | None, nanos: int) -> None:
    """The cost in nano-USD, rounded to the nearest; 0 when unknown."""
    assert Usage(cost=cost).cost_nanos == nanos


def test_total_tokens_is_prompt_plus_completion() -> None:
    """Cached and reasoning figures are inside prompt and completion: not added again."""
    assert Usage(1000, 200, reasoning_tokens=150, cached_tokens=900).total_tokens == 1200


# -- estimates


@pytest.mark.parametrize(
    ("chars", "tokens"), [(-3, 0), (0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)]
)
def test_estimate_tokens_rounds_a_started_token_up(chars: int, tokens: int) -> None:
    """Four characters a token, a started one counting whole; nothing (or less) is 0."""
    assert estimate_tokens(chars) == tokens


@pytest.mark.parametrize(
    ("chars", "messages", "tokens"),
    [(0, 0, 0), (0, 1, 4), (1, 1, 5), (4, 1, 5), (5, 2, 10), (400, 3, 112)],
)
def test_prompt_estimate_adds_four_tokens_a_message(chars: int, messages: int, tokens: int) -> None:
    """A prompt's estimate is its text's tokens plus 4 for each message."""
    assert prompt_estimate(chars, messages) == tokens


# -- the meter


class FakeReading:
    """A translator's reading as the meter sees it, counting how often it is asked."""

    def __init__(self, usage: Usage | None = None, chars: int = 0) -> None:
        self._usage = usage
        self._chars = chars
        self.asked = 0

    def usage(self) -> Usage | None:
        self.asked += 1
        return self._usage

    def output_chars(self) -> int:
        return self._chars


class FakePricer:
    """A pricer answering `cost` and keeping what it was asked."""

    def __init__(self, cost: float | None) -> None:
        self.cost = cost
        self.calls: list[tuple[tuple[str, ...], Usage]] = []

    def __call__(self, models: tuple[str, ...], usage: Usage) -> float | None:
        self.calls.append((models, Usage(**{f: getattr(usage, f) for f in FIELDS})))
        return self.cost


FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "cost",
    "estimated",
)


def meter(
    reading: FakeReading, *, answered: bool = True, price: FakePricer | PriceTable | None = None
) -> Meter:
    """A meter with a prompt estimate of 30 tokens, for model `m` asked as `alias`."""
    out = Meter(reading, 30, ("m", "alias"), price)
    out.answered = answered
    return out


def test_a_finished_stream_is_charged_the_upstreams_own_usage() -> None:
    """Finished with a usage: the upstream's figures as they are, not estimated, whatever was
    relayed."""
    reported = Usage(1000, 200, 50, 300, None, 0.004)
    usage = meter(FakeReading(reported, chars=999)).settle(4000, finished=True, cancelled=False)
    assert usage == Usage(1000, 200, 50, 300, None, 0.004, estimated=False)
    assert "estimated" not in usage.as_dict()


def test_a_finished_stream_without_usage_is_estimated() -> None:
    """Finished with no usage: the prompt estimate and (393 + 7 other) / 4 = 100 tokens out."""
    usage = meter(FakeReading(None, chars=7)).settle(393, finished=True, cancelled=False)
    assert usage == Usage(30, 100, estimated=True)
    assert usage.as_dict() == {
        "prompt_tokens": 30,
        "completion_tokens": 100,
        "total_tokens": 130,
        "estimated": True,
    }


def test_a_cancel_before_the_upstream_answered_is_charged_the_prompt() -> None:
    """Cancelled before a 2xx: the upstream may have started, so the prompt estimate only."""
    usage = meter(FakeReading(None, chars=40), answered=False).settle(
        400, finished=False, cancelled=True
    )
    assert usage == Usage(30, 0, estimated=True)


def test_a_failure_before_the_upstream_answered_is_charged_nothing() -> None:
    """Failed before a 2xx: zero tokens, marked estimated."""
    usage = meter(FakeReading(None, chars=40), answered=False).settle(
        400, finished=False, cancelled=False
    )
    assert usage == Usage(0, 0, estimated=True)
    assert usage.as_dict() == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "estimated": True,
    }


def test_a_cancel_keeps_the_upstreams_prompt_and_its_partial_figures() -> None:
    """Cancelled after Anthropic's message_start: its prompt and cache figures are kept, the
    completion is the estimate (397 + 3 chars: 100) above the 1 token reported."""
    reported = Usage(2000, 1, None, 800, 0)
    usage = meter(FakeReading(reported, chars=3)).settle(397, finished=False, cancelled=True)
    assert usage == Usage(2000, 100, None, 800, 0, None, estimated=True)
    assert usage.as_dict() == {
        "prompt_tokens": 2000,
        "cached_tokens": 800,
        "cache_write_tokens": 0,
        "completion_tokens": 100,
        "total_tokens": 2100,
        "estimated": True,
    }


def test_a_running_total_above_the_estimate_is_never_undercut() -> None:
    """A reported completion (250) above the estimate (400 chars: 100) stays, with its
    reasoning, cached and cost figures."""
    reported = Usage(500, 250, 120, 64, None, 0.002)
    usage = meter(FakeReading(reported)).settle(400, finished=False, cancelled=True)
    assert usage == Usage(500, 250, 120, 64, None, 0.002, estimated=True)


def test_a_reported_zero_prompt_leaves_the_prompt_estimate() -> None:
    """A running usage with no input yet (Gemini thoughts only) keeps the prompt estimate; a
    failure after the answer started is estimated the same way."""
    reported = Usage(0, 30, reasoning_tokens=30)
    usage = meter(FakeReading(reported)).settle(40, finished=False, cancelled=False)
    # estimate 40 / 4 = 10, below the 30 reported
    assert usage == Usage(30, 30, reasoning_tokens=30, estimated=True)


def test_a_pricer_fills_the_cost_when_the_upstream_gave_none() -> None:
    """A reported usage without cost is priced, the pricer given the models in order."""
    pricer = FakePricer(0.0125)
    usage = meter(FakeReading(Usage(1000, 100)), price=pricer).settle(0, True, False)
    assert usage == Usage(1000, 100, cost=0.0125)
    assert pricer.calls == [(("m", "alias"), Usage(1000, 100))]


def test_a_reported_final_cost_is_not_repriced() -> None:
    """The upstream's own cost for a finished stream stands; the pricer is not asked."""
    pricer = FakePricer(9.0)
    usage = meter(FakeReading(Usage(1000, 100, cost=0.004)), price=pricer).settle(0, True, False)
    assert usage.cost == 0.004
    assert pricer.calls == []


@pytest.mark.parametrize(("priced", "cost"), [(0.003, 0.003), (0.001, 0.002), (None, 0.002)])
def test_an_estimate_with_a_partial_cost_is_charged_the_larger(
    priced: float | None, cost: float
) -> None:
    """Estimated with the upstream's partial cost (0.002): the table's price when higher,
    else the partial cost."""
    pricer = FakePricer(priced)
    reported = Usage(500, 250, cost=0.002)
    usage = meter(FakeReading(reported), price=pricer).settle(400, False, True)
    assert usage.cost == cost
    assert usage.estimated
    assert pricer.calls == [(("m", "alias"), Usage(500, 250, cost=0.002, estimated=True))]


def test_a_price_table_prices_an_estimate() -> None:
    """A PriceTable is a Pricer: 30 prompt x 3 + 100 out x 15 per million is 0.00159 USD."""
    table = PriceTable([("m", Price(input_per_mtok=3.0, output_per_mtok=15.0))])
    usage = meter(FakeReading(None), price=table).settle(400, True, False)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (30, 100, True)
    assert usage.cost == pytest.approx(0.00159)
    assert usage.cost_nanos == 1_590_000


def test_a_second_settle_sees_nothing_of_the_reading() -> None:
    """The meter lets go of its reading when it settles: a second settle estimates from the
    text alone and never asks the reading again."""
    reading = FakeReading(Usage(1000, 200), chars=40)
    m = meter(reading)
    assert m.settle(0, finished=True, cancelled=False) == Usage(1000, 200)
    assert m.reading is not reading
    assert reading.asked == 1
    # 8 chars of text, none of the reading's 40 other: 2 tokens
    assert m.settle(8, finished=True, cancelled=False) == Usage(30, 2, estimated=True)
    assert reading.asked == 1


def test_a_failure_before_the_upstream_answered_pays_no_request_fee() -> None:
    """A request the upstream refused or never took costs nothing, even with a per-request fee
    in the price table (nobody billed it); a cancel before the answer pays prompt and fee."""
    table = PriceTable([("sonar-pro", Price(3.0, 15.0, request=0.005))])
    failed = Meter(translator_for("perplexity"), 30, ("sonar-pro",), table)
    assert failed.settle(0, finished=False, cancelled=False) == Usage(0, 0, estimated=True)
    cancelled = Meter(translator_for("perplexity"), 30, ("sonar-pro",), table)
    usage = cancelled.settle(0, finished=False, cancelled=True)
    assert (usage.prompt_tokens, usage.completion_tokens) == (30, 0)
    assert usage.cost == pytest.approx(30 * 3.0 / 1e6 + 0.005)


def test_an_attempt_the_upstream_took_is_carried_into_the_next() -> None:
    """A fallback after an upstream took the request (its message_start counted 40 prompt
    tokens and 1 output token) charges that attempt too: the final usage is the sum, an
    estimate; an upstream that refused the request carries nothing."""
    took = translator_for("anthropic")
    took.meta["usage"] = {"input_tokens": 40, "output_tokens": 1}
    first = Meter(took, 30, ("a",), None)
    first.answered = True
    carried = first.carry()
    assert carried == Usage(40, 1, None, None, None, None, estimated=True)
    refused = Meter(translator_for("openai"), 30, ("b",), None)
    assert refused.carry() is None
    last = translator_for("openai")
    last.meta["usage"] = {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}
    final = Meter(last, 30, ("c",), None, carried)
    final.answered = True
    usage = final.settle(36, finished=True, cancelled=False)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (80, 10, 90)
    assert usage.estimated is True
