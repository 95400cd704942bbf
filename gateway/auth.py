"""Who is connecting: static bearer tokens and JWTs, and which browser origins may connect.

PURE apart from `TokenAuthenticator.load()` reading the tokens file (done at start-up and on
SIGHUP by the server). Time is an argument (`now`, Unix seconds), never read here, so expiry is
tested without waiting. Crypto is PyJWT's; static tokens are compared through a SHA-256 digest
lookup plus `hmac.compare_digest`, so the time taken does not depend on how much of a guess was
right (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import jwt

from gateway.core.budget import Budget

#: What a principal name may contain once it reaches logs and metrics.
_PRINCIPAL_RE: Final = re.compile(r"[A-Za-z0-9._:@/+\-]{1,128}")

#: Tokens file budget fields: a whole number of tokens, a decimal number of USD (no sign, no
#: exponent, no inf/nan). 18 digits keep `int()` far from its digit limit.
_TOKENS_VALUE_RE: Final = re.compile(r"[0-9]{1,18}")
_COST_VALUE_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_BUDGET_KEYS: Final = ("budget_tokens", "budget_cost")
#: An unknown key is named in the error only if it looks like a key, not like a pasted token.
_KEY_LIKE_RE: Final = re.compile(r"[A-Za-z_]{1,32}")

_BUDGET_CLAIM_ERROR: Final = (
    'token\'s budget claim must be an object like {"tokens": 100000, "cost": 5.0}'
)


class AuthError(Exception):
    """A token was refused; the message is safe to show the client (no token in it)."""


class TokensFileError(ValueError):
    """The tokens file cannot be read or has a malformed line: one line naming the file (and
    the line) and what to do, with no token in it. Refused at start-up; on SIGHUP the old tokens
    stay in force."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: its name, when its credential expires (None: never), and its
    budget override (None: the gateway's default budget applies).

    In `budget`, a measure that is None takes the gateway default (`Budget.over`), and a
    measure that is 0 means NO limit on it (as `--budget-tokens 0` does): it is kept as 0, not
    None, so that an override can lift a default limit; the caller maps 0 to "no limit" after
    merging.
    """

    name: str
    expires_at: float | None = None
    budget: Budget | None = None


def parse_tokens(text: str) -> dict[bytes, Principal]:
    """`token principal [budget_tokens=N] [budget_cost=X]` per line (blank lines and `#`
    comments ignored) -> token digest -> Principal.

    The budget fields (any order, each at most once) override the gateway's default budget for
    that principal: N a whole number of tokens, X a decimal number of USD; 0 means no limit
    (see `Principal`). Every line of a principal must carry the same budget (or none on all),
    else which budget applies would depend on which of its tokens was used.

    Raises ValueError naming the line of a malformed entry (never its token), so that a bad
    file is refused at start-up or reload instead of silently locking users out or applying a
    budget nobody meant.
    """
    tokens: dict[bytes, Principal] = {}
    #: principal name -> (its budget, the line that first gave it)
    seen: dict[str, tuple[Budget | None, int]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2:
            raise ValueError(
                f"line {number}: expected 'token principal [budget_tokens=N] [budget_cost=X]', "
                f"found {len(parts)} field"
            )
        token, principal = parts[:2]
        if len(token) < 16:
            # Its length only: the line may hold a real token.
            raise ValueError(
                f"line {number}: the token has {len(token)} characters, at least 16 are needed"
            )
        if _PRINCIPAL_RE.fullmatch(principal) is None:
            raise ValueError(
                f"line {number}: the principal name may only have letters, digits and . _ : @ "
                "/ + - (at most 128)"
            )
        budget = _parse_budget_fields(parts[2:], number)
        previous = seen.setdefault(principal, (budget, number))
        if previous[0] != budget:
            _inconsistent_budgets(principal, previous, (budget, number))
        tokens[_digest(token)] = Principal(principal, budget=budget)
    return tokens


def _parse_budget_fields(fields: list[str], number: int) -> Budget | None:
    """A line's `key=value` budget fields (fields 3 and on) -> its Budget (None: none given)."""
    values: dict[str, str] = {}
    for index, field in enumerate(fields, 3):
        key, eq, value = field.partition("=")
        if not eq:
            # The field itself is not shown: it may be a token pasted in the wrong place.
            raise ValueError(
                f"line {number}: field {index} is not key=value; after 'token principal' only "
                "budget_tokens=N and budget_cost=X may follow"
            )
        if key not in _BUDGET_KEYS:
            named = f"'{key}'" if _KEY_LIKE_RE.fullmatch(key) else "(not shown: not key-like)"
            raise ValueError(
                f"line {number}: unknown key {named} in field {index}; the allowed keys are "
                "budget_tokens and budget_cost"
            )
        if key in values:
            raise ValueError(f"line {number}: {key} is given twice; give it at most once")
        values[key] = value
    if not values:
        return None
    tokens: int | None = None
    cost: float | None = None
    if "budget_tokens" in values:
        if _TOKENS_VALUE_RE.fullmatch(values["budget_tokens"]) is None:
            raise ValueError(
                f"line {number}: budget_tokens must be a whole number >= 0 of at most 18 "
                "digits, like 100000 (0: no limit)"
            )
        tokens = int(values["budget_tokens"])
    if "budget_cost" in values:
        text = values["budget_cost"]
        cost = float(text) if _COST_VALUE_RE.fullmatch(text) else math.inf
        if not math.isfinite(cost):
            raise ValueError(
                f"line {number}: budget_cost must be a decimal number of USD >= 0, like 5 or "
                "2.50 (0: no limit)"
            )
    return Budget(tokens, cost)


def _inconsistent_budgets(
    principal: str, first: tuple[Budget | None, int], later: tuple[Budget | None, int]
) -> None:
    """Refuse a principal whose lines disagree on its budget (`later` is the current line)."""
    number = later[1]
    if first[0] is None or later[0] is None:
        with_budget, without = (first, later) if later[0] is None else (later, first)
        raise ValueError(
            f"line {number}: principal {principal} has budget fields on line {with_budget[1]} "
            f"but not on line {without[1]}; give every line of a principal the same budget"
        )
    raise ValueError(
        f"line {number}: principal {principal} has {_describe(first[0])} on line {first[1]} "
        f"but {_describe(later[0])} on line {number}; give every line of a principal the "
        "same budget"
    )


def _describe(budget: Budget) -> str:
    fields = []
    if budget.tokens is not None:
        fields.append(f"budget_tokens={budget.tokens}")
    if budget.cost is not None:
        fields.append(f"budget_cost={budget.cost!r}")
    return " ".join(fields)


def _budget_claim(claim: object) -> Budget | None:
    """A JWT's optional `budget` claim -> Budget, None (absent, null, or no measure set).

    Anything else than `{"tokens": N, "cost": X}` (keys optional, null allowed, N a whole
    number >= 0, X a finite number >= 0) is AuthError: refusing is safer than silently applying
    the default budget to a caller the issuer meant to limit.
    """
    if claim is None:
        return None
    if not isinstance(claim, dict) or not set(claim) <= {"tokens", "cost"}:
        raise AuthError(_BUDGET_CLAIM_ERROR)
    tokens_value = claim.get("tokens")
    cost_value = claim.get("cost")
    tokens: int | None = None
    cost: float | None = None
    if tokens_value is not None:
        if isinstance(tokens_value, bool) or not isinstance(tokens_value, int | float):
            raise AuthError(_BUDGET_CLAIM_ERROR)
        if isinstance(tokens_value, float) and not tokens_value.is_integer():
            raise AuthError(_BUDGET_CLAIM_ERROR)  # also inf and nan
        if tokens_value < 0:
            raise AuthError(_BUDGET_CLAIM_ERROR)
        tokens = int(tokens_value)
    if cost_value is not None:
        if isinstance(cost_value, bool) or not isinstance(cost_value, int | float):
            raise AuthError(_BUDGET_CLAIM_ERROR)
        try:
            cost = float(cost_value)
        except OverflowError:  # a JSON integer too large for a float
            raise AuthError(_BUDGET_CLAIM_ERROR) from None
        if not math.isfinite(cost) or cost < 0:
            raise AuthError(_BUDGET_CLAIM_ERROR)
    if tokens is None and cost is None:
        return None
    return Budget(tokens, cost)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuthenticator:
    """Validates bearer tokens against static tokens and/or JWT keys."""

    def __init__(
        self,
        tokens_file: Path | None = None,
        *,
        jwt_secret: str | None = None,
        jwt_public_key: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        self.tokens_file = tokens_file
        self._tokens: dict[bytes, Principal] = {}
        self._keys: list[tuple[Any, list[str]]] = []
        if jwt_secret:
            self._keys.append((jwt_secret, ["HS256"]))
        if jwt_public_key:
            self._keys.append((jwt_public_key, ["RS256", "ES256"]))
        self.audience = audience
        self.issuer = issuer
        if tokens_file is not None:
            self.load()

    @property
    def enabled(self) -> bool:
        """Whether any credential source is configured (else the gateway is open)."""
        return self.tokens_file is not None or bool(self._keys)

    def load(self) -> int:
        """(Re)read the tokens file; on error (TokensFileError) the old tokens stay in force.
        Returns the count."""
        path = self.tokens_file
        if path is None:
            return 0
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise TokensFileError(
                f"--auth-tokens-file {path}: cannot read it ({reason}); create it (one 'token "
                "principal [budget_tokens=N] [budget_cost=X]' per line) or fix the path"
            ) from None
        try:
            self._tokens = parse_tokens(text)
        except ValueError as exc:
            raise TokensFileError(
                f"--auth-tokens-file {path}, {exc}; fix or remove that line"
            ) from None
        return len(self._tokens)

    def authenticate(self, token: str, now: float) -> Principal:
        """The principal a token stands for (with its budget override, if any), or AuthError."""
        if not token or len(token) > 8192:
            raise AuthError("invalid token")
        if token.count(".") == 2 and self._keys:
            return self._jwt(token, now)
        digest = _digest(token)
        principal = self._tokens.get(digest)
        # The dict lookup is by digest (no prefix of the token is compared); compare_digest
        # keeps the final check constant-time as well.
        if principal is not None and hmac.compare_digest(digest, _digest(token)):
            return principal
        raise AuthError("invalid token")

    def _jwt(self, token: str, now: float) -> Principal:
        options: Any = {"require": ["sub"], "verify_aud": self.audience is not None}
        for key, algorithms in self._keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=algorithms,
                    audience=self.audience,
                    issuer=self.issuer,
                    options=options,
                    leeway=0,
                )
            except jwt.ExpiredSignatureError:
                raise AuthError("token expired") from None
            except jwt.ImmatureSignatureError:
                raise AuthError("token not yet valid") from None
            except jwt.InvalidTokenError:
                continue  # try the next key; the reason stays server-side
            # PyJWT checked exp/nbf against the wall clock; check them against `now` too, the
            # clock the server uses for the expiry timer (and tests move).
            sub = claims.get("sub")
            if not isinstance(sub, str) or _PRINCIPAL_RE.fullmatch(sub) is None:
                raise AuthError("token subject is not a valid principal name")
            exp = claims.get("exp")
            nbf = claims.get("nbf")
            if isinstance(exp, int | float) and now >= exp:
                raise AuthError("token expired")
            if isinstance(nbf, int | float) and now < nbf:
                raise AuthError("token not yet valid")
            budget = _budget_claim(claims.get("budget"))
            return Principal(sub, float(exp) if isinstance(exp, int | float) else None, budget)
        raise AuthError("invalid token")


# --------------------------------------------------------------------------- origins

LOOPBACK_ORIGINS: Final = ("http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*")


def origin_allowed(origin: str, allowed: Iterable[str], own_origin: str | None = None) -> bool:
    """Whether a browser `Origin` may open a socket.

    `allowed` holds exact `scheme://host[:port]` origins, `*` for any, or `scheme://host:*` for
    any port of a host. `own_origin` (the gateway's own, from the Host header) is allowed too.
    """
    origin = origin.strip().lower()
    if own_origin is not None and origin == own_origin.lower():
        return True
    for entry in allowed:
        entry = entry.strip().lower()
        if entry == "*" or entry == origin:
            return True
        if entry.endswith(":*"):
            prefix = entry[:-1]  # "http://localhost:"
            rest = origin[len(prefix) :]
            if origin.startswith(prefix) and rest.isdigit():
                return True
            if origin == prefix[:-1]:  # no explicit port
                return True
    return False


def is_loopback_host(host: str) -> bool:
    """Whether binding to `host` keeps the gateway private to this machine."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def query_has_token(path: str) -> bool:
    """Whether a request URL carries a credential in its query string (always refused)."""
    query = urlsplit(path).query.lower()
    if not query:
        return False
    names = {part.split("=", 1)[0] for part in query.split("&")}
    return bool(names & {"token", "access_token", "auth", "authorization", "api_key", "key"})
