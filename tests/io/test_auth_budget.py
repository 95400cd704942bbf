"""Per-principal budget overrides: tokens file fields and the JWT `budget` claim."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from gateway.auth import AuthError, Principal, TokenAuthenticator, TokensFileError, parse_tokens
from gateway.core.budget import Budget

ALICE = "alice-token-0123456789abcdef"
ALICE2 = "alice-token-2-0123456789abcd"
BOB = "bob-token-0123456789abcdef01"
SECRET = "hs256-test-secret-that-is-long-enough-for-sha256"
CLAIM_ERROR = 'token\'s budget claim must be an object like {"tokens": 100000, "cost": 5.0}'


def make_jwt(sub: str = "carol", ttl: float = 60, **claims: Any) -> str:
    return jwt.encode(
        {"sub": sub, "exp": int(time.time() + ttl), **claims}, SECRET, algorithm="HS256"
    )


def principals(text: str) -> list[Principal]:
    return list(parse_tokens(text).values())


def refused(text: str) -> str:
    with pytest.raises(ValueError, match=r"^line \d+: ") as info:
        parse_tokens(text)
    return str(info.value)


# ------------------------------------------------------------------ tokens file


def test_lines_without_budget_fields_have_no_override() -> None:
    """Two-field lines still give a principal with no budget override."""
    assert principals(f"# c\n{ALICE} alice\n{BOB} bob\n") == [Principal("alice"), Principal("bob")]


def test_budget_fields_in_any_order() -> None:
    """budget_tokens and budget_cost may come in any order, alone or together."""
    text = (
        f"{ALICE} alice budget_tokens=100000 budget_cost=5\n"
        f"{BOB} bob budget_cost=2.50 budget_tokens=7\n"
        "carol-token-0123456789abcdef carol budget_cost=.5\n"
        "dave-token-0123456789abcdef0 dave budget_tokens=1000\n"
    )
    assert [p.budget for p in principals(text)] == [
        Budget(100000, 5.0),
        Budget(7, 2.5),
        Budget(None, 0.5),
        Budget(1000, None),
    ]


def test_zero_is_kept_as_zero_meaning_no_limit() -> None:
    """0 is stored as 0 (not None), so the override can lift a gateway default limit."""
    [principal] = principals(f"{ALICE} alice budget_tokens=0 budget_cost=0")
    assert principal.budget == Budget(0, 0.0)
    assert principal.budget.over(Budget(500, 1.0)) == Budget(0, 0.0)


def test_same_budget_on_every_line_of_a_principal() -> None:
    """A principal may hold several tokens if every line carries the same budget."""
    text = (
        f"{ALICE} alice budget_tokens=10 budget_cost=1\n"
        f"{ALICE2} alice budget_cost=1.0 budget_tokens=10\n"
    )
    assert [p.budget for p in principals(text)] == [Budget(10, 1.0), Budget(10, 1.0)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            f"{ALICE} alice budget_days=3",
            "line 1: unknown key 'budget_days' in field 3; the allowed keys are budget_tokens "
            "and budget_cost",
        ),
        (
            f"{ALICE} alice budget_tokens=1 {BOB}=x",
            "line 1: unknown key (not shown: not key-like) in field 4; the allowed keys are "
            "budget_tokens and budget_cost",
        ),
        (
            f"{ALICE} alice budget_tokens=1 budget_tokens=2",
            "line 1: budget_tokens is given twice; give it at most once",
        ),
        (
            f"{ALICE} alice budget_cost=1 budget_cost=1",
            "line 1: budget_cost is given twice; give it at most once",
        ),
        (
            f"{ALICE} alice {BOB}",
            "line 1: field 3 is not key=value; after 'token principal' only budget_tokens=N "
            "and budget_cost=X may follow",
        ),
        (
            f"{ALICE}",
            "line 1: expected 'token principal [budget_tokens=N] [budget_cost=X]', found 1 field",
        ),
    ],
)
def test_malformed_fields_are_refused(line: str, message: str) -> None:
    """Unknown, repeated or non key=value fields are refused by line, without the token."""
    text = refused(line)
    assert text == message
    assert ALICE not in text
    assert BOB not in text


@pytest.mark.parametrize("value", ["1.5", "-1", "1e5", "", "x", "+3", "0x10", "1" * 19, "١٢"])
def test_budget_tokens_must_be_a_whole_number(value: str) -> None:
    """budget_tokens accepts only ASCII digits (a whole number >= 0)."""
    assert refused(f"{ALICE} alice budget_tokens={value}") == (
        "line 1: budget_tokens must be a whole number >= 0 of at most 18 digits, like 100000 "
        "(0: no limit)"
    )


@pytest.mark.parametrize("value", ["-1", "1e3", "", "x", "inf", "nan", "+1", "1.2.3", "9" * 400])
def test_budget_cost_must_be_a_finite_decimal(value: str) -> None:
    """budget_cost accepts only a finite, unsigned decimal number."""
    assert refused(f"{ALICE} alice budget_cost={value}") == (
        "line 1: budget_cost must be a decimal number of USD >= 0, like 5 or 2.50 (0: no limit)"
    )


def test_different_budgets_for_one_principal_are_refused() -> None:
    """Two lines of a principal with different budgets are refused, naming both lines."""
    text = f"{ALICE} alice budget_tokens=10\n# x\n{ALICE2} alice budget_tokens=20 budget_cost=1.5\n"
    assert refused(text) == (
        "line 3: principal alice has budget_tokens=10 on line 1 but budget_tokens=20 "
        "budget_cost=1.5 on line 3; give every line of a principal the same budget"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f"{ALICE} alice budget_cost=1\n{ALICE2} alice\n",
            "line 2: principal alice has budget fields on line 1 but not on line 2; give every "
            "line of a principal the same budget",
        ),
        (
            f"{ALICE} alice\n\n{ALICE2} alice budget_cost=1\n",
            "line 3: principal alice has budget fields on line 3 but not on line 1; give every "
            "line of a principal the same budget",
        ),
    ],
)
def test_budget_on_some_lines_of_a_principal_only_is_refused(text: str, message: str) -> None:
    """A principal with budget fields on one line but not another is refused."""
    assert refused(text) == message


def test_tokens_file_budget_reaches_authenticate(tmp_path: Path) -> None:
    """A static token authenticates to its Principal with the file's budget; plain lines
    still work, and a bad budget line is refused as a TokensFileError keeping the old tokens."""
    path = tmp_path / "tokens"
    path.write_text(f"{ALICE} alice budget_tokens=5000 budget_cost=0.25\n{BOB} bob\n")
    auth = TokenAuthenticator(path)
    now = time.time()
    assert auth.authenticate(ALICE, now) == Principal("alice", None, Budget(5000, 0.25))
    assert auth.authenticate(BOB, now) == Principal("bob")
    path.write_text(f"{ALICE} alice budget_tokens=lots\n")
    with pytest.raises(TokensFileError, match=re.escape(f"--auth-tokens-file {path}, line 1:")):
        auth.load()
    assert auth.authenticate(ALICE, now).budget == Budget(5000, 0.25)


# ------------------------------------------------------------------ JWT claim


@pytest.mark.parametrize(
    ("claim", "budget"),
    [
        ({"tokens": 100000, "cost": 5.0}, Budget(100000, 5.0)),
        ({"tokens": 100000}, Budget(100000, None)),
        ({"cost": 2}, Budget(None, 2.0)),
        ({"tokens": 3.0, "cost": None}, Budget(3, None)),
        ({"tokens": 0, "cost": 0}, Budget(0, 0.0)),
        ({"tokens": None, "cost": None}, None),
        ({}, None),
        (None, None),
    ],
)
def test_jwt_budget_claim_valid_forms(claim: object, budget: Budget | None) -> None:
    """A valid `budget` claim becomes the Principal's Budget; null or no measure is none."""
    auth = TokenAuthenticator(jwt_secret=SECRET)
    principal = auth.authenticate(make_jwt(budget=claim), time.time())
    assert principal.name == "carol"
    assert principal.budget == budget
    if principal.budget is not None:
        assert isinstance(principal.budget.tokens, int | None)
        assert isinstance(principal.budget.cost, float | None)


