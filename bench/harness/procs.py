"""The processes of a bench run: the mock upstream, the relay under test (the gateway or the
reference bridge) with its CPU time and memory, and how each is pinned to a core."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent
PYTHON = sys.executable
NODE = shutil.which("node") or "node"
GATEWAY_CORES = "0"
LOAD_CORES = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raise_fd_limit(want: int = 200_000) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (max(want, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(want, limit)), limit))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def taskset(cores: str | None, argv: list[str]) -> list[str]:
    if cores is None or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", cores, *argv]


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                resp.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


class Proc:
    """A child process that is stopped (SIGTERM, then SIGKILL) when the runner is done."""

    def __init__(self, argv: list[str], **kw: Any) -> None:
        self.argv = argv
        self.p = subprocess.Popen(argv, **kw)

    @property
    def pid(self) -> int:
        return self.p.pid

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Mock(Proc):
    def __init__(self) -> None:
        self.port = free_port()
        self.log = open(BENCH / "results" / ".mock.log", "w")  # noqa: SIM115
        super().__init__(
            taskset(LOAD_CORES, [PYTHON, str(BENCH / "mock_server.py"), "--port", str(self.port)]),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        wait_http(self.url + "/_mock/stats?records=0")

    def stats(self) -> Any:
        return get_json(self.url + "/_mock/stats")

    def reset(self) -> None:
        req = urllib.request.Request(self.url + "/_mock/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()


class Server(Proc):
    """A relay under test (the gateway or the reference bridge): its CPU time and memory."""

    url: str  # its WebSocket endpoint

    def pids(self) -> list[int]:
        return [self.pid]

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
        return total

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        return total


class Reference(Server):
    """bench/reference_bridge.py: the issue's straightforward websockets + aiohttp bridge."""

    def __init__(
        self, upstream: str, prefix: Sequence[str] = (), start_timeout: float = 20
    ) -> None:
        self.port = free_port()
        self.log = open(BENCH / "results" / ".gateway.log", "a")  # noqa: SIM115
        argv = [
            *prefix,
            PYTHON,
            str(BENCH / "reference_bridge.py"),
            "--port",
            str(self.port),
            "--upstream-url",
            upstream + "/openai",
        ]
        super().__init__(
            taskset(GATEWAY_CORES, argv), stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"
        wait_http(f"http://127.0.0.1:{self.port}/healthz", start_timeout)


class Gateway(Server):
    def __init__(
        self,
        upstream: str,
        *extra: str,
        cores: str | None = GATEWAY_CORES,
        workers: int = 1,
        prefix: Sequence[str] = (),
        start_timeout: float = 20,
    ) -> None:
        self.port = free_port()
        self.log = open(BENCH / "results" / ".gateway.log", "a")  # noqa: SIM115
        argv = [
            *prefix,
            PYTHON,
            "-m",
            "gateway",
            "serve",
            "--port",
            str(self.port),
            "--upstream-url",
            upstream + "/openai",
            "--log-format",
            "json",
            "--log-level",
            "warning",
            "--max-streams",
            "64",
            "--max-active-streams",
            "30000",
            "--workers",
            str(workers),
            *extra,
        ]
        super().__init__(taskset(cores, argv), stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"
        wait_http(f"http://127.0.0.1:{self.port}/healthz", start_timeout)
        self.workers = workers
        if workers > 1:
            deadline = time.monotonic() + 10
            while len(self.pids()) < workers + 1 and time.monotonic() < deadline:
                time.sleep(0.05)

    def pids(self) -> list[int]:
        """The server processes: the gateway itself and, with --workers, its children."""
        pids = [self.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
            pids += [int(c) for c in children]
        return pids

    def metrics(self, name: str) -> dict[str, float]:
        """One metric family from GET /metrics, keyed by suffix and labels (`_sum`, `_count`)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(name):
                key, _, value = line[len(name) :].rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[key] = float(value)
        return out


@contextlib.contextmanager
def running(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for p in reversed(procs):
            p.stop()
