"""4. cancel: paced streams, each cancelled at its first chunk: `cancel` -> `cancelled`, ->
the mock's server hearing the connection close, -> the mock's handler ending. The mock stamps
`time.monotonic_ns()` per tagged request; they are joined here with the load generator's cancel
times."""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.harness.context import Bench, Scenario
from bench.harness.load import Load, check, warmup
from bench.harness.measure import pct
from bench.harness.procs import Gateway, Mock, running
from bench.harness.report import fmt


def run(bench: Bench, mock: Mock) -> None:
    """Two shapes: one stream at a time (the target: the cancel path itself, each close
    seen before the next stream starts), and 500 streams cancelled over one second, where
    the mock upstream and the load generator share core 1 and queue behind each other."""
    s = bench.s
    quiet: dict[str, Any] = {
        "mode": "ws",
        "sockets": 1,
        "streams": 1,
        "rounds": s.cancel_rounds,
        "round_gap_ms": 5,
        "cancel": True,
        "tag_prefix": "q",
        "prompt": "[[mock fast=1 chunks=1000 rate=20 tag={tag}]] bench cancel",
    }
    busy = dict(quiet, sockets=max(1, s.cancel_streams // 5), streams=5, rounds=1, stagger_ms=1000)
    del busy["round_gap_ms"]
    busy["tag_prefix"] = "c"
    gw = Gateway(mock.url)
    with running(gw):
        warmup(gw)
        spread = f"{busy['sockets'] * busy['streams']} over 1 s"
        for shape, cfg in (("one at a time", quiet), (spread, busy)):
            _cancel_runs(bench, mock, gw, shape, cfg)


def _cancel_runs(bench: Bench, mock: Mock, gw: Gateway, shape: str, cfg: dict[str, Any]) -> None:
    c50, c99, u50, u99, h50, h99, own, own2 = [], [], [], [], [], [], [], []
    quiet = cfg["sockets"] == 1
    for i in range(bench.s.repeats):
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
        up, handler = _upstream_close_ms(mock, r["cancel_sent_ns"])
        u50.append(pct(up, 50))
        u99.append(pct(up, 99))
        h50.append(pct(handler, 50))
        h99.append(pct(handler, 99))
        bench.log(
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
    bench.row(
        "4 cancel",
        f"cancel -> cancelled p50 / p99 ({what})",
        "ms",
        c99,
        note=f"p50 {fmt(statistics.median(c50))} ms",
    )
    bench.row(
        "4 cancel",
        f"cancel -> upstream saw its connection close (the mock's connection_lost) p99, {shape}",
        "ms",
        u99,
        ("<=", 2.0, "") if quiet else None,
        note=f"p50 {fmt(statistics.median(u50))} ms"
        + ("" if quiet else "; mock and load generator share core 1"),
    )
    bench.row(
        "4 cancel",
        f"cancel -> the mock's request handler ended p99, {shape} (its own task switches included)",
        "ms",
        h99,
        note=f"p50 {fmt(statistics.median(h50))} ms",
    )
    if not quiet:
        bench.row(
            "4 cancel",
            "gateway's own cancel latency (decision -> upstream close()), mean, from /metrics",
            "ms",
            own,
            note=f"{fmt(statistics.median(own2)) if own2 else 'n/a'} % within 2 ms "
            "(/metrics histogram)",
        )


def _upstream_close_ms(mock: Mock, sent: dict[str, int]) -> tuple[list[float], list[float]]:
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


SCENARIO = Scenario(
    "cancel",
    "cancel at the first chunk: until cancelled, and until the upstream sees the close",
    run,
)
