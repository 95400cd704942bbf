"""The load: sizes of each workload, the Node load generators (bench/loadgen.js) that drive it,
and the workloads more than one scenario runs (warm-up, throughput, paced)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Any

from bench.harness.procs import BENCH, LOAD_CORES, NODE, Proc, Server, taskset


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

#: Warm-up streams last two seconds (two chunks at 0.5/s), so that N staggered ones hold N
#: upstream connections at once: the pools (the gateway's, the direct client's keep-alive agent)
#: then have as many connections as the measured streams, which do not all connect at once
#: (the mock's listen backlog is aiohttp's 128; an overflow costs SYN retransmits or resets).
WARM_PROMPT = "[[mock fast=1 chunks=2 rate=0.5]] warm-up"


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
            argv = taskset(cores, [NODE, str(BENCH / "loadgen.js"), json.dumps(part)])
            self.procs.append(
                Proc(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=BENCH)
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


def check(result: dict[str, Any], what: str) -> None:
    """Every stream of a scenario must have passed its checks; otherwise the run is invalid."""
    if result["streams_failed"] or result["open_failed"]:
        raise RuntimeError(
            f"{what}: {result['streams_failed']} streams failed, {result['open_failed']} "
            f"sockets failed to open: {result['errors']}"
        )


def warmup(server: Server, sockets: int = 4, streams: int = 2) -> None:
    """Load the gateway's code paths and open `sockets` x `streams` upstream connections."""
    load = Load(
        {
            "mode": "ws",
            "url": server.url,
            "sockets": sockets,
            "streams": streams,
            "chunks": 2,
            "stagger_ms": 1000 if sockets * streams > 50 else 0,
            "prompt": WARM_PROMPT,
        }
    )
    check(load.run(), "warm-up")


def throughput_cfg(s: Sizes, mode: str, url: str) -> dict[str, Any]:
    """Unpaced streams: the throughput scenario's load (also ceiling's, reference's, py-spy's)."""
    return {
        "mode": mode,
        "url": url,
        "sockets": s.tp_sockets,
        "streams": s.tp_streams,
        "chunks": s.tp_chunks,
        "prompt": f"[[mock fast=1 chunks={s.tp_chunks}]] bench throughput",
    }


def paced_cfg(s: Sizes, url: str) -> dict[str, Any]:
    """Streams at 20 chunks/s: the cpu scenario's load (also reference's, instructions' and
    py-spy's)."""
    rate = 20
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
