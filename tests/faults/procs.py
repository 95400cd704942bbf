"""The real processes under test: the mock upstream and gateways, started as `python -m gateway`.

Both write their output to files in a work directory, never to pipes: a pipe nobody drains
blocks the child once it holds 64 KiB (a thousand-run scenario logs far more), and the files
stay behind for a post-mortem when a scenario fails. Readiness is read from those files: the
mock prints "mock upstream listening on URL" on stdout, a gateway logs the JSON event
`gateway.listening` (with its ws:// `url`) on stderr.

Nothing here blocks the event loop for long: polls sleep with `asyncio.sleep`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import aiohttp
import orjson

#: How long a process may take to say it is listening (imports alone take ~0.5 s here).
START_TIMEOUT = 15.0
POLL = 0.02
_MOCK_READY = re.compile(r"mock upstream listening on (http://\S+)")


class ProcessError(RuntimeError):
    """A process did not start, or died, in a way the suite cannot work around."""


#: Settings of the test runner that must not reach the processes under test: `make test` runs
#: pytest with asyncio debug mode (slow, and it logs non-JSON warnings) and coverage.
_RUNNER_ONLY = ("PYTHONASYNCIODEBUG", "PYTHONDEVMODE", "PYTHONTRACEMALLOC", "COV_CORE_")


def child_env() -> dict[str, str]:
    """The environment for children: ours minus every GATEWAY_* setting, upstream key and
    test-runner setting, so that the flags the suite passes are the whole configuration and the
    processes run as they do in production."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GATEWAY_", *_RUNNER_ONLY)) and not k.endswith("_API_KEY")
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


@functools.cache
def serve_flags() -> frozenset[str]:
    """The flags `python -m gateway serve --help` lists (the CLI grows; see OPTIONAL_FLAGS)."""
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--help"],
        capture_output=True,
        text=True,
        env=child_env(),
        check=True,
        timeout=30,
    ).stdout
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", out))


#: The sockets that keep dead ports bound (closed when the test process exits).
_DEAD: list[socket.socket] = []
atexit.register(lambda: [sock.close() for sock in _DEAD])


