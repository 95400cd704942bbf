"""Command line: `python -m gateway serve|mock-upstream` (a contract: tools start us like this)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Final, NoReturn
from urllib.parse import urlsplit, urlunsplit

import structlog

from gateway import __version__
from gateway.auth import TokenAuthenticator, TokensFileError
from gateway.config import (
    EXIT_MISCONFIGURED,
    METRICS_DIR_ENV,
    Config,
    StartupError,
    add_serve_arguments,
    check_exposure,
    config_from_args,
    listen_failed,
    port_number,
)
from gateway.memory import tune_gc
from gateway.observability import configure_logging

log = structlog.get_logger("gateway")

#: Exit status after a second SIGINT/SIGTERM cut the drain short.
EXIT_FORCED = 130
#: prctl(2) option: the signal a process gets when its parent dies.
PR_SET_PDEATHSIG: Final = 1
#: A worker that dies on its own within this many seconds of its start failed fast.
FAST_EXIT_S: Final = 10.0
#: After this many fast failures in a row of one worker, the supervisor stops them all and
#: exits 1: a crash loop is for the orchestrator (and a human) to see, not to hide.
MAX_FAST_EXITS: Final = 5


def restart_delay(fast_exits: int) -> float:
    """How long to wait before restarting a worker that died on its own: at once after a long
    life, then 0.1 s doubling (to at most 5 s) while it keeps failing fast."""
    return 0.0 if fast_exits <= 0 else min(5.0, 0.1 * 2 ** (fast_exits - 1))


#: How the command names itself in usage and error lines.
PROG: Final = "python -m gateway"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are the usage on one line and the error: `serve`'s whole usage is
    some 50 lines, which buried the one that says what is wrong."""

    def error(self, message: str) -> NoReturn:
        usage = self.format_usage().strip()
        if "\n" in usage:
            usage = f"usage: {self.prog} [-h] [OPTION ...]  (--help lists them)"
        self.exit(EXIT_MISCONFIGURED, f"{usage}\n{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="WebSocket bridge gateway for streamed LLM answers (protocol v1 at /v1/ws).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Every flag can also be set with its GATEWAY_<NAME> env var. "
        "With no upstream URL and no API key, the built-in mock upstream answers (offline demo).",
    )
    add_serve_arguments(serve, os.environ)
    mock = sub.add_parser(
        "mock-upstream",
        help="run the built-in mock upstream alone",
        description="Serve the mock LLM upstream in every dialect: POST /perplexity, /openai, "
        "/events, /anthropic, /openai-responses, /perplexity-agent, "
        "/gemini/models/{model}:streamGenerateContent (and /chat/completions, "
        "/v1/chat/completions, /v1/messages, /v1/responses); knobs via [[mock ...]] in the "
        "prompt.",
    )
    mock.add_argument("--host", default="127.0.0.1", help="interface (default: %(default)s)")
    mock.add_argument(
        "--port", type=port_number, default=8081, help="TCP port (default: %(default)s)"
    )
    mock.add_argument(
        "--delay-ms",
        type=float,
        default=35.0,
        help="default pause between words, ms (default: %(default)s)",
    )
    mock.add_argument(
        "--transcripts",
        metavar="DIR",
        default=None,
        help="directory of recorded streams that [[mock transcript=NAME]] replays "
        "(default: none, the knob is refused)",
    )
    return parser


