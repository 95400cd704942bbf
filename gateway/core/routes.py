"""Routes (pure): named upstreams, the model rules that pick them, and a circuit breaker per
upstream.

A `RouteTable` answers, for the model a `start` names, which upstreams to try and in which order,
with the model name each of them gets (`plan`). It comes from `--routes FILE` (`parse_routes`,
TOML, docs/upstreams.md "Routes") or, without one, from today's flags: one upstream called
`default` that serves every model (`single_route`).

A `Breaker` keeps one upstream out of rotation after `failures` consecutive failures, for
`cooldown` seconds, then lets one probe through (half-open): its success closes the breaker, its
failure opens it again. A 429 with `Retry-After` opens it for that long at once. Time is an
input (`now`), so tests drive it without waiting.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Final

#: The upstream of a gateway started without --routes (today's flags).
DEFAULT_UPSTREAM: Final = "default"

_GLOB_CHARS: Final = frozenset("*?[")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_\-]{1,64}")


class RoutesError(ValueError):
    """A routes file that cannot be used: the message names the file, the line when one can be
    told, and what is wrong."""


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One named upstream: where it is, which API it speaks, how to authenticate, and its own
    timeouts, retries and breaker settings (the global flags unless the routes file says)."""

    name: str
    url: str
    dialect: str
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str | None = None
    #: Extra request headers (e.g. an OpenAI organisation, an Azure api-version header).
    headers: Mapping[str, str] = field(default_factory=dict)
    connect_timeout: float = 10.0
    first_byte_timeout: float = 30.0
    read_timeout: float = 60.0
    retries: int = 2
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0


@dataclass(frozen=True, slots=True)
class ModelRule:
    """`name` (an exact model name or a glob such as `sonar*`) is served by `upstreams`, tried in
    order; `rename` gives the model name an upstream gets instead of the client's."""

    name: str
    upstreams: tuple[str, ...]
    rename: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_glob(self) -> bool:
        return not _GLOB_CHARS.isdisjoint(self.name)

    def matches(self, model: str) -> bool:
        return fnmatchcase(model, self.name) if self.is_glob else model == self.name


@dataclass(frozen=True, slots=True)
class Attempt:
    """One upstream to try for a stream, and the model name it gets."""

    upstream: UpstreamSpec
    model: str


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Named upstreams and the ordered model rules (the first that matches wins)."""

    upstreams: Mapping[str, UpstreamSpec]
    rules: tuple[ModelRule, ...]
    #: The model of a start that names none (None: a start must name one).
    default_model: str | None = None
    #: Whether the table came from a routes file (its rules are then the allowed models).
    from_file: bool = False

    def rule_for(self, model: str) -> ModelRule | None:
        for rule in self.rules:
            if rule.matches(model):
                return rule
        return None

    def plan(self, model: str) -> tuple[Attempt, ...]:
        """The upstreams to try for `model`, in order (empty when no rule matches)."""
        rule = self.rule_for(model)
        if rule is None:
            return ()
        return tuple(
            Attempt(self.upstreams[name], rule.rename.get(name, model)) for name in rule.upstreams
        )

    @property
    def models(self) -> tuple[str, ...]:
        """The model names (and globs) the rules serve, in rule order."""
        return tuple(dict.fromkeys(rule.name for rule in self.rules))


def single_route(spec: UpstreamSpec, default_model: str) -> RouteTable:
    """Today's flags as a table: one upstream, every model, the model name unchanged."""
    return RouteTable(
        {spec.name: spec}, (ModelRule("*", (spec.name,)),), default_model, from_file=False
    )


# --------------------------------------------------------------------------------------------
# The routes file
# --------------------------------------------------------------------------------------------

#: Keys of an `[upstreams.NAME]` table, and the type each must have.
_UPSTREAM_KEYS: Final[dict[str, str]] = {
    "url": "string",
    "dialect": "string",
    "api_key_env": "string",
    "headers": "table of strings",
    "connect_timeout": "number",
    "first_byte_timeout": "number",
    "read_timeout": "number",
    "retries": "integer",
    "breaker_failures": "integer",
    "breaker_cooldown": "number",
}
_MODEL_KEYS: Final = ("name", "upstreams", "rename")
#: Headers an upstream table may not set: the gateway owns them (the key goes in api_key_env).
_RESERVED_HEADERS: Final = frozenset(
    {"authorization", "x-api-key", "x-goog-api-key", "content-type", "content-length", "host"}
)


