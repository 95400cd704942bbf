"""The routes file, model rules and the circuit breaker (gateway/core/routes.py): pure."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.routes import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Breaker,
    RoutesError,
    RouteTable,
    UpstreamSpec,
    parse_routes,
    single_route,
)
from gateway.core.session import Limits

DIALECTS = ("perplexity", "openai", "events", "anthropic", "openai-responses", "gemini")
DEFAULTS = UpstreamSpec(
    name="",
    url="",
    dialect="perplexity",
    connect_timeout=10.0,
    first_byte_timeout=30.0,
    read_timeout=60.0,
    retries=2,
    breaker_failures=5,
    breaker_cooldown=30.0,
)
ENV = {"PERPLEXITY_API_KEY": "pplx-1", "OPENAI_API_KEY": "sk-1"}

EXAMPLE = """\
[upstreams.pplx]
url = "https://api.perplexity.ai/chat/completions"
dialect = "perplexity"
api_key_env = "PERPLEXITY_API_KEY"

[upstreams.openai]
url = "https://api.openai.com/v1/chat/completions"
dialect = "openai"
api_key_env = "OPENAI_API_KEY"
first_byte_timeout = 5
retries = 0
breaker_failures = 2
breaker_cooldown = 7.5
headers = { "OpenAI-Organization" = "org-1" }

[[models]]
name = "fast"                      # an exact model name, or a glob such as "sonar*"
upstreams = ["pplx", "openai"]     # tried in this order
rename = { pplx = "sonar", openai = "gpt-4.1-mini" }   # optional

[[models]]
name = "sonar*"
upstreams = ["pplx"]
"""


def parse(
    text: str, env: dict[str, str] | None = None, default: str | None = "sonar"
) -> RouteTable:
    return parse_routes(
        text, "routes.toml", DEFAULTS, DIALECTS, ENV if env is None else env, default
    )


def error(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(RoutesError) as info:
        parse(text, env)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_issue_example_parses_with_keys_from_the_environment() -> None:
    """The documented shape: upstreams with their keys from the environment, per-upstream
    overrides over the global defaults, rules in order."""
    table = parse(EXAMPLE)
    pplx, openai = table.upstreams["pplx"], table.upstreams["openai"]
    assert (pplx.api_key, openai.api_key) == ("pplx-1", "sk-1")
    assert (pplx.first_byte_timeout, pplx.retries, pplx.breaker_failures) == (30.0, 2, 5)
    assert (openai.first_byte_timeout, openai.retries, openai.breaker_failures) == (5.0, 0, 2)
    assert openai.breaker_cooldown == 7.5
    assert openai.headers == {"OpenAI-Organization": "org-1"}
    assert table.models == ("fast", "sonar*")
    assert "sk-1" not in repr(openai)


def test_plan_tries_the_rules_upstreams_in_order_with_renames() -> None:
    """The first matching rule wins; each upstream gets its renamed model, or the client's."""
    table = parse(EXAMPLE)
    plan = table.plan("fast")
    assert [(a.upstream.name, a.model) for a in plan] == [
        ("pplx", "sonar"),
        ("openai", "gpt-4.1-mini"),
    ]
    assert [(a.upstream.name, a.model) for a in table.plan("sonar-pro")] == [("pplx", "sonar-pro")]
    assert table.plan("gpt-5") == ()
    assert table.plan("Sonar-pro") == ()  # globs are case-sensitive, like model names


def test_default_model_is_the_flag_when_served_else_the_first_exact_rule() -> None:
    """A start without a model gets --default-model if a rule serves it, else the first rule
    that is an exact name, else none (the start must name one)."""
    assert parse(EXAMPLE, default="sonar").default_model == "sonar"
    assert parse(EXAMPLE, default="gpt-5").default_model == "fast"
    only_glob = EXAMPLE.split("[[models]]")[0] + '[[models]]\nname = "*"\nupstreams = ["pplx"]\n'
    assert parse(only_glob, default="gpt-5").default_model == "gpt-5"
    globs = EXAMPLE.split("[[models]]")[0] + '[[models]]\nname = "s*"\nupstreams = ["pplx"]\n'
    assert parse(globs, default="gpt-5").default_model is None