def dead_port() -> int:
    """A loopback port nobody listens on: connects are refused.

    The port stays bound (not listening) until the test process ends. Released, it could be
    reused, even as the local port of the gateway's own connect to it: a TCP self-connect,
    which "answers" with the request itself (seen once: a `refused` run without retries).
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _DEAD.append(sock)
    port: int = sock.getsockname()[1]
    return port


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class _Child:
    """A started child process and the files its output goes to."""

    name: str
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    _files: list[IO[bytes]] = field(default_factory=list, repr=False)

    @classmethod
    def spawn(cls, name: str, argv: Sequence[str], workdir: Path) -> _Child:
        workdir.mkdir(parents=True, exist_ok=True)
        out_path, err_path = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
        out, err = out_path.open("wb"), err_path.open("wb")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=child_env(),
                start_new_session=True,  # a Ctrl-C of the suite is not delivered to it twice
            )
        except BaseException:
            out.close()
            err.close()
            raise
        return cls(name, proc, out_path, err_path, [out, err])

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def describe_death(self) -> str:
        return (
            f"{self.name} exited with {self.proc.returncode}; stderr tail:\n"
            f"{_tail(self.stderr_path)}"
        )

    async def wait(self, timeout: float) -> int | None:
        """The exit status, or None if the process still runs after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        # Polling is the way to wait for a Popen without a child watcher or a thread.
        while (code := self.proc.poll()) is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(POLL)
        return code

    def wait_blocking(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL and reap (last resort; the caller reports why it was needed)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close_files(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()


class MockProcess:
    """`python -m gateway mock-upstream --delay-ms 0` on a free port.

    Synchronous start/stop so that a pytest module-scoped fixture (no event loop) can own it;
    the suite observes it over HTTP (`GET /_mock/stats`) like any other process would.
    """

    def __init__(self, child: _Child, base_url: str) -> None:
        self._child = child
        self.base_url = base_url

    @classmethod
    def start(cls, workdir: Path) -> MockProcess:
        argv = [
            sys.executable,
            "-m",
            "gateway",
            "mock-upstream",
            "--port",
            "0",
            "--delay-ms",
            "0",
        ]
        child = _Child.spawn("mock-upstream", argv, workdir)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = _MOCK_READY.search(child.stdout_path.read_text(errors="replace"))
            if match:
                return cls(child, match[1])
            if child.returncode is not None:
                child.close_files()
                raise ProcessError(child.describe_death())
            time.sleep(POLL)
        child.kill()
        child.close_files()
        raise ProcessError(f"the mock upstream did not start in {START_TIMEOUT} s")

    @property
    def port(self) -> int:
        port = urlsplit(self.base_url).port
        assert port is not None
        return port

    def url(self, route: str) -> str:
        return self.base_url + route

    def alive(self) -> bool:
        return self._child.returncode is None

    async def stats(self, http: aiohttp.ClientSession, tag: str | None = None) -> dict[str, Any]:
        """Counters (and, with `tag`, that tag's request records) from /_mock/stats."""
        query = f"?tag={tag}" if tag is not None else "?records=0"
        async with http.get(self.base_url + "/_mock/stats" + query) as resp:
            resp.raise_for_status()
            stats: dict[str, Any] = orjson.loads(await resp.read())
            return stats

    def stop(self) -> int | None:
        """SIGINT (the command's clean exit) then reap; SIGKILL if it will not go."""
        if self._child.returncode is None:
            self._child.proc.send_signal(signal.SIGINT)
        code = self._child.wait_blocking(5.0)
        if code is None:
            self._child.kill()
        self._child.close_files()
        return code


class Metrics:
    """One scrape of the gateway's Prometheus text: series by name, summed over labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.series: dict[str, list[tuple[dict[str, str], float]]] = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                # A declared family exists (and sums to 0) before its first labelled sample.
                _, _, name, kind = line.split(maxsplit=3)
                if kind == "counter" and not name.endswith("_total"):
                    name += "_total"  # older exposition formats name the family without it
                self.series.setdefault(name, [])
                continue
            if not line or line.startswith("#"):
                continue
            name_part, _, value = line.rpartition(" ")
            name, _, labels = name_part.partition("{")
            parsed = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
            self.series.setdefault(name, []).append((parsed, float(value)))

    def has(self, name: str) -> bool:
        return name in self.series

    def get(self, name: str, **labels: str) -> float:
        """The sum of `name` over the series matching `labels` (NaN when it is missing)."""
        if name not in self.series:
            return float("nan")
        return sum(
            v for ls, v in self.series[name] if all(ls.get(k) == w for k, w in labels.items())
        )

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for ls, v in self.series.get(name, []):
            out[ls.get(label, "")] = out.get(ls.get(label, ""), 0.0) + v
        return out


class PendingGateway:
    """A gateway process that was spawned but may not listen yet."""

    def __init__(self, child: _Child) -> None:
        self._child = child
        self.spawned_at = time.monotonic()

    async def ready(self) -> GatewayProcess:
        """Wait for its `gateway.listening` log line (ProcessError if it dies or is slow)."""
        child = self._child
        # A prefetched gateway may have been ready for a while: look before the deadline.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for event in _events(child.stderr_path):
                if event.get("event") == "gateway.listening":
                    return GatewayProcess(child, str(event["url"]))
            if child.returncode is not None:
                child.close_files()
                raise ProcessError(child.describe_death())
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL)
        self.discard()
        raise ProcessError(f"{child.name} did not log gateway.listening in {START_TIMEOUT} s")

    def discard(self) -> None:
        """Kill it unused (a prefetched gateway whose scenario did not run)."""
        self._child.kill()
        self._child.close_files()


class GatewayProcess:
    """`python -m gateway serve --port 0 --log-format json ...` in front of some upstream URL."""

    def __init__(self, child: _Child, ws_url: str) -> None:
        self._child = child
        self.ws_url = ws_url
        parts = urlsplit(ws_url)
        assert parts.hostname is not None
        assert parts.port is not None
        self.host, self.port = parts.hostname, parts.port
        self.http_url = f"http://{self.host}:{self.port}"
        self.exit_code: int | None = None

    @classmethod
    async def start(
        cls, name: str, upstream_url: str, flags: Sequence[str], workdir: Path
    ) -> GatewayProcess:
        """Spawn a gateway and wait until it listens."""
        return await cls.spawn(name, upstream_url, flags, workdir).ready()

    @staticmethod
    def spawn(name: str, upstream_url: str, flags: Sequence[str], workdir: Path) -> PendingGateway:
        """Start the process without waiting: its imports (~0.5 s of CPU) can overlap with
        other work. `await pending.ready()` for the running gateway."""
        argv = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-format",
            "json",
            "--log-level",
            "info",
            "--upstream-url",
            upstream_url,
            *flags,
        ]
        return PendingGateway(_Child.spawn(name, argv, workdir))

    @property
    def pid(self) -> int:
        return self._child.proc.pid

    @property
    def log_path(self) -> Path:
        return self._child.stderr_path

    def alive(self) -> bool:
        return self._child.returncode is None

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (non-JSON lines, e.g. a raw traceback, as `raw`)."""
        return list(_events(self._child.stderr_path, keep_raw=True))

    async def metrics(self, http: aiohttp.ClientSession) -> Metrics:
        async with http.get(self.http_url + "/metrics") as resp:
            resp.raise_for_status()
            return Metrics(await resp.text())

    async def get(self, http: aiohttp.ClientSession, path: str) -> int:
        """The HTTP status of GET `path` on the gateway's port."""
        async with http.get(self.http_url + path) as resp:
            await resp.read()
            return resp.status

    def signal(self, sig: signal.Signals) -> None:
        if self._child.returncode is None:
            self._child.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int | None:
        code = await self._child.wait(timeout)
        if code is not None:
            self.exit_code = code
            self._child.close_files()
        return code

    async def stop(self, timeout: float = 10.0) -> tuple[int | None, bool]:
        """SIGTERM and wait; (exit status, whether SIGKILL was needed)."""
        if self._child.returncode is not None:
            return await self.wait(0), False
        self.signal(signal.SIGTERM)
        code = await self.wait(timeout)
        if code is not None:
            return code, False
        self._child.kill()
        self._child.close_files()
        self.exit_code = self._child.returncode
        return self.exit_code, True


def _events(path: Path, keep_raw: bool = False) -> Iterator[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except OSError:
        return
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            if keep_raw:
                yield {"event": "raw", "raw": line.decode(errors="replace")}
            continue
        if isinstance(obj, dict):
            yield obj


@contextlib.asynccontextmanager
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client for scrapes: a fresh connection per request (the gateway closes each
    HTTP answer's connection anyway) and short timeouts, so a wedged server fails fast."""
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session