def _redact(url: str) -> str:
    """A URL safe to log: no userinfo, no query string."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


async def serve(config: Config) -> None:
    """Run the gateway (and the mock upstream when none is configured) until SIGINT/SIGTERM."""
    from gateway.io.server import Gateway
    from gateway.mock import MockUpstream

    # Signal handlers first: a SIGTERM during startup, or just after "gateway.listening" (a
    # supervisor or Kubernetes may send one at any time), must drain, not kill outright.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    gateway: Gateway | None = None

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            # A second signal: the operator does not want to wait for the drain.
            log.warning("gateway.forced_exit", signal=sig.name)
            os._exit(EXIT_FORCED)
        log.info("gateway.signal", signal=sig.name)
        stop.set()

    def on_hangup() -> None:
        if gateway is not None:
            gateway.reload_tokens()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    mock: MockUpstream | None = None
    listening = False
    # Nothing is logged before the gateway listens: a misconfiguration found on the way
    # (StartupError) is then the only line, and whatever was opened is closed again.
    try:
        url = config.upstream_url
        if url is None and config.routes is not None:
            url = ""  # every upstream is the routes file's
        elif url is None:
            mock = MockUpstream(default_delay_ms=config.mock_delay_ms)
            url = f"{await mock.start('127.0.0.1', 0)}/{config.dialect}"
        gateway = Gateway(config, url)
        try:
            await gateway.start()
            listening = True
            tune_gc()
            if mock is not None:
                log.warning(
                    "upstream.simulated",
                    message=f"no {config.api_key_env} and no --upstream-url: answers are "
                    "SIMULATED by the built-in mock upstream",
                    mock_url=url,
                )
            metrics = gateway.metrics_listener
            upstream: dict[str, object]
            if config.routes is not None:
                upstream = {
                    "routes": config.routes_file,
                    "upstreams": {
                        name: f"{spec.dialect} {_redact(spec.url)}"
                        for name, spec in config.routes.upstreams.items()
                    },
                    "models": list(config.routes.models),
                }
            else:
                upstream = {
                    "upstream": _redact(url),
                    "dialect": config.dialect,
                    "api_key": "set" if config.api_key else "not set",
                }
            budgets = gateway.accounting.default
            log.info(
                "gateway.listening",
                url=f"{gateway.scheme}://{config.host}:{gateway.port}/v1/ws",
                auth="on" if gateway.auth.enabled else "off",
                **upstream,
                prices=config.prices_file,
                budget={
                    "tokens": budgets.tokens,
                    "cost": budgets.cost,
                    "window": config.budget_window,
                }
                if budgets.limited
                else None,
                usage="shared (redis)" if config.redis_url else "per process",
                metrics=f"http://{config.host}:{metrics.port if metrics else gateway.port}/metrics",
            )
            await stop.wait()
            await gateway.drain()
        finally:
            await gateway.stop()  # after a failed start too: the upstream session, Redis
    finally:
        if mock is not None:
            await mock.stop()
        if listening:
            log.info("gateway.stopped")


#: The oldest uvloop the gateway runs on. 0.21 and 0.22 abort or crash the process now and then
#: when connections close while others are being opened (libuv asserts; uvloop#706), as the
#: `cancel-race` fault scenario does: about one run in eight here, none in 80 on 0.23.
UVLOOP_MIN: Final = (0, 23)


def uvloop_usable(version: str) -> bool:
    """Whether this uvloop release is one the gateway runs on (see UVLOOP_MIN)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return match is not None and (int(match[1]), int(match[2])) >= UVLOOP_MIN


def run(config: Config) -> None:
    """Run one gateway process on the chosen event loop: uvloop when installed and recent
    enough (`auto`), asyncio otherwise; `--loop uvloop` refuses to start on an old one."""
    if config.loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if config.loop == "uvloop":
                raise StartupError(
                    "--loop uvloop: uvloop is not installed; pip install uvloop or use "
                    "--loop asyncio"
                ) from None
        else:
            version = importlib.metadata.version("uvloop")
            if uvloop_usable(version):
                uvloop.run(serve(config))
                return
            wanted = ".".join(map(str, UVLOOP_MIN))
            if config.loop == "uvloop":
                raise StartupError(
                    f"--loop uvloop: uvloop {version} can abort the process when connections "
                    f"close (fixed in {wanted}); upgrade it or use --loop asyncio"
                )
            log.warning(
                "gateway.uvloop_too_old",
                version=version,
                minimum=wanted,
                message="running on asyncio: this uvloop can abort the process when "
                "connections close; upgrade it for uvloop's speed",
            )
    asyncio.run(serve(config))


