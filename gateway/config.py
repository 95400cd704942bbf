"""One frozen `Config` built from command-line flags and `GATEWAY_<NAME>` environment variables.

This is the only module that reads the environment. A flag wins over its env var, which wins over
the default. The upstream API key is read here from the variable named by `--api-key-env` and kept
out of `repr()` so that it can never reach a log line.

A value that cannot work is refused here, before anything starts: a bad flag as an argparse error,
a bad `GATEWAY_<NAME>` value as a `StartupError` naming the variable (`python -m gateway` prints
either and exits 2; see `StartupError`).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final
from urllib.parse import urlsplit

from gateway.auth import is_loopback_host
from gateway.core.budget import parse_window
from gateway.core.dialects import DIALECTS
from gateway.core.prices import PricesError, PriceTable, parse_prices
from gateway.core.routes import RoutesError, RouteTable, UpstreamSpec, parse_routes

PERPLEXITY_URL: Final = "https://api.perplexity.ai/chat/completions"
LOG_FORMATS: Final = ("json", "console")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


#: prometheus-client's multiprocess directory: `--workers N` sets it (a fresh temporary one)
#: unless the operator did, and gateway/metrics.py then shares every worker's values through it.
METRICS_DIR_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"


class StartupError(SystemExit):
    """A misconfiguration found while starting: `str()` is one line that says what is wrong and
    how to fix it. `python -m gateway` prints it alone (no traceback) and exits 2.

    A SystemExit, as the checks it replaces were: whatever catches none of it still exits with
    the message instead of a traceback.
    """


#: The exit status of a startup misconfiguration (argparse's, for a bad flag).
EXIT_MISCONFIGURED: Final = 2


def redact_password(url: str) -> str:
    """`url` with its password (if any) shown as `***`: `redis://:***@host:6379/0`.

    Up to the last `@`, so that a password with an unescaped `/` or `@` is masked too."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.\-]*://[^:/@]*:).*@", r"\1***@", url)