def parse_routes(
    text: str,
    source: str,
    defaults: UpstreamSpec,
    dialects: Collection[str],
    environ: Mapping[str, str],
    default_model: str | None,
) -> RouteTable:
    """The table a routes file describes. `defaults` carries the global flags' timeouts,
    retries and breaker settings (its name, url and dialect are not used); `environ` is where
    `api_key_env` is looked up; `default_model` is `--default-model`, used for a start without
    a model when a rule serves it. Raises RoutesError."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RoutesError(f"{source}: not valid TOML: {exc}") from None
    where = _Locator(text, source)
    unknown = sorted(set(doc) - {"upstreams", "models"})
    if unknown:
        raise RoutesError(
            f"{where.key(unknown[0])}unknown top-level key {unknown[0]!r} "
            "(a routes file has [upstreams.NAME] tables and [[models]] entries)"
        )
    raw_upstreams = doc.get("upstreams")
    if not isinstance(raw_upstreams, dict) or not raw_upstreams:
        raise RoutesError(f"{source}: no upstreams: add at least one [upstreams.NAME] table")
    upstreams = {
        name: _upstream(name, raw, defaults, dialects, environ, where)
        for name, raw in raw_upstreams.items()
    }
    raw_models = doc.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise RoutesError(
            f"{source}: no models: add at least one [[models]] entry "
            '(name = "a model or glob", upstreams = ["NAME", ...])'
        )
    rules = tuple(_rule(i, raw, upstreams, where) for i, raw in enumerate(raw_models))
    table = RouteTable(upstreams, rules, None, from_file=True)
    if default_model is not None and table.rule_for(default_model) is not None:
        chosen: str | None = default_model
    else:
        chosen = next((rule.name for rule in rules if not rule.is_glob), None)
    return RouteTable(upstreams, rules, chosen, from_file=True)


def _upstream(
    name: str,
    raw: Any,
    defaults: UpstreamSpec,
    dialects: Collection[str],
    environ: Mapping[str, str],
    where: _Locator,
) -> UpstreamSpec:
    at = where.upstream(name)
    label = f"{at}upstreams.{name}"
    if _NAME_RE.fullmatch(name) is None:
        raise RoutesError(f"{label}: an upstream name is 1 to 64 of A-Z a-z 0-9 _ -")
    if not isinstance(raw, dict):
        raise RoutesError(f"{label}: must be a table ([upstreams.{name}])")
    for key, value in raw.items():
        kind = _UPSTREAM_KEYS.get(key)
        if kind is None:
            raise RoutesError(f"{label}: unknown key {key!r} (known: {', '.join(_UPSTREAM_KEYS)})")
        if not _has_type(value, kind):
            raise RoutesError(f"{label}.{key}: must be a {kind}, not {_shown(value)}")
    url = raw.get("url")
    if url is None:
        raise RoutesError(f'{label}: needs url = "https://..."')
    if not url.startswith(("http://", "https://")):
        raise RoutesError(f"{label}.url: must be an http:// or https:// URL, not {url!r}")
    dialect = raw.get("dialect")
    if not isinstance(dialect, str) or dialect not in dialects:
        raise RoutesError(
            f"{label}.dialect: {'missing' if dialect is None else repr(dialect)}; "
            f"one of {', '.join(dialects)}"
        )
    api_key_env = raw.get("api_key_env")
    api_key = None
    if api_key_env is not None:
        api_key = environ.get(api_key_env) or None
        if api_key is None:
            raise RoutesError(
                f"{label}.api_key_env: {api_key_env} is not set; set it to the API key "
                "(or remove api_key_env for an upstream that needs none)"
            )
    headers = dict(raw.get("headers", {}))
    for header in headers:
        if header.lower() in _RESERVED_HEADERS:
            raise RoutesError(
                f"{label}.headers: {header} is set by the gateway (the key comes from api_key_env)"
            )
    numbers: dict[str, Any] = {}
    for key in ("connect_timeout", "first_byte_timeout", "read_timeout", "breaker_cooldown"):
        value = raw.get(key, getattr(defaults, key))
        if not value > 0:
            raise RoutesError(f"{label}.{key}: must be more than 0 seconds, not {value!r}")
        numbers[key] = float(value)
    retries = raw.get("retries", defaults.retries)
    if retries < 0:
        raise RoutesError(f"{label}.retries: must be 0 or more, not {retries}")
    failures = raw.get("breaker_failures", defaults.breaker_failures)
    if failures < 1:
        raise RoutesError(f"{label}.breaker_failures: must be 1 or more, not {failures}")
    return UpstreamSpec(
        name=name,
        url=url,
        dialect=dialect,
        api_key=api_key,
        api_key_env=api_key_env,
        headers=headers,
        retries=retries,
        breaker_failures=failures,
        **numbers,
    )


def _rule(i: int, raw: Any, upstreams: Mapping[str, UpstreamSpec], where: _Locator) -> ModelRule:
    label = f"{where.model(i)}models[{i}]"
    if not isinstance(raw, dict):
        raise RoutesError(f"{label}: must be a table ([[models]])")
    unknown = sorted(set(raw) - set(_MODEL_KEYS))
    if unknown:
        raise RoutesError(f"{label}: unknown key {unknown[0]!r} (known: {', '.join(_MODEL_KEYS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name) > 256:
        raise RoutesError(f"{label}.name: needs a model name or glob (a string of 1 to 256)")
    label = f"{where.model(i)}models[{i}] ({name})"
    names = raw.get("upstreams")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise RoutesError(f"{label}.upstreams: needs a list of upstream names, tried in order")
    for upstream in names:
        if upstream not in upstreams:
            raise RoutesError(
                f"{label}.upstreams: no upstream called {upstream!r} "
                f"(defined: {', '.join(upstreams)})"
            )
    if len(set(names)) != len(names):
        raise RoutesError(f"{label}.upstreams: lists an upstream twice")
    rename = raw.get("rename", {})
    if not isinstance(rename, dict) or not all(isinstance(v, str) and v for v in rename.values()):
        raise RoutesError(f'{label}.rename: must be a table of upstream = "model name"')
    for upstream in rename:
        if upstream not in names:
            raise RoutesError(f"{label}.rename: {upstream!r} is not one of this rule's upstreams")
    return ModelRule(name, tuple(names), dict(rename))


def _has_type(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "table of strings":
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    raise AssertionError(kind)


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


class _Locator:
    """Finds the line of a table in the file's text (tomllib gives lines for syntax errors
    only), so a wrong value is reported where it is: `routes.toml:7: ...`."""

    def __init__(self, text: str, source: str) -> None:
        self._lines = text.splitlines()
        self._source = source

    def _at(self, pattern: str, nth: int = 0) -> str:
        regex = re.compile(pattern)
        seen = 0
        for number, line in enumerate(self._lines, 1):
            if regex.match(line):
                if seen == nth:
                    return f"{self._source}:{number}: "
                seen += 1
        return f"{self._source}: "

    def upstream(self, name: str) -> str:
        quoted = re.escape(name)
        return self._at(rf"\s*\[\s*upstreams\s*\.\s*(?:{quoted}|\"{quoted}\")\s*\]")

    def model(self, i: int) -> str:
        return self._at(r"\s*\[\[\s*models\s*\]\]", i)

    def key(self, key: str) -> str:
        quoted = re.escape(key)
        return self._at(rf"\s*(?:\[+\s*)?(?:{quoted}|\"{quoted}\")\b")


# --------------------------------------------------------------------------------------------
# The circuit breaker
# --------------------------------------------------------------------------------------------

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"
#: Breaker states as the `gateway_upstream_breaker_state` gauge shows them.
STATE_VALUES: Final = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class Breaker:
    """One upstream's circuit breaker (per process).

    closed --(`failures` consecutive failures, or a Retry-After)--> open
    open --(cooldown over: the next `allow` takes the probe)--> half_open
    half_open --(the probe succeeds)--> closed; --(it fails)--> open; --(no verdict)--> open,
    with the cooldown already over (the next stream probes).

    While half-open only the probe goes through; every other stream skips the upstream.
    """

    __slots__ = ("_count", "cooldown", "failures", "state", "until")

    def __init__(self, failures: int, cooldown: float) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self.state = CLOSED
        self._count = 0
        #: While open: when the probe may go (clock seconds).
        self.until = 0.0

    def available(self, now: float) -> bool:
        """Whether `allow(now)` would let a stream through (it does not take the probe)."""
        return self.state == CLOSED or (self.state == OPEN and now >= self.until)

    def allow(self, now: float) -> bool:
        """Whether a stream may try this upstream now; the first after the cooldown is the
        probe (the breaker is half-open until its verdict)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and now >= self.until:
            self.state = HALF_OPEN
            return True
        return False

    def success(self) -> None:
        """An attempt got its answer going (a first token, or a complete answer)."""
        self.state = CLOSED
        self._count = 0

    def failure(self, now: float, hold: float | None = None) -> None:
        """An attempt failed the upstream's way (unreachable, 429, 5xx, overloaded, timeout).
        `hold`: the upstream's Retry-After, in seconds: out of rotation that long at once."""
        self._count += 1
        if self.state == HALF_OPEN or self._count >= self.failures:
            self._open(now + self.cooldown)
        if hold is not None and hold > 0:
            self._open(max(now + hold, self.until if self.state == OPEN else 0.0))

    def release(self, now: float) -> None:
        """An attempt ended with no verdict on the upstream (cancelled, or refused for the
        request's own fault): a probe's slot goes to the next stream."""
        if self.state == HALF_OPEN:
            self._open(now)

    def retry_in(self, now: float) -> float:
        """Seconds until a stream may try this upstream again (0 when it may now)."""
        if self.state == OPEN:
            return max(0.0, self.until - now)
        if self.state == HALF_OPEN:
            return self.cooldown  # a probe is out: at most this, usually much less
        return 0.0

    def _open(self, until: float) -> None:
        self.state = OPEN
        self.until = until