def run_workers(config: Config) -> int:
    """--workers N: fork N single-loop processes sharing the port (SO_REUSEPORT).

    The parent only supervises: it forwards SIGINT/SIGTERM/SIGHUP to every worker (each then
    drains on its own) and exits 0 when all of them did. The workers share their metrics
    through prometheus-client's multiprocess files (gateway/metrics.py), so any worker's
    /metrics answers for all of them; the parent sets the directory up before the fork, tells
    prometheus-client when a worker is gone, and removes a directory it made.
    """
    check_port("--port", config.host, config.port)
    if config.metrics_port is not None:
        check_port("--metrics-port", config.host, config.metrics_port)
    if config.redis_url is None:
        log.warning(
            "gateway.workers_without_redis",
            message="with several workers, a resume reaches the worker that owns the stream "
            "only by chance, and each worker counts usage and budgets alone (a principal may "
            "spend up to N budgets); set --redis-url to share them",
        )
    own_dir = None
    if not os.environ.get(METRICS_DIR_ENV):
        own_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ[METRICS_DIR_ENV] = own_dir
    try:
        return _supervise(config)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def check_port(flag: str, host: str, port: int) -> None:
    """Refuse (StartupError) a port the workers could not listen on: bound with SO_REUSEPORT as
    they bind it, so that another gateway's workers do not count, but a port held by any other
    process does. Checked once before the fork: a worker that cannot listen is otherwise
    restarted until the crash loop ends the supervisor, with one error per attempt."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise listen_failed(flag, host, port, exc) from None
    for family, kind, proto, _name, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # as asyncio's create_server binds it
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise listen_failed(flag, host, port, exc) from None


def _supervise(config: Config) -> int:
    """Fork the workers, restart any that dies on its own (with a backoff while it keeps
    failing fast), and on SIGINT/SIGTERM/SIGHUP pass the signal on and wait for all of them."""
    parent = os.getpid()
    workers: dict[int, tuple[int, float]] = {}  # pid -> (index, monotonic start)
    stopping = False

    def start(index: int) -> int:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                _die_with(parent)
                structlog.contextvars.bind_contextvars(worker=index)
                run(config)
                code = 0
            except StartupError as exc:  # the port taken, Redis unreachable: one line
                code = refuse("serve", exc)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        workers[pid] = (index, time.monotonic())
        return pid

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig != signal.SIGHUP:  # SIGHUP reloads the token file; the others drain
            stopping = True
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for index in range(config.workers):
        start(index)
    log.info("gateway.workers", workers=config.workers, pids=list(workers))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    status = 0
    fast_exits = [0] * config.workers
    while workers:
        try:
            pid, wait_status = os.wait()
        except InterruptedError:
            continue
        except ChildProcessError:  # pragma: no cover - every child was reaped already
            break
        entry = workers.pop(pid, None)
        if entry is None:
            continue
        _mark_dead(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            status = status or code
            continue
        index, started = entry
        lived = time.monotonic() - started
        fast_exits[index] = fast_exits[index] + 1 if lived < FAST_EXIT_S else 0
        log.error(
            "gateway.worker_exited", worker=index, pid=pid, code=code, lived_s=round(lived, 2)
        )
        if fast_exits[index] >= MAX_FAST_EXITS:
            log.error("gateway.workers_crash_loop", worker=index, fast_exits=fast_exits[index])
            status = 1
            forward(signal.SIGTERM, None)
            continue
        deadline = time.monotonic() + restart_delay(fast_exits[index])
        while not stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        if stopping:
            continue
        new = start(index)
        if stopping:  # a stop signal came while it was forked: it must not be missed
            with contextlib.suppress(ProcessLookupError):
                os.kill(new, signal.SIGTERM)
        log.info("gateway.worker_restarted", worker=index, pid=new)
    return status


def _die_with(parent: int) -> None:
    """Have this worker receive SIGTERM (and drain) when its supervisor dies, even by SIGKILL
    or the OOM killer: no orphaned workers left serving the port unsupervised (Linux; elsewhere
    a worker outlives a killed supervisor)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _mark_dead(pid: int) -> None:
    """Drop a finished worker's live gauges from the shared metrics (its counters stay)."""
    from prometheus_client import multiprocess  # after the fork: the workers' own import counts

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]  # untyped module