def listen_failed(flag: str, host: str, port: int, exc: OSError) -> StartupError:
    """The StartupError for a listening socket that could not be opened on host:port (`flag`
    names the port's flag: --port, --metrics-port)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return StartupError(
            f"{where} is in use: another process listens there; stop it or choose another {flag}"
        )
    if isinstance(exc, socket.gaierror):
        return StartupError(
            f"cannot listen on {where}: the host does not resolve ({exc.strerror}); fix --host"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(
            f"cannot listen on {where}: no interface of this machine has that address; fix --host"
        )
    if exc.errno == errno.EACCES:
        return StartupError(
            f"cannot listen on {where}: permission denied (ports below 1024 need privileges); "
            f"choose another {flag}"
        )
    return StartupError(f"cannot listen on {where}: {exc.strerror or exc}; check --host and {flag}")


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the server needs to know, decided once at start-up."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: None means "serve the built-in mock upstream" (no key and no URL configured).
    upstream_url: str | None = None
    dialect: str = "perplexity"
    api_key_env: str = "PERPLEXITY_API_KEY"
    api_key: str | None = field(default=None, repr=False)
    default_model: str = "sonar"
    #: `max_tokens` sent to APIs that require one (Anthropic) when a start gives none.
    default_max_tokens: int = 4096
    upstream_read_timeout: float = 60.0
    upstream_connect_timeout: float = 10.0
    upstream_first_byte_timeout: float = 30.0
    upstream_retries: int = 2
    upstream_retry_budget: float = 10.0
    #: Every upstream's circuit breaker (a routes file may say otherwise per upstream).
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0
    #: POST /v1/ai-sdk/chat: streams resumable the AI SDK's way (an aborted response is a drop,
    #: not a Stop; docs/protocol.md, "Vercel AI SDK").
    ai_sdk_resume: bool = False
    #: Seconds between SSE comments on an HTTP stream's response while nothing else is sent.
    http_keepalive: float = 15.0
    #: --routes: the file, and the table it describes (None: today's flags, one upstream).
    routes_file: str | None = None
    routes: RouteTable | None = field(default=None, repr=False)
    #: --prices: the file, and the table it describes (None: only the upstreams' own costs).
    prices_file: str | None = None
    prices: PriceTable | None = field(default=None, repr=False)
    #: Per-principal budgets over a window (0: no limit); overrides per principal come from the
    #: tokens file and a JWT `budget` claim (docs/security.md, "Budgets").
    budget_tokens: int = 0
    budget_cost: float = 0.0
    budget_window: int = 86400
    max_streams: int = 16
    max_message_bytes: int = 65536
    #: Process-wide cap on concurrent streams; also sizes the upstream connection pool.
    max_active_streams: int = 10000
    #: Per-socket bytes waiting to be sent before upstream reads of that socket's streams pause.
    send_buffer_bytes: int = 1 << 20
    slow_client_timeout: float = 30.0
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    idle_timeout: float = 300.0
    close_timeout: float = 3.0
    open_timeout: float = 10.0
    drain_timeout: float = 30.0
    #: 0 = readiness never depends on load.
    max_loop_lag: float = 0.0
    # security (docs/security.md)
    auth_tokens_file: str | None = None
    jwt_secret_env: str | None = None
    jwt_secret: str | None = field(default=None, repr=False)
    jwt_public_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    auth_timeout: float = 5.0
    insecure_no_auth: bool = False
    #: None = the default for the auth mode (loopback origins when open, own origin when not).
    allowed_origins: tuple[str, ...] | None = None
    max_sockets_per_principal: int = 0
    max_streams_per_principal: int = 0
    starts_per_minute: int = 0
    max_prompt_chars: int = 0
    #: Typed answer parts (protocol.md, "Parts"): reasoning per stream and one tool call's
    #: arguments in bytes (over either, the stream fails), sources per stream (more: dropped).
    max_reasoning_bytes: int = 1 << 20
    max_tool_args_bytes: int = 256 << 10
    max_sources: int = 200
    allowed_models: tuple[str, ...] | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: None: /metrics answers on --port; else only on a listener of its own on this port.
    metrics_port: int | None = None
    log_content: bool = False
    resume_grace: float = 30.0
    resume_retention: float = 120.0
    resume_max_bytes: int = 1 << 20
    resume_total_bytes: int = 256 << 20
    resume_tombstones: int = 10_000
    #: Seconds between the periodic full garbage collections (gateway/memory.py); 0 = never.
    gc_interval: float = 300.0
    redis_url: str | None = None
    #: "auto": uvloop when installed, else asyncio.
    loop: str = "auto"
    compression: bool = False
    #: How upstream bodies reach the relay: "push" (aiohttp's reader hands each piece over in
    #: its callback), "pull" (public API: iter_any()), "auto" (push when the self-test passes).
    upstream_body: str = "auto"
    #: How client frames are parsed: "fast" (whole frames by the gateway), "standard"
    #: (websockets alone), "auto" (fast when the self-test passes).
    client_frames: str = "auto"
    workers: int = 1
    log_format: str = "json"
    log_level: str = "info"
    #: Pace of the built-in mock upstream (used only when upstream_url is None).
    mock_delay_ms: float = 35.0

    @property
    def auth_enabled(self) -> bool:
        """Whether clients must present a credential."""
        return bool(self.auth_tokens_file or self.jwt_secret or self.jwt_public_key)

    @property
    def uses_mock(self) -> bool:
        """True when no upstream is configured and the built-in mock answers instead."""
        return self.upstream_url is None and self.routes is None


#: The modes of each dependency shortcut (gateway/io/seams/): the fast one, its public-API
#: fallback, and auto.
SEAM_MODES: Final[dict[str, tuple[str, ...]]] = {
    "upstream_body": ("auto", "push", "pull"),
    "client_frames": ("auto", "fast", "standard"),
}


def infer_dialect(url: str) -> str:
    """Guess the dialect from an upstream URL (the providers' hosts and paths, and the mock's
    routes); `--dialect` overrides the guess."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    path = parts.path.rstrip("/")
    if path.endswith("/perplexity-agent") or (
        host == "api.perplexity.ai" and path.endswith("/responses")
    ):
        return "perplexity-agent"
    if host == "api.perplexity.ai" or path.endswith("/perplexity"):
        return "perplexity"
    if host == "api.anthropic.com" or path.endswith(("/v1/messages", "/anthropic")):
        return "anthropic"
    if host == "generativelanguage.googleapis.com" or path.endswith("/gemini"):
        return "gemini"
    if path.endswith(("/responses", "/openai-responses")):
        return "openai-responses"
    if path.endswith("/events"):
        return "events"
    return "openai"


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get("GATEWAY_" + name.upper().replace("-", "_"))
    return value if value not in (None, "") else None


