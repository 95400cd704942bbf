"""The `[[mock ...]]` directive (gateway/mock/knobs.py): every knob parses, and typos or knobs
that would do nothing fail loudly, naming the key."""

from __future__ import annotations

import re

import pytest

import gateway.mock.knobs
from gateway.mock.knobs import (
    _KNOB_PARSERS,
    DirectiveError,
    Knobs,
    SourceList,
    Split,
    parse_directive,
)


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
# Recorded streams and typed answer parts (transcript, split, reasoning, tools, ...)
# --------------------------------------------------------------------------------------------


def test_parse_directive_reads_the_replay_and_parts_knobs() -> None:
    """transcript, split (N or random:SEED), reasoning, think_split, tools, sources (N or
    grow:N), concise, refusal and choices parse into typed knobs."""
    _, knobs = parse_directive("[[mock transcript=openai-chat-tool-calls split=random:7]]")
    assert (knobs.transcript, knobs.split) == ("openai-chat-tool-calls", Split(seed=7))
    assert parse_directive("[[mock split=1]]")[1].split == Split(size=1)
    _, knobs = parse_directive("[[mock reasoning=think think_split=3 sources=grow:5]]")
    assert (knobs.reasoning, knobs.think_split, knobs.sources) == (
        "think",
        3,
        SourceList(5, grow=True),
    )
    _, knobs = parse_directive("[[mock reasoning=reasoning_content tools=no_index words=2]]")
    assert (knobs.reasoning, knobs.tools, knobs.words) == ("reasoning_content", "no_index", 2)
    assert parse_directive("[[mock sources=0 concise=1]]")[1].sources == SourceList(0)
    assert parse_directive("[[mock concise=1]]")[1].concise is True
    assert parse_directive("[[mock refusal=1]]")[1].refusal is True
    assert parse_directive("[[mock choices=3]]")[1].choices == 3
    for shape in ("think_open", "reasoning", "details", "mistral"):
        assert parse_directive(f"[[mock reasoning={shape}]]")[1].reasoning == shape
    for kind in ("1", "2", "bad_json"):
        assert parse_directive(f"[[mock tools={kind}]]")[1].tools == kind


def test_scripted_says_whether_a_typed_part_knob_is_set() -> None:
    """Only the typed-parts knobs make a stream scripted (transcript and split do not)."""
    assert not Knobs().scripted
    assert not parse_directive("[[mock split=3 chunks=2 choices=1 refusal=0]]")[1].scripted
    for directive in (
        "reasoning=reasoning",
        "tools=1",
        "sources=2",
        "concise=1",
        "refusal=1",
        "choices=2",
    ):
        assert parse_directive(f"[[mock {directive}]]")[1].scripted, directive


@pytest.mark.parametrize(
    ("directive", "key"),
    [
        ("transcript=../x", "transcript"),
        ("transcript=a/b", "transcript"),
        ("transcript=.env", "transcript"),
        ("split=0", "split"),
        ("split=random", "split"),
        ("split=random:", "split"),
        ("split=random:x", "split"),
        ("split=fixed:3", "split"),
        ("split=-1", "split"),
        ("reasoning=nope", "reasoning"),
        ("reasoning=think think_split=0", "think_split"),
        ("tools=3", "tools"),
        ("tools=yes", "tools"),
        ("sources=-1", "sources"),
        ("sources=1001", "sources"),
        ("sources=grow:0", "sources"),
        ("sources=grow:", "sources"),
        ("concise=2", "concise"),
        ("refusal=yes", "refusal"),
        ("choices=0", "choices"),
        ("choices=9", "choices"),
    ],
)
def test_parse_directive_rejects_bad_parts_values(directive: str, key: str) -> None:
    """A transcript name that could be a path, a split or a part kind that does not exist, and
    counts out of range name their key."""
    with pytest.raises(DirectiveError) as info:
        parse_directive(f"[[mock {directive}]]")
    assert info.value.key == key


@pytest.mark.parametrize(
    ("directive", "key"),
    [
        ("transcript=t chunks=3", "chunks"),
        ("transcript=t words=2", "words"),
        ("transcript=t crlf=1", "crlf"),
        ("transcript=t done=0", "done"),
        ("transcript=t finish=0", "finish"),
        ("transcript=t comments=1", "comments"),
        ("transcript=t bytewise=1", "bytewise"),
        ("transcript=t reasoning=think", "reasoning"),
        ("transcript=t tools=1", "tools"),
        ("transcript=t sources=3", "sources"),
        ("transcript=t concise=1", "concise"),
        ("transcript=t refusal=1", "refusal"),
        ("transcript=t choices=2", "choices"),
        ("transcript=t fault=malformed", "fault"),
        ("transcript=t fault=giant", "fault"),
        ("fast=1 transcript=t", "transcript"),
        ("fast=1 split=3", "split"),
        ("fast=1 reasoning=reasoning", "reasoning"),
        ("fast=1 tools=1", "tools"),
        ("split=3 bytewise=1", "split"),
        ("think_split=2", "think_split"),
        ("reasoning=mistral think_split=2", "think_split"),
        ("tools=1 refusal=1", "refusal"),
        ("tools=2 choices=2", "choices"),
        ("refusal=1 choices=2", "choices"),
        ("reasoning=think refusal=1", "refusal"),
        ("reasoning=reasoning choices=2", "choices"),
        ("tools=1 chunks=4", "chunks"),
        ("concise=1 sources=grow:3", "sources"),
    ],
)
def test_parse_directive_rejects_parts_knobs_that_conflict(directive: str, key: str) -> None:
    """A transcript is replayed as recorded, so the knobs that shape a scripted answer are
    refused with it; kinds of answer that exclude each other, and companions missing, name the
    key."""
    with pytest.raises(DirectiveError) as info:
        parse_directive(f"[[mock {directive}]]")
    assert info.value.key == key


def test_parse_directive_accepts_the_knobs_a_replay_can_take() -> None:
    """Pacing, heartbeats, faults on the transport, errors, split and tag go with a transcript."""
    _, knobs = parse_directive(
        "[[mock transcript=t split=random:1 delay_ms=5 keepalive_ms=2 fault=stall after=3 "
        "linger_ms=4 header_delay_ms=1 ignore_close=1 tag=r]]"
    )
    assert (knobs.transcript, knobs.fault, knobs.after, knobs.ignore_close) == (
        "t",
        "stall",
        3,
        True,
    )
    _, knobs = parse_directive("[[mock transcript=t status=429 times=1 tag=r]]")
    assert (knobs.status, knobs.times) == (429, 1)
    # refusal=0 and choices=1 ask for nothing, so they exclude nothing.
    _, knobs = parse_directive("[[mock tools=1 refusal=0 choices=1]]")
    assert knobs.tools == "1"


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