def test_single_route_serves_every_model_unchanged() -> None:
    """Without a routes file: one upstream called default, every model as the client names it."""
    spec = UpstreamSpec("default", "http://u", "openai")
    table = single_route(spec, "m")
    assert [(a.upstream.name, a.model) for a in table.plan("anything")] == [("default", "anything")]
    assert table.default_model == "m"
    assert not table.from_file


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[upstreams.a\n", "routes.toml: not valid TOML: "),
        ("x = 1\n", "routes.toml:1: unknown top-level key 'x'"),
        ('[[models]]\nname="m"\nupstreams=["a"]\n', "no upstreams"),
        ('[upstreams.a]\nurl="http://u"\ndialect="openai"\n', "no models"),
        (
            '\n[upstreams.a]\nurl="http://u"\ndialect="klingon"\n[[models]]\nname="m"\n'
            'upstreams=["a"]\n',
            "routes.toml:2: upstreams.a.dialect: 'klingon'; one of perplexity, openai",
        ),
        (
            '[upstreams.a]\ndialect="openai"\n[[models]]\nname="m"\nupstreams=["a"]\n',
            'routes.toml:1: upstreams.a: needs url = "https://..."',
        ),
        (
            '[upstreams.a]\nurl="ftp://u"\ndialect="openai"\n[[models]]\nname="m"\n'
            'upstreams=["a"]\n',
            "upstreams.a.url: must be an http:// or https:// URL",
        ),
        (
            '[upstreams.a]\nurl="http://u"\ndialect="openai"\ntimeout=3\n[[models]]\n'
            'name="m"\nupstreams=["a"]\n',
            "routes.toml:1: upstreams.a: unknown key 'timeout' (known: url, dialect",
        ),
        (
            '[upstreams.a]\nurl="http://u"\ndialect="openai"\nretries="3"\n[[models]]\n'
            'name="m"\nupstreams=["a"]\n',
            "upstreams.a.retries: must be a integer, not str '3'",
        ),
        (
            '[upstreams.a]\nurl="http://u"\ndialect="openai"\nread_timeout=0\n[[models]]\n'
            'name="m"\nupstreams=["a"]\n',
            "upstreams.a.read_timeout: must be more than 0 seconds",
        ),
        (
            '[upstreams.a]\nurl="http://u"\ndialect="openai"\napi_key_env="NOPE"\n[[models]]\n'
            'name="m"\nupstreams=["a"]\n',
            "upstreams.a.api_key_env: NOPE is not set",
        ),
        (
            '[upstreams.a]\nurl="http://u"\ndialect="openai"\nheaders={Authorization="x"}\n'
            '[[models]]\nname="m"\nupstreams=["a"]\n',
            "upstreams.a.headers: Authorization is set by the gateway",
        ),
        (
            '[upstreams.a]\nurl="http://u"\ndialect="openai"\n\n[[models]]\nname="m"\n'
            'upstreams=["b"]\n',
            "routes.toml:5: models[0] (m).upstreams: no upstream called 'b' (defined: a)",
        ),
        (
            '[upstreams.a]\nurl="http://u"\ndialect="openai"\n[[models]]\nname="m"\n'
            'upstreams=["a"]\n[[models]]\nname="n"\nupstreams=[]\n',
            "routes.toml:7: models[1] (n).upstreams: needs a list of upstream names",
        ),
        (
            '[upstreams.a]\nurl="http://u"\ndialect="openai"\n[[models]]\nname="m"\n'
            'upstreams=["a"]\nrename={b="x"}\n',
            "models[0] (m).rename: 'b' is not one of this rule's upstreams",
        ),
        (
            '[upstreams.a]\nurl="http://u"\ndialect="openai"\n[[models]]\nupstreams=["a"]\n',
            "models[0].name: needs a model name or glob",
        ),
        (
            '[upstreams.a]\nurl="http://u"\ndialect="openai"\n[[models]]\nname="m"\n'
            'upstreams=["a", "a"]\n',
            "lists an upstream twice",
        ),
        (
            '[upstreams."a b"]\nurl="http://u"\ndialect="openai"\n[[models]]\nname="m"\n'
            'upstreams=["a b"]\n',
            "routes.toml:1: upstreams.a b: an upstream name is 1 to 64 of",
        ),
    ],
)
def test_a_bad_routes_file_is_one_line_naming_file_line_and_fault(text: str, expected: str) -> None:
    """Every mistake is one line: the file, the line when it can be told, what is wrong."""
    assert expected in error(text)


def test_a_toml_syntax_error_gives_the_parsers_line() -> None:
    """tomllib's own position is kept."""
    message = error('[upstreams.a]\nurl = "http://u"\ndialect = \n')
    assert "line 3" in message