@pytest.mark.parametrize(
    "claim",
    [
        "100000",
        [100000, 5.0],
        5,
        True,
        {"tokens": -1},
        {"cost": -0.5},
        {"tokens": 1.5},
        {"tokens": True},
        {"cost": False},
        {"tokens": "100"},
        {"cost": "5"},
        {"cost": [5]},
        {"tokens": 1, "days": 3},
        {"cost": 10**400},
    ],
)
def test_jwt_budget_claim_refused_forms(claim: object) -> None:
    """Any other shape of `budget` claim is refused rather than silently ignored."""
    auth = TokenAuthenticator(jwt_secret=SECRET)
    with pytest.raises(AuthError) as info:
        auth.authenticate(make_jwt(budget=claim), time.time())
    assert str(info.value) == CLAIM_ERROR


def test_jwt_budget_claim_non_finite_numbers_refused() -> None:
    """Infinity and NaN (which PyJWT's JSON encoder emits) are refused for either measure."""
    auth = TokenAuthenticator(jwt_secret=SECRET)
    for claim in ({"tokens": float("inf")}, {"cost": float("inf")}, {"cost": float("nan")}):
        with pytest.raises(AuthError, match=re.escape(CLAIM_ERROR)):
            auth.authenticate(make_jwt(budget=claim), time.time())


def test_plain_static_token_and_jwt_still_work(tmp_path: Path) -> None:
    """Without any budget, a static token and a JWT authenticate as before, with no override."""
    path = tmp_path / "tokens"
    path.write_text(f"{ALICE} alice\n")
    auth = TokenAuthenticator(path, jwt_secret=SECRET)
    now = time.time()
    assert auth.authenticate(ALICE, now) == Principal("alice")
    principal = auth.authenticate(make_jwt(sub="dave"), now)
    assert (principal.name, principal.budget) == ("dave", None)
    assert principal.expires_at is not None
