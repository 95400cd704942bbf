"""The price table and its file (gateway/core/prices.py): pure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.prices import Price, PricesError, PriceTable, parse_prices
from gateway.core.usage import Meter, Pricer, Usage

EXAMPLE = """\
# USD per million tokens; globs allowed as model names (fnmatch, case-sensitive)
[prices."sonar-pro"]
input_per_mtok = 3.0
output_per_mtok = 15.0
request = 0.005            # optional: USD per request (per stream)

[prices."gpt-4o*"]
input_per_mtok = 2.5
cached_input_per_mtok = 1.25   # optional: cached input (default: input price)
output_per_mtok = 10.0

[prices."claude-*"]
input_per_mtok = 3.0
cached_input_per_mtok = 0.3
cache_write_per_mtok = 3.75    # optional: cache writes (default: input price)
output_per_mtok = 15.0
"""


def parse(text: str) -> PriceTable:
    return parse_prices(text, "prices.toml")


def error(text: str) -> str:
    with pytest.raises(PricesError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_documented_example_parses_in_file_order() -> None:
    """The documented file gives each model its prices, optional ones left as None or 0."""
    table = parse(EXAMPLE)
    assert table.models == ("sonar-pro", "gpt-4o*", "claude-*")
    assert len(table) == 3
    assert table.lookup(("sonar-pro",)) == Price(3.0, 15.0, request=0.005)
    assert table.lookup(("gpt-4o-mini",)) == Price(2.5, 10.0, cached_input_per_mtok=1.25)
    assert table.lookup(("claude-sonnet-4-5",)) == Price(3.0, 15.0, 0.3, 3.75)


def test_anthropic_usage_prices_cache_reads_and_writes_at_their_own_rates() -> None:
    """Input holds the cache reads and writes: each is taken out and priced at its rate."""
    table = parse(EXAMPLE)
    usage = Usage(prompt_tokens=10_000, completion_tokens=500, cached_tokens=6000)
    usage.cache_write_tokens = 2000
    # 2000 uncached x 3 + 6000 read x 0.3 + 2000 written x 3.75 + 500 out x 15, per million
    expected = (6000 + 1800 + 7500 + 7500) / 1e6
    assert table(("claude-sonnet-4-5",), usage) == pytest.approx(expected)
    assert expected == pytest.approx(0.0228)


def test_openai_cached_input_is_priced_at_the_cached_rate() -> None:
    """A cache hit costs the cached rate, the rest of the prompt the input rate."""
    usage = Usage(prompt_tokens=4000, completion_tokens=300, cached_tokens=1024)
    # 2976 x 2.5 + 1024 x 1.25 + 300 x 10, per million
    assert parse(EXAMPLE)(("gpt-4o",), usage) == pytest.approx(0.01172)


def test_reasoning_is_priced_as_output_once() -> None:
    """Reasoning is part of the completion: it costs the output rate and is not added twice."""
    table = parse(EXAMPLE)
    plain = Usage(prompt_tokens=1000, completion_tokens=3000)
    reasoning = Usage(prompt_tokens=1000, completion_tokens=3000, reasoning_tokens=2500)
    assert table(("gpt-4o",), reasoning) == table(("gpt-4o",), plain)
    assert table(("gpt-4o",), reasoning) == pytest.approx((1000 * 2.5 + 3000 * 10) / 1e6)


def test_a_request_fee_is_added_once_per_stream() -> None:
    """`request` is charged on top of the tokens, even for a stream that used none."""
    table = parse(EXAMPLE)
    usage = Usage(prompt_tokens=100, completion_tokens=200)
    assert table(("sonar-pro",), usage) == pytest.approx((100 * 3 + 200 * 15) / 1e6 + 0.005)
    assert table(("sonar-pro",), Usage()) == pytest.approx(0.005)


def test_cached_and_cache_write_prices_default_to_the_input_price() -> None:
    """Without a cached or cache-write price, those tokens cost what input costs."""
    price = Price(input_per_mtok=2.0, output_per_mtok=8.0)
    usage = Usage(prompt_tokens=1000, completion_tokens=0, cached_tokens=400)
    usage.cache_write_tokens = 300
    assert price.cost(usage) == pytest.approx(1000 * 2.0 / 1e6)


def test_cached_counts_above_the_prompt_never_make_the_uncached_input_negative() -> None:
    """An upstream reporting more cached than prompt tokens is not credited for it."""
    price = Price(input_per_mtok=10.0, output_per_mtok=0.0, cached_input_per_mtok=1.0)
    usage = Usage(prompt_tokens=100, completion_tokens=0, cached_tokens=300)
    assert price.cost(usage) == pytest.approx(300 * 1.0 / 1e6)


def test_an_exact_name_beats_a_glob_whatever_the_file_order() -> None:
    """An exact entry wins over a glob that also matches, even one written before it."""
    table = parse(
        '[prices."gpt-4o*"]\ninput_per_mtok = 1\noutput_per_mtok = 1\n'
        '[prices."gpt-4o"]\ninput_per_mtok = 2\noutput_per_mtok = 2\n'
    )
    assert table.lookup(("gpt-4o",)) == Price(2.0, 2.0)
    assert table.lookup(("gpt-4o-mini",)) == Price(1.0, 1.0)


def test_globs_are_tried_in_file_order() -> None:
    """Of two globs that match, the one written first prices the model."""
    table = parse(
        '[prices."gpt-*"]\ninput_per_mtok = 1\noutput_per_mtok = 1\n'
        '[prices."gpt-4o*"]\ninput_per_mtok = 2\noutput_per_mtok = 2\n'
    )
    assert table.lookup(("gpt-4o-mini",)) == Price(1.0, 1.0)


def test_globs_are_case_sensitive_like_model_names() -> None:
    """`claude-*` does not price `Claude-3`."""
    assert parse(EXAMPLE).lookup(("Claude-3",)) is None


def test_the_first_model_name_with_a_price_decides() -> None:
    """The upstream's model is priced before the client's; a name without a price (or an empty
    one) passes to the next."""
    table = parse(
        "[prices.smart]\ninput_per_mtok = 9\noutput_per_mtok = 9\n"
        '[prices."claude-*"]\ninput_per_mtok = 3\noutput_per_mtok = 15\n'
    )
    assert table.lookup(("claude-sonnet-4-5", "smart")) == Price(3.0, 15.0)
    assert table.lookup(("some-upstream-model", "smart")) == Price(9.0, 9.0)
    assert table.lookup(("", "smart")) == Price(9.0, 9.0)


def test_no_price_gives_none() -> None:
    """A model no entry matches, no names at all, or an empty table: no cost."""
    usage = Usage(prompt_tokens=10, completion_tokens=10)
    assert parse(EXAMPLE)(("llama-3",), usage) is None
    assert parse(EXAMPLE)((), usage) is None
    empty = PriceTable(())
    assert empty(("sonar-pro",), usage) is None
    assert (len(empty), empty.models) == (0, ())


def test_a_price_table_is_the_meters_pricer() -> None:
    """A stream whose upstream reported tokens but no cost is priced by the table."""

    class Reported:
        def usage(self) -> Usage | None:
            return Usage(prompt_tokens=1000, completion_tokens=100)

        def output_chars(self) -> int:
            return 0

    pricer: Pricer = parse(EXAMPLE)
    meter = Meter(Reported(), 10, ("sonar-pro", "fast"), pricer)
    meter.answered = True
    usage = meter.settle(text_chars=400, finished=True, cancelled=False)
    assert usage.cost == pytest.approx((1000 * 3 + 100 * 15) / 1e6 + 0.005)


HEAD = "[prices.a]\ninput_per_mtok = 1\noutput_per_mtok = 1\n"
KNOWN = "input_per_mtok, cached_input_per_mtok, cache_write_per_mtok, output_per_mtok, request"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 'prices.toml: no [prices."MODEL"] table: nothing to price'),
        ("# nothing yet\n", 'prices.toml: no [prices."MODEL"] table: nothing to price'),
        ("[prices]\n", 'prices.toml:1: no [prices."MODEL"] table: nothing to price'),
        (
            "x = 1\n" + HEAD,
            "prices.toml:1: unknown top-level key 'x' (a prices file has [prices.\"MODEL\"] "
            "tables only)",
        ),
        (
            HEAD + "\n[routes]\nx = 1\n",
            "prices.toml:5: unknown top-level key 'routes' (a prices file has "
            '[prices."MODEL"] tables only)',
        ),
        ("prices = 3\n", 'prices.toml:1: prices: must be [prices."MODEL"] tables, not int 3'),
        (
            '[prices]\n"sonar" = 3\n',
            'prices.toml:2: prices."sonar": must be a table ([prices."sonar"]), not int 3',
        ),
        (
            '\n[prices."sonar-pro"]\ninput_per_mtok = 1\noutput_per_mtok = 1\n'
            "cached_per_mtok = 1\n",
            f"prices.toml:2: prices.\"sonar-pro\": unknown key 'cached_per_mtok' (known: {KNOWN})",
        ),
        (
            HEAD + "[prices.a.extra]\nx = 1\n",
            f"prices.toml:1: prices.\"a\": unknown key 'extra' (known: {KNOWN})",
        ),
        (
            '[prices."gpt-4o"]\noutput_per_mtok = 10\n',
            'prices.toml:1: prices."gpt-4o": needs input_per_mtok = USD per million tokens',
        ),
        (
            HEAD + "\n[prices.sonar-pro]\ninput_per_mtok = 3\n",
            'prices.toml:5: prices."sonar-pro": needs output_per_mtok = USD per million tokens',
        ),
        (
            '[prices]\n"m" = { input_per_mtok = 1 }\n',
            'prices.toml:2: prices."m": needs output_per_mtok = USD per million tokens',
        ),
        (
            HEAD + '[prices."gpt-4o*"]\ninput_per_mtok = "3.0"\noutput_per_mtok = 1\n',
            'prices.toml:4: prices."gpt-4o*".input_per_mtok: must be a number of USD, 0 or more, '
            "not str '3.0'",
        ),
        (
            '[prices."gpt-4o-mini"]\ninput_per_mtok = 1\noutput_per_mtok = 1\n'
            '[prices."gpt-4o"]\ninput_per_mtok = 1\noutput_per_mtok = -1\n',
            'prices.toml:4: prices."gpt-4o".output_per_mtok: must be a number of USD, 0 or more, '
            "not int -1",
        ),
        (
            HEAD + "request = true\n",
            'prices.toml:1: prices."a".request: must be a number of USD, 0 or more, not bool True',
        ),
        (
            HEAD + "cached_input_per_mtok = inf\n",
            'prices.toml:1: prices."a".cached_input_per_mtok: must be a number of USD, 0 or more, '
            "not float inf",
        ),
        (
            HEAD + "cache_write_per_mtok = nan\n",
            'prices.toml:1: prices."a".cache_write_per_mtok: must be a number of USD, 0 or more, '
            "not float nan",
        ),
        (
            HEAD + '\n[prices.""]\ninput_per_mtok = 1\noutput_per_mtok = 1\n',
            'prices.toml:5: prices."": needs a model name or glob, not an empty one',
        ),
    ],
)
def test_a_bad_prices_file_is_one_line_naming_file_line_and_fault(text: str, expected: str) -> None:
    """Every mistake is one line: the file, the line of the table at fault, what is wrong."""
    assert error(text) == expected


def test_a_toml_syntax_error_gives_the_parsers_line() -> None:
    """tomllib's own position is kept."""
    message = error('[prices."a"]\ninput_per_mtok = 1\noutput_per_mtok = \n')
    assert message.startswith("prices.toml: not valid TOML: ")
    assert "line 3" in message