def _number(kind: Callable[[str], Any], text: str) -> Any:
    """`kind(text)` (int or float), or an ArgumentTypeError that says what was expected."""
    try:
        return kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = _number(kind, text)
        if not value > 0:  # NaN too
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = _number(kind, text)
        if not value >= 0:  # NaN too
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


_nn_int = _non_negative(int)


def _loop_lag_limit(text: str) -> float:
    """--max-loop-lag: 0 (off) or at least 10 ms; the lag probe's timer runs on uvloop's 1 ms
    clock, so a smaller limit would flip readiness on timer jitter alone."""
    value: float = _number(float, text)
    if value != 0 and not value >= 0.01:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or >= 0.01 seconds, got {text}")
    return value


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def port_number(text: str) -> int:
    """A TCP port, 0 to 65535 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port (0 to 65535), got {text!r}")
    return value


def _http_url(text: str) -> str:
    """--upstream-url: http(s) with a host. Anything else would fail every prompt later as a
    retryable `upstream_unavailable`, which points at the upstream instead of the flag."""
    try:
        parts = urlsplit(text)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(
            "expected an http:// or https:// URL with a host (like "
            f"https://api.perplexity.ai/chat/completions), got {redact_password(text)!r}"
        )
    return text


def _redis_url(text: str) -> str:
    """--redis-url: a URL redis-py can connect with (its password is never shown)."""
    if urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise argparse.ArgumentTypeError(
            f"expected a redis://, rediss:// or unix:// URL, got {redact_password(text)!r}"
        )
    return text


class _FromEnv(str):
    """A flag's default read from its GATEWAY_ env var: marks where a bad value came from."""

    __slots__ = ()


def _typed(
    kind: Callable[[str], Any], env_name: str, choices: tuple[str, ...] | None
) -> Callable[[str], Any]:
    """`kind` as an argparse type: a bad flag value is an argparse error (usage line, then the
    error); a bad value from the env var is a StartupError naming the variable. argparse checks
    `choices` for flag values only, so they are checked here for the env var's."""

    def convert(text: str) -> Any:
        try:
            value = kind(str(text))
        except argparse.ArgumentTypeError as exc:
            reason = str(exc)
        except (TypeError, ValueError):
            reason = f"invalid value {redact_password(text)!r}"
        else:
            if not isinstance(text, _FromEnv) or choices is None or value in choices:
                return value
            reason = f"expected one of {', '.join(choices)}, got {text!r}"
        if isinstance(text, _FromEnv):
            raise StartupError(f"{env_name}: {reason}; fix the variable or unset it")
        raise argparse.ArgumentTypeError(reason)

    convert.__name__ = getattr(kind, "__name__", "value")
    return convert


#: The values a switch's env var may take (GATEWAY_COMPRESSION=1); anything else is refused.
_TRUE: Final = ("1", "true", "yes", "on")
_FALSE: Final = ("0", "false", "no", "off")


