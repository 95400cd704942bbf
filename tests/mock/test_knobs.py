"""The `[[mock ...]]` directive (gateway/mock/knobs.py): every knob parses, and typos or knobs
that would do nothing fail loudly, naming the key."""

from __future__ import annotations

import re

import pytest

import gateway.mock.knobs
from gateway.mock.knobs import _KNOB_PARSERS, DirectiveError, Knobs, parse_directive


def test_parse_directive_without_directive_keeps_text_and_defaults() -> None:
    """Text without a directive comes back unchanged with default knobs."""
    assert parse_directive("What is SSE?") == ("What is SSE?", Knobs())


def test_parse_directive_reads_every_knob() -> None:
    """Every documented key is parsed into its typed knob."""
    text = (
        "Q? [[mock chunks=3 delay_ms=1.5 header_delay_ms=20 fault=giant after=2 size=1000 "
        "crlf=1 bytewise=1 done=0 finish=0 comments=1 tag=t-1]]"
    )
    question, knobs = parse_directive(text)
    assert question == "Q?"
    assert knobs == Knobs(
        chunks=3,
        delay_ms=1.5,
        header_delay_ms=20.0,
        fault="giant",
        after=2,
        size=1000,
        crlf=True,
        bytewise=True,
        done=False,
        finish=False,
        comments=True,
        tag="t-1",
    )
    _, errors = parse_directive("[[mock status=429 body=html retry_after=Wed,_21_Oct_2015]]")
    assert (errors.status, errors.body, errors.retry_after) == (429, "html", "Wed, 21 Oct 2015")


def test_parse_directive_is_removed_from_anywhere_in_the_question() -> None:
    """A directive in the middle of the text is cut out and the spacing tidied."""
    question, knobs = parse_directive("What is [[mock chunks=2]] a websocket?")
    assert question == "What is a websocket?"
    assert knobs.chunks == 2
    assert parse_directive("[[mock]] hi") == ("hi", Knobs())


def test_parse_directive_names_an_unknown_key() -> None:
    """A typo in a key raises DirectiveError naming that key."""
    with pytest.raises(DirectiveError, match="'chunk'") as info:
        parse_directive("hi [[mock chunk=3]]")
    assert info.value.key == "chunk"


@pytest.mark.parametrize(
    ("directive", "key"),
    [
        ("chunks=-1", "chunks"),
        ("chunks=1.5", "chunks"),
        ("chunks=\u0661\u0662", "chunks"),
        ("chunks=1_000", "chunks"),
        ("delay_ms=inf", "delay_ms"),
        ("delay_ms=abc", "delay_ms"),
        ("delay_ms=nan", "delay_ms"),
        ("header_delay_ms=-5", "header_delay_ms"),
        ("status=99", "status"),
        ("status=204", "status"),
        ("status=429 body=xml", "body"),
        ("fault=explode", "fault"),
        ("crlf=2", "crlf"),
        ("bytewise=yes", "bytewise"),
        ("chunks", "chunks"),
        ("tag=", "tag"),
        ("chunks=1 chunks=2", "chunks"),
    ],
)
def test_parse_directive_rejects_bad_values(directive: str, key: str) -> None:
    """A bad, missing or repeated value raises DirectiveError naming the key."""
    with pytest.raises(DirectiveError) as info:
        parse_directive(f"hi [[mock {directive}]]")
    assert info.value.key == key


@pytest.mark.parametrize(
    ("directive", "key"),
    [
        ("body=html", "body"),
        ("retry_after=3", "retry_after"),
        ("after=3", "after"),
        ("fault=reset size=10", "size"),
        ("status=500 fault=reset", "fault"),
    ],
)
def test_parse_directive_rejects_knobs_that_would_do_nothing(directive: str, key: str) -> None:
    """A knob that needs a companion knob (body needs status, after needs fault) is an error."""
    with pytest.raises(DirectiveError) as info:
        parse_directive(f"[[mock {directive}]]")
    assert info.value.key == key


# --------------------------------------------------------------------------------------------
# Reliability knobs (heartbeats, endless line, ignored close, errors N times)
# --------------------------------------------------------------------------------------------


def test_parse_directive_reads_the_reliability_knobs() -> None:
    """keepalive_ms, ignore_close, times (with status and tag) and linger_ms are parsed."""
    _, knobs = parse_directive("[[mock fault=stall keepalive_ms=25.5 ignore_close=1]]")
    assert (knobs.fault, knobs.keepalive_ms, knobs.ignore_close) == ("stall", 25.5, True)
    _, knobs = parse_directive("[[mock fault=endless after=2]]")
    assert (knobs.fault, knobs.after) == ("endless", 2)
    _, knobs = parse_directive("[[mock status=429 retry_after=1 times=2 tag=r1 keepalive_ms=5]]")
    assert (knobs.status, knobs.times, knobs.tag, knobs.keepalive_ms) == (429, 2, "r1", 5.0)
    assert Knobs().keepalive_ms is None
    assert Knobs().ignore_close is False
    assert Knobs().times is None
    _, knobs = parse_directive("[[mock linger_ms=30]]")
    assert knobs.linger_ms == 30.0
    assert Knobs().linger_ms is None