rates = st.floats(min_value=0, max_value=1000, allow_nan=False)
tokens = st.integers(min_value=0, max_value=10**9)
prices = st.builds(Price, rates, rates, st.none() | rates, st.none() | rates, rates)


@given(
    prices,
    st.lists(tokens, min_size=5, max_size=5),
    st.sampled_from(["uncached", "cached", "written", "completion", "reasoning"]),
    st.integers(min_value=1, max_value=10**6),
)
def test_cost_never_falls_when_any_token_count_grows(
    price: Price, counts: list[int], part: str, more: int
) -> None:
    """More uncached input, cache reads, cache writes, output or reasoning (each adding to the
    prompt or completion it is part of) never costs less."""

    def usage(parts: dict[str, int]) -> Usage:
        return Usage(
            prompt_tokens=parts["uncached"] + parts["cached"] + parts["written"],
            completion_tokens=parts["completion"] + parts["reasoning"],
            reasoning_tokens=parts["reasoning"],
            cached_tokens=parts["cached"],
            cache_write_tokens=parts["written"],
        )

    before = dict(
        zip(["uncached", "cached", "written", "completion", "reasoning"], counts, strict=True)
    )
    after = {**before, part: before[part] + more}
    assert price.cost(usage(after)) >= price.cost(usage(before))


@given(
    prices,
    st.lists(tokens, min_size=2, max_size=2),
    st.none() | tokens,
    st.none() | tokens,
    st.booleans(),
    st.integers(min_value=1, max_value=10**6),
)
def test_cost_never_falls_when_the_prompt_or_completion_grows(
    price: Price,
    counts: list[int],
    cached: int | None,
    written: int | None,
    prompt: bool,
    more: int,
) -> None:
    """With everything else as reported (even cache counts above the prompt), a larger prompt
    or completion never costs less."""
    before = Usage(counts[0], counts[1], cached_tokens=cached, cache_write_tokens=written)
    after = Usage(
        counts[0] + more if prompt else counts[0],
        counts[1] if prompt else counts[1] + more,
        cached_tokens=cached,
        cache_write_tokens=written,
    )
    assert price.cost(after) >= price.cost(before)
