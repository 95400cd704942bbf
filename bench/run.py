"""`make bench`: measure the gateway against its performance targets (issue 4).

    .venv/bin/python bench/run.py                      # every scenario, full size
    BENCH_QUICK=1 .venv/bin/python bench/run.py        # every scenario, briefly (smoke test)
    .venv/bin/python bench/run.py --only throughput,cancel --repeats 3

Layout on a 2-core machine: the gateway is pinned to core 0 (`taskset -c 0`), the mock upstream
(fast mode, `[[mock fast=1 ...]]`) and the Node load generators (bench/loadgen.js) to core 1.
The `--workers 2` row gives the gateway both cores (the load shares core 1 with it then).

Every scenario runs `--repeats` times; the table shows the median and the min..max spread, the
target and a verdict (by how much a missed target is missed). It is printed and written to
bench/results/<YYYY-MM-DD>.md (BENCH_QUICK runs write <date>-quick.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable
NODE = shutil.which("node") or "node"
GATEWAY_CORES = "0"
LOAD_CORES = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
#: Warm-up streams last two seconds (two chunks at 0.5/s), so that N staggered ones hold N
#: upstream connections at once: the pools (the gateway's, the direct client's keep-alive agent)
#: then have as many connections as the measured streams, which do not all connect at once
#: (the mock's listen backlog is aiohttp's 128; an overflow costs SYN retransmits or resets).
WARM_PROMPT = "[[mock fast=1 chunks=2 rate=0.5]] warm-up"
#: In run order. Memory goes last: churning 40,000 sockets leaves the kernel busy for a while
#: (TIME_WAIT, freed buffers), which showed up as noise in the CPU scenario run right after it.
SCENARIOS = (
    "throughput",
    "ceiling",
    "latency",
    "ttfc",
    "cancel",
    "cpu",
    "reference",
    "instructions",
    "workers",
    "memory",
)


# ------------------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class Sizes:
    repeats: int
    tp_sockets: int = 50
    tp_streams: int = 2
    tp_chunks: int = 2000
    lat_sockets: int = 200
    lat_streams: int = 5
    lat_seconds: float = 5.0
    ttfc_rounds: int = 300
    cancel_streams: int = 500
    cancel_rounds: int = 200
    mem_small: int = 1000
    mem_large: int = 20_000
    mem_repeats: int = 2
    active_streams: int = 1000
    cpu_streams: int = 200
    cpu_seconds: float = 6.0
    #: Instructions (callgrind): streams, and chunks per stream in the shorter of two runs.
    ir_streams: int = 10
    ir_chunks: int = 100


FULL = Sizes(repeats=5)
QUICK = Sizes(
    repeats=1,
    tp_sockets=10,
    tp_streams=2,
    tp_chunks=500,
    lat_sockets=20,
    lat_streams=5,
    lat_seconds=1.0,
    ttfc_rounds=30,
    cancel_streams=50,
    cancel_rounds=20,
    mem_small=100,
    mem_large=1000,
    mem_repeats=1,
    active_streams=100,
    cpu_streams=50,
    cpu_seconds=1.0,
    ir_streams=5,
    ir_chunks=20,
)


# ------------------------------------------------------------------------------ processes


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
        self.log = open(HERE / "results" / ".mock.log", "w")  # noqa: SIM115
        super().__init__(
            taskset(LOAD_CORES, [PYTHON, str(HERE / "mock_server.py"), "--port", str(self.port)]),
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
        self.log = open(HERE / "results" / ".gateway.log", "a")  # noqa: SIM115
        argv = [
            *prefix,
            PYTHON,
            str(HERE / "reference_bridge.py"),
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
        self.log = open(HERE / "results" / ".gateway.log", "a")  # noqa: SIM115
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


class Load:
    """`procs` Node load generators sharing one config (sockets are split between them)."""

    def __init__(self, cfg: dict[str, Any], procs: int = 1, cores: str | None = LOAD_CORES):
        self.procs: list[Proc] = []
        sockets = cfg["sockets"]
        for i in range(procs):
            share = sockets // procs + (1 if i < sockets % procs else 0)
            if share == 0:
                continue
            part = dict(cfg, sockets=share, tag_prefix=f"{cfg.get('tag_prefix', 'b')}{i}-")
            argv = taskset(cores, [NODE, str(HERE / "loadgen.js"), json.dumps(part)])
            self.procs.append(
                Proc(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE)
            )
        self.ready = [self._expect(p, "ready") for p in self.procs]

    def _expect(self, proc: Proc, event: str) -> dict[str, Any]:
        assert proc.p.stdout is not None
        while True:
            line = proc.p.stdout.readline()
            if not line:
                raise RuntimeError(f"load generator exited before {event!r}: {proc.argv[-1]}")
            msg: dict[str, Any] = json.loads(line)
            if msg.get("event") == event:
                return msg
            if msg.get("event") == "result":  # failed early
                raise RuntimeError(f"load generator failed: {msg.get('errors')}")

    def send(self, word: str) -> None:
        for p in self.procs:
            assert p.p.stdin is not None
            p.p.stdin.write(word + "\n")
            p.p.stdin.flush()

    def wait(self, event: str) -> None:
        for p in self.procs:
            self._expect(p, event)

    def results(self) -> dict[str, Any]:
        parts = [self._expect(p, "result") for p in self.procs]
        for p in self.procs:
            p.p.wait(30)
        merged: dict[str, Any] = {"parts": len(parts)}
        for key in ("streams_ok", "streams_failed", "cancelled", "upstream_chunks", "frames"):
            merged[key] = sum(r.get(key, 0) for r in parts)
        for key in ("bytes", "open_failed", "open_retried", "cpu_s"):
            merged[key] = sum(r.get(key, 0) for r in parts)
        merged["elapsed_s"] = max(r.get("elapsed_s", 0) for r in parts)
        for key in ("latency_us", "ttfc_us", "cancel_us"):
            merged[key] = [x for r in parts for x in r.get(key, [])]
        merged["cancel_sent_ns"] = {k: v for r in parts for k, v in r["cancel_sent_ns"].items()}
        merged["errors"] = [e for r in parts for e in r.get("errors", [])][:10]
        return merged

    def run(self) -> dict[str, Any]:
        self.send("go")
        return self.results()

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


@contextlib.contextmanager
def running(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for p in reversed(procs):
            p.stop()


def check(result: dict[str, Any], what: str) -> None:
    """Every stream of a scenario must have passed its checks; otherwise the run is invalid."""
    if result["streams_failed"] or result["open_failed"]:
        raise RuntimeError(
            f"{what}: {result['streams_failed']} streams failed, {result['open_failed']} "
            f"sockets failed to open: {result['errors']}"
        )


# ------------------------------------------------------------------------------ stats


def core_times() -> dict[str, tuple[int, int]]:
    """Per core ("cpu0", ...): (steal, total) clock ticks so far, from /proc/stat."""
    out: dict[str, tuple[int, int]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(v) for v in values[:8]]  # user .. steal
                out[name] = (ticks[7] if len(ticks) > 7 else 0, sum(ticks))
    return out


def steal_shares(before: dict[str, tuple[int, int]]) -> str:
    """The share of each core's time the hypervisor gave to other guests since `before`:
    on a VM, time a busy process waits without running, which inflates latency tails."""
    parts = []
    for name, (steal, total) in core_times().items():
        steal0, total0 = before.get(name, (0, 0))
        if total > total0:
            parts.append(f"core {name[3:]} {100 * (steal - steal0) / (total - total0):.0f}%")
    return ", ".join(parts) or "n/a"


def pct(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


@dataclass
class Row:
    scenario: str
    metric: str
    unit: str
    samples: list[float] = field(default_factory=list)
    #: (comparison, bound, how the bound was derived) or None for informational rows.
    target: tuple[str, float, str] | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    def verdict(self) -> str:
        if self.target is None or not self.samples:
            return ""
        op, bound, _ = self.target
        value = self.median
        ok = value >= bound if op == ">=" else value <= bound
        if ok:
            return "PASS"
        if op == ">=":
            return f"MISS by {(1 - value / bound) * 100:.0f}% ({value / bound:.2f}x of target)"
        return f"MISS by {(value / bound - 1) * 100:.0f}% ({value / bound:.2f}x the bound)"

    def cells(self) -> list[str]:
        if self.samples:
            lo, hi = min(self.samples), max(self.samples)
            spread = f"{fmt(lo)} .. {fmt(hi)}" if len(self.samples) > 1 else "(1 run)"
            median = fmt(self.median)
        else:
            median, spread = "n/a", ""
        target = ""
        if self.target is not None:
            op, bound, how = self.target
            target = f"{'≥' if op == '>=' else '≤'} {fmt(bound)}" + (f" ({how})" if how else "")
        return [
            self.scenario,
            self.metric,
            f"{median} {self.unit}".strip(),
            spread,
            target,
            self.verdict(),
            self.note,
        ]


def fmt(x: float) -> str:
    if x != x:  # nan
        return "n/a"
    if abs(x) >= 10_000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


# ------------------------------------------------------------------------------ scenarios


class Bench:
    def __init__(self, sizes: Sizes, quick: bool, log: Callable[[str], None]) -> None:
        self.s = sizes
        self.quick = quick
        self.log = log
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.tp_median: float | None = None
        self.tp_per_cpu: float | None = None
        self.failed: list[str] = []

    def row(self, *args: Any, **kw: Any) -> Row:
        row = Row(*args, **kw)
        self.rows.append(row)
        return row

    # 1. throughput and 7. ceiling ---------------------------------------------------------

    def _throughput_cfg(self, mode: str, url: str) -> dict[str, Any]:
        s = self.s
        return {
            "mode": mode,
            "url": url,
            "sockets": s.tp_sockets,
            "streams": s.tp_streams,
            "chunks": s.tp_chunks,
            "prompt": f"[[mock fast=1 chunks={s.tp_chunks}]] bench throughput",
        }

    def throughput(self, mock: Mock, workers: int = 1) -> list[float]:
        s = self.s
        rate: list[float] = []
        per_cpu: list[float] = []
        cores = GATEWAY_CORES if workers == 1 else f"{GATEWAY_CORES},{LOAD_CORES}"
        gw = Gateway(mock.url, cores=cores, workers=workers)
        with running(gw):
            self._warmup(gw)
            for i in range(s.repeats):
                load = Load(self._throughput_cfg("ws", gw.url))
                cpu0 = gw.cpu_seconds()
                r = load.run()
                cpu = gw.cpu_seconds() - cpu0
                check(r, "throughput")
                rate.append(r["upstream_chunks"] / r["elapsed_s"])
                per_cpu.append(r["upstream_chunks"] / cpu if cpu > 0 else float("nan"))
                self.log(
                    f"  throughput w{workers} #{i + 1}: {rate[-1]:,.0f} chunks/s, "
                    f"{r['frames']} frames, gateway cpu {cpu:.2f}s, load cpu {r['cpu_s']:.2f}s"
                )
        shape = f"{s.tp_sockets}x{s.tp_streams} streams x {s.tp_chunks} chunks"
        if workers == 1:
            self.tp_median = statistics.median(rate)
            self.tp_per_cpu = statistics.median(per_cpu)
            self.row(
                "1 throughput",
                f"upstream chunks relayed/s, 1 worker on 1 core ({shape})",
                "chunks/s",
                rate,
                (">=", 150_000, "per core"),
            )
            self.row(
                "1 throughput",
                "upstream chunks per gateway CPU-second",
                "chunks/cpu-s",
                per_cpu,
                note="wall rate / CPU used: shows whether the gateway core was saturated",
            )
        else:
            ratio = [x / self.tp_median for x in rate] if self.tp_median else []
            self.row(
                "8 workers",
                f"--workers 2 upstream chunks/s (both cores; load shares core {LOAD_CORES})",
                "chunks/s",
                rate,
            )
            self.row(
                "8 workers",
                "--workers 2 / 1 worker",
                "x",
                ratio,
                (">=", 1.8, ""),
                note="gateway on cores 0,1 while the mock and load generator also use core 1",
            )
            # Whether a worker does the same work per chunk as a lone gateway: if so, what
            # limits the row above is the cores the workers get, not the workers' design.
            self.row(
                "8 workers",
                "--workers 2 / 1 worker, upstream chunks per gateway CPU-second (all workers)",
                "x",
                [x / self.tp_per_cpu for x in per_cpu] if self.tp_per_cpu else [],
                note="near 1: two workers add little work per chunk (the row above lacks cores)",
            )
        return rate

    def ceiling(self, mock: Mock) -> None:
        s = self.s
        rate = []
        for i in range(s.repeats):
            load = Load(self._throughput_cfg("sse", mock.url + "/openai"))
            r = load.run()
            check(r, "ceiling")
            rate.append(r["upstream_chunks"] / r["elapsed_s"])
            self.log(
                f"  ceiling #{i + 1}: {rate[-1]:,.0f} chunks/s, load cpu {r['cpu_s']:.2f}s "
                f"of {r['elapsed_s']:.2f}s"
            )
        self.row(
            "7 ceiling",
            "load generator reading the mock directly (SSE), no gateway, all on core " + LOAD_CORES,
            "chunks/s",
            rate,
            note="what mock + load generator can do; the gateway rows cannot exceed it",
        )

    def _warmup(self, gw: Server, sockets: int = 4, streams: int = 2) -> None:
        """Load the gateway's code paths and open `sockets` x `streams` upstream connections."""
        load = Load(
            {
                "mode": "ws",
                "url": gw.url,
                "sockets": sockets,
                "streams": streams,
                "chunks": 2,
                "stagger_ms": 1000 if sockets * streams > 50 else 0,
                "prompt": WARM_PROMPT,
            }
        )
        check(load.run(), "warm-up")

    # 2. latency ---------------------------------------------------------------------------

    def latency(self, mock: Mock) -> None:
        s = self.s
        streams = s.lat_sockets * s.lat_streams
        for rate, factor in ((20, 1.5), (40, 2.0)):
            chunks = max(2, int(rate * s.lat_seconds))
            base = {
                "sockets": s.lat_sockets,
                "streams": s.lat_streams,
                "chunks": chunks,
                "stamps": True,
                "latency": True,
                "stagger_ms": 1000 / rate,
                "prompt": f"[[mock fast=1 chunks={chunks} rate={rate} stamp=1]] bench latency",
            }
            gw_p: dict[str, list[float]] = {"p50": [], "p99": [], "max": []}
            dr_p: dict[str, list[float]] = {"p50": [], "p99": [], "max": []}
            cpu_per: list[float] = []
            lag: list[float] = []
            gw = Gateway(mock.url)
            with running(gw):
                # Fill the gateway's upstream pool with as many connections as streams (opened
                # over a second: the mock's listen backlog is 128); the direct runs open theirs
                # before measuring too (warm_prompt).
                self._warmup(gw, s.lat_sockets, s.lat_streams)
                for i in range(s.repeats):
                    for mode, url, acc in (
                        ("sse", mock.url + "/openai", dr_p),
                        ("ws", gw.url, gw_p),
                    ):
                        load = Load(dict(base, mode=mode, url=url, warm_prompt=WARM_PROMPT))
                        cpu0 = gw.cpu_seconds()
                        lag0 = gw.metrics("gateway_event_loop_lag_seconds")
                        r = load.run()
                        check(r, f"latency {mode}")
                        if mode == "ws":
                            used = gw.cpu_seconds() - cpu0
                            cpu_per.append(used / r["upstream_chunks"] * 1e6)
                            lag1 = gw.metrics("gateway_event_loop_lag_seconds")
                            ticks = lag1.get("_count", 0) - lag0.get("_count", 0)
                            if ticks:
                                lag.append((lag1["_sum"] - lag0["_sum"]) / ticks * 1000)
                        lat = [x / 1000 for x in r["latency_us"]]
                        acc["p50"].append(pct(lat, 50))
                        acc["p99"].append(pct(lat, 99))
                        acc["max"].append(max(lat))
                        self.log(
                            f"  latency {rate}/s {mode} #{i + 1}: p50 {acc['p50'][-1]:.2f} "
                            f"p99 {acc['p99'][-1]:.2f} max {acc['max'][-1]:.2f} ms "
                            f"({len(lat)} chunks, load cpu {r['cpu_s']:.2f}s "
                            f"of {r['elapsed_s']:.2f}s)"
                        )
            label = f"{streams} streams x {rate} chunks/s"
            for key in ("p50", "p99", "max"):
                self.row("2 latency", f"{label}: direct (no gateway) {key}", "ms", dr_p[key])
            direct_p99 = statistics.median(dr_p["p99"])
            for key in ("p50", "p99", "max"):
                target = None
                if key == "p99":
                    target = ("<=", direct_p99 * factor, f"{factor}x direct p99")
                self.row("2 latency", f"{label}: through gateway {key}", "ms", gw_p[key], target)
            self.row(
                "2 latency",
                f"{label}: gateway event-loop lag, mean (gateway_event_loop_lag_seconds)",
                "ms",
                lag,
                note="how late the gateway's 0.25 s timer ran: a saturated loop shows here",
            )
            self.row(
                "2 latency",
                f"{label}: gateway CPU per chunk",
                "us",
                cpu_per,
                note="compare row 6: the busier the loop, the more chunks share each wakeup",
            )

    # 3. time to first chunk ---------------------------------------------------------------

    def ttfc(self, mock: Mock) -> None:
        """Streams one after another on one socket (each starts when the last has ended),
        through the gateway and directly, runs interleaved: idle, then again while the latency
        scenario's load (1,000 streams x 20 chunks/s) runs through the same gateway, which the
        issue asks for too ("also under that load"). Under load the direct probe shares the
        busy mock, so the difference is still the gateway's own part."""
        s = self.s
        probe = {
            "sockets": 1,
            "streams": 1,
            "rounds": s.ttfc_rounds,
            "warmup_rounds": max(1, s.ttfc_rounds // 10),
            "chunks": 1,
            "ttfc": True,
            "prompt": "[[mock fast=1 chunks=1]] bench ttfc",
        }
        streams = s.lat_sockets * s.lat_streams
        # Long enough for every loaded repeat (a probe pair takes up to 10 s): the load is
        # started once, as streams dropped with their socket run on for a resume.
        seconds = 20 + 15 * s.repeats
        background = {
            "mode": "ws",
            "sockets": s.lat_sockets,
            "streams": s.lat_streams,
            "hold": True,
            "stagger_ms": 50,
            "prompt": f"[[mock fast=1 chunks={20 * seconds} rate=20]] bench ttfc background",
        }
        gw = Gateway(mock.url)
        with running(gw):
            self._warmup(gw, s.lat_sockets, s.lat_streams)
            for loaded in (False, True):
                over50: list[float] = []
                over99: list[float] = []
                gw50: list[float] = []
                dr50: list[float] = []
                load = Load(dict(background, url=gw.url)) if loaded else None
                # Under load a first chunk takes ten times as long: fewer probes, so that the
                # background outlasts them.
                rounds = s.ttfc_rounds // 3 if loaded else s.ttfc_rounds
                try:
                    if load is not None:
                        load.send("go")
                        load.wait("active")
                    for i in range(s.repeats):
                        got = {}
                        for mode, url in (("sse", mock.url + "/openai"), ("ws", gw.url)):
                            r = Load(dict(probe, mode=mode, url=url, rounds=rounds)).run()
                            check(r, f"ttfc {mode}")
                            got[mode] = [x / 1000 for x in r["ttfc_us"]]
                        gw50.append(pct(got["ws"], 50))
                        dr50.append(pct(got["sse"], 50))
                        over50.append(gw50[-1] - dr50[-1])
                        over99.append(pct(got["ws"], 99) - pct(got["sse"], 99))
                        self.log(
                            f"  ttfc{' under load' if loaded else ''} #{i + 1}: gateway p50 "
                            f"{gw50[-1]:.3f} ms, direct p50 {dr50[-1]:.3f} ms, overhead p50 "
                            f"{over50[-1]:.3f} p99 {over99[-1]:.3f} ms"
                        )
                finally:
                    if load is not None:
                        load.send("stop")
                        bg = load.results()
                        check(bg, "ttfc background")
                if bg_ended := (load is not None and bg["streams_ok"] > 0):
                    self.notes.append("ttfc: the background load ended before the probes did")
                when = (
                    f"under load: {streams} streams x 20 chunks/s through the gateway; "
                    f"{rounds} probe streams"
                    if loaded
                    else f"idle; {s.ttfc_rounds} streams one after another on one socket"
                )
                self.row("3 ttfc", f"time to first chunk, direct p50 ({when})", "ms", dr50)
                self.row("3 ttfc", "time to first chunk, through gateway p50", "ms", gw50)
                self.row(
                    "3 ttfc",
                    f"gateway overhead p50 (gateway - direct){', under load' if loaded else ''}",
                    "ms",
                    over50,
                    ("<=", 0.3, ""),
                    note="load ended early" if bg_ended else "",
                )
                self.row(
                    "3 ttfc",
                    "gateway p99 - direct p99 (a difference of tails: negative when the direct "
                    "run had the worse one)",
                    "ms",
                    over99,
                )

    # 4. cancel ----------------------------------------------------------------------------

    def cancel(self, mock: Mock) -> None:
        """Two shapes: one stream at a time (the target: the cancel path itself, each close
        seen before the next stream starts), and 500 streams cancelled over one second, where
        the mock upstream and the load generator share core 1 and queue behind each other."""
        s = self.s
        quiet = {
            "mode": "ws",
            "sockets": 1,
            "streams": 1,
            "rounds": s.cancel_rounds,
            "round_gap_ms": 5,
            "cancel": True,
            "tag_prefix": "q",
            "prompt": "[[mock fast=1 chunks=1000 rate=20 tag={tag}]] bench cancel",
        }
        busy = dict(
            quiet, sockets=max(1, s.cancel_streams // 5), streams=5, rounds=1, stagger_ms=1000
        )
        del busy["round_gap_ms"]
        busy["tag_prefix"] = "c"
        gw = Gateway(mock.url)
        with running(gw):
            self._warmup(gw)
            spread = f"{busy['sockets'] * busy['streams']} over 1 s"
            for shape, cfg in (("one at a time", quiet), (spread, busy)):
                self._cancel_runs(mock, gw, shape, cfg)

    def _cancel_runs(self, mock: Mock, gw: Gateway, shape: str, cfg: dict[str, Any]) -> None:
        c50, c99, u50, u99, h50, h99, own, own2 = [], [], [], [], [], [], [], []
        quiet = cfg["sockets"] == 1
        for i in range(self.s.repeats):
            mock.reset()
            m0 = gw.metrics("gateway_cancel_latency_seconds")
            r = Load(dict(cfg, url=gw.url)).run()
            m1 = gw.metrics("gateway_cancel_latency_seconds")
            check(r, "cancel")
            count = m1.get("_count", 0) - m0.get("_count", 0)
            if count:
                own.append((m1["_sum"] - m0["_sum"]) / count * 1000)
                within = m1.get('_bucket{le="0.002"}', 0) - m0.get('_bucket{le="0.002"}', 0)
                own2.append(100 * within / count)
            ms = [x / 1000 for x in r["cancel_us"]]
            c50.append(pct(ms, 50))
            c99.append(pct(ms, 99))
            up, handler = self._upstream_close_ms(mock, r["cancel_sent_ns"])
            u50.append(pct(up, 50))
            u99.append(pct(up, 99))
            h50.append(pct(handler, 50))
            h99.append(pct(handler, 99))
            self.log(
                f"  cancel ({shape}) #{i + 1}: cancelled p50 {c50[-1]:.2f} p99 {c99[-1]:.2f} "
                f"ms; upstream saw the close p50 {u50[-1]:.2f} p99 {u99[-1]:.2f} ms, its "
                f"handler ended p50 {h50[-1]:.2f} p99 {h99[-1]:.2f} ms "
                f"({len(up)}/{len(ms)} closes seen)"
            )
        n = len(ms)
        what = (
            f"{n} streams one after another, each cancelled at its first chunk"
            if quiet
            else f"{n} streams cancelled at their first chunk, spread over 1 s"
        )
        self.row(
            "4 cancel",
            f"cancel -> cancelled p50 / p99 ({what})",
            "ms",
            c99,
            note=f"p50 {fmt(statistics.median(c50))} ms",
        )
        self.row(
            "4 cancel",
            f"cancel -> upstream saw its connection close (the mock's connection_lost) p99, "
            f"{shape}",
            "ms",
            u99,
            ("<=", 2.0, "") if quiet else None,
            note=f"p50 {fmt(statistics.median(u50))} ms"
            + ("" if quiet else "; mock and load generator share core 1"),
        )
        self.row(
            "4 cancel",
            f"cancel -> the mock's request handler ended p99, {shape} (its own task switches "
            "included)",
            "ms",
            h99,
            note=f"p50 {fmt(statistics.median(h50))} ms",
        )
        if not quiet:
            self.row(
                "4 cancel",
                "gateway's own cancel latency (decision -> upstream close()), mean, from /metrics",
                "ms",
                own,
                note=f"{fmt(statistics.median(own2)) if own2 else 'n/a'} % within 2 ms "
                "(/metrics histogram)",
            )

    def _upstream_close_ms(
        self, mock: Mock, sent: dict[str, int]
    ) -> tuple[list[float], list[float]]:
        """Join the load generator's cancel times with the mock's records (all CLOCK_MONOTONIC
        ns): when its server heard the connection was lost (`closed_ns`) and when the request's
        handler ended after that (`ended_ns`); wait briefly for the last ones."""
        deadline = time.monotonic() + 10
        while True:
            records = {r["tag"]: r for r in mock.stats().get("records", []) if r.get("tag") in sent}
            ended = [r for r in records.values() if r.get("ended_ns")]
            if len(ended) >= len(sent) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        closed = [(r["closed_ns"] - sent[r["tag"]]) / 1e6 for r in ended if r.get("closed_ns")]
        return closed, [(r["ended_ns"] - sent[r["tag"]]) / 1e6 for r in ended]

    # 5. memory ----------------------------------------------------------------------------

    def memory(self, mock: Mock) -> None:
        s = self.s
        small, large = s.mem_small, s.mem_large
        variants = (
            ("client offers no compression", False, (), (small, large)),
            # Declined deflate costs what no deflate costs; 20,000 sockets take a minute each
            # on this machine (the gateway spends about 0.9 ms of CPU per handshake).
            ("client offers permessage-deflate, gateway declines", True, (), (small,)),
            (
                "client offers permessage-deflate, gateway --compression",
                True,
                ("--compression",),
                (small, large),
            ),
        )
        for label, deflate, extra, counts in variants:
            for n in counts:
                per: list[float] = []
                accepted = 0
                for i in range(s.mem_repeats if n < 5000 else 1):
                    gw = Gateway(mock.url, *extra)
                    with running(gw):
                        self._warmup(gw)
                        time.sleep(0.3)
                        before = gw.rss_bytes()
                        # At most ~100 handshakes in flight (the gateway's listen backlog
                        # is 4096, but a burst of handshakes all time out together).
                        procs = 2 if n >= 2000 else 1
                        load = Load(
                            {
                                "mode": "idle",
                                "url": gw.url,
                                "sockets": n,
                                "deflate": deflate,
                                "connect_batch": 100 // procs,
                            },
                            procs=procs,
                        )
                        try:
                            opened = sum(r["sockets"] for r in load.ready)
                            accepted = sum(r.get("deflate_accepted", 0) for r in load.ready)
                            time.sleep(1.0)
                            after = gw.rss_bytes()
                        finally:
                            load.send("stop")
                            load.results()
                    if opened < 0.99 * n:
                        raise RuntimeError(f"memory: opened only {opened} of {n} sockets")
                    if opened != n:
                        self.notes.append(
                            f"memory, {label}: {n - opened} of {n:,} handshakes failed twice "
                            f"(timeouts under the connect burst); per-socket RSS divides by the "
                            f"{opened:,} open ones"
                        )
                    per.append((after - before) / opened / 1024)
                    self.log(
                        f"  memory {label}, {n} sockets #{i + 1}: {per[-1]:.1f} KiB/socket "
                        f"(rss {before / 2**20:.0f} -> {after / 2**20:.0f} MiB, deflate "
                        f"accepted on {accepted})"
                    )
                target = ("<=", 12.0, "") if n == s.mem_large and not extra else None
                self.row(
                    "5 memory",
                    f"RSS per idle socket, {n:,} sockets, {label}",
                    "KiB",
                    per,
                    target,
                    note=f"deflate negotiated on {accepted}/{n}" if deflate else "",
                )
        self._active_memory(mock)

    def _active_memory(self, mock: Mock) -> None:
        s = self.s
        n = s.active_streams
        per: list[float] = []
        for i in range(s.mem_repeats):
            gw = Gateway(mock.url)
            with running(gw):
                self._warmup(gw)
                load = Load(
                    {
                        "mode": "ws",
                        "url": gw.url,
                        "sockets": n // 5,
                        "streams": 5,
                        "hold": True,
                        "stagger_ms": 1000,
                        "prompt": "[[mock fast=1 chunks=1000 rate=2]] bench memory",
                    }
                )
                try:
                    time.sleep(0.5)
                    idle = gw.rss_bytes()
                    load.send("go")
                    load.wait("active")
                    time.sleep(1.5)
                    active = gw.rss_bytes()
                finally:
                    load.send("stop")
                    load.results()
            per.append((active - idle) / n / 1024)
            self.log(
                f"  memory active #{i + 1}: {per[-1]:.1f} KiB/stream "
                f"(rss {idle / 2**20:.0f} -> {active / 2**20:.0f} MiB)"
            )
        self.row(
            "5 memory",
            f"RSS per active stream ({n} streams at 2 chunks/s on {n // 5} sockets, "
            "over the same sockets idle)",
            "KiB",
            per,
            note="includes the upstream HTTP connection and its aiohttp state",
        )

    # 6. CPU per paced chunk ---------------------------------------------------------------

    def _paced_cfg(self, url: str) -> dict[str, Any]:
        s, rate = self.s, 20
        chunks = int(rate * s.cpu_seconds)
        return {
            "mode": "ws",
            "url": url,
            "sockets": s.cpu_streams // 5,
            "streams": 5,
            "chunks": chunks,
            "stagger_ms": 1000 / rate,
            "prompt": f"[[mock fast=1 chunks={chunks} rate={rate}]] bench cpu",
        }

    def cpu(self, mock: Mock) -> None:
        s = self.s
        rate = 20
        chunks = int(rate * s.cpu_seconds)
        per: list[float] = []
        gw = Gateway(mock.url)
        with running(gw):
            self._warmup(gw, s.cpu_streams // 5, 5)
            for i in range(s.repeats):
                load = Load(self._paced_cfg(gw.url))
                cpu0 = gw.cpu_seconds()
                r = load.run()
                cpu = gw.cpu_seconds() - cpu0
                check(r, "cpu")
                per.append(cpu / r["upstream_chunks"] * 1e6)
                self.log(
                    f"  cpu #{i + 1}: {per[-1]:.1f} us/chunk ({cpu:.2f} s for "
                    f"{r['upstream_chunks']} chunks, {r['frames']} frames)"
                )
        self.row(
            "6 cpu",
            f"gateway CPU per paced chunk ({s.cpu_streams} streams x {rate} chunks/s, "
            f"{chunks} chunks each, stream setup included)",
            "us",
            per,
            ("<=", 25.0, ""),
        )

    # 9. the issue's yardstick, on this machine ----------------------------------------------

    def reference(self, mock: Mock) -> None:
        """The throughput and paced (cpu) workloads against the gateway and the reference bridge
        (bench/reference_bridge.py), interleaved run by run on the same core: the issue's
        targets are multiples of that bridge's figures on the issue's machine, and these ratios
        carry over to machines of other speeds (or a VM whose speed drifts) where the absolute
        figures do not."""
        s = self.s
        rate: dict[str, list[float]] = {"gw": [], "ref": []}
        per: dict[str, list[float]] = {"gw": [], "ref": []}
        gw, ref = Gateway(mock.url), Reference(mock.url)
        with running(gw, ref):
            for server in (gw, ref):
                self._warmup(server, s.cpu_streams // 5, 5)
            for i in range(s.repeats):
                for key, server in (("gw", gw), ("ref", ref)):
                    r = Load(self._throughput_cfg("ws", server.url)).run()
                    check(r, f"reference ({key}, throughput)")
                    rate[key].append(r["upstream_chunks"] / r["elapsed_s"])
                    load = Load(self._paced_cfg(server.url))
                    cpu0 = server.cpu_seconds()
                    r = load.run()
                    cpu = server.cpu_seconds() - cpu0
                    check(r, f"reference ({key}, paced)")
                    per[key].append(cpu / r["upstream_chunks"] * 1e6)
                self.log(
                    f"  reference #{i + 1}: throughput {rate['gw'][-1]:,.0f} vs "
                    f"{rate['ref'][-1]:,.0f} chunks/s; paced {per['gw'][-1]:.1f} vs "
                    f"{per['ref'][-1]:.1f} us/chunk (gateway vs reference bridge)"
                )
        self.row(
            "9 reference",
            "reference bridge (websockets + aiohttp, straightforward): upstream chunks/s, "
            "throughput workload",
            "chunks/s",
            rate["ref"],
            note="the issue measured about 45,000 on its machine",
        )
        self.row(
            "9 reference",
            "gateway / reference bridge, throughput (runs interleaved, same core)",
            "x",
            [g / r for g, r in zip(rate["gw"], rate["ref"], strict=True)],
            (">=", 150_000 / 45_000, "150,000 / 45,000"),
        )
        self.row(
            "9 reference",
            "reference bridge: CPU per paced chunk (cpu workload)",
            "us",
            per["ref"],
            note="the issue measured 50 to 65 us on its machine",
        )
        self.row(
            "9 reference",
            "gateway / reference bridge, CPU per paced chunk (runs interleaved, same core)",
            "x",
            [g / r for g, r in zip(per["gw"], per["ref"], strict=True)],
            ("<=", 25 / 57.5, "25 us / 57.5 us, the middle of 50 to 65"),
        )

    # 10. instructions (callgrind) ------------------------------------------------------------

    def instructions(self, mock: Mock) -> None:
        """User-space instructions per paced chunk, counted by callgrind: unlike CPU time they
        do not drift with the VM's speed or a noisy neighbour, so they show a change of a few
        percent that the CPU rows cannot. Each relay runs twice under valgrind, with N and 2N
        chunks per stream; the difference over the extra chunks leaves start-up and stream
        setup out. Kernel time is not counted (about 40% of a paced chunk's CPU)."""
        if shutil.which("valgrind") is None:
            self.notes.append("valgrind not installed: no instruction counts")
            return
        s = self.s
        counts: dict[str, list[float]] = {"gw": [], "ref": []}
        log = HERE / "results" / ".valgrind.log"
        for key in ("gw", "ref"):
            totals: list[tuple[int, int]] = []
            for chunks in (s.ir_chunks, 2 * s.ir_chunks):
                prefix = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
                prefix.append(f"--log-file={log}")
                server: Server = (
                    Gateway(mock.url, prefix=prefix, start_timeout=180)
                    if key == "gw"
                    else Reference(mock.url, prefix=prefix, start_timeout=180)
                )
                with running(server):
                    self._warmup(server, 2, 5)
                    cfg = dict(self._paced_cfg(server.url), sockets=s.ir_streams // 5)
                    cfg["chunks"] = chunks
                    cfg["prompt"] = f"[[mock fast=1 chunks={chunks} rate=20]] bench instructions"
                    r = Load(cfg).run()
                    check(r, f"instructions ({key})")
                collected = re.search(r"Collected : (\d+)", log.read_text())
                if collected is None:
                    raise RuntimeError(f"no callgrind total in {log}")
                totals.append((r["upstream_chunks"], int(collected.group(1))))
            (c1, i1), (c2, i2) = totals
            counts[key].append((i2 - i1) / (c2 - c1))
            self.log(f"  instructions {key}: {counts[key][-1]:,.0f} per paced chunk")
        streams = s.ir_streams
        what = f"{streams} streams x 20 chunks/s, {s.ir_chunks} vs {2 * s.ir_chunks} chunks each"
        self.row(
            "10 instructions",
            f"gateway: user-space instructions per paced chunk (callgrind; {what})",
            "instr",
            counts["gw"],
            note="steady from run to run: the yardstick for A/B of the Python path",
        )
        self.row(
            "10 instructions",
            "reference bridge: user-space instructions per paced chunk (callgrind)",
            "instr",
            counts["ref"],
        )
        self.row(
            "10 instructions",
            "gateway / reference bridge, user-space instructions per paced chunk",
            "x",
            [counts["gw"][0] / counts["ref"][0]],
            note="user space only: the kernel's part (each read, write and wake-up) is the same "
            "work for both",
        )

    # py-spy -------------------------------------------------------------------------------

    def profile(self, mock: Mock, out: Path, workload: str) -> None:
        """Record the gateway with py-spy during repeated runs of one workload (`throughput`:
        unpaced, or `paced`: the cpu scenario's tokens one read at a time); keep the raw
        (collapsed) stacks and print the hottest frames."""
        pyspy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
        if not Path(pyspy).exists():
            self.notes.append("py-spy not installed: no profile (pip install py-spy)")
            return
        gw = Gateway(mock.url)
        with running(gw):
            self._warmup(gw)
            stem = out.with_suffix("") if workload == "throughput" else out.with_suffix(".paced")
            raw = stem.with_suffix(stem.suffix + ".pyspy.txt")
            top = stem.with_suffix(stem.suffix + ".pyspy-top.txt")
            spy = subprocess.Popen(
                taskset(
                    LOAD_CORES,
                    [
                        pyspy,
                        "record",
                        "--pid",
                        str(gw.pid),
                        "--rate",
                        "250",
                        "--format",
                        "raw",
                        "--output",
                        str(raw),
                        "--nonblocking",
                        "--duration",
                        "600",
                    ],
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
            for _ in range(max(2, self.s.repeats)):
                cfg = (
                    self._throughput_cfg("ws", gw.url)
                    if workload == "throughput"
                    else self._paced_cfg(gw.url)
                )
                check(Load(cfg).run(), "profile")
            spy.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(20)
            if spy.poll() is None:
                spy.kill()
        if raw.exists():
            report = top_frames(raw.read_text(), workload)
            top.write_text(report)
            self.notes.append(
                f"py-spy profile of the {workload} workload: {raw.name}, top frames in {top.name}"
            )
            self.log(report)


def top_frames(collapsed: str, workload: str, limit: int = 25) -> str:
    """Self and inclusive sample shares from py-spy's collapsed stacks: per function (line
    numbers dropped) and per line for the self time."""
    by_func_self: dict[str, int] = {}
    by_func_incl: dict[str, int] = {}
    by_line_self: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        leaf = frames[-1]
        by_line_self[leaf] = by_line_self.get(leaf, 0) + n
        funcs = [_function(f) for f in frames]
        by_func_self[funcs[-1]] = by_func_self.get(funcs[-1], 0) + n
        for f in set(funcs):
            by_func_incl[f] = by_func_incl.get(f, 0) + n
    if not total:
        return "py-spy: no samples\n"

    def table(title: str, counts: dict[str, int]) -> list[str]:
        rows = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
        return ["", title, *(f"{100 * n / total:6.1f}%  {f}" for f, n in rows)]

    lines = [f"py-spy: {total} samples of the gateway process during {workload} runs"]
    lines += table("self time by function", by_func_self)
    lines += table("inclusive time by function", by_func_incl)
    lines += table("self time by line", by_line_self)
    return "\n".join(lines) + "\n"


def _function(frame: str) -> str:
    """'f (path/file.py:12)' -> 'f (path/file.py)'."""
    name, sep, where = frame.partition(" (")
    return name + sep + where.rsplit(":", 1)[0] + ")" if sep else frame


# ------------------------------------------------------------------------------ report


def render(rows: list[Row], header: list[str], notes: list[str]) -> str:
    cols = ["scenario", "metric", "median", "min .. max", "target", "verdict", "note"]
    out = [*header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        out.append("| " + " | ".join(c.replace("|", "/") for c in row.cells()) + " |")
    if notes:
        out += ["", *[f"- {n}" for n in notes]]
    return "\n".join(out) + "\n"


def machine_header(sizes: Sizes, quick: bool, only: Sequence[str]) -> list[str]:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            # The run's own output files do not make the code it measured dirty.
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        rev, dirty = "?", ""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    node = subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout.strip()
    return [
        f"# Benchmark {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
        + (" (BENCH_QUICK: smoke-test sizes, not comparable)" if quick else ""),
        "",
        f"- commit {rev}{' + local changes' if dirty else ''}; Python {platform.python_version()}, "
        f"Node {node}; {os.cpu_count()} cores ({cpu})",
        f"- gateway pinned to core {GATEWAY_CORES} (uvloop, one worker unless stated); mock "
        f"upstream (fast mode) and Node load generators pinned to core {LOAD_CORES}",
        f"- each row: median of {sizes.repeats} runs (memory: {sizes.mem_repeats}, 1 at "
        f"{sizes.mem_large:,} sockets) and the "
        "min .. max spread; every stream checked (seq contiguous, done.text == chunks, chunk "
        "count)",
        f"- scenarios: {', '.join(only)}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--repeats", type=int, help="runs per scenario (default 5, quick 1)")
    parser.add_argument(
        "--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1"
    )
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="py-spy the throughput and the paced (cpu) workloads (default: on in full runs)",
    )
    parser.add_argument("--output", type=Path, help="table file (default bench/results/<date>.md)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = Sizes(**{**sizes.__dict__, "repeats": args.repeats})
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    if shutil.which(NODE) is None:
        parser.error("node is not installed")
    if not (HERE / "node_modules" / "ws").exists():
        parser.error("run `npm ci` in bench/ first (make bench does)")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / ".gateway.log").write_text("")
    fds = raise_fd_limit()
    profile = (
        (not args.quick and len(only) == len(SCENARIOS)) if args.profile is None else args.profile
    )
    date = f"{dt.datetime.now(dt.UTC):%Y-%m-%d}"
    out = args.output or HERE / "results" / (f"{date}-quick.md" if args.quick else f"{date}.md")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    bench = Bench(sizes, args.quick, log)
    if fds < 2 * sizes.mem_large + 1000 and "memory" in only:
        bench.notes.append(
            f"open-file limit is only {fds} (the hard limit; raising it needs CAP_SYS_RESOURCE): "
            "at that many sockets a few handshakes may fail with EMFILE"
        )
    started = time.monotonic()
    steal: dict[str, str] = {}
    mock = Mock()
    with running(mock):
        for name in SCENARIOS:
            if name not in only:
                continue
            log(f"== {name}")
            t0, ticks0 = time.monotonic(), core_times()
            try:
                if name == "throughput":
                    bench.throughput(mock)
                elif name == "workers":
                    if bench.tp_median is None:
                        bench.throughput(mock)
                    bench.throughput(mock, workers=2)
                else:
                    getattr(bench, name)(mock)
            except Exception as exc:  # one broken scenario must not lose the others' rows
                log(traceback.format_exc())
                bench.failed.append(name)
                bench.notes.append(f"scenario {name} FAILED: {exc}")
            steal[name] = steal_shares(ticks0)
            log(f"   ({time.monotonic() - t0:.0f} s; host steal: {steal[name]})")
        if profile:
            for workload in ("throughput", "paced"):
                log(f"== py-spy profile ({workload})")
                bench.profile(mock, out, workload)
    bench.notes.append(
        "host CPU steal during each scenario (time the hypervisor ran other guests on this "
        "VM's cores; high values inflate latency tails and the CPU figures): "
        + "; ".join(f"{name}: {shares}" for name, shares in steal.items())
    )
    bench.notes.append(f"total bench time {time.monotonic() - started:.0f} s")
    table = render(bench.rows, machine_header(sizes, args.quick, only), bench.notes)
    out.write_text(table)
    print(table)
    print(f"(written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out})")
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