@pytest.mark.parametrize(
    ("directive", "key"),
    [
        ("keepalive_ms=0", "keepalive_ms"),
        ("keepalive_ms=0.0", "keepalive_ms"),
        ("keepalive_ms=-5", "keepalive_ms"),
        ("keepalive_ms=1e3", "keepalive_ms"),
        ("ignore_close=2", "ignore_close"),
        ("ignore_close=true", "ignore_close"),
        ("status=429 tag=t times=0", "times"),
        ("status=429 tag=t times=-1", "times"),
        ("status=429 tag=t times=1.5", "times"),
        ("words=0", "words"),
        ("words=two", "words"),
        ("fault=endlessly", "fault"),
        ("linger_ms=0", "linger_ms"),
        ("linger_ms=soon", "linger_ms"),
        ("fast=1 linger_ms=5", "linger_ms"),
    ],
)
def test_parse_directive_rejects_bad_reliability_values(directive: str, key: str) -> None:
    """Zero or negative heartbeat periods and counts, and non-flag values, name their key."""
    with pytest.raises(DirectiveError) as info:
        parse_directive(f"hi [[mock {directive}]]")
    assert info.value.key == key


@pytest.mark.parametrize(
    ("directive", "key"),
    [
        ("times=2", "times"),
        ("times=2 tag=t", "times"),
        ("status=429 times=2", "times"),
        ("status=503 keepalive_ms=10", "keepalive_ms"),
        ("status=503 ignore_close=1", "ignore_close"),
        ("delay_ms=0 keepalive_ms=10", "keepalive_ms"),
        ("delay_ms=0 fault=eof keepalive_ms=10", "keepalive_ms"),
        ("fault=stall ignore_close=1", "ignore_close"),
        ("fault=endless size=10", "size"),
        ("status=500 fault=endless", "fault"),
    ],
)
def test_parse_directive_rejects_reliability_knobs_that_would_do_nothing(
    directive: str, key: str
) -> None:
    """times needs status and tag; heartbeats need a wait; a silent stall cannot ignore a close."""
    with pytest.raises(DirectiveError) as info:
        parse_directive(f"[[mock {directive}]]")
    assert info.value.key == key


def test_parse_directive_accepts_heartbeats_on_a_stall_without_delay() -> None:
    """delay_ms=0 with keepalive_ms is fine when a stall gives the heartbeats a wait."""
    _, knobs = parse_directive("[[mock delay_ms=0 fault=stall keepalive_ms=10 ignore_close=1]]")
    assert (knobs.delay_ms, knobs.keepalive_ms, knobs.ignore_close) == (0.0, 10.0, True)


# --------------------------------------------------------------------------------------------
# Benchmark knobs (fast=1, bench/)
# --------------------------------------------------------------------------------------------


def test_parse_directive_reads_the_benchmark_knobs() -> None:
    """fast, rate and stamp parse; rate takes decimals."""
    _, knobs = parse_directive("q [[mock fast=1 chunks=9 rate=12.5 stamp=1 words=2 tag=b]]")
    assert (knobs.fast, knobs.rate, knobs.stamp, knobs.chunks, knobs.words) == (
        True,
        12.5,
        True,
        9,
        2,
    )
    assert (Knobs().fast, Knobs().rate, Knobs().stamp) == (False, None, False)


@pytest.mark.parametrize(
    ("directive", "key"),
    [
        ("[[mock rate=10]]", "rate"),
        ("[[mock stamp=1]]", "stamp"),
        ("[[mock fast=1 rate=0]]", "rate"),
        ("[[mock fast=1 rate=-3]]", "rate"),
        ("[[mock fast=2]]", "fast"),
        ("[[mock fast=1 fault=reset]]", "fault"),
        ("[[mock fast=1 status=500]]", "status"),
        ("[[mock fast=1 delay_ms=5]]", "delay_ms"),
        ("[[mock fast=1 bytewise=1]]", "bytewise"),
        ("[[mock fast=1 comments=1]]", "comments"),
    ],
)
def test_parse_directive_rejects_bad_benchmark_knobs(directive: str, key: str) -> None:
    """rate and stamp need fast=1; fast=1 refuses the knobs of the step-by-step writer."""
    with pytest.raises(DirectiveError) as err:
        parse_directive(directive)
    assert err.value.key == key


# --------------------------------------------------------------------------------------------
# The documentation
# --------------------------------------------------------------------------------------------


def test_the_module_docstring_names_every_knob() -> None:
    """The knob list in the module docstring (the reference a test writer reads) names every key
    the parser takes."""
    doc = gateway.mock.knobs.__doc__
    assert doc is not None
    missing = [key for key in _KNOB_PARSERS if not re.search(rf"\b{key}\b", doc)]
    assert not missing, missing
