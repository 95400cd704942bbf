"""Prices (pure): what a stream cost in USD when the upstream did not say.

Most upstreams report tokens but no cost; the operator's `--prices FILE` (TOML) gives USD per
million tokens for each model, or for a glob of models, so that usage reports and budgets carry a
cost all the same (`gateway.core.usage.Meter` asks a `PriceTable`, which is a `Pricer`):

```toml
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
```

A model is looked up by each of the names it goes by (the upstream's model, then the client's):
an exact entry wins over globs, globs are tried in file order, and the first name that finds a
price decides.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Final

from gateway.core.usage import Usage

#: Tokens the `*_per_mtok` prices are per.
MTOK: Final = 1_000_000

_GLOB_CHARS: Final = frozenset("*?[")
_REQUIRED: Final = ("input_per_mtok", "output_per_mtok")
#: Keys of a `[prices."MODEL"]` table, in the order the docs give them.
_KEYS: Final = (
    "input_per_mtok",
    "cached_input_per_mtok",
    "cache_write_per_mtok",
    "output_per_mtok",
    "request",
)


class PricesError(ValueError):
    """A prices file that cannot be used: one line naming the file, the line when one can be
    told, and what is wrong."""


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices: USD per million tokens of each kind, and a fee per request."""

    input_per_mtok: float
    output_per_mtok: float
    #: Cached input (a cache read); None: the input price.
    cached_input_per_mtok: float | None = None
    #: Input written to the cache (Anthropic); None: the input price.
    cache_write_per_mtok: float | None = None
    #: USD per request (per stream), whatever its tokens.
    request: float = 0.0

    def cost(self, usage: Usage) -> float:
        """What `usage` cost in USD. `prompt_tokens` holds the cached input and the cache writes
        (the gateway's convention), so each is taken out of it and priced at its own rate;
        reasoning is part of `completion_tokens`, so it is priced as output."""
        cached = usage.cached_tokens or 0
        written = usage.cache_write_tokens or 0
        uncached = max(0, usage.prompt_tokens - cached - written)
        read_price, write_price = (
            self.input_per_mtok if price is None else price
            for price in (self.cached_input_per_mtok, self.cache_write_per_mtok)
        )
        tokens = (
            uncached * self.input_per_mtok
            + cached * read_price
            + written * write_price
            + usage.completion_tokens * self.output_per_mtok
        )
        return tokens / MTOK + self.request


class PriceTable:
    """Prices by model name or glob, in file order; called as a `Pricer` (`(models, usage) ->
    USD or None`)."""

    __slots__ = ("_exact", "_globs", "_models")

    def __init__(self, entries: Iterable[tuple[str, Price]]) -> None:
        self._exact: dict[str, Price] = {}
        globs: list[tuple[str, Price]] = []
        models: dict[str, None] = {}
        for pattern, price in entries:
            if pattern in models:
                continue  # the first entry for a name is the one that counts
            models[pattern] = None
            if _GLOB_CHARS.isdisjoint(pattern):
                self._exact[pattern] = price
            else:
                globs.append((pattern, price))
        self._globs = tuple(globs)
        self._models = tuple(models)

    def lookup(self, models: tuple[str, ...]) -> Price | None:
        """The price of the first of `models` (empty names skipped) that has one: its exact
        entry, else the first glob in file order that matches it (case-sensitive)."""
        for model in models:
            if not model:
                continue
            price = self._exact.get(model)
            if price is not None:
                return price
            for pattern, price in self._globs:
                if fnmatchcase(model, pattern):
                    return price
        return None

    def __call__(self, models: tuple[str, ...], usage: Usage) -> float | None:
        """What `usage` cost in USD by the first of `models` priced; None when none is."""
        price = self.lookup(models)
        return None if price is None else price.cost(usage)

    def __len__(self) -> int:
        return len(self._models)

    @property
    def models(self) -> tuple[str, ...]:
        """The model names and globs priced, in file order."""
        return self._models


# --------------------------------------------------------------------------------------------
# The prices file
# --------------------------------------------------------------------------------------------


def parse_prices(text: str, source: str) -> PriceTable:
    """The table a prices file (`--prices FILE`, module docstring) describes; `source` names
    the file in errors. Raises PricesError."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PricesError(f"{source}: not valid TOML: {exc}") from None
    where = _Locator(text, source)
    for key in doc:
        if key != "prices":
            raise PricesError(
                f"{where.key(key)}unknown top-level key {key!r} "
                '(a prices file has [prices."MODEL"] tables only)'
            )
    raw = doc.get("prices")
    if raw is not None and not isinstance(raw, dict):
        raise PricesError(
            f'{where.key("prices")}prices: must be [prices."MODEL"] tables, not {_shown(raw)}'
        )
    if not raw:
        raise PricesError(f'{where.key("prices")}no [prices."MODEL"] table: nothing to price')
    return PriceTable((name, _price(name, entry, where)) for name, entry in raw.items())


def _price(name: str, raw: Any, where: _Locator) -> Price:
    label = f'{where.entry(name)}prices."{name}"'
    if not name:
        raise PricesError(f"{label}: needs a model name or glob, not an empty one")
    if not isinstance(raw, dict):
        raise PricesError(f'{label}: must be a table ([prices."{name}"]), not {_shown(raw)}')
    for key, value in raw.items():
        if key not in _KEYS:
            raise PricesError(f"{label}: unknown key {key!r} (known: {', '.join(_KEYS)})")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and value >= 0)
        ):
            raise PricesError(
                f"{label}.{key}: must be a number of USD, 0 or more, not {_shown(value)}"
            )
    for key in _REQUIRED:
        if key not in raw:
            raise PricesError(f"{label}: needs {key} = USD per million tokens")
    return Price(**{key: float(value) for key, value in raw.items()})


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


class _Locator:
    """Finds the line of a table in the file's text (tomllib gives lines for syntax errors
    only), so a wrong value is reported where it is: `prices.toml:7: ...` (as
    `gateway.core.routes` does)."""

    def __init__(self, text: str, source: str) -> None:
        self._lines = text.splitlines()
        self._source = source

    def _at(self, *patterns: str) -> str:
        for pattern in patterns:
            regex = re.compile(pattern)
            for number, line in enumerate(self._lines, 1):
                if regex.match(line):
                    return f"{self._source}:{number}: "
        return f"{self._source}: "

    def entry(self, name: str) -> str:
        """A model's `[prices."NAME"]` header; else the line that sets it (`prices."NAME" = `,
        or `"NAME" = ` under `[prices]`)."""
        key = _key_pattern(name)
        return self._at(
            rf"\s*\[\s*prices\s*\.\s*{key}\s*\]",
            rf"\s*(?:prices\s*\.\s*)?{key}\s*=",
        )

    def key(self, key: str) -> str:
        """A top-level key: its table's header or its assignment."""
        return self._at(rf"\s*(?:\[+\s*)?{_key_pattern(key)}(?![A-Za-z0-9_\-])")


def _key_pattern(name: str) -> str:
    """A TOML key as the file may spell it: bare, "quoted" or 'literal'."""
    quoted = re.escape(name)
    return rf"(?:{quoted}|\"{quoted}\"|'{quoted}')" if name else r"(?:\"\"|'')"