def add_serve_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Declare every `serve` flag; each default comes from its `GATEWAY_<NAME>` env var."""

    def flag(name: str, help_text: str, default: Any, kind: Any = str, **kw: Any) -> None:
        env_value = _env(environ, name)
        env_name = "GATEWAY_" + name.upper().replace("-", "_")
        value = _FromEnv(env_value) if env_value is not None else default
        # --help shows the default, which may come from the environment: never a password
        # (GATEWAY_REDIS_URL in a container's environment, say).
        shown = redact_password(value) if isinstance(value, str) else str(value)
        parser.add_argument(
            "--" + name,
            type=_typed(kind, env_name, kw.get("choices")),
            # argparse converts a string default with `type` only when the flag is absent.
            default=value,
            help=f"{help_text} [env {env_name}; default: {shown.replace('%', '%%')}]",
            **kw,
        )

    def switch(name: str, help_text: str) -> None:
        env_name = "GATEWAY_" + name.upper().replace("-", "_")
        env_value = _env(environ, name)
        parser.add_argument(
            "--" + name,
            action="store_true",
            # Checked (and made a bool) by config_from_args: a typo must not silently mean off.
            default=_FromEnv(env_value) if env_value is not None else False,
            help=f"{help_text} [env {env_name}=1]",
        )

    d = Config()
    flag("host", "interface to listen on", d.host)
    flag("port", "TCP port to listen on (0 picks a free one)", d.port, port_number)
    flag(
        "metrics-port",
        "serve GET /metrics on a listener of its own on this port (same --host), and answer it "
        "404 on --port, so that a public Service or Ingress never exposes it; default: on --port",
        None,
        port_number,
    )
    flag(
        "upstream-url",
        "upstream chat-completions URL; default: the Perplexity API when the API key env var is "
        "set, else the built-in mock upstream",
        None,
        _http_url,
    )
    flag(
        "dialect",
        "upstream stream format; default: inferred from the URL (perplexity for api.perplexity.ai)",
        None,
        choices=tuple(sorted(DIALECTS)),
    )
    flag("api-key-env", "env var holding the upstream API key (sent as Bearer)", d.api_key_env)
    flag("default-model", "model used when a start names none", d.default_model)
    flag(
        "routes",
        "TOML file of named upstreams and model rules, with fallback (docs/upstreams.md); "
        "replaces --upstream-url/--dialect/--api-key-env and --allowed-models",
        None,
    )
    flag(
        "prices",
        "TOML file of USD prices per million tokens by model (globs allowed), for streams whose "
        "upstream reports no cost (docs/usage.md)",
        None,
    )
    flag(
        "budget-tokens",
        "tokens (prompt + completion) each principal may use per --budget-window; a start over "
        "it is refused with budget_exceeded (0: no limit)",
        d.budget_tokens,
        _non_negative(int),
    )
    flag(
        "budget-cost",
        "USD each principal may spend per --budget-window (0: no limit)",
        d.budget_cost,
        _non_negative(float),
    )
    flag(
        "budget-window",
        "the budgets' window, aligned to UTC: a whole number and s, m, h or d",
        "1d",
        _window,
    )
    flag(
        "http-keepalive",
        "seconds between keep-alive comments on an HTTP stream's response while it is silent "
        "(0: none)",
        d.http_keepalive,
        _non_negative(float),
    )
    flag(
        "breaker-failures",
        "consecutive failures that take an upstream out of rotation",
        d.breaker_failures,
        _positive(int),
    )
    flag(
        "breaker-cooldown",
        "seconds an upstream stays out of rotation before one probe is let through",
        d.breaker_cooldown,
        _positive(float),
    )
    flag(
        "default-max-tokens",
        "max_tokens sent to APIs that require one (anthropic) when a start gives none",
        d.default_max_tokens,
        _positive(int),
    )
    flag(
        "upstream-read-timeout",
        "longest silence allowed between upstream bytes, seconds",
        d.upstream_read_timeout,
        _positive(float),
    )
    flag(
        "upstream-connect-timeout",
        "upstream connect timeout, seconds",
        d.upstream_connect_timeout,
        _positive(float),
    )
    flag(
        "upstream-first-byte-timeout",
        "longest wait for the first byte of an upstream answer, seconds",
        d.upstream_first_byte_timeout,
        _positive(float),
    )
    flag(
        "upstream-retries",
        "retries of connect failures, 429 and 502/503/504 before any output",
        d.upstream_retries,
        _non_negative(int),
    )
    flag(
        "upstream-retry-budget",
        "most seconds spent waiting between retries of one stream",
        d.upstream_retry_budget,
        _non_negative(float),
    )
    flag("max-streams", "concurrent streams per socket", d.max_streams, _positive(int))
    flag(
        "max-message-bytes",
        "largest client frame accepted, bytes",
        d.max_message_bytes,
        _positive(int),
    )
    flag(
        "max-reasoning-bytes",
        "reasoning text per stream, bytes; over it the stream ends with upstream_protocol_error",
        d.max_reasoning_bytes,
        _positive(int),
    )
    flag(
        "max-tool-args-bytes",
        "one tool call's arguments, bytes; over it the stream ends with upstream_protocol_error",
        d.max_tool_args_bytes,
        _positive(int),
    )
    flag(
        "max-sources",
        "distinct sources per stream; further ones are dropped (and counted)",
        d.max_sources,
        _positive(int),
    )
    flag(
        "max-active-streams",
        "concurrent streams per process; sizes the upstream connection pool",
        d.max_active_streams,
        _positive(int),
    )
    flag(
        "send-buffer-bytes",
        "bytes queued for one socket before its upstream reads pause (backpressure)",
        d.send_buffer_bytes,
        _positive(int),
    )
    flag(
        "slow-client-timeout",
        "close a socket with 4408 when its send buffer stays full this long, seconds",
        d.slow_client_timeout,
        _positive(float),
    )
    flag(
        "ping-interval",
        "seconds between WebSocket pings (0 disables keepalive)",
        d.ping_interval,
        _non_negative(float),
    )
    flag(
        "ping-timeout",
        "close a socket whose ping is unanswered this long, seconds",
        d.ping_timeout,
        _positive(float),
    )
    flag(
        "idle-timeout",
        "close (1000) a socket with no stream and no message this long, seconds (0: never)",
        d.idle_timeout,
        _non_negative(float),
    )
    flag(
        "close-timeout",
        "how long a closing handshake may take before the TCP connection is dropped, seconds",
        d.close_timeout,
        _positive(float),
    )
    flag(
        "open-timeout",
        "how long a new connection may take to send its WebSocket upgrade request (or any "
        "HTTP request) before it is dropped, seconds",
        d.open_timeout,
        _positive(float),
    )
    flag(
        "drain-timeout",
        "on SIGTERM, how long in-flight streams may finish, seconds",
        d.drain_timeout,
        _non_negative(float),
    )
    flag(
        "max-loop-lag",
        "answer /readyz with 503 'overloaded' while the event loop has run this late (the worst "
        "of the last 2 s), so a load balancer sends new sockets elsewhere, seconds (0: never)",
        d.max_loop_lag,
        _loop_lag_limit,
    )
    flag(
        "auth-tokens-file",
        "file of 'token principal [budget_tokens=N] [budget_cost=USD]' lines (reloaded on SIGHUP)",
        None,
    )
    flag("jwt-secret-env", "env var holding an HS256 JWT secret", None)
    flag("jwt-public-key", "PEM file with an RS256/ES256 JWT public key", None)
    flag("jwt-audience", "required JWT 'aud'", None)
    flag("jwt-issuer", "required JWT 'iss'", None)
    flag(
        "auth-timeout",
        "seconds a browser has to send its first-message auth",
        d.auth_timeout,
        _positive(float),
    )
    switch("insecure-no-auth", "allow a non-loopback bind without authentication")
    flag(
        "allowed-origins",
        "comma-separated browser origins (scheme://host[:port], host:* for any port, * for "
        "any); default: loopback origins without auth, the gateway's own origin with auth",
        None,
        _csv,
    )
    flag("max-sockets-per-principal", "open sockets per principal (0: unlimited)", 0, _nn_int)
    flag(
        "max-streams-per-principal",
        "concurrent streams per principal (0: unlimited)",
        0,
        _nn_int,
    )
    flag("starts-per-minute", "stream starts per principal per minute (0: unlimited)", 0, _nn_int)
    flag("max-prompt-chars", "largest prompt in characters (0: unlimited)", 0, _nn_int)
    flag("allowed-models", "comma-separated models clients may ask for (default: any)", None, _csv)
    flag("tls-cert", "PEM certificate chain: serve wss:// directly", None)
    flag("tls-key", "PEM private key for --tls-cert", None)
    switch("log-content", "log prompts and answers (off by default: they are user data)")
    switch(
        "ai-sdk-resume",
        "AI SDK endpoint: an aborted response is a drop, resumed by the SDK's reconnect (GET "
        "/v1/ai-sdk/chat/{chatId}/stream) and stopped by DELETE; off: an abort is the Stop button",
    )
    flag(
        "resume-grace",
        "seconds a dropped socket's streams keep running for a resume (0: cancel at once)",
        d.resume_grace,
        _non_negative(float),
    )
    flag(
        "resume-retention",
        "seconds an ended stream's output stays resumable",
        d.resume_retention,
        _non_negative(float),
    )
    flag(
        "resume-max-bytes",
        "largest ended stream (bytes: answer, chunk offsets, metadata) retained for resume",
        d.resume_max_bytes,
        _nn_int,
    )
    flag(
        "resume-total-bytes",
        "memory for retained output of ended streams per process (bytes); oldest evicted first",
        d.resume_total_bytes,
        _nn_int,
    )
    flag(
        "resume-tombstones",
        "forgotten resume tokens remembered to answer resume_unavailable (about 150 bytes each)",
        d.resume_tombstones,
        _nn_int,
    )
    flag(
        "gc-interval",
        "seconds between full garbage collections and C-heap trims (each pauses the loop; "
        "0.1 s in the one-hour soak, docs/reliability.md); 0: only when CPython decides",
        d.gc_interval,
        _non_negative(float),
    )
    flag(
        "redis-url",
        "redis://host:port/db shared by all instances: resume on any instance, cancel anywhere",
        None,
        _redis_url,
    )
    flag(
        "loop",
        "event loop: uvloop (faster; default when installed) or asyncio",
        d.loop,
        choices=("auto", "uvloop", "asyncio"),
    )
    flag(
        "upstream-body",
        "how upstream bodies reach the relay: push (fast, relies on aiohttp internals), pull "
        "(public API) or auto (push when its startup self-test passes)",
        d.upstream_body,
        choices=SEAM_MODES["upstream_body"],
    )
    flag(
        "client-frames",
        "how client frames are parsed: fast (relies on websockets internals), standard "
        "(websockets alone) or auto (fast when its startup self-test passes)",
        d.client_frames,
        choices=SEAM_MODES["client_frames"],
    )
    switch(
        "compression",
        "accept permessage-deflate (about 40 KiB more per socket; small token frames gain little)",
    )
    flag(
        "workers",
        "processes sharing the port with SO_REUSEPORT, one event loop each",
        d.workers,
        _positive(int),
    )
    flag(
        "log-format",
        "log output; default: console on a TTY, else json",
        None,
        choices=LOG_FORMATS,
    )
    flag("log-level", "minimum log level", d.log_level, choices=LOG_LEVELS)
    flag(
        "mock-delay-ms",
        "pace of the built-in mock upstream between words, ms",
        d.mock_delay_ms,
        _non_negative(float),
    )


#: The Config fields set by a switch (a flag without a value).
SWITCHES: Final = ("insecure_no_auth", "log_content", "compression", "ai_sdk_resume")


def _switch(name: str, value: bool | str) -> bool:
    """A switch's value: True when given as a flag, else its env var's, which must be one of
    _TRUE or _FALSE."""
    if isinstance(value, bool):
        return value
    if value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    env_name = "GATEWAY_" + name.upper()
    raise StartupError(
        f"{env_name}: expected one of {', '.join(_TRUE + _FALSE)}, got {str(value)!r}; fix the "
        "variable or unset it"
    )


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """Resolve parsed `serve` arguments (and the key env var) into a `Config`."""
    env = os.environ if environ is None else environ
    api_key = env.get(args.api_key_env) or None
    upstream_url = args.upstream_url
    if upstream_url is None and api_key is not None:
        upstream_url = PERPLEXITY_URL
    if upstream_url is None:
        dialect = args.dialect or "perplexity"  # the mock speaks every dialect; show the real one
    else:
        dialect = args.dialect or infer_dialect(upstream_url)
    log_format = args.log_format or ("console" if sys.stderr.isatty() else "json")
    jwt_secret = env.get(args.jwt_secret_env) or None if args.jwt_secret_env else None
    if args.jwt_secret_env and jwt_secret is None:
        raise StartupError(
            f"--jwt-secret-env names {args.jwt_secret_env}, which is not set; set it to the "
            "HS256 secret or drop --jwt-secret-env"
        )
    if args.workers > 1 and (args.port == 0 or args.metrics_port == 0):
        raise StartupError(
            "--workers > 1 needs a fixed --port (and --metrics-port): the workers share it"
        )
    if args.metrics_port is not None and args.metrics_port == args.port != 0:
        raise StartupError(
            f"--metrics-port {args.metrics_port} is --port too; choose another --metrics-port"
        )
    if bool(args.tls_cert) != bool(args.tls_key):
        raise StartupError(
            "--tls-cert and --tls-key go together; give both (the PEM certificate chain and "
            "its private key) or neither"
        )
    routes = _routes(args, env, dialect) if args.routes is not None else None
    prices = _prices(args.prices) if args.prices is not None else None
    # Every flag is named like its Config field; the derived values above take precedence.
    values = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    values.update(
        routes_file=args.routes,
        routes=routes,
        prices_file=args.prices,
        prices=prices,
        upstream_url=upstream_url,
        dialect=dialect,
        api_key=api_key,
        jwt_secret=jwt_secret,
        log_format=log_format,
        **{name: _switch(name, getattr(args, name)) for name in SWITCHES if hasattr(args, name)},
    )
    return Config(**values)


def _routes(args: argparse.Namespace, env: Mapping[str, str], dialect: str) -> RouteTable:
    """The table of `--routes FILE`; a file that cannot be read or used is one line."""
    path = args.routes
    if args.upstream_url is not None or args.dialect is not None:
        raise StartupError(
            f"--routes {path} names every upstream: drop --upstream-url and --dialect (or "
            "drop --routes for a single upstream)"
        )
    if args.allowed_models is not None:
        raise StartupError(
            f"--routes {path}: the allowed models are its [[models]] names; drop --allowed-models"
        )
    text = _read_file("routes", path)
    defaults = UpstreamSpec(
        name="",
        url="",
        dialect=dialect,
        connect_timeout=args.upstream_connect_timeout,
        first_byte_timeout=args.upstream_first_byte_timeout,
        read_timeout=args.upstream_read_timeout,
        retries=args.upstream_retries,
        breaker_failures=args.breaker_failures,
        breaker_cooldown=args.breaker_cooldown,
    )
    try:
        return parse_routes(text, path, defaults, tuple(DIALECTS), env, args.default_model)
    except RoutesError as exc:
        raise StartupError(str(exc)) from None


def _read_file(flag: str, path: str) -> str:
    """The UTF-8 text of the file a flag names; one line (StartupError) when it cannot be
    read."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise StartupError(f"--{flag} {path}: cannot read it ({reason})") from None


def _prices(path: str) -> PriceTable:
    """The table of `--prices FILE`; a file that cannot be read or used is one line."""
    text = _read_file("prices", path)
    try:
        return parse_prices(text, path)
    except PricesError as exc:
        raise StartupError(f"--prices {exc}") from None


def _window(text: str) -> int:
    """`--budget-window`: seconds, from `1d`, `12h`, `30m` or `45s`."""
    try:
        return parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_exposure(config: Config) -> None:
    """Refuse to serve an open gateway beyond this machine unless told so explicitly."""
    if config.auth_enabled or config.insecure_no_auth or is_loopback_host(config.host):
        return
    raise StartupError(
        f"refusing to listen on {config.host} without authentication: anyone who can reach it "
        "could spend the upstream key. Configure --auth-tokens-file or --jwt-secret-env / "
        "--jwt-public-key, or pass --insecure-no-auth."
    )