def test_breaker_opens_after_consecutive_failures_then_half_opens_for_one_probe() -> None:
    """closed -> open after N failures in a row -> one probe after the cooldown; others skip
    while it is out; its success closes the breaker."""
    breaker = Breaker(failures=3, cooldown=30)
    for now in (0, 1):
        assert breaker.allow(now)
        breaker.failure(now)
    assert breaker.state == CLOSED
    breaker.success()  # a success in between: consecutive failures start again
    for now in (2, 3, 4):
        assert breaker.allow(now)
        breaker.failure(now)
    assert breaker.state == OPEN
    assert not breaker.allow(33.9)
    assert breaker.retry_in(20) == pytest.approx(14)
    assert breaker.available(34)
    assert breaker.allow(34)  # the probe
    assert breaker.state == HALF_OPEN
    assert not breaker.available(34)
    assert not breaker.allow(35)  # only the probe goes
    breaker.success()
    assert breaker.state == CLOSED
    assert breaker.allow(36)


def test_a_failed_probe_opens_the_breaker_for_another_cooldown() -> None:
    """half-open -> open on the probe's failure, counted from that moment."""
    breaker = Breaker(failures=1, cooldown=10)
    breaker.failure(0)
    assert breaker.allow(10)
    breaker.failure(12)
    assert (breaker.state, breaker.until) == (OPEN, 22)


def test_a_probe_without_verdict_lets_the_next_stream_probe() -> None:
    """A cancelled probe (or one refused for its own request) frees the probe's slot at once."""
    breaker = Breaker(failures=1, cooldown=10)
    breaker.failure(0)
    assert breaker.allow(10)
    breaker.release(11)
    assert breaker.state == OPEN
    assert breaker.allow(11)
    assert breaker.state == HALF_OPEN


def test_retry_after_takes_the_upstream_out_of_rotation_that_long_at_once() -> None:
    """A 429's Retry-After opens the breaker at once, for that long, whatever the count; a
    longer open period already running is not shortened."""
    breaker = Breaker(failures=5, cooldown=30)
    breaker.failure(100, hold=2)
    assert (breaker.state, breaker.until) == (OPEN, 102)
    assert breaker.allow(102)
    breaker = Breaker(failures=1, cooldown=30)
    breaker.failure(0, hold=2)
    assert breaker.until == 30


@given(st.lists(st.sampled_from(["allow", "success", "failure", "release"]), max_size=60))
def test_breaker_never_lets_two_probes_out(actions: list[str]) -> None:
    """Whatever happens, while half-open no second stream is let through, and an open breaker
    lets nothing through before its time."""
    breaker = Breaker(failures=2, cooldown=5)
    now = 0.0
    for action in actions:
        now += 1.5
        state, until = breaker.state, breaker.until
        if action == "allow":
            allowed = breaker.allow(now)
            if state == HALF_OPEN or (state == OPEN and now < until):
                assert not allowed
            else:
                assert allowed
        elif action == "success":
            breaker.success()
        elif action == "failure":
            breaker.failure(now)
        else:
            breaker.release(now)


DOC = Path(__file__).resolve().parents[2] / "docs" / "upstreams.md"


def _doc_blocks(lang: str) -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


@pytest.mark.repo
def test_the_routes_example_in_the_docs_is_what_the_gateway_reads() -> None:
    """docs/upstreams.md's routes file parses (every dialect it names exists), routes as it
    says, and its error and refusal examples are the gateway's own words."""
    from gateway.core.dialects import DIALECTS as REGISTERED

    [example] = [b for b in _doc_blocks("toml") if b.startswith("# routes.toml")]
    env = {name: "k" for name in re.findall(r'api_key_env = "(\w+)"', example)}
    table = parse_routes(example, "routes.toml", DEFAULTS, tuple(REGISTERED), env, "sonar")
    assert {s.dialect for s in table.upstreams.values()} == {
        "perplexity",
        "openai",
        "anthropic",
        "gemini",
    }
    assert [(a.upstream.name, a.model) for a in table.plan("smart")] == [
        ("anthropic", "claude-sonnet-4-5"),
        ("openai", "gpt-5"),
        ("gemini", "gemini-2.5-pro"),
    ]
    [shown] = [b for b in _doc_blocks("text") if "routes.toml:" in b]
    with pytest.raises(RoutesError) as info:
        parse_routes(
            example.replace('"anthropic"\napi', '"antropic"\napi'),
            "routes.toml",
            DEFAULTS,
            tuple(REGISTERED),
            env,
            "sonar",
        )
    assert shown.strip() == f"python -m gateway serve: error: {info.value}"
    limits = Limits(
        allowed_models=frozenset(r.name for r in table.rules if not r.is_glob),
        model_globs=tuple(r.name for r in table.rules if r.is_glob),
    )
    refusal = next(b for b in _doc_blocks("json") if "bad_message" in b)
    assert orjson.loads(refusal)["message"] == limits.model_refused("gpt-6")
    listing = next(b for b in _doc_blocks("json") if '"object":"list"' in b)
    assert [m["id"] for m in orjson.loads(listing)["data"]] == limits.as_dict()["allowed_models"]
