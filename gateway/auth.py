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
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import jwt

#: What a principal name may contain once it reaches logs and metrics.
_PRINCIPAL_RE: Final = re.compile(r"[A-Za-z0-9._:@/+\-]{1,128}")


class AuthError(Exception):
    """A token was refused; the message is safe to show the client (no token in it)."""


class TokensFileError(ValueError):
    """The tokens file cannot be read or has a malformed line: one line naming the file (and
    the line) and what to do, with no token in it. Refused at start-up; on SIGHUP the old tokens
    stay in force."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: its name, and when its credential expires (None: never)."""

    name: str
    expires_at: float | None = None


def parse_tokens(text: str) -> dict[bytes, str]:
    """`token principal` per line (blank lines and `#` comments ignored) -> digest -> principal.

    Raises ValueError naming the line of a malformed entry, so that a bad file is refused at
    start-up or reload instead of silently locking users out.
    """
    tokens: dict[bytes, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(
                f"line {number}: expected 'token principal' (two fields), found {len(parts)}"
            )
        token, principal = parts
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
        tokens[_digest(token)] = principal
    return tokens


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
        self._tokens: dict[bytes, str] = {}
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
                "principal' per line) or fix the path"
            ) from None
        try:
            self._tokens = parse_tokens(text)
        except ValueError as exc:
            raise TokensFileError(
                f"--auth-tokens-file {path}, {exc}; fix or remove that line"
            ) from None
        return len(self._tokens)

    def authenticate(self, token: str, now: float) -> Principal:
        """The principal a token stands for, or AuthError."""
        if not token or len(token) > 8192:
            raise AuthError("invalid token")
        if token.count(".") == 2 and self._keys:
            return self._jwt(token, now)
        digest = _digest(token)
        principal = self._tokens.get(digest)
        # The dict lookup is by digest (no prefix of the token is compared); compare_digest
        # keeps the final check constant-time as well.
        if principal is not None and hmac.compare_digest(digest, _digest(token)):
            return Principal(principal)
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
            return Principal(sub, float(exp) if isinstance(exp, int | float) else None)
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
