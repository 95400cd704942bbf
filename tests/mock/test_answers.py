"""The canned answers (gateway/mock/answers.py): topical, deterministic, and cut into chunks
that rebuild the text."""

from __future__ import annotations

import re
from typing import Any

import pytest

from gateway.mock.answers import ANSWERS, choose_answer, text_chunks
from tests.mock.conftest import MARS_ANSWER


def test_text_chunks_are_words_with_their_following_space() -> None:
    """Chunks are single words with a trailing space (none on the last) that rebuild the text."""
    pieces = text_chunks("Hello brave  new\nworld.")
    assert pieces == ["Hello ", "brave ", "new ", "world."]
    assert "".join(text_chunks(MARS_ANSWER.text)) == MARS_ANSWER.text


def test_text_chunks_cycle_when_more_are_asked_than_there_are_words() -> None:
    """Asking for more chunks than words cycles through the words."""
    assert text_chunks("a b c", 5) == ["a ", "b ", "c ", "a ", "b"]
    assert text_chunks("a b c", 0) == []


def test_text_chunks_can_carry_several_words_each() -> None:
    """words=N makes chunks of N words; without a count they cover the text exactly once."""
    assert text_chunks("a b c d e", words=2) == ["a b ", "c d ", "e"]
    assert text_chunks("a b c", 2, words=2) == ["a b ", "c a"]
    assert text_chunks("a b c", 3, words=3) == ["a b c ", "a b c ", "a b c"]
    assert "".join(text_chunks(MARS_ANSWER.text, words=7)) == MARS_ANSWER.text
    with pytest.raises(ValueError, match="positive"):
        text_chunks("a b", 2, words=0)


def test_text_chunks_share_strings_so_huge_streams_stay_cheap() -> None:
    """Cycled chunks are the same string objects, not copies (a million chunks = references)."""
    n = len(MARS_ANSWER.text.split())
    pieces = text_chunks(MARS_ANSWER.text, 3 * n + 1)
    assert pieces[0] is pieces[n] is pieces[2 * n]
    assert len({id(p) for p in pieces}) <= n + 1


def test_choose_answer_is_topical_and_deterministic() -> None:
    """The answer matches the question's topic, and an off-topic question always gets the same."""
    assert "WebSockets" in choose_answer("How do websockets work?").text
    assert "Mars" in MARS_ANSWER.text
    assert choose_answer("zzz qqq") is choose_answer("ZZZ   qqq")


@pytest.mark.parametrize("answer", ANSWERS, ids=lambda a: a.text.split()[0])
def test_every_answer_reads_like_a_real_one(answer: Any) -> None:
    """Each canned answer has 40-80 words, 2-4 sources, and only cites sources it has."""
    assert 40 <= len(answer.text.split()) <= 80
    assert 2 <= len(answer.sources) <= 4
    cited = {int(n) for n in re.findall(r"\[(\d)\]", answer.text)}
    assert cited == set(range(1, len(answer.sources) + 1))
    assert all(s.url.startswith("https://") for s in answer.sources)
