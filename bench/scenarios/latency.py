"""2. latency: 1,000 streams (200 sockets x 5) at 20 and 40 chunks/s, starts spread over one
chunk interval; per-chunk latency through the gateway against the same streams read directly
from the mock. The mock stamps each chunk with `time.monotonic_ns()` when it writes it; the load
generator subtracts it from `process.hrtime.bigint()` on receipt (both CLOCK_MONOTONIC)."""

from __future__ import annotations

import statistics

from bench.harness.context import Bench, Scenario
from bench.harness.load import WARM_PROMPT, Load, check, warmup
from bench.harness.measure import pct
from bench.harness.procs import Gateway, Mock, running


def run(bench: Bench, mock: Mock) -> None:
    s = bench.s
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
            warmup(gw, s.lat_sockets, s.lat_streams)
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
                    bench.log(
                        f"  latency {rate}/s {mode} #{i + 1}: p50 {acc['p50'][-1]:.2f} "
                        f"p99 {acc['p99'][-1]:.2f} max {acc['max'][-1]:.2f} ms "
                        f"({len(lat)} chunks, load cpu {r['cpu_s']:.2f}s "
                        f"of {r['elapsed_s']:.2f}s)"
                    )
        label = f"{streams} streams x {rate} chunks/s"
        for key in ("p50", "p99", "max"):
            bench.row("2 latency", f"{label}: direct (no gateway) {key}", "ms", dr_p[key])
        direct_p99 = statistics.median(dr_p["p99"])
        for key in ("p50", "p99", "max"):
            target = None
            if key == "p99":
                target = ("<=", direct_p99 * factor, f"{factor}x direct p99")
            bench.row("2 latency", f"{label}: through gateway {key}", "ms", gw_p[key], target)
        bench.row(
            "2 latency",
            f"{label}: gateway event-loop lag, mean (gateway_event_loop_lag_seconds)",
            "ms",
            lag,
            note="how late the gateway's 0.25 s timer ran: a saturated loop shows here",
        )
        bench.row(
            "2 latency",
            f"{label}: gateway CPU per chunk",
            "us",
            cpu_per,
            note="compare row 6: the busier the loop, the more chunks share each wakeup",
        )


SCENARIO = Scenario(
    "latency",
    "per-chunk latency of paced streams, through the gateway and direct from the mock",
    run,
)