def check_files(config: Config) -> None:
    """Refuse (StartupError) a file the configuration names that cannot be read or used: the
    tokens file (each line is checked), the JWT public key, the TLS certificate and key. Done
    before anything starts, and before --workers forks, so that it is one line, not one per
    worker and restart. (The gateway reads them again when it starts.)"""
    for flag, path, what in (
        ("--jwt-public-key", config.jwt_public_key, "the PEM public key"),
        ("--tls-cert", config.tls_cert, "the PEM certificate chain"),
        ("--tls-key", config.tls_key, "its PEM private key"),
    ):
        if path is not None:
            try:
                Path(path).read_bytes()
            except OSError as exc:
                raise StartupError(
                    f"{flag} {path}: cannot read it ({exc.strerror}); give the path of {what}"
                ) from None
    if config.auth_tokens_file is not None:
        try:
            TokenAuthenticator(Path(config.auth_tokens_file))
        except TokensFileError as exc:
            raise StartupError(str(exc)) from None
    if config.tls_cert is not None and config.tls_key is not None:
        _check_tls(config.tls_cert, config.tls_key)


def _check_tls(cert: str, key: str) -> None:
    """Refuse a TLS certificate and key that do not load, saying which file is wrong."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        try:  # OpenSSL says "PEM lib" for either file: is it the certificate?
            ssl.create_default_context().load_verify_locations(cafile=cert)
        except ssl.SSLError:
            problem = f"--tls-cert {cert}: no PEM certificate in it"
        else:
            if exc.reason == "KEY_VALUES_MISMATCH":
                problem = f"--tls-key {key} is not the private key of --tls-cert {cert}"
            else:
                problem = f"--tls-key {key}: no (unencrypted) PEM private key in it"
        raise StartupError(
            f"{problem}; give the PEM certificate chain and its private key"
        ) from None


def refuse(command: str, exc: StartupError) -> int:
    """Print a startup misconfiguration as its one line; the exit status."""
    print(f"{PROG} {command}: error: {exc}", file=sys.stderr, flush=True)
    return EXIT_MISCONFIGURED


def serve_mock(host: str, port: int, delay_ms: float, transcripts: str | None = None) -> None:
    """`mock-upstream`: serve until SIGINT; a port that cannot be listened on, or a
    --transcripts that is not a directory, is a StartupError."""
    from gateway.mock import serve_forever

    if transcripts is not None and not os.path.isdir(transcripts):
        raise StartupError(f"--transcripts {transcripts}: not a directory; fix the path")

    configure_logging("console" if sys.stderr.isatty() else "json", "info")
    listening = False

    def on_ready(_url: str) -> None:
        nonlocal listening
        listening = True

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(
                serve_forever(host, port, delay_ms, on_ready=on_ready, transcripts_dir=transcripts)
            )
    except OSError as exc:
        if listening:
            raise
        raise listen_failed("--port", host, port, exc) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Every startup misconfiguration ends here as one line on stderr and exit status 2 (a bad
    flag: argparse's usage line, then the error)."""
    try:
        args = build_parser().parse_args(argv)
    except StartupError as exc:  # a bad GATEWAY_ variable: only `serve` reads them
        return refuse("serve", exc)
    try:
        if args.command == "serve":
            config = config_from_args(args)
            check_files(config)
            check_exposure(config)
            configure_logging(config.log_format, config.log_level)
            if config.workers > 1:
                return run_workers(config)
            run(config)
        else:
            serve_mock(args.host, args.port, args.delay_ms, args.transcripts)
    except StartupError as exc:
        return refuse(args.command, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
